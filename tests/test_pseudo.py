"""Pin the formulas of the paper (Eq. 1-4) and the baselines to hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from napari_apl.core import pseudo


def px(*vals: float) -> torch.Tensor:
    """One pixel's probability vector as a (1, C, 1, 1) tensor."""
    return torch.tensor(vals, dtype=torch.float64).reshape(1, -1, 1, 1)


# The paper's examples: A/B consistent but not confident, C/D confident but inconsistent.
A, B = px(0.34, 0.33, 0.33), px(0.35, 0.32, 0.33)
C, D = px(0.80, 0.15, 0.05), px(0.70, 0.15, 0.15)


def test_merge_and_pseudo_label_examples():
    assert torch.allclose(
        pseudo.merge(A, B).flatten(), torch.tensor([0.345, 0.325, 0.33], dtype=torch.float64)
    )
    assert int(pseudo.pseudo_label(A, B)) == 0
    assert int(pseudo.pseudo_label(C, D)) == 0
    # a case where the heads' argmax differ and the sum decides
    assert int(pseudo.pseudo_label(px(0.5, 0.4, 0.1), px(0.1, 0.6, 0.3))) == 1


def test_confidence_examples():
    # ω = top-1 − top-2 of the merged prediction
    assert float(pseudo.confidence(pseudo.merge(A, B))) == pytest.approx(0.345 - 0.33)
    assert float(pseudo.confidence(pseudo.merge(C, D))) == pytest.approx(0.75 - 0.15)
    assert float(pseudo.confidence(px(1.0, 0.0, 0.0))) == pytest.approx(1.0)
    assert float(pseudo.confidence(px(0.5, 0.5, 0.0))) == pytest.approx(0.0)


def test_consistency_and_uniform_relevance_equal_bcdm():
    # 1 − <p_m, p_a>: A/B 1 − (0.119 + 0.1056 + 0.1089) = 0.6665; C/D 1 − 0.59 = 0.41
    assert float(pseudo.consistency_map(A, B)) == pytest.approx(0.6665)
    assert float(pseudo.consistency_map(C, D)) == pytest.approx(0.41)
    for p, q, want in ((A, B, 0.6665), (C, D, 0.41)):
        r = pseudo.relevance(p, q, "uniform")[0, :, :, 0, 0]
        assert r.shape == (3, 3)
        assert float(r.sum() - torch.trace(r)) == pytest.approx(want)
        assert float(pseudo.disagreement(p, q, "uniform")) == pytest.approx(want)
        assert float(pseudo.loss_con(p, q, "uniform")) == pytest.approx(want)


def test_relevance_outer_product_entries():
    r = pseudo.relevance(C, D, "uniform")[0, :, :, 0, 0]
    assert float(r[0, 0]) == pytest.approx(0.8 * 0.7)
    assert float(r[0, 2]) == pytest.approx(0.8 * 0.15)
    assert float(r[2, 0]) == pytest.approx(0.05 * 0.7)


