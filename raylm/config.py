"""`LanguageModelingArgs`: the one typed configuration that flows from Python, YAML or the CLI into the loop.

Field names and defaults are Simple Transformers' (flat, so `model_args.x = ...` code runs unchanged),
plus the Ray fields. Each field's `help` becomes the CLI's `--help`. `validate()` runs once, on the
driver, before Ray starts; the worker receives `to_dict()` and rebuilds the object with `from_dict()`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

import yaml

from raylm.errors import ConfigError


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that `1e-4` is a float (as in YAML 1.2) rather than the string '1e-4'.

    PyYAML follows YAML 1.1, where a float needs a dot; a learning rate written `5e-5` would
    otherwise arrive as a string.
    """


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

SCHEDULERS = (
    "constant_schedule",
    "constant_schedule_with_warmup",
    "linear_schedule_with_warmup",
    "cosine_schedule_with_warmup",
    "cosine_with_hard_restarts_schedule_with_warmup",
    "polynomial_decay_schedule_with_warmup",
)
OPTIMIZERS = ("AdamW", "Adafactor")
DATASET_TYPES = ("simple", "line_by_line", "text")
CHECKPOINT_UPLOAD_MODES = ("sync", "async")
PARALLEL_STRATEGIES = ("ddp", "fsdp")


