"""`datagen export --format hf --push-to-hub OWNER/NAME`: an `hf` export folder goes to a dataset
repository on the Hugging Face Hub through `huggingface_hub` (`HfApi.create_repo`, then one
`HfApi.upload_folder` commit); `--dry-run` lists what would go and sends nothing.

What goes: the card (`README.md`, whose `configs:` front matter points the Hub at the parquet
splits), `data/<split>.parquet`, the card's plots (`card/*.png`) and `export.json`. Not
`dataset/`: it is `save_to_disk`'s copy of the same rows. The token is huggingface_hub's own
(`HF_TOKEN`, else the login cache of `hf auth login`); it is never printed.

An upload that fails leaves the export folder as it is; `--push-only` uploads it again without
exporting (`check_pushable`).

    plan = upload_plan(Path("ds"), "me/my-data", private=True)
    print(format_plan(plan))
    url = push(plan)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datagen.errors import ConfigError, DatagenError, InputError

REPO_TYPE = "dataset"
UPLOADED = ("README.md", "export.json", "data/*.parquet", "card/*.png")
# remote files of ours that this upload does not carry (a split emptied since the last push)
STALE_ON_HUB = ("data/*.parquet", "card/*.png")
NO_TOKEN = ("--push-to-hub: no Hugging Face token: set HF_TOKEN or log in with `hf auth login` "
            "(a token with write access)")


@dataclass(frozen=True)
class UploadPlan:
    """One upload: the repo, its visibility on creation, the folder and the files (path in the
    repo, bytes), and where the token would come from (None: nowhere)."""

    repo_id: str
    private: bool
    folder: Path
    files: tuple[tuple[str, int], ...]
    token_source: str | None

    @property
    def url(self) -> str:
        from huggingface_hub import constants

        return f"{constants.ENDPOINT}/datasets/{self.repo_id}"


def check_options(fmt: str, repo_id: str | None, *, private: bool, dry_run: bool, push_only: bool) -> None:
    """`datagen export`'s hub options, checked before anything is exported: the flags that go
    with `--push-to-hub` only with it, and a push that could not start (`check_push`, no token)."""
    if repo_id is None:
        given = [flag for flag, on in (("--private", private), ("--dry-run", dry_run), ("--push-only", push_only))
                 if on]
        if given:
            raise ConfigError(f"{', '.join(given)}: only with --push-to-hub OWNER/NAME")
        return
    check_push(fmt, repo_id)
    if not dry_run and token_source() is None:
        raise ConfigError(NO_TOKEN)


def run_push(out_dir: Path, repo_id: str, *, private: bool, dry_run: bool, announce) -> None:
    """Upload the export in `out_dir` (or, `dry_run`, list what would go) and `announce` the result."""
    plan = upload_plan(out_dir, repo_id, private)
    if dry_run:
        announce(format_plan(plan))
        if plan.token_source is None:
            raise ConfigError(NO_TOKEN)
        return
    announce(f"pushed {len(plan.files)} files to {plan.url}: {push(plan)}", err=True)


def check_push(fmt: str, repo_id: str) -> None:
    """Refuse, before anything is written, a push that cannot work: another format, a repo id
    that is not OWNER/NAME, huggingface_hub told to stay offline."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if fmt != "hf":
        raise ConfigError(f"--push-to-hub: needs --format hf (got --format {fmt})")
    if repo_id.count("/") != 1:
        raise ConfigError(f"--push-to-hub: expected OWNER/NAME (a user or organisation and a dataset name), "
                          f"got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ConfigError(f"--push-to-hub: {error}") from None
    if constants.is_offline_mode():
        raise ConfigError("--push-to-hub: HF_HUB_OFFLINE is set, so huggingface_hub sends nothing; unset it to upload")


def token_source(environ: Mapping[str, str] = os.environ) -> str | None:
    """Where huggingface_hub's `get_token()` would take the token from, in its order; None if
    nowhere. Says where, never what."""
    from huggingface_hub import constants

    if environ.get("HF_OIDC_RESOURCE"):
        return "OIDC token exchange (HF_OIDC_RESOURCE)"
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if environ.get(name, "").strip():
            return f"environment variable {name}"
    cache = Path(constants.HF_TOKEN_PATH)
    try:
        if cache.read_text(encoding="utf-8").strip():
            return f"login cache {cache}"
    except OSError:
        pass
    return None


def check_pushable(out_dir: Path, source: Path) -> dict[str, Any]:
    """The manifest of the `hf` export of `source` already in `out_dir` (`--push-only`)."""
    manifest = Path(out_dir) / "export.json"
    try:
        summary = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"--push-only: {manifest}: no readable export here ({error.__class__.__name__}); "
                         "export first (drop --push-only)") from None
    if summary.get("format") != "hf":
        raise InputError(f"--push-only: {out_dir} holds a {summary.get('format')!r} export, not hf")
    if Path(summary.get("input", "")).resolve() != Path(source).resolve():
        raise InputError(f"--push-only: {out_dir} holds the export of {summary.get('input')}, not of {source}; "
                         "drop --push-only to export this one")
    return summary


