"""The refinement loop: Algorithm 1's two-part update, every method end to end, control, determinism."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny import tiny_ct_case

from napari_apl.core import pseudo
from napari_apl.core.checkpoint import CheckpointMeta
from napari_apl.core.errors import APLError
from napari_apl.core.infer import predict_volume
from napari_apl.core.labels import CLASS_NAMES
from napari_apl.core.models import build_model
from napari_apl.core.phantom import make_phantom
from napari_apl.core.refine import METHODS, RefineConfig, RefineControl, refine
from napari_apl.core.utils import run_generator
from napari_apl.core.volume import volume_from_array


@pytest.fixture(scope="module")
def setup():
    """A tiny CT phantom and an untrained (but seeded) unet-dual with its metadata."""
    return tiny_ct_case(base=8)


def _cfg(**kw) -> RefineConfig:
    base = dict(iterations=3, batch_size=2, device="cpu", lr=1e-3, guard_every=1000)
    base.update(kw)
    return RefineConfig(**base)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_end_to_end(setup, method):
    model, meta, vol = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    events = []
    gen = refine(model, meta, vol, _cfg(method=method, emit_every=1))
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        result = stop.value
    assert [e.iteration for e in events] == [1, 2, 3]
    assert all(np.isfinite(list(e.losses.values())).all() for e in events)
    assert events[-1].pseudo is not None and events[-1].pseudo.shape == vol.data.shape
    assert result.pseudo.shape == vol.data.shape and result.pseudo.dtype == np.uint8
    assert result.iterations_done == 3 and len(result.history) == 3
    # the caller's model is never modified; the refined one is different
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    changed = any(
        not torch.equal(v, before[k]) for k, v in result.model.state_dict().items() if v.is_floating_point()
    )
    assert changed
    pred = predict_volume(result.model, meta, vol, device="cpu")
    assert pred.main.shape == vol.data.shape


def test_classifier_step_leaves_encoder_and_encoder_step_leaves_classifiers(setup):
    """Run single APL steps by hand through the same model API the loop uses."""
    model, _, _ = setup
    net = build_model("unet-dual", num_classes=5, base=8)
    net.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 48, 48)
    enc0 = [p.detach().clone() for p in net.encoder_parameters()]
    cls0 = [p.detach().clone() for p in net.classifier_parameters()]
    opt_cls = torch.optim.Adam(net.classifier_parameters(), lr=1e-2)
    opt_enc = torch.optim.Adam(net.encoder_parameters(), lr=1e-2)
    # classifier step on L_Con with detached features
    with torch.no_grad():
        feats = net.features(x)
    m, a = net.heads(feats, (48, 48))
    loss = pseudo.loss_con(torch.softmax(m, 1), torch.softmax(a, 1))
    opt_cls.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in net.encoder_parameters())
    opt_cls.step()
    assert all(torch.equal(p, q) for p, q in zip(net.encoder_parameters(), enc0))
    assert any(not torch.equal(p, q) for p, q in zip(net.classifier_parameters(), cls0))
    # encoder step on L_SSL: only the encoder optimiser steps
    cls1 = [p.detach().clone() for p in net.classifier_parameters()]
    m, a = net(x)
    prob = pseudo.merge(torch.softmax(m, 1), torch.softmax(a, 1)).detach()
    loss = pseudo.loss_ssl(m, prob.argmax(1), pseudo.confidence(prob))
    opt_enc.zero_grad()
    opt_cls.zero_grad()
    loss.backward()
    opt_enc.step()
    assert all(torch.equal(p, q) for p, q in zip(net.classifier_parameters(), cls1))
    assert any(not torch.equal(p, q) for p, q in zip(net.encoder_parameters(), enc0))


def test_deterministic_on_cpu(setup):
    model, meta, vol = setup
    r1 = run_generator(refine(model, meta, vol, _cfg(seed=7)))
    r2 = run_generator(refine(model, meta, vol, _cfg(seed=7)))
    for (k, v), w in zip(r1.model.state_dict().items(), r2.model.state_dict().values()):
        assert torch.equal(v, w), k
    assert np.array_equal(r1.pseudo, r2.pseudo)


def test_stop_and_pause(setup):
    model, meta, vol = setup
    ctl = RefineControl()
    gen = refine(model, meta, vol, _cfg(iterations=50), control=ctl)
    next(gen)
    next(gen)
    ctl.pause()
    assert ctl.paused
    ctl.stop()  # a stop releases a pause
    with pytest.raises(StopIteration) as stop:
        next(gen)
    result = stop.value.value
    assert result.stopped and result.iterations_done == 2
    assert all(torch.isfinite(t).all() for t in result.model.state_dict().values() if t.is_floating_point())
    pred = predict_volume(result.model, meta, vol, device="cpu")
    assert pred.pseudo.shape == vol.data.shape


def test_corrections_become_hard_targets(setup):
    model, meta, vol = setup
    corr = np.full(vol.data.shape, -1, np.int16)
    corr[10:30, 10:30, 2] = 4  # the user paints spleen
    corr[0:5, 0:5, 3] = 0  # and erases to background
    res = run_generator(refine(model, meta, vol, _cfg(iterations=1), corrections=corr))
    assert (res.pseudo[10:30, 10:30, 2] == 4).all()
    assert (res.pseudo[0:5, 0:5, 3] == 0).all()
    with pytest.raises(ValueError, match="shape"):
        run_generator(refine(model, meta, vol, _cfg(iterations=1), corrections=corr[:-1]))
    # a value that is no class of the model (napari's "new label" gives 5) is refused, in one line
    for bad in (5, -2):
        wrong = corr.copy()
        wrong[40, 40, 4] = bad
        with pytest.raises(
            APLError,
            match=rf"^label {bad} in the corrections is not one of the model's "
            r"classes \(0 background, 1 liver, .*4 spleen\): erase",
        ) as err:
            run_generator(refine(model, meta, vol, _cfg(iterations=1), corrections=wrong))
        assert "\n" not in str(err.value)


def test_bad_config_is_one_line_error(setup):
    model, meta, vol = setup
    for bad in (
        dict(method="nope"),
        dict(lr=-1.0),
        dict(batch_size=0),
        dict(weight="x"),
        dict(amp="off"),
        dict(teacher_bf16="auto"),
        # settings validate() let through and the loop then broke on, or read otherwise
        dict(foreground_sampling=1.5),
        dict(foreground_sampling=-0.5),
        dict(lr_classifier=-1e-4),
        dict(lr_classifier=float("nan")),
        dict(augment_geometry="false"),
        dict(class_balance_volume="no"),
        dict(seed=2**64),
        dict(tau=1.0),
        dict(collapse_guard=-1.0),
    ):
        with pytest.raises(APLError) as err:
            run_generator(refine(model, meta, vol, _cfg(**bad)))
        assert "\n" not in str(err.value)


def _organ_voxels(model, meta, vol) -> int:
    return int((predict_volume(model, meta, vol, device="cpu").pseudo > 0).sum())


def test_unguarded_run_does_collapse(setup):
    """The run the guard test relies on really collapses to background when unguarded (the test has teeth)."""
    model, meta, vol = setup
    assert _organ_voxels(model, meta, vol) > 0  # the start model finds organs
    corr = np.zeros(vol.data.shape, np.int16)  # everything "corrected" to background
    cfg = _cfg(method="threshold", iterations=15, lr=1e-2, teacher_decay=0.0, collapse_guard=0.0)
    free = run_generator(refine(model, meta, vol, cfg, corrections=corr))
    assert _organ_voxels(free.model, meta, vol) == 0


@pytest.mark.parametrize("stop_early", [False, True])
def test_device_memory_is_released_after_the_loop_state_is_gone(setup, monkeypatch, stop_early) -> None:
    """The accelerator's cache is emptied once the loop's optimisers and weight copies no longer exist
    (emptied while they lived, their blocks would stay cached): at the end and after a stop."""
    import gc

    import napari_apl.core.refine as refine_mod

    model, meta, vol = setup
    alive = []

    def spy(device) -> None:
        gc.collect()
        alive.append(sum(isinstance(o, torch.optim.Optimizer) for o in gc.get_objects()))

    monkeypatch.setattr(refine_mod, "release_device_memory", spy)
    ctl = RefineControl()
    gen = refine(model, meta, vol, _cfg(iterations=6), control=ctl)
    next(gen)
    if stop_early:
        ctl.stop()
    result = run_generator(gen)
    assert alive == [0]
    assert result.iterations_done == (1 if stop_early else 6)


def test_events_kept_after_the_end_hold_no_tensors(setup, monkeypatch) -> None:
    """A caller that keeps the last event (a viewer showing it) keeps none of the loop's tensors alive
    when the cache is emptied: on an H100 the ensemble and the guard's weight copies stayed reserved."""
    import gc

    import napari_apl.core.refine as refine_mod

    model, meta, vol = setup
    held: list[int] = []

    def spy(device) -> None:
        gc.collect()
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
        held.append(sum(t.numel() * t.element_size() for t in tensors))

    monkeypatch.setattr(refine_mod, "release_device_memory", spy)
    kept = []
    for keep in (False, True):
        gen = refine(model, meta, vol, _cfg(iterations=4, guard_every=2))
        while True:
            try:
                ev = next(gen)
            except StopIteration:
                break
            assert ev.labels().shape == vol.data.shape  # while the loop runs, the callables work
            if keep:
                kept.append(ev)
            del ev
    assert len(held) == 2
    assert held[1] == held[0], f"kept events hold {held[1] - held[0]} bytes of tensors"
    with pytest.raises(RuntimeError, match="ended"):
        kept[-1].labels()
    with pytest.raises(RuntimeError, match="ended"):
        kept[-1].checked()


