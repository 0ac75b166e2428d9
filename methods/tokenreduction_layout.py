"""TokenReduction's official checkpoint layout, shared by the methods of its suite (``sit``, ``patchmerger``,
``sinkhorn``, ``dpcknn``, ``kmedoids``); each method module registers its own with :func:`register`.

Haurum et al.'s code (https://github.com/JoakimHaurum/TokenReduction, ``models/*.py``, ``train.py``) builds each
method as a subclass of timm 0.4.12's ``VisionTransformer``: the state dict holds timm's DeiT keys (mapped to
``vit.`` + key; ``pre_logits`` is an ``Identity`` without weights) plus ``cluster_layers.{s}.*``, one module per
reduction location, the method's own (mapped to ``reducers.{s}.*`` by the method's ``parts``). ``train.py``
saves ``{'model', 'optimizer', 'lr_scheduler', 'epoch', 'model_ema', 'scaler', 'args', 'ema_best'}`` in
``best_checkpoint.pth``; ``validate.py`` evaluates ``model_ema`` when ``ema_best`` is true, else ``model``
(``methods.models.read_checkpoint`` reads it the same way). ``args`` (an ``argparse.Namespace``) carries the
registered model name (``args.model``, e.g. ``sit_small_patch16_224``), ``reduction_loc`` and ``keep_rate``
(one rate: ``int(196 * kr ** (i + 1))`` clusters at location i; several: the counts themselves), and the
method's own options (``cluster_iters``, ``sinkhorn_eps``, ``k_neighbors``, ``equal_weight``).

A file is recognised by its ``args`` (the method's model name and the suite's ``reduction_loc``) or, without
them, by the method's ``cluster_layers`` keys; K-Medoids has no such key, so its bare state dict is a DeiT
checkpoint and loads into ``vit`` like one. Refused: other locations, other counts where a weight's shape
depends on them, other method options (each message names the saved ``args`` and the valid setting here).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional, Sequence

from torch import nn

from . import official

_OFFICIAL = re.compile(r"cluster_layers\.(\d+)\.(.+)")
_OURS = re.compile(r"reducers\.(\d+)\.(.+)")


def _rename(rest: str, parts: Sequence[tuple[str, str]]) -> Optional[str]:
    """``rest`` with the first matching prefix of ``parts`` (from, to) replaced; None if none matches."""
    for source, target in parts:
        if rest == source or (source.endswith(".") or source == "") and rest.startswith(source):
            return target + rest[len(source):]
    return None


def key_maps(parts: Sequence[tuple[str, str]]) -> tuple[Callable[[str], str], Callable[[str], str]]:
    """(official -> ours, ours -> official) for ``parts``: (official part, our part) pairs within one stage."""
    back = [(ours, theirs) for theirs, ours in parts]

    def to_ours(key: str) -> str:
        found = _OFFICIAL.fullmatch(key)
        if not found:
            return f"vit.{key}"
        stage, rest = found.groups()
        mapped = _rename(rest, parts)
        return f"reducers.{stage}.{mapped}" if mapped is not None else f"(none here: official {key})"

    def to_official(key: str) -> str:
        found = _OURS.fullmatch(key)
        if found:
            stage, rest = found.groups()
            mapped = _rename(rest, back)
            return f"cluster_layers.{stage}.{mapped}" if mapped is not None else f"(none: {key} is ours only)"
        return key[len("vit."):] if key.startswith("vit.") else f"(none: {key} is ours only)"

    return to_ours, to_official


def saved_args(content: Mapping[str, Any]) -> Any:
    """The file's ``args`` when they are TokenReduction's (``model``, ``reduction_loc``, ``keep_rate``), or None."""
    args = content.get("args")
    return args if all(hasattr(args, name) for name in ("model", "reduction_loc", "keep_rate")) else None


def trained_counts(args: Any, num_patches: int) -> list[int]:
    """Clusters per location as the official constructors compute them."""
    rates = [float(r) for r in args.keep_rate]
    if len(rates) == 1:
        return [int(num_patches * rates[0] ** (i + 1)) for i in range(len(args.reduction_loc))]
    return [int(r) for r in rates]


def _options_problem(method: nn.Module, args: Any, options: Mapping[str, str]) -> Optional[str]:
    for arg, param in options.items():
        if not hasattr(args, arg):
            continue
        saved, ours = getattr(args, arg), getattr(method, param)
        same = (bool(saved) == bool(ours)) if isinstance(ours, bool) else abs(float(saved) - float(ours)) < 1e-9
        if not same:
            shown = str(ours).lower() if isinstance(ours, bool) else f"{ours:g}"
            valid = str(bool(saved)).lower() if isinstance(ours, bool) else f"{float(saved):g}"
            return (f"it was trained with args.{arg}={saved!r}, but method.params.{param}={shown}; "
                    f"valid: method.params.{param}={valid}")
    return None


def register(method: str, model_prefix: str, parts: Sequence[tuple[str, str]], options: Mapping[str, str] = {},
             counts_fixed: bool = True, refuse: Callable[[Any], Optional[str]] = lambda args: None) -> None:
    """Register ``method``'s TokenReduction layout: ``model_prefix`` its official model names' prefix
    (``sit`` for ``sit_small_patch16_224``), ``parts`` its (official, ours) key parts within
    ``cluster_layers.{s}`` / ``reducers.{s}``, ``options`` its saved ``args`` and the parameters they set here,
    ``counts_fixed`` whether the counts are the trained structure (else ``keep_rate`` is the inference knob),
    ``refuse(args)`` a line for saved options nothing here implements."""
    to_ours, to_official = key_maps(parts)
    marker = parts[0][0] if parts else None

    def detect(content: Mapping[str, Any]) -> bool:
        args = saved_args(content)
        if args is not None:
            return str(args.model).startswith(f"{model_prefix}_")
        if marker is None:
            return False
        return any((found := _OFFICIAL.fullmatch(key)) and _rename(found.group(2), parts[:1]) is not None
                   for key in content["model"])

    def check(built: nn.Module, content: Mapping[str, Any]) -> Optional[str]:
        args = saved_args(content)
        if args is None:
            return None
        problem = refuse(args)
        if problem:
            return problem
        trained = [int(b) for b in args.reduction_loc]
        if trained != list(built.locations):
            return (f"it was trained with args.reduction_loc={trained}, but method.params.locations="
                    f"{list(built.locations)}; valid: method.params.locations={trained}")
        counts = trained_counts(args, built.num_patches)
        if counts_fixed and counts != list(built.patch_counts):
            rates = list(args.keep_rate)
            valid = (f"method.params.keep_rate={float(rates[0]):g}" if len(rates) == 1
                     else f"method.params.patch_counts={counts}")
            return (f"it was trained with args.keep_rate={rates} ({counts} clusters), but this method leaves "
                    f"{list(built.patch_counts)} patch tokens; valid: {valid}")
        return _options_problem(built, args, options)

    def settings(content: Mapping[str, Any]) -> dict[str, Any]:
        args = saved_args(content)
        if args is None:
            return {}
        rates = list(args.keep_rate)
        found: dict[str, Any] = {"locations": [int(b) for b in args.reduction_loc]}
        if len(rates) == 1:
            found["keep_rate"] = float(rates[0])
        else:
            found["patch_counts"] = [int(r) for r in rates]
        for arg, param in options.items():
            if hasattr(args, arg):
                found[param] = getattr(args, arg)
        return found

    official.register_layout(official.OfficialLayout(
        method=method, code=f"JoakimHaurum/TokenReduction models/{model_prefix}.py", detect=detect,
        to_ours=to_ours, to_official=to_official, check=check, settings=settings))
