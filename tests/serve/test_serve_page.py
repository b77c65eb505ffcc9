"""The web page in a real browser (Playwright driving Debian's Chromium, headless): type a prompt, click generate,
see both models' images and their rewards — the same numbers the API gives for the same request."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import pytest

CHROMIUM = Path("/usr/bin/chromium")
#: Chromium flags for this machine: no sandbox as root, no GPU, and no background connections (the network is closed).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed "
                               "(`pip install playwright`, or `make test`, which installs it)")
if not CHROMIUM.is_file() and shutil.which("chromium") is None:
    pytest.skip("Debian's Chromium is not installed at /usr/bin/chromium (`apt-get install chromium`, or `make test`, "
                "which installs it)", allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        executable = CHROMIUM if CHROMIUM.is_file() else Path(shutil.which("chromium"))
        chromium = playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def test_the_page_generates_and_compares_both_models(browser, start_server, tmp_path):
    url = start_server().url
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    page.wait_for_selector("#model-right option[value=aligned]", state="attached")
    assert page.input_value("#model-left") == "base" and page.input_value("#model-right") == "aligned"
    assert page.input_value("#reward") == "shapes"  # the verifiable reward is preselected
    page.fill("#prompt", "a red circle left of a blue square")
    page.fill("#steps", "6")
    page.fill("#seed", "3")
    page.evaluate("""() => {  // record every status line the panels show while the streams run
        window.statuses = [];
        new MutationObserver(() => window.statuses.push(document.getElementById('status-right').textContent))
            .observe(document.getElementById('status-right'), {childList: true, characterData: true, subtree: true});
    }""")
    page.click("#generate")
    for side in ("left", "right"):
        page.wait_for_selector(f"#panel-{side}[data-state=done]", timeout=30_000)
    sources = [page.get_attribute(f"#image-{side}", "src") for side in ("left", "right")]
    assert all(src.startswith("data:image/png;base64,") for src in sources) and sources[0] != sources[1]
    assert all(page.evaluate(f"document.getElementById('image-{side}').naturalWidth") == 32
               for side in ("left", "right"))
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    for side, model, src in zip(("left", "right"), ("base", "aligned"), sources):
        assert re.fullmatch(r"shapes: \d\.\d{3}(all constraints met|not all constraints met)",
                            page.inner_text(f"#reward-{side}").replace("\n", "").strip())
        shown = float(page.inner_text(f"#reward-{side} .reward-value"))
        checks = page.locator(f"#checks-{side} li")
        assert checks.count() >= 4  # present x2, relation, exact
        assert page.inner_text(f"#title-{side}") == model and "seed 3" in page.inner_text(f"#sub-{side}")
        expected = httpx.post(f"{url}/generate", json={"prompt": "a red circle left of a blue square", "model": model,
                                                      "steps": 6, "seed": 3, "reward": "shapes"}).json()["images"][0]
        assert src == "data:image/png;base64," + expected["png"]
        assert shown == pytest.approx(expected["reward"], abs=5e-4)
        held = [c["ok"] for c in expected["constraints"]]
        assert [cls == "ok" for cls in checks.evaluate_all("items => items.map(i => i.className)")] == held
    statuses = page.evaluate("window.statuses")
    # Live previews: intermediate steps shown before "done" (the browser may paint two stream events in one task,
    # so which steps the observer sees varies).
    previews = [s for s in statuses if re.fullmatch(r"step [1-5] / 6 — x̂0 preview", s)]
    assert previews and statuses[-1].startswith("done: 6 steps")
    assert errors == [] and page.inner_text("#error") == ""
    page.close()


def test_the_page_shows_the_servers_message_for_bad_input(browser, start_server):
    url = start_server().url
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("#model-right option[value=aligned]", state="attached")
    page.fill("#prompt", "a cat on the moon")  # outside the ShapesWorld grammar, with the shapes reward
    page.click("#generate")
    page.wait_for_selector("#error:not(:empty)")
    assert "422" in page.inner_text("#error") and "outside the ShapesWorld grammar" in page.inner_text("#error")
    assert page.get_attribute("#panel-left", "data-state") == "error"
    page.close()
