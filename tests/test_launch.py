"""The launch scripts: launch/tpu_pod.sh (Cloud TPU queued resources), launch/gpu_slurm.sbatch
(SLURM) and launch/local.sh (one machine), run for real under bash against stand-in `gcloud`,
`srun`, `scontrol` and `python` programs on PATH. Each stand-in appends its argv (one JSON line
per call) to a log and answers from a script: describe returns the next scripted queued-resource
state, `tpu-vm ssh` runs its --command in a fake worker home, srun starts its tasks. The
sequence of recorded commands is what the tests hold the scripts to. Plus a shellcheck pass and
one real CPU run of local.sh (slow)."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
TPU = os.path.join(LAUNCH, "tpu_pod.sh")
SLURM = os.path.join(LAUNCH, "gpu_slurm.sbatch")
LOCAL = os.path.join(LAUNCH, "local.sh")

# One stand-in program; what it does depends on the name it is called by.
FAKE = r'''#!{python} -S
import json, os, shutil, signal, subprocess, sys, time

prog = os.path.basename(sys.argv[0])
args = sys.argv[1:]
keys = ("CUDA_VISIBLE_DEVICES", "JAX_LOCAL_DEVICE_IDS", "PYTHONPATH", "SLURM_LOCALID")
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"prog": prog, "argv": args, "cwd": os.getcwd(),
                        "env": {{k: os.environ[k] for k in keys if k in os.environ}}}}) + "\n")


def wait_for_term():
    """Stand for a trainer: on SIGTERM, 'checkpoint' and exit 0."""
    def done(*_):
        with open(os.environ["FAKE_LOG"], "a") as f:
            f.write(json.dumps({{"prog": prog, "argv": ["<SIGTERM>"]}}) + "\n")
        sys.exit(0)
    signal.signal(signal.SIGTERM, done)
    with open(os.environ["FAKE_LOG"] + ".ready", "w"):
        pass
    while True:
        time.sleep(0.01)


if prog == "gcloud":
    if "describe" in args:
        path = os.environ["FAKE_STATES"]
        states = json.load(open(path))
        state = states.pop(0) if len(states) > 1 else states[0]
        json.dump(states, open(path, "w"))
        if state == "NOT_FOUND":
            sys.exit(print("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: "
                           "Resource 'x' was not found", file=sys.stderr) or 1)
        if state == "ERROR":
            sys.exit(print("ERROR: (gcloud) PERMISSION_DENIED: caller lacks tpu.queuedResources.get",
                           file=sys.stderr) or 1)
        print(state)
    elif "scp" in args and os.environ.get("FAKE_HOME"):
        src, dest = [a for a in args[args.index("scp") + 1:] if not a.startswith("-")][:2]
        shutil.copy(src, os.path.join(os.environ["FAKE_HOME"], dest.split(":", 1)[1]))
    elif "ssh" in args:
        command = [a for a in args if a.startswith("--command=")][0].split("=", 1)[1]
        if os.environ.get("FAKE_HOME"):   # run it as a worker's login shell would
            env = dict(os.environ, HOME=os.environ["FAKE_HOME"])
            sys.exit(subprocess.run(["bash", "-c", command], cwd=env["HOME"], env=env).returncode)
        if "cxr_rf.train" in command:
            sys.exit(int(os.environ.get("FAKE_TRAIN_RC", "0")))
elif prog == "srun":
    i = 0
    while args[i].startswith("-"):
        i += 1
    opts = dict(a[2:].split("=", 1) for a in args[:i] if "=" in a)
    if os.environ.get("FAKE_SRUN_WAIT_TERM"):
        wait_for_term()
    rc = 0
    for local in range(int(opts["ntasks-per-node"])):   # the first node's tasks
        env = dict(os.environ, SLURM_LOCALID=str(local), SLURM_PROCID=str(local),
                   SLURM_NTASKS=opts["ntasks"], SLURM_STEP_NODELIST="node[1-2]")
        rc = max(rc, subprocess.run(args[i:], env=env).returncode)
    sys.exit(rc)
elif prog.startswith("python"):
    if args[:2] == ["-m", "venv"]:
        os.makedirs(os.path.join(args[2], "bin"))
        os.symlink(os.path.abspath(sys.argv[0]), os.path.join(args[2], "bin", "python"))
    elif args[:1] == ["-c"]:
        print("devices: [FakeDevice(id=0)]")
    elif "cxr_rf.train" in args:
        if os.environ.get("FAKE_PY_WAIT_TERM"):
            wait_for_term()
        sys.exit(int(os.environ.get("FAKE_PY_RC", "0")))
'''


@pytest.fixture
def fakes(tmp_path):
    """A bin/ of stand-ins first on PATH, their log, and a runner for the scripts."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "fake"
    fake.write_text(FAKE.format(python=sys.executable))
    fake.chmod(0o755)
    for name in ("gcloud", "srun", "scontrol", "python", "python3.11"):
        (bin_dir / name).symlink_to(fake)
    log = tmp_path / "calls.jsonl"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TPU_", "CUDA_", "JAX_", "FAKE_"))}
    for k in ("ACCELERATOR_TYPE", "ZONE", "PROJECT", "RUNTIME_VERSION", "PROVISIONING", "CONFIG",
              "WORKDIR", "KEEP", "DRY_RUN", "PROCS", "GPUS_PER_NODE", "VENV", "PYTHON", "ROOT",
              "NUM_SAMPLES", "REQUEUE", "REMOTE_DIR", "MOUNT_BUCKETS"):
        env.pop(k, None)
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log),
               POLL_SECONDS="0", WAIT_TIMEOUT="30")

    class Fakes:
        path = tmp_path
        python = str(bin_dir / "python")

        @staticmethod
        def states(*states):
            (tmp_path / "states.json").write_text(json.dumps(list(states)))
            env["FAKE_STATES"] = str(tmp_path / "states.json")

        @staticmethod
        def run(script, *args, **extra_env):
            return subprocess.run(["bash", script, *args], cwd=ROOT, env=dict(env, **extra_env),
                                  capture_output=True, text=True, timeout=60)

        @staticmethod
        def popen(script, *args, **extra_env):
            return subprocess.Popen(["bash", script, *args], cwd=ROOT, env=dict(env, **extra_env),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        @staticmethod
        def calls(prog=None):
            if not log.exists():
                return []
            rows = [json.loads(line) for line in log.read_text().splitlines()]
            return [r for r in rows if prog is None or r["prog"] == prog]

        @staticmethod
        def wait_ready():
            deadline = time.time() + 30
            while not os.path.exists(str(log) + ".ready"):
                assert time.time() < deadline, "the stand-in never started"
                time.sleep(0.01)

    return Fakes


def one_line_error(r, needle):
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


# ---------------------------------------------------------------- launch/tpu_pod.sh

QR = ["compute", "tpus", "queued-resources"]
VM = ["compute", "tpus", "tpu-vm"]
LOC = ["--zone=us-east5-a", "--project=my-proj"]
DESCRIBE = [*QR, "describe", "pod", *LOC, "--format=value(state.state)"]
TRAIN_FLAGS = ["--config.train.steps=7", "--config.data.mixture=(('/data/cxr a', 0.5), (\"b\", 0.5))",
               "--config.model.dtype=bfloat16"]
BASE = ["--name", "pod", "--type", "v5p-128", "--zone", "us-east5-a", "--project", "my-proj",
        "--config", "experiments/cxr_b.py", "--workdir", "gs://bucket/runs/cxr b"]


def create_call(type_="v5p-128", runtime="v2-alpha-tpuv5", extra=()):
    return [*QR, "create", "pod", "--node-id=pod", f"--accelerator-type={type_}",
            f"--runtime-version={runtime}", *LOC, *extra]


def test_tpu_creates_waits_installs_trains_and_deletes(fakes):
    home = fakes.path / "worker"
    home.mkdir()
    fakes.states("NOT_FOUND", "WAITING_FOR_RESOURCES", "ERROR", "PROVISIONING", "ACTIVE")
    r = fakes.run(TPU, *BASE, "--spot", "--", *TRAIN_FLAGS, FAKE_HOME=str(home))
    assert r.returncode == 0, r.stderr
    assert "warning: describe failed" in r.stderr   # a transient error while waiting is tolerated
    gcloud = [c["argv"] for c in fakes.calls("gcloud")]
    assert gcloud[0] == DESCRIBE
    assert gcloud[1] == create_call(extra=["--spot"])
    assert gcloud[2:6] == [DESCRIBE] * 4
    assert gcloud[6][:4] == [*VM, "scp"] and gcloud[6][5:] == ["pod:cxr_rf.tar.gz", "--worker=all", *LOC]
    assert [g[:8] for g in gcloud[7:9]] == [[*VM, "ssh", "pod", "--worker=all", *LOC]] * 2
    assert [len(g) for g in gcloud[7:9]] == [9, 9] and gcloud[8][8].startswith("--command=")
    assert gcloud[9] == [*QR, "delete", "pod", *LOC, "--force", "--async", "--quiet"]
    assert len(gcloud) == 10

    # The repository reached the worker without the heavy or private directories ...
    with tarfile.open(home / "cxr_rf.tar.gz") as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
    assert {"cxr_rf/train.py", "experiments/cxr_b.py", "pyproject.toml"} <= names
    assert not any(n.split("/")[0] in (".venv", ".git", "runs") for n in names)
    # ... was installed with the TPU and GCS extras into its own venv, then trained with exactly
    # our arguments (the worker's shell parsed the quoted command back into the same argv).
    py = [c for c in fakes.calls() if c["prog"] == "python"]
    assert [c["argv"] for c in py] == [
        ["-m", "pip", "install", "-q", "-e", ".[tpu,gcs]"],
        ["-m", "cxr_rf.train", "--config=experiments/cxr_b.py", "--workdir=gs://bucket/runs/cxr b",
         *TRAIN_FLAGS]]
    assert {c["cwd"] for c in py} == {str(home / "cxr_rf")}
    assert (home / "cxr_rf" / "experiments" / "cxr_b.py").exists()


def test_tpu_rerun_recreates_a_suspended_resource(fakes):
    fakes.states("SUSPENDED", "ACTIVE")
    r = fakes.run(TPU, *BASE, "--reserved")
    assert r.returncode == 0, r.stderr
    gcloud = [c["argv"] for c in fakes.calls("gcloud")]
    assert gcloud[:4] == [DESCRIBE, [*QR, "delete", "pod", *LOC, "--force", "--quiet"],
                          create_call(extra=["--reserved"]), DESCRIBE]
    assert gcloud[-1][:4] == [*QR, "delete"]


def test_tpu_waits_out_a_deletion_then_creates(fakes):
    fakes.states("DELETING", "DELETING", "NOT_FOUND", "ACTIVE")
    r = fakes.run(TPU, *BASE, "--keep")
    assert r.returncode == 0, r.stderr
    assert [c["argv"][3] for c in fakes.calls("gcloud")] == [
        "describe", "describe", "describe", "create", "describe", "scp", "ssh", "ssh"]


def test_tpu_reuses_an_active_resource_and_keep_skips_delete(fakes):
    """Also: an absolute --config inside the repository becomes the workers' relative path."""
    fakes.states("ACTIVE")
    args = [a.replace("experiments/cxr_b.py", os.path.join(ROOT, "experiments", "cxr_b.py"))
            for a in BASE]
    r = fakes.run(TPU, *args, "--keep")
    assert r.returncode == 0, r.stderr
    gcloud = [c["argv"] for c in fakes.calls("gcloud")]
    assert not any(a in g for g in gcloud for a in ("create", "delete"))
    assert [g[3] for g in gcloud] == ["describe", "describe", "scp", "ssh", "ssh"]
    assert " --config=experiments/cxr_b.py " in gcloud[-1][-1]


def test_tpu_failed_resource_is_a_clear_error(fakes):
    fakes.states("NOT_FOUND", "WAITING_FOR_RESOURCES", "FAILED")
    r = fakes.run(TPU, *BASE)
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "'pod' is FAILED" in errors[0], r.stderr
    gcloud = [c["argv"] for c in fakes.calls("gcloud")]
    assert [g[3] for g in gcloud] == ["describe", "create", "describe", "describe", "delete"]


def test_tpu_wait_timeout(fakes):
    fakes.states("NOT_FOUND", "WAITING_FOR_RESOURCES")
    r = fakes.run(TPU, *BASE, "--keep", WAIT_TIMEOUT="0")
    assert r.returncode == 1
    assert "still WAITING_FOR_RESOURCES after 0s" in r.stderr
    assert [c["argv"][3] for c in fakes.calls("gcloud")] == ["describe", "create", "describe"]


def test_tpu_describe_error_stops_before_creating(fakes):
    fakes.states("ERROR")
    r = fakes.run(TPU, *BASE)
    assert r.returncode == 1
    assert "PERMISSION_DENIED" in r.stderr.strip().splitlines()[-1]
    assert [c["argv"][3] for c in fakes.calls("gcloud")] == ["describe"]


def test_tpu_training_status_is_propagated_and_resource_deleted(fakes):
    fakes.states("ACTIVE")
    r = fakes.run(TPU, *BASE, FAKE_TRAIN_RC="3")
    assert r.returncode == 3
    assert fakes.calls("gcloud")[-1]["argv"][:4] == [*QR, "delete"]


@pytest.mark.parametrize("args, needle", [
    (["--workdir", "runs/local"], "--workdir must be a gs:// path"),
    (["--workdir", "/gcs/bucket/x"], "--workdir must be a gs:// path"),
    (["--type", "v3-8"], "no default --runtime for accelerator type 'v3-8'"),
    (["--config", "/etc/hostname"], "--config must be a file inside this repository"),
    (["--config", "experiments/nope.py"], "--config file not found"),
    (["--name"], "--name needs a value"),
    (["--mount", "gs://cxr-data"], "--mount takes a bucket name"),
    (["--workers", "4"], "unknown argument '--workers'"),
])
def test_tpu_bad_input_is_one_line_and_runs_nothing(fakes, args, needle):
    fakes.states("ACTIVE")
    r = fakes.run(TPU, *BASE, *args)
    assert r.returncode == 2
    one_line_error(r, needle)
    assert fakes.calls() == []


def test_tpu_required_flags(fakes):
    r = fakes.run(TPU, "--type", "v5p-8", "--config", "experiments/cxr_b.py", "--workdir", "gs://b/x")
    assert r.returncode == 2
    one_line_error(r, "--name (or TPU_NAME) is required")


@pytest.mark.parametrize("type_, runtime", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-64", "v2-alpha-tpuv5-lite"),
    ("v5e-8", "v2-alpha-tpuv5-lite"), ("v5p-128", "v2-alpha-tpuv5"), ("v6e-256", "v2-alpha-tpuv6e"),
])
def test_tpu_dry_run_prints_every_command_and_runs_none(fakes, type_, runtime):
    """Settings from the environment, commands printed shell-quoted (copy-pasteable)."""
    r = fakes.run(TPU, "--dry-run", "--", *TRAIN_FLAGS, TPU_NAME="pod", ACCELERATOR_TYPE=type_,
                  ZONE="us-east5-a", PROJECT="my-proj", CONFIG="experiments/cxr_b.py",
                  WORKDIR="gs://bucket/runs/cxr b")
    assert r.returncode == 0, r.stderr
    assert fakes.calls() == []
    lines = r.stdout.strip().splitlines()
    assert all(line.startswith("+ ") for line in lines)
    argvs = [shlex.split(line[2:], comments=True) for line in lines]
    assert [a[0] for a in argvs] == ["gcloud"] * 3 + ["tar"] + ["gcloud"] * 4
    assert argvs[1][1:] == create_call(type_, runtime)
    assert argvs[5][1:5] == [*VM, "ssh"] and "'.[tpu,gcs]'" in argvs[5][-1]
    remote = shlex.split(argvs[6][-1].removeprefix("--command="))
    assert remote[remote.index("exec") + 1:] == [
        ".venv/bin/python", "-m", "cxr_rf.train", "--config=experiments/cxr_b.py",
        "--workdir=gs://bucket/runs/cxr b", *TRAIN_FLAGS]
    assert argvs[7][1:] == [*QR, "delete", "pod", *LOC, "--force", "--async", "--quiet"]
    # Without zone and project the commands leave them to gcloud's configuration.
    r = fakes.run(TPU, "--dry-run", "--keep", TPU_NAME="pod", ACCELERATOR_TYPE=type_,
                  CONFIG="experiments/cxr_b.py", WORKDIR="gs://b/x")
    assert "--zone" not in r.stdout and "--project" not in r.stdout and " delete " not in r.stdout


