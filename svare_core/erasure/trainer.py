"""Fine-tune a VAR model to erase concepts: one plain loop over one run context.

The method (erasure/methods.py: S-VARE, naive VARE, ESD) says what an iteration optimises; this
loop prepares the run (a trainable copy of the model, auxiliary tokens, the frozen model's
targets), runs the iterations, stops on divergence, and returns an ErasurePatch: the deltas of
the trained tensors (or LoRA factors).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import memory
from ..models.infinity import Infinity
from ..models.switti import Switti
from ..pipeline import VARPipeline
from . import cache as erasure_cache
from .attacks import check_attackable
from .config import EraseConfig
from .methods import method_for
from .pairs import PromptPair, validate_pairs
from .patches import ErasurePatch, applied
from .run import ErasureRun
from .tokens import aux_settings, auxiliary_tokens, prompt_seeds
from .trainable import add_lora, dense_parameters, remove_lora


@dataclass
class TrainStep:
    """What a progress callback sees after each iteration; it may raise Cancelled to stop."""
    step: int
    total: int
    losses: dict[str, float]
    elapsed: float


@dataclass
class ErasureResult:
    patch: ErasurePatch
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    peak_memory_mb: float | None = None


def _erasure_estimate(pipe, pairs, config=None, *, scales=None, **_) -> int:
    """erase()'s working memory (memory.erasure_bytes) from its arguments."""
    return memory.erasure_bytes(pipe, config or EraseConfig(), scales or pipe.default_scales("1:1", "0.06M"))


# A host sharing the GPU (ComfyUI) frees room for the run and puts the model on its device first.
@memory.task("erasure", _erasure_estimate)
def erase(pipe: VARPipeline, pairs: list[PromptPair], config: EraseConfig | None = None, *,
          preserve_prompts: list[str] | None = None, scales=None,
          callback: Callable[[TrainStep], None] | None = None,
          targets_callback: Callable[[int, int], None] | None = None) -> ErasureResult:
    """Train an erasure patch for ``pairs`` on a copy of ``pipe``'s transformer (``pipe`` is not modified).

    ``callback`` sees every iteration; ``targets_callback(done, total)`` the drawing of the training
    targets before them (after every scale of every image: minutes on a real model). Either may
    raise to cancel.

    ``config`` is used as given; ``svare_core.settings.resolve_erase`` makes one from the model
    family's defaults, the number of concepts and what the user set.
    """
    cfg = config or EraseConfig()
    cfg.validate()
    method = method_for(cfg.method)
    pairs = validate_pairs(list(pairs))
    if cfg.robust:                       # before the (slow) training targets
        check_attackable(pipe)
    preserve_prompts = method.preserve_prompts(cfg, preserve_prompts or [])
    scales = [tuple(s) for s in (scales or pipe.default_scales("1:1", "0.06M"))]
    device = pipe.transformer.device
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # Inference-mode tensors cannot be trained (ComfyUI runs nodes under inference_mode).
    with torch.inference_mode(False), torch.enable_grad():
        frozen = pipe.transformer
        student = _student_copy(frozen, cfg)
        run = ErasureRun(pipe, frozen, student, cfg, pairs, preserve_prompts, scales,
                         generator=torch.Generator().manual_seed(cfg.seed))
        r = cfg.research
        run.sampler = aux_settings(pipe, cfg)
        fingerprint = pipe.fingerprint()
        seeds = ((lambda prompt: prompt_seeds(prompt, cfg.seed, cfg.aux_samples)) if r.aux_seeds == "per_prompt"
                 else [cfg.seed + i for i in range(cfg.aux_samples)])
        run.aux = auxiliary_tokens(pipe, method.token_prompts(run), seeds=seeds, settings=run.sampler, scales=scales,
                                   cache_dir=cfg.cache_dir, fingerprint=fingerprint, callback=targets_callback,
                                   batch_size=aux_batch_size(pipe, cfg, scales))
        run.params, lora = _trainable(student, cfg)
        decay = [p for p in run.params.values() if p.dim() >= 2]
        no_decay = [p for p in run.params.values() if p.dim() < 2]
        run.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": r.weight_decay},
                                           {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=r.betas)
        run.teacher = _teacher_targets(run, method, fingerprint)

        history, bad = [], 0
        order = torch.randperm(len(pairs), generator=run.generator).tolist()
        for step in range(cfg.steps):
            batch = [pairs[order[(step * cfg.pairs_per_step + i) % len(pairs)]] for i in range(cfg.pairs_per_step)]
            losses, ok = method.step(run, batch)
            bad = 0 if ok else bad + 1
            # A skipped step leaves the weights as they were; if they are already non-finite, no later step
            # can mend them (checked only then: a full pass over the trained tensors each step costs time).
            if not ok and not _finite(run.params):
                raise FloatingPointError(f"erasure diverged at step {step + 1}: the trained weights are no longer "
                                         f"finite; nothing was written. Lower the learning rate (now {cfg.lr})")
            if bad >= r.max_bad_steps:
                raise FloatingPointError(f"erasure diverged: {bad} steps in a row gave non-finite losses; "
                                         f"lower the learning rate (now {cfg.lr})")
            history.append({"step": step + 1, **losses})
            if callback is not None:
                callback(TrainStep(step + 1, cfg.steps, losses, time.time() - t0))

        # Ending on a step whose loss could not be computed means the model ended where the loss is not
        # finite: diverged (an occasional bad step earlier is skipped and harmless).
        if bad or not _finite(run.params):
            raise FloatingPointError(f"erasure diverged: the last step gave a non-finite loss (or the trained weights "
                                     f"are not finite); nothing was written. Lower the learning rate (now {cfg.lr})")
        patch = _make_patch(run, lora, len(history))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return ErasureResult(patch, history, time.time() - t0, peak)


