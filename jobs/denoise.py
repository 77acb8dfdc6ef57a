"""Bulk denoising of image datasets with Ray Data: streaming, loss-free, resumable.

    python jobs/denoise.py --model runs/denoise.keras --input /data/noisy --output /data/denoised \
        --clean /data/clean

Every input image (a folder tree, a glob such as "/data/**/*.png", or Parquet
files with a column of encoded image bytes and a column of relative paths) is
denoised by a trained fully convolutional model (aelib's `denoise`) and written
to the same relative path under --output, and DST/manifest.parquet gets one row
per input: path, output, status (ok / failed / skipped), error, width, height,
channels, PSNR/SSIM of the noisy input and of the output against --clean
references (same relative paths), the Ray node and device of its batch, and the
model that wrote the output.
While it runs, the rows go block by block to a journal in DST (an Arrow IPC
stream, readable up to the last whole block after a crash); at the end the
journal becomes the manifest. A rerun carries earlier rows (sizes, metrics)
into its `skipped` rows from the last manifest and any journal a crash left;
DST/.outputs.parquet, written with the manifest, records which input wrote each
output (and both sizes), so an output is skipped only for its own input. One run
at a time writes to a local DST (a lock on DST/.denoise.lock): a second stops at once.

How it runs: the driver lists the inputs (one recursive listing, no Ray task
per file), drops those whose output already exists and is complete (a rerun
resumes: local outputs are written to a temp file and renamed, and an output
whose size is not the one the manifest recorded, or without a row and whose
file format's end is missing, or whose input has another size or modification
time than its row recorded, or without a row where this job wrote before (a crash
lost it), is done again), and hands the rest to Ray Data
in blocks of --batch-size paths. One `map_batches` stage with a pool of
`Denoiser` actors (model loaded once in `__init__`, from bytes shipped by the
driver, so workers need no shared disk) reads each block's files, groups
same-size images into one model call (padded to the multiple of the model's
downsampling, read from its layer graph, and cropped back), encodes, writes
atomically and returns the manifest rows, which the driver streams into the
manifest. Reading one file per Ray row instead (`read_images` -> `map_batches`
-> `write_images`) pays Ray's per-row and per-file costs on every tiny image;
see jobs/bench_denoise.py for the side-by-side numbers.

Storage: local paths are read and written with plain file calls; URIs such as
s3://bucket/prefix or gs://... go through pyarrow.fs (an object store's PUT
is atomic, so no temp file is used there). S3 is tested against a local S3 server
(moto), GCS against an emulator.

Ray: `ray.init()` takes its address from RAY_ADDRESS (or starts a local Ray).
With GPUs in the cluster the actors ask for --gpus-per-worker GPUs each
(default 1/4 on nodes of 16 CPUs or more per GPU, 1/2 from 8, else 1: see
ACTORS_PER_GPU; 0 without GPUs, and an actor given none does not see the GPUs).
Each actor takes --cpus-per-worker CPUs (default 1), TensorFlow's ops use
those, and --io-threads threads (default CPUs + 1) read, decode, encode and
write its files (file calls, zlib and Pillow release the GIL). Files are created
one at a time per actor: several threads creating files in one folder made the
kernel spin on the folder's lock (about 3x the system time, measured).
Exit status: 0 when the job ran to the end (failed files are in the
manifest), 3 when it did but every input failed, or more than --max-failed
did, 2 for bad arguments (a bad model, DST inside SRC, ...), 1 when
DST cannot be written mid-run (disk full), 130 after Ctrl-C and 143 after
SIGTERM (what was done is kept for the rerun).
"""

from __future__ import annotations

import _thread
import argparse
import atexit
import contextlib
import fnmatch
import functools
import gc
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import re
import signal
import socket
import stat
import struct
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import uuid
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from fractions import Fraction
from functools import partial
from typing import Any, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.parquet"
TMP_MARK = ".denoise-tmp"  # temp outputs are ".NAME.<id>.denoise-tmp"
# A running job's rows, block by block (an Arrow IPC stream: readable up to the last
# whole block after a crash); turned into MANIFEST when the job ends. In an object
# store (no append) each journal is a part in DST/JOURNAL_PARTS: the rows received
# since the last part, PUT every JOURNAL_SECONDS while there are any. (A folder of
# their own: pyarrow's S3 client PUTs an empty marker object for the folder of each
# object it deletes, and deletes a folder's contents in batches of up to 1,000.)
JOURNAL = re.compile(r"\.manifest\.[0-9a-f]{12}\.journal")
JOURNAL_PARTS = ".denoise-journal"
JOURNAL_SECONDS = 10.0
# Which input wrote each output in DST, kept across runs (written with the manifest):
# the manifest has rows only for a run's own inputs, and an output whose input was
# deleted, left out of a run or written under another --format outlives its row.
WRITERS = ".outputs.parquet"
# Held (flock) by the run writing to a local DST, so that a second one stops at once.
LOCK = ".denoise.lock"
WRITERS_SCHEMA = pa.schema(
    [
        ("output", pa.string()),
        ("input", pa.string()),
        ("output_bytes", pa.int64()),
        ("input_bytes", pa.int64()),  # the input's size then: a changed input is redone
        # and its modification time then (a file replaced by one of its size): null in
        # a record of before the column, and where the listing gave none
        ("input_mtime_ns", pa.int64()),
    ]
)
GLOB_CHARS = "*?["
PARQUET_SUFFIXES = (".parquet", ".pq")
FORMATS = {  # --format value -> (PIL format, suffix)
    "png": ("PNG", ".png"),
    "jpeg": ("JPEG", ".jpg"),
    "jpg": ("JPEG", ".jpg"),
    "bmp": ("BMP", ".bmp"),
    "tiff": ("TIFF", ".tif"),
    "webp": ("WEBP", ".webp"),
}
SUFFIXES = {  # Pillow format -> suffixes that already say it
    "PNG": (".png",),
    "JPEG": (".jpg", ".jpeg"),
    "BMP": (".bmp",),
    "TIFF": (".tif", ".tiff"),
    "WEBP": (".webp",),
}
SUFFIX_FORMAT = {suffix: fmt for fmt, suffixes in SUFFIXES.items() for suffix in suffixes}
LOSSY = ("JPEG", "WEBP")  # formats written at --quality; metrics then read the file back
DEFAULT_QUALITY = 95  # (Pillow's own, 75, adds visible compression noise: see --quality)
# Failures that the input's bytes decide (a rerun keeps them unless its settings
# changed); others (a write, a read, the model) may have had a passing cause: retried.
BAD_INPUT = ("not a readable image", "32-bit float pixels", "32-bit integer pixels", "image is ")
HOLDS_16_BITS = ("PNG", "TIFF")  # the formats written with 16-bit gray values
COLOR_SPACE = {"L": "L", "LA": "L", "RGB": "RGB", "RGBA": "RGB"}  # Pillow mode -> decoded mode
MANIFEST_SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # the input, relative to SRC (or the Parquet path column)
        ("output", pa.string()),  # relative to DST; null when nothing was written
        ("status", pa.string()),  # ok | failed | skipped
        ("error", pa.string()),  # why it failed, or a note on the metrics
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("channels", pa.int32()),
        ("input_bytes", pa.int64()),  # size of the input file (to tell a changed file on rerun)
        ("input_mtime_ns", pa.int64()),  # and its modification time then, as listed
        ("output_bytes", pa.int64()),  # size of the output written (to tell one cut short)
        ("psnr_noisy", pa.float64()),  # input vs --clean reference, dB
        ("psnr", pa.float64()),  # output vs --clean reference, dB
        ("ssim_noisy", pa.float64()),
        ("ssim", pa.float64()),
        ("node", pa.string()),  # Ray node id of the actor that did the batch
        ("device", pa.string()),  # CPU or GPU
        # The model that wrote the output (SHA-256 of its .keras file; the manifest's
        # metadata names this run's): a `skipped` row keeps the earlier run's, which
        # may be another model's. Null where unknown (a DST of an older version).
        ("model_sha256", pa.string()),
        # The --clean reference's size and modification time when it was read for the
        # metrics (a local --clean; -1 bytes: there was none), and the CRC-32 of its
        # bytes: a rerun does again an input whose reference has other bytes since,
        # whose metrics were of a file now gone (a copy that did not keep its time,
        # same bytes, is not).
        ("clean_bytes", pa.int64()),
        ("clean_mtime_ns", pa.int64()),
        ("clean_crc32", pa.int64()),
    ]
)
_COLUMNS = MANIFEST_SCHEMA.names
NO_METRICS = "no metrics: "  # (then why, at the end of an output's error column)
EARLIER = "(earlier run) "  # (an error or note carried over from an earlier run's row)
_ROW_SCHEMA = MANIFEST_SCHEMA.remove_metadata()
_METRICS = ("psnr_noisy", "psnr", "ssim_noisy", "ssim")
TOO_SMALL = "under 3 px on a side"  # SSIM's smallest window
_STAMPS = ("clean_bytes", "clean_mtime_ns")
_REFERENCE_COLUMNS = (*_STAMPS, "clean_crc32")
_INPUT_COLUMNS = (
    "width",
    "height",
    "channels",
    "input_bytes",
    "input_mtime_ns",
    "psnr_noisy",
    "ssim_noisy",
    *_REFERENCE_COLUMNS,
)
# On a CPU the model runs on slices of a group of one of these many pixels, whatever
# --batch-size is; which one is faster depends on the CPU. The tutorial's denoiser on one
# core, per 28x28 image (bench_denoise.py --stages prints both):
# - late November, on an AMD EPYC VM: 81-90 us in calls of 32-64 images, 106-114 us in
#   calls of 1,024 (a small call's activations stay in the CPU's caches);
# - 2026-12-02, the same VM slower: within noise of each other;
# - 2026-12-03, on an Intel Xeon VM with AVX-512: 261-467 us in calls of 32-64 images,
#   232-354 us in calls of 1,024 (the model alone, ten runs); inside the actor, where it
#   matters, 372-680 ns per pixel in calls of 32,768 pixels against 299-578 for a block
#   (the block faster in each of eight timed pairs, by 1-29%).
# So each CPU actor times both on its first groups and keeps the faster (CallSizer), the
# smaller unless the larger is 5% faster: calls of a whole block of digits took about
# 200 MiB more per actor (bench_denoise.py's peak PSS, runs 8 and 9).
CPU_CALL_PIXELS = (1 << 15, 1 << 20)
# On a GPU a call takes --batch-size images, and at most this many pixels.
GPU_CALL_PIXELS = 1 << 24
# A block whose actor dies this many times (its process killed, e.g. for memory, or
# crashed) is given up: its inputs are recorded as failed, the other blocks go on. Ray
# Data's default retries such a block for ever, so an image that kills its actor every
# time stalled the whole job (measured: 8 restarts in a minute, no progress).
BLOCK_TRIES = 4
UNRECORDED_NOTE = (  # (a skipped row's: see _warn_unrecorded)
    "not written by this job: its output was in --output before, with no record of this job"
)
KEPT_CUT = "not overwritten: its output"  # (a file cut short, not this job's: see _run_locked)
LOST = "not denoised: its block"  # (then how; not BAD_INPUT: a rerun does it again)
ITEM = "item"  # the column, in an actor's rows, of each row's place in the job's items
# A block is decoded, run and written in groups of at most about this many pixels
# (channels x height x width): a block of big photos is done a few at a time, as each
# pixel costs ~30 bytes on its way (decoded array, float32 stack, output, rounding).
GROUP_PIXELS = 1 << 23
# ... and read at most this many bytes of files ahead of decoding them.
READ_BYTES = 1 << 25
# Planes bigger than TILE x TILE go through the model in tiles, each with a halo of
# real pixels around it (cropped off after): memory per call stays bounded and, the
# halo being wider than the model's receptive field (`model_geometry`), the result
# is the whole plane's.
TILE = 1024
# Imported by `import tensorflow` / `import keras` only for features this job never
# uses (TF-lite's JAX converter, Keras's scikit-learn wrappers, Keras's image-gallery
# plot); all three imports are optional there. Keeping them out saves each actor
# ~1.2 s of its start (see Denoiser).
UNUSED_IMPORTS = ("jax", "sklearn", "matplotlib")


# ----------------------------------------------------------------------------
# Storage: local paths with plain file calls, anything else through pyarrow.fs.


def filesystem(uri: str):
    """pyarrow's filesystem and path for a URI (s3://, gs://, hdfs://, ...).

    S3 gets `allow_delayed_open=true` unless the URI sets it: an output stream then
    sends an object smaller than pyarrow's part size (10 MiB) in one PutObject when it
    is closed, instead of a multipart upload (create, part, complete): one request per
    output instead of three (counted in tests/test_denoise_job.py). An object still
    appears only whole. Delayed open moves errors such as a missing bucket from the open
    to the close; each output is opened, written and closed in one call, so such an
    error is still that image's.

    GCS gets `retry_limit_seconds=GCS_RETRY_SECONDS` unless the URI sets it: with its
    client's default a machine without Google credentials retried its first request
    for 16 minutes before any error (961 s measured; 41.5 s with a limit of 30)."""
    import pyarrow.fs as pafs

    defaults = {
        "s3://": "allow_delayed_open=true",
        "gs://": f"retry_limit_seconds={GCS_RETRY_SECONDS}",
        "gcs://": f"retry_limit_seconds={GCS_RETRY_SECONDS}",
    }
    option = next((v for k, v in defaults.items() if uri.lower().startswith(k)), None)
    if option and option.split("=")[0] + "=" not in uri:
        path, query = split_query(uri)
        uri = f"{path}?{'&'.join(filter(None, [query[1:], option]))}"
    return pafs.FileSystem.from_uri(uri)


def split_query(location: str) -> tuple[str, str]:
    """A URI's path and its query ("?region=..."; "" if none), so that a query given
    for pyarrow stays whole while the path is cut into folders and globs. A local path
    keeps its "?", a glob wildcard there."""
    if _is_local(location):
        return location, ""
    path, sep, query = location.partition("?")
    return path, sep + query


OBJECT_STORES = ("s3", "gcs")  # pyarrow filesystems' type_name
# How long the GCS client retries a request (pyarrow's `retry_limit_seconds`; a gs://
# URI may set its own): a transient error longer than that fails the image (retried by
# the rerun), and a machine without credentials gets its error in under a minute.
GCS_RETRY_SECONDS = 30


class NotAFile(ValueError):
    """Storage.read of a path that is not a regular file (a folder, a FIFO, a device): its
    message is an input image's failure reason; `kind` says what the path is, for the
    callers that read other files (the model, the manifest) to name it in their own."""

    def __init__(self, kind: str):
        super().__init__(f"not a regular file but {kind}: not an image")
        self.kind = kind


class Storage:
    """A root folder, local or remote, addressed by POSIX relative paths."""

    def __init__(self, location: str):
        self.location = location
        if not _is_local(location):
            self.fs, root = filesystem(location)
            self.root = root.rstrip("/")
            self.local = False
        else:
            location = location.removeprefix("file://")
            self.fs = None
            self.root = os.path.abspath(os.path.expanduser(location))
            self.local = True
        self._made: set[str] = set()
        # Modification times (ns) of the files listed (walk, or find_inputs for a glob or
        # one file): an input whose time is not the one its row recorded has changed
        # since (see _plan).
        self.mtimes: dict[str, int] = {}
        self.mtime_ns: int | None = None  # the root's, once `entry` has looked
        # Files walk listed that are links to files in its `prune` folder (the output
        # folder): relative path -> the real path (see _plan).
        self.linked_out: dict[str, str] = {}
        # Links walk did not follow: to a folder of their own path (a loop).
        self.loops: list[str] = []
        # Folders under the root that walk could not list (no permission to read, say):
        # relative path -> why. Their files are not listed; the root's error is raised.
        self.unlisted: dict[str, str] = {}
        # What walk listed that is not a regular file or a folder (a broken link, a FIFO,
        # a device, a link to itself): each fails, named by the driver (see _plan).
        self.others: set[str] = set()

    def full(self, rel: str) -> str:
        return os.path.join(self.root, rel) if self.local else f"{self.root}/{rel}"

    def stamp(self, rel: str) -> tuple[int | None, int | None]:
        """A local file's size and modification time ((-1, None): none there; None and
        None where not known: not local, or it cannot be looked at)."""
        if not self.local:
            return None, None
        try:
            st = os.stat(self.full(rel))
        except FileNotFoundError:
            return -1, None
        except OSError:
            return None, None
        return st.st_size, st.st_mtime_ns

    def uri(self, rel: str) -> str:
        """A file under the root as a location of its own: a path, or the root's URI as
        given (its user info, such as gs://anonymous@bucket or s3://KEY:SECRET@bucket,
        and its query kept) with `rel` added to its path, percent-encoded (a space, a
        "%" or a "?" in a name would not parse)."""
        if self.local:
            return self.full(rel)
        path, query = split_query(self.location)
        return f"{path.rstrip('/')}/{urllib.parse.quote(rel, safe='/')}{query}"

    def read(self, rel: str) -> bytes:
        if self.local:  # (os calls: 2.8 us a small file here, against open()'s 4.6)
            path = self.full(rel)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError as e:  # (a listed name: a link whose target is gone)
                if not os.path.islink(path):
                    raise
                raise FileNotFoundError(
                    f"{path} is a link to {os.readlink(path)}, which does not exist"
                ) from e
            try:  # (O_NONBLOCK: a FIFO's open would wait for a writer)
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):  # /dev/zero filled the memory
                    raise NotAFile(_file_kind(info.st_mode))
                parts = [os.read(fd, info.st_size + 1)]  # the whole file, as a rule
                if len(parts[0]) != info.st_size:  # (it grew, or a short read): to its end
                    while parts[-1]:
                        parts.append(os.read(fd, 1 << 20))
                return b"".join(parts)
            finally:
                os.close(fd)
        with self.fs.open_input_stream(self.full(rel)) as f:
            return f.read()

    def write_atomic(self, rel: str, payload: bytes) -> None:
        """Writes beside the target and renames, so a crash never leaves half a file."""
        target = self.full(rel)
        if not self.local:  # an object appears only when its upload completes
            parent = posixpath.dirname(target)
            # An object store has no folders to make (pyarrow would PUT an empty
            # "folder/" marker object, from each I/O thread that gets there first).
            if self.fs.type_name not in OBJECT_STORES and parent not in self._made:
                self.fs.create_dir(parent, recursive=True)
                self._made.add(parent)
            with self.fs.open_output_stream(target) as f:
                f.write(payload)
            return
        parent, name = os.path.split(target)
        if parent not in self._made:
            os.makedirs(parent, exist_ok=True)
            self._made.add(parent)
        # The name, cut to fit a file-name limit of 255 bytes with the 26 bytes added.
        short = name.encode()[:229].decode("utf-8", "ignore")
        tmp = os.path.join(parent, f".{short}.{uuid.uuid4().hex[:12]}{TMP_MARK}")
        try:  # os.open/os.write: no buffered-file object per tiny file
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def is_dir(self) -> bool:
        if self.local:
            return os.path.isdir(self.root)
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.root).type == pafs.FileType.Directory

    def entry(self) -> tuple[str, int]:
        """What the root is, with one stat or request: "dir", "file", "missing" or
        "other" (a broken link, a FIFO, ...), and its size in bytes (and its
        modification time in `mtime_ns`)."""
        if not self.local:
            import pyarrow.fs as pafs

            info = self.fs.get_file_info(self.root)
            kinds = {pafs.FileType.Directory: "dir", pafs.FileType.File: "file"}
            kinds[pafs.FileType.NotFound] = "missing"
            self.mtime_ns = info.mtime_ns
            return kinds.get(info.type, "other"), info.size or 0
        try:
            found = os.stat(self.root)
        except (FileNotFoundError, NotADirectoryError):
            return ("other" if os.path.lexists(self.root) else "missing"), 0
        self.mtime_ns = found.st_mtime_ns
        if stat.S_ISDIR(found.st_mode):
            return "dir", found.st_size
        return ("file" if stat.S_ISREG(found.st_mode) else "other"), found.st_size

    def walk(self, prune: str | None = None, depth: int | None = None) -> list[tuple[str, int]]:
        """Every file under the root as (relative path, size), sorted. Locally, links to
        folders are followed, as a glob does (not into a folder of their own path: a
        link loop ends; nor into `prune`, a real path (the job's output folder), or below
        it, unless that is inside the root itself); a link to a file there is listed, and
        put in `linked_out`; a broken link, a FIFO or a device is listed with size 0
        (reading it fails, so it gets a `failed` row rather than no row), as is an entry
        that cannot be looked at (a link to itself, or into a folder it may not enter);
        a folder below the root that cannot be listed is put in `unlisted` (the root's
        error is raised). `depth`: the levels of folders below the root to go into
        (None: all)."""
        if not self.local:
            import pyarrow.fs as pafs

            infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True))
            cut = len(self.root) + 1
            files = [i for i in infos if i.type == pafs.FileType.File]
            self.mtimes.update((i.path[cut:], i.mtime_ns) for i in files if i.mtime_ns)
            return sorted((i.path[cut:], i.size) for i in files)
        found = []
        tree = os.path.realpath(self.root)
        stack = [("", frozenset([tree]), 0)]  # a folder, its path's folders, its depth
        while stack:
            rel_dir, above, level = stack.pop()
            # One folder it may not read (a lost+found in a shared tree) stopped the job.
            try:
                listing = os.scandir(os.path.join(self.root, rel_dir))
            except OSError as e:
                if not rel_dir:
                    raise
                self.unlisted[rel_dir] = _reason(e)
                continue
            with listing as it:
                for entry in it:
                    rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                    try:  # (is_dir and is_file follow links: a link to itself raised)
                        kind = "dir" if entry.is_dir() else "file" if entry.is_file() else ""
                        info = entry.stat() if kind == "file" else None
                    except OSError:
                        kind = ""  # listed as a broken link is: its read says why
                    if kind == "dir":
                        real = os.path.realpath(entry.path)
                        deeper = depth is None or level < depth
                        if real in above:  # (a loop: said in the listing's notes)
                            self.loops.append(rel)
                        elif deeper and not _linked_into(real, prune, tree):
                            stack.append((rel, above | {real}, level + 1))
                    elif kind == "file":
                        found.append((rel, info.st_size))
                        self.mtimes[rel] = info.st_mtime_ns
                        if prune is not None and entry.is_symlink():
                            real = os.path.realpath(entry.path)
                            if _linked_into(real, prune, tree):
                                self.linked_out[rel] = real
                    else:  # a broken link, a FIFO, a device, a socket (or a link to one)
                        found.append((rel, 0))
                        self.others.add(rel)
        return sorted(found)

    def remove(self, rel: str) -> None:
        if self.local:
            os.unlink(self.full(rel))
        else:
            self.fs.delete_file(self.full(rel))


# ----------------------------------------------------------------------------
# Model checks on the driver: read the .keras zip's JSON, no TensorFlow needed.


@dataclass
class ModelSpec:
    """What the job needs to know about a model, read from its .keras file."""

    name: str
    channels: int
    multiple: int  # image sides are padded to a multiple of this
    fixed_size: tuple[int, int] | None  # (H, W) when the model's input is not (None, None)
    uses_aelib: bool = False  # has layers registered by aelib (its import registers them)
    halo: int | None = None  # tiles' margin (see model_geometry); None: never tiled
    note: str = ""  # what the driver should say about the model


def _pair(value: Any) -> list:
    return list(value) if isinstance(value, list | tuple) else [value, value]


# What the walk in model_geometry knows. Layers that act on each pixel alone (at most
# mixing its channels); layers that do so when their `axis` is the channel axis; the
# Keras ops a Functional config records that act elementwise; layers whose reach it
# computes. Anything else (a global pooling, attention, a normalization over pixels, a
# slice, a Lambda, a wrapper, a custom layer) leaves the reach unknown: no tiling.
POINTWISE = {
    "Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "Dense", "Dropout", "SpatialDropout2D",
    "GaussianNoise", "GaussianDropout", "AlphaDropout", "ActivityRegularization", "Rescaling",
    "Identity", "Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum",
}  # fmt: skip
CHANNEL_AXIS = {
    "Concatenate", "Softmax", "BatchNormalization", "LayerNormalization", "UnitNormalization",
    "Normalization",
}  # fmt: skip
ELEMENTWISE_OPS = {
    "Add", "Subtract", "Multiply", "Divide", "TrueDivide", "Negative", "Absolute", "Abs",
    "Clip", "Sigmoid", "Relu", "Tanh", "Exp", "Log", "Sqrt", "Square", "Power", "Maximum",
    "Minimum", "Where", "Cast", "Greater", "GreaterEqual", "Less", "LessEqual", "Equal",
    "LeakyRelu", "Gelu", "Silu", "Relu6", "Elu", "Selu", "Softplus", "Softsign", "HardSigmoid",
    "Log1p", "Expm1", "Floor", "Ceil", "Round", "Sign", "Reciprocal", "Sin", "Cos", "Erf",
}  # fmt: skip
LOCAL = {
    "Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Conv2DTranspose", "MaxPooling2D",
    "AveragePooling2D", "UpSampling2D", "ZeroPadding2D", "Cropping2D",
}  # fmt: skip
# How many coarse pixels beyond its own an upsampled pixel reads, by interpolation.
INTERPOLATION_REACH = {"nearest": 0, "bilinear": 1, "bicubic": 2, "lanczos3": 3, "lanczos5": 5}

Pair = tuple[Fraction, Fraction]  # (rows, columns)
Geometry = tuple[Pair, Pair | None]  # a tensor's (factor, reach), as in model_geometry
ONE, ZERO = (Fraction(1), Fraction(1)), (Fraction(0), Fraction(0))


def model_geometry(config: dict) -> tuple[int, int | None]:
    """(multiple, halo) of a model, from its .keras config: image sides are padded to a
    multiple of `multiple` (each downsampling along each path divides them), and tiles
    need a margin of `halo` input pixels, an upper bound on how far from an output pixel
    the input pixels it depends on lie, rounded up to a multiple of `multiple` so that
    tiles start on the model's pooling grid. halo is None when the config cannot bound
    it (see POINTWISE and the sets after it).

    The walk follows the layer graph call by call (shared layers and nested models
    included) and tracks, for each tensor and axis, how many input pixels wide its
    pixels are (`factor`) and how far beyond them its pixels see (`reach`). A call
    widens the reach by its own span times the factor it works at: a kxk convolution of
    dilation d by ceil((k - 1) * d / 2) pixels there ((k - 1) * d when strided or not
    "same"), a pooling window by size - stride (or its "same" padding), a transposed
    convolution by its kernel, a padding or cropping by its width, and an upsampling by
    1 - 1/size of a coarse pixel (how far a coarse pixel extends beyond a fine one inside
    it) plus the interpolation's neighbours; a merge takes the farthest of its inputs.
    For aelib's default `denoise` this gives 13 (11 measured by changing one input
    pixel), a halo of 16; 57 (52) and 64 at depth 3 with two convolutions per stage and
    skips.

    Raises:
        ValueError: the config's layer graph cannot be followed.
    """
    factors: set[Fraction] = set()
    try:
        outputs = _call(config, [(ONE, ZERO)], factors)
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as e:
        raise ValueError(f"cannot follow its layer graph ({type(e).__name__}: {e})") from e
    multiple = math.lcm(*(f.numerator for f in factors))
    reach = _merge(outputs)[1]
    if reach is None:
        return multiple, None
    return multiple, max(1, math.ceil(max(reach) / multiple)) * multiple


def _merge(values: list[Geometry]) -> Geometry:
    """What a layer taking several tensors works at: the coarsest and farthest."""
    if not values:
        return ONE, ZERO
    factor = (max(f[0] for f, _ in values), max(f[1] for f, _ in values))
    reaches = [r for _, r in values]
    if None in reaches:
        return factor, None
    return factor, (max(r[0] for r in reaches), max(r[1] for r in reaches))


