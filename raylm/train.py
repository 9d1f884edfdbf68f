"""`python -m raylm.train [JOB.yaml] [key=value ...]`: a YAML job plus overrides -> a trained model.

Job keys are LanguageModelingArgs fields plus the constructor's (model_type, model_name, train_file,
eval_file, train_files, generator_name, discriminator_name). Overrides on the command line win over
the file; `config.n_layer=2` sets one entry of a dict field. The whole job is checked (unknown keys,
value types, value ranges) before anything is read or Ray starts. With no job file it runs the
embedded default: a small GPT-2 trained from scratch on a sample corpus made from Python's docstrings.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional, Union

import yaml

from raylm.config import (
    FIELD_TYPES,
    LanguageModelingArgs,
    YamlLoader,
    field_help,
    raise_problems,
    type_errors,
    unknown_fields_error,
)
from raylm.errors import ConfigError, RaylmUserError

PathSpec = Union[str, list, dict]

JOB_KEYS = {
    "model_type": (
        "Model type: gpt2, openai-gpt, bert, roberta, distilbert, camembert, electra, auto, causal, "
        "or any transformers masked/causal LM type."
    ),
    "model_name": "Hub name or folder of the model to fine-tune; null trains from scratch.",
    "train_file": (
        "Training text: a file, a list, a folder, a glob or an s3://, gs://, file:// URI; "
        "or a mixture mapping such sources to weights ({web/*.parquet: 0.7, code.jsonl.gz: 0.3})."
    ),
    "eval_file": "Evaluation text (same forms as train_file); evaluated after training.",
    "train_files": "Text to train a tokenizer on when training from scratch (default: train_file).",
    "generator_name": "ELECTRA: generator hub name or folder.",
    "discriminator_name": "ELECTRA: discriminator hub name or folder.",
}
# model_type and train_file are required; a missing one is reported as such, after the type check.
JOB_KEY_TYPES: dict[str, Any] = {
    "model_type": Optional[str],
    "model_name": Optional[str],
    "train_file": Optional[PathSpec],
    "eval_file": Optional[PathSpec],
    "train_files": Optional[PathSpec],
    "generator_name": Optional[str],
    "discriminator_name": Optional[str],
}

DEFAULT_SAMPLE_DIR = os.path.join("outputs", "sample_corpus")


@dataclass(frozen=True)
class Job:
    """A checked job, typed: the constructor's keys and the validated LanguageModelingArgs.

    `resolve_job` checks the mapping once; what runs it (run_job, a sweep and each of its trials)
    receives this and derives variants with `with_values`, which checks only the values it sets.
    """

    model_type: str
    train_file: PathSpec
    args: LanguageModelingArgs
    model_name: Optional[str] = None
    eval_file: Optional[PathSpec] = None
    train_files: Optional[PathSpec] = None
    generator_name: Optional[str] = None
    discriminator_name: Optional[str] = None

    @classmethod
    def from_mapping(cls, job: dict) -> "Job":
        """The job from a mapping that `resolve_job` returned (its keys and values are known to be right)."""
        constructor = {key: value for key, value in job.items() if key in JOB_KEYS}
        return cls(
            **constructor, args=LanguageModelingArgs.from_dict({k: v for k, v in job.items() if k not in JOB_KEYS})
        )

    def to_dict(self) -> dict:
        """The mapping again (a YAML job): the constructor's keys, then the fields that differ from their defaults."""
        constructor = {key: getattr(self, key) for key in JOB_KEYS}
        defaults = LanguageModelingArgs().to_dict()
        fields = {name: value for name, value in self.args.to_dict().items() if value != defaults[name]}
        return {**{k: v for k, v in constructor.items() if v is not None or k == "model_name"}, **fields}

    def with_values(self, values: dict) -> "Job":
        """A copy with these fields set (a dotted name sets one entry of a dict field, e.g. config.n_layer), checked."""
        args = self.args.copy()
        for name, value in values.items():
            head, _, rest = name.partition(".")
            if rest and FIELD_TYPES.get(head) not in (dict, Optional[dict]):
                raise ConfigError(
                    f"{name!r} uses a dot, but {head!r} is not a dict field",
                    f"Write {head} alone, or use a dotted name only with dict fields, e.g. config.n_layer",
                )
            args.update_from_dict({head: _with_entry(getattr(args, head, None), rest, value) if rest else value})
        args.validate()
        return dataclasses.replace(self, args=args)

    def model_kwargs(self) -> dict:
        """LanguageModelingModel's arguments; the tokenizer trains on train_file unless train_files is set."""
        names = ("model_type", "model_name", "generator_name", "discriminator_name")
        return {
            **{name: getattr(self, name) for name in names},
            "train_files": self.train_files or self.train_file,
            "args": self.args.copy(),
        }


