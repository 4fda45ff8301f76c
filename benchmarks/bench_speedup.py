"""Before/after speed, side by side on a busy machine: ratios from interleaved repetitions (medians).

Not part of the test suite. Three modes, each one command from the repository root:

  # the sampler: this checkout's engine against another copy of svare_core (e.g. main's), on the same
  # weights in one process, calls alternating (ABBA...), and this checkout in bf16 against fp32
  mkdir -p /tmp/svare_main && git archive main svare_core | tar -x -C /tmp/svare_main
  python benchmarks/bench_speedup.py sampler --old /tmp/svare_main/svare_core --configs tiny,medium --threads 2

  # erasure on the toy model: `python -m svare_core erase` of the old copy and of this checkout, runs
  # alternating; then this checkout again with the erasure cache filled by the first run
  python benchmarks/bench_speedup.py erasure --old /tmp/svare_main/svare_core --repeats 3 --threads 2

  # the erasure step's conditional + unconditional forwards: two passes or one batched pass
  python benchmarks/bench_speedup.py passes --threads 2

  # the CPU's matmul throughput (fp32 default BLAS, fp32 through oneDNN, bf16) and the sampler's
  # achieved GFLOP/s as a share of it
  python benchmarks/bench_speedup.py matmul --threads 2

Every mode prints `uptime`'s load averages with its numbers: on a shared machine absolute times say
little, ratios of interleaved runs more.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def load_core_copy(path: str, name: str = "svare_old"):
    """Another copy of the svare_core package, imported under ``name`` (its imports are relative, so the two
    copies never mix)."""
    path = Path(path).resolve()
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py", submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Each callable once to warm up, then ``repeats`` times in turns (ABBA...)."""
    for fn in runs.values():
        fn()
    keys, times = list(runs), {k: [] for k in runs}
    for r in range(repeats):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            times[k].append(_timed(runs[k]))
    return times


# -- sampler ------------------------------------------------------------------------------------------------------
def _old_pipeline(old, new_pipe):
    """The same weights in the old copy's classes."""
    t, v = new_pipe.transformer, new_pipe.vae
    transformer = old.models.infinity.Infinity(old.models.infinity.InfinityConfig.from_dict(t.cfg.to_dict()))
    transformer.load_state_dict(t.state_dict())
    vae = old.models.vae.BSQVAE(v.cfg)
    vae.load_state_dict(v.state_dict())
    return old.pipeline.VARPipeline(transformer.eval(), vae.eval(), new_pipe.text_encoder, name="old",
                                    base_fingerprint="-")


def sampler(args) -> None:
    import torch
    from bench_sampling import CFG, TAU, _our_pipeline

    from svare_core.sampling import SamplerSettings, generate

    torch.set_num_threads(args.threads)
    old = load_core_copy(args.old) if args.old else None
    print(f"sampler, {args.threads} thread(s), {args.repeats} interleaved calls each, load before: {load_average()}")
    rows = []
    for name in args.configs.split(","):
        job = {"config": name, "device": "cpu", "batch": args.batch}
        pipe, scales, prompts = _our_pipeline(job)
        settings = SamplerSettings(cfg=CFG, tau=TAU)
        runs = {"new": lambda p=pipe: generate(p, prompts, seed=0, settings=settings, scales=scales, return_logits=True)}
        if old is not None:
            old_pipe = _old_pipeline(old, pipe)
            old_settings = old.sampling.SamplerSettings(cfg=CFG, tau=TAU)
            runs["old"] = lambda p=old_pipe: old.sampling.generate(p, prompts, seed=0, settings=old_settings,
                                                                   scales=scales, return_logits=True)
        bf16 = pipe.with_transformer(_cast(pipe.transformer, torch.bfloat16))
        runs["new_bf16"] = lambda p=bf16: generate(p, prompts, seed=0, settings=settings, scales=scales,
                                                   return_logits=True)
        outs = {k: fn() for k, fn in runs.items()}
        times = interleaved(runs, args.repeats)
        med = {k: statistics.median(v) / args.batch for k, v in times.items()}
        row = {"config": name, "s_per_image": med}
        if old is not None:
            row["old_over_new"] = med["old"] / med["new"]
            row["same_as_old"] = all(torch.equal(a, b) for a, b in zip(outs["new"].bits, outs["old"].bits)) and \
                all(torch.equal(a, b) for a, b in zip(outs["new"].logits, outs["old"].logits)) and \
                torch.equal(outs["new"].images, outs["old"].images)
        row["fp32_over_bf16"] = med["new"] / med["new_bf16"]
        a, b = torch.cat(outs["new"].logits, 1), torch.cat(outs["new_bf16"].logits, 1)
        # The bf16 model's logits on the fp32 run's own tokens would need teacher forcing; these are its own draw.
        row["bf16_bits_agree"] = float(torch.cat(outs["new"].bits, 1).eq(torch.cat(outs["new_bf16"].bits, 1)).float().mean())
        row["bf16_first_scale_max_logit_error"] = float((a[:, :1] - b[:, :1]).abs().max())
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"load after: {load_average()}")


