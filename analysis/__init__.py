"""Analysis of results records: the small library behind ``analysis/report.ipynb``.

- :mod:`analysis.load`: record JSON files -> one tidy DataFrame (bad files skipped with a warning);
- :mod:`analysis.tables`: seed aggregation, the main and A-ViT ablation tables (Markdown, LaTeX, CSV), Pareto
  fronts;
- :mod:`analysis.plots`: the report's figures (PNG and PDF);
- :mod:`analysis.run_report`: executes the notebook headless (``make report``).

It reads record files only (schema: ``experiments/records.py``) and imports neither torch, ``methods`` nor
``experiments``, so the report rebuilds on any machine with pandas and seaborn.
"""
