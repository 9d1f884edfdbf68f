"""Stopping what a test started in a process session of its own (Popen(start_new_session=True)): by its group, never by
name."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_process_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the session `process` leads, then SIGKILL to all of it once `process` has not exited within
    `grace_s`."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            pass
    # Members of the group may outlive its leader.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
