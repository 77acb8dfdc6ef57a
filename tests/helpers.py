"""Small shared test utilities (no fixtures here: see each test module)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MNIST = Path(os.environ.get("AELIB_MNIST") or REPO.parent / "shared" / "data" / "mnist.npz")


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child python: quiet TF, MNIST by path."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "AELIB_MNIST": str(MNIST)}
    env.update(extra)
    return env
