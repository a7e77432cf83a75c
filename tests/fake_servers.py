"""Local fake LLM servers on 127.0.0.1 speaking the real protocols, for driving the real SDKs in tests.

One threaded HTTP server serves:
- Anthropic Message Batches: POST/GET /v1/messages/batches, GET /v1/messages/batches/{id},
  GET /v1/messages/batches/{id}/results (JSONL of succeeded / errored / canceled / expired results);
- OpenAI files and batches: POST /v1/files (multipart), GET /v1/files/{id}/content, POST/GET /v1/batches,
  GET /v1/batches/{id} (output and error files);
- OpenAI chat: POST /v1/chat/completions, with scripted failures (429, 5xx, garbage bodies).

``fate(custom_id)`` decides each batch request's outcome; ``reply(prompt_text)`` makes the model's text.
Every request is logged in ``log`` as (method, path, parsed JSON body or None).
"""

from __future__ import annotations

import email.parser
import json
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


class FakeState:
    """What the fake server knows and how it behaves (tests set the callables)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, object]] = []
        self.polls_to_end = 1  # GETs of a batch before it ends
        self.fate: Callable[[str], str] = lambda cid: "succeeded"
        self.reply: Callable[[str], str] = lambda text: '{"explanation": "fake", "certainty": 0.5}'
        self.chat_script: list[tuple[int, str, dict]] = []  # (status, body, headers) served before normal replies
        self.cut_next_download = False
        self.garbage_next_create = False
        self.error_after_next_create = False  # create the batch, then answer 500 (a retry would make a second)
        self.refuse_next_create: tuple[int, dict] | None = None  # (status, body): create nothing, answer that
        self.openai_batch_status = "completed"  # or "expired", "failed"
        self.anthropic: dict[str, dict] = {}
        self.openai: dict[str, dict] = {}
        self.files: dict[str, bytes] = {}
        self.counter = 0

    def next_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter:04d}"


def _text_of(params: dict) -> str:
    msgs = params.get("messages", [])
    return "\n".join(m["content"] for m in msgs if isinstance(m.get("content"), str))


class Handler(BaseHTTPRequestHandler):
    state: FakeState  # set on the subclass

    def log_message(self, *args) -> None:
        pass

    # ---- plumbing
    def _body(self) -> bytes:
        n = int(self.headers.get("content-length", 0))
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes | str | dict | list, headers: dict | None = None,
              ctype: str = "application/json") -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _cut(self, body: bytes) -> None:
        """Send headers announcing the whole body, half of it, then close (a download cut halfway)."""
        self.send_response(200)
        self.send_header("content-type", "application/binary")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True

    def do_GET(self) -> None:
        self._route("GET", None)

    def do_POST(self) -> None:
        raw = self._body()
        self._route("POST", raw)

    def _route(self, method: str, raw: bytes | None) -> None:
        st = self.state
        path = self.path.split("?")[0]
        body = None
        if raw and self.headers.get("content-type", "").startswith("application/json"):
            body = json.loads(raw)
        with st.lock:
            st.log.append((method, path, body))
        parts = path.strip("/").split("/")
        if parts[:3] == ["v1", "messages", "batches"]:
            return self._anthropic(method, parts[3:], body)
        if parts[:2] == ["v1", "files"]:
            return self._files(method, parts[2:], raw)
        if parts[:2] == ["v1", "batches"]:
            return self._openai_batches(method, parts[2:], body)
        if parts == ["v1", "chat", "completions"]:
            return self._chat(body)
        self._send(404, {"error": {"message": f"no route {path}"}})

    # ---- Anthropic Message Batches
    def _anthropic_batch(self, b: dict) -> dict:
        ended = b["polls"] >= self.state.polls_to_end
        n = len(b["requests"])
        counts = {"processing": 0 if ended else n, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if ended:
            for r in b["requests"]:
                fate = self.state.fate(r["custom_id"])
                key = fate if fate in counts else "succeeded"
                counts[key] += 1
        host = f"http://{self.headers['host']}"
        return {"id": b["id"], "type": "message_batch", "processing_status": "ended" if ended else "in_progress",
                "request_counts": counts, "created_at": _iso(b["created"]),
                "expires_at": _iso(b["created"] + 86400), "ended_at": _iso(time.time()) if ended else None,
                "archived_at": None, "cancel_initiated_at": None,
                "results_url": f"{host}/v1/messages/batches/{b['id']}/results" if ended else None}

    def _anthropic(self, method: str, rest: list[str], body) -> None:
        st = self.state
        if method == "POST" and not rest and st.garbage_next_create:
            st.garbage_next_create = False
            return self._send(200, "<html>upstream error</html>")
        if method == "POST" and not rest and st.refuse_next_create:
            (status, body), st.refuse_next_create = st.refuse_next_create, None
            return self._send(status, body)
        if method == "POST" and not rest:
            bid = st.next_id("msgbatch_")
            st.anthropic[bid] = {"id": bid, "requests": body["requests"], "created": time.time(), "polls": 0}
            if st.error_after_next_create:
                st.error_after_next_create = False
                return self._send(500, {"type": "error", "error": {"type": "api_error", "message": "overloaded"}})
            return self._send(200, self._anthropic_batch(st.anthropic[bid]))
        if method == "GET" and not rest:
            data = [self._anthropic_batch(b) for b in sorted(st.anthropic.values(), key=lambda b: -b["created"])]
            return self._send(200, {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
                                    "last_id": data[-1]["id"] if data else None})
        b = st.anthropic.get(rest[0])
        if b is None:
            return self._send(404, {"type": "error", "error": {"type": "not_found_error", "message": "no batch"}})
        if len(rest) == 1:
            b["polls"] += 1
            return self._send(200, self._anthropic_batch(b))
        data = "".join(json.dumps(line) + "\n" if isinstance(line, dict) else line
                       for line in (self._anthropic_result(r) for r in b["requests"]) if line is not None)
        if st.cut_next_download:
            st.cut_next_download = False
            return self._cut(data.encode())
        self._send(200, data, ctype="application/binary")

    def _anthropic_result(self, r: dict):
        cid, fate = r["custom_id"], self.state.fate(r["custom_id"])
        if fate == "succeeded":
            text = self.state.reply(_text_of(r["params"]))
            msg = {"id": "msg_1", "type": "message", "role": "assistant", "model": r["params"]["model"],
                   "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                   "usage": {"input_tokens": 10, "output_tokens": 5}}
            return {"custom_id": cid, "result": {"type": "succeeded", "message": msg}}
        if fate == "errored":
            return {"custom_id": cid, "result": {"type": "errored", "error": {
                "type": "error", "error": {"type": "invalid_request_error", "message": "bad params"}}}}
        if fate in ("canceled", "expired"):
            return {"custom_id": cid, "result": {"type": fate}}
        if fate == "malformed":
            return '{"custom_id": "' + cid + '", "result": {"type": "succ\n'
        if fate == "wrong-shape":
            return {"custom_id": cid, "result": {"type": "succeeded", "message": {"content": 7}}}
        return None  # "missing": no line at all

    # ---- OpenAI files and batches
    def _files(self, method: str, rest: list[str], raw: bytes | None) -> None:
        st = self.state
        if method == "POST" and not rest:
            msg = email.parser.BytesParser().parsebytes(
                f"content-type: {self.headers['content-type']}\r\n\r\n".encode() + raw)
            data = next(p.get_payload(decode=True) for p in msg.get_payload() if p.get_filename())
            fid = st.next_id("file-")
            st.files[fid] = data
            return self._send(200, {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                                    "filename": "input.jsonl", "purpose": "batch", "status": "processed"})
        if method == "GET" and len(rest) == 2 and rest[1] == "content" and rest[0] in st.files:
            if st.cut_next_download:
                st.cut_next_download = False
                return self._cut(st.files[rest[0]])
            return self._send(200, st.files[rest[0]], ctype="application/octet-stream")
        self._send(404, {"error": {"message": "no such file", "type": "invalid_request_error"}})

    def _openai_batch(self, b: dict) -> dict:
        st = self.state
        ended = b["polls"] >= st.polls_to_end
        status = st.openai_batch_status if ended else "in_progress"
        if ended and "output_file_id" not in b and status != "failed":
            self._finish_openai(b)
        n = len(b["lines"])
        return {"id": b["id"], "object": "batch", "endpoint": "/v1/chat/completions", "errors": None if status !=
                "failed" else {"object": "list", "data": [{"code": "invalid_json", "message": "line 1 is bad"}]},
                "input_file_id": b["input_file_id"], "completion_window": "24h", "status": status,
                "output_file_id": b.get("output_file_id"), "error_file_id": b.get("error_file_id"),
                "created_at": int(b["created"]), "metadata": b["metadata"],
                "request_counts": {"total": n, "completed": n if ended else 0, "failed": 0}}

    def _finish_openai(self, b: dict) -> None:
        st = self.state
        out, err = [], []
        for line in b["lines"]:
            cid, fate = line["custom_id"], st.fate(line["custom_id"])
            if st.openai_batch_status == "expired" and fate != "succeeded":
                fate = "expired"
            if fate == "succeeded":
                text = st.reply(_text_of(line["body"]))
                body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": line["body"]["model"],
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": "stop"}]}
                out.append(json.dumps({"id": "batch_req_1", "custom_id": cid, "response": {
                    "status_code": 200, "request_id": "r1", "body": body}, "error": None}))
            elif fate == "errored":
                err.append(json.dumps({"id": "batch_req_2", "custom_id": cid, "response": {
                    "status_code": 400, "request_id": "r2", "body": {"error": {"message": "bad request"}}},
                    "error": None}))
            elif fate in ("expired", "canceled"):
                code = "batch_expired" if fate == "expired" else "batch_cancelled"
                err.append(json.dumps({"id": "batch_req_3", "custom_id": cid, "response": None,
                                       "error": {"code": code, "message": fate}}))
            elif fate == "malformed":
                out.append('{"custom_id": "' + cid + '", "respo')
        for name, lines in (("output_file_id", out), ("error_file_id", err)):
            if lines:
                fid = st.next_id("file-")
                st.files[fid] = ("\n".join(lines) + "\n").encode()
                b[name] = fid

    def _openai_batches(self, method: str, rest: list[str], body) -> None:
        st = self.state
        if method == "POST" and not rest:
            lines = [json.loads(x) for x in st.files[body["input_file_id"]].decode().splitlines() if x.strip()]
            bid = st.next_id("batch_")
            st.openai[bid] = {"id": bid, "lines": lines, "input_file_id": body["input_file_id"],
                              "metadata": body.get("metadata"), "created": time.time(), "polls": 0}
            if st.error_after_next_create:
                st.error_after_next_create = False
                return self._send(500, {"error": {"message": "overloaded", "type": "server_error"}})
            return self._send(200, self._openai_batch(st.openai[bid]))
        if method == "GET" and not rest:
            data = [self._openai_batch(b) for b in sorted(st.openai.values(), key=lambda b: -b["created"])]
            return self._send(200, {"object": "list", "data": data, "has_more": False,
                                    "first_id": data[0]["id"] if data else None,
                                    "last_id": data[-1]["id"] if data else None})
        b = st.openai.get(rest[0])
        if b is None:
            return self._send(404, {"error": {"message": "no batch", "type": "invalid_request_error"}})
        b["polls"] += 1
        self._send(200, self._openai_batch(b))

    # ---- OpenAI-compatible chat
    def _chat(self, body) -> None:
        st = self.state
        with st.lock:
            scripted = st.chat_script.pop(0) if st.chat_script else None
        if scripted is not None:
            status, text, headers = scripted
            return self._send(status, text, headers)
        text = st.reply(_text_of(body))
        self._send(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})


class FakeServer:
    """Start with ``with FakeServer() as s:``; ``s.url`` is http://127.0.0.1:PORT."""

    def __init__(self):
        self.state = FakeState()
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def calls(self, method: str, path: str) -> int:
        return sum(1 for m, p, _ in self.state.log if m == method and p == path)

