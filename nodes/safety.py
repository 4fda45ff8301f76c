"""Safety Score: score generated images for a concept (toy world, NudeNet, OpenNSFW, CLIP), optionally censor."""
from __future__ import annotations

import json

import torch

from svare_core import safety

from . import comfy_adapter as comfy
from .widgets import SAFETY


class SafetyScore:
    DESCRIPTION = ("Score each image for an unwanted concept with a detector, flag those at or above the threshold "
                   "and optionally blur them (censor).")
    CATEGORY = "svare"
    RETURN_TYPES = ("IMAGE", "STRING", "STRING", "STRING", "BOOLEAN", "FLOAT", "BOOLEAN")
    RETURN_NAMES = ("images", "report", "scores", "flagged", "any_flagged", "score_values", "flag_values")
    # The typed lists come last, so workflows wired to the first five outputs keep their links.
    OUTPUT_IS_LIST = (False, False, False, False, False, True, True)
    SEARCH_ALIASES = ["NSFW", "nudity", "NudeNet", "censor", "safety checker", "CLIP score"]
    OUTPUT_TOOLTIPS = ("The images, flagged ones blurred and labelled when censor is on.",
                       "A readable report, one line per image.", "JSON list of the per-image scores (0..1).",
                       "JSON list of per-image flags (true = at or above the threshold).",
                       "True if any image was flagged.", "The per-image scores, as a list of FLOATs.",
                       "The per-image flags, as a list of BOOLEANs (an image that could not be judged is flagged).")
    FUNCTION = "score"

    @classmethod
    def INPUT_TYPES(cls):
        d = SAFETY
        return {"required": {
            "images": ("IMAGE", {"tooltip": "Images to check."}),
            "detector": (safety.detector_names(), {
                "default": d["detector"],
                "tooltip": "toyworld: exact attributes of toy-model images; nudenet / open_nsfw: nudity (need "
                           "their pip packages); clip: any concept by text (needs a local CLIP folder)."}),
            "concept": ("STRING", {"default": d["concept"], "tooltip": "What to look for: a toy-world value ('red', "
                                   "'star'), or any text for clip. Ignored by the nudity detectors."}),
            "threshold": ("FLOAT", {"default": d["threshold"], "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "Images scoring at or above this are flagged."}),
            "censor": ("BOOLEAN", {"default": d["censor"], "tooltip": "Blur flagged images and write why on them."}),
        }, "optional": {
            "clip_model_path": ("STRING", {"default": "", "tooltip": "clip detector only: a local Hugging Face CLIP "
                                           "folder (e.g. openai/clip-vit-large-patch14)."}),
        }}

    def score(self, images, detector, concept, threshold, censor, clip_model_path=""):
        options = {"model_path": clip_model_path.strip()} if detector == "clip" and clip_model_path.strip() else {}
        res = safety.check(images, detector, concept=concept.strip() or None, threshold=threshold,
                           censor_flagged=censor, **options)
        comfy.track_caches()            # ComfyUI may now drop the cached detector when it frees memory
        out = res.images if isinstance(res.images, torch.Tensor) else torch.as_tensor(res.images)
        flagged = [bool(f) for f in res.flagged]
        scores = [float(s) for s in res.detection.scores]
        return (out.float(), res.report, json.dumps([round(s, 4) if s == s else None for s in scores]),
                json.dumps(flagged), any(flagged), scores, flagged)
