"""What an erasure run does: the settings a user chooses, and the knobs kept for ablations.

Unset values come from the model family (``svare_core.settings.resolve_erase``); the field
defaults here are the paper's recipe for Infinity-2B.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from .trainable import DENSE_SETS, LORA_TARGETS

METHOD_NAMES = ("svare", "vare", "esd")


@dataclass
class Research:
    """Knobs for ablations and benchmarks, at the paper's values; users have no reason to change them."""
    bit_threshold: float = math.log(2)    # a bit is "wrong" when its CE is above this
    supervised_scales: str = "all"        # all | first (SACE: confine the intervention to scale 0)
    preserve_cfg: float | None = None     # CFG of L_Pre's teacher alone (None: teacher_cfg, as the paper)
    teacher_tau: float = 1.0
    aux_top_p: float = 0.97
    esd_eta: float = 1.0
    grad_clip: float = 5.0
    weight_decay: float = 0.005
    betas: tuple[float, float] = (0.9, 0.97)
    max_bad_steps: int = 10               # consecutive non-finite losses before giving up
    aux_seeds: str = "per_prompt"         # per_prompt (each safe prompt its own seeds) | shared (seed, seed+1, ... for all)
    adversarial_every: int = 25           # robust: steps between soft-prompt attacks on the model being trained
    adversarial_steps: int = 20           # robust: Adam steps of each attack (from the concept's embedding)
    adversarial_tokens: int = 2           # robust: soft tokens in place of the concept's
    adversarial_lr: float = 0.05          # robust: attack step, in units of the embeddings' spread
    adversarial_keep: int = 0             # robust: attacks whose finds stay in training (0: all of them)
    adversarial_words: int = 48           # robust: nearest vocabulary words screened as stand-ins (0: none)
    adversarial_direction: bool = True    # robust: train on the concept direction added to neutral prompts too
    adversarial_screen: bool = True       # robust: train an attack's finds only where the frozen model reads the concept


