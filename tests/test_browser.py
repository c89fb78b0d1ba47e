"""The chat page at /, in a real headless browser: Debian's chromium, driven by selenium, against a real
server on loopback serving the tiny random model (the page's job is streaming and showing the stats, not
the answer's quality).

The page streams a reply, shows decode tok/s and the share of weights read per token, and its dense
toggle changes what the request asks for (read from chromium's own network log, not from the page).
A screenshot of each run is kept under $COREINFER_TEST_ARTIFACTS, else pytest's tmp dir; look at it.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
from test_server import running

from coreinfer.serving.app import create_app
from coreinfer.serving.server import Settings

try:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # the browser fixture skips: a test skip, which fails under CI (a module skip would not)
    webdriver = None

# the machine has no network: nothing in chromium may try to reach one
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-proxy-server", "--disable-dev-shm-usage", "--window-size=1280,860"]
WAIT_S = 60


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if webdriver is None:
        pytest.skip("selenium is missing: pip install -e '.[test]'")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("chromium is missing: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # the requests the page sends
    # an explicit driver path: selenium then never looks for (or downloads) a driver of its own
    with webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver)) as b:
        yield b


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    import torch

    from coreinfer.api import LLM

    threads = torch.get_num_threads()
    yield LLM(str(tiny_model_dir), progress=False, threads=1)
    torch.set_num_threads(threads)


@pytest.fixture
def artifacts(tmp_path) -> Path:
    folder = Path(os.environ.get("COREINFER_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def sent_bodies(browser) -> list[dict]:
    """The bodies of the chat requests the page sent since the last call, from chromium's network log."""
    bodies = []
    for entry in browser.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        request = msg.get("params", {}).get("request", {})
        if msg["method"] == "Network.requestWillBeSent" and request.get("url", "").endswith("/v1/chat/completions"):
            bodies.append(json.loads(request["postData"]))
    return bodies


def ask(browser, text: str, replies_before: int):
    """Type a message, press Enter, wait until the streamed reply carries its stats line."""
    box = browser.find_element(By.ID, "message")
    box.send_keys(text + Keys.ENTER)
    wait = WebDriverWait(browser, WAIT_S)
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta")) > replies_before
               or b.find_elements(By.CSS_SELECTOR, ".msg.error"))
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error"), browser.find_element(By.ID, "log").text
    wait.until(lambda b: not b.find_element(By.ID, "send").get_attribute("disabled"))
    return browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]


def readout(browser, name: str) -> str:
    return browser.find_element(By.ID, name).text


def test_chat_page_streams_with_stats_and_dense_toggle(browser, llm, artifacts):
    with running(create_app(llm, Settings())) as base:
        browser.get(f"{base}/")
        WebDriverWait(browser, WAIT_S).until(lambda b: readout(b, "status") == "ready")
        assert readout(browser, "model") == "tiny-llama0"  # from /health: the checkpoint folder's name
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("12")
        sent_bodies(browser)  # drop the page load's log entries

        core = ask(browser, "The capital of France is", 0)
        [body] = sent_bodies(browser)
        assert body["stream"] is True and body["dense"] is False and body["max_tokens"] == 12
        assert body["messages"] == [{"role": "user", "content": "The capital of France is"}]
        assert core.text.split("\n")[0].strip(), "no streamed text"
        assert float(readout(browser, "tok-s")) > 0
        core_share = readout(browser, "weight-share")
        assert core_share.endswith("%") and 0 < float(core_share[:-1]) < 100, core_share
        assert "core, keep 0.85" in core.find_element(By.CLASS_NAME, "meta").text
        assert float(readout(browser, "ttft")) > 0

        browser.find_element(By.XPATH, "//label[input[@id='mode-dense']]").click()
        assert not browser.find_element(By.ID, "beta").is_enabled()  # keep means nothing dense
        dense = ask(browser, "And of Italy?", 1)
        [body] = sent_bodies(browser)
        assert body["dense"] is True and "beta" not in body
        assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]  # the conversation goes along
        assert readout(browser, "weight-share") == "100%"
        assert dense.find_element(By.CLASS_NAME, "meta").text.startswith("dense")
        browser.save_screenshot(str(artifacts / "chat_page.png"))
        print(f"screenshot: {artifacts / 'chat_page.png'}; core share {core_share}")


def test_chat_page_with_api_key(browser, llm, artifacts):
    with running(create_app(llm, Settings(api_key="s3cret"))) as base:
        browser.get(f"{base}/")  # the page itself needs no key
        WebDriverWait(browser, WAIT_S).until(lambda b: readout(b, "status") == "ready")
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("8")
        browser.find_element(By.ID, "message").send_keys("Hello" + Keys.ENTER)
        error = WebDriverWait(browser, WAIT_S).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".msg.error"))
        assert "invalid or missing API key" in error[0].text
        browser.find_element(By.ID, "api-key").send_keys("s3cret")
        browser.find_element(By.ID, "clear").click()
        reply = ask(browser, "Hello", 0)
        assert reply.find_element(By.CLASS_NAME, "meta").text
        browser.save_screenshot(str(artifacts / "chat_page_api_key.png"))
