"""Benchmark of jobs/denoise.py against a plain loop and a documentation-shaped Ray pipeline.

    python jobs/bench_denoise.py --data /work/shared/data/mnist.npz --work /tmp/bench_denoise \
        --count 50000 --memory-counts 10000,100000

Writes --count noisy MNIST digits as PNGs once (cached under WORK/images_N),
trains a `denoise` model for one epoch unless --model is given, then times four
ways of denoising every file, each as a fresh process so startup (Python,
TensorFlow, Ray; all but Ray's for the fourth) is included:

  plain  one process: PIL read, `model.predict` on batches of 1,024, PIL write
  docs   the shape of Ray's batch-inference docs: `ray.data.read_images` ->
         `map_batches` with an actor class that loads the model once ->
         `write_images`
  job    `python jobs/denoise.py --model M --input IMAGES --output OUT`
  job_running_ray
         the same command on a Ray head started before the clock starts
         (cluster/local.py's plain head: what `ray start --head` gives, dashboard
         and all), as `ray submit` runs the job on a cluster that is up: Ray's own
         start (and the idle workers it starts ahead) is left out, the actors'
         imports and model load are not. The CPU seconds of the head's processes
         during the run count with the job's.

and prints images/s side by side with the job's ratios to both (and the fourth's). With
--memory-counts it then runs the job on each count and samples the proportional
set size (PSS: shared pages split between the processes that map them, so Ray's
shared-memory object store is not counted once per worker) of the whole process
tree (driver, GCS, raylet, workers) every 0.2 s, and prints the peaks.
Every run also reports the CPU seconds (user + system) of its whole process
tree: on a machine shared with other work, wall-clock images/s follow the
others' load, CPU seconds much less. The load average is printed beside each run.

Hygiene: the methods run --repeats rounds, each round in a rotated order, and
the median run of each is reported. Every run writes to a folder of its own
(all deleted at the end), after a sync and --settle seconds. On this VM's disk,
creating a small file costs 20 us to 400 us of kernel time, and it is slow for
minutes after many files were deleted; --out-dir on a tmpfs (/dev/shm/...)
takes that out of the comparison. One more run of each method on
--startup-count images splits the time into start-up and steady images/s.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # (also when loaded by its path, as the tests do)

from bench_common import at_least_one, given_file  # noqa: E402


def _seconds(text: str) -> float:
    """argparse type of a wait: seconds >= 0 (-1 failed in time.sleep, after the images
    were written)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds. Received: {text!r}") from None
    if not value >= 0:  # (NaN too)
        raise argparse.ArgumentTypeError(f"must be >= 0. Received: {text}")
    return value


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # A fresh local Ray per run, not someone's cluster: an exported RAY_ADDRESS (what
    # cluster/local.py env leaves in the shell) had the job join it, its start-up and the
    # actors' CPU out of the figures.
    env["RAY_ADDRESS"] = "local"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


# ----------------------------------------------------------------------------
# The two baselines, run as `python jobs/bench_denoise.py _plain|_docs ...`.


def plain_loop(model_path: str, input_dir: str, output_dir: str, batch_size: int = 1024) -> int:
    """The plain single-process loop: PIL read, model.predict on batches, PIL write."""
    import numpy as np
    from PIL import Image

    import aelib
    from aelib import data as data_lib

    model = aelib.load(model_path, compile=False).autoencoder
    root, out = Path(input_dir), Path(output_dir)
    files = data_lib.list_images(root)
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        x = np.stack([data_lib.read_gray(p) for p in chunk]).astype("float32") / 255.0
        y = model.predict(x[..., None], batch_size=batch_size, verbose=0)
        y = np.rint(np.clip(y[..., 0], 0, 1) * 255).astype(np.uint8)
        for path, image in zip(chunk, y, strict=True):
            target = out / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(target)
    return len(files)


