"""What the training targets of an erasure leave open: the open attributes of the frozen model's images
for the safe prompts, under the seeds the trainer draws them with, against the base model's own.

S-VARE learns "a red circle" -> what the frozen model draws for "a blue circle"; the style and the
background that prompt leaves open are learnt from those few images. This measures, for the toy
pairs of one concept, the total-variation distance between the open style (and background) of the
targets and of a large reference draw of the same prompts on other seeds:

    python benchmarks/training_targets.py --out docs/training_targets.json
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concept", default="red")
    p.add_argument("--anchor", default="blue")
    p.add_argument("--reference-seeds", type=int, default=8, help="reference images per safe prompt")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import numpy as np
    import torch

    from svare_core import load_pipeline
    from svare_core.erasure import expand_concept
    from svare_core.erasure.config import Research
    from svare_core.erasure.tokens import prompt_seeds
    from svare_core.sampling import SamplerSettings, generate
    from svare_core.settings import family_of
    from svare_core.toyworld import world
    from svare_core.toyworld.collateral import total_variation
    from svare_core.toyworld.oracle import Oracle

    torch.set_num_threads(1)
    pipe = load_pipeline("toyworld")
    cfg = family_of(pipe).erase
    # The trainer's auxiliary-token settings (trainer.erase).
    settings = SamplerSettings(cfg=cfg.teacher_cfg, tau=Research().teacher_tau, top_p=Research().aux_top_p)
    safe = list(dict.fromkeys(p.safe for p in expand_concept(args.concept, args.anchor, "toy")))
    oracle = Oracle()

    def readings(seeds_of) -> list[tuple[str, dict]]:
        out = []
        for prompt in safe:
            seeds = seeds_of(prompt)
            images = torch.cat([generate(pipe, [prompt], seed=s, settings=settings).images for s in seeds])
            out += [(prompt, r) for r in oracle.read((images.numpy() * 255).round().astype(np.uint8))]
        return out

    def open_values(rs, attribute):
        return [r[attribute] for prompt, r in rs
                if not any(v in prompt.split() for v in world.VALUES[attribute]) and not
                (attribute == "background" and "background" in prompt)]

    reference = readings(lambda prompt: prompt_seeds(prompt, 10**6, args.reference_seeds))
    variants = {"2 images, seeds 0 and 1 for every prompt (the old default)": lambda prompt: [0, 1],
                "2 images, seeds of each prompt's own": lambda prompt: prompt_seeds(prompt, 0, 2),
                "8 images, seeds of each prompt's own (the new default)": lambda prompt: prompt_seeds(prompt, 0, 8)}
    report = {"concept": args.concept, "anchor": args.anchor, "safe_prompts": len(safe),
              "reference_images_per_prompt": args.reference_seeds,
              "reference": {a: dict(Counter(open_values(reference, a))) for a in ("style", "background")}, "variants": {}}
    for name, seeds_of in variants.items():
        rs = readings(seeds_of)
        report["variants"][name] = {
            a: {"counts": dict(Counter(open_values(rs, a))),
                "tv_to_reference": round(total_variation(open_values(rs, a), open_values(reference, a)), 3)}
            for a in ("style", "background")}
        print(name, json.dumps(report["variants"][name]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
