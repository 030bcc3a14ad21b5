"""Guards of warehouse/artifacts.py: the ArtifactStore contract, pinned where tests/test_artifacts.py
leaves it loose.

What is pinned: the manifest a write records (its keys, file sizes and checksums, a UTC time,
non-JSON metadata as text, pretty-printed with sorted keys); the Artifact a write or a get
returns; `list` and `get` keeping to one partition; the race a writer loses to another writer of
the same version (it returns the winner's version and moves LATEST) and the folder made by hand
while a write runs (named, with the fix); what the next write removes (abandoned temporaries,
however many and among whatever else the partition holds) and what it leaves alone (a live
writer's temporary, a link named like one, another writer's LATEST temporary when there is no
flock); the messages a user reads; and the values of `content_version` and `frame_fingerprint`,
which name stored versions, so a change to them would orphan every stored artifact.

These tests kill mutants that survived `make mutate` (benchmarks/mutation.py; figures in
benchmarks/results/mutation.md). Polars runs only inside tests (mutmut forks after collecting).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

import warehouse.artifacts as artifacts
from warehouse import ArtifactStore
from warehouse.artifacts import ArtifactError, content_version, frame_fingerprint
from warehouse.paths import PathOutsideError


def _writer(text):
    def write(folder):
        (folder / "weights.txt").write_text(text)

    return write


def _hex(i: int) -> str:
    return f"{i:032x}"


# --- the manifest and the Artifact a write returns -------------------------------------------


def test_a_write_records_a_pretty_sorted_manifest_of_its_files_and_metadata(paths, caplog):
    """The manifest names the version (kind, partition, version), each file's checksum and size,
    a UTC creation time, and metadata that is not JSON (dates, paths) as text; it is written
    indented with sorted keys, so two versions' manifests diff line by line. The temporary
    folder the writer fills is `.<version>.<hex>.tmp` in the partition folder, and a write
    that goes well logs nothing."""
    store = ArtifactStore(paths.artifacts)
    seen = []

    def write(folder):
        seen.append(folder)
        (folder / "weights.txt").write_text("one")
        (folder / "scaler.bin").write_bytes(b"\x00" * 5)

    metadata = {"trained_until": datetime(2021, 1, 1, tzinfo=UTC), "data": Path("x/y"), "b": 1}
    with caplog.at_level(logging.DEBUG, logger=artifacts.__name__):
        art = store.write("model", "holdout", "v1", write, metadata)
    assert [r.getMessage() for r in caplog.records if r.name == artifacts.__name__] == []
    partition = paths.artifacts / "model" / "holdout"
    assert seen[0].parent == partition
    assert re.fullmatch(r"\.v1\.[0-9a-f]{32}\.tmp", seen[0].name), seen[0].name
    assert (art.kind, art.partition, art.version, art.path) == (
        "model",
        "holdout",
        "v1",
        partition / "v1",
    )
    assert art.created is True
    text = (art.path / "manifest.json").read_text()
    manifest = json.loads(text)
    assert text == json.dumps(manifest, indent=2, sort_keys=True)
    assert (manifest["kind"], manifest["partition"], manifest["version"]) == (
        "model",
        "holdout",
        "v1",
    )
    assert manifest["files"] == {
        "scaler.bin": {"sha256": hashlib.sha256(b"\x00" * 5).hexdigest(), "bytes": 5},
        "weights.txt": {"sha256": hashlib.sha256(b"one").hexdigest(), "bytes": 3},
    }
    assert manifest["metadata"] == {
        "trained_until": "2021-01-01 00:00:00+00:00",
        "data": "x/y",
        "b": 1,
    }
    created = datetime.fromisoformat(manifest["created_at"])
    assert created.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - created) < timedelta(minutes=5)
    assert sorted(p.name for p in partition.iterdir()) == ["LATEST", "v1"]


def test_get_returns_the_stored_version_as_not_created(paths):
    store = ArtifactStore(paths.artifacts)
    store.write("model", "holdout", "v1", _writer("one"), {"note": "first"})
    got = store.get("model", "holdout", "v1")
    assert (got.kind, got.partition, got.version) == ("model", "holdout", "v1")
    assert got.path == paths.artifacts / "model" / "holdout" / "v1"
    assert got.created is False
    assert got.manifest["metadata"] == {"note": "first"}
    again = store.write("model", "holdout", "v1", _writer("two"), {})
    assert again.created is False and again.file("weights.txt").read_text() == "one"


def test_asking_an_artifact_for_a_file_it_lacks_names_the_files_it_has(paths):
    store = ArtifactStore(paths.artifacts)
    art = store.write("model", "holdout", "v1", _writer("one"), {})
    expected = "Artifact model/holdout/v1 has no file 'missing.txt'; it has ['weights.txt']"
    with pytest.raises(ArtifactError, match=re.escape(expected)):
        art.file("missing.txt")


# --- partitions ------------------------------------------------------------------------------


def test_list_and_get_keep_to_the_partition_asked_for(paths):
    """A missing version's error lists the versions of its own partition only, and
    `list(kind, partition)` lists that partition; `list(kind)` lists them all."""
    store = ArtifactStore(paths.artifacts)
    store.write("model", "holdout", "v1", _writer("one"), {})
    store.write("model", "holdout", "v2", _writer("two"), {})
    store.write("model", "2021", "w1", _writer("other"), {})
    assert [m["version"] for m in store.list("model", "holdout")] == ["v1", "v2"]
    assert [m["version"] for m in store.list("model", "2021")] == ["w1"]
    assert sorted(m["version"] for m in store.list("model")) == ["v1", "v2", "w1"]
    with pytest.raises(ArtifactError, match=r"versions there: \['v1', 'v2'\]$"):
        store.get("model", "holdout", "v9")
    with pytest.raises(ArtifactError, match=r"No artifact model/2021/v9 under .*: \['w1'\]$"):
        store.get("model", "2021", "v9")


# --- messages a user reads -------------------------------------------------------------------


def test_an_invalid_segment_is_named_with_its_label_and_the_rule(paths):
    store = ArtifactStore(paths.artifacts)
    rule = ": use letters, digits, . _ - (not starting with .)"
    for (kind, part, version), label, seg in (
        ((".hidden", "p", "v1"), "kind", ".hidden"),
        (("model", "a/b", "v1"), "partition", "a/b"),
        (("model", "p", ".v"), "version", ".v"),
    ):
        message = f"Invalid artifact {label} {seg!r}{rule}"
        with pytest.raises(ArtifactError, match=f"^{re.escape(message)}$"):
            store.write(kind, part, version, _writer("x"), {})


def test_a_kind_folder_linked_outside_the_store_is_refused_naming_the_artifact(paths, tmp_path):
    """A link can carry a valid name out of the store: the refusal names the artifact asked for
    (kind/partition/version; with no version for `latest`), and nothing is written outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    paths.artifacts.mkdir(parents=True)
    (paths.artifacts / "model").symlink_to(outside)
    store = ArtifactStore(paths.artifacts)
    with pytest.raises(PathOutsideError, match=r"Refusing to write artifact model/holdout/v1 '"):
        store.write("model", "holdout", "v1", _writer("x"), {})
    with pytest.raises(PathOutsideError, match=r"Refusing to write artifact model/holdout/ '"):
        store.latest("model", "holdout")
    assert list(outside.iterdir()) == []


