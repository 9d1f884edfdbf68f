"""Progress reports: a rank's steps since the last report (loss on the device, tokens, waits) -> the metrics of a
progress report (loss, throughput, MFU, memory, compile); its steps since the last checkpoint -> the running totals
of the trainer state.
"""

from __future__ import annotations

import math
import os
import resource
import time
from typing import Optional

import torch
from ray.train.v2._internal.constants import DEFAULT_HEALTH_CHECK_INTERVAL_S, HEALTH_CHECK_INTERVAL_S_ENV_VAR

from raylm.config import LanguageModelingArgs
from raylm.models.flops import model_training_flops_per_token, peak_flops_per_second
from raylm.models.modeling import resolve_block_size
from raylm.training.checkpoints import TrainerState
from raylm.training.collectives import Ranks, all_reduce_sum, all_reduce_sums
from raylm.training.parallelism import parameter_bytes, unwrap
from raylm.training.torch_compile import CompileStats


class LossWindow:
    """Loss since the last report (it stays on the device until then), tokens, and seconds waited for data."""

    def __init__(self):
        self.loss_sum, self.inputs, self.steps, self.started = None, 0, 0, time.perf_counter()
        self.data_wait_seconds = self.checkpoint_seconds = 0.0

    def add(self, step_loss: torch.Tensor, inputs: int) -> None:
        self.loss_sum = step_loss if self.loss_sum is None else self.loss_sum + step_loss
        self.inputs += inputs
        self.steps += 1

    def reset(self) -> None:
        self.__init__()


class SessionTotals:
    """This rank's share of the training loss (on the device) and examples since the last checkpoint, and when this
    session's training time, not yet in the trainer state, started."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.examples = 0
        self.started = time.perf_counter()

    def add(self, step_loss: torch.Tensor, examples: int) -> None:
        self.loss += step_loss
        self.examples += examples

    def fold_into(self, state: TrainerState, ranks: Ranks) -> None:
        """Add every rank's totals into the (global) trainer state, and start counting again; a collective."""
        state.train_loss_sum += all_reduce_sum(self.loss, ranks.world_size)
        self.loss.zero_()
        examples = torch.tensor(float(self.examples), device=ranks.device)
        state.train_examples += int(all_reduce_sum(examples, ranks.world_size))
        self.examples = 0
        now = time.perf_counter()
        state.train_seconds += now - self.started
        self.started = now


class ProgressReports:
    """What each progress report says beyond the loss: throughput, model FLOPs and MFU, memory, compile statistics."""

    def __init__(
        self,
        model: torch.nn.Module,
        args: LanguageModelingArgs,
        ranks: Ranks,
        compute_dtype: torch.dtype,
        compile_stats: Optional[CompileStats],
    ):
        self.window = LossWindow()
        self.ray_report_interval_s = ray_controller_poll_seconds()
        self.last_ray_report = time.perf_counter()
        self.last_reported_loss = math.nan
        self.device, self.world_size, self.compile_stats = ranks.device, ranks.world_size, compile_stats
        module = unwrap(model)
        # At block_size tokens per example: an upper bound on the attention term for shorter examples.
        config = module.discriminator.config if hasattr(module, "discriminator") else module.config
        self.flops_per_token = model_training_flops_per_token(
            module, resolve_block_size(args, config), mlm_probability=args.mlm_probability
        )
        self.peak_flops_per_second = peak_flops_per_second(ranks.device, compute_dtype)
        self.param_memory_mb = parameter_bytes(model) / 2**20

    def loss_peek(self) -> float:
        """The training loss since the last report (the last reported one right after a report); a collective."""
        if not self.window.steps:
            return self.last_reported_loss
        return all_reduce_sum(self.window.loss_sum, self.world_size) / self.window.steps

    def metrics(
        self, state: TrainerState, epoch: int, learning_rate: float, session_started: float
    ) -> tuple[dict, bool]:
        """The progress report of the window now ending (a collective), and whether it goes to ray.train.report too
        (the same answer on every rank); the next window starts.

        ray.train.report is a barrier over the ranks that waits until Ray's controller has taken the previous
        report, and the controller takes one per poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, Ray's default 2 s):
        reported more often, progress stalls every rank. So progress goes to Ray at most once per poll interval;
        the driver gets every window through the progress queue. Ray's consumers of train metrics (Tune's
        callback in a sweep, checkpoint scores) read evaluations and checkpoints, which are always reported.

        session_started: when this session's training time, not yet in state.train_seconds, started.
        """
        window = self.window
        now = time.perf_counter()
        # A fill on the device, not a copy from the host (which would wait for the queued steps).
        due_here = torch.full((), float(now - self.last_ray_report >= self.ray_report_interval_s), device=self.device)
        # The only host sync of the loss: once per logging window; the ranks agree on the report in the same call.
        loss_sum, due_ranks = all_reduce_sums(torch.stack([window.loss_sum.float(), due_here]), self.world_size)
        reports_to_ray = due_ranks > 0
        if reports_to_ray:
            self.last_ray_report = now
        loss = loss_sum / max(window.steps, 1)
        self.last_reported_loss = loss
        seconds = max(time.perf_counter() - window.started, 1e-9)
        # Non-pad input tokens of the whole global batch.
        tokens_per_second = window.inputs / seconds
        metrics = {
            "global_step": state.global_step,
            "epoch": epoch,
            "loss": loss,
            "learning_rate": learning_rate,
            "tokens_per_second": tokens_per_second,
            # This rank's time blocked on its data iterator, as a share of the window's wall time.
            "data_wait_fraction": window.data_wait_seconds / seconds,
            "elapsed_seconds": state.train_seconds + time.perf_counter() - session_started,
            "num_workers": self.world_size,  # changes over an elastic run
            # Seconds this window's checkpoints held training up (writing, and uploading unless async).
            "checkpoint_stall_seconds": window.checkpoint_seconds,
            "param_memory_mb": self.param_memory_mb,
            "peak_memory_mb": peak_memory_mb(self.device),
        }
        if self.compile_stats is not None:
            metrics.update(self.compile_stats.metrics())
        if self.flops_per_token is not None:
            metrics["model_flops_per_second"] = tokens_per_second * self.flops_per_token
            if self.peak_flops_per_second is not None:
                metrics["mfu"] = metrics["model_flops_per_second"] / (self.world_size * self.peak_flops_per_second)
        # The next window starts now, so it pays for this report's ray.train.report, if any.
        window.reset()
        return metrics, reports_to_ray


def ray_controller_poll_seconds() -> float:
    """How often Ray Train's controller takes a report from the workers (the job's environment sets it for all)."""
    return float(os.environ.get(HEALTH_CHECK_INTERVAL_S_ENV_VAR, DEFAULT_HEALTH_CHECK_INTERVAL_S))


def peak_memory_mb(device: torch.device) -> float:
    """This worker's peak memory so far: torch's allocations on a GPU, else the process's peak resident set
    (everything, the interpreter included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plain(metrics: dict) -> dict:
    return {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
