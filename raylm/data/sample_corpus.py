"""A sample corpus available offline: the docstrings of Python's standard library, one paragraph per line."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
import warnings

MODULES = (
    "argparse",
    "asyncio.base_events",
    "asyncio.streams",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "configparser",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email.message",
    "enum",
    "fractions",
    "functools",
    "gzip",
    "heapq",
    "hmac",
    "http.client",
    "http.server",
    "imaplib",
    "inspect",
    "ipaddress",
    "json",
    "logging",
    "mailbox",
    "math",
    "multiprocessing.pool",
    "os",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "re",
    "shutil",
    "smtplib",
    "socket",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "typing",
    "unittest.case",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "xml.dom.minidom",
    "zipfile",
)


def docstring_paragraphs(modules=MODULES) -> list[str]:
    """Every docstring paragraph of the modules and their members, whitespace-joined, de-duplicated, in a fixed order.

    Read in a fresh interpreter without site-packages (python -I -S): libraries replace members of these
    modules once imported (typing_extensions replaces typing's private helpers, torch some of inspect's
    functions), so read here the corpus would depend on what the caller had imported first.
    """
    program = (
        "import importlib.util, json, sys; "
        "spec = importlib.util.spec_from_file_location('sample_corpus', sys.argv[1]); "
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
        "print(json.dumps(module.read_paragraphs(sys.argv[2:])))"
    )
    completed = subprocess.run(
        [sys.executable, "-I", "-S", "-c", program, os.path.abspath(__file__), *modules],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(completed.stdout)


def read_paragraphs(modules) -> list[str]:
    """docstring_paragraphs, read in this interpreter."""
    seen, paragraphs = set(), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in modules:
            module = importlib.import_module(module_name)
            objects = [module] + [
                value
                for _, value in sorted(vars(module).items())
                if inspect.isclass(value) or inspect.isfunction(value)
            ]
            for obj in objects:
                for paragraph in (inspect.getdoc(obj) or "").split("\n\n"):
                    text = " ".join(paragraph.split())
                    if len(text) >= 20 and text not in seen:
                        seen.add(text)
                        paragraphs.append(text)
    return paragraphs


def write_sample_corpus(folder: str, test_fraction: float = 0.1) -> tuple[str, str]:
    """Write train.txt and test.txt (every 1/test_fraction-th paragraph held out) and return their paths."""
    os.makedirs(folder, exist_ok=True)
    paragraphs = docstring_paragraphs()
    every = max(2, round(1 / test_fraction))
    train = [p for i, p in enumerate(paragraphs) if i % every]
    test = [p for i, p in enumerate(paragraphs) if not i % every]
    paths = os.path.join(folder, "train.txt"), os.path.join(folder, "test.txt")
    for path, lines in zip(paths, (train, test)):
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return paths


def main(argv=None) -> int:
    """`python -m raylm.data.sample_corpus [FOLDER]`: FOLDER/train.txt and FOLDER/test.txt (default data/, what
    jobs/*.yaml read)."""
    import argparse

    from raylm.console import write_result

    parser = argparse.ArgumentParser(
        prog="python -m raylm.data.sample_corpus",
        description="Write a sample corpus (Python's docstrings, one paragraph per line) as train.txt and test.txt.",
    )
    parser.add_argument(
        "folder",
        nargs="?",
        default="data",
        help="where to write train.txt and test.txt (default: data, which the shipped jobs read)",
    )
    options = parser.parse_args(argv)
    for path in write_sample_corpus(options.folder):
        write_result(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
