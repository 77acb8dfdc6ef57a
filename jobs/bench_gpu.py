"""GPU check: training and bulk denoising on one GPU machine, side by side with its CPUs.

    KERAS_BACKEND=jax python jobs/bench_gpu.py --data ../shared/data/mnist.npz \\
        --work /tmp/gpu --out jobs/results/gpu

Made for a machine lent for minutes: every step runs in processes of its own under a
timeout, the whole run under --budget seconds, and the results so far are written to
OUT/gpu_check.json (and the steps' logs to OUT/gpu_check.log) after each step, so a run
cut short still reports the steps it finished. The steps, in this order:

  env      the GPU, Keras's backend and where it computes, the versions
  train    `denoise` on the GPU: --epochs on all 60,000 digits (54,000 to train on),
           seconds per epoch after the first (which compiles), validation PSNR; then the
           same model on the machine's CPUs (JAX_PLATFORMS=cpu for JAX) on --cpu-limit
           digits for 2 epochs; both as training images per second, and their ratio
  denoise  --count noisy digits as PNGs: the plain loop of bench_denoise.py (PIL read,
           `model.predict` on batches of 1,024 on the GPU, PIL write), jobs/denoise.py as
           it starts by default, and the job with each of --job-configs (1 actor per GPU,
           actors sharing it), for --repeats rounds in a rotated order; the median of
           each: images/s, CPU seconds, the ratio to the plain loop, the manifest's count
           of images each device did; and the outputs checked: PSNR against the clean
           digits, and how many pixels differ from the plain loop's
  cpu_actors  the job with --gpus-per-worker 0: every image must be done on a CPU
  sweep    jobs/sweep.py --smoke-test on all seven variants, --sweep-epochs epochs on
           --sweep-limit digits, each trial with --gpus-per-trial of the GPU: its wall
           time, and on which device every trial trained (trials.csv's `device`)

Start-up is included in every time, as a user meets it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import bench_denoise  # noqa: E402  (the plain loop, the timer, the digits as PNGs)
from bench_common import at_least_one, given_file  # noqa: E402

# The job configurations timed against the default one: name=extra flags.
JOB_CONFIGS = (
    "1 actor per GPU=--gpus-per-worker 1",
    "4 actors share the GPU=--gpus-per-worker 0.25",
    "8 actors share the GPU=--gpus-per-worker 0.125",
    "16 actors share the GPU=--gpus-per-worker 0.0625",
)


def _env(**extra: str) -> dict[str, str]:
    env = bench_denoise._env()
    env.update(extra)
    return env


# ----------------------------------------------------------------------------
# The steps' own processes, run as `python jobs/bench_gpu.py _env|_train ...`.


def env_report() -> dict:
    import keras

    from aelib.train import compute_device

    report = {
        "python": platform.python_version(),
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "device": compute_device(),
        "cpus": os.cpu_count(),
    }
    for name in ("jax", "ray", "numpy", "PIL", "pyarrow", "skimage"):
        try:
            report[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001  (reported, not fatal)
            report[name] = f"not importable: {type(e).__name__}: {e}"
    try:
        smi = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"]
        report["nvidia_smi"] = subprocess.run(
            smi, capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        report["nvidia_smi"] = f"{type(e).__name__}: {e}"
    return report


def train_report(model: str, epochs: int, limit: int | None, data: str, out: str) -> dict:
    """Trains `model`, timing each epoch (validation and its PSNR included)."""
    import keras

    import aelib

    class EpochTimes(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._start)

    timer = EpochTimes()
    config = aelib.TrainConfig(model=model, epochs=epochs, limit=limit, data=data)
    result = aelib.train(config, out_dir=out, callbacks=[timer], figures=False, verbose=0)
    steady = sorted(timer.seconds[1:]) or timer.seconds
    per_epoch = steady[len(steady) // 2]  # the median epoch after the first
    images = len(result.splits.x_train)
    keys = ("device", "val_loss", "test_loss", "test_psnr", "noisy_psnr", "psnr_gain")
    return {
        **{k: result.metrics.get(k) for k in keys},
        "train_images": images,
        "epoch_seconds": timer.seconds,
        "steady_epoch_seconds": per_epoch,
        "train_images_per_s": images / per_epoch,
        "model_path": result.paths.get("model"),
    }


# ----------------------------------------------------------------------------
# The driver.


class Run:
    """The results so far, saved after each step; the time left of --budget."""

    def __init__(self, out: Path, budget: float):
        self.out, self.deadline = out, time.monotonic() + budget
        self.results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        self.log = out / "gpu_check.log"
        self.log.write_text("")
        self.outputs = 0  # output folders made

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        text = json.dumps(self.results, indent=2, default=str)
        (self.out / "gpu_check.json").write_text(text)

    def note(self, text: str) -> None:
        print(text, flush=True)
        with open(self.log, "a") as f:
            f.write(text + "\n")

    def command(self, name: str, cmd: list[str], cap: float, env=None) -> tuple[int, str, float]:
        """Runs `cmd` for at most `cap` seconds (less if --budget runs out); appends its
        output to the log. Returns (exit code, output, seconds); 124 when cut short."""
        limit = max(1.0, min(cap, self.left()))
        self.note(f"== {name} (at most {limit:.0f} s): {shlex.join(cmd)}")
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=limit, env=env or _env()
            )
            rc, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc = 124
            output = _text(e.stdout) + _text(e.stderr) + f"\n(cut short after {limit:.0f} s)"
        seconds = time.perf_counter() - start
        with open(self.log, "a") as f:
            f.write(output[-20000:] + f"\n== {name}: exit {rc} after {seconds:.1f} s\n")
        return rc, output, seconds


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def _tagged(output: str, tag: str) -> dict | None:
    for line in reversed(output.splitlines()):
        if line.startswith(tag + " "):
            return json.loads(line.removeprefix(tag + " "))
    return None


def step_env(run: Run) -> None:
    rc, output, _ = run.command("env", [sys.executable, __file__, "_env"], 120)
    run.results["env"] = _tagged(output, "gpu-env") or {"error": output[-2000:], "rc": rc}
    run.note(f"env: {json.dumps(run.results['env'])}")


def step_train(run: Run, args: argparse.Namespace, work: Path) -> str | None:
    """Trains on the GPU, then on the CPUs; returns the GPU-trained model's path."""
    results = run.results.setdefault("train", {})
    model_path = None
    for where, epochs, limit, extra in (
        ("gpu", args.epochs, args.train_limit, {}),
        ("cpu", 2, args.cpu_limit, {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}),
    ):
        if run.left() < 30:
            results[where] = {"skipped": "out of --budget"}
            continue
        cmd = [sys.executable, __file__, "_train", "denoise", str(epochs), str(limit or 0)]
        cmd += [args.data, str(work / f"train_{where}")]
        rc, output, seconds = run.command(f"train on {where}", cmd, args.train_cap, _env(**extra))
        found = _tagged(output, "gpu-train")
        results[where] = {**(found or {"error": output[-2000:]}), "rc": rc, "seconds": seconds}
        run.save()
        if found:
            run.note(
                f"train {where}: {found['device']}: epochs {_seconds(found['epoch_seconds'])}; "
                f"{found['train_images_per_s']:.0f} training images/s after the first epoch; "
                f"test PSNR {found['noisy_psnr']:.2f} -> {found['test_psnr']:.2f} dB"
            )
            if where == "gpu":
                model_path = found["model_path"]
    gpu, cpu = results.get("gpu", {}), results.get("cpu", {})
    if gpu.get("train_images_per_s") and cpu.get("train_images_per_s"):
        ratio = gpu["train_images_per_s"] / cpu["train_images_per_s"]
        results["gpu_over_cpu"] = ratio
        run.note(f"train: the GPU trains {ratio:.1f}x the images/s of {os.cpu_count()} CPUs")
    run.save()
    return model_path


