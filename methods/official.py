"""Official checkpoint layouts: detect the key layout a method's official code saves and map it onto ours.

A method module registers its layout with :func:`register_layout` (an :class:`OfficialLayout`: how to recognise
the file, and how each official key is named here), so the loader (``experiments.train.checkpoints``) asks
:func:`match` and never names a method. Wrappers are peeled before matching: ``model`` / ``state_dict`` /
``model_ema`` / ``module`` / ``model_state`` entries (:func:`methods.models.read_checkpoint`; ``model`` wins when
a file holds both it and ``model_ema``, as the official evaluation scripts read it, unless the file's
``ema_best`` flag is true, as TokenReduction's ``validate.py`` reads it) and a ``module.`` prefix on every key
(a ``DistributedDataParallel`` model saved without unwrapping, :func:`strip_module_prefix`).

Loading stays all-or-nothing: every key of the method must come from the file and every key of the file must
land in the method, with the same shape; a mismatch is refused naming each key in this suite's name and the
official one. The one exception is a key the official code saves that holds a constant, not a weight (ATS's
zero ``out_zero_mask``): a layout names it (``fixed``) with the value it must hold, and it is checked, not
loaded. A file recognised as one method's official checkpoint is refused for another method, naming both.

``settings(content)`` reads the method parameters a file was trained with from what it saved (its options,
the shapes of its modules), so the reproduction command (``experiments/reproduce.py``) builds the method the
file needs without a name; a value the file does not say is left to the method's default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from torch import Tensor, nn

from .models import CheckpointError, load_state_dict_strict


@dataclass(frozen=True)
class OfficialLayout:
    """One method's official checkpoint layout.

    ``detect(content)`` says whether a read checkpoint (``content["model"]`` the state dict, other entries as
    saved, e.g. ``args``) is in this layout; ``to_ours`` / ``to_official`` rename one key each way (inverse of
    each other on every key of the layout); ``check(method, content)`` returns a line naming a setting of the
    built method that contradicts the file (e.g. gate constants it was trained with), or None; ``fixed(key)``
    is the constant an official key that holds no weight must equal (checked, not loaded), None for a weight;
    ``settings(content)`` the ``method.params`` the file was trained with, as far as it says."""

    method: str
    code: str  # the official repository and model file, for messages
    detect: Callable[[Mapping[str, Any]], bool]
    to_ours: Callable[[str], str]
    to_official: Callable[[str], str]
    check: Callable[[nn.Module, Mapping[str, Any]], Optional[str]] = lambda method, content: None
    fixed: Callable[[str], Optional[float]] = lambda key: None
    settings: Callable[[Mapping[str, Any]], dict[str, Any]] = lambda content: {}


_LAYOUTS: list[OfficialLayout] = []


def register_layout(layout: OfficialLayout) -> OfficialLayout:
    """Add ``layout`` (one per method); re-registering a method replaces its layout (module reloads)."""
    _LAYOUTS[:] = [known for known in _LAYOUTS if known.method != layout.method] + [layout]
    return layout


def layouts() -> dict[str, OfficialLayout]:
    """The registered layouts by method name."""
    return {layout.method: layout for layout in _LAYOUTS}


def strip_module_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop ``module.`` when every key carries it (a DDP-wrapped model saved as is); else ``state`` unchanged."""
    if state and all(key.startswith("module.") for key in state):
        return {key[len("module."):]: value for key, value in state.items()}
    return state


def match(content: Mapping[str, Any]) -> Optional[OfficialLayout]:
    """The registered layout ``content`` (a read checkpoint, wrappers peeled) is in, or None."""
    found = [layout for layout in _LAYOUTS if layout.detect(content)]
    if len(found) > 1:  # two layouts claiming one file is a registration defect, not a user error
        raise RuntimeError(f"official layouts of {', '.join(l.method for l in found)} all claim one checkpoint")
    return found[0] if found else None


def to_ours(layout: OfficialLayout, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The weights of ``state`` under our keys (the ``fixed`` constants left out)."""
    return {layout.to_ours(key): value for key, value in state.items() if layout.fixed(key) is None}


def check_fixed(layout: OfficialLayout, state: Mapping[str, Tensor]) -> Optional[str]:
    """A line naming the ``fixed`` keys of ``state`` that do not hold their constant, or None."""
    wrong = [key for key, value in state.items() if (constant := layout.fixed(key)) is not None
             and not bool((value == constant).all())]
    if not wrong:
        return None
    shown = ", ".join(wrong[:3]) + (f" ... ({len(wrong)} in all)" if len(wrong) > 3 else "")
    return (f"{shown} must hold the constant the official code fixes ({layout.fixed(wrong[0]):g}, not a trained "
            "weight) but do not; valid: an unmodified official checkpoint")


def to_official(layout: OfficialLayout, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {layout.to_official(key): value for key, value in state.items()}


def load_official(method: nn.Module, method_name: str, layout: OfficialLayout, content: Mapping[str, Any],
                  source: str) -> None:
    """Load an official checkpoint (``content["model"]`` in ``layout``) into ``method`` all-or-nothing, or raise
    :class:`CheckpointError` naming both methods, the contradicting setting, or the mismatched keys."""
    if layout.method != method_name:
        example = next(iter(sorted(content["model"])), "")
        raise CheckpointError(
            f"{source} is an official {layout.method} checkpoint ({layout.code}; e.g. key {example!r}), not one "
            f"of method={method_name}; valid: method={layout.method}, or a dense or plain timm checkpoint for "
            f"method={method_name}")
    problem = layout.check(method, content) or check_fixed(layout, content["model"])
    if problem:
        raise CheckpointError(f"{source} (official {layout.method} checkpoint): {problem}")
    load_state_dict_strict(method, to_ours(layout, content["model"]),
                           f"{source} (official {layout.method} layout, {layout.code})",
                           show_key=lambda key: f"{key} [official: {layout.to_official(key)}]")
