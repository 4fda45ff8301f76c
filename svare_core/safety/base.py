"""Shared types of the safety backends."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..imageio import ImagesLike

__all__ = ["Detection", "Detector", "DetectorUnavailable", "require_modules", "NUDITY_CONCEPTS"]

# Concept strings that the nudity detectors (nudenet, open_nsfw) accept as
# "what they score anyway". ``None`` / "" are accepted too.
NUDITY_CONCEPTS = frozenset(
    {"nudity", "nude", "nudes", "naked", "nsfw", "porn", "pornography", "explicit", "sexual", "nudenet"}
)


class DetectorUnavailable(RuntimeError):
    """A detector cannot be built: an optional package or a model folder is missing.

    The message names what is missing and how to get it (the exact
    ``pip install`` command, or the expected folder content).
    """


@dataclass
class Detection:
    """Per-image result of one detector run.

    scores:  float array ``[N]`` in 0..1, higher = more of the concept.
    labels:  per image, the classes/labels the detector found (may be empty).
    details: per image, a dict with backend-specific extras (raw detections,
             per-prompt probabilities, ...). JSON-serialisable values only.
    detector / concept: what produced the result (used by :func:`report`).
    """

    scores: np.ndarray
    labels: list[list[str]]
    details: list[dict[str, Any]]
    detector: str = ""
    concept: str | None = None

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        n = len(self.scores)
        if len(self.labels) != n or len(self.details) != n:
            raise ValueError(
                f"scores ({n}), labels ({len(self.labels)}) and details ({len(self.details)}) "
                "must describe the same number of images"
            )

    def __len__(self) -> int:
        return len(self.scores)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (e.g. for a ComfyUI STRING output or a log file)."""
        return {
            "detector": self.detector,
            "concept": self.concept,
            "scores": [float(s) for s in self.scores],
            "labels": [list(labels) for labels in self.labels],
            "details": list(self.details),
        }


@runtime_checkable
class Detector(Protocol):
    """What every backend provides."""

    name: str

    def detect(self, images: ImagesLike, concept: str | None = None) -> Detection:
        """Score ``images`` for ``concept`` (``None``: the detector's own concept)."""
        ...


def require_modules(
    detector: str, modules: dict[str, str], install: str, note: str = ""
) -> dict[str, Any]:
    """Import ``modules`` (import name -> PyPI name) or raise :class:`DetectorUnavailable`.

    The error names every missing package and prints ``install``, the exact
    command to run. Returns import name -> module.
    """
    loaded: dict[str, Any] = {}
    missing, errors = [], []
    for name, dist in modules.items():
        try:
            loaded[name] = importlib.import_module(name)
        except ImportError as exc:  # ModuleNotFoundError or a broken install
            missing.append(dist if dist == name else f"{dist} (import {name})")
            errors.append(f"{name}: {exc}")
    if missing:
        msg = (
            f"The '{detector}' safety detector needs the optional package(s) "
            f"{', '.join(missing)}, which could not be imported ({'; '.join(errors)}).\n"
            f"Install with:\n    {install}"
        )
        if note:
            msg += f"\n{note}"
        raise DetectorUnavailable(msg)
    return loaded


def normalise_concept(concept: str | None) -> str | None:
    if concept is None:
        return None
    c = str(concept).strip()
    return c or None
