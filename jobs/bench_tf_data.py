"""Benchmark: aelib.train with tf.data autotuning off (aelib's default) against on.

    python jobs/bench_tf_data.py --data ../shared/data/mnist.npz

Under TensorFlow, Keras feeds NumPy arrays through a tf.data pipeline with a new
iterator each epoch; with autotuning on, the old iterator's teardown waits for its
tuning thread, and a training process can sit idle for seconds at each epoch's end
(see `aelib.train.tf_data_autotune_off`). This runs the same trainings both ways,
side by side as a sweep runs them (one process per model, one TensorFlow thread
each, started together), alternating the two settings for --repeats rounds, and
prints each process's wall time and how much of it was CPU time: an idle process
shows as a low CPU share. The losses must match: the setting changes the pipeline's
threading, not its data or order. Nothing is asserted: on a shared machine the
numbers move.

Since the batch-order fix (2026-12-06, after ffe3f6d), the training batches come from
aelib's own pipeline (`aelib.train.training_data`: one iterator for the whole run,
autotuning off either way), so the two settings now differ only in the validation
pipeline; the figures in tf_data_autotune_off's docstring were measured before it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # (also when loaded by its path)

from bench_common import VARIANTS, at_least_one, given_file  # noqa: E402

CHILD = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(spec["threads"])
tf.config.threading.set_inter_op_parallelism_threads(spec["threads"])
import importlib
import aelib
from aelib.data import load_mnist
if spec["autotune"]:  # TensorFlow's default: leave Keras's pipelines as they are
    # (the module: `aelib.train` as an attribute is the function)
    importlib.import_module("aelib.train").tf_data_autotune_off = lambda: False
arrays = load_mnist(spec["data"])
config = aelib.TrainConfig(model=spec["model"], epochs=spec["epochs"], limit=spec["limit"],
                           test_limit=500, seed=0)
wall, cpu = time.perf_counter(), time.process_time()
result = aelib.train(config, data=arrays, figures=False, verbose=0)
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
print("RESULT" + json.dumps({"wall": wall, "cpu": cpu, "val_loss": result.metrics["val_loss"]}))
"""


def side_by_side(args: argparse.Namespace, autotune: bool) -> dict[str, dict]:
    """Starts one training process per model at once; returns each one's result."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    procs = {}
    for model in args.models:
        spec = {k: getattr(args, k) for k in ("data", "epochs", "limit", "threads")}
        spec.update(model=model, autotune=autotune)
        procs[model] = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(spec)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    results = {}
    for model, proc in procs.items():
        out, err = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"{model} failed ({proc.returncode}):\n{err[-3000:]}")
        line = next(x for x in out.splitlines() if x.startswith("RESULT"))
        results[model] = json.loads(line[len("RESULT") :])
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="path to mnist.npz")
    parser.add_argument("--models", nargs="+", choices=VARIANTS, default=["conv", "seq2seq"])
    parser.add_argument("--epochs", type=at_least_one, default=4)
    parser.add_argument("--limit", type=int, default=60000)
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow threads per process")
    parser.add_argument("--repeats", type=at_least_one, default=2, help="rounds of both settings")
    args = parser.parse_args()
    given_file(parser, "--data", args.data, "Keras's mnist.npz")
    print(
        f"{len(args.models)} trainings side by side ({', '.join(args.models)}), {args.epochs} "
        f"epochs on {args.limit} images, {args.threads} TensorFlow thread(s) each, "
        f"{os.cpu_count()} CPUs"
    )
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for r in range(args.repeats):
        for autotune in (False, True) if r % 2 == 0 else (True, False):
            results = side_by_side(args, autotune)
            runs[autotune].append(results)
            label = "autotune on (TF default)" if autotune else "autotune off (aelib)"
            print(f"round {r + 1}, {label}:")
            for model, x in results.items():
                print(
                    f"  {model:8s} {x['wall']:6.1f}s wall, {x['cpu']:6.1f}s CPU "
                    f"({x['cpu'] / x['wall']:.0%} busy), val_loss {x['val_loss']:.4f}",
                    flush=True,
                )
    print(f"\nmedian wall time (s) over {args.repeats} round(s)")
    for model in args.models:
        off = statistics.median(x[model]["wall"] for x in runs[False])
        on = statistics.median(x[model]["wall"] for x in runs[True])
        same = {x[model]["val_loss"] for x in runs[False] + runs[True]}
        print(
            f"  {model:8s} autotune on {on:6.1f}   off {off:6.1f}   off/on {off / on:.2f}   "
            f"val_loss {'identical' if len(same) == 1 else sorted(same)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
