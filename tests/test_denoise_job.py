"""jobs/denoise.py end to end: real files, a real model, a real local Ray.

Each job run is the real command line in a subprocess: with RAY_ADDRESS=local (a
Ray of its own, never someone else's cluster on this machine) where the test is
about that Ray (the first run, the crash, JAX-only workers), and otherwise with the
address of `shared_ray` (conftest.py), a head the tests start for themselves.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.parse
import zipfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import (
    GcsServer,
    kill_ray,
    ray_left,
    ray_pids,
    room,
    signal_when,
    small_disk,
    start_logged,
    wait_for,
    wait_no_ray,
    without_tensorflow,
)

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "denoise.py"
MNIST = Path(os.environ.get("AELIB_MNIST", ROOT.parent / "shared" / "data" / "mnist.npz"))
if not MNIST.is_file():
    MNIST = Path("/work/shared/data/mnist.npz")

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not MNIST.is_file(), reason=f"MNIST not found at {MNIST}"),
]

sys.path.insert(0, str(ROOT / "jobs"))
import bench_s3  # noqa: E402
import denoise as job  # noqa: E402
import make_noisy  # noqa: E402

N_DIGITS = 40


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["RAY_ADDRESS"] = "local"  # never attach to a cluster another engineer started
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(autouse=True)
def _pillow_guard_restored(monkeypatch):
    """A Denoiser built in this process loosens Pillow's module-wide pixel guard as an
    actor does (allow_pixels): each test gets it back as it was."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


def run_job(*args: str, timeout: int = 900, ray: dict | None = None) -> subprocess.CompletedProcess:
    """The job's command line, on a Ray of its own (RAY_ADDRESS=local, as the README
    runs it) or, given `ray=shared_ray`, on that head. A Ray of its own keeps its
    session under a RAY_TMPDIR of the run's, removed after it (in Ray's /tmp/ray, the
    suite left ~50 sessions of logs a run, and two test files at once shared it)."""
    cmd = [sys.executable, str(JOB), *map(str, args)]
    if ray is not None:
        env = {**_env(), **ray}
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: unix socket paths
    env = {**_env(), "RAY_TMPDIR": str(ray_tmp)}
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    finally:
        kill_ray(ray_tmp)


def manifest(dst: Path) -> dict[str, dict]:
    rows = pq.read_table(dst / "manifest.parquet").to_pylist()
    return {row["path"]: row for row in rows}


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """A denoise model trained just enough to beat the noisy input on PSNR."""
    import aelib

    out = tmp_path_factory.mktemp("model")
    config = aelib.TrainConfig(
        model="denoise",
        epochs=1,
        limit=3000,
        batch_size=64,
        learning_rate=3e-3,
        test_limit=100,
        metrics_limit=100,
        data=str(MNIST),
    )
    aelib.train(config, out_dir=out, figures=False, verbose=0)
    return out / "denoise.keras"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    """Noisy digits in ten nested folders, clean references, odd sizes, RGB, junk."""
    root = tmp_path_factory.mktemp("data")
    src, clean = root / "noisy", root / "clean"
    make_noisy.make_noisy(str(MNIST), N_DIGITS, src, clean, corrupt=3)
    rng = np.random.default_rng(1)
    odd = (rng.random((30, 45)) * 255).astype(np.uint8)  # not a multiple of 4
    (src / "sizes" / "deep").mkdir(parents=True)
    (src / "sizes" / "odd.png").write_bytes(png(odd))
    (src / "sizes" / "deep" / "big.png").write_bytes(png(np.tile(odd, (2, 2))))  # 60x90
    rgb = (rng.random((21, 33, 3)) * 255).astype(np.uint8)
    (src / "sizes" / "color.png").write_bytes(png(rgb))
    (src / ".DS_Store").write_bytes(b"Bud1")  # hidden: not inputs, not failures
    (src / "sizes" / ".odd.png.swp").write_bytes(b"swap")
    (src / "sizes" / "._odd.png").write_bytes(b"\x00\x05\x16\x07")  # (macOS's AppleDouble)
    (src / "sizes" / ".odd-backup.png").write_bytes(png(odd))  # a hidden image
    return {"src": src, "clean": clean, "root": root}


