"""Evaluations of a trained run, or of a folder of generated images, against real data.

    python -m cxr_rf.evaluate all --workdir RUN [--reference DATA] [--classifier DIR] \
        [--raddino DIR] [--protocol default|chexgenbench] [--out DIR]
    python -m cxr_rf.evaluate SECTION ...      one section on its own (below)
    python -m cxr_rf.evaluate train-classifier --data DATA --out DIR [--classifier_steps N]

Sections (``cxr_rf.evaluation``), each a folder of results under ``--out``:

    control       phantom runs: the analytic measurement (CTR, blunting...) of samples asked
                  for a finding vs its absence; AUROC vs real phantoms (``control.py``)
    edits         phantom runs: counterfactual edits (``cxr_rf.edit``) against the true
                  counterfactual phantom: effectiveness, identity, reversibility, composition
    conditional   the same matched pairs read by the classifier, every finding (``conditional.py``)
    fidelity      FD / KD / PRDC of samples generated for the reference split's metadata (or
                  ``--samples DIR``) per feature space, overall, per finding and per subgroup
    privacy       samples for training records' metadata × seeds: nearest training image in
                  pixel and feature space vs the held-out baseline, copy rate, closest pairs,
                  and the memorisation controls (perturbed training copies; held-out reals)
    utility       classifiers trained on real, on synthetic (same metadata) and on both, tested
                  on held-out real: AUROC per finding and subgroup gaps

``all`` runs every section that applies and writes ``metrics.json``, ``report.md``, the plots
and a self-contained ``report.html`` (``cxr_rf.evaluation.report``) into ``--out`` (default
``RUN/eval/all``). The reference is a converted dataset (default: the run's own data); its
``test`` split is the real set of fidelity and the held-out set of privacy and utility, its
``train`` split the training set. Features: ``cxr_classifier`` (trained here when
``--classifier`` is not given, on the reference's train split, into ``OUT/classifier``) and
``raddino`` when ``--raddino`` points at a local Hugging Face folder. Generated images,
features and classifiers are kept under ``--out`` and reused by a rerun with the same settings.
"""
from __future__ import annotations

import json
import time

from absl import flags
from etils import epath

from cxr_rf import cli, errors, outputs

COMMANDS = ("all", "control", "conditional", "fidelity", "privacy", "utility", "edits",
            "train-classifier", "reconstruction")
RUN_COMMANDS = ("control", "conditional", "privacy", "utility", "edits")   # need --workdir

FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------- context

