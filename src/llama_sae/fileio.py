"""Atomic file writes: a temp file in the same directory, fsync, then rename over the target.

A reader (or a process restarted after ``kill -9``) sees either the old file or the whole new one,
never a half-written file. Journals (append-only JSONL, one record per line) are the exception that
grows in place: each append is fsynced, a reader skips a torn last line, and the file's owner cuts that
line off before appending again (:func:`append_jsonl`, :func:`read_jsonl`, :func:`cut_torn_tail`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from llama_sae.errors import UserError

# What atomic_writer names its temp files (.NAME.tmpPID), and what safetensors (0.7+) names its own beside them
# (.tmpXXXXXX, tempfile's): a kill mid-write leaves either.
TEMP_NAME = re.compile(r"^\..+\.tmp\d*$|^\.tmp[A-Za-z0-9_]{6}$")


LOCK_NAME = re.compile(r"^\..+\.lock$")  # what lock_output names its lock files: .NAME.lock


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temp file of :func:`atomic_writer` (left behind only by a kill mid-write), or the lock
    file of an output inside this directory (:func:`lock_output`; a killed run leaves it, unlocked)."""
    return bool(TEMP_NAME.match(name) or LOCK_NAME.match(name))


def sweep_temp_files(directory: str | os.PathLike, recursive: bool = False) -> int:
    """Remove the temp files a killed write left in ``directory`` (and below it); how many. Call it only where
    no other process writes (a run's own output directory, at its start)."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    found = [p for p in (directory.rglob(".*tmp*") if recursive else directory.glob(".*tmp*"))
             if p.is_file() and TEMP_NAME.match(p.name)]  # never a lock file: its run may still hold it
    for p in found:
        p.unlink(missing_ok=True)
    return len(found)


@contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside ``path``; on a clean exit it is fsynced and renamed to ``path``."""
    path = Path(path)
    tmp = _temp_path(path)
    encoding = None if "b" in mode else "utf-8"
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_file(path: str | os.PathLike, write: Callable[[Path], object],
                      before_replace: Callable[[], object] | None = None) -> None:
    """Write ``path`` atomically with a writer that takes a file name (safetensors' ``save_file``, which streams
    the tensors instead of building the file's bytes in memory): ``write(tmp)`` fills a temp file beside ``path``,
    which is then fsynced and renamed over it.

    The writer may put a new file at ``tmp`` instead of writing into it (safetensors 0.7+ writes its own temp
    file, mode 0600, and renames it): the fsync opens ``tmp`` again, and the file gets the mode every other
    file of ours gets (0666 less the umask). ``before_replace`` runs once the new file is complete, just before
    it replaces ``path`` (a failed write leaves everything as it was)."""
    path = Path(path)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:  # created as open() creates every file: its mode is the umask's
            mode = os.fstat(f.fileno()).st_mode & 0o777
        write(tmp)
        os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (bytes or text) to ``path`` atomically."""
    with atomic_writer(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def append_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Append ``records`` to the journal ``path``, one JSON line each, flushed and fsynced before returning."""
    path = Path(path)
    new = not path.exists()
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
    if new:
        _fsync_dir(path.parent)


def read_jsonl(path: str | os.PathLike, *, journal: bool = False, strict: bool = False) -> list[dict]:
    """The records of a JSON-lines file ([] if there is no file); lines that are not JSON objects are skipped,
    or, with ``strict`` (a file written whole, where such a line is damage), a UserError names the first.

    ``journal``: the file is an append-only journal (:func:`append_jsonl`), whose last line counts only with its
    newline: without it the append was cut short (a kill, a full disk, a power loss), even if what was written
    parses, and :func:`cut_torn_tail` will cut it off. Readers must agree with that, or a resume would trust a
    record its writer then removes."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")  # not splitlines(): U+2028, U+0085, ... may sit raw inside a record's strings
    if lines[-1] == "" or journal:
        lines.pop()  # the empty piece after the final newline, or a journal's torn last line
    out = []
    for number, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict):
            out.append(rec)
        elif strict:
            raise UserError(f"{path}, line {number}: not a JSON object ({line[:60]!r}): the file is damaged; fix or "
                            "delete that line, or write the file again")
    return out


def cut_torn_tail(path: str | os.PathLike) -> None:
    """Cut a journal's torn last line (no final newline: a kill mid-write) off the file, so that the next
    append starts a line of its own. Only the journal's writer may call this, never a reader."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        end = f.read().rfind(b"\n") + 1
        f.truncate(end)
        f.flush()
        os.fsync(f.fileno())



class OutputLock:
    """An exclusive lock on ``path`` (a ``.lock`` file), held until :meth:`release` or the process ends (kill -9
    included: the kernel drops it), so that two runs never write one output at once.

    ``OutputLock(path, what)`` raises UserError naming ``what`` when another process holds it. The lock file is
    removed on release while still held; a waiter that locked the removed file sees it is no longer the one at
    ``path`` and tries again, so two holders can never both believe they have it.
    """

    def __init__(self, path: str | os.PathLike, what: str):
        import fcntl

        self.path = Path(path)
        while True:
            f = open(self.path, "a+")  # noqa: SIM115 (kept open: the lock lasts until release)
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                raise UserError(f"another run is using {what} (it holds {self.path}): wait for it to end, or stop "
                                "it; a run killed with kill -9 releases the lock") from None
            try:
                same = os.fstat(f.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:  # released (and removed) between our open and our lock
                same = False
            if same:
                self._file = f
                return
            f.close()

    @property
    def held(self) -> bool:
        return not self._file.closed

    def release(self) -> None:
        """Remove the lock file (while still holding it), then release the lock."""
        if not self._file.closed:
            self.path.unlink(missing_ok=True)
            self._file.close()

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_output(out: str | os.PathLike, what: str) -> OutputLock:
    """Lock the output directory ``out`` for this run (:class:`OutputLock` on ``.NAME.lock`` beside it: inside, it
    would make a new output look non-empty). UserError naming ``what`` when another run writes it."""
    out = Path(out).expanduser().resolve()  # ("runs/..", "~/x", a symlink: the directory it names)
    out.parent.mkdir(parents=True, exist_ok=True)
    return OutputLock(out.parent / f".{out.name}.lock", what)
