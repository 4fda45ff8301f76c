"""The erasure cache: auxiliary tokens and teacher targets kept on disk between runs.

Both are what the frozen model computes before training, a function of the model, the prompts,
the seeds and the settings alone: a second run with the same inputs reads them instead of
drawing and scoring the images again (seconds on the toy model, minutes on Infinity). The CLI,
the demo and the nodes use ``default_cache_dir()``; ``usage`` and ``clear`` say what is there and
remove it. Auxiliary tokens are ``<key>.safetensors`` files (erasure/tokens.py), teacher targets
``targets/<key>.safetensors``.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..models.format import atomic_save_safetensors

CACHE_ENV = "SVARE_CACHE_DIR"
TARGETS = "targets"
# What the teacher targets are computed by: a change to any of these files changes every key, so a
# cache made by other code is never read.
_TARGET_CODE = ("methods.py", "run.py", "losses.py")


def default_cache_dir() -> Path:
    """``$SVARE_CACHE_DIR``, else ``~/.cache/svare/erasure``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "svare" / "erasure").expanduser()


def _entries(folder: Path) -> list[Path]:
    return [p for p in (*folder.glob("*.safetensors"), *(folder / TARGETS).glob("*.safetensors")) if p.is_file()]


def usage(folder: str | Path) -> tuple[int, int]:
    """(files, bytes) of the cache entries in ``folder`` (0, 0 when it does not exist)."""
    entries = _entries(Path(folder))
    return len(entries), sum(p.stat().st_size for p in entries)


def describe(folder: str | Path) -> str:
    """One line for users: where the cache is and how big."""
    files, size = usage(folder)
    return f"erasure cache {folder}: {files} file{'s' if files != 1 else ''}, {size / 1e6:.2f} MB"


def clear(folder: str | Path) -> tuple[int, int]:
    """Remove the cache entries in ``folder`` (nothing else); returns the (files, bytes) removed."""
    entries = _entries(Path(folder))
    size = sum(p.stat().st_size for p in entries)
    for p in entries:
        p.unlink(missing_ok=True)
    return len(entries), size


# Settings of the optimizer alone: they cannot change what the frozen model computes.
_OPTIMIZER_ONLY = ("steps", "lr", "weight_decay", "betas", "grad_clip", "max_bad_steps")


def targets_key(run, method_name: str, fingerprint: str, aux_key: str) -> str:
    """Everything the teacher targets depend on: the frozen model (fingerprint, dtype, device, threads:
    float results carry their kernels' rounding), the text encoder, the method and its settings, the
    prompts, the auxiliary tokens and the code that computes them."""
    here = Path(__file__).parent
    code = hashlib.sha256(b"".join((here / name).read_bytes() for name in _TARGET_CODE)).hexdigest()
    frozen, text = run.frozen, run.pipe.text_encoder
    options = {k: v for k, v in run.cfg.used_options().items() if k not in _OPTIMIZER_ONLY}
    blob = json.dumps({
        "model": fingerprint, "dtype": str(frozen.dtype), "device": frozen.device.type,
        "text_encoder": [type(text).__name__, str(getattr(text, "path", "")), str(getattr(text, "dtype", ""))],
        "threads": torch.get_num_threads(), "method": method_name, "options": options,
        "pairs": [[p.unsafe, p.safe, p.concept] for p in run.pairs], "preserve": run.preserve_prompts,
        "scales": [list(s) for s in run.scales], "aux": aux_key, "code": code,
    }, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def aux_key(aux: dict) -> str:
    """A digest of the auxiliary tokens the targets are computed on."""
    h = hashlib.sha256()
    for prompt, tokens in sorted(aux.items()):
        h.update(prompt.encode())
        labels = tokens.labels                    # bits (0/1) or a VQ model's code indices
        h.update(labels.to(torch.int32 if labels.dtype == torch.long else torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def read_targets(folder: str | Path, key: str) -> dict[str, torch.Tensor] | None:
    """The cached teacher targets under ``key``, or None; an unreadable entry is removed (and recomputed)."""
    path = Path(folder) / TARGETS / f"{key}.safetensors"
    if not path.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            prompts = json.loads(f.metadata()["prompts"])
        tensors = load_file(str(path))
        return {p: tensors[f"t{i}"] for i, p in enumerate(prompts)}
    except Exception as e:  # noqa: BLE001 - any unreadable entry is dropped the same way
        warnings.warn(f"teacher-target cache entry {path} is unusable ({type(e).__name__}: {e}); removed and "
                      "recomputed", stacklevel=2)
        path.unlink(missing_ok=True)
        return None


def write_targets(folder: str | Path, key: str, targets: dict[str, torch.Tensor]) -> None:
    prompts = list(targets)
    atomic_save_safetensors({f"t{i}": targets[p].contiguous() for i, p in enumerate(prompts)},
                            Path(folder) / TARGETS / f"{key}.safetensors", {"prompts": json.dumps(prompts)})
