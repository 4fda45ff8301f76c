"""The architectures this pack knows, and loading any of them from a file.

Each architecture lives in a module of its own (``arch_*.py``, listed in ``BUILTIN``) and declares
what it is: which part of a pipeline it fills, how to tell its files by their key names, and how
to read its config from the tensor shapes. This module knows none of them by name: it asks each
in turn whether a file is its, and builds whatever module the one that says yes describes.

The project's own svare file (svare_core.models.format) is a container, not an architecture: its
metadata names the architecture and config of each part it holds, its tensors sit under the
part's prefix.

Adding an architecture: write ``arch_<name>.py`` with an ``ARCHITECTURES`` tuple and add its module
path to ``BUILTIN``; outside this package, a plug-in registers it (kind "architecture"), or call
:func:`register`.
"""
from __future__ import annotations

import importlib
import json
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from .. import plugins
from .checkpoint import Checkpoint, ModelLoadError, read_checkpoint
from .format import (DEFAULT_PART_ARCHS, FORMAT, combine_checksum, combine_digests, metadata_checksum,
                     part_checksum_text, tensor_digest, tensor_sha256)

__all__ = ["Architecture", "Layout", "ModelInfo", "ModelLoadError", "PARTS", "architecture_of", "architectures",
           "build", "check_fits", "get", "has_part", "identify", "inspect_file", "layout_of", "load_transformer",
           "load_vae", "register"]

# The slots of a pipeline an architecture can fill, and how messages name them.
PARTS = {"transformer": "transformer", "vae": "VAE"}

BUILTIN = ("svare_core.models.arch_infinity", "svare_core.models.arch_infinity_vae", "svare_core.models.arch_switti",
           "svare_core.models.arch_var")


@dataclass(frozen=True)
class Architecture:
    """One kind of model file: how to recognise it and what to build from it.

    ``detect`` looks at key names only; ``layout`` reads the config from tensor shapes only and
    maps each key of the built module to the file's key (no values are read). An architecture
    without ``layout`` is recognised, so that a user is told what the file is, but not loadable.
    Configs have ``to_dict`` and ``from_dict`` (svare files store them as JSON); what a pipeline
    reads of them: a transformer's ``text_dim``, ``bits`` and ``scales``, a VAE's ``bits`` and
    ``z_channels``.
    """
    name: str
    description: str                                 # "Infinity BSQ VAE": messages say "is an Infinity BSQ VAE"
    part: str                                        # a key of PARTS
    detect: Callable[[Checkpoint], bool]
    layout: Callable[[Checkpoint], tuple[Any, dict[str, str]]] | None = None
    module: type[torch.nn.Module] | None = None      # built as module(config)
    config_class: type | None = None
    # VAEs only: the config the shapes gave, set to serve tokens of this many bits where the weights
    # do not tell how (a 14-channel latent read as 2x2 patches for 56-bit tokens).
    fit_tokens: Callable[[Any, int], Any] | None = None
    # Transformers only, when their text encoder is not one Hugging Face folder (Infinity's Flan-T5):
    # the parts a user names, in order (Switti: clip_l, clip_g), and how to load them:
    # text_encoder(parts, device=, dtype=, offload=) -> an encoder with .width and .encode(prompts).
    text_parts: tuple[str, ...] = ()
    text_encoder: Callable[..., Any] | None = None
    family: str | None = None                        # transformers: whose default settings apply (svare_core.settings)

    @property
    def supported(self) -> bool:
        return self.layout is not None


@dataclass(frozen=True)
class Layout:
    """Where one module lies in a file: its architecture, its config, module key -> file key."""
    arch: Architecture
    config: Any
    names: dict[str, str]
    recorded: bool = False                           # config from a svare file's metadata, not from shapes


# -- the registry --------------------------------------------------------------------------------------
_architectures: list[Architecture] = []
_loaded = False
_lock = threading.Lock()


def _add(arch: Architecture) -> None:
    if arch.part not in PARTS:
        raise ValueError(f"architecture {arch.name!r}: part {arch.part!r} is not one of {list(PARTS)}")
    if arch.supported and (arch.module is None or arch.config_class is None):
        raise ValueError(f"architecture {arch.name!r}: a loadable architecture needs its module and config_class")
    if any(a.name == arch.name for a in _architectures):
        raise ValueError(f"an architecture named {arch.name!r} is already registered")
    _architectures.append(arch)


