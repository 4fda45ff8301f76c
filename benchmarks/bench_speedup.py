"""Before/after speed, side by side on a busy machine: ratios from interleaved repetitions (medians).

Not part of the test suite. Each mode is one command from the repository root:

  # the sampler: this checkout's engine against another copy of svare_core (e.g. main's), on the same
  # weights in one process, calls alternating (ABBA...), and this checkout in bf16 against fp32
  mkdir -p /tmp/svare_main && git archive main svare_core | tar -x -C /tmp/svare_main
  python benchmarks/bench_speedup.py sampler --old /tmp/svare_main/svare_core --configs tiny,medium --threads 2

  # erasure on the toy model: erase() of the old copy and of this checkout in one process, runs
  # alternating; then this checkout twice with an erasure cache (the first run fills it)
  python benchmarks/bench_speedup.py erasure --old /tmp/svare_main/svare_core --repeats 3 --steps 50 --threads 2

  # where a cold toy erasure's time goes (cProfile: tokens, targets, forwards, backward, optimizer)
  python benchmarks/bench_speedup.py erasure_profile --threads 2

  # where the sampler's time goes (cProfile) in the old copy and here
  python benchmarks/bench_speedup.py profile --old /tmp/svare_main/svare_core --config medium

  # the erasure step's conditional + unconditional forwards: two passes or one batched pass
  python benchmarks/bench_speedup.py passes --threads 2

  # the CPU's matmul throughput (fp32 default BLAS, fp32 through oneDNN, bf16) and the sampler's
  # achieved GFLOP/s as a share of it
  python benchmarks/bench_speedup.py matmul --threads 2

  # the medium sampler with every fp32 linear through oneDNN against the default BLAS (the model-level gain of
  # the kernel choice that kernels.onednn_pays makes from one product)
  python benchmarks/bench_speedup.py onednn --threads 2

  # the toy erasure's training step: FLOPs counted, steps timed on a warm erasure cache, achieved
  # GFLOP/s as a share of the fp32 linear limit measured in the same run (plain or --robust)
  python benchmarks/bench_speedup.py erasure_flops --threads 2

Every mode prints `uptime`'s load averages with its numbers: on a shared machine absolute times say
little, ratios of interleaved runs more.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
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
    # Its built-in plug-ins (the toy model) and architectures by its own name, not this checkout's;
    # no installed ones.
    for registry in ("plugins", "models.registry"):
        reg = importlib.import_module(f"{name}.{registry}")
        reg.BUILTIN = tuple(m.replace("svare_core", name, 1) for m in reg.BUILTIN)
        if hasattr(reg, "ENTRY_POINT_GROUP"):
            reg.ENTRY_POINT_GROUP = f"{name}.none"
    for sub in ("erasure", "erasure.pairs", "settings", "models.infinity", "models.vae", "pipeline", "sampling"):
        importlib.import_module(f"{name}.{sub}")
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


# -- profile ------------------------------------------------------------------------------------------------------------
WATCHED = ("_project_kv", "text_kv", "apply_rope", "extend", "of")


def profile(args) -> None:
    """Where the sampler's time goes (cProfile, medium config): the share of the work issue 17 removes or
    moves (text K/V projections, RoPE, KV-cache growth) in the old copy and in this checkout."""
    import cProfile
    import pstats

    import torch
    from bench_sampling import CFG, TAU, _our_pipeline

    from svare_core.sampling import SamplerSettings, generate

    torch.set_num_threads(args.threads)
    old = load_core_copy(args.old)
    pipe, scales, prompts = _our_pipeline({"config": args.config, "device": "cpu", "batch": 1})
    old_pipe = _old_pipeline(old, pipe)
    calls = {"new": lambda: generate(pipe, prompts, seed=0, settings=SamplerSettings(cfg=CFG, tau=TAU), scales=scales),
             "old": lambda: old.sampling.generate(old_pipe, prompts, seed=0,
                                                  settings=old.sampling.SamplerSettings(cfg=CFG, tau=TAU), scales=scales)}
    print(f"profile ({args.config}, {args.threads} thread(s), {args.repeats} calls), load before: {load_average()}")
    for key, fn in calls.items():
        fn()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.repeats):
            fn()
        prof.disable()
        stats = pstats.Stats(prof).stats
        total = sum(tt for (_, _, _), (_, _, tt, _, _) in stats.items())
        shares = {}
        for (file, _, func), (_, _, _, ct, _) in stats.items():
            if func in WATCHED and file.endswith("attention.py"):
                shares[func] = shares.get(func, 0.0) + ct
        print(json.dumps({"copy": key, "total_s": round(total, 3),
                          "share": {k: round(v / total, 4) for k, v in sorted(shares.items())}}))
    print(f"load after: {load_average()}")


# -- erasure --------------------------------------------------------------------------------------------------------
def _toy_erase(core, steps: int | None, cache_dir: str | None = None):
    """One toy erasure (red -> blue, the toy model's settings) with a copy of svare_core; returns its patch."""
    pipe = core.load_pipeline("toyworld")
    assert type(pipe.transformer).__module__.startswith(core.__name__), "the copies mixed"
    pairs = core.erasure.expand_concept("red", "blue", "toy")
    preserve_prompts_for = core.erasure.pairs.preserve_prompts_for
    options = {"steps": steps} if steps else {}
    if cache_dir:
        options["cache_dir"] = cache_dir
    cfg = core.settings.resolve_erase(pipe, pairs, **options)
    return lambda: core.erasure.erase(pipe, pairs, cfg, preserve_prompts=preserve_prompts_for(pairs, "toy")).patch


def erasure(args) -> None:
    import torch

    import svare_core

    torch.set_num_threads(args.threads)
    old = load_core_copy(args.old)
    runs = {"old": _toy_erase(old, args.steps), "new": _toy_erase(svare_core, args.steps)}
    print(f"erasure (toy, red -> blue, in one process), {args.threads} thread(s), {args.repeats} interleaved runs "
          f"each, load before: {load_average()}", flush=True)
    patches = {k: fn() for k, fn in runs.items()}
    same = all(torch.equal(patches["old"].tensors[k], patches["new"].tensors[k]) for k in patches["old"].tensors)
    times = {k: [] for k in runs}
    for r in range(args.repeats):
        for k in (("old", "new") if r % 2 == 0 else ("new", "old")):
            times[k].append(_timed(runs[k]))
            print(f"  {k}: {times[k][-1]:.1f} s", flush=True)
    with tempfile.TemporaryDirectory() as cache:
        cached = _toy_erase(svare_core, args.steps, cache)
        fill = _timed(cached)
        t0 = time.perf_counter()
        hit_patch = cached()
        hit = time.perf_counter() - t0
    same_cached = all(torch.equal(hit_patch.tensors[k], patches["new"].tensors[k]) for k in hit_patch.tensors)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"median_s": {k: round(v, 2) for k, v in med.items()}, "old_over_new": round(med["old"] / med["new"], 3),
                      "same_patch": same, "cache_fill_s": round(fill, 1), "cache_hit_s": round(hit, 1),
                      "cache_hit_same_patch": same_cached}))
    print(f"load after: {load_average()}")


