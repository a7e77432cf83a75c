"""Send a task's requests through a backend, journaled and priced: the loop shared by explain and score.

``run_requests`` opens (or resumes) the task's journal, leaves out what is already answered, prints a
cost estimate and asks for confirmation above a threshold, records every request before it is sent,
runs the backend, and marks answers that break the output contract as ``malformed`` (raw text kept).
Everything the outputs need (latent, labels) is in the journal's request lines, so explanations and
scores are written from the journal alone. Each finished chunk of work records which requests its inputs made;
run again (after a crash, or on the same inputs), a chunk with every answer in builds no prompt at all.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_sae.errors import UserError
from llama_sae.interpret.backends import Backend, Request
from llama_sae.interpret.journal import FAILED, Journal

# US dollars per million tokens (input, output), standard (non-batch) prices; batch APIs cost half.
PRICES = {
    "claude-opus-4-1": (15.0, 75.0), "claude-opus-4": (15.0, 75.0), "claude-sonnet-4-5": (3.0, 15.0),
    "claude-sonnet-4": (3.0, 15.0), "claude-3-7-sonnet": (3.0, 15.0), "claude-haiku-4-5": (1.0, 5.0),
    "claude-3-5-haiku": (0.8, 4.0), "gpt-4o": (2.5, 10.0), "gpt-4o-mini": (0.15, 0.6), "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.4, 1.6), "gpt-4.1-nano": (0.1, 0.4), "gpt-5": (1.25, 10.0), "gpt-5-mini": (0.25, 2.0),
}
CHARS_PER_TOKEN = 3.5  # English prompt text with markup; a deliberate over-estimate of the token count


def price(model: str) -> tuple[float, float] | None:
    """(input, output) $/Mtok of the longest known model-name prefix, or None for unknown models."""
    best = max((k for k in PRICES if model.startswith(k)), key=len, default=None)
    return PRICES[best] if best else None


def estimate(requests: Sequence[Request], backend: Backend) -> dict:
    """{"requests", "input_tokens", "output_tokens" (upper bound), "dollars" (upper bound; None when a paid
    API's model has no known price; 0 for the offline and local backends and self-hosted servers)}."""
    tokens_in = int(sum(r.prompt.chars() for r in requests) / CHARS_PER_TOKEN)
    tokens_out = sum(r.max_tokens for r in requests)
    p = price(backend.model) if backend.paid else None
    dollars = None if backend.paid else 0.0  # unknown for a paid API without a price: then we ask
    if p is not None:
        dollars = (tokens_in * p[0] + tokens_out * p[1]) / 1e6 * (0.5 if backend.batch_api else 1.0)
    return {"requests": len(requests), "input_tokens": tokens_in, "output_tokens": tokens_out, "dollars": dollars}


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Chunk:
    """A slice of a task's work, described before its prompts are built.

    ``inputs``: JSON-able, everything besides the features artifact and the settings that its requests are built
    from (the latents, the explanations scored, ...); ``units``: the work it counts for the cost estimate (a
    request each for explain; latent-method pairs for score, so an unscorable latent, which asks nothing, scales
    the estimate down); ``build``: its requests.
    """

    inputs: Any
    units: int
    build: Callable[[], Sequence[Request]]


def run_requests(features, task: str, backend: Backend, chunks: Sequence[Chunk], settings: dict, *,
                 parse: Callable[[dict, str], object | None], fresh: bool = False, retry_failed: bool = False,
                 confirm: Callable[[str], bool] | None = None, threshold: float = 5.0,
                 say: Callable[[str], None] = print, progress: Callable[[int, int], None] | None = None
                 ) -> tuple[Journal, list[str]]:
    """Answer requests, built chunk by chunk, through ``backend`` with a journal in the features directory.

    Requests are built and released chunk by chunk (a million latents never sit in memory at once); a
    batch backend submits every chunk, then collects. The cost estimate comes from the first chunk built,
    scaled by the units left, and is confirmed before anything is sent. A chunk whose every request has its
    final result is recorded under a digest of its inputs, the settings, the artifact build and the code that
    builds prompts: a later run (after a crash, or on the same inputs) skips building a recorded chunk whose
    answers all succeeded, and re-reads its replies (prompt building is most of a rerun's time: 14.7 s of the
    demo's scores).

    Args:
        task: "explain" or "score" (names the journal file).
        settings: the prompt settings, recorded in the journal header.
        parse: (request record, reply text) -> None when the reply breaks the output contract (recorded
            as malformed, raw text kept); the request record holds the request's ``meta``.
        retry_failed: re-send requests whose last result was errored / canceled / expired / malformed / missing.
        confirm: asked (with the estimate) when it exceeds ``threshold`` dollars or the price is unknown;
            None = refuse such runs (the CLI passes a prompt, or --yes).
        progress: called with (requests with a result, requests of the run as estimated) whenever results
            come in (from the backend's threads too), once there is something to send.
    Returns:
        (the journal, the custom_ids of this run's requests in order). The journal is still open and locked:
        write the outputs inside ``with journal:``, so that no other run rewrites them in between.
    """
    header = {"task": task, "backend": backend.name, "model": backend.model,
              "backend_identity": backend.identity(), "features_build": features.meta.get("build_id"),
              "settings_hash": settings_hash(settings), "settings": settings}
    journal = Journal(Path(features.path) / f"{task}.journal.jsonl", header, fresh=fresh)
    try:
        backend.begin_run()
        keys = [chunk_key(header["features_build"], settings, c.inputs) for c in chunks]
        wanted = _run(journal, backend, chunks, keys, parse, fresh, retry_failed, confirm, threshold, say, task,
                      progress)
        return journal, wanted
    except BaseException:
        journal.close()
        raise


def chunk_key(build: str | None, settings: dict, inputs: Any) -> str:
    """The digest a chunk's answers are recorded under (its inputs, the settings, the artifact build, the code)."""
    return hashlib.sha256(json.dumps({"build": build, "settings": settings, "inputs": inputs, "code": code_digest()},
                                     sort_keys=True).encode()).hexdigest()[:32]


def _run(journal: Journal, backend: Backend, chunks: Sequence[Chunk], keys: list[str], parse, fresh: bool,
         retry_failed: bool, confirm, threshold: float, say, task: str, progress=None) -> list[str]:
    """The body of :func:`run_requests`, with the journal open (and locked)."""
    if journal.set_aside is not None:
        say(f"{task}: a new journal; the old one is kept as {journal.set_aside.name}" if fresh else
            f"{task}: the journal held {journal.set_aside_why}: set aside as {journal.set_aside.name}")
    st = journal.state
    if backend.batch_api and st.pending_batches:  # before the estimate, which counts their requests as sent
        backend.reconcile(journal)
    answered = {i for i, k in enumerate(keys) if k in st.chunks and all(st.succeeded(c) for c in st.chunks[k])}
    reused = sum(len(st.chunks[keys[i]]) for i in answered)
    if answered and len(answered) == len(chunks):
        say(f"{task}: all {reused} requests of these inputs were answered by an earlier run: nothing to send")
    elif answered:
        say(f"{task}: {reused} requests ({len(answered)} of {len(chunks)} chunks) were answered by an earlier run: "
            "their prompts are not built again")
    to_build = [i for i in range(len(chunks)) if i not in answered]
    units_after = {i: sum(chunks[j].units for j in to_build[n + 1:]) for n, i in enumerate(to_build)}
    wanted, seen, built, estimated, follow = [], set(), [], False, None
    before = {"requests": reused, "answered": reused, "failed": 0, "in_batch": 0}  # chunks before the estimate
    for i, (chunk, key) in enumerate(zip(chunks, keys)):
        if i in answered:
            wanted += [c for c in st.chunks[key] if c not in seen and not seen.add(c)]
            continue  # (answered by an earlier run: counted among the bar's done from its start)
        requests = [r for r in chunk.build() if r.custom_id not in seen and not seen.add(r.custom_id)]  # asked once
        ids = [r.custom_id for r in requests]
        wanted += ids
        built.append((key, ids))
        busy = st.in_batch()
        todo = [r for r in requests if not st.succeeded(r.custom_id) and (
            r.custom_id in busy or r.custom_id not in st.results
            or retry_failed and st.results[r.custom_id]["status"] in FAILED)]
        new = [r for r in todo if r.custom_id not in busy]
        if follow is not None:  # a chunk after the estimate: its requests with a final result are done already
            follow.skip(len(requests) - len(todo))
        if not estimated:
            sending = {r.custom_id for r in todo}
            failed = sum(1 for c in ids if c not in sending and st.results.get(c, {}).get("status") in FAILED)
            counts = {"requests": len(requests), "answered": len(requests) - len(todo) - failed, "failed": failed,
                      "in_batch": len(todo) - len(new)}
            before = {k: before[k] + counts[k] for k in before}
            if new or i == to_build[-1]:  # priced at the first chunk with something to send (none before it sent)
                rest = units_after[i] / max(chunk.units, 1)
                _check_cost(task, backend, requests, new, rest, before, confirm, threshold, say)
                estimated = True
                if progress is not None and (new or before["in_batch"]):  # (a batch run resumed to collect, too)
                    follow = _Follow(journal, progress, before["answered"] + before["failed"],
                                     before["requests"] + round(len(requests) * rest))
        journal.append(*[{"kind": "request", "custom_id": r.custom_id, "prompt_hash": r.prompt.hash(),
                          "latent": r.latent, "task": r.task, **r.meta} for r in new if r.custom_id not in st.requests])
        if todo and backend.batch_api:
            backend.submit(todo, journal)  # every chunk submitted first, collected after the last one
        elif todo:
            backend.run(todo, journal)
        _record_finished(journal, built)
    if backend.batch_api and to_build:  # (every chunk answered: none of these requests is in a batch)
        backend.collect(journal)
        _record_finished(journal, built)
    mark_malformed(journal, wanted, parse)
    return wanted


class _Follow:
    """Reports a run's progress as results come in: (requests with a result, ``total``), each request counted once,
    plus the requests found done already (:meth:`skip`)."""

    def __init__(self, journal: Journal, progress: Callable[[int, int], None], done_before: int, total: int):
        self.progress, self.done, self.total, self.answered = progress, done_before, total, set()
        journal.listener = self.listen
        progress(done_before, total)

    def listen(self, records) -> None:
        new = {r["custom_id"] for r in records if r.get("kind") == "result"} - self.answered
        if new:
            self.answered.update(new)
            self.report()

    def skip(self, n: int) -> None:
        if n:
            self.done += n
            self.report()

    def report(self) -> None:
        self.progress(min(self.done + len(self.answered), self.total), self.total)


def _record_finished(journal: Journal, built: list[tuple[str, list[str]]]) -> None:
    """Record each built chunk whose requests all have their final result (once: then it leaves ``built``)."""
    st, busy = journal.state, journal.state.in_batch()
    finished = [(key, ids) for key, ids in built if all(c in st.results and c not in busy for c in ids)]
    journal.append(*[{"kind": "chunk", "inputs": key, "custom_ids": ids} for key, ids in finished
                     if st.chunks.get(key) != ids])
    built[:] = [b for b in built if b not in finished]


def mark_malformed(journal: Journal, custom_ids: Sequence[str], parse) -> None:
    """Record as ``malformed`` each succeeded answer that ``parse`` rejects (the output contract, as this version
    reads it)."""
    st = journal.state
    for cid in custom_ids:
        res = st.results.get(cid)
        if res and res["status"] == "succeeded" and parse(st.requests.get(cid, {}), res["text"] or "") is None:
            journal.record_result(cid, "malformed", text=res["text"],
                                  error="the reply breaks the output contract (no valid JSON answer)")


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """A digest of the code that builds prompts and reads replies (this package's interpret modules and the
    features reader): a rerun's shortcut must not outlive a change to any of them."""
    from llama_sae import __version__, features, interpret

    h = hashlib.sha256(__version__.encode())
    for path in sorted(Path(interpret.__file__).parent.glob("*.py")) + [Path(features.__file__)]:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _check_cost(task: str, backend: Backend, requests: Sequence[Request], new: list, rest: float, counts: dict,
                confirm, threshold: float, say) -> None:
    """Print the estimate and ask above the threshold: this chunk's unsent requests, plus the chunks not built yet
    at the full cost of this chunk's requests (``rest``: their units over this chunk's), so that a run resumed
    after a crash is not priced by the answers of the chunk the crash cut short. ``counts``: requests, answered,
    failed and in_batch of the chunks up to this one."""
    now, per_chunk = estimate(new, backend), estimate(requests, backend)
    n_new = len(new) + round(len(requests) * rest)
    dollars = None if now["dollars"] is None else now["dollars"] + per_chunk["dollars"] * rest
    shown = "unknown (no price for this model)" if dollars is None else f"${dollars:.2f}"
    tokens_in = now["input_tokens"] + per_chunk["input_tokens"] * rest
    tokens_out = now["output_tokens"] + per_chunk["output_tokens"] * rest
    about = "~" if rest else ""  # the chunks not built yet are counted by their units, not their requests
    say(f"{task}: {about}{counts['requests'] + round(len(requests) * rest)} requests, {counts['answered']} already "
        "answered, " + (f"{counts['failed']} failed earlier (sent again only with --retry-failed), "
                        if counts["failed"] else "")
        + f"{counts['in_batch']} in open batches, {about}{n_new} to send ({backend.name}:{backend.model}): "
        f"~{round(tokens_in):,} input tokens, ≤ {round(tokens_out):,} output tokens, cost ≤ {shown}"
        + ("" if rest == 0 else f" (the chunks not built yet priced like the {len(requests)} requests of this one)"))
    if n_new and (dollars is None or dollars > threshold):
        if confirm is None or not confirm(f"send {n_new} requests for {shown}?"):
            if dollars is None:
                raise UserError(f"not sent: {backend.model!r} has no known price, so its cost cannot be estimated; "
                                "pass --yes to send anyway")
            raise UserError(f"not sent: the estimated cost ({shown}) is above the --confirm-above threshold "
                            f"(${threshold:g}); pass --yes to send anyway")


def first_error(journal: Journal, custom_ids: Sequence[str]) -> str | None:
    """The error of the first of these requests that failed (what to fix when all of them did), or None."""
    for cid in custom_ids:
        res = journal.state.results.get(cid, {})
        if res.get("status") not in (None, "succeeded"):
            return f"{res['status']}: {res.get('error') or 'no reason given'}"
    return None


def outcome_counts(journal: Journal, custom_ids: Sequence[str]) -> dict[str, int]:
    """How many of the requests ended in each status ("unanswered" for none yet)."""
    counts: dict[str, int] = {}
    for cid in custom_ids:
        status = journal.state.results.get(cid, {}).get("status", "unanswered")
        counts[status] = counts.get(status, 0) + 1
    return counts
