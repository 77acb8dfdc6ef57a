"""Quality benchmark: the tutorial's table, reproduced, and the denoisers compared.

Trains each variant at the tutorial's settings on full MNIST (Adam, the tutorial's
epochs and batch sizes, validating on the test split as the tutorial does) through
`aelib.train`, and compares the learned denoiser with scikit-image's classical
denoisers (and BM3D where its package installs), each tuned on a held-out slice of
noisy *training* digits and evaluated on the same noisy test digits as the model.

Writes, under `--out`:
    results.json   every row: settings, metrics, the tutorial's numbers, the command
                   that reproduces it, the machine and backend it ran on
    results.md     the tables
    *.png          charts (test BCE against the tutorial, denoiser PSNR/SSIM, sample
                   digits per denoiser, the VAE's figures)

Rows are saved as each one finishes; a rerun skips rows already in results.json
with the same settings (unless `--force`), so a killed run resumes.

    python jobs/bench_quality.py --data /work/shared/data/mnist.npz --out jobs/results
    python jobs/bench_quality.py --quick --out /tmp/bench     # 1 epoch, small subset
    KERAS_BACKEND=jax python jobs/bench_quality.py ...        # on a GPU machine
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # (also when loaded by its path)

from bench_common import at_least_one, code_version, given_file  # noqa: E402

# Priority order of a full run: the denoising comparison first.
# The classical denoisers (--denoisers), as classical_methods() names them (bm3d only
# where its package installs: it is skipped with a note there).
CLASSICAL = ("median_3x3", "gaussian", "total_variation", "wavelet", "nl_means", "bm3d")
ROWS = ("classical", "denoise", "denoise_plus", "dense", "sparse", "deep", "conv", "vae", "seq2seq")
# The order of the learned rows in results.md and the charts
TUTORIAL_ORDER = ("dense", "sparse", "deep", "conv", "seq2seq", "vae", "denoise")
# denoise_plus2's config (20.55 dB; the best beyond-tutorial one is denoise_plus6's, in the README)
DEFAULT_DENOISE_PLUS = "depth=1,convs_per_stage=2,batch_size=32"
QUICK = {
    "epochs": 1,
    "limit": 2000,
    "test_limit": 200,
    "tune_limit": 40,
    "slow_limit": 10,
    "slow_tune_limit": 5,
}
SCHEMA = 1


def is_plus(row: str) -> bool:
    """denoise_plus, denoise_plus2, ...: beyond-tutorial denoisers (--denoise-config)."""
    return re.fullmatch(r"denoise_plus\w*", row) is not None


def plus_rows(rows) -> list[str]:
    return sorted(r for r in rows if is_plus(r))


def learned_rows(rows, first: tuple[str, ...] = TUTORIAL_ORDER) -> list[str]:
    """The learned rows there are, in the tables' and charts' order: `first` (the
    tutorial's variants), then the beyond-tutorial denoisers."""
    return [n for n in (*first, *plus_rows(rows)) if rows.get(n)]


# --------------------------------------------------------------------------- helpers


def parse_options(text: str | None) -> dict[str, Any]:
    """'filters=64,convs_per_stage=2' -> {'filters': 64, 'convs_per_stage': 2}."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        if "=" not in part:
            raise ValueError(f"Expected KEY=VALUE in {text!r}. Received: {part!r}")
        key, value = part.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def machine_info() -> dict[str, Any]:
    import keras

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": mem_gib,
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "python": platform.python_version(),
        "accelerator": _accelerator(),
    }
    label = os.environ.get("BENCH_MACHINE")  # e.g. "shared 2-core CPU VM"
    if label:
        info["label"] = label
    return info


def _accelerator() -> str:
    import keras

    try:
        if keras.backend.backend() == "jax":
            import jax

            devices = jax.devices()
            return f"{devices[0].platform}: {devices[0].device_kind} x{len(devices)}"
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            return f"gpu x{len(gpus)}" if gpus else "cpu"
    except Exception as e:  # noqa: BLE001 - informational only
        return f"unknown ({e.__class__.__name__})"
    return "unknown"


def machine_line(m: dict[str, Any]) -> str:
    parts = [m.get("label"), f"{m['cpu']} ({m['cpu_count']} cores, {m['memory_gib']} GiB)"]
    parts.append(f"Keras {m['keras']} / {m['backend']} backend on {m['accelerator']}")
    return ", ".join(p for p in parts if p)


def load_results(path: Path) -> dict[str, Any]:
    if path.is_file():
        results = json.loads(path.read_text())
        if results.get("schema") == SCHEMA:
            return results
    return {"schema": SCHEMA, "rows": {}}


def save_results(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def command_for(args: argparse.Namespace, row: str, epochs: int | None = None) -> str:
    """The command line that reproduces one row."""
    cmd = ["python", "jobs/bench_quality.py", "--models", row]
    if args.data:
        cmd += ["--data", args.data]
    if args.quick:
        cmd += ["--quick"]
    if epochs is not None and not args.quick and epochs != tutorial_epochs(row):
        cmd += ["--epochs", str(epochs)]  # (the default is the tutorial's, which may change)
    for flag, value, default in (
        ("--limit", args.limit, None),
        ("--test-limit", args.test_limit, None),
        ("--tune-limit", args.tune_limit, 500),
        ("--slow-limit", args.slow_limit, 300),
        ("--slow-tune-limit", args.slow_tune_limit, 40),
        ("--denoisers", args.denoisers, None),
        ("--seed", args.seed, 0),
    ):
        classical_only = flag in (
            "--tune-limit",
            "--slow-limit",
            "--slow-tune-limit",
            "--denoisers",
        )
        quick_set = flag in ("--limit", "--test-limit", "--tune-limit", "--slow-limit")
        if classical_only and row != "classical":
            if not (flag == "--slow-limit" and (row == "denoise" or is_plus(row))):
                continue  # (--slow-limit also sets the learned denoisers' subset)
        if value != default and not (args.quick and (quick_set or flag == "--slow-tune-limit")):
            cmd += [flag, str(value)]
    if is_plus(row):
        cmd += ["--denoise-config", args.denoise_config]
    cmd += ["--out", args.out]
    env = "KERAS_BACKEND=jax " if os.environ.get("KERAS_BACKEND") == "jax" else ""
    return env + shlex.join(cmd)


# --------------------------------------------------------------------------- learned rows


def run_variant(args, row: str, arrays, runs_dir: Path) -> dict[str, Any]:
    import aelib
    from aelib import metrics as metrics_lib
    from aelib.train import make_splits
    from aelib.tutorial import tutorial_settings

    model = model_of(row)
    settings = tutorial_settings(model)
    overrides = parse_options(args.denoise_config) if is_plus(row) else {}
    train_keys = ("learning_rate", "batch_size", "lr_schedule")
    train_fields = {k: overrides.pop(k) for k in train_keys if k in overrides}
    epochs = args.epochs if args.epochs is not None else settings["epochs"]
    config = aelib.TrainConfig(
        model=model,
        model_options=overrides,
        epochs=epochs,
        batch_size=train_fields.get("batch_size", settings["batch_size"]),
        learning_rate=train_fields.get("learning_rate", 1e-3),
        lr_schedule=train_fields.get("lr_schedule", "constant"),
        limit=args.limit,
        val_split=0.0,  # the tutorial validates on the test split
        test_limit=args.test_limit,
        seed=args.seed,
        data=args.data,
    )
    out_dir = runs_dir / row
    from aelib.train import config_source

    result = aelib.train(
        config,
        data=arrays,
        out_dir=out_dir,
        figures=not args.no_figures,
        verbose=args.verbose,
        data_source=config_source(config),  # (the arrays are config.data's)
    )
    m = dict(result.metrics)
    epochs_run = m.get("epochs_run", 0)
    m["seconds_per_epoch"] = m["train_seconds"] / epochs_run if epochs_run else None
    record = {
        "kind": "learned",
        "model": model,
        "model_options": overrides,
        "denoise_config": args.denoise_config if is_plus(row) else None,
        "settings": settings_key(args, row),
        "epochs": epochs,
        "epochs_run": epochs_run,
        "tutorial_epochs": settings["epochs"],
        "is_tutorial_setting": (
            epochs == settings["epochs"]
            and args.limit is None
            and args.test_limit is None
            and not is_plus(row)
        ),
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "train_images": len(arrays[0][0][: args.limit] if args.limit else arrays[0][0]),
        "metrics": m,
        "tutorial": tutorial_reference(model),
        "history": result.history,
        "figures": {k: v for k, v in result.paths.items() if k.startswith("figure_")},
    }
    if model == "denoise" and not m.get("nan"):
        # The learned denoiser on the first `slow_limit` test digits, for the rows
        # (BM3D) that are evaluated on that subset only.
        splits = make_splits(config, arrays, "image")
        n = min(args.slow_limit, len(splits.x_test))
        out = result.model.autoencoder.predict(splits.x_test[:n], verbose=0)
        record["subset"] = {
            "images": n,
            "psnr": float(np.mean(metrics_lib.psnr(splits.y_test[:n], out))),
            "ssim": float(np.mean(metrics_lib.ssim(splits.y_test[:n], out))),
        }
        t0 = time.perf_counter()
        result.model.autoencoder.predict(splits.x_test, batch_size=256, verbose=0)
        record["images_per_second"] = len(splits.x_test) / (time.perf_counter() - t0)
        save_samples(runs_dir, row, result.model.autoencoder.predict(splits.x_test[:8], verbose=0))
    return record


def tutorial_epochs(row: str) -> int | None:
    """The epochs aelib.tutorial gives a learned row now (None for 'classical')."""
    from aelib.tutorial import tutorial_settings

    return None if row == "classical" else tutorial_settings(model_of(row))["epochs"]


def tutorial_reference(model: str) -> dict[str, Any]:
    """The tutorial's settings and reported figures for `model`, as aelib.tutorial has them.

    results.json keeps a copy made when each row ran; the report uses these, so a
    figure added to aelib.tutorial later shows without retraining."""
    from aelib.tutorial import REPORTED_DENSE_CODE_MEAN, TUTORIAL

    reference = dict(TUTORIAL.get(model, {}))
    if model == "dense":
        reference["reported_code_mean"] = REPORTED_DENSE_CODE_MEAN
    return reference


def row_command(name: str, r: dict[str, Any]) -> str:
    """The command that reproduces row `name`: the one saved with it, plus `--epochs` where
    it ran other epochs than the tutorial's now are (the default it relied on moved)."""
    command = r["command"]
    epochs = r.get("epochs")
    if name == "classical" or epochs is None or "--epochs" in command or "--quick" in command:
        return command
    if epochs == tutorial_epochs(name):
        return command
    words = shlex.split(command)
    at = words.index("--models") + 2 if "--models" in words else len(words)
    return shlex.join([*words[:at], "--epochs", str(epochs), *words[at:]])


def model_of(row: str) -> str:
    return "denoise" if is_plus(row) else row


def settings_key(args, row: str) -> dict[str, Any]:
    """What decides a row's numbers: a rerun with the same key is skipped."""
    key = {
        # The epochs a learned row trains, resolved: "the tutorial's" is no setting, as
        # what aelib.tutorial says may change (denoise: 30, then 100).
        "epochs": args.epochs if args.epochs is not None else tutorial_epochs(row),
        "limit": args.limit,
        "test_limit": args.test_limit,
        "seed": args.seed,
    }
    if is_plus(row):
        key["denoise_config"] = args.denoise_config
    if row == "classical":
        # (which denoisers ran, and on how many tuning digits, is recorded per denoiser)
        key.update(tune_limit=args.tune_limit, slow_limit=args.slow_limit)
        key.pop("epochs")
    return key


def same_settings(old: dict[str, Any] | None, key: dict[str, Any]) -> bool:
    if old is None:
        return False
    settings = {k: v for k, v in old.get("settings", {}).items() if k != "denoisers"}
    if "epochs" in settings and settings["epochs"] is None:
        settings["epochs"] = old.get("epochs")  # (rows saved before epochs were resolved)
    return settings == key


def save_samples(runs_dir: Path, name: str, images: np.ndarray) -> None:
    path = runs_dir / "samples" / f"{name}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asarray(images, dtype="float32").reshape(len(images), 28, 28))


# --------------------------------------------------------------------------- classical rows


def classical_methods() -> dict[str, dict[str, Any]]:
    """name -> {param, grid, fn(batch (N, H, W) noisy, value) -> batch, slow}."""
    from scipy import ndimage
    from skimage import restoration

    def per_image(f):
        return lambda x, v: np.stack([f(img, v) for img in x])

    methods = {
        "median_3x3": {
            "param": None,
            "grid": [None],
            "fn": lambda x, v: ndimage.median_filter(x, size=(1, 3, 3), mode="reflect"),
        },
        "gaussian": {
            "param": "sigma",
            "grid": [0.5, 0.75, 1.0, 1.25, 1.5, 2.0],
            "fn": lambda x, v: ndimage.gaussian_filter(x, sigma=(0, v, v), mode="reflect"),
        },
        "total_variation": {
            "param": "weight",
            "grid": [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8],
            "fn": per_image(lambda img, v: restoration.denoise_tv_chambolle(img, weight=v)),
        },
        "wavelet": {
            "param": "sigma",
            "grid": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
            "fn": per_image(
                lambda img, v: restoration.denoise_wavelet(
                    img, sigma=v, mode="soft", rescale_sigma=True
                )
            ),
        },
        "nl_means": {
            "param": "h, sigma",  # both tuned: sigma sets the patch-distance offset 2 sigma^2
            "grid": [(h, sg) for h in (0.05, 0.1, 0.2, 0.3) for sg in (0.0, 0.1, 0.2, 0.3, 0.5)],
            "fn": per_image(
                lambda img, v: restoration.denoise_nl_means(
                    img, h=v[0], sigma=v[1], patch_size=3, patch_distance=5, fast_mode=True
                )
            ),
        },
    }
    try:
        import bm3d  # noqa: F401

        methods["bm3d"] = {
            "param": "sigma_psd",
            "grid": [0.2, 0.3, 0.4, 0.5, 0.6],
            "fn": per_image(lambda img, v: _bm3d(img, v)),
            "slow": True,
        }
    except ImportError:
        print(
            "bm3d is not installed (pip install bm3d==4.0.3, the README's row's version): "
            "skipping BM3D",
            flush=True,
        )
    return methods


def _bm3d(img: np.ndarray, sigma: float) -> np.ndarray:
    import bm3d

    return np.asarray(bm3d.bm3d(img, sigma_psd=sigma), dtype=np.float64)


def run_classical(args, arrays, runs_dir: Path) -> dict[str, Any]:
    import aelib
    from aelib import data as data_lib
    from aelib import metrics as metrics_lib
    from aelib.train import make_splits

    # The exact noisy test digits the learned denoiser is scored on.
    config = aelib.TrainConfig(
        model="denoise",
        epochs=1,
        limit=args.limit,
        val_split=0.0,
        test_limit=args.test_limit,
        seed=args.seed,
        data=args.data,
    )
    splits = make_splits(config, arrays, "image")
    clean_test, noisy_test = splits.y_test[..., 0], splits.x_test[..., 0]
    # Tuning slice: the last `tune_limit` *training* digits, with their own noise seed.
    tune_clean = data_lib.scale(arrays[0][0][-args.tune_limit :])
    tune_noisy = data_lib.add_noise(tune_clean, config.noise_factor, seed=args.seed + 1000)
    save_samples(runs_dir, "clean", clean_test[:8])
    save_samples(runs_dir, "noisy", noisy_test[:8])

    def score(clean, out):
        out = np.clip(out, 0.0, 1.0)
        return (
            float(np.mean(metrics_lib.psnr(clean, out))),
            float(np.mean(metrics_lib.ssim(clean, out))),
        )

    denoisers: dict[str, Any] = {}
    p, s = score(clean_test, noisy_test)
    denoisers["noisy"] = {"psnr": p, "ssim": s, "test_images": len(clean_test)}
    n_slow = min(args.slow_limit, len(clean_test))
    p, s = score(clean_test[:n_slow], noisy_test[:n_slow])
    denoisers["noisy"]["subset"] = {"images": n_slow, "psnr": p, "ssim": s}

    methods = classical_methods()
    if args.denoisers:
        wanted = [n.strip() for n in args.denoisers.split(",") if n.strip()]
        methods = {n: methods[n] for n in wanted if n in methods}
    for name, method in methods.items():
        slow = method.get("slow", False)
        n_tune = min(args.tune_limit, args.slow_tune_limit) if slow else args.tune_limit
        tuning = []
        for value in method["grid"]:
            out = method["fn"](tune_noisy[:n_tune].astype(np.float64), value)
            tuning.append({"value": value, "psnr": score(tune_clean[:n_tune], out)[0]})
        best = max(tuning, key=lambda t: t["psnr"])
        n_eval = n_slow if method.get("slow") else len(clean_test)
        t0 = time.perf_counter()
        out = method["fn"](noisy_test[:n_eval].astype(np.float64), best["value"])
        seconds = time.perf_counter() - t0
        p, s = score(clean_test[:n_eval], out)
        entry = {
            "param": method["param"],
            "value": best["value"],
            "tuning": {"images": n_tune, "source": "last training digits", "grid": tuning},
            "psnr": p,
            "ssim": s,
            "test_images": n_eval,
            "images_per_second": n_eval / seconds if seconds > 0 else None,
        }
        if n_eval != n_slow:
            entry["subset"] = dict(
                zip(("psnr", "ssim"), score(clean_test[:n_slow], out[:n_slow]), strict=True),
                images=n_slow,
            )
        denoisers[name] = entry
        save_samples(runs_dir, name, np.clip(out[:8], 0, 1))
        print(
            f"  {name:16s} {method['param']}={best['value']}: {p:.2f} dB, SSIM {s:.3f} "
            f"on {n_eval} test digits ({entry['images_per_second']:.1f} img/s)",
            flush=True,
        )
    return {
        "kind": "classical",
        "settings": settings_key(args, "classical"),
        "noise": {
            "factor": config.noise_factor,
            "clipped": [0, 1],
            "test_seed": args.seed + 2,
            "tune_seed": args.seed + 1000,
        },
        "denoisers": denoisers,
    }


# --------------------------------------------------------------------------- reporting


def _fmt(x, digits=4):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def made(row: dict[str, Any]) -> str:
    """When a row finished, and from which code (rows of before 2026-12-06 kept none)."""
    return f"{row.get('finished', '-')[:10]} ({row.get('code') or 'not recorded'})"


def markdown(results: dict[str, Any]) -> str:
    rows = results["rows"]
    lines = ["# Quality benchmark results", ""]
    machines = {r.get("machine_line") for r in rows.values() if r.get("machine_line")}
    if len(machines) == 1:
        lines.append(f"Machine: {machines.pop()}")
    else:  # rows rerun at different times: each row's machine_line is in results.json
        lines.append("Machines (rows ran at different times; each row's is in results.json):")
        lines += [f"- {m}" for m in sorted(machines)]
    lines += [
        "",
        "## Reconstruction (test split, binary cross-entropy)",
        "",
        "| variant | epochs run (tutorial's) | batch | train images | test loss | "
        "test BCE | tutorial's loss | code mean (tutorial's) | PSNR dB | SSIM | s/epoch |"
        " made (code) | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in learned_rows(rows):
        r = rows[name]
        m, t = r["metrics"], tutorial_reference(r["model"])
        code = "-"
        if "code_mean" in m:
            code = f"{m['code_mean']:.2f}"
            if "reported_code_mean" in t:
                code += f" ({t['reported_code_mean']:.2f})"
        label = (
            f"{name} ({r.get('denoise_config') or r['model_options']})" if is_plus(name) else name
        )
        lines.append(
            f"| {label} | {r['epochs_run']} ({tutorial_epochs(name)}) | {r['batch_size']} | "
            f"{r['train_images']} | {_fmt(m.get('test_loss'))} | {_fmt(m.get('test_bce'))} | "
            f"{_fmt(t.get('reported_test_loss'), 3)} | {code} | {_fmt(m.get('test_psnr'), 2)} | "
            f"{_fmt(m.get('test_ssim'), 3)} | {_fmt(m.get('seconds_per_epoch'), 1)} | "
            f"{made(r)} | `{row_command(name, r)}` |"
        )
    if "classical" in rows:
        lines += denoise_table(results)
    if "vae" in rows:
        r = rows["vae"]
        lines += [
            "",
            "## VAE",
            "",
            f"Test loss (BCE per pixel + KL / 784) after {r['epochs_run']} "
            f"epoch{'s' * (r['epochs_run'] != 1)}: "
            f"{r['metrics']['test_loss']:.4f} (pure BCE {r['metrics']['test_bce']:.4f}). "
            "Figures: `vae_latent_plane.png`, `vae_manifold.png`.",
            f"Command: `{row_command('vae', r)}`",
        ]
    return "\n".join(lines) + "\n"


def _tuning_text(denoisers: dict[str, Any]) -> str:
    counts: dict[int, list[str]] = {}
    for name, e in denoisers.items():
        if "tuning" in e:
            counts.setdefault(e["tuning"]["images"], []).append(name)
    if len(counts) <= 1:
        return str(next(iter(counts), 0))
    most = max(counts, key=lambda k: len(counts[k]))
    rest = "; ".join(f"{', '.join(v)}: {k}" for k, v in counts.items() if k != most)
    return f"{most} ({rest})"


def denoise_table(results: dict[str, Any]) -> list[str]:
    rows = results["rows"]
    c = rows["classical"]
    d = c["denoisers"]
    n_full = d["noisy"]["test_images"]
    n_sub = d["noisy"]["subset"]["images"]
    lines = [
        "",
        f"## Denoising (Gaussian noise, factor {c['noise']['factor']}, clipped to [0, 1],"
        f" seed {c['noise']['test_seed']})",
        "",
        f"Classical parameters tuned on {_tuning_text(d)} held-out noisy "
        "*training* digits (the last ones of the training split); every method is "
        f"scored on the same noisy test digits: all {n_full}, and the first {n_sub} "
        "(the subset BM3D, too slow for all, is scored on).",
        "",
        f"| method | tuned parameter | PSNR dB ({n_full}) | SSIM ({n_full}) | "
        f"PSNR dB (first {n_sub}) | SSIM (first {n_sub}) | images/s | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in d.items():
        full = e["test_images"] == n_full
        sub = e.get("subset", {"psnr": e["psnr"], "ssim": e["ssim"]})
        param = f"{e['param']}={e['value']}" if e.get("param") else "-"
        lines.append(
            f"| {name} | {param} | {_fmt(e['psnr'], 2) if full else '-'} | "
            f"{_fmt(e['ssim'], 3) if full else '-'} | {_fmt(sub['psnr'], 2)} | "
            f"{_fmt(sub['ssim'], 3)} | {_fmt(e.get('images_per_second'), 1)} | "
            f"`{e.get('command', c['command'])}` |"
        )
    for name in learned_rows(rows, ("denoise",)):
        r = rows[name]
        m = r["metrics"]
        sub = r.get("subset", {})
        label = f"{name} (learned, {r['epochs_run']} epochs"
        label += f", {r.get('denoise_config') or r['model_options']})" if is_plus(name) else ")"
        lines.append(
            f"| {label} | - | {_fmt(m['test_psnr'], 2)} | {_fmt(m['test_ssim'], 3)} | "
            f"{_fmt(sub.get('psnr'), 2)} | {_fmt(sub.get('ssim'), 3)} | "
            f"{_fmt(r.get('images_per_second'), 1)} | `{row_command(name, r)}` |"
        )
    return lines


def charts(results: dict[str, Any], out: Path, runs_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    written = []
    learned = [n for n in learned_rows(rows) if "test_bce" in rows[n]["metrics"]]
    recon = [n for n in learned if n != "denoise" and not is_plus(n)]
    if recon:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        x = np.arange(len(recon))
        ours = [rows[n]["metrics"]["test_loss"] for n in recon]
        theirs = [tutorial_reference(n).get("reported_test_loss", np.nan) for n in recon]
        ax.bar(x - 0.2, ours, 0.4, label="aelib (this run)")
        ax.bar(x + 0.2, theirs, 0.4, label="tutorial's reported")
        for i in np.flatnonzero(np.isnan(theirs)):  # (its bar was just missing)
            ax.text(x[i] + 0.2, 0, "not\nreported", ha="center", va="bottom", fontsize=7)
        ax.set_xlim(-0.7, len(recon) - 0.3)  # (room for the last one's note)
        ax.set_xticks(x, [f"{n}\n{rows[n]['epochs_run']} ep" for n in recon])
        ax.set_ylabel("test loss (BCE; sparse: + L1, vae: + KL/784)")
        ax.legend()
        fig.tight_layout()
        written.append(_savefig(fig, out / "test_loss.png"))
    if "classical" in rows:
        d = rows["classical"]["denoisers"]
        names, psnrs, ssims, n_imgs = [], [], [], []
        for name, e in d.items():
            names.append(name)
            psnrs.append(e["psnr"])
            ssims.append(e["ssim"])
            n_imgs.append(e["test_images"])
        learned_denoisers = learned_rows(rows, ("denoise",))
        for name in learned_denoisers:
            names.append(f"{name} ({rows[name]['epochs_run']} ep)")
            psnrs.append(rows[name]["metrics"]["test_psnr"])
            ssims.append(rows[name]["metrics"]["test_ssim"])
            n_imgs.append(rows[name]["metrics"]["test_images"])
        # (a row scored on fewer images says so under its name: beside its value, the
        # two-line label ran into its neighbour's)
        names = [
            n if k == max(n_imgs) else f"{n} ({k} img)" for n, k in zip(names, n_imgs, strict=True)
        ]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, vals, label in ((axes[0], psnrs, "PSNR (dB)"), (axes[1], ssims, "SSIM")):
            bars = ax.bar(
                range(len(names)), vals, color=["C1" if "denoise" in n else "C0" for n in names]
            )
            for b, v in zip(bars, vals, strict=True):
                ax.text(
                    b.get_x() + b.get_width() / 2,
                    v,
                    f"{v:.2f}",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
            ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
            ax.set_ylabel(label)
            ax.margins(y=0.1)  # (the top values were struck through by the frame)
        noise = rows["classical"].get("noise", {}).get("factor", 0.5)
        fig.suptitle(f"Denoising MNIST test digits (noise factor {noise:g}, clipped)")
        fig.tight_layout()
        written.append(_savefig(fig, out / "denoise_psnr_ssim.png"))
        # The first 8 test digits through every method: drawn only with every row's
        # samples at hand (runs_dir keeps them), so that one row trained again elsewhere
        # does not replace the chart by one of that row alone.
        sample_dir = runs_dir / "samples"
        order = list(dict.fromkeys(["clean", "noisy", *d.keys(), *learned_denoisers]))
        missing = [n for n in order if not (sample_dir / f"{n}.npy").is_file()]
        if missing:
            print(
                f"note: denoise_samples.png not drawn again: no samples of "
                f"{', '.join(missing)} in {sample_dir} (run those rows there to draw it)",
                flush=True,
            )
        else:
            from aelib import plots

            found = {n: np.load(sample_dir / f"{n}.npy") for n in order}
            written.append(plots.image_rows(found, out / "denoise_samples.png", n=8))
    for name, fig_names in (
        ("vae", ("vae_latent_plane.png", "vae_manifold.png")),
        ("denoise", ("denoise_learning_curves.png",)),
        *((p, ("denoise_learning_curves.png",)) for p in plus_rows(rows)),
    ):
        for f in fig_names:
            src = runs_dir / name / "figures" / f
            if name in rows and src.is_file():
                dst = out / (f if not is_plus(name) else f"{name}_{f[8:]}")
                shutil.copyfile(src, dst)
                written.append(dst)
    return written


def _savefig(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--models",
        default=",".join(ROWS),
        help=f"comma-separated rows, in order (default: {','.join(ROWS)})",
    )
    p.add_argument(
        "--epochs",
        type=at_least_one,
        default=None,
        help="override every variant's epochs (default: the tutorial's)",
    )
    p.add_argument("--limit", type=at_least_one, default=None, help="first N training digits (all)")
    p.add_argument("--test-limit", type=at_least_one, default=None, help="first N test digits")
    p.add_argument(
        "--tune-limit",
        type=at_least_one,
        default=500,
        help="held-out training digits the classical parameters are tuned on",
    )
    p.add_argument(
        "--slow-tune-limit",
        type=at_least_one,
        default=40,
        help="tuning digits for the slow BM3D",
    )
    p.add_argument(
        "--slow-limit",
        type=at_least_one,
        default=300,
        help="test digits BM3D (~1 img/s on 2 cores) is scored on; all methods also on these",
    )
    p.add_argument(
        "--denoise-config",
        default=DEFAULT_DENOISE_PLUS,
        help="the beyond-tutorial denoiser, e.g. filters=64,convs_per_stage=2 "
        "(learning_rate= and batch_size= go to the training config)",
    )
    p.add_argument(
        "--denoisers",
        default=None,
        help=f"classical denoisers to run (default: all: {','.join(CLASSICAL)})",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="mnist.npz (default: $AELIB_MNIST)")
    p.add_argument(
        "--out",
        default=None,
        help="results folder (default: jobs/results; runs/bench_quick with --quick, "
        "--epochs, --limit or --test-limit)",
    )
    p.add_argument(
        "--runs-dir",
        default=None,
        help="models, figures and samples (default: runs/bench, or OUT/runs with --quick)",
    )
    p.add_argument(
        "--quick", action="store_true", help=f"smoke run: {QUICK} (overrides those settings)"
    )
    p.add_argument("--force", action="store_true", help="rerun rows already in results.json")
    p.add_argument(
        "--report",
        action="store_true",
        help="train nothing: rewrite results.md and the charts from results.json",
    )
    p.add_argument(
        "--no-figures", action="store_true", help="skip aelib's per-variant figures (t-SNE, ...)"
    )
    p.add_argument("--verbose", type=int, default=2, help="Keras fit verbosity")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    given_file(parser, "--data", args.data, "Keras's mnist.npz")
    if args.denoisers is not None:
        named = [n.strip() for n in args.denoisers.split(",") if n.strip()]
        if not named or set(named) - set(CLASSICAL):
            parser.error(
                f"--denoisers {args.denoisers}: expected a comma list of {','.join(CLASSICAL)}"
            )
    try:
        parse_options(args.denoise_config)
    except ValueError as e:
        parser.error(f"--denoise-config {args.denoise_config}: {e}")
    if args.quick:
        args.epochs, args.limit, args.test_limit = (
            QUICK["epochs"],
            QUICK["limit"],
            QUICK["test_limit"],
        )
        args.tune_limit, args.slow_limit = QUICK["tune_limit"], QUICK["slow_limit"]
        args.slow_tune_limit = QUICK["slow_tune_limit"]
    # A smaller run's rows go to a scratch folder unless --out says otherwise: one of
    # --limit 200 replaced the published full-size row in jobs/results without a word.
    smaller = args.quick or any(v is not None for v in (args.epochs, args.limit, args.test_limit))
    if args.out is None and smaller and not args.quick:
        print(
            "bench_quality: note: --epochs, --limit or --test-limit given: results go to "
            "runs/bench_quick, not the published jobs/results (--out jobs/results to "
            "replace those)",
            file=sys.stderr,
        )
    args.out = args.out or ("runs/bench_quick" if smaller else "jobs/results")
    runs_dir = Path(args.runs_dir or ("runs/bench_quick" if smaller else "runs/bench"))
    if smaller and args.runs_dir is None:
        runs_dir = Path(args.out) / "runs"
    selected = [] if args.report else [r.strip() for r in args.models.split(",") if r.strip()]
    unknown = sorted(r for r in selected if r not in ROWS and not is_plus(r))
    if unknown:
        print(f"bench_quality: unknown rows {unknown}. Valid: {', '.join(ROWS)}", file=sys.stderr)
        return 2
    if args.data is None and os.environ.get("AELIB_MNIST"):
        args.data = os.environ["AELIB_MNIST"]

    from aelib import data as data_lib

    arrays = data_lib.load_mnist(args.data) if selected else None  # (--report: no data)
    out = Path(args.out)
    results_path = out / "results.json"
    results = load_results(results_path)
    machine = machine_info()
    code = code_version()  # (the code that runs: edits while it runs are not its)
    charted = False
    for row in selected:
        same = same_settings(results["rows"].get(row), settings_key(args, row))
        if row == "classical" and same and args.denoisers and not args.force:
            # Run only the named denoisers the row lacks, and merge them into it.
            done = results["rows"][row]["denoisers"]
            missing = [n for n in args.denoisers.split(",") if n.strip() and n.strip() not in done]
            same = not missing
            args.denoisers = ",".join(missing) or args.denoisers
        if same and not args.force:
            print(
                f"[{row}] already in {results_path} with these settings: skipped "
                "(--force reruns it)",
                flush=True,
            )
            continue
        print(f"[{row}] running ...", flush=True)
        t0 = time.perf_counter()
        if row == "classical":
            record = run_classical(args, arrays, runs_dir)
        else:
            record = run_variant(args, row, arrays, runs_dir)
        record["wall_seconds"] = time.perf_counter() - t0
        record["command"] = command_for(args, row, record.get("epochs"))
        record["machine"] = machine
        record["machine_line"] = machine_line(machine)
        record["code"] = code
        record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        results = load_results(results_path)  # another process may have added rows
        old = results["rows"].get(row)
        if row == "classical":
            for entry in record["denoisers"].values():
                entry["command"] = record["command"]
            if args.denoisers and same_settings(old, record["settings"]):
                # Keep the other denoisers' entries, each with the command that made it.
                for entry in old["denoisers"].values():
                    entry.setdefault("command", old["command"])
                record["denoisers"] = {**old["denoisers"], **record["denoisers"]}
        results["rows"][row] = record
        save_results(results, results_path)
        (out / "results.md").write_text(markdown(results))
        charts(results, out, runs_dir)
        charted = row == selected[-1]
        print(f"[{row}] done in {record['wall_seconds']:.0f} s -> {results_path}", flush=True)
    if not charted:  # (after the last row they were just written and drawn)
        (out / "results.md").write_text(markdown(results))
        charts(results, out, runs_dir)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
