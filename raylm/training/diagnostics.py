"""Test hooks: the job's `diagnostics` mapping -> a per-step trace of each rank (`rank{N}.jsonl`), and injected worker
deaths, failures and waits at chosen steps.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from typing import Optional

import ray
import torch

HOLD_SECONDS = 120


@dataclass
class Diagnostics:
    """Test hooks: a per-step trace of consumed examples and losses, and injected worker deaths."""

    trace_dir: Optional[str] = None
    kill_rank: Optional[int] = None
    kill_at_step: Optional[int] = None  # SIGKILL after this optimizer step...
    kill_while_saving: bool = False  # ...or in the middle of writing this step's checkpoint
    raise_at_step: Optional[int] = None  # a bug in the loop: every rank raises after this step
    holds: Optional[list] = None  # [step, release file]: every rank waits after that step until the file exists

    def trace(self, rank: int, record: dict) -> None:
        if self.trace_dir:
            with open(os.path.join(self.trace_dir, f"rank{rank}.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps({**record, "time": time.time()}) + "\n")

    def trace_start(self, rank: int, world_size: int, resumed_from: Optional[int], record: dict) -> None:
        """The start of a session on this rank: where it runs, what it resumed from, and `record`."""
        where = {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}
        sizes = {"world_size": world_size, "torch_threads": torch.get_num_threads()}
        self.trace(rank, {"event": "start", "resumed_from": resumed_from, **where, **sizes, **record})

    def after_step(self, rank: int, step: int) -> None:
        """The hooks due after an optimizer step, in order: a death, a failure, a wait."""
        self.maybe_kill(rank, step, saving=False)
        self.maybe_raise(step)
        self.maybe_hold(step)

    def maybe_raise(self, step: int) -> None:
        if step == self.raise_at_step:
            # Two lines, as Ray's own errors often are: the first announces, the second explains.
            raise RuntimeError(f"injected failure after step {step}\nbecause the test asked for it")

    def maybe_hold(self, step: int) -> None:
        """Give a test time to act on the cluster (remove or add a node) at known points of the run."""
        for hold_step, release in self.holds or []:
            if step == hold_step:
                deadline = time.monotonic() + HOLD_SECONDS
                while not os.path.exists(release) and time.monotonic() < deadline:
                    time.sleep(0.2)

    def maybe_kill(self, rank: int, step: int, saving: bool) -> None:
        if rank != self.kill_rank or step != self.kill_at_step or saving != self.kill_while_saving:
            return
        marker = os.path.join(self.trace_dir, f"killed-rank{rank}-step{step}")
        if not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