def _call(entry: dict, inputs: list[Geometry], factors: set[Fraction]) -> list[Geometry]:
    """One call of a layer or model config on tensors of `inputs`: its outputs' (factor,
    reach) (a layer's: one for all); adds every factor it makes to `factors`."""
    name, cfg = entry.get("class_name", ""), entry.get("config") or {}
    module = str(entry.get("module") or "")
    keras_own = module == "keras" or module.startswith("keras.")
    if isinstance(cfg.get("layers"), list):  # a model
        outputs = _walk(cfg, inputs, factors)
        if keras_own and name in ("Functional", "Sequential"):
            return outputs
        return [(f, None) for f, _ in outputs]  # a subclass may do more than its graph
    factor, reach = _merge(inputs)
    step, span = _layer(name, cfg, module) if keras_own else (ONE, None)
    if span is None and step == ONE:  # unknown: its strides, if it has any, still count
        step = (Fraction(_strides_anywhere(entry)),) * 2
    out = (factor[0] * step[0], factor[1] * step[1])
    factors.update(out)
    if reach is None or span is None:
        return [(out, None)]
    return [(out, (reach[0] + span[0] * factor[0], reach[1] + span[1] * factor[1]))]


def _layer(name: str, cfg: dict, module: str) -> tuple[Pair, Pair | None]:
    """A Keras layer's or op's (step, span) per axis: how much coarser its output's
    pixels are than its input's, and how far, in its input's pixels, it reaches beyond
    the input pixels under an output pixel (None: no bound)."""
    if module.startswith("keras.src.ops"):  # an op: `Average` there averages everything
        return ONE, ZERO if name in ELEMENTWISE_OPS else None
    if cfg.get("data_format") == "channels_first" or not isinstance(
        cfg.get("activation", ""), str
    ):  # acts on other axes; a function of the user's may do anything
        return ONE, None
    if name in POINTWISE:
        return ONE, ZERO
    if name in CHANNEL_AXIS:
        axis = cfg.get("axis", -1)
        return ONE, ZERO if all(a in (-1, 3) for a in _pair(axis)) else None
    if name not in LOCAL:
        return ONE, None
    if name in ("ZeroPadding2D", "Cropping2D"):
        widths = cfg.get("padding" if name == "ZeroPadding2D" else "cropping", 0)
        return ONE, tuple(Fraction(max(_pair(w))) for w in _pair(widths))
    if name == "UpSampling2D":
        size = _pair(cfg.get("size", 2))
        extra = INTERPOLATION_REACH.get(cfg.get("interpolation", "nearest"))
        step = tuple(Fraction(1, s) for s in size)
        return step, None if extra is None else tuple(1 - s + extra for s in step)
    strides = _pair(cfg.get("strides") or cfg.get("pool_size") or 1)  # pooling: its size
    if cfg.get("pool_size") is not None:
        same = cfg.get("padding") == "same"  # pads the window by up to (size - 1) // 2
        spans = [
            max((k - 1) // 2 if same else 0, k - s)
            for k, s in zip(_pair(cfg["pool_size"]), strides, strict=True)
        ]
        return tuple(Fraction(s) for s in strides), tuple(Fraction(x) for x in spans)
    kernel, dilation = _pair(cfg["kernel_size"]), _pair(cfg.get("dilation_rate") or 1)
    extents = [(k - 1) * d for k, d in zip(kernel, dilation, strict=True)]
    if name == "Conv2DTranspose":  # its input is the coarse side
        return tuple(Fraction(1, s) for s in strides), tuple(Fraction(e + 1) for e in extents)
    same = cfg.get("padding") == "same"
    spans = [
        Fraction(-(-e // 2) if s == 1 and same else e)
        for e, s in zip(extents, strides, strict=True)
    ]
    return tuple(Fraction(s) for s in strides), tuple(spans)


def _walk(cfg: dict, inputs: list[Geometry], factors: set[Fraction]) -> list[Geometry]:
    """_call for a model config: its outputs' (factor, reach) from its inputs'."""
    layers = [layer for layer in cfg["layers"] if layer.get("class_name") != "InputLayer"]
    factors.update(f for factor, _ in inputs for f in factor)
    if "output_layers" not in cfg:  # Sequential: a chain
        value = _merge(inputs)
        for layer in layers:
            value = _merge(_call(layer, [value], factors))
        return [value]
    by_name = {_name(layer): layer for layer in layers}

    def refs(entries: Any) -> list[tuple[str, int, int]]:
        """Tensor references of input_layers or output_layers. A nested model's first node
        in Keras's count is its own graph, which the config leaves out: these count it,
        the calls' references (in inbound_nodes) do not. (A subclass whose config does
        not show its layers is known by the node that is one too many.)"""
        if isinstance(entries, dict):  # named inputs or outputs: Keras orders them by name
            entries = [entries[k] for k in sorted(entries)]
        if entries and isinstance(entries[0], str):
            entries = [entries]
        return [
            (name, node - _own_node(by_name.get(name), node), t) for name, node, t, *_ in entries
        ]

    done: dict[tuple[str, int], list[Geometry]] = {}
    sources = refs(cfg["input_layers"])
    for i, (name, node, _) in enumerate(sources):
        done[(name, node)] = [inputs[i] if len(sources) == len(inputs) else _merge(inputs)]

    def value(ref: tuple[str, int, int]) -> Geometry:
        values = done[ref[:2]]
        return values[ref[2] if len(values) > 1 else 0]  # a layer's outputs: all alike

    outputs = refs(cfg["output_layers"])
    stack, visiting = [(ref[:2], False) for ref in outputs], set()
    while stack:  # depth first, without recursion: models may have thousands of calls
        key, ready = stack.pop()
        if key in done:
            continue
        layer = by_name[key[0]]
        sources = list(_tensors(layer["inbound_nodes"][key[1]]))
        if ready:  # every source is done
            done[key] = _call(layer, [value(ref) for ref in sources], factors)
            continue
        if key in visiting:
            raise ValueError(f"the graph loops through {key[0]}")
        visiting.add(key)
        stack.append((key, True))
        stack.extend((ref[:2], False) for ref in sources if ref[:2] not in done)
    return [value(ref) for ref in outputs]


def _own_node(layer: dict | None, node: int) -> bool:
    """Whether references count a first node of `layer` that its config leaves out."""
    if layer is None:  # an InputLayer
        return False
    return "output_layers" in (layer.get("config") or {}) or node >= len(layer["inbound_nodes"])


def _strides_anywhere(config: Any) -> int:
    """The product of every stride in a config: the step of a layer or op the walk in
    model_geometry does not know (ops.nn.max_pool's config has its strides), and for a
    model whose graph it cannot follow, at least a multiple of each path's downsampling."""
    product = 1
    if isinstance(config, dict):
        cfg = config.get("config")
        if isinstance(cfg, dict) and "Transpose" not in str(config.get("class_name")):
            strides = cfg.get("strides") or cfg.get("pool_size")  # a pooling's: its size
            if isinstance(strides, int | list | tuple) and strides:
                product *= math.lcm(*(int(s) for s in _pair(strides)))
        for value in config.values():
            product *= _strides_anywhere(value)
    elif isinstance(config, list):
        for value in config:
            product *= _strides_anywhere(value)
    return product


def _name(layer: dict) -> str:
    return layer.get("name") or layer["config"]["name"]


def _tensors(node: Any):
    """The (layer, node, tensor) each tensor a call takes comes from: Keras 3's
    {"class_name": "__keras_tensor__", ...} and the older [layer, node, tensor, kwargs]."""
    if isinstance(node, dict):
        if node.get("class_name") == "__keras_tensor__":
            name, index, tensor = node["config"]["keras_history"]
            yield (name, index, tensor)
            return
        for key in sorted(node):  # a dict of tensors goes to a model by name, as Keras does
            yield from _tensors(node[key])
    elif isinstance(node, list):
        if len(node) >= 3 and isinstance(node[0], str) and isinstance(node[1], int):
            yield (node[0], node[1], node[2])
            return
        for value in node:
            yield from _tensors(value)


def inspect_model(payload: bytes, label: str) -> ModelSpec:
    """Checks that the model maps images to images of the same shape.

    Raises:
        ValueError: not a .keras file, or its input is not (H, W, channels).
    """
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as zf:
            names = zf.namelist()
            if "config.json" not in names:
                raise ValueError(
                    f"--model {label}: not a Keras 3 .keras file (no config.json inside)."
                )
            config = _json_object(zf, "config.json", label)
            info = _json_object(zf, "aelib.json", label) if "aelib.json" in names else {}
            unusable = _nonfinite_weights(zf)
    except zipfile.BadZipFile as e:
        raise ValueError(f"--model {label}: not a .keras file (not a zip archive: {e})") from e
    try:
        return _spec(config, info, unusable, label)
    except (AttributeError, TypeError, KeyError, IndexError) as e:  # (a traceback)
        raise ValueError(
            f"--model {label}: not a usable .keras file (its config.json is not in Keras's "
            f"layout: {type(e).__name__}: {e})"
        ) from e


def _json_object(zf: zipfile.ZipFile, member: str, label: str) -> dict:
    """A .keras file's JSON member, which must be an object."""
    try:
        value = json.loads(zf.read(member))
    except ValueError as e:  # (not JSON, or not UTF-8: json's message named no file)
        raise ValueError(f"--model {label}: not a usable .keras file ({member}: {e})") from e
    if not isinstance(value, dict):
        raise ValueError(
            f"--model {label}: not a usable .keras file ({member} holds "
            f"{json.dumps(value)[:40]}, not a JSON object)"
        )
    return value


def _spec(config: dict, info: dict, unusable: list[str], label: str) -> ModelSpec:
    """inspect_model's checks of a model's config.json and aelib.json."""
    name = info.get("name") or config.get("config", {}).get("name", "?")
    if unusable:
        metrics = info.get("metrics") if isinstance(info.get("metrics"), dict) else {}
        epoch = metrics.get("epochs_run")
        when = f" in epoch {epoch}" if isinstance(epoch, int) else ""
        why = (
            f"its training diverged (the loss became NaN{when})"
            if metrics.get("nan") is True
            else "a diverged training run saves such weights"
        )
        raise ValueError(
            f"--model {label} ({name}): {len(unusable)} of its weight arrays hold NaN or "
            f"infinite values ({unusable[0]} first), so every output would be NaN: {why}. "
            "Train it again, e.g. with a smaller learning rate."
        )
    sources = config.get("config", {}).get("input_layers") or []
    single = isinstance(sources, list) and sources and isinstance(sources[0], str)
    count = 1 if single else len(sources)
    if count > 1:
        raise ValueError(
            f"Model {label} ({name}) takes {count} inputs: the denoise job needs a model of "
            "one image input, such as aelib's `denoise`."
        )
    shape = _input_shape(config)
    if shape is None or len(shape) != 4:
        raise ValueError(
            f"Model {label} ({name}) takes input of shape {shape}: the denoise job needs an image "
            "model whose input is (batch, height, width, channels), such as aelib's `denoise`. "
            "Dense or sequence models cannot be applied to image files."
        )
    _, height, width, channels = shape
    if channels not in (1, 3):
        raise ValueError(
            f"Model {label} ({name}) has {channels} input channels; the job supports 1 "
            "(grayscale) or 3 (RGB)."
        )
    out_channels = _output_filters(config)
    if out_channels is not None and out_channels != channels:
        raise ValueError(
            f"Model {label} ({name}) maps images of {channels} channel(s) to images of "
            f"{out_channels} (its output layer's filters): the denoise job needs a model "
            "whose output has its input's shape, such as aelib's `denoise`."
        )
    depth = info.get("model_config", {}).get("depth")
    note = ""
    try:
        multiple, halo = model_geometry(config)
    except ValueError as e:  # Keras may still load it: run it whole
        multiple, halo = 2 ** int(depth) if depth is not None else _strides_anywhere(config), None
        note = f"model {label}: {e}; images are padded to a multiple of {multiple} and never tiled"
    fixed = None if height is None or width is None else (int(height), int(width))
    return ModelSpec(
        str(name), int(channels), int(multiple), fixed, _uses_aelib(config), halo, note
    )


def _nonfinite_weights(zf: zipfile.ZipFile) -> list[str]:
    """The names of the weight arrays in a .keras zip that hold NaN or infinite values
    (read with h5py, which Keras installs; no backend needed). [] where the file keeps
    its weights otherwise or h5py cannot read them: the actors load the model then."""
    if "model.weights.h5" not in zf.namelist():
        return []
    try:
        import h5py

        bad: list[str] = []
        with h5py.File(io.BytesIO(zf.read("model.weights.h5")), "r") as weights:

            def visit(name: str, item: Any) -> None:
                if isinstance(item, h5py.Dataset) and item.dtype.kind in "fc":
                    if not np.isfinite(item[()]).all():
                        bad.append(name)

            weights.visititems(visit)
        return bad
    except Exception:  # (not this check's to report)
        return []


def _uses_aelib(config: Any) -> bool:
    """Whether the config names an object aelib registers (registered_name "aelib>...")."""
    if isinstance(config, dict):
        if str(config.get("registered_name") or "").startswith("aelib>"):
            return True
        return any(_uses_aelib(v) for v in config.values() if isinstance(v, dict | list))
    if isinstance(config, list):
        return any(_uses_aelib(v) for v in config)
    return False


def _output_filters(config: dict) -> int | None:
    """The `filters` of a Keras model's output layer where it is one of Keras's
    convolutions (how many channels the model's output has), else None: the actors then
    find out when they try the model."""
    inner = config.get("config") or {}
    layers = inner.get("layers")
    if not isinstance(layers, list) or not layers:
        return None
    if config.get("class_name") == "Sequential":
        last = layers[-1]
    else:
        outputs = inner.get("output_layers")  # [name, node, tensor], or a list of such
        if isinstance(outputs, list) and len(outputs) == 1 and isinstance(outputs[0], list):
            outputs = outputs[0]
        if not (isinstance(outputs, list) and outputs and isinstance(outputs[0], str)):
            return None
        last = next((x for x in layers if x.get("name") == outputs[0]), None)
    if not isinstance(last, dict) or not str(last.get("module") or "").startswith("keras"):
        return None
    filters = (last.get("config") or {}).get("filters")
    if last.get("class_name") in CONVOLUTIONS and isinstance(filters, int):
        return filters
    return None


# Keras's layers whose `filters` are their output's channels.
CONVOLUTIONS = ("Conv2D", "Conv2DTranspose", "SeparableConv2D")


def _ppm_maxval(img) -> int:
    """A Netpbm file's maximum value (its white), from the tile Pillow opened it with;
    0 for other formats. Pillow reads one above 255 as 16-bit gray (mode I, scaled to
    0..65535) or as 8-bit RGB."""
    if img.format != "PPM" or not img.tile:
        return 0
    args = img.tile[0][3]  # (a plain tuple before Pillow 11, a named one since)
    if isinstance(args, tuple) and len(args) == 2 and isinstance(args[1], int):
        return args[1]  # (Pillow's own decoder, which scales)
    rawmode = args[0] if isinstance(args, tuple) and args else args
    return 65535 if rawmode == "I;16B" else 255


def _input_shape(config: dict) -> list | None:
    inner = config.get("config", {})
    for layer in inner.get("layers", []):
        if layer.get("class_name") == "InputLayer":
            cfg = layer.get("config", {})
            return cfg.get("batch_shape") or cfg.get("batch_input_shape")
    build = config.get("build_config", {}).get("input_shape")
    return build


# ----------------------------------------------------------------------------
# Image helpers (NumPy + Pillow), used inside the actors.


class UnsupportedImage(ValueError):
    """A readable image the job cannot denoise without changing its values."""


# --max-pixels' default: Pillow's own decompression-bomb limit (it refuses an image of
# more than twice Image.MAX_IMAGE_PIXELS, 2 x 89,478,485, and warns above that number).
PILLOW_PIXEL_LIMIT = 178_956_970


def allow_pixels(limit: int | None) -> None:
    """Lets Pillow open images of up to twice `limit` pixels (None or 0: any), so that
    decode()'s own check, which names --max-pixels, decides (Pillow still refuses an
    image of more than twice that in Image.open, which decode() words the same way).
    Process-wide (Pillow's guard is a module global), so called once per actor; it only
    ever loosens it.
    Pillow's warning for images between its two limits is turned off: the job's limit
    is the one that counts."""
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and (not limit or limit >= 2 * current):
        Image.MAX_IMAGE_PIXELS = limit or None


def _too_big(pixels: int, limit: int) -> UnsupportedImage:
    return UnsupportedImage(
        f"image is too big: {pixels:,} pixels, more than --max-pixels {limit:,} allows "
        "(a higher --max-pixels lets it through; it is decoded whole, so memory grows with it)"
    )


# PNG color type -> samples per pixel (a palette may become RGB)
PNG_SAMPLES = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


def header_pixels(payload: bytes) -> int:
    """Samples (height x width x channels) of an encoded image, from its header alone:
    a PNG's IHDR directly, any other format through Pillow's lazy open. 0 if unknown."""
    try:
        if len(payload) >= 26 and payload[:8] == b"\x89PNG\r\n\x1a\n":
            if payload[12:16] == b"IHDR":
                width, height = struct.unpack(">II", payload[16:24])
                return width * height * PNG_SAMPLES.get(payload[25], 4)
        from PIL import Image

        with Image.open(io.BytesIO(payload)) as img:
            return img.width * img.height * len(img.getbands())
    except Exception:  # unreadable: decode() will say why
        return 0


def decode(
    payload: bytes, rgb: str, max_pixels: int | None = PILLOW_PIXEL_LIMIT
) -> tuple[np.ndarray, int, dict, np.ndarray | None]:
    """Decodes an image file to (H, W, C) with its maximum value, what the output
    should carry over (`info`) and its alpha channel.

    Grayscale stays 1 channel; RGB stays 3 (or becomes 1 with rgb="luminance");
    an alpha channel is set aside unchanged. 16-bit grayscale keeps 0..65535 (maximum
    value 255 where all its values lie in 0-255: 8-bit values in a wider file).
    `info` holds the file's EXIF (its orientation tag says how to show the pixels,
    which keep their stored layout), ICC profile (kept only while the image keeps its
    color space) and DPI, and a `note` when Pillow read it with less depth than the
    file has (16-bit RGB PNGs and TIFFs come as 8 bits). A transparent colour (a PNG's
    tRNS chunk on gray or RGB pixels) becomes the alpha channel, as a palette's does.

    Raises:
        ValueError: not a readable image (UnsupportedImage: one of pixels the job
            does not handle, or of more than `max_pixels` pixels; None or 0: no limit
            but Pillow's, which allow_pixels() sets).
    """
    from PIL import Image, UnidentifiedImageError

    # A PNG (the common case) goes straight to Pillow's PNG plugin instead of through
    # its format detection: about 2 of 30 us per 28x28 digit.
    formats = ["PNG"] if payload[:8] == b"\x89PNG\r\n\x1a\n" else None
    # A 16-bit PNG of gray + alpha, RGB or RGBA (IHDR's bit depth and colour type):
    # Pillow reads it as 8-bit RGB(A), the first as RGBA of three equal planes.
    wide = formats and payload[24:25] == b"\x10" and payload[25:26] in (b"\x02", b"\x04", b"\x06")
    gray_alpha = formats and payload[25:26] == b"\x04"
    try:
        with Image.open(io.BytesIO(payload), formats=formats) as img:
            if max_pixels and img.width * img.height > max_pixels:  # from the header alone
                raise _too_big(img.width * img.height, max_pixels)
            ppm_max = _ppm_maxval(img)  # (from the tile, which load() clears)
            img.load()
            info = {k: img.info[k] for k in ("exif", "icc_profile", "dpi") if img.info.get(k)}
            if img.format == "TIFF" and 282 not in getattr(img, "tag_v2", {}):
                # (Pillow says (1, 1) of a TIFF without XResolution: the outputs said so,
                # a 50-pixel image 50 inches wide)
                info.pop("dpi", None)
            if img.format == "WEBP" and _webp_lossless(payload):  # (written lossy at 95)
                info["lossless"] = True
            mode = img.mode
            alpha = None
            # A TIFF's bits per sample: Pillow reads 16-bit RGB(A) ones as 8 bits too.
            bits = img.tag_v2.get(258) if img.format == "TIFF" else None
            deep = bool(bits) and max(bits if isinstance(bits, tuple) else (bits,)) > 8
            if mode in ("L", "RGB") and ppm_max not in (0, 255):  # (the 1-bit PBM's: 255)
                # A Netpbm file whose white is not 255: Pillow scales it to 0..255
                kind = "PGM" if mode == "L" else "PPM"
                note = (
                    f"{kind} of maximum value {ppm_max} read scaled to 0 to 255 (Pillow), "
                    "written as 8 bits"
                )
                info["note"] = "; ".join(filter(None, [info.get("note"), note]))
            key = img.info.get("transparency")  # a transparent colour (PNG's tRNS)
            if mode == "F":  # converting would round [0, 1] floats to black: refuse instead
                raise UnsupportedImage(
                    "32-bit float pixels (mode F) are not supported: convert the image to "
                    "8 or 16 bits"
                )
            frames = getattr(img, "n_frames", 1)
            if frames > 1 and img.format != "MPO":  # an animation, pages (not a camera
                # JPEG's previews, which Pillow opens as MPO frames): the first frame
                info["note"] = f"first of {frames} frames denoised, the others dropped"
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(img, dtype=np.int64)
                low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
                if low < 0 or high > 65535:  # clipping would change the image: refuse
                    raise UnsupportedImage(
                        f"32-bit integer pixels from {low} to {high} are not supported (only "
                        "0 to 65535): convert the image to 8 or 16 bits"
                    )
                if isinstance(key, int) and (array == key).any():  # 16-bit gray's tRNS
                    alpha = np.where(array == key, 0, 65535).astype(np.uint16)
                # Values that all lie in 0-255 are 8-bit values in a wider file, as
                # aelib's training reads them (aelib.data.read_gray): on the 16-bit
                # scale the model saw a near-black image, and its output was of another
                # scale than its input. They are denoised on the 8-bit scale and written
                # back in a file as wide as the input's.
                notes = [info.get("note")]
                wider = mode == "I" and img.format != "PPM"  # (a PGM's "I" is 16 bits)
                if wider:
                    notes.append("32-bit integer pixels written as 16 bits")
                elif img.format == "PPM" and ppm_max != 65535:  # 0..maxval as 0..65535
                    notes.append(
                        f"PGM of maximum value {ppm_max}, read scaled to 0 to 65535 (Pillow), "
                        "written as 16 bits"
                    )
                if high <= 255:
                    notes.append(
                        f"{'32' if wider else '16'}-bit pixels of values 0 to "
                        f"{high} denoised as 8-bit values"
                    )
                if any(notes):
                    info["note"] = "; ".join(filter(None, notes))
                maxval = 255 if high <= 255 else 65535
                return array.astype(np.uint16)[..., None], maxval, info, alpha
            # A PNG's tRNS colour is on the file's scale, which Pillow keeps as it scales
            # the pixels (16-bit RGB to its high bytes, 2- and 4-bit gray to 0-255): the
            # colour on the pixels' scale, else others than it became transparent.
            if formats and mode in ("L", "RGB") and key is not None:
                depth = payload[24]
                if mode == "RGB" and depth == 16 and isinstance(key, tuple):
                    img.info["transparency"] = tuple(v >> 8 for v in key)
                elif mode == "L" and depth in (2, 4) and isinstance(key, int):
                    img.info["transparency"] = key * (255 // ((1 << depth) - 1))
            # Transparent palette entries, or a transparent colour of gray or RGB pixels
            # (tRNS; the latter was dropped without a word): the alpha channel.
            keyed = mode in ("1", "L", "RGB", "P") and "transparency" in img.info
            if mode in ("LA", "RGBA", "PA") or keyed:
                gray = mode in ("LA", "L", "1") or gray_alpha or mode == "P" and _gray_palette(img)
                img = img.convert("LA" if gray else "RGBA")  # (a gray GIF's: not 3 equal planes)
                alpha = np.asarray(img.getchannel("A"))
                img = img.convert("RGB" if img.mode == "RGBA" else "L")
                if mode != "P" and keyed and alpha.min() == 255:  # (no pixel has it)
                    alpha = None
            if img.mode == "P" and _gray_palette(img):  # a GIF or PNG of gray levels
                img = img.convert("L")
            if img.mode not in ("L", "RGB"):
                img = img.convert("RGB" if mode in ("P", "CMYK", "YCbCr", "HSV", "LAB") else "L")
                if mode in ("CMYK", "YCbCr", "HSV", "LAB"):  # the output is RGB: say so
                    to = "gray" if rgb == "luminance" else "RGB"  # (then its luminance)
                    note = f"{mode} pixels converted to {to} (Pillow)"
                    info["note"] = "; ".join(filter(None, [info.get("note"), note]))
            if img.mode == "RGB" and rgb == "luminance":
                img = img.convert("L")
            space = "L" if gray_alpha else COLOR_SPACE.get(mode)  # 16-bit LA read as RGBA
            if img.mode != space:  # converted: the profile no longer fits
                info.pop("icc_profile", None)
            if wide or deep:
                if wide:
                    kind = "gray + alpha" if gray_alpha else "RGB"
                else:
                    kind = {"LA": "gray + alpha", "RGBA": "RGB", "RGBX": "RGB"}.get(mode, mode)
                note = f"16-bit {kind} read as 8 bits (Pillow), written as 8 bits"
                info["note"] = "; ".join(filter(None, [info.get("note"), note]))
            array = np.asarray(img)
    except UnsupportedImage:
        raise
    except Image.DecompressionBombError as e:  # more pixels than Pillow's guard allows
        found = re.search(r"\((\d+) pixels\)", str(e))  # over twice the limit (allow_pixels)
        if max_pixels and found and int(found[1]) > max_pixels:
            raise _too_big(int(found[1]), max_pixels) from e
        raise UnsupportedImage(f"image is too big for Pillow: {e}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e))
        raise ValueError(f"not a readable image ({type(e).__name__}: {reason})") from e
    if array.ndim == 2:
        array = array[..., None]
    return array, 255, info, alpha


def _webp_lossless(payload: bytes, at: int = 12, end: int | None = None) -> bool:
    """Whether a WEBP file's image is lossless (its first VP8L or VP8 chunk is VP8L; an
    animation's, in its first frame, the one denoised), for its output to be written
    lossless too."""
    end = len(payload) if end is None else end
    while at + 8 <= end:
        kind, size = payload[at : at + 4], int.from_bytes(payload[at + 4 : at + 8], "little")
        if kind in (b"VP8L", b"VP8 "):
            return kind == b"VP8L"
        if kind == b"ANMF":  # (16 bytes of the frame's place and timing, then its chunks)
            return _webp_lossless(payload, at + 8 + 16, min(end, at + 8 + size))
        at += 8 + size + (size & 1)
    return False


def _gray_palette(img) -> bool:
    palette = img.getpalette() or []
    return bool(palette) and palette[0::3] == palette[1::3] == palette[2::3]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(array: np.ndarray, info: dict | None = None) -> bytes:
    """A PNG of a uint8/uint16 (H, W, C) array, C in 1..4, without Pillow's per-call cost.

    Filter type 0 on every row and zlib level 6: a valid PNG any reader opens,
    about 6x faster than `Image.save` for small images. `info` may add the chunks
    for an ICC profile, a DPI and EXIF (as decode returns them).
    """
    height, width, channels = array.shape
    depth = 16 if array.dtype == np.uint16 else 8
    color = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = array.astype(">u2" if depth == 16 else np.uint8).reshape(height, -1).view(np.uint8)
    raw = np.zeros((height, rows.shape[1] + 1), np.uint8)
    raw[:, 1:] = rows
    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            *_png_info_chunks(info or {}),
            _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)),
            _png_chunk(b"IEND", b""),
        )
    )


def _png_info_chunks(info: dict) -> list[bytes]:
    """iCCP, pHYs and eXIf chunks (the ones before IDAT) for what `info` holds."""
    chunks = []
    if info.get("icc_profile"):
        chunks.append(_png_chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(info["icc_profile"])))
    if info.get("dpi"):
        x, y = (max(1, round(float(d) / 0.0254)) for d in info["dpi"])  # per meter
        chunks.append(_png_chunk(b"pHYs", struct.pack(">IIB", x, y, 1)))
    if info.get("exif"):
        chunks.append(_png_chunk(b"eXIf", info["exif"].removeprefix(b"Exif\x00\x00")))
    return chunks