def erasure_profile(args) -> None:
    """Where a toy erasure's time goes (cProfile, cumulative seconds of the phases), cold: no erasure cache."""
    import cProfile
    import pstats

    import torch

    import svare_core

    torch.set_num_threads(args.threads)
    run = _toy_erase(svare_core, args.steps)
    print(f"erasure profile (toy, red -> blue), {args.threads} thread(s), load before: {load_average()}", flush=True)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    run()
    prof.disable()
    wall = time.perf_counter() - t0
    phases = {("tokens.py", "auxiliary_tokens"): "auxiliary tokens", ("trainer.py", "_teacher_targets"): "teacher targets",
              ("run.py", "student_logits"): "student forwards", ("run.py", "optimize"): "optimize (backward, clip, AdamW)",
              ("_tensor.py", "backward"): "of which backward", ("optimizer.py", "wrapper"): "of which AdamW step",
              ("losses.py", "filtered_ce"): "filtered CE", ("losses.py", "preservation_kl"): "preservation KL",
              ("run.py", "aux_batch"): "aux batch gather", ("infinity.py", "forward"): "all Infinity forwards"}
    shares = {}
    for (file, _, func), (_, _, _, ct, _) in pstats.Stats(prof).stats.items():
        for (f, fn), name in phases.items():
            if file.endswith(f) and func == fn:
                shares[name] = max(shares.get(name, 0.0), ct)
    print(json.dumps({"wall_s": round(wall, 1), "phases_s": {k: round(v, 2) for k, v in shares.items()}}))
    print(f"load after: {load_average()}")


