"""The activation store: checksummed safetensors shards, a JSON manifest, running statistics, a shuffled loader.

A store is a directory:

    manifest.json                model and its fingerprint, hook points, d, dtype, corpus and its fingerprint,
                                 capture settings, the split rule, the shard list (rows, validation rows,
                                 bytes, sha256), token counts and the merged statistics
    rank00-000000.safetensors    shards of ``shard_rows`` rows (each rank's last one smaller) holding
                                 ``acts.<hook>`` [rows, d] (bf16 by default), ``sentence_id`` [rows] int64,
                                 ``position`` [rows] int32 (1 = the first token after BOS, which is never
                                 stored), ``token_id`` [rows] int32, and the shard's own statistics
                                 ``stats.<hook>.mean`` / ``.m2`` [d] and ``.norm`` [4] (float64)
    progress/rank00.json         while a capture runs: each rank's committed shards and its resume cursor

Writing (``StoreWriter``): rows are cut into shards in the caller's thread; a background thread serializes
each shard, writes it atomically (temp file, fsync, rename) and only then rewrites the rank's progress file
atomically, so a shard counts once it is complete, and ``kill -9`` at any moment loses at most the rows
not yet in a committed shard. Statistics (count, mean and M2 in float64, and the same for per-token L2
norms) are computed per shard during capture and merged with Chan's formula: no second pass.

Reading (``ActivationStore``): shards are memory-mapped, and each is checked against its sha256 the first time a
store object reads it (a shard changed on disk at the same size is an error, not silent data); ``loader`` fills a
buffer of whole shards, shuffles its rows (token level) and cuts batches; the order is a pure function of (seed,
epoch), so a loader started at ``start_batch=N`` continues exactly where a run that consumed N batches stopped. The
validation split is a fixed fraction of sentences: ``splitmix64(sentence_id) % 100 < val_percent``.

Example:
    >>> store = ActivationStore("runs/acts")
    >>> store.d, len(store), store.mean.shape                  # width, rows, [d]
    >>> for x in store.loader(4096, seed=0, split="train"):    # float32 [4096, d], forever
    ...     ...
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import json
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llama_sae.errors import UserError
from llama_sae.fileio import append_jsonl, atomic_write, atomic_write_json, cut_torn_tail, read_jsonl

__all__ = [
    "FORMAT",
    "ActStats",
    "ActivationStore",
    "HookStats",
    "NormStats",
    "StoreLoader",
    "StoreWriter",
    "VerifyReport",
    "background",
    "finalize_store",
    "is_val",
    "read_manifest",
    "read_progress",
    "shard_name",
    "store_info_table",
    "verify_store",
]

FORMAT = "llama-sae-activations"
VERSION = 1
MANIFEST = "manifest.json"
PROGRESS_DIR = "progress"
STORE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_SAFETENSORS_NP = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
                   "I64": np.int64, "I32": np.int32}
_SAFETENSORS_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}  # a store dtype's name in a header
_ROW_META_BYTES = 8 + 4 + 4  # sentence_id int64, position int32, token_id int32
_HASH_CHUNK = 8 << 20
_FULL_DISK = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def shard_name(rank: int, index: int) -> str:
    """File name of shard ``index`` written by ``rank``: ``rank00-000000.safetensors``."""
    return f"rank{rank:02d}-{index:06d}.safetensors"


def is_val(sentence_id: np.ndarray | Tensor, val_percent: int) -> np.ndarray:
    """Bool [n]: which rows belong to the validation split (a whole sentence is in one split).

    The rule is ``splitmix64(sentence_id) % 100 < val_percent``, recorded in the manifest.
    """
    x = np.asarray(sentence_id, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):  # the hash relies on wrap-around uint64 arithmetic
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(100)) < np.uint64(val_percent)


# ---------------------------------------------------------------------------------------------------
# Statistics


@dataclass
class ActStats:
    """Running statistics of rows of activations, in float64 on the CPU.

    Attributes:
        count: rows seen.
        mean, m2: per-dimension mean and sum of squared deviations [d].
        norm: per-token L2 norm statistics [4]: mean, M2, min, max.
    """

    count: int
    mean: Tensor
    m2: Tensor
    norm: Tensor

    @classmethod
    def empty(cls, d: int) -> ActStats:
        z = torch.zeros(d, dtype=torch.float64)
        return cls(0, z, z.clone(), torch.tensor([0.0, 0.0, math.inf, -math.inf], dtype=torch.float64))

    @classmethod
    def of(cls, x: Tensor) -> ActStats:
        """Statistics of x [n, d] (any float dtype or device), computed in float64 (Welford's var_mean)."""
        if x.shape[0] == 0:
            return cls.empty(x.shape[1])
        x64 = x.double()  # upcast island: sums of squares over many rows need float64
        var, mean = torch.var_mean(x64, dim=0, correction=0)  # [d], [d]
        m2 = var * x.shape[0]
        norms = torch.linalg.vector_norm(x64, dim=1)  # [n]
        nm = norms.mean()
        norm = torch.stack([nm, (norms - nm).square().sum(), norms.min(), norms.max()])
        return cls(x.shape[0], mean.cpu(), m2.cpu(), norm.cpu())

    def merged(self, other: ActStats) -> ActStats:
        """Chan et al.'s parallel update: the statistics of both sets of rows."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        na, nb = self.count, other.count
        n = na + nb
        delta = other.mean - self.mean
        mean = self.mean + delta * (nb / n)
        m2 = self.m2 + other.m2 + delta.square() * (na * nb / n)
        (ma, m2a, lo_a, hi_a), (mb, m2b, lo_b, hi_b) = self.norm.tolist(), other.norm.tolist()
        dn = mb - ma
        norm = torch.tensor([ma + dn * nb / n, m2a + m2b + dn * dn * na * nb / n, min(lo_a, lo_b), max(hi_a, hi_b)],
                            dtype=torch.float64)
        return ActStats(n, mean, m2, norm)

    def tensors(self, hook: str) -> dict[str, Tensor]:
        """The shard-file form: ``stats.<hook>.mean``, ``.m2`` [d] and ``.norm`` [4]."""
        return {f"stats.{hook}.mean": self.mean, f"stats.{hook}.m2": self.m2, f"stats.{hook}.norm": self.norm}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], hook: str, count: int) -> ActStats:
        return cls(count, tensors[f"stats.{hook}.mean"].clone(), tensors[f"stats.{hook}.m2"].clone(),
                   tensors[f"stats.{hook}.norm"].clone())

    def summary(self) -> dict[str, Any]:
        """The manifest form: count, mean and (population) variance per dimension, norm statistics."""
        n = max(self.count, 1)
        nm, nm2, lo, hi = self.norm.tolist()
        norm_var = nm2 / n
        return {"count": self.count, "mean": self.mean.tolist(), "var": (self.m2 / n).tolist(),
                "norm": {"mean": nm, "std": math.sqrt(norm_var), "sq_mean": norm_var + nm * nm,
                         "min": lo if self.count else 0.0, "max": hi if self.count else 0.0}}


@dataclass(frozen=True)
class NormStats:
    """Statistics of per-token L2 norms ``||x||`` over all stored rows of a hook.

    ``sq_mean`` is E||x||²: scaling inputs by ``sqrt(d / sq_mean)`` makes their mean squared norm d.
    """

    mean: float
    std: float
    sq_mean: float
    min: float
    max: float


@dataclass(frozen=True)
class HookStats:
    """Per-dimension statistics of one hook's stored activations (float32 [d] tensors)."""

    count: int
    mean: Tensor
    var: Tensor
    norm: NormStats

    @property
    def std(self) -> Tensor:
        return self.var.sqrt()


# ---------------------------------------------------------------------------------------------------
# Background work


def background(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run ``items`` in a daemon thread, ``depth`` results ahead; exceptions re-raise in the consumer.

    Closing the returned generator stops the thread after its current item and waits for it (so no thread
    is left inside a torch op when the interpreter exits).
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which re-raises it
            put((end, e))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=60)


# ---------------------------------------------------------------------------------------------------
# Files


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(byte offset of the data, header dict) of a safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or n > 100 << 20:
            raise ValueError(f"bad header length {n}")
        return 8 + n, json.loads(f.read(n))


def _mmap(path: Path, start: int, info: dict[str, Any]) -> Tensor:
    """A tensor of a safetensors file, memory-mapped (copy-on-write, so torch sees a writable array)."""
    begin, end = info["data_offsets"]
    arr = np.memmap(path, dtype=_SAFETENSORS_NP[info["dtype"]], mode="c", offset=start + begin,
                    shape=tuple(info["shape"]))
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if info["dtype"] == "BF16" else t


def _read_tensors(path: Path, names: list[str]) -> dict[str, Tensor]:
    start, header = _read_header(path)
    return {n: _mmap(path, start, header[n]) for n in names}


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a store directory, or a UserError saying what is wrong."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise UserError(f"{directory} is not an activation store (no {MANIFEST}): create one with llama-sae capture")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}): the store is damaged; capture it again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise UserError(f"{path} is not a version-{VERSION} {FORMAT} manifest: capture the store again with this "
                        "version of llama-sae")
    _check_manifest(path, manifest)
    return manifest


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


