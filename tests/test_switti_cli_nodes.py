"""Switti through the CLI (`python -m svare_core sample/erase` with --text-encoder clip_l clip_g) and
the ComfyUI nodes (Load VAR lists a 'clip_l + clip_g' pair from models/text_encoders; VAR Sampler
draws with Switti's own defaults), on the tiny Switti and the tiny CLIP towers."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

import svare_core.loader
from svare_core.__main__ import main
from svare_core.erasure import ErasurePatch
from svare_core.sampling_vq import VQSamplerSettings
from tests.test_switti_parity import goldens, ref_config  # noqa: F401
from tests.test_switti_pipeline import CLIP_G, CLIP_L, TEXT, pipeline_files, switti_pipe  # noqa: F401
from _pack import load_pack
from test_nodes import defaults, run

pack = load_pack()
M = pack.NODE_CLASS_MAPPINGS
adapter = pack.nodes.comfy_adapter
loaders = pack.nodes.loaders


def _model_args(files) -> list[str]:  # noqa: F811
    return ["--model", str(files["model"]), "--vae", str(files["vae"]), "--text-encoder", str(CLIP_L), str(CLIP_G),
            "--text-dtype", "fp32"]


def test_cli_samples_erases_and_samples_with_the_patch(pipeline_files, tmp_path, capsys):  # noqa: F811
    args = _model_args(pipeline_files)
    main(["sample", *args, "--prompt", "a red cube", "--seed", "3", "--out", str(tmp_path / "base")])
    png = tmp_path / "base" / "00003.png"
    assert png.is_file() and Image.open(png).size == (64, 64)
    patch_file = tmp_path / "erase_red.safetensors"
    main(["erase", *args, "--concept", "red", "--anchor", "blue", "--steps", "2", "--lr", "1e-3",
          "--out", str(patch_file)])
    assert "erased ['red'] with svare" in capsys.readouterr().out
    patch = ErasurePatch.load(patch_file)
    assert patch.concepts == ["red"] and all(n.startswith("blocks.") for n in patch.delta_names())
    assert patch.meta["hyperparameters"]["teacher_cfg"] == 6.0          # Switti's family default
    main(["sample", *args, "--prompt", "a red cube", "--seed", "3", "--patch", str(patch_file),
          "--out", str(tmp_path / "erased")])
    assert (tmp_path / "erased" / "00003.png").is_file()


def test_cli_with_one_text_encoder_for_switti_is_one_line(pipeline_files, tmp_path, capsys):  # noqa: F811
    f = pipeline_files
    with pytest.raises(SystemExit) as e:
        main(["sample", "--model", str(f["model"]), "--vae", str(f["vae"]), "--text-encoder", str(CLIP_L),
              "--prompt", "x", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code != 0 and "reads 2 text encoders: give text_encoder=(clip_l, clip_g)" in err


@pytest.fixture()
def models_dir(tmp_path, monkeypatch, pipeline_files):  # noqa: F811
    root = tmp_path / "models"
    (root / "var").mkdir(parents=True)
    shutil.copy(pipeline_files["model"], root / "var" / "switti_tiny.safetensors")
    shutil.copy(pipeline_files["vae"], root / "var" / "vqvae_tiny.safetensors")
    shutil.copytree(CLIP_L, root / "text_encoders" / "clip_l")
    shutil.copytree(CLIP_G, root / "text_encoders" / "clip_g")
    monkeypatch.setenv("SVARE_MODELS_DIR", str(root))
    return root


def test_load_var_node_loads_switti_and_the_sampler_uses_its_defaults(models_dir, monkeypatch):
    spec = M["SvareLoadVAR"].INPUT_TYPES()["required"]
    assert "clip_l + clip_g" in spec["text_encoder"][0]
    assert {"switti_tiny.safetensors", "vqvae_tiny.safetensors"} <= set(spec["transformer"][0])
    svare_core.loader.load_pipeline_cached.cache_clear()
    try:
        (pipe,) = run("SvareLoadVAR", **defaults("SvareLoadVAR", transformer="switti_tiny.safetensors",
                                                  vae="vqvae_tiny.safetensors", text_encoder="clip_l + clip_g",
                                                  device="cpu"))
        assert pipe.family == "switti" and pipe.text_encoder.width == 160
        seen = []
        import svare_core.sampling_vq as svq
        real = svq.generate_vq
        monkeypatch.setattr(svq, "generate_vq", lambda *a, **kw: seen.append(kw["settings"]) or real(*a, **kw))
        (images,) = run("SvareVARSampler", **defaults("SvareVARSampler", model=pipe, prompt="a red cube", seed=4))
    finally:
        svare_core.loader.load_pipeline_cached.cache_clear()
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images.numpy()).all()
    s = seen[0]
    # the widgets' "auto" values gave Switti's own sampler (top_k 0 -> 400, not "off")
    assert isinstance(s, VQSamplerSettings) and (s.cfg, s.top_k, s.top_p) == (6.0, 400, 0.95)


def test_comfyui_clip_files_get_comfyui_s_tokenizer(tmp_path, monkeypatch):
    root = tmp_path / "models"
    (root / "text_encoders").mkdir(parents=True)
    for name in ("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"):
        (root / "text_encoders" / name).write_bytes(b"")
    monkeypatch.setenv("SVARE_MODELS_DIR", str(root))
    assert loaders._clip_pairs() == ["clip_l.safetensors + clip_g.safetensors"]
    monkeypatch.setattr(adapter, "clip_tokenizer_dir", lambda: TEXT / "tokenizer_comfy")
    te = root / "text_encoders"
    assert loaders._text_encoder("clip_l.safetensors + clip_g.safetensors") == (
        te / "clip_l.safetensors", te / "clip_g.safetensors", TEXT / "tokenizer_comfy")
    with pytest.raises(ValueError, match="plain file name"):
        loaders._text_encoder("../x + clip_g.safetensors")


def test_erase_concept_node_on_switti_then_apply_and_sample(switti_pipe):  # noqa: F811
    (patch, curve, report) = run("SvareEraseConcept", **defaults(
        "SvareEraseConcept", model=switti_pipe, concept="red", anchor="blue", kind="object", steps=2,
        learning_rate=1e-3, seed=1))
    assert "erases red" in report and patch.base_fingerprint == switti_pipe.base_fingerprint
    assert all(n.startswith("blocks.") for n in patch.delta_names()) and curve.shape[-1] == 3
    (erased,) = run("SvareApplyErasurePatch", **defaults("SvareApplyErasurePatch", model=switti_pipe, patch=patch))
    (images,) = run("SvareVARSampler", **defaults("SvareVARSampler", model=erased, prompt="a red cube", seed=4))
    assert images.shape == (1, 64, 64, 3)
