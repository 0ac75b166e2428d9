"""Benchmark tables: every method at its default and one stronger setting, timed next to timm's dense forward.

``python experiments/bench.py gpu`` (``make bench-gpu``): DeiT-S and DeiT-B at 224 px, batch 1, 64 and 256, fp32
and bf16, random weights, on the GPU; it refuses at once without one (exit 2, nothing written). Sized to run
in under 8 minutes of device time on one H100/H200-class GPU: 26 measurements of 6 conditions, each a few
seconds with the default protocol.

``python experiments/bench.py cpu [--threads 1,2]`` (``make bench-cpu``): DeiT-S at 224 px on the CPU, batch 1,
32 and 64, fp32, once per thread count. ``python experiments/bench.py embedded --checkpoint CK``: the embedded
model, with the A-ViT checkpoint that ``make demo`` writes (the other methods on random weights: their token
counts do not depend on the weights). ``--defaults-only`` keeps one row per method.

Each measurement is one ``measure.py`` run (``experiments/measure.py``: the same config, checks and record), so
every row becomes a ``measure`` record in ``results/runs/`` with the device name in its throughput entries;
one summary line per measurement goes to stdout. The rows come from the registry: each method's default and
the ``stronger`` setting its ``@register_method`` declares, or the pair it declares for a backbone where the
defaults do not fit (``bench_settings``: A-ViT's gate constants for random weights, ToMe's r on 65 tokens). The
method of ``--checkpoint`` (read from the file) runs on it at its own default and stronger setting.

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
from typing import Iterable, Optional, Sequence

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "experiments" / "conf"


def overrides_of(params: dict) -> list[str]:
    """``{"keep_rate": 0.5}`` -> ``["method.params.keep_rate=0.5"]`` (Hydra's syntax for the value)."""
    return [f"method.params.{key}={_hydra_value(value)}" for key, value in params.items()]


def _hydra_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    return str(value)


def settings(model: str, trained: Iterable[str] = ()) -> list[tuple[str, list[str]]]:
    """The (method, overrides) rows of a table on ``model``: every registered method at the settings its
    registration declares (:func:`methods.bench_settings`), the dense reference first. A method in ``trained``
    runs on a trained checkpoint, so it keeps its own default and stronger setting on every backbone."""
    import methods

    rows = []
    for name in sorted(methods.list_methods(), key=lambda n: (methods.method_spec(n).family != "none", n)):
        chosen = methods.bench_settings(name, None if name in trained else model)
        rows += [(name, overrides_of(params)) for params in chosen]
    return rows


# ``compiled``: where the table times torch.compile too, as (models, dtypes, batch sizes, mode): ``both`` times the
# eager and the compiled models alternating in one measurement; ``true`` adds compiled-only rows, whose eager
# pairs are the table's own rows (on a GPU, where the machine is not shared, and the eager rows exist anyway).
TABLES = {
    "gpu": dict(models=("deit_small", "deit_base"), device="cuda", batch_sizes=(1, 64, 256), dtypes="[fp32,bf16]",
                compiled=(("deit_small",), "[bf16]", (64, 256), "true")),
    "cpu": dict(models=("deit_small",), device="cpu", batch_sizes=(1, 32, 64), dtypes="[fp32]",
                compiled=(("deit_small",), "[fp32]", None, "both")),
    "embedded": dict(models=("deit_digits",), device="cpu", batch_sizes=(1, 32, 64), dtypes="[fp32]",
                     compiled=None),
}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    from experiments.config_store import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def checkpoint_method(path: Path) -> str:
    """The method a suite checkpoint was trained with (its ``method`` entry); a plain timm one names none."""
    from experiments.train.checkpoints import read_checkpoint

    import methods

    name = read_checkpoint(str(path)).get("method")
    if not isinstance(name, str):
        raise ValueError(f"--checkpoint={path}: names no method (a suite checkpoint from run.py is needed)")
    if name not in methods.list_methods():
        raise ValueError(f"--checkpoint={path}: its method {name!r} is not registered; registered: "
                         f"{', '.join(methods.list_methods())}")
    return name


def plan_rows(table: str, threads: Sequence[Optional[int]], checkpoint: Optional[tuple[str, Path]],
              extra: list[str], run_dir: Path, defaults_only: bool = False,
              batch_sizes: Optional[Sequence[int]] = None, compile: bool = True) -> list[list[str]]:
    """Every measurement of ``table`` as its Hydra overrides; ``checkpoint`` is (its method, its path).
    ``compile``: also the table's compiled measurements (``TABLES[table]["compiled"]``)."""
    spec = TABLES[table]
    sizes = batch_sizes or spec["batch_sizes"]
    rows = _rows(spec, spec["models"], spec["dtypes"], sizes, threads, checkpoint, run_dir, defaults_only)
    if compile and spec["compiled"]:
        models, dtypes, compiled_sizes, mode = spec["compiled"]
        if mode == "both":  # the table's rows themselves time eager and compiled side by side
            rows = [row + ["measure.compile=both"] if f"model={models[0]}" in row else row for row in rows]
        else:
            rows += [row + [f"measure.compile={mode}"] for row in
                     _rows(spec, models, dtypes, batch_sizes or compiled_sizes, threads, checkpoint, run_dir,
                           defaults_only=True)]
    return [row + extra for row in rows]


def _rows(spec: dict, models: Sequence[str], dtypes: str, batch_sizes: Sequence[int],
          threads: Sequence[Optional[int]], checkpoint: Optional[tuple[str, Path]], run_dir: Path,
          defaults_only: bool) -> list[list[str]]:
    import methods

    sizes = "[" + ",".join(str(b) for b in batch_sizes) + "]"
    trained = [checkpoint[0]] if checkpoint else []
    rows = []
    for model in models:
        for thread in threads:
            seen = set()
            for method, params in settings(model, trained):
                if defaults_only and method in seen:
                    continue
                seen.add(method)
                overrides = [f"method={method}", f"model={model}", f"device={spec['device']}",
                             f"measure.batch_sizes={sizes}", f"measure.dtypes={dtypes}",
                             "progress=false", f"paths.run_dir={run_dir}", *params]
                if methods.method_spec(method).family != "none":  # the dense row: the wrapper-vs-timm check
                    overrides.append("measure.wrapper_check=false")
                if model != "deit_digits":
                    overrides.append("measure.num_classes=1000")
                if thread is not None:
                    overrides.append(f"measure.threads={thread}")
                if method in trained:
                    overrides.append(f"model.checkpoint={checkpoint[1]}")
                rows.append(overrides)
    return rows


def positive_ints(text: str) -> list[int]:
    """``"1,2"`` or ``"[1,32]"`` -> ``[1, 2]``; anything but positive integers is refused by argparse, which
    names the flag."""
    parts = text.strip().removeprefix("[").removesuffix("]").split(",")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of positive integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be a positive integer (1 or more)")
    return values


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    parse.add_argument("table", choices=sorted(TABLES))
    parse.add_argument("--threads", type=positive_ints, default=None,
                       help="CPU thread counts, e.g. 1,2 (default: torch's)")
    parse.add_argument("--checkpoint", type=Path, default=None,
                       help="a trained suite checkpoint (`make demo`'s A-ViT on embedded): its method runs on it")
    parse.add_argument("--batch-sizes", type=positive_ints, default=None,
                       help="replace the table's batch sizes, e.g. 1,32")
    parse.add_argument("--defaults-only", action="store_true", help="each method at its default setting only")
    parse.add_argument("--no-compile", action="store_true",
                       help="leave out the table's torch.compile measurements (CPU: eager and compiled side by side "
                            "in every DeiT-S row; GPU: DeiT-S bf16 at batch 64 and 256 compiled, every method at "
                            "its default)")
    parse.add_argument("--dry-run", action="store_true", help="print the measurements, run nothing")
    parse.add_argument("overrides", nargs="*", help="extra Hydra overrides (key=value) for every measurement")
    return parse


def main(argv: Optional[list[str]] = None) -> int:
    parse = parser()
    args = parse.parse_intermixed_args(argv)
    bad = [item for item in args.overrides if "=" not in item]
    if bad:
        parse.error(f"overrides must be key=value Hydra overrides, got {bad}")
    if TABLES[args.table]["device"] == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        print("bench.py gpu: no CUDA GPU is available here; nothing was run or written", file=sys.stderr)
        return 2
    if args.table == "embedded" and not args.checkpoint and not args.dry_run:
        print("bench.py embedded: --checkpoint is required (the A-ViT checkpoint `make demo` writes: "
              "outputs/<date>/<time>_adavit_deit_digits_s0/checkpoints/final.pth)", file=sys.stderr)
        return 2
    checkpoint = None
    if args.checkpoint:
        if not args.checkpoint.is_file():
            print(f"bench.py: --checkpoint={str(args.checkpoint)!r} is not a file", file=sys.stderr)
            return 2
        try:
            checkpoint = (checkpoint_method(args.checkpoint), args.checkpoint)
        except ValueError as error:
            print(f"bench.py: {error}", file=sys.stderr)
            return 2
    run_dir = ROOT / "outputs" / "bench" / time.strftime("%Y%m%dT%H%M%S")
    rows = plan_rows(args.table, args.threads or [None], checkpoint, args.overrides, run_dir,
                     args.defaults_only, args.batch_sizes, compile=not args.no_compile)
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
