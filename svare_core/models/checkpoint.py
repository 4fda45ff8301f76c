"""Opening model files without reading their weights: safetensors (one file or shards) and pickles.

A Checkpoint tells every tensor's name, shape and dtype at once and reads values one tensor at a
time, so recognising a file costs nothing and loading it never holds the whole file in memory.
Pickled files are read with ``weights_only=True``.
"""
from __future__ import annotations

import ctypes
import json
import math
import pickle
import mmap
import struct
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch


class ModelLoadError(ValueError):
    """A model file that cannot be used; the message names the file, the problem and the fix."""


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_MAX_HEADER = 100 * 2**20


@dataclass
class Checkpoint:
    """A model file opened without reading its weights.

    ``state`` tells every tensor's shape and dtype: meta tensors for safetensors files, tensors
    backed by a memory map for pickles. ``read`` returns one tensor's values; together with
    ``release`` a loader holds one source tensor at a time, never the whole file.
    """
    path: Path
    state: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    locations: dict[str, tuple[Path, int, int]] = field(default_factory=dict)   # safetensors: file, offset, bytes

    def has(self, *keys: str) -> bool:
        """Whether the file holds every one of ``keys``."""
        return all(k in self.state for k in keys)

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self.state:
            raise ModelLoadError(f"{self.path}: has no tensor {key!r}, which its architecture needs; the file is "
                                 "incomplete or corrupt: download it again")
        return tuple(self.state[key].shape)

    def read(self, key: str) -> torch.Tensor:
        """The values of ``key`` on the CPU, in the dtype the file stores."""
        if key not in self.locations:
            return self.state[key]
        file, offset, nbytes = self.locations[key]
        meta = self.state[key]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        # Plain reads, not a memory map: the page cache they go through is not this process's memory.
        with open(file, "rb") as f:
            f.seek(offset)
            if nbytes and f.readinto(memoryview(buf.numpy())) != nbytes:
                raise ModelLoadError(f"{file}: ends inside tensor {key}; the file is truncated: download it again")
        return buf.view(meta.dtype).reshape(meta.shape) if nbytes else torch.empty(meta.shape, dtype=meta.dtype)

    def read_element(self, key: str, index: int) -> float:
        """One value of ``key`` (at ``index`` of its flattened tensor), without reading the rest:
        enough to tell apart files whose tensors have the same shapes (Switti's mask buffers)."""
        meta = self.state[key]
        if not 0 <= index < meta.numel():
            raise IndexError(f"{key}: index {index} outside its {meta.numel()} values")
        if key not in self.locations:
            # by position, not reshape(-1): that would copy a strided (memory-mapped or expanded) tensor
            return float(meta[tuple(int(i) for i in torch.unravel_index(torch.tensor(index), meta.shape))])
        file, offset, _ = self.locations[key]
        size = meta.dtype.itemsize
        with open(file, "rb") as f:
            f.seek(offset + index * size)
            raw = f.read(size)
        if len(raw) != size:
            raise ModelLoadError(f"{file}: ends inside tensor {key}; the file is truncated: download it again")
        return float(torch.frombuffer(bytearray(raw), dtype=meta.dtype)[0])

    def release(self, key: str) -> None:
        """Give back the memory-mapped pages of ``key`` once its values are copied (pickles only)."""
        if key not in self.locations:
            _drop_mapped_pages(self.state[key])


def _drop_mapped_pages(t: torch.Tensor) -> None:
    """madvise(DONTNEED) on a memory-mapped tensor's pages: they stop counting as this process's
    memory and are read from the file again if touched. Linux only; elsewhere the OS reclaims them."""
    if _LIBC is None or t.device.type != "cpu" or not t.numel():
        return
    storage = t.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page   # whole pages inside this storage only
    if last > first:
        _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)   # MADV_DONTNEED