def test_a_version_folder_without_a_manifest_gets_the_whole_fix(paths):
    store = ArtifactStore(paths.artifacts)
    final = paths.artifacts / "model" / "holdout" / "v1"
    final.mkdir(parents=True)
    (final / "weights.txt").write_text("half a copy")
    message = (
        f"{final} exists but has no manifest.json: it is not a version this store wrote (a "
        "partial copy or restore, or a folder made by hand), and the version cannot be written "
        "over it; move it aside or delete it, then write again"
    )
    with pytest.raises(ArtifactError, match=f"^{re.escape(message)}$"):
        store.write("model", "holdout", "v1", _writer("one"), {})


@pytest.mark.parametrize("what", ["link to an empty folder", "file"])
def test_a_link_or_file_where_the_version_goes_is_refused_before_the_work(paths, what):
    """Only a real empty folder may be replaced by the rename; a link (even to an empty
    folder) or a file is refused up front, without calling the writer, and left as it was."""
    store = ArtifactStore(paths.artifacts)
    final = paths.artifacts / "model" / "holdout" / "v1"
    final.parent.mkdir(parents=True)
    if what == "file":
        final.write_text("not a folder")
    else:
        (paths.artifacts / "elsewhere").mkdir()
        final.symlink_to(paths.artifacts / "elsewhere")
    called = []
    with pytest.raises(ArtifactError, match="exists but has no manifest.json"):
        store.write("model", "holdout", "v1", lambda folder: called.append(folder), {})
    assert called == []
    if what == "file":
        assert final.read_text() == "not a folder"
    else:
        assert final.is_symlink() and list((paths.artifacts / "elsewhere").iterdir()) == []
    assert [p.name for p in final.parent.iterdir()] == ["v1"]