def _seconds(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values) + " s"


def step_denoise(run: Run, args: argparse.Namespace, work: Path, model: str) -> None:
    """The plain loop, the job as it starts by default, and the job under each of
    --job-configs, for --repeats rounds, each in a rotated order; the median run of
    each, and its ratio to the plain loop's."""
    results = run.results.setdefault("denoise", {"count": args.count})
    noisy = _images(run, args, work)
    methods: dict[str, list[str] | None] = {"plain loop": None, "job (default)": []}
    for text in args.job_configs:
        name, _, flags = text.partition("=")
        methods[f"job, {name}"] = shlex.split(flags)
    names = list(methods)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    kept: dict[str, Path] = {}
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if run.left() < 45:
                run.note(f"denoise: {name}, round {r + 1}: skipped, out of --budget")
                continue
            result, out = _denoise_once(run, work, model, noisy, name, methods[name])
            runs[name].append(result)
            if name in ("plain loop", "job (default)") and name not in kept:
                kept[name] = out  # for the check of the outputs, below
            else:
                shutil.rmtree(out, ignore_errors=True)
            results[name] = _median(runs[name], args.count)
            run.save()
    plain = results.get("plain loop", {}).get("images_per_s")
    for name in names[1:]:
        rate = results.get(name, {}).get("images_per_s")
        if rate and plain:
            results[name]["over_plain"] = rate / plain
            run.note(f"denoise: {name}: {rate / plain:.2f}x the plain loop (medians)")
    if len(kept) == 2:
        clean = noisy.parent / "clean"
        results["quality"] = _quality(noisy, clean, kept["plain loop"], kept["job (default)"])
        run.note(f"denoise: outputs checked: {json.dumps(results['quality'])}")
    for out in kept.values():
        shutil.rmtree(out, ignore_errors=True)
    run.save()


