"""Ray Tune search over aelib's seven autoencoders, every trial in parallel.

    python jobs/sweep.py --smoke-test --data /work/shared/data/mnist.npz
    python jobs/sweep.py --models dense conv vae --num-samples 8 --epochs 20 \
        --storage-path ~/ray_results --name ae-sweep --data /path/to/mnist.npz
    ray submit --tmux cluster.yaml jobs/sweep.py -- --gpus-per-trial 0.5 --allow-autoscale
        # on the cluster (cluster.yaml), to $AELIB_STORAGE_PATH/sweeps

One Tuner runs every variant's trials side by side. Each trial calls
`aelib.train` on MNIST taken from Ray's object store, reports the validation
loss per epoch (plus PSNR/SSIM for `denoise`) with a `.keras` checkpoint, and
its final test metrics. ASHA stops poor trials early, comparing a trial only
with trials of its own variant (their losses differ in kind: `vae` adds a KL
term, `sparse` an L1 penalty); `--search optuna` adds a model-based search, an
Optuna TPE study per variant for the same reason.

Everything lands under `<storage-path>/<name>/`:
    best/<variant>.keras   the best model of each variant (aelib.load reloads it)
    best/<variant>.json    its config, test metrics and trial
    trials.csv, trials.parquet   one row per trial (hyperparameters, metrics, node, status)
    report/report.md       best config, test metrics and the tutorial's figures per
                           variant, and report/compare.png comparing the variants
    <variant>_<trial id>/  Tune's results, checkpoints and TensorBoard logs of each
                           trial (tensorboard --logdir <storage-path>/<name>)

The file runs alone (`ray submit` copies only this file): it needs aelib
installed, nothing else from the repository. `ray.init()` takes the cluster
address from RAY_ADDRESS (or the cluster `ray start` made on this machine);
RAY_ADDRESS=local forces a fresh local Ray. A Ray the job starts itself runs
without Ray's dashboard (~1 s less start-up); to watch a local sweep there, run
`ray start --head` first and the job connects to it. On a multi-node cluster give a
--storage-path every node can reach (a cloud URI or a shared filesystem); without
the flag the job takes $AELIB_STORAGE_PATH/sweeps, which cluster.yaml sets on every
node, and ~/ray_results where it is not set.

Faults: a failing trial is retried (--max-failures); a trial whose loss turns
NaN stops and is marked `diverged` in the table while the sweep goes on; after the
driver dies, rerun the same command with --resume: finished trials are kept,
unfinished ones continue from their last epoch's checkpoint.
"""

from __future__ import annotations

import _thread
import argparse
import ast
import contextlib
import copy
import fnmatch
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import pickle
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn


def _stopped_while_importing(signum, frame) -> NoReturn:
    """Ctrl-C or SIGTERM in the imports below (seconds: Ray, Tune, pandas) ended in an
    import's KeyboardInterrupt traceback, exit 1 (a SIGTERM: no word)."""
    what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    print(
        f"sweep.py: stopped ({what}) while starting, before it wrote anything: rerun the "
        "same command to start it.",
        file=sys.stderr,
        flush=True,
    )
    os._exit(128 + signum)


if __name__ == "__main__":  # (over Python's own handlers only: not a signal ignored)
    _HANDLERS = {
        s: signal.signal(s, _stopped_while_importing)
        for s, own in (
            (signal.SIGINT, signal.default_int_handler),
            (signal.SIGTERM, signal.SIG_DFL),
        )
        if signal.getsignal(s) is own
    }

import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # noqa: E402
from ray.tune.search import BasicVariantGenerator, Searcher  # noqa: E402

if __name__ == "__main__":
    for _signum, _handler in _HANDLERS.items():
        signal.signal(_signum, _handler)

# num_to_keep=1 makes Tune snapshot the experiment state after every checkpoint (so a
# resume never points at a deleted one). That is cheap here; its warning is noise.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

# Per variant, the hyperparameters that matter. Keys in TRAIN_FIELDS are
# aelib.TrainConfig fields; every other key is a build_model option of that variant.
SEARCH_SPACE: dict[str, dict[str, Any]] = {
    "dense": {
        "encoding_dim": tune.choice([16, 32, 64]),
        "learning_rate": tune.loguniform(3e-4, 3e-3),
        "batch_size": tune.choice([128, 256]),
    },
    # No l1: sparse's val_loss includes its L1 penalty, so trials of another l1 minimise
    # another loss, and the smallest l1 scored best by it (by BCE too: the penalty only
    # costs reconstruction). How sparse a code to want is the user's: --set sparse.l1=...
    "sparse": {
        "encoding_dim": tune.choice([32, 64]),
        "learning_rate": tune.loguniform(3e-4, 3e-3),
        "batch_size": tune.choice([128, 256]),
    },
    "deep": {
        "hidden_units": tune.choice([[128, 64], [256, 128]]),
        "encoding_dim": tune.choice([16, 32, 64]),
        "learning_rate": tune.loguniform(3e-4, 3e-3),
        "batch_size": tune.choice([128, 256]),
    },
    "conv": {
        "filters": tune.choice([[16, 8, 8], [32, 16, 8], [32, 16, 16]]),
        "learning_rate": tune.loguniform(3e-4, 3e-3),
        "batch_size": tune.choice([64, 128]),
    },
    "denoise": {
        "filters": tune.choice([16, 32, 64]),
        "depth": tune.choice([1, 2]),
        "convs_per_stage": tune.choice([1, 2]),
        "upsample": tune.choice(["nearest", "transpose"]),
        "skips": tune.choice([False, True]),
        # The noise trained on; every trial is validated and tested at one noise level
        # (trial_config), else the least noisy trials would score best.
        "noise_factor": tune.uniform(0.3, 0.6),
        "learning_rate": tune.loguniform(3e-4, 3e-3),
        "batch_size": tune.choice([64, 128]),
    },
    "seq2seq": {
        "latent_dim": tune.choice([32, 64, 128]),
        "learning_rate": tune.loguniform(5e-4, 5e-3),
        "batch_size": tune.choice([128, 256]),
    },
    "vae": {
        "latent_dim": tune.choice([2, 4, 8]),
        "intermediate_dim": tune.choice([128, 256]),
        "learning_rate": tune.loguniform(3e-4, 3e-3),
        "batch_size": tune.choice([100, 200]),
    },
}
VARIANTS = tuple(SEARCH_SPACE)
# Rough relative cost of one training epoch (CPU, tutorial-sized models). Trials
# start heaviest first, so the sweep does not end with one long trial running alone
# while the other CPUs idle (longest-processing-time-first scheduling).
EPOCH_COST = {"denoise": 10, "conv": 6, "seq2seq": 5, "vae": 2, "deep": 1.5}
# (the rest: model options)
TRAIN_FIELDS = ("learning_rate", "batch_size", "noise_factor", "eval_noise_factor", "lr_schedule")
NOISE_FIELDS = ("noise_factor", "eval_noise_factor")  # denoise's only
METRIC, MODE = "val_loss", "min"
# What every trial holds out for validation: aelib.TrainConfig().val_split (the report says it)
VAL_SPLIT = 0.1
SMOKE = {"limit": 600, "test_limit": 200, "epochs": 1, "num_samples": 1, "metrics_limit": 200}
CHECKPOINT_STATE = "state.json"
# The settings a sweep started with, in its experiment folder: a --resume keeps them.
SETTINGS = "sweep_settings.json"
LOCK = ".sweep.lock"  # (in the experiment folder: see one_sweep_at_a_time)
RESUMED = (
    "models",
    "num_samples",
    "epochs",
    "limit",
    "test_limit",
    "seed",
    "scheduler",
    "grace_period",
    "search",
    "pins",
    "smoke_test",
    # Restored by Tune with the experiment (its RunConfig and searcher), whatever the
    # flags say: refused rather than ignored.
    "max_concurrent",
    "max_failures",
)
# What to say beside a refused --resume flag, where dropping it is not the only way.
RESUME_HINTS = {
    "max_concurrent": " (more --cpus-per-trial, which a resume takes, runs fewer trials at once)",
}
# Imported by `import tensorflow` only for features no trial uses (Keras's scikit-learn
# wrappers, TF-lite's JAX converter, Keras's image-gallery plot), and optional there:
# ~1.2 s of each process's start. (The report imports Matplotlib itself, later.)
UNUSED_IMPORTS = ("jax", "sklearn", "matplotlib")
# How denoise trials are scored: all at one noise (eval_noise_factor), whatever noise they
# trained at. ("as-trained": each at its own, as sweeps started before 2026-12-04 did.)
SCORING = "fixed-noise"


