"""Auxiliary visual tokens (VARE): what the frozen model draws for the safe prompts.

For each safe prompt the original model generates an image; its tokens at every scale (bits for
Infinity, hard VQ code indices for Switti) become the labels, and the teacher-forcing inputs
derived from them become the context, of the erasure training under the unsafe prompt. They are
computed once and cached on disk, keyed by the model fingerprint, prompt, seed, schedule and
sampler settings.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from ..models.bitwise import teacher_forcing_inputs
from ..models.format import atomic_save_safetensors
from ..pipeline import VARPipeline
from ..sampling import SamplerSettings, generate
from ..sampling_vq import VQSamplerSettings
from .config import EraseConfig


@dataclass
class AuxTokens:
    """Labels and teacher-forcing inputs (N, L-1, d) for N generated images: bits (N, L, d) of a
    bitwise model, code indices (N, L) of a VQ model."""
    labels: torch.Tensor
    inputs: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


def _is_vq(pipe: VARPipeline) -> bool:
    return getattr(pipe.transformer, "token_kind", "bits") == "vq"


def aux_settings(pipe: VARPipeline, cfg: EraseConfig) -> SamplerSettings:
    """The sampler that draws the auxiliary tokens: the teacher's guidance and temperature.

    Bitwise models: top-p ``aux_top_p``, as the paper. A VQ model (Switti): its family's sampler (top-k,
    top-p, the guidance ramp and its switch-off) with guidance ``teacher_cfg`` and hard codes at every
    scale: the labels are hard indices and the student's inputs are rebuilt from them, so the teacher
    must have drawn along that same path (Gumbel soft codes would have fed it another one)."""
    r = cfg.research
    if not _is_vq(pipe):
        return SamplerSettings(cfg=cfg.teacher_cfg, tau=r.teacher_tau, top_p=r.aux_top_p)
    from ..settings import family_of                      # settings imports the erasure package
    try:
        base = family_of(pipe).sampler
    except ValueError:
        base = None
    base = base if isinstance(base, VQSamplerSettings) else VQSamplerSettings()
    return replace(base, cfg=cfg.teacher_cfg, tau=r.teacher_tau, smooth=False, negative_prompt=None)


def _cache_key(fingerprint: str, prompt: str, seed: int, settings: SamplerSettings, scales) -> str:
    blob = json.dumps({"model": fingerprint, "prompt": prompt, "seed": seed, "settings": asdict(settings),
                       "scales": [list(s) for s in scales]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _read_cached(path: Path | None, key: str, shape: tuple[int, ...], values: int) -> torch.Tensor | None:
    """A cache entry's labels of ``shape`` (each in [0, values)), or None; an entry that cannot be read or
    does not fit (a truncated file, another model's) is removed, named in a warning, and so recomputed:
    the cache heals itself."""
    if path is None or not path.exists():
        return None
    try:
        value = load_file(str(path))[key]
        if tuple(value.shape) != shape or not bool(((value >= 0) & (value < values)).all()):
            raise ValueError(f"holds {key} of shape {tuple(value.shape)}, expected {shape} in [0, {values})")
        return value.long() if key == "indices" else value.float()
    except Exception as e:  # noqa: BLE001 - any unreadable entry is dropped the same way
        warnings.warn(f"auxiliary-token cache entry {path} is unusable ({type(e).__name__}: {e}); "
                      "removed and recomputed", stacklevel=3)
        path.unlink(missing_ok=True)

def prompt_seeds(prompt: str, first: int, count: int) -> list[int]:
    """``count`` seeds of the prompt's own: the first one offset by a hash of the prompt, so prompts that
    share a seed list do not all draw the same noise (and the same open attributes: every "a blue ..."
    striped on gray when all use seeds 0 and 1)."""
    offset = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
    return [(first + offset) % 2**62 + i for i in range(count)]



def _inputs(pipe: VARPipeline, labels: torch.Tensor, scales) -> torch.Tensor:
    """The teacher-forcing inputs (N, L-1, d) of labels (N, L[, d]): what the model saw when drawing them."""
    per_scale = list(torch.split(labels, [h * w for h, w in scales], dim=1))
    if _is_vq(pipe):
        # the VQ-VAE's Phi convolutions make them: no graph to them (the inputs are reused every step)
        with torch.no_grad():
            return pipe.vae.teacher_forcing_inputs(per_scale, scales)[0].cpu()
    return teacher_forcing_inputs(per_scale, scales, pipe.vae.cfg.patch_size)[0]


def auxiliary_tokens(pipe: VARPipeline, prompts: list[str], *, seeds: list[int] | Callable[[str], list[int]],
                     settings: SamplerSettings,
                     scales, cache_dir: str | Path | None = None, fingerprint: str | None = None,
                     callback: Callable[[int, int], None] | None = None,
                     batch_size: int = 8) -> dict[str, AuxTokens]:
    """Generate (or load from ``cache_dir``) one image per (prompt, seed) with the given model; ``seeds``
    is one list for every prompt or a function giving each prompt its own (:func:`prompt_seeds`).

    Images not in the cache are drawn ``batch_size`` at a time (tokens only, no VAE decode); each
    keeps its own seed, so its tokens are those of drawing it alone (tests/test_compute_reuse.py).
    ``callback(done, total)`` runs after every scale of every batch (``done`` counts finished
    images) and may raise to cancel: on a real model one image takes seconds to minutes.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    fingerprint = fingerprint or pipe.fingerprint()
    vq, length, c = _is_vq(pipe), sum(h * w for h, w in scales), pipe.transformer.cfg
    key, shape, values = ("indices", (1, length), c.vocab_size) if vq else ("bits", (1, length, c.bits), 2)
    unique = list(dict.fromkeys(prompts))
    seeds_of = seeds if callable(seeds) else (lambda prompt: seeds)
    rows: dict[tuple[str, int], torch.Tensor] = {}
    paths: dict[tuple[str, int], Path | None] = {}
    for prompt in unique:
        for seed in seeds_of(prompt):
            name = _cache_key(fingerprint, prompt, seed, settings, scales)
            paths[prompt, seed] = path = Path(cache_dir) / f"{name}.safetensors" if cache_dir else None
            cached = _read_cached(path, key, shape, values)
            if cached is not None:
                rows[prompt, seed] = cached
    total = len(paths)
    done = len(rows)
    if callback is not None and done:
        callback(done, total)
    missing = [k for k in paths if k not in rows]
    for start in range(0, len(missing), batch_size):
        chunk = missing[start:start + batch_size]
        on_scale = (lambda step: callback(done, total)) if callback is not None else None
        res = generate(pipe, [p for p, _ in chunk], seeds=[s for _, s in chunk], settings=settings, scales=scales,
                       decode=False, callback=on_scale)
        drawn = torch.cat(res.indices if vq else res.bits, dim=1).cpu()
        for i, (prompt, seed) in enumerate(chunk):
            row = drawn[i:i + 1]
            if paths[prompt, seed] is not None:
                atomic_save_safetensors({key: row.to(torch.int32 if vq else torch.uint8)}, paths[prompt, seed],
                                        {"prompt": prompt, "seed": str(seed)})
            rows[prompt, seed] = row.long() if vq else row.float()
        done += len(chunk)
        if callback is not None:
            callback(done, total)
    out: dict[str, AuxTokens] = {}
    for prompt in unique:
        labels = torch.cat([rows[prompt, seed] for seed in seeds_of(prompt)])
        out[prompt] = AuxTokens(labels, _inputs(pipe, labels, scales))
    return out
