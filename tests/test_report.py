"""`steer demo --out DIR` writes DIR/index.html: one self-contained file. A real headless browser
(Debian's chromium, driven by Playwright) opens it and checks that every image rendered, that
nothing was fetched from outside the file, and that the run's key numbers are on the page."""

import json
import os
import shutil

import pytest

from steer.cli import main
from steer.display import fmt

CHROMIUM = os.environ.get("STEER_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out)]) == 0
    return out, json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_demo_writes_one_self_contained_page(demo):
    out, _ = demo
    page = (out / "index.html").read_text()
    assert "<script" not in page.lower() and "src=\"http" not in page and "href=\"http" not in page
    figures = sorted(out.glob("*.png"))
    assert len(figures) >= 4 and page.count('src="data:image/png;base64,') == len(figures)  # each figure, inlined


@pytest.mark.slow
def test_demo_condition_holds_beyond_the_two_prompts_it_shows(demo):
    # the mean-difference condition on the files' first prompts that the demo used until stop 28
    # scored 0.81 / 0.63 here: right on the two prompts shown, firing on most harmless requests
    ho = demo[1]["refusal"]["condition_heldout"]
    assert ho["n_prompts"] == 64 and ho["harmful"] >= 0.7 and ho["harmless"] <= 0.2, ho


@pytest.mark.slow
def test_report_renders_in_a_real_browser(demo):
    if os.environ.get("STEER_NO_BROWSER") == "1":
        pytest.skip("STEER_NO_BROWSER=1: the browser check was left out on request")
    assert os.path.exists(CHROMIUM), (
        f"no chromium at {CHROMIUM}: `make test` installs Debian's chromium (apt-get install chromium); "
        "set STEER_CHROMIUM to another Chromium, or STEER_NO_BROWSER=1 to leave this check out")
    from playwright.sync_api import sync_playwright

    out, summary = demo
    url = (out / "index.html").resolve().as_uri()
    requests = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url, wait_until="load")
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight])")
            text = page.inner_text("body")
        finally:
            browser.close()
    assert len(images) == len(list(out.glob("*.png"))) and all(done and w > 100 and h > 100 for done, w, h in images), images
    outside = [u for u in requests if not (u == url or u.startswith("data:"))]
    assert not outside, f"the report fetched {outside}"
    # the key numbers of this run, as the page prints them
    sep = summary["separability"]["mean over instruction tokens"]
    r, b, pt = summary["refusal"], summary["bias"], summary["patching"]
    expected = [fmt(sep["rows"][sep["best_layer"]]["accuracy"]), fmt(b["bias_before"]), fmt(b["bias_after"]),
                fmt(pt["top_heads"][0][1]), pt["top_heads"][0][0].split(":")[1], str(r["condition_layer"])]
    expected += [a["steered"].strip()[:40] for a in r["answers"].values()]
    expected += [fmt(row["effect"]) for row in summary["persona"]["evaluation"]["rows"]]
    expected += [fmt(row["kl"]) for rows in summary["transport"]["curves"].values() for row in rows]
    expected += [fmt(e["max_abs"]) for e in summary["diagnostics"]["massive"]["entries"] if e["layer"] % 5 == 0]
    missing = [e for e in expected if e not in text]
    assert not missing, f"not on the page: {missing}"
