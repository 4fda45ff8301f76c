"""Concept erasure nodes: train a patch (Erase Concept), apply it, save it, load it."""
from __future__ import annotations

import re

from svare_core import visual
from svare_core.erasure import METHODS, ErasurePatch, apply_patch, build_pairs, erase
from svare_core.erasure.pairs import pair_kinds, preserve_prompts_for
from svare_core.settings import family_of, resolve_erase

from . import comfy_adapter as comfy
from . import common
from .widgets import APPLY, AUTO, ERASE, core_seed
from .loaders import MODEL

PATCH = "SVARE_ERASURE_PATCH"
TRAINABLE = ("xattn_ffn", "xattn", "xattn_kv", "ffn", "lora")


def describe(patch: ErasurePatch) -> str:
    m = patch.meta
    return (f"erases {', '.join(patch.concepts) or '(unnamed)'} | method {m.get('method')} | {m.get('steps')} steps | "
            f"{len(m.get('pairs', []))} pairs | {patch.num_values():,} values | base {m.get('base_model')} "
            f"({patch.base_fingerprint})")


class EraseConcept:
    DESCRIPTION = ("Fine-tune a copy of the model so it no longer draws a concept (S-VARE; or the naive VARE / ESD "
                   "baselines). The result is a small erasure patch; the input model is not changed.")
    CATEGORY = "svare/erasure"
    RETURN_TYPES = (PATCH, "IMAGE", "STRING")
    RETURN_NAMES = ("patch", "loss_curve", "report")
    OUTPUT_TOOLTIPS = ("The erasure patch: apply it with Apply Erasure Patch, keep it with Save Erasure Patch.",
                       "Plot of the training losses.", "Summary of the training run.")
    FUNCTION = "erase"

    @classmethod
    def INPUT_TYPES(cls):
        d = ERASE
        return {"required": {
            "model": (MODEL, {"tooltip": "The model to erase the concept from (it is not modified)."}),
            "concept": ("STRING", {"default": d["concept"], "tooltip": "What to erase, e.g. 'striped', 'Van Gogh', "
                                   "'nude'. Several: comma-separated ('red, star')."}),
            "anchor": ("STRING", {"default": d["anchor"], "tooltip": "What to draw instead (a related, harmless "
                                  "concept), one per concept, comma-separated."}),
            "kind": ([AUTO, *pair_kinds()], {"default": d["kind"], "tooltip": "Prompt templates for the concept: "
                                             "object, style, nudity, or toy (attributes of the bundled toy world); "
                                             "auto: the model's (toy for the toy model, object for Infinity)."}),
            "pairs": ("STRING", {"default": "", "multiline": True,
                                 "tooltip": "Optional prompt pairs, one per line: 'unsafe prompt => safe prompt'. "
                                            "When given, they replace the templates."}),
            "method": (list(METHODS), {"default": d["method"], "tooltip": "svare: filtered CE + preservation "
                                       "(the paper's method); vare: plain CE; esd: ESD on the logits."}),
            "steps": ("INT", {"default": d["steps"], "min": 0, "max": 100000,
                              "tooltip": "Training iterations in all. 0: the model's, per concept (toy model 200, "
                                         "Infinity 500; three concepts in one node: three times that)."}),
            "learning_rate": ("FLOAT", {"default": d["learning_rate"], "min": 0.0, "max": 1e-2, "step": 1e-6,
                                        "round": False, "tooltip": "AdamW learning rate. 0: the model's (toy model "
                                                                   "1e-3, Infinity 2.3e-5)."}),
            "trainable": ([AUTO, *TRAINABLE], {"default": d["trainable"],
                                               "tooltip": "Which weights learn: cross-attention and/or feed-forward "
                                                          "layers (xattn_kv: only the text side of cross-"
                                                          "attention), or LoRA adapters on the attention. auto: "
                                                          "the model's (toy model xattn, Infinity lora)."}),
            "lora_rank": ("INT", {"default": d["lora_rank"], "min": 0, "max": 128,
                                  "tooltip": "Rank of the LoRA adapters (only for trainable = lora). 0: the model's (4)."}),
            "preservation_weight": ("FLOAT", {"default": d["preservation_weight"], "min": -1.0, "max": 10.0,
                                              "step": 0.05, "tooltip": "Weight of the loss that keeps everything "
                                              "else unchanged (svare only; 0 = off). -1: the model's (toy model 1, "
                                              "Infinity 0.5)."}),
            "teacher_cfg": ("FLOAT", {"default": d["teacher_cfg"], "min": 0.0, "max": 20.0, "step": 0.1,
                                      "tooltip": "Guidance of the frozen model that draws the safe targets. 0: the "
                                                 "model's (toy model 3, Infinity 4)."}),
            "preserve_prompts": ("STRING", {"default": "", "multiline": True,
                                            "tooltip": "Optional prompts (one per line) whose images must not "
                                                       "change."}),
            "seed": common.seed(d["seed"], "Seed of the training run (targets, pair order)."),
        }}

    @comfy.explain_out_of_memory("erasure")
    def erase(self, model, concept, anchor, kind, pairs, method, steps, learning_rate, trainable, lora_rank,
              preservation_weight, teacher_cfg, preserve_prompts, seed):
        kind = family_of(model).pair_kind if kind == AUTO else kind
        prompt_pairs = build_pairs(concept, anchor, kind, pairs)
        # What a widget leaves at "auto" is the model family's; the rest (targets per prompt, batch, precision)
        # has no widget and is the family's too.
        config = resolve_erase(model, prompt_pairs, method=method, steps=steps or None, lr=learning_rate or None,
                               trainable=None if trainable == AUTO else trainable, lora_rank=lora_rank or None,
                               preservation_weight=None if preservation_weight < 0 else preservation_weight,
                               teacher_cfg=teacher_cfg or None, seed=core_seed(seed))
        steps = config.steps
        bar, history, every = comfy.progress(steps), [], max(1, steps // 25)

        def on_step(step):
            comfy.check_interrupt()
            history.append({"step": step.step, **step.losses})
            show = bar.wants_preview and (step.step % every == 0 or step.step == step.total)
            bar.update(step.step, visual.loss_curve(history, size=(384, 216)) if show else None)

        preserve = preserve_prompts_for(prompt_pairs, kind, common.prompt_lines(preserve_prompts))
        result = erase(model, prompt_pairs, config, preserve_prompts=preserve,
                       callback=on_step)
        last = ", ".join(f"{k} {v:.4g}" for k, v in result.history[-1].items() if k != "step") if result.history else ""
        report = (f"{describe(result.patch)}\nfinal losses: {last}\n{result.seconds:.1f} s"
                  + (f", peak GPU memory {result.peak_memory_mb:.0f} MB" if result.peak_memory_mb else ""))
        return (result.patch, visual.to_comfy_image(visual.loss_curve(result.history)), report)


class ApplyErasurePatch:
    DESCRIPTION = ("Apply an erasure patch to a model, with a strength. Returns a new model; the input is not "
                   "changed. Chain several to stack patches; patches trained separately interfere, so to erase "
                   "several concepts, name them all in one Erase Concept node.")
    CATEGORY = "svare/erasure"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the patch applied (on top of any already applied).",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL, {"tooltip": "The model to patch (not modified)."}),
            "patch": (PATCH, {"tooltip": "The erasure patch (Erase Concept or Load Erasure Patch)."}),
            "strength": ("FLOAT", {"default": APPLY["strength"], "min": -2.0, "max": 2.0, "step": 0.05,
                                   "tooltip": "1 = as trained, 0 = no effect, between = partial erasure; "
                                              "negative values push the other way."}),
            "force": ("BOOLEAN", {"default": False, "tooltip": "Apply even if the patch was made for another base "
                                  "model (results are then unpredictable)."}),
        }}

    def apply(self, model, patch, strength, force):
        return (apply_patch(model, patch, strength, force=force),)