def default_job() -> dict:
    """The embedded default: a ~1M-parameter GPT-2 from scratch on the sample corpus, on a local Ray."""
    from raylm.data.sample_corpus import write_sample_corpus

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


def read_job_file(path: str) -> dict:
    """The YAML mapping in `path`, unchecked (raylm.tune pops its `sweep:` section before `resolve_job`)."""
    if not os.path.isfile(path):
        raise ConfigError(
            f"The job file {path!r} does not exist", "Pass the path of a YAML job, e.g. jobs/gpt2_from_scratch.yaml"
        )
    with open(path, encoding="utf-8") as f:
        job = _parse_yaml(f.read(), f"the job file {path!r}") or {}
    if not isinstance(job, dict):
        raise ConfigError(
            f"The job file {path!r} is not a mapping of keys to values", "Write one `key: value` per line"
        )
    return job


def resolve_job(job: dict, overrides: list[str]) -> dict:
    """The job with `key=value` overrides applied, checked: unknown keys, value types, value ranges.

    Every problem is found before any is reported, so a job with several mistakes fails once, with all of them.
    """
    job, problems = dict(job), []
    for item in overrides:
        try:
            _apply_override(job, item)
        except ConfigError as err:
            problems.append(err)
    unknown = [k for k in job if k not in JOB_KEYS and k not in FIELD_TYPES]
    if unknown:
        problems.append(unknown_fields_error(unknown))
    known = {k: v for k, v in job.items() if k not in unknown}
    wrong = type_errors(known, {**FIELD_TYPES, **JOB_KEY_TYPES})
    if wrong:
        problems.append(
            ConfigError(
                f"Wrong value type{'s' if len(wrong) > 1 else ''}: " + "; ".join(wrong),
                "Correct the value in the job file or the key=value override (python -m raylm.train --help describes "
                "each key)",
            )
        )
    if not job.get("model_type"):
        problems.append(
            ConfigError(
                "The job has no model_type", "Add `model_type: gpt2` (or bert, roberta, electra, ...) to the job"
            )
        )
    if not job.get("train_file"):
        problems.append(
            ConfigError(
                "The job has no train_file",
                "Add `train_file: data/train.txt` (a file, list, folder, glob or URI) to the job",
            )
        )
    args = LanguageModelingArgs.from_dict({k: v for k, v in known.items() if k not in JOB_KEYS})
    problems += args.value_problems()
    if args.evaluate_during_training is True and not job.get("eval_file"):
        problems.append(
            ConfigError(
                "evaluate_during_training is true but the job has no eval_file",
                "Add `eval_file: data/test.txt` to the job, or set evaluate_during_training: false",
            )
        )
    raise_problems(problems)
    return job


