"""Shared test fixtures: the real-data folder, small phantoms on disk and a tiny checkpoint."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA_ENV = "NAPARI_APL_DATA"
# Small phantoms keep the suite fast on two CPU cores (model grid 32 x 32 at 10 mm).
TINY_SHAPE = (64, 64, 12)
TINY_SPACING = (5.0, 5.0, 12.0)


def shared_data_dir() -> Path:
    """The real-data folder: ``$NAPARI_APL_DATA`` or ``<repo>/../shared/data``."""
    return Path(os.environ.get(DATA_ENV, REPO.parent / "shared" / "data")).expanduser()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real-data folder; skips the test when it is absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real data folder {path} not found (set {DATA_ENV})")
    return path


@pytest.fixture(scope="session")
def phantom_files(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Path, Path]]:
    """Factory writing a small CT phantom (image, labels) in a given orientation; cached per arguments."""
    from napari_apl.core.phantom import write_phantom

    cache: dict[tuple, tuple[Path, Path]] = {}

    def make(orientation: str = "RAS", modality: str = "ct", seed: int = 0) -> tuple[Path, Path]:
        key = (orientation, modality, seed)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"phantom_{modality}_{orientation}_{seed}")
            cache[key] = write_phantom(
                folder, modality, seed, shape=TINY_SHAPE, spacing=TINY_SPACING, orientation=orientation
            )
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained, small dual-head U-Net checkpoint (fast on CPU) for plugin tests."""
    from _tiny import write_tiny_checkpoint

    path = tmp_path_factory.mktemp("checkpoints") / "tiny_unet_dual.pt"
    return write_tiny_checkpoint(path, 0, base=8, input_size=(32, 32), spacing=(10.0, 10.0))


@pytest.fixture
def notifications(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Messages passed to napari's ``show_error`` during the test (recorded, not shown)."""
    import napari.utils.notifications as nn

    seen: list[str] = []
    monkeypatch.setattr(nn, "show_error", lambda message: seen.append(str(message)))
    return seen


class Questions(list):
    """The texts of the modal yes / no questions asked during a test; ``answer`` is what they get."""

    answer = True


@pytest.fixture(autouse=True)
def questions(monkeypatch: pytest.MonkeyPatch) -> Questions:
    """Answer the widget's modal questions without showing them (a modal box would hang a test)."""
    asked = Questions()
    try:
        from qtpy.QtWidgets import QMessageBox
    except Exception:  # no Qt binding: nothing can ask
        return asked

    def question(parent: object, title: str, text: str, *args: object, **kwargs: object) -> object:
        asked.append(text)
        return QMessageBox.StandardButton.Yes if asked.answer else QMessageBox.StandardButton.No

    monkeypatch.setattr(QMessageBox, "question", staticmethod(question))
    return asked


@pytest.fixture(autouse=True)
def _private_autosave_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Autosaves of every test go to a fresh temporary folder, never to the user's cache."""
    folder = tmp_path_factory.mktemp("autosave")
    monkeypatch.setenv("NAPARI_APL_AUTOSAVE_DIR", str(folder))
    return folder


@pytest.fixture
def autosave_dir(_private_autosave_dir: Path) -> Path:
    """The (temporary) autosave root of this test (``$NAPARI_APL_AUTOSAVE_DIR``)."""
    return _private_autosave_dir


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread: on 2 shared cores, spinning OpenMP threads make tiny models 5x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
