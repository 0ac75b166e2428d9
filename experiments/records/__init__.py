"""Results records: the schema, building, provenance and atomic writes, shared by the harness and ``analysis/``.

Importing this package needs neither torch, Hydra nor the methods (``tests/test_records.py`` checks it).
One module per job, re-exported here:

- :mod:`~experiments.records.schema`: the typed record model (pydantic), ``SCHEMA_VERSION``, the required keys
  and the valid ranges; :func:`check_values`; :class:`RecordValueError` names the field, the value and the range;
- :mod:`~experiments.records.build`: :func:`build_record`, :func:`new_record_id`;
- :mod:`~experiments.records.provenance`: git state, packages, device (torch imported inside), :func:`now_iso`;
- :mod:`~experiments.records.store`: :func:`write_record` (validates, then writes atomically),
  :func:`load_record` (validates, upgrading older versions in memory), :func:`atomic_write_json`, the clean-up
  of dead writers' temp files;
- :mod:`~experiments.records.migrate`: older schema versions upgraded to the current one on load;
- :mod:`~experiments.records.token_maps`: the packed per-image depth maps and thumbnails, encoded and decoded.

One JSON file per run (``<results_dir>/runs/<record_id>.json``), compact, holding the dict as built. A record is
checked when it is built and again when it is written: a metric of inf, a top-1 of 150 or -5, or a zero,
negative or non-finite GFLOPs count is refused, naming the field and the value, and never written.

Schema (``schema_version`` 1, :class:`~experiments.records.schema.Record`); ``analysis/`` reads these keys:

- ``record_id``, ``kind`` (``run``, ``measure`` or ``tradeoff``; a run or trade-off point needs a numeric
  ``metrics.top1``, a trade-off point its ``tradeoff.knob``), ``status`` (``complete``);
- ``method``, ``method_params`` (the factory's defaults applied), ``method_defaults`` (the parameters of the
  method's default setting, i.e. the factory's defaults; absent in older records), ``method_info`` (the
  registered ``family`` and, for an adaptive method, its fixed-count ``counterpart``, then facts the built method
  reports, e.g. A-ViT's ``prior_target``), ``model`` (config name), ``architecture`` (timm name), ``data``,
  ``seed``;
- ``config``: the full resolved Hydra config;
- ``metrics``: one finite number (or ``null``) per metric the evaluation computed: the registered metrics of
  ``experiments/train/metrics.py`` (``top1``, ``top5`` in percent, ``val_loss``, ``num_images``), each within
  its registered range; any other numeric metric is carried as well;
- ``params``: parameter count of the method's model;
- ``tokens``: ``attn_mean`` and ``mlp_mean`` (per block, mean over images), ``depth_histogram`` (patch tokens
  by the number of blocks that saw them, 0..depth), ``mean_patch_depth`` (per patch, over the eval set, with
  ``grid``), ``maps`` (per-patch depth and a thumbnail for a few eval images, packed as in
  ``experiments/records/token_maps.py``; trade-off points have none); on video data ``motion`` (the moving
  region's token and compute shares), on data with ground truth (``data=digit_scenes``) ``objects``:
  ``object_share``, ``object_recall`` (object tokens that reach the last block), ``background_share`` and
  ``background_compute`` (the share of the summed patch depth spent on background tokens), the mean depths
  (``experiments/train/engine.py``, ``object_scores``);
- ``flops``: ``gflops`` (mean per image; 1 multiply-add = 1 FLOP), ``gflops_std/min/max``, ``dense_gflops``,
  ``flops_ratio``, ``convention``; ``null`` until measured;
- ``compute_per_image`` (absent or ``null`` in records written before it, or when FLOPs are not measured): the
  per-image GFLOPs' mean/std/min/max and ``dense_gflops``, a histogram of at most 50 bins (``edges``, ``images``
  and top-1 ``correct`` per bin), Spearman correlations (``rho``, Fisher-z 95% ``ci``, ``n``) of per-image
  compute with ``correct`` and, on ``data=digit_scenes``, with the object's token count and the scene's clutter,
  and the ``object_compute_share`` (``experiments/cost/per_image.py``);
- ``throughput``: list of ``{device, batch_size, dtype, img_per_s, dense_img_per_s, speedup_vs_dense,
  efficiency, peak_mem_mb, ...}``; ``null`` until measured. Since ``timing_protocol`` 2 (``experiments/
  cost/throughput.py``) each entry names its ``timed_images`` (e.g. ``val[0:64]``) and carries their ``flops_ratio``
  and ``timed_gflops`` (what ``efficiency`` divides by), ``dense_reference`` (``timm``) and the harness check
  ``dense_wrapper_vs_timm``; entries re-timed by ``experiments/remeasure.py`` say so in ``remeasured``, and a
  record whose protocol-1 timing could not be redone has ``throughput: null`` and ``throughput_withdrawn``;
- ``train``: ``epochs``, ``wall_time_s``, ``history`` (per-epoch metrics), ``init`` (where weights came from);
- ``weights`` (absent in older records): ``start_sha256`` / ``evaluated_sha256`` of the weights file the run
  started from and evaluated and, for a run from ``model.checkpoint``, ``checkpoint``: that file's name;
- ``data_read`` (``run`` and ``tradeoff``; absent in older records): what the run read, as the startup check
  counted it: ``classes``, ``train_images``, ``val_images`` and, for image folders, classes per split and folders;
- ``provenance``: ``git_commit``, ``git_dirty``, ``packages``, ``device``, ``hostname``, ``start_time``,
  ``end_time``, ``run_dir``.
"""
from experiments.records.build import build_record, new_record_id
from experiments.records.provenance import device_info, git_state, now_iso, package_versions, provenance
from experiments.records.schema import (FLOP_CONVENTION, FLOPS_RANGES, HEADLINE_METRIC, REQUIRED_KEYS,
                                        SCHEMA_VERSION, IncompleteRecordError, Record, RecordValueError,
                                        check_values, validate_record)
from experiments.records.store import (STALE_TEMP_AGE_S, RecordWriteError, atomic_write_json, load_record,
                                       remove_stale_temp_files, write_record)

__all__ = ["FLOP_CONVENTION", "FLOPS_RANGES", "HEADLINE_METRIC", "REQUIRED_KEYS", "SCHEMA_VERSION",
           "STALE_TEMP_AGE_S", "IncompleteRecordError", "Record", "RecordValueError", "RecordWriteError",
           "atomic_write_json", "build_record", "check_values", "device_info", "git_state", "load_record",
           "new_record_id", "now_iso", "package_versions", "provenance", "remove_stale_temp_files",
           "validate_record", "write_record"]
