"""cluster.yaml and cluster/: Ray's schema checks, and real runs on a local multi-node cluster.

Select with `-m cluster` (all of it) or `-m "cluster and not slow"` (the configs only, ~10 s).

* Configs: every YAML (cluster.yaml, cluster/*.yaml) passes Ray's own
  `prepare_config` + `validate_config`, has an autoscaling GPU worker type, and the cloud
  ones install the project on every node and open nothing but SSH; cluster.yaml also
  goes through Ray's own AWS bootstrap (what `ray up` does first) and a worker launch,
  against moto's AWS on this machine.
* Fake multi-node cluster (cluster/local.py + cluster/local-fake-gpu.yaml): a CPU head with
  no CPUs/GPUs for work plus autoscaled workers declaring `GPU: 1`. `jobs/sweep.py` with
  `--gpus-per-trial 1` and `jobs/denoise.py` with GPU actors must finish there, and the
  trial table / manifest must show every trial and batch on an autoscaled GPU worker node.
* Jobs path: `ray job submit --working-dir . -- python jobs/sweep.py --smoke-test` against a
  local head with token authentication on (requests without the token are refused).

Each cluster lives in its own temp dir with free ports (never Ray's defaults) and is stopped
by killing only its own processes (cluster/local.py stop), never `ray stop`, so other Ray
clusters on the machine are left alone.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from helpers import MNIST, REPO, local, subprocess_env

CONFIGS = [REPO / "cluster.yaml", *sorted((REPO / "cluster").glob("*.yaml"))]
CLOUD_CONFIGS = [c for c in CONFIGS if "fake" not in c.name]
FAKE_HEAD_ID = "f" * 51 + "00000"  # the fake provider's fixed head node id
SWEEP_MODELS = ["denoise", "dense"]
TIMINGS: dict[str, float] = {}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _prepared(path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Ray's own preparation of a cluster config (defaults merged, min/max workers filled)."""
    from ray.autoscaler._private import providers
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(path)
    if config["provider"]["type"] == "fake_multinode":
        # Ray's wheel lacks the provider's defaults file (fake_multi_node/example.yaml), so
        # prepare_config cannot open it; our config spells out every field, so it serves as
        # its own defaults.
        monkeypatch.setitem(providers._DEFAULT_CONFIGS, "fake_multinode", lambda: str(path))
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _worker_types(config: dict) -> dict[str, dict]:
    head = config["head_node_type"]
    return {k: v for k, v in config["available_node_types"].items() if k != head}


# ---------------------------------------------------------------------------- the configs


@pytest.mark.cluster
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_passes_ray_schema_and_has_autoscaling_gpu_workers(path, monkeypatch):
    config = _prepared(path, monkeypatch)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0, (
        "the head must offer no CPUs/GPUs for work, so trials and actors go to workers"
    )
    gpu_types = {
        name: t for name, t in _worker_types(config).items() if t["resources"].get("GPU", 0) >= 1
    }
    assert gpu_types, f"{path.name}: no worker type declares a GPU"
    for name, t in gpu_types.items():
        assert t["resources"]["GPU"] == 1, f"{name}: one GPU per worker"
        assert t["min_workers"] == 0, f"{name}: GPU workers must scale to zero"
        assert 1 <= t["max_workers"] <= config["max_workers"], name


@pytest.mark.cluster
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_the_jobs_read_the_node_types_to_come_from_the_config_ray_up_leaves(
    path, monkeypatch, tmp_path
):
    """With --allow-autoscale a trial or actor that no node type holds waited for such a
    node without end (the autoscaler logged "No available node types can fulfill"): the
    jobs now read the node types from the config `ray up` leaves on the head (as JSON, at
    ~/ray_bootstrap_config.yaml) and refuse such a request (see the jobs' tests)."""
    import aelib.process as process

    config = _prepared(path, monkeypatch)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(process.AUTOSCALING_CONFIG_ENV, raising=False)
    assert process.node_types() is None and process.beyond_node_types({"CPU": 99}) is None
    (tmp_path / "ray_bootstrap_config.yaml").write_text(json.dumps(config))
    path, types = process.node_types()
    workers = _worker_types(config).items()
    assert types == {k: {r: float(v) for r, v in t["resources"].items()} for k, t in workers}
    gpu = next(r for r in types.values() if r.get("GPU"))
    assert process.beyond_node_types({"CPU": gpu["CPU"], "GPU": 1}) is None
    said = process.beyond_node_types({"CPU": gpu["CPU"] + 1, "GPU": 1})
    assert said.startswith(f"nor may its autoscaler add one: the node types in {path} have ")
    assert f"gpu_worker: {{CPU: {gpu['CPU']:g}, GPU: 1}}" in said
    # A cluster-wide max_workers of 0 caps every type: none may be added.
    (tmp_path / "ray_bootstrap_config.yaml").write_text(json.dumps({**config, "max_workers": 0}))
    assert process.node_types() == (path, {})
    assert process.beyond_node_types({"CPU": 1}).endswith(f"the node types in {path} have none")


