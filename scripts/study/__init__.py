"""The end-to-end study of memorization in the wild middle: ``python scripts/study.py`` (see :mod:`study.main`).

Modules: :mod:`study.settings` (modes, sizes, arguments), :mod:`study.lanes` (units of work run side by side in
worker processes, and the ledger that makes them resumable), :mod:`study.configs` (the fit config of every model),
:mod:`study.stages` (regime, geometry, arms, swaps, risk), :mod:`study.criteria` (every verdict's criterion, fixed
before any number), :mod:`study.figures` and :mod:`study.report` (report.md / report.json).
"""
