"""aelib's training overhead: seconds per epoch through `aelib.train` against a plain
`keras.Model.fit` of the same built model on the same arrays, run side by side.

For each variant, the two runs alternate (aelib first, then plain first, ...) so
machine load drifts hit both alike. Each run trains `--epochs` epochs; the first
epoch (tracing/compilation) is reported apart. The headline is the ratio of the
fastest later epoch of each side (best-of-N, as `timeit` reports: on a shared VM
whose epochs come out bimodal, e.g. 5.5 s or 10 s for the same conv epoch, noise
only adds time); the medians are printed beside it. Both fits validate on the
same validation arrays, so the difference is what aelib adds per epoch: its
callbacks (StopOnNaN, and for `denoise` the per-epoch PSNR/SSIM on
`metrics_limit` validation images).

    python jobs/bench_overhead.py --data /work/shared/data/mnist.npz --out jobs/results
    python jobs/bench_overhead.py --models denoise --metrics-limits 1000,100 ...

Writes `overhead.json` and `overhead.md` under --out and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # (also when loaded by its path)

from bench_common import VARIANTS, at_least_one, code_version, given_file  # noqa: E402


def _timer_class():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        """Wall time of each epoch, from its start to the end of every callback before it
        (it runs last, so aelib's own epoch-end callbacks are inside the interval)."""

        def __init__(self):
            super().__init__()
            self.times: list[float] = []
            self.cpu_times: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()
            self._c0 = time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self._t0)
            self.cpu_times.append(time.process_time() - self._c0)

    return EpochTimer


def run_aelib(config, arrays) -> list[float]:
    import aelib

    timer = _timer_class()()
    aelib.train(config, data=arrays, callbacks=[timer], figures=False, verbose=0)
    return timer.times, timer.cpu_times


def run_plain(config, arrays, extra_callbacks=()) -> list[float]:
    import keras

    from aelib.registry import build_model
    from aelib.train import make_splits

    keras.utils.set_random_seed(config.seed)
    model = build_model(config.model, **config.model_options)
    splits = make_splits(config, arrays, model.input_kind)
    model.autoencoder.compile(
        optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate),
        loss="binary_crossentropy",
    )
    timer = _timer_class()()
    model.autoencoder.fit(
        splits.x_train,
        splits.y_train,
        epochs=config.epochs,
        batch_size=config.batch_size,
        shuffle=True,
        validation_data=(splits.x_val, splits.y_val),
        callbacks=[*extra_callbacks, timer],
        verbose=0,
    )
    return timer.times, timer.cpu_times


def run_plain_nan(config, arrays) -> list[float]:
    """Plain fit plus keras.callbacks.TerminateOnNaN: what a per-batch NaN check costs."""
    import keras

    return run_plain(config, arrays, [keras.callbacks.TerminateOnNaN()])


ARMS = {"aelib": run_aelib, "plain": run_plain, "plain+nan": run_plain_nan}


