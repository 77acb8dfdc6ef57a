#!/usr/bin/env python
"""Start, inspect and stop a local fake multi-node Ray cluster with autoscaling "GPU" workers.

    python cluster/local.py start            # head + autoscaler (workers come on demand)
    eval "$(python cluster/local.py env)"    # RAY_ADDRESS / token variables for this shell
    python jobs/sweep.py --smoke-test --gpus-per-trial 1 --allow-autoscale  # on fake GPU workers
    python cluster/local.py status           # `ray status` of this cluster
    python cluster/local.py nodes            # every node so far: id, alive, resources, head?
    python cluster/local.py stop             # this cluster's processes only
    python cluster/local.py start --single-node --head-cpus 2   # a plain head (ray job submit)

What it does (see cluster/local-fake-gpu.yaml):

* ``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...`` with Ray's
  ``fake_multinode`` provider: the head has no CPUs/GPUs for work, and the autoscaler starts
  worker "nodes" (separate raylets on this machine, each declaring ``GPU: 1``) when tasks,
  Tune trials or Ray Data actors ask for GPUs.
* Everything lives in one state directory (default ``/tmp/aelib-fakecluster``): Ray's temp
  dir, the rendered autoscaling config, the auth token and ``state.json``. The GCS, dashboard,
  client-server and agent ports are free ports chosen at start, never Ray's defaults, and the
  address is written only inside the state directory, so a plain ``ray.init()`` elsewhere on
  the machine does not attach to this cluster by accident.
* Token authentication is on (``RAY_AUTH_MODE=token``), with a fresh 256-bit token stored
  0600 in the state directory (``RAY_AUTH_TOKEN_PATH``), not in ``~/.ray/auth_token``. Clients
  need the variables printed by ``env``; requests without the token are refused.
* ``stop`` kills only the processes of *this* cluster (those whose command line names
  ``<dir>/ray``, and their descendants, and the head's Ray client server, known by its
  ports), unlike ``ray stop``, which kills every Ray process
  on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "local-fake-gpu.yaml"
AUTOSCALING_CONFIG = "AELIB_AUTOSCALING_CONFIG"  # (aelib.process.AUTOSCALING_CONFIG_ENV)
DEFAULT_DIR = Path(os.environ.get("AELIB_FAKE_CLUSTER_DIR", "/tmp/aelib-fakecluster"))
HOST = "127.0.0.1"
STATE_FILE = "state.json"
RENDERED = "autoscaling.yaml"  # (the config with this head's address, in the state dir)
TOKEN_FILE = "auth_token"


# Ports drawn for a head come from above Ray's worker ports (10002-19999 by default; a
# head started here has its workers bind kernel-drawn ports) and below the kernel's
# ephemeral range, where nothing else draws: see _free_ports.
_PORTS_FROM = 20000


def _ephemeral_ports_from() -> int:
    """The first port of the range the kernel hands out for a bind to port 0 (Linux)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # (Linux's default)


def _free_ports(names: list[str]) -> dict[str, int]:
    """A free port for each name, all different: every socket stays bound until the last
    port is chosen, since a port closed at once can be handed out again by the next bind
    (two components on one port make `ray start` fail).

    They are closed when `ray start` runs, and its components bind them one after another
    while Ray's other components bind port 0 (a raylet's, an agent's): a kernel-drawn
    (ephemeral) port could be handed out to one of those first. So they are drawn at
    random below the ephemeral range, which no bind to port 0 (nor Ray's own draws, which
    start from one) reaches; where that range leaves too few ports, from the kernel."""
    low, high = _PORTS_FROM, _ephemeral_ports_from()
    draw = random.SystemRandom()  # (not `random`'s own state, which a test may have seeded)
    with contextlib.ExitStack() as stack:
        ports: dict[str, int] = {}
        for name in names:
            for _ in range(1000 if high - low >= 1000 else 0):
                port = draw.randrange(low, high)
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    s.bind((HOST, port))  # (also refuses one already drawn: still bound)
                except OSError:
                    s.close()
                    continue
                stack.enter_context(s)
                break
            else:  # (an odd ephemeral range, or that range full)
                s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                s.bind((HOST, 0))
            ports[name] = s.getsockname()[1]
        return ports


def _ray_bin() -> str:
    """The `ray` CLI of the running interpreter's environment."""
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")


