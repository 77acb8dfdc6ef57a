"""`python -m aelib train` end to end into a temp dir, as a user runs it, and its errors."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import aelib
from aelib import data as data_lib
from aelib.__main__ import main
from helpers import MNIST, REPO, default_signals, room, small_disk, subprocess_env


def run_cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "aelib", *args],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


FIGURES = {
    "denoise": {
        "denoise_learning_curves.png",
        "denoise_noisy_vs_denoised.png",
        "denoise_codes.png",
    },
    "vae": {
        "vae_learning_curves.png",
        "vae_reconstructions.png",
        "vae_latent_plane.png",
        "vae_manifold.png",
    },
    "deep": {"deep_learning_curves.png", "deep_reconstructions.png", "deep_codes_tsne.png"},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, object]]:
    """`python -m aelib train` for each FIGURES variant, two at a time: a third of each
    run is importing TensorFlow on one core, so the pairs overlap."""
    from concurrent.futures import ThreadPoolExecutor

    def run(name):
        tmp = tmp_path_factory.mktemp(name)
        args = ["train", "--model", name, "--epochs", "1", "--limit", "600"]
        args += ["--test-limit", "300", "--data", str(MNIST), "--out", str(tmp / "out")]
        return run_cli(*args, "--tensorboard", str(tmp / "tb")), tmp

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(sorted(FIGURES), pool.map(run, sorted(FIGURES)), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_train_writes_model_metrics_and_figures(name, trained):
    proc, tmp = trained[name]
    out = tmp / "out"
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)  # stdout is the metrics alone; progress went to stderr
    assert printed["model"] == name and re.search(r"- loss: \d", proc.stderr)
    assert f"aelib: wrote model: {out / f'{name}.keras'}" in proc.stderr
    assert (out / f"{name}.keras").is_file()
    record = json.loads((out / "metrics.json").read_text())
    assert record["model"] == name
    assert record["train_config"]["epochs"] == 1 and record["train_config"]["limit"] == 600
    assert record["data_settings"]["train_images"] == 540  # 10% held out for validation
    assert record["metrics"]["test_images"] == 300
    assert 0 < record["metrics"]["test_bce"] < 0.7
    assert {p.name for p in (out / "figures").iterdir()} == FIGURES[name]
    assert all(p.stat().st_size > 2000 for p in (out / "figures").iterdir())
    assert any((tmp / "tb").rglob("*tfevents*"))
    if name == "denoise":
        assert record["metrics"]["noisy_psnr"] == pytest.approx(9.4, abs=0.3)
        assert len(record["history"]["val_psnr"]) == 1


@pytest.mark.slow
def test_trained_files_reload_with_plain_keras_after_import_aelib(trained):
    """A fresh interpreter (one for all three files) reloads and runs each with plain
    Keras after `import aelib`."""
    paths = [str(trained[name][1] / "out" / f"{name}.keras") for name in sorted(FIGURES)]
    for name in sorted(FIGURES):
        assert trained[name][0].returncode == 0, trained[name][0].stderr[-3000:]
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, numpy as np, aelib, keras\n"
            "for path in sys.argv[1:]:\n"
            "    m = keras.models.load_model(path)\n"
            "    shape = [d or 28 for d in m.input_shape[1:]]\n"
            "    out = m.predict(np.zeros([2, *shape], 'float32'), verbose=0)\n"
            "    print(aelib.read_info(path)['train_config']['model'], list(out.shape))\n",
            *paths,
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0, check.stderr[-2000:]
    assert check.stdout.splitlines() == [
        "deep [2, 784]",
        "denoise [2, 28, 28, 1]",
        "vae [2, 784]",
    ]


def test_models_command_lists_the_seven(capsys):
    assert main(["models"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == [
        "dense",
        "sparse",
        "deep",
        "conv",
        "denoise",
        "seq2seq",
        "vae",
    ]


BAD_INPUT = [
    (["--model", "pca"], "invalid choice: 'pca'"),
    (["--model", "dense", "--epochs", "0"], "--epochs: must be >= 1. Received: 0"),
    (["--model", "dense", "--limit", "1"], "--limit: must be >= 2 (omit it for all). Received: 1"),
    (["--model", "dense", "--limit", "0"], "--limit: must be >= 2 (omit it for all). Received: 0"),
    (
        ["--model", "dense", "--data", "/nonexistent/mnist.npz"],
        "MNIST file not found: /nonexistent/mnist.npz",
    ),
    (["--model", "denoise", "--noise-factor", "2"], "--noise-factor: must be in (0, 1]. Rec"),
    (["--model", "denoise", "--noise-factor", "0"], "--noise-factor: must be in (0, 1]. Rec"),
    (["--model", "dense", "--val-split", "1"], "--val-split: must be in [0, 1). Received: 1"),
    (["--model", "dense", "--set", "filters=3"], "Unknown option(s) ['filters'] for model"),
    (["--model", "dense", "--set", "nonsense"], "--set expects KEY=VALUE"),
    (
        ["--model", "conv", "--set", "filters=5"],
        "Option filters of model 'conv' must be a tuple like (16, 8, 8). Received: filters=5",
    ),
    (["--model", "denoise", "--set", "skips='yes'"], "Option skips of model 'denoise' must be a"),
    (["--model", "dense", "--set", "encoding_dim=-4"], "Model 'dense' cannot be built with enc"),
    (
        ["--model", "denoise", "--set", "depth=3"],
        "Model 'denoise' (depth=3) maps the data's (28, 28, 1) inputs to (32, 32, 1)",
    ),
    (["--model", "denoise", "--set", "channels=3"], "channels must be 1. Received: channels=3"),
    (  # (built, then failed inside fit with Keras's message in terminal colour codes)
        ["--model", "denoise", "--set", "convs_per_stage=0"],
        "convs_per_stage must be >= 1. Received: convs_per_stage=0",
    ),
    (["--model", "dense", "--seed", "-1"], "--seed: must be in [0, 2**32 - 1]"),
    (["--model", "dense", "--epochs", "abc"], "--epochs: invalid positive integer value: 'abc'"),
    (["--model", "dense", "--learning-rate", "inf"], "--learning-rate: must be > 0 and finite"),
    (["--model", "dense", "--learning-rate", "nan"], "--learning-rate: must be > 0 and finite"),
    (  # (beyond int64: TensorFlow's OverflowError traceback in fit, after the data load)
        ["--model", "dense", "--batch-size", "99999999999999999999"],
        "--batch-size: must be at most 2**31 - 1. Received: 99999999999999999999",
    ),
    (  # (TensorFlow's TypeError traceback, from the cosine schedule's decay steps)
        ["--model", "dense", "--epochs", "99999999999999999999", "--lr-schedule", "cosine"],
        "--epochs: must be at most 2**31 - 1. Received: 99999999999999999999",
    ),
    (  # (JAX's OverflowError traceback; PyTorch's words naming no option; TF took it)
        ["--model", "vae", "--set", "seed=-1", "--epochs", "1"],
        "seed must be None or an int in [0, 2**31 - 1]. Received: seed=-1",
    ),
    (  # (a missing MNIST, or no network without --data, hid it: found after the data)
        ["--model", "vae", "--set", "latent_dim='x'", "--data", "/nonexistent/mnist.npz"],
        "Option latent_dim of model 'vae' must be an int. Received: latent_dim='x'",
    ),
    (["--model", "dense", "--data", "/proc/cpuinfo"], "is not an .npz (zip) archive"),
    (  # --data beside --images went unread, a missing file too
        ["--model", "dense", "--images", "/tmp", "--data", "/nonexistent/mnist.npz"],
        "argument --data: not allowed with argument --images",
    ),
    (  # the last one silently won
        ["--model", "dense", "--set", "encoding_dim=8", "--set", "encoding_dim=64"],
        "--set encoding_dim given more than once; give each option once",
    ),
    (  # ("$DIR" unset: the working folder's images were read, and recorded as MNIST)
        ["--model", "dense", "--images", ""],
        "argument --images: expected a path, not an empty string",
    ),
    (["--model", "dense", "--out", " "], "argument --out: expected a path, not an empty"),
    (  # (TensorFlow's ResourceExhaustedError traceback)
        ["--model", "dense", "--set", "encoding_dim=1099511627776"],
        "Model 'dense' (encoding_dim=1099511627776) does not fit in memory",
    ),
    (["--model", "dense", "--noise-factor", "0.3"], "--noise-factor applies to --model denoise"),
    (["--model", "dense", "--invert"], "--invert applies to --images only"),
    (["--model", "dense", "--image-mode", "patch"], "--image-mode applies to --images only"),
    (["--model", "dense", "--skip-unreadable"], "--skip-unreadable applies to --images only"),
    (  # 2 images, round(1.8) = 2 of them held out: nothing left to train on
        ["--model", "dense", "--limit", "2", "--val-split", "0.9", "--no-figures"],
        "no training images left: limit=2 with val_split=0.9 leaves 0 of the 2 images",
    ),
]


@pytest.mark.parametrize("case", range(len(BAD_INPUT)), ids=[m for _, m in BAD_INPUT])
def test_bad_input_is_a_clear_error(case, tmp_path, capsys):
    """The CLI's own main() with these flags, in this process (TensorFlow is imported
    once, not once per case): exit 2, a message naming the input, no output folder."""
    args, message = BAD_INPUT[case]
    out = tmp_path / "o"
    try:
        code, usage = main(["train", "--out", str(out), "--limit", "50", *args]), False
    except SystemExit as e:  # argparse's errors, and the checks main() makes of them
        code, usage = e.code, True
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert not usage or err.startswith("usage: aelib train "), err  # (train's, not aelib's)
    assert message in err
    assert "Traceback" not in err
    assert not out.exists()


def test_help_and_bad_flags_answer_before_keras_is_imported(tmp_path):
    """`aelib --help` and a bad flag took 8.5 s here: the package imported Keras and
    TensorFlow before argparse read the flags. The command line reads them first now, as
    `python -m aelib` and as the `aelib` script (which pip puts beside this Python)."""
    script = Path(sys.executable).parent / "aelib"
    out = str(tmp_path / "o")
    for command, code, said in (
        (["--help"], 0, "usage: aelib [-h] {models,train}"),
        (["train", "--help"], 0, "--model {dense,sparse,deep,conv,denoise,seq2seq,vae}"),
        (["train", "--model", "pca", "--out", out], 2, "invalid choice: 'pca'"),
        (["train", "--model", "dense", "--epochs", "0", "--out", out], 2, "must be >= 1"),
        (["train", "--model", "dense", "--batch-size", f"{2**31}", "--out", out], 2, "2**31"),
        (["train", "--model", "conv", "--noise-factor", "0.3", "--out", out], 2, "denoise only"),
    ):
        for launch in ([sys.executable, "-m", "aelib"], [str(script)]):
            run = subprocess.run(
                launch + command,
                env={**subprocess_env(), "PYTHONPROFILEIMPORTTIME": "1"},
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert run.returncode == code and said in run.stdout + run.stderr, run.stderr[-2000:]
            imported = re.findall(r"^import time:.*\|\s*([\w.]+)$", run.stderr, re.M)
            assert "aelib.tutorial" in imported, run.stderr[-2000:]  # (it reports them)
            heavy = {m for m in imported if m.split(".")[0] in ("keras", "tensorflow", "jax")}
            assert not heavy, (launch, command, sorted(heavy)[:5])
            assert not os.path.exists(out)
    # (the constant the flags are checked against, and their choices, are the library's)
    from aelib import __main__ as cli
    from aelib.train import MAX_COUNT
    from aelib.tutorial import VARIANTS

    assert cli.MAX_COUNT == MAX_COUNT
    assert list(VARIANTS) == aelib.list_models()


def test_an_out_inside_the_image_folder_is_refused(tmp_path, capsys):
    """--out inside (or equal to) --images: the run's figures were read as training and
    test images by the next run on that folder (43 images where there were 40)."""
    from PIL import Image

    images = tmp_path / "scans"
    images.mkdir()
    for i in range(4):
        Image.fromarray(np.full((28, 28), 60 * i, np.uint8)).save(images / f"{i}.png")
    for out in (images, images / "run"):
        args = ["train", "--model", "dense", "--epochs", "1", "--images", str(images)]
        assert main([*args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out} is inside --images {images}: its figures would be read" in err, err
        assert "Traceback" not in err and "Epoch" not in err
        assert sorted(p.name for p in images.iterdir()) == [f"{i}.png" for i in range(4)]
    config = aelib.TrainConfig(model="dense", epochs=1, images=str(images))
    with pytest.raises(ValueError, match="out_dir .* is inside images"):
        aelib.train(config, out_dir=images / "run", verbose=0)
    assert not (images / "run").exists()


@pytest.mark.parametrize("name", ["dense.keras", "metrics.json", "dense.checkpoint.keras"])
def test_a_folder_where_a_file_goes_is_refused_before_training(name, tmp_path, capsys):
    """A folder in --out at the model's, the record's or the checkpoint's name failed
    only once trained ("Cannot save ...: it is a folder", "[Errno 21] Is a directory"),
    with --overwrite too."""
    (tmp_path / "o" / name).mkdir(parents=True)
    args = ["train", "--model", "dense", "--limit", "50", "--out", str(tmp_path / "o")]
    assert main([*args, "--overwrite"]) == 2
    err = capsys.readouterr().err
    said = f"--out {tmp_path / 'o'} holds a folder {name}, where this run writes that file"
    assert said in err and "Epoch" not in err, err[-2000:]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [".aelib-train.lock", name]


def test_a_model_of_ones_own_in_out_is_replaced_only_with_overwrite(tmp_path, capsys):
    """A model in --out without metrics.json was taken for a stopped run's and replaced,
    with a note, also where it was a user's own (aelib.save's): a stopped run leaves its
    checkpoint beside its model, a user's model has none."""
    out = tmp_path / "o"
    mine = aelib.save(aelib.build_model("dense", encoding_dim=8), out / "dense.keras")
    kept = mine.read_bytes()
    args = ["train", "--model", "dense", "--epochs", "1", "--limit", "64", "--test-limit"]
    args += ["32", "--data", str(MNIST), "--out", str(out), "--no-figures"]
    assert main(args) == 2
    err = capsys.readouterr().err
    said = f"--out {out} already holds a dense.keras that is no stopped run's (no metrics.json"
    assert said in err and "Epoch" not in err, err[-2000:]
    assert mine.read_bytes() == kept
    assert main([*args, "--overwrite"]) == 0
    assert mine.read_bytes() != kept and (out / "metrics.json").is_file()


