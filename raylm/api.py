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
import time
import uuid
from typing import Optional, Union

import torch

from raylm.cluster import launcher
from raylm.config import LanguageModelingArgs
from raylm.console import ProgressLine, configure_logging, format_bytes, format_seconds, log_table, logger, notice_once
from raylm.data import storage
from raylm.data.collators import ELECTRA_MASKING, CollatorSpec
from raylm.data.datasets import ExampleSpec
from raylm.data.epoch_data import epoch_order, steps_per_epoch
from raylm.data.example_store import StoredExamples, stored_examples
from raylm.data.packing import check_document_mask_support, padding_free, takes_document_mask
from raylm.data.sources import check_text_files, resolve_text_files, text_sources
from raylm.data.tokenization import document_layout, load_tokenizer, train_tokenizer
from raylm.errors import ConfigError, DivergenceError, ModelError, OutputDirError
from raylm.models import electra
from raylm.models.modeling import (
    CLM,
    ELECTRA,
    build_model,
    check_folder_model_type,
    check_local_model_folder,
    check_vocab_fits,
    load_config,
    load_trained,
    max_positions,
    remote_code_sources,
    resolve_block_size,
    resolve_objective,
    save_trained,
)
from raylm.models.sanity import fill_mask as fill_mask_with
from raylm.models.sanity import generate as generate_with
from raylm.training.checkpoints import (
    CHECKPOINT_PREFIX,
    RUN_STATE_FILES,
    TrainerState,
    is_training_checkpoint,
    mirror_checkpoint,
    prune_mirrored,
    read_trainer_state,
)
from raylm.training.evaluation import evaluate
from raylm.training.tracking import PROGRESS_SCORES_FILE, TRAINING_LOG_FILE, RunLog, check_trackers
from raylm.training.worker import WorkerJob, train_fn_per_worker