def _apply_override(job: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(
            f"Override {item!r} is not of the form key=value", "Write overrides as key=value, e.g. learning_rate=1e-4"
        )
    _set_override(job, key, _parse_yaml(text, f"the override {item!r}"))


def load_job(job_file: Optional[str], overrides: list[str]) -> dict:
    """The checked job: the YAML file (or the embedded default) with the overrides applied."""
    return resolve_job(default_job() if job_file is None else read_job_file(job_file), overrides)


def run_job(job: dict) -> dict:
    """Build the model from a resolved job, train it, and evaluate when eval_file is given."""
    from raylm.api import LanguageModelingModel

    typed = Job.from_mapping(job)
    _check_data_files(typed)
    args = typed.args
    model = LanguageModelingModel(**typed.model_kwargs())
    if args.evaluate_during_training:
        # train_model then returns the evaluations (training_progress_scores), not the mean loss.
        global_step, _ = model.train_model(typed.train_file, eval_file=typed.eval_file)
        outcome = {"global_step": global_step, "output_dir": args.output_dir}
    else:
        global_step, train_loss = model.train_model(typed.train_file)
        outcome = {"global_step": global_step, "train_loss": train_loss, "output_dir": args.output_dir}
    if typed.eval_file is not None:
        outcome.update(model.eval_model(typed.eval_file))
    return outcome


def _check_data_files(job: Job) -> None:
    """The job's text files exist and hold text, named by the job's own keys, before a model is downloaded or built.

    The tokenizer trains on train_file when train_files is not set; a missing file must then be
    reported as the train_file the job has, not as the train_files the Python API calls it.
    """
    from raylm.data.sources import check_text_files, resolve_text_files

    for key in ("train_file", "train_files", "eval_file"):
        if getattr(job, key) is not None:
            check_text_files(
                resolve_text_files(getattr(job, key), role=key), role=key, text_column=job.args.text_column
            )


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=YamlLoader)
    except yaml.YAMLError as err:
        problem = " ".join(str(err).split())
        raise ConfigError(
            f"Could not read {where} as YAML: {problem}",
            "Fix the YAML syntax (quote strings that contain ': ' or start with a special character)",
        ) from None


def _set_override(job: dict, key: str, value: Any) -> None:
    """job[key] = value; a dotted key (config.n_layer) sets one entry inside a dict-valued field."""
    head, _, rest = key.partition(".")
    if rest and FIELD_TYPES.get(head) not in (dict, Optional[dict]):
        raise ConfigError(
            f"Override {key!r} uses a dot, but {head!r} is not a dict field",
            f"Write {head}=<value>, or use a dotted key only with dict fields, e.g. config.n_layer=2",
        )
    job[head] = _with_entry(job.get(head), rest, value) if rest else value


def _with_entry(mapping: Optional[dict], dotted_key: str, value: Any) -> dict:
    """A copy of `mapping` with the entry at `dotted_key` ("a.b" -> mapping["a"]["b"]) set to value."""
    head, _, rest = dotted_key.partition(".")
    updated = dict(mapping or {})
    inner = updated.get(head) if isinstance(updated.get(head), dict) else None
    updated[head] = _with_entry(inner, rest, value) if rest else value
    return updated


def _parser(prog: str) -> argparse.ArgumentParser:
    lines = [f"  {name}: {text}" for name, text in {**JOB_KEYS, **field_help()}.items()]
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a language model with Ray. Without JOB, trains a small GPT-2 on a sample corpus.",
        epilog="job keys (in the YAML or as key=value; config.n_layer=2 sets one entry of a dict):\n"
        + "\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("job", nargs="?", help="YAML job file (optional)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--print-config", action="store_true", help="print the resolved job and exit")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Exit status: 0 trained (or printed), 2 a user error (reported as one paragraph)."""
    prog = "raylm" if os.path.basename(sys.argv[0]) == "raylm" else "python -m raylm.train"
    options = _parser(prog).parse_args(argv)
    job_file, overrides = options.job, list(options.overrides)
    if job_file is not None and "=" in job_file and not job_file.endswith((".yaml", ".yml")):
        job_file, overrides = None, [job_file] + overrides
    from raylm.console import configure_logging, logger, report_error, write_result

    configure_logging()
    try:
        job = load_job(job_file, overrides)
        if options.print_config:
            write_result(yaml.safe_dump(job, sort_keys=False))
            return 0
        outcome = run_job(job)
    except RaylmUserError as err:
        report_error(err)
        return 2
    logger.info(
        "Done: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in outcome.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