def _cast(model, dtype):
    import copy
    return copy.deepcopy(model).to(dtype)


# -- erasure --------------------------------------------------------------------------------------------------------
def _erase_cmd(core_parent: Path, out: Path, extra: list[str]) -> tuple[list[str], dict]:
    cmd = [sys.executable, "-m", "svare_core", "erase", "--model", "toyworld", "--kind", "toy", "--concept", "red",
           "--anchor", "blue", "--out", str(out), "--overwrite", *extra]
    env = {**os.environ, "PYTHONPATH": str(core_parent), "HF_HUB_OFFLINE": "1"}
    return cmd, env


def erasure(args) -> None:
    from safetensors.torch import load_file

    work = Path(tempfile.mkdtemp(prefix="svare_bench_speedup_"))
    old_parent = work / "old"
    old_parent.mkdir()
    (old_parent / "svare_core").symlink_to(Path(args.old).resolve())
    threads = {"OMP_NUM_THREADS": str(args.threads)}
    steps = ["--steps", str(args.steps)] if args.steps else []
    cache = work / "cache"
    jobs = {"old": _erase_cmd(old_parent, work / "old.safetensors", steps),
            "new": _erase_cmd(ROOT, work / "new.safetensors", [*steps, "--no-cache"])}
    print(f"erasure (toy, red -> blue), {args.threads} thread(s), {args.repeats} interleaved runs each, "
          f"load before: {load_average()}")
    times = {k: [] for k in jobs}
    for r in range(args.repeats):
        for k in (("old", "new") if r % 2 == 0 else ("new", "old")):
            cmd, env = jobs[k]
            t = _timed(lambda: subprocess.run(cmd, env={**env, **threads}, cwd=str(work), check=True,
                                              capture_output=True))
            times[k].append(t)
            print(f"  {k}: {t:.1f} s", flush=True)
    a, b = load_file(str(work / "old.safetensors")), load_file(str(work / "new.safetensors"))
    same = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    cached = []
    for i in range(2):      # the first fills the cache, the second reads it
        cmd, env = _erase_cmd(ROOT, work / "cached.safetensors", [*steps, "--cache-dir", str(cache)])
        cached.append(_timed(lambda: subprocess.run(cmd, env={**env, **threads}, cwd=str(work), check=True,
                                                    capture_output=True)))
    c = load_file(str(work / "cached.safetensors"))
    same_cached = all(bool((b[k] == c[k]).all()) for k in b)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"median_s": med, "old_over_new": med["old"] / med["new"], "same_patch": same,
                      "cache_fill_s": round(cached[0], 1), "cache_hit_s": round(cached[1], 1),
                      "cache_hit_same_patch": same_cached}))
    print(f"load after: {load_average()}")