def plain_photos(model_path: str, input_dir: str, output_dir: str) -> int:
    """The plain loop for big images, one at a time: PIL read, pad to the sides the
    model needs, `model.predict` on the whole image, crop, PIL write. Prints the
    seconds spent in `model.predict` (the model alone, on whole images)."""
    import numpy as np
    from PIL import Image

    import aelib
    from aelib import data as data_lib

    sys.path.insert(0, str(HERE))
    import denoise as job

    multiple = job.inspect_model(Path(model_path).read_bytes(), model_path).multiple
    model = aelib.load(model_path, compile=False).autoencoder
    root, out = Path(input_dir), Path(output_dir)
    files = data_lib.list_images(root)
    in_model = 0.0
    for path in files:
        x = data_lib.read_gray(path).astype("float32") / 255.0
        h, w = x.shape
        x = np.pad(x, ((0, -h % multiple), (0, -w % multiple)), mode="edge")
        begin = time.perf_counter()
        y = model.predict(x[None, ..., None], verbose=0)
        in_model += time.perf_counter() - begin
        y = np.rint(np.clip(y[0, :h, :w, 0], 0, 1) * 255).astype(np.uint8)
        target = out / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(y).save(target)
    print(f"_plain_photos: model.predict {in_model:.2f} s", flush=True)
    return len(files)


class DocsDenoiser:
    """The model class of Ray's batch-inference docs: load in __init__, predict in __call__."""

    def __init__(self, model_path: str):
        import aelib

        self.model = aelib.load(model_path, compile=False).autoencoder

    def __call__(self, batch):
        import numpy as np

        x = batch["image"].astype("float32")[..., None] / 255.0
        y = self.model.predict(x, batch_size=len(x), verbose=0)
        batch["image"] = np.rint(np.clip(y[..., 0], 0, 1) * 255).astype(np.uint8)
        return batch


def docs_pipeline(model_path: str, input_dir: str, output_dir: str, batch_size: int = 1024) -> int:
    """read_images -> map_batches(actor) -> write_images, as Ray's documentation shows it."""
    import ray

    ray.init(include_dashboard=False)
    # One CPU stays free for the read and write tasks: actors on every CPU leave
    # read_images no CPU and the pipeline waits forever (seen on a 2-CPU machine).
    workers = max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)
    ds = ray.data.read_images(input_dir, mode="L")
    ds = ds.map_batches(
        DocsDenoiser,
        fn_constructor_kwargs={"model_path": model_path},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1,
        num_gpus=0,
    )
    ds.write_images(output_dir, column="image", file_format="png")
    return sum(1 for p in Path(output_dir).rglob("*.png"))


# ----------------------------------------------------------------------------
# Timing and memory.


def actor_stages(model: str, images: Path, out: Path) -> None:
    """Where an actor's time per image goes: one `Denoiser` in this process on one CPU
    (one TensorFlow thread, one I/O thread), fed the job's blocks of 1,024 files.
    The first blocks warm up and choose the model call size, and are not counted; then
    every block but the first is timed. Prints microseconds per image."""
    sys.path.insert(0, str(HERE))
    import denoise as job
    import numpy as np
    import ray

    files = [rel for rel, _ in job.find_inputs(str(images), "auto").files]
    settings = job.JobSettings.in_process(model, str(images), str(out))
    ray.init(num_cpus=1, include_dashboard=False)  # the actor asks Ray for its node id
    try:
        actor = job.Denoiser(settings)
        spent = {"_read": 0.0, "_decode": 0.0, "_denoise": 0.0, "predict": 0.0, "_finish": 0.0}
        for name in spent:
            method = getattr(actor, name)

            def timed_call(*a, _method=method, _name=name, **kw):
                begin = time.perf_counter()
                try:
                    return _method(*a, **kw)
                finally:
                    spent[_name] += time.perf_counter() - begin

            setattr(actor, name, timed_call)
        blocks = [files[i : i + 1024] for i in range(0, len(files), 1024)]
        # Warm-up, not counted: the first block, then as many more as the actor takes to
        # choose its model call size (its trials run some blocks at the slower size).
        full = [block for block in blocks if len(block) == 1024]
        for i in range(8):
            if i and actor._call_pixels is not None:
                break
            actor({"path": np.array(full[i % len(full)], dtype=object)})
        for name in spent:  # in place: the wrappers above add to this dict
            spent[name] = 0.0
        begin = time.perf_counter()
        for block in blocks[1:]:
            actor({"path": np.array(block, dtype=object)})
        total = time.perf_counter() - begin
        calls = model_call_sizes(actor, settings.spec.channels)
        sizer = actor._sizer
    finally:
        ray.shutdown()
    n = sum(len(b) for b in blocks[1:])
    us = {k: v / n * 1e6 for k, v in spent.items()}
    print(
        f"stages: {n} images on one CPU, microseconds per image: total {total / n * 1e6:.0f}; "
        f"read + decode {us['_read'] + us['_decode']:.0f}; model {us['predict']:.0f}; "
        f"pad/crop {us['_denoise'] - us['predict']:.0f}; encode + write {us['_finish']:.0f}; "
        f"rows {(total - sum(spent.values()) + spent['predict']) / n * 1e6:.0f}",
        flush=True,
    )
    print(
        "model alone on one thread, microseconds per 28x28 image by images per call: "
        + ", ".join(f"{size}: {us:.0f}" for size, us in calls.items())
        + f" (the job's actors time calls of {job.CPU_CALL_PIXELS} pixels and keep the faster)",
        flush=True,
    )
    print(f"stages: the actor's {sizer}", flush=True)