@dataclass
class EraseConfig:
    method: str = "svare"                 # svare | vare (naive: plain CE, no preservation) | esd
    steps: int = 500                      # iterations in all
    lr: float = 2.3e-5
    trainable: str = "xattn_ffn"          # xattn_ffn | xattn | xattn_kv | ffn | all_blocks | lora
    lora_rank: int = 4
    lora_targets: str = "attn"            # attn | xattn | xattn_out | attn_ffn
    preservation_weight: float = 0.5      # lambda of L_Pre
    preserve_per_step: int = 1            # preservation prompts in each L_Pre step (besides the safe ones)
    pairs_per_step: int = 2
    teacher_cfg: float = 4.0              # CFG of the frozen teacher (auxiliary tokens and L_Pre)
    student_cfg: float = 1.0              # CFG on the student's logits in the losses (1: plain conditional, as the paper)
    token_error_rate: float = 0.25        # S-VARE's filter: tokens with fewer wrong bits do not learn
    aux_samples: int = 1                  # auxiliary images per safe prompt
    seed: int = 0
    precision: str = "fp32"               # fp32 | bf16 (autocast on CUDA and on CPUs with bf16 instructions)
    gradient_checkpointing: bool = False
    cache_dir: str | None = None          # auxiliary-token cache
    robust: bool = False                  # train against soft-prompt attacks too (erasure/robust.py)
    research: Research = field(default_factory=Research)

    def validate(self) -> None:
        """Refuse settings that cannot train (one line naming the setting), before any slow work."""
        r = self.research
        for name, value in self.options().items():
            for v in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(v, float) and not math.isfinite(v):
                    raise ValueError(f"{name} must be a finite number, got {value}")
        for name in _REAL:
            value = getattr(r if name in RESEARCH_OPTIONS else self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"{name} must be a number, got {value!r}")
        for name in ("method", "trainable", "lora_targets", "precision"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be text, got {getattr(self, name)!r}")
        if not isinstance(self.robust, bool):
            raise ValueError(f"robust is true or false, got {self.robust!r}")
        if self.robust and self.method != "svare":
            raise ValueError(f"robust erasure is an S-VARE option; method {self.method!r} has none")
        if min(r.adversarial_every, r.adversarial_steps, r.adversarial_tokens) < 1 or r.adversarial_lr <= 0:
            raise ValueError("adversarial_every, adversarial_steps, adversarial_tokens and adversarial_lr must be positive")
        if min(r.adversarial_keep, r.adversarial_words) < 0:
            raise ValueError("adversarial_keep and adversarial_words must not be negative")
        for name in ("adversarial_direction", "adversarial_screen"):
            if not isinstance(getattr(r, name), bool):
                raise ValueError(f"{name} is true or false, got {getattr(r, name)!r}")
        if not isinstance(r.aux_seeds, str):
            raise ValueError(f"aux_seeds is text, got {r.aux_seeds!r}")
        if not isinstance(r.supervised_scales, str) or (r.preserve_cfg is not None and not isinstance(
                r.preserve_cfg, (int, float))) or not (isinstance(r.betas, (tuple, list)) and len(r.betas) == 2
                                                       and all(isinstance(b, (int, float)) for b in r.betas)):
            raise ValueError("supervised_scales is text, preserve_cfg a number or None, betas two numbers")
        for name in _WHOLE:
            value = getattr(r if name in RESEARCH_OPTIONS else self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.aux_samples < 1 or r.max_bad_steps < 1:
            raise ValueError("aux_samples and max_bad_steps must be at least 1")
        if self.teacher_cfg <= 0 or r.teacher_tau <= 0 or r.grad_clip <= 0:
            raise ValueError("teacher_cfg, teacher_tau and grad_clip must be positive")
        if self.preservation_weight < 0 or not 0 <= self.token_error_rate <= 1 or not 0 <= r.aux_top_p <= 1:
            raise ValueError("preservation_weight must not be negative; token_error_rate and aux_top_p lie in [0, 1]")
        if self.method not in METHOD_NAMES:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHOD_NAMES}")
        if self.steps < 1 or self.lr <= 0 or self.pairs_per_step < 1 or self.preserve_per_step < 0:
            raise ValueError("steps, lr and pairs_per_step must be positive, preserve_per_step not negative")
        if r.preserve_cfg is not None and r.preserve_cfg <= 0:
            raise ValueError(f"preserve_cfg must be positive (1 = no guidance) or None, got {r.preserve_cfg}")
        if self.student_cfg <= 0:
            raise ValueError(f"student_cfg must be positive (1 = the plain conditional pass), got {self.student_cfg}")
        if r.aux_seeds not in ("per_prompt", "shared"):
            raise ValueError(f"aux_seeds must be 'per_prompt' or 'shared', got {r.aux_seeds!r}")
        if r.supervised_scales not in ("all", "first"):
            raise ValueError(f"supervised_scales must be 'all' or 'first', got {r.supervised_scales!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        # Checked here too, so a typo fails before the (slow) auxiliary-token generation.
        if self.trainable != "lora" and self.trainable not in DENSE_SETS:
            raise ValueError(f"unknown trainable set {self.trainable!r}; choose one of {sorted(DENSE_SETS)} or 'lora'")
        if self.trainable == "lora" and self.lora_targets not in LORA_TARGETS:
            raise ValueError(f"unknown LoRA targets {self.lora_targets!r}; choose one of {sorted(LORA_TARGETS)}")
        if self.trainable == "lora" and self.lora_rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.lora_rank}")

    def options(self) -> dict:
        """Every setting by name, the research knobs included (what a patch records)."""
        flat = {k: v for k, v in asdict(self).items() if k not in ("research", "cache_dir")}
        return {**flat, **asdict(self.research)}

    def used_options(self) -> dict:
        """The settings that can change this run's result: ``options()`` less the robust attack's knobs
        when ``robust`` is off. A patch records these, and cached targets are keyed by them, so tuning the
        robust recipe leaves default patches and their caches valid."""
        options = self.options()
        if self.robust:
            return options
        return {k: v for k, v in options.items() if not k.startswith("adversarial_")}


_REAL = ("lr", "preservation_weight", "teacher_cfg", "student_cfg", "token_error_rate", "bit_threshold", "teacher_tau",
         "aux_top_p", "esd_eta", "grad_clip", "weight_decay", "adversarial_lr")
_WHOLE = ("steps", "lora_rank", "pairs_per_step", "preserve_per_step", "aux_samples", "seed", "max_bad_steps",
          "adversarial_every", "adversarial_steps", "adversarial_tokens", "adversarial_keep", "adversarial_words")
USER_OPTIONS = tuple(f.name for f in fields(EraseConfig) if f.name != "research")
RESEARCH_OPTIONS = tuple(f.name for f in fields(Research))


def with_options(config: EraseConfig, **options) -> EraseConfig:
    """``config`` with settings changed by name; research knobs may be named too (``supervised_scales=...``)."""
    unknown = sorted(set(options) - set(USER_OPTIONS) - set(RESEARCH_OPTIONS))
    if unknown:
        raise ValueError(f"unknown erasure setting(s) {unknown}; known: {sorted(USER_OPTIONS + RESEARCH_OPTIONS)}")
    research = {k: v for k, v in options.items() if k in RESEARCH_OPTIONS}
    user = {k: v for k, v in options.items() if k in USER_OPTIONS}
    return replace(config, **user, research=replace(config.research, **research))
