"""The loopback Hub (hf_vae_compress.testing.hub_server) against the real huggingface_hub client.

In-process calls pass ``endpoint=`` explicitly: huggingface_hub reads HF_ENDPOINT once, at import.
Helpers without an ``endpoint`` argument (ModelCard.push_to_hub / ModelCard.load) and the offline
check run in subprocesses whose environment points HF_ENDPOINT at the server.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.request
from pathlib import Path

import pytest

from hf_vae_compress.testing import hub_server as hub_server_module
from hf_vae_compress.testing.hub_server import HubServer, git_blob_oid

TOKEN = "hf_test"
REPO = "test-org/tiny-model"
README = """---
base_model: test-org/base-model
library_name: timm
license: apache-2.0
tags:
- image-classification
- hf-vae-compress
---

# tiny model

A test card.
"""


@pytest.fixture
def hub(monkeypatch, tmp_path_factory):
    """A running HubServer (use ``.url``, ``.repos``, ``.files()``, ``.requests``)."""
    import huggingface_hub.constants

    # The client must talk to the loopback server even if the calling shell exports HF_HUB_OFFLINE=1,
    # and must not try to fetch its agent-harness registry from huggingface.co.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.utils._detect_agent._registry",
                        {"standardEnvVars": [], "harnesses": {}}, raising=False)
    # upload_folder opens an hf_xet session (even with no Xet traffic), which writes a log under HF_HOME.
    monkeypatch.setenv("HF_XET_LOG_DEST", str(tmp_path_factory.getbasetemp() / "hf_xet.log"))
    with HubServer() as server:
        yield server


@pytest.fixture
def hub_server(hub):
    """The endpoint URL of a running loopback Hub; pass it as ``endpoint=`` to the client."""
    return hub.url


@pytest.fixture
def model_folder(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    folder = tmp_path / "model"
    (folder / "nested").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 8}, indent=2))
    (folder / "README.md").write_text(README)
    save_file({"weight": np.arange(32, dtype=np.float32).reshape(4, 8)}, str(folder / "model.safetensors"))
    (folder / "nested" / "notes.txt").write_text("nested file\n")
    return folder


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _api(endpoint: str):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=TOKEN)


def _client_env(endpoint: str, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", **extra)
    return env


def _run_client(code: str, env: dict[str, str]) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _commit_posts(requests) -> list:
    return [r for r in requests if r[0] == "POST" and "/commit/" in r[1]]


def test_upload_folder_then_snapshot_download_is_byte_identical(hub, hub_server, model_folder, tmp_path):
    from huggingface_hub import snapshot_download

    api = _api(hub_server)
    url = api.create_repo(REPO)
    assert url == f"{hub_server}/{REPO}"
    assert api.create_repo(REPO, exist_ok=True) == url
    info = api.upload_folder(folder_path=model_folder, repo_id=REPO, commit_message="push tiny model")

    assert [c.title for c in hub.repos[REPO]] == ["initial commit", "push tiny model"]
    assert info.oid == hub.repos[REPO][-1].oid == api.model_info(REPO).sha
    local = _local_files(model_folder)
    assert hub.files(REPO) == {**local, ".gitattributes": hub.files(REPO)[".gitattributes"]}
    assert sorted(api.list_repo_files(REPO)) == sorted([*local, ".gitattributes"])

    snapshot = Path(snapshot_download(REPO, endpoint=hub_server, cache_dir=tmp_path / "fresh-cache"))
    assert snapshot.name == info.oid
    downloaded = _local_files(snapshot)
    assert downloaded.pop(".gitattributes").startswith(b"*")
    assert downloaded == local

    # Everything went through the regular-file routes: no LFS, no Xet, no unknown route.
    assert hub.unhandled == []
    assert not [r for r in hub.requests if "xet" in r[1] or "lfs" in r[1]]


def test_missing_file_repo_and_revision_raise_hub_errors(hub_server, tmp_path):
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError, HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    api = _api(hub_server)
    api.create_repo(REPO)
    cache = tmp_path / "cache"
    with pytest.raises(RemoteEntryNotFoundError) as missing_file:
        hf_hub_download(REPO, "missing.json", endpoint=hub_server, cache_dir=cache)
    assert isinstance(missing_file.value, EntryNotFoundError)
    with pytest.raises(EntryNotFoundError):  # second call: the `.no_exist` cache marker path
        hf_hub_download(REPO, "missing.json", endpoint=hub_server, cache_dir=cache)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("test-org/nope", "config.json", endpoint=hub_server, cache_dir=cache)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("test-org/nope", endpoint=hub_server, cache_dir=cache)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("test-org/nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, ".gitattributes", revision="0" * 40, endpoint=hub_server, cache_dir=cache)
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(REPO)
    assert conflict.value.response.status_code == 409
    with pytest.raises(HfHubHTTPError) as unauthorized:
        _api(hub_server).create_repo("test-org/other", token=False)
    assert unauthorized.value.response.status_code == 401


@pytest.mark.parametrize("pipeline", ["xet-pipelined", "legacy-create-commit"])
def test_pushing_twice_is_idempotent_and_a_change_makes_one_commit(hub, hub_server, model_folder, tmp_path,
                                                                  monkeypatch, pipeline):
    import huggingface_hub._upload_pipeline as upload_pipeline
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils._runtime import is_xet_available

    if pipeline == "legacy-create-commit":
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DISABLE_XET", True)
    elif not is_xet_available():
        pytest.skip("hf_xet is not installed: upload_folder always uses create_commit")
    calls = []
    real = upload_pipeline.pipelined_upload
    monkeypatch.setattr(upload_pipeline, "pipelined_upload", lambda *a, **k: calls.append(1) or real(*a, **k))

    api = _api(hub_server)
    api.create_repo(REPO)
    first = api.upload_folder(folder_path=model_folder, repo_id=REPO)
    assert bool(calls) == (pipeline == "xet-pipelined")
    files_after_first, commits_after_first = hub.files(REPO), len(hub.repos[REPO])
    cache = tmp_path / "cache"
    old_config = Path(hf_hub_download(REPO, "config.json", endpoint=hub_server, cache_dir=cache)).read_bytes()

    n_requests = len(hub.requests)
    second = api.upload_folder(folder_path=model_folder, repo_id=REPO)
    assert hub.files(REPO) == files_after_first
    assert len(hub.repos[REPO]) == commits_after_first  # no empty commit ...
    assert _commit_posts(hub.requests[n_requests:]) == []  # ... because the client never sent one
    assert second.oid == first.oid

    (model_folder / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 16}))
    third = api.upload_folder(folder_path=model_folder, repo_id=REPO, commit_message="bigger")
    assert len(hub.repos[REPO]) == commits_after_first + 1
    assert third.oid == hub.repos[REPO][-1].oid != first.oid
    changed = {p for p in hub.files(REPO) if hub.files(REPO)[p] != files_after_first.get(p)}
    assert changed == {"config.json"}

    new_config = Path(hf_hub_download(REPO, "config.json", endpoint=hub_server, cache_dir=cache)).read_bytes()
    assert json.loads(new_config)["hidden_size"] == 16
    pinned = hf_hub_download(REPO, "config.json", revision=first.oid, endpoint=hub_server, cache_dir=cache)
    assert Path(pinned).read_bytes() == old_config


def test_server_side_noop_commit_delete_and_private_repo(hub, hub_server):
    from huggingface_hub.errors import RepositoryNotFoundError

    api = _api(hub_server)
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b"hello", path_in_repo="a/b.txt", repo_id=REPO)
    head = hub.repos[REPO][-1]

    # A commit that changes nothing (sent raw: the client would have skipped it) is accepted, no new commit.
    lines = [{"key": "header", "value": {"summary": "noop", "description": ""}},
             {"key": "file", "value": {"path": "a/b.txt", "encoding": "base64",
                                       "content": base64.b64encode(b"hello").decode()}}]
    request = urllib.request.Request(f"{hub_server}/api/models/{REPO}/commit/main", method="POST",
                                     data=b"".join(json.dumps(line).encode() + b"\n" for line in lines),
                                     headers={"Authorization": f"Bearer {TOKEN}",
                                              "Content-Type": "application/x-ndjson"})
    with urllib.request.urlopen(request) as response:
        assert json.loads(response.read())["commitOid"] == head.oid
    assert hub.repos[REPO][-1] is head

    tree = {e.path: e for e in api.list_repo_tree(REPO, recursive=True)}
    assert tree["a/b.txt"].blob_id == git_blob_oid(b"hello") and "a" in tree
    api.delete_file("a/b.txt", repo_id=REPO)
    assert "a/b.txt" not in hub.files(REPO)
    assert [c.title for c in api.list_repo_commits(REPO)][-1] == "initial commit"

    api.create_repo("test-org/secret", private=True)
    assert api.model_info("test-org/secret").private and hub.files("test-org/secret")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("test-org/secret", token=False)


def test_offline_subprocess_loads_from_cache(hub, hub_server, model_folder, tmp_path):
    from huggingface_hub import hf_hub_download, snapshot_download

    api = _api(hub_server)
    api.create_repo(REPO)
    api.upload_folder(folder_path=model_folder, repo_id=REPO)
    cache = tmp_path / "hub-cache"
    online = Path(snapshot_download(REPO, endpoint=hub_server, cache_dir=cache))
    hf_hub_download(REPO, "config.json", endpoint=hub_server, cache_dir=cache)
    n_requests = len(hub.requests)

    out = _run_client(f"""
        import json
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
        config = hf_hub_download({REPO!r}, "config.json")
        weights = hf_hub_download({REPO!r}, "model.safetensors", local_files_only=True)
        try:
            hf_hub_download({REPO!r}, "never-downloaded.bin")
            missing = "downloaded?!"
        except LocalEntryNotFoundError:
            missing = "LocalEntryNotFoundError"
        print(json.dumps({{"config": config, "weights": weights, "snapshot": snapshot_download({REPO!r}),
                          "missing": missing}}))
    """, _client_env(hub_server, tmp_path / "hf-home", HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache)))
    result = json.loads(out.strip().splitlines()[-1])
    assert Path(result["config"]).read_bytes() == (model_folder / "config.json").read_bytes()
    assert Path(result["weights"]).read_bytes() == (model_folder / "model.safetensors").read_bytes()
    assert Path(result["snapshot"]) == online
    assert result["missing"] == "LocalEntryNotFoundError"
    assert len(hub.requests) == n_requests  # offline really made no request


def test_model_card_push_and_load_roundtrip(hub, hub_server, tmp_path):
    out = _run_client(f"""
        import json
        from huggingface_hub import HfApi, ModelCard, ModelCardData
        HfApi(token={TOKEN!r}).create_repo({REPO!r})
        data = ModelCardData(base_model="test-org/base-model", tags=["image-classification", "hf-vae-compress"],
                             library_name="timm", license="apache-2.0")
        ModelCard("---\\n" + data.to_yaml() + "\\n---\\n\\n# tiny\\n").push_to_hub({REPO!r}, token={TOKEN!r})
        loaded = ModelCard.load({REPO!r})
        print(json.dumps(loaded.data.to_dict()))
    """, _client_env(hub_server, tmp_path / "hf-home"))
    data = json.loads(out.strip().splitlines()[-1])
    assert data["base_model"] == "test-org/base-model"
    assert data["tags"] == ["image-classification", "hf-vae-compress"]
    assert hub.files(REPO)["README.md"].startswith(b"---\n")
    assert ("POST", "/api/validate-yaml") in hub.requests
    assert hub.unhandled == []

    # In process: ModelCard.load also takes a local path, so download with an explicit endpoint first.
    from huggingface_hub import ModelCard, hf_hub_download

    card = ModelCard.load(hf_hub_download(REPO, "README.md", endpoint=hub_server, cache_dir=tmp_path / "c"))
    assert card.data.base_model == "test-org/base-model"


def test_standalone_server_process(model_folder, tmp_path, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import hf_hub_download

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    server = [sys.executable, hub_server_module.__file__]  # standard library only: starts without torch
    with socket.socket() as probe:  # a free port; the server also accepts --port 0 and prints the real one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([*server, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(30, proc.kill)
    watchdog.start()
    try:
        line = proc.stdout.readline().strip()
        assert line == f"serving on http://127.0.0.1:{port}", proc.stderr.read() if not line else line
        endpoint = line.split()[-1]
        api = _api(endpoint)
        api.create_repo(REPO)
        api.upload_folder(folder_path=model_folder, repo_id=REPO)
        path = hf_hub_download(REPO, "model.safetensors", endpoint=endpoint, cache_dir=tmp_path / "cache")
        assert Path(path).read_bytes() == (model_folder / "model.safetensors").read_bytes()
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0  # SIGTERM -> clean shutdown
        watchdog.cancel()

    refused = subprocess.run([*server, "--host", "0.0.0.0", "--port", "0"],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and "127.0.0.1" in refused.stderr


def test_only_binds_loopback():
    with pytest.raises(ValueError):
        HubServer(host="0.0.0.0")
    with HubServer() as server:
        assert server.url.startswith("http://127.0.0.1:")
        assert server._httpd.server_address[0] == "127.0.0.1"
