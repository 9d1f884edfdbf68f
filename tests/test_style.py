"""ruff settles style in review's place: raylm/, tests/ and bench/ pass its lint and format (pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKED = ["raylm", "tests", "bench"]


def _ruff(*arguments: str) -> subprocess.CompletedProcess:
    # The ruff beside this interpreter (the test extra installs it), so CI checks with the pinned version.
    ruff = Path(sys.executable).with_name("ruff")
    command = [str(ruff)] if ruff.exists() else [shutil.which("ruff") or "ruff"]
    return subprocess.run([*command, *arguments, *CHECKED], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_ruff_check_is_clean():
    done = _ruff("check", "--no-cache")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_ruff_format_is_clean():
    done = _ruff("format", "--check", "--no-cache")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "already formatted" in done.stdout, "ruff checked no file"
