"""The example workflows do what their Notes say: each workflow's graph runs on the toy model with its own
widget values and seeds (scripts/workflow_runner.py, the node classes under inference mode, as ComfyUI
runs them), and the toy world's oracle reads every image a Note's "What it shows" lines talk about.

Erase Concept's patches come from tests/fixtures/workflow_patches/ after a check that the node would
train them from exactly the same inputs; SVARE_SLOW_TESTS=1 also retrains them (minutes each) and
compares checksums. Each workflow also has its thumbnail (scripts/make_thumbnails.py), and gives the same result on 2 threads.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import make_thumbnails  # noqa: E402
import workflow_runner as wr  # noqa: E402

WORKFLOWS = wr.workflows()
IDS = [p.stem for p in WORKFLOWS]
SLOW = bool(os.environ.get("SVARE_SLOW_TESTS"))


@pytest.fixture(scope="module")
def checked():
    """Each workflow run once (with its patches at strength 0 too where a claim needs it)."""
    return {p.stem: wr.check(p) for p in WORKFLOWS}


def test_the_workflows_are_in_example_workflows():
    assert IDS == ["Erase style and compare", "Erase with Switti (VQ toy model)", "Load patch and generate",
                   "Multi-concept erasure", "Safety check"]
    assert not (ROOT / "workflows").exists(), "ComfyUI lists example_workflows/ (the old workflows/ is gone)"


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_every_note_says_what_it_shows(path):
    claims = wr.claims(wr.load(path))
    assert claims, f"{path.name}: its Note has no '{wr.CLAIMS_HEADER}' lines"
    text = wr.note(wr.load(path))
    assert "1 and 2 CPU threads" in text, f"{path.name}: its Note does not say whether threads change the result"


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_the_note_s_claims_hold_on_the_toy_model(path, checked):
    failed, seen, _ = checked[path.stem]
    assert not failed, f"{path.name}: " + "\n".join(failed) + "\nread: " + json.dumps(
        {f"{k} {i}": v for (k, i), v in sorted(seen.items())}, indent=1)


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_same_result_on_one_and_two_threads(path, checked):
    """As the Notes say: on 2 threads the sampler draws the same bits, the images differ by float rounding only,
    and every claim holds (the trained patches differ with threads: measured, see docs/comfyui.md)."""
    _, _, one = checked[path.stem]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        failed, _, two = wr.check(path)
    finally:
        torch.set_num_threads(threads)
    assert not failed, f"{path.name} on 2 threads: " + "\n".join(failed)
    diff = wr.compare_runs(one, two)
    assert diff["bits_equal"] and diff["max_float_difference"] < 1e-5, f"{path.name}: 1 vs 2 threads: {diff}"


def test_a_false_claim_fails(tmp_path):
    """The check is not vacuous: a Note that says the red star stays unflagged fails."""
    path = ROOT / "example_workflows" / "Safety check.json"
    wf = wr.load(path)
    (n,) = [n for n in wf["nodes"] if n["type"] == "Note"]
    line = next(c.line for c in wr.claims(wf) if c.kind == "flag")
    n["widgets_values"][0] = n["widgets_values"][0].replace(line, line.replace(", flagged", ", not flagged"))
    wrong = tmp_path / path.name
    wrong.write_text(json.dumps(wf))
    failed, _, _ = wr.check(wrong)
    assert len(failed) == 1 and "not flagged" in failed[0]


def test_claims_are_parsed():
    wf = {"nodes": [{"type": "Note", "widgets_values": [
        "Intro.\n\nWhat it shows (seeds as saved):\n"
        "- row 1: a solid red star on a black background -> a solid blue circle on a black background\n"
        "- row 2: a dotted green square on a black background -> unchanged\n"
        "- image 3: a solid red star on a black background, not flagged\n\nMore text.\n- not a claim"]}]}
    c = wr.claims(wf)
    assert [(x.kind, x.index) for x in c] == [("row", 1), ("row", 2), ("flag", 3)]
    assert c[1].before == c[1].after == "a dotted green square on a black background"
    assert c[2].flagged is False and c[0].after == "a solid blue circle on a black background"
    bad = {"nodes": [{"type": "Note", "widgets_values": ["What it shows:\n- row one: x"]}]}
    with pytest.raises(ValueError, match="cannot read the claim"):
        wr.claims(bad)


def test_a_stored_patch_trained_otherwise_is_refused(tmp_path, monkeypatch):
    """A fixture whose training inputs differ from what the node would use is not silently used."""
    path = ROOT / "example_workflows" / "Erase style and compare.json"
    wf = wr.load(path)
    (node,) = wr.nodes_of(wf, "SvareEraseConcept")
    node["widgets_values"][5] += 1                      # steps
    changed = tmp_path / path.name
    changed.write_text(json.dumps(wf))
    with pytest.raises(wr.StoredPatchMismatch, match="steps"):
        wr.run_workflow(changed)


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_thumbnail(path):
    """ComfyUI's template browser asks for <name>.jpg next to the workflow."""
    from PIL import Image

    thumb = path.with_suffix(".jpg")
    assert thumb.is_file(), f"{thumb.name} is missing: python scripts/make_thumbnails.py"
    assert thumb.stat().st_size <= make_thumbnails.MAX_BYTES
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and im.size == (make_thumbnails.SIZE, make_thumbnails.SIZE)


@pytest.mark.skipif(not SLOW, reason="retrains every Erase Concept node (minutes each): SVARE_SLOW_TESTS=1")
@pytest.mark.parametrize("path", [p for p in WORKFLOWS if wr.nodes_of(wr.load(p), "SvareEraseConcept")],
                         ids=lambda p: p.stem)
def test_stored_patches_are_what_the_workflows_train(path):
    from svare_core.erasure import ErasurePatch

    run = wr.run_workflow(path, train=True)
    for nid, checksum in wr.patch_checksums(path, run).items():
        assert checksum == ErasurePatch.load(wr.patch_fixture(path, nid)).checksum(), \
            f"{path.name}: Erase Concept #{nid} trains another patch than the stored one"
