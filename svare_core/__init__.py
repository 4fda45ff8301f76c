"""svare: concept erasure (S-VARE) for next-scale visual autoregressive text-to-image models.

    from svare_core import load_pipeline, generate, SamplerSettings
    pipe = load_pipeline("toyworld")
    result = generate(pipe, ["a red star"], seed=0)
    result.images  # (B, H, W, 3) float in 0..1

The core never imports ComfyUI; the node pack in ``nodes/`` is a thin layer over this API.
"""
from .loader import load_pipeline, load_pipeline_cached, resolve_model_path
from .models import ModelLoadError, inspect_file
from .pipeline import VARPipeline
from .sampling import Cancelled, SampleResult, SamplerSettings, ScaleStep, decode_preview, generate

__version__ = "0.1.0"

__all__ = ["load_pipeline", "load_pipeline_cached", "resolve_model_path", "ModelLoadError", "inspect_file",
           "VARPipeline", "Cancelled", "SampleResult", "SamplerSettings", "ScaleStep", "decode_preview", "generate"]
