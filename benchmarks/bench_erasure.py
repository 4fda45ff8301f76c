"""Erasure on the toy world: S-VARE vs naive VARE vs ESD, one concept at a time and all together.

Each erasure runs as its own `python -m svare_core erase` process, so its wall time and peak
memory (max RSS of that process) are its own; every patch is then judged by the oracle with
`evaluate_toy` against the base model (same prompts, same seeds).

    python benchmarks/bench_erasure.py --out docs/erasure_results.json
    python benchmarks/bench_erasure.py --methods svare --concepts red   # one row

On two cores, the halves can run side by side (one thread each) and be joined:

    python benchmarks/bench_erasure.py --methods svare --out a.json &
    python benchmarks/bench_erasure.py --methods vare esd --out b.json; wait
    python benchmarks/bench_erasure.py --combine a.json b.json --out docs/erasure_results.json

Prints a markdown table (the one in docs/results.md) and writes all numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ANCHORS = {"red": "blue", "star": "circle", "striped": "solid"}


def run_erase(concepts: list[str], method: str, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "svare_core", "erase", "--model", "toyworld", "--kind", "toy",
           "--method", method, "--out", str(out)]
    for c in concepts:
        cmd += ["--concept", c, "--anchor", ANCHORS[c]]
    cmd += extra
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    # The child's own high-water mark (VmHWM starts afresh at exec; ru_maxrss would include the
    # memory of this parent process at fork time).
    peak_kb = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak_kb = max(peak_kb, int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM"))))
        except (OSError, StopIteration, ValueError):
            pass
        time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"erase failed: {' '.join(cmd)}")
    return {"seconds": round(time.time() - t0, 1), "peak_rss_mb": round(peak_kb / 1024, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts", nargs="+", default=list(ANCHORS))
    p.add_argument("--methods", nargs="+", default=["svare", "vare", "esd"])
    p.add_argument("--no-joint", action="store_true", help="skip erasing all concepts in one run")
    p.add_argument("--joint-only", action="store_true", help="only the run that erases all concepts together")
    p.add_argument("--seeds", type=int, default=8, help="samples per prompt in the evaluation")
    # The toy defaults were tuned on evaluations seeded 1000; the table is measured on other seeds.
    p.add_argument("--eval-seed", type=int, default=2000, help="first seed of the evaluation images")
    p.add_argument("--steps", type=int, default=None, help="erasure steps per concept (default: the toy default)")
    p.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                   help="join the rows of earlier --out files into one table instead of running")
    p.add_argument("--work", default="outputs/bench_erasure", help="folder for the patches")
    p.add_argument("--out", default=None, help="JSON file for all numbers")
    p.add_argument("--erase-arg", action="append", default=[], help="extra argument for `erase` (repeatable)")
    args = p.parse_args()
    if args.combine:
        rows = [r for f in args.combine for r in json.loads(Path(f).read_text())["rows"]]
        return write_table(rows, args.out)

    import torch

    from svare_core import load_pipeline
    from svare_core.erasure import ErasurePatch, apply_patch
    from svare_core.settings import family_of, resolve_sampler
    from svare_core.toyworld.evaluate import evaluate_toy

    torch.set_num_threads(1)
    work = ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    base = load_pipeline("toyworld")
    settings = resolve_sampler(base)
    runs = ([] if args.joint_only else [[c] for c in args.concepts]) + \
        ([] if args.no_joint or len(args.concepts) < 2 else [list(args.concepts)])
    per_concept = args.steps or family_of(base).erase.steps
    rows = []
    for method in args.methods:
        for concepts in runs:
            name = f"{method}_{'+'.join(concepts)}"
            # Several concepts in one run get the single-concept budget per concept.
            steps = ["--steps", str(per_concept * len(concepts))]
            cost = run_erase(concepts, method, work / f"{name}.safetensors", steps + args.erase_arg)
            erased = apply_patch(base, ErasurePatch.load(work / f"{name}.safetensors"))
            report = evaluate_toy(base, erased, concepts, seeds=args.seeds, seed=args.eval_seed, settings=settings)
            rows.append({"method": method, "concepts": concepts, **cost, "report": report})
            print(f"{name}: {cost} " + ", ".join(f"{c}: {report['concepts'][c]['erasure_rate']:.1%}" for c in concepts),
                  flush=True)
    write_table(rows, args.out)


def write_table(rows: list[dict], out: str | None) -> None:
    lines = ["| concept(s) | method | erasure rate | erasure (unseen prompts) | paraphrase erasure | "
             "preservation (concept prompts) | preservation (unseen prompts) | preservation (unrelated) | "
             "FD (oracle features) | diversity ratio | time (s) | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rep, u = r["report"], r["report"]["unrelated"]
        for c in r["concepts"]:
            k = rep["concepts"][c]
            div = f"{u['diversity_ratio']:.2f}" if u.get("diversity_ratio") is not None else "-"
            label = f"{'+'.join(r['concepts'])} : {c}" if len(r["concepts"]) > 1 else c
            unseen = k.get("unseen_prompt_erasure_rate")
            unseen = "-" if unseen is None else f"{unseen:.1%}"
            unseen_kept = k.get("preservation_on_unseen_prompts")
            unseen_kept = "-" if unseen_kept is None else f"{unseen_kept:.1%}"
            lines.append(f"| {label} | {r['method']} | {k['erasure_rate']:.1%} | {unseen} | {k['paraphrase_erasure_rate']:.1%} "
                         f"| {k['preservation_on_concept_prompts']:.1%} | {unseen_kept} | {u['preservation_unrelated']:.1%} "
                         f"| {u['frechet_oracle_features']:.3f} | {div} | {r['seconds']:.0f} "
                         f"| {r['peak_rss_mb']:.0f} |")
    table = "\n".join(lines)
    print(table)
    if out:
        Path(out).write_text(json.dumps({"rows": rows, "table": table}, indent=1))


if __name__ == "__main__":
    main()
