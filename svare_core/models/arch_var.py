"""FoundationVision's VAR, recognised so that a user is told what such a file is: class-conditional
ImageNet models, not text-to-image, so not loadable here yet (no layout)."""
from __future__ import annotations

from .registry import Architecture

ARCHITECTURES = (
    Architecture("var", "VAR class-conditional ImageNet transformer (FoundationVision/VAR)", "transformer",
                 lambda c: c.has("class_emb.weight", "blocks.0.attn.mat_qkv.weight")),
    Architecture("var-vqvae", "VAR multi-scale VQVAE (vocabulary 4096)", "vae",
                 lambda c: c.has("quantize.embedding.weight", "post_quant_conv.weight")),
)
