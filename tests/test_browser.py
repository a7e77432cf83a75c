"""The UI and the dashboard in a real headless browser (Debian's chromium + chromium-driver, driven by Selenium).

Screenshots go to test-artifacts/ (git-ignored) at the repository root. Without chromium the tests skip with
the reason; `bash setup.sh` installs it where apt-get is available.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver (bash setup.sh installs them)")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
TIMEOUT = 90


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1400"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    ARTIFACTS.mkdir(exist_ok=True)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout=TIMEOUT):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bot_text(driver, chat_id: str) -> str:
    """The chat's text after the user's question (the model's reply), '' until it exists."""
    text = driver.find_element("id", chat_id).text
    return text.split("What does the chef cook?", 1)[-1].strip() if "What does the chef cook?" in text else ""


def test_ui_chat_steer_and_token_features(browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from llama_sae.ui.app import launch, load_session

    port = _free_port()
    app = launch(load_session(), port=port, block=False)  # the shipped model and SAE, as `llama-sae ui`
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        box = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#chat-input textarea"))
        box.send_keys("What does the chef cook?")
        browser.find_element(By.ID, "send").click()
        _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#token-view .token"))
        first = _bot_text(browser, "steered-chat")
        _wait(browser, lambda d: _bot_text(d, "plain-chat") == first)  # no steer yet: both columns agree
        browser.save_screenshot(str(ARTIFACTS / "ui-1-chat.png"))

        # steer: a latent into slot 1, then drag its strength slider (the release re-runs the last message)
        latent = browser.find_element(By.CSS_SELECTOR, "#latent-0 textarea")
        latent.send_keys(Keys.CONTROL, "a")
        latent.send_keys("969", Keys.TAB)
        slider = browser.find_element(By.CSS_SELECTOR, "#strength-0 input[type=range]")
        ActionChains(browser).click_and_hold(slider).move_by_offset(slider.size["width"] // 3, 0).release().perform()
        strength = float(browser.find_element(By.CSS_SELECTOR, "#strength-0 input[type=number]").get_attribute("value"))
        assert strength >= 4

        def joined_pieces(d) -> str:
            pieces = d.find_elements(By.CSS_SELECTOR, "#token-view .token .text")
            return "".join(t.text for t in pieces).replace(" ", "")

        # done when the steered reply is new, its token view is rendered, and the unsteered column has been written
        # again (it is generated after the steered one): one condition, so no stale render can satisfy it part-way
        _wait(browser, lambda d: _bot_text(d, "steered-chat") not in ("", first)
              and _bot_text(d, "plain-chat") == first
              and joined_pieces(d) == _bot_text(d, "steered-chat").replace(" ", ""))
        steered = _bot_text(browser, "steered-chat")
        assert steered != first
        assert joined_pieces(browser) == steered.replace(" ", "")  # the token view shows the steered reply
        browser.save_screenshot(str(ARTIFACTS / "ui-2-steered.png"))

        # the token-feature view: click a token, see its latents; click a latent, it goes into slot 1
        token = browser.find_elements(By.CSS_SELECTOR, "#token-view .token")[0]
        token_text = token.find_element(By.CSS_SELECTOR, ".text").text.strip()
        token.click()
        _wait(browser, lambda d: re.search(r"\d", d.find_element(By.ID, "token-latents").text.split("explanation")[-1]))
        assert token_text in browser.find_element(By.ID, "token-title").text
        cell = browser.find_element(By.CSS_SELECTOR, "#token-latents [data-testid='cell-0-0']")
        top_latent = cell.text.strip()  # row 0, column 0: the token's strongest latent
        assert top_latent.isdigit()
        cell.click()
        _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#latent-0 textarea").get_attribute("value")
              == top_latent)
        browser.save_screenshot(str(ARTIFACTS / "ui-3-token-features.png"))
        record = json.loads(browser.execute_script(
            "return document.querySelector('#record .cm-content')?.innerText || '{}'") or "{}")
        if record:  # the record panel is collapsed; when rendered it names the steer
            assert record["steers"][0]["latent"] == 969

        # feature search by explanation text; a result row goes into the first slot
        search = browser.find_element(By.CSS_SELECTOR, "#search textarea")
        search.send_keys("courthouse", Keys.ENTER)
        hit = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#search-results [data-testid='cell-0-0']"))[0]
        found = hit.text.strip()
        assert found.isdigit() and "courthouse" in browser.find_element(By.ID, "search-results").text.lower()
        hit.click()
        _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#latent-0 textarea").get_attribute("value") == found)
        browser.save_screenshot(str(ARTIFACTS / "ui-4-search.png"))

        # text completion, steered and unsteered side by side
        next(b for b in browser.find_elements(By.CSS_SELECTOR, "button[role='tab']") if b.text == "Completion").click()
        browser.find_element(By.ID, "complete").click()

        def completion(d, box):
            return d.find_element(By.CSS_SELECTOR, f"#{box} textarea").get_attribute("value")

        _wait(browser, lambda d: completion(d, "steered-text") and completion(d, "plain-text"))
        browser.save_screenshot(str(ARTIFACTS / "ui-5-completion.png"))

        # the dashboard's link: ?steer=SPEC fills the first slot
        browser.get(f"http://127.0.0.1:{port}/?steer=766:clamp:5:prompt")
        _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#latent-0 textarea").get_attribute("value") == "766")
        strength = browser.find_element(By.CSS_SELECTOR, "#strength-0 input[type=number]").get_attribute("value")
        assert float(strength) == 5
    finally:
        app.close()


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """A dashboard of a few latents of the shipped SAE, from a small features artifact with two explanations."""
    from llama_sae import tinyworld
    from llama_sae.features import build_features, load_features
    from llama_sae.llama import load_model, load_tokenizer
    from llama_sae.sae import load
    from llama_sae.ui.dashboard import write_dashboard

    tmp = tmp_path_factory.mktemp("dashboard")
    model, tok = load_model(tinyworld.model_path()), load_tokenizer(tinyworld.model_path())
    sae = load(tinyworld.sae_path())
    feats = build_features(model, tok, sae, "tinyworld:400:heldout", tmp / "features", sentences=400, top_n=5,
                           reservoir=10, n_quantiles=5, pool=32)
    live = load_features(feats).live_latents()[:6]
    rows = [{"latent": live[0], "explanation": "cooking words and kitchens", "backend": "test"},
            {"latent": live[1], "explanation": "astronomy: stars and comets", "backend": "test"}]
    (feats / "explanations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (feats / "scores.jsonl").write_text(json.dumps({"latent": live[0], "method": "detection",
                                                    "balanced_accuracy": 0.9}) + "\n")
    index = write_dashboard(tmp / "site", load_features(feats), sae, model, tok, latents=live)
    return index, live


