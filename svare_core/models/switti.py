"""The Switti transformer (yandex-research/switti): next-scale prediction of 4096-way VQ tokens.

Module and parameter names follow the released checkpoints (``blocks.i.attn.to_qkv.weight``), so
a real state dict loads without renaming. Two variants share the layers: the default model is
NOT causal between scales (each scale's self-attention sees only itself; only the cross-attention
on the text is cached when sampling), the AR variant is block-causal with a KV cache. Which one a
file holds is in its mask buffer (``attn_bias_for_masking``, see arch_switti.py), which is read to
tell them apart and then dropped: neither path builds the dense mask over all scales to sample.

``forward`` runs all scales at once (teacher forcing); ``begin`` + ``step`` run one scale at a time
(sampling). Both embed with ``start_token``/``embed_input``, add the level embedding and call
``_blocks_and_head``, so they can only differ by how self-attention is restricted.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..schedules import switti_schedule
from .attention import KVCache, apply_rope
from .infinity import AdaLNBeforeHead, RMSNorm, init_linear_layers

# The crop condition the authors sample with, at every resolution: a 512x512 image, uncropped.
SAMPLING_CROP = (512, 512, 0, 0)


@dataclass
class SwittiConfig:
    depth: int = 30
    embed_dim: int = 1920
    num_heads: int = 30           # the release ties heads to depth (width = 64 * depth): head dim 64
    vocab_size: int = 4096
    code_dim: int = 32            # width of a VQ code (word_embed's input)
    text_dim: int = 2048          # CLIP ViT-L (768) + OpenCLIP bigG (1280) last hidden states
    pooled_dim: int = 1280        # bigG's pooled output, without its projection
    ffn_dim: int = 5120           # SwiGLU hidden width (int(8/3 * embed_dim))
    num_levels: int = 14          # rows of lvl_embed: the scales of the schedule it was trained on
    causal: bool = False          # True: the AR variant (block-causal, KV cache)
    crop_cond: bool = True
    rope_theta: float = 10000.0
    rope_size: float = 128.0      # each scale's positions span 0..rope_size
    norm_eps: float = 1e-6
    scales: list[tuple[int, int]] = field(default_factory=list)  # default schedule; empty: the release's

    def __post_init__(self) -> None:
        if not self.scales:
            self.scales = switti_schedule(self.num_levels)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SwittiConfig":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["scales"] = [tuple(s) for s in d.get("scales", [])]
        return cls(**d)


def switti_1024() -> SwittiConfig:
    return SwittiConfig()


def switti_512() -> SwittiConfig:
    return SwittiConfig(num_levels=10)


# -- layers ----------------------------------------------------------------------------------------
def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, L, _ = t.shape
    return t.view(B, L, num_heads, -1).transpose(1, 2)                     # (B, H, L, c)


class SelfAttention(nn.Module):
    """Attention with q and k layer-normalised over the full width (not per head), then 2D RoPE."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope, segments=None, attn_mask=None, kv_cache: KVCache | None = None):
        """``segments``: token counts of scales that attend only within themselves (the default
        model's teacher forcing); ``attn_mask``: a boolean mask over all tokens (the AR variant's)."""
        B, L, C = x.shape
        q, k, v = self.to_qkv(x).view(B, L, 3, C).unbind(2)
        q = F.layer_norm(q, (C,), eps=1e-6)
        k = F.layer_norm(k, (C,), eps=1e-6)
        q, k, v = (_heads(t, self.num_heads) for t in (q, k, v))
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if kv_cache is not None:
            k, v = kv_cache.extend(k, v)
        if segments is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:
            parts = [F.scaled_dot_product_attention(*t) for t in zip(*(s.split(segments, dim=2) for s in (q, k, v)))]
            out = torch.cat(parts, dim=2)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class CrossAttention(nn.Module):
    """Image tokens attend to the text; q and k layer-normalised over the full width."""

    def __init__(self, dim: int, text_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(text_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def text_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the (normalised) text, (B, H, Lt, c) each: what sampling caches."""
        B, Lt, _ = context.shape
        k, v = self.to_kv(context).view(B, Lt, 2, -1).unbind(2)
        k = F.layer_norm(k, k.shape[-1:], eps=1e-6)
        return _heads(k, self.num_heads), _heads(v, self.num_heads)

    def forward(self, x, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor):
        B, L, C = x.shape
        q = _heads(F.layer_norm(self.to_q(x), (C,), eps=1e-6), self.num_heads)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """AdaLN self-attention, cross-attention (no gate), AdaLN SwiGLU; RMSNorms before and after
    every branch and on the text."""

    def __init__(self, cfg: SwittiConfig):
        super().__init__()
        C, eps = cfg.embed_dim, cfg.norm_eps
        self.C = C
        if cfg.crop_cond:
            self.crop_cond_scales = nn.Parameter(torch.zeros(1, C))
        self.attn = SelfAttention(C, cfg.num_heads)
        self.cross_attn = CrossAttention(C, cfg.text_dim, cfg.num_heads)
        self.ffn = SwiGLU(C, cfg.ffn_dim)
        for name in ("self_attention_norm1", "self_attention_norm2", "cross_attention_norm1",
                     "cross_attention_norm2", "ffn_norm1", "ffn_norm2"):
            setattr(self, name, RMSNorm(C, eps))
        self.attention_y_norm = RMSNorm(cfg.text_dim, eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def text_kv(self, cond: "SwittiCondition") -> tuple[torch.Tensor, torch.Tensor]:
        return self.cross_attn.text_kv(self.attention_y_norm(cond.context))

    def forward(self, x, cond: "SwittiCondition", rope, text_kv=None, segments=None, attn_mask=None, kv_cache=None):
        c = cond.pooled
        if cond.crop is not None:
            c = c + self.crop_cond_scales * cond.crop
        # chunk order of the release: gamma1, gamma2, scale1, scale2, shift1, shift2
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(c).view(-1, 1, 6, self.C).unbind(2)
        h = self.attn(self.self_attention_norm1(x) * (scale1 + 1) + shift1, rope, segments, attn_mask, kv_cache)
        x = x + self.self_attention_norm2(h) * gamma1
        kv = text_kv if text_kv is not None else self.text_kv(cond)
        x = x + self.cross_attention_norm2(self.cross_attn(self.cross_attention_norm1(x), kv, cond.mask))
        h = self.ffn(self.ffn_norm1(x) * (scale2 + 1) + shift2)
        return x + self.ffn_norm2(h) * gamma2


class FourierCrop(nn.Module):
    """Random Fourier features of the 4 crop numbers (a fixed buffer-like weight of the release)."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n), requires_grad=False)

    def _apply(self, fn, recurse=True):
        # The frequencies stay fp32 when the model is cast (bf16 would move the ~1e4-radian
        # arguments by whole turns); device moves still apply.
        kept = self.weight.data
        super()._apply(fn, recurse)
        if kept.dtype == torch.float32 and self.weight.dtype != torch.float32:
            self.weight.data = kept.to(self.weight.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 and this order of products: the arguments reach ~1e4 radians, where rounding shows.
        x_proj = x.float()[:, None] * self.weight.float()[None, :] * 2 * math.pi
        return torch.cat([torch.sin(x_proj), torch.cos(x_proj)], dim=-1)


@dataclass
class SwittiCondition:
    """Encoded prompts, ready for the blocks."""
    pooled: torch.Tensor          # (B, C): text_pooler(pooled text): AdaLN condition and first token
    context: torch.Tensor         # (B, Lt, text_dim): the text features cross-attention reads
    mask: torch.Tensor            # (B, Lt) bool: valid text tokens
    crop: torch.Tensor | None     # (B, C): the projected crop condition, or None (no crop_cond)

    def cat(self, other: "SwittiCondition") -> "SwittiCondition":
        Lt = max(self.context.shape[1], other.context.shape[1])
        pad = lambda t: F.pad(t, (0, 0, 0, Lt - t.shape[1]))          # noqa: E731
        padm = lambda m: F.pad(m, (0, Lt - m.shape[1]))               # noqa: E731
        crop = None if self.crop is None else torch.cat([self.crop, other.crop])
        return SwittiCondition(torch.cat([self.pooled, other.pooled]), torch.cat([pad(self.context), pad(other.context)]),
                               torch.cat([padm(self.mask), padm(other.mask)]), crop)

    def rows(self, n: int) -> "SwittiCondition":
        """The first ``n`` rows (guidance switched off: the unconditional half is dropped)."""
        return SwittiCondition(self.pooled[:n], self.context[:n], self.mask[:n],
                               None if self.crop is None else self.crop[:n])


@dataclass
class SwittiDecodeState:
    """One incremental decode; made by ``Switti.begin``, advanced by ``Switti.step``."""
    cond: SwittiCondition
    scales: list[tuple[int, int]]
    rope: torch.Tensor                            # (L, head_dim // 2)
    text_kv: list[tuple[torch.Tensor, torch.Tensor]]   # cross-attention K/V of every block, computed once
    caches: list[KVCache] | None                  # self-attention caches (AR variant only)
    index: int = 0
    offset: int = 0

    @property
    def done(self) -> bool:
        return self.index == len(self.scales)

    def keep_rows(self, n: int) -> None:
        """Drop all but the first ``n`` rows (the reference does this where guidance turns off)."""
        self.cond = self.cond.rows(n)
        self.text_kv = [(k[:n], v[:n]) for k, v in self.text_kv]
        for c in self.caches or []:
            if c.k is not None:
                c.k, c.v = c.k[:n], c.v[:n]


def rope_angles(scales, head_dim: int, theta: float, size: float) -> torch.Tensor:
    """Rotation angles (L, head_dim // 2): positions restart at every scale and are stretched by
    size / (n - 1) so each scale spans the same range; the first half of the pairs turns with the
    column, the second half with the row. fp32 throughout, as the release computes them."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}")
    out = []
    for h, w in scales:
        if h != w:
            raise ValueError(f"Switti's scales are square, got {h}x{w}")
        coeff = size / (w - 1 if w > 1 else 1)
        freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim)) * coeff
        t = torch.arange(h * w, dtype=torch.float32)
        col, row = t % w, torch.div(t, w, rounding_mode="floor")
        out.append(torch.cat([torch.outer(col, freqs), torch.outer(row, freqs)], dim=-1))
    return torch.cat(out)


class Switti(nn.Module):
    # What samplers and the registry read to tell the token kinds apart.
    token_kind = "vq"

    def __init__(self, cfg: SwittiConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.embed_dim
        if C % cfg.num_heads:
            raise ValueError(f"width {C} does not split into {cfg.num_heads} heads")
        self.pos_start = nn.Parameter(torch.randn(1, 1, C) * 0.02)
        self.word_embed = nn.Linear(cfg.code_dim, C)
        self.text_pooler = nn.Linear(cfg.pooled_dim, C)
        self.lvl_embed = nn.Embedding(cfg.num_levels, C)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        if cfg.crop_cond:
            if C % 8:
                raise ValueError(f"the crop condition needs a width divisible by 8, got {C}")
            self.crop_embed = FourierCrop(C // 8)
            self.crop_proj = nn.Linear(C, C)
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)
        self._init_weights()

    def _init_weights(self) -> None:
        init_linear_layers(self)
        for blk in self.blocks:   # residual branches start small
            blk.ada_lin[1].weight.data[: 2 * self.cfg.embed_dim].mul_(1e-3)

    @property
    def device(self) -> torch.device:
        return self.pos_start.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_start.dtype

    # -- text ---------------------------------------------------------------------------------------
    def crop_condition(self, rows: int, crop: Sequence[int] = SAMPLING_CROP) -> torch.Tensor | None:
        """The projected crop condition (rows, C); the release samples with a 512x512 crop at every size."""
        if not self.cfg.crop_cond:
            return None
        x = torch.tensor([list(crop)] * rows, dtype=torch.int32, device=self.device).view(-1)
        feats = self.crop_embed(x).reshape(rows, -1)
        return self.crop_proj(feats.to(self.crop_proj.weight.dtype))

    def encode_text(self, features: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> SwittiCondition:
        """Text features (B, Lt, 2048), their mask (B, Lt) and the pooled vector (B, 1280) -> the condition."""
        if features.shape[-1] != self.cfg.text_dim or pooled.shape[-1] != self.cfg.pooled_dim:
            raise ValueError(f"Switti needs text features {self.cfg.text_dim} wide and a pooled vector of "
                             f"{self.cfg.pooled_dim}; got {features.shape[-1]} and {pooled.shape[-1]}")
        p = self.text_pooler(pooled.to(self.dtype))
        return SwittiCondition(p, features.to(self.dtype), mask.bool(), self.crop_condition(p.shape[0]))

    # -- forward ------------------------------------------------------------------------------------
    def rope_for(self, scales) -> torch.Tensor:
        return rope_angles(scales, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_size).to(self.device)

    def level_ids(self, scales) -> torch.Tensor:
        return torch.cat([torch.full((h * w,), i, dtype=torch.long) for i, (h, w) in enumerate(scales)]).to(self.device)

    def _check_scales(self, scales) -> list[tuple[int, int]]:
        scales = [tuple(g) for g in scales]
        if len(scales) > self.cfg.num_levels:
            raise ValueError(f"{len(scales)} scales but the model knows at most {self.cfg.num_levels}")
        return scales

    def forward(self, cond: SwittiCondition, x_inputs: torch.Tensor, scales=None, *,
                checkpointing: bool = False) -> torch.Tensor:
        """Teacher-forced pass over all scales at once. ``x_inputs``: (B, L - 1, code_dim), the
        next-scale inputs of scales 1..N-1 (``VQVAE.teacher_forcing_inputs``). Returns logits (B, L, V)."""
        scales = self._check_scales(scales or self.cfg.scales)
        x = torch.cat([self.start_token(cond), self.embed_input(x_inputs)], dim=1)
        x = x + self.lvl_embed(self.level_ids(scales))
        sizes = [h * w for h, w in scales]
        if self.cfg.causal:
            ids = self.level_ids(scales)
            mask, segments = ids.view(-1, 1) >= ids.view(1, -1), None
        else:
            mask, segments = None, sizes
        return self._blocks_and_head(x, cond, self.rope_for(scales), segments=segments, attn_mask=mask,
                                     checkpointing=checkpointing)

    # -- incremental decoding -----------------------------------------------------------------------
    def begin(self, cond: SwittiCondition, scales: Sequence[tuple[int, int]]) -> SwittiDecodeState:
        scales = self._check_scales(scales)
        kv = [blk.text_kv(cond) for blk in self.blocks]
        caches = [KVCache() for _ in self.blocks] if self.cfg.causal else None
        return SwittiDecodeState(cond, scales, self.rope_for(scales), kv, caches)

    def step(self, state: SwittiDecodeState, x: torch.Tensor) -> torch.Tensor:
        """Run scale ``state.index`` on its embedded input (rows, h*w, C) -> logits (rows, h*w, V)."""
        if state.done:
            raise ValueError(f"all {len(state.scales)} scales have been run")
        i = state.index
        h, w = state.scales[i]
        if x.shape[1] != h * w:
            raise ValueError(f"scale {i} {(h, w)} has {h * w} tokens, got an input of {x.shape[1]}")
        x = x + self.lvl_embed.weight[i].to(x.dtype)
        rope = state.rope[state.offset:state.offset + h * w]
        logits = self._blocks_and_head(x, state.cond, rope, text_kv=state.text_kv, caches=state.caches)
        state.index, state.offset = i + 1, state.offset + h * w
        return logits

    # -- shared pieces ------------------------------------------------------------------------------
    def start_token(self, cond: SwittiCondition) -> torch.Tensor:
        """The input of the first scale (1x1): the pooled text plus a learned position, (rows, 1, C)."""
        return cond.pooled.unsqueeze(1) + self.pos_start

    def embed_input(self, token_rows: torch.Tensor) -> torch.Tensor:
        """Rows (B, n, code_dim) of the summed codes resized to a scale -> (B, n, C)."""
        return self.word_embed(token_rows.to(self.dtype))

    def _blocks_and_head(self, x, cond, rope, *, text_kv=None, segments=None, attn_mask=None, caches=None,
                         checkpointing: bool = False) -> torch.Tensor:
        for j, blk in enumerate(self.blocks):
            kv = text_kv[j] if text_kv is not None else None
            cache = caches[j] if caches is not None else None
            if checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, cond, rope, kv, segments, attn_mask, cache,
                                                      use_reentrant=False)
            else:
                x = blk(x, cond, rope, kv, segments, attn_mask, cache)
        # the head's AdaLN sees the text condition without the crop term
        return self.head(self.head_nm(x, cond.pooled).to(self.head.weight.dtype)).float()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


__all__ = ["SAMPLING_CROP", "Switti", "SwittiCondition", "SwittiConfig", "SwittiDecodeState", "rope_angles",
           "switti_1024", "switti_512"]
