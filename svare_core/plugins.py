"""Plug-ins: what a model family or a world of prompts adds to the generic engine.

A plug-in is a module with a ``register(registry)`` function. It may add, by name:

- ``architecture``  a model architecture files are recognised as (:class:`svare_core.models.registry.Architecture`)
- ``family``        default settings of a model family (:class:`svare_core.families.Family`)
- ``bundled_model`` a model file shipped with the plug-in (name -> path)
- ``pair_kind``     a way to expand a concept into prompt pairs and preservation prompts
                    (:class:`svare_core.erasure.pairs.PairKind`)
- ``evaluation``    an erasure report for its world (``fn(base, erased, concepts, **options) -> dict``)
- ``detector``      a safety detector backend (``(module, class, required imports, install hint)``)

The engine never imports a plug-in by name in code: the built-in ones are listed below as
module paths, and installed packages add theirs through the ``svare_core.plugins`` entry point
group. They load on first use of the registry.
"""
from __future__ import annotations

import importlib
import threading
from importlib.metadata import entry_points
from typing import Any

BUILTIN = ("svare_core.toyworld.plugin",)
ENTRY_POINT_GROUP = "svare_core.plugins"
KINDS = ("architecture", "family", "bundled_model", "pair_kind", "evaluation", "detector")


class Registry:
    """Named things of a few kinds; a name may be registered once per kind."""

    def __init__(self) -> None:
        self._items: dict[str, dict[str, Any]] = {k: {} for k in KINDS}

    def add(self, kind: str, name: str, item: Any) -> None:
        if kind not in self._items:
            raise ValueError(f"unknown plug-in kind {kind!r}; choose one of {KINDS}")
        if name in self._items[kind] and self._items[kind][name] is not item:
            raise ValueError(f"a {kind} named {name!r} is already registered")
        self._items[kind][name] = item

    def get(self, kind: str, name: str) -> Any | None:
        return self._items[kind].get(name)

    def names(self, kind: str) -> list[str]:
        return list(self._items[kind])


_registry = Registry()
_loaded = False
_lock = threading.Lock()


def registry() -> Registry:
    """The registry with every plug-in loaded (built-in ones, then installed packages')."""
    global _loaded
    if not _loaded:
        with _lock:
            if not _loaded:
                for module in BUILTIN:
                    importlib.import_module(module).register(_registry)
                for ep in entry_points(group=ENTRY_POINT_GROUP):
                    ep.load().register(_registry)
                _loaded = True
    return _registry


def get(kind: str, name: str) -> Any | None:
    return registry().get(kind, name)


def names(kind: str) -> list[str]:
    return registry().names(kind)
