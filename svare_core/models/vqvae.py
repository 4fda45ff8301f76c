"""VAR's multi-scale residual VQ-VAE (the tokenizer of Switti): 4096 codes of width 32, stride 16.

An image's latent is quantised coarse to fine: at each scale the remaining residual is
area-downsampled to the scale's grid, every cell takes its nearest code, the codes are upsampled
bicubically to the full grid, passed through one of a few shared residual convolutions ("Phi",
chosen by the scale's position si / (S-1)) and added to the running sum. The transformer's input
for the next scale is that sum area-downsampled to the next grid.

Parameter names follow the released files (``encoder.down.0.block.0.conv1.weight``,
``quantize.quant_resi.qresi_ls.0.weight``); the encoder/decoder reuse the BSQ VAE's layers, whose
wrapped names arch_switti maps onto the plain ones.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .vae import Conv, Downsample, Norm, ResBlock, Upsample


@dataclass
class VQVAEConfig:
    vocab_size: int = 4096
    z_channels: int = 32          # width of a code
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2       # per encoder level; the decoder has one more
    num_phi: int = 4              # partially shared residual convolutions
    phi_ratio: float = 0.5        # Phi(h) = (1 - r) h + r conv(h)
    stat_rows: int = 14           # rows of the per-scale usage statistics the file carries (its schedule)
    norm_groups: int = 32
    in_channels: int = 3

    @property
    def stride(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VQVAEConfig":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["ch_mult"] = tuple(d.get("ch_mult", (1, 1, 2, 2, 4)))
        return cls(**d)


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map, residual."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)   # (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class _Level(nn.Module):
    def __init__(self, cin: int, cout: int, n_blocks: int, groups: int, attn: bool, resample, name: str):
        super().__init__()
        self.block = nn.ModuleList(ResBlock(cin if i == 0 else cout, cout, groups) for i in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(cout, groups) for _ in range(n_blocks if attn else 0))
        if resample is not None:
            setattr(self, name, resample)

    def forward(self, h):
        for i, blk in enumerate(self.block):
            h = blk(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.block_1 = ResBlock(ch, ch, groups)
        self.attn_1 = AttnBlock(ch, groups)
        self.block_2 = ResBlock(ch, ch, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, c: VQVAEConfig):
        super().__init__()
        chs, g, last = [c.ch * m for m in c.ch_mult], c.norm_groups, len(c.ch_mult) - 1
        self.conv_in = Conv(c.in_channels, c.ch)
        self.down = nn.ModuleList(
            _Level(c.ch if i == 0 else chs[i - 1], chs[i], c.num_res_blocks, g, i == last,
                   Downsample(chs[i]) if i != last else None, "downsample") for i in range(len(chs)))
        self.mid = _Mid(chs[-1], g)
        self.norm_out = Norm(chs[-1], g)
        self.conv_out = Conv(chs[-1], c.z_channels)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, c: VQVAEConfig):
        super().__init__()
        chs, g, n = [c.ch * m for m in c.ch_mult], c.norm_groups, len(c.ch_mult)
        self.conv_in = Conv(c.z_channels, chs[-1])
        self.mid = _Mid(chs[-1], g)
        self.up = nn.ModuleList(
            _Level(chs[i + 1] if i + 1 < n else chs[-1], chs[i], c.num_res_blocks + 1, g, i == n - 1,
                   Upsample(chs[i]) if i != 0 else None, "upsample") for i in range(n))
        self.norm_out = Norm(chs[0], g)
        self.conv_out = Conv(chs[0], c.in_channels)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _Phis(nn.Module):
    def __init__(self, c: VQVAEConfig):
        super().__init__()
        self.qresi_ls = nn.ModuleList(nn.Conv2d(c.z_channels, c.z_channels, 3, padding=1) for _ in range(c.num_phi))


class Quantizer(nn.Module):
    def __init__(self, c: VQVAEConfig):
        super().__init__()
        self.embedding = nn.Embedding(c.vocab_size, c.z_channels)
        self.quant_resi = _Phis(c)
        # Code usage per scale from the authors' training; carried so files round-trip, never read.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(c.stat_rows, c.vocab_size))


def phi_index(si: int, num_scales: int, num_phi: int) -> int:
    """Which shared Phi serves scale ``si`` of ``num_scales``: the one whose tick is nearest si/(S-1)
    (ticks evenly spaced with 1/(3K) margins for K = 4, 1/(2K) otherwise, as VAR places them)."""
    if num_scales < 2:
        raise ValueError("a multi-scale VQ schedule needs at least 2 scales")
    margin = 1 / 3 / num_phi if num_phi == 4 else 1 / 2 / num_phi
    ticks = torch.linspace(margin, 1 - margin, num_phi, dtype=torch.float64)
    return int(torch.argmin((ticks - si / (num_scales - 1)).abs()))


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = Quantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    @property
    def codebook(self) -> torch.Tensor:
        return self.quantize.embedding.weight

    def phi(self, h: torch.Tensor, si: int, num_scales: int) -> torch.Tensor:
        conv = self.quantize.quant_resi.qresi_ls[phi_index(si, num_scales, self.cfg.num_phi)]
        r = self.cfg.phi_ratio
        return h * (1 - r) + conv(h.to(conv.weight.dtype)).float() * r

    # -- images <-> latents -------------------------------------------------------------------------
    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latent (B, z, H/16, W/16) before quantisation."""
        return self.quant_conv(self.encoder(images.to(self.dtype))).float()

    def decode(self, summed: torch.Tensor) -> torch.Tensor:
        """The summed codes (B, z, h, w) -> images (B, 3, 16h, 16w) in [-1, 1]."""
        return self.decoder(self.post_quant_conv(summed.to(self.dtype))).clamp(-1, 1)

    # -- the multi-scale code -----------------------------------------------------------------------
    def scale_codes(self, indices: torch.Tensor, side: int) -> torch.Tensor:
        """Indices (B, side*side) -> their codes as a map (B, z, side, side); soft codes
        (B, side*side, V) of probabilities are mixed from the codebook."""
        w = self.codebook.float()
        codes = indices.float() @ w if indices.is_floating_point() else F.embedding(indices, w)
        return codes.transpose(1, 2).reshape(indices.shape[0], -1, side, side)

    def add_scale(self, summed: torch.Tensor, codes: torch.Tensor, si: int, num_scales: int) -> torch.Tensor:
        """The running sum with scale ``si``'s code map added: upsampled (bicubic) to the full
        grid unless it is the last scale, then through its Phi."""
        full = summed.shape[-1]
        if si != num_scales - 1:
            codes = F.interpolate(codes, size=(full, full), mode="bicubic")
        return summed + self.phi(codes, si, num_scales)

    @staticmethod
    def next_input(summed: torch.Tensor, side: int) -> torch.Tensor:
        """The transformer's input for a scale of ``side``: the sum area-downsampled, as rows (B, side*side, z)."""
        x = F.interpolate(summed, size=(side, side), mode="area")
        return x.flatten(2).transpose(1, 2)

    def quantize_multiscale(self, latent: torch.Tensor, scales) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Latent (B, z, n, n) -> (indices per scale (B, h*w), summed codes); the last scale is n x n."""
        B, C, H, W = latent.shape
        sides = sides_of(scales)
        if sides[-1] != H or H != W:
            raise ValueError(f"the last scale ({sides[-1]}) must equal the latent's square grid ({H}x{W})")
        rest, summed = latent.float().clone(), torch.zeros_like(latent, dtype=torch.float32)
        w = self.codebook.float()
        out = []
        for si, s in enumerate(sides):
            z = rest if si == len(sides) - 1 else F.interpolate(rest, size=(s, s), mode="area")
            idx = nearest_codes(z.permute(0, 2, 3, 1).reshape(-1, C), w).view(B, s * s)
            out.append(idx)
            step = self.add_scale(torch.zeros_like(summed), self.scale_codes(idx, s), si, len(sides))
            summed, rest = summed + step, rest - step
        return out, summed

    def encode_indices(self, images: torch.Tensor, scales) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Images -> (indices per scale, summed codes)."""
        return self.quantize_multiscale(self.encode_latent(images), scales)

    def teacher_forcing_inputs(self, indices: list[torch.Tensor], scales) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices per scale -> (inputs of scales 1..N-1 (B, L - first, z), summed codes (B, z, n, n))."""
        sides = sides_of(scales)
        B, n = indices[0].shape[0], sides[-1]
        summed = torch.zeros(B, self.cfg.z_channels, n, n, device=self.device)
        rows = []
        for si, s in enumerate(sides):
            summed = self.add_scale(summed, self.scale_codes(indices[si], s), si, len(sides))
            if si + 1 < len(sides):
                rows.append(self.next_input(summed, sides[si + 1]))
        return torch.cat(rows, dim=1), summed

    def decode_indices(self, indices: list[torch.Tensor], scales) -> torch.Tensor:
        return self.decode(self.teacher_forcing_inputs(indices, scales)[1])

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def nearest_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Vectors (N, z) -> the index of each one's nearest code (N,)."""
    with torch.no_grad():
        # squared distances as VAR computes them (|z|^2 + |e|^2 - 2 z.e), so ties break alike
        d = torch.sum(z.square(), dim=1, keepdim=True) + torch.sum(codebook.square(), dim=1)
        d.addmm_(z, codebook.T, alpha=-2, beta=1)
        return torch.argmin(d, dim=1)


def sides_of(scales) -> list[int]:
    sides = []
    for g in scales:
        h, w = (g, g) if isinstance(g, int) else g
        if h != w:
            raise ValueError(f"the VQ-VAE's scales are square, got {h}x{w}")
        sides.append(int(h))
    return sides


def vqvae_switti() -> VQVAEConfig:
    return VQVAEConfig()


__all__ = ["VQVAE", "VQVAEConfig", "nearest_codes", "phi_index", "sides_of", "vqvae_switti"]