@pytest.fixture(scope="module")
def first_run(model_path, dataset):
    dst = dataset["root"] / "out"
    result = run_job(
        "--model", model_path, "--input", dataset["src"], "--output", dst,
        "--clean", dataset["clean"], "--batch-size", 16,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return dst, result


def test_every_valid_image_is_denoised_at_its_relative_path(first_run, dataset):
    dst, result = first_run
    inputs = sorted(
        p.relative_to(dataset["src"]).as_posix()
        for p in dataset["src"].rglob("*")
        if p.is_file() and not p.name.startswith(".")
    )
    rows = manifest(dst)
    assert sorted(rows) == inputs  # one row per input file, nothing lost or invented
    ok = [p for p, r in rows.items() if r["status"] == "ok"]
    assert len(ok) == N_DIGITS + 3
    for rel in ok:
        assert rows[rel]["output"] == rel
        with Image.open(dst / rel) as out, Image.open(dataset["src"] / rel) as inp:
            assert out.size == inp.size and out.mode == inp.mode  # same size, 8-bit kept
    assert "0 skipped" in result.stdout and f"{N_DIGITS + 3} ok, 3 failed" in result.stdout
    # of the hidden files, the note counts the image (.DS_Store, a swap file, an AppleDouble
    # ._x.png and make_noisy's record went into it on every run over make_noisy's folder)
    assert "note: 1 hidden image file under" in result.stderr, result.stderr[-3000:]
    assert not list(dst.rglob("*.denoise-tmp"))  # no temp file left behind


def test_summary_splits_start_up_from_the_run(first_run):
    _, result = first_run
    line = next(x for x in result.stdout.splitlines() if x.startswith("denoise-summary "))
    summary = json.loads(line.removeprefix("denoise-summary "))
    assert summary["ok"] == N_DIGITS + 3 and summary["failed"] == 3
    # Ray first, then the first block back, all within the run's time
    assert 0 < summary["ray_ready_s"] <= summary["first_result_s"] <= summary["seconds"]
    assert f"first results after {summary['first_result_s']:.1f} s" in result.stdout
    # --batch-size 16, but blocks small enough for every actor to get two
    plan = re.search(
        r"(\d+) files to do on (\d+) worker.*blocks of up to (\d+) files", result.stdout
    )
    files, workers, block = map(int, plan.groups())
    assert block == min(16, -(-files // (2 * workers)))


def test_corrupt_and_non_image_files_fail_with_a_reason(first_run):
    dst, _ = first_run
    rows = manifest(dst)
    failed = {p: r for p, r in rows.items() if r["status"] == "failed"}
    assert sorted(failed) == [
        "broken/garbage_1.png",
        "broken/notes_2.txt",
        "broken/truncated_0.png",
    ]
    for path, row in failed.items():
        assert "not a readable image" in row["error"], row
        assert row["output"] is None and not (dst / path).exists()


def test_mixed_sizes_and_rgb_keep_shape_and_values_change(first_run, dataset):
    dst, _ = first_run
    rows = manifest(dst)
    assert (rows["sizes/odd.png"]["width"], rows["sizes/odd.png"]["height"]) == (45, 30)
    assert rows["sizes/deep/big.png"]["width"] == 90
    assert rows["sizes/color.png"]["channels"] == 3
    color_in = np.asarray(Image.open(dataset["src"] / "sizes" / "color.png"))
    color_out = np.asarray(Image.open(dst / "sizes" / "color.png"))
    assert color_out.shape == color_in.shape == (21, 33, 3) and color_out.dtype == np.uint8
    assert not np.array_equal(color_in, color_out)  # the model did something


def test_psnr_rises_against_clean_references(first_run):
    dst, result = first_run
    digits = [r for p, r in manifest(dst).items() if p[0].isdigit() and r["status"] == "ok"]
    assert len(digits) == N_DIGITS
    noisy = np.mean([r["psnr_noisy"] for r in digits])
    denoised = np.mean([r["psnr"] for r in digits])
    assert denoised > noisy + 2.0, (noisy, denoised)
    assert np.mean([r["ssim"] for r in digits]) > np.mean([r["ssim_noisy"] for r in digits])
    assert "mean PSNR" in result.stdout
    # images without a clean reference are still denoised, with a note instead of metrics
    odd = manifest(dst)["sizes/odd.png"]
    assert odd["status"] == "ok" and odd["psnr"] is None
    assert "no metrics: no clean reference sizes/odd.png in --clean" in odd["error"]


def test_manifest_records_node_and_device(first_run):
    dst, _ = first_run
    rows = [r for r in manifest(dst).values() if r["status"] == "ok"]
    assert {r["device"] for r in rows} == {"CPU"}
    assert all(r["node"] and len(r["node"]) > 20 for r in rows)
    meta = pq.read_schema(dst / "manifest.parquet").metadata
    assert meta[b"model_name"] == b"denoise"


def test_rerun_skips_everything_without_starting_ray(first_run, model_path, dataset):
    dst, _ = first_run
    before = {p.relative_to(dst): p.stat().st_mtime_ns for p in dst.rglob("*.png")}
    args = ["--model", model_path, "--input", dataset["src"], "--output", dst]
    start = time.perf_counter()
    result = run_job(*args, "--max-failed", 3)  # (the 3 broken files: not more)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    rows = manifest(dst)
    statuses = {r["status"] for p, r in rows.items() if not p.startswith("broken/")}
    assert statuses == {"skipped"}
    # the corrupt files keep their reason instead of being retried
    assert all(rows[p]["error"].startswith("(earlier run)") for p in rows if "broken" in p)
    # carried over from the first run
    assert rows["sizes/odd.png"]["width"] == 45
    assert "Started a local Ray" not in result.stdout + result.stderr
    after = {p.relative_to(dst): p.stat().st_mtime_ns for p in dst.rglob("*.png")}
    assert after == before  # nothing rewritten
    print(f"rerun of {len(rows)} inputs: {seconds:.1f} s")
    # A pipeline that wants no failures is told with the exit status, once all is done;
    # --retry-failed tries the broken files again (they fail again, from this run).
    strict = run_job(*args, "--max-failed", 2, "--retry-failed")
    assert strict.returncode == 3, strict.stderr[-3000:]
    said = f"denoise: error: 3 of the {len(rows)} inputs failed, more than --max-failed 2; "
    assert said + "the manifest's error column has each reason" in strict.stderr
    assert f"{len(rows) - 3} skipped" in strict.stdout
    again = manifest(dst)
    assert {p: r["status"] for p, r in again.items()} == {p: r["status"] for p, r in rows.items()}
    retried = [again[p]["error"] for p in again if "broken" in p]
    assert len(retried) == 3 and not any(e.startswith("(earlier run)") for e in retried)


def test_the_exit_status_says_when_every_input_failed(capsys):
    """Failures are rows and the job exits 0, but not when nothing was done at all (a
    wrong --input, a folder of another format): then a pipeline sees 3."""
    every = {"inputs": 4, "ok": 0, "skipped": 0, "failed": 4}
    assert job._failures_status(every, None) == 3
    assert "denoise: error: every input failed (4); the manifest's" in capsys.readouterr().err
    assert job._failures_status(every, 4) == 0  # (told how many may fail)
    some = {"inputs": 4, "ok": 1, "skipped": 0, "failed": 3}
    assert job._failures_status(some, None) == 0 and capsys.readouterr().err == ""
    assert job._failures_status({"inputs": 2, "ok": 0, "skipped": 2, "failed": 0}, 0) == 0


def test_reruns_that_cannot_trust_what_is_in_dst_say_so(
    first_run, model_path, dataset, tmp_path, shared_ray
):
    """A rerun against other --clean references does not carry the PSNR/SSIM measured
    against the first ones, and says so; a DST that already holds the inputs' outputs
    with no record of this job (here a copy of the input) gets a warning, and a file cut
    short in it is not overwritten."""
    dst, _ = first_run
    copy, refs = tmp_path / "copy", tmp_path / "refs"
    shutil.copytree(dst, copy)
    shutil.copytree(dataset["clean"], refs)
    args = ["--model", model_path, "--input", dataset["src"], "--output", copy]
    assert job._place("s3://KEY:SECRET@b/refs/?region=x") == job._place("s3://b/refs")
    assert job._place("refs/") == job._place(os.path.abspath("refs"))
    result = run_job(*args, "--clean", f"{dataset['clean']}/")  # the same references: carried
    assert result.returncode == 0, result.stderr[-3000:]
    assert "with a --clean reference: mean PSNR" in result.stdout
    measured = sum(r["psnr"] is not None for r in manifest(copy).values())
    assert measured == N_DIGITS
    result = run_job(*args)  # (carried too, and said whose: it read as this run's --clean)
    assert result.returncode == 0, result.stderr[-3000:]
    said = f"with a --clean reference (an earlier run's --clean: {dataset['clean']}): mean PSNR"
    assert said in result.stdout, result.stdout[-2000:]
    result = run_job(*args, "--clean", refs)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"holds a run measured against another --clean ({dataset['clean']})" in result.stderr
    rows = manifest(copy)
    assert all(r["psnr"] is None and r["psnr_noisy"] is None for r in rows.values())
    done = sum(r["status"] != "failed" for r in rows.values())
    assert f"{done} of the {done} outputs have no PSNR/SSIM against --clean" in result.stderr
    assert f"({done} of them skipped: an earlier run wrote them and measured none" in result.stderr
    assert "mean PSNR" not in result.stdout

    foreign = tmp_path / "foreign"
    shutil.copytree(dataset["src"], foreign)
    # A file cut short at an output path is not one of this job's (it renames each output
    # into place whole): not overwritten either, its input fails, also on reruns.
    theirs = "1/000002.png"
    (foreign / theirs).write_bytes(b"\x89PNG\r\n\x1a\n their half-copied file")
    refs = ["--model", model_path, "--input", dataset["src"], "--output", foreign]
    result = run_job(*refs)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = manifest(foreign)
    skipped = sum(r["status"] == "skipped" for r in rows.values())
    assert skipped > N_DIGITS
    assert f"warning: {skipped} inputs are skipped because their outputs are already in " in (
        result.stderr
    )
    kept = f"not overwritten: its output {theirs} was already in --output, cut short"
    assert rows[theirs]["status"] == "failed" and rows[theirs]["error"].startswith(kept)
    assert f"cut short or not images (e.g. {theirs})" in result.stderr  # (and the broken inputs)
    # The rows of those outputs say they are not this job's (said once, then lost), and
    # keep saying so on reruns.
    unrecorded = [r for r in rows.values() if r["status"] == "skipped"]
    assert all(r["error"] == job.UNRECORDED_NOTE for r in unrecorded), unrecorded[:2]
    rerun = run_job(*refs)  # DST has a record now: still not the job's file
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert manifest(foreign)[theirs]["error"].startswith(kept)
    again = [r for r in manifest(foreign).values() if r["status"] == "skipped"]
    assert len(again) == skipped and all(job.UNRECORDED_NOTE in r["error"] for r in again)
    assert (foreign / theirs).read_bytes() == b"\x89PNG\r\n\x1a\n their half-copied file"
    (foreign / theirs).unlink()  # removed: done
    rerun = run_job(*refs, ray=shared_ray)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert manifest(foreign)[theirs]["status"] == "ok"
    assert "warning" not in run_job(*args).stderr  # DST has this job's record


def test_a_rerun_with_another_model_counts_its_outputs_apart(first_run, model_path, dataset):
    """The outputs the first model wrote are kept (skipped) on a rerun with another
    model; the summary's PSNR/SSIM means include them, and now say how many."""
    import aelib

    dst, _ = first_run
    copy = dataset["root"] / "other-model"
    shutil.copytree(dst, copy)
    other = dataset["root"] / "other.keras"  # the same weights saved again: other bytes
    bundle = aelib.load(model_path)
    aelib.save(bundle, other, {**bundle.info, "note": "saved again"})
    digits = f"{dataset['src']}/[0-9]/*.png"  # (not the broken files, which a new model
    args = ["--input", digits, "--output", copy, "--clean", dataset["clean"]]  # retries)
    result = run_job("--model", other, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "holds a run with another model_sha256: its outputs are kept" in result.stderr
    assert "to do on" not in result.stdout  # all skipped: no Ray started
    measured = sum(r["psnr"] is not None for r in manifest(copy).values())
    assert measured == N_DIGITS
    said = f"on the {N_DIGITS} with a --clean reference ({N_DIGITS} by another model: the "
    assert said + "manifest's model_sha256): mean PSNR" in result.stdout
    summary = json.loads(result.stdout.split("denoise-summary ")[1])
    assert summary["measured_by_other_models"] == N_DIGITS


BUCKET = "aelib-test"


def same_as_local_run(fs, prefix: str, local_dst: Path) -> tuple[dict, dict, list[str]]:
    """Checks that the run whose DST is `prefix` on `fs` gave the local run's rows (its
    first run's: the tests before may have rerun it) and images: statuses and errors, the
    outputs within one grey level, PSNR within 0.01 dB. Returns its rows, the local rows
    and the paths done."""
    local = {p: dict(r) for p, r in manifest(local_dst).items()}
    for r in local.values():
        r["status"] = {"skipped": "ok"}.get(r["status"], r["status"])
        r["error"] = r["error"] and r["error"].removeprefix("(earlier run) ")
    table = pq.read_table(f"{prefix}/{job.MANIFEST}", filesystem=fs)
    rows = {row["path"]: row for row in table.to_pylist()}
    assert {p: r["status"] for p, r in rows.items()} == {p: r["status"] for p, r in local.items()}
    ok = sorted(p for p, r in rows.items() if r["status"] == "ok")
    for rel in ok:
        with fs.open_input_stream(f"{prefix}/{rel}") as f:
            out = np.asarray(Image.open(io.BytesIO(f.read())), dtype=int)
        here = np.asarray(Image.open(local_dst / rel), dtype=int)
        assert out.shape == here.shape and np.abs(out - here).max() <= 1, rel
        if local[rel]["psnr"] is not None:
            assert rows[rel]["psnr"] == pytest.approx(local[rel]["psnr"], abs=0.01), rel
    for rel in set(rows) - set(ok):
        assert rows[rel]["error"] == local[rel]["error"], rel
    return rows, local, ok


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint on this machine: moto's S3 served over HTTP, which the job and its
    actors reach through pyarrow's own S3 client, as they would a bucket in the cloud
    (the standard AWS variables in `env` point it here; the job's local Ray passes them
    to its workers). Every request is recorded as (method, path, query)."""
    server = bench_s3.S3Server(buckets=(BUCKET,))
    yield server
    server.close()


def test_cloud_storage_input_references_and_output(first_run, model_path, dataset, s3):
    """The first run's dataset from an S3 bucket, its references and the model there too
    (as the README's cluster command has them), to an S3 output: the same rows and images
    as the local run, each output sent whole in one PUT, the output refused inside the
    input, and a rerun that skips everything."""
    s3.upload(dataset["src"], f"{BUCKET}/noisy")
    s3.upload(dataset["clean"], f"{BUCKET}/clean")
    s3.upload(model_path.parent, f"{BUCKET}/model")
    model = f"s3://{BUCKET}/model/{model_path.name}"
    src, dst = f"s3://{BUCKET}/noisy", f"s3://{BUCKET}/out"
    inside = run_job("--model", model, "--input", src, "--output", f"{src}/out", ray=s3.env)
    assert inside.returncode == 2 and f"is inside --input {src}" in inside.stderr, inside.stderr
    s3.requests.clear()
    args = ["--model", model, "--input", src, "--output", dst]
    result = run_job(*args, "--clean", f"s3://{BUCKET}/clean", "--batch-size", 16, ray=s3.env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{N_DIGITS + 3} ok, 3 failed, 0 skipped" in result.stdout
    assert "mean PSNR" in result.stdout

    def rows_at(prefix: str) -> dict[str, dict]:
        table = pq.read_table(f"{prefix}/{job.MANIFEST}", filesystem=s3.fs)
        return {row["path"]: row for row in table.to_pylist()}

    rows, local, ok = same_as_local_run(s3.fs, f"{BUCKET}/out", first_run[0])
    # One PutObject per file written: no multipart upload (create, part, complete).
    out_dir = f"/{BUCKET}/out/"
    writes = [r for r in s3.requests if r[0] in ("PUT", "POST") and r[1].startswith(out_dir)]
    assert not [w for w in writes if "upload" in w[2]], writes[:5]
    files = sorted(p.removeprefix(out_dir) for _, p, _ in writes)  # no "folder/" objects
    # The rows as journal parts (the first block's at once), removed with the manifest:
    # pyarrow's delete leaves only the parts' (hidden) folder marker.
    parts = [f for f in files if f.startswith(f"{job.JOURNAL_PARTS}/.manifest.")]
    marker = f"{job.JOURNAL_PARTS}/"
    # The run's lease on DST too, and the folder marker pyarrow PUTs when it deletes it.
    leased = {job.LOCK, ""}
    assert parts and set(files) - set(parts) == {*ok, job.MANIFEST, job.WRITERS, marker, *leased}
    left = s3.fs.get_file_info(pafs.FileSelector(f"{BUCKET}/out", recursive=True))
    left = sorted(i.path.removeprefix(f"{BUCKET}/out/") for i in left if i.is_file)
    assert left == sorted([*ok, job.MANIFEST, job.WRITERS]), left

    s3.requests.clear()
    # The rerun with the key in the URIs, as a user may give it: the same locations, and
    # the secret in nothing the job prints or records.
    keyed = [a.replace("s3://", "s3://test:test@") for a in args]
    again = run_job(*keyed, ray=s3.env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Started a local Ray" not in again.stdout + again.stderr
    assert "test:test" not in again.stdout + again.stderr
    table = pq.read_table(f"{BUCKET}/out/{job.MANIFEST}", filesystem=s3.fs)
    assert table.schema.metadata[b"input"] == f"s3://test:***@{BUCKET}/noisy".encode()
    assert "test:test" not in str(table.schema.metadata) + str(table.to_pylist())
    rows = rows_at(f"{BUCKET}/out")
    assert {r["status"] for p, r in rows.items() if not p.startswith("broken/")} == {"skipped"}
    assert rows["sizes/odd.png"]["width"] == 45  # carried over from the first run
    rewritten = {p for m, p, _ in s3.requests if m == "PUT" and p.startswith(out_dir)}
    assert rewritten == {out_dir + p for p in (job.MANIFEST, job.WRITERS, *leased)}


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    server = GcsServer(BUCKET, tmp_path_factory.mktemp("gcs") / "requests.log")
    yield server
    server.close()


def test_gcs_parquet_input_references_and_output(first_run, model_path, dataset, gcs, shared_ray):
    """Google Cloud Storage, through pyarrow's GCS client and an emulator whose endpoint
    and anonymous access are in the URIs (kept whole down to each Parquet file's URI in
    the actors): the first run's files as rows of a folder of Parquet files in a bucket,
    the references and the model there too, to a bucket output. The rows and images are
    the local run's, and the output holds the outputs, the manifest and .outputs.parquet
    and nothing else (the journal parts are gone)."""
    files = [p for p in sorted(dataset["src"].rglob("*")) if p.is_file()]
    rels = [p.relative_to(dataset["src"]).as_posix() for p in files]
    shown = [i for i, rel in enumerate(rels) if not job._hidden(rel)]
    table = pa.table(
        {"path": [rels[i] for i in shown], "image": [files[i].read_bytes() for i in shown]}
    )
    for k, part in enumerate((table.slice(0, 20), table.slice(20))):
        with gcs.fs.open_output_stream(f"{BUCKET}/pq/part-{k}.parquet") as f:
            pq.write_table(part, f, row_group_size=8)
    pafs.copy_files(str(dataset["clean"]), f"{BUCKET}/clean", destination_filesystem=gcs.fs)
    with gcs.fs.open_output_stream(f"{BUCKET}/model/denoise.keras") as f:
        f.write(model_path.read_bytes())
    args = ["--model", gcs.uri("model/denoise.keras"), "--input", gcs.uri("pq")]
    args += ["--output", gcs.uri("out"), "--clean", gcs.uri("clean"), "--batch-size", 16]
    gcs.clear()
    result = run_job(*args, ray=shared_ray)  # (the URIs carry all the workers need)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{N_DIGITS + 3} ok, 3 failed, 0 skipped" in result.stdout

    during = list(gcs.requests)  # the job's, before the reads below
    rows, local, ok = same_as_local_run(gcs.fs, f"{BUCKET}/out", first_run[0])
    left = gcs.fs.get_file_info(pafs.FileSelector(f"{BUCKET}/out", recursive=True))
    objects = sorted(i.path.removeprefix(f"{BUCKET}/out/") for i in left if i.is_file)
    assert objects == sorted([*ok, job.MANIFEST, job.WRITERS])
    # pyarrow writes each object as a resumable upload: a POST that starts it, a PUT of
    # the bytes; one each per output, per manifest file, per journal part (deleted one
    # by one at the end) and per renewal of the run's lease on DST (one at the start,
    # one every LEASE_SECONDS / 4, deleted at the end). It reads a file whole with one
    # GET, and a Parquet file with a few per row group.
    kinds = collections.Counter((m, p.split("/")[1]) for m, p, _ in during)
    leases = sum(m == "POST" and f"out/{job.LOCK}" in urllib.parse.unquote(q) for m, p, q in during)
    parts = kinds[("POST", "upload")] - len(ok) - 2 - leases
    assert kinds[("PUT", "upload")] == kinds[("POST", "upload")] and parts >= 1 and leases >= 1
    assert kinds[("DELETE", "storage")] == parts + 1, kinds
    media = collections.Counter(
        urllib.parse.unquote(p.rsplit("/o/", 1)[1])
        for m, p, q in during
        if m == "GET" and "alt=media" in q
    )
    assert media.pop(f"out/{job.LOCK}") >= 2  # free? then read back once written
    references = {f"clean/{rel}" for rel in ok}  # (sizes/ has none: a 404 each)
    parquet = {"pq/part-0.parquet", "pq/part-1.parquet"}
    earlier = {f"out/{job.MANIFEST}", f"out/{job.WRITERS}"}  # a first run: 404s
    assert set(media) == {*references, "model/denoise.keras", *parquet, *earlier}
    assert {media[k] for k in [*references, "model/denoise.keras", *earlier]} == {1}
    # The driver reads each Parquet file's footer and path column, an actor the footer
    # and both columns of its row group (27 GETs for these 6 row groups on 2026-12-03).
    row_groups = 6
    assert sum(media[k] for k in parquet) <= 6 * row_groups, media


def test_cloud_parquet_folders_globs_and_uri_queries(s3, monkeypatch):
    """Parquet files in a bucket: a folder (as a Hugging Face dataset has them, with its
    README), a glob, a single file, each with a query for pyarrow kept whole; and the
    I/O threads a remote location gets."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    table = pa.table({"path": ["a.png", "b.png"], "image": [png(np.zeros((4, 4), np.uint8))] * 2})
    for rel in ("pq/train-0.parquet", "pq/sub/train-1.parquet", "pq/_temporary/0/part-0.parquet"):
        with s3.fs.open_output_stream(f"{BUCKET}/{rel}") as f:
            pq.write_table(table, f)
    with s3.fs.open_output_stream(f"{BUCKET}/pq/README.md") as f:
        f.write(b"# dataset card")
    url, query = f"s3://{BUCKET}/pq", "?region=us-east-1"
    both = [f"{url}/sub/train-1.parquet{query}", f"{url}/train-0.parquet{query}"]
    for location, fmt, expected in [
        (url + query, "auto", both),  # README.md is not an input
        (url + query, "parquet", both),
        (f"{url}/**/*-1.parquet{query}", "auto", both[:1]),
        (f"{url}/train-0.parquet{query}", "auto", [f"{url}/train-0.parquet{query}"]),
    ]:
        inputs = job.find_inputs(location, fmt)
        assert (inputs.kind, inputs.parquet) == ("parquet", expected), location
        assert [job._parquet_file(uri).metadata.num_rows for uri in expected] == [2] * len(expected)
    with pytest.raises(ValueError, match="no Parquet files found"):
        job.find_inputs(f"{url}/*.pq", "auto")
    # One image in a bucket: its folder, with that file alone, the query kept.
    with s3.fs.open_output_stream(f"{BUCKET}/pq/sub/one.png") as f:
        f.write(png(np.zeros((4, 4), np.uint8)))
    inputs = job.find_inputs(f"{url}/sub/one.png{query}", "auto")
    assert (inputs.kind, inputs.single, inputs.files) == ("files", True, [("one.png", 68)])
    assert inputs.storage.location == f"{url}/sub{query}"
    with pytest.raises(ValueError, match=r"sub/two.png\?region=us-east-1 does not exist"):
        job.find_inputs(f"{url}/sub/two.png{query}", "auto")
    # DST inside the folder listed: its manifest would be read as an input.
    with pytest.raises(ValueError, match="inside --input"):
        job.check_locations(job.find_inputs(url, "auto"), url, job.Storage(f"{url}/out"))
    # One PUT per object through the job's filesystem, beside a query of the user's.
    fs, root = job.filesystem(url + query)
    s3.requests.clear()
    with fs.open_output_stream(f"{root}/x.bin") as f:
        f.write(b"x")
    assert [m for m, p, _ in s3.requests if p.endswith("/x.bin")] == ["PUT"]
    assert job.split_query(f"{url}/x?a=1") == (f"{url}/x", "?a=1")
    assert job.split_query("/data/img?.png") == ("/data/img?.png", "")  # a local wildcard
    assert job._glob_root(f"{url}/*/x.png{query}") == (url + query, "*/x.png")
    # A name that must be percent-encoded in a URI, and user info (a key and its secret)
    # kept in each file's URI for the actors, masked where it is recorded or printed.
    with s3.fs.open_output_stream(f"{BUCKET}/odd/a b%.parquet") as f:
        pq.write_table(table, f)
    keyed = f"s3://test:test@{BUCKET}/odd"
    inputs = job.find_inputs(keyed + query, "auto")
    assert inputs.parquet == [f"{keyed}/a%20b%25.parquet{query}"]
    assert job._parquet_file(inputs.parquet[0]).metadata.num_rows == 2
    assert (
        job.redacted(f"x {inputs.parquet[0]}")
        == f"x s3://test:***@{BUCKET}/odd/a%20b%25.parquet{query}"
    )
    assert job.redacted(url + query) == url + query
    args = SimpleNamespace(input="/data", output="/out", clean=None)
    assert job.io_floor(args) == 2
    assert job.io_floor(SimpleNamespace(input="/data", output=url, clean=None)) == 16
    assert job.io_floor(SimpleNamespace(input="file:///d", output="/o", clean="gs://b/c")) == 16


def test_gcs_without_credentials_fails_soon_with_what_to_do(tmp_path):
    """pyarrow's GCS client retried a machine's missing credentials for minutes: gs://
    URIs get a retry limit unless they set one, and the job's error says what to set."""
    import datetime

    def retry_limit(uri: str) -> datetime.timedelta | None:
        fs, _ = job.filesystem(uri)
        return fs.__reduce__()[1][0]["retry_time_limit"]

    assert retry_limit("gs://anonymous@b/x") == datetime.timedelta(seconds=job.GCS_RETRY_SECONDS)
    assert retry_limit("gs://anonymous@b/x?retry_limit_seconds=7") == datetime.timedelta(seconds=7)
    # No credentials anywhere: no key file, no gcloud login, no metadata server.
    env = {k: v for k, v in _env().items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}
    env.update(HOME=str(tmp_path), GCE_METADATA_ROOT="127.0.0.1:9", GCE_METADATA_HOST="127.0.0.1:9")
    model = "gs://aelib-test/denoise.keras?endpoint_override=127.0.0.1:9&scheme=http"
    cmd = [sys.executable, str(JOB), "--model", model + "&retry_limit_seconds=1"]
    cmd += ["--input", str(tmp_path), "--output", str(tmp_path / "out")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"--model {model}&retry_limit_seconds=1: cannot read it" in result.stderr
    assert "no Google Cloud credentials were found: set GOOGLE_APPLICATION_CREDENTIALS" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_a_run_in_a_bucket_keeps_its_rows_in_journal_parts_until_its_manifest(s3, monkeypatch):
    """An object store has no append: a run there PUTs its new rows as journal parts (the
    first block's at once, then those received since every JOURNAL_SECONDS in one part,
    also while no block comes, and the rest on abort), a rerun after a crash reads them
    back in run order (not in the order of their names), and the manifest that carries
    them removes them, but not a file of someone else's in their folder."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    output = job.Storage(f"s3://{BUCKET}/journaled")
    ids = iter(range(2**40, 0, -1))  # each part's name sorts before the last one's
    monkeypatch.setattr(
        job,
        "uuid",
        SimpleNamespace(uuid4=lambda: SimpleNamespace(hex=f"{next(ids):012x}" + "0" * 20)),
    )

    def block(*paths: str, psnr: float) -> pa.Table:
        rows = [dict(path=p, output=p, status="ok", width=28, psnr=psnr) for p in paths]
        return pa.Table.from_pylist(rows, schema=job.MANIFEST_SCHEMA.remove_metadata())

    def parts() -> list[str]:
        return job._journals(output)

    def psnrs(rows: dict) -> dict[str, float]:
        return {p: r["psnr"] for p, r in rows.items()}

    monkeypatch.setattr(job, "JOURNAL_SECONDS", 1.0)
    first = job.ManifestWriter(output, {"run": "1"})
    # (Reentrant, so that the test can hold it: its timer ticks every second from its
    # start, and one between the two blocks below put them in two parts.)
    first.lock = threading.RLock()
    try:
        first.add_rows([dict(path="old.png", status="skipped")])  # settled again by a rerun
        time.sleep(1.5)
        assert parts() == []  # nothing new: no part
        first.add(block("a.png", "b.png", psnr=20.0))  # the first block's rows: PUT at once
        assert len(parts()) == 1
        with first.lock:  # (the timer waits for both)
            first.add(block("c.png", psnr=21.0))  # the next blocks' wait for the timer,
            first.add(block("d.png", psnr=22.0))
        deadline = time.monotonic() + 30  # which PUTs them though no block comes after
        while len(parts()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        held = [job.read_journal(output, p).column("path").to_pylist() for p in parts()]
        assert sorted(held) == [["a.png", "b.png"], ["c.png", "d.png"]]  # in one part
        time.sleep(1.5)
        assert len(parts()) == 2  # nothing new since: no part
        # The process is killed here (no abort, no close). The rerun reads back every row.
        rows, metas, journals = job.previous_rows(output)
        assert psnrs(rows) == {"a.png": 20.0, "b.png": 20.0, "c.png": 21.0, "d.png": 22.0}
        assert journals == parts() and metas == [{"run": "1"}] * 2
    finally:
        first._stop_timer()  # (the killed process's timer)

    monkeypatch.setattr(job, "JOURNAL_SECONDS", 3600.0)
    second = job.ManifestWriter(output, {"run": "2"}, consumed=journals, earlier=rows)
    second.add(block("a.png", psnr=30.0))
    second.add(block("e.png", psnr=31.0))  # pending when Ctrl-C comes: abort PUTs it
    second.abort()
    rows, _, journals = job.previous_rows(output)
    assert len(journals) == 4  # run 2's parts are named before run 1's:
    assert job.read_journal(output, journals[0]).schema.metadata[b"run"] == b"2"
    expected = {"a.png": 30.0, "b.png": 20.0, "c.png": 21.0, "d.png": 22.0, "e.png": 31.0}
    assert psnrs(rows) == expected  # yet its rows win
    assert job.existing_outputs(output, {}) == (set(), set())  # parts are not outputs

    with s3.fs.open_output_stream(f"{BUCKET}/journaled/{job.JOURNAL_PARTS}/notes.txt") as f:
        f.write(b"not a part")
    third = job.ManifestWriter(output, {"run": "3"}, consumed=journals, earlier=rows)
    third.add_rows([job._skipped_row(p, p, None, row) for p, row in rows.items()])
    third.close()
    assert parts() == []  # the manifest carries their rows now
    table = pq.read_table(f"{BUCKET}/journaled/{job.MANIFEST}", filesystem=s3.fs)
    assert {r["path"]: r["psnr"] for r in table.to_pylist()} == expected
    left = s3.fs.get_file_info(pafs.FileSelector(f"{BUCKET}/journaled/{job.JOURNAL_PARTS}"))
    assert [i.base_name for i in left] == ["notes.txt"]


def test_resume_redoes_only_missing_outputs(first_run, model_path, dataset, tmp_path, shared_ray):
    dst = tmp_path / "out"
    shutil.copytree(first_run[0], dst)  # a finished run, then a crash's traces:
    removed = ["0/000003.png", "sizes/deep/big.png"]
    for rel in removed:
        (dst / rel).unlink()
    stale = dst / "1" / ".000002.png.0123456789ab.denoise-tmp"
    stale.write_bytes(b"half an image")
    cut = "2/000001.png"  # a copy of DST cut short: not complete, so done again
    whole = (dst / cut).read_bytes()
    (dst / cut).write_bytes(whole[: len(whole) // 2])
    # An input of the size its row recorded but another modification time (replaced in
    # place by a file of the same size, or touched): done again. (In a copy of SRC that
    # keeps the times, so that the other tests' inputs stay as they are.)
    src = tmp_path / "src"
    shutil.copytree(dataset["src"], src)
    touched = "4/000004.png"
    os.utime(src / touched, ns=(10**18, 10**18))
    pattern = f"{src}/**/*.png"  # a glob this time: .png files only
    result = run_job("--model", model_path, "--input", pattern, "--output", dst, ray=shared_ray)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "note: 1 output in" in result.stderr
        and f"cut short or changed since (e.g. {cut})" in result.stderr
    )
    assert "1 input(s) have the size recorded but another modification time" in result.stderr
    rows = manifest(dst)
    assert sorted(rows) == sorted(p for p in manifest(first_run[0]) if p.endswith(".png"))
    redone = sorted([*removed, cut, touched])
    assert sorted(p for p, r in rows.items() if r["status"] == "ok") == redone
    again = np.asarray(Image.open(dst / cut), dtype=int)  # (batching may move a level)
    assert np.abs(again - np.asarray(Image.open(first_run[0] / cut), dtype=int)).max() <= 1
    for path, row in rows.items():
        if path.startswith("broken/"):
            assert row["status"] == "failed" and row["error"].startswith("(earlier run)")
        elif path not in redone:
            assert row["status"] == "skipped", row
    assert all((dst / rel).is_file() for rel in removed)
    assert not stale.exists()
    # The record of which input wrote each output, with its size.
    writers = job.previous_writers(job.Storage(str(dst)), {})
    first = manifest(first_run[0])
    wrote = {r["output"]: p for p, r in first.items() if r["status"] != "failed"}
    assert {out: writer[0] for out, writer in writers.items()} == wrote
    assert all(writers[out][1] == (dst / out).stat().st_size for out in wrote)


def _journal_rows(dst: Path) -> dict[str, dict]:
    rows = {}
    for path in sorted(dst.glob(".manifest.*.journal")) if dst.is_dir() else []:
        table = job.read_journal(job.Storage(str(dst)), path.name)
        rows.update({r["path"]: r for r in (table.to_pylist() if table is not None else [])})
    return rows


def test_a_full_disk_keeps_the_record_that_its_outputs_are_this_jobs(model_path, tmp_path):
    """A run that filled its disk left whole outputs but an empty journal (its first
    rows did not fit): the rerun took them for another dataset's and skipped them, with
    no size or metrics, for good, and Ray's tracebacks followed the error line. Now the
    failed run leaves its lock marked, as a killed one does, and the rerun does them
    again. On a real full file system: a tmpfs (root only; skipped elsewhere)."""
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for i in range(120):
        (src / str(i % 3)).mkdir(parents=True, exist_ok=True)
        (src / str(i % 3) / f"{i}.png").write_bytes(
            png((rng.random((28, 28)) * 255).astype(np.uint8))
        )
    with small_disk(tmp_path / "full", "200k") as full:
        args = ("--model", model_path, "--input", src, "--output", full / "o")
        result = run_job(*args)
        assert result.returncode == 1, result.stderr[-3000:]
        said = [x for x in result.stderr.splitlines() if x.startswith("denoise: error: ")]
        assert said and "cannot write" in said[0] and "No space left on device" in said[0], (
            result.stderr[-3000:]
        )
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        written = list((full / "o").rglob("*.png"))
        assert 0 < len(written) < 120
        room(full, "20M")
        result = run_job(*args)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"note: {len(written)} output(s) in DST have no row" in result.stderr
        rows = manifest(full / "o")
        assert len(rows) == 120 and {r["status"] for r in rows.values()} == {"ok"}


def _actor_memory(ray_tmp: Path) -> dict[int, int]:
    """The Ray Data actors of the Ray started under `ray_tmp`: PID -> resident memory."""
    found = {}
    for pid in ray_pids(ray_tmp):
        proc = Path("/proc") / str(pid)
        try:
            if b"(Denoiser)" not in (proc / "cmdline").read_bytes():
                continue
            rss = re.search(r"^VmRSS:\s+(\d+) kB", (proc / "status").read_text(), re.M)
        except OSError:
            continue
        if rss:
            found[pid] = int(rss.group(1)) * 1024
    return found


def test_a_block_whose_worker_keeps_dying_is_given_up_and_the_rest_is_done(
    model_path, tmp_path, ray_tmp, shared_ray
):
    """An image that gets its actor killed each time, as the OOM killer kills a process
    that outgrows the memory (here the test kills any actor 450 MB over what one used
    for the digits, which only the 5000x5000 image's block reaches: about +900 MB): Ray
    Data retried its block for ever, so the job never ended (8 restarts in a minute, no
    progress). Now the block is given up after BLOCK_TRIES tries: its inputs are failed
    rows that say why, every other input is done, and a rerun does them again."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(32):  # in blocks of up to 8: the big image in the last one
        (src / f"{i:02d}.png").write_bytes(png((rng.random((28, 28)) * 255).astype(np.uint8)))
    (src / "zz_big.png").write_bytes(png((rng.random((5000, 5000)) * 255).astype(np.uint8)))
    stop, killed, digits = threading.Event(), set(), []

    def oom_killer():
        while not stop.is_set():
            actors = _actor_memory(ray_tmp)
            if not digits and actors and any(dst.rglob("*.png")):  # a block of digits done
                digits.append(max(actors.values()))
            for pid, rss in actors.items():
                if digits and rss > digits[0] + (450 << 20) and pid not in killed:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                        killed.add(pid)
            time.sleep(0.05)

    watcher = threading.Thread(target=oom_killer, daemon=True)
    watcher.start()
    args = ("--model", model_path, "--input", src, "--output", dst, "--workers", 1)
    try:  # (on a Ray of its own, whose processes the test can tell from others')
        result = run_job(*args, "--batch-size", 8, ray={"RAY_TMPDIR": str(ray_tmp)}, timeout=600)
    finally:
        stop.set()
        watcher.join()
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(killed) == job.BLOCK_TRIES, (killed, result.stderr[-3000:])
    rows = manifest(dst)
    assert sorted(rows) == sorted(p.name for p in src.iterdir())
    lost = {path for path, row in rows.items() if row["status"] == "failed"}
    big = rows["zz_big.png"]
    assert big["status"] == "failed" and big["error"].startswith(job.LOST), big
    assert f"did not come back after {job.BLOCK_TRIES} tries" in big["error"]
    # The last digits: those in its block, and in a block queued for the same actor.
    digits_lost = sorted(lost - {"zz_big.png"})
    assert digits_lost == [f"{i:02d}.png" for i in range(32 - len(digits_lost), 32)]
    assert len(digits_lost) < 16
    assert all(rows[path]["error"] == big["error"] for path in lost)
    assert all((dst / path).is_file() for path in rows if path not in lost)
    assert f"{len(rows) - len(lost)} ok, {len(lost)} failed" in result.stdout
    assert f"denoise: failed: {min(lost)}: {job.LOST} did not come back after" in result.stderr

    # A rerun does them again (the big image now a digit, and no killer), here asking
    # for more actors than the shared head's 2 CPUs hold: it says so and runs on 2.
    (src / "zz_big.png").write_bytes(png((rng.random((28, 28)) * 255).astype(np.uint8)))
    result = run_job(*args[:-2], "--workers", 3, ray=shared_ray)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "note: --workers 3, but the nodes of this Ray cluster hold 2 actor(s)" in " ".join(
        result.stderr.split()
    ), result.stderr[-3000:]
    rows = manifest(dst)
    assert {path for path, row in rows.items() if row["status"] == "ok"} == lost
    assert {row["status"] for path, row in rows.items() if path not in lost} == {"skipped"}


def test_a_killed_run_leaves_only_whole_images_and_a_rerun_does_the_rest(
    model_path, tmp_path, ray_tmp, shared_ray
):
    """The job and its Ray are SIGKILLed while outputs are being written (a crash):
    every image left in DST decodes whole, the rows of the blocks done before the kill
    survive in the run's journal, and the rerun skips the outputs with such a row,
    with the killed run's sizes and PSNR, denoises the rest (also the outputs the kill
    left without a row: their rows would be lost), and writes one whole manifest row
    per input."""
    count = 6000
    src, clean, dst = tmp_path / "noisy", tmp_path / "clean", tmp_path / "out"
    make_noisy.make_noisy(str(MNIST), count, src, clean)
    inputs = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.png"))
    assert len(inputs) == count
    args = ["--model", model_path, "--input", src, "--output", dst, "--batch-size", 64]
    args += ["--clean", clean]
    log = tmp_path / "killed.log"
    cmd = [sys.executable, str(JOB), *map(str, args)]
    job_proc = start_logged(cmd, {**_env(), "RAY_TMPDIR": str(ray_tmp)}, log)
    try:
        first = wait_for(lambda: _journal_rows(dst), job_proc, log, timeout=300, interval=0.02)
        assert first, "no block recorded within 300 s"
        for pid in [job_proc.pid, *ray_pids(ray_tmp)]:  # all at once, as a crash would
            os.kill(pid, signal.SIGKILL)
        job_proc.wait(timeout=30)
        for pid in wait_no_ray(ray_tmp, timeout=5):  # anything forked during the kill
            os.kill(pid, signal.SIGKILL)
    finally:
        if job_proc.poll() is None:
            job_proc.kill()
    stale_lock = (dst / job.LOCK).exists()
    left = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.png"))
    assert 0 < len(left) < count, len(left)
    assert not (dst / "manifest.parquet").exists()  # written only when a run ends
    for rel in left:  # no half-written image under an output's name
        with Image.open(dst / rel) as image:
            image.load()
            assert image.size == (28, 28), rel
    recorded = _journal_rows(dst)  # the blocks the driver got before the kill
    assert recorded and set(recorded) <= set(left)
    assert all(r["status"] == "ok" and r["psnr"] > r["psnr_noisy"] for r in recorded.values())

    result = run_job(*args, ray=shared_ray)  # on a Ray that has run other jobs: no matter
    assert result.returncode == 0, result.stderr[-3000:]
    rows = manifest(dst)
    assert sorted(rows) == inputs  # every input once
    assert sorted(p for p, r in rows.items() if r["status"] == "skipped") == sorted(recorded)
    assert sum(r["status"] == "ok" for r in rows.values()) == count - len(recorded)
    for path, row in recorded.items():  # carried over, not lost with the killed run
        assert (rows[path]["width"], rows[path]["psnr"]) == (28, row["psnr"]), path
    orphans = len(set(left) - set(recorded))  # written in the blocks the kill cut short
    assert (f"{orphans} output(s) in DST have no row" in result.stderr) is (orphans > 0)
    assert all(r["width"] == 28 and r["psnr"] > r["psnr_noisy"] for r in rows.values())
    assert f"on the {count} with a --clean reference" in result.stdout
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.png")) == inputs
    assert [p.name for p in dst.rglob("*") if job.TMP_MARK in p.name] == []
    assert _journal_rows(dst) == {} and list(dst.glob(".manifest.*")) == []
    assert stale_lock and not (dst / job.LOCK).exists()  # the killed run's lock held nothing


def test_sigterm_ends_the_job_as_ctrl_c_does(model_path, tmp_path, ray_tmp):
    """`kill` (or a scheduler stopping the driver) mid-run: the Ctrl-C path, exit 143,
    the journal of the blocks done kept for the rerun, the lock released, no Ray left
    (Ray's handler printed its stack lines and killed the driver as a crash would)."""
    src, dst = tmp_path / "noisy", tmp_path / "out"
    make_noisy.make_noisy(str(MNIST), 4000, src)
    args = ["--model", model_path, "--input", src, "--output", dst, "--batch-size", 64]
    cmd = [sys.executable, str(JOB), *map(str, args)]
    env = {**_env(), "RAY_TMPDIR": str(ray_tmp)}
    first, status, text = signal_when(
        cmd, env, tmp_path / "termed.log", lambda: _journal_rows(dst), signal.SIGTERM,
        interval=0.02, timeout=300,
    )  # fmt: skip
    assert first, "no block recorded within 300 s"
    assert status == 143, text[-5000:]
    assert "denoise: interrupted" in text and "run the same command again" in text
    assert "SIGTERM received" not in text  # Ray's stack lines
    kept = _journal_rows(dst)
    assert len(kept) >= len(first) and len(kept) < 4000
    assert not (dst / job.LOCK).exists() and not (dst / "manifest.parquet").exists()
    assert ray_left(ray_tmp) == []


@pytest.mark.parametrize("sigint", ["swallowed", "swallowed in ray.init", "ignored"])
def test_a_ctrl_c_that_code_on_its_way_swallows_still_stops_the_job(
    sigint, model_path, tmp_path, ray_tmp
):
    """A Ctrl-C whose KeyboardInterrupt lands in code that catches it (a finalizer, a
    library's cleanup; here the manifest's first add, or ray.init, which swallow it) was
    lost: the job went on to its end and exited 0 (2 of 14 Ctrl-Cs in an audit under
    load, one in ray.init). It now ends at the driver's next block, or once Ray is up,
    as interrupted, exit 130, with Ray shut down by the job itself. A SIGINT the caller
    ignores (a job started with `nohup` or `&`) stays ignored."""
    src, dst = tmp_path / "noisy", tmp_path / "out"
    count = 1500
    make_noisy.make_noisy(str(MNIST), count, src)
    code = f"""
import os, signal, sys, time
import denoise, ray
# (as a terminal's shell starts it, or, ignored, as `nohup` or `&` do: not as the test
# process's may be, see helpers.default_signals)
ignored = {sigint == "ignored"}
signal.signal(signal.SIGINT, signal.SIG_IGN if ignored else signal.default_int_handler)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {{signal.SIGINT}})
def swallow():
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    except KeyboardInterrupt:
        print("swallowed", file=sys.stderr, flush=True)
real_add, real_init = denoise.ManifestWriter.add, ray.init
def add(self, table, *args, **kwargs):
    real_add(self, table, *args, **kwargs)
    if not hasattr(add, "sent") and {sigint!r} != "swallowed in ray.init":
        add.sent = True
        swallow()
def init(*args, **kwargs):
    real_init(*args, **kwargs)
    if {sigint!r} == "swallowed in ray.init":
        swallow()
denoise.ManifestWriter.add, ray.init = add, init
status = denoise.main(sys.argv[1:])
print("Ray still up" if ray.is_initialized() else "Ray shut down", file=sys.stderr)
sys.exit(status)
"""
    args = ["--model", model_path, "--input", src, "--output", dst, "--batch-size", 64]
    env = {**_env(), "RAY_TMPDIR": str(ray_tmp)}
    env["PYTHONPATH"] += os.pathsep + str(JOB.parent)  # (Ray's workers import it too)
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    if sigint == "ignored":
        assert proc.returncode == 0 and "swallowed" not in proc.stderr, proc.stderr[-3000:]
        assert f"{count} ok" in proc.stdout, proc.stdout[-2000:]
        return
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "swallowed" in proc.stderr and "denoise: interrupted" in proc.stderr
    assert "Ray shut down" in proc.stderr  # (by the job: ray.init's own left it up)
    assert not (dst / "manifest.parquet").exists() and len(_journal_rows(dst)) < count
    if sigint == "swallowed":  # (after the first block's rows)
        assert len(_journal_rows(dst)) > 0
    assert ray_left(ray_tmp) == []


def test_stopped_while_listing_it_says_nothing_was_written(
    model_path, tmp_path, monkeypatch, capsys
):
    """Ctrl-C while the inputs were listed said the outputs and a journal were kept in
    --output, which did not exist."""

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "find_inputs", stopped)
    dst = tmp_path / "out"
    args = ["--model", str(model_path), "--input", str(tmp_path), "--output", str(dst)]
    assert job.main(args) == 130
    err = capsys.readouterr().err
    assert "denoise: interrupted. No output was written (no --output folder)" in err
    assert not dst.exists()


def test_a_second_run_on_the_same_output_stops_at_once(model_path, dataset, tmp_path):
    """While a run holds DST (here this process, through the job's own lock), another
    run there exits 2 naming the holder, before it reads or writes anything in DST; a
    holder killed without a chance to clean up leaves its lock file, but not its lock."""
    dst = tmp_path / "out"
    args = ["--model", model_path, "--input", dataset["src"], "--output", dst]
    with job.one_run_at_a_time(job.Storage(str(dst)), str(dst)):
        holder = (dst / job.LOCK).read_text()
        assert holder.startswith(f"pid {os.getpid()} on ")
        result = run_job(*args, timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"--output {dst}: another run of this job is writing there ({holder.strip()})" in (
            result.stderr
        ), result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert [p.name for p in dst.iterdir()] == [job.LOCK]
    assert list(dst.iterdir()) == []  # the holder's lock file goes with it

    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import denoise as job; "
        "cm = job.one_run_at_a_time(job.Storage(sys.argv[2]), sys.argv[2]); cm.__enter__(); "
        "print('held', flush=True); import time; time.sleep(600)"
    )
    cmd = [sys.executable, "-c", code, str(ROOT / "jobs"), str(dst)]
    log = tmp_path / "holder.log"
    holder = start_logged(cmd, None, log)
    try:
        assert wait_for(lambda: "held" in log.read_text(), holder, log, timeout=60)
        with pytest.raises(ValueError, match=f"pid {holder.pid} on "):
            with job.one_run_at_a_time(job.Storage(str(dst)), str(dst)):
                pass
        holder.kill()  # as a crash would: no finally, no unlink
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert (dst / job.LOCK).exists()
    with job.one_run_at_a_time(job.Storage(str(dst)), str(dst)) as hold:
        assert (dst / job.LOCK).read_text().startswith(f"pid {os.getpid()} on ")
        assert not hold.stopped_before  # (killed before its actors started: wrote nothing)
        hold.mark_started()  # this run's actors start: its lock says so,
        assert (dst / job.LOCK).read_text().endswith("; actors started\n")
        with open(dst / job.LOCK, "rb") as f:
            left = f.read()  # as a kill now would leave it
    assert not (dst / job.LOCK).exists()
    (dst / job.LOCK).write_bytes(left)
    with job.one_run_at_a_time(job.Storage(str(dst)), str(dst)) as hold:
        # so a rerun knows outputs without a row are that run's (see _plan), and keeps the
        # mark while it runs, in case it is killed in turn before its own actors start.
        assert hold.stopped_before
        assert (dst / job.LOCK).read_text().endswith("; actors started\n")
    assert not (dst / job.LOCK).exists()


def test_a_second_run_on_the_same_bucket_output_stops_at_once(
    model_path, tmp_path, s3, monkeypatch, capsys
):
    """An object store has no locks: a run there holds DST through a lease it renews,
    and another run exits 2 naming it; a lease not renewed for LEASE_SECONDS (its run
    was killed) is taken over with a note, and each run removes its own at the end."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    dst = f"s3://{BUCKET}/leased"
    output, lease = job.Storage(dst), f"{BUCKET}/leased/{job.LOCK}"

    def held() -> dict:
        with s3.fs.open_input_stream(lease) as f:
            return json.loads(f.read())

    with job.one_run_at_a_time(output, dst) as hold:
        assert not hold.stopped_before and "started" not in held()
        hold.mark_started()  # this run's actors start: a rerun after a crash will know
        assert held()["started"] is True
        mine = held()
        assert (mine["pid"], mine["beat"]) == (os.getpid(), pytest.approx(time.time(), abs=30))
        src = tmp_path / "src"
        src.mkdir()
        (src / "a.png").write_bytes(png(np.zeros((4, 4), np.uint8)))
        result = run_job("--model", model_path, "--input", src, "--output", dst, timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"--output {dst}: another run of this job is writing there (pid {os.getpid()} " in (
            result.stderr
        )
        # When the lease was last renewed, as the refused run saw it: no longer ago than
        # the renewal read above. (It said "0 s ago" only if that run got there within
        # half a second of it, which its start-up took longer for on a loaded machine.)
        seen = re.search(r"last seen (\d+) s ago\)", result.stderr)
        assert seen and int(seen[1]) <= time.time() - mine["beat"] + 0.5, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    assert not s3.fs.get_file_info(lease).is_file  # removed at the end

    stale = {**mine, "pid": 1, "beat": time.time() - job.LEASE_SECONDS - 5, "started": True}
    with s3.fs.open_output_stream(lease) as f:  # a run killed a minute ago, its actors on
        f.write(json.dumps(stale).encode())
    monkeypatch.setattr(job, "LEASE_SECONDS", 2.0)  # renewed every 0.5 s
    with job.one_run_at_a_time(output, dst) as hold:
        # (its outputs without a row are its own: done again, see _plan; its mark is kept
        # in case this run is killed in turn before its actors start)
        assert "a run that wrote to" in capsys.readouterr().err and hold.stopped_before
        assert held()["started"] is True
        first = held()
        assert first["pid"] == os.getpid() and first["token"] != mine["token"]
        deadline = time.monotonic() + 10  # (renewed every 0.5 s; later on a loaded machine)
        while held()["beat"] <= first["beat"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert held()["beat"] > first["beat"]  # renewed while it runs
        with pytest.raises(ValueError, match=f"another run of this job .*pid {os.getpid()} on "):
            with job.one_run_at_a_time(output, dst):  # (fresh: renewed < 1 s ago)
                pass
    assert not s3.fs.get_file_info(lease).is_file

    # A run that stalled past the lease and was taken for gone does not write on beside
    # the run that took over: its next renewal finds the other's lease and stops it.
    other = {**stale, "pid": 2, "token": "other", "beat": time.time()}
    with pytest.raises(KeyboardInterrupt):  # as Ctrl-C: its outputs and journal stay
        with job.one_run_at_a_time(output, dst):
            with s3.fs.open_output_stream(lease) as f:
                f.write(json.dumps(other).encode())
            time.sleep(5)
    assert "lease on " in capsys.readouterr().err
    assert held()["token"] == "other"  # the other run's lease is left to it

    # Python drops an interrupt that lands in a finalizer (__del__): with the renewal's
    # interrupt lost, the block still ends with KeyboardInterrupt, not as if all was well.
    import _thread

    s3.fs.delete_file(lease)
    monkeypatch.setattr(_thread, "interrupt_main", lambda *args: None)
    with pytest.raises(KeyboardInterrupt):
        with job.one_run_at_a_time(output, dst):
            with s3.fs.open_output_stream(lease) as f:
                f.write(json.dumps({**other, "beat": time.time()}).encode())
            time.sleep(3)
    assert "lease on " in capsys.readouterr().err


def test_the_output_lock_where_it_cannot_be_had(tmp_path, monkeypatch, capsys):
    """A file system without locks gets a note and leaves no lock file; a DST that is a
    dangling link is named; an interrupt while the lock is taken leaves it free."""
    import errno
    import fcntl

    dst = tmp_path / "out"
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "gone")
    with pytest.raises(ValueError, match=f"--output {dangling}: a link to .*gone, which does not"):
        with job.one_run_at_a_time(job.Storage(str(dangling)), str(dangling)):
            pass
    under = dangling / "a" / "b"  # (was "cannot write there ([Errno 2] No such file ...)")
    said = f"--output {under}: its folder {dangling} is a link to .*gone, which does not"
    with pytest.raises(ValueError, match=said):
        with job.one_run_at_a_time(job.Storage(str(under)), str(under)):
            pass

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    with monkeypatch.context() as m:
        m.setattr(fcntl, "flock", no_locks)
        with job.one_run_at_a_time(job.Storage(str(dst)), str(dst)):
            assert list(dst.iterdir()) == []
    assert "cannot lock" in capsys.readouterr().err and list(dst.iterdir()) == []

    def interrupted(fd, length):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(os, "ftruncate", interrupted)
        with pytest.raises(KeyboardInterrupt):
            with job.one_run_at_a_time(job.Storage(str(dst)), str(dst)):
                pass
    assert list(dst.iterdir()) == []
    with job.one_run_at_a_time(job.Storage(str(dst)), str(dst)):  # not held by a lost fd
        assert [p.name for p in dst.iterdir()] == [job.LOCK]


def test_parquet_input_and_unsafe_paths(model_path, tmp_path, shared_ray):
    digits = (np.random.default_rng(0).random((5, 28, 28)) * 255).astype(np.uint8)
    paths = ["a/0.png", "a/1.png", "b/2.png", "../escape.png", "/abs/x.png", "bad.png"]
    payloads = [png(d) for d in digits[:3]] + [png(digits[3]), png(digits[4]), b"junk"]
    # Two rows for one output (one of them in the other row group), and a null path.
    paths += ["twice.png", "./twice.png", None, None, "None.png"]  # null paths are no clash
    payloads += [png(digits[0]), png(digits[1]), png(digits[2]), png(digits[3]), png(digits[4])]
    table = pa.table({"path": paths, "image": pa.array(payloads, pa.binary())})
    source = tmp_path / "images.parquet"
    pq.write_table(table, source, row_group_size=4)  # three row groups
    dst = tmp_path / "out"
    result = run_job("--model", model_path, "--input", source, "--output", dst, ray=shared_ray)
    assert result.returncode == 0, result.stderr[-3000:]
    said = [x for x in result.stderr.splitlines() if x.startswith("denoise: failed: ")]
    assert len(said) == 6 and "... and 2 more (the manifest's error column" in said[-1], said
    listed = pq.read_table(dst / "manifest.parquet").column("path").to_pylist()
    assert len(listed) == len(paths)
    rows = manifest(dst)
    nulls = [f"{source}#row_group=2#row={i}" for i in (0, 1)]
    assert sorted(rows) == sorted([p for p in paths if p] + nulls)
    for null in nulls:
        assert rows[null]["status"] == "failed" and "null" in rows[null]["error"]
    for twin in ("twice.png", "./twice.png"):
        assert rows[twin]["status"] == "failed", rows[twin]
        assert "also the output of another row" in rows[twin]["error"]
    assert not (dst / "twice.png").exists() and not (dst / "None").exists()
    done = ["None.png", "a/0.png", "a/1.png", "b/2.png"]
    assert sorted(p for p in rows if rows[p]["status"] == "ok") == done
    for bad in ("../escape.png", "/abs/x.png"):
        assert rows[bad]["status"] == "failed" and "leave the output folder" in rows[bad]["error"]
    assert rows["bad.png"]["status"] == "failed"
    assert not (tmp_path / "escape.png").exists() and not Path("/abs/x.png").exists()
    written = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.png"))
    assert written == done
    assert np.asarray(Image.open(dst / "a" / "0.png")).shape == (28, 28)

    # A rerun skips the rows whose output exists (decided in the actors for Parquet)
    # and carries their sizes over from the first run's manifest.
    result = run_job("--model", model_path, "--input", source, "--output", dst, ray=shared_ray)
    assert result.returncode == 0, result.stderr[-3000:]
    again = manifest(dst)
    assert sorted(p for p in again if again[p]["status"] == "skipped") == done
    for path in done:
        assert again[path]["width"] == 28 and again[path]["output"] == rows[path]["output"]
        assert again[path]["input_mtime_ns"] == source.stat().st_mtime_ns

    # The file written again (here with the same rows; a regenerated dataset can keep
    # every image's size, which alone had its rows skipped with the old outputs and
    # metrics): its rows are redone.
    pq.write_table(table, source, row_group_size=4)
    os.utime(source, ns=(0, source.stat().st_mtime_ns + 10**9))  # (a coarse clock)
    result = run_job("--model", model_path, "--input", source, "--output", dst, ray=shared_ray)
    assert result.returncode == 0, result.stderr[-3000:]
    third = manifest(dst)
    assert sorted(p for p in third if third[p]["status"] == "ok") == done

    # Row groups whose rows all have their outputs, from a file of the time recorded,
    # are skipped by the driver: a finished Parquet job's rerun starts no Ray.
    good = tmp_path / "good"
    good.mkdir()
    small = pa.array([png(d[:20, :20]) for d in digits], pa.binary())  # (other sizes)
    first = table.slice(0, 3).append_column("image2", small[:3])
    last = table.slice(10, 1).append_column("image2", small[4:5])
    pq.write_table(first, good / "1.parquet", row_group_size=2)
    pq.write_table(last, good / "2.parquet")
    dst = tmp_path / "good_out"
    runs = []
    for _ in range(2):
        result = run_job("--model", model_path, "--input", good, "--output", dst, ray=shared_ray)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(json.loads(result.stdout.split("denoise-summary ")[1]))
        rows = manifest(dst)
        assert sorted(rows) == done and all(rows[p]["width"] == 28 for p in done), rows
    assert runs[0]["ok"] == 4 and "ray_ready_s" in runs[0]
    assert runs[1]["skipped"] == 4 and "ray_ready_s" not in runs[1], runs[1]
    assert rows["b/2.png"]["input_mtime_ns"] == (good / "1.parquet").stat().st_mtime_ns
    (dst / "b" / "2.png").unlink()  # its row group runs again; the others do not
    os.utime(good / "2.parquet", ns=(0, (good / "2.parquet").stat().st_mtime_ns + 10**9))
    result = run_job("--model", model_path, "--input", good, "--output", dst, ray=shared_ray)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = manifest(dst)
    assert {p: rows[p]["status"] for p in done} == {
        "None.png": "ok",  # (its file's time changed)
        "a/0.png": "skipped",
        "a/1.png": "skipped",
        "b/2.png": "ok",
    }
    # Other bytes in a file of the time recorded (here another --image-column; or
    # another file with the same time) are denoised again: the driver compares the
    # sizes of the images with those the outputs were made from, as the actors do. And
    # a row that failed is not skipped for the output an earlier run made of it.
    # (of the size of the image its output was made from: a failure since, with the
    # file's new time, did not make those bytes its output's)
    cut = pa.array([b"\x89PNG cut".ljust(len(payloads[10]), b"\x00")])
    pq.write_table(last.set_column(2, "image2", cut), good / "2.parquet")
    os.utime(good / "2.parquet", ns=(0, (good / "2.parquet").stat().st_mtime_ns + 10**9))
    for status in ("ok", "skipped"):
        args = ("--input", good, "--output", dst, "--image-column", "image2")
        result = run_job("--model", model_path, *args, ray=shared_ray)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = manifest(dst)
        assert {p: rows[p]["status"] for p in done} == {
            "None.png": "failed",
            **{p: status for p in ("a/0.png", "a/1.png", "b/2.png")},
        }
        assert rows["a/0.png"]["width"] == 20 and "not a readable" in rows["None.png"]["error"]


def test_output_inside_input_is_refused(model_path, dataset):
    for dst in (dataset["src"], dataset["src"] / "0" / "out"):
        result = run_job("--model", model_path, "--input", dataset["src"], "--output", dst)
        assert result.returncode == 2
        assert "outside the input tree" in result.stderr, result.stderr[-2000:]
    assert not (dataset["src"] / "0" / "out").exists()


def test_an_input_folder_inside_the_output_folder_is_never_written_to(
    model_path, tmp_path, shared_ray
):
    """--input proj/noisy --output proj is allowed, but an input whose output would land
    in proj/noisy fails (noisy/a.png would have replaced the input a.png), and the
    inputs there are not taken for outputs: a rerun leaves them as they were."""
    digits = (np.random.default_rng(1).random((4, 28, 28)) * 255).astype(np.uint8)
    proj = tmp_path / "proj"
    src = proj / "noisy"
    files = {"a.png": digits[0], "noisy/a.png": digits[1], "c/d.png": digits[2]}
    for rel, pixels in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(png(pixels))
    inputs = {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*.png")}
    for _ in range(2):  # the first run and a rerun
        result = run_job("--model", model_path, "--input", src, "--output", proj, ray=shared_ray)
        assert result.returncode == 0, result.stderr[-3000:]
        assert {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*.png")} == inputs
        rows = manifest(proj)
        assert sorted(rows) == sorted(files)
        assert rows["noisy/a.png"]["status"] == "failed", rows["noisy/a.png"]
        assert rows["noisy/a.png"]["error"].startswith(
            f"its output noisy/a.png would be in the input folder {src}, where"
        )
        assert {rows[p]["status"] for p in ("a.png", "c/d.png")} <= {"ok", "skipped"}
    assert {rows[p]["status"] for p in ("a.png", "c/d.png")} == {"skipped"}
    assert "have no row" not in result.stderr and (proj / "c" / "d.png").exists()

    # A folder of Parquet files inside DST: no row writes beside them.
    data = tmp_path / "data"
    (data / "pq").mkdir(parents=True)
    table = pa.table({"path": ["pq/x.png", "y.png"], "image": [png(digits[3])] * 2})
    pq.write_table(table, data / "pq" / "data.parquet")
    result = run_job(
        "--model", model_path, "--input", data / "pq", "--output", data, ray=shared_ray
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = manifest(data)
    assert rows["y.png"]["status"] == "ok" and rows["pq/x.png"]["status"] == "failed"
    assert f"would be in the input folder {data / 'pq'}, where" in rows["pq/x.png"]["error"]
    assert sorted(p.name for p in (data / "pq").iterdir()) == ["data.parquet"]


@pytest.mark.parametrize("layout", ["in DST", "in DST through a link", "linked into DST"])
def test_outputs_stay_out_of_the_input_folder_however_dst_reaches_it(layout, tmp_path):
    """--input data/noisy --output data, where data/noisy is a folder, a link to one in
    data, or a link to another disk: an output that would land in the input folder
    fails, and the input folder's files (a stale temp file among them) are neither taken
    for outputs nor removed."""
    data, disk2 = tmp_path / "data", tmp_path / "disk2" / "noisy"
    real = {"in DST": data / "noisy", "in DST through a link": data / "v2" / "noisy"}
    real = real.get(layout, disk2)
    for rel in ("a.png", "noisy/a.png", f".c.png.1{job.TMP_MARK}"):
        (real / rel).parent.mkdir(parents=True, exist_ok=True)
        (real / rel).write_bytes(png(np.zeros((4, 4), np.uint8)))
    data.mkdir(exist_ok=True)
    if real != data / "noisy":
        (data / "noisy").symlink_to(real)
    output = job.Storage(str(data))
    inputs = job.find_inputs(str(data / "noisy"), "auto", str(data))
    within = job.SourceFolder.of(inputs, output)
    assert job.existing_outputs(output, {}, within) == (set(), set())
    assert (real / f".c.png.1{job.TMP_MARK}").exists()
    args = SimpleNamespace(format="same")
    early, todo = job._plan(inputs, args, set(), {}, False, within=within)
    assert todo == [("a.png", len(png(np.zeros((4, 4), np.uint8))))]
    assert [row["path"] for row in early] == ["noisy/a.png"]
    assert early[0]["error"] == (
        f"its output noisy/a.png would be in the input folder {data / 'noisy'}, where it "
        "could replace an input"
    )


def test_a_glob_the_shell_expanded_is_said_to_be_one(tmp_path, capsys):
    """--input dir/*.png left unquoted reaches the job as one path per file: argparse
    named the rest as unrecognized arguments, and not why."""
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(png(np.zeros((4, 4), np.uint8)))
    expanded = [str(p) for p in sorted(tmp_path.glob("*.png"))]  # (what the shell passes)
    out = str(tmp_path / "o")
    for extra, said in (
        (expanded[1:], f"got {expanded[0]} and these: the shell expands a glob left unquoted"),
        (["--bogus"], None),
    ):
        with pytest.raises(SystemExit) as stopped:
            job.main(["--model", "m.keras", "--input", expanded[0], *extra, "--output", out])
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert f"unrecognized arguments: {' '.join(extra)}" in err
        assert said in err if said else "quote it" not in err
    assert not (tmp_path / "o").exists()


def test_bad_locations_and_flags_fail_at_once_and_leave_nothing(
    model_path, dataset, tmp_path, shared_ray
):
    """Each exits 2 with a message naming the flag, before any image is touched."""
    folder = tmp_path / "pq"  # a folder of Parquet files: the manifest would be listed
    folder.mkdir()
    table = pa.table({"path": ["a.png"], "image": pa.array([png(np.zeros((8, 8), np.uint8))])})
    pq.write_table(table, folder / "part-0.parquet")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    no_images = tmp_path / "no-images.parquet"  # refused once --output is locked
    pq.write_table(pa.table({"path": ["a.png"], "pixels": [b"x"]}), no_images)
    empty = tmp_path / "empty.parquet"  # (as a folder of no files: it said "0 inputs", exit 0)
    pq.write_table(table.slice(0, 0), empty)
    src = ["--model", model_path, "--input", dataset["src"]]
    renamed = tmp_path / "renamed"  # references of other names: none measured, at the end
    renamed.mkdir()
    for path in sorted(dataset["clean"].rglob("*.png"))[:3]:
        shutil.copy(path, renamed / f"ref-{path.name}")
    first = sorted(rel for rel, _ in job.find_inputs(str(dataset["src"]), "auto").files)[0]
    cases = [
        (
            [*src, "--output", tmp_path / "o8", "--clean", renamed],
            f"--clean {renamed} holds the reference of none of the ",
        ),
        (
            ["--model", model_path, "--input", no_images, "--output", tmp_path / "o6" / "o"],
            f"--input {no_images} has no column(s) ['image']; found ['path', 'pixels']",
        ),
        (
            ["--model", model_path, "--input", empty, "--output", tmp_path / "o6" / "o"],
            f"--input {empty}: its Parquet file holds no rows: nothing to denoise.",
        ),
        ([*src, "--output", a_file], "is a file"),
        ([*src, "--output", dataset["clean"], "--clean", dataset["clean"]], "overlap"),
        ([*src, "--output", dataset["clean"] / "o", "--clean", dataset["clean"]], "overlap"),
        ([*src, "--output", tmp_path / "o5", "--clean", dataset["src"]], "its own reference"),
        (["--model", model_path, "--input", folder, "--output", folder / "out"], "inside --input"),
        ([*src, "--output", "/proc/aelib-out"], "--output /proc/aelib-out: cannot write there"),
        # (whole messages: argparse's usage lines name every flag)
        (
            [*src, "--output", tmp_path / "o1", "--cpus-per-worker", "0"],
            "argument --cpus-per-worker: must be a number > 0. Received: 0",
        ),
        (
            [*src, "--output", tmp_path / "o2", "--gpus-per-worker", "-1"],
            "argument --gpus-per-worker: must be a number >= 0. Received: -1",
        ),
        (  # (Ray's traceback, after it had started and the output folder was made)
            [*src, "--output", tmp_path / "o2", "--cpus-per-worker", "0.00001"],
            "argument --cpus-per-worker: must be at least 0.0001, the smallest share Ray counts",
        ),
        (
            [*src, "--output", tmp_path / "o2", "--gpus-per-worker", "1e-5"],
            "argument --gpus-per-worker: must be 0 or at least 0.0001, the smallest share Ray",
        ),
        # ("$OUT" with OUT unset: the job wrote into the current folder, and exited 0)
        ([*src, "--output", ""], "argument --output: expected a path or URI, not an empty"),
        ([*src, "--output", tmp_path / "o2", "--clean", " "], "argument --clean: expected a"),
        (
            [*src, "--output", tmp_path / "o2", "--clean", tmp_path / "nope"],
            f"--clean {tmp_path / 'nope'} does not exist; expected a folder of the clean",
        ),
        ([*src, "--output", tmp_path / "o2", "--clean", a_file], "a-file is not a folder; exp"),
        (
            [*src, "--output", tmp_path / "o3", "--quality", "101"],
            "argument --quality: must be between 1 and 100. Received: 101",
        ),
        (
            [*src, "--output", tmp_path / "o4", "--max-pixels", "-1", "--max-failed", "0"],
            "argument --max-pixels: must be >= 0. Received: -1",
        ),
        (
            [*src, "--output", tmp_path / "o4", "--max-failed", "-1"],
            "argument --max-failed: must be >= 0. Received: -1",
        ),
        (  # an object store out of reach (rc 1 and "rerun to resume", naming no flag)
            [
                *src[:2],
                *("--input", "s3://KEY:SECRET@bkt/in?endpoint_override=127.0.0.1:1&scheme=http"),
                *("--output", tmp_path / "o7"),
            ],
            "--input s3://KEY:***@bkt/in?endpoint_override=127.0.0.1:1&scheme=http: cannot list",
        ),
    ]
    for args, message in cases:
        result = run_job(*args)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert message in result.stderr, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
    assert not (dataset["clean"] / "o").exists() and not (folder / "out").exists()
    assert not any(
        (tmp_path / o).exists() for o in ("o1", "o2", "o3", "o4", "o5", "o6", "o7", "o8")
    )
    said = f"(for {first}, no {renamed / first}): a reference is the clean image at its input's"
    assert said in run_job(*src, "--output", tmp_path / "o8", "--clean", renamed).stderr
    # A stopped cluster's address left exported: ray.init retried it for minutes.
    gone = {"RAY_ADDRESS": "127.0.0.1:1"}  # (nothing listens on port 1)
    result = run_job(*src, "--output", tmp_path / "o9", ray=gone, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    said = "denoise: error: RAY_ADDRESS=127.0.0.1:1: no Ray cluster answers there ("
    assert said in result.stderr and not (tmp_path / "o9").exists()
    # No address at all: ray.init's ValueError, as a failure of the run "kept to resume".
    result = run_job(*src, "--output", tmp_path / "o9", ray={"RAY_ADDRESS": "x"}, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    said = "denoise: error: RAY_ADDRESS=x: not the address of a Ray cluster (expected host:port"
    assert said in result.stderr and not (tmp_path / "o9").exists()
    # A cluster of token authentication, given another token: ray.init logged its refusal
    # each second for 20 s (here Ray's retries cut to 1 s), then "Failed to connect".
    (tmp_path / "token").write_text("0" * 64)
    other = {**shared_ray, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}
    other["RAY_gcs_server_port_wait_time_s"] = "1"
    result = run_job(*src, "--output", tmp_path / "o9", ray=other, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    said = "takes token authentication and refused this driver (RAY_AUTH_MODE token): export"
    assert said in result.stderr and not (tmp_path / "o9").exists(), result.stderr[-2000:]


def test_flags_the_inputs_give_nothing_to_act_on_are_noted(tmp_path, capsys):
    """--image-column/--path-column with image files, and --quality where no output is a
    JPEG or WEBP, were ignored without a word."""
    (tmp_path / "a.png").write_bytes(png(np.zeros((8, 8), np.uint8)))
    inputs = job.find_inputs(str(tmp_path), "auto")
    parser = job.build_parser()
    base = ["--model", "m.keras", "--input", str(tmp_path), "--output", str(tmp_path / "o")]
    for flags, said in (
        (["--image-column", "pixels"], "--image-column names a Parquet column; --input "),
        (
            ["--image-column", "pixels", "--path-column", "name"],
            "--image-column and --path-column name Parquet columns; --input ",
        ),
        (["--quality", "60"], "--quality is that of JPEG and WEBP outputs; this run writes PNG"),
        (["--quality", "60", "--format", "webp"], None),
        (["--quality", "95"], None),
        ([], None),
    ):
        job._note_unused_flags(parser.parse_args([*base, *flags]), inputs)
        err = capsys.readouterr().err
        assert (said in err) if said else err == "", (flags, err)


def test_uris_an_object_store_would_read_otherwise_are_refused():
    """'#' ended the path (the outputs went to the folder before it), '.' and '..' were
    resolved when writing but not when listing (an output "outside" the input was in
    it), and a space did not parse (pyarrow's message named no flag)."""
    for uri, said in (
        ("s3://b/res#1/out", "a '#' ends a URI's path; write it as %23."),
        ("s3://b/./noisy/out", "'.' and '..' are not folders in an object store"),
        ("gs://b/x/../noisy", "'.' and '..' are not folders in an object store"),
        # (pyarrow decodes them: s3://b/x/%2E%2E/in wrote over the inputs in s3://b/in)
        ("s3://b/x/%2E%2E/in", "'.' and '..' are not folders in an object store"),
        ("s3://b/x%2F..%2Fin", "'.' and '..' are not folders in an object store"),
        ("s3://b/%2e/in", "'.' and '..' are not folders in an object store"),
        ("s3://K:S@b/a b?region=x", "percent-encode spaces and non-ASCII letters in a URI"),
        ("s3://b/\u00f6dd", "percent-encode spaces and non-ASCII letters in a URI"),
    ):
        with pytest.raises(ValueError) as e:
            job.check_uri(uri, "--output")
        assert str(e.value).startswith(f"--output {job.redacted(uri)}: {said}"), str(e.value)
        assert "S@" not in str(e.value)
    for fine in ("s3://b/res%231/out", "s3://b/a%20b/*.png?region=x", "./x/../#1 b", "file:///a b"):
        job.check_uri(fine, "--output")
    job.check_uri("s3://b/a%2Eb/..c/%2E%2Ed", "--output")  # (names with dots in them)
    # A secret with a quote in it (S3-compatible stores allow one) was shown whole.
    assert job.redacted("x 's3://K:Sup'er@b/o?e=1' y") == "x 's3://K:***@b/o?e=1' y"


def test_an_object_as_output_and_uris_pyarrow_refuses_name_their_flag(
    model_path, s3, monkeypatch, capsys
):
    """An --output that is an object (a file) on S3 was taken: its outputs went to keys
    below it, and no rerun found them. pyarrow's errors of URIs it cannot use ("Unexpected
    query parameter", "Empty path component") named no flag, a glob's '?' wildcard no
    reason."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    with s3.fs.open_output_stream(f"{BUCKET}/objects/one.png") as f:
        f.write(png(np.zeros((8, 8), np.uint8)))
    one = f"s3://{BUCKET}/objects/one.png"
    base = ["--model", str(model_path)]
    for flags, said in (
        (["--input", one, "--output", one], f"--output {one} is an object (a file); expected a"),
        (
            ["--input", f"s3://{BUCKET}/objects/?.png", "--output", f"s3://{BUCKET}/o"],
            f"--input s3://{BUCKET}/objects/?.png: Unexpected query parameter",
        ),
        (
            ["--input", one, "--output", f"s3://{BUCKET}/o?bogus=1"],
            f"--output s3://{BUCKET}/o?bogus=1: Unexpected query parameter in S3 URI: 'bogus'",
        ),
        (
            ["--input", f"s3://{BUCKET}//objects", "--output", f"s3://{BUCKET}/o"],
            f"--input s3://{BUCKET}//objects: Empty path component",
        ),
    ):
        assert job.main([*base, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert said in err, err
    assert (
        "'?' starts a URI's query"
        in job._uri_error(
            "--input", "s3://b/?.png", ValueError("Unexpected query parameter in S3 URI: '.png'")
        ).args[0]
    )


def test_an_impossible_actor_request_fails_instead_of_waiting(
    model_path, dataset, tmp_path, shared_ray
):
    """No node of this CPU-only Ray has a GPU: Ray Data would wait forever for such an
    actor. The job says so and removes its unfinished manifest."""
    dst = tmp_path / "out"
    result = run_job(
        "--model", model_path, "--input", dataset["src"], "--output", dst,
        "--gpus-per-worker", "1", timeout=120, ray=shared_ray,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no node of this Ray cluster has that much" in result.stderr, result.stderr[-2000:]
    assert "{CPU: 1, GPU: 1}" in result.stderr and "--allow-autoscale" in result.stderr
    assert not dst.exists(), "nothing left behind, nor the --output folder it made"
    # With --allow-autoscale on a cluster whose autoscaler may add no such node either
    # (its node types as the config `ray up` leaves on the head says them), it waited
    # without end; it now says so. (An actor that a node type holds is waited for.)
    config = Path(__file__).resolve().parents[1] / "cluster.yaml"  # (gpu_worker: 4 CPUs, 1 GPU)
    result = run_job(
        "--model", model_path, "--input", dataset["src"], "--output", dst,
        "--gpus-per-worker", "2", "--allow-autoscale", timeout=120,
        ray={**shared_ray, "AELIB_AUTOSCALING_CONFIG": str(config)},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    said = f"nor may its autoscaler add one: the node types in {config} have gpu_worker: "
    assert said + "{CPU: 4, GPU: 1}. Lower --cpus-per-worker or --gpus-per-worker" in result.stderr
    assert not dst.exists()


def test_folder_links_are_followed_loops_end_and_broken_links_get_a_row(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.png").write_bytes(b"12")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "y.png").write_bytes(b"123")
    root = tmp_path / "a"
    (root / "linked").symlink_to(tmp_path / "elsewhere")  # a dataset assembled from links
    (root / "b" / "loop").symlink_to(root)
    (root / "gone.png").symlink_to(tmp_path / "missing.png")
    assert job.Storage(str(root)).walk() == [("b/x.png", 2), ("gone.png", 0), ("linked/y.png", 3)]
    # A glob ends loops too: glob.glob gave x.png once per pass through a loop (41), and
    # with two loops never ended.
    (root / "b" / "loop2").symlink_to(root / "b")
    for pattern in ("**/*.png", "**/x.png", "b/*.png"):
        found = job.find_inputs(f"{root}/{pattern}", "auto").files
        assert len([rel for rel, _ in found if rel.endswith("x.png")]) == 1, pattern
    # and the listing says so (a loop was left out without a word)
    assert job.find_inputs(str(root), "auto").notes == [
        f"--input {root}: 2 links to a folder above them not followed, as a loop (e.g. "
        f"b/loop, to {root})"
    ]
    # A FIFO and a link to a device are inputs (with a failed row): reading /dev/zero
    # filled the memory, and a FIFO was left out without a word.
    os.mkfifo(root / "pipe.png")
    (root / "zero.png").symlink_to("/dev/zero")
    storage = job.Storage(str(root))
    listed = dict(storage.walk())
    assert listed["pipe.png"] == 0 and listed["zero.png"] == 0
    for rel, kind in (("pipe.png", "a FIFO"), ("zero.png", "a character device")):
        with pytest.raises(ValueError, match=f"not a regular file but {kind}"):
            storage.read(rel)
    # A link to itself is listed too (its is_dir() raised ELOOP: the whole job stopped).
    (root / "self.png").symlink_to("self.png")
    inputs = job.find_inputs(str(root), "auto")
    assert dict(inputs.files)["self.png"] == 0
    # The driver fails what is not a regular file itself, saying why as an actor's read
    # would: a rerun retried them on actors every time, starting Ray for nothing.
    early, todo = job._plan(inputs, SimpleNamespace(format="same"), set(), {}, False)
    reasons = {row["path"]: row["error"] for row in early if row["status"] == "failed"}
    assert sorted(reasons) == ["gone.png", "pipe.png", "self.png", "zero.png"], early
    assert reasons["gone.png"].endswith(
        "is a link to " + str(tmp_path / "missing.png") + ", which does not exist"
    )
    assert "a FIFO" in reasons["pipe.png"] and "a character device" in reasons["zero.png"]
    assert "Too many levels of symbolic links" in reasons["self.png"]
    assert todo == [("b/x.png", 2), ("linked/y.png", 3)]
    # A --clean reached through a link is the same --clean (taken for another, it cost
    # the outputs' metrics for good).
    assert job._place(str(root / "linked")) == job._place(str(tmp_path / "elsewhere"))


def _without_read_override() -> list[str]:
    """A command prefix under which this user may not read what its permissions deny:
    none for a user other than root; for root, setpriv without the capabilities that let
    it read anything (or the test is skipped)."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("root, and no setpriv to give up reading what permissions deny")
    return ["setpriv", "--inh-caps=-dac_override,-dac_read_search"] + [
        "--bounding-set=-dac_override,-dac_read_search"
    ]


def test_a_folder_that_cannot_be_listed_fails_alone(model_path, tmp_path):
    """A folder under --input that may not be listed (a lost+found in a shared tree)
    stopped the whole job ("cannot list it"): now it gets a failed row naming why, and
    the rest is done; a glob that does not reach into it does not mention it. Here the
    rest is a FIFO, which the driver fails itself: no Ray is started (and as every input
    failed, the job exits 3)."""
    prefix = _without_read_override()
    src = tmp_path / "in"
    (src / "locked").mkdir(parents=True)
    (src / "locked" / "x.png").write_bytes(png(np.zeros((28, 28), np.uint8)))
    (src / "open").mkdir()
    os.mkfifo(src / "open" / "pipe.png")
    (src / "locked").chmod(0)
    try:
        if subprocess.run([*prefix, "ls", src / "locked"], capture_output=True).returncode == 0:
            pytest.skip("this user lists a folder whose permissions deny it")
        dst = tmp_path / "out"
        result = subprocess.run(
            [*prefix, sys.executable, JOB, "--model", model_path, "--input", src, "--output", dst],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=300,
        )
        assert result.returncode == 3, result.stderr[-3000:]  # (every input failed)
        rows = manifest(dst)
        assert sorted(rows) == ["locked", "open/pipe.png"], rows
        assert rows["locked"]["status"] == "failed"
        assert rows["locked"]["error"].startswith("a folder that could not be listed (Permission")
        assert "a FIFO" in rows["open/pipe.png"]["error"] and "ray_ready_s" not in result.stdout
        summary = json.loads(result.stdout.split("denoise-summary ")[1])
        assert (summary["ok"], summary["failed"]) == (0, 2)
        # A glob whose listing meets the folder but cannot match in it: no row for it.
        dst = tmp_path / "out2"
        args = ["--model", model_path, "--input", f"{src}/[!l]*/*.png", "--output", dst]
        result = subprocess.run(
            [*prefix, sys.executable, JOB, *args], capture_output=True, text=True, env=_env()
        )
        assert result.returncode == 3, result.stderr[-3000:]
        assert sorted(manifest(dst)) == ["open/pipe.png"]
    finally:
        (src / "locked").chmod(0o755)


def test_a_run_on_another_input_says_it_drops_the_last_runs_rows(model_path, tmp_path):
    """The manifest holds one run's inputs: a run on another --input into the same DST
    replaced it without a word (the other run's rows, metrics and failure reasons gone).
    (FIFOs for inputs: each fails in the driver, so no run starts Ray.)"""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        os.mkfifo(tmp_path / name / f"{name}.png")
    dst = tmp_path / "out"
    for src, note in (("a", False), ("a", False), ("b", True)):
        result = run_job("--model", model_path, "--input", tmp_path / src, "--output", dst)
        assert result.returncode == 3, result.stderr[-3000:]  # (every input failed)
        assert sorted(manifest(dst)) == [f"{src}.png"]
        said = f"holds the manifest of a run on another --input ({tmp_path / 'a'}): this"
        assert (said in result.stderr) == note, result.stderr[-3000:]


def test_hidden_files_are_not_inputs_unless_a_glob_names_them(tmp_path, monkeypatch):
    hidden = (".DS_Store", ".git/objects/ab", "sub/.b.png.swp", "._a.png", ".c.png")
    for rel in ("a.png", "sub/b.png", *hidden):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = job.find_inputs(str(tmp_path), "auto")
    assert [rel for rel, _ in found.files] == ["a.png", "sub/b.png"] and found.hidden == 1
    monkeypatch.chdir(tmp_path)  # a local glob: Python's glob leaves hidden files out ...
    assert [rel for rel, _ in job.find_inputs("**/*", "auto").files] == ["a.png", "sub/b.png"]
    assert [rel for rel, _ in job.find_inputs("sub/.*", "auto").files] == [".b.png.swp"]
    # ... and a remote listing matches as the local glob does (fnmatch's "*" spanned
    # folders, and "**/" needed one: "s3://b/**/*.png" missed the top folder's images)
    listing = job.Storage(str(tmp_path)).walk()
    patterns = ["*", "**/*", "**", "sub/*", "**/*.png", "*/b.png", "*.png", "sub/.*", "**/.*"]
    patterns += ["[as]*", "?.png", "s?b/[!x]*", "**/objects/*", ".git/**"]
    for pattern in patterns:
        local = sorted(glob.glob(pattern, root_dir=tmp_path, recursive=True))
        local = [rel for rel in local if (tmp_path / rel).is_file()]
        assert [rel for rel, _ in job._matching(listing, pattern)] == local, pattern
    (tmp_path / "a.png").unlink()
    (tmp_path / "sub" / "b.png").unlink()
    with pytest.raises(ValueError, match=r"no files found \(only 5 hidden ones\)"):
        job.find_inputs(str(tmp_path), "auto")
    # A glob naming only folders: say that it takes no file inside them.
    with pytest.raises(ValueError, match=r"no files found; a glob takes the files it names, not"):
        job.find_inputs(f"{tmp_path}/s*", "auto")


def test_a_rerun_measures_again_the_outputs_whose_reference_changed(
    model_path, tmp_path, shared_ray
):
    """A --clean reference replaced (fixed, regenerated) or removed since: a rerun skipped
    its output with the metrics of the old file, and a user could only delete DST and
    denoise everything again. Each row records its reference's size and time; an input
    whose reference has others now is done again, and the rest stay skipped."""
    from skimage.metrics import peak_signal_noise_ratio

    src, clean, dst = tmp_path / "in", tmp_path / "clean", tmp_path / "out"
    src.mkdir()
    clean.mkdir()
    rng = np.random.default_rng(11)
    truth = {name: (rng.random((28, 28)) * 255).astype(np.uint8) for name in "abc"}
    for name, digit in truth.items():
        noisy = np.clip(digit + rng.normal(0, 60, digit.shape), 0, 255).astype(np.uint8)
        (src / f"{name}.png").write_bytes(png(noisy))
        (clean / f"{name}.png").write_bytes(png(digit))
    args = ["--model", model_path, "--input", src, "--output", dst, "--clean", clean]
    assert run_job(*args, ray=shared_ray).returncode == 0
    first = manifest(dst)
    assert first["a.png"]["clean_bytes"] == (clean / "a.png").stat().st_size
    assert first["a.png"]["clean_mtime_ns"] == (clean / "a.png").stat().st_mtime_ns
    fixed = 255 - truth["a"]
    (clean / "a.png").write_bytes(png(fixed))
    (clean / "b.png").unlink()
    result = run_job(*args, ray=shared_ray)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the --clean references of 2 input(s) changed since" in result.stderr
    rows = manifest(dst)
    assert {n: r["status"] for n, r in rows.items()} == {
        "a.png": "ok", "b.png": "ok", "c.png": "skipped"
    }  # fmt: skip
    out = np.asarray(Image.open(dst / "a.png"), np.float64) / 255
    assert rows["a.png"]["psnr"] == pytest.approx(
        peak_signal_noise_ratio(fixed / 255, out, data_range=1.0), abs=1e-9
    )
    assert rows["b.png"]["psnr"] is None and rows["b.png"]["clean_bytes"] == -1
    assert rows["c.png"]["psnr"] == first["c.png"]["psnr"]
    # The same bytes with another time (a copy that did not keep times, `touch`): not
    # done again, the row takes the time it has now.
    assert rows["c.png"]["clean_crc32"] == zlib.crc32((clean / "c.png").read_bytes())
    os.utime(clean / "c.png", ns=(10**18, 10**18))
    again = run_job(*args, ray=shared_ray)
    assert "0 ok, 0 failed, 3 skipped" in again.stdout, again.stdout[-2000:]
    assert "changed since" not in again.stderr
    assert manifest(dst)["c.png"]["clean_mtime_ns"] == 10**18


def test_a_rerun_retries_failures_that_were_not_the_input(tmp_path):
    """A write that failed (disk full, read-only) or a model call that failed may pass
    now; an unreadable image fails again: only that one is carried over."""
    files = [(name, 10) for name in ("bad.png", "full.png", "model.png", "read.png")]
    inputs = job.Inputs(kind="files", storage=None, files=files, parquet=[])
    before = {
        "bad.png": "(earlier run) not a readable image (UnidentifiedImageError: ...)",
        "full.png": "cannot write full.png: [Errno 28] No space left on device",
        "model.png": "model failed on a 32x32 batch: ResourceExhaustedError: OOM",
        "read.png": "PermissionError: [Errno 13] Permission denied",
    }
    before = {
        p: {"path": p, "status": "failed", "error": e, "input_bytes": 10} for p, e in before.items()
    }
    early, todo = job._plan(inputs, SimpleNamespace(format="same"), set(), before, False)
    assert [r["path"] for r in early] == ["bad.png"] and early[0]["status"] == "failed"
    assert todo == [("full.png", 10), ("model.png", 10), ("read.png", 10)]


def test_relative_globs_and_folders_with_glob_characters(tmp_path, monkeypatch):
    scans = tmp_path / "scan[1]"  # a real folder whose name looks like a glob
    (scans / "sub").mkdir(parents=True)
    for rel in ("a.png", "b.png", "sub/c.png", "notes.txt"):
        (scans / rel).write_bytes(b"x")
    found = job.find_inputs(str(scans), "auto")
    assert [rel for rel, _ in found.files] == ["a.png", "b.png", "notes.txt", "sub/c.png"]
    monkeypatch.chdir(scans)
    for pattern, expected in (
        ("*.png", ["a.png", "b.png"]),
        ("**/*.png", ["a.png", "b.png", "sub/c.png"]),
    ):
        found = job.find_inputs(pattern, "auto")
        assert sorted(rel for rel, _ in found.files) == expected
        assert found.storage.root == str(scans)
        # an output beside the input folder is not "inside" a relative glob's root
        job.check_locations(found, pattern, job.Storage(str(tmp_path / "out")))
        with pytest.raises(ValueError, match="inside --input"):
            job.check_locations(found, pattern, job.Storage("out"))


def test_names_outputs_and_formats_a_user_can_trip_on(model_path, tmp_path, shared_ray):
    """Per file, never for the whole job: a name that is not UTF-8, two inputs with one
    output, alpha and 16 bits into JPEG, a GIF, float pixels; the PSNR of a JPEG output
    is that of the file written; a photo keeps its EXIF orientation, ICC profile and DPI
    in JPEG and in PNG; then a rerun with other settings retries the failures, keeps
    finished outputs and redoes an input that changed."""
    from PIL import ImageCms

    src, dst, clean = tmp_path / "in", tmp_path / "out", tmp_path / "clean"
    src.mkdir()
    clean.mkdir()
    rng = np.random.default_rng(3)
    gray = (rng.random((12, 12)) * 255).astype(np.uint8)

    def save(name: str, image: Image.Image, fmt: str) -> None:
        image.save(src / name, format=fmt)

    save("x.jpg", Image.fromarray(gray), "JPEG")
    save("x.png", Image.fromarray(gray[:10, :10]), "PNG")  # with --format jpeg: x.jpg too
    save("y.jpg", Image.fromarray(gray[:8, :9]), "JPEG")
    save("rgba.png", Image.fromarray(np.dstack([gray, gray, gray, gray])), "PNG")
    save("cmyk.jpg", Image.fromarray(np.dstack([gray] * 3)).convert("CMYK"), "JPEG")
    save("g16.png", Image.fromarray(gray.astype(np.uint16) * 257), "PNG")  # I;16
    save("anim.gif", Image.fromarray(gray), "GIF")
    photo = Image.fromarray(np.dstack([gray, gray[::-1], gray.T]))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: shown rotated 90 degrees
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    tags = {"exif": exif, "icc_profile": icc, "dpi": (300, 300)}
    photo.save(src / "photo.jpg", format="JPEG", **tags)
    photo.save(src / "scan.png", format="PNG", **tags)
    save("float.tif", Image.fromarray(gray / np.float32(255)), "TIFF")  # mode F, in [0, 1]
    save("big.png", Image.fromarray(np.tile(gray, (2, 2))), "PNG")  # 576 pixels: > 500
    (src / "rgb16.png").write_bytes(job.encode_png(np.full((4, 5, 3), 40000, np.uint16)))

    def assert_tags(path: Path) -> None:
        with Image.open(path) as image:
            assert image.getexif().get(0x0112) == 6, path
            assert image.info.get("icc_profile") == icc, path
            assert image.info.get("dpi") == pytest.approx((300, 300), abs=0.01), path

    with open(os.path.join(os.fsencode(src), b"bad\xffname.png"), "wb") as f:
        f.write(png(gray))
    references = {"y.jpg": gray[:8, :9], "g16.png": gray.astype(np.uint16) * 257}
    for name, reference in references.items():  # lossless references under the same names
        Image.fromarray(reference).save(clean / name, format="PNG")
    result = run_job(
        "--model", model_path, "--input", src, "--output", dst, "--format", "jpeg",
        "--clean", clean, "--quality", 60, "--max-pixels", 500, ray=shared_ray,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = manifest(dst)
    for name, reference in references.items():
        written = np.asarray(Image.open(dst / name.replace(".png", ".jpg")), np.float64)
        if reference.dtype == np.uint16:  # scaled to 8 bits for JPEG, measured in 16
            written = np.rint(written * 65535 / 255)
        peak = np.iinfo(reference.dtype).max
        mse = np.mean((written / peak - reference / peak) ** 2)
        assert rows[name]["psnr"] == pytest.approx(10 * np.log10(1 / mse), abs=1e-6), name
    assert rows["bad\\xffname.png"]["status"] == "failed"
    assert "not valid UTF-8" in rows["bad\\xffname.png"]["error"]
    assert rows["x.jpg"]["status"] == "ok" and rows["x.png"]["status"] == "failed"
    assert "also the output of x.jpg; rename one of them" in rows["x.png"]["error"]
    assert Image.open(dst / "x.jpg").size == (12, 12)  # x.jpg's own result, not x.png's
    assert rows["rgba.png"]["status"] == "ok" and "alpha dropped" in rows["rgba.png"]["error"]
    assert rows["rgba.png"]["channels"] == 4 and rows["g16.png"]["channels"] == 1
    assert rows["cmyk.jpg"]["channels"] == 3  # as denoised and written: RGB, and said so
    assert "CMYK pixels converted to RGB" in rows["cmyk.jpg"]["error"]
    assert rows["g16.png"]["status"] == "ok" and "8 bits" in rows["g16.png"]["error"]
    for name, mode in (("rgba.jpg", "RGB"), ("g16.jpg", "L"), ("anim.jpg", "L")):
        with Image.open(dst / name) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", mode, (12, 12)), name
    assert_tags(dst / "photo.jpg")
    assert_tags(dst / "scan.jpg")
    assert "16-bit RGB read as 8 bits" in rows["rgb16.png"]["error"]
    assert rows["float.tif"]["status"] == "failed" and "mode F" in rows["float.tif"]["error"]
    assert not (dst / "float.jpg").exists()  # not rounded to a black image
    assert rows["big.png"]["status"] == "failed" and not (dst / "big.jpg").exists()
    assert "576 pixels, more than --max-pixels 500" in rows["big.png"]["error"]
    # Rerun into the same folder with --format same, after x.jpg was replaced.
    save("x.jpg", Image.fromarray(gray[:11, :7]), "JPEG")
    result = run_job("--model", model_path, "--input", src, "--output", dst, ray=shared_ray)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "another format" in result.stderr and "max_pixels" in result.stderr
    assert "model_sha256" not in result.stderr  # (the same model: nothing to say of it)
    rows = manifest(dst)
    assert rows["y.jpg"]["status"] == "skipped"  # its output is there, the input unchanged
    assert rows["cmyk.jpg"]["status"] == "skipped"  # with what the first run said of it
    assert rows["cmyk.jpg"]["error"].startswith("(earlier run) CMYK pixels converted to RGB")
    assert rows["x.jpg"]["status"] == "ok"  # changed since the last run: done again
    assert Image.open(dst / "x.jpg").size == (7, 11)
    assert rows["x.png"]["status"] == "ok"  # the earlier failure is retried: own output now
    assert rows["big.png"]["status"] == "ok"  # retried: within the default --max-pixels
    assert Image.open(dst / "big.png").size == (24, 24)
    assert rows["anim.gif"]["output"] == "anim.png"  # same format where the job writes it
    assert rows["scan.png"]["status"] == "ok"  # a new output: PNG now
    assert_tags(dst / "scan.png")  # from the job's own PNG encoder
    with Image.open(dst / "anim.png") as image:
        assert image.format == "PNG"
    assert rows["bad\\xffname.png"]["status"] == "failed"
    # One file as --input, its output in a folder beside it (nothing there is listed);
    # a colour photo made gray by --rgb luminance keeps its EXIF and DPI, not its RGB
    # profile; two I/O threads.
    one = src / "denoised"
    result = run_job(
        "--model", model_path, "--input", src / "photo.jpg", "--output", one,
        "--rgb", "luminance", "--io-threads", 2, ray=shared_ray,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(manifest(one)) == ["photo.jpg"] and manifest(one)["photo.jpg"]["status"] == "ok"
    # (one block, one actor: a second would only have loaded the model)
    assert "denoise: 1 file to do on 1 worker(s)" in result.stdout, result.stdout
    with Image.open(one / "photo.jpg") as image:
        assert (image.mode, image.size, image.getexif().get(0x0112)) == ("L", (12, 12), 6)
        assert "icc_profile" not in image.info
        assert image.info.get("dpi") == pytest.approx((300, 300), abs=0.01)


def test_a_dense_model_is_refused_up_front(dataset, tmp_path):
    import aelib

    path = aelib.save(aelib.build_model("dense"), tmp_path / "dense.keras")
    result = run_job("--model", path, "--input", dataset["src"], "--output", tmp_path / "o")
    assert result.returncode == 2
    assert "needs an image model" in result.stderr, result.stderr[-2000:]
    assert "784" in result.stderr
    assert not (tmp_path / "o").exists()


def _with_weights(source: Path, target: Path, change, record: dict | None = None) -> Path:
    """A copy of the .keras file `source` whose first weight array `change` rewrites
    (and whose aelib.json record gets `record`'s metrics, if given)."""
    import h5py

    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == "model.weights.h5":
                buffer = io.BytesIO(data)
                with h5py.File(buffer, "r+") as weights:
                    first = weights.visititems(
                        lambda n, o: n if isinstance(o, h5py.Dataset) else None
                    )
                    weights[first][...] = change(weights[first][()])
                data = buffer.getvalue()
            elif item.filename == "aelib.json" and record is not None:
                info = json.loads(data)
                data = json.dumps({**info, "metrics": {**info["metrics"], **record}}).encode()
            zout.writestr(item, data)
    return target


def test_a_model_whose_weights_are_nan_is_refused_up_front(model_path, dataset, tmp_path):
    """A diverged run's model (aelib train saves it, exit 1) made every output NaN: each
    image was written black and counted ok. Refused before Ray, naming --model, what is
    wrong and, from aelib's record, the epoch the loss became NaN in."""
    src = dataset["src"] / "sizes"
    nan = _with_weights(
        model_path, tmp_path / "nan.keras", lambda w: w * np.nan, {"nan": True, "epochs_run": 3}
    )
    result = run_job("--model", nan, "--input", src, "--output", tmp_path / "o")
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"denoise: error: --model {nan} (denoise): 1 of its weight arrays"), line
    assert "NaN or infinite" in line and "loss became NaN in epoch 3" in line, line
    assert "Started a local Ray" not in result.stderr
    assert not (tmp_path / "o").exists()
    # Any model's: one infinite value, no aelib record of a run.
    inf = _with_weights(
        model_path, tmp_path / "inf.keras", lambda w: np.where(w == w.flat[0], np.inf, w)
    )
    with pytest.raises(ValueError, match="a diverged training run saves such weights"):
        job.inspect_model(inf.read_bytes(), "inf.keras")
    same = _with_weights(model_path, tmp_path / "same.keras", lambda w: w)
    assert job.inspect_model(same.read_bytes(), "same.keras").name == "denoise"


def test_a_model_the_actors_cannot_use_is_a_clear_error(dataset, tmp_path, shared_ray):
    """Its config looks like an image model; only running it shows that it maps one
    channel to two (its output layer is no convolution, whose filters the driver reads).
    After Ray's log of the actor's error, the job ends with one line naming --model and
    the error, and exit 2 (it was Ray's traceback and exit 1)."""
    import keras

    inputs = keras.Input((None, None, 1))
    x = keras.layers.Conv2D(2, 3, padding="same")(inputs)
    model = keras.Model(inputs, keras.layers.Activation("sigmoid")(x))
    model.save(tmp_path / "two.keras")
    src = dataset["src"] / "sizes"
    model = tmp_path / "two.keras"
    result = run_job("--model", model, "--input", src, "--output", tmp_path / "o", ray=shared_ray)
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("denoise: error: --model"), result.stderr[-3000:]
    assert "the actors cannot use it: ValueError: Model" in line, line
    # It wrote nothing: the --output it made goes (it kept a journal of no rows there).
    assert not (tmp_path / "o").exists(), list((tmp_path / "o").iterdir())


@pytest.fixture(scope="module")
def custom_model(tmp_path_factory) -> Path:
    """A small convolutional denoiser with a layer only aelib registers (ActivityL1)."""
    import keras

    from aelib.layers import ActivityL1

    inputs = keras.Input((None, None, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = ActivityL1(1e-5)(x)
    x = keras.layers.UpSampling2D()(x)
    outputs = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")(x)
    path = tmp_path_factory.mktemp("custom") / "custom.keras"
    keras.Model(inputs, outputs).save(path)
    return path


def test_actors_import_aelib_only_for_a_model_with_its_layers(model_path, custom_model):
    """A model of Keras's own layers loads without `import aelib` (~0.6 s less per
    actor); one with a layer aelib registers still loads, because the actor imports it
    (the Hugging Face Parquet test below runs the job with it)."""
    assert job.inspect_model(model_path.read_bytes(), "m").uses_aelib is False
    spec = job.inspect_model(custom_model.read_bytes(), "custom")
    assert spec.uses_aelib is True and spec.multiple == 2
    # ... and an actor (the job's own Denoiser, in a fresh process) imports it for the
    # second only.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import denoise\n"
        "for model in sys.argv[2:]:\n"
        "    denoise.Denoiser(denoise.JobSettings.in_process(model, None, 'unused'))\n"
        "    print('aelib' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "jobs"), str(model_path), str(custom_model)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "True"]


def test_missing_input_and_bad_model_file_are_clear(model_path, tmp_path):
    result = run_job("--model", model_path, "--input", tmp_path / "nope", "--output", tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"--input {tmp_path / 'nope'} does not exist. Expected e.g." in result.stderr
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result = run_job("--model", model_path, "--input", fifo, "--output", tmp_path / "o")
    assert result.returncode == 2 and "is not a file, a folder or a glob" in result.stderr
    a_file = tmp_path / "a.png"  # one file: its output would replace it
    a_file.write_bytes(b"x")
    result = run_job("--model", model_path, "--input", a_file, "--output", tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"--output {tmp_path} is the folder of --input {a_file}" in result.stderr
    junk = tmp_path / "junk.keras"
    junk.write_text("not a zip")
    result = run_job("--model", junk, "--input", tmp_path, "--output", tmp_path / "o")
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"--model {junk}: not a .keras file (not a zip archive" in result.stderr
    # A .keras file whose JSON is damaged: a traceback, or json's message naming no file.
    with zipfile.ZipFile(model_path) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}

    def damaged(member: str, text: str) -> bytes:
        payload = io.BytesIO()
        with zipfile.ZipFile(payload, "w") as zf:
            for name, data in {**members, member: text.encode()}.items():
                zf.writestr(name, data)
        return payload.getvalue()

    for member, text, said in (
        ("config.json", "[]", "config.json holds [], not a JSON object"),
        ("config.json", "{oops", "config.json: Expecting property name"),
        ("aelib.json", "null", "aelib.json holds null, not a JSON object"),
        ("config.json", '{"config": []}', "its config.json is not in Keras's layout"),
    ):
        with pytest.raises(ValueError) as e:
            job.inspect_model(damaged(member, text), "m.keras")
        assert str(e.value).startswith(f"--model m.keras: not a usable .keras file ({said}")


def test_a_model_that_is_a_folder_is_named_as_the_model(tmp_path):
    """--model runs/sweep/best (the folder, not its denoise.keras) said "not a regular file
    but a folder: not an image", naming neither the flag nor what it wants."""
    (tmp_path / "best").mkdir()
    result = run_job("--model", tmp_path / "best", "--input", tmp_path, "--output", tmp_path / "o")
    assert result.returncode == 2, result.stderr[-2000:]
    said = f"denoise: error: --model {tmp_path / 'best'} is a folder; expected a trained .keras"
    assert said in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


def test_earlier_rows_are_read_in_run_order_and_carried_only_to_their_own_output(tmp_path):
    """A manifest (run 1), then the journals of two killed runs (2: --format webp,
    3: a retry that worked) whose file times a copy reversed: rows are taken in run
    order, and an output's metrics are carried only to that same output."""
    out = job.Storage(str(tmp_path))

    def rows_of(run: int, rows: list[dict], finish: bool) -> None:
        writer = job.ManifestWriter(out, {"run": str(run), "format": "png"})
        writer.add(pa.Table.from_pylist(rows, schema=job._ROW_SCHEMA))
        writer.close() if finish else writer.abort()  # abort keeps a journal of new rows

    a_png = {"path": "a.png", "output": "a.png", "status": "ok", "width": 28, "psnr": 30.0}
    rows_of(1, [a_png, {"path": "b.png", "status": "failed", "error": "disk full"}], True)
    a_webp = {**a_png, "output": "a.webp", "psnr": 21.0, "psnr_noisy": 9.0}
    rows_of(2, [a_webp, {"path": "b.png", "status": "failed", "error": "disk full"}], False)
    rows_of(3, [{"path": "b.png", "output": "b.png", "status": "ok", "psnr": 25.0}], False)
    journals = sorted(tmp_path.glob(".manifest.*.journal"), key=lambda p: p.stat().st_mtime_ns)
    for age, path in enumerate(reversed(journals)):  # run 3's journal now looks oldest
        os.utime(path, ns=(10**18 + age, 10**18 + age))

    before, metas, names = job.previous_rows(out)
    assert sorted(names) == sorted(p.name for p in journals)
    assert [m["run"] for m in metas] == ["1", "2", "3"]
    assert before["b.png"]["status"] == "ok" and before["b.png"]["psnr"] == 25.0
    assert before["a.png"]["output"] == "a.webp"
    a_row = job._skipped_row("a.png", "a.png", 100, before["a.png"])  # --format png again
    assert (a_row["width"], a_row["psnr_noisy"], a_row["psnr"]) == (28, 9.0, None)
    b_row = job._skipped_row("b.png", "b.png", 100, before["b.png"])
    assert (b_row["status"], b_row["psnr"], b_row["input_bytes"]) == ("skipped", 25.0, 100)


def test_a_run_stopped_before_its_first_rows_leaves_a_record(tmp_path, s3, monkeypatch):
    """Ctrl-C (or a lost lease) before the first block's rows came back: once actors
    were started, the journal stays, empty (in an object store, an empty part is PUT),
    so the rerun knows this job wrote there and does the outputs without a row again
    (see _plan) instead of skipping them without sizes or metrics for good; a run
    stopped before it started any leaves nothing."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    for dst in (str(tmp_path / "out"), f"s3://{BUCKET}/stopped"):
        output = job.Storage(dst)
        job.ManifestWriter(output, {"run": "1"}).abort()
        assert job._journals(output) == [], dst
        writer = job.ManifestWriter(output, {"run": "1"})
        writer.start()
        writer.abort()
        rows, metas, journals = job.previous_rows(output)
        assert (rows, metas, len(journals)) == ({}, [{"run": "1"}], 1), dst
        for name in journals:
            output.remove(name)
        # In a DST with no record of this job, the outputs skipped up front (maybe another
        # dataset's) are in the journal at once, in a bucket too: a rerun after a crash
        # skips them again rather than taking them for the crashed run's.
        writer = job.ManifestWriter(output, {"run": "1"})
        skipped = {"path": "a.png", "output": "a.png", "status": "skipped"}
        writer.add_rows([skipped], journal=True)
        writer.start()
        writer.abort()
        rows, _, _ = job.previous_rows(output)
        assert {p: r["status"] for p, r in rows.items()} == {"a.png": "skipped"}, dst


def test_each_row_names_the_model_that_wrote_its_output(tmp_path):
    """A rerun with another model keeps the outputs the first one wrote (skipped): their
    rows keep naming the first model, while the manifest's metadata names the rerun's."""
    out = job.Storage(str(tmp_path))
    first = job.ManifestWriter(out, {"run": "1", "model_sha256": "m1"})
    ok = {"path": "a.png", "output": "a.png", "status": "ok", "width": 28, "psnr": 30.0}
    failed = {"path": "b.png", "status": "failed", "error": "not a readable image"}
    first.add(pa.Table.from_pylist([ok, failed], schema=job._ROW_SCHEMA))
    first.close()
    before, _, _ = job.previous_rows(out)
    assert {p: r["model_sha256"] for p, r in before.items()} == {"a.png": "m1", "b.png": None}

    second = job.ManifestWriter(out, {"run": "2", "model_sha256": "m2"}, earlier=before)
    before["a.png"]["psnr_noisy"] = 20.0  # (measured against --clean)
    second.add_rows([job._skipped_row("a.png", "a.png", 10, before["a.png"])])
    redone = {"path": "c.png", "output": "c.png", "status": "ok", "width": 28}
    redone.update(psnr=32.0, psnr_noisy=21.0)
    second.add(pa.Table.from_pylist([redone], schema=job._ROW_SCHEMA))
    second.close()
    # the summary's means count the first model's output apart
    assert (second.measured, second.measured_elsewhere) == (2, 1)
    table = pq.read_table(tmp_path / job.MANIFEST)
    assert table.schema.metadata[b"model_sha256"] == b"m2"
    rows = {r["path"]: (r["status"], r["model_sha256"]) for r in table.to_pylist()}
    assert rows == {"a.png": ("skipped", "m1"), "c.png": ("ok", "m2")}


def test_means_leave_out_only_the_metric_an_output_lacks_and_say_so(tmp_path):
    """An input equal to its reference has an infinite PSNR, and an image under 3 px on a
    side no SSIM: each is left out of that metric's means only, and the summary says how
    many (an infinite PSNR dropped the output from the SSIM means and from the count)."""
    tiny = np.arange(500 * 3, dtype=np.uint8).reshape(500, 3, 1)
    measured = job._metrics(tiny, 255, tiny, tiny // 2, 255)  # a 3x3 window
    assert measured["psnr_noisy"] == np.inf and measured["ssim_noisy"] == 1.0
    assert 0 < measured["ssim"] < 1 and np.isfinite(measured["psnr"])
    thin = job._metrics(tiny[:, :2], 255, tiny[:, :2], tiny[:, :2] // 2, 255)
    # (None: a null in the manifest, not NaN, which made the column's mean NaN in pyarrow)
    assert thin["ssim"] is None and thin["ssim_noisy"] is None and thin["psnr_noisy"] == np.inf

    writer = job.ManifestWriter(job.Storage(str(tmp_path)), {"run": "1"})
    rows = [
        dict(psnr_noisy=10.0, psnr=20.0, ssim_noisy=0.2, ssim=0.6),
        dict(psnr_noisy=14.0, psnr=22.0, ssim_noisy=0.4, ssim=0.8),
        dict(psnr_noisy=np.inf, psnr=40.0, ssim_noisy=1.0, ssim=0.9),  # a clean input
        dict(psnr_noisy=16.0, psnr=18.0, ssim_noisy=None, ssim=None),  # 2 px wide
        dict(),  # no reference
    ]
    for i, row in enumerate(rows):
        row.update(path=f"{i}.png", output=f"{i}.png", status="ok", width=28)
    writer.add(pa.Table.from_pylist(rows, schema=job._ROW_SCHEMA))
    writer.close()
    assert (writer.measured, writer.in_means, writer.unmeasured) == (4, {"psnr": 3, "ssim": 3}, 1)
    means = writer.means()
    assert means == pytest.approx(
        {"psnr_noisy": 40 / 3, "psnr": 20.0, "ssim_noisy": 1.6 / 3, "ssim": 2.3 / 3}
    )
    assert job._means_text(means, writer.measured, writer.in_means) == (
        "mean PSNR 13.33 -> 20.00 dB (+6.67) (without the 1 with an infinite PSNR: input or "
        "output equal to its reference), SSIM 0.533 -> 0.767 (without the 1 under 3 px on a side)"
    )
    only_ssim = {"ssim_noisy": 0.5, "ssim": 0.7}
    assert job._means_text(only_ssim, 2, {"psnr": 0, "ssim": 2}).startswith(
        "no PSNR mean (all 2 with an infinite PSNR: input or output equal to its reference), "
        "mean SSIM 0.500 -> 0.700"
    )


def test_formats_without_16_bits_get_8_bits_with_a_note():
    """WEBP took 16-bit gray without an error and clipped it to white."""
    gray16 = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8, 1)
    for fmt in ("WEBP", "JPEG", "BMP", "TIFF"):
        payload, note = job.encode(gray16, fmt, quality=100)
        back, maxval, _, _ = job.decode(payload, "per-channel")
        if fmt == "TIFF":  # holds 16 bits
            assert note is None and maxval == 65535 and np.array_equal(back, gray16)
            continue
        assert "16-bit values scaled to 8 bits" in note and maxval == 255, fmt
        expected = np.rint(gray16[..., 0] / 257.0)
        assert np.abs(back[..., 0].astype(float) - expected).max() <= 3, fmt


def test_every_format_keeps_the_alpha_or_says_it_dropped_it():
    """Pillow writes RGBA as a 32-bit BMP that readers (Pillow too) take for RGB: the
    alpha was lost without the note other formats get."""
    rng = np.random.default_rng(0)
    for channels in (2, 4):
        image = rng.integers(0, 256, (8, 8, channels), dtype=np.uint8)
        kept = set()
        for fmt in ("PNG", "WEBP", "JPEG", "BMP", "TIFF"):
            payload, note = job.encode(image, fmt, quality=100)
            _, _, _, alpha = job.decode(payload, "per-channel")
            if alpha is not None:
                gray_webp = fmt == "WEBP" and channels == 2  # (no gray WEBP: said below)
                assert note == (GRAY_WEBP if gray_webp else None), (fmt, channels)
                assert np.array_equal(alpha, image[..., -1]), (fmt, channels)
                kept.add(fmt)
            else:
                assert note == f"alpha dropped: {fmt} cannot store it", (fmt, channels, note)
        # (only JPEG and BMP cannot store it: dropping it everywhere, with the note, passed)
        assert kept == {"PNG", "WEBP", "TIFF"}, (channels, kept)
    # WEBP holds no gray: libwebp stores a gray image as RGB, and it is read back so
    # (--rgb luminance wrote .webp outputs of 3 channels, the manifest saying 1).
    payload, note = job.encode(image[..., :1], "WEBP", quality=100)
    assert note == GRAY_WEBP and job.decode(payload, "per-channel")[0].shape[2] == 3


GRAY_WEBP = "gray stored as RGB of three equal channels: WEBP cannot store it"


def test_lossless_webp_stays_lossless_and_jpeg_keeps_full_colour_resolution():
    """A lossless WEBP input was written as a lossy one at --quality (off by up to 67);
    RGB JPEGs were written with colour at half resolution (4:2:0, Pillow's default)."""
    from PIL import JpegImagePlugin

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for lossless in (True, False):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="WEBP", lossless=lossless, quality=80)
        array, _, info, _ = job.decode(buf.getvalue(), "per-channel")
        payload, note = job.encode(array, "WEBP", 95, info)
        back = job.decode(payload, "per-channel")[0]
        assert job._webp_lossless(payload) == lossless and note is None
        assert np.array_equal(back, array) == lossless
    # An animation's first frame (the one denoised) says it; another format ignores it.
    frames = [Image.fromarray(image), Image.fromarray(255 - image)]
    buf = io.BytesIO()
    frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert job._webp_lossless(buf.getvalue()) and not job._webp_lossless(buf.getvalue()[:40])
    jpeg, _ = job.encode(image, "JPEG", 95, {"lossless": True})
    assert jpeg == job.encode(image, "JPEG", 95)[0]
    # The colour under transparent pixels is kept too (a lossless encode may change it).
    rgba = np.concatenate([image, np.zeros((20, 30, 1), np.uint8)], axis=-1)
    payload, _ = job.encode(rgba, "WEBP", 95, {"lossless": True})
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(payload)).convert("RGBA")), rgba)
    payload, _ = job.encode(image, "JPEG", 95)
    assert JpegImagePlugin.get_sampling(Image.open(io.BytesIO(payload))) == 0  # 4:4:4


def test_a_gray_image_through_a_colour_model_is_rounded_once(tmp_path):
    """A gray image goes through a 3-channel model as three equal channels, and its
    output is their mean: each channel was rounded to 8 bits first, then the mean (off
    by 1 on about a tenth of the pixels)."""
    import keras

    inputs = keras.Input((None, None, 3))
    scale = keras.layers.Conv2D(3, 1, use_bias=False, name="scale")
    model = keras.Model(inputs, scale(inputs))
    scale.set_weights([np.diag([0.3, 0.5, 0.71]).reshape(1, 1, 3, 3).astype(np.float32)])
    model.save(tmp_path / "colour.keras")
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    (src / "g.png").write_bytes(png(gray))
    denoiser = job.Denoiser(
        job.JobSettings.in_process(str(tmp_path / "colour.keras"), str(src), str(dst))
    )
    assert denoiser({"path": np.array(["g.png"])}).to_pylist()[0]["status"] == "ok"
    channels = gray[..., None] / 255.0 * np.array([0.3, 0.5, 0.71], np.float32) * 255
    expected = np.rint(channels.mean(axis=-1))
    assert np.array_equal(np.asarray(Image.open(dst / "g.png")), expected)
    assert not np.array_equal(expected, np.rint(np.rint(channels).mean(axis=-1)))  # (differs)


def test_a_bmp_output_says_it_dropped_the_exif_and_icc_profile():
    """Pillow's BMP writer keeps neither: a photo's EXIF orientation went without a note,
    so the output showed turned against its input. The formats that keep them: no note."""
    from PIL import ImageCms

    exif = Image.Exif()
    exif[0x0112] = 6
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    image = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    for info, expected in (
        ({"exif": exif.tobytes(), "icc_profile": icc}, "EXIF and ICC profile dropped"),
        ({"exif": exif.tobytes()}, "EXIF dropped"),
        ({"dpi": (300, 300)}, None),
    ):
        for fmt in ("PNG", "JPEG", "TIFF", "WEBP", "BMP"):
            payload, note = job.encode(image, fmt, 95, info)
            with Image.open(io.BytesIO(payload)) as written:
                kept = written.getexif().get(0x0112) == 6 or "exif" not in info
            if fmt == "BMP":
                assert note == (expected and f"{expected}: BMP cannot store it"), info
                assert not kept or expected is None
            else:
                assert note is None and kept, (fmt, info)


def test_a_tiff_without_a_resolution_gives_outputs_without_one():
    """Pillow reads a TIFF without XResolution as 1 DPI: every output format then said
    1 dot per inch (a 50-pixel image 50 inches wide). One with a resolution keeps it."""
    image = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    for saved, expected in (({}, None), ({"dpi": (72, 72)}, (72, 72))):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="TIFF", **saved)
        _, _, info, _ = job.decode(buf.getvalue(), "per-channel")
        assert info.get("dpi") == (expected and pytest.approx(expected)), saved
        for fmt in ("TIFF", "PNG", "JPEG"):
            payload, _ = job.encode(image, fmt, 95, info)
            with Image.open(io.BytesIO(payload)) as written:
                dpi = written.info.get("dpi")
                if fmt == "TIFF" and expected is None:
                    assert 282 not in written.tag_v2, dict(written.tag_v2)
                elif expected is None:
                    assert dpi is None, (fmt, dpi, written.info)
                else:
                    assert dpi == pytest.approx(expected, abs=0.01), (fmt, dpi)


def test_a_failure_is_said_on_one_line_without_control_characters():
    """A Parquet row's path "a\\x00b.png" put a NUL in the log (grep: "binary file
    matches"), and a name with a newline broke its line in two."""
    said = job._one_line("a\x00b.png: cannot write a\x00b.png: embedded null byte")
    assert said == "a\\x00b.png: cannot write a\\x00b.png: embedded null byte"
    assert job._one_line("new\nline.png: tab\there, é ok") == "new\\nline.png: tab\\there, é ok"


def test_safe_relative_and_png_encoder():
    assert job.safe_relative("a/./b/../c.png") == "a/c.png"
    for bad in ("../x.png", "/etc/passwd", "a/../../x", "C:/x.png", "..\\x.png"):
        with pytest.raises(ValueError, match="leave the output folder"):
            job.safe_relative(bad, foreign=True)  # a Parquet row's path, maybe from Windows
    for empty in ("", ".", "./"):  # (not "unsafe": no name at all)
        with pytest.raises(ValueError, match="empty path .*: it names no output file"):
            job.safe_relative(empty, foreign=True)
    assert job.safe_relative("a\\b.png", foreign=True) == "a/b.png"
    # A file's own name here is POSIX: a backslash or a colon is part of it.
    for name in ("back\\slash.png", "9:30.png", "C:x.png", "..\\x.png"):
        assert job.safe_relative(name) == name
    assert job.safe_relative("9:30.png", foreign=True) == "9:30.png"
    assert job.safe_relative("a:b.png", foreign=True) == "a:b.png"  # not a drive
    rng = np.random.default_rng(0)
    for shape, dtype in (((5, 7, 1), np.uint8), ((4, 3, 3), np.uint8), ((6, 2, 1), np.uint16)):
        top = 65535 if dtype == np.uint16 else 255
        array = rng.integers(0, top + 1, shape).astype(dtype)
        decoded, maxval, info, alpha = job.decode(job.encode_png(array), "per-channel")
        assert info == {} and maxval == top and alpha is None
        np.testing.assert_array_equal(decoded, array)


def test_cpu_model_calls_are_slices_of_the_call_pixels_with_the_same_output(model_path):
    import keras

    model = keras.models.load_model(model_path, compile=False)
    calls: list[tuple[int, ...]] = []

    def run(x):
        calls.append(x.shape)
        return model(x, training=False)

    denoiser = object.__new__(job.Denoiser)  # predict() alone, on the real model
    denoiser.s, denoiser._run = SimpleNamespace(max_batch=1024), run
    denoiser.spec = SimpleNamespace(fixed_size=None, halo=32, multiple=4)
    rng = np.random.default_rng(0)
    small, large = job.CPU_CALL_PIXELS
    for shape, budget, most in (
        ((100, 28, 28, 1), small, small // (28 * 28)),  # CPU, calls of the small size
        ((3, 256, 256, 1), small, 1),  # CPU, each image over the budget
        ((1500, 28, 28, 1), large, 1024),  # CPU, the large size: at most --batch-size
        ((100, 28, 28, 1), job.GPU_CALL_PIXELS, 1024),  # GPU: --batch-size per call
        ((40, 256, 256, 1), job.GPU_CALL_PIXELS, 256),  # GPU, and at most its call pixels
    ):
        calls.clear()
        denoiser._call_pixels = budget
        x = rng.random(shape, dtype=np.float32)
        out = denoiser.predict(x)
        assert [c[0] for c in calls] == [min(most, shape[0] - i) for i in range(0, shape[0], most)]
        np.testing.assert_allclose(out, np.asarray(model(x, training=False)), atol=1e-5)


def _sizing_denoiser(run) -> job.Denoiser:
    """A Denoiser whose predict() runs `run`, with its CPU call sizes not chosen yet."""
    denoiser = object.__new__(job.Denoiser)
    denoiser.s, denoiser._run = SimpleNamespace(max_batch=1024), run
    denoiser.spec = SimpleNamespace(fixed_size=None, halo=32, multiple=4)
    denoiser._sizer = job.CallSizer(job.CPU_CALL_PIXELS)
    denoiser._call_pixels = None
    return denoiser


@pytest.mark.parametrize("faster", ["small", "large", "large by 2%"])
def test_a_cpu_actor_times_its_call_sizes_and_keeps_the_faster(
    model_path, faster, capfd, monkeypatch
):
    """Which call size is faster depends on the CPU, so a CPU actor's first groups take
    the candidates in turn (a warm-up and two timed groups each) and the rest keep the
    faster; the smaller unless the larger is 5% faster. The job's clock is a fake one
    that the model calls advance: 20 ms a call (calls of many images win), 1 ms an image
    and 2 ms more for each beyond 41 (calls of few win), or 1 ms an image in small calls
    and 0.98 ms in large ones. The output never changes."""
    import keras

    model = keras.models.load_model(model_path, compile=False)
    calls: list[int] = []
    clock = [0.0]
    monkeypatch.setattr(job, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    small, large = job.CPU_CALL_PIXELS

    def run(x):
        calls.append(len(x))
        if faster == "large":
            clock[0] += 0.02
        elif faster == "small":
            clock[0] += 0.001 * len(x) + 0.002 * max(0, len(x) - 41)
        else:
            clock[0] += (0.001 if len(x) <= 41 else 0.00098) * len(x)
        return model(x, training=False)

    denoiser = _sizing_denoiser(run)
    x = np.random.default_rng(0).random((200, 28, 28, 1), dtype=np.float32)
    expected = np.asarray(model(x, training=False))
    per_call = {"small": small // (28 * 28), "large": 200}  # 41 images, or all 200
    pattern = {k: [min(n, 200 - i) for i in range(0, 200, n)] for k, n in per_call.items()}
    for trial in range(6):  # small, large, small, large, small, large
        calls.clear()
        np.testing.assert_allclose(denoiser.predict(x), expected, atol=1e-5)
        assert calls == pattern["small" if trial % 2 == 0 else "large"], trial
        assert (denoiser._call_pixels is None) == (trial < 5)
    kept = "large" if faster == "large" else "small"
    assert denoiser._call_pixels == (large if kept == "large" else small)
    err = capfd.readouterr().err
    assert f"model calls of up to {denoiser._call_pixels} pixels " in err
    assert ("not 5% faster" in err) == (faster == "large by 2%")
    calls.clear()
    np.testing.assert_allclose(denoiser.predict(x), expected, atol=1e-5)
    assert calls == pattern[kept]
    calls.clear()
    denoiser = _sizing_denoiser(run)
    denoiser.predict(x[:30])  # 30 images: one call whichever the size, so not a trial
    assert calls == [30] and denoiser._sizer.runs == {}


def _failing_above(model_path, most: int):
    """(model, calls, run): run(x) records len(x) and, over `most` images, raises the
    out-of-memory error TensorFlow raises (by hand: there is no GPU to fill)."""
    import keras
    import tensorflow as tf

    model = keras.models.load_model(model_path, compile=False)
    calls: list[int] = []

    def run(x):
        calls.append(len(x))
        if len(x) > most:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
        return model(x, training=False)

    return model, calls, run


def test_out_of_memory_in_a_call_size_trial_ends_the_trials(model_path, capfd):
    model, calls, run = _failing_above(model_path, 100)
    denoiser = _sizing_denoiser(run)
    x = np.random.default_rng(0).random((200, 28, 28, 1), dtype=np.float32)
    expected = np.asarray(model(x, training=False))
    for _ in range(3):  # the small size's trial; the large one's, halved; then halves
        np.testing.assert_allclose(denoiser.predict(x), expected, atol=1e-5)
    assert calls == [41, 41, 41, 41, 36] + [200, 100, 100] + [100, 100]
    assert denoiser._call_pixels == 100 * 28 * 28
    assert [len(r) for r in denoiser._sizer.runs[(200, 28, 28)].values()] == [1, 0]
    assert denoiser._sizer.chosen is None and "calls of 100 from now on" in capfd.readouterr().err


def test_call_sizer_times_each_shape_apart_leaves_out_warm_ups_and_prefers_the_first():
    """Seconds per group of a million pixels, so that the message's ns per pixel are
    the seconds times 1,000."""
    a, b = (1024, 28, 28), (7, 28, 28)
    for costs, message in (
        # 20's warm-up is the fastest of all, but left out: 2.9 is not 5% under 3.0
        (
            {10: (3.0, 3.0, 3.0), 20: (0.5, 2.9, 2.9)},
            "model calls of up to 10 pixels kept: the others are not 5% faster here "
            "(ns per pixel, best of 2 groups each: 10 pixels 3000, 20 pixels 2900)",
        ),
        (  # the best of each counts, not the mean
            {10: (3.0, 3.0, 4.0), 20: (9.0, 2.0, 3.5)},
            "model calls of up to 20 pixels are the fastest here "
            "(ns per pixel, best of 2 groups each: 10 pixels 3000, 20 pixels 2000)",
        ),
    ):
        sizer = job.CallSizer((10, 20), trials=2)
        for k in range(3):
            for size in (10, 20):
                assert sizer.chosen is None and "none chosen yet" in str(sizer)
                assert sizer.next(a) == size  # in turn
                sizer.record(a, size, costs[size][k], 10**6)
                # another shape, timed apart: 10 far faster on it; it never decides first
                other = sizer.next(b)
                sizer.record(b, other, 0.001 if other == 10 else 5.0, 10**6)
        assert str(sizer) == message
        chosen = sizer.chosen
        sizer.record(a, 30 - chosen, 1e-9, 10**6)  # later records change nothing
        assert sizer.chosen == chosen
    assert job.CallSizer((7,)).chosen == 7  # one candidate: nothing to time
    sizer = job.CallSizer((10, 20))
    for i in range(sizer.SHAPES):
        sizer.next((i, 1, 1))
    assert sizer.next((999, 1, 1)) == 10 and (999, 1, 1) not in sizer.runs  # too many shapes
    sizer.record((999, 1, 1), 10, 1.0, 1)
    assert (999, 1, 1) not in sizer.runs


def test_big_images_go_in_pixel_bounded_groups_and_tiles_with_the_whole_image_result(
    model_path, tmp_path, monkeypatch
):
    """A Denoiser in this process (no Ray) on 200x148 images, with the group and tile
    sizes scaled down as if they were photos: 2 images per group, tiles of 64 with the
    model's halo, and every output equal to the model run on the whole image."""
    import keras

    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(5)
    images = {f"p{i}.png": (rng.random((200, 148)) * 255).astype(np.uint8) for i in range(5)}
    for name, array in images.items():
        (src / name).write_bytes(png(array))
    monkeypatch.setattr(job, "GROUP_PIXELS", 2 * 200 * 148 + 100)
    monkeypatch.setattr(job, "TILE", 64)
    settings = job.JobSettings.in_process(str(model_path), str(src), str(dst), io_threads=2)
    denoiser = job.Denoiser(settings)
    groups, calls = [], []
    real_denoise, real_run = denoiser._denoise, denoiser._run
    denoiser._denoise = lambda todo: (groups.append(len(todo)), real_denoise(todo))[1]
    denoiser._run = lambda x: (calls.append(x.shape), real_run(x))[1]
    rows = denoiser({"path": np.array(sorted(images))}).to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 5
    assert groups == [2, 2, 1]
    assert all(h * w < 200 * 148 for _, h, w, _ in calls)  # tiles, not whole planes
    model = keras.models.load_model(model_path, compile=False)
    for name, array in images.items():
        whole = np.asarray(model(array[None, ..., None] / np.float32(255), training=False))
        expected = np.rint(np.clip(whole[0, ..., 0], 0, 1) * 255)
        got = np.asarray(Image.open(dst / name)).astype(float)
        assert np.abs(got - expected).max() <= 1, name  # float rounding at most


def test_eight_bit_values_in_a_wider_file_are_denoised_as_eight_bit(model_path, tmp_path):
    """A 16-bit or 32-bit integer gray file whose values all lie in 0-255 holds 8-bit
    values (aelib's training reads it so): the model saw them on the 16-bit scale, a
    near-black image, and wrote an output on another scale. Now it is denoised as the
    8-bit file is, written as wide as it came (32 bits as 16), and said in its row;
    PSNR against a reference of the same kind is the 8-bit pair's."""
    from skimage.metrics import peak_signal_noise_ratio

    src, clean = tmp_path / "in", tmp_path / "clean"
    src.mkdir()
    clean.mkdir()
    rng = np.random.default_rng(8)
    digit = (rng.random((20, 24)) * 200).astype(np.uint8) + 10
    reference = np.clip(digit.astype(int) + 20, 0, 255).astype(np.uint8)
    kinds = {
        "a8.png": (digit, "PNG"),
        "a16.png": (digit.astype(np.uint16), "PNG"),
        "a32.tif": (digit.astype(np.int32), "TIFF"),
    }
    for name, (array, fmt) in kinds.items():
        Image.fromarray(array).save(src / name, format=fmt)
        Image.fromarray(reference.astype(array.dtype)).save(clean / name, format=fmt)
    # With a transparent colour (its output a 16-bit gray + alpha PNG, which Pillow reads
    # back as 8 bits: its metrics were of a black image); and a noisy copy past 255 of a
    # reference within it, each 16-bit file on its own scale: measured on one, 16 bits.
    Image.fromarray(digit.astype(np.uint16)).save(src / "t16.png", transparency=int(digit[0, 0]))
    Image.fromarray(reference.astype(np.uint16)).save(clean / "t16.png")
    past = digit.astype(np.uint16)
    past[0, 0] = 300
    Image.fromarray(past).save(src / "p16.png")
    Image.fromarray(reference.astype(np.uint16)).save(clean / "p16.png")
    names = sorted([*kinds, "t16.png", "p16.png"])
    for fmt in ("same", "jpeg"):
        dst = tmp_path / fmt
        settings = job.JobSettings.in_process(
            str(model_path), str(src), str(dst), clean=str(clean), fmt=fmt
        )
        rows = {r["path"]: r for r in job.Denoiser(settings)({"path": np.array(names)}).to_pylist()}
        assert [r["status"] for r in rows.values()] == ["ok"] * 5, rows
        for key in ("psnr", "psnr_noisy", "ssim"):
            assert rows["t16.png"][key] == pytest.approx(rows["a16.png"][key], abs=1e-9), key
        expected = peak_signal_noise_ratio(reference / 65535, past / 65535, data_range=1.0)
        assert rows["p16.png"]["psnr_noisy"] == pytest.approx(expected, abs=1e-9)
        outputs = {name: Image.open(dst / rows[name]["output"]) for name in kinds}
        eight = np.asarray(outputs["a8.png"])
        for name in ("a16.png", "a32.tif"):
            assert np.array_equal(np.asarray(outputs[name]), eight), (fmt, name)
            for key in ("psnr", "psnr_noisy", "ssim"):
                assert rows[name][key] == pytest.approx(rows["a8.png"][key], abs=1e-9), key
        if fmt == "same":
            assert outputs["a16.png"].mode == outputs["a32.tif"].mode == "I;16"
            assert (
                rows["a16.png"]["error"]
                == f"16-bit pixels of values 0 to {digit.max()} denoised as 8-bit values"
            )
            assert rows["a32.tif"]["error"].startswith(
                "32-bit integer pixels written as 16 bits; 32-bit"
            )
        else:
            assert "8-bit values of a 16-bit file written as 8 bits" in rows["a16.png"]["error"]
    # A 16-bit output read back (written with a note) whose values happen to lie in
    # 0-255 stays on its input's 16-bit scale: the same width, nothing to rescale.
    denoiser = object.__new__(job.Denoiser)
    denoiser.s = SimpleNamespace(rgb="per-channel", max_pixels=None)
    dark = digit.astype(np.uint16)[..., None]
    assert np.array_equal(denoiser._read_back(job.encode_png(dark), dark, 65535), dark)


def test_references_are_compared_as_shown_and_gray_may_be_stored_as_rgb(model_path, tmp_path):
    """A photo with an EXIF orientation and its reference exported upright: compared as
    stored they got "no metrics" for their sizes or, square, metrics of rotated pixels;
    now as shown (as PIL.ImageOps.exif_transpose shows them) where both files say an
    orientation, or where only as shown are they of one size. A reference of the stored
    pixels with its camera's tag and a noisy copy saved without one (noise added to the
    stored array) stay as stored. A gray input's reference stored as RGB of three equal
    channels (or within 2 levels, as lossy WEBP stores gray) was "no metrics" too."""
    from PIL import ImageOps
    from skimage.metrics import peak_signal_noise_ratio

    src, clean = tmp_path / "in", tmp_path / "clean"
    src.mkdir()
    clean.mkdir()
    rng = np.random.default_rng(9)
    turned = Image.Exif()
    turned[0x0112] = 6  # (shown a quarter turn from how it is stored)
    upright = Image.Exif()
    upright[0x0112] = 1
    cases = {  # name: (size as shown, how the pair is stored, compared as shown)
        "wide.png": ((20, 28), "input turned, reference upright without a tag", True),
        "square.png": ((24, 24), "input turned, reference upright with tag 1", True),
        "camera.png": ((20, 28), "reference with its camera's tag, input without", False),
        "gray.png": ((16, 20), "reference as RGB", False),
    }
    for name, (size, _, _) in cases.items():
        truth = (rng.random(size) * 255).astype(np.uint8)
        noisy = np.clip(truth + rng.normal(0, 40, size), 0, 255).astype(np.uint8)
        if name == "gray.png":
            Image.fromarray(noisy).save(src / name)
            Image.fromarray(np.dstack([truth] * 3)).save(clean / name)
        elif name == "camera.png":
            Image.fromarray(truth).save(clean / name, exif=turned)
            Image.fromarray(noisy).save(src / name)
        else:
            Image.fromarray(np.rot90(noisy, 1).copy()).save(src / name, exif=turned)
            tags = {"exif": upright} if name == "square.png" else {}
            Image.fromarray(truth).save(clean / name, **tags)
    dst = tmp_path / "out"
    settings = job.JobSettings.in_process(str(model_path), str(src), str(dst), clean=str(clean))
    batch = {"path": np.array(sorted(cases))}
    rows = {r["path"]: r for r in job.Denoiser(settings)(batch).to_pylist()}
    for name, (_, _, as_shown) in cases.items():
        assert rows[name]["status"] == "ok" and rows[name]["error"] is None, rows[name]
        with Image.open(clean / name) as ref, Image.open(dst / name) as out:
            if as_shown:
                ref, out = ImageOps.exif_transpose(ref), ImageOps.exif_transpose(out)
            shown = np.asarray(out, np.float64) / 255
            truth = np.asarray(ref.convert("L"), np.float64) / 255
        assert rows[name]["psnr"] == pytest.approx(
            peak_signal_noise_ratio(truth, shown, data_range=1.0), abs=1e-9
        ), name
    webp = io.BytesIO()  # (lossy WEBP stores gray as RGB, its planes a level or two apart)
    Image.fromarray((rng.random((28, 28)) * 255).astype(np.uint8)).save(webp, format="WEBP")
    planes = job.decode(webp.getvalue(), "per-channel")[0]
    assert job._gray_planes(planes) and not job._gray_planes(planes + [[[0, 3, 0]]])
    for tag in range(1, 9):  # (every orientation as Pillow shows it)
        image = Image.fromarray((rng.random((3, 5)) * 255).astype(np.uint8))
        exif = image.getexif()
        exif[0x0112] = tag
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", exif=exif)
        array, _, info, _ = job.decode(buffer.getvalue(), "per-channel")
        with Image.open(io.BytesIO(buffer.getvalue())) as saved:
            expected = np.asarray(ImageOps.exif_transpose(saved))
        assert np.array_equal(job.as_shown(array, job.orientation(info))[..., 0], expected), tag


def test_calls_that_run_out_of_device_memory_are_retried_smaller(model_path, capfd):
    """A GPU shared by actors, or big planes, can run out of memory on a call that fit
    before: the call is split in halves until it fits, and later calls stay small.
    (The out-of-memory error is raised here by hand: there is no GPU to fill.)"""
    import tensorflow as tf

    model, calls, run = _failing_above(model_path, 8)
    denoiser = object.__new__(job.Denoiser)
    denoiser.s, denoiser._run = SimpleNamespace(max_batch=1024), run
    denoiser.spec = SimpleNamespace(fixed_size=None, halo=32, multiple=4)
    denoiser._call_pixels = job.GPU_CALL_PIXELS
    x = np.random.default_rng(0).random((100, 28, 28, 1), dtype=np.float32)
    np.testing.assert_allclose(denoiser.predict(x), np.asarray(model(x, training=False)), atol=1e-5)
    assert calls == [100, 50, 25, 12, 6] + [6] * 15 + [4]  # halved until it fits, then kept
    assert "calls of 6 from now on" in capfd.readouterr().err
    calls.clear()
    denoiser.predict(x[:12])
    assert calls == [6, 6]  # the next block starts small
    denoiser._call_pixels = 28 * 28  # one image per call that still fails: the error stands
    with pytest.raises(tf.errors.ResourceExhaustedError):
        denoiser._run = lambda x: run(np.repeat(x, 9, axis=0))
        denoiser.predict(x[:2])
    denoiser._run = lambda x: (_ for _ in ()).throw(ValueError("bad shape"))
    denoiser._call_pixels = job.GPU_CALL_PIXELS
    with pytest.raises(ValueError, match="bad shape"):  # not memory: not retried
        denoiser.predict(x)
    for error in (
        RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB"),
        RuntimeError("CUDA error: out of memory"),
        MemoryError(),
    ):
        assert job._out_of_memory(error), error
    assert not job._out_of_memory(ValueError("Input 0 of layer is incompatible"))


def _reach(model, x: np.ndarray) -> int:
    """How far from a changed input pixel the model's output changes (its true radius)."""
    base = np.asarray(model(x, training=False))
    centre = x.shape[1] // 2
    poked = x.copy()
    poked[0, centre, centre] += 1.0
    ys, xs = np.nonzero(np.abs(np.asarray(model(poked, training=False)) - base)[0, ..., 0] > 0)
    return int(max(np.abs(ys - centre).max(), np.abs(xs - centre).max()))


def _config(model) -> dict:
    """The model's config as its .keras file holds it."""
    import keras

    return json.loads(json.dumps(keras.saving.serialize_keras_object(model)))


@pytest.mark.parametrize(
    ("options", "margin", "measured"),
    [
        ({}, 16, 11),
        ({"depth": 3, "convs_per_stage": 2, "skips": True}, 64, 52),
        ({"kernel_size": 15}, 76, 73),
    ],
)
def test_the_tile_margin_covers_the_reach_of_aelib_denoisers(options, margin, measured):
    """The margin bounds the reach and is close to it (jobs/README.md's figures: the margin
    read from the model's file, and the reach measured by changing one input pixel; the
    rule before, the sum of all layers' spans times the total downsampling, gave 36, 176
    and 156 here)."""
    import aelib

    model = aelib.build_model("denoise", **options).autoencoder
    multiple, halo = job.model_geometry(_config(model))
    assert multiple == 2 ** options.get("depth", 2)
    x = np.random.default_rng(0).random((1, 512, 512, 1), dtype=np.float32)
    reach = _reach(model, x)
    assert reach <= halo < 2 * reach and halo % multiple == 0
    assert (halo, reach) == (margin, measured)
    if "kernel_size" in options:  # the older rule, 16 pixels per pooling level, fell short
        assert reach > max(32, 16 * multiple)


def test_tiles_of_a_dilated_model_give_the_whole_image_result():
    """Not an aelib model: dilated convolutions (as in IRCNN-style denoisers) reach 47
    pixels without any pooling; tiles with a margin of 32 (the old rule) show seams,
    with the model's own margin they do not."""
    import keras

    keras.utils.set_random_seed(0)
    init = keras.initializers.RandomNormal(stddev=0.3)  # outputs of order 1, not 1e-4
    inputs = keras.Input((None, None, 1))
    x = inputs
    for rate in (1, 2, 4, 8, 16, 8, 4, 2, 1):
        x = keras.layers.Conv2D(
            4, 3, dilation_rate=rate, padding="same", activation="tanh", kernel_initializer=init
        )(x)
    model = keras.Model(inputs, keras.layers.Conv2D(1, 3, padding="same")(x))
    multiple, halo = job.model_geometry(_config(model))
    assert (multiple, halo) == (1, 47)  # exactly its reach
    images = np.random.default_rng(1).random((2, 300, 260, 1), dtype=np.float32)
    whole = np.asarray(model(images, training=False))
    assert _reach(model, images[:1]) == 47 <= halo

    def tiles(margin):
        return job.tiled(lambda t: np.asarray(model(t, training=False)), images, 64, margin)

    scale = np.abs(whole).max()
    np.testing.assert_allclose(tiles(halo), whole, atol=1e-5 * scale)
    assert np.abs(tiles(32) - whole).max() > 1e-2 * scale


def _small_models() -> dict:
    """Models whose layers the margin must count right: shared, nested, shifting."""
    import keras

    inputs = keras.Input((None, None, 1))
    shared, x = keras.layers.Conv2D(1, 3, padding="same", activation="tanh"), inputs
    for _ in range(8):  # one layer in the config, eight calls
        x = shared(x)
    nested = keras.Sequential(
        [
            keras.layers.Conv2D(2, 3, padding="same", activation="tanh"),
            keras.layers.Conv2D(1, 11, padding="same"),
        ]
    )
    shift = keras.layers.Cropping2D(((6, 0), (6, 0)))(
        keras.layers.ZeroPadding2D(((0, 6), (0, 6)))(inputs)
    )
    even = inputs
    for _ in range(4):  # "same" pads a 2x2 kernel on one side: 4 pixels, all one way
        even = keras.layers.Conv2D(2, 2, padding="same", activation="tanh")(even)
    return {
        "a layer called 8 times": keras.Model(inputs, x),
        "a nested model called twice": keras.Model(inputs, nested(nested(inputs))),
        "padding then cropping (a shift)": keras.Model(inputs, shift),
        "2x2 kernels": keras.Model(inputs, keras.layers.Conv2D(1, 1)(even)),
        "a pooling layer called twice": _shared_pooling_unet(),
        "rows and columns upsampled apart": _upsampled_apart(),
        "a densely connected block of 24": _dense_block(24),
    }


def _upsampled_apart():
    """Columns back to full size first: the 9x1 convolutions work on rows still 2x
    coarse, so they reach 16 input rows, not 8 (one factor for both axes said 10)."""
    import keras

    init = keras.initializers.RandomNormal(stddev=0.5)
    inputs = keras.Input((None, None, 1))
    x = keras.layers.UpSampling2D((1, 2))(keras.layers.AveragePooling2D(2)(inputs))
    for _ in range(2):
        x = keras.layers.Conv2D(
            2, (9, 1), padding="same", activation="tanh", kernel_initializer=init
        )(x)
    x = keras.layers.UpSampling2D((2, 1))(x)
    return keras.Model(inputs, keras.layers.Conv2D(1, 1)(x))


def _dense_block(n: int):
    """Each convolution reads all earlier outputs: a graph many paths deep."""
    import keras

    inputs = keras.Input((None, None, 1))
    features = [inputs]
    for _ in range(n):
        x = features[0] if len(features) == 1 else keras.layers.Concatenate()(features)
        features.append(keras.layers.Conv2D(2, 3, padding="same")(x))
    return keras.Model(inputs, keras.layers.Conv2D(1, 1)(keras.layers.Concatenate()(features)))


def _shared_pooling_unet():
    """One MaxPooling2D layer called twice (4x down), bilinear and transposed-convolution
    upsampling, a skip: the sides must be padded to multiples of 4, not 2."""
    import keras

    inputs = keras.Input((None, None, 1))
    pool = keras.layers.MaxPooling2D(2)
    half = pool(keras.layers.Conv2D(4, 3, padding="same", activation="tanh")(inputs))
    quarter = keras.layers.Conv2D(4, 3, padding="same", activation="tanh")(pool(half))
    up = keras.layers.UpSampling2D(2, interpolation="bilinear")(quarter)
    up = keras.layers.Conv2DTranspose(4, 2, strides=2)(keras.layers.Concatenate()([up, half]))
    return keras.Model(inputs, keras.layers.Conv2D(1, 3, padding="same")(up))


def _unbounded_models() -> dict:
    """Models whose reach the config cannot bound."""
    import keras

    class Smooth(keras.layers.Layer):  # a 9x9 blur the config does not show
        def call(self, x):
            return keras.ops.average_pool(x, 9, strides=1, padding="same")

    class Net(keras.Model):  # a subclass: its call() may do more than its graph
        def __init__(self, **kwargs):
            inputs = keras.Input((None, None, 1))
            super().__init__(inputs, keras.layers.Conv2D(1, 3, padding="same")(inputs), **kwargs)

    inputs = keras.Input((None, None, 1))
    features = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    scale = keras.layers.GlobalAveragePooling2D(keepdims=True)(inputs)
    rows = keras.layers.Concatenate(axis=1)([features, features])
    return {
        "global pooling": keras.Model(inputs, keras.layers.Multiply()([inputs, scale])),
        "group normalization": keras.Model(inputs, keras.layers.GroupNormalization(2)(features)),
        "a layer that is not Keras's": keras.Model(inputs, Smooth()(inputs)),
        "an op over the pixels": keras.Model(
            inputs, inputs - keras.ops.mean(inputs, axis=(1, 2), keepdims=True)
        ),
        "a slice (a shift)": keras.Model(
            inputs, keras.ops.pad(inputs, [[0, 0], [10, 0], [0, 0], [0, 0]])[:, :-10]
        ),
        "softmax over rows": keras.Model(inputs, keras.layers.Softmax(axis=1)(features)),
        "a concatenation of rows": keras.Model(
            inputs, keras.layers.MaxPooling2D((2, 1))(rows)[..., :1]
        ),
        "a wrapper": keras.Model(
            inputs, keras.layers.TimeDistributed(keras.layers.Conv1D(1, 31, padding="same"))(inputs)
        ),
        "a subclass of Model": keras.Model(inputs, Net()(inputs)),
        "ops.average (of everything)": keras.Model(inputs, features - keras.ops.average(features)),
        "channels_first pooling (of columns)": _columns_pooled(),
        "an activation of the user's": keras.Model(
            inputs, keras.layers.Conv2D(1, 3, padding="same", activation=_centred)(inputs)
        ),
    }


def _columns_pooled():
    """A pooling layer told its input is channels_first works on columns and channels:
    with the rows-and-columns pooling after it, columns are 4x coarse; reach 20."""
    import keras

    layers, inputs = keras.layers, keras.Input((None, None, 1))
    x = layers.Conv2D(2, 3, padding="same")(inputs)
    x = layers.MaxPooling2D((2, 1), data_format="channels_first")(x)
    x = layers.Conv2D(2, 9, padding="same")(layers.MaxPooling2D((1, 2))(x))
    return keras.Model(inputs, layers.Conv2D(1, 1)(layers.UpSampling2D((1, 4))(x)))


def _centred(x):
    import keras

    return x - keras.ops.mean(x, axis=(1, 2), keepdims=True)


def test_the_margin_counts_every_call_of_shared_and_nested_layers():
    x = np.random.default_rng(2).random((1, 96, 96, 1), dtype=np.float32)
    for label, model in _small_models().items():
        _, halo = job.model_geometry(_config(model))
        assert halo is not None and _reach(model, x) <= halo, label


def _random_convnet(rng):
    """A random stack of convolutions (kernels 1-5, dilated, strided), "same" poolings
    (2 or 3 wide, stride 2), then nearest, bilinear or transposed-convolution upsampling
    back to full size: layouts whose reach is easy to get wrong by a pixel."""
    import keras

    layers, init = keras.layers, keras.initializers.RandomNormal(stddev=0.5)
    inputs = keras.Input((None, None, 1))
    x, strides, names = inputs, [], []
    for _ in range(int(rng.integers(2, 8))):
        kind, k = rng.choice(["conv", "dilated", "strided", "pool", "up"]), int(rng.integers(1, 6))
        if kind in ("strided", "pool") and len(strides) < 3:
            pool = [layers.MaxPooling2D, layers.AveragePooling2D][rng.integers(2)]
            x = (
                layers.Conv2D(3, k, 2, "same", activation="tanh", kernel_initializer=init)(x)
                if kind == "strided"
                else pool(int(rng.integers(2, 4)), 2, "same")(x)
            )
            strides.append(2)
        elif kind == "up" and strides:
            kind = "transposed" if k > 3 else "upsampling"
            x = (
                layers.Conv2DTranspose(3, k, strides.pop(), "same", kernel_initializer=init)(x)
                if k > 3
                else layers.UpSampling2D(
                    strides.pop(), interpolation=["nearest", "bilinear"][k % 2]
                )(x)
            )
        else:
            kind, rate = ("dilated", 2) if kind == "dilated" else ("conv", 1)
            x = layers.Conv2D(
                3, k, 1, "same", dilation_rate=rate, activation="tanh", kernel_initializer=init
            )(x)
        names.append(f"{kind}{k}")
    for step in reversed(strides):
        x = layers.UpSampling2D(step)(x)
    return keras.Model(inputs, layers.Conv2D(1, 1, kernel_initializer=init)(x)), names


def test_the_margin_bounds_the_reach_of_random_convnets():
    """Poked at 12 positions (the reach of a strided model depends on the position on its
    grid), no output moves farther than the margin."""
    import keras

    rng = np.random.default_rng(3)
    for trial in range(12):
        keras.utils.set_random_seed(trial)
        model, names = _random_convnet(rng)
        multiple, halo = job.model_geometry(_config(model))
        x = rng.random((1, 96, 96, 1), dtype=np.float32)
        base = np.asarray(model(x))
        reach = 0
        for dy, dx in [(dy, dx) for dy in range(4) for dx in range(0, 6, 2)]:
            poked = x.copy()
            poked[0, 48 + dy, 48 + dx] += 1.0
            ys, xs = np.nonzero(np.abs(np.asarray(model(poked)) - base)[0, ..., 0] > 0)
            reach = max(reach, np.abs(ys - 48 - dy).max(), np.abs(xs - 48 - dx).max())
        assert reach <= halo and halo % multiple == 0, names


def test_sides_are_padded_to_what_a_shared_pooling_layer_needs():
    """The multiple follows the calls too: a pooling layer called twice needs sides of a
    multiple of 4; padded to 2 (its count in the config), a 6x6 image fails. Paths
    pooled by 2 and by 3 need 6 (the least common multiple, not the largest)."""
    import keras

    model = _shared_pooling_unet()
    multiple, _ = job.model_geometry(_config(model))
    assert multiple == 4
    assert model(np.zeros((1, 12, 8, 1), np.float32)).shape == (1, 12, 8, 1)
    with pytest.raises(Exception, match="(?i)shape|dimension"):
        model(np.zeros((1, 6, 6, 1), np.float32))
    inputs, layers = keras.Input((None, None, 1)), keras.layers
    halves = layers.UpSampling2D(2)(layers.MaxPooling2D(2)(inputs))
    thirds = layers.UpSampling2D(3)(layers.AveragePooling2D(3)(inputs))
    model = keras.Model(inputs, layers.Add()([halves, thirds]))
    assert job.model_geometry(_config(model))[0] == 6
    assert model(np.zeros((1, 6, 12, 1), np.float32)).shape == (1, 6, 12, 1)
    # ops the walk does not know still show their strides (a pooling's, a convolution's)
    pooled = keras.ops.nn.max_pool(inputs, 2, strides=2)
    kernel = np.full((3, 3, 1, 1), 0.1, np.float32)
    pooled = keras.ops.nn.conv(pooled, kernel, strides=2, padding="same")
    model = keras.Model(inputs, layers.UpSampling2D(4)(layers.Conv2D(1, 3, padding="same")(pooled)))
    assert job.model_geometry(_config(model)) == (4, None)
    # ... and elementwise ops keep the model tiled
    model = keras.Model(inputs, keras.ops.nn.gelu(layers.Conv2D(1, 3, padding="same")(inputs)))
    assert job.model_geometry(_config(model)) == (1, 1)


def test_a_downsampling_the_config_does_not_show_is_found_by_the_probe(tmp_path, capfd):
    """A strided slice keeps no strides in the config: the actor's probe (sides an odd
    and an even multiple) finds that the model needs even sides, and a 67x45 image is
    padded for it instead of failing."""
    import keras

    inputs = keras.Input((None, None, 1))
    half = keras.layers.UpSampling2D(2)(inputs[:, ::2, ::2, :])
    keras.Model(inputs, keras.layers.Average()([inputs, half])).save(tmp_path / "slice.keras")
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "odd.png").write_bytes(png(np.full((67, 45), 100, np.uint8)))
    settings = job.JobSettings.in_process(str(tmp_path / "slice.keras"), str(src), str(dst))
    assert (settings.spec.multiple, settings.spec.halo) == (1, None)
    denoiser = job.Denoiser(settings)
    assert denoiser.spec.multiple == 2
    assert "needs sides of a multiple of 2 (found by running it), not 1" in capfd.readouterr().err
    rows = denoiser({"path": np.array(["odd.png"])}).to_pylist()
    assert rows[0]["status"] == "ok", rows
    assert np.asarray(Image.open(dst / "odd.png")).shape == (67, 45)


def test_tiles_start_on_the_grid_of_a_model_that_downsamples_by_3():
    """Tiles start at multiples of the tile side, which must then be a multiple of 3:
    1023 instead of 1024 (here 63 instead of 64, which shows seams)."""
    import keras

    inputs, layers = keras.Input((None, None, 1)), keras.layers
    x = layers.Conv2D(4, 3, strides=3, padding="same", activation="tanh")(inputs)
    model = keras.Model(inputs, layers.Conv2D(1, 3, padding="same")(layers.UpSampling2D(3)(x)))
    multiple, halo = job.model_geometry(_config(model))
    assert (multiple, job.tile_side(multiple), job.tile_side(multiple, 64)) == (3, 1023, 63)
    images = np.random.default_rng(4).random((2, 129, 129, 1), dtype=np.float32)
    whole = np.asarray(model(images))

    def tiles(side):
        return job.tiled(lambda t: np.asarray(model(t)), images, side, halo)

    np.testing.assert_allclose(tiles(63), whole, atol=1e-6)
    assert np.abs(tiles(64) - whole).max() > 1e-2


def test_valid_padding_models_pass_the_actor_probe_and_two_inputs_are_refused(tmp_path):
    """A "valid" convolution restored by padding runs on sides of at least its kernel:
    the actor's shape probe is wider than the model's reach (it was multiple x multiple,
    1x1 here, and the actor died). A model of two inputs is refused before any actor."""
    import keras

    inputs = keras.Input((None, None, 1))
    x = keras.layers.Conv2D(1, 5, padding="valid")(inputs)
    keras.Model(inputs, keras.layers.ZeroPadding2D(2)(x)).save(tmp_path / "valid.keras")
    settings = job.JobSettings.in_process(
        str(tmp_path / "valid.keras"), str(tmp_path), str(tmp_path / "out")
    )
    assert settings.spec.multiple == 1 and settings.spec.halo >= 2  # its reach: 2
    images = np.random.default_rng(0).random((1, 40, 40, 1), dtype=np.float32)
    model = keras.models.load_model(tmp_path / "valid.keras")
    denoiser = job.Denoiser(settings)
    np.testing.assert_allclose(denoiser.predict(images), np.asarray(model(images)), atol=1e-6)
    other = keras.Input((None, None, 1))
    two = keras.Model([inputs, other], keras.layers.Add()([inputs, other]))
    two.save(tmp_path / "two.keras")
    with pytest.raises(ValueError, match=r"takes 2 inputs: the denoise job needs a model of one"):
        job.inspect_model((tmp_path / "two.keras").read_bytes(), "two.keras")
    # Nor is one whose output convolution has other channels than its input (it was, by
    # the actors, after Ray and TensorFlow had started, ~10-20 s later), in either API.
    keras.Model(inputs, keras.layers.Conv2D(3, 3, padding="same")(inputs)).save(
        tmp_path / "3.keras"
    )
    rgb = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Conv2D(1, 3)])
    rgb.save(tmp_path / "seq.keras")
    for name, channels in (
        ("3.keras", r"1 channel\(s\) to images of 3"),
        ("seq.keras", "3 channel"),
    ):
        with pytest.raises(ValueError, match=rf"maps images of {channels}.*output layer's filters"):
            job.inspect_model((tmp_path / name).read_bytes(), name)


def test_a_config_whose_graph_cannot_be_followed_is_run_whole_with_a_note(model_path):
    """A layer graph the walk cannot follow does not stop the job: the model is padded
    as aelib's file says and never tiled, and the driver says so."""
    with zipfile.ZipFile(model_path) as zf:
        files = {name: zf.read(name) for name in zf.namelist()}
    config = json.loads(files["config.json"])
    config["config"]["output_layers"] = [["no_such_layer", 3, 0]]
    files["config.json"] = json.dumps(config).encode()
    payload = io.BytesIO()
    with zipfile.ZipFile(payload, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    spec = job.inspect_model(payload.getvalue(), "m.keras")
    assert (spec.multiple, spec.halo) == (4, None)
    assert "cannot follow its layer graph" in spec.note and "never tiled" in spec.note
    assert job.inspect_model(Path(model_path).read_bytes(), "m.keras").note == ""


def test_a_model_whose_reach_the_config_cannot_bound_is_never_tiled():
    for label, model in _unbounded_models().items():
        assert job.model_geometry(_config(model))[1] is None, label
    assert job.model_geometry(_config(_columns_pooled()))[0] == 4


def test_model_temp_files_of_ended_processes_are_removed(model_path, tmp_path, monkeypatch):
    """An actor killed while it loads the model leaves its temp copy; the next load
    on the node deletes it, and keeps those of processes still running."""
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    ended = subprocess.Popen(["true"])
    ended.wait()
    stale = temp / f"denoise-model-pid{ended.pid}-{'a' * 32}.keras"
    running = temp / f"denoise-model-pid1-{'b' * 32}.keras"  # init: always running
    other = temp / "denoise-model-notes.txt"
    for path in (stale, running, other):
        path.write_bytes(b"x")
    settings = job.JobSettings.in_process(str(model_path), str(tmp_path), str(tmp_path / "o"))
    job.Denoiser(settings)
    assert sorted(p.name for p in temp.iterdir()) == [other.name, running.name]


def test_a_group_of_icons_then_photos_stays_within_its_pixels(model_path, tmp_path, monkeypatch):
    """Groups are filled from each image's header, not guessed from the first ones: a
    block of small images followed by big ones (sorted paths: icons/, then photos/)
    is not decoded all at once; and files are read ahead at most READ_BYTES at a time."""
    src, dst = tmp_path / "in", tmp_path / "out"
    rng = np.random.default_rng(6)
    names = [f"a_icon{i}.png" for i in range(6)] + [f"b_photo{i}.png" for i in range(5)]
    for name in names:
        shape = (28, 28) if "icon" in name else (200, 148)
        src.mkdir(exist_ok=True)
        (src / name).write_bytes(png((rng.random(shape) * 255).astype(np.uint8)))
    for cut in (20, 25):  # too short for a PNG header: a failed row, not a failed block
        (src / f"c_cut{cut}.png").write_bytes((src / names[0]).read_bytes()[:cut])
        names.append(f"c_cut{cut}.png")
    sizes = [(src / name).stat().st_size for name in names]
    monkeypatch.setattr(job, "GROUP_PIXELS", 2 * 200 * 148 + 100)
    monkeypatch.setattr(job, "READ_BYTES", 2 * max(sizes) + 1)
    denoiser = job.Denoiser(job.JobSettings.in_process(str(model_path), str(src), str(dst)))
    groups, reads = [], []
    real_denoise, real_parallel = denoiser._denoise, denoiser._parallel
    denoiser._denoise = lambda todo: (groups.append(todo), real_denoise(todo))[1]
    denoiser._parallel = lambda fn, items: (
        reads.append(len(items)) if getattr(fn, "func", fn) == denoiser._read else None,
        real_parallel(fn, items),
    )[1]
    rows = denoiser({"path": np.array(names), "bytes": np.array(sizes)}).to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 11 + ["failed"] * 2
    assert all("not a readable image" in r["error"] for r in rows[11:])
    assert [len(g) for g in groups] == [7, 2, 2]  # 6 icons and a photo, then photos by 2
    assert max(sum(item["array"].size for item in g) for g in groups) <= job.GROUP_PIXELS
    assert max(reads) <= 6 and sum(reads) == len(names)  # icons are small; photos 2 by 2
    assert sorted(p.name for p in dst.iterdir()) == names[:11]


def test_an_error_outside_the_per_image_handling_fails_its_block_not_the_job(
    model_path, tmp_path, capfd
):
    """An exception that escapes an actor's per-image handling (a bug: here a block whose
    sizes do not match its paths) fails that block's inputs, each row naming its item,
    with the traceback in the log; Ray Data would have stopped the whole job."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a.png").write_bytes(png(np.zeros((28, 28), np.uint8)))
    denoiser = job.Denoiser(job.JobSettings.in_process(str(model_path), str(src), str(dst)))
    batch = {"path": np.array(["a.png", "b.png"]), "bytes": np.array([1]), job.ITEM: [7, 8]}
    table = denoiser(batch)
    assert table.column(job.ITEM).to_pylist() == [7, 8]
    rows = table.to_pylist()
    assert [(r["path"], r["status"]) for r in rows] == [("a.png", "failed"), ("b.png", "failed")]
    assert rows[0]["error"].startswith(f"{job.LOST} failed in its actor (zip() argument 2")
    assert "Traceback" in capfd.readouterr().err
    assert not dst.exists()  # (nothing written for it)
    # A Parquet block's rows name their row group's item (here one row: no such file).
    groups = {"path": np.array([str(tmp_path / "x.parquet")]), "row_group": np.array([3])}
    rows = denoiser({**groups, job.ITEM: np.array([5])}).to_pylist()
    assert [(r["path"], r["status"], r[job.ITEM]) for r in rows] == [
        (f"{tmp_path / 'x.parquet'}#row_group=3", "failed", 5)
    ]


@pytest.mark.parametrize("backend_from", ["env", "keras.json"])
def test_unused_imports_are_skipped_only_inside_the_block(backend_from, tmp_path):
    code = f"""
import sys
sys.path.insert(0, {str(ROOT / "jobs")!r})
import denoise
with denoise._optional_imports_skipped(("sklearn", "json", "jax")):
    for name in ("sklearn", "json", "jax"):  # json: already imported; jax: the backend
        try:
            __import__(name)
            print(name, "imported")
        except ImportError:
            print(name, "skipped")
print("sklearn" in sys.modules)
import sklearn
print("sklearn imported")
"""
    pytest.importorskip("jax")
    env = dict(_env(), KERAS_HOME=str(tmp_path))
    if backend_from == "env":
        env["KERAS_BACKEND"] = "jax"
    else:
        env.pop("KERAS_BACKEND", None)
        (tmp_path / "keras.json").write_text(json.dumps({"backend": "jax"}))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        "sklearn skipped",
        "json imported",
        "jax imported",
        "False",
        "sklearn imported",
    ]


def test_runs_under_jax_without_tensorflow(first_run, model_path, dataset, tmp_path):
    """The lent GPU machines have JAX but no TensorFlow: the actors must not need it."""
    pytest.importorskip("jax")
    env = without_tensorflow(_env(), tmp_path)
    dst = tmp_path / "out"
    cmd = [sys.executable, str(JOB), "--model", str(model_path), "--input", str(dataset["src"])]
    cmd += ["--output", str(dst), "--clean", str(dataset["clean"]), "--batch-size", "16"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = manifest(dst)
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ok) == N_DIGITS + 3  # the digits and the three odd-sized images
    assert {r["device"] for r in ok} == {"CPU"}
    for row in ok:
        assert (dst / row["output"]).is_file()
    digits = [r for r in ok if r["psnr"] is not None]
    assert len(digits) == N_DIGITS
    assert np.mean([r["psnr"] - r["psnr_noisy"] for r in digits]) > 2.0
    for row in ok:  # the same model under TensorFlow (first_run): the same 8-bit outputs
        with Image.open(dst / row["output"]) as a, Image.open(first_run[0] / row["output"]) as b:
            diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
        assert diff.max() <= 1, row["path"]


def _png16(width: int, height: int, colour_type: int, channels: int, rng) -> bytes:
    """A 16-bit PNG of `channels` samples a pixel, made by hand (Pillow writes none)."""
    samples = rng.integers(0, 65536, (height, width * channels)).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in samples)
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        job._png_chunk(kind, data)
        for kind, data in ((b"IHDR", header), (b"IDAT", zlib.compress(raw)), (b"IEND", b""))
    )


def test_pixels_pillow_reads_otherwise_get_a_note_or_a_reason(monkeypatch):
    rng = np.random.default_rng(3)
    # 16-bit gray + alpha: Pillow reads it as RGBA of three equal planes, 8 bits each.
    array, maxval, info, alpha = job.decode(_png16(5, 4, 4, 2, rng), "per-channel")
    assert array.shape == (4, 5, 1) and maxval == 255 and alpha.shape == (4, 5)
    assert info["note"] == "16-bit gray + alpha read as 8 bits (Pillow), written as 8 bits"
    # CMYK is converted to RGB, and under --rgb luminance on to gray: the note says which.
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (6, 7, 4), np.uint8), mode="CMYK").save(buf, "JPEG")
    for rgb, to, channels in (("per-channel", "RGB", 3), ("luminance", "gray", 1)):
        array, _, info, _ = job.decode(buf.getvalue(), rgb)
        assert (
            array.shape == (6, 7, channels)
            and info["note"] == f"CMYK pixels converted to {to} (Pillow)"
        )
    # 32-bit integers beyond 16 bits would be clipped: refused, as a bad input.
    for values, ok in (([0, 65535], True), ([0, 255000], False), ([-5, 10], False)):
        buf = io.BytesIO()
        Image.fromarray(np.array([values, values], np.int32), mode="I").save(buf, "TIFF")
        if ok:
            assert job.decode(buf.getvalue(), "per-channel")[0].max() == 65535
            continue
        with pytest.raises(job.UnsupportedImage, match="32-bit integer pixels") as e:
            job.decode(buf.getvalue(), "per-channel")
        assert str(e.value).startswith(job.BAD_INPUT)
    # A 16-bit PGM (Pillow's mode I too) is no 32-bit file; one of another maximum value
    # than 65535 is read scaled to 0..65535, which its note says (it said neither). A
    # PPM's RGB of more than 8 bits is read as 8 bits, as a 16-bit PNG's.
    values = np.array([[0, 1000, 4095, 2000]] * 3, np.uint16)
    for maxval, note in ((65535, None), (4095, "PGM of maximum value 4095, read scaled to")):
        pgm = b"P5\n4 3\n%d\n" % maxval + values.astype(">u2").tobytes()
        array, _, info, _ = job.decode(pgm, "per-channel")
        assert array.dtype == np.uint16 and (info.get("note") or "").startswith(note or ""), info
        assert note or "note" not in info
    assert array[0, :, 0].tolist() == [0, 16004, 65535, 32007]  # (0..4095 on 0..65535)
    ppm = b"P6\n1 3\n4095\n" + values.astype(">u2").tobytes()
    assert job.decode(ppm, "per-channel")[2]["note"] == (
        "PPM of maximum value 4095 read scaled to 0 to 255 (Pillow), written as 8 bits"
    )
    array, _, info, _ = job.decode(b"P5\n4 1\n100\n" + bytes([0, 50, 100, 20]), "per-channel")
    assert array.ravel().tolist() == [0, 128, 255, 51] and info["note"].startswith(
        "PGM of maximum value 100 read scaled to 0 to 255"
    )
    assert "note" not in job.decode(b"P5\n1 1\n255\n\x07", "per-channel")[2]
    # (Pillow before 11 keeps its tiles as plain tuples, with 3 arguments for raw data)
    for args, maxval in ((("L", 0, 1), 255), (("I;16B", 0, 1), 65535), (("I", 4095), 4095)):
        tile = [("raw", (0, 0, 1, 1), 11, args)]
        assert job._ppm_maxval(types.SimpleNamespace(format="PPM", tile=tile)) == maxval
    # An animation keeps its first frame, and says so.
    frames = [Image.fromarray(np.full((6, 6), v, np.uint8)) for v in (0, 100, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    array, _, info, _ = job.decode(buf.getvalue(), "per-channel")
    assert info["note"] == "first of 3 frames denoised, the others dropped" and array.max() == 0
    buf = io.BytesIO()  # a camera JPEG with a preview: Pillow's MPO, not an animation
    frames[0].convert("RGB").save(buf, "MPO", save_all=True, append_images=[frames[1]])
    assert "note" not in job.decode(buf.getvalue(), "per-channel")[2]
    # More pixels than --max-pixels or Pillow's guard allows: a bad input (not retried),
    # not a crash, and the reason names the flag that lets it through.
    digit = png(np.zeros((8, 8), np.uint8))
    for limit in (64, 0, None):
        assert job.decode(digit, "per-channel", limit)[0].shape == (8, 8, 1)
    with pytest.raises(job.UnsupportedImage, match="64 pixels, more than --max-pixels 63") as e:
        job.decode(digit, "per-channel", 63)
    assert str(e.value).startswith(job.BAD_INPUT)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # Pillow's own, refusing > 20
    with pytest.raises(job.UnsupportedImage, match="too big for Pillow: .*64 pixels") as e:
        job.decode(digit, "per-channel")
    assert str(e.value).startswith(job.BAD_INPUT)
    job.allow_pixels(20)  # what an actor does: Pillow's guard (refusing > 40) follows
    assert Image.MAX_IMAGE_PIXELS == 20
    for limit in (20, 30):  # Pillow refuses it first in Image.open: the same reason
        reason = f"64 pixels, more than --max-pixels {limit} "
        with pytest.raises(job.UnsupportedImage, match=reason):
            job.decode(digit, "per-channel", limit)
    job.allow_pixels(100)  # Pillow's guard no longer stands in the way
    assert Image.MAX_IMAGE_PIXELS == 100
    assert job.decode(digit, "per-channel", 100)[0].shape == (8, 8, 1)
    job.allow_pixels(30)  # only ever loosened
    assert Image.MAX_IMAGE_PIXELS == 100
    job.allow_pixels(None)
    assert Image.MAX_IMAGE_PIXELS is None


def _tiff16(width: int, height: int, channels: int, rng) -> bytes:
    """An uncompressed 16-bit RGB (3) or RGBA (4) TIFF, made by hand (Pillow writes none)."""
    data = rng.integers(0, 65536, (height, width * channels)).astype("<u2").tobytes()
    bits_at = 8 + len(data)  # BitsPerSample's values, then the IFD
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, channels, bits_at)]
    tags += [(259, 3, 1, 1), (262, 3, 1, 2), (273, 4, 1, 8), (277, 3, 1, channels)]
    tags += [(278, 4, 1, height), (279, 4, 1, len(data))]
    tags += [(338, 3, 1, 2)] if channels == 4 else []  # ExtraSamples: unassociated alpha
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", *t) for t in tags)
    header = b"II*\x00" + struct.pack("<I", bits_at + 2 * channels)
    return header + data + struct.pack(f"<{channels}H", *[16] * channels) + ifd + b"\0" * 4


def test_a_transparent_colour_is_kept_as_alpha_and_16_bit_tiffs_say_they_lost_bits():
    """A PNG's tRNS colour on gray or RGB pixels was dropped without a word (a palette's
    became alpha), and a 16-bit RGB TIFF came out as 8 bits with no note (a PNG's had one)."""
    rng = np.random.default_rng(6)
    gray = rng.integers(0, 256, (6, 7)).astype(np.uint8)
    key = int(gray[2, 3])
    clear = gray == key
    rgb = np.dstack([gray, gray // 2, 255 - gray])
    for image, transparency in (
        (Image.fromarray(gray), key),
        (Image.fromarray(clear), 1),  # 1 bit a pixel (read as 0 and 255)
        (Image.fromarray(rgb), tuple(int(v) for v in rgb[2, 3])),
        (Image.fromarray(gray.astype(np.uint16) * 257), key * 257),  # I;16
    ):
        buf = io.BytesIO()
        image.save(buf, "PNG", transparency=transparency)
        array, maxval, _, alpha = job.decode(buf.getvalue(), "per-channel")
        pixels = np.asarray(image.convert("L") if image.mode == "1" else image)
        assert np.array_equal(array, pixels if pixels.ndim == 3 else pixels[..., None])
        assert alpha is not None and np.array_equal(alpha == 0, clear), image.mode
        assert alpha.max() == maxval and alpha.dtype == array.dtype, image.mode
        written, note = job.encode(np.dstack([array, alpha]), "PNG")
        with Image.open(io.BytesIO(written)) as back:  # (16-bit LA: Pillow reads RGBA)
            assert back.mode in ("LA", "RGBA") and np.array_equal(
                np.asarray(back.getchannel("A")) == 0, clear
            ), image.mode
    # A GIF of gray levels with a transparent one: gray + alpha, as without it (it was
    # RGB + alpha of three equal planes: three times the model's work, an RGB output).
    for save in ({"format": "GIF", "transparency": key}, {"format": "PNG", "transparency": key}):
        buf = io.BytesIO()
        Image.fromarray(gray).convert("P").save(buf, **save)
        with Image.open(io.BytesIO(buf.getvalue())) as opened:
            assert opened.mode == "P", save
        levels, _, _, opacity = job.decode(buf.getvalue(), "per-channel")
        assert levels.shape == (6, 7, 1) and np.array_equal(levels[..., 0], gray), save
        assert np.array_equal(opacity == 0, clear), save
    # A 16-bit gray + alpha in TIFF: Pillow writes none, so the alpha goes, with a note.
    _, note = job.encode(np.dstack([array, alpha]), "TIFF")
    assert note == "alpha dropped: TIFF cannot store it"
    buf = io.BytesIO()  # a colour no pixel has: nothing is clear, no alpha
    Image.fromarray(np.full((4, 4), 9, np.uint8)).save(buf, "PNG", transparency=200)
    assert job.decode(buf.getvalue(), "per-channel")[3] is None
    for channels, alpha_kept in ((3, False), (4, True)):
        array, maxval, info, alpha = job.decode(_tiff16(5, 4, channels, rng), "per-channel")
        assert array.shape == (4, 5, 3) and maxval == 255 and (alpha is not None) == alpha_kept
        assert info["note"] == "16-bit RGB read as 8 bits (Pillow), written as 8 bits"
    buf = io.BytesIO()  # an 8-bit RGB TIFF: nothing to say
    Image.fromarray(rgb).save(buf, "TIFF")
    assert "note" not in job.decode(buf.getvalue(), "per-channel")[2]


def test_a_transparent_colour_is_taken_on_the_scale_pillow_reads_the_pixels_on():
    """A PNG's tRNS colour is on the file's scale: Pillow keeps it so, while it reads a
    16-bit RGB PNG as its high bytes and 2- or 4-bit gray as 0-255. The key's own
    pixels are the transparent ones (not those whose 8 bits equal the key's 16, nor
    none at all)."""

    def png(depth: int, colour_type: int, rows: list[bytes], trns: bytes) -> bytes:
        header = struct.pack(">IIBBBBB", 3, len(rows), depth, colour_type, 0, 0, 0)
        raw = b"".join(b"\x00" + row for row in rows)
        chunks = ((b"IHDR", header), (b"tRNS", trns), (b"IDAT", zlib.compress(raw)))
        return b"\x89PNG\r\n\x1a\n" + b"".join(
            job._png_chunk(kind, data) for kind, data in (*chunks, (b"IEND", b""))
        )

    # 16-bit RGB: the key (100, 0, 0) is nearly black; (25605, 10, 10) reads as (100, 0, 0).
    pixels = np.array([[25605, 10, 10], [100, 0, 0], [65535, 65535, 65535]], ">u2")
    for key, clear in (((100, 0, 0), [1]), ((65535, 65535, 65535), [2])):
        payload = png(16, 2, [pixels.tobytes()], struct.pack(">3H", *key))
        array, maxval, _, alpha = job.decode(payload, "per-channel")
        assert array[0].tolist() == [[100, 0, 0], [0, 0, 0], [255, 255, 255]]
        assert alpha is not None and np.flatnonzero(alpha[0] == 0).tolist() == clear, key
    # 2- and 4-bit gray: levels 0..3 (0..15), read as 0, 85, 170, 255 (0, 17, ...).
    for depth, row in ((2, bytes([0b00011011])), (4, bytes([0x01, 0x2F]))):
        payload = png(depth, 0, [row], struct.pack(">H", 1))
        array, maxval, _, alpha = job.decode(payload, "per-channel")
        step = 255 // ((1 << depth) - 1)
        assert array[0, 1, 0] == step and maxval == 255
        assert alpha is not None and (alpha[0] == 0).tolist()[:3] == [False, True, False]


def test_an_image_too_thin_for_ssim_has_null_ssims_in_the_manifest(model_path, tmp_path):
    """A 2-px-wide image with its clean reference: PSNR measured, no SSIM, said in the
    error column, and the SSIM columns are null in the manifest, as for an input without
    a reference (they held NaN, and pyarrow's or an SQL engine's mean of them was NaN)."""
    src, clean, dst = tmp_path / "src", tmp_path / "clean", tmp_path / "dst"
    reference = (np.random.default_rng(0).random((40, 2)) * 255).astype(np.uint8)
    for folder, pixels in ((src, reference // 2), (clean, reference)):
        folder.mkdir()
        (folder / "thin.png").write_bytes(png(pixels))
    settings = job.JobSettings.in_process(str(model_path), str(src), str(dst), clean=str(clean))
    table = job.Denoiser(settings)({"path": np.array(["thin.png"]), "bytes": np.array([0])})
    writer = job.ManifestWriter(job.Storage(str(dst)), {"run": "1"})
    writer.add(table.drop_columns([c for c in table.column_names if c == job.ITEM]))
    writer.close()
    [row] = pq.read_table(dst / job.MANIFEST).to_pylist()
    assert row["status"] == "ok" and row["error"] == "no SSIM: under 3 px on a side", row
    assert np.isfinite(row["psnr"]) and np.isfinite(row["psnr_noisy"])
    assert row["ssim"] is None and row["ssim_noisy"] is None
    assert pa.compute.mean(pq.read_table(dst / job.MANIFEST).column("ssim")).as_py() is None


def test_metrics_put_a_reference_and_an_input_of_other_bit_depths_on_one_scale():
    rng = np.random.default_rng(4)
    clean = rng.integers(0, 256, (20, 20, 1)).astype(np.uint8)
    noisy = np.clip(clean + rng.integers(-40, 40, clean.shape), 0, 255).astype(np.uint8)
    out = np.clip(clean + rng.integers(-10, 10, clean.shape), 0, 255).astype(np.uint8)
    same = job._metrics(clean, 255, noisy, out, 255)
    wide = job._metrics(
        clean, 255, noisy.astype(np.uint16) * 257, out.astype(np.uint16) * 257, 65535
    )
    back = job._metrics(clean.astype(np.uint16) * 257, 65535, noisy, out, 255)
    for key, value in same.items():
        assert wide[key] == pytest.approx(value) and back[key] == pytest.approx(value), key
    assert same["psnr"] > same["psnr_noisy"] > 10


def test_a_folder_read_as_parquet_says_which_files_are_not_inputs(model_path, tmp_path, capsys):
    """--input-format parquet on a folder left its other files out without a word (auto
    said so); Spark's _SUCCESS and hidden files are not counted. The note waits for the
    locations' check: a refused rerun into the folder said first that its old outputs
    were "not inputs"."""
    table = pa.table({"path": ["a.png"], "image": [png(np.zeros((4, 4), np.uint8))]})
    pq.write_table(table, tmp_path / "train-0.parquet")
    for name in ("notes.txt", "_SUCCESS", ".DS_Store"):
        (tmp_path / name).write_text("x")
    inputs = job.find_inputs(str(tmp_path), "parquet")
    assert inputs.parquet == [str(tmp_path / "train-0.parquet")]
    (note,) = inputs.notes
    assert "is read as Parquet (1 file(s)); its 1 other file(s) (e.g. notes.txt) are not" in note
    assert capsys.readouterr().err == ""  # (said by run(), after check_locations)
    args = ["--model", str(model_path), "--input", str(tmp_path), "--input-format", "parquet"]
    assert job.main([*args, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "outside the input tree" in err and "not inputs" not in err, err
    (tmp_path / "notes.txt").unlink()
    assert job.find_inputs(str(tmp_path), "parquet").notes == []
    # (a glob takes what it names)
    assert job.find_inputs(str(tmp_path / "*.parquet"), "parquet").notes == []


def test_parquet_columns_are_checked_by_type_and_bad_files_fail_alone(tmp_path):
    good = pa.table({"path": ["a.png"], "image": pa.array([b"x"], pa.binary())})
    hf_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    hf = pa.table({"image": pa.array([{"bytes": b"y", "path": "b.png"}], hf_type), "label": [1]})
    raw_paths = pa.table({"path": pa.array([b"c\xc3\xa9.png"]), "image": pa.array([b"z"])})
    assert job._parquet_values(hf, "image") == [b"y"]  # a struct's bytes
    assert job._parquet_values(hf, "image.path") == ["b.png"]
    schema_problems = {
        "hf, default columns": (hf.schema, "path", "image", "--path-column image.path"),
        "numbers for images": (
            pa.schema([("path", pa.string()), ("image", pa.int64())]),
            "path",
            "image",
            "--image-column image is int64",
        ),
        "fractions for paths": (
            pa.schema([("path", pa.float64()), ("image", pa.binary())]),
            "path",
            "image",
            "--path-column path is double",
        ),
    }
    for what, (schema, path_column, image_column, expected) in schema_problems.items():
        problem = job._column_problem(schema, "S", path_column, image_column)
        assert problem and expected in problem, (what, problem)
    for schema, path_column in ((good.schema, "path"), (hf.schema, "image.path")):
        assert job._column_problem(schema, "S", path_column, "image") is None
    for paths, images in (  # what pyarrow may hand back, and row ids as names
        (pa.string_view(), pa.binary_view()),
        (pa.large_string(), pa.large_binary()),
        (pa.dictionary(pa.int32(), pa.string()), pa.dictionary(pa.int32(), pa.binary())),
        (pa.int64(), pa.binary()),
    ):
        schema = pa.schema([("path", paths), ("image", images)])
        assert job._column_problem(schema, "S", "path", "image") is None, schema
        # The driver reads such a file's image sizes too (a finished job's rerun then
        # starts no Ray); binary_length has no kernel for dictionaries and views.
        values = pa.array([b"abc", b"de"])
        values = values.dictionary_encode() if pa.types.is_dictionary(images) else values
        one = tmp_path / f"types_{len(list(tmp_path.iterdir()))}.parquet"
        pq.write_table(pa.table({"path": ["a", "b"], "image": values.cast(images)}), one)
        assert job._sizes_match(pq.ParquetFile(one), 0, "image", [(3,), (2,)]), images
    assert job._column_problem(raw_paths.schema, "S", "path", "image") is None

    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(good, folder / "good.parquet")
    (folder / "broken.parquet").write_bytes(b"PAR1 not really")
    # Spark's files of a write in progress or cut short (their rows repeat the committed
    # files'; every row failed as another row's output) and _metadata are not inputs, as
    # pyarrow's and Spark's readers leave them out; a glob that names them takes them.
    (folder / "_temporary" / "0").mkdir(parents=True)
    pq.write_table(good, folder / "_temporary" / "0" / "part-0.parquet")
    pq.write_table(good, folder / "_metadata.parquet")
    for fmt in ("auto", "parquet"):
        assert sorted(job.find_inputs(str(folder), fmt).parquet) == [
            str(folder / "broken.parquet"),
            str(folder / "good.parquet"),
        ], fmt
    named = job.find_inputs(f"{folder}/_temporary/*/*.parquet", "auto").parquet
    assert named == [str(folder / "_temporary" / "0" / "part-0.parquet")]
    # ... in either format, also where a glob's * names them (it read them as images)
    for fmt in ("auto", "parquet"):
        named = job.find_inputs(f"{folder}/*/*/*", fmt)
        assert named.kind == "parquet" and named.parquet == [
            str(folder / "_temporary" / "0" / "part-0.parquet")
        ], fmt
    # A folder of such files only (a Spark write cut short): the error says where they are.
    (tmp_path / "only" / "_temporary").mkdir(parents=True)
    pq.write_table(good, tmp_path / "only" / "_temporary" / "part-0.parquet")
    for fmt in ("auto", "parquet"):  # (auto read them as images, each failing)
        with pytest.raises(ValueError, match=r"found \(1 under names starting with '_', e\.g\. _"):
            job.find_inputs(str(tmp_path / "only"), fmt)
    shutil.rmtree(folder / "_temporary")
    (folder / "_metadata.parquet").unlink()
    inputs = job.find_inputs(str(folder), "auto")
    args = SimpleNamespace(path_column="path", image_column="image", format="same")
    units, clashes, failed, skipped = job._parquet_units(inputs, args)
    assert units == [(str(folder / "good.parquet"), 0)] and not clashes and not skipped
    assert [row["path"] for row in failed] == [str(folder / "broken.parquet")]
    assert "not a readable Parquet file" in failed[0]["error"]
    # Rows whose output is another row's, or the folder of others' (n.png beside
    # n.png/b.png: whichever came second failed to be written, with an OSError), fail
    # with the reason, as file inputs do.
    nested = ["n.png", "n.png/b.png", "c/d.png", "c//d.png"]
    nest = pa.table({"path": nested, "image": pa.array([b"x"] * 4)})
    pq.write_table(nest, folder / "nest.parquet")
    clashes = job._parquet_units(job.find_inputs(str(folder), "auto"), args)[1]
    assert clashes == {
        "n.png": "its output n.png is also the folder of other outputs (n.png/...)",
        "c/d.png": "its output c/d.png is also the output of another row of the Parquet "
        "input: each would overwrite the others",
    }
    (folder / "nest.parquet").unlink()
    (folder / "good.parquet").unlink()  # every file unusable: the job's error, up front
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        job._parquet_units(job.find_inputs(str(folder), "auto"), args)
    # DST inside the folder of a Parquet glob: its manifest would be read as an input.
    pattern = f"{folder}/**/*.parquet"
    glob_inputs = job.find_inputs(pattern, "auto")
    assert glob_inputs.parquet == [str(folder / "broken.parquet")]
    with pytest.raises(ValueError, match="inside --input"):
        job.check_locations(glob_inputs, pattern, job.Storage(str(folder / "o")))


def test_hugging_face_parquet_and_raw_path_bytes_through_the_job(
    custom_model, tmp_path, shared_ray, capsys
):
    """Also: the actors load a model with a layer of aelib's (they import aelib for it)."""
    digits = (np.random.default_rng(5).random((3, 28, 28)) * 255).astype(np.uint8)
    hf_type = pa.struct([("bytes", pa.binary()), ("path", pa.binary())])
    images = [{"bytes": png(d), "path": f"d{i}.png".encode()} for i, d in enumerate(digits)]
    src = tmp_path / "hf"
    src.mkdir()
    pq.write_table(
        pa.table({"image": pa.array(images, hf_type), "label": [0, 1, 2]}), src / "a.parquet"
    )
    (src / "b.parquet").write_bytes(b"truncated")
    (src / "README.md").write_text("# A dataset card, as a Hugging Face repo has\n")
    (src / ".gitattributes").write_text("*.parquet filter=lfs\n")
    dst = tmp_path / "out"
    # (Without --path-column: the images' own names, as their files have no 'path' column;
    # such files were refused, their users told to give --path-column image.path.)
    result = run_job("--model", custom_model, "--input", src, "--output", dst, ray=shared_ray)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "note: the Parquet files have no 'path' column: their images' own file names" in (
        result.stderr
    )
    assert "read as Parquet (2 file(s)); its 1 other file(s) (e.g. README.md)" in result.stderr
    rows = manifest(dst)
    assert sorted(rows) == [str(src / "b.parquet"), "d0.png", "d1.png", "d2.png"]
    assert rows[str(src / "b.parquet")]["status"] == "failed"
    assert all(rows[f"d{i}.png"]["status"] == "ok" for i in range(3))  # aelib's layer loaded
    assert sorted(p.name for p in dst.glob("*.png")) == ["d0.png", "d1.png", "d2.png"]
    # Beside a file with a 'path' column: each file's own (the first file's decided for
    # all, and the other failed as having no such column).
    pq.write_table(pa.table({"path": ["e.png"], "image": [png(digits[1])]}), src / "c.parquet")
    result = run_job("--model", custom_model, "--input", src, "--output", dst / "2", ray=shared_ray)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "note: 1 of the 2 readable Parquet files have no 'path' column" in result.stderr
    rows = manifest(dst / "2")
    assert sorted(rows) == [str(src / "b.parquet"), "d0.png", "d1.png", "d2.png", "e.png"]
    assert all(rows[name]["status"] == "ok" for name in ("d0.png", "d1.png", "d2.png", "e.png"))
    (src / "c.parquet").unlink()
    # An image file beside them: a folder of images (the Parquet files fail as ones),
    # with a note that says so and how to read their rows.
    (src / "x.png").write_bytes(png(digits[0]))
    found = job.find_inputs(str(src), "auto")
    assert found.kind == "files" and len(found.files) == 4
    (note,) = found.notes
    assert "its 2 Parquet file(s) (e.g. a.parquet) are taken as images, and fail " in note


def test_names_and_links_a_folder_can_hold(model_path, tmp_path):
    """A name up to the file system's limit is written (its temp name is cut to fit);
    a link inside SRC to a folder holding DST does not make DST's files inputs; an
    output an earlier run wrote stays its input's when a clashing input is added."""
    storage = job.Storage(str(tmp_path / "w"))
    long_name = "L" * 240 + ".png"
    storage.write_atomic(long_name, b"data")
    assert (tmp_path / "w" / long_name).read_bytes() == b"data"
    assert [p.name for p in (tmp_path / "w").iterdir()] == [long_name]

    shared = tmp_path / "shared"
    (shared / "out").mkdir(parents=True)
    (shared / "out" / "old.png").write_bytes(b"x")
    (shared / "other.png").write_bytes(b"y")
    src = tmp_path / "src"
    src.mkdir()
    (src / "mine.png").write_bytes(b"z")
    (src / "ext").symlink_to(shared)
    (shared / "out" / "sub").mkdir()
    (shared / "out" / "sub" / "older.png").write_bytes(b"x")
    (src / "to_sub").symlink_to(shared / "out" / "sub")  # below DST: not followed either
    dst = str(shared / "out")
    expected = ["ext/other.png", "mine.png"]
    for out in (dst, f"file://{dst}"):
        assert [rel for rel, _ in job.find_inputs(str(src), "auto", out).files] == expected
        globbed = job.find_inputs(f"{src}/**/*.png", "auto", out).files
        assert [rel for rel, _ in globbed] == expected
    # An input inside the output folder is still the input (only links are cut).
    proj = tmp_path / "proj"
    (proj / "noisy").mkdir(parents=True)
    (proj / "noisy" / "a.png").write_bytes(b"x")
    (proj / "data.parquet").write_bytes(b"x")
    (proj / "noisy" / "to_proj").symlink_to(proj)  # and a glob does not come back through it
    for location in (str(proj / "noisy"), f"{proj}/noisy/*.png", f"{proj}/noisy/**/*.png"):
        assert [rel for rel, _ in job.find_inputs(location, "auto", str(proj)).files] == ["a.png"]
    found = job.find_inputs(str(proj / "data.parquet"), "auto", str(proj))
    assert found.parquet == [str(proj / "data.parquet")]

    # A link to a file in DST is an input that fails: its output could be written over
    # it (each rerun then found it changed and denoised its own output again).
    (src / "photo.png").symlink_to(shared / "out" / "old.png")
    found = job.find_inputs(str(src), "auto", dst)
    assert found.storage.linked_out == {"photo.png": str(shared / "out" / "old.png")}
    early, todo = job._plan(found, SimpleNamespace(format="same"), set(), {}, False)
    assert [(r["path"], r["status"]) for r in early] == [("photo.png", "failed")]
    assert "it is a link to a file in --output" in early[0]["error"]
    assert [rel for rel, _ in todo] == expected
    (src / "photo.png").unlink()
    # An output that is also a folder of outputs (a.gif -> a.png beside a.png/c.png)
    # failed at its rename, leaking the temp file's name, on every run.
    files = [("a.gif", 5), ("a.png/c.png", 6)]
    clash = job.Inputs("files", job.Storage(str(src)), files, [])
    early, todo = job._plan(clash, SimpleNamespace(format="png"), set(), {}, False)
    assert todo == [("a.png/c.png", 6)] and [r["path"] for r in early] == ["a.gif"]
    assert early[0]["error"] == "its output a.png is also the folder of other outputs (a.png/...)"

    files = [("x.jpg", 5), ("x.png", 6)]
    inputs = job.Inputs("files", job.Storage(str(src)), files, [])
    args = SimpleNamespace(format="png")
    before = {"x.png": {"status": "ok", "output": "x.png", "input_bytes": 6}}
    early, todo = job._plan(inputs, args, {"x.png"}, before, False)
    assert todo == [] and {r["path"]: r["status"] for r in early} == {
        "x.jpg": "failed",
        "x.png": "skipped",
    }
    assert "also the output of x.png" in early[0]["error"]
    # A first run: the input already of the output's name and format keeps it, though
    # x.jpg sorts first (a GIF beside a PNG of its name, as the job writes GIFs as PNGs).
    early, todo = job._plan(inputs, args, set(), {}, False)
    assert todo == [("x.png", 6)] and [r["path"] for r in early] == ["x.jpg"]
    assert "also the output of x.png" in early[0]["error"]
    # x.png deleted since: its output is not x.jpg's, so x.jpg is done, not skipped.
    gone = job.Inputs("files", job.Storage(str(src)), [("x.jpg", 5)], [])
    assert job._plan(gone, args, {"x.png"}, before, False) == ([], [("x.jpg", 5)])
    # The last run found x.png unreadable: the file at its output is an older result.
    failed = {"x.png": {"status": "failed", "error": "not a readable image", "input_bytes": 6}}
    alone = job.Inputs("files", job.Storage(str(src)), [("x.png", 6)], [])
    early, todo = job._plan(alone, args, {"x.png"}, failed, False)
    assert todo == [] and early[0]["status"] == "failed" and early[0]["output"] is None
    assert job._plan(alone, args, {"x.png"}, failed, True) == ([], [("x.png", 6)])
    # A glob lists a broken link too (a `failed` row, as a folder walk does), and a
    # file:// glob is a local one.
    (src / "gone.png").symlink_to(tmp_path / "missing.png")
    for location in (f"{src}/*.png", f"file://{src}/*.png"):
        assert job.find_inputs(location, "auto").files == [("gone.png", 0), ("mine.png", 1)]
    # ... whose row says it is a link to nowhere (it said only "No such file", of a file
    # that `ls` shows).
    said = f"{src / 'gone.png'} is a link to {tmp_path / 'missing.png'}, which does not exist"
    with pytest.raises(FileNotFoundError, match=re.escape(said)):
        job.Storage(str(src)).read("gone.png")


def test_which_input_wrote_each_output_outlives_its_row(tmp_path):
    """DST/.outputs.parquet (written with the manifest) records the input of each
    output: a file an earlier run wrote for another input (deleted since, so its row is
    gone; or in another --format) is done again, one it wrote for this input (left out
    of the last run, or written before a --format switch and back) is skipped."""
    dst = job.Storage(str(tmp_path / "out"))
    old = {"old.png": ("gone.png", 10, 4), "b.png": ("b.png", 7, 2)}
    writer = job.ManifestWriter(dst, {}, writers=old)
    writer.add_rows(
        [
            {"path": "a.png", "output": "a.png", "status": "ok", "output_bytes": 5},
            # Skipped under another --format earlier: its size is kept from the record.
            {"path": "b.png", "output": "b.png", "status": "skipped", "input_bytes": 2},
            {"path": "c.png", "status": "failed", "error": "not a readable image"},
        ]
    )
    writer.close()
    before = {"d.png": {"output": "d.png", "status": "ok", "output_bytes": 3, "input_bytes": 1}}
    assert job.previous_writers(dst, before) == {
        "old.png": ("gone.png", 10, 4, None),
        "a.png": ("a.png", 5, None, None),
        "b.png": ("b.png", 7, 2, None),
        "d.png": ("d.png", 3, 1, None),
    }
    (tmp_path / "out" / "a.png").write_bytes(job.encode_png(np.zeros((2, 2, 1), np.uint8)))
    assert job.existing_outputs(dst, {}) == ({"a.png"}, set())  # the record is not an output

    src = job.Storage(str(tmp_path / "src"))
    png = SimpleNamespace(format="png")

    def plan(files, before, writers, fmt=png):
        inputs = job.Inputs("files", src, files, [])
        early, todo = job._plan(inputs, fmt, {"x.png", "a.png"}, before, False, writers)
        return {r["path"]: r["status"] for r in early}, todo

    # x.png's input deleted, its row gone since; x.jpg, added later, writes x.png.
    assert plan([("x.jpg", 5)], {}, {"x.png": ("x.png", 9, 6)}) == ({}, [("x.jpg", 5)])
    # a.png was a.png's (its last row failed: a clash under --format jpeg), so it stays
    # a.png's to redo, and a.jpg is the one that clashes (not skipped with a.png's).
    last = {
        "a.jpg": {"status": "ok", "output": "a.jpg", "input_bytes": 5},
        "a.png": {"status": "failed", "output": None, "input_bytes": 6},
    }
    early, todo = plan([("a.jpg", 5), ("a.png", 6)], last, {"a.png": ("a.png", 9, 6)})
    assert early == {"a.jpg": "failed"} and todo == [("a.png", 6)]
    # Without the record (before it existed) a.jpg took a.png's old output as its own;
    # now a.png keeps it as the input already of its name and format.
    assert plan([("a.jpg", 5), ("a.png", 6)], last, {}) == ({"a.jpg": "failed"}, [("a.png", 6)])
    # x.png's own output, though its last row is elsewhere (another --format) or gone.
    webp = {"x.png": {"status": "ok", "output": "x.webp", "input_bytes": 6}}
    record = {"x.png": ("x.png", 9, 6)}
    assert plan([("x.png", 6)], webp, record) == ({"x.png": "skipped"}, [])
    # ... but not once x.png changed since that output was made: the last row has the
    # size x.png has now, the record the size it had then.
    webp_since = {"x.png": {**webp["x.png"], "input_bytes": 7}}
    assert plan([("x.png", 7)], webp_since, record) == ({}, [("x.png", 7)])
    # ... nor once replaced by a file of its size: the record's time is the output's
    # (the last row's is the webp's, of the file now).
    src.mtimes["x.png"] = 2_000
    webp_now = {"x.png": {**webp["x.png"], "input_mtime_ns": 2_000}}
    assert plan([("x.png", 6)], webp_now, {"x.png": ("x.png", 9, 6, 1_000)})[1] == [("x.png", 6)]
    assert plan([("x.png", 6)], webp_now, {"x.png": ("x.png", 9, 6, 2_000)})[1] == []
    assert plan([("x.png", 6)], webp_now, record)[1] == []  # (a record of before the time)
    del src.mtimes["x.png"]
    assert plan([("x.png", 6)], {}, record) == ({"x.png": "skipped"}, [])
    # ... unless it changed size while it had no row.
    assert plan([("x.png", 7)], {}, record) == ({}, [("x.png", 7)])
    # No record (a DST this job never wrote, an older version's): the outputs decide.
    assert plan([("x.jpg", 5)], {}, {}) == ({"x.jpg": "skipped"}, [])
    # But where this job wrote before, an output without a row or record is one a run
    # wrote and then stopped before keeping its row: done again, for the row.
    inputs = job.Inputs("files", src, [("x.jpg", 5), ("a.png", 6)], [])
    last = {"a.png": {"status": "ok", "output": "a.png", "input_bytes": 6}}
    early, todo = job._plan(inputs, png, {"x.png", "a.png"}, last, False, {}, unrecorded=False)
    assert [r["path"] for r in early] == ["a.png"] and todo == [("x.jpg", 5)]
    # An input of the size its row recorded, but another modification time than it
    # recorded: changed in place, done again (a time not recorded, or not listed, is not
    # known to differ).
    inputs = job.Inputs("files", src, [("a.png", 6)], [])
    src.mtimes["a.png"] = 2_000
    for recorded, redone in ((1_000, True), (2_000, False), (None, False)):
        row = {**last["a.png"], "input_mtime_ns": recorded}
        early, todo = job._plan(inputs, png, {"a.png"}, {"a.png": row}, False, {})
        assert (todo == [("a.png", 6)], len(early)) == (redone, 1 - redone)


def test_an_output_is_complete_if_it_has_the_size_written_or_else_its_format_s_end(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    whole = job.encode_png(np.zeros((6, 6, 1), np.uint8))
    for name in ("same.png", "cut.png", "unrecorded.png", "unrecorded_cut.png"):
        (out / name).write_bytes(whole)
    (out / "cut.png").write_bytes(whole[:-1])  # as an interrupted copy leaves it
    (out / "unrecorded_cut.png").write_bytes(whole[:-1])
    (out / "notes.txt").write_bytes(b"no format to check")
    # Without a row, each format is checked for its own end: JPEG's end marker, the
    # sizes BMP's and WEBP's headers give (Pillow's files, whole and cut).
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8))
    for suffix, fmt in ((".jpg", "JPEG"), (".jpeg", "JPEG"), (".bmp", "BMP"), (".webp", "WEBP")):
        buf = io.BytesIO()
        gray.save(buf, format=fmt)
        (out / f"whole{suffix}").write_bytes(buf.getvalue())
        (out / f"cut{suffix}").write_bytes(buf.getvalue()[:-2])
    written = {name: len(whole) for name in ("same.png", "cut.png")}  # as rows recorded
    done, cut = job.existing_outputs(job.Storage(str(out)), written)
    assert sorted(done) == [
        "notes.txt", "same.png", "unrecorded.png",
        "whole.bmp", "whole.jpeg", "whole.jpg", "whole.webp",
    ]  # fmt: skip
    assert sorted(cut) == [
        "cut.bmp", "cut.jpeg", "cut.jpg", "cut.png", "cut.webp", "unrecorded_cut.png",
    ]  # fmt: skip


def test_a_write_that_fails_leaves_no_output_and_no_temp_file(tmp_path, monkeypatch):
    """Outputs are written beside the target and renamed: a write cut short (a full
    disk, a kill) leaves no half image under the output's name, nor its temp file."""
    out = job.Storage(str(tmp_path))
    out.write_atomic("a/old.png", b"old bytes")
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 4:
            real_write(fd, bytes(data[:4]))
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", half_then_full)
    for rel in ("a/new.png", "a/old.png"):
        with pytest.raises(OSError, match="No space left"):
            out.write_atomic(rel, b"new image bytes")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["old.png"]
    assert (tmp_path / "a" / "old.png").read_bytes() == b"old bytes"
    out.write_atomic("a/new.png", b"new image bytes")
    assert (tmp_path / "a" / "new.png").read_bytes() == b"new image bytes"


def test_parquet_rows_are_skipped_only_for_outputs_of_the_size_written(model_path, tmp_path):
    """Parquet rows are skipped in the actors: they check the sizes earlier runs wrote."""
    out = tmp_path / "out"
    out.mkdir()
    for name, size in (("same.tif", 10), ("cut.tif", 9), ("unrecorded.tif", 4)):
        (out / name).write_bytes(b"x" * size)
    written = {"same.tif": 10, "cut.tif": 10}  # the sizes earlier rows recorded
    settings = job.JobSettings.in_process(
        str(model_path), str(tmp_path), str(out), extra={"written": written}
    )
    denoiser = job.Denoiser(settings)
    found = {n: denoiser._exists(n) for n in ("same.tif", "cut.tif", "unrecorded.tif", "no.tif")}
    assert found == {"same.tif": True, "cut.tif": False, "unrecorded.tif": True, "no.tif": False}
    # A row is skipped only for an output its own path wrote, from bytes of that size.
    # (input, its size, its Parquet file's modification time), as recorded
    writers = {"same.tif": ("same.tif", 3, 7), "unrecorded.tif": ("gone.tif", None, None)}
    settings = job.JobSettings.in_process(
        str(model_path), None, str(out), extra={"written": written, "writers": writers}
    )
    denoiser = job.Denoiser(settings)
    skipped = {
        (rel, len(data), t): denoiser._read((rel, data, len(data)), t)[0]["status"] == "skipped"
        for rel, data, t in (
            ("same.tif", b"abc", 7),
            ("same.tif", b"abcd", 7),
            ("same.tif", b"abc", 8),
            ("unrecorded.tif", b"a", 7),
        )
    }
    # Changed bytes, a file written since, or gone.tif's output: done again.
    assert skipped == {
        ("same.tif", 3, 7): True,
        ("same.tif", 4, 7): False,
        ("same.tif", 3, 8): False,
        ("unrecorded.tif", 1, 7): False,
    }
    writers["same.tif"] = ("same.tif", 3, None)  # a version that recorded no time
    denoiser = job.Denoiser(settings)
    assert denoiser._read(("same.tif", b"abc", 3), 8)[0]["status"] == "skipped"
    # An output without a record: the row's own where this job never wrote (the outputs
    # decide), else a stopped run's whose row was lost (done again, for its row).
    # A file cut short there that no row or record names as an output (`unowned`, see
    # _run_locked) is another dataset's: its row fails, the file stays.
    for unrecorded in (True, False):
        extra = {"written": written, "writers": {}, "unrecorded": unrecorded}
        settings = job.JobSettings.in_process(str(model_path), None, str(out), extra=extra)
        row = job.Denoiser(settings)._read(("unrecorded.tif", b"a", 1))[0]
        assert (row["status"] == "skipped") is unrecorded
    for unowned in (set(), {"cut.tif"}):
        settings.extra["unowned"] = unowned
        row = job.Denoiser(settings)._read(("cut.tif", b"a", 1))[0]
        kept = row["error"] is not None and row["error"].startswith(job.KEPT_CUT)
        assert kept is bool(unowned), (unowned, row)
    assert (out / "cut.tif").read_bytes() == b"x" * 9


def test_a_parquet_row_s_clean_reference_is_at_its_normalised_path(model_path, tmp_path):
    """A Parquet path written on Windows (sub\\a.png) or with a doubled slash is written at
    sub/a.png, and its --clean reference is read there too (it was looked up at the
    raw path: no metrics, "no clean reference sub\\a.png"). And a null path's reason
    names the flag (Hugging Face's image.path is null for images made in memory), and a
    path that is not UTF-8 fails."""
    digits = (np.random.default_rng(9).random((2, 28, 28)) * 255).astype(np.uint8)
    source, clean, out = tmp_path / "in.parquet", tmp_path / "clean", tmp_path / "out"
    (clean / "sub").mkdir(parents=True)
    for name, digit in zip("ab", digits, strict=True):
        (clean / "sub" / f"{name}.png").write_bytes(png(digit))
    paths = ["sub\\a.png", "sub//b.png"]
    images = [png(d) for d in digits]
    # (bytes, as a string column written without its UTF-8 tag; the last one Latin-1)
    raw = [p.encode() for p in paths] + [None, b"caf\xe9.png"]
    table = pa.table({"path": pa.array(raw), "image": pa.array([*images, *images])})
    pq.write_table(table, source)
    extra = {"path_column": "path", "image_column": "image"}
    settings = job.JobSettings.in_process(
        str(model_path), None, str(out), clean=str(clean), extra=extra
    )
    batch = {"path": np.array([str(source)]), "row_group": np.array([0])}
    rows = {r["path"]: r for r in job.Denoiser(settings)(batch).to_pylist()}
    for path, output in zip(paths, ["sub/a.png", "sub/b.png"], strict=True):
        assert rows[path]["status"] == "ok" and rows[path]["output"] == output, rows[path]
        assert rows[path]["error"] is None and rows[path]["psnr_noisy"] == np.inf, rows[path]
    # A null path fails, its row named by its place, its reason naming the flag.
    null = rows[f"{source}#row_group=0#row=2"]
    assert null["status"] == "failed" and null["error"].startswith(
        "its path (--path-column path) is null: each row needs a relative output path"
    )
    # A path that is not UTF-8 fails too (read with its bytes escaped, caf\xe9.png, it
    # was written at caf/xe9.png).
    latin = rows["caf\\xe9.png"]
    assert latin["status"] == "failed" and latin["error"] == (
        "its path (--path-column path) is not valid UTF-8"
    )
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "sub/a.png",
        "sub/b.png",
    ]


def test_a_file_kept_cut_short_is_not_overwritten_once_it_is_whole(model_path, tmp_path):
    """A file cut short at an output path that an earlier run kept (another dataset's: a
    copy under way, say) is not overwritten once the copy is done either: its input still
    fails, file or Parquet row, until the file is removed (it was denoised over it)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    image = job.encode_png(np.zeros((4, 4, 1), np.uint8))
    (src / "a.png").write_bytes(image)
    theirs = job.encode_png(np.full((3, 3, 1), 7, np.uint8))
    (dst / "a.png").write_bytes(theirs)  # whole now
    kept = {"path": "a.png", "status": "failed", "error": job._kept_cut_reason("a.png")}
    before = {"a.png": {**kept, "input_bytes": len(image)}}
    output = job.Storage(str(dst))
    inputs = job.find_inputs(str(src), "auto", str(dst))
    args = SimpleNamespace(format="same", output=str(dst))
    extra = {"written": {}, "writers": {}, "unrecorded": False, "kept_for": {"a.png"}}
    settings = job.JobSettings.in_process(str(model_path), None, str(dst), extra=extra)
    for there in (True, False):
        done, cut = job.existing_outputs(output, {})
        assert done == ({"a.png"} if there else set()) and not cut
        early, todo = job._plan(
            inputs, args, done, before, True, {}, False, None, cut, set(), {"a.png"}
        )
        row = job.Denoiser(settings)._read(("a.png", image, len(image)))[0]
        if there:
            assert not todo and early[0]["status"] == "failed", (early, todo)
            assert early[0]["error"].startswith(f"{job.KEPT_CUT} a.png was already in --output")
            assert row["error"] == early[0]["error"]
            assert (dst / "a.png").read_bytes() == theirs
            (dst / "a.png").unlink()
        else:  # removed: done
            assert not early and todo == [("a.png", len(image))]
            assert row["error"] is None


def test_a_file_cut_short_that_dst_has_no_record_of_is_kept_though_dst_has_one(
    model_path, tmp_path, shared_ray
):
    """A DST with this job's record (here a run on some rows; as well a run killed before
    it kept the row that failed for such a file, which a Parquet input's actors settle)
    holds a file cut short at the output path of a row that no row or record names as an
    output: not this job's either (it renames each output into place whole), so it is not
    overwritten; an output the record names, cut short since, is done again."""
    rng = np.random.default_rng(8)
    images = {f"{k}.png": png(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for k in "abc"}
    table = pa.table({"path": list(images), "image": list(images.values())})
    dst = tmp_path / "dst"
    pq.write_table(table.slice(0, 1), tmp_path / "some.parquet")  # a.png only
    pq.write_table(table, tmp_path / "all.parquet")
    args = ["--model", model_path, "--output", dst]
    first = run_job(*args, "--input", tmp_path / "some.parquet", ray=shared_ray)
    assert first.returncode == 0, first.stderr[-3000:]
    theirs = b"\x89PNG\r\n\x1a\n half of another dataset's b.png"
    (dst / "b.png").write_bytes(theirs)
    whole = (dst / "a.png").read_bytes()
    (dst / "a.png").write_bytes(whole[: len(whole) // 2])  # this job's, damaged since
    result = run_job(*args, "--input", tmp_path / "all.parquet", ray=shared_ray)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = manifest(dst)
    assert rows["b.png"]["status"] == "failed", rows["b.png"]
    assert rows["b.png"]["error"].startswith(f"{job.KEPT_CUT} b.png was already in --output")
    assert (dst / "b.png").read_bytes() == theirs
    assert rows["a.png"]["status"] == "ok" and (dst / "a.png").stat().st_size > len(whole) // 2
    assert rows["c.png"]["status"] == "ok"
    assert (
        "note: 1 output in" in result.stderr
        and "cut short or changed since (e.g. a.png)" in result.stderr
    )
    assert "cut short or not images (e.g. b.png)" in result.stderr
    # The same for files.
    src = tmp_path / "src"
    src.mkdir()
    for rel, data in images.items():
        (src / rel).write_bytes(data)
    (dst / "c.png").write_bytes(theirs)  # c.png's row names it: done again
    (dst / "d.png").write_bytes(theirs)
    (src / "d.png").write_bytes(images["a.png"])
    again = run_job(*args, "--input", src, ray=shared_ray)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = manifest(dst)
    assert rows["d.png"]["error"].startswith(f"{job.KEPT_CUT} d.png was already in --output")
    assert (dst / "d.png").read_bytes() == theirs and rows["c.png"]["status"] == "ok"
    assert rows["b.png"]["status"] == "failed" and (dst / "b.png").read_bytes() == theirs


def test_skipped_rows_keep_the_notes_of_their_outputs(tmp_path):
    """A rerun's skipped row says what the run that wrote its output said of it, marked
    as the earlier run's, but not why it had no metrics once those are dropped
    (measured against other references: previous_rows), nor anything of an output it
    did not write."""
    last = {"output": "a.jpg", "status": "ok", "error": "alpha dropped: JPEG cannot store it"}
    carried = job._skipped_row("a.png", "a.jpg", 3, last)["error"]
    assert carried == f"(earlier run) {last['error']}"
    assert job._skipped_row("a.png", "a.jpg", 3, {**last, "error": carried})["error"] == carried
    assert job._skipped_row("a.png", "a.png", 3, last)["error"] is None  # (--format since)
    note = "CMYK pixels converted to RGB; no SSIM: too small"
    assert job._without_metric_note(note) == "CMYK pixels converted to RGB"
    assert job._without_metric_note(f"(earlier run) {note}") == "(earlier run) CMYK pixels " + (
        "converted to RGB"
    )
    assert job._without_metric_note("no metrics: no such file") is None
    assert job._without_metric_note("(earlier run) no metrics: no such file") is None
    assert job._without_metric_note("CMYK pixels converted to RGB") == note.split("; ")[0]
    row = {"path": "a.png", "output": "a.png", "status": "ok", "psnr": 20.0, "error": note}
    meta = {"clean": str(tmp_path / "refs"), "run": "1"}
    table = pa.Table.from_pylist([row], schema=job.MANIFEST_SCHEMA.with_metadata(meta))
    pq.write_table(table, tmp_path / "manifest.parquet")
    rows, _, _ = job.previous_rows(job.Storage(str(tmp_path)), str(tmp_path / "refs"))
    assert rows["a.png"]["error"] == note and rows["a.png"]["psnr"] == 20.0
    rows, _, _ = job.previous_rows(job.Storage(str(tmp_path)), str(tmp_path / "other"))
    assert (
        rows["a.png"]["error"] == "CMYK pixels converted to RGB" and rows["a.png"]["psnr"] is None
    )
    # The summary's example of why outputs have no PSNR/SSIM is a reason, not a note,
    # and an earlier run's is said to be.
    writer = job.ManifestWriter(job.Storage(str(tmp_path / "out")), {"run": "1"})
    notes = ["(earlier run) alpha dropped: x", "(earlier run) CMYK; no metrics: no such file"]
    writer.add_rows(
        [{"path": p, "status": "skipped", "error": e} for p, e in zip("ab", notes, strict=True)]
    )
    assert writer.unmeasured == 2
    assert writer.unmeasured_example == "(earlier run) no metrics: no such file"
    writer.abort()


def test_local_paths_on_a_cluster_of_several_machines_are_warned_about(capsys):
    local = SimpleNamespace(input="/data/noisy", output="file:///data/out", clean=None)
    remote = SimpleNamespace(input="s3://b/noisy", output="gs://b/out", clean="s3://b/clean")
    job.warn_local_paths(local, {"10.0.0.1"})  # one machine (a fake multi-node cluster too)
    job.warn_local_paths(remote, {"10.0.0.1", "10.0.0.2"})
    assert capsys.readouterr().err == ""
    job.warn_local_paths(local, {"10.0.0.1", "10.0.0.2"})
    err = capsys.readouterr().err
    assert "--input /data/noisy, --output file:///data/out: local path(s)" in err
    assert "cluster of 2 machines" in err


def test_default_actors_per_gpu_follow_the_cpus_per_gpu_of_the_gpu_nodes():
    def node(cpus, gpus, alive=True):
        resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        return {"Alive": alive, "Resources": resources}

    assert job._actors_per_gpu([node(16, 1)]) == 4  # the H200 node it was measured on
    assert job._actors_per_gpu([node(4, 1)]) == 1  # cluster.yaml's g5.xlarge workers
    assert job._actors_per_gpu([node(8, 1), node(2, 0)]) == 2  # CPU-only nodes don't count
    assert job._actors_per_gpu([node(64, 8)]) == 2  # per GPU, not per node
    # the GPU node with the fewest CPUs per GPU decides; a dead node does not count
    assert job._actors_per_gpu([node(32, 1), node(4, 1, alive=False), node(8, 1)]) == 2
    # how many actors of {CPU, GPU} a node holds: the default pool is their sum
    assert job._actors_on({"CPU": 16, "GPU": 1}, 1, 0.25) == 4
    assert job._actors_on({"CPU": 16, "GPU": 1}, 8, 0.25) == 2  # --cpus-per-worker 8
    assert job._actors_on({"CPU": 16}, 1, 0.25) == 0  # a CPU-only node holds no GPU actor
    assert job._actors_on({"CPU": 2}, 1, 0) == 2
    assert job._actors_on({"CPU": 3, "GPU": 1}, 1, 0.1) == 3


def test_workers_given_no_gpu_do_not_see_the_nodes_gpus(ray_tmp, model_path, tmp_path):
    """Ray sets CUDA_VISIBLE_DEVICES only for the workers it gives GPUs: on an H200 node,
    16 denoise actors asked with --gpus-per-worker 0 all ran their model on the GPU. On a
    local Ray declaring one (fake) GPU, whose processes see GPU 0 as a GPU node's do: a
    worker given it keeps it, a denoise actor (the job's own Denoiser, its model loaded)
    or a sweep trial given none sees no GPU (and JAX no CUDA) once the job has set it up;
    outside a Ray worker (a driver that builds a Denoiser in-process, as
    bench_denoise.py --stages does) nothing changes. (A sweep trial's own call is checked
    by test_a_sweep_on_a_node_with_a_gpu_gives_each_trial_a_share_of_it.)"""
    code = """
import json, os, sys
import ray
import denoise, sweep  # (from PYTHONPATH, as Ray's workers import them too)
settings = denoise.JobSettings.in_process(sys.argv[1], sys.argv[2], "unused")
denoise.Denoiser(settings)
outside = os.environ.get("CUDA_VISIBLE_DEVICES")
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False)
denoise.Denoiser(settings)  # a driver (an in-process Denoiser) keeps them
driver = os.environ.get("CUDA_VISIBLE_DEVICES")

def seen(which):
    if which == "denoise":
        denoise.Denoiser(settings)
    else:
        sweep._configure_backend(1)
    return [os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("JAX_PLATFORMS")]

runs = {}
for which in ("denoise", "sweep"):
    runs[which + " given the GPU"] = ray.get(ray.remote(num_gpus=1)(seen).remote(which))
    runs[which + " given none"] = ray.get(ray.remote(num_gpus=0)(seen).remote(which))
print("seen " + json.dumps({"outside": outside, "driver": driver, **runs}))
"""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0", "KERAS_BACKEND": "jax"}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_ADDRESS="local")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "jobs")])
    env.pop("JAX_PLATFORMS", None)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(model_path), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("seen "))
    seen = json.loads(line.removeprefix("seen "))
    assert seen == {
        "outside": "0",
        "driver": "0",
        "denoise given the GPU": ["0", None],
        "denoise given none": ["", "cpu"],
        "sweep given the GPU": ["0", None],
        "sweep given none": ["", "cpu"],
    }


def test_a_file_at_the_manifests_name_that_is_not_its_manifest_is_refused(
    model_path, dataset, tmp_path
):
    """The job writes DST/manifest.parquet at its end: another tool's table there, bytes
    that are not Parquet, or a folder of that name are refused before any work (the
    first two were replaced without a word; the folder failed the run at its end, and
    every rerun's)."""
    cases = {
        "table": lambda p: pq.write_table(pa.table({"file": ["a.png"], "label": [3]}), p),
        "bytes": lambda p: p.write_bytes(b"not Parquet"),
        "folder": lambda p: p.mkdir(),
    }
    whys = {
        "table": "a table without the path and status columns",
        "bytes": "not a Parquet file",
        "folder": "not a regular file but a folder",
    }
    for name, make in cases.items():
        dst = tmp_path / name
        dst.mkdir()
        make(dst / "manifest.parquet")
        before = sorted(p.relative_to(dst) for p in dst.rglob("*"))
        result = run_job("--model", model_path, "--input", dataset["src"], "--output", dst)
        assert result.returncode == 2, (name, result.stderr[-2000:])
        said = f"--output {dst} holds a manifest.parquet that is not this job's manifest ("
        assert said + whys[name] in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert sorted(p.relative_to(dst) for p in dst.rglob("*")) == before, name


def test_a_manifest_that_cannot_be_read_is_not_called_another_tools(tmp_path, monkeypatch):
    """A manifest.parquet that cannot be read (no permission; in a bucket, a network
    error) may well be this job's: refused as unreadable, not as not this job's with
    advice to move or remove it (the run's history). None there: nothing to resume."""
    output = job.Storage(str(tmp_path))
    assert job._read_manifest(output) is None
    pq.write_table(pa.table({"path": ["a.png"], "status": ["ok"]}), tmp_path / job.MANIFEST)
    assert job._read_manifest(output)[0].names == ["path", "status"]
    read = job.Storage.read

    def denied(self, rel):
        if rel == job.MANIFEST:
            raise PermissionError(13, "Permission denied", self.full(rel))
        return read(self, rel)

    monkeypatch.setattr(job.Storage, "read", denied)
    with pytest.raises(ValueError) as caught:
        job.previous_rows(output)
    said = str(caught.value)
    assert said.startswith(f"--output {tmp_path}: cannot read its manifest.parquet (")
    assert "Permission denied" in said and "not this job's" not in said, said
    assert "remove" not in said and "move it away" not in said, said
