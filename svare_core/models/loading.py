"""Recognise a checkpoint by its keys, infer its architecture from tensor shapes, load it safely.

One registry of families; each detector looks at key names only, each config reader at shapes
only, so a user just points at a file. Pickled files are read with ``weights_only=True``.
"""
from __future__ import annotations

import ctypes
import json
import math
import mmap
import re
import struct
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .format import FORMAT, combine_digests, tensor_digest
from .infinity import Infinity, InfinityConfig
from .vae import BSQVAE, VAEConfig


class ModelLoadError(ValueError):
    """A model file that cannot be used; the message names the file, the problem and the fix."""


# -- reading files ---------------------------------------------------------------------------------
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
    except Exception as e:  # noqa: BLE001 - every reader fails differently on a broken file
        raise ModelLoadError(f"{path}: cannot be read ({type(e).__name__}: {e}). The file is corrupt, truncated or "
                             "not a model file: download it again or check the path") from e
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


# -- families ------------------------------------------------------------------------------------------
@dataclass
class Family:
    name: str
    description: str
    detect: Callable[[Checkpoint], bool]
    read_config: Callable[[Checkpoint], object] | None = None   # None: recognised but not supported yet


def _has(ckpt: Checkpoint, *keys: str) -> bool:
    return all(k in ckpt.state for k in keys)


def _shape(ckpt: Checkpoint, key: str) -> tuple[int, ...]:
    return tuple(ckpt.state[key].shape)


def infinity_config_from_shapes(ckpt: Checkpoint) -> InfinityConfig:
    blocks = sorted({(int(m[1]), int(m[2])) for k in ckpt.state
                     if (m := re.match(r"block_chunks\.(\d+)\.module\.(\d+)\.", k))})
    C, bits = _shape(ckpt, "word_embed.weight")
    return InfinityConfig(
        depth=len(blocks), embed_dim=C, num_heads=_shape(ckpt, "block_chunks.0.module.0.sa.scale_mul_1H11")[1],
        text_dim=_shape(ckpt, "text_norm.weight")[0], bits=bits,
        ffn_dim=_shape(ckpt, "block_chunks.0.module.0.ffn.fc1.weight")[0],
        num_block_chunks=len({c for c, _ in blocks}), num_levels=_shape(ckpt, "lvl_embed.weight")[0],
        text_max_len=_shape(ckpt, "cfg_uncond")[0], pool_heads=_shape(ckpt, "text_proj_for_sos.ca.mat_q")[1])


_PLAIN_CONVS = {"conv_in", "conv_out", "conv1", "conv2", "nin_shortcut"}
_PLAIN_NORMS = {"norm1", "norm2", "norm_out"}


def vae_key_map(keys) -> dict[str, str]:
    """Our VAE key -> the file's key. Accepts plain (``conv1.weight``) and wrapped
    (``conv1.conv.weight``) layer names; drops the ``quantize.*`` alias of ``quantizer.*``."""
    out = {}
    for k in keys:
        if k.startswith("quantize."):
            continue
        *mod, param = k.split(".")
        resample_conv = len(mod) > 1 and mod[-1] == "conv" and mod[-2] in ("downsample", "upsample")
        if mod and (mod[-1] in _PLAIN_CONVS or resample_conv):
            mod.append("conv")
        elif mod and mod[-1] in _PLAIN_NORMS:
            mod.append("norm")
        out[".".join(mod + [param])] = k
    return out


def normalise_vae_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {new: state[old] for new, old in vae_key_map(state).items()}


