"""`datagen export --format hf --push-to-hub`: the folder that would be uploaded, the exact calls
and HTTP requests made, `--dry-run`, and the one-line errors (datagen.export.hub).

These machines cannot reach the Hugging Face Hub, so no test uploads for real: the calls are
checked on a stand-in for `HfApi` that records them, and the wire requests of the real
`HfApi` on a local HTTP server that answers as the Hub does to a bad token.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import HfApi, constants  # the real client (tests may patch the module's)

from datagen.errors import ConfigError, DatagenError
from datagen.export import hub
from tests.helpers import make_task, run_cli, single_error_line, write_tasks

TOKEN = "hf_notARealTokenButSecret"


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """huggingface_hub online, with no token anywhere unless a test sets one."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def tasks_file(folder: Path) -> Path:
    tasks = [make_task(f"t{i}", f"Name a colour that starts with letter {i}.", (f"letter {i}", f"colour {i}"))
             for i in range(6)]
    return write_tasks(folder / "kept.jsonl", tasks)


class RecordingHfApi:
    """Stands in for `huggingface_hub.HfApi` (the Hub cannot be reached from here): records each
    call with its arguments, answers as the Hub would, or fails the call named in `fail`."""

    calls: list[tuple[str, tuple, dict]] = []
    fail: str | None = None
    public = False  # what repo_info says of an existing repo

    def __getattr__(self, name):
        def call(*args, **kwargs):
            RecordingHfApi.calls.append((name, args, kwargs))
            if name == RecordingHfApi.fail:
                raise OSError("502 Bad Gateway\nfrom the Hub")
            if name == "repo_info":
                return SimpleNamespace(private=not RecordingHfApi.public)
            if name == "upload_folder":
                return SimpleNamespace(commit_url=f"https://huggingface.co/datasets/{kwargs['repo_id']}/commit/abc")
            return None
        return call


@pytest.fixture
def recording_api(hub_env):
    import huggingface_hub

    RecordingHfApi.calls, RecordingHfApi.fail, RecordingHfApi.public = [], None, False
    hub_env.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    return RecordingHfApi


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--format", "alpaca", "--push-to-hub", "me/data"], "error: --push-to-hub: needs --format hf (got --format "
                                                             "alpaca)"),
        (["--format", "hf", "--push-to-hub", "data"], "error: --push-to-hub: expected OWNER/NAME (a user or "
                                                      "organisation and a dataset name), got 'data'"),
        (["--format", "hf", "--push-to-hub", "me/my data"], "error: --push-to-hub: Repo id must use alphanumeric "
         "chars, '-', '_' or '.'. The name cannot start or end with '-' or '.' and the maximum length is 96: "
         "'me/my data'."),
        (["--format", "hf", "--push-to-hub", "me/data"], f"error: {hub.NO_TOKEN}"),
        (["--format", "hf", "--dry-run", "--private"], "error: --private, --dry-run: only with --push-to-hub "
                                                       "OWNER/NAME"),
    ],
)
def test_a_push_that_cannot_work_is_one_line_and_exports_nothing(tmp_path, hub_env, args, line):
    result = run_cli("export", str(tasks_file(tmp_path)), "--out", str(tmp_path / "ds"), *args)
    assert result.returncode == 2
    assert single_error_line(result) == line
    assert not (tmp_path / "ds").exists()


def test_offline_mode_is_named(hub_env):
    hub_env.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        hub.check_push("hf", "me/data")


def test_the_token_source_is_named_in_huggingface_hubs_order_and_never_shown(tmp_path, hub_env):
    assert hub.token_source({}) is None
    cache = Path(constants.HF_TOKEN_PATH)
    cache.parent.mkdir()
    cache.write_text(TOKEN + "\n")
    assert hub.token_source({}) == f"login cache {cache}"
    assert hub.token_source({"HUGGING_FACE_HUB_TOKEN": TOKEN}) == "environment variable HUGGING_FACE_HUB_TOKEN"
    assert hub.token_source({"HF_TOKEN": TOKEN, "HUGGING_FACE_HUB_TOKEN": "x"}) == "environment variable HF_TOKEN"


