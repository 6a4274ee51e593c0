"""Shared helpers of the performance benchmarks: machine facts, timing, the synthetic CT, result files.

Every benchmark prints its figures and writes ``benchmarks/results/<name>.md`` and ``.json`` with the
date, the git commit, the machine, each figure with its goal beside it and PASS/MISS with the margin.
Timings are medians of repeats measured side by side (interleaved) in one run, so that load from other
processes on a shared machine hits both sides of a ratio alike.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CACHE = REPO / "benchmarks" / "cache"
BIG_SHAPE = (512, 512, 300)
BIG_SPACING = (0.75, 0.75, 1.0)
MODEL_SPACING = (2.5, 2.5)
MODEL_INPUT = (160, 160)


# --- machine and provenance ---------------------------------------------------------------------------


def git_commit() -> str:
    """``$GIT_COMMIT`` where set (a copied tree whose .git may be stale), else the checked-out commit."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Facts about this machine and the libraries that matter for the figures."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 1024**3, 1)
    except ImportError:
        pass
    return info


# --- timing --------------------------------------------------------------------------------------------


def device_refusal(device: str) -> str | None:
    """Why a benchmark cannot run on ``device`` (``cpu`` or ``cuda``), as one line; None if it can."""
    import torch

    if device not in ("cpu", "cuda"):
        return f"--device must be cpu or cuda, got {device!r}"
    if device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: no CUDA device is available to torch here"
    return None


