"""Concept erasure for VAR models (S-VARE, arXiv 2509.22400):

pairs.py      unsafe -> safe prompt pairs, from the user or expanded from a kind's templates
tokens.py     auxiliary visual tokens: what the frozen model draws for the safe prompts
losses.py     the objectives: filtered bitwise CE, preservation KL, the baselines'
methods.py    one class per method (S-VARE, naive VARE, ESD): what an iteration optimises
run.py        one run's context: the frozen model, its trainable copy, targets, optimizer
config.py     the settings of a run (and the research knobs kept for ablations)
trainable.py  what may change: dense tensor sets or LoRA factors
trainer.py    the loop: prepare the run, iterate, return a patch
patches.py    the result as a small shareable patch: apply with a strength, stack, remove exactly
evaluate.py   an erasure judged by a safety detector
"""
from .config import EraseConfig, Research, with_options
from .methods import ESD, METHODS, SVARE, VARE, ErasureMethod
from .pairs import PromptPair, build_pairs, expand_concept, load_pairs, parse_pairs, validate_pairs
from .patches import ErasurePatch, PatchError, apply_patch, merge_to_checkpoint, remove_patch
from .trainer import ErasureResult, TrainStep, erase

__all__ = ["PromptPair", "build_pairs", "expand_concept", "load_pairs", "parse_pairs", "validate_pairs", "ErasurePatch",
           "PatchError", "apply_patch", "merge_to_checkpoint", "remove_patch", "EraseConfig", "Research", "with_options",
           "ErasureMethod", "SVARE", "VARE", "ESD", "METHODS", "ErasureResult", "TrainStep", "erase"]
