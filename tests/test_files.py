import threading

import pytest

from fmsearch import files


def test_a_reader_sees_the_old_file_or_the_new_one_and_a_failed_write_leaves_no_debris(tmp_path):
    path = tmp_path / "record.json"
    files.write_json(path, {"version": 1})

    def fail(partial):
        partial.write_text('{"version": 2, "half')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        files.write_atomic(path, fail)
    assert path.read_text() == '{\n "version": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_two_writers_holding_their_temporary_files_at_once_each_write_a_whole_file(tmp_path):
    """Both writers fill their temporary file, then wait for each other before renaming: a shared
    temporary name would give one writer the other's bytes or lose the file under it (ENOENT)."""
    path = tmp_path / "weights.pt"
    both_written = threading.Barrier(2, timeout=10)
    errors = []

    def writer(body: bytes) -> None:
        def write(partial):
            partial.write_bytes(body)
            both_written.wait()

        try:
            files.write_atomic(path, write)
        except Exception as error:  # noqa: BLE001 - the test reports whatever a writer hit
            errors.append(error)

    bodies = [b"A" * 100_000, b"B" * 100_000]
    threads = [threading.Thread(target=writer, args=(body,)) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert path.read_bytes() in bodies
    assert [p.name for p in tmp_path.iterdir()] == ["weights.pt"]


def test_a_link_planted_where_a_temporary_file_was_once_named_is_not_followed(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / ".summary.md.partial").symlink_to(outside)
    files.write_bytes(folder / "summary.md", b"new")
    assert outside.read_text() == "keep me" and (folder / "summary.md").read_bytes() == b"new"