def test_tpu_mounts_data_buckets_before_training(fakes):
    r = fakes.run(TPU, *BASE, "--dry-run", "--mount", "cxr-data", MOUNT_BUCKETS="more.data")
    assert r.returncode == 0, r.stderr
    argvs = [shlex.split(line[2:], comments=True) for line in r.stdout.strip().splitlines()]
    mount = argvs[-3][-1]
    assert argvs[-3][1:5] == [*VM, "ssh"] and "cxr_rf.train" in argvs[-2][-1]
    for b in ("more.data", "cxr-data"):   # the variable's buckets, then the flags'
        assert f"mountpoint -q /gcs/{b} || gcsfuse --implicit-dirs {b} /gcs/{b}" in mount
    assert mount.index("more.data") < mount.index("cxr-data")
    assert "apt-get install -y -qq gcsfuse" in mount
    r = fakes.run(TPU, *BASE, "--dry-run")
    assert "gcsfuse" not in r.stdout


# ---------------------------------------------------------------- launch/gpu_slurm.sbatch

def slurm_env(fakes, **kw):
    return dict(SLURM_JOB_ID="123", SLURM_JOB_NUM_NODES="2", SLURM_SUBMIT_DIR=ROOT,
                SLURM_CPUS_ON_NODE="64", PYTHON=fakes.python, CONFIG="experiments/cxr_b.py",
                WORKDIR="/shared/runs/cxr b", **kw)