def model_call_sizes(actor, channels: int, sizes=(16, 32, 64, 256, 1024)) -> dict[int, float]:
    """Microseconds per image of the actor's traced model alone, by images per call,
    on 4,096 digit-sized inputs (twice each; the faster pass counts)."""
    import numpy as np

    x = np.random.default_rng(0).random((4096, 28, 28, channels), dtype=np.float32)
    result = {}
    for size in sizes:
        best = math.inf
        for _ in range(2):
            begin = time.perf_counter()
            for i in range(0, len(x), size):
                np.asarray(actor._run(x[i : i + size]))
            best = min(best, time.perf_counter() - begin)
        result[size] = best / len(x) * 1e6
    return result


def _tree_sample(
    roots: int | list[int],
    cpu: dict[int, float],
    memory: bool,
    names: dict[int, str] | None = None,
) -> tuple[int, int]:
    """(PSS, RSS) in bytes summed over the processes `roots` (a pid or a list) and their
    descendants, each once (0, 0 unless `memory`); records each one's CPU seconds (user +
    system) so far in `cpu`, and its name as it runs now in `names` (a Ray worker renames
    itself for its actor)."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / _TICKS
    pss = rss = 0
    stack = [roots] if isinstance(roots, int) else list(roots)
    seen: set[int] = set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        if pid not in times:  # (a root that has ended: what it took was recorded before)
            continue
        stack.extend(children.get(pid, []))
        cpu[pid] = max(cpu.get(pid, 0.0), times[pid])
        if names is not None:
            names[pid] = _process_name(pid) or names.get(pid, "?")
        if not memory:
            continue
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return pss, rss


_TICKS = os.sysconf("SC_CLK_TCK")


def _process_name(pid: int) -> str | None:
    """What process `pid` is, from its command line: a Ray worker's title (`ray::Denoiser`,
    `ray::IDLE`; its method cut off) or a dashboard module's (`ray-dashboard-JobHead-0`),
    a Python script's or module's name, else the program's (`raylet`, `gcs_server`); None
    once it has ended."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not argv or not argv[0]:
        return None
    if argv[0].startswith("ray::"):  # (setproctitle: one string, spaces and all)
        return argv[0].split()[0].split(".")[0]
    if argv[0].startswith("ray-dashboard-"):  # (the same: "ray-dashboard-JobHead-0 (python ...)")
        return argv[0].split()[0]
    program = os.path.basename(argv[0])
    if program.startswith("python"):
        for i, arg in enumerate(argv[1:], 1):
            if arg == "-m" and i + 1 < len(argv):
                return argv[i + 1]
            if arg.endswith(".py"):
                return os.path.basename(arg)
    return program


