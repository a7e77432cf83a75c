"""Explain and score SAE latents from a features artifact, with any backend, resumably.

    from llama_sae.features import load_features
    from llama_sae.interpret import make_backend, explain, score

    f = load_features("runs/features")
    explain(f, make_backend("offline", f))                    # explanations.jsonl (no key needed)
    score(f, make_backend("offline", f))                      # scores.jsonl: detection, fuzzing, control
    f.explanation(12)                                         # Explanation(text, certainty, detection, fuzzing)

Backends: offline (default), chat (any OpenAI-compatible server), anthropic (Message Batches),
openai-batch (OpenAI Batch API), local (the Llama itself). Modules: prompts (one prompt builder and the
parsers), journal, backends, batches, offline, run (the journaled loop), explain, scoring, groundtruth.
"""

from __future__ import annotations

from pathlib import Path

from llama_sae.errors import UserError
from llama_sae.interpret.backends import Backend
from llama_sae.interpret.explain import explain
from llama_sae.interpret.scoring import score

BACKENDS = ("offline", "chat", "anthropic", "openai-batch", "local")


def make_backend(name: str, features, *, model: str | None = None, base_url: str | None = None,
                 api_key_env: str | None = None, concurrency: int = 8, per_minute: float | None = None,
                 poll_interval: float = 30.0, wait: bool = True, llama=None, tokenizer=None,
                 timeout: float = 120.0, checkpoint: str | None = None) -> Backend:
    """A backend by name (see the module docstring); ``features`` is the artifact it works for. ``checkpoint``:
    the local backend's checkpoint fingerprint (``capture.model_fingerprint``), recorded in the journal."""
    from llama_sae.interpret import backends, batches

    results_dir = Path(features.path) / "batches"
    batch_kw = {"results_dir": results_dir, "poll_interval": poll_interval, "wait": wait, "timeout": timeout}
    if name == "offline":
        return backends.OfflineBackend(features)
    if name == "chat":
        if model is None:
            raise UserError("the chat backend needs --llm-model NAME (the server's model name)")
        return backends.ChatBackend(model, base_url=base_url, api_key_env=api_key_env, concurrency=concurrency,
                                    per_minute=per_minute, timeout=timeout)
    if name == "anthropic":
        return batches.AnthropicBatchBackend(model or "claude-haiku-4-5", base_url=base_url, **batch_kw)
    if name == "openai-batch":
        return batches.OpenAIBatchBackend(model or "gpt-4o-mini", base_url=base_url, **batch_kw)
    if name == "local":
        if llama is None:
            raise UserError("the local backend needs the model: pass --model PATH (an instruct checkpoint)")
        return backends.LocalBackend(llama, tokenizer, model_name=model or "local", checkpoint=checkpoint)
    raise UserError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "explain", "make_backend", "score"]
