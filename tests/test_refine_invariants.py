"""Invariants of the refinement loop and of the maps a mutation audit found untested (qa13).

Each test pins one behaviour a user relies on: the EMA teacher moves, the per-organ collapse guard,
Algorithm 1's two-part update, frozen batch-norm statistics after AdaBN, the weight W reaching L_Con,
painted corrections at full weight, the per-slice ensemble's EMA, ω read from the ensemble, both heads
in L_SSL, the fallback to the start model, each head's own map, and z-scored scans padded with air.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _tiny import BandNet, tiny_ct_case
from torch import nn

import napari_apl.core.refine as refine_mod
from napari_apl.core import pseudo
from napari_apl.core.checkpoint import CheckpointMeta, load_checkpoint
from napari_apl.core.infer import predict_volume, prepare
from napari_apl.core.models import DualHeadNet, build_model
from napari_apl.core.phantom import make_phantom
from napari_apl.core.preprocess import Normalization, get_preset
from napari_apl.core.refine import RefineConfig, RefineResult, refine
from napari_apl.core.utils import run_generator
from napari_apl.core.volume import Volume, volume_from_array

DEMO = Path(__file__).resolve().parents[1] / "resources" / "demo_unet_dual.pt"

Case = tuple[DualHeadNet, CheckpointMeta, Volume]
DemoCase = tuple[DualHeadNet, CheckpointMeta, Volume, dict]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """Every test here runs tiny models: one intra-op thread is fastest on shared cores."""


@pytest.fixture(scope="module")
def setup() -> Case:
    """A tiny CT phantom (48 x 48 x 8) and an untrained, seeded unet-dual (base 8)."""
    return tiny_ct_case(base=8)


@pytest.fixture(scope="module")
def demo_case() -> DemoCase:
    """The bundled demo model on a small CT phantom: it finds the liver, the spleen and a kidney."""
    model, meta = load_checkpoint(DEMO)
    image, _, affine = make_phantom("ct", 0, shape=(128, 128, 8), spacing=(2.5, 2.5, 8.0))
    return model, meta, volume_from_array(image, affine), get_preset("ct-abdomen").to_dict()


def _cfg(**kw: Any) -> RefineConfig:
    """A short CPU run in float32 (no bf16 autocast, whatever the CPU), the guard only at the end."""
    base: dict[str, Any] = dict(
        iterations=3, batch_size=2, device="cpu", lr=1e-3, guard_every=1000, amp=False, teacher_bf16=False
    )
    base.update(kw)
    return RefineConfig(**base)


def _run(case: Case, cfg: RefineConfig, corrections: np.ndarray | None = None) -> RefineResult:
    """Run ``refine`` to its end and return its result."""
    model, meta, vol = case
    return run_generator(refine(model, meta, vol, cfg, corrections=corrections))


def _conv_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights of every convolution (never a batch-norm buffer)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            yield name, m.weight.detach()


# --- the EMA teacher (R03) ----------------------------------------------------------------------------------


def test_ema_update_moves_the_teacher_by_one_minus_decay_and_copies_the_buffers() -> None:
    """_ema_update: teacher ← decay · teacher + (1 − decay) · student; buffers become the student's."""
    torch.manual_seed(0)
    teacher = build_model("unet-dual", num_classes=5, base=4)
    student = build_model("unet-dual", num_classes=5, base=4)
    with torch.no_grad():
        for p in teacher.parameters():
            p.zero_()
        for p in student.parameters():
            p.fill_(1.0)
        for b in student.buffers():
            if b.is_floating_point():
                b.copy_(torch.rand_like(b) + 2.0)
            else:
                b.fill_(7)
    refine_mod._ema_update(teacher, student, 0.9)
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.1), rtol=0, atol=1e-7, msg=name)
    for (name, b), s in zip(teacher.named_buffers(), student.buffers(), strict=True):
        assert torch.equal(b, s), name
    assert any(True for _ in teacher.buffers())


