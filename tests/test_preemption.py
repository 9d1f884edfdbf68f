"""Spot reclaims without a cluster: the ranks' agreement on a notice, the checkpoint-or-not decision, the restart
budget Ray gets, and the record in training_log.jsonl and the end-of-run table. The reclaim itself, on a simulated
cluster, is in test_multinode.py."""

import json
import os
import subprocess
import sys

import pytest
import torch

from raylm import ConfigError, LanguageModelingArgs
from raylm.cluster.launcher import failure_config
from raylm.training.collectives import Ranks, ReclaimNotice, agree_on_step
from raylm.training.preemption import CHECKPOINT_SAFETY, checkpoint_in_time
from raylm.training.run_events import reclaim_text
from raylm.training.tracking import RunLog

NOW_MS = 1_800_000_000_000


@pytest.mark.parametrize(
    "seconds_left, slowest_checkpoint_s, checkpoints",
    [
        (20.0, None, True),  # none taken yet: trying costs nothing, a cut-off checkpoint is never registered
        (20.0, 2.0, True),
        (20.0, 20.0 / CHECKPOINT_SAFETY - 0.01, True),
        (20.0, 20.0 / CHECKPOINT_SAFETY + 0.01, False),  # it would likely outlast the deadline
        (20.0, 30.0, False),
        (0.0, None, False),  # the deadline has come
        (-5.0, 1.0, False),
    ],
)
def test_a_checkpoint_is_started_only_when_the_slowest_so_far_fits_before_the_deadline(
    seconds_left, slowest_checkpoint_s, checkpoints
):
    slowest_ms = None if slowest_checkpoint_s is None else int(slowest_checkpoint_s * 1000)
    notice = ReclaimNotice(
        deadline_ms=NOW_MS + int(seconds_left * 1000), now_ms=NOW_MS, slowest_checkpoint_ms=slowest_ms
    )
    assert checkpoint_in_time(notice) is checkpoints


def _batch(targets: int, inputs: int) -> dict:
    return {"n_targets": targets, "n_input_tokens": inputs}


# One rank of a two-rank gloo group, in a process of its own (argv: rank, port, folder for its outcome).
# Step 1: no rank has a notice. Step 2: only rank 1's watcher mark has arrived, with a deadline; rank 0 has taken a
# 1.5 s checkpoint, rank 1 none it measured.
RANK_SCRIPT = """
import json, os, sys
import torch, torch.distributed as dist
from raylm.training.collectives import Ranks, agree_on_step
rank, folder, now_ms = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
# A file store, as the other two-rank tests use.
dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'rendezvous')}", rank=rank, world_size=2)
ranks = Ranks.of_this_worker(rank, 2, torch.device("cpu"))
batches = [{"n_targets": 3 + rank, "n_input_tokens": 10 + rank}, {"n_targets": 1, "n_input_tokens": 2}]
slowest_ms = 1500 if rank == 0 else None
quiet = agree_on_step(ranks, batches, None, slowest_ms)
noticed = agree_on_step(ranks, batches, now_ms + 20_000 if rank == 1 else None, slowest_ms)
with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
    json.dump({"quiet": list(quiet), "noticed": noticed._asdict()}, f, default=vars)
# No teardown: gloo's, racing the other rank's exit, aborted rank 1 now and then in CI ("terminate called without an
# active exception", SIGABRT), with a tcp:// and with a file store; what this test checks is written by now.
os._exit(0)
"""


def test_the_ranks_agree_on_a_notice_only_one_of_them_has(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(rank), str(tmp_path), str(NOW_MS)],
            env={**os.environ, "PYTHONPATH": repo},
        )
        for rank in (0, 1)
    ]
    assert [rank.wait(timeout=300) for rank in ranks] == [0, 0]
    outcomes = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for outcome in outcomes:
        # Token counts summed over the ranks: (3+1) + (4+1) targets, (10+2) + (11+2) inputs.
        assert outcome["quiet"] == [9, 25, None]
        noticed = outcome["noticed"]
        assert (noticed["targets"], noticed["inputs"]) == (9, 25)
        assert noticed["reclaim"]["deadline_ms"] == NOW_MS + 20_000
        assert noticed["reclaim"]["slowest_checkpoint_ms"] == 1500
    # One decision: both ranks hold the same notice, clock included.
    assert outcomes[0]["noticed"] == outcomes[1]["noticed"]


def test_a_world_of_one_takes_its_own_notice():
    ranks = Ranks.of_this_worker(0, 1, torch.device("cpu"))
    assert agree_on_step(ranks, [_batch(4, 9)], None, None) == (4, 9, None)
    agreed = agree_on_step(ranks, [_batch(4, 9)], NOW_MS, None)
    assert agreed.reclaim.deadline_ms == NOW_MS and agreed.reclaim.slowest_checkpoint_ms is None
    assert agreed.reclaim.now_ms > NOW_MS - 10**12  # a real clock, in ms


def test_reclaims_have_their_own_restart_budget():
    default = failure_config(LanguageModelingArgs())
    assert (default.max_failures, default.max_preemption_failures, default.preemption_grace_s) == (0, -1, 0.0)
    args = LanguageModelingArgs.from_dict({"max_failures": 2, "max_preemption_failures": 5, "preemption_grace_s": 30})
    config = failure_config(args)
    assert (config.max_failures, config.max_preemption_failures, config.preemption_grace_s) == (2, 5, 30)


def test_an_elastic_run_may_shrink_on_reclaims_alone():
    LanguageModelingArgs.from_dict({"num_workers": [1, 2]}).validate()
    with pytest.raises(ConfigError, match="max_failures and max_preemption_failures are 0"):
        LanguageModelingArgs.from_dict({"num_workers": [1, 2], "max_preemption_failures": 0}).validate()


RECLAIM = {
    "kind": "preemption",
    "global_step": 7,
    "nodes": ["4f1c2a9e0b7d"],
    "ranks": [1],
    "deadline_seconds": 18.6,
    "checkpoint_step": 7,
    "checkpoint_seconds": 2.4,
    "resumes_from_step": 7,
    "steps_repeated": 0,
}


def test_a_reclaim_is_recorded_in_the_training_log_and_the_table(tmp_path):
    run_log = RunLog(str(tmp_path), LanguageModelingArgs(), "run")
    run_log.on_event(RECLAIM)
    run_log.close()
    lines = [json.loads(line) for line in open(os.path.join(tmp_path, "training_log.jsonl"), encoding="utf-8")]
    assert lines == [RECLAIM]
    assert reclaim_text(RECLAIM) == (
        "node 4f1c2a9e: notice at step 7 (18.6 s before the deadline), checkpoint committed at step 7 "
        "in 2.4 s, 0 steps repeated"
    )
    too_late = {**RECLAIM, "checkpoint_step": None, "checkpoint_seconds": None, "resumes_from_step": 4}
    too_late["steps_repeated"] = 3
    assert reclaim_text(too_late).endswith("no checkpoint in time, resuming from step 4, 3 steps repeated")