MANIFEST_CHECKS: dict[str, Callable[[Any], bool]] = {  # what capture writes there: anything else is damage
    "status": lambda v: isinstance(v, str),
    "hooks": lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(h, str) for h in v),
    "d": lambda v: _count(v) and v > 0,
    "dtype": lambda v: v in STORE_DTYPES,
    "model": lambda v: isinstance(v, dict) and isinstance(v.get("path"), str) and isinstance(v.get("fingerprint"), str),
    "corpus": lambda v: isinstance(v, dict) and isinstance(v.get("source"), str),
    "split": lambda v: isinstance(v, dict) and _count(v.get("val_percent")),
    "capture": lambda v: isinstance(v, dict) and _count(v.get("tokens")),
    "shards": lambda v: isinstance(v, list) and all(
        isinstance(e, dict) and isinstance(e.get("name"), str) and _count(e.get("rows")) and _count(e.get("bytes"))
        and isinstance(e.get("sha256"), str) and _count(e.get("val_rows")) and e["val_rows"] <= e["rows"]
        for e in v) and len({e["name"] for e in v}) == len(v),
}


def _check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """UserError naming the first field of ``manifest`` that is not what capture writes (a hand edit, damage)."""
    for key, ok in MANIFEST_CHECKS.items():
        if key == "shards" and key not in manifest and manifest.get("status") != "complete":
            continue  # while capturing, the shards are in the progress journals
        if not ok(manifest.get(key)):
            raise UserError(f"{path}: {key} is {str(manifest.get(key))[:60]!r}, not what llama-sae capture writes: "
                            "the store is damaged; capture it again (or restore manifest.json from a copy)")
    if manifest.get("status") == "complete":
        for key in ("rows", "val_rows"):  # the totals of the shards'
            total = sum(e[key] for e in manifest["shards"])
            if manifest.get(key) != total:
                raise UserError(f"{path}: {key} is {str(manifest.get(key))[:30]!r} but its shards hold {total:,}: "
                                "the store is damaged; restore manifest.json from a copy, or capture it again")


def progress_path(directory: str | os.PathLike, rank: int) -> Path:
    """A rank's progress journal: one JSON line per committed shard ({"shard": entry, "cursor": ...}), and
    {"finished": true, "cursor": ...} at the end. Appending a line per shard keeps a long capture's
    bookkeeping linear (rewriting one JSON file after every shard grew with the square of the shards)."""
    return Path(directory) / PROGRESS_DIR / f"rank{rank:02d}.jsonl"


def read_progress(directory: str | os.PathLike, rank: int) -> dict[str, Any] | None:
    """A rank's progress (committed shards, resume cursor, finished) or None if it has committed nothing."""
    path = progress_path(directory, rank)
    old = path.with_suffix(".json")  # the whole-file format of earlier versions: a capture they left unfinished
    if not path.exists():
        return json.loads(old.read_text()) if old.exists() else None
    progress = {"rank": rank, "shards": [], "cursor": None, "finished": False}
    for rec in read_jsonl(path, journal=True):
        if "shard" in rec:
            progress["shards"].append(rec["shard"])
        progress["finished"] = progress["finished"] or bool(rec.get("finished"))
        progress["cursor"] = rec.get("cursor", progress["cursor"])
    return progress