def _load_builtin() -> None:
    # Imported on first use, not at import time: the architecture modules import this one.
    global _loaded
    if _loaded:
        return
    with _lock:
        if not _loaded:
            # All imported before any is added: a failed import leaves the registry empty, not half full.
            # Then those plug-ins bring (svare_core.plugins, kind "architecture").
            found = [arch for module in BUILTIN for arch in importlib.import_module(module).ARCHITECTURES]
            found += [plugins.get("architecture", name) for name in plugins.names("architecture")]
            for arch in found:
                _add(arch)
            _loaded = True


def register(arch: Architecture) -> Architecture:
    """Add an architecture; files are offered to the built-in ones first, then in registration order."""
    _load_builtin()
    _add(arch)
    return arch


def architectures() -> list[Architecture]:
    _load_builtin()
    return list(_architectures)


def get(name: str) -> Architecture | None:
    """The registered architecture called ``name``."""
    return next((a for a in architectures() if a.name == name), None)


def architecture_of(module: torch.nn.Module, part: str) -> Architecture:
    """The registered ``part`` architecture a module is built by (the nearest class up its MRO)."""
    archs = [a for a in architectures() if a.part == part and a.supported]
    for cls in type(module).__mro__:
        for arch in archs:
            if arch.module is cls:
                return arch
    raise ValueError(f"{type(module).__name__} is not the module of a registered {PARTS[part]} architecture "
                     f"({[a.name for a in archs]}): register its architecture first")


def _a(description: str) -> str:
    return f"{'an' if description[:1].lower() in 'aeiou' else 'a'} {description}"


# -- what a file holds ---------------------------------------------------------------------------------
def is_svare_file(ckpt: Checkpoint) -> bool:
    return ckpt.metadata.get("format") == FORMAT


def svare_parts(ckpt: Checkpoint) -> list[str]:
    """The parts a svare file holds, in PARTS order."""
    return [p for p in PARTS if f"{p}_config" in ckpt.metadata]


def identify(ckpt: Checkpoint) -> Architecture:
    """The architecture of a checkpoint, from its key names alone."""
    if is_svare_file(ckpt):
        raise ModelLoadError(f"{ckpt.path}: is a svare file holding {svare_parts(ckpt)}, not one architecture's "
                             "checkpoint: ask for one of its parts (layout_of)")
    known = architectures()
    for arch in known:
        if arch.detect(ckpt):
            return arch
    sample = ", ".join(sorted(ckpt.state)[:6])
    raise ModelLoadError(
        f"{ckpt.path}: not a model this pack knows (keys start with: {sample}). Expected one of: "
        + "; ".join(f"{a.name} ({a.description})" for a in known) + "; or a svare .safetensors file")


def has_part(ckpt: Checkpoint, part: str) -> bool:
    """Whether the file holds a ``part`` ("transformer", "vae"); raises if it is no model at all."""
    if is_svare_file(ckpt):
        return part in svare_parts(ckpt)
    return identify(ckpt).part == part


def layout_of(ckpt: Checkpoint, part: str) -> Layout:
    """The ``part`` ("transformer", "vae") a file holds, laid out for building; no values read."""
    if is_svare_file(ckpt):
        return _svare_layout(ckpt, part)
    arch = identify(ckpt)
    if arch.part != part:
        wanted = [_a(a.description) for a in architectures() if a.part == part and a.supported]
        raise ModelLoadError(f"{ckpt.path}: is {_a(arch.description)}, not "
                             + (" or ".join(wanted) or _a(PARTS[part])))
    if not arch.supported:
        raise ModelLoadError(f"{ckpt.path}: is {_a(arch.description)}, which this pack recognises but cannot load yet")
    try:
        config, names = arch.layout(ckpt)
    except ModelLoadError:
        raise
    except (KeyError, IndexError, ValueError, TypeError) as e:
        # Detection saw the family's keys, but the shapes cannot give a config (a corrupted or cut file).
        raise ModelLoadError(f"{ckpt.path}: looks like {_a(arch.description)} but its tensors do not give a "
                             f"consistent architecture ({type(e).__name__}: {e}); the file is corrupt or incomplete: "
                             "download it again") from e
    return Layout(arch, config, names)


