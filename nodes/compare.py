"""Compare: the same prompts and seeds through two models, as one labelled before/after grid."""
from __future__ import annotations

from svare_core import generate, visual

from . import comfy_adapter as comfy
from . import common
from .widgets import COMPARE, core_seed
from .loaders import MODEL


class CompareModels:
    SEARCH_ALIASES = ["before after", "compare", "grid", "Infinity"]
    DESCRIPTION = ("Draw every prompt with both models from the same seed and show them side by side: one row per "
                   "prompt, columns before / after. Small images are enlarged (nearest neighbour).")
    CATEGORY = "svare"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("grid",)
    OUTPUT_TOOLTIPS = ("One labelled grid image: rows = prompts, columns = before / after.",)
    FUNCTION = "compare"

    @classmethod
    def INPUT_TYPES(cls):
        d = COMPARE
        return {"required": {
            "model_before": (MODEL, {"tooltip": "The reference model (e.g. straight from Load VAR)."}),
            "model_after": (MODEL, {"tooltip": "The changed model (e.g. after Apply Erasure Patch)."}),
            "prompts": ("STRING", {"default": d["prompts"], "multiline": True,
                                   "tooltip": "One prompt per line; each becomes a row."}),
            **common.sampling(d, "Seed; row i uses seed + i in both columns."),
            "resolution": common.resolution(d["resolution"]),
        }}

    @comfy.explain_out_of_memory("compare")
    def compare(self, model_before, model_after, prompts, seed, cfg, tau, top_p, resolution):
        lines = common.prompt_lines(prompts)
        if not lines:
            raise ValueError("write at least one prompt (one per line)")
        settings = common.sampler_settings(model_before, cfg, tau, top_p)
        n = len(model_before.default_scales("1:1", resolution))
        bar = comfy.progress(2 * n)
        columns = [generate(m, lines, seed=core_seed(seed), settings=settings, preset=resolution,
                            callback=common.scale_callback(m, bar, offset=i * n)).images
                   for i, m in enumerate((model_before, model_after))]
        grid = visual.labelled_grid([[before, after] for before, after in zip(*columns)], row_labels=lines,
                                    col_labels=["before", "after"])
        return (visual.to_comfy_image(grid),)