# ---------------------------------------------------------------------------------------------------
# Writing


@dataclass
class _Shard:
    """Rows gathered for one shard, on the CPU, and their statistics per hook. Parts captured on the CPU
    wait in ``unmeasured`` until the writer thread computes their statistics (off the forward's path);
    parts from a GPU are measured there, at once."""

    index: int
    start: dict[str, Any] | None = None
    rows: int = 0
    parts: list[dict[str, Tensor]] = field(default_factory=list)
    stats: dict[str, ActStats] = field(default_factory=dict)
    unmeasured: list[tuple[str, Tensor]] = field(default_factory=list)


class DaemonPool:
    """A few daemon threads that run submitted calls in submission order, each returning a Future.

    Unlike concurrent.futures' executor, whose threads the interpreter joins at exit, a write stalled on a dead
    disk cannot keep a failed run from exiting.
    """

    def __init__(self, workers: int, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._futures: list[Future] = []  # submitted and not yet done
        self._threads = [threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable, *args) -> Future:
        """Run ``fn(*args)`` on a pool thread; its Future."""
        future: Future = Future()
        self._futures = [f for f in self._futures if not f.done()] + [future]
        self._jobs.put((future, fn, args))
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Stop the threads after the calls already submitted (``cancel_futures``: cancel those not started)."""
        if cancel_futures:
            for future in self._futures:
                future.cancel()  # only those not started yet: a running one finishes
        for _ in self._threads:
            self._jobs.put(None)
        if wait:
            for t in self._threads:
                t.join()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue  # cancelled before it started
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 -- handed to whoever waits on the future
                future.set_exception(e)


GPU_WRITER_THREADS = 3  # shards written at once when a GPU computes the rows: one thread was a GPU capture's limit


class StoreWriter:
    """Cut rows into fixed-size shards and write them in the background (one writer per rank): ``workers``
    threads serialize, hash and write shard files side by side, and one committer thread records them in the
    progress journal strictly in order (a shard counts only from its journal line, so a kill leaves at most
    uncommitted files, which the next run deletes).

    Args:
        directory: the store directory (created by the caller).
        hooks: hook point names; ``add`` takes one [n, d] tensor per hook.
        d: the width of every hook's activations.
        rank: shards are named ``rank{rank:02d}-{index:06d}.safetensors``.
        shard_rows: rows per shard (the last one may be smaller).
        dtype: storage dtype of the activations.
        val_percent: the validation split's share of sentences (recorded per shard as ``val_rows``).
        queue_shards: full shards that may wait for the committer before ``add`` blocks (at most this many
            plus two are held at once: one being committed, one handed over while ``add`` waits).
        workers: threads that serialize and write shards at the same time (on a CPU capture one: the writer's
            statistics and serialization would compete with the forward for the same cores).

    ``add`` takes a ``tag``: a JSON-able dict with an integer ``skip``, the rows of the caller's unit (a
    capture batch) that precede the added rows. The progress file's ``cursor`` is the tag of the last
    committed row with ``skip`` advanced past it, so a restarted caller knows where to continue.
    """

    def __init__(self, directory: str | os.PathLike, hooks: list[str], d: int, *, rank: int = 0,
                 shard_rows: int, dtype: torch.dtype = torch.bfloat16, val_percent: int = 5,
                 queue_shards: int = 2, workers: int = 1):
        if workers < 1 or shard_rows < 1:  # no thread would ever write: every add would wait forever
            raise ValueError(f"StoreWriter needs workers >= 1 and shard_rows >= 1, got {workers} and {shard_rows}")
        self.directory, self.hooks, self.d, self.rank = Path(directory), list(hooks), d, rank
        self.shard_rows, self.dtype, self.val_percent = shard_rows, dtype, val_percent
        self._journal = progress_path(directory, rank)
        self._journal.parent.mkdir(exist_ok=True)
        cut_torn_tail(self._journal)  # a kill mid-append: the next line must start on a line of its own
        self.progress = read_progress(directory, rank) or {"rank": rank, "shards": [], "cursor": None,
                                                           "finished": False}
        old = self._journal.with_suffix(".json")
        if old.exists():  # an earlier version's progress file: carried over into the journal in one append
            if not self._journal.exists():  # (if both exist, a kill came between that append and the unlink)
                append_jsonl(self._journal, [{"shard": e} for e in self.progress["shards"]]
                             + [{"cursor": self.progress["cursor"], "finished": self.progress["finished"]}])
            old.unlink()
        self._cleanup()
        self._shard = self._new_shard(len(self.progress["shards"]))
        self._queue: queue.Queue = queue.Queue(maxsize=queue_shards)
        self._error: BaseException | None = None
        self._pool = DaemonPool(workers, "store-writer")
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    # -- caller's thread
    def add(self, acts: dict[str, Tensor], sentence_id: Tensor, position: Tensor, token_id: Tensor,
            tag: dict[str, Any]) -> None:
        """Append rows: acts {hook: [n, d]} (any device; cast to the storage dtype here) and [n] row ids. Rows
        already on the CPU in the storage dtype are kept without a copy until their shard is written: do not
        change them in place afterwards."""
        n, done = sentence_id.shape[0], 0
        while done < n:
            take = min(n - done, self.shard_rows - self._shard.rows)
            append_rows(self._shard, acts, sentence_id, position, token_id, tag, done, take, self.dtype)
            done += take
            if self._shard.rows == self.shard_rows:
                self._submit_shard(self._shard, {**tag, "skip": tag["skip"] + done})
                self._shard = self._new_shard(self._shard.index + 1)

    def finish(self, cursor: dict[str, Any]) -> dict[str, Any]:
        """Write the last, partial shard, mark this rank finished at ``cursor``; return the final progress."""
        s = self._shard
        if s.rows:
            self._submit_shard(s, cursor)
        self._submit(("finish", None, cursor))
        self._submit(None)
        self._thread.join()
        self._pool.shutdown()
        self._raise()
        return self.progress

    def abort(self) -> None:
        """Stop after the shards already queued (used when the caller fails), waiting at most about a minute: a
        write stalled longer is left running (its shard is not committed; the next run deletes its file)."""
        if self._thread.is_alive():
            try:
                self._queue.put(None, timeout=60)
                self._thread.join(timeout=60)
            except queue.Full:
                pass
        # a stuck committer is waiting on a stalled write: do not wait for it (files of shards never committed are
        # deleted by the next run)
        self._pool.shutdown(wait=not self._thread.is_alive(), cancel_futures=True)

    def _submit_shard(self, shard: _Shard, cursor: dict[str, Any]) -> None:
        """Start writing a full shard now; the committer records it after every shard before it."""
        self._raise()
        self._submit(("shard", self._pool.submit(self._write, shard), cursor))

    def _submit(self, job: tuple | None) -> None:
        while True:
            self._raise()
            try:
                self._queue.put(job, timeout=0.1)
                return
            except queue.Full:
                continue

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _new_shard(self, index: int) -> _Shard:
        return new_shard(index, self.hooks, self.d)

    def _cleanup(self) -> None:
        """Delete this rank's leftovers from a crash: temp files and shards never committed."""
        prefix = f"rank{self.rank:02d}-"
        committed = {e["name"] for e in self.progress["shards"]}
        for path in self.directory.iterdir():
            name = path.name
            stray_tmp = name.startswith(f".{prefix}") and ".tmp" in name
            orphan = name.startswith(prefix) and name.endswith(".safetensors") and name not in committed
            if stray_tmp or orphan:
                path.unlink()
        progress_dir = self.directory / PROGRESS_DIR
        if progress_dir.exists():
            for path in progress_dir.glob(f".rank{self.rank:02d}.json.tmp*"):
                path.unlink()

    # -- writer thread
    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is not None:
                continue  # drain, so the caller never blocks on a dead writer
            try:
                kind, written, cursor = job
                if kind == "shard":
                    self._commit(written, cursor)
                else:
                    append_jsonl(self._journal, [{"finished": True, "cursor": cursor}])
                    self.progress["finished"] = True
                    self.progress["cursor"] = cursor
            except OSError as e:
                self._error = self._disk_error(e)
            except BaseException as e:  # noqa: BLE001 -- re-raised in the caller's thread
                self._error = e

    def _write(self, shard: _Shard) -> dict[str, Any]:
        """(a pool thread) Serialize, hash and write one shard file; its manifest entry."""
        data, entry = serialize_shard(shard, self.hooks, self.rank, self.val_percent)
        _write_shard_file(self.directory / entry["name"], data)
        return entry

    def _commit(self, written: Future, cursor: dict[str, Any]) -> None:
        entry = written.result()  # this shard's file is on disk (the shards before it are committed)
        append_jsonl(self._journal, [{"shard": entry, "cursor": cursor}])  # the shard counts from here on
        self.progress["shards"].append(entry)
        self.progress["cursor"] = cursor

    def _disk_error(self, e: OSError) -> UserError:
        kept = len(self.progress["shards"])
        if e.errno in _FULL_DISK:
            mib = self.shard_rows * (self.d * len(self.hooks) * self.dtype.itemsize + _ROW_META_BYTES) / 2**20
            size = f"{mib:,.{0 if mib >= 10 else 2}f} MiB"
            return UserError(f"disk full while writing to {self.directory}: free space (each shard takes about "
                             f"{size}) and re-run the same command; the {kept} shard(s) already written "
                             "are kept and the capture resumes after them")
        return UserError(f"could not write to {self.directory} ({e.strerror or e}): fix that and re-run the same "
                         f"command; the {kept} shard(s) already written are kept and the capture resumes after them")


