"""`tunelab sweep`: Optuna studies over ordinary runs (layer 7, beside the runner).

spec.py (the sweep recipe), space.py (the search space, conditional methods), objectives.py (what is optimised,
read from run directories), study.py (storage, sampler, pruner, the worker loop, one process per trial),
results.py (summary.json, report.html, the winning recipe). docs/sweep.md.
"""
