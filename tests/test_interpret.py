"""Explain and score through every backend: the real anthropic / openai SDKs against local fake servers,
the journal across kills, every result type, cost confirmation, bad input, and the offline scorer."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
from fake_servers import FakeServer
from test_features import SOURCE, small_sae

from llama_sae import tinyworld
from llama_sae.errors import UserError
from llama_sae.features import build_features, load_features
from llama_sae.interpret import explain, make_backend, score
from llama_sae.interpret.backends import RateLimiter
from llama_sae.interpret.prompts import marked, parse_answers, parse_explanation
from llama_sae.interpret.scoring import balanced_accuracy, derangement
from llama_sae.llama import load_model, load_tokenizer

FAST = {"poll_interval": 0.0}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model = load_model(tinyworld.model_path(), dtype="float32")
    tok = load_tokenizer(tinyworld.model_path())
    sae = small_sae(model, d_sae=32)
    out = tmp_path_factory.mktemp("features")
    build_features(model, tok, sae, SOURCE, out, sentences=120, top_n=14, reservoir=8, pool=40, n_quantiles=4,
                   batch_size=32)
    return model, tok, out


@pytest.fixture()
def feats(built, tmp_path):
    shutil.copytree(built[2], tmp_path / "f")
    return load_features(tmp_path / "f")


@pytest.fixture()
def server(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-secret")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret")
    with FakeServer() as s:
        yield s


class Killed(BaseException):
    """A kill -9 stand-in: raised where the process would die."""


def die_after_create(backend) -> None:
    """Make the backend die right after the server created a batch, before the journal records its id."""
    create = backend.create

    def create_then_die(requests, local_id):
        create(requests, local_id)
        raise Killed

    backend.create = create_then_die


def _journal(f, task="explain") -> list[dict]:
    return [json.loads(x) for x in (f.path / f"{task}.journal.jsonl").read_text().splitlines()]


def _fates(f, pattern: list[str]) -> dict[str, str]:
    """custom_id -> fate, cycling ``pattern`` over the latents in order."""
    latents = f.live_latents()
    return {lat: pattern[i % len(pattern)] for i, lat in enumerate(latents)}


def _by_latent(fates: dict[int, str]):
    return lambda cid: fates[int(cid[1:].split("-")[0])]


# ---------------------------------------------------------------------------------------------------
# Anthropic Message Batches


def test_anthropic_batches_every_result_type_then_retry_only_failures(feats, server):
    f = feats
    fates = _fates(f, ["succeeded", "errored", "canceled", "expired", "malformed", "missing", "wrong-shape",
                       "succeeded"])
    server.state.fate = _by_latent(fates)
    server.state.reply = lambda text: 'Thinking... {"common_semantic": "cooking words", "certainty": 80}'
    b = make_backend("anthropic", f, model="claude-haiku-4-5", base_url=server.url, **FAST)
    out = explain(f, b, threshold=100.0, say=lambda s: None)
    ok = [lat for lat, fate in fates.items() if fate == "succeeded"]
    assert out["explained"] == len(ok)
    assert sorted(e for e in ok) == sorted(r["latent"] for r in map(json.loads, (
        f.path / "explanations.jsonl").read_text().splitlines()))
    assert f.explanation(ok[0]).text == "cooking words" and f.explanation(ok[0]).certainty == 0.8
    status = {r["custom_id"]: r["status"] for r in _journal(f) if r["kind"] == "result"}
    expected = {"succeeded", "errored", "canceled", "expired", "malformed", "missing"}
    assert set(status.values()) == expected
    assert server.calls("POST", "/v1/messages/batches") == 1
    sent = server.state.anthropic["msgbatch_0001"]["requests"]
    assert len(sent) == len(fates) and all(r["params"]["model"] == "claude-haiku-4-5" for r in sent)
    # the key never reaches the journal
    assert "secret" not in (f.path / "explain.journal.jsonl").read_text()

    explain(f, b, threshold=100.0, say=lambda s: None)  # again: nothing to send, nothing lost
    assert server.calls("POST", "/v1/messages/batches") == 1 and f.explanation(ok[0]) is not None

    server.state.fate = lambda cid: "succeeded"
    out = explain(f, b, retry_failed=True, threshold=100.0, say=lambda s: None)
    assert server.calls("POST", "/v1/messages/batches") == 2
    resent = {r["custom_id"] for r in server.state.anthropic["msgbatch_0002"]["requests"]}
    failed = {cid for cid, s in status.items() if s != "succeeded"}
    assert resent == failed and out["explained"] == len(fates)


def test_anthropic_kill_between_create_and_record_is_reconciled(feats, server):
    f = feats
    b = make_backend("anthropic", f, base_url=server.url, **FAST)
    die_after_create(b)
    with pytest.raises(Killed):
        explain(f, b, threshold=100.0, say=lambda s: None)
    kinds = [r["kind"] for r in _journal(f)]
    assert "batch_pending" in kinds and "batch" not in kinds
    b2 = make_backend("anthropic", f, base_url=server.url, **FAST)
    out = explain(f, b2, threshold=100.0, say=lambda s: None)
    assert server.calls("POST", "/v1/messages/batches") == 1  # found in the server's list, not re-created
    assert out["explained"] == len(f.live_latents())
    assert any(r.get("reconciled") for r in _journal(f))


def test_anthropic_download_cut_halfway_is_retried(feats, server):
    f = feats
    server.state.cut_next_download = True
    b = make_backend("anthropic", f, base_url=server.url, **FAST)
    out = explain(f, b, threshold=100.0, say=lambda s: None)
    assert out["explained"] == len(f.live_latents())
    results = [p for m, p, _ in server.state.log if p.endswith("/results")]
    assert len(results) == 2  # one cut, one whole
    assert (f.path / "batches" / "msgbatch_0001.jsonl").exists()


def test_server_garbage_is_one_line_and_nothing_is_sent_twice(feats, server):
    f = feats
    server.state.garbage_next_create = True
    b = make_backend("anthropic", f, base_url=server.url, **FAST)
    with pytest.raises(UserError, match="failed to create a batch.*run the same command again") as e:
        explain(f, b, threshold=100.0, say=lambda s: None)
    assert "\n" not in str(e.value)
    out = explain(f, b, threshold=100.0, say=lambda s: None)  # the garbage created nothing: lost, re-sent once
    assert out["explained"] == len(f.live_latents()) and len(server.state.anthropic) == 1
    assert [r["kind"] for r in _journal(f)].count("batch_lost") == 1


def test_no_wait_submits_then_a_later_run_collects(feats, server):
    f = feats
    server.state.polls_to_end = 3
    b = make_backend("anthropic", f, base_url=server.url, wait=False, **FAST)
    out = explain(f, b, threshold=100.0, say=lambda s: None)
    assert out["explained"] == 0 and out["outcomes"] == {"unanswered": len(f.live_latents())}
    lines = []
    out = explain(f, make_backend("anthropic", f, base_url=server.url, **FAST), threshold=100.0, say=lines.append)
    assert out["explained"] == len(f.live_latents()) and server.calls("POST", "/v1/messages/batches") == 1
    assert f"{len(f.live_latents())} in open batches, 0 to send" in lines[0]


# ---------------------------------------------------------------------------------------------------
# OpenAI Batch API


def test_openai_batch_output_and_error_files(feats, server):
    f = feats
    fates = _fates(f, ["succeeded", "errored", "expired", "malformed", "succeeded"])
    server.state.fate = _by_latent(fates)
    b = make_backend("openai-batch", f, model="gpt-4o-mini", base_url=server.url + "/v1", **FAST)
    out = explain(f, b, threshold=100.0, say=lambda s: None)
    results = [r for r in _journal(f) if r["kind"] == "result"]
    status = {r["custom_id"]: r["status"] for r in results}
    # a torn line names no request: that request is "missing", and the error counts the bad line
    assert sorted(set(status.values())) == ["errored", "expired", "missing", "succeeded"]
    n_bad = sum(v == "malformed" for v in fates.values())
    assert all(f"({n_bad} malformed lines)" in r["error"] for r in results if r["status"] == "missing")
    assert out["explained"] == sum(v == "succeeded" for v in fates.values())
    (upload,) = [x for x in server.state.files.values() if b'"method": "POST"' in x]
    line = json.loads(upload.splitlines()[0])
    assert line["url"] == "/v1/chat/completions" and line["body"]["model"] == "gpt-4o-mini"
    assert line["body"]["max_completion_tokens"] == 300 and line["body"]["temperature"] == 0.0
    assert server.calls("POST", "/v1/batches") == 1 and server.calls("POST", "/v1/files") == 1


@pytest.mark.parametrize("backend, path", [("anthropic", "/v1/messages/batches"), ("openai-batch", "/v1/batches")])
def test_a_failed_creation_is_not_retried_into_a_second_batch(feats, server, backend, path):
    """The server created the batch but answered 500: no SDK retry (a second, billed batch); the next run
    finds the one batch and collects it."""
    f = feats
    url = server.url + ("/v1" if backend == "openai-batch" else "")
    server.state.error_after_next_create = True
    with pytest.raises(UserError, match="failed to create a batch.*run the same command again"):
        explain(f, make_backend(backend, f, base_url=url, **FAST), threshold=100.0, say=lambda s: None)
    assert server.calls("POST", path) == 1
    out = explain(f, make_backend(backend, f, base_url=url, **FAST), threshold=100.0, say=lambda s: None)
    assert server.calls("POST", path) == 1 and out["explained"] == len(f.live_latents())
    assert any(r.get("reconciled") for r in _journal(f))


@pytest.mark.parametrize("status, message", [
    (401, "refused the API key in ANTHROPIC_API_KEY when asked to create a batch.*set it to a valid key"),
    (413, "failed to create a batch.*fix the request or the settings it names"),
])
def test_a_batch_the_server_refused_is_priced_and_asked_about_again(feats, server, status, message):
    """A creation answered 4xx made no batch: the next run prices those requests and asks (it used to count them
    as in an open batch, print cost $0.00 and send them unasked); the key's variable is named, never the key."""
    f = feats
    server.state.refuse_next_create = (status, {"type": "error", "error": {
        "type": "authentication_error", "message": "invalid x-api-key sk-ant-test-secret"}})
    with pytest.raises(UserError, match=message) as e:
        explain(f, make_backend("anthropic", f, base_url=server.url, **FAST), threshold=100.0, say=lambda s: None)
    assert "sk-ant-test-secret" not in str(e.value) and "***" in str(e.value)
    said, asked = [], []
    with pytest.raises(UserError, match="above the --confirm-above threshold"):
        explain(f, make_backend("anthropic", f, base_url=server.url, **FAST), threshold=0.0, say=said.append,
                confirm=lambda q: asked.append(q) or False)
    n = len(f.live_latents())
    assert asked == [f"send {n} requests for {said[-1].rsplit('cost ≤ ', 1)[1]}?"] and "0 in open batches" in said[-1]
    assert server.calls("POST", "/v1/messages/batches") == 1 and not list(f.path.rglob("*secret*"))
    assert "sk-ant-test-secret" not in (f.path / "explain.journal.jsonl").read_text()


