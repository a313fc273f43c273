"""The error convention of every command (cxr_rf.errors, cxr_rf.cli), tried as a user would:
``python -m cxr_rf.<command>`` with bad input exits 2 (1 for a run that stops for a known
reason) with exactly one ``error:`` line on stderr, no traceback and no files written, before
anything compiles or trains; a bug keeps its traceback; the CPU logs carry no libtpu notice.

The cases run once, in parallel subprocesses (a module fixture); each is then one test."""
import concurrent.futures
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboardX import SummaryWriter

import tiny
from cxr_rf import cli, errors, scaling

ROOT = Path(__file__).resolve().parents[1]
EXP = str(ROOT / "experiments" / "smoke.py")

# (id, module, arguments, exit status, text the error line contains). In the arguments
# {file} is an existing file and {empty} an empty directory in the case's own working
# directory; {run} a run directory whose only checkpoint is unreadable; {flat} four ladder
# runs whose losses do not fall with compute.
CASES = [
    # train
    ("train-no-flags", "cxr_rf.train", [], 2, "--config and --workdir are required"),
    ("train-config-missing", "cxr_rf.train", ["--config=nope.py", "--workdir=w"], 2,
     "--config nope.py does not exist"),
    ("train-config-missing-override", "cxr_rf.train",
     ["--config", "nope.py", "--workdir=w", "--config.train.steps=3"], 2, "does not exist"),
    ("train-config-dir", "cxr_rf.train", ["--config={empty}", "--workdir=w"], 2,
     "is a directory, not an experiment file"),
    ("train-workdir-file", "cxr_rf.train", [f"--config={EXP}", "--workdir={file}"], 2,
     "--workdir afile exists and is not a directory"),
    ("train-unknown-field", "cxr_rf.train",
     [f"--config={EXP}", "--workdir=w", "--config.train.stepz=3"], 2, "no config field: 'stepz'"),
    ("train-field-type", "cxr_rf.train",
     [f"--config={EXP}", "--workdir=w", "--config.train.steps=nan"], 2, "--config.train.steps"),
    ("train-num-processes-0", "cxr_rf.train",
     [f"--config={EXP}", "--workdir=w", "--coordinator=h:1", "--num_processes=0",
      "--process_id=0"], 2, "--num_processes=0: must be an integer >= 1"),
    ("train-process-id-range", "cxr_rf.train",
     [f"--config={EXP}", "--workdir=w", "--coordinator=h:1", "--num_processes=2",
      "--process_id=2"], 2, "--process_id must be < --num_processes"),
    ("train-extra-argument", "cxr_rf.train", [f"--config={EXP}", "--workdir=w", "now"], 2,
     "unexpected arguments: now"),
    # sample
    ("sample-cfg-nan", "cxr_rf.sample", ["--workdir={run}", "--out=o", "--cfg=nan"], 2,
     "--cfg=nan: must be a finite number >= 0"),
    ("sample-num-0", "cxr_rf.sample", ["--workdir={run}", "--out=o", "--num=0"], 2,
     "--num=0: must be an integer >= 1"),
    ("sample-steps-negative", "cxr_rf.sample", ["--workdir={run}", "--out=o", "--steps=-1"], 2,
     "--steps=-1: must be an integer >= 1"),
    ("sample-age-500", "cxr_rf.sample", ["--workdir={run}", "--out=o", "--age=500"], 2,
     "age must be in [0, 150) years, got 500"),
    ("sample-age-word", "cxr_rf.sample", ["--workdir={run}", "--out=o", "--age=old"], 2,
     "--age must be a number of years or 'unknown', got 'old'"),
    ("sample-guidance", "cxr_rf.sample", ["--workdir={run}", "--out=o",
                                          "--guidance=findings=lots"], 2,
     "--guidance item 'findings=lots' must be group=scale"),
    ("sample-guidance-group", "cxr_rf.sample", ["--workdir={run}", "--out=o",
                                                "--guidance=colour=2"], 2,
     "unknown condition group 'colour'"),
    ("sample-report-no-reports", "cxr_rf.sample", ["--workdir={run}", "--out=o",
                                                   "--report=Cardiomegaly."], 2,
     "--report needs a run trained with reports"),
    ("sample-seed-negative", "cxr_rf.sample", ["--workdir={run}", "--out=o", "--seed=-1"], 2,
     "--seed=-1: must be an integer in [0, 4294967296)"),
    ("sample-seed-overflow", "cxr_rf.sample",
     ["--workdir={run}", "--out=o", "--seed=4294967295", "--num=2"], 2, "--seed + --num"),
    ("sample-workdir-missing", "cxr_rf.sample", ["--workdir=nowhere", "--out=o"], 2,
     "--workdir nowhere does not exist"),
    ("sample-workdir-file", "cxr_rf.sample", ["--workdir={file}", "--out=o"], 2,
     "--workdir afile is not a directory"),
    ("sample-not-a-run", "cxr_rf.sample", ["--workdir={empty}", "--out=o"], 2,
     "no config.json"),
    ("sample-out-file", "cxr_rf.sample", ["--workdir={run}", "--out={file}"], 2,
     "--out afile exists and is not a directory"),
    ("sample-unknown-finding", "cxr_rf.sample",
     ["--workdir={run}", "--out=o", "--findings=Cardiomegally"], 2,
     "unknown finding 'Cardiomegally'"),
    ("sample-no-such-step", "cxr_rf.sample", ["--workdir={run}", "--out=o", "--step=5"], 2,
     "no checkpoint for step 5"),
    ("sample-unreadable-checkpoint", "cxr_rf.sample", ["--workdir={run}", "--out=o"], 1,
     "restoring ema_params of step 3"),
    # bench
    ("bench-no-benchmark", "cxr_rf.bench", [f"--config={EXP}"], 2, "name the benchmark"),
    ("bench-steps-0", "cxr_rf.bench", ["train", f"--config={EXP}", "--steps=0"], 2,
     "--steps=0: must be an integer >= 1"),
    ("bench-warmup-negative", "cxr_rf.bench", ["train", f"--config={EXP}", "--warmup=-1"], 2,
     "--warmup=-1: must be an integer >= 0"),
    # aot (flags are checked before libtpu is looked for: these need none)
    ("aot-mfu-2", "cxr_rf.aot", [f"--config={EXP}", "--topology=v5e:2x2", "--mfu=2"], 2,
     "--mfu=2.0: must be a finite number in (0, 1]"),
    ("aot-mfu-nan", "cxr_rf.aot", [f"--config={EXP}", "--topology=v5e:2x2", "--mfu=nan"], 2,
     "--mfu=nan"),
    ("aot-batch-0", "cxr_rf.aot",
     [f"--config={EXP}", "--topology=v5e:2x2", "--per_device_batch=0"], 2,
     "--per_device_batch=0: must be an integer >= 1"),
    ("aot-accelerator-type", "cxr_rf.aot", [f"--config={EXP}", "--topology=v5p-16"], 2,
     "is a Cloud TPU accelerator type"),
    ("aot-json-dir", "cxr_rf.aot", [f"--config={EXP}", "--topology=v5e:2x2", "--json={empty}"],
     2, "--json empty is a directory"),
    ("aot-no-topology", "cxr_rf.aot", [f"--config={EXP}"], 2, "--topology is required"),
    # convert
    ("convert-workers-0", "cxr_rf.data.convert",
     ["--source=phantom", "--output=o", "--resolution=16", "--num=4", "--workers=0"], 2,
     "workers must be a positive int; got 0"),
    ("convert-unknown-source", "cxr_rf.data.convert",
     ["--source=bogus", "--output=o", "--resolution=16"], 2, "unknown source 'bogus'"),
    ("convert-resolution-20", "cxr_rf.data.convert",
     ["--source=phantom", "--output=o", "--resolution=20", "--num=4"], 2, "multiple of 8"),
    ("convert-reject-fraction-nan", "cxr_rf.data.convert",
     ["--source=phantom", "--output=o", "--resolution=16", "--num=4",
      "--max_reject_fraction=nan"], 2, "max_reject_fraction must be in [0, 1]; got nan"),
    ("convert-output-file", "cxr_rf.data.convert",
     ["--source=phantom", "--output={file}", "--resolution=16", "--num=4"], 2,
     "exists and is not a directory"),
    ("convert-input-missing", "cxr_rf.data.convert",
     ["--source=dicom_dir", "--input=nowhere", "--output=o", "--resolution=16"], 2,
     "input directory nowhere does not exist"),
    ("convert-no-resolution", "cxr_rf.data.convert", ["--source=phantom", "--output=o"], 2,
     "--resolution is required"),
    ("convert-unknown-flag", "cxr_rf.data.convert", ["--resolutoin=16"], 2,
     "Unknown command line flag 'resolutoin'"),
    # scaling
    ("scaling-not-a-run", "cxr_rf.scaling", ["--runs={empty}"], 2, "no config.json"),
    ("scaling-no-runs", "cxr_rf.scaling", [], 2, "--runs is required"),
    ("scaling-out-parent-missing", "cxr_rf.scaling", ["--runs={flat}", "--out=no/fit.png"], 2,
     "--out no/fit.png: directory no does not exist"),
    ("scaling-point", "cxr_rf.scaling", ["--runs={flat}", "--point=median"], 2,
     "--point=median"),
    ("scaling-predict-not-a-list", "cxr_rf.scaling",
     ["--runs={flat}", "--predict", "d8", "experiments/ladder.py:d8"], 2,
     "not a run directory (--predict takes a comma-separated list"),
    ("scaling-fit-fails", "cxr_rf.scaling", ["--runs={flat}"], 1, "did not converge"),
]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _unreadable_run(d: Path) -> Path:
    """A run directory (the tiny config) whose one checkpoint, step 3, cannot be restored."""
    (d / "checkpoints" / "3" / "state").mkdir(parents=True)
    (d / "config.json").write_text(tiny.get_config().to_json_best_effort(indent=2))
    (d / "checkpoints" / "3" / "_CHECKPOINT_METADATA").write_text("{}")
    (d / "checkpoints" / "3" / "state" / "junk").write_text("not a checkpoint")
    return d


