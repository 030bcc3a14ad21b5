"""The Pipes message reader waits for whole lines (Dagster's tails with readline(), which
returns a line still being written)."""

import threading
import time

from dagster._utils import tail_file

from pipelines.pipes import whole_lines


def _write_in_two_parts(path, done: threading.Event) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"method": "log", "params": {"message": "' + "x" * 400)
        f.flush()
        time.sleep(0.3)  # the reader polls every 10 ms: it sees the half line
        f.write('"}}\n{"method": "closed"}\n')
        f.flush()
    done.set()


def _read(reader, path) -> list[str]:
    done = threading.Event()
    open(path, "w").close()
    writer = threading.Thread(target=_write_in_two_parts, args=(path, done))
    writer.start()
    lines = list(reader(str(path), done.is_set))
    writer.join()
    return lines


def test_a_line_written_in_two_parts_is_read_once_whole(tmp_path):
    lines = _read(whole_lines, tmp_path / "messages")
    assert [len(line) for line in lines] == [
        len('{"method": "log", "params": {"message": "') + 400 + 4,
        21,
    ]
    assert all(line.endswith("\n") for line in lines)
    # Dagster's own tail splits it: the half line comes out as a message of its own
    assert len(_read(tail_file, tmp_path / "dagster")) == 3


def test_a_last_line_without_its_newline_is_read_at_the_end(tmp_path):
    path = tmp_path / "messages"
    path.write_text('{"a": 1}\n{"b": 2}')
    assert list(whole_lines(str(path), lambda: True)) == ['{"a": 1}\n', '{"b": 2}']
