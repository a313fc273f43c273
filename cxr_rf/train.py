"""Train a rectified-flow MMDiT.

    python -m cxr_rf.train --config experiments/smoke.py --workdir /tmp/run [--config.train.steps=100]

The workdir holds everything of a run: config.json, data/ (converted on first use when
``data.dir`` is empty), checkpoints/, tensorboard events, samples/. Rerunning the same command
resumes from the newest checkpoint. The pieces (Trainer, Stages, data, restore) live in
``cxr_rf.trainer``; this file is the loop and the command line.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from absl import flags
from etils import epath

from cxr_rf import checkpoint, cli, errors, outputs
from cxr_rf import config as config_lib
from cxr_rf import step as step_lib
from cxr_rf import trainer as trainer_lib

FLAGS = flags.FLAGS


# --------------------------------------------------------------------------------------------
# What both training loops do around their steps (this one and the autoencoder's,
# cxr_rf.autoencoder.train): config.json, checkpoints and preemption, metrics, teardown.
# --------------------------------------------------------------------------------------------

def write_config(cfg: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    """``workdir/config.json``, atomically (write, then rename): the other processes of a
    resumed run read the previous config.json in check_resumable while the lead replaces it."""
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / f"config.json.tmp{os.getpid()}"
    tmp.write_text(cfg.to_json_best_effort(indent=2))
    tmp.replace(workdir / "config.json")


def open_outputs(t: ml_collections.ConfigDict, workdir: epath.Path, lead: bool):
    """(checkpoint manager, SIGTERM request, TensorBoard writer or None off the lead process)
    of a run in ``workdir`` with the ``train`` settings ``t`` (``close_all`` them in this order)."""
    mngr = checkpoint.manager(workdir / "checkpoints", keep=t.ckpt_keep,
                              keep_period=t.ckpt_keep_period, async_save=t.ckpt_async)
    return mngr, checkpoint.StopRequest(), (outputs.MetricWriter(workdir / "tensorboard")
                                            if lead else None)


def save_checkpoint(mngr, stop: checkpoint.StopRequest, step: int, end: int, every: int,
                    state, data_iter) -> bool:
    """Checkpoint ``step`` (state + iterator) when it is due (every ``every`` steps and the
    loop's last step ``end``) or a preemption/SIGTERM was requested (then forced, and True:
    the loop stops after this step, see ``stopped``)."""
    preempted = stop(mngr, step)
    if step % every == 0 or step == end or preempted:
        checkpoint.save(mngr, step, state, data_iter, force=preempted)
    return preempted


def stopped(last: dict, step: int) -> None:
    """Log and record (``last["preempted"]``) a loop stopped by ``save_checkpoint``."""
    logging.warning("stopping after the checkpoint of step %d (preemption/SIGTERM)", step)
    last["preempted"] = step


def close_all(*things) -> None:
    """``close()`` each of ``things`` in order (None and objects without ``close`` skipped)."""
    for thing in things:
        fn = getattr(thing, "close", None)
        if fn:
            fn()


def run(cfg: ml_collections.ConfigDict, workdir: str | epath.Path,
        stop_at: int | None = None, devices=None) -> dict:
    """Train (or resume) a run in ``workdir``; returns the last logged metrics.

    ``stop_at`` ends the loop early after that step (with a checkpoint), as a preemption
    would; the schedule still follows ``train.steps``. SIGTERM does the same at the next
    step boundary (``preempted`` is then set in the result). ``devices`` (default: all)
    is what the mesh spans.
    """
    if cfg.get("task", "mmdit") == "autoencoder":   # the latent autoencoder's own loop
        from cxr_rf.autoencoder import train as ae_train
        return ae_train.run(cfg, workdir, stop_at=stop_at, devices=devices)
    from cxr_rf import sample  # sample imports model/flow only; kept local to keep CLI start fast
    t = cfg.train
    workdir = epath.Path(workdir)
    stop_at = stop_at if stop_at is not None else (t.stop_at or None)
    end = t.steps if stop_at is None else min(stop_at, t.steps)
    lead = jax.process_index() == 0

    # ----------------------------------------------------------------------------------------
    # Setup. The order matters: 1. the schedule and the data are checked before anything is
    # written; 2. the data exist before the first stage opens its iterator; 3. the state is
    # built (sharded) before the restore, which needs its layout; 4. the restore moves the
    # iterator of the checkpoint's stage to the saved position.
    # ----------------------------------------------------------------------------------------
    schedule = config_lib.stages(cfg)
    trainer_lib.check_resumable(cfg, workdir)       # a workdir of another token layout
    path = trainer_lib.ensure_data(cfg, workdir)   # a bad data.dir fails before the workdir exists
    if lead:
        write_config(cfg, workdir)
    stages = trainer_lib.Stages(cfg, schedule, path, devices)
    stages.enter(0)
    mngr, stop, writer = open_outputs(t, workdir, lead)
    grids = bool(t.sample_every)
    if grids and jax.process_count() > 1:
        # The sampler runs on process 0 alone and cannot read parameters sharded over the
        # other processes' devices; grids come from `python -m cxr_rf.sample` instead.
        logging.warning("sample grids are off with %d processes", jax.process_count())
        grids = False
    lr = step_lib.lr_schedule(cfg)
    try:
        start, state = trainer_lib.restore_or_start(cfg, mngr, stages.trainer.init_state(),
                                                    iter_for_step=stages.iterator_for)
        bar = outputs.progress(start, t.steps, enabled=lead and t.progress)
        sampler, current = None, None
        last: dict[str, Any] = {}
        window, t0 = [], time.perf_counter()

        for step in range(start + 1, end + 1):
            # ------------------------------------------------------------------------------------
            # Stage: a new resolution brings its own Trainer, iterator and sampler.
            # ------------------------------------------------------------------------------------
            stages.enter(step)
            trainer, data_iter = stages.trainer, stages.data_iter
            if stages.stage.index != current:
                st, current = stages.stage, stages.stage.index
                logging.info("stage %d: steps %d-%d at %d² (global batch %d, timestep shift "
                             "%.3g)", st.index, st.start + 1, st.end, st.resolution,
                             st.batch_size, trainer.fs.shift)
                sampler = sample.Sampler(stages.cfg_at, trainer.model) if lead and grids else None

            # ------------------------------------------------------------------------------------
            # Train step (asynchronous: nothing here waits for the device).
            # ------------------------------------------------------------------------------------
            state, metrics = trainer.train_step(state, next(data_iter))
            window.append(metrics)

            # ------------------------------------------------------------------------------------
            # Log: the only per-window host sync; the non-finite streak is checked here too.
            # ------------------------------------------------------------------------------------
            if step % t.log_every == 0 or step == t.steps:
                host = [trainer_lib.local_values(m) for m in window]
                dt = time.perf_counter() - t0
                last = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
                last.update(images_per_s=len(host) * stages.stage.batch_size / dt,
                            lr=float(lr(step)),
                            skipped=float(np.sum([m["skipped"] for m in host])),
                            nonfinite_streak=float(host[-1]["nonfinite_streak"]),
                            resolution=float(stages.stage.resolution),
                            shift=float(trainer.fs.shift))
                bar.update(step - bar.n)
                bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['images_per_s']:.1f}")
                if writer:
                    writer.scalars(step, {f"train/{k}": v for k, v in last.items()})
                window, t0 = [], time.perf_counter()
                trainer_lib.check_streak(int(last["nonfinite_streak"]), t.max_nonfinite, step)

            # ------------------------------------------------------------------------------------
            # Evaluate: EMA validation loss at fixed timesteps.
            # ------------------------------------------------------------------------------------
            if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
                val = trainer.evaluate(state.ema_params, path)
                last["val_loss"] = float(val.mean())
                if writer:
                    writer.scalars(step, {"val/loss": last["val_loss"], **{
                        f"val/loss_t{tv:.1f}": float(v) for tv, v in zip(t.eval_timesteps, val)}})

            # ------------------------------------------------------------------------------------
            # Checkpoint (state + this stage's iterator), then sample grids from the EMA.
            # ------------------------------------------------------------------------------------
            preempted = save_checkpoint(mngr, stop, step, end, t.ckpt_every, state, data_iter)
            if sampler and (step % t.sample_every == 0 or step == t.steps):
                sampler.grid(state.ema_params, workdir / "samples" / f"step_{step:07d}.png",
                             step=step)
            if preempted:
                stopped(last, step)
                break
        mngr.wait_until_finished()
        bar.close()
        return last
    finally:
        # ----------------------------------------------------------------------------------------
        # Teardown, whatever happened: signal handler, pending saves, Grain workers, logs.
        # ----------------------------------------------------------------------------------------
        close_all(stop, mngr, stages, writer)


def _define_flags() -> None:
    """Command-line flags (defined only when run as a program, so importing stays side-effect free)."""
    cli.define_config("config", "Experiment file (experiments/NAME.py).")
    flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it has checkpoints).")
    flags.DEFINE_string("coordinator", None, "host:port of process 0, for explicit multi-process "
                        "runs (SLURM steps are detected without it; TPU slices take --cluster=tpu).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator).")
    flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator).")
    flags.DEFINE_enum("cluster", "auto", ["auto", "tpu", "none"],
                      "How this process finds the others without --coordinator: auto (a SLURM "
                      "step, GKE TPU or MPI environment), tpu (a multi-host TPU VM slice: JAX asks "
                      "the metadata server; launch/tpu_pod.sh passes it), none (one process).")
    cli.check_number("num_processes", 1)
    cli.check_number("process_id", 0)
    flags.register_multi_flags_validator(["coordinator", "num_processes", "process_id"],
                                         _distributed_flags_ok)


def _distributed_flags_ok(f: dict) -> bool:
    """--coordinator, --num_processes and --process_id come together (init_distributed)."""
    counts = (f["num_processes"], f["process_id"])
    if not f["coordinator"]:
        if counts != (None, None):
            raise flags.ValidationError("--num_processes/--process_id need --coordinator")
    elif None in counts:
        raise flags.ValidationError("--coordinator needs --num_processes and --process_id")
    elif not counts[1] < counts[0]:
        raise flags.ValidationError(f"--process_id must be < --num_processes ({counts[0]}), "
                                    f"got {counts[1]}")
    return True


@dataclasses.dataclass(frozen=True)
class DistributedPlan:
    """What ``init_distributed`` does: call ``jax.distributed.initialize(**kwargs)`` or not."""
    initialize: bool
    kwargs: dict[str, Any]
    reason: str            # logged, and named in the error of a missed multi-host job
    gloo: bool = False     # CPU processes need a cross-process collectives backend


# The variables JAX's SLURM detection requires (jax/_src/clusters/slurm_cluster.py, 0.10.2).
_SLURM_STEP = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")


def _count(environ: Mapping[str, str], key: str, default: int = 1) -> int:
    """A process count from the environment; an unreadable value counts as ``default``."""
    try:
        return int(environ.get(key, default))
    except ValueError:
        return default


def distributed_plan(coordinator: str | None, num_processes: int | None,
                     process_id: int | None, cluster: str = "auto",
                     environ: Mapping[str, str] | None = None) -> DistributedPlan:
    """Decide from the flags and the environment (no network, no JAX) whether this process
    joins others, and how.

    Explicit ``--coordinator/--num_processes/--process_id`` win. ``--cluster=tpu`` (what
    ``launch/tpu_pod.sh`` passes) initialises with JAX's own TPU detection: on queued-resource
    TPU VMs nothing in the environment names the other hosts (JAX asks the metadata server
    during ``initialize()``), so only the launcher can say that this is a multi-host job.
    ``--cluster=none`` never initialises. ``auto`` initialises only where the environment
    shows several processes the way JAX's detection reads them: a SLURM step (srun) with more
    than one task, GKE TPU worker lists of more than one host, multislice, Open MPI.
    """
    env = os.environ if environ is None else environ
    if coordinator:
        if num_processes is None or process_id is None:
            raise errors.UserError("--coordinator needs --num_processes and --process_id")
        if cluster != "auto":
            raise errors.UserError(f"--coordinator and --cluster={cluster} exclude each other: "
                                   "give the processes explicitly or let the cluster do it")
        return DistributedPlan(True, dict(coordinator_address=coordinator,
                                          num_processes=num_processes, process_id=process_id),
                               f"--coordinator {coordinator}", gloo=True)
    if num_processes is not None or process_id is not None:
        raise errors.UserError("--num_processes/--process_id need --coordinator")
    if cluster == "none":
        return DistributedPlan(False, {}, "--cluster=none")
    if cluster == "tpu":
        return DistributedPlan(True, {}, "--cluster=tpu (JAX finds the TPU hosts)")
    if cluster != "auto":
        raise errors.UserError(f"--cluster must be auto, tpu or none, got '{cluster}'")
    # A SLURM step as JAX's SlurmCluster reads it; SLURM_JOB_ID alone is also set in the batch
    # script and in salloc shells, where this is the only process.
    if all(k in env for k in _SLURM_STEP):
        tasks = _count(env, "SLURM_NTASKS")
        return DistributedPlan(tasks > 1, {}, f"SLURM step with {tasks} task(s)")
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    if hosts:
        n = len([h for h in hosts.split(",") if h.strip()])
        return DistributedPlan(n > 1, {}, f"TPU worker list of {n} host(s) (GKE)")
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return DistributedPlan(True, {}, "TPU multislice (MEGASCALE_COORDINATOR_ADDRESS)")
    if env.get("OMPI_MCA_orte_hnp_uri"):
        size = _count(env, "OMPI_COMM_WORLD_SIZE", 2)
        return DistributedPlan(size > 1, {}, f"Open MPI with {size} process(es)")
    return DistributedPlan(False, {}, "no cluster in the environment")


def init_distributed(coordinator: str | None, num_processes: int | None,
                     process_id: int | None, cluster: str = "auto") -> DistributedPlan:
    """Join the other processes as ``distributed_plan`` decides; return the plan."""
    plan = distributed_plan(coordinator, num_processes, process_id, cluster)
    if plan.initialize:
        if plan.gloo:   # harmless on GPU/TPU
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        logging.info("joining jax.distributed: %s", plan.reason)
        jax.distributed.initialize(**plan.kwargs)
    elif jax.process_count() > 1:
        # libtpu joins the hosts of a slice by itself, so JAX can see several processes with
        # no distributed client: Orbax's async checkpointer and the preemption sync would then
        # fail later and less clearly.
        raise errors.UserError(
            f"JAX sees {jax.process_count()} processes but jax.distributed was not initialised "
            f"({plan.reason}); on a multi-host TPU slice pass --cluster=tpu "
            "(launch/tpu_pod.sh does)")
    return plan


def main(argv):
    # Bad input (errors.UserError) and known stops (RunError: no readable checkpoint, a
    # non-finite streak) end in one line through cli.run; anything else keeps its traceback.
    cli.no_arguments(argv)
    cli.require("config", "workdir")
    cli.output_dir(FLAGS.workdir, "--workdir")
    logging.getLogger().setLevel(logging.INFO)
    init_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id, FLAGS.cluster)
    if jax.process_index() != 0:  # one console: the others report only problems
        logging.getLogger().setLevel(logging.WARNING)
    metrics = run(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
        print(json.dumps({"final": metrics}))


if __name__ == "__main__":
    cli.run(main, _define_flags, host_heap=True)