@pytest.mark.parametrize("at", [3, 5])
def test_non_finite_weights_restore_a_finite_model(setup, monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    """An encoder step that leaves a NaN weight (its loss still finite) stops the run with a finite model:
    at a guard iteration (5) the weights are checked at once, elsewhere the next loss shows it."""
    model, meta, vol = setup
    step = torch.optim.Adam.step
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2 * at:  # the encoder step of iteration ``at`` (classifier step, then encoder)
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned)
    res = run_generator(refine(model, meta, vol, _cfg(iterations=12, guard_every=5)))
    assert res.stopped
    assert any("non-finite" in n for n in res.notes), res.notes
    stopped_at = len(res.history)
    assert stopped_at == (at if at % 5 == 0 else at + 1)
    assert all(torch.isfinite(t).all() for t in res.model.state_dict().values() if t.is_floating_point())
    assert _organ_voxels(res.model, meta, vol) > 0


@pytest.mark.parametrize("guard_every", [5, 1000])
def test_refine_never_returns_a_background_only_model(setup, guard_every):
    """Drive the model to background on purpose: the guard (during the loop or at its end) refuses it."""
    model, meta, vol = setup
    corr = np.zeros(vol.data.shape, np.int16)
    cfg = _cfg(method="threshold", iterations=15, lr=1e-2, teacher_decay=0.0, guard_every=guard_every)
    res = run_generator(refine(model, meta, vol, cfg, corrections=corr))
    assert _organ_voxels(res.model, meta, vol) > 0
    assert res.notes and any("organ" in n or "collapsing" in n for n in res.notes)
    assert all(torch.isfinite(t).all() for t in res.model.state_dict().values() if t.is_floating_point())