def append_rows(shard: _Shard, acts: dict[str, Tensor], sentence_id: Tensor, position: Tensor, token_id: Tensor,
                tag: dict[str, Any], start: int, take: int, dtype: torch.dtype) -> None:
    """Move rows start..start+take of a piece into ``shard`` (CPU, storage dtype) and merge their statistics."""
    if shard.start is None:
        shard.start = {**tag, "skip": tag["skip"] + start}
    rows = slice(start, start + take)
    for h in shard.stats:
        x = acts[h][rows].to(dtype)  # [take, d]
        if x.device.type == "cpu":
            shard.unmeasured.append((h, x))
        else:
            shard.stats[h] = shard.stats[h].merged(ActStats.of(x))
        shard.parts.append({f"acts.{h}": x.cpu()})
    shard.parts.append({"sentence_id": sentence_id[rows].to(torch.int64).cpu(),
                        "position": position[rows].to(torch.int32).cpu(),
                        "token_id": token_id[rows].to(torch.int32).cpu()})
    shard.rows += take


def serialize_shard(shard: _Shard, hooks: list[str], rank: int, val_percent: int) -> tuple[bytes, dict[str, Any]]:
    """The safetensors bytes of a shard and its manifest entry (rows, validation rows, bytes, sha256, ...)."""
    from safetensors.torch import save

    for h, x in shard.unmeasured:
        shard.stats[h] = shard.stats[h].merged(ActStats.of(x))
    shard.unmeasured.clear()
    keys = [f"acts.{h}" for h in hooks] + ["sentence_id", "position", "token_id"]
    tensors = {k: torch.cat([p[k] for p in shard.parts if k in p]) for k in keys}
    for h in hooks:
        tensors.update(shard.stats[h].tensors(h))
    name = shard_name(rank, shard.index)
    # One metadata key only: safetensors writes a metadata map in hash order, which differs between
    # processes, and a resumed or repaired shard must be byte-identical to the original.
    data = save(tensors, metadata={"format": FORMAT})
    sid = tensors["sentence_id"]
    entry = {"name": name, "rank": rank, "index": shard.index, "rows": shard.rows,
             "val_rows": int(is_val(sid.numpy(), val_percent).sum()), "bytes": len(data),
             "sha256": hashlib.sha256(data).hexdigest(), "start": shard.start,
             "sentences": [int(sid.min()), int(sid.max())]}
    return data, entry