def erasure_flops(args) -> None:
    """FLOPs and achieved GFLOP/s of the toy erasure's training steps (the part a warm cache cannot skip)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import svare_core
    from svare_core import kernels

    torch.set_num_threads(args.threads)
    print(f"erasure steps (toy, red -> blue{', robust' if args.robust else ''}), {args.threads} thread(s), "
          f"load before: {load_average()}", flush=True)
    pipe = svare_core.load_pipeline("toyworld")
    pairs = svare_core.erasure.expand_concept("red", "blue", "toy")
    preserve = svare_core.erasure.pairs.preserve_prompts_for(pairs, "toy")
    limits = kernels.measure_cpu_linears()
    with tempfile.TemporaryDirectory() as cache:
        def run(steps: int):
            cfg = svare_core.settings.resolve_erase(pipe, pairs, steps=steps, cache_dir=cache,
                                                    **({"robust": True} if args.robust else {}))
            return lambda: svare_core.erasure.erase(pipe, pairs, cfg, preserve_prompts=preserve)
        run(1)()                                  # fills the cache: tokens and targets are not what is measured
        counted = {}
        for steps in (1, 1 + args.count):
            with FlopCounterMode(display=False) as counter:
                run(steps)()
            counted[steps] = counter.get_total_flops()
        per_step = (counted[1 + args.count] - counted[1]) / args.count
        short, long_ = run(1), run(1 + args.steps)
        times = interleaved({"short": short, "long": long_}, args.repeats)
    secs = (statistics.median(times["long"]) - statistics.median(times["short"])) / args.steps
    achieved = per_step / secs / 1e9
    print(json.dumps({"limits": limits, "gflop_per_step": round(per_step / 1e9, 2), "s_per_step": round(secs, 3),
                      "achieved_gflops": round(achieved, 1),
                      "share_of_fp32_limit": round(achieved / limits["fp32_blas"]["gflops"], 3),
                      "runs_s": {k: [round(t, 1) for t in v] for k, v in times.items()}}))
    print(f"load after: {load_average()}")


def onednn(args) -> None:
    import torch
    import torch.nn.functional as F
    from bench_sampling import CFG, TAU, _our_pipeline
    from torch.overrides import TorchFunctionMode

    from svare_core import kernels
    from svare_core.sampling import SamplerSettings, generate

    class OneDNNLinears(TorchFunctionMode):
        """Every fp32 F.linear through oneDNN's linear (the product only: the model is unchanged)."""
        def __torch_function__(self, func, types, fargs=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.linear and fargs[0].dtype == torch.float32:
                x, w = fargs[0], fargs[1]
                b = fargs[2] if len(fargs) > 2 else kwargs.get("bias")
                return kernels._onednn_linear(x, w, b)
            return func(*fargs, **kwargs)

    torch.set_num_threads(args.threads)
    print(f"oneDNN linears, {args.threads} thread(s), load before: {load_average()}", flush=True)
    limits = kernels.measure_cpu_linears()
    pipe, scales, prompts = _our_pipeline({"config": args.config, "device": "cpu", "batch": 1})
    settings = SamplerSettings(cfg=CFG, tau=TAU)

    def draw():
        return generate(pipe, prompts, seed=0, settings=settings, scales=scales, decode=False, return_logits=True)

    def draw_onednn():
        with OneDNNLinears():
            return draw()

    a, b = draw(), draw_onednn()
    times = interleaved({"blas": draw, "onednn": draw_onednn}, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"limits": limits, "onednn_pays": kernels.onednn_pays(limits), "config": args.config,
                      "s_per_image": {k: round(v, 4) for k, v in med.items()},
                      "blas_over_onednn": round(med["blas"] / med["onednn"], 3),
                      "same_bits": all(torch.equal(x, y) for x, y in zip(a.bits, b.bits)),
                      "max_logit_difference": max(float((x - y).abs().max()) for x, y in zip(a.logits, b.logits))}))
    print(f"load after: {load_average()}")


