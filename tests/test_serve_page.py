"""The chat page (GET /) in a real headless browser: Debian's chromium driven by selenium
through the system chromedriver, against the server on 127.0.0.1 (tiny preset, ONNX Runtime)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import DEMO_IMAGE
from tests.test_serve import MODEL, _ask, _client, _session, artifact, data_url, model, serving  # noqa: F401

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SCREENSHOT = "SAISA_PAGE_SCREENSHOT"
"""Set to a path (docs/chat-page.png) to keep the page's screenshot there."""

pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # given, with the driver's path: selenium-manager downloads nothing
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=820,640"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def _answer(driver, question: str, turn: int, seconds: float = 120) -> tuple[str, str]:
    """Ask through the form; wait for the turn-th answer to finish. Returns (class, text)."""
    driver.find_element(By.ID, "question").send_keys(question)
    driver.find_element(By.ID, "send").click()
    done = f".msg:not(.user):nth-of-type({2 * turn})[data-done]"
    WebDriverWait(driver, seconds).until(lambda d: d.find_elements(By.CSS_SELECTOR, done))
    el = driver.find_element(By.CSS_SELECTOR, done)
    return el.get_attribute("class"), el.text


def test_the_page_streams_the_servers_greedy_answers(model, browser, tmp_path):
    n, first, second = 12, "What is in the picture?", "And what colours?"
    with serving(_session(model), api_key="k") as (url, _):
        client = _client(url, "k")
        want = client.chat.completions.create(model=MODEL, messages=_ask(first, data_url(DEMO_IMAGE)),
                                              max_tokens=n, temperature=0).choices[0].message.content
        history = _ask(first, data_url(DEMO_IMAGE)) + [{"role": "assistant", "content": want},
                                                     {"role": "user", "content": second}]
        want2 = client.chat.completions.create(model=MODEL, messages=history, max_tokens=n,
                                               temperature=0).choices[0].message.content
        assert httpx.get(url).headers["content-type"].startswith("text/html")

        browser.get(url)
        browser.find_element(By.ID, "image").send_keys(str(Path(DEMO_IMAGE).resolve()))
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "preview").is_displayed())
        max_tokens = browser.find_element(By.ID, "max-tokens")
        max_tokens.clear()
        max_tokens.send_keys(str(n))
        # no key yet: the server's 401 shows as an error, and the question can be asked again
        cls, text = _answer(browser, first, 1)
        assert "error" in cls and "invalid API key" in text
        browser.find_element(By.ID, "key").send_keys("k")
        # count the answer's updates: a streamed answer grows piece by piece
        browser.execute_script("window.updates = 0; new MutationObserver((m) => { window.updates += m.length; })"
                               ".observe(document.getElementById('log'), {subtree: true, childList: true, "
                               "characterData: true});")
        cls, text = _answer(browser, first, 2)
        assert "assistant" in cls and text == want.strip()
        assert browser.execute_script("return window.updates") > 3
        cls, text = _answer(browser, second, 3)  # the second turn carries the first and the image
        assert "assistant" in cls and text == want2.strip()
        shot = Path(os.environ.get(SCREENSHOT) or tmp_path / "chat-page.png")
        assert browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
