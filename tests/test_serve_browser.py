"""The chat page in a real headless Chromium (Debian's `chromium`, driven by Playwright through
executable_path: Playwright never downloads a browser here). The page is loaded from a live server, a message
is sent, and the streamed answer must appear, with the reasoning collapsed above it (and, from a server with
an API key, after the page asked for the key).

`make test` installs Debian's chromium where it can (as root); where no browser can be installed this test is
skipped with the reason in the summary."""

import os
import shutil

import pytest

from .live_server import CONTENT, REASONING, LiveServer, scripted_model, tokenizer

CHROMIUM = os.environ.get("NANOSEEK_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Counts every change the page makes to the answer and the reasoning while a reply streams in.
WATCH = """() => {
  window.updates = 0;
  new MutationObserver(() => { window.updates += 1; })
    .observe(document.getElementById("log"), {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"NO BROWSER: Chromium not found at {CHROMIUM} and not installable here (Debian: apt-get install "
                    "chromium; `make test` does it as root) - the chat page test did not run")
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True,
                                                       args=FLAGS)
        yield context
        context.close()


def test_chat_page_streams_an_answer(browser):
    tok = tokenizer()
    with LiveServer(scripted_model(tok), tok, max_batch=4) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('model').textContent.startsWith('tiny')")
        page.fill("#temperature", "0")
        page.evaluate(WATCH)
        page.fill("#input", "hello there")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant[data-done='true']")
        answer = page.text_content(".msg.assistant .answer")
        think = page.locator(".msg.assistant details.think")
        assert answer == CONTENT
        assert think.is_visible() and think.get_attribute("open") is None  # shown, collapsed
        assert page.text_content(".msg.assistant .think .body") == REASONING
        assert "finish: stop" in page.text_content(".msg.assistant .meta")
        assert page.evaluate("window.updates") >= 4  # the reply arrived in pieces, not all at once
        opacity = page.eval_on_selector(".msg.assistant details.think", "e => getComputedStyle(e).color")
        assert opacity != page.eval_on_selector(".msg.assistant .answer", "e => getComputedStyle(e).color")  # dimmed

        page.fill("#max-tokens", "2")  # the controls reach the request
        page.fill("#input", "again")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant:nth-of-type(4)[data-done='true']")
        assert "finish: length" in page.text_content(".msg.assistant:nth-of-type(4) .meta")
        assert page.locator(".msg.user").count() == 2

        page.click("#new-chat")
        assert page.locator(".msg").count() == 0
        page.close()


def test_chat_page_asks_for_the_servers_api_key_and_sends_it(browser):
    """With --api-key the page asks for the key once (a dialog), then sends it on its /v1 calls."""
    tok = tokenizer()
    with LiveServer(scripted_model(tok), tok, max_batch=4, api_key="s3cret") as server:
        page = browser.new_page()
        asked = []
        page.on("dialog", lambda dialog: asked.append(dialog.message) or dialog.accept("s3cret"))
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('model').textContent.startsWith('tiny')")
        assert len(asked) == 1 and "API key" in asked[0]
        page.fill("#temperature", "0")
        page.fill("#input", "hello there")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant[data-done='true']")
        assert page.text_content(".msg.assistant .answer") == CONTENT
        page.close()