class Context:
    """What the sections share, each piece loaded once and only when a section needs it."""

    def __init__(self, out: epath.Path, single: bool = False):
        self.out, self.single = out, single
        self.workdir = FLAGS.workdir
        self._run = None
        self._classifier = None
        self._extractors: dict[str, object] = {}
        self._sets: dict[tuple, object] = {}

    def dir(self, section: str) -> epath.Path:
        """Where a section writes: --out itself when it runs alone, else its own subfolder."""
        return self.out if self.single else self.out / section

    # -- the run
    @property
    def run(self):
        """(cfg, sampler, params, step, guidance, unlisted) of --workdir."""
        if self._run is None:
            if not self.workdir:
                raise errors.UserError("this evaluation samples from a run: pass --workdir RUN")
            from cxr_rf import sample
            cfg = sample.read_config(self.workdir)
            guidance = sample.Guidance.for_run(cfg.sample, FLAGS.cfg, FLAGS.guidance)
            _, unlisted = sample.training_defaults(cfg, self.workdir)
            sampler = sample.Sampler(cfg, batch_size=FLAGS.sample_batch_size)
            params, step = sampler.restore(self.workdir, FLAGS.step)
            self._run = (cfg, sampler, params, int(step), guidance, unlisted)
        return self._run

    def sampling(self) -> dict:
        """Keyword arguments of Sampler.generate for this evaluation's settings."""
        cfg, _, _, _, guidance, _ = self.run
        return {"steps": int(FLAGS.steps or cfg.sample.steps), "guidance": guidance,
                "method": FLAGS.method or cfg.sample.method}

    # -- data
    @property
    def reference(self) -> str:
        if FLAGS.reference:
            return FLAGS.reference
        if not self.workdir:
            raise errors.UserError("pass --reference DATA (a converted dataset) to compare against")
        from cxr_rf import sample, trainer
        cfg = sample.read_config(self.workdir)
        return str(trainer.data_sources(cfg, epath.Path(self.workdir))[0][0])

    def real(self, split: str, limit: int | None):
        from cxr_rf.evaluation import sets
        key = ("real", split, limit)
        if key not in self._sets:
            self._sets[key] = sets.ReferenceSet(self.reference, split, limit=limit, seed=FLAGS.seed)
        return self._sets[key]

    def generated(self, purpose: str, split: str, limit: int | None, seeds: int):
        """Samples for the metadata of ``limit`` rows of the reference ``split`` (× seeds), in
        OUT/samples/PURPOSE; the --samples folder stands in for fidelity's."""
        from cxr_rf.evaluation import sets
        if FLAGS.samples and purpose == "fidelity":
            return sets.FolderSet(FLAGS.samples)
        key = ("generated", purpose, split, limit, seeds)
        if key not in self._sets:
            cfg, sampler, params, step, guidance, _ = self.run
            kw = self.sampling()
            settings = {"workdir": str(self.workdir), "checkpoint_step": step, "steps": kw["steps"],
                        "method": kw["method"], **guidance.describe()}
            self._sets[key] = sets.generate(
                sampler, params, self.real(split, limit), self.out / "samples" / purpose,
                seeds=seeds, seed=FLAGS.seed, settings=settings, progress=True, **kw)
        return self._sets[key]

    # -- feature spaces
    @property
    def classifier(self):
        if self._classifier is None:
            from cxr_rf import features
            path = FLAGS.classifier
            if not path:
                path = str(self.out / "classifier")
                if not (epath.Path(path) / "config.json").exists():
                    print(f"no --classifier given: training one on {self.reference} (train split) "
                          f"into {path}")
                    from cxr_rf.features import classifier
                    classifier.train_cli(self.reference, path, steps=FLAGS.classifier_steps,
                                         seed=FLAGS.seed)
            self._classifier = features.get("cxr_classifier", path, protocol=FLAGS.protocol)
        return self._classifier

    def check_spaces(self) -> None:
        """The --features names and the folders they need, without training anything."""
        from cxr_rf import features
        for name in self._space_names():
            if name == "raddino":
                self._extractors[name] = features.get(name, FLAGS.raddino, protocol=FLAGS.protocol)
            elif name == "cxr_classifier" and FLAGS.classifier:
                self._classifier = features.get(name, FLAGS.classifier, protocol=FLAGS.protocol)

    def _space_names(self) -> list[str]:
        from cxr_rf import features
        names = [n.strip() for n in FLAGS.features.split(",") if n.strip()]
        if FLAGS.raddino and "raddino" not in names:
            names.append("raddino")
        bad = [n for n in names if n not in features.NAMES]
        if bad or not names:
            raise errors.UserError(f"--features: unknown {bad or 'nothing'}; choose from "
                                   f"{', '.join(features.NAMES)}")
        return names

    def spaces(self) -> dict:
        """{name: extractor} of --features (raddino added when --raddino is given)."""
        from cxr_rf import features
        names = self._space_names()
        for n in names:
            if n not in self._extractors:
                self._extractors[n] = (self.classifier if n == "cxr_classifier"
                                       else features.get(n, FLAGS.raddino, protocol=FLAGS.protocol))
        return {n: self._extractors[n] for n in names}


# ----------------------------------------------------------------------------- sections

def _write(out: epath.Path, name: str, result: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(outputs.to_json(result), indent=1, allow_nan=False))
    return result


def _write_section(ctx: Context, name: str, result: dict, md: str, sheet) -> dict:
    """A measured section's files in ``<out>/<name>/``: ``<name>.json`` (the result),
    ``<name>.md`` (its table, also printed) and ``<name>.png`` (its contact sheet, a PIL
    image)."""
    out = ctx.dir(name)
    _write(out, f"{name}.json", result)
    (out / f"{name}.md").write_text(md)
    with (out / f"{name}.png").open("wb") as f:
        sheet.save(f, format="PNG")
    print(md)
    return result


def _is_phantom(ctx: Context) -> bool:
    cfg = ctx.run[0]
    return cfg.data.source == "phantom" and not cfg.data.get("mixture")


