"""Test-wide defaults: MNIST by path (never downloaded), quiet TensorFlow; the
`ray_tmp` fixture for tests that start a job with its own Ray."""

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from helpers import MNIST, ray_pids

os.environ.setdefault("AELIB_MNIST", str(MNIST))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture()
def ray_tmp():
    """A RAY_TMPDIR of the test's own; afterwards, every process of the Ray started
    under it is killed and the folder removed."""
    # Short path: Ray's unix sockets live under it (sun_path is ~107 bytes).
    path = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    yield path
    for pid in ray_pids(path):  # only processes of this test's own Ray
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(path, ignore_errors=True)
