"""MRI -> CT on real scans: the paper's Table 2 with a source model trained here on CHAOS T2-SPIR.

What it does (every figure it writes is measured by this run):

1. trains (or reuses from ``benchmarks/cache/``, keyed by a hash of the settings and file names) a
   dual-head source model on all 16 CHAOS T2-SPIR volumes, and ``--folds`` cross-validation models
   whose held-out Dice is reported per fold;
2. on the real CT (``totalseg/ct_sm``, abdomen window L40/W400) reports the no-adaptation row and one
   row per refinement method (APL with the engine's defaults and the baselines at their settings in
   ``core.refine.METHOD_DEFAULTS``), per-organ Dice, average Dice and average ASSD, mean ± standard
   deviation over ``--seeds`` refinement seeds, all from the same start model and iteration budget;
   ``--methods ablations`` adds the ``VARIANTS`` rows (each baseline without the student augmentation,
   APL's previous default, the geometric student view);
3. the same table on a synthetic MRI -> CT phantom pair (the shipped demo model, trained on MRI
   phantoms only, refined on a CT phantom) and on ``totalseg/mr_sm`` (a second MRI in LPS
   orientation: in-domain sanity);
4. writes ``benchmarks/results/mri_to_ct.md`` and ``.json`` with the date, commit, machine and wall time.

Run: ``python benchmarks/mri_to_ct.py`` (``--quick`` for a smoke run with tiny budgets; results of a
quick run go to ``mri_to_ct_quick.*``). Data: ``$NAPARI_APL_DATA`` or ``../shared/data``. Models to
train and refinement runs go to ``--jobs`` worker processes side by side (one per core by default,
each with its share of the cores as torch threads; a target's runs are queued as soon as its start
model is trained, behind the cross-validation models already queued); ``--runs-dir`` redoes the
refinement runs in another cache and compares each with the cached one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

from napari_apl.core.checkpoint import load_checkpoint
from napari_apl.core.infer import predict_volume
from napari_apl.core.labels import CLASS_NAMES
from napari_apl.core.metrics import evaluate, json_safe
from napari_apl.core.postprocess import largest_components
from napari_apl.core.preprocess import get_preset
from napari_apl.core.refine import METHODS, RefineConfig, _cpu_has_native_bf16, refine
from napari_apl.core.train import TrainConfig, pair_files, train_source
from napari_apl.core.utils import run_generator
from napari_apl.core.volume import load_volume, volume_from_array

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "benchmarks" / "cache"
RESULTS = REPO / "benchmarks" / "results"
ORGANS = CLASS_NAMES[1:]

# The source recipe used on CHAOS (the full model and every CV fold differ only in data): the
# train-source defaults (45 epochs, 160 x 160 px at 2.5 mm), trained channels-last in bf16 autocast
# where the CPU computes bf16 natively, which made a step 4.2x faster there (3.6 -> 0.87 s for 16
# slices, 1 thread) at the same recipe; in float32 elsewhere (on an AVX2-only CPU emulated bf16 made
# a forward of this model 9x slower than float32: 2.1 s against 0.24 s for 8 slices). The
# earlier 14 epochs at 3 mm / 112 px, chosen for time, under-fitted: 4-fold CV 39.8 average Dice
# (8 epochs per fold), both kidneys merged into one class on held-out cases; 30 epochs gave CV 78.5.
SOURCE = TrainConfig(
    arch="unet-dual",
    arch_args={"base": 16},
    epochs=45,
    batch_size=16,
    lr=1e-3,
    spacing=(2.5, 2.5),
    input_size=(160, 160),
    normalization="mri",
    seed=0,
    device="cpu",
    channels_last=True,
    amp=_cpu_has_native_bf16(),
)
CV_EPOCHS = 45
PHANTOM_SEED = 100  # CT phantom of the synthetic pair (the demo model never saw a CT, nor this anatomy)


def data_dir() -> Path:
    """The shared real-data folder."""
    return Path(os.environ.get("NAPARI_APL_DATA", REPO.parent / "shared" / "data")).expanduser()


def log(msg: str) -> None:
    """Print a timestamped progress line."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- source models ------------------------------------------------------------------------------------


def cache_path(tag: str, cfg: TrainConfig, pairs) -> Path:
    """Return the cache file of a source model trained with ``cfg`` on ``pairs`` (keyed by a hash)."""
    d = asdict(cfg)
    if d.get("device") == "cpu":  # (CPU models keep the keys they were cached under; others are keyed apart)
        d.pop("device")
    key = json.dumps({"cfg": d, "files": [Path(a).name for a, _ in pairs]}, sort_keys=True, default=list)
    return CACHE / f"{tag}_{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"


def cached_source(tag: str, cfg: TrainConfig, pairs, threads: int | None = None) -> Path:
    """Train a source model unless the cache holds one with the same settings; return its path."""
    if threads:
        torch.set_num_threads(threads)
    out = cache_path(tag, cfg, pairs)
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        log(f"training {out.name} ({cfg.epochs} epochs on {len(pairs)} volumes)")
        t0 = time.perf_counter()
        run_generator(train_source(pairs, out, cfg))  # resumes from its .train-state if interrupted
        seconds = time.perf_counter() - t0
        out.with_suffix(".json").write_text(json.dumps({"seconds": seconds, "epochs": cfg.epochs}))
        log(f"trained {out.name} in {seconds:.0f} s")
    return out


