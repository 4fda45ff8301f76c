"""Infinity's BSQ VAE as a registered architecture: released files told by their keys, in either
layer naming, their config read from the tensor shapes."""
from __future__ import annotations

import dataclasses
import re

import torch

from .checkpoint import Checkpoint
from .registry import Architecture
from .vae import BSQVAE, VAEConfig


def is_infinity_vae(ckpt: Checkpoint) -> bool:
    # VAR's VQVAE shares the encoder/decoder names; its codebook (quantize.embedding) tells it apart.
    return (any(k in ckpt.state for k in ("encoder.conv_in.conv.weight", "encoder.conv_in.weight"))
            and any(k.startswith("decoder.up.") for k in ckpt.state)
            and not any(k.startswith("quantize.embedding") for k in ckpt.state))


_PLAIN_CONVS = {"conv_in", "conv_out", "conv1", "conv2", "nin_shortcut"}
_PLAIN_NORMS = {"norm1", "norm2", "norm_out"}


def vae_key_map(keys) -> dict[str, str]:
    """Our VAE key -> the file's key. Accepts plain (``conv1.weight``) and wrapped
    (``conv1.conv.weight``) layer names; drops the ``quantize.*`` alias of ``quantizer.*``."""
    out = {}
    for k in keys:
        if k.startswith("quantize."):
            continue
        *mod, param = k.split(".")
        resample_conv = len(mod) > 1 and mod[-1] == "conv" and mod[-2] in ("downsample", "upsample")
        if mod and (mod[-1] in _PLAIN_CONVS or resample_conv):
            mod.append("conv")
        elif mod and mod[-1] in _PLAIN_NORMS:
            mod.append("norm")
        out[".".join(mod + [param])] = k
    return out


def normalise_vae_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {new: state[old] for new, old in vae_key_map(state).items()}


def vae_config_from_shapes(ckpt: Checkpoint) -> VAEConfig:
    state = normalise_vae_keys(ckpt.state)
    ch = state["encoder.conv_in.conv.weight"].shape[0]
    levels = sorted({int(m[1]) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    mult = tuple(state[f"encoder.down.{i}.block.0.conv1.conv.weight"].shape[0] // ch for i in levels)
    n_blocks = len({int(m[1]) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    z = state["encoder.conv_out.conv.weight"].shape[0]
    # GroupNorm's group count is not in the weights: released VAEs use 32 (24 where 32 does not divide).
    return VAEConfig(ch=ch, ch_mult=mult, num_res_blocks=n_blocks, z_channels=z, norm_groups=32)


def infinity_vae_layout(ckpt: Checkpoint) -> tuple[VAEConfig, dict[str, str]]:
    return vae_config_from_shapes(ckpt), vae_key_map(ckpt.state)


def fit_tokens(cfg: VAEConfig, token_bits: int) -> VAEConfig:
    """The patch size is not in the weights: the one that makes the latent ``token_bits`` wide
    (0 where none does, which the loader then refuses)."""
    return dataclasses.replace(cfg, patch_size=next((p for p in (1, 2, 4) if cfg.z_channels * p * p == token_bits), 0))


ARCHITECTURES = (
    Architecture("infinity-vae", "Infinity BSQ VAE", "vae", is_infinity_vae, infinity_vae_layout, BSQVAE, VAEConfig,
                 fit_tokens=fit_tokens),
)