# -- pieces -------------------------------------------------------------------------------------------
def _student_copy(frozen: Infinity | Switti, cfg: EraseConfig) -> Infinity | Switti:
    """The model to train: its own copy of the trained tensors, the frozen model's for the rest.

    Sharing the untouched tensors keeps a multi-GB model from being held twice. Inference
    tensors (made under torch.inference_mode) cannot take part in autograd, so those are copied.
    """
    trained = set(dense_parameters(frozen, cfg.trainable)) if cfg.trainable != "lora" else set()
    dtype = torch.float32 if cfg.precision == "fp32" else None
    state = {}
    for name, t in frozen.state_dict().items():
        t = t.detach()
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        elif name in trained or t.is_inference():
            t = t.clone()
        state[name] = t
    with torch.device("meta"):
        student = type(frozen)(frozen.cfg)
    student.load_state_dict(state, assign=True)
    # Train mode: the models have no dropout, but their forward only checkpoints in training mode.
    return student.requires_grad_(False).train()


def aux_batch_size(pipe: VARPipeline, cfg: EraseConfig, scales, most: int = 8) -> int:
    """How many auxiliary images to draw at a time: as many (up to ``most``) as fit in the working
    memory the erasure run is already given (memory.erasure_bytes)."""
    budget = memory.erasure_bytes(pipe, cfg, scales)
    return max([b for b in range(1, most + 1) if memory.sampling_bytes(pipe, b, scales, decode=False) <= budget],
               default=1)


def _teacher_targets(run: ErasureRun, method, fingerprint: str) -> dict[str, torch.Tensor]:
    """The method's teacher targets, read from the run's cache folder when an earlier run with the same
    inputs left them there (else computed, and written there)."""
    folder = run.cfg.cache_dir
    if folder is None:
        return method.teacher_targets(run)
    key = erasure_cache.targets_key(run, method.name, fingerprint, erasure_cache.aux_key(run.aux))
    cached = erasure_cache.read_targets(folder, key)
    if cached is not None:
        return cached
    targets = method.teacher_targets(run)
    if targets:
        erasure_cache.write_targets(folder, key, targets)
    return targets


def _finite(params: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params.values())


def _trainable(student, cfg: EraseConfig):
    if cfg.trainable == "lora":
        lora = add_lora(student, cfg.lora_targets, cfg.lora_rank)
        params = {}
        for name, delta in lora.items():
            delta.requires_grad_(True)
            params[name + ".lora_A"], params[name + ".lora_B"] = delta.A, delta.B
        return params, lora
    params = dense_parameters(student, cfg.trainable)
    for p in params.values():
        p.requires_grad_(True)
    return params, None


def _make_patch(run: ErasureRun, lora, steps: int) -> ErasurePatch:
    pipe, cfg, pairs = run.pipe, run.cfg, run.pairs
    if lora is not None:
        tensors = {}
        for name, delta in lora.items():
            tensors[name + ".lora_A"] = delta.A.detach().float().cpu().clone()
            tensors[name + ".lora_B"] = delta.B.detach().float().cpu().clone()
        scale = next(iter(lora.values())).scale
        remove_lora(run.student)
    else:
        base = dict(run.frozen.named_parameters())
        tensors = {n: (p.detach().float() - base[n].detach().float()).cpu() for n, p in run.params.items()}
        scale = 1.0
    meta = {
        "base_fingerprint": pipe.base_fingerprint, "base_model": pipe.name,
        "trained_on_patches": [p.concepts for p, _ in pipe.patches],
        "trained_on": applied(pipe),
        "concepts": sorted({p.concept for p in pairs if p.concept}),
        "anchors": sorted({p.safe for p in pairs})[:50],
        "pairs": [[p.unsafe, p.safe] for p in pairs][:200],
        "preserve_prompts": run.preserve_prompts[:200],
        "method": cfg.method, "steps": steps, "lora_scale": scale,
        "scales": [list(s) for s in run.scales],
        "hyperparameters": cfg.used_options(),
        "metrics": {},
    }
    return ErasurePatch(tensors, meta)