def _read_state(state_dir: Path) -> dict | None:
    path = state_dir / STATE_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def client_env(state: dict, base: dict | None = None) -> dict:
    """Environment for a driver/CLI that talks to the fake cluster (address + auth token)."""
    env = dict(os.environ if base is None else base)
    env.update(
        RAY_ADDRESS=state["address"],
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=state["token_path"],
    )
    env.pop("RAY_AUTH_TOKEN", None)
    # The autoscaling config, where the jobs look for the node types it may add (on a
    # cluster of `ray up` they read the head's ~/ray_bootstrap_config.yaml).
    env.pop(AUTOSCALING_CONFIG, None)
    if state.get("config"):
        env[AUTOSCALING_CONFIG] = state["config"]
    return env


def _ensure_token(state_dir: Path) -> Path:
    token_path = state_dir / TOKEN_FILE
    if not token_path.exists():
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # 256 bits, like `ray get-auth-token --generate`
    return token_path


def _fake_config(config: Path) -> dict:
    """The cluster config at `config`, which must be a fake_multinode one: another
    provider's (cluster.yaml's AWS) ran that provider's autoscaler on this head, whose
    jobs then asked it for real cloud nodes."""
    try:
        cfg = yaml.safe_load(config.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        said = " ".join(str(e).split())  # (YAML's error spans lines)
        raise RuntimeError(f"--config {config}: cannot read it as a cluster config: {said}") from e
    provider = cfg.get("provider") if isinstance(cfg, dict) else None
    kind = provider.get("type") if isinstance(provider, dict) else None
    if kind != "fake_multinode":
        raise RuntimeError(
            f"--config {config}: its provider type is {kind!r}; this rehearsal runs "
            "fake_multinode configs only (such as cluster/local-fake-gpu.yaml): use "
            "`ray up` for a real cluster"
        )
    return cfg


def start(
    config: Path | None = DEFAULT_CONFIG,
    state_dir: Path = DEFAULT_DIR,
    head_cpus: int | None = None,
    head_object_store_bytes: int = 200_000_000,
    autoscaler_interval_s: int = 1,
    head_gpus: int = 0,
) -> dict:
    """Start the head; return the cluster state (address, dashboard URL, token path, ...).

    With a `config` (the default), the head runs Ray's autoscaler on the fake_multinode
    provider and advertises the head resources of that config. With ``config=None`` it is a
    plain single-node Ray head with `head_cpus` CPUs (the "local head" of the Jobs path)
    and `head_gpus` GPUs, declared only: Ray schedules on them, nothing computes there.
    """
    state_dir = Path(state_dir).resolve()
    cfg = None if config is None else _fake_config(Path(config))
    if head_cpus is not None and head_cpus < 0:
        raise RuntimeError(f"--head-cpus {head_cpus}: expected 0 or more CPUs")
    if _read_state(state_dir) and _cluster_pids(state_dir):
        raise RuntimeError(f"a cluster is already running in {state_dir}; stop it first")
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    token_path = _ensure_token(state_dir)
    temp_dir = state_dir / "ray"  # short: Ray's unix sockets live below it (107-byte limit)

    # (and the three metrics servers: Ray's fixed defaults, 44217 and 44227 among them,
    # failed with "Address already in use" beside another Ray on the machine)
    names = ["gcs", "dashboard", "client_server", "dashboard_agent"]
    ports = _free_ports([*names, "metrics", "autoscaler_metrics", "dashboard_metrics"])
    address = f"{HOST}:{ports['gcs']}"
    env = dict(os.environ)
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(var, None)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        RAY_USAGE_STATS_ENABLED="0",
        AUTOSCALER_METRIC_PORT=str(ports["autoscaler_metrics"]),
        DASHBOARD_METRIC_PORT=str(ports["dashboard_metrics"]),
        # job entrypoints (`python ...`) and fake nodes use this interpreter's environment
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    cmd = [
        _ray_bin(),
        "start",
        "--head",
        f"--node-ip-address={HOST}",
        f"--port={ports['gcs']}",
        f"--temp-dir={temp_dir}",
        f"--object-store-memory={head_object_store_bytes}",
        "--include-dashboard=true",
        f"--dashboard-host={HOST}",
        f"--dashboard-port={ports['dashboard']}",
        f"--dashboard-agent-listen-port={ports['dashboard_agent']}",
        f"--ray-client-server-port={ports['client_server']}",
        f"--metrics-export-port={ports['metrics']}",
        # Workers bind ports the kernel draws: two heads on one machine (two test
        # processes) gave them out of one range, 10002-19999, each checking a port is
        # free before its worker binds it, so both could hand out the same one (as Ray's
        # own fake multi-node provider does for its nodes).
        "--min-worker-port=0",
        "--max-worker-port=0",
        "--disable-usage-stats",
    ]
    rendered = None
    if cfg is not None:
        cfg["provider"]["gcs_address"] = address
        rendered = state_dir / RENDERED
        rendered.write_text(yaml.safe_dump(cfg, sort_keys=False))
        head = cfg["available_node_types"][cfg["head_node_type"]]["resources"]
        cmd += [
            f"--autoscaling-config={rendered}",
            f"--num-cpus={int(head.get('CPU', 0)) if head_cpus is None else head_cpus}",
            f"--num-gpus={int(head.get('GPU', 0))}",
        ]
        env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S=str(autoscaler_interval_s))
    else:
        cpus = head_cpus if head_cpus is not None else 2
        cmd += [f"--num-cpus={cpus}", f"--num-gpus={head_gpus}"]
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        stop(state_dir, ports=ports)
        raise RuntimeError(f"ray start failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    state = {
        "address": address,
        "dashboard_url": f"http://{HOST}:{ports['dashboard']}",
        "ports": ports,
        "token_path": str(token_path),
        "temp_dir": str(temp_dir),
        "state_dir": str(state_dir),
        "config": str(rendered) if rendered else None,
        "python": sys.executable,
        "start_seconds": round(time.monotonic() - started, 1),
    }
    (state_dir / STATE_FILE).write_text(json.dumps(state, indent=2))
    return state