def test_dashboard_opens_from_disk_and_searches(browser, dashboard):
    from selenium.webdriver.common.by import By

    index, live = dashboard
    browser.get(index.as_uri())
    rows = browser.find_elements(By.CSS_SELECTOR, "#latents tbody tr")
    assert len(rows) == len(live)
    browser.find_element(By.ID, "search").send_keys("cooking")
    visible = [r for r in rows if r.is_displayed()]
    assert [r.get_attribute("data-id") for r in visible] == [str(live[0])]
    assert browser.find_element(By.ID, "count").text == "1"
    browser.save_screenshot(str(ARTIFACTS / "dashboard-1-index.png"))

    visible[0].find_element(By.TAG_NAME, "a").click()
    _wait(browser, lambda d: d.find_elements(By.ID, "explanation"))
    assert browser.find_element(By.ID, "explanation").text == "cooking words and kitchens"
    assert "detection 0.90" in browser.page_source
    assert browser.find_elements(By.CSS_SELECTOR, "svg[aria-label='activation histogram'] rect")
    coloured = [s for s in browser.find_elements(By.CSS_SELECTOR, ".sent .tok")
                if "rgba(255, 136, 0, 0)" not in s.get_attribute("style")]
    assert coloured  # the top sentences colour the tokens where the latent fires
    assert len(browser.find_elements(By.CSS_SELECTOR, "td.pos")) == 10
    assert len(browser.find_elements(By.CSS_SELECTOR, "td.neg")) == 10
    steer = browser.find_element(By.ID, "steer").get_attribute("href")
    assert steer.endswith(f"/?steer=resid_post.5@{live[0]}:add:8:prompt")
    browser.save_screenshot(str(ARTIFACTS / "dashboard-2-latent.png"))
