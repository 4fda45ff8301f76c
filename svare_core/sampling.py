"""Next-scale sampling with a KV cache, classifier-free guidance on logits and bitwise sampling.

Every image has its own random generator (seed + index), so an image does not depend on the
batch it was drawn in. A callback sees every scale (progress, previews) and may raise to cancel.

The transformer owns its forward and the sampler owns the loop: ``generate`` only talks to the
model through ``NextScaleModel`` (text condition, first tokens, one scale with the cache, input
embedding), so another next-scale family with those methods samples here unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch

from . import memory
from .models.bitwise import add_scale, next_input
from .pipeline import VARPipeline


class Condition(Protocol):
    """A model's encoded prompts for a batch of rows."""

    def cat(self, other: Any) -> Any:
        """The rows of ``self`` then those of ``other`` (conditional + unconditional rows for CFG)."""


class ModelShape(Protocol):
    @property
    def bits(self) -> int:
        """Bits per token: each scale's logits are (rows, h*w, bits, 2)."""

    @property
    def num_levels(self) -> int:
        """The most scales a schedule may have."""


class NextScaleModel(Protocol):
    """What ``generate`` needs of a next-scale bitwise transformer (``Infinity`` provides it).

    A decode is ``state = begin(cond, scales)``, then one ``step(state, x)`` per scale in order:
    the first on ``start_token(cond)``, each later one on ``embed_input`` of the summed codes
    resized to that scale (``bitwise.next_input``). ``step`` returns float logits.
    """
    @property
    def cfg(self) -> ModelShape: ...

    @property
    def device(self) -> torch.device: ...

    def encode_text(self, features: torch.Tensor, mask: torch.Tensor) -> Condition: ...
    def uncond_features(self, mask: torch.Tensor) -> torch.Tensor: ...
    def begin(self, cond: Any, scales: list[tuple[int, int]]) -> Any: ...
    def start_token(self, cond: Any) -> torch.Tensor: ...
    def step(self, state: Any, x: torch.Tensor) -> torch.Tensor: ...
    def embed_input(self, token_rows: torch.Tensor) -> torch.Tensor: ...


class Cancelled(RuntimeError):
    """Raised when a callback asks a long job (sampling, erasure) to stop."""


@dataclass
class SamplerSettings:
    cfg: float | Sequence[float] = 3.0     # guidance per scale (a list) or for all scales
    tau: float = 1.0                         # temperature on the guided logits
    top_k: int = 0                           # 1: greedy bits; 0 or >=2: off (a bit has 2 values)
    top_p: float = 0.0                       # 0: off; e.g. 0.97 makes confident bits deterministic
    negative_prompt: str | None = None       # replaces the learned empty prompt for CFG

    def cfg_at(self, i: int, n: int) -> float:
        if isinstance(self.cfg, (int, float)):
            return float(self.cfg)
        if len(self.cfg) != n:
            raise ValueError(f"a cfg schedule needs one value per scale ({n}), got {len(self.cfg)}")
        return float(self.cfg[i])

    def validate(self) -> None:
        """Refuse settings that would draw a silently wrong image (NaN guidance, a zero temperature, ...)."""
        cfgs = [self.cfg] if _is_number(self.cfg) else list(self.cfg) if isinstance(self.cfg, (list, tuple)) else []
        if not cfgs or not all(_is_number(c) and math.isfinite(c) for c in cfgs):
            raise ValueError(f"cfg must be a finite number (or one per scale), got {self.cfg!r}")
        if not (_is_number(self.tau) and math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"tau must be a finite number > 0, got {self.tau!r}")
        if not (_is_number(self.top_p) and 0 <= self.top_p <= 1):
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p!r}")
        if not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0):
            raise ValueError(f"top_k must be a whole number >= 0, got {self.top_k!r}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be text, got {type(self.negative_prompt).__name__}")


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Image i of a batch is drawn with seed + i; torch generators take seeds below 2**64, and
# ComfyUI's seeds go up to 2**64 - 1, so seeds are kept below 2**63 with room for a batch.
MAX_SEED = 2**63 - 2**16


def check_prompts_and_seed(prompts: Sequence[str], seed: int) -> list[str]:
    """The prompts as a list (a single string is one prompt, not one per character) and a valid seed."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("give at least one prompt")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be text")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed and seed + len(prompts) <= MAX_SEED):
        raise ValueError(f"seed must be a whole number in [0, {MAX_SEED - len(prompts)}], got {seed!r}")
    return prompts


def check_seeds(seeds: Sequence[int], n: int) -> list[int]:
    """One valid seed per image."""
    seeds = list(seeds)
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts: give one seed per prompt")
    bad = next((sd for sd in seeds if not (isinstance(sd, int) and not isinstance(sd, bool) and 0 <= sd < MAX_SEED)), None)
    if bad is not None:
        raise ValueError(f"seed must be a whole number in [0, {MAX_SEED - 1}], got {bad!r}")
    return seeds


@dataclass
class ScaleStep:
    """What a callback sees after each scale."""
    index: int
    total: int
    grid: tuple[int, int]
    summed_codes: torch.Tensor               # (B, d, H, W) on the final grid so far


@dataclass
class SampleResult:
    images: torch.Tensor                     # (B, H, W, 3) float in 0..1 (ComfyUI layout), CPU
    bits: list[torch.Tensor]                 # per scale (B, h*w, d) in {0, 1}
    summed_codes: torch.Tensor               # (B, d, h, w)
    scales: list[tuple[int, int]]
    seeds: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] | None = None  # per scale, conditional rows before CFG (return_logits=True)


def sample_bits(probs: torch.Tensor, uniforms: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Bits from P(bit = 1) with the given uniforms; top-k/top-p restricted to two outcomes."""
    greedy = (probs > 0.5).float()
    sampled = (uniforms < probs).float()
    if top_k == 1:
        return greedy
    if top_p > 0:
        # Nucleus over {0, 1}: the likelier value alone already covers top_p -> take it.
        confident = torch.maximum(probs, 1 - probs) >= top_p
        return torch.where(confident, greedy, sampled)
    return sampled