# --- races with other writers ----------------------------------------------------------------


def test_a_writer_that_loses_the_race_returns_the_winners_version_and_makes_it_latest(paths):
    """Another writer commits the same version while this one builds it (and then a newer
    version): this writer's rename fails, and it returns the winner's version, unchanged,
    as not created, makes it LATEST again (as any write of an existing version does), and
    leaves no temporary behind."""
    store = ArtifactStore(paths.artifacts)

    def slow(folder):
        (folder / "weights.txt").write_text("loser")
        store.write("model", "holdout", "v2", _writer("winner"), {"by": "other"})
        store.write("model", "holdout", "v3", _writer("three"), {})

    art = store.write("model", "holdout", "v2", slow, {"by": "me"})
    assert (art.kind, art.partition, art.version, art.created) == ("model", "holdout", "v2", False)
    assert art.file("weights.txt").read_text() == "winner"
    assert art.manifest["metadata"] == {"by": "other"}
    assert store.latest("model", "holdout").version == "v2"
    partition = paths.artifacts / "model" / "holdout"
    assert sorted(p.name for p in partition.iterdir()) == ["LATEST", "v2", "v3"]


def test_a_folder_made_by_hand_while_a_write_runs_is_named_and_left_alone(paths):
    store = ArtifactStore(paths.artifacts)
    final = paths.artifacts / "model" / "holdout" / "v1"

    def meanwhile(folder):
        (folder / "weights.txt").write_text("mine")
        final.mkdir()
        (final / "copy.bin").write_bytes(b"restored by hand")

    message = f"{final} exists but has no manifest.json: it is not a version this store wrote"
    with pytest.raises(ArtifactError, match=f"^{re.escape(message)}") as info:
        store.write("model", "holdout", "v1", meanwhile, {})
    assert isinstance(info.value.__cause__, OSError)
    assert [p.name for p in final.iterdir()] == ["copy.bin"]
    assert [p.name for p in final.parent.iterdir()] == ["v1"]  # no temporary, no LATEST


