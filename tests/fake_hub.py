"""A minimal stand-in for the Hugging Face Hub on 127.0.0.1, for upload tests without the internet.

It implements only the endpoints `huggingface_hub` (2.x) calls to publish a folder with `create_repo`,
`create_branch` and `create_commit` (checked against its source: hf_api.py, _commit_api.py):

    GET  /api/models/{repo}                   model_info (404 + X-Error-Code: RepoNotFound when absent)
    POST /api/repos/create                    create_repo (409 when it exists)
    POST /api/models/{repo}/branch/{branch}   create_branch (409 when it exists)
    POST /api/validate-yaml                   create_commit checks README.md metadata first
    POST /api/models/{repo}/preupload/{rev}   upload mode per file: always "regular", so file contents
                                              travel base64-encoded inside the commit (no LFS/Xet storage)
    POST /api/models/{repo}/commit/{rev}      the commit itself (NDJSON: header line, then one line per file)

What it receives is stored in memory (`FakeHub.repos`); `FakeHub.requests` logs every call. Repos listed
in `failing_commits` answer their commit with HTTP 500, like an upload that breaks midway.
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


@dataclass
class FakeRepo:
    private: bool = False
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict] = field(default_factory=list)


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    requests: list[dict] = field(default_factory=list)
    failing_commits: set[str] = field(default_factory=set)

    def start(self) -> str:
        """Serve on a free port of 127.0.0.1 in a daemon thread; return the endpoint URL."""
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def add_repo(self, repo_id: str, files: dict[str, bytes]) -> None:
        """A repo that already exists with `files` on main (e.g. someone else's model)."""
        self.repos[repo_id] = FakeRepo(branches={"main": dict(files)})


# /api/models/{owner}/{name}[/{action}/{revision}]
MODEL_PATH = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<action>preupload|commit|branch)/(?P<rev>.+))?$")


def make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = 30  # a stuck client connection cannot keep a handler thread alive forever

        def log_message(self, format, *args):  # keep pytest output clean
            pass

        def do_GET(self):
            self.record()
            match = MODEL_PATH.match(urlparse(self.path).path)
            if not match or match["action"]:
                return self.reply(404, {"error": "not implemented by the fake hub"})
            repo = hub.repos.get(match["repo"])
            if repo is None:
                return self.reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            main = repo.branches["main"]
            # Like the Hub: a few fields of config.json, and one "sibling" per file.
            config = json.loads(main["config.json"]) if "config.json" in main else {}
            self.reply(200, {
                "id": match["repo"],
                "sha": commit_oid(main),
                "private": repo.private,
                "config": {key: config[key] for key in ("model_type", "architectures") if key in config},
                "siblings": [{"rfilename": name} for name in sorted(main)],
            })

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.record(body)
            path = urlparse(self.path).path
            if path == "/api/validate-yaml":
                return self.reply(200, {"errors": [], "warnings": []})
            if path == "/api/repos/create":
                return self.create_repo(json.loads(body))
            match = MODEL_PATH.match(path)
            repo = hub.repos.get(match["repo"]) if match else None
            if repo is None:
                return self.reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            revision = unquote(match["rev"])
            if match["action"] == "branch":
                return self.create_branch(repo, revision)
            if revision not in repo.branches:
                return self.reply(404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"})
            if match["action"] == "preupload":
                files = json.loads(body)["files"]
                return self.reply(200, {"files": [
                    {"path": item["path"], "uploadMode": "regular", "shouldIgnore": False} for item in files
                ]})
            if match["repo"] in hub.failing_commits:
                return self.reply(500, {"error": "Internal error (simulated by the fake hub)"})
            return self.commit(match["repo"], repo, revision, body)

        def create_repo(self, payload: dict) -> None:
            repo_id = f"{payload['organization']}/{payload['name']}"
            url = f"http://{self.headers['Host']}/{repo_id}"
            if repo_id in hub.repos:
                return self.reply(409, {"error": "You already created this model repo", "url": url})
            hub.repos[repo_id] = FakeRepo(private=payload.get("visibility") == "private")
            self.reply(200, {"url": url})

        def create_branch(self, repo: FakeRepo, branch: str) -> None:
            if branch in repo.branches:
                return self.reply(409, {"error": "Branch already exists"})
            repo.branches[branch] = dict(repo.branches["main"])
            self.reply(200, {})

        def commit(self, repo_id: str, repo: FakeRepo, revision: str, body: bytes) -> None:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            files = {
                line["value"]["path"]: base64.b64decode(line["value"]["content"])
                for line in lines
                if line["key"] == "file"
            }
            repo.branches[revision].update(files)
            oid = commit_oid(repo.branches[revision])
            repo.commits.append({"revision": revision, "summary": header["summary"], "files": sorted(files)})
            self.reply(200, {"commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{oid}", "commitOid": oid})

        def record(self, body: bytes = b"") -> None:
            hub.requests.append({
                "method": self.command,
                "path": self.path,
                "authorization": self.headers.get("Authorization"),
                "json": json.loads(body) if body and self.headers.get("Content-Type") == "application/json" else None,
            })

        def reply(self, status: int, payload: dict, headers: dict | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

    return Handler


def commit_oid(files: dict[str, bytes]) -> str:
    """A 40-hex commit id derived from the files (stable, like a real one for the same content)."""
    digest = hashlib.sha1()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name])
    return digest.hexdigest()
