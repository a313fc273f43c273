"""The launch scripts: launch/tpu_pod.sh (Cloud TPU queued resources), launch/gpu_slurm.sbatch
(SLURM) and launch/local.sh (one machine), run for real under bash against stand-ins on PATH.
Each stand-in appends its argv (one JSON line per call) to a log, and behaves the way the real
tool does where a script depends on it:

- gcloud: `queued-resources describe` answers the next scripted state, and the accelerator type
  for `--format=value(tpu.nodeSpec[0].node.acceleratorType)`; `storage cp` copies to and from
  a directory standing for gs://; `tpu-vm scp --worker=all` stops with SSHKeyNotInAgent when an
  ssh-agent runs (SSH_AUTH_SOCK) and lists keys but not gcloud's (gcloud's VerifyKeyInAgent:
  `ssh-add -l` must succeed and hold the key's fingerprint); `tpu-vm ssh` runs its --command with
  bash in a fake worker home, so quoting is checked after a real shell parsed it.
- srun starts its tasks and, on SIGTERM (or SIGHUP), SIGKILLs them and exits 137 ("forcing job
  termination"), as srun does; scancel --signal=SIG JOB delivers SIG to the step's tasks and not
  to the batch script (--batch: only the batch script; --full: both).
- a worker's tools: a process table for pgrep/pkill (a leftover trainer that checkpoints on
  SIGTERM, or ignores it), apt-get that fails on a held lock (`update` always, `install` after
  its DPkg::Lock::Timeout) while fuser reports the holder, gcsfuse that records its config; sudo
  runs only these stand-ins and merely records anything else (nothing touches this machine).

The tests hold the scripts to the recorded commands. Against these stand-ins the previous scripts
fail: the TPU launcher's scp stops on the agent check, it reuses a slice of another type and
never stops leftover trainers, its apt-get loses the lock race, and the SLURM script's SIGTERM to
srun kills the trainers before they checkpoint. Plus a shellcheck pass and one real CPU run of
local.sh (slow)."""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
TPU = os.path.join(LAUNCH, "tpu_pod.sh")
SLURM = os.path.join(LAUNCH, "gpu_slurm.sbatch")
LOCAL = os.path.join(LAUNCH, "local.sh")

