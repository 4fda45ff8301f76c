"""Resolve what a user names ("toyworld", a file, a folder) into a ready VARPipeline."""
from __future__ import annotations

import json
import threading
import weakref
from pathlib import Path

import torch

from .models.checkpoint import Checkpoint, ModelLoadError, read_checkpoint
from .models.registry import has_part, layout_of, load_transformer, load_vae
from .models.text import TextEncoder, minilm_path
from .pipeline import VARPipeline
from . import memory, plugins

TEXT_ENCODERS = {"minilm": minilm_path}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A bundled model name or a file path -> an existing file."""
    key = str(name_or_path)
    bundled = plugins.get("bundled_model", key)
    if bundled is not None:
        path = Path(bundled)
        if not path.exists():
            raise ModelLoadError(f"the bundled model {key!r} is missing at {path}: reinstall the package")
        return path
    path = Path(key).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file. Give a model file (.safetensors, .pth, a shard index .json) "
                             f"or one of the bundled names {plugins.names('bundled_model')}")
    return path


def _resolve_text_encoder(spec: str | Path | None, path: Path) -> Path:
    if spec is None:
        raise ModelLoadError(f"{path}: needs a text encoder: give the folder of its Hugging Face text encoder "
                             "(Infinity: google/flan-t5-xl)")
    spec = str(spec)
    if spec in TEXT_ENCODERS:
        return TEXT_ENCODERS[spec]()
    return Path(spec).expanduser()


def load_pipeline(model: str | Path = "toyworld", *, vae: str | Path | None = None,
                  text_encoder: str | Path | tuple | list | None = None, device: str | torch.device = "cpu",
                  dtype: str | torch.dtype = "fp32", vae_device: str | torch.device | None = None,
                  text_device: str | torch.device = "cpu", text_dtype: str | torch.dtype | None = None,
                  text_offload: bool = False) -> VARPipeline:
    """Load a text-to-image VAR model.

    ``model``: "toyworld" (bundled), a svare .safetensors file (may hold the VAE too), or a
    released transformer checkpoint of a registered architecture (svare_core.models.registry), e.g.
    Infinity's (.pth or a sharded .safetensors index), which then needs ``vae`` and
    ``text_encoder`` (Infinity: a local folder of google/flan-t5-xl; Switti: ``(clip_l, clip_g)``
    folders or files, plus a CLIP tokenizer folder as a third entry for files, e.g. ComfyUI's
    clip_l.safetensors / clip_g.safetensors and comfy/sd1_tokenizer). The VAE and text encoder may stay on
    the CPU while the transformer runs on the GPU (``vae_device``, ``text_device``).
    ``text_dtype``: None = bf16 for Flan-T5 (fp32 for the toy model's small encoder); ``text_offload``:
    the text encoder lives on the CPU and moves to ``text_device`` only to encode prompts.

    Weights stream in one tensor at a time, cast to ``dtype`` as they are read: loading Infinity-2B
    in bf16 needs about its bf16 size in RAM, not the fp32 file's (docs/benchmarks.md, "Real size").
    """
    # Weights made under inference_mode (ComfyUI runs every node in it) could never be fine-tuned
    # without a full copy; loading outside it keeps erasure able to share them.
    with torch.inference_mode(False):
        return _load_pipeline(model, vae, text_encoder, device, dtype, vae_device, text_device, text_dtype, text_offload)


def _dtype(value, what: str) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ModelLoadError(f"unknown {what} {value!r}: choose one of {sorted(DTYPES)}")
    return DTYPES[value]


def check_device(value: str | torch.device, what: str = "device") -> torch.device:
    """A device this machine has; anything else is refused in one line (not torch's assertion)."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"unknown {what} {value!r}: use cpu or cuda (cuda:1 for a second GPU)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"{what} {str(value)!r}: this machine has no usable CUDA GPU, or this torch build "
                                 f"has no CUDA (torch {torch.__version__}): use cpu, or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(f"{what} {str(value)!r}: only {torch.cuda.device_count()} GPU(s) here "
                                 f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    elif device.type not in ("cpu", "mps"):
        raise ModelLoadError(f"{what} {str(value)!r}: not supported; use cpu or cuda")
    return device


def _load_pipeline(model, vae, text_encoder, device, dtype, vae_device, text_device, text_dtype,
                   text_offload) -> VARPipeline:
    dtype = _dtype(dtype, "dtype")
    device = check_device(device)
    vae_device = check_device(vae_device, "vae_device") if vae_device is not None else None
    text_device = check_device(text_device, "text_device")
    path = resolve_model_path(model)
    # Everything that can be checked in seconds is, before minutes of loading.
    ckpt = read_checkpoint(path)                # opened once: checked here, then loaded
    meta = ckpt.metadata
    arch = layout_of(ckpt, "transformer").arch
    vae_path = resolve_model_path(vae) if vae is not None else (path if has_part(ckpt, "vae") else None)
    if vae_path is None:
        raise ModelLoadError(f"{path}: holds no VAE: give its VAE file too (Infinity-2B: infinity_vae_d32reg.pth, "
                             "Infinity-8B: infinity_vae_d56_f8_14_patchify.pth, Switti: VQVAE-Switti's model.safetensors)")
    # One Hugging Face folder (Flan-T5, the toy models' MiniLM), or a svare file naming one: the toy VQ
    # model is a Switti whose text is MiniLM's, pooled as the file says.
    one_tower = arch.text_encoder is None or ("text_encoder" in meta and not isinstance(text_encoder, (list, tuple)))
    if one_tower:
        text_name = str(text_encoder or meta.get("text_encoder") or "")
        text_paths = [_resolve_text_encoder(text_name or None, path)]
        _check_text_width(ckpt, text_paths[0])
    else:                                       # the architecture's own encoders (Switti: clip_l + clip_g)
        text_name, text_paths = None, _text_parts(arch, text_encoder, path)
    vae_device = vae_device or device
    # A host sharing the GPU (ComfyUI) makes room before the weights arrive.
    memory.before_load(_load_sizes(ckpt, dtype, device, vae_path if vae_path != path else None, vae_device,
                                   text_paths, "cpu" if text_offload else text_device))
    transformer = load_transformer(ckpt, device=device, dtype=dtype)
    # The VAE is small and precision-sensitive: it stays in fp32 unless it shares the GPU.
    vae_model = load_vae(vae_path, device=vae_device, token_bits=getattr(transformer.cfg, "bits", None),
                         dtype=dtype if str(vae_device) != "cpu" else torch.float32)
    if one_tower:
        text = TextEncoder(text_paths[0], device=text_device, dtype=_dtype(text_dtype, "text_dtype"),
                           offload=text_offload, pooling=meta.get("text_pooling"))
    else:
        text = arch.text_encoder(text_paths, device=text_device, dtype=_dtype(text_dtype, "text_dtype"),
                                 offload=text_offload)
        _check_pooled_width(transformer, text, text_paths)
    scales = getattr(transformer.cfg, "scales", None) or None
    name = str(model) if plugins.get("bundled_model", str(model)) is not None else path.stem
    if name == "model" and arch.family is not None and "format" not in meta:
        name = path.parent.name or name          # a release's model.safetensors (Switti): its folder names it
    # A svare file says which family it belongs to; a released checkpoint's architecture does.
    family = meta.get("family") or arch.family or "infinity"
    try:
        return VARPipeline(transformer, vae_model, text, name=name, family=family, scales=scales,
                           text_encoder_name=text_name)
    except ValueError as e:                      # a VAE or text encoder of another model: one line
        raise ModelLoadError(f"{path}: {e}") from None


def _text_parts(arch, spec, path: Path) -> list[Path]:
    """The files or folders of an architecture's text encoders, each checked to exist, in its order."""
    parts = list(spec) if isinstance(spec, (list, tuple)) else [] if spec is None else [spec]
    need = arch.text_parts
    if len(parts) not in (len(need), len(need) + 1):
        raise ModelLoadError(f"{path}: a {arch.description} reads {len(need)} text encoders: give "
                             f"text_encoder=({', '.join(need)}) (folders or files; files also need a CLIP tokenizer "
                             f"folder as a last entry), got {len(parts)}")
    out = []
    for role, part in zip((*need, "tokenizer"), parts):
        p = Path(str(part)).expanduser()
        if not p.exists():
            raise ModelLoadError(f"{role}: {p} does not exist: give its folder or weights file")
        out.append(p)
    return out


def _check_pooled_width(transformer, text, paths: list[Path]) -> None:
    want, got = getattr(transformer.cfg, "pooled_dim", None), getattr(text, "pooled_width", None)
    if want is not None and got != want:
        where = paths[1] if len(paths) > 1 else paths[0]          # clip_g gives the pooled vector
        raise ModelLoadError(f"{where}: gives a pooled vector {got} wide but the transformer reads {want}: "
                             "pair Switti with the released CLIP ViT-L/14 and OpenCLIP bigG towers")


def load_switti(model: str | Path, vae: str | Path, *, device: str | torch.device = "cpu",
                dtype: str | torch.dtype = "fp32", vae_device: str | torch.device | None = None):
    """Switti's transformer and its VQ-VAE (VQVAE-Switti), streamed one tensor at a time as Infinity's
    are, with the same memory checks; returns (transformer, vae). Which variant (default or AR) the
    transformer is comes from its stored mask."""
    with torch.inference_mode(False):
        dtype = _dtype(dtype, "dtype")
        device = check_device(device)
        vae_device = check_device(vae_device, "vae_device") if vae_device is not None else device
        path, vae_path = resolve_model_path(model), resolve_model_path(vae)
        ckpt = read_checkpoint(path)
        found = layout_of(ckpt, "transformer")
        if found.arch.name != "switti":
            raise ModelLoadError(f"{path}: is {found.arch.description}, not a Switti transformer: use load_pipeline")
        vae_ckpt = read_checkpoint(vae_path)
        if layout_of(vae_ckpt, "vae").arch.name != "var-vqvae":
            raise ModelLoadError(f"{vae_path}: is not a VAR multi-scale VQ-VAE: Switti needs VQVAE-Switti's model.safetensors")
        sizes = _load_sizes(ckpt, dtype, device, vae_path, vae_device, [], "cpu")
        memory.before_load(sizes)
        transformer = load_transformer(ckpt, device=device, dtype=dtype)
        # The VAE is small and precision-sensitive: fp32 unless it shares the GPU.
        vae_model = load_vae(vae_ckpt, device=vae_device, dtype=dtype if str(vae_device) != "cpu" else torch.float32)
        t, v = transformer.cfg, vae_model.cfg
        if (t.vocab_size, t.code_dim) != (v.vocab_size, v.z_channels):
            raise ModelLoadError(f"{vae_path}: has {v.vocab_size} codes of width {v.z_channels} but {path.name} draws "
                                 f"{t.vocab_size} of width {t.code_dim}: use the VQ-VAE released with it (VQVAE-Switti)")
        return transformer, vae_model


def _check_text_width(ckpt: Checkpoint, text_path: Path) -> None:
    """A text encoder whose width the transformer cannot read is refused before anything loads."""
    try:
        config = json.loads((text_path / "config.json").read_text())
    except (OSError, ValueError):
        return                                   # TextEncoder names the problem with the folder
    width = config.get("d_model") or config.get("hidden_size")
    expected = layout_of(ckpt, "transformer").config.text_dim
    if width and int(width) != expected:
        raise ModelLoadError(f"{text_path}: this text encoder gives {width}-wide features but {ckpt.path.name} "
                             f"expects {expected}: pair it with its own text encoder (Infinity: google/flan-t5-xl)")


def _load_sizes(ckpt: Checkpoint, dtype: torch.dtype, device, vae_path, vae_device, text_paths: list[Path] | None,
                text_device) -> dict[str, int]:
    """About how many bytes of weights loading will put on each device (from the file's header; the
    separate VAE and the text encoder from their size on disk, a T5 encoder a quarter of its folder:
    half the model, in bf16)."""
    sizes: dict[str, int] = {}
    e = memory.element_size(dtype or torch.float32)
    sizes[str(device)] = sum(t.numel() * (e if t.is_floating_point() else t.element_size())
                             for t in ckpt.state.values())
    if vae_path is not None:
        sizes[str(vae_device)] = sizes.get(str(vae_device), 0) + memory.weights_on_disk(vae_path)
    for text_path in text_paths or []:
        try:
            is_t5 = json.loads((text_path / "config.json").read_text()).get("model_type") in ("t5", "mt5", "umt5")
        except (OSError, ValueError):
            is_t5 = False
        text = memory.weights_on_disk(text_path) // (4 if is_t5 else 1)
        sizes[str(text_device)] = sizes.get(str(text_device), 0) + text
    return sizes


class _WeakPipelineCache:
    """load_pipeline keyed by its arguments, holding each pipeline only through a weak reference.

    A pipeline is reused while someone holds it (ComfyUI's cache of node outputs, a second Load VAR
    node with the same options, a script's variable) and freed as soon as nobody does: a host that
    drops its outputs to free memory (ComfyUI's "free model and node cache") really gets the memory
    back. A strong cache (functools.lru_cache, which this replaced) would keep up to four models alive
    that nothing uses and nothing can evict.
    """

    def __init__(self):
        self._items: dict[tuple, weakref.ref] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(model="toyworld", vae=None, text_encoder=None, device="cpu", dtype="fp32", vae_device=None,
             text_device="cpu", text_dtype=None, text_offload=False) -> tuple:
        text_encoder = tuple(map(str, text_encoder)) if isinstance(text_encoder, (list, tuple)) else text_encoder
        return (str(model), vae, text_encoder, str(device), str(dtype), vae_device, str(text_device),
                text_dtype, bool(text_offload))

    def get(self, *args, **kwargs) -> VARPipeline | None:
        """The live pipeline loaded with these arguments, or None (nothing is loaded)."""
        with self._lock:
            ref = self._items.get(self._key(*args, **kwargs))
        return ref() if ref is not None else None

    def __call__(self, model: str = "toyworld", vae: str | None = None, text_encoder: str | None = None,
                 device: str = "cpu", dtype: str = "fp32", vae_device: str | None = None,
                 text_device: str = "cpu", text_dtype: str | None = None,
                 text_offload: bool = False) -> VARPipeline:
        """load_pipeline, reusing a pipeline loaded with the same arguments that is still alive.
        Callers must not modify the returned pipeline: copy the transformer before changing it."""
        key = self._key(model, vae, text_encoder, device, dtype, vae_device, text_device, text_dtype, text_offload)
        pipe = self.get(model, vae, text_encoder, device, dtype, vae_device, text_device, text_dtype, text_offload)
        if pipe is not None:
            return pipe
        pipe = load_pipeline(model, vae=vae, text_encoder=text_encoder, device=device, dtype=dtype,
                             vae_device=vae_device, text_device=text_device, text_dtype=text_dtype,
                             text_offload=text_offload)
        with self._lock:
            self._items = {k: r for k, r in self._items.items() if r() is not None}
            self._items[key] = weakref.ref(pipe)
        return pipe

    def __len__(self) -> int:
        """How many cached pipelines are still alive."""
        with self._lock:
            return sum(r() is not None for r in self._items.values())

    def cache_clear(self) -> None:
        with self._lock:
            self._items.clear()


load_pipeline_cached = _WeakPipelineCache()