def training_seconds(ck: Path) -> float:
    """Seconds the cached model took to train (as recorded when it was trained; 0 if unknown)."""
    side = ck.with_suffix(".json")
    return float(json.loads(side.read_text())["seconds"]) if side.exists() else 0.0


def folds_of(pairs, k: int) -> list[list[int]]:
    """Deterministic k-fold split of the (naturally sorted) cases: fold j holds cases j, j+k, ..."""
    return [list(range(j, len(pairs), k)) for j in range(k)]


def score(labels: np.ndarray, gt: np.ndarray, spacing, largest: bool = True) -> dict:
    """Dice (%) per organ, average Dice (%) and average ASSD (mm) of one label volume.

    With ``largest`` the same figures of the labels after keeping each organ's largest connected
    piece (``napari-apl predict --largest-component``) go under ``"largest"``.
    """
    r = evaluate(labels, gt, spacing)
    out = {
        "dice": {n: 100 * r["dice"][n] for n in ORGANS},
        "avg": 100 * r["mean_dice"],
        "assd": r["mean_assd"],
    }
    if largest:
        out["largest"] = score(largest_components(labels), gt, spacing, largest=False)
    return out


def cv_jobs(pairs, folds: int, cfg: TrainConfig) -> list[tuple[str, TrainConfig, list]]:
    """The ``cached_source`` arguments of each fold's model: (tag, settings, training pairs)."""
    out = []
    for j, held in enumerate(folds_of(pairs, folds)):
        train = [p for i, p in enumerate(pairs) if i not in held]
        out.append((f"chaos_cv{folds}_fold{j}", cfg, train))
    return out


def start_training(jobs: list[tuple[str, TrainConfig, list]], pool, threads: int) -> dict:
    """Queue the models of ``jobs`` that are not cached on ``pool``, longest first; their futures by tag."""
    todo = [j for j in jobs if not cache_path(*j).exists()]
    todo.sort(key=lambda j: -len(j[2]) * j[1].epochs)
    return {j[0]: pool.submit(cached_source, *j, threads) for j in todo}


def source_cv(pairs, folds: int, cfg: TrainConfig, only_train: bool = False) -> list[dict]:
    """Train (or reuse) one model per fold and score it on its held-out volumes."""
    rows = []
    for j, (held, job) in enumerate(zip(folds_of(pairs, folds), cv_jobs(pairs, folds, cfg))):
        ck = cached_source(*job)
        if only_train:
            continue
        model, meta = load_checkpoint(ck)
        per_case = []
        for i in held:
            vol, lab = load_volume(pairs[i][0]), load_volume(pairs[i][1])
            pred = predict_volume(model, meta, vol, device=cfg.device).pseudo
            s = score(pred, np.asarray(lab.data).round().astype(np.int16), vol.spacing)
            per_case.append(s)
        row = {
            "fold": j,
            "train_seconds": training_seconds(ck),
            "held_out": [Path(pairs[i][0]).name for i in held],
            "dice": {n: float(np.mean([c["dice"][n] for c in per_case])) for n in ORGANS},
            "avg": float(np.mean([c["avg"] for c in per_case])),
            "assd": float(np.mean([c["assd"] for c in per_case])),
            "largest": {
                "dice": {n: float(np.mean([c["largest"]["dice"][n] for c in per_case])) for n in ORGANS},
                "avg": float(np.mean([c["largest"]["avg"] for c in per_case])),
                "assd": float(np.mean([c["largest"]["assd"] for c in per_case])),
            },
        }
        log(f"fold {j}: held-out avg Dice {row['avg']:.1f}")
        rows.append(row)
    return rows


# --- refinement rows ----------------------------------------------------------------------------------


def file_hash(path: Path) -> str:
    """Short SHA-1 of a file's bytes (keys the per-run cache to the exact start model)."""
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:12]


def predict_labels(model, meta, vol, norm, device: str = "cpu") -> np.ndarray:
    """The merged-heads label volume of ``model`` on ``vol`` (what a user gets from ``predict``)."""
    return predict_volume(model, meta, vol, normalization=norm, device=device).pseudo


# Settings that only the APL label rule reads; left out of other methods' run keys (they cannot
# change those runs), so cached baseline runs stay valid when they change.
APL_ONLY = ("class_norm", "class_balance_volume", "class_select", "background_select")


# Settings added after runs were cached, with the value that reproduces those runs: left out of the
# key at that value, so the cached runs stay valid.
NEUTRAL = {
    "bn_mix": 1.0,
    "augment": "none",
    "augment_geometry": False,
    "class_select": False,
    "background_select": False,
}


