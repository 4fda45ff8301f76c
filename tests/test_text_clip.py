"""Switti's text conditioning (svare_core.models.text_clip) against the reference, on tiny random towers.

tests/fixtures/switti_text_tiny holds tiny CLIP-L / bigG folders, an OpenCLIP-layout file and what the
reference code computed on them (Switti's encode_prompt; OpenCLIP's own TextTransformer), see its
README. The real-size key tables (tests/fixtures/clip_l_text.tsv, clip_g_text.tsv,
openclip_bigg_text.tsv) are checked on the meta device. Offline: no file is ever downloaded.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file

from svare_core.models.checkpoint import Checkpoint, ModelLoadError
from svare_core.models.text_clip import (CLIP_G, CLIP_L, CLIPTextArch, SwittiText, attention_bias,
                                         clip_text_sources, load_clip_text)

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "switti_text_tiny"
ATOL = 1e-5
TINY_L = CLIPTextArch("tiny CLIP-L", width=64, layers=2, heads=2, mlp=256, activation="quick_gelu", vocab=514)
TINY_G = CLIPTextArch("tiny bigG", width=96, layers=2, heads=3, mlp=384, activation="gelu", vocab=514)
DTYPES = {"torch.float32": torch.float32}


@pytest.fixture(scope="module")
def goldens() -> dict[str, torch.Tensor]:
    return load_file(str(TINY / "goldens.safetensors"))


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return json.loads((TINY / "goldens.json").read_text())["prompts"]


def tiny(clip_l, clip_g, **kw) -> SwittiText:
    return SwittiText(clip_l, clip_g, dtype=kw.pop("dtype", torch.float32), arch_l=TINY_L, arch_g=TINY_G, **kw)


@pytest.fixture(scope="module")
def from_folders() -> SwittiText:
    return tiny(TINY / "clip_l", TINY / "clip_g")


@pytest.fixture(scope="module")
def comfy_files(tmp_path_factory) -> Path:
    """clip_l.safetensors / clip_g.safetensors as ComfyUI keeps them: the text tower's tensors under their
    Hugging Face names (text_model.*) plus text_projection.weight, taken from the tiny folders."""
    out = tmp_path_factory.mktemp("comfy_text_encoders")
    for name in ("clip_l", "clip_g"):
        state = load_file(str(TINY / name / "model.safetensors"))
        save_file({k: v for k, v in state.items() if k.startswith("text_model.") or k == "text_projection.weight"},
                  str(out / f"{name}.safetensors"))
    return out


def check_reference(cond, goldens, rows=slice(None), *, pads=True):
    """``cond`` equals the reference's encode_prompt rows (at every position, or on real tokens only)."""
    feats, pooled, bias = goldens["context"][rows], goldens["pooled"][rows], goldens["attn_bias"][rows]
    assert cond.features.dtype == torch.float32 and cond.mask.dtype == torch.bool
    assert torch.equal(attention_bias(cond.mask), bias)
    real = cond.mask if not pads else torch.ones_like(cond.mask)
    assert (cond.features - feats)[real].abs().max() <= ATOL
    assert (cond.pooled - pooled).abs().max() <= ATOL


# -- parity with the reference --------------------------------------------------------------------------
def test_folders_give_the_reference_pipelines_condition(from_folders, goldens, prompts):
    """Hugging Face folders (CLIPModel, like openai/clip-vit-large-patch14 and laion's bigG) give what
    SwittiPipeline.encode_prompt gives: the prompts, then the null prompt "" for each."""
    cond = from_folders.encode(prompts + [""] * len(prompts))
    assert cond.features.shape == (8, 77, 64 + 96) and cond.pooled.shape == (8, 96) and cond.mask.shape == (8, 77)
    check_reference(cond, goldens)
    # the tokens the reference ran: 77 each, truncated, padded, masks from bigG's tokenizer
    for tok, key in ((from_folders.tokenizer_l, "input_ids_l"), (from_folders.tokenizer_g, "input_ids_g")):
        ids = tok(prompts, truncation=True, max_length=77, padding="max_length", return_tensors="pt")["input_ids"]
        assert torch.equal(ids, goldens[key])
    assert cond.mask[:4].sum(1).tolist() == goldens["attention_mask_g"].sum(1).tolist() == [32, 2, 40, 77]
    # bigG's pooled vector is its last hidden state at the end-of-text token (no projection)
    end = goldens["attention_mask_g"].sum(1) - 1
    assert torch.equal(cond.pooled[:4], cond.features[torch.arange(4), end, 64:])


def test_the_reference_mask_is_what_the_transformer_needs(from_folders, prompts):
    """Padding is masked (the reference's bias is -inf there): whatever the pad positions hold."""
    cond = from_folders.encode(prompts[:2])
    bias = attention_bias(cond.mask)
    assert bias.dtype == torch.float32 and bool((bias[cond.mask] == 0).all()) and bool(torch.isinf(bias[~cond.mask]).all())
    assert attention_bias(cond.mask, torch.bfloat16).dtype == torch.bfloat16


