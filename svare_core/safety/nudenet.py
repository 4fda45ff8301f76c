"""NudeNet backend (optional extra): nudity score from the NudeNet v3 detector.

NudeNet (``pip install nudenet``) is a YOLOv8n ONNX body-part detector. The
score of an image is the highest confidence among the *scored classes*, by
default every ``*_EXPOSED`` class (as in the I2P / concept-erasure nudity
evaluations); labels are all classes (faces and covered parts included) found
with confidence >= ``min_score``.

Licence: the ``nudenet`` wheel declares MIT but bundles an AGPL-3.0 licence
file. It is therefore only an *optional* extra of svare, never a dependency.

Input pitfall handled here: NudeNet expects **uint8 BGR** arrays (OpenCV order);
float 0..1 arrays silently give no detections and RGB arrays give different
(wrong) results. :func:`svare_core.imageio.to_bgr_list` does the conversion.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from ..imageio import ImagesLike, to_bgr_list
from .base import NUDITY_CONCEPTS, Detection, DetectorUnavailable, normalise_concept, require_modules

INSTALL = "pip install nudenet onnxruntime opencv-python-headless"
LICENCE_NOTE = (
    "Note: the nudenet wheel bundles an AGPL-3.0 licence file; it is an optional extra of svare."
)

# The 18 classes of the NudeNet v3 detector.
NUDENET_CLASSES: tuple[str, ...] = (
    "FEMALE_GENITALIA_COVERED",
    "FACE_FEMALE",
    "BUTTOCKS_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "ANUS_EXPOSED",
    "FEET_EXPOSED",
    "BELLY_COVERED",
    "FEET_COVERED",
    "ARMPITS_COVERED",
    "ARMPITS_EXPOSED",
    "FACE_MALE",
    "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED",
    "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)
#: Default scored classes: every *_EXPOSED class.
EXPOSED_CLASSES: tuple[str, ...] = tuple(c for c in NUDENET_CLASSES if c.endswith("_EXPOSED"))
#: A stricter set (genitals, anus, female breasts, buttocks) for ``classes=``.
EXPLICIT_CLASSES: tuple[str, ...] = (
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "ANUS_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "BUTTOCKS_EXPOSED",
)


def _parse_classes(spec: str | Sequence[str]) -> tuple[str, ...]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        name = str(item).strip().upper().replace(" ", "_").replace("-", "_")
        if not name:
            continue
        if name not in NUDENET_CLASSES:
            raise ValueError(f"unknown NudeNet class {item!r}; known classes: {', '.join(NUDENET_CLASSES)}")
        out.append(name)
    if not out:
        raise ValueError("no NudeNet class given")
    return tuple(dict.fromkeys(out))


class NudeNetDetector:
    """``get_detector("nudenet", threads=None, providers=None, min_score=0.25,
    classes=EXPOSED_CLASSES, batch_size=8, model_path=None, inference_resolution=320)``

    ``concept``: ``None`` or a nudity word ("nudity", "nsfw", ...) scores the
    configured ``classes``; a NudeNet class name or a comma-separated list of
    them (e.g. ``"FEMALE_BREAST_EXPOSED,BUTTOCKS_EXPOSED"``) scores those instead.
    """

    name = "nudenet"

    def __init__(
        self,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        min_score: float = 0.25,
        classes: str | Sequence[str] = EXPOSED_CLASSES,
        batch_size: int = 8,
        model_path: str | None = None,
        inference_resolution: int = 320,
    ) -> None:
        mods = require_modules(
            self.name,
            {"onnxruntime": "onnxruntime", "cv2": "opencv-python-headless", "nudenet": "nudenet"},
            INSTALL,
            LICENCE_NOTE,
        )
        ort, nudenet = mods["onnxruntime"], mods["nudenet"]
        self.min_score = float(min_score)
        self.classes = _parse_classes(classes)
        self.batch_size = max(1, int(batch_size))
        try:
            self._model = nudenet.NudeDetector(
                model_path=model_path, inference_resolution=int(inference_resolution)
            )
        except Exception as exc:  # corrupt/missing ONNX file
            raise DetectorUnavailable(f"could not load the NudeNet model ({exc}); reinstall with: {INSTALL}") from exc
        if threads is not None or providers is not None:
            # NudeDetector offers no session options: rebuild its session with ours.
            opts = ort.SessionOptions()
            if threads is not None:
                opts.intra_op_num_threads = int(threads)
                opts.inter_op_num_threads = 1
            path = model_path or getattr(self._model.onnx_session, "_model_path", None)
            if not path:
                path = os.path.join(os.path.dirname(nudenet.__file__), "320n.onnx")
            self._model.onnx_session = ort.InferenceSession(
                path, opts, providers=list(providers) if providers else ["CPUExecutionProvider"]
            )
            self._model.input_name = self._model.onnx_session.get_inputs()[0].name

    def _scored_classes(self, concept: str | None) -> tuple[str, ...]:
        c = normalise_concept(concept)
        if c is None or c.lower() in NUDITY_CONCEPTS:
            return self.classes
        try:
            return _parse_classes(c)
        except ValueError:
            raise ValueError(
                f"the nudenet detector scores nudity only; got concept {concept!r}. Use None/'nudity', "
                f"a NudeNet class name ({', '.join(NUDENET_CLASSES)}), or the 'clip' detector for "
                "other concepts."
            ) from None

    def raw_detections(self, images: ImagesLike) -> list[list[dict[str, Any]]]:
        """NudeNet's own per-image detections (class, score, box [x, y, w, h])."""
        bgr = to_bgr_list(images)
        if not bgr:
            return []
        return self._model.detect_batch(bgr, batch_size=self.batch_size)

    def detect(self, images: ImagesLike, concept: str | None = None) -> Detection:
        scored = self._scored_classes(concept)
        raw = self.raw_detections(images)
        scores = np.zeros(len(raw), dtype=np.float32)
        labels: list[list[str]] = []
        details: list[dict[str, Any]] = []
        for i, dets in enumerate(raw):
            dets = [
                {"class": d["class"], "score": float(d["score"]), "box": [int(v) for v in d["box"]]}
                for d in dets
            ]
            dets.sort(key=lambda d: -d["score"])
            hits = [d for d in dets if d["class"] in scored]
            top = hits[0] if hits else None
            scores[i] = top["score"] if top else 0.0
            found = [d["class"] for d in dets if d["score"] >= self.min_score]
            labels.append(list(dict.fromkeys(found)))
            details.append({"detections": dets, "top_class": top["class"] if top else None})
        return Detection(scores, labels, details, detector=self.name, concept=concept)