def test_confusion_weight_counts_and_normalisation():
    # 4 pixels: main argmax [0, 0, 1, 2], aux argmax [0, 1, 1, 2] -> counts n00=1 n01=1 n11=1 n22=1
    pm = torch.tensor([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    pa = torch.tensor([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]])
    pm = pm.T.reshape(1, 3, 2, 2)
    pa = pa.T.reshape(1, 3, 2, 2)
    w = pseudo.confusion_weight(pm, pa)
    expected = torch.zeros(3, 3)
    for i, j in ((0, 0), (0, 1), (1, 1), (2, 2)):
        expected[i, j] = 1
    expected *= 9 / 4  # entries average 1
    assert torch.allclose(w, expected)
    # pixel 2 (main .6 .3 .1 / aux .3 .6 .1): W[0,1] is the only non-zero off-diagonal weight
    dis = pseudo.disagreement(pm, pa, "confusion")
    assert float(dis[0, 0, 1]) == pytest.approx(9 / 4 * 0.6 * 0.6)
    assert float(pseudo.loss_con(pm, pa, "confusion")) == pytest.approx(float(dis.mean()))


def test_explicit_weight_matrix_and_bad_mode():
    w = torch.eye(3) * 0 + 2.0
    assert float(pseudo.disagreement(C, D, w)) == pytest.approx(2 * 0.41)
    with pytest.raises(ValueError):
        pseudo.weight_matrix(C, D, "nonsense")


def test_loss_ssl_weighted_ce():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])).T.reshape(1, 3, 1, 2)
    target = torch.tensor([[[0, 2]]])
    omega = torch.tensor([[[0.5, 0.2]]])
    want = (0.5 * -math.log(0.7) + 0.2 * -math.log(0.3)) / 2
    assert float(pseudo.loss_ssl(logits, target, omega)) == pytest.approx(want, rel=1e-5)
    # ignored pixels neither count nor average
    target_ign = torch.tensor([[[0, pseudo.IGNORE]]])
    assert float(pseudo.loss_ssl(logits, target_ign, omega)) == pytest.approx(0.5 * -math.log(0.7), rel=1e-5)


def test_threshold_and_cbst_labels():
    prob = torch.tensor([[0.95, 0.03, 0.02], [0.6, 0.3, 0.1], [0.05, 0.05, 0.9], [0.1, 0.7, 0.2]]).T.reshape(
        1, 3, 1, 4
    )
    lab = pseudo.threshold_labels(prob, 0.9).flatten().tolist()
    assert lab == [0, pseudo.IGNORE, pseudo.IGNORE, pseudo.IGNORE]
    # class 0 predicted at .95 and .6: its top 50% is one pixel -> k0 = .95; classes 1 and 2 have one
    # pixel each, of which 50% selects none -> k = 1 (CRST's kc_parameters)
    k = pseudo.cbst_thresholds(prob, 0.5)
    assert torch.allclose(k, torch.tensor([0.95, 1.0, 1.0]))
    assert pseudo.cbst_labels(prob, k).flatten().tolist() == [0] + [pseudo.IGNORE] * 3
    # the top 100%: each class's lowest value (class 0 .6, class 1 .7, class 2 .9)
    k = pseudo.cbst_thresholds(prob, 1.0)
    assert torch.allclose(k, torch.tensor([0.6, 0.7, 0.9]))
    assert pseudo.cbst_labels(prob, k).flatten().tolist() == [0, 0, 2, 1]
    k_strict = torch.tensor([0.96, 0.7, 0.95])
    assert pseudo.cbst_labels(prob, k_strict).flatten().tolist() == [
        pseudo.IGNORE,
        pseudo.IGNORE,
        pseudo.IGNORE,
        1,
    ]


@pytest.mark.parametrize("portion", [0.0, 0.2, 0.5, 0.7, 1.0])
def test_class_quantiles_f16_equals_the_selection(portion):
    """The histogram quantile of float16 values is class_quantiles' kthvalue, ties and -0.0 included."""
    g = torch.Generator().manual_seed(3)
    top = torch.rand(4000, generator=g).to(torch.float16)
    top[:500] = (top[:500] * 4).round() / 4  # many ties
    top[500:510] = -0.0
    lab = torch.randint(0, 4, (4000,), generator=g)  # class 4 is empty: k = 1
    lab[lab == 3] = torch.where(torch.rand(int((lab == 3).sum()), generator=g) < 0.5, 3, 2)
    got = pseudo.class_quantiles_f16(top, lab, 5, portion)
    want = pseudo.class_quantiles(top.float(), lab, 5, portion)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert got[4] == 1.0
    with pytest.raises(ValueError, match="float16"):
        pseudo.class_quantiles_f16(top.float(), lab, 5, portion)