def test_an_out_that_is_a_broken_link_says_so(tmp_path, capsys):
    """An --out (or --tensorboard) that is a link to nothing was "cannot write there
    (File exists)"."""
    broken = tmp_path / "runs"
    broken.symlink_to(tmp_path / "gone" / "runs")
    for flag in ("--out", "--tensorboard"):
        args = ["train", "--model", "dense", "--limit", "50", "--out", str(tmp_path / "o")]
        assert main([*args, flag, str(broken)]) == 2
        err = capsys.readouterr().err
        said = f"{flag} {broken} is a link to {tmp_path / 'gone' / 'runs'}, which does not exist"
        assert said in err and "Traceback" not in err, err[-2000:]
    # ... and so was an --out under such a link.
    assert main(["train", "--model", "dense", "--limit", "50", "--out", str(broken / "a")]) == 2
    err = capsys.readouterr().err
    said = f"--out {broken / 'a'}: its folder {broken} is a link to {tmp_path / 'gone' / 'runs'}"
    assert said in err and "Traceback" not in err, err[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_a_trained_model_in_out_is_replaced_only_with_overwrite(tmp_path, capsys, monkeypatch):
    """A second run into the same --out (a smoke test after a long run, a NaN run) replaced
    the first one's model without a word; now it stops before training unless told to.
    Replaced without figures, the first one's figures go too (they showed the old model)."""
    out = tmp_path / "o"
    args = ["train", "--model", "dense", "--epochs", "1", "--limit", "64", "--test-limit"]
    args += ["32", "--data", str(MNIST), "--out", str(out)]
    assert main(args) == 0
    first = (out / "dense.keras").read_bytes()
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == [
        f"dense_{n}.png" for n in ("codes_tsne", "learning_curves", "reconstructions")
    ]
    (out / "figures" / "dense_mine.png").write_bytes(b"a user's own file")  # (not aelib's)
    capsys.readouterr()
    assert main([*args, "--seed", "1"]) == 2
    err = capsys.readouterr().err
    said = f"--out {out} already holds dense.keras and metrics.json from an earlier run: pass"
    assert said in err
    assert "Epoch" not in err and (out / "dense.keras").read_bytes() == first
    # (also: a --test-limit beyond the data is said, not passed over)
    again = [*args, "--seed", "1", "--overwrite", "--no-figures", "--test-limit", "20000"]
    assert main(again) == 0
    assert (out / "dense.keras").read_bytes() != first
    assert [p.name for p in (out / "figures").iterdir()] == ["dense_mine.png"]
    err = capsys.readouterr().err
    assert "note: --test-limit 20000 is more than the 10000 test images; using all 10000" in err
    capsys.readouterr()  # another variant would replace the first one's metrics.json
    assert main([*args, "--model", "deep"]) == 2
    assert (
        f"--out {out} already holds metrics.json from an earlier run of dense (one per --out): "
        "choose another --out for deep, or pass --overwrite" in capsys.readouterr().err
    )
    # A model without metrics.json (written last) is a stopped run's: replaced, said so.
    # (An --overwrite run removes the old one first: stopped, it left its new model
    # beside the old run's record, and the next run was refused as finished.)
    from aelib import plots

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "tutorial_figures", stopped)
    assert main([*args, "--overwrite"]) == 130
    monkeypatch.undo()
    assert not (out / "metrics.json").exists()
    assert main([*args, "--no-figures", "--restart"]) == 0  # (without: its checkpoint's)
    assert "holds a dense.keras without its metrics.json" in capsys.readouterr().err
    assert (out / "metrics.json").is_file()
    # Another run training into --out now (two at once both passed the check above, and
    # the last to end replaced the other's model): refused, naming it.
    from aelib.__main__ import _one_run_at_a_time

    with _one_run_at_a_time(out, []):
        assert main([*args, "--overwrite"]) == 2
    assert f"--out {out} is in use by another run of aelib train (pid " in capsys.readouterr().err