# Extra rows: a method with settings that differ from its defaults (row name -> method, overrides).
# Every method shares the engine's training recipe, student augmentation included; the "no aug" rows
# are each baseline without it, so that each is shown at its better setting, and the "previous" row is
# APL's default before student augmentation.
BASELINES = ("apl-con", "threshold", "cbst", "mrnet")
VARIANTS: dict[str, tuple[str, dict]] = {
    "apl (+ geometry)": ("apl", {"augment_geometry": True}),
    "apl (previous default)": ("apl", {"augment": "none", "class_balance_power": 0.25}),
    **{f"{m} (no aug)": (m, {"augment": "none"}) for m in BASELINES},
    **{f"{m} (+ geometry)": (m, {"augment_geometry": True}) for m in ("threshold", "cbst")},
}
# Rows run only on request (``--methods all`` or by name): APL with CBST's class-wise selection of the
# pixels it learns from (``class_select``, at three portions, and with the geometric view) and with
# the selection of background pixels alone (``background_select``). Measured on a GPU-trained source
# model (benchmarks/results/mri_to_ct_gpu*.md); not in the default table, whose run time they would
# raise by 40 %.
EXPLORE: dict[str, tuple[str, dict]] = {
    "apl (+ class selection)": ("apl", {"class_select": True}),
    "apl (+ class selection at 0.3)": ("apl", {"class_select": True, "class_norm": 0.3}),
    "apl (+ class selection at 0.7)": ("apl", {"class_select": True, "class_norm": 0.7}),
    "apl (+ class selection at 0.3 + geometry)": (
        "apl",
        {"class_select": True, "class_norm": 0.3, "augment_geometry": True},
    ),
    "apl (+ background selection)": ("apl", {"background_select": True}),
    "apl (+ background selection at 0.3)": ("apl", {"background_select": True, "class_norm": 0.3}),
    # one setting of APL's recipe moved from its default (benchmarks/results/mri_to_ct_gpu_sweep.md)
    "apl (foreground sampling 1.0)": ("apl", {"foreground_sampling": 1.0}),
    "apl (foreground sampling 0.25)": ("apl", {"foreground_sampling": 0.25}),
    "apl (teacher decay 0.999)": ("apl", {"teacher_decay": 0.999}),
    "apl (teacher decay 0.98)": ("apl", {"teacher_decay": 0.98}),
    "apl (teacher decay 0.97)": ("apl", {"teacher_decay": 0.97}),
    "apl (teacher decay 0.95)": ("apl", {"teacher_decay": 0.95}),
    "apl (ensemble decay 0.9)": ("apl", {"ensemble_decay": 0.9}),
    "apl (batch 16)": ("apl", {"batch_size": 16}),
    # the iteration budget (every method shares it: a longer budget for APL is judged against the
    # baselines at the same budget)
    **{f"{m} ({n} iterations)": (m, {"iterations": n}) for m in METHODS for n in (100, 400, 800)},
    # the student in bf16 autocast too (float32 losses), as on CUDA: ~1.9x faster training steps on a CPU
    # with native bf16; whether it changes the masks
    "apl (bf16 student)": ("apl", {"amp": True}),
    # the baselines at the faster teacher too: a default for APL is only judged against them at it
    **{f"{m} (teacher decay 0.98)": (m, {"teacher_decay": 0.98}) for m in BASELINES},
    "apl (+ geometry; teacher decay 0.98)": ("apl", {"augment_geometry": True, "teacher_decay": 0.98}),
    "threshold (+ geometry; teacher decay 0.98)": (
        "threshold",
        {"augment_geometry": True, "teacher_decay": 0.98},
    ),
}
# The default table is the issue's: the no-adaptation row and one row per method, each at the shared
# recipe. In the full run with the ablation rows (2026-11-26, benchmarks/results/
# mri_to_ct_ablations.md) that was each baseline's better setting: without the augmentation threshold,
# cbst and mrnet lost 1.2 to 5.0 points on the CT and the synthetic pair (threshold and mrnet gained 0.7
# and 0.4 on mr_sm), apl-con tied; the geometric view helped threshold on that source model's CT (+2.0)
# and cost it 2.3 with the next model's (mri_to_ct_cpu_model2.md). The ablation rows (``VARIANTS``) run
# with ``--methods ablations``; they took 2.3x the refinement compute of these rows (1.5x the whole
# run's), and the issue allows the benchmark an hour.
ROWS = tuple(METHODS)
ABLATIONS = tuple(VARIANTS)
VARIANTS |= EXPLORE  # every row name, on request or not, resolves through VARIANTS

# The results file lists the settings every method reads once, then each row's own (what its method
# reads, and any shared setting it changes).
SHARED_KEYS = (
    "iterations batch_size lr bn bn_mix teacher_decay ensemble_decay augment augment_geometry "
    "foreground_sampling collapse_guard guard_every guard_min_pixels"
).split()
METHOD_KEYS = {
    "apl": (
        "lr_classifier weight class_norm class_balance class_balance_power class_balance_volume "
        "both_heads_ssl"
    ).split(),
    "apl-con": ["lr_classifier", "weight"],
    "threshold": ["tau"],
    "cbst": ["cbst_portion", "cbst_step", "cbst_max", "rounds"],
    "mrnet": ["mrnet_memory"],
}


# Settings only APL's L_SSL step reads that were part of every method's key when the baseline runs
# were cached: other methods' keys hold them at that value whatever the default (they cannot change
# those runs), so a new APL default does not invalidate the baselines.
APL_ONLY_PINNED = {"class_balance": True, "class_balance_power": 0.5}


def run_key(cfg: RefineConfig) -> dict:
    """The settings that identify a cached refinement run."""
    d = cfg.to_dict()
    if cfg.method != "apl":
        for k in APL_ONLY:
            d.pop(k, None)
        d.update(APL_ONLY_PINNED)
    for k, v in NEUTRAL.items():
        if d.get(k) == v:
            d.pop(k)
    return d


def run_path(runs_dir: Path, name: str, ck: Path, cfg: RefineConfig) -> Path:
    """The cache file of one refinement run (keyed by the start model's bytes, the target and ``run_key``)."""
    key = json.dumps({"model": file_hash(ck), "target": name, "cfg": run_key(cfg)}, sort_keys=True)
    return runs_dir / f"{name}_{cfg.method}_{cfg.seed}_{hashlib.sha1(key.encode()).hexdigest()[:12]}.json"


