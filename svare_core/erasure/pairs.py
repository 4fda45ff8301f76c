"""Prompt pairs (unsafe prompt c_u -> safe anchor c_s) that differ only in the concept.

Pairs come from the user (a file, or lines "unsafe => safe"), or are expanded from a concept and
an anchor by a kind: the templates object, style and nudity, or a plug-in's kind (the toy world's
attributes: svare_core/toyworld/pairs.py).
"""
from __future__ import annotations

import csv
import io
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import plugins


@dataclass(frozen=True)
class PromptPair:
    unsafe: str
    safe: str
    concept: str = ""

    def __post_init__(self) -> None:
        if not all(isinstance(x, str) for x in (self.unsafe, self.safe, self.concept)):
            raise ValueError(f"a prompt pair is text, got {self.unsafe!r} => {self.safe!r} ({self.concept!r})")
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


def mentions(prompt: str, concept: str) -> bool:
    """Whether ``prompt`` names ``concept`` as a whole word."""
    return re.search(rf"(?<!\w){re.escape(concept.lower())}(?!\w)", prompt.lower()) is not None


@dataclass(frozen=True)
class PairKind:
    """How concepts of one kind become prompt pairs, and what is preserved when the user says nothing."""
    name: str
    expand: Callable[[str, str], list[PromptPair]]            # (concept, anchor) -> pairs
    preserve_prompts: Callable[[str], list[str]] = lambda concept: []
    default_anchor: str = ""


def _template_kind(kind: str) -> PairKind:
    return PairKind(kind, lambda c, a: [PromptPair(u, s, c) for u, s in zip(template_prompts(c, kind),
                                                                           template_prompts(a, kind))],
                    default_anchor=DEFAULT_ANCHORS.get(kind, ""))


def pair_kinds() -> list[str]:
    """The template kinds, then those plug-ins add."""
    return [*TEMPLATES, *(k for k in plugins.names("pair_kind") if k not in TEMPLATES)]


def pair_kind(kind: str) -> PairKind:
    if kind in TEMPLATES:
        return _template_kind(kind)
    found = plugins.get("pair_kind", kind)
    if found is None:
        raise ValueError(f"unknown kind {kind!r}; choose one of {tuple(pair_kinds())}")
    return found


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
    how = pair_kind(kind)
    anchor = (anchor or how.default_anchor).strip()
    if not anchor:
        raise ValueError(f"give an anchor concept to draw instead of {concept!r} (e.g. a related but harmless one)")
    if anchor.lower() == concept.lower():
        raise ValueError(f"the anchor {anchor!r} is the concept itself: choose a different one")
    return how.expand(concept, anchor)


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
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: is not a text file of pairs ({e.reason} at byte {e.start})") from None
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}: is not valid JSON ({e})") from None
        if not isinstance(items, list):
            raise ValueError(f"{path}: must hold a list of pairs, got {type(items).__name__}")
        pairs = [_json_pair(item, n, path, concept) for n, item in enumerate(items, 1)]
    elif path.suffix == ".csv":
        rows = [r for r in csv.reader(io.StringIO(text)) if r and not r[0].startswith("#")]
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["unsafe", "safe"]:
            rows = rows[1:]
        short = next((n for n, r in enumerate(rows, 1) if len(r) < 2), None)
        if short is not None:
            raise ValueError(f"{path}: row {short} has {len(rows[short - 1])} column(s); write 'unsafe prompt,safe prompt'")
        pairs = [PromptPair(r[0].strip(), r[1].strip(), concept or "") for r in rows]
    else:
        pairs = parse_pairs(text, concept)
    return pairs


def _json_pair(item, n: int, path: Path, concept: str | None) -> PromptPair:
    """One pair of a .json file: {"unsafe": .., "safe": .., "concept": ..} or [unsafe, safe]."""
    if isinstance(item, dict) and isinstance(item.get("unsafe"), str) and isinstance(item.get("safe"), str) \
            and isinstance(item.get("concept", ""), str):
        return PromptPair(item["unsafe"], item["safe"], item.get("concept") or concept or "")
    if isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item):
        return PromptPair(item[0], item[1], concept or "")
    raise ValueError(f"{path}: pair {n} is {json.dumps(item)[:60]}; write {{\"unsafe\": \"...\", \"safe\": \"...\"}} "
                     "or [\"unsafe prompt\", \"safe prompt\"]")