def test_the_returned_teacher_moves_with_the_student(setup: Case) -> None:
    """With a teacher (the model APL returns) its convolution weights follow the student's steps."""
    model, _, _ = setup
    # frozen batch norm: no statistic can change, so only the EMA can move the returned weights;
    # the guard off, so that no restore can hand back the start model either
    res = _run(setup, _cfg(bn="frozen", teacher_decay=0.5, iterations=3, lr=1e-2, collapse_guard=0.0))
    assert not res.notes
    start = dict(_conv_weights(model))
    moved = [n for n, w in _conv_weights(res.model) if not torch.equal(w, start[n])]
    assert len(moved) == len(start), f"unchanged convolutions: {sorted(set(start) - set(moved))}"


# --- the per-organ collapse guard (R10) ---------------------------------------------------------------------


def test_one_collapsing_organ_is_caught_while_the_others_stay(demo_case: DemoCase) -> None:
    """An organ driven to background (while the liver stays) is named and the returned model keeps it."""
    model, meta, vol, ct = demo_case
    case = (model, meta, vol)
    start = _run(case, _cfg(iterations=0, normalization=ct))
    spleen = meta.class_names.index("spleen")
    start_spleen = start.organ_voxels["refined"][spleen]
    liver = start.organ_voxels["refined"][meta.class_names.index("liver")]
    assert start_spleen > 300 and liver > 5 * start_spleen  # the spleen is a minor share of the organs
    corr = np.where(start.pseudo == spleen, 0, -1).astype(np.int16)  # the spleen "corrected" to background
    kw = dict(iterations=15, lr=1e-3, teacher_decay=0.0, guard_every=5, normalization=ct)
    # the test has teeth: unguarded, the spleen vanishes and the organs as a whole stay
    free = _run(case, _cfg(collapse_guard=0.0, **kw), corr)
    counts = free.organ_voxels["refined"]
    assert counts[spleen] < 0.3 * start_spleen
    assert sum(counts[1:]) > 0.3 * sum(start.organ_voxels["refined"][1:])  # (no whole-foreground collapse)
    guarded = _run(case, _cfg(**kw), corr)
    collapse_notes = [n for n in guarded.notes if "collapsing" in n]
    assert collapse_notes and "spleen" in collapse_notes[0], guarded.notes
    assert "all organs" not in collapse_notes[0]  # caught organ by organ, not by the foreground check
    assert guarded.stopped
    assert guarded.organ_voxels["refined"][spleen] >= 0.3 * start_spleen


# --- Algorithm 1's two-part update (R15) --------------------------------------------------------------------


