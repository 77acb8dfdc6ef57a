"""jobs/sweep.py on a real local Ray: the lone-file smoke sweep over all seven
variants, resume after the driver is killed, and bad flags.

    pytest tests/test_sweep.py -x -q --durations=0

Every sweep runs as its own process. Where the test is about the sweep's own Ray
(the smoke sweep, the resume after the driver is killed, the JAX-only workers) it
has RAY_ADDRESS=local (a fresh local Ray, never a cluster another process started
on this machine) and RAY_TMPDIR set to a folder of the test's own, so the test can
check that no Ray process of its own is left behind; the others connect to the
tests' shared head (`shared_ray` in conftest.py), as `ray submit` runs a sweep.
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from helpers import (
    assert_head_up,
    default_signals,
    kill_ray,
    local,
    signal_when,
    small_disk,
    start_logged,
    wait_for,
    without_tensorflow,
)
from helpers import ray_left as _ray_left
from helpers import wait_no_ray as _wait_no_ray

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "jobs" / "sweep.py"
MNIST = Path(os.environ.get("AELIB_MNIST") or "/work/shared/data/mnist.npz")
VARIANTS = ["dense", "sparse", "deep", "conv", "denoise", "seq2seq", "vae"]

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not MNIST.is_file(), reason=f"MNIST not found at {MNIST}"),
]


def _env(ray_tmp: Path | None, shared_ray: dict | None = None) -> dict[str, str]:
    """A sweep's environment: a local Ray of its own under `ray_tmp`, or (given
    `shared_ray`) the tests' shared head (conftest.py), where the test is not about the
    sweep's own Ray (its start, its end, its processes)."""
    env = dict(os.environ)
    env["RAY_ADDRESS"] = "local"
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = str(ray_tmp)
    env.update(shared_ray or {})
    # aelib as if installed: the copied sweep.py must not find it next to itself.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def _load_sweep_module():
    spec = importlib.util.spec_from_file_location("sweep_under_test", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------ lone-file smoke sweep


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Runs the smoke sweep once, from a copy of sweep.py alone in an empty folder."""
    lone = tmp_path_factory.mktemp("lone")
    shutil.copy(SWEEP, lone / "sweep.py")
    assert [p.name for p in lone.iterdir()] == ["sweep.py"]
    store = tmp_path_factory.mktemp("store")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    scratch = tmp_path_factory.mktemp("scratch")  # the sweep's TMPDIR (Ray's is RAY_TMPDIR)
    cmd = [sys.executable, "sweep.py", "--smoke-test", "--data", str(MNIST)]
    cmd += ["--storage-path", str(store), "--name", "smoke"]
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd,
            cwd=lone,
            env={**_env(ray_tmp), "TMPDIR": str(scratch)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        seconds = time.monotonic() - start
        leftover = _ray_left(ray_tmp)
        worker_logs = [p.name for p in ray_tmp.glob("**/logs/worker-*.out")]
    finally:
        kill_ray(ray_tmp)  # only this test's own Ray processes
    exp = store / "smoke"
    return {
        "proc": proc,
        "exp": exp,
        "seconds": seconds,
        "leftover": leftover,
        "tmp": scratch,
        "worker_logs": worker_logs,
    }


def test_smoke_sweep_exits_0_from_a_lone_copy(smoke):
    proc = smoke["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for variant in VARIANTS:  # the job prints where the best of each variant went
        assert f"best {variant}" in proc.stdout
    assert str(smoke["exp"] / "trials.csv") in proc.stdout
    # A trial worker trains one model after another: TensorFlow warned of retracing.
    assert "triggered tf.function retracing" not in proc.stdout + proc.stderr
    # where trials ran, and on what (no GPU here: a GPU machine says "on GPU (<name>)")
    assert f"trials per node: {socket.gethostname()} (" in proc.stdout
    with open(smoke["exp"] / "trials.csv", newline="") as f:
        devices = {row["device"] for row in csv.DictReader(f)}
    assert len(devices) == 1, devices  # "CPU" here, "GPU (<name>)" on a GPU machine
    assert devices == {"CPU"} or devices.pop().startswith("GPU ("), devices
    said = r"trials per node: .+ \(.+\) 7 \(7 on (CPU|GPU \(.+\))\)\n"
    assert re.search(said, proc.stdout), proc.stdout[-2000:]
    assert smoke["leftover"] == [], "Ray processes outlived the sweep"
    print(f"smoke sweep wall time: {smoke['seconds']:.0f}s")


def test_smoke_sweep_keeps_ashas_rung_scores_with_its_state(smoke):
    """What --resume gives back to ASHA (RungsKept; see the test below): Tune's newest
    callback state holds each variant's score at the first rung, one trial each here."""
    import pickle

    assert smoke["proc"].returncode == 0
    states = sorted(smoke["exp"].glob("callback-states-*.pkl"))
    assert states, sorted(p.name for p in smoke["exp"].iterdir())
    with open(states[-1], "rb") as f:
        kept = [s for s in pickle.load(f).values() if s and "rungs" in s]
    assert len(kept) == 1 and sorted(kept[0]["rungs"]) == sorted(VARIANTS), kept
    for variant, brackets in kept[0]["rungs"].items():
        milestone, scores = brackets[0][-1]  # (rungs are kept last one first)
        assert milestone == 1 and len(scores) == 1, (variant, brackets)


def test_smoke_sweep_leaves_no_checkpoint_staging_behind(smoke):
    # Trials stage each checkpoint in TMPDIR; Tune ends them inside tune.report, so
    # these folders are deleted by later trials and by the driver, not by the trial.
    assert smoke["proc"].returncode == 0
    assert sorted(p.name for p in smoke["tmp"].glob("aelib-*")) == []


def test_result_files_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """trials.csv, best/ and the report were written in place: a driver stopped while it
    wrote them left half a file (a best model the denoise job could not read)."""
    sweep = _load_sweep_module()
    target = tmp_path / "trials.csv"
    target.write_text("the last run's table")
    with pytest.raises(KeyboardInterrupt), sweep._replaced(target) as tmp:
        tmp.write_text("half a ta")
        raise KeyboardInterrupt
    assert target.read_text() == "the last run's table"
    with sweep._replaced(target) as tmp:
        assert tmp != target and tmp.parent == target.parent  # (a rename: one file system)
        tmp.write_text("this run's table")
    assert target.read_text() == "this run's table"
    assert [p.name for p in tmp_path.iterdir()] == ["trials.csv"]
    (tmp_path / ".trials.4194304.tmp.csv").write_text("a killed driver's")  # (no such PID)
    with sweep._replaced(target) as tmp:
        tmp.write_text("the next run's table")
    assert [p.name for p in tmp_path.iterdir()] == ["trials.csv"]
    # The report is written that way: stopped while it writes, the last one stays whole.
    args = sweep.parse_args(["--data", str(MNIST), "--models", "dense", "--no-figures"])
    digits = np.zeros((4, 28, 28), np.uint8)
    arrays = ((digits, np.zeros(4)), (digits, np.zeros(4)))
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.md").write_text("the last run's report")
    write_text = Path.write_text

    def stopped_halfway(self, text, *args, **kwargs):
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", stopped_halfway)
    with pytest.raises(KeyboardInterrupt):
        sweep.write_report({}, [], args, arrays, tmp_path)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "report").iterdir()] == ["report.md"]
    assert (tmp_path / "report" / "report.md").read_text() == "the last run's report"


def test_checkpoint_staging_of_ended_processes_is_removed(tmp_path, monkeypatch):
    """What _staging_dir leaves when Tune ends a trial inside tune.report (its actor is
    killed) is removed by the next trial on the node, or by the driver at the end."""
    sweep = _load_sweep_module()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('s', {str(SWEEP)!r}); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "print(m._staging_dir('ckpt'))"
    )
    env = {**_env(tmp_path), "TMPDIR": str(tmp_path)}
    ended = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    dead = Path(ended.stdout.strip())
    assert dead.parent == tmp_path and dead.is_dir()  # its process ended without deleting it
    first = Path(sweep._staging_dir("ckpt"))  # this (live) process's own
    assert not dead.exists()
    second = Path(sweep._staging_dir("resume"))
    assert not first.exists() and second.is_dir()  # its earlier one: that report returned
    other = tmp_path / "aelib-ckpt-pid1-keep"  # a live process's (pid 1 never ends)
    other.mkdir()
    sweep.remove_stale_staging()
    assert other.is_dir() and second.is_dir()


def test_smoke_sweep_best_models_reload(smoke):
    import aelib

    best = smoke["exp"] / "best"
    assert sorted(p.stem for p in best.glob("*.keras")) == sorted(VARIANTS)
    for variant in VARIANTS:
        model = aelib.load(best / f"{variant}.keras")
        assert model.name == variant
        info = aelib.read_info(best / f"{variant}.keras")
        assert info["train_config"]["model"] == variant
        assert info["train_config"]["epochs"] == 1 and info["train_config"]["limit"] == 600
        assert info["metrics"]["test_images"] == 200
        record = json.loads((best / f"{variant}.json").read_text())
        assert record["model"] == variant and record["status"] == "finished"
        assert record["test_bce"] == pytest.approx(info["metrics"]["test_bce"])
        # its best config is what the model was built with
        for key, value in record["hparams"].items():
            if key in ("learning_rate", "batch_size", "noise_factor"):
                assert info["train_config"][key] == pytest.approx(value)
            else:
                assert info["train_config"]["model_options"][key] == value
        n = 4
        x = aelib.data.prepare(aelib.data.load_mnist(MNIST)[1][0][:n], model.input_kind)
        out = model.autoencoder.predict(x, verbose=0)
        assert out.shape == x.shape


def test_smoke_sweep_trial_table(smoke):
    import pandas as pd

    exp = smoke["exp"]
    with open(exp / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["model"] for r in rows) == sorted(VARIANTS)  # one trial each
    # created heaviest first (trial ids count up in the grid's order), as the driver asks
    created = [r["model"] for r in sorted(rows, key=lambda r: r["trial_id"])]
    assert created == _load_sweep_module().heaviest_first(VARIANTS) != VARIANTS, created
    for row in rows:
        assert row["status"] == "finished", row
        assert float(row["val_loss"]) > 0 and float(row["test_psnr"]) > 0
        assert row["node_id"] and row["hostname"] and row["node_ip"]
        assert Path(row["path"]).is_dir()
    denoise = next(r for r in rows if r["model"] == "denoise")
    assert float(denoise["val_psnr"]) > 0 and float(denoise["val_ssim"]) > -1
    assert denoise["hp_noise_factor"] and denoise["hp_depth"]
    # Trained at its sampled noise, scored at aelib's default 0.5, as every denoise trial:
    # its noisy inputs' PSNR/SSIM are those of the test digits (smoke: the first 200)
    # with noise 0.5 (seed 0 + 2, the test split's), computed here independently.
    assert abs(float(denoise["hp_noise_factor"]) - 0.5) > 0.01  # (else this shows nothing)
    from aelib import data, metrics

    (_, _), (x_test, _) = data.load_mnist(MNIST)
    clean = data.prepare(x_test[:200], "image")
    noisy = data.add_noise(clean, 0.5, seed=2)
    assert float(denoise["noisy_psnr"]) == pytest.approx(metrics.psnr(clean, noisy).mean())
    assert float(denoise["noisy_ssim"]) == pytest.approx(metrics.ssim(clean, noisy).mean())
    sparse = next(r for r in rows if r["model"] == "sparse")
    assert "hp_l1" not in sparse  # not searched: its val_loss includes the L1 penalty
    assert float(sparse["code_mean"]) > 0
    report = (exp / "report" / "report.md").read_text()
    assert "validated and tested at noise factor 0.5, whatever noise it trained at" in report
    assert float(denoise["eval_noise_factor"]) == 0.5
    assert "| noisy_ssim |" in report and "| code_active_fraction |" in report
    # denoise's scores are marked as of noisy inputs, at the noise they were scored at (its
    # row sat unmarked among the reconstructions, and the printed line gave only the
    # noise_factor it trained at); the variants' tables give dB to 2 places, as that one
    assert f"| denoise (noisy inputs) | {float(denoise['val_loss']):.4f} |" in report
    assert "denoise's test columns score another task" in report
    assert f"noisy inputs themselves score test_psnr {float(denoise['noisy_psnr']):.2f}" in report
    assert f"| test_psnr | {float(denoise['test_psnr']):.2f} |" in report
    assert (
        f"test_psnr {float(denoise['test_psnr']):.2f} (noisy inputs at 0.5)" in smoke["proc"].stdout
    )
    table = pd.read_parquet(exp / "trials.parquet")
    assert len(table) == len(rows) and set(table["model"]) == set(VARIANTS)
    # every variant's hyperparameters together after trial_id and model
    hp = [c for c in table.columns if c.startswith("hp_")]
    assert list(table.columns[: 2 + len(hp)]) == ["trial_id", "model", *hp], list(table.columns)


