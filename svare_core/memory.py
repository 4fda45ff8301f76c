"""Memory: estimates of the working memory a task needs, and hooks a host uses to place models.

The core never manages devices beyond what its callers ask for. A host that shares a GPU between
several models (ComfyUI: ``nodes/comfy_adapter.py``) registers hooks here:

- ``before_load(sizes)``: called before a pipeline's weights are loaded, with the bytes about to go to
  each device, so the host can free room first (offload other models);
- ``prepare(pipe, working_bytes, task)``: called before sampling or erasure, so the host can move the
  pipeline's parts to their devices with room for ``working_bytes`` more;
- ``release(task)``: called once the outermost task ends (the host empties its allocator cache).

Without a host every hook is a no-op. Estimates are upper-bound guesses (KV cache, one block's
activations, the VAE's largest feature map, optimizer state), not measurements: a host uses them
to decide how much to free, never to refuse work.
"""
from __future__ import annotations

import functools
import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

GiB = 2**30


@dataclass
class Host:
    name: str = "host"
    before_load: Callable[[dict], None] | None = None
    prepare: Callable[[object, int, str], None] | None = None
    release: Callable[[str], None] | None = None


_hosts: list[Host] = []
_active = threading.local()          # the pipelines of the tasks running now, outermost first


def register_host(host: Host) -> Host:
    """Add ``host``, replacing one of the same name (a pack imported twice installs its hooks once)."""
    _hosts[:] = [h for h in _hosts if h.name != host.name]
    _hosts.append(host)
    return host


def unregister_host(host: Host) -> None:
    if host in _hosts:
        _hosts.remove(host)


def before_load(sizes: dict[str, int]) -> None:
    """Tell the hosts that about ``sizes[device]`` bytes of weights are about to be put on each device."""
    sizes = {str(d): int(b) for d, b in sizes.items() if b > 0}
    for host in list(_hosts):
        if host.before_load is not None and sizes:
            host.before_load(sizes)


@contextmanager
def use(pipe, working_bytes: int, task: str):
    """Run a task on ``pipe``: the hosts place its parts first; the outermost exit releases memory.

    A task inside another one on the same pipeline (erasure drawing its targets) places nothing:
    the outer task did, with room for both; moving the model under a running training would break
    the weights it shares with its trainable copy.
    """
    stack = getattr(_active, "pipes", None)
    if stack is None:
        stack = _active.pipes = []
    nested = any(p is pipe for p in stack)
    stack.append(pipe)
    try:
        if not nested:
            for host in list(_hosts):
                if host.prepare is not None:
                    host.prepare(pipe, int(working_bytes), task)
        yield
    finally:
        stack.pop()
        if not stack:
            for host in list(_hosts):
                if host.release is not None:
                    host.release(task)


def active() -> list:
    """The pipelines of the tasks running now in this thread, outermost first."""
    return list(getattr(_active, "pipes", None) or [])


def free_caches() -> None:
    """Drop what the core caches besides models in use: the detector instances (their models are freed
    once nothing else holds them). Each text encoder's prompt cache lives and dies with its model."""
    from .safety.registry import clear_cache
    clear_cache()


def estimate(fn, *args, **kwargs) -> int:
    """``fn(*args, **kwargs)``, or 0 when it fails (a model of another shape, arguments the task itself
    will refuse): an estimate only tells a host how much to free."""
    try:
        return max(0, int(fn(*args, **kwargs)))
    except Exception:       # noqa: BLE001 - a guess must never stop the work it is for
        return 0