def _load_libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Open a .safetensors, sharded safetensors (index .json) or .pth/.pt/.ckpt file lazily."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a folder; give the model file itself (for sharded weights, "
                             "the model.safetensors.index.json inside it)")
    try:
        if path.suffix == ".json":
            return _read_sharded(path)
        if path.suffix == ".safetensors":
            state, locations, metadata = _read_safetensors_header(path)
            return Checkpoint(path, state, metadata, locations)
        if path.suffix in (".pth", ".pt", ".ckpt", ".bin"):
            # mmap only works on the zip format; older torch.save files are read whole (still weights-only)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
            return Checkpoint(path, _unwrap(obj, path))
    except ModelLoadError:
        raise
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False, which would run code from the file: never.
        raise ModelLoadError(f"{path}: cannot be read as plain weights (it is corrupt, or it holds code, which svare "
                             "never runs): download it again, or convert it to .safetensors") from e
    except Exception as e:  # noqa: BLE001 - every reader fails differently on a broken file
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise ModelLoadError(f"{path}: cannot be read ({type(e).__name__}: {reason}). The file is corrupt, truncated "
                             "or not a model file: download it again or check the path") from e
    raise ModelLoadError(f"{path}: unknown file type {path.suffix!r}; expected .safetensors, a sharded "
                         "model.safetensors.index.json, or .pth")


def _read_safetensors_header(path: Path):
    """Shapes, dtypes and byte ranges of a safetensors file, checked against its size; no values read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelLoadError(f"{path}: is empty or truncated (no safetensors header): download it again")
        n = struct.unpack("<Q", raw)[0]
        if n > min(_MAX_HEADER, size - 8):
            raise ModelLoadError(f"{path}: is not a safetensors file or is truncated (header of {n} bytes in a "
                                 f"{size}-byte file): download it again")
        header = json.loads(f.read(n))
    metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
    state, locations = {}, {}
    for key, info in header.items():
        dtype = _ST_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ModelLoadError(f"{path}: tensor {key} has the unsupported dtype {info.get('dtype')!r}")
        shape = tuple(int(d) for d in info["shape"])
        start, end = (int(o) for o in info["data_offsets"])
        nbytes = math.prod(shape) * dtype.itemsize
        if end - start != nbytes or start < 0 or 8 + n + end > size:
            raise ModelLoadError(f"{path}: tensor {key} lies outside the file or has the wrong size; the file is "
                                 "truncated or corrupt: download it again")
        state[key] = torch.empty(shape, dtype=dtype, device="meta")
        locations[key] = (path, 8 + n + start, nbytes)
    return state, locations, metadata


def _read_sharded(index_path: Path) -> Checkpoint:
    index = json.loads(index_path.read_text())
    weight_map = index.get("weight_map", {}) if isinstance(index, dict) else {}
    files = sorted(set(weight_map.values()))
    if not files:
        raise ModelLoadError(f"{index_path}: has no weight_map; expected a Hugging Face shard index")
    state: dict[str, torch.Tensor] = {}
    locations: dict[str, tuple[Path, int, int]] = {}
    for name in files:
        shard = (index_path.parent / name).resolve()
        if index_path.parent.resolve() not in shard.parents:
            raise ModelLoadError(f"{index_path}: names a shard outside its folder ({name}); the index is not trustworthy")
        if not shard.exists():
            raise ModelLoadError(f"{index_path}: shard {name} is missing; "
                                 f"download every shard into {index_path.parent}")
        s, loc, _ = _read_safetensors_header(shard)
        state.update(s)
        locations.update(loc)
    absent = sorted(k for k in weight_map if k not in state)
    if absent:
        raise ModelLoadError(f"{index_path}: the index names tensors no shard holds, e.g. {absent[:3]}; "
                             "a shard is from another download: download the shards again")
    return Checkpoint(index_path, state, {}, locations)


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """Released files nest the weights under "vae", "ema", "model", "state_dict" ..."""
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        if isinstance(obj, dict):
            for key in ("vae", "ema", "model", "state_dict", "module", "trainer"):
                if key in obj and isinstance(obj[key], dict):
                    obj = obj[key]
                    break
            else:
                break
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise ModelLoadError(f"{path}: holds no state dict of tensors (found {type(obj).__name__})")
