"""Issue 17's targets, side by side in one run on this machine, written to one JSON file.

Not part of the test suite. From the repository root (the reference checkout and its CPU stand-ins as
benchmarks/bench_sampling.py describes them; --before is a copy of svare_core from before the perf work):

    mkdir -p /tmp/before && git archive 32e22d0 svare_core | tar -x -C /tmp/before
    python benchmarks/bench_targets.py --reference /path/to/Infinity --stubs /path/to/stubs \\
        --before /tmp/before --json docs/perf_targets.json

In order, each with the load average before and after it:
  sampler   bench_sampling's ours and the reference's worker processes (medium, fp32, 2 threads), interleaved,
            best of --rounds; target: reference / ours >= 1.5
  erase     `python -m svare_core erase` (toy, red -> blue, the toy defaults) as its own process: the --before
            copy (no erasure cache), this checkout with an empty erasure cache (cold) and again with the cache
            the cold run filled (warm); wall time; target <= 45 s. Every patch is then judged by evaluate_toy
            against the base model on the same evaluation seeds (erasure and preservation), and the patches
            are compared tensor by tensor
  demo      `make demo` with an empty erasure cache (cold) and again (warm); target <= 60 s
  matmul    the CPU's linear throughput and the medium sampler's achieved GFLOP/s as a share of it
  passes    the erasure step's two forwards or one batched (bench_speedup.py passes)
  profile   where a cold toy erasure's time goes (bench_speedup.py erasure_profile), when it missed its target
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_speedup import load_average, matmul_rows, passes_rows, torch_threads  # noqa: E402

ERASE = ["erase", "--model", "toyworld", "--kind", "toy", "--concept", "red", "--anchor", "blue"]


def timed(cmd: list[str], cwd: Path, env: dict) -> dict:
    load = load_average()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return {"command": " ".join(cmd), "wall_s": round(wall, 1), "load_before": load, "load_after": load_average(),
            "stdout_tail": proc.stdout.strip().splitlines()[-3:]}


def sampler(reference: str, stubs: str | None, rounds: int, repeats: int, threads: int) -> dict:
    from bench_sampling import _best, run_job, write_weights

    with tempfile.TemporaryDirectory(prefix="svare-targets-") as tmp:
        job = dict(config="medium", device="cpu", batch=1, repeats=repeats, threads=threads,
                   weights=write_weights("medium", Path(tmp)))
        load = load_average()
        ours, ref = [], []
        for _ in range(rounds):
            ours.append(run_job({**job, "impl": "ours"}))
            ref.append(run_job({**job, "impl": "reference", "reference": str(Path(reference).resolve())},
                               {**os.environ, "TORCHDYNAMO_DISABLE": "1", **({"PYTHONPATH": stubs} if stubs else {})}))
    a, b = _best(ours), _best(ref)
    if "error" in a or "error" in b:
        return {"error": a.get("error") or b.get("error")}
    return {"ours_s_per_image": a["s_per_image"], "reference_s_per_image": b["s_per_image"],
            "ours_all": a["all_s_per_image"], "reference_all": b["all_s_per_image"],
            "reference_over_ours": round(b["s_per_image"] / a["s_per_image"], 3), "target": ">= 1.5",
            "load_before": load, "load_after": load_average()}


def judge(patches: dict[str, Path], seeds: int, eval_seed: int) -> dict:
    """evaluate_toy of every patch on the same seeds, and how far each patch is from the cold run's."""
    from svare_core import load_pipeline
    from svare_core.erasure import ErasurePatch, apply_patch
    from svare_core.settings import resolve_sampler
    from svare_core.toyworld.evaluate import evaluate_toy

    base = load_pipeline("toyworld")
    settings = resolve_sampler(base)
    loaded = {k: ErasurePatch.load(p) for k, p in patches.items()}
    ref = loaded["cold"].tensors
    out = {}
    for name, patch in loaded.items():
        diff = max(float((patch.tensors[k].float() - ref[k].float()).abs().max()) for k in ref)
        rep = evaluate_toy(base, apply_patch(base, patch), ["red"], seeds=seeds, seed=eval_seed, settings=settings)
        c, u = rep["concepts"]["red"], rep["unrelated"]
        out[name] = {"max_abs_patch_difference_from_cold": diff, "erasure_rate": c["erasure_rate"],
                     "unseen_prompt_erasure_rate": c.get("unseen_prompt_erasure_rate"),
                     "paraphrase_erasure_rate": c["paraphrase_erasure_rate"],
                     "preservation_unrelated": u["preservation_unrelated"],
                     "scene_agreement_same_seed": u["scene_agreement_same_seed"],
                     "tv_unrelated": u["open_attributes"]["tv_distance"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, help="a FoundationVision/Infinity checkout")
    p.add_argument("--stubs", default=None,
                   help="PYTHONPATH for the reference's processes only (its CPU stand-ins, see bench_sampling.py)")
    p.add_argument("--before", default=None, help="a copy of svare_core from before the perf work (its parent folder)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seeds", type=int, default=8, help="evaluation samples per prompt")
    p.add_argument("--eval-seed", type=int, default=2000)
    p.add_argument("--skip", nargs="*", default=[], choices=["sampler", "erase", "demo", "matmul", "passes", "profile"])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    result = {"machine": {"cpus": os.cpu_count(), "threads": args.threads}, "load_start": load_average()}
    py = sys.executable
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def save():
        if args.json:
            tmp = Path(args.json).with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1))
            tmp.replace(args.json)
        print(json.dumps(result, indent=1), flush=True)

    if "sampler" not in args.skip:
        result["sampler"] = sampler(args.reference, args.stubs, args.rounds, args.repeats, args.threads)
        save()
    with tempfile.TemporaryDirectory(prefix="svare-targets-") as tmp:
        tmp = Path(tmp)
        if "erase" not in args.skip:
            runs, patches = {}, {}
            if args.before:
                patches["before"] = tmp / "before.safetensors"
                runs["before"] = timed([py, "-m", "svare_core", *ERASE, "--out", str(patches["before"])],
                                       Path(args.before), env)
            cache = {**env, "SVARE_CACHE_DIR": str(tmp / "erase_cache")}
            for name in ("cold", "warm"):
                patches[name] = tmp / f"{name}.safetensors"
                runs[name] = timed([py, "-m", "svare_core", *ERASE, "--out", str(patches[name])], ROOT, cache)
            result["erase"] = {"runs": runs, "target_s": 45}
            save()
            torch_threads(args.threads)
            result["erase"]["results"] = judge(patches, args.seeds, args.eval_seed)
            save()
        if "demo" not in args.skip:
            cache = {**env, "SVARE_CACHE_DIR": str(tmp / "demo_cache")}
            # -o: never remake the venv (a linked, shared one), only run the demo.
            result["demo"] = {name: timed(["make", "-o", ".venv/bin/.ready", "demo"], ROOT, cache)
                              for name in ("cold", "warm")}
            result["demo"]["target_s"] = 60
            save()
    if "matmul" not in args.skip:
        torch_threads(args.threads)
        load = load_average()
        result["matmul"] = {"rows": matmul_rows(args.repeats), "load_before": load, "load_after": load_average()}
        save()
    if "passes" not in args.skip:
        torch_threads(args.threads)
        load = load_average()
        result["passes"] = {"rows": passes_rows(args.repeats + 2), "load_before": load, "load_after": load_average()}
        save()
    cold = result.get("erase", {}).get("runs", {}).get("cold", {}).get("wall_s")
    if "profile" not in args.skip and (cold is None or cold > 45):
        load = load_average()
        proc = subprocess.run([py, str(ROOT / "benchmarks" / "bench_speedup.py"), "erasure_profile", "--threads",
                               str(args.threads)], cwd=ROOT, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        result["profile"] = {"command": "python benchmarks/bench_speedup.py erasure_profile --threads "
                             f"{args.threads}", "load_before": load, "load_after": load_average(),
                             **(json.loads(lines[-1]) if lines else {"error": proc.stderr[-1000:]})}
    result["load_end"] = load_average()
    save()


if __name__ == "__main__":
    main()
