"""Scaling-law fits over finished runs: L(C) = a·C^(−b) + c, with the loss predicted for a
config that has not been run.

    python -m cxr_rf.scaling --runs runs/ladder/d2,runs/ladder/d3,... \
        [--predict d8,experiments/ladder.py:d8,RUN_DIR,RUN_DIR/config.json] \
        [--out scaling.png] [--json scaling.json] [--point final|min] [--tag val/loss]
    python -m cxr_rf.scaling --predict d8 --out scaling.png runs/ladder/d?   # the same, a glob

Each run directory holds ``config.json`` and TensorBoard event files in ``tensorboard/`` (as
written by ``cxr_rf.train``); any directory may be a ``gs://`` path (read through etils.epath).
The event files are read here without TensorFlow: TFRecord framing (uint64 length, masked
CRC-32C of the length, payload, masked CRC-32C of the payload) around ``Event`` protos, parsed
with tensorboardX's bundled protobuf classes. When several event files hold the same step (a
resumed run), the value written last (by wall time) wins.

Compute C is training FLOPs: 3 × forward FLOPs per image (``mmdit.flops_per_image``) × images
seen, summed over the resolution stages (``config.stages``). The fit runs in the parametrisation
L = exp(u − b·ln(C/C₀)) + c with C₀ the geometric mean of the runs' compute (centring ln C
decorrelates u from b); a = exp(u)·C₀^b. One-σ uncertainties come from the least-squares
covariance scaled by the residual variance (``absolute_sigma=False``), propagated to predictions
by the delta method; the 95% band uses Student's t with n − 3 degrees of freedom.

Exit codes: 0 ok, 2 bad input (run without config.json or scalars, fewer than 4 runs, unknown
config), 1 the fit did not converge.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import math
import re
import struct
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import ml_collections
import numpy as np
from absl import flags
from etils import epath
from tensorboardX.crc32c import crc32c
from tensorboardX.proto import event_pb2

from cxr_rf import cli, errors
from cxr_rf import config as config_lib

LADDER = Path(__file__).resolve().parents[1] / "experiments" / "ladder.py"
MIN_RUNS = 4   # three parameters need at least four points (one degree of freedom)


class ScalingError(errors.UserError):
    """Bad input: a run, event file or config that cannot be used (exit code 2)."""


class FitError(errors.RunError):
    """The least-squares fit did not converge to an identifiable optimum (exit code 1)."""


# --------------------------------------------------------------------------- event files

def _masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C."""
    x = crc32c(data) & 0xFFFFFFFF
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(data: bytes, name: str = "<bytes>") -> Iterator[bytes]:
    """The payloads of a TFRecord byte string, CRC-checked.

    A truncated last record (a writer still running, or killed mid-write) ends the stream
    quietly; a checksum mismatch anywhere else is a ScalingError naming the byte offset.
    """
    pos, n = 0, len(data)
    while pos < n:
        if n - pos < 12:
            return
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        if _masked_crc(header) != header_crc:
            raise ScalingError(f"{name}: corrupt TFRecord length at byte {pos} (CRC mismatch)")
        end = pos + 12 + length + 4
        if end > n:
            return
        payload = data[pos + 12:pos + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[end - 4:end])
        if _masked_crc(payload) != payload_crc:
            raise ScalingError(f"{name}: corrupt TFRecord payload at byte {pos} (CRC mismatch)")
        yield payload
        pos = end


def read_events(path: str | epath.Path) -> Iterator[Any]:
    """The ``Event`` protos of one event file."""
    path = epath.Path(path)
    for payload in read_records(path.read_bytes(), str(path)):
        event = event_pb2.Event()
        event.ParseFromString(payload)
        yield event


def _scalar_value(value: Any) -> float | None:
    """A Summary.Value's scalar: ``simple_value`` or a one-element float/double tensor."""
    if value.HasField("simple_value"):
        return float(value.simple_value)
    if value.HasField("tensor"):
        t = value.tensor
        if t.float_val:
            return float(t.float_val[0])
        if t.double_val:
            return float(t.double_val[0])
        if t.tensor_content and t.dtype in (1, 2):       # DT_FLOAT, DT_DOUBLE
            return float(np.frombuffer(t.tensor_content, "<f4" if t.dtype == 1 else "<f8")[0])
    return None


