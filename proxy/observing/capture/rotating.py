"""Append-only files in one directory, bounded in size and number: the disk a capture may take is fixed.

Files are named ``<prefix>-<UTC time to the microsecond>-<sequence>.jsonl``, so that their names sort oldest first.
A file is started lazily, at the first write, and the next one when a write would take it past ``max_file_bytes``;
whenever that makes more than ``max_files`` files (counting those already in the directory with the same prefix),
the oldest are deleted. The directory therefore holds at most ``max_files * max_file_bytes`` bytes of them (files
left by an earlier run with a larger ``max_file_bytes`` excepted, until they rotate out). Not thread-safe: one
writer thread owns it. Blocking I/O: never call it on the event loop.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from pathlib import Path
from typing import BinaryIO

__all__ = ["RotatingFiles", "TooLargeError"]

SUFFIX = ".jsonl"


class TooLargeError(ValueError):
    """A single line larger than a whole file may be."""


class RotatingFiles:
    """Lines appended to ``directory/<prefix>-*.jsonl``, at most ``max_file_bytes`` per file and ``max_files``
    files. Counts ``bytes_written``, ``files_started``, ``files_deleted``; ``disk_bytes`` is the size of the files
    kept."""

    def __init__(self, directory: Path, prefix: str, max_file_bytes: int, max_files: int) -> None:
        self.directory = directory
        self.prefix = prefix
        self.max_file_bytes = max_file_bytes
        self.max_files = max_files
        self.bytes_written = 0
        self.files_started = 0
        self.files_deleted = 0
        self._sequence = itertools.count(1)
        #: kept files, oldest first, and their sizes
        self._files: list[tuple[Path, int]] = [(p, _size(p)) for p in self.files()]
        self._current: BinaryIO | None = None
        self._size = 0

    def files(self) -> list[Path]:
        """This writer's files in the directory, oldest first."""
        return sorted(self.directory.glob(f"{self.prefix}-*{SUFFIX}"))

    @property
    def disk_bytes(self) -> int:
        return sum(size for _, size in self._files)

    def write(self, line: bytes) -> None:
        """Append ``line`` (it should end with a newline). Raises ``TooLargeError`` when it exceeds
        ``max_file_bytes``, ``OSError`` when the disk refuses (the next write starts a new file)."""
        if len(line) > self.max_file_bytes:
            raise TooLargeError(f"a {len(line)}-byte record exceeds max_file_bytes ({self.max_file_bytes})")
        if self._current is None or self._size + len(line) > self.max_file_bytes:
            self._start()
        assert self._current is not None
        try:
            self._current.write(line)
        except OSError:
            self.close()
            raise
        self._size += len(line)
        self.bytes_written += len(line)
        path, _ = self._files[-1]
        self._files[-1] = (path, self._size)

    def flush(self) -> None:
        if self._current is not None:
            try:
                self._current.flush()
            except OSError:
                self.close()
                raise

    def close(self) -> None:
        """Flush and close the current file (the next write starts a new one)."""
        current, self._current = self._current, None
        if current is not None:
            # what could not be flushed is lost; the caller counted the write that failed
            with contextlib.suppress(OSError):
                current.close()

    def _start(self) -> None:
        self.close()
        now = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
        micros = int(now * 1e6) % 1_000_000
        path = self.directory / f"{self.prefix}-{stamp}.{micros:06d}Z-{next(self._sequence):06d}{SUFFIX}"
        self._current = open(path, "xb")  # noqa: SIM115 - kept open across writes, closed by close()
        self._size = 0
        self.files_started += 1
        self._files.append((path, 0))
        while len(self._files) > self.max_files:
            oldest, _ = self._files.pop(0)
            oldest.unlink(missing_ok=True)
            self.files_deleted += 1


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # gone meanwhile: it will not be deleted twice (unlink ignores a missing file)
        return 0
