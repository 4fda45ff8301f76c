"""VAR Sampler: text -> images with a SVARE_VAR_MODEL, one scale at a time."""
from __future__ import annotations

from svare_core import generate

from . import comfy_adapter as comfy
from . import common
from .widgets import SAMPLER, core_seed
from .loaders import MODEL


class VARSampler:
    SEARCH_ALIASES = ["Infinity", "Switti", "VAR", "sampler", "generate", "text to image"]
    DESCRIPTION = ("Generate images coarse-to-fine with a VAR model. The progress bar advances per scale and "
                   "previews the partial image.")
    CATEGORY = "svare"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The generated images (batch_size of them).",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        d = SAMPLER
        return {"required": {
            "model": (MODEL, {"tooltip": "The model from Load VAR (optionally with erasure patches applied)."}),
            "prompt": ("STRING", {"default": d["prompt"], "multiline": True, "tooltip": "What to draw."}),
            "negative_prompt": ("STRING", {"default": "", "multiline": True,
                                           "tooltip": "Used instead of the empty prompt for guidance; empty = "
                                                      "the model's learned unconditional embedding."}),
            **common.sampling(d),
            "top_k": ("INT", {"default": d["top_k"], "min": 0, "max": 2,
                              "tooltip": "1 = greedy bits; 0 (or 2) = off (a bit has only two values). "
                                         "VQ models (Switti): 0 = the model's top-k (400)."}),
            "aspect_ratio": common.aspect_ratio(d["aspect_ratio"]),
            "resolution": common.resolution(d["resolution"]),
            "batch_size": ("INT", {"default": d["batch_size"], "min": 1, "max": 64,
                                   "tooltip": "Number of images, drawn with seeds seed, seed+1, ..."}),
        }}

    @comfy.explain_out_of_memory("sampling")
    def sample(self, model, prompt, negative_prompt, seed, cfg, tau, top_p, top_k, aspect_ratio, resolution,
               batch_size):
        settings = common.sampler_settings(model, cfg, tau, top_p, top_k, negative_prompt.strip())
        bar = comfy.progress(len(model.default_scales(aspect_ratio, resolution)))
        result = generate(model, [prompt] * batch_size, seed=core_seed(seed), settings=settings,
                          aspect_ratio=aspect_ratio, preset=resolution, callback=common.scale_callback(model, bar))
        return (result.images.float(),)