_TARGETS: dict = {}  # a worker's loaded targets (each process loads a scan once)


def load_target(t: str, data: Path) -> tuple[str, Path | None, object, np.ndarray, object]:
    """Target ``t`` (ct, mr or phantom): name, start model (None: the CHAOS one), volume, labels, preset."""
    if t in _TARGETS:
        return _TARGETS[t]
    if t in ("ct", "mr"):  # real scans, the CHAOS source model
        name = f"{t}_sm"
        ts = data / "totalseg"
        vol = load_volume(ts / f"{name}.nii.gz")
        gt = np.asarray(load_volume(ts / f"{name}_labels.nii.gz").data).round().astype(np.int16)
        out = (name, None, vol, gt, get_preset("ct-abdomen") if t == "ct" else None)
    elif t == "phantom":  # the synthetic pair, the demo model
        from napari_apl.core.phantom import make_phantom

        image, labels, affine = make_phantom("ct", PHANTOM_SEED)
        vol = volume_from_array(image, affine)
        gt = volume_from_array(labels, affine).data.astype(np.int16)
        out = (
            f"ct_phantom{PHANTOM_SEED}",
            REPO / "resources" / "demo_unet_dual.pt",
            vol,
            gt,
            get_preset("ct-abdomen"),
        )
    else:
        raise ValueError(f"unknown target {t!r}: ct, phantom or mr")
    _TARGETS[t] = out
    return out


def refine_run(t: str, data: Path, ck: Path, cfg: RefineConfig, path: Path, threads: int) -> dict:
    """Run one refinement of target ``t`` from ``ck``, score it and cache the row (a worker's job)."""
    torch.set_num_threads(threads)
    _, _, vol, gt, norm = load_target(t, data)
    model, meta = load_checkpoint(ck)
    t1 = time.perf_counter()
    res = run_generator(refine(model, meta, vol, cfg))
    pred = predict_labels(res.model, meta, vol, norm, cfg.device)
    row = score(pred, gt, vol.spacing)
    # the labels too, so that later scoring (e.g. post-processing) needs no rerun
    np.savez_compressed(path.with_suffix(".npz"), labels=pred.astype(np.uint8))
    row |= {"seconds": time.perf_counter() - t1, "iterations_done": res.iterations_done, "notes": res.notes}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(row))
    os.replace(tmp, path)
    return row


def target_configs(
    methods, seeds, norm, iterations: int | None, device: str = "cpu"
) -> list[tuple[str, list[RefineConfig]]]:
    """Each row's refinement settings, one per seed."""
    out = []
    for method in methods:
        base, overrides = VARIANTS.get(method, (method, {}))
        cfgs = []
        for seed in seeds:
            cfg = RefineConfig.for_method(
                base, seed=seed, device=device, normalization=norm.to_dict() if norm else None, **overrides
            )
            if iterations is not None:
                cfg.iterations = iterations
            cfgs.append(cfg)
        out.append((method, cfgs))
    return out


def submit_target(
    t: str, data: Path, ck: Path, rows, runs_dir: Path, pool, threads: int, cached_only: bool
) -> dict:
    """Start the runs of target ``t`` that are not cached on ``pool``; return their futures by cache file."""
    name = load_target(t, data)[0]
    futures = {}
    for _, cfgs in rows:
        for cfg in cfgs:
            path = run_path(runs_dir, name, ck, cfg)
            if not path.exists() and not cached_only and path not in futures:
                futures[path] = pool.submit(refine_run, t, data, ck, cfg, path, threads)
    return futures


def collect_target(
    t: str, data: Path, ck: Path, rows, runs_dir: Path, futures: dict, reference: Path, device: str = "cpu"
) -> dict:
    """No-adaptation row plus one row per method and seed on one target (waiting for its runs)."""
    name, _, vol, gt, norm = load_target(t, data)
    model, meta = load_checkpoint(ck)
    t0 = time.perf_counter()
    start = score(predict_labels(model, meta, vol, norm, device), gt, vol.spacing)
    out = {
        "target": name,
        "start_model": ck.name,
        "runs": {"no adaptation": [start | {"seconds": time.perf_counter() - t0}]},
    }
    log(f"{name}: no adaptation avg Dice {start['avg']:.1f}")
    for method, cfgs in rows:
        got = []
        for cfg in cfgs:
            path = run_path(runs_dir, name, ck, cfg)
            if path in futures:
                futures[path].result()
                fresh = True
            elif path.exists():
                fresh = False
            else:  # --cached-only
                continue
            row = json.loads(path.read_text())
            row["cached"] = not fresh
            labels_file = path.with_suffix(".npz")
            if "largest" not in row and labels_file.exists():  # a run cached before this figure
                with np.load(labels_file) as z:
                    row["largest"] = score(largest_components(z["labels"]), gt, vol.spacing, False)
            old = reference / path.name
            if runs_dir.resolve() != reference.resolve() and old.exists():  # the same run cached earlier
                # (through strict JSON: an organ absent on both sides is NaN, which equals nothing)
                row["same_as_cached"] = json_safe(json.loads(old.read_text())["dice"]) == json_safe(
                    row["dice"]
                )
            log(f"{name}: {method} seed {cfg.seed}: avg Dice {row['avg']:.1f} ({row['seconds']:.0f} s)")
            got.append(row)
        if not got:
            continue
        out["runs"][method] = got
        out.setdefault("config", {})[method] = {
            k: v for k, v in cfgs[-1].to_dict().items() if k not in ("seed", "normalization")
        }
    return out