def test_a_temporary_removed_before_it_is_locked_is_not_written_into(paths, monkeypatch):
    """A cleaner can open, lock and remove a writer's new temporary folder between the writer's
    open and its flock: the writer must see that the folder it holds is gone and take a new
    name, not fill a deleted folder."""
    store = ArtifactStore(paths.artifacts)
    store.write("model", "holdout", "v1", _writer("one"), {})
    real_flock, fired = fcntl.flock, []

    def flock_after_cleanup(fd, op):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if not fired and artifacts._TMP_DIR.fullmatch(path.name) and path.exists():
            fired.append(path)
            artifacts._remove_abandoned(path.parent)  # not locked yet: removed
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_cleanup)
    art = store.write("model", "holdout", "v2", _writer("two"), {})
    monkeypatch.undo()
    assert fired and not fired[0].exists()
    assert art.created and art.file("weights.txt").read_text() == "two"
    assert [m["version"] for m in store.list("model", "holdout")] == ["v1", "v2"]


# --- what the next write removes and what it leaves ------------------------------------------


def test_the_next_write_removes_every_abandoned_temporary_among_other_entries(paths):
    """A killed writer's temporaries are removed whatever else the partition holds and in
    whatever order the folder lists them: versions, files named like temporaries (an old
    LATEST temporary), folders whose names only start with a dot."""
    store = ArtifactStore(paths.artifacts)
    store.write("model", "holdout", "v1", _writer("one"), {})
    partition = paths.artifacts / "model" / "holdout"
    abandoned, kept = [], []
    for i in range(6):
        (partition / f".v9.{_hex(3 * i)}.tmp").write_text("a file, not a folder")
        kept.append(f".v9.{_hex(3 * i)}.tmp")
        (partition / f".v9.{_hex(3 * i + 1)}.tmpx").mkdir()  # not a temporary's name
        kept.append(f".v9.{_hex(3 * i + 1)}.tmpx")
        (partition / f"-hand{i}").mkdir()
        kept.append(f"-hand{i}")
        tmp = partition / f".v9.{_hex(3 * i + 2)}.tmp"
        tmp.mkdir()
        (tmp / "half.bin").write_bytes(b"x")
        abandoned.append(tmp.name)
    store.write("model", "holdout", "v2", _writer("two"), {})
    names = {p.name for p in partition.iterdir()}
    assert not names & set(abandoned), sorted(names & set(abandoned))
    assert names == {"LATEST", "v1", "v2", *kept}


def test_a_temporary_another_cleaner_removes_first_does_not_stop_the_cleanup(paths, monkeypatch):
    """Two writes clean the same partition at once: a temporary the other one removed between
    this one's listing and its open is skipped, and the rest are still removed."""
    store = ArtifactStore(paths.artifacts)
    store.write("model", "holdout", "v1", _writer("one"), {})
    partition = paths.artifacts / "model" / "holdout"
    for i in range(6):
        (partition / f".v9.{_hex(i)}.tmp").mkdir()
    real_open, gone = os.open, []

    def open_after_other_cleaner(path, *args, **kwargs):
        path = Path(os.fspath(path))
        if not gone and path.parent == partition and path.name.startswith(".v9."):
            path.rmdir()  # the other cleaner got there first
            gone.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_after_other_cleaner)
    store.write("model", "holdout", "v2", _writer("two"), {})
    monkeypatch.undo()
    assert gone
    assert sorted(p.name for p in partition.iterdir()) == ["LATEST", "v1", "v2"]


def test_the_next_write_leaves_live_temporaries_and_removes_the_abandoned_ones(paths):
    """Temporaries a live writer holds (flocked) are skipped, and the cleanup goes on to the
    abandoned ones after them."""
    store = ArtifactStore(paths.artifacts)
    store.write("model", "holdout", "v1", _writer("one"), {})
    partition = paths.artifacts / "model" / "holdout"
    held, abandoned, fds = [], [], []
    try:
        for i in range(6):
            live = partition / f".v9.{_hex(2 * i)}.tmp"
            live.mkdir()
            fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
            fds.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(live.name)
            dead = partition / f".v9.{_hex(2 * i + 1)}.tmp"
            dead.mkdir()
            abandoned.append(dead.name)
        store.write("model", "holdout", "v2", _writer("two"), {})
    finally:
        for fd in fds:
            os.close(fd)
    assert {p.name for p in partition.iterdir()} == {"LATEST", "v1", "v2", *held}