@pytest.mark.cluster
@pytest.mark.parametrize("path", CLOUD_CONFIGS, ids=lambda p: p.name)
def test_cloud_config_installs_the_project_and_tensorflow_gpu_on_every_node(path, monkeypatch):
    config = _prepared(path, monkeypatch)
    docker = config["docker"]
    images = [docker["image"], docker.get("head_image", ""), docker.get("worker_image", "")]
    assert all(i.startswith("rayproject/ray:2.60.") and "py311" in i for i in images if i)
    assert not any("ray-ml" in i for i in images), "the frozen ray-ml images are not wanted"
    assert "gpu" in (docker.get("worker_image") or docker["image"])
    # The project is synced from the repository root to every node ...
    remote = [r for r, local_path in config["file_mounts"].items() if local_path == "."]
    assert len(remote) == 1, "file_mounts must copy the repository ('.') to the nodes"
    # ... and pip-installed on head and workers (prepare_config merges setup_commands in).
    for key in ("head_setup_commands", "worker_setup_commands"):
        installs = [c for c in config[key] if "pip install" in c and remote[0] in c]
        assert installs, f"{key}: no `pip install {remote[0]}`"
    assert any("tensorflow[and-cuda]" in c for c in config["worker_setup_commands"]), (
        "GPU workers need TensorFlow's GPU build"
    )
    # Every pip install on a node takes the tested versions, which pyproject.toml allows.
    for key in ("head_setup_commands", "worker_setup_commands"):
        for command in (c for c in config[key] if "pip install" in c and "aelib" in c):
            assert f"-c {remote[0]}/cluster/constraints.txt" in command, (key, command)
    assert not any("tensorflow" in c and " -c " not in c for c in config["worker_setup_commands"])
    # The sweep's driver runs on the head: --search optuna needs the extra there.
    installs = [c for c in config["head_setup_commands"] if "pip install" in c and remote[0] in c]
    assert any(f'-e {remote[0]}"[optuna]"' in c for c in installs), installs


_FIND_AELIB = "import importlib.util; s = importlib.util.find_spec('aelib'); print(s and s.origin)"


