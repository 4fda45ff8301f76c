"""Next-scale sampling of 4096-way VQ tokens (Switti): Switti's guidance ramp, top-k/top-p, Gumbel codes.

``sampling.generate`` hands a pipeline whose transformer draws VQ tokens (``token_kind == "vq"``)
to :func:`generate_vq`; the loop talks to the model through the same step API as Infinity's
(``encode_text``, ``begin``, ``start_token``, ``step``, ``embed_input``) and to the VQ-VAE for the
codes (``scale_codes``, ``add_scale``, ``next_input``).

Guidance follows the reference: at scale si of S the weight is t = cfg * si / (S-1) and the logits
(1 + t) cond - t uncond, from scale ``cfg_start``; from ``cfg_stop`` on the unconditional rows are
dropped and ``final_tau`` divides the logits of every remaining scale. Every image has its own
generator (seed + index): one multinomial draw (or one Gumbel noise tensor) per scale, so a batch of
one draws exactly what the reference draws with the same seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .sampling import SamplerSettings, ScaleStep, _decode_images, _is_number, check_prompts_and_seed, check_seeds


@dataclass
class VQSamplerSettings(SamplerSettings):
    """Switti's sampler. Defaults: the authors' README example for Switti-1024."""
    cfg: float = 6.0                       # the weight reached at the last scale (t = cfg * si / (S-1))
    top_k: int = 400
    top_p: float = 0.95
    cfg_start: int = 0                     # first scale with guidance (before it: conditional logits only)
    cfg_stop: int = 11                     # first scale without guidance (>= the number of scales: never off)
    final_tau: float | None = 0.1          # temperature of the scales from cfg_stop on; None: none
    smooth: bool = True                    # Gumbel-softmax soft codes while guidance is on
    smooth_start: int = 2                  # first scale with soft codes

    def validate(self) -> None:
        if not _is_number(self.cfg):
            raise ValueError(f"Switti's cfg is one number (its weight ramps over the scales), got {self.cfg!r}")
        super().validate()
        for name in ("cfg_start", "cfg_stop", "smooth_start"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                raise ValueError(f"{name} must be a whole number >= 0 (a scale index), got {v!r}")
        if self.final_tau is not None and not (_is_number(self.final_tau) and math.isfinite(self.final_tau)
                                               and self.final_tau > 0):
            raise ValueError(f"final_tau must be a number > 0 or None, got {self.final_tau!r}")
        if not isinstance(self.smooth, bool):
            raise ValueError(f"smooth must be True or False, got {self.smooth!r}")


@dataclass
class VQSampleResult:
    images: torch.Tensor                     # (B, H, W, 3) float in 0..1, CPU (empty without decode)
    indices: list[torch.Tensor]              # per scale (B, h*w): hard tokens (argmax of a soft code)
    summed_codes: torch.Tensor               # (B, z, n, n): what the decoder saw (soft codes included)
    scales: list[tuple[int, int]]
    seeds: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] | None = None   # per scale, conditional rows before guidance (return_logits)
    soft: list[bool] = field(default_factory=list)   # per scale: whether its codes were Gumbel-soft


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits (..., V) with everything outside the top k (ties at the k-th value kept) and outside the
    nucleus set to -inf. The nucleus drops the least likely tokens whose cumulative probability stays
    within 1 - top_p, never the most likely one."""
    out = logits.clone()
    if 0 < top_k < out.shape[-1]:
        kth = out.topk(top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, -math.inf)
    if top_p > 0:
        ascending, order = out.sort(dim=-1)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[..., -1] = False
        out = out.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return out


def draw_indices(logits: torch.Tensor, generators: list[torch.Generator], top_k: int, top_p: float) -> torch.Tensor:
    """One token per position, (B, l), from logits (B, l, V): one multinomial call per image, on the CPU."""
    probs = filter_top_k_top_p(logits.float(), top_k, top_p).softmax(dim=-1).cpu()
    return torch.stack([torch.multinomial(p, 1, replacement=True, generator=g)[:, 0]
                        for p, g in zip(probs, generators)]).to(logits.device)


def gumbel_codes(logits: torch.Tensor, generators: list[torch.Generator], ratio: float) -> torch.Tensor:
    """Soft one-hot tokens (B, l, V) from a Gumbel softmax whose temperature falls with the scale
    (the reference's schedule: max(0.27 (1 - 0.95 ratio), 0.005), logits sharpened by 1 + ratio)."""
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    x = logits.float().mul(1 + ratio).cpu()
    noise = torch.stack([-torch.empty_like(row).exponential_(generator=g).log() for row, g in zip(x, generators)])
    return ((x + noise) / tau).softmax(dim=-1).to(logits.device)


def guidance_weight(si: int, n: int, s: VQSamplerSettings) -> float:
    """t of scale si of n: cfg * si / (n - 1) on [cfg_start, cfg_stop), 0 elsewhere (the logits are then
    (1 + t) cond - t uncond). Erasure's teacher guides with the same ramp (erasure/run.py)."""
    return s.cfg * si / (n - 1) if s.cfg_start <= si < s.cfg_stop else 0.0


