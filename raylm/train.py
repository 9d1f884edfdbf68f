"""`python -m raylm.train [JOB.yaml] [key=value ...]`: a YAML job plus overrides -> a trained model.

Job keys are LanguageModelingArgs fields plus the constructor's (model_type, model_name, train_file,
eval_file, train_files, generator_name, discriminator_name). With no job file it runs the embedded
default: a small GPT-2 trained from scratch on a sample corpus made from Python's docstrings.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import yaml

from raylm.config import LanguageModelingArgs, field_help, unknown_fields_error
from raylm.errors import ConfigError, RaylmUserError

JOB_KEYS = {
    "model_type": "Model type: gpt2, openai-gpt, bert, roberta, distilbert, camembert, auto, causal, or any transformers masked/causal LM type.",
    "model_name": "Hub name or folder of the model to fine-tune; null trains from scratch.",
    "train_file": "Training text: a file, a list, a folder, a glob or an s3://, gs://, file:// URI.",
    "eval_file": "Evaluation text (same forms as train_file); evaluated after training.",
    "train_files": "Text to train a tokenizer on when training from scratch (default: train_file).",
    "generator_name": "ELECTRA: generator hub name or folder.",
    "discriminator_name": "ELECTRA: discriminator hub name or folder.",
}

DEFAULT_SAMPLE_DIR = os.path.join("outputs", "sample_corpus")


def default_job() -> dict:
    """The embedded default: a ~1M-parameter GPT-2 from scratch on the sample corpus, on a local Ray."""
    from raylm.sample_corpus import write_sample_corpus

    train_path, test_path = write_sample_corpus(DEFAULT_SAMPLE_DIR)
    return {
        "model_type": "gpt2",
        "model_name": None,
        "train_file": train_path,
        "eval_file": test_path,
        "mlm": False,
        "vocab_size": 2000,
        "dataset_type": "text",
        "block_size": 128,
        "config": {"n_layer": 4, "n_embd": 128, "n_head": 4, "n_positions": 128},
        "learning_rate": 5e-3,
        "train_batch_size": 16,
        "num_train_epochs": 3,
        "logging_steps": 20,
        "output_dir": os.path.join("outputs", "gpt2-sample"),
        "overwrite_output_dir": True,
    }


def load_job(job_file: Optional[str], overrides: list[str]) -> dict:
    """The job dict: the YAML (or the embedded default) with key=value overrides applied; unknown keys rejected."""
    job = default_job() if job_file is None else _read_yaml(job_file)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"Override {item!r} is not of the form key=value", "Write overrides as key=value, e.g. learning_rate=1e-4")
        job[key.strip()] = yaml.safe_load(value)
    unknown = [k for k in job if k not in JOB_KEYS and k not in field_help()]
    if unknown:
        raise unknown_fields_error(unknown)
    return job


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"The job file {path!r} does not exist", "Pass the path of a YAML job, e.g. jobs/gpt2_from_scratch.yaml")
    with open(path, encoding="utf-8") as f:
        job = yaml.safe_load(f) or {}
    if not isinstance(job, dict):
        raise ConfigError(f"The job file {path!r} is not a mapping of keys to values", "Write one `key: value` per line")
    return job


def run_job(job: dict) -> dict:
    """Build the model from the job, train it, and evaluate when eval_file is given."""
    from raylm.api import LanguageModelingModel

    job = dict(job)
    model_type = job.pop("model_type", None)
    if not model_type:
        raise ConfigError("The job has no model_type", "Add `model_type: gpt2` (or bert, roberta, ...) to the job")
    model_name = job.pop("model_name", None)
    train_file = job.pop("train_file", None)
    eval_file = job.pop("eval_file", None)
    train_files = job.pop("train_files", None) or train_file
    constructor = {k: job.pop(k) for k in ("generator_name", "discriminator_name") if k in job}
    args = LanguageModelingArgs.from_dict(job)
    model = LanguageModelingModel(model_type, model_name, args=args, train_files=train_files, **constructor)
    global_step, train_loss = model.train_model(train_file)
    outcome = {"global_step": global_step, "train_loss": train_loss, "output_dir": args.output_dir}
    if eval_file is not None:
        outcome.update(model.eval_model(eval_file))
    return outcome


def _parser() -> argparse.ArgumentParser:
    lines = [f"  {name}: {text}" for name, text in {**JOB_KEYS, **field_help()}.items()]
    return argparse.ArgumentParser(
        prog="python -m raylm.train",
        description="Train a language model with Ray. Without JOB, trains a small GPT-2 on a sample corpus.",
        epilog="job keys (in the YAML or as key=value):\n" + "\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main(argv: Optional[list[str]] = None) -> int:
    parser = _parser()
    parser.add_argument("job", nargs="?", help="YAML job file (optional)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--print-config", action="store_true", help="print the resolved job and exit")
    options = parser.parse_args(argv)
    job_file, overrides = options.job, list(options.overrides)
    if job_file is not None and "=" in job_file and not job_file.endswith((".yaml", ".yml")):
        job_file, overrides = None, [job_file] + overrides
    from raylm.console import configure_logging, logger, report_error

    configure_logging()
    try:
        job = load_job(job_file, overrides)
        if options.print_config:
            sys.stdout.write(yaml.safe_dump(job, sort_keys=False))
            return 0
        outcome = run_job(job)
    except RaylmUserError as err:
        report_error(err)
        return 2
    logger.info("Done: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in outcome.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