def _decode_images(pipe: VARPipeline, summed: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        img = pipe.vae.decode(summed.to(pipe.vae.device))
    return img.float().add(1).div(2).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def decode_preview(pipe: VARPipeline, step: ScaleStep, index: int = 0) -> torch.Tensor:
    """Decode one image of the current partial result, (H, W, 3) in 0..1."""
    return _decode_images(pipe, step.summed_codes[index:index + 1])[0]


def _sampling_estimate(pipe, prompts, *, settings=None, scales=None, aspect_ratio="1:1", preset="1M", decode=True,
                       **_) -> int:
    """generate()'s working memory (memory.sampling_bytes) from its arguments."""
    s = settings or SamplerSettings()
    scales = [tuple(g) for g in (scales or pipe.default_scales(aspect_ratio, preset))]
    guided = any(s.cfg_at(i, len(scales)) != 1.0 for i in range(len(scales)))
    return memory.sampling_bytes(pipe, 1 if isinstance(prompts, str) else len(prompts), scales, guided, decode)


# A host sharing the GPU (ComfyUI) puts the parts on their devices first, with room for the work.
@memory.task("sampling", _sampling_estimate)
@torch.no_grad()
def generate(pipe: VARPipeline, prompts: Sequence[str] | str, *, seed: int = 0, settings: SamplerSettings | None = None,
             scales=None, aspect_ratio: str = "1:1", preset: str = "1M",
             callback: Callable[[ScaleStep], None] | None = None, return_logits: bool = False,
             decode: bool = True, seeds: Sequence[int] | None = None) -> SampleResult:
    """Draw one image per prompt. Image ``i`` uses the seed ``seed + i``, or ``seeds[i]`` when given
    (one per prompt: images of different prompts and seeds drawn in one batch).

    ``scales`` overrides the schedule; otherwise the model's own (small models) or Infinity's
    table for ``aspect_ratio`` and ``preset``. ``callback`` runs after every scale and may raise
    (e.g. Cancelled) to stop. ``decode=False``: tokens only (``images`` is empty), no VAE decode.
    """
    if getattr(pipe.transformer, "token_kind", "bits") == "vq":
        # 4096-way VQ tokens (Switti): its own guidance and token draws, the same step API.
        from .sampling_vq import generate_vq
        return generate_vq(pipe, prompts, seed=seed, settings=settings, scales=scales, aspect_ratio=aspect_ratio,
                           callback=callback, return_logits=return_logits, decode=decode, seeds=seeds)
    s = settings or SamplerSettings()
    s.validate()
    prompts = check_prompts_and_seed(prompts, seed)
    seeds = [seed + i for i in range(len(prompts))] if seeds is None else check_seeds(seeds, len(prompts))
    model: NextScaleModel = pipe.transformer
    scales = [tuple(g) for g in (scales or pipe.default_scales(aspect_ratio, preset))]
    n, B, d = len(scales), len(prompts), model.cfg.bits
    # Checked before the text encoder runs (the model's begin checks it too).
    if n > model.cfg.num_levels:
        raise ValueError(f"{n} scales but the model knows at most {model.cfg.num_levels}")
    guided = any(s.cfg_at(i, n) != 1.0 for i in range(n))

    feats, mask = pipe.encode_prompts(prompts)
    cond = model.encode_text(feats, mask)
    if guided:
        if s.negative_prompt:
            nf, nm = pipe.encode_prompts([s.negative_prompt] * B)
        else:
            nf, nm = model.uncond_features(mask), mask
        cond = cond.cat(model.encode_text(nf, nm))

    gens = [torch.Generator(device="cpu").manual_seed(sd) for sd in seeds]
    state = model.begin(cond, scales)
    patch = pipe.vae.cfg.patch_size
    H, W = scales[-1]
    summed = torch.zeros(B, d // (patch * patch), H * patch, W * patch, device=model.device)
    x = model.start_token(cond)
    all_bits, all_logits = [], []
    for i, (h, w) in enumerate(scales):
        n_tok = h * w
        logits = model.step(state, x)                                 # (rows, n_tok, d, 2)
        if return_logits:
            all_logits.append(logits[:B].cpu())
        if guided:
            g = s.cfg_at(i, n)
            logits = g * logits[:B] + (1 - g) * logits[B:]
        # In fp32 whatever the model's precision: bf16 probabilities would move top-p's cut.
        probs = torch.softmax(logits.float() / s.tau, dim=-1)[..., 1].cpu()
        u = torch.stack([torch.rand((n_tok, d), generator=gen) for gen in gens])
        bits = sample_bits(probs, u, s.top_k, s.top_p).to(model.device)
        all_bits.append(bits)
        summed = add_scale(summed, bits, (h, w), patch)
        if callback is not None:
            callback(ScaleStep(i, n, (h, w), summed))
        if i + 1 < n:
            nxt = model.embed_input(next_input(summed, scales[i + 1], patch))
            x = torch.cat([nxt, nxt]) if guided else nxt
    images = _decode_images(pipe, summed) if decode else torch.empty(B, 0, 0, 3)
    return SampleResult(images, [b.cpu() for b in all_bits], summed.cpu(), scales,
                        seeds, all_logits if return_logits else None)
