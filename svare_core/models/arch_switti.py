"""Switti's transformer and VAR's multi-scale VQ-VAE (Switti's tokenizer) as registered architectures.

Both are told by their key names and read their configs from the tensor shapes. The transformer's
two variants have the same keys and shapes: the default model's stored training mask
(``attn_bias_for_masking``) is block-diagonal, the AR variant's block-causal. One value of it
tells them apart (the last token's view of the first: 0 where it may attend, -inf where not);
the mask itself (357 MB at 1024 px) is never read or kept.
"""
from __future__ import annotations

import json
import math
import re

from ..schedules import num_tokens, switti_schedule
from .arch_infinity_vae import vae_key_map
from .checkpoint import Checkpoint, ModelLoadError
from .registry import Architecture
from .switti import Switti, SwittiConfig
from .vqvae import VQVAE, VQVAEConfig

MASK_KEY = "attn_bias_for_masking"
# Buffers of the release that this engine computes itself (level ids) or never needs (the mask).
DROPPED_KEYS = (MASK_KEY, "lvl_1L")
HEAD_DIM = 64          # the release ties heads to depth and width to 64 * depth


def is_switti(ckpt: Checkpoint) -> bool:
    return ckpt.has("text_pooler.weight", "blocks.0.attn.to_qkv.weight", "blocks.0.cross_attn.to_kv.weight")


def is_causal(ckpt: Checkpoint, tokens: int) -> bool:
    """Whether the file is the AR (block-causal) variant, from its mask buffer or, without one,
    the ``use_ar`` of the config.json beside it."""
    if MASK_KEY in ckpt.state:
        shape = ckpt.shape(MASK_KEY)
        if shape[-2:] != (tokens, tokens):
            levels = ckpt.shape("lvl_embed.weight")[0]
            raise ModelLoadError(f"{ckpt.path}: its attention mask covers {shape[-1]} tokens but its {levels} scales have "
                                 f"{tokens}; the file is corrupt or from an unknown Switti: download it again")
        if tokens == 1:
            return False
        last_sees_first = ckpt.read_element(MASK_KEY, (tokens - 1) * tokens)
        if last_sees_first == 0.0:
            return True
        if last_sees_first == -math.inf:
            return False
        raise ModelLoadError(f"{ckpt.path}: its attention mask holds {last_sees_first}, neither 0 nor -inf; the file is "
                             "corrupt: download it again")
    config = ckpt.path.parent / "config.json"
    if config.is_file():
        try:
            use_ar = json.loads(config.read_text()).get("use_ar")
        except (OSError, ValueError, AttributeError):
            use_ar = None
        if isinstance(use_ar, bool):
            return use_ar
    raise ModelLoadError(f"{ckpt.path}: holds no {MASK_KEY} buffer and no config.json with use_ar lies beside it, so "
                         "whether it is Switti or Switti-AR cannot be told: keep the released config.json next to the file")


def switti_config_from_shapes(ckpt: Checkpoint) -> SwittiConfig:
    depth = len({int(m[1]) for k in ckpt.state if (m := re.match(r"blocks\.(\d+)\.", k))})
    C, code_dim = ckpt.shape("word_embed.weight")
    levels = ckpt.shape("lvl_embed.weight")[0]
    scales = switti_schedule(levels)
    if C % HEAD_DIM:
        raise ValueError(f"width {C} is not a multiple of the release's head size {HEAD_DIM}")
    return SwittiConfig(
        depth=depth, embed_dim=C, num_heads=C // HEAD_DIM, vocab_size=ckpt.shape("head.weight")[0], code_dim=code_dim,
        text_dim=ckpt.shape("blocks.0.cross_attn.to_kv.weight")[1], pooled_dim=ckpt.shape("text_pooler.weight")[1],
        ffn_dim=ckpt.shape("blocks.0.ffn.gate_proj.weight")[0], num_levels=levels,
        causal=is_causal(ckpt, num_tokens(scales)), crop_cond="crop_proj.weight" in ckpt.state, scales=scales)


def switti_layout(ckpt: Checkpoint) -> tuple[SwittiConfig, dict[str, str]]:
    return switti_config_from_shapes(ckpt), {k: k for k in ckpt.state if k not in DROPPED_KEYS}


def is_var_vqvae(ckpt: Checkpoint) -> bool:
    return ckpt.has("quantize.embedding.weight", "post_quant_conv.weight")


def vqvae_key_map(keys) -> dict[str, str]:
    """Our key -> the file's: the encoder/decoder as the BSQ VAE maps them, the rest as they are."""
    keys = list(keys)
    out = vae_key_map(k for k in keys if k.startswith(("encoder.", "decoder.")))
    out.update({k: k for k in keys if not k.startswith(("encoder.", "decoder."))})
    return out


def vqvae_config_from_shapes(ckpt: Checkpoint) -> VQVAEConfig:
    ch = ckpt.shape("encoder.conv_in.weight")[0]
    levels = sorted({int(m[1]) for k in ckpt.state if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    mult = tuple(ckpt.shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in levels)
    blocks = len({int(m[1]) for k in ckpt.state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    phis = len({int(m[1]) for k in ckpt.state if (m := re.match(r"quantize\.quant_resi\.qresi_ls\.(\d+)\.", k))})
    if not phis:
        raise ValueError("no partially shared Phi convolutions (quantize.quant_resi.qresi_ls.*)")
    vocab, z = ckpt.shape("quantize.embedding.weight")
    return VQVAEConfig(vocab_size=vocab, z_channels=z, ch=ch, ch_mult=mult, num_res_blocks=blocks, num_phi=phis,
                       stat_rows=ckpt.shape("quantize.ema_vocab_hit_SV")[0])


def vqvae_layout(ckpt: Checkpoint) -> tuple[VQVAEConfig, dict[str, str]]:
    return vqvae_config_from_shapes(ckpt), vqvae_key_map(ckpt.state)


def load_text(parts, **kw):
    """Switti's two CLIP towers (models.text_clip; imported when needed: it imports transformers)."""
    from .text_clip import load_switti_text
    return load_switti_text(parts, **kw)


ARCHITECTURES = (
    Architecture("switti", "Switti transformer (text-to-image, 4096-way VQ tokens; yandex-research)", "transformer",
                 is_switti, switti_layout, Switti, SwittiConfig, text_parts=("clip_l", "clip_g"), text_encoder=load_text,
                 family="switti"),
    Architecture("var-vqvae", "VAR multi-scale VQVAE (vocabulary 4096; Switti's tokenizer)", "vae",
                 is_var_vqvae, vqvae_layout, VQVAE, VQVAEConfig),
)