def test_openclip_layout_equals_openclip_itself(goldens, prompts):
    """bigG from an OpenCLIP file (fused q/k/v, ln_final, positional_embedding ...) through our key
    mapping onto transformers' CLIPTextModel gives OpenCLIP's own tokens and pre-projection pooled vector."""
    text = tiny(TINY / "clip_l", TINY / "openclip_g.safetensors", tokenizer_g=TINY / "tokenizer_comfy")
    cond = text.encode(prompts)
    ids = text.tokenizer_g(prompts, truncation=True, max_length=77, padding="max_length", return_tensors="pt")
    assert torch.equal(ids["input_ids"], goldens["openclip_input_ids"])
    real = cond.mask
    assert (cond.features[..., 64:] - goldens["openclip_tokens"])[real].abs().max() <= ATOL
    assert (cond.pooled - goldens["openclip_pooled"]).abs().max() <= ATOL
    # the mapping is not a no-op: swapping q and k (a wrong split of in_proj_weight) changes the features
    model, _ = load_clip_text(TINY / "openclip_g.safetensors", TINY_G, dtype=torch.float32,
                              tokenizer=TINY / "tokenizer_comfy")
    attn = model.get_submodule(next(n for n, _ in model.named_modules() if n.endswith("layers.0.self_attn")))
    with torch.no_grad():
        attn.q_proj.weight[:], attn.k_proj.weight[:] = attn.k_proj.weight.clone(), attn.q_proj.weight.clone()
        swapped = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
    assert (swapped - goldens["openclip_tokens"])[real].abs().max() > 1e-2


def test_comfyui_single_files(comfy_files, goldens, prompts):
    """ComfyUI's clip_l / clip_g files: with the reference's tokenizers, exactly the reference."""
    text = tiny(comfy_files / "clip_l.safetensors", comfy_files / "clip_g.safetensors",
                tokenizer_l=TINY / "clip_l", tokenizer_g=TINY / "clip_g")
    check_reference(text.encode(prompts + [""] * 4), goldens)


def test_comfyui_files_with_comfyuis_tokenizer(comfy_files, goldens, prompts):
    """With a ComfyUI-style tokenizer folder (pads with end-of-text) for both towers: the same condition on
    every real token wherever the prompt has no "!" (a tokenizer whose pad token is "!", as this bigG's,
    reads the "!" of "dog!" as padding); padding differs and is masked."""
    comfy = TINY / "tokenizer_comfy"
    cond = tiny(comfy_files / "clip_l.safetensors", comfy_files / "clip_g.safetensors",
                tokenizer_l=comfy, tokenizer_g=comfy).encode(prompts)
    sub = type(cond)(features=cond.features[1:], mask=cond.mask[1:], pooled=cond.pooled[1:])
    check_reference(sub, goldens, slice(1, 4), pads=False)
    assert "!" in prompts[0] and (cond.features[0, :32, 64:] - goldens["context"][0, :32, 64:]).abs().max() > 1e-3


def test_diffusers_pipeline_folders(tmp_path, goldens, prompts):
    """A diffusers pipeline's text_encoder / text_encoder_2 folders, tokenizers in tokenizer / tokenizer_2."""
    for src, enc, tok, cls in ((TINY / "clip_l", "text_encoder", "tokenizer", "CLIPTextModel"),
                               (TINY / "clip_g", "text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection")):
        (tmp_path / enc).mkdir()
        cfg = json.loads((src / "config.json").read_text())["text_config"]
        (tmp_path / enc / "config.json").write_text(json.dumps({**cfg, "architectures": [cls]}))
        state = load_file(str(src / "model.safetensors"))
        save_file({k: v for k, v in state.items() if k.startswith("text_model.") or k == "text_projection.weight"},
                  str(tmp_path / enc / "model.safetensors"))
        (tmp_path / tok).mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(src / name, tmp_path / tok / name)
    check_reference(tiny(tmp_path / "text_encoder", tmp_path / "text_encoder_2").encode(prompts + [""] * 4), goldens)