def upload_plan(out_dir: Path, repo_id: str, private: bool, environ: Mapping[str, str] = os.environ) -> UploadPlan:
    """What `push` would send from the `hf` export in `out_dir`."""
    out_dir = Path(out_dir)
    files = sorted({path for pattern in UPLOADED for path in out_dir.glob(pattern) if path.is_file()})
    if not any(path.suffix == ".parquet" for path in files) or not (out_dir / "README.md").is_file():
        raise InputError(f"{out_dir}: no hf export here (README.md and data/*.parquet); export with --format hf")
    return UploadPlan(repo_id, private, out_dir,
                      tuple((path.relative_to(out_dir).as_posix(), path.stat().st_size) for path in files),
                      token_source(environ))


def format_plan(plan: UploadPlan) -> str:
    """`--dry-run`'s lines: the repo, its visibility, the token's source and the files."""
    total = sum(size for _, size in plan.files)
    visibility = ("private" if plan.private else "the Hub's default for a new repo (public unless the account or "
                  "organisation says otherwise; --private makes it private); an existing repo keeps its own")
    lines = [f"dry run: nothing uploaded. Would upload {len(plan.files)} files ({_size(total)}) from {plan.folder}",
             f"  to:      {plan.url} (repo_type {REPO_TYPE}, created if missing)",
             f"  visibility: {visibility}",
             f"  token:   {plan.token_source or 'none found (set HF_TOKEN or run `hf auth login`)'}"]
    lines += [f"  {_size(size):>10}  {path}" for path, size in plan.files]
    return "\n".join(lines)


def push(plan: UploadPlan, api=None) -> str:
    """Create the dataset repo if missing and upload the plan's files in one commit (removing
    our parquet files and plots that this export no longer has); the commit URL. Every failure
    is one line that says the export is still on disk."""
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise ConfigError(NO_TOKEN)
    api = api or HfApi()
    try:
        # private None, not False: a new repo gets the account's or organisation's default visibility
        api.create_repo(plan.repo_id, repo_type=REPO_TYPE, private=plan.private or None, exist_ok=True, token=token)
        if plan.private and not api.repo_info(plan.repo_id, repo_type=REPO_TYPE, token=token).private:
            raise DatagenError(f"--private: {plan.repo_id} already exists and is public; nothing uploaded "
                               "(make it private on the Hub, or drop --private)")
        commit = api.upload_folder(
            repo_id=plan.repo_id, repo_type=REPO_TYPE, folder_path=str(plan.folder),
            allow_patterns=[path for path, _ in plan.files], delete_patterns=list(STALE_ON_HUB),
            commit_message=f"datagen export ({len(plan.files)} files)", token=token)
    except DatagenError:
        raise
    except Exception as error:  # HTTP, network, auth: whatever the Hub says, the export stays
        reason = " ".join(str(error).split()) or error.__class__.__name__
        raise DatagenError(f"upload to {plan.url} failed: {reason[:300]}; the export in {plan.folder} is kept: "
                           "rerun with --push-only to upload it without exporting again") from None
    return str(getattr(commit, "commit_url", None) or plan.url)


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"
