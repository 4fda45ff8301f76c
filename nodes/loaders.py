"""Load VAR: a transformer + VAE + text encoder as one SVARE_VAR_MODEL (a svare_core VARPipeline)."""
from __future__ import annotations

import torch

from svare_core import VARPipeline, hub, load_pipeline_cached

from . import comfy_adapter as comfy
from .widgets import LOADER

MODEL = "SVARE_VAR_MODEL"
BUNDLED_SUFFIX = " (bundled)"
BUNDLED = "toyworld" + BUNDLED_SUFFIX
FROM_FILE = "(from model file)"


def bundled_entries() -> list[str]:
    """The models shipped with the pack's plug-ins (the toy model first; the toy VQ model, a Switti)."""
    from svare_core import plugins
    names = plugins.names("bundled_model")
    return [n + BUNDLED_SUFFIX for n in sorted(names, key=lambda n: (n != "toyworld", n))]


def _path(kind: str, choice: str) -> str | None:
    """A list entry -> what load_pipeline understands (downloading known files when needed)."""
    if choice in (FROM_FILE, "minilm"):
        return None if choice == FROM_FILE else choice
    known = hub.from_label(choice)
    if known is not None:
        return str(hub.resolve(known.name, comfy.models_dir(known.folder)))
    return str(comfy.full_path(kind, choice))


PAIR = " + "                     # a Switti text-encoder entry: "clip_l.safetensors + clip_g.safetensors"


def _clip_pairs() -> list[str]:
    """Switti's two text encoders as one list entry each: every clip_l with every clip_g found in
    models/text_encoders (ComfyUI's files, or Hugging Face folders)."""
    names = [*comfy.list_files("text_encoders"), *comfy.list_folders("text_encoders")]
    tower = lambda n, tag: tag in n.rsplit("/", 1)[-1].lower()        # noqa: E731
    return [f"{a}{PAIR}{b}" for a in names if tower(a, "clip_l") for b in names if tower(b, "clip_g")]


def _text_encoder(choice: str):
    """A text_encoder entry -> what load_pipeline understands; a Switti pair -> (clip_l, clip_g[, tokenizer])."""
    if PAIR not in choice:
        return _path("text_encoders", choice)
    parts = [comfy.full_path("text_encoders", name) for name in choice.split(PAIR)]
    tokenizer = comfy.clip_tokenizer_dir()
    # files carry no tokenizer: ComfyUI's own (folders bring theirs)
    return (*parts, tokenizer) if tokenizer is not None and any(p.is_file() for p in parts) else tuple(parts)


class LoadVAR:
    SEARCH_ALIASES = ["Infinity", "Infinity-2B", "Infinity-8B", "Switti", "VAR", "visual autoregressive", "load model"]
    DESCRIPTION = ("Load a next-scale VAR text-to-image model: the bundled toy model, Infinity-2B/8B or Switti from "
                   "models/var (entries marked '(download)' are fetched from Hugging Face on first use).")
    CATEGORY = "svare"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The loaded model (transformer, VAE and text encoder).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        files = comfy.list_files("var")
        return {"required": {
            "transformer": ([*bundled_entries(), *files, *hub.labels("transformer")], {
                "default": BUNDLED,
                "tooltip": "The transformer: a bundled toy model (toyworld: Infinity's architecture; toyworld_vq: "
                           "Switti's), a file in models/var (Infinity: "
                           "infinity_2b_reg.pth, or infinity_8b_weights/model.safetensors.index.json; Switti: "
                           "Switti-1024/model.safetensors), or a '(download)' entry fetched from Hugging Face into "
                           "models/var."}),
            "vae": ([FROM_FILE, *files, *hub.labels("vae")], {
                "default": FROM_FILE,
                "tooltip": "The VAE. '(from model file)' for svare model files (the toy model holds its own); "
                           "Infinity-2B needs infinity_vae_d32reg.pth, Infinity-8B "
                           "infinity_vae_d56_f8_14_patchify.pth, Switti VQVAE-Switti/model.safetensors."}),
            "text_encoder": ([FROM_FILE, "minilm", *comfy.list_folders("text_encoders"), *_clip_pairs(),
                              *hub.labels("text_encoder")], {
                "default": FROM_FILE,
                "tooltip": "The text encoder: the one the model file names (toy model: minilm), a Hugging "
                           "Face folder in models/text_encoders (Infinity: flan-t5-xl), or for Switti a "
                           "'clip_l + clip_g' pair from models/text_encoders (ComfyUI's clip_l.safetensors and "
                           "clip_g.safetensors, read with ComfyUI's CLIP tokenizer)."}),
            "precision": (["fp32", "bf16", "fp16"], {
                "default": LOADER["precision"],
                "tooltip": "Weights precision of the transformer. bf16 halves memory on GPUs; fp32 on CPU."}),
            "device": (["auto", "cpu", "cuda"], {
                "default": LOADER["device"], "tooltip": "Where the transformer runs; auto: ComfyUI's device."}),
            "offload_text_encoder": ("BOOLEAN", {
                "default": LOADER["offload_text_encoder"],
                "tooltip": "Keep the text encoder on the CPU (Flan-T5-XL, 1.2B parameters, loads in bf16: 2.4 GB)."}),
            "offload_vae": ("BOOLEAN", {
                "default": LOADER["offload_vae"], "tooltip": "Keep the VAE on the CPU (slower decoding)."}),
        }}

    def load(self, transformer, vae, text_encoder, precision, device, offload_text_encoder, offload_vae):
        if isinstance(transformer, VARPipeline):        # tests (and scripts) may hand in a ready pipeline
            return (transformer,)
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was chosen but this machine has no usable CUDA GPU: choose auto or cpu")
        device = comfy.torch_device() if device == "auto" else device
        bundled = transformer in bundled_entries()
        model = transformer.removesuffix(BUNDLED_SUFFIX) if bundled else _path("var", transformer)
        # load_pipeline_cached holds pipelines only weakly: ComfyUI's cache of node outputs is what keeps a
        # loaded model alive (and reuses it while this node's inputs stay the same); when ComfyUI drops its
        # outputs ("free model and node cache", /free) the model is freed, and two Load VAR nodes with the
        # same options still share one model. Before the weights load, ComfyUI frees room for them
        # (svare_core.memory.before_load -> comfy_adapter.free_memory_for).
        pipe = load_pipeline_cached(model, vae=_path("var", vae), text_encoder=_text_encoder(text_encoder),
                                    device=str(device), dtype=precision,
                                    vae_device="cpu" if offload_vae else None,
                                    text_device="cpu" if offload_text_encoder else str(device))
        comfy.load_for_use(pipe)        # registered with ComfyUI's model management at once
        return (pipe,)
