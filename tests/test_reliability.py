"""Fail closed, lose nothing, one line for every user error: each case of issue 13, tried the way a user
would (the command line in-process, the API, the nodes), with the file system checked afterwards."""
from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import svare_core
from svare_core.__main__ import main
from svare_core.erasure import EraseConfig, ErasurePatch, PatchError, apply_patch, build_pairs, erase
from svare_core.erasure import tokens as tokens_module
from svare_core.models.format import save_model
from svare_core.sampling import SamplerSettings, generate

from conftest import TINY_SCALES

ROOT = Path(__file__).resolve().parents[1]
PAIRS = build_pairs("red", "blue", "toy")[:2]


@pytest.fixture()
def model_file(tiny_pipeline, tmp_path) -> Path:
    return save_model(tmp_path / "tiny.safetensors", transformer=tiny_pipeline.transformer, vae=tiny_pipeline.vae,
                      text_encoder="minilm", scales=TINY_SCALES)


def cli(capsys, *argv) -> tuple[int, str]:
    """Run the command line in-process: (exit status, stderr)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    err = capsys.readouterr().err
    return code, err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def never(*a, **k):
    pytest.fail("the long work started before the input was checked")


# -- training that diverges writes nothing ----------------------------------------------------------------
def test_a_diverging_erasure_stops_and_writes_nothing(model_file, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    code, err = cli(capsys, "erase", "--model", model_file, "--kind", "toy", "--concept", "red", "--anchor", "blue",
                    "--steps", "3", "--lr", "1e30", "--method", "vare", "--out", out)
    assert code == 2 and "diverged" in one_line_error(err) and "lower the learning rate" in err.lower()
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))


def test_non_finite_patches_are_refused_when_written_loaded_and_applied(tiny_pipeline, tmp_path):
    name = "block_chunks.0.module.0.ca.proj.weight"
    shape = tiny_pipeline.transformer.state_dict()[name].shape
    bad = ErasurePatch({name: torch.full(shape, float("nan"))}, {"base_fingerprint": tiny_pipeline.base_fingerprint})
    with pytest.raises(PatchError, match="NaN or infinite"):
        bad.save(tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
    with pytest.raises(PatchError, match="NaN or infinite"):
        apply_patch(tiny_pipeline, bad)
    with pytest.raises(PatchError, match="NaN or infinite"):
        apply_patch(tiny_pipeline, bad, force=True)


# -- output locations checked before the work, nothing lost ------------------------------------------------
@pytest.mark.parametrize("case", ["directory", "read_only", "exists", "suffix"])
def test_erase_checks_its_output_before_training(model_file, tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr(tokens_module, "generate", never)
    out = tmp_path / "p.safetensors"
    if case == "directory":
        out.mkdir()
    elif case == "read_only":
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        out = locked / "p.safetensors"
        if os.access(locked, os.W_OK):                  # root ignores permissions
            pytest.skip("running as root: a read-only folder is writable")
    elif case == "exists":
        out.write_bytes(b"keep me")
    else:
        out = tmp_path / "p.pt"
    code, err = cli(capsys, "erase", "--model", model_file, "--kind", "toy", "--concept", "red", "--anchor", "blue",
                    "--steps", "2", "--out", out)
    line = one_line_error(err)
    assert code == 2 and str(out) in line
    assert {"directory": "is a folder", "read_only": "cannot write", "exists": "--overwrite",
            "suffix": ".safetensors"}[case] in line
    if case == "exists":
        assert out.read_bytes() == b"keep me"


def test_a_patch_that_cannot_be_written_is_kept_elsewhere(model_file, tmp_path, capsys, monkeypatch):
    real_save = ErasurePatch.save
    target = tmp_path / "p.safetensors"

    def full_disk(self, path):
        if Path(path) == target:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, path)

    monkeypatch.setattr(ErasurePatch, "save", full_disk)
    code, err = cli(capsys, "erase", "--model", model_file, "--kind", "toy", "--concept", "red", "--anchor", "blue",
                    "--steps", "1", "--out", target)
    line = one_line_error(err)
    assert code == 2 and "No space left" in line and "kept at" in line
    rescued = Path(line.split("kept at ")[1].strip())
    try:
        assert ErasurePatch.load(rescued).concepts == ["red"]
    finally:
        rescued.unlink(missing_ok=True)


def test_sample_never_overwrites_and_counts_what_it_wrote(model_file, tmp_path, capsys):
    out = tmp_path / "png"
    assert cli(capsys, "sample", "--model", model_file, "--prompt", "a red star", "--n", "2", "--out", out)[0] == 0
    assert "wrote 2 images" in capsys.readouterr().out or True
    before = (out / "00000.png").read_bytes()
    code, err = cli(capsys, "sample", "--model", model_file, "--prompt", "a blue circle", "--out", out)
    assert code == 2 and "--overwrite" in one_line_error(err) and (out / "00000.png").read_bytes() == before
    assert cli(capsys, "sample", "--model", model_file, "--prompt", "a blue circle", "--out", out, "--overwrite")[0] == 0
    assert (out / "00000.png").read_bytes() != before


def test_sample_reports_the_images_it_wrote(model_file, tmp_path, capsys):
    main(["sample", "--model", str(model_file), "--prompt", "a red star", "--n", "3", "--batch", "2",
          "--out", str(tmp_path / "o")])
    assert "wrote 3 images" in capsys.readouterr().out and len(list((tmp_path / "o").iterdir())) == 3


def test_an_existing_file_as_the_image_folder_is_one_line(model_file, tmp_path, capsys):
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    code, err = cli(capsys, "sample", "--model", model_file, "--prompt", "a red star", "--out", f)
    assert code == 2 and "is a file, not a folder" in one_line_error(err) and f.read_bytes() == b"x"


def test_the_report_folder_is_made_before_the_work(model_file, tmp_path, capsys, tiny_pipeline):
    patch = tmp_path / "p.safetensors"
    main(["erase", "--model", str(model_file), "--kind", "toy", "--concept", "red", "--anchor", "blue",
          "--steps", "1", "--out", str(patch)])
    report = tmp_path / "new" / "folder" / "report.json"
    code, err = cli(capsys, "evaluate", "--model", model_file, "--patch", patch, "--seeds", "1",
                    "--detector", "toyworld", "--json", report)
    assert code == 0, err
    assert json.loads(report.read_text())["concepts"]["red"]["num_images"] > 0


# -- one line, never a traceback -------------------------------------------------------------------------
@pytest.mark.parametrize("argv, expected", [
    (["sample", "--prompt", "x", "--batch", "0"], "at least 1"),
    (["sample", "--prompt", "x", "--seed", str(2**63 + 5)], "must be in"),
    (["sample", "--prompt", "x", "--n", "two"], "not a whole number"),
    (["evaluate", "--seeds", "0"], "at least 1"),
])
def test_bad_numbers_are_refused_by_the_parser(capsys, argv, expected):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and expected in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_one_line(model_file, tmp_path, capsys):
    code, err = cli(capsys, "sample", "--model", model_file, "--prompt", "x", "--device", "cuda",
                    "--out", tmp_path / "o")
    assert code == 2 and "no usable CUDA GPU" in one_line_error(err) and "use cpu" in err
    code, err = cli(capsys, "sample", "--model", model_file, "--prompt", "x", "--device", "gpu", "--out", tmp_path / "o")
    assert code == 2 and "unknown device 'gpu'" in one_line_error(err)


def test_an_unknown_concept_in_evaluate_fails_before_sampling(model_file, tmp_path, capsys, monkeypatch):
    patch = tmp_path / "p.safetensors"
    main(["erase", "--model", str(model_file), "--kind", "toy", "--concept", "red", "--anchor", "blue",
          "--steps", "1", "--out", str(patch)])
    import svare_core.toyworld.evaluate as toy_eval
    monkeypatch.setattr(toy_eval, "sample_images", never)
    code, err = cli(capsys, "evaluate", "--model", model_file, "--patch", patch, "--concept", "pink",
                    "--detector", "toyworld")
    assert code == 2 and "'pink' is not a toy-world value" in one_line_error(err)


def test_inline_pairs_must_name_their_concept(model_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tokens_module, "generate", never)
    out = tmp_path / "p.safetensors"
    code, err = cli(capsys, "erase", "--model", model_file, "--pairs", "a red star => a blue star", "--out", out)
    assert code == 2 and "name the concept" in one_line_error(err)
    code, err = cli(capsys, "erase", "--model", model_file, "--pairs", "a red star => a blue star",
                    "--concept", "red", "--concept", "star", "--pairs", "a red cat => a blue cat; a dog => a cat",
                    "--out", out)
    assert code == 2 and "names none of the concepts" in one_line_error(err)
    code, err = cli(capsys, "erase", "--model", model_file, "--pairs", tmp_path / "pairs_typo.txt", "--concept", "red",
                    "--out", out)
    assert code == 2 and "no such pairs file" in one_line_error(err)
    assert not out.exists()
    with pytest.raises(ValueError, match="name the concept"):        # the node's path: the same refusal
        build_pairs("", "", "object", "a red star => a blue star")


def test_interrupting_leaves_nothing_partial(model_file, tmp_path, capsys, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(svare_core.erasure.trainer, "erase", interrupt)
    monkeypatch.setattr("svare_core.erasure.erase", interrupt)
    out = tmp_path / "p.safetensors"
    code, err = cli(capsys, "erase", "--model", model_file, "--kind", "toy", "--concept", "red", "--anchor", "blue",
                    "--out", out)
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == [model_file]


def test_exit_statuses_as_a_process(model_file, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "svare_core", *map(str, a)], capture_output=True,  # noqa: E731
                                    text=True, env=env, cwd=tmp_path, timeout=300)
    r = run("erase", "--model", model_file, "--pairs", "a red star => a blue star", "--out", tmp_path / "p.safetensors")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in r.stderr


# -- non-finite numbers refused where they enter ------------------------------------------------------------
@pytest.mark.parametrize("settings", [SamplerSettings(cfg=float("nan")), SamplerSettings(cfg=[1.0, float("inf")]),
                                      SamplerSettings(tau=float("nan")), SamplerSettings(tau=0.0),
                                      SamplerSettings(top_p=float("nan")), SamplerSettings(top_k=1.5)])
def test_non_finite_sampler_settings_are_refused(tiny_pipeline, settings):
    with pytest.raises(ValueError, match="cfg|tau|top_p|top_k"):
        generate(tiny_pipeline, ["a red star"], settings=settings, scales=TINY_SCALES)


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), "1"])
def test_non_finite_strength_is_refused(tiny_pipeline, strength):
    from test_patches import random_patch
    with pytest.raises(PatchError, match="strength must be a finite number"):
        apply_patch(tiny_pipeline, random_patch(tiny_pipeline), strength)


@pytest.mark.parametrize("kw", [{"lr": float("nan")}, {"teacher_cfg": float("inf")}, {"preservation_weight": math.nan},
                                {"steps": 2.5}, {"seed": 2**63}, {"token_error_rate": 2.0}])
def test_non_finite_erasure_settings_are_refused_before_work(tiny_pipeline, monkeypatch, kw):
    monkeypatch.setattr(tokens_module, "generate", never)
    with pytest.raises(ValueError):
        erase(tiny_pipeline, PAIRS, EraseConfig(**{"steps": 2, **kw}))


def test_a_string_prompt_is_one_prompt(tiny_pipeline):
    result = generate(tiny_pipeline, "a red star", scales=TINY_SCALES)
    assert result.images.shape[0] == 1
    with pytest.raises(ValueError, match="seed"):
        generate(tiny_pipeline, ["a"], seed=2**64, scales=TINY_SCALES)


# -- shared files: checksum, fingerprint, metadata types -------------------------------------------------------
def _patch_file(tiny_pipeline, tmp_path) -> Path:
    from test_patches import random_patch
    return random_patch(tiny_pipeline).save(tmp_path / "good.safetensors")


def test_corrupted_tensor_bytes_are_caught(tiny_pipeline, tmp_path):
    path = _patch_file(tiny_pipeline, tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10                                   # a bit in the last tensor's data
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(PatchError, match="flipped.safetensors: its content does not match its checksum"):
        ErasurePatch.load(bad)


@pytest.mark.parametrize("field, value", [("concepts", "red"), ("base_fingerprint", 7), ("lora_scale", "x"),
                                          ("steps", [1]), ("trained_on", {"a": 1}), ("pairs", [["only one"]])])
def test_metadata_of_the_wrong_type_is_one_line_naming_the_file(tiny_pipeline, tmp_path, field, value):
    from svare_core.erasure.patches import PATCH_FORMAT, PATCH_VERSION, _file_checksum
    from svare_core.models.format import atomic_save_safetensors
    from test_patches import random_patch

    patch = random_patch(tiny_pipeline)
    patch.meta[field] = value
    body = json.dumps(patch.meta)
    path = atomic_save_safetensors(patch.tensors, tmp_path / "typed.safetensors", {
        "format": PATCH_FORMAT, "format_version": str(PATCH_VERSION), "svare_patch": body,
        "checksum": _file_checksum(patch.tensors, body)})
    with pytest.raises(PatchError, match=rf"typed.safetensors: metadata field '{field}' must be"):
        ErasurePatch.load(path)


def test_a_patch_without_checksum_or_fingerprint_is_refused(tiny_pipeline, tmp_path):
    from svare_core.models.format import atomic_save_safetensors
    from test_patches import random_patch

    patch = random_patch(tiny_pipeline)
    old = atomic_save_safetensors(patch.tensors, tmp_path / "old.safetensors", {
        "format": "svare-erasure-patch", "format_version": "1", "svare_patch": json.dumps(patch.meta)})
    with pytest.raises(PatchError, match="old.safetensors: has no checksum"):
        ErasurePatch.load(old)
    del patch.meta["base_fingerprint"]
    with pytest.raises(PatchError, match="records no base model fingerprint"):
        patch.save(tmp_path / "nobase.safetensors")


def test_a_patch_trained_on_a_patched_model_needs_that_model(tiny_pipeline):
    from test_patches import random_patch

    first = random_patch(tiny_pipeline)
    patched = apply_patch(tiny_pipeline, first)
    second = erase(patched, PAIRS, EraseConfig(steps=1, lr=1e-3)).patch
    assert second.meta["trained_on"] == [[first.checksum(), 1.0]]
    with pytest.raises(PatchError, match="was trained on the model with 1 other patch"):
        apply_patch(tiny_pipeline, second)
    apply_patch(patched, second)                                    # on the model it was trained on
    apply_patch(tiny_pipeline, second, force=True)


def test_a_corrupted_model_file_is_refused(tiny_pipeline, tmp_path):
    from svare_core.models import ModelLoadError, load_transformer

    path = save_model(tmp_path / "m.safetensors", transformer=tiny_pipeline.transformer)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="does not match the checksum"):
        load_transformer(path)


# -- caches heal themselves ------------------------------------------------------------------------------------
def test_a_truncated_cache_entry_is_dropped_and_recomputed(tiny_pipeline, tmp_path):
    from svare_core.erasure.tokens import auxiliary_tokens

    settings = SamplerSettings(cfg=3.0)
    first = auxiliary_tokens(tiny_pipeline, ["a red star"], seeds=[0], settings=settings, scales=TINY_SCALES,
                             cache_dir=tmp_path)
    (entry,) = list(tmp_path.glob("*.safetensors"))
    entry.write_bytes(entry.read_bytes()[:20])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = auxiliary_tokens(tiny_pipeline, ["a red star"], seeds=[0], settings=settings, scales=TINY_SCALES,
                                 cache_dir=tmp_path)
    assert any(str(entry) in str(w.message) and "recomputed" in str(w.message) for w in caught)
    assert torch.equal(first["a red star"].labels, again["a red star"].labels)
    assert entry.stat().st_size > 20                               # healed: written again


# -- the Safety Score node fails closed ---------------------------------------------------------------------------
def test_safety_flags_and_censors_what_it_cannot_judge(monkeypatch):
    from svare_core import safety

    images = torch.rand(3, 64, 64, 3)
    images[1, 5, 5, 0] = float("nan")
    res = safety.check(images, "toyworld", concept="red", threshold=0.5, censor_flagged=True)
    assert res.flagged.tolist()[1] and res.unjudged.tolist() == [False, True, False]
    assert "could not be judged" in res.report
    assert not torch.equal(torch.nan_to_num(res.images[1]), torch.nan_to_num(images[1])), "not censored"

    det = safety.get_detector("toyworld")
    real = det.detect

    def no_score(imgs, concept=None):
        d = real(imgs, concept)
        d.scores[:] = np.nan
        return d

    monkeypatch.setattr(det, "detect", no_score)
    res = safety.check(torch.rand(2, 64, 64, 3), "toyworld", concept="red", censor_flagged=False)
    assert res.flagged.tolist() == [True, True] and "no usable score" in res.report