def measure(args, name: str, metrics_limit: int | None, arrays) -> dict[str, Any]:
    import aelib
    from aelib.tutorial import tutorial_settings

    fields = dict(
        model=name,
        epochs=args.epochs,
        batch_size=tutorial_settings(name)["batch_size"],
        limit=args.limit,
        test_limit=args.test_limit,
        data=args.data,
        seed=args.seed,
    )
    if metrics_limit is not None:
        fields["metrics_limit"] = metrics_limit
    config = aelib.TrainConfig(**fields)
    arms = ["aelib", "plain"] + (["plain+nan"] if args.attribute else [])
    runs: dict[str, list[list[float]]] = {a: [] for a in arms}
    cpu: dict[str, list[list[float]]] = {a: [] for a in arms}
    for r in range(args.repeats):
        order = arms if r % 2 == 0 else arms[::-1]
        for who in order:
            wall_times, cpu_times = ARMS[who](config, arrays)
            runs[who].append(wall_times)
            cpu[who].append(cpu_times)
    first = {w: statistics.median(t[0] for t in runs[w]) for w in runs}
    later = {w: statistics.median(x for t in runs[w] for x in t[1:]) for w in runs}
    later_cpu = {w: statistics.median(x for t in cpu[w] for x in t[1:]) for w in cpu}
    best = {w: min(x for t in runs[w] for x in t[1:]) for w in runs}
    best_cpu = {w: min(x for t in cpu[w] for x in t[1:]) for w in cpu}
    return {
        "model": name,
        "metrics_limit": config.metrics_limit if name == "denoise" else None,
        "batch_size": config.batch_size,
        "train_images": int(round((args.limit or 60000) * (1 - config.val_split))),
        "val_images": int(round((args.limit or 60000) * config.val_split)),
        "epochs": args.epochs,
        "repeats": args.repeats,
        "epoch_seconds": runs,
        "epoch_cpu_seconds": cpu,
        "steady_epoch_cpu_seconds": later_cpu,
        "ratio_steady_cpu": later_cpu["aelib"] / later_cpu["plain"],
        "first_epoch_seconds": first,
        "steady_epoch_seconds": later,
        "ratio_first": first["aelib"] / first["plain"],
        "best_epoch_seconds": best,
        "best_epoch_cpu_seconds": best_cpu,
        "ratio_best": best["aelib"] / best["plain"],
        "ratio_best_cpu": best_cpu["aelib"] / best_cpu["plain"],
        "ratio_steady": later["aelib"] / later["plain"],
        "overhead_seconds_per_epoch": later["aelib"] - later["plain"],
        **(
            {
                "ratio_steady_plain_nan": later["plain+nan"] / later["plain"],
                "ratio_steady_cpu_plain_nan": later_cpu["plain+nan"] / later_cpu["plain"],
            }
            if "plain+nan" in later
            else {}
        ),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# aelib.train against plain keras Model.fit (seconds per epoch)",
        "",
        f"Machine: {result['machine_line']}",
        f"Command: `{result['command']}`",
        f"Finished: {result['finished']}, code {result.get('code') or 'not recorded'}",
        "",
        "| variant | train images | aelib s/epoch (best) | plain s/epoch (best) | "
        "**ratio (best, wall)** | ratio (best, CPU) | ratio (median, wall) | "
        "ratio (median, CPU) | ratio (1st epoch, wall) | "
        "plain+TerminateOnNaN / plain (median wall, CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        label = r["model"]
        if r["metrics_limit"] is not None:
            label += f" (metrics_limit={r['metrics_limit']})"
        b = r["best_epoch_seconds"]
        lines.append(
            f"| {label} | {r['train_images']} | {b['aelib']:.2f} | {b['plain']:.2f} | "
            f"**{r['ratio_best']:.3f}** | {r['ratio_best_cpu']:.3f} | {r['ratio_steady']:.3f} | "
            f"{r['ratio_steady_cpu']:.3f} | {r['ratio_first']:.3f} | "
            + (
                f"{r['ratio_steady_plain_nan']:.3f}, {r['ratio_steady_cpu_plain_nan']:.3f} |"
                if "ratio_steady_plain_nan" in r
                else "- |"
            )
        )
    worst = max(result["rows"], key=lambda r: r["ratio_best"])
    lines += [
        "",
        f"Best: the fastest of epochs 2..{result['epochs']} over {result['repeats']} "
        "alternating runs per side (as `timeit` does: load on a shared machine only ever "
        "adds time, so the minimum is the least disturbed measurement of what the code "
        "costs). Median: the median of the same epochs. 1st epoch includes tracing. "
        "CPU = process time of all threads. Ratios < 1 are noise.",
        "",
        f"Largest best-of ratio: {worst['model']} {worst['ratio_best']:.3f} (target <= 1.05).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(VARIANTS))
    p.add_argument("--epochs", type=int, default=3, help="per run (>= 2: the 1st is apart)")
    p.add_argument("--repeats", type=at_least_one, default=2, help="alternating runs per side")
    p.add_argument("--limit", type=int, default=12000, help="training digits (0: all 60,000)")
    p.add_argument("--test-limit", type=at_least_one, default=1000)
    p.add_argument(
        "--metrics-limits",
        default=None,
        help="denoise only: comma-separated metrics_limit values to compare (default: aelib's)",
    )
    p.add_argument(
        "--attribute",
        action="store_true",
        help="add a third arm: plain fit + Keras TerminateOnNaN (a per-batch NaN check)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=os.environ.get("AELIB_MNIST"))
    p.add_argument(
        "--out",
        default="runs/bench_overhead",
        help="results folder (default: runs/bench_overhead; the published ones: --out "
        "jobs/results, whose default let a smoke run replace them)",
    )
    p.add_argument("--name", default=None, help="file stem under --out (default: overhead)")
    args = p.parse_args(argv)
    given_file(p, "--data", args.data, "Keras's mnist.npz")
    if args.epochs < 2:
        p.error("--epochs must be >= 2")
    if args.limit < 0:
        p.error(f"--limit {args.limit}: expected a number of digits, or 0 for all")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in VARIANTS]
    if unknown or not models:
        p.error(f"--models {args.models}: expected a comma list of {', '.join(VARIANTS)}")
    try:
        metrics_limits = [int(x) for x in (args.metrics_limits or "").split(",") if x.strip()]
    except ValueError:
        metrics_limits = [-1]
    if any(n < 1 for n in metrics_limits):
        p.error(f"--metrics-limits {args.metrics_limits}: expected a comma list of numbers >= 1")
    args.limit = args.limit or None

    import aelib  # noqa: F401
    from aelib import data as data_lib

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_quality import machine_info, machine_line

    arrays = data_lib.load_mnist(args.data)
    code = code_version()  # (the code that runs: edits while it runs are not its)
    rows = []
    for name in models:
        limits = [None]
        if name == "denoise" and metrics_limits:
            limits = metrics_limits
        for ml in limits:
            row = measure(args, name, ml, arrays)
            rows.append(row)
            print(
                f"{name:8s} metrics_limit={row['metrics_limit']}: aelib "
                f"{row['steady_epoch_seconds']['aelib']:.2f} s/epoch, plain "
                f"{row['steady_epoch_seconds']['plain']:.2f} -> ratio {row['ratio_steady']:.3f}, "
                f"CPU ratio {row['ratio_steady_cpu']:.3f}, best-of ratio {row['ratio_best']:.3f}"
                f" (1st epoch {row['ratio_first']:.3f})",
                flush=True,
            )
    machine = machine_info()
    result = {
        "command": "python jobs/bench_overhead.py " + shlex.join(argv or sys.argv[1:]),
        "machine": machine,
        "machine_line": machine_line(machine),
        "code": code,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "rows": rows,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or "overhead"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