def test_a_batch_whose_creation_may_have_reached_the_server_is_looked_up_before_the_estimate(feats, server):
    """A 5xx after creating: the next run finds that batch before pricing, so nothing is counted twice."""
    f = feats
    server.state.error_after_next_create = True
    with pytest.raises(UserError, match="run the same command again"):
        explain(f, make_backend("anthropic", f, base_url=server.url, **FAST), threshold=100.0, say=lambda s: None)
    said = []
    out = explain(f, make_backend("anthropic", f, base_url=server.url, **FAST), threshold=0.0, say=said.append,
                  confirm=lambda q: False)  # nothing left to send: not asked
    n = len(f.live_latents())
    assert f"{n} in open batches, 0 to send" in said[0] and out["explained"] == n
    assert server.calls("POST", "/v1/messages/batches") == 1


def test_reconcile_never_adopts_a_batch_the_journal_knows(feats, server):
    """A creation killed before it reached the server, with an earlier batch of the same size a minute old:
    the earlier batch is not adopted; the requests go out again in a new batch."""
    f = feats
    first, second = f.live_latents()[:2], f.live_latents()[2:4]
    explain(f, make_backend("anthropic", f, base_url=server.url, **FAST), latents=first, threshold=100.0,
            say=lambda s: None)
    b = make_backend("anthropic", f, base_url=server.url, **FAST)

    def die_before_the_server(requests, local_id):
        raise Killed

    b.create = die_before_the_server
    with pytest.raises(Killed):
        explain(f, b, latents=second, threshold=100.0, say=lambda s: None)
    out = explain(f, make_backend("anthropic", f, base_url=server.url, **FAST), latents=second, threshold=100.0,
                  say=lambda s: None)
    assert out["explained"] == 2 and server.calls("POST", "/v1/messages/batches") == 2
    assert [r["kind"] for r in _journal(f)].count("batch_lost") == 1 and not any(r.get("reconciled")
                                                                                for r in _journal(f))


def test_a_latent_named_twice_is_asked_once(feats, server):
    f = feats
    lat = f.live_latents()[0]
    b = make_backend("chat", f, model="m", base_url=server.url + "/v1")
    out = explain(f, b, latents=[lat, lat], threshold=100.0, say=lambda s: None)
    assert out["requests"] == 1 and server.calls("POST", "/v1/chat/completions") == 1
    assert len((f.path / "explanations.jsonl").read_text().splitlines()) == 1