def _svare_layout(ckpt: Checkpoint, part: str) -> Layout:
    """A part of a svare file: its architecture and JSON config in the metadata (``{part}_arch``,
    ``{part}_config``), its tensors under ``{part}.``."""
    what = PARTS[part]
    recorded = ckpt.metadata.get("metadata_checksum")
    if recorded is not None and metadata_checksum(ckpt.metadata) != recorded:
        raise ModelLoadError(f"{ckpt.path}: its metadata does not match the checksum the file records: the file was "
                             "corrupted or edited. Get a fresh copy")
    if f"{part}_config" not in ckpt.metadata:
        raise ModelLoadError(f"{ckpt.path}: this svare file holds no {what}")
    name = ckpt.metadata.get(f"{part}_arch", DEFAULT_PART_ARCHS[part])
    arch = get(name)
    if arch is None or arch.part != part or not arch.supported:
        known = [a.name for a in architectures() if a.part == part and a.supported]
        raise ModelLoadError(f"{ckpt.path}: its {what} is of the architecture {name!r}, which this pack cannot load "
                             f"(it loads {known}): update svare, or install the plug-in that adds {name!r}")
    try:
        config = arch.config_class.from_dict(json.loads(ckpt.metadata[f"{part}_config"]))
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{ckpt.path}: its {what} config in the metadata is malformed ({e}); "
                             "the file is corrupt or was edited: save it again") from e
    prefix = f"{part}."
    return Layout(arch, config, {k[len(prefix):]: k for k in ckpt.state if k.startswith(prefix)}, recorded=True)


@dataclass
class ModelInfo:
    path: Path
    family: str                                      # the architecture's name, or "svare" for a svare file
    description: str
    config: dict
    num_params: int
    supported: bool
    components: list[str] = field(default_factory=list)              # the parts it holds
    architectures: dict[str, str] = field(default_factory=dict)      # part -> architecture name

    def summary(self) -> str:
        lines = [f"{self.path}", f"  family: {self.family} ({self.description})",
                 f"  parameters: {self.num_params:,}", f"  supported: {'yes' if self.supported else 'not yet'}"]
        if self.architectures:
            lines.append("  parts: " + ", ".join(f"{p} ({a})" for p, a in self.architectures.items()))
        for k, v in self.config.items():
            lines.append(f"  {k}: {v}")
        return "\n".join(lines)


def inspect_file(path: str | Path) -> ModelInfo:
    """What a file is: architecture, inferred config, parameter count; raises ModelLoadError if unusable."""
    ckpt = read_checkpoint(path)
    n = sum(t.numel() for k, t in ckpt.state.items() if t.is_floating_point())
    if is_svare_file(ckpt):
        parts = svare_parts(ckpt)
        archs = {p: _svare_layout(ckpt, p).arch.name for p in parts}
        config = {f"{p}_config": json.loads(ckpt.metadata[f"{p}_config"]) for p in parts}
        return ModelInfo(Path(path), "svare", "svare model file (configs in metadata)", config, n, True, parts, archs)
    arch = identify(ckpt)
    if not arch.supported:
        return ModelInfo(Path(path), arch.name, arch.description, {}, n, False)
    found = layout_of(ckpt, arch.part)
    # What the module holds: buffers a layout drops (Switti's stored training mask) are not parameters.
    n = sum(ckpt.state[k].numel() for k in set(found.names.values()) if ckpt.state[k].is_floating_point())
    return ModelInfo(Path(path), arch.name, arch.description, found.config.to_dict(), n, True,
                     [arch.part], {arch.part: arch.name})


# -- building modules ----------------------------------------------------------------------------------
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


