"""The datasets of a factory root as a catalogue: their versions, lineage and evaluation; what changed
between two versions; and the removal of versions and models that nothing references.

Pure logic over ``indusfactory.storage`` (local paths and ``s3://``); the CLI (``indusfactory datasets``)
and the Prefect artifact (``tasks/catalogue.py``) are thin wrappers around it.

What references what (the rules ``plan_gc`` applies):

- ``datasets/<name>/latest`` references its version: never removed, nor anything it references.
- A published version (it has ``manifest.json``) references the concept and condition models of its
  ``lineage``; a condition model references its concept model (``training_config.json``); a kept version
  also keeps any version or model whose path appears in its config (e.g. ``segformer:<evaluation folder>``).
- A version folder without a manifest is being written (or was left by a crash): never removed by gc.
- A model without ``record.json`` may be training, and a model younger than the grace period may belong
  to a run that has not published yet: both are kept.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from indusfactory.infra import storage
from indusfactory.infra.errors import BadInputError
from indusfactory.layout import LATEST_FILE, DatasetLayout, FactoryLayout, ModelFolder

MODEL_KINDS = ("concept", "condition")
DEFAULT_GRACE_SECONDS = 24 * 3600.0
NOT_RUN = "not run"


# -- listing ----------------------------------------------------------------------------------------


def _entries(uri: str) -> list[tuple[str, str]]:
    """(name, 'directory' | 'file') of what a folder holds; [] when it does not exist."""
    fs, path = storage.filesystem(uri)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    return sorted(
        (posixpath.basename(info["name"].rstrip("/")), info.get("type", "file"))
        for info in fs.ls(path, detail=True)
        if info["name"].rstrip("/") != path.rstrip("/")
    )


def _folders(uri: str) -> list[str]:
    return [name for name, kind in _entries(uri) if kind == "directory" and not name.startswith(".")]


def _read_json(uri: str) -> dict | None:
    return storage.read_json(uri) if storage.exists(uri) else None


def _modified(uri: str) -> float | None:
    """Seconds since the epoch of the last write of a file (local mtime or the object's LastModified)."""
    fs, path = storage.filesystem(uri)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return None


@dataclass(frozen=True)
class Version:
    """One version folder of a dataset: its manifest (empty while unpublished) and evaluation."""

    name: str
    version: str
    uri: str
    latest: bool
    manifest: dict = field(default_factory=dict)
    evaluation: dict | None = None

    @property
    def published(self) -> bool:
        return bool(self.manifest)

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def lineage(self) -> dict:
        return self.manifest.get("lineage", {})

    @property
    def counts(self) -> dict:
        return self.manifest.get("counts", {})

    @property
    def created(self) -> str:
        return str(self.manifest.get("created", ""))

    def row(self) -> dict:
        """One line of ``datasets list`` and of the Prefect table artifact."""
        counts, lineage = self.counts, self.lineage
        return {
            "dataset": self.name,
            "version": self.version,
            "latest": self.latest,
            "state": "published" if self.published else "unpublished",
            "created": self.created[:19],
            "samples": counts.get("samples"),
            "shards": counts.get("shards"),
            "flagged": counts.get("flagged"),
            "dropped": counts.get("dropped"),
            "labels": (self.manifest.get("adherence") or {}).get("verdict"),
            "evaluation": evaluation_verdict(self.evaluation),
            "base_model": lineage.get("base_model"),
            "concept": lineage.get("concept_fingerprint"),
            "condition": lineage.get("condition_fingerprint"),
            "catalog": lineage.get("catalog_fingerprint"),
            "uri": self.uri,
        }


def datasets_uri(root: str) -> str:
    return FactoryLayout.of(root).datasets


def latest_of(root: str, name: str) -> str | None:
    """The version ``datasets/<name>/latest`` names, or None."""
    uri = FactoryLayout.of(root).latest(name)
    if not storage.exists(uri):
        return None
    return storage.read_bytes(uri).decode("utf-8", "replace").strip() or None


def versions(root: str, name: str | None = None) -> list[Version]:
    """Every version folder of every dataset (or of ``name``): published ones by publication time, then
    unpublished ones."""
    out = []
    for dataset in [name] if name else _folders(datasets_uri(root)):
        folder = FactoryLayout.of(root).dataset_versions(dataset)
        latest = latest_of(root, dataset)
        for version in _folders(folder):
            uri = FactoryLayout.of(root).dataset(dataset, version).uri
            out.append(
                Version(
                    name=dataset,
                    version=version,
                    uri=uri,
                    latest=version == latest,
                    manifest=_read_json(DatasetLayout(uri).manifest) or {},
                    evaluation=published_evaluation(uri),
                )
            )
    return sorted(out, key=lambda v: (v.name, not v.published, v.created, v.version))


def find_version(root: str, ref: str) -> Version:
    """``name`` (its latest version), ``name/latest`` or ``name/version``."""
    name, _, version = ref.partition("/")
    if not version or version == LATEST_FILE:
        version = latest_of(root, name) or ""
        if not version:
            raise BadInputError(f"dataset {name!r} has no latest version under {datasets_uri(root)}")
    found = [v for v in versions(root, name) if v.version == version]
    if not found:
        raise BadInputError(f"no version {version!r} of dataset {name!r} under {datasets_uri(root)}")
    return found[0]


# -- what a version is ------------------------------------------------------------------------------


def published_evaluation(dataset_uri: str) -> dict | None:
    """The ``evaluation.json`` of a dataset version, or None."""
    return _read_json(DatasetLayout(dataset_uri).evaluation)


def evaluation_verdict(evaluation: dict | None) -> str:
    return (evaluation or {}).get("verdict") or NOT_RUN


def evaluation_headline(evaluation: dict | None) -> str:
    """``synthetic helps: defect IoU 0.412 (synthetic + real) vs 0.350 (real only) at 100% real``; the verdict's
    reason when no comparison is available; ``not run`` without an evaluation."""
    if not evaluation:
        return NOT_RUN
    verdict = evaluation.get("verdict") or "no verdict"
    results = evaluation.get("results") or []

    def iou(regime: str, fraction: float) -> float | None:
        return next(
            (
                r.get("iou")
                for r in results
                if r.get("regime") == regime and r.get("real_fraction") == fraction and r.get("synthetic_ratio") is None
            ),
            None,
        )

    fractions = sorted({r.get("real_fraction") for r in results if r.get("real_fraction") is not None})
    for fraction in reversed(fractions):
        mixed, real = iou("synthetic + real", fraction), iou("real only", fraction)
        if mixed is not None and real is not None:
            return (
                f"{verdict}: defect IoU {mixed:.3f} (synthetic + real) vs {real:.3f} (real only) at "
                f"{100 * fraction:.0f}% real"
            )
    reason = evaluation.get("verdict_reason")
    return f"{verdict}: {reason}" if reason else verdict


def adherence_headline(adherence: dict | None) -> str:
    if not adherence:
        return NOT_RUN
    return (
        f"{adherence['verdict']} (median label AUC {adherence['median_auc']:.3f} vs chance "
        f"{adherence['chance_auc']:.3f}, {adherence['samples']} samples)"
    )


def model_uri(root: str, kind: str, fp: str) -> str:
    return FactoryLayout.of(root).model(kind, fp).uri


def show(root: str, ref: str) -> dict:
    """Everything an operator asks of one version: counts, lineage (with whether each model is still on
    storage and its card), labels, evaluation, class counts, where to look."""
    v = find_version(root, ref)
    models = {}
    for kind in MODEL_KINDS:
        fp = v.lineage.get(f"{kind}_fingerprint")
        if fp:
            folder = FactoryLayout.of(root).model(kind, fp)
            models[kind] = {
                "fingerprint": fp,
                "uri": folder.uri,
                "present": storage.exists(folder.marker),
                "card": folder.card,
            }
    sheet = DatasetLayout(v.uri).contact_sheet
    return {
        "dataset": v.name,
        "version": v.version,
        "uri": v.uri,
        "latest": v.latest,
        "published": v.published,
        "created": v.created,
        "counts": v.counts,
        "lineage": v.lineage,
        "models": models,
        "classes": class_counts(v),
        "labels": adherence_headline(v.manifest.get("adherence")),
        "evaluation": evaluation_headline(v.evaluation),
        "contact_sheet": sheet if storage.exists(sheet) else None,
    }


def version_lines(dataset_uri: str) -> list[str]:
    """What the CLI prints after a run: evaluation, contact sheet, model cards of a published version."""
    root = storage.parent(storage.parent(storage.parent(dataset_uri)))
    manifest = _read_json(DatasetLayout(dataset_uri).manifest) or {}
    sheet = DatasetLayout(dataset_uri).contact_sheet
    lines = [
        f"evaluation:  {evaluation_headline(published_evaluation(dataset_uri))}",
        f"contact sheet: {sheet if storage.exists(sheet) else 'none'}",
    ]
    for kind in MODEL_KINDS:
        fp = manifest.get("lineage", {}).get(f"{kind}_fingerprint")
        if fp:
            lines.append(f"{kind} card: {FactoryLayout.of(root).model(kind, fp).card}")
    return lines


def class_counts(v: Version) -> dict[str, int]:
    """Instances per class of a published version (from its merged COCO file)."""
    if not v.published:
        return {}
    uri = DatasetLayout(v.uri).coco(v.manifest.get("split", "train"))
    doc = _read_json(uri) or {}
    names = {c["id"]: c["name"] for c in doc.get("categories", [])}
    counts = {name: 0 for name in names.values()}
    for ann in doc.get("annotations", []):
        name = names.get(ann.get("category_id"), str(ann.get("category_id")))
        counts[name] = counts.get(name, 0) + 1
    return counts


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): obj}


