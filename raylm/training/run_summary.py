"""The end-of-run table: a finished run's trainer state, its last evaluation and where its model and checkpoints
went -> the rows `train_model` logs (steps, tokens, wall time, workers, mixture, eval, model, checkpoints, disk).
"""

from __future__ import annotations

import os
from typing import Optional

from raylm.config import LanguageModelingArgs
from raylm.console import format_bytes, format_seconds
from raylm.data import storage
from raylm.data.epoch_data import EpochOrder
from raylm.training.checkpoints import CHECKPOINT_PREFIX, TrainerState, is_training_checkpoint
from raylm.training.outputs import best_model_dir


def summary_rows(
    state: TrainerState,
    last_eval: Optional[dict],
    wall_seconds: float,
    resumed_at_step: Optional[int],
    output_dir: str,
    args: LanguageModelingArgs,
    ray_run_folder: str,
    final_checkpoint: str,
    worker_counts: list[tuple[int, int]],
    resources_per_worker: dict,
) -> list[tuple[str, str]]:
    """The end-of-run table: what was trained, how fast, how well, and where it all is."""
    steps = f"{state.global_step:,}"
    if state.global_step != state.total_steps:
        steps += f" of {state.total_steps:,}"
    notes = [f"{state.train_examples:,} examples"]
    if resumed_at_step is not None:
        notes.append(f"resumed at step {resumed_at_step:,}")
    if state.stopped_early:
        notes.append("stopped early")
    rows = [
        ("steps", f"{steps} ({', '.join(notes)}), mean training loss {state.train_loss:.4f}"),
        # Inputs (non-pad) and targets (what the loss was computed on: for MLM about 15% of the inputs).
        (
            "tokens",
            f"{state.train_input_tokens:,} in ({state.train_input_tokens / max(state.train_seconds, 1e-9):,.0f}/s), "
            f"{state.train_tokens:,} predicted",
        ),
        ("wall time", f"{format_seconds(wall_seconds)} ({format_seconds(state.train_seconds)} in the training loop)"),
    ]
    each = ", ".join(
        f"{amount:g} {name}{'s' if amount != 1 else ''}" if name in ("CPU", "GPU") else f"{name} {amount:g}"
        for name, amount in resources_per_worker.items()
    )
    if args.is_elastic and worker_counts:
        rows.append(
            (
                "workers",
                ", ".join(f"{count} from step {step:,}" for step, count in worker_counts)
                + f" (elastic, {args.min_workers} to {args.max_workers}), {each} each",
            )
        )
    else:
        rows.append(("workers", f"{args.num_workers} x {each}"))
    if last_eval is not None:
        rows.append(
            (
                "eval",
                f"eval_loss {last_eval['eval_loss']:.4f}, perplexity {last_eval['perplexity']:.2f} (step "
                f"{last_eval['global_step']:,})",
            )
        )
    if args.no_save:
        rows.append(("model", f"not written to output_dir (no_save); final checkpoint {final_checkpoint}"))
        rows.append(("checkpoints", ray_run_folder))
        rows.append(("disk", _disk_row(None, ray_run_folder, args)))
        return rows
    model = storage.display(output_dir)
    best_dir = best_model_dir(args, output_dir)
    if state.best_step is not None and storage.isdir(best_dir):
        model += f"; best (step {state.best_step:,}) in {storage.display(best_dir)}"
    rows.append(("model", model))
    mirrored = [
        name
        for name in storage.listdir(output_dir)
        if name.startswith(CHECKPOINT_PREFIX) and is_training_checkpoint(storage.join(output_dir, name))
    ]
    if state.label in mirrored:
        where = storage.display(storage.join(output_dir, state.label)) + (
            f" and {len(mirrored) - 1} more" if len(mirrored) > 1 else ""
        )
        rows.append(("checkpoints", f"{where}; Ray's copies in {ray_run_folder}"))
    else:
        rows.append(("checkpoints", ray_run_folder))
    rows.append(
        (
            "disk",
            _disk_row(
                sum(_folder_bytes(os.path.join(output_dir, name)) or 0 for name in mirrored), ray_run_folder, args
            ),
        )
    )
    return rows


def _disk_row(mirrored_bytes: Optional[int], ray_run_folder: str, args: LanguageModelingArgs) -> str:
    """What the checkpoints (optimizer state included) occupy in output_dir and in Ray's run folder; nothing removes
    them but checkpoints_to_keep."""
    ray_bytes = _folder_bytes(ray_run_folder)
    parts = [] if mirrored_bytes is None else [f"{format_bytes(mirrored_bytes)} of checkpoints in output_dir"]
    parts.append(f"{'?' if ray_bytes is None else format_bytes(ray_bytes)} in Ray's run folder")
    keep = (
        "all checkpoints kept (checkpoints_to_keep=None)"
        if args.checkpoints_to_keep is None
        else f"checkpoints_to_keep={args.checkpoints_to_keep}"
    )
    return f"{', '.join(parts)}; {keep}"


def _folder_bytes(path: str) -> Optional[int]:
    """The size of every file under a local folder or a storage URI; None when it cannot be listed."""
    import pyarrow.fs

    try:
        filesystem, fs_path = storage.filesystem(path)
        infos = filesystem.get_file_info(pyarrow.fs.FileSelector(fs_path, recursive=True, allow_not_found=True))
    except (OSError, ValueError):
        return None
    return sum(info.size for info in infos if info.type == pyarrow.fs.FileType.File)


def mixture_row(state: TrainerState, first_epoch: EpochOrder, sources: list, weights: list[float]) -> tuple[str, str]:
    """What was drawn from each source of a mixture, from the mixture's pattern and the run's position."""
    drawn = first_epoch.drawn(state.epoch, state.epoch_examples)
    return (
        "mixture",
        ", ".join(
            f"{source} {count / max(int(drawn.sum()), 1):.1%} ({count:,} examples; weight {weight / sum(weights):.1%})"
            for source, count, weight in zip(sources, drawn.tolist(), weights)
        ),
    )