def test_a_checkpoint_of_other_settings_or_with_restart_trains_from_epoch_1(
    tmp_path, capsys, monkeypatch
):
    """A stopped run's checkpoint is gone on from only by a run of the same settings, and
    not with --restart; either way the run says what it does with it. A run of other
    settings is refused unless given --restart: a changed flag replaced the epochs the
    stopped run had trained, with a note."""
    from aelib import plots

    out = tmp_path / "o"
    args = ["train", "--model", "dense", "--epochs", "2", "--limit", "64", "--test-limit"]
    args += ["32", "--data", str(MNIST), "--out", str(out)]

    def stopped(*args, **kwargs):  # (stopped while it draws its figures: after epoch 2)
        raise KeyboardInterrupt

    # Stopped before its first epoch ends: nothing to go on from, and the folder it made
    # is gone (SIGTERM left it).
    monkeypatch.setattr(sys.modules["aelib.train"], "load_arrays", stopped)
    assert main(args) == 130
    monkeypatch.undo()
    said = f"{out} holds no metrics.json of it, and the same command trains it again"
    assert said in capsys.readouterr().err and not out.exists()

    for restart, then, said in (
        (
            [],
            ["--epochs", "3", "--restart"],
            "is of a run with other settings: epochs=2 (now 3); this run "
            "trains from epoch 1 and replaces it",
        ),
        (["--restart"], ["--overwrite", "--restart"], None),
    ):
        monkeypatch.setattr(plots, "tutorial_figures", stopped)
        assert main([*args, "--overwrite", *restart]) == 130
        monkeypatch.undo()
        err = capsys.readouterr().err
        # (its last epoch's: the rerun trains no epoch again, only evaluates and writes)
        where = f"its checkpoint after its last epoch (2) is {out / 'dense.checkpoint.keras'}"
        go_on = "evaluates it and writes the outputs, without training again"
        go_on = f"the same command {go_on} (--restart trains from epoch 1)"
        if restart:  # (its rerun trains from epoch 1: it says so, not that it goes on)
            go_on = "the same command trains from epoch 1 again, and without --restart it "
            go_on += "evaluates it and writes the outputs, without training again"
        assert f"{where}: {go_on}" in err, err[-2000:]
        kept = (out / "dense.checkpoint.keras").read_bytes()
        if "--epochs" in then:
            assert main([*args, "--no-figures", "--epochs", "3"]) == 2
            assert (
                f"aelib: error: --out {out} holds the checkpoint of a run that stopped after "
                "epoch 2, and this run does not go on from it: dense.checkpoint.keras is of a "
                "run with other settings: epochs=2 (now 3). Give the settings it had to go on "
                "from it, or pass --restart" in capsys.readouterr().err
            )
            assert (out / "dense.checkpoint.keras").read_bytes() == kept
        assert main([*args, "--no-figures", *then]) == 0
        err = capsys.readouterr().err
        assert "Epoch 1/" in err and "going on from" not in err
        assert said is None or said in err
        assert not (out / "dense.checkpoint.keras").exists()


def test_a_signal_whose_exception_was_lost_is_raised_again(capfd):
    """A handler's exception lands wherever the main thread is; in a __del__ Python only
    prints it, and a training went on to its end: raise_if_stopped raises it again."""
    from aelib import process

    for signum, stop in ((signal.SIGTERM, process.Terminated), (signal.SIGINT, KeyboardInterrupt)):
        with process.sigterm_as_ctrl_c():
            try:
                os.kill(os.getpid(), signum)
                time.sleep(1)  # (the handler runs here)
            except KeyboardInterrupt as e:  # (lost, as in a __del__)
                assert type(e) is stop
            with pytest.raises(stop):
                process.raise_if_stopped()
            assert process.exit_code(stop()) == (143 if stop is process.Terminated else 130)
        # Deferred (in a training), a stop is only recorded, and raised where asked.
        with process.sigterm_as_ctrl_c():
            process.defer_stops(True)
            os.kill(os.getpid(), signum)
            time.sleep(0.5)  # (the handler runs here, and raises nothing)
            with pytest.raises(stop):
                process.raise_if_stopped()
        process.raise_if_stopped()  # (outside a block, and in a new one: nothing to raise)
        with process.sigterm_as_ctrl_c():
            process.raise_if_stopped()
        # The first deferred stop says what happens now; a second one acts at once (a
        # Ctrl-C in the figures' t-SNE waited half a minute without a word).
        capfd.readouterr()
        with process.sigterm_as_ctrl_c():
            process.defer_stops(True, "stopping after the step under way")
            os.kill(os.getpid(), signum)
            time.sleep(0.5)
            assert capfd.readouterr().err == "stopping after the step under way\n"
            with pytest.raises(stop):
                os.kill(os.getpid(), signum)
                time.sleep(1)  # (the handler raises here)


def test_make_folder_notes_what_it_made_and_remove_made_takes_back_only_empty_ones(
    tmp_path, monkeypatch
):
    """The folders a refused run made go again, deepest first, where they are still
    empty; those it found, or that hold something, stay. A mkdir that fails part way
    still notes the parents it made (the three commands shared this by copies)."""
    from aelib import process

    made: list = []
    process.make_folder(tmp_path / "a" / "b" / "c", made)
    process.make_folder(tmp_path / "a" / "d", made)  # (a is there now: not noted again)
    process.make_folder(tmp_path / "a" / "b" / "c" / "e", made)  # (--tensorboard in --out)
    assert made == [
        tmp_path / "a" / "b" / "c",
        tmp_path / "a" / "b",
        tmp_path / "a",
        tmp_path / "a" / "d",
        tmp_path / "a" / "b" / "c" / "e",
    ]
    (tmp_path / "a" / "d" / "kept.txt").write_text("x")
    process.remove_made(made)  # (a holds d, which holds a file: both stay)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "a",
        "a/d",
        "a/d/kept.txt",
    ]
    assert process.nearest_existing(tmp_path / "a" / "x" / "y") == tmp_path / "a"
    link = tmp_path / "a" / "link"
    link.symlink_to(tmp_path / "gone")  # (there, and no folder)
    assert process.nearest_existing(link / "y") == link

    # An --out of new/../out (new missing) is the existing out, which a refusal removed
    # (as one it made, empty); new is made, and noted.
    (tmp_path / "out").mkdir()
    made = []
    process.make_folder(tmp_path / "new" / ".." / "out", made)
    assert made == [tmp_path / "new"] and (tmp_path / "new" / ".." / "out").is_dir()
    process.remove_made(made)
    assert (tmp_path / "out").is_dir() and not (tmp_path / "new").exists()

    real = os.mkdir

    def mkdir(path, *args):  # one that fails below the first folder it made
        if Path(path).name == "e" and Path(path).parent.is_dir():
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args)

    monkeypatch.setattr(os, "mkdir", mkdir)
    made = []
    with pytest.raises(PermissionError):
        process.make_folder(tmp_path / "n" / "e", made)
    assert (tmp_path / "n").is_dir() and tmp_path / "n" in made
    process.remove_made(made)
    assert not (tmp_path / "n").exists()