def test_half_precision_files_and_bf16(comfy_files, goldens, prompts, tmp_path):
    """fp16-stored files (ComfyUI's usual) load in bf16 (the default, as the reference pipeline runs) or fp32."""
    for name in ("clip_l", "clip_g"):
        state = load_file(str(comfy_files / f"{name}.safetensors"))
        save_file({k: v.half() for k, v in state.items()}, str(tmp_path / f"{name}.safetensors"))
    kw = dict(tokenizer_l=TINY / "clip_l", tokenizer_g=TINY / "clip_g")
    fp32 = tiny(tmp_path / "clip_l.safetensors", tmp_path / "clip_g.safetensors", **kw)
    bf16 = tiny(tmp_path / "clip_l.safetensors", tmp_path / "clip_g.safetensors", dtype=torch.bfloat16, **kw)
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    ref = goldens["context"][:4]
    err32 = (fp32.encode(prompts).features - ref).abs().max().item()
    err16 = (bf16.encode(prompts).features - ref).abs().max().item()
    assert 0 < err32 < 1e-2 and err32 < err16 < 0.1, (err32, err16)


# -- cache, devices ---------------------------------------------------------------------------------------
def test_features_are_cached_per_prompt_and_bounded(prompts, monkeypatch):
    text = tiny(TINY / "clip_l", TINY / "clip_g", cache_bytes=10**9)
    seen: list[str] = []
    real = SwittiText._encode_uncached
    monkeypatch.setattr(text, "_encode_uncached", lambda ps: seen.extend(ps) or real(text, ps))
    first = text.encode(prompts[:2])
    again = text.encode([prompts[1], prompts[0], prompts[1]])
    assert seen == prompts[:2]
    assert torch.equal(again.features[1], first.features[0]) and torch.equal(again.features[0], first.features[1])
    row = 77 * 160 * 4 + 96 * 4 + 77               # fp32 features + pooled + bool mask
    assert len(text._cache) == 2 and text._cache.nbytes == 2 * row
    text._cache.max_bytes = row                     # room for one prompt: the least recently used goes
    text.encode([prompts[2]])
    assert len(text._cache) == 1 and text._cache.nbytes == row
    text.clear_cache()
    assert len(text._cache) == 0 and text._cache.nbytes == 0


def test_bf16_cache_holds_half(prompts):
    text = tiny(TINY / "clip_l", TINY / "clip_g", dtype=torch.bfloat16)
    cond = text.encode(prompts[:1])
    assert cond.features.dtype == torch.float32 and text._cache.nbytes == 77 * 160 * 2 + 96 * 2 + 77
    assert text.device == torch.device("cpu") and set(text.model) == {"clip_l", "clip_g"}
    assert text.width == 160 and text.pooled_width == 96 and text.max_length == 77


def test_offload_is_off_on_the_cpu():
    text = tiny(TINY / "clip_l", TINY / "clip_g", offload=True)
    assert text.offload is False and text.device == torch.device("cpu")


# -- the real files' key layouts (meta device) ---------------------------------------------------------
def meta_checkpoint(name: str) -> Checkpoint:
    state = {}
    for line in (FIXTURES / f"{name}.tsv").read_text().splitlines():
        key, shape, dtype = line.split("\t")
        dims = tuple(int(x) for x in shape.strip("()").replace(" ", "").split(",") if x)
        state[key] = torch.empty(dims, dtype=DTYPES[dtype], device="meta")
    return Checkpoint(FIXTURES / f"{name}.safetensors", state)


@pytest.mark.parametrize("table, arch, openclip", [("clip_l_text", CLIP_L, False), ("clip_g_text", CLIP_G, False),
                                                   ("openclip_bigg_text", CLIP_G, True)])
def test_real_key_tables_are_recognised(table, arch, openclip):
    """ComfyUI's clip_l / clip_g (Hugging Face names, as comfy/clip_model.py declares them) and the OpenCLIP
    bigG file map onto every tensor of the real-size CLIPTextModel with the right shapes."""
    from transformers import CLIPTextModel
    ckpt = meta_checkpoint(table)
    sources = clip_text_sources(ckpt, arch)
    with torch.device("meta"):
        module = CLIPTextModel(arch.config()).state_dict()
    assert len(sources) == len(module) == 4 + 16 * arch.layers
    fused = [k for k, (_, rows) in sources.items() if rows is not None]
    assert len(fused) == (6 * arch.layers if openclip else 0)
    assert all(src in ckpt.state for src, _ in sources.values())
    unused = set(ckpt.state) - {src for src, _ in sources.values()}
    assert unused == ({"text_projection", "logit_scale"} if openclip else {"text_projection.weight"})


def test_checkpoint_with_both_towers_under_prefixes():
    """An SDXL-style checkpoint (CLIP-L and OpenCLIP bigG under conditioner.embedders.*): each is found."""
    state = {"conditioner.embedders.0.transformer." + k: v for k, v in meta_checkpoint("clip_l_text").state.items()}
    state.update({"conditioner.embedders.1.model." + k: v for k, v in meta_checkpoint("openclip_bigg_text").state.items()})
    ckpt = Checkpoint(Path("sd_xl_base.safetensors"), state)
    assert clip_text_sources(ckpt, CLIP_L)["text_model.final_layer_norm.weight"][0] == \
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"
    assert clip_text_sources(ckpt, CLIP_G)["text_model.final_layer_norm.weight"][0] == \
        "conditioner.embedders.1.model.ln_final.weight"