def step_cpu_actors(run: Run, args: argparse.Namespace, work: Path, model: str) -> None:
    """The job with --gpus-per-worker 0 on a GPU machine: its actors must compute on
    their CPUs (the manifest's `device`), not on the GPU Ray did not give them."""
    if run.left() < 45:
        run.results["cpu_actors"] = {"skipped": "out of --budget"}
        return
    noisy = _images(run, args, work)
    flags = ["--gpus-per-worker", "0"]
    result, out = _denoise_once(run, work, model, noisy, "job, CPU actors only", flags)
    shutil.rmtree(out, ignore_errors=True)
    if "seconds" in result:
        result["images_per_s"] = args.count / result["seconds"]
    run.results["cpu_actors"] = result
    run.save()


def _images(run: Run, args: argparse.Namespace, work: Path) -> Path:
    start = time.perf_counter()
    noisy = bench_denoise.ensure_images(args.data, work, args.count, args.count)
    seconds = time.perf_counter() - start
    if seconds > 1:
        run.results.setdefault("denoise", {})["write_pngs_seconds"] = seconds
        run.note(f"denoise: {args.count} noisy PNGs written in {seconds:.1f} s")
    return noisy


def _denoise_once(run, work, model, noisy, name, flags) -> tuple[dict, Path]:
    """One timed run of the plain loop (`flags` None) or of the job with `flags`."""
    run.outputs += 1
    out = work / f"out_{run.outputs}"
    shutil.rmtree(out, ignore_errors=True)
    if flags is None:
        cmd = [*bench_denoise._command("plain", model, noisy), str(out)]
    else:
        cmd = [*bench_denoise._command("job", model, noisy), str(out), *flags]
    log = work / "denoise.log"
    run.note(f"== denoise: {name}: {shlex.join(cmd)}")
    try:
        result = bench_denoise.timed(cmd, log)  # (no timeout: each run is small)
    except RuntimeError as e:
        result = {"error": str(e)}
    with open(run.log, "a") as f:
        f.write(log.read_text()[-6000:] + "\n")
    if "seconds" in result:
        result.update(bench_denoise._job_startup(log))
        result.update(_manifest_counts(out))
    run.note(f"denoise: {name}: {_describe(result)}")
    return result, out


