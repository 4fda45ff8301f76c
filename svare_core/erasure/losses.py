"""The erasure objectives, on bitwise logits (B, L, d, 2) and bit labels (B, L, d).

S-VARE (arXiv 2509.22400):
  l_tb   = -log p(y_tb | c_u, x)                      per token t, bit b
  e_t    = share of bits of token t with l_tb > ln 2   (bits the model gets wrong)
  m_t    = 1[e_t >= 0.25]                             (only still-"unsafe" tokens learn)
  L_FCE  = mean_batch 1/L sum_t m_t 1/d sum_b l_tb     (normalised by ALL L tokens)
  L_Pre  = lambda mean_batch 1/L sum_t 1/d sum_b KL(p0_cfg(.|c_s, x) || p(.|c_s, x))
Baselines: naive VARE (plain CE on all tokens) and ESD on logits.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..models.bitwise import bit_losses


def keep_mask(losses: torch.Tensor, bit_threshold: float = math.log(2), token_error_rate: float = 0.25) -> torch.Tensor:
    """m_t: tokens with at least ``token_error_rate`` of their bits wrong (loss above ln 2)."""
    return ((losses > bit_threshold).float().mean(-1) >= token_error_rate).float()


def _token_mean(per_token: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    # 1/L sum_t over ALL tokens of the sequence (or of the supervised scales), then mean over the batch.
    if token_mask is not None:
        return (per_token * token_mask).sum(-1).div(token_mask.sum()).mean()
    return per_token.mean()


def filtered_ce(logits: torch.Tensor, labels: torch.Tensor, *, bit_threshold: float = math.log(2),
                token_error_rate: float = 0.25, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """L_FCE and the share of tokens kept by the filter."""
    losses = bit_losses(logits, labels)
    m = keep_mask(losses.detach(), bit_threshold, token_error_rate)
    if token_mask is not None:
        m = m * token_mask
    kept = (m.sum() / (token_mask.sum() * m.shape[0] if token_mask is not None else m.numel())).item()
    return _token_mean(m * losses.mean(-1), token_mask), kept


def plain_ce(logits: torch.Tensor, labels: torch.Tensor, *, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Naive VARE: bitwise CE on every token."""
    return _token_mean(bit_losses(logits, labels).mean(-1), token_mask)


def scale_mask(scales, chosen, device=None) -> torch.Tensor:
    """(L,) mask over a sequence of scales: 1 on the tokens of the ``chosen`` scale indices."""
    offsets = [0]
    for h, w in scales:
        offsets.append(offsets[-1] + h * w)
    mask = torch.zeros(offsets[-1], device=device)
    for s in chosen:
        mask[offsets[s]:offsets[s + 1]] = 1
    return mask


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, cfg: float, tau: float = 1.0) -> torch.Tensor:
    """Classifier-free guidance on logits, as the sampler applies it."""
    return (cfg * cond.float() + (1 - cfg) * uncond.float()) / tau


def preservation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """mean_batch 1/L sum_t 1/d sum_b KL(teacher || student), per-bit two-class distributions."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)          # (B, L, d)
    return kl.mean()


def esd_target(empty: torch.Tensor, concept: torch.Tensor, eta: float = 1.0) -> torch.Tensor:
    """ESD's negative guidance: logits0(empty) - eta * (logits0(c) - logits0(empty))."""
    return empty.float() - eta * (concept.float() - empty.float())


def esd_loss(student: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    per_token = ((student.float() - target) ** 2).mean(dim=(-1, -2))
    return _token_mean(per_token, token_mask)