def test_exit_without_teardown_runs_the_exit_handlers_and_keeps_the_status():
    """The commands' exit (aelib's, the sweep's) skips the interpreter's teardown
    (TensorFlow's: 1.5-1.7 s after aelib train's last line) but not the exit handlers, the
    output's flush or the status: a message is printed, 2 for a usage error, else 1."""
    code = f"""
import atexit, importlib.util, sys
spec = importlib.util.spec_from_file_location("p", {str(REPO / "aelib" / "process.py")!r})
process = importlib.util.module_from_spec(spec)
spec.loader.exec_module(process)
atexit.register(lambda: print("exit handler ran"))
print("unflushed", end="")
process.exit_without_teardown(lambda: eval(sys.argv[1]), usage="usage:")
"""
    for returned, status, err in (
        ("None", 0, ""),
        ("3", 3, ""),
        ("sys.exit('usage: bad flag')", 2, "usage: bad flag"),
        ("sys.exit('it failed')", 1, "it failed"),
    ):
        run = subprocess.run(
            [sys.executable, "-c", code, returned], capture_output=True, text=True, timeout=60
        )
        assert (run.returncode, run.stderr.strip()) == (status, err), run.stderr[-2000:]
        assert run.stdout == "unflushedexit handler ran\n"


def test_a_stop_during_the_imports_ends_the_run_as_it_starts(tmp_path):
    """A Ctrl-C in the seconds of TensorFlow's import was lost (raised in a garbage-collector
    callback, say) and the run trained to its end, exit 0; SIGTERM ended it without a word.
    The command line keeps such a stop for the run to stop on as it starts."""

    def caught(pid: int, signum: int) -> bool:  # (Linux: the signals a process handles)
        status = Path(f"/proc/{pid}/status").read_text()
        return bool(int(re.search(r"SigCgt:\s*([0-9a-f]+)", status)[1], 16) >> (signum - 1) & 1)

    train = ["train", "--model", "dense", "--epochs", "1", "--limit", "1000", "--no-figures"]
    for signum, code, said, command in (
        (signal.SIGINT, 130, "aelib: interrupted: the run did not finish", train),
        (signal.SIGTERM, 143, "aelib: terminated (SIGTERM): the run did not finish", train),
        (signal.SIGINT, 130, "aelib: interrupted", ["models"]),  # (no run: it listed them)
    ):
        out = tmp_path / f"o{signum}"
        cmd = [sys.executable, "-m", "aelib", *command]
        cmd += ["--data", str(MNIST), "--out", str(out)] if command == train else []
        proc = subprocess.Popen(
            cmd,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=default_signals,
        )
        deadline = time.monotonic() + 30
        while not caught(proc.pid, signal.SIGTERM):  # (its handler is set: Keras comes next)
            assert time.monotonic() < deadline and proc.poll() is None, "SIGTERM not handled"
            time.sleep(0.005)
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        proc.send_signal(signum)
        # (the stop lands in the imports: no backend's library was loaded yet)
        assert not re.search("tensorflow|jaxlib|torch", maps), "handled after the imports"
        stdout, err = proc.communicate(timeout=60)
        assert proc.returncode == code and "Traceback" not in err, err[-3000:]
        assert said in err and "Epoch 1/" not in err and "dense" not in stdout, err
        assert not out.exists()
    # A program importing aelib keeps Python's own handlers, run as `python -m` too (its
    # sys.argv[0] is "-m" while its package imports aelib).
    (tmp_path / "myproj").mkdir()
    (tmp_path / "myproj" / "__init__.py").write_text("import aelib\n")
    check = "import signal; print(signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)"
    (tmp_path / "myproj" / "run.py").write_text(check + "\n")
    run = subprocess.run(
        [sys.executable, "-m", "myproj.run"],
        env=subprocess_env(),
        cwd=tmp_path,
        capture_output=True,
    )
    assert run.stdout.strip() == b"True", run.stderr[-2000:]
    from aelib import process

    for argv0, orig, ours in (
        ("-m", ["python", "-m", "aelib", "train"], True),
        ("-m", ["python", "-X", "dev", "-maelib.__main__"], True),
        ("/venv/bin/aelib", ["python", "/venv/bin/aelib", "train"], True),
        ("-m", ["python", "-m", "myproj.train"], False),
        ("-c", ["python", "-c", "import aelib"], False),
        ("x.py", ["python", "-u", "x.py", "-m", "aelib"], False),
    ):
        assert process.command_line(argv0, orig) is ours, orig


def test_a_full_disk_ends_training_with_a_line_and_its_rerun_goes_on(tmp_path):
    """A disk that filled up (a tmpfs with room for one checkpoint: root only, skipped
    elsewhere) ended the run with "aelib: error: [Errno 28] No space left on device",
    naming no folder, and exit 2 as for a bad flag. Now the line names --out and what
    to do, the run exits 1, and once there is room the same command goes on."""
    with small_disk(tmp_path / "full", "1500k") as full:
        out = full / "o"
        args = ["train", "--model", "dense", "--epochs", "2", "--limit", "1000"]
        args += ["--test-limit", "100", "--no-figures", "--data", str(MNIST), "--out", str(out)]
        proc = run_cli(*args)
        said = [line for line in proc.stderr.splitlines() if line.startswith("aelib: ")]
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert said[0].startswith(f"aelib: error: out of disk space writing into --out {out} ")
        assert said[0].endswith("free some space, then run the same command again"), said
        assert "the same command goes on from epoch 2" in said[1], said
        room(full, "40M")
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout)["resumed_after_epoch"] == 1, proc.stdout


def test_a_stopped_training_says_so_and_its_rerun_goes_on_from_its_last_epoch(tmp_path):
    """Ctrl-C printed TensorFlow's KeyboardInterrupt traceback; SIGTERM ended the run
    without a word and left the --out folder it had made. And a stopped run trained again
    from its first epoch: now it goes on from the checkpoint of its last."""

    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "aelib", "train", "--model", "dense", "--epochs", "20"]
    cmd += ["--limit", "2000", "--test-limit", "100", "--data", str(MNIST), "--out", str(out)]

    def stopped(signum: int, at: str, after: str = "") -> tuple[int, str]:
        """Runs cmd and sends `signum` at its first line with `at` (after one with `after`)."""
        proc = subprocess.Popen(
            cmd,
            env=subprocess_env(),
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=default_signals,
        )
        lines = []
        for line in proc.stderr:  # (one line per epoch: stderr is no terminal)
            lines.append(line)
            if at in line and after in "".join(lines):
                proc.send_signal(signum)
                break
        err = "".join(lines) + proc.stderr.read()
        return proc.wait(timeout=60), err

    # Stopped in epoch 3: its checkpoint stays, and the same command goes on from it.
    code, err = stopped(signal.SIGTERM, "Epoch 3/")
    assert code == 143 and "Traceback" not in err, err[-3000:]
    said = re.search(
        r"terminated \(SIGTERM\): the run did not finish; its checkpoint after "
        r"epoch (\d+) is (.+): the same command goes on from epoch (\d+) ",
        err,
    )
    assert said, err[-3000:]
    done = int(said[1])
    assert said[2] == str(out / "dense.checkpoint.keras") and int(said[3]) == done + 1
    assert sorted(p.name for p in out.iterdir()) == ["dense.checkpoint.keras"]
    # Its rerun goes on, and is stopped after its last epoch (in the test set's
    # evaluation or the figures): raised inside TensorFlow's evaluate, a SIGTERM killed
    # the process (a corrupted heap, exit 134).
    code, err = stopped(signal.SIGINT, " - loss: ", after="Epoch 20/20")
    assert code == 130 and "Traceback" not in err, err[-3000:]
    assert f"note: going on from epoch {done + 1} of 20: a run of the same" in err
    assert f"Epoch {done + 1}/20" in err and "Epoch 1/20" not in err
    assert (
        "aelib: interrupted: the run did not finish; its checkpoint after its last epoch (20) "
        "is " in err
    ), err[-3000:]
    assert not (out / "metrics.json").exists()
    # ... and its rerun trains no epoch again (it trained the last one again, and a stop
    # in a long run's figures cost all of its epochs where they were 1).
    run = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "note: a run of the same settings trained all its epochs (20)" in run.stderr
    assert "Epoch " not in run.stderr, run.stderr[-3000:]
    metrics = json.loads(run.stdout)
    assert metrics["epochs_run"] == 20 and metrics["resumed_after_epoch"] == 20
    assert not (out / "dense.checkpoint.keras").exists()
    assert len(json.loads((out / "metrics.json").read_text())["history"]["loss"]) == 20


