"""Which kernels the heavy work runs on, and the measurements behind the choices (docs/benchmarks.md).

CPU, fp32: linears go through torch's default BLAS. oneDNN's fp32 linear gives other roundings (so
other patches and images, bit for bit), and the rule is to take it only where it is at least
``ONEDNN_MIN_GAIN`` times faster: ``measure_cpu_linears`` measures both once on a model-shaped
product and ``onednn_pays`` applies the rule.
CPU, bf16: a transformer loaded in bf16 (``--dtype bf16``) runs its linears through oneDNN, on the
CPU's bf16 instructions (AVX512-BF16 / AMX) where it has them (``cpu_bf16_native``); without them
bf16 is emulated and slower than fp32.
CUDA: scaled_dot_product_attention picks the fused (flash / memory-efficient) kernels itself where
the inputs allow; ``compile_transformer`` optionally compiles the transformer's blocks with
torch.compile, falling back to eager blocks (with a warning) when compiling fails.
"""
from __future__ import annotations

import time
import types
import warnings

import torch
import torch.nn.functional as F

from .models.attention import KVCache

ONEDNN_MIN_GAIN = 1.2


def cpu_bf16_native() -> bool:
    """Whether this CPU has bf16 instructions oneDNN uses (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _gflops(fn, flops: int, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return flops / sorted(times)[len(times) // 2] / 1e9


def measure_cpu_linears(rows: int = 1024, dim: int = 2048, out: int = 2048, repeats: int = 5) -> dict:
    """GFLOP/s (median of ``repeats``) of one (rows x dim) @ (dim x out) linear on the CPU: fp32 through the
    default BLAS, fp32 through oneDNN (when torch has it), and bf16; with the largest error of each against
    fp64. A one-off measurement: seconds."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, dim, generator=g)
    w = torch.randn(out, dim, generator=g) / dim ** 0.5
    b = torch.randn(out, generator=g)
    exact = F.linear(x.double(), w.double(), b.double())
    flops = 2 * rows * dim * out
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    paths = {"fp32_blas": lambda: F.linear(x, w, b), "bf16": lambda: F.linear(xb, wb, bb)}
    if torch.backends.mkldnn.is_available():
        paths["fp32_onednn"] = lambda: _onednn_linear(x, w, b)
    result = {}
    for name, fn in paths.items():
        try:
            err = float((fn().double() - exact).abs().max())
            result[name] = {"gflops": round(_gflops(fn, flops, repeats), 1), "max_error": err}
        except RuntimeError as e:           # a torch build without the op
            result[name] = {"error": str(e).splitlines()[0]}
    result["bf16_native"] = cpu_bf16_native()
    return result


def onednn_pays(measured: dict) -> bool:
    """The rule: oneDNN for fp32 linears only where it is ``ONEDNN_MIN_GAIN`` times as fast as the default BLAS."""
    blas, dnn = measured.get("fp32_blas", {}).get("gflops"), measured.get("fp32_onednn", {}).get("gflops")
    return bool(blas and dnn and dnn >= ONEDNN_MIN_GAIN * blas)


def compile_transformer(model: torch.nn.Module, **compile_options) -> torch.nn.Module:
    """Run the blocks of ``model`` (an Infinity) through one torch.compile'd block forward, in place;
    returns ``model``. Copies of the model (``copy.deepcopy``, patched models) keep it, on their own weights.

    When compiling or running the compiled code fails (no compiler, an unsupported op), the blocks run
    eagerly from then on: one warning names the error, and the failed call is redone eagerly (a decode's
    KV caches are first put back as they were). Compiled blocks agree with eager ones up to the
    compiler's reordering of float operations, not bit for bit.
    """
    eager = type(model.blocks[0]).forward
    # Static shapes, one graph per scale's shape: with dynamic shapes torch 2.13's inductor fails to lower the
    # blocks (measured on the CPU, tests/test_kernels.py), and every call would end up eager.
    compile_options.setdefault("dynamic", False)
    runner = _Fallback(torch.compile(eager, **compile_options), eager)
    for block in model.blocks:
        block.forward = types.MethodType(runner, block)
    return model


class _Fallback:
    def __init__(self, compiled, eager):
        self.compiled, self.eager, self.failed = compiled, eager, False

    def __call__(self, block, *args, **kwargs):
        if not self.failed:
            caches = [a for a in (*args, *kwargs.values()) if isinstance(a, KVCache)]
            saved = [(c.length, c.k, c.v, c.text_kv) for c in caches]
            try:
                return self.compiled(block, *args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any compile failure falls back the same way
                self.failed = True
                for c, (length, k, v, text_kv) in zip(caches, saved):
                    c.length, c.text_kv = length, text_kv
                    if c.capacity is None:
                        c.k, c.v = k, v
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              "running the blocks eagerly", stacklevel=2)
        return self.eager(block, *args, **kwargs)
