"""`LanguageModelingModel`: Simple Transformers' language-modeling API, trained and evaluated through Ray.

Constructing a model checks everything that can be checked on the driver (model type vs objective,
tokenizer, config, sizes) and builds the tokenizer and model in memory; nothing is written until
training ends. `train_model` streams the text through Ray Data into Ray Train workers and loads the
trained weights back from the run's final checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import tempfile
from typing import Optional, Union

import torch

from raylm import launcher
from raylm.collators import CollatorSpec
from raylm.config import LanguageModelingArgs
from raylm.console import ProgressLine, configure_logging, logger
from raylm.datasets import ExampleSpec, build_dataset
from raylm.errors import ConfigError, DataError, ModelError, OutputDirError
from raylm.evaluation import evaluate
from raylm.modeling import (
    CLM,
    ELECTRA,
    build_model,
    check_local_model_folder,
    check_vocab_fits,
    load_config,
    max_positions,
    load_trained,
    resolve_block_size,
    resolve_objective,
)
from raylm.sources import check_text_files, plan_shards, resolve_text_files
from raylm.tokenization import load_tokenizer, special_token_layout, train_tokenizer
from raylm.worker import MODEL_SUBDIR, TRAINER_STATE_FILE, steps_per_epoch, train_fn_per_worker

PathSpec = Union[str, os.PathLike, list]


class LanguageModelingModel:
    """A masked or causal language model, trained with Ray. Same arguments as Simple Transformers'."""

    def __init__(
        self,
        model_type: str,
        model_name: Optional[str],
        generator_name: Optional[str] = None,
        discriminator_name: Optional[str] = None,
        train_files: Optional[PathSpec] = None,
        args: Union[dict, LanguageModelingArgs, None] = None,
        use_cuda: bool = True,
        cuda_device: int = -1,
        **kwargs,
    ):
        configure_logging()
        self.args = self._load_args(model_name, args)
        self.args.validate()
        self.model_type = model_type
        self.model_name = model_name
        self.use_cuda = use_cuda
        self.cuda_device = cuda_device
        self.objective = resolve_objective(model_type, self.args.mlm)
        if self.objective == ELECTRA:
            raise ModelError(
                "ELECTRA (generator + discriminator) training is not available in this raylm version yet",
                "Train the discriminator's backbone as an MLM with model_type='bert' for now",
            )
        self.results: dict = {}
        if model_name:
            check_local_model_folder(model_name, "model_name")
        torch.manual_seed(self.args.seed)

        self.tokenizer = self._build_tokenizer(model_type, model_name, train_files, kwargs)
        self.config = load_config(model_type, model_name, self.args, **kwargs)
        if model_name is None and self.args.config_name is None:
            self._fit_config_to_tokenizer()
        check_vocab_fits(len(self.tokenizer), self.config, model_name or self.args.config_name or model_type)
        self.block_size = resolve_block_size(self.args, self.config)
        self.model = build_model(self.objective, self.config, model_name, self.args, **kwargs)

    # --- construction helpers ---------------------------------------------------------------------
    @staticmethod
    def _load_args(model_name: Optional[str], args) -> LanguageModelingArgs:
        loaded = LanguageModelingArgs()
        if model_name and os.path.isdir(model_name):
            loaded.load(model_name)
        if isinstance(args, LanguageModelingArgs):
            return args.copy()
        if isinstance(args, dict):
            loaded.update_from_dict(args)
        elif args is not None:
            raise ConfigError(f"args must be a dict or LanguageModelingArgs, got {type(args).__name__}", "Pass LanguageModelingArgs() or a dict of its fields")
        return loaded

    def _build_tokenizer(self, model_type: str, model_name: Optional[str], train_files: Optional[PathSpec], kwargs: dict):
        source = self.args.tokenizer_name or model_name
        if source:
            return load_tokenizer(source, **kwargs)
        if train_files is None:
            raise ModelError(
                "model_name and tokenizer_name are not set, so a tokenizer must be trained, but train_files was not given",
                "Pass train_files=<the training text> to LanguageModelingModel (or set tokenizer_name)",
            )
        if self.args.vocab_size is None:
            raise ModelError(
                "Training from scratch needs the tokenizer's vocab_size, which is not set",
                "Set args.vocab_size, e.g. model_args.vocab_size = 30000",
            )
        files = resolve_text_files(train_files, role="train_files")
        check_text_files(files, role="train_files")
        logger.info(f"Training a {self.args.vocab_size}-token tokenizer on {len(files)} file(s).")
        return train_tokenizer(model_type, files, self.args, is_causal=self.objective == CLM)

    def _fit_config_to_tokenizer(self) -> None:
        # The tokenizer decides the vocabulary (GPT-2-style tokenizers can add tokens beyond vocab_size).
        self.config.vocab_size = len(self.tokenizer)
        for role in ("pad", "bos", "eos"):
            token_id = getattr(self.tokenizer, f"{role}_token_id", None)
            if token_id is not None:
                setattr(self.config, f"{role}_token_id", token_id)
        positions = max_positions(self.config)
        if positions:
            self.tokenizer.model_max_length = positions

    # --- training ------------------------------------------------------------------------------------
    def train_model(self, train_file: PathSpec, output_dir: Optional[str] = None, show_running_loss: bool = True, args: Optional[dict] = None, eval_file: Optional[PathSpec] = None, verbose: bool = True, **kwargs):
        """Train on `train_file` (a file, list, folder, glob or URI); returns (global_step, mean training loss)."""
        if args:
            self.args.update_from_dict(args)
        self.args.validate()
        job_args = self.args.copy()
        output_dir = output_dir or job_args.output_dir
        resolve_objective(self.model_type, job_args.mlm)
        if job_args.evaluate_during_training:
            if eval_file is None:
                raise ConfigError("evaluate_during_training is True but train_model got no eval_file", "Pass eval_file=... to train_model, or set evaluate_during_training=False")
            raise ConfigError("evaluate_during_training is not available in this raylm version yet", "Set evaluate_during_training=False and call eval_model after training")
        if not job_args.no_save:
            _check_output_dir(output_dir, job_args.overwrite_output_dir)
        block_size = resolve_block_size(job_args, self.config)
        files = resolve_text_files(train_file, role="train_file")
        check_text_files(files, role="train_file")

        launcher.ensure_ray(job_args)
        launcher.check_cluster_fits(job_args)
        use_gpu = launcher.resolve_use_gpu(job_args, self.use_cuda)
        dataset = self._dataset(files, job_args, block_size)
        if job_args.max_steps > 0:
            total_steps = job_args.max_steps
        else:
            # An epoch-based schedule needs the example count: tokenize once into Ray's object store
            # (spilled to disk when large), which later epochs then reuse. max_steps streams instead.
            dataset = dataset.materialize()
            total_steps = steps_per_epoch(dataset.count(), job_args) * job_args.num_train_epochs

        import ray
        from ray.util.queue import Queue

        progress = ProgressLine(total_steps, silent=job_args.silent or not verbose or not show_running_loss)
        queue = Queue()
        name = job_args.experiment_name or f"raylm-{self.model_type}-{datetime.datetime.now():%Y%m%d-%H%M%S-%f}"
        try:
            result = launcher.fit(
                train_fn_per_worker,
                {
                    "args": job_args.to_dict(),
                    "objective": self.objective,
                    "collator": dataclasses.asdict(self._collator_spec(job_args)),
                    "total_steps": total_steps,
                    "model_ref": ray.put(self.model.cpu()),
                    "tokenizer_ref": ray.put(self.tokenizer),
                    "progress_queue": queue,
                },
                {"train": dataset},
                job_args,
                use_gpu,
                name,
                on_progress=progress.update,
                progress_queue=queue,
            )
        finally:
            progress.close()
            ray.kill(queue.actor)
        state = self._load_final_checkpoint(result, output_dir, job_args)
        logger.info(f"Trained {state['global_step']} steps in {state['train_seconds']:.0f}s; mean training loss {state['train_loss']:.4f}.")
        return state["global_step"], state["train_loss"]

    def _dataset(self, files: list[str], args: LanguageModelingArgs, block_size: int):
        prefix, suffix = special_token_layout(self.tokenizer)
        if self.objective == CLM and not suffix and self.tokenizer.eos_token_id is not None:
            # Causal LMs learn where a document ends from the eos between documents.
            suffix = [self.tokenizer.eos_token_id]
        spec = ExampleSpec(args.normalized_dataset_type, block_size, tuple(prefix), tuple(suffix), args.sliding_window, args.stride)
        if block_size <= len(prefix) + len(suffix):
            raise ConfigError(f"block_size {block_size} leaves no room for text next to the {len(prefix) + len(suffix)} special tokens", "Set block_size (or max_seq_length) to at least 16")
        return build_dataset(plan_shards(files, args.shard_size_mb), self.tokenizer, spec)

    def _collator_spec(self, args: LanguageModelingArgs) -> CollatorSpec:
        tokenizer = self.tokenizer
        if self.objective != CLM and tokenizer.mask_token_id is None:
            raise ModelError("The tokenizer has no mask token, which masked language modeling needs", "Use a tokenizer with a mask token, or set mlm=False for a causal model")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        return CollatorSpec(
            objective=self.objective,
            pad_id=pad_id,
            mask_id=tokenizer.mask_token_id,
            vocab_size=len(tokenizer),
            special_ids=tuple(tokenizer.all_special_ids),
            mlm_probability=args.mlm_probability,
            seed=args.seed,
        )

    def _load_final_checkpoint(self, result, output_dir: str, args: LanguageModelingArgs) -> dict:
        import json

        if result.checkpoint is None:
            raise RuntimeError(f"The training run finished without a final checkpoint; see the run folder {result.path}")
        with result.checkpoint.as_directory() as checkpoint_dir:
            with open(os.path.join(checkpoint_dir, TRAINER_STATE_FILE)) as f:
                state = json.load(f)
            model_dir = os.path.join(checkpoint_dir, MODEL_SUBDIR)
            self.model = load_trained(self.objective, model_dir)
            if not args.no_save:
                _publish(model_dir, output_dir, args)
        self.checkpoint_path = result.checkpoint.path
        self._last_state = state
        return state

    # --- evaluation -------------------------------------------------------------------------------------
    def eval_model(self, eval_file: PathSpec, output_dir: Optional[str] = None, evaluate_generated_text: bool = False, verbose: bool = True, silent: bool = False, **kwargs) -> dict:
        """{"eval_loss", "perplexity"} on `eval_file`: token-weighted, independent of batch size and workers."""
        self.args.validate()
        args = self.args.copy()
        output_dir = output_dir or args.output_dir
        files = resolve_text_files(eval_file, role="eval_file")
        check_text_files(files, role="eval_file")
        launcher.ensure_ray(args)
        use_gpu = launcher.resolve_use_gpu(args, self.use_cuda)
        dataset = self._dataset(files, args, resolve_block_size(args, self.config))
        results = evaluate(
            self.model, dataset, self.objective, dataclasses.asdict(self._collator_spec(args)),
            args.eval_batch_size, args.num_workers, use_gpu, launcher.cpus_per_worker(args), args.discriminator_loss_weight,
        )
        self.results.update(results)
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "eval_results.txt"), "w", encoding="utf-8") as f:
            for key in sorted(results):
                f.write(f"{key} = {results[key]}\n")
        if verbose and not silent:
            logger.info(f"eval_loss {results['eval_loss']:.4f}, perplexity {results['perplexity']:.2f} over {results['eval_tokens']} tokens.")
        return results

    def save_model(self, output_dir: Optional[str] = None, model=None) -> None:
        """Write the model, tokenizer and model_args.json to output_dir in Hugging Face format."""
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        (model or self.model).save_pretrained(output_dir)
        self.tokenizer.save_pretrained(output_dir)
        self.args.save(output_dir)


def _check_output_dir(output_dir: str, overwrite: bool) -> None:
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise OutputDirError(
            f"output_dir {output_dir!r} already exists and is not empty, and overwrite_output_dir is False",
            "Set overwrite_output_dir=True to write into it, or choose another output_dir",
        )
    parent = output_dir if os.path.isdir(output_dir) else os.path.dirname(os.path.abspath(output_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise OutputDirError(f"output_dir {output_dir!r} cannot be written (no write permission on {parent!r})", "Choose an output_dir you can write to")


def _publish(model_dir: str, output_dir: str, args: LanguageModelingArgs) -> None:
    """Copy the trained model into output_dir: files land complete, under their final names, last."""
    os.makedirs(output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".incoming-") as staging:
        for name in os.listdir(model_dir):
            shutil.copy2(os.path.join(model_dir, name), os.path.join(staging, name))
        args.save(staging)
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
