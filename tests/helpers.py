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


def without_tensorflow(env: dict[str, str], root: Path) -> dict[str, str]:
    """`env` with Keras on JAX and a `tensorflow` package under `root` that raises
    ImportError, first on PYTHONPATH (Ray's workers inherit it): a machine like the
    lent GPU ones, which have JAX but no TensorFlow."""
    blocker = root / "no_tf" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("no TensorFlow here (test)")\n')
    path = os.pathsep.join(filter(None, [str(blocker.parent), env.get("PYTHONPATH")]))
    return {**env, "PYTHONPATH": path, "KERAS_BACKEND": "jax"}
