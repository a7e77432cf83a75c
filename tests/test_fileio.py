"""Atomic writes: a failed write leaves the old file and no temp file behind."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama_sae.fileio import atomic_write_file


def test_atomic_write_file_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3)}, target)

    def fails(tmp):
        tmp.write_bytes(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_file(target, fails)
    assert torch.equal(load_file(target)["a"], torch.zeros(3))  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left
    atomic_write_file(target, lambda tmp: save_file({"a": torch.ones(3)}, tmp))
    assert torch.equal(load_file(target)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_a_writer_that_replaces_the_temp_file_gets_the_usual_mode_and_fsync(tmp_path, monkeypatch):
    """safetensors 0.7+ writes its own temp file (mode 0600) and renames it over the name it is given: the result
    still gets the mode open() gives (0666 less the umask, as atomic_write's files), and the fsync reaches the
    new file, not the one first created at that name."""
    import os

    from llama_sae.fileio import atomic_write

    atomic_write(tmp_path / "plain.json", "{}")
    usual = (tmp_path / "plain.json").stat().st_mode & 0o777
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), fsync(fd)))

    def replaces(tmp):
        other = tmp.with_name("elsewhere")
        other.write_bytes(b"the whole file")
        os.chmod(other, 0o600)
        os.replace(other, tmp)
        replaces.inode = os.stat(tmp).st_ino

    atomic_write_file(tmp_path / "w.bin", replaces)
    assert (tmp_path / "w.bin").read_bytes() == b"the whole file"
    assert (tmp_path / "w.bin").stat().st_mode & 0o777 == usual
    assert replaces.inode in synced
    atomic_write_file(tmp_path / "w.safetensors", lambda tmp: save_file({"a": torch.ones(3)}, tmp))
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == usual


def test_jsonl_lines_split_on_newlines_only(tmp_path):
    """append_jsonl writes non-ASCII raw (ensure_ascii=False): U+2028, U+2029 and U+0085 inside a record's strings
    are line breaks to str.splitlines() but not to JSON lines, so a reader must split on "\\n" alone."""
    from llama_sae.fileio import append_jsonl, read_jsonl

    path = tmp_path / "j.jsonl"
    texts = ["a\u2028b", "c\x85d", "e\u2029f", "plain"]
    append_jsonl(path, [{"text": t} for t in texts])
    assert [r["text"] for r in read_jsonl(path)] == texts
    assert [r["text"] for r in read_jsonl(path, journal=True)] == texts


def test_an_output_lock_is_held_once_even_across_its_removal(tmp_path):
    """Two runs never hold one output's lock: a second is refused by name; a waiter that locked the file the
    holder removed on release sees it is no longer the file at the path and takes the new one."""
    import fcntl
    import os

    from llama_sae.errors import UserError
    from llama_sae.fileio import OutputLock, lock_output

    first = lock_output(tmp_path / "out", "the store out")
    assert (tmp_path / ".out.lock").exists() and not (tmp_path / "out").exists()  # beside, not inside
    with pytest.raises(UserError, match=r"another run is using the store out \(it holds .*\.out\.lock\)"):
        lock_output(tmp_path / "out", "the store out")
    stale = open(tmp_path / ".out.lock", "a+")  # a waiter opened the file before the holder released it
    first.release()
    assert not (tmp_path / ".out.lock").exists()
    fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ... and locks the removed file
    with OutputLock(tmp_path / ".out.lock", "the store out") as again:  # a new run gets the one at the path
        assert again.held and os.fstat(stale.fileno()).st_nlink == 0
    stale.close()
    # a run killed with kill -9 leaves its lock file, unlocked: an output holding it is still "empty" for a rerun
    from llama_sae.errors import check_output_dir

    (tmp_path / "dash").mkdir()
    (tmp_path / "dash" / ".features.lock").write_text("")
    check_output_dir(tmp_path / "dash", "a dashboard")


def test_a_full_or_read_only_disk_is_one_line(monkeypatch, capsys):
    import errno
    import os

    import llama_sae.cli as cli

    for code, message in ((errno.ENOSPC, "error: the disk is full writing /data/out/shard.safetensors: free some "
                                         "space and run the same command again"),
                          (errno.EROFS, "error: the file system is read-only writing /data/out/shard.safetensors: "
                                        "choose an output on a writable disk")):
        def full(code=code, **kw):
            raise OSError(code, os.strerror(code), "/data/out/shard.safetensors")

        monkeypatch.setattr(cli, "app", full)
        with pytest.raises(SystemExit) as e:
            cli.main()
        err = " ".join(capsys.readouterr().err.split())
        assert e.value.code == 2 and err.startswith(message) and "please report" not in err


def test_torch_saves_wrapping_of_a_full_disk_is_one_line_too(monkeypatch, capsys):
    """torch.save on a full disk raises "unexpected pos", with the OSError as its context only."""
    import errno
    import os

    import llama_sae.cli as cli

    def full(**kw):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 8448 vs 8400") from None

    monkeypatch.setattr(cli, "app", full)
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = " ".join(capsys.readouterr().err.split())
    assert e.value.code == 2 and err.startswith("error: the disk is full: free some space") and "report" not in err


def test_a_sweep_removes_temp_files_never_a_lock(tmp_path):
    from llama_sae.fileio import lock_output, sweep_temp_files

    with lock_output(tmp_path / "tmp", "the output tmp"):  # a lock whose name holds "tmp"
        (tmp_path / ".tmpB9vsEF").write_bytes(b"safetensors' own temp file")
        (tmp_path / ".cfg.json.tmp4242").write_text("{")
        (tmp_path / ".tmpnotes.txt").write_text("a user's file")
        assert sweep_temp_files(tmp_path) == 2
        assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp.lock", ".tmpnotes.txt"]
