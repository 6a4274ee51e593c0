"""Goal 2: one APL iteration costs at most 1.3 x one plain supervised training step of the same model.

APL iteration = one step of ``core.refine.refine`` (the real loop, default APL recipe), timed between
its yields. Plain step = forward + cross-entropy on both heads + backward + one Adam step over every
parameter, same model, same batch size, same batch-norm handling (frozen, as the recipe), same memory
format (channels-last, as the refinement keeps its weights). Rounds
alternate the two (and the EMA teacher's no-grad forward alone, the part of an APL iteration that sets
the floor of the ratio for the default recipe); the figure is the median of the per-round ratios. A
component breakdown (teacher forward, student forward + backward, one pass of the two heads) is
reported beside it.

    python benchmarks/refine_overhead.py [--rounds 10] [--steps 3] [--batch-size 8] [--threads N]
                                         [--device cuda]

On a GPU (``--device cuda``) both sides run as the refinement runs there: under bf16 autocast with
float32 losses, each timed side ending with a device synchronisation; the results go to
``refine_overhead_cuda.*`` beside the CPU's.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import torch

GOAL = 1.3


def _frozen_train(model: torch.nn.Module) -> None:
    """Training mode with batch-norm statistics frozen (the refinement's default)."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def _heap_off_run(args: argparse.Namespace) -> dict[str, list[float]]:
    """Per-step times of the plain step and the APL iteration from a child process with the heap as
    glibc leaves it (``memory.RETAIN_HEAP`` off: its settings are process-wide, so not in this one)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "per_step.json"
        cmd = [sys.executable, __file__, "--rounds", str(args.heap_rounds), "--steps", str(args.steps)]
        cmd += ["--batch-size", str(args.batch_size), "--slices", str(args.slices), "--base", str(args.base)]
        cmd += ["--threads", str(torch.get_num_threads()), "--heap-off-child", str(out)]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=2, help="steps per side per round")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--slices", type=int, default=48)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--base", type=int, default=16)
    ap.add_argument("--device", default="cpu", help="cpu (the goal's machine) or cuda")
    ap.add_argument(
        "--heap-rounds",
        type=int,
        default=8,
        help="rounds of the comparison run without core.memory.retained_heap (a child process; 0: none)",
    )
    ap.add_argument("--heap-off-child", help=argparse.SUPPRESS)  # (the child: plain and APL only, to a file)
    args = ap.parse_args(argv)
    refusal = c.device_refusal(args.device)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    import napari_apl.core.memory as memory_module
    import napari_apl.core.refine as refine_module
    from napari_apl.core.infer import prepare
    from napari_apl.core.models.fold import FoldedNet
    from napari_apl.core.phantom import make_phantom
    from napari_apl.core.refine import RefineConfig, amp_enabled, no_grad_bf16, refine
    from napari_apl.core.volume import volume_from_array

    if args.heap_off_child:
        memory_module.RETAIN_HEAP = False
    dev = torch.device(args.device)
    on_gpu = dev.type == "cuda"
    rep = c.Report(
        "refine_overhead_cuda" if on_gpu else "refine_overhead",
        "Goal 2: APL iteration vs plain supervised training step" + (" (CUDA)" if on_gpu else ""),
    )
    image, _labels, affine = make_phantom("ct", 0, shape=(256, 256, args.slices), spacing=(1.5, 1.5, 5.0))
    volume = volume_from_array(image, affine)
    model, meta, source = c.demo_like_model(args.base)
    cfg = RefineConfig(iterations=100_000, batch_size=args.batch_size, device=args.device, seed=0)
    gen = refine(model, meta, volume, cfg)
    t0 = time.perf_counter()
    next(gen)  # setup + first iteration
    setup_s = time.perf_counter() - t0
    # the refinement's precision: bf16 autocast (amp) where bf16 is native (CUDA, a CPU with AVX512-BF16
    # or AMX), the plain step likewise; else float32, with the teacher alone in bf16 if asked
    amp = amp_enabled(cfg.amp, dev)
    teacher_low = no_grad_bf16(cfg, dev)  # (the refinement's own rule)
    # on a CPU: with amp, the same recipe and plain step in float32 (the default where bf16 is not native);
    # without, the teacher's forward in float32 (on CUDA there is no such variant)
    gen_fp32 = None
    if not on_gpu:
        gen_fp32 = refine(model, meta, volume, replace(cfg, amp=False, teacher_bf16=False))
        next(gen_fp32)
    # the paper's Algorithm 1 as written: no EMA teacher, the student labels its own batch (this
    # untrained model collapses without a teacher, so its guard is off: the loop must keep stepping)
    gen_own = refine(model, meta, volume, replace(cfg, teacher_decay=0.0, augment="none", guard_every=10**9))
    next(gen_own)
    # the default recipe with the other setting of the teacher's batch-norm folding (folded on a CPU,
    # layers on CUDA: refine._FOLD_BN): what the device's choice gains, measured in the same rounds (a
    # refinement reads the switch when it starts)
    folds = not on_gpu  # the refinement's own choice on this device
    refine_module._FOLD_BN = not folds
    try:
        gen_other_fold = refine(model, meta, volume, cfg)
        next(gen_other_fold)
    finally:
        refine_module._FOLD_BN = None

    prep = prepare(volume, meta, model)
    xs = torch.cat([prep.batch(range(s, min(s + 16, args.slices))) for s in range(0, args.slices, 16)]).to(
        dev
    )
    hw = tuple(xs.shape[-2:])
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format  # as the refinement runs
    model = copy.deepcopy(model).to(dev)  # (the refinements above hold their own copies)
    plain_model = copy.deepcopy(model).to(memory_format=fmt)
    _frozen_train(plain_model)
    opt = torch.optim.Adam(plain_model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(0)

    def synced(fn):
        """``fn``, then wait for the device (a no-op on a CPU), so that a side's time is its work's."""

        def run() -> None:
            fn()
            if on_gpu:
                torch.cuda.synchronize(dev)

        return run

    with torch.no_grad():
        target = torch.softmax(model.eval()(xs[:16])[0], 1).argmax(1)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, 16, (args.batch_size,), generator=g).to(dev)
        return xs[idx], target[idx]

    def plain_step(low: bool = amp) -> None:
        """One plain supervised step: forward, cross-entropy on both heads, backward, Adam (at the
        refinement's precision unless ``low`` says otherwise)."""
        x, y = batch()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=low):
            m, a = plain_model(x)
        loss = torch.nn.functional.cross_entropy(m.float(), y) + torch.nn.functional.cross_entropy(
            a.float(), y
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def plain_steps() -> None:
        for _ in range(args.steps):
            plain_step()

    def plain_steps_fp32() -> None:
        for _ in range(args.steps):
            plain_step(False)

    def steps_of(refinement):
        """A timed side that advances one refinement generator by ``--steps`` iterations."""

        def run() -> None:
            for _ in range(args.steps):
                next(refinement)

        return run

    teacher_layers = copy.deepcopy(model).to(memory_format=fmt).eval()
    teacher = FoldedNet(teacher_layers) if folds else teacher_layers  # as the refinement runs its teacher

    def teacher_forwards() -> None:
        """The EMA teacher's part of an APL iteration alone: one forward in inference mode."""
        for _ in range(args.steps):
            x, _ = batch()
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=teacher_low):
                teacher(x)

    sides = {
        "plain": synced(plain_steps),
        "apl": synced(steps_of(gen)),
        "apl_fp32": synced(steps_of(gen_fp32)) if gen_fp32 is not None else None,
        "plain_fp32": synced(plain_steps_fp32) if amp and not on_gpu else None,
        "apl_own": synced(steps_of(gen_own)),
        "apl_other_fold": synced(steps_of(gen_other_fold)),
        "teacher_forward": synced(teacher_forwards),
    }
    if args.heap_off_child:
        sides = {k: sides[k] for k in ("plain", "apl")}
    times = c.interleaved(
        {k: fn for k, fn in sides.items() if fn is not None},
        args.rounds,
        warmup=1,
    )
    per = {k: [t / args.steps for t in v] for k, v in times.items()}
    if args.heap_off_child:
        Path(args.heap_off_child).write_text(json.dumps(per))
        return 0
    ratio = c.paired_ratio(per["apl"], per["plain"])
    rep.add("APL iteration / plain step (median of paired rounds)", ratio, "x", goal=GOAL)
    rep.add("APL iteration (median)", c.median(per["apl"]) * 1000, "ms")
    rep.add("plain supervised step (median)", c.median(per["plain"]) * 1000, "ms")
    timed = range(2 + args.steps, 2 + (args.rounds + 1) * args.steps)  # after the warm-up round
    periodic = [i for i in timed if i % cfg.guard_every in (0, 1)]
    rep.add(
        "APL iteration / plain step, total over the rounds",
        sum(per["apl"]) / sum(per["plain"]),
        "x",
        goal=GOAL,
        note=f"what every iteration costs on average: with iterations {periodic} of {timed.start}-"
        f"{timed.stop - 1} (collapse guard, k_c update), which the median leaves out"
        if periodic
        else "no guard or k_c iteration in the timed ones",
    )
    if "apl_fp32" in per:  # (without amp the plain step is float32 already)
        rep.add(
            "APL iteration / plain step, both in float32 (the teacher too)",
            c.paired_ratio(per["apl_fp32"], per.get("plain_fp32", per["plain"])),
            "x",
            goal=GOAL,
            note="amp=False, teacher_bf16=False: the default where the CPU has no native bf16"
            + ("" if teacher_low else " (this machine)"),
        )
    if "plain_fp32" in per:
        rep.add("  plain step, bf16 autocast / float32", c.paired_ratio(per["plain"], per["plain_fp32"]), "x")
        rep.add("  APL iteration, bf16 autocast / float32", c.paired_ratio(per["apl"], per["apl_fp32"]), "x")
    folded, layers = (per["apl"], per["apl_other_fold"]) if folds else (per["apl_other_fold"], per["apl"])
    rep.add(
        "APL iteration with the teacher's batch norms "
        + ("not folded" if folds else "folded into its convolutions")
        + " / plain step",
        c.paired_ratio(per["apl_other_fold"], per["plain"]),
        "x",
        goal=GOAL,
        note="core.refine._FOLD_BN forced "
        + (
            "off: the teacher's and the guard's forwards with their batch norms as layers, as on CUDA"
            if folds
            else "on: the teacher's and the guard's forwards on a copy with folded batch norms, as on a CPU"
        ),
    )
    rep.add(
        "  APL iteration, folded / not folded (median of paired rounds)", c.paired_ratio(folded, layers), "x"
    )
    heap_off = None
    if args.heap_rounds > 0 and not on_gpu:
        heap_off = _heap_off_run(args)
        rep.add(
            "APL iteration / plain step, without keeping freed memory (separate process)",
            c.paired_ratio(heap_off["apl"], heap_off["plain"]),
            "x",
            goal=GOAL,
            note=f"core.memory.retained_heap off (glibc's default heap behaviour), {args.heap_rounds} "
            "rounds in a child process run after the rounds above: both sides pay the page faults",
        )
        rep.add(
            "  plain step, freed memory kept / not kept (medians of the two runs)",
            c.median(per["plain"]) / c.median(heap_off["plain"]),
            "x",
        )
        rep.add(
            "  APL iteration, freed memory kept / not kept (medians of the two runs)",
            c.median(per["apl"]) / c.median(heap_off["apl"]),
            "x",
        )
    rep.add(
        "APL iteration without the EMA teacher or student augmentation / plain step",
        c.paired_ratio(per["apl_own"], per["plain"]),
        "x",
        note="not the recipe the tool runs, so no goal here: the paper's Algorithm 1 as written "
        "(teacher_decay=0, augment=none, collapse guard off), the pseudo labels from the student's own "
        "forward; without the teacher APL lost ground on the targets measured (README, 'Does it help?')",
    )
    rep.add(
        f"EMA teacher's no-grad forward ({'bf16' if teacher_low else 'float32'}, batch norms "
        f"{'folded' if folds else 'as layers'})"
        " / plain step (paired)",
        c.paired_ratio(per["teacher_forward"], per["plain"]),
        "x",
        note="part of every iteration of the default recipe (teacher_decay=0.99): the floor is 1 + this",
    )

    # component costs on one batch, for the breakdown
    x, _ = batch()
    student = copy.deepcopy(model).to(memory_format=fmt)
    _frozen_train(student)
    feats = tuple(f.detach() for f in student.features(x))

    def teacher_forward() -> None:
        """The teacher's forward as the refinement runs it (folded on a CPU, at the teacher's precision)."""
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=teacher_low):
            teacher(x)

    def teacher_forward_layers() -> None:
        with torch.inference_mode():
            teacher_layers(x)

    def teacher_forward_bf16() -> None:
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16):
            teacher_layers(x)

    def student_forward_backward() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            m, a = student(x)
        (m.float().mean() + a.float().mean()).backward()

    def heads_forward() -> None:
        with torch.no_grad():
            student.heads(feats, hw)

    from napari_apl.core import pseudo

    opt_heads = torch.optim.Adam(list(student.classifier_parameters()), lr=cfg.lr)

    def classifier_step() -> None:
        """APL's classifier step alone: both heads on detached features, L_Con, backward, Adam."""
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            m, a = student.heads(feats, hw)
        loss = pseudo.loss_con(torch.softmax(m.float(), 1), torch.softmax(a.float(), 1), cfg.weight)
        opt_heads.zero_grad(set_to_none=True)
        loss.backward()
        opt_heads.step()

    parts = c.interleaved(
        {
            "teacher_forward_as_the_refinement_runs_it": synced(teacher_forward),
            "teacher_forward_no_grad_batch_norm_layers": synced(teacher_forward_layers),
            "teacher_forward_no_grad_bf16_autocast": synced(teacher_forward_bf16),
            "student_forward_backward": synced(student_forward_backward),
            "heads_forward": synced(heads_forward),
            "classifier_step": synced(classifier_step),
            "plain_step": synced(plain_step),
        },
        5,
    )
    components = {k: round(c.median(v) * 1000, 1) for k, v in parts.items()}
    # what an APL iteration adds to a plain step, part by part (medians of paired rounds, one batch)
    extra = {
        "the teacher's forward (its precision, folded on a CPU)": "teacher_forward_as_the_refinement_runs_it",
        "the classifier step (both heads on detached features, L_Con, backward, Adam)": "classifier_step",
        "the second pass of both heads (forward; its backward replaces the plain step's)": "heads_forward",
    }
    shares = {k: c.paired_ratio(parts[v], parts["plain_step"]) for k, v in extra.items()}
    for name, share in shares.items():
        rep.add(f"  component: {name} / plain step", share, "x")
    rep.add(
        "  1 + the three components above",
        1 + sum(shares.values()),
        "x",
        goal=GOAL,
        note="the part of the default recipe's overhead that is model compute (the rest: augmentation, "
        "ensemble and target updates, EMA update); a component run of 5 paired rounds on one batch",
    )
    rep.details = {
        "volume": f"CT phantom {image.shape}, model grid {hw}",
        "model": source,
        "config": {
            k: v for k, v in cfg.to_dict().items() if k in ("method", "batch_size", "bn", "teacher_decay")
        },
        "torch_threads": torch.get_num_threads(),
        "memory_format": "channels_last" if cfg.channels_last else "contiguous",
        "precision": "bf16 autocast, float32 losses (amp: native bf16 here)"
        if amp
        else "float32, the teacher in bf16 autocast"
        if teacher_low
        else "float32",
        "device": torch.cuda.get_device_name(dev) if on_gpu else "cpu",
        "refine_setup_plus_first_iteration_s": round(setup_s, 2),
        "per_step_s": per,
        "per_step_s_without_retained_heap": heap_off,
        "components_ms": components,
    }
    rep.note(
        "one APL iteration (core.refine.refine) runs: sample the batch from the ensemble's per-slice "
        "organ flags (kept up to date for each batch's slices, no scan of the volume); the EMA "
        "teacher's forward in inference mode (on a CPU on a copy with its batch norms folded into its "
        "convolutions, models.fold, refreshed from the teacher's weights before each use; pseudo labels; "
        "under bf16 autocast where the CPU computes bf16 "
        "natively, RefineConfig.teacher_bf16); the student's mild augmentation of the batch (gamma, bias "
        "field, blur, noise: RefineConfig.augment); the student's encoder forward once, with "
        "gradient; both heads on the detached features -> L_Con -> classifier step; the ensemble update "
        "of the batch's slices (labels and flags of those slices only); ω and the class-normalised "
        "target; both heads again on the attached features (the classifiers have changed, the encoder "
        "has not) -> L_SSL -> backward into the encoder's parameters only -> encoder step; EMA update "
        "(foreach ops); the losses' finiteness check (the weights' every guard_every iterations)"
    )
    rep.note(
        "the refinement keeps the memory its tensors free for the next iteration (core.memory.retained_heap: "
        "glibc's mmap threshold at 32 MB, its heap not trimmed while a refinement runs); the setting is "
        "process-wide, so the plain step and every component here run under it too; the row 'without "
        "keeping freed memory' is the same two sides in a child process with glibc's defaults"
    )
    rep.note(
        "the plain step is one forward + backward + Adam step (no augmentation); beyond it an APL "
        "iteration costs the teacher's no-grad forward (a full forward of the model), the student's "
        "augmentation, a second pass of the two heads and "
        "the L_Con backward through them; every guard_every (20) iterations the collapse guard predicts "
        "its guard slices and snapshots the weights, and the iteration after it the class-wise "
        "thresholds k_c are recomputed from the whole ensemble: the one round holding them is the slow "
        "outlier the median leaves out, the total over the rounds carries their share"
    )
    rep.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