def summarise(runs: list[dict]) -> dict:
    """Mean and standard deviation (over seeds) of every figure of a row."""

    def ms(vals):
        v = np.asarray(vals, dtype=float)
        return [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0]

    out = {
        "dice": {n: ms([r["dice"][n] for r in runs]) for n in ORGANS},
        "avg": ms([r["avg"] for r in runs]),
        "assd": ms([r["assd"] for r in runs]),
        "n": len(runs),
    }
    if all("largest" in r for r in runs):
        out["largest_avg"] = ms([r["largest"]["avg"] for r in runs])
        out["largest_assd"] = ms([r["largest"]["assd"] for r in runs])
    return out


def acceptance(table: dict, row: str = "apl") -> dict:
    """The issue's acceptance checks on one target: an APL row vs its start and vs every baseline row."""
    s = {k: summarise(v) for k, v in table["runs"].items()}
    if row not in s:
        return {}
    start, apl = s["no adaptation"], s[row]
    gain = apl["avg"][0] - start["avg"][0]
    losses = {n: apl["dice"][n][0] - start["dice"][n][0] for n in ORGANS}
    others = {k: v["avg"][0] for k, v in s.items() if VARIANTS.get(k, (k,))[0] in BASELINES}
    return {
        "gain_avg_dice": gain,
        "gain_at_least_5": gain >= 5.0,
        "organ_change": losses,
        "no_organ_loses_more_than_2": min(losses.values()) >= -2.0,
        "beats_every_baseline": all(apl["avg"][0] >= v for v in others.values()),
        "best_baseline": max(others, key=others.get) if others else None,
        "best_baseline_avg_dice": max(others.values()) if others else None,
    }


def fmt(ms, digits=1) -> str:
    """``mean ± sd``."""
    m, sd = ms
    if not math.isfinite(m):
        return "inf" if m > 0 else "nan"
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def table_md(table: dict) -> list[str]:
    """Markdown rows of one target's table."""
    lines = [
        "| method | " + " | ".join(ORGANS) + " | avg Dice | avg ASSD (mm) | largest piece: avg Dice | ASSD |",
        "|---" * (len(ORGANS) + 5) + "|",
    ]
    for name, runs in table["runs"].items():
        s = summarise(runs)
        post = f"{fmt(s['largest_avg'])} | {fmt(s['largest_assd'], 2)}" if "largest_avg" in s else "- | -"
        lines.append(
            f"| {name} | "
            + " | ".join(fmt(s["dice"][n]) for n in ORGANS)
            + f" | **{fmt(s['avg'])}** | {fmt(s['assd'], 2)} | {post} |"
        )
    return lines


