"""Bitwise multi-scale codes: the one place that turns bits into codes and codes into model inputs.

A VAE latent vector of d channels is quantised to the code (2 * bit - 1) / sqrt(d). Codes of every
scale are upsampled (bilinear) onto the final grid and summed; the input of the next scale is that
sum resized (bilinear) to the next grid. The residual being quantised is shrunk with area
averaging. With ``patch`` > 1 (Infinity-8B), a token is a patch x patch block of latent vectors:
its bits are ordered channel-major (pixel_unshuffle), and codes keep the latent's 1/sqrt(d) scale.
The VAE, the sampler and the trainers all use these functions, and the per-bit cross-entropy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Grid = tuple[int, int]


def _resize(x: torch.Tensor, size: Grid, mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def bits_to_codes(bits: torch.Tensor, h: int, w: int, patch: int = 1) -> torch.Tensor:
    """Token bits (B, h*w, d_token) in {0, 1} -> latent codes (B, d_latent, h*patch, w*patch)."""
    B, _, d_tok = bits.shape
    d_lat = d_tok // (patch * patch)
    codes = (2.0 * bits.float() - 1.0) / d_lat**0.5
    codes = codes.transpose(1, 2).reshape(B, d_tok, h, w)
    return F.pixel_shuffle(codes, patch) if patch > 1 else codes


def latent_to_tokens(x: torch.Tensor, patch: int = 1) -> torch.Tensor:
    """Latent-grid tensor (B, d_latent, h*patch, w*patch) -> token rows (B, h*w, d_token)."""
    if patch > 1:
        x = F.pixel_unshuffle(x, patch)
    return x.flatten(2).transpose(1, 2)


def add_scale(summed: torch.Tensor, bits: torch.Tensor, grid: Grid, patch: int = 1) -> torch.Tensor:
    """Add one scale's codes to the running sum on the final latent grid."""
    codes = bits_to_codes(bits, *grid, patch)
    return summed + _resize(codes, tuple(summed.shape[-2:]), "bilinear")


def next_input(summed: torch.Tensor, grid: Grid, patch: int = 1) -> torch.Tensor:
    """The transformer's input for the scale ``grid``: the running sum resized, as token rows."""
    return latent_to_tokens(_resize(summed, (grid[0] * patch, grid[1] * patch), "bilinear"), patch)


def teacher_forcing_inputs(bits_per_scale: list[torch.Tensor], scales, patch: int = 1
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Bits of every scale -> (inputs (B, L - 1, d_token) for scales 1..N-1, summed latent codes)."""
    B, _, d_tok = bits_per_scale[0].shape
    H, W = scales[-1]
    summed = bits_per_scale[0].new_zeros(B, d_tok // (patch * patch), H * patch, W * patch).float()
    inputs = []
    for i, (bits, grid) in enumerate(zip(bits_per_scale, scales)):
        summed = add_scale(summed, bits, grid, patch)
        if i + 1 < len(scales):
            inputs.append(next_input(summed, scales[i + 1], patch))
    x = torch.cat(inputs, dim=1) if inputs else summed.new_zeros(B, 0, d_tok)
    return x, summed


def quantize_multiscale(
    z: torch.Tensor, scales, *, patch: int = 1, flip_prob: float = 0.0, generator: torch.Generator | None = None
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Residual bitwise quantisation of a raw latent z (B, d, H*patch, W*patch) over ``scales``.

    Returns (labels per scale (B, h*w, d_token), inputs (B, L-1, d_token), summed codes). With
    ``flip_prob`` > 0 (bitwise self-correction), a random share (up to flip_prob, drawn per image
    and scale) of each scale's bits is flipped before it joins the sum, so later scales learn to
    correct earlier errors; the labels stay the un-flipped bits.
    """
    H, W = scales[-1]
    if tuple(z.shape[-2:]) != (H * patch, W * patch):
        raise ValueError(f"the last scale {tuple(scales[-1])} (x{patch}) does not match the latent grid "
                         f"{tuple(z.shape[-2:])}")
    summed = torch.zeros_like(z, dtype=torch.float32)
    labels, inputs = [], []
    for i, (h, w) in enumerate(scales):
        residual = _resize(z.float() - summed, (h * patch, w * patch), "area")
        bits = (latent_to_tokens(residual, patch) > 0).float()
        labels.append(bits)
        if flip_prob > 0:
            rate = torch.rand(bits.shape[0], 1, 1, generator=generator, device=bits.device) * flip_prob
            flip = torch.rand(bits.shape, generator=generator, device=bits.device) < rate
            bits = torch.where(flip, 1 - bits, bits)
        summed = add_scale(summed, bits, (h, w), patch)
        if i + 1 < len(scales):
            inputs.append(next_input(summed, scales[i + 1], patch))
    B, d_tok = labels[0].shape[0], labels[0].shape[2]
    x_inputs = torch.cat(inputs, dim=1) if inputs else summed.new_zeros(B, 0, d_tok)
    return labels, x_inputs, summed


def bit_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-bit cross-entropy of bitwise logits (B, L, d, 2) against bits (B, L, d): l_tb, shape (B, L, d).
    The training objective of the model itself and of every erasure objective built on it."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
