"""Older records read as the current schema: owns the upgrade of a loaded record to ``SCHEMA_VERSION``.

``MIGRATIONS[v]`` turns a version-``v`` record into a version-``v + 1`` one; :func:`upgrade` applies them in
turn, in memory, on load. Files under ``results/`` are never rewritten: a record keeps the version it was
written with. Today every record is version 1 (the current one), so there is nothing to migrate yet; a schema
change bumps ``SCHEMA_VERSION`` and adds its step here.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

from experiments.records.schema import (SCHEMA_VERSION, IncompleteRecordError, RecordValueError, missing_keys,
                                        validate_record)

Migration = Callable[[dict[str, Any]], dict[str, Any]]
MIGRATIONS: dict[int, Migration] = {}


def upgrade(record: dict[str, Any], current: int = SCHEMA_VERSION,
            migrations: Mapping[int, Migration] = MIGRATIONS) -> dict[str, Any]:
    """``record`` at schema version ``current``; the caller's dict is left as it was. Raises
    :class:`RecordValueError` for a version that is not an integer, newer than ``current``, or has no way up."""
    version = record.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise RecordValueError(f"schema_version={version!r} is not an integer; valid: 1..{current}")
    if version > current:
        raise RecordValueError(f"unsupported schema_version {version!r} (this code reads up to {current})")
    if version == current:
        return record
    upgraded = copy.deepcopy(record)
    while version < current:
        if version not in migrations:
            raise RecordValueError(f"unsupported schema_version {version!r}: no migration from it to {current}")
        upgraded = migrations[version](upgraded)
        version += 1
        upgraded["schema_version"] = version
    return upgraded


def as_current(record: Any) -> dict[str, Any]:
    """A record read from disk, upgraded (when it names its version) and validated as the current schema: what
    both readers (``store.load_record``, ``analysis.load``) use. Raises :class:`IncompleteRecordError` naming the
    missing keys, or :class:`RecordValueError` naming the bad field."""
    if isinstance(record, dict) and "schema_version" in record:
        record = upgrade(record)
    missing = missing_keys(record)
    if missing:
        raise IncompleteRecordError(f"missing {', '.join(missing)}")
    validate_record(record)
    return record
