"""The Infinity transformer: next-scale prediction of bitwise tokens, conditioned on text.

Module and parameter names follow the released checkpoints (``block_chunks.i.module.j...``) so a
real state dict loads without renaming. Attention runs on PyTorch's scaled_dot_product_attention:
no flash-attn, xformers or timm.

Two ways through the same layers: ``forward`` runs all scales at once under the block-causal mask
(training, teacher forcing); ``begin`` + ``step`` run one scale at a time with a KV cache per block
(sampling). Both embed inputs with ``start_token``/``embed_input``, add the level embedding and call
``_blocks_and_head``, so the two can only differ by the mask versus the cache.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..schedules import reference_grid
from .attention import CrossAttention, KVCache, Rotation, SelfAttention, TextAttentivePool, rope_table


@dataclass
class InfinityConfig:
    depth: int = 32
    embed_dim: int = 2048
    num_heads: int = 16
    text_dim: int = 2048          # width of the text encoder's features (Flan-T5-XL: 2048)
    bits: int = 32                # bits per token (2 logits each)
    ffn_dim: int = 8192
    num_block_chunks: int = 8
    num_levels: int = 15          # rows of lvl_embed: the most scales a schedule may have
    text_max_len: int = 512       # rows of cfg_uncond: the longest prompt in tokens
    pool_heads: int = 16          # heads of the attentive text pooling (text_dim // 128)
    rope_grid: tuple[int, int] = (64, 64)  # positions of every scale map onto this grid
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    scales: list[tuple[int, int]] = field(default_factory=list)  # default schedule (small models)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "InfinityConfig":
        d = dict(d)
        d["rope_grid"] = tuple(d.get("rope_grid", (64, 64)))
        d["scales"] = [tuple(s) for s in d.get("scales", [])]
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def infinity_2b() -> InfinityConfig:
    return InfinityConfig()


def infinity_8b() -> InfinityConfig:
    return InfinityConfig(depth=40, embed_dim=3584, num_heads=28, bits=56, ffn_dim=14336)


def init_linear_layers(module: nn.Module, std: float = 0.02) -> None:
    """A fresh model's weights (loading replaces them): truncated normal linears and embeddings, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=std)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """AdaLN self-attention, cross-attention to the text, AdaLN FFN."""

    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        C = cfg.embed_dim
        self.eps = cfg.norm_eps
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)
        self.sa = SelfAttention(C, cfg.num_heads)
        self.ca = CrossAttention(C, C, cfg.num_heads)
        self.ffn = FFN(C, cfg.ffn_dim)
        self.ca_norm = nn.LayerNorm(C, eps=cfg.norm_eps)

    def forward(self, x, ada, text, rope, attn_mask=None, kv_cache=None):
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + ada).unbind(2)
        ln = lambda t: F.layer_norm(t, t.shape[-1:], eps=self.eps)  # noqa: E731
        x = x + self.sa(ln(x) * (1 + scale1) + shift1, rope, attn_mask, kv_cache) * gamma1
        text_kv = None
        if kv_cache is not None:
            # The text is the same at every scale of a decode: its keys and values are projected once.
            if kv_cache.text_kv is None:
                kv_cache.text_kv = self.ca.text_kv(text)
            text_kv = kv_cache.text_kv
        x = x + self.ca(self.ca_norm(x), text, text_kv)
        x = x + self.ffn(ln(x) * (1 + scale2) + shift2) * gamma2
        return x


class BlockChunk(nn.Module):
    """A group of blocks; exists so parameter names match the released checkpoints."""

    def __init__(self, cfg: InfinityConfig, n: int):
        super().__init__()
        self.module = nn.ModuleList(Block(cfg) for _ in range(n))


class AdaLNBeforeHead(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, x.shape[-1]).unbind(2)
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * (1 + scale) + shift


@dataclass
class TextCondition:
    """Encoded prompts, ready for the blocks: computed once per prompt batch."""
    pooled: torch.Tensor          # (B, C): AdaLN condition and first token
    kv: torch.Tensor              # (B, Lt, C): cross-attention keys/values input
    mask: torch.Tensor            # (B, Lt) bool: valid text tokens

    def cat(self, other: "TextCondition") -> "TextCondition":
        Lt = max(self.kv.shape[1], other.kv.shape[1])
        pad = lambda t, L: F.pad(t, (0, 0, 0, L - t.shape[1])) if t.dim() == 3 else F.pad(t, (0, L - t.shape[1]))  # noqa: E731
        return TextCondition(torch.cat([self.pooled, other.pooled]),
                             torch.cat([pad(self.kv, Lt), pad(other.kv, Lt)]),
                             torch.cat([pad(self.mask, Lt), pad(other.mask, Lt)]))


