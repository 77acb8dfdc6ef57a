"""What the benchmark scripts share: the variants' names and the argparse check of a
count. Standard library only: a script's --help and its flag errors come before any
import of Keras or Ray."""

from __future__ import annotations

import argparse
import os
import subprocess

# aelib.list_models(), without importing Keras (tests/test_bench_cli.py checks they agree).
VARIANTS = ("dense", "sparse", "deep", "conv", "denoise", "seq2seq", "vae")


def at_least_one(text: str) -> int:
    """argparse type of a count (rounds, trials, epochs): a whole number >= 1 (0 rounds
    left nothing to take the median of: a StatisticsError traceback after the work)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number >= 1. Received: {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1. Received: {text}")
    return value


def given_file(parser: argparse.ArgumentParser, flag: str, path: str | None, what: str) -> None:
    """A usage error, before any work, where `flag` names no file: aelib's or Keras's
    traceback came after the work (the model trained, the images written) before."""
    if path and not os.path.isfile(path):
        parser.error(f"{flag} {path}: no such file ({what})")


def code_version() -> str | None:
    """The commit of the checkout the benchmark ran from, with "+changes" where a tracked
    Python file or pyproject.toml differed from it (not the results or docs written
    meanwhile), or None outside a git checkout: which code made a result (a fix that
    changes training makes the rows before it another code's)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        changed = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                "*.py",
                "pyproject.toml",
            ],
            cwd=root,
            capture_output=True,
            text=True,
        )
    except OSError:  # (no git)
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if changed.stdout.strip() else "")