def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_the_wrong_tower_is_refused_in_one_line():
    with pytest.raises(ModelLoadError) as err:
        clip_text_sources(meta_checkpoint("clip_g_text"), CLIP_L, "clip_l")
    msg = one_line(err)
    assert "1280 wide with 32 layers" in msg and "ViT-bigG" in msg and "not CLIP ViT-L/14" in msg
    with pytest.raises(ModelLoadError) as err:
        clip_text_sources(meta_checkpoint("clip_l_text"), CLIP_G, "clip_g")
    assert "768 wide with 12 layers" in one_line(err) and "give the clip_g file here" in str(err.value)


def test_other_models_are_named():
    vision = Checkpoint(Path("CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors"),
                        {"vision_model.embeddings.patch_embedding.weight": torch.empty(1664, 3, 14, 14, device="meta")})
    t5 = Checkpoint(Path("t5xxl_fp16.safetensors"),
                    {"encoder.block.0.layer.0.SelfAttention.k.weight": torch.empty(4096, 4096, device="meta")})
    other = Checkpoint(Path("x.safetensors"), {"foo.weight": torch.empty(2, device="meta")})
    for ckpt, words in ((vision, "image encoder"), (t5, "T5 text encoder"), (other, "holds no CLIP text encoder")):
        with pytest.raises(ModelLoadError) as err:
            clip_text_sources(ckpt, CLIP_G, "clip_g")
        assert words in one_line(err) and str(ckpt.path) in str(err.value)


def test_long_context_and_incomplete_files_are_refused():
    ckpt = meta_checkpoint("clip_l_text")
    ckpt.state["text_model.embeddings.position_embedding.weight"] = torch.empty(248, 768, device="meta")
    with pytest.raises(ModelLoadError) as err:
        clip_text_sources(ckpt, CLIP_L, "clip_l")
    assert "248 positions" in one_line(err)
    ckpt = meta_checkpoint("openclip_bigg_text")
    del ckpt.state["transformer.resblocks.7.attn.in_proj_bias"]
    with pytest.raises(ModelLoadError) as err:
        clip_text_sources(ckpt, CLIP_G, "clip_g")
    assert "lacks transformer.resblocks.7.attn.in_proj_bias" in one_line(err)


def test_folder_and_tokenizer_errors(tmp_path, comfy_files):
    with pytest.raises(ModelLoadError) as err:            # a file has no tokenizer
        tiny(comfy_files / "clip_l.safetensors", TINY / "clip_g")
    assert "tokenizer_l=" in one_line(err) and "sd1_tokenizer" in str(err.value)
    bad = tmp_path / "clip_g"
    shutil.copytree(TINY / "clip_g", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["text_config"]["hidden_act"] = "quick_gelu"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as err:            # heads and activation come from the config: checked
        tiny(TINY / "clip_l", bad)
    assert "hidden_act" in one_line(err) and "tiny bigG" in str(err.value)
    with pytest.raises(ModelLoadError) as err:
        tiny(TINY / "clip_l", tmp_path / "missing")
    assert "does not exist" in one_line(err)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError) as err:
        tiny(TINY / "clip_l", tmp_path / "empty")
    assert "no config.json" in one_line(err)


def test_nan_weights_are_refused(tmp_path, comfy_files):
    state = load_file(str(comfy_files / "clip_g.safetensors"))
    state["text_model.final_layer_norm.weight"][3] = float("nan")
    save_file(state, str(tmp_path / "clip_g.safetensors"))
    with pytest.raises(ModelLoadError) as err:
        load_clip_text(tmp_path / "clip_g.safetensors", TINY_G, tokenizer=TINY / "tokenizer_comfy", role="clip_g")
    assert "NaN" in one_line(err)


# -- real size --------------------------------------------------------------------------------------------
def real_size() -> dict[str, tuple[int, int]]:
    """Parameters and bf16 bytes of the real towers, built on the meta device."""
    from transformers import CLIPTextModel
    out = {}
    for name, arch in (("clip_l", CLIP_L), ("clip_g", CLIP_G)):
        with torch.device("meta"):
            n = sum(p.numel() for p in CLIPTextModel(arch.config()).parameters())
        out[name] = (n, n * 2)
    return out


def test_real_size_numbers_in_the_docs():
    sizes = real_size()
    assert sizes["clip_l"][0] == 123_060_480 and sizes["clip_g"][0] == 693_021_440
    doc = (Path(__file__).parents[1] / "docs" / "real-models.md").read_text()
    for name, (n, nbytes) in sizes.items():
        assert f"{n:,} parameters" in doc and f"{nbytes / 1e9:.2f} GB in bf16" in doc, name