def test_class_normalised_labels_and_selection():
    # pixels: confident background, unsure background next to an organ, organ 1, unsure organ 2
    prob = torch.tensor([[0.95, 0.03, 0.02], [0.5, 0.45, 0.05], [0.1, 0.8, 0.1], [0.3, 0.2, 0.5]]).T.reshape(
        1, 3, 1, 4
    )
    k = torch.tensor([0.9, 0.6, 0.6])
    # p / k: [1.06, .05, .03], [.56, .75, .08], [.11, 1.33, .17], [.33, .33, .83]
    assert pseudo.class_normalised_labels(prob, k).flatten().tolist() == [0, 1, 1, 2]
    assert pseudo.class_normalised_labels(prob, k, "all").flatten().tolist() == [
        0,
        pseudo.IGNORE,
        1,
        pseudo.IGNORE,
    ]
    # only the unsure background would drop out: here every background pixel is confident
    assert pseudo.class_normalised_labels(prob, k, "background").flatten().tolist() == [0, 1, 1, 2]
    k_bg = torch.tensor([0.99, 0.6, 0.6])  # now the first pixel's 0.95 is below background's k
    assert pseudo.class_normalised_labels(prob, k_bg, "background").flatten().tolist() == [
        pseudo.IGNORE,
        1,  # organ pixels below their k (.75 here) stay
        1,
        2,
    ]
    assert pseudo.class_normalised_labels(prob, k_bg, "all").flatten().tolist()[:2] == [pseudo.IGNORE] * 2
    # "all" without any pixel below its k is the plain class-normalised argmax
    assert torch.equal(
        pseudo.class_normalised_labels(prob, k * 0.1, "all"),
        pseudo.class_argmax(prob / k.reshape(1, -1, 1, 1)),
    )
    with pytest.raises(ValueError, match="select"):
        pseudo.class_normalised_labels(prob, k, "some")


def test_mrnet_loss_matches_formula():
    torch.manual_seed(0)
    m = torch.randn(1, 3, 2, 2)
    a = torch.randn(1, 3, 2, 2)
    y = torch.tensor([[[0, 1], [2, 1]]])
    loss, parts = pseudo.mrnet_loss(m, a, y, memory=None)
    pm, pa = torch.softmax(m, 1), torch.softmax(a, 1)
    var = (pa * (pa.log() - pm.log())).sum(1)
    ce = torch.nn.functional.cross_entropy(m, y, reduction="none")
    want = (ce * torch.exp(-var)).mean() + var.mean()
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    assert parts["memory"] == 0.0


def test_mrnet_memory_term_pulls_both_heads():
    """The memory term is 0.1 x (KL(mem || p_main) + KL(mem || p_aux)), both heads, not the main one alone."""
    torch.manual_seed(1)
    m = torch.randn(1, 3, 2, 2)
    a = 3 * torch.randn(1, 3, 2, 2)
    y = torch.tensor([[[0, 1], [2, 1]]])
    pm, pa = torch.softmax(m, 1), torch.softmax(a, 1)
    mem = pseudo.merge(pm, pa)
    _, parts = pseudo.mrnet_loss(m, a, y, memory=mem)

    def kl(p: torch.Tensor, q: torch.Tensor) -> float:
        return float((p * (p.log() - q.log())).sum(1).mean())

    assert parts["memory"] == pytest.approx(0.1 * (kl(mem, pm) + kl(mem, pa)), rel=1e-5)
    assert parts["memory"] > 0.1 * kl(mem, pm) * 1.05  # the auxiliary head's share is there


def test_class_balance_weights():
    lab = torch.tensor([0] * 16 + [1] * 4)
    w = pseudo.class_balance_weights(lab, 3)
    # 1/sqrt(16) = .25, 1/sqrt(4) = .5, mean of present = .375
    assert torch.allclose(w, torch.tensor([0.25 / 0.375, 0.5 / 0.375, 0.0]))
    ignored = torch.cat([lab, torch.full((50,), pseudo.IGNORE)])  # left-out pixels do not count
    assert torch.equal(pseudo.class_balance_weights(ignored, 3), w)
