"""Input specs shared by several nodes (one definition, one tooltip)."""
from __future__ import annotations

from svare_core.schedules import aspect_ratios, presets

from .widgets import SEED_MAX


def seed(default: int = 0, what: str = "Random seed: image i of a batch uses seed + i.") -> tuple:
    return ("INT", {"default": default, "min": 0, "max": SEED_MAX, "tooltip": what})


def cfg(default: float) -> tuple:
    return ("FLOAT", {"default": default, "min": 0.0, "max": 30.0, "step": 0.1,
                      "tooltip": "Classifier-free guidance: 1 = off; higher follows the prompt more closely. "
                                 "0: the model's (toy model 3, Infinity 4, Switti 6 ramped over the scales)."})


def tau(default: float) -> tuple:
    return ("FLOAT", {"default": default, "min": 0.0, "max": 5.0, "step": 0.05,
                      "tooltip": "Sampling temperature on the guided bit logits (lower = more deterministic). "
                                 "0: the model's (toy model 1, Infinity 0.5)."})


def top_p(default: float) -> tuple:
    return ("FLOAT", {"default": default, "min": -1.0, "max": 1.0, "step": 0.01,
                      "tooltip": "Nucleus sampling per bit: bits whose likelier value has at least this "
                                 "probability are taken greedily. 0 = off; -1: the model's (toy model off, "
                                 "Infinity 0.97)."})


def sampler_settings(model, cfg: float, tau: float, top_p: float, top_k: int | None = None,
                     negative_prompt: str | None = None):
    """The sampler settings of a node: its widgets where set, the model family's where "auto"
    (cfg 0, tau 0, top_p -1), resolved in the one place the CLI uses too."""
    from svare_core.settings import resolve_sampler

    # top_k 0 is "the model's" too: off for bitwise models (their families' value), 400 for Switti.
    return resolve_sampler(model, cfg=cfg or None, tau=tau or None, top_p=None if top_p < 0 else top_p,
                           top_k=top_k or None, negative_prompt=negative_prompt or None)


def sampling(d: dict, seed_tooltip: str | None = None) -> dict:
    """The sampler widgets every generating node has, in widget order: seed, cfg, tau, top_p.

    ``d``: the node's defaults (keys seed, cfg, tau, top_p). Spread into INPUT_TYPES with ``**``; the
    order matters, workflows store widget values by position.
    """
    return {
        "seed": seed(d["seed"]) if seed_tooltip is None else seed(d["seed"], seed_tooltip),
        "cfg": cfg(d["cfg"]),
        "tau": tau(d["tau"]),
        "top_p": top_p(d["top_p"]),
    }


def resolution(default: str) -> tuple:
    return (list(presets()), {"default": default,
                              "tooltip": "Resolution preset of Infinity's scale schedule (1M = 1024 px). Ignored by "
                                         "models that carry their own schedule, like the toy model (64 px)."})


def aspect_ratio(default: str) -> tuple:
    return (aspect_ratios(), {"default": default,
                              "tooltip": "Aspect ratio height:width of Infinity's schedule. Ignored by models with "
                                         "their own schedule (the toy model is square)."})


def prompt_lines(text: str) -> list[str]:
    """Non-empty lines of a multiline widget."""
    return [line.strip() for line in str(text).splitlines() if line.strip()]


def scale_callback(pipe, bar, offset: int = 0):
    """A generate() callback: stop on the user's interrupt, advance ``bar``, show the partial image."""
    from svare_core import decode_preview, imageio, visual

    from . import comfy_adapter as comfy

    def on_scale(step) -> None:
        comfy.check_interrupt()
        preview = visual.upscale(imageio.to_pil(decode_preview(pipe, step)), 256) if bar.wants_preview else None
        bar.update(offset + step.index + 1, preview)
    return on_scale
