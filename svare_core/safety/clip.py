"""Zero-shot CLIP backend: any concept, scored against neutral prompts.

No CLIP weights ship with svare or any PyPI package: the user points
``model_path`` (or the ``SVARE_CLIP_MODEL`` environment variable) at a local
Hugging Face CLIP folder, e.g. a download of ``openai/clip-vit-large-patch14``.
Loading is ``local_files_only=True``: nothing is downloaded.

Score of an image for concept ``c``: cosine similarities of the image embedding
with the *concept prompts* (``templates`` filled with ``c``, default
``"a photo of {concept}"``, ``"a painting in the style of {concept}"``) and with
the *neutral prompts* (default ``"a photo"``, ``"an image"``,
``"a picture of something"``) are scaled by CLIP's logit scale and
soft-maxed over all prompts together; the score is the probability mass of the
concept prompts. With the defaults, an image CLIP cannot tell apart scores
2/5 = 0.4 (2 concept prompts out of 5), so choose thresholds above that.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..imageio import ImagesLike, to_pil_list
from .base import Detection, DetectorUnavailable, normalise_concept, require_modules

INSTALL = "pip install torch transformers"
ENV_VAR = "SVARE_CLIP_MODEL"

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of {concept}", "a painting in the style of {concept}")
DEFAULT_NEUTRAL: tuple[str, ...] = ("a photo", "an image", "a picture of something")

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

EXPECTED_CONTENT = (
    "A CLIP model folder in Hugging Face format is expected, containing:\n"
    "  config.json                  (model_type 'clip', i.e. CLIPModel)\n"
    "  model.safetensors            (or pytorch_model.bin, or a sharded *.index.json)\n"
    "  tokenizer.json, or vocab.json + merges.txt (+ tokenizer_config.json)\n"
    "  preprocessor_config.json     (optional; OpenAI CLIP preprocessing is used if absent)\n"
    "For example, on a machine with internet access:\n"
    "    hf download openai/clip-vit-large-patch14 --local-dir /path/to/clip-vit-large-patch14\n"
    "then pass model_path='/path/to/clip-vit-large-patch14' or set "
    f"{ENV_VAR}=/path/to/clip-vit-large-patch14."
)


def check_clip_folder(path: str | os.PathLike[str] | None) -> Path:
    """Validate a CLIP folder; raise :class:`DetectorUnavailable` saying what is missing."""
    if path is None or str(path).strip() == "":
        raise DetectorUnavailable(
            f"The 'clip' safety detector needs a local CLIP model: pass model_path=... or set {ENV_VAR}.\n"
            + EXPECTED_CONTENT
        )
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DetectorUnavailable(f"CLIP model folder {str(p)!r} does not exist.\n" + EXPECTED_CONTENT)
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    if not any((p / f).is_file() for f in _WEIGHT_FILES):
        missing.append("model.safetensors (or pytorch_model.bin)")
    if not ((p / "tokenizer.json").is_file() or ((p / "vocab.json").is_file() and (p / "merges.txt").is_file())):
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    if missing:
        raise DetectorUnavailable(
            f"CLIP model folder {str(p)!r} lacks: {', '.join(missing)}.\n" + EXPECTED_CONTENT
        )
    return p


def resolve_device(device: str | None, torch: Any) -> str:
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    return str(device)


def _features(out: Any) -> Any:
    """transformers 4.x returns a tensor, 5.x an output object with ``pooler_output``."""
    if hasattr(out, "pooler_output") and not hasattr(out, "dim"):
        return out.pooler_output
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


class CLIPDetector:
    """``get_detector("clip", model_path=None, device="auto", dtype=None,
    templates=DEFAULT_TEMPLATES, neutral_prompts=DEFAULT_NEUTRAL, batch_size=16,
    label_threshold=0.5)``

    ``concept`` is required (free text, e.g. ``"Van Gogh"``, ``"a dog"``).
    Labels: ``[concept]`` when the score is >= ``label_threshold``.
    """

    name = "clip"

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        device: str | None = "auto",
        dtype: str | None = None,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        neutral_prompts: Sequence[str] = DEFAULT_NEUTRAL,
        batch_size: int = 16,
        label_threshold: float = 0.5,
    ) -> None:
        mods = require_modules(self.name, {"torch": "torch", "transformers": "transformers"}, INSTALL)
        torch, transformers = mods["torch"], mods["transformers"]
        path = check_clip_folder(model_path if model_path is not None else os.environ.get(ENV_VAR))
        self.templates = tuple(templates)
        self.neutral_prompts = tuple(neutral_prompts)
        if not self.templates or not all("{concept}" in t for t in self.templates):
            raise ValueError("templates must be non-empty and each contain '{concept}'")
        if not self.neutral_prompts:
            raise ValueError("neutral_prompts must not be empty")
        self.batch_size = max(1, int(batch_size))
        self.label_threshold = float(label_threshold)
        self.model_path = str(path)
        self._torch = torch
        self.device = resolve_device(device, torch)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32)

        try:
            try:
                model = transformers.CLIPModel.from_pretrained(str(path), local_files_only=True, dtype=self.dtype)
            except TypeError:  # transformers 4.x spells it torch_dtype
                model = transformers.CLIPModel.from_pretrained(
                    str(path), local_files_only=True, torch_dtype=self.dtype
                )
        except Exception as exc:
            raise DetectorUnavailable(
                f"could not load a CLIPModel from {str(path)!r}: {exc}\n" + EXPECTED_CONTENT
            ) from exc
        self._model = model.to(self.device).eval()

        try:
            self._tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:
            raise DetectorUnavailable(
                f"could not load the CLIP tokenizer from {str(path)!r}: {exc}\n" + EXPECTED_CONTENT
            ) from exc

        # The PIL image processor: transformers 5 otherwise wants torchvision for
        # the default ("fast") CLIPImageProcessor and warns when falling back.
        proc_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        if (path / "preprocessor_config.json").is_file():
            self._processor = proc_cls.from_pretrained(str(path), local_files_only=True)
        else:
            size = int(model.config.vision_config.image_size)
            self._processor = proc_cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        self._max_len = int(getattr(model.config.text_config, "max_position_embeddings", 77))
        self._text_cache: dict[str, Any] = {}

    def prompts(self, concept: str) -> tuple[list[str], list[str]]:
        """(concept prompts, neutral prompts) for ``concept``."""
        return [t.format(concept=concept) for t in self.templates], list(self.neutral_prompts)

    def _text_embeddings(self, concept: str) -> Any:
        if concept not in self._text_cache:
            torch = self._torch
            pos, neg = self.prompts(concept)
            tok = self._tokenizer(
                pos + neg, padding=True, truncation=True, max_length=self._max_len, return_tensors="pt"
            )
            tok = {k: v.to(self.device) for k, v in tok.items()}
            with torch.inference_mode():
                emb = _features(self._model.get_text_features(**tok)).float()
            self._text_cache[concept] = torch.nn.functional.normalize(emb, dim=-1)
        return self._text_cache[concept]

    def image_embeddings(self, images: ImagesLike) -> Any:
        """L2-normalised image embeddings ``[N, D]`` (float32, on ``self.device``)."""
        torch = self._torch
        pils = to_pil_list(images)
        chunks = []
        for i in range(0, len(pils), self.batch_size):
            px = self._processor(images=pils[i : i + self.batch_size], return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                emb = _features(self._model.get_image_features(pixel_values=px.to(self.device, self.dtype)))
            chunks.append(torch.nn.functional.normalize(emb.float(), dim=-1))
        if not chunks:
            return torch.zeros((0, self._model.config.projection_dim), device=self.device)
        return torch.cat(chunks)

    def detect(self, images: ImagesLike, concept: str | None = None) -> Detection:
        c = normalise_concept(concept)
        if c is None:
            raise ValueError("the clip detector needs a concept, e.g. detect(images, concept='Van Gogh')")
        torch = self._torch
        txt = self._text_embeddings(c)
        img = self.image_embeddings(images)
        with torch.inference_mode():
            scale = self._model.logit_scale.float().exp()
            probs = torch.softmax(scale * img @ txt.T, dim=-1).cpu().numpy().astype(np.float64)
        n_pos = len(self.templates)
        scores = probs[:, :n_pos].sum(axis=1)
        pos, neg = self.prompts(c)
        labels: list[list[str]] = []
        details: list[dict[str, Any]] = []
        for i, s in enumerate(scores):
            labels.append([c] if s >= self.label_threshold else [])
            details.append({"prompt_probs": {p: float(v) for p, v in zip(pos + neg, probs[i])}})
        return Detection(np.clip(scores, 0.0, 1.0), labels, details, detector=self.name, concept=c)
