"""Prompt pairs: template expansion, parsing, files, and the checks that refuse pairs that cannot teach erasure."""
from __future__ import annotations

import json
import re
import warnings

import pytest

from svare_core.erasure import PromptPair, expand_concept, load_pairs, parse_pairs, validate_pairs
from svare_core.erasure.pairs import TEMPLATES
from svare_core.toyworld import world


def words(prompt: str) -> set[str]:
    return set(re.findall(r"[\w-]+", prompt.lower()))


# -- expansion from templates --------------------------------------------------------------------------
@pytest.mark.parametrize("kind, concept, anchor", [("object", "apple", "pear"),
                                                    ("style", "Van Gogh", "Monet"),
                                                    ("nudity", "nude", "dressed")])
def test_expand_template_kinds(kind, concept, anchor):
    pairs = expand_concept(concept, anchor, kind)
    assert len(pairs) == len(TEMPLATES[kind]) >= 6
    assert len({p.unsafe for p in pairs}) == len(pairs), "templates give distinct prompts"
    for p in pairs:
        assert p.concept == concept
        assert concept in p.unsafe and concept not in p.safe and anchor in p.safe
        assert p.unsafe.replace(concept, anchor) == p.safe, "the pair differs only in the concept"
    assert validate_pairs(pairs) == pairs


def test_expand_default_anchors_and_whitespace():
    nude = expand_concept("nude", None, "nudity")
    assert all("dressed" in p.safe and "nude" not in p.safe for p in nude)
    style = expand_concept("  Van Gogh ", None, "style")
    assert all(p.concept == "Van Gogh" and "a generic artist" in p.safe for p in style)
    with pytest.raises(ValueError, match="anchor"):
        expand_concept("apple", None, "object")      # objects have no default anchor


def test_expand_toy_red_to_blue():
    pairs = expand_concept("red", "blue", "toy")
    # the concept alone, with every shape, with every style, and half of the shape x style scenes
    scenes = (len(world.SHAPES) * len(world.STYLES) + 1) // 2
    assert len(pairs) == 1 + len(world.SHAPES) + len(world.STYLES) + scenes
    full = [p for p in pairs if "background" in p.unsafe]
    assert len(full) == scenes and all(len(words(p.unsafe) & set(world.STYLES)) == 1 for p in full)
    for value in (*world.SHAPES, *world.STYLES, *world.BACKGROUNDS):   # each value in at least two scenes
        assert sum(value in words(p.unsafe) for p in full) >= 2, value
    assert len(set(pairs)) == len(pairs)
    for p in pairs:
        assert p.concept == "red"
        assert "red" in words(p.unsafe) and "blue" not in words(p.unsafe)
        assert "blue" in words(p.safe) and "red" not in words(p.safe)
        # otherwise identical, word for word
        assert p.unsafe.split() == [("red" if w == "blue" else w) for w in p.safe.split()]
    mentioned = set().union(*(words(p.unsafe) for p in pairs))
    assert set(world.SHAPES) <= mentioned and set(world.STYLES) <= mentioned
    assert validate_pairs(pairs) == pairs


def test_expand_toy_shape_concept():
    pairs = expand_concept("star", "circle", "toy")
    assert len(pairs) == 1 + len(world.COLOURS) + len(world.STYLES) + (len(world.COLOURS) * len(world.STYLES) + 1) // 2
    for p in pairs:
        assert p.safe == p.unsafe.replace("star", "circle")
        assert "star" in words(p.unsafe)


def test_expand_errors():
    with pytest.raises(ValueError, match="empty"):
        expand_concept("", "blue", "toy")
    with pytest.raises(ValueError, match="empty"):
        expand_concept("   ", "blue", "object")
    with pytest.raises(ValueError, match="concept itself"):
        expand_concept("Red", "red", "object")        # case-insensitive
    with pytest.raises(ValueError, match="unknown kind 'painting'"):
        expand_concept("apple", "pear", "painting")
    with pytest.raises(ValueError, match="not a toy-world value"):
        expand_concept("banana", "blue", "toy")
    with pytest.raises(ValueError, match="another colour"):
        expand_concept("red", "circle", "toy")         # the anchor must be of the same attribute
    with pytest.raises(ValueError, match="another colour"):
        expand_concept("red", "crimson", "toy")


