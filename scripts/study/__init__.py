"""The end-to-end study of memorization in the wild middle: ``python scripts/study.py`` (see :mod:`study.main`).

Modules: :mod:`study.settings` (modes, sizes, arguments), :mod:`study.ledger` (resumable units of work),
:mod:`study.lanes` (calmwild commands run side by side in worker processes), :mod:`study.configs` (the fit configs of
every model), :mod:`study.stages` (regime, geometry, arms, swap, risk), :mod:`study.criteria` (every verdict's
criterion, fixed before any number), :mod:`study.figures` and :mod:`study.report` (report.md / report.json).
"""
