"""Small shared test utilities (no fixtures here: see each test module)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MNIST = Path(os.environ.get("AELIB_MNIST") or REPO.parent / "shared" / "data" / "mnist.npz")


def _load_cluster_local():
    """cluster/local.py (not a package): starts and stops local heads and fake clusters."""
    path = REPO / "cluster" / "local.py"
    spec = importlib.util.spec_from_file_location("aelib_cluster_local", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


local = _load_cluster_local()


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """A disk of `size` (a tmpfs) at the new folder `folder` for the block, to fill up:
    root only, the test is skipped elsewhere. Unmounted after (lazily: a process of
    the test's may still hold a file there). `room(folder, size)` grows it."""
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], capture_output=True)


def room(folder: Path, size: str) -> None:
    """Grows the small_disk at `folder` to `size` (space freed, for the rerun)."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)


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


_GCS_EMULATOR = """
import logging, sys
from gcp_storage_emulator.server import create_server
port, bucket, log = int(sys.argv[1]), sys.argv[2], sys.argv[3]
handler = logging.FileHandler(log)  # its request lines: '"GET /path?query HTTP/1.1" 200 -'
handler.setFormatter(logging.Formatter("%(message)s"))
logger = logging.getLogger("gcp_storage_emulator.server")
logger.addHandler(handler)
logger.setLevel(logging.INFO)
logger.propagate = False
create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()
"""


class GcsServer:
    """A Google Cloud Storage emulator (gcp-storage-emulator, in memory) on 127.0.0.1, in
    a process of its own (a server thread here could wait on the GIL that a pyarrow call
    of this process holds while it waits for the server), with one bucket. pyarrow's own
    GCS client reaches it through a URI: `uri("x/y")` is gs://anonymous@BUCKET/x/y with
    the endpoint in its query, so the job and its Ray workers need no variables; `fs` is
    a GcsFileSystem on it. `requests` lists the requests served since `clear()` as
    (method, path, query), from the emulator's log of its request lines."""

    def __init__(self, bucket: str, log: Path):
        import socket

        import pyarrow.fs as pafs

        # A free port for the emulator, which takes one: drawn as a Ray head's are, where
        # no other process's bind to port 0 gets it before the emulator binds it.
        port = local._free_ports(["gcs"])["gcs"]
        self.log, self.seen = log, 0
        cmd = [sys.executable, "-c", _GCS_EMULATOR, str(port), bucket, str(log)]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the GCS emulator did not start on port {port}")
            time.sleep(0.1)
        self.bucket = bucket
        self.query = f"?endpoint_override=127.0.0.1:{port}&scheme=http"
        self.fs = pafs.GcsFileSystem(
            anonymous=True, scheme="http", endpoint_override=f"127.0.0.1:{port}"
        )

    def uri(self, key: str) -> str:
        return f"gs://anonymous@{self.bucket}/{key}{self.query}"

    def _lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def clear(self) -> None:
        self.seen = len(self._lines())

    @property
    def requests(self) -> list[tuple[str, str, str]]:
        import urllib.parse

        found = []
        for line in self._lines()[self.seen :]:
            quoted = line.split('"')
            if len(quoted) > 2 and len(words := quoted[1].split()) == 3:
                url = urllib.parse.urlsplit(words[1])
                found.append((words[0], url.path, url.query))
        return found

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def ray_pids(ray_tmp: Path, but: tuple[str, ...] = ()) -> list[int]:
    """Processes of the Ray that a job started with RAY_TMPDIR=ray_tmp: its daemons name
    the folder on their command line; its workers, which retitle themselves ("ray::IDLE")
    and sit in process groups of their own, inherited the variable. Those whose command
    line holds one of `but` are left out."""
    marker = f"RAY_TMPDIR={ray_tmp}\0".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
            environ = (proc / "environ").read_bytes() + b"\0"
        except OSError:
            continue
        if (str(ray_tmp) in cmdline or marker in environ) and not any(b in cmdline for b in but):
            pids.append(int(proc.name))
    return pids


