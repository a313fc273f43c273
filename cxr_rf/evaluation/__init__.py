"""The sections of ``python -m cxr_rf.evaluate``, one concern per module.

    sets        the image sets evaluated: a converted dataset's split, a folder of generated
                images with its manifest, in-memory arrays; one metadata dict per image
    control     the phantom's analytic measurements (``evaluate control``)
    fidelity    FD / KD / PRDC overall, per finding and per subgroup, with bootstrap intervals
    privacy     nearest training images in pixel and feature space, copy rate, memorisation
    utility     classifiers trained on real, synthetic and both, tested on held-out real
    report      metrics.json -> report.md, PNG plots, a self-contained report.html

Feature extractors live in ``cxr_rf.features``; the distances themselves in ``cxr_rf.fidelity``
and ``cxr_rf.metrics``.
"""