def vae_config_from_shapes(ckpt: Checkpoint) -> VAEConfig:
    state = normalise_vae_keys(ckpt.state)
    ch = state["encoder.conv_in.conv.weight"].shape[0]
    levels = sorted({int(m[1]) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    mult = tuple(state[f"encoder.down.{i}.block.0.conv1.conv.weight"].shape[0] // ch for i in levels)
    n_blocks = len({int(m[1]) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    z = state["encoder.conv_out.conv.weight"].shape[0]
    # GroupNorm's group count is not in the weights: released VAEs use 32 (24 where 32 does not divide).
    return VAEConfig(ch=ch, ch_mult=mult, num_res_blocks=n_blocks, z_channels=z, norm_groups=32)


FAMILIES: list[Family] = [
    Family("infinity", "Infinity text-to-image transformer (bitwise tokens)",
           lambda c: _has(c, "word_embed.weight", "text_proj_for_sos.ca.mat_q",
                          "block_chunks.0.module.0.sa.mat_qkv.weight"),
           infinity_config_from_shapes),
    Family("infinity-vae", "Infinity BSQ VAE",
           lambda c: any(k in c.state for k in ("encoder.conv_in.conv.weight", "encoder.conv_in.weight"))
           and any(k.startswith("decoder.up.") for k in c.state)
           and not any(k.startswith("quantize.embedding") for k in c.state),
           vae_config_from_shapes),
    Family("var", "VAR class-conditional ImageNet transformer (FoundationVision/VAR)",
           lambda c: _has(c, "class_emb.weight", "blocks.0.attn.mat_qkv.weight")),
    Family("var-vqvae", "VAR multi-scale VQVAE (vocabulary 4096)",
           lambda c: _has(c, "quantize.embedding.weight", "post_quant_conv.weight")),
]


@dataclass
class ModelInfo:
    path: Path
    family: str
    description: str
    config: dict
    num_params: int
    supported: bool
    components: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.path}", f"  family: {self.family} ({self.description})",
                 f"  parameters: {self.num_params:,}", f"  supported: {'yes' if self.supported else 'not yet'}"]
        for k, v in self.config.items():
            lines.append(f"  {k}: {v}")
        return "\n".join(lines)


def identify(ckpt: Checkpoint) -> Family:
    if ckpt.metadata.get("format") == FORMAT:
        return Family("svare", "svare model file (configs in metadata)", lambda c: True, None)
    for fam in FAMILIES:
        if fam.detect(ckpt):
            return fam
    sample = ", ".join(sorted(ckpt.state)[:6])
    raise ModelLoadError(
        f"{ckpt.path}: not a model this pack knows (keys start with: {sample}). Expected one of: "
        + "; ".join(f"{f.name} ({f.description})" for f in FAMILIES) + "; or a svare .safetensors file")


def inspect_file(path: str | Path) -> ModelInfo:
    """What a file is: family, inferred config, parameter count; raises ModelLoadError if unusable."""
    ckpt = read_checkpoint(path)
    fam = identify(ckpt)
    n = sum(t.numel() for k, t in ckpt.state.items() if t.is_floating_point())
    if fam.name == "svare":
        config = {k: json.loads(v) for k, v in ckpt.metadata.items() if k.endswith("_config")}
        comps = [k[: -len("_config")] for k in config]
        return ModelInfo(Path(path), "svare", fam.description, config, n, True, comps)
    if fam.read_config is None:
        return ModelInfo(Path(path), fam.name, fam.description, {}, n, False)
    cfg = fam.read_config(ckpt)
    return ModelInfo(Path(path), fam.name, fam.description, cfg.to_dict(), n, True,
                     ["transformer" if fam.name == "infinity" else "vae"])


# -- building modules ------------------------------------------------------------------------------
def _few(keys: list[str]) -> str:
    return f"{keys[:5]}{' ...' if len(keys) > 5 else ''} ({len(keys)})"


def _free_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can still take on ``device``, or None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                info = dict(line.split(":", 1) for line in f)
            return int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return None
    return None


def check_fits(nbytes: int, device: torch.device | str, what: str) -> None:
    """Refuse, before allocating, a load that cannot fit in free RAM or VRAM."""
    device = torch.device(device)
    free = _free_bytes(device)
    if free is not None and nbytes > free:
        where = "GPU memory" if device.type == "cuda" else "RAM"
        raise ModelLoadError(
            f"{what} needs {nbytes / 1e9:.1f} GB of {where} but only {free / 1e9:.1f} GB are free on {device}: "
            + ("load it in bf16 or fp16, or free GPU memory (other models, other programs)" if device.type == "cuda"
               else "load it in bf16 (half the memory of fp32), load it onto the GPU, or close other programs"))


def _build(module_cls, cfg, ckpt: Checkpoint, names: dict[str, str], device, dtype):
    """Build ``module_cls(cfg)`` on the meta device and fill it one source tensor at a time.

    ``names``: module key -> checkpoint key. Each tensor is read, checked, cast and moved to
    ``device`` as it arrives, so no full-precision copy of the model ever exists; peak memory is
    the model in ``dtype`` plus the largest source tensor. The model's ``source_fingerprint`` is
    the fingerprint of what was read (the same whatever ``dtype`` it was loaded in).
    """
    path = ckpt.path
    with torch.device("meta"):
        module = module_cls(cfg)
    if dtype is not None:
        module = module.to(dtype)
    expected = {k: v for k, v in module.state_dict().items() if not k.startswith("quantize.")}
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(set(names) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(f"{path}: does not match the inferred {module_cls.__name__} architecture: "
                             f"missing keys {_few(missing)}, unexpected keys {_few(unexpected)}. "
                             "The file is incomplete or from another model.")
    bad = [(k, tuple(ckpt.state[names[k]].shape), tuple(v.shape)) for k, v in expected.items()
           if tuple(ckpt.state[names[k]].shape) != tuple(v.shape)]
    if bad:
        raise ModelLoadError(f"{path}: tensor shapes do not fit the inferred architecture, e.g. {bad[:3]}")
    device = torch.device(device)
    check_fits(sum(v.numel() * v.element_size() for v in expected.values()), device,
               f"{path.name} ({module_cls.__name__} in {next(iter(expected.values())).dtype})")
    module = module.to_empty(device=device)
    digests = {}
    with torch.no_grad():
        for k, p in module.state_dict().items():
            if k.startswith("quantize."):
                continue
            src = ckpt.read(names[k])
            if src.is_floating_point() and not bool(torch.isfinite(src).all()):
                raise ModelLoadError(f"{path}: tensor {names[k]} holds NaN or infinite values; the file is corrupt "
                                     "(or the model diverged when it was trained): download it again")
            p.copy_(src)
            digests[k] = tensor_digest(k, src)
            ckpt.release(names[k])
            del src
    module.eval()
    module.source_fingerprint = combine_digests(digests)
    return module


def _svare_names(ckpt: Checkpoint, part: str, config_cls, what: str) -> tuple[object, dict[str, str]]:
    """(config, module key -> file key) of one part of a svare file: the JSON config in metadata
    ``{part}_config`` and the tensors under ``{part}.``."""
    if f"{part}_config" not in ckpt.metadata:
        raise ModelLoadError(f"{ckpt.path}: this svare file holds no {what}")
    try:
        cfg = config_cls.from_dict(json.loads(ckpt.metadata[f"{part}_config"]))
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{ckpt.path}: its {what} config in the metadata is malformed ({e}); "
                             "the file is corrupt or was edited: save it again") from e
    prefix = f"{part}."
    return cfg, {k[len(prefix):]: k for k in ckpt.state if k.startswith(prefix)}


def transformer_layout(ckpt: Checkpoint) -> tuple[InfinityConfig, dict[str, str]]:
    """The Infinity config a checkpoint holds and its module key -> file key map (no values read)."""
    fam = identify(ckpt)
    if fam.name == "svare":
        return _svare_names(ckpt, "transformer", InfinityConfig, "transformer")
    if fam.name == "infinity":
        return infinity_config_from_shapes(ckpt), {k: k for k in ckpt.state}
    raise ModelLoadError(f"{ckpt.path}: is a {fam.description}, not an Infinity transformer")


def load_transformer(path: str | Path | Checkpoint, *, device="cpu", dtype: torch.dtype | None = torch.float32
                     ) -> Infinity:
    """Load an Infinity transformer (released .pth / sharded safetensors, or a svare file), streaming.
    ``path`` may be a Checkpoint already opened with read_checkpoint."""
    ckpt = path if isinstance(path, Checkpoint) else read_checkpoint(path)
    cfg, names = transformer_layout(ckpt)
    return _build(Infinity, cfg, ckpt, names, device, dtype)


def load_vae(path: str | Path, *, device="cpu", dtype: torch.dtype | None = torch.float32,
             token_bits: int | None = None) -> BSQVAE:
    """Load a VAE. ``token_bits``: the bits per token of the transformer it will serve; a raw
    Infinity VAE whose latent is narrower is patchified to fit (Infinity-8B: 14 channels, 2x2)."""
    ckpt = read_checkpoint(path)
    fam = identify(ckpt)
    if fam.name == "svare":
        cfg, names = _svare_names(ckpt, "vae", VAEConfig, "VAE")
    elif fam.name == "infinity-vae":
        cfg, names = vae_config_from_shapes(ckpt), vae_key_map(ckpt.state)
        if token_bits is not None:
            cfg.patch_size = next((p for p in (1, 2, 4) if cfg.z_channels * p * p == token_bits), 0)
    else:
        raise ModelLoadError(f"{path}: is a {fam.description}, not an Infinity BSQ VAE")
    if token_bits is not None and cfg.bits != token_bits:
        raise ModelLoadError(f"{path}: this VAE makes {cfg.z_channels}-channel latents, which do not fit a transformer "
                             f"with {token_bits}-bit tokens: choose the VAE released with that transformer "
                             "(Infinity-2B: infinity_vae_d32reg.pth; Infinity-8B: infinity_vae_d56_f8_14_patchify.pth)")
    return _build(BSQVAE, cfg, ckpt, names, device, dtype)
