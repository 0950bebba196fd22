"""Atomic writes under the factory root: temporary files on local disks, single PUTs on object stores."""

from __future__ import annotations

import pytest

from indusfactory import storage


def test_local_writes_go_through_a_temporary_and_stale_ones_are_removed(tmp_path, monkeypatch):
    moved = []
    real_rename = __import__("os").rename

    def spy(source, target, *args, **kwargs):
        moved.append((str(source), str(target)))
        return real_rename(source, target, *args, **kwargs)

    monkeypatch.setattr("os.rename", spy)
    target = tmp_path / "data" / "a.bin"
    storage.write_bytes_atomic(str(target), b"one")
    storage.write_many_atomic({str(tmp_path / "images" / f"{i}.png"): bytes([i]) for i in range(3)})
    assert target.read_bytes() == b"one" and (tmp_path / "images" / "2.png").read_bytes() == b"\x02"
    assert len(moved) == 4 and all("/.tmp-" in source for source, _ in moved)

    # What a crash leaves: a temporary file. Only the ones under the given folder are removed.
    stale = tmp_path / "data" / ".tmp-0123-a.bin"
    stale.write_bytes(b"half")
    elsewhere = tmp_path / "other" / ".tmp-4567-b.bin"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"half")
    assert storage.remove_temporaries(str(tmp_path / "data")) == [str(stale)]
    assert not stale.exists() and elsewhere.exists() and target.exists()
    assert storage.remove_temporaries(str(tmp_path / "missing")) == []


@pytest.mark.slow
def test_object_store_writes_are_single_puts(s3_bucket, monkeypatch):
    import fsspec
    import s3fs

    def no_move(*args, **kwargs):
        raise AssertionError("an object store write must not copy a temporary object")

    monkeypatch.setattr(s3fs.S3FileSystem, "mv", no_move)
    monkeypatch.setattr(s3fs.S3FileSystem, "_mv_file", no_move, raising=False)
    storage.write_bytes_atomic(f"{s3_bucket}/ds/manifest.json", b"{}")
    files = {f"{s3_bucket}/ds/images/{i}.png": bytes([i]) * 10 for i in range(20)}
    storage.write_many_atomic(files)
    fs = fsspec.filesystem("s3")
    found = sorted(fs.find(f"{s3_bucket}/ds"))
    assert len(found) == 21 and not [p for p in found if "/.tmp-" in p]
    assert all(fs.cat_file(uri) == data for uri, data in files.items())