# -- explicit pairs ------------------------------------------------------------------------------------
def test_parse_pairs_lines_comments_and_blank_lines():
    text = """
    # a comment
    a red star => a blue star

      a red circle=>a blue circle   
    # a => b in a comment is skipped too
    a => b => c
    """
    pairs = parse_pairs(text, "red")
    assert pairs == [PromptPair("a red star", "a blue star", "red"), PromptPair("a red circle", "a blue circle", "red"),
                     PromptPair("a", "b => c", "red")]
    assert parse_pairs("x => y")[0].concept == ""


def test_parse_pairs_errors():
    with pytest.raises(ValueError, match=r"line 3: 'a red star - a blue star' has no '=>'"):
        parse_pairs("# pairs\na => b\na red star - a blue star\n")
    with pytest.raises(ValueError, match="non-empty"):
        parse_pairs("a red star =>   ")
    with pytest.raises(ValueError, match="non-empty"):
        PromptPair(" ", "a blue star")


def test_load_pairs_json_dicts_and_lists(tmp_path):
    dicts = tmp_path / "pairs.json"
    dicts.write_text(json.dumps([{"unsafe": "a red star", "safe": "a blue star"},
                                 {"unsafe": "a star by Van Gogh", "safe": "a star", "concept": "Van Gogh"}]))
    got = load_pairs(dicts, "red")
    assert got == [PromptPair("a red star", "a blue star", "red"), PromptPair("a star by Van Gogh", "a star", "Van Gogh")]
    lists = tmp_path / "lists.json"
    lists.write_text(json.dumps([["a red star", "a blue star"], ["a red heart", "a blue heart"]]))
    assert load_pairs(lists) == [PromptPair("a red star", "a blue star"), PromptPair("a red heart", "a blue heart")]


def test_load_pairs_csv_with_and_without_header(tmp_path):
    expected = [PromptPair("a red star, large", "a blue star, large", "red"), PromptPair("a red heart", "a blue heart", "red")]
    with_header = tmp_path / "h.csv"
    with_header.write_text('unsafe,safe\n"a red star, large","a blue star, large"\n# skipped\n a red heart , a blue heart\n\n')
    assert load_pairs(with_header, "red") == expected
    without = tmp_path / "n.csv"
    without.write_text('"a red star, large","a blue star, large"\na red heart,a blue heart\n')
    assert load_pairs(without, "red") == expected
    capital = tmp_path / "c.csv"
    capital.write_text("Unsafe, Safe\na red heart,a blue heart\n")
    assert load_pairs(capital) == [PromptPair("a red heart", "a blue heart")]