# ---------------------------------------------------------------- flags


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1. Received: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1. Received: {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0. Received: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0. Received: {text}")
    return value


def _pin(text: str) -> tuple[str, str, Any]:
    """VARIANT.KEY=VALUE -> (variant, key, value)."""
    name, sep, raw = text.partition("=")
    variant, dot, key = name.partition(".")
    if not sep or not dot:
        raise argparse.ArgumentTypeError(
            f"expects VARIANT.KEY=VALUE, e.g. vae.learning_rate=1e-3. Received: {text!r}"
        )
    if variant not in SEARCH_SPACE:
        raise argparse.ArgumentTypeError(
            f"unknown variant {variant!r} in {text!r}. Valid variants: {', '.join(VARIANTS)}"
        )
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return variant, key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # `--epoch 3` is not --epochs: --smoke-test would override it
    )
    p.add_argument(
        "--models",
        nargs="+",
        action="extend",  # (given twice: both, not the last alone without a word)
        default=None,
        metavar="VARIANT",
        help=f"variants to search, spaced or comma-separated (default: all of "
        f"{', '.join(VARIANTS)})",
    )
    p.add_argument("--num-samples", type=_positive_int, default=4, help="trials per variant")
    p.add_argument("--epochs", type=_positive_int, default=10, help="max epochs per trial")
    p.add_argument("--cpus-per-trial", type=_non_negative_float, default=1.0)
    p.add_argument(
        "--gpus-per-trial",
        type=_non_negative_float,
        default=None,
        help="fractions allowed (default: 0 on a cluster without GPUs; with GPUs, each "
        "trial's share of a GPU in proportion to its CPUs, e.g. 1/16 for a 1-CPU trial on "
        "nodes of 16 CPUs per GPU). A trial given 0 trains on its CPUs",
    )
    p.add_argument(
        "--max-concurrent",
        type=_positive_int,
        default=None,
        help="trials at once (default: as many as the resources allow)",
    )
    p.add_argument(
        "--allow-autoscale",
        action="store_true",
        help="accept trial resources no node has now (an autoscaler will add such nodes)",
    )
    p.add_argument(
        "--storage-path",
        default=None,
        help="local folder or cloud URI (s3://, gs://, ...) every node reaches; default "
        "$AELIB_STORAGE_PATH/sweeps (cluster.yaml sets it on every node), else ~/ray_results",
    )
    p.add_argument("--name", default="aelib-sweep", help="experiment name (a folder in storage)")
    p.add_argument(
        "--data", default=None, help="path to mnist.npz (default: $AELIB_MNIST, then Keras's)"
    )
    p.add_argument("--limit", type=_positive_int, default=None, help="first N training images")
    p.add_argument("--test-limit", type=_positive_int, default=None, help="first N test images")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the hyperparameter sampling (random and optuna) and every trial's "
        "training: the same command samples and trains the same trials",
    )
    p.add_argument("--scheduler", choices=("asha", "fifo"), default="asha")
    p.add_argument("--grace-period", type=_positive_int, default=1, help="ASHA's min epochs")
    p.add_argument("--search", choices=("random", "optuna"), default="random")
    p.add_argument("--max-failures", type=int, default=2, help="retries per failing trial")
    p.add_argument(
        "--set",
        dest="pins",
        type=_pin,
        action="append",
        default=[],
        metavar="VARIANT.KEY=VALUE",
        help="fix one hyperparameter of a variant instead of searching it",
    )
    p.add_argument("--no-figures", action="store_true", help="skip the report's figures")
    p.add_argument(
        "--smoke-test",
        action="store_true",
        help=f"tiny run: {SMOKE}, 1 sample per variant (explicit flags still win)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the experiment --name, with the settings it started with",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and checks the flags that need no cluster; exits 2 on a bad one."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = set(_given_flags(argv if argv is not None else sys.argv[1:]))
    if args.smoke_test:
        for key in ("limit", "test_limit", "epochs", "num_samples"):
            if f"--{key.replace('_', '-')}" not in given:
                setattr(args, key, SMOKE[key])
    # `--models conv denoise`, `--models conv,denoise` or "conv, denoise", as the
    # benchmarks take them
    texts = list(VARIANTS) if args.models is None else args.models
    args.models = [m.strip() for text in texts for m in text.split(",") if m.strip()]
    if not args.models:
        parser.error("--models: no variant given")
    unknown = [m for m in args.models if m not in SEARCH_SPACE]
    if unknown:
        parser.error(
            f"--models: unknown variant(s) {', '.join(map(repr, unknown))}. "
            f"Valid variants: {', '.join(VARIANTS)}"
        )
    args.models = list(dict.fromkeys(args.models))  # dedupe, keep order
    args.scoring = SCORING  # (a resumed sweep keeps its own: _keep_first_settings)
    if args.cpus_per_trial <= 0:
        parser.error(f"--cpus-per-trial must be > 0. Received: {args.cpus_per_trial}")
    for flag, share in (("cpus", args.cpus_per_trial), ("gpus", args.gpus_per_trial)):
        if share and share < 1e-4:  # (Ray's traceback, after it had started)
            zero = "0 or " if flag == "gpus" else ""  # (a trial needs some CPU)
            parser.error(
                f"--{flag}-per-trial must be {zero}at least 0.0001, the smallest share Ray "
                f"counts. Received: {share}"
            )
    gpus = args.gpus_per_trial
    if gpus is not None and gpus > 1 and gpus != int(gpus):
        parser.error(
            f"--gpus-per-trial above 1 must be a whole number. Received: {args.gpus_per_trial}"
        )
    if args.max_failures < 0:
        parser.error(f"--max-failures must be >= 0. Received: {args.max_failures}")
    if args.limit is not None and args.limit < 2:  # aelib's TrainConfig needs 2 or more
        parser.error(
            f"--limit must be >= 2 (training and validation images). Received: {args.limit}"
        )
    if not 0 <= args.seed < 2**32:  # NumPy's seeds (Tune's sampler, Keras's set_random_seed)
        parser.error(f"--seed must be an integer in [0, {2**32 - 1}]. Received: {args.seed}")
    if not args.name or "/" in args.name or args.name in (".", ".."):
        parser.error(f"--name must be a plain folder name. Received: {args.name!r}")
    if len(args.name.encode()) > 200:  # (a traceback, once Ray had started)
        parser.error(
            f"--name is {len(args.name.encode())} bytes long: at most 200 (a folder name's "
            "limit is 255, and Tune names files after it)"
        )
    if args.storage_path == "":  # (an unset variable: not the current folder)
        parser.error("--storage-path is empty: give a folder or a cloud URI")
    if args.storage_path is None:
        shared = os.environ.get("AELIB_STORAGE_PATH", "").rstrip("/")
        args.storage_path = f"{shared}/sweeps" if shared else "~/ray_results"
    if args.storage_path.startswith("file:/"):
        # A local folder, as one (a file:// experiment had no lock: two sweeps ran in it).
        uri = urllib.parse.urlparse(args.storage_path)
        if uri.netloc not in ("", "localhost"):
            parser.error(f"--storage-path {args.storage_path}: not a folder of this machine")
        if not uri.path.strip("/"):
            parser.error(f"--storage-path {args.storage_path}: no folder in it")
        args.storage_path = urllib.parse.unquote(uri.path)
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:/(?!/)", args.storage_path):
        parser.error(  # (s3:/x wrote to the folder ./s3:/x)
            f"--storage-path {args.storage_path}: a URI's scheme is followed by '://'"
        )
    # (In a URI, # and ? end the path, and pyarrow refuses a space: a sweep named a#b
    # trained into a#b, then published its results to a, and could not be resumed.)
    odd = sorted(set(re.sub(r"[A-Za-z0-9._=+@,-]", "", args.name)))
    if "://" in args.storage_path and odd:
        parser.error(
            f"--name {args.name!r}: {' '.join(map(repr, odd))} cannot be in the name of a "
            f"sweep stored at a URI ({args.storage_path}): use letters, digits and . _ - = + @ ,"
        )
    if "CHANGE-ME" in args.storage_path:  # cluster.yaml's placeholder bucket, never set
        parser.error(
            f"--storage-path: {args.storage_path} is the placeholder of cluster.yaml "
            "(AELIB_STORAGE_PATH): pass --storage-path, or set your bucket there and "
            "recreate the cluster (`ray down`, `ray up`: running containers keep their "
            "environment)"
        )
    if "://" not in args.storage_path:
        args.storage_path = os.path.abspath(os.path.expanduser(args.storage_path))
        if os.path.exists(args.storage_path) and not os.path.isdir(args.storage_path):
            parser.error(f"--storage-path: {args.storage_path} is a file, not a folder")
        if problem := _broken_link(args.storage_path):  # (makedirs said "File exists")
            parser.error(f"--storage-path: {problem}")
        # (here, not as a pyarrow traceback once Ray has started)
        if problem := _cannot_write(args.storage_path):
            parser.error(f"--storage-path: cannot write to {args.storage_path}: {problem}")
        experiment = os.path.join(args.storage_path, args.name)
        if os.path.exists(experiment) and not os.path.isdir(experiment):
            parser.error(f"--name {args.name}: {experiment} is a file, not an experiment folder")
        if problem := _broken_link(experiment):  # (a traceback: FileExistsError, at the lock)
            parser.error(f"--name {args.name}: {problem}")
        # (an existing one may not be: another user's, say)
        if os.path.isdir(experiment) and (problem := _cannot_write(experiment)):
            parser.error(f"--name {args.name}: cannot write to {experiment}: {problem}")
    elif problem := _unreachable(args.storage_path):
        parser.error(f"--storage-path: cannot reach {args.storage_path}: {problem}")
    if args.data is not None:
        if not args.data.strip():  # ("$DATA" unset: the current folder, "is a folder")
            parser.error("--data is empty: expected the path of mnist.npz")
        args.data = os.path.abspath(os.path.expanduser(args.data))
        if os.path.isdir(args.data):
            parser.error(f"--data: {args.data} is a folder; expected the mnist.npz file")
        if os.path.exists(args.data) and not os.path.isfile(args.data):  # (/dev/null)
            parser.error(f"--data: {args.data} is not a regular file; expected the mnist.npz file")
        if not os.path.isfile(args.data):
            parser.error(f"--data: MNIST file not found: {args.data}")
    seen: dict[tuple[str, str], Any] = {}
    for variant, key, value in args.pins:  # (those given: a resume's are checked below)
        if (variant, key) in seen:  # (the last would win, and the report listed both)
            parser.error(
                f"--set {variant}.{key} is given twice ({json.dumps(seen[variant, key])} and "
                f"{json.dumps(value)}): give it once"
            )
        seen[variant, key] = value
    experiment = experiment_path(args)
    resumable = restorable(experiment)  # (each call lists the folder: on S3, a request)
    if resumable and (trainable := foreign_trainable(experiment)):
        parser.error(  # (before the lock, whose file it would leave there)
            f"--name {args.name}: {experiment} holds a Tune experiment of another program "
            f"(its trials run {trainable!r}; a sweep's run {train_trial.__name__!r}), which "
            "this job cannot resume: choose another --name (or --storage-path)"
        )
    if (
        args.resume
        and resumable
        and not _in_use(experiment)  # (its Tune writes its state: the lock refuses it)
        and (problem := damaged_state(experiment))
    ):
        parser.error(
            f"--name {args.name}: the sweep's saved state cannot be resumed: Tune's {problem}. "
            f"Choose another --name (or remove {experiment}) to run the sweep again."
        )
    if args.resume and resumable:  # (nothing to resume: main() says so)
        _keep_first_settings(args, given, parser)
    if args.scheduler == "asha" and args.grace_period > args.epochs:
        parser.error(f"--grace-period ({args.grace_period}) must be <= --epochs ({args.epochs})")
    if args.scheduler == "fifo" and "--grace-period" in given:  # (recorded, never used)
        parser.error("--grace-period applies to --scheduler asha only: fifo stops no trial early")
    for variant, key, _ in args.pins:
        if variant not in args.models:
            parser.error(f"--set {variant}.{key}: {variant!r} is not among --models")
    if args.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            parser.error("--search optuna needs the optuna package: pip install optuna")
    return args


def experiment_path(args: argparse.Namespace) -> str:
    """The experiment's folder (or URI): --name under --storage-path."""
    return f"{args.storage_path.rstrip('/')}/{args.name}"


def _files(experiment: str) -> tuple[Any, dict[str, str]]:
    """The file system of an experiment's folder, and its files' names and paths."""
    import pyarrow.fs

    if "://" in experiment:
        fs, path = pyarrow.fs.FileSystem.from_uri(experiment)
    else:
        fs, path = pyarrow.fs.LocalFileSystem(), os.path.abspath(experiment)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return fs, {info.base_name: info.path for info in infos}


# What Tune's restore reads, the newest of each (the greatest name): its experiment
# state (JSON), the search algorithm's and the callbacks' states (pickles).
EXPERIMENT_STATE = "experiment_state-*.json"
TUNE_STATES = (
    EXPERIMENT_STATE,
    "tuner.pkl",
    "basic-variant-state-*.json",
    "searcher-state-*.pkl",
    "search_gen_state-*.json",
    "callback-states-*.pkl",
)


def _newest(names: dict[str, str], pattern: str) -> str | None:
    matching = sorted(name for name in names if fnmatch.fnmatchcase(name, pattern))
    return names[matching[-1]] if matching else None


def restorable(experiment: str) -> bool:
    """Whether the experiment has a sweep to resume. Tune writes its tuner.pkl (which
    Tuner.can_restore looks for) before its experiment state: a sweep stopped between
    the two left a folder that a plain rerun refused and that Tuner.restore started
    anew without its settings (every trial failed, and so did every --resume)."""
    if not tune.Tuner.can_restore(experiment):
        return False
    return _newest(_files(experiment)[1], EXPERIMENT_STATE) is not None


def foreign_trainable(experiment: str) -> str | None:
    """The trainable a restorable experiment's trials run where it is not this sweep's
    (another program's Tune experiment at --name), as Tune's newest experiment state
    names it; None for a sweep's, or where the state names none. Such a folder was
    "already holds an experiment. Pass --resume", and --resume (as "a sweep of an older
    version") ended in Tune's traceback once Ray had started."""
    fs, names = _files(experiment)
    try:
        with fs.open_input_stream(_newest(names, EXPERIMENT_STATE)) as f:
            trial = json.loads(json.loads(f.read())["trial_data"][0][0])
        name = trial["trainable_name"]
    except (IndexError, KeyError, TypeError, ValueError, OSError):
        return None  # (not readable here: see damaged_state)
    return None if name == train_trial.__name__ else str(name)


def damaged_state(experiment: str) -> str | None:
    """Which file of Tune's state a restore reads is cut short (a full disk or a kill
    while Tune wrote it) or cannot be read, and why, or None. Tune's restore logged
    "Failed to restore the run state" and started the experiment again without its
    settings: every trial failed (KeyError: 'model'), and so did every later --resume.
    The pickles are only walked (pickletools), not loaded: nothing of theirs is
    imported or run here."""
    import pickletools

    fs, names = _files(experiment)
    for pattern in TUNE_STATES:
        if (path := _newest(names, pattern)) is None:
            continue
        try:
            with fs.open_input_stream(path) as f:
                payload = f.read()
        except OSError as e:  # (not readable here: nor by Tune's restore)
            return f"{path} cannot be read ({e})"
        try:
            if pattern == EXPERIMENT_STATE:
                json.loads(payload)
            else:
                for _ in pickletools.genops(payload):  # (ValueError where it ends early)
                    pass
        except ValueError as e:  # (JSONDecodeError, UnicodeDecodeError too)
            return (
                f"{path} is cut short ({type(e).__name__}: {e}), as a full disk, or a kill "
                "while Tune wrote it, leaves it"
            )
    return None


def _in_use(experiment: str) -> bool:
    """Whether another sweep holds the lock of a local experiment (one_sweep_at_a_time).
    Its Tune copies its state files into the folder as it goes, a file at a time and in
    place: read then, one can be half written (4 of 22,650 reads beside a short sweep),
    and damaged_state took it for cut short, saying to remove the running sweep's folder
    where the lock would have said it was in use."""
    if "://" in experiment:
        return False  # (an object store has no locks)
    return _aelib_module("process").in_use(os.path.join(experiment, LOCK))


@contextlib.contextmanager
def one_sweep_at_a_time(experiment: str):
    """Keeps a second sweep off a local experiment while this one runs: two at once both
    ran, into one folder (two experiment states; the results of whichever ended last).
    The lock is the kernel's (flock on LOCK in the folder), so it ends with the process
    however it ends; the file stays. A folder this made is removed again if the sweep
    is refused before it writes anything else there. (An object store has no locks.)"""
    if "://" in experiment:
        yield
        return
    process = _aelib_module("process")
    folder = Path(experiment)
    made: list[Path] = []
    process.make_folder(folder, made)
    try:
        with process.held(folder / LOCK, f"pid {os.getpid()} on {socket.gethostname()}"):
            try:
                yield
            finally:  # (a sweep refused at the lock removes nothing: two that found no
                # folder at the same instant both "made" it, and the refused one removed
                # the other's lock file and folder, which let a third one in. And this
                # is done while the lock is held: once released, a second sweep could
                # take it, then lose its lock file and folder here, and a third run
                # beside it.)
                if made and sorted(os.listdir(folder)) == [LOCK]:
                    with contextlib.suppress(OSError):
                        os.unlink(folder / LOCK)
                        process.remove_made(made)  # (and the --storage-path folders it made)
    except process.Busy as e:
        raise SystemExit(
            f"sweep.py: error: {experiment} is in use by another sweep ({e}): wait for it "
            "to end, or choose another --name."
        ) from None


def _settings_file(args: argparse.Namespace):
    """pyarrow's filesystem and path of the experiment's SETTINGS file."""
    import pyarrow.fs

    location = f"{experiment_path(args)}/{SETTINGS}"
    if "://" in location:
        return pyarrow.fs.FileSystem.from_uri(location)
    return pyarrow.fs.LocalFileSystem(), location


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    settings = {key: getattr(args, key) for key in RESUMED}
    return json.loads(json.dumps({**settings, "scoring": args.scoring}))


def _plural(n: int, noun: str) -> str:
    return noun if n == 1 else f"{noun}s"


def _report_data(args: argparse.Namespace) -> str:
    """The data file the report names: the one the sweep started with, where a --resume
    gave the same digits from another path (it named only the new one)."""
    recorded = getattr(args, "first_data", None) or {}
    first, now = recorded.get("data"), data_label(args)
    if first and first != now and recorded.get("data_sha256"):  # (compared: same digest)
        return f"{first} (resumed with the same digits from {now})"
    return now


def write_settings(args: argparse.Namespace) -> None:
    """Records what the sweep's trials are made of, for a later --resume: the settings,
    and the data (its file, and a digest of the arrays the trials get)."""
    fs, path = _settings_file(args)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    digest = getattr(args, "data_sha256", None)  # (main's; None: not known to differ)
    settings = {**_settings(args), "data": data_label(args), "data_sha256": digest}
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(settings, indent=2).encode())


