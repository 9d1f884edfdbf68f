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
import tempfile
import time
import uuid
from typing import Optional, Union

import torch

from raylm.cluster import capacity, launcher, run_folders, storage_checks
from raylm.config import LanguageModelingArgs
from raylm.console import ProgressLine, configure_logging, log_table, logger
from raylm.data import storage
from raylm.data.collators import CollatorSpec, collator_spec
from raylm.data.epoch_data import epoch_order, steps_per_epoch
from raylm.data.example_store import StoredExamples, stored_examples
from raylm.data.packing import check_document_mask_support, padding_free, takes_document_mask
from raylm.data.sources import check_text_files, resolve_text_files, text_sources
from raylm.data.tokenization import build_tokenizer, example_spec
from raylm.errors import ConfigError, ModelError
from raylm.models import electra
from raylm.models.modeling import (
    CLM,
    ELECTRA,
    build_model,
    check_folder_model_type,
    check_local_model_folder,
    check_vocab_fits,
    fit_config_to_tokenizer,
    load_config,
    load_trained,
    remote_code_sources,
    resolve_block_size,
    resolve_objective,
    save_trained,
)
from raylm.models.sanity import fill_mask as fill_mask_with
from raylm.models.sanity import generate as generate_with
from raylm.training.checkpoints import TrainerState, is_training_checkpoint, read_trainer_state
from raylm.training.evaluation import evaluate
from raylm.training.model_setup import builds_on_meta, meta_skeleton
from raylm.training.outputs import best_model_dir, check_output_dir, publish_model, results_text
from raylm.training.run_events import TrainingEvents, reclaim_text
from raylm.training.run_summary import mixture_row, summary_rows
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
        self.tokenizer = self._build_tokenizer(model_name, train_files, kwargs)
        self.config = load_config(self.model_type, model_name, self.args, **kwargs)
        # From scratch the tokenizer decides the vocabulary, as in Simple Transformers, unless a given config_name's
        # goes with a given tokenizer_name.
        if model_name is None and (self.args.config_name is None or self.args.tokenizer_name is None):
            fit_config_to_tokenizer(self.config, self.tokenizer)
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
        self.tokenizer = self._build_tokenizer(sources.tokenizer, train_files, kwargs)
        # self.config is the discriminator's: the model ELECTRA pretraining is for, and the one that
        # sets block_size (check_pair_configs makes sure the generator has as many positions).
        generator_config, self.config = electra.load_configs(sources, self.args, **kwargs)
        if sources.from_scratch:
            fit_config_to_tokenizer(generator_config, self.tokenizer)
            fit_config_to_tokenizer(self.config, self.tokenizer)
        check_vocab_fits(len(self.tokenizer), generator_config, sources.generator or "generator_config")
        check_vocab_fits(len(self.tokenizer), self.config, sources.discriminator or "discriminator_config")
        tie_embeddings = electra.resolve_tie(
            sources, generator_config, self.config, self.args.tie_generator_and_discriminator_embeddings
        )
        electra.check_pair_configs(generator_config, self.config, tie_embeddings)
        electra.check_same_vocabulary(sources, self.tokenizer)
        self.block_size = resolve_block_size(self.args, self.config)
        self.model = electra.build_pair(sources, generator_config, self.config, tie_embeddings, **kwargs)

    def _build_tokenizer(self, model_name: Optional[str], train_files: Optional[PathSpec], kwargs: dict):
        source = self.args.tokenizer_name or model_name
        return build_tokenizer(self.model_type, source, train_files, self.args, self.objective == CLM, **kwargs)

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
            check_output_dir(output_dir, job_args.overwrite_output_dir)
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
        resumed_at_step = run_folders.resume_step(job_args, name, self._model_folder, self.model_name)

        launcher.ensure_ray(job_args)
        use_gpu = capacity.resolve_use_gpu(job_args, self.use_cuda)
        resources_per_worker = launcher.worker_resources(job_args, use_gpu)
        capacity.check_cluster_fits(job_args, resources_per_worker)
        text_files = [("train_file", files) for files in source_files] + [("eval_file", eval_files or [])]
        storage_checks.check_storage_reaches_every_node(job_args, text_files=text_files)
        train_examples = [self._stored_examples(files, job_args, block_size) for files in source_files]
        eval_examples = self._stored_examples(eval_files, job_args, block_size) if eval_files else None
        # The epoch's length (for the schedule) from the stores' row counts: nothing of the corpus is held to count it.
        first_epoch = epoch_order(
            [store.block_rows() for store in train_examples],
            mixture_weights,
            job_args.seed,
            0,
            job_args.global_batch_size,
        )
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
        events = TrainingEvents(
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
                        model_skeleton_ref=ray.put(meta_skeleton(self.model)) if builds_on_meta(job_args) else None,
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
            raise events.divergence_error()
        state = self._load_final_checkpoint(result, output_dir, job_args)
        if verbose:
            rows = summary_rows(
                state,
                events.last_eval,
                time.perf_counter() - started,
                resumed_at_step,
                output_dir,
                job_args,
                run_folders.run_folder(job_args, name),
                result.checkpoint.path,
                events.worker_counts,
                resources_per_worker,
            )
            if mixture_weights:
                rows.insert(1, mixture_row(state, first_epoch, train_sources, mixture_weights))
            rows += [("spot reclaim", reclaim_text(event)) for event in events.reclaims]
            log_table("Training finished.", rows)
        if evaluating:
            return state.global_step, events.progress_scores
        return state.global_step, state.train_loss

    def _model_configs(self) -> list:
        models = [self.model.generator, self.model.discriminator] if self.objective == ELECTRA else [self.model]
        return [model.config for model in models]

    def _check_document_mask(self, args: LanguageModelingArgs) -> None:
        check_document_mask_support(args.packing_document_mask, self.model_type, self._model_configs())

    def _remote_code(self, args: LanguageModelingArgs) -> Optional[dict]:
        """The custom model code Ray's processes need to unpickle this model, when the user trusts it."""
        return remote_code_sources(self.model, self.config, self.tokenizer) if args.trust_remote_code else None

    def _stored_examples(self, files: list[str], args: LanguageModelingArgs, block_size: int) -> StoredExamples:
        """The tokenized examples of `files` from the example store, tokenized first unless a matching store may be
        reused."""
        # simple / line_by_line: several whole lines per row, each kept apart, where the model takes the mask.
        document_mask = (
            args.packing_document_mask
            if args.normalized_dataset_type == "text"
            else takes_document_mask(self._model_configs())
        )
        spec = example_spec(self.tokenizer, self.objective == CLM, args, block_size, document_mask)
        rebuild = args.reprocess_input_data or args.no_cache
        cache_root = run_folders.example_cache_root(args)
        return stored_examples(files, self.tokenizer, spec, args.shard_size_mb, cache_root, rebuild, args.text_column)

    def _collator_spec(self, args: LanguageModelingArgs) -> CollatorSpec:
        return collator_spec(
            self.tokenizer,
            self.objective,
            args.mlm_probability,
            args.seed,
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
                publish_model(checkpoint_dir, output_dir, args)
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
        storage_checks.check_storage_reaches_every_node(args, training=False, text_files=[("eval_file", files)])
        use_gpu = capacity.resolve_use_gpu(args, self.use_cuda)
        dataset = self._stored_examples(files, args, resolve_block_size(args, self.config)).dataset()
        # The run's precision on a GPU, as training computes (worker.py); float32 on a CPU.
        amp_dtype = (torch.bfloat16 if args.bf16 else torch.float16) if use_gpu and (args.bf16 or args.fp16) else None
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
            amp_dtype=amp_dtype,
            remote_code=self._remote_code(args),
            in_process=launcher.on_local_ray(),
        )
        self.results.update(results)
        storage.write_text(storage.join(output_dir, "eval_results.txt"), results_text(results))
        if verbose and not silent:
            logger.info(
                f"eval_loss {results['eval_loss']:.4f}, perplexity {results['perplexity']:.2f} over "
                f"{results['eval_tokens']:,} tokens."
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
        """ELECTRA: the discriminator alone (ElectraForPreTraining + tokenizer), by default to
        output_dir/discriminator_model."""
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