def encode(
    array: np.ndarray,
    fmt: str,
    quality: int = 95,
    info: dict | None = None,
    maxval: int | None = None,
) -> tuple[bytes, str | None]:
    """Encodes (H, W, C) in format `fmt` (a Pillow format name; JPEG and WEBP at
    `quality`) with the input's EXIF, ICC profile and DPI (`info`, from decode) where
    the format holds them; returns the bytes and a note when the format cannot hold
    the image as it is (JPEG and BMP: no alpha; JPEG, BMP and WEBP: no 16 bits; TIFF as
    Pillow writes it: no 16-bit gray + alpha; BMP: no EXIF or ICC profile; WEBP: no
    gray), so the alpha channel, EXIF or profile was dropped, the values scaled to 8
    bits or gray stored as RGB. `maxval`: the scale of a 16-bit array's pixels (255: 8-bit
    values in a 16-bit file, which such a format gets as they are; its alpha is scaled)."""
    info = {k: v for k, v in (info or {}).items() if k != "note"}
    if fmt == "PNG":
        return encode_png(array, info), None
    notes = []
    if array.dtype == np.uint16 and fmt not in HOLDS_16_BITS:  # WEBP would clip it to white
        scaled = (array.astype(np.uint32) * 255 + 32767) // 65535
        if maxval == 255:
            colour = array.shape[2] - (array.shape[2] in (2, 4))  # (the alpha: scaled)
            scaled[..., :colour] = array[..., :colour]
            notes.append("8-bit values of a 16-bit file written as 8 bits")
        else:
            notes.append("16-bit values scaled to 8 bits")
        array = scaled.astype(np.uint8)
    if array.dtype == np.uint16 and array.shape[2] == 2:  # Pillow writes no 16-bit LA
        array = array[..., :1]
        notes.append("alpha dropped")
    if fmt == "BMP" and array.shape[2] == 4:  # written as 32 bits that readers take for RGB
        array = array[..., :3]
        notes.append("alpha dropped")
    if fmt == "WEBP" and array.shape[2] in (1, 2):  # (libwebp stores colour only)
        notes.append("gray stored as RGB of three equal channels")
    if fmt == "BMP":  # Pillow's BMP writer drops both (an EXIF orientation went unsaid)
        names = (("exif", "EXIF"), ("icc_profile", "ICC profile"))
        dropped = [name for key, name in names if info.get(key)]
        if dropped:
            notes.append(f"{' and '.join(dropped)} dropped")
    try:
        payload = _pillow_encode(array, fmt, quality, info)
    except (OSError, ValueError, KeyError) as e:
        if array.shape[2] not in (2, 4):
            raise
        notes.append("alpha dropped")
        try:
            payload = _pillow_encode(array[..., :-1], fmt, quality, info)
        except (OSError, ValueError, KeyError):
            raise e from None
    return payload, (f"{' and '.join(notes)}: {fmt} cannot store it" if notes else None)


def _pillow_encode(array: np.ndarray, fmt: str, quality: int, info: dict) -> bytes:
    from PIL import Image

    image = array[..., 0] if array.shape[2] == 1 else array
    if array.dtype == np.uint16:
        pil = Image.fromarray(image.astype(np.uint16))  # mode I;16
    else:
        pil = Image.fromarray(image)
    buf = io.BytesIO()
    if "icc_profile" in info and pil.mode not in ("L", "RGB"):  # gray 16 bits: none fits
        info = {k: v for k, v in info.items() if k != "icc_profile"}
    options = {"quality": quality} if fmt in LOSSY else {}
    if fmt == "JPEG":  # (Pillow's default halves colour's resolution: 4:2:0)
        options["subsampling"] = 0
    lossless = info.get("lossless")  # (decode's: a lossless WEBP input's)
    info = {k: v for k, v in info.items() if k != "lossless"}
    if fmt == "WEBP" and lossless:  # (quality: the effort; exact: the colour under alpha 0)
        options.update(lossless=True, exact=True)
    try:
        pil.save(buf, format=fmt, **info, **options)
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        if not info:
            raise
        buf = io.BytesIO()  # metadata this writer rejects is dropped, not the image
        pil.save(buf, format=fmt, **options)
    return buf.getvalue()


def output_path(rel: str, fmt_choice: str) -> str:
    """The output's relative path: the input's, with the suffix of --format. With
    "same", an input whose suffix names no format the job writes (.gif, .ppm, none)
    gets ".png": the output's suffix always says what it holds."""
    stem, old = posixpath.splitext(rel)
    if fmt_choice == "same":
        return rel if old.lower() in SUFFIX_FORMAT else stem + ".png"
    if old.lower() in SUFFIXES[FORMATS[fmt_choice][0]]:
        return rel
    return stem + FORMATS[fmt_choice][1]


def safe_relative(rel: str, foreign: bool = False) -> str:
    """`rel` normalised, or ValueError if it would leave the output folder. A `foreign`
    path (from a Parquet column: perhaps written on Windows) has its backslashes taken
    as separators, and a drive letter ("C:") is refused; a file's name here keeps both."""
    text = str(rel).replace("\\", "/") if foreign else str(rel)
    if not text or posixpath.normpath(text) == ".":  # ("" or "./": no file's name)
        raise ValueError(f"empty path {rel!r}: it names no output file")
    norm = posixpath.normpath(text)
    if (
        not text
        or text.startswith("/")
        or (foreign and re.match(r"[A-Za-z]:(/|$)", text))  # C:/x or C: (not a:b.png)
        or norm in (".", "")
        or norm == ".."
        or norm.startswith("../")
    ):
        raise ValueError(f"unsafe path {rel!r}: its output would leave the output folder")
    return norm


def output_for(
    rel: str, fmt_choice: str, foreign: bool = False, within: SourceFolder | None = None
) -> str:
    """The output path of input `rel` (see safe_relative, output_path), or ValueError if
    it would be in the input folder (`within`, see SourceFolder). There it could
    overwrite an input, and would be an input of the next run."""
    out_rel = output_path(safe_relative(rel, foreign), fmt_choice)
    if within is not None and within.holds(out_rel):
        raise ValueError(
            f"its output {out_rel} would be in the input folder {within.shown}, where it "
            "could replace an input"
        )
    return out_rel


def orientation(info: dict) -> int | None:
    """The EXIF orientation tag of a file decode() read (None where it has none, or one
    that is not 1-8: shown as stored)."""
    if not info.get("exif"):
        return None
    from PIL import Image

    try:
        exif = Image.Exif()
        exif.load(info["exif"])
        value = exif.get(0x0112)
    except Exception:  # (a damaged EXIF block: Pillow shows the pixels as stored too)
        return None
    return value if value in range(1, 9) else None


def _turned(turn: int | None, back: int | None, shape: tuple, clean_shape: tuple) -> bool:
    """Whether an input and its reference, of EXIF orientations `turn` and `back`, are
    compared as shown rather than as stored: where both files say an orientation and
    they differ (a photo and its reference exported upright with the tag set to 1), or
    where one says none and only as shown are they of one size (a reference exported
    upright without its tag). A reference of the stored pixels with its camera's tag
    and a noisy copy saved without one stay as stored (noise added to the stored array),
    as does a square pair of which one file says no orientation."""
    if (turn or 1) == (back or 1):
        return False
    if turn is not None and back is not None:
        return True

    def shown(size: tuple, tag: int | None) -> tuple:  # (tags 5-8 swap the axes)
        return size[1::-1] if (tag or 1) >= 5 else size[:2]

    return shape[:2] != clean_shape[:2] and shown(shape, turn) == shown(clean_shape, back)


def as_shown(array: np.ndarray, tag: int) -> np.ndarray:
    """(H, W, C) pixels as a viewer shows them under EXIF orientation `tag`, as
    PIL.ImageOps.exif_transpose turns an image."""
    if tag in (5, 7):  # transpose, then as 1 or 3
        array = array.transpose(1, 0, 2)
    turns = {3: 2, 6: 3, 7: 2, 8: 1}.get(tag, 0)  # (quarter turns counter-clockwise)
    array = np.rot90(array, turns) if turns else array
    if tag in (2, 4):
        array = array[:, ::-1] if tag == 2 else array[::-1]
    return array


def _gray_planes(array: np.ndarray) -> bool:
    """Whether RGB planes are gray: equal, or within 2 levels (lossy WEBP's gray)."""
    planes = array.astype(np.int32)
    return bool(np.abs(planes - planes[..., :1]).max() <= 2)


def _metrics(
    clean: np.ndarray, clean_max: int, noisy: np.ndarray, out: np.ndarray, maxval: int
) -> dict:
    """PSNR and SSIM of the input and the output against the reference, each image on
    the scale of its own bit depth (an 8-bit reference of a 16-bit input, or back)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ref = clean.astype(np.float64) / clean_max
    # SSIM's 7x7 window, smaller (odd) for an image narrower than that; below 3 pixels
    # there is no SSIM (None: a null in the manifest, as a metric not measured, left out
    # of its means; NaN made a column's mean NaN in pyarrow or SQL), though PSNR is.
    side = min(ref.shape[:2])
    window = min(7, side if side % 2 else side - 1)
    result = {}
    for key, img in (("noisy", noisy), ("", out)):
        x = img.astype(np.float64) / maxval
        with np.errstate(divide="ignore"):
            p = peak_signal_noise_ratio(ref, x, data_range=1.0)
        channel_axis = -1 if ref.shape[-1] > 1 else None
        a, b = (ref, x) if channel_axis is not None else (ref[..., 0], x[..., 0])
        s = None
        if window >= 3:
            s = float(
                structural_similarity(
                    a, b, win_size=window, data_range=1.0, channel_axis=channel_axis
                )
            )
        suffix = f"_{key}" if key else ""
        result[f"psnr{suffix}"] = float(p)
        result[f"ssim{suffix}"] = s
    return result


# ----------------------------------------------------------------------------
# The model actor.


@dataclass
class JobSettings:
    """What every actor needs, shipped once in its constructor."""

    model_bytes: bytes
    spec: ModelSpec
    output: str
    source: str | None  # None for Parquet input (bytes come in the batch)
    clean: str | None
    fmt: str  # "same" or a key of FORMATS
    rgb: str  # "per-channel" or "luminance"
    max_batch: int
    quality: int  # JPEG/WEBP
    threads: int
    io_threads: int = 2
    max_pixels: int | None = PILLOW_PIXEL_LIMIT  # None: no limit
    extra: dict = field(default_factory=dict)

    @classmethod
    def in_process(cls, model: str, source: str, output: str, **options) -> JobSettings:
        """For a Denoiser in this process (tests, bench_denoise.py --stages): a folder
        in, a folder out, one thread each and the job's defaults unless `options` say."""
        with open(model, "rb") as f:
            payload = f.read()
        values = dict(
            model_bytes=payload,
            spec=inspect_model(payload, model),
            output=output,
            source=source,
            clean=None,
            fmt="same",
            rgb="per-channel",
            max_batch=1024,
            quality=95,
            threads=1,
            io_threads=1,
        )
        return cls(**{**values, **options})