def _cpu_by_process(cpu: dict[int, float], names: dict[int, str]) -> dict[str, float]:
    """CPU seconds by process name (the processes of one name summed), the most first."""
    totals: dict[str, float] = {}
    for pid, seconds in cpu.items():
        name = names.get(pid, "?")
        totals[name] = totals.get(name, 0.0) + seconds
    return {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def _job_startup(log: Path) -> dict[str, float]:
    """The start-up figures of the job's summary line (`denoise-summary {...}`)."""
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("denoise-summary "):
            summary = json.loads(line.removeprefix("denoise-summary "))
            keys = ("ray_ready_s", "first_result_s")
            return {k: summary[k] for k in keys if summary.get(k) is not None}
    return {}


def timed(
    cmd: list[str],
    log: Path,
    memory: bool = False,
    env: dict[str, str] | None = None,
    also: list[int] = (),
) -> dict[str, float]:
    """Runs `cmd` (in `env`, default `_env()`); returns wall seconds, CPU seconds (in all,
    and by process name) and (with `memory`) peak PSS/RSS of its process tree. `also`:
    processes already running (a Ray head's) whose trees count too, their CPU seconds
    before the run taken off.

    The tree is sampled every 0.2 s, so CPU time of processes that live less than
    that is missed; on a loaded machine CPU seconds are a steadier measure than wall.
    Memory is sampled only when asked: reading smaps_rollup of the job's 13 processes
    costs the benchmark about 70 ms of CPU per sample (a quarter of a core at 0.2 s),
    which would slow the many-process job more than the one-process loop it is timed
    against. The speed runs therefore sample CPU seconds only (about 1 ms a sample).
    """
    peak = {"pss": 0, "rss": 0}
    cpu: dict[int, float] = {}
    names: dict[int, str] = {}
    before: dict[int, float] = {}
    if also:
        _tree_sample(list(also), before, False)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=_env() if env is None else env
        )

        def sample():
            while proc.poll() is None:
                pss, rss = _tree_sample([proc.pid, *also], cpu, memory, names)
                peak["pss"], peak["rss"] = max(peak["pss"], pss), max(peak["rss"], rss)
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        seconds = time.perf_counter() - start
        sampler.join()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}; see {log}")
    if also:  # (the end of the head's processes' run: sampled once more)
        _tree_sample(list(also), cpu, False, names)
        cpu = {pid: total - before.get(pid, 0.0) for pid, total in cpu.items()}
    return {
        "seconds": seconds,
        "cpu_seconds": sum(cpu.values()),
        "cpu_by_process": _cpu_by_process(cpu, names),
        "peak_pss": peak["pss"] if memory else None,
        "peak_rss": peak["rss"] if memory else None,
    }


def ensure_images(data: str | None, work: Path, count: int, largest: int) -> Path:
    """WORK/images_N/noisy with N noisy digits, made once: the largest set is written,
    smaller ones are hard links to its first N files (same digits, same noise)."""
    folder = work / f"images_{count}"
    noisy = folder / "noisy"
    done = folder / "complete.json"
    if done.is_file() and json.loads(done.read_text()).get("count") == count:
        return noisy
    if count < largest:
        source = ensure_images(data, work, largest, largest)
        shutil.rmtree(folder, ignore_errors=True)
        for path in source.rglob("*.png"):
            if int(path.stem) < count:
                target = noisy / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, target)
    else:
        print(f"bench: writing {count} noisy digits to {noisy} (once) ...", flush=True)
        sys.path.insert(0, str(HERE))
        import make_noisy

        make_noisy.make_noisy(data, count, noisy, folder / "clean")
    done.write_text(json.dumps({"count": count}))
    return noisy