def _changes(a: dict, b: dict) -> dict[str, list]:
    fa, fb = _flatten(a), _flatten(b)
    return {key: [fa.get(key), fb.get(key)] for key in sorted(set(fa) | set(fb)) if fa.get(key) != fb.get(key)}


def diff(root: str, ref_a: str, ref_b: str) -> dict:
    """What changed from version A to version B: ``{section: {key: [A, B]}}`` for counts, lineage (models,
    catalog, plan and generation fingerprints), config, classes, labels and evaluation (only what differs)."""
    a, b = find_version(root, ref_a), find_version(root, ref_b)
    return {
        "a": a.ref,
        "b": b.ref,
        "counts": _changes(a.counts, b.counts),
        "lineage": _changes(a.lineage, b.lineage),
        "config": _changes(a.manifest.get("config", {}), b.manifest.get("config", {})),
        "classes": _changes(class_counts(a), class_counts(b)),
        "labels": _changes(
            {
                "verdict": (a.manifest.get("adherence") or {}).get("verdict"),
                "median_auc": (a.manifest.get("adherence") or {}).get("median_auc"),
            },
            {
                "verdict": (b.manifest.get("adherence") or {}).get("verdict"),
                "median_auc": (b.manifest.get("adherence") or {}).get("median_auc"),
            },
        ),
        "evaluation": _changes(
            {"headline": evaluation_headline(a.evaluation)}, {"headline": evaluation_headline(b.evaluation)}
        ),
    }


