"""Reproduce the published accuracy of released checkpoints on ImageNet.

``python experiments/reproduce.py --checkpoints DIR --imagenet ROOT [--dry-run] [OVERRIDE ...]`` (also
``python -m experiments.reproduce``, ``avb-reproduce`` and ``make reproduce CHECKPOINTS=DIR IMAGENET=ROOT``)

Every ``*.pth`` / ``*.pt`` / ``*.safetensors`` file in ``DIR`` is identified from its content, never its name:

- the method: the official layout it is in (``methods.official.match``: the layouts the method modules
  register), ``dense`` for a plain timm/DeiT state dict, or the method a suite checkpoint names;
- the method parameters it was trained with: what the layout reads from the file (``OfficialLayout.settings``:
  saved options, module shapes), the method's defaults for the rest;
- the backbone: the image model config (``experiments/conf/model``) whose timm model has the file's backbone
  shapes (width, depth, patch, position table, MLP width).

Then each file is evaluated in turn, as ``python experiments/run.py method=M model=B model.checkpoint=FILE
data=imagefolder data.root=ROOT experiment.train=false`` plus the settings and the ``OVERRIDE`` arguments
(Hydra overrides for every run, e.g. ``eval.batch_size=256 measure.throughput=false``); each run writes its
record, which carries the file's sha256 (``weights.start_sha256``) and name (``weights.checkpoint``). The report
(``analysis/reproduction.py``) puts each record's top-1 next to the published one. ``ROOT`` needs only ImageNet's
validation images as class folders, ``ROOT/val/<wnid>/*.JPEG``: an evaluation-only run of ``data=imagefolder``
reads no training image, so ``ROOT/train`` may be absent (``experiments/data/folders.py``); when it is there,
the startup check scans it too (the same class folders in both splits).

On a cluster, ``launcher=slurm`` among the overrides (with ``hydra.launcher.*`` keys as for ``run.py``, e.g.
``hydra.launcher.partition=gpu``) submits every file as one job of one SLURM job array through submitit, the way
``run.py -m ... launcher=slurm`` submits a sweep (``experiments.cluster.launch.launch_cells``): each job is
composed and validated before anything is submitted, the command blocks until every job ends, prints each
file's top-1 and writes ``<hydra.sweep.dir>/sweep_summary.json``; each job writes its run under its own Hydra
output folder (do not pass ``paths.run_dir``, which every job would share: refused). ``launcher=local`` does the
same with submitit's local executor. ``--dry-run`` with a launcher prints the ``run.py -m`` commands.

Refused in one ``error:`` line, before any work and with nothing written (status 2): a missing checkpoint
folder or one without checkpoint files, a missing ImageNet folder or one without ``val/<wnid>/`` class folders,
an unreadable checkpoint, one whose backbone matches no model config. A run's own refusal
(``experiments/refusal.py``) stops the command at that file; with a launcher, an invalid job is refused
before submission (status 2) and a failed job is reported with the others' results (status 1).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import methods
from experiments.train.checkpoints import file_sha256
from methods import official
from methods.models import CheckpointError, create_backbone, read_checkpoint

REFUSAL_STATUS = 2
CONF = Path(__file__).resolve().parent / "conf"
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")
BACKBONE_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")


class ReproduceError(ValueError):
    """An input this command cannot use; the message names it and what is valid."""


@dataclass
class Identified:
    """One checkpoint file, identified from its content."""

    path: Path
    method: str
    model: str  # the model config's name (model=...)
    params: dict[str, Any] = field(default_factory=dict)
    layout: Optional[str] = None  # the official code whose layout the file is in; None for plain/suite files

    def overrides(self, imagenet: Path) -> list[str]:
        return [f"method={self.method}", f"model={self.model}", f"model.checkpoint={self.path.resolve()}",
                "data=imagefolder", f"data.root={imagenet.resolve()}", "experiment.train=false",
                *(f"method.params.{key}={_hydra_value(value)}" for key, value in self.params.items())]


def _hydra_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    return str(value)


# ------------------------------------------------------------------------------------------ input checks
def checkpoint_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ReproduceError(f"--checkpoints={folder} does not exist or is not a folder; valid: a folder holding "
                             "the released checkpoint files")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    if not files:
        raise ReproduceError(f"--checkpoints={folder} holds no checkpoint file; valid: a folder with "
                             f"{' / '.join('*' + s for s in CHECKPOINT_SUFFIXES)} files")
    return files


def check_imagenet(root: Path) -> None:
    """``root`` holds ImageNet's validation images as class folders (``val/<wnid>/``; ``train/`` is not needed);
    the full check (every image header, the same classes as ``train/`` when it is there) is the run's startup
    check."""
    if not root.is_dir():
        raise ReproduceError(f"--imagenet={root} does not exist or is not a folder; valid: an ImageNet folder with "
                             "the validation images as class folders (ROOT/val/<wnid>/*.JPEG)")
    folder = root / "val"
    if not folder.is_dir():
        raise ReproduceError(f"--imagenet={root} has no val/ folder (expected {folder}/<wnid>/*.JPEG); valid: the "
                             "ImageNet validation images sorted into class folders, ROOT/val/<wnid>/*.JPEG")
    if not any(p.is_dir() for p in folder.iterdir()):
        raise ReproduceError(f"--imagenet={root}: {folder} has no class folders (expected {folder}/<wnid>/*.JPEG; "
                             "the flat ILSVRC2012_img_val folder must be sorted into class folders first)")


# ---------------------------------------------------------------------------------------- identification
def image_models() -> dict[str, dict[str, Any]]:
    """The image model configs a checkpoint can be evaluated on (those that bring their own data are left out)."""
    found = {}
    for path in sorted((CONF / "model").glob("*.yaml")):
        text = path.read_text()
        config = OmegaConf.create(text)
        if "_global_" in text.splitlines()[0] or config.get("num_frames") or "name" not in config:
            continue
        found[path.stem] = {"name": config.name, "img_size": int(config.img_size)}
    return found


def backbone_shapes(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    shapes: dict[str, Any] = {key: tuple(state[key].shape) for key in BACKBONE_KEYS if key in state}
    shapes["depth"] = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    return shapes


def model_for(state: dict[str, torch.Tensor], source: str) -> str:
    """The model config whose timm backbone has ``state``'s shapes (timm names, no ``vit.``)."""
    wanted = backbone_shapes(state)
    matches = []
    for config, spec in image_models().items():
        with torch.device("meta"):
            vit = create_backbone(spec["name"], num_classes=1, img_size=spec["img_size"])
        if backbone_shapes(vit.state_dict()) == wanted:
            matches.append(config)
    if len(matches) != 1:
        shown = ", ".join(f"{k}={v}" for k, v in wanted.items())
        raise ReproduceError(f"{source}: its backbone ({shown}) matches {len(matches)} model configs "
                             f"({', '.join(matches) or 'none'}); valid: a checkpoint of one of "
                             f"{', '.join(image_models())}")
    return matches[0]