def test_for_method_and_bn_adapt(setup):
    """Per-method defaults build valid configs; AdaBN re-estimates the statistics and the run still works."""
    from napari_apl.core.refine import METHOD_DEFAULTS, _adapt_bn

    for m in METHODS:
        cfg = RefineConfig.for_method(m, seed=4)
        assert cfg.method == m and cfg.seed == 4 and cfg.validate() is cfg
        for k, v in METHOD_DEFAULTS[m].items():
            assert getattr(cfg, k) == v
    with pytest.raises(ValueError, match="unknown method"):
        RefineConfig.for_method("nope")
    model, meta, vol = setup
    net = build_model("unet-dual", num_classes=5, base=8)
    net.load_state_dict(model.state_dict())
    before = net.inc[1].running_mean.clone()
    _adapt_bn(net, torch.rand(6, 1, 48, 48) * 3 + 2, torch.device("cpu"))
    assert not torch.allclose(before, net.inc[1].running_mean) and not net.training
    res = run_generator(
        refine(model, meta, vol, _cfg(bn="adapt", iterations=2, class_balance_power=1.0, class_norm=0.5))
    )
    assert res.iterations_done == 2


def test_bn_mix_blends_source_and_target_statistics(setup):
    """bn_mix = 1 is plain AdaBN, 0 keeps the source statistics, 0.5 is their average, layer by layer."""
    from napari_apl.core.refine import _adapt_bn

    model, meta, vol = setup
    xs = torch.rand(6, 1, 48, 48) * 3 + 2
    nets = {}
    for mix in (0.0, 0.5, 1.0):
        net = build_model("unet-dual", num_classes=5, base=8)
        net.load_state_dict(model.state_dict())
        _adapt_bn(net, xs, torch.device("cpu"), mix)
        nets[mix] = {k: v for k, v in net.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    src = {k: v for k, v in model.state_dict().items() if k in nets[0.0]}
    assert len(src) > 5
    for k, v in src.items():
        assert torch.equal(nets[0.0][k], v), k
        assert not torch.allclose(nets[1.0][k], v), k
        torch.testing.assert_close(nets[0.5][k], 0.5 * (nets[1.0][k] + v), rtol=1e-5, atol=1e-6)
    res = run_generator(refine(model, meta, vol, _cfg(bn="adapt", bn_mix=0.5, iterations=2)))
    assert res.iterations_done == 2
    with pytest.raises(APLError, match="bn_mix"):
        _cfg(bn_mix=1.5).validate()
    with pytest.raises(APLError, match="class_balance_power"):
        _cfg(class_balance_power=-0.5).validate()


def _spy_class_weights(monkeypatch) -> list[torch.Tensor]:
    """Record the class weights of every weighted cross-entropy L_SSL computes, in call order."""
    seen: list[torch.Tensor] = []
    real_ce = pseudo.F.cross_entropy

    def spy(logits, target, weight=None, **kw):
        if weight is not None:
            seen.append(weight.detach().clone())
        return real_ce(logits, target, weight=weight, **kw)

    monkeypatch.setattr(pseudo.F, "cross_entropy", spy)
    return seen


def test_volume_class_balance_weighs_classes_by_the_whole_ensemble(setup, monkeypatch):
    """class_balance_volume: L_SSL's class weights follow the ensemble's label counts, not the batch's."""
    model, meta, vol = setup
    seen = _spy_class_weights(monkeypatch)
    # plain AdaBN: with the untrained model's source statistics every pixel falls in one class
    cw = {"class_balance_power": 0.5}  # (the default power 0 gives every class weight 1)
    run_generator(refine(model, meta, vol, _cfg(iterations=2, class_balance_volume=True, bn_mix=1.0, **cw)))
    vol_w = list(seen)
    seen.clear()
    run_generator(refine(model, meta, vol, _cfg(iterations=2, bn_mix=1.0, **cw)))
    assert vol_w and seen and len(vol_w) == len(seen)
    # the same first batch, other weights: whole-volume counts differ from one batch's
    assert not torch.allclose(vol_w[0], seen[0])
    for w in vol_w:
        assert torch.isclose(w[w > 0].mean(), torch.tensor(1.0)) and (w >= 0).all()


def test_class_selection_drops_pixels_from_l_ssl(monkeypatch):
    """class_select / background_select: L_SSL's targets hold ignored pixels, and only with the option."""
    from napari_apl.core.checkpoint import load_checkpoint
    from napari_apl.core.preprocess import get_preset

    # the demo model on a small CT phantom: every class present in the pseudo labels
    model, meta = load_checkpoint(Path(__file__).resolve().parents[1] / "resources" / "demo_unet_dual.pt")
    image, _, affine = make_phantom("ct", 100, shape=(160, 160, 12), spacing=(2.5, 2.5, 8.0))
    vol = volume_from_array(image, affine)
    ct = get_preset("ct-abdomen").to_dict()
    targets: list[torch.Tensor] = []
    real_ce = pseudo.F.cross_entropy

    def spy(logits, target, weight=None, **kw):
        targets.append(target.detach().clone())
        return real_ce(logits, target, weight=weight, **kw)

    monkeypatch.setattr(pseudo.F, "cross_entropy", spy)
    ignored, first = {}, {}
    for name, kw in {"none": {}, "all": {"class_select": True}, "bg": {"background_select": True}}.items():
        targets.clear()
        res = run_generator(refine(model, meta, vol, _cfg(iterations=2, normalization=ct, **kw)))
        assert res.iterations_done == 2 and targets
        ignored[name] = sum(int((t == pseudo.IGNORE).sum()) for t in targets)
        t0 = targets[0]  # the first batch's L_SSL target (same batch and ensemble in the three runs)
        first[name] = torch.bincount(t0[t0 != pseudo.IGNORE].flatten(), minlength=5)
    assert ignored["none"] == 0
    # about half of each class's pixels (class_norm 0.5) drop out; background alone drops fewer
    assert ignored["all"] > ignored["bg"] > 0
    assert first["none"][1:].sum() > 0
    assert torch.equal(first["bg"][1:], first["none"][1:])  # every organ pixel kept
    assert first["bg"][0] < first["none"][0]
    assert (first["all"][1:] <= first["none"][1:]).all() and first["all"][1:].sum() < first["none"][1:].sum()
    with pytest.raises(APLError, match="class_select"):
        _cfg(class_select=1).validate()
    with pytest.raises(APLError, match="needs class_norm"):
        _cfg(background_select=True, class_norm=0.0).validate()
    for method in ("apl-con", "threshold", "cbst", "mrnet"):
        with pytest.raises(APLError, match=f"background_select is an option of method apl, not of {method}"):
            RefineConfig.for_method(method, background_select=True).validate()


def test_ensemble_tracks_labels_and_foreground_slices_of_a_full_argmax():
    """The labels and per-slice organ flags the ensemble updates batch by batch equal a full-volume argmax."""
    from napari_apl.core.refine import _Ensemble

    gen = torch.Generator().manual_seed(0)
    ens = _Ensemble(6, 4, (8, 8), decay=0.7)
    for step in range(12):
        idx = torch.randint(0, 6, (3,), generator=gen).tolist()  # repeats included
        logits = torch.randn(3, 4, 8, 8, generator=gen) * 3
        if step % 3 == 2:  # background-only batches turn foreground slices back to background
            logits[:, 0] += 20
        merged = (torch.softmax(logits, 1) * 8).round() / 8  # ties between classes
        changed = ens.update(idx, merged)
        full = ens.prob.argmax(1)
        assert torch.equal(ens.labels(), full.to(torch.uint8))
        assert ens.foreground_slices() == torch.nonzero((full > 0).flatten(1).any(1)).flatten().tolist()
        assert 0.0 <= float(changed) <= 1.0
    assert ens.foreground_slices() and len(ens.foreground_slices()) < 6
    for portion in (0.0, 0.2, 0.5, 1.0):
        assert torch.equal(ens.class_thresholds(portion), pseudo.cbst_thresholds(ens.prob.float(), portion))


def test_fast_class_maths_equal_their_definitions():
    """class_argmax, confidence and cbst_thresholds equal argmax, top-1 − top-2 and the sorted quantile."""
    gen = torch.Generator().manual_seed(1)
    prob = (torch.rand(3, 5, 16, 16, generator=gen) * 6).round() / 6  # many ties
    prob[0, 2, 3, 3] = float("nan")
    for x in (prob, prob.half(), torch.rand(2, 3, 7, generator=gen)):
        assert torch.equal(pseudo.class_argmax(x), torch.argmax(x, dim=1))
        top2 = torch.topk(x, k=2, dim=1).values
        want = (top2[:, 0] - top2[:, 1]).abs()
        torch.testing.assert_close(pseudo.confidence(x), want, rtol=0, atol=0, equal_nan=True)
    prob = torch.softmax(torch.randn(4, 5, 20, 20, generator=gen) * 2, 1)
    top, lab = prob.max(dim=1)
    for portion in (0.0, 0.3, 0.5, 0.99):
        k = pseudo.cbst_thresholds(prob, portion)
        for c in range(5):
            vals = torch.sort(top[lab == c], descending=True).values
            m = int(portion * len(vals))  # CRST: floor(p n) pixels selected, k_c = 1 when none
            want = vals[m - 1] if m else torch.tensor(1.0)
            assert k[c] == want
    # small classes, as CRST's kc_parameters: 10 pixels at p = 0.2 select 2; 3 pixels select none
    top = torch.tensor([0.99, 0.97, 0.95, 0.9, 0.8, 0.7, 0.6, 0.55, 0.5, 0.45, 0.9, 0.8, 0.7])
    lab = torch.tensor([1] * 10 + [2] * 3)
    k = pseudo.class_quantiles(top, lab, 3, 0.2)
    assert k.tolist() == pytest.approx([1.0, 0.97, 1.0])
    assert int((top[lab == 1] >= k[1]).sum()) == 2
    assert torch.equal(
        pseudo.class_quantiles_f16(top.half(), lab, 3, 0.2),
        pseudo.class_quantiles(top.half().float(), lab, 3, 0.2),
    )


@pytest.mark.parametrize("method", METHODS)
def test_frozen_batch_norm_stays_frozen_without_a_teacher(setup, method):
    """bn="frozen": the source's running statistics survive, also when the student predicts its own labels."""
    model, meta, vol = setup
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    assert stats
    result = run_generator(refine(model, meta, vol, _cfg(method=method, bn="frozen", teacher_decay=0.0)))
    after = result.model.state_dict()
    for key, value in stats.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize("method", ["apl", "apl-con"])
@pytest.mark.parametrize("bn", ["frozen", "adapt"])
@pytest.mark.parametrize("geometry", [False, True])
def test_labels_from_the_students_own_forward_change_nothing(setup, monkeypatch, method, bn, geometry):
    """Without a teacher the pseudo labels come from the classifier step's forward: bit-identical (and
    not so with a geometric view, whose forward is of another image than the slice's)."""
    import napari_apl.core.refine as refine_module

    model, meta, vol = setup
    cfg = _cfg(
        method=method, bn=bn, teacher_decay=0.0, iterations=4, augment="none", augment_geometry=geometry
    )
    fast = run_generator(refine(model, meta, vol, cfg))
    monkeypatch.setattr(refine_module, "_REUSE_OWN_FORWARD", False)
    slow = run_generator(refine(model, meta, vol, cfg))
    for key, value in slow.model.state_dict().items():
        assert torch.equal(fast.model.state_dict()[key], value), key
    assert np.array_equal(fast.pseudo, slow.pseudo)
    assert [h.get("con") for h in fast.history] == [h.get("con") for h in slow.history]


@pytest.mark.parametrize("collapse", [False, True])
def test_spread_guard_returns_the_same_model(setup, collapse):
    """Spreading the guard's prediction over iterations changes when its verdict comes, not the model."""
    model, meta, vol = setup
    corr = np.zeros(vol.data.shape, np.int16) if collapse else None  # all "corrected" to background
    kw = dict(method="threshold", lr=1e-2, teacher_decay=0.0) if collapse else dict(lr=1e-3)
    runs = {}
    for spread in (False, True):
        cfg = _cfg(iterations=15, guard_every=4, guard_spread=spread, **kw)
        runs[spread] = run_generator(refine(model, meta, vol, cfg, corrections=corr))
    a, b = runs[False], runs[True]
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert np.array_equal(a.pseudo, b.pseudo)
    if collapse:  # both stopped on a collapse and went back to the same checked state
        assert a.stopped and b.stopped and _organ_voxels(b.model, meta, vol) > 0
        assert b.iterations_done >= a.iterations_done
        assert a.notes[0].split(":")[1] == b.notes[0].split(":")[1]  # "restored iteration N and stopped"
    else:
        assert not a.stopped and not b.stopped and a.iterations_done == b.iterations_done == 15


def _recording_first_conv(model) -> tuple[torch.nn.Module, list[tuple[bool, torch.dtype]]]:
    """A copy of ``model`` whose first convolution records (inference mode?, output dtype) per call;
    deepcopy carries the hook to the student, the teacher and the guard's frozen copy."""
    net = build_model("unet-dual", num_classes=5, base=8)
    net.load_state_dict(model.state_dict())
    seen: list[tuple[bool, torch.dtype]] = []
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(
        lambda _m, _i, out: seen.append((torch.is_inference_mode_enabled(), out.dtype))
    )
    return net, seen


@pytest.mark.parametrize(("teacher_bf16", "decay"), [(True, 0.99), (False, 0.99), (True, 0.0)])
def test_teacher_bf16_runs_only_the_teachers_forwards_in_bf16(setup, teacher_bf16, decay):
    """teacher_bf16 puts the no-grad teacher forwards under bf16 autocast; the student stays float32."""
    model, meta, vol = setup
    net, seen = _recording_first_conv(model)
    cfg = _cfg(
        iterations=4, guard_every=2, teacher_bf16=teacher_bf16, teacher_decay=decay, bn="adapt", amp=False
    )
    res = run_generator(refine(net, meta, vol, cfg))
    assert res.iterations_done >= 2  # at least one guard check ran (the untrained student may collapse)
    inference = {d for inf, d in seen if inf}
    training = {d for inf, d in seen if not inf}
    assert inference and training == {torch.float32}
    assert inference == ({torch.bfloat16} if teacher_bf16 and decay > 0 else {torch.float32})


def test_to_volume_gathers_the_float_nearest_resampling(setup):
    """The uint8 gather of the live overlay equals resampling the labels as floats (ties included)."""
    from napari_apl.core.infer import prepare
    from napari_apl.core.refine import _to_volume

    model, meta, _ = setup
    # 97 voxels from 128 model-grid pixels puts an output pixel centre exactly on a tie (48.5 * 128 / 97)
    image, _labels, affine = make_phantom("ct", seed=1, shape=(97, 300, 8), spacing=(3.3, 0.8, 2.0))
    meta160 = CheckpointMeta(**{**meta.__dict__, "input_size": (160, 160), "spacing": (2.5, 2.5)})
    prep = prepare(volume_from_array(image, affine), meta160, model)
    low = torch.randint(0, 5, (8, *prep.grid.padded_shape), generator=torch.Generator().manual_seed(0))
    want = prep.grid.inverse(low.unsqueeze(1).float(), mode="nearest")[:, 0].round().to(torch.uint8)
    got = _to_volume(prep, low.to(torch.uint8))
    assert got.shape == image.shape and got.flags.f_contiguous
    assert np.array_equal(got, want.permute(1, 2, 0).numpy())


def test_class_balance_power_is_the_exponent_of_the_class_weights(setup, monkeypatch):
    """Class weights ∝ 1/frequency^p: p = 0 is unweighted, p = 1 squares p = 0.5's ratios."""
    model, meta, vol = setup
    seen = _spy_class_weights(monkeypatch)
    by_power = {}
    for p in (0.0, 0.5, 1.0):
        seen.clear()
        run_generator(refine(model, meta, vol, _cfg(iterations=1, bn_mix=1.0, class_balance_power=p)))
        by_power[p] = seen[0]
    present = by_power[0.5] > 0
    assert present.sum() >= 2, "the first batch must hold at least two classes for this test"
    torch.testing.assert_close(by_power[0.0][present], torch.ones(int(present.sum())))
    half, full = by_power[0.5][present], by_power[1.0][present]
    assert not torch.allclose(half, torch.ones_like(half))
    ratio_half, ratio_full = half / half[0], full / full[0]
    torch.testing.assert_close(ratio_full, ratio_half**2, rtol=1e-4, atol=1e-6)


def test_organ_size_change_line():
    """The size line gives a signed percentage per organ, and names organs the loaded model lacked."""
    from napari_apl.core.refine import RefineResult, organ_size_change

    sizes = {"start": [90, 100, 40, 0, 0], "refined": [60, 117, 30, 5, 0]}
    res = RefineResult(model=None, pseudo=np.zeros(1), organ_voxels=sizes)
    names = ["background", "liver", "right kidney", "left kidney", "spleen"]
    line = organ_size_change(res, names)
    want = "liver +17%, right kidney -25%, left kidney new (5 voxels), spleen none"
    assert line == f"organ size vs the starting model: {want}"
    assert organ_size_change(RefineResult(model=None, pseudo=np.zeros(1)), names) == ""


def _spy_features(monkeypatch, model) -> list[tuple[bool, torch.Tensor]]:
    """Record every encoder input of ``model``'s class as (made without grad tracking, input), in order."""
    calls: list[tuple[bool, torch.Tensor]] = []
    cls = type(model)
    real = cls.features

    def spy(self, x):
        calls.append((torch.is_inference_mode_enabled() or not torch.is_grad_enabled(), x.detach().clone()))
        return real(self, x)

    monkeypatch.setattr(cls, "features", spy)
    return calls


@pytest.mark.parametrize("method", ["apl", "threshold"])
def test_student_learns_from_an_augmented_view_of_the_teachers_slices(setup, monkeypatch, method):
    """The teacher labels the plain slices; with augmentation the student's input differs from them."""
    model, meta, vol = setup
    views = {}
    for mode in ("none", "mild", "domain"):
        calls = _spy_features(monkeypatch, model)
        run_generator(refine(model, meta, vol, _cfg(method=method, iterations=2, augment=mode)))
        monkeypatch.undo()
        graded = [i for i, (no_grad, _) in enumerate(calls) if not no_grad]
        assert len(graded) == 2  # one student forward per iteration
        teacher_x = calls[graded[0] - 1][1]  # the teacher's forward on the batch, just before
        views[mode] = (teacher_x, calls[graded[0]][1])
    plain, student = views["none"]
    assert torch.equal(plain, student)
    for mode in ("mild", "domain"):
        teacher_x, student_x = views[mode]
        assert torch.equal(
            teacher_x, plain
        )  # same batch, same teacher input: only the student's view changes
        assert student_x.shape == plain.shape and torch.isfinite(student_x).all()
        assert (student_x - plain).abs().mean() > 0.01
    with pytest.raises(APLError, match="augment"):
        _cfg(augment="strong").validate()


def test_geometric_view_resamples_the_pseudo_labels_and_ignores_pixels_from_outside(setup, monkeypatch):
    """With augment_geometry the targets follow the student's warped view; pixels from outside weigh 0."""
    model, meta, vol = setup
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = pseudo.loss_ssl

    def spy(logits, target, omega, *a, **kw):
        seen.append((target.clone(), omega.detach().clone()))
        return real(logits, target, omega, *a, **kw)

    monkeypatch.setattr(pseudo, "loss_ssl", spy)
    run_generator(refine(model, meta, vol, _cfg(iterations=3, augment_geometry=True)))
    targets = torch.stack([t for t, _ in seen])
    weights = torch.stack([w for _, w in seen])
    outside = targets == pseudo.IGNORE
    assert outside.any() and (weights[outside] == 0).all()
    assert (targets[~outside] < len(CLASS_NAMES)).all() and (weights[~outside] > 0).any()
    seen.clear()
    run_generator(refine(model, meta, vol, _cfg(iterations=3)))
    assert not any((t == pseudo.IGNORE).any() for t, _ in seen)


def test_warps_move_labels_with_the_image():
    """warp_image and warp_labels with one random grid keep an object and its label together."""
    from napari_apl.core.train import random_affine_grid, warp_image, warp_labels

    x = torch.zeros(4, 1, 64, 64)
    y = torch.zeros(4, 64, 64, dtype=torch.long)
    x[:, :, 20:40, 24:44] = 1.0
    y[:, 20:40, 24:44] = 3
    grid = random_affine_grid(x, torch.Generator().manual_seed(0))
    wx, wy = warp_image(x, grid), warp_labels(y, grid)
    assert not torch.equal(wy, y)  # it did move
    inside_label = wy == 3
    agree = ((wx[:, 0] > 0.5) == inside_label).float().mean()
    assert agree > 0.98 and inside_label.sum() > 0.5 * (y == 3).sum()


@pytest.mark.parametrize("method", ["threshold", "cbst", "mrnet"])
def test_baselines_train_on_a_geometric_view(setup, method):
    """The baselines' targets are resampled onto the student's view too (finite losses, a changed model)."""
    model, meta, vol = setup
    res = run_generator(refine(model, meta, vol, _cfg(method=method, iterations=2, augment_geometry=True)))
    assert res.iterations_done == 2 and not res.notes
    assert all(np.isfinite(v) for h in res.history for k, v in h.items() if k != "iteration")
    changed = any(
        not torch.equal(a, b) for a, b in zip(res.model.state_dict().values(), model.state_dict().values())
    )
    assert changed


def test_the_optimiser_warm_up_runs_once() -> None:
    """A fresh process lacks torch's compiler stack until the warm-up has made its Adam step, once."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from napari_apl.core.utils import warm_up_optimiser as warm\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "assert warm() is True and 'torch._dynamo' in sys.modules\n"
        "assert warm() is False\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.mark.parametrize("method", ["apl", "mrnet", "cbst"])
def test_folded_teacher_gives_the_same_refinement(setup, monkeypatch, method):
    """The teacher's and the guard's forwards on the folded copy change nothing beyond float rounding."""
    import napari_apl.core.refine as refine_module

    model, meta, vol = setup
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    for m in model.modules():  # statistics that make folding change the weights
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    # float32 throughout: on a CPU with native bf16 the refinement would run under bf16 autocast by
    # default, where folding changes the rounding by far more (an H100 host's Xeon failed this test so)
    cfg = _cfg(
        method=method, iterations=6, guard_every=3, bn="frozen", rounds=2, teacher_bf16=False, amp=False
    )
    folded = run_generator(refine(model, meta, vol, cfg))
    monkeypatch.setattr(refine_module, "_FOLD_BN", False)
    layers = run_generator(refine(model, meta, vol, cfg))
    assert np.array_equal(folded.pseudo, layers.pseudo)
    for key, value in layers.model.state_dict().items():
        assert torch.allclose(folded.model.state_dict()[key].float(), value.float(), atol=1e-5), key
    assert folded.iterations_done == layers.iterations_done  # (the guard's verdicts agree too)
    assert folded.notes == layers.notes


def test_the_teacher_runs_on_its_folded_copy(setup, monkeypatch):
    """The pseudo labels come from the folded teacher, refreshed before each use."""
    from napari_apl.core.models.fold import FoldedNet

    model, meta, vol = setup
    calls = _count_calls(monkeypatch, forward=(FoldedNet, "forward"), refresh=(FoldedNet, "refresh"))
    run_generator(refine(model, meta, vol, _cfg(iterations=4)))
    # the initial ensemble pass (one batch of 8 slices) and one forward per iteration
    assert calls["forward"] >= 5 and calls["refresh"] >= calls["forward"]


def test_amp_by_default_where_bf16_is_native(monkeypatch):
    """Mixed precision is the default on CUDA and on a CPU with native bf16 (a training step 1.9x
    faster there, the masks the same), float32 elsewhere; an explicit setting always wins."""
    import napari_apl.core.refine as refine_module

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native in (False, True):
        monkeypatch.setattr(refine_module, "_cpu_has_native_bf16", lambda native=native: native)
        assert refine_module.amp_enabled(None, cpu) is native
        assert refine_module.amp_enabled(None, cuda) is True
        assert (
            refine_module.amp_enabled(False, cuda) is False and refine_module.amp_enabled(True, cpu) is True
        )
    assert refine_module.amp_enabled(None, torch.device("mps")) is False


@pytest.mark.parametrize(("teacher_bf16", "expected"), [(False, torch.float32), (None, torch.bfloat16)])
def test_an_explicit_teacher_precision_wins_over_amp(setup, teacher_bf16, expected):
    """With the student in bf16 (amp), teacher_bf16=False (--teacher-precision fp32) still keeps the
    teacher's no-grad forwards in float32; left unset they follow the student into bf16."""
    model, meta, vol = setup
    net, seen = _recording_first_conv(model)
    cfg = _cfg(iterations=2, amp=True, teacher_bf16=teacher_bf16, teacher_decay=0.99)
    run_generator(refine(net, meta, vol, cfg))
    assert {d for inf, d in seen if inf} == {expected}
    assert torch.bfloat16 in {d for inf, d in seen if not inf}  # the student's steps (its batch-norm
    # re-estimation runs in float32, outside inference mode, too)


@pytest.mark.parametrize("guard_every", [1, 3])
def test_class_thresholds_refresh_every_guard_every_iterations(setup, monkeypatch, guard_every):
    """k_c and the volume's class balance are recomputed at iterations 1, 1 + g, 1 + 2g, ... (g = 1 too)."""
    from napari_apl.core import pseudo
    from napari_apl.core import refine as refine_mod

    model, meta, vol = setup
    counts = _count_calls(
        monkeypatch, k=(refine_mod._Ensemble, "class_thresholds"), cw=(pseudo, "class_balance_weights")
    )
    cfg = _cfg(
        iterations=6, guard_every=guard_every, augment="none", class_norm=0.5, class_balance_volume=True
    )
    assert cfg.class_balance  # (the default this test counts through)
    run_generator(refine(model, meta, vol, cfg))
    want = len(range(1, 7, guard_every))  # 6 for g = 1, 2 (iterations 1 and 4) for g = 3
    assert counts == {"k": want, "cw": want}


def _count_calls(monkeypatch, **targets: tuple) -> dict[str, int]:
    """Count the calls of each ``key=(owner, attribute)`` (the originals still run)."""
    counts = dict.fromkeys(targets, 0)
    for key, (owner, name) in targets.items():
        original = getattr(owner, name)

        def counting(*args, _key=key, _original=original, **kwargs):
            counts[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counting)
    return counts


def test_cbst_regenerates_its_labels_rounds_times(setup):
    """Iterations left over after rounds equal parts made extra rounds (10 iterations in 4 rounds: 5)."""
    model, meta, vol = setup
    for iterations, rounds in ((10, 4), (7, 4), (14, 3)):
        result = run_generator(
            refine(model, meta, vol, _cfg(method="cbst", iterations=iterations, rounds=rounds))
        )
        portions = [h["portion"] for h in result.history if "portion" in h]
        assert portions == pytest.approx([0.2 + 0.05 * r for r in range(rounds)]), (iterations, rounds)


def test_adapted_batch_norm_has_the_whole_volumes_statistics():
    """AdaBN weighed each batch alike (a last batch of 4 slices as much as one of 16) and ran with
    dropout on; the first batch norm's running mean is now its input's mean over every slice."""
    from napari_apl.core.models import build_model
    from napari_apl.core.refine import _adapt_bn

    torch.manual_seed(0)
    xs = torch.randn(20, 1, 32, 32) * torch.linspace(0.5, 3, 20).reshape(-1, 1, 1, 1)  # slices unlike
    stats = {}
    for dropout in (0.0, 0.5):
        torch.manual_seed(1)
        model = build_model("unet-dual", num_classes=5, base=4, dropout=dropout)
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        seen: list[torch.Tensor] = []
        hook = bns[0].register_forward_hook(lambda m, inp, out, seen=seen: seen.append(inp[0].detach()))
        with torch.no_grad():
            model.eval()
            model(xs)
            hook.remove()
            _adapt_bn(model, xs, torch.device("cpu"), mix=1.0, batch=16)
        want = seen[0].mean(dim=(0, 2, 3))
        torch.testing.assert_close(bns[0].running_mean, want, rtol=1e-4, atol=1e-5)
        assert all(m.momentum == 0.1 for m in bns) and not model.training
        stats[dropout] = [m.running_var.clone() for m in bns]
    for a, b in zip(stats[0.0], stats[0.5], strict=True):  # dropout off while the statistics are read
        torch.testing.assert_close(a, b)


def test_painted_classes_weigh_with_the_volumes_class_balance(setup, monkeypatch):
    """A class only the user's corrections hold weighed 0 under class_balance_volume: no gradient."""
    from napari_apl.core import pseudo

    model, meta, vol = setup
    start = run_generator(refine(model, meta, vol, _cfg(iterations=0, class_norm=0)))
    painted = next(c for c in range(1, 5) if not (start.pseudo == c).any())
    corr = np.full(vol.data.shape, -1, np.int16)
    corr[4:12, 4:12, :] = painted
    weights = []
    loss_ssl = pseudo.loss_ssl

    def spy(logits, target, omega, class_weight=None, **kw):
        if class_weight is not None and (target == painted).any():
            weights.append(float(class_weight[painted]))
        return loss_ssl(logits, target, omega, class_weight, **kw)

    monkeypatch.setattr(pseudo, "loss_ssl", spy)
    cfg = _cfg(iterations=3, class_norm=0, class_balance_power=0.5, class_balance_volume=True)
    run_generator(refine(model, meta, vol, cfg, corrections=corr))
    assert weights and min(weights) > 0


def test_the_students_view_of_z_scores_stays_on_their_scale():
    """The intensity augmentation works on slices stretched to [0, 1]: clipped slices stay so, z-scores
    went on to the student on [0, 1] while the teacher and every prediction read z-scores."""
    from napari_apl.core.train import _intensity_transforms, augment_intensity

    torch.manual_seed(0)
    z = torch.randn(4, 1, 32, 32) * 1.5 + 0.3
    clipped = torch.rand(4, 1, 32, 32) * 0.8
    for x in (z, clipped):
        lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
        out = augment_intensity(x, torch.Generator().manual_seed(3), 0.5, 0.5)
        base = _intensity_transforms((x - lo) / (hi - lo), torch.Generator().manual_seed(3), 0.5, 0.5)
        want = base * (hi - lo) + lo if x is z else base
        torch.testing.assert_close(out, want)
    assert float(out.min()) < 0  # (z-scores: back on their own scale, not on [0, 1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_domain_augmentation_runs_on_cuda():
    """GIN drew its kernel sizes with a CUDA generator but no device: an error on every CUDA run."""
    from napari_apl.core.train import augment_intensity

    gen = torch.Generator(device="cuda").manual_seed(0)
    out = augment_intensity(torch.rand(2, 1, 32, 32, device="cuda"), gen, 1.0, 1.0)
    assert out.is_cuda and torch.isfinite(out).all()
