"""State and actions of the APL widget, with no Qt widgets: tests drive it without clicking.

The controller owns the model, the last prediction and the user's corrections, and runs the core's
generators (``core.infer.iter_predict``, ``core.refine.refine``) either synchronously (``sync=True``,
for tests and scripts) or in a napari thread worker. Layers are only touched in the ``yielded`` /
``returned`` handlers, which run on the main thread in both modes. Every failure becomes a one-line
napari notification (``_layers.notify_error``), never an exception dialog.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import gc
import hashlib
import io
import json
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_warning
from psygnal import Signal

from .._layers import (
    META_KEY,
    ScanGeometry,
    canonical_transform_kwargs,
    confidence_colormap,
    geometry_of,
    label_colormap,
    label_features,
    make_metadata,
    notify_error,
    one_line,
    same_layer,
    to_canonical_order,
    to_layer_order,
    transform_kwargs,
    unwrap_layer,
    volume_from_layer,
    voxel_volume_ml,
)
from .._sample_data import demo_checkpoint_path
from ..core.autosave import AutosaveEntry, Autosaver, find_autosaves, image_digest, in_use, session_key
from ..core.autosave import discard as discard_autosave
from ..core.autosave import restore as restore_autosave
from ..core.checkpoint import (
    CheckpointMeta,
    describe,
    load_checkpoint,
    refinement_history,
    save_checkpoint,
)
from ..core.errors import APLError, CheckpointError, OutputError, OutputExistsError
from ..core.infer import Prediction, SlicePredictor, iter_predict, write_map
from ..core.io_utils import atomic_write, check_output_path, staged_outputs
from ..core.labels import CLASS_NAMES, ORGANS
from ..core.memory import release_in_background
from ..core.metrics import evaluate, json_number, label_name, label_volume
from ..core.postprocess import clean_masks, removal_warnings
from ..core.preprocess import PRESETS, Normalization, choose_normalization
from ..core.refine import (
    RefineConfig,
    RefineControl,
    RefineEvent,
    RefineResult,
    RefineStart,
    check_corrections,
    organ_size_change,
    prepare_refinement,
    refine,
    setup_key,
)
from ..core.utils import release_device_memory, resolve_device, warm_up_optimiser
from ..core.volume import save_canonical

log = logging.getLogger(__name__)
# between the lazy hidden layers' builds: lets napari slice and paint the visible layer first
_LAZY_STEP_MS = 50

# Names of the layers the widget creates (and updates in place on re-predict).
LAYER_MAIN = "main"
LAYER_AUX = "auxiliary"
LAYER_PSEUDO = "pseudo-label"
LAYER_CONFIDENCE = "confidence ω"
LAYER_CONSISTENCY = "consistency"
PREDICTION_LAYERS = (LAYER_MAIN, LAYER_AUX, LAYER_PSEUDO, LAYER_CONFIDENCE, LAYER_CONSISTENCY)
PREDICTION_ROLES = ("main", "auxiliary", "pseudo-label", "confidence", "consistency")
MAP_FILE_ROLES = ("confidence map", "consistency map")  # (the reader's roles of reopened map files)
_OMEGA_COLORMAP = "ω doubt"  # stands for _layers.confidence_colormap(): unsure voxels bright
# (layer name, map name, metadata role, colormap, layer type) of the five prediction layers
_LAYERS = (
    (LAYER_MAIN, "main", "main", None, Labels),
    (LAYER_AUX, "aux", "auxiliary", None, Labels),
    (LAYER_CONFIDENCE, "confidence", "confidence", _OMEGA_COLORMAP, Image),
    (LAYER_CONSISTENCY, "consistency", "consistency", "inferno", Image),
    (LAYER_PSEUDO, "pseudo_label", "pseudo-label", None, Labels),
)
CHECKPOINT_PRESET = "from checkpoint"
AUTO_PRESET = "auto"
_STAGE_PAUSE_MS = 5  # between the hidden result layers' updates after a refinement
# the longest a worker waits for a stage to be taken: the event loop may have stopped (the app quits)
_STAGE_WAIT_S = 10.0
LIVE_UPDATE_SECONDS = 0.5  # at most ~2 pseudo-label updates per second while refining
AUTOSAVE_INTERVAL_ENV = "NAPARI_APL_AUTOSAVE_INTERVAL"
AUTOSAVE_INTERVAL_S = 30.0  # crash-recovery snapshots at most this often (painting, refining)
CLOSE_WAIT_S = 10.0  # how long closing waits for a stopped refinement to end


def _task_threads(cores: int, available: int) -> int:
    """Torch threads for a viewer task: one fewer than the cores from three cores up, all of them below.

    On two cores one thread made a refinement iteration take 0.96-1.02 s against 0.63-0.75 s in the
    goal-4 benchmark, while the GUI thread, asleep in Qt's event loop between events, gets its time
    slices anyway (p99 tick gap 33-41 ms against 22 ms, both under the 50 ms goal).
    """
    wanted = cores - 1 if cores > 2 else cores
    return max(1, min(available, wanted))


_threads_lock = threading.Lock()
_threads_users = 0  # tasks inside _leave_a_core_for_the_gui now
_threads_before = 0  # torch's thread count when the first of them began


@contextmanager
def _leave_a_core_for_the_gui() -> Iterator[None]:
    """Run a task with ``_task_threads`` torch threads, so that the viewer stays responsive.

    torch's thread count is kept per thread (``set_num_threads`` also sets the count threads start
    with). Tasks that overlap (a worker and the refinement's set-up made ahead, two viewers' workers)
    all run with the count the first of them chose, so the set-up made ahead computes as the
    refinement's own would. Each gives its thread's count back as it ends, and the last one the count
    the first found.
    """
    global _threads_users, _threads_before
    import torch

    with _threads_lock:
        mine = torch.get_num_threads()
        if _threads_users == 0:
            _threads_before = mine
        torch.set_num_threads(_task_threads(os.cpu_count() or 2, _threads_before))
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            torch.set_num_threads(_threads_before if _threads_users == 0 else mine)


def _autosave_interval_from_env() -> float:
    """The autosave interval: ``$NAPARI_APL_AUTOSAVE_INTERVAL`` seconds, else ``AUTOSAVE_INTERVAL_S``."""
    text = os.environ.get(AUTOSAVE_INTERVAL_ENV, "").strip()
    try:
        value = float(text) if text else AUTOSAVE_INTERVAL_S
    except ValueError:
        value = AUTOSAVE_INTERVAL_S
    return value if math.isfinite(value) and value >= 0 else AUTOSAVE_INTERVAL_S


_LABELS_WARM: list[bool] = []


def _warm_up_labels_layer() -> None:
    """Do, once per process as the widget opens, the one-time work of a viewer's first Labels layer.

    That first layer imports pandas (its features table), scikit-image and parts of SciPy, and its
    polygon-drawing overlay makes vispy build its table of line dash patterns (cached after): together
    about 0.6 s on two cores that the first Predict spent before the visible slice could be drawn.
    """
    if _LABELS_WARM:
        return
    _LABELS_WARM.append(True)
    try:
        Labels(np.zeros((2, 2), np.uint8), features=label_features(CLASS_NAMES))
        from vispy.visuals.line.dash_atlas import DashAtlas  # (no GL context needed)

        DashAtlas()
    except Exception as exc:  # only a head start: the first Predict builds its layer either way
        log.debug("napari-apl: warming up for the first Labels layer failed: %s", exc)


def _process_qt_events() -> None:
    """Deliver pending Qt events (worker signals) when a Qt application runs; else do nothing."""
    try:
        from qtpy.QtCore import QCoreApplication
    except Exception:  # no Qt binding: nothing to deliver
        return
    app = QCoreApplication.instance()
    if app is not None:
        app.processEvents()


def _merge_corrections(older: np.ndarray | None, newer: np.ndarray | None) -> np.ndarray | None:
    """Corrections of ``older`` with the painted voxels of ``newer`` on top (shapes must match)."""
    if older is None:
        return None if newer is None else newer.copy()
    out = np.array(older, dtype=np.int16, copy=True)
    if newer is not None and newer.shape == out.shape:
        painted = newer >= 0
        out[painted] = newer[painted]
    return out


def _scan_name(geometry: ScanGeometry | None, image_layer: Any) -> str | None:
    """A scan's name for provenance: its file's name (as the command line records it), else its layer's."""
    if geometry is not None and geometry.path is not None:
        return Path(geometry.path).name
    if image_layer is not None:
        return str(image_layer.name)
    return geometry.name if geometry is not None else None


_ITERATIONS_OVER = object()  # what a refinement's worker yields when its loop has ended


class _SparseCorrections:
    """A corrections volume (-1 = not painted) kept as its painted voxels only."""

    def __init__(self, corrections: np.ndarray) -> None:
        self.shape = tuple(corrections.shape)
        self.order = "F" if corrections.flags.f_contiguous and not corrections.flags.c_contiguous else "C"
        where = np.nonzero(corrections >= 0)
        self.index = np.ravel_multi_index(where, self.shape)
        self.values = corrections[where].astype(np.int16)

    def dense(self) -> np.ndarray:
        """The full volume again (in its memory order)."""
        out = np.full(self.shape, -1, dtype=np.int16, order=self.order)
        out[np.unravel_index(self.index, self.shape)] = self.values
        return out


class _Ahead:
    """A refinement's set-up made in a background thread for the next Refine (``prepare_refinement``).

    It is of one image layer (and its data), one model object and the set-up settings ``key``; Refine
    takes it when all of them are still those, and the refinement checks the weights and voxels again.
    """

    def __init__(
        self,
        layer: Any,
        model: Any,
        meta: CheckpointMeta,
        volume: Any,
        cfg: RefineConfig,
        after: list[threading.Thread] = (),  # type: ignore[assignment]
    ) -> None:
        # (the layer weakly: a thread still running must not keep a closed viewer's layer alive)
        self.layer, self.data, self.model = weakref.ref(layer), layer.data, model
        self.key = setup_key(cfg)
        self._cancel = threading.Event()
        self.start: RefineStart | None = None
        self.thread = threading.Thread(
            target=self._make,
            args=(model, meta, volume, cfg, list(after)),
            name="napari-apl-prepare",
            daemon=True,
        )
        self.thread.start()

    def _make(
        self, model: Any, meta: CheckpointMeta, volume: Any, cfg: RefineConfig, after: list[threading.Thread]
    ) -> None:
        for earlier in after:  # set-ups cancelled before this one end first: one at a time on the cores
            earlier.join()
        if self._cancel.is_set():
            return
        try:
            with _leave_a_core_for_the_gui():  # (the refinement's worker computes with these threads)
                self.start = prepare_refinement(model, meta, volume, cfg, cancelled=self._cancel.is_set)
        except Exception as exc:  # the refinement makes its own set-up then (and reports what fails)
            log.info("napari-apl: preparing the next refinement failed: %s", exc)

    def serves(self, layer: Any, model: Any, cfg: RefineConfig) -> bool:
        """Whether this set-up is for a refinement of ``model`` on ``layer`` with ``cfg``."""
        same = layer is self.layer() and layer.data is self.data and model is self.model
        return same and self.key == setup_key(cfg)

    def cancel(self) -> None:
        """Stop making it (within a batch of slices); ``result`` is then ``None``."""
        self._cancel.set()

    def result(self) -> RefineStart | None:
        """Wait for the set-up and return it (``None`` if it was cancelled or failed)."""
        self.thread.join()
        return self.start