def ensure_photos(data: str | None, work: Path, count: int, size: tuple[int, int]) -> Path:
    """WORK/photos_WxH_N/noisy with N noisy photo-sized grayscale PNGs, made once: each a
    grid of test digits (shifted by one digit per photo) with the tutorial's noise."""
    width, height = size
    folder = work / f"photos_{width}x{height}_{count}"
    noisy = folder / "noisy"
    done = folder / "complete.json"
    if done.is_file() and json.loads(done.read_text()).get("count") == count:
        return noisy
    print(f"bench: writing {count} noisy {width}x{height} images to {noisy} (once) ...")
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(HERE))
    import make_noisy

    data_lib = make_noisy.data_lib
    (_, _), (digits, _) = data_lib.load_mnist(data)
    rows, cols = -(-height // 28), -(-width // 28)
    noisy.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pick = (np.arange(rows * cols) + i) % len(digits)
        grid = digits[pick].reshape(rows, cols, 28, 28).transpose(0, 2, 1, 3)
        plane = data_lib.scale(grid.reshape(rows * 28, cols * 28)[:height, :width])
        plane = data_lib.add_noise(plane, 0.5, seed=i)
        Image.fromarray(np.round(plane * 255).astype(np.uint8)).save(noisy / f"{i:04d}.png")
    done.write_text(json.dumps({"count": count}))
    return noisy


def ensure_model(args: argparse.Namespace, work: Path) -> str:
    if args.model:
        return args.model
    path = work / "model" / "denoise.keras"
    if not path.is_file():
        print("bench: training a denoise model for one epoch ...", flush=True)
        cmd = [sys.executable, "-m", "aelib", "train", "--model", "denoise", "--epochs", "1"]
        cmd += ["--out", str(path.parent), "--no-figures", "--test-limit", "1000"]
        if args.data:
            cmd += ["--data", args.data]
        subprocess.run(cmd, check=True, env=_env(), stdout=subprocess.DEVNULL)
    return str(path)


# The head of `job_running_ray`: Ray's default object store on this machine would be 30%
# of its memory; the job's blocks of paths and rows need far less.
HEAD_OBJECT_STORE_BYTES = 2 * 2**30


@contextlib.contextmanager
def running_ray():
    """A Ray head on this machine for the length of the block, as `ray start --head`
    gives one (cluster/local.py's plain head: a dashboard, token auth, usage stats off,
    free ports, the CPUs this process may use); yields the environment a driver reaches it
    with and the pids of its processes (their trees hold the workers it starts). Its files
    go in a new folder under RAY_TMPDIR (default /tmp), as Ray's own do. Stopped, its own
    processes only, and that folder removed at the end, also on SIGTERM (not on SIGKILL)."""
    spec = importlib.util.spec_from_file_location("aelib_cluster_local", ROOT / "cluster/local.py")
    local = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(local)
    # (A short name: Ray's unix sockets live below it, at most 107 bytes a path.)
    state_dir = Path(tempfile.mkdtemp(prefix="bray", dir=os.environ.get("RAY_TMPDIR") or "/tmp"))
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        state = local.start(
            None,
            state_dir,
            head_cpus=len(os.sched_getaffinity(0)),
            head_object_store_bytes=HEAD_OBJECT_STORE_BYTES,
        )
        pids = local._cluster_pids(state_dir)
        if not pids:  # (its processes not found: the CPU seconds would be the driver's only)
            raise RuntimeError(f"no process of the Ray head started in {state_dir} was found")
        yield local.client_env(state, _env()), pids
    finally:
        local.stop(state_dir, remove=True)
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum, frame):
    """SIGTERM as an exit, so that `finally` blocks (the head's stop) run."""
    raise SystemExit(128 + signum)


def _command(name: str, model: str, images: Path) -> list[str]:
    """The command of one method, without its output folder (the last argument)."""
    if name in ("job", "job_running_ray"):
        job = [sys.executable, str(HERE / "denoise.py"), "--model", model, "--input", str(images)]
        return [*job, "--output"]
    return [sys.executable, str(HERE / "bench_denoise.py"), f"_{name}", model, str(images)]


def settle(seconds: float) -> None:
    """Flushes what the last run wrote and lets the disk settle, so no run pays for
    the one before it (on this VM's disk that cost is large)."""
    os.sync()
    time.sleep(seconds)


