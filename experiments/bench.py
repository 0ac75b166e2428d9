"""Benchmark tables: every method at its default and one stronger setting, timed next to timm's dense forward.

``python experiments/bench.py gpu`` (``make bench-gpu``): DeiT-S and DeiT-B at 224 px, batch 1, 64 and 256, fp32
and bf16, random weights, on the GPU; it refuses at once without one (exit 2, nothing written). Sized to run
in under 8 minutes of device time on one H100/H200-class GPU: 26 measurements of 6 conditions, each a few
seconds with the default protocol.

``python experiments/bench.py cpu [--threads 1,2]`` (``make bench-cpu``): DeiT-S at 224 px on the CPU, batch 1,
32 and 64, fp32, once per thread count. ``python experiments/bench.py embedded --checkpoint CK``: the embedded
model, with the A-ViT checkpoint that ``make demo`` writes for ``adavit`` (the other methods on random weights:
their token counts do not depend on the weights). ``--defaults-only`` keeps one row per method.

Each measurement is one ``measure.py`` run (``experiments/measure.py``: the same config, checks and record), so
every row becomes a ``measure`` record in ``results/runs/`` with the device name in its throughput entries;
one summary line per measurement goes to stdout. A-ViT on random weights uses gate constants that give
0.6-0.7x dense FLOPs on the benchmark images (DeiT-S 10/4.0: 0.68x, DeiT-B 10/7: 0.61x; stronger: 10/3.5 and
10/5, 0.60x and 0.53x); with a trained checkpoint the stronger row is ``inference_gate_shift=-2``.

The committed CPU DeiT-S table was run as ``bench.py cpu --defaults-only --threads 1 measure.warmup=1
measure.repeats=3`` and ``--threads 2 --batch-sizes [1,32]`` with the same overrides: at 5 img/s a full
protocol costs about 10 minutes per row on two cores. On CPU the calibration pass over the pool (64 forwards
at batch 1) follows the one warm-up forward, so every timed model has run every pool batch before timing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "experiments" / "conf"

# (method, overrides) at the default and one stronger setting, per backbone where the constants differ
ADAVIT_GATES = {"deit_small": ((10, 4.0), (10, 3.5)), "deit_base": ((10, 7.0), (10, 5.0))}
ADAVIT_TRAINED = ([], ["method.params.inference_gate_shift=-2"])  # a trained checkpoint: its gates, then the knob


def settings(model: str) -> list[tuple[str, list[str]]]:
    """The (method, overrides) rows of a table on ``model``."""
    rows = [("dense", [])]
    if model in ADAVIT_GATES:
        rows += [("adavit", [f"method.params.gate_scale={scale}", f"method.params.gate_center={center}"])
                 for scale, center in ADAVIT_GATES[model]]
    else:
        rows += [("adavit", overrides) for overrides in ADAVIT_TRAINED]
    for rate in (0.7, 0.5):
        rows += [(name, [f"method.params.keep_rate={rate}"]) for name in ("dynamicvit", "evit", "topk", "random")]
    rows += [("tome", ["method.params.r=13"]), ("tome", ["method.params.r=16"])]
    rows += [("ats", []), ("ats", ["method.params.budget=0.5"])]  # the official K = N, then a per-stage budget
    for rate in (0.7, 0.5):  # TokenReduction's family (methods/staged.py)
        rows += [(name, [f"method.params.keep_rate={rate}"])
                 for name in ("kmedoids", "dpcknn", "sit", "patchmerger", "sinkhorn")]
    # the heuristic's default contiguous mode ignores the keep rate: the default, then the rate-driven mode
    rows += [("heuristic", []), ("heuristic", ["method.params.contiguous=false", "method.params.keep_rate=0.5"])]
    if model == "deit_digits":  # 65 tokens: ToMe's r must leave tokens after 12 blocks
        rows = [row for row in rows if row[0] != "tome"] + [("tome", ["method.params.r=4"]),
                                                           ("tome", ["method.params.r=5"])]
    return rows


TABLES = {
    "gpu": dict(models=("deit_small", "deit_base"), device="cuda", batch_sizes="[1,64,256]", dtypes="[fp32,bf16]"),
    "cpu": dict(models=("deit_small",), device="cpu", batch_sizes="[1,32,64]", dtypes="[fp32]"),
    "embedded": dict(models=("deit_digits",), device="cpu", batch_sizes="[1,32,64]", dtypes="[fp32]"),
}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    from experiments.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def plan_rows(table: str, threads: list[Optional[int]], checkpoint: Optional[str], extra: list[str],
              run_dir: Path, defaults_only: bool = False) -> list[list[str]]:
    spec = TABLES[table]
    rows = []
    for model in spec["models"]:
        for thread in threads:
            seen = set()
            for method, params in settings(model):
                if defaults_only and method in seen:
                    continue
                seen.add(method)
                overrides = [f"method={method}", f"model={model}", f"device={spec['device']}",
                             f"measure.batch_sizes={spec['batch_sizes']}", f"measure.dtypes={spec['dtypes']}",
                             "progress=false", f"paths.run_dir={run_dir}", *params]
                if method != "dense":  # the dense row is the table's wrapper-vs-timm harness check
                    overrides.append("measure.wrapper_check=false")
                if model != "deit_digits":
                    overrides.append("measure.num_classes=1000")
                if thread:
                    overrides.append(f"measure.threads={thread}")
                if checkpoint and method == "adavit":
                    overrides.append(f"model.checkpoint={checkpoint}")
                rows.append(overrides + extra)
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", choices=sorted(TABLES))
    parser.add_argument("--threads", default=None, help="CPU thread counts, e.g. 1,2 (default: torch's)")
    parser.add_argument("--checkpoint", default=None, help="embedded: the A-ViT checkpoint `make demo` wrote")
    parser.add_argument("--batch-sizes", default=None, help="replace the table's batch sizes, e.g. [1,32]")
    parser.add_argument("--defaults-only", action="store_true", help="each method at its default setting only")
    parser.add_argument("--dry-run", action="store_true", help="print the measurements, run nothing")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every measurement")
    args = parser.parse_intermixed_args(argv)
    if TABLES[args.table]["device"] == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        print("bench.py gpu: no CUDA GPU is available here; nothing was run or written", file=sys.stderr)
        return 2
    if args.table == "embedded" and not args.checkpoint and not args.dry_run:
        print("bench.py embedded: --checkpoint is required (the A-ViT checkpoint `make demo` writes: "
              "outputs/<date>/<time>_adavit_deit_digits_s0/checkpoints/final.pth)", file=sys.stderr)
        return 2
    if args.checkpoint and not Path(args.checkpoint).is_file():
        print(f"bench.py: --checkpoint={args.checkpoint!r} is not a file", file=sys.stderr)
        return 2
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [None]
    run_dir = ROOT / "outputs" / "bench" / time.strftime("%Y%m%dT%H%M%S")
    if args.batch_sizes:
        TABLES[args.table]["batch_sizes"] = args.batch_sizes
    rows = plan_rows(args.table, threads, args.checkpoint, args.overrides, run_dir, args.defaults_only)
    if args.dry_run:
        for overrides in rows:
            print(" ".join(overrides))
        return 0
    from experiments import measure
    from experiments.plan import validate

    configs = [compose(overrides) for overrides in rows]
    for cfg in configs:  # every row is checked before the first one is timed
        validate(cfg, cfg.measure.num_classes, train=False)
    for cfg in tqdm(configs, desc=f"bench {args.table}"):
        print(json.dumps(measure.summary_line(measure.measure_run(cfg))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
