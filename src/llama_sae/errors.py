"""Errors shown to users as one line, with the fix."""

from __future__ import annotations

import re
from collections.abc import Collection


class UserError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's first line of text (its class name if it has none; terminal colour codes removed), cut
    at a word before ``limit`` characters: the part of a library's error that fits in a one-line UserError."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0]
    return cut.rstrip(" ,;:") + " …"


def check_device(device: str) -> str:
    """``device`` if torch can run on it here, else a UserError naming the fix (no CUDA traceback from deep inside)."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from e  # e.g. "gpu", "cuda:x"
    if dev.type not in ("cpu", "cuda", "mps"):  # xpu, hip, meta, ...: torch parses them, nothing here runs there
        raise UserError(f"device {device!r} is not supported: use cpu, cuda, cuda:N or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r}: this torch {torch.__version__} sees no CUDA GPU; use --device cpu, "
                            "or install a CUDA build of torch on a machine with a GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                            f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r}: this machine has no Apple GPU; use --device cpu")
    return device


PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def path_error_message(e: OSError) -> str:
    """One line for an OSError about a path (the CLI's safety net for paths no check caught earlier)."""
    name = e.filename2 if getattr(e, "filename2", None) is not None else e.filename  # a rename: its destination
    name = name if name is not None else "a path"
    if isinstance(e, IsADirectoryError):
        return f"{name} is a directory: pass a file path there"
    if isinstance(e, NotADirectoryError):
        return f"{name}: part of this path is a file, not a directory: pass a directory path there"
    if isinstance(e, FileExistsError):
        return f"{name} already exists and is in the way: choose another path"
    if isinstance(e, FileNotFoundError):
        return f"{name} does not exist: check the path (a new file's directory must exist)"
    return f"no permission for {name}: choose a path you can read and write"


def check_output_dir(path, what: str, *, ours: Collection[str] = (), overwrite: bool | None = None) -> None:
    """UserError before any work is done if ``what`` cannot be written into the directory ``path``: it is a
    file, or it holds an entry that is not one of ``ours`` (another SAE, a store...). ``overwrite``: None when
    the command has no --overwrite; True lets a non-empty directory pass."""
    from pathlib import Path

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file: pass a directory for {what}")
    if not path.is_dir() or overwrite:
        return
    from llama_sae.fileio import is_temp_name

    other = sorted(p.name for p in path.iterdir() if p.name not in ours and not is_temp_name(p.name))
    if other:
        why = f"{other[0]}, which is not part of {what}" if ours else other[0]  # ours: a resumable output
        raise UserError(f"{path} is not empty: it holds {why}: choose an empty or new directory for {what}"
                        f"{'' if overwrite is None else ', or pass --overwrite'}")


def check_output_file(path) -> None:
    """UserError before any work is done if a result cannot be written to the file ``path``."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory: pass a file path, e.g. {path / 'report.json'}")
    if path.parent.exists() and not path.parent.is_dir():
        raise UserError(f"cannot write {path}: {path.parent} is a file, not a directory")
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: its directory {path.parent} does not exist (create it first)")


def short_hash(value):
    """A sha256 hex digest shortened for a message (12 digits and an ellipsis); anything else as it is."""
    return value[:12] + "…" if isinstance(value, str) and len(value) == 64 else value
