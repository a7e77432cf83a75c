"""Explainer / scorer backends behind one interface: ``backend.run(requests, journal)``.

- ``OfflineBackend``: no model, no key; distinctive terms of the activating sentences (offline.py).
- ``ChatBackend``: any OpenAI-compatible chat server (OpenAI, vLLM, llama.cpp, Ollama) through the
  official ``openai`` SDK, concurrent, rate-limited, with back-off on 429 / 5xx / connection errors.
- ``LocalBackend``: the Llama itself (an instruct checkpoint explains its own features), our generator.
- Batch APIs (batches.py): ``AnthropicBatchBackend``, ``OpenAIBatchBackend``.

A backend records one ``result`` line in the journal per request it finishes (succeeded, errored, ...);
the caller has already recorded the ``request`` lines.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from llama_sae.errors import UserError
from llama_sae.interpret.journal import Journal
from llama_sae.interpret.prompts import Prompt


@dataclass(frozen=True)
class Request:
    """One request: ``payload`` carries the structured task for the offline backend (never sent);
    ``meta`` is recorded in the journal (e.g. a scoring request's labels) so results need no rebuild."""

    custom_id: str
    prompt: Prompt
    latent: int
    task: str  # "explain" | "detection" | "fuzzing"
    max_tokens: int = 400
    payload: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    meta: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # journaled with the request


class Backend(ABC):
    """Turns requests into journal results."""

    name: str = "backend"
    model: str = ""
    batch_api: bool = False  # priced at the batch discount
    paid: bool = False  # a metered API: its cost is estimated and confirmed above a threshold
    secrets: tuple[str, ...] = ()  # the API keys it holds: redacted from every error it records or raises

    @abstractmethod
    def run(self, requests: Sequence[Request], journal: Journal) -> None:
        """Answer ``requests`` (not yet answered), recording a result line for each one finished."""

    def begin_run(self) -> None:  # noqa: B027 -- an optional hook: most backends keep no state between runs
        """Called once at the start of each explain / score run (state of the last run is forgotten)."""

    def identity(self) -> dict[str, Any]:
        """What, besides the name and model, makes this backend's answers its own (the server, the sampling
        temperature, the local checkpoint): a journal of the same name and model with other answers is another
        run's."""
        return {}


def env_key(variable: str, what: str) -> str:
    """An API key from the environment (never from files or options); UserError naming the variable."""
    key = os.environ.get(variable)
    if not key:
        raise UserError(f"{what} needs an API key in the environment variable {variable}, which is not set: "
                        f"export {variable}=... (keys are read only from the environment, never written)")
    return key


def url_for_record(url: str) -> str:
    """``url`` without a ``user:password@`` part, query or fragment (where a key in a URL would travel): what
    journals and messages may show of a server's address."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=host, query="", fragment=""))


def redact(text: str, secrets: Sequence[str]) -> str:
    """``text`` with each of ``secrets`` (API keys this run holds) shown as ``***``: a server or proxy that
    echoes the key in an error message must not put it into a journal or onto the terminal."""
    for secret in secrets:
        if secret and len(secret) >= 8:
            text = text.replace(secret, "***")
    return text


def is_local_url(url: str) -> bool:
    """Whether a server URL is on this machine or a private network (localhost, 127.x, 10.x, 192.168.x, 100.64.x
    as Tailscale uses, ..., *.local, a bare host name such as ``gpubox``): a self-hosted server, not a metered API."""
    import ipaddress
    from urllib.parse import urlparse

    host = (urlparse(url).hostname or "").lower()
    if host in ("localhost", "") or host.endswith((".local", ".localhost", ".internal")):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "." not in host  # a name of the local network; every public API's name has a dot
    return not ip.is_global  # loopback, private, link-local, shared (carrier-grade NAT), unspecified


def sdk(module: str, backend: str):
    """Import an optional SDK (anthropic, openai), or UserError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"the {backend} backend needs the {module} SDK: pip install 'llama-sae[interpret]'") from e