def test_the_trial_tables_columns_keep_their_kinds():
    """Ints beside blanks stay ints, floats stay floats also where every value is whole
    (a pinned --set vae.learning_rate=10000.0 made the column Int64), and the variants'
    hyperparameters come together after trial_id and model."""
    rows = [
        {"trial_id": "a", "model": "vae", "hp_learning_rate": 10000.0, "path": "p"},
        {"trial_id": "b", "model": "dense", "hp_batch_size": 64, "epochs_run": 2, "path": "q"},
    ]
    table = _load_sweep_module().trial_table(rows)
    assert list(table.columns) == [
        "trial_id", "model", "hp_learning_rate", "hp_batch_size", "path", "epochs_run",
    ]  # fmt: skip
    kinds = {c: str(table[c].dtype) for c in table.columns}
    assert kinds["hp_learning_rate"] == "Float64" and kinds["hp_batch_size"] == "Int64", kinds
    assert kinds["epochs_run"] == "Int64", kinds


def test_trial_actors_get_no_runtime_env_that_keeps_them_off_prestarted_workers(monkeypatch):
    """Any runtime env keeps an actor off the workers Ray starts with the cluster, and
    Tune gives every trial actor one by default (PL_DISABLE_FORK): the sweep removes it,
    so the actor class Tune builds for a trial has an empty runtime env. (This checks
    the cause. The effect, trials on prestarted workers, was checked in the smoke run
    until 2026-12-03, when on a loaded CI machine first one and then both trials found
    the prestarted workers still starting and got new ones.)"""
    from ray.tune.execution import class_cache

    monkeypatch.setattr(class_cache, "DEFAULT_ENV_VARS", dict(class_cache.DEFAULT_ENV_VARS))
    for name in class_cache.ENV_VARS_TO_PROPAGATE:  # (AWS credentials would be passed on)
        monkeypatch.delenv(name, raising=False)
    trial = type("Trial", (), {})
    before = class_cache._ActorClassCache().get(trial)._default_options["runtime_env"]
    assert before["env_vars"], before  # Tune's default, which the sweep must remove
    _load_sweep_module()._trial_actors_on_prestarted_workers()
    after = class_cache._ActorClassCache().get(trial)._default_options["runtime_env"]
    assert not after, after  # (Ray drops empty env_vars: no runtime env at all)


def test_smoke_sweep_ray_prestarted_workers(smoke):
    """Ray started workers with the cluster (their log files carry the nil job id,
    ffffffff), which trial actors without a runtime env can take (see above)."""
    prestarted = [
        n for n in smoke["worker_logs"] if n.removesuffix(".out").split("-")[2] == "ffffffff"
    ]
    assert prestarted, smoke["worker_logs"]


def test_smoke_sweep_report_and_tensorboard(smoke):
    exp = smoke["exp"]
    report = (exp / "report" / "report.md").read_text()
    assert (exp / "report" / "compare.png").stat().st_size > 0
    images = [line.split("](", 1)[1].rstrip(")") for line in report.splitlines() if "![" in line]
    for image in images:
        assert (exp / "report" / image).is_file(), image
    for variant in VARIANTS:
        assert f"## {variant}" in report
        assert any(image.startswith(f"{variant}/") for image in images), variant
    assert "the first 600 training images" in report  # what its test metrics are of
    assert "the first 200 test images" in report
    vae = json.loads((exp / "best" / "vae.json").read_text())
    if vae["hparams"]["latent_dim"] == 2:  # the tutorial's latent plane and manifold
        assert any(image.endswith("vae_manifold.png") for image in images)
    else:  # a t-SNE map of its z_mean instead
        assert any(image.endswith("vae_latent_tsne.png") for image in images)
    # Tune's own TensorBoard logs, one trial folder per variant named after it.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(exp.glob("*/events.out.tfevents.*"))
    assert {e.parent.name.split("_")[0] for e in events} == set(VARIANTS)
    scalars = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert any(tag.endswith("val_loss") for tag in scalars), scalars


# ------------------------------------------------------------ resume


def _reports(exp: Path) -> list[dict]:
    """Every result Tune recorded for the experiment's trials, in order."""
    lines = [line for f in exp.glob("*/result.json") for line in f.read_text().splitlines()]
    return [json.loads(line) for line in lines if line.strip()]


def _finished_trials(exp: Path) -> dict[str, float]:
    """trial_id -> started_at of every trial whose final (test) result is on disk."""
    return {r["trial_id"]: r["started_at"] for r in _reports(exp) if "test_loss" in r}


def test_resume_after_driver_killed_reruns_no_finished_trial(tmp_path, ray_tmp):
    """Also: a trial whose loss turns NaN is stopped and marked while the sweep goes on."""
    models = ["dense", "sparse", "vae", "deep"]
    cmd = [sys.executable, str(SWEEP), "--data", str(MNIST), "--models", *models]
    cmd += ["--set", "deep.learning_rate=1e30"]  # Adam steps of 1e30 overflow to NaN at once
    cmd += ["--epochs", "2", "--limit", "300", "--test-limit", "100", "--num-samples", "1"]
    cmd += ["--max-concurrent", "1", "--scheduler", "fifo", "--no-figures"]
    cmd += ["--storage-path", str(tmp_path), "--name", "resumed"]
    exp = tmp_path / "resumed"
    log = tmp_path / "first-run.log"
    driver = start_logged(cmd, _env(ray_tmp), log)
    try:
        wait_for(lambda: _finished_trials(exp), driver, log, timeout=240)
        time.sleep(1.0)  # let Tune snapshot its experiment state
        before = _finished_trials(exp)
        assert before, "no trial finished within 240s"
        os.kill(driver.pid, signal.SIGKILL)  # the driver dies; its local Ray goes with it
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert len(before) < len(models), "all trials finished before the kill: nothing resumed"
    # What the killed driver's Ray left behind: its workers go within seconds, but Ray's
    # dashboard and runtime-env agents were seen outliving it by 40 s and more.
    left = _wait_no_ray(ray_tmp, timeout=5)
    for pid in left:
        os.kill(pid, signal.SIGKILL)

    resumed = subprocess.run(
        [*cmd, "--resume"], env=_env(ray_tmp), capture_output=True, text=True, timeout=400
    )
    # exit 1: one variant (deep, all NaN) has no best model; the others do
    assert resumed.returncode == 1, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert "best deep     NONE" in resumed.stdout
    with open(exp / "trials.csv") as f:
        rows = {r["trial_id"]: r for r in csv.DictReader(f)}
    assert sorted(r["model"] for r in rows.values()) == sorted(models)  # no trial lost or doubled
    status = {r["model"]: r["status"] for r in rows.values()}
    expected = {"dense": "finished", "sparse": "finished", "vae": "finished", "deep": "diverged"}
    assert status == expected
    rows = {t: r for t, r in rows.items() if r["model"] != "deep"}
    for trial_id, started_at in before.items():  # finished trials were not trained again
        assert float(rows[trial_id]["started_at"]) == pytest.approx(started_at)
    later = [r for t, r in rows.items() if t not in before]
    assert later and all(float(r["started_at"]) > max(before.values()) for r in later)
    assert sorted(p.stem for p in (exp / "best").glob("*.keras")) == ["dense", "sparse", "vae"]
    assert _ray_left(ray_tmp) == []


