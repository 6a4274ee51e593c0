"""The ``napari-apl`` command line: a thin layer over ``napari_apl.core``."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .core.errors import APLError, OutputError
from .core.labels import CLASS_NAMES
from .core.memory import set_numpy_huge_pages

if TYPE_CHECKING:
    import numpy as np

# What each output map is stored as (see core.infer.encode_map): labels as uint8, ω and the heads'
# disagreement as uint8 with scl_slope 1/255 (readers see floats in [0, 1]).
MAP_DTYPES = {
    "main": "uint8",
    "aux": "uint8",
    "pseudo_label": "uint8",
    "confidence": "uint8 x 1/255",
    "consistency": "uint8 x 1/255",
}


class _Parser(argparse.ArgumentParser):
    """Argument parser whose usage errors are one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print a one-line usage error and exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


_CREATED_DIRS: list[Path] = []


def _out_dir(path: str) -> Path:
    """Return the output folder, creating it when its parent exists; refuse a missing parent.

    A folder created here is removed again by ``main`` when the command fails and leaves it empty.
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out-dir {out} is a file, not a folder: choose a folder")
    if not out.exists():
        if not out.parent.is_dir():
            raise OutputError(f"output folder {out.parent} does not exist: create it first")
        try:
            out.mkdir()
        except OSError as exc:
            raise OutputError(f"cannot create output folder {out}: {exc.strerror}") from exc
        _CREATED_DIRS.append(out)
    return out


def _remove_created_empty_dirs() -> None:
    """Remove output folders this command created and left empty (a failed run writes nothing)."""
    while _CREATED_DIRS:
        folder = _CREATED_DIRS.pop()
        with contextlib.suppress(OSError):
            folder.rmdir()  # only succeeds when empty


def _check_outputs(paths: Sequence[Path], overwrite: bool, inputs: Sequence[str | None]) -> None:
    """Validate every output path before any work starts, so a bad one writes nothing."""
    from .core.io_utils import check_output_path

    for p in paths:
        check_output_path(p, overwrite=overwrite, inputs=tuple(inputs))


def _count(n: int, noun: str) -> str:
    """``n`` and the noun, singular or plural (1 slice, 2 slices)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _normalization(name: str, meta, volume):
    """Resolve ``--normalize`` (a preset name, ``checkpoint`` or ``auto``) to a Normalization."""
    from .core.preprocess import choose_normalization

    notes: list[str] = []
    norm = choose_normalization(name, meta.normalization, volume.data, notes)
    for line in notes:
        print(f"note: {line}", file=sys.stderr)
    return norm


def _check_shared_inputs(args: argparse.Namespace) -> None:
    """Check what every volume of a batch shares (checkpoint, preset, device) once, before a cluster
    starts: a bad one is one line, not one error per volume."""
    from .core.checkpoint import load_checkpoint
    from .core.preprocess import check_preset_name
    from .core.utils import check_device_name, resolve_device

    check_preset_name(args.normalize)
    if not getattr(args, "scheduler", None):  # a local cluster runs on this machine's devices
        resolve_device(args.device)
    else:  # the scheduler's workers have their own devices: only the name can be checked here
        check_device_name(args.device)
    load_checkpoint(args.checkpoint, class_names=CLASS_NAMES)


def _refuse_label_volume(args: argparse.Namespace) -> None:
    """Refuse an input that looks like a label volume, not a scan, before the model is loaded (a few of
    its slices are read); a file that cannot be read is left to the command's own reading to report.

    A volume of a batch was probed by the client already (``labels_checked``). The probe opens the file
    on its own reader: reading its slices out of order would turn the command's front-to-back reader
    into the slower indexed one (see ``load_volume(sequential=True)``)."""
    from .core.preprocess import volume_looks_like_labels
    from .core.volume import load_volume

    if getattr(args, "labels_checked", False):
        return
    path = args.image
    try:
        labels = volume_looks_like_labels(load_volume(path, lazy=True))
    except Exception:
        return
    if labels:
        raise APLError(
            f"{path} looks like a label volume (few non-negative integer values), not an image: give the CT "
            "or MRI scan itself"
        )


class _ReportedBar:
    """A progress bar whose count also goes to the client of the batch this command runs in, if any
    (``core.batch.report_progress``: a volume's progress beside the others' on the client's screen)."""

    def __init__(self, bar: Any, desc: str, total: int) -> None:
        self._bar, self._desc, self._total, self._done = bar, desc, total, 0

    @property
    def n(self) -> int:
        return self._done

    @n.setter
    def n(self, value: int) -> None:
        self._done = int(value)
        self._bar.n = value
        self._report()

    def update(self, k: int = 1) -> None:
        self._done += k
        self._bar.update(k)
        self._report()

    def _report(self) -> None:
        from .core.batch import report_progress

        report_progress(self._desc, self._done, self._total)

    def __getattr__(self, name: str) -> Any:  # refresh, set_postfix, write, close: the bar's own
        return getattr(self._bar, name)