@dataclass
class DecodeState:
    """What every scale of one incremental (KV-cached) decode shares; made by ``Infinity.begin``.

    ``Infinity.step`` advances ``index`` and ``offset``: the caches hold the keys and values of
    scales ``0..index-1``, which are ``offset`` tokens.
    """
    cond: TextCondition
    scales: list[tuple[int, int]]
    ada: torch.Tensor             # (rows, 1, 6, C): shared AdaLN condition of every block
    rope: Rotation                # (L, head_dim // 2): rotation of every token of every scale
    caches: list[KVCache]         # one per block
    index: int = 0                # the scale the next step runs
    offset: int = 0               # tokens of the scales already run

    @property
    def done(self) -> bool:
        return self.index == len(self.scales)


class Infinity(nn.Module):
    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        self.cfg = cfg
        C, Ct = cfg.embed_dim, cfg.text_dim
        self.cfg_uncond = nn.Parameter(torch.randn(cfg.text_max_len, Ct) * 0.02)
        self.pos_start = nn.Parameter(torch.randn(1, 1, C) * 0.02)
        self.text_norm = RMSNorm(Ct, cfg.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(Ct, C, cfg.pool_heads)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(Ct, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.lvl_embed = nn.Embedding(cfg.num_levels, C)
        self.word_embed = nn.Linear(cfg.bits, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        per_chunk = cfg.depth // cfg.num_block_chunks
        if per_chunk * cfg.num_block_chunks != cfg.depth:
            raise ValueError(f"depth {cfg.depth} is not divisible into {cfg.num_block_chunks} block chunks")
        self.block_chunks = nn.ModuleList(BlockChunk(cfg, per_chunk) for _ in range(cfg.num_block_chunks))
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, 2 * cfg.bits)
        self._rope_cache: dict[tuple, Rotation] = {}
        self._init_weights()

    def _init_weights(self) -> None:
        init_linear_layers(self)
        # Residual branches start small so a fresh model is close to the identity.
        for blk in self.blocks:
            nn.init.zeros_(blk.ada_gss)
            blk.ada_gss.data[:, :, :2] = 0.1
        nn.init.zeros_(self.shared_ada_lin[1].weight)
        nn.init.zeros_(self.head_nm.ada_lin[1].weight)

    @property
    def blocks(self) -> list[Block]:
        return [b for chunk in self.block_chunks for b in chunk.module]

    @property
    def device(self) -> torch.device:
        return self.pos_start.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_start.dtype

    # -- text -------------------------------------------------------------------------------
    def uncond_features(self, mask: torch.Tensor) -> torch.Tensor:
        """The learned empty prompt, laid out like a prompt with the given token mask."""
        L = mask.shape[1]
        if L > self.cfg.text_max_len:
            raise ValueError(f"prompt of {L} tokens is longer than the model's {self.cfg.text_max_len}")
        return self.cfg_uncond[:L].unsqueeze(0).expand(mask.shape[0], -1, -1)

    def encode_text(self, features: torch.Tensor, mask: torch.Tensor) -> TextCondition:
        """Text-encoder features (B, Lt, text_dim) and their mask -> the model's condition."""
        t = self.text_norm(features.to(self.dtype))
        pooled = self.text_proj_for_sos(t, mask)
        return TextCondition(pooled, self.text_proj_for_ca(t), mask)

    def drop_condition(self, features: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """Replace the features of the rows where ``drop`` is True by the learned empty prompt."""
        un = self.uncond_features(mask).to(features.dtype)
        return torch.where(drop.view(-1, 1, 1), un, features)

    # -- forward ------------------------------------------------------------------------------
    def rope_for(self, scales) -> Rotation:
        """The rotation of every token of ``scales``; the last few schedules' are kept (a training
        run or a sampling session asks for the same one at every call)."""
        # Tensors made under inference mode cannot be saved for backward: kept apart from the others.
        key = (tuple(tuple(s) for s in scales), self.device, torch.is_inference_mode_enabled())
        cache = self._rope_cache
        if key not in cache:
            grid = reference_grid(scales, self.cfg.rope_grid)
            if len(cache) >= 4:
                cache.pop(next(iter(cache)))
            cache[key] = Rotation.of(rope_table(scales, self.cfg.head_dim, grid, self.cfg.rope_theta, self.device))
        return cache[key]

    def level_ids(self, scales) -> torch.Tensor:
        return torch.cat([torch.full((h * w,), i, dtype=torch.long) for i, (h, w) in enumerate(scales)]).to(self.device)

    def forward(self, cond: TextCondition, x_inputs: torch.Tensor, scales, *,
                checkpointing: bool = False) -> torch.Tensor:
        """Teacher-forced pass over all scales at once with the block-causal mask.

        ``x_inputs``: (B, L - 1, bits), the interpolated cumulative codes that feed scales 1..N-1.
        Returns logits (B, L, bits, 2).
        """
        x = torch.cat([self.start_token(cond), self.embed_input(x_inputs)], dim=1)
        x = x + self.lvl_embed(self.level_ids(scales))
        return self._blocks_and_head(x, self.adaln_condition(cond), cond, self.rope_for(scales),
                                     attn_mask=block_causal_mask(scales, self.device), checkpointing=checkpointing)

    # -- incremental decoding: one scale at a time, for samplers ---------------------------------
    def begin(self, cond: TextCondition, scales: Sequence[tuple[int, int]]) -> DecodeState:
        """Prepare a KV-cached decode of ``scales`` for the rows of ``cond``.

        The sampler then feeds ``start_token(cond)`` to the first ``step`` and ``embed_input`` of
        each next scale's token rows to the following ones.
        """
        scales = [tuple(g) for g in scales]
        if len(scales) > self.cfg.num_levels:
            raise ValueError(f"{len(scales)} scales but the model knows at most {self.cfg.num_levels}")
        total = sum(h * w for h, w in scales)
        return DecodeState(cond, scales, self.adaln_condition(cond), self.rope_for(scales),
                           [KVCache(capacity=total) for _ in self.blocks])

    def step(self, state: DecodeState, x: torch.Tensor) -> torch.Tensor:
        """Run scale ``state.index`` on its embedded input x (rows, h*w, C) -> logits (rows, h*w, bits, 2).

        Attends to the earlier scales through the caches, adds this scale's keys and values to
        them, and advances the state.
        """
        if state.done:
            raise ValueError(f"all {len(state.scales)} scales have been run")
        i = state.index
        h, w = state.scales[i]
        n_tok = h * w
        if x.shape[1] != n_tok:
            raise ValueError(f"scale {i} {(h, w)} has {n_tok} tokens, got an input of {x.shape[1]}")
        x = x + self.lvl_embed.weight[i].to(x.dtype)
        rope = state.rope.rows(state.offset, state.offset + n_tok)
        logits = self._blocks_and_head(x, state.ada, state.cond, rope, caches=state.caches)
        state.index, state.offset = i + 1, state.offset + n_tok
        return logits

    # -- pieces shared by forward and step -------------------------------------------------------
    def start_token(self, cond: TextCondition) -> torch.Tensor:
        """The input of the first scale (1x1): the pooled text plus a learned position, (rows, 1, C)."""
        return cond.pooled.unsqueeze(1) + self.pos_start

    def embed_input(self, token_rows: torch.Tensor) -> torch.Tensor:
        """Token rows (B, n, bits) of the summed codes resized to a scale (``bitwise.next_input``) -> (B, n, C)."""
        return self.word_embed(token_rows.to(self.dtype))

    def adaln_condition(self, cond: TextCondition) -> torch.Tensor:
        """The AdaLN shift/scale/gate input every block shares, (rows, 1, 6, C)."""
        return self.shared_ada_lin(cond.pooled).view(cond.pooled.shape[0], 1, 6, -1)

    def _blocks_and_head(self, x: torch.Tensor, ada: torch.Tensor, cond: TextCondition, rope: Rotation, *,
                         attn_mask: torch.Tensor | None = None, caches: list[KVCache] | None = None,
                         checkpointing: bool = False) -> torch.Tensor:
        # Level-embedded tokens -> logits. Either a mask over all scales (teacher forcing) or caches
        # holding the earlier scales (incremental decoding).
        blocks = self.blocks
        for blk, cache in zip(blocks, caches or [None] * len(blocks)):
            if checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, ada, cond, rope, attn_mask, cache, use_reentrant=False)
            else:
                x = blk(x, ada, cond, rope, attn_mask, cache)
        return self.logits(x, cond.pooled)

    def logits(self, x: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        out = self.head(self.head_nm(x, pooled).to(self.head.weight.dtype)).float()
        return out.view(*x.shape[:2], self.cfg.bits, 2)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def block_causal_mask(scales, device=None) -> torch.Tensor:
    """Boolean (L, L) mask: a token sees every token of its own and earlier scales."""
    ids = torch.cat([torch.full((h * w,), i) for i, (h, w) in enumerate(scales)])
    return (ids.view(-1, 1) >= ids.view(1, -1)).to(device)


__all__ = ["DecodeState", "Infinity", "InfinityConfig", "TextCondition", "block_causal_mask", "infinity_2b", "infinity_8b"]
