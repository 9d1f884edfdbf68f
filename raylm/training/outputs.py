"""Outputs: output_dir -> checked before Ray starts (empty unless overwrite_output_dir, writable, a bucket probed); a
finished run's checkpoint folder -> the model in output_dir, without the run state (an FSDP checkpoint's shards exported
as Hugging Face weights); args -> best_model_dir.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

from raylm.config import LanguageModelingArgs
from raylm.data import storage
from raylm.errors import OutputDirError
from raylm.models.modeling import load_trained
from raylm.models.sharded_weights import reads_from_shards
from raylm.training.checkpoints import RUN_STATE_FILES, read_trainer_state


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    if storage.is_remote(output_dir):
        _check_remote_output_dir(output_dir, overwrite)
        return
    output_dir = storage.local_path(output_dir)
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise _not_empty(output_dir)
    parent = output_dir if os.path.isdir(output_dir) else os.path.dirname(os.path.abspath(output_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputDirError(
            f"output_dir {output_dir!r} cannot be created: {parent!r} is a file",
            "Choose an output_dir whose parents are folders",
        )
    if not os.access(parent, os.W_OK):
        raise OutputDirError(
            f"output_dir {output_dir!r} cannot be written (no write permission on {parent!r})",
            "Choose an output_dir you can write to",
        )


def _not_empty(output_dir: str) -> OutputDirError:
    return OutputDirError(
        f"output_dir {output_dir!r} already exists and is not empty, and overwrite_output_dir is False",
        "Set overwrite_output_dir=True to write into it, or choose another output_dir",
    )


def _check_remote_output_dir(output_dir: str, overwrite: bool) -> None:
    """Object storage: refuse a non-empty output_dir, and write (then delete) a probe object, before Ray starts."""
    fix = (
        "Check the bucket name, the endpoint (AWS_ENDPOINT_URL, or ?endpoint_override=host:port&scheme=http in the "
        "URI) and the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
    )
    try:
        names = storage.listdir(output_dir)
    except OSError as err:
        raise OutputDirError(f"output_dir {output_dir!r} cannot be read: {str(err).splitlines()[0]}", fix) from None
    if names and not overwrite:
        raise _not_empty(output_dir)
    probe = storage.join(output_dir, ".raylm-write-probe")
    try:
        storage.write_text(probe, "raylm checks that output_dir can be written before training starts\n")
        storage.delete(probe)
    except OSError as err:
        raise OutputDirError(f"output_dir {output_dir!r} cannot be written: {str(err).splitlines()[0]}", fix) from None


def results_text(results: dict) -> str:
    return "".join(f"{key} = {results[key]}\n" for key in sorted(results))


def publish_model(
    checkpoint_dir: str, output_dir: str, args: LanguageModelingArgs, eval_results: Optional[dict] = None
) -> None:
    """The trained model into output_dir, without the run state, with `args` (and `eval_results` when given);
    published (storage.publishing) so no reader sees half of it."""
    with storage.publishing(output_dir, merge=True) as staging:
        for name in os.listdir(checkpoint_dir):
            source = os.path.join(checkpoint_dir, name)
            if name in RUN_STATE_FILES:
                continue
            if os.path.isdir(source):
                shutil.copytree(source, os.path.join(staging, name))
            else:
                shutil.copy2(source, os.path.join(staging, name))
        export_weights(checkpoint_dir, staging, args.trust_remote_code)
        args.save(staging)
        if eval_results is not None:
            with open(os.path.join(staging, "eval_results.txt"), "w", encoding="utf-8") as f:
                f.write(results_text(eval_results))


def export_weights(checkpoint_dir: str, staging: str, trust_remote_code: bool) -> None:
    """An FSDP checkpoint without Hugging Face weights: its shards read into a whole model here (the driver, after
    training or beside it: no worker waits) and saved into `staging` as Hugging Face weights; nothing otherwise."""
    if reads_from_shards(checkpoint_dir):
        objective = read_trainer_state(checkpoint_dir).objective
        load_trained(objective, checkpoint_dir, trust_remote_code).save_pretrained(staging)


def without_run_state(folder: str) -> None:
    """Delete a checkpoint copy's run state (the files and the shards folder of RUN_STATE_FILES)."""
    for name in RUN_STATE_FILES:
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def best_model_dir(args: LanguageModelingArgs, output_dir: str) -> str:
    """best_model_dir; left at its default while output_dir moved, it follows output_dir (Simple Transformers' did
    not)."""
    default_best = LanguageModelingArgs().best_model_dir
    if args.best_model_dir == default_best and os.path.normpath(output_dir) != os.path.normpath(
        LanguageModelingArgs().output_dir
    ):
        return storage.join(output_dir, "best_model")
    return args.best_model_dir
