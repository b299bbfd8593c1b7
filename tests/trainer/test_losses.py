"""Loss functions: star_loss against a hand-computed case and a per-row reference; clip_loss targets.

.venv/bin/pytest tests/trainer/test_losses.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.losses import clip_loss, star_loss


def _unit(*rows: tuple[float, ...]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def reference_star(x, s, xt, st, labels, scale, mask_same=True) -> torch.Tensor:
    """Straightforward per-row computation of (1/N) sum_i KL(q~_i || q_i) over columns j with c(j) != c(i)."""
    n = x.shape[0]
    total = x.new_zeros(())
    for i in range(n):
        cols = [j for j in range(n) if not (mask_same and labels[j] == labels[i])]
        if not cols:
            continue
        zq = torch.stack([scale * x[i] @ s[j] for j in cols])
        zp = torch.stack([scale * xt[i] @ st[j] for j in cols])
        log_q, log_p = torch.log_softmax(zq, 0), torch.log_softmax(zp, 0)
        total = total + (log_p.exp() * (log_p - log_q)).sum()
    return total / n


class TestStarLossByHand:
    def test_three_samples(self):
        """Labels [0, 0, 1]: rows 0 and 1 keep one column each (KL 0); row 2 keeps columns 0 and 1."""
        x = _unit((1, 0), (1, 0), (1, 0))  # student images
        s = _unit((1, 0), (0, 1), (1, 1))  # student spurious captions
        xt = _unit((0, 1), (0, 1), (0, 1))  # teacher images
        st = s.clone()
        labels = torch.tensor([0, 0, 1])
        # row 2: student logits [1, 0] -> q = [e, 1]/(e+1); teacher logits [0, 1] -> p = [1, e]/(e+1)
        # KL(p||q) = (1/(1+e)) * log(1/e) + (e/(1+e)) * log(e) = (e - 1)/(e + 1); mean over N = 3
        e = math.e
        expected = (e - 1) / (e + 1) / 3
        got = star_loss(x, s, xt, st, labels, logit_scale=1.0)
        assert got.item() == pytest.approx(expected, abs=1e-6)

    def test_scale_sharpens(self):
        """The same case at logit scale 2: logits double."""
        x, s, xt = _unit((1, 0), (1, 0), (1, 0)), _unit((1, 0), (0, 1), (1, 1)), _unit((0, 1), (0, 1), (0, 1))
        labels = torch.tensor([0, 0, 1])
        q = torch.softmax(torch.tensor([2.0, 0.0]), 0)
        p = torch.softmax(torch.tensor([0.0, 2.0]), 0)
        expected = (p * (p.log() - q.log())).sum().item() / 3
        assert star_loss(x, s, xt, s, labels, 2.0).item() == pytest.approx(expected, abs=1e-6)

    def test_fully_masked_rows_are_zero_not_nan(self):
        """Every sample has the same label: every row is masked out; loss 0, gradient 0, no NaN."""
        g = torch.Generator().manual_seed(0)
        x = F.normalize(torch.randn(4, 8, generator=g), dim=1).requires_grad_()
        s = F.normalize(torch.randn(4, 8, generator=g), dim=1).requires_grad_()
        xt, st = (
            F.normalize(torch.randn(4, 8, generator=g), dim=1),
            F.normalize(torch.randn(4, 8, generator=g), dim=1),
        )
        loss = star_loss(x, s, xt, st, torch.zeros(4, dtype=torch.long), 100.0)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.isfinite(x.grad).all() and torch.isfinite(s.grad).all()
        assert x.grad.abs().max() == 0 and s.grad.abs().max() == 0

    def test_single_sample(self):
        x = _unit((1, 0))
        assert star_loss(x, x, x, x, torch.tensor([3]), 100.0).item() == 0.0


class TestStarLossProperties:
    def test_zero_when_student_is_teacher(self):
        g = torch.Generator().manual_seed(1)
        x = F.normalize(torch.randn(6, 16, generator=g), dim=1)
        s = F.normalize(torch.randn(6, 16, generator=g), dim=1)
        labels = torch.tensor([0, 1, 1, 2, 0, 3])
        assert star_loss(x, s, x.clone(), s.clone(), labels, 100.0).abs().item() < 1e-6

    def test_no_gradient_reaches_the_teacher(self):
        g = torch.Generator().manual_seed(2)
        x, s, xt, st = (F.normalize(torch.randn(5, 8, generator=g), dim=1).requires_grad_() for _ in range(4))
        star_loss(x, s, xt, st, torch.tensor([0, 1, 2, 1, 0]), 50.0).backward()
        assert xt.grad is None and st.grad is None
        assert x.grad is not None and x.grad.abs().sum() > 0

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half_precision_inputs(self, dtype):
        """-inf masking in float32 inside: large scales and half inputs stay finite and match float32."""
        g = torch.Generator().manual_seed(3)
        x, s, xt, st = (F.normalize(torch.randn(8, 16, generator=g), dim=1) for _ in range(4))
        labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        ref = star_loss(x, s, xt, st, labels, 100.0)
        half = star_loss(*(t.to(dtype) for t in (x, s, xt, st)), labels, torch.tensor(100.0, dtype=dtype))
        assert torch.isfinite(half)
        assert half.item() == pytest.approx(ref.item(), rel=0.1, abs=0.05)

    @pytest.mark.parametrize("n", [2, 5, 8, 16])
    @pytest.mark.parametrize("pattern", ["distinct", "pairs", "few", "one_big_class"])
    def test_matches_reference(self, n, pattern):
        g = torch.Generator().manual_seed(n * 7 + len(pattern))
        labels = {
            "distinct": torch.arange(n),
            "pairs": torch.arange(n) // 2,
            "few": torch.randint(0, 3, (n,), generator=g),
            "one_big_class": torch.tensor([0] * (n - 1) + [1]),
        }[pattern]
        d = 12
        x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).float().requires_grad_()
        s = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).float().requires_grad_()
        xt = F.normalize(torch.randn(n, d, generator=g), dim=1)
        st = F.normalize(torch.randn(n, d, generator=g), dim=1)
        scale = float(torch.empty(()).uniform_(1, 100, generator=g))
        for mask in (True, False):
            got = star_loss(x, s, xt, st, labels, scale, mask_same_label=mask)
            ref = reference_star(x, s, xt, st, labels, scale, mask_same=mask)
            assert got.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)
            gx, gs = torch.autograd.grad(got, (x, s))
            if not ref.requires_grad:  # every row masked out: the reference is a constant 0
                assert ref.item() == 0 and gx.abs().max() == 0 and gs.abs().max() == 0
                continue
            rx, rs = torch.autograd.grad(ref, (x, s))
            assert torch.allclose(gx, rx, atol=1e-5) and torch.allclose(gs, rs, atol=1e-5)


class TestClipLoss:
    def test_index_targets_match_formula(self):
        g = torch.Generator().manual_seed(4)
        img, txt = (F.normalize(torch.randn(6, 8, generator=g), dim=1) for _ in range(2))
        logits = 10.0 * img @ txt.T
        ref = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
        assert clip_loss(img, txt, torch.tensor(10.0)).item() == pytest.approx(ref.item(), abs=1e-6)

    def test_label_targets_equal_index_when_labels_distinct(self):
        g = torch.Generator().manual_seed(5)
        img, txt = (F.normalize(torch.randn(6, 8, generator=g), dim=1) for _ in range(2))
        a = clip_loss(img, txt, torch.tensor(20.0))
        b = clip_loss(img, txt, torch.tensor(20.0), labels=torch.tensor([5, 3, 1, 0, 2, 4]))
        assert a.item() == pytest.approx(b.item(), abs=1e-6)

    def test_identical_captions_make_label_targets_a_no_op(self):
        """With one caption per class (identical rows/columns), arange and same-label targets give the
        same loss: equal logits make -log p_i equal the mean over the class's columns, both directions."""
        img = _unit((1, 0), (1, 0.05), (0, 1))
        txt = _unit((1, 0), (1, 0), (0, 1))  # captions of samples 0 and 1 are identical
        labels = torch.tensor([0, 0, 1])
        soft = clip_loss(img, txt, torch.tensor(50.0), labels)
        hard = clip_loss(img, txt, torch.tensor(50.0))
        assert soft.item() == pytest.approx(hard.item(), abs=1e-5)

    def test_label_targets_with_distinct_captions_of_a_class(self):
        """Different captions of one class (e.g. several templates) are positives for each other."""
        img = _unit((1, 0), (1, 0.3), (0, 1))
        txt = _unit((1, 0.1), (0.9, 0.5), (0, 1))
        labels = torch.tensor([0, 0, 1])
        soft = clip_loss(img, txt, torch.tensor(50.0), labels)
        hard = clip_loss(img, txt, torch.tensor(50.0))
        assert soft.item() != pytest.approx(hard.item(), abs=1e-3)
        logits = 50.0 * img @ txt.T
        t = torch.tensor([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1.0]])
        ref = (-(t * logits.log_softmax(1)).sum(1).mean() - (t * logits.T.log_softmax(1)).sum(1).mean()) / 2
        assert soft.item() == pytest.approx(ref.item(), abs=1e-5)