PathSpec = Union[str, os.PathLike, list, dict]


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
        # Models in object storage are read from local copies; model_name stays the URI, which is what
        # resuming hands to the workers (they may run on other nodes).
        self._downloads: list[tempfile.TemporaryDirectory] = []
        self._model_folder = self._local_copy(model_name, "model_name")
        self.args = self._load_args(self._model_folder, args)
        self.args.validate()
        self.model_type = model_type
        self.model_name = model_name
        self.use_cuda = use_cuda
        self.cuda_device = cuda_device
        if model_name and model_type != "electra":
            # Before the objective check: a folder of another model type explains any mismatch best.
            check_folder_model_type(model_type, self._model_folder)
        self.objective = resolve_objective(model_type, self.args.mlm)
        self.results: dict = {}
        torch.manual_seed(self.args.seed)
        if self.objective == ELECTRA:
            self._build_electra(
                self._model_folder,
                self._local_copy(generator_name, "generator_name"),
                self._local_copy(discriminator_name, "discriminator_name"),
                train_files,
                kwargs,
            )
        else:
            if generator_name or discriminator_name:
                raise ModelError(
                    f"generator_name and discriminator_name are for model_type='electra', not {model_type!r}",
                    "Leave them unset, or use model_type='electra'",
                )
            self._build_single_model(self._model_folder, train_files, kwargs)

    # --- construction helpers ---------------------------------------------------------------------
    def _local_copy(self, name: Optional[str], field_name: str) -> Optional[str]:
        """A model folder on this machine for `name`: downloaded when it is in object storage, else `name` itself."""
        if not name or not storage.is_uri(name):
            return name
        if not storage.is_remote(name):
            return storage.local_path(name)
        folder = tempfile.TemporaryDirectory(prefix="raylm-model-")
        self._downloads.append(folder)
        storage.download_model(name, folder.name, field_name)
        return folder.name

    def _build_single_model(self, model_name: Optional[str], train_files: Optional[PathSpec], kwargs: dict) -> None:
        if model_name:
            check_local_model_folder(model_name, "model_name")
        self.tokenizer = self._build_tokenizer(self.model_type, model_name, train_files, kwargs)
        self.config = load_config(self.model_type, model_name, self.args, **kwargs)
        if model_name is None and self.args.config_name is None:
            self._fit_config_to_tokenizer(self.config)
        check_vocab_fits(len(self.tokenizer), self.config, model_name or self.args.config_name or self.model_type)
        self.block_size = resolve_block_size(self.args, self.config)
        self.model = build_model(self.objective, self.config, model_name, self.args, **kwargs)

    def _build_electra(
        self,
        model_name: Optional[str],
        generator_name: Optional[str],
        discriminator_name: Optional[str],
        train_files: Optional[PathSpec],
        kwargs: dict,
    ) -> None:
        """The generator + discriminator pair: from scratch, from a saved raylm ELECTRA folder, or from two models."""
        sources = electra.resolve_sources(model_name, generator_name, discriminator_name)
        self.tokenizer = self._build_tokenizer(self.model_type, sources.tokenizer, train_files, kwargs)
        # self.config is the discriminator's: the model ELECTRA pretraining is for, and the one that
        # sets block_size (check_pair_configs makes sure the generator has as many positions).
        generator_config, self.config = electra.load_configs(sources, self.args, **kwargs)
        if sources.from_scratch:
            self._fit_config_to_tokenizer(generator_config)
            self._fit_config_to_tokenizer(self.config)
        check_vocab_fits(len(self.tokenizer), generator_config, sources.generator or "generator_config")
        check_vocab_fits(len(self.tokenizer), self.config, sources.discriminator or "discriminator_config")
        tie_embeddings = electra.resolve_tie(
            sources, generator_config, self.config, self.args.tie_generator_and_discriminator_embeddings
        )
        electra.check_pair_configs(generator_config, self.config, tie_embeddings)
        electra.check_same_vocabulary(sources, self.tokenizer)
        self.block_size = resolve_block_size(self.args, self.config)
        self.model = electra.build_pair(sources, generator_config, self.config, tie_embeddings, **kwargs)

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
            raise ConfigError(
                f"args must be a dict or LanguageModelingArgs, got {type(args).__name__}",
                "Pass LanguageModelingArgs() or a dict of its fields",
            )
        return loaded

    def _build_tokenizer(
        self, model_type: str, model_name: Optional[str], train_files: Optional[PathSpec], kwargs: dict
    ):
        source = self.args.tokenizer_name or model_name
        if source:
            return load_tokenizer(source, trust_remote_code=self.args.trust_remote_code, **kwargs)
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
        check_text_files(files, role="train_files", text_column=self.args.text_column)
        sample = (
            f" (a sample of about {self.args.tokenizer_sample_mb:g} MB)"
            if self.args.tokenizer_sample_mb is not None
            else ""
        )
        logger.info(f"Training a {self.args.vocab_size}-token tokenizer on {len(files)} file(s){sample}.")
        return train_tokenizer(model_type, files, self.args, is_causal=self.objective == CLM)

    def _fit_config_to_tokenizer(self, config) -> None:
        # The tokenizer decides the vocabulary (GPT-2-style tokenizers can add tokens beyond vocab_size).
        config.vocab_size = len(self.tokenizer)
        for role in ("pad", "bos", "eos"):
            token_id = getattr(self.tokenizer, f"{role}_token_id", None)
            if token_id is not None:
                setattr(config, f"{role}_token_id", token_id)
        positions = max_positions(config)
        if positions:
            self.tokenizer.model_max_length = positions

    # --- training ------------------------------------------------------------------------------------
    def train_model(
        self,
        train_file: PathSpec,
        output_dir: Optional[str] = None,
        show_running_loss: bool = True,
        args: Optional[dict] = None,
        eval_file: Optional[PathSpec] = None,
        verbose: bool = True,
        callbacks: Optional[list] = None,
        _diagnostics: Optional[dict] = None,
        **kwargs,
    ):
        """Train on `train_file` (a file, list, folder, glob or URI).

        Returns (global_step, mean training loss), or (global_step, training_progress_scores) when
        evaluating during training, as Simple Transformers does. When the model was loaded from a
        raylm checkpoint folder, training continues from that checkpoint's step and data position.
        `callbacks`: Ray Train callbacks for the run (raylm.sweep passes Tune's report callback).
        """
        started = time.perf_counter()
        if args:
            self.args.update_from_dict(args)
        self.args.validate()
        job_args = self.args.copy()
        output_dir = output_dir or job_args.output_dir
        # Resolved here, so the model_args.json of every checkpoint and of the model names the folder used.
        job_args.best_model_dir = best_model_dir(job_args, output_dir)
        resolve_objective(self.model_type, job_args.mlm)
        self._check_document_mask(job_args)
        evaluating = job_args.evaluate_during_training
        if evaluating and eval_file is None:
            raise ConfigError(
                "evaluate_during_training is True but train_model got no eval_file",
                "Pass eval_file=... to train_model, or set evaluate_during_training=False",
            )
        if not job_args.no_save:
            _check_output_dir(output_dir, job_args.overwrite_output_dir)
        block_size = resolve_block_size(job_args, self.config)
        train_sources, mixture_weights = text_sources(train_file, role="train_file")
        source_files = [resolve_text_files(source, role="train_file") for source in train_sources]
        for files in source_files:
            check_text_files(files, role="train_file", text_column=job_args.text_column)
        eval_files = None
        if evaluating:
            eval_files = resolve_text_files(eval_file, role="eval_file")
            check_text_files(eval_files, role="eval_file", text_column=job_args.text_column)

        check_trackers(job_args)
        name = job_args.experiment_name or f"raylm-{self.model_type}-{datetime.datetime.now():%Y%m%d-%H%M%S-%f}"
        resumed_at_step = self._check_resume(job_args, name)

        launcher.ensure_ray(job_args)
        use_gpu = launcher.resolve_use_gpu(job_args, self.use_cuda)
        resources_per_worker = launcher.worker_resources(job_args, use_gpu)
        launcher.check_cluster_fits(job_args, resources_per_worker)
        launcher.check_storage_reaches_every_node(job_args)
        train_examples = [self._stored_examples(files, job_args, block_size) for files in source_files]
        eval_examples = self._stored_examples(eval_files, job_args, block_size) if eval_files else None
        # The epoch's length (for the schedule) from the stores' row counts: nothing of the corpus is held to count it.
        first_epoch = epoch_order([store.block_rows() for store in train_examples], mixture_weights, job_args.seed, 0)
        if job_args.max_steps > 0:
            total_steps = job_args.max_steps
        else:
            total_steps = (
                steps_per_epoch(first_epoch.num_examples, job_args.global_batch_size) * job_args.num_train_epochs
            )

        import ray

        resume_from = None
        if is_training_checkpoint(self._model_folder):
            # A URI every node reads as it is; a folder on the driver's disk is staged where they can.
            resume_from = (
                self.model_name
                if storage.is_remote(self.model_name)
                else launcher.stage_for_workers(self._model_folder, job_args, name)
            )
        output = storage.OutputFolder(output_dir)
        if resumed_at_step is not None:
            output.fetch(TRAINING_LOG_FILE, PROGRESS_SCORES_FILE)
        events = _TrainingEvents(
            ProgressLine(
                total_steps,
                silent=job_args.silent or not verbose or not show_running_loss,
                show_workers=job_args.is_elastic,
            ),
            output,
            job_args,
            RunLog(output.local, job_args, name, resume=resumed_at_step is not None),
            resumed_from=(resumed_at_step, self.model_name) if resume_from else None,
        )
        queue = launcher.event_queue(job_args, use_gpu, events.handle, callbacks)
        succeeded = False
        try:
            result = launcher.fit(
                train_fn_per_worker,
                dataclasses.asdict(
                    WorkerJob(
                        args=job_args.to_dict(),
                        objective=self.objective,
                        collator=dataclasses.asdict(self._collator_spec(job_args)),
                        total_steps=total_steps,
                        model_ref=ray.put(self.model.cpu()),
                        tokenizer_ref=ray.put(self.tokenizer),
                        train_examples=[dataclasses.asdict(store) for store in train_examples],
                        mixture_weights=mixture_weights,
                        progress_queue=queue,
                        eval_examples=dataclasses.asdict(eval_examples) if eval_examples else None,
                        resume_from=resume_from,
                        run_id=uuid.uuid4().hex,
                        remote_code=self._remote_code(job_args),
                        diagnostics=_diagnostics,
                        torch_threads=max(1, int(resources_per_worker.get("CPU", 1))),
                    )
                ),
                job_args,
                use_gpu,
                resources_per_worker,
                name,
                on_event=events.handle,
                event_queue=queue,
                callbacks=callbacks,
            )
            succeeded = events.diverged is None
        finally:
            events.close(succeeded)
            launcher.close_event_queue(queue)
        if events.diverged is not None:
            step = events.diverged["global_step"]
            good = events.last_good_checkpoint()
            # A fresh run's first steps have no earlier step to name: only its starting weights precede them.
            came_from = f"the weights of step {step - 1}" if step > 1 else "the starting weights"
            none_kept = (
                f"no checkpoint from step {step - 2} or earlier is kept" if step > 2 else "no checkpoint is that early"
            )
            where = f"the last good checkpoint is {good}" if good else f"{none_kept}, so none is known to be good"
            raise DivergenceError(
                f"Training diverged: the loss or a gradient became NaN or infinite at step {step}, computed from {came_from}; {where}",
                "Lower learning_rate, raise warmup, keep max_grad_norm > 0, or use bf16 instead of fp16; resume from the last good checkpoint with LanguageModelingModel(model_type, <checkpoint folder>)",
            )
        state = self._load_final_checkpoint(result, output_dir, job_args)
        if verbose:
            rows = _summary_rows(
                state,
                events.last_eval,
                time.perf_counter() - started,
                resumed_at_step,
                output_dir,
                job_args,
                launcher.run_folder(job_args, name),
                result.checkpoint.path,
                events.worker_counts,
                resources_per_worker,
            )
            if mixture_weights:
                # What was drawn from each source, from the mixture's pattern and the run's position.
                drawn = first_epoch.drawn(state.epoch, state.epoch_examples)
                rows.insert(
                    1,
                    (
                        "mixture",
                        ", ".join(
                            f"{source} {count / max(int(drawn.sum()), 1):.1%} ({count:,} examples; weight {weight / sum(mixture_weights):.1%})"
                            for source, count, weight in zip(train_sources, drawn.tolist(), mixture_weights)
                        ),
                    ),
                )
            log_table("Training finished.", rows)
        if evaluating:
            return state.global_step, events.progress_scores
        return state.global_step, state.train_loss

    def _check_resume(self, args: LanguageModelingArgs, name: str) -> Optional[int]:
        """The step this run resumes at (None for a fresh run); ConfigError for a run that cannot start.

        A checkpoint given as model_name resumes that checkpoint, whatever Ray has under the run's
        name. Otherwise an existing run of that name is resumed only when args.resume asks for it:
        Ray Train would resume it silently, even for another model with other settings.
        """
        if is_training_checkpoint(self._model_folder):
            source, state = self.model_name, read_trainer_state(self._model_folder)
            step, epoch = state.global_step, state.epoch
        elif launcher.run_exists(args, name):
            folder = launcher.run_folder(args, name)
            if not args.resume:
                raise ConfigError(
                    f"experiment_name {name!r} names a run that already exists ({folder}), and resume is False",
                    "Set resume=True to continue that run from its latest checkpoint, or choose another experiment_name (unset, each run gets a new one)",
                )
            latest = launcher.latest_checkpoint_metrics(args, name)
            if latest is None:
                return None
            source, step, epoch = f"the latest checkpoint of {folder}", int(latest["global_step"]), int(latest["epoch"])
        else:
            return None
        if (args.max_steps > 0 and step >= args.max_steps) or (args.max_steps <= 0 and epoch >= args.num_train_epochs):
            end = f"max_steps {args.max_steps}" if args.max_steps > 0 else f"num_train_epochs {args.num_train_epochs}"
            raise ConfigError(
                f"{source} is at step {step:,} after {epoch} complete epoch(s), where this job already ends ({end}), so resuming would train nothing",
                "Raise max_steps (or num_train_epochs) above what the run reached to train on, or start a new run",
            )
        logger.info(f"Resuming from {source} (step {step:,}).")
        return step

    def _model_configs(self) -> list:
        models = [self.model.generator, self.model.discriminator] if self.objective == ELECTRA else [self.model]
        return [model.config for model in models]

    def _check_document_mask(self, args: LanguageModelingArgs) -> None:
        check_document_mask_support(args.packing_document_mask, self.model_type, self._model_configs())

    def _remote_code(self, args: LanguageModelingArgs) -> Optional[dict]:
        """The custom model code Ray's processes need to unpickle this model, when the user trusts it."""
        return remote_code_sources(self.model, self.config, self.tokenizer) if args.trust_remote_code else None

    def _stored_examples(self, files: list[str], args: LanguageModelingArgs, block_size: int) -> StoredExamples:
        """The tokenized examples of `files` from the example store, tokenized first unless a matching store may be reused."""
        prefix, suffix = document_layout(
            self.tokenizer, self.objective == CLM, args.normalized_dataset_type == "text", args.document_separator
        )
        spec = ExampleSpec(
            args.normalized_dataset_type,
            block_size,
            tuple(prefix),
            tuple(suffix),
            args.sliding_window,
            args.stride,
            # simple / line_by_line: several whole lines per row, each kept apart, where the model takes the mask.
            args.packing_document_mask
            if args.normalized_dataset_type == "text"
            else takes_document_mask(self._model_configs()),
        )
        if block_size <= len(prefix) + len(suffix):
            raise ConfigError(
                f"block_size {block_size} leaves no room for text next to the {len(prefix) + len(suffix)} special tokens",
                "Set block_size (or max_seq_length) to at least 16",
            )
        rebuild = args.reprocess_input_data or args.no_cache
        return stored_examples(
            files,
            self.tokenizer,
            spec,
            args.shard_size_mb,
            launcher.example_cache_root(args),
            rebuild,
            args.text_column,
        )

    def _collator_spec(self, args: LanguageModelingArgs) -> CollatorSpec:
        tokenizer = self.tokenizer
        if self.objective != CLM and tokenizer.mask_token_id is None:
            raise ModelError(
                "The tokenizer has no mask token, which masked language modeling needs",
                "Use a tokenizer with a mask token, or set mlm=False for a causal model",
            )
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        return CollatorSpec(
            objective=self.objective,
            pad_id=pad_id,
            mask_id=tokenizer.mask_token_id,
            vocab_size=len(tokenizer),
            special_ids=tuple(tokenizer.all_special_ids),
            mlm_probability=args.mlm_probability,
            seed=args.seed,
            **(ELECTRA_MASKING if self.objective == ELECTRA else {}),
            padding_free=padding_free(self._model_configs()),
        )

    def _load_final_checkpoint(self, result, output_dir: str, args: LanguageModelingArgs) -> TrainerState:
        if result.checkpoint is None:
            raise RuntimeError(
                f"The training run finished without a final checkpoint; see the run folder {result.path}"
            )
        with result.checkpoint.as_directory() as checkpoint_dir:
            state = read_trainer_state(checkpoint_dir)
            self.model = load_trained(self.objective, checkpoint_dir, args.trust_remote_code)
            if not args.no_save:
                _publish(checkpoint_dir, output_dir, args)
        self.checkpoint_path = result.checkpoint.path
        self._last_state = state
        return state

    # --- evaluation -------------------------------------------------------------------------------------
    def eval_model(
        self,
        eval_file: PathSpec,
        output_dir: Optional[str] = None,
        evaluate_generated_text: bool = False,
        verbose: bool = True,
        silent: bool = False,
        **kwargs,
    ) -> dict:
        """{"eval_loss", "perplexity"} on `eval_file`: token-weighted, independent of batch size and workers."""
        self.args.validate()
        args = self.args.copy()
        output_dir = output_dir or args.output_dir
        self._check_document_mask(args)
        files = resolve_text_files(eval_file, role="eval_file")
        check_text_files(files, role="eval_file", text_column=args.text_column)
        launcher.ensure_ray(args)
        launcher.check_storage_reaches_every_node(args, training=False)
        use_gpu = launcher.resolve_use_gpu(args, self.use_cuda)
        dataset = self._stored_examples(files, args, resolve_block_size(args, self.config)).dataset()
        results = evaluate(
            self.model,
            dataset,
            self.objective,
            dataclasses.asdict(self._collator_spec(args)),
            args.eval_batch_size,
            args.min_workers,
            use_gpu,
            launcher.cpus_per_worker(args),
            args.discriminator_loss_weight,
            remote_code=self._remote_code(args),
            in_process=launcher.on_local_ray(),
        )
        self.results.update(results)
        storage.write_text(storage.join(output_dir, "eval_results.txt"), _results_text(results))
        if verbose and not silent:
            logger.info(
                f"eval_loss {results['eval_loss']:.4f}, perplexity {results['perplexity']:.2f} over {results['eval_tokens']:,} tokens."
            )
        return results

    def save_model(self, output_dir: Optional[str] = None, model=None) -> None:
        """Write the model, tokenizer and model_args.json to output_dir in Hugging Face format."""
        with storage.publishing(output_dir or self.args.output_dir, merge=True) as staging:
            save_trained(model or self.model, self.tokenizer, staging)
            self.args.save(staging)

    def save_generator(self, output_dir: Optional[str] = None) -> None:
        """ELECTRA: the generator alone (ElectraForMaskedLM + tokenizer), by default to output_dir/generator_model."""
        self._require_electra("save_generator")
        self._save_electra_half(
            self.model.generator, output_dir or storage.join(self.args.output_dir, electra.GENERATOR_SUBDIR)
        )

    def save_discriminator(self, output_dir: Optional[str] = None) -> None:
        """ELECTRA: the discriminator alone (ElectraForPreTraining + tokenizer), by default to output_dir/discriminator_model."""
        self._require_electra("save_discriminator")
        self._save_electra_half(
            self.model.discriminator, output_dir or storage.join(self.args.output_dir, electra.DISCRIMINATOR_SUBDIR)
        )

    def _require_electra(self, method: str) -> None:
        if self.objective != ELECTRA:
            raise ModelError(
                f"{method} is for ELECTRA models, but this is a {self.model_type!r} model", "Use save_model"
            )

    def _save_electra_half(self, half, output_dir: str) -> None:
        with storage.publishing(output_dir, merge=True) as staging:
            half.save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)

    # --- quick sanity checks ------------------------------------------------------------------------
    def generate(self, prompt: str, max_new_tokens: int = 20, do_sample: bool = False, **generate_kwargs) -> str:
        """The prompt continued by this causal model (greedy unless do_sample), to see what it learned."""
        return generate_with(
            self.model, self.tokenizer, prompt, max_new_tokens=max_new_tokens, do_sample=do_sample, **generate_kwargs
        )

    def fill_mask(self, text: str, top_k: int = 5) -> list[dict]:
        """The top_k candidates for the one <mask>/[MASK] in `text`: [{"token", "token_id", "score", "sequence"}]."""
        # ELECTRA's discriminator only tells replaced tokens apart; its generator is the masked LM.
        masked_lm = self.model.generator if self.objective == ELECTRA else self.model
        return fill_mask_with(masked_lm, self.tokenizer, text, top_k=top_k)