def section_control(ctx: Context) -> dict:
    from cxr_rf.evaluation import control
    cfg, sampler, params, step, guidance, unlisted = ctx.run
    findings = [f.strip() for f in FLAGS.findings.split(",") if f.strip()] or list(control.SCORES)
    kw = ctx.sampling()
    result, images = control.control(cfg, sampler.model, params, num=FLAGS.num, steps=kw["steps"],
                                     method=kw["method"], seed=FLAGS.seed, findings=findings,
                                     sampler=sampler, guidance=guidance, unlisted=unlisted,
                                     return_images=True)
    result = {"checkpoint_step": step, "workdir": str(ctx.workdir), **result}
    return _write_section(ctx, "control", result, control.table(result),
                          control.contact_sheet(images, result))


def section_conditional(ctx: Context) -> dict:
    from cxr_rf.evaluation import conditional
    cfg, sampler, params, step, _, unlisted = ctx.run
    findings = [f.strip() for f in FLAGS.findings.split(",") if f.strip()] or None
    result = conditional.conditional(cfg, sampler, params, ctx.classifier, num=FLAGS.num,
                                     findings=findings, seed=FLAGS.seed, unlisted=unlisted,
                                     real=ctx.real(FLAGS.split, FLAGS.reference_num),
                                     **ctx.sampling())
    result = {"checkpoint_step": step, **result}
    _write(ctx.dir("conditional"), "conditional.json", result)
    print(conditional.table(result))
    return result


def section_fidelity(ctx: Context) -> dict:
    from cxr_rf.evaluation import fidelity
    real = ctx.real(FLAGS.split, FLAGS.reference_num)
    fake = ctx.generated("fidelity", FLAGS.split, FLAGS.reference_num, 1)
    result = {}
    for name, ex in ctx.spaces().items():
        if name == "pixels":
            continue                      # a distance space for privacy, not a fidelity space
        r = fidelity.fidelity(real, fake, ex, batch_size=FLAGS.batch_size, n_boot=FLAGS.bootstrap,
                              workdir=ctx.out, seed=FLAGS.seed, backend=_distance_backend())
        o = r["overall"]
        print(f"fidelity [{name}, {ex.protocol}]: FD {o['fd']:.4g} [{o['fd_ci95'][0]:.4g}, "
              f"{o['fd_ci95'][1]:.4g}], KD {o['kd']['mean']:.4g}, precision "
              f"{o['prdc']['precision']:.3f}, recall {o['prdc']['recall']:.3f}, density "
              f"{o['prdc']['density']:.3f}, coverage {o['prdc']['coverage']:.3f} "
              f"({r['n_real']} real, {r['n_fake']} generated)")
        result[name] = r
    return _write(ctx.dir("fidelity"), "fidelity.json", result)


def _distance_backend() -> str:
    """PRDC's distance tiles: on every local device when there are several (accelerators),
    else numpy in float64 (one CPU device: exact radii, no transfer)."""
    import jax
    return "jax" if jax.local_device_count() > 1 else "numpy"


