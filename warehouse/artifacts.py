"""Immutable, versioned artifact directories with manifests: models, backtests, reports."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from warehouse.paths import check_inside

_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")  # with fullmatch: `$` lets "v1\n" through
MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """An artifact is missing, malformed or does not match its manifest."""


def content_version(*parts: Any) -> str:
    """A short stable hash of JSON-serializable parts (code version, config, data version, ...)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Artifact:
    kind: str
    partition: str
    version: str
    path: Path
    manifest: dict[str, Any]
    created: bool  # False when an identical version already existed and was reused

    def file(self, name: str) -> Path:
        if name not in self.manifest["files"]:
            raise ArtifactError(
                f"Artifact {self.kind}/{self.partition}/{self.version} has no file "
                f"{name!r}; it has {sorted(self.manifest['files'])}"
            )
        return self.path / name


class ArtifactStore:
    """`<root>/<kind>/<partition>/<version>/` directories that never change once written.

    Writing builds the directory under a temporary name and renames it into place, so a version
    either exists whole (with a manifest of file checksums) or not at all.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _dir(self, kind: str, partition: str, version: str | None = None) -> Path:
        for label, seg in (("kind", kind), ("partition", partition), ("version", version or "x")):
            if not _SEGMENT.fullmatch(seg) or seg in (".", ".."):
                raise ArtifactError(f"Invalid artifact {label} {seg!r}: use letters, digits, . _ -")
        base = self.root / kind / partition
        path = base / version if version else base
        check_inside(self.root, path, f"artifact {kind}/{partition}/{version or ''}")
        return path

    def write(
        self,
        kind: str,
        partition: str,
        version: str,
        write_files: Callable[[Path], None],
        metadata: dict[str, Any],
    ) -> Artifact:
        """Create version `version` by calling `write_files(tmp_dir)`; reuse it if it exists."""
        final = self._dir(kind, partition, version)
        if (final / MANIFEST).exists():
            self._set_latest(kind, partition, version)
            return self.get(kind, partition, version)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{version}.{uuid.uuid4().hex}.tmp"
        tmp.mkdir()
        try:
            write_files(tmp)
            files = {
                p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size}
                for p in sorted(tmp.iterdir())
                if p.is_file()
            }
            manifest = {
                "kind": kind,
                "partition": partition,
                "version": version,
                "created_at": datetime.now(UTC).isoformat(timespec="microseconds"),
                "files": files,
                "metadata": metadata,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / MANIFEST).exists():
                    raise
                self._set_latest(kind, partition, version)
                return self.get(kind, partition, version)  # another writer won the race
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        self._set_latest(kind, partition, version)
        return Artifact(kind, partition, version, final, manifest, created=True)

    def get(self, kind: str, partition: str, version: str) -> Artifact:
        path = self._dir(kind, partition, version)
        manifest_path = path / MANIFEST
        if not manifest_path.exists():
            known = [m["version"] for m in self.list(kind, partition)]
            raise ArtifactError(
                f"No artifact {kind}/{partition}/{version} under {self.root}; "
                f"versions there: {known}"
            )
        manifest = json.loads(manifest_path.read_text())
        return Artifact(kind, partition, version, path, manifest, created=False)

    def latest(self, kind: str, partition: str) -> Artifact:
        pointer = self._dir(kind, partition) / "LATEST"
        if not pointer.exists():
            raise ArtifactError(
                f"No {kind} artifact for partition {partition!r} under {self.root}; "
                f"materialize the {kind} asset first"
            )
        return self.get(kind, partition, pointer.read_text().strip())

    def list(self, kind: str, partition: str | None = None) -> list[dict[str, Any]]:
        """Manifests of every version, oldest first."""
        base = self.root / kind
        pattern = f"{partition}/*/{MANIFEST}" if partition else f"*/*/{MANIFEST}"
        manifests = [json.loads(p.read_text()) for p in base.glob(pattern)]
        return sorted(manifests, key=lambda m: (m["created_at"], m["version"]))

    def verify(self, artifact: Artifact) -> None:
        """Raise ArtifactError if any file differs from the checksum in the manifest."""
        for name, info in artifact.manifest["files"].items():
            if file_sha256(artifact.path / name) != info["sha256"]:
                raise ArtifactError(f"{artifact.path / name} does not match its manifest checksum")

    def _set_latest(self, kind: str, partition: str, version: str) -> None:
        pointer = self._dir(kind, partition) / "LATEST"
        tmp = pointer.with_name(f".LATEST.{uuid.uuid4().hex}.tmp")
        tmp.write_text(version + "\n")
        os.replace(tmp, pointer)


def frame_fingerprint(df: Any) -> str:
    """A content hash of a polars DataFrame (column names, types and values), stable across runs."""
    h = hashlib.sha256()
    for name, series in zip(df.columns, df.get_columns(), strict=True):
        h.update(f"{name}:{series.dtype}".encode())
        if series.dtype.is_numeric() or series.dtype.is_temporal():
            arr = series.to_physical().fill_null(0).to_numpy()
            h.update(arr.tobytes())
            h.update(series.is_null().to_numpy().tobytes())
        else:
            h.update(
                "\x1f".join("\x00" if v is None else str(v) for v in series.to_list()).encode()
            )
    return h.hexdigest()[:16]