def token_guidance(s: VQSamplerSettings, scales) -> torch.Tensor:
    """The guidance weight of every token of ``scales`` (L,): 1 + guidance_weight of its scale, the
    weight a teacher-forced pass guides with to match the sampler (erasure, attacks)."""
    n = len(scales)
    return torch.cat([torch.full((h * w,), 1.0 + guidance_weight(si, n, s)) for si, (h, w) in enumerate(scales)])


def guide(logits: torch.Tensor, si: int, n: int, rows: int, s: VQSamplerSettings) -> torch.Tensor:
    """The logits a scale samples from: conditional rows, guided on [cfg_start, cfg_stop), tempered after."""
    if si >= s.cfg_stop:
        out = logits[:rows] if s.final_tau is None else logits[:rows] / s.final_tau
    elif si < s.cfg_start or logits.shape[0] == rows:      # no unconditional rows (guidance never on)
        out = logits[:rows]
    else:
        t = guidance_weight(si, n, s)
        out = (1 + t) * logits[:rows] - t * logits[rows:]
    return out / s.tau if s.tau != 1.0 else out


def generate_vq(pipe, prompts: Sequence[str] | str, *, seed: int = 0, settings: VQSamplerSettings | None = None,
                scales=None, aspect_ratio: str = "1:1", callback: Callable[[ScaleStep], None] | None = None,
                return_logits: bool = False, decode: bool = True, seeds: Sequence[int] | None = None) -> VQSampleResult:
    """Draw one image per prompt with a VQ next-scale model (called by ``sampling.generate``); image ``i``
    uses the seed ``seed + i``, or ``seeds[i]`` when given."""
    s = settings if isinstance(settings, VQSamplerSettings) else _from_base(settings)
    s.validate()
    prompts = check_prompts_and_seed(prompts, seed)
    seeds = [seed + i for i in range(len(prompts))] if seeds is None else check_seeds(seeds, len(prompts))
    if aspect_ratio != "1:1":
        raise ValueError(f"Switti draws square images only; got aspect ratio {aspect_ratio!r}: use 1:1")
    model, vae = pipe.transformer, pipe.vae
    scales = [tuple(g) for g in (scales or pipe.scales or model.cfg.scales)]
    n, B = len(scales), len(prompts)
    if n < 2:
        raise ValueError("a VQ schedule needs at least 2 scales")
    if n > model.cfg.num_levels:
        raise ValueError(f"{n} scales but the model knows at most {model.cfg.num_levels}")
    guided = s.cfg_start < min(s.cfg_stop, n) and s.cfg != 0
    cond = pipe.condition(prompts)
    if guided:
        cond = cond.cat(pipe.condition([s.negative_prompt or ""] * B))
    gens = [torch.Generator(device="cpu").manual_seed(sd) for sd in seeds]
    state = model.begin(cond, scales)
    side = scales[-1][0]
    summed = torch.zeros(B, vae.cfg.z_channels, side, side, device=model.device)
    x = model.start_token(cond)
    indices, raw, soft_flags = [], [], []
    for si, (h, w) in enumerate(scales):
        if guided and si == s.cfg_stop:
            state.keep_rows(B)
            x = x[:B]
        logits = model.step(state, x)                                  # (rows, h*w, V)
        if return_logits:
            raw.append(logits[:B].float().cpu())
        logits = guide(logits, si, n, B, s)
        soft = s.smooth and si >= s.smooth_start and si < s.cfg_stop
        if soft:
            probs = gumbel_codes(logits, gens, si / (n - 1))
            idx = probs.argmax(dim=-1)
            codes = vae.scale_codes(probs, h)
        else:
            idx = draw_indices(logits, gens, s.top_k, s.top_p)
            codes = vae.scale_codes(idx, h)
        indices.append(idx)
        soft_flags.append(soft)
        summed = vae.add_scale(summed, codes, si, n)
        if callback is not None:
            callback(ScaleStep(si, n, (h, w), summed))
        if si + 1 < n:
            nxt = model.embed_input(vae.next_input(summed, scales[si + 1][0]))
            x = torch.cat([nxt, nxt]) if guided and si + 1 < s.cfg_stop else nxt
    images = _decode_images(pipe, summed) if decode else torch.empty(B, 0, 0, 3)
    return VQSampleResult(images, [i.cpu() for i in indices], summed.cpu(), scales, seeds,
                          raw if return_logits else None, soft_flags)


def _from_base(settings: SamplerSettings | None) -> VQSamplerSettings:
    # Plain SamplerSettings (a caller that does not know the family): its shared fields, Switti's rest.
    if settings is None:
        return VQSamplerSettings()
    return VQSamplerSettings(cfg=settings.cfg, tau=settings.tau, top_k=settings.top_k, top_p=settings.top_p,
                             negative_prompt=settings.negative_prompt)


__all__ = ["VQSampleResult", "VQSamplerSettings", "draw_indices", "filter_top_k_top_p", "generate_vq", "gumbel_codes",
           "guidance_weight", "guide"]
