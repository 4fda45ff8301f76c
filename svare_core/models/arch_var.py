"""FoundationVision's VAR, recognised so that a user is told what such a file is: class-conditional
ImageNet models, not text-to-image, so not loadable here yet (no layout). VAR's VQ-VAE is loadable:
it is Switti's tokenizer (arch_switti.py)."""
from __future__ import annotations

from .registry import Architecture

ARCHITECTURES = (
    Architecture("var", "VAR class-conditional ImageNet transformer (FoundationVision/VAR)", "transformer",
                 lambda c: c.has("class_emb.weight", "blocks.0.attn.mat_qkv.weight")),
)
