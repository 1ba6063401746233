"""A tiny Hugging Face Hub on 127.0.0.1 that records the ``Authorization`` header of every request.

It speaks the part of the Hub's HTTP API that huggingface_hub and datasets use to read a repository
(repo info, tree, paths-info, ``resolve`` with ranges) and to push one (create, preupload, commit with inline
files). Repositories live in memory; a private one answers 401 "not found" to any other token than its own,
as the Hub does. Point a process at it with ``HF_ENDPOINT=<url>`` set BEFORE huggingface_hub is imported
(``huggingface_hub.constants`` reads it at import); ``python tests/fakehub.py`` serves one by hand.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Repo:
    files: dict[str, bytes] = field(default_factory=dict)
    token: str | None = None  # the only token that may read it (None: public)
    write_token: str | None = None  # the only token that may push to it (None: nobody)

    @property
    def sha(self) -> str:
        h = hashlib.sha1()
        for p in sorted(self.files):
            h.update(p.encode() + b"\0" + self.files[p])
        return h.hexdigest()


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None


class FakeHub:
    """``repos[(kind, "owner/name")]`` with kind "model" or "dataset"; ``requests``: what was asked, with whose token."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[Request] = []
        self.owners: dict[str, str] = {}  # namespace -> the token allowed to create repositories in it
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, "HEAD")

            def do_GET(self) -> None:
                hub._handle(self, "GET")

            def do_POST(self) -> None:
                hub._handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, kind: str, repo_id: str, files: dict[str, bytes], token: str | None = None,
            write_token: str | None = None) -> Repo:
        self.repos[(kind, repo_id)] = repo = Repo(dict(files), token, write_token)
        return repo

    def tokens_sent(self, pattern: str) -> set[str | None]:
        """The Authorization headers of the requests whose path matches ``pattern`` (a regex)."""
        with self._lock:
            return {r.authorization for r in self.requests if re.search(pattern, r.path)}

    # ---- the HTTP API ------------------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(h.path)
        path = unquote(url.path)
        auth = h.headers.get("Authorization")
        with self._lock:
            self.requests.append(Request(method, path, auth))
        n = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(n) if n else b""
        kinds = {"models": "model", "datasets": "dataset", "spaces": "space"}
        if method == "POST" and path == "/api/repos/create":
            return self._create(h, json.loads(body or b"{}"), auth)
        if path.startswith("/__step__/"):  # a test's marker between the steps it takes (not a Hub route)
            return self._json(h, {})
        if method == "POST" and path == "/api/validate-yaml":  # the model card's metadata
            return self._json(h, {"errors": [], "warnings": []})
        m = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+?)(?:/(revision|tree|paths-info|preupload|commit)"
                         r"/([^/]+)(?:/(.*))?)?", path)
        if m:
            kind, repo_id, op, _rev, rest = kinds[m[1]], m[2], m[3], m[4], m[5] or ""
            repo = self._readable(h, kind, repo_id, auth, write=op in ("preupload", "commit"))
            if repo is None:
                return
            if op in (None, "revision"):
                return self._json(h, {"id": repo_id, "sha": repo.sha, "private": repo.token is not None,
                                      "siblings": [{"rfilename": p} for p in sorted(repo.files)], "cardData": {},
                                      "tags": [], "gated": False, "disabled": False,
                                      "lastModified": "2026-01-01T00:00:00.000Z"})
            if op == "tree":
                rec = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
                return self._json(h, self._tree(repo, rest.strip("/"), rec))
            if op == "paths-info":
                form = parse_qs(body.decode())
                wanted = form.get("paths", [])
                if not wanted and body.startswith(b"{"):
                    wanted = json.loads(body).get("paths", [])
                return self._json(h, [e for e in self._tree(repo, "", True) if e["path"] in wanted])
            if op == "preupload":
                files = json.loads(body or b"{}").get("files", [])
                return self._json(h, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                for f in files]})
            if op == "commit":
                for line in body.decode().splitlines():
                    item = json.loads(line) if line.strip() else {}
                    if item.get("key") == "file":
                        v = item["value"]
                        repo.files[v["path"]] = base64.b64decode(v["content"])
                return self._json(h, {"commitUrl": f"{self.url}/{repo_id}/commit/{repo.sha}",
                                      "commitOid": repo.sha, "pullRequestUrl": None})
        m = re.fullmatch(r"/(?:(datasets)/)?([^/]+/[^/]+?)/resolve/([^/]+)/(.+)", path)
        if m and method in ("HEAD", "GET"):
            repo = self._readable(h, "dataset" if m[1] else "model", m[2], auth)
            if repo is None:
                return
            data = repo.files.get(m[4])
            if data is None:
                return self._error(h, 404, "EntryNotFound", "Entry not found")
            return self._file(h, method, repo, data)
        return self._error(h, 404, "NotFound", f"no route {method} {path} in the fake Hub")

    def _readable(self, h, kind: str, repo_id: str, auth: str | None, write: bool = False) -> Repo | None:
        repo = self.repos.get((kind, repo_id))
        if repo is None:
            self._error(h, 404, "RepoNotFound", "Repository not found")
            return None
        need = repo.write_token if write else repo.token
        if (write or need is not None) and auth != f"Bearer {need}":
            self._error(h, 401 if auth is None or not write else 403, "RepoNotFound" if not write else "",
                        "Invalid credentials in Authorization header")
            return None
        return repo

    def _create(self, h, req: dict, auth: str | None) -> None:
        kind = req.get("type") or "model"
        repo_id = f"{req.get('organization') or 'visitor'}/{req.get('name')}"
        owner_token = self.owners.get(repo_id.split("/")[0])
        if owner_token is None or auth != f"Bearer {owner_token}":
            return self._error(h, 403, "", "You don't have the rights to create a repository under this namespace")
        self.repos.setdefault((kind, repo_id), Repo(token=owner_token if req.get("private") else None,
                                                    write_token=owner_token))
        self._json(h, {"url": f"{self.url}/{repo_id}", "name": repo_id})

    @staticmethod
    def _tree(repo: Repo, under: str, recursive: bool) -> list[dict]:
        out, dirs = [], set()
        for p, data in sorted(repo.files.items()):
            if under and not p.startswith(under + "/"):
                continue
            rel = p[len(under) + 1:] if under else p
            parts = rel.split("/")
            for i in range(1, len(parts)):
                d = "/".join(([under] if under else []) + parts[:i])
                if d not in dirs and (recursive or i == 1):
                    dirs.add(d)
                    out.append({"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()})
            if recursive or len(parts) == 1:
                out.append({"type": "file", "path": p, "size": len(data), "oid": hashlib.sha1(data).hexdigest()})
        return out

    @staticmethod
    def _json(h, obj, status: int = 200, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    @classmethod
    def _error(cls, h, status: int, code: str, message: str) -> None:
        headers = {"X-Error-Code": code} if code else {}
        cls._json(h, {"error": message}, status, {**headers, "X-Error-Message": message})

    @staticmethod
    def _file(h, method: str, repo: Repo, data: bytes) -> None:
        start, end, status = 0, len(data) - 1, 200
        rng = re.fullmatch(r"bytes=(\d*)-(\d*)", h.headers.get("Range") or "")
        if rng and data:
            if rng[1]:
                start, end = int(rng[1]), min(int(rng[2]) if rng[2] else len(data) - 1, len(data) - 1)
            else:  # the last N bytes
                start = max(0, len(data) - int(rng[2]))
            status = 206
        part = data[start:end + 1]
        h.send_response(status)
        h.send_header("X-Repo-Commit", repo.sha)
        h.send_header("ETag", '"' + hashlib.sha1(data).hexdigest() + '"')
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Accept-Ranges", "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        h.send_header("Content-Length", str(len(part)))
        h.end_headers()
        if method == "GET":
            h.wfile.write(part)


if __name__ == "__main__":
    with FakeHub() as hub:
        print(hub.url)
        hub.thread.join()
