"""``llama-sae explain``: an explanation for every live latent, written to ``explanations.jsonl``.

The explainer sees each latent's top sentences (max aggregation) and every other quantile sample
(the remaining quantile samples are held out for scoring).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import partial

from llama_sae.features import EXPLANATIONS_FILE, Features
from llama_sae.fileio import atomic_write
from llama_sae.interpret.backends import Backend, Request
from llama_sae.interpret.prompts import explain_prompt, parse_explanation
from llama_sae.interpret.run import Chunk, first_error, outcome_counts, run_requests

PROMPT_VERSION = 1


def explain_requests(f: Features, latents: Sequence[int], *, n_top: int = 10, max_tokens: int = 300
                     ) -> list[Request]:
    """One request per latent (custom_id ``x{latent}-{prompt hash}``, idempotent across runs)."""
    out = []
    for latent in latents:
        top = f.examples(latent, "max", n_top)
        quantiles = f.examples(latent, "quantile")[0::2]
        prompt = explain_prompt(top, quantiles)
        out.append(Request(f"x{latent}-{prompt.hash()}", prompt, latent, "explain", max_tokens,
                           {"examples": top + quantiles}))
    return out


def explain(f: Features, backend: Backend, *, latents: Sequence[int] | None = None, n_top: int = 10,
            max_tokens: int = 300, chunk: int = 5000, fresh: bool = False, retry_failed: bool = False,
            confirm: Callable[[str], bool] | None = None, threshold: float = 5.0,
            say: Callable[[str], None] = print, progress: Callable[[int, int], None] | None = None) -> dict:
    """Explain ``latents`` (default: every live one) and (re)write explanations.jsonl from the journal.

    ``chunk`` latents' prompts are built at a time; ``progress`` is called with (requests with a result, requests)
    as answers come in. Returns {"explained", "requests", "outcomes": {status: count}, "first_error": the first
    failed request's status and error, or None}.
    """
    latents = f.live_latents() if latents is None else list(dict.fromkeys(latents))  # each latent once
    parts = [latents[i:i + chunk] for i in range(0, len(latents), chunk)]
    chunks = [Chunk({"latents": part}, len(part), partial(explain_requests, f, part, n_top=n_top,
                                                          max_tokens=max_tokens)) for part in parts]
    settings = {"n_top": n_top, "max_tokens": max_tokens, "prompt_version": PROMPT_VERSION}
    journal, ids = run_requests(f, "explain", backend, chunks, settings,
                                parse=lambda req, text: parse_explanation(text)[0], fresh=fresh,
                                retry_failed=retry_failed, confirm=confirm, threshold=threshold, say=say,
                                progress=progress)
    with journal:  # still locked: another explain run cannot merge its rows into the file at the same time
        rows = []
        for cid in ids:
            res = journal.state.results.get(cid)
            if res is None or res["status"] != "succeeded":
                continue
            text, certainty = parse_explanation(res["text"])
            rows.append({"latent": journal.state.requests[cid]["latent"], "explanation": _writable(text),
                         "certainty": certainty, "backend": backend.name, "model": backend.model, "custom_id": cid,
                         "raw": _writable(res["text"]), "n_top": n_top})  # scoring holds out top sentences past it
        _merge_write(f, rows)
    f.reload_explanations()
    return {"explained": len(rows), "requests": len(ids), "outcomes": outcome_counts(journal, ids),
            "first_error": first_error(journal, ids)}


def _writable(text: str | None) -> str | None:
    """``text`` with any unpaired surrogate (a reply may escape one, "\\ud800") replaced by "?": UTF-8 files,
    pages and the UI cannot hold it."""
    return None if text is None else text.encode("utf-8", "replace").decode("utf-8")


def _merge_write(f: Features, rows: list[dict]) -> None:
    """Rewrite explanations.jsonl: these rows replace earlier ones for the same latents."""
    path = f.path / EXPLANATIONS_FILE
    mine = {r["latent"] for r in rows}
    kept = [r for r in f.rows(EXPLANATIONS_FILE) if r["latent"] not in mine]  # a damaged line: an error, not lost
    rows = sorted(kept + rows, key=lambda r: r["latent"])
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
