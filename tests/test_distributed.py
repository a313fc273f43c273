"""How ``python -m cxr_rf.train`` decides whether to join other processes
(``train.distributed_plan``, pure: flags + an environment in, a plan out) and what
``init_distributed`` then does with JAX (its calls recorded, never made).

The environments are what each place really sets: srun's task variables (and the batch
script's, which lack the step ones), a GKE TPU pod's worker list, and a queued-resource TPU VM's
ssh session, which names no other host at all (JAX asks the metadata server in ``initialize()``)."""
from pathlib import Path

import jax
import pytest

from cxr_rf import cli, errors, train

ROOT = Path(__file__).resolve().parents[1]
EXP = str(ROOT / "experiments" / "smoke.py")

LOCAL = {"HOME": "/home/me", "PATH": "/usr/bin:/bin", "USER": "me"}
# srun sets these in every task (SLURM_NTASKS: the step's task count).
SLURM_TASK = dict(LOCAL, SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="gpu[01-02]", SLURM_NTASKS="2",
                  SLURM_PROCID="1", SLURM_LOCALID="0", SLURM_NNODES="2")
# The batch script itself (and an salloc shell): job variables, no step.
SLURM_BATCH = dict(LOCAL, SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_NNODES="2",
                   SLURM_JOB_NODELIST="gpu[01-02]")
# `gcloud compute tpus tpu-vm ssh --worker=all` on a v5p-128 queued resource: a login
# environment, nothing TPU-specific (libtpu and JAX read the topology from the metadata server).
TPU_VM = dict(LOCAL, HOME="/home/me", LOGNAME="me", SHELL="/bin/bash",
              SSH_CONNECTION="10.0.0.1 51000 10.130.0.5 22", LANG="C.UTF-8")
# A GKE TPU pod: the webhook injects the worker list and this worker's index.
GKE = dict(LOCAL, TPU_WORKER_HOSTNAMES="w-0.svc,w-1.svc,w-2.svc,w-3.svc", TPU_WORKER_ID="2",
           TPU_ACCELERATOR_TYPE="v5p-32", KUBERNETES_SERVICE_HOST="10.0.0.1")


def plan(env, coordinator=None, num_processes=None, process_id=None, cluster="auto"):
    return train.distributed_plan(coordinator, num_processes, process_id, cluster, env)


# ----------------------------------------------------------------------------- the decisions

def test_explicit_flags_win_over_any_environment():
    for env in (LOCAL, SLURM_TASK, GKE, TPU_VM):
        p = plan(env, "10.0.0.2:1234", 4, 3)
        assert p.initialize and p.gloo
        assert p.kwargs == dict(coordinator_address="10.0.0.2:1234", num_processes=4,
                                process_id=3)


@pytest.mark.parametrize("args, needle", [
    (("h:1", None, 0), "--coordinator needs --num_processes and --process_id"),
    (("h:1", 2, None), "--coordinator needs --num_processes and --process_id"),
    ((None, 2, 0), "--num_processes/--process_id need --coordinator"),
    ((None, None, 0), "--num_processes/--process_id need --coordinator"),
])
def test_incomplete_explicit_flags_are_user_errors(args, needle):
    with pytest.raises(errors.UserError, match=needle):
        plan(LOCAL, *args)


def test_explicit_flags_and_a_cluster_exclude_each_other():
    with pytest.raises(errors.UserError, match="--coordinator and --cluster=tpu exclude"):
        plan(LOCAL, "h:1", 2, 0, cluster="tpu")
    with pytest.raises(errors.UserError, match="--cluster must be auto, tpu or none"):
        plan(LOCAL, cluster="slurm")


def test_slurm_step_with_several_tasks_joins_with_one_task_does_not():
    p = plan(SLURM_TASK)
    assert p.initialize and p.kwargs == {} and not p.gloo   # JAX reads the SLURM variables
    assert "2 task" in p.reason
    assert not plan(dict(SLURM_TASK, SLURM_NTASKS="1")).initialize