# --- stopping only this cluster's processes -------------------------------------------------


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command line) for every process we can read, from /proc (Linux)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # the command name (field 2) may contain spaces/parentheses: split after the last ')'
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        table[pid] = (ppid, cmdline)
    return table


def _cluster_pids(
    state_dir: Path,
    table: dict[int, tuple[int, str]] | None = None,
    ports: dict[str, int] | None = None,
) -> list[int]:
    """Ray processes of this cluster, plus all their descendants.

    Ray's daemons (GCS, raylets, dashboard, autoscaler, agents) all carry a path inside the
    cluster's Ray temp dir on their command line; workers and job drivers are their children.
    Ray's client server carries none (`ray start` starts it and exits, leaving it to init):
    it is known by the head's GCS port and its own, from `ports` (default: the state's).
    This process and its ancestors (e.g. the shell that runs ``local.py stop``) are spared.
    `table` is a _proc_table() the caller already read (default: read it now).
    """
    state_dir = Path(state_dir).resolve()
    temp_dir = re.escape(str(state_dir / "ray"))
    markers = [[re.compile(temp_dir + r"(/|\s|$)")]]
    if ports is None:
        try:
            ports = (_read_state(state_dir) or {}).get("ports") or {}
        except (OSError, ValueError):  # (a state file cut short: the temp dir still tells)
            ports = {}
    if "gcs" in ports and "client_server" in ports:
        markers.append(
            [
                re.compile(r" -m ray\.util\.client\.server "),
                re.compile(rf" --address=\S+:{int(ports['gcs'])}(\s|$)"),
                re.compile(rf" --port={int(ports['client_server'])}(\s|$)"),
            ]
        )
    table = _proc_table() if table is None else table
    spared, pid = set(), os.getpid()
    while pid > 1 and pid not in spared:
        spared.add(pid)
        pid = table.get(pid, (0, ""))[0]
    roots = {
        pid
        for pid, (_, cmd) in table.items()
        if any(all(m.search(cmd) for m in marker) for marker in markers) and pid not in spared
    }
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), list(roots)
    while stack:
        pid = stack.pop()
        if pid in found or pid in spared:
            continue
        found.add(pid)
        stack.extend(children.get(pid, []))
    return sorted(found)