class RetryableError(Exception):
    """A transient failure (HTTP 429, 5xx, connection): retry after ``retry_after`` seconds if given.
    ``unreachable``: the connection was never made (refused, unknown host), unlike one dropped or timed out."""

    def __init__(self, message: str, retry_after: float | None = None, *, unreachable: bool = False):
        super().__init__(message)
        self.retry_after, self.unreachable = retry_after, unreachable


class RequestFailed(Exception):
    """A permanent failure of one request (HTTP 4xx, refused input): recorded as errored. ``fatal``: every
    other request would fail the same way (the key was refused): they are recorded unsent, not sent."""

    def __init__(self, message: str, *, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal


class MalformedReply(Exception):
    """The server answered, but not in the protocol's shape (garbage body): recorded as malformed."""


class RateLimiter:
    """At most ``per_minute`` request starts per minute across threads (evenly spaced)."""

    def __init__(self, per_minute: float | None, clock=time.monotonic, sleep=time.sleep):
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self.next = 0.0
        self.lock = threading.Lock()
        self.clock, self.sleep = clock, sleep

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = self.clock()
            start = max(now, self.next)
            self.next = start + self.interval
        if start > now:
            self.sleep(start - now)


class SyncBackend(Backend):
    """A backend answering one request at a time, ``concurrency`` at once, with retries and back-off."""

    def __init__(self, *, concurrency: int = 1, per_minute: float | None = None, max_attempts: int = 6,
                 backoff: float = 1.0, max_backoff: float = 60.0):
        self.concurrency = concurrency
        self.limiter = RateLimiter(per_minute)
        self.max_attempts, self.backoff, self.max_backoff = max_attempts, backoff, max_backoff
        self.attempts = 0  # HTTP attempts made (for tests and reports)
        self.reached = False  # the server has answered something in this run
        self.halted: str | None = None  # why the rest is not sent (never reached, or the key refused)

    def begin_run(self) -> None:
        self.reached, self.halted = False, None  # a server fixed since the last run is tried again

    @abstractmethod
    def complete(self, request: Request) -> str:
        """The reply text, or raise RetryableError / RequestFailed / MalformedReply."""

    def _one(self, request: Request, journal: Journal) -> None:
        def failed(status: str, error: str) -> None:
            journal.record_result(request.custom_id, status, error=redact(error, self.secrets))

        for attempt in range(self.max_attempts):
            if self.halted and attempt == 0:  # a wrong URL or key: the first requests said so, the rest are not
                return failed("errored", f"not sent: {self.halted}")  # tried (one in flight ends its attempts)
            self.limiter.wait()
            self.attempts += 1
            try:
                text = self.complete(request)
            except RetryableError as e:
                if not e.unreachable:  # (set only, never cleared: another thread may have set it)
                    self.reached = True
                if attempt + 1 == self.max_attempts:
                    if e.unreachable and not self.reached:
                        self.halted = redact(f"the server could not be reached ({e}) in {attempt + 1} attempts",
                                             self.secrets)
                    return failed("errored", f"gave up after {attempt + 1} attempts: {e}")
                delay = e.retry_after if e.retry_after is not None else self.backoff * 2**attempt
                time.sleep(min(delay, self.max_backoff) * (1 + 0.1 * random.random()))
                continue
            except RequestFailed as e:
                self.reached = True
                if e.fatal:
                    self.halted = redact(str(e), self.secrets)
                return failed("errored", str(e))
            except MalformedReply as e:
                self.reached = True
                return failed("malformed", str(e))
            self.reached = True
            journal.record_result(request.custom_id, "succeeded", text=text)
            return

    def run(self, requests: Sequence[Request], journal: Journal) -> None:
        if self.concurrency <= 1:
            for r in requests:
                self._one(r, journal)
            return
        pool = ThreadPoolExecutor(self.concurrency)
        try:
            for future in [pool.submit(self._one, r, journal) for r in requests]:
                future.result()
        finally:  # Ctrl-C (or a bug): the requests not started yet are dropped, not sent while the run exits
            pool.shutdown(wait=True, cancel_futures=True)


class OfflineBackend(SyncBackend):
    """The default: explanations and scores from term statistics, no model and no key (see offline.py)."""

    name = "offline"
    model = "offline-terms"

    def __init__(self, features):
        super().__init__()
        self.features = features
        self.pool = None

    def identity(self) -> dict[str, Any]:
        from llama_sae.interpret.run import code_digest

        return {"code": code_digest()}  # answers of another version of the explainer are not this one's

    def complete(self, request: Request) -> str:
        from llama_sae.interpret import offline

        if self.pool is None:
            self.pool = offline.background(self.features.pool_texts())
        return offline.answer(request, self.pool)

    def run(self, requests: Sequence[Request], journal: Journal, chunk: int = 256) -> None:
        """Answer in chunks of ``chunk`` results per journal write (one fsync each, not one per request)."""
        for i in range(0, len(requests), chunk):
            journal.append(*[{"kind": "result", "custom_id": r.custom_id, "status": "succeeded",
                              "text": self.complete(r), "error": None} for r in requests[i:i + chunk]])


class ChatBackend(SyncBackend):
    """Any OpenAI-compatible ``/v1/chat/completions`` server, through the official ``openai`` SDK.

    Args:
        model: the server's model name.
        base_url: e.g. http://localhost:8000/v1 (vLLM), http://localhost:11434/v1 (Ollama); None = OpenAI.
        api_key_env: environment variable holding the key (default OPENAI_API_KEY); required when named,
            and for any server that is not on this machine or the local network (OpenAI, OpenRouter, ...);
            optional for a local server (many need none).
        timeout: seconds to wait for one reply before it is retried (a slow self-hosted model may need more).

    A server that is not local is metered: its cost is estimated and confirmed (unknown for a model with no
    price here, so it is asked about), and OpenAI's own API gets its own length parameters.
    """

    name = "chat"

    def __init__(self, model: str, *, base_url: str | None = None, api_key_env: str | None = None,
                 concurrency: int = 8, per_minute: float | None = None, temperature: float = 0.0,
                 timeout: float = 120.0, **retry: Any):
        super().__init__(concurrency=concurrency, per_minute=per_minute, **retry)
        openai = sdk("openai", self.name)
        url = base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"  # as the SDK resolves it
        self.paid = not is_local_url(url)  # a self-hosted server costs nothing per token
        self.official = "api.openai.com" in url
        variable = api_key_env or "OPENAI_API_KEY"
        needed = api_key_env is not None or self.paid
        key = env_key(variable, f"the chat backend ({url_for_record(url)})") if needed else os.environ.get(variable)
        self.key_variable, self.secrets = variable, (key,) if key else ()
        self.openai = openai
        self.client = openai.OpenAI(api_key=key or "none", base_url=url, max_retries=0, timeout=timeout)
        self.model, self.temperature = model, temperature

    def identity(self) -> dict[str, Any]:
        return {"base_url": url_for_record(str(self.client.base_url)), "temperature": self.temperature}

    def complete(self, request: Request) -> str:
        o = self.openai
        try:
            resp = self.client.chat.completions.create(
                model=self.model, messages=request.prompt.messages(),
                **openai_limits(self.model, request.max_tokens, self.temperature, official=self.official))
        except o.APIConnectionError as e:  # no connection at all (refused, DNS), or one dropped or timed out
            never_connected = type(e.__cause__).__name__ == "ConnectError"  # (httpx's, or the SDK's own copy of it)
            raise RetryableError(str(e), unreachable=never_connected) from e
        except (o.RateLimitError, o.InternalServerError) as e:
            raise RetryableError(str(e), _retry_after(e)) from e
        except o.APIStatusError as e:
            if e.status_code >= 500 or e.status_code in (408, 409):
                raise RetryableError(str(e), _retry_after(e)) from e
            if e.status_code in (401, 403):  # the key: every request would be refused the same way
                fix = (f"the server refused the key in {self.key_variable}: set it to a key this server accepts"
                       if self.secrets else f"the server wants a key: set {self.key_variable}")
                raise RequestFailed(f"HTTP {e.status_code}: {e.message} ({fix})", fatal=True) from e
            raise RequestFailed(f"HTTP {e.status_code}: {e.message}") from e
        except (o.APIResponseValidationError, ValueError) as e:  # ValueError: a body that is not JSON at all
            raise MalformedReply(f"the server's reply is not a chat completion: {e}") from e
        try:
            text = resp.choices[0].message.content
        except (AttributeError, IndexError, TypeError) as e:
            raise MalformedReply(f"the server's reply is not a chat completion: {str(resp)[:200]!r}") from e
        if not isinstance(text, str):
            raise MalformedReply(f"the server's reply has no message text: {str(resp)[:200]!r}")
        if getattr(resp.choices[0], "finish_reason", None) == "length" and "}" not in text:  # no JSON object ended
            raise MalformedReply(f"the reply was cut at its {request.max_tokens}-token limit before its JSON answer "
                                 "ended" + (" (explain --max-tokens raises it; then run with --retry-failed)"
                                            if request.task == "explain" else " (a reasoning model may spend it "
                                                                              "thinking: use another model)"))
        return text


def openai_limits(model: str, max_tokens: int, temperature: float, *, official: bool) -> dict[str, Any]:
    """Length and temperature parameters for a chat completion. OpenAI's own API takes
    ``max_completion_tokens`` (its reasoning models refuse ``max_tokens`` and any temperature but the
    default); self-hosted servers (vLLM, llama.cpp, Ollama) take ``max_tokens``."""
    if not official:
        return {"max_tokens": max_tokens, "temperature": temperature}
    reasoning = model.startswith(("o1", "o3", "o4", "gpt-5"))
    return {"max_completion_tokens": max_tokens, **({} if reasoning else {"temperature": temperature})}


def _retry_after(e: Exception) -> float | None:
    """Seconds from a ``retry-after`` header, or None (absent, an HTTP date, negative, NaN: back off instead)."""
    response = getattr(e, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


class LocalBackend(Backend):
    """The Llama itself through our generator (chat format, greedy), ``batch`` prompts at a time."""

    name = "local"

    def __init__(self, model, tokenizer, *, model_name: str = "local", batch: int = 8, checkpoint: str | None = None):
        """``checkpoint``: a fingerprint of the checkpoint's files (the CLI passes one), so that answers of
        another checkpoint under the same ``model_name`` are never taken for this one's."""
        self.llama, self.tokenizer, self.model, self.batch = model, tokenizer, model_name, batch
        self.checkpoint = checkpoint

    def identity(self) -> dict[str, Any]:
        return {} if self.checkpoint is None else {"checkpoint": self.checkpoint}

    def run(self, requests: Sequence[Request], journal: Journal) -> None:
        from llama_sae.llama import generate

        for i in range(0, len(requests), self.batch):
            chunk = list(requests[i:i + self.batch])
            prompts = [r.prompt.messages() for r in chunk]
            limit = max(r.max_tokens for r in chunk)
            limit = min(limit, self.llama.args.max_seq_len - max(len(self.tokenizer.encode_chat(p)) for p in prompts))
            if limit <= 0:
                for r in chunk:
                    journal.record_result(r.custom_id, "errored", error="the prompt is longer than the model's "
                                          f"context ({self.llama.args.max_seq_len} tokens)")
                continue
            for r, out in zip(chunk, generate(self.llama, self.tokenizer, prompts, chat=True, max_new_tokens=limit)):
                journal.record_result(r.custom_id, "succeeded", text=out.text)
