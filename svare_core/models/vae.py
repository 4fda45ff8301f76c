"""The BSQ VAE: a convolutional autoencoder whose latent is read as bits, scale by scale.

Parameter names follow the released Infinity VAEs (``encoder.down.0.block.0.conv1.conv.weight``),
so their state dicts load as they are. Infinity-8B's VAE has a 14-channel latent at stride 8 that
is patchified 2x2 into 56-bit tokens at stride 16 (``patch_size=2``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .bitwise import quantize_multiscale


@dataclass
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2          # per encoder level; the decoder has one more
    z_channels: int = 32             # latent channels before patchify
    patch_size: int = 1              # 2 for Infinity-8B's VAE
    norm_groups: int = 32
    in_channels: int = 3

    @property
    def stride(self) -> int:
        return 2 ** (len(self.ch_mult) - 1) * self.patch_size

    @property
    def bits(self) -> int:
        return self.z_channels * self.patch_size**2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["ch_mult"] = tuple(d.get("ch_mult", (1, 2, 4, 4, 4)))
        return cls(**d)


def vae_d32() -> VAEConfig:
    return VAEConfig()


def vae_d56_patchify() -> VAEConfig:
    return VAEConfig(ch_mult=(1, 2, 4, 4), z_channels=14, patch_size=2)


class Conv(nn.Module):
    # Wrapped conv: the released files store ``conv_in.conv.weight``.
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2 if stride == 1 else 0)

    def forward(self, x):
        return self.conv(x)


def group_count(ch: int, preferred: int) -> int:
    """GroupNorm groups for a layer: the preferred count where it divides, else 24 (as the released
    VAEs do for widths like 48), else the largest common divisor."""
    if ch % preferred == 0:
        return preferred
    return 24 if ch % 24 == 0 else math.gcd(ch, preferred)


class Norm(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(group_count(ch, groups), ch, eps=1e-6)

    def forward(self, x):
        return self.norm(x)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = Norm(cin, groups), Conv(cin, cout)
        self.norm2, self.conv2 = Norm(cout, groups), Conv(cout, cout)
        self.nin_shortcut = Conv(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv(ch, ch, 3)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    def __init__(self, cin: int, cout: int, n_blocks: int, groups: int, resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(ResBlock(cin if i == 0 else cout, cout, groups) for i in range(n_blocks))
        if resample is not None:
            setattr(self, name, resample)


class Mid(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.block_1 = ResBlock(ch, ch, groups)
        self.block_2 = ResBlock(ch, ch, groups)

    def forward(self, x):
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        chs = [c.ch * m for m in c.ch_mult]
        self.conv_in = Conv(c.in_channels, c.ch)
        last = len(chs) - 1
        self.down = nn.ModuleList(
            Level(c.ch if i == 0 else chs[i - 1], chs[i], c.num_res_blocks, c.norm_groups,
                  Downsample(chs[i]) if i != last else None, "downsample")
            for i in range(len(chs)))
        self.mid = Mid(chs[-1], c.norm_groups)
        self.norm_out = Norm(chs[-1], c.norm_groups)
        self.conv_out = Conv(chs[-1], c.z_channels)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for blk in level.block:
                h = blk(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        chs = [c.ch * m for m in c.ch_mult]
        self.conv_in = Conv(c.z_channels, chs[-1])
        self.mid = Mid(chs[-1], c.norm_groups)
        n = len(chs)
        self.up = nn.ModuleList(
            Level(chs[i + 1] if i + 1 < n else chs[-1], chs[i], c.num_res_blocks + 1, c.norm_groups,
                  Upsample(chs[i]) if i != 0 else None, "upsample")
            for i in range(n))
        self.norm_out = Norm(chs[0], c.norm_groups)
        self.conv_out = Conv(chs[0], c.in_channels)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for blk in level.block:
                h = blk(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _LFQ(nn.Module):
    def __init__(self, bits: int):
        super().__init__()
        self.register_buffer("mask", 2 ** torch.arange(bits - 1, -1, -1, dtype=torch.long))


class _Quantizer(nn.Module):
    # Holds only the bit-weight buffer the released files carry (quantizer.lfq.mask).
    def __init__(self, bits: int):
        super().__init__()
        self.lfq = _LFQ(bits)


class BSQVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantizer = _Quantizer(cfg.z_channels)
        self.quantize = self.quantizer  # the released files store the quantizer under both names

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_out.conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_out.conv.weight.dtype

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> raw latent (B, z_channels, H/f, W/f), before quantisation."""
        return self.encoder(images.to(self.dtype)).float()

    def encode_bits(self, images: torch.Tensor, scales, *, flip_prob: float = 0.0, generator=None):
        """Images -> (bit labels per scale, teacher-forcing inputs, summed codes); scales in token units."""
        return quantize_multiscale(self.encode_latent(images), scales, patch=self.cfg.patch_size,
                                   flip_prob=flip_prob, generator=generator)

    def decode(self, summed_codes: torch.Tensor) -> torch.Tensor:
        """Summed codes on the latent grid (B, z_channels, H/f, W/f) -> images (B, 3, H, W) in [-1, 1]."""
        return self.decoder(summed_codes.to(self.dtype)).clamp(-1, 1)

    def forward(self, images: torch.Tensor, scales) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, commitment loss) through the multi-scale quantiser, straight-through.

        The decoder must learn to decode sums of codes over scales (what the transformer
        produces), so training goes through all scales; the commitment term keeps the raw latent
        near its quantised sum, which is what makes the residual bits of later scales meaningful.
        """
        z = self.encode_latent(images)
        _, _, summed = quantize_multiscale(z, scales, patch=self.cfg.patch_size)
        commit = torch.mean((z - summed.detach()) ** 2)
        return self.decode(z + (summed - z).detach()), commit

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
