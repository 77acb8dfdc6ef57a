"""Command line: `python -m aelib train --model NAME ...` (also the `aelib` script)."""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import json
import math
import os
import sys
import warnings
from pathlib import Path

import aelib
from aelib.tutorial import VARIANTS

# Keras and TensorFlow are imported once the flags are read (aelib._import_api), so that
# `aelib --help` and a bad flag answer at once: nothing above imports them.
MAX_COUNT = 2**31 - 1  # aelib.train.MAX_COUNT (a test checks): the most epochs, largest batch


def _parse_option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE. Received: {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1. Received: {text}")
    return value


_positive.__name__ = "positive integer"  # argparse's "invalid positive integer value: 'x'"


def _count(text: str) -> int:
    """--epochs and --batch-size: beyond int64, a typo failed inside fit with
    TensorFlow's OverflowError (or, with --lr-schedule cosine, TypeError) traceback."""
    value = _positive(text)
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be at most 2**31 - 1. Received: {text}")
    return value


_count.__name__ = "positive integer"


def _float_in(low: float, high: float, low_open: bool, high_open: bool, name: str):
    """An argparse type of a float in an interval, whose error names the flag (the
    config's check named the field, learning_rate, after Keras was imported)."""

    def parse(text: str) -> float:
        value = float(text)
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):  # (NaN fails too)
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            if high == float("inf"):
                bounds = f"> {low:g} and finite" if low_open else f">= {low:g} and finite"
                raise argparse.ArgumentTypeError(f"must be {bounds}. Received: {text}")
            raise argparse.ArgumentTypeError(f"must be in {bounds}. Received: {text}")
        return value

    parse.__name__ = name  # (argparse's "invalid number value: 'x'")
    return parse


def _limit(text: str) -> int:
    value = int(text)
    if value < 2:  # (TrainConfig's own message says "or None", the Python API's word)
        raise argparse.ArgumentTypeError(f"must be >= 2 (omit it for all). Received: {text}")
    return value


_limit.__name__ = "whole number"


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32 - 1]. Received: {text}")
    return value


_seed.__name__ = "seed"


def _path(text: str) -> str:
    if not text.strip():  # (--images "$DIR" with DIR unset read the working folder)
        raise argparse.ArgumentTypeError("expected a path, not an empty string")
    return text


_path.__name__ = "path"


def _writable_folder(path: str, flag: str, made: list) -> None:
    """Makes `path` a folder this process can write to, or says why not, before any
    training: after it, an --out that is a file cost the whole run. The folders it
    creates are added to `made`, for main() to remove again if the run fails."""
    import tempfile
    from pathlib import Path

    from aelib.process import broken_link, make_folder

    folder = Path(path).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {path} is a file; expected a folder.")
    if (link := broken_link(folder)) is not None:
        where = f"{flag} {path}" if link == folder else f"{flag} {path}: its folder {link}"
        raise ValueError(
            f"{where} is a link to {os.readlink(link)}, which does not exist (or is a loop of "
            "links); expected a folder."
        )
    try:
        make_folder(folder, made)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write there ({e.strerror or e}).") from e


LOCK = ".aelib-train.lock"  # (in --out: see _one_run_at_a_time)


@contextlib.contextmanager
def _one_run_at_a_time(folder: Path, made: list):
    """Keeps a second `aelib train` off --out while this one runs: two at once both
    passed the check for an earlier run's files, and the one that ended last replaced
    the other's model without a word. The lock is the kernel's (flock), so it ends
    with the process however it ends; the file stays, but not in a folder this run
    made (which main() removes if the run fails and leaves it empty)."""
    from aelib.process import Busy, held

    lock = folder.expanduser().absolute() / LOCK
    try:
        with held(lock, f"pid {os.getpid()}"):
            yield
    except Busy as e:
        raise ValueError(
            f"--out {folder} is in use by another run of aelib train ({e}): wait for it to "
            "end, or choose another --out."
        ) from None
    finally:
        if lock.parent in made:  # (so that main() can remove it if the run failed)
            with contextlib.suppress(OSError):
                lock.unlink()


