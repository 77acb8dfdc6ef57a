"""The benchmark scripts' flags: a bad value is argparse's usage error naming the flag
(exit 2, no traceback), given before any work (no data loaded, no model trained)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from helpers import MNIST, REPO, ray_left

# Each script with the flags it requires, so that the flag under test is the one refused.
REQUIRED = {
    "bench_denoise": ["--work", "{tmp}/work"],
    "bench_gpu": ["--work", "{tmp}/work", "--out", "{tmp}/out", "--data", str(MNIST)],
    "bench_overhead": ["--out", "{tmp}/out"],
    "bench_s3": ["--model", __file__, "--images", "{tmp}", "--variant", "a="],
    "bench_sweep": ["--data", str(MNIST)],
    "bench_tf_data": ["--data", str(MNIST)],
}


def _run(script: str, flags: list[str], tmp_path) -> subprocess.CompletedProcess:
    args = [a.format(tmp=tmp_path) for a in REQUIRED.get(script, [])] + flags
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / f"{script}.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )


def _assert_usage_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for word in words:
        assert word in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("script", sorted(REQUIRED))
@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_repeats_below_one_is_a_usage_error(script, value, tmp_path):
    proc = _run(script, ["--repeats", value], tmp_path)
    _assert_usage_error(proc, "argument --repeats", ">= 1", value)


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--models", "bogus"], ["--models bogus", "expected a comma list of", "denoise"]),
        (["--models", "dense,bogus"], ["--models dense,bogus", "expected a comma list of"]),
        (["--models", ","], ["--models ,", "expected a comma list of"]),
        (["--metrics-limits", "100,abc"], ["--metrics-limits 100,abc", "numbers >= 1"]),
        (["--metrics-limits", "0"], ["--metrics-limits 0", "numbers >= 1"]),
    ],
)
def test_bench_overhead_refuses_unknown_models_and_bad_metrics_limits(flags, words, tmp_path):
    # (before: a KeyError traceback from tutorial_settings, or int()'s ValueError, after
    # MNIST was loaded and, for a later bad name, after the earlier models had trained)
    _assert_usage_error(_run("bench_overhead", flags, tmp_path), *words)


@pytest.mark.parametrize("value", ["10,abc", "0", "100,-5"])
def test_bench_denoise_refuses_bad_memory_counts_before_training_a_model(value, tmp_path):
    # (before: int()'s ValueError traceback, after the benchmark had trained its model)
    proc = _run("bench_denoise", ["--memory-counts", value], tmp_path)
    _assert_usage_error(proc, f"--memory-counts {value}", "image counts >= 1")
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("value", ["env,trian", "sweep,bogus", ","])
def test_bench_gpu_refuses_an_unknown_step_before_running_any(value, tmp_path):
    # (before: the steps ran in order and an unknown one was refused when reached, after
    # the GPU training and the denoise runs before it)
    proc = _run("bench_gpu", ["--steps", value], tmp_path)
    _assert_usage_error(proc, f"--steps {value}", "env,train,denoise,cpu_actors,sweep")
    assert not (tmp_path / "out" / "gpu_check.json").exists()


@pytest.mark.parametrize("script", ["bench_sweep", "bench_tf_data"])
def test_an_unknown_model_is_a_usage_error(script, tmp_path):
    # (before: aelib's "Unknown model" ValueError as a traceback: bench_sweep's own,
    # bench_tf_data's from the training subprocesses, after their start)
    proc = _run(script, ["--models", "conv", "bogus"], tmp_path)
    _assert_usage_error(proc, "argument --models", "'bogus'", "seq2seq")


def test_the_benchmarks_know_every_variant():
    import aelib

    for script in ("bench_common", "bench_sweep", "bench_tf_data", "bench_overhead"):
        spec = importlib.util.spec_from_file_location(script, REPO / "jobs" / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert list(module.VARIANTS) == list(aelib.list_models()), script


@pytest.mark.parametrize("flag", ["--count", "--startup-count", "--stages"])
def test_bench_denoise_refuses_a_negative_image_count_before_any_work(flag, tmp_path):
    # (before: --count -5 was make_noisy's ValueError as a traceback, after the model
    # was trained)
    proc = _run("bench_denoise", [flag, "-5"], tmp_path)
    _assert_usage_error(proc, f"{flag} -5", "images >= 0")
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("script", ["bench_denoise", "bench_gpu"])
def test_a_missing_model_is_a_usage_error_before_any_work(script, tmp_path):
    # (before: bench_denoise wrote its images, then the plain loop's subprocess failed
    # and main ended in a RuntimeError traceback; bench_gpu ran its steps up to denoise)
    proc = _run(script, ["--model", str(tmp_path / "none.keras")], tmp_path)
    _assert_usage_error(proc, f"--model {tmp_path / 'none.keras'}", "no such file")
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--model", "{tmp}/none.keras", "--images", "{tmp}"], ["--model", "no such file"]),
        (["--model", __file__, "--images", "{tmp}/none"], ["--images", "no such folder"]),
    ],
)
def test_bench_s3_refuses_a_missing_model_or_image_folder(flags, words, tmp_path):
    # (before: a missing folder uploaded nothing and the job ran on an empty bucket; a
    # missing model failed in the job's subprocess, after the upload)
    flags = [f.format(tmp=tmp_path) for f in flags] + ["--variant", "a="]
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "bench_s3.py"), *flags],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    _assert_usage_error(proc, *words)


@pytest.mark.parametrize(
    "script, flag",
    [("bench_sweep", "--num-samples"), ("bench_sweep", "--epochs"), ("bench_tf_data", "--epochs")],
)
def test_zero_trials_or_epochs_is_a_usage_error(script, flag, tmp_path):
    # (before: bench_tf_data's training subprocesses ended in aelib's ValueError
    # traceback; bench_sweep ran its sequential arm, then sweep.py refused the value)
    _assert_usage_error(_run(script, [flag, "0"], tmp_path), f"argument {flag}", ">= 1")


@pytest.mark.parametrize(
    "script", ["bench_denoise", "bench_overhead", "bench_quality", "bench_sweep", "bench_tf_data"]
)
def test_a_missing_data_file_is_a_usage_error(script, tmp_path):
    # (before: aelib's FileNotFoundError as a traceback, for bench_denoise after its model
    # was trained, for bench_tf_data from its training subprocesses)
    missing = str(tmp_path / "none.npz")
    flags = [*(a.format(tmp=tmp_path) for a in REQUIRED.get(script, [])), "--data", missing]
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / f"{script}.py"), *flags],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    _assert_usage_error(proc, f"--data {missing}", "no such file")


def _load_bench_denoise():
    spec = importlib.util.spec_from_file_location("bench_denoise", REPO / "jobs/bench_denoise.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_denoise_times_a_process_tree_by_process_name(tmp_path):
    """timed() sums the CPU seconds of the command's whole process tree and gives them by
    process name (run 17's breakdown of the job's CPU, by actor and Ray process, had no
    command that gave it again): a parent that waits and a child script that spins."""
    bench = _load_bench_denoise()
    (tmp_path / "spin.py").write_text(
        "import time\nend = time.process_time() + 1.5\nwhile time.process_time() < end:\n    pass\n"
    )
    parent = (
        f"import subprocess, sys; subprocess.run([sys.executable, {str(tmp_path / 'spin.py')!r}])"
    )
    result = bench.timed([sys.executable, "-c", parent], tmp_path / "log.txt")
    by_process = result["cpu_by_process"]
    assert 1.0 <= by_process["spin.py"] <= result["cpu_seconds"], by_process
    assert list(by_process)[0] == "spin.py"  # (the most first)
    assert sum(by_process.values()) == pytest.approx(result["cpu_seconds"], abs=0.05)


def test_a_result_names_the_code_that_made_it(tmp_path):
    """bench_common.code_version: the commit of the checkout the script is in, marked
    "+changes" where a tracked Python file or pyproject.toml was edited, not where only
    results or docs were; None outside a git checkout."""
    jobs = tmp_path / "repo" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "bench_common.py").write_bytes((REPO / "jobs" / "bench_common.py").read_bytes())
    (jobs / "results.json").write_text("{}\n")
    code = "import bench_common; print(bench_common.code_version())"

    def version() -> str:
        out = subprocess.run([sys.executable, "-c", code], cwd=jobs, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert version() == "None"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(jobs.parent)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "first"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    assert version() == head.stdout.strip()
    (jobs / "results.json").write_text('{"rows": {}}\n')  # a result written: the same code
    assert version() == head.stdout.strip()
    with open(jobs / "bench_common.py", "a") as f:  # the code edited
        f.write("\n# edited\n")
    assert version() == head.stdout.strip() + "+changes"


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_timed_counts_a_running_process_only_for_the_length_of_the_run(tmp_path):
    """timed(also=[pid]): the CPU seconds of a process that runs already (a Ray head's,
    for the job on a running Ray) count from the start of the run, not from its own."""
    bench = _load_bench_denoise()
    (tmp_path / "spin_forever.py").write_text("while True:\n    pass\n")
    spinner = subprocess.Popen([sys.executable, str(tmp_path / "spin_forever.py")])
    try:
        deadline = time.monotonic() + 60
        while _cpu_seconds(spinner.pid) < 1.5:
            assert time.monotonic() < deadline, "the spinner got no 1.5 CPU-s in 60 s"
            time.sleep(0.1)
        result = bench.timed(
            [sys.executable, "-c", "import time; time.sleep(1.5)"],
            tmp_path / "log.txt",
            also=[spinner.pid],
        )
        total = _cpu_seconds(spinner.pid)
    finally:
        spinner.kill()
        spinner.wait()
    counted = result["cpu_by_process"]["spin_forever.py"]
    assert total >= 1.5 + counted - 0.3, (total, counted)  # (its time before the run: not counted)
    assert 0.2 <= counted <= result["seconds"] + 0.3, (counted, result)
    assert result["cpu_seconds"] == pytest.approx(sum(result["cpu_by_process"].values()), abs=0.05)


@pytest.mark.ray
@pytest.mark.slow
def test_bench_denoise_times_the_job_on_a_ray_head_it_starts_and_stops(tmp_path, ray_tmp):
    """--only job_running_ray: the job connects to a head started before the clock (the
    actors' CPU seconds, in the head's process tree, count), and the head is gone after."""
    import aelib

    model = tmp_path / "denoise.keras"
    aelib.build_model("denoise").autoencoder.save(model)  # (untrained: speed only)
    work = tmp_path / "work"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "bench_denoise.py"),
            *("--data", str(MNIST), "--work", str(work), "--model", str(model)),
            *("--count", "64", "--repeats", "1", "--startup-count", "0"),
            *("--only", "job,job_running_ray", "--settle", "0"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        # (the head's folder: below it) An exported RAY_ADDRESS, as `cluster/local.py env`
        # leaves in the shell, is not joined: `job` starts a Ray of its own (it joined
        # that cluster, its start-up and its actors' CPU out of the figures).
        env={**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": "127.0.0.1:1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "bench: job_running_ray at " in proc.stdout, proc.stdout
    assert "Started a local Ray" in (work / "job.log").read_text()
    log = (work / "job_running_ray.log").read_text()
    assert "denoise: 64 inputs: 64 ok, 0 failed" in log, log[-3000:]
    assert "Connected to Ray cluster" in log and "Started a local Ray" not in log, log[:3000]
    result = json.loads((work / "results_only_job_job_running_ray.json").read_text())
    run = result["speed"]["job_running_ray"]
    assert run["ray_ready_s"] < run["first_result_s"] < run["seconds"], run
    by_process = run["cpu_by_process"]
    actors = [name for name in by_process if name.startswith("ray::MapWorker")]
    assert actors and "denoise.py" in by_process and "raylet" in by_process, by_process
    assert sum(by_process[name] for name in actors) > 1.0, by_process  # (TensorFlow's import)
    # The head's own, which a job that started a Ray of its own would not have.
    assert "ray.util.client.server" in by_process, by_process
    assert any(name.startswith("ray-dashboard-") for name in by_process), by_process
    assert min(by_process.values()) >= 0, by_process
    left = ray_left(ray_tmp, timeout=30)
    assert not left, "processes of the benchmark's Ray head left running:\n" + "\n".join(left)


def test_smaller_benchmark_runs_leave_the_published_results_alone(tmp_path):
    """A smoke run of bench_quality (--limit 200) or bench_overhead without --out replaced
    the published full-size rows in jobs/results: theirs go to scratch folders now."""
    (tmp_path / "jobs" / "results").mkdir(parents=True)
    flags = ["--models", "classical", "--denoisers", "gaussian", "--data", str(MNIST)]
    flags += ["--limit", "200", "--test-limit", "20", "--tune-limit", "20", "--slow-limit", "20"]
    proc = _run("bench_quality", [*flags, "--no-figures"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "results go to runs/bench_quick, not the published jobs/results" in proc.stderr
    assert (tmp_path / "runs" / "bench_quick" / "results.json").is_file()
    assert list((tmp_path / "jobs" / "results").iterdir()) == []
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "bench_overhead.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    said = " ".join(proc.stdout.split())
    assert "(default: runs/bench_overhead; the published ones: --out" in said


@pytest.mark.parametrize(
    "script, flags, words",
    [
        ("bench_sweep", ["--limit", "0"], ["argument --limit", ">= 1"]),
        ("bench_sweep", ["--test-limit", "-5"], ["argument --test-limit", ">= 1"]),
        ("bench_quality", ["--epochs", "0"], ["argument --epochs", ">= 1"]),
        ("bench_quality", ["--slow-limit", "0"], ["argument --slow-limit", ">= 1"]),
        ("bench_quality", ["--tune-limit", "0"], ["argument --tune-limit", ">= 1"]),
        ("bench_overhead", ["--limit", "-5"], ["--limit -5: expected a number of digits"]),
        ("bench_overhead", ["--test-limit", "0"], ["argument --test-limit", ">= 1"]),
        ("bench_denoise", ["--settle", "-1"], ["argument --settle", ">= 0"]),
        (
            "bench_denoise",
            ["--count", "500", "--startup-count", "500"],
            ["--startup-count 500: expected fewer images than --count 500"],
        ),
        (  # (the default's: a note, said before the usage error that ends this one)
            "bench_denoise",
            ["--count", "500", "--only", "nope"],
            ["no start-up split: --count 500 is not above the default --startup-count", "--only"],
        ),
    ],
)
def test_sizes_and_waits_out_of_range_are_usage_errors(script, flags, words, tmp_path):
    # (before: a traceback after the work before it (bench_quality's classical rows, the
    # images bench_denoise writes), or NaN columns written to results.md)
    _assert_usage_error(_run(script, [*flags, "--data", str(MNIST)], tmp_path), *words)
