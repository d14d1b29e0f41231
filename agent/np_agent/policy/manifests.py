"""Read Pods, Namespaces and NetworkPolicies from YAML/JSON files, for the offline commands.

One bad document, or one bad object, is reported and skipped; the rest still load. A policy
whose spec cannot be parsed is kept as a fail-closed stand-in (see model.fail_closed_policy),
so a typo never opens the pods its author meant to close.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from np_agent.policy.model import (
    PARSERS,
    ClusterState,
    ModelError,
    fail_closed_policy,
    parse_object,
)

SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class LoadResult:
    state: ClusterState = field(default_factory=ClusterState)
    errors: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # kinds we do not enforce (Deployment, ...)


def manifest_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files named on the command line, and the YAML/JSON files below named directories."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES))
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such file or directory: {p}")
    return out


def _documents(path: Path) -> Iterator[Any]:
    text = path.read_text()
    if path.suffix == ".json":
        yield json.loads(text)
    else:
        yield from yaml.safe_load_all(text)


def _objects(doc: Any) -> Iterator[Any]:
    """Flatten `kind: List` (what `kubectl get -o yaml` prints) into its items."""
    if isinstance(doc, Mapping) and isinstance(doc.get("items"), list):
        for item in doc["items"]:
            yield from _objects(item)
    elif doc is not None:
        yield doc


def add_object(result: LoadResult, obj: Any, origin: str) -> None:
    if not isinstance(obj, Mapping):
        result.errors.append(f"{origin}: not an object")
        return
    if obj.get("kind") not in PARSERS:
        result.ignored.append(f"{origin}: kind {obj.get('kind')!r}")
        return
    try:
        result.state.add(parse_object(obj))
    except ModelError as e:
        result.errors.append(f"{origin}: {e}")
        stand_in = fail_closed_policy(obj, e) if obj.get("kind") == "NetworkPolicy" else None
        if stand_in is not None:
            result.state.add(stand_in)


def load_manifests(paths: Iterable[str | Path]) -> LoadResult:
    result = LoadResult()
    for path in manifest_files(paths):
        try:
            docs = list(_documents(path))
        except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
            result.errors.append(f"{path}: cannot parse: {e}")
            continue
        for i, doc in enumerate(docs):
            for obj in _objects(doc):
                add_object(result, obj, f"{path}[{i}]")
    return result
