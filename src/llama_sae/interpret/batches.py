"""Batch APIs: Anthropic Message Batches and the OpenAI Batch API, resumable through the journal.

One loop for both (``BatchBackend.run``):

1. Reconcile: a batch recorded as pending (creation may or may not have reached the server before a
   kill) is looked up in the server's batch list; found, it is adopted, else its requests are free again.
   Neither SDK makes creation idempotent, hence the record before and after ``create``.
2. Submit the requests that are in no batch, in chunks, each recorded before and after creation.
3. Poll the open batches; when one has ended, download its results raw (to ``batches/ID.jsonl``, atomically,
   retried if the download is cut), parse them line by line, and record one result per request:
   succeeded, errored, canceled, expired, malformed (a line that is not valid), or missing (no line).
   A failed request is re-submitted alone by the next ``--retry-failed`` run.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama_sae.errors import UserError
from llama_sae.fileio import atomic_write
from llama_sae.interpret.backends import (
    Backend,
    Request,
    env_key,
    openai_limits,
    redact,
    sdk,
    url_for_record,
)
from llama_sae.interpret.journal import Journal

Outcome = tuple[str, str | None, str | None]  # (status, text, error)


class BatchBackend(Backend):
    """Shared submit / reconcile / poll / download loop (see the module docstring)."""

    batch_api = True
    paid = True
    key_variable = ""  # the environment variable its key comes from

    def __init__(self, model: str, *, results_dir: Path, temperature: float = 0.0, max_batch: int = 10_000,
                 poll_interval: float = 30.0, wait: bool = True, download_attempts: int = 3, timeout: float = 120.0):
        self.model, self.temperature, self.timeout = model, temperature, timeout
        self.results_dir = Path(results_dir)
        self.max_batch, self.poll_interval, self.wait = max_batch, poll_interval, wait
        self.download_attempts = download_attempts

    def identity(self) -> dict[str, Any]:
        return {"base_url": url_for_record(str(self.client.base_url)),  # the batch ids live there
                "temperature": self.temperature}

    # ---- protocol-specific
    @abstractmethod
    def create(self, requests: Sequence[Request], local_id: str) -> str:
        """Create a batch on the server; its id."""

    @abstractmethod
    def ended(self, batch_id: str) -> bool:
        """Whether the batch has finished processing."""

    @abstractmethod
    def download(self, batch_id: str) -> bytes:
        """The raw results of an ended batch (JSONL bytes)."""

    @abstractmethod
    def parse_line(self, rec: dict) -> tuple[str, Outcome] | None:
        """(custom_id, outcome) of one results line, or None when the line is not in the protocol's shape."""

    @abstractmethod
    def find(self, pending: dict, known: set[str]) -> str | None:
        """The id of the server batch created for a pending record, if the server has one (never one of
        ``known``, the batches the journal already holds)."""

    def missing_reason(self, batch_id: str) -> str | None:
        """Why a request has no line in the results (e.g. the whole batch failed), if the server says."""
        return None

    # ---- the shared loop
    def run(self, requests: Sequence[Request], journal: Journal) -> None:
        self.submit(requests, journal)
        self.collect(journal)

    def reconcile(self, journal: Journal) -> None:
        """Look up each batch recorded as pending (its creation interrupted) on the server: adopted if found,
        else its requests are free again. Run before the cost estimate, which counts pending requests as sent."""
        st = journal.state
        for local_id, pending in list(st.pending_batches.items()):
            batch_id = self._server("look up an interrupted batch", self.find, pending, st.known_batches)
            if batch_id is None:
                journal.append({"kind": "batch_lost", "local_id": local_id})
            else:
                journal.append({"kind": "batch", "local_id": local_id, "batch_id": batch_id,
                                "custom_ids": pending["custom_ids"], "reconciled": True})

    def submit(self, requests: Sequence[Request], journal: Journal) -> None:
        """Reconcile interrupted creations, then create batches for the requests that are in none."""
        st = journal.state
        self.reconcile(journal)
        busy = st.in_batch()
        todo = [r for r in requests if r.custom_id not in busy]
        for i in range(0, len(todo), self.max_batch):
            chunk = todo[i:i + self.max_batch]
            local_id = uuid.uuid4().hex[:12]
            ids = [r.custom_id for r in chunk]
            journal.append({"kind": "batch_pending", "local_id": local_id, "custom_ids": ids,
                            "at": dt.datetime.now(dt.timezone.utc).isoformat()})
            try:
                batch_id = self._server("create a batch", self.create, chunk, local_id)
            except UserError as e:
                if _refused(e.__cause__):  # the server answered no: nothing was created (a 5xx or a cut
                    journal.append({"kind": "batch_lost", "local_id": local_id})  # connection stays pending)
                raise
            journal.append({"kind": "batch", "local_id": local_id, "batch_id": batch_id, "custom_ids": ids})

    def collect(self, journal: Journal) -> None:
        """Poll the open batches and record the results of those that ended (until none is open, or once
        without ``wait``)."""
        st = journal.state
        while st.open_batches:
            for batch_id, rec in list(st.open_batches.items()):
                if self._server("poll a batch", self.ended, batch_id):
                    self._collect(batch_id, rec["custom_ids"], journal)
            if st.open_batches:
                if not self.wait:
                    return
                time.sleep(self.poll_interval)

    def _server(self, what: str, fn, *args):
        """Call the server; its failures (HTTP errors, garbage bodies) become one line naming the way on."""
        try:
            return fn(*args)
        except UserError:
            raise
        except Exception as e:  # the SDKs' APIError family, httpx errors, JSON errors from garbage bodies
            detail = redact(f"{type(e).__name__}: {str(e)[:300]}", self.secrets)
            if getattr(e, "status_code", None) in (401, 403):
                raise UserError(f"the {self.name} server refused the API key in {self.key_variable} when asked to "
                                f"{what} ({detail}): set it to a valid key; nothing was sent") from e
            fix = "fix the request or the settings it names" if _refused(e) else "run the same command again to resume"
            raise UserError(f"the {self.name} server failed to {what} ({detail}): nothing is lost, the journal "
                            f"knows what was sent; {fix}") from e

    def _collect(self, batch_id: str, custom_ids: list[str], journal: Journal) -> None:
        raw = self._raw(batch_id)
        outcomes: dict[str, Outcome] = {}
        bad_lines = 0
        for line in raw.decode("utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad_lines += 1
                continue
            try:
                parsed = self.parse_line(rec)
            except (AttributeError, KeyError, TypeError, IndexError):
                parsed = None
            if parsed is not None:
                outcomes[parsed[0]] = parsed[1]
                continue
            bad_lines += 1
            cid = rec.get("custom_id") if isinstance(rec, dict) else None
            if isinstance(cid, str):
                outcomes[cid] = ("malformed", line[:2000], "the result line is not in the protocol's shape")
        records = []
        missing = ("missing", None, self.missing_reason(batch_id) if len(outcomes) < len(custom_ids) else None)
        if missing[2] is None:
            missing = ("missing", None, f"no valid line for this request in the results of batch {batch_id} "
                                        f"({bad_lines} malformed lines)")
        for cid in custom_ids:
            status, text, error = outcomes.get(cid, missing)
            records.append({"kind": "result", "custom_id": cid, "status": status, "text": text,
                            "error": None if error is None else redact(error, self.secrets), "batch_id": batch_id})
        journal.append(*records, {"kind": "batch_done", "batch_id": batch_id})

    def _raw(self, batch_id: str) -> bytes:
        """The batch's results, from the local copy or downloaded (retried if the download is cut)."""
        path = self.results_dir / f"{batch_id}.jsonl"
        if path.exists():
            return path.read_bytes()
        error: Exception | None = None
        for _ in range(self.download_attempts):
            try:
                data = self.download(batch_id)
            except Exception as e:  # a cut connection surfaces as the SDK's or httpx's own error types
                error = e
                continue
            self.results_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)
            return data
        raise UserError(f"could not download the results of batch {batch_id} after {self.download_attempts} "
                        f"attempts ({type(error).__name__}: {error}): run the same command again to retry")


