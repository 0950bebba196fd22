"""The catalog: the table ingest writes once (``catalog/<fp>/catalog.parquet``, ``CATALOG_SCHEMA``), read
once per process and version of the file and handed on to every stage that reads it (concept, condition,
plan, generation, evaluation)."""

from __future__ import annotations

import threading
from collections import OrderedDict

import pyarrow as pa
import pyarrow.parquet as pq

from indusfactory.infra import storage
from indusfactory.layout import CATALOG_FILE

CATALOGS_KEPT = 2
"""How many catalog tables a process keeps (the most recently read): a run reads one; two cover a switch."""
_CATALOGS: OrderedDict[tuple, pa.Table] = OrderedDict()
_CATALOGS_LOCK = threading.Lock()


def catalog_version(catalog_uri: str) -> tuple | None:
    """What names the catalog file's bytes without reading them: its URI, size and version (ETag on object
    stores; modification time and inode elsewhere). A catalog written again at the same URI (ingested again
    after its record was removed) has another version. None when there is no catalog file."""
    uri = storage.join(catalog_uri, CATALOG_FILE)
    found = storage.info(uri)
    if found is None:
        return None
    return storage.normalise_uri(uri), int(found.get("size") or 0), storage.file_version(found), found.get("ino")


def read_catalog(catalog_uri: str) -> pa.Table:
    """The catalog table (with its categories metadata), read once per process and version of the file: every
    stage of a process that reads it (concept, condition, plan, generation, evaluation) is handed the same
    table (Arrow tables are immutable). A rewritten catalog has another version and is read again."""
    key = catalog_version(catalog_uri)
    with _CATALOGS_LOCK:
        if key is not None and key in _CATALOGS:
            _CATALOGS.move_to_end(key)
            return _CATALOGS[key]
        fs, path = storage.filesystem(storage.join(catalog_uri, CATALOG_FILE))
        with fs.open(path, "rb") as handle:  # absent: the same FileNotFoundError as an uncached read
            table = pq.read_table(handle)
        if key is not None:
            _CATALOGS[key] = table
            while len(_CATALOGS) > CATALOGS_KEPT:
                _CATALOGS.popitem(last=False)
        return table
