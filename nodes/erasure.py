"""Concept erasure nodes: train a patch (Erase Concept), apply it, save it, load it."""
from __future__ import annotations

import re

from svare_core import visual
from svare_core.erasure import METHODS, ErasurePatch, apply_patch, build_pairs, erase
from svare_core.erasure import cache as erasure_cache
from svare_core.erasure.pairs import pair_kinds, preserve_prompts_for
from svare_core.erasure.trainable import LORA_TARGETS
from svare_core.settings import family_of, resolve_erase

from . import comfy_adapter as comfy
from . import common
from .widgets import APPLY, AUTO, ERASE, core_seed
from .loaders import MODEL

PATCH = "SVARE_ERASURE_PATCH"
SETTINGS = "SVARE_ERASE_SETTINGS"
TRAINABLE = ("xattn_ffn", "xattn", "xattn_kv", "xattn_pool", "ffn", "lora")


def describe(patch: ErasurePatch) -> str:
    m = patch.meta
    return (f"erases {', '.join(patch.concepts) or '(unnamed)'} | method {m.get('method')} | {m.get('steps')} steps | "
            f"{len(m.get('pairs', []))} pairs | {patch.num_values():,} values | base {m.get('base_model')} "
            f"({patch.base_fingerprint})")


class EraseConcept:
    SEARCH_ALIASES = ["S-VARE", "unlearn", "concept erasure", "remove concept", "NSFW", "Infinity", "Switti", "train"]
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
                                             "auto: the model's (toy for the toy model, object for Infinity and Switti)."}),
            "pairs": ("STRING", {"default": "", "multiline": True,
                                 "tooltip": "Optional prompt pairs, one per line: 'unsafe prompt => safe prompt'. "
                                            "When given, they replace the templates."}),
            "method": (list(METHODS), {"default": d["method"], "tooltip": "svare: filtered CE + preservation "
                                       "(the paper's method); vare: plain CE; esd: ESD on the logits."}),
            "steps": ("INT", {"default": d["steps"], "min": 0, "max": 100000,
                              "tooltip": "Training iterations in all. 0: the model's, per concept (toy model 200, "
                                         "Infinity 500; three concepts in one node: three times that)."}),
            "learning_rate": ("FLOAT", {"default": d["learning_rate"], "min": 0.0, "max": 1e-2, "step": 1e-5,
                                        "round": False, "tooltip": "AdamW learning rate. 0: the model's (toy model "
                                                                   "1e-3, Infinity 2.3e-5)."}),
            "trainable": ([AUTO, *TRAINABLE], {"default": d["trainable"],
                                               "tooltip": "Which weights learn: cross-attention and/or feed-forward "
                                                          "layers (xattn_kv: only the text side of cross-"
                                                          "attention; xattn_pool: cross-attention and the pooled "
                                                          "text's projection), or LoRA adapters on the attention. "
                                                          "auto: the model's (toy model xattn, xattn_pool when "
                                                          "robust; Infinity lora)."}),
            "lora_rank": ("INT", {"default": d["lora_rank"], "min": 0, "max": 128,
                                  "tooltip": "Rank of the LoRA adapters (only for trainable = lora). 0: the model's (4)."}),
            "preservation_weight": ("FLOAT", {"default": d["preservation_weight"], "min": -1.0, "max": 10.0,
                                              "step": 0.05, "tooltip": "Weight of the loss that keeps everything "
                                              "else unchanged (svare only; 0 = off). -1: the model's (toy model 1, "
                                              "Infinity 0.5)."}),
            "teacher_cfg": ("FLOAT", {"default": d["teacher_cfg"], "min": 0.0, "max": 20.0, "step": 0.1,
                                      "tooltip": "Guidance of the frozen model that draws the safe targets. 0: the "
                                                 "model's (toy model 3, Infinity 4, Switti 6 on its ramp over the scales)."}),
            "preserve_prompts": ("STRING", {"default": "", "multiline": True,
                                            "tooltip": "Optional prompts (one per line) whose images must not "
                                                       "change."}),
            "seed": common.seed(d["seed"], "Seed of the training run (targets, pair order)."),
        }, "optional": {
            "settings": (SETTINGS, {"tooltip": "Advanced training settings (Erase Settings node); unset ones are "
                                    "the model's."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, concept, anchor, kind, pairs):
        """Checked when the prompt is queued, before any node of the graph runs (ComfyUI shows the line)."""
        return validate_concept_inputs(concept, anchor, kind, pairs)

    @comfy.explain_out_of_memory("erasure")
    def erase(self, model, concept, anchor, kind, pairs, method, steps, learning_rate, trainable, lora_rank,
              preservation_weight, teacher_cfg, preserve_prompts, seed, settings=None):
        kind = family_of(model).pair_kind if kind == AUTO else kind
        prompt_pairs = build_pairs(concept, anchor, kind, pairs)
        # What a widget leaves at "auto" is the model family's; the rest (targets per prompt, batch, precision)
        # has no widget and is the family's too.
        config = resolve_erase(model, prompt_pairs, method=method, steps=steps or None, lr=learning_rate or None,
                               trainable=None if trainable == AUTO else trainable, lora_rank=lora_rank or None,
                               preservation_weight=None if preservation_weight < 0 else preservation_weight,
                               teacher_cfg=teacher_cfg or None, seed=core_seed(seed),
                               cache_dir=str(erasure_cache.default_cache_dir()), **(settings or {}))
        steps = config.steps
        bar, history, every = comfy.progress(steps), [], max(1, steps // 25)
        targets_bar = comfy.progress(1)

        def on_targets(done: int, total: int) -> None:
            # Drawing the training targets comes first (seconds on the toy model, minutes on Infinity):
            # its own progress, and Cancel works there too.
            comfy.check_interrupt()
            targets_bar.total = max(1, total)
            targets_bar.update(done)

        def on_step(step):
            comfy.check_interrupt()
            history.append({"step": step.step, **step.losses})
            show = bar.wants_preview and (step.step % every == 0 or step.step == step.total)
            bar.update(step.step, visual.loss_curve(history, size=(384, 216)) if show else None)

        preserve = preserve_prompts_for(prompt_pairs, kind, common.prompt_lines(preserve_prompts))
        result = erase(model, prompt_pairs, config, preserve_prompts=preserve,
                       callback=on_step, targets_callback=on_targets)
        last = ", ".join(f"{k} {v:.4g}" for k, v in result.history[-1].items() if k != "step") if result.history else ""
        report = (f"{describe(result.patch)}\nfinal losses: {last}\n{result.seconds:.1f} s"
                  + (f", peak GPU memory {result.peak_memory_mb:.0f} MB" if result.peak_memory_mb else "")
                  + f"\n{erasure_cache.describe(config.cache_dir)} (Erasure Cache node: clear)")
        return (result.patch, visual.to_comfy_image(visual.loss_curve(result.history)), report)


def validate_concept_inputs(concept: str, anchor: str, kind: str, pairs: str) -> bool | str:
    """True, or the one line saying what is wrong with the concept, anchor or pairs. With kind "auto"
    the model is not known yet: the pairs are checked, the templates when the node runs."""
    if kind != AUTO and kind not in pair_kinds():
        return f"unknown kind {kind!r}; choose one of {[AUTO, *pair_kinds()]}"
    try:
        if kind != AUTO or pairs.strip():
            build_pairs(concept, anchor, "object" if kind == AUTO else kind, pairs)
        elif not concept.strip():
            return "name the concept to erase (or write prompt pairs 'unsafe => safe')"
    except ValueError as e:
        return str(e)
    return True


class EraseSettings:
    DESCRIPTION = ("Advanced settings for Erase Concept, in the style of wrapper packs: connect it to Erase "
                   "Concept's optional 'settings' input. Every value left at auto is the model's own default.")
    CATEGORY = "svare/erasure"
    RETURN_TYPES = (SETTINGS,)
    RETURN_NAMES = ("settings",)
    OUTPUT_TOOLTIPS = ("Settings for Erase Concept's 'settings' input.",)
    FUNCTION = "settings"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pairs_per_step": ("INT", {"default": 0, "min": 0, "max": 64,
                                       "tooltip": "Prompt pairs in each step. 0: the model's (toy 8, Infinity 2)."}),
            "preserve_per_step": ("INT", {"default": -1, "min": -1, "max": 64,
                                          "tooltip": "Preservation prompts in each preservation step, per concept. "
                                                     "-1: the model's (1)."}),
            "aux_samples": ("INT", {"default": 0, "min": 0, "max": 16,
                                    "tooltip": "Target images drawn per safe prompt. 0: the model's (toy 8, "
                                               "Infinity 1)."}),
            "student_cfg": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 20.0, "step": 0.1,
                                      "tooltip": "Guidance on the trained model's logits in the losses (1 = plain "
                                                 "conditional, as the paper). 0: the model's (toy 3, Infinity 1)."}),
            "token_error_rate": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.01,
                                           "tooltip": "S-VARE's filter: tokens with fewer wrong bits do not learn. "
                                                      "-1: the model's (toy 0.03, Infinity 0.25)."}),
            "lora_targets": ([AUTO, *sorted(LORA_TARGETS)], {"default": AUTO,
                                                            "tooltip": "Which projections get LoRA adapters "
                                                                       "(trainable = lora). auto: attn."}),
            "precision": ([AUTO, "fp32", "bf16"], {"default": AUTO,
                                                  "tooltip": "Training precision (bf16: autocast on CUDA and on CPUs with "
                                                             "bf16 instructions). auto: the "
                                                             "model's (toy fp32, Infinity bf16)."}),
            "gradient_checkpointing": ([AUTO, "on", "off"], {"default": AUTO,
                                                             "tooltip": "Recompute activations in the backward "
                                                                        "pass (less memory). auto: the model's "
                                                                        "(Infinity on)."}),
            "robust": ([AUTO, "on", "off"], {"default": AUTO,
                                             "tooltip": "S-VARE only: also train under the conditions attacks build "
                                                        "(soft prompts, near words, the concept direction), with the "
                                                        "model's robust recipe. About 2-2.5x the training time on the "
                                                        "toy model. auto: off."}),
        }}

    def settings(self, pairs_per_step, preserve_per_step, aux_samples, student_cfg, token_error_rate, lora_targets,
                 precision, gradient_checkpointing, robust=AUTO):
        chosen = {"pairs_per_step": pairs_per_step or None,
                  "preserve_per_step": None if preserve_per_step < 0 else preserve_per_step,
                  "aux_samples": aux_samples or None, "student_cfg": student_cfg or None,
                  "token_error_rate": None if token_error_rate < 0 else token_error_rate,
                  "lora_targets": None if lora_targets == AUTO else lora_targets,
                  "precision": None if precision == AUTO else precision,
                  "gradient_checkpointing": None if gradient_checkpointing == AUTO else gradient_checkpointing == "on",
                  "robust": None if robust == AUTO else robust == "on"}
        return ({k: v for k, v in chosen.items() if v is not None},)


class ErasureCache:
    DESCRIPTION = ("Where Erase Concept keeps the auxiliary tokens and teacher targets it computed (so a second "
                   "run with the same model, prompts and settings skips that phase), how big, and a switch to "
                   "empty it.")
    CATEGORY = "svare/erasure"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("info",)
    OUTPUT_TOOLTIPS = ("The cache folder, its files and size (after clearing, when clear is on).",)
    FUNCTION = "show"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clear": ("BOOLEAN", {"default": False, "tooltip": "Remove every cache entry (they are recomputed "
                                  "when needed)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, clear):
        return float("nan")           # the folder changes outside the graph: look again at every run

    def show(self, clear):
        folder = erasure_cache.default_cache_dir()
        lines = []
        if clear:
            files, size = erasure_cache.clear(folder)
            lines.append(f"removed {files} file{'s' if files != 1 else ''} ({size / 1e6:.2f} MB)")
        lines.append(erasure_cache.describe(folder))
        text = "\n".join(lines)
        return {"ui": {"text": [text]}, "result": (text,)}


class ApplyErasurePatch:
    SEARCH_ALIASES = ["erasure patch", "apply patch", "LoRA", "Infinity"]
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
