"""The request journal: what was asked, what was sent, what came back, on disk before and after each step.

One append-only JSONL file per task (``explain.journal.jsonl``, ``score.journal.jsonl``) in the features
directory. Every line is written and fsynced before the action it records happens:

    {"kind": "run", ...}                                  header: backend, model, features build, settings
    {"kind": "request", "custom_id", "prompt_hash", "latent", ...}   before the request is sent
    {"kind": "batch_pending", "local_id", "custom_ids", "at"}        before a batch is created
    {"kind": "batch", "local_id", "batch_id", "custom_ids"}          after the server gave it an id
    {"kind": "batch_done", "batch_id"} / {"kind": "batch_lost", "local_id"}
    {"kind": "result", "custom_id", "status", "text", "error", ...}  after the answer arrived
    {"kind": "chunk", "inputs", "custom_ids"}     after a chunk's requests all have their final result

So a run killed at any moment and started again knows which requests were answered (never re-sent),
which batches exist on the server (polled, not re-created; a batch whose creation was interrupted is
found again in the server's batch list), and which requests failed (re-submitted alone on request).
A torn last line (killed mid-write) is ignored. API keys are never passed to the journal.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_sae.errors import UserError
from llama_sae.fileio import OutputLock, append_jsonl, cut_torn_tail, read_jsonl

OK = "succeeded"
FAILED = ("errored", "canceled", "expired", "malformed", "missing")


@dataclass
class JournalState:
    """What a journal says, folded from its lines."""

    header: dict | None = None
    requests: dict[str, dict] = field(default_factory=dict)
    results: dict[str, dict] = field(default_factory=dict)
    pending_batches: dict[str, dict] = field(default_factory=dict)  # local_id -> pending record (no id yet)
    open_batches: dict[str, dict] = field(default_factory=dict)  # batch_id -> batch record (not done)
    known_batches: set[str] = field(default_factory=set)  # every server batch id this journal has recorded
    chunks: dict[str, list[str]] = field(default_factory=dict)  # a chunk's inputs key -> the custom_ids it asked for

    def apply(self, rec: dict) -> None:
        kind = rec.get("kind")
        if kind == "run" and self.header is None:
            self.header = rec
        elif kind == "request":
            self.requests[rec["custom_id"]] = rec
        elif kind == "result":
            self.results[rec["custom_id"]] = rec
        elif kind == "batch_pending":
            self.pending_batches[rec["local_id"]] = rec
        elif kind == "batch":
            self.pending_batches.pop(rec["local_id"], None)
            self.open_batches[rec["batch_id"]] = rec
            self.known_batches.add(rec["batch_id"])
        elif kind == "batch_done":
            self.open_batches.pop(rec["batch_id"], None)
        elif kind == "batch_lost":
            self.pending_batches.pop(rec["local_id"], None)
        elif kind == "chunk":
            self.chunks[rec["inputs"]] = rec["custom_ids"]

    def in_batch(self) -> set[str]:
        """custom_ids inside a batch that is created (or maybe created) and not finished."""
        ids = set()
        for rec in [*self.pending_batches.values(), *self.open_batches.values()]:
            ids.update(rec["custom_ids"])
        return ids

    def succeeded(self, custom_id: str) -> bool:
        return self.results.get(custom_id, {}).get("status") == OK


class Journal:
    """An append-only, fsynced JSONL journal (see the module docstring)."""

    def __init__(self, path: Path, header: dict, *, fresh: bool = False):
        self.path = Path(path)
        self.state = JournalState()
        self.lock = threading.Lock()
        self.listener: Callable[[Sequence[dict]], None] | None = None  # called with each append's records (locked)
        # two runs on one journal would both send every request (and create duplicate batches): held until close
        self._lock = OutputLock(self.path.with_name(self.path.name + ".lock"), str(self.path))
        self.set_aside: Path | None = None  # where an old journal went (fresh, or another run's that can go)
        self.set_aside_why = ""
        try:
            if self.path.exists():
                cut_torn_tail(self.path)  # a kill mid-write: the next record must start a line of its own
                for rec in read_jsonl(self.path, journal=True):
                    self.state.apply(rec)
                self.set_aside_why = "--fresh" if fresh else _check_header(self.path, self.state, header)
                if self.set_aside_why:
                    self.set_aside = self.path.with_name(f"{self.path.name}.{time.time_ns()}.old")
                    self.path.replace(self.set_aside)
                    self.state = JournalState()
            if self.state.header is None:
                self.append({"kind": "run", **header})
        except BaseException:
            self.close()  # e.g. another run's journal: no lock file is left behind
            raise

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the lock and remove its file (the state stays readable; appending after this is the caller's
        mistake)."""
        self._lock.release()

    def append(self, *records: dict) -> None:
        """Write records (one line each), flush and fsync, then fold them into the state."""
        if not records:
            return
        with self.lock:  # concurrent chat requests record their results from several threads
            append_jsonl(self.path, list(records))
            for r in records:
                self.state.apply(r)
            if self.listener is not None:
                self.listener(records)

    def record_result(self, custom_id: str, status: str, text: str | None = None, error: str | None = None,
                      **extra: Any) -> None:
        self.append({"kind": "result", "custom_id": custom_id, "status": status, "text": text, "error": error,
                     **extra})


# What makes a journal another run's. Prompt settings are not among them: a request's custom_id carries
# its prompt's hash, so changed settings only add new requests (an identical prompt is never re-sent).
# ``backend_identity`` (server URL, temperature, local checkpoint, the offline code digest) is compared only when the
# journal has it (older versions did not record it), except for the offline backend, whose old answers came from an
# older algorithm.
IDENTITY_KEYS = ("task", "backend", "model", "backend_identity", "features_build")


def _check_header(path: Path, state: JournalState, new: dict) -> str:
    """Why the journal at ``path`` is another run's that can be set aside: it holds no answer and no batch (a run
    whose every request failed, e.g. a wrong model name, or one declined at the cost prompt), or only offline
    answers, which cost nothing to make again; a UserError when it is another run's with answers or batches;
    "" when it is this run's."""
    old = state.header
    if old is None:
        return ""
    offline = new.get("backend") == "offline"
    diff = [k for k in IDENTITY_KEYS
            if old.get(k) != new.get(k) and (k in old or k != "backend_identity" or offline)]
    if not diff:
        return ""
    if offline and old.get("backend") == "offline":
        return "offline answers of another version or artifact, made again"
    if not any(r.get("status") == OK for r in state.results.values()) and not state.in_batch():
        return "another run's requests and no answer"
    what = ", ".join(f"{k} {old.get(k)!r} (now {new.get(k)!r})" for k in diff)
    raise UserError(f"the journal {path} belongs to another run ({what}): run with the same settings to "
                    "resume it, or pass --fresh to start a new journal (the old one is kept beside it)")
