"""The project's own model file: one safetensors file, configs in its metadata.

Keys are prefixed by component (``transformer.``, ``vae.``); the metadata holds each component's
registered architecture and JSON config, the default scale schedule, the text encoder to pair
with, and checksums of each part's tensors and of the metadata. Writes are atomic.
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
# The architecture of each part of a file that does not name it (written before ``{part}_arch``
# was recorded, like the bundled toy model): the project's first parts were Infinity's.
DEFAULT_PART_ARCHS = {"transformer": "infinity", "vae": "infinity-vae"}


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
    """Save a transformer and/or VAE with their architectures and configs into one safetensors file."""
    from .registry import architecture_of   # the registry reads this module's files: imported late

    tensors: dict[str, torch.Tensor] = {}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION}
    parts = {}
    for prefix, module in (("transformer", transformer), ("vae", vae)):
        if module is None:
            continue
        part = {f"{prefix}.{k}": v.to(dtype) if dtype is not None and v.is_floating_point() else v
                for k, v in unique_state_dict(module).items()}
        tensors.update(part)
        parts[prefix] = part
        meta[f"{prefix}_arch"] = architecture_of(module, prefix).name
        meta[f"{prefix}_config"] = json.dumps(module.cfg.to_dict())
    if text_encoder:
        meta["text_encoder"] = text_encoder
    if scales:
        meta["scales"] = json.dumps([list(s) for s in scales])
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    # Checked as the file is read (svare_core.models.registry): a corrupted copy is refused, not loaded.
    for prefix, part in parts.items():
        meta[f"{prefix}_checksum"] = content_checksum(part, part_checksum_text(meta, prefix))
    meta["metadata_checksum"] = metadata_checksum(meta)
    return atomic_save_safetensors(tensors, path, meta)


def tensor_sha256(name: str, t: torch.Tensor) -> bytes:
    """SHA-256 of one tensor's name, dtype, shape and every byte (what a checksum knows of it)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


def combine_checksum(digests: dict[str, bytes], extra: str = "") -> str:
    """One checksum from per-tensor digests (any order: tensors stream in as a module lists them)
    and ``extra`` text (metadata the checksum covers too)."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(digests[name])
    h.update(extra.encode())
    return h.hexdigest()[:32]


def content_checksum(tensors: dict[str, torch.Tensor], extra: str = "") -> str:
    return combine_checksum({k: tensor_sha256(k, v) for k, v in tensors.items()}, extra)


def part_checksum_text(metadata: dict[str, str], part: str) -> str:
    """The metadata a part's checksum covers besides its tensors: its architecture and config."""
    return f"{metadata.get(part + '_arch', '')}|{metadata.get(part + '_config', '')}"


def is_checksum_key(key: str, metadata: dict[str, str]) -> bool:
    """The metadata keys that hold checksums: ``metadata_checksum`` and one ``{part}_checksum`` per part
    the file holds (named exactly, so a key whose name a bit flip changed is covered, not skipped)."""
    return key == "metadata_checksum" or (key.endswith("_checksum") and f"{key[:-len('_checksum')]}_config" in metadata)


def metadata_checksum(metadata: dict[str, str]) -> str:
    """Checksum of a svare file's metadata other than the checksums themselves."""
    body = {k: v for k, v in metadata.items() if not is_checksum_key(k, metadata)}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


FINGERPRINT_SAMPLES = 4096


def sample_indices(numel: int, samples: int = FINGERPRINT_SAMPLES) -> torch.Tensor:
    """``samples`` evenly spread flat indices of a tensor, first and last included.

    Integer arithmetic: float32 index maths (``linspace(...).long()``) is inexact above 2**24
    elements and ran past the end of the 2B's 25M-element tensors.
    """
    m = min(samples, numel)
    if m <= 1:
        return torch.zeros(m, dtype=torch.long)
    return torch.arange(m, dtype=torch.long) * (numel - 1) // (m - 1)


def tensor_digest(name: str, t: torch.Tensor, *, exact: bool = False) -> bytes:
    """What a fingerprint knows of one tensor: its name, shape and a strided sample of its values.

    By default floating values are rounded to bf16 before hashing, so the same weights stored or
    loaded in fp32 or bf16 get one digest (a patch made on a bf16 copy applies to the fp32 release).
    ``exact``: hash the sampled values as they are, and the dtype (caches of model outputs).
    """
    h = hashlib.sha256(f"{name}{tuple(t.shape)}{t.dtype if exact else ''}".encode())
    flat = t.detach().reshape(-1)
    if flat.numel():
        values = flat[sample_indices(flat.numel()).to(flat.device)]
        if not exact:
            values = values.to(torch.bfloat16).float() if values.is_floating_point() else values.long()
        elif values.dtype == torch.bfloat16:
            values = values.view(torch.int16)   # numpy has no bfloat16
        h.update(values.cpu().numpy().tobytes())
    return h.digest()


def combine_digests(digests: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for k in sorted(digests):
        h.update(digests[k])
    return h.hexdigest()[:16]


def state_dict_fingerprint(state: dict[str, torch.Tensor], *, exact: bool = False) -> str:
    """A short content hash of a state dict: names, shapes and 4096 values a tensor, spread over it.

    Sampling keeps this cheap on multi-GB models (milliseconds a tensor) while a retrained or
    different model changes every sampled value. Default: the identity of a model's weights
    whatever precision holds them (base models of patches); ``exact``: of these very tensors.
    """
    return combine_digests({k: tensor_digest(k, v, exact=exact) for k, v in state.items()})
