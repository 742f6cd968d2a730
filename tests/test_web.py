"""The web page at `/` in a real browser: headless Chromium (Debian's `chromium` package) driven by
Playwright's Python API, against a real `curator serve` on a loopback port.

The workspace is built once, through the library (the same calls a job's worker makes, in this
process, which is quicker than nine jobs); only the job test runs a job, to watch its progress.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from service_helpers import Server, build_workspace

sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the browser test needs Playwright: pip install -e '.[test]'")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("the browser test needs Chromium: apt-get install -y chromium (`make test` does it as root)",
                allow_module_level=True)

# Re-export m1 in place: a job with counted progress whose worker needs no model (quick to start).
EXPORT_JOB = '{"kind": "export", "mixture": "m1", "force": true}'
SEARCH = {"prompt": "Calculate the answer: (3 + 4) * 2\n\nThink step-by-step.",
          "completion": "3 + 4 = 7. 7 * 2 = 14. The answer is 14."}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from curator.service.auth import create_token

    ws, root = build_workspace(tmp_path_factory.mktemp("web"))
    tokens = {scope: create_token(ws, scope, f"web-{scope}")[1] for scope in ("read", "write")}
    server = Server(ws.root, [root]).start()
    try:
        yield server, tokens
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: Chromium refuses its sandbox as root (CI runs as root).
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, site):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1200, "height": 900})
    context.set_default_timeout(30_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(site[0].url + "/")
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def sign_in(page, token: str) -> None:
    page.get_by_label("API token").fill(token)
    page.locator("#login-form button").click()


def test_a_wrong_token_is_refused_clearly_and_a_good_one_is_kept_for_the_session(page, site):
    _, tokens = site
    sign_in(page, "cur_nope_nope")
    sync_api.expect(page.locator("#login-error")).to_contain_text("refused this token")
    assert page.locator("#app").is_hidden()
    sign_in(page, tokens["read"])
    sync_api.expect(page.locator("#app")).to_be_visible()
    page.reload()           # the token lives in sessionStorage: no second sign-in in this tab
    sync_api.expect(page.locator("#app")).to_be_visible()
    assert page.locator("#login").is_hidden()
    page.get_by_role("button", name="Sign out").click()
    sync_api.expect(page.locator("#login")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0


def test_composition_runs_mixtures_and_audit_are_shown(page, site):
    sign_in(page, site[1]["read"])
    rows = page.locator("#composition-table tbody tr")
    sync_api.expect(rows).to_have_count(2)
    cells = [rows.nth(i).locator("td").all_inner_texts() for i in range(2)]
    assert {(c[0], c[2]) for c in cells} == {("code", "3"), ("mixed", "12")}
    # Two legend squares, then one bar per source and measure, each with its value as a tooltip.
    sync_api.expect(page.locator("#composition-chart svg rect")).to_have_count(2 + 2 * 2)
    assert "mixed: 12 documents" in page.locator("#composition-chart svg title").all_text_contents()
    sync_api.expect(page.locator("#runs-table tbody tr")).to_have_count(1)
    sync_api.expect(page.locator("#mixtures-table tbody tr td").first).to_have_text("m1")
    report = page.frame_locator("#audit-frame").locator("h1")
    sync_api.expect(report).to_have_text("curator audit")


def test_a_ranking_shows_its_best_and_worst_documents(page, site):
    server, tokens = site
    sign_in(page, tokens["read"])
    row = page.locator('#rankings-table tr[data-ranking="reasoning"]')
    sync_api.expect(row).to_have_count(1)
    assert row.locator("td").nth(2).inner_text() == "arithmetic"
    row.get_by_role("button", name="Documents of ranking reasoning").click()
    with server.client(tokens["read"]) as api:
        best = api.get("/rankings/reasoning", params={"limit": 10}).json()["page"]["items"]
        worst = api.get("/rankings/reasoning", params={"limit": 10, "bottom": True}).json()["page"]["items"]
    for shown, expected in ((page.locator("#ranking-top li"), best), (page.locator("#ranking-bottom li"), worst)):
        sync_api.expect(shown).to_have_count(len(expected))
        assert [int(i) for i in shown.evaluate_all("items => items.map(i => i.dataset.doc)")] == \
            [d["doc_id"] for d in expected]
    assert best[0]["score"] >= best[-1]["score"] and best[0]["doc_id"] != worst[0]["doc_id"]


def test_search_shows_top_and_bottom_documents_with_sources_and_scores(page, site):
    server, tokens = site
    sign_in(page, tokens["read"])
    page.get_by_label("Prompt").fill(SEARCH["prompt"])
    page.get_by_label("Completion").fill(SEARCH["completion"])
    page.get_by_label("Top").fill("3")
    page.get_by_label("Bottom").fill("2")
    page.get_by_role("button", name="Search").click()
    top, bottom = page.locator("#search-top li"), page.locator("#search-bottom li")
    sync_api.expect(top).to_have_count(3, timeout=60_000)      # the first search loads the model
    sync_api.expect(bottom).to_have_count(2)
    with server.client(tokens["read"]) as api:
        hits = api.post("/search", json={**SEARCH, "top": 3, "bottom": 2}).json()[0]
    for shown, expected in ((top, hits["top"]), (bottom, hits["bottom"])):
        assert [int(i) for i in shown.evaluate_all("items => items.map(i => i.dataset.doc)")] == \
            [h["doc_id"] for h in expected]
        assert shown.locator(".tag").all_inner_texts() == [h["source"] for h in expected]
        assert [float(s) for s in shown.locator(".score").all_inner_texts()] == \
            pytest.approx([h["score"] for h in expected], abs=1e-3)
        assert all(shown.locator(".snippet").all_inner_texts())


def test_a_job_submitted_on_the_page_shows_live_progress_until_done(page, site):
    sign_in(page, site[1]["write"])
    sync_api.expect(page.locator("#exports-table tbody tr")).to_have_count(1)
    streams: list[str] = []
    page.on("request", lambda request: streams.append(request.url) if request.url.endswith("/events") else None)
    # Every state the job's row shows, in order, as the page redraws it.
    page.evaluate("""() => {
        window.seenStates = [];
        new MutationObserver(() => {
            for (const row of document.querySelectorAll('#jobs-table tr[data-job]')) {
                const last = window.seenStates[window.seenStates.length - 1];
                if (row.dataset.state !== last) window.seenStates.push(row.dataset.state);
            }
        }).observe(document.querySelector('#jobs-table tbody'), {subtree: true, childList: true, attributes: true});
    }""")
    page.get_by_label("New job").fill(EXPORT_JOB)
    page.get_by_role("button", name="Submit").click()
    row = page.locator("#jobs-table tr[data-job]").first
    sync_api.expect(row.locator(".state")).to_have_text("done", timeout=180_000)
    job_id = row.get_attribute("data-job")
    assert any(f"/jobs/{job_id}/events" in url for url in streams)
    seen = page.evaluate("window.seenStates")
    assert seen[-1] == "done" and {"queued", "running"} & set(seen[:-1]), seen
    sync_api.expect(row.locator(".progress-text")).to_contain_text("exporting: 2 / 2 documents")
    assert row.locator("progress").evaluate("bar => [bar.value, bar.max]") == [2, 2]
    # Its log, under its row, as the worker wrote it.
    row.get_by_role("button", name=f"Log of job {job_id}").click()
    log = page.locator(f'tr.log-row[data-log="{job_id}"] pre')
    sync_api.expect(log).to_contain_text("export started in worker pid")
    sync_api.expect(log).to_contain_text("export done")
    row.get_by_role("button", name=f"Log of job {job_id}").click()
    sync_api.expect(log).to_have_count(0)


def test_a_read_token_cannot_submit_and_is_told_why(page, site):
    sign_in(page, site[1]["read"])
    page.get_by_label("New job").fill('{"kind": "audit"}')
    page.get_by_role("button", name="Submit").click()
    sync_api.expect(page.locator("#job-error")).to_contain_text("read scope")


def test_export_files_download_with_the_bytes_on_disk(page, site, tmp_path):
    server, tokens = site
    sign_in(page, tokens["read"])
    export = Path(server.ws) / "exports" / "m1"
    for name in ("part-00000.parquet", "manifest.json"):
        with page.expect_download() as info:
            page.locator(f'#exports-table button[data-file="{name}"]').click()
        download = info.value
        assert download.suggested_filename == name
        saved = tmp_path / name
        download.save_as(saved)
        assert saved.read_bytes() == (export / name).read_bytes()
