"""What erasure may change: dense tensors (cross-attention + FFN, the paper's default) or LoRA factors,
for Infinity and Switti (the same set names, each family's parameter names).

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
from ..models.switti import Switti

# The same set names for every family, each in its own parameter names: Infinity's blocks are
# block_chunks.i.module.j.(sa|ca|ffn), Switti's blocks.i.(attn|cross_attn|ffn).
_INFINITY_DENSE = {
    "xattn_ffn": r"block_chunks\.\d+\.module\.\d+\.(ca|ffn)\.",
    "xattn": r"block_chunks\.\d+\.module\.\d+\.ca\.",
    "xattn_kv": r"block_chunks\.\d+\.module\.\d+\.ca\.(mat_kv\.|v_bias)",
    "ffn": r"block_chunks\.\d+\.module\.\d+\.ffn\.",
    "all_blocks": r"block_chunks\.",
    # Cross-attention and the projection of the pooled text vector, which conditions the first token and
    # every block's AdaLN: the two ways a prompt's features reach the image (robust erasure's set).
    "xattn_pool": r"(text_proj_for_sos\.|block_chunks\.\d+\.module\.\d+\.ca\.)",
    # Everything that reads text: also the text norm and cross-attention's text projection, which the
    # unconditional rows of guidance pass too (more attack-resistant, more collateral: docs/results.md).
    "xattn_text": r"(text_norm\.|text_proj_for_sos\.|text_proj_for_ca\.|block_chunks\.\d+\.module\.\d+\.ca\.)",
}
_SWITTI_DENSE = {
    "xattn_ffn": r"blocks\.\d+\.(cross_attn|ffn)\.",
    "xattn": r"blocks\.\d+\.cross_attn\.",
    "xattn_kv": r"blocks\.\d+\.cross_attn\.to_kv\.",
    "ffn": r"blocks\.\d+\.ffn\.",
    "all_blocks": r"blocks\.",
    "xattn_pool": r"(text_pooler\.|blocks\.\d+\.cross_attn\.)",
    "xattn_text": r"(text_pooler\.|blocks\.\d+\.cross_attn\.)",        # Switti's cross-attention reads the features as they come
}
# LoRA targets: name suffixes of the blocks' linear layers (a leading dot keeps Switti's
# ".attn.proj" from also matching "cross_attn.proj").
_INFINITY_LORA = {
    "attn": ("sa.mat_qkv", "sa.proj", "ca.mat_q", "ca.mat_kv", "ca.proj"),
    "xattn": ("ca.mat_q", "ca.mat_kv", "ca.proj"),
    "xattn_out": ("ca.proj",),
    "attn_ffn": ("sa.mat_qkv", "sa.proj", "ca.mat_q", "ca.mat_kv", "ca.proj", "ffn.fc1", "ffn.fc2"),
}
_SWITTI_LORA = {
    "attn": (".attn.to_qkv", ".attn.proj", ".cross_attn.to_q", ".cross_attn.to_kv", ".cross_attn.proj"),
    "xattn": (".cross_attn.to_q", ".cross_attn.to_kv", ".cross_attn.proj"),
    "xattn_out": (".cross_attn.proj",),
    "attn_ffn": (".attn.to_qkv", ".attn.proj", ".cross_attn.to_q", ".cross_attn.to_kv", ".cross_attn.proj",
                 ".ffn.up_proj", ".ffn.gate_proj", ".ffn.down_proj"),
}
DENSE_SETS = _INFINITY_DENSE           # the names (the same for every family) and Infinity's patterns
LORA_TARGETS = _INFINITY_LORA


def _layout(model: nn.Module) -> tuple[str, dict[str, str], dict[str, tuple[str, ...]]]:
    """(block prefix, dense sets, LoRA targets) in the model's own parameter names."""
    if isinstance(model, Switti):
        return "blocks.", _SWITTI_DENSE, _SWITTI_LORA
    return "block_chunks.", _INFINITY_DENSE, _INFINITY_LORA


class LoRADelta(nn.Module):
    """weight -> weight + scale * B @ A; B starts at zero so training starts from the base model."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, dtype, device):
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_features, dtype=dtype, device=device) / rank)
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.B @ self.A).to(weight.dtype)


def dense_parameters(model: Infinity | Switti, name: str) -> dict[str, nn.Parameter]:
    """The parameters of the dense trainable set ``name`` in ``model``'s own names."""
    _, sets, _ = _layout(model)
    if name not in sets:
        raise ValueError(f"unknown trainable set {name!r}; choose one of {sorted(sets)} or 'lora'")
    pattern = re.compile(sets[name])
    return {n: p for n, p in model.named_parameters() if pattern.match(n)}


def lora_layers(model: Infinity | Switti, targets: str | tuple[str, ...]) -> dict[str, nn.Linear]:
    """The blocks' linear layers that LoRA ``targets`` names (a target set or name suffixes), by module name."""
    prefix, _, table = _layout(model)
    if isinstance(targets, str) and targets not in table:
        raise ValueError(f"unknown LoRA targets {targets!r}; choose one of {sorted(table)}")
    suffixes = table[targets] if isinstance(targets, str) else tuple(targets)
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith(prefix) and name.endswith(suffixes)}


def add_lora(model: Infinity | Switti, targets: str | tuple[str, ...], rank: int, alpha: float | None = None
             ) -> dict[str, LoRADelta]:
    """Parametrise the target linear layers of every block with LoRA; returns {weight name: LoRADelta}."""
    layers = lora_layers(model, targets)
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    added = {}
    for name, module in layers.items():
        w = module.weight
        delta = LoRADelta(w.shape[0], w.shape[1], rank, alpha or rank, torch.float32, w.device)
        # unsafe: skip the check that evaluates W + B @ A once per layer (LoRADelta keeps shape and dtype);
        # on Switti-1024 those 150 transient weights left 1.5 GB of freed heap resident (benchmarks/real_scale.py)
        parametrize.register_parametrization(module, "weight", delta, unsafe=True)
        added[f"{name}.weight"] = delta
    if not added:
        raise ValueError(f"no layer matches the LoRA targets {targets}")
    return added


def remove_lora(model: nn.Module) -> None:
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