def section_privacy(ctx: Context) -> dict:
    from cxr_rf import features
    from cxr_rf.evaluation import privacy, sets
    train = ctx.real("train", FLAGS.train_num)
    heldout = ctx.real(FLAGS.split, FLAGS.reference_num)
    prompts = ctx.real("train", FLAGS.privacy_prompts)
    samples = ctx.generated("privacy", "train", FLAGS.privacy_prompts, FLAGS.privacy_seeds)
    # generated prompt rows index the prompt subset; privacy wants rows of ``train``
    samples = _reindex_prompts(samples, prompts, train)
    spaces = {"pixels": features.Pixels(), **{n: e for n, e in ctx.spaces().items()
                                              if n != "pixels"}}
    out = ctx.dir("privacy")
    result = {"samples": privacy.privacy(samples, train, heldout, spaces, workdir=ctx.out,
                                         out_dir=out, batch_size=FLAGS.batch_size)}
    # The controls: the same measurement must flag lightly perturbed training copies and must
    # not flag unseen real images (pixel space: what a copy is). The copies' shift is 1/256 of
    # the width (none below 256 px: one pixel of a 32-px image moves the anatomy by 3%, which
    # is not "lightly perturbed" any more).
    copies = privacy.perturbed_copies(train, min(len(samples), len(train)), seed=FLAGS.seed,
                                      shift=train.resolution // 256)
    px = {"pixels": spaces["pixels"]}
    result["control_copies"] = privacy.privacy(copies, train, heldout, px, workdir=ctx.out,
                                               batch_size=FLAGS.batch_size)
    half_a = sets.Subset(heldout, range(0, len(heldout), 2), f"{heldout.name}[even]")
    half_b = sets.Subset(heldout, range(1, len(heldout), 2), f"{heldout.name}[odd]")
    result["control_heldout"] = privacy.privacy(half_a, train, half_b, px, workdir=ctx.out,
                                                batch_size=FLAGS.batch_size)
    return _write(out, "privacy.json", result)


def _reindex_prompts(samples, prompts, train):
    """Point each sample's prompt_row at the row of ``train`` with the prompt's record."""
    pos = {int(r): i for i, r in enumerate(train.rows)}
    for m in samples.metas:
        if "prompt_row" in m:
            m["prompt_row"] = pos.get(int(prompts.rows[m["prompt_row"]]))
            if m["prompt_row"] is None:
                del m["prompt_row"]
    return samples


def section_utility(ctx: Context) -> dict:
    from cxr_rf.evaluation import utility
    real = ctx.real("train", FLAGS.utility_num)
    synthetic = ctx.generated("utility", "train", FLAGS.utility_num, 1)
    test = ctx.real(FLAGS.split, FLAGS.reference_num)
    result = utility.utility(real, synthetic, test, steps=FLAGS.classifier_steps, seed=FLAGS.seed,
                             out_dir=str(ctx.dir("utility") / "classifiers"))
    return _write(ctx.dir("utility"), "utility.json", result)


def section_edits(ctx: Context) -> dict:
    """Counterfactual edits of phantoms measured against the true counterfactual phantom."""
    from cxr_rf.evaluation import edits
    cfg, sampler, params, step, guidance, _ = ctx.run
    result, images = edits.edits(cfg, sampler, params, num=FLAGS.num, seed=FLAGS.seed,
                                 steps=FLAGS.steps, guidance=guidance, return_images=True)
    result = {"checkpoint_step": step, **result}
    return _write_section(ctx, "edits", result, edits.table(result),
                          edits.contact_sheet(images, result))


SECTIONS = {"control": section_control, "edits": section_edits,
            "conditional": section_conditional, "fidelity": section_fidelity,
            "privacy": section_privacy, "utility": section_utility}


def run_all(ctx: Context) -> dict:
    """Every section that applies; then metrics.json and the report."""
    from cxr_rf.evaluation import report
    metrics = {"command": "all", "workdir": str(ctx.workdir) if ctx.workdir else None,
               "samples": FLAGS.samples, "reference": ctx.reference, "split": FLAGS.split,
               "protocol": FLAGS.protocol, "seed": FLAGS.seed, "sections": {}, "timing_s": {}}
    names = list(SECTIONS) if ctx.workdir else ["fidelity"]
    if ctx.workdir:
        metrics["checkpoint_step"] = ctx.run[3]
        if not _is_phantom(ctx):            # the analytic measurements need phantoms
            names.remove("control")
            names.remove("edits")
    for name in names:
        t = time.perf_counter()
        print(f"== {name}")
        metrics["sections"][name] = SECTIONS[name](ctx)
        metrics["timing_s"][name] = time.perf_counter() - t
    if "fidelity" in names:
        metrics["samples_png"] = report.samples_png(
            str(ctx.out / "plots" / "samples.png"),
            ctx.generated("fidelity", FLAGS.split, FLAGS.reference_num, 1),
            ctx.real(FLAGS.split, FLAGS.reference_num))
    _write(ctx.out, "metrics.json", metrics)
    report.write(metrics, ctx.out)
    print(f"wrote metrics.json, report.md and report.html to {ctx.out}")
    return metrics


# ----------------------------------------------------------------------------- CLI

def _define_flags() -> None:
    """Command-line flags (defined only when run as a program)."""
    flags.DEFINE_string("workdir", None, "Run directory with checkpoints/.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.DEFINE_string("samples", None, "A folder of generated images with manifest.jsonl, "
                        "evaluated instead of sampling the run (fidelity).")
    flags.DEFINE_string("reference", None, "Converted dataset to compare against (default: the "
                        "run's data).")
    flags.DEFINE_string("split", "test", "Reference split of the real set (fidelity) and the "
                        "held-out set (privacy, utility).")
    flags.DEFINE_integer("reference_num", 1000, "Rows of --split used (a seeded random subset; "
                         "one sample each for fidelity).")
    flags.DEFINE_integer("train_num", None, "Rows of the train split searched for nearest "
                         "neighbours (default: all).")
    flags.DEFINE_integer("privacy_prompts", 200, "Training records whose metadata prompts the "
                         "privacy samples.")
    flags.DEFINE_integer("privacy_seeds", 4, "Samples per privacy prompt.")
    flags.DEFINE_integer("utility_num", 1000, "Training records (real) and their synthetic "
                         "twins for the utility classifiers.")
    flags.DEFINE_string("features", "cxr_classifier", "Comma list of feature spaces: "
                        "cxr_classifier, raddino, pixels.")
    flags.DEFINE_string("classifier", None, "Folder of a classifier from train-classifier "
                        "(default: train one into OUT/classifier).")
    flags.DEFINE_string("raddino", None, "Local Hugging Face folder of Rad-DINO "
                        "(config.json, model.safetensors, preprocessor_config.json).")
    flags.DEFINE_enum("protocol", "default", ["default", "chexgenbench"], "Preprocessing in "
                      "front of the feature networks (cxr_rf/features/__init__.py).")
    flags.DEFINE_integer("bootstrap", 50, "Bootstrap replicates of each FD interval.")
    flags.DEFINE_integer("batch_size", 64, "Images per feature-extraction batch.")
    flags.DEFINE_integer("sample_batch_size", 16, "Images per sampling batch.")
    flags.DEFINE_string("data", None, "train-classifier: converted dataset to train on.")
    flags.DEFINE_string("autoencoder", None, "reconstruction: an autoencoder run directory.")
    flags.DEFINE_integer("resolution", None, "reconstruction: phantom resolution (default: the "
                         "autoencoder run's).")
    flags.DEFINE_integer("classifier_steps", 600, "Training steps of each classifier.")
    flags.DEFINE_integer("num", 48, "control/conditional: seeds (images) per group; "
                         "reconstruction: phantoms.")
    flags.DEFINE_integer("steps", None, "ODE steps (default: the run's sample.steps).")
    flags.DEFINE_float("cfg", None, "Classifier-free guidance scale (default: the run's "
                       "sample.cfg).")
    flags.DEFINE_string("guidance", None, "Per-group guidance scales, group=scale,... (see "
                        "python -m cxr_rf.sample --help); the other groups use --cfg (default: "
                        "the run's sample.guidance).")
    flags.DEFINE_enum("method", None, ["euler", "heun"], "ODE solver (default: the run's "
                      "sample.method).")
    flags.DEFINE_integer("seed", 0, "Seeds the noise, the demographics, the subsets and the "
                         "bootstrap.")
    flags.DEFINE_string("findings", "", "control/conditional: comma list of findings.")
    flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/eval/COMMAND).")
    for name, lo in (("step", 0), ("num", 2), ("steps", 1), ("cfg", 0), ("reference_num", 2),
                     ("train_num", 2), ("privacy_prompts", 2), ("privacy_seeds", 1),
                     ("utility_num", 2), ("bootstrap", 0), ("batch_size", 1),
                     ("sample_batch_size", 1), ("classifier_steps", 1), ("resolution", 8)):
        cli.check_number(name, lo)
    cli.check_number("seed", 0, 2**32, hi_open=True)


