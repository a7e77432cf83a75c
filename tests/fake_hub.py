"""A Hugging Face hub stand-in on 127.0.0.1: the endpoints huggingface_hub uses to create a repo, commit files
(inline "regular" uploads) and download a snapshot. Tests point HF_ENDPOINT at it; nothing leaves the machine.

    POST /api/repos/create                            {"name", "organization", ...} -> {"url"}
    POST /api/models/{repo}/preupload/{rev}           every file "regular" (base64 inside the commit)
    POST /api/models/{repo}/commit/{rev}              ndjson: header, then {"key": "file", "value": {path, content}}
    GET  /api/models/{repo}[/revision/{rev}]          {"id", "sha", "siblings"}
    GET  /api/models/{repo}/tree/{rev}[/{path}]       [{"type": "file", "path", "size", "oid"}]
    HEAD|GET /{repo}/resolve/{rev}/{path}             headers X-Repo-Commit, ETag, Content-Length; the bytes
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.shas: dict[str, str] = {}
        self.requests: list[str] = []
        self.refuse: dict[str, tuple[int, str]] = {}  # repo -> (status, X-Error-Code) for every request about it
        self.cut: set[str] = set()  # repos whose file downloads stop halfway (the connection closes)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                hub.handle(self, "GET")

            def do_HEAD(self):
                hub.handle(self, "HEAD")

            def do_POST(self):
                hub.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _commit(self, repo: str) -> str:
        blob = json.dumps(sorted((p, hashlib.sha1(b).hexdigest()) for p, b in self.repos[repo].items()))
        self.shas[repo] = hashlib.sha1(blob.encode()).hexdigest()
        return self.shas[repo]

    def handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        path = unquote(urlparse(req.path).path)
        self.requests.append(f"{method} {path}")
        body = req.rfile.read(int(req.headers.get("Content-Length") or 0)) if method == "POST" else b""
        if method == "POST" and path == "/api/repos/create":
            data = json.loads(body)
            repo = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
            if repo not in self.repos:
                self.repos[repo] = {}
                self._commit(repo)
            return self._json(req, {"url": f"{self.url}/{repo}", "name": repo})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path):
            files = json.loads(body)["files"]
            return self._json(req, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path):
            files = self.repos.setdefault(m[1], {})
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            sha = self._commit(m[1])
            return self._json(req, {"commitUrl": f"{self.url}/{m[1]}/commit/{sha}", "commitOid": sha})
        repo = re.match(r"/(?:api/models/)?([^/]+/[^/]+)", path)
        if repo and repo[1] in self.refuse:
            status, code = self.refuse[repo[1]]
            return self._json(req, {"error": code}, status, {"X-Error-Code": code})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            if m[1] not in self.repos:
                return self._json(req, {"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})
            return self._json(req, {"id": m[1], "sha": self.shas[m[1]], "private": False,
                                    "siblings": [{"rfilename": p} for p in sorted(self.repos[m[1]])]})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
            prefix = (m[3] or "").rstrip("/")
            files = [p for p in sorted(self.repos.get(m[1], {})) if not prefix or p.startswith(prefix + "/")]
            return self._json(req, [{"type": "file", "path": p, "size": len(self.repos[m[1]][p]),
                                     "oid": hashlib.sha1(self.repos[m[1]][p]).hexdigest()} for p in files])
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            data = self.repos.get(m[1], {}).get(m[3])
            if data is None:
                return self._json(req, {"error": "Entry not found"}, 404, {"X-Error-Code": "EntryNotFound"})
            headers = {"X-Repo-Commit": self.shas[m[1]], "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                       "Content-Type": "application/octet-stream"}
            if m[1] in self.cut and method == "GET":  # half the bytes, then the connection closes
                req.send_response(200)
                for key, value in {**headers, "Content-Length": str(len(data))}.items():
                    req.send_header(key, value)
                req.end_headers()
                req.wfile.write(data[: len(data) // 2])
                req.close_connection = True
                return None
            return self._send(req, data, 200, headers, head=method == "HEAD")
        return self._json(req, {"error": f"fake hub: no route for {method} {path}"}, 404)

    def _json(self, req, obj, status=200, headers=None) -> None:
        self._send(req, json.dumps(obj).encode(), status, {"Content-Type": "application/json", **(headers or {})})

    @staticmethod
    def _send(req, data: bytes, status: int, headers: dict[str, str], head: bool = False) -> None:
        req.send_response(status)
        for key, value in headers.items():
            req.send_header(key, value)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if not head:
            req.wfile.write(data)
