"""``python -m experiments.records.upgrade RESULTS_DIR``: bring committed records up to date with the registry.

Records written before a method parameter existed lack it (an EViT record without ``fuse``), so their
``method_params`` and identity differ from a newer record at the same setting and the report would split them.
This command fills each record's missing parameters with the factory's defaults (``methods.resolved_params``:
the registry is the one source of defaults), its ``method_defaults`` (the parameters of the default setting),
its ``method_info.family`` (and ``counterpart``, where the method declares one) from the registration, and an
identity (:func:`~experiments.records.identity.legacy_identity`, from the filled parameters) where it has none;
a record whose identity was computed before a parameter existed gets the identity it would get today
(``result_identity`` over its config and the filled parameters, the same starting weights and data files).

Every file is read and upgraded in memory first; a record that cannot be read or whose method is not
registered stops the command naming it, before the first file is written. Files are then rewritten atomically
(compact JSON, every other key unchanged); files already up to date are left alone. The package itself stays
torch-free: only this command imports the methods.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from experiments.records.identity import fine_tuned, legacy_identity, result_identity
from experiments.records.store import atomic_write_json, find_record_files, load_record

Defaults = Callable[[str, dict[str, Any]], dict[str, Any]]  # (method, params) -> params with defaults filled
# method -> its registered family, or the registered facts ``methods.registered_info`` gives (family, counterpart)
Registered = Callable[[str], Any]


def upgraded(record: dict[str, Any], defaults: Defaults, family: Registered,
             backbone_defaults: Optional[Callable[[str, Any], dict[str, Any]]] = None) -> dict[str, Any]:
    """``record`` with its defaults, registered facts and identity filled (a copy; the caller's dict is
    unchanged). ``family(method)`` is the family, or a mapping of the registered ``method_info`` keys; a key the
    record already carries is kept."""
    out = copy.deepcopy(record)
    method = str(out["method"])
    given = dict(out.get("method_params") or {})
    out["method_params"] = defaults(method, given)
    if backbone_defaults is not None:  # the default on the record's backbone (ToMe's r on 65 tokens)
        out["method_defaults"] = backbone_defaults(method, out.get("model"))
    elif not isinstance(out.get("method_defaults"), dict):
        out["method_defaults"] = defaults(method, {})
    info = out.get("method_info") if isinstance(out.get("method_info"), dict) else {}
    facts = family(method)
    facts = dict(facts) if isinstance(facts, dict) else {"family": facts}
    out["method_info"] = {**{k: v for k, v in facts.items() if k not in info}, **info}
    own = out.get("identity")
    if not isinstance(own, dict):
        out["identity"] = legacy_identity(out)
    elif out["method_params"] != given and not own.get("legacy") and isinstance(out.get("config"), dict):
        # a parameter added since: the identity the record would get today, from what it was built from
        out["identity"] = {**own, **result_identity(
            out["config"], method, out["method_params"], str(out.get("kind")), fine_tuned(out),
            own.get("start_weights_sha256"), own.get("data_files"))}
    return out


def plan_upgrades(folder: Path, defaults: Defaults, family: Registered,
                  backbone_defaults: Optional[Callable[[str, Any], dict[str, Any]]] = None) -> list[tuple[Path, dict]]:
    """The (file, new record) pairs to write under ``folder``; raises ``ValueError`` naming the first file that
    cannot be upgraded, before anything is written."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such results folder; valid: a folder holding runs/*.json")
    changes = []
    for path in find_record_files(folder):
        try:
            record = load_record(path)
            new = upgraded(record, defaults, family, backbone_defaults)
        except (ValueError, KeyError) as error:
            raise ValueError(f"{path}: cannot upgrade ({error}); nothing was written") from None
        if new != record:
            changes.append((path, new))
    return changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="results folder (its runs/*.json and other record files)")
    parser.add_argument("--dry-run", action="store_true", help="list what would change, write nothing")
    args = parser.parse_args(argv)
    import methods  # noqa: PLC0415 - the registry, only for this command

    try:
        changes = plan_upgrades(args.folder, methods.resolved_params, methods.registered_info,
                                methods.default_params)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path, record in changes:
        if not args.dry_run:
            atomic_write_json(path, record)
    print(f"{len(changes)} record(s) {'to upgrade' if args.dry_run else 'upgraded'} under {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
