"""Bulk denoising from and to S3, against moto's S3 on this machine with a delay per request.

    python jobs/bench_s3.py --model /tmp/bench/model/denoise.keras \
        --images /tmp/bench/images_1000/noisy --delay-ms 20 --repeats 2 \
        --variant "2 threads=--io-threads 2" --variant "default="

Serves moto's S3 over HTTP in this process (what tests/test_denoise_job.py uses too),
holds each request for --delay-ms first (a network round trip; moto itself answers in
about a millisecond), uploads --images to s3://bench/in once, and runs
`jobs/denoise.py --input s3://bench/in --output s3://bench/out-...` for each
--variant in turn, --repeats rounds: each run a fresh process with a local Ray of its
own, which passes the AWS variables pointing at this server on to its actors. A
variant is `NAME=FLAGS` (FLAGS added to the job's command line; `--job PATH` in them
runs another copy of the job, e.g. an older commit's). Prints, per run, the job's
images/s and the requests it sent per image by kind (GET, HEAD, PUT, POST).

moto is a Python server on the same cores as the job: past a few hundred requests a
second it, not the network, sets the pace, so this shows requests per image and how a
variant copes with latency, not what a real bucket allows.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # (also when loaded by its path, as the tests do)

from bench_common import at_least_one  # noqa: E402

BUCKET = "bench"


class S3Server:
    """moto's S3 over HTTP on 127.0.0.1 (a free port), in a thread of this process.

    Each request is recorded as (method, path, query) in `requests`, after waiting
    `delay` seconds. `env` holds the AWS variables that point a process (and the
    workers of a Ray it starts) here; `fs` is a pyarrow S3FileSystem on it."""

    def __init__(self, delay: float = 0.0, buckets: tuple[str, ...] = ()):
        import pyarrow.fs as pafs
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import WSGIRequestHandler, make_server

        app = DomainDispatcherApplication(create_backend_app)
        self.requests: list[tuple[str, str, str]] = []

        def recorded(environ, start_response):
            self.requests.append(
                (environ["REQUEST_METHOD"], environ["PATH_INFO"], environ["QUERY_STRING"])
            )
            if delay:
                time.sleep(delay)
            return app(environ, start_response)

        class Quiet(WSGIRequestHandler):
            def log_request(self, *args):
                pass

        self.server = make_server("127.0.0.1", 0, recorded, threaded=True, request_handler=Quiet)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        endpoint = f"http://127.0.0.1:{self.server.server_port}"
        self.env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self.fs = pafs.S3FileSystem(
            access_key="test",
            secret_key="test",
            region="us-east-1",
            endpoint_override=endpoint,
            allow_bucket_creation=True,
        )
        for bucket in buckets:
            self.fs.create_dir(bucket)

    def upload(self, folder: Path, prefix: str) -> int:
        """Copies every file under `folder` to `prefix` (bucket/key...); returns how many."""
        count = 0
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                rel = path.relative_to(folder).as_posix()
                with self.fs.open_output_stream(f"{prefix}/{rel}") as f:
                    f.write(path.read_bytes())
                count += 1
        return count

    def close(self) -> None:
        self.server.shutdown()


def _variant(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=FLAGS. Received: {text!r}")
    return name, shlex.split(flags)


def run(server: S3Server, model: str, flags: list[str], out: str) -> dict:
    job = str(HERE / "denoise.py")
    if "--job" in flags:
        at = flags.index("--job")
        job, flags = flags[at + 1], flags[:at] + flags[at + 2 :]
    cmd = [sys.executable, job, "--model", model, "--input", f"s3://{BUCKET}/in"]
    cmd += ["--output", f"s3://{BUCKET}/{out}", *flags]
    env = {**os.environ, **server.env, "RAY_ADDRESS": "local", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    first = len(server.requests)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("denoise-summary "))
    summary = json.loads(line.removeprefix("denoise-summary "))
    kinds = collections.Counter(method for method, *_ in server.requests[first:])
    return {**summary, "requests": dict(sorted(kinds.items()))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a trained .keras denoiser")
    p.add_argument("--images", required=True, help="a local folder of images to upload")
    p.add_argument("--delay-ms", type=float, default=20.0, help="added to every request")
    p.add_argument("--repeats", type=at_least_one, default=2, help="rounds of all variants")
    p.add_argument(
        "--variant",
        type=_variant,
        action="append",
        required=True,
        metavar="NAME=FLAGS",
        help="a run to compare, e.g. 'threads2=--io-threads 2' or 'default='",
    )
    args = p.parse_args(argv)
    if not Path(args.model).is_file():
        p.error(f"--model {args.model}: no such file (a trained denoise .keras)")
    if not Path(args.images).is_dir():
        p.error(f"--images {args.images}: no such folder")
    server = S3Server(args.delay_ms / 1000, buckets=(BUCKET,))
    try:
        count = server.upload(Path(args.images), f"{BUCKET}/in")
        print(f"bench_s3: {count} files in s3://{BUCKET}/in, {args.delay_ms:g} ms per request")
        for round_ in range(args.repeats):
            for name, flags in args.variant:
                r = run(server, args.model, flags, f"out-{name.replace(' ', '_')}-{round_}")
                sent = r["requests"].items()
                per_image = ", ".join(f"{k} {v / r['inputs']:.2f}" for k, v in sent)
                print(
                    f"round {round_ + 1} {name:>12}: {r['seconds']:6.1f} s, "
                    f"{r['images_per_s']:6.1f} images/s (Ray ready after {r['ray_ready_s']} s, "
                    f"first results after {r['first_result_s']} s); requests per input: "
                    f"{per_image}",
                    flush=True,
                )
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