@pytest.mark.cluster
@pytest.mark.parametrize("path", CLOUD_CONFIGS, ids=lambda p: p.name)
def test_the_synced_project_does_not_shadow_the_installed_aelib(path, monkeypatch, tmp_path):
    """`ray submit` copies a job to ~/<script> and runs `python ~/<script>` there, so ~ is
    the script's folder, first on sys.path (and Ray adds it to its workers' sys.path). A
    project copy at ~/aelib (a folder without __init__.py) is then found as a namespace
    package `aelib` before the editable install's finder (pip install -e puts it after
    Python's own), and the jobs fail (`aelib/process.py` not found). Rebuilt here: a home
    with the project folder where the config mounts it, and the job script beside it."""
    config = _prepared(path, monkeypatch)
    (remote,) = [r for r, local_path in config["file_mounts"].items() if local_path == "."]
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}

    def find_aelib(home: Path) -> str:
        (home / "job.py").write_text(_FIND_AELIB + "\n")
        proc = subprocess.run(
            [sys.executable, str(home / "job.py")],
            cwd=home,
            env={**env, "HOME": str(home)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    (tmp_path / "bare").mkdir()
    if find_aelib(tmp_path / "bare") == "None":
        pytest.skip("aelib is not installed in this Python (only on PYTHONPATH)")
    home = tmp_path / "home"
    assert remote.startswith("~/"), remote
    (home / remote[2:] / "aelib").mkdir(parents=True)  # the repository: aelib/ inside it
    (home / remote[2:] / "pyproject.toml").write_text("")
    origin = find_aelib(home)
    assert origin.endswith("__init__.py"), (
        f"{path.name}: `import aelib` in a job under ~ finds the project copy {remote} "
        f"(origin {origin}), not the installed package: mount it under another name"
    )


@pytest.mark.cluster
def test_the_cluster_constraints_are_versions_pyproject_allows():
    import tomllib

    from packaging.requirements import Requirement

    pins = {}
    for line in (REPO / "cluster" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = {}
    for text in [*project["dependencies"], *project["optional-dependencies"]["optuna"]]:
        req = Requirement(text)
        required[req.name.lower().replace("_", "-")] = req.specifier
    assert "ray" not in pins, "the image's Ray stays as it is"
    assert set(required) - {"ray"} <= set(pins), "every dependency but Ray is pinned"
    for name, version in pins.items():
        assert required[name].contains(version), f"{name}=={version} against {required[name]}"


@pytest.mark.cluster
def test_the_aws_head_may_launch_workers_with_their_instance_profile():
    """The workers' IamInstanceProfile needs iam:PassRole from the head, and their AMI's
    SSM parameter ssm:GetParameters: neither is in the role `ray up` creates, so the
    policy the README adds must grant both, for the role the workers name."""
    config = _load(REPO / "cluster.yaml")
    profile = config["available_node_types"]["gpu_worker"]["node_config"]["IamInstanceProfile"]
    image = config["available_node_types"]["gpu_worker"]["node_config"]["ImageId"]
    policy = json.loads((REPO / "cluster" / "aws-head-policy.json").read_text())
    grants = {s["Action"]: s for s in policy["Statement"] if s["Effect"] == "Allow"}
    assert grants["iam:PassRole"]["Resource"].endswith(f":role/{profile['Name']}")
    ssm = grants["ssm:GetParameters"]["Resource"]
    assert image.startswith("resolve:ssm:") and ssm.endswith("*")
    assert image.removeprefix("resolve:ssm:").startswith(ssm.split(":parameter", 1)[1][:-1])
    command = "--policy-document file://cluster/aws-head-policy.json"
    for doc in (REPO / "README.md", REPO / "cluster" / "README.md", REPO / "cluster.yaml"):
        assert f"--role-name {profile['Name']}" in doc.read_text(), doc
        assert command in doc.read_text(), doc


@pytest.mark.cluster
def test_ray_bootstraps_the_aws_config_and_launches_a_worker_on_a_local_aws(monkeypatch, tmp_path):
    """What `ray up` does to cluster.yaml before any node exists (Ray's own bootstrap_aws:
    IAM role and profile, key pair, subnets, the security group), then a worker launched
    as the autoscaler launches one, against moto's AWS on this machine (no cloud access
    here). The security group must hold SSH and intra-cluster traffic only, the workers
    must get the instance profile the policy step names, and that policy must be a
    document IAM takes."""
    moto = pytest.importorskip("moto")
    boto3 = pytest.importorskip("boto3")
    import types

    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider

    monkeypatch.setenv("HOME", str(tmp_path))  # (the key pair's .pem goes to ~/.ssh)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")  # (AmazonEC2FullAccess, ...)
    # (bootstrap waits 15 s twice for IAM to propagate, which moto does not need)
    monkeypatch.setattr(aws_config, "time", types.SimpleNamespace(sleep=lambda s: None))
    config = _prepared(REPO / "cluster.yaml", monkeypatch)
    region = config["provider"]["region"]
    with moto.mock_aws():
        boot = aws_config.bootstrap_aws(config)
        ec2 = boto3.client("ec2", region_name=region)
        iam = boto3.client("iam", region_name=region)
        name = config["provider"]["security_group"]["GroupName"]
        (group,) = ec2.describe_security_groups(GroupNames=[name])["SecurityGroups"]
        rules = group["IpPermissions"]
        public = [r for r in rules if r["IpRanges"] or r["Ipv6Ranges"]]
        assert [(r["IpProtocol"], r.get("FromPort"), r.get("ToPort")) for r in public] == [
            ("tcp", 22, 22)
        ], rules
        inside = [r for r in rules if r["UserIdGroupPairs"]]
        assert [p["GroupId"] for r in inside for p in r["UserIdGroupPairs"]] == [group["GroupId"]]
        worker = boot["available_node_types"]["gpu_worker"]["node_config"]
        role = worker["IamInstanceProfile"]["Name"]
        assert boot["head_node"]["IamInstanceProfile"]["Arn"].endswith(f"/{role}")
        assert worker["SecurityGroupIds"] == [group["GroupId"]]
        iam.put_role_policy(
            RoleName=role,
            PolicyName="aelib-workers",
            PolicyDocument=(REPO / "cluster" / "aws-head-policy.json").read_text(),
        )
        provider = AWSNodeProvider(boot["provider"], boot["cluster_name"])
        provider.create_node(worker, {"ray-node-type": "worker"}, 1)
        (node,) = provider.non_terminated_nodes({})
        instance = ec2.describe_instances(InstanceIds=[node])["Reservations"][0]["Instances"][0]
        assert instance["InstanceType"] == "g5.xlarge"
        assert instance["IamInstanceProfile"]["Arn"].endswith(f"/{role}")


@pytest.mark.cluster
@pytest.mark.parametrize("path", CLOUD_CONFIGS, ids=lambda p: p.name)
def test_cloud_config_opens_only_ssh_turns_on_token_auth_and_holds_no_secrets(path, monkeypatch):
    config = _prepared(path, monkeypatch)
    text = path.read_text()
    provider = config["provider"]
    if provider["type"] == "aws":
        assert provider["security_group"]["IpPermissions"] == [], "no inbound rule beyond SSH"
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert not any("0.0.0.0" in c for c in starts), "the dashboard must stay on localhost"
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token" in c and "ray start" in c for c in config[key]), key
    # ... and for every `ray` CLI in the containers (`ray exec cluster.yaml 'ray status'`).
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    if provider["type"] == "gcp":  # workers on the head's network, not the first subnet
        networks = [
            [i["network"] for i in t["node_config"]["networkInterfaces"]]
            for t in config["available_node_types"].values()
        ]
        assert all(n == networks[0] for n in networks), networks
        for name, t in config["available_node_types"].items():
            node = t["node_config"]
            # A way out for every node (the image, pip, gs://): the default network has no
            # Cloud NAT. And `scheduling` is GCE's object, not Ray's examples' list (#46248).
            assert all(i.get("accessConfigs") for i in node["networkInterfaces"]), name
            scheduling = node.get("scheduling", {})
            assert isinstance(scheduling, dict), (name, scheduling)
            if node.get("guestAccelerators"):
                assert scheduling["onHostMaintenance"] == "TERMINATE", name
            if scheduling.get("preemptible"):
                assert scheduling["automaticRestart"] is False, name
    assert "~/.ray/auth_token" in config["file_mounts"], "the token is copied, not written here"
    assert re.search(r"(s3|gs)://CHANGE-ME", text), "a shared-storage URI placeholder for Tune"
    # Every container gets it: sweep.py's default --storage-path (a `ray submit` adds no flag).
    assert any(
        re.fullmatch(r"--env AELIB_STORAGE_PATH=(s3|gs)://\S+", option)
        for option in config["docker"]["run_options"]
    )
    for pattern in (
        r"AKIA[0-9A-Z]{16}",
        r"(?i)aws_secret_access_key",
        r"-----BEGIN",
        r"(?i)password\s*:",
        r"\b[0-9a-f]{64}\b",  # a Ray auth token
    ):
        assert not re.search(pattern, text), f"{path.name} looks like it holds a secret"


@pytest.mark.cluster
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_key_is_commented(path):
    """Each mapping key has a comment on its line or on the line(s) just above it."""
    lines = path.read_text().splitlines()
    missing = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not re.match(r"^(- )?[~\w.\-/\"']+\s*:(\s|$)", stripped):
            continue
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if "#" not in line and not (j >= 0 and lines[j].strip().startswith("#")):
            missing.append(f"{i + 1}: {stripped}")
    assert not missing, f"{path.name}: keys without a comment:\n" + "\n".join(missing)


# ------------------------------------------------------------------- the fake multi-node run


def _run(cmd: list[str], env: dict, timeout: float, cwd: Path = REPO):
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


def _tail(proc) -> str:
    out, err = proc.stdout[-4000:], proc.stderr[-4000:]
    return f"rc={proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"


def _worker_nodes(state_dir: Path) -> dict[str, dict]:
    return {n["node_id"]: n for n in local.nodes(state_dir) if not n["is_head"]}


def _assert_on_autoscaled_gpu_workers(used: set[str], workers: dict[str, dict]) -> None:
    assert used, "no node recorded"
    assert FAKE_HEAD_ID not in used, "work ran on the head, which offers no CPU/GPU"
    for node_id in used:
        assert node_id in workers, f"{node_id} is not a worker node of this cluster"
        assert workers[node_id]["resources"].get("GPU", 0) >= 1, f"{node_id} declares no GPU"


@pytest.fixture(scope="class")
def fake_cluster():
    state_dir = Path(tempfile.mkdtemp(prefix="aefc-", dir="/tmp"))  # short: unix socket paths
    start = time.monotonic()
    try:
        state = local.start(local.DEFAULT_CONFIG, state_dir)
        TIMINGS["fake cluster start"] = time.monotonic() - start
        state["dir"] = state_dir
        state["nodes_at_start"] = local.nodes(state_dir)
        yield state
    finally:
        local.stop(state_dir, remove=True)
        TIMINGS["fake cluster total"] = time.monotonic() - start
        leftover = local._cluster_pids(state_dir)
        print(f"\nfake cluster timings (s): {json.dumps(TIMINGS, indent=None, default=round)}")
        assert not leftover, f"processes of the fake cluster survived stop: {leftover}"


@pytest.fixture(scope="class")
def sweep_run(fake_cluster):
    out = fake_cluster["dir"] / "sweeps"
    cmd = [
        sys.executable,
        "jobs/sweep.py",
        "--smoke-test",
        "--models",
        *SWEEP_MODELS,
        "--gpus-per-trial",
        "1",
        "--cpus-per-trial",
        "1",
        "--allow-autoscale",  # no GPU node exists until the autoscaler adds one
        "--storage-path",
        str(out),
        "--name",
        "fake-gpu",
        "--data",
        str(MNIST),
        "--no-figures",
    ]
    env = local.client_env(fake_cluster, subprocess_env())
    proc, seconds = _run(cmd, env, timeout=420)  # ~25 s alone; minutes on a loaded machine
    TIMINGS["sweep"] = seconds
    status = local.status(fake_cluster["dir"])  # `ray status`: the autoscaler's nodes by type
    return proc, out / "fake-gpu", _worker_nodes(fake_cluster["dir"]), status


@pytest.mark.cluster
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(not MNIST.is_file(), reason=f"MNIST not found at {MNIST}")
class TestFakeMultiNodeGPUCluster:
    def test_starts_with_the_head_alone_and_refuses_requests_without_the_token(self, fake_cluster):
        assert [n["node_id"] for n in fake_cluster["nodes_at_start"]] == [FAKE_HEAD_ID]
        url = fake_cluster["dashboard_url"] + "/api/jobs/"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 401
        token = Path(fake_cluster["token_path"]).read_text().strip()
        assert oct(Path(fake_cluster["token_path"]).stat().st_mode & 0o777) == "0o600"
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as ok:
            assert ok.status == 200

    def test_sweep_trials_ran_on_autoscaled_gpu_workers(self, sweep_run):
        proc, experiment, workers, status = sweep_run
        assert proc.returncode == 0, _tail(proc)
        trials = pq.read_table(experiment / "trials.parquet").to_pandas()
        assert sorted(trials["model"]) == sorted(SWEEP_MODELS)
        assert (trials["status"] == "finished").all(), trials[["model", "status", "error"]]
        placement = dict(
            zip(trials["trial_id"] + " " + trials["model"], trials["node_id"], strict=True)
        )
        print(f"\nsweep trial -> node: {json.dumps(placement, indent=1)}")
        _assert_on_autoscaled_gpu_workers(set(trials["node_id"]), workers)
        assert len(workers) <= 2, "max_workers is 2"
        assert "Active:" in status and "Pending:" in status, status
        active = status.split("Active:")[1].split("Pending:")[0]
        assert re.search(r"\b[12] gpu_worker\b", active), status

    def test_bulk_denoise_gpu_actors_ran_on_autoscaled_gpu_workers(self, fake_cluster, sweep_run):
        model = sweep_run[1] / "best" / "denoise.keras"
        env = local.client_env(fake_cluster, subprocess_env())
        if not model.is_file():  # the sweep failed (its own test says why): train one here
            out = fake_cluster["dir"] / "model"
            train = [sys.executable, "-m", "aelib", "train", "--model", "denoise", "--epochs"]
            train += ["1", "--limit", "500", "--test-limit", "100", "--no-figures"]
            train += ["--data", str(MNIST), "--out", str(out)]
            proc, _ = _run(train, subprocess_env(), timeout=180)
            assert proc.returncode == 0, _tail(proc)
            model = next(out.rglob("*.keras"))
        noisy, dst = fake_cluster["dir"] / "noisy", fake_cluster["dir"] / "denoised"
        make = [sys.executable, "jobs/make_noisy.py", "--data", str(MNIST), "--count", "200"]
        proc, _ = _run(make + ["--out", str(noisy)], env, timeout=120)
        assert proc.returncode == 0, _tail(proc)
        cmd = [sys.executable, "jobs/denoise.py", "--model", str(model), "--input", str(noisy)]
        cmd += [
            "--output",
            str(dst),
            "--gpus-per-worker",
            "1",
            "--workers",
            "2",
            "--allow-autoscale",
        ]
        cmd += ["--batch-size", "50"]
        proc, seconds = _run(cmd, env, timeout=300)
        TIMINGS["denoise"] = seconds
        assert proc.returncode == 0, _tail(proc)
        # (no GPU node at the start: the autoscaler's warning, not a --workers note)
        assert "note: --workers" not in proc.stderr, _tail(proc)
        manifest = pq.read_table(dst / "manifest.parquet").to_pandas()
        assert len(manifest) == 200 and (manifest["status"] == "ok").all()
        print(f"\ndenoise images per node: {manifest.groupby('node').size().to_dict()}")
        _assert_on_autoscaled_gpu_workers(set(manifest["node"]), _worker_nodes(fake_cluster["dir"]))


# --------------------------------------------------------------------------- the Jobs path


@pytest.mark.cluster
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(not MNIST.is_file(), reason=f"MNIST not found at {MNIST}")
class TestJobsPath:
    """On the tests' shared head (conftest.py), a plain one-node head (2 CPUs) with token
    auth and the Job API, as on a cluster. Not the fake multi-node cluster: its nodes share
    one session dir on this machine, so each node's runtime-env agent re-extracts the job's
    --working-dir in place and can pull it from under the running driver (real clusters
    have one dir per node)."""

    def test_job_api_refuses_a_missing_or_wrong_token(self, shared_head):
        ray_cli = str(Path(sys.executable).with_name("ray"))
        base = local.client_env(shared_head, subprocess_env())
        no_token = {k: v for k, v in base.items() if not k.startswith("RAY_AUTH")}
        wrong = base | {"RAY_AUTH_TOKEN": "0" * 64}
        wrong.pop("RAY_AUTH_TOKEN_PATH")
        for env in (no_token, wrong):
            proc, _ = _run(
                [ray_cli, "job", "list", "--address", shared_head["dashboard_url"]], env, 60
            )
            assert proc.returncode != 0, _tail(proc)
            assert re.search(r"Authentication|Unauthorized|Forbidden", proc.stdout + proc.stderr)

    def test_ray_job_submit_working_dir_sweep_smoke_test(self, shared_head, tmp_path):
        ray_cli = str(Path(sys.executable).with_name("ray"))
        out = tmp_path / "job-results"
        pattern = "session_*/runtime_resources/working_dir_files/_ray_pkg_*"
        earlier = set(Path(shared_head["temp_dir"]).glob(pattern))  # the head runs other jobs
        cmd = [ray_cli, "job", "submit", "--address", shared_head["dashboard_url"]]
        cmd += ["--working-dir", ".", "--", "python", "jobs/sweep.py", "--smoke-test"]
        cmd += ["--storage-path", str(out), "--name", "job", "--data", str(MNIST), "--no-figures"]
        proc, seconds = _run(cmd, local.client_env(shared_head, subprocess_env()), timeout=480)
        TIMINGS["jobs path"] = seconds
        print(f"\nray job submit ... sweep.py --smoke-test: {seconds:.0f}s")
        assert proc.returncode == 0, _tail(proc)
        assert re.search(r"Job '\S+' succeeded", proc.stdout + proc.stderr), _tail(proc)
        trials = pq.read_table(out / "job" / "trials.parquet").to_pandas()
        assert (trials["status"] == "finished").all() and len(trials) == 7
        # the upload was the sources only (.rayignore / .gitignore), not .venv or .git
        uploads = set(Path(shared_head["temp_dir"]).glob(pattern)) - earlier
        unpacked = [p for p in uploads if p.is_dir()]
        assert unpacked, "no unpacked working dir found on the head"
        for pkg in unpacked:
            names = {p.name for p in pkg.iterdir()}
            assert {"jobs", "aelib"} <= names and not names & {".venv", ".git", "runs"}, names
            size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
            assert size < 20e6, f"working dir upload is {size / 1e6:.0f} MB"


@pytest.mark.cluster
def test_stop_selects_only_this_clusters_processes(tmp_path):
    """local.py stop kills processes naming <dir>/ray (and their children), and the head's
    Ray client server, known by its ports (it names no folder: every stop left it
    running, listening on its port), nothing else."""
    ours, other = tmp_path / "a", tmp_path / "a-other"
    ours.mkdir()
    (ours / local.STATE_FILE).write_text(
        json.dumps({"ports": {"gcs": 41001, "client_server": 41002}})
    )
    sleeper = "import subprocess, sys, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    client = ["-m", "ray.util.client.server", "--host=192.0.2.9", "--mode=proxy"]
    procs = [
        subprocess.Popen([sys.executable, "-c", sleeper, f"--temp-dir={ours / 'ray'}"]),
        subprocess.Popen([sys.executable, "-c", sleeper, f"--log_dir={ours / 'ray'}/session_x"]),
        subprocess.Popen(
            [sys.executable, "-c", sleeper, *client, "--address=192.0.2.9:41001", "--port=41002"]
        ),
        subprocess.Popen([sys.executable, "-c", sleeper, f"--temp-dir={other / 'ray'}"]),
        subprocess.Popen([sys.executable, "-c", sleeper, f"--temp-dir={ours / 'ray2'}"]),
        # other heads' client servers: another GCS port, another client port
        subprocess.Popen(
            [sys.executable, "-c", sleeper, *client, "--address=192.0.2.9:41009", "--port=41002"]
        ),
        subprocess.Popen(
            [sys.executable, "-c", sleeper, *client, "--address=192.0.2.9:41001", "--port=410020"]
        ),
    ]
    try:
        # Until each has started its child: a fixed second was a guess that four Pythons
        # get there in time on a loaded machine.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ppids = {ppid for ppid, _ in local._proc_table().values()}
            if all(proc.pid in ppids for proc in procs):
                break
            time.sleep(0.05)
        selected = set(local._cluster_pids(ours))
        assert {proc.pid for proc in procs[:3]} <= selected
        assert not {proc.pid for proc in procs[3:]} & selected
        assert len(selected) == 6, "each selected process brings its `sleep` child"
        assert local.stop(ours, grace_s=5) == 6
        assert all(proc.wait(5) is not None for proc in procs[:3])
        assert all(proc.poll() is None for proc in procs[3:]), "another cluster was hit"
    finally:
        parents = {proc.pid for proc in procs}
        children = [pid for pid, (ppid, _) in local._proc_table().items() if ppid in parents]
        for proc in procs:
            proc.kill()
            proc.wait()
        for pid in children:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


@pytest.mark.cluster
def test_the_ports_chosen_for_a_head_are_all_different():
    """`ray start` refuses two components on one port (CI once drew client_server ==
    dashboard_agent_http), so the head's ports are drawn while every one is still bound.
    Drawn one at a time, 500 ports from the 12,768 between 20000 and Linux's ephemeral
    range repeat with a probability of over 99.99%. They are drawn there, not by the
    kernel, so that no component of Ray that binds port 0 while `ray start` runs gets
    one of them first (they are closed by then)."""
    names = [f"port{i}" for i in range(500)]
    ports = local._free_ports(names)
    assert list(ports) == names
    assert len(set(ports.values())) == len(names)
    assert all(1024 < port < 65536 for port in ports.values())
    low, high = local._PORTS_FROM, local._ephemeral_ports_from()
    if high - low >= 1000:  # (else they are the kernel's: see _free_ports)
        assert all(low <= port < high for port in ports.values())


def test_local_py_says_in_one_line_when_there_is_no_cluster_to_use(tmp_path, capsys):
    """`env` exported a stopped cluster's address (a job sent there then retried for
    minutes), `status` timed out into a traceback with exit 0, `nodes` and a second
    `start` ended in tracebacks: each now says it in one line, exit 1."""
    state = {"address": "127.0.0.1:1", "token_path": "t", "dashboard_url": "http://x"}
    (tmp_path / local.STATE_FILE).write_text(json.dumps(state))  # (its processes gone)
    empty = tmp_path / "empty"
    for action, where, said in (
        ("env", tmp_path, "is not running (its state is there, none of its processes)"),
        ("status", tmp_path, "is not running"),
        ("nodes", tmp_path, "is not running"),
        ("env", empty, f"no fake cluster state in {empty}: start one first"),
        ("status", empty, "no fake cluster state"),
        ("nodes", empty, "no fake cluster state"),
    ):
        assert local.main([action, "--dir", str(where)]) == 1, action
        captured = capsys.readouterr()
        assert captured.err.startswith("local.py: error: ") and said in captured.err, action
        assert "Traceback" not in captured.err and "export" not in captured.out
    # A config of another provider (cluster.yaml's AWS: its autoscaler ran on the head,
    # and jobs asked it for real nodes), a config it cannot read, negative CPUs: one line
    # each, before anything starts.
    fresh, listed = tmp_path / "fresh", tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    for flags, said in (
        (["--config", str(REPO / "cluster.yaml")], "its provider type is 'aws'; this rehearsal"),
        (["--config", str(tmp_path / "no.yaml")], "no.yaml: cannot read it as a cluster config"),
        (["--config", str(REPO / "README.md")], "README.md: cannot read it as a cluster"),
        (["--config", str(listed)], "list.yaml: its provider type is None"),
        (["--single-node", "--head-cpus", "-1"], "--head-cpus -1: expected 0 or more CPUs"),
    ):
        assert local.main(["start", "--dir", str(fresh), *flags]) == 1, flags
        err = capsys.readouterr().err
        assert err.startswith("local.py: error: ") and said in err and len(err.splitlines()) == 1
        assert not fresh.exists(), flags
    # With a process of it running (as its daemons name its Ray folder): exported, and a
    # second start refused.
    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", f"--temp-dir={tmp_path / 'ray'}"]
    )
    try:
        deadline = time.monotonic() + 30
        while not local._cluster_pids(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert local.main(["env", "--dir", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert "export RAY_ADDRESS=127.0.0.1:1" in out
        assert "unset AELIB_AUTOSCALING_CONFIG" in out  # (a head without an autoscaler)
        # Paths with spaces are quoted for the shell (`eval` split them).
        spaced = {**state, "token_path": f"{tmp_path}/sp ace/t", "config": "/a b/c.yaml"}
        (tmp_path / local.STATE_FILE).write_text(json.dumps(spaced))
        assert local.main(["env", "--dir", str(tmp_path)]) == 0
        shell = capsys.readouterr().out + 'echo "$RAY_AUTH_TOKEN_PATH|$AELIB_AUTOSCALING_CONFIG"'
        echoed = subprocess.run(["bash", "-c", shell], capture_output=True, text=True)
        assert echoed.stdout == f"{tmp_path}/sp ace/t|/a b/c.yaml\n", echoed.stderr
        (tmp_path / local.STATE_FILE).write_text(json.dumps(state))
        assert local.main(["start", "--dir", str(tmp_path)]) == 1
        said = f"local.py: error: a cluster is already running in {tmp_path}; stop it first"
        assert capsys.readouterr().err == said + "\n"
    finally:
        sleeper.kill()
        sleeper.wait()
    # A stopped cluster's autoscaling config goes with it: a shell that exported it
    # judged a job for another cluster by this one's node types.
    (tmp_path / local.RENDERED).write_text("{}")
    local.stop(tmp_path)
    assert not (tmp_path / local.RENDERED).exists()