class SaveErasurePatch:
    DESCRIPTION = "Save an erasure patch (a small .safetensors file) into models/erasure_patches."
    CATEGORY = "svare/erasure"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("filename",)
    OUTPUT_TOOLTIPS = ("The saved file's name inside models/erasure_patches.",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "patch": (PATCH, {"tooltip": "The erasure patch to save."}),
            "filename_prefix": ("STRING", {"default": "svare_patch", "tooltip": "File name start; a counter and "
                                           ".safetensors are added. Plain names only (no folders)."}),
        }}

    def save(self, patch, filename_prefix):
        prefix = filename_prefix.strip()
        if not prefix or not re.fullmatch(r"[\w\-. ]+", prefix) or ".." in prefix:
            raise ValueError(f"filename_prefix {filename_prefix!r} must be a plain name (letters, digits, '-', '_', "
                             "'.', spaces; no folders or '..')")
        folder = comfy.models_dir("erasure_patches")
        n = 1 + max((int(m.group(1)) for p in (folder.glob(f"{prefix}_*.safetensors") if folder.is_dir() else [])
                     if (m := re.fullmatch(rf"{re.escape(prefix)}_(\d+)\.safetensors", p.name))), default=0)
        name = f"{prefix}_{n:05d}.safetensors"
        try:
            path = patch.save(folder / name)
        except OSError as e:
            # The patch itself stays in this node's input (ComfyUI keeps it): fix the folder and queue again.
            raise ValueError(f"could not write {folder / name} ({e.strerror or e}): free some space or make the "
                             "folder writable, then queue the prompt again (the trained patch is kept)") from e
        return {"ui": {"text": [f"saved {path}"]}, "result": (name,)}


class LoadErasurePatch:
    DESCRIPTION = "Load an erasure patch from models/erasure_patches (or one shipped with the pack)."
    CATEGORY = "svare/erasure"
    RETURN_TYPES = (PATCH, "STRING")
    RETURN_NAMES = ("patch", "info")
    OUTPUT_TOOLTIPS = ("The erasure patch.", "What it erases and how it was made.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "patch_name": (comfy.list_files("erasure_patches"), {
                "tooltip": "A .safetensors patch in models/erasure_patches (saved by Save Erasure Patch)."}),
        }}

    def load(self, patch_name):
        patch = ErasurePatch.load(comfy.full_path("erasure_patches", patch_name))
        return (patch, describe(patch))
