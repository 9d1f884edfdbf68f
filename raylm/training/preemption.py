"""Spot reclaims on a worker: Ray Train's notice that a node of the run is being drained for preemption -> this rank's
deadline, the agreed decision to checkpoint before it (or not: too close), rank 0's record of the reclaim for the
driver, and the wait for Ray's restart.

Ray Train's PreemptionWatcher (an actor per worker group, polling the GCS for drained nodes) marks every
worker of the group when one of its nodes is drained. The mark is read here from the worker's own train
context, which costs nothing, unlike ray.train.get_preemption_info() (a barrier every rank would pay each
step). The ranks see the mark at slightly different times; collectives.agree_on_step makes the first step
boundary after any rank saw it the one where they all stop, with one deadline and one clock.

After the checkpoint the ranks wait for the reclaim instead of returning or raising: Ray's controller takes
every rank returning as the run's success, and a rank that raised would count against max_failures. The
controller restarts the group (one of max_preemption_failures) once the deadline plus preemption_grace_s has
passed, or when the drained node's workers die.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import ray.train

from raylm.training.checkpoint_reports import CheckpointReports
from raylm.training.checkpoints import checkpoint_label
from raylm.training.collectives import ReclaimNotice

# Ray's DEFAULT_PREEMPTION_DEADLINE_S: how long its controller waits after a drain that names no deadline.
DEADLINE_WHEN_NONE_S = 120.0
# The checkpoint at a reclaim can run slower than the run's slowest so far (the node is being emptied, storage is
# shared with the other reclaimed nodes): it is started only when it fits this many times over.
CHECKPOINT_SAFETY = 1.5
# Past the deadline plus preemption_grace_s, Ray's controller has restarted the group: a rank still waiting after this
# long was never reclaimed, and says so.
RECLAIM_OVERDUE_S = 120.0


def checkpoint_in_time(notice: ReclaimNotice) -> bool:
    """Whether a checkpoint started now commits before the deadline, judged from the slowest of the run's checkpoints.

    With none taken yet the run tries: a checkpoint the reclaim cuts off is never registered, so the restart
    resumes from the one before, as it would without the attempt.
    """
    seconds_left = (notice.deadline_ms - notice.now_ms) / 1000
    if seconds_left <= 0:
        return False
    if notice.slowest_checkpoint_ms is None:
        return True
    return notice.slowest_checkpoint_ms / 1000 * CHECKPOINT_SAFETY < seconds_left


class ReclaimWatch:
    """One worker's side of a reclaim: its notice (from Ray Train's mark), the just-in-time checkpoint, rank 0's record
    of the reclaim for the driver, and the wait for Ray's restart. A run in the driver's process has no marks."""

    def __init__(self, checkpoints: CheckpointReports, grace_s: float, started_from_step: int):
        from ray.train.v2._internal.execution.train_fn_utils import get_train_fn_utils

        self.checkpoints, self.grace_s, self.started_from_step = checkpoints, grace_s, started_from_step
        self.watched = get_train_fn_utils().is_distributed()
        self.first_seen_s: Optional[float] = None

    def info(self):
        """Ray's PreemptionInfo for this worker (deadline_ms, preempted_node_to_ranks), None when nothing is drained."""
        if not self.watched:
            return None
        # Private in Ray 2.60: the mark PreemptionWatcher leaves on each worker (mark_preempt).
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context.preemption_info

    def notice(self) -> tuple[Optional[int], Optional[int]]:
        """(when this rank's notice says its node goes, UNIX ms, or None without a notice; the slowest checkpoint this
        rank has taken, ms), as collectives.agree_on_step takes them."""
        info = self.info()
        if info is None:
            return None, self.checkpoints.slowest_ms
        if self.first_seen_s is None:
            self.first_seen_s = time.time()
        deadline_s = self.first_seen_s + DEADLINE_WHEN_NONE_S if info.deadline_ms is None else info.deadline_ms / 1000
        return int(deadline_s * 1000), self.checkpoints.slowest_ms

    def checkpoint_and_wait(
        self, notice: ReclaimNotice, step: int, last_checkpoint_step: int, checkpoint: Callable[[str, dict], None]
    ) -> None:
        """Every rank, at the agreed step boundary: `checkpoint(label, metrics)` the steps done if the deadline leaves
        time, rank 0 tells the driver what the restart will resume from, then all wait for Ray's restart."""
        if last_checkpoint_step != step and checkpoint_in_time(notice):
            checkpoint(checkpoint_label(step), {})
        if self.checkpoints.ranks.rank == 0:
            # Waits until Ray has registered (uploaded, with async uploads) what was reported.
            self.checkpoints.announce_registered()
            event = self.reclaim_event(notice, step, time.time() - notice.now_ms / 1000)
            if self.checkpoints.progress_queue is not None:
                self.checkpoints.progress_queue.put_nowait(event)
        await_reclaim(notice, self.grace_s)

    def reclaim_event(self, notice: ReclaimNotice, notice_step: int, seconds_since_notice: float) -> dict:
        """Rank 0's record of the reclaim: the nodes, the step the notice stopped at, the step and seconds of the
        just-in-time checkpoint (None if none was committed), and the steps the restart repeats."""
        info = self.info()
        registered = [r.metrics.get("global_step", 0) for r in ray.train.get_all_reported_checkpoints()]
        resumes_from = max(registered, default=self.started_from_step)
        committed = resumes_from == notice_step
        return {
            "kind": "preemption",
            "global_step": notice_step,
            "nodes": info.preempted_node_ids if info is not None else [],
            "ranks": info.preempted_ranks if info is not None else [],
            "deadline_seconds": round((notice.deadline_ms - notice.now_ms) / 1000, 3),
            "checkpoint_step": notice_step if committed else None,
            "checkpoint_seconds": round(seconds_since_notice, 3) if committed else None,
            "resumes_from_step": resumes_from,
            "steps_repeated": notice_step - resumes_from,
        }


def await_reclaim(notice: ReclaimNotice, grace_s: float) -> None:
    """Wait until Ray's controller ends this worker for the restart; raise if that never comes."""
    overdue_at = notice.deadline_ms / 1000 + grace_s + RECLAIM_OVERDUE_S
    while time.time() < overdue_at:
        time.sleep(1.0)
    raise RuntimeError(
        f"A node of this run was drained for preemption with a deadline {grace_s + RECLAIM_OVERDUE_S:.0f} s ago, "
        "but Ray Train did not restart the workers; the run stops here and resumes from its latest checkpoint"
    )
