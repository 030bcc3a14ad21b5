"""The Pipes message reader of the training launches: Dagster's file reader, parsing a message
only once its line is complete.

`dg.PipesFileMessageReader` tails the message file with `readline()`, which returns the part
of a line the external process is still writing. A long materialization report was once read
cut at character 425 (CI, two test workers on 2 cores): the reader thread raised a JSON error,
and the step's metadata from the training process was lost. This reader keeps a partial line
until its newline arrives.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import dagster as dg

POLL_S = 0.01


def whole_lines(path: str, should_stop: Callable[[], bool]) -> Iterator[str]:
    """Lines appended to `path`, each yielded once it ends with a newline, until `should_stop()`
    is true and the file has been read to its end (a last line without a newline is yielded
    then: the writer has finished)."""
    pending = ""
    with open(path, encoding="utf-8") as f:
        while True:
            chunk = f.readline()
            if chunk:
                pending += chunk
                if pending.endswith("\n"):
                    yield pending
                    pending = ""
                continue
            if should_stop():
                pending += f.read()
                for line in pending.splitlines(keepends=True):
                    if line.strip():
                        yield line
                return
            time.sleep(POLL_S)


class WholeLineFileMessageReader(dg.PipesFileMessageReader):
    """`PipesFileMessageReader` that parses each message only once its line is complete."""

    def _reader_thread(self, handler, is_resource_complete) -> None:
        try:
            for line in whole_lines(self._path, is_resource_complete.is_set):
                handler.handle_message(json.loads(line))
        except Exception:
            handler.report_pipes_framework_exception(
                f"{self.__class__.__name__} reader thread", sys.exc_info()
            )
            raise


class WholeLineTempFileMessageReader(dg.PipesTempFileMessageReader):
    """`PipesTempFileMessageReader` (a message file in a temporary folder per launch) reading
    through `WholeLineFileMessageReader`."""

    @contextmanager
    def read_messages(self, handler) -> Iterator[dict]:
        with tempfile.TemporaryDirectory() as folder:
            reader = WholeLineFileMessageReader(
                os.path.join(folder, "messages"),
                include_stdio_in_messages=self._include_stdio_in_messages,
            )
            with reader.read_messages(handler) as params:
                yield params
