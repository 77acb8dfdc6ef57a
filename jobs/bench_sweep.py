"""Benchmark: is a Ray Tune sweep faster than training the same trials one by one?

    python jobs/bench_sweep.py --data /work/shared/data/mnist.npz

Runs one fixed set of small trials (every searched hyperparameter pinned to
aelib's default, so both sides train exactly the same models), side by side:

  (a) sequential: one Python process calls aelib.train for each trial in turn
      (TensorFlow's default threading, so it may use every core);
  (b) the sweep: `jobs/sweep.py` with --max-concurrent 2, 1 CPU per trial, FIFO;
  (c) the sweep with --max-concurrent 1, to show how it scales from 1 to 2;
  (d) two plain Python processes (no Ray), one TensorFlow thread each, taking
      the trials heaviest first as the sweep does: what two concurrent trials
      can give on this machine at all, so (b)/(d) is Tune's own cost;
  (e) with --other-sweep FILE: (b) again with another sweep.py (an earlier
      revision: `git show REV:jobs/sweep.py > FILE`), to compare two versions
      side by side, start-up included.

Each side is timed end to end as its own process (interpreter and TensorFlow
start, Ray start, writing results). With --repeats N the sides run N rounds,
each round in a rotated order, and the medians are compared; the (b)/(a) ratio
of each round is printed too, since the two ran minutes apart on the same
machine. Nothing is asserted: on a shared machine the numbers move.

The sweep's own costs show in the breakdown printed for (b) and (c): start-up
(Ray, the driver's imports) until the first trial begins, the trials, and the
results (table, best models, report) after the last one ends.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # (also when loaded by its path, as the tests do)

from bench_common import VARIANTS, at_least_one, given_file  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
SEQUENTIAL = r"""
import json, multiprocessing, sys, time

def init_worker(threads):
    if threads:  # one TensorFlow thread per process, as each sweep trial has
        import tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    global aelib, arrays
    import aelib
    from aelib.data import load_mnist
    arrays = load_mnist(spec["data"])

def run(model):
    config = aelib.TrainConfig(model=model, epochs=spec["epochs"], limit=spec["limit"],
                               test_limit=spec["test_limit"], seed=0)
    start = time.perf_counter()
    result = aelib.train(config, data=arrays, figures=False, verbose=0)
    return model, result.metrics["val_loss"], time.perf_counter() - start

spec = json.loads(sys.argv[1])
if __name__ == "__main__":
    trials = [m for m in spec["models"] for _ in range(spec["num_samples"])]
    if spec["workers"] == 1:  # (a): this process, TensorFlow's default threading
        init_worker(0)
        results = map(run, trials)
    else:  # (d): a pool of plain processes, heaviest trials first like the sweep
        pool = multiprocessing.get_context("spawn").Pool(
            spec["workers"], init_worker, (1,), maxtasksperchild=None
        )
        results = pool.imap_unordered(run, spec["order"])
    total = 0.0
    for model, loss, seconds in results:
        total += seconds
        print(f"  {model:8s} val_loss {loss:.4f}  {seconds:6.1f}s", flush=True)
    print(f"  trials took {total:.1f}s in all", flush=True)
"""


def _sweep_module():
    spec = importlib.util.spec_from_file_location("sweep", HERE / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pins(models: list[str]) -> list[str]:
    """--set flags fixing every searched hyperparameter to aelib's default."""
    import aelib
    from aelib.train import TrainConfig

    sweep = _sweep_module()
    train_defaults = TrainConfig()
    flags = []
    for model in models:
        defaults = aelib.model_defaults(model)
        for key in sweep.SEARCH_SPACE[model]:
            value = getattr(train_defaults, key) if key in sweep.TRAIN_FIELDS else defaults[key]
            flags += ["--set", f"{model}.{key}={value!r}"]
    return flags