def _reconstruction() -> None:
    """``evaluate reconstruction --autoencoder RUN``: the autoencoder on held-out phantoms."""
    cli.require("autoencoder")
    cli.input_dir(FLAGS.autoencoder, "--autoencoder")
    out = epath.Path(FLAGS.out or epath.Path(FLAGS.autoencoder) / "eval" / "reconstruction")
    cli.output_dir(str(out), "--out")
    from cxr_rf import features
    from cxr_rf.autoencoder import train as ae_train
    from cxr_rf.evaluation import reconstruction as rec
    ae_cfg, variables = ae_train.load_autoencoder(FLAGS.autoencoder, FLAGS.step)
    resolution = FLAGS.resolution or int(ae_train.read_config(FLAGS.autoencoder).data.resolution)
    extractor = None
    if FLAGS.raddino:
        extractor = features.get("raddino", FLAGS.raddino, protocol=FLAGS.protocol)
    elif FLAGS.classifier:
        extractor = features.get("cxr_classifier", FLAGS.classifier, protocol=FLAGS.protocol)
    codec = rec.Codec(ae_cfg, variables, FLAGS.batch_size, resolution)
    result, (x, r) = rec.reconstruction(codec, resolution, num=FLAGS.num, seed=FLAGS.seed + 4321,
                                        extractor=extractor, return_images=True)
    result = {"autoencoder": str(FLAGS.autoencoder), **result}
    md = rec.table(result)
    _write(out, "reconstruction.json", result)
    (out / "reconstruction.md").write_text(md)
    k = min(8, len(x))
    tiles = [t * 2 - 1 for pair in zip(x[:k], r[:k]) for t in pair]
    with (out / "reconstruction.png").open("wb") as f:
        outputs.grid(tiles, [l for i in range(k) for l in (f"original {i}", f"reconstruction {i}")],
                     cols=4).save(f, format="PNG")
    print(md)
    print(f"wrote reconstruction.json, reconstruction.md and reconstruction.png to {out}")