# -- matmul ------------------------------------------------------------------------------------------------------------
def matmul(args) -> None:
    torch_threads(args.threads)
    print(f"matmul, {args.threads} thread(s), load before: {load_average()}")
    for row in matmul_rows(args.repeats):
        print(json.dumps(row))
    print(f"load after: {load_average()}")


def torch_threads(n: int) -> None:
    import torch
    torch.set_num_threads(n)


def matmul_rows(repeats: int) -> list[dict]:
    """The CPU's linear throughput (kernels.measure_cpu_linears), then the medium sampler's FLOPs (counted),
    seconds and achieved GFLOP/s in fp32 and bf16, each as a share of the same precision's linear limit."""
    import torch
    from bench_sampling import CFG, TAU, _our_pipeline
    from torch.utils.flop_counter import FlopCounterMode

    from svare_core import kernels
    from svare_core.sampling import SamplerSettings, generate

    limits = kernels.measure_cpu_linears()
    rows = [{"limits": limits, "onednn_pays": kernels.onednn_pays(limits)}]
    job = {"config": "medium", "device": "cpu", "batch": 1}
    pipe, scales, prompts = _our_pipeline(job)
    settings = SamplerSettings(cfg=CFG, tau=TAU)
    for dtype, key in ((torch.float32, "fp32_blas"), (torch.bfloat16, "bf16")):
        p = pipe if dtype == torch.float32 else pipe.with_transformer(_cast(pipe.transformer, dtype))
        p.transformer.requires_grad_(False)       # the FLOP counter's module hooks trip over no_grad parameters
        run = lambda p=p: generate(p, prompts, seed=0, settings=settings, scales=scales, decode=False)  # noqa: E731
        with FlopCounterMode(display=False) as counter:
            run()
        flops = counter.get_total_flops()
        secs = statistics.median(interleaved({"x": run}, repeats)["x"])
        achieved = flops / secs / 1e9
        rows.append({"sampler": f"medium {key}", "gflop_per_image": round(flops / 1e9, 3),
                     "s_per_image": round(secs, 4), "achieved_gflops": round(achieved, 1),
                     "share_of_matmul_limit": round(achieved / limits[key]["gflops"], 3)})
    rows.append(bf16_accuracy(pipe, prompts, scales, settings))
    return rows


def bf16_accuracy(pipe, prompts, scales, settings) -> dict:
    """bf16's accuracy cost on one fp32 draw: both models teacher-forced on the fp32 draw's tokens, their
    conditional logits compared (largest and mean error, share of bit decisions that agree)."""
    import torch

    from svare_core.models.bitwise import teacher_forcing_inputs
    from svare_core.sampling import generate

    model = pipe.transformer
    half = _cast(model, torch.bfloat16)
    bits = generate(pipe, prompts, seed=0, settings=settings, scales=scales, decode=False, return_logits=True).bits
    x, _ = teacher_forcing_inputs(bits, scales)
    feats, mask = pipe.encode_prompts(prompts)
    with torch.no_grad():
        full = model(model.encode_text(feats, mask), x, scales).float()
        low = half(half.encode_text(feats, mask), x.bfloat16(), scales).float()
    err = (full - low).abs()
    agree = ((full[..., 1] > full[..., 0]) == (low[..., 1] > low[..., 0])).float().mean()
    return {"bf16_accuracy": "medium, teacher-forced on an fp32 draw", "max_logit_error": round(float(err.max()), 4),
            "mean_logit_error": round(float(err.mean()), 5), "mean_abs_logit": round(float(full.abs().mean()), 4),
            "bit_decisions_agree": round(float(agree), 5)}


# -- passes ------------------------------------------------------------------------------------------------------------
def passes(args) -> None:
    """The erasure step's conditional + unconditional forwards on the toy model: two passes against one
    batched pass (B prompts, B unconditional rows), interleaved; and how far the batched logits are from
    the separate ones (a batch changes the BLAS's blocking, so its roundings)."""
    torch_threads(args.threads)
    print(f"passes (toy model), {args.threads} thread(s), load before: {load_average()}")
    for row in passes_rows(args.repeats):
        print(json.dumps(row), flush=True)
    print(f"load after: {load_average()}")


