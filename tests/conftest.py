"""Test-wide defaults: MNIST by path (never downloaded), quiet TensorFlow; the
`ray_tmp` fixture for tests that start a job with its own Ray, and `shared_ray`
for tests whose jobs connect to a running one."""

import os
import tempfile
from pathlib import Path

import pytest

from helpers import MNIST, kill_ray, local

os.environ.setdefault("AELIB_MNIST", str(MNIST))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture()
def ray_tmp():
    """A RAY_TMPDIR of the test's own; afterwards, every process of the Ray started
    under it is killed and the folder removed."""
    # Short path: Ray's unix sockets live under it (sun_path is ~107 bytes).
    path = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    yield path
    kill_ray(path)


@pytest.fixture(scope="session")
def shared_ray():
    """A Ray head of the tests' own that jobs connect to, as `ray submit` runs them on a
    cluster: a test whose subject is not the job's own Ray then spends no time starting
    and stopping one (5-9 s here). It is cluster/local.py's plain head (as in
    test_cluster's Jobs path): 2 CPUs, no GPU, token auth, free ports only (never Ray's
    defaults), stopped by killing its own processes. Returns the variables a driver
    needs to reach it.

    Its workers have the environment the head started with (as on a cluster), not the
    driver's: a test that must hand its workers a variable starts its own Ray."""
    state_dir = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: unix socket paths
    try:
        state = local.start(None, state_dir, head_cpus=2, head_object_store_bytes=10**9)
        yield local.client_env(state, {})
    finally:
        local.stop(state_dir, remove=True)
