"""Every option of a raylm run: its name, type, default and help, the single source of `--help` and docs/options.md.

Names and defaults are Simple Transformers' (flat, so `model_args.x = ...` code runs unchanged), plus the Ray
fields. `LanguageModelingArgs` (args.py) adds construction, derived values and validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from raylm.config.values import SCHEDULERS


def _field(default: Any, help: str, **kwargs: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class LanguageModelingFields:
    """The fields, with their defaults and help; `LanguageModelingArgs` is what code uses."""

    # --- objective and data ---------------------------------------------------------------
    mlm: bool = _field(
        True,
        "Masked-LM objective (True) or causal LM (False). Must match the model type: "
        "gpt2/openai-gpt need False, bert/roberta/distilbert/camembert/electra need True.",
    )
    mlm_probability: float = _field(
        0.15,
        "Fraction of the real, non-special tokens selected for masking (MLM and ELECTRA). A masked LM replaces "
        "80% of them with the mask token and 10% with a random token, and keeps 10%; ELECTRA masks them all. "
        "Masks come from a hash of the seed, epoch, example and position, so evaluations repeat exactly.",
    )
    block_size: int = _field(
        -1,
        "Tokens per training example. <= 0: min(max_seq_length, the model's "
        "positions). Larger than the model's positions is an error.",
    )
    max_seq_length: int = _field(128, "Default example length when block_size <= 0.")
    dataset_type: str = _field(
        "simple",
        "'simple' or 'line_by_line': each non-empty line is a sample of its own, truncated to block_size (simple "
        "honours sliding_window): it never attends to, nor is predicted from, another line. Several whole lines "
        "share each row of block_size tokens, kept apart as packing_document_mask keeps documents apart, so a step "
        "carries about train_batch_size * block_size tokens however short the lines (models that cannot take the "
        "mask, see packing_document_mask, get one padded row a line). 'text': all lines joined with the "
        "end-of-document token (see document_separator) and cut into full block_size blocks (packing, no padding). "
        "'None' means 'simple', as in Simple Transformers.",
    )
    document_separator: bool = _field(
        True,
        "Each document (a non-blank line or a record) ends with a separator token: a causal LM's eos, after each "
        "line in 'simple' / 'line_by_line' and between documents in 'text', so the model learns where a document "
        "ends (generate stops there); a masked model's separator ([SEP], </s>) between the documents of a 'text' "
        "block. False leaves them out, so the blocks hold the text alone, as Simple Transformers' do (its masked "
        "blocks also end with one [SEP], raylm's do not): for text whose lines are not documents (a book wrapped "
        "at line ends), or to compare with it on the same targets. A masked model's 'simple' examples keep their "
        "tokenizer's format ([CLS] line [SEP]).",
    )
    packing_document_mask: bool = _field(
        False,
        "'text' only: documents packed into one block stay apart: position ids restart at 0 at each "
        "document, attention does not cross documents, and a causal LM's loss never predicts a document's first "
        "token from the document before, so a document gets the same logits in a block as alone ('simple' and "
        "'line_by_line' always keep their packed lines apart so). SDPA and eager attention get an explicit "
        "[batch, 1, block_size, block_size] block-diagonal mask (no mask-free SDPA kernel then); flash_attention_2/3/4 "
        "and flex_attention get the micro-batch as one row without padding and position ids alone (variable-length "
        "kernels). A causal LM's eval_loss then leaves out each document's first token: compare it only with runs "
        "that use the mask. Models: gpt2, llama, qwen2, mistral (no sliding window), bert, roberta, camembert, "
        "xlm-roberta, electra; distilbert with SDPA or eager only; flash and flex attention for gpt2, bert, roberta, "
        "camembert, xlm-roberta and electra. Any other model or attention kernel is a ConfigError before Ray starts.",
    )
    sliding_window: bool = _field(
        False, "simple: split lines longer than block_size into overlapping windows instead of truncating them."
    )
    stride: float = _field(0.8, "sliding_window: windows start every int(window * stride) tokens.")
    text_column: str = _field(
        "text",
        "The field of each record that holds its text, in JSON Lines (.jsonl, .json, .ndjson, also .gz, .zst) and "
        "Parquet (.parquet) files; other fields are ignored, and a missing one is an error naming the fields found. "
        "Plain text files (any other name, also .gz, .zst) hold one document per non-blank line.",
    )
    shard_size_mb: float = _field(
        4.0,
        "Plain text files are read in shards of about this many MB (split at line ends); shards are the unit of "
        "parallel tokenization and of example ids. JSON Lines and Parquet files are one shard each, so ship a "
        "large corpus in those formats as many files.",
    )

    # --- tokenizer --------------------------------------------------------------------------
    tokenizer_name: Optional[str] = _field(
        None,
        "Load the tokenizer from this hub name or folder instead of "
        "model_name (or instead of training one from scratch).",
    )
    vocab_size: Optional[int] = _field(
        None,
        "Vocabulary size of a tokenizer trained from scratch (required when "
        "neither model_name nor tokenizer_name is given).",
    )
    min_frequency: int = _field(2, "Tokenizer training: minimum frequency of a merge / word piece.")
    special_tokens: list = _field(
        ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        "Byte-level BPE tokenizer training: the special tokens, in the roles bos, pad, eos, "
        "unk, mask (extra entries become additional special tokens). WordPiece "
        "(bert/distilbert/electra) always uses [PAD] [UNK] [CLS] [SEP] [MASK].",
    )
    clean_text: bool = _field(True, "WordPiece tokenizer training: remove control characters and normalise whitespace.")
    handle_chinese_chars: bool = _field(True, "WordPiece tokenizer training: put spaces around CJK characters.")
    strip_accents: bool = _field(True, "WordPiece tokenizer training: strip accents.")
    do_lower_case: bool = _field(
        False, "Tokenizer training: lowercase the text. Saved inside the tokenizer, so training and use always agree."
    )
    tokenizer_sample_mb: Optional[float] = _field(
        None,
        "Tokenizer training: learn from about this many MB of text (e.g. 1000), read from shards spread evenly over "
        "the whole corpus (its start, middle and end alike, not its first MB, so a corpus sorted by topic is "
        "represented); the driver reads about that plus one shard instead of the whole corpus. None: every line of "
        "train_files, as in Simple Transformers (which has no such option).",
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
        False,
        "Passed to from_pretrained: run the code a model folder's auto_map names. Leave False unless you trust the "
        "model repository's code. Only your own args set it, never a model folder's model_args.json.",
    )

    # --- optimisation -------------------------------------------------------------------------
    train_batch_size: int = _field(
        8,
        "Examples (rows of at most block_size tokens) per micro-batch on each worker; the global batch is "
        "train_batch_size * num_workers * gradient_accumulation_steps. A 'text' row is one block; a 'simple' / "
        "'line_by_line' row holds as many whole lines as fit, so an epoch takes about its tokens / (global batch * "
        "block_size) steps, as Simple Transformers' packed chunks do, and the learning-rate schedule is as long.",
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
        "Seed for model initialisation, masking, shuffling and dropout. "
        "None: a fixed default (42), so runs are reproducible.",
    )

    # --- outputs and logging ---------------------------------------------------------------
    output_dir: str = _field(
        "outputs/",
        "Where the driver writes the trained model and tokenizer (Hugging Face format, safetensors), the checkpoint "
        "copies, the training logs and eval_results.txt: a folder, or an s3://, gs:// URI.",
    )
    overwrite_output_dir: bool = _field(False, "Allow writing into a non-empty output_dir.")
    best_model_dir: str = _field(
        "outputs/best_model", "Where the best model found by evaluation during training is written."
    )
    no_save: bool = _field(
        False,
        "Leave output_dir as it was: no model, checkpoint copies or logs are written there (the model is still in "
        "the Ray checkpoint under storage_path). With overwrite_output_dir the logs still go there.",
    )
    not_saved_args: list = _field([], "Field names left out of the saved model_args.json.")
    logging_steps: int = _field(50, "Report loss, learning rate and throughput every this many optimizer steps.")
    save_steps: int = _field(2000, "Checkpoint every this many optimizer steps (-1: off).")
    save_model_every_epoch: bool = _field(True, "Checkpoint at the end of every epoch.")
    save_optimizer_and_scheduler: bool = _field(
        True,
        "Store optimizer and scheduler state in checkpoints (AdamW's is about twice the model). False saves the "
        "disk, and a resume then restarts AdamW's moments.",
    )
    save_eval_checkpoints: bool = _field(True, "Checkpoint at every evaluation during training.")
    save_best_model: bool = _field(
        True,
        "Keep the best model by early_stopping_metric in best_model_dir "
        "(evaluating during training). False: best_model_dir is not written.",
    )
    evaluate_during_training: bool = _field(
        False,
        "Evaluate on eval_file during training, inside the workers, each on its share (train_model needs "
        "eval_file). train_model then returns (global_step, training_progress_scores) and writes "
        "training_progress_scores.csv to output_dir.",
    )
    evaluate_during_training_steps: int = _field(2000, "Evaluate every this many optimizer steps.")
    evaluate_during_training_verbose: bool = _field(False, "Log each evaluation during training.")
    evaluate_during_training_silent: bool = _field(True, "Hide the progress of evaluations during training.")
    evaluate_each_epoch: bool = _field(True, "Evaluate at the end of every epoch when evaluating during training.")
    use_early_stopping: bool = _field(False, "Stop when early_stopping_metric stops improving.")
    early_stopping_metric: str = _field("eval_loss", "Metric watched by early stopping and best-model selection.")
    early_stopping_metric_minimize: bool = _field(True, "Lower early_stopping_metric is better.")
    early_stopping_delta: float = _field(
        0.0, "An evaluation improves on the best only when it beats it by more than this (resets the patience)."
    )
    early_stopping_patience: int = _field(
        3, "Evaluations in a row without improvement before every worker stops, together."
    )
    early_stopping_consider_epochs: bool = _field(False, "Count end-of-epoch evaluations towards early stopping.")
    silent: bool = _field(False, "Hide the progress line.")
    tensorboard_dir: Optional[str] = _field(
        None, "TensorBoard event folder. Default: runs/<run name> inside output_dir."
    )
    wandb_project: Optional[str] = _field(
        None, "Weights & Biases project to log to (needs pip install wandb; without it this is a ConfigError)."
    )
    wandb_kwargs: dict = _field({}, "Extra arguments for wandb.init.")

    # --- Ray ----------------------------------------------------------------------------------
    num_workers: Union[int, list] = _field(
        1,
        "Ray Train workers (one process each; one GPU each when use_gpu). [min, max] makes the run "
        "elastic: it starts with as many workers as the cluster gives (at least min), shrinks when a node "
        "is lost (a spot node reclaimed with a notice uses one of max_preemption_failures, any other loss one "
        "of max_failures) and grows when nodes join, each time continuing "
        "from the latest checkpoint at the same examples; the global batch stays train_batch_size * "
        "gradient_accumulation_steps * max, and gradient accumulation adapts.",
    )
    elastic_resize_check_s: float = _field(
        60.0,
        "Elastic runs: how often Ray checks whether more workers fit (growing restarts the "
        "group from the latest checkpoint, so checkpoint often: save_steps).",
    )
    use_gpu: Optional[bool] = _field(
        None,
        "Train on GPUs (true / false are obeyed). None: use them when the Ray cluster has GPUs or its autoscaler "
        "can add GPU nodes (the job then waits for them), unless use_cuda was set to False; otherwise train on CPU "
        "and say so once. On KubeRay and clusters whose autoscaler config is not on the head, set true.",
    )
    resources_per_worker: Optional[dict] = _field(
        None,
        "Ray resources per worker, e.g. {'CPU': 4, 'GPU': 1}; a worker runs as many torch "
        "threads as CPUs. Default: on the local Ray raylm starts, an equal share of the "
        "machine's cores; on a cluster, and for a sweep's trials, 1 CPU (+1 GPU with use_gpu).",
    )
    storage_path: Optional[str] = _field(
        None,
        "Where Ray keeps checkpoints and results: a local folder or s3://, gs://, file:// URI. "
        "Default: Ray's (~/ray_results). Must be shared storage on a cluster: a local path that some node cannot "
        "see is a ConfigError before training, and so is any local path on a cluster that may gain nodes (joined "
        "through RAY_ADDRESS, or autoscaled) while one node is up, unless written file:// (a shared mount).",
    )
    experiment_name: Optional[str] = _field(
        None, "Name of the run folder under storage_path. Default: raylm-<model_type>-<timestamp>."
    )
    resume: bool = _field(
        False,
        "Continue the run named experiment_name from its latest checkpoint under storage_path (a job whose driver "
        "died: submit it again with resume: true). Without it, a run folder that already exists is refused rather "
        "than silently resumed; the first submission with resume: true starts the run. A checkpoint given as "
        "model_name wins over the run's latest; a run that already reached max_steps / num_train_epochs is a "
        "ConfigError (raise them to train on).",
    )
    max_failures: int = _field(
        0,
        "Worker-group restarts allowed after a worker dies (OOM, preemption, a lost node): the group resumes "
        "from the latest checkpoint and repeats exactly the steps after it. A spot node reclaimed with a notice "
        "counts against max_preemption_failures instead.",
    )
    max_preemption_failures: int = _field(
        -1,
        "Worker-group restarts allowed after a spot node is reclaimed with a notice (Ray drains it for "
        "preemption, with a deadline), counted apart from max_failures; -1: no limit (Ray's default), 0: the "
        "first reclaim ends the run. At the notice every rank stops at the next step boundary and the run "
        "checkpoints at once if the deadline leaves time for it, so the restarted (or shrunk) run repeats no step.",
    )
    preemption_grace_s: float = _field(
        0.0,
        "How long past a reclaim's deadline Ray lets the surviving workers finish before it restarts the group: "
        "with checkpoint_upload_mode 'async', the just-in-time checkpoint's upload must end before the deadline "
        "plus this, or the run resumes from the checkpoint before.",
    )
    checkpoints_to_keep: Optional[int] = _field(
        None,
        "Keep at most this many Ray checkpoints, the newest (None: all; with keep_best_checkpoints the best and "
        "the latest). The output_dir copies follow Ray's.",
    )
    checkpoint_upload_mode: str = _field(
        "sync",
        "How a checkpoint reaches storage_path: 'sync' (training waits until it is uploaded) "
        "or 'async' (rank 0 writes it to local disk, training goes on while Ray uploads it and then deletes the "
        "local copy; the output_dir copy follows when the upload is registered, so a run killed mid-upload "
        "resumes from the checkpoint before). Each logging step reports checkpoint_stall_seconds.",
    )
    keep_best_checkpoints: bool = _field(
        False,
        "With checkpoints_to_keep: keep the checkpoints taken at a new best early_stopping_metric instead of "
        "the newest (the latest is kept too, to resume from). Sweeps set it for their trials.",
    )
    prefetch_batches: int = _field(
        2, "Optimizer steps' batches each worker reads and collates ahead of the model, on a thread (0: none ahead)."
    )
    torch_compile: bool = _field(
        False,
        "Compile the model with torch.compile (inductor, dynamic shapes) on each worker. The first steps "
        "pay the compile (tens of seconds on a CPU, a minute or more for a large model); the steps after "
        "run faster on a GPU. Evaluation during training uses the compiled model too. The workers report "
        "compile_seconds and recompilations (a count that keeps growing means the model falls back to eager).",
    )

    parallel_strategy: str = _field(
        "ddp",
        "How the workers share the model: 'ddp' (each worker holds the whole model, gradients all-reduced) or "
        "'fsdp' (torch's FSDP2 fully_shard: each transformer block and the whole model sharded over the workers, "
        "so each holds about 1/num_workers of the weights, gradients and optimizer state, for models whose "
        "training state does not fit one device; it costs an all-gather of each block's weights in every forward "
        "and backward). fsdp takes bf16/fp16 as its mixed precision (weights computed in that dtype, gradients "
        "reduced in float32); its checkpoints are sharded (fsdp_checkpoint_hf_weights). Not with torch_compile yet.",
    )
    fsdp_checkpoint_hf_weights: bool = _field(
        False,
        "parallel_strategy 'fsdp': each checkpoint also holds the whole model's Hugging Face weights, gathered to "
        "rank 0 while every worker waits (rank 0's CPU must hold the whole model), so the Auto classes load the "
        "checkpoint folder. False: each worker writes only its shards of the weights and optimizer state "
        "(torch.distributed.checkpoint, no gather), which raylm resumes on any worker count and loads as "
        "model_name, but transformers' from_pretrained cannot read; the final model in output_dir and best_model "
        "are whole Hugging Face folders either way. False by default because FSDP is for models whose gather stalls "
        "every device and may not fit rank 0's memory.",
    )
    fsdp_cpu_offload: bool = _field(
        False,
        "parallel_strategy 'fsdp': keep the sharded weights, gradients and optimizer state in CPU "
        "memory, copied to the GPU block by block (FSDP2's CPUOffloadPolicy; the optimizer step "
        "runs on the CPU). Slower; for models whose shards still do not fit.",
    )
    fsdp_reduce_scatter_every_micro_batch: Optional[bool] = _field(
        None,
        "parallel_strategy 'fsdp' with gradient_accumulation_steps > 1: reduce-scatter the gradients after every "
        "micro-batch, so each worker only ever holds its shard of them (True), or only after the last "
        "micro-batch (False: until then each worker keeps the whole model's unsharded float32 gradients, 4 bytes "
        "a parameter, where its shards of the weights, gradients and AdamW moments take 16 bytes a parameter / "
        "num_workers: from 4 workers on the kept gradients outweigh the whole shard). True costs one "
        "reduce-scatter per micro-batch, overlapped with the backward like the last one's. None: True when the "
        "unsharded float32 gradients take 1 GiB or more (about 270M parameters), where they compete with the "
        "activations for device memory; below that the memory is small and the extra reduce-scatters of small "
        "blocks, bound by latency, cost more than it is worth.",
    )

    # --- accepted for Simple Transformers compatibility; Ray Data does this work differently --
    reprocess_input_data: bool = _field(
        True,
        "Tokenize the text again into the example store even when a matching store exists. False reuses "
        "one: safe, as a store is keyed by the files (path, size, modification time), the tokenizer and "
        "the example settings, so a changed file or tokenizer is never served stale. True writes the same bytes "
        "under the same names, each file replaced whole, so a job still reading that store is not disturbed.",
    )
    no_cache: bool = _field(
        False,
        "Like reprocess_input_data=True: always tokenize again (the store is still "
        "written, since the training workers read their examples from it).",
    )
    cache_dir: Optional[str] = _field(
        None,
        "Folder (or s3:// ... URI) of the example stores: the tokenized examples, one store per files + tokenizer + "
        "settings. Default: raylm-examples under storage_path. On a cluster every node must reach it, checked as "
        "storage_path is. "
        "raylm never deletes stores: remove old keys when their text is gone.",
    )
    use_multiprocessing: bool = _field(True, "No effect: tokenization is parallel through Ray Data.")
    process_count: int = _field(1, "No effect: tokenization is parallel through Ray Data.")
    dataloader_num_workers: int = _field(
        0, "No effect: each worker reads its examples from the example store on a thread of its own."
    )
    n_gpu: int = _field(1, "No effect: use num_workers and use_gpu (one GPU per worker).")
    local_rank: int = _field(-1, "No effect: Ray Train sets up distributed training.")