# One stand-in program; what it does depends on the name it is called by.
FAKE = r'''#!{python} -S
import json, os, re, shutil, signal, subprocess, sys, time

prog = os.path.basename(sys.argv[0])
args = sys.argv[1:]
LOG = os.environ["FAKE_LOG"]
BIN = os.path.dirname(os.path.abspath(sys.argv[0]))
keys = ("CUDA_VISIBLE_DEVICES", "JAX_LOCAL_DEVICE_IDS", "PYTHONPATH", "SLURM_LOCALID",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "PYTHONUNBUFFERED")


def log(**entry):
    with open(LOG, "a") as f:
        f.write(json.dumps(dict(dict(prog=prog, argv=args, t=time.time()), **entry)) + "\n")


if prog not in ("gcsfuse", "fuser"):   # these log once, with what they saw
    log(cwd=os.getcwd(), env={{k: os.environ[k] for k in keys if k in os.environ}})


def wait_for_term():
    """Stand for a trainer: on SIGTERM, 'checkpoint' and exit 0."""
    def done(*_):
        log(argv=["<SIGTERM>"])
        sys.exit(0)
    signal.signal(signal.SIGTERM, done)
    with open(f"{{LOG}}.ready.{{os.getpid()}}", "w"):
        pass
    while True:
        time.sleep(0.01)


def gcs(url):
    """gs://B/P -> FAKE_GCS/B/P"""
    return os.path.join(os.environ["FAKE_GCS"], url[len("gs://"):]) if url.startswith("gs://") else url


def procs(update=None):
    """The worker's process table: [{{"cmd": ..., "on_term": "exit" | "ignore"}}]."""
    path = os.environ.get("FAKE_PROCS")
    table = json.load(open(path)) if path and os.path.exists(path) else []
    if update is not None:
        json.dump(update, open(path, "w"))
    return table


def locked():
    return time.time() < float(os.environ.get("FAKE_LOCK_UNTIL", "0"))


def signum(name):
    name = name.upper()
    return int(name) if name.isdigit() else getattr(signal, name if name.startswith("SIG") else "SIG" + name)


if prog == "gcloud":
    if "describe" in args:
        path = os.environ["FAKE_STATES"]
        states = json.load(open(path))
        fmt = [a for a in args if a.startswith("--format=")]
        field_only = fmt and "acceleratorType" in fmt[0]
        state = states[0] if field_only or len(states) == 1 else states.pop(0)
        json.dump(states, open(path, "w"))
        if state == "NOT_FOUND":
            sys.exit(print("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: "
                           "Resource 'x' was not found", file=sys.stderr) or 1)
        if state == "ERROR":
            sys.exit(print("ERROR: (gcloud) PERMISSION_DENIED: caller lacks tpu.queuedResources.get",
                           file=sys.stderr) or 1)
        print(os.environ.get("FAKE_QR_TYPE", "v5p-128") if field_only else state)
    elif args[:2] == ["storage", "cp"]:
        src, dst = [a for a in args[2:] if not a.startswith("-")]
        if os.environ.get("FAKE_GCS"):
            if not os.path.exists(gcs(src)):
                sys.exit(print(f"ERROR: (gcloud.storage.cp) The following URLs matched no objects "
                               f"or files:\n-{{src}}", file=sys.stderr) or 1)
            os.makedirs(os.path.dirname(os.path.abspath(gcs(dst))), exist_ok=True)
            shutil.copy(gcs(src), gcs(dst))
    elif "scp" in args:
        # gcloud's tpu-vm scp to several workers verifies that the agent holds its key (only
        # when `ssh-add -l` succeeds, i.e. an agent runs and lists keys) and stops if not.
        workers = int(os.environ.get("FAKE_WORKERS", "4"))
        several = "--worker=all" in args and workers > 1
        agent = os.environ.get("FAKE_AGENT_KEYS", "").split()
        if several and "--dry-run" not in args and os.environ.get("SSH_AUTH_SOCK") and agent \
                and "google_compute_engine" not in agent:
            home = os.environ.get("HOME", "~")
            sys.exit(print("ERROR: (gcloud.compute.tpus.tpu-vm.scp) SSH Key is not present in the "
                           "SSH agent. Please run \"ssh-add " + home + "/.ssh/google_compute_engine\" "
                           "to add it, and try again.", file=sys.stderr) or 1)
        if os.environ.get("FAKE_HOME"):
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
    tasks = []

    def terminate(sig, _):
        # srun: SIGTERM/SIGHUP/SIGQUIT mean "terminate the job": SIGKILL to every task.
        log(argv=[f"<{{signal.Signals(sig).name}}>"])
        print("srun: forcing job termination", file=sys.stderr)
        for p in tasks:   # (no p.wait() here: the interrupted main thread holds its lock)
            p.kill()
        print("srun: error: node1: task 0: Killed", file=sys.stderr)
        os._exit(137)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, terminate)
    for local in range(int(opts["ntasks-per-node"])):   # the first node's tasks
        env = dict(os.environ, SLURM_LOCALID=str(local), SLURM_PROCID=str(local),
                   SLURM_NTASKS=opts["ntasks"], SLURM_STEP_NODELIST="node[1-2]", SLURM_STEP_ID="0")
        tasks.append(subprocess.Popen(args[i:], env=env))
    with open(LOG + ".srun.tmp", "w") as f:   # where scancel finds the step's tasks
        json.dump([p.pid for p in tasks], f)
    os.replace(LOG + ".srun.tmp", LOG + ".srun")
    codes = [p.wait() for p in tasks]
    sys.exit(max(128 - c if c < 0 else c for c in codes))
elif prog == "scancel":
    sig, batch, full, jobs = signal.SIGKILL, False, False, []
    it = iter(args)
    for a in it:
        if a.startswith("--signal="):
            sig = signum(a.split("=", 1)[1])
        elif a == "-s":
            sig = signum(next(it))
        elif a in ("-b", "--batch"):
            batch = True
        elif a in ("-f", "--full"):
            full = True
        elif not a.startswith("-"):
            jobs.append(a)
    if not jobs:
        sys.exit(print("scancel: error: No job identification provided", file=sys.stderr) or 1)
    # Signals other than SIGKILL reach the batch script only with --batch or --full; --batch
    # reaches nothing else.
    if sig == signal.SIGKILL or not batch:
        if os.path.exists(LOG + ".srun"):
            for pid in json.load(open(LOG + ".srun")):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
    if sig == signal.SIGKILL or batch or full:
        os.kill(os.getppid(), sig)   # the batch script is the shell that called scancel
elif prog == "sudo":
    if args and shutil.which(args[0], path=BIN):   # one of these stand-ins
        sys.exit(subprocess.run(args).returncode)
    if args[:1] == ["tee"]:
        sys.stdin.read()
    # Anything else is recorded, never run on this machine.
elif prog == "pgrep":
    pattern = args[args.index("-f") + 1]
    sys.exit(0 if any(re.search(pattern, p["cmd"]) for p in procs()) else 1)
elif prog == "pkill":
    pattern = args[args.index("-f") + 1]
    sig = signum(args[0][1:]) if args[0].startswith("-") and args[0] != "-f" else signal.SIGTERM
    table = procs()
    hit = [p for p in table if re.search(pattern, p["cmd"])]
    gone = [p for p in hit if sig == signal.SIGKILL or p.get("on_term", "exit") == "exit"]
    for p in hit:
        log(argv=[f"<{{signal.Signals(sig).name}}>", p["cmd"]], prog="process")
    procs(update=[p for p in table if p not in gone])
    sys.exit(0 if hit else 1)
elif prog == "fuser":
    log(held=locked())
    sys.exit(0 if locked() else 1)
elif prog == "apt-get":
    opts = [args[i + 1] for i, a in enumerate(args) if a == "-o"]
    timeout = [float(o.split("=", 1)[1]) for o in opts if o.startswith("DPkg::Lock::Timeout=")]
    verb = [a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] != "-o")][0]
    if verb == "install" and timeout:   # apt waits for the dpkg lock, up to its timeout
        deadline = time.time() + timeout[0]
        while locked() and time.time() < deadline:
            time.sleep(0.05)
    if locked():   # `update` takes the lists lock, which DPkg::Lock::Timeout does not cover
        lock = "/var/lib/apt/lists/lock" if verb == "update" else "/var/lib/dpkg/lock-frontend"
        sys.exit(print(f"E: Could not get lock {{lock}}. It is held by process 1312 (unattended-upgr)",
                       file=sys.stderr) or 100)
    if verb == "install" and "gcsfuse" in args:
        os.symlink(os.path.join(BIN, "fake"), os.path.join(BIN, "gcsfuse"))
elif prog == "lsb_release":
    print("jammy")
elif prog == "mountpoint":
    sys.exit(1)
elif prog == "gcsfuse":
    config = args[args.index("--config-file") + 1] if "--config-file" in args else None
    log(config=open(config).read() if config else None)
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
STAND_INS = ("gcloud", "srun", "scancel", "scontrol", "python", "python3.11", "sudo", "pgrep",
             "pkill", "fuser", "apt-get", "curl", "lsb_release", "mountpoint")


@pytest.fixture
def fakes(tmp_path):
    """A bin/ of stand-ins first on PATH, their log, and a runner for the scripts."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "fake"
    fake.write_text(FAKE.format(python=sys.executable))
    fake.chmod(0o755)
    for name in STAND_INS:
        (bin_dir / name).symlink_to(fake)
    log = tmp_path / "calls.jsonl"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TPU_", "CUDA_", "JAX_", "FAKE_", "SSH_"))}
    for k in ("ACCELERATOR_TYPE", "ZONE", "PROJECT", "RUNTIME_VERSION", "PROVISIONING", "CONFIG",
              "WORKDIR", "KEEP", "DRY_RUN", "PROCS", "GPUS_PER_NODE", "VENV", "PYTHON", "ROOT",
              "NUM_SAMPLES", "REQUEUE", "REMOTE_DIR", "MOUNT_BUCKETS", "STOP_TIMEOUT",
              "APT_LOCK_WAIT", "MOUNT_CACHE_MB"):
        env.pop(k, None)
    (tmp_path / "gcs").mkdir()
    # A developer's machine: an ssh-agent holding their own key, not gcloud's.
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log),
               FAKE_GCS=str(tmp_path / "gcs"), FAKE_PROCS=str(tmp_path / "procs.json"),
               SSH_AUTH_SOCK=str(tmp_path / "agent.sock"), FAKE_AGENT_KEYS="id_ed25519",
               POLL_SECONDS="0", WAIT_TIMEOUT="30")

    class Fakes:
        path = tmp_path
        gcs = tmp_path / "gcs"
        python = str(bin_dir / "python")
        bin = bin_dir

        @staticmethod
        def states(*states):
            (tmp_path / "states.json").write_text(json.dumps(list(states)))
            env["FAKE_STATES"] = str(tmp_path / "states.json")

        @staticmethod
        def procs(*table):
            (tmp_path / "procs.json").write_text(json.dumps(list(table)))

        @staticmethod
        def procs_left():
            return json.loads((tmp_path / "procs.json").read_text())

        @staticmethod
        def env(**extra):
            return dict(env, **extra)

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
        def wait_ready(tasks=1, srun=False):
            """Until `tasks` stand-in trainers wait for SIGTERM (and srun recorded them)."""
            deadline = time.time() + 30
            while (len([f for f in os.listdir(tmp_path) if f.startswith("calls.jsonl.ready.")])
                   < tasks or (srun and not os.path.exists(f"{log}.srun"))):
                assert time.time() < deadline, "the stand-in never started"
                time.sleep(0.01)

    return Fakes


def one_line_error(r, needle):
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


# ---------------------------------------------------------------- the stand-ins themselves

def test_stand_in_gcloud_scp_checks_the_agent_like_gcloud(fakes, tmp_path):
    """gcloud's VerifyKeyInAgent: several workers, not --dry-run, `ssh-add -l` succeeds (an
    agent with keys) and lacks the key -> SSHKeyNotInAgent; no agent or an empty one -> go on."""
    scp = [str(fakes.bin / "gcloud"), *VM, "scp", str(tmp_path / "x"), "pod:x"]
    (tmp_path / "x").write_text("x")

    def rc(*extra, **env):
        return subprocess.run([*scp, *extra], env=fakes.env(**env), capture_output=True,
                              text=True)

    r = rc("--worker=all")
    assert r.returncode == 1 and "SSH Key is not present in the SSH agent" in r.stderr
    assert rc("--worker=all", FAKE_AGENT_KEYS="id_ed25519 google_compute_engine").returncode == 0
    assert rc("--worker=all", FAKE_AGENT_KEYS="").returncode == 0     # ssh-add -l fails: warning
    assert rc("--worker=all", SSH_AUTH_SOCK="").returncode == 0       # no agent at all
    assert rc("--worker=0").returncode == 0                           # one worker
    assert rc("--worker=all", FAKE_WORKERS="1").returncode == 0       # a one-host slice


def test_stand_in_srun_kills_its_tasks_on_sigterm_and_scancel_signals_them(fakes):
    """srun answers SIGTERM by SIGKILLing the tasks (exit 137); `scancel --signal=TERM JOB`
    reaches the tasks, which checkpoint and exit 0, and srun then exits 0."""
    srun = [str(fakes.bin / "srun"), "--ntasks-per-node=2", "--ntasks=4", fakes.python, "-m",
            "cxr_rf.train"]
    env = fakes.env(FAKE_PY_WAIT_TERM="1")
    p = subprocess.Popen(srun, env=env, stderr=subprocess.PIPE, text=True)
    fakes.wait_ready(tasks=2, srun=True)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 137 and "forcing job termination" in err
    assert not [c for c in fakes.calls("python") if c["argv"] == ["<SIGTERM>"]]   # no checkpoint

    for f in os.listdir(fakes.path):
        if f.startswith("calls.jsonl."):
            os.remove(fakes.path / f)
    p = subprocess.Popen(srun, env=env)
    fakes.wait_ready(tasks=2, srun=True)
    subprocess.run([str(fakes.bin / "scancel"), "--signal=TERM", "123"], env=env, check=True)
    assert p.wait(timeout=30) == 0
    assert len([c for c in fakes.calls("python") if c["argv"] == ["<SIGTERM>"]]) == 2


def test_stand_in_scancel_batch_reaches_only_the_batch_script(fakes):
    script = ('trap \'echo batch-got-TERM\' TERM; ' + shlex.quote(str(fakes.bin / "scancel")) +
              ' --batch --signal=TERM 123; echo done')
    r = subprocess.run(["bash", "-c", script], env=fakes.env(), capture_output=True, text=True)
    assert r.stdout.split() == ["batch-got-TERM", "done"]


# ---------------------------------------------------------------- launch/tpu_pod.sh

QR = ["compute", "tpus", "queued-resources"]
VM = ["compute", "tpus", "tpu-vm"]
LOC = ["--zone=us-east5-a", "--project=my-proj"]
DESCRIBE = [*QR, "describe", "pod", *LOC, "--format=value(state.state)"]
DESCRIBE_TYPE = [*QR, "describe", "pod", *LOC,
                 "--format=value(tpu.nodeSpec[0].node.acceleratorType)"]
TRAIN_FLAGS = ["--config.train.steps=7", "--config.data.mixture=(('/data/cxr a', 0.5), (\"b\", 0.5))",
               "--config.model.dtype=bfloat16"]
BASE = ["--name", "pod", "--type", "v5p-128", "--zone", "us-east5-a", "--project", "my-proj",
        "--config", "experiments/cxr_b.py", "--workdir", "gs://bucket/runs/cxr b"]
CODE = re.compile(r"gs://bucket/runs/cxr b/code/cxr_rf-\d{8}T\d{6}Z\.tar\.gz")


def create_call(type_="v5p-128", runtime="v2-alpha-tpuv5", extra=()):
    return [*QR, "create", "pod", "--node-id=pod", f"--accelerator-type={type_}",
            f"--runtime-version={runtime}", *LOC, *extra]


def test_tpu_creates_waits_stages_installs_trains_and_deletes(fakes):
    """The whole launch against a developer machine whose ssh-agent lacks gcloud's key."""
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
    # The code goes up once, into the run directory, and each worker copies it down.
    assert gcloud[6][:2] == ["storage", "cp"] and CODE.fullmatch(gcloud[6][3])
    assert gcloud[7][:8] == [*VM, "ssh", "pod", "--worker=all", *LOC]
    assert gcloud[8] == ["storage", "cp", gcloud[6][3], f"{home}/cxr_rf.tar.gz"]
    assert gcloud[9][:8] == [*VM, "ssh", "pod", "--worker=all", *LOC]
    assert len(gcloud[9]) == 9 and gcloud[9][8].startswith("--command=")
    assert gcloud[10] == [*QR, "delete", "pod", *LOC, "--force", "--async", "--quiet"]
    assert len(gcloud) == 11
    assert not any("scp" in g for g in gcloud)

    # The repository reached the worker without the heavy or private directories ...
    with tarfile.open(home / "cxr_rf.tar.gz") as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
    assert {"cxr_rf/train.py", "experiments/cxr_b.py", "pyproject.toml"} <= names
    assert not any(n.split("/")[0] in (".venv", ".git", "runs") for n in names)
    staged = list((fakes.gcs / "bucket" / "runs" / "cxr b" / "code").iterdir())
    assert len(staged) == 1 and staged[0].read_bytes() == (home / "cxr_rf.tar.gz").read_bytes()
    # ... was installed with the TPU and GCS extras into its own venv, then trained with exactly
    # our arguments (the worker's shell parsed the quoted command back into the same argv), as a
    # multi-host TPU job, with gcsfs's bucket-type probe off.
    py = [c for c in fakes.calls() if c["prog"] == "python"]
    assert [c["argv"] for c in py] == [
        ["-m", "pip", "install", "-q", "-e", ".[tpu,gcs]"],
        ["-m", "cxr_rf.train", "--config=experiments/cxr_b.py", "--workdir=gs://bucket/runs/cxr b",
         "--cluster=tpu", *TRAIN_FLAGS]]
    assert {c["cwd"] for c in py} == {str(home / "cxr_rf")}
    assert py[1]["env"]["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"
    assert (home / "cxr_rf" / "experiments" / "cxr_b.py").exists()
    # Leftovers were looked for, and libtpu's lock file removed, before anything was installed.
    progs = [(c["prog"], c["argv"]) for c in fakes.calls() if c["prog"] in ("pgrep", "sudo", "python")]
    assert progs[:2] == [("pgrep", ["-f", "python[^ ]* -m cxr_rf[.]train"]),
                         ("sudo", ["rm", "-f", "/tmp/libtpu_lockfile"])]


def test_tpu_reused_slice_stops_leftover_trainers_first(fakes):
    """A slice reused after a lost ssh session still runs the last launch's trainers (they hold
    the TPU): SIGTERM (they checkpoint), SIGKILL for one that does not stop; other processes
    are left alone; then the lock file goes and only then is the new code installed."""
    home = fakes.path / "worker"
    home.mkdir()
    fakes.states("ACTIVE")
    old = "/home/me/cxr_rf/.venv/bin/python -m cxr_rf.train --config=experiments/cxr_b.py"
    stuck = "/home/me/cxr_rf/.venv/bin/python3 -m cxr_rf.train --config=experiments/cxr_xl.py"
    other = "/usr/bin/python3 -m http.server 8000"
    fakes.procs({"cmd": old}, {"cmd": stuck, "on_term": "ignore"}, {"cmd": other})
    r = fakes.run(TPU, *BASE, FAKE_HOME=str(home), STOP_TIMEOUT="2")
    assert r.returncode == 0, r.stderr
    assert "stopping leftover trainers" in r.stderr
    signals = [c["argv"] for c in fakes.calls("process")]
    assert signals == [["<SIGTERM>", old], ["<SIGTERM>", stuck], ["<SIGKILL>", stuck]]
    assert fakes.procs_left() == [{"cmd": other}]
    order = [c["argv"][:2] for c in fakes.calls() if c["prog"] in ("sudo", "gcloud", "python")]
    lock = order.index(["rm", "-f"])
    assert order.index(["storage", "cp"]) < lock < order.index(["-m", "pip"])
    assert [c for c in order if c[0] == "storage"][1:] and \
        lock < [i for i, c in enumerate(order) if c[0] == "storage"][1]


def test_tpu_refuses_a_reused_slice_of_another_type(fakes):
    """Exit 2, one line, before the cleanup trap: the other slice is neither used nor deleted."""
    fakes.states("ACTIVE")
    r = fakes.run(TPU, *BASE, FAKE_QR_TYPE="v5p-64")
    assert r.returncode == 2
    one_line_error(r, "queued resource 'pod' exists as v5p-64, not --type v5p-128")
    assert [c["argv"] for c in fakes.calls("gcloud")] == [DESCRIBE, DESCRIBE_TYPE]
    fakes.states("WAITING_FOR_RESOURCES")
    r = fakes.run(TPU, *BASE, FAKE_QR_TYPE="")   # made with --accelerator-config: no type
    assert r.returncode == 2 and "accelerator config without a type" in r.stderr


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
    assert [c["argv"][3] if c["argv"][0] == "compute" else c["argv"][1]
            for c in fakes.calls("gcloud")] == [
        "describe", "describe", "describe", "create", "describe", "cp", "ssh", "ssh"]


def test_tpu_reuses_an_active_resource_and_keep_skips_delete(fakes):
    """Also: an absolute --config inside the repository becomes the workers' relative path."""
    fakes.states("ACTIVE")
    args = [a.replace("experiments/cxr_b.py", os.path.join(ROOT, "experiments", "cxr_b.py"))
            for a in BASE]
    r = fakes.run(TPU, *args, "--keep")
    assert r.returncode == 0, r.stderr
    gcloud = [c["argv"] for c in fakes.calls("gcloud")]
    assert not any(a in g for g in gcloud for a in ("create", "delete"))
    assert gcloud[:3] == [DESCRIBE, DESCRIBE_TYPE, DESCRIBE]
    assert [g[1] if g[0] == "storage" else g[3] for g in gcloud[3:]] == ["cp", "ssh", "ssh"]
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


@pytest.mark.parametrize("args, env, needle", [
    (["--workdir", "runs/local"], {}, "--workdir must be a gs:// path"),
    (["--workdir", "/gcs/bucket/x"], {}, "--workdir must be a gs:// path"),
    (["--type", "v3-8"], {}, "no default --runtime for accelerator type 'v3-8'"),
    (["--config", "/etc/hostname"], {}, "--config must be a file inside this repository"),
    (["--config", "experiments/nope.py"], {}, "--config file not found"),
    (["--name"], {}, "--name needs a value"),
    (["--mount", "gs://cxr-data"], {}, "--mount takes a bucket name"),
    (["--workers", "4"], {}, "unknown argument '--workers'"),
    ([], {"STOP_TIMEOUT": "2m"}, "STOP_TIMEOUT must be a whole number"),
    ([], {"APT_LOCK_WAIT": "-1"}, "APT_LOCK_WAIT must be a whole number"),
    ([], {"MOUNT_CACHE_MB": "0"}, "MOUNT_CACHE_MB must be a positive whole number"),
])
def test_tpu_bad_input_is_one_line_and_runs_nothing(fakes, args, env, needle):
    fakes.states("ACTIVE")
    r = fakes.run(TPU, *BASE, *args, **env)
    assert r.returncode == 2
    one_line_error(r, needle)
    assert fakes.calls() == []


def test_tpu_required_flags(fakes):
    r = fakes.run(TPU, "--type", "v5p-8", "--config", "experiments/cxr_b.py", "--workdir", "gs://b/x")
    assert r.returncode == 2
    one_line_error(r, "--name (or TPU_NAME) is required")


def test_tpu_needs_bash_4_4(fakes):
    """macOS's bash 3.2 (and sh) stop at the first line with one error line and exit 2, not
    halfway through with 'unbound variable' or 'bad substitution'."""
    script = 'BASH_VERSION="3.2.57(1)-release"; . "$0" --help'
    r = subprocess.run(["bash", "-c", script, TPU], cwd=ROOT, env=fakes.env(), capture_output=True,
                       text=True)
    assert r.returncode == 2
    one_line_error(r, "needs bash >= 4.4, this is 3.2.57(1)-release")
    if shutil.which("dash"):
        r = subprocess.run(["dash", TPU, "--help"], cwd=ROOT, env=fakes.env(),
                           capture_output=True, text=True)
        assert r.returncode == 2
        one_line_error(r, "needs bash >= 4.4, this is not bash")
    r = fakes.run(TPU, "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: ")


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
    assert argvs[4][1:3] == ["storage", "cp"] and CODE.fullmatch(argvs[4][-1])
    assert argvs[5][1:5] == [*VM, "ssh"] and "'.[tpu,gcs]'" in argvs[5][-1]
    remote = shlex.split(argvs[6][-1].removeprefix("--command="))
    assert "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false" in remote
    assert remote[remote.index("exec") + 1:] == [
        ".venv/bin/python", "-m", "cxr_rf.train", "--config=experiments/cxr_b.py",
        "--workdir=gs://bucket/runs/cxr b", "--cluster=tpu", *TRAIN_FLAGS]
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
        assert f'gcsfuse --config-file "$cache/{b}.yaml" --o ro {b} /gcs/{b}' in mount
    assert mount.index("more.data") < mount.index("cxr-data")
    assert "apt_get install -y -qq gcsfuse" in mount and "DPkg::Lock::Timeout=900" in mount
    assert "/ 2))" in mount    # the default cache: 80% of the free space, split over 2 buckets
    r = fakes.run(TPU, *BASE, "--dry-run")
    assert "gcsfuse" not in r.stdout


def test_tpu_mount_waits_for_unattended_upgrades_then_mounts_read_only_with_a_cache(fakes):
    """A fresh VM: unattended-upgrades holds apt's locks for a while. gcsfuse is installed once
    they are free, then the bucket is mounted read-only with a file cache on the worker's disk."""
    if shutil.which("gcsfuse", path=os.environ["PATH"]):
        pytest.skip("a real gcsfuse is on PATH; this test needs the stand-in's install path")
    home = fakes.path / "worker"
    home.mkdir()
    fakes.states("ACTIVE")
    until = time.time() + 3.0
    r = fakes.run(TPU, *BASE, "--mount", "cxr-data", FAKE_HOME=str(home), MOUNT_CACHE_MB="2048",
                  FAKE_LOCK_UNTIL=str(until))
    assert r.returncode == 0, r.stderr
    assert fakes.calls("fuser")[0]["held"]                     # it did find the lock held ...
    assert min(c["t"] for c in fakes.calls("apt-get")) >= until   # ... and waited it out
    apt = [c["argv"] for c in fakes.calls("apt-get")]
    assert [a[-1] for a in apt] == ["-qq", "gcsfuse"] and apt[0][:2] == ["-o", "DPkg::Lock::Timeout=900"]
    (mount,) = fakes.calls("gcsfuse")
    cache = f"{home}/.cache/gcsfuse/cxr-data"
    assert mount["argv"] == ["--config-file", f"{cache}.yaml", "--o", "ro", "cxr-data",
                             "/gcs/cxr-data"]
    assert mount["config"].splitlines() == [
        f"cache-dir: {cache}", "implicit-dirs: true", "file-cache:", "  max-size-mb: 2048",
        "  cache-file-for-range-read: true"]
    assert os.path.isdir(cache)
    train = [c for c in fakes.calls("python") if "cxr_rf.train" in c["argv"]]
    assert len(train) == 1   # mounted before training


def test_tpu_mount_gives_up_on_a_lock_that_stays(fakes):
    home = fakes.path / "worker"
    home.mkdir()
    fakes.states("ACTIVE")
    r = fakes.run(TPU, *BASE, "--mount", "cxr-data", FAKE_HOME=str(home), APT_LOCK_WAIT="2",
                  FAKE_LOCK_UNTIL=str(time.time() + 600))
    assert r.returncode != 0
    assert "apt/dpkg still locked after 2s" in r.stderr
    assert fakes.calls("apt-get") == [] and fakes.calls("gcsfuse") == []
    assert not [c for c in fakes.calls("python") if "cxr_rf.train" in c["argv"]]


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
    assert fakes.calls("scontrol") == [] and fakes.calls("scancel") == []


def test_slurm_per_gpu_one_process_per_gpu(fakes):
    r = fakes.run(SLURM, "--config.train.steps=5",
                  **slurm_env(fakes, PROCS="per-gpu", SLURM_GPUS_PER_NODE="h100:4"))
    assert r.returncode == 0, r.stderr
    (srun,) = [c["argv"] for c in fakes.calls("srun")]
    assert srun[:5] == ["--nodes=2", "--ntasks-per-node=4", "--ntasks=8", "--kill-on-bad-exit=1",
                        "--cpus-per-task=16"]
    py = fakes.calls("python")
    assert sorted(c["env"]["CUDA_VISIBLE_DEVICES"] for c in py) == ["0", "1", "2", "3"]
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


@pytest.mark.parametrize("procs, tasks", [("per-node", 1), ("per-gpu", 4)])
def test_slurm_sigterm_reaches_the_trainers_through_the_step_then_requeues(fakes, procs, tasks):
    """The time-limit warning (--signal=B:TERM@120) reaches the batch script. Passed on to srun
    it would SIGKILL the trainers (exit 137, no checkpoint, no requeue); through `scancel
    --signal=TERM JOB` every trainer checkpoints and exits 0, then the job is requeued."""
    p = fakes.popen(SLURM, **slurm_env(fakes, SLURM_GPUS_ON_NODE="4", PROCS=procs,
                                       FAKE_PY_WAIT_TERM="1"))
    fakes.wait_ready(tasks=tasks, srun=True)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert [c["argv"] for c in fakes.calls("scancel")] == [["--signal=TERM", "123"]]
    assert [c["argv"] for c in fakes.calls("srun")][1:] == []      # srun itself never signalled
    assert len([c for c in fakes.calls("python") if c["argv"] == ["<SIGTERM>"]]) == tasks
    assert [c["argv"] for c in fakes.calls("scontrol")] == [["requeue", "123"]]


def test_slurm_no_requeue_when_the_trainers_fail(fakes):
    p = fakes.popen(SLURM, **slurm_env(fakes, SLURM_GPUS_ON_NODE="8", FAKE_PY_WAIT_TERM="1"))
    fakes.wait_ready(tasks=1, srun=True)
    for pid in json.loads(open(f"{fakes.path}/calls.jsonl.srun").read()):
        os.kill(pid, signal.SIGKILL)     # a trainer dies (OOM killer, node failure)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 137, err
    assert fakes.calls("scontrol") == []


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


def test_slurm_header_documents_the_site_settings_preemption_needs():
    text = open(SLURM).read()
    for needle in ("#SBATCH --signal=B:TERM@120", "PreemptMode=REQUEUE",
                   "PreemptParameters=send_user_signal", "GraceTime"):
        assert needle in text


# ---------------------------------------------------------------- launch/local*.sh

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


def test_local_multiprocess_imports_only_declared_packages():
    """It picks the coordinator port with portpicker: a declared dependency, not a transitive one."""
    text = open(os.path.join(LAUNCH, "local_multiprocess.sh")).read()
    imported = set(re.findall(r"\bimport (\w+)", text))
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = {re.split(r"[=<>\[ ]", d)[0] for d in tomllib.load(f)["project"]["dependencies"]}
    assert imported == {"portpicker"} and imported <= deps


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
