"""benchmarks/erasure_targets.py: issue 15's targets are checked with the right sense and bounds."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from erasure_targets import checks, targets_table  # noqa: E402


def _row(method="svare", cpu=100.0, erasure=1.0, unseen=0.99, synonym=0.985, ratio_c=1.5, ratio_u=1.01,
         preservation=0.98, diversity=0.95, words=0.0, search=0.0625, soft=0.2):
    def tv(ratio):
        return {"tv_distance": 0.1 * ratio, "tv_noise_floor": 0.1, "tv_ratio_to_floor": ratio}
    concept = {"erasure_rate": erasure, "unseen_prompt_erasure_rate": unseen, "paraphrase_erasure_rate": synonym,
               "open_attributes": tv(ratio_c), "diversity_ratio_concept_prompts": diversity}
    attacks = {"near_words": {"strongest": {"word": "blu", "erased": words}},
               "token_search": {"words": ["x", "y"], "erased": search}, "soft_prompt": {"erased": soft, "base": 1.0}}
    return {"method": method, "concepts": ["red"], "cpu_seconds": cpu,
            "report": {"concepts": {"red": concept}, "attacks": {"red": attacks},
                       "unrelated": {"open_attributes": tv(ratio_u), "preservation_unrelated": preservation}}}


def test_each_target_at_and_past_its_bound():
    met = {what: ok for what, _, _, ok in checks(_row(), "red", None)}
    assert met == {"erasure, concept prompts": True, "erasure, unseen prompts": True, "erasure, synonym prompts": False,
                   "attack success, strongest prompt-space attack": False,     # token search 6.25% > 5%
                   "attack success, soft prompt": True,
                   "open attributes, concept prompts: TV / floor": True,
                   "open attributes, unrelated prompts: TV / floor": False,
                   "unrelated preservation": True, "diversity ratio, concept prompts": True}


def test_strongest_prompt_attack_is_the_worse_of_words_and_search():
    (measured,) = [m for what, _, m, _ in checks(_row(words=0.125, search=0.0), "red", None)
                   if what.startswith("attack success, strongest")]
    assert measured.startswith("12.5%") and "near word 'blu'" in measured


def test_robust_cost_is_against_the_default_row_of_the_same_concepts():
    table = targets_table([_row(cpu=100.0), _row("svare_robust", cpu=301.0)])
    assert "| red | svare_robust | erase CPU time, robust / default | <= 3x | 3.01x (301 s / 100 s) | **no** |" in table
    assert "erase CPU time" not in targets_table([_row("svare_robust", cpu=150.0)])    # no default row: no ratio


def test_results_page_holds_the_measured_tables():
    """docs/results.md shows the tables of docs/erasure_attacks.json, and the targets table is what
    erasure_targets.py makes of its rows (regenerate both after changing either)."""
    import json

    docs = Path(__file__).resolve().parents[1] / "docs"
    data = json.loads((docs / "erasure_attacks.json").read_text())
    page = (docs / "results.md").read_text(encoding="utf-8")
    assert targets_table(data["rows"]) == data["targets"]
    assert data["table"] in page and data["targets"] in page


def test_results_page_holds_the_vq_toy_model_tables():
    """docs/results.md's section on the VQ toy model shows docs/erasure_vq.json's tables."""
    import json

    docs = Path(__file__).resolve().parents[1] / "docs"
    data = json.loads((docs / "erasure_vq.json").read_text())
    page = (docs / "results.md").read_text(encoding="utf-8")
    assert {r["model"] for r in data["rows"]} == {"toyworld_vq"}
    assert targets_table(data["rows"]) == data["targets"]
    assert data["table"] in page and data["targets"] in page
    svare = next(r for r in data["rows"] if r["method"] == "svare")["report"]
    assert svare["concepts"]["red"]["erasure_rate"] == 1.0 and svare["unrelated"]["preservation_unrelated"] >= 0.98
