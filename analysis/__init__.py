"""Analysis of results records: the small library behind ``analysis/report.ipynb``.

- :mod:`analysis.load`: record JSON files -> one tidy DataFrame (bad files skipped with a warning, the same run
  recognised by its record identity); :mod:`analysis.token_stats` and :mod:`analysis.throughput` read the token
  statistics and throughput entries;
- :mod:`analysis.tables`: seed aggregation (once per report), the main table and the ablation of every method
  with several settings, Pareto fronts; :mod:`analysis.table_files` writes them (Markdown, LaTeX, CSV) and
  the index;
- :mod:`analysis.plots`: the report's figures (PNG and PDF), all drawn from that one aggregate, with the
  token-map figures in :mod:`analysis.depth_figures` and the shared record selection in
  :mod:`analysis.figure_data`;
- :mod:`analysis.families`: the family comparison at matched FLOPs; :mod:`analysis.video`: the video section;
- :mod:`analysis.curves`: trade-off curves and the matched-FLOPs table from ``tradeoff`` records;
- :mod:`analysis.published`: published numbers next to ours;
- :mod:`analysis.stats` (95% confidence intervals over seeds, the paired difference, "tied for best") and
  :mod:`analysis.controls` (the control each Δ top-1 is paired with: dense fine-tuned with the same recipe, or
  the baseline);
- :mod:`analysis.formatting` (numbers and settings as text, each method's family and order from the records'
  ``method_info.family``) and :mod:`analysis.style` (the figures' look and saving), shared by all of the above;
- :mod:`analysis.summary`: the one-page summary (``README.md``: two generated sentences, every method at its
  default, the Pareto fronts); :mod:`analysis.provenance`: the report's header (commit, records per kind, what
  was skipped and why) and the records a clone cannot follow (absolute paths, missing checkpoints);
  :mod:`analysis.object_figures`: each method's token depth over the ground-truth object outline;
- :mod:`analysis.run_report`: executes the notebook headless (``make report``) and renders it as HTML.

It reads record files only, with the records package (``experiments/records``: the schema, its ranges and the
token-map decoding) and the metric registry (``experiments/train/metrics.py``), both torch-free; it imports
neither torch, ``methods`` nor the rest of ``experiments``, so the report rebuilds on any machine with pandas and
seaborn.
"""