def timed(
    cmd: list[str], env: dict[str, str], label: str, cpu_of: str = "CPU-s"
) -> tuple[float, float]:
    """Runs cmd; returns its wall seconds and its start (epoch time). Prints the CPU
    seconds of the processes it waited for, labelled `cpu_of`."""
    print(f"({label}) ...", flush=True)
    wall_start = time.time()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.exit(f"{label} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("  ")]
    print("\n".join(lines[-8:]))
    print(f"({label}) {seconds:.1f}s, {cpu:.1f} {cpu_of}", flush=True)
    return seconds, wall_start


def breakdown(experiment: Path, wall_start: float, wall: float) -> str:
    """Where a sweep's wall time went, from its trial table: start-up until the
    first trial began, the span trials ran, the tail after the last ended, and
    the summed trial time (each trial from its actor's start to its last report)."""
    import pandas as pd

    table = pd.read_csv(experiment / "trials.csv")
    begin = table["started_at"].min()
    end = (table["started_at"] + table["time_total_s"]).max()
    per_trial = ", ".join(
        f"{m} {t:.1f}s" for m, t in zip(table["model"], table["time_total_s"], strict=True)
    )
    return (
        f"start-up {begin - wall_start:.1f}s, trials {end - begin:.1f}s "
        f"(sum {table['time_total_s'].sum():.1f}s: {per_trial}), "
        f"results {wall_start + wall - end:.1f}s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="path to mnist.npz")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=VARIANTS,
        default=["dense", "sparse", "deep", "conv", "seq2seq", "vae"],
    )
    parser.add_argument("--num-samples", type=at_least_one, default=1, help="trials per variant")
    parser.add_argument("--epochs", type=at_least_one, default=3)
    parser.add_argument("--limit", type=at_least_one, default=20000)
    parser.add_argument("--test-limit", type=at_least_one, default=500)
    parser.add_argument("--skip-scaling", action="store_true", help="skip (c)")
    parser.add_argument("--skip-plain", action="store_true", help="skip (d)")
    parser.add_argument("--repeats", type=at_least_one, default=1, help="rounds, in rotated order")
    parser.add_argument("--other-sweep", type=Path, help="(e): (b) with this sweep.py instead")
    args = parser.parse_args()
    given_file(parser, "--data", args.data, "Keras's mnist.npz")

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["RAY_ADDRESS"] = "local"  # a fresh local Ray, not a cluster exported or on the host
    spec = {k: getattr(args, k) for k in ("data", "models", "num_samples", "epochs", "limit")}
    spec["test_limit"] = args.test_limit
    trials = len(args.models) * args.num_samples
    print(
        f"{trials} trials ({', '.join(args.models)} x {args.num_samples}), {args.epochs} epochs, "
        f"{args.limit} training images, {os.cpu_count()} CPUs"
    )

    sweep_module = _sweep_module()
    order = [m for m in sweep_module.heaviest_first(args.models) for _ in range(args.num_samples)]
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as work:
        script = Path(work, "trials.py")
        script.write_text(SEQUENTIAL)  # a file, so the process pool's children can import it
        run = [sys.executable, str(script)]
        flags = ["--data", args.data, "--models", *args.models]
        flags += ["--num-samples", str(args.num_samples)]
        flags += ["--epochs", str(args.epochs), "--limit", str(args.limit)]
        flags += ["--test-limit", str(args.test_limit), "--scheduler", "fifo", "--no-figures"]
        flags += ["--cpus-per-trial", "1", *pins(args.models)]

        def arm_sweep(
            concurrent: int, label: str, name: str, file: Path = HERE / "sweep.py"
        ) -> tuple[float, str]:
            cmd = [sys.executable, str(file), *flags, "--storage-path", work, "--name", name]
            # Only the driver's CPU: the Ray it starts runs as daemons, not its children.
            cmd += ["--max-concurrent", str(concurrent)]
            seconds, began = timed(cmd, env, label, cpu_of="driver CPU-s")
            note = breakdown(Path(work, name), began, seconds)
            shutil.rmtree(Path(work, name), ignore_errors=True)
            return seconds, note

        arms = {
            "a": lambda r: (
                timed([*run, json.dumps({**spec, "workers": 1})], env, "a: sequential")[0],
                "",
            ),
            "b": lambda r: arm_sweep(2, "b: sweep, 2", f"two{r}"),
        }
        if not args.skip_scaling:
            arms["c"] = lambda r: arm_sweep(1, "c: sweep, 1", f"one{r}")
        if not args.skip_plain:
            cmd = [*run, json.dumps({**spec, "workers": 2, "order": order})]
            arms["d"] = lambda r: (timed(cmd, env, "d: 2 plain processes")[0], "")
        if args.other_sweep:
            other = args.other_sweep.resolve()
            arms["e"] = lambda r: arm_sweep(2, "e: other sweep, 2", f"other{r}", other)
        seconds: dict[str, list[float]] = {k: [] for k in arms}
        notes: dict[str, list[str]] = {k: [] for k in arms}
        labels = list(arms)
        for r in range(args.repeats):
            for label in labels[r % len(labels) :] + labels[: r % len(labels)]:  # rotate
                wall, note = arms[label](r)
                seconds[label].append(wall)
                notes[label].append(note)

    names = {
        "a": "sequential aelib.train",
        "b": "sweep, 2 concurrent trials",
        "c": "sweep, 1 trial at a time",
        "d": "2 plain processes, no Ray",
        "e": f"{args.other_sweep}, 2 concurrent",
    }
    med = {k: statistics.median(v) for k, v in seconds.items()}
    print(f"\nwall time (s), median of {args.repeats} round(s) in rotated order")
    for label in sorted(seconds):
        runs = ", ".join(f"{x:.1f}" for x in seconds[label])
        print(f"  ({label}) {names[label]:28s} {med[label]:7.1f}   (runs: {runs})")
    for label in sorted(notes):
        for note in filter(None, notes[label]):
            print(f"  ({label}) {note}")
    paired = ", ".join(f"{b / a:.2f}" for a, b in zip(seconds["a"], seconds["b"], strict=True))
    print(f"ratio (b)/(a) = {med['b'] / med['a']:.2f}   (target <= 0.75; per round: {paired})")
    if "c" in med:
        print(f"ratio (b)/(c) = {med['b'] / med['c']:.2f}   (1 -> 2 concurrent trials; ideal 0.50)")
    if "d" in med:
        print(
            f"ratio (d)/(a) = {med['d'] / med['a']:.2f}   (what 2 concurrent trials give on this "
            "machine without Ray)"
        )
        print(f"ratio (b)/(d) = {med['b'] / med['d']:.2f}   (Ray Tune's own cost; ideal 1.00)")
    if "e" in med:
        print(f"ratio (b)/(e) = {med['b'] / med['e']:.2f}   (this sweep.py against the other)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