def task(name: str, estimator: Callable[..., int]):
    """Decorator: run ``fn(pipe, ...)`` inside :func:`use`, with ``estimator(pipe, ...)`` bytes of working
    memory (called with the same arguments)."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(pipe, *args, **kwargs):
            with use(pipe, estimate(estimator, pipe, *args, **kwargs), name):
                return fn(pipe, *args, **kwargs)
        return run
    return wrap


# -- sizes ----------------------------------------------------------------------------------------
def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once (tied weights)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type == "meta":
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _param_dtype(module: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def sampling_bytes(pipe, batch: int, scales, guided: bool = True, decode: bool = True) -> int:
    """Working memory (beyond the weights) of drawing ``batch`` images over ``scales``.

    KV cache of every block for every token of every scale (two rows per image with guidance), one
    block's activations at the largest scale, the bit logits, and the VAE decoder's full-size maps.
    """
    t = pipe.transformer
    c = t.cfg
    e = element_size(_param_dtype(t))
    scales = [tuple(s) for s in scales]
    rows = max(1, int(batch)) * (2 if guided else 1)
    tokens = sum(h * w for h, w in scales)
    last = max(h * w for h, w in scales)
    # Switti's default model caches no self-attention (each scale sees itself); its logits are 4096-way.
    cached = tokens if getattr(c, "causal", True) else 0
    kv = c.depth * 2 * rows * cached * c.embed_dim * e
    block = rows * last * (6 * c.embed_dim + 2 * c.ffn_dim) * e
    logits = 3 * rows * last * (getattr(c, "vocab_size", None) or c.bits * 2) * 4
    total = kv + block + logits
    if decode:
        v = pipe.vae.cfg
        h, w = scales[-1]
        pixels = h * w * v.stride ** 2
        total += 4 * max(1, int(batch)) * pixels * v.ch * v.ch_mult[0] * element_size(_param_dtype(pipe.vae))
    return int(total)


def erasure_bytes(pipe, config, scales) -> int:
    """Working memory of an erasure run with ``config`` (EraseConfig) at the training ``scales``.

    The student's own tensors (trained ones, or a full fp32 copy when the model is not fp32 and the
    run is), their gradients and AdamW's two moments, the activations kept for the backward pass
    (one block input per block with gradient checkpointing, every block's otherwise), and the
    sampling the teacher does to make targets; whichever of training and sampling is larger.
    """
    from .erasure.trainable import dense_parameters, lora_layers

    t = pipe.transformer
    c = t.cfg
    dtype = _param_dtype(t)
    e = 4 if config.precision == "fp32" else element_size(dtype)
    if config.trainable == "lora":
        try:
            layers = lora_layers(t, config.lora_targets)
        except ValueError:                                   # unknown targets: erase() names them
            layers = {}
        trained = sum(config.lora_rank * (m.in_features + m.out_features) for m in layers.values())
        state = trained * 4 * 4                               # fp32 adapters, gradients, two moments
    else:
        trained = sum(p.numel() for p in dense_parameters(t, config.trainable).values())
        state = trained * e * 4
    if config.precision == "fp32" and dtype != torch.float32:
        state += sum(p.numel() for p in t.parameters()) * 4   # the student is a full fp32 copy
    scales = [tuple(s) for s in scales]
    rows = config.pairs_per_step * 2 + config.preserve_per_step
    tokens = sum(h * w for h, w in scales)
    per_block = rows * tokens * (8 * c.embed_dim + 2 * c.ffn_dim) * e
    acts = c.depth * rows * tokens * c.embed_dim * e + per_block if config.gradient_checkpointing \
        else c.depth * per_block
    logits = 4 * rows * tokens * (getattr(c, "vocab_size", None) or c.bits * 2) * 4
    return int(max(state + acts + logits, sampling_bytes(pipe, 1, scales, decode=False)))


def weights_on_disk(path: str | Path | None) -> int:
    """Bytes of the weights a file (or a shard index .json, or a Hugging Face folder) holds on disk."""
    if path is None:
        return 0
    path = Path(path)
    try:
        if path.is_dir():
            files = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt")]
            if any(p.suffix == ".safetensors" for p in files):
                files = [p for p in files if p.suffix == ".safetensors"]
            return sum(p.stat().st_size for p in files)
        if path.suffix == ".json":
            shards = set(json.loads(path.read_text()).get("weight_map", {}).values())
            return sum((path.parent / s).stat().st_size for s in shards if (path.parent / s).is_file())
        return path.stat().st_size if path.is_file() else 0
    except (OSError, ValueError, AttributeError):
        return 0