# -- garbage collection -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GcItem:
    kind: str
    """'dataset', 'concept' or 'condition'."""
    uri: str
    reason: str


@dataclass
class GcPlan:
    """What ``apply_gc`` removes (``remove``), what stays and why (``keep``), and a token naming the plan."""

    root: str
    remove: list[GcItem]
    keep: list[GcItem]

    @property
    def token(self) -> str:
        """A short hash of exactly what would go: ``apply_gc`` refuses when the storage changed since."""
        payload = json.dumps(sorted(item.uri for item in self.remove)).encode("utf-8")
        return hashlib.sha256(payload).hexdigest()[:12]


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        return [s for value in obj.values() for s in _strings(value)]
    if isinstance(obj, list):
        return [s for value in obj for s in _strings(value)]
    return [obj] if isinstance(obj, str) else []


def _names(strings: list[str], uri: str) -> bool:
    """Whether one of ``strings`` names ``uri`` or a path inside it (``.../v-1`` does not name ``.../v-10``)."""
    return any(uri + "/" in s + "/" for s in strings)


def _models(root: str) -> list[tuple[str, str, str]]:
    """(kind, fingerprint, uri) of every concept and condition model folder."""
    return [
        (kind, fp, model_uri(root, kind, fp))
        for kind in MODEL_KINDS
        for fp in _folders(FactoryLayout.of(root).models(kind))
    ]


