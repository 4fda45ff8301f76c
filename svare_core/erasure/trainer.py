"""Fine-tune a VAR model to erase concepts: S-VARE, naive VARE, or ESD on logits.

S-VARE, one iteration (two optimizer steps, as the authors do):
  1. under the UNSAFE prompt, teacher-forced on the auxiliary tokens of the SAFE prompt,
     step on the filtered CE to the auxiliary bits (only tokens still drawn "unsafely" learn);
  2. under the SAFE (and preservation) prompts, step on the KL to the frozen model's
     CFG-guided distribution (keeps everything else as it was).
The result is an ErasurePatch: the deltas of the trained tensors (or LoRA factors).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ..models.infinity import Infinity
from ..pipeline import VARPipeline
from ..sampling import SamplerSettings
from . import losses
from .pairs import PromptPair, validate_pairs
from .patches import ErasurePatch
from .tokens import AuxTokens, auxiliary_tokens
from .trainable import DENSE_SETS, LORA_TARGETS, add_lora, dense_parameters, remove_lora

METHODS = ("svare", "vare", "esd")


@dataclass
class EraseConfig:
    method: str = "svare"                 # svare | vare (naive: plain CE, no preservation) | esd
    steps: int = 500
    lr: float = 2.3e-5
    pairs_per_step: int = 2
    trainable: str = "xattn_ffn"          # xattn_ffn | xattn | xattn_kv | ffn | all_blocks | lora
    lora_rank: int = 4
    lora_targets: str = "attn"            # attn | xattn | xattn_out | attn_ffn
    preservation_weight: float = 0.5      # lambda of L_Pre
    preserve_per_step: int = 1            # preservation prompts in each L_Pre step per concept (besides the safe ones)
    bit_threshold: float = math.log(2)
    token_error_rate: float = 0.25
    supervised_scales: str = "all"        # all | first (SACE: confine the intervention to scale 0)
    teacher_cfg: float = 4.0              # CFG of the frozen teacher (auxiliary tokens; L_Pre unless preserve_cfg)
    preserve_cfg: float | None = None     # CFG of L_Pre's teacher alone (None: teacher_cfg, as the paper)
    student_cfg: float = 1.0              # CFG on the student's logits in the losses (1: plain conditional, as the paper)
    teacher_tau: float = 1.0
    aux_top_p: float = 0.97
    aux_samples: int = 1                  # auxiliary images per safe prompt
    esd_eta: float = 1.0
    seed: int = 0
    grad_clip: float = 5.0
    weight_decay: float = 0.005
    betas: tuple[float, float] = (0.9, 0.97)
    precision: str = "fp32"               # fp32 | bf16 (CUDA autocast)
    gradient_checkpointing: bool = False
    max_bad_steps: int = 10               # consecutive non-finite losses before giving up
    cache_dir: str | None = None          # auxiliary-token cache

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.steps < 1 or self.lr <= 0 or self.pairs_per_step < 1 or self.preserve_per_step < 0:
            raise ValueError("steps, lr and pairs_per_step must be positive, preserve_per_step not negative")
        if self.preserve_cfg is not None and self.preserve_cfg <= 0:
            raise ValueError(f"preserve_cfg must be positive (1 = no guidance) or None, got {self.preserve_cfg}")
        if self.student_cfg <= 0:
            raise ValueError(f"student_cfg must be positive (1 = the plain conditional pass), got {self.student_cfg}")
        if self.supervised_scales not in ("all", "first"):
            raise ValueError(f"supervised_scales must be 'all' or 'first', got {self.supervised_scales!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        # Checked here too, so a typo fails before the (slow) auxiliary-token generation.
        if self.trainable != "lora" and self.trainable not in DENSE_SETS:
            raise ValueError(f"unknown trainable set {self.trainable!r}; choose one of {sorted(DENSE_SETS)} or 'lora'")
        if self.trainable == "lora" and self.lora_targets not in LORA_TARGETS:
            raise ValueError(f"unknown LoRA targets {self.lora_targets!r}; choose one of {sorted(LORA_TARGETS)}")
        if self.trainable == "lora" and self.lora_rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.lora_rank}")


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


def erase(pipe: VARPipeline, pairs: list[PromptPair], config: EraseConfig | None = None, *,
          preserve_prompts: list[str] | None = None, scales=None,
          callback: Callable[[TrainStep], None] | None = None) -> ErasureResult:
    """Train an erasure patch for ``pairs`` on a copy of ``pipe``'s transformer (``pipe`` is not modified)."""
    cfg = config or EraseConfig()
    cfg.validate()
    pairs = validate_pairs(list(pairs))
    preserving = cfg.method == "svare" and cfg.preservation_weight > 0
    # Only L_Pre reads the preservation prompts: without it (or with none a step) they need no targets.
    preserve_prompts = list(dict.fromkeys(preserve_prompts or [])) if preserving and cfg.preserve_per_step else []
    scales = [tuple(s) for s in (scales or pipe.default_scales("1:1", "0.06M"))]
    device = pipe.transformer.device
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # Inference-mode tensors cannot be trained (ComfyUI runs nodes under inference_mode).
    with torch.inference_mode(False), torch.enable_grad():
        frozen = pipe.transformer
        student = _student_copy(frozen, cfg)

        aux_settings = SamplerSettings(cfg=cfg.teacher_cfg, tau=cfg.teacher_tau, top_p=cfg.aux_top_p)
        seeds = [cfg.seed + i for i in range(cfg.aux_samples)]
        token_prompts = [p.safe for p in pairs] + preserve_prompts
        if cfg.method == "esd":
            token_prompts = [p.unsafe for p in pairs]
        aux = auxiliary_tokens(pipe, token_prompts, seeds=seeds, settings=aux_settings, scales=scales,
                               cache_dir=cfg.cache_dir, fingerprint=pipe.fingerprint())
        params, lora = _trainable(student, cfg)
        decay = [p for n, p in params.items() if p.dim() >= 2]
        no_decay = [p for n, p in params.items() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
        token_mask = _token_mask(scales, cfg.supervised_scales, device)
        teacher = _teacher_targets(pipe, frozen, pairs, preserve_prompts, aux, scales, cfg) \
            if preserving or cfg.method == "esd" else {}

        # Per concept, like the step budget: erasing three at once keeps each one's preservation rate.
        preserve_per_step = cfg.preserve_per_step * max(1, len({p.concept for p in pairs if p.concept}))
        history, bad = [], 0
        order = torch.randperm(len(pairs), generator=gen).tolist()
        for step in range(cfg.steps):
            batch = [pairs[order[(step * cfg.pairs_per_step + i) % len(pairs)]] for i in range(cfg.pairs_per_step)]
            rec = {"step": step + 1}
            if cfg.method == "esd":
                loss = _esd_loss(pipe, student, batch, aux, teacher, scales, cfg, gen, device)
                ok = _optimizer_step(loss, params, opt, cfg)
                rec["esd"] = loss.item()
            else:
                idx = [int(torch.randint(len(aux[p.safe]), (1,), generator=gen)) for p in batch]
                x = torch.stack([aux[p.safe].inputs[i] for p, i in zip(batch, idx)]).to(device)
                y = torch.stack([aux[p.safe].bits[i] for p, i in zip(batch, idx)]).to(device)
                logits = _student_logits(pipe, student, [p.unsafe for p in batch], x, scales, cfg, device, cfg.student_cfg)
                if cfg.method == "svare":
                    loss, kept = losses.filtered_ce(logits, y, bit_threshold=cfg.bit_threshold,
                                                    token_error_rate=cfg.token_error_rate, token_mask=token_mask)
                    rec["kept_tokens"] = kept
                else:
                    loss = losses.plain_ce(logits, y, token_mask=token_mask)
                ok = _optimizer_step(loss, params, opt, cfg)
                rec["erase"] = loss.item()
                if preserving:
                    pre = _preservation_loss(pipe, student, batch, preserve_prompts, preserve_per_step, aux, teacher,
                                             scales, cfg, gen, device)
                    ok = _optimizer_step(pre, params, opt, cfg) and ok
                    rec["preserve"] = pre.item()
            bad = 0 if ok else bad + 1
            if bad >= cfg.max_bad_steps:
                raise FloatingPointError(f"erasure diverged: {bad} steps in a row gave non-finite losses; "
                                         f"lower the learning rate (now {cfg.lr})")
            history.append(rec)
            if callback is not None:
                callback(TrainStep(step + 1, cfg.steps, {k: v for k, v in rec.items() if k != "step"}, time.time() - t0))

        patch = _make_patch(pipe, frozen, student, params, lora, pairs, preserve_prompts, cfg, scales, len(history))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return ErasureResult(patch, history, time.time() - t0, peak)


# -- pieces -------------------------------------------------------------------------------------------
def _student_copy(frozen: Infinity, cfg: EraseConfig) -> Infinity:
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
        student = Infinity(frozen.cfg)
    student.load_state_dict(state, assign=True)
    # Train mode: the model has no dropout, but Infinity.forward only checkpoints in training mode.
    return student.requires_grad_(False).train()


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


def _token_mask(scales, which: str, device) -> torch.Tensor | None:
    if which == "all":
        return None
    first = scales[0][0] * scales[0][1]
    mask = torch.zeros(sum(h * w for h, w in scales), device=device)
    mask[:first] = 1
    return mask


def _autocast(cfg: EraseConfig, device):
    enabled = cfg.precision == "bf16" and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _optimizer_step(loss: torch.Tensor, params: dict, opt, cfg: EraseConfig) -> bool:
    """One guarded step: a non-finite loss or gradient changes nothing."""
    opt.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return False
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
    if not torch.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        return False
    opt.step()
    return True


@torch.no_grad()
def _guided(pipe, model, prompts: list[str], x: torch.Tensor, scales, cfg_scale: float, tau: float) -> torch.Tensor:
    feats, mask = pipe.encode_prompts(prompts)
    cond = model(model.encode_text(feats, mask), x, scales)
    if cfg_scale == 1.0:
        return cond / tau
    uncond = model(model.encode_text(model.uncond_features(mask), mask), x, scales)
    return losses.guided_logits(cond, uncond, cfg_scale, tau)


@torch.no_grad()
def _teacher_targets(pipe, frozen, pairs, preserve_prompts, aux: dict[str, AuxTokens], scales, cfg) -> dict:
    """The frozen model's outputs the losses compare with, computed once per auxiliary sample."""
    device = frozen.device
    out = {}
    if cfg.method == "esd":
        for p in {p.unsafe for p in pairs}:
            x = aux[p].inputs.to(device)
            feats, mask = pipe.encode_prompts([p] * len(x))
            concept = frozen(frozen.encode_text(feats, mask), x, scales)
            empty = frozen(frozen.encode_text(frozen.uncond_features(mask), mask), x, scales)
            out[p] = losses.esd_target(empty, concept, cfg.esd_eta).cpu()
        return out
    guidance = cfg.teacher_cfg if cfg.preserve_cfg is None else cfg.preserve_cfg
    for p in dict.fromkeys([p.safe for p in pairs] + preserve_prompts):
        x = aux[p].inputs.to(device)
        out[p] = _guided(pipe, frozen, [p] * len(x), x, scales, guidance, cfg.teacher_tau).cpu()
    return out


def _student_on_samples(pipe, student, prompts, aux, teacher, scales, cfg, gen, device):
    """The student's logits on one random auxiliary sample per prompt, and the teacher's for it."""
    idx = [int(torch.randint(len(aux[p]), (1,), generator=gen)) for p in prompts]
    x = torch.stack([aux[p].inputs[i] for p, i in zip(prompts, idx)]).to(device)
    target = torch.stack([teacher[p][i] for p, i in zip(prompts, idx)]).to(device)
    # ESD regresses the conditional logits, as its authors do.
    guidance = 1.0 if cfg.method == "esd" else cfg.student_cfg
    return _student_logits(pipe, student, prompts, x, scales, cfg, device, guidance), target


def _student_logits(pipe, student, prompts: list[str], x: torch.Tensor, scales, cfg: EraseConfig, device,
                    guidance: float) -> torch.Tensor:
    """The student's conditional logits, or with ``guidance`` != 1 its guided ones, the distribution
    the sampler draws from (the unconditional pass is the student's own, without gradient)."""
    feats, mask = pipe.encode_prompts(prompts)
    with _autocast(cfg, device):
        cond = student(student.encode_text(feats, mask), x, scales, checkpointing=cfg.gradient_checkpointing)
        if guidance == 1.0:
            return cond
        with torch.no_grad():
            uncond = student(student.encode_text(student.uncond_features(mask), mask), x, scales)
    return losses.guided_logits(cond, uncond, guidance)


def _preservation_loss(pipe, student, batch, preserve_prompts, per_step, aux, teacher, scales, cfg, gen, device):
    prompts = [p.safe for p in batch]
    if preserve_prompts and per_step:
        chosen = torch.randperm(len(preserve_prompts), generator=gen)[:per_step].tolist()
        prompts += [preserve_prompts[i] for i in chosen]
    logits, target = _student_on_samples(pipe, student, prompts, aux, teacher, scales, cfg, gen, device)
    return cfg.preservation_weight * losses.preservation_kl(logits, target)


def _esd_loss(pipe, student, batch, aux, teacher, scales, cfg, gen, device):
    # ESD touches 1-3 random coarse scales per step (as the SACE authors' prototype does).
    n_coarse = min(len(scales), 4)
    chosen = torch.randperm(n_coarse, generator=gen)[: int(torch.randint(1, 4, (1,), generator=gen))].tolist()
    mask = torch.zeros(sum(h * w for h, w in scales), device=device)
    offsets = [0]
    for h, w in scales:
        offsets.append(offsets[-1] + h * w)
    for s in chosen:
        mask[offsets[s]:offsets[s + 1]] = 1
    logits, target = _student_on_samples(pipe, student, [p.unsafe for p in batch], aux, teacher, scales, cfg, gen, device)
    return losses.esd_loss(logits, target, mask)


def _make_patch(pipe, frozen, student, params, lora, pairs, preserve_prompts, cfg, scales, steps) -> ErasurePatch:
    if lora is not None:
        tensors = {}
        for name, delta in lora.items():
            tensors[name + ".lora_A"] = delta.A.detach().float().cpu().clone()
            tensors[name + ".lora_B"] = delta.B.detach().float().cpu().clone()
        scale = next(iter(lora.values())).scale
        remove_lora(student)
    else:
        base = dict(frozen.named_parameters())
        tensors = {n: (p.detach().float() - base[n].detach().float()).cpu() for n, p in params.items()}
        scale = 1.0
    meta = {
        "base_fingerprint": pipe.base_fingerprint, "base_model": pipe.name,
        "trained_on_patches": [p.concepts for p, _ in pipe.patches],
        "concepts": sorted({p.concept for p in pairs if p.concept}),
        "anchors": sorted({p.safe for p in pairs})[:50],
        "pairs": [[p.unsafe, p.safe] for p in pairs][:200],
        "preserve_prompts": preserve_prompts[:200],
        "method": cfg.method, "steps": steps, "lora_scale": scale,
        "scales": [list(s) for s in scales],
        "hyperparameters": {k: v for k, v in asdict(cfg).items() if k != "cache_dir"},
        "metrics": {},
    }
    return ErasurePatch(tensors, meta)
