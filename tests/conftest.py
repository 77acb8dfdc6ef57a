"""Test-wide defaults: MNIST by path (never downloaded), quiet TensorFlow; the
`ray_tmp` fixture for tests that start a job with its own Ray, and `shared_ray`
for tests whose jobs connect to a running one."""

import os
import secrets
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import MNIST, REPO, kill_ray

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def shared_ray():
    """A Ray head of the tests' own (`ray start --head`, 2 CPUs, no GPU, token auth as
    on the cluster) that jobs connect to, as `ray submit` runs them on a cluster: a
    test whose subject is not the job's own Ray then spends no time starting and
    stopping one (5-9 s here). Returns the variables a driver needs to reach it.

    Its workers have the environment the head started with (as on a cluster), not the
    driver's: a test that must hand its workers a variable starts its own Ray. Every
    port is a free one, never Ray's fixed defaults (client server 10001, agent 52365),
    so another Ray on the machine does not clash with it."""
    temp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's unix sockets
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    port = _free_port()
    client = {
        "RAY_ADDRESS": f"127.0.0.1:{port}",
        # Explicit: Ray 2.60 asks a driver for a token only in this mode, and a head
        # started without it turns token auth on anyway once ~/.ray has a token.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
    }
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(client, TF_CPP_MIN_LOG_LEVEL="2")
    del env["RAY_ADDRESS"]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["RAY_TMPDIR"] = str(temp)  # its workers inherit it: ray_pids finds them all
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={port}"]
    cmd += ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp}"]
    cmd += [f"--ray-client-server-port={_free_port()}"]
    cmd += [f"--dashboard-agent-listen-port={_free_port()}"]
    cmd += ["--object-store-memory=1000000000", "--include-dashboard=false"]
    cmd += ["--disable-usage-stats"]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        yield client
    finally:
        kill_ray(temp)
