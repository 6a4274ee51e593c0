"""A refinement's set-up made ahead of it (``prepare_refinement``) changes none of its numbers."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from _tiny import tiny_ct_case

from napari_apl.core import refine as refine_module
from napari_apl.core.refine import METHODS, RefineConfig, prepare_refinement, refine
from napari_apl.core.utils import run_generator
from napari_apl.core.volume import volume_from_array


@pytest.fixture(scope="module")
def setup():
    """A tiny CT phantom and an untrained (but seeded) unet-dual with its metadata."""
    return tiny_ct_case(base=8)


def _cfg(**kw) -> RefineConfig:
    base = dict(iterations=4, batch_size=2, device="cpu", lr=1e-3, guard_every=2, bn="adapt", bn_mix=0.5)
    base.update(kw)
    return RefineConfig(**base)


def _same_result(a, b) -> None:
    for (k, v), w in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    assert np.array_equal(a.pseudo, b.pseudo)
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in a.history] == [
        {k: v for k, v in h.items() if k != "seconds"} for h in b.history
    ]
    assert a.organ_voxels == b.organ_voxels
    assert a.notes == b.notes


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("teacher", [0.0, 0.99])
def test_a_start_made_ahead_gives_the_same_refinement(setup, method, teacher, monkeypatch):
    model, meta, vol = setup
    cfg = _cfg(method=method, teacher_decay=teacher)
    start = prepare_refinement(model, meta, vol, cfg)
    assert start is not None and not start.used
    calls = []
    real = refine_module._set_up
    monkeypatch.setattr(refine_module, "_set_up", lambda *a, **k: calls.append(1) or real(*a, **k))
    warm = run_generator(refine(model, meta, vol, cfg, start=start))
    assert calls == [] and start.used  # the start was used: no set-up made in the run
    cold = run_generator(refine(model, meta, vol, cfg))
    assert calls == [1]
    _same_result(warm, cold)


def test_a_start_serves_one_refinement_and_never_changes_the_model(setup):
    model, meta, vol = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _cfg()
    start = prepare_refinement(model, meta, vol, cfg)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # (the batch norms were re-estimated on a copy)
    run_generator(refine(model, meta, vol, cfg, start=start))
    assert start.fits(model, meta, vol, cfg) == "it was used by a refinement already"
    again = run_generator(refine(model, meta, vol, cfg, start=start))  # made afresh, same numbers
    _same_result(again, run_generator(refine(model, meta, vol, cfg)))


def test_a_start_that_does_not_fit_is_not_used(setup):
    """Another model's weights, scan, voxel, set-up setting or checkpoint: the run makes its own set-up."""
    model, meta, vol = setup
    cfg = _cfg()
    start = prepare_refinement(model, meta, vol, cfg)
    assert start.fits(model, meta, vol, cfg) == ""
    # settings that do not touch the set-up keep it usable
    assert start.fits(model, meta, vol, dataclasses.replace(cfg, iterations=9, lr=5e-4, seed=3)) == ""

    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    assert start.fits(other, meta, vol, cfg) == "the model's weights changed"
    changes = [
        dict(bn_mix=0.25),
        dict(bn="frozen"),
        dict(channels_last=not cfg.channels_last),
        dict(teacher_decay=0.0 if cfg.teacher_decay else 0.99),
        dict(normalization={"kind": "zscore"}),
    ]
    for change in changes:
        assert start.fits(model, meta, vol, dataclasses.replace(cfg, **change)) == (
            "the refinement's settings changed"
        ), change
    data = np.array(vol.data, copy=True)
    data[3, 4, data.shape[2] // 2] += 7  # one voxel of the middle slice
    assert start.fits(model, meta, volume_from_array(data, vol.affine), cfg) == "the scan's voxels changed"
    shifted = np.array(vol.affine, dtype=float)
    shifted[0, 3] += 5
    assert start.fits(model, meta, volume_from_array(np.asarray(vol.data), shifted), cfg) == "another scan"
    assert start.fits(
        model, dataclasses.replace(meta, class_names=[*meta.class_names[:-1], "x"]), vol, cfg
    ) == ("another checkpoint")
    # a start that does not fit is left unused and the run is the cold one
    res = run_generator(refine(other, meta, vol, cfg, start=start))
    assert not start.used
    _same_result(res, run_generator(refine(other, meta, vol, cfg)))


def test_a_voxel_changed_in_place_anywhere_is_seen(setup):
    """In-memory voxels are compared whole (not only the probed slices), also through a transposed view."""
    model, meta, vol = setup
    cfg = _cfg()
    layer_data = np.ascontiguousarray(np.transpose(np.asarray(vol.data), (2, 1, 0)))  # (as a layer holds it)
    view = volume_from_array(layer_data.transpose(2, 1, 0), vol.affine)
    start = prepare_refinement(model, meta, view, cfg)
    assert start.fits(model, meta, view, cfg) == ""
    z = layer_data.shape[0]
    unprobed = [k for k in range(z) if k not in (0, z // 2, z - 1)]  # none of the three probed slices
    assert unprobed, "the phantom needs a slice the probe does not read"
    layer_data[unprobed[0], 2, 3] += 5
    assert start.fits(model, meta, view, cfg) == "the scan's voxels changed"


def test_preparing_can_be_cancelled(setup):
    model, meta, vol = setup
    polls = []

    def cancelled() -> bool:
        polls.append(1)
        return len(polls) > 2

    assert prepare_refinement(model, meta, vol, _cfg(), cancelled=cancelled) is None
    assert len(polls) == 3  # stopped at the first poll that said so


def test_a_start_is_of_the_torch_thread_count_it_was_made_with(setup):
    """Sums split over another number of threads round differently: such a start does not fit."""
    model, meta, vol = setup
    cfg = _cfg()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = prepare_refinement(model, meta, vol, cfg)
        assert start.fits(model, meta, vol, cfg) == ""
    finally:
        torch.set_num_threads(before)
    if before != 1:
        assert start.fits(model, meta, vol, cfg) == "another number of torch threads"


def test_voxels_changed_while_the_start_is_made_make_it_not_fit(setup):
    """The scan is checked against the voxels as they were when the set-up began, not when it ended."""
    model, meta, vol = setup
    cfg = _cfg()
    data = np.array(vol.data, copy=True)
    view = volume_from_array(data, vol.affine)
    polls = []

    def edit_once() -> bool:  # called between the set-up's batches: the user edits the scan meanwhile
        if not polls:
            data[2, 3, 1] += 9
        polls.append(1)
        return False

    start = prepare_refinement(model, meta, view, cfg, cancelled=edit_once)
    assert start is not None and len(polls) > 1
    assert start.fits(model, meta, view, cfg) == "the scan's voxels changed"


def test_a_refinements_own_set_up_reads_no_extra_slices(setup, monkeypatch):
    """Only a start made ahead reads the probe slices (a lazy file read out of order would slow down)."""
    model, meta, vol = setup
    probed = []
    real = refine_module._probe_slices
    monkeypatch.setattr(refine_module, "_probe_slices", lambda v: probed.append(1) or real(v))
    run_generator(refine(model, meta, vol, _cfg(iterations=1)))
    assert probed == []
    start = prepare_refinement(model, meta, vol, _cfg(iterations=1))
    assert probed == [1]
    run_generator(refine(model, meta, vol, _cfg(iterations=1), start=start))
    assert probed == [1, 1] and start.used
