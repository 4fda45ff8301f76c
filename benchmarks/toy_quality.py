"""Quality of the bundled toy model, judged by the oracle: the numbers in docs/toy-model.md.

    python benchmarks/toy_quality.py --out docs/toy_quality.json
    python benchmarks/toy_quality.py --model toyworld_vq --out docs/toy_quality_vq.json

With --tokenizer, also the tokenizer's round trip: 500 fresh renders through the VAE's multi-scale
quantiser and back, PSNR and the oracle's accuracy on the reconstructions.

Fully specified prompts ("a striped red star"), default sampler settings, every (shape, colour,
style) combination seen in training (4 seeds each) and every held-out one (42 seeds each).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toyworld")
    p.add_argument("--cfg", type=float, nargs="*", default=None, help="extra CFG values to compare")
    p.add_argument("--tokenizer", action="store_true", help="also measure the tokenizer's reconstructions")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import torch

    from svare_core import load_pipeline
    from svare_core.settings import resolve_sampler
    from svare_core.toyworld.evaluate import quality_toy, reconstruction_quality

    torch.set_num_threads(1)
    pipe = load_pipeline(args.model)
    base = resolve_sampler(pipe)
    results = {}
    if args.tokenizer:
        results["tokenizer"] = reconstruction_quality(pipe)
        print(f"tokenizer: {json.dumps(results['tokenizer'])}", flush=True)
    for cfg in [base.cfg] + [c for c in (args.cfg or []) if c != base.cfg]:
        s = replace(base, cfg=cfg)
        t = time.time()
        results[f"cfg={cfg}"] = {"seen": quality_toy(pipe, held_out=False, seeds=4, settings=s),
                                 "held_out": quality_toy(pipe, held_out=True, seeds=42, settings=s),
                                 "seconds": round(time.time() - t, 1)}
        print(f"cfg={cfg}: {json.dumps(results[f'cfg={cfg}'])}", flush=True)
    print("| prompts | images | colour | shape | style | all three |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        if name == "tokenizer":
            continue
        for split in ("seen", "held_out"):
            q = r[split]
            print(f"| {split.replace('_', '-')} combos, {name} | {q['num_images']} | {q['colour']:.1%} | "
                  f"{q['shape']:.1%} | {q['style']:.1%} | {q['all_three']:.1%} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