def passes_rows(repeats: int, batches=(1, 2, 8)) -> list[dict]:
    import torch

    from svare_core import load_pipeline
    from svare_core.erasure import expand_concept

    pipe = load_pipeline("toyworld")
    model, scales = pipe.transformer, pipe.default_scales("1:1", "0.06M")
    length = sum(h * w for h, w in scales)
    prompts = [p.unsafe for p in expand_concept("red", "blue", "toy")]
    rows = []
    for batch in batches:
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
                                 "one": lambda: model(both, xx, scales)}, repeats)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"batch": batch, "frozen_no_grad": {
            "two_passes_s": round(med["two"], 4), "one_batched_s": round(med["one"], 4),
            "two_over_one": round(med["two"] / med["one"], 3), "bit_identical": bool(torch.equal(separate, batched)),
            "max_logit_difference": float((separate - batched).abs().max())},
            "student": _student_passes(model, cond, uncond, x, scales, repeats)})
    return rows


def _student_passes(model, cond, uncond, x, scales, repeats: int) -> dict:
    """The student's guided logits (CFG 3) as erasure trains them (cross-attention trainable, as on the toy
    model), forward and backward: the conditional pass with gradient and the unconditional one without,
    against both in one batched forward with the unconditional half detached. Time, activation memory kept
    for backward (bytes autograd saves), and how far the gradients differ."""
    import copy

    import torch

    from svare_core.erasure.losses import guided_logits
    from svare_core.erasure.trainable import dense_parameters

    student = copy.deepcopy(model).requires_grad_(False)
    params = list(dense_parameters(student, "xattn").values())
    for p in params:
        p.requires_grad_(True)
    both, xx = cond.cat(uncond), torch.cat([x, x])

    def two():
        c = student(cond, x, scales)
        with torch.no_grad():
            u = student(uncond, x, scales)
        return guided_logits(c, u, 3.0)

    def one():
        c, u = student(both, xx, scales).chunk(2)
        return guided_logits(c, u.detach(), 3.0)

    def step(fn):
        for p in params:
            p.grad = None
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = fn().square().mean()
        loss.backward()
        return sum(saved), [p.grad.clone() for p in params]

    (saved_two, g_two), (saved_one, g_one) = step(two), step(one)
    times = interleaved({"two": lambda: step(two), "one": lambda: step(one)}, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    rel = max(float((a - b).norm() / a.norm()) for a, b in zip(g_two, g_one))
    return {"two_passes_s": round(med["two"], 4), "one_batched_s": round(med["one"], 4),
            "two_over_one": round(med["two"] / med["one"], 3), "saved_mb_two": round(saved_two / 2 ** 20, 1),
            "saved_mb_one": round(saved_one / 2 ** 20, 1), "max_relative_grad_difference": rel}


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
    ep = sub.add_parser("erasure_profile")
    ep.add_argument("--steps", type=int, default=None, help="erasure steps (default: the toy model's)")
    ep.add_argument("--threads", type=int, default=1)
    ep.set_defaults(func=erasure_profile)
    ef = sub.add_parser("erasure_flops")
    ef.add_argument("--steps", type=int, default=20, help="timed steps (a run of 1 + steps against a run of 1)")
    ef.add_argument("--count", type=int, default=2, help="steps whose FLOPs are counted")
    ef.add_argument("--repeats", type=int, default=3)
    ef.add_argument("--threads", type=int, default=2)
    ef.add_argument("--robust", action="store_true", help="robust S-VARE's steps (the toy model's robust recipe)")
    ef.set_defaults(func=erasure_flops)
    o = sub.add_parser("onednn")
    o.add_argument("--config", default="medium")
    o.add_argument("--repeats", type=int, default=10)
    o.add_argument("--threads", type=int, default=2)
    o.set_defaults(func=onednn)
    m = sub.add_parser("matmul")
    m.add_argument("--repeats", type=int, default=5)
    m.add_argument("--threads", type=int, default=1)
    m.set_defaults(func=matmul)
    f = sub.add_parser("profile")
    f.add_argument("--old", required=True, help="another copy of the svare_core folder to compare with")
    f.add_argument("--config", default="medium")
    f.add_argument("--repeats", type=int, default=3)
    f.add_argument("--threads", type=int, default=1)
    f.set_defaults(func=profile)
    q = sub.add_parser("passes")
    q.add_argument("--repeats", type=int, default=10)
    q.add_argument("--threads", type=int, default=1)
    q.set_defaults(func=passes)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
