"""Content fingerprints: every cached output lives under a hash of everything that made it."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel

CODE_VERSION = "0.1.0"
"""Bumped when a change alters what a stage produces; part of every fingerprint."""


def _canonical(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return _canonical(obj.model_dump(mode="json"))
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    return obj


def fingerprint(*parts: Any, length: int = 16) -> str:
    """A short stable hex digest of JSON-able parts (pydantic models included) and the code version."""
    payload = json.dumps([CODE_VERSION, *map(_canonical, parts)], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:length]