def test_slurm_batch_script_or_salloc_shell_is_one_process():
    """SLURM_JOB_ID and SLURM_NTASKS=2 without a step: JAX's SLURM detection would not find
    the cluster (initialize() would fail); the old rule (SLURM_JOB_ID and NTASKS > 1) tried."""
    assert not plan(SLURM_BATCH).initialize


def test_tpu_vm_without_gke_variables_needs_the_launcher_to_say_so():
    assert not plan(TPU_VM).initialize                      # nothing to see in the environment
    p = plan(TPU_VM, cluster="tpu")                         # launch/tpu_pod.sh
    assert p.initialize and p.kwargs == {} and not p.gloo   # JAX asks the metadata server


def test_gke_tpu_worker_list():
    p = plan(GKE)
    assert p.initialize and p.kwargs == {} and "4 host" in p.reason
    single = dict(GKE, TPU_WORKER_HOSTNAMES="w-0.svc")
    assert not plan(single).initialize
    assert plan(dict(LOCAL, TPU_PROCESS_ADDRESSES="a:8476,b:8476")).initialize


def test_multislice_and_open_mpi():
    assert plan(dict(TPU_VM, MEGASCALE_COORDINATOR_ADDRESS="10.0.0.9")).initialize
    mpi = dict(LOCAL, OMPI_MCA_orte_hnp_uri="1531576320.0;tcp://10.96.0.1:34911")
    assert plan(dict(mpi, OMPI_COMM_WORLD_SIZE="8")).initialize
    assert not plan(dict(mpi, OMPI_COMM_WORLD_SIZE="1")).initialize


def test_plain_local_run_and_cluster_none():
    assert not plan(LOCAL).initialize
    for env in (SLURM_TASK, GKE, TPU_VM):
        assert not plan(env, cluster="none").initialize


# ----------------------------------------------------------------------------- what JAX is asked

@pytest.fixture
def jax_calls(monkeypatch):
    """Record jax.distributed.initialize / config.update; let a test set process_count."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(("init", kw)))
    update = jax.config.update
    monkeypatch.setattr(jax.config, "update",
                        lambda k, v: calls.append(("config", k, v)) if "collectives" in k
                        else update(k, v))
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    return calls


def test_init_distributed_tpu_calls_initialize_without_arguments(jax_calls, monkeypatch):
    for k in list(train._SLURM_STEP) + ["TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"]:
        monkeypatch.delenv(k, raising=False)
    train.init_distributed(None, None, None, "tpu")
    assert jax_calls == [("init", {})]


def test_init_distributed_explicit_sets_gloo_then_initializes(jax_calls):
    train.init_distributed("127.0.0.1:5000", 2, 1)
    assert jax_calls == [
        ("config", "jax_cpu_collectives_implementation", "gloo"),
        ("init", dict(coordinator_address="127.0.0.1:5000", num_processes=2, process_id=1))]


def test_several_processes_without_a_client_is_one_line_naming_the_flag(jax_calls, monkeypatch,
                                                                         tmp_path, capsys):
    """A TPU VM whose libtpu joined 4 hosts while nobody initialised jax.distributed: the run
    would fail later inside Orbax; instead `train` stops at once, exit 2, naming --cluster=tpu."""
    monkeypatch.setattr(train.os, "environ", dict(TPU_VM))
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    code = cli.call(train, [f"--config={EXP}", f"--workdir={tmp_path / 'w'}"])
    assert code == 2 and jax_calls == []
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: JAX sees 4 processes") and "--cluster=tpu" in err[-1]


def test_train_cluster_flag_reaches_initialize(jax_calls, monkeypatch, tmp_path):
    class Joined(Exception):
        pass

    def initialize(**kw):
        jax_calls.append(("init", kw))
        raise Joined   # stop before training

    monkeypatch.setattr(train.os, "environ", dict(TPU_VM))
    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    with pytest.raises(Joined):
        cli.call(train, [f"--config={EXP}", f"--workdir={tmp_path / 'w'}", "--cluster=tpu"])
    assert jax_calls == [("init", {})]
    assert cli.call(train, [f"--config={EXP}", f"--workdir={tmp_path / 'w'}",
                            "--cluster=slurm"]) == 2