def _median(runs: list[dict], count: int) -> dict:
    """The run of median seconds (of two, their mean, beside the faster run's details)."""
    timed = sorted((r for r in runs if "seconds" in r), key=lambda r: r["seconds"])
    if not timed:
        return {"runs": runs}
    median = dict(timed[(len(timed) - 1) // 2])
    median["seconds"] = statistics.median(r["seconds"] for r in timed)
    median["cpu_seconds"] = statistics.median(r["cpu_seconds"] for r in timed)
    median["images_per_s"] = count / median["seconds"]
    median["all_seconds"] = [r["seconds"] for r in runs if "seconds" in r]
    return median


def _manifest_counts(out: Path) -> dict:
    """Rows by status and `ok` rows by device, from the job's manifest (none for the loop)."""
    path = out / "manifest.parquet"
    if not path.is_file():
        return {}
    import pyarrow.parquet as pq

    rows = pq.read_table(path, columns=["status", "device"]).to_pylist()
    status: dict[str, int] = {}
    device: dict[str, int] = {}
    for row in rows:
        status[row["status"]] = status.get(row["status"], 0) + 1
        if row["status"] == "ok":
            device[row["device"]] = device.get(row["device"], 0) + 1
    return {"status": status, "ok_by_device": device}


def _describe(result: dict) -> str:
    if "seconds" not in result:
        return json.dumps(result)[-1500:]
    text = f"{result['seconds']:.1f} s, {result['cpu_seconds']:.1f} CPU-s"
    if "first_result_s" in result:
        ready, first = result["ray_ready_s"], result["first_result_s"]
        text += f"; Ray ready {ready:.1f} s, first results {first:.1f} s"
    if "status" in result:
        text += f"; {result['status']}, ok by device {result['ok_by_device']}"
    return text


def _quality(noisy: Path, clean: Path, plain: Path, job: Path, sample: int = 2000) -> dict:
    """Mean PSNR of the noisy inputs and of the job's outputs against the clean digits,
    and how many pixels of the job's outputs differ from the plain loop's (both the
    same model on the same GPU), on the first `sample` files."""
    import numpy as np
    from PIL import Image
    from skimage.metrics import peak_signal_noise_ratio as psnr

    def gray(path: Path):
        with Image.open(path) as image:
            return np.asarray(image.convert("L"))

    files = sorted(p.relative_to(noisy) for p in noisy.rglob("*.png"))[:sample]
    before, after, differ, far, pixels = [], [], 0, 0, 0
    for rel in files:
        ref, out, loop = gray(clean / rel), gray(job / rel), gray(plain / rel)
        before.append(psnr(ref, gray(noisy / rel), data_range=255))
        after.append(psnr(ref, out, data_range=255))
        gap = np.abs(out.astype(int) - loop.astype(int))
        differ += int(np.count_nonzero(gap))
        far += int(np.count_nonzero(gap > 1))
        pixels += gap.size
    return {
        "files": len(files),
        "noisy_psnr": float(np.mean(before)),
        "job_psnr": float(np.mean(after)),
        "pixels_differing_from_plain": differ / max(pixels, 1),
        "pixels_differing_by_more_than_1": far / max(pixels, 1),
    }


def step_sweep(run: Run, args: argparse.Namespace, work: Path) -> None:
    results = run.results.setdefault("sweep", {})
    if run.left() < 60:
        results["skipped"] = "out of --budget"
        return
    store = work / "sweeps"
    shutil.rmtree(store, ignore_errors=True)
    cmd = [sys.executable, str(HERE / "sweep.py"), "--smoke-test", "--data", args.data]
    cmd += ["--epochs", str(args.sweep_epochs), "--limit", str(args.sweep_limit)]
    cmd += ["--test-limit", "2000", "--gpus-per-trial", str(args.gpus_per_trial)]
    cmd += ["--cpus-per-trial", str(args.cpus_per_trial), "--no-figures"]
    cmd += ["--storage-path", str(store), "--name", "gpu"]
    rc, output, seconds = run.command("sweep", cmd, args.sweep_cap)
    results.update({"rc": rc, "seconds": seconds})
    table = store / "gpu" / "trials.csv"
    if table.is_file():
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
        keep = ("model", "status", "device", "val_loss", "test_psnr", "time_total_s", "error")
        results["trials"] = [{k: row.get(k) for k in keep} for row in rows]
    run.save()
    run.note(f"sweep: exit {rc} in {seconds:.0f} s")
    for row in results.get("trials", []):
        run.note(f"sweep:   {json.dumps(row)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_env":
        print("gpu-env " + json.dumps(env_report()), flush=True)
        return 0
    if argv and argv[0] == "_train":
        model, epochs, limit, data, out = argv[1:6]
        found = train_report(model, int(epochs), int(limit) or None, data, out)
        print("gpu-train " + json.dumps(found, default=float), flush=True)
        return 0
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default=os.environ.get("AELIB_MNIST"), help="mnist.npz")
    p.add_argument("--work", required=True, help="folder for models, images and outputs")
    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.log")
    p.add_argument("--budget", type=float, default=420, help="seconds for the whole run")
    p.add_argument(
        "--steps", default="env,train,denoise,cpu_actors,sweep", help="comma list, in order"
    )
    p.add_argument("--epochs", type=int, default=4, help="GPU training epochs (first compiles)")
    p.add_argument("--train-limit", type=int, default=None, help="digits (default: all 60,000)")
    p.add_argument("--cpu-limit", type=int, default=12000, help="digits for the CPU training")
    p.add_argument("--train-cap", type=float, default=150, help="seconds per training run")
    p.add_argument("--model", default=None, help="a denoise .keras (default: the GPU-trained)")
    p.add_argument("--count", type=int, default=50_000, help="noisy digits to denoise")
    p.add_argument(
        "--job-configs",
        nargs="*",
        default=list(JOB_CONFIGS),
        metavar="NAME=FLAGS",
        help="job configurations timed beside the default one",
    )
    p.add_argument("--repeats", type=at_least_one, default=1, help="rounds of the denoise runs")
    p.add_argument("--sweep-epochs", type=int, default=3)
    p.add_argument("--sweep-limit", type=int, default=60000)
    p.add_argument("--gpus-per-trial", type=float, default=0.125)
    p.add_argument("--cpus-per-trial", type=float, default=2)
    p.add_argument("--sweep-cap", type=float, default=240, help="seconds for the sweep")
    args = p.parse_args(argv)
    if not args.data or not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file (mnist.npz)")
    given_file(p, "--model", args.model, "a trained denoise .keras")
    steps = [s for s in args.steps.split(",") if s]
    known = ("env", "train", "denoise", "cpu_actors", "sweep")
    if not steps or set(steps) - set(known):
        p.error(f"--steps {args.steps}: expected a comma list of {','.join(known)}")
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, args.budget)
    model = args.model
    for step in steps:
        if step == "env":
            step_env(run)
        elif step == "train":
            model = step_train(run, args, work) or model
        elif step == "denoise":
            if model is None:
                model = bench_denoise.ensure_model(argparse.Namespace(**vars(args)), work)
            step_denoise(run, args, work, model)
        elif step == "cpu_actors":
            if model is None:
                model = bench_denoise.ensure_model(argparse.Namespace(**vars(args)), work)
            step_cpu_actors(run, args, work, model)
        elif step == "sweep":
            step_sweep(run, args, work)
        else:
            p.error(f"--steps: unknown step {step!r}")
        run.save()
    run.results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    run.save()
    run.note(f"results: {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
