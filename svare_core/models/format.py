"""The project's own model file: one safetensors file, configs in its metadata.

Keys are prefixed by component (``transformer.``, ``vae.``); the metadata holds the JSON configs,
the default scale schedule and the text encoder to pair with. Writes are atomic.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "svare-var"
FORMAT_VERSION = "1"


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file so that an interrupted write never leaves a partial file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; a saved model or patch is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def unique_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without aliases (a submodule registered under two names is stored once)."""
    seen, out = set(), {}
    for k, v in module.state_dict().items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape)) if v.device.type != "meta" else k
        if key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out


def load_unique_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a state dict saved by unique_state_dict (aliases are filled in by the module itself)."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    aliases = set(module.state_dict()) - set(unique_state_dict(module))
    missing = [k for k in missing if k not in aliases]
    if missing or unexpected:
        raise KeyError(f"state dict does not fit {type(module).__name__}: "
                       f"missing {missing[:5]}, unexpected {unexpected[:5]}")


def save_model(path: str | Path, *, transformer=None, vae=None, text_encoder: str | None = None,
               scales=None, extra: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Save a transformer and/or VAE with their configs into one safetensors file."""
    tensors: dict[str, torch.Tensor] = {}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION}
    for prefix, module in (("transformer", transformer), ("vae", vae)):
        if module is None:
            continue
        for k, v in unique_state_dict(module).items():
            tensors[f"{prefix}.{k}"] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
        meta[f"{prefix}_config"] = json.dumps(module.cfg.to_dict())
    if text_encoder:
        meta["text_encoder"] = text_encoder
    if scales:
        meta["scales"] = json.dumps([list(s) for s in scales])
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return atomic_save_safetensors(tensors, path, meta)


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def state_dict_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A short content hash of a state dict: names, shapes, dtypes and a strided sample of values.

    Sampling (up to 4096 values a tensor, spread over the whole tensor) keeps this fast on
    multi-GB models while any retrained or different model still gets another fingerprint.
    """
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().flatten()
        h.update(f"{k}{tuple(state[k].shape)}{t.dtype}".encode())
        if t.numel():
            idx = torch.linspace(0, t.numel() - 1, min(4096, t.numel()), device=t.device).long()
            h.update(t[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