def daemons_missing(state_dir: Path, names: tuple[str, ...]) -> list[str]:
    """Which of Ray's daemons `names` (e.g. "raylet") no process of the cluster/local.py
    head in `state_dir` runs."""
    table = local._proc_table()
    pids = local._cluster_pids(state_dir, table)  # one read of /proc for both
    programs = {table[pid][1].split(" ", 1)[0].rsplit("/", 1)[-1] for pid in pids}
    return [name for name in names if name not in programs]


def assert_head_up(head: dict) -> None:
    """Fails the test, naming the head, if the cluster/local.py head `head` (its state,
    with "dir") has lost its GCS or raylet (the OOM killer, or a test that killed it)."""
    if missing := daemons_missing(head["dir"], ("gcs_server", "raylet")):
        pytest.fail(
            f"the tests' shared Ray head ({head['address']}) is down: no {', '.join(missing)} "
            f"process of it is left. Its logs: {head['temp_dir']}/session_latest/logs"
        )


def default_signals() -> None:
    """preexec_fn of a command a test stops with Ctrl-C: SIGINT as a terminal's shell
    gives it, handled and not blocked. A child inherits its parent's ignored signals and
    signal mask, and a pytest worker's are not always the defaults: a `python -m aelib
    train` started with SIGINT ignored keeps it ignored, as designed, and trained to its
    end (a suite run of 2026-12-06, under load)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def start_logged(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Starts `cmd` in a session of its own, its stdout and stderr going to `log`, with
    the default signals (default_signals)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=default_signals,
        )


def wait_for(ready, proc: subprocess.Popen, log: Path, timeout: float, interval: float = 0.1):
    """Polls ready() until it returns something truthy and returns that; fails the test
    if `proc` ends first. On timeout, returns ready()'s last (falsy) value."""
    deadline = time.monotonic() + timeout
    while not (value := ready()) and time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[1]} ended before the kill:\n{log.read_text()[-4000:]}")
        time.sleep(interval)
    return value


def signal_when(cmd, env, log: Path, ready, sig, group=False, interval=0.1, timeout=240):
    """Starts `cmd` (start_logged), waits until ready() returns something truthy
    (wait_for), then sends it `sig`, or with `group` sends `sig` to its whole process
    group as `timeout`, Slurm or systemd do. Returns (what ready() returned, the exit
    status, the log's text)."""
    proc = start_logged(cmd, env, log)
    try:
        seen = wait_for(ready, proc, log, timeout=timeout, interval=interval)
        if group:
            os.killpg(proc.pid, sig)  # (its own session: its process group is its pid)
        else:
            proc.send_signal(sig)
        status = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return seen, status, log.read_text()


def wait_no_ray(ray_tmp: Path, timeout: float = 90.0, but: tuple[str, ...] = ()) -> list[int]:
    """Waits until no process of the Ray under `ray_tmp` runs (but those whose command
    line holds one of `but`); returns the PIDs still running after `timeout` seconds.
    (90 s: CI runs two test files at once, and the tests there took up to twice as long
    as alone; the wait ends as soon as they are gone.)"""
    deadline = time.monotonic() + timeout
    while (left := ray_pids(ray_tmp, but)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def ray_left(ray_tmp: Path, timeout: float = 90.0, but: tuple[str, ...] = ()) -> list[str]:
    """wait_no_ray's PIDs as "PID (state) command line": which process outlived its
    run, in the failure's text."""
    described = []
    for pid in wait_no_ray(ray_tmp, timeout, but):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue  # (ended since)
        state = stat.rsplit(")", 1)[1].split()[0]
        described.append(f"{pid} ({state}) {cmdline.decode(errors='replace')[:200]}")
    return described


def kill_ray(ray_tmp: Path) -> None:
    """SIGKILLs every process of the Ray started under `ray_tmp` (and only those) and
    removes the folder."""
    for pid in ray_pids(ray_tmp):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(ray_tmp, ignore_errors=True)
