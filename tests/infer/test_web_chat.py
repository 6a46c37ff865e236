"""The web chat page in headless Chromium (Debian's chromium + chromedriver, driven by Selenium, offline):
type a message, send it, and the streamed answer on the page is the API's answer to the same request."""

import re
from pathlib import Path

import openai
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from nanoseek.infer.text import readable
from tests.conftest import tiny_model
from tests.infer.conftest import NAME, live_server
from tests.infer.test_server import REASONING, script

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
def browser(tmp_path, monkeypatch):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER}: install Debian's chromium and chromium-driver: "
                    f"apt-get install -y chromium chromium-driver")
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def send(browser, message: str):
    browser.find_element(By.ID, "input").send_keys(message)
    browser.find_element(By.ID, "send").click()


def finished_answer(browser, n: int):
    """The n-th assistant message (from 1), once its stream has finished."""
    return WebDriverWait(browser, 30).until(
        lambda d: (done := d.find_elements(By.CSS_SELECTOR, ".message.assistant.done"))[n - 1:] and done[n - 1],
        message=f"no finished answer; page error: {browser.find_element(By.ID, 'error').text!r}")


def text(browser, element, selector: str) -> str:
    """textContent: the exact text, unlike Selenium's rendered `.text`."""
    return browser.execute_script("return arguments[0].querySelector(arguments[1]).textContent", element, selector)


def test_chat_page_streams_the_api_answer(browser, tokenizer, monkeypatch):  # noqa: F811
    with live_server(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer) as (url, app):
        browser.get(url)
        for field, value in (("temperature", "0"), ("max-tokens", "16")):
            browser.find_element(By.ID, field).clear()
            browser.find_element(By.ID, field).send_keys(value)
        send(browser, "Hello")
        answer = finished_answer(browser, 1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        expected = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello"}],
                                                  temperature=0, max_tokens=16).choices[0]
        assert text(browser, answer, ".content") == expected.message.content
        assert text(browser, answer, ".reasoning-text") == expected.message.reasoning_content
        assert expected.message.content + expected.message.reasoning_content  # the page showed some text
        assert answer.get_attribute("data-finish-reason") == expected.finish_reason
        assert browser.find_element(By.CSS_SELECTOR, ".message.user .content").text == "Hello"

        # a model that thinks first, and answers in R1-Zero's tags, split across deltas
        script(app.state.worker.engine, monkeypatch, [*REASONING[:-1], " <ans", "wer>4</an", "swer>."])
        send(browser, "What is 2 + 2?")
        answer = finished_answer(browser, 2)
        reasoning = answer.find_element(By.CSS_SELECTOR, ".reasoning")
        assert reasoning.is_displayed() and reasoning.get_attribute("open") is None  # folded once answered
        assert re.fullmatch(r"Thought for \d+\.\d s", text(browser, answer, "summary"))  # no "Thinking…" left
        assert text(browser, answer, ".reasoning-text") == "Two and two."
        assert text(browser, answer, ".content") == readable("It is <answer>4</answer>.") == "It is 4."

        browser.find_element(By.ID, "temperature").send_keys("9")  # "09" > 2: the server's 400 is shown
        send(browser, "Again")
        error = WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "error").text)
        assert "temperature" in error and "less than or equal to 2" in error
        assert browser.find_element(By.ID, "input").get_attribute("value") == "Again"  # given back to retry
        assert len(browser.find_elements(By.CSS_SELECTOR, ".message")) == 4
