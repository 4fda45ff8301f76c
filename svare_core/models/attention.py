"""Attention layers of the Infinity transformer, on torch's scaled_dot_product_attention."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_MAX_SCALE_MUL = math.log(100.0)


class KVCache:
    """What one block keeps during a next-scale decode: the keys and values of the earlier scales,
    and its cross-attention's keys and values of the text (the same at every scale).

    With ``capacity`` (the decode's total tokens) the keys and values go into buffers allocated at
    the first scale, and each scale attends to a view of their filled part: no copy of the whole
    cache per scale, as growing it by concatenation costs. Without, it grows by concatenation.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.text_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this scale's keys and values (B, H, n, c); returns those of every scale so far."""
        start, end = self.length, self.length + k.shape[2]
        if self.capacity is None:
            self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
            self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        else:
            if end > self.capacity:
                raise ValueError(f"the KV cache holds {self.capacity} tokens; {end} do not fit")
            if self.k is None:
                self.k = k.new_empty(*k.shape[:2], self.capacity, k.shape[3])
                self.v = v.new_empty(*v.shape[:2], self.capacity, v.shape[3])
            self.k[:, :, start:end] = k
            self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class SelfAttention(nn.Module):
    """Cosine attention with a learned per-head temperature and 2D RoPE."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope, attn_mask=None, kv_cache: KVCache | None = None):
        B, L, C = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                 # (B, H, L, c)
        scale = self.scale_mul_1H11.clamp_max(_MAX_SCALE_MUL).exp()
        q = F.normalize(q, dim=-1) * scale
        k = F.normalize(k, dim=-1)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if kv_cache is not None:
            k, v = kv_cache.extend(k, v)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=attn_mask, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class CrossAttention(nn.Module):
    """Plain multi-head attention from image tokens to text tokens."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.mat_q = nn.Linear(dim, dim)
        self.mat_kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def text_kv(self, text) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, Lt, c) of ``text`` (a TextCondition); a decode computes them once."""
        return _project_kv(self.mat_kv.weight, self.zero_k_bias, self.v_bias, text.kv, self.num_heads)

    def forward(self, x, text, text_kv: tuple[torch.Tensor, torch.Tensor] | None = None):
        """``text``: a TextCondition (kv (B, Lt, kv_dim), mask (B, Lt)); ``text_kv``: its ``text_kv``
        if already computed."""
        B, L, C = x.shape
        q = self.mat_q(x).view(B, L, self.num_heads, -1).transpose(1, 2)
        k, v = text_kv if text_kv is not None else self.text_kv(text)
        mask = text.mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class _PoolAttention(nn.Module):
    # A separate module only so the parameter names match the checkpoints (text_proj_for_sos.ca.*).
    def __init__(self, dim: int, kv_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.mat_q = nn.Parameter(torch.randn(1, num_heads, dim // num_heads) * (dim // num_heads) ** -0.5)
        self.mat_kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)


class TextAttentivePool(nn.Module):
    """A learned query attends over the valid text tokens: one pooled condition vector per prompt."""

    def __init__(self, kv_dim: int, dim: int, num_heads: int):
        super().__init__()
        self.ca = _PoolAttention(dim, kv_dim, num_heads)

    def forward(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ca = self.ca
        B = text.shape[0]
        k, v = _project_kv(ca.mat_kv.weight, ca.zero_k_bias, ca.v_bias, text, ca.num_heads)
        q = ca.mat_q.to(k.dtype).unsqueeze(2).expand(B, -1, -1, -1)     # (B, H, 1, c)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return ca.proj(out.reshape(B, -1))


def _project_kv(weight, k_bias, v_bias, kv, num_heads):
    B, Lt, _ = kv.shape
    kv = F.linear(kv.to(weight.dtype), weight, torch.cat([k_bias, v_bias])).view(B, Lt, 2, num_heads, -1)
    k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
    return k, v


# -- 2D rotary position embedding --------------------------------------------------------------
def rope_table(scales, head_dim: int, grid: tuple[int, int], theta: float = 10000.0, device=None) -> torch.Tensor:
    """Rotation angles (L, head_dim // 2) for the tokens of ``scales``.

    Rotated pairs are adjacent channels (0,1), (2,3), ...; the first half of the pairs turns with
    the row, the second half with the column. A token's row/column are its position on ``grid``
    (the largest scale of the reference schedule), so every scale sees the same coordinate frame.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}")
    half = head_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float64) / half)    # head_dim/4
    H, W = grid
    angles = []
    for h, w in scales:
        # float32 and round-half-to-even, as the reference computes them
        rows = torch.round(torch.arange(h, dtype=torch.float32) * (H / h)).double()
        cols = torch.round(torch.arange(w, dtype=torch.float32) * (W / w)).double()
        r = torch.outer(rows, inv_freq)[:, None, :].expand(h, w, -1)
        c = torch.outer(cols, inv_freq)[None, :, :].expand(h, w, -1)
        angles.append(torch.cat([r, c], dim=-1).reshape(h * w, half))
    return torch.cat(angles).float().to(device)


@dataclass(frozen=True)
class Rotation:
    """cos and sin (L, c/2) of a rope table's angles: computed once per call of the model, not in
    every block for queries and keys."""
    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def of(cls, angles: torch.Tensor) -> "Rotation":
        return cls(angles.cos().to(torch.float32), angles.sin().to(torch.float32))

    def rows(self, start: int, end: int) -> "Rotation":
        """The rotation of tokens ``start..end-1``."""
        return Rotation(self.cos[start:end], self.sin[start:end])

    @property
    def shape(self) -> torch.Size:
        return self.cos.shape


def apply_rope(x: torch.Tensor, rope: torch.Tensor | Rotation) -> torch.Tensor:
    """Rotate adjacent channel pairs of x (B, H, L, c) by ``rope``: angles (L, c/2) or their Rotation."""
    rot = rope if isinstance(rope, Rotation) else Rotation.of(rope)
    cos, sin = rot.cos, rot.sin
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)