def git_commit() -> str:
    """The checked-out commit (and whether the tree has local changes besides the results files)."""
    if os.environ.get("GIT_COMMIT"):  # a copied tree (e.g. on a lent GPU machine) whose .git may be stale
        return os.environ["GIT_COMMIT"]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(  # the results this script rewrites do not count as changes
            ["git", "status", "--porcelain", "--", ".", ":(exclude)benchmarks/results"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    """Run the benchmark and write the results files."""
    p = argparse.ArgumentParser(description="MRI -> CT benchmark on real scans (Table 2 of the APL paper).")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 epochs, 2 folds, 1 seed, 10 iterations")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--folds", type=int, default=4)
    p.add_argument(
        "--methods",
        default=",".join(ROWS),
        help="comma-separated rows: the refinement methods (the default), VARIANTS and EXPLORE rows by name; "
        "'ablations' for the methods and every VARIANTS row, 'all' for every row",
    )
    p.add_argument("--targets", default="ct,phantom,mr", help="comma-separated: ct, phantom, mr")
    p.add_argument(
        "--jobs",
        type=int,
        default=min(os.cpu_count() or 1, 8),
        help="worker processes: models to train and refinement runs go side by side (default: one per "
        "core, at most 8)",
    )
    p.add_argument(
        "--threads", type=int, help="torch CPU threads per worker (default: the cores shared among the jobs)"
    )
    p.add_argument(
        "--runs-dir",
        type=Path,
        default=CACHE / "runs",
        help="cache of refinement runs (another folder reruns them; rows are compared with the cached ones)",
    )
    p.add_argument("--stem", default="mri_to_ct", help="results file name under benchmarks/results")
    p.add_argument("--skip-cv", action="store_true", help="do not train / score the cross-validation models")
    p.add_argument(
        "--cached-only",
        action="store_true",
        help="only report refinement runs already in the runs cache (--runs-dir)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (the benchmark) or cuda: models train in bf16 autocast and refine at the engine's CUDA "
        "defaults, cached apart from the CPU models; use with its own --stem and --runs-dir",
    )
    args = p.parse_args(argv)
    refusal = _common.device_refusal(args.device)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    groups = {"all": [*METHODS, *VARIANTS], "ablations": [*METHODS, *ABLATIONS]}
    methods = groups.get(args.methods) or [m for m in args.methods.split(",") if m]
    unknown = ", ".join(repr(m) for m in methods if m not in METHODS and m not in VARIANTS)
    if unknown:
        print(f"unknown row(s) {unknown}: see METHODS, VARIANTS and EXPLORE in {__file__}", file=sys.stderr)
        return 2
    jobs = max(1, args.jobs)
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    data = data_dir()
    if not (data / "chaos_t2").is_dir():
        print(f"real data folder {data} not found: set NAPARI_APL_DATA", file=sys.stderr)
        return 2
    pairs = pair_files(str(data / "chaos_t2" / "image_*.nii.gz"), str(data / "chaos_t2" / "label_*.nii.gz"))
    source = SOURCE if args.device == "cpu" else replace(SOURCE, device=args.device, amp=True)
    src_cfg = replace(source, epochs=2) if args.quick else source
    cv_cfg = replace(source, epochs=1 if args.quick else CV_EPOCHS)
    folds = 2 if args.quick else args.folds
    seeds = list(range(1 if args.quick else args.seeds))
    iterations = 10 if args.quick else None
    settings = {"source": asdict(src_cfg), "cv_epochs": cv_cfg.epochs, "folds": folds, "seeds": seeds}
    results: dict = {
        "settings": settings | {"quick": args.quick, "threads": threads, "jobs": jobs, "device": args.device}
    }
    targets = [t for t in args.targets.split(",") if t]
    runs_dir = args.runs_dir.expanduser().absolute()
    runs_dir.mkdir(parents=True, exist_ok=True)

    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        # 1. the source models, side by side (longest first); a target's refinement runs are queued as
        # soon as their start model exists, behind the models already queued, so that no worker idles
        # while the last cross-validation model trains
        full_job = ("chaos_full" + ("_quick" if args.quick else ""), src_cfg, pairs)
        train = [full_job] if {"ct", "mr"} & set(targets) else []
        train += [] if args.skip_cv else cv_jobs(pairs, folds, cv_cfg)
        training = start_training(train, pool, threads)
        results["settings"] |= {"trained_here": sorted(training), "models_planned": len(train)}
        if train and train[0] is full_job:
            if full_job[0] in training:
                training[full_job[0]].result()
            full_ck = cache_path(*full_job)
        else:
            full_ck = None
        # 2. every refinement run not cached, side by side (the real scans' longer runs first); the
        # targets are scored in order as they finish
        plan = {}
        for t in sorted(targets, key=lambda t: t == "phantom"):
            try:
                _, start_model, _, _, norm = load_target(t, data)
            except ValueError:  # not a target this benchmark knows
                continue
            ck = start_model or full_ck
            rows = target_configs(methods, seeds, norm, iterations, args.device)
            plan[t] = (ck, rows, submit_target(t, data, ck, rows, runs_dir, pool, threads, args.cached_only))
        for f in training.values():
            f.result()
        if not args.skip_cv:
            results["cv"] = source_cv(pairs, folds, cv_cfg)
        results["targets"] = {}
        for t, (ck, rows, futures) in sorted(plan.items(), key=lambda kv: targets.index(kv[0])):
            results["targets"][t] = collect_target(
                t, data, ck, rows, runs_dir, futures, CACHE / "runs", args.device
            )
            # partial results survive an interruption
            finish(results, full_ck, t_start, args.quick, args.stem)
    except BaseException:  # a failed run or Ctrl-C: drop the queued runs instead of waiting for them
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return 0


def finish(results: dict, full_ck: Path | None, t_start: float, quick: bool, stem: str = "mri_to_ct") -> None:
    """Summarise what has been measured so far and write the results files (called after each target)."""
    for t in results["targets"].values():
        t["acceptance"] = acceptance(t)
        t["acceptance_geometry"] = acceptance(t, "apl (+ geometry)")
        t["summary"] = {k: summarise(v) for k, v in t["runs"].items()}
    wall = time.perf_counter() - t_start
    compute = sum(
        r.get("seconds", 0.0) for t in results["targets"].values() for rs in t["runs"].values() for r in rs
    )
    results["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": git_commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
        + (
            f", refinement and training on {torch.cuda.get_device_name()}"
            if results["settings"].get("device") == "cuda"
            else ""
        ),
        "wall_seconds_this_invocation": wall,
        "refinement_compute_seconds": compute,
        "source_training_seconds": training_seconds(full_ck) if full_ck else 0.0,
        "cv_training_seconds": sum(r.get("train_seconds", 0.0) for r in results.get("cv", [])),
    }
    m = results["meta"]
    m["total_compute_seconds"] = (
        m["refinement_compute_seconds"] + m["source_training_seconds"] + m["cv_training_seconds"]
    )
    write_results(results, f"{stem}_quick" if quick else stem)


def reuse_words(results: dict) -> str:
    """What this invocation took from the cache: 'nothing cached' when it trained and ran everything."""
    runs = [
        r
        for t in results["targets"].values()
        for m, rs in t["runs"].items()
        if m != "no adaptation"
        for r in rs
    ]
    trained = results["settings"].get("trained_here")
    if trained is None:  # (results files written before this record)
        return "cached parts reused"
    if len(trained) == results["settings"]["models_planned"] and not any(r.get("cached") for r in runs):
        return "nothing cached: every model trained and every run made in it"
    return "cached parts reused"


def rerun_lines(results: dict) -> list[str]:
    """A line comparing runs redone in another runs cache (``--runs-dir``) with the cached ones."""
    marks = [
        (t, m, r["same_as_cached"])
        for t, tab in results["targets"].items()
        for m, rows in tab["runs"].items()
        for r in rows
        if "same_as_cached" in r
    ]
    if not marks:
        return []
    differ = sorted({f"{t}: {m}" for t, m, same in marks if not same})
    line = (
        f"Refinement runs redone in another cache: {sum(s for *_, s in marks)} of {len(marks)} give the same "
        "per-organ Dice as the runs cached earlier"
    )
    return [line + (f" (different: {'; '.join(differ)})." if differ else "."), ""]


def completeness(results: dict) -> list[str]:
    """Lines saying plainly what a partial run left out (empty for a complete run)."""
    missing = []
    st = results["settings"]
    if len(st["seeds"]) < 3:
        missing.append(f"{len(st['seeds'])} refinement seed(s) instead of 3 (no spread)")
    if not results.get("cv"):
        missing.append("no cross-validation rows (--skip-cv)")
    for t in ("ct", "phantom", "mr"):
        if t not in results["targets"]:
            missing.append(f"no {t} table")
    for key, t in results["targets"].items():
        absent = [m for m in METHODS if m not in t["runs"]]
        if absent:
            missing.append(f"{key}: no {', '.join(absent)} row(s)")
    if not missing:
        return []
    return ["**PARTIAL RUN — not the complete benchmark:** " + "; ".join(missing) + ".", ""]


def rows_lines(results: dict) -> list[str]:
    """The paragraph saying what the rows are (the ablation rows' meaning only where there are any)."""
    line = (
        "Rows: `apl` and each baseline with the engine's shared recipe (batch-norm mix, EMA teacher, the "
        "student's mild intensity augmentation)"
    )
    rows = {m for t in results["targets"].values() for m in t["runs"]}
    if rows & set(ABLATIONS):
        line += (
            "; `(no aug)` = that baseline without the augmentation, so that each baseline is shown at its "
            "better setting; `(+ geometry)` = with the geometric student view too (`--augment-geometry`, "
            "not the default); `apl (previous default)` = APL before the augmentation (no augmentation, "
            "class weights ∝ 1/frequency^0.25)"
        )
    else:
        line += (
            ". In the full run with the ablation rows (`--methods ablations`, another source model: "
            "`benchmarks/results/mri_to_ct_ablations.md`) that recipe was each baseline's better setting on "
            "the CT and the synthetic pair, except that the geometric view lifted `threshold` on that CT "
            "(+2.0; it cost 2.3 with this model's, `mri_to_ct_cpu_model2.md`); on mr_sm `threshold` and "
            "`mrnet` did 0.7 and 0.4 better without the augmentation"
        )
    return [line + ". The issue's checks are made for the default `apl` row against every baseline row.", ""]


def explore_lines(results: dict) -> list[str]:
    """A line saying what the ``EXPLORE`` rows are, where the results hold any."""
    rows = {m for t in results["targets"].values() for m in t["runs"]}
    if not rows & set(EXPLORE):
        return []
    return [
        "Rows on request (`EXPLORE`): `(+ class selection[ at q])` = APL that also drops from L_SSL the "
        "pixels whose class-normalised ensemble probability is below their class's k_c (`class_select`, "
        "CBST's selection; k_c at portion q = `class_norm`, 0.5 unless named); `(+ background selection)` "
        "= the same for background pixels only (`background_select`); `(<setting> <value>)` = that row's "
        "method with that one setting of the shared recipe moved from its default (foreground sampling 0.5, "
        "teacher decay 0.99, ensemble decay 0.7, batch 8); `apl (bf16 student)` = APL with the student "
        "trained under bf16 autocast too (`amp=True`: the default since 2026-11-27 where bf16 is native, on "
        "CUDA before; on such a CPU the `apl` rows of runs made earlier trained it in float32). None of the "
        "others is a default.",
        "",
    ]


def write_results(results: dict, stem: str) -> None:
    """Write ``benchmarks/results/<stem>.json`` and ``.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    # strict JSON for other tools: an organ absent on both sides is null, a missed one "inf"
    (RESULTS / f"{stem}.json").write_text(
        json.dumps(json_safe(results), indent=1, default=str, allow_nan=False)
    )
    m = results["meta"]
    st = results["settings"]
    src = st["source"]
    L = [
        "# MRI -> CT on real scans (the APL paper's Table 2 setting)",
        "",
        f"Written by "
        f"`benchmarks/mri_to_ct.py`{' --quick (smoke run: NOT the benchmark)' if st['quick'] else ''} on "
        f"{m['date']}, commit {m['commit']}, {m['machine']}."
        + (
            f" This file was rendered again from the run's JSON at commit {m['rendered_again']['commit']}: "
            f"{m['rendered_again']['why']}."
            if m.get("rendered_again")
            else ""
        ),
        f"Compute: source model {m['source_training_seconds'] / 60:.1f} min, CV models "
        f"{m['cv_training_seconds'] / 60:.1f} min, refinement runs "
        f"{m['refinement_compute_seconds'] / 60:.1f} min; "
        f"total {m['total_compute_seconds'] / 60:.1f} min from scratch "
        f"(this invocation: {m['wall_seconds_this_invocation'] / 60:.1f} min wall, {reuse_words(results)}). "
        f"{st.get('jobs', 1)} worker process(es) side by side, {st['threads']} torch thread(s) each. The "
        "machine was shared with other jobs, so times are upper bounds.",
        "",
        "Every figure below is measured by that script. Dice in %, ASSD in mm; refinement rows are mean "
        "± standard "
        f"deviation over {len(st['seeds'])} refinement seed(s) from the same start model, each method "
        f"with the same "
        "iteration budget; the no-adaptation row is deterministic. Predictions are the merged heads' labels "
        "(`argmax(p_main + p_aux)`) of the returned model, scored on the target's voxel grid; the "
        "'largest piece' columns score the same labels after keeping each organ's largest connected "
        "piece (`--largest-component`, not the default output).",
        "",
        *rows_lines(results),
        *explore_lines(results),
        *rerun_lines(results),
        *completeness(results),
        "## Source model: CHAOS T2-SPIR (16 volumes), in-domain cross-validation",
        f"`unet-dual` base {src['arch_args'].get('base')}, {src['input_size'][0]} x "
        f"{src['input_size'][1]} px at "
        f"{src['spacing'][0]:g} mm, `mri` percentile normalisation, domain-randomising augmentation, batch "
        f"{src['batch_size']}, AdamW lr {src['lr']:g}"
        f"{', channels-last' if src.get('channels_last') else ''}"
        f"{', bf16 autocast' if src.get('amp') else ''}"
        f"; full model {src['epochs']} epochs on all 16 "
        f"volumes; each CV fold "
        f"{st['cv_epochs']} epochs on the other folds' volumes (fold j holds cases j, j+{st['folds']}, "
        f"... in natural order).",
        "",
    ]
    if results.get("cv"):
        L += [
            "| fold | held-out cases | " + " | ".join(ORGANS)
            + " | avg Dice | avg ASSD | largest piece: avg Dice | ASSD |",
            "|---" * (len(ORGANS) + 6) + "|",
        ]  # fmt: skip
        for r in results["cv"]:
            cases = ", ".join(c.replace("image_", "").replace(".nii.gz", "") for c in r["held_out"])
            L.append(f"| {r['fold']} | {cases} | " + " | ".join(f"{r['dice'][n]:.1f}" for n in ORGANS)
                     + f" | **{r['avg']:.1f}** | {r['assd']:.2f} | {r['largest']['avg']:.1f}"
                     f" | {r['largest']['assd']:.2f} |")  # fmt: skip
        mean_cv = float(np.mean([r["avg"] for r in results["cv"]]))
        mean_post = float(np.mean([r["largest"]["avg"] for r in results["cv"]]))
        L += ["", f"Mean held-out average Dice over folds: **{mean_cv:.1f}** "
              f"({'meets' if mean_cv >= 80 else 'does NOT meet'} the >= 80 target); keeping each "
              f"organ's largest piece (`--largest-component`): {mean_post:.1f} "
              f"({'meets' if mean_post >= 80 else 'does NOT meet'} it either).", ""]  # fmt: skip
    titles = {
        "ct": "Real CT (`totalseg/ct_sm`, abdomen window L40/W400), source model trained on CHAOS MRI",
        "phantom": f"Synthetic pair: demo model (MRI phantoms only) -> CT phantom seed {PHANTOM_SEED}",
        "mr": "Second real MRI (`totalseg/mr_sm`, LPS orientation, `mri` normalisation): in-domain sanity",
    }
    for key, t in results["targets"].items():
        L += [f"## {titles.get(key, key)}", "", *table_md(t), ""]
        for row, a in (
            ("APL (the default)", t.get("acceptance")),
            ("APL + geometry (an option)", t.get("acceptance_geometry")),
        ):
            if not a:
                continue
            worst = min(a["organ_change"], key=a["organ_change"].get)
            loses = (
                "no organ loses more than 2"
                if a["no_organ_loses_more_than_2"]
                else "an organ loses more than 2 points"
            )
            best = (
                "is at least as good as every baseline row"
                if a["beats_every_baseline"]
                else "is NOT the best row: best baseline row is "
                f"{a['best_baseline']} ({a['best_baseline_avg_dice']:.1f})"
            )
            meets = "meets" if a["gain_at_least_5"] else "does NOT meet"
            L += [
                f"- {row} vs no adaptation: {a['gain_avg_dice']:+.1f} average Dice "
                f"({meets} the +5 target); worst organ change "
                f"{worst} {a['organ_change'][worst]:+.1f} ({loses}); it {best}.",
            ]
        L.append("")
        notes = sorted({n for rs in t["runs"].values() for r in rs for n in r.get("notes", [])})
        if notes:
            L += ["Guard notes from the runs: " + "; ".join(notes), ""]
    any_t = next(iter(results["targets"].values()), None)
    if any_t and any_t.get("config"):
        L += ["## Refinement settings (the engine's per-method defaults, `RefineConfig.for_method`)", ""]
        configs = any_t["config"]
        shared = configs.get("apl") or next(iter(configs.values()))
        L.append(
            "- every row unless it says otherwise: "
            + ", ".join(f"{k}={shared[k]}" for k in SHARED_KEYS if k in shared)
        )
        for meth, cfg in configs.items():
            own = METHOD_KEYS.get(VARIANTS.get(meth, (meth,))[0], ())
            differ = [k for k in SHARED_KEYS if k in cfg and cfg[k] != shared.get(k)]
            items = [f"{k}={cfg[k]}" for k in (*own, *differ) if k in cfg]
            L.append(f"- **{meth}**: " + (", ".join(items) if items else "-"))
        L.append("")
    (RESULTS / f"{stem}.md").write_text("\n".join(L))
    log(f"wrote {RESULTS / (stem + '.md')}")


if __name__ == "__main__":
    sys.exit(main())
