"""Content fingerprints: every cached output lives under a hash of everything that made it."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel

CODE_VERSION = "0.1.0"
"""Bumped when a change alters what a stage produces; part of every fingerprint."""


NOT_IN_FINGERPRINT: dict[str, Any] = {"fingerprint": False}
"""``Field(..., json_schema_extra=NOT_IN_FINGERPRINT)`` declares a setting that does not change what a stage makes
(threads, checkpoint cadence, validation images): fingerprints of its model leave it out."""


IN_FINGERPRINT_UNLESS_DEFAULT: dict[str, Any] = {"fingerprint": "unless default"}
"""For a setting added after datasets were published: it enters fingerprints only away from its default, so
configs that leave it alone keep the fingerprints (dataset versions, trained models) they had."""


def in_fingerprint(model: type[BaseModel], name: str) -> bool:
    """Whether field ``name`` of ``model`` enters the fingerprints of its instances (at a non-default value)."""
    extra = model.model_fields[name].json_schema_extra
    return not (isinstance(extra, dict) and extra.get("fingerprint") is False)


def _fingerprinted(obj: BaseModel, name: str) -> bool:
    field = type(obj).model_fields[name]
    extra = field.json_schema_extra
    if isinstance(extra, dict) and extra.get("fingerprint") == "unless default":
        return getattr(obj, name) != field.default
    return in_fingerprint(type(obj), name)


def _canonical(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        kept = {name for name in type(obj).model_fields if _fingerprinted(obj, name)}
        dumped = obj.model_dump(mode="json", include=kept)
        return {
            name: _canonical(getattr(obj, name) if isinstance(getattr(obj, name), BaseModel) else value)
            for name, value in sorted(dumped.items())
        }
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    return obj


def fingerprint(*parts: Any, length: int = 16) -> str:
    """A short stable hex digest of JSON-able parts (pydantic models included) and the code version."""
    payload = json.dumps([CODE_VERSION, *map(_canonical, parts)], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:length]
