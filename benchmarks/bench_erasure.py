"""Erasure on the toy world: S-VARE (default and robust) vs naive VARE vs ESD, one concept at a time
and all together.

Each erasure runs as its own `python -m svare_core erase` process, so its wall time and peak
memory (max RSS of that process) are its own; every patch is then judged by the oracle with
`evaluate_toy` against the base model (same prompts, same seeds) and, with --attack, attacked
with `run_attacks` (erasure/attacks.py; the oracle judges, on the erased and the base model).

    python benchmarks/bench_erasure.py --out docs/erasure_results.json
    python benchmarks/bench_erasure.py --methods svare --concepts red   # one row
    python benchmarks/bench_erasure.py --model toyworld_vq --methods svare --concepts red --no-joint  # the VQ toy (Switti)

On two cores, the halves can run side by side (one thread each) and be joined:

    python benchmarks/bench_erasure.py --methods svare --out a.json &
    python benchmarks/bench_erasure.py --methods vare esd --out b.json; wait
    python benchmarks/bench_erasure.py --combine a.json b.json --out docs/erasure_results.json

Prints two markdown tables (the ones in docs/results.md: the numbers, and issue 15's targets
against them, benchmarks/erasure_targets.py) and writes all numbers as JSON.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from erasure_targets import targets_table  # noqa: E402

ANCHORS = {"red": "blue", "star": "circle", "striped": "solid"}
# Rows of the table -> the erase command's method arguments.
METHODS = {"svare": ["--method", "svare"], "svare_robust": ["--method", "svare", "--robust"],
           "vare": ["--method", "vare"], "esd": ["--method", "esd"]}


def run_erase(model: str, concepts: list[str], method: str, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "svare_core", "erase", "--model", model, "--kind", "toy",
           *METHODS[method], "--out", str(out)]
    for c in concepts:
        cmd += ["--concept", c, "--anchor", ANCHORS[c]]
    # No erasure cache: each erase draws its own training targets, so its time is the whole cost
    # (robust S-VARE against the default compares like with like).
    cmd += ["--no-cache", *extra]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    # The child's own high-water mark (VmHWM starts afresh at exec; ru_maxrss would include the
    # memory of this parent process at fork time).
    peak_kb, status, usage = 0, None, None
    while status is None:
        try:
            text = Path(f"/proc/{proc.pid}/status").read_text()
            peak_kb = max(peak_kb, int(next(ln.split()[1] for ln in text.splitlines() if ln.startswith("VmHWM"))))
        except (OSError, StopIteration, ValueError):
            pass
        # wait4 reaps the child with its own CPU time: wall time depends on what else the machine runs.
        pid, code, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            status, usage = os.waitstatus_to_exitcode(code), rusage
        else:
            time.sleep(0.2)
    proc.returncode = status
    if status != 0:
        raise SystemExit(f"erase failed: {' '.join(cmd)}")
    return {"seconds": round(time.time() - t0, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mb": round(peak_kb / 1024, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toyworld", choices=["toyworld", "toyworld_vq"],
                   help="the bundled toy model (toyworld_vq: a Switti, 512-way VQ tokens)")
    p.add_argument("--concepts", nargs="+", default=list(ANCHORS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--attack", action="store_true", help="also attack every patch (run_attacks, default budget)")
    p.add_argument("--attack-seed", type=int, default=5000, help="first seed of the images the attacks are judged on")
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
    from svare_core.erasure.attacks import Judge, run_attacks
    from svare_core.settings import family_of, resolve_sampler
    from svare_core.toyworld.evaluate import evaluate_toy

    torch.set_num_threads(1)
    work = ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    base = load_pipeline(args.model)
    settings = resolve_sampler(base)
    runs = ([] if args.joint_only else [[c] for c in args.concepts]) + \
        ([] if args.no_joint or len(args.concepts) < 2 else [list(args.concepts)])
    per_concept = args.steps or family_of(base).erase.steps
    rows = []
    for method in args.methods:
        for concepts in runs:
            name = f"{'' if args.model == 'toyworld' else args.model + '_'}{method}_{'+'.join(concepts)}"
            # Several concepts in one run get the single-concept budget per concept.
            steps = ["--steps", str(per_concept * len(concepts))]
            cost = run_erase(args.model, concepts, method, work / f"{name}.safetensors", steps + args.erase_arg)
            erased = apply_patch(base, ErasurePatch.load(work / f"{name}.safetensors"))
            report = evaluate_toy(base, erased, concepts, seeds=args.seeds, seed=args.eval_seed, settings=settings)
            if args.attack:
                patch = ErasurePatch.load(work / f"{name}.safetensors")
                report["attacks"] = {}
                for c in concepts:
                    prompts = [u for u, _ in patch.meta["pairs"]]
                    report["attacks"][c] = run_attacks(base, erased, c, prompts, Judge("toyworld", c),
                                                       settings=settings, seed=args.attack_seed)
            rows.append({"model": args.model, "method": method, "concepts": concepts, **cost, "report": report})
            if args.out:       # each row as it comes: a run cut short keeps what it measured
                _write_json(Path(args.out), {"rows": rows})
            print(f"{name}: {cost} " + ", ".join(f"{c}: {report['concepts'][c]['erasure_rate']:.1%}" for c in concepts),
                  flush=True)
    write_table(rows, args.out)


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0%}" if x in (0, 1) else f"{x:.1%}"


def _attack_cells(attacks: dict | None) -> list[str]:
    """Strongest prompt-space attack, soft prompt, concept direction: erased (base)."""
    if not attacks:
        return ["-", "-", "-"]
    prompt_space = max((attacks[k] for k in ("token_search",) if k in attacks),
                       key=lambda r: r["erased"], default=None)
    words = attacks.get("near_words", {}).get("strongest")
    if words and (prompt_space is None or words["erased"] > prompt_space["erased"]):
        prompt_space = words
    return [f"{_pct(r['erased'])} ({_pct(r['base'])})" if r else "-"
            for r in (prompt_space, attacks.get("soft_prompt"), attacks.get("concept_direction", {}).get("strongest"))]


def write_table(rows: list[dict], out: str | None) -> None:
    lines = ["| concept(s) | method | erasure: concept / unseen / synonym prompts | strongest prompt attack: erased (base) | "
             "soft prompt | concept direction | open attributes, concept prompts: TV (floor) | "
             "open attributes, unrelated: TV (floor) | same-seed scenes, unrelated | preservation (unrelated) | "
             "diversity ratio (concept prompts) | time (s) | CPU time (s) | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rep, u = r["report"], r["report"]["unrelated"]
        for c in r["concepts"]:
            k = rep["concepts"][c]
            label = f"{'+'.join(r['concepts'])} : {c}" if len(r["concepts"]) > 1 else c
            oc, ou = k["open_attributes"], u["open_attributes"]
            div = k.get("diversity_ratio_concept_prompts")
            model = r.get("model", "toyworld")
            lines.append(" | ".join([
                f"| {label}", r["method"] if model == "toyworld" else f"{r['method']} ({model})",
                f"{_pct(k['erasure_rate'])} / {_pct(k.get('unseen_prompt_erasure_rate'))} / {_pct(k['paraphrase_erasure_rate'])}",
                *_attack_cells(rep.get("attacks", {}).get(c)),
                f"{oc['tv_distance']:.3f} ({oc['tv_noise_floor']:.3f})", f"{ou['tv_distance']:.3f} ({ou['tv_noise_floor']:.3f})",
                _pct(u["scene_agreement_same_seed"]), _pct(u["preservation_unrelated"]),
                "-" if div is None else f"{div:.2f}", f"{r['seconds']:.0f}",
                f"{r['cpu_seconds']:.0f}" if r.get("cpu_seconds") is not None else "-", f"{r['peak_rss_mb']:.0f} |"]))
    table = "\n".join(lines)
    targets = targets_table(rows)
    print(table + "\n\n" + targets)
    if out:
        _write_json(Path(out), {"rows": rows, "table": table, "targets": targets})


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    main()
