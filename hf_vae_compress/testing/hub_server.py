"""In-memory loopback Hugging Face Hub for tests and benchmarks (standard library only).

Enough of the Hub HTTP API for the real ``huggingface_hub`` 2.4 client to run ``create_repo``,
``upload_folder`` / ``upload_file`` / ``create_commit`` / ``delete_file``, ``ModelCard.push_to_hub``
/ ``ModelCard.load``, ``model_info`` / ``repo_info``, ``list_repo_files`` / ``list_repo_tree`` /
``list_repo_commits`` / ``list_repo_refs``, ``hf_hub_download`` and ``snapshot_download``.

Every file is stored as a regular git blob: the preupload route always answers ``uploadMode:
"regular"`` so the client never talks LFS or Xet, and the file bytes travel base64-encoded inside
the NDJSON commit. Each repo has one branch, ``main``, with a linear history; like the Hub, a new
repo starts with one commit that holds a ``.gitattributes`` file (``HubServer(gitattributes=False)``
starts from an empty tree instead). Only ever binds 127.0.0.1.

Use in tests::

    with HubServer() as hub:                       # or: hub = HubServer(); url = hub.start(); ...; hub.stop()
        api = HfApi(endpoint=hub.url, token="hf_test")
        ...
        hub.repos["org/name"]                      # list[Commit], oldest first
        hub.files("org/name")                      # {path: bytes} at main

``huggingface_hub`` reads ``HF_ENDPOINT`` once, at import. In-process callers must pass ``endpoint=``
explicitly (``HfApi``, ``hf_hub_download``, ``snapshot_download``); helpers without an ``endpoint``
argument (``ModelCard.push_to_hub``, ``ModelCard.load``, ``ModelCard.validate``) must run in a
subprocess whose environment sets ``HF_ENDPOINT``.

Standalone: ``python -m hf_vae_compress.testing.hub_server --host 127.0.0.1 --port PORT`` (or
``python path/to/hub_server.py ...``, which imports nothing but the standard library) prints
``serving on http://127.0.0.1:PORT`` (the real port when PORT is 0) and serves until killed.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LOOPBACK = "127.0.0.1"
BRANCH = "main"
TYPE_PREFIXES = {"models": "model", "datasets": "dataset", "spaces": "space"}  # URL segment -> repo type
GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
NO_LFS = "LFS/Xet uploads are not supported by the loopback hub (preupload always answers 'regular')"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob, which the Hub uses as ETag and ``oid`` of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class Commit:
    oid: str
    title: str
    description: str
    date: str
    parent: str | None
    files: dict[str, bytes]  # the whole tree at this commit


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    created_at: str
    commits: list[Commit] = field(default_factory=list)

    def resolve(self, revision: str) -> Commit | None:
        """``main`` (or ``refs/heads/main``) or a full or abbreviated (at least 7 hex digits) commit id."""
        if revision in (BRANCH, f"refs/heads/{BRANCH}"):
            return self.commits[-1]
        if len(revision) >= 7:
            for commit in reversed(self.commits):
                if commit.oid.startswith(revision.lower()):
                    return commit
        return None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


class HubServer:
    """In-memory Hub on 127.0.0.1. ``start()`` returns the endpoint URL; ``stop()`` shuts it down.

    ``require_token``: writes (create, preupload, commit, delete) and ``whoami`` need an
    ``Authorization: Bearer <anything>`` header, as on the Hub; reads of private repos need one too.
    ``requests`` logs every ``(method, path)``; ``unhandled`` the ones no route matched.
    """

    def __init__(self, port: int = 0, *, host: str = LOOPBACK, require_token: bool = True,
                 gitattributes: bool = True, user: str = "test-user", verbose: bool = False):
        if host not in (LOOPBACK, "localhost"):
            raise ValueError(f"the test hub only binds {LOOPBACK}, not {host!r}")
        self.port, self.require_token, self.gitattributes = port, require_token, gitattributes
        self.user, self.verbose = user, verbose
        self.lock = threading.RLock()
        self._repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self._counter = 0
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> str:
        if self._httpd is not None:
            return self.url
        self._httpd = _Server((LOOPBACK, self.port), _Handler)
        self._httpd.hub = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="loopback-hub", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        with httpd.connections_lock:
            for conn in list(httpd.connections):  # idle keep-alive connections
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return f"http://{LOOPBACK}:{self._httpd.server_address[1]}"

    # ------------------------------------------------------------------ inspection

    @property
    def repos(self) -> dict[str, list[Commit]]:
        """Commits (oldest first) per repo. Keys: ``org/name`` for models, ``datasets/org/name`` etc. otherwise."""
        with self.lock:
            return {key: list(repo.commits) for key, repo in self._repos.items()}

    def files(self, repo_id: str, revision: str = BRANCH, repo_type: str = "model") -> dict[str, bytes]:
        with self.lock:
            commit = self._repos[self._key(repo_type, repo_id)].resolve(revision)
            if commit is None:
                raise KeyError(revision)
            return dict(commit.files)

    # ------------------------------------------------------------------ model

    @staticmethod
    def _key(repo_type: str, repo_id: str) -> str:
        return repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.url}/{self._key(repo.repo_type, repo.repo_id)}"

    def _get_repo(self, repo_type: str, repo_id: str, token: str | None) -> Repo:
        repo = self._repos.get(self._key(repo_type, repo_id))
        if repo is None or (repo.private and not token):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _get_commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _new_commit(self, repo: Repo, title: str, description: str, files: dict[str, bytes]) -> Commit:
        self._counter += 1
        parent = repo.commits[-1].oid if repo.commits else None
        digest = hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}\n{parent}\n{title}\n{self._counter}\n".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_oid(files[path])}\n".encode())
        commit = Commit(digest.hexdigest(), title, description, _now(), parent, dict(files))
        repo.commits.append(commit)
        return commit


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    hub: HubServer

    def __init__(self, *args, **kwargs):
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(*args, **kwargs)


def _tree_entry(path: str, data: bytes | None, files: dict[str, bytes], history: list[Commit] | None) -> dict:
    if data is not None:
        entry = {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path}
    else:
        prefix = path + "/"
        digest = hashlib.sha1(b"tree")
        for p in sorted(files):
            if p.startswith(prefix):
                digest.update(f"{p}\0{git_blob_oid(files[p])}\n".encode())
        entry = {"type": "directory", "oid": digest.hexdigest(), "size": 0, "path": path}
    if history is not None:  # expand=true: last commit that touched the path
        last = history[-1]
        for older, newer in zip(reversed(history[:-1]), reversed(history)):
            if _subtree(older.files, path) != _subtree(newer.files, path):
                last = newer
                break
            last = older
        entry["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
    return entry


def _subtree(files: dict[str, bytes], path: str) -> dict[str, bytes]:
    return {p: d for p, d in files.items() if p == path or p.startswith(path + "/")}


def _is_dir(files: dict[str, bytes], path: str) -> bool:
    return any(p.startswith(path + "/") for p in files)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LoopbackHub/1.0"
    timeout = 60  # idle keep-alive connections
    server: _Server

    # ------------------------------------------------------------------ plumbing

    def setup(self):
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self):
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        if self.server.hub.verbose:
            sys.stderr.write(f"[hub] {self.address_string()} {format % args}\n")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload, status: int = 200) -> None:
        self._send(status, json.dumps(payload).encode())

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:].strip() or None if auth.lower().startswith("bearer ") else None

    def _need_token(self) -> None:
        if self.server.hub.require_token and not self._token():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        parts = [unquote(p) for p in split.path.strip("/").split("/")]
        with hub.lock:
            hub.requests.append((method, split.path))
        body = self._read_body()
        try:
            with hub.lock:
                if not self._route(method, parts, query, body):
                    hub.unhandled.append((method, split.path))
                    raise HubError(404, f"no route for {method} {split.path}")
        except HubError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            if e.commit:
                headers["X-Repo-Commit"] = e.commit
            self._send(e.status, json.dumps({"error": e.message}).encode(), headers=headers)
        except Exception as e:  # a bug in the stub: report it as a 500 rather than hang the client
            self._send(500, json.dumps({"error": f"loopback hub: {type(e).__name__}: {e}"}).encode())
            raise

    # ------------------------------------------------------------------ routes

    def _route(self, method: str, parts: list[str], query: dict[str, str], body: bytes) -> bool:
        hub = self.server.hub
        if parts[0] == "api":
            rest = parts[1:]
            if rest == ["whoami-v2"] and method == "GET":
                self._need_token()
                self._json({"type": "user", "id": "0" * 24, "name": hub.user, "fullname": "Test User",
                            "orgs": [], "auth": {"type": "access_token",
                                                 "accessToken": {"displayName": "test", "role": "write"}}})
            elif rest == ["agent-harnesses"] and method == "GET":
                self._json({"standardEnvVars": [], "harnesses": {}})
            elif rest == ["validate-yaml"] and method == "POST":
                self._json({"errors": [], "warnings": []})
            elif rest == ["repos", "create"] and method == "POST":
                self._create(json.loads(body or b"{}"))
            elif rest == ["repos", "delete"] and method == "DELETE":
                self._delete(json.loads(body or b"{}"))
            elif len(rest) >= 3 and rest[0] in TYPE_PREFIXES:
                return self._repo_api(method, TYPE_PREFIXES[rest[0]], f"{rest[1]}/{rest[2]}", rest[3:], query, body)
            else:
                return False
            return True
        repo_type = "model"
        if parts[0] in ("datasets", "spaces"):
            repo_type, parts = TYPE_PREFIXES[parts[0]], parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            self._resolve(repo_type, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            return True
        return False

    def _create(self, payload: dict) -> None:
        hub = self.server.hub
        self._need_token()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or hub.user}/{payload['name']}"
        key = hub._key(repo_type, repo_id)
        if key in hub._repos:
            # the client reads `url` from the body even when exist_ok=True swallows the 409
            self._send(409, json.dumps({"error": "You already created this model repo",
                                        "url": hub._repo_url(hub._repos[key])}).encode(),
                       headers={"X-Error-Message": "You already created this model repo"})
            return
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = hub._repos[key] = Repo(repo_id, repo_type, private, _now())
        hub._new_commit(repo, "initial commit", "", {".gitattributes": GITATTRIBUTES} if hub.gitattributes else {})
        self._json({"url": hub._repo_url(repo), "name": repo_id, "id": repo_id})

    def _delete(self, payload: dict) -> None:
        hub = self.server.hub
        self._need_token()
        repo_type = payload.get("type") or "model"
        key = hub._key(repo_type, f"{payload.get('organization') or hub.user}/{payload['name']}")
        if key not in hub._repos:
            raise HubError(404, "Repository not found", "RepoNotFound")
        del hub._repos[key]
        self._json({})

    def _repo_api(self, method: str, repo_type: str, repo_id: str, rest: list[str],
                  query: dict[str, str], body: bytes) -> bool:
        hub = self.server.hub
        token = self._token()
        repo = hub._get_repo(repo_type, repo_id, token)
        op, rev = (rest[0], rest[1]) if len(rest) >= 2 else (rest[0] if rest else "", BRANCH)
        if method == "GET" and (not rest or (op == "revision" and len(rest) == 2)):
            self._info(repo, hub._get_commit(repo, rev))
        elif method == "GET" and op == "tree" and len(rest) >= 2:
            commit = hub._get_commit(repo, rev)
            expand = query.get("expand", "").lower() in ("1", "true")
            self._json(self._tree(repo, commit, "/".join(rest[2:]).strip("/"),
                                  query.get("recursive", "").lower() in ("1", "true"), expand))
        elif method == "POST" and op == "paths-info" and len(rest) == 2:
            commit = hub._get_commit(repo, rev)
            form = parse_qs(body.decode()) if body else {}
            if self.headers.get("Content-Type", "").startswith("application/json"):
                form = {k: v if isinstance(v, list) else [v] for k, v in json.loads(body).items()}
            expand = str(form.get("expand", ["false"])[-1]).lower() in ("1", "true")
            history = self._history(repo, commit) if expand else None
            entries = []
            for path in form.get("paths", []):
                path = path.strip("/")
                if path in commit.files:
                    entries.append(_tree_entry(path, commit.files[path], commit.files, history))
                elif _is_dir(commit.files, path):
                    entries.append(_tree_entry(path, None, commit.files, history))
            self._json(entries)
        elif method == "GET" and op == "commits" and len(rest) == 2:
            commit = hub._get_commit(repo, rev)
            self._json([{"id": c.oid, "title": c.title, "date": c.date, "authors": [{"user": hub.user}],
                         "message": c.title + (f"\n\n{c.description}" if c.description else "")}
                        for c in reversed(self._history(repo, commit))])
        elif method == "GET" and rest == ["refs"]:
            self._json({"branches": [{"name": BRANCH, "ref": f"refs/heads/{BRANCH}",
                                      "targetCommit": repo.commits[-1].oid}],
                        "tags": [], "converts": [], "pullRequests": []})
        elif method == "POST" and op == "preupload" and len(rest) == 2:
            self._need_token()
            commit = hub._get_commit(repo, rev)
            files = []
            for f in json.loads(body)["files"]:
                entry = {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                if f["path"] in commit.files:  # lets the client drop unchanged files (no empty commits)
                    entry["oid"] = git_blob_oid(commit.files[f["path"]])
                files.append(entry)
            self._json({"files": files, "commitOid": commit.oid})
        elif method == "POST" and op == "commit" and len(rest) == 2:
            self._need_token()
            self._commit(repo, rev, query, body)
        elif method == "POST" and op in ("xet-write-token", "xet-read-token", "lfs-files"):
            raise HubError(501, NO_LFS)
        else:
            return False
        return True

    @staticmethod
    def _history(repo: Repo, commit: Commit) -> list[Commit]:
        return repo.commits[: repo.commits.index(commit) + 1]

    def _info(self, repo: Repo, commit: Commit) -> None:
        org = repo.repo_id.split("/")[0]
        info = {"_id": commit.oid[:24], "id": repo.repo_id, "author": org, "sha": commit.oid,
                "lastModified": commit.date, "createdAt": repo.created_at, "private": repo.private,
                "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
                "siblings": [{"rfilename": p, "size": len(d), "blobId": git_blob_oid(d)}
                             for p, d in sorted(commit.files.items())]}
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        self._json(info)

    def _tree(self, repo: Repo, commit: Commit, path: str, recursive: bool, expand: bool) -> list[dict]:
        files = commit.files
        if path and not _is_dir(files, path):
            raise HubError(404, f"{path} does not exist on {commit.oid}", "EntryNotFound", commit.oid)
        prefix = path + "/" if path else ""
        history = self._history(repo, commit) if expand else None
        dirs: set[str] = set()
        entries = []
        for p in sorted(files):
            if not p.startswith(prefix):
                continue
            segments = p[len(prefix):].split("/")
            if recursive:
                dirs.update(prefix + "/".join(segments[:i]) for i in range(1, len(segments)))
            elif len(segments) > 1:
                dirs.add(prefix + segments[0])
                continue
            entries.append(_tree_entry(p, files[p], files, history))
        return [_tree_entry(d, None, files, history) for d in sorted(dirs)] + entries

    def _commit(self, repo: Repo, rev: str, query: dict[str, str], body: bytes) -> None:
        hub = self.server.hub
        if rev not in (BRANCH, f"refs/heads/{BRANCH}"):
            raise HubError(404, f"Invalid rev id: {rev} (the loopback hub only commits to '{BRANCH}')",
                           "RevisionNotFound")
        if query.get("create_pr") in ("1", "true", "True"):
            raise HubError(400, "create_pr is not supported by the loopback hub")
        head = repo.commits[-1]
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line.get("key") == "header"), {})
        parent = header.get("parentCommit")
        if parent and not head.oid.startswith(parent.lower()):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for line in lines:
            key, value = line.get("key"), line.get("value") or {}
            if key == "file":
                content = value["content"]
                files[value["path"]] = (base64.b64decode(content) if value.get("encoding", "base64") == "base64"
                                        else content.encode())
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/")
                doomed = [p for p in files if p.startswith(folder + "/")]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {folder}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            elif key in ("lfsFile", "copyFile"):
                raise HubError(422, NO_LFS if key == "lfsFile" else "copyFile is not supported by the loopback hub")
            elif key != "header":
                raise HubError(400, f"unknown commit operation {key!r}")
        if files == head.files:  # nothing changed: accept, but do not record an empty commit
            commit = head
        else:
            commit = hub._new_commit(repo, header.get("summary") or "update", header.get("description") or "", files)
        self._json({"success": True, "commitOid": commit.oid, "hookOutput": "",
                    "commitUrl": f"{hub._repo_url(repo)}/commit/{commit.oid}"})

    def _resolve(self, repo_type: str, repo_id: str, rev: str, path: str) -> None:
        hub = self.server.hub
        repo = hub._get_repo(repo_type, repo_id, self._token())
        commit = hub._get_commit(repo, rev)
        data = commit.files.get(path)
        if data is None:
            raise HubError(404, "Entry not found", "EntryNotFound", commit.oid)
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_oid(data)}"', "Accept-Ranges": "bytes"}
        status, rng = 200, self.headers.get("Range", "")
        if rng.startswith("bytes=") and "," not in rng:
            start_s, _, end_s = rng[6:].partition("-")
            start = int(start_s) if start_s else max(len(data) - int(end_s), 0)
            end = int(end_s) if start_s and end_s else len(data) - 1
            if start >= len(data):
                self._send(416, headers={**headers, "Content-Range": f"bytes */{len(data)}"})
                return
            end = min(end, len(data) - 1)
            status, data = 206, data[start: end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(commit.files[path])}"
        self._send(status, data, "application/octet-stream", headers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="In-memory loopback Hugging Face Hub for tests.")
    parser.add_argument("--host", default=LOOPBACK, help=f"must be {LOOPBACK} (or localhost)")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--no-auth", action="store_true", help="accept writes without a token")
    parser.add_argument("--no-gitattributes", action="store_true", help="new repos start empty")
    parser.add_argument("--verbose", action="store_true", help="log requests to stderr")
    args = parser.parse_args(argv)
    if args.host not in (LOOPBACK, "localhost"):
        parser.error(f"the test hub only binds {LOOPBACK}")
    hub = HubServer(args.port, require_token=not args.no_auth, gitattributes=not args.no_gitattributes,
                    verbose=args.verbose)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    url = hub.start()
    print(f"serving on {url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()


if __name__ == "__main__":
    main()
