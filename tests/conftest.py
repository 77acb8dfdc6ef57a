"""Test-wide defaults: MNIST by path (never downloaded), quiet TensorFlow; the
`ray_tmp` fixture for tests that start a job with its own Ray, and `shared_ray`
for tests whose jobs connect to a running one."""

import os
import tempfile
from pathlib import Path

import pytest

from helpers import MNIST, assert_head_up, kill_ray, local

os.environ.setdefault("AELIB_MNIST", str(MNIST))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The Rays that tests start (a job's own ray.init, in this process or a subprocess) have
# their workers bind ports the kernel draws, as cluster/local.py's heads do: by default
# each gives out ports of one range (10002-19999), checking a port free before its worker
# binds it, so two test processes' Rays could hand out the same one (Ray's own knob for
# its tests; it changes nothing else).
os.environ.setdefault("RAY_USE_RANDOM_PORTS", "1")


@pytest.fixture(scope="session", autouse=True)
def _default_storage_in_tmp(tmp_path_factory):
    """The sweep's default --storage-path ($AELIB_STORAGE_PATH/sweeps, else ~/ray_results)
    in a folder of the tests': a test that parses the sweep's flags without one probes
    that folder for writing, and made ~/ray_results (tests that read the variable set
    their own)."""
    if "AELIB_STORAGE_PATH" not in os.environ:
        os.environ["AELIB_STORAGE_PATH"] = str(tmp_path_factory.mktemp("storage"))
    yield


@pytest.fixture()
def ray_tmp():
    """A RAY_TMPDIR of the test's own; afterwards, every process of the Ray started
    under it is killed and the folder removed."""
    # Short path: Ray's unix sockets live under it (sun_path is ~107 bytes).
    path = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    yield path
    kill_ray(path)


@pytest.fixture(scope="session")
def shared_head():
    """A Ray head of the tests' own that jobs connect to, as `ray submit` runs them on a
    cluster: a test whose subject is not the job's own Ray then spends no time starting
    and stopping one (5-9 s here). It is cluster/local.py's plain head (the head of the
    Jobs path too): 2 CPUs, no GPU, a dashboard for the Job API, token auth, free ports
    only (never Ray's defaults), stopped by killing its own processes. Returns
    local.start's state (address, dashboard URL, token path, temp dir) and its "dir".

    Its workers have the environment the head started with (as on a cluster), not the
    driver's: a test that must hand its workers a variable starts its own Ray."""
    state_dir = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: unix socket paths
    try:
        yield local.start(None, state_dir, head_cpus=2, head_object_store_bytes=10**9) | {
            "dir": state_dir
        }
    finally:
        local.stop(state_dir, remove=True)
        assert not local._cluster_pids(state_dir), "processes of the shared head survived stop"


@pytest.fixture(scope="session")
def shared_ray(shared_head):
    """The variables a driver needs to reach the shared head."""
    return local.client_env(shared_head, {})


@pytest.fixture(autouse=True)
def _shared_head_is_up(request):
    """Fails a test that uses the shared head at its start, naming the head, if the head's
    GCS or raylet is gone (the OOM killer, or a test that killed it): otherwise the test
    would fail with a connection error that names the test, and so would every later one.
    (A module-scoped fixture on the head is set up before this runs: it checks itself.)"""
    if "shared_head" in request.fixturenames:
        assert_head_up(request.getfixturevalue("shared_head"))
