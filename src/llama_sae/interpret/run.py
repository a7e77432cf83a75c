"""Send a task's requests through a backend, journaled and priced: the loop shared by explain and score.

``run_requests`` opens (or resumes) the task's journal, leaves out what is already answered, prints a
cost estimate and asks for confirmation above a threshold, records every request before it is sent,
runs the backend, and marks answers that break the output contract as ``malformed`` (raw text kept).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
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


def run_requests(features, task: str, backend: Backend, requests: Sequence[Request], settings: dict, *,
                 parse: Callable[[Request, str], object | None], fresh: bool = False, retry_failed: bool = False,
                 confirm: Callable[[str], bool] | None = None, threshold: float = 5.0,
                 say: Callable[[str], None] = print) -> Journal:
    """Answer ``requests`` through ``backend`` with a journal in the features directory.

    Args:
        task: "explain" or "score" (names the journal file).
        settings: everything that shapes the prompts; a journal from other settings is refused.
        parse: returns None when a reply breaks the output contract (then it is recorded as malformed).
        retry_failed: re-send requests whose last result was errored / canceled / expired / malformed.
        confirm: asked (with the estimate) when it exceeds ``threshold`` dollars or the price is unknown;
            None = refuse such runs (the CLI passes a prompt, or --yes).
    """
    header = {"task": task, "backend": backend.name, "model": backend.model,
              "features_build": features.meta.get("build_id"), "settings_hash": settings_hash(settings),
              "settings": settings}
    journal = Journal(Path(features.path) / f"{task}.journal.jsonl", header, fresh=fresh)
    st = journal.state
    busy = st.in_batch()
    todo = [r for r in requests if not st.succeeded(r.custom_id) and (
        r.custom_id in busy or r.custom_id not in st.results or retry_failed and st.results[r.custom_id][
            "status"] in FAILED)]
    new = [r for r in todo if r.custom_id not in busy]
    cost = estimate(new, backend)
    dollars = "unknown (no price for this model)" if cost["dollars"] is None else f"${cost['dollars']:.2f}"
    line = (f"{task}: {len(requests)} requests, {len(requests) - len(todo)} already answered, {len(todo) - len(new)} "
            f"in open batches, {len(new)} to send ({backend.name}:{backend.model}): ~{cost['input_tokens']:,} input "
            f"tokens, ≤ {cost['output_tokens']:,} output tokens, cost ≤ {dollars}")
    say(line)
    if new and (cost["dollars"] is None or cost["dollars"] > threshold):
        if confirm is None or not confirm(f"send {len(new)} requests for {dollars}?"):
            raise UserError(f"not sent: the estimated cost ({dollars}) is above the --confirm-above threshold "
                            f"(${threshold:g}); pass --yes to send anyway")
    known = st.requests
    journal.append(*[{"kind": "request", "custom_id": r.custom_id, "prompt_hash": r.prompt.hash(),
                      "latent": r.latent, "task": r.task} for r in new if r.custom_id not in known])
    if todo:
        backend.run(todo, journal)
    for r in requests:
        res = st.results.get(r.custom_id)
        if res and res["status"] == "succeeded" and parse(r, res["text"] or "") is None:
            journal.record_result(r.custom_id, "malformed", text=res["text"],
                                  error="the reply breaks the output contract (no valid JSON answer)")
    return journal


def outcome_counts(journal: Journal, requests: Sequence[Request]) -> dict[str, int]:
    """How many of ``requests`` ended in each status ("unanswered" for none yet)."""
    counts: dict[str, int] = {}
    for r in requests:
        status = journal.state.results.get(r.custom_id, {}).get("status", "unanswered")
        counts[status] = counts.get(status, 0) + 1
    return counts
