"""Benchmark: is a Ray Tune sweep faster than training the same trials one by one?

    python jobs/bench_sweep.py --data /work/shared/data/mnist.npz

Runs one fixed set of small trials (every searched hyperparameter pinned to
aelib's default, so both sides train exactly the same models), side by side:

  (a) sequential: one Python process calls aelib.train for each trial in turn
      (TensorFlow's default threading, so it may use every core);
  (b) the sweep: `jobs/sweep.py` with --max-concurrent 2, 1 CPU per trial, FIFO;
  (c) the sweep with --max-concurrent 1, to show how it scales from 1 to 2.

Each side is timed end to end as its own process (interpreter and TensorFlow
start, Ray start, writing results), and the script prints the ratios
(b)/(a) (target: <= 0.75 on 2 cores) and (b)/(c). Nothing is asserted: on a
shared machine the numbers move, so run it on an otherwise idle one, or twice.

Measured on the 2-core dev VM (shared, load average ~5 from other work):
    defaults (6 trials, 20k images, 3 epochs):  a 28.7s  b 37.1s  c 48.6s
        (b)/(a) = 1.29, (b)/(c) = 0.76  (an earlier, busier run: 0.91 and 0.62)
    --limit 60000 --epochs 5:                   a 126.4s  b 94.8s  c 138.0s
        (b)/(a) = 0.75, (b)/(c) = 0.69
The sweep pays ~15-20 s once (Ray start, TensorFlow import in each worker, the
results and report), so it beats sequential training only when the trials
are long; the sequential side also uses both cores for each model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
SEQUENTIAL = r"""
import json, sys, time
import aelib
from aelib.data import load_mnist
from aelib.train import TrainConfig

spec = json.loads(sys.argv[1])
arrays = load_mnist(spec["data"])
total = 0.0
for model in spec["models"]:
    for _ in range(spec["num_samples"]):
        config = TrainConfig(model=model, epochs=spec["epochs"], limit=spec["limit"],
                             test_limit=spec["test_limit"], seed=0)
        result = aelib.train(config, data=arrays, figures=False, verbose=0)
        total += result.metrics["train_seconds"]
        print(f"  {model:8s} val_loss {result.metrics['val_loss']:.4f}", flush=True)
print(json.dumps({"fit_seconds": total}))
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


def timed(cmd: list[str], env: dict[str, str], label: str) -> float:
    print(f"({label}) ...", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{label} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("  ")]
    print("\n".join(lines[-8:]))
    print(f"({label}) {seconds:.1f}s", flush=True)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="path to mnist.npz")
    parser.add_argument(
        "--models", nargs="+", default=["dense", "sparse", "deep", "conv", "seq2seq", "vae"]
    )
    parser.add_argument("--num-samples", type=int, default=1, help="trials per variant")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=20000)
    parser.add_argument("--test-limit", type=int, default=500)
    parser.add_argument("--skip-scaling", action="store_true", help="skip (c)")
    args = parser.parse_args()

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.setdefault("RAY_ADDRESS", "local")  # a fresh local Ray, not a cluster found on the host
    spec = {k: getattr(args, k) for k in ("data", "models", "num_samples", "epochs", "limit")}
    spec["test_limit"] = args.test_limit
    trials = len(args.models) * args.num_samples
    print(
        f"{trials} trials ({', '.join(args.models)} x {args.num_samples}), {args.epochs} epochs, "
        f"{args.limit} training images, {os.cpu_count()} CPUs"
    )

    seq = timed([sys.executable, "-c", SEQUENTIAL, json.dumps(spec)], env, "a: sequential")
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as store:
        sweep = [sys.executable, str(HERE / "sweep.py"), "--data", args.data]
        sweep += ["--models", *args.models, "--num-samples", str(args.num_samples)]
        sweep += ["--epochs", str(args.epochs), "--limit", str(args.limit)]
        sweep += ["--test-limit", str(args.test_limit), "--scheduler", "fifo", "--no-figures"]
        sweep += ["--cpus-per-trial", "1", "--storage-path", store, *pins(args.models)]
        two = timed([*sweep, "--max-concurrent", "2", "--name", "two"], env, "b: sweep, 2 at once")
        one = None
        if not args.skip_scaling:
            one = timed([*sweep, "--max-concurrent", "1", "--name", "one"], env, "c: sweep, 1")

    print("\nwall time (s)            ")
    print(f"  (a) sequential aelib.train      {seq:7.1f}")
    print(f"  (b) sweep, 2 concurrent trials  {two:7.1f}")
    if one is not None:
        print(f"  (c) sweep, 1 trial at a time    {one:7.1f}")
    print(f"ratio (b)/(a) = {two / seq:.2f}   (target <= 0.75)")
    if one is not None:
        print(f"ratio (b)/(c) = {two / one:.2f}   (scaling 1 -> 2 concurrent trials; ideal 0.50)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
