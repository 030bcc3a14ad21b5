import json

import pytest

from warehouse import ArtifactStore
from warehouse.artifacts import ArtifactError, content_version


def _writer(text):
    def write(folder):
        (folder / "weights.txt").write_text(text)

    return write


def test_versions_are_immutable_listable_and_loadable(paths):
    store = ArtifactStore(paths.artifacts)
    v1 = content_version("cfg", 1)
    a = store.write("model", "holdout", v1, _writer("one"), {"note": "first"})
    b = store.write("model", "holdout", v1, _writer("CHANGED"), {"note": "second"})
    assert a.created and not b.created
    assert b.file("weights.txt").read_text() == "one"
    v2 = content_version("cfg", 2)
    store.write("model", "holdout", v2, _writer("two"), {})
    assert [m["version"] for m in store.list("model", "holdout")] == [v1, v2]
    assert store.latest("model", "holdout").version == v2
    assert store.get("model", "holdout", v1).manifest["metadata"] == {"note": "first"}
    # writing an existing version again makes it the latest, without rewriting it
    store.write("model", "holdout", v1, _writer("x"), {})
    assert store.latest("model", "holdout").version == v1


def test_manifest_checksums_detect_tampering(paths):
    store = ArtifactStore(paths.artifacts)
    art = store.write("backtest", "holdout", "v1", _writer("data"), {})
    manifest = json.loads((art.path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"weights.txt"}
    store.verify(art)
    (art.path / "weights.txt").write_text("tampered")
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        store.verify(art)


def test_a_failing_writer_leaves_no_version_behind(paths):
    store = ArtifactStore(paths.artifacts)

    def broken(folder):
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("training crashed")

    with pytest.raises(RuntimeError):
        store.write("model", "holdout", "v1", broken, {})
    assert store.list("model") == []
    assert not list((paths.artifacts / "model" / "holdout").iterdir())
    with pytest.raises(ArtifactError, match="materialize the model asset first"):
        store.latest("model", "holdout")


def test_content_version_is_stable_and_sensitive():
    assert content_version({"a": 1, "b": 2}) == content_version({"b": 2, "a": 1})
    assert content_version({"a": 1}) != content_version({"a": 2})


def test_bad_path_segments_are_refused(paths):
    with pytest.raises(ArtifactError, match="Invalid artifact partition"):
        ArtifactStore(paths.artifacts).write("model", "../x", "v1", _writer(""), {})


def test_the_manifest_records_metadata_the_writer_adds_while_writing(paths):
    """Training summaries exist only after the files are written: they must reach the manifest,
    so a reused artifact still reports its validation loss, epochs and steps."""
    store = ArtifactStore(paths.artifacts)
    metadata = {"fold": "2021"}

    def write(folder):
        (folder / "weights.pt").write_bytes(b"w")
        metadata.update(val_loss=[0.97], steps=120)

    store.write("mamba2", "2021", "v1", write, metadata)
    again = store.write("mamba2", "2021", "v1", lambda folder: None, {"fold": "2021"})
    assert not again.created
    assert again.manifest["metadata"] == {"fold": "2021", "val_loss": [0.97], "steps": 120}


def test_a_cleaner_removing_the_new_temporary_folder_before_it_is_opened_is_retried(
    paths, monkeypatch
):
    """Another writer's cleanup can remove a just-made temporary folder before this writer
    opens it to lock it: the write takes a new name instead of failing."""
    import os
    from pathlib import Path

    import warehouse.artifacts as artifacts

    store = ArtifactStore(paths.artifacts)
    store.write("model", "holdout", "v1", _writer("one"), {})
    real_open, fired = os.open, []

    def open_after_cleanup(path, *args, **kwargs):
        if not fired and artifacts._TMP_DIR.fullmatch(Path(path).name):
            fired.append(path)
            artifacts._remove_abandoned(Path(path).parent)  # removes it: not locked yet
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_after_cleanup)
    art = store.write("model", "holdout", "v2", _writer("two"), {})
    monkeypatch.undo()
    assert fired and not Path(fired[0]).exists()
    assert art.created and art.file("weights.txt").read_text() == "two"
    assert [m["version"] for m in store.list("model", "holdout")] == ["v1", "v2"]


@pytest.mark.parametrize("segment", [".x." + "0" * 32 + ".tmp", ".hidden", ".", ".."])
def test_segments_starting_with_a_dot_are_refused(paths, segment):
    """A version named like a temporary folder would be listed, then deleted by the next
    write as abandoned; such names (and `.`/`..`) are refused for every segment."""
    store = ArtifactStore(paths.artifacts)
    for kind, part, version in ((segment, "p", "v1"), ("model", segment, "v1")):
        with pytest.raises(ArtifactError, match="Invalid artifact"):
            store.write(kind, part, version, _writer("x"), {})
    with pytest.raises(ArtifactError, match="Invalid artifact version"):
        store.write("model", "holdout", segment, _writer("x"), {})
    assert not paths.artifacts.exists() or not list(paths.artifacts.rglob("*"))
    store.write("model", "holdout", "v.1", _writer("x"), {})  # a dot inside is fine
    store.write("model", "holdout", "v2", _writer("y"), {})
    assert [m["version"] for m in store.list("model", "holdout")] == ["v.1", "v2"]


def test_a_version_folder_without_a_manifest_is_named_with_the_fix(paths):
    """Review 2, finding 7: a non-empty `final` folder with no manifest (a partial copy, a
    hand-made folder) made every write fail with a bare OSError 'Directory not empty'."""
    store = ArtifactStore(paths.artifacts)
    v1 = content_version("cfg", 1)
    final = paths.artifacts / "model" / "holdout" / v1
    final.mkdir(parents=True)
    (final / "weights.txt").write_text("half a copy")
    called = []

    def write(folder):
        called.append(folder)
        _writer("one")(folder)

    with pytest.raises(ArtifactError, match=rf"{v1}.*no manifest.json.*move it aside or delete"):
        store.write("model", "holdout", v1, write, {})
    assert not called  # refused before doing the work
    assert (final / "weights.txt").read_text() == "half a copy"  # left as it was
    assert [p.name for p in final.parent.iterdir()] == [v1]  # no temporary left
    (final / "weights.txt").unlink()  # an empty folder is replaced, as before
    assert store.write("model", "holdout", v1, write, {}).file("weights.txt").read_text() == "one"


def test_a_failed_cleanup_does_not_mask_the_writers_error(paths, monkeypatch, caplog):
    import logging
    import shutil

    import warehouse.artifacts as artifacts_module

    store = ArtifactStore(paths.artifacts)

    def fails(folder):
        (folder / "weights.txt").write_text("x")
        raise RuntimeError("the writer's own error")

    def rmtree(path, *args, **kwargs):
        if kwargs.get("ignore_errors"):
            return None
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with (
        caplog.at_level(logging.WARNING, logger=artifacts_module.__name__),
        pytest.raises(RuntimeError, match="the writer's own error"),
    ):
        store.write("model", "holdout", content_version("cfg", 1), fails, {})
    assert "Could not remove the temporary artifact folder" in caplog.text
