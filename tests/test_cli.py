"""The command line (python -m svare_core ...), run in-process on a tiny model file (one real subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from svare_core.__main__ import main
from svare_core.erasure import ErasurePatch
from svare_core.toyworld.plugin import WEIGHTS as TOY_WEIGHTS
from svare_core.models.format import save_model

from conftest import TINY_SCALES

ROOT = Path(__file__).parents[1]


@pytest.fixture()
def model_file(tiny_pipeline, tmp_path) -> Path:
    return save_model(tmp_path / "tiny.safetensors", transformer=tiny_pipeline.transformer, vae=tiny_pipeline.vae,
                      text_encoder="minilm", scales=TINY_SCALES)


def strict_json(text: str) -> dict:
    def refuse(c):
        raise ValueError(f"{c} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_inspect_prints_family_and_parameters(model_file, capsys, tiny_pipeline):
    main(["inspect", str(model_file)])            # returns normally: exit status 0
    out = capsys.readouterr().out
    assert str(model_file) in out and "family: svare" in out
    n = sum(p.numel() for p in tiny_pipeline.transformer.parameters())
    assert "parameters: " in out and int(out.split("parameters: ")[1].split()[0].replace(",", "")) >= n
    assert "transformer" in out and "vae" in out


def test_inspect_corrupt_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(bad)])
    assert e.value.code == 2
    assert f"cannot use {bad}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(tmp_path / "missing.safetensors")])
    assert e.value.code == 2 and "missing.safetensors: no such file" in capsys.readouterr().err


def test_inspect_exit_status_as_a_process(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(os.urandom(32))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "svare_core", "inspect", str(bad)], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "broken.safetensors" in r.stderr and "Traceback" not in r.stderr


def test_sample_writes_pngs(model_file, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "png"
    main(["sample", "--model", str(model_file), "--prompt", "a red star", "--prompt", "a blue circle",
          "--n", "2", "--batch", "3", "--seed", "7", "--out", str(out)])
    files = sorted(p.name for p in out.iterdir())
    assert files == [f"{s:05d}.png" for s in range(7, 11)]
    img = Image.open(out / "00007.png")
    assert img.size == (8, 8) and img.mode == "RGB"
    assert img.info.get("prompt") == "a red star" and img.info.get("seed") == "7"
    assert Image.open(out / "00009.png").info.get("prompt") == "a blue circle"
    assert "wrote 4 images" in capsys.readouterr().out


def test_erase_then_evaluate(model_file, tmp_path, capsys, tiny_pipeline):
    patch_path = tmp_path / "erase_red.safetensors"
    main(["erase", "--model", str(model_file), "--kind", "toy", "--concept", "red", "--anchor", "blue",
          "--steps", "2", "--out", str(patch_path)])
    assert "erased ['red']" in capsys.readouterr().out
    patch = ErasurePatch.load(patch_path)
    assert patch.concepts == ["red"] and patch.meta["steps"] == 2
    assert patch.base_fingerprint == tiny_pipeline.base_fingerprint     # same weights as the file
    assert "train_seconds" in patch.meta["metrics"]
    assert any(t.abs().max() > 0 for t in patch.tensors.values())

    report_path = tmp_path / "r.json"
    # A model that is not the bundled toy one needs its judge named.
    with pytest.raises(SystemExit, match="--detector"):
        main(["evaluate", "--model", str(model_file), "--patch", str(patch_path), "--seeds", "1"])
    main(["evaluate", "--model", str(model_file), "--patch", str(patch_path), "--seeds", "1",
          "--detector", "toyworld", "--json", str(report_path)])
    report = strict_json(report_path.read_text())
    assert set(report["concepts"]) == {"red"}
    assert 0 <= report["concepts"]["red"]["erasure_rate"] <= 1
    assert strict_json(capsys.readouterr().out) == report


def test_erase_with_explicit_pairs_and_options(model_file, tmp_path, capsys):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a red star => a blue star\na red heart => a blue heart\n")
    out = tmp_path / "p.safetensors"
    main(["erase", "--model", str(model_file), "--pairs", str(pairs), "--concept", "red", "--method", "vare",
          "--trainable", "xattn_ffn", "--steps", "2", "--lr", "1e-3", "--seed", "3", "--out", str(out)])
    patch = ErasurePatch.load(out)
    assert patch.meta["method"] == "vare" and patch.meta["pairs"] == [["a red star", "a blue star"],
                                                                      ["a red heart", "a blue heart"]]
    assert patch.meta["hyperparameters"]["seed"] == 3 and patch.meta["hyperparameters"]["lr"] == 1e-3
    assert all(".ca." in k or ".ffn." in k for k in patch.tensors)
    main(["erase", "--model", str(model_file), "--pairs", "a red star => a blue star; a red cat => a blue cat",
          "--concept", "red", "--steps", "1", "--out", str(tmp_path / "q.safetensors")])
    assert len(ErasurePatch.load(tmp_path / "q.safetensors").meta["pairs"]) == 2


def test_erase_default_steps_are_per_concept(tiny_pipeline, tmp_path):
    from argparse import Namespace

    from svare_core.__main__ import ERASE_OPTIONS, _erase_config, _pairs_from_args
    from svare_core.settings import family_of
    from svare_core.erasure import build_pairs

    unset = Namespace(**{name: None for name, _ in ERASE_OPTIONS}, seed=None)
    one, two = build_pairs("red", "blue", "toy"), build_pairs(["red", "star"], ["blue", "circle"], "toy")
    per_concept = family_of(tiny_pipeline).erase.steps
    assert _erase_config(unset, tiny_pipeline, one).steps == per_concept
    assert _erase_config(unset, tiny_pipeline, two).steps == 2 * per_concept
    assert _erase_config(Namespace(**{**vars(unset), "steps": 7}), tiny_pipeline, two).steps == 7   # given: as is
    # a pairs file with several concepts: each pair is tagged with the concept it names
    path = tmp_path / "pairs.txt"
    path.write_text("a red heart => a blue heart\na star => a circle\n")
    from_file = _pairs_from_args(Namespace(pairs=str(path), concept=["red", "star"], anchor=[], kind="toy"))
    assert [p.concept for p in from_file] == ["red", "star"]
    assert _erase_config(unset, tiny_pipeline, from_file).steps == 2 * per_concept


def test_erase_usage_errors(model_file, tmp_path):
    with pytest.raises(SystemExit, match="name the concept"):
        main(["erase", "--model", str(model_file), "--out", str(tmp_path / "x.safetensors")])
    with pytest.raises(SystemExit, match="one anchor per concept"):
        main(["erase", "--model", str(model_file), "--concept", "red", "--concept", "star", "--anchor", "blue",
              "--anchor", "circle", "--anchor", "green", "--out", str(tmp_path / "x.safetensors")])
    assert not (tmp_path / "x.safetensors").exists()


def test_demo(tmp_path, capsys):
    if not TOY_WEIGHTS.exists():
        pytest.skip("the bundled toy model is not trained yet")
    out = tmp_path / "demo"
    main(["demo", "--steps", "2", "--seeds", "1", "--grid-seeds", "1", "--attack-steps", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert (out / "before_after.png").is_file() and (out / "erase_red.safetensors").is_file()
    report = strict_json((out / "report.json").read_text())
    assert "red" in report["concepts"] and report["train_seconds"] >= 0
    attack = report["soft_prompt_attack"]
    assert attack["steps"] == 2 and 0 <= attack["erased"] <= 1 and attack["num_images"] == 8
    # The README says the demo prints the attack's result: the report's numbers, on both models.
    assert (f"soft-prompt attack (2 steps): the concept back in {attack['erased']:.0%} of the erased model's images "
            f"(base model: {attack['base']:.0%})") in printed
    from PIL import Image
    assert Image.open(out / "before_after.png").height > 7 * 64      # six prompt rows and the attack row
