"""The page's conversation thread in Chromium (Playwright), with the fake microphone playing
an espeak-ng WAV: type the first picture, say what to change, undo by keyboard."""

from __future__ import annotations

import re
import shutil
import threading
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from speech2image.app import create_app

from .conftest import _espeak, _test_settings

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("Debian's chromium is missing", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing")
sync_api.expect.set_options(timeout=60_000)
SPOKEN = "Okay, listen. Add a small boat on the water."
BLOB = re.compile(r"^blob:")


@pytest.fixture(scope="module")
def spoken_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("conversation-speech")
    return _espeak(folder / "boat.wav", SPOKEN, speed=130)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_cache, tiny_models) -> Iterator[str]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("conversation-app")
    app = create_app(_test_settings(root, model_cache, tiny_models, default_steps=2))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_conversation_thread_speak_a_change_and_undo(server, spoken_wav) -> None:
    with wave.open(str(spoken_wav)) as wav:
        seconds = wav.getnframes() / wav.getframerate()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={spoken_wav}%noloop",
            ],
        )
        page = browser.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.goto(server)
        page.wait_for_selector("html[data-ready=true]")
        turns = page.locator("#conv-thread > li")

        # Keyboard only: type the first picture, Enter sends it.
        page.focus("#conv-text")
        page.keyboard.type("a lighthouse on a cliff by the sea")
        page.keyboard.press("Enter")
        sync_api.expect(turns).to_have_count(1)
        sync_api.expect(turns.nth(0).locator("img")).to_have_attribute("src", BLOB)
        sync_api.expect(turns.nth(0).locator(".decision")).to_contain_text("New picture")

        # Speak the change: Enter on the record button, focus moves to Stop.
        page.focus("#conv-record")
        page.keyboard.press("Enter")
        sync_api.expect(page.locator("#conv-stop")).to_be_focused()
        page.wait_for_timeout(seconds * 1000 + 700)
        page.keyboard.press("Enter")
        sync_api.expect(turns).to_have_count(2)
        second = turns.nth(1)
        sync_api.expect(second.locator(".decision")).to_contain_text("Edit (add")
        sync_api.expect(second.locator(".decision")).to_contain_text("boat")
        assert "boat" in second.locator(".said").inner_text().lower()
        assert second.locator(".changes li").count() >= 1
        sync_api.expect(second.locator("img")).to_have_attribute("src", BLOB)

        # Undo by keyboard: back to the first picture only.
        page.focus("#conv-undo")
        page.keyboard.press("Enter")
        sync_api.expect(turns).to_have_count(1)
        sync_api.expect(page.locator("#conv-status")).to_contain_text("Undone")
        browser.close()
    assert problems == []
