"""Keeping each organ's largest connected piece."""

from __future__ import annotations

import numpy as np
import pytest

from napari_apl.core.labels import CLASS_NAMES
from napari_apl.core.postprocess import largest_components, removal_warnings, removed_fraction


def test_islands_become_background_and_the_largest_piece_stays() -> None:
    lab = np.zeros((20, 20, 6), np.uint8)
    lab[2:8, 2:8, 1:4] = 1  # liver: 108 voxels
    lab[15:17, 15:17, 2] = 1  # a liver island: 4 voxels
    lab[10:13, 2:5, 1:3] = 4  # spleen: 18 voxels
    lab[10:14, 10:14, 3:5] = 4  # a larger spleen piece: 32 voxels
    lab[18, 2, 0] = 2  # a one-voxel right kidney: one piece, kept
    out = largest_components(lab)
    assert out.dtype == lab.dtype and out is not lab
    assert (out == 1).sum() == 108 and (out[15:17, 15:17, 2] == 0).all()
    assert (out == 4).sum() == 32 and (out[10:14, 10:14, 3:5] == 4).all()
    assert (out == 2).sum() == 1
    assert (lab == 1).sum() == 112  # the input is not changed
    gone = removed_fraction(lab, out)
    assert gone[1] == pytest.approx(4 / 112) and gone[4] == pytest.approx(18 / 50)
    assert gone[2] == 0.0 and gone[3] == 0.0
    # 36 % of the spleen was outside its largest piece: flagged; 4 % of the liver: not
    (warning,) = removal_warnings(gone, CLASS_NAMES)
    assert warning.startswith("spleen: 36% of its voxels")


def test_pieces_touching_at_a_corner_are_one_piece() -> None:
    """Thick slices: cross-sections that meet only diagonally still belong to one organ."""
    lab = np.zeros((8, 8, 4), np.int16)
    lab[1:3, 1:3, 0] = 3
    lab[3:5, 3:5, 1] = 3  # touches the first square only at a corner, one slice up
    lab[6, 6, 3] = 3  # a real island
    out = largest_components(lab)
    assert (out == 3).sum() == 8 and out[6, 6, 3] == 0


def test_other_labels_and_background_are_untouched() -> None:
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 5, (16, 16, 5)).astype(np.uint8)
    out = largest_components(lab, organs=(1,))
    np.testing.assert_array_equal(out[lab != 1], lab[lab != 1])
    assert (out == 1).sum() < (lab == 1).sum()


def test_float_labels_are_refused() -> None:
    with pytest.raises(TypeError, match="integer"):
        largest_components(np.zeros((4, 4, 4), np.float32))
