"""Infinity's transformer as a registered architecture: its checkpoints told by their keys, its config
read from the tensor shapes (Infinity-2B and -8B are the same code at two sizes)."""
from __future__ import annotations

import re

from .checkpoint import Checkpoint
from .infinity import Infinity, InfinityConfig
from .registry import Architecture


def is_infinity(ckpt: Checkpoint) -> bool:
    return ckpt.has("word_embed.weight", "text_proj_for_sos.ca.mat_q", "block_chunks.0.module.0.sa.mat_qkv.weight")


def infinity_config_from_shapes(ckpt: Checkpoint) -> InfinityConfig:
    blocks = sorted({(int(m[1]), int(m[2])) for k in ckpt.state
                     if (m := re.match(r"block_chunks\.(\d+)\.module\.(\d+)\.", k))})
    C, bits = ckpt.shape("word_embed.weight")
    return InfinityConfig(
        depth=len(blocks), embed_dim=C, num_heads=ckpt.shape("block_chunks.0.module.0.sa.scale_mul_1H11")[1],
        text_dim=ckpt.shape("text_norm.weight")[0], bits=bits,
        ffn_dim=ckpt.shape("block_chunks.0.module.0.ffn.fc1.weight")[0],
        num_block_chunks=len({c for c, _ in blocks}), num_levels=ckpt.shape("lvl_embed.weight")[0],
        text_max_len=ckpt.shape("cfg_uncond")[0], pool_heads=ckpt.shape("text_proj_for_sos.ca.mat_q")[1])


def infinity_layout(ckpt: Checkpoint) -> tuple[InfinityConfig, dict[str, str]]:
    # Our module keys are the released ones.
    return infinity_config_from_shapes(ckpt), {k: k for k in ckpt.state}


ARCHITECTURES = (
    Architecture("infinity", "Infinity transformer (text-to-image, bitwise tokens)", "transformer",
                 is_infinity, infinity_layout, Infinity, InfinityConfig),
)