def data_digest(arrays) -> str:
    """SHA-256 of the arrays the trials get (images and labels, cut to --limit and
    --test-limit): the same data at another path has the same digest."""
    import numpy as np

    digest = hashlib.sha256()
    for split in arrays:
        for array in split:
            digest.update(str((array.dtype.str, array.shape)).encode())
            digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def check_same_data(args: argparse.Namespace) -> None:
    """A resumed sweep's trials to come get the data its first trials had, or none."""
    first = getattr(args, "first_data", None)
    if first and first.get("data_sha256") not in (None, args.data_sha256):
        raise SystemExit(
            f"sweep.py: error: --resume: {args.name} started with other data "
            f"({first.get('data') or 'MNIST from Keras'}, digest {first['data_sha256'][:12]}) "
            f"than this run's ({data_label(args)}, digest {args.data_sha256[:12]}): its "
            "trials would compare models trained on both; give the same --data (or "
            "$AELIB_MNIST), or a new --name"
        )


def data_label(args: argparse.Namespace) -> str:
    """The MNIST file the driver loads: --data, else $AELIB_MNIST, else Keras's."""
    path = _aelib_module("data").resolve_mnist_path(args.data)
    return str(path) if path is not None else "MNIST from Keras"


def _resume_on_first_data(args: argparse.Namespace) -> None:
    """A --resume given neither --data nor $AELIB_MNIST reads the file the sweep started
    with (its digest is checked as any other's): from another shell it tried Keras's
    download, and offline failed without naming the file the sweep had used."""
    first = args.first_data.get("data")
    if data_label(args) != "MNIST from Keras" or not first or first == "MNIST from Keras":
        return
    if Path(first).is_file():
        args.data = first
        print(
            f"sweep.py: note: --resume reads {first}, the data file {args.name} started "
            "with (no --data or $AELIB_MNIST given)",
            file=sys.stderr,
        )
    else:
        print(
            f"sweep.py: note: {args.name} started with {first}, which is not there now: "
            "give its digits with --data",
            file=sys.stderr,
        )


def _shown(key: str, value: Any) -> str:
    """A setting as its flag takes it: `dense.batch_size=64`, `dense vae`, `3`."""
    if key == "pins":
        return " ".join(f"{v}.{k}={json.dumps(x)}" for v, k, x in value) or "(none)"
    if value is None:
        return "(not given)"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _same(key: str, a: Any, b: Any) -> bool:
    """Settings that make the same sweep: variants and pins in any order."""
    if key in ("models", "pins"):
        return sorted(map(json.dumps, a)) == sorted(map(json.dumps, b))
    return a == b


# What each setting of a SETTINGS file may hold (write_settings; None: not given).
SETTING_KINDS: dict[str, tuple] = {
    **dict.fromkeys(("num_samples", "epochs", "seed", "grace_period", "max_failures"), (int,)),
    **dict.fromkeys(("limit", "test_limit", "max_concurrent"), (int, type(None))),
    "models": (list,),
    "pins": (list,),
    "smoke_test": (bool,),
    "scheduler": ("asha", "fifo"),
    "search": ("random", "optuna"),
    "scoring": (SCORING, "as-trained"),
    "data": (str,),
    "data_sha256": (str, type(None)),
}


def _check_settings(first: Any) -> None:
    """Raises ValueError where a SETTINGS file's content is not what write_settings
    writes (a damaged or hand-edited file: a TypeError's traceback, later)."""
    if not isinstance(first, dict):
        raise ValueError(f"{json.dumps(first)[:40]}, not a JSON object")
    for key, kinds in SETTING_KINDS.items():
        if key not in first:  # (an older version's file: the flags say)
            continue
        value = first[key]
        types = [k for k in kinds if isinstance(k, type)]
        if types:
            ok = isinstance(value, tuple(types)) and not (
                isinstance(value, bool) and bool not in types
            )
        else:
            ok = value in kinds
        if key == "models" and ok:
            ok = all(isinstance(m, str) for m in value)
        if key == "pins" and ok:  # ([["dense", "batch_size", 64], ...])
            ok = all(
                isinstance(pin, list) and len(pin) == 3 and all(isinstance(k, str) for k in pin[:2])
                for pin in value
            )
        if not ok:
            raise ValueError(f"its {key} is {json.dumps(value)[:40]}")


def _keep_first_settings(args: argparse.Namespace, given: set[str], parser) -> None:
    """A resumed sweep (of a restorable experiment) takes the settings it started with:
    Tune restores its trials, search and scheduler, while --epochs, --limit, ... went to
    each trial from this run's flags (a sweep started with 4 epochs and resumed with 2
    had trials of both, and a report of neither). A flag given with another value is
    refused."""
    fs, path = _settings_file(args)
    try:
        with fs.open_input_stream(path) as f:
            first = json.loads(f.read())
        _check_settings(first)
    except ValueError as e:  # (a damaged or hand-edited file: a traceback)
        parser.error(
            f"--resume: {experiment_path(args)}/{SETTINGS} is not a sweep's settings ({e}): "
            f"it records how {args.name} started, which a resumed sweep keeps; put it back "
            "as it was, or give a new --name"
        )
    except FileNotFoundError:
        print(
            f"sweep.py: note: {args.name} has no {SETTINGS} (a sweep of an older version): "
            "resumed with this run's flags, which must be the ones it started with",
            file=sys.stderr,
        )
        first = {}
    # How its denoise trials are scored: an experiment of before 2026-12-04 scored each
    # at the noise it trained at, and its trials to come are scored so too.
    args.scoring = first.get("scoring", "as-trained")
    args.first_data = {k: first[k] for k in ("data", "data_sha256") if k in first}
    _resume_on_first_data(args)
    if not first:
        return
    now = _settings(args)
    for key in RESUMED:
        if key not in first or _same(key, now[key], first[key]):
            continue
        flag = "--set" if key == "pins" else f"--{key.replace('_', '-')}"
        if flag in given:
            parser.error(
                f"--resume: {args.name} started with {flag} {_shown(key, first[key])}, not "
                f"{_shown(key, now[key])}; a resumed sweep keeps its first settings: drop "
                f"{flag}, or give a new --name{RESUME_HINTS.get(key, '')}"
            )
        if key in SMOKE and "--smoke-test" in given:
            parser.error(
                f"--resume: {args.name} started with {flag} {_shown(key, first[key])}, which "
                f"--smoke-test makes {_shown(key, now[key])}; a resumed sweep keeps its first "
                "settings: drop --smoke-test, or give a new --name"
            )
        value = first[key]
        setattr(args, key, [tuple(pin) for pin in value] if key == "pins" else value)


def _broken_link(path: str) -> str | None:
    """Which link on a local `path` points nowhere (to a disk not mounted, say), or None."""
    link = _aelib_module("process").broken_link(path)
    return f"{link} is a link to {os.readlink(link)}, which does not exist" if link else None


def _cannot_write(folder: str) -> str | None:
    """Why a local `folder` cannot be written (or, where it does not exist yet, made), or
    None: a temp file is made in it, or in the nearest folder above it that exists, and
    removed. Nothing else is made (a refused run left its --storage-path's folders)."""
    existing = str(_aelib_module("process").nearest_existing(folder))
    if existing != folder and not os.path.isdir(existing):
        return f"{existing} is not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return str(e.strerror or e)
    return None


def _unreachable(uri: str) -> str | None:
    """Why a cloud storage path cannot be read with this machine's credentials (None if
    it can): here, before Ray starts, rather than from Tune once it has. Without Google
    credentials pyarrow's GCS client retried for 16 minutes before its error, so the
    probe gives it 30 s unless the URI sets its own `retry_limit_seconds`."""
    import pyarrow.fs

    probe = uri
    if uri.lower().startswith(("gs://", "gcs://")) and "retry_limit_seconds=" not in uri:
        probe += ("&" if "?" in uri else "?") + "retry_limit_seconds=30"
    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(probe)
        fs.get_file_info(path)
    except Exception as e:  # pyarrow's OSError, or ValueError for a URI it cannot parse
        if "OAuth2 access token" in str(e):
            return (
                f"{e}\nsweep.py: no Google Cloud credentials were found: set "
                "GOOGLE_APPLICATION_CREDENTIALS to a service account's key file or run "
                "`gcloud auth application-default login`"
            )
        return str(e)
    return None


