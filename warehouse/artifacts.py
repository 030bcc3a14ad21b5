"""Immutable, versioned artifact directories with manifests: models, backtests, reports."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from warehouse.lake import dir_lock, fsync_dir, fsync_tree, write_text_atomic
from warehouse.paths import check_inside

log = logging.getLogger(__name__)

# With fullmatch (`$` lets "v1\n" through). Not starting with `.`: such names are this store's
# temporaries (a version named like one would be deleted by the next write) or `.`/`..`.
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
MANIFEST = "manifest.json"
# A version being built (`.<version>.<hex>.tmp`) and a LATEST being replaced: never listed, and
# removed by a later write once no live writer holds them.
_TMP_DIR = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")
_LATEST_TMP = re.compile(r"\.LATEST\.[0-9a-f]{32}\.tmp")


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

    Writing builds the directory under a temporary name, fsyncs it and renames it into place, so
    a version either exists whole (with a manifest of file checksums) or not at all; writing a
    version that exists reuses it and only moves `LATEST` (an atomic replace). A writer holds a
    lock on its temporary folder while it builds it, so what a killed writer left is told apart
    from a live writer's work and removed by the next write to the partition; `list` never
    reads it. Crash states: killed while building, the store is as it was; after the rename,
    the version exists and a re-run reuses it and moves `LATEST`.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _dir(self, kind: str, partition: str, version: str | None = None) -> Path:
        for label, seg in (("kind", kind), ("partition", partition), ("version", version or "x")):
            if not _SEGMENT.fullmatch(seg):
                raise ArtifactError(
                    f"Invalid artifact {label} {seg!r}: use letters, digits, . _ - "
                    "(not starting with .)"
                )
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
        if final.parent.is_dir():
            _remove_abandoned(final.parent)
        if (final / MANIFEST).exists():
            self._set_latest(kind, partition, version)
            return self.get(kind, partition, version)
        if os.path.lexists(final) and not _empty_folder(final):  # the rename would fail
            raise _not_a_version(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        with _claimed_tmp(final.parent, version) as tmp:
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
            fsync_tree(tmp)  # the files, then their names, before the rename makes them a version
            try:
                os.rename(tmp, final)
            except OSError as err:
                if not (final / MANIFEST).exists():
                    if os.path.lexists(final):  # made (by hand?) while we wrote
                        raise _not_a_version(final) from err
                    raise
                self._set_latest(kind, partition, version)
                return self.get(kind, partition, version)  # another writer won the race
            fsync_dir(final.parent)
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
        manifests = [
            json.loads(p.read_text())
            for p in base.glob(pattern)
            if not _TMP_DIR.fullmatch(p.parent.name)  # a version still being built
        ]
        return sorted(manifests, key=lambda m: (m["created_at"], m["version"]))

    def verify(self, artifact: Artifact) -> None:
        """Raise ArtifactError if any file differs from the checksum in the manifest."""
        for name, info in artifact.manifest["files"].items():
            if file_sha256(artifact.path / name) != info["sha256"]:
                raise ArtifactError(f"{artifact.path / name} does not match its manifest checksum")

    def _set_latest(self, kind: str, partition: str, version: str) -> None:
        folder = self._dir(kind, partition)
        pointer = folder / "LATEST"
        with dir_lock(folder) as locked:  # writers of LATEST take turns
            for stale in folder.glob(".LATEST.*.tmp") if locked else ():  # no one's: remove
                if _LATEST_TMP.fullmatch(stale.name):
                    stale.unlink(missing_ok=True)
            # fsynced, renamed over LATEST (as .LATEST.<hex>.tmp first), the folder fsynced
            write_text_atomic(pointer, version + "\n")


@contextmanager
def _claimed_tmp(parent: Path, version: str) -> Iterator[Path]:
    """A new temporary folder in `parent`, locked (flock on the folder itself) for the block
    and removed after it unless it was renamed away. The lock tells a later writer that the
    folder is in use; it dies with its process, so a killed writer's folder can be removed."""
    while True:
        tmp = parent / f".{version}.{uuid.uuid4().hex}.tmp"
        tmp.mkdir()
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:  # a cleaner removed it between our mkdir and open: a new name
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a cleaner took it between our mkdir and flock: a new name
            os.close(fd)
            continue
        except OSError:
            pass  # no flock on this filesystem: unlocked, and never removed as abandoned
        if _same_folder(tmp, fd):
            break
        os.close(fd)  # a cleaner removed it before we locked it: a new name
    try:
        yield tmp
    finally:
        try:
            if _same_folder(tmp, fd):
                try:
                    shutil.rmtree(tmp)
                except OSError as err:  # never in place of the block's own error, if any
                    log.warning(
                        "Could not remove the temporary artifact folder %s (%s); a later "
                        "write removes it",
                        tmp,
                        err,
                    )
        finally:
            os.close(fd)


def _not_a_version(final: Path) -> ArtifactError:
    return ArtifactError(
        f"{final} exists but has no {MANIFEST}: it is not a version this store wrote (a partial "
        "copy or restore, or a folder made by hand), and the version cannot be written over "
        "it; move it aside or delete it, then write again"
    )


def _empty_folder(path: Path) -> bool:
    """Whether `path` is a folder (not a link) with nothing in it: a rename may replace it."""
    if path.is_symlink() or not path.is_dir():
        return False
    with os.scandir(path) as entries:
        return next(entries, None) is None


def _same_folder(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _remove_abandoned(parent: Path) -> None:
    """Remove the temporary folders in `parent` that no live writer holds (their writer was
    killed); a folder whose lock is held, or cannot be tested, is left alone."""
    for entry in parent.iterdir():
        if not _TMP_DIR.fullmatch(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_folder(entry, fd):
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue  # held by a live writer (BlockingIOError), or no flock here
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)


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
