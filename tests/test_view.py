"""`datagen view`: the index, the HTTP API (paging, facets, traversal, marks), the `manual`
pass, and the page itself in a real headless Chromium.

The fixture run is real where it can be: the Self-Instruct tasks and rejects are the embedded
teacher's output (tests/data/export), kept / rejects / stats come from a real `run_filter`;
an Evol-Instruct chain, a duplicate and a task carrying an HTML payload are added by hand.

Browser tests need Debian's `chromium` and `chromium-driver` (`make test` installs them where
it can) and skip with the reason when either is missing. One server and one browser per module.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest

from datagen.config_file import load_config
from datagen.errors import ConfigError
from datagen.filtering import run_filter
from datagen.filters.base import PassContext
from datagen.filters.manual import REASON_DROPPED_BY_HAND, ManualConfig, append_override, run_manual_pass
from datagen.io import read_tasks, write_jsonl_atomic
from datagen.records import Lineage
from datagen.view.index import FIRST_BATCH_LINES, TaskIndex, discover
from datagen.view.server import ViewState, make_server
from tests.helpers import make_task, run_cli, single_error_line

DATA = Path(__file__).parent / "data" / "export"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PAYLOAD = ('Summarise this page: <script>window.__pwned = 1</script> '
           '<img src=x onerror="window.__pwned = 2"> and say what it is about.')
EVOL_ROOT = "seed_task_3"  # the seed the Evol chain starts from (a seed file's id, not in the run)


def _evol(task_id: str, parent: str, round_number: int, operation: str, instruction: str):
    lineage = Lineage(generator="evol-instruct", operation=operation, round=round_number, parent_ids=[parent],
                      template="evol_deepen.jinja", teacher_backend="local", teacher_model="smollm2-135m")
    return make_task(task_id, instruction, ("", f"An answer to: {instruction}"), lineage=lineage)


def _png(path: Path, width: int = 8, height: int = 4) -> None:
    """A small valid PNG (what the card's plots are), written without an imaging library."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + bytes([40, 90, 200]) * width for _ in range(height))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def build_run(folder: Path) -> Path:
    """A small run folder as `datagen distill` leaves it: raw, kept, rejects, stats, summary, card, eval."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("raw.rejects.jsonl", "raw.summary.json"):
        shutil.copy(DATA / name, folder / name)
    generated = read_tasks(DATA / "raw.jsonl")
    evol = [
        _evol("evol-r1", EVOL_ROOT, 1, "evol:deepen", "Explain why the sky is blue, naming the physics involved."),
        _evol("evol-r2", "evol-r1", 2, "evol:concretize",
              "Explain Rayleigh scattering of sunlight to a student, with the wavelength dependence."),
        _evol("evol-r3", "evol-r2", 3, "evol:add_constraints",
              "Explain Rayleigh scattering to a student in under 80 words, with the 1/wavelength^4 law."),
        _evol("evol-r3b", "evol-r2", 3, "evol:breadth", "Describe why sunsets look red and orange."),
    ]
    xss = make_task("xss-1", PAYLOAD, ("<b>bold?</b>", "<script>window.__pwned = 3</script>"))
    copy = make_task("dup-1", generated[1].instruction, ("", "Page Turners, Chapter Chat, Shelf Life"))
    write_jsonl_atomic(folder / "raw.jsonl", [*generated, *evol, xss, copy])
    config = load_config(None, {"filter.passes": ("--passes", ["heuristics", "exact-dedup"])})
    run_filter(config, folder / "raw.jsonl", folder / "kept.jsonl", folder / "kept.rejects.jsonl",
               "datagen filter raw.jsonl --out kept.jsonl --passes heuristics,exact-dedup")
    _png(folder / "dataset" / "card" / "lengths.png")
    report = {"data": "dataset/test.jsonl", "examples": 1,
              "base": {"model": "smollm2-135m", "loss": 2.31, "perplexity": 10.07, "rouge_l": 0.12},
              "tuned": {"model": "student/merged", "loss": 1.84, "perplexity": 6.3, "rouge_l": 0.21},
              "samples": [{"request": "Name three primes.", "reference": "2, 3 and 5.", "base": "Primes are numbers.",
                           "tuned": "2, 3, 5.", "dpo": "2, 3 and 5 <b>are</b> prime."}]}
    (folder / "eval").mkdir()
    (folder / "eval" / "report.json").write_text(json.dumps(report), encoding="utf-8")
    (folder / "secret.txt").write_text("not data", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    return build_run(tmp_path_factory.mktemp("view") / "run")


@pytest.fixture(scope="module")
def served(run_folder):
    """Base URL of `datagen view` on the fixture run (a real server on 127.0.0.1, port picked by the OS)."""
    server, state = make_server(run_folder, "127.0.0.1", 0)
    state.warm_up_later().join(timeout=60)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


def get(url: str) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def get_json(url: str):
    status, body, _ = get(url)
    assert status == 200, body
    return json.loads(body)


def post_mark(base: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"{base}/api/mark", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# -- the index and the API -------------------------------------------------------------------------


def test_run_folder_shows_kept_and_rejected_once(served):
    base, _ = served
    page = get_json(f"{base}/api/tasks?limit=500")
    by_id = {}
    for row in page["rows"]:
        by_id.setdefault(row["id"], []).append(row)
    # raw.jsonl's tasks are shown as the filter left them: kept or rejected, not a third time
    assert by_id["dup-1"][0]["status"] == "rejected"
    assert by_id["dup-1"][0]["stage"] == "exact-dedup"
    assert by_id["evol-r2"][0]["status"] == "kept" and by_id["evol-r2"][0]["file"] == "kept.jsonl"
    assert all(len(rows) == 1 for rows in by_id.values())
    generation_rejects = sum(1 for line in (DATA / "raw.rejects.jsonl").read_text().splitlines() if line.strip())
    assert page["total"] == page["all"] == 12 + generation_rejects
    facets = dict(page["facets"]["status"])
    assert facets == {"kept": 11, "rejected": 1 + generation_rejects}
    assert dict(page["facets"]["method"])["evol-instruct"] == 4
    assert dict(page["facets"]["language"]).get("English", 0) >= 10


def test_search_facets_sort_and_paging_happen_on_the_server(served):
    base, _ = served
    found = get_json(f"{base}/api/tasks?q=RAYLEIGH")
    assert sorted(r["id"] for r in found["rows"]) == ["evol-r2", "evol-r3"]
    # a facet's own counts ignore its own filter, so other values stay pickable
    evol_kept = get_json(f"{base}/api/tasks?f.method=evol-instruct&f.status=kept&sort=round&desc=1")
    assert [r["round"] for r in evol_kept["rows"]] == ["3", "3", "2", "1"]
    assert dict(evol_kept["facets"]["method"])["self-instruct"] == 6  # kept ones, though the filter is on evol
    first = get_json(f"{base}/api/tasks?sort=id&limit=5")
    second = get_json(f"{base}/api/tasks?sort=id&limit=5&offset=5")
    assert len(first["rows"]) == 5 and first["total"] == second["total"]
    ids = [r["id"] for r in first["rows"] + second["rows"]]
    assert ids == sorted(ids) and len(set(ids)) == 10
    assert get(f"{base}/api/tasks?limit=100000")[0] == 400
    assert get(f"{base}/api/tasks?offset=abc")[0] == 400


def test_task_page_traces_lineage_rejects_and_similar_instructions(served):
    base, state = served
    r3 = get_json(f"{base}/api/task?id=evol-r3")
    assert [link["id"] for link in r3["chain"]] == [EVOL_ROOT, "evol-r1", "evol-r2"]
    assert r3["chain"][0]["row"] is None  # the seed is not in the run
    r2 = get_json(f"{base}/api/task?id=evol-r2")
    assert sorted(link["id"] for link in r2["children"]) == ["evol-r3", "evol-r3b"]
    duplicate = get_json(f"{base}/api/task?id=dup-1")
    assert duplicate["status"] == "rejected" and duplicate["record"]["stage"] == "exact-dedup"
    original = read_tasks(DATA / "raw.jsonl")[1]
    assert duplicate["duplicate_of"]["id"] == original.id and duplicate["duplicate_of"]["row"] is not None
    # Self-Instruct: the stored statistics and fresh exact ROUGE-L against the run's instructions
    from datagen.rouge import rouge_l_f1

    self_instruct = get_json(f"{base}/api/task?id={original.id}")
    assert self_instruct["stored_similar"]
    best = self_instruct["similar"][0]
    assert best["id"] == "dup-1" or best["rouge_l"] < 1
    assert best["rouge_l"] == round(rouge_l_f1(original.instruction, best["instruction"]), 4)
    raw_reject = next(r for r in get_json(f"{base}/api/tasks?f.stage=bootstrap&limit=500")["rows"]
                      if r["instruction"].startswith("(raw) "))
    assert get_json(f"{base}/api/task?row={raw_reject['row']}")["record"]["raw"]
    assert get(f"{base}/api/task?row=99999")[0] == 404


def test_run_page_data_and_only_listed_files_are_served(served, run_folder, tmp_path):
    base, _ = served
    run = get_json(f"{base}/api/run")
    assert [s["file"] for s in run["summaries"]] == ["raw.summary.json"]
    assert run["stats"][0]["data"]["passes"][1]["pass"] == "exact-dedup"
    assert run["plots"] == ["dataset/card/lengths.png"] and run["reports"][0]["file"] == "eval/report.json"
    status, body, headers = get(f"{base}/files/dataset/card/lengths.png")
    assert status == 200 and body.startswith(b"\x89PNG") and headers["Content-Type"] == "image/png"
    outside = tmp_path / "outside.png"
    _png(outside)
    (run_folder / "dataset" / "card" / "escape.png").symlink_to(outside)
    for path in ("/files/../../../../etc/passwd", "/files/..%2f..%2f..%2f..%2fetc%2fpasswd",
                 "/files/%2e%2e/%2e%2e/etc/passwd", "/files//etc/passwd", "/files/%2Fetc%2Fpasswd",
                 "/files/secret.txt", "/files/dataset/card/escape.png", "/static/..%2f__init__.py",
                 "/static/../server.py", "/files/dataset/card/../../secret.txt"):
        status, body, _ = get(base + path)
        assert status == 404 and b"root:" not in body and b"not data" not in body, path
    # discovery never lists a symlink that leads out of the folder either
    assert "dataset/card/escape.png" not in discover(run_folder).servable()
    status, _, headers = get(base + "/")
    assert status == 200 and "script-src 'self'" in headers["Content-Security-Policy"]


def test_host_header_and_cross_origin_posts_are_refused(served):
    base, _ = served
    request = urllib.request.Request(f"{base}/api/run", headers={"Host": "evil.example:80"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403
    body = json.dumps({"id": "xss-1", "decision": "drop"}).encode()
    assert post_mark(base, body, {"Origin": "http://evil.example"})[0] == 403
    assert post_mark(base, b"{", {})[0] == 400
    assert post_mark(base, json.dumps({"id": "xss-1", "decision": "delete"}).encode())[0] == 400
    assert post_mark(base, json.dumps({"id": "nope", "decision": "drop"}).encode())[0] == 404


def test_off_loopback_the_host_header_is_still_checked(tmp_path):

    from datagen.view.server import make_server

    path = tmp_path / "kept.jsonl"
    write_jsonl_atomic(path, [make_task("t1", "Name a colour.")])
    server, _state = make_server(path, host="0.0.0.0", port=0)  # what `--host 0.0.0.0` binds
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        def status(host: str) -> int:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/api/run", headers={"Host": host})
            try:
                return urllib.request.urlopen(request, timeout=10).status
            except urllib.error.HTTPError as error:
                return error.code

        # a page on another site reaching this server through a rebound DNS name is refused
        assert status(f"attacker.example:{port}") == 403
        assert status(f"0.0.0.0:{port}") == 200 and status(f"127.0.0.1:{port}") == 200
    finally:
        server.shutdown()
        server.server_close()


def test_index_reads_a_single_file_without_pydantic_and_pages_it(tmp_path):
    path = tmp_path / "kept.jsonl"
    write_jsonl_atomic(path, [make_task(f"t{i:03d}", f"Instruction number {i}") for i in range(120)])
    with path.open("a") as handle:
        handle.write("{not json\n")
    index = TaskIndex.build(discover(path))
    page = index.query(sort="id", descending=True, offset=100, limit=50)
    assert page["total"] == 121 and len(page["rows"]) == 21
    bad = index.query(filters={"status": ["rejected"]})["rows"]
    assert [(r["reason"], r["stage"]) for r in bad] == [("invalid line", "read")]
    assert index.record(index.row_of_id["t007"])["instruction"] == "Instruction number 7"


def pause_after_first_batch(monkeypatch) -> threading.Event:
    """Hold the background indexer after its first batch of lines until the returned event is
    set (an injected stall: a big file's first page must not wait for the rest)."""
    release, parse, calls = threading.Event(), TaskIndex._parse, []

    def stalled(self, cursor, lines):
        calls.append(len(lines))
        if len(calls) > 1:
            release.wait(30)
        return parse(self, cursor, lines)

    monkeypatch.setattr(TaskIndex, "_parse", stalled)
    return release


def test_first_page_is_served_while_the_rest_of_the_file_is_indexed(tmp_path, monkeypatch):
    path = tmp_path / "kept.jsonl"
    last = FIRST_BATCH_LINES + 1000
    write_jsonl_atomic(path, [make_task(f"t{i:05d}", "Write a haiku about the sea." if i == last - 1
                                        else f"Instruction number {i}") for i in range(last)])
    release = pause_after_first_batch(monkeypatch)
    server, state = make_server(path, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        first = get_json(f"{base}/api/tasks?limit=50")  # answered with the indexer stalled
        assert first["indexing"] and first["all"] == FIRST_BATCH_LINES and len(first["rows"]) == 50
        assert first["rows"][0]["id"] == "t00000" and dict(first["facets"]["status"]) == {"kept": FIRST_BATCH_LINES}
        assert get_json(f"{base}/api/tasks?q=haiku")["total"] == 0  # not read yet
        release.set()
        assert state.index.wait(30)
        done = get_json(f"{base}/api/tasks?q=haiku&sort=id&desc=1")
        assert not done["indexing"] and done["all"] == last
        assert [r["id"] for r in done["rows"]] == [f"t{last - 1:05d}"]
        assert dict(done["facets"]["status"]) == {"kept": 1}
        assert get_json(f"{base}/api/tasks?sort=id&desc=1&limit=1")["rows"][0]["line"] == last
        # a task asked for by id is waited for rather than refused while indexing goes on
        assert get_json(f"{base}/api/task?id=t{last - 1:05d}")["task"]["instruction"].startswith("Write a haiku")
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def test_lines_appended_while_open_are_indexed_and_a_torn_last_line_waits(tmp_path):
    path = tmp_path / "raw.jsonl"
    lines = [make_task(f"a{i}", f"Name a colour, number {i}.").model_dump_json() for i in range(4)]
    path.write_text(lines[0] + "\n\n" + lines[1] + "\n" + lines[2][:40])  # a blank line, then a line being written
    state = ViewState(path)
    state.index.wait(30)
    page = state.page(sort="id")
    assert [r["id"] for r in page["rows"]] == ["a0", "a1"] and page["unfinished_lines"] == ["raw.jsonl"]
    with path.open("a") as handle:  # the writer finishes its line and adds one without a newline yet
        handle.write(lines[2][40:] + "\n" + lines[3])
    state.page()  # a page notices the file grew and reads on from where it stopped
    state.index.wait(30)
    page = state.page(sort="id", search="colour")
    assert [(r["id"], r["line"]) for r in page["rows"]] == [("a0", 1), ("a1", 3), ("a2", 4), ("a3", 5)]
    assert page["unfinished_lines"] == [] and page["changed_files"] == []
    with path.open("a") as handle:
        handle.write("\n" + make_task("a4", "Name a fruit.").model_dump_json() + "\n")
    state.page()
    state.index.wait(30)
    row = state.index.row_of_id["a4"]
    assert state.index.line[row] == 6 and state.index.record(row)["instruction"] == "Name a fruit."
    assert state.details.page(row)["similar"]  # the ROUGE-L pool grows with the index
    write_jsonl_atomic(path, [make_task("b0", "Another run.")])  # replaced: no longer what was indexed
    assert state.page()["changed_files"] == ["raw.jsonl"]


def test_a_big_files_index_is_cached_beside_it_and_redone_when_it_changes(tmp_path, monkeypatch):
    from datagen.view import index as index_module
    from datagen.view import index_cache

    for module in (index_module, index_cache):
        monkeypatch.setattr(module, "CACHE_MIN_BYTES", 0)  # every file counts as big here
    path = tmp_path / "raw.jsonl"
    tasks = [_evol(f"e{i:03d}", f"e{i - 1:03d}" if i else EVOL_ROOT, i % 4 + 1, "evol:deepen", f"Explain item {i}.")
             for i in range(FIRST_BATCH_LINES + 100)]
    write_jsonl_atomic(path, tasks)
    with path.open("a") as handle:
        handle.write("{not json\n")
    data = path.read_bytes()
    parsed = []
    parse = TaskIndex._parse
    monkeypatch.setattr(TaskIndex, "_parse", lambda self, cursor, lines: parsed.append(len(lines)) or
                        parse(self, cursor, lines))

    def look(index):
        page = index.query(search="item 2", sort="round", descending=True, limit=500)
        return page["total"], page["rows"], page["facets"], index.parent_ids(5), index.children("e005")

    first = TaskIndex.build(discover(path))
    assert sum(parsed) == len(tasks) + 1 and index_cache.cache_path(path).is_file()
    parsed.clear()
    again = TaskIndex.build(discover(path))
    assert parsed == [FIRST_BATCH_LINES]  # the first page's lines, then the rest from the cache
    assert look(again) == look(first) and len(again) == len(first)
    assert again.record(again.row_of_id["e250"])["instruction"] == "Explain item 250."
    assert path.read_bytes() == data  # the data file is never written
    with path.open("a") as handle:  # changed: size and mtime no longer match, so it is all read again
        handle.write(make_task("new-1", "Explain item 2 again.").model_dump_json() + "\n")
    parsed.clear()
    grown = TaskIndex.build(discover(path))
    assert sum(parsed) == len(tasks) + 2 and "new-1" in grown.row_of_id
    cache = index_cache.cache_path(path)
    cache.write_text(cache.read_text()[:1000])  # a damaged cache is not trusted: the file is parsed
    parsed.clear()
    assert len(TaskIndex.build(discover(path))) == len(grown) and sum(parsed) == len(tasks) + 2
    assert discover(path).servable() == {"raw.jsonl"}  # the hidden cache is neither listed nor served


# -- the manual pass -------------------------------------------------------------------------------


def test_manual_pass_applies_the_last_mark_per_id(tmp_path):
    overrides = tmp_path / "marks.jsonl"
    append_override(overrides, "a", "drop", "wrong answer")
    append_override(overrides, "b", "drop")
    append_override(overrides, "b", "clear")
    append_override(overrides, "c", "keep", "good")
    append_override(overrides, "zzz", "drop")
    tasks = [make_task(name, f"Task {name}") for name in "abc"]
    context = PassContext(settings=ManualConfig(overrides=str(overrides)), teacher=lambda: None)
    kept, rejected = run_manual_pass(tasks, context)
    assert [t.id for t in kept] == ["b", "c"]
    assert [(r.task.id, r.reason, r.detail) for r in rejected] == [("a", REASON_DROPPED_BY_HAND, "wrong answer")]
    assert context.report["marks_for_other_ids"] == 1
    with pytest.raises(ConfigError, match="overrides"):
        run_manual_pass(tasks, PassContext(settings=ManualConfig(), teacher=lambda: None))


def test_manual_pass_bad_overrides_line_is_one_error_line(tmp_path):
    kept = tmp_path / "kept.jsonl"
    write_jsonl_atomic(kept, [make_task("a", "Task a")])
    overrides = tmp_path / "marks.jsonl"
    overrides.write_text('{"id": "a", "decision": "drop"}\n{"id": "a", "decision": "maybe"}\n')
    result = run_cli("filter", str(kept), "--out", str(tmp_path / "out.jsonl"), "--passes", "manual",
                     "--overrides", str(overrides))
    assert result.returncode != 0
    assert single_error_line(result).startswith(f"error: {overrides}:2: ")


# -- the page in a real browser --------------------------------------------------------------------


def _browser_missing() -> str | None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} missing: apt-get install {package} (make test does where it can)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium missing: pip install -e '.[test]'"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = _browser_missing()
    if missing:
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,800",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout: float = 10):
    """`condition(driver)` once truthy; an element replaced meanwhile (the page redraws) is retried."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05,
                         ignored_exceptions=(StaleElementReferenceException,)).until(condition)


def css(selector):
    from selenium.webdriver.common.by import By

    def find(driver):
        found = driver.find_elements(By.CSS_SELECTOR, selector)
        return found[0] if found and found[0].is_displayed() else False

    return find


@pytest.mark.slow
def test_browser_search_open_task_and_follow_its_lineage(browser, served):
    base, _ = served
    browser.get(f"{base}/#/tasks")
    wait_for(browser, lambda d: d.find_elements("css selector", "#tasks tbody tr"))
    search = css("#search")(browser)
    search.send_keys("rayleigh")
    wait_for(browser, lambda d: "q=rayleigh" in d.current_url and d.find_element("id", "count").text.startswith("2 of"))
    ids = wait_for(browser, lambda d: sorted(r.text for r in d.find_elements("css selector", "#tasks td.col-id")))
    assert ids == ["evol-r2", "evol-r3"]
    browser.find_element("link text", "evol-r3").click()
    wait_for(browser, lambda d: d.find_elements("id", "chain"))
    chain = [li.text.split()[0] for li in browser.find_elements("css selector", "#chain > li")]
    assert chain == [EVOL_ROOT, "evol-r1", "evol-r2", "evol-r3"]
    browser.find_element("css selector", "#chain a.task-link").click()  # evol-r1 (the seed has no link)
    wait_for(browser, lambda d: d.find_element("id", "task-id").text == "evol-r1")
    children = browser.find_elements("css selector", "#children a")
    assert [c.text for c in children] == ["evol-r2"]
    browser.find_element("id", "back").click()
    wait_for(browser, lambda d: css("#search")(d) and css("#search")(d).get_attribute("value") == "rayleigh")


@pytest.mark.slow
def test_browser_renders_teacher_html_as_text_and_runs_none_of_it(browser, served):
    base, _ = served
    browser.get(f"{base}/#/tasks?q=summarise")
    wait_for(browser, lambda d: d.find_element("id", "count").text.startswith("1 of"))
    cell = browser.find_element("css selector", "#tasks tbody td.col-instruction")
    assert "<script>window.__pwned = 1</script>" in cell.text
    cell.click()
    instruction = wait_for(browser, css("#instruction"))
    time.sleep(0.3)  # give an onerror handler, had one been created, time to fire
    assert instruction.text == PAYLOAD
    assert browser.find_elements("css selector", "#task-view img, #task-view script") == []
    assert browser.execute_script("return window.__pwned === undefined")
    assert "<script>window.__pwned = 3</script>" in browser.find_element("id", "task-view").text


@pytest.mark.slow
def test_browser_mark_dropped_writes_overrides_and_the_manual_pass_honours_it(browser, served, run_folder, tmp_path):
    base, state = served
    browser.get(f"{base}/#/task?id=evol-r3b")
    wait_for(browser, css("#mark-drop"))
    browser.find_element("id", "note").send_keys("too far from the seed")
    browser.find_element("id", "mark-drop").click()
    wait_for(browser, lambda d: d.find_element("id", "mark-saved").text.startswith("saved to"))
    assert browser.find_element("id", "mark-state").text == "drop too far from the seed"
    overrides = run_folder / "overrides.jsonl"
    marks = [json.loads(line) for line in overrides.read_text().splitlines()]
    assert [(m["id"], m["decision"], m["note"]) for m in marks] == [("evol-r3b", "drop", "too far from the seed")]
    marked = get_json(f"{base}/api/tasks?f.mark=drop")
    assert [r["id"] for r in marked["rows"]] == ["evol-r3b"]
    assert dict(marked["facets"]["mark"]) == {"drop": 1, "-": marked["all"] - 1}
    kept_before = (run_folder / "kept.jsonl").read_bytes()
    result = run_cli("filter", str(run_folder / "kept.jsonl"), "--out", str(tmp_path / "curated.jsonl"),
                     "--passes", "manual", "--overrides", str(overrides))
    assert result.returncode == 0, result.stderr
    curated = [t.id for t in read_tasks(tmp_path / "curated.jsonl")]
    assert "evol-r3b" not in curated and "evol-r3" in curated and len(curated) == 10
    rejects = [json.loads(line) for line in (tmp_path / "curated.rejects.jsonl").read_text().splitlines()]
    assert [(r["task"]["id"], r["stage"], r["reason"], r["detail"]) for r in rejects] == [
        ("evol-r3b", "manual", REASON_DROPPED_BY_HAND, "too far from the seed")]
    assert (run_folder / "kept.jsonl").read_bytes() == kept_before  # data files are never edited


@pytest.mark.slow
def test_browser_run_page_shows_summary_stats_plots_and_samples(browser, served):
    base, _ = served
    browser.get(f"{base}/#/run")
    samples = wait_for(browser, css("#samples"))
    headers = [th.text for th in samples.find_elements("css selector", "th")]
    assert headers == ["request", "teacher", "base", "tuned", "dpo"]
    assert "2, 3 and 5 <b>are</b> prime." in samples.text
    image = browser.find_element("css selector", ".plots img")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) == 8
    text = browser.find_element("id", "run-view").text
    assert "exact-dedup" in text and "cache hits" in text


@pytest.mark.slow
def test_browser_table_fills_in_while_the_index_is_read(browser, tmp_path, monkeypatch):
    path = tmp_path / "kept.jsonl"
    write_jsonl_atomic(path, [make_task(f"t{i:03d}", f"Instruction number {i}") for i in range(900)])
    release = pause_after_first_batch(monkeypatch)
    server, _state = make_server(path, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/#/tasks")
        count = wait_for(browser, lambda d: "indexing" in d.find_element("id", "count").text
                         and d.find_element("id", "count").text)
        assert count.startswith(f"{FIRST_BATCH_LINES} of {FIRST_BATCH_LINES} tasks so far (indexing…")
        assert len(browser.find_elements("css selector", "#tasks tbody tr")) == 50
        release.set()  # the page asks again by itself and shows the whole file
        wait_for(browser, lambda d: d.find_element("id", "count").text == "900 of 900 tasks")
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def test_view_command_warns_off_loopback_and_refuses_a_missing_path(tmp_path):
    result = run_cli("view", str(tmp_path / "nothing"))
    assert result.returncode != 0
    assert "no such file or folder" in single_error_line(result)
    kept = tmp_path / "kept.jsonl"
    write_jsonl_atomic(kept, [make_task("a", "Task a")])
    process = subprocess.Popen([sys.executable, "-m", "datagen.cli", "view", str(kept), "--host", "0.0.0.0",
                                "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        lines = [process.stderr.readline() for _ in range(5)]
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert lines[0].startswith("warning: serving on 0.0.0.0, not 127.0.0.1")
    assert "1 files" in lines[1] and lines[2].startswith(f"marks go to {tmp_path / 'kept.overrides.jsonl'}")
    assert lines[3].startswith("open http://") and "1 tasks indexed" in lines[4]  # said once the index is read