def test_slurm_per_node_one_process_per_node_with_all_gpus(fakes):
    r = fakes.run(SLURM, *TRAIN_FLAGS, **slurm_env(fakes, SLURM_GPUS_ON_NODE="8"))
    assert r.returncode == 0, r.stderr
    (srun,) = [c["argv"] for c in fakes.calls("srun")]
    train = [fakes.python, "-m", "cxr_rf.train", "--config=experiments/cxr_b.py",
             "--workdir=/shared/runs/cxr b", *TRAIN_FLAGS]
    assert srun == ["--nodes=2", "--ntasks-per-node=1", "--ntasks=2", "--kill-on-bad-exit=1",
                    "--cpus-per-task=64", *train]
    (py,) = fakes.calls("python")
    assert py["argv"] == train[1:] and py["cwd"] == ROOT
    assert py["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
    assert "CUDA_VISIBLE_DEVICES" not in py["env"] and py["env"]["PYTHONPATH"].split(":")[0] == ROOT
    assert fakes.calls("scontrol") == []


def test_slurm_per_gpu_one_process_per_gpu(fakes):
    r = fakes.run(SLURM, "--config.train.steps=5",
                  **slurm_env(fakes, PROCS="per-gpu", SLURM_GPUS_PER_NODE="h100:4"))
    assert r.returncode == 0, r.stderr
    (srun,) = [c["argv"] for c in fakes.calls("srun")]
    assert srun[:5] == ["--nodes=2", "--ntasks-per-node=4", "--ntasks=8", "--kill-on-bad-exit=1",
                        "--cpus-per-task=16"]
    py = fakes.calls("python")
    assert [c["env"]["CUDA_VISIBLE_DEVICES"] for c in py] == ["0", "1", "2", "3"]
    assert {c["env"]["JAX_LOCAL_DEVICE_IDS"] for c in py} == {"0"}
    assert {tuple(c["argv"]) for c in py} == {(
        "-m", "cxr_rf.train", "--config=experiments/cxr_b.py", "--workdir=/shared/runs/cxr b",
        "--config.train.steps=5")}


def test_slurm_defaults_and_failure_status(fakes):
    env = slurm_env(fakes, SLURM_GPUS_ON_NODE="2", FAKE_PY_RC="5")
    del env["CONFIG"], env["WORKDIR"]
    r = fakes.run(SLURM, **env)
    assert r.returncode == 5
    (py,) = fakes.calls("python")
    assert py["argv"][2:] == ["--config=experiments/cxr_b.py", "--workdir=runs/cxr_b"]


def test_slurm_sigterm_checkpoints_then_requeues(fakes):
    p = fakes.popen(SLURM, **slurm_env(fakes, SLURM_GPUS_ON_NODE="8", FAKE_SRUN_WAIT_TERM="1"))
    fakes.wait_ready()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert [c["argv"] for c in fakes.calls("srun")][-1] == ["<SIGTERM>"]   # forwarded to srun
    assert [c["argv"] for c in fakes.calls("scontrol")] == [["requeue", "123"]]


@pytest.mark.parametrize("env, needle", [
    ({"PROCS": "per-socket", "SLURM_GPUS_ON_NODE": "8"}, "PROCS must be per-node or per-gpu"),
    ({}, "cannot tell the GPUs per node"),
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_SUBMIT_DIR": "/tmp"}, "is not the cxr_rf repository"),
])
def test_slurm_bad_settings_are_one_line(fakes, env, needle):
    r = fakes.run(SLURM, **{**slurm_env(fakes), **env})
    assert r.returncode == 2
    one_line_error(r, needle)
    assert fakes.calls() == []


# ---------------------------------------------------------------- launch/local.sh

def test_local_prints_devices_trains_then_samples(fakes):
    r = fakes.run(LOCAL, "--config", "experiments/phantom_256.py", "--workdir", "runs/p q",
                  "--num", "3", "--", *TRAIN_FLAGS, PYTHON=fakes.python)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("devices: ")
    calls = fakes.calls("python")
    assert [c["argv"][:1] for c in calls][0] == ["-c"]
    assert [c["argv"] for c in calls[1:]] == [
        ["-m", "cxr_rf.train", "--config=experiments/phantom_256.py", "--workdir=runs/p q",
         *TRAIN_FLAGS],
        ["-m", "cxr_rf.sample", "--workdir=runs/p q", "--num=3", "--out=runs/p q/samples/final"]]
    assert calls[1]["env"]["PYTHONPATH"].split(":")[0] == ROOT


def test_local_training_failure_skips_sampling(fakes):
    r = fakes.run(LOCAL, "--config=experiments/smoke.py", "--workdir=runs/x", PYTHON=fakes.python,
                  FAKE_PY_RC="4")
    assert r.returncode == 4
    assert [c["argv"][1] for c in fakes.calls("python")[1:]] == ["cxr_rf.train"]


def test_local_sigterm_is_forwarded_and_sampling_skipped(fakes):
    p = fakes.popen(LOCAL, CONFIG="experiments/smoke.py", WORKDIR="runs/x", PYTHON=fakes.python,
                    FAKE_PY_WAIT_TERM="1")
    fakes.wait_ready()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0 and "sampling skipped" in err, err
    assert [c["argv"][-1] for c in fakes.calls("python")][-1] == "<SIGTERM>"
    assert not any("cxr_rf.sample" in c["argv"] for c in fakes.calls("python"))


@pytest.mark.parametrize("args, needle", [
    (["--config", "experiments/smoke.py"], "--workdir (or WORKDIR) is required"),
    (["--config", "experiments/smoke.py", "--workdir", "x", "--num", "0"], "--num must be a positive"),
    (["--config", "experiments/smoke.py", "--workdir", "x", "--config.train.steps=2"],
     "unknown argument '--config.train.steps=2'"),
])
def test_local_bad_input_is_one_line(fakes, args, needle):
    r = fakes.run(LOCAL, *args, PYTHON=fakes.python)
    assert r.returncode == 2
    one_line_error(r, needle)
    assert fakes.calls() == []


@pytest.mark.slow
def test_local_real_cpu_run(tmp_path):
    """The real thing on the CPU: tiny config, 2 steps, 2 samples (~60-100 s on 2 cores)."""
    wd = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu")
    r = subprocess.run(["bash", LOCAL, "--config", "tests/tiny.py", "--workdir", str(wd),
                        "--num", "2", "--", "--config.train.steps=2", "--config.sample.steps=2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "devices: [CpuDevice(id=0)]" in r.stdout
    final = wd / "samples" / "final"
    rows = [json.loads(line) for line in (final / "manifest.jsonl").read_text().splitlines()]
    assert [row["checkpoint_step"] for row in rows] == [2, 2]
    assert {"0000.png", "0001.png", "grid.png"} <= set(os.listdir(final))


# ---------------------------------------------------------------- all scripts

def test_shellcheck_is_clean():
    shellcheck = shutil.which("shellcheck") or "/usr/bin/shellcheck"
    if not os.path.exists(shellcheck):
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    scripts = sorted(os.path.join(LAUNCH, f) for f in os.listdir(LAUNCH)
                     if f.endswith((".sh", ".sbatch")))
    assert len(scripts) >= 4
    r = subprocess.run([shellcheck, "--shell=bash", *scripts], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
