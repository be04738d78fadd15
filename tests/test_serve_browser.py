"""The web page of `llada-hf serve` in a real headless browser (Debian's chromium + chromedriver, driven by
Selenium): load the page, send a prompt to a tiny model, watch draft frames (masked positions drawn as masks),
get the final answer, and keep screenshots (the test's tmp folder; also `$LLADA_HF_SCREENSHOT` when set)."""

import os
import shutil
import time

import pytest
from selenium import webdriver
from serve_helpers import InProcessServer, chat_body, load_chat_model, request_json, save_chat_model  # noqa: E402


pytestmark = pytest.mark.timeout(240)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1100,760")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.fail("chromium and chromedriver are needed: apt-get install -y chromium chromium-driver (the README's "
                    "test command installs them)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    return load_chat_model(save_chat_model(tmp_path_factory.mktemp("serve-browser") / "tiny", two_turns=True))


def wait_for(condition, timeout=60.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("the page did not get there in time")


def ask(driver, text):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def answers(driver):
    return driver.execute_script(
        "return [...document.querySelectorAll('.msg.assistant, .msg.error')].map(b => ({state: b.dataset.state, "
        "frames: Number(b.dataset.frames || 0), text: (b.querySelector('.text') || b).textContent, "
        "masks: b.querySelectorAll('.canvas .mask').length, tokens: b.querySelectorAll('.canvas .tok').length, "
        "stats: (b.querySelector('.stats') || {}).textContent, nfe: b.dataset.nfe}))")


def test_the_page_shows_the_answer_being_denoised(browser, model_and_tokenizer, tmp_path):
    from selenium.webdriver.common.by import By

    model, tokenizer = model_and_tokenizer
    with InProcessServer(model, tokenizer, step_delay=0.08) as server:
        browser.get(server.url + "/")
        wait_for(lambda: browser.find_element(By.ID, "model").text == "tiny", timeout=30)
        for name, value in (("max_tokens", "16"), ("steps", "16"), ("block_length", "8")):
            field = browser.find_element(By.ID, name)
            field.clear()
            field.send_keys(value)
        settings = dict(max_tokens=16, steps=16, block_length=8, temperature=0)
        ask(browser, "where did the cat sit?")
        # a draft frame: some positions decided, others still masked
        frame = wait_for(lambda: next((a for a in answers(browser) if a["frames"] >= 1 and a["masks"] > 0), None))
        assert frame["state"] == "denoising" and frame["tokens"] >= 1
        browser.save_screenshot(str(tmp_path / "serve-denoising.png"))
        done = wait_for(lambda: answers(browser)[0]["state"] in ("done", "error") and answers(browser)[0])
        assert done["state"] == "done", done
        expected = request_json(server.url + "/v1/chat/completions",
                                chat_body("where did the cat sit?", **settings))[2]["choices"][0]["message"]["content"]
        assert done["text"] == expected and expected
        assert done["frames"] >= 2 and int(done["nfe"]) >= 2
        assert "NFE" in done["stats"] and "tok/s" in done["stats"]
        # a second turn (the conversation is sent along); stop on a frame mid-way for the picture
        ask(browser, "what did the fox say?")
        wait_for(lambda: len(answers(browser)) == 2 and answers(browser)[1]["frames"] >= 5
                 and answers(browser)[1]["masks"] > 0, timeout=60, interval=0.01)
        shot = tmp_path / "serve.png"
        browser.save_screenshot(str(shot))
        if os.environ.get("LLADA_HF_SCREENSHOT"):
            browser.save_screenshot(os.environ["LLADA_HF_SCREENSHOT"])
        second = wait_for(lambda: answers(browser)[1]["state"] in ("done", "error") and answers(browser)[1])
        assert second["state"] == "done" and second["text"], second
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshots: {tmp_path}")


def test_the_page_sends_a_picked_image_to_a_llada_v_server(browser, tmp_path):
    """A LLaDA-V server's page shows the image picker; a picked picture goes with the question (as a data: URL) and
    the answer equals the API's answer for the same picture and question."""
    import base64

    from llada_v_helpers import tiny_processor, write_official_checkpoint
    from PIL import Image
    from selenium.webdriver.common.by import By

    from transformers import AutoModel

    write_official_checkpoint(tmp_path / "llada-v")
    model = AutoModel.from_pretrained(tmp_path / "llada-v").eval()
    picture = tmp_path / "picture.png"
    Image.effect_noise((60, 40), 60).convert("RGB").save(picture)
    with InProcessServer(model, tiny_processor(), step_delay=0.02) as server:
        browser.get(server.url + "/")
        wait_for(lambda: browser.find_element(By.ID, "model").text == "tiny", timeout=30)
        assert browser.find_element(By.ID, "image-row").is_displayed()
        for name, value in (("max_tokens", "8"), ("steps", "8"), ("block_length", "4")):
            field = browser.find_element(By.ID, name)
            field.clear()
            field.send_keys(value)
        browser.find_element(By.ID, "image").send_keys(str(picture))
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#attachments .thumb"), timeout=10)
        ask(browser, "What is in the image?")
        done = wait_for(lambda: answers(browser) and answers(browser)[0]["state"] in ("done", "error")
                        and answers(browser)[0])
        assert done["state"] == "done", done
        assert browser.find_elements(By.CSS_SELECTOR, ".msg.user .thumb")
        assert not browser.find_elements(By.CSS_SELECTOR, "#attachments .thumb")  # sent: the picker is empty again
        url = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is in the image?"}]
        body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 8, "steps": 8,
                "block_length": 4, "temperature": 0}
        status, _, reply = request_json(server.url + "/v1/chat/completions", body)
        assert status == 200 and done["text"] == reply["choices"][0]["message"]["content"]
        browser.save_screenshot(str(tmp_path / "serve-vision.png"))