def test_a_run_whose_loss_turns_nan_exits_1_and_writes_nulls(tmp_path, capsys):
    """What the README says of a NaN run: training stops at the end of that epoch, the
    model is saved as it was, stdout and metrics.json are JSON with nulls (json.dumps
    wrote NaN, which strict parsers refuse), and the command says why and exits 1."""
    out = tmp_path / "o"
    args = ["train", "--model", "dense", "--learning-rate", "1e30", "--epochs", "5"]
    args += ["--limit", "256", "--test-limit", "32", "--data", str(MNIST), "--out", str(out)]
    assert main(args) == 1
    captured = capsys.readouterr()
    printed = json.loads(captured.out, parse_constant=lambda c: pytest.fail(c))
    assert printed["nan"] is True and printed["train_loss"] is None
    assert printed["epochs_run"] < 5  # stopped, not run to the end
    said = f"the loss became NaN in epoch {printed['epochs_run']}, so training stopped"
    assert said in captured.err and "try a smaller --learning-rate" in captured.err
    assert "weights are in" not in captured.err  # (epoch 1: no finite epoch to keep)
    assert sorted(p.name for p in out.iterdir()) == ["dense.keras", "metrics.json"]
    record = json.loads((out / "metrics.json").read_text(), parse_constant=pytest.fail)
    assert record["metrics"] == {k: v for k, v in printed.items() if k != "model"}
    assert None in record["history"]["loss"]
    assert (out / "dense.keras").exists() and not (out / "figures").exists()
    # ... and so is the record saved in the model's file (aelib.load's .info)
    with zipfile.ZipFile(out / "dense.keras") as z:
        saved = json.loads(z.read("aelib.json"), parse_constant=pytest.fail)
    assert saved["metrics"]["nan"] is True and saved["metrics"]["train_loss"] is None


