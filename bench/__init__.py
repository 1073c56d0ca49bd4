"""robkd benchmark harness: robkd vs peers (torchattacks, ART, pyautoattack), naive code and physical limits.

Every figure is a *ratio* measured in one process on identical models, inputs
and seeds, and comes with an equality check of the results (robust accuracy,
losses, bounds), so that no speed-up is bought with a weaker computation.

Run ``python -m bench.run [--quick] [--only pgd,curve,...] --out reports/benchmarks.md``.
"""