def test_the_encoder_step_leaves_the_classifiers_alone(setup: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """With L_Con = 0 the classifiers must not move at all in APL: L_SSL trains the encoder only."""
    model, _, _ = setup

    def zero_con(p_main: torch.Tensor, p_aux: torch.Tensor, weight: Any = "uniform") -> torch.Tensor:
        return 0.0 * (p_main.sum() + p_aux.sum())  # zero gradients for the classifier step

    monkeypatch.setattr(pseudo, "loss_con", zero_con)
    cfg = _cfg(iterations=2, teacher_decay=0.0, bn="frozen", lr=1e-2, collapse_guard=0.0)
    res = _run(setup, cfg)
    assert res.iterations_done == 2 and not res.notes
    start_cls = dict(model.classifier_named_parameters())
    for name, p in res.model.classifier_named_parameters():
        assert torch.equal(p, start_cls[name]), name
    start_enc = dict(model.encoder_named_parameters())
    assert any(not torch.equal(p, start_enc[n]) for n, p in res.model.encoder_named_parameters())


# --- batch norm: re-estimated once, then frozen (R18) -------------------------------------------------------


@pytest.mark.parametrize("teacher_decay", [0.0, 0.99])
def test_adapted_batch_norm_statistics_stay_frozen_while_training(setup: Case, teacher_decay: float) -> None:
    """bn="adapt" (the default): statistics are AdaBN's of the whole target, then unchanged by training."""
    model, meta, vol = setup
    cfg = _cfg(iterations=3, teacher_decay=teacher_decay, lr=1e-2, collapse_guard=0.0)
    assert cfg.bn == "adapt"
    want = copy.deepcopy(model).to(memory_format=torch.channels_last)  # (as the loop's student)
    xs = prepare(vol, meta, want).batch(range(vol.data.shape[2]))
    refine_mod._adapt_bn(want, xs, torch.device("cpu"), cfg.bn_mix)
    expected = {k: v for k, v in want.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    assert expected and any(not torch.equal(v, model.state_dict()[k]) for k, v in expected.items())
    res = _run(setup, cfg)
    assert not res.notes
    got = res.model.state_dict()
    for key, value in expected.items():
        assert torch.allclose(got[key], value, rtol=1e-4, atol=1e-5), key


# --- W of Eq. 1 reaches L_Con (R29) -------------------------------------------------------------------------


def test_the_weight_setting_reaches_l_con(setup: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """weight="confusion" is what the loop's L_Con computes with, at every iteration."""
    seen: list[Any] = []
    real = pseudo.loss_con

    def spy(p_main: torch.Tensor, p_aux: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(args[0] if args else kwargs.get("weight", "<default>"))
        return real(p_main, p_aux, *args, **kwargs)

    monkeypatch.setattr(pseudo, "loss_con", spy)
    for weight in ("confusion", "uniform"):
        seen.clear()
        _run(setup, _cfg(iterations=2, weight=weight))
        assert seen == [weight, weight]


# --- corrections at full weight (R17) -----------------------------------------------------------------------


def test_painted_pixels_reach_l_ssl_as_their_class_at_full_weight(
    setup: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the user painted, L_SSL's target is the painted class and ω is exactly 1."""
    model, meta, vol = setup
    painted = 2
    corr = np.full(vol.data.shape, -1, np.int16)
    corr[12:30, 14:34, :] = painted  # every slice, so every batch holds painted pixels
    grid_corr = refine_mod._grid_corrections(prepare(vol, meta, model), corr, meta.class_names)
    assert grid_corr is not None
    mask = grid_corr[0] >= 0
    assert mask.sum() > 100 and all(torch.equal(g >= 0, mask) for g in grid_corr)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = pseudo.loss_ssl

    def spy(
        logits: torch.Tensor, target: torch.Tensor, omega: torch.Tensor, *a: Any, **kw: Any
    ) -> torch.Tensor:
        seen.append((target.detach().clone(), omega.detach().clone()))
        return real(logits, target, omega, *a, **kw)

    monkeypatch.setattr(pseudo, "loss_ssl", spy)
    _run(setup, _cfg(iterations=3, augment="none", augment_geometry=False), corr)
    assert len(seen) == 6  # both heads, three iterations
    for target, omega in seen:
        assert (target[:, mask] == painted).all()
        assert (omega[:, mask] == 1.0).all()
        assert (omega[:, ~mask] < 1.0).any()  # elsewhere ω is the ensemble's confidence


# --- the per-slice ensemble (R09) ---------------------------------------------------------------------------


def test_the_ensemble_weighs_the_past_by_its_decay() -> None:
    """Step 5 of Algorithm 1: the ensemble keeps ``decay`` of the past and adds ``1 − decay`` of the new."""
    ens = refine_mod._Ensemble(1, 2, (1, 1), decay=0.7)
    ens.update([0], torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1))
    assert ens.prob.float().flatten().tolist() == [1.0, 0.0]  # a slice seen first is stored as is
    ens.update([0], torch.tensor([0.0, 1.0]).reshape(1, 2, 1, 1))
    torch.testing.assert_close(ens.prob.float().flatten(), torch.tensor([0.7, 0.3]), rtol=0, atol=1e-3)
    assert ens.labels().flatten().tolist() == [0]


# --- ω from the ensemble, L_SSL on both heads (R08, R13) ----------------------------------------------------


def test_l_ssl_weighs_by_the_ensembles_confidence_and_sees_both_heads(
    setup: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ω passed to L_SSL is the confidence of the ensemble's probabilities, and L_SSL gets main then aux."""
    model, _, _ = setup
    ensembles: list[torch.Tensor] = []
    real_get = refine_mod._Ensemble.get

    def get_spy(self: Any, idx: list[int], device: torch.device) -> torch.Tensor:
        out = real_get(self, idx, device)
        ensembles.append(out.clone())
        return out

    last_heads: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_heads = type(model).heads

    def heads_spy(self: Any, feats: Any, out_hw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        m, a = real_heads(self, feats, out_hw)
        last_heads[:] = [(m.detach().float(), a.detach().float())]
        return m, a

    calls: list[tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = []
    real_ssl = pseudo.loss_ssl

    def ssl_spy(
        logits: torch.Tensor, target: torch.Tensor, omega: torch.Tensor, *a: Any, **kw: Any
    ) -> torch.Tensor:
        calls.append((logits.detach().clone(), omega.detach().clone(), last_heads[0]))
        return real_ssl(logits, target, omega, *a, **kw)

    monkeypatch.setattr(refine_mod._Ensemble, "get", get_spy)
    monkeypatch.setattr(type(model), "heads", heads_spy)
    monkeypatch.setattr(pseudo, "loss_ssl", ssl_spy)
    # no teacher and a large step: the student's merged prediction soon differs from the ensemble's
    cfg = _cfg(iterations=3, teacher_decay=0.0, lr=1e-2, augment="none", collapse_guard=0.0)
    assert cfg.both_heads_ssl
    _run(setup, cfg)
    assert len(ensembles) == 3 and len(calls) == 6
    for i, ens in enumerate(ensembles):
        want = pseudo.confidence(ens)
        for _, omega, _ in calls[2 * i : 2 * i + 2]:
            assert torch.equal(omega, want), i
        (first, _, (main, aux)), (second, _, _) = calls[2 * i], calls[2 * i + 1]
        assert not torch.equal(main, aux)  # (the heads differ, so the check below can tell them apart)
        assert torch.equal(first, main) and torch.equal(second, aux), i


# --- the last-resort fallback (R12) -------------------------------------------------------------------------


def test_a_guard_that_rejects_every_state_returns_the_start_model(
    setup: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When even the last checked state fails the guard, the model passed in comes back unchanged."""
    model, _, _ = setup
    monkeypatch.setattr(refine_mod, "_finite", lambda net: False)  # every state judged broken
    # bn="adapt": the last checked state (after AdaBN) differs from the start model in its statistics
    res = _run(setup, _cfg(iterations=2, bn="adapt", bn_mix=0.5))
    assert any("returned the start model" in n for n in res.notes), res.notes
    got = res.model.state_dict()
    start = model.state_dict()
    assert got.keys() == start.keys()
    for key, value in start.items():
        assert torch.equal(got[key], value), key


# --- each head's own map (I03) ------------------------------------------------------------------------------


def test_the_main_and_aux_maps_are_each_heads_own_labels() -> None:
    """The "main" map is the main head's argmax and "aux" the aux head's, also where the two disagree."""
    image, _, affine = make_phantom("ct", 1, shape=(72, 60, 10), spacing=(2.5, 3.0, 8.0))
    vol = volume_from_array(image, affine)
    meta = CheckpointMeta(
        arch="unet-dual",
        arch_args={"num_classes": 5, "base": 8},
        input_size=(48, 48),
        spacing=(4.0, 4.0),
        normalization={"kind": "ct_window", "level": 40.0, "width": 400.0},
    )
    model = BandNet(aux_reversed=True).eval()
    pred = predict_volume(model, meta, vol, device="cpu", batch_size=4)
    prep = prepare(vol, meta, model)
    g = prep.grid
    (bx, by), (rx, ry) = g.pad_before, g.resampled_shape
    with torch.no_grad():
        logits = model(prep.batch(range(vol.data.shape[2])))
    for name, head in zip(("main", "aux"), logits, strict=True):
        prob = torch.softmax(head[..., bx : bx + rx, by : by + ry], 1)
        up = F.interpolate(prob, size=g.in_shape, mode="bilinear", align_corners=False)
        want = np.moveaxis(up.argmax(1).numpy(), 0, 2)
        got = getattr(pred, name)
        assert np.mean(got != want) < 1e-3, name  # float rounding at exact ties only
    assert np.mean(pred.main != pred.aux) > 0.2  # the heads really disagree


# --- z-scored scans padded with their darkest value (PP2, I09) ----------------------------------------------


def test_zscore_pads_with_the_volumes_darkest_normalised_value() -> None:
    """A z-scored scan narrower than the model's field of view is framed by air, not by mean grey."""
    rng = np.random.default_rng(0)
    data = rng.normal(100.0, 20.0, size=(16, 16, 4))
    fitted = Normalization("zscore").fit(data)
    assert fitted.pad == pytest.approx((data.min() - data.mean()) / data.std(), rel=1e-9)
    assert fitted.pad < -2

    image, _, affine = make_phantom("ct", 2, shape=(96, 96, 8), spacing=(2.0, 2.0, 6.0))
    vol = volume_from_array(image[30:66, 30:66].copy(), affine)  # 72 mm: narrower than the model grid
    meta = CheckpointMeta(
        arch="unet-dual",
        arch_args={"num_classes": 5, "base": 4},
        input_size=(48, 48),
        spacing=(4.0, 4.0),
        normalization={"kind": "zscore"},
    )
    prep = prepare(vol, meta, build_model("unet-dual", base=4))
    darkest = float(prep.fitted(np.asarray(vol.data)).min())
    assert prep.fitted.pad == pytest.approx(darkest, rel=1e-5) and darkest < 0
    g = prep.grid
    (bx, by), (rx, ry) = g.pad_before, g.resampled_shape
    assert bx > 0 and by > 0
    x = prep.batch([0])[0, 0]
    frame = torch.ones_like(x, dtype=torch.bool)
    frame[bx : bx + rx, by : by + ry] = False
    assert frame.any()
    assert torch.allclose(x[frame], torch.tensor(prep.fitted.pad, dtype=x.dtype))


@pytest.mark.parametrize("teacher_decay", [0.99, 0.0])
def test_start_organ_sizes_are_the_loaded_models(demo_case: DemoCase, teacher_decay: float) -> None:
    """The "start" organ sizes are the loaded model's own prediction (counted after the iterations, from its
    weights), with or without a teacher, and counting them leaves the returned model refined."""
    model, meta, vol, norm = demo_case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = run_generator(refine(model, meta, vol, _cfg(iterations=0, bn="frozen", normalization=norm)))
    counts = plain.organ_voxels["refined"]  # no iteration, the source's statistics: the loaded model
    assert plain.organ_voxels["start"] == counts and min(counts[1:]) > 0
    cfg = _cfg(iterations=3, bn="adapt", lr=1e-4, teacher_decay=teacher_decay, normalization=norm)
    res = run_generator(refine(model, meta, vol, cfg))
    assert res.organ_voxels["start"] == counts
    # the returned model is the refined one, not the loaded weights the count used
    moved = [k for k, v in res.model.state_dict().items() if not torch.equal(v.cpu(), before[k])]
    assert any(k.endswith("running_mean") for k in moved) and any(k.endswith("weight") for k in moved)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the caller's untouched
