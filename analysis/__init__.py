"""Analysis of results records: the small library behind ``analysis/report.ipynb``.

- :mod:`analysis.load`: record JSON files -> one tidy DataFrame (bad files skipped with a warning);
  :mod:`analysis.token_stats` and :mod:`analysis.throughput` read the token statistics and throughput entries;
- :mod:`analysis.tables`: seed aggregation (once per report), the main and A-ViT ablation tables (Markdown,
  LaTeX, CSV), Pareto fronts;
- :mod:`analysis.plots`: the report's figures (PNG and PDF), all drawn from that one aggregate;
- :mod:`analysis.curves`: trade-off curves and the matched-FLOPs table from ``tradeoff`` records;
- :mod:`analysis.published`: published numbers next to ours;
- :mod:`analysis.formatting` (numbers and settings as text, method order) and :mod:`analysis.style` (the
  figures' look and saving), shared by all of the above;
- :mod:`analysis.run_report`: executes the notebook headless (``make report``).

It reads record files only, with the records package (``experiments/records``: the schema, its ranges and the
token-map decoding) and the metric registry (``experiments/train/metrics.py``), both torch-free; it imports
neither torch, ``methods`` nor the rest of ``experiments``, so the report rebuilds on any machine with pandas and
seaborn.
"""
