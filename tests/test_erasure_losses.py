"""The erasure objectives on hand-computed examples (bitwise logits (B, L, d, 2), labels (B, L, d))."""
from __future__ import annotations

import math

import pytest
import torch

from svare_core.erasure import losses
from svare_core.erasure.methods import supervised_tokens as _token_mask

from conftest import TINY_SCALES

LN2 = math.log(2)


def logits_with_wrong_bits(wrong: list[int], d: int = 32, margin: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One token, labels all 1; the bits listed in ``wrong`` favour 0 (p(label) < 0.5), the others favour 1."""
    logits = torch.zeros(1, 1, d, 2)
    logits[..., 1] = margin
    logits[0, 0, wrong, 1] = -margin
    return logits, torch.ones(1, 1, d)


def test_bit_losses_is_minus_log_softmax_of_the_label():
    logits = torch.tensor([[[[0.0, 1.0], [2.0, 0.0], [0.5, 0.5]]]])   # (1, 1, 3, 2)
    labels = torch.tensor([[[1, 1, 0]]])
    got = losses.bit_losses(logits, labels)
    expected = torch.tensor([[[math.log(1 + math.exp(-1)),          # -log(e^1 / (e^0 + e^1))
                               math.log(1 + math.exp(2)),            # -log(e^0 / (e^2 + e^0))
                               LN2]]])
    assert got.shape == (1, 1, 3)
    torch.testing.assert_close(got, expected)
    # float labels (as stored in the auxiliary tokens) and bf16 logits work the same
    torch.testing.assert_close(losses.bit_losses(logits.bfloat16(), labels.float()), expected, atol=1e-2, rtol=0)


def test_keep_mask_threshold_is_a_quarter_of_the_bits():
    eight, _ = logits_with_wrong_bits(list(range(8)))
    seven, labels = logits_with_wrong_bits(list(range(7)))
    l8, l7 = losses.bit_losses(eight, labels), losses.bit_losses(seven, labels)
    assert (l8 > LN2).sum() == 8 and (l7 > LN2).sum() == 7
    assert losses.keep_mask(l8).item() == 1.0, "8 of 32 wrong bits: e_t = 0.25 >= 0.25 -> kept"
    assert losses.keep_mask(l7).item() == 0.0, "7 of 32 wrong bits: e_t < 0.25 -> not kept"
    # the knobs
    assert losses.keep_mask(l7, token_error_rate=7 / 32).item() == 1.0
    assert losses.keep_mask(l8, bit_threshold=10.0).item() == 0.0


def test_a_bit_at_exactly_one_half_is_not_wrong():
    logits = torch.zeros(1, 1, 32, 2)                   # p(label) = 0.5 for every bit
    labels = torch.ones(1, 1, 32)
    per_bit = losses.bit_losses(logits, labels)
    torch.testing.assert_close(per_bit, torch.full_like(per_bit, LN2))
    assert not (per_bit > LN2).any(), "the test is strict (>): a 50/50 bit is not wrong"
    assert losses.keep_mask(per_bit).item() == 0.0
    # ... and 8 wrong bits among 24 undecided ones still keep the token
    logits[0, 0, :8, 1] = -1.0
    assert losses.keep_mask(losses.bit_losses(logits, labels)).item() == 1.0


def four_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """B=1, L=4, d=4; token 0 has every bit wrong, tokens 1..3 every bit (confidently) right."""
    logits = torch.zeros(1, 4, 4, 2)
    logits[0, 0, :, 0] = torch.tensor([1.0, 2.0, 0.5, 3.0])   # label 1, so these favour the wrong value
    logits[0, 1:, :, 1] = 4.0
    return logits, torch.ones(1, 4, 4)


def test_filtered_ce_normalises_by_all_tokens():
    logits, labels = four_tokens()
    token0 = torch.tensor([math.log(1 + math.exp(v)) for v in (1.0, 2.0, 0.5, 3.0)]).mean()
    value, kept = losses.filtered_ce(logits, labels)
    assert kept == pytest.approx(0.25)
    torch.testing.assert_close(value, token0 / 4)     # not token0 / 1 (the number of kept tokens)
    assert not torch.isclose(value, token0)
    # the batch mean of per-sequence values: a second sequence with nothing kept halves it
    both = torch.cat([logits, torch.zeros(1, 4, 4, 2).index_fill_(-1, torch.tensor([1]), 5.0)])
    value2, kept2 = losses.filtered_ce(both, torch.ones(2, 4, 4))
    torch.testing.assert_close(value2, token0 / 8)
    assert kept2 == pytest.approx(0.125)


def test_filtered_ce_gives_no_gradient_to_tokens_already_right():
    logits, labels = four_tokens()
    logits.requires_grad_(True)
    value, _ = losses.filtered_ce(logits, labels)
    value.backward()
    assert logits.grad[0, 1:].abs().max() == 0, "tokens the model already predicts safely must not learn"
    assert (logits.grad[0, 0].abs().sum(-1) > 0).all()
    # plain CE trains every token
    logits.grad = None
    losses.plain_ce(logits, labels).backward()
    assert (logits.grad.abs().sum(dim=(-1, -2)) > 0).all()


def test_plain_ce_is_the_mean_over_all_tokens_and_bits():
    logits, labels = four_tokens()
    assert torch.isclose(losses.plain_ce(logits, labels), losses.bit_losses(logits, labels).mean())
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(3, 5, 6, 2, generator=g), torch.randint(0, 2, (3, 5, 6), generator=g)
    manual = -torch.log_softmax(logits, -1).gather(-1, labels[..., None]).mean()
    torch.testing.assert_close(losses.plain_ce(logits, labels), manual)


def test_token_mask_restricts_to_the_first_scale():
    mask = _token_mask(TINY_SCALES, "first", torch.device("cpu"))
    assert mask.shape == (sum(h * w for h, w in TINY_SCALES),) and mask.tolist() == [1.0] + [0.0] * (len(mask) - 1)
    assert _token_mask([(2, 2), (4, 4)], "first", torch.device("cpu")).tolist() == [1.0] * 4 + [0.0] * 16
    assert _token_mask(TINY_SCALES, "all", torch.device("cpu")) is None

    g = torch.Generator().manual_seed(1)
    L = len(mask)
    logits, labels = torch.randn(2, L, 8, 2, generator=g), torch.randint(0, 2, (2, L, 8), generator=g)
    per_token0 = losses.bit_losses(logits, labels)[:, 0].mean(-1)
    torch.testing.assert_close(losses.plain_ce(logits, labels, token_mask=mask), per_token0.mean())
    changed = logits.clone()
    changed[:, 1:] = torch.randn(2, L - 1, 8, 2, generator=g) * 5
    assert losses.plain_ce(changed, labels, token_mask=mask) == losses.plain_ce(logits, labels, token_mask=mask)
    f_all, _ = losses.filtered_ce(changed, labels)
    f_first, kept = losses.filtered_ce(changed, labels, token_mask=mask)
    m0 = losses.keep_mask(losses.bit_losses(changed, labels))[:, 0]
    torch.testing.assert_close(f_first, (m0 * per_token0).mean())
    assert kept == pytest.approx(m0.mean().item())
    assert not torch.isclose(f_first, f_all)


def test_preservation_kl_matches_the_formula():
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(2, 3, 4, 2, generator=g), torch.randn(2, 3, 4, 2, generator=g) * 2
    pt, ps = torch.softmax(teacher, -1), torch.softmax(student, -1)
    manual = (pt * (pt.log() - ps.log())).sum(-1).mean()        # mean over batch, tokens and bits
    torch.testing.assert_close(losses.preservation_kl(student, teacher), manual)
    reverse = (ps * (ps.log() - pt.log())).sum(-1).mean()
    assert not torch.isclose(manual, reverse), "KL(teacher || student), not the reverse"
    assert losses.preservation_kl(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    # shifting both logits of a bit by a constant changes nothing (two-class distributions)
    assert losses.preservation_kl(student + 3.0, student).item() == pytest.approx(0.0, abs=1e-6)
    # one hand-computed bit: p_t = (0.5, 0.5), p_s = sigmoid(+-1)
    one = losses.preservation_kl(torch.tensor([[[[0.0, 1.0]]]]), torch.zeros(1, 1, 1, 2))
    p1 = 1 / (1 + math.exp(-1))
    assert one.item() == pytest.approx(0.5 * math.log(0.5 / p1) + 0.5 * math.log(0.5 / (1 - p1)), rel=1e-5)


def test_guided_logits_formula():
    c, u = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 3.0])
    torch.testing.assert_close(losses.guided_logits(c, u, 4.0, 0.5), torch.tensor([(8 - 3) / 0.5, (-4 - 9) / 0.5]))
    torch.testing.assert_close(losses.guided_logits(c, u, 1.0), c)
    torch.testing.assert_close(losses.guided_logits(c, u, 0.0), u)
    assert losses.guided_logits(c.bfloat16(), u.bfloat16(), 3.0).dtype == torch.float32


def test_esd_target_and_loss():
    empty, concept = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    torch.testing.assert_close(losses.esd_target(empty, concept), torch.tensor([-1.0, 3.0]))   # 2*empty - concept
    torch.testing.assert_close(losses.esd_target(empty, concept, eta=0.5), torch.tensor([0.0, 2.5]))
    torch.testing.assert_close(losses.esd_target(empty, concept, eta=0.0), empty)
    student, target = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)
    target[0, 1] = 3.0
    assert losses.esd_loss(student, target, torch.tensor([1.0, 0.0])).item() == pytest.approx(1.0)
    assert losses.esd_loss(student, target, torch.tensor([0.0, 1.0])).item() == pytest.approx(9.0)
    assert losses.esd_loss(student, target, torch.tensor([1.0, 1.0])).item() == pytest.approx(5.0)