class Denoiser:
    """Loads the model once; each call denoises one block of files and returns its rows."""

    def __init__(self, settings: JobSettings):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        backend = _keras_backend()  # TensorFlow, or JAX/PyTorch where TF is not installed
        _hide_gpus_ray_did_not_give(backend)
        if backend == "jax":  # GPU memory on demand (not 75% up front): actors may share a GPU
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        with _optional_imports_skipped(UNUSED_IMPORTS):
            if backend == "tensorflow":
                import tensorflow as tf

                # Before any op runs (a RuntimeError after: TensorFlow already ran in this
                # process, as in a test, and keeps its settings).
                with contextlib.suppress(RuntimeError):
                    # One pool of `threads` (the actor's CPUs) per actor, one op at a time.
                    tf.config.threading.set_intra_op_parallelism_threads(settings.threads)
                    tf.config.threading.set_inter_op_parallelism_threads(1)
                with contextlib.suppress(RuntimeError):
                    # GPU memory on demand, not all up front: actors may share a GPU.
                    for gpu in tf.config.list_physical_devices("GPU"):
                        tf.config.experimental.set_memory_growth(gpu, True)
            elif backend == "torch":
                import torch

                torch.set_num_threads(settings.threads)
            import keras

        if settings.spec.uses_aelib:  # its import (~0.6 s) registers the layers load_model needs
            try:
                import aelib  # noqa: F401
            except ImportError:
                pass
        import ray

        allow_pixels(settings.max_pixels)
        self.s = settings
        self.spec = settings.spec
        self.out = Storage(settings.output)
        self.src = Storage(settings.source) if settings.source else None
        self.clean = Storage(settings.clean) if settings.clean else None
        # (In a Ray actor; in-process, as in tests and bench_denoise.py --stages, None.)
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        self.device = _backend_device(keras.backend.backend())
        # A GPU takes --batch-size images per call; a CPU slices of them, of the size it
        # runs fastest (None until this actor has timed them).
        self._sizer = CallSizer(CPU_CALL_PIXELS)
        self._call_pixels = GPU_CALL_PIXELS if self.device == "GPU" else self._sizer.chosen
        self.model = _load_model(keras, settings.model_bytes)
        channels = self.spec.channels
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            # One trace for every image size: no retracing per shape. No AutoGraph: the
            # call has no Python control flow to convert (and a lambda's source is not
            # found, which AutoGraph would warn about).
            signature = [tf.TensorSpec([None, None, None, channels], tf.float32)]
            self._run = tf.function(
                lambda x: self.model(x, training=False), input_signature=signature, autograph=False
            )
        else:
            self._run = self.model.predict_on_batch
        self.spec = self._probed(channels)
        # File reads, decodes, encodes and writes run on a few threads: the file calls
        # (creating a file is mostly kernel time) and zlib/Pillow release the GIL, so they
        # overlap each other and the model instead of leaving the actor's CPU idle.
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=settings.io_threads)
        # Creating files in one folder from several threads makes the kernel spin on the
        # folder's lock (measured: 3x the system time); one thread at a time creates them.
        self._write_lock = threading.Lock() if self.out.local else contextlib.nullcontext()
        # TensorFlow and Keras leave ~460k objects for Python's cyclic GC, so each full
        # collection takes ~0.2 s, and the rows and images a block keeps alive set one
        # off every few blocks. Freezing what exists now (the model, the libraries: all
        # kept for the actor's life) takes them out of every later collection: about
        # 25 us less per image (bench_denoise.py --stages: 243-249 us -> 221-230 us).
        gc.freeze()

    def _probed(self, channels: int) -> ModelSpec:
        """The spec, checked by running the model on zeros: it must keep their shape. The
        probe is wider than the model's reach ("valid" convolutions restored by padding
        need more than a pixel), and its sides are an odd and an even multiple of
        `multiple`: a downsampling the config does not show (a strided slice) fails
        there, and the multiple is doubled until the model runs (each image of an odd
        side would fail otherwise).

        Raises:
            ValueError: the model does not keep the shape (or its own error).
        """
        spec, first = self.spec, None
        for multiple in (spec.multiple << i for i in range(5)):
            odd = -(-max(32, 2 * (spec.halo or 0)) // multiple) | 1
            side = spec.fixed_size or (multiple * odd, multiple * (odd + 1))
            probe = np.zeros((1, *side, channels), np.float32)
            try:
                got: Any = tuple(np.asarray(self._run(probe)).shape)
            except Exception as e:
                got = e
            if got == probe.shape:
                break
            first = first or (probe.shape, got)
            if spec.fixed_size:
                break
        if got != probe.shape:
            shape, got = first
            if isinstance(got, Exception):
                raise got
            raise ValueError(
                f"Model {spec.name} maps an input of shape {shape} to {got}: "
                "the denoise job needs a model whose output has its input's shape."
            )
        if multiple == spec.multiple:
            return spec
        print(
            f"denoise: note: model {spec.name} needs sides of a multiple of {multiple} "
            f"(found by running it), not {spec.multiple} as its file shows",
            file=sys.stderr,
        )
        halo = None if spec.halo is None else -(-spec.halo // multiple) * multiple
        return replace(spec, multiple=multiple, halo=halo)

    def predict(self, images: np.ndarray) -> np.ndarray:
        side = tile_side(self.spec.multiple)
        if self.spec.fixed_size or self.spec.halo is None or not side:
            return self._calls(images)
        return tiled(self._calls, images, side, self.spec.halo)

    def _calls(self, images: np.ndarray) -> np.ndarray:
        """The model on `images`, in calls of at most --batch-size images and of
        the device's call pixels. While a CPU actor has not chosen its call pixels,
        each call of `images` for which the candidates differ is one timed trial."""
        pixels, n = images.shape[1] * images.shape[2], len(images)
        shape = images.shape[:3]
        size, trial = self._call_pixels, None
        if size is None:
            candidates = self._sizer.candidates
            size = candidates[0]
            if len({min(n, self._step(c, pixels)) for c in candidates}) > 1:
                size = trial = self._sizer.next(shape)
        begin = time.perf_counter()
        out, i = [], 0
        while i < n:
            part = images[i : i + self._step(size, pixels)]
            try:
                out.append(np.asarray(self._run(part)))
            except Exception as e:
                if len(part) == 1 or not _out_of_memory(e):
                    raise
                # Device memory is short (actors sharing a GPU, big planes): this and
                # every later call of this actor take half as many pixels.
                size = self._call_pixels = len(part) * pixels // 2
                trial = None
                print(
                    f"denoise: out of device memory running {len(part)} planes of "
                    f"{images.shape[1]}x{images.shape[2]}; calls of {len(part) // 2} from now on",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            i += len(part)
        if trial is not None and self._call_pixels is None:
            self._sizer.record(shape, trial, time.perf_counter() - begin, n * pixels)
            self._call_pixels = self._sizer.chosen
            if self._call_pixels is not None:
                print(f"denoise: {self._sizer}", file=sys.stderr, flush=True)
        return np.concatenate(out)

    def _step(self, call_pixels: int, pixels: int) -> int:
        """Images per call of planes of `pixels` each."""
        return max(1, min(self.s.max_batch, call_pixels // pixels))

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Denoises one block: file paths, or Parquet row groups (file, index) to read here.
        An error that escapes the per-image handling (a bug) fails the block's inputs, with
        its traceback in the job's log, and the job goes on: Ray Data would stop the job
        at the first such block (or, as it goes past a block its actor died on, record
        its inputs as that: see _run_pipeline)."""
        try:
            return self._block(batch)
        except Exception as e:
            traceback.print_exc()
            error = f"{LOST} failed in its actor ({_reason(e)}; the traceback is in the log)"
            rows = [
                {"path": path, "status": "failed", "error": error, "node": self.node}
                for path in _item_paths(batch)
            ]
            table = pa.Table.from_pylist(rows, schema=_ROW_SCHEMA)
            if ITEM in batch:
                table = table.append_column(ITEM, pa.array(batch[ITEM], pa.int64()))
            return table

    def _block(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows: list[dict[str, Any]] = []
        if "row_group" in batch:
            groups = []  # the unit of each row
            pairs = zip(batch["path"], batch["row_group"], strict=True)
            for k, (source, group) in enumerate(pairs):
                got = self._parquet_group(str(source), int(group))
                rows.extend(got)
                groups += [k] * len(got)
        else:
            rels = [str(rel) for rel in batch["path"]]
            sizes = batch["bytes"].tolist() if "bytes" in batch else [None] * len(rels)
            entries = [(rel, None, size) for rel, size in zip(rels, sizes, strict=True)]
            for i in range(0, len(entries), self.s.max_batch):
                rows.extend(self._process(entries[i : i + self.s.max_batch]))
        for row in rows:
            row.update(node=self.node, device=self.device)
        table = pa.Table.from_pylist(rows, schema=_ROW_SCHEMA)
        if ITEM in batch:  # each row's item of the job's (see _run_pipeline)
            if "row_group" in batch:  # (a row group's rows in turn, at least one each)
                counts = np.bincount(np.asarray(groups, np.int64), minlength=len(batch[ITEM]))
                item = np.repeat(np.asarray(batch[ITEM], dtype=np.int64), counts)
            else:
                index = dict(zip(rels, batch[ITEM].tolist(), strict=True))
                item = np.array([index[row["path"]] for row in rows], dtype=np.int64)
            table = table.append_column(ITEM, pa.array(item, pa.int64()))
        return table

    def _parquet_group(self, source: str, group: int) -> list[dict[str, Any]]:
        path_column, image_column = self.s.extra["path_column"], self.s.extra["image_column"]
        try:
            located = _located(source)  # (one client: S3's may ask for the bucket's region)
            mtime = _mtime_ns(*located)
            parquet = _parquet_file(source, located)
            path_column = _path_column(parquet.schema_arrow, path_column, image_column)
            columns = {_top_column(parquet.schema_arrow, c) for c in (path_column, image_column)}
            table = parquet.read_row_group(group, columns=sorted(columns))
            paths = _parquet_values(table, path_column)
            images = _parquet_values(table, image_column)
        except Exception as e:  # a bad row group fails as one row naming it
            where = redacted(f"{source}#row_group={group}")
            error = redacted(f"cannot read: {_reason(e)}")
            return [{"path": where, "status": "failed", "error": error}]
        rows, pairs = [], []
        for i, (rel, payload) in enumerate(zip(paths, images, strict=True)):
            if isinstance(rel, bytes):  # a string column written without its UTF-8 tag
                try:
                    rel = rel.decode("utf-8")
                except UnicodeDecodeError:  # (taken as text, "caf\\xe9.png" was caf/xe9.png)
                    shown = rel.decode("utf-8", "backslashreplace")
                    error = f"its path (--path-column {path_column}) is not valid UTF-8"
                    rows.append({"path": shown, "status": "failed", "error": error})
                    continue
            if rel is None:  # named by its place, so the manifest still accounts for it
                where = redacted(f"{source}#row_group={group}#row={i}")
                error = (  # (Hugging Face's image.path is null for images made in memory)
                    f"its path (--path-column {path_column}) is null: each row needs a "
                    "relative output path (text, or a row number)"
                )
                rows.append({"path": where, "status": "failed", "error": error})
            else:
                pairs.append((rel, payload, len(payload) if payload is not None else None))
        step = self.s.max_batch
        for i in range(0, len(pairs), step):
            rows.extend(self._process(pairs[i : i + step], mtime))
        return rows

    def _process(
        self, items: list[tuple[str, bytes | None, int | None]], mtime: int | None = None
    ) -> list[dict]:
        """Reads (or takes) the images, denoises and writes them in groups of at most
        about GROUP_PIXELS (a whole block of digits at once); one row each.

        `items` are (path, bytes or None to read them, size in bytes if known). Files are
        read a step at a time, a step being as many as the group has room for judging by
        the images so far, and at most READ_BYTES of them; each one's pixels are then
        taken from its header before anything is decoded, so a group holds at most
        GROUP_PIXELS (or one image bigger than that), even when a block of icons goes
        on with photos. `mtime`: the modification time of the Parquet file of `items`.
        """
        rows: list[dict[str, Any]] = []
        ready: list[tuple[dict, str, bytes]] = []  # read, counted in `pixels`, not decoded
        pixels, done, per_image = 0, 0, 0
        step = min(len(items), self.s.io_threads)  # one each first: how big are they?
        while done < len(items):
            chunk, budget = [], 0
            for item in items[done : done + step]:
                budget += item[2] or 0
                if chunk and budget > READ_BYTES:
                    break
                chunk.append(item)
            done += len(chunk)
            sizes = []
            read = functools.partial(self._read, mtime=mtime)
            for row, out_rel, payload, size in self._parallel(read, chunk):
                if payload is None:
                    rows.append(row)
                    continue
                if ready and pixels + size > GROUP_PIXELS:
                    rows.extend(self._run_group(ready))
                    ready, pixels = [], 0
                ready.append((row, out_rel, payload))
                pixels += size
                sizes.append(size)
            per_image = max(1, max(sizes) if sizes else per_image)
            room = (GROUP_PIXELS - pixels) // per_image if pixels + per_image <= GROUP_PIXELS else 0
            step = max(1, min(len(items) - done, room or GROUP_PIXELS // per_image))
        rows.extend(self._run_group(ready))
        return rows

    def _run_group(self, ready: list[tuple[dict, str, bytes]]) -> list[dict[str, Any]]:
        """Decodes, denoises and writes one group; returns its rows."""
        rows, todo = [], []
        for row, item in self._parallel(self._decode, ready):
            rows.append(row)
            if item is not None:
                todo.append(item)
        if todo:
            self._denoise(todo)
            self._parallel(self._finish, todo)
        return rows

    def _parallel(self, fn, items: list) -> list:
        """[fn(x) for x in items], on the I/O threads: one contiguous slice per thread,
        so a block costs a few thread hand-offs, not one per image."""
        n = min(self.s.io_threads, len(items))
        if n <= 1:
            return [fn(x) for x in items]
        step = -(-len(items) // n)
        slices = [items[i : i + step] for i in range(0, len(items), step)]
        futures = [self._pool.submit(lambda part: [fn(x) for x in part], p) for p in slices]
        return [y for f in futures for y in f.result()]

    def _read(
        self, entry: tuple[str, bytes | None, int | None], mtime: int | None = None
    ) -> tuple[dict, Any, Any, int]:
        """Reads one input: (its row, its output path and bytes, or None for both if it is
        settled, its pixels as its header says: 0 if it has none, for _decode to say
        what is wrong). A Parquet row's input time is its file's (`mtime`): a row whose
        output exists is skipped only if its file has the time recorded, or none was (a
        file written again can keep each image's size)."""
        rel, payload = str(entry[0]), entry[1]
        row: dict[str, Any] = {"path": rel, "output": None, "status": "failed", "error": None}
        try:
            foreign = self.src is None
            out_rel = output_for(rel, self.s.fmt, foreign, self.s.extra.get("within"))
            clash = self.s.extra.get("clashes", {}).get(out_rel)
            if clash:  # (two rows' output, or the folder of other rows' outputs)
                raise ValueError(clash)
            if out_rel in self.s.extra.get("unowned", ()):  # (see _run_locked)
                raise ValueError(_kept_cut_reason(out_rel))
            if rel in self.s.extra.get("kept_for", ()) and self._exists(out_rel):
                raise ValueError(_kept_cut_reason(out_rel, whole=True))  # (still not ours)
            if self.src is not None:
                payload = self.src.read(rel)
            else:
                if payload is None:
                    raise ValueError("no image bytes in this row")
                # No record of the output: a DST this job never wrote (the outputs decide),
                # or a run that stopped before keeping the row of it (done again).
                mine = rel if self.s.extra.get("unrecorded", True) else None
                row["input_mtime_ns"] = mtime
                writer, size, then = self.s.extra.get("writers", {}).get(
                    out_rel, (mine, None, None)
                )
                same = size in (None, len(payload)) and then in (None, mtime)
                if writer == rel and same and self._exists(out_rel):
                    # Parquet resume: this row's output, complete, from these bytes.
                    row.update(status="skipped", output=out_rel, input_bytes=len(payload))
                    return row, None, None, 0
            row["input_bytes"] = len(payload)
        except Exception as e:  # loss-free: one bad file never stops the block
            row["error"] = _reason(e)
            return row, None, None, 0
        return row, out_rel, payload, header_pixels(payload)

    def _decode(self, entry: tuple[dict, str, bytes]) -> tuple[dict, dict | None]:
        """Decodes one input: (its row, the work item or None if it failed)."""
        row, out_rel, payload = entry
        rel = row["path"]
        try:
            array, maxval, info, alpha = decode(bytes(payload), self.s.rgb, self.s.max_pixels)
        except Exception as e:  # loss-free: one bad file never stops the block
            row["error"] = _reason(e)
            return row, None
        height, width, channels = array.shape  # (alpha set aside: counted, not denoised)
        row.update(width=width, height=height, channels=channels + (alpha is not None))
        if self.spec.fixed_size and (height, width) != self.spec.fixed_size:
            row["error"] = (
                f"image is {width}x{height} (width x height); model {self.spec.name} only "
                f"takes {self.spec.fixed_size[1]}x{self.spec.fixed_size[0]}"
            )
            return row, None
        out_fmt = SUFFIX_FORMAT[posixpath.splitext(out_rel)[1].lower()]
        item = dict(
            row=row, rel=rel, out_rel=out_rel, array=array, maxval=maxval, fmt=out_fmt, alpha=alpha
        )
        item["info"] = info
        return row, item

    def _exists(self, rel: str) -> bool:
        """Whether the output is there and complete (see existing_outputs)."""
        expected = self.s.extra.get("written", {}).get(rel)
        if self.out.local:
            path = self.out.full(rel)
            return os.path.isfile(path) and _complete(os.path.getsize(path), expected, path)
        import pyarrow.fs as pafs

        info = self.out.fs.get_file_info(self.out.full(rel))
        return info.type == pafs.FileType.File and _complete(info.size, expected, None)

    def _denoise(self, todo: list[dict[str, Any]]) -> None:
        """Runs the model once per (padded size, maxval) group; sets item["result"]."""
        m = self.spec.multiple
        model_c = self.spec.channels
        planes: dict[tuple[int, int, int], list[tuple[dict, int]]] = {}
        for item in todo:
            array = item["array"]
            h, w, c = array.shape
            ph, pw = -(-h // m) * m, -(-w // m) * m
            if model_c == c:
                planes.setdefault((ph, pw, item["maxval"]), []).append((item, -1))
            elif model_c == 1:  # RGB through a grayscale model: each channel alone
                for k in range(c):
                    planes.setdefault((ph, pw, item["maxval"]), []).append((item, k))
            else:  # grayscale through an RGB model: replicate, then average back
                planes.setdefault((ph, pw, item["maxval"]), []).append((item, -2))
            item["result"] = np.empty_like(array)
        for (ph, pw, maxval), members in planes.items():
            stack = np.empty((len(members), ph, pw, model_c), np.float32)
            for j, (item, k) in enumerate(members):
                a = item["array"]
                a = a[..., k : k + 1] if k >= 0 else a
                if k == -2:
                    a = np.repeat(a, model_c, axis=-1)
                h, w = a.shape[:2]
                stack[j, :h, :w] = a
                if ph > h or pw > w:  # edge padding: no dark border for the convs to see
                    stack[j, h:, :w] = a[-1:, :, :]
                    stack[j, :, w:] = stack[j, :, w - 1 : w]
            stack *= 1.0 / maxval
            try:
                out = self.predict(stack)
            except Exception as e:  # a failing group fails its images, not the job
                for item, _ in members:
                    item["error"] = f"model failed on a {ph}x{pw} batch: {_reason(e)}"
                continue
            scaled = np.clip(out, 0.0, 1.0) * maxval
            out = np.rint(scaled)
            for j, (item, k) in enumerate(members):
                h, w = item["array"].shape[:2]
                crop = out[j, :h, :w]
                dtype = item["array"].dtype
                if k >= 0:
                    item["result"][..., k] = crop[..., 0].astype(dtype)
                elif k == -2:  # (the mean of the channels' values, rounded once)
                    mean = scaled[j, :h, :w].mean(axis=-1)
                    item["result"][..., 0] = np.rint(mean).astype(dtype)
                else:
                    item["result"][...] = crop.astype(dtype)

    def _finish(self, item: dict[str, Any]) -> None:
        row = item["row"]
        if item.get("error"):
            row["error"] = item["error"]
            return
        result = item["result"]
        try:
            to_write = result
            if item["alpha"] is not None:
                to_write = np.concatenate([result, item["alpha"][..., None]], axis=-1)
            payload, changed = encode(
                to_write, item["fmt"], self.s.quality, item["info"], item["maxval"]
            )
            note = "; ".join(filter(None, [item["info"].get("note"), changed])) or None
            with self._write_lock:
                self.out.write_atomic(item["out_rel"], payload)
        except Exception as e:
            row["error"] = f"cannot write {item['out_rel']}: {_reason(e)}"
            return
        row.update(status="ok", output=item["out_rel"], error=note, output_bytes=len(payload))
        if self.clean is not None:
            try:
                # At the input's relative path as its output's is made of it: a Parquet
                # row's normalised ("sub\\a.png", "sub//a.png": sub/a.png, as written).
                ref = safe_relative(item["rel"], foreign=self.src is None)
                row.update(zip(_STAMPS, self.clean.stamp(ref), strict=True))  # (before the read)
                try:  # (which file: the reason named no reference, as if the input were bad)
                    reference = self.clean.read(ref)
                except FileNotFoundError:
                    raise ValueError(f"no clean reference {ref} in --clean") from None
                row["clean_crc32"] = zlib.crc32(reference)
                try:
                    clean, clean_max, tags, _ = decode(reference, self.s.rgb, self.s.max_pixels)
                except Exception as e:
                    raise ValueError(f"clean reference {ref}: {_reason(e)}") from e
                written = result
                # The metrics of the file as written, where it is not the result (lossy,
                # or changed to fit its format; decode's notes are of the input: a 16-bit
                # gray + alpha output read back came as 8 bits, black for 8-bit values).
                if item["fmt"] in LOSSY or changed:
                    written = self._read_back(payload, result, item["maxval"])
                noisy = item["array"]
                # Compared as shown where their EXIF orientations say so (_turned: a photo
                # and its reference exported upright got "no metrics" for their sizes, or,
                # square, metrics of rotated pixels).
                turn, back = orientation(item["info"]), orientation(tags)
                if _turned(turn, back, noisy.shape, clean.shape):
                    noisy, written = as_shown(noisy, turn), as_shown(written, turn)
                    clean = as_shown(clean, back)
                if clean.shape[2] == 3 and noisy.shape[2] == 1 and _gray_planes(clean):
                    # (gray saved as RGB, as WEBP and many tools do; lossy WEBP's planes
                    # differ by a level or two: their mean)
                    clean = np.rint(clean.mean(axis=-1, keepdims=True)).astype(clean.dtype)
                if clean.shape != noisy.shape:
                    why = f" (EXIF orientations {turn} and {back})" if turn != back else ""
                    raise ValueError(
                        f"clean reference is {clean.shape}, the input {noisy.shape}{why}"
                    )
                # Two 16-bit files on one scale, the wider: each is 8-bit values or not by
                # its own values (decode), and a noisy copy can pass 255 where its
                # reference does not.
                scale = item["maxval"]
                if clean.dtype == noisy.dtype == np.uint16:
                    scale = clean_max = max(clean_max, scale)
                row.update(_metrics(clean, clean_max, noisy, written, scale))
                if row["ssim"] is None:
                    row["error"] = "; ".join(filter(None, [note, f"no SSIM: {TOO_SMALL}"]))
            except Exception as e:
                row["error"] = "; ".join(filter(None, [note, f"{NO_METRICS}{_reason(e)}"]))

    def _read_back(self, payload: bytes, result: np.ndarray, maxval: int) -> np.ndarray:
        """An output as written (lossy, or changed to fit its format), on the scale and
        channels of the model's output."""
        back, back_max, _, _ = decode(payload, self.s.rgb, self.s.max_pixels)
        back = back[..., : result.shape[2]]  # WEBP stores a gray image as RGB
        if back.dtype != result.dtype:  # 16 bits written as 8 (a file as wide: as written)
            back = np.rint(back * (maxval / back_max))
        return back.astype(result.dtype)


class CallSizer:
    """Which of `candidates` (pixels per model call, the one using the least memory
    first) runs the model fastest here, found on the job's own first groups.

    Groups of one shape (images, height, width) take the candidates in turn, each one's
    first group of that shape a warm-up (a new call shape costs a compile), so that
    they are timed on the same work; once one shape has `trials` timed groups of each,
    the fastest by its best time per pixel is chosen, but the first is kept unless
    another is faster by more than `margin`. `chosen` is None until then; a group of a
    shape not seen before starts with the first candidate, so shapes that never come
    back run as with the first alone."""

    SHAPES = 64  # shapes tracked at most, for a dataset of ever new sizes

    def __init__(self, candidates: tuple[int, ...], trials: int = 2, margin: float = 0.05):
        self.candidates = candidates
        self.trials = trials
        self.margin = margin
        self.runs: dict[tuple, dict[int, list[float]]] = {}  # seconds per pixel
        self.costs: dict[int, float] = {}  # those of the shape that decided
        self.chosen = candidates[0] if len(candidates) == 1 else None

    def next(self, shape: tuple) -> int:
        """The candidate to time next on `shape`: the first of those timed least often."""
        if shape not in self.runs and len(self.runs) >= self.SHAPES:
            return self.candidates[0]  # not a trial: record() leaves it out
        runs = self.runs.setdefault(shape, {c: [] for c in self.candidates})
        return min(self.candidates, key=lambda c: len(runs[c]))

    def record(self, shape: tuple, candidate: int, seconds: float, pixels: int) -> None:
        runs = self.runs.get(shape)
        if runs is None or self.chosen is not None:
            return
        runs[candidate].append(seconds / pixels)
        if all(len(r) > self.trials for r in runs.values()):
            self.costs = {c: min(r[1:]) for c, r in runs.items()}
            best, first = min(self.candidates, key=self.costs.__getitem__), self.candidates[0]
            faster = self.costs[best] < (1 - self.margin) * self.costs[first]
            self.chosen = best if faster else first

    def __str__(self) -> str:
        if not self.costs:
            return f"model calls of {self.candidates} pixels: none chosen yet"
        timed = ", ".join(f"{c} pixels {self.costs[c] * 1e9:.0f}" for c in self.candidates)
        if self.chosen == min(self.candidates, key=self.costs.__getitem__):
            why = "are the fastest here"
        else:
            why = f"kept: the others are not {self.margin:.0%} faster here"
        return (
            f"model calls of up to {self.chosen} pixels {why} (ns per pixel, best of "
            f"{self.trials} groups each: {timed})"
        )


def tile_side(multiple: int, tile: int | None = None) -> int:
    """The largest tile side up to `tile` (TILE) on the model's pooling grid (a multiple
    of `multiple`: 1023 for a model that downsamples by 3); 0 if there is none."""
    tile = TILE if tile is None else tile
    return tile - tile % multiple


def tiled(
    predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, tile: int, halo: int
) -> np.ndarray:
    """predict(images), tile by tile when the planes are bigger than tile x tile: each
    tile goes in with up to `halo` real pixels on every side, cropped off after. The
    sides, `tile` and `halo` are multiples of the model's `multiple` (see tile_side), so
    its pooling grid lines up in every tile."""
    _, h, w, _ = images.shape
    if h * w <= tile * tile:
        return predict(images)
    out = np.empty(images.shape, np.float32)
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            y0, x0 = max(0, y - halo), max(0, x - halo)
            piece = predict(images[:, y0 : y + tile + halo, x0 : x + tile + halo])
            ty, tx = min(tile, h - y), min(tile, w - x)
            out[:, y : y + ty, x : x + tx] = piece[:, y - y0 : y - y0 + ty, x - x0 : x - x0 + tx]
    return out


def _load_model(keras, payload: bytes):
    """The model in a .keras file's bytes. Keras loads only from a path, so they go to
    a temp file named after this process, deleted after the load; a process killed in
    the load (an actor ended while it starts) cannot delete its own, so each load
    first deletes those of processes that no longer run."""
    folder = tempfile.gettempdir()
    for name in os.listdir(folder):
        pid = re.fullmatch(r"denoise-model-pid(\d+)-\w+\.keras", name)
        if pid and int(pid[1]) != os.getpid() and not _alive(int(pid[1])):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
    path = os.path.join(folder, f"denoise-model-pid{os.getpid()}-{uuid.uuid4().hex}.keras")
    with open(path, "wb") as f:
        f.write(payload)
    try:
        return keras.models.load_model(path, compile=False)
    finally:
        os.unlink(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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


def _backend_device(backend: str) -> str:
    """GPU if Keras's backend computes on a GPU in this process, else CPU."""
    if backend == "tensorflow":
        import tensorflow as tf

        return "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    if backend == "jax":
        import jax

        return "CPU" if jax.default_backend() == "cpu" else "GPU"
    if backend == "torch":
        import torch

        return "GPU" if torch.cuda.is_available() else "CPU"
    return "CPU"


def _hide_gpus_ray_did_not_give(backend: str) -> None:
    """In a Ray worker given no GPU (--gpus-per-worker 0), hides the node's GPUs from
    the backend, before it is imported. Ray sets CUDA_VISIBLE_DEVICES only for workers
    it gives GPUs, so the others see every GPU of their node: on an H200 node, 16
    actors asked with --gpus-per-worker 0 all ran their model on the GPU, which Ray
    counted as free for other work. Outside a Ray worker (a driver, tests, benchmarks
    that build a Denoiser in-process) nothing changes."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return
    if ray.get_gpu_ids():
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if backend == "jax":  # (else JAX logs that its CUDA plugin found no GPU)
        os.environ["JAX_PLATFORMS"] = "cpu"


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


def _located(source: str) -> tuple[Any, str]:
    """pyarrow's filesystem and path of a URI; None and the path of a local file."""
    return filesystem(source) if "://" in source else (None, source)


def _mtime_ns(fs, path: str) -> int | None:
    """A file's modification time, local or in an object store (None if not known)."""
    return fs.get_file_info(path).mtime_ns if fs is not None else os.stat(path).st_mtime_ns


def _parquet_file(source: str, located: tuple[Any, str] | None = None) -> pq.ParquetFile:
    fs, path = located or _located(source)
    return pq.ParquetFile(fs.open_input_file(path) if fs is not None else path)


def _out_of_memory(e: BaseException) -> bool:
    """TensorFlow's ResourceExhaustedError, XLA's RESOURCE_EXHAUSTED, PyTorch's
    OutOfMemoryError, or Python's MemoryError."""
    text = f"{type(e).__name__}: {e}"
    marks = ("ResourceExhausted", "RESOURCE_EXHAUSTED", "OutOfMemory", "OOM when")
    return (
        isinstance(e, MemoryError)
        or any(mark in text for mark in marks)
        or "out of memory" in text.lower()
    )


def redacted(text: str) -> str:
    """`text` with the secret of any URI's user info in it masked (s3://KEY:SECRET@b/x
    -> s3://KEY:***@b/x; a secret with a "/" too, which pyarrow's error messages show
    when it was not percent-encoded): what the manifest records or the job prints, not
    what it opens."""
    return re.sub(r"(://[^/@:\s]*):[^@\s]*@", r"\1:***@", text)  # (a ' too: S3's allow it)


def _reason(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if isinstance(e, ValueError) else f"{type(e).__name__}: {text}"


# ----------------------------------------------------------------------------
# The driver.


@dataclass
class Inputs:
    """What the driver found to do."""

    kind: str  # "files" or "parquet"
    # The folder listed: of file inputs, or of a folder or glob of Parquet files (None
    # for one Parquet file); check_locations keeps DST out of it.
    storage: Storage | None
    files: list[tuple[str, int]]  # (relative path, size in bytes) of file inputs
    parquet: list[str]  # Parquet file paths or URIs
    # images (by suffix) left out of a folder listing for a name starting with "."; other
    # hidden files (.DS_Store, macOS's ._x.png, make_noisy's record, .git/) go unsaid
    hidden: int = 0
    single: bool = False  # one file, named: `storage` is its folder, which is not listed
    # What the listing has to say (files left out, files taken as images), said once the
    # locations are checked: a refused run said first which files were "not inputs".
    notes: list[str] = field(default_factory=list)
    # Folders under `storage` that could hold inputs but could not be listed -> why:
    # each gets a failed row (file inputs) or a note (Parquet files).
    unlisted: dict[str, str] = field(default_factory=dict)


def _hidden(rel: str) -> bool:
    """.DS_Store, .git/..., editors' swap files: not images, as `*` in a glob says."""
    return any(part.startswith(".") for part in rel.split("/"))


def _parquet_name(path: str) -> bool:
    """Whether a path's name is a Parquet file's (.parquet, .pq, in any case)."""
    return path.lower().endswith(PARQUET_SUFFIXES)


def _in_dataset(rel: str) -> bool:
    """A file of a dataset folder, as pyarrow and Spark list one: not hidden, and
    nothing under a name starting with "_" (Spark's _temporary/ of a write in progress or
    cut short, whose rows repeat the committed files' rows; _metadata)."""
    return not _hidden(rel) and not any(part.startswith("_") for part in rel.split("/"))


def _table(rel: str) -> bool:
    """A Parquet file of a dataset folder (see _in_dataset)."""
    return _parquet_name(rel) and _in_dataset(rel)


def _not_inputs(location: str, tables: int, others: list[str], hint: str = "") -> list[str]:
    """The note of how many files of a folder read as Parquet are not inputs, naming one
    (none if there are none)."""
    if not others:
        return []
    return [
        f"--input {redacted(location)} is read as Parquet ({tables} file(s)); its "
        f"{len(others)} other file(s) (e.g. {others[0]}) are not inputs{hint}"
    ]


def _not_tables(location: str, tables: int, listed: list[tuple[str, int]]) -> list[str]:
    """The note of --input-format parquet on a folder (its other files were left out
    without a word; hidden ones and those under "_", as _table leaves out, are not
    counted)."""
    others = [rel for rel, _ in listed if not _parquet_name(rel) and _in_dataset(rel)]
    return _not_inputs(location, tables, others)


def _no_tables(location: str, listed: list[tuple[str, int]]) -> ValueError:
    """The error of a folder without Parquet files to read, naming those that _table
    leaves out for a name starting with "_" (all of a Spark write cut short)."""
    apart = [rel for rel, _ in listed if _parquet_name(rel) and not _hidden(rel)]
    why = (
        f" ({len(apart)} under names starting with '_', e.g. {apart[0]}, left out as pyarrow "
        "and Spark leave them out; a glob that names them takes them)"
        if apart
        else ""
    )
    return ValueError(f"--input {location}: no Parquet files found{why}.")


def _matching(files: list[tuple[str, int]], pattern: str) -> list[tuple[str, int]]:
    """A remote listing's files that `pattern` matches as a local glob (recursive=True)
    would: "*", "?" and "[...]" within one folder's name ("*/x" matches no "a/b/x"), a
    "**" folder for any folders, none too ("**/*.png" matches "x.png"); hidden files
    only where the pattern names them (glob's "*" skips a leading ".")."""
    dotted = _hidden(pattern)
    parts = pattern.split("/")
    return [
        (rel, n)
        for rel, n in files
        if _glob_match(rel.split("/"), parts) and (dotted or not _hidden(rel))
    ]


def _glob_match(names: list[str], parts: list[str]) -> bool:
    """Whether a path's names match a glob's parts, as glob.glob(recursive=True)."""
    if not parts:
        return not names
    if parts[0] == "**":
        return any(_glob_match(names[i:], parts[1:]) for i in range(len(names) + 1))
    return (
        bool(names)
        and fnmatch.fnmatchcase(names[0], parts[0])
        and _glob_match(names[1:], parts[1:])
    )


def find_inputs(location: str, input_format: str, output: str | None = None) -> Inputs:
    """Lists the inputs: a folder tree, a glob, or Parquet files; not those in the local
    folder `output` (a link in the input tree may lead there: each rerun would denoise
    the last run's outputs).

    Raises:
        ValueError: nothing there, or an unusable location.
    """
    location = location.removeprefix("file://")  # a local path, for glob and os.path
    has_glob = _is_glob(location)
    is_parquet = input_format == "parquet" or (
        input_format == "auto" and _parquet_name(split_query(location)[0])
    )
    local = output and _is_local(output)
    prune = os.path.realpath(output.removeprefix("file://")) if local else None
    if is_parquet:
        if "://" in location:  # a file, a folder (all its Parquet files) or a glob
            if has_glob:
                root, pattern = _glob_root(location)
                storage = Storage(root)
                entries = found = _matching(storage.walk(), pattern)
            else:
                storage = Storage(location)
                if not storage.is_dir():
                    return Inputs("parquet", None, [], [location])
                entries = storage.walk()
                found = [(rel, n) for rel, n in entries if _table(rel)]
            if not found:
                raise _no_tables(location, entries)
            notes = [] if has_glob else _not_tables(location, len(found), entries)
            uris = [storage.uri(rel) for rel, _ in found]
            return Inputs("parquet", storage, [], uris, notes=notes)
        if has_glob or os.path.isdir(location):
            root, pattern = _glob_root(location) if has_glob else (location, None)
            listed = Storage(root)
            entries = _listed(listed, pattern, prune)
            found = [listed.full(rel) for rel, _ in entries if has_glob or _table(rel)]
        else:
            listed, entries = None, []
            found = [location] if os.path.isfile(location) else []
        if not found:
            raise _no_tables(location, entries)
        notes = [] if has_glob else _not_tables(location, len(found), entries)
        unlisted = _unlisted(listed, pattern) if listed is not None else {}
        notes += _unlisted_note(location, unlisted)
        return Inputs("parquet", listed, [], found, notes=notes)
    pattern = None
    if has_glob:
        root, pattern = _glob_root(location)
        storage = Storage(root)
        files = _listed(storage, pattern, prune)
    else:
        storage = Storage(location)
        kind, size = storage.entry()
        if kind == "file":  # one file, named (not Parquet: that suffix is read as Parquet)
            return _one_file(storage, size)
        if kind != "dir":
            raise ValueError(
                f"--input {location} "
                + ("does not exist" if kind == "missing" else "is not a file, a folder or a glob")
                + ". Expected e.g. /data/noisy, '/data/**/*.png', /data/images.parquet "
                "or /data/x.png."
            )
        files = storage.walk(prune)
    shown = [(rel, n) for rel, n in files if not _hidden(rel)] if not has_glob else files
    if not shown:
        hidden = f" (only {len(files)} hidden ones)" if files else ""
        if has_glob:  # (one naming folders said only this)
            hidden += (
                "; a glob takes the files it names, not those inside the folders it names "
                "('DIR/**/*' takes every file under DIR)"
            )
        raise ValueError(f"--input {location}: no files found{hidden}.")
    notes = []
    if input_format == "auto":
        # Parquet files and no image files (a Hugging Face dataset's folder: its README,
        # data/*.parquet): the Parquet files' rows are the inputs.
        # (a glob takes what it names, as in --input-format parquet: _temporary/ too)
        tables = [rel for rel, _ in shown if _parquet_name(rel) and (has_glob or _table(rel))]
        others = [rel for rel, _ in shown if not _parquet_name(rel)]
        images = any(_image_name(rel) for rel in others)
        if not tables and not images and len(others) < len(shown):  # (all under "_")
            raise _no_tables(location, shown)
        if tables and not images:
            hint = " (--input-format files takes every file as an image)"
            notes = _not_inputs(location, len(tables), others, hint)
            uris = [storage.uri(rel) for rel in tables]
            return Inputs("parquet", storage, [], uris, notes=notes)
        if tables:  # (a dataset repository with a sample image for its card, say)
            notes.append(
                f"--input {redacted(location)} holds image files, so its {len(tables)} "
                f"Parquet file(s) (e.g. {tables[0]}) are taken as images, and fail "
                "(--input-format parquet reads their rows instead)"
            )
    if storage.loops:  # (left out without a word before)
        loops = sorted(storage.loops)
        many = len(loops) > 1
        links = (
            f"{len(loops)} links to a folder above them" if many else "1 link to a folder above it"
        )
        notes.append(
            f"--input {redacted(location)}: {links} not followed, as a loop (e.g. {loops[0]}, to "
            f"{os.path.realpath(storage.full(loops[0]))})"
        )
    unlisted = _unlisted(storage, pattern)  # (each a failed row: no note)
    hidden = 0 if has_glob else sum(1 for rel, _ in files if _hidden_image(rel))
    return Inputs("files", storage, shown, [], hidden=hidden, notes=notes, unlisted=unlisted)


def _unlisted(storage: Storage, pattern: str | None) -> dict[str, str]:
    """The folders the listing of `storage` could not list that could hold inputs: those
    the glob `pattern` reaches into (all, for None), hidden ones only where it names them."""
    parts = (pattern or "**/*").split("/")
    dotted = pattern is not None and _hidden(pattern)
    return {
        rel: why
        for rel, why in sorted(storage.unlisted.items())
        if (dotted or not _hidden(rel))
        and any(_glob_match(rel.split("/"), parts[:k]) for k in range(1, len(parts)))
    }


def _unlisted_note(location: str, unlisted: dict[str, str]) -> list[str]:
    """The note for Parquet inputs, whose rows are the inputs: a folder gets no row."""
    if not unlisted:
        return []
    first, why = next(iter(unlisted.items()))
    many, them = (f"{len(unlisted)} folders", "them") if len(unlisted) > 1 else ("1 folder", "it")
    return [
        f"--input {redacted(location)}: {many} could not be listed (e.g. {first}: {why}); "
        f"the Parquet files in {them} are not read in this run"
    ]


def _one_file(storage: Storage, size: int) -> Inputs:
    """An --input naming one file of `size` bytes: the folder it is in, with that file
    alone (named, so a hidden one too)."""
    if storage.local:
        folder, name = os.path.split(storage.root)
    else:
        path, query = split_query(storage.location)
        folder = path.rstrip("/").rsplit("/", 1)[0] + query
        name = storage.root.rsplit("/", 1)[-1]
    listed = Storage(folder)
    if storage.mtime_ns:
        listed.mtimes[name] = storage.mtime_ns
    return Inputs("files", listed, [(name, size)], [], single=True)


def _hidden_image(rel: str) -> bool:
    """A hidden file named as an image, which a user may have meant as an input: not
    macOS's AppleDouble `._x.png` beside each copied file (metadata, no image)."""
    return _hidden(rel) and _image_name(rel) and not posixpath.basename(rel).startswith("._")


def _image_name(rel: str) -> bool:
    """Whether a file's suffix is one Pillow reads (.png, .jpg, .tif, ...)."""
    from PIL import Image

    return posixpath.splitext(rel)[1].lower() in Image.registered_extensions()


def _is_glob(location: str) -> bool:
    """Whether `location` has wildcards (an existing local file or folder is taken as it
    is, even with "[" in its name)."""
    exists = "://" not in location and os.path.exists(location)
    path = split_query(location)[0]
    return any(ch in path for ch in GLOB_CHARS) and not exists


def _inside(real: str, folder: str) -> bool:
    return real == folder or real.startswith(folder.rstrip("/") + "/")


def _linked_into(real: str, prune: str | None, tree: str) -> bool:
    """Whether a real folder is `prune` or below it while outside `tree`, the input's
    own real root (an input tree may sit inside the output folder; a link from it into
    the outputs is what must not be followed)."""
    return prune is not None and _inside(real, prune) and not _inside(real, tree)


def _listed(
    storage: Storage, pattern: str | None, prune: str | None = None
) -> list[tuple[str, int]]:
    """The files under `storage` that the glob `pattern` (None: every file) matches, as
    glob.glob(recursive=True) would, listed by Storage.walk: a link loop ends, and no
    link into `prune` (the real output folder) is followed (glob.glob followed both: a
    link to its own folder gave one image 41 times, and two of them never ended). No
    folder deeper than the pattern reaches is listed."""
    if pattern is None:
        return storage.walk(prune)
    parts = pattern.split("/")
    depth = None if "**" in parts or not storage.local else len(parts) - 1
    return _matching(storage.walk(prune, depth), pattern)


def _parents(rel: str) -> list[str]:
    """The folders of a relative POSIX path: "a/b/c.png" -> ["a", "a/b"]."""
    parts = rel.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _file_kind(mode: int) -> str:
    """What a file that is not a regular one is, for a message."""
    kinds = (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    )
    return next((name for test, name in kinds if test(mode)), "not a file")


def _glob_root(location: str) -> tuple[str, str]:
    """A glob's folder before its first wildcard (with a URI's query), and the pattern
    under it."""
    location, query = split_query(location)
    cut = min(location.index(ch) for ch in GLOB_CHARS if ch in location)
    if "/" in location[:cut]:
        root = location[:cut].rsplit("/", 1)[0] or "/"
        return root + query, location[len(root) :].lstrip("/")
    return ".", location  # "*.png", "scans*/**/*.png": relative to the working folder


def check_locations(
    source: Inputs, location: str, output: Storage, clean: Storage | None = None
) -> None:
    """DST may not be SRC or inside it: the job would list its own outputs (and its
    manifest, in a folder of Parquet files) as inputs. Nor may DST and --clean overlap:
    the references would count as finished outputs, and outputs would land among them.
    Nor may --clean be SRC's folder: every input would be its own reference.

    Raises:
        ValueError: naming the two flags.
    """
    if output.local and os.path.exists(output.root) and not os.path.isdir(output.root):
        raise ValueError(f"--output {output.location} is a file; expected a folder.")
    if not output.local:  # (an object: outputs went to keys under it, and no rerun
        try:  # found them: it is no folder to list)
            kind = output.entry()[0]
        except OSError as e:  # (said here: the lease's request would wait out its retries again)
            raise ValueError(f"--output {output.location}: cannot reach it ({e}).") from e
        if kind == "file":
            raise ValueError(
                f"--output {output.location} is an object (a file); expected a folder."
            )
    src = source.storage  # a folder or glob of Parquet files too (DST's manifest with it)
    location = location.removeprefix("file://")
    nesting = _nested(src, output) if src is not None else None
    if source.single and nesting == "same":
        raise ValueError(
            f"--output {output.location} is the folder of --input {location}: its output "
            "would replace it. Choose another output folder."
        )
    if nesting in ("same", "inside") and not source.single:  # (one file: nothing listed)
        where = "--input" if nesting == "same" else "inside --input"
        raise ValueError(
            f"--output {output.location} is {where} {location}: choose an output folder "
            "outside the input tree."
        )
    if clean is not None and _nested(clean, output):
        raise ValueError(
            f"--output {output.location} and --clean {clean.location} overlap: the "
            "references would be taken for finished outputs. Choose separate folders."
        )
    if clean is not None and src is not None and _nested(src, clean) == "same":
        raise ValueError(  # (every input its own reference: PSNR inf, left out of the means)
            f"--clean {clean.location} is the folder of --input {location}: each input "
            "would be its own reference. Give the folder of the clean images."
        )


def _nested(outer: Storage, inner: Storage) -> str | None:
    """How `inner` sits against `outer`: "same", "inside", "contains" or None."""
    if outer.local != inner.local:
        return None
    a, b = outer.root, inner.root
    if outer.local:
        a, b = os.path.realpath(a), os.path.realpath(b)
    if a == b:
        return "same"
    if b.startswith(a.rstrip("/") + "/"):
        return "inside"
    if a.startswith(b.rstrip("/") + "/"):
        return "contains"
    return None


@dataclass
class SourceFolder:
    """The input folder, for the outputs to stay out of: it may be inside DST (--input
    data/noisy --output data, an allowed layout), or be reached from DST through a link
    (data/noisy -> /disk2/noisy). Locally, an output path is in it if its real path is;
    in an object store, if its key is below the folder's."""

    output_root: str
    real: str  # the input folder's real path, or its remote root
    local: bool
    shown: str  # as the user gave it
    _folders: dict[str, str] = field(default_factory=dict)  # DST folder -> its real path

    @classmethod
    def of(cls, inputs: Inputs, output: Storage) -> SourceFolder | None:
        src = inputs.storage  # (None for one Parquet file: rows do not write beside it)
        if src is None or src.local != output.local or _nested(src, output) in ("same", "inside"):
            return None  # (DST in SRC: refused, or the folder of one input file)
        real = os.path.realpath(src.root) if src.local else src.root
        return cls(output.root, real, src.local, redacted(src.location))

    def holds(self, out_rel: str) -> bool:
        if not self.local:
            return _inside(f"{self.output_root}/{out_rel}", self.real)
        folder, name = posixpath.split(out_rel)
        real = self._folders.get(folder)
        if real is None:  # (one realpath a folder, not a file)
            real = self._folders[folder] = os.path.realpath(os.path.join(self.output_root, folder))
        return _inside(os.path.join(real, name), self.real)


def existing_outputs(
    output: Storage, written: dict[str, int], within: SourceFolder | None = None
) -> tuple[set[str], set[str]]:
    """Completed outputs under DST, and the files there that are cut short (or not
    images); stale temp files of a crashed run are removed.

    The job renames each output into place whole, but DST may have been copied or
    damaged since: an output whose size is not the one an earlier run's row says it
    wrote (`written`, see previous_writers) is not complete, and is done again; one
    without such a row (a manifest of an older version of the job, or none) is checked
    by its contents instead, if it is a local PNG, JPEG, BMP or WEBP (its end, or the
    size its header declares). The files of the input folder (`within`: in DST, or
    reached from it through a link) are inputs, not outputs. Where DST holds no record
    that this job wrote it, a file cut short is not one of its outputs (it writes each
    whole, then renames it): it may be another dataset's, and is not overwritten (see
    `unowned` in _run_locked)."""
    if not output.is_dir():
        return set(), set()
    done, cut = set(), []
    for rel, size in output.walk():
        if within is not None and within.holds(rel):
            continue
        if rel.endswith(TMP_MARK):
            try:
                output.remove(rel)
            except OSError:
                pass
        elif size > 0 and rel not in (MANIFEST, WRITERS, LOCK) and not _journal_name(rel):
            if not _complete(size, written.get(rel), output.full(rel) if output.local else None):
                cut.append(rel)
            else:
                done.add(rel)
    return done, set(cut)


def _folder_clash_reason(out_rel: str) -> str:
    """Why an input fails whose output is the folder of other inputs' outputs (a.png
    beside a.png/b.png: one of them could not be written)."""
    return f"its output {out_rel} is also the folder of other outputs ({out_rel}/...)"


def _kept_cut_reason(out_rel: str, whole: bool = False) -> str:
    """Why an input fails for the file at its output path (see `unowned` in _run_locked).
    `whole`: the file is complete now (a copy that was under way, say), yet still not
    this job's output: an earlier run kept it, cut short, for another dataset's."""
    if whole:
        return (
            f"{KEPT_CUT} {out_rel} was already in --output with no record that this job "
            "wrote it (an earlier run found it cut short or not an image; remove it to "
            "denoise this input)"
        )
    return (
        f"{KEPT_CUT} {out_rel} was already in --output, cut short or not an image, with no "
        "record that this job wrote it (remove it to denoise this input)"
    )


def _note_cut(location: str, redone: list[str], kept: list[str]) -> None:
    """The notes of the files cut short at output paths: done again, or kept (not this
    job's: see `unowned` in _run_locked)."""
    where = redacted(location)
    if redone:
        n = len(redone)
        what, wrote, done = (
            ("1 output", "is not as this job wrote it", "it is")
            if n == 1
            else (f"{n} outputs", "are not as this job wrote them", "they are")
        )
        print(
            f"denoise: note: {what} in {where} {wrote}, cut short or changed since (e.g. "
            f"{redone[0]}): {done} done again",
            file=sys.stderr,
        )
    if kept:
        print(
            f"denoise: warning: {len(kept)} file(s) in {where} at output paths are cut short "
            f"or not images (e.g. {kept[0]}), with no record that this job wrote them: they "
            "may be another dataset's, so they are not overwritten and their inputs fail "
            "(remove them to have them done)",
            file=sys.stderr,
        )


def previous_writers(output: Storage, before: dict[str, dict[str, Any]]) -> dict[str, tuple]:
    """Output -> (the input that wrote it, the output's size, the input's size and
    modification time then): the record the last finished run kept (WRITERS), updated
    by the earlier rows (`before`: that run's manifest and the journals of runs stopped
    since). The input's time is the output's own, where the input's last row may be of
    another output (another --format since) or a failure."""
    writers: dict[str, tuple] = {}
    try:
        table = pq.read_table(io.BytesIO(output.read(WRITERS)))
        for row in table.to_pylist():  # (input_mtime_ns: not in a record of before it)
            record = (row["input"], row["output_bytes"], row["input_bytes"])
            writers[row["output"]] = (*record, row.get("input_mtime_ns"))
    except Exception:  # none yet (a first run, an older version's DST) or unreadable
        pass
    for rel, row in before.items():
        if row.get("output") and row.get("status") != "failed":
            sizes = (row.get("output_bytes"), row.get("input_bytes"))
            _record(writers, row["output"], rel, *sizes, row.get("input_mtime_ns"))
    return writers


def _output_time(record: tuple, last: dict) -> int | None:
    """The modification time of the input its output was made from: the record's
    (WRITERS), else, for a record of before it kept one, the input's last row's."""
    if len(record) > 3 and record[3] is not None:
        return record[3]
    return last.get("input_mtime_ns")


def _record(
    writers: dict,
    out: str,
    rel: str,
    size: int | None,
    input_size: int | None,
    mtime: int | None = None,
):
    """Records `rel` as the writer of `out`; a size or time not known now (a `skipped`
    row of an output written under another --format) is kept from the record of the
    same input."""
    old = writers.get(out)
    if old is not None and old[0] == rel:
        size = old[1] if size is None else size
        input_size = old[2] if input_size is None else input_size
        mtime = _output_time(old, {}) if mtime is None else mtime
    writers[out] = (rel, size, input_size, mtime)


def _complete(size: int, expected: int | None, path: str | None) -> bool:
    """Whether an existing output is whole: the size written if a row says it, else
    (a local file) what its format's end says."""
    if expected is not None:
        return size == expected
    return path is None or _whole(path, size)


def _whole(path: str, size: int) -> bool:
    """Whether a local image file ends as its format says (PNG's IEND chunk, JPEG's
    end-of-image marker) or has the size its header says (BMP, WEBP); other files, and
    files that cannot be read now, count as whole."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".png", ".jpg", ".jpeg", ".bmp", ".webp"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            f.seek(max(0, size - 12))
            tail = f.read(12)
    except OSError:
        return True
    if suffix == ".png":
        return tail == b"\x00\x00\x00\x00IEND\xaeB`\x82"
    if suffix in (".jpg", ".jpeg"):
        return tail.endswith(b"\xff\xd9")
    if suffix == ".bmp":
        return head[:2] != b"BM" or struct.unpack("<I", head[2:6])[0] == size
    return head[:4] != b"RIFF" or struct.unpack("<I", head[4:8])[0] + 8 == size


def previous_rows(
    output: Storage, clean: str | None = None
) -> tuple[dict[str, dict[str, Any]], list[dict], list[str]]:
    """The rows of earlier runs by input path (to carry sizes and metrics into
    `skipped` rows): the last manifest's, updated by the journals of runs that stopped
    before writing theirs (killed, crashed, interrupted), in the order the runs
    started (the `run` number in their metadata; file times can be reset by a copy).
    Also the metadata (settings) of each, and the journals' names (removed once this
    run's manifest holds their rows). One table is in memory at a time (but the parts
    of a journal in an object store, read at once). The PSNR/SSIM of a run that
    measured against other references than this run's `clean` (its --clean; None for
    none: then the last run's) are dropped: they are not this run's to carry."""
    sources: list[tuple[int, int, Callable[[], pa.Table | None]]] = []
    manifest = _read_manifest(output)
    if manifest is not None:
        schema, data = manifest
        sources.append((_run_number(schema), 0, lambda: pq.read_table(io.BytesIO(data))))
    journals = _journals(output)
    if output.local:
        for name in journals:
            path = output.full(name)
            try:
                with _open_journal(output, name) as f:
                    run = _run_number(pa.ipc.open_stream(f).schema)
            except (pa.ArrowException, OSError):  # killed before the schema was written
                continue
            sources.append((run, os.stat(path).st_mtime_ns, partial(read_journal, output, name)))
    else:  # parts in an object store: many and small, so each is read once, many at once
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(REMOTE_IO_THREADS) as pool:
            for part in pool.map(partial(read_journal, output), journals):
                # A part holds rows of other inputs than the run's other parts: their
                # order within a run does not matter.
                if part is not None:
                    sources.append((_run_number(part.schema), 0, lambda part=part: part))
    rows: dict[str, dict[str, Any]] = {}
    metas = []
    for _, _, load in sorted(sources, key=lambda source: source[:2]):
        try:
            table = load()
        except Exception:  # a manifest whose schema reads but whose data does not
            continue
        names = [c for c in _COLUMNS if table is not None and c in table.schema.names]
        if not {"path", "status"} <= set(names):
            continue  # another job's layout: its rows are not carried
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        metas.append(meta)
        place = _place(meta.get("clean", ""))  # whose metrics (below)
        for row in table.select(names).to_pylist():  # a later run's row goes last, so
            row["_clean"] = place
            rows.pop(row["path"], None)  # output -> input maps built from these favour it
            rows[row["path"]] = row
        del table
    # The references the carried metrics must have been measured against: this run's,
    # or without --clean the last run's. "" (a run without --clean, or from before the
    # job recorded which references its carried metrics had) is not known to differ.
    target = (
        _place(clean) if clean is not None else _place(metas[-1].get("clean", "") if metas else "")
    )
    for row in rows.values():
        if target and row["_clean"] and row["_clean"] != target:
            row.update(
                dict.fromkeys((k for k in (*_METRICS, *_REFERENCE_COLUMNS) if k in row), None)
            )
            if row.get("error") and row.get("status") != "failed":  # (and what it said of them)
                row["error"] = _without_metric_note(row["error"])
        del row["_clean"]
    return rows, metas, journals


def _read_manifest(output: Storage) -> tuple[pa.Schema, bytes] | None:
    """DST's manifest: its schema and bytes; None if there is none yet. A file there that is
    not one of this job's manifests (another tool's table, a folder, bytes that are not
    Parquet) is refused: the job would write its manifest over it, at the end. One that
    cannot be read (no permission, a network error) is refused as such: it may be this
    job's, and resuming without it would write a manifest of this run alone over it."""
    try:
        data = output.read(MANIFEST)
    except FileNotFoundError:
        return None
    except NotAFile as e:  # say a folder
        why = f"not a regular file but {e.kind}"
    except OSError as e:  # it may well be this job's: say so, not to move or remove it
        raise ValueError(
            f"--output {redacted(output.location)}: cannot read its {MANIFEST} ({e}); "
            "nothing was done: run again once it can be read"
        ) from e
    else:
        try:
            schema = pq.read_schema(io.BytesIO(data))
        except Exception as e:
            why = f"not a Parquet file: {e}"
        else:
            if {"path", "status"} <= set(schema.names):
                return schema, data
            why = "a table without the path and status columns of this job's manifests"
    raise ValueError(
        f"--output {redacted(output.location)} holds a {MANIFEST} that is not this job's "
        f"manifest ({why}); the job would write its own over it: move it away, or give "
        "another --output (if it is this job's, damaged, remove it: a rerun then resumes "
        "from the outputs)"
    )


def _without_metric_note(note: str) -> str | None:
    """An output's note without its last part, if that says why it has no metrics (see
    Denoiser._finish; an earlier run's mark is kept)."""
    earlier = EARLIER * note.startswith(EARLIER)
    for marker in ("no SSIM: ", NO_METRICS):
        head, found, _ = note.removeprefix(earlier).partition(marker)
        if found and (not head or head.endswith("; ")):
            head = head.removesuffix("; ")
            return earlier + head if head else None
    return note


def _place(location: str) -> str:
    """A location as recorded in a manifest, comparable with another: a local path made
    absolute (one recorded relative, by an older version of the job, from the working
    folder, as a rerun of the same command would) and real (a link to the folder is the
    folder: taken for another --clean, it cost the outputs' metrics), a URI without its
    user info, query or trailing "/"."""
    if not location:
        return ""
    if _is_local(location):
        return os.path.realpath(os.path.expanduser(location.removeprefix("file://")))
    path, _ = split_query(location)
    scheme, _, rest = path.partition("://")
    return f"{scheme.lower()}://{rest.rpartition('@')[2]}".rstrip("/")


def _run_number(schema: pa.Schema) -> int:
    try:
        return int((schema.metadata or {}).get(b"run", b"0"))
    except ValueError:
        return 0


def _journals(output: Storage) -> list[str]:
    """Journals left in DST by runs that did not finish."""
    if not output.local:
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(output.full(JOURNAL_PARTS), allow_not_found=True)
        infos = output.fs.get_file_info(selector)
        names = (i.base_name for i in infos if i.type == pafs.FileType.File)
        return sorted(f"{JOURNAL_PARTS}/{name}" for name in names if JOURNAL.fullmatch(name))
    if not output.is_dir():
        return []
    with os.scandir(output.root) as it:
        return sorted(e.name for e in it if JOURNAL.fullmatch(e.name) and e.is_file())


def _journal_name(rel: str) -> bool:
    """Whether a file in DST is a journal: a local one, or a part in an object store."""
    folder, _, name = rel.rpartition("/")
    return folder in ("", JOURNAL_PARTS) and bool(JOURNAL.fullmatch(name))


def _open_journal(output: Storage, name: str) -> pa.NativeFile:
    path = output.full(name)
    return pa.OSFile(path, "rb") if output.local else output.fs.open_input_stream(path)


def _skipped_row(rel: str, out_rel: str, size: int | None, last: dict) -> dict[str, Any]:
    """The row of an input whose output exists, with the earlier run's sizes and input
    metrics, and its output metrics only if that run wrote this same output (not, say,
    the .webp of an earlier --format)."""
    same = last.get("output") == out_rel
    row = {k: last.get(k) if same or k in _INPUT_COLUMNS else None for k in _COLUMNS}
    # Its note too ("alpha dropped: ..."): the output is still the one it describes.
    note = _earlier(last.get("error")) if same and last.get("status") != "failed" else None
    row.update(path=rel, output=out_rel, status="skipped", error=note)
    row["input_bytes"] = size if size is not None else row.get("input_bytes")
    return row


def _earlier(error: str | None) -> str | None:
    """An earlier run's error or note, carried into this run's row: marked as such."""
    return error and f"{EARLIER}{error.removeprefix(EARLIER)}"


def read_journal(output: Storage, name: str) -> pa.Table | None:
    """Every whole block of a journal: a crash cuts it anywhere, the part before stays."""
    batches = []
    try:
        with _open_journal(output, name) as f:
            reader = pa.ipc.open_stream(f)
            schema = reader.schema
            while True:
                try:
                    batches.append(reader.read_next_batch())
                except StopIteration:
                    break
                except (pa.ArrowException, OSError):  # the block the crash cut short
                    break
    except (pa.ArrowException, OSError):  # killed before the schema was written
        return None
    return pa.Table.from_batches(batches, schema=schema)


@dataclass
class Hold:
    """This run's hold on DST (one_run_at_a_time). `stopped_before`: a run killed after
    its actors had started left its lock (or lease) marked so; then an output in DST
    without a row is that run's (see _plan). `mark_started`: marks this run's, when its
    actors start. A run that finds a marked one keeps the mark until it ends: if it is
    killed in turn before its own actors start, the record is not lost. `keep_mark`: set
    by a run that failed after its actors started without its journal reaching the disk
    (a full one): its marked lock stays, as a killed run's, to be that record."""

    stopped_before: bool = False
    mark_started: Callable[[], None] = lambda: None
    keep_mark: bool = False


STARTED_MARK = b"; actors started"  # in a local LOCK (in a lease: "started": true)


@contextlib.contextmanager
def one_run_at_a_time(output: Storage, flag: str):
    """Keeps a second run of the job off a local DST while this one writes there.

    Two runs at once would each carry over the rows they read at their start, so the
    one ending last would write a manifest without the other's rows, and the first to
    end would remove the other's live journal (taking it for a crashed run's), losing
    its manifest. The lock is the kernel's (flock on DST/LOCK), so it ends with the
    process however it ends: a crash or a kill leaves nothing to clear by hand. The
    file names the holder, for the second run's message, and goes at the end. On an
    object store, which has no locks, DST/LOCK is a lease instead (see _lease).

    Yields a Hold: whether a run that stopped without ending (killed, its machine lost)
    after its actors had started left its lock or lease there, and what to call when
    this run's actors start.

    Raises:
        ValueError: naming DST and the run that holds it.
    """
    if not output.local:
        with _lease(output, flag) as hold:
            yield hold
        return
    import fcntl
    import socket

    path = output.full(LOCK)
    try:  # a lock file left there is a killed run's (one that ends removes its own)
        with open(path, "rb") as f:
            stopped_before = STARTED_MARK in f.read(512)
    except OSError:
        stopped_before = False
    # A broken link as --output or above it (makedirs said "File exists" or "No such file").
    link = output.root
    while not os.path.exists(link) and link != os.path.dirname(link):
        if os.path.islink(link):
            where = "" if link == output.root else f"its folder {link} is "
            target = os.readlink(link)
            raise ValueError(f"--output {flag}: {where}a link to {target}, which does not exist")
        link = os.path.dirname(link)
    fd = None
    made = _missing_folders(output.root)  # (removed again if this run leaves them empty)
    try:
        os.makedirs(output.root, exist_ok=True)
        for _ in range(100):  # a file that is not the one locked: the run before removed it
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
                raise ValueError(
                    f"--output {flag}: another run of this job is writing there "
                    f"({holder or 'starting'}); wait for it to end, or give another --output"
                ) from None
            except OSError as e:  # a file system without locks (some network mounts)
                lockless = e
                break
            try:
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    lockless = None
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
            fd = None
        else:  # (inode numbers that do not hold still, as on some network mounts)
            lockless = OSError(f"{path} is another file each time it is opened")
        if lockless is None:
            since = time.strftime("%Y-%m-%d %H:%M:%S %Z")
            line = f"pid {os.getpid()} on {socket.gethostname()}, since {since}".encode()
            os.ftruncate(fd, 0)
            # (a killed run's mark is kept until this run ends: see Hold)
            os.write(fd, line + (STARTED_MARK if stopped_before else b"") + b"\n")
    except BaseException as e:
        if fd is not None:
            if not isinstance(e, ValueError):  # ours, still held: nobody else has it
                with contextlib.suppress(OSError):
                    os.unlink(path)
            os.close(fd)
        _remove_empty(made)
        if isinstance(e, OSError):  # a read-only or full DST: say so before any work
            raise ValueError(f"--output {flag}: cannot write there ({e})") from e
        raise
    if lockless is not None:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(fd)
            fd = None
        print(
            f"denoise: note: cannot lock {path} ({lockless}): nothing stops a second run "
            "from writing to this --output at the same time",
            file=sys.stderr,
        )

    def mark_started() -> None:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, line + STARTED_MARK + b"\n", 0)

    refused = False
    hold = Hold(stopped_before, mark_started)
    try:
        yield hold
    except BaseException:
        refused = True
        raise
    finally:  # removed while still held, so no run can lock the file and then lose it
        if refused and made and _only_journals(output.root):
            # A DST this run made, in which it wrote no output (its actors refused the
            # model, say): its journal records nothing, and the folder goes too.
            hold.keep_mark = False
            for name in _journals(output):
                with contextlib.suppress(OSError):
                    os.unlink(output.full(name))
        if fd is not None:
            if not hold.keep_mark:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            os.close(fd)
        if refused:  # refused (or stopped) before it wrote anything: no empty --output
            _remove_empty(made)


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _only_journals(folder: str) -> bool:
    """Whether `folder` holds journals (and the lock) only: no output, nor a temp file."""
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return all(name == LOCK or JOURNAL.fullmatch(name) for name in names)


def _missing_folders(path: str) -> list[str]:
    """`path` and those of its parents that do not exist yet, deepest first."""
    missing, folder = [], os.path.abspath(path)
    while not os.path.lexists(folder):
        missing.append(folder)
        if os.path.dirname(folder) == folder:
            break
        folder = os.path.dirname(folder)
    return missing


def _remove_empty(folders: list[str]) -> None:
    """Removes the folders, deepest first, while they are empty (rmdir takes no other)."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            break


# A run on an object store renews its lease on DST (DST/LOCK) every LEASE_SECONDS / 4;
# one not renewed for LEASE_SECONDS is taken for a run that stopped without ending.
LEASE_SECONDS = 60


@contextlib.contextmanager
def _lease(output: Storage, flag: str):
    """One run at a time on an object store: DST/LOCK names the run writing there and
    when it was last seen, rewritten every LEASE_SECONDS / 4 by a thread of the driver
    and removed at the end. A run finding a lease renewed less than LEASE_SECONDS ago
    stops; an older one (a run killed, or its machine lost) is taken over, with a note.
    A store cannot create an object only if it is absent (not through pyarrow), so two
    runs could both take a free DST; each reads the lease back after writing it, and
    the one whose lease is not there stops, which leaves only runs started within the
    same few requests of each other. Times are each machine's clock.

    Raises:
        ValueError: naming DST and the run that holds it, or that DST cannot be written.
    """
    import socket

    path, fs = output.full(LOCK), output.fs

    def held() -> dict | None:
        try:
            with fs.open_input_stream(path) as f:
                text = f.read()
        except FileNotFoundError:
            return None
        try:
            found = json.loads(text)
        except ValueError:
            found = None
        return found if isinstance(found, dict) else {}

    def who(lease: dict) -> str:
        if not lease.get("pid"):
            return f"{LOCK} cannot be read"
        beat = lease.get("beat")
        seen = f", last seen {max(0.0, time.time() - beat):.0f} s ago" if beat else ""
        return f"pid {lease['pid']} on {lease.get('host')}, since {lease.get('since')}{seen}"

    def put() -> None:
        with fs.open_output_stream(path) as f:
            f.write(json.dumps({**me, "beat": time.time()}).encode())

    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "token": uuid.uuid4().hex,
    }
    try:
        lease = held()
        live = lease is not None and time.time() - (lease.get("beat") or 0) < LEASE_SECONDS
        if not live and lease and lease.get("started"):
            me["started"] = True  # (a killed run's mark is kept: see Hold)
        if not live:
            put()
            mine = held()
    except (OSError, pa.ArrowException) as e:  # a bucket that cannot be read or written
        raise ValueError(f"--output {flag}: cannot write there ({e})") from e
    if live or (mine or {}).get("token") != me["token"]:
        lease = lease if live else mine or {}
        raise ValueError(
            f"--output {flag}: another run of this job is writing there ({who(lease)}); wait "
            "for it to end, or give another --output (on an object store a run that stopped "
            f"without ending is taken for gone {LEASE_SECONDS} s after it was last seen)"
        )
    if lease is not None:
        print(
            f"denoise: note: a run that wrote to {redacted(output.location)} stopped without "
            f"ending ({who(lease)}); this run takes over",
            file=sys.stderr,
        )
    stop = threading.Event()

    def renew() -> None:
        """Renews the lease while it is this run's. If another run holds it (this one
        stalled past LEASE_SECONDS, e.g. a machine asleep, and was taken for gone), or no
        renewal got through for LEASE_SECONDS, this run stops as on Ctrl-C: its outputs
        and journal stay, for a rerun once the other has ended."""
        last = time.monotonic()
        while not stop.wait(LEASE_SECONDS / 4):
            try:  # (any error of a request: pyarrow's GCS errors are not all OSErrors)
                lease = held()
                if lease is not None and lease.get("token") != me["token"]:
                    lost = f"another run took it over ({who(lease)})"
                    break
                put()
                last = time.monotonic()
            except Exception as e:
                if time.monotonic() - last > LEASE_SECONDS:
                    lost = f"no renewal got through for {LEASE_SECONDS} s ({e})"
                    break
        else:
            return
        print(
            f"denoise: error: this run's lease on {redacted(output.location)} is lost: "
            f"{lost}; it stops here (what it wrote stays, for a rerun)",
            file=sys.stderr,
            flush=True,
        )
        import _thread

        lost_it.set()
        _thread.interrupt_main()  # a KeyboardInterrupt in the driver: the Ctrl-C path

    def mark_started() -> None:
        """Says in the lease that actors may write outputs from now on: a rerun that finds
        it stale takes outputs without a row for this run's (renewals PUT it too)."""
        me["started"] = True
        with contextlib.suppress(Exception):
            if (held() or {}).get("token") == me["token"]:  # (else renew stops this run)
                put()

    lost_it = threading.Event()
    beats = threading.Thread(target=renew, name="denoise-lease", daemon=True)
    beats.start()
    try:
        yield Hold(bool(lease and lease.get("started")), mark_started)
    finally:
        stop.set()
        beats.join(timeout=5)  # (a request under way may take GCS_RETRY_SECONDS)
        with contextlib.suppress(Exception):
            if (held() or {}).get("token") == me["token"]:
                fs.delete_file(path)
    if lost_it.is_set():  # the interrupt was lost (Python drops one that lands in a
        raise KeyboardInterrupt  # finalizer, __del__): the block still does not end well


def _with_column(table: pa.Table, name: str, values: list) -> pa.Table:
    """`table` with column `name` (of its type) replaced by `values`."""
    index = table.schema.get_field_index(name)
    return table.set_column(index, name, pa.array(values, table.schema.field(name).type))


class ManifestWriter:
    """Streams rows into DST/manifest.parquet and keeps counts.

    Locally the rows go first to a journal in DST, one Arrow IPC record batch per
    block as it comes back (driver memory stays flat, and a crash keeps every block
    recorded before it: the rerun reads them back). close() turns the journal into
    the Parquet manifest (temp file, renamed) and removes it and the earlier runs'
    journals, whose rows the new manifest carries. An object store has no rename or
    append: there the manifest is buffered and PUT once at the end, and the rows of
    this run's blocks are PUT as journal parts: the first block's at once, then those
    received since, every JOURNAL_SECONDS (a thread of its own, so a stall between
    blocks does not hold them back), and the rest on abort. A crash there loses the
    rows received in the last JOURNAL_SECONDS or so (and those of a part it cuts short)."""

    def __init__(
        self,
        output: Storage,
        metadata: dict[str, str],
        consumed: list[str] = (),
        earlier: dict[str, dict[str, Any]] | None = None,
        writers: dict[str, tuple] | None = None,
        mtimes: dict[str, int] | None = None,
        hold: Hold | None = None,
    ):
        self.output = output
        # Output -> (input, output size, input size) of every output in DST an earlier
        # run wrote, and then of this run's rows: written to WRITERS when the run ends.
        self.writers = dict(writers or {})
        self.earlier = earlier or {}  # earlier runs' rows, for the actors' `skipped` rows
        self.schema = MANIFEST_SCHEMA.with_metadata(metadata)
        self.model_sha256 = metadata.get("model_sha256")  # (set in the `ok` rows)
        self.mtimes = mtimes or {}  # input -> modification time listed (set in its row)
        self.consumed = list(consumed)  # earlier journals, read by previous_rows
        if output.local:
            os.makedirs(output.root, exist_ok=True)
            self.journal = f".manifest.{uuid.uuid4().hex[:12]}.journal"
            self.sink = pa.OSFile(output.full(self.journal), "wb")  # unbuffered: each
            self.writer = pa.ipc.new_stream(self.sink, self.schema)  # block reaches the OS
        else:
            self.buffer = io.BytesIO()
            self.writer = pq.ParquetWriter(self.buffer, self.schema)
            self.pending: list[pa.Table] = []  # new rows not yet in a journal part
            self.parts: list[str] = []
            self.failed_parts = 0  # (said once)
            self.lock = threading.Lock()  # pending, parts: the driver's loop, the timer
            self.stop = threading.Event()
            self.timer = threading.Thread(target=self._put_parts, daemon=True)
            self.timer.start()
        self.counts = {"ok": 0, "failed": 0, "skipped": 0}
        self.sums = {key: 0.0 for key in _METRICS}
        self.measured = 0  # outputs with metrics; of them, with a finite PSNR and an SSIM:
        self.in_means = {"psnr": 0, "ssim": 0}
        self.measured_elsewhere = 0  # of them, outputs another model wrote (kept, skipped)
        self.unmeasured = 0  # outputs (ok or skipped) without PSNR/SSIM
        self.unmeasured_skipped = 0  # of them, skipped: an earlier run's, not measured then
        self.unmeasured_example: str | None = None  # the first one's error, if any
        self.new_rows = 0  # rows from this run's actors (not carried or settled up front)
        # Set (start) once actors may write outputs, or from the start where a run killed
        # after its actors started left its mark: if this one stops, it keeps that
        # record (see abort).
        hold = hold or Hold()
        self.hold = hold
        self.started = hold.stopped_before
        self.failures: list[str] = []

    def add(self, table: pa.Table, new: bool = True, journal: bool = False) -> None:
        """Adds rows: `new` ones of this run's actors, or rows settled up front, which a
        rerun settles again the same way and which an object store's journal parts
        leave out unless `journal` (see _run_locked)."""
        table = table.select(_COLUMNS).cast(MANIFEST_SCHEMA.remove_metadata())
        status = table.column("status").to_pylist()  # carrying rows over keeps each status
        if new and self.earlier and "skipped" in status:
            # Parquet inputs are skipped in the actors (only they see the paths): the
            # earlier rows' sizes and metrics are carried over here.
            rows = [
                _skipped_row(r["path"], r["output"], None, self.earlier.get(r["path"], {}))
                if r["status"] == "skipped"
                else r
                for r in table.to_pylist()
            ]
            for row, mtime in zip(rows, table.column("input_mtime_ns").to_pylist(), strict=True):
                if row["input_mtime_ns"] is None:  # (rows of a version that kept none)
                    row["input_mtime_ns"] = mtime
            table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA.remove_metadata())
        if self.mtimes:  # (as listed, where a row has none)
            paths = table.column("path").to_pylist()
            known = table.column("input_mtime_ns").to_pylist()
            times = [
                t if t is not None else self.mtimes.get(p)
                for p, t in zip(paths, known, strict=True)
            ]
            table = _with_column(table, "input_mtime_ns", times)
        if new and self.model_sha256 and "ok" in status:
            models = table.column("model_sha256").to_pylist()
            models = [
                self.model_sha256 if s == "ok" else m for s, m in zip(status, models, strict=True)
            ]
            table = _with_column(table, "model_sha256", models)
        try:
            self.writer.write_table(table)
        except OSError as e:  # (a full disk: name the file, not "Error writing bytes")
            where = self.output.full(self.journal) if self.output.local else "the manifest"
            raise OSError(e.errno, f"cannot write {where} ({e.strerror or e})") from e
        self.new_rows += table.num_rows if new else 0
        if (new or journal) and not self.output.local:
            with self.lock:
                self.pending.append(table)
                first = not self.parts and not self.failed_parts
            if first:  # the first block's rows at once
                self._put_part()
        for path, out, size, input_size, mtime, s in zip(
            table.column("path").to_pylist(),
            table.column("output").to_pylist(),
            table.column("output_bytes").to_pylist(),
            table.column("input_bytes").to_pylist(),
            table.column("input_mtime_ns").to_pylist(),
            status,
            strict=True,
        ):
            if out and s != "failed":
                _record(self.writers, out, path, size, input_size, mtime)
        for s in status:
            self.counts[s] = self.counts.get(s, 0) + 1
        if len(self.failures) < 5:
            for path, s, err in zip(
                table.column("path").to_pylist(),
                status,
                table.column("error").to_pylist(),
                strict=True,
            ):
                if s == "failed" and len(self.failures) < 5:
                    self.failures.append(f"{path}: {err}")
        values = {k: np.asarray(table.column(k).to_numpy(zero_copy_only=False)) for k in _METRICS}
        psnr = values["psnr"].astype(float)
        done = np.array([s != "failed" for s in status], dtype=bool)
        none = done & np.isnan(psnr)
        self.unmeasured += int(none.sum())
        self.unmeasured_skipped += sum(s == "skipped" for s in np.asarray(status)[none])
        if self.unmeasured_example is None and none.any():  # (why, not the note before it)
            errors = table.column("error").to_pylist()
            self.unmeasured_example = next(
                (
                    EARLIER * errors[i].startswith(EARLIER)
                    + errors[i][errors[i].index(NO_METRICS) :]
                    for i in np.flatnonzero(none)
                    if NO_METRICS in (errors[i] or "")
                ),
                None,
            )
        measured = done & ~np.isnan(psnr)
        # An image equal to its reference has an infinite PSNR, and one under 3 pixels on
        # a side no SSIM: each is measured, but left out of that metric's means.
        for metric in self.in_means:
            pair = (f"{metric}_noisy", metric)
            both = measured & np.all([np.isfinite(values[k].astype(float)) for k in pair], 0)
            for key in pair:
                self.sums[key] += float(np.sum(values[key][both].astype(float)))
            self.in_means[metric] += int(both.sum())
        if measured.any():
            self.measured += int(measured.sum())
            if self.model_sha256:  # (None: a row of a version before the column)
                models = table.column("model_sha256").to_pylist()
                other = np.array([m not in (None, self.model_sha256) for m in models], bool)
                self.measured_elsewhere += int((measured & other).sum())

    def add_rows(self, rows: list[dict[str, Any]], journal: bool = False) -> None:
        if rows:
            cols = {c: [r.get(c) for r in rows] for c in _COLUMNS}
            table = pa.table(cols, schema=MANIFEST_SCHEMA.remove_metadata())
            self.add(table, new=False, journal=journal)

    def _put_parts(self) -> None:
        interval = JOURNAL_SECONDS
        while not self.stop.wait(interval):
            self._put_part()

    def _put_part(self) -> None:
        """The pending rows as one journal part in the object store (one PUT, made
        without the lock: the driver's loop goes on adding rows meanwhile). If it
        cannot be written, they go back to the pending rows, for the next part."""
        with self.lock:
            tables, self.pending = self.pending, []
        if not tables:
            return
        name = f"{JOURNAL_PARTS}/.manifest.{uuid.uuid4().hex[:12]}.journal"
        try:
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, self.schema) as writer:
                for table in tables:
                    writer.write_table(table)
            self.output.write_atomic(name, sink.getvalue().to_pybytes())
        except Exception as e:  # noqa: BLE001 (a crash's record only: never fail the run)
            with self.lock:
                self.pending[:0] = tables
                self.failed_parts += 1
                if self.failed_parts == 1:
                    note = f"could not write {name} in DST ({redacted(str(e))})"
                    print(f"denoise: note: {note}", file=sys.stderr)
            return
        with self.lock:
            self.parts.append(name)

    def _stop_timer(self) -> None:
        self.stop.set()
        self.timer.join()

    def start(self) -> None:
        self.started = True
        self.hold.mark_started()

    def abort(self) -> None:
        """The job failed: the outputs written stay, and so does the journal once actors
        were started (the rerun reads its rows back, and, rows or not, it records that
        this job wrote there: outputs without a row are then done again, see _plan); it
        is removed otherwise. In an object store, the rows not yet in a part are PUT as
        one (an empty one if none was PUT: the record)."""
        if not self.output.local:
            self._stop_timer()
            if self.started and not self.parts:
                with self.lock:
                    self.pending.append(MANIFEST_SCHEMA.remove_metadata().empty_table())
            self._put_part()  # (it says so itself if it cannot)
        try:
            self.writer.close()
        except Exception:
            pass
        if not self.output.local:
            return
        with contextlib.suppress(Exception):
            self.sink.close()
        if not (self.new_rows or self.started):
            with contextlib.suppress(Exception):
                self.output.remove(self.journal)
            return
        try:  # kept: the record that this job wrote there, if its schema got to the disk
            empty = os.path.getsize(self.output.full(self.journal)) == 0
        except OSError:
            empty = True
        if empty and self.started:  # (a full disk: then the lock, marked, is the record)
            self.hold.keep_mark = True

    def close(self) -> None:
        self.writer.close()
        if not self.output.local:
            self._stop_timer()
            self.output.write_atomic(MANIFEST, self.buffer.getvalue())
            self._write_writers()
            self._remove_parts([*self.consumed, *self.parts])
            return
        self.sink.close()
        tmp = self.output.full(f".{MANIFEST}.{uuid.uuid4().hex[:12]}{TMP_MARK}")
        try:
            with pa.OSFile(self.output.full(self.journal), "rb") as f:
                reader = pa.ipc.open_stream(f)
                with pq.ParquetWriter(tmp, self.schema) as writer:
                    pending: list[pa.RecordBatch] = []
                    rows = 0
                    for batch in reader:  # row groups of ~64k rows, not one per block
                        pending.append(batch)
                        rows += batch.num_rows
                        if rows >= 65_536:
                            writer.write_table(pa.Table.from_batches(pending))
                            pending, rows = [], 0
                    if pending:
                        writer.write_table(pa.Table.from_batches(pending))
            os.replace(tmp, self.output.full(MANIFEST))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._write_writers()
        for name in (*self.consumed, self.journal):  # their rows are in the manifest now
            with contextlib.suppress(OSError):
                self.output.remove(name)

    def _remove_parts(self, parts: list[str]) -> None:
        """Removes journal parts whose rows the manifest now holds: the whole folder
        when it holds nothing else (on S3, batch deletes and one folder marker), else
        one by one, so that files a user put there stay. (A part that another run
        writing here at the same time PUTs between the listing and the delete goes too:
        one DST per running job.)"""
        if not parts:
            return
        import pyarrow.fs as pafs

        folder = self.output.full(JOURNAL_PARTS)
        with contextlib.suppress(OSError):
            infos = self.output.fs.get_file_info(pafs.FileSelector(folder, recursive=True))
            there = {i.path.removeprefix(folder + "/") for i in infos}
            if there <= {p.removeprefix(JOURNAL_PARTS + "/") for p in parts}:
                self.output.fs.delete_dir_contents(folder)
                return
        for name in parts:
            with contextlib.suppress(OSError):
                self.output.remove(name)

    def _write_writers(self) -> None:
        """WRITERS: which input wrote each output (see previous_writers). Only a guide
        for the next run: if it cannot be written, that run has the manifest alone."""
        outputs = sorted(self.writers)
        try:
            table = pa.table(
                {
                    "output": outputs,
                    "input": [self.writers[o][0] for o in outputs],
                    "output_bytes": [self.writers[o][1] for o in outputs],
                    "input_bytes": [self.writers[o][2] for o in outputs],
                    "input_mtime_ns": [_output_time(self.writers[o], {}) for o in outputs],
                },
                schema=WRITERS_SCHEMA,
            )
            buf = io.BytesIO()
            pq.write_table(table, buf)
            self.output.write_atomic(WRITERS, buf.getvalue())
        except Exception as e:  # noqa: BLE001 (a guide only: never fail the finished run)
            print(f"denoise: note: could not write {WRITERS} in DST ({e})", file=sys.stderr)

    def means(self) -> dict[str, float]:
        """The mean of each metric over the outputs it has a finite value for."""
        return {
            key: value / self.in_means[key.removesuffix("_noisy")]
            for key, value in self.sums.items()
            if self.in_means[key.removesuffix("_noisy")]
        }


def _means_text(means: dict[str, float], measured: int, in_means: dict[str, int]) -> str:
    """'mean PSNR 9.38 -> 18.05 dB (+8.67), SSIM 0.359 -> 0.728', saying how many of the
    `measured` outputs a mean leaves out, and why."""
    why = {
        "psnr": "with an infinite PSNR: input or output equal to its reference",
        "ssim": TOO_SMALL,
    }
    parts = []
    for metric, name in (("psnr", "PSNR"), ("ssim", "SSIM")):
        if metric not in means:
            parts.append(f"no {name} mean (all {measured} {why[metric]})")
            continue
        a, b = means[f"{metric}_noisy"], means[metric]
        text = (
            f"{a:.2f} -> {b:.2f} dB ({b - a:+.2f})" if metric == "psnr" else f"{a:.3f} -> {b:.3f}"
        )
        first = not any(part.startswith("mean ") for part in parts)
        text = f"{'mean ' if first else ''}{name} {text}"
        if measured > in_means[metric]:
            text += f" (without the {measured - in_means[metric]} {why[metric]})"
        parts.append(text)
    return ", ".join(parts)


def _default_resources(
    gpus_per_worker: float | None, workers: int | None, cpus: float | None
) -> tuple[float, float, int]:
    """(CPUs and GPUs per actor, actors): by default 1-CPU actors, one per CPU, or where
    the cluster has GPUs, 1, 2 or 4 sharing each GPU (ACTORS_PER_GPU); as many actors
    as the live nodes hold (a GPU actor of more --cpus-per-worker than its share of a
    node's CPUs: fewer, not actors that would never start).

    One actor per node holding all its CPUs was measured too: it saves one TensorFlow
    import per extra CPU (~4 CPU-s) but its Python work (decode, encode, rows) shares one
    GIL, and on a quiet 2-CPU machine it ran 50k images in 24 s against 19.5 s for two
    1-CPU actors. Pass --cpus-per-worker to choose it."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if gpus_per_worker is not None:
        gpus = gpus_per_worker
    elif any(n.get("Resources", {}).get("GPU", 0) > 0 for n in nodes):
        gpus = 1.0 / _actors_per_gpu(nodes)
    else:
        gpus = 0.0
    cpus = 1.0 if cpus is None else cpus
    if workers is None:  # as many as the nodes hold now (an autoscaler's: at least 1)
        workers = max(1, _actors_held(nodes, cpus, gpus))
    return cpus, gpus, workers


def _note_workers_beyond_nodes(
    given: int, workers: int, cpus: float, gpus: float, autoscale: bool
) -> None:
    """Says so where --workers `given` asks for more actors (`workers`, no more than the
    blocks) than the live nodes hold: Ray Data starts those that fit and runs on them;
    the others wait (for an autoscaler's nodes, or till the job ends). Where none fits,
    check_resources has said so already."""
    import ray

    hold = _actors_held([n for n in ray.nodes() if n.get("Alive")], cpus, gpus)
    if 0 < hold < workers:
        then = "for the autoscaler to add nodes" if autoscale else "and are never started"
        print(
            f"denoise: note: --workers {given}, but the nodes of this Ray cluster hold "
            f"{hold} actor(s) of {{CPU: {cpus:g}, GPU: {gpus:g}}} now: the job runs on "
            f"those, the others wait {then}",
            file=sys.stderr,
        )


def _actors_held(nodes: list[dict], cpus: float, gpus: float) -> int:
    """How many actors of `cpus` CPUs and `gpus` GPUs the `nodes` (ray.nodes()) hold."""
    return sum(_actors_on(n.get("Resources", {}), cpus, gpus) for n in nodes)


def _actors_on(resources: dict, cpus: float, gpus: float) -> int:
    """How many actors of `cpus` CPUs and `gpus` GPUs a node of `resources` holds."""
    fits = resources.get("CPU", 0) / cpus
    if gpus > 0:
        fits = min(fits, resources.get("GPU", 0) / gpus)
    return int(fits + 1e-9)  # (0.25 GPUs x 4 is 1.0 in floats, but not every fraction)


# Default actors per GPU by the CPUs per GPU of the GPU nodes: (at least so many CPUs,
# actors), first match. A GPU actor's work on digits is mostly its CPU's (decode,
# encode; the GPU waits), so one actor leaves a 16-CPU node idle; but each actor's
# start costs ~20 CPU-s with JAX on a GPU (import, CUDA, the model's compile). On an
# H200 node of 16 CPUs, 50,000 digits (start-up included) took 38.4 s with 1 actor,
# 30.9 s with 4, 37.5 s with 8 and 42.9 s with 16 (jobs/bench_gpu.py,
# jobs/results/gpu_check_2026-12-04.json). 4 CPUs or more per actor then.
ACTORS_PER_GPU = ((16, 4), (8, 2), (0, 1))


def _actors_per_gpu(nodes: list[dict]) -> int:
    """ACTORS_PER_GPU's count for the live GPU node with the fewest CPUs per GPU."""
    ratios = [
        n["Resources"].get("CPU", 0) / n["Resources"]["GPU"]
        for n in nodes
        if n.get("Alive", True) and n.get("Resources", {}).get("GPU", 0) > 0
    ]
    fewest = min(ratios, default=0)
    return next(actors for least, actors in ACTORS_PER_GPU if fewest >= least)


def warn_local_paths(args: argparse.Namespace, hosts: set[str]) -> None:
    """Warns when local paths meet a Ray cluster of several machines: each actor reads
    and writes the disk of the machine it runs on."""
    flags = (("--input", args.input), ("--output", args.output), ("--clean", args.clean))
    local = [f"{flag} {value}" for flag, value in flags if value and _is_local(value)]
    if len(hosts) > 1 and local:
        print(
            f"denoise: warning: {', '.join(local)}: local path(s), on a Ray cluster of "
            f"{len(hosts)} machines; actors read and write the disk of the machine they run "
            "on, so use a folder every node mounts at the same path, or cloud storage "
            "(s3://, gs://).",
            file=sys.stderr,
        )


def _is_local(location: str) -> bool:
    return "://" not in location or location.startswith("file://")


def check_uri(location: str, flag: str) -> None:
    """Refuses what an object store's URI cannot say as the user meant it: a "#" ends
    its path (the rest is a fragment: the outputs went to the folder before it); "."
    and ".." are resolved when writing but not when listing (an output "outside" the
    input was in it, and every rerun found no outputs); a space or a non-ASCII letter
    does not parse. Each must be percent-encoded, or left out."""
    if _is_local(location):
        return
    path = split_query(location)[0]
    shown = f"{flag} {redacted(location)}"
    if "#" in path:
        raise ValueError(f"{shown}: a '#' ends a URI's path; write it as %23.")
    # (pyarrow decodes %2E%2E and %2F before the object store resolves the "..": an
    # --output s3://b/x/%2E%2E/in wrote over the inputs in s3://b/in, unrefused)
    segments = urllib.parse.unquote(path.split("://", 1)[1]).split("/")
    if any(part in (".", "..") for part in segments[1:]):
        raise ValueError(
            f"{shown}: '.' and '..' are not folders in an object store (its listing would "
            "not find what was written there); give the path without them, encoded or not."
        )
    if any(ch.isspace() or not ch.isascii() for ch in path):
        raise ValueError(
            f"{shown}: percent-encode spaces and non-ASCII letters in a URI "
            "(a space is %20; urllib.parse.quote gives the rest)."
        )


def check_resources(cpus: float, gpus: float, allow_autoscale: bool) -> None:
    """Fails before any actor is asked for if no node can ever hold one (Ray Data
    would otherwise wait forever for it)."""
    import ray

    need = {"CPU": cpus, "GPU": gpus}
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if any(all(n.get("Resources", {}).get(k, 0.0) >= v for k, v in need.items()) for n in nodes):
        return
    total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    message = (
        f"an actor needs {{CPU: {cpus:g}, GPU: {gpus:g}}} (--cpus-per-worker, "
        f"--gpus-per-worker) but no node of this Ray cluster has that much (cluster "
        f"resources now: {total or 'none'}; {len(nodes)} node(s))"
    )
    if allow_autoscale:
        process = _aelib_process()
        beyond = process.beyond_node_types(need) if process else None
        if beyond:  # (Ray Data waited for such a node without end)
            raise ValueError(f"{message}, {beyond}. Lower --cpus-per-worker or --gpus-per-worker.")
        print(
            f"denoise: warning: {message}. Waiting for the autoscaler to add such a node: "
            "the job waits for as long as none joins.",
            file=sys.stderr,
        )
        return
    raise ValueError(
        f"{message}. Lower the request, or pass --allow-autoscale on a cluster whose "
        "autoscaler can add such nodes."
    )


def _aelib_process():
    """aelib/process.py, loaded from its file without importing the aelib package (whose
    __init__ imports Keras: seconds); None where aelib is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("aelib")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "process.py")
    module_spec = importlib.util.spec_from_file_location("_aelib_process", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the job; returns the summary (also printed)."""
    start = time.perf_counter()
    for flag in ("--model", "--input", "--output", "--clean"):
        location = getattr(args, flag[2:])
        if location:
            check_uri(location, flag)
    unreachable = _ray_address_unreachable()
    if unreachable:
        raise ValueError(unreachable)
    model, query = split_query(args.model)
    model_store = _storage("--model", (os.path.dirname(model) or ".") + query, args.model)
    try:
        model_bytes = model_store.read(os.path.basename(model))
    except OSError as e:
        raise ValueError(f"--model {redacted(args.model)}: cannot read it ({e}).") from e
    except NotAFile as e:  # a sweep's best/ or a trial's checkpoint folder said "not a
        # regular file but a folder: not an image", naming no flag
        raise ValueError(
            f"--model {redacted(args.model)} is {e.kind}; expected a trained .keras file, "
            "such as a sweep's best/denoise.keras."
        ) from e
    spec = inspect_model(model_bytes, args.model)
    if spec.note:
        print(f"denoise: note: {spec.note}", file=sys.stderr)
    try:
        inputs = find_inputs(args.input, args.input_format, args.output)
    except OSError as e:  # (an object store out of reach: nothing was written)
        raise ValueError(f"--input {redacted(args.input)}: cannot list it ({e}).") from e
    except pa.ArrowInvalid as e:  # (a URI pyarrow cannot use: its message names no flag)
        raise _uri_error("--input", args.input, e) from e
    output = _storage("--output", args.output)
    clean = _storage("--clean", args.clean) if args.clean else None
    try:
        clean_kind = clean.entry()[0] if clean is not None else "dir"
    except OSError as e:
        raise ValueError(f"--clean {redacted(args.clean)}: cannot list it ({e}).") from e
    if clean_kind != "dir":
        what = "does not exist" if clean_kind == "missing" else "is not a folder"
        raise ValueError(
            f"--clean {redacted(args.clean)} {what}; expected a folder of the "
            "clean reference images, at the inputs' relative paths."
        )
    check_locations(inputs, args.input, output, clean)
    if clean is not None and clean.local and inputs.kind == "files":
        _check_references(inputs, clean, args.clean)
    for note in inputs.notes:
        print(f"denoise: note: {note}", file=sys.stderr)
    _note_unused_flags(args, inputs)
    with one_run_at_a_time(output, args.output) as hold:
        return _run_locked(args, start, spec, model_bytes, inputs, output, hold)


def _storage(flag: str, location: str, given: str | None = None) -> Storage:
    """Storage(location), whose pyarrow error for a URI it cannot use names the flag and
    what it was `given` (default: `location`)."""
    try:
        return Storage(location)
    except pa.ArrowInvalid as e:
        raise _uri_error(flag, given or location, e) from e


def _uri_error(flag: str, location: str, error: Exception) -> ValueError:
    """pyarrow's error of a URI it cannot use ("Unexpected query parameter in S3 URI",
    "Empty path component"), with the flag, and for a "?" what it is in a URI."""
    hint = ""
    if "?" in location and "query parameter" in str(error):
        hint = (
            " ('?' starts a URI's query, of pyarrow's options such as ?region=...: in a "
            "glob, write '[...]' or '*' instead; in a name, %3F)"
        )
    return ValueError(f"{flag} {redacted(location)}: {error}{hint}")


def _note_unused_flags(args, inputs: Inputs) -> None:
    """Notes the flags that this run's inputs give nothing to act on (they were ignored
    without a word): the Parquet columns for image files, --quality where no output is
    a JPEG or WEBP."""
    if inputs.kind != "files":
        return
    columns = (
        ("--image-column", args.image_column != "image"),
        ("--path-column", args.path_column),
    )
    unused = [flag for flag, given in columns if given]
    if unused:
        what = "name Parquet columns" if len(unused) > 1 else "names a Parquet column"
        they = "they are" if len(unused) > 1 else "it is"
        print(
            f"denoise: note: {' and '.join(unused)} {what}; --input {redacted(args.input)} "
            f"is image files, so {they} not used",
            file=sys.stderr,
        )
    if args.quality == DEFAULT_QUALITY or not inputs.files:
        return
    suffixes = {posixpath.splitext(output_path(rel, args.format))[1] for rel, _ in inputs.files}
    formats = {SUFFIX_FORMAT[suffix.lower()] for suffix in suffixes}
    if not formats & set(LOSSY):
        print(
            "denoise: note: --quality is that of JPEG and WEBP outputs; this run writes "
            f"{', '.join(sorted(formats))} only, so it is not used",
            file=sys.stderr,
        )


def _check_references(inputs: Inputs, clean: Storage, flag: str) -> None:
    """Refuses a local --clean that holds no input's reference, before Ray: the run went
    to its end to say that none of its outputs could be measured (a folder of other
    names, or of another extension). One that holds some is measured where it can be."""
    if not inputs.files or any(os.path.isfile(clean.full(rel)) for rel, _ in inputs.files):
        return
    rel = inputs.files[0][0]
    raise ValueError(
        f"--clean {flag} holds the reference of none of the {len(inputs.files)} inputs (for "
        f"{rel}, no {clean.full(rel)}): a reference is the clean image at its input's "
        "relative path and name, extension included."
    )


def _run_locked(
    args,
    start: float,
    spec,
    model_bytes: bytes,
    inputs: Inputs,
    output: Storage,
    hold: Hold,
) -> dict:
    if inputs.hidden:
        n, where = inputs.hidden, redacted(args.input)
        why = "(a name or folder starting with '.')"
        print(
            f"denoise: note: {n} hidden image files under {where} {why} are not inputs; a "
            "glob naming them includes them"
            if n > 1
            else f"denoise: note: 1 hidden image file under {where} {why} is not an input; a "
            "glob naming it includes it",
            file=sys.stderr,
        )

    if args.clean:  # recorded absolute, so that a rerun from elsewhere compares right
        clean = _place(args.clean) if _is_local(args.clean) else redacted(args.clean)
    else:
        clean = None
    before, before_metas, journals = previous_rows(output, clean)
    if clean is None:  # the references of the metrics carried over, if any (the last run's)
        clean = before_metas[-1].get("clean", "") if before_metas else ""
    writers = previous_writers(output, before)
    # No manifest, journal (with its schema at least: a run killed before it wrote any
    # leaves an empty file), record of outputs, or lock of a run killed once its actors
    # had started: this job has not written here before. Otherwise an output without a
    # row was written by a run that stopped before keeping its row: it is done again.
    unrecorded = not (before or before_metas or writers or hold.stopped_before)
    # Sizes for the skips here, and in the actors for Parquet.
    written = {out: size for out, (_, size, *_) in writers.items() if size}
    within = SourceFolder.of(inputs, output)
    done, cut = existing_outputs(output, written, within)
    # Files cut short (or not images) that no row or record says this job wrote: not its
    # outputs (it renames each into place whole), so another dataset's, say, in a DST with
    # no record of this job or one with it (a Parquet run killed before its actors kept
    # the rows that failed for them): not overwritten, their inputs fail. An output the
    # record names that was cut short since (a copy) is done again.
    unowned = cut - set(writers) - {last.get("output") for last in before.values()}
    kept_for = {  # inputs an earlier run failed, as their output path held a file not its own
        rel
        for rel, last in before.items()
        if last.get("status") == "failed"
        and (last.get("error") or "").removeprefix(EARLIER).startswith(KEPT_CUT)
    }
    metadata = {
        "job": "jobs/denoise.py",
        "model": redacted(args.model),
        "model_name": spec.name,
        "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
        "input": redacted(args.input),
        "clean": clean,
        "format": args.format,
        "rgb": args.rgb,
        "quality": str(args.quality),
        "max_pixels": str(args.max_pixels),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # Orders this run's rows after every earlier run's when they are read back.
        "run": str(1 + max((int(m.get("run", 0) or 0) for m in before_metas), default=0)),
    }
    # A failure is carried over (not retried) only if this run would redo it the same
    # way: same model and output settings (a JPEG that cannot hold alpha may be a PNG now).
    keys = ("model_sha256", "format", "rgb", "quality", "max_pixels")
    defaults = {"max_pixels": str(PILLOW_PIXEL_LIMIT)}  # manifests from before the flag
    changed = [
        k for k in keys if any(meta.get(k, defaults.get(k)) != metadata[k] for meta in before_metas)
    ]
    if before and changed:
        names = "; the manifest's model_sha256 column names the model of each"
        print(
            f"denoise: note: {redacted(output.location)} holds a run with another "
            f"{', '.join(changed)}: its outputs are kept (skipped where this run would "
            f"write the same file{names if 'model_sha256' in changed else ''}), its "
            "failures retried",
            file=sys.stderr,
        )
    others = sorted(  # ("" is no --clean, or not recorded: not known to differ)
        {m["clean"] for m in before_metas if _place(m.get("clean", "")) not in ("", _place(clean))}
    )
    # The manifest holds one run's inputs: a run on another --input drops the rows of
    # the last one's (its outputs stay), which went without a word.
    last_input = before_metas[-1].get("input", "") if before_metas else ""
    if before and last_input and _place(last_input) != _place(redacted(args.input)):
        print(
            f"denoise: note: {redacted(output.location)} holds the manifest of a run on "
            f"another --input ({last_input}): this run's manifest has rows for this run's "
            "inputs only, so the rows of that run's other inputs are dropped (their outputs "
            "stay); give another --output to keep both records",
            file=sys.stderr,
        )
    if args.clean and others:
        print(
            f"denoise: note: {redacted(output.location)} holds a run measured against "
            f"another --clean ({others[0]}): the outputs it wrote are skipped without "
            "PSNR/SSIM; give a new --output to denoise and measure every input",
            file=sys.stderr,
        )
    try:
        kept = {out: writer for out, writer in writers.items() if out in done}
        mtimes = inputs.storage.mtimes if inputs.kind == "files" and inputs.storage else None
        manifest = ManifestWriter(
            output,
            metadata,
            consumed=journals,
            earlier=before,
            writers=kept,
            mtimes=mtimes,
            hold=hold,
        )
    except OSError as e:  # a read-only or full DST: say so before any work
        raise ValueError(f"--output {args.output}: cannot write there ({e})") from e
    try:
        retry = args.retry_failed or bool(changed)
        reference = Storage(args.clean) if args.clean and _is_local(args.clean) else None
        early, todo = _plan(
            inputs, args, done, before, retry, kept, unrecorded, within, cut, unowned, kept_for,
            reference,
        )  # fmt: skip
        if unrecorded:
            _warn_unrecorded(output, sum(row["status"] == "skipped" for row in early))
        # Where this job has no record yet, the outputs skipped now may be another
        # dataset's: their rows go in the journal at once (also an object store's),
        # so that a rerun after a crash does not take them for this run's (see _plan).
        manifest.add_rows(early, journal=unrecorded)
        units, parquet = [], {}
        if inputs.kind == "parquet":  # rows are skipped in the actors, which need these
            # Rows are skipped for the outputs their own path wrote, from bytes of the
            # same size, in a file of the same modification time: here, a row group all
            # of whose rows have their output and were recorded with their file's time
            # now (as files are: see _plan); in the actors, the others.
            writers_in = {
                out: (w[0], w[2], _output_time(w, before.get(w[0], {}))) for out, w in kept.items()
            }

            def settled(rel: str, out_rel: str, mtime: int | None) -> int | None:
                """The size of the bytes the row's output was made from, if the row is to
                be skipped once its bytes have that size (as in the actors: its output
                recorded as its own, made from its file at the time it has now)."""
                writer, size, then = writers_in.get(out_rel, (None, None, None))
                return size if writer == rel and then == mtime else None

            units, clashes, unusable, skipped = _parquet_units(inputs, args, within, settled)
            manifest.add_rows(
                [
                    {**_skipped_row(rel, out_rel, None, before[rel]), "input_mtime_ns": mtime}
                    for rel, out_rel, mtime in skipped
                ]
            )
            parquet = {"clashes": clashes, "written": written, "writers": writers_in}
            parquet["unrecorded"] = unrecorded  # (then an output without a record is done)
            parquet["unowned"], parquet["kept_for"] = unowned, kept_for
            _note_cut(args.output, sorted(cut - unowned), sorted(unowned))  # (of all rows)
            parquet["within"] = within
            manifest.add_rows(unusable)
        timings: dict[str, float] = {}
        if todo or units:
            timings = _run_ray(
                args, spec, model_bytes, inputs, todo, units, parquet, manifest, start
            )
        manifest.close()
    except BaseException:  # the outputs written stay, and the rows of what was done
        manifest.abort()
        raise
    seconds = time.perf_counter() - start
    counts = manifest.counts
    if unrecorded and inputs.kind == "parquet":  # (skipped in the actors)
        _warn_unrecorded(output, counts["skipped"])
    if args.clean and manifest.unmeasured:
        example = manifest.unmeasured_example
        why = f" (e.g. {example}; the manifest's error column has each reason)" if example else ""
        if not example and manifest.unmeasured_skipped:  # (a rerun that adds --clean)
            why = (
                f" ({manifest.unmeasured_skipped} of them skipped: an earlier run wrote them "
                "and measured none against these references; give an empty --output to "
                "denoise and measure every input)"
            )
        print(
            f"denoise: note: {manifest.unmeasured} of the {counts['ok'] + counts['skipped']} "
            f"outputs have no PSNR/SSIM against --clean{why}",
            file=sys.stderr,
        )
    summary = {
        "inputs": sum(counts.values()),
        **counts,
        "seconds": round(seconds, 2),
        "images_per_s": round(counts["ok"] / seconds, 1) if seconds else 0.0,
        "hidden_images_not_inputs": inputs.hidden,
        **timings,
        "manifest": output.full(MANIFEST) if output.local else redacted(output.uri(MANIFEST)),
    }
    means = manifest.means()
    if manifest.measured:
        summary.update({f"mean_{k}": round(v, 3) for k, v in means.items()})
        if "psnr" in means:
            summary["mean_psnr_gain"] = round(means["psnr"] - means["psnr_noisy"], 3)
        summary["measured"] = manifest.measured
        summary.update({f"in_{k}_means": n for k, n in manifest.in_means.items()})
    line = (
        f"denoise: {summary['inputs']} inputs: {counts['ok']} ok, {counts['failed']} failed, "
        f"{counts['skipped']} skipped in {seconds:.1f} s ({summary['images_per_s']} images/s)"
    )
    if manifest.measured:
        summary["measured_by_other_models"] = manifest.measured_elsewhere
        elsewhere = manifest.measured_elsewhere  # (a rerun with another --model)
        by = f" ({elsewhere} by another model: the manifest's model_sha256)" if elsewhere else ""
        measured = _means_text(means, manifest.measured, manifest.in_means)
        if not args.clean:  # (carried: measured by an earlier run, against its --clean)
            by = f" (an earlier run's --clean: {redacted(clean) or 'not recorded'}){by}"
        line += f"; on the {manifest.measured} with a --clean reference{by}: {measured}"
    if timings.get("first_result_s") is not None:
        line += (
            f"; start-up: Ray ready after {timings['ray_ready_s']:.1f} s, first results "
            f"after {timings['first_result_s']:.1f} s"
        )
    for failure in manifest.failures:  # (a name's NUL or newline escaped: one line each)
        print(f"denoise: failed: {_one_line(failure)}", file=sys.stderr)
    if counts["failed"] > len(manifest.failures):  # (the first few only)
        more = counts["failed"] - len(manifest.failures)
        print(
            f"denoise: failed: ... and {more} more (the manifest's error column has each)",
            file=sys.stderr,
        )
    print(line, flush=True)
    print("denoise-summary " + json.dumps(summary), flush=True)
    return summary


def _warn_unrecorded(output: Storage, skipped: int) -> None:
    """Outputs that were in DST before this job ever wrote there (no manifest, journal or
    record of outputs) are skipped as done, as after a crash that lost their rows: say
    so, as they may be another dataset's."""
    if skipped:
        print(
            f"denoise: warning: {skipped} inputs are skipped because their outputs are "
            f"already in {redacted(output.location)}, with no record that this job wrote "
            f"them (no {MANIFEST}, journal or {WRITERS} there): if they are not this "
            "job's results (another folder of images, a copy of the input), give an empty "
            "--output",
            file=sys.stderr,
        )


def _plan(
    inputs: Inputs,
    args,
    done: set[str],
    before: dict,
    retry_failed: bool,
    writers: dict[str, tuple] | None = None,
    unrecorded: bool = True,
    within: SourceFolder | None = None,
    cut: set[str] = frozenset(),
    unowned: set[str] = frozenset(),
    kept_for: set[str] = frozenset(),
    reference: Storage | None = None,
):
    """Splits file inputs into rows settled now (failed, skipped) and the (path, size)
    of each file to denoise. `writers`: output -> (the input an earlier run wrote it
    for, the output's size, the input's size then), also for inputs without a row now
    (previous_writers). `unrecorded`: DST holds no record of this job (see _run_locked),
    so an output with neither a row nor a record is taken for its input's; else it was
    written by a run that stopped before keeping its row, and is done again (its row,
    sizes and metrics, would be missing for good). An input is unchanged if it has the
    size and the modification time its row recorded (as rsync's quick check: a file
    changed in place can keep its size; 10,000 noisy test digits as PNGs have 108 sizes
    among them). The times are compared with the input's own earlier listing, not
    with the output's: a clock elsewhere, or one an unzip set ahead, does not count.
    `within`: the input folder, for outputs to stay out of (see output_for). `cut`: the
    files at output paths that are cut short: done again, but those of them that are not
    this job's (`unowned`, see _run_locked) fail, as do the inputs whose last row failed
    so (`kept_for`) while a file is there. `reference`: a local --clean: an output whose
    row recorded another reference than the one there now (by size and time, then by
    CRC-32: a copy that did not keep times is the same) is done again, for its metrics
    (they were of a reference replaced, fixed or removed since)."""
    early: list[dict[str, Any]] = []
    redone, kept_cut = [], []  # (the files in `cut` of this run's inputs)
    todo: list[tuple[str, int]] = []
    orphans = 0  # outputs without a row, of a run that stopped
    touched = 0  # inputs of the size recorded, with another modification time
    restamped = 0  # outputs done again for their reference's sake
    mtimes = inputs.storage.mtimes if inputs.storage is not None else {}
    linked_out = inputs.storage.linked_out if inputs.storage is not None else {}
    others = inputs.storage.others if inputs.storage is not None else set()
    claimed: dict[str, str] = {}  # output -> the input writing it
    # An output an earlier run wrote stays its input's, though an input added since
    # comes first in sorted order (x.jpg beside x.png with --format png); and it is
    # not taken for another input's once that one is gone (x.png deleted since).
    written_by = {
        **{out: writer[0] for out, writer in (writers or {}).items()},
        **{
            last["output"]: rel
            for rel, last in before.items()
            if last.get("output") and last.get("status") != "failed"
        },
    }
    outputs: dict[str, str | ValueError] = {}  # input -> its output, or why it has none
    for rel, _ in inputs.files:
        try:
            outputs[rel] = output_for(rel, args.format, within=within)
        except ValueError as e:
            outputs[rel] = e
    for out_rel, rel in written_by.items():
        if outputs.get(rel) == out_rel:
            claimed[out_rel] = rel
    # The folders the outputs go in: an output of one of their names cannot be written
    # (a.gif -> a.png beside a folder a.png/ of inputs failed at its rename, every run).
    folders = {
        parent
        for out_rel in outputs.values()
        if isinstance(out_rel, str)
        for parent in _parents(out_rel)
    }
    # Else an input already of the output's name and format keeps it (x.png, not x.gif
    # beside it, which sorts first: the job writes GIFs as PNGs).
    for rel, out_rel in outputs.items():
        if out_rel == rel and _utf8(rel):
            claimed.setdefault(out_rel, rel)
    for rel, size in inputs.files:
        if not _utf8(rel):  # os.listdir's stand-ins for bytes that are not UTF-8
            shown = os.fsencode(rel).decode("utf-8", "backslashreplace")
            reason = "the file name is not valid UTF-8 (rename it to process it)"
            early.append({"path": shown, "status": "failed", "error": reason, "input_bytes": size})
            continue
        # Not a regular file: its read fails now as in an actor, and says why (every
        # rerun, too, without starting Ray for it).
        why = _unreadable(inputs.storage, rel) if rel in others else None
        if why:
            early.append({"path": rel, "status": "failed", "error": why, "input_bytes": None})
            continue
        out_rel = outputs[rel]
        if rel in linked_out:  # (its own output would be written over it: each rerun
            out_rel = ValueError(  # found it changed, and denoised its output again)
                f"it is a link to a file in --output ({linked_out[rel]}): an output could "
                "be written over it; copy it out of --output to denoise it"
            )
        if isinstance(out_rel, ValueError):
            failed = {"path": rel, "status": "failed", "error": str(out_rel), "input_bytes": size}
            early.append(failed)
            continue
        owner = claimed.setdefault(out_rel, rel)
        if owner != rel:  # x.png and x.jpg with --format jpeg: both would be x.jpg
            reason = (
                f"its output {out_rel} is also the output of {owner}; rename one of them to "
                "denoise both"
            )
            early.append({"path": rel, "status": "failed", "error": reason, "input_bytes": size})
            continue
        if out_rel in folders:
            reason = _folder_clash_reason(out_rel)
            early.append({"path": rel, "status": "failed", "error": reason, "input_bytes": size})
            continue
        if out_rel in unowned:
            kept_cut.append(out_rel)
            reason = _kept_cut_reason(out_rel)
            early.append({"path": rel, "status": "failed", "error": reason, "input_bytes": size})
            continue
        if rel in kept_for and out_rel in done:  # whole since (a copy that was under way):
            reason = _kept_cut_reason(out_rel, whole=True)  # still not this job's to write
            early.append({"path": rel, "status": "failed", "error": reason, "input_bytes": size})
            continue
        if out_rel in cut:
            redone.append(out_rel)
        last = before.get(rel, {})
        record = (writers or {}).get(out_rel, ())
        # The record's size where the last row is not this output's (none, or of
        # another --format since: its size is of the input then, not when this was made).
        recorded_size = (
            record[2] if record and record[0] == rel and last.get("output") != out_rel else None
        )
        mtime = mtimes.get(rel)
        # The time its output was made from (the record's, else the row's), and the time
        # its last row (perhaps a failure) had.
        made_at = _output_time(record if record and record[0] == rel else (), last)
        same_time = mtime is None or made_at in (None, mtime)
        same_as_last = mtime is None or last.get("input_mtime_ns") in (None, mtime)
        # Complete (existing_outputs checked it), written for this input, and from these
        # bytes (an input whose size or time changed since is done again).
        done_here = (
            out_rel in done
            and last.get("status") != "failed"  # a file there is not this input's result
            and last.get("input_bytes") in (None, size)
            and recorded_size in (None, size)  # (see recorded_size)
            and written_by.get(out_rel, rel) == rel
        )
        # The same bytes would fail the same way: keep the reason, skip the work.
        fails_again = (
            last.get("status") == "failed"
            and last.get("input_bytes") == size
            and (last.get("error") or "").removeprefix(EARLIER).startswith(BAD_INPUT)
            and not retry_failed
        )
        stamp = None  # (the reference's now, where its row recorded one to compare)
        if done_here and same_time and reference and last.get("clean_bytes") is not None:
            stamp = reference.stamp(rel)
        recorded = (last.get("clean_bytes"), last.get("clean_mtime_ns"))
        stale = stamp not in (None, recorded) and not _same_bytes(reference, rel, stamp, last)
        if out_rel in done and not (last or record or unrecorded):
            orphans += 1
            todo.append((rel, size))
        elif done_here and same_time and not stale:
            row = _skipped_row(rel, out_rel, size, last)
            if stamp is not None:  # (its time now, where only that changed)
                row.update(zip(_STAMPS, stamp, strict=True))
            if unrecorded and not last and not record:  # (said once, then lost: the row
                row["error"] = UNRECORDED_NOTE  # keeps it, carried by later runs)
            early.append(row)
        elif fails_again and same_as_last:
            carried = {k: last.get(k) for k in _COLUMNS}
            carried["error"] = _earlier(last["error"])
            early.append(carried)
        else:
            touched += (done_here and not same_time) or (fails_again and not same_as_last)
            restamped += stale
            todo.append((rel, size))
    for rel, why in inputs.unlisted.items():  # (its files, if any, had no row at all)
        reason = f"a folder that could not be listed ({why}): its files are not inputs of this run"
        early.append({"path": rel, "status": "failed", "error": reason, "input_bytes": None})
    if orphans:
        print(
            f"denoise: note: {orphans} output(s) in DST have no row (written by a run that "
            "stopped before keeping their rows): they are done again",
            file=sys.stderr,
        )
    if touched:
        print(
            f"denoise: note: {touched} input(s) have the size recorded but another "
            "modification time (changed in place, or touched): they are done again",
            file=sys.stderr,
        )
    if restamped:
        print(
            f"denoise: note: the --clean references of {restamped} input(s) changed since "
            "their metrics were measured: they are done again",
            file=sys.stderr,
        )
    if redone or kept_cut:
        _note_cut(args.output, redone, kept_cut)
    return early, todo


def _same_bytes(clean: Storage, rel: str, stamp: tuple, last: dict) -> bool:
    """Whether a reference whose time changed since its row still has the bytes the row's
    metrics were of (its size, then its CRC-32)."""
    if stamp[0] != last.get("clean_bytes") or last.get("clean_crc32") is None:
        return False
    try:
        return zlib.crc32(clean.read(rel)) == last["clean_crc32"]
    except Exception:  # (gone since the stat, unreadable: not known to be the same)
        return False


def _unreadable(storage: Storage, rel: str) -> str | None:
    """Why reading the input `rel` fails (as an actor's row would say), or None if it
    reads now (a link whose file has come back since the listing)."""
    try:
        storage.read(rel)
    except Exception as e:
        return _reason(e)
    return None


def _top_column(schema: pa.Schema, name: str) -> str:
    """The top-level column that holds `name`: itself, or "image" for "image.path" (a
    field of a struct column, as Hugging Face datasets store an image's file name)."""
    return name if name in schema.names else name.split(".", 1)[0]


def _parquet_field(schema: pa.Schema, name: str) -> pa.DataType | None:
    """The type of column `name` or of struct field "column.field"; None if neither."""
    if name in schema.names:
        return schema.field(name).type
    top, _, rest = name.partition(".")
    if not rest or top not in schema.names:
        return None
    kind = schema.field(top).type
    if not pa.types.is_struct(kind) or kind.get_field_index(rest) < 0:
        return None
    return kind.field(rest).type


# Parquet column types the job reads: image bytes, and paths (text, bytes decoded as
# UTF-8, or whole numbers: a row id as the name); each also dictionary-encoded.
BYTES_TYPES = (
    pa.types.is_binary,
    pa.types.is_large_binary,
    pa.types.is_fixed_size_binary,
    pa.types.is_binary_view,
)
PATH_TYPES = (
    pa.types.is_string,
    pa.types.is_large_string,
    pa.types.is_string_view,
    pa.types.is_integer,
    *BYTES_TYPES,
)


def _is_one_of(kind: pa.DataType, checks: tuple) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return any(check(kind) for check in checks)


def _parquet_values(table: pa.Table, name: str) -> list:
    """Column or struct field `name` of `table` as Python values (_parquet_column)."""
    return _parquet_column(table, name).to_pylist()


def _parquet_column(table: pa.Table, name: str) -> pa.ChunkedArray | pa.Array:
    """Column or struct field `name` of `table`; a struct of image bytes (Hugging
    Face's Image feature: {bytes, path}) gives its bytes."""
    import pyarrow.compute as pc

    if name in table.column_names:
        column = table.column(name)
    else:
        top, _, rest = name.partition(".")
        column = pc.struct_field(table.column(top), rest)
    if pa.types.is_struct(column.type):
        column = pc.struct_field(column, "bytes")
    return column


def _path_column(schema: pa.Schema, path_column: str | None, image_column: str) -> str:
    """A Parquet file's column of output paths: --path-column where given, else "path",
    or in a file without such a column whose image column is a struct with a "path"
    field (as Hugging Face datasets store images), that field. Decided file by file: a
    Hugging Face file beside files with a "path" column failed as having none."""
    if path_column is not None:
        return path_column
    field = f"{image_column}.path"
    if "path" not in schema.names and _parquet_field(schema, field) is not None:
        return field
    return "path"


def _column_problem(schema: pa.Schema, source: str, path_column: str, image_column: str):
    """Why `source` lacks a column of paths or one of image bytes; None if it has both."""
    paths, images = _parquet_field(schema, path_column), _parquet_field(schema, image_column)
    expected = (
        "The job needs a column of relative output paths (--path-column, text) and one of "
        "encoded image bytes (--image-column: binary, or a struct with a 'bytes' field as "
        "Hugging Face datasets store images)"
    )
    missing = [c for c, kind in ((path_column, paths), (image_column, images)) if kind is None]
    if missing:
        hint = ""
        if images is not None and pa.types.is_struct(images) and paths is None:
            if images.get_field_index("path") >= 0:
                hint = f"; its images' own file names are --path-column {image_column}.path"
        return (
            f"--input {source} has no column(s) {missing}; found {schema.names}. {expected}{hint}."
        )
    if not _is_one_of(paths, PATH_TYPES):
        return f"--input {source}: --path-column {path_column} is {paths}. {expected}."
    if pa.types.is_struct(images):
        index = images.get_field_index("bytes")
        images = images.field(index).type if index >= 0 else images
    if not _is_one_of(images, BYTES_TYPES):
        return f"--input {source}: --image-column {image_column} is {images}. {expected}."
    return None


def _parquet_units(
    inputs: Inputs,
    args: argparse.Namespace,
    within: SourceFolder | None = None,
    settled: Callable[[str, str, int | None], int | None] | None = None,
) -> tuple[list[tuple[str, int]], dict[str, str], list[dict[str, Any]], list[tuple]]:
    """(file, row group) work units, the outputs that more than one row would write or
    that are the folders of other rows' outputs, each with why its rows fail, a failed
    row for each file that cannot be read or lacks the columns (the other files still
    run; if no file can, that is the error, raised),
    and the rows of the row groups settled here, as (path, output, time): groups each
    of whose rows has the size of image bytes `settled(path, output, the file's
    modification time)` says its output was made from (the actors' check, see
    Denoiser._read). Such a group is no unit: a rerun of a finished Parquet job reads
    its images' sizes but starts no Ray."""
    units = []
    seen: set[str] = set()
    twice: set[str] = set()
    bad: list[tuple[str, str]] = []
    done: list[tuple[tuple[str, int], list[tuple]]] = []  # each group settled here: its rows
    own_names = 0  # files whose images' own file names are their outputs' paths
    rows_found = 0
    for source in inputs.parquet:
        try:
            located = _located(source)
            mtime = _mtime_ns(*located) if settled else None
            parquet = _parquet_file(source, located)
            schema = parquet.schema_arrow
            column = _path_column(schema, args.path_column, args.image_column)
            problem = _column_problem(schema, source, column, args.image_column)
            if problem is None:  # only the paths ("image.path": not the image bytes)
                table = parquet.read(columns=[column])
                paths = _parquet_values(table, column)
                own_names += column != (args.path_column or "path")
        except Exception as e:
            problem = f"--input {source} is not a readable Parquet file: {e}"
        if problem:
            bad.append((source, problem))
            continue
        rows_found += parquet.metadata.num_rows
        first = 0
        for group in range(parquet.num_row_groups):
            rows: list[tuple] | None = [] if settled and mtime is not None else None
            last = first + parquet.metadata.row_group(group).num_rows
            for rel in paths[first:last]:
                if rel is None:  # a null path fails on its own (in its actor)
                    rows = None
                    continue
                try:  # (as the actors name it: bytes as UTF-8, a row id as its digits)
                    rel = rel.decode("utf-8") if isinstance(rel, bytes) else str(rel)
                    out_rel = output_for(rel, args.format, foreign=True, within=within)
                except ValueError:  # a path not UTF-8, or unsafe, fails on its own
                    rows = None
                    continue
                (twice if out_rel in seen else seen).add(out_rel)
                size = settled(rel, out_rel, mtime) if rows is not None else None
                if size is None:
                    rows = None
                else:
                    rows.append((rel, out_rel, mtime, size))
            if last == first:  # an empty row group: nothing to do (nor any row to return)
                continue
            first = last
            if rows and _sizes_match(parquet, group, args.image_column, rows):
                done.append(((source, group), [row[:3] for row in rows]))
            else:
                units.append((source, group))
    if bad and len(bad) == len(inputs.parquet):
        raise ValueError(bad[0][1])
    if not rows_found and not bad:  # (as a folder of no files: it said "0 inputs", exit 0)
        n = len(inputs.parquet)
        what = f"its {n} Parquet files hold no rows" if n > 1 else "its Parquet file holds no rows"
        raise ValueError(f"--input {redacted(args.input)}: {what}: nothing to denoise.")
    if own_names:  # (such files were refused, their users told to give that --path-column)
        readable = len(inputs.parquet) - len(bad)
        which = "the Parquet files have"
        if own_names < readable:
            which = f"{own_names} of the {readable} readable Parquet files have"
        print(
            f"denoise: note: {which} no 'path' column: their images' own file names "
            f"({args.image_column}.path) are the outputs' paths (--path-column names another)",
            file=sys.stderr,
        )
    failed = [{"path": redacted(src), "status": "failed", "error": redacted(e)} for src, e in bad]
    # As in _plan: a.png beside a.png/b.png could not be written (or b.png, after it).
    folders = {parent for out_rel in seen for parent in _parents(out_rel)}
    clashes = {out_rel: _folder_clash_reason(out_rel) for out_rel in seen & folders}
    clashes.update(
        (
            out_rel,
            f"its output {out_rel} is also the output of another row of the Parquet input: "
            "each would overwrite the others",
        )
        for out_rel in twice
    )
    skipped = []
    for unit, rows in done:  # a row whose output a later row writes too fails (its actor)
        if any(out_rel in clashes for _, out_rel, _ in rows):
            units.append(unit)
        else:
            skipped += rows
    return units, clashes, failed, skipped


def _sizes_match(parquet: pq.ParquetFile, group: int, image_column: str, rows: list) -> bool:
    """Whether the images of row group `group` have the sizes of `rows` (the last item
    of each); read, not decoded."""
    import pyarrow.compute as pc

    try:
        top = _top_column(parquet.schema_arrow, image_column)
        table = parquet.read_row_group(group, columns=[top])
        column = _parquet_column(table, image_column)
        if pa.types.is_dictionary(column.type) or pa.types.is_binary_view(column.type):
            column = column.cast(pa.large_binary())  # (binary_length has no kernel for them)
        sizes = pc.binary_length(column).to_pylist()
    except Exception:  # (the actors say what is wrong with it)
        return False
    return sizes == [row[-1] for row in rows]


def _run_ray(args, spec, model_bytes, inputs, todo, units, parquet, manifest, start) -> dict:
    """Runs the pipeline on a Ray it connects to (or starts); returns when Ray was
    ready and when the first results came back, in seconds since `start`."""
    import ray

    try:
        with _sigterm_in_ray_init():
            ray.init(include_dashboard=False, log_to_driver=True)
    except ConnectionError as e:  # (an OSError: "the outputs written are kept", of none)
        raise ValueError(_ray_connect_failed(e)) from e
    timings = {"ray_ready_s": round(time.perf_counter() - start, 2), "first_result_s": None}
    pipeline = None
    try:  # (from here on, however it ends, Ray is shut down below)
        _raise_if_stopped()  # (a Ctrl-C that ray.init caught)
        alive = {n.get("NodeManagerAddress") for n in ray.nodes() if n.get("Alive")}
        warn_local_paths(args, alive)
        pipeline = _run_pipeline(
            args, spec, model_bytes, inputs, todo, units, parquet, manifest.start
        )
        for table, from_actor in pipeline:
            if from_actor and timings["first_result_s"] is None:
                timings["first_result_s"] = round(time.perf_counter() - start, 2)
            manifest.add(table)
            _raise_if_stopped()  # (after its rows are in the journal)
    except ray.exceptions.ActorDiedError as e:
        # An error in Denoiser.__init__ (a model that does not load or maps an image to
        # another shape: what the driver cannot see in the config) is the model's fault.
        cause = re.findall(r"^(\w+(?:Error|Exception): .+)$", str(e), re.MULTILINE)
        if "creation task" not in str(e) or not cause:
            raise
        raise ValueError(f"--model {args.model}: the actors cannot use it: {cause[-1]}") from e
    finally:
        # Ray Data's iterator ended while Ray runs: closed later, by the garbage collector
        # after the shutdown (a failed run's), it printed tracebacks after the message.
        if pipeline is not None:
            with contextlib.suppress(Exception):
                pipeline.close()
        _ray_data_threads_ended()
        shutdown_ray()
        _sigterm_as_ctrl_c()  # (again: Ray's shutdown set SIGTERM's default action back)
    return timings


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


def _run_pipeline(args, spec, model_bytes, inputs, todo, units, parquet, on_start=None):
    """The Ray Data pipeline; yields (table of manifest rows, True) per block an actor
    returned, then (rows, False) for the inputs of blocks given up, if any. Calls
    `on_start` once the checks are passed, before the actors are asked for."""
    import ray

    cpus, gpus, workers = _default_resources(
        args.gpus_per_worker, args.workers, args.cpus_per_worker
    )
    if args.allow_autoscale and args.gpus_per_worker is None and not gpus:
        print(
            "denoise: note: no node of this Ray cluster has a GPU now, so the actors run on "
            "CPUs, also on GPU workers an autoscaler adds for them; pass --gpus-per-worker "
            "to ask for GPUs",
            file=sys.stderr,
        )
    check_resources(cpus, gpus, args.allow_autoscale)
    settings = JobSettings(
        model_bytes=model_bytes,
        spec=spec,
        output=args.output,
        source=inputs.storage.location if inputs.kind == "files" else None,
        clean=args.clean,
        fmt=args.format,
        rgb=args.rgb,
        max_batch=args.batch_size,
        quality=args.quality,
        threads=max(1, int(round(cpus))),
        io_threads=args.io_threads or max(io_floor(args), int(round(cpus)) + 1),
        max_pixels=args.max_pixels or None,
        extra={
            "path_column": args.path_column,
            "image_column": args.image_column,
            **parquet,  # outputs two rows would write; sizes earlier runs wrote
        },
    )
    # from_items builds its blocks here; from_arrow would run one remote task per block
    # for its metadata, which on a fresh Ray first waits for a worker process to start
    # (measured: 0.65-0.75 s before the actors are asked for, against 0.26-0.38 s).
    if inputs.kind == "files":
        # One block per --batch-size paths (a block is one actor call, not one task per
        # file), smaller when that would leave actors idle: at least two blocks per actor.
        items = [{"path": rel, "bytes": size, ITEM: i} for i, (rel, size) in enumerate(todo)]
        batch_size = max(1, min(args.batch_size, -(-len(todo) // (2 * workers))))
        what = f"{len(todo)} file{'s' * (len(todo) != 1)}"
        block = f"blocks of up to {batch_size} file{'s' * (batch_size != 1)}"
    else:
        # One block per row group, read inside the actor: no read tasks competing with
        # the actors for CPUs (which can deadlock a small node), and streaming by row group.
        items = [{"path": src, "row_group": group, ITEM: i} for i, (src, group) in enumerate(units)]
        batch_size = 1
        what = f"{len(units)} Parquet row group{'s' * (len(units) != 1)}"
        block = "a row group per block"
    blocks = -(-len(items) // batch_size)
    # No more actors than blocks: one with none would only load the model (on a CPU,
    # TensorFlow's import: seconds of a core the others need), and Ray Data warns of it.
    workers = max(1, min(workers, blocks))
    if args.workers is not None:  # (the default fills the nodes; on none, see check_resources)
        _note_workers_beyond_nodes(args.workers, workers, cpus, gpus, args.allow_autoscale)
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    calls = (
        f"up to {args.batch_size} images per model call"
        if gpus
        else f"model calls of up to {' or '.join(map(str, CPU_CALL_PIXELS))} pixels "
        "(where they differ, whichever each actor times faster)"
    )
    print(
        f"denoise: {what} to do on {workers} worker(s) x {cpus:g} CPU, {gpus:g} GPU; "
        f"{block}, {calls}",
        flush=True,
    )
    with warnings.catch_warnings():  # (Ray 2.60 deprecates the kwargs for Ray 2.64, but
        # has no named parameter for max_task_retries yet)
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
        ds = _map_batches(ds, settings, batch_size, workers, cpus, gpus)
    ds.context.max_errored_blocks = -1  # a block given up: its inputs failed, see below
    if on_start is not None:
        on_start()
    returned = np.zeros(len(items), dtype=bool)
    batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    try:
        for table in batches:
            returned[table.column(ITEM).to_numpy()] = True
            yield table.drop_columns([ITEM]), True
    finally:  # (closed now, not when collected: see _ray_data_threads_ended)
        getattr(batches, "close", lambda: None)()
    lost = [items[i] for i in np.flatnonzero(~returned)]
    if lost:  # (Ray Data logged the error of each block it gave up, above)
        yield pa.Table.from_pylist(_lost_rows(lost), schema=_ROW_SCHEMA), False


def _map_batches(ds, settings: JobSettings, batch_size: int, workers: int, cpus, gpus):
    import ray

    return ds.map_batches(
        Denoiser,
        fn_constructor_kwargs={"settings": settings},
        # A block per call on CPUs: a batch size bundles blocks up to it (from_items makes
        # them a little smaller: blocks of 7 and 6 became calls of 14 and 13), and an
        # actor that dies loses the whole call. GPU actors must be given one (Ray Data
        # refuses them without), so there a call may take two blocks.
        batch_size=batch_size if gpus else None,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus,
        num_gpus=gpus,
        zero_copy_batch=True,
        max_task_retries=BLOCK_TRIES - 1,  # (then the block is given up, not the job)
    )


def _ray_data_threads_ended(timeout: float = 10.0) -> None:
    """Waits (up to `timeout` s) for the threads of Ray Data's closed iterator, which end
    once the block each is fetching comes back. Ray Data does not join them, and one
    that reached Ray after ray.shutdown() ended the process ("The core worker has
    already been shutdown ... The process will exit"), so a run stopped by an error (a
    full disk under the manifest) exited 1 without its error line or its lock marked:
    seen in 1 of 2 runs of that case. At the end of a whole run they are gone already."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread.name == "iter_threaded" or thread.name.startswith("map_tp_"):
            thread.join(max(0.0, deadline - time.monotonic()))


def _item_paths(batch: dict) -> list[str]:
    """The manifest path of each item of a block: a file's, or a Parquet row group's (as a
    row group that cannot be read is recorded)."""
    if "row_group" in batch:
        pairs = zip(batch["path"], batch["row_group"], strict=True)
        return [redacted(f"{source}#row_group={group}") for source, group in pairs]
    return [str(path) for path in batch["path"]]


def _lost_rows(items: list[dict]) -> list[dict]:
    """A failed row for each input of the blocks given up."""
    if not items:
        return []
    how = (
        f" did not come back after {BLOCK_TRIES} tries: its actor died on it each time (an "
        "actor that dies is restarted and its blocks are tried again; killed, e.g. for "
        "memory, or crashed: Ray's log says why), or died with it queued; a rerun does it "
        "again"
    )
    if "row_group" not in items[0]:
        how += ", and a smaller --batch-size puts fewer inputs in a block"
    batch = {key: [item.get(key) for item in items] for key in items[0]}
    rows = [{"path": path, "status": "failed", "error": LOST + how} for path in _item_paths(batch)]
    for row, item in zip(rows, items, strict=True):
        row["input_bytes"] = item.get("bytes")
    return rows


# I/O threads per actor where a location is remote. Each request there waits a network
# round trip (tens of ms on S3), not the CPU, so more of them in flight is what raises
# the rate: against moto's S3 on this machine with 20 ms added per request, 1,000
# digits took 37.6 s with 2 threads and 27.9 s with 16, start-up included (medians of
# 3; moto's own CPU, on the same two cores, was then the limit; jobs/results/BENCHMARKS.md).
REMOTE_IO_THREADS = 16


def io_floor(args) -> int:
    """The least --io-threads' default: 2, or REMOTE_IO_THREADS if --input, --output
    or --clean is not a local path."""
    locations = (args.input, args.output, args.clean)
    return 2 if all(_is_local(x) for x in locations if x) else REMOTE_IO_THREADS


def shutdown_ray() -> None:
    """ray.shutdown(), without its one-second stall on a local Ray's autoscaler monitor.

    ray.shutdown() stops the GCS before the monitor; the monitor's SIGTERM handler
    then tries to reach the GCS until Ray gives up after a second and kills it
    (measured: 1.0 s of a 1.4 s shutdown). The monitor of a Ray this process
    started has nothing left to do, so it is killed first. Ray's own processes are
    in a private attribute: if that changes, this is a plain ray.shutdown().
    Connected to a cluster, this process started no processes and kills nothing."""
    import ray

    try:
        for process in _own_ray_processes("monitor"):
            process.kill()
            process.wait(timeout=1)
    except Exception:  # best effort: ray.shutdown() below stops it anyway
        pass
    ray.shutdown()


def _own_ray_processes(kind: str) -> list:
    """The processes (Popen) of one kind ("monitor") of the local Ray this driver
    started: none when connected to a cluster, or before ray.init. Ray keeps them in a
    private attribute: if that changes, there are none."""
    import ray

    node = getattr(getattr(getattr(ray, "_private", None), "worker", None), "_global_node", None)
    processes = getattr(node, "all_processes", None) or {}
    if not processes.get("gcs_server"):
        return []
    return [info.process for info in processes.get(kind, [])]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", required=True, type=_path, help="a trained .keras model (aelib's denoise)"
    )
    p.add_argument(
        "--input",
        required=True,
        type=_path,
        help="folder tree, glob, one image, or Parquet file(s); a local path or a URI",
    )
    p.add_argument(
        "--output", required=True, type=_path, help="output folder (not SRC nor inside it)"
    )
    p.add_argument(
        "--clean", default=None, type=_path, help="clean references, same relative paths"
    )
    p.add_argument(
        "--batch-size",
        type=_positive,
        default=1024,
        help="image files per block (one actor call; a Parquet input's block is a row "
        "group) and images per model call on a GPU; on a CPU the "
        "model takes slices of a block (32k or 1M pixels each; where they differ, "
        "whichever an actor times faster on its first blocks)",
    )
    p.add_argument(
        "--gpus-per-worker",
        type=_share,
        default=None,
        help="GPUs per actor, fractions allowed (default where the cluster has GPUs: 1/4 on "
        "nodes of 16 CPUs or more per GPU, 1/2 from 8, else 1; 0 without GPUs). An actor "
        "given 0 computes on its CPU",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=_cpu_share,
        default=1.0,
        help="CPUs per actor (at least 0.0001, the smallest share Ray counts)",
    )
    p.add_argument(
        "--allow-autoscale",
        action="store_true",
        help="start even if no node has the CPUs/GPUs an actor asks for now, and wait for "
        "the cluster's autoscaler to add one (default: fail at once)",
    )
    p.add_argument(
        "--io-threads",
        type=_positive,
        default=None,
        help="threads per actor that read, decode, encode and write files (default: CPUs + "
        f"1; at least {REMOTE_IO_THREADS} where --input, --output or --clean is remote)",
    )
    p.add_argument(
        "--workers",
        type=_positive,
        default=None,
        help="actors (default: fill the cluster; never more than the blocks of work)",
    )
    p.add_argument(
        "--format",
        default="same",
        choices=("same", *FORMATS),
        help="output format: 'same' as the input (default), or png, jpeg (or jpg), bmp, tiff, webp",
    )
    p.add_argument(
        "--quality",
        type=_quality,
        default=DEFAULT_QUALITY,
        help="JPEG and WEBP quality, 1-100 (default 95; Pillow's own default, 75, adds "
        "visible compression noise to a denoised image; JPEGs keep colour at full "
        "resolution, 4:4:4). A lossless WEBP input gives a lossless WEBP output, for which "
        "it is the compression effort. With --clean, the metrics of a JPEG/WEBP output are "
        "those of the file as written",
    )
    p.add_argument(
        "--rgb",
        choices=("per-channel", "luminance"),
        default="per-channel",
        help="RGB through a grayscale model: each channel alone (the default), or "
        "converted to gray",
    )
    p.add_argument(
        "--max-pixels",
        type=_non_negative_int,
        default=PILLOW_PIXEL_LIMIT,
        help="images of more pixels (width x height) are failed, not decoded; 0: no limit. "
        f"Default {PILLOW_PIXEL_LIMIT:,}, Pillow's decompression-bomb limit. An image is "
        "decoded whole (then denoised in tiles), so an actor's memory grows with it",
    )
    p.add_argument(
        "--input-format",
        choices=("auto", "files", "parquet"),
        default="auto",
        help="auto (default): Parquet for a .parquet or .pq path, or a folder or glob (local "
        "or in a bucket) of Parquet files with no image files; else image files",
    )
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="on a rerun, retry inputs that failed before even if their size is unchanged",
    )
    p.add_argument(
        "--max-failed",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="exit 3 once the job is done if more than N inputs failed (default: exit 0 "
        "however many failed, unless every input did; 0: any failure fails the command)",
    )
    p.add_argument("--image-column", default="image", help="Parquet column of image bytes")
    p.add_argument(
        "--path-column",
        default=None,
        help="Parquet column of relative paths (default: path; in files without one whose "
        "image column is Hugging Face's struct of bytes and path, IMAGE_COLUMN.path: the "
        "images' own file names)",
    )
    return p


def _non_negative(text: str, strict: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number. Received: {text!r}") from None
    if not (value > 0 if strict else value >= 0) or math.isinf(value):
        bound = "> 0" if strict else ">= 0"
        raise argparse.ArgumentTypeError(f"must be a number {bound}. Received: {text}")
    return value


def _path(text: str) -> str:
    if not text.strip():  # ("$OUT" with OUT unset: the output went into the current folder)
        raise argparse.ArgumentTypeError("expected a path or URI, not an empty string")
    return text


def _share(text: str, strict: bool = False) -> float:
    """A resource share: Ray counts them in steps of 0.0001 (a smaller one failed in Ray,
    after it had started, in a traceback naming no flag)."""
    value = _non_negative(text, strict)
    if (value or strict) and value < 1e-4:
        zero = "" if strict else "0 or "
        raise argparse.ArgumentTypeError(
            f"must be {zero}at least 0.0001, the smallest share Ray counts. Received: {text}"
        )
    return value


def _cpu_share(text: str) -> float:
    return _share(text, strict=True)


def _quality(text: str) -> int:
    value = _positive(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"must be between 1 and 100. Received: {text}")
    return value


def _whole_number(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number. Received: {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}. Received: {text}")
    return value


def _positive(text: str) -> int:
    return _whole_number(text, 1)


def _non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        said = " ".join(extra[:3]) + (f" ... ({len(extra)} in all)" if len(extra) > 3 else "")
        hint = ""
        if args.input and not any(a.startswith("-") for a in extra):  # (what the shell
            hint = (  # makes of --input dir/*.png: a path each; argparse named only them)
                f" (--input takes one path, got {args.input} and these: the shell expands "
                "a glob left unquoted into its files; quote it, e.g. --input 'dir/*.png')"
            )
        parser.error(f"unrecognized arguments: {said}{hint}")
    _STOPS.clear()
    main_thread = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.getsignal(sig) for sig in signals} if main_thread else {}
    _sigterm_as_ctrl_c()  # from the start: a lease taken while planning is given back too
    try:
        summary = run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"denoise: error: {redacted(str(e))}{_credentials_hint(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. DST's disk filled up while the manifest was written
        print(
            f"denoise: error: {redacted(str(e))}. The outputs written are kept; rerun to "
            f"resume.{_credentials_hint(str(e))}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        local = _is_local(args.output)
        folder = os.path.expanduser(args.output.removeprefix("file://")) if local else ""
        if local and not os.path.isdir(folder):  # (stopped while it listed the inputs)
            said = "No output was written (no --output folder): the same command starts again."
        else:
            said = (
                "The outputs written are kept, and their rows in a journal in --output: run "
                "the same command again to resume."
            )
        print(f"denoise: interrupted. {said}", file=sys.stderr)
        return 128 + signal.SIGTERM if signal.SIGTERM in _STOPS else 130  # as a shell does
    finally:
        for sig, handler in previous.items():  # the caller's handlers back (None: set
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)  # outside)
    return _failures_status(summary, args.max_failed)


def _failures_status(summary: dict, max_failed: int | None) -> int:
    """3 where the failures should fail the command (a pipeline, a scheduler: every file
    failed, say for a wrong --input, and the job still exited 0); the job is done either
    way, and its manifest and outputs are complete."""
    failed, inputs = summary["failed"], summary["inputs"]
    if max_failed is not None and failed > max_failed:
        why = f"{failed} of the {inputs} inputs failed, more than --max-failed {max_failed}"
    elif max_failed is None and failed and failed == inputs:
        why = f"every input failed ({failed})"
    else:
        return 0
    print(
        f"denoise: error: {why}; the manifest's error column has each reason",
        file=sys.stderr,
    )
    return 3


_STOPS: list[int] = []  # SIGINT or SIGTERM received (see _raise_if_stopped)


def _sigterm_as_ctrl_c() -> None:
    """SIGTERM (`kill`, a scheduler or container stopping the driver) ends the job as
    Ctrl-C does: the rows received so far stay in the journal, the run's lock or lease is
    released, the driver says to rerun and exits 143. Before, Ray's handler printed its
    stack lines and killed the driver wherever it was (the rerun still resumed, as after
    a crash). Ctrl-C gets the same handler, which records the stop for _raise_if_stopped,
    where Python's own handler is in place (a SIGINT the caller ignores stays ignored).
    Set when the job starts, and again after ray.init and ray.shutdown."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_stop)
        if signal.getsignal(signal.SIGINT) in (signal.default_int_handler, _on_stop):
            signal.signal(signal.SIGINT, _on_stop)


def _on_stop(signum, frame) -> None:
    _STOPS.append(signum)
    raise KeyboardInterrupt


def _raise_if_stopped() -> None:
    """Raises the KeyboardInterrupt of a Ctrl-C or SIGTERM again, at a point of the driver's
    loop: where one lands in code that catches it (a finalizer, a library's cleanup), it
    was lost, and the job went on to its end and exited 0 (2 of 14 Ctrl-Cs in a helper's
    runs under load, once inside ray.init)."""
    if _STOPS:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_in_ray_init():
    """A SIGTERM while ray.init runs takes the Ctrl-C path, as later on.

    ray.init set Ray's handlers first thing, which raise SystemExit wherever the driver
    is. ray.init forks Ray's processes, and in logging's at-fork hook Python drops the
    exception with the logging module's lock still held: the job went on and hung for
    good at the first log line of Ray Data's thread, holding DST's lock (once in ~20
    SIGTERMs 2 s after the start, in a reviewer's runs). Ray's are not set now; ours
    raises, but not in logging (_on_sigterm_in_ray_init), and is set again once Ray is
    up. (A Ray that sets them another way: its SystemExit is taken as the stop.)"""
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
        _STOPS.append(signal.SIGTERM)
        raise KeyboardInterrupt from None
    finally:
        if ray_sets is not None:
            ray_utils.set_sigterm_handler = ray_sets
        _sigterm_as_ctrl_c()


def _on_sigterm_in_ray_init(signum, frame) -> None:
    """Records the stop and raises KeyboardInterrupt, where the main thread is in no
    function of logging's: there (its at-fork hook drops the exception and keeps its
    lock) the signal comes again 50 ms later, while ray.init still runs (after it, the
    recorded stop is acted on: a signal sent again then broke into the job's shutdown)."""
    if signum not in _STOPS:
        _STOPS.append(signum)
    if frame is not None and frame.f_code.co_filename == logging.__file__:
        again = threading.Timer(0.05, _sigterm_again_in_ray_init, (signum,))
        again.daemon = True
        again.start()
        return
    raise KeyboardInterrupt


def _sigterm_again_in_ray_init(signum: int) -> None:
    if signal.getsignal(signal.SIGTERM) is _on_sigterm_in_ray_init:
        _thread.interrupt_main(signum)


def _one_line(text: str) -> str:
    """`text` with its control characters escaped as Python writes them (a Parquet row's
    path "a\\x00b.png" put a NUL in the log, which grep then took for a binary file)."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def _credentials_hint(text: str) -> str:
    """What to do about an object store that turned the job away for lack of credentials
    (the clients' own messages name no flag or variable)."""
    if "OAuth2 access token" in text:
        return (
            "\ndenoise: no Google Cloud credentials were found: set GOOGLE_APPLICATION_CREDENTIALS "
            "to a service account's key file or run `gcloud auth application-default login`; "
            "a public bucket needs none: gs://anonymous@BUCKET/..."
        )
    return ""


def exit_without_teardown(main: Callable[[], int | None]) -> NoReturn:
    """Runs `main` and exits with its status, without tearing down the interpreter.

    With Ray, pyarrow and pandas loaded, the interpreter's teardown took 0.3-0.45 s after
    the job's summary line, time a user waits for nothing: by then the manifest is
    closed and Ray is shut down. The exit handlers (atexit: Ray's, logging's) still run.
    Errors other than SystemExit propagate as usual, with their traceback."""
    try:
        code = main()
    except SystemExit as e:  # argparse's errors, sys.exit("message")
        code = e.code
    if isinstance(code, str):  # what sys.exit(message) prints and returns
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    exit_without_teardown(main)