def event_files(run: str | epath.Path) -> list[epath.Path]:
    """A run's event files: ``RUN/tensorboard/events.out.tfevents.*`` (else directly in RUN)."""
    run = epath.Path(run)
    for d in (run / "tensorboard", run):
        if d.is_dir():
            files = sorted(d.glob("events.out.tfevents.*"), key=lambda p: p.name)
            if files:
                return files
    return []


def read_scalars(run: str | epath.Path, tag: str) -> dict[int, float]:
    """{step: value} of one scalar tag over all of a run's event files, in step order.

    Where a step occurs more than once (a resumed run logs it again), the latest record by
    wall time wins (ties: later file name, then later record).
    """
    entries = []
    for fi, path in enumerate(event_files(run)):
        for ri, event in enumerate(read_events(path)):
            if not event.HasField("summary"):
                continue
            for v in event.summary.value:
                if v.tag == tag and (x := _scalar_value(v)) is not None:
                    entries.append((event.wall_time, fi, ri, int(event.step), x))
    latest: dict[int, float] = {}
    for *_, step, x in sorted(entries):
        latest[step] = x
    return dict(sorted(latest.items()))


# --------------------------------------------------------------------------- configs and compute

def _with_defaults(values: dict, defaults: dict) -> dict:
    """``values`` with the keys it lacks taken from ``defaults`` (recursively)."""
    out = dict(defaults)
    for k, v in values.items():
        d = defaults.get(k)
        out[k] = _with_defaults(v, d) if isinstance(v, dict) and isinstance(d, dict) else v
    return out


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """A run's config.json as a ConfigDict; fields added since the run was written (e.g.
    ``train.stages``) take their ``config.base()`` defaults."""
    return ml_collections.ConfigDict(_with_defaults(json.loads(text), config_lib.base().to_dict()))


def params_of(cfg: ml_collections.ConfigDict) -> int:
    """Exact parameter count of a config's model."""
    from cxr_rf.model import mmdit
    return mmdit.param_count(mmdit.ModelConfig.from_config(cfg))


def train_flops(cfg: ml_collections.ConfigDict, steps: Sequence[int] | np.ndarray) -> np.ndarray:
    """Training FLOPs after each of ``steps``: Σ over stages of 3·fwd FLOPs/image·batch·steps."""
    from cxr_rf.model import mmdit
    mcfg = mmdit.ModelConfig.from_config(cfg)
    steps = np.asarray(steps, np.float64)
    total = np.zeros_like(steps)
    for s in config_lib.stages(cfg):
        per_step = 3.0 * mmdit.flops_per_image(mcfg, s.resolution) * s.batch_size
        total += per_step * np.clip(np.minimum(steps, s.end) - s.start, 0, None)
    return total


