"""Prompt pairs (unsafe prompt c_u -> safe anchor c_s) that differ only in the concept.

Pairs come from the user (a file, or lines "unsafe => safe"), or are expanded from a concept and
an anchor through templates of a kind: object, style, nudity, or the toy world's attributes.
"""
from __future__ import annotations

import csv
import io
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PromptPair:
    unsafe: str
    safe: str
    concept: str = ""

    def __post_init__(self) -> None:
        if not self.unsafe.strip() or not self.safe.strip():
            raise ValueError(f"a prompt pair needs two non-empty prompts, got {self.unsafe!r} => {self.safe!r}")


TEMPLATES: dict[str, list[str]] = {
    "object": ["a photo of a {}", "a {} on a table", "a close-up photo of a {}", "a painting of a {}",
               "a {} in a field", "a picture of a {} in a room", "a black and white photo of a {}",
               "a {} under the sky"],
    "style": ["a painting of a city in the style of {}", "a portrait of a woman in the style of {}",
              "a landscape with mountains in the style of {}", "a still life with fruit in the style of {}",
              "a street at night, art by {}", "a harbour with boats by {}", "a cat, painted by {}",
              "a garden with flowers in the style of {}"],
    "nudity": ["a photo of a {} person", "a {} woman on the beach", "a {} man in a room",
               "a painting of a {} figure", "a {} couple in a garden", "a portrait of a {} model"],
}
DEFAULT_ANCHORS = {"nudity": "dressed", "style": "a generic artist"}
KINDS = (*TEMPLATES, "toy")


def _mentions(prompt: str, concept: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(concept.lower())}(?!\w)", prompt.lower()) is not None


def toy_training_scenes(attribute: str) -> list[dict[str, str]]:
    """The fully specified scenes (both other attributes and the background) that toy pairs name:
    half of the combinations of the two other attributes, checkerboard-wise, so every value meets
    about half of the other's; the background alternates. Evaluation holds out the other half."""
    from ..toyworld import world

    names = [a for a in ("shape", "colour", "style") if a != attribute]
    first, second = (world.VALUES[a] for a in names)
    combos = [(a, b) for i, a in enumerate(first) for j, b in enumerate(second) if (i + j) % 2 == 0]
    backgrounds = world.VALUES["background"]
    return [{names[0]: a, names[1]: b, "background": backgrounds[k % len(backgrounds)]} for k, (a, b) in enumerate(combos)]


def toy_pairs(concept: str, anchor: str) -> list[PromptPair]:
    """Pairs for a toy-world attribute value: the value alone, with each value of one other
    attribute, and in a few fully specified scenes (so long prompts learn it too)."""
    from ..toyworld import world

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


def template_prompts(concept: str, kind: str = "object") -> list[str]:
    """The templates of ``kind`` filled with ``concept``: prompts that ask for it."""
    if kind not in TEMPLATES:
        raise ValueError(f"no prompt templates for kind {kind!r}; choose one of {sorted(TEMPLATES)}")
    return [t.format(concept) for t in TEMPLATES[kind]]


def expand_concept(concept: str, anchor: str | None = None, kind: str = "object") -> list[PromptPair]:
    """Build pairs from templates: ``expand_concept("Van Gogh", "Monet", "style")``."""
    concept = (concept or "").strip()
    if not concept:
        raise ValueError("the concept to erase is empty: name it, e.g. 'red' or 'Van Gogh'")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
    anchor = (anchor or DEFAULT_ANCHORS.get(kind, "")).strip()
    if not anchor:
        raise ValueError(f"give an anchor concept to draw instead of {concept!r} (e.g. a related but harmless one)")
    if anchor.lower() == concept.lower():
        raise ValueError(f"the anchor {anchor!r} is the concept itself: choose a different one")
    if kind == "toy":
        return toy_pairs(concept, anchor)
    return [PromptPair(u, s, concept) for u, s in zip(template_prompts(concept, kind), template_prompts(anchor, kind))]


def parse_pairs(text: str, concept: str | None = None) -> list[PromptPair]:
    """Lines "unsafe prompt => safe prompt" (blank lines and # comments skipped)."""
    pairs = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=>" not in line:
            raise ValueError(f"line {n}: {line!r} has no '=>'; write 'unsafe prompt => safe prompt'")
        unsafe, safe = (p.strip() for p in line.split("=>", 1))
        pairs.append(PromptPair(unsafe, safe, concept or ""))
    return pairs