def test_a_run_that_diverges_after_a_finite_epoch_names_the_weights_it_kept(
    tmp_path, capsys, monkeypatch
):
    """A run whose weights turn NaN in the last step of epoch 2 (its loss finite, its
    validation loss not) and whose loss is NaN in epoch 3 keeps epoch 1's checkpoint as
    dense.last_finite.keras, and the message names that file and epoch."""
    import keras

    train_module = sys.modules["aelib.train"]

    class DivergeInEpoch2(train_module.StopOnNaN):  # (what a too-large step does)
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations) == 2 * steps:
                for weight in self.model.trainable_weights:
                    weight.assign(keras.ops.full(weight.shape, float("nan")))

    steps = 2  # (230 training images after val_split 0.1, in batches of 128)
    monkeypatch.setattr(train_module, "StopOnNaN", DivergeInEpoch2)
    out = tmp_path / "o"
    args = ["train", "--model", "dense", "--epochs", "5", "--limit", "256", "--test-limit"]
    args += ["32", "--batch-size", "128", "--data", str(MNIST), "--out", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err
    kept = out / "dense.last_finite.keras"
    said = "the loss became NaN in epoch 3, so training stopped (the model was saved as it "
    assert f"{said}was; epoch 1's weights are in {kept}); try a smaller" in err, err[-2000:]
    assert aelib.load(kept).info["checkpoint"]["epochs_done"] == 1


def test_a_code_of_one_value_gets_its_figure(tmp_path, capsys):
    """--set encoding_dim=1 trained, then failed in its t-SNE figure (scikit-learn's PCA
    start of one feature), and so did every rerun: its codes are drawn as they are."""
    out = tmp_path / "o"
    args = ["train", "--model", "dense", "--set", "encoding_dim=1", "--epochs", "1"]
    args += ["--limit", "256", "--test-limit", "32", "--data", str(MNIST), "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    assert {p.name for p in (out / "figures").iterdir()} == {
        "dense_learning_curves.png",
        "dense_reconstructions.png",
        "dense_codes_1d.png",
    }


def test_the_record_says_how_the_images_were_scaled(tmp_path, capsys):
    """metrics.json said "uint8 / 255 -> [0, 1]" also of a --data file of float images
    already in [0, 1], which are taken as they are."""
    (x_train, y_train), (x_test, y_test) = data_lib.load_mnist(MNIST)
    floats = tmp_path / "floats.npz"
    np.savez(
        floats,
        x_train=x_train[:256] / 255,
        y_train=y_train[:256],
        x_test=x_test[:32] / 255,
        y_test=y_test[:32],
    )
    out = tmp_path / "o"
    args = ["train", "--model", "dense", "--epochs", "1", "--limit", "256", "--no-figures"]
    assert main([*args, "--data", str(floats), "--out", str(out)]) == 0, capsys.readouterr().err
    record = json.loads((out / "metrics.json").read_text())
    assert record["data_settings"]["scaling"] == "float64 in [0, 1], as they are (not rescaled)"
    assert data_lib.describe_scaling(np.uint8) == "uint8 / 255 -> [0, 1]"  # (MNIST's, as before)


def test_the_record_names_a_relative_data_file_by_its_absolute_path(tmp_path, monkeypatch, capsys):
    """A --data file (or --images folder) given relative to the working folder was
    recorded as given in metrics.json's data_settings.source (and the model's record),
    which names no file once read from another folder."""
    (x_train, y_train), (x_test, y_test) = data_lib.load_mnist(MNIST)
    data = tmp_path / "d" / "small.npz"
    data.parent.mkdir()
    np.savez(data, x_train=x_train[:64], y_train=y_train[:64], x_test=x_test[:8], y_test=y_test[:8])
    monkeypatch.chdir(tmp_path)
    args = ["train", "--model", "dense", "--epochs", "1", "--no-figures", "--data"]
    assert main([*args, "d/small.npz", "--out", "o"]) == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert record["data_settings"]["source"] == str(data)
    assert aelib.read_info(tmp_path / "o" / "dense.keras")["data_settings"]["source"] == str(data)


def test_stdout_is_the_json_alone_also_when_keras_downloads_mnist(tmp_path, monkeypatch, capsys):
    """Without --data or $AELIB_MNIST, Keras's download prints to stdout ("Downloading
    data from ..."), which went before the JSON and broke `| jq`. (This machine is
    offline: Keras's loader is replaced by one that prints as it does.)"""
    import keras
    import numpy as np

    with np.load(MNIST) as f:
        digits = {k: f[k][:200] for k in ("x_train", "y_train", "x_test", "y_test")}

    def load_data():
        print("Downloading data from https://storage.googleapis.com/tensorflow/mnist.npz")
        return (digits["x_train"], digits["y_train"]), (digits["x_test"], digits["y_test"])

    monkeypatch.delenv("AELIB_MNIST", raising=False)
    monkeypatch.setattr(keras.datasets.mnist, "load_data", load_data)
    args = ["train", "--model", "dense", "--epochs", "1", "--no-figures"]
    assert main([*args, "--out", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["model"] == "dense"
    assert "Downloading data from" in captured.err


def test_an_output_folder_that_cannot_be_written_fails_before_training(
    tmp_path, capsys, monkeypatch
):
    """An --out (or --tensorboard) that is a file, or under one, failed after the whole
    training, with a traceback."""
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    for flag, path, message in (
        ("--out", a_file, f"--out {a_file} is a file; expected a folder"),
        ("--out", a_file / "sub", f"--out {a_file / 'sub'}: cannot write there (Not a direc"),
        ("--tensorboard", a_file, f"--tensorboard {a_file} is a file; expected a folder"),
    ):
        args = ["train", "--model", "dense", "--limit", "50", "--out", str(tmp_path / "o")]
        code = main([*args, flag, str(path)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err[-2000:]
        assert "Epoch" not in err  # before any training
    # A run that fails once its folders exist leaves none of those it made behind.
    out = tmp_path / "new" / "o"
    args = ["train", "--model", "conv", "--set", "filters=5", "--out", str(out)]
    assert main([*args, "--tensorboard", str(out / "tb")]) == 2
    assert "must be a tuple like" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [a_file]
    # Its figures folder too (a file there failed the run after training) ...
    out = tmp_path / "o"
    out.mkdir()
    (out / "figures").write_text("x")
    args = ["train", "--model", "dense", "--epochs", "2", "--limit", "64", "--test-limit", "32"]
    args += ["--data", str(MNIST), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"--out's figures folder {out / 'figures'} is a file; expected a folder" in err
    assert "Epoch" not in err
    (out / "figures").unlink()

    # ... and a run that fails after its training says that its rerun does not train again.
    from aelib import plots

    def no_room(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "tutorial_figures", no_room)
    assert main(args) == 1  # (a full disk: not a bad flag, 2)
    err = capsys.readouterr().err
    said = f"aelib: error: out of disk space writing into --out {out} ([Errno 28] No space"
    assert said in err, err[-2000:]
    assert "note: the run did not finish; its checkpoint after its last epoch (2) is" in err
    monkeypatch.undo()
    # (but not where the checkpoint itself cannot be restored: that rerun fails the same)
    import zipfile

    checkpoint = out / "dense.checkpoint.keras"
    kept = checkpoint.read_bytes()
    with zipfile.ZipFile(checkpoint) as zin:
        members = {i.filename: zin.read(i) for i in zin.infolist()}
    members["model.weights.h5"] = members["model.weights.h5"][:100]
    with zipfile.ZipFile(checkpoint, "w") as zout:
        for name, data in members.items():
            zout.writestr(name, data)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot go on from" in err and "--restart (or removing the file)" in err, err
    assert "the run did not finish" not in err
    checkpoint.write_bytes(kept)
    # (a kill -9 while a figure was saved left its temp file: an ended run removes it)
    (out / "figures").mkdir(exist_ok=True)
    (out / "figures" / ".dense_learning_curves.4194304.tmp.png").write_bytes(b"half")
    assert main([*args, "--no-figures"]) == 0
    assert "Epoch " not in capsys.readouterr().err
    assert list((out / "figures").iterdir()) == []


def test_train_on_own_image_folder(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(4):
        sub = tmp_path / "imgs" / f"d{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (56, 56), dtype=np.uint8)).save(sub / f"{i}.png")
    args = ["train", "--model", "denoise", "--epochs", "1", "--images", str(tmp_path / "imgs")]
    args += ["--image-mode", "patch", "--out", str(tmp_path / "o"), "--no-figures"]
    assert main(args) == 0  # in this process (`trained` runs `python -m aelib` itself)
    record = json.loads((tmp_path / "o" / "metrics.json").read_text())
    # a denoiser that does not denoise yet says so (it ended in silence, exit 0)
    err = capsys.readouterr().err
    said = "has not learned to denoise yet" in err
    m = record["metrics"]
    assert said == (m["psnr_gain"] <= 0 or m["test_ssim"] <= m["noisy_ssim"]), m
    assert record["data_settings"]["source"] == str(tmp_path / "imgs")
    # 16 patches: the last whole image's 4 are the test split (none of them trained on),
    # the whole images nearest a tenth, which a warning says is not one.
    assert record["metrics"]["test_images"] == 4
    assert "the test split holds 4 of the 16 patches (whole images" in err
    assert record["data_settings"]["train_images"] == 11  # 12, minus round(1.2) = 1 for val


def test_own_images_that_cannot_be_read_stop_the_run_or_are_left_out(tmp_path, capsys):
    """A corrupt file among own images stops the run before training, naming it, and
    says how to go on without it; --skip-unreadable trains on the rest and names it in a
    warning (there was no such flag: the file had to be moved)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(
            tmp_path / "imgs" / f"{i}.png"
        )
    (tmp_path / "imgs" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    args = ["train", "--model", "dense", "--epochs", "1", "--images", str(tmp_path / "imgs")]
    args += ["--out", str(tmp_path / "o"), "--no-figures"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"aelib: error: Cannot read image {tmp_path / 'imgs' / 'bad.png'}" in err, err
    assert "aelib: note: --skip-unreadable leaves such files out and trains on the rest" in err
    assert not (tmp_path / "o").exists()
    assert main([*args, "--skip-unreadable"]) == 0
    err = capsys.readouterr().err
    said = f"aelib: warning: 1 unreadable image in {tmp_path / 'imgs'} left out:\n  Cannot read"
    assert said in err, err
    record = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert record["train_config"]["skip_unreadable"] is True
    assert (
        record["data_settings"]["train_images"]
        + record["metrics"]["test_images"]
        + (record["data_settings"]["val_images"])
        == 4
    )


def test_a_denoiser_that_does_not_denoise_yet_is_told_so():
    from aelib.__main__ import _no_gain_note

    note = _no_gain_note({"psnr_gain": -0.22, "noisy_psnr": 9.38})
    assert "(test PSNR 9.16 against 9.38 dB): it has not learned to denoise yet" in note
    assert _no_gain_note({"psnr_gain": 0.0, "noisy_psnr": 9.38}) is not None
    assert "(30 epochs of all 60,000 digits" in note  # (MNIST's figure, not for own images)
    own = _no_gain_note({"psnr_gain": -1.0, "noisy_psnr": 9.0}, own_images=True)
    assert own.endswith("Train on more images or for more epochs.") and "60,000" not in own
    # A PSNR a hair above the input's while SSIM collapsed (grey smudges) is no denoiser;
    # the note names the scores that did not improve, only those.
    smudges = {"psnr_gain": 0.02, "noisy_psnr": 9.38, "test_ssim": -0.007, "noisy_ssim": 0.358}
    assert "(test SSIM -0.007 against 0.358): it has not" in _no_gain_note(smudges)
    both = {**smudges, "psnr_gain": -0.1}
    assert "(test PSNR 9.28 against 9.38 dB, SSIM -0.007 against 0.358)" in _no_gain_note(both)
    psnr = {**smudges, "psnr_gain": -0.32, "test_ssim": 0.84}
    assert "(test PSNR 9.06 against 9.38 dB): it has not" in _no_gain_note(psnr)
    learned = {"psnr_gain": 8.5, "noisy_psnr": 9.38, "test_ssim": 0.7, "noisy_ssim": 0.358}
    nan = {**smudges, "psnr_gain": float("nan"), "test_ssim": float("nan")}
    nan_gain = {**smudges, "psnr_gain": float("nan")}  # (said "PSNR nan against 9.38 dB")
    for metrics in (learned, {"psnr_gain": 8.5, "noisy_psnr": 9.38}, nan, nan_gain, {}):
        assert _no_gain_note(metrics) is None, metrics


def test_make_noisy_without_mnist_offline_is_one_line(tmp_path):
    """No --data, no $AELIB_MNIST and no network (a proxy on a closed port, an empty
    Keras cache): make_noisy says what to point at, without a traceback."""
    env = {k: v for k, v in subprocess_env().items() if k != "AELIB_MNIST"}
    closed = "http://127.0.0.1:9"
    env.update(KERAS_HOME=str(tmp_path / "keras"), HTTPS_PROXY=closed, https_proxy=closed)
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "make_noisy.py"), "--count", "3"]
        + ["--out", str(tmp_path / "noisy")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "make_noisy: error: No MNIST path given (--data PATH or $AELIB_MNIST)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "noisy").exists()


def test_make_noisy_gives_every_seed_and_chunk_its_own_noise(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(REPO / "jobs"))
    import make_noisy
    from PIL import Image

    seeds = {
        make_noisy.chunk_seed(seed, chunk) for seed in range(0, 30001, 10000) for chunk in range(4)
    }
    assert len(seeds) == 16  # (seed + 10000 * chunk had 7)
    # ... and the files written carry them: each chunk's digits have its own seed's noise
    # (chunks of 3 digits here, not 10,000).
    monkeypatch.setattr(make_noisy, "_CHUNK", 3)
    make_noisy.make_noisy(str(MNIST), 6, tmp_path / "noisy", seed=5)
    _, (x_test, y_test) = data_lib.load_mnist(MNIST)
    for chunk in (0, 1):
        index = range(3 * chunk, 3 * chunk + 3)
        noisy = data_lib.add_noise(
            data_lib.scale(x_test[index.start : index.stop]),
            0.5,
            seed=make_noisy.chunk_seed(5, chunk),
        )
        for i, expected in zip(index, np.round(noisy * 255.0).astype(np.uint8), strict=True):
            rel = make_noisy.relative_path(i, int(y_test[i]))
            with Image.open(tmp_path / "noisy" / rel) as image:
                assert np.array_equal(np.asarray(image), expected), (chunk, rel)


def test_a_data_folder_or_an_images_file_names_its_flag(tmp_path, capsys):
    """Bad flags exit 2 naming the flag: --data of a folder and --images of a file said
    only the path ("../data is a folder; expected Keras's mnist.npz file")."""
    a_file = tmp_path / "a.png"
    a_file.write_bytes(b"x")
    for flags, said in (
        (["--data", str(tmp_path)], f"--data {tmp_path} is a folder; expected Keras's mnist"),
        (["--images", str(a_file)], f"--images {a_file} is a file; expected a folder of"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["train", "--model", "dense", "--out", str(tmp_path / "out"), *flags])
        assert e.value.code == 2 and said in capsys.readouterr().err, flags
    assert not (tmp_path / "out").exists()


def test_make_noisy_counts_the_clean_references_it_writes(monkeypatch, tmp_path, capsys):
    """A rerun that adds a --clean-out to a folder of noisy digits wrote every reference
    and said {'written': 0, 'kept': N}, as if it had made nothing. A rerun with a smaller
    --count or --corrupt removes nothing and said only "kept: 4": it counts and names the
    files it did not ask for, which the denoise job takes as inputs. An emptied file of
    either folder is written again."""
    monkeypatch.syspath_prepend(str(REPO / "jobs"))
    import make_noisy

    noisy = tmp_path / "noisy"
    counts = make_noisy.make_noisy(str(MNIST), 4, noisy)
    assert counts == {"written": 4, "kept": 0, "corrupt": 0, "others": 0}
    counts = make_noisy.make_noisy(str(MNIST), 4, noisy, tmp_path / "clean")
    assert counts == {"written": 0, "kept": 4, "clean_written": 4, "corrupt": 0, "others": 0}
    assert len(list((tmp_path / "clean").rglob("*.png"))) == 4
    counts = make_noisy.make_noisy(str(MNIST), 6, noisy, tmp_path / "clean", corrupt=1)
    assert counts == {"written": 2, "kept": 4, "clean_written": 2, "corrupt": 1, "others": 0}
    assert "also holds" not in capsys.readouterr().err
    counts = make_noisy.make_noisy(str(MNIST), 4, noisy)  # (the record is hidden: not counted)
    assert counts == {"written": 0, "kept": 4, "corrupt": 0, "others": 3}
    said = f"make_noisy: note: {noisy} also holds 3 file(s) this run did not ask for (e.g. "
    assert said in capsys.readouterr().err
    assert len([p for p in noisy.rglob("*") if p.is_file() and p.name[0] != "."]) == 7
    # An emptied file (a full disk, `: > file`) is written again, a clean reference too
    # (it was kept: the denoise job scored against a broken reference).
    emptied = [folder / make_noisy.relative_path(2, 1) for folder in (noisy, tmp_path / "clean")]
    emptied.append(noisy / "broken" / "truncated_0.png")  # (of the earlier --corrupt 1)
    before = [path.read_bytes() for path in emptied]
    for path in emptied:
        path.write_bytes(b"")
    counts = make_noisy.make_noisy(str(MNIST), 4, noisy, tmp_path / "clean", corrupt=1)
    assert counts == {"written": 1, "kept": 3, "clean_written": 1, "corrupt": 1, "others": 2}
    assert [path.read_bytes() for path in emptied] == before


def test_make_noisy_takes_what_load_mnist_takes(monkeypatch, tmp_path, capsys):
    """A file of fewer test digits than MNIST's 10,000 (IndexError past its end), of float
    digits in [0, 1] or of 8-bit values in int64, which load_mnist reads (Pillow failed
    on them: "Invalid mode for data type", after the record and the first files were
    written), makes what the same 8-bit digits make."""
    monkeypatch.syspath_prepend(str(REPO / "jobs"))
    import make_noisy

    (x_train, y_train), (x_test, y_test) = data_lib.load_mnist(MNIST)
    made = {}
    for kind, digits in (
        ("uint8", x_test[:7]),
        ("float32", x_test[:7].astype(np.float32) / 255),
        ("int64", x_test[:7].astype(np.int64)),
    ):
        data = tmp_path / f"{kind}.npz"
        np.savez(data, x_train=x_train[:9], y_train=y_train[:9], x_test=digits, y_test=y_test[:7])
        out, clean = tmp_path / kind / "noisy", tmp_path / kind / "clean"
        args = ["--data", str(data), "--count", "16", "--out", str(out), "--clean-out", str(clean)]
        assert make_noisy.main([*args, "--corrupt", "3"]) == 0, capsys.readouterr().err
        made[kind] = {
            p.relative_to(tmp_path / kind).as_posix(): p.read_bytes()
            for p in (tmp_path / kind).rglob("*")
            if p.is_file() and p.suffix == ".png" and "broken" not in p.parts
        }
        assert len(made[kind]) == 32 and len(list((out / "broken").iterdir())) == 3
        for i in (3, 10):  # (digit 3 and, past the file's 7, digit 3 again)
            rel = make_noisy.relative_path(i, int(y_test[3]))
            assert np.array_equal(np.asarray(Image.open(clean / rel)), x_test[3])
    assert made["float32"] == made["uint8"] == made["int64"]


def test_make_noisy_on_a_full_disk_names_the_file_and_its_rerun_goes_on(
    monkeypatch, tmp_path, capsys
):
    """A disk that fills up (a 300 KiB tmpfs: root only, skipped elsewhere) said "[Errno
    28] No space left on device" without a file or folder; the rerun, once there is
    room, adds the rest."""
    monkeypatch.syspath_prepend(str(REPO / "jobs"))
    import make_noisy

    with small_disk(tmp_path / "full", "300k") as full:
        args = ["--data", str(MNIST), "--count", "1500", "--out", str(full / "noisy")]
        args += ["--clean-out", str(full / "clean")]
        assert make_noisy.main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        said = rf"make_noisy: error: out of disk space writing {full}/(noisy|clean)/\d/\d+\.png"
        assert len(err) == 1 and re.match(said, err[0]), err
        assert "run the same command again: it keeps the files written" in err[0]
        room(full, "40M")
        assert make_noisy.main(args) == 0
        assert len(list((full / "noisy").rglob("*.png"))) == 1500


def test_make_noisy_on_another_write_error_names_the_file(monkeypatch, tmp_path, capsys):
    """An OSError other than a full disk (an I/O error here) names the file it could not
    write, in the line it had before the full disk's got its own ("...: a rerun: it keeps
    the files written" read badly), and exits 1."""
    monkeypatch.syspath_prepend(str(REPO / "jobs"))
    import make_noisy

    def broken(self, data):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Path, "write_bytes", broken)
    args = ["--data", str(MNIST), "--count", "20", "--out", str(tmp_path / "noisy")]
    assert make_noisy.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    said = rf"make_noisy: error: \[Errno 5\] Input/output error: '{tmp_path}/noisy/\S+' "
    assert len(err) == 1 and re.match(said + r"\(a rerun keeps the files written\)$", err[0]), err


def test_make_noisy_refuses_folders_it_would_get_wrong(tmp_path):
    """Each exits 2 with one line naming the flag, and leaves nothing: --out and
    --clean-out the same or nested (the clean files were skipped, the noisy ones being
    at their paths, and denoise --clean then scored each input against itself), a path
    under a file (a traceback, a file left behind). A rerun with other settings is
    refused (it kept the old digits and said `written: 0`); the same settings resume."""

    def make(*flags, env=None):
        cmd = [sys.executable, str(REPO / "jobs" / "make_noisy.py"), "--data", str(MNIST)]
        return subprocess.run(
            [*cmd, "--count", "6", *map(str, flags)],
            env=env or subprocess_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    nowhere = tmp_path / "a-link"
    nowhere.symlink_to(tmp_path / "gone")
    for flags, said in (
        (["--out", tmp_path / "same", "--clean-out", tmp_path / "same"], "overlap"),
        # (it said "cannot create it (File exists)")
        (["--out", nowhere / "n"], f"{nowhere} is a link to {tmp_path / 'gone'}, which does not"),
        (["--out", tmp_path / "c" / "n", "--clean-out", tmp_path / "c"], "overlap"),
        (["--out", a_file / "n"], f"--out {a_file / 'n'}: {a_file} is a file"),
        (["--out", tmp_path / "n2", "--clean-out", a_file], "--clean-out"),
        # (an empty one wrote into the current folder, or was taken as not given)
        (["--out", ""], "--out is empty: expected a folder."),
        (["--out", tmp_path / "n5", "--clean-out", ""], "--clean-out is empty"),
        (["--out", tmp_path / "n6", "--data", ""], "--data is empty: expected the path of"),
        # a folder even root cannot write to (a traceback, after --out recorded its settings)
        (
            ["--out", tmp_path / "n4" / "n", "--clean-out", "/proc/self"],
            "--clean-out /proc/self: cannot write there",
        ),
    ):
        proc = make(*flags)
        assert proc.returncode == 2 and said in proc.stderr, (flags, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-link"]
    # a run refused for its settings records nothing that would refuse the right ones
    assert make("--out", tmp_path / "n3", "--noise-factor", "1.5").returncode == 2
    assert make("--out", tmp_path / "n3", "--clean-out", tmp_path / "c3").returncode == 0

    noisy, clean = tmp_path / "noisy", tmp_path / "clean"
    assert make("--out", noisy, "--clean-out", clean, "--corrupt", "3").returncode == 0
    first = {p: p.read_bytes() for p in noisy.rglob("*.png")}
    broken = {p: p.stat().st_mtime_ns for p in (noisy / "broken").iterdir()}
    assert len(first) == 6 + 2 and len(broken) == 3 and len(list(clean.rglob("*.png"))) == 6
    proc = make("--out", noisy, "--clean-out", clean, "--noise-factor", "0.1")
    assert proc.returncode == 2, proc.stderr[-2000:]
    said = f"--out {noisy} holds digits made with other settings: noise_factor 0.5 (now 0.1)"
    assert said in proc.stderr, proc.stderr[-2000:]
    assert {p: p.read_bytes() for p in noisy.rglob("*.png")} == first
    # Each folder's kind of digits: noisy ones taken as the clean references were kept,
    # and denoise scored its outputs against the noisy inputs. Refused, leaving nothing.
    for flags, said in (
        (
            ["--out", tmp_path / "n6" / "n", "--clean-out", noisy],
            f"--clean-out {noisy} holds noisy",
        ),
        (["--out", clean], f"--out {clean} holds clean references (an earlier run's --clean-out)"),
    ):
        proc = make(*flags)
        assert proc.returncode == 2 and said in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "n6").exists()
    # A folder of PNGs from elsewhere is taken with a note, and recorded: a rerun with
    # other settings is refused there too (it kept the first run's digits, with a note).
    (tmp_path / "lg" / "5").mkdir(parents=True)
    (tmp_path / "lg" / "5" / "x.png").write_bytes(next(iter(first.values())))
    proc = make("--out", tmp_path / "lg", "--seed", "5")
    assert proc.returncode == 0 and "holds PNGs with no record" in proc.stderr, proc.stderr
    proc = make("--out", tmp_path / "lg", "--seed", "7")
    assert proc.returncode == 2 and "seed 5 (now 7)" in proc.stderr, proc.stderr[-2000:]
    # A folder of its digits with no record (made before the record): taken, and recorded,
    # where its first digit is what these settings write there; refused where it is not
    # (other settings, or noisy digits given as the clean ones).
    import shutil

    for name in ("old", "older"):
        shutil.copytree(noisy, tmp_path / name)
        (tmp_path / name / ".make_noisy.json").unlink()
    proc = make("--out", tmp_path / "old")
    assert proc.returncode == 0 and "its first digit is what these settings make" in proc.stderr
    assert (tmp_path / "old" / ".make_noisy.json").read_text() == (
        noisy / ".make_noisy.json"
    ).read_text()
    for flags in (
        ["--out", tmp_path / "older", "--seed", "3"],
        ["--out", tmp_path / "n7", "--clean-out", tmp_path / "older"],
    ):
        proc = make(*flags)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "is not what these settings write there" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "older" / ".make_noisy.json").exists() and not (tmp_path / "n7").exists()
    # --out=~/x: the shell leaves that ~ to the program (a folder named "~" was made)
    home = tmp_path / "home"
    proc = make("--out=~/t", env={**subprocess_env(), "HOME": str(home)})
    assert proc.returncode == 0 and f"in {home / 't'}" in proc.stdout, proc.stderr[-2000:]
    assert len(list((home / "t").rglob("*.png"))) == 6 and not (Path.cwd() / "~").exists()
    # The truncated file is a digit's PNG cut in its pixels: it opens, then fails to load.
    from PIL import Image

    with Image.open(noisy / "broken" / "truncated_0.png") as cut:
        assert cut.size == (28, 28)
        with pytest.raises(OSError, match="truncated"):
            cut.load()
    # A kill -9 leaves its temp file (.STEM.PID.tmp.png): a rerun removes those of runs gone.
    stale = [noisy / "7" / ".000000.4194304.tmp.png", noisy / "..make_noisy.4194304.tmp.json"]
    stale += [noisy / "broken" / ".notes_0.4194304.tmp.txt", clean / ".000001.4194304.tmp"]
    live = clean / f".000001.{os.getpid()}.tmp.png"
    other = [noisy / "7" / ".x.20241205120000.tmp"]  # (another tool's: no PID, kept)
    # the user's own hidden files of that shape, which no run of make_noisy writes: kept
    other += [noisy / ".keepme.123.tmp.txt", clean / "7" / ".mynotes.4000001.tmp.txt"]
    for path in [*stale, live, *other]:
        path.write_bytes(b"")
    proc = make("--out", noisy, "--clean-out", clean, "--corrupt", "3")
    assert proc.returncode == 0 and "'written': 0, 'kept': 6" in proc.stdout, proc.stderr
    assert not any(p.exists() for p in stale) and all(p.exists() for p in [live, *other])
    for path in [live, *other]:
        path.unlink()
    # the broken files too (written again, a denoise rerun retried them as changed inputs)
    assert {p: p.stat().st_mtime_ns for p in (noisy / "broken").iterdir()} == broken
    # SIGTERM (and Ctrl-C) end it with a line, not in silence (or Pillow's traceback).
    cmd = [sys.executable, str(REPO / "jobs" / "make_noisy.py"), "--data", str(MNIST)]
    cmd += ["--count", "100000", "--out", str(tmp_path / "big")]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list((tmp_path / "big").rglob("*.png")) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 143, err[-2000:]
    assert "make_noisy: terminated (SIGTERM): a rerun keeps the files written" in err
    (clean / ".make_noisy.json").write_text("{bad")
    proc = make("--out", noisy, "--clean-out", clean)
    assert proc.returncode == 2, proc.stderr
    assert f"{clean / '.make_noisy.json'} is not a make_noisy record" in proc.stderr
    # A record that is a folder (its write failed naming a temp file, exit 1), and a
    # folder with no record whose first digit cannot be read (Pillow's words, exit 1).
    (clean / ".make_noisy.json").unlink()
    (clean / ".make_noisy.json").mkdir()
    proc = make("--out", noisy, "--clean-out", clean)
    assert proc.returncode == 2, proc.stderr
    assert f"{clean / '.make_noisy.json'} is not a make_noisy record (not a file)" in proc.stderr
    (tmp_path / "junk" / "7").mkdir(parents=True)
    (tmp_path / "junk" / "7" / "000000.png").write_text("junk")
    proc = make("--out", tmp_path / "junk")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    said = f"--out {tmp_path / 'junk'} holds digits with no record of what made them, and its "
    assert said + "7/000000.png cannot be read (cannot identify image file" in proc.stderr


_SIGTERM_IN_RAY_INIT = """
import importlib.util, logging, os, signal, sys, time, types
import ray._private.utils as ray_utils
spec = importlib.util.spec_from_file_location("job", sys.argv[1])
job = sys.modules["job"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(job)
stops = getattr(job, sys.argv[2])
try:
    with job._sigterm_in_ray_init():
        ray_utils.set_sigterm_handler(lambda s, f: sys.exit(s))  # (what ray.init does first)
        print("during", signal.getsignal(signal.SIGTERM).__name__)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)  # (the handler runs at the next bytecode)
        print("not raised")
except KeyboardInterrupt:
    print("raised", [int(s) for s in stops])
print("after", signal.getsignal(signal.SIGTERM).__name__, ray_utils.set_sigterm_handler.__name__)
stops.clear()
# One that lands in logging (its at-fork hook, which drops the exception and keeps its
# lock: the job hung) is recorded there and raised a moment later, out of logging.
in_logging = types.SimpleNamespace(f_code=types.SimpleNamespace(co_filename=logging.__file__))
try:
    with job._sigterm_in_ray_init():
        job._on_sigterm_in_ray_init(signal.SIGTERM, in_logging)
        print("recorded", [int(s) for s in stops])
        time.sleep(2)
        print("not raised")
except KeyboardInterrupt:
    print("raised", [int(s) for s in stops])
# ... unless ray.init has returned by then: the stop recorded is acted on, and the signal
# sent again broke into the job's shutdown.
stops.clear()
try:
    with job._sigterm_in_ray_init():
        job._on_sigterm_in_ray_init(signal.SIGTERM, in_logging)
except KeyboardInterrupt:
    print("raised at the end", [int(s) for s in stops])
try:
    time.sleep(0.5)
    print("not sent again")
except KeyboardInterrupt:
    print("sent again")
"""


@pytest.mark.parametrize("job, stops", [("denoise", "_STOPS"), ("sweep", "_TERMINATED")])
def test_a_sigterm_in_ray_init_is_not_lost_in_logging(job, stops):
    """Ray's handlers, which ray.init set first thing, raised SystemExit wherever the
    driver was: in logging's at-fork hook (ray.init forks Ray's processes) Python dropped
    it with logging's lock held, and the denoise job hung for good holding DST's lock
    (once in ~20 SIGTERMs, a reviewer's). In ray.init the job's own handler takes the
    Ctrl-C path, and where the signal lands in logging, a moment later."""
    proc = subprocess.run(
        [sys.executable, "-c", _SIGTERM_IN_RAY_INIT, str(REPO / "jobs" / f"{job}.py"), stops],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    handler = "_on_stop" if job == "denoise" else "_on_sigterm"
    assert proc.stdout.splitlines() == [
        "during _on_sigterm_in_ray_init",
        "raised [15]",
        f"after {handler} set_sigterm_handler",
        "recorded [15]",
        "raised [15]",
        *(["raised at the end [15]"] if job == "sweep" else []),
        "not sent again",
    ]