def _usage() -> str:
    return ("python -m cxr_rf.evaluate {" + "|".join(COMMANDS) + "} --workdir RUN [--out DIR] "
            "(--help for every flag)")


def main(argv):
    # Bad input is an errors.UserError: one line, exit 2 (cli.run), before anything loads.
    if len(argv) < 2:
        raise errors.UserError(f"name the evaluation ({', '.join(COMMANDS)}): {_usage()}")
    command = argv[1]
    if command not in COMMANDS:
        raise errors.UserError(f"unknown evaluation {command!r}; allowed: {', '.join(COMMANDS)}")
    cli.no_arguments(argv[1:])
    if command == "train-classifier":
        cli.require("data", "out")
        cli.input_dir(FLAGS.data, "--data")
        cli.output_dir(FLAGS.out, "--out")
        from cxr_rf.data import pipeline
        from cxr_rf.features import classifier
        pipeline.open_source(FLAGS.data, "train")          # a bad --data fails before --out exists
        classifier.train_cli(FLAGS.data, FLAGS.out, steps=FLAGS.classifier_steps, seed=FLAGS.seed)
        print(f"wrote the classifier to {FLAGS.out}")
        return
    if command == "reconstruction":
        return _reconstruction()
    if FLAGS.samples and FLAGS.workdir:
        raise errors.UserError("pass --workdir (sample the run) or --samples (a folder), not both")
    if command in RUN_COMMANDS or (command == "fidelity" and not FLAGS.samples):
        cli.require("workdir")
    if not FLAGS.workdir and not FLAGS.samples:
        raise errors.UserError(f"{command}: pass --workdir RUN or --samples DIR")
    if FLAGS.workdir:
        cli.input_dir(FLAGS.workdir, "--workdir")
    if FLAGS.samples:
        cli.input_dir(FLAGS.samples, "--samples")
    if FLAGS.seed + FLAGS.num > 2**32:
        raise errors.UserError(f"--seed + --num must be <= 2**32 (seeds are 32-bit), got "
                               f"{FLAGS.seed} + {FLAGS.num}")
    if command == "control":
        from cxr_rf.evaluation import control
        findings = [f.strip() for f in FLAGS.findings.split(",") if f.strip()]
        bad = [f for f in findings if f not in control.SCORES]
        if bad:
            raise errors.UserError(f"--findings: cannot measure {', '.join(map(repr, bad))}; "
                                   f"measurable findings: {', '.join(control.SCORES)}")
    base = epath.Path(FLAGS.workdir or FLAGS.samples) / "eval"
    out = epath.Path(FLAGS.out or base / command)
    cli.output_dir(str(out), "--out")
    for path, flag in ((FLAGS.reference, "--reference"), (FLAGS.classifier, "--classifier"),
                       (FLAGS.raddino, "--raddino")):
        if path:
            cli.input_dir(path, flag)
    ctx = Context(out, single=command != "all")
    # Everything that can be wrong with the inputs fails here, before a sample is drawn or a
    # file written: the feature spaces load (weights folders read), the reference opens.
    if FLAGS.samples:
        from cxr_rf.evaluation import sets
        sets.FolderSet(FLAGS.samples)
    if command != "control":
        ctx.check_spaces()
        ctx.real(FLAGS.split, FLAGS.reference_num)
    if command == "all":
        run_all(ctx)
        return
    r = SECTIONS[command](ctx)
    if command == "control":
        t = r["timing_s"]
        print(f"(checkpoint step {r['checkpoint_step']}; sampling {t['sample']:.1f} s, measuring "
              f"{t['measure']:.1f} s, real phantoms {t['real']:.1f} s)")
    print(f"wrote the {command} results to {out}")


if __name__ == "__main__":
    cli.run(main, _define_flags)