def load_pairs(path: str | Path, concept: str | None = None) -> list[PromptPair]:
    """Pairs from a .json ([{"unsafe": .., "safe": ..}] or [[u, s], ..]), .csv (unsafe,safe) or text file."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".json":
        items = json.loads(text)
        pairs = [PromptPair(i["unsafe"], i["safe"], i.get("concept", concept or "")) if isinstance(i, dict)
                 else PromptPair(i[0], i[1], concept or "") for i in items]
    elif path.suffix == ".csv":
        rows = [r for r in csv.reader(io.StringIO(text)) if r and not r[0].startswith("#")]
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["unsafe", "safe"]:
            rows = rows[1:]
        pairs = [PromptPair(r[0].strip(), r[1].strip(), concept or "") for r in rows]
    else:
        pairs = parse_pairs(text, concept)
    return pairs


def validate_pairs(pairs: list[PromptPair]) -> list[PromptPair]:
    """Refuse pairs that cannot teach erasure; warn about duplicates (and drop them)."""
    if not pairs:
        raise ValueError("no prompt pairs: give pairs, or a concept and an anchor")
    seen, unique = set(), []
    for p in pairs:
        if p.concept and not _mentions(p.unsafe, p.concept):
            raise ValueError(f"the unsafe prompt {p.unsafe!r} does not mention the concept {p.concept!r}: "
                             "each unsafe prompt must name what is erased")
        if p.unsafe.strip().lower() == p.safe.strip().lower():
            raise ValueError(f"the pair {p.unsafe!r} => {p.safe!r} has the same prompt twice: the safe prompt "
                             "must differ in the concept")
        key = (p.unsafe.strip().lower(), p.safe.strip().lower())
        if key in seen:
            warnings.warn(f"duplicate pair {p.unsafe!r} => {p.safe!r} dropped", stacklevel=2)
            continue
        seen.add(key)
        unique.append(p)
    return unique


def name_concepts(pairs: list[PromptPair], concepts: list[str]) -> list[PromptPair]:
    """Tag each untagged pair with the first of ``concepts`` its unsafe prompt names."""
    return [p if p.concept else PromptPair(p.unsafe, p.safe, next((c for c in concepts if _mentions(p.unsafe, c)), ""))
            for p in pairs]


def build_pairs(concepts: str | list[str], anchors: str | list[str] | None = None, kind: str = "object",
                pairs_text: str = "") -> list[PromptPair]:
    """Pairs as users describe them: explicit "unsafe => safe" lines win over templates; else one
    or several concepts ("red, star") with one anchor each, or one anchor for all."""
    split = lambda v: [x.strip() for x in (v.split(",") if isinstance(v, str) else v or []) if x and x.strip()]  # noqa: E731
    concepts, anchors = split(concepts), split(anchors)
    if pairs_text.strip():
        return validate_pairs(name_concepts(parse_pairs(pairs_text), concepts))
    if not concepts:
        raise ValueError("name the concept to erase (or write prompt pairs 'unsafe => safe')")
    if len(anchors) > 1 and len(anchors) != len(concepts):
        raise ValueError(f"{len(concepts)} concepts but {len(anchors)} anchors: give one anchor per concept "
                         "(comma-separated, in the same order) or a single anchor for all")
    anchors = anchors * len(concepts) if len(anchors) == 1 else anchors or [None] * len(concepts)
    pairs = [p for c, a in zip(concepts, anchors) for p in expand_concept(c, a, kind)]
    if len(concepts) > 1:
        pairs = _joint_targets(pairs, dict(zip(concepts, (a or DEFAULT_ANCHORS.get(kind, "") for a in anchors))))
    return validate_pairs(pairs)


def _joint_targets(pairs: list[PromptPair], anchors: dict[str, str]) -> list[PromptPair]:
    """Erasing several concepts at once: a safe target that shows another erased concept ("a red
    star" -> "a red circle" while red goes too) would teach the model to keep it, so that concept
    is swapped for its anchor too ("a blue circle"). Pairs that become identical are merged."""
    out: dict[tuple[str, str], PromptPair] = {}
    for p in pairs:
        safe = p.safe
        for concept, anchor in anchors.items():
            if concept != p.concept:
                safe = substitute(safe, concept, anchor)
        if not any(_mentions(safe, c) for c in anchors):
            out.setdefault((p.unsafe.lower(), safe.lower()), PromptPair(p.unsafe, safe, p.concept))
    return list(out.values())


def substitute(prompt: str, concept: str, replacement: str) -> str:
    """``prompt`` with each whole-word ``concept`` replaced, fixing the article before it
    ("an orange star", orange -> blue: "a blue star")."""
    word = rf"(?<!\w){re.escape(concept)}(?!\w)"
    article = "an" if replacement[:1].lower() in "aeiou" else "a"
    prompt = re.sub(rf"(?<!\w)(an?)(\s+){word}",
                    lambda m: (article.capitalize() if m[1][0].isupper() else article) + m[2] + replacement,
                    prompt, flags=re.IGNORECASE)
    return re.sub(word, replacement, prompt, flags=re.IGNORECASE)


def default_preserve_prompts(concept: str, kind: str) -> list[str]:
    """Prompts whose images must not change, when the user gives none.

    For the toy world: the other values of the concept's attribute alone, with a shape and with a
    style (cycled so every value of the other attributes appears), and every value of the other
    attributes alone, so the model keeps drawing "a green star", "an outlined orange shape" and
    "an outlined shape" while "red" goes. For real-model kinds, none: only the anchors are preserved
    unless the user names more.
    """
    if kind != "toy":
        return []
    from ..toyworld import world

    attribute = next(a for a, values in world.VALUES.items() if concept in values)
    others = [a for a in ("shape", "colour", "style") if a != attribute]
    prompts = []
    for i, value in enumerate(v for v in world.VALUES[attribute] if v != concept):
        prompts.append(world.full_caption(**{attribute: value}))
        for other in others:
            prompts.append(world.full_caption(**{attribute: value, other: world.VALUES[other][i % len(world.VALUES[other])]}))
    prompts += [world.full_caption(**{other: v}) for other in others for v in world.VALUES[other]]
    return list(dict.fromkeys(prompts))


def preserve_prompts_for(pairs: list[PromptPair], kind: str, given: list[str] | None = None) -> list[str]:
    """The user's preservation prompts, or the defaults of every erased concept (never an unsafe prompt)."""
    if given:
        return list(dict.fromkeys(given))
    concepts = sorted({p.concept for p in pairs if p.concept})
    unsafe = {p.unsafe for p in pairs}
    prompts = [q for c in concepts for q in default_preserve_prompts(c, kind)]
    # Several concepts at once: a default for one may name another ("a star" when erasing red and star).
    return [q for q in dict.fromkeys(prompts) if q not in unsafe and not any(_mentions(q, c) for c in concepts)]
