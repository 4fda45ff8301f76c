"""Why a soft prompt still brings an erased concept back: two probes of a toy-model patch.

Not part of the test suite; the toy model on the CPU, one thread, minutes each.

  # which text path carries the attack: the soft prompt's cross-attention tokens with the natural prompt's
  # pooled vector, and the other way round (the pooled vector conditions the first token and AdaLN)
  python benchmarks/robust_diagnostics.py paths PATCH

  # can the erased model unlearn the attack's conditions, and does that help against a new attack? Trains the
  # patched model further on exactly the conditions the attack found (towards the safe prompts' images), then
  # judges those conditions and a fresh attack on the result
  python benchmarks/robust_diagnostics.py unlearn PATCH --steps 50

Both attack the first 8 prompts the patch records for its concept with the harness's soft-prompt attack
(erasure/attacks.py, the default AttackBudget: 60 steps, 2 tokens), aimed at the base model's concept images
(seed 105,000 as `run_attacks` with seed 5000), and judge 2 images a condition from seed 5000 with the oracle.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def attacked(patch_path: str):
    import torch

    from svare_core import load_pipeline
    from svare_core.erasure import ErasurePatch, apply_patch
    from svare_core.erasure.attacks import AttackBudget, Judge, attack_guidance, concept_targets, soft_prompt
    from svare_core.settings import resolve_sampler

    torch.set_num_threads(1)
    base = load_pipeline("toyworld")
    settings = resolve_sampler(base)
    patch = ErasurePatch.load(patch_path)
    erased = apply_patch(base, patch)
    concept = patch.meta["concepts"][0]
    prompts = [u for u, _ in patch.meta["pairs"] if concept in u.split()][:8]
    scales = [tuple(s) for s in erased.default_scales()]
    guidance = attack_guidance(erased, settings, scales)
    targets = concept_targets(base, prompts, 2, settings, scales, seed=5000 + 10**5)
    feats, info = soft_prompt(erased, concept, targets, AttackBudget(), scales, guidance)
    return dict(base=base, erased=erased, patch=patch, concept=concept, prompts=prompts, settings=settings,
                scales=scales, guidance=guidance, targets=targets, feats=feats, info=info,
                judge=Judge("toyworld", concept))


def rate(a: dict, pipe, conditions) -> float:
    from svare_core.erasure.attacks import draw_conditions
    return float(a["judge"](draw_conditions(pipe, conditions, 2, 5000, a["settings"])).mean())


def paths(args) -> dict:
    import torch

    from svare_core.erasure.attacks import prompt_features

    a = attacked(args.patch)
    erased = a["erased"]
    model = erased.transformer
    pool = model.text_proj_for_sos
    forward = pool.forward
    natural = prompt_features(erased, a["prompts"])

    def pooled_of(feats):
        with torch.no_grad():
            return torch.cat([forward(model.text_norm(f[None]), torch.ones(1, len(f), dtype=torch.bool)) for f in feats])

    def drawn(conditions, pooled):
        """Images with the conditions' cross-attention tokens and, where given, another pooled vector (the
        sampler's first encode_text call is the conditional rows; guidance's empty rows are left alone)."""
        rows = None if pooled is None else torch.repeat_interleave(pooled, 2, dim=0)
        # draw_conditions samples up to 64 images in one generate call: one encode_text call for them all.
        assert rows is None or len(rows) <= 64, "more conditions than one sampler batch"
        calls = []

        def swapped(t, mask):
            calls.append(1)
            return rows if rows is not None and len(calls) == 1 else forward(t, mask)

        pool.forward = swapped
        try:
            return rate(a, erased, conditions)
        finally:
            pool.forward = forward

    out = {"patch": args.patch, "concept": a["concept"], "prompts": a["prompts"], "attack info": a["info"],
           "natural prompts": drawn(a["prompts"], None), "attack": drawn(a["feats"], None),
           "natural tokens + attack's pooled vector": drawn(a["prompts"], pooled_of(a["feats"])),
           "attack's tokens + natural pooled vector": drawn(a["feats"], pooled_of(natural))}
    return out


def unlearn(args) -> dict:
    from svare_core.erasure import PromptPair, apply_patch, erase
    from svare_core.erasure.attacks import AttackBudget, InjectedFeatures, soft_prompt
    from svare_core.erasure.pairs import preserve_prompts_for
    from svare_core.settings import resolve_erase

    a = attacked(args.patch)
    erased, concept = a["erased"], a["concept"]
    safe = {u: s for u, s in a["patch"].meta["pairs"]}
    names = {f"<attack: {p}>": f for p, f in zip(a["prompts"], a["feats"])}
    pipe = replace(erased, text_encoder=InjectedFeatures(erased.text_encoder, names))
    pairs = [PromptPair(n, safe[p], concept) for n, p in zip(names, a["prompts"])]
    natural_pairs = [PromptPair(u, s, concept) for u, s in a["patch"].meta["pairs"]]
    cfg = resolve_erase(a["base"], natural_pairs, steps=args.steps)
    res = erase(pipe, pairs, cfg, preserve_prompts=preserve_prompts_for(natural_pairs, "toy"))
    trained = apply_patch(pipe, res.patch)
    plain = replace(trained, text_encoder=erased.text_encoder)
    fresh, info = soft_prompt(plain, concept, a["targets"], AttackBudget(), a["scales"], a["guidance"])
    return {"patch": args.patch, "concept": concept, "steps": args.steps,
            "attack on the patch": rate(a, erased, a["feats"]),
            "the same conditions after training on them": rate(a, trained, a["feats"]),
            "natural prompts after": rate(a, plain, a["prompts"]),
            "a fresh attack after": rate(a, plain, fresh), "fresh attack": info}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    for name, fn in (("paths", paths), ("unlearn", unlearn)):
        s = sub.add_parser(name)
        s.add_argument("patch")
        s.add_argument("--json", default=None, help="also write the result here")
        if name == "unlearn":
            s.add_argument("--steps", type=int, default=50)
        s.set_defaults(func=fn)
    args = p.parse_args()
    result = args.func(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