def _given_flags(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


def check_search_space(models: list[str], pins: list[tuple[str, str, Any]]) -> None:
    """Every searched or pinned key must be a TrainConfig field or a model option, and
    every pinned value of the type of that field's or option's default."""
    known = variant_options()
    train_defaults = train_field_defaults() if pins else {}
    for model in models:
        if model not in known:
            raise SystemExit(f"sweep.py: error: installed aelib has no variant {model!r}")
        options = known[model]
        keys = set(SEARCH_SPACE[model]) | {k for v, k, _ in pins if v == model}
        bad = sorted(k for k in keys if k not in options and k not in TRAIN_FIELDS)
        if bad:  # (named the variant only, not the --set, and offered the noise fields,
            # denoise's only, to every variant)
            pinned = sorted({f"--set {model}.{k}" for v, k, _ in pins if v == model and k in bad})
            fields = [f for f in TRAIN_FIELDS if model == "denoise" or f not in NOISE_FIELDS]
            raise SystemExit(
                f"sweep.py: error: {', '.join(pinned) or model}: {bad} are neither model "
                f"options of {model} {sorted(options)} nor training fields {fields}"
            )
        for key, value in _pins_by_model(pins).get(model, {}).items():
            if key in NOISE_FIELDS and model != "denoise":
                raise SystemExit(  # (pinned, reported, and read by no trial)
                    f"sweep.py: error: --set {model}.{key}={value!r}: {key} is denoise's only (the "
                    "other variants train and are scored on clean digits)"
                )
            if key == "eval_noise_factor" and value is None:
                raise SystemExit(  # (each trial was scored at its own noise; the report
                    # said they compared)
                    "sweep.py: error: --set denoise.eval_noise_factor=None: the sweep scores "
                    "every denoise trial at one noise factor, so that their scores compare: "
                    "pin a number in (0, 1], or leave it to noise_factor's"
                )
            default = train_defaults.get(key) if key in TRAIN_FIELDS else options[key]
            size = key.endswith("_size") and key not in TRAIN_FIELDS  # (not batch_size)
            expected = _unlike(value, default, size)
            if expected:
                raise SystemExit(
                    f"sweep.py: error: --set {model}.{key}={value!r}: expected {expected} "
                    f"(default {default!r})"
                )


def _unlike(value: Any, default: Any, size: bool = False) -> str | None:
    """What a value must be to stand in for `default` (None: it may), by the default's
    type: ints also stand for floats, tuples and lists for each other; any value for None.
    A `size` (Keras's kernel_size, as aelib's registry takes it) also takes one int per
    dimension: `--set conv.kernel_size=(3,5)` was refused as "expected an int"."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "True or False"
    if isinstance(default, int | float):
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if isinstance(default, float):
            return None if number else "a number"
        if size and isinstance(value, tuple | list) and value:
            return None if not any(_unlike(v, default) for v in value) else "an int or ints"
        return None if number and isinstance(value, int) else "an int" + " or ints" * size
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    if isinstance(default, tuple | list) and default:
        ok = isinstance(value, tuple | list) and not any(_unlike(v, default[0]) for v in value)
        return None if ok else f"a tuple or list of {type(default[0]).__name__}s"
    return None  # None or another kind of default: the builder checks it


def variant_options() -> dict[str, dict[str, Any]]:
    """The installed aelib's variants and their build options with their defaults (None
    where not a literal), read from the signatures of its `@register_model` builders
    (aelib/models/*.py) without importing aelib.

    Importing aelib starts Keras and TensorFlow, 3-4 CPU-s that the driver spent
    beside Ray's start-up and that held up the first trial; the driver needs Keras
    only to draw the report's figures. Falls back to importing aelib where its
    sources cannot be read."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted((_aelib_folder() / "models").glob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and any(
                isinstance(d, ast.Call) and getattr(d.func, "id", None) == "register_model"
                for d in node.decorator_list
            ):
                a = node.args  # options are the parameters with defaults, as in the registry
                params = list(zip(a.args[len(a.args) - len(a.defaults) :], a.defaults, strict=True))
                params += [
                    (p, d)
                    for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)
                    if d is not None
                ]
                found[node.name] = {p.arg: _literal(d) for p, d in params}
    if found:
        return found
    import aelib

    return {model: aelib.model_defaults(model) for model in aelib.list_models()}


def train_field_defaults() -> dict[str, Any]:
    """aelib.TrainConfig's defaults of TRAIN_FIELDS, read from aelib/train.py like
    variant_options (importing aelib only where that source cannot be read)."""
    source = _aelib_folder() / "train.py"
    for node in ast.parse(source.read_text(encoding="utf-8")).body if source.is_file() else []:
        if isinstance(node, ast.ClassDef) and node.name == "TrainConfig":
            found = {
                f.target.id: _literal(f.value)
                for f in node.body
                if isinstance(f, ast.AnnAssign)
                and isinstance(f.target, ast.Name)
                and f.value is not None
            }
            if set(TRAIN_FIELDS) <= set(found):
                return {k: found[k] for k in TRAIN_FIELDS}
    from aelib.train import TrainConfig

    return {k: v for k, v in TrainConfig().to_dict().items() if k in TRAIN_FIELDS}


def _literal(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError):  # not a literal: no default to check values against
        return None


def _aelib_folder() -> Path:
    """Where aelib is installed, found without importing it."""
    spec = importlib.util.find_spec("aelib")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "sweep.py: error: aelib is not installed in this Python "
            f"({sys.executable}): pip install <the aelib repository> on every node"
        )
    return Path(list(spec.submodule_search_locations)[0])


def gpus_per_trial(nodes: list[dict], cpus_per_trial: float) -> float:
    """--gpus-per-trial when not given: 0 without GPU nodes; else each trial's share of a
    GPU in proportion to its CPUs, on the live GPU node with the fewest CPUs per GPU, so
    trials run out of a GPU node's CPUs and GPUs together, as many at once there as with
    no GPU, each training on a GPU (a trial given none does not see them:
    _configure_backend). CPU-only nodes (a head) then hold no trial. Only the nodes up
    now count: on an autoscaling cluster whose GPU workers are not up yet it is 0 (a
    note says so; pass --gpus-per-trial there).
    On an H200 node of 16 CPUs, 7 trials of 2 CPUs and 1/8 of the GPU trained 3 epochs
    of all 60,000 digits each in 63 s together (jobs/results/gpu_check_2026-12-04.json)."""
    per_cpu = [
        n["Resources"]["GPU"] / n["Resources"]["CPU"]
        for n in nodes
        if n.get("Alive", True)
        and n.get("Resources", {}).get("GPU", 0) > 0
        and n["Resources"].get("CPU", 0) > 0
    ]
    if not per_cpu:
        return 0.0
    share = min(1.0, cpus_per_trial * min(per_cpu))
    return max(1e-4, math.floor(share * 1e4 + 1e-6) / 1e4)  # Ray's resource granularity


def check_resources(args: argparse.Namespace) -> None:
    """Fails before any trial starts if no node can ever hold one trial."""
    need = {"CPU": args.cpus_per_trial, "GPU": args.gpus_per_trial}
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits = [
        n
        for n in nodes
        if all(n.get("Resources", {}).get(k, 0.0) >= v for k, v in need.items() if v > 0)
    ]
    if fits:
        return
    total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    # (where no node type holds it either, the whole request: CPUs may be what is short)
    beyond = args.allow_autoscale and _aelib_module("process").beyond_node_types(need)
    what = (
        f"--gpus-per-trial {args.gpus_per_trial:g} asks for GPUs"
        if args.gpus_per_trial > 0 and not total.get("GPU") and not beyond
        else f"a trial needs {{CPU: {args.cpus_per_trial:g}, GPU: {args.gpus_per_trial:g}}} "
        "(--cpus-per-trial, --gpus-per-trial)"
    )
    message = (
        f"{what} but no node of this Ray cluster has that much "
        f"(cluster resources now: {total or 'none'}; {len(nodes)} node(s))"
    )
    if beyond:  # (it waited for such a node without end, the autoscaler's log said why)
        raise SystemExit(f"sweep.py: error: {message}, {beyond}. Lower the request.")
    if args.allow_autoscale:
        print(
            f"sweep.py: warning: {message}. Waiting for the autoscaler (--allow-autoscale) "
            "to add such a node: the sweep waits for as long as none joins."
        )
        return
    raise SystemExit(
        f"sweep.py: error: {message}. Lower the request, or pass --allow-autoscale on a "
        "cluster whose autoscaler can add such nodes."
    )


# ---------------------------------------------------------------- search space


def effective_hparams(model: str, sampled: dict[str, Any], pins: dict[str, dict]) -> dict:
    return {**sampled, **pins.get(model, {})}


def variant_space(model: str, pins: dict[str, dict]) -> dict[str, Any]:
    """`model`'s search space with its pinned keys as the constants they are: sampled
    there, a pinned key went into the trial's config (Tune's progress table, the trial's
    params.json and result.json, TensorBoard's hyperparameters) with a value the trial
    did not train with (`--set denoise.batch_size=32` showed 64 and 128)."""
    return {**SEARCH_SPACE[model], **pins.get(model, {})}


class OptunaSpace:
    """A define-by-run space, its keys namespaced by variant ("dense.learning_rate").
    VariantOptuna gives each variant's study one of its own, of that variant alone; a
    sweep started before it resumes with its one study of all `models`, whose searcher
    state names this class. (A class, not a closure: Tune pickles the searcher into its
    experiment state.)"""

    def __init__(self, models: list[str], pins: dict[str, dict] | None = None):
        self.models = list(models)
        self.pins = pins or {}  # (not searched: their values, as variant_space has them)

    def __call__(self, trial) -> dict[str, Any]:
        from ray.tune.search.sample import Categorical, Domain, Float, Integer, LogUniform

        model = trial.suggest_categorical("model", self.models)
        hparams = {}
        # (getattr: a searcher pickled by an experiment started before pins were kept here)
        for key, domain in variant_space(model, getattr(self, "pins", {})).items():
            name = f"{model}.{key}"
            if not isinstance(domain, Domain):  # pinned
                hparams[key] = domain
            elif isinstance(domain, Categorical):
                labels = [json.dumps(c) for c in domain.categories]
                hparams[key] = json.loads(trial.suggest_categorical(name, labels))
            elif isinstance(domain, Integer):
                hparams[key] = trial.suggest_int(name, domain.lower, domain.upper - 1)
            elif isinstance(domain, Float):
                log = isinstance(domain.get_sampler(), LogUniform)
                hparams[key] = trial.suggest_float(name, domain.lower, domain.upper, log=log)
            else:
                hparams[key] = domain
        return {"hparams": {model: hparams}}


class VariantOptuna(Searcher):
    """`--search optuna`: an Optuna TPE study of its own for each variant, asked and told
    directly, and the trials handed out in `order` (a variant's name per trial).

    One study for the whole sweep ranked every trial by val_loss whatever its variant
    (TPE splits all trials into good and bad by value before it looks at parameters),
    while the losses do not compare across variants: `vae`'s adds a KL term, `sparse`'s
    an L1 penalty. A variant whose losses run higher had no trial among the good, and its
    search did no better than random. Each study starts with `startup` random trials
    (Optuna's 10, or half a variant's trials where it has fewer), then models its own.

    A trial that diverged (NaN) is told as the worst value, so that TPE learns to keep
    away from where it was (a NaN is no value to Optuna: such trials stayed RUNNING and
    were left out); one that errored is FAIL, and its rerun on --resume (Tune reruns
    errored trials) is told as a trial of its own with the same values (Ray's
    OptunaSearch dropped every result after the first telling)."""

    def __init__(
        self, order: list[str], pins: dict, metric: str, mode: str, seed: int, startup: int
    ):
        import optuna

        super().__init__(metric=metric, mode=mode)
        self.order = list(order)  # (what is still to hand out)
        self.trials: dict[str, tuple[str, int]] = {}  # trial id -> (variant, Optuna number)
        self.spaces = {model: OptunaSpace([model], pins) for model in dict.fromkeys(order)}
        self.studies = {}
        direction = "minimize" if mode == "min" else "maximize"
        for model in self.spaces:
            digest = hashlib.sha256(f"{seed}:{model}".encode()).digest()
            sampler = optuna.samplers.TPESampler(
                seed=int.from_bytes(digest[:4], "big"), n_startup_trials=startup
            )
            self.studies[model] = optuna.create_study(direction=direction, sampler=sampler)

    def suggest(self, trial_id: str) -> dict | str | None:
        if not self.order:
            return Searcher.FINISHED
        model = self.order.pop(0)
        trial = self.studies[model].ask()
        self.trials[trial_id] = (model, trial.number)
        return {"model": model, **self.spaces[model](trial)}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error=False) -> None:
        import optuna

        if trial_id not in self.trials:
            return
        model, number = self.trials[trial_id]
        study = self.studies[model]
        value = (result or {}).get(self.metric)
        if error or not isinstance(value, (int, float)):
            state, value = optuna.trial.TrialState.FAIL, None
        else:
            state = optuna.trial.TrialState.COMPLETE
            if not math.isfinite(value):  # diverged: the worst there is
                value = math.inf if self.mode == "min" else -math.inf
        told = study.get_trials(deepcopy=False)[number]
        if told.state == optuna.trial.TrialState.RUNNING:
            study.tell(number, value, state=state)
            return
        rerun = optuna.trial.create_trial(  # (a rerun of a trial told before)
            params=told.params, distributions=told.distributions, value=value, state=state
        )
        study.add_trial(rerun)
        self.trials[trial_id] = (model, study.get_trials(deepcopy=False)[-1].number)

    def save(self, checkpoint_path: str) -> None:
        from ray import cloudpickle  # (as Tune pickles the searcher: classes of __main__ too)

        with open(checkpoint_path, "wb") as f:
            cloudpickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


# ---------------------------------------------------------------- trials


def _configure_backend(cpus: int) -> None:
    """Threads (the trial's CPUs) and on-demand GPU memory for Keras's backend, set
    before it starts: TensorFlow by default, JAX or PyTorch where TF is not installed."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    backend = _keras_backend()
    if ray.get_runtime_context().worker.mode == ray.WORKER_MODE and not ray.get_gpu_ids():
        # Ray sets CUDA_VISIBLE_DEVICES only for workers it gives GPUs: a trial of
        # --gpus-per-trial 0 would otherwise train on its node's GPUs, out of Ray's
        # accounting (jobs/denoise.py's actors did, with JAX on an H200 node). Hidden
        # before the backend starts.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        if backend == "jax":
            os.environ["JAX_PLATFORMS"] = "cpu"
    if backend == "jax":  # not 75% of the GPU up front: trials may share a GPU
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        return
    if backend == "torch":
        import torch

        torch.set_num_threads(cpus)
        return
    if backend != "tensorflow":
        return
    with _optional_imports_skipped(UNUSED_IMPORTS):
        import tensorflow as tf

    try:  # only possible before TF's runtime starts (a reused actor has started it)
        tf.config.threading.set_intra_op_parallelism_threads(cpus)
        tf.config.threading.set_inter_op_parallelism_threads(min(cpus, 2))
    except RuntimeError:
        pass
    for gpu in tf.config.list_physical_devices("GPU"):  # none: TF just runs on CPU
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass


_STAGED: list[str] = []  # this process's staging folders (see _staging_dir)


def _staging_dir(kind: str) -> str:
    """A new temp folder, named after this process, to stage a checkpoint in.

    Tune stops a trial (ASHA's early stop, the driver ending) by ending its actor
    while the trial is still blocked inside `tune.report`, so a `with
    TemporaryDirectory()` around the report never deleted its folder: each stopped
    trial left a model in /tmp. Instead, each call removes this process's earlier
    folders (their reports returned, or their trial ended before this one began) and
    those of processes that no longer run; the driver sweeps once more at the end."""
    while _STAGED:
        shutil.rmtree(_STAGED.pop(), ignore_errors=True)
    remove_stale_staging()
    path = tempfile.mkdtemp(prefix=f"aelib-{kind}-pid{os.getpid()}-")
    _STAGED.append(path)
    return path


def remove_stale_staging() -> None:
    """Deletes the staging folders (see _staging_dir) of processes that have ended."""
    for path in Path(tempfile.gettempdir()).glob("aelib-*-pid*-*"):
        pid = path.name.split("-pid", 1)[1].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def train_trial(config: dict[str, Any], data, settings: dict[str, Any]) -> None:
    """One Tune trial: aelib.train on object-store MNIST, reporting every epoch."""
    started_at = time.time()
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    _configure_backend(max(1, int(cpus)))
    with _optional_imports_skipped(UNUSED_IMPORTS):  # what TensorFlow's import did not do
        import keras

        import aelib
    from aelib.train import compute_device, merge_history, write_outputs

    logging.getLogger("tensorflow").addFilter(_no_retracing_warning)  # (added once)
    model = config["model"]
    total = trial_config(model, config["hparams"][model], settings)
    where = {  # in every report, so a trial ASHA stops early has them too
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "hostname": socket.gethostname(),
        "device": compute_device(),
        # The GPUs the trial's process could see ("": none; Ray gives a trial of
        # --gpus-per-trial 0 none, and the trial hides the node's from its backend;
        # "all": CUDA_VISIBLE_DEVICES unset, every GPU of the node).
        "visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES", "all"),
        "pid": os.getpid(),
        "started_at": started_at,
    }

    # Resume: continue from the last epoch's checkpoint, or re-report a finished one.
    done_epochs, past_history, weights = 0, {}, None
    checkpoint = tune.get_checkpoint()
    resume_dir = None
    if checkpoint is not None:
        resume_dir = _staging_dir("resume")
        checkpoint.to_directory(resume_dir)
        state = json.loads(Path(resume_dir, CHECKPOINT_STATE).read_text())
        if state.get("finished"):  # the driver died before it recorded the trial's end
            tune.report({**state["final_metrics"], "rereported": True}, checkpoint=checkpoint)
            shutil.rmtree(resume_dir, ignore_errors=True)
            return
        done_epochs, past_history = state["epochs_done"], state["history"]
        weights = str(Path(resume_dir, f"{model}.keras"))

    if done_epochs >= total.epochs:  # (a sweep without sweep_settings.json, fewer --epochs)
        raise ValueError(
            f"its checkpoint has {done_epochs} epochs done and this run asks for "
            f"{total.epochs}: resume with the --epochs the sweep started with"
        )
    keras.backend.clear_session()
    reporter = _TuneReporter(model, total.to_dict(), past_history, where, weights)
    # No Keras TensorBoard callback: Tune logs every reported epoch to TensorBoard itself.
    # From the epoch after the checkpoint's: the same epochs, learning-rate schedule and
    # (restored by the reporter) optimizer state as a run that was never stopped.
    result = aelib.train(
        total,
        data=data,
        callbacks=[reporter],
        figures=False,
        verbose=0,
        initial_epoch=done_epochs,
    )
    if resume_dir:
        shutil.rmtree(resume_dir, ignore_errors=True)

    history = merge_history(past_history, result.history)
    final = {
        **reporter.last_logs,
        **{k: v for k, v in result.metrics.items() if k != "train_seconds"},
        "epochs_run": done_epochs + result.metrics["epochs_run"],
        **where,
    }
    final[METRIC] = final.get(METRIC, math.nan)
    if model == "denoise":  # the noise its validation and test scores are at
        noise = total.eval_noise_factor
        final["eval_noise_factor"] = total.noise_factor if noise is None else noise
    if final["nan"]:  # stopped by StopOnNaN: mark it, keep no model
        tune.report(final)
        return
    tmp = _staging_dir("ckpt")
    write_outputs(result.model, total, final, history, result.splits, Path(tmp), False)
    state = {"finished": True, "epochs_done": final["epochs_run"], "history": history}
    state["final_metrics"] = final
    Path(tmp, CHECKPOINT_STATE).write_text(json.dumps(state, default=float))
    tune.report(final, checkpoint=tune.Checkpoint.from_directory(tmp))


def trial_config(model: str, sampled: dict[str, Any], settings: dict[str, Any]):
    """The aelib.TrainConfig a trial of `model` trains with: its sampled hyperparameters,
    the pins over them, and the sweep's settings."""
    from aelib.train import TrainConfig  # (imports Keras: the driver only with --set)

    hparams = effective_hparams(model, sampled, settings["pins"])
    train_fields = {k: v for k, v in hparams.items() if k in TRAIN_FIELDS}
    options = {k: v for k, v in hparams.items() if k not in TRAIN_FIELDS}
    if "filters" in options and isinstance(options["filters"], list):
        options["filters"] = tuple(options["filters"])
    if "hidden_units" in options:
        options["hidden_units"] = tuple(options["hidden_units"])
    if model == "denoise" and settings.get("scoring") == SCORING:
        train_fields.setdefault("eval_noise_factor", scored_noise(settings["pins"]))
    return TrainConfig(
        model=model,
        model_options=options,
        epochs=settings["epochs"],
        limit=settings["limit"],
        test_limit=settings["test_limit"],
        metrics_limit=settings["metrics_limit"],
        seed=settings["seed"],
        data=settings["data"],
        **train_fields,
    )


def scored_noise(pins: dict[str, dict]) -> float:
    """The noise every denoise trial is validated and tested at, whatever noise it
    trained at: a pinned eval_noise_factor, else a pinned noise_factor, else aelib's
    default noise_factor."""
    denoise = pins.get("denoise", {})
    default = train_field_defaults()["noise_factor"]
    return denoise.get("eval_noise_factor", denoise.get("noise_factor", default))


def pins_are_defaults(pins: list[tuple[str, str, Any]]) -> bool:
    """Whether every pin (if any) is aelib's own default, read without importing aelib:
    those build and fit the digits, and check_pins can spare its Keras import
    (bench_sweep.py pins every searched key to its default)."""
    options, train = variant_options(), train_field_defaults()
    for model, key, value in pins:
        default = train.get(key) if key in TRAIN_FIELDS else options[model].get(key)
        if default is None or json.dumps(value) != json.dumps(default):  # (tuple == list)
            return False
    return True


def check_pins(args: argparse.Namespace, arrays) -> None:
    """Builds each pinned variant's training config and model on the driver, with its
    pins and every searched key at its default, and checks the model fits the data,
    before Ray starts: a pin of the right type that aelib refuses (`--set
    conv.filters=(0,8,8)`, `--set denoise.depth=3` on 28x28 digits, `--set
    dense.batch_size=0`) fails here with aelib's message, not in every trial of that
    variant after Ray's start-up, with retries. Costs the driver the Keras import
    (3-4 s) before Ray, only with a --set other than aelib's default. Keras stays on
    the driver's CPU: the GPUs are the trials' (TensorFlow would map nearly all of a
    GPU's memory, JAX 75% of it, for the driver's whole run)."""
    backend = _keras_backend()
    ours = "KERAS_TORCH_DEVICE" not in os.environ  # (a user's own choice stands)
    os.environ.setdefault("KERAS_TORCH_DEVICE", "cpu")  # (read as Keras's torch backend loads)
    try:
        with _optional_imports_skipped(UNUSED_IMPORTS):
            if backend == "tensorflow":
                import tensorflow as tf

                with contextlib.suppress(RuntimeError, ValueError):  # (before any tensor)
                    tf.config.set_visible_devices([], "GPU")
            elif backend == "jax":
                import jax

                jax.config.update("jax_platforms", "cpu")
            import keras

            from aelib.train import build_checked
    finally:  # not for the trials: the Ray started next inherits this environment
        if ours:
            del os.environ["KERAS_TORCH_DEVICE"]
    settings = trial_settings(args)
    for model, pins in settings["pins"].items():
        try:
            build_checked(trial_config(model, {}, settings), arrays)
        except (TypeError, ValueError) as e:
            given = " ".join(f"--set {model}.{k}={v!r}" for k, v in pins.items())
            raise SystemExit(f"sweep.py: error: {given}: {e}") from e
        finally:
            keras.backend.clear_session()


def _TuneReporter(model, config, past_history, where, weights):  # noqa: N802
    """Builds the per-epoch Keras callback (Keras is imported inside the trial only)."""
    import keras

    from aelib.registry import Autoencoder, model_input_kind
    from aelib.saving import save
    from aelib.train import SEED_STATES, restore_training_state, seed_state_values

    class TuneReporter(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.last_logs: dict[str, Any] = {}
            self.history: dict[str, list] = copy.deepcopy(past_history)

        def on_train_begin(self, logs=None):
            if weights:  # the checkpoint's weights and optimizer state
                restore_training_state(self.model, weights)

        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()}
            for k, v in logs.items():
                self.history.setdefault(k, []).append(v)
            epoch_no = epoch + 1  # (fit counts from the checkpoint's epochs)
            nan = not math.isfinite(logs.get("loss", math.nan))
            self.last_logs = {**logs, "epoch": epoch_no, "nan": nan}
            if nan or epoch_no >= config["epochs"] or self.model.stop_training:
                return  # the trial reports the last epoch itself, with its test metrics
            bundle = Autoencoder.from_autoencoder(
                self.model, model, model_input_kind(model), config["model_options"]
            )
            tmp = _staging_dir("ckpt")  # the next epoch's call deletes it
            record = {"train_config": config, SEED_STATES: seed_state_values(self.model)}
            save(bundle, Path(tmp, f"{model}.keras"), record)
            state = {"finished": False, "epochs_done": epoch_no, "history": self.history}
            Path(tmp, CHECKPOINT_STATE).write_text(json.dumps(state, default=float))
            tune.report({**self.last_logs, **where}, checkpoint=tune.Checkpoint.from_directory(tmp))

    return TuneReporter()


# ---------------------------------------------------------------- scheduler


class VariantASHA(ASHAScheduler):
    """ASHA with one bracket per variant: a trial's rung cutoffs come only from
    trials of its own variant, since losses are not comparable across variants."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._fresh_brackets = copy.deepcopy(self._brackets)
        self._variant_brackets: dict[str, list] = {}

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)  # checks metric/mode
        self._trial_info[trial.trial_id] = self._brackets_of(trial.config.get("model", ""))[0]

    def _brackets_of(self, variant: str) -> list:
        """The variant's own brackets, made fresh for its first trial (or its rungs)."""
        return self._variant_brackets.setdefault(variant, copy.deepcopy(self._fresh_brackets))

    def rungs(self) -> dict[str, list[list[tuple[float, dict[str, float]]]]]:
        """The scores recorded at each rung, per variant and bracket."""
        return {
            variant: [
                [(milestone, dict(scores)) for milestone, scores in b._rungs] for b in brackets
            ]
            for variant, brackets in self._variant_brackets.items()
        }

    def set_rungs(self, rungs: dict[str, list[list[tuple[float, dict[str, float]]]]]) -> None:
        """Puts back what `rungs` returned, before the trials are added again."""
        for variant, saved in rungs.items():
            for bracket, bracket_rungs in zip(self._brackets_of(variant), saved, strict=True):
                bracket._rungs = [(milestone, dict(scores)) for milestone, scores in bracket_rungs]


class RungsKept(tune.Callback):
    """Keeps VariantASHA's rung scores with the experiment's state, for --resume.

    Tune (2.60) saves a sweep's search algorithm and callbacks with its state, but not its
    scheduler: a restore rebuilds the scheduler pickled when the sweep started, with no
    scores at its rungs (ray-project/ray#30838). A trial that reached a rung after a
    resume was then compared with none of the trials that passed it before, and went on
    where the unstopped sweep stopped it (seen: a `dense` trial stopped after epoch 1
    trained all 4). Tune restores callbacks before it adds the restored trials to the
    scheduler, and pickles this callback and the scheduler together (tuner.pkl), so the
    restored callback holds the restored scheduler."""

    def __init__(self, scheduler: VariantASHA):
        self.scheduler = scheduler

    def get_state(self) -> dict:
        return {"rungs": self.scheduler.rungs()}

    def set_state(self, state: dict) -> None:
        self.scheduler.set_rungs(state["rungs"])


# ---------------------------------------------------------------- results


def _flatten_row(
    result, epochs: int, pins: dict[str, dict], unfinished: dict[str, dict] | None = None
) -> dict[str, Any]:
    unfinished = unfinished or {}
    # (A trial that never reported, pending at a Ctrl-C, has no config in its Result:
    # Tune takes it from the last result. The experiment's state has it.)
    config = result.config or unfinished.get(Path(result.path).name) or {}
    metrics = result.metrics or {}
    model = config.get("model")
    row: dict[str, Any] = {
        "trial_id": metrics.get("trial_id") or Path(result.path).name,
        "model": model,
    }
    sampled = config.get("hparams", {}).get(model, {})
    hparams = effective_hparams(model, sampled, pins) if model else {}
    for key, value in hparams.items():
        row[f"hp_{key}"] = json.dumps(value) if isinstance(value, list | tuple) else value
    if result.error is not None:
        status = "error"
    elif metrics.get("nan"):
        status = "diverged"  # (not "nan": pandas reads that back as a missing value)
    elif "test_loss" in metrics:
        status = "finished"
    elif Path(result.path).name in unfinished:  # running or pending at a Ctrl-C: --resume
        status = "interrupted"  # goes on with them (a trial ASHA stopped stays stopped)
    else:
        status = "stopped_early"
    row["status"] = status
    row["error"] = None if result.error is None else _error_text(result.error)
    for key in (
        "epoch",
        "loss",
        "val_loss",
        "val_psnr",
        "val_ssim",
        "test_loss",
        "test_bce",
        "test_psnr",
        "test_ssim",
        "eval_noise_factor",
        "noisy_psnr",
        "noisy_ssim",
        "psnr_gain",
        "code_mean",
        "code_active_fraction",
        "time_total_s",
        "device",
        "visible_gpus",
        "node_id",
        "node_ip",
        "hostname",
        "pid",
        "started_at",
    ):
        row[key] = metrics.get(key)
    row["max_epochs"] = epochs
    row["path"] = result.path
    return row


def _error_text(error: BaseException | str) -> str:
    """The exception that failed a trial, "ValueError: ...", not Ray's first line
    ("ray::ImplicitFunc.train() (pid=..., ip=..., ...)") before its traceback."""
    cause = getattr(error, "cause", None)  # a RayTaskError's original exception
    if isinstance(cause, BaseException):
        text = f"{type(cause).__name__}: {cause}"
    else:  # the traceback's last line where there is one (a text error from error.txt)
        lines = [line for line in str(error).splitlines() if line.strip()] or [repr(error)]
        text = lines[-1] if "Traceback (most recent call last)" in str(error) else lines[0]
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # Keras's terminal colour codes
    return " ".join(text.split())[:500]


def _noise_text(rec: dict) -> str:
    """The noise factor a denoise trial was validated and tested at: a trial of a sweep
    started before they were all scored at one noise has none recorded, and was scored
    at the noise it trained at."""
    noise = rec.get("eval_noise_factor")
    if noise is None:
        noise = (rec.get("hparams") or {}).get("noise_factor")
    return "unknown" if noise is None else f"{noise:.3g}"


def _metric_text(key: str, value: float) -> str:
    """A metric as the report's tables write it: dB to 2 places (psnr_gain then is the
    difference of the two shown), SSIM and fractions to 3, losses to 4 (`.4g` wrote 14.7
    and 0.22 beside the comparison table's 14.70 and 0.2200)."""
    if "psnr" in key:
        return f"{value:.2f}"
    if "ssim" in key or "fraction" in key or key == "code_mean":
        return f"{value:.3f}"
    return f"{value:.4f}"


def _why_no_best(rows: list[dict], model: str) -> str:
    """Why a variant has no best model: what became of its trials."""
    said = {
        "error": "errored",
        "diverged": "diverged (NaN or infinite loss)",
        "interrupted": "interrupted",
        "stopped_early": "stopped early",
        "finished": "finished without a finite val_loss and a checkpoint",
    }
    counts: dict[str, int] = {}
    for row in rows:
        if row["model"] == model:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
    if not counts:
        return "no trial ran"
    text = ", ".join(
        f"{n} trial{'s' if n > 1 else ''} {said.get(status, status)}"
        for status, n in counts.items()
    )
    return text + (" (see the error column of trials.csv)" if "error" in counts else "")


def trial_table(rows: list[dict]):
    """The rows as the trial table's DataFrame: nullable ints stay ints beside blanks,
    floats stay floats (a float pinned at a whole number, --set vae.learning_rate=10000.0,
    made its column Int64), and each variant's hyperparameters come after trial_id and
    model, together (in the order they first came, the later variants' came after the
    path column)."""
    import pandas as pd

    table = pd.DataFrame(rows).convert_dtypes()
    for column in table.columns:
        if any(isinstance(r.get(column), float) for r in rows):
            table[column] = table[column].astype("Float64")
    hp = [c for c in table.columns if c.startswith("hp_")]
    return table[[*table.columns[:2], *hp, *(c for c in table.columns[2:] if c not in hp)]]


def write_results(
    results, args, arrays, out_dir: Path, unfinished: dict[str, dict] | None = None
) -> tuple[list[dict], dict[str, dict]]:
    """Writes the trial table, best models and report into `out_dir` (local)."""
    pins = _pins_by_model(args.pins)
    rows = [_flatten_row(r, args.epochs, pins, unfinished) for r in results]
    rows.sort(key=lambda r: (str(r["model"]), str(r["trial_id"])))
    table = trial_table(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Each file is written beside its place, then renamed: a driver stopped while it
    # writes leaves the last run's file whole (for --resume to write again), never half.
    with _replaced(out_dir / "trials.csv") as tmp:
        table.to_csv(tmp, index=False)
    with _replaced(out_dir / "trials.parquet") as tmp:
        strings = {c: "string" for c in table.columns if table[c].dtype == object}
        table.astype(strings).to_parquet(tmp, index=False)

    by_path = {r.path: r for r in results}
    best: dict[str, dict] = {}
    for model in args.models:
        candidates = [
            row
            for row in rows
            if row["model"] == model
            and row["status"] == "finished"
            and row["val_loss"] is not None
            and math.isfinite(row["val_loss"])
            and by_path[row["path"]].checkpoint is not None
        ]
        if not candidates:
            continue
        winner = min(candidates, key=lambda row: row["val_loss"])
        checkpoint = by_path[winner["path"]].checkpoint
        (out_dir / "best").mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="aelib-best-") as tmp:
            checkpoint.to_directory(tmp)
            with _replaced(out_dir / "best" / f"{model}.keras") as dest:
                shutil.copyfile(Path(tmp, f"{model}.keras"), dest)
        record = dict(winner)
        sampled = by_path[winner["path"]].config["hparams"][model]
        record["hparams"] = effective_hparams(model, sampled, pins)
        with _replaced(out_dir / "best" / f"{model}.json") as dest:
            dest.write_text(json.dumps(record, indent=2, default=str))
        best[model] = record
    write_report(best, rows, args, arrays, out_dir)
    return rows, best


def write_report(best: dict[str, dict], rows, args, arrays, out_dir: Path) -> None:
    report = out_dir / "report"
    report.mkdir(parents=True, exist_ok=True)
    missing = _not_started(rows, args)
    trials = f"{len(rows)} of {len(rows) + missing}" if missing else f"{len(rows)}"
    n_train, n_test = len(arrays[0][0]), len(arrays[1][0])
    n_val = _aelib_module("data").held_out(n_train, VAL_SPLIT)
    lines = [
        f"# aelib sweep `{args.name}`",
        "",
        f"{trials} {_plural(len(rows) + missing, 'trial')} over {', '.join(args.models)}; "
        f"up to {args.epochs} {_plural(args.epochs, 'epoch')}, "
        f"scheduler {args.scheduler}, search {args.search}. "
        f"Statuses: {_counts(r['status'] for r in rows)}"
        + (
            f"; {missing} not started (stopped before Tune made them: `--resume` runs them)"
            if missing
            else ""
        )
        + ". Table: `trials.csv`, `trials.parquet`.",
        "",
        f"Data: {_report_data(args)}; the first {n_train:,} training "
        f"{_plural(n_train, 'image')} (the last {n_val:,} of them held out for validation) "
        f"and the first {n_test:,} test {_plural(n_test, 'image')}, on which every test "
        f"metric below is measured; seed {args.seed}"
        + (f"; pinned: `{_shown('pins', args.pins)}`" if args.pins else "")
        + ".",
        "",
    ]
    if "denoise" in args.models and args.scoring == SCORING:
        lines += [
            f"Every denoise trial is validated and tested at noise factor "
            f"{scored_noise(_pins_by_model(args.pins))}, whatever noise it trained at, so "
            "that their scores compare (`eval_noise_factor` in trials.csv).",
            "",
        ]
    elif "denoise" in args.models:
        lines += [
            "Each denoise trial is validated and tested at the noise it trained at (a sweep "
            "started before sweeps scored them all at one noise): their scores compare "
            "only where that noise is the same.",
            "",
        ]
    if not best or args.no_figures:  # (an earlier report's; else replaced when drawn)
        (report / "compare.png").unlink(missing_ok=True)
    if best:
        lines += ["## Variants compared", ""]
        if not args.no_figures:  # (the table below says the same)
            _compare_chart(best, report / "compare.png")
            lines += ["![compare](compare.png)", ""]
        lines += ["| variant | val_loss | test_bce | test_psnr | test_ssim | trial |"]
        lines += ["|---|---|---|---|---|---|"]
        for model, rec in best.items():
            name = f"{model} (noisy inputs)" if model == "denoise" else model
            lines.append(
                f"| {name} | {rec['val_loss']:.4f} | {rec['test_bce']:.4f} | "
                f"{rec['test_psnr']:.2f} | {rec['test_ssim']:.3f} | {rec['trial_id']} |"
            )
        lines.append("")
        lines += [
            "val_loss is each variant's own training loss (sparse's adds its L1 penalty, "
            "vae's its KL term, denoise's scores noisy inputs): it ranks a variant's trials, "
            "not the variants. Compare them on the test columns.",
            "",
        ]
        if "denoise" in best:  # (its row had no mark but compare.png's colour)
            rec = best["denoise"]
            text = (
                "denoise's test columns score another task: its outputs from noisy inputs "
                f"(noise factor {_noise_text(rec)}) against the clean digits, where the "
                "others reconstruct clean inputs."
            )
            if rec.get("noisy_psnr") is not None and rec.get("noisy_ssim") is not None:
                text += (
                    f" The noisy inputs themselves score test_psnr {rec['noisy_psnr']:.2f} "
                    f"dB, test_ssim {rec['noisy_ssim']:.3f}."
                )
            lines += [text, ""]
    for model in args.models:
        lines += [f"## {model}", ""]
        if model not in best or args.no_figures:  # (an earlier report's figures go)
            shutil.rmtree(report / model, ignore_errors=True)
        if model not in best:
            lines += [f"No best model: {_why_no_best(rows, model)}.", ""]
            continue
        rec = best[model]
        lines += [f"Best config: `{json.dumps(rec['hparams'])}`", ""]
        fates = [r["status"] for r in rows if r["model"] == model]
        if set(fates) != {"finished"}:  # (its best is of fewer trials than it ran)
            errors = " (see the error column of trials.csv)" if "error" in fates else ""
            lines += [f"Its {len(fates)} trials: {_counts(fates)}{errors}.", ""]
        shown = ("noisy_psnr", "noisy_ssim", "psnr_gain", "code_mean", "code_active_fraction")
        metrics = {k: rec[k] for k in rec if k.startswith("test_") or k in shown}
        lines += ["| metric | value |", "|---|---|"]
        lines += [
            f"| {k} | {_metric_text(k, v)} |" for k, v in metrics.items() if isinstance(v, float)
        ]
        lines += ["", f"Model: `best/{model}.keras`", ""]
        if args.no_figures:
            continue
        import aelib
        from aelib import plots
        from aelib.train import TrainConfig, make_splits

        bundle = aelib.load(out_dir / "best" / f"{model}.keras")
        info = bundle.info
        config = TrainConfig.from_dict(info["train_config"])
        splits = make_splits(config, arrays, bundle.input_kind)
        figures = plots.tutorial_figures(bundle, splits, info["history"], report / model)
        # An earlier report's figures are replaced one by one as they are drawn (a stop
        # in between leaves each whole), and those not drawn again go after.
        drawn = {Path(path).name for path in figures.values()}
        for old in (report / model).glob("*.png"):
            if old.name not in drawn:
                old.unlink(missing_ok=True)
        for name, path in figures.items():
            lines += [f"![{model} {name}]({Path(path).relative_to(report).as_posix()})", ""]
    with _replaced(report / "report.md") as tmp:
        tmp.write_text("\n".join(lines))


def _replaced(path: Path):
    """aelib.process.replaced(path): a temp path beside `path` for a block to write,
    renamed to `path` after it (or removed): no reader, nor a stopped driver, sees half a
    file, and the temp files a killed driver left there are removed first."""
    return _aelib_module("process").replaced(path)


def _compare_chart(best: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(best)
    # denoise's scores are of another task (noisy inputs against clean digits), drawn
    # apart, with its noisy inputs' own score beside them for scale
    colors = ["tab:orange" if n == "denoise" else "tab:blue" for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    titles = {
        "test_bce": "test_bce (lower is better)",
        "test_psnr": "test_psnr, dB (higher is better)",
        "test_ssim": "test_ssim (higher is better)",
    }
    for ax, key in zip(axes, titles, strict=True):
        ax.bar(names, [best[n][key] for n in names], color=colors)
        noisy = best.get("denoise", {}).get(key.replace("test_", "noisy_"))
        if noisy is not None and key != "test_bce":
            ax.scatter(["denoise"], [noisy], color="black", marker="_", s=400, zorder=3)
        ax.set_title(titles[key])
        ax.tick_params(axis="x", rotation=45)
    title = "best trial per variant (test split)"
    if "denoise" in best:
        title += (
            f": orange, denoise (noisy input at noise {_noise_text(best['denoise'])} -> clean; "
            "black bar: the noisy input's own)"
        )
    fig.suptitle(title)
    fig.tight_layout()
    with _replaced(path) as tmp:  # (a driver killed in savefig left a 0-byte chart)
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def _not_started(rows: list[dict], args: argparse.Namespace) -> int:
    """Trials the sweep asks for (--num-samples per variant) that have no row: a sweep
    stopped before Tune made them (it makes trials as --max-concurrent and its limit on
    pending trials allow), which --resume runs. Neither a status nor a row said so: a
    stopped sweep of 4 trials with 2 made said "0 of 2 trials did not finish"."""
    return max(0, args.num_samples * len(args.models) - len(rows))


def _interrupted_line(rows: list[dict], args: argparse.Namespace) -> str:
    """What a stopped sweep says: how many of its trials did not finish, those Tune had
    not made yet included."""
    unmade = _not_started(rows, args)
    left = sum(r["status"] == "interrupted" for r in rows) + unmade
    return (
        f"sweep.py: interrupted: {left} of {len(rows) + unmade} trials did not finish ("
        + (f"{unmade} not started; " if unmade else "")
        + "the report is of the trials so far); rerun the same command with --resume to "
        "finish them"
    )


def _counts(values) -> str:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))


def _per_node(rows: list[dict]) -> str:
    """Trials per node, with the devices they trained on where they said: "host (ip) 7
    (7 on CPU)"; a trial stopped before its first epoch said none, and is counted as such
    ("2 (1 on CPU, 1 before a first epoch)": the sum read as if one ran elsewhere)."""
    nodes: dict[str, dict[str, int]] = {}
    for r in rows:
        if r.get("hostname"):
            devices = nodes.setdefault(f"{r['hostname']} ({r['node_ip']})", {})
            device = r.get("device") if isinstance(r.get("device"), str) else ""
            devices[device] = devices.get(device, 0) + 1
    parts = []
    for node, devices in sorted(nodes.items()):
        said = ", ".join(f"{n} on {d}" for d, n in sorted(devices.items()) if d)
        if devices.get("") and said:  # (none said on the node at all: nothing to add up)
            said += f", {devices['']} before a first epoch"
        parts.append(f"{node} {sum(devices.values())}" + (f" ({said})" if said else ""))
    return ", ".join(parts)


def _pins_by_model(pins: list[tuple[str, str, Any]]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for variant, key, value in pins:
        out.setdefault(variant, {})[key] = value
    return out


def _publish(local_dir: Path, experiment_uri: str) -> None:
    """Copies the staged results to a cloud experiment folder."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(experiment_uri)
    pyarrow.fs.copy_files(str(local_dir), path, destination_filesystem=fs)


# ---------------------------------------------------------------- main


def load_arrays(args: argparse.Namespace):
    """MNIST, cut to what the trials use, loaded once by the driver."""
    (x_train, y_train), (x_test, y_test) = _aelib_module("data").load_mnist(args.data)
    for flag, limit, images, kind in (
        ("--limit", args.limit, x_train, "training"),
        ("--test-limit", args.test_limit, x_test, "test"),
    ):
        if limit is not None and limit > len(images):  # (as `aelib train` says it)
            print(
                f"sweep.py: note: {flag} {limit} is more than the {len(images)} {kind} "
                f"images; using all {len(images)}",
                file=sys.stderr,
            )
    if args.limit is not None:
        x_train, y_train = x_train[: args.limit], y_train[: args.limit]
    if args.test_limit is not None:
        x_test, y_test = x_test[: args.test_limit], y_test[: args.test_limit]
    return (x_train, y_train), (x_test, y_test)


@functools.cache
def _aelib_module(name: str):
    """aelib.<name> (data: NumPy only; process: the standard library), loaded from its
    file without importing the aelib package, whose __init__ imports Keras (see
    variant_options): not even when the report's figures are wanted, since that import
    may still be under way."""
    spec = importlib.util.spec_from_file_location(f"_aelib_{name}", _aelib_folder() / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trial_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What every trial gets beside its hyperparameters."""
    return {
        "epochs": args.epochs,
        "limit": args.limit,
        "test_limit": args.test_limit,
        "metrics_limit": SMOKE["metrics_limit"] if args.smoke_test else 1000,
        "seed": args.seed,
        "data": args.data,
        "pins": _pins_by_model(args.pins),
        "scoring": args.scoring,
    }


def build_tuner(args: argparse.Namespace, arrays, experiment_path: str) -> tune.Tuner:
    settings = trial_settings(args)
    # with_parameters puts the arrays in Ray's object store once; trials get them from there.
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, data=arrays, settings=settings),
        {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial},
    )
    if args.scheduler == "asha":
        scheduler = VariantASHA(max_t=args.epochs, grace_period=args.grace_period)
        callbacks = [RungsKept(scheduler)]
    else:
        scheduler, callbacks = FIFOScheduler(), []
    if args.search == "optuna":
        # Round after round, heaviest first (as the grid of random search repeats): the
        # later trials of a variant start when its first have told its study something.
        order = heaviest_first(args.models) * args.num_samples
        startup = min(10, max(1, args.num_samples // 2))
        search_alg = VariantOptuna(order, settings["pins"], METRIC, MODE, args.seed, startup)
        param_space: dict[str, Any] = {}
        num_samples = len(order)
        max_concurrent_trials = args.max_concurrent  # Tune wraps the searcher in a limiter
    else:
        # Seeded: the same --seed samples the same hyperparameters (Tune's default
        # generator draws from numpy's global state, different on every run). A
        # generator limits its own concurrency: Tune ignores max_concurrent_trials here.
        search_alg = BasicVariantGenerator(
            max_concurrent=args.max_concurrent or 0, random_state=args.seed
        )
        max_concurrent_trials = None
        # Every trial samples each variant's space and uses its own variant's values.
        # (No tune.sample_from: Tune re-runs such functions when it restores a trial,
        # which would give a resumed trial other hyperparameters than its checkpoint.)
        param_space = {
            "model": tune.grid_search(heaviest_first(args.models)),
            "hparams": {model: variant_space(model, settings["pins"]) for model in args.models},
        }
        num_samples = args.num_samples  # the grid repeats: num_samples trials per variant
    if args.resume:
        return tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            scheduler=scheduler,
            search_alg=search_alg,
            num_samples=num_samples,
            max_concurrent_trials=max_concurrent_trials,
            reuse_actors=True,  # one TensorFlow import per worker, not per trial
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=args.name,
            storage_path=args.storage_path,
            failure_config=tune.FailureConfig(max_failures=args.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=callbacks,
        ),
    )


def heaviest_first(models: list[str]) -> list[str]:
    return sorted(models, key=lambda m: -EPOCH_COST.get(m, 1))  # stable: ties keep order


def _trial_dirname(trial) -> str:
    # Tune's default name lists every variant's sampled values; only one variant's apply.
    return f"{trial.config.get('model', 'trial')}_{trial.trial_id}"


def shutdown_ray() -> None:
    """ray.shutdown(), without its one-second stall on a local Ray's autoscaler monitor.

    ray.shutdown() stops the GCS before the monitor; the monitor's SIGTERM handler
    then tries to reach the GCS until Ray gives up after a second and kills it
    (measured: 1.0 s of a 1.4 s shutdown). The monitor of a Ray this process
    started has nothing left to do, so it is killed first. Ray's own processes are
    in a private attribute: if that changes, this is a plain ray.shutdown().
    Connected to a cluster, this process started no processes and kills nothing."""
    try:
        for process in _own_ray_processes("monitor"):
            process.kill()
            process.wait(timeout=1)
    except Exception:  # best effort: ray.shutdown() below stops it anyway
        pass
    ray.shutdown()


def _trial_actors_on_prestarted_workers() -> None:
    """Lets Tune's trial actors start on the workers Ray prestarts with the cluster.

    Tune gives every trial actor the runtime env `{"env_vars": {"PL_DISABLE_FORK":
    "1"}}`, a PyTorch Lightning setting (ray#28197). Any runtime env keeps an actor
    off the prestarted workers, so each trial waited for a new worker process while
    the prestarted ones idled: 1.1 s from `fit()` to the first trial's start against
    0.55 s without it (measured on 2 CPUs). aelib trains with Keras, not Lightning.
    The default lives in a private Tune module: if it moves, nothing changes here.
    Variables Tune propagates from the driver (AWS credentials) are still passed."""
    try:
        from ray.tune.execution import class_cache

        class_cache.DEFAULT_ENV_VARS.pop("PL_DISABLE_FORK", None)
    except (ImportError, AttributeError):
        pass


def _import_aelib_early() -> None:
    """Starts importing aelib (and TensorFlow, ~3 s) beside Ray's start-up, which
    mostly waits on its processes; the driver needs it for the report's figures."""

    def target():
        try:
            with _optional_imports_skipped(UNUSED_IMPORTS):  # the report imports sklearn later
                import aelib  # noqa: F401
        except Exception:  # check_search_space imports it again and reports the error
            pass

    threading.Thread(target=target, name="import-aelib", daemon=True).start()


@contextlib.contextmanager
def _optional_imports_skipped(names: tuple[str, ...]):
    """Makes `import name` raise ImportError inside the block (None in sys.modules
    means "not importable"), for modules not loaded yet and not Keras's backend; the
    block's optional imports then skip them. Afterwards they import normally again."""
    backend = _keras_backend()
    skipped = [n for n in names if n not in sys.modules and n != backend]
    sys.modules.update(dict.fromkeys(skipped))
    try:
        yield
    finally:
        for name in skipped:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


def _keras_backend() -> str:
    """The backend Keras will pick (KERAS_BACKEND, else keras.json), without importing it."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            return json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def main(argv: list[str] | None = None) -> int:
    """The sweep; SIGTERM takes Ctrl-C's path while it runs (_sigterm_as_ctrl_c)."""
    _TERMINATED.clear()  # (a run before in this process was stopped)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    _sigterm_as_ctrl_c()
    try:
        return _sweep(argv)
    finally:
        if main_thread:  # (None: set outside Python)
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _ray_address_unreachable() -> str | None:
    """Why RAY_ADDRESS is no cluster to connect to, said before anything starts: nothing
    answers at its host:port or ray://host:port (a stopped cluster's address left
    exported: ray.init retried it for minutes, logging "Failed to connect to GCS"),
    "auto" finds no Ray running on this machine, or it is no address (both tracebacks).
    None where something answers, or where it asks for a local Ray (unset, "local")."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    local = "unset RAY_ADDRESS to run on a local Ray"
    if address in ("", "local"):
        return None
    shown = address
    if address == "auto":  # (what ray.init does with it: Ray's own function)
        from ray._private.services import canonicalize_bootstrap_address_or_die

        try:  # (then the address found is checked: a crashed Ray's is left recorded)
            address = canonicalize_bootstrap_address_or_die(address)
        except ConnectionError as e:
            if str(e).startswith("Could not find"):
                return (
                    "RAY_ADDRESS=auto: no Ray runs on this machine to connect to. Start "
                    f"one (`ray start --head`), or {local}."
                )
            many = str(e).split(". Please")[0]  # ("Found multiple active Ray instances: ...")
            return f"RAY_ADDRESS=auto: {many}. Set RAY_ADDRESS to one of them, or {local}."
        except Exception:  # (a Ray of another layout: ray.init says)
            return None
    if re.match(r"https?://", address):  # (the dashboard's, for `ray job submit`)
        return (
            f"RAY_ADDRESS={address}: a dashboard's address, not a Ray cluster's (expected "
            f"host:port, ray://host:port, auto or local). Give one, or {local}."
        )
    if "://" in address.removeprefix("ray://"):  # (Ray's client modules: Ray says)
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return (
            f"RAY_ADDRESS={address}: not the address of a Ray cluster (expected host:port, "
            f"ray://host:port, auto or local). Give one, or {local}."
        )
    hosts = [host.strip("[]")]
    if hosts[0] in ("localhost", "127.0.0.1", "::1"):  # (Ray goes to the node's address)
        from ray._private.services import resolve_ip_for_localhost

        hosts.append(resolve_ip_for_localhost(hosts[0]))
    for name in hosts:
        try:
            socket.create_connection((name, int(port)), timeout=10).close()
            return None
        except OSError as e:
            error = e
    found = f" (auto: {address})" if shown != address else ""
    return (
        f"RAY_ADDRESS={shown}{found}: no Ray cluster answers there ({error.strerror or error}). "
        f"Start that cluster (a stopped one's exports stay in the shell), or {local}."
    )


def _sweep(argv: list[str] | None) -> int:
    args = parse_args(argv)
    _EXPERIMENT[:] = [experiment_path(args)]
    unreachable = _ray_address_unreachable()
    if unreachable:
        print(f"sweep.py: error: {unreachable}", file=sys.stderr)
        return 2
    experiment = experiment_path(args)
    with one_sweep_at_a_time(experiment):
        try:
            return _sweep_locked(args)
        except (OSError, _TrialErrorUnreadable) as e:
            if isinstance(e, OSError) and not _aelib_module("process").out_of_space(e):
                raise
            raise SystemExit(_out_of_space_message(experiment, e)) from e


def _ray_connect_failed(error: Exception) -> str:
    """What to say of a ray.init that could not connect to RAY_ADDRESS's cluster. One
    that takes token authentication (Ray 2.60's `ray start` turns it on wherever
    ~/.ray/auth_token exists) refuses a driver without the token; ray.init retried for
    20 s, logging "InvalidAuthToken" each second, and said only "Failed to connect"."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address:
        return str(error)
    why = f"{error} {error.__cause__ or ''}"
    if "InvalidAuthToken" in why or "AuthenticationError" in why:
        mode = os.environ.get("RAY_AUTH_MODE") or "unset"
        return (
            f"RAY_ADDRESS={address}: the Ray cluster there takes token authentication and "
            f"refused this driver (RAY_AUTH_MODE {mode}): export RAY_AUTH_MODE=token, with "
            "the cluster's token in ~/.ray/auth_token or at RAY_AUTH_TOKEN_PATH (`python "
            "cluster/local.py env` prints both for its clusters)"
        )
    return f"RAY_ADDRESS={address}: {error}"


class _TrialErrorUnreadable(Exception):
    """Tune's fit could not read back a failed trial's pickled error: a full disk left
    the file empty (EOFError) or cut short (UnpicklingError)."""


def _out_of_space_message(experiment: str, error: Exception) -> str:
    """The line for a full disk (an OSError of ENOSPC), or for a file of a trial's that
    Tune could not read back (cut short: by a full disk, or by a write a kill stopped)."""
    filename = getattr(error, "filename", None)
    where = os.path.dirname(str(filename)) if filename else experiment
    free_mib = None
    if "://" not in where and os.path.isdir(where):
        free_mib = shutil.disk_usage(where).free / 2**20
    free = f" ({free_mib:,.1f} MiB free there now)" if free_mib is not None else ""
    if isinstance(error, _TrialErrorUnreadable):
        what = (
            f"Tune could not read back what a failed trial wrote in {experiment} "
            f"({error.__cause__!r}: a file of it is cut short{free}), as a full disk or a "
            "write stopped by a kill leaves it"
        )
        head = "out of disk space" if free_mib is not None and free_mib < 64 else "stopped"
    else:
        what, head = f"no space left to write ({error}){free}", "out of disk space"
    try:
        again = "with --resume " if restorable(experiment) else ""
        damage = again and damaged_state(experiment)
    except Exception:  # (an object store out of reach: the hint is then the general one)
        again, damage = "(with --resume if its folder holds an experiment) ", None
    if damage:  # (--resume refuses it: Tune's restore started over without the settings)
        return (
            f"sweep.py: {head}: {what}. Tune's experiment state is damaged too, so the "
            f"sweep cannot be resumed ({damage}): free some space, then run the sweep again "
            f"under another --name (or remove {experiment})."
        )
    return (
        f"sweep.py: {head}: {what}. What was written is kept: free some space if it is "
        f"full, then rerun the same command {again}to finish the sweep and its report "
        "(failed trials go on from their last checkpoints)."
    )


def _sweep_locked(args: argparse.Namespace) -> int:
    experiment = experiment_path(args)
    exists = restorable(experiment)
    if args.resume and not exists:
        raise SystemExit(f"sweep.py: error: --resume: no experiment to resume at {experiment}")
    if exists and not args.resume:
        raise SystemExit(
            f"sweep.py: error: {experiment} already holds an experiment. "
            "Pass --resume to continue it, or choose another --name."
        )
    check_search_space(args.models, args.pins)
    start = time.perf_counter()
    try:  # (NumPy only: before Ray, so a bad file costs no Ray start)
        arrays = load_arrays(args)
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(f"sweep.py: error: {e}") from e
    if len(arrays[0][0]) < 2:  # (as --limit 1 is refused: every trial failed, after Ray)
        raise SystemExit(
            f"sweep.py: error: {data_label(args)} holds 1 training image: a trial needs 2 or "
            "more (the last tenth, at least 1, is held out for validation)"
        )
    args.data_sha256 = data_digest(arrays)
    check_same_data(args)
    if not pins_are_defaults(args.pins):
        check_pins(args, arrays)
    elif not args.no_figures:
        _import_aelib_early()
    try:
        with _sigterm_in_ray_init():
            ray.init(include_dashboard=False)  # ignored when connecting to a running Ray
    except ConnectionError as e:
        raise SystemExit(f"sweep.py: error: {_ray_connect_failed(e)}") from e
    _trial_actors_on_prestarted_workers()
    try:
        if args.gpus_per_trial is None:
            args.gpus_per_trial = gpus_per_trial(ray.nodes(), args.cpus_per_trial)
            if args.gpus_per_trial:
                print(
                    f"sweep.py: --gpus-per-trial {args.gpus_per_trial:g}: this cluster has "
                    f"GPUs, so each trial of {args.cpus_per_trial:g} CPU(s) has its share of "
                    "one (--gpus-per-trial 0: CPUs only)"
                )
            elif args.allow_autoscale:
                print(
                    "sweep.py: note: no node of this Ray cluster has a GPU now, so trials "
                    "train on CPUs, also on GPU workers an autoscaler adds for them; pass "
                    "--gpus-per-trial to ask for GPUs"
                )
        check_resources(args)
        print(f"sweep.py: experiment {experiment}; cluster {ray.cluster_resources()}")
        if not args.resume:
            write_settings(args)
        _no_tune_restore_hint()
        tuner = build_tuner(args, arrays, experiment)
        handler = signal.getsignal(signal.SIGINT)
        try:
            results = tuner.fit()
        except (EOFError, pickle.UnpicklingError) as e:  # (a trial's error file, cut short)
            raise _TrialErrorUnreadable() from e
        interrupted = _interrupted(handler)
        unfinished = _unfinished_trials(experiment) if interrupted else {}
        local = "://" not in experiment
        # (named as _staging_dir names its folders: a killed driver's is removed by the next)
        with tempfile.TemporaryDirectory(prefix=f"aelib-sweep-pid{os.getpid()}-") as staging:
            out_dir = Path(experiment) if local else Path(staging)
            rows, best = write_results(results, args, arrays, out_dir, unfinished)
            if not local:
                _publish(out_dir, experiment)
    finally:
        shutdown_ray()
        _sigterm_as_ctrl_c()  # (Ray's shutdown set SIGTERM's action back to the default)
        remove_stale_staging()  # the last trials' checkpoints on this node

    print(f"\nsweep.py: {len(rows)} trials in {time.perf_counter() - start:.0f}s")
    print(f"  trial table: {experiment}/trials.csv (and .parquet)")
    print(f"  report:      {experiment}/report/report.md")
    print(f"  TensorBoard: tensorboard --logdir {experiment}")
    for model in args.models:
        if model in best:
            rec = best[model]
            # (denoise's scores are at the scoring noise, not the noise_factor it trained at)
            at = f" (noisy inputs at {_noise_text(rec)})" if model == "denoise" else ""
            print(
                f"  best {model:8s} {experiment}/best/{model}.keras  val_loss "
                f"{rec['val_loss']:.4f}  test_bce {rec['test_bce']:.4f}  test_psnr "
                f"{rec['test_psnr']:.2f}{at}  on {rec['hostname']} ({rec['node_ip']})  "
                f"{json.dumps(rec['hparams'])}"
            )
        else:
            print(f"  best {model:8s} NONE: {_why_no_best(rows, model)}")
    print(f"  trials per node: {_per_node(rows) or 'none reported'}")
    missing = [m for m in args.models if m not in best]
    if interrupted:
        print(_interrupted_line(rows, args), file=sys.stderr)
        return _interrupted_status()
    return 1 if missing else 0


_TERMINATED: list[int] = []  # SIGTERM received (see _sigterm_as_ctrl_c)


def _no_tune_restore_hint() -> None:
    """Drops Tune's "Resume experiment with: Tuner.restore(path=..., trainable=...)" after
    a Ctrl-C or SIGTERM: it came just before the sweep's own hint (the same command with
    --resume, see _interrupted_line), and pointed to an API call that is not how a sweep
    goes on (its settings, checks and trial table are the job's). Also drops Tune's
    "Failed to fetch metrics ... result.json and progress.csv were not found" of a
    --resume whose stopped sweep had a trial that had not reported yet: a FileNotFoundError
    that read as a broken experiment, where the trial is simply run (the trial table
    says what each trial did)."""
    # (the modules' own loggers; adding the same filter again adds nothing)
    logging.getLogger("ray.tune.tune").addFilter(_no_restore_hint)
    logging.getLogger("ray.tune.analysis.experiment_analysis").addFilter(_no_missing_results)


def _no_retracing_warning(record) -> bool:
    """A logging filter: False for TensorFlow's "... triggered tf.function retracing"
    warning. A trial worker trains one model after another, and TensorFlow counts the
    traces of every model's predict function as one function's (their code is one):
    each new model's first calls traced, as they must, and the trials logged the warning
    (twice in README step 1's sweep)."""
    return "triggered tf.function retracing" not in record.getMessage()


def _no_missing_results(record) -> bool:
    """A logging filter: False for Tune's "Failed to fetch metrics" where every trial it
    names has no results yet (and only then)."""
    first, *trials = record.getMessage().splitlines() or [""]
    missing = " and progress.csv were not found at "
    return not (first.startswith("Failed to fetch metrics") and all(missing in t for t in trials))


def _no_restore_hint(record) -> bool:
    """A logging filter (a callable taking the record): False for Tune's restore hint."""
    return "Tuner.restore(" not in record.getMessage()


def _sigterm_as_ctrl_c() -> None:
    """SIGTERM (`kill`, a scheduler or container stopping the driver) ends the sweep with
    what it has and the --resume hint, exit 143; Ray's handler printed its stack lines and
    killed the driver wherever it was. Connected to a Ray cluster, the driver stops as on
    Ctrl-C: Tune stops the trials and saves the experiment, and the report of the trials
    so far is written. With a local Ray it started itself, it stops at once, that Ray
    with it (_exit_with_own_ray). Installed when the driver starts and again after
    ray.init and ray.shutdown, which set their own."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
        _watch_for_sigterm()


_WATCHING: list = []  # the socket pair of _watch_for_sigterm, once it watches
_EXITING = threading.Lock()  # held by whichever thread ends the driver (_exit_with_own_ray)


def _watch_for_sigterm() -> None:
    """A thread that ends the driver with its own Ray as soon as a SIGTERM arrives.

    Python runs a signal's handler in the main thread, once that thread runs Python
    again: while it waited in Ray's C++ code, a SIGTERM sent to the whole group also
    stopped the local Ray, and the core worker saw its raylet gone and exited the
    driver with status 1, without a word, before the handler ran (a clean-clone CI run
    on a loaded machine). Python's C-level handler also writes the signal's number to
    the wakeup fd at once, whatever the main thread does: this thread reads it there."""
    if _WATCHING:
        return
    receive, send = socket.socketpair()
    send.setblocking(False)
    try:
        signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
    except ValueError:  # (not the main thread)
        return
    _WATCHING.append((receive, send))

    def watch() -> None:
        while data := receive.recv(64):
            if (
                signal.SIGTERM in data
                and signal.getsignal(signal.SIGTERM) is _on_sigterm  # (not another's now)
                and _own_ray_processes()
            ):
                _TERMINATED.append(signal.SIGTERM)
                _exit_with_own_ray()

    threading.Thread(target=watch, name="aelib-sigterm", daemon=True).start()


def _on_sigterm(signum, frame) -> None:
    _TERMINATED.append(signum)
    if _own_ray_processes():
        _exit_with_own_ray()
    current = signal.getsignal(signal.SIGINT)  # Tune's during its run, else Python's
    if callable(current):
        current(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_in_ray_init():
    """A SIGTERM while ray.init runs ends the sweep as Ctrl-C does.

    ray.init set Ray's handlers first thing, which raise SystemExit wherever the driver
    is. ray.init forks Ray's processes, and in logging's at-fork hook Python drops the
    exception with the logging module's lock still held: the stop was lost, and a thread
    that logs hung for good (seen with jobs/denoise.py, once in ~20 SIGTERMs 2 s after
    the start). Ray's are not set now; ours raises, but not in logging
    (_on_sigterm_in_ray_init), and is set again once Ray is up. (A Ray that sets them
    another way: its SystemExit is taken as the stop.)"""
    import ray._private.utils as ray_utils

    ray_sets = getattr(ray_utils, "set_sigterm_handler", None)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm_in_ray_init)
        if ray_sets is not None:
            ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    except SystemExit as e:
        if e.code != signal.SIGTERM:
            raise
        _TERMINATED.append(signal.SIGTERM)
        raise KeyboardInterrupt from None
    finally:
        if ray_sets is not None:
            ray_utils.set_sigterm_handler = ray_sets
        _sigterm_as_ctrl_c()
    if _TERMINATED:  # (one that came after ray.init's last Python line)
        raise KeyboardInterrupt


def _on_sigterm_in_ray_init(signum, frame) -> None:
    """Records the stop and raises KeyboardInterrupt, where the main thread is in no
    function of logging's: there (its at-fork hook drops the exception and keeps its
    lock) the signal comes again 50 ms later, while ray.init still runs (after it, the
    recorded stop is acted on: a signal sent again then broke into the job's shutdown)."""
    if signum not in _TERMINATED:
        _TERMINATED.append(signum)
    if frame is not None and frame.f_code.co_filename == logging.__file__:
        again = threading.Timer(0.05, _sigterm_again_in_ray_init, (signum,))
        again.daemon = True
        again.start()
        return
    raise KeyboardInterrupt


def _sigterm_again_in_ray_init(signum: int) -> None:
    if signal.getsignal(signal.SIGTERM) is _on_sigterm_in_ray_init:
        _thread.interrupt_main(signum)


def _own_ray_processes(kind: str | None = None) -> list:
    """The processes (Popen) of the local Ray this driver started, all of them or those
    of one kind ("monitor"): none when connected to a cluster, or before ray.init. Ray
    keeps them in a private attribute: if that changes, there are none."""
    node = getattr(getattr(getattr(ray, "_private", None), "worker", None), "_global_node", None)
    processes = dict(getattr(node, "all_processes", None) or {})
    if not processes.get("gcs_server"):
        return []
    kinds = [kind] if kind else list(processes)
    return [info.process for k in kinds for info in processes.get(k, [])]


def _exit_with_own_ray() -> NoReturn:
    """The end of a SIGTERM with a local Ray this driver started. That Ray is in the
    driver's process group, and a signal sent to the group (`timeout`, Slurm, systemd)
    stops it too: Tune's graceful stop then waited a minute for the GCS and exited 1
    without a word, or the driver's core worker exited 1 once the raylet was gone. So
    the driver stops at once: Tune's experiment and every trial's last checkpoint are
    on disk, and --resume goes on from them (as after a crash). Called by the handler
    and by _watch_for_sigterm's thread, whichever is first: the other waits for the end."""
    if not _EXITING.acquire(blocking=False):
        while True:
            time.sleep(1)
    print(f"sweep.py: terminated (SIGTERM). {_how_to_go_on()}", file=sys.stderr, flush=True)
    children = _raylet_children()  # (while the raylet is their parent)
    for process in _own_ray_processes():
        if process.poll() is None:
            process.kill()
    for child in children:
        with contextlib.suppress(Exception):  # (gone already; psutil checks it is the same)
            child.kill()
    sys.stdout.flush()
    os._exit(128 + signal.SIGTERM)


def _raylet_children() -> list:
    """The local raylet's descendants (psutil processes): Ray's runtime-env and dashboard
    agents, which the raylet's end left running for up to a minute (aiohttp apps that
    wait for their connections to close), and its workers. Best effort: none if the
    raylet (or psutil, Ray's own dependency) is gone."""
    try:
        import psutil

        raylets = _own_ray_processes("raylet")
        return [c for r in raylets for c in psutil.Process(r.pid).children(recursive=True)]
    except Exception:
        return []


_EXPERIMENT: list[str] = []  # [the experiment's folder or URI], once the flags are read


def _how_to_go_on() -> str:
    """What a sweep stopped outside Tune's run says to do: rerun with --resume where its
    experiment folder holds an experiment Tune can go on from, else the same command
    (stopped in its start-up, a --resume was refused: "no experiment to resume")."""
    experiment = _EXPERIMENT[0] if _EXPERIMENT else None
    again = "rerun the same command with --resume to finish the sweep and its report"
    hedged = (
        f"What was written is kept: {again} (without --resume if it stopped before its "
        "experiment folder had a trial)."
    )
    if experiment is not None and "://" in experiment:  # (an object store may be out of
        return hedged  # reach, or slow)
    try:
        if experiment is None or not restorable(experiment):
            return (
                "It stopped before its experiment had a trial, so there is nothing to "
                "resume: rerun the same command to start it."
            )
    except Exception:
        return hedged
    return f"What was written is kept: {again}."


def _interrupted_status() -> int:
    """As a shell reports a command ended by that signal: Ctrl-C 130, SIGTERM 143."""
    return 128 + signal.SIGTERM if _TERMINATED else 130


def _unfinished_trials(experiment_path: str) -> dict[str, dict]:
    """The folders of the trials a --resume would run on, with their configs: those the
    experiment's state file has neither terminated nor errored. (The results `fit`
    returns after a Ctrl-C call every trial TERMINATED, those still running or pending
    included.)"""
    tune_logger = logging.getLogger("ray.tune")
    level = tune_logger.level
    tune_logger.setLevel(logging.ERROR)  # (a pending trial has no results: a warning each)
    try:
        trials = tune.ExperimentAnalysis(experiment_path).trials
    except Exception as e:  # (no state file: Tune had not saved one yet)
        print(f"sweep.py: note: cannot tell which trials were cut short ({e})", file=sys.stderr)
        return {}
    finally:
        tune_logger.setLevel(level)
    done = ("TERMINATED", "ERROR")
    return {Path(t.path).name: dict(t.config) for t in trials if t.status not in done}


def _interrupted(before: Any) -> bool:
    """Whether Ctrl-C (or SIGUSR1) ended Tune's fit: Tune installs its own SIGINT handler
    for the run, sets the previous one back only when a signal stops it, and returns
    the results so far either way (ray/tune/tune.py, _setup_signal_catching). The
    previous handler is set back here in both cases."""
    installed = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") == "0"
    main_thread = threading.current_thread() is threading.main_thread()
    stopped = installed and main_thread and signal.getsignal(signal.SIGINT) is before
    if main_thread:
        signal.signal(signal.SIGINT, before)
    return stopped


def exit_without_teardown(main: Callable[[], int | None]) -> NoReturn:
    """Runs `main` and exits with its status, without tearing down the interpreter
    (aelib.process's: with TensorFlow, Ray and pandas loaded, the teardown took 1.3-1.4 s
    after the last line, 0.07 s this way); a second Ctrl-C, or one outside Tune's run
    (the report), says how to go on."""

    def interrupted_as_status() -> int | None:
        try:
            return main()
        except KeyboardInterrupt:
            print(f"sweep.py: interrupted. {_how_to_go_on()}", file=sys.stderr)
            return _interrupted_status()

    _aelib_module("process").exit_without_teardown(interrupted_as_status, "sweep.py: error:")


if __name__ == "__main__":
    exit_without_teardown(main)
