"""Evaluation: a Ray Dataset of examples + a model -> token-weighted eval_loss and perplexity (+ ELECTRA's discriminator
metrics).

The same per-batch sums serve both evaluations: `eval_model` runs them as Ray Data batch inference
on a pool of actors, one per worker (in the driver itself on raylm's local Ray), and evaluation during training runs
them inside the training workers on their eval shards. Each batch returns sums (losses, counts), never means, and the
sums are added up before `summarize` divides; so the answer does not depend on the batch size or the
number of workers. MLM masks come from the fixed evaluation stream, so repeated evaluations agree.
An evaluation during training (`rank_eval_sums`, summed over the ranks) also judges early stopping
(`judge_for_early_stopping`): a new best, or one evaluation closer to stopping.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Iterator, Optional

import numpy as np
import ray
import torch
from ray.util.annotations import RayDeprecationWarning

from raylm.config import LanguageModelingArgs
from raylm.data.collators import EVAL_STREAM, CollatorSpec, collate
from raylm.data.datasets import user_errors_from_tasks
from raylm.data.epoch_data import Prefetched, most_part_batches, rank_part
from raylm.data.example_store import BlockReader
from raylm.models.electra import LOGIT_BINS, ORIGINAL_HISTOGRAM, REPLACED_HISTOGRAM, histogram_auc
from raylm.models.modeling import ELECTRA, forward_loss_sums, install_remote_code
from raylm.training.checkpoints import TrainerState
from raylm.training.collectives import Ranks, sum_dicts
from raylm.training.step_batches import empty_batch, to_device

# Evaluation batches collated ahead of the model, on a thread.
EVAL_BATCHES_AHEAD = 2


def batch_eval_sums(model, tensors: dict, objective: str) -> dict[str, float]:
    """The additive statistics of one collated batch (call under inference mode): every sum the
    objective's forward returns (losses, and ELECTRA's replaced-token counts) plus the token counts,
    brought to the host in one transfer (on_host)."""
    return {**on_host(forward_loss_sums(model, tensors, objective)), **_token_counts(tensors)}


def on_host(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Device sums -> Python floats, in one transfer. A histogram (ELECTRA's logit bins) becomes one key per bin,
    "name.bin", empty bins included: Ray Data's rows of batch statistics must all have the same columns."""
    if not sums:
        return {}
    # float64 holds float32 sums and integer counts exactly.
    values = iter(torch.cat([value.reshape(-1).to(torch.float64) for value in sums.values()]).tolist())
    stats: dict[str, float] = {}
    for key, value in sums.items():
        if value.dim():
            stats.update({f"{key}.{index}": next(values) for index in range(value.numel())})
        else:
            stats[key] = next(values)
    return stats


def _token_counts(tensors: dict) -> dict[str, float]:
    # The collator counts them on the host, as Python ints.
    return {"n_targets": float(tensors["n_targets"]), "n_inputs": float(tensors["n_input_tokens"])}


def summarize(totals: dict[str, float], objective: str, token_loss_weight: float) -> dict:
    """Metrics from the statistics summed over every batch: eval_loss, perplexity, eval_tokens.

    ELECTRA's eval_loss is Simple Transformers' generator loss + token_loss_weight x discriminator
    loss; its perplexity is the generator's alone (exp of the combined loss means nothing), and the
    discriminator's replaced-token accuracy, precision, recall and F1 (at p > 0.5) are added, and
    its AUC: whether it ranks replaced tokens above original ones, whatever the threshold (a
    discriminator that has learned but is not yet confident has F1 near 0 and an AUC well above 0.5).
    The AUC is left out when the data held no replaced (or no original) token.
    """
    n_targets = int(totals["n_targets"])
    if n_targets == 0:
        raise ValueError("the evaluation data produced no tokens to predict")
    target_loss = totals["target_loss"] / n_targets
    metrics = {"eval_loss": target_loss, "perplexity": math.exp(min(target_loss, 700.0)), "eval_tokens": n_targets}
    if objective == ELECTRA:
        metrics.update(_replaced_token_metrics(totals, target_loss, token_loss_weight))
    return metrics