# -- matmul ------------------------------------------------------------------------------------------------------------
def matmul(args) -> None:
    import torch
    from bench_sampling import CFG, TAU, _our_pipeline
    from torch.utils.flop_counter import FlopCounterMode

    from svare_core import kernels
    from svare_core.sampling import SamplerSettings, generate

    torch.set_num_threads(args.threads)
    print(f"matmul, {args.threads} thread(s), load before: {load_average()}")
    limits = kernels.measure_cpu_linears()
    print(json.dumps(limits))
    job = {"config": "medium", "device": "cpu", "batch": 1}
    pipe, scales, prompts = _our_pipeline(job)
    settings = SamplerSettings(cfg=CFG, tau=TAU)
    for dtype, key in ((torch.float32, "fp32_blas"), (torch.bfloat16, "bf16")):
        p = pipe if dtype == torch.float32 else pipe.with_transformer(_cast(pipe.transformer, dtype))
        run = lambda p=p: generate(p, prompts, seed=0, settings=settings, scales=scales, decode=False)  # noqa: E731
        with FlopCounterMode(display=False) as counter:
            run()
        flops = counter.get_total_flops()
        secs = statistics.median(interleaved({"x": run}, args.repeats)["x"])
        achieved = flops / secs / 1e9
        print(json.dumps({"sampler": f"medium {key}", "gflop_per_image": round(flops / 1e9, 3),
                          "s_per_image": round(secs, 4), "achieved_gflops": round(achieved, 1),
                          "share_of_matmul_limit": round(achieved / limits[key]["gflops"], 3)}))
    print(f"load after: {load_average()}")


# -- passes ------------------------------------------------------------------------------------------------------------
def passes(args) -> None:
    """The erasure step's conditional + unconditional forwards on the toy model: two passes against one
    batched pass (B prompts, B unconditional rows), interleaved; and how far the batched logits are from
    the separate ones (a batch changes the BLAS's blocking, so its roundings)."""
    import torch

    from svare_core import load_pipeline
    from svare_core.erasure import expand_concept

    torch.set_num_threads(args.threads)
    pipe = load_pipeline("toyworld")
    model, scales = pipe.transformer, pipe.default_scales("1:1", "0.06M")
    length = sum(h * w for h, w in scales)
    prompts = [p.unsafe for p in expand_concept("red", "blue", "toy")]
    print(f"passes (toy model, frozen, no grad), {args.threads} thread(s), load before: {load_average()}")
    for batch in (1, 2, 8):
        x = torch.randint(0, 2, (batch, length - 1, model.cfg.bits), generator=torch.Generator().manual_seed(0)).float()
        with torch.no_grad():
            feats, mask = pipe.encode_prompts(prompts[:batch])
            cond = model.encode_text(feats, mask)
            uncond = model.encode_text(model.uncond_features(mask), mask)
            both = cond.cat(uncond)
            xx = torch.cat([x, x])
            separate = torch.cat([model(cond, x, scales), model(uncond, x, scales)])
            batched = model(both, xx, scales)
            times = interleaved({"two": lambda: (model(cond, x, scales), model(uncond, x, scales)),
                                 "one": lambda: model(both, xx, scales)}, args.repeats)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(json.dumps({"batch": batch, "two_passes_s": round(med["two"], 4), "one_batched_s": round(med["one"], 4),
                          "two_over_one": round(med["two"] / med["one"], 3),
                          "bit_identical": bool(torch.equal(separate, batched)),
                          "max_logit_difference": float((separate - batched).abs().max())}))
    print(f"load after: {load_average()}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("sampler")
    s.add_argument("--old", default=None, help="another copy of the svare_core folder to compare with")
    s.add_argument("--configs", default="tiny,medium")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--repeats", type=int, default=10)
    s.add_argument("--threads", type=int, default=1)
    s.set_defaults(func=sampler)
    e = sub.add_parser("erasure")
    e.add_argument("--old", required=True, help="another copy of the svare_core folder to compare with")
    e.add_argument("--repeats", type=int, default=3)
    e.add_argument("--steps", type=int, default=None, help="erasure steps (default: the toy model's)")
    e.add_argument("--threads", type=int, default=1)
    e.set_defaults(func=erasure)
    m = sub.add_parser("matmul")
    m.add_argument("--repeats", type=int, default=5)
    m.add_argument("--threads", type=int, default=1)
    m.set_defaults(func=matmul)
    q = sub.add_parser("passes")
    q.add_argument("--repeats", type=int, default=10)
    q.add_argument("--threads", type=int, default=1)
    q.set_defaults(func=passes)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