def identify(path: Path) -> Identified:
    """What ``path`` holds (module docstring); raises ReproduceError / CheckpointError naming the file."""
    content = read_checkpoint(path)
    state = official.strip_module_prefix(content["model"])
    content = {**content, "model": state}
    source = f"--checkpoints file {path.name}"
    if content.get("method") is not None:  # a suite checkpoint says what it is
        method, params, layout = str(content["method"]), dict(content.get("method_params") or {}), None
        backbone = {k[len("vit."):]: v for k, v in state.items() if k.startswith("vit.")}
    else:
        found = official.match(content)
        if found is None:
            method, params, layout, backbone = "dense", {}, None, state
        else:
            method, params, layout = found.method, found.settings(content), found.code
            ours = official.to_ours(found, state)
            backbone = {k[len("vit."):]: v for k, v in ours.items() if k.startswith("vit.")}
    if method not in methods.list_methods():
        raise ReproduceError(f"{source} names method {method!r}, which is not registered; valid: "
                             f"{', '.join(methods.list_methods())}")
    return Identified(path, method, model_for(backbone, source), params, layout)


# ---------------------------------------------------------------------------------------------- running
def compose_run(overrides: list[str]):
    from experiments.config_store import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def reproduce(checkpoints: Path, imagenet: Path, extra: list[str], dry_run: bool = False) -> list[dict[str, Any]]:
    """Check the inputs, identify every file, then evaluate them in turn; returns the records written."""
    files = checkpoint_files(checkpoints)
    check_imagenet(imagenet)
    plan = [identify(path) for path in files]  # every file identified before the first run
    for item in plan:
        print(f"{item.path.name}: method={item.method} model={item.model} "
              f"params={item.params or 'defaults'} layout={item.layout or 'plain'}")
    launcher = launcher_choice(extra)
    if dry_run:
        for item in plan:  # a launcher acts under -m only (a one-cell sweep)
            print(f"python experiments/run.py {'-m ' if launcher else ''}" + " ".join(item.overrides(imagenet) + extra))
        return []
    if launcher:
        return submit(plan, imagenet, extra)
    from experiments import pipeline

    written = []
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for item in plan:  # outside a Hydra app the run folder has no default: one per file, unless given
        run_dir = [] if any(o.startswith("paths.run_dir=") for o in extra) else [
            f"paths.run_dir=outputs/reproduce/{stamp}_{item.path.stem}"]
        record = pipeline.run(compose_run(item.overrides(imagenet) + run_dir + extra))
        print(f"{item.path.name}: top-1 {record['metrics']['top1']:.2f}% sha256 {file_sha256(item.path)[:16]} "
              f"record {record['path']}")
        written.append(record)
    return written