def _progress(total: int, desc: str, quiet: bool) -> _ReportedBar:
    """Return a tqdm progress bar on stderr (disabled with --quiet) that also reports to a batch's client."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="it", disable=quiet, file=sys.stderr, leave=False)
    return _ReportedBar(bar, desc, total)


def _write_maps(pred_maps: dict, out: Path, volume, overwrite: bool) -> list[Path]:
    """Write the prediction maps as NIfTI on the input's voxel grid and affine."""
    from .core.infer import write_maps

    paths = {name: out / f"{name}.nii.gz" for name in pred_maps}
    return list(write_maps(pred_maps, paths, volume, overwrite=overwrite).values())


def _largest_components(maps: dict, corrections: np.ndarray | None = None) -> dict:
    """Keep each organ's largest connected piece in the label maps (the voxels of ``corrections`` in
    ``pseudo_label`` as they are); print what was removed."""
    from .core.labels import CLASS_NAMES
    from .core.postprocess import clean_masks, removal_warnings

    masks = {name: maps[name] for name in ("main", "aux", "pseudo_label")}
    cleaned, removed = clean_masks(masks, keep={"pseudo_label": corrections})
    for name, gone in removed.items():
        text = ", ".join(f"{CLASS_NAMES[c]} {100 * f:.1f}%" for c, f in gone.items() if f > 0)
        print(f"largest component: {name}: removed {text or 'nothing'}")
        for line in removal_warnings(gone, CLASS_NAMES):
            print(f"warning: {name}: {line}")
    return {**maps, **cleaned}


def _stop_on_sigint(control, bar):
    """Make a first Ctrl-C stop the refinement cleanly (outputs still written); a second one aborts."""

    def handler(signum, frame):
        if control.stopped:
            raise KeyboardInterrupt
        control.stop()
        bar.write("stopping after this step (press Ctrl-C again to abort without writing)")

    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave signals alone
        return signal.getsignal(signal.SIGINT)


def _stop_on_sigterm() -> Any:
    """Make SIGTERM (``kill``, ``timeout``, a cancelled cluster job) end the command like Ctrl-C does.

    The interrupt then runs the same clean-up: temporary files go and no output is half-written.
    """

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # not the main thread, or no SIGTERM here
        return None


# --- sub-commands -------------------------------------------------------------------------------------


