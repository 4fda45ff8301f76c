"""Measure an erasure on the toy world: is the concept gone, and is everything else as it was?

On the toy world the oracle knows what every image shows, so each number is exact bookkeeping:
- erasure rate: share of images, for prompts asking for the concept, where the concept is absent
- preservation: oracle accuracy on the other prompted attributes (concept prompts) and on every
  prompted attribute (unrelated prompts), erased model / base model; also on the fully specified
  prompts below, where the other attributes include the background
- distribution shift: Frechet distance between base and erased images' oracle features on
  unrelated prompts
- diversity: mean pairwise pixel distance between seeds of one prompt, erased / base
- robustness: the erasure rate on prompts that paraphrase the concept (synonyms never trained on),
  and on fully specified prompts (every attribute and the background) that no training pair names
- collateral (toyworld/collateral.py): the attributes a prompt leaves open, as a total-variation
  distance next to its noise floor (erased concept prompts against the base model on the anchor
  prompts; erased against base on unrelated prompts); same-seed agreement of the whole scene on
  unrelated prompts; seed diversity on concept prompts, erased / base on the anchor prompts
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from ..erasure.evaluate import PromptSpec, diversity, frechet_distance, sample_images
from ..erasure.pairs import mentions
from ..pipeline import VARPipeline
from ..sampling import SamplerSettings
from ..settings import resolve_sampler
from . import world
from .collateral import OTHER_SEEDS, distance_report, open_values, scene_agreement
from .oracle import Oracle, attribute_of
from .pairs import toy_training_scenes


def _spec(**wanted) -> PromptSpec:
    return PromptSpec(world.full_caption(**wanted), dict(wanted))


def concept_prompts(concept: str) -> list[PromptSpec]:
    """Prompts that ask for the concept, alone and with each value of one other attribute."""
    attr = attribute_of(concept)
    specs = [_spec(**{attr: concept})]
    for other in ("shape", "colour", "style"):
        if other != attr:
            specs += [_spec(**{attr: concept, other: v}) for v in world.VALUES[other]]
    return specs


def paraphrase_prompts(concept: str) -> list[PromptSpec]:
    """Concept prompts with the concept named by a synonym; synonyms that contain the word itself
    ("five-pointed star", "love heart") are left out: they would not test robustness."""
    attr = attribute_of(concept)
    synonyms = [i for i, s in enumerate(world.SYNONYMS[concept]) if not mentions(s, concept)]
    out = []
    for spec in concept_prompts(concept):
        for i in synonyms:
            caption = world.paraphrase_caption(**spec.wanted, attribute=attr, synonym_index=i)
            out.append(PromptSpec(caption, spec.wanted))
    return out


def unseen_prompts(concept: str, limit: int = 12) -> list[PromptSpec]:
    """Fully specified prompts asking for the concept ("a dotted red star on a gray background") whose
    combination of the other attributes no training pair names, on any background: a fixed random
    ``limit`` of them."""
    attr = attribute_of(concept)
    if attr == "background":
        return []
    others = [a for a in ("shape", "colour", "style") if a != attr]
    trained = {(s[others[0]], s[others[1]]) for s in toy_training_scenes(attr)}
    scenes = [dict(zip((*others, "background"), combo))
              for combo in itertools.product(world.VALUES[others[0]], world.VALUES[others[1]], world.VALUES["background"])
              if combo[:2] not in trained]
    picked = sorted(np.random.default_rng(0).choice(len(scenes), size=min(limit, len(scenes)), replace=False))
    return [_spec(**{attr: concept}, **scenes[i]) for i in picked]


def unrelated_prompts(concepts: list[str]) -> list[PromptSpec]:
    """Prompts naming none of the concepts: pairs of (shape, colour) plus style-only prompts."""
    banned = set(concepts)
    specs = [_spec(shape=s, colour=c) for s, c in itertools.product(world.SHAPES, world.COLOURS)
             if s not in banned and c not in banned]
    specs += [_spec(style=s) for s in world.STYLES if s not in banned]
    return specs


def _accuracy(readings: list[dict], specs: list[PromptSpec], seeds: int, erased: frozenset = frozenset()) -> float:
    """Share of prompted attribute values the oracle sees, ignoring the values that were erased."""
    hits = total = 0
    for k, r in enumerate(readings):
        for attr, value in specs[k // seeds].wanted.items():
            if value in erased:
                continue
            hits += r[attr] == value
            total += 1
    return hits / max(total, 1)


def _features(oracle: Oracle, images: np.ndarray) -> np.ndarray:
    scores = oracle.scores(images)
    return np.concatenate([scores[a] for a in world.ATTRIBUTES], axis=1)


def anchor_of(erased: VARPipeline, concept: str) -> str | None:
    """The value the erased model was trained to draw instead of ``concept``, read from its patches'
    pairs ("a red shape" => "a blue shape"); None when no patch records it."""
    attr = attribute_of(concept)
    for patch, _ in erased.patches:
        for unsafe, safe in patch.meta.get("pairs", []):
            if unsafe == world.full_caption(**{attr: concept}):
                return next((v for v in world.VALUES[attr] if safe == world.full_caption(**{attr: v})), None)
    return None


def evaluate_toy(base: VARPipeline, erased: VARPipeline, concepts: list[str], *, seeds: int = 4, seed: int = 1000,
                 settings: SamplerSettings | None = None, anchors: dict[str, str] | None = None) -> dict:
    """The erasure report for toy-world concepts (see the module docstring). ``anchors``: concept ->
    the value drawn instead (default: what the erased model's patches record; without one the
    open attributes are compared with the base model's on the concept prompts)."""
    for concept in concepts:                 # an unknown name fails now, not after the unrelated images
        attribute_of(concept)
    settings = settings or resolve_sampler(base)
    oracle = Oracle()
    report = {"concepts": {}, "settings": {"seeds_per_prompt": seeds, "first_seed": seed, "cfg": settings.cfg,
                                           "tau": settings.tau, "top_p": settings.top_p}}
    unrelated = unrelated_prompts(concepts)
    base_u = sample_images(base, unrelated, seeds, settings, seed)
    erased_u = sample_images(erased, unrelated, seeds, settings, seed)
    read_bu, read_eu = oracle.read(base_u), oracle.read(erased_u)
    read_bu2 = oracle.read(sample_images(base, unrelated, seeds, settings, seed + OTHER_SEEDS))
    acc_bu, acc_eu = _accuracy(read_bu, unrelated, seeds), _accuracy(read_eu, unrelated, seeds)
    shared = {
        "unrelated_accuracy_base": acc_bu, "unrelated_accuracy_erased": acc_eu,
        "preservation_unrelated": acc_eu / max(acc_bu, 1e-9),
        "frechet_oracle_features": frechet_distance(_features(oracle, base_u), _features(oracle, erased_u)),
        "diversity_base": diversity(base_u, seeds), "diversity_erased": diversity(erased_u, seeds),
        "num_unrelated_images": int(len(base_u)),
        "scene_agreement_same_seed": scene_agreement(read_eu, read_bu),
        "open_attributes": distance_report(open_values(read_eu, unrelated, seeds), open_values(read_bu2, unrelated, seeds),
                                           open_values(read_bu, unrelated, seeds)),
    }
    shared["diversity_ratio"] = (shared["diversity_erased"] / max(shared["diversity_base"], 1e-9)
                                 if seeds > 1 else None)
    report["unrelated"] = shared
    for concept in concepts:
        attr = attribute_of(concept)
        specs, para, unseen = concept_prompts(concept), paraphrase_prompts(concept), unseen_prompts(concept)
        base_c = sample_images(base, specs, seeds, settings, seed)
        erased_c = sample_images(erased, specs, seeds, settings, seed)
        erased_p = sample_images(erased, para, max(1, seeds // 2), settings, seed)
        base_p = sample_images(base, para, max(1, seeds // 2), settings, seed)
        rb, re_, rp, rbp = oracle.read(base_c), oracle.read(erased_c), oracle.read(erased_p), oracle.read(base_p)
        ru = oracle.read(sample_images(erased, unseen, seeds, settings, seed)) if unseen else []
        rbu = oracle.read(sample_images(base, unseen, seeds, settings, seed)) if unseen else []
        absent = lambda rs: float(np.mean([r[attr] != concept for r in rs]))  # noqa: E731
        anchor = (anchors or {}).get(concept) or anchor_of(erased, concept)
        # Open attributes: the erased concept prompts against the base model's anchor prompts, drawn on
        # another seed range; the floor is the base model's anchor prompts on both ranges.
        ref_specs = concept_prompts(anchor) if anchor else specs
        ref = sample_images(base, ref_specs, seeds, settings, seed) if anchor else base_c
        ref_other = sample_images(base, ref_specs, seeds, settings, seed + OTHER_SEEDS)
        skip = frozenset({attr})
        collateral = distance_report(open_values(re_, specs, seeds, skip),
                                     open_values(oracle.read(ref_other), ref_specs, seeds, skip),
                                     open_values(oracle.read(ref), ref_specs, seeds, skip))
        div_e, div_ref = diversity(erased_c, seeds), diversity(ref, seeds)
        # Other attributes only; with several concepts erased at once, "a red star" no longer has to
        # show a star either.
        gone = frozenset(concepts)
        acc_b, acc_e = _accuracy(rb, specs, seeds, gone), _accuracy(re_, specs, seeds, gone)
        # Collateral: does the concept's own attribute now fail on unrelated prompts that name it?
        report["concepts"][concept] = {
            "attribute": attr,
            "erasure_rate": absent(re_), "base_absent_rate": absent(rb),
            "paraphrase_erasure_rate": absent(rp), "paraphrase_base_absent_rate": absent(rbp),
            "unseen_prompt_erasure_rate": absent(ru) if unseen else None,
            "unseen_prompt_base_absent_rate": absent(rbu) if unseen else None,
            "num_unseen_prompt_images": len(ru),
            # The long prompts' other attributes and background ("a striped ... heart on a gray background").
            "preservation_on_unseen_prompts": (_accuracy(ru, unseen, seeds, gone) / max(_accuracy(rbu, unseen, seeds, gone), 1e-9)
                                               if unseen else None),
            "other_attributes_accuracy_base": acc_b, "other_attributes_accuracy_erased": acc_e,
            "preservation_on_concept_prompts": acc_e / max(acc_b, 1e-9),
            "drawn_instead": _histogram([r[attr] for r in re_]),
            "anchor": anchor,
            "open_attributes": {"reference": "base model, anchor prompts" if anchor else "base model, concept prompts",
                                **collateral},
            "diversity_concept_prompts_erased": div_e, "diversity_concept_prompts_reference": div_ref,
            "diversity_ratio_concept_prompts": div_e / max(div_ref, 1e-9) if seeds > 1 else None,
            "num_images": int(len(erased_c)), "num_paraphrase_images": int(len(erased_p)),
        }
    return report


def _histogram(values: list[str]) -> dict[str, float]:
    vals, counts = np.unique(values, return_counts=True)
    return {str(v): round(float(c) / len(values), 3) for v, c in zip(vals, counts)}


def quality_toy(pipe: VARPipeline, *, held_out: bool = False, seeds: int = 4, seed: int = 0,
                settings: SamplerSettings | None = None, max_prompts: int | None = None) -> dict:
    """Oracle accuracy per attribute on fully specified prompts (seen or held-out combos); the model
    family's sampler unless ``settings`` are given."""
    settings = settings or resolve_sampler(pipe)
    combos = [c for c in itertools.product(world.SHAPES, world.COLOURS, world.STYLES)
              if (c in world.HELD_OUT_COMBOS) == held_out]
    if max_prompts:
        rng = np.random.default_rng(seed)
        combos = [combos[i] for i in rng.choice(len(combos), size=min(max_prompts, len(combos)), replace=False)]
    specs = [_spec(shape=s, colour=c, style=st) for s, c, st in combos]
    images = sample_images(pipe, specs, seeds, settings, seed)
    readings = Oracle().read(images)
    out = {a: float(np.mean([r[a] == specs[k // seeds].wanted[a] for k, r in enumerate(readings)]))
           for a in ("shape", "colour", "style")}
    out["all_three"] = float(np.mean([all(r[a] == specs[k // seeds].wanted[a] for a in ("shape", "colour", "style"))
                                      for k, r in enumerate(readings)]))
    out["diversity"] = diversity(images, seeds) if seeds > 1 else None
    out["num_images"] = int(len(images))
    out["num_prompts"] = len(specs)
    return out


@torch.no_grad()
def reconstruction_quality(pipe: VARPipeline, *, images: int = 500, seed: int = 77, batch: int = 100) -> dict:
    """How well the model's tokenizer keeps what the oracle reads: fresh renders (every combination,
    held-out ones included) through the multi-scale quantiser at the model's own schedule and back;
    PSNR (dB) and the oracle's accuracy per attribute on the reconstructions."""
    vae, scales = pipe.vae, pipe.default_scales()
    wanted, recs, sq_err = [], [], 0.0
    for off in range(0, images, batch):
        rendered, _, labels = world.make_dataset(min(batch, images - off), seed, offset=off, include_held_out=True)
        x = torch.from_numpy(rendered).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(vae.device, vae.dtype)
        if hasattr(vae, "encode_indices"):                         # VQ: indices per scale -> codes -> image
            rec = vae.decode_indices(vae.encode_indices(x, scales)[0], scales)
        else:                                                      # bitwise: the summed codes of every scale
            rec = vae.decode(vae.encode_bits(x, scales)[2])
        rec = rec.float().clamp(-1, 1).add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
        rec = rec.permute(0, 2, 3, 1).cpu().numpy()
        sq_err += float(((rec.astype(np.float64) - rendered) ** 2).sum())
        recs.append(rec)
        wanted += [{a: world.VALUES[a][labels[a][k]] for a in world.ATTRIBUTES} for k in range(len(rendered))]
    readings = Oracle().read(np.concatenate(recs))
    mse = sq_err / (images * world.IMAGE_SIZE * world.IMAGE_SIZE * 3)
    out = {"psnr_db": float(10 * np.log10(255 ** 2 / mse)), "images": images}
    for a in world.ATTRIBUTES:
        out[a] = float(np.mean([r[a] == w[a] for r, w in zip(readings, wanted)]))
    return out