def test_an_abandoned_temporary_that_cannot_be_removed_whole_is_removed_as_far_as_it_can(
    paths, monkeypatch
):
    """Some files of a killed writer's folder cannot be removed (EPERM): the cleanup removes
    every other file, and the write goes on."""
    store = ArtifactStore(paths.artifacts)
    store.write("model", "holdout", "v1", _writer("one"), {})
    partition = paths.artifacts / "model" / "holdout"
    tmp = partition / f".v9.{_hex(1)}.tmp"
    tmp.mkdir()
    for i in range(10):
        (tmp / f"stuck{i}").write_bytes(b"x")
        (tmp / f"free{i}").write_bytes(b"x")
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if os.fspath(path).startswith("stuck"):
            raise PermissionError(errno.EPERM, "Operation not permitted", path)
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    art = store.write("model", "holdout", "v2", _writer("two"), {})
    monkeypatch.undo()
    assert art.created
    assert sorted(p.name for p in tmp.iterdir()) == sorted(f"stuck{i}" for i in range(10))
    assert [m["version"] for m in store.list("model", "holdout")] == ["v1", "v2"]


def test_a_link_named_like_a_temporary_is_never_followed(paths, tmp_path, monkeypatch):
    """A link named like a temporary folder is not a writer's folder: the cleanup neither
    opens nor locks what it points to (another writer's folder, or a folder outside the store)
    and removes neither the link nor its target."""
    store = ArtifactStore(paths.artifacts)
    store.write("model", "holdout", "v1", _writer("one"), {})
    partition = paths.artifacts / "model" / "holdout"
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    link = partition / f".v9.{_hex(1)}.tmp"
    link.symlink_to(target)
    real_open, opened = os.open, []

    def spy(path, *args, **kwargs):
        opened.append(Path(os.fspath(path)))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    store.write("model", "holdout", "v2", _writer("two"), {})
    monkeypatch.undo()
    assert link not in opened and target not in opened
    assert link.is_symlink() and (target / "keep.txt").read_text() == "keep"


