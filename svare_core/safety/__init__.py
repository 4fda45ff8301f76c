"""Safety scores for generated images: one interface over several detectors.

    from svare_core.safety import get_detector, flag, censor, report, check

    det = get_detector("nudenet")                 # or "open_nsfw", "clip", "toyworld"
    d = det.detect(images, concept=None)          # Detection(scores [N], labels, details)
    mask = flag(d, 0.5)                           # bool [N]
    safe = censor(images, mask, "nudity")         # same layout/dtype as `images`
    print(report(d, 0.5))

    # or all at once (what a ComfyUI node needs):
    res = check(images, "clip", concept="Van Gogh", threshold=0.6, model_path="/models/clip-vit-l-14")
    res.images, res.flagged, res.report

``images``: ComfyUI IMAGE (torch float [B,H,W,C] in 0..1), PIL image(s), or a
numpy array (uint8 0..255 or float 0..1). Optional backends raise
:class:`DetectorUnavailable` with the install command when their package is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..imageio import ImagesLike, finite_images, to_bgr_list, to_pil_list, to_uint8_batch, to_uint8_list
from .actions import censor, censor_image, flag, reasons_for, report
from .base import Detection, Detector, DetectorUnavailable
from .registry import (
    available_detectors,
    clear_cache,
    detector_names,
    get_detector,
    install_hint,
    missing_packages,
)

__all__ = [
    "Detection",
    "Detector",
    "DetectorUnavailable",
    "SafetyResult",
    "available_detectors",
    "censor",
    "censor_image",
    "check",
    "clear_cache",
    "detector_names",
    "flag",
    "get_detector",
    "install_hint",
    "missing_packages",
    "reasons_for",
    "report",
    "to_bgr_list",
    "to_pil_list",
    "to_uint8_batch",
    "to_uint8_list",
]


@dataclass
class SafetyResult:
    """Everything one safety check produced."""

    detection: Detection
    flagged: np.ndarray  # bool [N]: at or above the threshold, or not judged
    images: Any  # input layout; flagged images censored if censoring was asked for
    report: str
    unjudged: np.ndarray | None = None  # bool [N]: images the detector could not judge (flagged: fail closed)


def check(
    images: ImagesLike,
    detector: str = "nudenet",
    concept: str | None = None,
    threshold: float = 0.5,
    censor_flagged: bool = True,
    **options: Any,
) -> SafetyResult:
    """Score, flag, optionally censor, and report in one call.

    ``options`` go to :func:`get_detector` (cached per detector and options).
    Fails closed: an image the detector cannot judge (non-finite pixels, a score that is not a
    number in [0, 1]) is flagged, and censored when censoring is on, with the reason.
    """
    if not (isinstance(threshold, (int, float)) and np.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number in [0, 1], got {threshold!r}")
    det = get_detector(detector, **options)
    finite = finite_images(images)
    d = det.detect(images, concept=concept)
    scores = np.asarray(d.scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(finite):
        raise RuntimeError(f"the {detector} detector gave {len(scores)} scores for {len(finite)} images")
    scored = np.isfinite(scores) & (scores >= 0) & (scores <= 1)
    unjudged = ~finite | ~scored
    mask = flag(d, threshold) | unjudged
    reasons = reasons_for(d, threshold, concept)
    for i in np.flatnonzero(unjudged):
        reasons[i] = ("flagged: the image holds NaN or infinite values, it cannot be judged" if not finite[i]
                      else f"flagged: the {detector} detector gave no usable score ({scores[i]})")
    out = censor(images, mask, reasons) if censor_flagged else images
    text = report(d, threshold, concept)
    if unjudged.any():
        text += "\n" + "\n".join(f"  #{i}: could not be judged: {reasons[i][len('flagged: '):]}: FLAGGED"
                                  for i in np.flatnonzero(unjudged))
    return SafetyResult(d, mask, out, text, unjudged)