def load_experiment(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of an experiment file (``get_config()`` when arg is None)."""
    p = Path(path)
    if not p.is_file():
        raise ScalingError(f"experiment file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_experiment_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.get_config() if arg is None else module.get_config(arg)
    except ValueError as e:
        raise ScalingError(f"{path}:{arg}: {e}") from None


def resolve_config(spec: str) -> ml_collections.ConfigDict:
    """The config named by ``--predict``: a ladder rung (d8), ``experiments/X.py[:arg]``, a run
    directory, or a config.json."""
    if re.fullmatch(r"d\d+", spec) and not epath.Path(spec).exists():
        if not LADDER.is_file():
            raise ScalingError(f"rung {spec!r} needs {LADDER}; pass experiments/ladder.py:{spec}")
        return load_experiment(str(LADDER), spec)
    head, sep, arg = spec.rpartition(":")
    if sep and head.endswith(".py"):
        return load_experiment(head, arg)
    if spec.endswith(".py"):
        return load_experiment(spec)
    path = epath.Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ScalingError(f"--predict {spec}: not a ladder rung (d<depth>), experiment file "
                           f"(X.py[:arg]), run directory or config.json")
    return config_from_json(path.read_text())


@dataclasses.dataclass(frozen=True)
class Run:
    """One finished (or stopped) run: its config and scalar curve."""
    name: str
    path: str
    cfg: ml_collections.ConfigDict
    params: int
    steps: np.ndarray       # logged steps
    compute: np.ndarray     # training FLOPs at those steps
    loss: np.ndarray        # the scalar at those steps

    def point(self, which: str = "final") -> int:
        """Index of the point the fit uses: the last logged one or the minimum."""
        if which == "final":
            return len(self.loss) - 1
        if which == "min":
            return int(np.argmin(self.loss))
        raise ScalingError(f"point must be 'final' or 'min', got {which!r}")


def load_run(path: str | epath.Path, tag: str = "val/loss") -> Run:
    """Read a run directory (config.json + event files)."""
    run = epath.Path(path)
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise ScalingError(f"run {path} has no config.json (is it a cxr_rf.train workdir?)")
    try:
        cfg = config_from_json(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ScalingError(f"run {path}: config.json is not valid JSON ({e})") from None
    files = event_files(run)
    if not files:
        raise ScalingError(f"run {path} has no TensorBoard event files (looked in "
                           f"{run / 'tensorboard'} and {run})")
    scalars = read_scalars(run, tag)
    if not scalars:
        raise ScalingError(f"run {path} has no {tag!r} scalars in its {len(files)} event "
                           f"file(s) (set train.eval_every > 0)")
    steps = np.array(list(scalars), np.int64)
    try:
        compute = train_flops(cfg, steps)
        params = params_of(cfg)
    except (ValueError, KeyError, AttributeError) as e:
        raise ScalingError(f"run {path}: config.json does not describe a cxr_rf model and "
                           f"schedule ({' '.join(str(e).split())})") from None
    return Run(name=run.name, path=str(path), cfg=cfg, params=params, steps=steps,
               compute=compute, loss=np.array(list(scalars.values()), np.float64))


# --------------------------------------------------------------------------- the fit

def _law(x, u, b, c):
    return np.exp(u - b * x) + c


def _law_jac(x, u, b, c):
    e = np.exp(u - b * x)
    return np.stack([e, -x * e, np.ones_like(x)], axis=-1)


@dataclasses.dataclass(frozen=True)
class Fit:
    """L(C) = a·C^(−b) + c, stored as (u, b, c) with L = exp(u − b·ln(C/C₀)) + c."""
    log_c0: float
    params: np.ndarray      # (u, b, c)
    cov: np.ndarray         # 3×3 covariance of (u, b, c)
    n: int
    rss: float
    notes: tuple[str, ...] = ()

    @property
    def dof(self) -> int:
        return self.n - 3

    @property
    def b(self) -> float:
        return float(self.params[1])

    @property
    def c(self) -> float:
        return float(self.params[2])

    @property
    def log_a(self) -> float:
        return float(self.params[0] + self.params[1] * self.log_c0)

    @property
    def a(self) -> float:
        return math.exp(self.log_a)

    @property
    def sigma(self) -> np.ndarray:
        """One-σ of (u, b, c)."""
        return np.sqrt(np.diag(self.cov))

    @property
    def sigma_log_a(self) -> float:
        g = np.array([1.0, self.log_c0, 0.0])
        return float(math.sqrt(max(g @ self.cov @ g, 0.0)))

    def predict(self, compute) -> tuple[np.ndarray, np.ndarray]:
        """(loss, 1-σ) at ``compute`` FLOPs (delta method on the parameter covariance)."""
        x = np.log(np.asarray(compute, np.float64)) - self.log_c0
        mean = _law(x, *self.params)
        g = _law_jac(x, *self.params)
        var = np.einsum("...i,ij,...j->...", g, self.cov, g)
        return mean, np.sqrt(np.maximum(var, 0.0))

    def t95(self) -> float:
        """Student-t factor of a two-sided 95% interval with this fit's degrees of freedom."""
        from scipy import stats
        return float(stats.t.ppf(0.975, self.dof))

    def to_dict(self) -> dict:
        s = self.sigma
        return dict(a=self.a, log_a=self.log_a, sigma_log_a=self.sigma_log_a, b=self.b,
                    sigma_b=float(s[1]), c=self.c, sigma_c=float(s[2]), log_c0=self.log_c0,
                    u=float(self.params[0]), cov_u_b_c=self.cov.tolist(), n=self.n,
                    dof=self.dof, rss=self.rss, notes=list(self.notes))


def fit_power_law(compute: Sequence[float], loss: Sequence[float]) -> Fit:
    """Least-squares fit of L = a·C^(−b) + c (0 < b ≤ 10, 0 ≤ c ≤ max L) from three starts.

    FitError when no start converges or the optimum is not identifiable (covariance not
    finite, b at 0, or b's 1-σ at least b itself)."""
    from scipy import optimize
    C, L = np.asarray(compute, np.float64), np.asarray(loss, np.float64)
    if len(C) < MIN_RUNS:
        raise ScalingError(f"need at least {MIN_RUNS} runs to fit L = a·C^-b + c "
                           f"(3 parameters); got {len(C)}")
    if not (np.all(np.isfinite(C)) and np.all(C > 0) and np.all(np.isfinite(L))):
        raise ScalingError("compute must be positive and losses finite for every run")
    if np.all(L <= 0):
        raise ScalingError("losses must be positive")
    log_c0 = float(np.mean(np.log(C)))
    x = np.log(C) - log_c0
    hi = float(np.max(L))
    lower, upper = [-50.0, 0.0, 0.0], [50.0, 10.0, hi]
    best, errors = None, []
    for frac in (0.0, 0.5, 0.9):
        c0 = frac * float(np.min(L))
        slope, intercept = np.polyfit(x, np.log(np.maximum(L - c0, 1e-12)), 1)
        p0 = [float(np.clip(intercept, -49, 49)), float(np.clip(-slope, 1e-3, 9.0)), c0]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p, cov = optimize.curve_fit(_law, x, L, p0=p0, jac=_law_jac,
                                            bounds=(lower, upper), max_nfev=20_000)
        except (RuntimeError, ValueError, optimize.OptimizeWarning) as e:
            errors.append(" ".join(str(e).split()))
            continue
        rss = float(np.sum((_law(x, *p) - L) ** 2))
        if best is None or rss < best[2]:
            best = (p, cov, rss)
    if best is None:
        raise FitError(f"the fit of L = a·C^-b + c did not converge ({errors[-1]})")
    p, cov, rss = best
    if not np.all(np.isfinite(cov)):
        raise FitError("the fit of L = a·C^-b + c did not converge to an identifiable optimum "
                       "(parameter covariance is not finite: do the losses fall with compute?)")
    sigma_b = math.sqrt(cov[1, 1])
    if p[1] <= 1e-6 or sigma_b >= p[1]:
        raise FitError(f"the fit of L = a·C^-b + c did not converge to an identifiable optimum "
                       f"(b = {p[1]:.3g} ± {sigma_b:.3g}: the losses do not fall with compute "
                       f"as a power law)")
    notes = tuple(f"{name} is at its bound {bound:g}" for name, v, bound in
                  (("b", p[1], 10.0), ("c", p[2], 0.0), ("c", p[2], hi))
                  if abs(v - bound) <= 1e-6 * max(1.0, abs(bound)))
    return Fit(log_c0=log_c0, params=np.asarray(p, np.float64), cov=np.asarray(cov, np.float64),
               n=len(C), rss=rss, notes=notes)


# --------------------------------------------------------------------------- report

@dataclasses.dataclass(frozen=True)
class Prediction:
    name: str
    params: int
    compute: float
    loss: float
    sigma: float
    lo95: float
    hi95: float


def predict(fit: Fit, name: str, cfg: ml_collections.ConfigDict) -> Prediction:
    """The fitted loss of a config's full run (compute of all ``train.steps``)."""
    try:
        compute = float(train_flops(cfg, [int(cfg.train.steps)])[0])
        params = params_of(cfg)
    except (ValueError, KeyError, AttributeError) as e:
        raise ScalingError(f"--predict {name}: not a cxr_rf model and schedule "
                           f"({' '.join(str(e).split())})") from None
    mean, sigma = fit.predict(compute)
    t = fit.t95()
    return Prediction(name=name, params=params, compute=compute, loss=float(mean),
                      sigma=float(sigma), lo95=float(mean - t * sigma),
                      hi95=float(mean + t * sigma))


def _si(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def report(runs: Sequence[Run], fit: Fit, preds: Sequence[Prediction], point: str,
           tag: str) -> str:
    """The readable table of runs, the fit and the predictions."""
    C = np.array([r.compute[r.point(point)] for r in runs])
    L = np.array([r.loss[r.point(point)] for r in runs])
    fitted, _ = fit.predict(C)
    width = max(4, *(len(r.name) for r in runs), *(len(p.name) for p in preds))
    lines = [f"{'run':<{width}}  {'params':>8}  {'step':>11}  {'compute':>9}  "
             f"{tag:>9}  {'fitted':>9}  {'residual':>19}"]
    for r, c, l, f in zip(runs, C, L, fitted):
        i = r.point(point)
        step = f"{r.steps[i]}/{int(r.cfg.train.steps)}"
        lines.append(f"{r.name:<{width}}  {_si(r.params):>8}  {step:>11}  {c:9.3e}  {l:9.5f}  "
                     f"{f:9.5f}  {l - f:+9.5f} ({(l - f) / f:+.2%})")
    s = fit.sigma
    rms = math.sqrt(fit.rss / fit.n)
    lines += [
        f"fit: L(C) = a·C^(-b) + c over {fit.n} runs ({point} {tag}, C = training FLOPs), "
        f"{fit.dof} dof, rms residual {rms:.2g}",
        f"  a = {fit.a:.4g}  (×/÷ {math.exp(fit.sigma_log_a):.3g}, 1σ; ln a = "
        f"{fit.log_a:.3f} ± {fit.sigma_log_a:.3f})",
        f"  b = {fit.b:.4f} ± {s[1]:.4f}",
        f"  c = {fit.c:.5f} ± {s[2]:.5f}",
    ]
    lines += [f"  note: {n}" for n in fit.notes]
    for r in runs:
        if r.steps[-1] < int(r.cfg.train.steps):
            lines.append(f"  note: {r.name} stopped at step {r.steps[-1]} of {r.cfg.train.steps}")
    if preds:
        lines.append(f"prediction ({tag} after the config's train.steps; ±1σ, 95% with "
                     f"Student t, {fit.dof} dof):")
        for p in preds:
            lines.append(f"  {p.name:<{width}}  params {_si(p.params):>8}  compute "
                         f"{p.compute:9.3e}  {tag} {p.loss:.5f} ± {p.sigma:.5f}  "
                         f"95%: [{p.lo95:.5f}, {p.hi95:.5f}]")
    return "\n".join(lines)


def plot(runs: Sequence[Run], fit: Fit, preds: Sequence[Prediction], point: str, tag: str,
         out: str | epath.Path) -> None:
    """Log-log PNG: each run's curve (faint), its fitted point, the law with its 1-σ band, c,
    and the predictions with error bars."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, len(runs)))
    for r, color in zip(runs, colors):
        ok = r.compute > 0
        ax.plot(r.compute[ok], r.loss[ok], color=color, alpha=0.35, lw=1.2)
        i = r.point(point)
        ax.scatter([r.compute[i]], [r.loss[i]], color=color, s=40, zorder=3,
                   label=f"{r.name} ({_si(r.params)})")
    xs = [r.compute[r.point(point)] for r in runs] + [p.compute for p in preds]
    grid = np.logspace(np.log10(min(xs)) - 0.3, np.log10(max(xs)) + 0.3, 200)
    mean, sigma = fit.predict(grid)
    ax.plot(grid, mean, "k-", lw=1.5, label=f"fit: {fit.a:.3g}·C^(−{fit.b:.3f}) + {fit.c:.4f}")
    ax.fill_between(grid, np.maximum(mean - sigma, 1e-12), mean + sigma, color="k", alpha=0.12,
                    lw=0, label="fit ±1σ")
    if fit.c > 0:
        ax.axhline(fit.c, color="gray", ls=":", lw=1, label=f"c = {fit.c:.4f}")
    for p in preds:
        ax.errorbar([p.compute], [p.loss], yerr=[[p.loss - p.lo95], [p.hi95 - p.loss]],
                    fmt="none", ecolor="tab:red", elinewidth=1, capsize=3, alpha=0.6)
        ax.errorbar([p.compute], [p.loss], yerr=[p.sigma], fmt="D", color="tab:red",
                    capsize=4, label=f"{p.name} predicted: {p.loss:.4f} ± {p.sigma:.4f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel(tag)
    ax.set_title(f"{tag} vs compute ({point} point per run); error bars: 1σ and 95%")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    epath.Path(out).write_bytes(buf.getvalue())


def to_json(runs: Sequence[Run], fit: Fit, preds: Sequence[Prediction], point: str,
            tag: str) -> dict:
    """Everything of the report as JSON-ready values."""
    C = np.array([r.compute[r.point(point)] for r in runs])
    fitted, _ = fit.predict(C)
    return dict(
        tag=tag, point=point, fit=fit.to_dict(),
        runs=[dict(name=r.name, path=r.path, params=r.params, steps=int(r.cfg.train.steps),
                   step=int(r.steps[r.point(point)]), compute=float(r.compute[r.point(point)]),
                   loss=float(r.loss[r.point(point)]), fitted=float(f),
                   residual=float(r.loss[r.point(point)] - f),
                   curve=dict(steps=r.steps.tolist(), compute=r.compute.tolist(),
                              loss=r.loss.tolist()))
              for r, f in zip(runs, fitted)],
        predictions=[dataclasses.asdict(p) for p in preds])


# --------------------------------------------------------------------------- CLI

def _define_flags() -> None:
    """Command-line flags (defined only when run as a program, so importing stays side-effect
    free)."""
    flags.DEFINE_list("runs", [], "Run directories (config.json + tensorboard/), comma-separated; "
                      "gs:// allowed. More may follow the flags as arguments, so a shell glob "
                      "works: --runs runs/ladder/d?")
    flags.DEFINE_list("predict", [], "Configs whose loss to predict, comma-separated: a ladder "
                      "rung (d8), experiments/X.py[:arg], a run directory or a config.json.")
    flags.DEFINE_string("out", None, "Log-log plot to write (PLOT.png).")
    flags.DEFINE_string("json", None, "Fit and table as JSON (OUT.json).")
    flags.DEFINE_enum("point", "final", ["final", "min"],
                      "Each run's point: its last logged value (default) or its minimum.")
    flags.DEFINE_string("tag", "val/loss", "Scalar to fit.")


def main(argv: list[str]) -> int:
    """Fit and report; bad input (ScalingError) exits 2 and a fit that does not converge
    (FitError) 1, through ``cli.run``."""
    f = flags.FLAGS
    for extra in argv[1:]:
        # Words after the flags are run directories (a glob); a config to predict is not one.
        if not epath.Path(extra).is_dir():
            raise ScalingError(f"unexpected argument {extra!r}: not a run directory (--predict "
                               "takes a comma-separated list: --predict d8,experiments/X.py:d8)")
    run_dirs = [*f.runs, *argv[1:]]
    if not run_dirs:
        raise ScalingError("--runs is required (see --help)")
    for flag, path in (("--out", f.out), ("--json", f.json)):
        if path:
            cli.output_file(path, flag)
    runs = [load_run(d, f.tag) for d in run_dirs]
    if len(runs) < MIN_RUNS:
        raise ScalingError(f"need at least {MIN_RUNS} runs to fit L = a·C^-b + c "
                           f"(3 parameters); got {len(runs)}")
    configs = [(spec, resolve_config(spec)) for spec in f.predict]
    C = [r.compute[r.point(f.point)] for r in runs]
    L = [r.loss[r.point(f.point)] for r in runs]
    fit = fit_power_law(C, L)
    preds = [predict(fit, spec, cfg) for spec, cfg in configs]
    print(report(runs, fit, preds, f.point, f.tag))
    if f.out:
        plot(runs, fit, preds, f.point, f.tag, f.out)
        print(f"wrote {f.out}")
    if f.json:
        epath.Path(f.json).write_text(json.dumps(to_json(runs, fit, preds, f.point, f.tag),
                                                 indent=2))
        print(f"wrote {f.json}")
    return 0


if __name__ == "__main__":
    cli.run(main, _define_flags)
