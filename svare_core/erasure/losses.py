"""The erasure objectives, on bitwise logits (B, L, d, 2) with bit labels (B, L, d) (Infinity), or
on VQ logits (B, L, V) with code labels (B, L) (Switti: V = 4096). A token is d binary symbols or
one V-way symbol; every objective is written per symbol and told the kind by the shapes.

S-VARE (arXiv 2509.22400):
  l_tb   = -log p(y_tb | c_u, x)                      per token t, symbol b (bit; or the token's code)
  e_t    = share of the symbols of token t the model gets wrong:
             a bit is wrong when l_tb > ln 2 (the paper's rule: p(label) < 1/2, so not the argmax);
             a code is wrong when it is not the model's most likely code (the same rule for a V-way
             symbol; code_keep_mask also takes a top-k for experiments, S-VARE uses k = 1)
  m_t    = 1[e_t >= 0.25]                             (only still-"unsafe" tokens learn; one
                                                       V-way symbol: m_t = 1 iff its code is wrong)
  L_FCE  = mean_batch 1/L sum_t m_t 1/n_t sum_b l_tb  (normalised by ALL L tokens)
  L_Pre  = lambda mean_batch 1/L sum_t 1/n_t sum_b KL(p0_cfg(.|c_s, x) || p(.|c_s, x))
Baselines: naive VARE (plain CE on all tokens) and ESD on logits.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..models.bitwise import bit_losses


def is_bitwise(logits: torch.Tensor, labels: torch.Tensor) -> bool:
    """Bitwise (B, L, d, 2) logits with (B, L, d) labels, else VQ (B, L, V) logits with (B, L) labels."""
    if logits.dim() == 4 and labels.dim() == 3:
        return True
    if logits.dim() == 3 and labels.dim() == 2:
        return False
    raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} are neither bitwise "
                     "(B, L, d, 2) / (B, L, d) nor VQ (B, L, V) / (B, L)")


def symbol_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """l_tb: per-bit CE (B, L, d) of bitwise logits, or the per-token CE (B, L, 1) of VQ logits."""
    if is_bitwise(logits, labels):
        return bit_losses(logits, labels)
    logp = F.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, labels.long().unsqueeze(-1))


def keep_mask(losses: torch.Tensor, bit_threshold: float = math.log(2), token_error_rate: float = 0.25) -> torch.Tensor:
    """m_t: tokens with at least ``token_error_rate`` of their bits wrong (loss above ln 2)."""
    return ((losses > bit_threshold).float().mean(-1) >= token_error_rate).float()


def code_keep_mask(logits: torch.Tensor, labels: torch.Tensor, code_top_k: int = 1,
                   token_error_rate: float = 0.25) -> torch.Tensor:
    """m_t of VQ tokens: 1 where the label is not among the ``code_top_k`` most likely codes (more than
    ``code_top_k - 1`` codes have a strictly higher logit: a code tied with the k-th counts as in), else 0.
    A token is one symbol, so its error share is 0 or 1; ``token_error_rate`` 0 keeps every token."""
    target = logits.float().gather(-1, labels.long().unsqueeze(-1))
    wrong = (logits.float() > target).sum(-1) >= code_top_k
    return (wrong.float() >= token_error_rate).float()


def _token_mean(per_token: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    # 1/L sum_t over ALL tokens of the sequence (or of the supervised scales), then mean over the batch.
    if token_mask is not None:
        return (per_token * token_mask).sum(-1).div(token_mask.sum()).mean()
    return per_token.mean()


def filtered_ce(logits: torch.Tensor, labels: torch.Tensor, *, bit_threshold: float = math.log(2),
                token_error_rate: float = 0.25, token_mask: torch.Tensor | None = None,
                code_top_k: int = 1) -> tuple[torch.Tensor, float]:
    """L_FCE and the share of tokens kept by the filter."""
    losses = symbol_losses(logits, labels)
    if is_bitwise(logits, labels):
        m = keep_mask(losses.detach(), bit_threshold, token_error_rate)
    else:
        m = code_keep_mask(logits.detach(), labels, code_top_k, token_error_rate)
    if token_mask is not None:
        m = m * token_mask
    kept = (m.sum() / (token_mask.sum() * m.shape[0] if token_mask is not None else m.numel())).item()
    return _token_mean(m * losses.mean(-1), token_mask), kept


def plain_ce(logits: torch.Tensor, labels: torch.Tensor, *, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Naive VARE: CE on every token."""
    return _token_mean(symbol_losses(logits, labels).mean(-1), token_mask)


def scale_mask(scales, chosen, device=None) -> torch.Tensor:
    """(L,) mask over a sequence of scales: 1 on the tokens of the ``chosen`` scale indices."""
    offsets = [0]
    for h, w in scales:
        offsets.append(offsets[-1] + h * w)
    mask = torch.zeros(offsets[-1], device=device)
    for s in chosen:
        mask[offsets[s]:offsets[s + 1]] = 1
    return mask


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, cfg: float | torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Classifier-free guidance on logits, as the sampler applies it: cfg * cond + (1 - cfg) * uncond.
    ``cfg``: one weight, or one per token (L,) (Switti's ramp over the scales)."""
    if isinstance(cfg, torch.Tensor):
        cfg = cfg.to(cond.device, torch.float32).view(-1, *([1] * (cond.dim() - 2)))
    return (cfg * cond.float() + (1 - cfg) * uncond.float()) / tau


def preservation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """mean_batch 1/L sum_t 1/n_t sum_b KL(teacher || student): per bit over its two values, or per
    VQ token over its V codes (the last dimension is the distribution either way)."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)          # (B, L, d) or (B, L)
    return kl.mean()


def esd_target(empty: torch.Tensor, concept: torch.Tensor, eta: float = 1.0) -> torch.Tensor:
    """ESD's negative guidance: logits0(empty) - eta * (logits0(c) - logits0(empty))."""
    return empty.float() - eta * (concept.float() - empty.float())


def esd_loss(student: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    # per token: the mean over its logits ((d, 2) bitwise, (V,) VQ)
    per_token = ((student.float() - target) ** 2).flatten(2).mean(-1)
    return _token_mean(per_token, token_mask)