def test_openai_batch_kill_reconciled_by_metadata_and_expired_batch(feats, server):
    f = feats
    server.state.openai_batch_status = "expired"
    server.state.fate = _by_latent(_fates(f, ["succeeded", "canceled"]))
    b = make_backend("openai-batch", f, base_url=server.url + "/v1", **FAST)
    die_after_create(b)
    with pytest.raises(Killed):
        explain(f, b, threshold=100.0, say=lambda s: None)
    out = explain(f, make_backend("openai-batch", f, base_url=server.url + "/v1", **FAST), threshold=100.0,
                  say=lambda s: None)
    assert server.calls("POST", "/v1/batches") == 1
    assert out["outcomes"]["expired"] == len(f.live_latents()) // 2


# ---------------------------------------------------------------------------------------------------
# OpenAI-compatible chat servers


def test_chat_retries_429_and_5xx_and_records_garbage_and_4xx(feats, server):
    f = feats
    latents = f.live_latents()[:6]
    server.state.chat_script = [(429, '{"error": {"message": "slow down"}}', {"retry-after": "0"}),
                                (503, '{"error": {"message": "overloaded"}}', {"retry-after": "0"}),
                                (200, "<html>not json</html>", {}),
                                (400, '{"error": {"message": "context too long"}}', {})]
    b = make_backend("chat", f, model="llama-3.1-8b-instruct", base_url=server.url + "/v1", concurrency=1)
    b.backoff = 0.0
    out = explain(f, b, latents=latents, threshold=100.0, say=lambda s: None)
    assert out["outcomes"] == {"malformed": 1, "errored": 1, "succeeded": 4}
    assert server.calls("POST", "/v1/chat/completions") == 8  # 6 requests + 2 retries
    explain(f, b, latents=latents, threshold=100.0, say=lambda s: None)
    assert server.calls("POST", "/v1/chat/completions") == 8  # nothing re-sent


def test_a_refused_key_stops_the_run_and_bad_retry_after_values_are_ignored(feats, server):
    """A 401 names the variable and sends nothing more; a key the server echoes is not journaled; a negative or
    NaN retry-after falls back to back-off (it crashed the run)."""
    f = feats
    latents = f.live_latents()[:6]
    server.state.chat_script = [(429, '{"error": {"message": "slow"}}', {"retry-after": "-1"}),
                                (503, '{"error": {"message": "busy"}}', {"retry-after": "nan"}),
                                (401, '{"error": {"message": "bad key sk-test-secret"}}', {})]
    b = make_backend("chat", f, model="m", base_url=server.url + "/v1", concurrency=1)
    b.backoff = 0.0
    out = explain(f, b, latents=latents, threshold=100.0, say=lambda s: None)
    assert out["outcomes"] == {"errored": 6} and server.calls("POST", "/v1/chat/completions") == 3
    text = (f.path / "explain.journal.jsonl").read_text()
    assert "sk-test-secret" not in text and "bad key ***" in text
    assert "the server refused the key in OPENAI_API_KEY: set it to a key this server accepts" in text
    assert text.count("not sent: HTTP 401") == 5


def test_a_reply_cut_at_the_token_limit_says_so(feats, server):
    f = feats
    cut = {"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [{
        "index": 0, "message": {"role": "assistant", "content": '{"explanation": "words about'},
        "finish_reason": "length"}]}
    server.state.chat_script = [(200, json.dumps(cut), {})]
    b = make_backend("chat", f, model="m", base_url=server.url + "/v1", concurrency=1)
    out = explain(f, b, latents=f.live_latents()[:2], threshold=100.0, say=lambda s: None)
    assert out["outcomes"] == {"malformed": 1, "succeeded": 1}
    assert "cut at its 300-token limit before its JSON answer ended (explain --max-tokens raises it" in \
        out["first_error"]


def test_ctrl_c_drops_the_requests_not_started(feats, server):
    """KeyboardInterrupt in a concurrent chat run: the queued requests are cancelled, not sent on the way out
    (every one of them used to be sent before the run exited)."""
    f = feats
    b = make_backend("chat", f, model="m", base_url=server.url + "/v1", concurrency=2)
    complete, first = b.complete, threading.Lock()

    def interrupted_at_the_first(request):
        if first.acquire(blocking=False):
            raise KeyboardInterrupt  # reaches the main thread through the first future's result()
        return complete(request)

    b.complete = interrupted_at_the_first
    with pytest.raises(KeyboardInterrupt):
        explain(f, b, threshold=100.0, say=lambda s: None)
    assert len(f.live_latents()) > 10 and server.calls("POST", "/v1/chat/completions") <= 2


def test_a_run_with_no_answer_is_set_aside_when_the_model_changes(feats, server):
    """Every request failed (a wrong model name): the run with the right name starts a new journal by itself
    (--retry-failed or not), keeping the old one beside it; a journal with answers is still refused."""
    f = feats
    lat = f.live_latents()[:2]
    server.state.chat_script = [(404, '{"error": {"message": "model gooood not found"}}', {})] * 2
    out = explain(f, make_backend("chat", f, model="gooood", base_url=server.url + "/v1"), latents=lat,
                  threshold=100.0, say=lambda s: None)
    assert out["outcomes"] == {"errored": 2}
    said = []
    out = explain(f, make_backend("chat", f, model="good", base_url=server.url + "/v1"), latents=lat,
                  retry_failed=True, threshold=100.0, say=said.append)
    assert out["outcomes"] == {"succeeded": 2} and "set aside as explain.journal.jsonl." in said[0]
    assert len(list(f.path.glob("explain.journal.jsonl.*.old"))) == 1
    with pytest.raises(UserError, match="belongs to another run"):
        explain(f, make_backend("chat", f, model="other", base_url=server.url + "/v1"), latents=lat,
                threshold=100.0, say=lambda s: None)