def test_a_trial_whose_worker_dies_is_retried_from_its_last_checkpoint(tmp_path, shared_ray):
    """The trial's process is killed after its first epoch: Tune retries it
    (FailureConfig) on a new worker, which continues from the last checkpoint
    instead of training the reported epochs again, and the sweep exits 0."""
    epochs = 5
    cmd = [sys.executable, str(SWEEP), "--data", str(MNIST), "--models", "conv"]
    cmd += ["--epochs", str(epochs), "--limit", "1000", "--test-limit", "100"]
    cmd += ["--num-samples", "1", "--scheduler", "fifo", "--no-figures", "--max-failures", "1"]
    cmd += ["--storage-path", str(tmp_path), "--name", "retried"]
    exp = tmp_path / "retried"
    log = tmp_path / "sweep.log"
    driver = start_logged(cmd, _env(None, shared_ray), log)
    try:
        first = wait_for(lambda: _reports(exp), driver, log, timeout=240)
        assert first, "no epoch reported within 240s"
        killed = first[0]["pid"]
        assert first[-1]["epoch"] < epochs, "the trial finished before the kill: nothing retried"
        os.kill(killed, signal.SIGKILL)
        assert driver.wait(timeout=400) == 0, log.read_text()[-5000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    reports = _reports(exp)
    before = [r["epoch"] for r in reports if r["pid"] == killed]
    after = [r["epoch"] for r in reports if r["pid"] != killed]
    assert before and after, reports
    # The retry picked up after the last reported epoch: none trained twice, none skipped.
    assert before + after == list(range(1, epochs + 1)), (before, after)
    assert _optimizer_steps(exp / "best" / "conv.keras", 1000, epochs)
    with open(exp / "trials.csv") as f:
        (row,) = csv.DictReader(f)
    assert row["status"] == "finished" and int(row["epoch"]) == epochs
    assert int(row["pid"]) != killed
    assert (exp / "best" / "conv.keras").is_file()


def test_a_full_disk_ends_the_sweep_with_a_message(tmp_path, shared_ray):
    """A sweep whose storage fills up (a 2 MiB tmpfs: root only, skipped elsewhere) ended
    in Tune's EOFError or an OSError traceback. Now its last line says the disk is full
    and how to go on. (The --resume after a remount is not asserted: which file the
    full disk cuts short varies. Where it is Tune's own state, --resume is refused:
    test_a_resume_from_a_cut_short_tune_state_is_refused.)"""
    with small_disk(tmp_path / "full", "2m") as full:
        cmd = [sys.executable, str(SWEEP), "--data", str(MNIST), "--models", "dense"]
        cmd += ["--epochs", "2", "--limit", "1000", "--test-limit", "100", "--num-samples", "1"]
        cmd += ["--scheduler", "fifo", "--no-figures", "--max-failures", "0"]
        cmd += ["--storage-path", str(full), "--name", "s"]
        proc = subprocess.run(
            cmd, env=_env(None, shared_ray), capture_output=True, text=True, timeout=300
        )
        last = proc.stderr.strip().splitlines()[-1:]
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert last and last[0].startswith("sweep.py: out of disk space: "), proc.stderr[-3000:]
        resume = "rerun the same command with --resume" in last[0]
        again = "so the sweep cannot be resumed" in last[0] and "another --name" in last[0]
        assert resume or again, last  # (again: the disk cut Tune's own state short)


def _optimizer_steps(path: Path, images: int, epochs: int) -> bool:
    """Whether the model's optimizer took every step of `epochs` epochs: a resumed trial
    restores Adam's state with the weights (it restarted at step 0 before, so the same
    trial ended elsewhere depending on where it was stopped)."""
    import keras

    import aelib

    config = aelib.read_info(path)["train_config"]
    n_train = images - round(images * config["val_split"])
    steps = epochs * math.ceil(n_train / config["batch_size"])
    done = int(keras.saving.load_model(path).optimizer.iterations)
    assert done == steps, (done, steps)
    return True


def test_ctrl_c_ends_the_sweep_as_interrupted_and_resume_finishes_it(tmp_path, ray_tmp):
    """Ctrl-C while a trial trains: the sweep writes what it has, marks the unfinished
    trials `interrupted` (not `stopped_early`, which the FIFO scheduler never does), says
    to rerun with --resume and exits 130 (it exited 0, as if done, and a `sweep && ...`
    went on). The resumed trial's optimizer went on from its checkpoint's state."""
    from ray._private.utils import get_num_cpus  # (what a local Ray takes)

    epochs = 4
    cmd = [sys.executable, str(SWEEP), "--data", str(MNIST), "--models", "conv"]
    cmd += ["--epochs", str(epochs), "--limit", "1500", "--test-limit", "100", "--num-samples"]
    # Each trial takes every CPU, so the second waits: pending, with no result yet.
    cmd += ["2", "--cpus-per-trial", str(get_num_cpus()), "--scheduler", "fifo", "--no-figures"]
    cmd += ["--max-failures", "0", "--storage-path", str(tmp_path), "--name", "stopped"]
    exp = tmp_path / "stopped"
    reported, status, text = signal_when(
        cmd, _env(ray_tmp), tmp_path / "sweep.log", lambda: _reports(exp), signal.SIGINT
    )
    assert reported and reported[-1]["epoch"] < epochs, "finished before the Ctrl-C"
    assert status == 130, text[-5000:]
    assert "sweep.py: interrupted: 2 of 2 trials did not finish" in text
    assert "rerun the same command with --resume" in text
    assert "Tuner.restore(" not in text  # (Tune's own hint, just before it: not how)
    with open(exp / "trials.csv") as f:  # the one still pending too names its variant
        rows = list(csv.DictReader(f))
    assert [(r["status"], r["model"]) for r in rows] == [("interrupted", "conv")] * 2
    assert _ray_left(ray_tmp) == []
    # The resume takes the first run's settings: --epochs 2 would mix two experiments.
    other = [a if a != str(epochs) else "2" for a in cmd]
    refused = subprocess.run(
        [*other, "--resume"], env=_env(ray_tmp), capture_output=True, text=True
    )
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert f"--resume: stopped started with --epochs {epochs}, not 2" in refused.stderr
    resumed = subprocess.run(
        [*cmd, "--resume"], env=_env(ray_tmp), capture_output=True, text=True, timeout=400
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    with open(exp / "trials.csv") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["finished"] * 2
    assert _optimizer_steps(exp / "best" / "conv.keras", 1500, epochs)
    assert _ray_left(ray_tmp) == []


@pytest.mark.parametrize(
    "own_ray, group",
    [(False, False), (True, True), (True, False)],
    ids=["on-a-cluster", "own-ray-group", "own-ray-driver"],
)
def test_sigterm_ends_the_sweep_with_what_it_has(tmp_path, ray_tmp, shared_ray, own_ray, group):
    """SIGTERM while a trial trains (Ray's handler printed its stack lines and killed the
    driver before it wrote trials.csv or said to --resume). Connected to a cluster (the
    tests' shared head), as on Ctrl-C: trials.csv with the trial `interrupted`, the hint,
    exit 143. With a local Ray of its own, sent to the whole process group as `timeout`,
    Slurm or systemd send it, which stops that Ray too (Tune then waited a minute for the
    GCS and exited 1 without a word): the hint and exit 143 at once, no Ray left. (What it
    leaves is what a kill -9 of the driver and its Ray leaves, whose --resume
    test_resume_after_driver_killed_reruns_no_finished_trial runs.) Sent to the driver
    alone (`kill PID`), the raylet's agents, which it does not reach, went on for up to
    a minute after the driver (the driver kills the raylet's children now)."""
    cmd = [sys.executable, str(SWEEP), "--data", str(MNIST), "--models", "conv"]
    cmd += ["--epochs", "4", "--limit", "1500", "--test-limit", "100", "--num-samples", "1"]
    cmd += ["--scheduler", "fifo", "--no-figures", "--max-failures", "0"]
    cmd += ["--storage-path", str(tmp_path), "--name", "termed"]
    exp = tmp_path / "termed"
    env = _env(ray_tmp) if own_ray else _env(None, shared_ray)
    agents: set[int] = set()  # the raylet's, seen while the sweep runs

    def ready():
        table = local._proc_table()
        raylets = {p for p, (_, cmd) in table.items() if f"{ray_tmp}/" in cmd and "raylet" in cmd}
        agents.update(p for p, (ppid, cmd) in table.items() if ppid in raylets and "Agent" in cmd)
        return _reports(exp)

    reported, status, text = signal_when(
        cmd, env, tmp_path / "sweep.log", ready, signal.SIGTERM, group
    )
    assert reported and reported[-1]["epoch"] < 4, "finished before the SIGTERM"
    assert status == 143, text[-5000:]
    assert "rerun the same command with --resume" in text
    assert "SIGTERM received" not in text  # Ray's stack lines
    if not own_ray:
        assert "sweep.py: interrupted: 1 of 1 trials did not finish" in text, text[-3000:]
        with open(exp / "trials.csv") as f:
            assert [r["status"] for r in csv.DictReader(f)] == ["interrupted"]
        return
    assert "sweep.py: terminated (SIGTERM)" in text, text[-3000:]
    # Every process of that Ray is gone but its two agents (runtime env, dashboard), which
    # the group's SIGTERM reaches too and which end on their own: they usually do within
    # 5 s, but each is an aiohttp app, whose graceful shutdown waits up to 60 s for open
    # connections (each seen still asleep 30 s later on a loaded machine, the dashboard's
    # in a CI run of 967 s; waiting for them took up to 72 s of CI). The ray_tmp fixture
    # kills them after the test.
    assert _ray_left(ray_tmp, but=("RuntimeEnvAgent", "DashboardAgent")) == []
    if not group:  # (the group's SIGTERM may end the raylet before the driver finds them)
        assert len(agents) == 2, "the raylet's agents were not seen"
        deadline = time.monotonic() + 10
        while (left := [p for p in agents if local._alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, "the raylet's agents outlived the driver"
    assert (exp / "tuner.pkl").is_file()  # the experiment --resume goes on from


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_while_it_imports_ray_says_so_in_one_line(sig, tmp_path):
    """Ctrl-C in the first seconds (Ray's, Tune's and pandas' imports) ended in an
    import's KeyboardInterrupt traceback and exit 1; SIGTERM there, without a word."""
    cmd = [sys.executable, str(SWEEP), "--smoke-test", "--data", str(MNIST)]
    proc = subprocess.Popen(
        [*cmd, "--storage-path", str(tmp_path / "store")],
        env=_env(None),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_signals,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # (until its handler is set: SIGTERM caught)
            status = Path(f"/proc/{proc.pid}/status").read_text()
            caught = int(re.search(r"SigCgt:\s*([0-9a-f]+)", status).group(1), 16)
            if caught >> (signal.SIGTERM - 1) & 1:
                break
            time.sleep(0.01)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err[-3000:]
    what = "Ctrl-C" if sig == signal.SIGINT else "SIGTERM"
    assert f"sweep.py: stopped ({what}) while starting, before it wrote anything" in err
    assert "Traceback" not in err and not (tmp_path / "store").exists()


def test_a_sigterm_ends_the_driver_while_its_main_thread_is_in_c_code(tmp_path):
    """Python runs a signal handler in the main thread once it runs Python again; a
    SIGTERM sent to the group while the driver waited in Ray's C++ code stopped the local
    Ray too, and the core worker exited the driver with status 1, without a word, before
    the handler ran. The watcher thread ends it at once, its Ray's processes killed."""
    code = f"""
import hashlib, importlib.util, os, signal, subprocess, sys, threading, time
spec = importlib.util.spec_from_file_location("s", {str(SWEEP)!r})
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
ray = subprocess.Popen(["sleep", "60"])  # (stands for the local Ray's processes)
m._own_ray_processes = lambda kind=None: [ray]
def handler(signum, frame):
    print("the main thread's handler ran", flush=True)
m._on_sigterm = handler
m._sigterm_as_ctrl_c()
print(ray.pid, flush=True)
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
hashlib.sha256(bytes(1 << 31))  # (C code that runs its seconds without a break)
print("the main thread went on", flush=True)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 143, run.stdout + run.stderr[-3000:]
    assert "terminated (SIGTERM)" in run.stderr
    assert run.stdout.split() == [run.stdout.split()[0]], run.stdout  # (the pid alone)
    pid = int(run.stdout.split()[0])
    assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read()


def test_a_stop_outside_tunes_run_says_the_rerun_that_works(tmp_path):
    """Stopped in its start-up, a sweep said to rerun with --resume "(without --resume if
    it stopped before its experiment folder had a trial)", and the --resume was refused:
    "no experiment to resume". It now says the one command that works."""
    sweep = _load_sweep_module()
    sweep._EXPERIMENT[:] = [str(tmp_path / "s")]
    said = "nothing to resume: rerun the same command to start it"
    assert said in sweep._how_to_go_on()
    (tmp_path / "s").mkdir()  # (what a sweep that ran leaves: tuner.pkl, experiment state)
    (tmp_path / "s" / "tuner.pkl").write_bytes(pickle.dumps({}))
    assert said in sweep._how_to_go_on()  # (stopped between the two: refused by --resume)
    (tmp_path / "s" / "experiment_state-2026-12-05_03-40-00.json").write_text("{}")
    assert sweep._how_to_go_on() == (
        "What was written is kept: rerun the same command with --resume to finish the "
        "sweep and its report."
    )
    sweep._EXPERIMENT[:] = ["s3://bucket/sweeps/s"]  # (not looked at: may be out of reach)
    assert "(without --resume if it stopped before its experiment" in sweep._how_to_go_on()


def test_a_resume_keeps_the_settings_the_sweep_started_with(tmp_path, capsys):
    """Flags left out of a --resume come from the experiment's sweep_settings.json; one
    given with another value is refused before Ray starts (no Ray here: parse_args)."""
    sweep = _load_sweep_module()
    first = ["--data", str(MNIST), "--storage-path", str(tmp_path), "--name", "s"]
    first += ["--models", "dense", "vae", "--epochs", "3", "--set", "dense.batch_size=64"]
    sweep.write_settings(sweep.parse_args(first))
    # What a sweep that ran leaves (Tune's tuner.pkl and experiment state)
    (tmp_path / "s" / "tuner.pkl").write_bytes(pickle.dumps({}))  # (whole: b"" is cut short)
    (tmp_path / "s" / "experiment_state-2026-12-05_03-40-00.json").write_text("{}")
    base = ["--data", str(MNIST), "--storage-path", str(tmp_path), "--name", "s", "--resume"]
    args = sweep.parse_args(base)
    assert (args.models, args.epochs, args.pins) == (
        ["dense", "vae"],
        3,
        [("dense", "batch_size", 64)],
    )
    assert sweep.parse_args([*base, "--epochs", "3"]).epochs == 3
    for extra, said in (
        (["--epochs", "2"], "started with --epochs 3, not 2"),
        (["--models", "dense"], "started with --models dense vae, not dense"),
        (
            ["--set", "dense.batch_size=32"],
            "started with --set dense.batch_size=64, not dense.batch_size=32",
        ),
        # Tune restores these with the experiment: refused, not ignored.
        (["--max-concurrent", "1"], "started with --max-concurrent (not given), not 1"),
        (["--max-failures", "0"], "started with --max-failures 2, not 0"),
    ):
        with pytest.raises(SystemExit) as e:
            sweep.parse_args([*base, *extra])
        assert e.value.code == 2, extra
        assert said in capsys.readouterr().err
    again = sweep.parse_args([*base, "--models", "vae", "dense"])  # the same, in any order
    assert sorted(again.models) == ["dense", "vae"]
    with pytest.raises(SystemExit):  # `--epoch` is not --epochs any more
        sweep.parse_args([*first, "--epoch", "3"])
    # How its denoise trials are scored stays the experiment's: all at one noise, or (a
    # sweep started before sweep_settings.json recorded it) each at its own training noise.
    assert args.scoring == "fixed-noise"
    settings = tmp_path / "s" / "sweep_settings.json"
    recorded = json.loads(settings.read_text())
    del recorded["scoring"]
    settings.write_text(json.dumps(recorded))
    old = sweep.parse_args(base)
    assert old.scoring == "as-trained"
    config = sweep.trial_config("denoise", {"noise_factor": 0.3}, sweep.trial_settings(old))
    assert (config.noise_factor, config.eval_noise_factor) == (0.3, None)
    config = sweep.trial_config("denoise", {"noise_factor": 0.3}, sweep.trial_settings(args))
    assert (config.noise_factor, config.eval_noise_factor) == (0.3, 0.5)
    # A sweep started before a --set key given twice was refused still resumes (the
    # check is of the flags given, not of the pins restored).
    recorded["pins"] = [["dense", "batch_size", 64]] * 2
    settings.write_text(json.dumps(recorded))
    assert sweep.parse_args(base).pins == [("dense", "batch_size", 64)] * 2
    # A damaged or hand-edited file is refused, naming it (a traceback).
    for text, said in (
        ("[", "Expecting value"),
        ("[]", "[], not a JSON object"),
        (json.dumps({**recorded, "models": 5}), "its models is 5"),
        (json.dumps({**recorded, "epochs": "3"}), 'its epochs is "3"'),
        (json.dumps({**recorded, "pins": [["dense"]]}), 'its pins is [["dense"]]'),
        (json.dumps({**recorded, "limit": "600"}), 'its limit is "600"'),  # (no --limit now)
        (json.dumps({**recorded, "data_sha256": 5}), "its data_sha256 is 5"),
        (json.dumps({**recorded, "scheduler": "hyperband"}), 'its scheduler is "hyperband"'),
    ):
        settings.write_text(text)
        with pytest.raises(SystemExit) as e:
            sweep.parse_args(base)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"--resume: {settings} is not a sweep's settings (" in err
        assert said in err, (text, err)


def test_a_resume_on_other_data_is_refused(tmp_path, monkeypatch, capsys):
    """sweep_settings.json records a digest of the arrays the trials get: a resume with
    another --data (or $AELIB_MNIST) would rank models trained on either, and is refused;
    the same arrays from another path are the same data. A resume given neither reads
    the file the sweep started with."""
    sweep = _load_sweep_module()
    flags = ["--storage-path", str(tmp_path), "--name", "s", "--models", "dense"]
    flags += ["--limit", "100", "--test-limit", "50"]
    first = sweep.parse_args(["--data", str(MNIST), *flags])
    first.data_sha256 = sweep.data_digest(sweep.load_arrays(first))
    sweep.write_settings(first)
    (tmp_path / "s" / "tuner.pkl").write_bytes(pickle.dumps({}))  # (what a sweep that ran leaves)
    (tmp_path / "s" / "experiment_state-2026-12-05_03-40-00.json").write_text("{}")
    with np.load(MNIST) as d:
        arrays = {k: d[k] for k in d.files}
    copy, inverted = tmp_path / "copy.npz", tmp_path / "inverted.npz"
    np.savez_compressed(copy, **arrays)
    np.savez_compressed(inverted, **{**arrays, "x_train": 255 - arrays["x_train"]})
    for data, same in ((copy, True), (inverted, False)):
        args = sweep.parse_args(["--data", str(data), *flags, "--resume"])
        args.data_sha256 = sweep.data_digest(sweep.load_arrays(args))
        if same:
            sweep.check_same_data(args)
            continue
        with pytest.raises(SystemExit, match=f"started with other data \\({MNIST}, digest"):
            sweep.check_same_data(args)
    # Neither --data nor $AELIB_MNIST (another shell): the file it started with, said.
    monkeypatch.delenv("AELIB_MNIST", raising=False)
    args = sweep.parse_args([*flags, "--resume"])
    assert args.data == str(MNIST)
    assert f"--resume reads {MNIST}, the data file s started with" in capsys.readouterr().err
    settings = tmp_path / "s" / "sweep_settings.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "data": str(copy) + "x"}))
    assert sweep.parse_args([*flags, "--resume"]).data is None
    assert f"s started with {copy}x, which is not there now" in capsys.readouterr().err


# ------------------------------------------------------------ bad flags


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--models", "dense", "gan"], "unknown variant(s) 'gan'"),
        (["--models", "dense,gan"], "unknown variant(s) 'gan'"),
        (["--models", ","], "--models: no variant given"),
        (["--epochs", "0"], "--epochs: must be >= 1"),
        (["--num-samples", "-2"], "--num-samples: must be >= 1"),
        (["--gpus-per-trial", "-1"], "--gpus-per-trial: must be a finite number >= 0"),
        (["--cpus-per-trial", "0"], "--cpus-per-trial must be > 0"),
        (["--data", "/nonexistent/mnist.npz"], "MNIST file not found"),
        (["--data", "/tmp"], "--data: /tmp is a folder; expected the mnist.npz file"),
        (["--data", "/dev/null"], "--data: /dev/null is not a regular file; expected the"),
        (["--data", ""], "--data is empty: expected the path of mnist.npz"),  # (a folder)
        (
            ["--scheduler", "fifo", "--grace-period", "2"],
            "--grace-period applies to --scheduler asha only",
        ),
        (
            ["--set", "dense.batch_size=64", "--set", "dense.batch_size=32"],
            "--set dense.batch_size is given twice (64 and 32): give it once",
        ),
        (["--set", "gan.l1=0.1"], "unknown variant 'gan'"),
        (["--set", "vae.learning_rate=1e-3", "--models", "dense"], "not among --models"),
        (["--limit", "1"], "--limit must be >= 2"),  # aelib's own bound (TrainConfig.limit)
        (["--seed", "-1"], "--seed must be an integer in [0, 4294967295]. Received: -1"),
        (["--seed", str(2**32)], "--seed must be an integer in [0, 4294967295]"),
        (["--storage-path", ""], "--storage-path is empty"),  # not the current folder
        (["--epoch", "3"], "unrecognized arguments: --epoch 3"),  # not --epochs
    ],
)
def test_bad_flags_fail_at_once(flags, message, capsys):
    sweep = _load_sweep_module()
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_args(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_models_may_be_spaced_or_comma_separated():
    sweep = _load_sweep_module()
    args = sweep.parse_args(["--models", "conv,denoise", "vae", "conv,"])
    assert args.models == ["conv", "denoise", "vae"]
    # (quoted with a space after the comma: it was "unknown variant(s) ' vae'")
    assert sweep.parse_args(["--models", "conv, vae ,dense"]).models == ["conv", "vae", "dense"]
    # given twice: both (the last alone was kept, without a word)
    assert sweep.parse_args(["--models", "vae", "--models", "conv"]).models == ["vae", "conv"]
    assert sweep.parse_args([]).models == list(sweep.VARIANTS)


def test_storage_path_defaults_to_the_clusters_shared_storage(tmp_path, monkeypatch, capsys):
    """cluster.yaml sets AELIB_STORAGE_PATH on every node, so `ray submit cluster.yaml
    jobs/sweep.py` needs no --storage-path; its placeholder bucket is refused by name."""
    sweep = _load_sweep_module()
    monkeypatch.setenv("AELIB_STORAGE_PATH", f"{tmp_path}/shared/")
    assert sweep.parse_args([]).storage_path == f"{tmp_path}/shared/sweeps"
    assert not (tmp_path / "shared").exists()  # (made by the sweep's run, not its checks)
    explicit = sweep.parse_args(["--storage-path", str(tmp_path / "mine")]).storage_path
    assert explicit == str(tmp_path / "mine")  # the flag wins
    monkeypatch.setenv("AELIB_STORAGE_PATH", "s3://CHANGE-ME-bucket/aelib")
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_args([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "s3://CHANGE-ME-bucket/aelib/sweeps is the placeholder of cluster.yaml" in err


def test_a_cloud_storage_path_it_cannot_reach_fails_before_ray(tmp_path, monkeypatch, capsys):
    """A bucket the machine cannot reach (here no Google credentials anywhere, which
    pyarrow's client retried for 16 minutes; the URI's own retry limit is kept) fails
    with the flag and what to set, in the argument checks (before Ray starts)."""
    sweep = _load_sweep_module()
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no gcloud login
    for name in ("GCE_METADATA_ROOT", "GCE_METADATA_HOST"):  # no metadata server
        monkeypatch.setenv(name, "127.0.0.1:9")
    uri = "gs://aelib-test/sweeps?endpoint_override=127.0.0.1:9&scheme=http&retry_limit_seconds=1"
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_args(["--storage-path", uri])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--storage-path: cannot reach {uri}: " in err
    assert "no Google Cloud credentials were found: set GOOGLE_APPLICATION_CREDENTIALS" in err


@pytest.mark.parametrize(
    "flags, code, message",
    [
        (
            ["--set", "dense.encoding_dim=abc"],
            2,
            "--set dense.encoding_dim='abc': expected an int (default 32)",
        ),
        (
            ["--set", "dense.learning_rate=fast"],  # a TrainConfig field
            2,
            "--set dense.learning_rate='fast': expected a number (default 0.001)",
        ),
        (  # of the right type, refused by Keras: built on the driver (each trial would fail)
            ["--set", "dense.activation=nosuch"],
            2,
            "--set dense.activation='nosuch': Model 'dense' cannot be built with activation="
            "'nosuch': Could not interpret activation function identifier: nosuch",
        ),
        (  # builds, but does not take the data
            ["--set", "dense.input_dim=100"],
            2,
            "--set dense.input_dim=100: Model 'dense' (input_dim=100) cannot take the data's "
            "(784,) inputs",
        ),
        (["--set", "dense.batch_size=0"], 2, "--set dense.batch_size=0: batch_size must be >= 1"),
        (["--storage-path", "{file}"], 2, "--storage-path: {file} is a file, not a folder"),
        (["--storage-path", "/proc/aelib-sweep"], 2, "--storage-path: cannot write to /proc/"),
        (["--storage-path", "/proc"], 2, "--storage-path: cannot write to /proc:"),  # exists
        (["--data", "{file}"], 2, "{file} is not an .npz (zip) archive"),  # read before Ray
    ],
)
def test_bad_values_fail_before_ray_starts(flags, code, message, tmp_path, ray_tmp):
    """Values that would make every trial fail (or Tune's sampler, or pyarrow, raise after
    Ray started) are refused by the driver first, with the flag and what it expects, and
    nothing written."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    flags = [f.format(file=a_file) for f in flags]
    cmd = [sys.executable, str(SWEEP), "--smoke-test", "--data", str(MNIST), "--models", "dense"]
    cmd += ["--no-figures", "--storage-path", str(tmp_path / "store"), "--name", "bad", *flags]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=_env(ray_tmp), capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - start
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert message.format(file=a_file) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(ray_tmp.iterdir()) == []  # no Ray was started
    assert not (tmp_path / "store").exists()  # (nor its --storage-path, which it made)
    assert seconds < 30


def test_a_stopped_clusters_address_fails_before_anything(tmp_path, ray_tmp):
    """RAY_ADDRESS left exported after `cluster/local.py stop`: ray.init retried it for
    minutes ("Failed to connect to GCS"); the sweep says so and exits 2 at once."""
    cmd = [sys.executable, str(SWEEP), "--smoke-test", "--data", str(MNIST), "--models", "dense"]
    cmd += ["--storage-path", str(tmp_path / "store"), "--name", "gone"]
    for address, said in (
        ("127.0.0.1:1", "RAY_ADDRESS=127.0.0.1:1: no Ray cluster answers there ("),  # (port 1)
        ("ray://127.0.0.1:1", "RAY_ADDRESS=ray://127.0.0.1:1: no Ray cluster answers there ("),
        # (no address at all: a traceback, ValueError)
        ("notanaddress", "RAY_ADDRESS=notanaddress: not the address of a Ray cluster ("),
        # (exported for `ray job submit`: the dashboard's)
        ("http://127.0.0.1:8265", "RAY_ADDRESS=http://127.0.0.1:8265: a dashboard's address"),
    ):
        env = {**_env(ray_tmp), "RAY_ADDRESS": address}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert f"sweep.py: error: {said}" in proc.stderr, proc.stderr[-3000:]
        assert "unset RAY_ADDRESS to run on a local Ray" in proc.stderr
        assert "Connecting to existing Ray cluster" not in proc.stderr
        assert list(ray_tmp.iterdir()) == [] and not (tmp_path / "store" / "gone").exists()


def test_a_cluster_of_token_authentication_without_the_token_is_one_line(tmp_path, shared_ray):
    """RAY_ADDRESS of a cluster that takes token authentication (Ray 2.60's `ray start`
    turns it on where ~/.ray/auth_token exists), RAY_AUTH_MODE not set: ray.init logged
    its refusal each second for 20 s (here Ray's retries cut to 1 s), then a traceback."""
    cmd = [sys.executable, str(SWEEP), "--smoke-test", "--data", str(MNIST), "--models", "dense"]
    cmd += ["--storage-path", str(tmp_path / "store"), "--name", "auth"]
    env = {**_env(None, shared_ray), "RAY_gcs_server_port_wait_time_s": "1"}
    env.pop("RAY_AUTH_MODE")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    said = "takes token authentication and refused this driver (RAY_AUTH_MODE unset): export"
    assert f"sweep.py: error: RAY_ADDRESS={shared_ray['RAY_ADDRESS']}: the Ray cluster" in (
        proc.stderr
    )
    assert said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_a_file_of_one_training_image_fails_before_ray(tmp_path, ray_tmp):
    """--limit 1 is refused before Ray; a file holding one training image passed, and
    every trial failed after Ray's start-up ("no training images left"), with retries."""
    with np.load(MNIST) as d:
        one = {k: d[k][:1] if k.endswith("train") else d[k][:100] for k in d.files}
    data = tmp_path / "one.npz"
    np.savez(data, **one)
    cmd = [sys.executable, str(SWEEP), "--data", str(data), "--models", "dense", "--epochs", "1"]
    cmd += ["--no-figures", "--storage-path", str(tmp_path / "store"), "--name", "one"]
    proc = subprocess.run(cmd, env=_env(ray_tmp), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"sweep.py: error: {data} holds 1 training image: a trial needs 2 or more" in proc.stderr
    assert list(ray_tmp.iterdir()) == [] and not (tmp_path / "store" / "one").exists()


def test_an_experiment_folder_that_cannot_be_written_fails_before_ray(tmp_path, ray_tmp):
    """--storage-path can be written, its --name folder not (another user's, say; here a
    link to /proc, which not even root can write): refused before Ray, not as a
    PermissionError once Ray has started."""
    store = tmp_path / "store"
    store.mkdir()
    (store / "ro").symlink_to("/proc")
    cmd = [sys.executable, str(SWEEP), "--smoke-test", "--data", str(MNIST), "--models", "dense"]
    cmd += ["--storage-path", str(store), "--name", "ro"]
    proc = subprocess.run(cmd, env=_env(ray_tmp), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"--name ro: cannot write to {store / 'ro'}" in proc.stderr
    assert "Traceback" not in proc.stderr and list(ray_tmp.iterdir()) == []


def test_a_link_to_nowhere_at_the_name_or_storage_path_fails_before_ray(tmp_path, ray_tmp, capsys):
    """An experiment folder (or storage path) that is a link to a folder not there now (a
    disk not mounted, say): --name's ended in a FileExistsError traceback at the lock,
    --storage-path's in "cannot write to ...: File exists". Both name the link."""
    store = tmp_path / "store"
    store.mkdir()
    (store / "gone").symlink_to(tmp_path / "unmounted" / "gone")
    cmd = [sys.executable, str(SWEEP), "--smoke-test", "--data", str(MNIST), "--models", "dense"]
    cmd += ["--storage-path", str(store), "--name", "gone"]
    proc = subprocess.run(cmd, env=_env(ray_tmp), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    said = f"is a link to {tmp_path / 'unmounted' / 'gone'}, which does not exist"
    assert f"--name gone: {store / 'gone'} {said}" in proc.stderr
    assert "Traceback" not in proc.stderr and list(ray_tmp.iterdir()) == []
    assert (store / "gone").is_symlink() and not (tmp_path / "unmounted").exists()
    sweep = _load_sweep_module()
    for storage in (store / "gone", store / "gone" / "sweeps"):
        with pytest.raises(SystemExit, match="^2$"):
            sweep.parse_args(["--storage-path", str(storage)])
        assert f"--storage-path: {store / 'gone'} {said}" in capsys.readouterr().err
        assert not (tmp_path / "unmounted").exists()


def test_names_paths_and_shares_that_ray_or_a_uri_would_misread(tmp_path, capsys, monkeypatch):
    """Refused at once, not after the training: a --name with # or ? under a URI (its
    end: the results went to another folder and the sweep could not be resumed) or too
    long; a
    one-slash URI (written to a local folder s3:); a share Ray counts as none (its
    traceback after it started). A file:// path is the local folder, with its lock."""
    sweep = _load_sweep_module()
    uri = ["--storage-path", "s3://bucket/sweeps"]
    for flags, said in (
        (uri + ["--name", "a#b"], "--name 'a#b': '#' cannot be in the name of a sweep"),
        (uri + ["--name", "x?y=1 2"], "--name 'x?y=1 2': ' ' '?' cannot be in"),
        (["--name", "n" * 201], "--name is 201 bytes long: at most 200"),
        (["--storage-path", "file://"], "--storage-path file://: no folder in it"),
        (["--storage-path", "s3:/bucket"], "--storage-path s3:/bucket: a URI's scheme is"),
        (["--storage-path", "file://host/x"], "not a folder of this machine"),
        (["--cpus-per-trial", "0.00001"], "--cpus-per-trial must be at least 0.0001, the smallest"),
        (["--gpus-per-trial", "0.00005"], "--gpus-per-trial must be 0 or at least 0.0001"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            sweep.parse_args(flags)
        assert exit_info.value.code == 2
        assert said in capsys.readouterr().err
    folder = tmp_path / "my store"
    args = sweep.parse_args(["--storage-path", f"file://{urllib.parse.quote(str(folder))}"])
    assert args.storage_path == str(folder) and not folder.exists()  # (the sweep's run makes it)
    monkeypatch.setenv("AELIB_STORAGE_PATH", f"file:{tmp_path}/env")  # (cluster.yaml's)
    args = sweep.parse_args(["--name", "run#2 (local)"])  # (a local folder takes any name)
    assert args.storage_path == str(tmp_path / "env" / "sweeps")


def test_optuna_searches_no_pinned_key():
    """Optuna searched a pinned key too (the trial trained with the pin), which told its
    model of the variant nothing; a pinned key is in the config as its value now."""
    optuna = pytest.importorskip("optuna")
    sweep = _load_sweep_module()
    pins = {"denoise": {"batch_size": 32, "eval_noise_factor": 0.2}}
    space = sweep.OptunaSpace(["denoise", "dense"], pins)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    configs, searched = [], set()
    for _ in range(8):
        trial = study.ask()
        configs.append(space(trial))
        searched |= set(trial.params)
    denoise = [c["hparams"]["denoise"] for c in configs if "denoise" in c["hparams"]]
    assert denoise and all(h["batch_size"] == 32 for h in denoise), denoise
    assert all(h["eval_noise_factor"] == 0.2 for h in denoise), denoise
    assert len({h["learning_rate"] for h in denoise}) > 1  # (the others are searched)
    assert "denoise.learning_rate" in searched
    assert not searched & {"denoise.batch_size", "denoise.eval_noise_factor"}, searched


def test_optuna_models_each_variant_on_its_own_trials(tmp_path):
    """--search optuna ran one TPE study over every variant: TPE ranks all trials by
    val_loss before it looks at parameters, and `vae`'s losses (KL term) run higher than
    `dense`'s, so no `vae` trial was among the good and its search stayed random. Here,
    as a reviewer simulated it: the best learning rate 3e-4 (the range's low end), a
    loss 0.19 higher for `vae`. Each variant has a study of its own, whose search moves
    toward that variant's best, and the searcher's state survives a save and restore."""
    pytest.importorskip("optuna")
    sweep = _load_sweep_module()

    def loss(model: str, config: dict) -> float:
        rate = config["hparams"][model]["learning_rate"]
        return {"dense": 0.09, "vae": 0.28}[model] + 0.05 * (math.log10(rate / 3e-4)) ** 2

    order = ["vae", "dense"] * 24  # (interleaved: the trials of both share the time)
    searcher = sweep.VariantOptuna(order, {}, "val_loss", "min", seed=0, startup=10)
    rates = {"dense": [], "vae": []}
    for i in range(len(order)):
        if i == 20:  # (what a resume restores: the rest is suggested the same)
            searcher.save(str(tmp_path / "state.pkl"))
            saved = copy.deepcopy(searcher)
        config = searcher.suggest(f"t{i}")
        model = config["model"]
        rates[model].append(config["hparams"][model]["learning_rate"])
        searcher.on_trial_complete(f"t{i}", {"val_loss": loss(model, config)})
    assert searcher.suggest("t-past") == "FINISHED"
    for model, study in searcher.studies.items():
        trials = study.get_trials()
        assert len(trials) == 24 and {t.params["model"] for t in trials} == {model}, model
    for model in rates:  # (random draws over 3e-4..3e-3 have a median near 9.5e-4)
        assert statistics.median(rates[model][12:]) < 6e-4, (model, rates[model])
    restored = sweep.VariantOptuna(["dense"], {}, "val_loss", "min", seed=1, startup=1)
    restored.restore(str(tmp_path / "state.pkl"))
    assert restored.suggest("t20") == saved.suggest("t20")


def test_optuna_is_told_of_diverged_errored_and_rerun_trials():
    """A diverged trial's NaN is no value to Optuna: it stayed RUNNING, left out of TPE's
    model, so the region that diverged was never marked bad; it is the worst value now.
    A trial that errored is FAIL, and its rerun on --resume (Tune reruns errored trials),
    which Ray's OptunaSearch dropped, is told as a trial with the same values."""
    pytest.importorskip("optuna")
    from optuna.trial import TrialState

    sweep = _load_sweep_module()
    searcher = sweep.VariantOptuna(["dense"] * 3, {}, "val_loss", "min", seed=0, startup=1)
    configs = [searcher.suggest(f"t{i}") for i in range(3)]
    searcher.on_trial_complete("t0", {"val_loss": math.nan})
    searcher.on_trial_complete("t1", None, error=True)
    searcher.on_trial_complete("t2", {"val_loss": 0.25})
    searcher.on_trial_complete("t1", {"val_loss": 0.5})  # (its rerun, after --resume)
    trials = searcher.studies["dense"].get_trials()
    told = [(t.state, t.value) for t in trials]
    assert told == [
        (TrialState.COMPLETE, math.inf),
        (TrialState.FAIL, None),
        (TrialState.COMPLETE, 0.25),
        (TrialState.COMPLETE, 0.5),
    ]
    assert trials[3].params == trials[1].params
    rate = configs[1]["hparams"]["dense"]["learning_rate"]
    assert trials[1].params["dense.learning_rate"] == rate


def test_an_optuna_sweep_feeds_each_variants_study_and_resumes(tmp_path, shared_ray):
    """The real CLI with --search optuna (no test ran it): trials go round after round,
    heaviest first; each trial's val_loss reaches its own variant's study, whose state
    Tune keeps with the experiment; a --resume of the finished sweep restores it and
    trains nothing again."""
    pytest.importorskip("optuna")
    cmd = [sys.executable, str(SWEEP), "--data", str(MNIST), "--models", "dense", "sparse"]
    cmd += ["--num-samples", "2", "--epochs", "1", "--limit", "300", "--test-limit", "100"]
    cmd += ["--scheduler", "fifo", "--search", "optuna", "--no-figures"]
    cmd += ["--storage-path", str(tmp_path), "--name", "opt"]
    proc = subprocess.run(cmd, env=_env(None, shared_ray), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "opt" / "trials.csv") as f:
        rows = sorted(csv.DictReader(f), key=lambda row: row["trial_id"])
    assert all(r["status"] == "finished" for r in rows), rows
    (state,) = (tmp_path / "opt").glob("searcher-state-*.pkl")
    with open(state, "rb") as f:
        state = pickle.load(f)
    variants = {trial_id: model for trial_id, (model, _) in state["trials"].items()}
    assert list(variants.values()) == ["dense", "sparse"] * 2  # (in suggestion order)
    assert variants == {r["trial_id"]: r["model"] for r in rows}
    for model, study in state["studies"].items():
        told = sorted(t.value for t in study.get_trials())
        measured = sorted(float(r["val_loss"]) for r in rows if r["model"] == model)
        assert told == pytest.approx(measured, rel=1e-6), model
    proc = subprocess.run(
        [*cmd, "--resume"], env=_env(None, shared_ray), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "opt" / "trials.csv") as f:
        again = sorted(csv.DictReader(f), key=lambda row: row["trial_id"])
    assert [(r["trial_id"], r["started_at"]) for r in again] == [
        (r["trial_id"], r["started_at"]) for r in rows
    ]


def test_pinned_values_are_checked_against_the_option_defaults():
    """--set values of the wrong type fail before Ray starts; what the README shows, ints
    for floats, tuples or lists for tuples, and anything for a None default pass."""
    sweep = _load_sweep_module()
    models = ["dense", "deep", "conv", "denoise", "vae"]
    good = [
        "conv.filters=(32,16,16)",
        "conv.filters=[32, 16, 8]",
        "deep.hidden_units=(256,128,64)",
        "conv.kernel_size=(3,5)",  # (Keras's sizes: one int per dimension, as aelib takes)
        "denoise.kernel_size=[5, 3]",
        "denoise.upsample=transpose",
        "denoise.upsample='nearest'",
        "denoise.skips=True",
        "denoise.noise_factor=1",  # an int for a float
        "denoise.eval_noise_factor=0.3",  # (a None default: any value; TrainConfig checks)
        "dense.learning_rate=1",
        "dense.batch_size=64",
        "dense.lr_schedule=cosine",
        "vae.seed=3",
    ]
    for pin in good:  # (one at a time: a key given twice is refused)
        sweep.check_search_space(models, sweep.parse_args(["--models", *models, "--set", pin]).pins)
    bad = {
        "dense.encoding_dim=32.0": "expected an int (default 32)",
        "dense.encoding_dim=True": "expected an int (default 32)",
        "denoise.skips=yes": "expected True or False (default False)",
        "denoise.upsample=2": "expected a string (default 'nearest')",
        "conv.filters=16": "expected a tuple or list of ints (default (16, 8, 8))",
        "conv.filters=(16,8,'x')": "expected a tuple or list of ints (default (16, 8, 8))",
        "dense.batch_size=1e2": "expected an int (default 256)",
        "dense.batch_size=(64,64)": "expected an int (default 256)",  # (not a Keras size)
        "conv.kernel_size=(3,'x')": "expected an int or ints (default 3)",
        "denoise.kernel_size=()": "expected an int or ints (default 3)",
        # (read by no trial, and reported as pinned)
        "dense.noise_factor=0.3": "noise_factor is denoise's only",
        "vae.eval_noise_factor=0.3": "eval_noise_factor is denoise's only",
        # (each trial was scored at its own noise, and the report said they compared)
        "denoise.eval_noise_factor=None": "scores every denoise trial at one noise factor",
    }
    for pin, expected in bad.items():
        args = sweep.parse_args(["--models", *models, "--set", pin])
        key = pin.split("=", 1)[0]
        with pytest.raises(SystemExit, match="^sweep.py: error: --set ") as exit_info:
            sweep.check_search_space(models, args.pins)
        assert f"--set {key}=" in str(exit_info.value.code)
        assert expected in str(exit_info.value.code)


def test_pins_of_aelibs_defaults_spare_the_drivers_keras_import(tmp_path, monkeypatch):
    """The driver builds pinned variants (importing Keras, ~3 s) unless every pin is
    aelib's own default, as bench_sweep.py pins every searched key: those build."""
    sweep = _load_sweep_module()
    spec = importlib.util.spec_from_file_location("bench_sweep", REPO / "jobs/bench_sweep.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    flags = bench.pins(list(sweep.VARIANTS))
    assert len(flags) > 40  # every searched key of every variant
    assert sweep.pins_are_defaults(sweep.parse_args(flags).pins)
    assert sweep.pins_are_defaults([])
    for pin in ("dense.batch_size=64", "conv.filters=(16,8,4)", "vae.seed=3", "sparse.l1=1e-4"):
        (parsed,) = sweep.parse_args(["--set", pin]).pins
        assert not sweep.pins_are_defaults([parsed]), pin
    (tuple_as_list,) = sweep.parse_args(["--set", "conv.filters=[16, 8, 8]"]).pins
    assert sweep.pins_are_defaults([tuple_as_list])
    # ... and the driver (stopped where Ray would start) skips check_pins for them only.
    checked = []

    class BeforeRay(Exception):
        pass

    def before_ray():
        raise BeforeRay

    monkeypatch.setattr(sweep, "check_pins", lambda args, arrays: checked.append(args.pins))
    monkeypatch.setattr(sweep, "_sigterm_in_ray_init", before_ray)
    base = ["--data", str(MNIST), "--limit", "100", "--test-limit", "50", "--no-figures"]
    base += ["--storage-path", str(tmp_path)]
    for name, pins in (("defaults", flags), ("other", ["--set", "dense.batch_size=64"])):
        with pytest.raises(BeforeRay):
            sweep.main([*base, "--name", name, *pins])
    assert checked == [[("dense", "batch_size", 64)]]


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_the_drivers_pin_check_keeps_keras_off_the_gpus(backend, tmp_path):
    """check_pins builds models in the driver, before Ray: on the CPU, so that it holds
    no GPU memory the trials need, and without passing that setting on to the trials
    through the environment Ray inherits."""
    if backend == "torch":
        pytest.importorskip("torch")
    code = (
        "import importlib.util, os\n"
        f"spec = importlib.util.spec_from_file_location('sweep', {str(SWEEP)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"args = m.parse_args(['--models', 'denoise', '--set', 'denoise.filters=8', "
        f"'--storage-path', {str(tmp_path)!r}])\n"
        f"m.check_pins(args, m.load_arrays(m.parse_args(['--data', {str(MNIST)!r}, "
        "'--limit', '20', '--test-limit', '5', '--storage-path', args.storage_path])))\n"
        "import keras\n"
        "device = (keras.src.backend.torch.core.DEFAULT_DEVICE if keras.backend.backend() == "
        "'torch' else __import__('jax').config.jax_platforms)\n"
        "print(device, 'KERAS_TORCH_DEVICE' in os.environ)\n"
    )
    env = {**_env(Path(tempfile.gettempdir())), "KERAS_BACKEND": backend}
    env.pop("KERAS_TORCH_DEVICE", None)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["cpu", "False"]


def test_a_failing_trial_records_its_exception(tmp_path, ray_tmp):
    """A trial that raises is an `error` row whose error column holds the exception itself
    (not Ray's "ray::ImplicitFunc.train() (pid=...)" header), and the summary says why
    the variant has no best model. (What fails here is the trial's Keras import, under a
    KERAS_BACKEND Keras does not know, which the workers of the sweep's own Ray inherit:
    the driver, with no figures and no --set, never imports Keras; bad --set values it
    refuses before Ray starts, see above.)"""
    cmd = [sys.executable, str(SWEEP), "--smoke-test", "--data", str(MNIST), "--models", "dense"]
    cmd += ["--max-failures", "0", "--no-figures"]
    cmd += ["--storage-path", str(tmp_path), "--name", "failing"]
    # (A sweep stopped before Tune wrote its experiment state left this: it has nothing
    # to resume, and this plain run starts it; it was refused as an experiment.)
    (tmp_path / "failing").mkdir()
    (tmp_path / "failing" / "tuner.pkl").write_bytes(b"stopped")
    env = {**_env(ray_tmp), "KERAS_BACKEND": "nosuch"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "best dense    NONE: 1 trial errored (see the error column of " in proc.stdout
    with open(tmp_path / "failing" / "trials.csv") as f:
        (row,) = csv.DictReader(f)
    assert row["status"] == "error"
    assert row["error"].startswith("ValueError: Unable to import backend : nosuch"), row["error"]
    assert "ray::" not in row["error"]
    report = (tmp_path / "failing" / "report" / "report.md").read_text()
    assert "1 trial errored" in report


def test_trials_start_heaviest_variant_first_and_ties_keep_their_order():
    sweep = _load_sweep_module()
    order = sweep.heaviest_first(["dense", "vae", "sparse", "conv", "denoise", "seq2seq"])
    assert order == ["denoise", "conv", "seq2seq", "vae", "dense", "sparse"]


@pytest.fixture(scope="module")
def seeded_runs(tmp_path_factory, shared_head, shared_ray):
    """The same small sweep (--seed 7) under TensorFlow on the tests' shared head (two
    samples per variant), then under JAX on a Ray of its own on a machine without
    TensorFlow (as the lent GPU machines are; its workers must not find it either),
    one sample per variant: a JAX trial costs several TF ones on this CPU."""
    pytest.importorskip("jax")
    assert_head_up(shared_head)
    runs = {}
    for backend, samples in (("tensorflow", "2"), ("jax", "1")):
        tmp = tmp_path_factory.mktemp(backend)
        cmd = [sys.executable, str(SWEEP), "--data", str(MNIST), "--models", "dense", "denoise"]
        cmd += ["--num-samples", samples, "--epochs", "1", "--limit", "300", "--test-limit", "100"]
        cmd += ["--scheduler", "fifo", "--seed", "7", "--storage-path", str(tmp)]
        cmd += ["--name", "seeded", "--set", "denoise.batch_size=32"]
        if backend == "tensorflow":
            env, ray_tmp = _env(None, shared_ray), None
            cmd += ["--no-figures"]
        else:
            ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
            env = without_tensorflow(_env(ray_tmp), tmp)
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            leftover = _ray_left(ray_tmp) if ray_tmp else []
        finally:
            if ray_tmp:
                kill_ray(ray_tmp)
        runs[backend] = {"proc": proc, "exp": tmp / "seeded", "leftover": leftover}
    return runs


def _sampled(run: dict) -> list[tuple]:
    """(model, *sorted hp_ items) of every trial, in trial order."""
    assert run["proc"].returncode == 0, run["proc"].stdout[-3000:] + run["proc"].stderr[-3000:]
    with open(run["exp"] / "trials.csv") as f:
        rows = sorted(csv.DictReader(f), key=lambda row: row["trial_id"])
    return [
        (row["model"], *sorted((k, v) for k, v in row.items() if k.startswith("hp_")))
        for row in rows
    ]


def test_the_same_seed_samples_the_same_hyperparameters(seeded_runs):
    """Random search draws from a generator seeded by --seed, not numpy's global state
    (nor anything of the backend's): the JAX run's trials are the first trials the TF
    run drew, and every trial, repeats of a variant too, drew values of its own."""
    tf_trials, jax_trials = _sampled(seeded_runs["tensorflow"]), _sampled(seeded_runs["jax"])
    assert sorted(t[0] for t in tf_trials) == ["denoise", "denoise", "dense", "dense"]
    assert sorted(t[0] for t in jax_trials) == ["denoise", "dense"]
    assert jax_trials == tf_trials[: len(jax_trials)]
    rates = {dict(t[1:])["hp_learning_rate"] for t in tf_trials}
    assert len(rates) == 4  # each trial drew its own: the search did sample


def test_pinned_values_are_what_the_trials_configs_say(seeded_runs):
    """A pinned key was still sampled into every trial's config, which Tune shows and
    keeps: its progress table, each trial's params.json and result.json and TensorBoard's
    hyperparameters said the trials of `--set denoise.batch_size=32` trained at 64 and
    128 (trials.csv, best/ and the report, which apply the pins, said 32)."""
    for backend, run in seeded_runs.items():
        exp = run["exp"]
        params = [json.loads(p.read_text()) for p in exp.glob("denoise_*/params.json")]
        results = [
            json.loads(p.read_text().splitlines()[-1]) for p in exp.glob("denoise_*/result.json")
        ]
        assert len(params) == len(results) == (2 if backend == "tensorflow" else 1), backend
        for config in [p for p in params] + [r["config"] for r in results]:
            assert config["hparams"]["denoise"]["batch_size"] == 32, (backend, config)
        with open(exp / "trials.csv") as f:
            rows = [row for row in csv.DictReader(f) if row["model"] == "denoise"]
        assert [row["hp_batch_size"] for row in rows] == ["32"] * len(params), backend


def _in_a_fresh_process_with_sweep(body: str, timeout: int):
    """Runs `body` in a new Python with jobs/sweep.py loaded as `m` (json and sys
    imported), and returns the JSON its last line of output prints."""
    code = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('sweep', {str(SWEEP)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n" + body
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(Path(tempfile.gettempdir())),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_trial_trains_and_saves_without_the_imports_it_skipped(tmp_path):
    """Trials import Keras with Matplotlib, scikit-learn and JAX left out (UNUSED_IMPORTS:
    seconds of CPU each); aelib's own saving, without figures, must not import them
    after all (its stale-figure names came from aelib.plots, which loads pyplot)."""
    loaded = _in_a_fresh_process_with_sweep(
        "with m._optional_imports_skipped(m.UNUSED_IMPORTS):\n"
        "    import keras, aelib\n"
        f"config = aelib.TrainConfig(model='dense', epochs=1, limit=64, data={str(MNIST)!r})\n"
        f"aelib.train(config, out_dir={str(tmp_path)!r}, figures=False, verbose=0)\n"
        "print(json.dumps(sorted(n for n in m.UNUSED_IMPORTS if n in sys.modules)))\n",
        timeout=180,
    )
    assert loaded == []
    assert (tmp_path / "dense.keras").is_file()


def test_driver_checks_and_loads_data_without_importing_keras():
    """The driver reads aelib's variants from its builders' source and loads MNIST with
    aelib.data alone, so it starts without Keras/TensorFlow; what it reads must be what
    aelib's registry holds."""
    out = _in_a_fresh_process_with_sweep(
        "options = {k: sorted(v) for k, v in m.variant_options().items()}\n"
        f"(x, y), (xt, yt) = m._aelib_module('data').load_mnist({str(MNIST)!r})\n"
        "m._aelib_module('process')  # (a sweep's lock on its experiment)\n"
        "heavy = sorted(n for n in ('keras', 'tensorflow', 'aelib') if n in sys.modules)\n"
        "print(json.dumps({'options': options, 'shape': list(x.shape), 'heavy': heavy}))\n",
        timeout=120,
    )
    assert out["heavy"] == []
    assert out["shape"] == [60000, 28, 28]
    import aelib

    assert out["options"] == {m: sorted(aelib.model_defaults(m)) for m in aelib.list_models()}


def test_unknown_pinned_option_fails_before_ray_starts(tmp_path, ray_tmp, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "local")
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))  # a Ray started here would leave a session
    sweep = _load_sweep_module()
    args = ["--data", str(MNIST), "--storage-path", str(tmp_path), "--name", "bad"]
    args += ["--models", "dense", "--set", "dense.dropout=0.1"]
    with pytest.raises(SystemExit) as e:
        sweep.main(args)
    # it names the --set and the variant's own fields (not denoise's noise_factor)
    said = "sweep.py: error: --set dense.dropout: ['dropout'] are neither model options of dense"
    assert str(e.value).startswith(said), e.value
    assert "'learning_rate'" in str(e.value) and "noise_factor" not in str(e.value), e.value
    assert list(ray_tmp.iterdir()) == []
    assert list(tmp_path.iterdir()) == []


def test_resume_without_an_experiment_fails_clearly(tmp_path):
    sweep = _load_sweep_module()
    args = ["--data", str(MNIST), "--storage-path", str(tmp_path), "--name", "none", "--resume"]
    with pytest.raises(SystemExit, match="no experiment to resume at"):
        sweep.main(args)
    assert list(tmp_path.iterdir()) == []
    # Stopped after Tune wrote its tuner.pkl but before its experiment state: nothing to
    # resume (Tuner.restore started it anew without its settings, every trial failed),
    # and a plain rerun is not refused.
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "tuner.pkl").write_bytes(b"")
    assert not sweep.restorable(str(stopped))
    with pytest.raises(SystemExit, match="no experiment to resume at"):
        sweep.main([*args[:-2], "stopped", "--resume"])
    (stopped / "experiment_state-2026-12-05_03-40-00.json").write_text("{}")
    assert sweep.restorable(str(stopped))


@pytest.mark.parametrize("state", ["experiment_state-*.json", "basic-variant-state-*.json"])
def test_a_resume_from_a_cut_short_tune_state_is_refused(state, smoke, tmp_path, capsys):
    """A full disk (or a kill) that cut short Tune's experiment state, or its search
    algorithm's (a pickle): --resume had Tune log "Failed to restore the run state",
    start the experiment again without its settings and fail every trial (KeyError:
    'model'), and so every later --resume. Now --resume is refused at once, naming the
    file, and the full disk's line says so too."""
    sweep = _load_sweep_module()
    exp = tmp_path / "smoke"
    shutil.copytree(smoke["exp"], exp)
    assert sweep.restorable(str(exp)) and sweep.damaged_state(str(exp)) is None
    cut = max(exp.glob(state))  # (the one Tune restores from)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    before = {p: p.stat().st_mtime_ns for p in exp.rglob("*")}
    args = ["--data", str(MNIST), "--storage-path", str(tmp_path), "--name", "smoke"]
    with pytest.raises(SystemExit) as stop:
        sweep.main([*args, "--smoke-test", "--resume"])
    err = capsys.readouterr().err
    assert stop.value.code == 2, err[-2000:]
    said = f"--name smoke: the sweep's saved state cannot be resumed: Tune's {cut} is cut short"
    assert said in err and f"Choose another --name (or remove {exp})" in err, err[-2000:]
    assert {p: p.stat().st_mtime_ns for p in exp.rglob("*")} == before
    line = sweep._out_of_space_message(str(exp), OSError(28, "No space left on device"))
    assert "so the sweep cannot be resumed" in line and "--resume" not in line, line


def test_a_resume_beside_a_running_sweep_says_it_is_in_use(smoke, tmp_path, capsys):
    """A running sweep's Tune copies its state into the folder in place, so a --resume
    beside it could read a file half written: it said the state was cut short and to
    remove the folder (of the running sweep), where the lock says it is in use. (The
    half-written file is simulated, as is the running sweep: its lock held here.)"""
    sweep = _load_sweep_module()
    exp = tmp_path / "smoke"
    shutil.copytree(smoke["exp"], exp)
    cut = max(exp.glob("experiment_state-*.json"))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    args = ["--data", str(MNIST), "--storage-path", str(tmp_path), "--name", "smoke"]
    with sweep.one_sweep_at_a_time(str(exp)):
        with pytest.raises(SystemExit) as stop:
            sweep.main([*args, "--smoke-test", "--resume"])
    assert "is in use by another sweep" in str(stop.value.code), stop.value.code
    assert "cut short" not in capsys.readouterr().err


def test_another_programs_tune_experiment_at_the_name_is_refused(tmp_path, ray_tmp):
    """--name a folder where another program ran Tune: the plain run said "Pass --resume
    to continue it", and --resume, taking it for a sweep of an older version, ended in
    Tune's traceback (another trainable) once Ray had started. Both are refused at once,
    saying why, and leave it as it was."""
    program = (
        "import ray\nfrom ray import tune\n"
        "def f(config):\n    tune.report({'score': config['x']})\n"
        "ray.init(num_cpus=1, include_dashboard=False)\n"
        "tune.Tuner(f, param_space={'x': tune.grid_search([1, 2])}, run_config="
        f"tune.RunConfig(name='theirs', storage_path={str(tmp_path)!r})).fit()\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", program], env=_env(ray_tmp), capture_output=True, timeout=300
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    theirs = tmp_path / "theirs"
    before = sorted(p.name for p in theirs.iterdir())
    sweep_ray = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # (stays empty: no Ray)
    try:
        cmd = [sys.executable, str(SWEEP), "--data", str(MNIST), "--models", "dense"]
        cmd += ["--storage-path", str(tmp_path), "--name", "theirs"]
        for resume in ([], ["--resume"]):
            proc = subprocess.run(
                [*cmd, *resume], env=_env(sweep_ray), capture_output=True, text=True, timeout=120
            )
            assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
            assert (
                f"--name theirs: {theirs} holds a Tune experiment of another program (its "
                "trials run 'f'; a sweep's run 'train_trial')" in proc.stderr
            )
            assert "Pass --resume" not in proc.stderr and "older version" not in proc.stderr
            assert "Traceback" not in proc.stderr and list(sweep_ray.iterdir()) == []
    finally:
        kill_ray(sweep_ray)
    assert sorted(p.name for p in theirs.iterdir()) == before


def test_a_second_sweep_on_a_running_experiment_is_refused(tmp_path):
    """Two sweeps of one --name at once both ran into its folder (two experiment states,
    the results of whichever ended last): the second is refused, naming the first."""
    sweep = _load_sweep_module()
    args = ["--data", str(MNIST), "--storage-path", str(tmp_path), "--name", "busy"]
    args += ["--resume"]  # (without the lock: its own error, not a whole sweep)
    with sweep.one_sweep_at_a_time(str(tmp_path / "busy")):  # (a sweep running)
        with pytest.raises(SystemExit, match=f"in use by another sweep \\(pid {os.getpid()} on"):
            sweep.main(args)
    assert list(tmp_path.iterdir()) == []  # (the folder it made, with nothing else in it)


def test_a_sweep_refused_at_the_lock_leaves_the_running_ones_folder(tmp_path, monkeypatch):
    """Two sweeps that found no folder at the same instant both took it for their own:
    the one refused at the lock removed the other's lock file and folder, and a third
    sweep then ran beside the first. (The instant is simulated: the refused one is made
    to find no folder, as it had just before the first made it.)"""
    sweep = _load_sweep_module()
    exp = tmp_path / "new"
    with sweep.one_sweep_at_a_time(str(exp)):  # the first: it made the folder, holds the lock
        with monkeypatch.context() as m:
            real = os.path.lexists
            m.setattr(os.path, "lexists", lambda p: False if Path(p) == exp else real(p))
            with pytest.raises(SystemExit, match="in use by another sweep"):
                with sweep.one_sweep_at_a_time(str(exp)):
                    pass
        assert sorted(os.listdir(exp)) == [sweep.LOCK]
        with pytest.raises(SystemExit, match="in use by another sweep"):  # and a third
            with sweep.one_sweep_at_a_time(str(exp)):
                pass
    assert not exp.exists()  # (the first's own, with nothing else in it: removed)


def test_a_sweep_removes_the_folder_it_made_while_it_still_holds_the_lock(tmp_path, monkeypatch):
    """A sweep that made the folder and ended before writing anything there removes it,
    and its lock file. It did so once it had let go of the lock: a second sweep that
    took the lock in between lost its lock file and folder, and a third then ran beside
    it. (The instant is simulated: the second sweep tries the lock as the file goes.)"""
    sweep = _load_sweep_module()
    process = sweep._aelib_module("process")
    exp = tmp_path / "new"
    tries = []
    real = os.unlink

    def unlink(path, *a, **kw):
        if Path(path) == exp / sweep.LOCK:
            try:
                with process.held(path, "a second sweep"):
                    tries.append("took the lock")
            except process.Busy:
                tries.append("refused")
        return real(path, *a, **kw)

    with sweep.one_sweep_at_a_time(str(exp)):
        monkeypatch.setattr(os, "unlink", unlink)
    assert tries == ["refused"]
    assert not exp.exists()


def test_gpu_request_on_a_cluster_without_gpus_fails_before_any_trial(tmp_path, ray_tmp):
    """On its own Ray: the driver exits after ray.init, and its Ray must go with it."""
    cmd = [sys.executable, str(SWEEP), "--smoke-test", "--data", str(MNIST), "--models", "dense"]
    cmd += ["--gpus-per-trial", "1", "--storage-path", str(tmp_path), "--name", "gpu"]
    env = _env(ray_tmp)
    env["CUDA_VISIBLE_DEVICES"] = ""  # this machine's Ray must see no GPU
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]  # a usage error, as argparse's
    assert "--gpus-per-trial 1 asks for GPUs but no node" in proc.stderr
    assert "--allow-autoscale" in proc.stderr
    assert not (tmp_path / "gpu").exists()  # no trial, no experiment folder
    assert _ray_left(ray_tmp) == []


def test_a_trial_no_node_type_holds_fails_even_with_allow_autoscale(tmp_path, shared_ray):
    """--allow-autoscale waited without end for a trial that no node type of the cluster
    holds (the autoscaler logged "No available node types can fulfill"): with the node
    types the config `ray up` leaves on the head says, the sweep refuses it at once."""
    cmd = [sys.executable, str(SWEEP), "--smoke-test", "--data", str(MNIST), "--models", "dense"]
    cmd += ["--gpus-per-trial", "1", "--cpus-per-trial", "8", "--allow-autoscale"]
    cmd += ["--storage-path", str(tmp_path), "--name", "beyond"]
    config = REPO / "cluster.yaml"  # (gpu_worker: 4 CPUs, 1 GPU)
    env = {**_env(None, shared_ray), "AELIB_AUTOSCALING_CONFIG": str(config)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "a trial needs {CPU: 8, GPU: 1} (--cpus-per-trial, --gpus-per-trial)" in proc.stderr
    said = f"nor may its autoscaler add one: the node types in {config} have gpu_worker: "
    assert said + "{CPU: 4, GPU: 1}. Lower the request." in proc.stderr
    assert not (tmp_path / "beyond").exists()


def test_a_report_drawn_again_keeps_no_figures_of_an_earlier_one(tmp_path):
    """report/<variant> held an earlier report's figures after a resume that found no
    best model for the variant, or that drew none (--no-figures): report.md no longer
    showed them, yet they stood beside it as if they were of this sweep's models."""
    sweep = _load_sweep_module()
    args = sweep.parse_args(["--data", str(MNIST), "--models", "dense", "--no-figures"])
    old = tmp_path / "report" / "dense"
    old.mkdir(parents=True)
    (old / "dense_reconstructions.png").write_bytes(b"an earlier best's figure")
    (tmp_path / "report" / "compare.png").write_bytes(b"an earlier report's chart")
    digits = np.zeros((4, 28, 28), np.uint8)
    arrays = ((digits, np.zeros(4)), (digits, np.zeros(4)))
    sweep.write_report({}, [], args, arrays, tmp_path)
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["report.md"]
    assert "No best model" in (tmp_path / "report" / "report.md").read_text()


def test_the_reports_counts_and_data_are_what_the_trials_had(tmp_path):
    """It said "1 trials", "up to 1 epochs", "the first 1 test images", "the last tenth"
    held out of 2 training images (1 is), and after a --resume given the same digits at
    another path, named that path alone as the data the trials trained on."""
    import aelib

    sweep = _load_sweep_module()
    assert aelib.TrainConfig().val_split == sweep.VAL_SPLIT  # (the trials')
    flags = ["--data", str(MNIST), "--models", "dense", "--no-figures", "--epochs", "1"]
    args = sweep.parse_args([*flags, "--num-samples", "1"])
    args.first_data = {"data": "/elsewhere/mnist.npz", "data_sha256": "x"}
    digits = np.zeros((3, 28, 28), np.uint8)
    arrays = ((digits[:2], np.zeros(2)), (digits[:1], np.zeros(1)))
    rows = [{"status": "finished", "model": "dense"}]
    sweep.write_report({}, rows, args, arrays, tmp_path)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "1 trial over dense; up to 1 epoch, " in report, report
    assert (
        f"Data: /elsewhere/mnist.npz (resumed with the same digits from {MNIST}); the first 2 "
        "training images (the last 1 of them held out for validation) and the first 1 test "
        "image, on which" in report
    ), report
    del args.first_data["data_sha256"]  # (a sweep of before the digest: not compared)
    sweep.write_report({}, rows, args, arrays, tmp_path)
    assert f"Data: {MNIST}; the first 2" in (tmp_path / "report" / "report.md").read_text()


def test_limits_past_the_datas_size_are_said(tmp_path, capsys):
    """--limit 100000 --test-limit 20000 ran on MNIST's 60,000 and 10,000 without a word
    (its sweep_settings.json says what was asked); `aelib train` notes it, and so does
    the sweep now."""
    sweep = _load_sweep_module()
    data = tmp_path / "small.npz"
    digits = np.zeros((5, 28, 28), np.uint8)
    labels = np.zeros(5, np.int64)
    np.savez(data, x_train=digits, y_train=labels, x_test=digits[:3], y_test=labels[:3])
    flags = ["--data", str(data), "--storage-path", str(tmp_path)]
    (x_train, _), (x_test, _) = sweep.load_arrays(
        sweep.parse_args([*flags, "--limit", "10", "--test-limit", "4"])
    )
    assert (len(x_train), len(x_test)) == (5, 3)
    assert capsys.readouterr().err.splitlines() == [
        "sweep.py: note: --limit 10 is more than the 5 training images; using all 5",
        "sweep.py: note: --test-limit 4 is more than the 3 test images; using all 3",
    ]
    sweep.load_arrays(sweep.parse_args([*flags, "--limit", "5", "--test-limit", "2"]))
    assert capsys.readouterr().err == ""


def test_a_report_drawn_again_replaces_its_figures_one_by_one(tmp_path, monkeypatch):
    """Drawing a report again deleted the earlier one's figures first, and drew its
    compare.png straight onto the file: a driver stopped or killed in between left
    report.md pointing at deleted figures, or a 0-byte chart. Now each figure is
    replaced whole as it is drawn, and only those not drawn again go after."""
    import aelib
    from aelib import data as data_lib

    sweep = _load_sweep_module()
    (x_train, y_train), (x_test, y_test) = data_lib.load_mnist(MNIST)
    arrays = ((x_train[:300], y_train[:300]), (x_test[:60], y_test[:60]))
    config = aelib.TrainConfig(model="dense", epochs=1, batch_size=64)
    result = aelib.train(config, data=arrays, out_dir=tmp_path / "best", figures=False)
    rec = {**result.metrics, "trial_id": "dense_1", "hparams": {"encoding_dim": 32}}
    figures = tmp_path / "report" / "dense"
    figures.mkdir(parents=True)
    (figures / "dense_reconstructions.png").write_bytes(b"an earlier best's figure")
    (figures / "dense_old_name.png").write_bytes(b"a figure this report does not draw")
    (tmp_path / "report" / "compare.png").write_bytes(b"an earlier report's chart")
    (tmp_path / "report" / "report.md").write_text("an earlier report")
    args = sweep.parse_args(["--data", str(MNIST), "--models", "dense"])
    # Stopped while it writes its first figure (a Ctrl-C, or a kill: half a file).
    import matplotlib.figure

    def stopped(fig, path, *args, **kwargs):
        Path(path).write_bytes(b"half a PNG")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(matplotlib.figure.Figure, "savefig", stopped)
        with pytest.raises(KeyboardInterrupt):
            sweep.write_report({"dense": rec}, [], args, arrays, tmp_path)
    assert (tmp_path / "report" / "compare.png").read_bytes() == b"an earlier report's chart"
    assert (figures / "dense_reconstructions.png").read_bytes() == b"an earlier best's figure"
    assert (tmp_path / "report" / "report.md").read_text() == "an earlier report"
    assert not [p.name for p in (tmp_path / "report").rglob(".*")]  # (no temp file left)
    sweep.write_report({"dense": rec}, [], args, arrays, tmp_path)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "![dense reconstructions](dense/dense_reconstructions.png)" in report
    for png in (figures / "dense_reconstructions.png", tmp_path / "report" / "compare.png"):
        assert png.read_bytes().startswith(b"\x89PNG"), png
    assert not (figures / "dense_old_name.png").exists()
    assert not [p.name for p in (tmp_path / "report").rglob(".*")]  # (no temp file left)


def test_no_figures_draws_no_comparison_chart_either(tmp_path):
    """--no-figures ("skip the report's figures") still drew report/compare.png; the
    report keeps the comparison's table."""
    sweep = _load_sweep_module()
    best = {"val_loss": 0.1, "test_bce": 0.1, "test_psnr": 18.0, "test_ssim": 0.8}
    best = {"dense": {**best, "trial_id": "dense_1", "hparams": {"encoding_dim": 32}}}
    digits = np.zeros((4, 28, 28), np.uint8)
    arrays = ((digits, np.zeros(4)), (digits, np.zeros(4)))
    for flags, drawn in (["--no-figures"], False), ([], True):
        args = sweep.parse_args(["--data", str(MNIST), "--models", "dense", *flags])
        args.models = []  # (the per-variant figures need a trained model: not here)
        sweep.write_report(best, [], args, arrays, tmp_path)
        report = (tmp_path / "report" / "report.md").read_text()
        assert "| dense | 0.1000 | 0.1000 | 18.00 | 0.800 | dense_1 |" in report
        assert "it ranks a variant's trials, not the variants" in report
        assert (tmp_path / "report" / "compare.png").is_file() is drawn, flags
        assert ("![compare](compare.png)" in report) is drawn


def test_trials_per_node_counts_each_node_once_with_the_devices_said():
    sweep = _load_sweep_module()
    here = {"hostname": "a", "node_ip": "10.0.0.1"}
    rows = [
        {**here, "device": "CPU"},
        {**here, "device": "GPU (NVIDIA H200)"},
        {**here, "device": "GPU (NVIDIA H200)"},
        {**here, "device": float("nan")},  # stopped before its first epoch: none said
        {"hostname": "b", "node_ip": "10.0.0.2"},
        {"status": "interrupted"},  # pending at a Ctrl-C: no node
    ]
    assert sweep._per_node(rows) == (
        "a (10.0.0.1) 4 (1 on CPU, 2 on GPU (NVIDIA H200), 1 before a first epoch), b (10.0.0.2) 1"
    )


def test_default_gpus_per_trial_is_a_share_in_proportion_to_the_trials_cpus():
    """Trials given no GPU do not see the node's (Ray hides them only from workers it
    gives none), so on a cluster with GPUs each trial gets its share of one by default."""
    sweep = _load_sweep_module()

    def node(cpus, gpus=0, alive=True):
        resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        return {"Alive": alive, "Resources": resources}

    assert sweep.gpus_per_trial([node(2)], 1) == 0  # no GPU: CPUs only, as before
    assert sweep.gpus_per_trial([node(16, 1)], 1) == 0.0625  # the H200 node
    assert sweep.gpus_per_trial([node(16, 1)], 2) == 0.125  # what ran there in 63 s
    assert sweep.gpus_per_trial([node(8), node(4, 1)], 1) == 0.25  # a CPU head, g5 workers
    assert sweep.gpus_per_trial([node(4, 1)], 8) == 1  # at most one GPU
    assert sweep.gpus_per_trial([node(48, 8)], 1) == 0.1666  # Ray's 1e-4 steps, rounded down
    assert sweep.gpus_per_trial([node(4, 1, alive=False), node(32, 1)], 1) == 0.0312


@pytest.mark.ray
def test_a_sweep_on_a_node_with_a_gpu_gives_each_trial_a_share_of_it(tmp_path, monkeypatch):
    """On a Ray head declaring one GPU and 2 CPUs (nothing computes on it: this machine
    has none), a sweep without --gpus-per-trial asks for 1/2 of the GPU per 1-CPU trial,
    says so, and its trials run; each says where it trained (TensorFlow finds no GPU),
    also one that ASHA stops early (its last report is an epoch's). Their processes see
    the GPU Ray gave them (GPU 0, as Ray's workers on a GPU node do); trials of
    --gpus-per-trial 0 on that node see none (they trained on the node's GPUs, out of
    Ray's accounting)."""
    state_dir = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: unix socket paths
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # the node's workers see GPU 0, as on
    state = local.start(None, state_dir, head_cpus=2, head_gpus=1, head_object_store_bytes=10**9)
    monkeypatch.undo()  # a GPU node (Ray sets it only for the workers it gives GPUs)
    try:
        cmd = [sys.executable, str(SWEEP), "--data", str(MNIST), "--no-figures", "--models"]
        cmd += ["dense", "--epochs", "2", "--limit", "300", "--test-limit", "100"]
        cmd += ["--storage-path", str(tmp_path)]
        env = local.client_env(state, _env(None))
        proc = subprocess.run(
            [*cmd, "--num-samples", "2", "--name", "g"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        none = subprocess.run(
            [*cmd, "--num-samples", "1", "--epochs", "1", "--gpus-per-trial", "0", "--name", "n"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        local.stop(state_dir, remove=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "--gpus-per-trial 0.5: this cluster has GPUs" in proc.stdout, proc.stdout[-2000:]
    with open(tmp_path / "g" / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["device"] for r in rows} == {"CPU"}, rows
    assert {r["visible_gpus"] for r in rows} == {"0"}, rows
    assert none.returncode == 0, none.stdout[-2000:] + none.stderr[-3000:]
    with open(tmp_path / "n" / "trials.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert row["status"] == "finished" and row["visible_gpus"] == "", row
    assert {r["status"] for r in rows} <= {"finished", "stopped_early"}
    # every epoch's report names the device, so a trial stopped early (whose last report
    # is an epoch's) has it too: Tune's result.json, one line per report
    reports = [
        json.loads(line)
        for path in (tmp_path / "g").glob("*/result.json")
        for line in path.read_text().splitlines()
    ]
    assert len(reports) > 2, len(reports)  # epochs' reports, not only the final ones
    assert {r.get("device") for r in reports} == {"CPU"}


def test_sweep_runs_under_jax_without_tensorflow(seeded_runs):
    """The lent GPU machines have JAX but no TensorFlow: trials and the driver must not
    import it when Keras runs on JAX."""
    run = seeded_runs["jax"]
    proc, exp = run["proc"], run["exp"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(exp / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["model"], r["status"]) for r in rows) == [
        ("denoise", "finished"),
        ("dense", "finished"),
    ]
    for model in ("dense", "denoise"):
        assert (exp / "best" / f"{model}.keras").stat().st_size > 0
    assert (exp / "report" / "report.md").is_file()
    assert run["leftover"] == []


def test_tunes_warning_of_a_trial_with_no_results_yet_is_dropped():
    """A --resume of a sweep stopped before a trial's first epoch logged Tune's "Failed to
    fetch metrics ... FileNotFoundError", which read as a broken experiment; other
    failures to read a trial's results are still logged."""
    import logging

    sweep = _load_sweep_module()
    sweep._no_tune_restore_hint()
    logger = logging.getLogger("ray.tune.analysis.experiment_analysis")
    missing = (
        "- train_trial_1f2e3_00003: FileNotFoundError('Could not fetch metrics for "
        "train_trial_1f2e3_00003: both result.json and progress.csv were not found at /x')"
    )
    broken = "- train_trial_1f2e3_00004: JSONDecodeError('Expecting value: line 1 column 1')"
    records = []
    handler = logging.Handler()  # (Ray's loggers may not propagate to pytest's at the root)
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        logger.warning(f"Failed to fetch metrics for 1 trial(s):\n{missing}")
        logger.warning(f"Failed to fetch metrics for 2 trial(s):\n{missing}\n{broken}")
        logger.warning("")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage().count("\n") for r in records] == [2, 0]


def test_a_trial_error_is_one_plain_line():
    """Keras wraps parts of some messages in terminal colour codes; trials.csv and the
    report got them raw (ESC[1m ... ESC[0m)."""
    sweep = _load_sweep_module()
    error = ValueError("Input 0 of layer \x1b[1m'reconstruction'\x1b[0m is\n  incompatible")
    said = "ValueError: Input 0 of layer 'reconstruction' is incompatible"
    assert sweep._error_text(SimpleNamespace(cause=error)) == said  # as a RayTaskError holds it
    traceback = "Traceback (most recent call last):\n  File x\n" + said.replace("'r", "\x1b[1m'r")
    assert sweep._error_text(traceback) == said


def test_a_stopped_sweep_counts_the_trials_tune_had_not_made_yet(tmp_path):
    """Tune makes trials as --max-concurrent and its limit on pending trials allow: a
    sweep of 2 variants x 2 samples stopped (Ctrl-C) after its first trials, run one at
    a time, had 2 trials, both finished, and said "interrupted: 0 of 2 trials did not
    finish" and "2 trials over dense, vae" in its report, as if nothing were left."""
    sweep = _load_sweep_module()
    args = sweep.parse_args(
        ["--data", str(MNIST), "--models", "dense", "vae", "--num-samples", "2", "--no-figures"]
    )
    rows = [
        {"model": "dense", "status": "finished", "trial_id": "a_00001"},
        {"model": "vae", "status": "interrupted", "trial_id": "a_00000"},
    ]
    # denoise's scoring noise: recorded, or for a trial of an older sweep (scored at the
    # noise it trained at, none recorded) its own noise_factor, not "unknown"
    assert sweep._noise_text({"eval_noise_factor": 0.5, "hparams": {"noise_factor": 0.3}}) == "0.5"
    assert sweep._noise_text({"hparams": {"noise_factor": 0.30082}}) == "0.301"
    assert sweep._noise_text({}) == "unknown"
    line = sweep._interrupted_line(rows, args)
    assert "interrupted: 3 of 4 trials did not finish (2 not started;" in line, line
    digits = np.zeros((4, 28, 28), np.uint8)
    arrays = ((digits, np.zeros(4)), (digits, np.zeros(4)))
    sweep.write_report({}, rows, args, arrays, tmp_path)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "2 of 4 trials over dense, vae" in report, report
    assert "finished 1, interrupted 1; 2 not started" in report, report
    # A variant whose best is of fewer trials than it ran says what became of the others.
    rec = {"val_loss": 0.1, "test_bce": 0.1, "test_psnr": 20.0, "test_ssim": 0.5}
    best = {"dense": {**rec, "trial_id": "a_00001", "hparams": {"learning_rate": 0.001}}}
    rows.append({"model": "dense", "status": "error", "trial_id": "a_00004"})
    sweep.write_report(best, rows, args, arrays, tmp_path)
    report = (tmp_path / "report" / "report.md").read_text()
    said = "Its 2 trials: error 1, finished 1 (see the error column of trials.csv)."
    assert said in report.split("## dense")[1].split("## vae")[0], report
    rows.pop()
    rows.append({"model": "dense", "status": "interrupted", "trial_id": "a_00002"})
    rows.append({"model": "vae", "status": "interrupted", "trial_id": "a_00003"})
    assert "interrupted: 3 of 4 trials did not finish (the report" in sweep._interrupted_line(
        rows, args
    )


def test_a_resumed_asha_sweep_keeps_the_scores_at_its_rungs(monkeypatch):
    """Tune restores a sweep's scheduler as it was pickled when the sweep started
    (tuner.pkl), with no scores at its rungs: a trial reaching a rung after --resume was
    compared with none of those that passed it before, and trained on where the unstopped
    sweep stopped it. RungsKept keeps the scores with the experiment's state (Tune's
    callback state), and the restored callback puts them into the restored scheduler."""
    import pickle

    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    sweep = _load_sweep_module()
    monkeypatch.setitem(sys.modules, sweep.__name__, sweep)  # (pickled by reference)
    scheduler = sweep.VariantASHA(max_t=4, grace_period=1)
    scheduler.set_search_properties(sweep.METRIC, sweep.MODE)
    at_start = pickle.dumps({"scheduler": scheduler, "callbacks": [sweep.RungsKept(scheduler)]})

    def trial(name, model="dense"):
        return Trial("train_trial", config={"model": model}, trial_id=name, stub=True)

    def epoch_1(scheduler, trial, loss):
        return scheduler.on_trial_result(None, trial, {"training_iteration": 1, sweep.METRIC: loss})

    for name, loss in (("a", 0.12), ("b", 0.10)):
        scheduler.on_trial_add(None, trial(name))
        assert epoch_1(scheduler, trial(name), loss) == TrialScheduler.CONTINUE
    saved = pickle.dumps(pickle.loads(at_start)["callbacks"][0].get_state())  # (empty)
    live = sweep.RungsKept(scheduler).get_state()
    assert live["rungs"]["dense"][0][-1] == (1, {"a": -0.12, "b": -0.10})  # (ASHA maximizes)

    for state, expected in ((live, TrialScheduler.STOP), (pickle.loads(saved), "CONTINUE")):
        restored = pickle.loads(at_start)
        callback, again = restored["callbacks"][0], restored["scheduler"]
        assert callback.scheduler is again  # (one pickle, as tuner.pkl)
        callback.set_state(pickle.loads(pickle.dumps(state)))  # (Tune: before the trials)
        for name in ("a", "b", "c"):
            again.on_trial_add(None, trial(name))
        # c, worse than both at epoch 1, is stopped as the unstopped sweep stops it; with
        # the rungs as Tune restored them (none), it went on.
        assert epoch_1(again, trial("c"), 0.90) == expected
        if expected == TrialScheduler.STOP:  # another variant's are compared with its own
            again.on_trial_add(None, trial("d", "conv"))
            assert epoch_1(again, trial("d", "conv"), 5.0) == TrialScheduler.CONTINUE