def test_load_pairs_text_file(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("# erase red\na red star => a blue star\n\na red heart => a blue heart\n")
    assert load_pairs(path, "red") == [PromptPair("a red star", "a blue star", "red"),
                                       PromptPair("a red heart", "a blue heart", "red")]
    bad = tmp_path / "bad.txt"
    bad.write_text("a red star, a blue star\n")
    with pytest.raises(ValueError, match="line 1"):
        load_pairs(bad)


# -- validation ----------------------------------------------------------------------------------------
def test_validate_refuses_unsafe_prompt_without_the_concept():
    with pytest.raises(ValueError, match="does not mention the concept 'red'"):
        validate_pairs([PromptPair("a red star", "a blue star", "red"), PromptPair("a green star", "a blue star", "red")])
    # whole words only: "redwood" does not name "red"
    with pytest.raises(ValueError, match="does not mention"):
        validate_pairs([PromptPair("a redwood tree", "a pine tree", "red")])
    # case-insensitive, multi-word concepts
    assert len(validate_pairs([PromptPair("A city by VAN GOGH", "a city", "Van Gogh")])) == 1
    # pairs without a concept are not checked for it
    assert len(validate_pairs([PromptPair("a green star", "a blue star")])) == 1


def test_validate_refuses_identical_prompts_and_empty_lists():
    with pytest.raises(ValueError, match="same prompt twice"):
        validate_pairs([PromptPair("a red star", " A Red Star ", "red")])
    with pytest.raises(ValueError, match="no prompt pairs"):
        validate_pairs([])


def test_validate_drops_duplicates_with_a_warning():
    pairs = [PromptPair("a red star", "a blue star", "red"), PromptPair("a red heart", "a blue heart", "red"),
             PromptPair("A red star ", "a BLUE star", "red")]
    with pytest.warns(UserWarning, match="duplicate pair"):
        got = validate_pairs(pairs)
    assert got == pairs[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert validate_pairs(pairs[:2]) == pairs[:2]   # no warning without duplicates


def test_joint_pairs_swap_every_erased_concept_for_its_anchor():
    from svare_core.erasure import build_pairs

    pairs = build_pairs("red, star", "blue, circle", "toy")
    assert {p.concept for p in pairs} == {"red", "star"}
    for p in pairs:
        assert not {"red", "star"} & words(p.safe), p       # the target never shows an erased concept
    safe_of = {p.unsafe: p.safe for p in pairs}
    assert safe_of["a red star"] == "a blue circle"          # both swapped, one pair (not one per concept)
    assert [p.unsafe for p in pairs].count("a red star") == 1
    assert safe_of["an orange star"] == "an orange circle"
    single = build_pairs("star", "circle", "toy")
    assert any("red" in p.safe.split() for p in single)  # alone, "a red star" -> "a red circle" is fine


def test_substitute_swaps_whole_words_and_fixes_the_article():
    from svare_core.erasure.pairs import substitute

    assert substitute("An orange star on an orange background", "orange", "blue") == "A blue star on a blue background"
    assert substitute("a red star", "red", "orange") == "an orange star"
    assert substitute("a starfish and a star", "star", "circle") == "a starfish and a circle"


# -- default preservation prompts ----------------------------------------------------------------------
@pytest.mark.parametrize("concept", ["red", "star", "striped"])
def test_default_preserve_prompts_keep_the_rest_of_the_attribute(concept):
    from svare_core.erasure.pairs import default_preserve_prompts

    prompts = default_preserve_prompts(concept, "toy")
    attribute = next(a for a, vs in world.VALUES.items() if concept in vs)
    others = [a for a in ("shape", "colour", "style") if a != attribute]
    named = [words(q) for q in prompts]
    assert not any(concept in w for w in named), "a preservation prompt never asks for the erased concept"
    for value in world.VALUES[attribute]:
        if value != concept:
            assert any(value in w for w in named), f"{value} is kept"
    for other in others:          # both other attributes appear next to a kept value, and every value of them
        assert any(words(world.full_caption(**{other: v})) & w - {"a", "an", "shape"} for v in world.VALUES[other]
                   for w in named if w & set(world.VALUES[attribute])), other
        for v in world.VALUES[other]:
            assert any(v in w for w in named), v
    assert len(set(prompts)) == len(prompts)
    assert default_preserve_prompts(concept, "object") == []


def test_preserve_prompts_for_several_concepts_and_user_prompts():
    from svare_core.erasure import build_pairs
    from svare_core.erasure.pairs import preserve_prompts_for

    pairs = build_pairs("red, star", "blue, circle", "toy")
    prompts = preserve_prompts_for(pairs, "toy")
    assert prompts and not any({"red", "star"} & words(q) for q in prompts), "none names an erased concept"
    assert not set(prompts) & {p.unsafe for p in pairs}
    assert len(set(prompts)) == len(prompts)
    given = ["a green heart", "a green heart", "a dotted square"]
    assert preserve_prompts_for(pairs, "toy", given) == ["a green heart", "a dotted square"]


@pytest.mark.parametrize("concept, anchor", [("red", "blue"), ("star", "circle"), ("striped", "solid")])
def test_unseen_evaluation_prompts_are_never_trained_on(concept, anchor):
    from svare_core.toyworld.evaluate import unseen_prompts

    trained = {p.unsafe for p in expand_concept(concept, anchor, "toy")}
    unseen = unseen_prompts(concept)
    assert len(unseen) == 12 and len({u.prompt for u in unseen}) == 12
    for u in unseen:
        assert u.prompt not in trained and concept in words(u.prompt)
        assert set(u.wanted) == {"shape", "colour", "style", "background"}
    # the training pairs do name some fully specified scenes, and no unseen prompt shares their
    # combination of the other attributes, whatever the background
    strip = lambda prompt: prompt.split(" on a ")[0]  # noqa: E731
    assert sum("background" in t for t in trained) >= 10
    assert not {strip(u.prompt) for u in unseen} & {strip(t) for t in trained}