def plan_gc(
    root: str, keep_versions: int = 0, grace_seconds: float = DEFAULT_GRACE_SECONDS, now: float | None = None
) -> GcPlan:
    """Which dataset versions and models nothing references (see the module's rules).

    ``keep_versions``: also keep the N most recently published versions of each dataset besides ``latest``.
    ``grace_seconds``: keep unreferenced models whose record is younger than this (a run may be about to
    publish a dataset made with them).
    """
    root = storage.normalise_uri(root)
    now = time.time() if now is None else now
    remove, keep = [], []
    all_versions = versions(root)
    kept_versions: list[Version] = []
    candidates: list[Version] = []
    for name in sorted({v.name for v in all_versions}):
        published = [v for v in all_versions if v.name == name and v.published and not v.latest]
        recent = {v.version for v in sorted(published, key=lambda v: v.created, reverse=True)[:keep_versions]}
        for v in (v for v in all_versions if v.name == name):
            if v.latest:
                keep.append(GcItem("dataset", v.uri, "latest"))
                kept_versions.append(v)
            elif not v.published:
                keep.append(GcItem("dataset", v.uri, "unpublished (being written, or left by a crash)"))
            elif v.version in recent:
                keep.append(GcItem("dataset", v.uri, f"one of the {keep_versions} newest versions"))
                kept_versions.append(v)
            else:
                candidates.append(v)
    # A version named in the config of a kept version is kept too (and what it names, in turn).
    while True:
        named = [s for v in kept_versions for s in _strings(v.manifest.get("config", {}))]
        referenced = [v for v in candidates if _names(named, v.uri)]
        if not referenced:
            break
        for v in referenced:
            candidates.remove(v)
            kept_versions.append(v)
            keep.append(GcItem("dataset", v.uri, "named in the config of a kept version"))
    remove += [GcItem("dataset", v.uri, "not latest, referenced by nothing") for v in candidates]

    used = {(kind, v.lineage.get(f"{kind}_fingerprint")) for v in kept_versions for kind in MODEL_KINDS}
    named = [s for v in kept_versions for s in _strings(v.manifest.get("config", {}))]
    models = _models(root)
    decided: dict[str, GcItem] = {}
    for kind, fp, uri in models:
        record = ModelFolder(uri, fp).marker
        modified = _modified(record)
        if (kind, fp) in used:
            decided[uri] = GcItem(kind, uri, "in the lineage of a kept version")
        elif _names(named, uri):
            decided[uri] = GcItem(kind, uri, "named in the config of a kept version")
        elif modified is None:
            decided[uri] = GcItem(kind, uri, "no record.json (training, or left by a crash)")
        elif now - modified < grace_seconds:
            decided[uri] = GcItem(kind, uri, f"trained less than {grace_seconds / 3600:g} h ago")
    # A kept condition model keeps the concept model it was trained on.
    for kind, fp, uri in models:
        if kind == "condition" and uri in decided:
            concept = (_read_json(ModelFolder(uri, fp).training_config) or {}).get("concept_fingerprint")
            concept_uri = model_uri(root, "concept", concept) if concept else None
            if concept_uri and concept_uri not in decided:
                decided[concept_uri] = GcItem("concept", concept_uri, "the concept of a kept condition model")
    for kind, fp, uri in models:
        if uri in decided:
            keep.append(decided[uri])
        else:
            remove.append(GcItem(kind, uri, "referenced by no kept version or model"))
    return GcPlan(root=root, remove=remove, keep=keep)


def apply_gc(
    root: str,
    token: str,
    keep_versions: int = 0,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    now: float | None = None,
) -> list[GcItem]:
    """Remove what ``plan_gc`` lists, only when its token is still ``token`` (what the dry run showed);
    dataset versions first, then models. Returns what was removed."""
    plan = plan_gc(root, keep_versions, grace_seconds, now)
    if plan.token != token:
        raise BadInputError(
            f"the storage changed since the dry run (token {plan.token}, not {token}): run "
            "`indusfactory datasets gc` again and check what it lists"
        )
    for item in sorted(plan.remove, key=lambda i: i.kind != "dataset"):
        fs, path = storage.filesystem(item.uri)
        fs.rm(path, recursive=True)
        fs.invalidate_cache(path)
    return plan.remove