def _refused(e: BaseException | None) -> bool:
    """Whether the server answered with a 4xx status (it refused the call: a batch it refused was not made)."""
    status = getattr(e, "status_code", None)
    return isinstance(status, int) and 400 <= status < 500


def _since(pending: dict) -> dt.datetime:
    return dt.datetime.fromisoformat(pending["at"]) - dt.timedelta(minutes=2)


class AnthropicBatchBackend(BatchBackend):
    """Anthropic Message Batches (``client.messages.batches``) via the official ``anthropic`` SDK.

    The key comes from ANTHROPIC_API_KEY; ``base_url`` points the SDK elsewhere (tests use a local fake).
    """

    name = "anthropic"

    def __init__(self, model: str = "claude-haiku-4-5", *, base_url: str | None = None, **kw):
        super().__init__(model, **kw)
        key = env_key("ANTHROPIC_API_KEY", "the anthropic batch backend")
        self.key_variable, self.secrets = "ANTHROPIC_API_KEY", (key,)
        self.client = sdk("anthropic", self.name).Anthropic(api_key=key, base_url=base_url, max_retries=4,
                                                                   timeout=self.timeout)

    def create(self, requests: Sequence[Request], local_id: str) -> str:
        reqs = [{"custom_id": r.custom_id,
                 "params": {"model": self.model, "max_tokens": r.max_tokens, "temperature": self.temperature,
                            "system": r.prompt.system, "messages": [{"role": "user", "content": r.prompt.user}]}}
                for r in requests]
        # no SDK retry: creation is not idempotent, and a retried POST can leave a second, billed batch; a
        # failed creation stays pending in the journal and is reconciled by the next run (find)
        return self.client.with_options(max_retries=0).messages.batches.create(requests=reqs).id

    def ended(self, batch_id: str) -> bool:
        return self.client.messages.batches.retrieve(batch_id).processing_status == "ended"

    def download(self, batch_id: str) -> bytes:
        batch = self.client.messages.batches.retrieve(batch_id)
        if not batch.results_url:
            raise UserError(f"batch {batch_id} has ended but has no results_url")
        return self.client.messages.batches.with_raw_response.results(batch_id).http_response.read()

    def parse_line(self, rec: dict) -> tuple[str, Outcome] | None:
        cid, result = rec["custom_id"], rec["result"]
        kind = result["type"]
        if kind == "succeeded":
            text = "".join(b.get("text", "") for b in result["message"]["content"] if b.get("type") == "text")
            return cid, ("succeeded", text, None)
        if kind == "errored":
            err = result.get("error", {})
            err = err.get("error", err)
            return cid, ("errored", None, f"{err.get('type')}: {err.get('message')}")
        if kind in ("canceled", "expired"):
            return cid, (kind, None, kind)
        return None

    def find(self, pending: dict, known: set[str]) -> str | None:
        n, since = len(pending["custom_ids"]), _since(pending)
        for batch in self.client.messages.batches.list(limit=100):
            if batch.created_at < since:
                break
            if batch.id in known:  # another chunk of this journal, or an earlier run's
                continue
            counts = batch.request_counts
            total = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
            if total == n:
                return batch.id
        return None