def _replaced_token_metrics(totals: dict[str, float], generator_loss: float, token_loss_weight: float) -> dict:
    n_inputs = int(totals["n_inputs"])
    discriminator_loss = totals["token_loss"] / n_inputs
    tp, fp, fn, tn = (totals[k] for k in ("true_positives", "false_positives", "false_negatives", "true_negatives"))
    # No predicted (or no actual) replacements: precision (recall) is 0, as in scikit-learn.
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    auc = histogram_auc(
        *(
            [totals.get(f"{name}.{index}", 0.0) for index in range(LOGIT_BINS)]
            for name in (REPLACED_HISTOGRAM, ORIGINAL_HISTOGRAM)
        )
    )
    return {
        "eval_loss": generator_loss + token_loss_weight * discriminator_loss,
        "generator_loss": generator_loss,
        "discriminator_loss": discriminator_loss,
        "discriminator_accuracy": (tp + tn) / n_inputs,
        "discriminator_precision": precision,
        "discriminator_recall": recall,
        "discriminator_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        **({} if auc is None else {"discriminator_auc": auc}),
        "replaced_tokens": int(tp + fn),
        "eval_input_tokens": n_inputs,
    }


class _BatchSums:
    """The model on its device, turning each batch of examples into its additive statistics, its matmuls in
    `amp_dtype` (the run's bf16/fp16 on a GPU, as in training) or float32."""

    def __init__(self, model, objective: str, collator: dict, use_gpu: bool, amp_dtype: Optional[torch.dtype] = None):
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.objective = objective
        self.spec = CollatorSpec(**collator)
        self.autocast = torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def __call__(self, batch: dict) -> dict[str, float]:
        tensors = collate(batch, self.spec, stream=EVAL_STREAM)
        tensors = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in tensors.items()}
        with torch.inference_mode(), self.autocast:
            return batch_eval_sums(self.model, tensors, self.objective)


class _EvalSums(_BatchSums):
    """Ray Data actor: holds the model once, turns each batch into a row of its statistics."""

    def __init__(
        self,
        model_box: list,
        objective: str,
        collator: dict,
        use_gpu: bool,
        amp_dtype: Optional[torch.dtype],
        remote_code: Optional[dict],
    ):
        install_remote_code(remote_code)
        super().__init__(ray.get(model_box[0]), objective, collator, use_gpu, amp_dtype)

    def __call__(self, batch: dict) -> dict:
        return {key: np.array([value], dtype=np.float64) for key, value in super().__call__(batch).items()}


def evaluate(
    model,
    dataset,
    objective: str,
    collator: dict,
    batch_size: int,
    num_workers: int,
    use_gpu: bool,
    cpus_per_worker: float,
    token_loss_weight: float,
    amp_dtype: Optional[torch.dtype] = None,
    remote_code: Optional[dict] = None,
    in_process: bool = False,
) -> dict:
    """Metrics (see `summarize`) for `model` on every example of `dataset` (amp_dtype: the matmuls' dtype, as
    _BatchSums; remote_code: modeling.remote_code_sources of a trust_remote_code model).

    `in_process`: evaluate in this process, on the batches Ray Data reads; for raylm's own local Ray,
    where a pool of actors would only add processes that each import torch and transformers and
    fetch the model (seconds) to evaluate what this process can.
    """
    if in_process:
        was_training = model.training
        try:
            with user_errors_from_tasks():
                batch_sums = _BatchSums(model, objective, collator, use_gpu, amp_dtype)
                rows = [
                    batch_sums(batch) for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy")
                ]
        finally:
            model.train(was_training).cpu()
        return summarize(_add_up(rows), objective, token_loss_weight)
    model_box = [ray.put(model.cpu())]
    with warnings.catch_warnings(), user_errors_from_tasks():
        # Ray Data restarts its actors unless told otherwise, and the core worker then logs an
        # error line on the user's console for each one ("constructor arguments in the object
        # store"). Only a ray_remote_args keyword (deprecated in 2.60, without a named
        # replacement) turns restarts off; a failed evaluation is simply rerun.
        warnings.simplefilter("ignore", RayDeprecationWarning)
        rows = dataset.map_batches(
            _EvalSums,
            fn_constructor_kwargs={
                "model_box": model_box,
                "objective": objective,
                "collator": collator,
                "use_gpu": use_gpu,
                "amp_dtype": amp_dtype,
                "remote_code": remote_code,
            },
            batch_size=batch_size,
            batch_format="numpy",
            concurrency=num_workers,
            num_cpus=cpus_per_worker,
            num_gpus=1 if use_gpu else 0,
            max_restarts=0,
        ).take_all()
    return summarize(_add_up(rows), objective, token_loss_weight)