def test_progress_counts_what_earlier_runs_answered_in_later_chunks(feats):
    """The bar ends at its total when chunks after the estimate hold answers of an earlier run."""
    f = feats
    live = f.live_latents()
    # earlier answers spread so that chunks after the first (of 2) are partly answered: not recorded as chunks
    explain(f, make_backend("offline", f), latents=live[1::2], chunk=len(live), say=lambda s: None)
    seen = []
    explain(f, make_backend("offline", f), latents=live, chunk=2, say=lambda s: None,
            progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (len(live), len(live)) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_chat_concurrent_each_request_once(feats, server):
    f = feats
    b = make_backend("chat", f, model="m", base_url=server.url + "/v1", concurrency=4)
    seen = []
    out = explain(f, b, threshold=100.0, say=lambda s: None, progress=lambda done, total: seen.append((done, total)))
    n = len(f.live_latents())  # progress from the backend's threads: 0 .. n, never backwards
    assert seen[0] == (0, n) and seen[-1] == (n, n) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert out["explained"] == len(f.live_latents())
    assert server.calls("POST", "/v1/chat/completions") == len(f.live_latents())
    ids = [r["custom_id"] for r in _journal(f) if r["kind"] == "result"]
    assert len(ids) == len(set(ids))


def test_openai_limits_per_server_and_model():
    from llama_sae.interpret.backends import openai_limits

    assert openai_limits("llama3", 50, 0.0, official=False) == {"max_tokens": 50, "temperature": 0.0}
    assert openai_limits("gpt-4o", 50, 0.0, official=True) == {"max_completion_tokens": 50, "temperature": 0.0}
    assert openai_limits("gpt-5-mini", 50, 0.0, official=True) == {"max_completion_tokens": 50}


def test_rate_limiter_spaces_requests():
    now = [0.0]
    slept = []
    lim = RateLimiter(120, clock=lambda: now[0], sleep=lambda s: slept.append(s))
    for _ in range(3):
        lim.wait()
    assert slept == [0.5, 1.0]


# ---------------------------------------------------------------------------------------------------
# Bad input, cost, journal identity


def test_missing_key_names_the_variable(feats, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(UserError, match="ANTHROPIC_API_KEY"):
        make_backend("anthropic", feats)
    with pytest.raises(UserError, match="OPENAI_API_KEY"):
        make_backend("openai-batch", feats)
    with pytest.raises(UserError, match="OPENAI_API_KEY"):
        make_backend("chat", feats, model="gpt-4o")
    with pytest.raises(UserError, match="MY_UNSET_KEY"):  # named explicitly: required, even for a local server
        make_backend("chat", feats, model="m", base_url="http://127.0.0.1:8000/v1", api_key_env="MY_UNSET_KEY")
    with pytest.raises(UserError, match="OPENAI_API_KEY"):  # a metered third-party API needs one too
        make_backend("chat", feats, model="m", base_url="https://openrouter.ai/api/v1")
    assert not make_backend("chat", feats, model="m", base_url="http://localhost:8000/v1").paid  # optional here
    from llama_sae.interpret.backends import is_local_url

    assert all(is_local_url(u) for u in ("http://gpubox:8000/v1", "http://100.101.7.3:8000/v1", "http://10.0.0.5/v1",
                                         "http://[::1]:8000/v1", "http://vllm.internal/v1"))
    assert not any(is_local_url(u) for u in ("https://api.openai.com/v1", "https://openrouter.ai/api/v1",
                                             "http://8.8.8.8/v1", "https://gpubox.example.com/v1"))
    with pytest.raises(UserError, match="unknown backend"):
        make_backend("claude", feats)


def test_cost_above_threshold_needs_confirmation_and_sends_nothing(feats, server):
    f = feats
    b = make_backend("anthropic", f, model="claude-opus-4-1", base_url=server.url, **FAST)
    lines = []
    with pytest.raises(UserError, match="--yes"):
        explain(f, b, threshold=0.0001, say=lines.append)
    assert "cost ≤ $" in lines[0] and not server.state.log
    asked = []
    with pytest.raises(UserError):
        explain(f, b, threshold=0.0001, confirm=lambda q: asked.append(q) or False, say=lines.append)
    assert asked and not server.state.log
    out = explain(f, b, threshold=0.0001, confirm=lambda q: True, say=lines.append)
    assert out["explained"] == len(f.live_latents())
    unpriced = make_backend("anthropic", f, model="claude-next", base_url=server.url, **FAST)  # no known price
    with pytest.raises(UserError, match="'claude-next' has no known price.*--yes"):
        explain(f, unpriced, fresh=True, say=lines.append)


def test_journal_from_another_run_is_refused(feats, server):
    f = feats
    explain(f, make_backend("offline", f), say=lambda s: None)
    b = make_backend("anthropic", f, base_url=server.url, **FAST)
    with pytest.raises(UserError, match="another run.*--fresh"):
        explain(f, b, threshold=100.0, say=lambda s: None)
    assert not server.state.log
    said = []
    out = explain(f, b, fresh=True, threshold=100.0, say=said.append)
    assert out["explained"] == len(f.live_latents()) and list(f.path.glob("explain.journal.jsonl.*.old"))
    assert said[0].startswith("explain: a new journal; the old one is kept as explain.journal.jsonl.")


def test_the_same_model_name_on_another_server_is_another_run(feats, server):
    """Answers from one server are never taken for another's model of the same name; a journal written before the
    server was recorded still resumes."""
    f = feats
    server.state.reply = lambda text: json.dumps({"explanation": "cats", "certainty": 0.5})
    latents = f.live_latents()[:3]
    first = explain(f, make_backend("chat", f, model="m", base_url=server.url + "/v1"), latents=latents,
                    say=lambda s: None)
    assert first["explained"] == 3 and _journal(f)[0]["backend_identity"]["base_url"] == server.url + "/v1/"
    with FakeServer() as other:
        with pytest.raises(UserError, match=r"another run \(backend_identity .*--fresh"):
            explain(f, make_backend("chat", f, model="m", base_url=other.url + "/v1"), latents=latents,
                    say=lambda s: None)
        assert not other.state.log
    lines = (f.path / "explain.journal.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    del header["backend_identity"]  # as an older version wrote it
    (f.path / "explain.journal.jsonl").write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    sent = len(server.state.log)
    again = explain(f, make_backend("chat", f, model="m", base_url=server.url + "/v1"), latents=latents,
                    say=lambda s: None)
    assert again["explained"] == 3 and len(server.state.log) == sent  # resumed: nothing sent again


def test_artifact_rebuilt_invalidates_journal(feats, built, tmp_path):
    f = feats
    explain(f, make_backend("offline", f), say=lambda s: None)
    meta = json.loads((f.path / "features.json").read_text())
    meta["build_id"] = "another"
    (f.path / "features.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="different builds"):
        load_features(f.path)


# ---------------------------------------------------------------------------------------------------
# Prompts, parsing, scoring, offline and local backends


def test_parsing_is_tolerant_and_strict_where_it_matters():
    assert parse_explanation('```json\n{"explanation": "dates", "certainty": 0.9}\n```') == ("dates", 0.9)
    assert parse_explanation('{"a": 1} then {"common_semantic": " cooking ", "certainty": "75%"}') == (
        "cooking", 0.75)
    assert parse_explanation('{"explanation": "x", "certainty": 90}') == ("x", 0.9)
    assert parse_explanation("no json here") == (None, None)
    assert parse_explanation('{"explanation": "dates\\n2. sentence\\t one"}') == ("dates 2. sentence one", None)
    long = parse_explanation(json.dumps({"explanation": "word " * 500}))[0]
    assert len(long) <= 401 and long.endswith("word…")
    assert parse_explanation('{"explanation": ""}') == (None, None)
    assert parse_explanation('{"explanation": "x", "certainty": "high"}') == ("x", None)
    assert parse_answers('{"answers": [1, 0, "1"]}', 3) == [1, 0, 1]
    assert parse_answers('{"answers": [1, 0]}', 3) is None and parse_answers('{"answers": [1, 2]}', 2) is None
    # objects nested in the answer belong to it; a trailing object without the key does not replace it
    assert parse_explanation('{"explanation": "animals", "certainty": 0.8, "evidence": {"top": "cat"}}') == (
        "animals", 0.8)
    assert parse_answers('{"answers": [1, 0], "why": {"1": "a"}} {"note": 1}', 2) == [1, 0]
    for bad in ("150", "NaN", '"1e5"', '"high"'):  # out of range or not a number: no certainty, not 0 or 1
        assert parse_explanation(f'{{"explanation": "x", "certainty": {bad}}}') == ("x", None)
    assert marked([" The", " chef", " bak", "ed", " bread", "."], [0, 1, 1, 1, 0, 1]) == \
        "The <<chef baked>> bread<<.>>"


def test_held_out_examples_are_never_shown_to_the_explainer(feats):
    from llama_sae.interpret.scoring import held_out

    f = feats
    for latent in f.live_latents():
        shown = {e.sentence for e in f.examples(latent, "max", 10) + f.examples(latent, "quantile")[0::2]}
        for sample in ("top", "quantile"):
            assert not shown & {e.sentence for e in held_out(f, latent, 4, sample)}


def test_scorer_holds_out_past_the_top_sentences_the_explainer_was_shown(feats, monkeypatch):
    from llama_sae.interpret import scoring

    f = feats
    explain(f, make_backend("offline", f), n_top=6, say=lambda s: None)  # shown: the top 6, not the default 10
    asked = []
    real = scoring.held_out
    monkeypatch.setattr(scoring, "held_out", lambda *a, **k: asked.append(k.get("n_top")) or real(*a, **k))
    score(f, make_backend("offline", f), n=4, say=lambda s: None)
    assert asked and set(asked) == {6}
    for latent in f.live_latents():
        shown = {e.sentence for e in f.examples(latent, "max", 6)}
        assert not shown & {e.sentence for e in real(f, latent, 4, "top", n_top=6)}


def test_spearman_against_scipy_free_reference():
    from llama_sae.interpret.scoring import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks: x ranks [0, 1.5, 1.5, 3], y ranks [0, 1, 2, 3] -> Pearson of the ranks
    rx, ry = torch.tensor([0, 1.5, 1.5, 3.0]), torch.tensor([0, 1, 2, 3.0])
    ref = float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])
    assert spearman([1, 2, 2, 5], [1, 2, 3, 4]) == pytest.approx(ref)
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1, 2], [1, 2]) is None


