"""The `train`, `eval` and `predict` actions shared by `mambaout detect` and `mambaout segment` (not a subcommand).

Each parses flags, calls the library (`mambaout.train.runner` with the task, `mambaout.dense.inference`) and prints.
"""

import argparse
import os
import sys
from pathlib import Path

from mambaout.cli.args import add_force, add_malloc, integer, number
from mambaout.data import list_images, named_inputs
from mambaout.dense.inference import (
    load_dense_model,
    predict_detections,
    predict_segmentation,
    validation_loader,
    validation_root,
    write_json,
)
from mambaout.dense.tasks import Detection, evaluate_detection, evaluate_segmentation
from mambaout.errors import UserError
from mambaout.outputs import check_output
from mambaout.train.config import AMP_MODES, add_config_arguments, config_overrides
from mambaout.train.distributed import init_distributed, resolve_device
from mambaout.train.engine import resolve_amp
from mambaout.train.prepare import prepare_run
from mambaout.train.runner import run_training
from mambaout.train.signals import TrainingInterrupted
from mambaout.train.task import Task

__all__ = ["add_actions"]


def add_actions(parser: argparse.ArgumentParser, task: type[Task], examples: str) -> None:
    """`train`, `eval` and `predict` sub-commands of `parser` for `task`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = examples
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=type(parser))
    noun = "detector" if task is Detection else "segmenter"

    train = actions.add_parser("train", help=f"train a {noun} (the one engine: DDP, AMP, resume, ...)")
    train.add_argument("--config", help=f"recipe YAML: a path or a name in {task.recipes}")
    train.add_argument("--resume", metavar="auto|PATH", help="continue a run: 'auto' resumes --output's last.pth")
    add_config_arguments(train, task.config_class)
    add_malloc(train)
    train.set_defaults(run=lambda args: _train(args, task))

    evaluate = actions.add_parser("eval", help="COCO box/mask AP or mIoU of a checkpoint, printed and written as JSON")
    evaluate.add_argument("--checkpoint", required=True, help=f"a `{task.command}` checkpoint (best.pth)")
    evaluate.add_argument("--data", help="dataset root or data name (default: the run's own)")
    evaluate.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    evaluate.add_argument("--batch-size", type=integer(1), default=2, help="images per batch (2; segmentation: 1)")
    evaluate.add_argument("--workers", type=integer(0), default=min(2, os.cpu_count() or 1), help="loader processes")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    evaluate.add_argument("--amp", default="auto", choices=AMP_MODES, help="mixed precision")
    evaluate.add_argument("--json", metavar="PATH", help="results file (default: <checkpoint>.eval.json beside it)")
    add_force(evaluate, "--json", "an eval results file")
    add_malloc(evaluate)
    evaluate.set_defaults(run=lambda args: _evaluate(args, task))

    predict = actions.add_parser("predict", help="PNG overlays and JSON for images and folders")
    predict.add_argument(
        "images", nargs="+", metavar="IMAGES_OR_DIRS", help="image files and folders (recursive), or a data name"
    )
    predict.add_argument("--checkpoint", required=True, help=f"a `{task.command}` checkpoint (best.pth)")
    predict.add_argument(
        "--output", metavar="DIR", help=f"folder for the PNGs and JSON (default: {task.name}-predictions)"
    )
    if task is Detection:
        predict.add_argument(
            "--score-threshold", type=number(0, 1), default=0.5, help="draw detections scoring at least this (0.5)"
        )
    predict.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    predict.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    predict.add_argument("--amp", default="auto", choices=AMP_MODES, help="mixed precision")
    add_force(predict, "outputs", "of ours")
    add_malloc(predict)
    predict.set_defaults(run=lambda args: _predict(args, task))


def _train(args: argparse.Namespace, task: type[Task]) -> int:
    config, checkpoint = prepare_run(task, args.config, config_overrides(args, task.config_class), args.resume)
    try:
        run_training(task, config, checkpoint)
    except TrainingInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 128 + e.signum
    return 0


def _evaluate(args: argparse.Namespace, task: type[Task]) -> int:
    checkpoint = Path(args.checkpoint).expanduser()
    out = Path(args.json) if args.json else checkpoint.with_name(f"{checkpoint.stem}.eval.json")
    env = init_distributed(args.device)  # under torchrun, every process evaluates a shard
    try:
        amp_dtype = resolve_amp(args.amp, env.device)
        dense = load_dense_model(str(checkpoint), task, env.device, args.ema)
        # the dataset's folder is an input as a whole: its annotations, images and classes.txt are never written
        inputs = [checkpoint, validation_root(dense, args.data)]
        out = check_output(out, "--json", "dense-eval-json", inputs=inputs, force=args.force)
        dataset, loader = validation_loader(dense, args.data, env, args.batch_size, args.workers)
        if env.is_main and dataset.problems:  # images left out of the metrics are said, not silently dropped
            print(f"warning: {dataset.problem_report()}", file=sys.stderr)
        if task is Detection:
            metrics = evaluate_detection(dense.model, loader, env, amp_dtype, dataset)
        else:
            metrics = evaluate_segmentation(dense.model, loader, env, amp_dtype, len(dense.class_names))
    finally:
        env.shutdown()
    if not env.is_main:
        return 0
    record = {"task": task.name, "model": dense.config.model, "checkpoint": dense.source, "ema": args.ema}
    record.update(data=str(dataset.root), **metrics)
    if task is Detection:
        masks = f"  mask AP {metrics['segm_ap']:.2f}" if "segm_ap" in metrics else ""
        line = (
            f"box AP {metrics['bbox_ap']:.2f} (AP50 {metrics['bbox_ap50']:.2f}, AP75 {metrics['bbox_ap75']:.2f}){masks}"
        )
    else:
        record["class_iou"] = dict(zip(dense.class_names, metrics.pop("iou"), strict=True))
        record["class_acc"] = dict(zip(dense.class_names, metrics.pop("acc"), strict=True))
        record.pop("iou"), record.pop("acc")
        line = f"mIoU {metrics['miou']:.2f}  mAcc {metrics['macc']:.2f}  aAcc {metrics['aacc']:.2f}"
    print(f"{dense.config.model} {task.name} on {dataset.root}: {line}  {metrics['images']} images")
    unreadable = dataset.new_unreadable()
    if unreadable:
        print(f"skipped {len(unreadable)} unreadable files: {'; '.join(p for p, _ in unreadable[:10])}")
    write_json(record, out)
    print(f"wrote {out}")
    return 0


def _predict(args: argparse.Namespace, task: type[Task]) -> int:
    paths = named_inputs(args.images, "detection" if task is Detection else "segmentation")
    files, skipped_links = list_images(paths) if all(Path(p).exists() for p in paths) else _missing(paths)
    if not files:
        raise UserError(f"no image files in {', '.join(args.images)}")
    folder = Path(args.output or f"{task.name}-predictions").expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output {folder} is a file: name a folder for the PNGs and JSON")
    inputs = [*files, Path(args.checkpoint)]
    suffixes = ("",) if task is Detection else ("", "_labels")
    names = _output_names(files, suffixes)
    overlays = {f: check_output(folder / names[f][0], "--output", "png", inputs, args.force) for f in files}
    label_maps = {} if task is Detection else {
        f: check_output(folder / names[f][1], "--output", "png", inputs, args.force) for f in files
    }  # fmt: skip
    json_path = check_output(folder / "predictions.json", "--output", "dense-predictions", inputs, args.force)
    device = resolve_device(args.device)
    dense = load_dense_model(args.checkpoint, task, device, args.ema)
    amp_dtype = resolve_amp(args.amp, device)
    if task is Detection:
        results, skipped = predict_detections(dense, files, overlays, args.score_threshold, amp_dtype)
    else:
        results, skipped = predict_segmentation(dense, files, overlays, label_maps, amp_dtype)
    for what, items in (("files", skipped), ("links", skipped_links)):
        if items:
            shown = "; ".join(f"{path} ({reason})" for path, reason in items[:10])
            print(f"warning: skipped {len(items)} {what}: {shown}", file=sys.stderr)
    write_json(results, json_path)
    what = "detections" if task is Detection else "label maps"
    print(f"wrote {len(results)} {what} for {len(files) - len(skipped)} images to {json_path} and PNGs to {folder}")
    return 0


def _missing(paths: list[str]) -> tuple:
    missing = next(p for p in paths if not Path(p).exists())
    raise UserError(f"{missing}: no such file or folder")


def _output_names(files: list[Path], suffixes: tuple[str, ...]) -> dict[Path, list[str]]:
    """The PNG names of each input, one per suffix (`x.png`, `x_labels.png`): its stem, numbered (`x_1`) where that
    would give a name already taken, by an earlier input of the same stem or by another's suffixed name (compared
    without case, as some file systems compare them).

    Names go by input order (the order of `image_id`), so the same inputs always get the same names; a segmentation's
    `predictions.json` also names each input's PNGs.
    """
    taken: set[str] = set()
    names = {}
    for f in files:
        stem, number = f.stem, 0
        while any(f"{stem}{suffix}.png".casefold() in taken for suffix in suffixes):
            number += 1
            stem = f"{f.stem}_{number}"
        names[f] = [f"{stem}{suffix}.png" for suffix in suffixes]
        taken.update(name.casefold() for name in names[f])
    return names