def _note_limits(args: argparse.Namespace, arrays) -> None:
    """Says so when --limit or --test-limit asks for more images than the data has (all
    are used; metrics.json records how many), rather than letting a typo pass unseen."""
    (x_train, _), (x_test, _) = arrays
    for flag, limit, have, kind in (
        ("--limit", args.limit, len(x_train), "training"),
        ("--test-limit", args.test_limit, len(x_test), "test"),
    ):
        if limit is not None and limit > have:
            print(
                f"aelib: note: {flag} {limit} is more than the {have} {kind} images; "
                f"using all {have}",
                file=sys.stderr,
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aelib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the variants and their default options")

    t = sub.add_parser("train", help="train, evaluate and save one variant (no Ray)")
    t.add_argument("--model", required=True, choices=VARIANTS)
    t.add_argument(
        "--epochs",
        type=_count,
        default=None,
        help="default: the tutorial's (50; 100 for sparse, deep and denoise)",
    )
    t.add_argument("--limit", type=_limit, default=None, help="use the first N training images")
    t.add_argument(
        "--test-limit", type=_positive, default=None, help="evaluate on the first N test images"
    )
    t.add_argument(
        "--batch-size",
        type=_count,
        default=None,
        help="default: the tutorial's (256; 128 for conv and denoise, 100 for vae)",
    )
    t.add_argument(
        "--learning-rate",
        type=_float_in(0, float("inf"), True, True, "number"),
        default=None,
        help="Adam's learning rate (default: 1e-3)",
    )
    t.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default=None,
        help="constant (the tutorial's) or a cosine decay to 0 over the epochs",
    )
    t.add_argument(  # (denoise only: at 0 there is no noise to remove)
        "--noise-factor",
        type=_float_in(0, 1, True, False, "number"),
        default=None,
        help="denoise only: the noise it is trained to remove (default: 0.5)",
    )
    t.add_argument(
        "--val-split",
        type=_float_in(0, 1, False, True, "number"),
        default=None,
        help="last fraction of the training images held out for validation (default: 0.1; "
        "0: validate on the test split, as the tutorial does)",
    )
    t.add_argument("--seed", type=_seed, default=0, help="default: 0")
    source = t.add_mutually_exclusive_group()  # (--data beside --images went unread)
    source.add_argument(
        "--data",
        type=_path,
        default=None,
        help="path to mnist.npz (default: $AELIB_MNIST, then Keras's download)",
    )
    source.add_argument(
        "--images",
        type=_path,
        default=None,
        metavar="DIR",
        help="train on a folder of your own images instead of MNIST (any size and colour: "
        "converted to gray, then resized or cut to 28x28, see --image-mode); the last tenth "
        "is the test split (whole images)",
    )
    t.add_argument(
        "--image-mode",
        choices=["resize", "patch"],
        default=None,
        help="bring own images to 28x28 by resizing (the default) or by cutting patches",
    )
    t.add_argument("--invert", action="store_true", help="own images are dark on light")
    t.add_argument(
        "--skip-unreadable",
        action="store_true",
        help="leave own images that cannot be read out, naming them in a warning (default: "
        "stop before training, naming them)",
    )
    t.add_argument("--out", type=_path, required=True, help="output folder")
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the model and figures an earlier run of the variant left in --out, "
        "and its metrics.json (one per --out: of whichever variant ran there last; with "
        "--no-figures the variant's figures are removed, not kept stale)",
    )
    t.add_argument(
        "--set",
        dest="options",
        type=_parse_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model option, e.g. --set encoding_dim=64",
    )
    t.add_argument(
        "--restart",
        action="store_true",
        help="train from epoch 1 where a stopped run left its checkpoint in --out, and "
        "replace it (by default, a run of the same settings goes on from that run's last "
        "epoch, and one of other settings is refused)",
    )
    t.add_argument(
        "--tensorboard", type=_path, default=None, metavar="DIR", help="write TensorBoard logs"
    )
    t.add_argument("--no-figures", action="store_true", help="draw no figures")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":  # (its errors show its usage, as argparse's own do)
        parser = next(
            a.choices["train"] for a in parser._actions if isinstance(a, argparse._SubParsersAction)
        )
    if args.command == "train" and not args.images:
        own = (
            ("--image-mode", args.image_mode),
            ("--invert", args.invert),
            ("--skip-unreadable", args.skip_unreadable),
        )
        given = [f for f, v in own if v]
        if given:  # (recorded in metrics.json as if they had acted on MNIST)
            verb = "apply" if len(given) > 1 else "applies"
            parser.error(f"{' and '.join(given)} {verb} to --images only")
    if args.command == "train" and args.noise_factor is not None and args.model != "denoise":
        # (recorded in metrics.json as if it had acted: the others train on clean digits)
        parser.error(f"--noise-factor applies to --model denoise only, not {args.model}")
    if args.command == "train":  # (aelib.data's errors named the path, not the flag)
        for flag, path, isnt, want in (
            ("--data", args.data, os.path.isdir, "a folder; expected Keras's mnist.npz file"),
            ("--images", args.images, os.path.isfile, "a file; expected a folder of images"),
        ):
            if path and isnt(os.path.expanduser(path)):
                parser.error(f"{flag} {path} is {want}")
    keys = [key for key, _ in getattr(args, "options", [])]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:  # (the last one silently won)
        parser.error(f"--set {', '.join(twice)} given more than once; give each option once")
    aelib._import_api()  # (seconds: Keras's and TensorFlow's imports)
    from aelib.registry import list_models, plain_message

    if args.command == "models":
        from aelib import process
        from aelib.registry import model_defaults

        try:  # (a stop during the imports: only train's run stops on it)
            process.end_early_recording()
        except KeyboardInterrupt as e:
            print(f"aelib: {process.how_stopped(e)}", file=sys.stderr)
            return process.exit_code(e)

        for name in list_models():
            print(f"{name:8s} {model_defaults(name)}")
        return 0

    from aelib.train import TrainConfig, check_out_dir
    from aelib.tutorial import tutorial_settings

    values = {
        **tutorial_settings(args.model),
        "seed": args.seed,
        "data": args.data,
        "limit": args.limit,
        "test_limit": args.test_limit,
        "model_options": dict(args.options),
        "images": args.images,
        "image_mode": args.image_mode or "resize",
        "invert": args.invert,
        "skip_unreadable": args.skip_unreadable,
    }
    fields = ("epochs", "batch_size", "learning_rate", "lr_schedule", "noise_factor", "val_split")
    for field in fields:
        if getattr(args, field) is not None:
            values[field] = getattr(args, field)
    from aelib import process

    made: list = []  # output folders this run created: removed again if it fails
    settings: dict = {}  # the run's resume_settings, once known
    try:
        with process.sigterm_as_ctrl_c():  # (SIGTERM: as Ctrl-C, not a silent end)
            config = TrainConfig(model=args.model, **values)
            check_out_dir(args.out, args.images, ("--out", "--images"))
            out = Path(args.out).expanduser()
            _writable_folder(args.out, "--out", made)
            if not args.no_figures and (out / "figures").exists():  # (found after training)
                _writable_folder(str(out / "figures"), "--out's figures folder", made)
            with _one_run_at_a_time(out, made), warnings.catch_warnings():
                warnings.showwarning = _show_warning
                result = _train_locked(args, config, out, made, settings)
    except (ValueError, OSError, RuntimeError, KeyboardInterrupt) as e:
        # Only empty ones go (a bad --set, bad data: nothing was written).
        process.remove_made(made)
        if isinstance(e, KeyboardInterrupt):  # (Ctrl-C, or SIGTERM: not a traceback)
            go_on = _how_to_go_on(args, settings)
            print(
                f"aelib: {process.how_stopped(e)}: the run did not finish; {go_on}",
                file=sys.stderr,
            )
            return process.exit_code(e)
        full = process.out_of_space(e)
        if full:  # (Keras's and h5py's writes name no file: say where, and what to do)
            into = f"--out {args.out}"
            if e.filename and Path(args.out).expanduser().absolute() not in (
                Path(str(e.filename)).absolute().parents
            ):  # (elsewhere: Keras's MNIST download, a temporary file)
                into = str(e.filename)
            print(
                f"aelib: error: out of disk space writing into {into} "
                f"({plain_message(e)}): free some space, then run the same command again",
                file=sys.stderr,
            )
        else:
            print(f"aelib: error: {plain_message(e)}", file=sys.stderr)
        from aelib.data import UnreadableImages

        if isinstance(e, UnreadableImages):
            print(
                "aelib: note: --skip-unreadable leaves such files out and trains on the rest",
                file=sys.stderr,
            )
        from aelib.train import CheckpointUnusable  # (its rerun would fail the same way)

        if (
            settings
            and not isinstance(e, CheckpointUnusable)
            and "checkpoint after" in (go_on := _how_to_go_on(args, settings))
        ):
            print(f"aelib: note: the run did not finish; {go_on}", file=sys.stderr)
        return 1 if full else 2  # (2: what was asked for cannot be done as asked)
    from aelib.registry import finite

    print(json.dumps({"model": args.model, **finite(result.metrics)}, indent=2, default=float))
    for kind, path in result.paths.items():
        print(f"aelib: wrote {kind}: {path}", file=sys.stderr)
    note = _no_gain_note(result.metrics, own_images=bool(args.images))
    if note:
        print(f"aelib: note: {note}", file=sys.stderr)
    if result.metrics["nan"]:
        kept = result.paths.get("last_finite_model")
        if kept:  # (not always the epoch before: one whose validation loss was NaN is not)
            kept = f"; epoch {_epochs_done(Path(kept))}'s weights are in {kept}"
        print(
            f"aelib: error: the loss became NaN in epoch {result.metrics['epochs_run']}, so "
            f"training stopped (the model was saved as it was{kept or ''}); try a smaller "
            "--learning-rate",
            file=sys.stderr,
        )
        return 1
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """aelib's own warnings (AelibWarning: the unreadable images left out) as one
    "aelib: warning:" line each; any other as Python shows it."""
    from aelib.data import AelibWarning

    if issubclass(category, AelibWarning):
        print(f"aelib: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _no_gain_note(metrics: dict, own_images: bool = False) -> str | None:
    """What to say of a denoiser whose outputs score no better than its noisy inputs on
    PSNR or on SSIM (a run of one epoch on a few thousand digits, the README's quick try:
    it exited 0 with a negative psnr_gain in its JSON and grey squares in its figure, no
    word; on 500 test digits the same run gained 0.02 dB while its SSIM fell from 0.36 to
    0.0, and PSNR alone let that pass). Names only the scores that did not improve."""
    gain, noisy = metrics.get("psnr_gain"), metrics.get("noisy_psnr")
    ssim, noisy_ssim = metrics.get("test_ssim"), metrics.get("noisy_ssim")
    if gain is None or noisy is None or math.isnan(gain):  # (NaN: the NaN error says it)
        return None
    has_ssim = ssim is not None and noisy_ssim is not None and not math.isnan(ssim)
    worse = []
    if gain <= 0:
        worse.append(f"PSNR {noisy + gain:.2f} against {noisy:.2f} dB")
    if has_ssim and ssim <= noisy_ssim:
        worse.append(f"SSIM {ssim:.3f} against {noisy_ssim:.3f}")
    if not worse:
        return None
    more = (
        "Train on more images or for more epochs."
        if own_images
        else "Train on more digits or for more epochs (30 epochs of all 60,000 digits reach "
        "about 20 dB)."
    )
    return (
        f"the denoiser's outputs score no better than its noisy inputs (test "
        f"{', '.join(worse)}): it has not learned to denoise yet. {more}"
    )


def _epochs_done(checkpoint: Path) -> int:
    """How many epochs the stopped run whose checkpoint this is trained; 0 where the
    file cannot be read or is not such a checkpoint (nothing to lose in replacing it)."""
    from aelib.saving import read_info
    from aelib.train import CHECKPOINT

    try:
        state = read_info(checkpoint).get(CHECKPOINT)
    except (OSError, ValueError):
        return 0
    done = state.get("epochs_done") if isinstance(state, dict) else None
    return done if isinstance(done, int) and done > 0 else 0


def _recorded_variant(path: Path) -> str | None:
    """The variant whose run wrote the metrics.json at `path`; None if unreadable."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record.get("model") if isinstance(record, dict) else None


def _how_to_go_on(args: argparse.Namespace, settings: dict) -> str:
    """What a stopped run left in --out, and what its rerun does with it: goes on from
    the checkpoint only where it is of this run's `settings` (resume_settings; {} if
    the run stopped before it knew them), and not with --restart."""
    from aelib.train import checkpoint_path, stopped_run

    path = checkpoint_path(args.out, args.model)
    state = stopped_run(args.out, args.model, settings)[0] if settings else None
    if state is None:
        return f"{args.out} holds no metrics.json of it, and the same command trains it again"
    done = state["epochs_done"]
    if done >= state["settings"]["epochs"]:  # (trained to the end: stopped after it)
        where = f"its checkpoint after its last epoch ({done}) is {path}"
        goes_on = "evaluates it and writes the outputs, without training again"
    else:
        where = f"its checkpoint after epoch {done} is {path}"
        goes_on = f"goes on from epoch {done + 1}"
    if args.restart:
        return (
            f"{where}: the same command trains from epoch 1 again, and without --restart it "
            f"{goes_on}"
        )
    return f"{where}: the same command {goes_on} (--restart trains from epoch 1)"


def _train_locked(args: argparse.Namespace, config, out: Path, made: list, settings: dict):
    """Trains into `out`; `settings` gets the run's resume_settings once its data is
    read (for main() to say, if the run is stopped, what its rerun does)."""
    from aelib.train import (
        built,
        checkpoint_path,
        config_source,
        load_arrays,
        resume_settings,
        stopped_run,
        train,
    )

    model_file = f"{args.model}.keras"
    checkpoint = checkpoint_path(out, args.model)
    for name in (model_file, "metrics.json", checkpoint.name):
        if (out / name).is_dir():  # (found only once trained, when the file was written)
            raise ValueError(
                f"--out {args.out} holds a folder {name}, where this run writes that file: "
                "move it, or choose another --out."
            )
    if (out / "metrics.json").exists() and not args.overwrite:  # (a smoke run replaced
        earlier = [n for n in (model_file, "metrics.json") if (out / n).exists()]  # a long one)
        whose = _recorded_variant(out / "metrics.json")
        if whose and whose != args.model:  # (--overwrite replaced it without a word)
            raise ValueError(
                f"--out {args.out} already holds metrics.json from an earlier run of {whose} "
                f"(one per --out): choose another --out for {args.model}, or pass "
                f"--overwrite to replace that metrics.json ({whose}.keras, if there, keeps "
                "its own copy of the record)."
            )
        raise ValueError(
            f"--out {args.out} already holds {' and '.join(earlier)} from an earlier "
            "run: pass --overwrite to replace them, or choose another --out."
        )
    model_there = (out / model_file).exists()
    if model_there and not args.overwrite and not checkpoint.exists():
        # (a run of aelib train stopped before its metrics.json leaves its checkpoint
        # beside its model: without either, the model is a user's own, aelib.save's)
        raise ValueError(
            f"--out {args.out} already holds a {model_file} that is no stopped run's (no "
            f"metrics.json, no {checkpoint.name}): pass --overwrite to replace it, or "
            "choose another --out."
        )
    if args.tensorboard is not None:
        _writable_folder(args.tensorboard, "--tensorboard", made)
    # Keras's progress (and its MNIST download's) goes to stderr, so that stdout is the
    # metrics' JSON alone (for `| jq`); one line per epoch where stderr is not a
    # terminal (a log, CI).
    import keras

    from aelib import process

    class StopOnSignal(keras.callbacks.Callback):
        """Ctrl-C and SIGTERM stop the training at the end of a batch."""

        def on_train_batch_end(self, batch, logs=None):
            process.raise_if_stopped()

        on_test_batch_end = on_epoch_end = on_train_end = on_train_batch_end

    # A --set value the model cannot be built with is named before the data is read (a
    # missing MNIST hid it behind the download's error). train() builds it again, seeded;
    # this one's weights go now (Keras models hold reference cycles: kept till a collection).
    built(config)
    gc.collect()
    # From here on, Ctrl-C and SIGTERM only record the stop, and train() and the callback
    # above raise it where it is safe: raised inside TensorFlow (in fit, and as much in
    # evaluate or predict), the exception was lost, or the process died (SIGSEGV, a
    # corrupted heap).
    process.defer_stops(True, "aelib: stopping after the step under way (again: at once)")
    with contextlib.redirect_stdout(sys.stderr):
        arrays = load_arrays(config)
        _note_limits(args, arrays)
        settings.update(resume_settings(config, arrays))
        state, why_not = stopped_run(out, config.model, settings)
        if state and not args.restart and state["epochs_done"] >= config.epochs:
            print(
                f"aelib: note: a run of the same settings trained all its epochs ({config.epochs}) "
                "but stopped before it ended (in its evaluation, figures or files): this run "
                "evaluates its checkpoint and writes the outputs, without training again "
                "(--restart trains from epoch 1)",
                file=sys.stderr,
            )
        elif state and not args.restart:
            print(
                f"aelib: note: going on from epoch {state['epochs_done'] + 1} of {config.epochs}: "
                f"a run of the same settings stopped after epoch {state['epochs_done']} and left "
                "its checkpoint in --out (--restart trains from epoch 1)",
                file=sys.stderr,
            )
        elif why_not and not args.restart and (done := _epochs_done(checkpoint)):
            # (a changed flag replaced the epochs a stopped run had trained, with a note)
            raise ValueError(
                f"--out {args.out} holds the checkpoint of a run that stopped after epoch "
                f"{done}, and this run does not go on from it: {why_not}. Give the settings "
                "it had to go on from it, or pass --restart to train from epoch 1 and "
                "replace it (or choose another --out)."
            )
        elif why_not:
            print(
                f"aelib: note: --out holds the checkpoint of a stopped run that this one does "
                f"not go on from: {why_not}; this run trains from epoch 1 and replaces it",
                file=sys.stderr,
            )
        elif model_there and not args.overwrite:
            print(
                f"aelib: note: --out {args.out} holds a {model_file} without its metrics.json "
                "(written last: a run that stopped before it ended): it is replaced",
                file=sys.stderr,
            )
        return train(
            config,
            arrays,
            callbacks=[StopOnSignal()],
            data_source=config_source(config),
            out_dir=str(out),  # (~ expanded, as the checks above did)
            tensorboard_dir=args.tensorboard and str(Path(args.tensorboard).expanduser()),
            figures=not args.no_figures,
            verbose="auto" if sys.stderr.isatty() else 2,
            resume=state is not None and not args.restart,  # (why not: said above)
        )


def run() -> None:
    """The `aelib` command (its console script, and `python -m aelib`): main(), then an
    exit without the interpreter's teardown, TensorFlow's (process.exit_without_teardown:
    1.5-1.7 s after the last line on a quiet machine, 8-23 s under load)."""
    from aelib import process

    process.exit_without_teardown(main)


if __name__ == "__main__":
    run()