def _same_grid(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Whether two voxel-to-world affines put every corner of a ``shape`` volume within half a voxel."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0]) for j in (0, shape[1]) for k in (0, shape[2])])
    apart = np.linalg.norm((corners @ (a - b).T)[:, :3], axis=1)
    return bool(np.all(apart <= 0.5 * float(np.linalg.norm(b[:3, :3], axis=0).min())))


class APLController:
    """Model, prediction, corrections and the long-running tasks of the APL widget."""

    status = Signal(str)
    busy_changed = Signal(bool)
    model_changed = Signal(str)
    predicted = Signal()
    refine_event = Signal(object)
    refine_finished = Signal(object)
    recovery_changed = Signal(object)  # the AutosaveEntry offered for recovery, or None
    autosaved = Signal(object)  # the AutosaveEntry just written
    corrections_changed = Signal()
    iterations_ended = Signal()  # a refinement's loop is over: the refined model predicts the scan now
    labels_reset = Signal()  # the pseudo-label layer shows the model's labels again (corrections cleared)

    def __init__(self, viewer: Any) -> None:
        # torch's first optimiser imports its compiler stack (1.6 s under the GIL): done once, as the
        # widget opens, and not in a worker thread while the user works (in the first refinement it
        # stalled the event loop up to 0.23 s at a time; in a background thread beside the first
        # Predict, 1.3 s)
        warm_up_optimiser()
        _warm_up_labels_layer()
        self.viewer = viewer
        self.model: Any = None
        self.meta: CheckpointMeta | None = None
        self.checkpoint_path: Path | None = None
        self.summary = ""
        self.refined = False
        # the refinements the loaded model went through in this session (oldest first), each as its
        # refined.pt provenance records it; the one running, until it ends
        self._refinements: list[dict[str, Any]] = []
        self._refining: dict[str, Any] | None = None
        self._loaded_history: list[dict[str, Any]] = []  # the refinements the loaded checkpoint went through
        self.repredicting = False  # a refinement's final prediction with the refined model is running
        self.device = "auto"
        self.preset = AUTO_PRESET
        self.image_layer: Any = None
        self.geometry: ScanGeometry | None = None
        self.prediction: Prediction | None = None
        self.last_pseudo: np.ndarray | None = None
        self.corrections: np.ndarray | None = None
        self.shown_version = 0  # changes whenever the pseudo-label layer shows other labels
        self._refined_on: str | None = None  # autosave key of the scan the refined model was made on
        self.last_corrections: np.ndarray | None = None
        self.history: list[dict[str, Any]] = []
        self.last_result: RefineResult | None = None
        self.last_config: RefineConfig | None = None
        self.control: RefineControl | None = None
        self.worker: Any = None
        self.live_updates = 0
        self._busy = False
        self._task = ""
        self._pbar: Any = None
        self._last_live = 0.0
        self._live_buffer: np.ndarray | None = None  # the pseudo layer's data while overlays are live
        self._locked: list[Any] = []  # pseudo-label layers locked during a task (renamed or not)
        self.error_shown = ""  # the last error message
        self._notes_shown: set[str] = set()
        self._auto_notes_shown: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
        # -- crash recovery ---------
        self.autosave_enabled = True
        self.autosave_interval = _autosave_interval_from_env()
        self.autosaver: Autosaver | None = None
        self.recoverable: AutosaveEntry | None = None
        self.autosaves_written = 0
        self.confirm_close: Callable[[], bool] = lambda: True
        """Asked when the viewer closes during a refinement; ``False`` keeps the window open."""
        self.confirm: Callable[[str], bool] = lambda question: True
        """Asked (yes / no) before the user's work is thrown away: an unexported refined model, painting."""
        self._exported_version: int | None = None  # the refined model version last exported
        self._warned: set[tuple[str, str]] = set()  # (warning, session key): autosave warnings given once
        self._adapted_normalization: dict | None = None  # the intensities the refined model was adapted to
        self._layers_source: dict[str, Any] | None = None  # the model that made the prediction layers
        # painted corrections belong to a scan (its autosave key and a digest of its voxels), not to a
        # layer: a scan closed and opened again, or opened twice, has the same ones (and one autosave)
        self._corrections_owner: tuple[str, str | None] | None = None  # the scan ``corrections`` are of
        # other scans' corrections, kept sparse (their painted voxels only: a closed scan's stay too)
        self._stashed: dict[tuple[str, str | None], _SparseCorrections] = {}
        self._recovery_layer: Any = None
        self._pending_recovery: np.ndarray | None = None
        self._own_keys: set[str] = set()
        # the autosave folder of each image this session saved or recovered: its saver goes on there (two
        # viewers of one scan save into folders of their own)
        self._own_folders: dict[str, Path] = {}
        # each image's saver stays (and holds its folder) while another image is shown: its session is
        # still open in this viewer, not a crashed one for another viewer to take or discard
        self._savers: dict[str, Autosaver] = {}
        self._offered_keys: set[str] = set()  # offered for recovery, not yet recovered or discarded
        self._model_version = 0
        self._autosaved_state: tuple[str | None, int | None] = (None, None)
        self._last_autosave_check = -math.inf
        self._autosave_warned = False
        self._lazy_token: object | None = None  # identifies the lazy layers waiting to be added
        self._closing = False
        self._shutting_down = False
        # -- the next refinement's set-up, made ahead ---------
        self.refine_settings: Callable[[], RefineConfig] = RefineConfig
        """The settings Refine would run with now (the Refine panel's): the set-up made ahead is for them."""
        self.prepare_ahead = True
        """After Predict and after a refinement, make the next refinement's set-up (the slices on the model
        grid, the batch-norm re-estimation, the initial pseudo labels) in a background thread, so that a
        Refine clicked later starts its iterations at once (``core.refine.prepare_refinement``)."""
        self._ahead: _Ahead | None = None
        self._cancelled_aheads: list[_Ahead] = []  # cancelled, maybe still running: shutdown waits for them
        # (its scan's voxels are let go of with the scan's layer)
        viewer.layers.events.removed.connect(self._drop_ahead_of_closed_layer)

    # -- state ---------
    @property
    def busy(self) -> bool:
        """Whether a prediction or refinement is running."""
        return self._busy

    @property
    def task(self) -> str:
        """Name of the running task (``""`` when idle)."""
        return self._task if self._busy else ""

    def _set_busy(self, busy: bool, task: str = "") -> None:
        self._busy = busy
        self._task = task if busy else ""
        self.busy_changed.emit(busy)

    def error(self, exc: BaseException | str) -> str:
        """Report a failure as a one-line notification and in the status line; return the message."""
        if isinstance(exc, BaseException) and not isinstance(exc, APLError):
            log.error("napari-apl task failed", exc_info=exc)
        msg = notify_error(exc)
        self.error_shown = msg  # (the widget clears it from its status line once it no longer applies)
        self.status.emit(msg)
        return msg

    def _guard(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn``; a failure becomes a notification and ``None`` is returned."""
        try:
            return fn()
        except Exception as exc:
            self.error(exc)
            return None

    # -- model ---------
    def load_checkpoint(
        self, path: str | os.PathLike | None = None, question: str | None = None
    ) -> str | None:
        """Load a checkpoint (``None`` = the bundled demo model); return its summary, or ``None`` on error.

        An unexported refined model is only replaced if ``confirm`` says yes (``question``, or a default).
        """
        return self._guard(lambda: self._load(path, question))

    @property
    def unsaved_refinement(self) -> bool:
        """Whether the model is refined and that refined model has not been exported."""
        return self.refined and self._exported_version != self._model_version

    def _load(self, path: str | os.PathLike | None, question: str | None = None) -> str | None:
        if self.busy:
            raise APLError(f"{self._task} is running: stop it before loading another model")
        if path is None or str(path) == "":
            path = demo_checkpoint_path()
            if path is None:
                raise CheckpointError(
                    "the bundled demo checkpoint resources/demo_unet_dual.pt is missing: "
                    "choose a checkpoint file"
                )
        p = Path(path).expanduser()
        model, meta = load_checkpoint(p, class_names=CLASS_NAMES)
        if self.unsaved_refinement and not self.confirm(
            question or f"The refined model has not been exported. Discard it and load {p.name}?"
        ):
            self.status.emit(f"kept the refined model: {p.name} was not loaded")
            return None
        self.model, self.meta, self.checkpoint_path = model, meta, p
        self._drop_ahead()  # (made for the model replaced)
        self.refined = False
        self._refined_on = None
        self._refinements = []
        self._loaded_history = refinement_history(meta.provenance)  # (a refined model's refinements)
        self._adapted_normalization = None
        self._model_version += 1
        self.last_result = None
        self.history = []
        lines = describe((model, meta)).splitlines()
        lines = [ln for ln in lines if not ln.startswith("file:")] + [f"file: {p}"]
        self.summary = "\n".join(lines)
        self.model_changed.emit(self.summary)
        self.status.emit(f"loaded {p.name}")
        # an autosaved refined model is let go of now, of every scan of the session: a crash before the
        # next stroke or run would otherwise offer back the model just discarded; and the scans' snapshots
        # name the checkpoint now loaded (what Recover loads and Revert goes back to)
        for saver in list(self._savers.values()):
            try:
                saver.drop_model(checkpoint=p)
            except Exception as exc:
                self._warn_autosave(exc)
        self.maybe_autosave(force=True)
        return self.summary

    def revert(self, sync: bool = False) -> bool:
        """Go back to the loaded checkpoint's weights (and re-predict if there is a prediction)."""
        if self.checkpoint_path is None:
            self.error("no checkpoint loaded: choose a checkpoint or the demo model first")
            return False
        question = (
            f"The refined model has not been exported. Discard it and go back to {self.checkpoint_path.name}?"
        )
        if self.load_checkpoint(self.checkpoint_path, question) is None:
            return False
        if self.prediction is not None and self._layer_alive(self.image_layer):
            self.predict(self.image_layer, sync=sync)
        return True

    def normalization(self, data: Any = None, source: Any = None) -> Normalization | None:
        """The intensity normalisation chosen (``None`` = the checkpoint's; ``auto`` looks at ``data``).

        A note of ``auto`` (e.g. CT stored as HU + 1024) is shown once per ``source`` layer, not at
        every Predict and Refine of the same scan.
        """
        # the model's own: a refined model's is the one it was adapted to (what its export records)
        own = self._adapted_normalization
        if self.preset in (None, "", CHECKPOINT_PRESET):
            return Normalization.from_dict(own) if own else None
        if self.preset == AUTO_PRESET:
            if data is None or self.meta is None:
                return None
            notes: list[str] = []
            norm = choose_normalization(AUTO_PRESET, own or self.meta.normalization, data, notes)
            shown: set[str] = set()
            if source is not None:
                try:
                    shown = self._auto_notes_shown.setdefault(source, set())
                except TypeError:  # not weakly referable: show the notes every time
                    pass
            for line in notes:
                if line not in shown:
                    shown.add(line)
                    show_warning(f"napari-apl: {line}")
            return norm
        if self.preset not in PRESETS:
            raise APLError(f"unknown intensity preset '{self.preset}': choose one of {', '.join(PRESETS)}")
        return PRESETS[self.preset]

    def _layer_alive(self, layer: Any) -> bool:
        return layer is not None and layer in self.viewer.layers

    def _check_ready(self, image_layer: Any) -> None:
        if self.busy:
            raise APLError(f"{self._task} is running: wait for it or stop it")
        if self.model is None or self.meta is None:
            raise APLError("no model loaded: choose a checkpoint file or the demo model and load it")
        if image_layer is None:
            raise APLError("no image layer chosen: open a CT scan (File > Open) and choose it")
        if not self._layer_alive(image_layer):  # (e.g. the last scan used, closed since)
            raise APLError(
                f"the image '{image_layer.name}' is no longer in the viewer: open a scan and choose it"
            )
        self._check_layer_names()
        resolve_device(self.device)

    def _check_layer_names(self) -> None:
        """Refuse when a layer of the user's holds a name the prediction layers need."""
        for name in PREDICTION_LAYERS:
            if name in self.viewer.layers and not is_prediction_layer(self.viewer.layers[name]):
                raise APLError(
                    f"a layer named '{name}' that napari-apl did not make is in the way: rename it "
                    "(the prediction layers take that name) and press Predict"
                )

    # -- running tasks ---------
    def _run(
        self,
        task: str,
        job: Callable[[], Generator[Any, None, Any]],
        on_yield: Callable[[Any], None],
        on_return: Callable[[Any], None],
        total: int,
        sync: bool,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        """Run a generator job in a napari thread worker (or here when ``sync``), with napari progress.

        ``on_done`` runs on the main thread when the job has ended, however it ended.
        """
        from napari.utils import progress

        self._set_busy(True, task)
        # A full garbage collection walks every object of the napari process while holding the GIL
        # (hundreds of ms); one triggered by the worker's allocations would stall the event loop. Objects
        # alive now are set aside from collection until the task ends.
        gc.freeze()
        self._pbar = progress(total=max(1, total), desc=f"napari-apl: {task}")
        self.status.emit(f"{task}…")

        device = self.device

        def body() -> Generator[Any, None, Any]:
            with _leave_a_core_for_the_gui():
                try:
                    return (yield from job())
                except RuntimeError as exc:
                    # (torch's errors are mostly RuntimeErrors, CUDA's out-of-memory too.) superqt's worker
                    # takes a RuntimeError for a deleted Qt object and ends without 'errored' or 'finished':
                    # the widget would stay busy for good. It goes on as a one-line APLError instead.
                    log.error("napari-apl task failed", exc_info=exc)
                    raise APLError(one_line(exc)) from exc
                finally:  # give cached GPU memory back, also after a stop or an error
                    release_device_memory(resolve_device(device))

        if sync:
            try:
                gen = body()
                while True:
                    try:
                        item = next(gen)
                    except StopIteration as stop:
                        on_return(stop.value)
                        break
                    on_yield(item)
            except Exception as exc:
                self.error(exc)
            finally:
                self._finish(on_done)
            return

        from napari.qt.threading import create_worker

        gen = body()

        def drive() -> Generator[Any, None, Any]:
            return (yield from gen)

        def finished() -> None:
            # a quit worker (viewer or panel closed) leaves its generator suspended, not closed: its
            # finally blocks (the predictor's helper thread, device memory) would wait for a garbage
            # collection that never comes while anything holds the worker. It is done now, here.
            self._guard(gen.close)
            self._finish(on_done)

        worker = create_worker(drive, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(lambda item: self._guard(lambda: on_yield(item)))
        worker.returned.connect(lambda value: self._guard(lambda: on_return(value)))
        worker.errored.connect(self.error)
        worker.finished.connect(finished)
        self.worker = worker
        worker.start()

    def _finish(self, on_done: Callable[[], None] | None = None) -> None:
        # (from the worker's 'finished' signal, outside any guard: nothing here may leave the widget busy
        # or raise into Qt as a traceback dialog)
        gc.unfreeze()
        self._guard(self._drop_lazy_layers)
        pbar, self._pbar = self._pbar, None
        if pbar is not None:
            self._guard(pbar.close)
        self.worker = None
        self.control = None
        self._pending_recovery = None
        self._guard(lambda: self._set_pseudo_editable(True))
        self._set_busy(False)
        if on_done is not None:
            self._guard(on_done)

    def _progress(self, n: int, total: int | None = None) -> None:
        if self._pbar is not None:
            if total is not None and self._pbar.total != total:
                self._pbar.total = max(1, total)
            self._pbar.n = n
            self._pbar.refresh()

    def _run_config(self, cfg: RefineConfig, norm: Normalization | None) -> RefineConfig:
        """``cfg`` as the widget runs it: on its device, with the intensities chosen, live overlays."""
        return dataclasses.replace(
            cfg,
            device=self.device,
            normalization=norm.to_dict() if norm is not None else cfg.normalization,
            emit_every=cfg.emit_every,  # live overlays call each event's labels() when due
            guard_spread=True,  # no iteration carries the whole collapse check: the overlay keeps up
        ).validate()

    def _ahead_inputs(self, image_layer: Any) -> tuple[Any, RefineConfig]:
        """The volume of ``image_layer`` and the settings Refine would run with on it now."""
        volume = volume_from_layer(image_layer)
        return volume, self._run_config(self.refine_settings(), self.normalization(volume.data, image_layer))

    def _prepare_next(self, image_layer: Any) -> None:
        """Start making the next refinement's set-up on ``image_layer`` in the background."""
        self._drop_ahead()
        if not self.prepare_ahead or self._closing or self.model is None or self.meta is None:
            return
        try:
            volume, cfg = self._ahead_inputs(image_layer)
            running = [a.thread for a in self._cancelled_aheads]
            self._ahead = _Ahead(image_layer, self.model, self.meta, volume, cfg, after=running)
        except Exception as exc:  # (Refine reports what is wrong, if anything, when it is clicked)
            log.info("napari-apl: the next refinement's set-up was not started: %s", exc)

    def refresh_ahead(self) -> None:
        """Make the next refinement's set-up again if a setting it depends on changed (the BN target
        share, the intensity preset, the device) since it was started."""
        ahead = self._ahead
        if ahead is None or self.busy:  # (none made yet, or a task that makes one when it ends)
            return
        layer = ahead.layer()
        if layer is None or layer not in self.viewer.layers:
            self._drop_ahead()
            return
        try:
            changed = ahead.key != setup_key(
                self._ahead_inputs(layer)[1]
            )  # (an unusable device is refused here: Refine says so)
        except Exception as exc:  # (Refine reports what is wrong, if anything, when it is clicked)
            log.info("napari-apl: the next refinement's set-up was not remade: %s", exc)
            self._drop_ahead()  # (made for settings that are no longer chosen)
            return
        if changed:
            self._prepare_next(layer)

    def _drop_ahead_of_closed_layer(self, event: Any = None) -> None:
        """Cancel the set-up made ahead when its image layer is no longer in the viewer."""
        ahead = self._ahead
        if ahead is not None and ahead.layer() not in self.viewer.layers:
            self._drop_ahead()

    def _drop_ahead(self) -> _Ahead | None:
        """Cancel the set-up made ahead, if any (returned; its thread may still run until its next batch)."""
        ahead, self._ahead = self._ahead, None
        self._cancelled_aheads = [a for a in self._cancelled_aheads if a.thread.is_alive()]
        if ahead is not None:
            ahead.cancel()
            self._cancelled_aheads.append(ahead)
        return ahead

    # -- predict ---------
    def predict(self, image_layer: Any = None, sync: bool = False) -> bool:
        """Predict the image layer with both heads; adds/updates the five prediction layers.

        In the background (``sync=False``) the pseudo-label layer appears at once, holding a lazy array
        whose visible slice is predicted when napari draws it (prediction layers that exist already go
        lazy in place, new hidden ones follow one at a time), while the worker fills the whole volume;
        then every layer gets the finished maps and the pseudo-label layer becomes paintable again.
        """
        image_layer = image_layer if image_layer is not None else self.image_layer
        try:
            self._check_ready(image_layer)
            volume = volume_from_layer(image_layer)
            geometry = ScanGeometry.from_volume(volume)
            norm = self.normalization(volume.data, image_layer)
            predictor = SlicePredictor(self.model, self.meta, volume, normalization=norm, device=self.device)
        except Exception as exc:
            self.error(exc)
            return False
        model, meta, source = self.model, self.meta, self._model_source()
        self._closing = False
        self._drop_ahead()  # (made again once this prediction is shown)
        # in 3-D napari would ask a lazy layer for the whole volume on the main thread: not there
        show_at_once = not sync and int(self.viewer.dims.ndisplay) == 2

        def job() -> Generator[Any, None, Prediction]:
            return (yield from iter_predict(model, meta, volume, predictor=predictor))

        def on_yield(item: tuple[int, int]) -> None:
            self._progress(*item)

        def on_return(pred: Prediction) -> None:
            if not self._layer_alive(image_layer):  # closed while it was predicted: no layers come back
                self.status.emit(f"'{image_layer.name}' was closed during Predict: its prediction is dropped")
                return
            self._show_prediction(image_layer, geometry, pred, source)
            self.status.emit(f"predicted {image_layer.name}")
            self._prepare_next(image_layer)

        later: list[tuple] = []
        if show_at_once:
            # _run sets the objects alive now aside from garbage collection; done already here, so that
            # building the layer cannot set off a full collection first (0.3-0.5 s measured in a fresh
            # session's first Predict, before its visible slice was drawn)
            gc.freeze()
            try:
                later = self._show_lazy(image_layer, geometry, predictor)
            except Exception as exc:  # the layers can wait for the finished maps
                log.warning("napari-apl: showing the prediction slice by slice failed: %s", exc)
        self._run("predict", job, on_yield, on_return, int(volume.shape[2]), sync)
        # the hidden layers are queued only now: napari's progress bar, made in _run, lets the event loop
        # run, and building them there (about 0.2 s each) would come before the visible slice is drawn
        if later:
            self._add_hidden_later(later, image_layer, geometry, {"image": image_layer.name})
        return True

    def _show_lazy(self, image_layer: Any, geometry: ScanGeometry, predictor: SlicePredictor) -> list[tuple]:
        """Show the prediction layers backed by ``predictor`` (slices computed when drawn): the visible
        pseudo-label layer now (others already in the viewer in place); returns the new hidden ones, for
        ``_add_hidden_later``."""
        self.collect_corrections()  # keep what was painted before the layers change
        # _show_prediction makes the new image, its maps and its corrections current, once they are done
        with self._layers_of(image_layer, geometry):
            arrays = predictor.as_layer_arrays()
            base = {"image": image_layer.name}
            later = []
            for name, key, role, cmap, kind in _LAYERS:
                layer = self._existing(name, kind)
                if layer is not None:
                    self._update_in_place(layer, arrays[key], role, base)
                elif key == "pseudo_label":
                    self._add_labels(name, arrays[key], role, visible=True, **base)
                else:
                    later.append((name, arrays[key], role, cmap, kind))
            self._set_pseudo_editable(False)  # a lazy layer cannot be painted: until the maps are done
        return later

    @contextmanager
    def _layers_of(self, image_layer: Any, geometry: ScanGeometry) -> Iterator[None]:
        """Make ``image_layer`` and ``geometry`` current while layers are built (their transforms come
        from these), then restore the current ones."""
        previous = self.image_layer, self.geometry
        self.image_layer, self.geometry = image_layer, geometry
        try:
            yield
        finally:
            self.image_layer, self.geometry = previous

    def _add_hidden_later(
        self, later: list[tuple], image_layer: Any, geometry: ScanGeometry, base: dict[str, Any]
    ) -> None:
        """Add new hidden lazy layers one at a time, ``_LAZY_STEP_MS`` apart (building a napari layer
        holds the event loop ~0.1 s); pending ones are dropped when the finished maps come
        (``_show_prediction``), the prediction ends without them (``_drop_lazy_layers``) or the viewer
        closes."""
        from qtpy.QtCore import QTimer

        token = self._lazy_token = object()

        def step() -> None:
            if self._lazy_token is not token or self._closing or not later:
                return
            name, data, role, cmap, kind = later.pop(0)
            if name not in self.viewer.layers:
                try:
                    with self._layers_of(image_layer, geometry):
                        if kind is Labels:
                            layer = self._add_labels(name, data, role, visible=False, **base)
                        else:
                            layer = self._add_image(name, data, role, colormap=cmap, visible=False, **base)
                    layers = self.viewer.layers
                    if LAYER_PSEUDO in layers:  # the stacking of an all-at-once build: pseudo labels on top
                        layers.move(layers.index(layer), layers.index(LAYER_PSEUDO))
                    self._select_pseudo()  # a new layer becomes the active one: keep the paintable one
                except Exception as exc:  # it comes with the finished maps instead
                    log.warning("napari-apl: adding the lazy layer %s failed: %s", name, exc)
            if later:
                QTimer.singleShot(_LAZY_STEP_MS, guarded)

        def guarded() -> None:  # a failure becomes a notification, not a traceback dialog
            self._guard(step)

        if later:
            QTimer.singleShot(_LAZY_STEP_MS, guarded)

    def _drop_lazy_layers(self) -> None:
        """After a failed or stopped prediction: lazy layers go, or get the last finished maps back."""
        self._lazy_token = None  # lazy layers still waiting to be added are not wanted any more
        self._settle_renamed_lazy_layers(None)
        lazy = [
            name
            for name, *_ in _LAYERS
            if name in self.viewer.layers
            and is_prediction_layer(self.viewer.layers[name])
            and not isinstance(self.viewer.layers[name].data, np.ndarray)
        ]
        if not lazy:
            return
        pred, image = self.prediction, self.image_layer
        if pred is not None and self._layer_alive(image) and self.geometry is not None:
            self._show_prediction(image, self.geometry, pred)  # corrections were collected before
        else:
            for name in lazy:
                self.viewer.layers.remove(name)

    def _show_prediction(
        self,
        image_layer: Any,
        geometry: ScanGeometry,
        pred: Prediction,
        source: dict[str, Any] | None = None,
        done: frozenset[str] = frozenset(),
    ) -> None:
        """Put a prediction into the viewer (new layers, or the existing ones updated in place).

        ``source`` describes the model that made it (``_model_source``); ``None`` keeps the last one.
        ``done`` names hidden layers that already hold ``pred``'s maps (staged after a refinement).
        """
        self._check_layer_names()  # before anything changes: all five layers are updated, or none
        self._lazy_token = None  # lazy layers still waiting to be added: these maps replace them
        self.collect_corrections()  # keep what was painted since the last write
        if not same_layer(self.image_layer, image_layer):  # the image shown so far: its last strokes
            self.maybe_autosave(force=True, corrections_only=True)  # (a model refined elsewhere is not its)
        self._switch_corrections(image_layer)
        if self.corrections is not None and self.corrections.shape != pred.pseudo.shape:
            self.corrections = None
        if source is not None:
            self._layers_source = source
        pending, self._pending_recovery = self._pending_recovery, None
        if pending is not None and pending.shape == pred.pseudo.shape:
            self.corrections = _merge_corrections(pending, self.corrections)
        if self.prediction is not None and self.prediction is not pred:  # its maps: freed off the event loop
            release_in_background([self.prediction])
        self.image_layer, self.geometry, self.prediction = image_layer, geometry, pred
        self._attach_autosaver(image_layer)
        base = {"image": image_layer.name}
        maps = pred.as_dict()
        absent = [name for name, *_ in _LAYERS if name not in self.viewer.layers]
        for name, key, role, cmap, kind in _LAYERS:
            if key == "pseudo_label":  # the user's corrections go on top of it
                self._write_pseudo(pred.pseudo, role_extra=base)
            elif name not in done:
                self._put_map(name, maps[key], role, cmap, kind, base)
        layers = self.viewer.layers
        if LAYER_PSEUDO in layers:  # maps added now (e.g. before a background Predict had added them
            for name in absent:  # all) go below the pseudo labels, as in an all-at-once build
                if name in layers and layers.index(name) > layers.index(LAYER_PSEUDO):
                    layers.move(layers.index(name), layers.index(LAYER_PSEUDO))
        self._settle_renamed_lazy_layers(maps)
        self._select_pseudo()
        self.predicted.emit()

    def _settle_renamed_lazy_layers(self, maps: dict[str, np.ndarray] | None) -> None:
        """Give lazy prediction layers the user renamed while a prediction ran (no longer found by their
        names) the finished ``maps``, as plain arrays that can be painted; with no maps they go.

        A lazy layer reads its slices through the predictor (it holds the model and the maps being
        filled) and cannot be painted.
        """
        keys = {role: key for _name, key, role, _cmap, _kind in _LAYERS}
        for layer in list(self.viewer.layers):
            if layer.name in PREDICTION_LAYERS or not is_prediction_layer(layer):
                continue
            if isinstance(layer.data, np.ndarray):
                continue
            data = None if maps is None else maps.get(keys.get(layer.metadata[META_KEY]["role"], ""))
            if data is not None and tuple(data.shape[::-1]) == tuple(layer.data.shape):
                layer.data = np.array(to_layer_order(data))  # a copy: the user's layer, not the maps
            else:
                self.viewer.layers.remove(layer)

    def _select_pseudo(self) -> None:
        """Make the pseudo-label layer the active one: it is the layer to inspect and paint in."""
        layer = self.pseudo_layer()
        if layer is None:
            return
        try:
            self.viewer.layers.selection.active = layer
        except Exception as exc:
            # napari's status line can fail here (napari 0.9: a labels layer with features in the 3-D
            # view before the mouse has been over the canvas): the maps are in place regardless
            log.warning("napari-apl: selecting the %s layer: %s", LAYER_PSEUDO, exc)

    def _model_source(self) -> dict[str, Any]:
        """What the report says of the model now loaded, kept with the layers it predicts."""
        source: dict[str, Any] = {
            "checkpoint": str(self.checkpoint_path) if self.checkpoint_path else None,
            "refined": self.refined,
            "refinement": None,
            "version": self._model_version,
        }
        refinement: dict[str, Any] | None = None
        if self.refined and self.last_result is not None:
            refinement = {
                # (the settings of the run that made this model: a later run that failed has its own)
                "config": self._refinements[-1].get("config") if self._refinements else None,
                "iterations_done": self.last_result.iterations_done,
                "stopped": self.last_result.stopped,
                "notes": list(self.last_result.notes),
                "organ_voxels_model_grid": dict(self.last_result.organ_voxels),
            }
        elif self.refined and self._refinements:  # (a recovered model: its recorded refinements)
            refinement = dict(self._refinements[-1])
        if refinement is not None and len(self._refinements) > 1:  # this model's refinements before
            refinement["earlier"] = [dict(r) for r in self._refinements[:-1]]
        source["refinement"] = refinement
        return source

    def _layer_kwargs(self, role: str, extra: dict[str, Any]) -> dict[str, Any]:
        """Kwargs of a prediction layer of the current image: its transform over the image, metadata."""
        kw = canonical_transform_kwargs(self.image_layer, self.geometry)
        kw["metadata"] = make_metadata(self.geometry, role, **extra)
        return kw

    def _existing(self, name: str, kind: type) -> Any:
        """The widget's layer ``name`` if it is of ``kind`` (one of another kind goes; a user's stays)."""
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            if not is_prediction_layer(layer):
                raise APLError(
                    f"a layer named '{name}' that napari-apl did not make is in the way: rename it "
                    "(the prediction layers take that name)"
                )
            if isinstance(layer, kind):
                return layer
            self.viewer.layers.remove(layer)
        return None

    def _holds_live_buffer(self, layer: Any, data: np.ndarray | None = None) -> bool:
        """Whether ``layer`` shows this run's live-overlay buffer (one ``data`` can be copied into)."""
        buffer = self._live_buffer
        if buffer is None or layer.data is not buffer:
            return False
        return data is None or (buffer.shape == data.shape and buffer.dtype == data.dtype)

    def _set_data(self, layer: Any, data: np.ndarray, adopt: bool = False) -> None:
        """Give a layer new voxels: copied into its live-overlay buffer when it holds one, else set
        (and, with ``adopt``, ``data`` becomes the run's buffer)."""
        if self._holds_live_buffer(layer, data):
            # about two thirds of the main-thread time of setting new data (no dims or transform checks)
            np.copyto(layer.data, data)
            layer.refresh()
        else:
            layer.data = data
            if adopt:
                self._live_buffer = data

    def _update_in_place(self, layer: Any, data: np.ndarray, role: str, extra: dict[str, Any]) -> None:
        kw = self._layer_kwargs(role, extra)
        layer.metadata = kw.pop("metadata")
        self._set_data(layer, data)
        current = transform_kwargs(layer)
        for key in ("scale", "translate", "rotate", "shear", "affine"):
            # each assignment re-lays out the viewer: only where the scan's geometry changed
            if np.shape(current[key]) != np.shape(kw[key]) or not np.array_equal(current[key], kw[key]):
                setattr(layer, key, kw[key])
        if kw.get("axis_labels") and current.get("axis_labels") != kw["axis_labels"]:  # the scan's names
            layer.axis_labels = kw["axis_labels"]

    def _put_labels(
        self, name: str, canonical: np.ndarray, role: str, visible: bool = True, **extra: Any
    ) -> Any:
        # the maps are Fortran-ordered (X, Y, Z): napari's (Z, Y, X) order is a contiguous view
        data = np.ascontiguousarray(to_layer_order(canonical))
        layer = self._existing(name, Labels)
        if layer is not None:
            self._update_in_place(layer, data, role, extra)
            return layer
        return self._add_labels(name, data, role, visible=visible, **extra)

    def _put_map(
        self, name: str, canonical: np.ndarray, role: str, cmap: str | None, kind: type, base: dict[str, Any]
    ) -> Any:
        """Put one hidden map (``main``, ``auxiliary``, ``confidence ω``, ``consistency``) in its layer."""
        if kind is Labels:
            return self._put_labels(name, canonical, role, visible=False, **base)
        return self._put_image(name, canonical, role, colormap=cmap, visible=False, **base)

    def _add_labels(self, name: str, data: Any, role: str, visible: bool = True, **extra: Any) -> Any:
        names = self.meta.class_names if self.meta else CLASS_NAMES
        layer = self.viewer.add_labels(
            data,
            name=name,
            colormap=label_colormap(names),
            opacity=0.5,
            visible=visible,
            **self._layer_kwargs(role, extra),
        )
        # the class names after the layer is in: napari 0.9 computes the status line of a new, selected
        # labels layer with features and, in the 3-D view before the mouse has been over the canvas,
        # fails there (TypeError: len() of unsized object), after the layer was added
        layer.features = label_features(names)
        return layer

    def _put_image(
        self, name: str, canonical: np.ndarray, role: str, colormap: str, visible: bool, **extra: Any
    ) -> Any:
        # float16 as predicted (napari shows it): no float32 copy of a whole volume on the main thread
        data = np.ascontiguousarray(to_layer_order(canonical))
        layer = self._existing(name, Image)
        if layer is not None:
            self._update_in_place(layer, data, role, extra)  # keeps the user's contrast limits
            return layer
        return self._add_image(name, data, role, colormap=colormap, visible=visible, **extra)

    def _add_image(self, name: str, data: Any, role: str, colormap: str, visible: bool, **extra: Any) -> Any:
        return self.viewer.add_image(
            data,
            name=name,
            colormap=confidence_colormap() if colormap == _OMEGA_COLORMAP else colormap,
            contrast_limits=(0.0, 1.0),
            blending="additive",
            opacity=0.6,
            visible=visible,
            **self._layer_kwargs(role, extra),
        )

    # -- pseudo labels and corrections ---------
    def pseudo_layer(self) -> Any:
        """The widget's pseudo-label layer, if it is in the viewer."""
        if LAYER_PSEUDO in self.viewer.layers:
            layer = self.viewer.layers[LAYER_PSEUDO]
            if isinstance(layer, Labels) and is_prediction_layer(layer):
                return layer
        return None

    def shown_pseudo(self, collect: bool = True) -> np.ndarray | None:
        """The prediction's pseudo labels with the painted corrections on top (what Export writes);
        ``collect=False`` when the strokes were just folded in."""
        if self.prediction is None:
            return None
        if collect:
            self.collect_corrections()
        return self._with_corrections(self.prediction.pseudo)

    def _with_corrections(self, pseudo: np.ndarray) -> np.ndarray:
        if self.corrections is None or self.corrections.shape != pseudo.shape:
            return pseudo
        return np.where(self.corrections >= 0, self.corrections, pseudo).astype(np.uint8)

    def _write_pseudo(self, pseudo: np.ndarray, role_extra: dict[str, Any] | None = None) -> None:
        """Show pseudo labels (the user's corrections kept on top) and remember what was written."""
        shown = self._with_corrections(pseudo)
        layer = self.pseudo_layer()
        data = np.ascontiguousarray(to_layer_order(shown))
        if layer is None or not self._holds_live_buffer(layer, data):
            # the layer owns its voxels (painting must not change the prediction); for Fortran-ordered
            # maps the copy in napari's (Z, Y, X) order is a plain memory copy
            data = np.array(data, order="C", copy=True)
        if layer is not None and role_extra is None and layer.data.shape == data.shape:
            self._set_data(layer, data)  # live update: data only
        else:
            extra = role_extra or {}
            layer = self._put_labels(LAYER_PSEUDO, to_canonical_order(data), "pseudo-label", **extra)
        # napari keeps a layer's undo history when its data is replaced: Ctrl+Z would then write the
        # strokes' old voxels (an earlier prediction's, or another scan's) into these labels, where they
        # would count as painted corrections
        reset_history = getattr(unwrap_layer(layer), "_reset_history", None)
        if callable(reset_history):
            reset_history()
        # what was written, to tell painted voxels by: ``shown`` is the prediction's own map or a new
        # array, never written in place (last_pseudo is only ever replaced), so it needs no copy (a
        # 512 x 512 x 300 copy held the event loop 60-180 ms)
        self.last_pseudo = shown
        self.shown_version += 1

    def collect_corrections(self) -> np.ndarray | None:
        """Fold voxels painted or erased in the pseudo-label layer since the last write into corrections."""
        layer = self.pseudo_layer()
        if layer is None or self.last_pseudo is None or not isinstance(layer.data, np.ndarray):
            return self.corrections  # nothing written yet, or a prediction still being shown lazily
        if self._holds_live_buffer(layer) and not layer.editable:
            return self.corrections  # a refinement's live overlay, locked since it was written
        if geometry_of(layer.metadata) is not self.geometry:
            return self.corrections  # another scan's labels (a layer renamed back, say): not its strokes
        current = np.asarray(to_canonical_order(layer.data))
        if current.shape != self.last_pseudo.shape:
            return self.corrections
        if _slices_differ(current, self.last_pseudo):
            where = np.nonzero(current != self.last_pseudo)
            if self.corrections is None or self.corrections.shape != current.shape:
                self.corrections = np.full(current.shape, -1, dtype=np.int16)
            values = current[where]
            self.corrections[where] = values.astype(np.int16)
            model = self.prediction.pseudo if self.prediction is not None else None
            if isinstance(model, np.ndarray) and model.shape == current.shape:
                # a voxel given back the model's own label (an undone stroke, or a correction painted
                # over) is no correction: it must not become a hard label of the next refinement
                back = values == model[where]
                self.corrections[tuple(axis[back] for axis in where)] = -1
            self.last_pseudo = current.astype(np.uint8, copy=True)
            self.shown_version += 1
        return self.corrections

    def _scan_id(self, image_layer: Any) -> tuple[str, str | None] | None:
        """The scan an image layer shows: its autosave key and voxel digest, computed each time (a few
        ms: voxels edited in place make another scan)."""
        layer = unwrap_layer(image_layer)
        if layer is None:
            return None
        try:
            volume = volume_from_layer(layer)
            return (session_key(volume), image_digest(volume))
        except Exception:  # (not a 3-D scan: its own, unshared identity)
            return (f"layer-{id(layer)}", None)

    def _corrections_of(self, image_layer: Any) -> np.ndarray | None:
        """The corrections of ``image_layer``'s scan: the current ones if they are its, else stashed ones."""
        sid = self._scan_id(image_layer)
        owner = self._corrections_owner
        if owner is None or owner == sid:
            return self.corrections
        kept = self._stashed.get(sid) if sid is not None else None
        return kept.dense() if kept is not None else None

    def _switch_corrections(self, image_layer: Any) -> None:
        """Make ``image_layer``'s scan's corrections current, keeping the previous scan's for its return."""
        sid = self._scan_id(image_layer)
        owner = self._corrections_owner
        if owner == sid and owner is not None:
            return
        if owner is not None and self.n_corrected:
            self._stashed[owner] = _SparseCorrections(self.corrections)
        kept = self._stashed.pop(sid, None) if sid is not None else None
        self.corrections = kept.dense() if kept is not None else None
        self._corrections_owner = sid
        self.corrections_changed.emit()

    @property
    def n_corrected(self) -> int:
        """Number of voxels the user corrected so far."""
        return 0 if self.corrections is None else int((self.corrections >= 0).sum())

    def corrections_count(self, image_layer: Any = None) -> int:
        """Voxels corrected on ``image_layer`` (what a refinement of it uses); the shown scan's if None."""
        if image_layer is None:
            return self.n_corrected
        sid = self._scan_id(image_layer)
        if self._corrections_owner is not None and sid != self._corrections_owner:
            kept = self._stashed.get(sid) if sid is not None else None
            return 0 if kept is None else int(kept.values.size)
        return self.n_corrected

    def clear_corrections(self, image_layer: Any = None) -> bool:
        """Forget the painted corrections (of ``image_layer``, else of the shown scan) if ``confirm`` agrees;
        the shown scan's pseudo-label layer goes back to the model's labels."""
        self.collect_corrections()
        target = self._scan_id(image_layer) if image_layer is not None else None
        owner = self._corrections_owner
        if target is not None and owner is not None and owner != target:  # a scan not shown: its kept ones
            n = self.corrections_count(image_layer)
            question = (
                f"Forget the {n} voxels painted on '{image_layer.name}'? "
                "They will no longer be kept as hard labels."
            )
            if n and not self.confirm(question):
                return False
            kept = self._stashed.pop(target, None)
            self._clear_autosaved_corrections(target, kept.shape if kept is not None else None)
            self.status.emit(f"corrections of {image_layer.name} cleared")
            self.corrections_changed.emit()
            return True
        n = self.n_corrected
        question = f"Forget the {n} painted voxels? They will no longer be kept as hard labels."
        if n and not self.confirm(question):
            return False
        self.corrections = None
        layer = self.pseudo_layer()
        pred = self.prediction
        if layer is not None and isinstance(layer.data, np.ndarray):
            if pred is not None and tuple(pred.pseudo.shape) == tuple(layer.data.shape[::-1]):
                self._write_pseudo(pred.pseudo)  # the layer shows the model's labels again
            else:
                self.last_pseudo = np.array(to_canonical_order(layer.data), dtype=np.uint8)
        self.maybe_autosave(force=True, corrections_only=True)  # the autosave must not offer them back
        self.labels_reset.emit()
        self.status.emit("corrections cleared")
        self.corrections_changed.emit()
        return True

    def _set_pseudo_editable(self, editable: bool) -> None:
        """Lock the pseudo-label layer for a task, or unlock it: also when the user renamed it meanwhile
        (it is no longer found by its name, and stayed read-only for good)."""
        layer = self.pseudo_layer()
        if editable:
            # (napari hands plugins a new proxy of a layer each time: compare the layers themselves)
            locked, self._locked = self._locked, []
            present = {id(unwrap_layer(ly)) for ly in self.viewer.layers}
            for other in locked:
                if id(other) in present and (layer is None or other is not unwrap_layer(layer)):
                    other.editable = True
        elif layer is not None and all(unwrap_layer(layer) is not other for other in self._locked):
            self._locked.append(unwrap_layer(layer))  # (until the task ends)
        if layer is not None:
            layer.editable = editable

    # -- refine ---------
    def refine(self, config: RefineConfig | None = None, image_layer: Any = None, sync: bool = False) -> bool:
        """Refine the model on the image without labels; live pseudo-label updates, then re-predict."""
        image_layer = image_layer if image_layer is not None else self.image_layer
        cfg = config or RefineConfig()
        try:
            self._check_ready(image_layer)
            volume = volume_from_layer(image_layer)
            geometry = ScanGeometry.from_volume(volume)
            norm = self.normalization(volume.data, image_layer)
            cfg = self._run_config(cfg, norm)
        except Exception as exc:
            self.error(exc)
            return False
        self.collect_corrections()  # what was painted on the image shown since the last write
        # another image's own corrections, if it had any; they become current when its maps are shown
        corrections = self._corrections_of(image_layer)
        if corrections is not None and self.meta is not None:
            try:  # a label the model has no class for (napari's "new label" button gives the next one)
                check_corrections(corrections, self.meta.class_names, f"the painted '{LAYER_PSEUDO}' layer")
            except APLError as exc:
                self.error(exc)
                return False
        shown = same_layer(image_layer, self.image_layer)  # live overlays only on the image's own layers
        self.last_corrections = None if corrections is None else corrections.copy()
        self.last_config = cfg
        self._refining = {
            "target": _scan_name(geometry, image_layer),
            "config": cfg.to_dict(),
            "corrected_voxels": 0 if corrections is None else int((corrections >= 0).sum()),
        }
        self.history = []
        self.live_updates = 0
        self._last_live = 0.0
        self._notes_shown = set()
        self._closing = False
        self._live_buffer = None  # a new run's first overlay gives the layer a buffer of its own
        self.maybe_autosave(force=True)  # a crash during the run must not lose what was painted
        control = self.control = RefineControl()
        self.repredicting = False
        model, meta = self.model, self.meta
        # the set-up made after Predict (or the last refinement), if it is for this run; waited for in the
        # worker (a Refine clicked while it is being made does not make a second one)
        ahead = self._ahead
        if ahead is not None and not ahead.serves(image_layer, model, cfg):
            self._drop_ahead()  # (shutdown waits for it while it winds down)
            ahead = None
        self._ahead = None  # (taken by this run)
        self._set_pseudo_editable(False)
        # a run in progress is autosaved too: the guard-checked weights, from the worker thread
        saver = self.autosaver if shown and self.autosave_enabled and not self._autosave_blocked() else None
        snapshot_meta = self._snapshot_meta(cfg) if saver is not None else None
        interval = self.autosave_interval
        if saver is not None:
            self._mark_own(saver)  # this session's snapshots are never offered back to it
        returned, midrun = [False], [False]  # on_return ran; the worker autosaved weights of this run
        final_save: list[AutosaveEntry | None] = [None]  # the worker's autosave of the refined model
        repredict_failed: list[Exception | None] = [None]  # the re-prediction with the refined model failed
        # hidden result layers the worker had the main thread update, one per event-loop turn, before
        # on_return shows the rest: name -> (layer, its data and metadata before)
        staged: dict[str, tuple[Any, tuple[Any, Any]]] = {}
        stage_done = threading.Event()

        def midrun_saved(iteration: int) -> None:  # (worker thread: a flag only)
            midrun[0] = True

        def on_done() -> None:  # main thread, after the worker: a run that failed is not recoverable
            overlaid = self._live_buffer is not None
            self._live_buffer = None  # the layers have the results (or the last overlay) by now
            if (
                not returned[0]
                and overlaid
                and self.prediction is not None
                and self.pseudo_layer() is not None
            ):
                # the run failed: its last live overlay (of a model that is thrown away) must not stay in
                # the layer, where Export would write it as the pseudo labels
                self._guard(lambda: self._write_pseudo(self.prediction.pseudo))
            if staged and not returned[0]:
                self._guard(lambda: _unstage(staged))
            if staged:  # the maps shown before the run: let go, unmapped off the event loop (the layer
                # objects stay here: a layer must not be dropped last on another thread)
                release_in_background([before for _layer, before in staged.values()])
                staged.clear()
            if midrun[0] and not returned[0] and saver is not None and saver is self.autosaver:
                self._guard(self._autosave_without_the_failed_run)

        def job() -> Generator[Any, None, tuple[RefineResult, Prediction | None]]:
            start = ahead.result() if ahead is not None else None
            events = refine(
                model, meta, volume, cfg, control=control, corrections=self.last_corrections, start=start
            )
            if saver is not None:
                events = _autosaving(events, saver, model, snapshot_meta, interval, midrun_saved)
            # (a pause asked for shows the labels of the step it holds after, not those of the last overlay)
            result = yield from _live_overlays(events, self.last_corrections, force=lambda: control.paused)
            # the iterations are over: a pause asked for in the last one holds nothing (the loop checks
            # for one before each step), and the final prediction cannot be paused
            self.repredicting = True
            control.resume()
            yield _ITERATIONS_OVER
            if self._closing:  # the viewer or the widget is closing: skip the final re-prediction
                return result, None
            try:
                predicting = iter_predict(result.model, meta, volume, normalization=norm, device=cfg.device)
                while True:
                    try:
                        item = next(predicting)
                    except StopIteration as done:
                        pred = done.value
                        break
                    if self._closing:
                        predicting.close()
                        return result, None
                    yield item
            except Exception as exc:  # (e.g. out of memory on a large scan) the refined model is kept
                log.warning("napari-apl: predicting with the refined model failed", exc_info=exc)
                repredict_failed[0] = exc
                return result, None
            if saver is not None and snapshot_meta is not None and self.autosave_enabled:
                final_save[0] = _autosave_final(saver, result, snapshot_meta)  # file work off the event loop
            if shown:
                # each hidden map layer in its own event-loop turn (about 10-25 ms each on a 512 x 512 x 96
                # scan): on_return, which shows the pseudo labels, then stays under 0.1 s of main thread
                for name, key, role, cmap, kind in _LAYERS:
                    if key == "pseudo_label":
                        continue
                    if self._closing:
                        return result, None
                    stage_done.clear()
                    yield _ResultLayer(name, pred.as_dict()[key], role, cmap, kind)
                    deadline = time.monotonic() + _STAGE_WAIT_S
                    while not stage_done.wait(0.05):
                        if self._closing:
                            return result, None
                        if time.monotonic() > deadline:  # the event loop stopped turning (the app quits)
                            return result, pred  # on_return gives the layers not staged their maps
            return result, pred

        def on_yield(item: Any) -> None:
            if isinstance(item, RefineEvent):
                self._on_refine_event(item)
            elif isinstance(item, _LiveOverlay):
                self._on_refine_event(item.event, item if shown else None)
            elif isinstance(item, _ResultLayer):
                try:
                    self._stage_result_layer(item, image_layer, geometry, staged)
                finally:  # the worker goes on, also when this layer could not be staged
                    if sync:
                        stage_done.set()
                    else:
                        # from a timer, not at once: the next stage is then not queued behind this one's
                        # redraw, and the event loop's timers and input get a turn between the two
                        from qtpy.QtCore import QTimer

                        QTimer.singleShot(_STAGE_PAUSE_MS, stage_done.set)
            elif item is _ITERATIONS_OVER:
                self.iterations_ended.emit()  # (nothing left to pause)
            else:  # (done, total) of the final re-prediction
                self.status.emit(f"re-predicting with the refined model: {item[0]}/{item[1]} slices")

        def on_return(value: tuple[RefineResult, Prediction | None]) -> None:
            returned[0] = True
            result, pred = value
            self.model = result.model
            self._adapted_normalization = cfg.normalization
            self.summary = self._with_model_normalization(self.summary)
            self.refined = True
            self._model_version += 1
            self.last_result = result
            record = dict(
                self._refining or {},
                iterations_done=result.iterations_done,
                stopped=result.stopped,
                refined_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
            )
            self._refinements.append(record)
            self._refining = None
            self._refined_on = _session_key_or_none(geometry)  # (its scan's autosave takes the model)
            start = Path(self.checkpoint_path).name if self.checkpoint_path else "the loaded checkpoint"
            self.model_changed.emit(
                f"refined model ({cfg.method}, {result.iterations_done} iterations), not exported: "
                f"Export writes it, Revert goes back to {start}\n{self.summary}"
            )
            closed = pred is not None and not self._layer_alive(image_layer)
            if pred is None or closed:  # closing, no prediction, or the scan closed: the layers stay as
                # the last full prediction (a closed scan gets none)
                _unstage(staged)
                if self.prediction is not None and self.pseudo_layer() is not None:
                    self._write_pseudo(self.prediction.pseudo)
                # the refined model can be recovered next time (if the image it was refined on is shown)
                self.maybe_autosave(force=True, corrections_only=not shown)
                failed = repredict_failed[0]
                if failed is not None:
                    reason = " ".join(str(failed).split()) or type(failed).__name__
                    show_warning(
                        f"napari-apl: the refined model is kept, but predicting the scan with it failed "
                        f"({reason[:200]}): the layers still show the model before the run; free memory "
                        "(close other layers or viewers) and press Predict"
                    )
                how = "stopped" if result.stopped or (pred is None and failed is None) else "finished"
                self.status.emit(
                    f"refinement {how} after {result.iterations_done} iterations"
                    + ("; predicting with the refined model failed" if failed is not None else "")
                    + (f"; '{image_layer.name}' was closed, so no layers show its result" if closed else "")
                )
                self.refine_finished.emit(result)
                return
            now = self.viewer.layers
            done = frozenset(n for n, (lay, _) in staged.items() if n in now and same_layer(now[n], lay))
            try:
                self._show_prediction(image_layer, geometry, pred, self._model_source(), done=done)
            except Exception:  # a layer in the way, or a failure: the layers keep the last full prediction
                _unstage(staged)
                if self.prediction is not None and self.pseudo_layer() is not None:
                    self._write_pseudo(self.prediction.pseudo)  # (not the last live overlay)
                raise
            entry = final_save[0]
            if entry is not None and saver is self.autosaver:  # the worker wrote this model already
                # (the corrections are as autosaved when the run started: the layer was locked since)
                self._autosaved_state = (self._autosaved_state[0], self._model_version)
                self.autosaves_written += 1
                self.autosaved.emit(entry)
            else:
                self._autosaved_state = (self._autosaved_state[0], None)  # this model was made on this image
            self.maybe_autosave(force=True)
            for note in result.notes:
                if note not in self._notes_shown:
                    show_warning(f"napari-apl: {note}")
            self._prepare_next(image_layer)  # for a further refinement of the refined model
            how = "stopped" if result.stopped else "finished"
            size = organ_size_change(result, meta.class_names)
            self.status.emit(
                f"refinement {how} after {result.iterations_done} iterations" + (f"; {size}" if size else "")
            )
            self.refine_finished.emit(result)

        self._run("refine", job, on_yield, on_return, cfg.iterations, sync, on_done)
        return True

    def _autosave_without_the_failed_run(self) -> None:
        """Put the session's autosave back to what it holds without a refinement that failed midway."""
        if self.autosaver is None:
            return
        self.autosaver.discard()
        self._autosaved_state = (None, None)  # everything of the session is written again
        self.maybe_autosave(force=True)

    def _stage_result_layer(
        self,
        item: _ResultLayer,
        image_layer: Any,
        geometry: ScanGeometry,
        staged: dict[str, tuple[Any, tuple[Any, Any]]],
    ) -> None:
        """Give one existing hidden map layer of the refined image its refined map (main thread)."""
        layers = self.viewer.layers
        if self._closing or not same_layer(image_layer, self.image_layer) or item.name not in layers:
            return  # a layer made now, or one in the way, is on_return's (_show_prediction) to handle
        layer = layers[item.name]
        if not (is_prediction_layer(layer) and isinstance(layer, item.kind)):
            return
        before = (layer.data, layer.metadata)
        base = {"image": image_layer.name}
        with self._layers_of(image_layer, geometry):
            self._put_map(item.name, item.data, item.role, item.colormap, item.kind, base)
        staged[item.name] = (layer, before)

    def _on_refine_event(self, ev: RefineEvent, overlay: _LiveOverlay | None = None) -> None:
        """Main-thread handler of one refinement step: progress, history, the live overlay from the worker."""
        self._progress(ev.iteration, ev.total)
        self.history.append(
            {
                "iteration": ev.iteration,
                **ev.losses,
                "mean_confidence": ev.mean_confidence,
                "mean_disagreement": ev.mean_disagreement,
                "changed_fraction": ev.changed_fraction,
            }
        )
        if ev.note and ev.note not in self._notes_shown:
            self._notes_shown.add(ev.note)
            show_warning(f"napari-apl: {ev.note}")
        layer = self.pseudo_layer()
        if overlay is not None and layer is not None and layer.data.shape == overlay.data.shape:
            # the only main-thread work: napari redraws the visible slice. After the run's first overlay
            # the layer holds a buffer of this run's own, refreshed in place: a copy and a re-slice cost
            # about two thirds of setting new data (which also re-checks the layer's dims and transforms)
            self._set_data(layer, overlay.data, adopt=True)
            # napari makes a layer editable again whenever its data is set: strokes painted now would be
            # replaced by the next overlay, so the layer stays read-only until the run ends
            layer.editable = False
            self.last_pseudo = to_canonical_order(overlay.written)
            self._last_live = time.monotonic()
            self.live_updates += 1
        self.status.emit(
            ("paused at " if self.paused else "")
            + f"refine {ev.iteration}/{ev.total}: mean ω {ev.mean_confidence:.3f}, "
            + ", ".join(f"{k} {v:.4g}" for k, v in ev.losses.items())
        )
        self.refine_event.emit(ev)
        self.maybe_autosave()  # throttled: does nothing until the interval has passed

    def pause(self) -> None:
        """Hold the running refinement after its current step (not once its iterations are over)."""
        if self.control is not None and not self.repredicting:
            self.control.pause()
            self.status.emit(
                "refinement paused (after the step in progress); pseudo-label stays read-only until the "
                "run ends: stop it to paint corrections, which the next run uses"
            )

    def resume(self) -> None:
        """Let a paused refinement go on."""
        if self.control is not None:
            self.control.resume()
            self.status.emit("refinement resumed")

    def stop(self) -> None:
        """Stop the running refinement after its current step (the model stays usable)."""
        if self.control is not None:
            self.control.stop()
            self.status.emit("stopping after the current step…")
        elif self.worker is not None:
            self.worker.quit()

    @property
    def paused(self) -> bool:
        """Whether a refinement is paused."""
        return self.control is not None and self.control.paused

    # -- crash recovery ---------
    def _attach_autosaver(self, image_layer: Any) -> None:
        """Give the predicted image an autosaver (and offer an older session of it for recovery)."""
        if self.geometry is None:
            return
        reference = self.geometry.reference
        # a scan held only in memory (no file) is named by its layer in a recovery offer
        shown_name = getattr(image_layer, "name", None) if getattr(reference, "path", None) is None else None
        try:
            key = session_key(reference)
            if self.autosaver is not None and self.autosaver.key == key:
                return
            volume = volume_from_layer(image_layer) if self._layer_alive(image_layer) else reference
            self.check_recovery(image_layer, volume=volume)
            kept = self._savers.get(key)
            ck = self.checkpoint_path
            checkpoint = str(Path(ck).expanduser().resolve()) if ck else None
            digest = image_digest(volume)  # (a sample of the voxels: computed once here)
            if kept is not None and kept.checkpoint == checkpoint and kept.digest == digest:
                self.autosaver = kept  # back to an image of this session: its saver goes on
                self._autosaved_state = (None, self._model_saved_elsewhere(key))
                self._last_autosave_check = -math.inf
                return
            if kept is not None:
                kept.close()
            self.autosaver = self._savers[key] = Autosaver(
                reference,
                checkpoint=self.checkpoint_path,
                interval=self.autosave_interval,
                digest=digest,
                resume=key in self._own_keys,  # a session this one recovered (or wrote) goes on
                folder=self._own_folders.get(key),  # ... in its own folder
                display_name=shown_name,
            )
        except Exception as exc:  # autosave is a safety net: never block predicting
            self.autosaver = None
            self._warn_autosave(exc)
            return
        # a new image: only what is done on it from now on (painting, refining) is worth saving (a
        # recovered session's saver carries the model of the session it continues), and a refined model
        # made on it whose snapshot is still to be written (its final prediction failed, say)
        self._autosaved_state = (None, self._model_saved_elsewhere(key))
        self._last_autosave_check = -math.inf

    def _with_model_normalization(self, summary: str) -> str:
        """The model summary with the normalisation of the model in use (a refined model's, adapted)."""
        if not self._adapted_normalization or self.meta is None or self.model is None:
            return summary
        meta = dataclasses.replace(self.meta, normalization=dict(self._adapted_normalization))
        lines = describe((self.model, meta)).splitlines()
        new = next((ln for ln in lines if ln.startswith("normalization:")), None)
        if new is None:
            return summary
        return "\n".join(new if ln.startswith("normalization:") else ln for ln in summary.splitlines())

    def _model_saved_elsewhere(self, key: str) -> int | None:
        """The model version an image's autosave counts as not its own: the refined model, unless it was
        made on that image (then it is to be saved there); ``None`` where there is none."""
        if not self.refined or key == self._refined_on:
            return None
        return self._model_version

    def check_recovery(self, image_layer: Any = None, volume: Any = None) -> AutosaveEntry | None:
        """Look for an autosaved session of the image (not one this controller wrote); offer the newest."""
        layer = image_layer if image_layer is not None else self.image_layer
        entry = None
        try:
            if volume is None and layer is not None:
                volume = volume_from_layer(layer)
            if volume is not None:
                # (a session still open, in another viewer or process, is not a crashed one)
                found = [e for e in find_autosaves(volume) if e.key not in self._own_keys and not e.in_use]
                digest = image_digest(volume)
                changed = [e for e in found if not e.matches(digest)]
                if changed and ("changed", changed[0].key) not in self._warned:
                    self._warned.add(("changed", changed[0].key))
                    show_warning(
                        f"napari-apl: an autosaved session of {changed[0].image_name} is not offered: "
                        "the image's voxels differ from the scan it was saved from (this session's "
                        "autosaves replace it)"
                    )
                found = [e for e in found if e.matches(digest)]
                entry = found[0] if found else None
                if entry is not None:
                    self._offered_keys.add(entry.key)
                else:  # gone meanwhile (discarded elsewhere): this image may be autosaved again
                    self._offered_keys.discard(session_key(volume))
        except Exception as exc:  # an unreadable autosave root must not break opening an image
            log.warning("napari-apl: looking for autosaves failed: %s", exc)
        self.recoverable = entry
        self._recovery_layer = layer if entry is not None else None
        self.recovery_changed.emit(entry)
        return entry

    def recover(
        self, entry: AutosaveEntry | None = None, image_layer: Any = None, sync: bool = False
    ) -> bool:
        """Restore an autosaved session: its corrections (and refined model), re-predicting if needed."""
        return bool(self._guard(lambda: self._recover(entry, image_layer, sync)))

    def _recover(self, entry: AutosaveEntry | None, image_layer: Any, sync: bool) -> bool:
        entry = entry if entry is not None else self.recoverable
        if entry is None:
            raise APLError("no autosaved session to recover for this image")
        if self.busy:
            raise APLError(f"{self._task} is running: wait for it or stop it before recovering")
        layer = image_layer if image_layer is not None else (self._recovery_layer or self.image_layer)
        if layer is None or not self._layer_alive(layer):
            raise APLError(f"open the image of the autosaved session ({entry.image_name}) first")
        volume = volume_from_layer(layer)
        if session_key(volume) != entry.key or not entry.matches(image_digest(volume)):
            raise APLError(
                f"the autosave is of {entry.image_name}, not of layer '{layer.name}': choose that image"
            )
        damaged: list[str] = []
        if in_use(entry) and not (self.autosaver is not None and self.autosaver.holds(entry.folder)):
            self.recoverable, self._recovery_layer = None, None  # (the offer is out of date)
            self._offered_keys.discard(entry.key)  # this session autosaves its own work again
            self.recovery_changed.emit(None)
            raise APLError(
                f"the autosaved session of {entry.image_name} was recovered in another viewer meanwhile: "
                "go on with it there"
            )
        if entry.model_file and self.unsaved_refinement:  # (as Load model and Revert ask)
            question = (
                f"The refined model has not been exported. Discard it and recover the autosaved session of "
                f"{entry.image_name} with its refined model?"
            )
            if not self.confirm(question):
                self.status.emit("kept the refined model: the autosaved session was not recovered")
                return False
        corrections, model, meta = restore_autosave(entry, damaged=damaged)
        if damaged and corrections is None and model is None:
            raise APLError(damaged[0])  # nothing intact: the offer stays, Discard removes it
        for problem in damaged:  # the intact part is recovered, the damaged one said
            part = "the corrections" if corrections is not None else "the refined model"
            show_warning(f"napari-apl: recovered {part} only: {problem.removesuffix(': discard it')}")
        if model is None and self.model is None and entry.checkpoint and Path(entry.checkpoint).is_file():
            self._load(entry.checkpoint)
        if model is not None:
            self.model, self.meta = model, meta  # its meta records the preset it was adapted to
            self._adapted_normalization = None
            if entry.checkpoint:  # what it was refined from: Revert and the report name that checkpoint
                self.checkpoint_path = Path(entry.checkpoint)
            self.refined = True
            self._refined_on = entry.key
            self._refinements = refinement_history(meta.provenance)
            running = meta.provenance.get("refined")
            if isinstance(running, dict) and running.get("in_progress") and self._refinements:
                # an autosave of a run in progress: how far it got is the autosave's iteration
                self._refinements[-1] = dict(
                    self._refinements[-1],
                    iterations_done=entry.iteration,
                    stopped=True,
                    interrupted="recovered from an autosave made while the refinement ran",
                )
            self._loaded_history = []  # (the recovered provenance holds them all)
            self._model_version += 1
            self.last_result = None
            self.history = []
            lines = [ln for ln in describe((model, meta)).splitlines() if not ln.startswith("file:")]
            self.summary = "\n".join([*lines, f"recovered from autosave {entry.folder}"])
            self.model_changed.emit(self.summary)
        self._own_keys.add(entry.key)  # from now on this session's saves replace the recovered one
        self._own_folders[entry.key] = Path(entry.folder)
        if self.autosaver is not None and self.autosaver.key == entry.key:
            try:  # the saver goes on in the recovered session's folder (without a damaged part)
                self.autosaver.adopt(
                    entry, keep_model=model is not None, keep_corrections=corrections is not None
                )
            except Exception as exc:
                self._warn_autosave(exc)
        self._offered_keys.discard(entry.key)
        self.recoverable, self._recovery_layer = None, None
        self.recovery_changed.emit(None)
        what = entry.summary()
        if model is None and self.prediction is not None and same_layer(layer, self.image_layer):
            self.corrections = _merge_corrections(corrections, self.collect_corrections())
            self._write_pseudo(self.prediction.pseudo)
            self.corrections_changed.emit()
            self.status.emit(f"recovered {what}")
            return True
        self._pending_recovery = corrections
        if not self.predict(layer, sync=sync):
            self._pending_recovery = None
            return False
        self.status.emit(f"recovered {what}" if sync else f"recovering {what}")  # (async: predict goes on)
        return True

    def discard_recovery(self, entry: AutosaveEntry | None = None) -> bool:
        """Delete the autosaved session offered for recovery (the user does not want it)."""

        def run() -> bool:
            target = entry if entry is not None else self.recoverable
            if target is None:
                return False
            discard_autosave(target)
            self._offered_keys.discard(target.key)
            if self.recoverable is not None and self.recoverable.key == target.key:
                layer = self._recovery_layer
                self.recoverable, self._recovery_layer = None, None
                self.recovery_changed.emit(None)
                if layer is not None and self._layer_alive(layer):
                    self.check_recovery(layer)  # another crashed session of the scan is offered next
            self.status.emit("autosaved session discarded")
            return True

        return bool(self._guard(run))

    def _mark_own(self, saver: Autosaver) -> None:
        """Remember that this session saves ``saver``'s image, and into which folder."""
        self._own_keys.add(saver.key)
        self._own_folders[saver.key] = saver.folder

    def _autosave_blocked(self) -> bool:
        """Whether an unanswered recovery offer for this image forbids overwriting its autosave."""
        return self.autosaver is not None and self.autosaver.key in self._offered_keys

    def _autosave_state(self) -> tuple[str | None, int | None]:
        """What an autosave would hold: a digest of the corrections and the refined model's version."""
        corr = self.corrections
        digest = None
        if corr is not None and bool((corr >= 0).any()):
            digest = hashlib.blake2b(np.ascontiguousarray(corr).data, digest_size=16).hexdigest()
        return digest, (self._model_version if self.refined else None)

    def autosave_wait(self) -> float:
        """Seconds until the next autosave may be written (0 = now)."""
        return max(0.0, self.autosave_interval - (time.monotonic() - self._last_autosave_check))

    def _clear_autosaved_corrections(
        self, scan: tuple[str, str | None], shape: tuple[int, ...] | None
    ) -> None:
        """After a Clear of a scan not shown: its autosave's corrections are cleared too (they would be
        offered back after a crash)."""
        saver = self._savers.get(scan[0])
        if saver is None or saver is self.autosaver or shape is None or not self.autosave_enabled:
            return
        if saver.digest is not None and scan[1] is not None and saver.digest != scan[1]:
            return  # (the key's saver is another scan's under the same path)
        try:
            saver.save(np.full(shape, -1, dtype=np.int16))
        except Exception as exc:
            self._warn_autosave(exc)

    def maybe_autosave(self, force: bool = False, corrections_only: bool = False) -> AutosaveEntry | None:
        """Autosave corrections and refined model if changed and the interval passed (or ``force``)."""
        saver = self.autosaver
        if not self.autosave_enabled or saver is None or self.geometry is None:
            return None
        if self._autosave_blocked():
            if not self.busy:
                self.collect_corrections()
            if ("blocked", saver.key) not in self._warned and self._autosave_state() != (None, None):
                self._warned.add(("blocked", saver.key))  # once per image: there is something to lose
                show_warning(
                    "napari-apl: this image's older autosaved session is waiting for Recover or Discard "
                    "(bar at the top of the widget); until then nothing new of it is autosaved"
                )
            return None
        if not force and self.autosave_wait() > 0:
            return None
        self._last_autosave_check = time.monotonic()
        try:
            if not self.busy:
                self.collect_corrections()  # fold in what was painted since the last write
            state = self._autosave_state()
            before = self._autosaved_state
            if state == before:
                return None
            corrections = self.corrections
            if state[0] is None:
                corrections = np.full(self.geometry.shape, -1, dtype=np.int16) if before[0] else None
            elif corrections is not None and corrections.shape != self.geometry.shape:
                corrections = None
            model = meta = None
            if state[1] is not None and state[1] != before[1] and not corrections_only:
                model, meta = self.model, self._refined_meta()
            elif state[1] is None and before[1] is not None:
                saver.discard()  # reverted: the saved refined model must not come back
            entry = None
            if corrections is not None or model is not None:
                done = self.last_result.iterations_done if self.last_result is not None else None
                iteration = done if model is not None else None
                entry = saver.save(corrections, model, meta, iteration=iteration)
                self._mark_own(saver)
                self.autosaves_written += 1
            self._autosaved_state = state
        except Exception as exc:
            self._warn_autosave(exc)
            return None
        if entry is not None:
            self.autosaved.emit(entry)
        return entry

    def discard_autosave(self) -> None:
        """Delete this image's autosave (after a clean export; an offered older session is kept)."""
        if self.autosaver is None or self._autosave_blocked():
            return
        try:
            self.autosaver.discard()
        except Exception as exc:
            self._warn_autosave(exc)
        self._autosaved_state = self._autosave_state()

    def _warn_autosave(self, exc: BaseException) -> None:
        """Tell the user once that autosave does not work (it is a safety net, not an error)."""
        log.warning("napari-apl autosave failed: %s", exc)
        if not self._autosave_warned:
            self._autosave_warned = True
            reason = " ".join(str(exc).split())
            show_warning(f"napari-apl: autosave failed (crash recovery may miss it): {reason}")

    # -- closing ---------
    def wait_idle(
        self, timeout: float = CLOSE_WAIT_S, process_events: Callable[[], None] | None = None
    ) -> bool:
        """Wait (delivering Qt events) until no worker runs, at most ``timeout`` s; return whether idle."""
        pump = process_events or _process_qt_events
        deadline = time.monotonic() + timeout
        while self.worker is not None:
            if time.monotonic() >= deadline:
                return False
            pump()
            time.sleep(0.005)
        return True

    def shutdown(self, timeout: float = CLOSE_WAIT_S) -> bool:
        """Stop any task, wait for its worker (bounded), release device memory and autosave; True if idle."""
        if self._shutting_down:
            return self.worker is None
        self._shutting_down = True
        try:
            self._closing = True
            if self.control is not None:
                self.control.stop()
            elif self.worker is not None:
                self.worker.quit()
            self._drop_ahead()
            idle = self.wait_idle(timeout)
            if not idle:
                log.warning("napari-apl: the task did not end within %.0f s of the stop request", timeout)
            for ahead in self._cancelled_aheads:  # (each stops at its next batch of slices)
                ahead.thread.join(timeout)
            self._cancelled_aheads = [a for a in self._cancelled_aheads if a.thread.is_alive()]
            try:
                release_device_memory(resolve_device(self.device))
            except Exception:  # no usable device any more: nothing was cached on it
                pass
            self.maybe_autosave(force=True)  # closing without export keeps the work recoverable
            if idle:  # (a worker still running may save once more)
                for saver in self._savers.values():
                    saver.close()  # the session ends: another viewer may recover its images now
            return idle
        finally:
            self._shutting_down = False

    def request_close(self, timeout: float = CLOSE_WAIT_S) -> bool:
        """Viewer closing: ask ``confirm_close`` if refining, then shut down; return whether to close."""
        if self._shutting_down:
            return False  # a close while we wait for the worker: the first one decides
        if self.busy and self.task == "refine":
            try:
                ok = bool(self.confirm_close())
            except Exception as exc:  # a broken question must not trap the user in the window
                log.warning("napari-apl: close confirmation failed: %s", exc)
                ok = True
            if not ok:
                self.status.emit("the refinement goes on: window kept open")
                return False
        self.shutdown(timeout)
        return True

    # -- export ---------
    def _open_files(self) -> tuple[Path, ...]:
        """Files the session reads from (the loaded checkpoint, the scans and labels opened as layers):
        an export never writes over them, whatever 'overwrite' says."""
        found: list[Path] = []
        if self.checkpoint_path:
            found.append(Path(self.checkpoint_path))
        if self.geometry is not None and self.geometry.path is not None:
            found.append(Path(self.geometry.path))
        for layer in self.viewer.layers:
            path = getattr(getattr(layer, "source", None), "path", None)
            if path:
                found.append(Path(path))
        return tuple(found)

    def export_paths(self, folder: str | os.PathLike) -> dict[str, Path]:
        """The files an export writes into ``folder``, by kind."""
        stem = _safe_stem(self.image_layer.name if self.image_layer is not None else "napari_apl")
        folder = Path(folder).expanduser()
        paths = {
            "main": folder / f"{stem}_main.nii.gz",
            "auxiliary": folder / f"{stem}_auxiliary.nii.gz",
            "pseudo-label": folder / f"{stem}_pseudo_label.nii.gz",
            "confidence": folder / f"{stem}_confidence.nii.gz",
            "consistency": folder / f"{stem}_consistency.nii.gz",
            "report_json": folder / f"{stem}_report.json",
            "report_csv": folder / f"{stem}_report.csv",
        }
        if self.refined:
            paths["checkpoint"] = folder / f"{stem}_refined.pt"
        return paths

    def export(
        self,
        folder: str | os.PathLike,
        overwrite: bool = False,
        gt_layer: Any = None,
        largest_component: bool = False,
    ) -> list[Path]:
        """Write masks, maps, report (and the refined checkpoint) on the scan's original grid; [] on error.

        With ``largest_component`` every exported mask keeps only each organ's largest connected piece
        (the layers in the viewer stay as they are).
        """
        result = self._guard(lambda: self._export(folder, overwrite, gt_layer, largest_component))
        return result or []

    def _export(
        self, folder: str | os.PathLike, overwrite: bool, gt_layer: Any, largest_component: bool = False
    ) -> list[Path]:
        if self.busy:
            raise APLError(f"{self._task} is running: wait for it to end before exporting")
        if self.prediction is None or self.geometry is None:
            raise APLError("nothing to export yet: run Predict first")
        if str(folder).strip() == "":
            raise OutputError("no export folder chosen: choose a folder")
        out_dir = Path(folder).expanduser().absolute()
        if out_dir.exists() and not out_dir.is_dir():
            raise OutputError(f"{out_dir} is a file, not a folder: choose a folder")
        if not out_dir.exists() and not out_dir.parent.is_dir():
            raise OutputError(f"export folder {out_dir.parent} does not exist: create it first")
        paths = self.export_paths(out_dir)
        existing = [p for p in paths.values() if p.exists()]
        if existing and not overwrite:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise OutputExistsError(  # (the reason first: a toast shows a long message's start)
                f"nothing was written: {existing[0].name} exists already{more} in {out_dir}; tick "
                "'overwrite' or choose another folder"
            )
        created = not out_dir.exists()
        if created:
            if not os.access(out_dir.parent, os.W_OK | os.X_OK):
                raise OutputError(f"export folder {out_dir.parent} is not writable: choose another folder")
            try:
                out_dir.mkdir()
            except OSError as exc:
                raise OutputError(f"cannot create export folder {out_dir}: {exc.strerror or exc}") from None
        written: list[Path] = []
        try:
            inputs = self._open_files()
            for p in paths.values():  # every file is checked before the first one is written
                check_output_path(p, overwrite=overwrite, inputs=inputs)
            with staged_outputs():  # all files appear (or replace the old ones) together, or none does
                self._write_export(out_dir, paths, overwrite, gt_layer, written, largest_component)
        except BaseException as exc:
            # (staged_outputs has removed the temporaries and any file this export had put in place; a
            # file another program made meanwhile is not this export's to remove)
            if created:
                try:
                    out_dir.rmdir()
                except OSError:
                    pass
            if isinstance(exc, OSError):  # e.g. a read-only share or a full disk
                raise OutputError(
                    f"cannot write into {out_dir}: {exc.strerror or exc}; nothing was written: "
                    "choose another folder"
                ) from None
            raise
        if self.refined:
            self._exported_version = self._model_version
            model_file = next((p for p in written if p.suffix == ".pt"), None)
            if model_file is not None:
                self.model_changed.emit(f"refined model (exported to {model_file})\n{self.summary}")
        self.status.emit(f"exported {len(written)} files to {out_dir}")
        self.discard_autosave()  # a clean export: nothing left to recover
        return written

    def _write_export(
        self,
        out_dir: Path,
        paths: dict[str, Path],
        overwrite: bool,
        gt_layer: Any,
        written: list[Path],
        largest_component: bool = False,
    ) -> None:
        """Write the export files, appending each one to ``written`` as soon as it exists."""
        assert self.prediction is not None and self.geometry is not None
        masks = self._current_masks()
        removed = None
        if largest_component:  # the voxels the user painted stay, even away from an organ's largest piece
            masks, fractions = clean_masks(masks, keep={"pseudo-label": self.collect_corrections()})
            removed = {kind: {label_name(c): f for c, f in fr.items()} for kind, fr in fractions.items()}
            names = self.meta.class_names if self.meta else list(CLASS_NAMES)
            for line in removal_warnings(fractions["pseudo-label"], names):
                show_warning(f"napari-apl: exported pseudo-label, {line}")
        report = self.report(masks["pseudo-label"], gt_layer)
        report["largest_component"] = largest_component
        report["removed_fraction"] = removed
        geom = self.geometry
        maps = {"confidence": self.prediction.confidence, "consistency": self.prediction.consistency}
        for kind, arr in masks.items():
            ref = geom.with_data(arr)
            written.append(save_canonical(arr, paths[kind], ref, dtype=np.uint8, overwrite=overwrite))
        for kind, arr in maps.items():  # uint8 with scl_slope 1/255, as napari-apl predict writes them
            written.append(write_map(kind, arr, paths[kind], geom.with_data(arr), overwrite=overwrite))
        if self.refined:
            written.append(
                save_checkpoint(paths["checkpoint"], self.model, self._refined_meta(), overwrite=overwrite)
            )
        text = json.dumps(report, indent=2)
        written.append(
            atomic_write(paths["report_json"], lambda tmp: tmp.write_text(text), overwrite=overwrite)
        )
        csv_text = _report_csv(report)
        written.append(
            atomic_write(paths["report_csv"], lambda tmp: tmp.write_text(csv_text), overwrite=overwrite)
        )

    def _current_masks(self) -> dict[str, np.ndarray]:
        """Label volumes to export (canonical): the layers as they are now (user edits included)."""
        assert self.prediction is not None
        out = {
            "main": self.prediction.main,
            "auxiliary": self.prediction.aux,
            # the corrections on top, as Refine uses them, also when the painted layer was renamed or removed
            "pseudo-label": self._with_corrections(self.prediction.pseudo),
        }
        for kind, name in (("main", LAYER_MAIN), ("auxiliary", LAYER_AUX), ("pseudo-label", LAYER_PSEUDO)):
            if name in self.viewer.layers and is_prediction_layer(self.viewer.layers[name]):
                data = np.asarray(to_canonical_order(self.viewer.layers[name].data))
                if data.shape == out[kind].shape:
                    out[kind] = data
        return out

    def _refined_meta(self, running: dict[str, Any] | None = None) -> CheckpointMeta:
        """The metadata a refined model is saved with: its provenance records each refinement it went
        through since ``from_checkpoint`` (the last one's settings at the top, the ones before under
        ``earlier``), and ``running`` (a refinement in progress) last."""
        assert self.meta is not None
        prov = dict(self.meta.provenance)
        records = [*self._refinements, *([running] if running is not None else [])]
        if records:  # those of the checkpoint loaded come before
            records = [*self._loaded_history, *records]
        if not records:  # (no refinement recorded: what the session shows now)
            records = [
                {
                    "target": _scan_name(self.geometry, self.image_layer),
                    "config": None,
                    "corrected_voxels": self.n_corrected,
                    "iterations_done": None,
                    "stopped": None,
                }
            ]
        refined = {"from_checkpoint": str(self.checkpoint_path) if self.checkpoint_path else None}
        refined.update(records[-1])
        if len(records) > 1:
            refined["earlier"] = [dict(r) for r in records[:-1]]
        prov["refined"] = refined
        if self._adapted_normalization:
            # the intensities the model was adapted to; what it was trained with stays in the provenance
            prov.setdefault("source_normalization", dict(self.meta.normalization))
            norm = dict(self._adapted_normalization)
            return dataclasses.replace(self.meta, normalization=norm, provenance=prov)
        return dataclasses.replace(self.meta, provenance=prov)

    def _snapshot_meta(self, cfg: RefineConfig) -> CheckpointMeta:
        """The metadata an autosave of the refinement ``cfg`` in progress records."""
        assert self.meta is not None
        meta = self._refined_meta(running=self._refining)
        prov = dict(meta.provenance)
        refined = dict(prov["refined"], config=cfg.to_dict(), iterations_done=None, stopped=None)
        prov["refined"] = dict(refined, in_progress=True)
        norm = dict(cfg.normalization) if cfg.normalization else dict(self.meta.normalization)
        if norm != self.meta.normalization:
            prov.setdefault("source_normalization", dict(self.meta.normalization))
        return dataclasses.replace(meta, normalization=norm, provenance=prov)

    def report(self, labels: np.ndarray | None = None, gt_layer: Any = None) -> dict[str, Any]:
        """Per-organ volume (mL), mean ω, and Dice/ASSD against a ground-truth labels layer when given."""
        if self.prediction is None or self.geometry is None:
            raise APLError("nothing to report yet: run Predict first")
        if not self.busy:
            self.collect_corrections()  # (strokes painted since the last count: corrected_voxels below)
        labels = self.prediction.pseudo if labels is None else labels
        source = self._layers_source or self._model_source()  # the model that made the layers
        spacing = self.geometry.spacing
        ml = voxel_volume_ml(spacing)
        omega = self.prediction.confidence
        counts = np.bincount(labels.reshape(-1), minlength=max(ORGANS) + 1)
        names = self.meta.class_names if self.meta else list(CLASS_NAMES)
        scores = None
        if gt_layer is not None:
            # the ground truth in the scan's canonical order through its own transform: a layer from
            # another reader may hold its slices in another order (e.g. reversed under a negative scale)
            try:
                gt_volume = volume_from_layer(gt_layer)
            except APLError:
                raise APLError(
                    f"ground-truth layer '{gt_layer.name}' is not a 3-D labels volume (shape "
                    f"{tuple(gt_layer.data.shape)}): choose labels of the same scan"
                ) from None
            gt = np.asarray(gt_volume.data)
            if gt.shape != labels.shape:
                raise APLError(
                    f"ground-truth layer '{gt_layer.name}' has shape {gt_layer.data.shape}, "
                    f"the prediction {labels.shape[::-1]}: choose labels of the same scan"
                )
            if not _same_grid(gt_volume.affine, self.geometry.affine, labels.shape):
                raise APLError(
                    f"ground-truth layer '{gt_layer.name}' does not lie on the scan's voxel grid (its "
                    "position, spacing or orientation differs): choose labels of the same scan"
                )
            gt = label_volume(gt, f"ground-truth layer '{gt_layer.name}'")
            scores = evaluate(labels, gt, spacing)
        organs = []
        for lab in ORGANS:
            mask = labels == lab
            name = names[lab] if lab < len(names) else f"label {lab}"
            row: dict[str, Any] = {
                "label": lab,
                "organ": name,
                "voxels": int(counts[lab]),
                "volume_ml": float(counts[lab] * ml),
                "mean_confidence": json_number(float(omega[mask].astype(np.float32).mean()))
                if mask.any()
                else None,
            }
            if scores is not None:
                row["dice"] = json_number(scores["dice"].get(label_name(lab), math.nan))
                row["assd_mm"] = json_number(scores["assd"].get(label_name(lab), math.nan))
            organs.append(row)
        rep: dict[str, Any] = {
            "image": self.image_layer.name if self.image_layer is not None else None,
            "source_path": str(self.geometry.path) if self.geometry.path else None,
            "shape_canonical": list(self.geometry.shape),
            "spacing_mm": list(spacing),
            "checkpoint": source["checkpoint"],
            "refined": source["refined"],
            "refinement": source["refinement"],
            "corrected_voxels": self.n_corrected,
            "mean_confidence": float(omega.astype(np.float32).mean()),
            "organs": organs,
        }
        if source["version"] != self._model_version:
            rep["note"] = (
                "the prediction layers come from a model that is no longer loaded (another checkpoint "
                "was loaded or a refinement ended since): Predict again for the current model's masks"
            )
        if scores is not None:
            rep["ground_truth"] = gt_layer.name
            rep["mean_dice"] = json_number(scores["mean_dice"])
            rep["mean_assd_mm"] = json_number(scores["mean_assd"])
        return rep


@dataclasses.dataclass
class _LiveOverlay:
    """A refinement event with its pseudo labels ready for the layer (made in the worker thread)."""

    event: RefineEvent
    data: np.ndarray  # napari's (Z, Y, X) order, the user's corrections on top: the layer's new data
    written: np.ndarray  # a copy of ``data``: what the layer held when it was written


@dataclasses.dataclass
class _ResultLayer:
    """One hidden map of the refined model's prediction, for the main thread to put in its layer."""

    name: str
    data: np.ndarray  # canonical (X, Y, Z) order, as the prediction holds it
    role: str
    colormap: str | None
    kind: type


def _unstage(staged: dict[str, tuple[Any, tuple[Any, Any]]]) -> None:
    """Give staged result layers back the data and metadata they held before (the run did not end well)."""
    for layer, (data, metadata) in staged.values():
        layer.data = data
        layer.metadata = metadata
    staged.clear()


def _autosave_final(saver: Autosaver, result: RefineResult, snapshot: CheckpointMeta) -> AutosaveEntry | None:
    """Autosave a finished refinement's model from the worker thread; ``None`` when that failed."""
    prov = dict(snapshot.provenance)
    refined = {k: v for k, v in prov["refined"].items() if k != "in_progress"}
    prov["refined"] = dict(refined, iterations_done=result.iterations_done, stopped=result.stopped)
    try:
        return saver.save(
            model=result.model,
            meta=dataclasses.replace(snapshot, provenance=prov),
            iteration=result.iterations_done,
        )
    except Exception as exc:  # the main thread tries again, as it did before the worker did this
        log.warning("napari-apl: autosaving the refined model failed: %s", exc)
        return None


def _relay(events: Generator[Any, None, Any], step: Callable[[Any], Any]) -> Generator[Any, None, Any]:
    """Pass a refinement's events on through ``step`` (in the worker) and return the refinement's result.

    Closing the relay closes the refinement (its ``finally`` blocks run).
    """
    try:
        while True:
            try:
                ev = next(events)
            except StopIteration as stop:
                return stop.value
            yield step(ev)
    finally:
        events.close()


def _live_overlays(
    events: Generator[Any, None, Any],
    corrections: np.ndarray | None,
    every_s: float | None = None,
    force: Callable[[], bool] | None = None,
) -> Generator[Any, None, Any]:
    """Pass refinement events on, at most every ``every_s`` one with pseudo labels as a ``_LiveOverlay``
    (also sooner, once, when ``force()`` says so: e.g. a pause asked for, which holds the next step).

    Runs in the worker: the corrections overlay and the reordering (whole-volume copies) stay off
    the Qt event loop, which then only swaps the layer's data.
    """
    every_s = LIVE_UPDATE_SECONDS if every_s is None else every_s
    last = -math.inf
    forced = False  # the forced overlay was sent (until force() turns false again)

    def overlay(ev: Any) -> Any:
        nonlocal last, forced
        now = time.monotonic()
        has_labels = isinstance(ev, RefineEvent) and (ev.pseudo is not None or ev.labels is not None)
        urgent = force is not None and force()
        if not urgent:
            forced = False
        if not has_labels or (now - last < every_s and (not urgent or forced)):
            return ev
        forced = urgent
        shown = ev.pseudo if ev.pseudo is not None else ev.labels()  # before the loop resumes
        if corrections is not None and corrections.shape == shown.shape:
            shown = np.where(corrections >= 0, corrections, shown).astype(np.uint8)
        data = np.array(to_layer_order(shown), dtype=np.uint8, order="C")
        last = now
        return _LiveOverlay(ev, data, data.copy())

    return _relay(events, overlay)


def _autosaving(
    events: Generator[Any, None, Any],
    saver: Autosaver,
    start: Any,
    meta: CheckpointMeta,
    interval: float,
    on_saved: Callable[[int], None] | None = None,
) -> Generator[Any, None, Any]:
    """Pass refinement events on; at most every ``interval`` s autosave the newest guard-checked weights.

    Runs in the worker thread, between iterations (the weights are copied before the loop resumes),
    so the event loop does no file work. A failure only logs: the run goes on.
    """
    holder: Any = None
    saved = 0
    last = time.monotonic()

    def autosave(ev: Any) -> Any:
        nonlocal holder, saved, last
        if not (isinstance(ev, RefineEvent) and ev.checked is not None) or time.monotonic() - last < interval:
            return ev
        last = time.monotonic()
        iteration, weights = ev.checked()
        if iteration <= saved:
            return ev
        try:
            if holder is None:
                holder = copy.deepcopy(start).to("cpu")
            holder.load_state_dict(weights)
            saver.save(model=holder, meta=meta, iteration=iteration)
            saved = iteration
            if on_saved is not None:
                on_saved(iteration)
        except Exception as exc:
            log.warning("napari-apl: autosaving the refinement in progress failed: %s", exc)
        return ev

    return _relay(events, autosave)


def _slices_differ(a: np.ndarray, b: np.ndarray, chunk: int = 8) -> bool:
    """Whether two ``(X, Y, Z)`` volumes differ, compared a few axial slices at a time.

    Runs on the event loop when a refinement starts: a small reused buffer instead of a whole-volume
    boolean array (whose fresh pages alone cost tens of ms on a 512 x 512 x 300 CT), and it stops at
    the first difference.
    """
    buf = np.empty((*a.shape[:2], min(chunk, a.shape[2])), dtype=bool, order="F")
    for s in range(0, a.shape[2], chunk):
        part = buf[..., : min(chunk, a.shape[2] - s)]
        np.not_equal(a[..., s : s + chunk], b[..., s : s + chunk], out=part)
        if part.any():
            return True
    return False


def _safe_stem(name: str) -> str:
    """A file-name-safe version of a layer name."""
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in name.strip())
    return keep.strip("._") or "napari_apl"


def _report_csv(report: dict[str, Any]) -> str:
    """The per-organ rows of a report as CSV text."""
    fields = ["label", "organ", "voxels", "volume_ml", "mean_confidence", "dice", "assd_mm"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in report["organs"]:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    return buf.getvalue()


def _session_key_or_none(geometry: Any) -> str | None:
    """The autosave key of a scan's geometry (``None`` when it has none)."""
    try:
        return session_key(geometry.reference)
    except Exception:
        return None


def layer_role(layer: Any) -> str | None:
    """The napari-apl role recorded in a layer's metadata (``None`` for the user's own layers)."""
    record = (getattr(layer, "metadata", None) or {}).get(META_KEY)
    return record.get("role") if isinstance(record, dict) else None


def is_prediction_layer(layer: Any) -> bool:
    """Whether ``layer`` is one of the prediction layers napari-apl made (by its metadata, not its name)."""
    return layer_role(layer) in PREDICTION_ROLES


def is_map_layer(layer: Any) -> bool:
    """Whether ``layer`` is a prediction layer or a map file napari-apl wrote, reopened (not a scan)."""
    return is_prediction_layer(layer) or layer_role(layer) in MAP_FILE_ROLES
