"""Evaluation: a Ray Dataset of examples + a model -> token-weighted eval_loss and perplexity.

It runs as Ray Data batch inference on a pool of actors, one per worker. Each batch returns the sum
of its token losses and its token count; the driver adds them up, so the answer does not depend on
eval_batch_size or the number of workers. MLM masks come from the fixed evaluation stream, so
repeated evaluations agree.
"""

from __future__ import annotations

import math

import numpy as np
import ray
import torch

from raylm.collators import EVAL_STREAM, CollatorSpec, collate
from raylm.modeling import forward_loss_sum


class _LossSums:
    """Ray Data actor: holds the model once, turns each batch into (loss_sum, n_targets)."""

    def __init__(self, model_box: list, objective: str, collator: dict, use_gpu: bool):
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = ray.get(model_box[0]).to(self.device).eval()
        self.objective = objective
        self.spec = CollatorSpec(**collator)

    def __call__(self, batch: dict) -> dict:
        tensors = collate(batch, self.spec, stream=EVAL_STREAM)
        tensors = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in tensors.items()}
        with torch.inference_mode():
            loss_sum = forward_loss_sum(self.model, tensors, self.objective)
        return {"loss_sum": np.array([float(loss_sum)], dtype=np.float64), "n_targets": np.array([tensors["n_targets"]], dtype=np.int64)}


def evaluate(model, dataset, objective: str, collator: dict, batch_size: int, num_workers: int, use_gpu: bool, cpus_per_worker: float) -> dict:
    """{"eval_loss", "perplexity", "eval_tokens"} for `model` on every example of `dataset`."""
    model_box = [ray.put(model.cpu())]
    sums = dataset.map_batches(
        _LossSums,
        fn_constructor_kwargs={"model_box": model_box, "objective": objective, "collator": collator, "use_gpu": use_gpu},
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=num_workers,
        num_cpus=cpus_per_worker,
        num_gpus=1 if use_gpu else 0,
    ).take_all()
    loss_sum = sum(row["loss_sum"] for row in sums)
    n_targets = int(sum(row["n_targets"] for row in sums))
    if n_targets == 0:
        raise ValueError("the evaluation data produced no tokens to predict")
    eval_loss = loss_sum / n_targets
    return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 700.0)), "eval_tokens": n_targets}