def test_push_uploads_a_folder_the_hub_can_load_then_a_failed_upload_keeps_the_export(tmp_path, recording_api):
    source, out = tasks_file(tmp_path), tmp_path / "ds"
    recording_api.public = False
    first = run_cli("export", str(source), "--format", "hf", "--out", str(out), "--push-to-hub", "me/colours",
                    "--private", env={"HF_TOKEN": TOKEN})
    assert first.returncode == 0, first.stderr
    assert "pushed 7 files to https://huggingface.co/datasets/me/colours: " \
           "https://huggingface.co/datasets/me/colours/commit/abc" in first.stderr
    files = ["README.md", "card/breakdown.png", "card/lengths.png", "data/test.parquet", "data/train.parquet",
             "data/validation.parquet", "export.json"]
    assert [(name, args, kwargs) for name, args, kwargs in recording_api.calls] == [
        ("create_repo", ("me/colours",), {"repo_type": "dataset", "private": True, "exist_ok": True, "token": TOKEN}),
        ("repo_info", ("me/colours",), {"repo_type": "dataset", "token": TOKEN}),
        ("upload_folder", (), {"repo_id": "me/colours", "repo_type": "dataset", "folder_path": str(out),
                               "allow_patterns": files, "delete_patterns": ["data/*.parquet", "card/*.png"],
                               "commit_message": "datagen export (7 files)", "token": TOKEN}),
    ]
    # what the Hub would hold: exactly those files, which `datasets` loads as the three splits
    import datasets

    from datagen.export.hf import tasks_from_rows

    repo = tmp_path / "as_on_the_hub"
    for name in files:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / name, repo / name)
    loaded = datasets.load_dataset(str(repo))
    assert sorted(loaded) == ["test", "train", "validation"]
    exported = sorted(task.id for split in loaded.values() for task in tasks_from_rows(split))
    assert exported == [f"t{i}" for i in range(6)]

    # the upload fails: one line, the export stays; --push-only sends it again without exporting
    recording_api.calls, recording_api.fail = [], "upload_folder"
    failed = run_cli("export", str(source), "--format", "hf", "--out", str(out), "--push-to-hub", "me/colours",
                     env={"HF_TOKEN": TOKEN})
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1] == (
        f"error: upload to https://huggingface.co/datasets/me/colours failed: 502 Bad Gateway from the Hub; the "
        f"export in {out} is kept: rerun with --push-only to upload it without exporting again")
    assert (out / "data" / "train.parquet").exists()
    recording_api.calls, recording_api.fail = [], None
    manifest = (out / "export.json").stat().st_mtime_ns
    again = run_cli("export", str(source), "--format", "hf", "--out", str(out), "--push-to-hub", "me/colours",
                    "--push-only", env={"HF_TOKEN": TOKEN})
    assert again.returncode == 0, again.stderr
    assert "wrote" not in again.stderr and (out / "export.json").stat().st_mtime_ns == manifest
    assert [name for name, _, _ in recording_api.calls] == ["create_repo", "upload_folder"]
    assert recording_api.calls[0][2]["private"] is None  # no --private: the account's default


class HubStandIn(BaseHTTPRequestHandler):
    """Answers every request as the Hub answers a bad token, and keeps what it was sent."""

    seen: list[dict] = []

    def _answer(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        HubStandIn.seen.append({"method": self.command, "path": self.path,
                                "authorization": self.headers.get("Authorization"),
                                "body": json.loads(body) if body else None})
        payload = b'{"error": "Invalid credentials in Authorization header"}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def hub_stand_in():
    HubStandIn.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubStandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_an_export_on_disk_without_token_private_over_public_and_the_real_clients_request(
    tmp_path, hub_env, recording_api, hub_stand_in
):
    source, out = tasks_file(tmp_path), tmp_path / "ds"
    assert run_cli("export", str(source), "--format", "hf", "--out", str(out)).returncode == 0
    # no token anywhere: a dry run lists the upload, then says so in one line
    dry = run_cli("export", str(source), "--format", "hf", "--out", str(out), "--push-to-hub", "me/colours",
                  "--dry-run", "--push-only")
    assert dry.returncode == 2
    assert "  token:   none found (set HF_TOKEN or run `hf auth login`)" in dry.stdout
    assert single_error_line(dry) == f"error: {hub.NO_TOKEN}"

    recording_api.public = True
    plan = hub.upload_plan(out, "me/colours", private=True)
    with pytest.raises(ConfigError, match="no Hugging Face token"):
        hub.push(plan)
    assert recording_api.calls == []
    hub_env.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(DatagenError, match="already exists and is public; nothing uploaded"):
        hub.push(plan)
    assert [name for name, _, _ in recording_api.calls] == ["create_repo", "repo_info"]

    # the real client, against a local server answering as the Hub does to a bad token
    with pytest.raises(DatagenError) as failure:
        hub.push(plan, api=HfApi(endpoint=hub_stand_in))
    message = str(failure.value)
    assert "\n" not in message and "401" in message and TOKEN not in message
    assert message.endswith(f"the export in {out} is kept: rerun with --push-only to upload it without exporting "
                            "again")
    create, *after = HubStandIn.seen
    assert create == {"method": "POST", "path": "/api/repos/create", "authorization": f"Bearer {TOKEN}",
                      "body": {"name": "colours", "organization": "me", "visibility": "private", "type": "dataset"}}
    # huggingface_hub then asks whether the repo exists (exist_ok); nothing is uploaded
    assert [(r["method"], r["path"]) for r in after] == [("GET", "/api/datasets/me/colours")]


def test_dry_run_through_the_installed_script_lists_the_upload_and_sends_nothing(tmp_path, hub_stand_in):
    source, out = tasks_file(tmp_path), tmp_path / "ds"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
           "HF_ENDPOINT": hub_stand_in}
    script = Path(sys.executable).with_name("datagen")
    result = subprocess.run([str(script), "export", str(source), "--format", "hf", "--out", str(out),
                             "--push-to-hub", "me/colours", "--dry-run"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    sizes = {path: (out / path).stat().st_size for path in
             ("README.md", "card/breakdown.png", "card/lengths.png", "data/test.parquet", "data/train.parquet",
              "data/validation.parquet", "export.json")}
    assert lines[0] == f"dry run: nothing uploaded. Would upload 7 files ({hub._size(sum(sizes.values()))}) from {out}"
    assert lines[1] == f"  to:      {hub_stand_in}/datasets/me/colours (repo_type dataset, created if missing)"
    assert lines[2].startswith("  visibility: the Hub's default for a new repo")
    assert lines[3] == "  token:   environment variable HF_TOKEN"
    assert lines[4:] == [f"  {hub._size(size):>10}  {path}" for path, size in sizes.items()]
    assert TOKEN not in result.stdout + result.stderr
    assert HubStandIn.seen == []  # nothing was sent
