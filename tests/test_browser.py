"""The web page end to end in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium):
save the token, ask, make an edit and see the new answer, revert it and see the old one.

Skipped where Chromium is missing, except in CI (CI=true), where that is a failure: `make browser-deps`
installs it."""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import char_tokenizer, tiny_model

from modeledit import Ledger
from modeledit.models import load_model
from modeledit.server import ServerThread, create_app

TOKEN = "browser-token-0123456789"
PROMPT = "The capital of France is"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1200,900",
]


def _executables() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    message = (
        "headless Chromium is needed: run `make browser-deps` (apt-get install chromium chromium-driver)"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(message + " -- in CI this test must not be skipped")
    pytest.skip(message)


@pytest.fixture
def browser(tmp_path):
    browser_path, driver_path = _executables()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def server(tmp_path):
    path = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    model, tok = load_model(str(path))
    app = create_app(model, tok, Ledger(tmp_path / "edits.db"), token=TOKEN)
    with ServerThread(app) as running:
        yield running


def test_edit_and_revert_in_the_page(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 30, poll_frequency=0.05)
    text = lambda element_id: browser.find_element(By.ID, element_id).text.strip()  # noqa: E731
    idle = lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-busy") == "0"  # noqa: E731

    browser.get(server.url + "/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    assert "ft-l" in [o.text for o in Select(browser.find_element(By.ID, "edit-method")).options]

    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "save-token").click()
    wait.until(lambda d: text("token-state") == "token saved")

    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("8")  # as many as the edit's before/after answers
    browser.find_element(By.ID, "ask").click()
    wait.until(lambda d: d.find_element(By.ID, "answer").get_attribute("data-prompt") == PROMPT and idle(d))
    old = text("answer")
    assert old.strip(), "the tiny model should answer something"

    Select(browser.find_element(By.ID, "edit-method")).select_by_value("ft")
    browser.find_element(By.ID, "edit-prompt").send_keys("The capital of {} is")
    browser.find_element(By.ID, "edit-subject").send_keys("France")
    browser.find_element(By.ID, "edit-target").send_keys("Quux")
    browser.find_element(By.ID, "edit-hparams").send_keys('{"steps": 10, "lr": 0.05}')
    browser.find_element(By.ID, "edit-submit").click()
    wait.until(lambda d: "applied" in text("status") and idle(d))
    new = text("answer")
    assert new != old and "Quux" in new
    assert text("answer-before") == old and text("answer-after") == new
    # the check in generation: a red or green verdict, and the checked prompt with its answer
    verdict = browser.find_element(By.ID, "edit-verdict")
    assert verdict.is_displayed() and verdict.get_attribute("class") in ("holds", "fails")
    assert ("does NOT hold" in verdict.text) == (verdict.get_attribute("class") == "fails")
    checked = browser.find_elements(By.CSS_SELECTOR, "#edit-checks tbody tr td")
    assert [c.text for c in checked[:2]] == ["edit", "The capital of France is"]
    rows = browser.find_elements(By.CSS_SELECTOR, "#history tbody tr")
    assert len(rows) == 1 and rows[0].find_element(By.CLASS_NAME, "state").text == "applied"

    rows[0].find_element(By.CSS_SELECTOR, "button.revert").click()
    wait.until(lambda d: "reverted" in text("status") and idle(d))
    assert text("answer") == old
    row = browser.find_element(By.CSS_SELECTOR, "#history tbody tr")
    assert row.find_element(By.CLASS_NAME, "state").text == "reverted"
    assert not row.find_elements(By.CSS_SELECTOR, "button.revert")
