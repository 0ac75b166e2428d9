"""A record's identity: what decides "the same run" for the report, the curve loader and a regeneration's skip.

The identity is a digest of the fully resolved configuration that determines the result, with the keys that
cannot change it left out by the explicit list :data:`NOT_RESULT_KEYS`:

- method parameters enter with their defaults filled (the record's ``method_params``), so a record written
  before a parameter existed has the identity of a newer one at its default (after
  ``python -m experiments.records.upgrade`` filled it);
- a data folder enters as a digest of its scanned file list (relative names and sizes: ``data_files``), never
  its absolute root nor the images' bytes;
- the starting weights enter by sha256, never by path; the dense baseline's recipe counts only when no hash
  says where the run started;
- the fine-tune recipe counts only when the run fine-tuned (``fine_tuned``).

``key`` identifies the run; ``setting`` is the same without the seed and the starting weights (each seed starts
from its own baseline): what a report row averages over seeds.
Records of one identity from different commits are one run measured twice (the newest supersedes); records of
different identities are never merged. Records written before identities existed get :func:`legacy_identity`
on load: the same digest over what they carry (the folder's root in place of its file list, the curve's weights
hash where a trade-off point names it).

Pure Python (no torch, no Hydra): the harness (``experiments/pipeline.py``) and ``analysis/`` both use it.
"""
from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Optional

# Keys of a resolved config that cannot change a record's result (dotted; a section name drops the section).
NOT_RESULT_KEYS = ("paths", "hydra", "progress", "num_workers", "threads", "launcher", "eval.batch_size",
                   "eval.map_images", "model.checkpoint", "data.root", "method.tradeoff_values")


def content_digest(content: Any, length: int = 16) -> str:
    """A short, stable hash of JSON-able ``content`` (keys sorted)."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:length]


def drop_key(content: dict[str, Any], dotted: str) -> None:
    """Remove the dotted key (``eval.batch_size``) or section (``paths``) from ``content``, if present."""
    head, _, rest = dotted.partition(".")
    if rest and isinstance(content.get(head), dict):
        drop_key(content[head], rest)
    elif not rest:
        content.pop(head, None)


def result_identity(config: dict[str, Any], method: str, params: dict[str, Any], kind: str, trains: bool,
                    start_weights_sha256: Optional[str], data_files: Optional[str]) -> dict[str, Any]:
    """The identity of a record (module docstring): ``key``, ``setting`` and the digests it was built from.
    ``config`` is the resolved config the record carries, ``params`` the method parameters with defaults filled,
    ``data_files`` the data folder's digest (``None`` for generated data, whose config is the whole identity)."""
    content = copy.deepcopy(config) if isinstance(config, dict) else {}
    for dotted in NOT_RESULT_KEYS:
        drop_key(content, dotted)
    method_section = content.get("method") if isinstance(content.get("method"), dict) else {}
    content["method"] = {**method_section, "name": method, "params": params}
    content.pop("experiment", None)  # replaced by what it decided:
    content["fine_tuned"] = bool(trains)
    if not trains:
        content.pop("train", None)  # an off-the-shelf result does not depend on the fine-tune recipe
    if start_weights_sha256 is not None:
        content.pop("baseline", None)  # the weights themselves say where the run started
    content["data_files"] = data_files
    content["kind"] = kind
    seed = content.pop("seed", None)
    setting = content_digest(content)  # each seed starts from its own weights (its baseline): neither counts here
    content["seed"] = seed
    content["start_weights_sha256"] = start_weights_sha256
    return {"key": content_digest(content), "setting": setting, "start_weights_sha256": start_weights_sha256,
            "data_files": data_files}


def fine_tuned(record: dict[str, Any]) -> bool:
    """Whether the record's model was fine-tuned in its run (``train.epochs`` > 0)."""
    train = record.get("train") if isinstance(record.get("train"), dict) else {}
    epochs = train.get("epochs")
    return isinstance(epochs, (int, float)) and not isinstance(epochs, bool) and epochs > 0


def legacy_identity(record: dict[str, Any]) -> dict[str, Any]:
    """The identity of a record written without one, from what it carries (module docstring)."""
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    point = record.get("tradeoff") if isinstance(record.get("tradeoff"), dict) else {}
    trains = fine_tuned(record)
    folder = f"root:{data['root']}" if data.get("root") else None
    params = record.get("method_params") if isinstance(record.get("method_params"), dict) else {}
    # the record's own top-level names too, in case its config is partial (hand-made or very old records)
    config = {**config, "seed": record.get("seed"),
              "record_names": [str(record.get(key)) for key in ("model", "architecture", "data")]}
    identity = result_identity(config, str(record.get("method")), params, str(record.get("kind")), trains,
                               point.get("weights_sha256"), folder)
    return {**identity, "legacy": True}


def identity_of(record: dict[str, Any]) -> dict[str, Any]:
    """The record's own identity, or its :func:`legacy_identity` when it was written without one."""
    own = record.get("identity")
    if isinstance(own, dict) and isinstance(own.get("key"), str) and isinstance(own.get("setting"), str):
        return own
    return legacy_identity(record)
