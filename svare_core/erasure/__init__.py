"""Concept erasure for VAR models (S-VARE, arXiv 2509.22400), in five small pieces:

pairs.py      unsafe -> safe prompt pairs, from the user or expanded from templates
tokens.py     auxiliary visual tokens: what the frozen model draws for the safe prompts
losses.py     the filtered bitwise CE (only still-unsafe tokens learn) and the preservation KL
trainer.py    the two-step fine-tuning loop (and the naive-VARE and ESD baselines)
patches.py    the result as a small shareable patch: apply with a strength, stack, remove exactly
"""
from .pairs import PromptPair, build_pairs, expand_concept, load_pairs, parse_pairs, validate_pairs
from .patches import ErasurePatch, PatchError, apply_patch, merge_to_checkpoint, remove_patch
from .trainer import EraseConfig, ErasureResult, TrainStep, erase

__all__ = ["PromptPair", "build_pairs", "expand_concept", "load_pairs", "parse_pairs", "validate_pairs", "ErasurePatch",
           "PatchError", "apply_patch", "merge_to_checkpoint", "remove_patch", "EraseConfig", "ErasureResult",
           "TrainStep", "erase"]
