"""The toy world's prompt pairs: concepts are attribute values ("red", "star", "striped")."""
from __future__ import annotations

from ..erasure.pairs import PairKind, PromptPair
from . import world


def toy_training_scenes(attribute: str) -> list[dict[str, str]]:
    """The fully specified scenes (both other attributes and the background) that toy pairs name:
    half of the combinations of the two other attributes, checkerboard-wise, so every value meets
    about half of the other's; the background alternates. Evaluation holds out the other half."""
    names = [a for a in ("shape", "colour", "style") if a != attribute]
    first, second = (world.VALUES[a] for a in names)
    combos = [(a, b) for i, a in enumerate(first) for j, b in enumerate(second) if (i + j) % 2 == 0]
    backgrounds = world.VALUES["background"]
    return [{names[0]: a, names[1]: b, "background": backgrounds[k % len(backgrounds)]} for k, (a, b) in enumerate(combos)]


def toy_pairs(concept: str, anchor: str) -> list[PromptPair]:
    """Pairs for a toy-world attribute value: the value alone, with each value of one other
    attribute, and in a few fully specified scenes (so long prompts learn it too)."""
    attribute = next((a for a, values in world.VALUES.items() if concept in values), None)
    if attribute is None:
        known = sorted(v for vs in world.VALUES.values() for v in vs)
        raise ValueError(f"{concept!r} is not a toy-world value; choose one of {known}")
    if anchor not in world.VALUES[attribute]:
        raise ValueError(f"anchor {anchor!r} must be another {attribute} of the toy world: {world.VALUES[attribute]}")
    others = [a for a in ("shape", "colour", "style") if a != attribute]
    scenes = [{}] + [{others[0]: v} for v in world.VALUES[others[0]]] + [{others[1]: v} for v in world.VALUES[others[1]]]
    if attribute != "background":
        scenes += toy_training_scenes(attribute)
    return [PromptPair(world.full_caption(**{attribute: concept}, **scene), world.full_caption(**{attribute: anchor}, **scene),
                       concept) for scene in scenes]




def preserve_prompts(concept: str) -> list[str]:
    """Prompts whose images must not change, when the user gives none: the other values of the
    concept's attribute alone, with a shape and with a style (cycled so every value of the other
    attributes appears), and every value of the other attributes alone, so the model keeps drawing
    "a green star", "an outlined orange shape" and "an outlined shape" while "red" goes.
    """
    attribute = next(a for a, values in world.VALUES.items() if concept in values)
    others = [a for a in ("shape", "colour", "style") if a != attribute]
    prompts = []
    for i, value in enumerate(v for v in world.VALUES[attribute] if v != concept):
        prompts.append(world.full_caption(**{attribute: value}))
        for other in others:
            prompts.append(world.full_caption(**{attribute: value, other: world.VALUES[other][i % len(world.VALUES[other])]}))
    prompts += [world.full_caption(**{other: v}) for other in others for v in world.VALUES[other]]
    return list(dict.fromkeys(prompts))


PAIR_KIND = PairKind("toy", toy_pairs, preserve_prompts)