def _field(default: Any, help: str, **kwargs: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class LanguageModelingArgs:
    """Every option of a raylm run. Unknown names are rejected with the closest field suggested."""

    # --- objective and data ---------------------------------------------------------------
    mlm: bool = _field(
        True,
        "Masked-LM objective (True) or causal LM (False). Must match the model type: gpt2/openai-gpt need False, bert/roberta/distilbert/camembert/electra need True.",
    )
    mlm_probability: float = _field(
        0.15,
        "Fraction of tokens selected for masking (MLM and ELECTRA); of those 80% become the mask token, 10% a random token, 10% stay.",
    )
    block_size: int = _field(
        -1,
        "Tokens per training example. <= 0: min(max_seq_length, the model's positions). Larger than the model's positions is an error.",
    )
    max_seq_length: int = _field(128, "Default example length when block_size <= 0.")
    dataset_type: str = _field(
        "simple",
        "'simple' or 'line_by_line': each non-empty line is a sample of its own, truncated to block_size (simple honours sliding_window): it never attends to, nor is predicted from, another line. Several whole lines share each row of block_size tokens, kept apart as packing_document_mask keeps documents apart, so a step carries about train_batch_size * block_size tokens however short the lines (models that cannot take the mask, see packing_document_mask, get one padded row a line). 'text': all lines joined with the end-of-document token (see document_separator) and cut into full block_size blocks (packing, no padding). 'None' means 'simple', as in Simple Transformers.",
    )
    document_separator: bool = _field(
        True,
        "Each document (a non-blank line or a record) ends with a separator token: a causal LM's eos, after each line in 'simple' / 'line_by_line' and between documents in 'text', so the model learns where a document ends (generate stops there); a masked model's separator ([SEP], </s>) between the documents of a 'text' block. False leaves them out, so the blocks hold the text alone, as Simple Transformers' do (its masked blocks also end with one [SEP], raylm's do not): for text whose lines are not documents (a book wrapped at line ends), or to compare with it on the same targets. A masked model's 'simple' examples keep their tokenizer's format ([CLS] line [SEP]).",
    )
    packing_document_mask: bool = _field(
        False,
        "'text' only: documents packed into one block stay apart: position ids restart at 0 at each document, attention does not cross documents, and a causal LM's loss never predicts a document's first token from the document before ('simple' and 'line_by_line' always keep their packed lines apart so). SDPA and eager attention get an explicit [batch, 1, block_size, block_size] block-diagonal mask (no mask-free SDPA kernel then); flash_attention_2/3/4 and flex_attention get the micro-batch as one row without padding and position ids alone (variable-length kernels, a FlexAttention block mask). Models: gpt2, bert, roberta, camembert, xlm-roberta, electra; distilbert with SDPA or eager only.",
    )
    sliding_window: bool = _field(
        False, "simple: split lines longer than block_size into overlapping windows instead of truncating them."
    )
    stride: float = _field(0.8, "sliding_window: windows start every int(window * stride) tokens.")
    text_column: str = _field(
        "text",
        "The field of each record that holds its text, in JSON Lines (.jsonl, .json, .ndjson) and Parquet (.parquet) files. Plain text files (also .gz, .zst) hold one document per line.",
    )
    shard_size_mb: float = _field(
        4.0,
        "Text files are read in shards of about this many MB (split at line ends); shards are the unit of parallel tokenization and of example ids.",
    )

    # --- tokenizer --------------------------------------------------------------------------
    tokenizer_name: Optional[str] = _field(
        None,
        "Load the tokenizer from this hub name or folder instead of model_name (or instead of training one from scratch).",
    )
    vocab_size: Optional[int] = _field(
        None,
        "Vocabulary size of a tokenizer trained from scratch (required when neither model_name nor tokenizer_name is given).",
    )
    min_frequency: int = _field(2, "Tokenizer training: minimum frequency of a merge / word piece.")
    special_tokens: list = _field(
        ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        "Byte-level BPE tokenizer training: the special tokens, in the roles bos, pad, eos, unk, mask (extra entries become additional special tokens). WordPiece (bert/distilbert/electra) always uses [PAD] [UNK] [CLS] [SEP] [MASK].",
    )
    clean_text: bool = _field(True, "WordPiece tokenizer training: remove control characters and normalise whitespace.")
    handle_chinese_chars: bool = _field(True, "WordPiece tokenizer training: put spaces around CJK characters.")
    strip_accents: bool = _field(True, "WordPiece tokenizer training: strip accents.")
    do_lower_case: bool = _field(
        False, "Tokenizer training: lowercase the text. Saved inside the tokenizer, so training and use always agree."
    )
    tokenizer_sample_mb: Optional[float] = _field(
        None,
        "Tokenizer training: learn from about this many MB of text, read from shards spread evenly over the whole corpus (its start, middle and end alike, not its first MB), so a large corpus is not read in full on the driver first. None: every line of train_files, as in Simple Transformers (which has no such option).",
    )

    # --- model ------------------------------------------------------------------------------
    config_name: Optional[str] = _field(
        None, "Load the model config from this hub name or folder instead of model_name."
    )
    config: dict = _field(
        {}, "Overrides for the model config class when training from scratch (e.g. n_layer, hidden_size)."
    )
    generator_config: dict = _field({}, "ELECTRA from scratch: overrides for the generator's ElectraConfig.")
    discriminator_config: dict = _field({}, "ELECTRA from scratch: overrides for the discriminator's ElectraConfig.")
    discriminator_loss_weight: float = _field(50.0, "ELECTRA: loss = generator loss + this * discriminator loss.")
    tie_generator_and_discriminator_embeddings: bool = _field(
        True, "ELECTRA: the generator and discriminator share one token-embedding tensor."
    )
    trust_remote_code: bool = _field(
        False, "Passed to from_pretrained. Leave False unless you trust the model repository's code."
    )

    # --- optimisation -------------------------------------------------------------------------
    train_batch_size: int = _field(
        8,
        "Examples (rows of at most block_size tokens) per micro-batch on each worker; the global batch is train_batch_size * num_workers * gradient_accumulation_steps. A 'text' row is one block; a 'simple' / 'line_by_line' row holds as many whole lines as fit, so an epoch takes about its tokens / (global batch * block_size) steps, as Simple Transformers' packed chunks do, and the learning-rate schedule is as long.",
    )
    eval_batch_size: int = _field(
        8, "Examples per evaluation batch. Results do not depend on it (losses are summed per token)."
    )
    num_train_epochs: int = _field(1, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = _field(
        -1, "> 0: train exactly this many optimizer steps (streams the data without counting it first)."
    )
    learning_rate: float = _field(4e-5, "Peak learning rate.")
    optimizer: str = _field("AdamW", "AdamW or Adafactor.")
    weight_decay: float = _field(0.0, "AdamW weight decay, not applied to biases and LayerNorm weights.")
    adam_epsilon: float = _field(1e-8, "AdamW epsilon.")
    adam_betas: tuple = _field((0.9, 0.999), "AdamW betas.")
    scheduler: str = _field("linear_schedule_with_warmup", "Learning-rate schedule: " + ", ".join(SCHEDULERS) + ".")
    warmup_ratio: float = _field(
        0.06, "Warm-up steps as a fraction of all optimizer steps (used when warmup_steps is 0)."
    )
    warmup_steps: int = _field(0, "Warm-up optimizer steps (overrides warmup_ratio when > 0).")
    cosine_schedule_num_cycles: float = _field(0.5, "Cosine schedules: number of cycles.")
    polynomial_decay_schedule_lr_end: float = _field(1e-7, "Polynomial schedule: final learning rate.")
    polynomial_decay_schedule_power: float = _field(1.0, "Polynomial schedule: power.")
    gradient_accumulation_steps: int = _field(1, "Micro-batches per optimizer step.")
    max_grad_norm: float = _field(1.0, "Gradient clipping norm (<= 0: off).")
    fp16: bool = _field(True, "Mixed precision on GPU (float16 autocast with a gradient scaler). Ignored on CPU.")
    bf16: bool = _field(False, "bfloat16 autocast on GPU instead of float16 (no scaler needed). Ignored on CPU.")
    manual_seed: Optional[int] = _field(
        None,
        "Seed for model initialisation, masking, shuffling and dropout. None: a fixed default (42), so runs are reproducible.",
    )

    # --- outputs and logging ---------------------------------------------------------------
    output_dir: str = _field(
        "outputs/", "Where the trained model, tokenizer and eval_results.txt are written (on the driver's machine)."
    )
    overwrite_output_dir: bool = _field(False, "Allow writing into a non-empty output_dir.")
    best_model_dir: str = _field(
        "outputs/best_model", "Where the best model found by evaluation during training is written."
    )
    no_save: bool = _field(
        False,
        "Leave output_dir as it was: no model, checkpoint copies or logs are written there (the model is still in the Ray checkpoint under storage_path). With overwrite_output_dir the logs still go there.",
    )
    not_saved_args: list = _field([], "Field names left out of the saved model_args.json.")
    logging_steps: int = _field(50, "Report loss, learning rate and throughput every this many optimizer steps.")
    save_steps: int = _field(2000, "Checkpoint every this many optimizer steps (-1: off).")
    save_model_every_epoch: bool = _field(True, "Checkpoint at the end of every epoch.")
    save_optimizer_and_scheduler: bool = _field(True, "Store optimizer and scheduler state in checkpoints.")
    save_eval_checkpoints: bool = _field(True, "Checkpoint at every evaluation during training.")
    save_best_model: bool = _field(
        True,
        "Keep the best model by early_stopping_metric in best_model_dir (evaluating during training). False: best_model_dir is not written.",
    )
    evaluate_during_training: bool = _field(
        False, "Evaluate on eval_file during training (train_model needs eval_file)."
    )
    evaluate_during_training_steps: int = _field(2000, "Evaluate every this many optimizer steps.")
    evaluate_during_training_verbose: bool = _field(False, "Log each evaluation during training.")
    evaluate_during_training_silent: bool = _field(True, "Hide the progress of evaluations during training.")
    evaluate_each_epoch: bool = _field(True, "Evaluate at the end of every epoch when evaluating during training.")
    use_early_stopping: bool = _field(False, "Stop when early_stopping_metric stops improving.")
    early_stopping_metric: str = _field("eval_loss", "Metric watched by early stopping and best-model selection.")
    early_stopping_metric_minimize: bool = _field(True, "Lower early_stopping_metric is better.")
    early_stopping_delta: float = _field(0.0, "Minimum improvement that resets the patience counter.")
    early_stopping_patience: int = _field(3, "Evaluations without improvement before stopping.")
    early_stopping_consider_epochs: bool = _field(False, "Count end-of-epoch evaluations towards early stopping.")
    silent: bool = _field(False, "No progress bar.")
    tensorboard_dir: Optional[str] = _field(None, "TensorBoard event folder (default: runs/ inside output_dir).")
    wandb_project: Optional[str] = _field(None, "Weights & Biases project (needs wandb installed).")
    wandb_kwargs: dict = _field({}, "Extra arguments for wandb.init.")

    # --- Ray ----------------------------------------------------------------------------------
    num_workers: Union[int, list] = _field(
        1,
        "Ray Train workers (one process each; one GPU each when use_gpu). [min, max] makes the run elastic: it starts with as many workers as the cluster gives (at least min), shrinks when a node is lost (each loss uses one of max_failures) and grows when nodes join, each time continuing from the latest checkpoint at the same examples; the global batch stays train_batch_size * gradient_accumulation_steps * max, and gradient accumulation adapts.",
    )
    elastic_resize_check_s: float = _field(
        60.0,
        "Elastic runs: how often Ray checks whether more workers fit (growing restarts the group from the latest checkpoint, so checkpoint often: save_steps).",
    )
    use_gpu: Optional[bool] = _field(
        None, "Train on GPUs. None: use them when the Ray cluster has them (and use_cuda was not set to False)."
    )
    resources_per_worker: Optional[dict] = _field(
        None,
        "Ray resources per worker, e.g. {'CPU': 4, 'GPU': 1}; a worker runs as many torch threads as CPUs. Default: on the local Ray raylm starts, an equal share of the machine's cores; on a cluster 1 CPU (+1 GPU with use_gpu).",
    )
    storage_path: Optional[str] = _field(
        None,
        "Where Ray keeps checkpoints and results: a local folder or s3://, gs://, file:// URI. Default: Ray's (~/ray_results). Must be shared storage on a multi-node cluster.",
    )
    experiment_name: Optional[str] = _field(
        None, "Name of the run folder under storage_path. Default: raylm-<model_type>-<timestamp>."
    )
    resume: bool = _field(
        False,
        "Continue the run named experiment_name from its latest checkpoint under storage_path (a job whose driver died: submit it again with resume: true). Without it, a run folder that already exists is refused rather than silently resumed; the first submission with resume: true starts the run.",
    )
    max_failures: int = _field(
        0, "Worker-group restarts allowed after a worker dies (resumes from the latest checkpoint)."
    )
    checkpoints_to_keep: Optional[int] = _field(
        None, "Keep at most this many Ray checkpoints, the newest (None: all). The output_dir copies follow Ray's."
    )
    checkpoint_upload_mode: str = _field(
        "sync",
        "How a checkpoint reaches storage_path: 'sync' (training waits until it is uploaded) or 'async' (rank 0 writes it to local disk, training goes on while Ray uploads it; the output_dir copy follows when the upload is registered).",
    )
    keep_best_checkpoints: bool = _field(
        False,
        "With checkpoints_to_keep: keep the checkpoints taken at a new best early_stopping_metric instead of the newest (the latest is kept too, to resume from). Sweeps set it for their trials.",
    )
    prefetch_batches: int = _field(
        2, "Optimizer steps' batches each worker reads and collates ahead of the model, on a thread (0: none ahead)."
    )
    torch_compile: bool = _field(
        False,
        "Compile the model with torch.compile (inductor, dynamic shapes) on each worker. The first steps pay the compile (tens of seconds on a CPU, a minute or more for a large model); the steps after run faster on a GPU. Evaluation during training uses the compiled model too.",
    )

    parallel_strategy: str = _field(
        "ddp",
        "How the workers share the model: 'ddp' (each worker holds the whole model, gradients all-reduced) or 'fsdp' (torch's FSDP2 fully_shard: each transformer block and the whole model sharded over the workers, so each holds about 1/num_workers of the weights, gradients and optimizer state, for models whose training state does not fit one device; it costs an all-gather of each block's weights in every forward and backward). fsdp takes bf16/fp16 as its mixed precision (weights computed in that dtype, gradients reduced in float32) and gathers the full weights and optimizer state to rank 0 for each checkpoint, which stays a Hugging Face folder. Not with torch_compile yet.",
    )
    fsdp_cpu_offload: bool = _field(
        False,
        "parallel_strategy 'fsdp': keep the sharded weights, gradients and optimizer state in CPU memory, copied to the GPU block by block (FSDP2's CPUOffloadPolicy; the optimizer step runs on the CPU). Slower; for models whose shards still do not fit.",
    )

    # --- accepted for Simple Transformers compatibility; Ray Data does this work differently --
    reprocess_input_data: bool = _field(
        True,
        "Tokenize the text again into the example store even when a matching store exists. False reuses one: safe, as a store is keyed by the files (path, size, modification time), the tokenizer and the example settings, so a changed file or tokenizer is never served stale.",
    )
    no_cache: bool = _field(
        False,
        "Like reprocess_input_data=True: always tokenize again (the store is still written, since the training workers read their examples from it).",
    )
    cache_dir: Optional[str] = _field(
        None,
        "Folder (or s3:// ... URI) of the example stores: the tokenized examples, one store per files + tokenizer + settings. Default: raylm-examples under storage_path. On a multi-node cluster every node must reach it.",
    )
    use_multiprocessing: bool = _field(True, "No effect: tokenization is parallel through Ray Data.")
    process_count: int = _field(1, "No effect: tokenization is parallel through Ray Data.")
    dataloader_num_workers: int = _field(
        0, "No effect: each worker reads its examples from the example store on a thread of its own."
    )
    n_gpu: int = _field(1, "No effect: use num_workers and use_gpu (one GPU per worker).")
    local_rank: int = _field(-1, "No effect: Ray Train sets up distributed training.")

    def __setattr__(self, name: str, value: Any) -> None:
        # Simple Transformers code sets attributes one by one (model_args.x = ...); a typo there
        # must fail as loudly as a typo in a dict.
        if name not in _FIELD_NAMES:
            raise unknown_fields_error([name])
        super().__setattr__(name, value)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict) -> "LanguageModelingArgs":
        args = cls()
        args.update_from_dict(values)
        return args

    @classmethod
    def from_yaml(cls, path: str) -> "LanguageModelingArgs":
        with open(path, encoding="utf-8") as f:
            values = yaml.load(f, Loader=YamlLoader) or {}
        return cls.from_dict(values)

    def update_from_dict(self, values: dict) -> None:
        """Simple Transformers' name for merging a dict into the args (unknown keys are an error here)."""
        if not isinstance(values, dict):
            raise ConfigError(
                f"args must be a dict or LanguageModelingArgs, got {type(values).__name__}",
                "Pass LanguageModelingArgs() or a dict of its fields",
            )
        unknown = [k for k in values if k not in _FIELD_NAMES]
        if unknown:
            raise unknown_fields_error(unknown)
        for key, value in values.items():
            setattr(self, key, _coerce(key, value))

    def to_dict(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def copy(self) -> "LanguageModelingArgs":
        return LanguageModelingArgs.from_dict(json.loads(json.dumps(self.to_dict())))

    def save(self, output_dir: str) -> None:
        values = {k: v for k, v in self.to_dict().items() if k not in self.not_saved_args}
        with open(os.path.join(output_dir, "model_args.json"), "w", encoding="utf-8") as f:
            json.dump(values, f, indent=2)

    def load(self, input_dir: str) -> None:
        """The settings saved in a model folder's model_args.json, except NEVER_FROM_MODEL_FOLDER's."""
        path = os.path.join(input_dir, "model_args.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            self.update_from_dict(
                {k: v for k, v in saved.items() if k in _FIELD_NAMES and k not in NEVER_FROM_MODEL_FOLDER}
            )

    # --- derived values (never written back) ---------------------------------------------------
    @property
    def normalized_dataset_type(self) -> str:
        return "simple" if self.dataset_type in (None, "None") else self.dataset_type

    @property
    def is_elastic(self) -> bool:
        return isinstance(self.num_workers, (list, tuple))

    @property
    def min_workers(self) -> int:
        return int(self.num_workers[0]) if self.is_elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return int(self.num_workers[1]) if self.is_elastic else self.num_workers

    @property
    def global_batch_size(self) -> int:
        """Examples per optimizer step, over all workers: fixed by the job, whatever the worker count of an elastic run."""
        return self.train_batch_size * self.gradient_accumulation_steps * self.max_workers

    @property
    def seed(self) -> int:
        return 42 if self.manual_seed is None else int(self.manual_seed)

    def warmup_steps_for(self, total_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps > 0 else math.ceil(total_steps * self.warmup_ratio)

    # --- validation ------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every value once, before anything starts; raise one ConfigError naming every bad field and its fix."""
        raise_problems(self.problems())

    def problems(self) -> list[ConfigError]:
        """Every problem of the values: the wrong types in one ConfigError, then each value out of range."""
        wrong = type_errors(self.to_dict(), FIELD_TYPES)
        found = (
            [
                ConfigError(
                    f"Wrong value type{'s' if len(wrong) > 1 else ''}: " + "; ".join(wrong),
                    "Set each to a value of its type (in YAML, write numbers without quotes: 5e-5, not '5e-5')",
                )
            ]
            if wrong
            else []
        )
        return found + self.value_problems()

    def value_problems(self) -> list[ConfigError]:
        """Each value out of its range; a field of the wrong type is left to `type_errors` (checked at its default here)."""
        defaults = LanguageModelingArgs()
        well_typed = dataclasses.replace(
            self,
            **{
                name: getattr(defaults, name)
                for name in self.to_dict()
                if not _accepts(FIELD_TYPES[name], getattr(self, name))
            },
        )
        return list(well_typed._range_problems())

    def _range_problems(self) -> Iterator[ConfigError]:
        # One `if ...: yield ConfigError(...)` per rule; every rule runs, so a job learns all its problems at once.
        positive_ints = (
            "train_batch_size",
            "eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "max_seq_length",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                yield ConfigError(f"{name} must be a positive integer, got {value!r}", f"Set {name} to 1 or more")
        if self.is_elastic:
            bounds = list(self.num_workers)
            if (
                len(bounds) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
                or not 1 <= bounds[0] <= bounds[1]
            ):
                yield ConfigError(
                    f"num_workers must be a positive integer or [min, max] with 1 <= min <= max, got {self.num_workers!r}",
                    "Set num_workers to e.g. 4, or [2, 8] for an elastic run",
                )
            elif self.max_failures == 0:
                yield ConfigError(
                    f"num_workers {bounds} is elastic, but max_failures is 0, so the first lost node ends the run instead of shrinking it",
                    "Set max_failures to the node losses to ride out, e.g. 10",
                )
        elif not isinstance(self.num_workers, int) or isinstance(self.num_workers, bool) or self.num_workers < 1:
            yield ConfigError(
                f"num_workers must be a positive integer, got {self.num_workers!r}",
                "Set num_workers to 1 or more, or [min, max] for an elastic run",
            )
        if not self.elastic_resize_check_s > 0:
            yield ConfigError(
                f"elastic_resize_check_s must be positive, got {self.elastic_resize_check_s!r}",
                "Set elastic_resize_check_s to a number of seconds such as 60",
            )
        if self.num_train_epochs < 1 and self.max_steps <= 0:
            yield ConfigError(
                f"num_train_epochs is {self.num_train_epochs} and max_steps is {self.max_steps}, so nothing would be trained",
                "Set num_train_epochs >= 1 or max_steps > 0",
            )
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            yield ConfigError(
                f"learning_rate must be a positive number, got {self.learning_rate!r}",
                "Set learning_rate to a value such as 5e-5",
            )
        if not 0.0 < self.mlm_probability < 1.0:
            yield ConfigError(
                f"mlm_probability must be between 0 and 1, got {self.mlm_probability!r}",
                "Set mlm_probability to a value such as 0.15",
            )
        if not 0.0 < self.stride <= 1.0:
            yield ConfigError(
                f"stride must be in (0, 1], got {self.stride!r}", "Set stride to a fraction of the window, such as 0.8"
            )
        if not 0.0 <= self.warmup_ratio < 1.0:
            yield ConfigError(
                f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}", "Set warmup_ratio to a value such as 0.06"
            )
        if self.weight_decay < 0 or self.warmup_steps < 0:
            yield ConfigError("weight_decay and warmup_steps must not be negative", "Set them to 0 or more")
        if self.normalized_dataset_type not in DATASET_TYPES:
            yield ConfigError(
                f"dataset_type {self.dataset_type!r} is not one of {', '.join(DATASET_TYPES)}",
                "Use 'text' to pack lines into full blocks or 'simple' for one example per line",
            )
        if self.packing_document_mask and self.normalized_dataset_type != "text":
            yield ConfigError(
                f"packing_document_mask keeps the documents of a packed 'text' block apart, but dataset_type is {self.dataset_type!r}, whose packed lines are always kept apart",
                "Set dataset_type='text', or packing_document_mask=False",
            )
        if self.scheduler not in SCHEDULERS:
            yield ConfigError(f"scheduler {self.scheduler!r} is unknown", f"Use one of {', '.join(SCHEDULERS)}")
        if self.optimizer not in OPTIMIZERS:
            yield ConfigError(f"optimizer {self.optimizer!r} is unknown", f"Use one of {', '.join(OPTIMIZERS)}")
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size < 16):
            yield ConfigError(
                f"vocab_size must be an integer of at least 16, got {self.vocab_size!r}",
                "Set vocab_size to the tokenizer size you want, e.g. 30000",
            )
        if self.tokenizer_sample_mb is not None and not (
            self.tokenizer_sample_mb > 0 and math.isfinite(self.tokenizer_sample_mb)
        ):
            yield ConfigError(
                f"tokenizer_sample_mb must be a positive number of MB, got {self.tokenizer_sample_mb!r}",
                "Set tokenizer_sample_mb to the text to learn the tokenizer from, e.g. 1000 (about 1 GB), or None for the whole corpus",
            )
        if self.shard_size_mb <= 0:
            yield ConfigError(
                f"shard_size_mb must be positive, got {self.shard_size_mb!r}", "Set shard_size_mb to a value such as 4"
            )
        if self.max_failures < 0:
            yield ConfigError(
                f"max_failures must be 0 or more, got {self.max_failures!r}",
                "Set max_failures to the number of restarts to allow",
            )
        if self.checkpoint_upload_mode not in CHECKPOINT_UPLOAD_MODES:
            yield ConfigError(
                f"checkpoint_upload_mode {self.checkpoint_upload_mode!r} is not one of {', '.join(CHECKPOINT_UPLOAD_MODES)}",
                "Use 'sync' (the default) or 'async' to upload checkpoints while training goes on",
            )
        if self.parallel_strategy not in PARALLEL_STRATEGIES:
            yield ConfigError(
                f"parallel_strategy {self.parallel_strategy!r} is not one of {', '.join(PARALLEL_STRATEGIES)}",
                "Use 'ddp' (the default: every worker holds the whole model) or 'fsdp' to shard the model over the workers",
            )
        elif self.parallel_strategy == "fsdp" and self.torch_compile:
            # Seen on CPU (gloo, 2 ranks, torch 2.13): compiling the fully_shard-ed GPT-2 did not finish its first step in 400 s.
            yield ConfigError(
                "torch_compile is not supported with parallel_strategy 'fsdp' yet (compiling the sharded model's all-gathers did not finish a first step)",
                "Set torch_compile=False, or parallel_strategy='ddp'",
            )
        if self.fsdp_cpu_offload and self.parallel_strategy != "fsdp":
            yield ConfigError(
                f"fsdp_cpu_offload keeps FSDP's shards in CPU memory, but parallel_strategy is {self.parallel_strategy!r}",
                "Set parallel_strategy='fsdp', or fsdp_cpu_offload=False",
            )
        if self.checkpoints_to_keep is not None and self.checkpoints_to_keep < 1:
            yield ConfigError(
                f"checkpoints_to_keep must be 1 or more, got {self.checkpoints_to_keep!r}",
                "Set checkpoints_to_keep to None to keep every checkpoint, or to the number to keep",
            )
        if self.keep_best_checkpoints and not self.evaluate_during_training:
            yield ConfigError(
                "keep_best_checkpoints ranks checkpoints by their evaluation, but evaluate_during_training is False",
                "Set evaluate_during_training=True (with an eval_file), or keep_best_checkpoints=False",
            )
        if self.prefetch_batches < 0:
            yield ConfigError(
                f"prefetch_batches must be 0 or more, got {self.prefetch_batches!r}",
                "Set prefetch_batches to a small number such as 2",
            )
        # The masking hash takes the seed as an unsigned 64-bit integer and numpy's RandomState (a random
        # sweep's sampler) as an unsigned 32-bit one: a seed outside [0, 2**32) fails later, in a worker.
        if self.manual_seed is not None and not 0 <= self.manual_seed < 2**32:
            yield ConfigError(
                f"manual_seed must be between 0 and 2**32 - 1 (4294967295), got {self.manual_seed!r}",
                "Set manual_seed to a value such as 42, or leave it None",
            )


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(LanguageModelingArgs))
# Fields that decide what code runs, where a run writes, or which account it reports to. Only the user
# sets them: a downloaded model folder's model_args.json could otherwise switch on the code shipped in
# that folder (its config.json's auto_map) or point outputs, checkpoints and trackers wherever it likes.
NEVER_FROM_MODEL_FOLDER = frozenset(
    {
        "trust_remote_code",
        "output_dir",
        "overwrite_output_dir",
        "best_model_dir",
        "cache_dir",
        "tensorboard_dir",
        "storage_path",
        "experiment_name",
        "resume",
        "wandb_project",
        "wandb_kwargs",
    }
)
FIELD_TYPES: dict[str, Any] = typing.get_type_hints(LanguageModelingArgs)


def field_help() -> dict[str, str]:
    """Field name -> help text, in declaration order (for --help and the README)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(LanguageModelingArgs)}


def unknown_fields_error(unknown: list[str]) -> ConfigError:
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, _FIELD_NAMES, n=1, cutoff=0.6)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ConfigError(
        f"Unknown argument{'s' if len(unknown) > 1 else ''}: {', '.join(hints)}",
        "Use the field names of LanguageModelingArgs (python -m raylm.train --help lists them)",
    )


def raise_problems(problems: list[ConfigError]) -> None:
    """Raise the one problem as it is, or several as one ConfigError that lists each with its fix."""
    if len(problems) == 1:
        raise problems[0]
    if problems:
        listed = " ".join(
            f"({number}) {problem.problem.rstrip('.')}: {problem.fix.rstrip('.')}."
            for number, problem in enumerate(problems, start=1)
        )
        raise ConfigError(
            f"{len(problems)} problems, all reported at once: {listed.rstrip('.')}",
            "Correct each of them (python -m raylm.train --help describes every key)",
        )


def type_errors(values: dict, types: dict[str, Any]) -> list[str]:
    """'name must be <type>, got <value>' for each value whose type does not fit (a string where a number belongs)."""
    return [
        f"{name} must be {_describe(types[name])}, got {value!r}"
        for name, value in values.items()
        if not _accepts(types[name], value)
    ]


def _accepts(expected: Any, value: Any) -> bool:
    if typing.get_origin(expected) is Union:
        return any(_accepts(option, value) for option in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is Any:
        return True
    if isinstance(value, bool):
        return expected is bool
    # numbers.* so that numpy scalars from Tune's samplers fit too.
    if expected is float:
        return isinstance(value, numbers.Real)
    if expected is int:
        return isinstance(value, numbers.Integral)
    if expected in (list, tuple):
        return isinstance(value, (list, tuple))
    return isinstance(value, expected)


def _describe(expected: Any) -> str:
    if typing.get_origin(expected) is Union:
        return " or ".join(_describe(option) for option in typing.get_args(expected))
    names = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
        tuple: "a list",
        type(None): "null",
    }
    return names.get(expected, getattr(expected, "__name__", str(expected)))


def _coerce(name: str, value: Any) -> Any:
    # YAML and JSON give lists where the dataclass has tuples.
    if name == "adam_betas" and isinstance(value, list):
        return tuple(value)
    # Tune's samplers can hand out numpy scalars, which JSON (to_dict) cannot write.
    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        return value
    declared = typing.get_args(FIELD_TYPES[name]) or (FIELD_TYPES[name],)
    if float in declared and isinstance(value, numbers.Real):
        return float(value)
    if int in declared and isinstance(value, numbers.Integral):
        return int(value)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value
