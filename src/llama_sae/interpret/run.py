"""Send a task's requests through a backend, journaled and priced: the loop shared by explain and score.

``run_requests`` opens (or resumes) the task's journal, leaves out what is already answered, prints a
cost estimate and asks for confirmation above a threshold, records every request before it is sent,
runs the backend, and marks answers that break the output contract as ``malformed`` (raw text kept).
Everything the outputs need (latent, labels) is in the journal's request lines, so explanations and
scores are written from the journal alone. A finished run records which requests its inputs made; run again
on the same inputs with every answer in, it builds no prompt at all.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

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


def run_requests(features, task: str, backend: Backend, chunks: Iterable[Sequence[Request]], total: int,
                 settings: dict, *, parse: Callable[[dict, str], object | None], fresh: bool = False,
                 retry_failed: bool = False, confirm: Callable[[str], bool] | None = None, threshold: float = 5.0,
                 say: Callable[[str], None] = print, inputs: object = None, first_units: int | None = None
                 ) -> tuple[Journal, list[str]]:
    """Answer requests, built chunk by chunk, through ``backend`` with a journal in the features directory.

    Requests are built and released chunk by chunk (a million latents never sit in memory at once); a
    batch backend submits every chunk, then collects. The cost estimate comes from the first chunk,
    scaled by ``total / first_units``, and is confirmed before anything is sent.

    Args:
        task: "explain" or "score" (names the journal file).
        total: the units of work in all chunks (a request each, unless a unit may give none); ``first_units``:
            those in the first chunk (default: its request count). Scoring counts latent-method pairs, so that
            latents that give no request (unscorable) scale the estimate down, not up.
        settings: the prompt settings, recorded in the journal header.
        parse: (request record, reply text) -> None when the reply breaks the output contract (recorded
            as malformed, raw text kept); the request record holds the request's ``meta``.
        retry_failed: re-send requests whose last result was errored / canceled / expired / malformed / missing.
        confirm: asked (with the estimate) when it exceeds ``threshold`` dollars or the price is unknown;
            None = refuse such runs (the CLI passes a prompt, or --yes).
        inputs: JSON-able, everything besides the features artifact and ``settings`` that the requests are built
            from (the latents, the explanations scored, ...). When given, the finished run records its requests
            under a digest of it, and a later run with the same digest whose requests all succeeded returns them
            without building ``chunks`` (prompt building is most of a rerun's time: 14.7 s of the demo's scores).
    Returns:
        (the journal, the custom_ids of this run's requests in order). The journal is still open and locked:
        write the outputs inside ``with journal:``, so that no other run rewrites them in between.
    """
    header = {"task": task, "backend": backend.name, "model": backend.model,
              "backend_identity": backend.identity(), "features_build": features.meta.get("build_id"),
              "settings_hash": settings_hash(settings), "settings": settings}
    journal = Journal(Path(features.path) / f"{task}.journal.jsonl", header, fresh=fresh)
    key = None if inputs is None else hashlib.sha256(json.dumps(
        {"build": header["features_build"], "settings": settings, "inputs": inputs, "code": code_digest()},
        sort_keys=True).encode()).hexdigest()[:32]
    st = journal.state
    try:
        done = st.complete.get(key) if key and not retry_failed else None
        if done is not None and all(st.succeeded(c) for c in done):
            say(f"{task}: all {len(done)} requests of these inputs were answered by an earlier run: nothing to send")
            mark_malformed(journal, done, parse)  # the replies as this version reads them
            return journal, done
        _, wanted = _run(journal, backend, chunks, parse, fresh, retry_failed, confirm, threshold, say, task, total,
                         first_units)
        final = all(c in st.results for c in wanted) and not set(wanted) & st.in_batch()
        if key and final and st.complete.get(key) != wanted:  # every request has its final result, recorded once
            journal.append({"kind": "complete", "inputs": key, "custom_ids": wanted})
        return journal, wanted
    except BaseException:
        journal.close()
        raise


def _run(journal: Journal, backend: Backend, chunks: Iterable[Sequence[Request]], parse, fresh: bool,
         retry_failed: bool, confirm, threshold: float, say, task: str, total: int, first_units: int | None
         ) -> tuple[Journal, list[str]]:
    """The body of :func:`run_requests`, with the journal open (and locked)."""
    if journal.set_aside is not None and not fresh:
        say(f"{task}: the journal held another run's requests and no answer: set aside as {journal.set_aside.name}")
    st, wanted, seen = journal.state, [], set()
    for i, requests in enumerate(chunks):
        requests = [r for r in requests if r.custom_id not in seen and not seen.add(r.custom_id)]  # asked once
        wanted += [r.custom_id for r in requests]
        busy = st.in_batch()
        todo = [r for r in requests if not st.succeeded(r.custom_id) and (
            r.custom_id in busy or r.custom_id not in st.results
            or retry_failed and st.results[r.custom_id]["status"] in FAILED)]
        new = [r for r in todo if r.custom_id not in busy]
        if i == 0:
            _check_cost(task, backend, requests, todo, new, total / (first_units or max(len(requests), 1)), confirm,
                        threshold, say)
        journal.append(*[{"kind": "request", "custom_id": r.custom_id, "prompt_hash": r.prompt.hash(),
                          "latent": r.latent, "task": r.task, **r.meta} for r in new if r.custom_id not in st.requests])
        if todo and backend.batch_api:
            backend.submit(todo, journal)  # every chunk submitted first, collected after the last one
        elif todo:
            backend.run(todo, journal)
    if backend.batch_api:
        backend.collect(journal)
    mark_malformed(journal, wanted, parse)
    return journal, wanted


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


def _check_cost(task: str, backend: Backend, requests: Sequence[Request], todo: list, new: list, scale: float,
                confirm, threshold: float, say) -> None:
    """Print the estimate (from the first chunk, times ``scale``) and ask above the threshold."""
    cost = estimate(new, backend)
    n_new = round(len(new) * scale)
    dollars = "unknown (no price for this model)" if cost["dollars"] is None else f"${cost['dollars'] * scale:.2f}"
    say(f"{task}: {round(len(requests) * scale)} requests, {round((len(requests) - len(todo)) * scale)} already "
        "answered, "
        f"{round((len(todo) - len(new)) * scale)} in open batches, {n_new} to send ({backend.name}:{backend.model}): "
        f"~{round(cost['input_tokens'] * scale):,} input tokens, ≤ {round(cost['output_tokens'] * scale):,} output "
        f"tokens, cost ≤ {dollars}" + ("" if scale == 1 else f" (estimated from the first {len(requests)})"))
    if n_new and (cost["dollars"] is None or cost["dollars"] * scale > threshold):
        if confirm is None or not confirm(f"send {n_new} requests for {dollars}?"):
            raise UserError(f"not sent: the estimated cost ({dollars}) is above the --confirm-above threshold "
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
