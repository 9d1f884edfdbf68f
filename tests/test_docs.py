"""The README and docs/ say what is true: their commands run, and what they describe is generated or checked.

Every fenced shell or Python block in README.md and docs/*.md carries a marker on the line before it:
`<!-- runnable -->` (run here, as written, in a folder that holds only the repository's jobs/, as a fresh
clone would), `<!-- runnable: ci -->` (the test command, which .ci/run runs), `<!-- runnable: slow ... -->`
(runs on a fresh clone but installs or trains: checked for syntax, and its raylm jobs resolve), or
`<!-- not runnable here: <why> -->`. docs/options.md must be what the fields generate, and `--help` must
say each field's help.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from raylm.config import LanguageModelingArgs, field_help
from raylm.config.options import SIMPLE_TRANSFORMERS_DEFAULTS, options_markdown, sections

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCUMENTS = [README, *sorted((REPO / "docs").glob("*.md"))]
SEED_PAGE = REPO / "tests" / "data" / "lm-minimal-start.md"
MARKER = re.compile(r"^<!-- (runnable|runnable: ci|runnable: slow\b.*|not runnable here: .+) -->$")
COMMAND_SECONDS = 120


@dataclass(frozen=True)
class Block:
    document: Path
    line: int  # of the opening fence, counted from 1
    language: str
    marker: str  # what the comment before the fence says; "" when there is none
    code: str

    @property
    def name(self) -> str:
        return f"{self.document.relative_to(REPO)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, number = [], 0
    while number < len(lines):
        fence = re.match(r"^```(\w*)$", lines[number])
        if not fence:
            number += 1
            continue
        end = lines.index("```", number + 1)
        before = next((line for line in reversed(lines[:number]) if line.strip()), "")
        marker = MARKER.match(before)
        code = "\n".join(lines[number + 1 : end]) + "\n"
        blocks.append(Block(path, number + 1, fence.group(1), marker.group(1) if marker else "", code))
        number = end + 1
    return blocks


BLOCKS = [block for path in DOCUMENTS for block in fenced_blocks(path)]
RUNNABLE = [block for block in BLOCKS if block.language in ("bash", "python") and block.marker == "runnable"]


def readme_block(marker_start: str, language: str = "bash") -> Block:
    [block] = [
        b for b in BLOCKS if b.document == README and b.language == language and b.marker.startswith(marker_start)
    ]
    return block


def shell_lines(code: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments and blank lines left out."""
    joined = code.replace("\\\n", " ")
    return [line.split(" # ")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture
def fresh_clone(tmp_path):
    """A working folder as a fresh clone has it for the README's relative paths (jobs/, no data/ or outputs/),
    and `python` on PATH meaning this interpreter, importing this checkout's raylm."""
    shutil.copytree(REPO / "jobs", tmp_path / "jobs")
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    # A script, not a symlink: a symlinked venv interpreter would not find its venv.
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    return tmp_path, env


def run_shell(code: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_SECONDS,
    )


# --- the blocks -------------------------------------------------------------------------------------------------


def test_the_documents_were_read():
    assert len(DOCUMENTS) >= 10 and {p.name for p in DOCUMENTS} >= {"README.md", "options.md", "troubleshooting.md"}
    assert len([b for b in BLOCKS if b.document == README]) >= 8
    assert len(RUNNABLE) >= 3, "no block is marked runnable: the commands below would pass by checking nothing"


def test_every_shell_and_python_block_says_whether_it_runs():
    unmarked = [b.name for b in BLOCKS if b.language in ("bash", "python", "sh", "shell") and not b.marker]
    assert not unmarked, f"add a marker line before each of these blocks (see this module's docstring): {unmarked}"
    assert not [b.name for b in BLOCKS if b.language in ("sh", "shell")], "write ```bash, as the other blocks do"


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.name)
def test_a_runnable_block_runs_as_written_on_a_fresh_clone(block, fresh_clone):
    cwd, env = fresh_clone
    if block.language == "python":
        result = subprocess.run(
            [sys.executable, "-c", block.code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
        )
    else:
        result = run_shell(block.code, cwd, env)
    assert result.returncode == 0, f"{block.name} failed:\n{block.code}\n{result.stdout[-2000:]}{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-4000:]


def test_the_sample_corpus_command_writes_the_data_the_readme_then_reads(fresh_clone):
    [block] = [b for b in RUNNABLE if b.document == README and "raylm.data.sample_corpus data" in b.code]
    cwd, env = fresh_clone
    assert run_shell(block.code, cwd, env).returncode == 0
    for name in ("train.txt", "test.txt"):
        lines = (cwd / "data" / name).read_text(encoding="utf-8").splitlines()
        assert len(lines) > 100 and all(line.strip() for line in lines), name


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.marker.startswith("runnable: slow")], ids=lambda b: b.name)
def test_a_slow_block_parses(block):
    if block.language == "python":
        compile(block.code, block.name, "exec")
    else:
        result = subprocess.run(["bash", "-n", "-c", block.code], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def raylm_commands() -> list[tuple[str, str]]:
    """(where, command) for each `python -m raylm.train` / `raylm.tune` command in any shell block, as written."""
    found = []
    for block in BLOCKS:
        if block.language != "bash":
            continue
        for line in shell_lines(block.code):
            command = re.search(r"python -m raylm\.(train|tune)\b.*", line)
            if command and "--help" not in command.group(0):
                found.append((block.name, command.group(0)))
    return found


def test_every_raylm_job_in_the_documents_resolves(fresh_clone, monkeypatch, capsys):
    """The training and sweep commands are too slow to run here; each must at least name a job that exists and
    whose keys and values are right (--print-config checks the whole job and prints it, nothing run). In this
    process, as the command line's main() would: a subprocess per command costs seconds of imports each."""
    from raylm import train, tune

    commands = raylm_commands()
    assert len(commands) >= 6 and any(" raylm.tune " in command for _, command in commands), commands
    monkeypatch.chdir(fresh_clone[0])
    for where, command in commands:
        module, *argv = shlex.split(command)[2:]
        if "--print-config" not in argv:
            argv.append("--print-config")
        status = {"raylm.train": train, "raylm.tune": tune}[module].main(argv)
        printed = capsys.readouterr()
        assert status == 0, f"{where}: {command}\n{printed.err[-3000:]}"
        assert "model_type:" in printed.out, f"{where}: {command} printed no job"


# --- the README's set-up, the CI and the seed ----------------------------------------------------------------


def ci_lines() -> list[str]:
    return (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def test_the_readme_test_command_is_what_ci_runs():
    [command] = shell_lines(readme_block("runnable: ci").code)
    lines = ci_lines()
    after_comment = lines[lines.index("# README.md's test command:") + 1]
    assert after_comment == command


def test_ci_installs_as_the_readme_set_up_command_does():
    [setup] = shell_lines(readme_block("runnable: slow (installs").code)
    installs = [step.strip() for step in setup.split("&&") if step.strip().startswith("pip install")]
    assert installs == ["pip install torch==2.13.0", 'pip install -e ".[test]"'], installs
    ci_installs = [line for line in ci_lines() if line.startswith("pip install")]
    assert ci_installs == [step.replace("pip install", "pip install -q", 1) for step in installs]


def statements(code: str) -> list[str]:
    """Each top-level statement as its syntax tree reads (layout and comments aside), imports and logging left out."""
    kept = []
    for node in ast.parse(code).body:
        text = ast.unparse(node)
        if not isinstance(node, (ast.Import, ast.ImportFrom)) and "logging" not in text and "logger" not in text:
            kept.append(ast.dump(node))
    return kept


def test_the_readme_python_is_the_seeds_code_with_only_the_import_changed():
    readme = readme_block("runnable: slow (trains a full-size GPT-2", "python").code
    snippets = re.findall(r"### (.+?)\n\n```python\n(.*?)```", SEED_PAGE.read_text(encoding="utf-8"), flags=re.S)
    [seed] = [code for title, code in snippets if title == "Training a GPT-2 model (CLM) from scratch"]
    assert "from simpletransformers.language_modeling import (" in seed
    assert readme.startswith("from raylm import LanguageModelingArgs, LanguageModelingModel\n")
    # The seed's page uses model_args without creating it; the README adds that one line.
    created = ast.dump(ast.parse("model_args = LanguageModelingArgs()").body[0])
    assert statements(readme)[0] == created
    assert statements(readme)[1:] == statements(seed) and len(statements(seed)) == 11


def test_the_readme_stays_short():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 300


# --- the option reference --------------------------------------------------------------------------------------


def test_docs_options_md_is_what_the_fields_generate():
    generated = options_markdown()
    on_disk = (REPO / "docs" / "options.md").read_text(encoding="utf-8")
    assert on_disk == generated, "docs/options.md is stale: python -m raylm.config.options > docs/options.md"


def test_docs_options_md_has_one_row_per_field_with_its_help():
    text = options_markdown()
    fields = [f.name for f in dataclasses.fields(LanguageModelingArgs)]
    assert len(fields) > 90
    assert [name for _, names in sections() for name in names] == fields, "a field outside a `# --- ` section"
    for name in fields:
        [row] = [line for line in text.splitlines() if line.startswith(f"| `{name}` |")]
        assert field_help()[name].replace("<", "&lt;").replace("|", "\\|") in row, name


def test_simple_transformers_defaults_are_for_real_fields_and_shown_where_they_differ():
    fields = set(field_help())
    assert set(SIMPLE_TRANSFORMERS_DEFAULTS) <= fields
    rows = {line.split(" | ")[0][3:-1]: line for line in options_markdown().splitlines() if line.startswith("| `")}
    assert "| `100` |" in rows["eval_batch_size"] and '| `"cache_dir/"` |' in rows["cache_dir"]
    assert "*raylm only*" in rows["num_workers"] and "*raylm only*" not in rows["learning_rate"]
    assert rows["learning_rate"].split(" | ")[3] == "", "a default equal to Simple Transformers' is not repeated"


def test_help_says_each_fields_help_from_the_same_source():
    result = subprocess.run(
        [sys.executable, "-m", "raylm.train", "--help"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=COMMAND_SECONDS,
    )
    assert result.returncode == 0, result.stderr
    helps = field_help()
    assert len(helps) > 90
    missing = [name for name, text in helps.items() if f"  {name}: {text}\n" not in result.stdout]
    assert not missing, missing


# --- what the documents name ----------------------------------------------------------------------------------


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors: a heading lowercased, punctuation but hyphens dropped, spaces made hyphens."""
    headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_every_link_between_the_documents_leads_somewhere():
    checked = 0
    for document in DOCUMENTS:
        for target in re.findall(r"\]\(([^)\s]+)\)", document.read_text(encoding="utf-8")):
            if re.match(r"https?://", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (document.parent / path).resolve() if path else document
            assert resolved.exists(), f"{document.name} links to {target}, which does not exist"
            if anchor:
                assert anchor in heading_anchors(resolved), f"{document.name} links to {target}: no such heading"
            checked += 1
    assert checked > 30


def test_every_file_the_documents_name_exists():
    named = set()
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        named |= set(re.findall(r"(?<![\w/.])((?:raylm|bench|jobs|tests|docs)/[\w/.-]*\w\.(?:py|yaml|md))", text))
        named |= {name for name in ("cluster.yaml", ".ci/run") if name in text}
    assert len(named) > 30, named
    assert not sorted(name for name in named if not (REPO / name).exists())