def _own_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without aliases: a submodule registered under two names (the BSQ VAE's quantizer)
    is filled once, under its first name. By identity, which works on the meta device too."""
    seen, out = set(), {}
    for k, v in module.state_dict(keep_vars=True).items():
        if id(v) not in seen:
            seen.add(id(v))
            out[k] = v
    return out


def build(ckpt: Checkpoint, found: Layout, *, device: torch.device | str = "cpu",
          dtype: torch.dtype | None = torch.float32) -> torch.nn.Module:
    """Build the module ``found`` describes on the meta device and fill it one source tensor at a time.

    Each tensor is read, checked, cast and moved to ``device`` as it arrives, so no full-precision
    copy of the model ever exists; peak memory is the model in ``dtype`` plus the largest source
    tensor. The model's ``source_fingerprint`` is the fingerprint of what was read (the same
    whatever ``dtype`` it was loaded in).
    """
    path, names, module_cls = ckpt.path, found.names, found.arch.module
    try:
        with torch.device("meta"):
            module = module_cls(found.config)
    except (TypeError, ValueError, ZeroDivisionError, RuntimeError) as e:
        raise ModelLoadError(f"{path}: its {PARTS[found.arch.part]} config does not describe a buildable "
                             f"{module_cls.__name__} ({type(e).__name__}: {e}); the file is corrupt or was edited") from e
    if dtype is not None:
        module = module.to(dtype)
    expected = _own_tensors(module)
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(set(names) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(f"{path}: does not match the inferred {type(module).__name__} architecture: "
                             f"missing keys {_few(missing)}, unexpected keys {_few(unexpected)}. "
                             "The file is incomplete or from another model.")
    bad = [(k, tuple(ckpt.state[names[k]].shape), tuple(v.shape)) for k, v in expected.items()
           if tuple(ckpt.state[names[k]].shape) != tuple(v.shape)]
    if bad:
        raise ModelLoadError(f"{path}: tensor shapes do not fit the inferred architecture, e.g. {bad[:3]}")
    device = torch.device(device)
    check_fits(sum(v.numel() * v.element_size() for v in expected.values()), device,
               f"{path.name} ({type(module).__name__} in {next(iter(expected.values())).dtype})")
    module = module.to_empty(device=device)
    digests, hashes = {}, {}
    part = found.arch.part
    expected_checksum = ckpt.metadata.get(f"{part}_checksum") if found.recorded else None
    if found.recorded and expected_checksum is None and "metadata_checksum" in ckpt.metadata:
        # A file that checksums its metadata checksums every part: a missing one was removed or damaged.
        raise ModelLoadError(f"{path}: records no checksum for its {PARTS[part]} although it checksums the rest; the "
                             "file was corrupted or edited. Get a fresh copy")
    with torch.no_grad():
        for k, p in _own_tensors(module).items():
            src = ckpt.read(names[k])
            if src.is_floating_point() and not bool(torch.isfinite(src).all()):
                raise ModelLoadError(f"{path}: tensor {names[k]} holds NaN or infinite values; the file is corrupt "
                                     "(or the model diverged when it was trained): download it again")
            p.copy_(src)
            digests[k] = tensor_digest(k, src)
            if expected_checksum is not None:
                hashes[names[k]] = tensor_sha256(names[k], src)
            ckpt.release(names[k])
            del src
    if expected_checksum is not None and \
            combine_checksum(hashes, part_checksum_text(ckpt.metadata, part)) != expected_checksum:
        raise ModelLoadError(f"{path}: its {PARTS[part]} does not match the checksum the file records: the file was "
                             "corrupted (in a download or on disk) or edited. Get a fresh copy")
    module.eval()
    module.source_fingerprint = combine_digests(digests)
    return module


def _open(path: str | Path | Checkpoint) -> Checkpoint:
    return path if isinstance(path, Checkpoint) else read_checkpoint(path)


def load_transformer(path: str | Path | Checkpoint, *, device: torch.device | str = "cpu",
                     dtype: torch.dtype | None = torch.float32) -> torch.nn.Module:
    """Load the transformer a file holds (a released checkpoint of a registered architecture, .pth
    or sharded safetensors, or a svare file), streaming. ``path`` may be an open Checkpoint."""
    ckpt = _open(path)
    return build(ckpt, layout_of(ckpt, "transformer"), device=device, dtype=dtype)


def load_vae(path: str | Path | Checkpoint, *, device: torch.device | str = "cpu",
             dtype: torch.dtype | None = torch.float32, token_bits: int | None = None) -> torch.nn.Module:
    """Load the VAE a file holds. ``token_bits``: the bits per token of the transformer it will
    serve; a released VAE whose latent is narrower is read in patches to fit where its
    architecture knows how (Infinity-8B's: 14 channels, 2x2)."""
    ckpt = _open(path)
    found = layout_of(ckpt, "vae")
    cfg = found.config
    if token_bits is not None and not found.recorded and found.arch.fit_tokens is not None:
        cfg = found.arch.fit_tokens(cfg, token_bits)
    if token_bits is not None and cfg.bits != token_bits:
        raise ModelLoadError(f"{ckpt.path}: this VAE makes {cfg.z_channels}-channel latents, which do not fit a transformer "
                             f"with {token_bits}-bit tokens: choose the VAE released with that transformer "
                             "(Infinity-2B: infinity_vae_d32reg.pth; Infinity-8B: infinity_vae_d56_f8_14_patchify.pth)")
    return build(ckpt, replace(found, config=cfg), device=device, dtype=dtype)