def stop(
    state_dir: Path = DEFAULT_DIR,
    grace_s: float = 3.0,
    remove: bool = False,
    ports: dict[str, int] | None = None,
) -> int:
    """Terminate this cluster's processes (SIGTERM, then SIGKILL); return how many there were.
    `ports`: the head's (default: the state's; given by a start that failed before it
    wrote its state)."""
    state_dir = Path(state_dir).resolve()
    pids = _cluster_pids(state_dir, ports=ports)
    found = set(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5)
        while time.monotonic() < deadline:
            # new descendants may appear while the old ones die: rescan
            current = _cluster_pids(state_dir, ports=ports)
            found.update(current)
            alive = [p for p in set(pids) | set(current) if _alive(p)]
            if not alive:
                break
            pids = alive
            time.sleep(0.2)
    state_file = state_dir / STATE_FILE
    if state_file.exists():
        state_file.unlink()
    # (a shell that ran `env` keeps AELIB_AUTOSCALING_CONFIG: without the file, a job sent
    # to another cluster from there judges no request by this one's node types)
    (state_dir / RENDERED).unlink(missing_ok=True)
    if remove:
        shutil.rmtree(state_dir, ignore_errors=True)
    return len(found)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def status(state_dir: Path = DEFAULT_DIR) -> str:
    state = _read_state(Path(state_dir).resolve())
    if state is None:
        return f"no fake cluster state in {state_dir}"
    proc = subprocess.run(
        [_ray_bin(), "status", f"--address={state['address']}"],
        env=client_env(state),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return json.dumps(state, indent=2) + "\n" + proc.stdout + proc.stderr


def nodes(state_dir: Path = DEFAULT_DIR) -> list[dict]:
    """Every node the cluster has had (alive or not): id, alive, resources, head or not.

    Runs in a subprocess (a short-lived Ray driver), so the caller does not become one.
    """
    state = _read_state(Path(state_dir).resolve())
    if state is None:
        raise RuntimeError(f"no cluster state in {state_dir}")
    code = (
        "import json, ray\n"
        "ray.init(logging_level='ERROR', log_to_driver=False)\n"
        "rows = [dict(node_id=n['NodeID'], alive=n['Alive'], resources=n['Resources'],"
        " is_head='node:__internal_head__' in n['Resources'] or n.get('IsHeadNode', False))"
        " for n in ray.nodes()]\n"
        "print('NODES=' + json.dumps(rows))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=client_env(state),
        capture_output=True,
        text=True,
        timeout=120,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("NODES="):
            return json.loads(line[len("NODES=") :])
    raise RuntimeError(f"could not list nodes ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "status", "env", "nodes"])
    parser.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR,
        help="state directory (default: $AELIB_FAKE_CLUSTER_DIR, else /tmp/aelib-fakecluster)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="start: the fake_multinode cluster config (default: cluster/local-fake-gpu.yaml)",
    )
    parser.add_argument(
        "--single-node",
        action="store_true",
        help="start: a plain one-node head (no fake workers, no autoscaler)",
    )
    parser.add_argument("--head-cpus", type=int, default=None, help="start: CPUs of the head")
    parser.add_argument("--remove", action="store_true", help="stop: also delete the state dir")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except RuntimeError as e:  # (a traceback ended in the one line that said it)
        print(f"local.py: error: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.action in ("status", "env", "nodes"):  # (of a cluster that runs: env exported
        state_dir = args.dir.resolve()  # a stopped one's address, where a job then hung)
        if _read_state(state_dir) is None:
            raise RuntimeError(f"no fake cluster state in {args.dir}: start one first")
        if not _cluster_pids(state_dir):
            raise RuntimeError(
                f"the cluster in {args.dir} is not running (its state is there, none of its "
                "processes): start it again"
            )
    if args.action == "start":
        config = None if args.single_node else args.config
        state = start(config, args.dir, head_cpus=args.head_cpus)
        print(json.dumps(state, indent=2))
        env = shlex.join(["python", sys.argv[0], "env", "--dir", str(args.dir)])
        print(f'# next: eval "$({env})"')
    elif args.action == "stop":
        print(f"stopped {stop(args.dir, remove=args.remove)} processes")
    elif args.action == "status":
        print(status(args.dir))
    elif args.action == "nodes":
        print(json.dumps(nodes(args.dir), indent=2))
    else:  # env: shell exports for clients (drivers, `ray job submit`, `ray status`)
        state = _read_state(args.dir.resolve())
        q = shlex.quote  # (a --dir with a space split the exports)
        print(f"export RAY_ADDRESS={q(state['address'])}")
        print("export RAY_AUTH_MODE=token")
        print(f"export RAY_AUTH_TOKEN_PATH={q(state['token_path'])}")
        print(f"export AELIB_DASHBOARD_URL={q(state['dashboard_url'])}")
        config = state.get("config")  # (where the jobs look for the node types to come)
        if config:
            print(f"export {AUTOSCALING_CONFIG}={q(config)}")
        else:
            print(f"unset {AUTOSCALING_CONFIG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
