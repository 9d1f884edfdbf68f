"""Evaluation: a Ray Dataset of examples + a model -> token-weighted eval_loss and perplexity.

The same per-batch sums serve both evaluations: `eval_model` runs them as Ray Data batch inference
on a pool of actors, one per worker, and evaluation during training runs them inside the training
workers on their eval shards. Each batch returns sums (losses, counts), never means, and the sums
are added up before `summarize` divides; so the answer does not depend on the batch size or the
number of workers. MLM masks come from the fixed evaluation stream, so repeated evaluations agree.
"""

from __future__ import annotations

import math

import numpy as np
import ray
import torch

from raylm.collators import EVAL_STREAM, CollatorSpec, collate
from raylm.modeling import forward_loss_sums


def batch_eval_sums(model, tensors: dict, objective: str) -> dict[str, float]:
    """The additive statistics of one collated batch (call under inference mode)."""
    sums = forward_loss_sums(model, tensors, objective)
    return {"target_loss": float(sums["target_loss"]), "n_targets": float(tensors["n_targets"])}


def summarize(totals: dict[str, float], objective: str, token_loss_weight: float) -> dict:
    """Metrics from the statistics summed over every batch: eval_loss, perplexity, eval_tokens."""
    n_targets = int(totals["n_targets"])
    if n_targets == 0:
        raise ValueError("the evaluation data produced no tokens to predict")
    eval_loss = totals["target_loss"] / n_targets
    return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 700.0)), "eval_tokens": n_targets}


class _EvalSums:
    """Ray Data actor: holds the model once, turns each batch into its additive statistics."""

    def __init__(self, model_box: list, objective: str, collator: dict, use_gpu: bool):
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = ray.get(model_box[0]).to(self.device).eval()
        self.objective = objective
        self.spec = CollatorSpec(**collator)

    def __call__(self, batch: dict) -> dict:
        tensors = collate(batch, self.spec, stream=EVAL_STREAM)
        tensors = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in tensors.items()}
        with torch.inference_mode():
            sums = batch_eval_sums(self.model, tensors, self.objective)
        return {key: np.array([value], dtype=np.float64) for key, value in sums.items()}


def evaluate(model, dataset, objective: str, collator: dict, batch_size: int, num_workers: int, use_gpu: bool, cpus_per_worker: float, token_loss_weight: float) -> dict:
    """Metrics (see `summarize`) for `model` on every example of `dataset`."""
    model_box = [ray.put(model.cpu())]
    rows = dataset.map_batches(
        _EvalSums,
        fn_constructor_kwargs={"model_box": model_box, "objective": objective, "collator": collator, "use_gpu": use_gpu},
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=num_workers,
        num_cpus=cpus_per_worker,
        num_gpus=1 if use_gpu else 0,
    ).take_all()
    totals: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return summarize(totals, objective, token_loss_weight)