def test_balanced_accuracy_and_interval():
    ba, lo, hi = balanced_accuracy([1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 0])
    assert ba == pytest.approx((2 / 3 + 2 / 3) / 2) and lo < ba < hi
    assert balanced_accuracy([1, 1, 0, 0], [1, 1, 0, 0])[0] == 1.0
    d = derangement([3, 5, 8, 13])
    assert sorted(d) == [3, 5, 8, 13] and sorted(d.values()) == [3, 5, 8, 13] and all(k != v for k, v in d.items())
    # one latent more changes two pairs (its own and the one now pointing to it): the other controls are not re-sent
    before, after = derangement(list(range(0, 400, 2))), derangement(list(range(0, 400, 2)) + [201])
    assert sum(before[k] != after[k] for k in before) == 1 and 201 in after


def test_offline_explain_and_score_end_to_end(feats):
    f = feats
    with pytest.raises(UserError, match="no explanations to score.*llama-sae explain"):
        score(f, make_backend("offline", f), say=lambda s: None)
    out = explain(f, make_backend("offline", f), say=lambda s: None)
    assert out["explained"] == len(f.live_latents())
    res = score(f, make_backend("offline", f), n=5, say=lambda s: None)
    assert res["detection"] is not None and res["control_detection"] is not None
    assert 0.0 <= res["detection"] <= 1.0 and abs(res["control_detection"] - 0.5) < 0.2
    assert res["scored"] + res["unscorable"] == res["latents"] == len(f.live_latents()) and res["scored"] > 0
    e = f.explanation(f.live_latents()[0])
    assert e.detection is not None and e.fuzzing is not None
    assert f.search(e.text.split('"')[1])  # explanations quote their terms
    rows = [json.loads(x) for x in (f.path / "scores.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"detection", "fuzzing"} and any(r["control"] for r in rows)
    assert all(r["ci_low"] <= r["balanced_accuracy"] <= r["ci_high"] for r in rows)


def test_score_with_a_remote_backend_parses_answers(feats, server):
    f = feats
    explain(f, make_backend("offline", f), say=lambda s: None)
    n_items = {}

    def reply(text):  # answer 1 for every numbered sentence
        k = sum(1 for line in text.splitlines() if line[:1].isdigit())
        n_items[k] = n_items.get(k, 0) + 1
        return json.dumps({"answers": [1] * k})

    server.state.reply = reply
    res = score(f, make_backend("chat", f, model="m", base_url=server.url + "/v1"), n=4, threshold=100.0,
                say=lambda s: None)
    assert res["detection"] == pytest.approx(0.5) and res["fuzzing"] == pytest.approx(0.5)  # all-yes is chance


def test_local_backend_runs_the_model(feats, built):
    model, tok, _ = built
    f = feats
    b = make_backend("local", f, llama=model, tokenizer=tok)
    latents = f.live_latents()[:2]
    # the tiny model's context is short: prompts longer than it are refused per request, the rest generated
    out = explain(f, b, latents=latents, max_tokens=16, n_top=1, say=lambda s: None)
    assert sum(out["outcomes"].values()) == 2
    assert set(out["outcomes"]) <= {"succeeded", "malformed", "errored"}
    texts = [r for r in _journal(f) if r["kind"] == "result" and r["status"] != "errored"]
    assert texts and all(r["text"] for r in texts)  # the model generated (and its text is kept, parsed or not)


def test_cli_local_backend_records_its_checkpoint(feats):
    """Two checkpoints explained under the same --llm-model name are two runs: the journal pins the files' digest."""
    from typer.testing import CliRunner

    from llama_sae.capture import model_fingerprint
    from llama_sae.cli import app

    latent = feats.live_latents()[0]
    r = CliRunner().invoke(app, ["explain", str(feats.path), "--backend", "local", "--latents", str(latent),
                                 "--n-top", "1", "--max-tokens", "4"])
    assert "1 latents explained" in r.output or "every explain request failed" in r.output, r.output  # tiny model
    header = _journal(feats)[0]
    assert header["backend_identity"] == {"checkpoint": model_fingerprint(tinyworld.model_path())}


def test_cli_explain_and_score_offline(feats):
    from typer.testing import CliRunner

    from llama_sae.cli import app

    r = CliRunner().invoke(app, ["explain", str(feats.path)])
    assert r.exit_code == 0, r.output
    assert f"{len(feats.live_latents())} of {len(feats.live_latents())} latents explained" in r.output
    r = CliRunner().invoke(app, ["score", str(feats.path), "--n", "4"])
    assert r.exit_code == 0, r.output
    assert "control_detection: mean balanced accuracy" in r.output
    assert torch.is_tensor(load_features(feats.path).frequency)


def test_ground_truth_judge_names_concepts():
    from llama_sae.interpret.groundtruth import names_concept

    assert names_concept('the tokens "chef", "oven", "telescope", "garlic"', "cooking")
    assert not names_concept('the tokens "chef", "oven", "telescope", "garlic"', "astronomy")
    assert names_concept('the tokens "?"', "question") and names_concept("the tokens quotation marks", "quotation")
    assert names_concept('the tokens "january", "march"', "date") and names_concept('"if"', "conditional")
    assert names_concept("Questions about the weather", "weather") and not names_concept(None, "weather")


def test_chunks_submit_every_batch_before_collecting(feats, server):
    f = feats
    n = len(f.live_latents())
    lines = []
    out = explain(f, make_backend("anthropic", f, base_url=server.url, **FAST), chunk=4, threshold=100.0,
                  say=lines.append)
    assert out["explained"] == n and len(server.state.anthropic) == -(-n // 4)
    assert "(the chunks not built yet priced like the 4 requests of this one)" in lines[0]
    posts = [i for i, (m, p, _) in enumerate(server.state.log) if m == "POST"]
    polls = [i for i, (m, p, _) in enumerate(server.state.log) if m == "GET" and p.count("/") == 4]
    assert max(posts) < min(polls)  # every chunk submitted before the first poll
    sent = [r["custom_id"] for b in server.state.anthropic.values() for r in b["requests"]]
    assert len(sent) == len(set(sent)) == n


def test_chunked_scores_equal_unchunked(feats, tmp_path):
    f = feats
    explain(f, make_backend("offline", f), say=lambda s: None)
    whole = score(f, make_backend("offline", f), n=4, say=lambda s: None)
    rows = sorted((f.path / "scores.jsonl").read_text().splitlines())
    shutil.copytree(f.path, tmp_path / "g", ignore=shutil.ignore_patterns("score.journal.jsonl", "scores.jsonl"))
    g = load_features(tmp_path / "g")
    parts = score(g, make_backend("offline", g), n=4, chunk=3, say=lambda s: None)
    assert sorted((g.path / "scores.jsonl").read_text().splitlines()) == rows
    assert parts["detection"] == whole["detection"] and parts["control_fuzzing"] == whole["control_fuzzing"]


def test_cli_batch_backend_no_wait_then_collect(feats, server):
    from typer.testing import CliRunner

    from llama_sae.cli import app

    args = ["explain", str(feats.path), "--backend", "anthropic", "--base-url", server.url, "--poll", "0"]
    server.state.polls_to_end = 2
    r = CliRunner().invoke(app, args + ["--no-wait", "--yes"])
    assert r.exit_code == 0, r.output
    assert "0 of" in r.output and "'unanswered'" in r.output
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    n = len(feats.live_latents())
    assert f"{n} of {n} latents explained" in r.output and len(server.state.anthropic) == 1
    r = CliRunner(env={"ANTHROPIC_API_KEY": ""}).invoke(app, args)
    assert isinstance(r.exception, UserError) and "ANTHROPIC_API_KEY" in str(r.exception)


def test_journal_append_after_a_torn_line_starts_a_line_of_its_own(tmp_path):
    from llama_sae.interpret.journal import Journal

    path = tmp_path / "explain.journal.jsonl"
    header = {"task": "explain", "backend": "offline", "model": None, "features_build": "b"}
    Journal(path, header).append({"kind": "request", "custom_id": "a", "latent": 1})
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"kind": "result", "custom_id": "a", "sta')  # killed mid-write
    journal = Journal(path, header)  # its writer cuts the torn line ...
    journal.record_result("a", "succeeded", text="cats")  # ... so this record is a line of its own
    with pytest.raises(UserError, match="another run is using .*explain.journal.jsonl"):
        Journal(path, header)  # a second writer while the first holds it (two runs at once)
    journal.close()
    assert not (tmp_path / "explain.journal.jsonl.lock").exists()  # a finished run leaves no lock file
    again = Journal(path, header)
    assert again.state.succeeded("a") and again.state.results["a"]["text"] == "cats"
    assert len(path.read_text().splitlines()) == 3  # header, request, result



def test_a_rerun_on_the_same_inputs_builds_no_prompt_and_gives_the_same_output(feats, monkeypatch):
    import sys

    import llama_sae.interpret.scoring as scoring_mod

    explain_mod = sys.modules["llama_sae.interpret.explain"]  # (the package's `explain` attribute is the function)

    f = feats
    explain(f, make_backend("offline", f), say=lambda s: None)
    first = score(f, make_backend("offline", f), n=5, say=lambda s: None)
    scores = (f.path / "scores.jsonl").read_bytes()

    def no_prompts(*a, **kw):
        raise AssertionError("a rerun on unchanged inputs built prompts")

    said = []
    with monkeypatch.context() as m:
        m.setattr(scoring_mod, "score_requests", no_prompts)
        m.setattr(explain_mod, "explain_requests", no_prompts)
        again = score(f, make_backend("offline", f), n=5, say=said.append)
        explain(f, make_backend("offline", f), say=said.append)
    assert {k: v for k, v in again.items() if k != "outcomes"} == {k: v for k, v in first.items() if k != "outcomes"}
    assert (f.path / "scores.jsonl").read_bytes() == scores
    assert sum("answered by an earlier run" in s for s in said) == 2
    # another n, or a changed explanation, is other inputs: the prompts are built again
    calls = []
    real = scoring_mod.score_requests
    monkeypatch.setattr(scoring_mod, "score_requests", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    score(f, make_backend("offline", f), n=4, say=lambda s: None)
    assert calls
    rows = [json.loads(x) for x in (f.path / "explanations.jsonl").read_text().splitlines()]
    rows[0]["explanation"] = "something else entirely"
    (f.path / "explanations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls.clear()
    score(f, make_backend("offline", f), n=5, say=lambda s: None)
    assert calls
    # a new version of the code that builds prompts is other inputs too (a prompt fix must reach old journals)
    import llama_sae.interpret.run as run_mod

    calls.clear()
    monkeypatch.setattr(run_mod, "code_digest", lambda: "another version")
    score(f, make_backend("offline", f), n=5, say=lambda s: None)
    assert calls
    # a stricter reply parser still applies on the shortcut: a reply it rejects is marked malformed
    calls.clear()
    journal_lines = len(_journal(f, "score"))
    score(f, make_backend("offline", f), n=5, say=lambda s: None)
    assert not calls and len(_journal(f, "score")) == journal_lines  # shortcut taken, no second complete record
    monkeypatch.setattr(scoring_mod, "parse_answers", lambda text, n: None)
    out = score(f, make_backend("offline", f), n=5, say=lambda s: None)
    assert not calls and out["outcomes"].get("malformed")


def test_outputs_are_written_while_the_journal_is_still_locked(feats, monkeypatch):
    """explanations.jsonl is merged (read, then rewritten) and scores.jsonl rewritten after the requests: another
    run started in between must wait for the lock, or it could merge from the old file and drop this run's rows."""
    import sys

    import llama_sae.interpret.scoring as scoring_mod
    from llama_sae.interpret.journal import Journal

    explain_mod = sys.modules["llama_sae.interpret.explain"]  # (the package's `explain` attribute is the function)
    f, seen = feats, []

    def second_run(task):
        try:
            header = {k: v for k, v in _journal(f, task)[0].items() if k != "kind"}  # the same run's settings
            Journal(f.path / f"{task}.journal.jsonl", header).close()
            seen.append((task, "free"))
        except UserError as e:
            seen.append((task, "locked" if "another run is using" in str(e) else str(e)))

    real_explain_write, real_score_write = explain_mod.atomic_write, scoring_mod.atomic_write
    monkeypatch.setattr(explain_mod, "atomic_write", lambda *a: (second_run("explain"), real_explain_write(*a)))
    monkeypatch.setattr(scoring_mod, "atomic_write", lambda *a: (second_run("score"), real_score_write(*a)))
    explain(f, make_backend("offline", f), say=lambda s: None)
    score(f, make_backend("offline", f), n=4, say=lambda s: None)
    assert seen == [("explain", "locked"), ("score", "locked")]
    second_run("explain"), second_run("score")  # released once the outputs are written
    assert seen[2:] == [("explain", "free"), ("score", "free")]
    assert not list(f.path.glob("*.lock"))


def test_a_score_of_an_explanation_replaced_since_is_not_shown(feats):
    """scores.jsonl names the explanation it scored: a latent explained again shows no score until scored again."""
    f = feats
    explain(f, make_backend("offline", f), say=lambda s: None)
    score(f, make_backend("offline", f), n=5, say=lambda s: None)
    scored = [l for l, e in f.explanations().items() if e.detection is not None]
    rows = [json.loads(line) for line in (f.path / "explanations.jsonl").read_text().splitlines()]
    for row in rows:
        if row["latent"] == scored[0]:
            row["explanation"] = "a different explanation"
    (f.path / "explanations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    f.reload_explanations()
    assert f.explanation(scored[0]).detection is None and f.explanation(scored[1]).detection is not None


def test_score_estimate_counts_only_the_requests_scorable_latents_make(feats):
    """Latents without held-out activating or non-activating sentences ask nothing: the printed request count (from
    the first chunk, doubled for the control) is the number sent, not two per latent and method."""
    f, said = feats, []
    explain(f, make_backend("offline", f), say=lambda s: None)
    res = score(f, make_backend("offline", f), n=5, say=said.append)
    sent = sum(res["outcomes"].values())
    assert res["unscorable"] > 0 and sent < 4 * res["latents"]  # the case this is about
    assert any(s.startswith(f"score: ~{sent} requests, 0 already answered") for s in said), said  # (~: the control's
    # chunk is counted by its units before it is built)


def test_a_run_killed_between_chunks_builds_only_the_unfinished_chunks_again(feats, built, tmp_path, monkeypatch):
    """Each finished chunk is recorded: the run started again after a kill builds the prompts of the chunks that had
    not finished, and ends with the same explanations and scores as a run never killed."""
    import sys

    import llama_sae.interpret.scoring as scoring_mod
    from llama_sae.interpret.backends import OfflineBackend

    explain_mod = sys.modules["llama_sae.interpret.explain"]
    f, whole = feats, load_features(shutil.copytree(built[2], tmp_path / "whole"))
    explain(whole, make_backend("offline", whole), chunk=4, say=lambda s: None)
    score(whole, make_backend("offline", whole), n=5, chunk=4, say=lambda s: None)

    real_run, runs = OfflineBackend.run, []

    def run_then_die_on_third(self, requests, journal, *a):
        runs.append(1)
        if len(runs) == 3:
            raise Killed
        real_run(self, requests, journal, *a)

    built_chunks = []

    def counting(real, latents_at):  # record (the chunk's latents, control) of each chunk built
        def wrapper(features, *a, **kw):
            built_chunks.append((sorted(a[latents_at]), kw.get("control")))
            return real(features, *a, **kw)
        return wrapper

    monkeypatch.setattr(explain_mod, "explain_requests", counting(explain_mod.explain_requests, 0))
    monkeypatch.setattr(scoring_mod, "score_requests", counting(scoring_mod.score_requests, 1))
    def run(task, say=lambda s: None):
        if task == "explain":
            return explain(f, make_backend("offline", f), chunk=4, say=say)
        return score(f, make_backend("offline", f), n=5, chunk=4, say=say)

    for task in ("explain", "score"):
        runs.clear(), built_chunks.clear()
        with monkeypatch.context() as m:
            m.setattr(OfflineBackend, "run", run_then_die_on_third)
            with pytest.raises(Killed):
                run(task)
        first_two = built_chunks[:2]
        assert len(built_chunks) == 3 and not list(f.path.glob("*.lock"))
        built_chunks.clear()
        said = []
        run(task, said.append)
        assert not any(c in built_chunks for c in first_two)  # the two finished chunks were not built again
        assert any("(2 of " in s and "answered by an earlier run" in s for s in said), said
    for name in ("explanations.jsonl", "scores.jsonl"):
        assert (f.path / name).read_bytes() == (whole.path / name).read_bytes(), name


def test_offline_explanation_lists_every_distinctive_term_not_just_a_cover():
    """"oven" alone covers every example, but "garlic" and "ladle" are as distinctive: an explanation that stopped
    at a cover would miss held-out sentences about garlic; a term common in the background is left out."""
    from collections import Counter

    from llama_sae.features import Example
    from llama_sae.interpret.offline import detect
    from llama_sae.interpret.offline import explain as offline_explain

    def ex(words: list[str], peak: str) -> Example:
        tokens = [" " + w for w in words]
        return Example(" ".join(words), tokens, [1.0 if w in (peak, "oven") else 0.0 for w in words], 1.0, None,
                       "max", 0)

    examples = [ex(["the", "oven", "was", "hot", "garlic"], "garlic"), ex(["an", "oven", "and", "ladle"], "ladle"),
                ex(["the", "oven", "smelled", "of", "garlic"], "garlic"), ex(["one", "oven", "one", "ladle"], "ladle")]
    background = Counter({"the": 90, "was": 40, "and": 80, "an": 30, "of": 70, "one": 20, "hot": 5})
    out = offline_explain(examples, background, 100)
    assert {"oven", "garlic", "ladle"} <= set(out["terms"]) and not {"the", "and", "of"} & set(out["terms"])
    assert detect(out["explanation"], ["she chopped the garlic", "a ladle of soup", "the sky was blue"]) == [1, 1, 0]


def test_a_resumed_run_prices_every_chunk_not_built_yet(feats, server):
    """After a crash the first chunk built is mostly answered: the chunks after it are priced in full, so the
    estimate bounds what is sent and a run above the threshold still asks (it used to print $0.00 and send)."""
    f = feats
    latents = f.live_latents()
    b = make_backend("anthropic", f, model="claude-opus-4-1", base_url=server.url, **FAST)
    server.state.fate = lambda cid: "errored" if cid.startswith(f"x{latents[0]}-") else "succeeded"
    explain(f, b, latents=latents[:4], chunk=4, threshold=100.0, say=lambda s: None)  # chunk 1: 3 answered, 1 failed
    server.state.fate = lambda cid: "succeeded"
    asked, said = [], []
    with pytest.raises(UserError, match="not sent"):
        explain(f, b, latents=latents, chunk=4, threshold=0.0001, confirm=lambda q: asked.append(q) or False,
                say=said.append)
    assert asked and f"send {len(latents) - 4} requests" in asked[0]  # every latent past chunk 1
    batches = len(server.state.anthropic)
    explain(f, b, latents=latents, chunk=4, threshold=100.0, say=said.append)
    sent = sum(len(v["requests"]) for v in list(server.state.anthropic.values())[batches:])
    assert sent == len(latents) - 4 and f"{len(latents) - 4} to send" in said[-1]


def test_offline_answers_of_another_algorithm_are_made_again(feats, monkeypatch):
    import llama_sae.interpret.run as run_mod
    from llama_sae.interpret import offline

    f, said = feats, []
    explain(f, make_backend("offline", f), say=lambda s: None)
    monkeypatch.setattr(run_mod, "code_digest", lambda: "a newer version")
    monkeypatch.setattr(offline, "answer", lambda req, pool: json.dumps({"explanation": "NEW", "certainty": 0.5}))
    explain(f, make_backend("offline", f), say=said.append)
    rows = [json.loads(x) for x in (f.path / "explanations.jsonl").read_text().splitlines()]
    assert {r["explanation"] for r in rows} == {"NEW"} and "offline answers of another version" in said[0]


def test_a_refused_journal_leaves_no_lock_file_and_urls_lose_their_userinfo(feats, server):
    from llama_sae.interpret.backends import url_for_record

    f = feats
    latents = f.live_latents()[:2]
    explain(f, make_backend("chat", f, model="m", base_url=server.url + "/v1"), latents=latents, say=lambda s: None)
    with pytest.raises(UserError, match="another run"):
        explain(f, make_backend("chat", f, model="m", base_url=server.url + "/v2"), latents=latents, say=lambda s: None)
    assert not list(f.path.glob("*.lock"))
    assert url_for_record("https://user:sk-secret@example.com:8443/v1/?key=sk-2#x") == "https://example.com:8443/v1/"


def test_an_unreachable_server_fails_the_run_after_the_first_requests_retries(feats, server):
    """A wrong URL used to be retried with back-off for every latent (an hour for a thousand); once the first
    requests have used their attempts without ever reaching the server, the rest are recorded unsent."""
    import socket

    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    f = feats
    b = make_backend("chat", f, model="m", base_url=f"http://127.0.0.1:{port}/v1", concurrency=2)
    b.max_attempts, b.backoff = 2, 0.0
    latents = f.live_latents()[:12]
    out = explain(f, b, latents=latents, say=lambda s: None)
    assert out["outcomes"] == {"errored": 12} and b.attempts <= 2 * 2  # two in flight, two attempts each
    errors = [r["error"] for r in _journal(f) if r["kind"] == "result"]
    assert sum(e.startswith("not sent: the server could not be reached") for e in errors) >= 10
    assert out["first_error"].startswith("errored: gave up after 2 attempts: Connection error")
    said = []
    explain(f, b, latents=latents, say=said.append)  # failures are not "answered", and not re-sent by themselves
    assert "0 already answered, 12 failed earlier (sent again only with --retry-failed)" in said[0]
    # the same backend object, its server fixed: a new run tries again (the journal, with no answer, is set aside)
    server.state.reply = lambda text: json.dumps({"explanation": "cats", "certainty": 0.5})
    b.client = b.client.with_options(base_url=server.url + "/v1")
    assert explain(f, b, latents=latents, say=lambda s: None)["outcomes"] == {"succeeded": 12}


def test_a_server_that_drops_connections_is_not_taken_for_a_wrong_url(feats):
    """A server that accepts connections and drops them (an overloaded proxy) is there: every request keeps its
    retries, none is recorded as not sent."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    def drop_every_connection():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=drop_every_connection, daemon=True).start()
    f = feats
    b = make_backend("chat", f, model="m", base_url=f"http://127.0.0.1:{listener.getsockname()[1]}/v1", concurrency=2)
    b.max_attempts, b.backoff = 2, 0.0
    try:
        out = explain(f, b, latents=f.live_latents()[:4], say=lambda s: None)
    finally:
        listener.close()
    errors = [r["error"] for r in _journal(f) if r["kind"] == "result"]
    assert out["outcomes"] == {"errored": 4} and b.attempts == 8 and not any("not sent" in e for e in errors)


def test_a_rerun_with_nothing_to_send_asks_nothing(feats, server, monkeypatch):
    """After a code change every chunk is built again with all its answers in: nothing is sent, so nothing is priced
    (it used to price the chunks after the first as if unanswered and refuse a model with no known price)."""
    import llama_sae.interpret.run as run_mod

    f, said = feats, []
    b = make_backend("anthropic", f, model="claude-next", base_url=server.url, **FAST)  # no known price
    latents = f.live_latents()[:8]
    explain(f, b, latents=latents, chunk=4, confirm=lambda q: True, say=lambda s: None)
    monkeypatch.setattr(run_mod, "code_digest", lambda: "another version")
    out = explain(f, b, latents=latents, chunk=4, say=said.append)  # confirm=None: would refuse if it asked
    assert out["explained"] == 8 and "8 requests, 8 already answered, 0 in open batches, 0 to send" in said[0]


def test_a_reply_with_a_lone_surrogate_is_written_not_fatal(feats, server):
    """A server may send JSON with an unpaired surrogate escape (\\ud800): the explanation is kept with the
    character replaced, so explanations.jsonl (UTF-8) can be written and later runs are not stuck on it."""
    f = feats
    lat = f.live_latents()[:1]
    server.state.reply = lambda text: '{"explanation": "kitchen \\ud800 words", "certainty": 0.3}'
    out = explain(f, make_backend("chat", f, model="m", base_url=server.url + "/v1"), latents=lat,
                  threshold=100.0, say=lambda s: None)
    assert out["outcomes"] == {"succeeded": 1}
    f.reload_explanations()
    assert f.explanation(lat[0]).text == "kitchen ? words"
    (f.path / "explanations.jsonl").read_text(encoding="utf-8")  # valid UTF-8 throughout
