"""Auxiliary visual tokens (VARE): what the frozen model draws for the safe prompts.

For each safe prompt the original model generates an image; its bits at every scale become the
labels, and the teacher-forcing inputs derived from them become the context, of the erasure
training under the unsafe prompt. They are computed once and cached on disk, keyed by the model
fingerprint, prompt, seed, schedule and sampler settings.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from ..models.bitwise import teacher_forcing_inputs
from ..models.format import atomic_save_safetensors
from ..pipeline import VARPipeline
from ..sampling import SamplerSettings, generate


@dataclass
class AuxTokens:
    """Bits (N, L, d) and teacher-forcing inputs (N, L-1, d) for N generated images."""
    bits: torch.Tensor
    inputs: torch.Tensor

    def __len__(self) -> int:
        return self.bits.shape[0]


def _cache_key(fingerprint: str, prompt: str, seed: int, settings: SamplerSettings, scales) -> str:
    blob = json.dumps({"model": fingerprint, "prompt": prompt, "seed": seed, "settings": asdict(settings),
                       "scales": [list(s) for s in scales]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _read_cached(path: Path | None, length: int, bits: int) -> torch.Tensor | None:
    """A cache entry's bits (1, L, d), or None; an entry that cannot be read or does not fit (a truncated
    file, another model's) is removed, named in a warning, and so recomputed: the cache heals itself."""
    if path is None or not path.exists():
        return None
    try:
        value = load_file(str(path))["bits"]
        if tuple(value.shape) != (1, length, bits) or not bool(((value == 0) | (value == 1)).all()):
            raise ValueError(f"holds bits of shape {tuple(value.shape)}, expected {(1, length, bits)}")
        return value.float()
    except Exception as e:  # noqa: BLE001 - any unreadable entry is dropped the same way
        warnings.warn(f"auxiliary-token cache entry {path} is unusable ({type(e).__name__}: {e}); "
                      "removed and recomputed", stacklevel=3)
        path.unlink(missing_ok=True)
        return None


def prompt_seeds(prompt: str, first: int, count: int) -> list[int]:
    """``count`` seeds of the prompt's own: the first one offset by a hash of the prompt, so prompts that
    share a seed list do not all draw the same noise (and the same open attributes: every "a blue ..."
    striped on gray when all use seeds 0 and 1)."""
    offset = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
    return [(first + offset) % 2**62 + i for i in range(count)]


def auxiliary_tokens(pipe: VARPipeline, prompts: list[str], *, seeds: list[int] | Callable[[str], list[int]],
                     settings: SamplerSettings,
                     scales, cache_dir: str | Path | None = None, fingerprint: str | None = None,
                     callback: Callable[[int, int], None] | None = None,
                     batch_size: int = 8) -> dict[str, AuxTokens]:
    """Generate (or load from ``cache_dir``) one image per (prompt, seed) with the given model; ``seeds``
    is one list for every prompt or a function giving each prompt its own (:func:`prompt_seeds`).

    Images not in the cache are drawn ``batch_size`` at a time (tokens only, no VAE decode); each
    keeps its own seed, so its bits are those of drawing it alone (tests/test_compute_reuse.py).
    ``callback(done, total)`` runs after every scale of every batch (``done`` counts finished
    images) and may raise to cancel: on a real model one image takes seconds to minutes.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    fingerprint = fingerprint or pipe.fingerprint()
    patch = pipe.vae.cfg.patch_size
    unique = list(dict.fromkeys(prompts))
    seeds_of = seeds if callable(seeds) else (lambda prompt: seeds)
    length, bits = sum(h * w for h, w in scales), pipe.transformer.cfg.bits
    rows: dict[tuple[str, int], torch.Tensor] = {}
    paths: dict[tuple[str, int], Path | None] = {}
    for prompt in unique:
        for seed in seeds_of(prompt):
            key = _cache_key(fingerprint, prompt, seed, settings, scales)
            paths[prompt, seed] = path = Path(cache_dir) / f"{key}.safetensors" if cache_dir else None
            cached = _read_cached(path, length, bits)
            if cached is not None:
                rows[prompt, seed] = cached
    total = len(paths)
    done = len(rows)
    if callback is not None and done:
        callback(done, total)
    missing = [k for k in paths if k not in rows]
    for start in range(0, len(missing), batch_size):
        chunk = missing[start:start + batch_size]
        # Each prompt encoded alone first, as when every image was drawn by itself: the text encoder's
        # cache then holds those features, not ones carrying the rounding of a batch of prompts.
        for prompt in dict.fromkeys(p for p, _ in chunk):
            pipe.encode_prompts([prompt])
        on_scale = (lambda step: callback(done, total)) if callback is not None else None
        res = generate(pipe, [p for p, _ in chunk], seeds=[s for _, s in chunk], settings=settings, scales=scales,
                       decode=False, callback=on_scale)
        drawn = torch.cat(res.bits, dim=1)
        for i, (prompt, seed) in enumerate(chunk):
            row = drawn[i:i + 1]
            if paths[prompt, seed] is not None:
                atomic_save_safetensors({"bits": row.to(torch.uint8)}, paths[prompt, seed],
                                        {"prompt": prompt, "seed": str(seed)})
            rows[prompt, seed] = row
        done += len(chunk)
        if callback is not None:
            callback(done, total)
    out: dict[str, AuxTokens] = {}
    for prompt in unique:
        prompt_bits = torch.cat([rows[prompt, seed].float() for seed in seeds_of(prompt)])
        per_scale = list(torch.split(prompt_bits, [h * w for h, w in scales], dim=1))
        inputs, _ = teacher_forcing_inputs(per_scale, scales, patch)
        out[prompt] = AuxTokens(prompt_bits, inputs)
    return out