def cmd_phantom(args: argparse.Namespace) -> int:
    """Write a synthetic abdominal phantom and its labels."""
    from .core.phantom import write_phantom

    out = _out_dir(args.out_dir)
    kw = {"orientation": args.orientation}
    if args.shape:
        kw["shape"] = tuple(args.shape)
    if args.spacing:
        kw["spacing"] = tuple(args.spacing)
    img, lab = write_phantom(out, args.modality, args.seed, overwrite=args.overwrite, **kw)
    print(f"wrote {img}\nwrote {lab}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Print a checkpoint's summary."""
    from .core.checkpoint import describe

    print(describe(args.checkpoint))
    return 0


def _load_inputs(args: argparse.Namespace):
    """Load the image volume and the checkpoint named on the command line."""
    from .core.checkpoint import load_checkpoint
    from .core.volume import load_volume

    model, meta = load_checkpoint(args.checkpoint, class_names=CLASS_NAMES)
    volume = load_volume(args.image, lazy=getattr(args, "lazy", False), sequential=True)
    norm = _normalization(args.normalize, meta, volume)
    return model, meta, volume, norm


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict both heads, pseudo labels, confidence and consistency maps for a volume (or many)."""
    from .core import batch

    if batch.is_many(args.image):
        _check_shared_inputs(args)
        return batch.run_command_many(
            cmd_predict,
            args,
            outputs=[f"{n}.nii.gz" for n in MAP_DTYPES],
            check=lambda paths, inputs: _check_outputs(paths, args.overwrite, inputs),
        )
    from .core import infer
    from .core.checkpoint import load_checkpoint
    from .core.infer import PredictionWriter, SlicePredictor, iter_predict, write_maps
    from .core.io_utils import staged_outputs
    from .core.volume import file_looks_whole, load_volume

    out = _out_dir(args.out_dir)
    paths = {n: out / f"{n}.nii.gz" for n in MAP_DTYPES}
    _check_outputs(list(paths.values()), args.overwrite, [args.image, args.checkpoint])
    _refuse_label_volume(args)
    model, meta = load_checkpoint(args.checkpoint, class_names=CLASS_NAMES)
    # A whole file stored axial slice by axial slice is read, predicted and written as a stream: each
    # map is compressed while later slices are predicted. Other layouts, and files whose gzip trailer
    # does not show them whole, are read up front (damage is reported before any work) and written at
    # the end.
    volume = load_volume(args.image, lazy=True, sequential=True)  # (read front to back: see load_volume)
    stream = (
        PredictionWriter.streamable(volume) and file_looks_whole(volume) and not args.largest_component
    )  # the clean-up needs each whole mask before it is written
    if not stream and not args.lazy:
        volume = load_volume(args.image)
    norm = _normalization(args.normalize, meta, volume)
    direct = stream and infer.STREAM_WITHOUT_STORE  # each batch's maps straight to the writer, none kept
    sp = SlicePredictor(
        model,
        meta,
        volume,
        normalization=norm,
        batch_size=args.batch_size,
        device=args.device,
        keep=not direct,
    )
    n_slices = sp.total
    bar = _progress(n_slices, "predict", args.quiet)
    t0 = time.perf_counter()
    with staged_outputs():  # all five maps appear together or not at all (e.g. when the disk fills)
        writer = (
            PredictionWriter(volume, None if direct else sp.prediction, paths, overwrite=args.overwrite)
            if stream
            else None
        )
        gen = iter_predict(
            model,
            meta,
            volume,
            batch_size=args.batch_size,
            predictor=sp,
            slices=writer.order if writer else None,
            on_slices=writer.feed if writer and not direct else None,
            on_batch=writer.feed_batch if writer and direct else None,
        )
        try:
            while True:
                done, _ = next(gen)
                bar.n = done
                bar.refresh()
        except StopIteration as stop:
            pred = stop.value
        except BaseException as exc:
            if writer is not None:
                writer.abort(exc)
            raise
        finally:
            bar.close()
        if writer is not None:
            written = writer.close()
        else:
            maps = _largest_components(pred.as_dict()) if args.largest_component else pred.as_dict()
            written = write_maps(maps, paths, volume, overwrite=args.overwrite)
    for n in MAP_DTYPES:
        print(f"wrote {written[n]}")
    print(f"predicted {_count(n_slices, 'slice')} in {time.perf_counter() - t0:.1f} s ({norm.kind})")
    if not (writer.organs_seen if writer is not None else pred.pseudo.any()):
        print(
            "note: the pseudo labels hold no organ: check that the checkpoint fits this kind of scan and "
            f"the intensities (--normalize; this run used {args.normalize}: {norm.kind})",
            file=sys.stderr,
        )
    return 0


def cmd_refine(args: argparse.Namespace) -> int:
    """Refine a checkpoint on an unlabelled target volume (or each of many) and write the model and maps."""
    from .core import batch

    cfg = _refine_config(args)  # the settings are checked before any file is looked at
    if batch.is_many(args.image):
        if args.corrections:
            raise APLError("--corrections belong to one image: refine that image on its own to use them")
        _check_shared_inputs(args)
        return batch.run_command_many(
            cmd_refine,
            args,
            outputs=["refined.pt", "log.json"] + [f"{n}.nii.gz" for n in MAP_DTYPES],
            check=lambda paths, inputs: _check_outputs(paths, args.overwrite, inputs),
        )
    import numpy as np

    from .core.checkpoint import refinement_history, save_checkpoint
    from .core.infer import predict_volume
    from .core.refine import RefineControl, check_corrections, organ_size_change, refine
    from .core.volume import load_volume

    out = _out_dir(args.out_dir)
    outputs = [out / "refined.pt", out / "log.json"] + [out / f"{n}.nii.gz" for n in MAP_DTYPES]
    _check_outputs(outputs, args.overwrite, [args.image, args.checkpoint, args.corrections])
    _refuse_label_volume(args)
    model, meta, volume, norm = _load_inputs(args)
    corrections = None
    if args.corrections:
        corr_vol = load_volume(args.corrections)
        if tuple(corr_vol.data.shape) != tuple(volume.data.shape):
            raise APLError(
                f"--corrections {args.corrections} does not have the image's shape: use a mask on its grid"
            )
        if not np.allclose(corr_vol.affine, volume.affine, atol=1e-3):
            raise APLError(
                f"--corrections {args.corrections} has another affine than the image: use a mask on its grid"
            )
        corr = np.asarray(corr_vol.data)
        if not np.array_equal(corr, np.round(corr)):
            raise APLError(f"--corrections {args.corrections} holds non-integer values: give a label volume")
        unset = 255 if args.corrections_unset is None else args.corrections_unset
        if 0 <= unset < meta.num_classes:
            raise APLError(
                f"--corrections-unset {unset} is a label (0..{meta.num_classes - 1}): every voxel "
                f"corrected to it would count as untouched; give the value that marks voxels left as "
                "predicted (default 255)"
            )
        corr = corr.astype(np.int64)  # before -1 appears: a uint8 file would wrap it to 255
        corrections = np.where(corr == unset, -1, corr)
        try:
            check_corrections(corrections, meta.class_names, f"--corrections {args.corrections}")
        except APLError as exc:
            raise APLError(f"{exc}; {unset} (--corrections-unset) marks voxels left as predicted") from None
        corrections = corrections.astype(np.int16)
    cfg.normalization = norm.to_dict()
    control = RefineControl()
    gen = refine(model, meta, volume, cfg, corrections=corrections, control=control)
    bar = _progress(cfg.iterations, f"refine ({cfg.method})", args.quiet)
    t0 = time.perf_counter()
    previous = _stop_on_sigint(control, bar)
    try:
        while True:
            ev = next(gen)
            bar.update(1)
            bar.set_postfix(
                {k: f"{v:.3g}" for k, v in ev.losses.items()} | {"ω": f"{ev.mean_confidence:.3f}"}
            )
            if ev.note:
                bar.write(ev.note)
    except StopIteration as stop:
        result = stop.value
    finally:
        bar.close()
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGINT, previous)
    elapsed = time.perf_counter() - t0
    new_meta = meta.__class__.from_dict(meta.to_dict())
    new_meta.normalization = norm.to_dict()  # the intensities the refined model was adapted to
    before = dict(meta.provenance)
    # a refined checkpoint refined again: its refinement is kept under earlier_refinements, and the
    # intensities its source model was trained with stay the source's
    earlier = refinement_history(before)  # (the viewer's refinements too)
    new_meta.provenance = before | {
        "source_normalization": dict(before.get("source_normalization") or meta.normalization),
        "refined_from": str(Path(args.checkpoint).name),
        "method": cfg.method,
        "iterations": result.iterations_done,
        "target": str(Path(args.image).name),
        "refined_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if earlier:
        new_meta.provenance["earlier_refinements"] = earlier
    pred = predict_volume(
        result.model, meta, volume, normalization=norm, batch_size=args.batch_size or 8, device=args.device
    )
    # the refined model's own maps, pseudo labels included (its merged heads' labels, as the viewer shows
    # and exports after a refinement, and as predict with refined.pt gives them)
    maps = pred.as_dict()
    if corrections is not None:  # the user's own labels are written as given (as the viewer shows them)
        maps["pseudo_label"] = np.where(corrections >= 0, corrections, pred.pseudo).astype(np.uint8)
    if args.largest_component:  # (a piece the user painted stays, even away from the organ's largest one)
        maps = _largest_components(maps, corrections)
    from .core.refine import amp_enabled, no_grad_bf16
    from .core.utils import resolve_device

    dev = resolve_device(cfg.device)
    log = {
        "config": cfg.to_dict(),
        # what "auto" meant on this machine: the student's training and the no-grad forwards
        "precision": "bf16 autocast" if amp_enabled(cfg.amp, dev) else "float32",
        "teacher_precision": "bf16 autocast" if no_grad_bf16(cfg, dev) else "float32",
        "iterations_done": result.iterations_done,
        "stopped": result.stopped,
        "notes": result.notes,
        "largest_component": args.largest_component,
        "seconds": elapsed,
        "organ_voxels": result.organ_voxels,
        "history": result.history,
    }
    from .core.io_utils import atomic_write, staged_outputs

    with staged_outputs():  # the model, the maps and the log appear together or not at all
        written = _write_maps(maps, out, volume, args.overwrite)
        written.append(save_checkpoint(out / "refined.pt", result.model, new_meta, overwrite=args.overwrite))
        written.append(
            atomic_write(
                out / "log.json", lambda p: p.write_text(json.dumps(log, indent=1)), overwrite=args.overwrite
            )
        )
    for p in written:
        print(f"wrote {p}")
    for n in result.notes:
        print(f"note: {n}")
    if size := organ_size_change(result, meta.class_names):
        print(size)
    print(f"refined for {_count(result.iterations_done, 'iteration')} in {elapsed:.1f} s")
    if control.stopped:  # Ctrl-C: the outputs are usable, but the run did not do all it was asked
        print(
            f"napari-apl refine: interrupted after {result.iterations_done} of {cfg.iterations} iterations "
            "(the files above hold that model)",
            file=sys.stderr,
        )
        return 130
    return 0


def _refine_config(args: argparse.Namespace):
    """The refinement settings the options give (the method's tuned ones where an option is left out),
    validated: a bad one is one line before any file is read."""
    from .core.refine import RefineConfig

    cfg = RefineConfig.for_method(args.method, seed=args.seed, device=args.device)
    if args.iterations is not None:
        cfg.iterations = args.iterations
    keys = (
        "lr",
        "batch_size",
        "weight",
        "teacher_decay",
        "tau",
        "bn",
        "bn_mix",
        "class_balance_power",
        "augment",
    )
    unread = {attr for _option, attr, reads, _where in _READ_BY if not reads(args)}  # noted as ignored
    for key in keys:
        val = getattr(args, key)
        if val is not None and key not in unread:
            setattr(cfg, key, val)
    if args.augment_geometry:
        cfg.augment_geometry = True
    if args.class_select:
        cfg.class_select = True  # (validated with the rest: an APL option)
    cfg.teacher_bf16 = {None: None, "auto": None, "bf16": True, "fp32": False}[args.teacher_precision]
    cfg.amp = {"auto": None, "bf16": True, "fp32": False}[args.precision]
    return cfg.validate()


# options of refine that only some runs read: (option, attribute, whether this run reads it, where it applies)
_READ_BY: tuple[tuple[str, str, Callable[[argparse.Namespace], bool], str], ...] = (
    ("--tau", "tau", lambda a: a.method == "threshold", "applies to --method threshold only"),
    (
        "--class-balance-power",
        "class_balance_power",
        lambda a: a.method == "apl",
        "applies to --method apl only",
    ),
    (
        "--weight",
        "weight",
        lambda a: a.method in ("apl", "apl-con"),
        "applies to --method apl and apl-con only",
    ),
    ("--bn-mix", "bn_mix", lambda a: (a.bn or "adapt") == "adapt", "applies with --bn adapt only"),
    (
        "--teacher-precision",
        "teacher_precision",
        lambda a: a.teacher_decay is None or a.teacher_decay > 0,
        "applies with a teacher (--teacher-decay above 0) only",
    ),
    (
        "--corrections-unset",
        "corrections_unset",
        lambda a: bool(a.corrections),
        "applies with --corrections only",
    ),
)


def _note_unused_options(args: argparse.Namespace) -> None:
    """Say in a line each which given options this run does not read (they are not errors)."""
    from .core import batch

    notes = []
    if not batch.is_many(args.image):
        for opt in ("scheduler", "workers"):
            if getattr(args, opt, None) is not None:
                notes.append(f"--{opt} is for many volumes (a folder or a quoted glob): this one runs here")
        if getattr(args, "skip_done", False):
            notes.append("--skip-done is for many volumes (a folder or a quoted glob): ignored for one")
    elif getattr(args, "scheduler", None) and getattr(args, "workers", None) is not None:
        notes.append("--workers sizes a local cluster: the scheduler's own workers run this batch")
    if args.command == "refine":
        for option, attr, reads, who in _READ_BY:
            if getattr(args, attr, None) is not None and not reads(args):
                notes.append(f"{option} {who}: ignored in this run")
    for line in notes:
        print(f"note: {line}", file=sys.stderr)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a predicted label volume against reference labels (Dice and ASSD per organ)."""
    import numpy as np

    from .core.labels import CLASS_NAMES
    from .core.metrics import evaluate, json_safe, label_volume
    from .core.volume import load_volume

    if args.json:
        _check_outputs([Path(args.json)], args.overwrite, [args.pred, args.gt])
    pred = load_volume(args.pred)
    gt = load_volume(args.gt)
    if tuple(pred.data.shape) != tuple(gt.data.shape):
        raise APLError(
            f"--pred has shape {tuple(pred.data.shape)} but --gt has {tuple(gt.data.shape)}: "
            "use masks on one grid"
        )
    if not np.allclose(pred.affine, gt.affine, atol=1e-3):
        raise APLError(
            "--pred and --gt have different affines: resample the prediction onto the reference grid"
        )
    arrays = {flag: label_volume(vol.data, flag) for flag, vol in (("--pred", pred), ("--gt", gt))}
    res = evaluate(arrays["--pred"], arrays["--gt"], gt.spacing)
    print(f"{'organ':<14}{'Dice %':>9}{'ASSD mm':>10}")
    for name in CLASS_NAMES[1:]:
        d = res["dice"].get(name, float("nan"))
        a = res["assd"].get(name, float("nan"))
        print(f"{name:<14}{100 * d:>9.2f}{a:>10.2f}")
    print(f"{'mean':<14}{100 * res['mean_dice']:>9.2f}{res['mean_assd']:>10.2f}")
    if args.json:
        from .core.io_utils import atomic_write

        text = json.dumps(json_safe(res), indent=1, allow_nan=False)  # strict JSON: no Infinity / NaN
        atomic_write(args.json, lambda p: p.write_text(text), overwrite=args.overwrite)
        print(f"wrote {args.json}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """Wrap a raw (e.g. ADVENT DeepLabv2) state dict into a napari-apl checkpoint."""
    from .core.checkpoint import (
        FORMAT_VERSION,
        CheckpointMeta,
        check_label_scheme,
        import_state_dict,
        reorder_classes,
        save_checkpoint,
        scheme_order,
    )
    from .core.labels import CLASS_NAMES
    from .core.preprocess import get_preset

    _check_outputs([Path(args.out)], args.overwrite, [args.state_dict])
    if args.aspp_branches != 4 and args.arch != "deeplabv2":
        raise APLError(f"--aspp-branches is a deeplabv2 setting: {args.arch} has no ASPP classifier")
    names = [n.strip() for n in args.classes.split(",")] if args.classes else list(CLASS_NAMES)
    # every command writes masks in napari-apl's label scheme: a model whose channels are its classes
    # in another order has them reordered here; other classes are refused
    order = scheme_order(names, CLASS_NAMES)
    if order is None:
        check_label_scheme("--classes", names, CLASS_NAMES)
    meta = CheckpointMeta(
        format_version=FORMAT_VERSION,
        arch=args.arch,
        arch_args={"num_classes": len(names)}
        | ({"aspp_branches": args.aspp_branches} if args.aspp_branches != 4 else {}),
        class_names=names,
        input_size=tuple(args.input_size),
        spacing=tuple(args.spacing),
        normalization=get_preset(args.normalize).to_dict(),
        provenance={"imported_from": Path(args.state_dict).name, "note": args.note or ""},
    )
    model = import_state_dict(args.state_dict, meta, accept_checkpoint=False)
    if order is not None and order != list(range(len(CLASS_NAMES))):
        reorder_classes(model, order)
        meta.class_names = list(CLASS_NAMES)
        meta.provenance["class_channels_of_the_file"] = names
        print(
            "reordered the class channels to napari-apl's labels: "
            + ", ".join(f"{i} {CLASS_NAMES[i]} (channel {j} of the file)" for i, j in enumerate(order))
        )
    save_checkpoint(args.out, model, meta, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0


def cmd_train_source(args: argparse.Namespace) -> int:
    """Train a dual-head model on labelled source volumes."""
    from .core.train import train_source_cli

    return train_source_cli(args)


def cmd_demo(args: argparse.Namespace) -> int:
    """Open napari with the sample CT, the demo checkpoint and the APL widget docked."""
    from ._demo import check_display, check_screenshot_path, launch_demo

    if args.quit_after and args.screenshot is None:
        raise APLError("--quit-after closes napari after the screenshot: give --screenshot FILE.png too")
    check_display()
    if args.screenshot is not None:
        check_screenshot_path(args.screenshot, args.overwrite)
    outcome: dict[str, str] = {}
    launch_demo(screenshot=args.screenshot, quit_after=args.quit_after, outcome=outcome)
    return 2 if outcome.get("screenshot_error") else 0


# --- parser -------------------------------------------------------------------------------------------


def _checkpoint_arg(value: str) -> str:
    """A checkpoint argument: a path, or ``demo`` for the bundled demo model (no file of that name here)."""
    if value == "demo" and not Path(value).exists():
        from ._sample_data import demo_checkpoint_path

        demo = demo_checkpoint_path()
        if demo is None:
            raise argparse.ArgumentTypeError("the bundled demo checkpoint is missing from this installation")
        return str(demo)
    return value


def _common_model_args(p: argparse.ArgumentParser) -> None:
    """Add the options shared by predict and refine."""
    p.add_argument(
        "image",
        help="input volume (.nii / .nii.gz), or a folder or quoted glob of volumes: each is then "
        "processed on dask.distributed and written to OUT_DIR/<volume name>/; a label volume (few "
        "non-negative integer values) is refused, or left out of a folder or glob",
    )
    p.add_argument(
        "--checkpoint",
        "-c",
        required=True,
        type=_checkpoint_arg,
        help="napari-apl checkpoint (.pt), or 'demo' for the bundled demo model",
    )
    p.add_argument("--out-dir", "-o", required=True, help="output folder (created if its parent exists)")
    p.add_argument(
        "--normalize",
        default="auto",
        help="target intensity preset: ct-abdomen, ct-soft, ct-abdomen-offset (CT stored as HU + 1024), "
        "mri, zscore, checkpoint (the source's) or auto (ct-abdomen for Hounsfield-unit volumes, "
        "ct-abdomen-offset for HU + 1024 ones, else the checkpoint's); default auto",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default auto)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing output files (with --skip-done: only in folders that lack some outputs)",
    )
    p.add_argument(
        "--skip-done",
        action="store_true",
        help="with many volumes: leave out the volumes whose OUT_DIR/<volume name>/ already holds every "
        "output (to resume an interrupted batch); a folder holding only some of them still runs and needs "
        "--overwrite to replace those; with --overwrite too, complete folders are still skipped and the "
        "others redone",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument(
        "--largest-component",
        action="store_true",
        help="keep only each organ's largest connected piece in the main, aux and pseudo_label masks "
        "(smaller islands become background; a warning names any organ that loses over a quarter)",
    )
    p.add_argument(
        "--lazy",
        action="store_true",
        help="read the volume lazily (dask) slice by slice (predict streams whole axial files anyway)",
    )
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="with many volumes: address of a running dask scheduler (e.g. tcp://host:8786); "
        "default: a local cluster",
    )
    p.add_argument(
        "--workers",
        type=_int_at_least(1),
        help="with many volumes and no --scheduler: worker processes of the local cluster (default 2)",
    )


def _int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``low`` (and at most ``high``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {low} or more, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value

    return parse


_MAX_SEED = 2**64 - 1  # torch.manual_seed takes an unsigned 64-bit number


def _positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Build the ``napari-apl`` argument parser."""
    from . import __version__

    parser = _Parser(
        prog="napari-apl", description="Adaptive pseudo labelling for source-free MRI to CT segmentation."
    )
    parser.add_argument("--version", action="version", version=f"napari-apl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("phantom", help="write a synthetic abdominal phantom with labels")
    p.add_argument("--modality", choices=("ct", "mri"), required=True)
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="random anatomy and noise (default 0)")
    p.add_argument("--out-dir", "-o", required=True, help="folder for image.nii.gz and labels.nii.gz")
    p.add_argument(
        "--orientation",
        default="RAS",
        help="3-letter orientation code of the written file (RAS, LAS, LPS...)",
    )
    p.add_argument("--shape", type=_int_at_least(1), nargs=3, metavar=("X", "Y", "Z"), help="voxels per axis")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), help="voxel size in mm")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("info", help="print a checkpoint's summary")
    p.add_argument("checkpoint", type=_checkpoint_arg, help="checkpoint (.pt), or 'demo' (the bundled model)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("predict", help="predict both heads and the confidence / consistency maps")
    _common_model_args(p)
    p.add_argument(
        "--batch-size", type=_int_at_least(1), default=8, help="slices per forward pass (default 8)"
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("refine", help="adapt a checkpoint to an unlabelled target volume (APL or a baseline)")
    _common_model_args(p)
    p.add_argument("--method", "-m", default="apl", help="apl (default), apl-con, threshold, cbst or mrnet")
    p.add_argument("--iterations", "-n", type=_int_at_least(0), help="training steps (default 400)")
    p.add_argument("--seed", type=_int_at_least(0, _MAX_SEED), default=0)
    p.add_argument("--lr", type=_positive_float, help="learning rate (default: the method's tuned value)")
    p.add_argument("--batch-size", type=_int_at_least(1), help="slices per iteration (default 8)")
    p.add_argument("--weight", choices=("uniform", "confusion"), help="W of the relevance matrix (Eq. 1)")
    p.add_argument("--teacher-decay", type=float, help="EMA teacher decay (0 = no teacher)")
    p.add_argument(
        "--teacher-precision",
        choices=("auto", "bf16", "fp32"),
        help="the teacher's forwards: bf16 autocast where bf16 is native or the student trains in bf16 "
        "(auto, default), always, or fp32",
    )
    p.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="the student's training: bf16 autocast with float32 losses where bf16 is native (auto, "
        "default: CUDA, CPUs with AVX512-BF16 or AMX), always, or float32 (the teacher follows bf16)",
    )
    p.add_argument("--tau", type=float, help="threshold of the 'threshold' baseline (default 0.9)")
    p.add_argument(
        "--bn",
        choices=("adapt", "frozen", "train"),
        help="batch-norm statistics: adapt (re-estimated once on the target, default), frozen or train",
    )
    p.add_argument(
        "--bn-mix",
        type=float,
        help="with --bn adapt: the target's share of the batch-norm statistics, 0..1 (default 0.25)",
    )
    p.add_argument(
        "--class-balance-power",
        type=float,
        help="apl: L_SSL class weights ∝ 1/frequency^P (default 0 = unweighted; a higher P grows the "
        "rarer organs: try 0.25 where the start model under-segments them)",
    )
    p.add_argument(
        "--augment",
        choices=("none", "mild", "domain"),
        help="intensity augmentation of the student's view (the teacher labels the plain slice): mild "
        "(gamma, bias field, blur, noise; default), domain (also random remapping and GIN) or none",
    )
    p.add_argument(
        "--augment-geometry",
        action="store_true",
        help="also rotate / scale / shift the student's view (organs tend to grow more: helps where the "
        "start model under-segments, hurts where it over-segments)",
    )
    p.add_argument(
        "--class-select",
        action="store_true",
        help="apl: learn only from each class's more confident half of the pixels (CBST's class-wise "
        "selection; not the default): on one real CT it gained far more than the default, on a synthetic "
        "CT and an in-domain MRI it lost; compare with a default run",
    )
    p.add_argument(
        "--corrections", help="label volume of hand corrections on the image grid (kept as hard labels)"
    )
    p.add_argument(
        "--corrections-unset",
        type=int,
        help="with --corrections: the value of voxels left as predicted (default 255; not a label 0..4)",
    )
    p.set_defaults(func=cmd_refine)

    p = sub.add_parser("evaluate", help="Dice and ASSD per organ of a mask against reference labels")
    p.add_argument("--pred", required=True, help="predicted label volume (.nii / .nii.gz)")
    p.add_argument("--gt", required=True, help="reference label volume on the same grid")
    p.add_argument("--json", help="also write the scores as JSON")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("import", help="wrap a raw state dict (e.g. ADVENT DeepLabv2) into a checkpoint")
    p.add_argument("state_dict")
    p.add_argument(
        "--arch", default="deeplabv2", help="network of the weights: deeplabv2 (default) or unet-dual"
    )
    p.add_argument(
        "--classes",
        help="comma-separated names of the file's output channels, in their order (default: "
        "background,liver,right kidney,left kidney,spleen); the same five in another order are "
        "reordered to napari-apl's labels",
    )
    p.add_argument(
        "--aspp-branches",
        type=int,
        choices=(2, 4),
        default=4,
        help="deeplabv2: the dilated branches each classifier sums: 4 (ADVENT, the default) or 2 "
        "(models trained with AdaptSegNet's released code, whose classifier stops after two)",
    )
    p.add_argument("--input-size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    p.add_argument("--spacing", type=float, nargs=2, default=(1.5, 1.5), metavar=("MX", "MY"))
    p.add_argument("--normalize", default="ct-abdomen", help="intensity preset the model was trained with")
    p.add_argument("--note", help="provenance note")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("train-source", help="train a dual-head model on labelled source volumes")
    p.add_argument("--images", required=True, help="glob of source images")
    p.add_argument("--labels", required=True, help="glob of label volumes (paired after sorting)")
    p.add_argument(
        "--pair-by-order",
        action="store_true",
        help="pair images and labels as sorted without comparing their case numbers",
    )
    p.add_argument("--arch", default="unet-dual", help="network: unet-dual (default) or deeplabv2")
    p.add_argument("--epochs", type=_int_at_least(1), default=45, help="passes over the slices (default 45)")
    p.add_argument("--normalize", default="mri", help="source intensity preset (default mri)")
    p.add_argument("--spacing", type=float, nargs=2, default=(2.5, 2.5), metavar=("MX", "MY"))
    p.add_argument("--input-size", type=int, nargs=2, default=(160, 160), metavar=("H", "W"))
    p.add_argument("--batch-size", type=_int_at_least(1), default=16, help="slices per step (default 16)")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="AdamW learning rate (default 0.001)")
    p.add_argument("--seed", type=_int_at_least(0, _MAX_SEED), default=0)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--channels-last", action="store_true", help="channels-last weights and batches (faster convolutions)"
    )
    p.add_argument(
        "--amp", action="store_true", help="bf16 mixed precision (faster where bf16 is native: CUDA, AMX)"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_train_source)

    p = sub.add_parser("demo", help="open napari with the sample CT, the demo model and the APL widget")
    p.add_argument("--screenshot", help="save a screenshot of the window to this PNG after predicting")
    p.add_argument("--quit-after", action="store_true", help="close napari after the screenshot")
    p.add_argument("--overwrite", action="store_true", help="replace an existing screenshot file")
    p.set_defaults(func=cmd_demo)
    return parser


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says an allocation failed (Python's, torch's CPU allocator, CUDA's)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``napari-apl`` command line; exit 2 with one line on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _CREATED_DIRS.clear()
    # (not for the viewer: napari's event loop would swallow the interrupt; SIGTERM ends it as before)
    previous = _stop_on_sigterm() if args.command != "demo" else None
    huge_pages = set_numpy_huge_pages(False)  # this process's large arrays: see core.memory
    try:
        if args.command in ("predict", "refine"):
            _note_unused_options(args)
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # (here, not at exit: a reader gone away is then the BrokenPipeError below)
        return status
    except BrokenPipeError:
        # the output's reader has gone (e.g. `napari-apl info ... | head -1`): stop quietly, as command
        # line tools do on SIGPIPE; what is left in the buffer goes nowhere instead of to a traceback
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        _remove_created_empty_dirs()
        return 141
    except APLError as exc:
        _remove_created_empty_dirs()
        print(f"napari-apl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _remove_created_empty_dirs()
        print(f"napari-apl {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the file system's refusal (permissions, I/O, a name too long): one line
        _remove_created_empty_dirs()
        where = f": {exc.filename}" if exc.filename else ""
        print(f"napari-apl {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            _remove_created_empty_dirs()
            raise
        _remove_created_empty_dirs()
        what = " ".join(str(exc).split())[:240] or type(exc).__name__
        hint = "use a smaller --batch-size or free memory" if hasattr(args, "batch_size") else "free memory"
        print(f"napari-apl {args.command}: error: out of memory ({what}): {hint}", file=sys.stderr)
        return 2
    except BaseException:
        _remove_created_empty_dirs()
        raise
    finally:
        if huge_pages is not None:
            set_numpy_huge_pages(huge_pages)
        if previous is not None:
            with contextlib.suppress(ValueError, TypeError, OSError):
                signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