def _check_output_dir(output_dir: str, overwrite: bool) -> None:
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
    fix = "Check the bucket name, the endpoint (AWS_ENDPOINT_URL, or ?endpoint_override=host:port&scheme=http in the URI) and the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
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


def _results_text(results: dict) -> str:
    return "".join(f"{key} = {results[key]}\n" for key in sorted(results))


def _publish(checkpoint_dir: str, output_dir: str, args: LanguageModelingArgs) -> None:
    """The trained model into output_dir, without the run state; published (storage.publishing) so no reader sees half of it."""
    with storage.publishing(output_dir, merge=True) as staging:
        for name in os.listdir(checkpoint_dir):
            source = os.path.join(checkpoint_dir, name)
            if name in RUN_STATE_FILES:
                continue
            if os.path.isdir(source):
                shutil.copytree(source, os.path.join(staging, name))
            else:
                shutil.copy2(source, os.path.join(staging, name))
        args.save(staging)


def _summary_rows(
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
            f"{state.train_input_tokens:,} in ({state.train_input_tokens / max(state.train_seconds, 1e-9):,.0f}/s), {state.train_tokens:,} predicted",
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
                f"eval_loss {last_eval['eval_loss']:.4f}, perplexity {last_eval['perplexity']:.2f} (step {last_eval['global_step']:,})",
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
    """What the checkpoints (optimizer state included) occupy in output_dir and in Ray's run folder; nothing removes them but checkpoints_to_keep."""
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


class _TrainingEvents:
    """The driver's side of a run: rank 0's events become the progress line, mirrored checkpoints and scores."""

    def __init__(
        self,
        progress: ProgressLine,
        output: storage.OutputFolder,
        args: LanguageModelingArgs,
        run_log: RunLog,
        resumed_from: Optional[tuple[int, str]] = None,
    ):
        """resumed_from: (step, folder) of the checkpoint the run continues, a candidate last good one."""
        self.progress = progress
        self.run_log = run_log
        self.output = output
        self.output_dir = output.target
        self.args = args
        self.resumed_from = resumed_from
        # label -> (step, where the user finds it) for every checkpoint Ray registered, and those it still keeps.
        self.checkpoints: dict[str, tuple[int, str]] = {}
        self.kept_labels: list[str] = []
        self.diverged: Optional[dict] = None
        self.progress_scores: dict[str, list] = {}
        self.last_eval: Optional[dict] = None
        self.mirrored_labels: set[str] = set()
        # (first step, workers) each time the worker count changed (an elastic run's resizes).
        self.worker_counts: list[tuple[int, int]] = []

    def handle(self, event: dict) -> None:
        self.run_log.on_event(event)
        kind = event.get("kind")
        if kind == "train":
            self.progress.update(event)
            if not self.worker_counts or self.worker_counts[-1][1] != event["num_workers"]:
                self.worker_counts.append((event["global_step"], event["num_workers"]))
        elif kind == "eval":
            self.last_eval = event
            for key, value in event.items():
                if key not in ("kind", "is_best"):
                    self.progress_scores.setdefault(key, []).append(value)
            if self.args.evaluate_during_training_verbose:
                logger.info(
                    f"step {event['global_step']}: eval_loss {event['eval_loss']:.4f}, perplexity {event['perplexity']:.2f}"
                )
        elif kind == "checkpoint":
            where = event["path"] if self.args.no_save else storage.join(self.output_dir, event["label"])
            self.checkpoints[event["label"]] = (event["global_step"], where)
            self.kept_labels = event["kept_labels"]
            if not self.args.no_save:
                self._mirror(event)
                # The logs so far go with each checkpoint, so a remote output_dir never lags far behind.
                self.output.sync()
        elif kind == "diverged":
            self.diverged = event
        elif kind == "notice":
            notice_once(event["message"])

    def last_good_checkpoint(self) -> Optional[str]:
        """After divergence at step k, the latest checkpoint kept at a step <= k-2 (worker.NonfiniteLosses says why)."""
        last_good_step = self.diverged["global_step"] - 2
        candidates = [
            found
            for label, found in self.checkpoints.items()
            if label in self.kept_labels and found[0] <= last_good_step
        ]
        if self.resumed_from is not None and self.resumed_from[0] <= last_good_step:
            candidates.append(self.resumed_from)
        return max(candidates)[1] if candidates else None

    def _mirror(self, event: dict) -> None:
        from ray.train import Checkpoint

        checkpoint = Checkpoint(path=event["path"], filesystem=event["filesystem"])
        mirror_checkpoint(checkpoint, storage.join(self.output_dir, event["label"]))
        self.mirrored_labels.add(event["label"])
        if self.args.checkpoints_to_keep:
            # Only this run's copies: the checkpoint it resumed from and other runs' stay.
            self.mirrored_labels = prune_mirrored(self.output_dir, self.mirrored_labels, event["kept_labels"])
        if event["is_best"] and self.args.save_best_model:
            self._save_best(checkpoint, event["metrics"])

    def _save_best(self, checkpoint, metrics: dict) -> None:
        with storage.publishing(best_model_dir(self.args, self.output_dir)) as staging:
            checkpoint.to_directory(staging)
            # best_model/ is a model to use, not a point to resume from.
            for name in RUN_STATE_FILES:
                path = os.path.join(staging, name)
                if os.path.exists(path):
                    os.remove(path)
            with open(os.path.join(staging, "eval_results.txt"), "w", encoding="utf-8") as f:
                f.write(_results_text(metrics))

    def close(self, succeeded: bool) -> None:
        self.progress.close()
        self.run_log.close(succeeded)
        self.output.sync()
        self.output.close()


def best_model_dir(args: LanguageModelingArgs, output_dir: str) -> str:
    """best_model_dir; left at its default while output_dir moved, it follows output_dir (Simple Transformers' did not)."""
    default_best = LanguageModelingArgs().best_model_dir
    if args.best_model_dir == default_best and os.path.normpath(output_dir) != os.path.normpath(
        LanguageModelingArgs().output_dir
    ):
        return storage.join(output_dir, "best_model")
    return args.best_model_dir