def test_same_folder_tells_the_folder_from_a_link_to_it_and_from_nothing(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    link = tmp_path / "link"
    link.symlink_to(folder)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert artifacts._same_folder(folder, fd) is True
        assert artifacts._same_folder(link, fd) is False
        assert artifacts._same_folder(tmp_path / "gone", fd) is False
    finally:
        os.close(fd)


# --- LATEST's temporaries --------------------------------------------------------------------


def _no_flock(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")


def test_without_flock_another_writers_latest_temporary_is_left_alone(paths, monkeypatch):
    """With no flock (some network mounts) a `.LATEST.<hex>.tmp` may be a live writer's, about
    to be renamed over LATEST: it is not removed. With flock, a stale one is."""
    store = ArtifactStore(paths.artifacts)
    store.write("model", "holdout", "v1", _writer("one"), {})
    partition = paths.artifacts / "model" / "holdout"
    other = partition / f".LATEST.{_hex(7)}.tmp"
    other.write_text("v9\n")
    monkeypatch.setattr(fcntl, "flock", _no_flock)
    store.write("model", "holdout", "v2", _writer("two"), {})
    monkeypatch.undo()
    assert other.read_text() == "v9\n"
    assert store.latest("model", "holdout").version == "v2"
    store.write("model", "holdout", "v3", _writer("three"), {})
    assert not other.exists()
    assert store.latest("model", "holdout").version == "v3"


def test_a_stale_latest_temporary_gone_before_its_unlink_does_not_fail_the_write(
    paths, monkeypatch
):
    """A stale `.LATEST.<hex>.tmp` removed by someone else (by hand) between the listing and
    its unlink is no error."""
    store = ArtifactStore(paths.artifacts)
    store.write("model", "holdout", "v1", _writer("one"), {})
    partition = paths.artifacts / "model" / "holdout"
    (partition / f".LATEST.{_hex(7)}.tmp").write_text("v9\n")
    real_glob = Path.glob

    def glob(self, pattern, *args, **kwargs):
        for p in list(real_glob(self, pattern, *args, **kwargs)):
            if pattern == ".LATEST.*.tmp":
                p.unlink()  # removed by someone else first
            yield p

    monkeypatch.setattr(Path, "glob", glob)
    store.write("model", "holdout", "v2", _writer("two"), {})
    monkeypatch.undo()
    assert store.latest("model", "holdout").version == "v2"
    assert sorted(p.name for p in partition.iterdir()) == ["LATEST", "v1", "v2"]


# --- the values that name stored versions ----------------------------------------------------


def test_content_version_is_the_pinned_hash_of_compact_sorted_json():
    """Stored versions are named by this hash: the same parts must give the same name in every
    later release, or every stored artifact is orphaned and rebuilt."""
    assert content_version("cfg", 1) == hashlib.sha256(b'["cfg",1]').hexdigest()[:16]
    assert content_version("cfg", 1) == "d87bffe670fb778f"
    assert content_version({"b": [1, 2.5], "a": "x"}) == "ab7265644cd2c2f5"
    expected = hashlib.sha256(b'[{"a":"x","b":[1,2.5]}]').hexdigest()[:16]
    assert content_version({"b": [1, 2.5], "a": "x"}) == expected


def test_content_version_takes_parts_that_are_not_json_as_their_text():
    when = datetime(2021, 1, 1, tzinfo=UTC)
    assert content_version(Path("a/b"), when) == content_version("a/b", str(when))
    assert content_version({"cfg": Path("x")}) == content_version({"cfg": "x"})


def _frame():
    import polars as pl

    return pl.DataFrame(
        {
            "n": [1, None, 3],
            "x": [0.5, -1.25, None],
            "ts": pl.Series([datetime(2021, 1, 1), None, datetime(2021, 1, 2, 3, 4, 5, 6)]).cast(
                pl.Datetime("ns")
            ),
            "d": [date(2020, 1, 1), date(2020, 1, 2), None],
            "s": ["a", None, "c"],
            "b": [True, False, None],
        }
    )


def test_frame_fingerprint_is_pinned_for_a_frame_of_every_kind_of_column():
    """The fingerprint goes into training and backtest versions: a frame must keep its
    fingerprint across runs and releases (numbers, dates and times by their bytes with a null
    mask, other columns by their text), or stored versions are not reused."""
    df = _frame()
    assert frame_fingerprint(df) == "5c6ac24b04b51e30"
    assert frame_fingerprint(df.clone()) == "5c6ac24b04b51e30"


def test_frame_fingerprint_sees_names_types_values_nulls_and_nanoseconds():
    import polars as pl

    def fp(**columns):
        return frame_fingerprint(pl.DataFrame(columns))

    base = fp(s=["a", "b"])
    assert len(base) == 16 and re.fullmatch(r"[0-9a-f]{16}", base)
    assert fp(s=["a", "c"]) != base
    assert fp(t=["a", "b"]) != base
    assert fp(s=[None, "b"]) != fp(s=["None", "b"])
    assert fp(s=[None, "b"]) != base
    assert fp(n=[1, None]) != fp(n=[1, 0])
    assert fp(n=[1, 2]) != fp(n=pl.Series([1, 2], dtype=pl.Int32))
    ns = pl.Series([datetime(2021, 1, 1)]).cast(pl.Datetime("ns"))
    one_ns_later = (ns.cast(pl.Int64) + 1).cast(pl.Datetime("ns"))
    assert ns.to_list() == one_ns_later.to_list()  # equal as Python datetimes (microseconds)
    assert fp(ts=ns) != fp(ts=one_ns_later)
