"""Divergence: each step's loss and gradient norm (device tensors) -> the first step of a run of non-finite ones that
training does not recover from, agreed by every rank, read only when a report or checkpoint is due.
"""

from __future__ import annotations

import torch

from raylm.training.collectives import earliest_step

# fp16 only. The scaler halves its scale at each overflow (from 65536): 24 overflows in a row leave it
# below 2**-8, where no gradient survives; a NaN loss that many steps running will not recover either.
FP16_NONFINITE_STEPS_TOLERATED = 24
FP16_MIN_LOSS_SCALE = 2.0**-8


class NonfiniteLosses:
    """Where the loss or the gradient went NaN/inf for good, tracked on the device (read at reports only: no host
    sync per step).

    A step is non-finite when its loss or its gradient norm is. It diverges when `tolerated_in_a_row`
    steps before it were non-finite too; the run of them is reported from its first step.

    Which checkpoint is good then: step k computes its loss and gradients from the weights that
    checkpoint k-1 holds, then updates them. So checkpoint j is good when step j+1 was finite, and if
    k is the first non-finite step, checkpoint k-1 holds the weights that produced the NaN (weights of
    1e30 are finite but overflow the next forward pass), and the last good one is the latest at a step
    <= k-2 (run_events.TrainingEvents.last_good_checkpoint). Under fp16 the scaler skips the steps whose
    gradients overflow, leaving the weights as they were before the run, so the same rule holds with k
    the run's first step.
    """

    def __init__(self, device: torch.device, tolerated_in_a_row: int):
        self.tolerated_in_a_row = tolerated_in_a_row
        self.run_length = torch.zeros((), dtype=torch.int64, device=device)
        self.run_start = torch.full((), -1, dtype=torch.int64, device=device)
        self.first_diverged_step = torch.full((), -1, dtype=torch.int64, device=device)

    @classmethod
    def for_scaler(cls, device: torch.device, scaler: torch.amp.GradScaler) -> "NonfiniteLosses":
        # fp16: the gradient scaler skips a step whose loss or gradients overflow; only a run of them is divergence.
        return cls(device, tolerated_in_a_row=FP16_NONFINITE_STEPS_TOLERATED if scaler.is_enabled() else 0)

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.run_length = torch.where(bad, self.run_length + 1, 0)
        self.run_start = torch.where(bad, torch.where(self.run_start < 0, step, self.run_start), -1)
        diverged = (self.run_length > self.tolerated_in_a_row) & (self.first_diverged_step < 0)
        self.first_diverged_step = torch.where(diverged, self.run_start, self.first_diverged_step)

    def agreed_first_step(self, scaler: torch.amp.GradScaler, global_step: int, world_size: int) -> int:
        """The first diverged step of any rank (-1: none); a collective, every rank must call it."""
        first_bad = self.first_diverged_step.clone()
        if scaler.is_enabled() and scaler.get_scale() < FP16_MIN_LOSS_SCALE:
            # Overflowing gradients at every step: the scaler halved its scale to nothing, and the steps it
            # takes now apply gradients scaled to zero.
            first_bad = torch.where(first_bad < 0, global_step, first_bad)
        return earliest_step(first_bad, world_size)