def timed(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, alternating between them (after ``warmup`` untimed rounds)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return times


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(np.median(np.asarray(values, dtype=np.float64)))


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of the per-round ratios ``num[i] / den[i]`` (each round measured side by side)."""
    return median([a / b for a, b in zip(num, den)])


# --- results ---------------------------------------------------------------------------------------------


@dataclass
class Figure:
    """One measured figure, optionally with a goal (``<=``/``>=`` a bound) it is judged against."""

    name: str
    value: float
    unit: str = ""
    goal: float | None = None
    op: str = "<="
    note: str = ""

    @property
    def status(self) -> str:
        """PASS, MISS or ``-`` (no goal)."""
        if self.goal is None:
            return "-"
        ok = self.value <= self.goal if self.op == "<=" else self.value >= self.goal
        return "PASS" if ok else "MISS"

    @property
    def margin(self) -> str:
        """By how much the goal is met or missed, in percent of the goal."""
        if self.goal is None or self.goal == 0:
            return ""
        diff = (self.goal - self.value) if self.op == "<=" else (self.value - self.goal)
        word = "under" if self.op == "<=" else "over"
        if diff < 0:
            word = "over" if self.op == "<=" else "under"
        return f"{abs(diff) / abs(self.goal) * 100:.1f}% {word} the goal"

    def row(self) -> dict[str, Any]:
        """A JSON-ready dictionary."""
        return {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "goal": None if self.goal is None else f"{self.op} {self.goal:g}",
            "status": self.status,
            "margin": self.margin,
            "note": self.note,
        }


def _fmt(v: float) -> str:
    """A compact number."""
    if v == 0 or 0.001 <= abs(v) < 1e6:
        return f"{v:.4g}"
    return f"{v:.3e}"


@dataclass
class Report:
    """The results of one benchmark run."""

    name: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def add(self, *args: Any, **kwargs: Any) -> Figure:
        """Add a figure (``Figure`` arguments), print it and return it."""
        fig = Figure(*args, **kwargs)
        self.figures.append(fig)
        goal = "" if fig.goal is None else f"  (goal {fig.op} {fig.goal:g}: {fig.status}, {fig.margin})"
        print(f"{fig.name}: {_fmt(fig.value)} {fig.unit}{goal}", flush=True)
        return fig

    def note(self, text: str) -> None:
        """Add a note (printed and written)."""
        self.notes.append(text)
        print(f"note: {text}", flush=True)

    def write(self, out_dir: Path = RESULTS) -> tuple[Path, Path]:
        """Write ``<name>.json`` and ``<name>.md``; return their paths."""
        out_dir.mkdir(parents=True, exist_ok=True)
        data = {
            "benchmark": self.name,
            "title": self.title,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "seconds": round(time.time() - self.started, 1),
            "git_commit": git_commit(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "machine": machine(),
            "figures": [f.row() for f in self.figures],
            "details": self.details,
            "notes": self.notes,
        }
        js = out_dir / f"{self.name}.json"
        js.write_text(json.dumps(data, indent=1, default=str) + "\n")
        lines = [
            f"# {self.title}",
            "",
            f"- date: {data['date']} ({data['seconds']} s)",
            f"- commit: `{data['git_commit']}`",
            f"- command: `{data['command']}`",
            "- machine: " + ", ".join(f"{k} {v}" for k, v in data["machine"].items() if v is not None),
            "",
            "| figure | value | goal | status | margin | note |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for f in self.figures:
            goal = "" if f.goal is None else f"{f.op} {f.goal:g} {f.unit}".strip()
            lines.append(
                f"| {f.name} | {_fmt(f.value)} {f.unit} | {goal} | {f.status} | {f.margin} | {f.note} |"
            )
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        if self.details:
            lines += ["", "## Details", "", "```json", json.dumps(self.details, indent=1, default=str), "```"]
        md = out_dir / f"{self.name}.md"
        md.write_text("\n".join(lines) + "\n")
        print(f"wrote {md}\nwrote {js}", flush=True)
        return md, js


# --- inputs ------------------------------------------------------------------------------------------------


def synthetic_ct(
    shape: tuple[int, int, int] = BIG_SHAPE, spacing: tuple[float, float, float] = BIG_SPACING, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """An int16 CT phantom of ``shape``: built at half resolution, upsampled x2, CT-like noise added."""
    from napari_apl.core.phantom import make_phantom

    half = tuple(max(1, s // 2) for s in shape)
    image, _labels, affine = make_phantom("ct", seed, shape=half, spacing=tuple(2 * s for s in spacing))
    big = np.repeat(np.repeat(np.repeat(image, 2, 0), 2, 1), 2, 2)
    big = big[: shape[0], : shape[1], : shape[2]]
    rng = np.random.default_rng(seed)
    noise = rng.integers(-12, 13, size=big.shape, dtype=np.int16)
    big = np.clip(big.astype(np.int16) + noise, -1024, 3071).astype(np.int16)
    aff = affine.copy()
    aff[:3, :3] = affine[:3, :3] / 2.0
    return big, aff


def synthetic_ct_file(
    shape: tuple[int, int, int] = BIG_SHAPE, spacing: tuple[float, float, float] = BIG_SPACING, seed: int = 0
) -> Path:
    """The synthetic CT as an int16 ``.nii.gz`` in ``benchmarks/cache`` (written once, then reused)."""
    import nibabel as nib

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"synthetic_ct_{'x'.join(map(str, shape))}_s{seed}.nii.gz"
    if not path.exists():
        t0 = time.perf_counter()
        image, affine = synthetic_ct(shape, spacing, seed)
        img = nib.Nifti1Image(image, affine)
        img.set_data_dtype(np.int16)
        tmp = path.with_name(path.name + ".tmp.nii.gz")
        nib.save(img, str(tmp))
        os.replace(tmp, path)
        print(f"wrote {path} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return path


def demo_like_model(base: int = 12, seed: int = 0) -> tuple[Any, Any, str]:
    """The benchmark model: unet-dual at 2.5 mm / 160 px; the demo's weights when they fit, else untrained."""
    import torch

    from napari_apl.core.checkpoint import CheckpointMeta
    from napari_apl.core.models import build_model

    torch.manual_seed(seed)
    model = build_model("unet-dual", base=base)
    source = f"untrained unet-dual base {base} (seed {seed})"
    demo = REPO / "resources" / "demo_unet_dual.pt"
    if demo.is_file():
        from napari_apl.core.checkpoint import load_checkpoint

        try:
            trained, _meta = load_checkpoint(demo)
            if trained.arch_args.get("base") == base:
                model = trained
                source = f"resources/demo_unet_dual.pt weights (base {base}), run at 2.5 mm / 160 px"
        except Exception as exc:  # a broken demo file must not stop a benchmark
            source += f" (demo checkpoint not usable: {exc})"
    meta = CheckpointMeta(
        arch="unet-dual",
        arch_args=dict(model.arch_args),
        input_size=MODEL_INPUT,
        spacing=MODEL_SPACING,
        normalization={"kind": "ct_window", "level": 40.0, "width": 400.0},
        provenance={"note": source},
    )
    return model.eval(), meta, source


def peak_rss_gb() -> float:
    """This process's own peak resident set size in GB (10^9 bytes).

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this process's memory since its exec
    (``ru_maxrss`` would also carry the peak of the parent that started it). Elsewhere ``ru_maxrss``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if sys.platform != "darwin" else 1 / 1024) * 1024 / 1e9


# --- viewer helpers ----------------------------------------------------------------------------------------


def ensure_display() -> Any:
    """Start a private Xvfb display when there is none (returns the process, or None)."""
    import atexit
    import shutil

    if os.environ.get("DISPLAY") or os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        return None
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
        return None
    for number in range(90, 120):
        if Path(f"/tmp/.X{number}-lock").exists():
            continue
        proc = subprocess.Popen(
            [xvfb, f":{number}", "-screen", "0", "1600x1000x24", "-nolisten", "tcp"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)
        if proc.poll() is None:
            os.environ["DISPLAY"] = f":{number}"
            atexit.register(proc.terminate)
            return proc
    raise RuntimeError("could not start Xvfb")


def display_kind() -> str:
    """Which display the viewer figures were measured on (an X display, or Qt's offscreen platform)."""
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        return "Qt offscreen platform (no X display: not the goal's real viewer under Xvfb)"
    return f"X display {os.environ.get('DISPLAY', '?')}"


def viewer_with_ct(path: Path, name: str = "CT") -> tuple[Any, Any]:
    """A shown napari viewer holding the CT at ``path`` as the plugin's reader would open it.

    The widget's autosaves go to a fresh folder of this run (unless one is set): an earlier run's
    session of the same synthetic file would otherwise wait for Recover/Discard and block autosaving,
    which a user's ordinary session does not do.
    """
    ensure_display()
    import napari

    from napari_apl.core.autosave import AUTOSAVE_DIR_ENV

    os.environ.setdefault(AUTOSAVE_DIR_ENV, tempfile.mkdtemp(prefix="apl_bench_autosave_"))

    from napari_apl._layers import image_layer_data
    from napari_apl.core.volume import load_volume

    viewer = napari.Viewer(show=True)
    data, kwargs, _kind = image_layer_data(load_volume(path), name)
    layer = viewer.add_image(data, **kwargs)
    process_events(0.2)
    return viewer, layer


def run_event_loop_while(busy: Callable[[], bool], check_ms: int = 50, linger_ms: int = 0) -> None:
    """Run Qt's own blocking event loop, as a napari session does, until ``busy()`` turns false
    (and ``linger_ms`` longer: the redraws that follow the last work are measured too).

    A Python loop of ``processEvents`` calls would keep the main thread polling (and taking the GIL)
    every few ms; measured here it slowed a refinement worker by a third against Qt's loop.
    """
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    timer = QTimer()
    timer.setInterval(check_ms)
    ended: list[bool] = []

    def check() -> None:
        if not ended and not busy():
            ended.append(True)
            QTimer.singleShot(linger_ms, loop.quit)

    timer.timeout.connect(check)
    timer.start()
    check()
    loop.exec()
    timer.stop()


def process_events(seconds: float = 0.0) -> None:
    """Let Qt process events for ``seconds`` (at least once)."""
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + seconds
    while True:
        QApplication.processEvents()
        if time.perf_counter() >= end:
            return
        time.sleep(0.005)


def rss_gb() -> float:
    """This process's current resident set size in GB (10^9 bytes)."""
    import psutil

    return psutil.Process().memory_info().rss / 1e9