def new_shard(index: int, hooks: list[str], d: int) -> _Shard:
    """An empty shard to fill with ``append_rows``."""
    return _Shard(index, stats={h: ActStats.empty(d) for h in hooks})


def _write_shard_file(path: Path, data: bytes) -> None:
    """Write one shard atomically (a seam for tests that simulate a full disk)."""
    atomic_write(path, data)


def _shard_stats(directory: Path, entry: dict[str, Any], hooks: list[str]) -> dict[str, ActStats]:
    names = [f"stats.{h}.{k}" for h in hooks for k in ("mean", "m2", "norm")]
    tensors = _read_tensors(directory / entry["name"], names)
    return {h: ActStats.from_tensors(tensors, h, entry["rows"]) for h in hooks}


def merge_shard_stats(directory: str | os.PathLike, shards: list[dict[str, Any]], hooks: list[str], d: int
                      ) -> dict[str, ActStats]:
    """Chan-merge the statistics stored in each shard file: those of every row of the store."""
    total = {h: ActStats.empty(d) for h in hooks}
    for entry in shards:
        for h, s in _shard_stats(Path(directory), entry, hooks).items():
            total[h] = total[h].merged(s)
    return total


def finalize_store(directory: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Merge every rank's progress into ``manifest.json`` (status "complete") and remove the progress files.

    ``fields`` (tokens, final step, ...) are added to the manifest. Returns the manifest.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    world = manifest["capture"]["world_size"]
    shards = []
    for rank in range(world):
        progress = read_progress(directory, rank)
        if progress is None or not progress["finished"]:
            raise UserError(f"rank {rank} of the capture into {directory} has not finished: re-run the same "
                            "capture command")
        shards += progress["shards"]
    stats = merge_shard_stats(directory, shards, manifest["hooks"], manifest["d"])
    manifest.update(fields)
    rows = sum(e["rows"] for e in shards)
    manifest.update(status="complete", shards=shards, rows=rows, val_rows=sum(e["val_rows"] for e in shards),
                    bytes=sum(e["bytes"] for e in shards), stats={h: s.summary() for h, s in stats.items()},
                    sentences=1 + max((e["sentences"][1] for e in shards), default=-1))
    if "tokens" in manifest:
        manifest["outliers_dropped"] = manifest["tokens"] - rows
    atomic_write_json(directory / MANIFEST, manifest)
    remove_progress(directory, world)
    return manifest


def remove_progress(directory: str | os.PathLike, world: int) -> None:
    """Delete a finished store's progress journals (folded into its manifest) and their folder."""
    directory = Path(directory)
    for rank in range(world):
        progress_path(directory, rank).unlink(missing_ok=True)
        progress_path(directory, rank).with_suffix(".json").unlink(missing_ok=True)
    if (directory / PROGRESS_DIR).exists() and not any((directory / PROGRESS_DIR).iterdir()):
        (directory / PROGRESS_DIR).rmdir()


# ---------------------------------------------------------------------------------------------------
# Reading


class ActivationStore:
    """A finished activation store, opened for reading.

    Args:
        path: the store directory.

    Attributes:
        manifest: the parsed ``manifest.json``.
        hooks: hook point names; ``d``: activation width; ``dtype``: storage dtype.

    Raises:
        UserError: no manifest, an unfinished capture, or a shard that is missing or has the wrong size.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if self.manifest["status"] != "complete":
            raise UserError(f"the capture into {self.path} has not finished: re-run the same llama-sae capture "
                            "command to complete it")
        self.hooks: list[str] = self.manifest["hooks"]
        self.d: int = self.manifest["d"]
        self.dtype: torch.dtype = STORE_DTYPES[self.manifest["dtype"]]
        self.shards: list[dict[str, Any]] = self.manifest["shards"]
        self.val_percent: int = self.manifest["split"]["val_percent"]
        self._verified: set[int] = set()  # shards whose sha256 this object has checked (see verify_shards)
        self.verify_reads = True  # False: reads trust the shards (the other ranks of a torchrun run: rank 0 checks)
        self._verify_lock = threading.Lock()
        for entry in self.shards:
            self._check_file(entry)

    def _fix(self) -> str:
        return (f"run `llama-sae store verify {self.path}`, then re-run the capture command with --repair (one "
                "process, even for a torchrun store)")

    def _check_file(self, entry: dict[str, Any]) -> None:
        path = self.path / entry["name"]
        fix = self._fix()
        if not path.exists():
            raise UserError(f"shard {entry['name']} of store {self.path} is missing: {fix}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise UserError(f"shard {entry['name']} of store {self.path} has {size:,} bytes, the manifest says "
                            f"{entry['bytes']:,} (truncated or replaced): {fix}")

    def __len__(self) -> int:
        """Stored rows (tokens), both splits."""
        return self.manifest["rows"]

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.path)!r}, hooks={self.hooks}, d={self.d}, rows={len(self):,})"

    def hook(self, hook: str | None = None) -> str:
        """``hook`` checked against the store, or the store's only hook when None."""
        if hook is None:
            if len(self.hooks) > 1:
                raise UserError(f"store {self.path} holds {len(self.hooks)} hook points ({', '.join(self.hooks)}): "
                                "name one with --hook (in Python: hook=... or store.stats(hook))")
            return self.hooks[0]
        if hook not in self.hooks:
            from llama_sae.llama.model import parse_hook_name

            held = f"store {self.path} holds {', '.join(self.hooks)}"
            try:  # a name no model has is not sent to capture
                parse_hook_name(hook)
            except UserError as e:
                raise UserError(f"{e} ({held})") from None
            raise UserError(f"{held}, not {hook}: capture {hook} with llama-sae capture --hook {hook}")
        return hook

    def stats(self, hook: str | None = None) -> HookStats:
        """Per-dimension mean and variance and the norm statistics of a hook (all stored rows)."""
        s = self.manifest["stats"][self.hook(hook)]
        return HookStats(s["count"], torch.tensor(s["mean"], dtype=torch.float32),
                         torch.tensor(s["var"], dtype=torch.float32), NormStats(**s["norm"]))

    @property
    def mean(self) -> Tensor:
        """float32 [d]: per-dimension mean of the (only) hook."""
        return self.stats().mean

    @property
    def std(self) -> Tensor:
        """float32 [d]: per-dimension standard deviation (population) of the (only) hook."""
        return self.stats().std

    @property
    def norm_stats(self) -> NormStats:
        """Per-token norm statistics of the (only) hook."""
        return self.stats().norm

    def rows(self, split: str = "all") -> int:
        """Rows in a split: "train", "val" or "all"."""
        return sum(_split_rows(e, split) for e in self.shards)

    def verify_shards(self, indices: list[int]) -> None:
        """Check the sha256 of the shards ``indices`` against the manifest, each once per store object (the
        loader calls this before a shard's first read): a shard changed on disk since its capture, at the same
        size (bit rot, a file copied over it), is a one-line UserError instead of silent training on it. Up to
        four shards hash at once (hashlib releases the GIL): ~1 GB/s per core, over whole shards (every hook's
        rows, though a loader reads one hook's). Nothing when ``verify_reads`` is False."""
        if not self.verify_reads:
            return
        with self._verify_lock:
            todo = [i for i in dict.fromkeys(indices) if i not in self._verified]
            if not todo:
                return
            workers = min(len(todo), 4, os.cpu_count() or 1)
            if workers > 1:
                with ThreadPoolExecutor(workers) as pool:
                    digests = list(pool.map(lambda i: _hash_file(self.path / self.shards[i]["name"]), todo))
            else:
                digests = [_hash_file(self.path / self.shards[i]["name"]) for i in todo]
            for i, digest in zip(todo, digests):
                entry = self.shards[i]
                if digest != entry["sha256"]:
                    raise UserError(f"shard {entry['name']} of store {self.path} does not match its checksum (sha256 "
                                    f"{digest[:12]}…, manifest {entry['sha256'][:12]}…): it changed on disk since "
                                    f"the capture; {self._fix()}")
                self._verified.add(i)

    def read(self, index: int, hook: str | None = None, *, verify: bool = True) -> dict[str, Tensor]:
        """Shard ``index`` memory-mapped: acts [rows, d] (storage dtype), sentence_id, position, token_id.
        ``verify``: check its sha256 first, the first time this object reads it (:meth:`verify_shards`)."""
        if verify:
            self.verify_shards([index])
        entry = self.shards[index]
        names = [f"acts.{self.hook(hook)}", "sentence_id", "position", "token_id"]
        try:
            t = _read_tensors(self.path / entry["name"], names)
        except KeyError as e:
            raise UserError(f"shard {entry['name']} of the store {self.path} holds no tensor {e.args[0]} where the "
                            f"manifest says it does: the manifest or the shard is damaged (`llama-sae store verify "
                            f"{self.path}` lists every problem)") from None
        t["acts"] = t.pop(names[0])
        rows = entry["rows"]
        if t["acts"].dtype != self.dtype:
            raise UserError(f"shard {entry['name']} of the store {self.path} holds {t['acts'].dtype} activations where "
                            f"the manifest says {self.dtype}: the manifest or the shard is damaged (`llama-sae store "
                            f"verify {self.path}` lists every problem)")
        if tuple(t["acts"].shape) != (rows, self.d) or any(t[k].shape != (rows,) for k in names[1:]):
            raise UserError(f"shard {entry['name']} of the store {self.path} holds {list(t['acts'].shape)} activations "
                            f"where the manifest says [{rows}, {self.d}]: the manifest or the shard is damaged "
                            f"(`llama-sae store verify {self.path}` lists every problem)")
        return t

    def loader(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, split: str = "train",
               hook: str | None = None, start_batch: int = 0, epochs: int | None = None,
               dtype: torch.dtype = torch.float32, drop_last: bool = True, buffer_rows: int | None = None
               ) -> StoreLoader:
        """Batches [batch_size, d] of one hook's rows; see ``StoreLoader``."""
        return StoreLoader(self, batch_size, shuffle=shuffle, seed=seed, split=split, hook=hook,
                           start_batch=start_batch, epochs=epochs, dtype=dtype, drop_last=drop_last,
                           buffer_rows=buffer_rows)


def _split_rows(entry: dict[str, Any], split: str) -> int:
    return {"all": entry["rows"], "val": entry["val_rows"], "train": entry["rows"] - entry["val_rows"]}[split]


class StoreLoader:
    """Shuffled batches of stored activations, deterministic from (seed, epoch), resumable by batch index.

    Each epoch visits the split's rows once: shards in a random order are grouped into buffers of about
    ``buffer_rows`` rows; a buffer's rows are shuffled together (token level) and cut into batches (a batch
    may span two buffers). Batch ``i`` of a (seed, split, batch_size) sequence is always the same rows, so
    ``start_batch=N`` continues exactly after N consumed batches. The next buffer is read from the memory
    maps in a background thread, so up to three buffers are in memory (one in use, one ready, one being read).

    Args:
        store: an ``ActivationStore``.
        batch_size: rows per batch.
        shuffle: False reads shards and rows in stored order (sentence order within a rank's shards).
        seed: the shuffle seed (a non-negative integer).
        split: "train", "val" (or "validation") or "all"; the validation split is a fixed set of sentences
            (see ``is_val``).
        hook: which hook's activations (None: the store's only hook).
        start_batch: index of the first batch to yield (batches 0..start_batch-1 are skipped without reading).
        epochs: passes over the split; None loops forever, reshuffling every epoch.
        dtype: dtype of the yielded batches.
        drop_last: drop each epoch's last partial batch (True) or yield it with fewer rows (False).
        buffer_rows: rows per shuffle buffer; default about 256 MiB of stored rows, at least 16 batches.

    Attributes:
        rows: rows of the split; batches_per_epoch; total_batches (None when epochs is None).
    """

    def __init__(self, store: ActivationStore, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 split: str = "train", hook: str | None = None, start_batch: int = 0, epochs: int | None = None,
                 dtype: torch.dtype = torch.float32, drop_last: bool = True, buffer_rows: int | None = None):
        split = {"validation": "val"}.get(split, split)
        if split not in ("train", "val", "all"):
            raise UserError(f"split {split!r} is unknown: use train, val (or validation) or all")
        if batch_size <= 0 or start_batch < 0 or seed < 0 or (epochs is not None and epochs <= 0):
            raise ValueError(f"need batch_size > 0, start_batch >= 0, seed >= 0, epochs > 0 or None; got "
                             f"{batch_size}, {start_batch}, {seed}, {epochs}")
        self.store, self.hook = store, store.hook(hook)
        self.batch_size, self.shuffle, self.seed, self.split = batch_size, shuffle, seed, split
        self.start_batch, self.epochs, self.dtype, self.drop_last = start_batch, epochs, dtype, drop_last
        self.counts = [_split_rows(e, split) for e in store.shards]
        self.rows = sum(self.counts)
        per_epoch = self.rows // batch_size if drop_last else -(-self.rows // batch_size)
        if self.rows == 0:
            raise UserError(f"split {split!r} of store {store.path} holds no rows: capture with --val-percent N "
                            "(the default, 5) and enough sentences that some land in it")
        if per_epoch == 0:
            raise UserError(f"split {split!r} of store {store.path} has {self.rows} rows, fewer than one batch of "
                            f"{batch_size}: use a smaller batch or capture more tokens")
        self.batches_per_epoch = per_epoch
        self.total_batches = None if epochs is None else epochs * per_epoch
        row_bytes = store.d * store.dtype.itemsize
        self.buffer_rows = buffer_rows or max(16 * batch_size, (256 << 20) // row_bytes)

    def __iter__(self) -> Iterator[Tensor]:
        """Yield batches [batch_size, d] (the last of an epoch smaller when drop_last=False)."""
        if self.total_batches is not None and self.start_batch >= self.total_batches:
            return
        i = self.start_batch
        epoch, j = divmod(i, self.batches_per_epoch)
        buffers = background(self._buffers(epoch, j * self.batch_size), depth=1)
        pending: list[Tensor] = []
        have = 0
        try:
            for buf in buffers:
                if buf is None:  # end of an epoch
                    if have and not self.drop_last:
                        yield self._batch(pending)
                        i += 1
                    pending, have = [], 0
                    continue
                off = 0
                while off < buf.shape[0]:
                    take = min(self.batch_size - have, buf.shape[0] - off)
                    pending.append(buf[off:off + take])
                    have, off = have + take, off + take
                    if have == self.batch_size:
                        yield self._batch(pending)
                        i += 1
                        pending, have = [], 0
                        if self.total_batches is not None and i >= self.total_batches:
                            return
        finally:
            buffers.close()

    def _batch(self, parts: list[Tensor]) -> Tensor:
        x = parts[0] if len(parts) == 1 else torch.cat(parts)  # [batch, d]
        return x.to(self.dtype)

    def _groups(self, epoch: int) -> list[list[int]]:
        """Shard indices per shuffle buffer, in this epoch's order."""
        n = len(self.counts)
        order = np.random.default_rng([self.seed, epoch, 0]).permutation(n) if self.shuffle else np.arange(n)
        groups: list[list[int]] = []
        rows = self.buffer_rows
        for s in order.tolist():
            if self.counts[s] == 0:
                continue
            if rows + self.counts[s] > self.buffer_rows and rows > 0:
                groups.append([])
                rows = 0
            groups[-1].append(s)
            rows += self.counts[s]
        return groups

    def _buffers(self, epoch: int, start_row: int) -> Iterator[Tensor | None]:
        """Shuffled buffers from stream row ``start_row`` of ``epoch`` on; None marks each epoch's end."""
        while self.epochs is None or epoch < self.epochs:
            groups = self._groups(epoch)
            ends = np.cumsum([sum(self.counts[s] for s in g) for g in groups]).tolist()
            first = bisect.bisect_right(ends, start_row)
            for g in range(first, len(groups)):
                buf = self._build(epoch, g, groups[g])
                skip = start_row - (ends[g - 1] if g else 0) if g == first else 0
                yield buf[skip:]
            yield None
            epoch, start_row = epoch + 1, 0

    def _build(self, epoch: int, g: int, shards: list[int]) -> Tensor:
        """The rows of ``shards`` in the split, shuffled together: [rows, d] in the storage dtype."""
        total = sum(self.counts[s] for s in shards)
        out = torch.empty(total, self.store.d, dtype=self.store.dtype)
        dest = (torch.from_numpy(np.random.default_rng([self.seed, epoch, 1, g]).permutation(total))
                if self.shuffle else torch.arange(total))
        off = 0
        self.store.verify_shards(shards)  # the group's shards hash in parallel, once per store object
        for s in shards:
            t = self.store.read(s, self.hook)
            acts = t["acts"]
            if self.split != "all":
                keep = is_val(t["sentence_id"].numpy(), self.store.val_percent)
                keep = keep if self.split == "val" else ~keep
                acts = acts[torch.from_numpy(np.flatnonzero(keep))]
            if acts.shape[0] != self.counts[s]:
                name = self.store.shards[s]["name"]
                raise UserError(f"shard {name} of the store {self.store.path} holds {acts.shape[0]:,} rows of the "
                                f"{self.split} split where the manifest says {self.counts[s]:,}: the manifest is "
                                f"damaged (`llama-sae store verify {self.store.path}` lists every problem)")
            out.index_copy_(0, dest[off:off + acts.shape[0]], acts)
            off += acts.shape[0]
        return out


# ---------------------------------------------------------------------------------------------------
# Verify and info


@dataclass
class VerifyReport:
    """What ``verify_store`` found: ``bad`` lists shard names that failed, ``problems`` says why."""

    path: Path
    shards: int = 0
    bytes: int = 0
    bad: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # of ``bad``: checksum right, the manifest disagrees
    leftovers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _store_shards(directory: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Committed shards: the manifest's, or the progress files' while a capture is unfinished."""
    if manifest["status"] == "complete":
        return manifest["shards"]
    shards = []
    for rank in range(manifest["capture"]["world_size"]):
        shards += (read_progress(directory, rank) or {"shards": []})["shards"]
    return shards


def verify_store(path: str | os.PathLike, *, on_shard: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Re-hash every committed shard and check its layout against the manifest.

    Args:
        path: the store directory (finished or not).
        on_shard: called after each shard with (its bytes, all shards' bytes), for progress bars.

    Returns:
        A VerifyReport: ``bad`` shard names, one ``problems`` line each (naming the shard and the fix), and
        ``leftovers`` (temp files or unlisted shards from a crash; harmless, a resumed capture removes them).
    """
    directory = Path(path)
    manifest = read_manifest(directory)
    report = VerifyReport(directory)
    shards = _store_shards(directory, manifest)
    total = sum(e["bytes"] for e in shards)
    fix = ("re-run the capture command with --repair (one process, even for a torchrun store) to recompute it"
           if manifest["status"] == "complete" else  # --repair needs a finished store; a resume trusts its shards
           "the capture is unfinished, so it cannot be repaired: restore the shard from a copy, or capture again "
           "into a new --out")
    for entry in shards:
        name, file = entry["name"], directory / entry["name"]
        problem = None
        if not file.exists():
            problem = f"{name}: missing; {fix}"
        elif file.stat().st_size != entry["bytes"]:
            problem = f"{name}: {file.stat().st_size:,} bytes, expected {entry['bytes']:,}; {fix}"
        else:
            digest = _hash_file(file)
            if digest != entry["sha256"]:
                problem = f"{name}: checksum mismatch (sha256 {digest[:12]}…, manifest {entry['sha256'][:12]}…); {fix}"
            else:
                problem = _layout_problem(file, entry, manifest)
                if problem:
                    report.mismatched.append(name)
        report.shards += 1
        report.bytes += entry["bytes"]
        if problem:
            report.bad.append(name)
            report.problems.append(problem)
        if on_shard is not None:
            on_shard(entry["bytes"], total)
    listed = {e["name"] for e in shards}
    for p in sorted(directory.iterdir()):
        if (p.name.endswith(".safetensors") and p.name not in listed) or (p.name.startswith(".") and ".tmp" in p.name):
            report.leftovers.append(p.name)
    return report


def _layout_problem(file: Path, entry: dict[str, Any], manifest: dict[str, Any]) -> str | None:
    """A shard whose checksum matches but whose tensors disagree with the manifest: the manifest was edited (the
    file is what capture wrote, so --repair must not cut it to fit)."""
    fix = "manifest.json was edited or damaged: restore it from a copy, or capture the store again into a new --out"
    try:
        start, header = _read_header(file)
    except (ValueError, json.JSONDecodeError):
        return f"{entry['name']}: not a safetensors file"
    rows, d = entry["rows"], manifest["d"]
    expect = {f"acts.{h}": [rows, d] for h in manifest["hooks"]} | {k: [rows] for k in ("sentence_id", "position",
                                                                                            "token_id")}
    for key, shape in expect.items():
        if key not in header or header[key]["shape"] != shape:
            found = "missing" if key not in header else f"of shape {header[key]['shape']}"
            return f"{entry['name']}: tensor {key} is {found} where the manifest says {shape}; {fix}"
        if key.startswith("acts.") and header[key]["dtype"] != _SAFETENSORS_DTYPE[manifest["dtype"]]:
            return (f"{entry['name']}: tensor {key} is {header[key]['dtype']} where the manifest says "
                    f"{manifest['dtype']}; {fix}")
    val = int(is_val(_mmap(file, start, header["sentence_id"]).numpy(), manifest["split"]["val_percent"]).sum())
    if val != entry["val_rows"]:
        return f"{entry['name']}: {val:,} validation rows where the manifest says {entry['val_rows']:,}; {fix}"
    return None


def store_info(path: str | os.PathLike) -> dict[str, Any]:
    """A summary of a store (finished or still capturing) for ``llama-sae store info``."""
    directory = Path(path)
    manifest = read_manifest(directory)
    shards = _store_shards(directory, manifest)
    rows = sum(e["rows"] for e in shards)
    size = sum(e["bytes"] for e in shards)
    hooks, d = manifest["hooks"], manifest["d"]
    itemsize = STORE_DTYPES[manifest["dtype"]].itemsize
    info = {
        "path": str(directory), "status": manifest["status"], "model": manifest["model"]["path"],
        "model fingerprint": manifest["model"]["fingerprint"][:16], "hooks": ", ".join(hooks), "d": d,
        "dtype": manifest["dtype"], "rows": f"{rows:,}", "target tokens": f"{manifest['capture']['tokens']:,}",
        "shards": len(shards), "bytes": f"{size:,}",
        "bytes per token": f"{size / max(rows, 1):,.1f} (activations alone: {itemsize * d * len(hooks):,})",
        "corpus": manifest["corpus"]["source"], "corpus fingerprint": manifest["corpus"]["fingerprint"][:16],
        "validation": f"{manifest['split']['val_percent']}% of sentences",
    }
    if manifest["status"] == "complete":
        info["tokens"] = f"{manifest['tokens']:,}"
        info["outliers dropped"] = f"{manifest['outliers_dropped']:,}"
        info["validation"] += f" ({manifest['val_rows']:,} rows)"
        for h in hooks:
            s = manifest["stats"][h]
            info[f"{h} norm"] = (f"mean {s['norm']['mean']:.4g}, std {s['norm']['std']:.4g}, "
                                 f"max {s['norm']['max']:.4g}; mean |mean| "
                                 f"{np.abs(s['mean']).mean():.4g}, mean std {np.sqrt(s['var']).mean():.4g}")
    wrong = [e["name"] for e in shards if not (directory / e["name"]).is_file()
             or (directory / e["name"]).stat().st_size != e["bytes"]]
    info["shard files"] = (f"{len(wrong)} missing or of the wrong size, first {wrong[0]}: run `llama-sae store "
                           "verify` (and capture --repair)" if wrong else
                           "all there at their sizes (checksums: `llama-sae store verify`)")
    return info


def store_info_table(path: str | os.PathLike) -> Any:
    """``store_info`` as a rich Table."""
    from rich.table import Table

    table = Table(title=f"activation store {path}", show_header=False)
    for key, value in store_info(path).items():
        table.add_row(key, str(value))
    return table