def _flat_ladder(root: Path) -> list[str]:
    """Four ladder runs whose validation loss does not fall with compute."""
    spec = importlib.util.spec_from_file_location("ladder_cli", ROOT / "experiments" / "ladder.py")
    ladder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ladder)
    runs = []
    for rung in ladder.RUNGS[:4]:
        cfg = ladder.get_config(rung)
        d = root / rung
        d.mkdir(parents=True)
        (d / "config.json").write_text(cfg.to_json_best_effort(indent=2))
        w = SummaryWriter(str(d / "tensorboard"))
        for step in (cfg.train.steps // 2, cfg.train.steps):
            w.add_scalar("val/loss", 0.1, step)
        w.close()
        runs.append(str(d))
    return runs


def _env(**extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{case id: (completed process, files before, files after, shared files before/after)}."""
    shared = tmp_path_factory.mktemp("shared")
    run = _unreadable_run(shared / "run")
    flat = ",".join(_flat_ladder(shared / "ladder"))
    shared_before = _files(shared)
    jobs = {}
    for cid, module, args, _, _ in CASES:
        cwd = tmp_path_factory.mktemp(cid)
        (cwd / "afile").write_text("x")
        (cwd / "empty").mkdir()
        argv = [a.format(file="afile", empty="empty", run=run, flat=flat) for a in args]
        jobs[cid] = (cwd, [sys.executable, "-m", module, *argv], _files(cwd))

    def one(cid):
        cwd, cmd, before = jobs[cid]
        r = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
        return cid, (r, before, _files(cwd))

    with concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
        out = dict(pool.map(one, jobs))
    out["_shared"] = (shared_before, _files(shared))
    return out


@pytest.mark.parametrize("cid, module, args, status, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(results, cid, module, args, status, needle):
    r, before, after = results[cid]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == status, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert needle in lines[0], lines[0]
    assert after == before, sorted(after - before)       # nothing written
    assert r.stdout == "", r.stdout[-1000:]


def test_cases_cover_every_command_and_write_nothing_shared(results):
    assert len(CASES) >= 22
    assert {m for _, m, *_ in CASES} == {"cxr_rf.train", "cxr_rf.sample", "cxr_rf.bench",
                                         "cxr_rf.aot", "cxr_rf.data.convert", "cxr_rf.scaling"}
    before, after = results["_shared"]
    assert after == before, sorted(after ^ before)


# ----------------------------------------------------------------------------- not user errors

def test_a_bug_inside_main_keeps_its_traceback(monkeypatch, capsys, tmp_path):
    """In process: a ValueError that is not a UserError propagates out of the command, where
    a UserError raised at the same place is the one line."""
    raised = []

    def load_run(*a, **k):
        raise raised[-1]
    monkeypatch.setattr(scaling, "load_run", load_run)
    raised.append(ValueError("internal: a bug, not bad input"))
    with pytest.raises(ValueError, match="internal") as e:
        cli.call(scaling, ["--runs", str(tmp_path)])
    assert not isinstance(e.value, errors.UserError)
    assert "error:" not in capsys.readouterr().err
    raised.append(scaling.ScalingError("bad run"))
    assert cli.call(scaling, ["--runs", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: bad run\n"


# A command run by cli.run exactly as its __main__ does, with one function replaced by a bug.
_BUG = """
import sys
from cxr_rf import cli
import {module} as m
def bug(*a, **k):
    raise {exc}("internal: a bug, not bad input")
setattr(m, {name!r}, bug)
sys.argv = [m.__file__, *{argv!r}]
cli.run(m.main, m._define_flags{extra})
"""


@pytest.mark.parametrize("module, name, exc, argv, extra, status", [
    # train.main used to print every ValueError as one line, hiding where it happened
    ("cxr_rf.train", "run", "ValueError", ["--config=" + EXP, "--workdir=w"], "", 1),
    # aot keeps exit 3 for a crash: its exit 1 means "does not fit", as an uncaught one would
    ("cxr_rf.aot", "plan", "RuntimeError", ["--config=" + EXP, "--topology=v5e:2x2"],
     ", crash_status=3", 3),
])
def test_a_bug_in_a_command_keeps_its_traceback(tmp_path, module, name, exc, argv, extra,
                                                status):
    code = _BUG.format(module=module, name=name, exc=exc, argv=argv, extra=extra)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == status, r.stderr[-3000:]
    assert "Traceback (most recent call last)" in r.stderr
    assert f"{exc}: internal: a bug, not bad input" in r.stderr


def test_cpu_logs_have_no_libtpu_notice(tmp_path):
    """A train run on the CPU (JAX picks the backend: JAX_PLATFORMS unset) logs at INFO, where
    JAX reports that libtpu is missing; the command's stderr is its one line only."""
    env = _env()
    env.pop("JAX_PLATFORMS")
    if importlib.util.find_spec("libtpu") is not None:
        # A host without libtpu is the case under test; where the tpu extra is installed (CI),
        # a package that fails to import shadows it, and JAX fails to open libtpu.so as there.
        # (Importing jax imports libtpu, which sets TPU_LIBRARY_PATH for every child process.)
        env.pop("TPU_LIBRARY_PATH", None)
        hidden = tmp_path / "no_libtpu" / "libtpu"
        hidden.mkdir(parents=True)
        (hidden / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(hidden.parent), env["PYTHONPATH"]])
    probe = subprocess.run(
        [sys.executable, "-c", "import logging; logging.basicConfig(level=logging.INFO); "
                               "import jax; jax.devices()"],
        env=env, capture_output=True, text=True, timeout=120)
    if "Unable to initialize backend 'tpu'" not in probe.stderr:
        pytest.skip("JAX does not report a missing libtpu here (a TPU host, or libtpu installed)")
    (tmp_path / "nodata").mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "cxr_rf.train", f"--config={EXP}", f"--workdir={tmp_path / 'w'}",
         f"--config.data.dir={tmp_path / 'nodata'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Unable to initialize backend" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "holds no converted dataset" in lines[0], r.stderr


def test_orbax_leftover_task_errors_are_dropped_and_others_kept():
    """After a failed restore, asyncio logs Orbax's other unretrieved task exceptions (with
    tracebacks) when they are collected; the command already said what failed in one line.
    Only those are dropped: any other asyncio error still reaches stderr."""
    import asyncio
    import logging
    cli.quiet_logs()
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    log = logging.getLogger("asyncio")
    log.addHandler(handler)
    try:
        loop = asyncio.new_event_loop()
        for where in ("/site-packages/orbax/checkpoint/_src/serialization/tensorstore_utils.py",
                      "/home/me/mycode.py"):
            loop.default_exception_handler({
                "message": "Task exception was never retrieved",
                "exception": FileNotFoundError("Individual parameter subdirectory not found"),
                "future": f"<Task finished coro=<check() defined at {where}:967>>"})
        loop.close()
    finally:
        log.removeHandler(handler)
    assert len(seen) == 1 and "mycode.py" in seen[0].getMessage()