def _add_up(rows: list[dict]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def rank_eval_sums(
    module: torch.nn.Module,
    reader: BlockReader,
    spec: CollatorSpec,
    objective: str,
    batch_size: int,
    ranks: Ranks,
    autocast: torch.autocast,
    sharded: bool,
) -> dict[str, float]:
    """Evaluation during training: this rank's part of the evaluation set -> its statistics (see batch_eval_sums),
    summed over the ranks; the (unwrapped) model is in eval mode meanwhile.

    The device adds up every batch's sums, and one transfer brings them to the host at the end, so the device never
    waits for the host between batches; a thread collates the next batches meanwhile (EVAL_BATCHES_AHEAD).
    """
    module.eval()
    parts = rank_part(reader, ranks.rank, ranks.world_size, batch_size)
    pin_memory = ranks.device.type == "cuda"
    collated = Prefetched(parts, lambda part: collate(part, spec, EVAL_STREAM, pin_memory), EVAL_BATCHES_AHEAD)
    batches: Iterator[dict] = collated
    if sharded and ranks.world_size > 1:
        # Each forward of a sharded model all-gathers weights with the other ranks, and the parts differ by one
        # example at most: every rank runs as many batches as the largest part, the shorter padded with empty ones.
        count = most_part_batches(reader.store.num_examples, ranks.world_size, batch_size)
        batches = itertools.islice(
            itertools.chain(collated, itertools.repeat(empty_batch(spec, torch.device("cpu")))), count
        )
    device_sums: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = {}
    try:
        with torch.inference_mode(), autocast:
            for batch in batches:
                for key, value in forward_loss_sums(module, to_device(batch, ranks.device), objective).items():
                    # In float64, as the host added the batches' floats before: the same totals, bit for bit.
                    value = value.to(torch.float64)
                    device_sums[key] = device_sums[key] + value if key in device_sums else value
                for key, value in _token_counts(batch).items():
                    counts[key] = counts.get(key, 0.0) + value
    finally:
        collated.close()
    module.train()
    return sum_dicts(ranks, {**on_host(device_sums), **counts})


def judge_for_early_stopping(state: TrainerState, args: LanguageModelingArgs, metrics: dict, counts: bool) -> None:
    """A new best by early_stopping_metric goes into `state` (and metrics["is_best"]); else, when the evaluation
    `counts`, it brings early stopping one evaluation closer."""
    value = metrics.get(args.early_stopping_metric)
    if value is None:
        raise KeyError(
            f"early_stopping_metric {args.early_stopping_metric!r} is not among the evaluation metrics "
            f"{sorted(metrics)}"
        )
    improved = state.best_metric is None or (
        value < state.best_metric - args.early_stopping_delta
        if args.early_stopping_metric_minimize
        else value > state.best_metric + args.early_stopping_delta
    )
    if improved:
        state.best_metric, state.best_step = float(value), state.global_step
        state.early_stopping_counter = 0
        metrics["is_best"] = True
    elif counts:
        state.early_stopping_counter += 1
        if args.use_early_stopping and state.early_stopping_counter >= args.early_stopping_patience:
            state.stopped_early = True