class OpenAIBatchBackend(BatchBackend):
    """The OpenAI Batch API (files upload, ``/v1/batches``, output and error files) via the ``openai`` SDK.

    The key comes from OPENAI_API_KEY; each batch carries ``metadata.llama_sae_local_id`` so an
    interrupted creation is found again exactly.
    """

    name = "openai-batch"

    def __init__(self, model: str = "gpt-4o-mini", *, base_url: str | None = None, **kw):
        super().__init__(model, **kw)
        key = env_key("OPENAI_API_KEY", "the openai batch backend")
        self.key_variable, self.secrets = "OPENAI_API_KEY", (key,)
        self.client = sdk("openai", self.name).OpenAI(api_key=key, base_url=base_url, max_retries=4,
                                                             timeout=self.timeout)

    def create(self, requests: Sequence[Request], local_id: str) -> str:
        lines = [json.dumps({"custom_id": r.custom_id, "method": "POST", "url": "/v1/chat/completions",
                             "body": {"model": self.model, "messages": r.prompt.messages(),
                                      **openai_limits(self.model, r.max_tokens, self.temperature, official=True)}})
                 for r in requests]
        upload = self.client.files.create(file=(f"llama-sae-{local_id}.jsonl", "\n".join(lines).encode()),
                                          purpose="batch")
        batch = self.client.with_options(max_retries=0).batches.create(  # not idempotent: see Anthropic's create
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h",
            metadata={"llama_sae_local_id": local_id})
        return batch.id

    def ended(self, batch_id: str) -> bool:
        return self.client.batches.retrieve(batch_id).status in ("completed", "failed", "expired", "cancelled")

    def download(self, batch_id: str) -> bytes:
        batch = self.client.batches.retrieve(batch_id)
        parts = [self.client.files.content(fid).content for fid in (batch.output_file_id, batch.error_file_id) if fid]
        return b"\n".join(p.rstrip(b"\n") for p in parts) + b"\n" if parts else b""

    def missing_reason(self, batch_id: str) -> str | None:
        batch = self.client.batches.retrieve(batch_id)
        if batch.status != "failed":
            return None
        return "batch failed: " + "; ".join(f"{e.code}: {e.message}" for e in (batch.errors.data if batch.errors
                                                                                 else []) or [])

    def parse_line(self, rec: dict) -> tuple[str, Outcome] | None:
        cid, resp, error = rec["custom_id"], rec.get("response"), rec.get("error")
        if error:
            code = error.get("code")
            status = {"batch_expired": "expired", "batch_cancelled": "canceled"}.get(code, "errored")
            return cid, (status, None, f"{code}: {error.get('message')}")
        if resp["status_code"] != 200:
            err = (resp.get("body") or {}).get("error") or {}
            return cid, ("errored", None, f"HTTP {resp['status_code']}: {err.get('message')}")
        return cid, ("succeeded", resp["body"]["choices"][0]["message"]["content"], None)

    def find(self, pending: dict, known: set[str]) -> str | None:
        since = _since(pending).timestamp()
        for batch in self.client.batches.list(limit=100):
            if batch.created_at < since:
                break
            if batch.id not in known and (batch.metadata or {}).get("llama_sae_local_id") == pending["local_id"]:
                return batch.id
        return None

