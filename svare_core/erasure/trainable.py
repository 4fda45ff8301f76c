"""What erasure may change: dense tensors (cross-attention + FFN, the paper's default) or LoRA factors.

LoRA is a weight parametrisation (W + scale * B @ A), so it also covers layers whose weight is
read directly (the fused qkv projection). Either way, training yields per-parameter deltas that an
erasure patch stores.
"""
from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..models.infinity import Infinity

DENSE_SETS = {
    "xattn_ffn": r"block_chunks\.\d+\.module\.\d+\.(ca|ffn)\.",
    "xattn": r"block_chunks\.\d+\.module\.\d+\.ca\.",
    "xattn_kv": r"block_chunks\.\d+\.module\.\d+\.ca\.(mat_kv\.|v_bias)",
    "ffn": r"block_chunks\.\d+\.module\.\d+\.ffn\.",
    "all_blocks": r"block_chunks\.",
}
LORA_TARGETS = {
    "attn": ("sa.mat_qkv", "sa.proj", "ca.mat_q", "ca.mat_kv", "ca.proj"),
    "xattn": ("ca.mat_q", "ca.mat_kv", "ca.proj"),
    "xattn_out": ("ca.proj",),
    "attn_ffn": ("sa.mat_qkv", "sa.proj", "ca.mat_q", "ca.mat_kv", "ca.proj", "ffn.fc1", "ffn.fc2"),
}


class LoRADelta(nn.Module):
    """weight -> weight + scale * B @ A; B starts at zero so training starts from the base model."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, dtype, device):
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_features, dtype=dtype, device=device) / rank)
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.B @ self.A).to(weight.dtype)


def dense_parameters(model: Infinity, name: str) -> dict[str, nn.Parameter]:
    if name not in DENSE_SETS:
        raise ValueError(f"unknown trainable set {name!r}; choose one of {sorted(DENSE_SETS)} or 'lora'")
    pattern = re.compile(DENSE_SETS[name])
    return {n: p for n, p in model.named_parameters() if pattern.match(n)}


def add_lora(model: Infinity, targets: str | tuple[str, ...], rank: int, alpha: float | None = None
             ) -> dict[str, LoRADelta]:
    """Parametrise the target linear layers of every block with LoRA; returns {weight name: LoRADelta}."""
    if isinstance(targets, str) and targets not in LORA_TARGETS:
        raise ValueError(f"unknown LoRA targets {targets!r}; choose one of {sorted(LORA_TARGETS)}")
    suffixes = LORA_TARGETS[targets] if isinstance(targets, str) else tuple(targets)
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    added = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("block_chunks.") and name.endswith(suffixes):
            w = module.weight
            delta = LoRADelta(w.shape[0], w.shape[1], rank, alpha or rank, torch.float32, w.device)
            parametrize.register_parametrization(module, "weight", delta)
            added[f"{name}.weight"] = delta
    if not added:
        raise ValueError(f"no layer matches the LoRA targets {suffixes}")
    return added


def remove_lora(model: Infinity) -> None:
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