def launcher_choice(extra: list[str]) -> Optional[str]:
    """The launcher the overrides choose (``launcher=slurm`` / ``local``), or None for runs in this process."""
    chosen = [o.split("=", 1)[1] for o in extra if o.split("=", 1)[0] in ("launcher", "+launcher")]
    return chosen[-1] if chosen and chosen[-1] not in ("basic", "") else None


def evaluate(cfg) -> dict[str, Any]:
    """A job's task (``submit``): ``run.py``'s run of one file; returns its record."""
    from experiments import pipeline

    return pipeline.run(cfg)


class JobsFailed(RuntimeError):
    """Jobs of a launched reproduction failed; one line each."""


def submit(plan: list[Identified], imagenet: Path, extra: list[str]) -> list[dict[str, Any]]:
    """Every file as one job of a sweep through the launcher ``extra`` chooses (``experiments.cluster.launch``:
    each cell validated before anything is submitted, one job array on SLURM, then the jobs are waited for and
    summarised in ``<sweep dir>/sweep_summary.json``); returns the records written, raises ``JobsFailed``
    after reporting the others when a job failed."""
    from experiments.cluster.launch import launch_cells
    from experiments.config_store import register_configs

    register_configs()  # the schemas the cells compose against (the jobs get them with Hydra's singletons)
    task = [o for o in extra if not o.startswith(("hydra.", "+hydra."))]  # the jobs' overrides, as run.py -m's
    returns = launch_cells(CONF, extra, [item.overrides(imagenet) + task for item in plan], evaluate)
    written, failed = [], []
    for item, ret in zip(plan, returns):
        value = ret._return_value
        if isinstance(value, BaseException) or not isinstance(value, dict):
            failed.append(f"{item.path.name}: {str(value).splitlines()[0] if str(value) else type(value).__name__}")
            continue
        print(f"{item.path.name}: top-1 {value['metrics']['top1']:.2f}% sha256 {file_sha256(item.path)[:16]} "
              f"record {value['path']}")
        written.append(value)
    if failed:
        raise JobsFailed("; ".join(failed))
    return written


def main(argv: Optional[list[str]] = None) -> int:
    from experiments.cluster.launch import SubmissionError
    from experiments.refusal import REFUSALS, one_line

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=Path, required=True, help="folder of released checkpoint files")
    parser.add_argument("--imagenet", type=Path, required=True,
                        help="ImageNet folder with the validation images as ROOT/val/<wnid>/*.JPEG")
    parser.add_argument("--dry-run", action="store_true", help="identify the files and print the runs only")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. eval.batch_size=256")
    args = parser.parse_args(argv)
    try:
        reproduce(args.checkpoints, args.imagenet, list(args.overrides), args.dry_run)
    except (ReproduceError, CheckpointError, *REFUSALS) as error:
        print(one_line(error) if str(error) else f"error: {type(error).__name__}", file=sys.stderr)
        return REFUSAL_STATUS
    except (SubmissionError, JobsFailed) as error:  # after submission: not a refusal
        print(one_line(error), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