def _rate(per_s: float) -> str:
    """Images/s for a table: digits by the thousand, photos by the second."""
    return f"{per_s:7.0f}" if per_s >= 100 else f"{per_s:7.2f}"


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    baselines = {"_plain": plain_loop, "_docs": docs_pipeline, "_plain_photos": plain_photos}
    if argv and argv[0] in baselines:  # the baselines' own processes
        model, src, dst = argv[1:4]
        run = baselines[argv[0]]
        print(f"{argv[0]}: {run(model, src, dst)} images", flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="mnist.npz (default: $AELIB_MNIST)")
    p.add_argument("--work", required=True, help="folder for images, model, outputs, logs")
    p.add_argument(
        "--count",
        type=int,
        default=None,
        help="images for the speed comparison (default: 50,000 digits, or 12 with --photos)",
    )
    p.add_argument("--model", default=None, help="a denoise .keras (default: train one)")
    p.add_argument(
        "--only",
        default=None,
        help="comma list of runs: plain, docs, job, job_running_ray (default: all four; "
        "plain,job with --photos)",
    )
    p.add_argument(
        "--photos",
        default=None,
        metavar="WxH",
        help="instead of digits, time --count noisy grayscale images of W x H pixels (e.g. "
        "4032x3024), which the job tiles: the plain loop then runs `model.predict` on "
        "each whole image, and its seconds in the model are printed as the model's own "
        "rate on this machine (the docs pipeline is for digits only)",
    )
    p.add_argument(
        "--memory-counts",
        default="",
        help="comma list of image counts for the job's peak-memory runs, e.g. 10000,100000",
    )
    p.add_argument("--prepare-only", action="store_true", help="write the images, then stop")
    p.add_argument(
        "--stages",
        type=int,
        default=0,
        help="instead: time one denoise actor's stages (read+decode, model, encode+write) "
        "in this process on this many images, and print microseconds per image",
    )
    p.add_argument(
        "--repeats", type=at_least_one, default=3, help="rounds of every method (median reported)"
    )
    p.add_argument(
        "--startup-count",
        type=int,
        default=None,
        help="also time each method once on this many images, to split start-up from "
        "steady throughput (default: 1,000 digits; 0, skipped, with --photos)",
    )
    p.add_argument("--settle", type=_seconds, default=3.0, help="seconds to wait after sync (>= 0)")
    p.add_argument(
        "--out-dir",
        default=None,
        help="where the runs write their outputs (default: --work). A tmpfs such as "
        "/dev/shm/bench takes the disk's file-creation cost out of the comparison",
    )
    args = p.parse_args(argv)
    given_file(p, "--data", args.data, "Keras's mnist.npz")
    photo = None
    if args.photos:
        match = re.fullmatch(r"(\d+)x(\d+)", args.photos)
        if not match or min(int(match[1]), int(match[2])) < 1:
            p.error(f"--photos {args.photos}: expected WIDTHxHEIGHT in pixels, e.g. 4032x3024")
        photo = (int(match[1]), int(match[2]))
        if args.stages:
            p.error("--stages times digits; it does not combine with --photos")
    given_file(p, "--model", args.model, "a trained denoise .keras")
    for flag in ("count", "startup_count", "stages"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            p.error(f"--{flag.replace('_', '-')} {value}: expected a number of images >= 0")
    if args.count is None:
        args.count = 12 if photo else 50_000
    if args.startup_count and args.count and args.startup_count >= args.count:
        p.error(
            f"--startup-count {args.startup_count}: expected fewer images than --count "
            f"{args.count} (it times a smaller run to split start-up from steady images/s)"
        )
    if args.startup_count is None:
        args.startup_count = 0 if photo else 1000
        if args.count and args.startup_count >= args.count:  # (the default's too small a run)
            print(
                f"bench_denoise: note: no start-up split: --count {args.count} is not above "
                f"the default --startup-count {args.startup_count} (give a smaller one)",
                file=sys.stderr,
            )
    allowed = ["plain", "job", "job_running_ray"]
    if not photo:
        allowed.insert(1, "docs")
    default = ["plain", "job"] if photo else allowed
    names = [n for n in (args.only or ",".join(default)).split(",") if n]
    if not names or set(names) - set(allowed):
        p.error(
            f"--only {args.only}: expected a comma list of {', '.join(allowed)}"
            + (" (the docs pipeline is for digits only)" if photo else "")
        )
    if args.stages and args.stages <= 1024:
        p.error(
            f"--stages {args.stages}: needs more than 1024 images (the first block of 1,024 "
            "warms the actor up and is not counted)"
        )
    try:
        memory_counts = [int(c) for c in args.memory_counts.split(",") if c.strip()]
    except ValueError:
        memory_counts = [0]
    if any(c < 1 for c in memory_counts):
        p.error(f"--memory-counts {args.memory_counts}: expected a comma list of image counts >= 1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out_root = Path(args.out_dir) if args.out_dir else work
    out_root.mkdir(parents=True, exist_ok=True)
    model = ensure_model(args, work)
    largest = max([args.count, *memory_counts])

    def images_for(count: int) -> Path:
        if photo:
            return ensure_photos(args.data, work, count, photo)
        return ensure_images(args.data, work, count, largest)

    if args.stages:
        out = out_root / "out_stages"
        shutil.rmtree(out, ignore_errors=True)
        try:
            actor_stages(model, ensure_images(args.data, work, args.stages, args.stages), out)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return 0
    if args.prepare_only:
        sizes = {args.count, *memory_counts, args.startup_count if args.count else 0}
        for count in sorted(sizes - {0}, reverse=True):
            images_for(count)
        return 0
    results: dict[str, dict[str, float]] = {}
    width = max(6, *map(len, names))  # (the tables' first column)
    if args.count:
        runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        small: dict[str, dict[str, float]] = {}
        counts = [args.count] * args.repeats
        if 0 < args.startup_count < args.count:
            counts.append(args.startup_count)
        for r, count in enumerate(counts):
            images = images_for(count)
            order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
            for name in order:
                out = out_root / f"out_{name}_{r}"  # fresh: no run pays for deleting another's
                shutil.rmtree(out, ignore_errors=True)
                cmd = [
                    *_command(
                        name + ("_photos" if photo and name == "plain" else ""), model, images
                    ),
                    str(out),
                ]
                with contextlib.ExitStack() as stack:
                    env, also = None, ()
                    if name == "job_running_ray":  # (started, then settled, before the clock)
                        env, also = stack.enter_context(running_ray())
                    settle(args.settle)
                    print(f"bench: {name} on {count} images (load {_load()}) ...", flush=True)
                    result = timed(cmd, work / f"{name}.log", env=env, also=also)
                result["images_per_s"] = count / result["seconds"]
                if name.startswith("job"):  # when Ray was ready and the first results came back
                    result.update(_job_startup(work / f"{name}.log"))
                if photo and name == "plain":  # its seconds inside model.predict
                    found = re.search(r"model.predict ([\d.]+) s", (work / "plain.log").read_text())
                    result["model_seconds"] = float(found[1]) if found else math.nan
                if r < args.repeats:
                    runs[name].append(result)
                else:
                    small[name] = result
                print(
                    f"bench: {name:{width}s} {result['seconds']:7.1f} s  "
                    f"{_rate(result['images_per_s'])} "
                    f"images/s  {result['cpu_seconds']:7.1f} CPU-s  (load {_load()})",
                    flush=True,
                )
        for name in names:
            ordered = sorted(runs[name], key=lambda run: run["seconds"])
            # the median run (of an even count, the slower of the middle two)
            results[name] = dict(ordered[len(ordered) // 2])
            results[name]["all_seconds"] = [run["seconds"] for run in runs[name]]
            if name in small:  # fixed cost and steady rate from the two sizes
                extra = results[name]["seconds"] - small[name]["seconds"]
                results[name]["small_run"] = {"images": args.startup_count, **small[name]}
                results[name]["steady_images_per_s"] = (
                    (args.count - args.startup_count) / extra if extra > 0 else None
                )
        print(f"bench: medians of {args.repeats} run(s) each, {args.count} images:", flush=True)
        for name in names:
            r = results[name]
            line = (
                f"bench:   {name:{width}s} {r['seconds']:7.1f} s  {_rate(r['images_per_s'])} "
                "images/s "
                f"(runs: {', '.join(f'{x:.1f}' for x in r['all_seconds'])} s)"
            )
            if r.get("steady_images_per_s"):
                line += (
                    f"; {args.startup_count} images took {r['small_run']['seconds']:.1f} s, "
                    f"so about {r['steady_images_per_s']:.0f} images/s after start-up"
                )
            if r.get("small_run", {}).get("first_result_s") is not None:
                line += (
                    f" (Ray ready after {r['small_run']['ray_ready_s']:.1f} s, first results "
                    f"after {r['small_run']['first_result_s']:.1f} s)"
                )
            print(line, flush=True)
    for which in ("job", "job_running_ray"):  # (the second: Ray started before the clock)
        if which not in results:
            continue
        job = results[which]
        speed = f"bench: {which} at {_rate(job['images_per_s']).strip()} images/s"
        cpu = f"bench: CPU seconds: {which} {job['cpu_seconds']:.1f}"
        for base in ("plain", "docs"):
            if base in results:
                other = results[base]
                ratio = job["images_per_s"] / other["images_per_s"]
                speed += f"; {ratio:.2f}x {base} ({_rate(other['images_per_s']).strip()} images/s)"
                ratio = job["cpu_seconds"] / other["cpu_seconds"]
                cpu += f", {base} {other['cpu_seconds']:.1f} ({which}/{base} {ratio:.2f}x)"
        print(speed, flush=True)
        print(cpu, flush=True)
        by_process = ", ".join(  # (the results file keeps the ones under 0.05 s too)
            f"{k} {v:.1f}" for k, v in job["cpu_by_process"].items() if v >= 0.05
        )
        whose = "the job's" if which == "job" else f"{which}'s"
        print(f"bench: {whose} CPU seconds by process (its median run): {by_process}")
    if "job" in results:
        job = results["job"]
        if photo:
            pixels = args.count * photo[0] * photo[1] / 1e6
            line = f"bench: megapixels/s: job {pixels / job['seconds']:.2f}"
            if "plain" in results:
                plain = results["plain"]
                alone = pixels / plain["model_seconds"]
                line += (
                    f", plain {pixels / plain['seconds']:.2f}; the model alone on whole images "
                    f"(plain's model.predict) {alone:.2f}: the job, start-up included, runs at "
                    f"{pixels / job['seconds'] / alone:.0%} of the model's own rate"
                )
            print(line, flush=True)
    memory = {}
    for count in memory_counts:
        images = images_for(count)
        out = out_root / f"out_memory_{count}"
        shutil.rmtree(out, ignore_errors=True)
        settle(args.settle)
        cmd = [sys.executable, str(HERE / "denoise.py"), "--model", model]
        cmd += ["--input", str(images), "--output", str(out)]
        print(f"bench: job on {count} images, sampling memory (load {_load()}) ...", flush=True)
        result = timed(cmd, work / f"memory_{count}.log", memory=True)
        memory[count] = result
        print(
            f"bench: memory {count:7d} images: peak PSS {result['peak_pss'] / 2**20:7.0f} MiB, "
            f"peak RSS sum {result['peak_rss'] / 2**20:7.0f} MiB, {result['seconds']:.1f} s "
            f"({count / result['seconds']:.0f} images/s)",
            flush=True,
        )
    if len(memory) >= 2:
        low, high = min(memory), max(memory)
        growth = memory[high]["peak_pss"] / memory[low]["peak_pss"] - 1
        print(f"bench: peak PSS grows {growth:+.1%} from {low} to {high} images", flush=True)
    for leftover in out_root.glob("out_*"):  # deleted last: deleting is what slows the disk
        shutil.rmtree(leftover, ignore_errors=True)
    # A partial run (--only) keeps its own file: an A/B of one method in the same WORK
    # overwrote the full run's results.json before.
    name = f"results_only_{'_'.join(names)}.json" if args.only else "results.json"
    (work / name).write_text(
        json.dumps({"speed": results, "memory": memory}, indent=2, default=float)
    )
    print(f"bench: results in {work / name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