def validate_pairs(pairs: list[PromptPair]) -> list[PromptPair]:
    """Refuse pairs that cannot teach erasure; warn about duplicates (and drop them)."""
    if not pairs:
        raise ValueError("no prompt pairs: give pairs, or a concept and an anchor")
    seen, unique = set(), []
    for p in pairs:
        if p.concept and not mentions(p.unsafe, p.concept):
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


def tag_pairs(pairs: list[PromptPair], concepts: list[str]) -> list[PromptPair]:
    """User-written pairs (a file, inline lines) tagged with the concept each erases, then validated.

    One concept: every untagged pair erases it. Several: each pair erases the first its unsafe
    prompt names. A patch must say what it erases, so pairs with no concept, or an unsafe prompt
    that names none of them, are refused.
    """
    concepts = [c.strip() for c in concepts if c and c.strip()]
    if not concepts and not all(p.concept for p in pairs):
        raise ValueError("name the concept the pairs erase (--concept, or the concept widget): a patch must say "
                         "what it erases")
    if len(concepts) == 1:
        pairs = [p if p.concept else PromptPair(p.unsafe, p.safe, concepts[0]) for p in pairs]
    pairs = name_concepts(pairs, concepts)
    untagged = next((p for p in pairs if not p.concept), None)
    if untagged is not None:
        raise ValueError(f"the unsafe prompt {untagged.unsafe!r} names none of the concepts {concepts}: each pair "
                         "must name the concept it erases")
    return validate_pairs(pairs)


def name_concepts(pairs: list[PromptPair], concepts: list[str]) -> list[PromptPair]:
    """Tag each untagged pair with the first of ``concepts`` its unsafe prompt names."""
    return [p if p.concept else PromptPair(p.unsafe, p.safe, next((c for c in concepts if mentions(p.unsafe, c)), ""))
            for p in pairs]


def build_pairs(concepts: str | list[str], anchors: str | list[str] | None = None, kind: str = "object",
                pairs_text: str = "") -> list[PromptPair]:
    """Pairs as users describe them: explicit "unsafe => safe" lines win over templates; else one
    or several concepts ("red, star") with one anchor each, or one anchor for all."""
    split = lambda v: [x.strip() for x in (v.split(",") if isinstance(v, str) else v or []) if x and x.strip()]  # noqa: E731
    concepts, anchors = split(concepts), split(anchors)
    if pairs_text.strip():
        return tag_pairs(parse_pairs(pairs_text), concepts)
    if not concepts:
        raise ValueError("name the concept to erase (or write prompt pairs 'unsafe => safe')")
    if len(anchors) > 1 and len(anchors) != len(concepts):
        raise ValueError(f"{len(concepts)} concepts but {len(anchors)} anchors: give one anchor per concept "
                         "(comma-separated, in the same order) or a single anchor for all")
    anchors = anchors * len(concepts) if len(anchors) == 1 else anchors or [None] * len(concepts)
    pairs = [p for c, a in zip(concepts, anchors) for p in expand_concept(c, a, kind)]
    if len(concepts) > 1:
        default = pair_kind(kind).default_anchor
        pairs = _joint_targets(pairs, dict(zip(concepts, (a or default for a in anchors))))
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
        if not any(mentions(safe, c) for c in anchors):
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
    """Prompts whose images must not change when the user gives none: the kind's choice (for the
    template kinds, none: only the anchors are preserved unless the user names more)."""
    return list(pair_kind(kind).preserve_prompts(concept))


def preserve_prompts_for(pairs: list[PromptPair], kind: str, given: list[str] | None = None) -> list[str]:
    """The user's preservation prompts, or the defaults of every erased concept (never an unsafe prompt)."""
    if given:
        return list(dict.fromkeys(given))
    concepts = sorted({p.concept for p in pairs if p.concept})
    unsafe = {p.unsafe for p in pairs}
    prompts = [q for c in concepts for q in default_preserve_prompts(c, kind)]
    # Several concepts at once: a default for one may name another ("a star" when erasing red and star).
    return [q for q in dict.fromkeys(prompts) if q not in unsafe and not any(mentions(q, c) for c in concepts)]
