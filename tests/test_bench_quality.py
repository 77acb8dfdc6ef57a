"""Quick mode of jobs/bench_quality.py: 1 epoch on a small subset writes every field."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MNIST = os.environ.get("AELIB_MNIST", "/work/shared/data/mnist.npz")

pytestmark = pytest.mark.skipif(not Path(MNIST).is_file(), reason=f"no MNIST at {MNIST}")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "jobs/bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_quick_mode_writes_results(tmp_path, capsys):
    bench = _bench()
    argv = [
        "--quick",
        "--models",
        "classical,denoise,dense",
        "--denoisers",
        "median_3x3,gaussian,wavelet",
        "--data",
        MNIST,
        "--out",
        str(tmp_path),
        "--verbose",
        "0",
        "--no-figures",
    ]
    assert bench.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    assert set(rows) == {"classical", "denoise", "dense"}
    for name in ("denoise", "dense"):
        r = rows[name]
        assert r["epochs_run"] == 1 and r["tutorial_epochs"] > 1
        assert r["is_tutorial_setting"] is False
        assert r["train_images"] == bench.QUICK["limit"]
        for key in ("test_loss", "test_bce", "test_psnr", "test_ssim", "seconds_per_epoch"):
            assert isinstance(r["metrics"][key], float)
        assert r["command"].startswith("python jobs/bench_quality.py --models " + name)
        assert "--quick" in r["command"]
        assert r["machine"]["backend"] and r["machine_line"]
        assert re.fullmatch(r"[0-9a-f]{7,}(\+changes)?", r["code"]), r["code"]
    assert rows["dense"]["tutorial"]["reported_test_loss"] == 0.09
    assert "code_mean" in rows["dense"]["metrics"]
    assert {"noisy_psnr", "psnr_gain"} <= set(rows["denoise"]["metrics"])
    assert rows["denoise"]["subset"]["images"] == bench.QUICK["slow_limit"]
    den = rows["classical"]["denoisers"]
    assert list(den) == ["noisy", "median_3x3", "gaussian", "wavelet"]
    assert den["gaussian"]["param"] == "sigma"
    assert den["gaussian"]["value"] in [g["value"] for g in den["gaussian"]["tuning"]["grid"]]
    # The noisy baseline is the same noisy test set aelib scores the model on.
    assert den["noisy"]["psnr"] == pytest.approx(rows["denoise"]["metrics"]["noisy_psnr"])
    assert den["median_3x3"]["psnr"] > den["noisy"]["psnr"]
    md = (tmp_path / "results.md").read_text()
    assert "| dense | 1 (50) |" in md and "median_3x3" in md
    dense = next(line for line in md.splitlines() if line.startswith("| dense | "))
    assert f"| {rows['dense']['finished'][:10]} ({rows['dense']['code']}) |" in dense
    for png in ("test_loss.png", "denoise_psnr_ssim.png", "denoise_samples.png"):
        assert (tmp_path / png).stat().st_size > 0

    # A rerun with the same settings resumes: nothing is retrained.
    capsys.readouterr()
    assert bench.main(argv) == 0
    assert capsys.readouterr().out.count("skipped") == 3
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == rows

    # A row's samples missing (that row made on another machine): the samples chart is kept,
    # not drawn again without it (denoise_plus4 alone, trained again, redrew it with 3 rows).
    chart = (tmp_path / "denoise_samples.png").read_bytes()
    (tmp_path / "runs" / "samples" / "median_3x3.npy").unlink()
    note = "denoise_samples.png not drawn again: no samples of median_3x3 in"
    assert bench.main(argv) == 0
    assert capsys.readouterr().out.count(note) == 1
    assert (tmp_path / "denoise_samples.png").read_bytes() == chart
    # ... and so with a row trained again: the charts are drawn once, after it.
    dense_again = [*argv, "--force"]
    dense_again[dense_again.index("--models") + 1] = "dense"
    assert bench.main(dense_again) == 0
    assert capsys.readouterr().out.count(note) == 1
    assert (tmp_path / "denoise_samples.png").read_bytes() == chart


def test_parse_options():
    bench = _bench()
    assert bench.parse_options("filters=64,convs_per_stage=2, learning_rate=2e-3") == {
        "filters": 64,
        "convs_per_stage": 2,
        "learning_rate": 0.002,
    }
    assert bench.parse_options("") == {}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        bench.parse_options("filters")


def test_rows_saved_under_an_older_tutorial_default_are_reported_and_resumed_right(
    tmp_path, capsys
):
    """A denoise row saved when the tutorial default was 30 epochs (its settings' epochs
    None, its command without --epochs, as the committed rows were up to 2026-12-07),
    then aelib's default became 100: the report says "30 (100)" and gives a command with
    `--epochs 30`, that command skips the row, and the plain one (100 epochs now) does
    not. The tutorial's figures come from aelib.tutorial, so the sparse loss added later
    shows."""
    bench = _bench()
    results = json.loads((ROOT / "jobs/results/results.json").read_text())
    row = results["rows"]["denoise"]
    assert row["epochs"] == 30
    row["settings"]["epochs"] = None  # (the row as saved before epochs were resolved)
    row["command"] = row["command"].replace(" --epochs 30", "")
    (tmp_path / "results.json").write_text(json.dumps(results))
    saved = results["rows"]

    assert bench.main(["--report", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "results.md").read_text()
    denoise = next(line for line in md.splitlines() if line.startswith("| denoise | "))
    assert denoise.startswith("| denoise | 30 (100) |")
    assert "--models denoise --epochs 30 " in denoise
    sparse = next(line for line in md.splitlines() if line.startswith("| sparse | "))
    code_mean = saved["sparse"]["metrics"]["code_mean"]  # (the row's own, as it was run)
    assert f"| 0.100 | {code_mean:.2f} (3.33) |" in sparse and "--epochs" not in sparse
    assert "| dense | 50 (50) |" in md

    capsys.readouterr()
    argv = ["--models", "denoise", "--data", MNIST, "--out", str(tmp_path)]
    assert bench.main([*argv[:2], "--epochs", "30", *argv[2:]]) == 0
    assert "[denoise] already in" in capsys.readouterr().out
    plain = bench.build_parser().parse_args(argv)
    assert bench.settings_key(plain, "denoise")["epochs"] == 100
    assert not bench.same_settings(saved["denoise"], bench.settings_key(plain, "denoise"))
    assert bench.same_settings(saved["dense"], bench.settings_key(plain, "dense"))


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--denoisers", "bogus"], ["--denoisers bogus", "expected a comma list of", "nl_means"]),
        (["--denoisers", "gaussian,median"], ["--denoisers gaussian,median", "median_3x3"]),
        (["--denoise-config", "filters"], ["--denoise-config filters", "KEY=VALUE"]),
    ],
)
def test_bad_denoisers_or_denoise_config_is_a_usage_error(flags, words, tmp_path, capsys):
    # (before: an unknown denoiser was left out without a word, the row written without
    # it; a config without '=' was a ValueError traceback after the training data loaded)
    argv = ["--quick", "--models", "classical,denoise_plus", "--out", str(tmp_path), *flags]
    with pytest.raises(SystemExit) as exit_:
        _bench().main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err
    assert not (tmp_path / "results.json").exists()


def test_the_denoisers_flag_knows_every_classical_method():
    bench = _bench()
    assert set(bench.classical_methods()) - {"bm3d"} == set(bench.CLASSICAL) - {"bm3d"}
