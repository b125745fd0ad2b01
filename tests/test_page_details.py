"""The recordings page, in real headless Chromium, on what a new user sees first: the URIs to
paste while nothing is recorded, a live tap whose frame count agrees with its duration, and a
two-track recording whose channels are named inbound and outbound, with every label beside the
audio rather than over it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from typing import Any

import aiohttp
import pytest

from tests.helpers import (
    TOKEN,
    ServerProcess,
    banner,
    new_id,
    noise,
    send_tap,
    tap_url,
    wait_for_live_frames,
    wait_for_sidecar,
)
from tests.test_web_page import browser  # noqa: F401  (the headless Chromium fixture)


def facts(page: Any, box: str) -> dict[str, str]:
    """A `<dl class="facts">` as {term: definition}."""
    pairs: dict[str, str] = page.evaluate(
        """(box) => Object.fromEntries(Array.from(document.querySelectorAll(box + ' dt'))
            .map((dt) => [dt.textContent, dt.nextElementSibling.textContent]))""",
        box,
    )
    return pairs


def overlaps(a: dict[str, float], b: dict[str, float]) -> bool:
    return (
        a["x"] < b["x"] + b["width"]
        and b["x"] < a["x"] + a["width"]
        and a["y"] < b["y"] + b["height"]
        and b["y"] < a["y"] + a["height"]
    )


def test_empty_list_shows_the_uris_the_banner_printed(browser: Any, make_server: Any) -> None:  # noqa: F811
    server = make_server("--token", TOKEN)
    printed = banner(server)
    page = browser.new_page()
    page.goto(f"{server.base_url}/t/{TOKEN}/")
    page.locator("#list-empty").wait_for(state="visible")
    page.locator("#connect[open]").wait_for()
    rows = facts(page, "#connect-rows")
    assert rows["WebSocket tap"].startswith(printed["WebSocket tap"])
    assert rows["RTP tap"].startswith(printed["RTP tap"])
    assert rows["Check it"].startswith(f"tap-receiver send '{printed['WebSocket tap']}'")
    page.close()


class HeldTap:
    """A WebSocket tap that sends `frames` bytes, then stays open until closed."""

    def __init__(self, url: str, audio: bytes) -> None:
        self.url, self.audio = url, audio
        self.release = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()))

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as session, session.ws_connect(self.url) as ws:
            for i in range(0, len(self.audio), 160):
                await ws.send_bytes(self.audio[i : i + 160])
                await asyncio.sleep(0.02)  # pacing: a real-time sender
            await asyncio.to_thread(self.release.wait, 60)

    def __enter__(self) -> HeldTap:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.release.set()
        self.thread.join(60)


def test_live_tap_frames_agree_with_its_duration(browser: Any, server: ServerProcess) -> None:  # noqa: F811
    tap_id = new_id("live")
    with HeldTap(tap_url(server, tap_id), noise(8000, seed=9)):
        wait_for_live_frames(server, tap_id, 8000)  # all of it placed; the tap still open
        page = browser.new_page()
        page.goto(f"{server.base_url}/t/{TOKEN}/#/tap/{tap_id}")
        page.locator("#d-live").wait_for(state="visible")
        page.wait_for_function(
            "() => /^8,000/.test(Array.from(document.querySelectorAll('#d-facts dt'))"
            ".find((dt) => dt.textContent === 'Frames').nextElementSibling.textContent)"
        )
        shown = facts(page, "#d-facts")
        assert shown["Duration"] == "1.00 s"  # 8 000 frames at 8 kHz
        assert shown["Frames"].startswith("8,000")
        page.close()
    wait_for_sidecar(server.recordings, tap_id)


@pytest.fixture
def stereo_recording(server: ServerProcess) -> str:
    tap_id = new_id("tracks")
    uri = f"{server.ws_url}/t/{TOKEN}/stream/{{tap_id}}"
    result = subprocess.run(
        [sys.executable, "-m", "receiver", "send", uri, "--media-streams", "--tracks", "both",
         "--seconds", "1", "--tap-id", tap_id],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for_sidecar(server.recordings, tap_id)
    return tap_id


def test_channels_are_named_and_labels_stay_off_the_audio(
    browser: Any,  # noqa: F811
    server: ServerProcess,
    stereo_recording: str,
) -> None:
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(f"{server.base_url}/t/{TOKEN}/#/tap/{stereo_recording}")
    page.wait_for_function("n => document.body.dataset.waveReady === n",
                           arg=f"{stereo_recording}:8000")  # fmt: skip
    page.wait_for_function("document.getElementById('d-spectrogram').naturalWidth > 0")
    page.wait_for_function("document.querySelectorAll('#d-levels .meter').length === 2")
    names = page.locator(".channel-name").all_inner_texts()
    assert [n.lower() for n in names] == ["inbound", "outbound"]
    levels = page.locator("#d-levels .meter-head strong").all_inner_texts()
    assert levels == ["inbound", "outbound"]
    caption = page.locator("#d-spectro-label").inner_text()
    assert "top to bottom: inbound, outbound" in caption
    # nothing written over the waveforms or the spectrogram
    audio = [c.bounding_box() for c in page.locator("canvas.wave").all()]
    audio.append(page.locator("#d-spectrogram").bounding_box())
    labels = [b.bounding_box() for b in page.locator(".channel-name, #d-spectro-label").all()]
    assert len(audio) == 3 and len(labels) == 3
    for label in labels:
        assert not any(overlaps(label, box) for box in audio), (label, audio)
    # the list says what the channels carry too
    page.goto(f"{server.base_url}/t/{TOKEN}/#/")
    row = page.locator(f'tr[data-name="{stereo_recording}"] .c-codec')
    row.wait_for()
    assert "inbound + outbound" in row.inner_text()
    page.close()


def test_an_opus_recording_shows_its_codec_rate_and_concealment(
    browser: Any,  # noqa: F811
    server: ServerProcess,
) -> None:
    """An Opus tap with one frame that is no Opus packet: the page shows OPUS at 48 kHz and
    the libopus concealment the sidecar reports."""
    tap_id = new_id("opuspage")
    packets: list[bytes | str] = [bytes([0xF8, 0xFF, 0xFE])] * 10 + [bytes([0x03, 0x00])]
    # Playwright's sync API holds this thread's event loop: the tap is sent from another thread
    sender = threading.Thread(
        target=asyncio.run, args=(send_tap(tap_url(server, tap_id, "?codec=opus"), packets),)
    )
    sender.start()
    sender.join()
    wait_for_sidecar(server.recordings, tap_id)
    page = browser.new_page()
    page.goto(f"{server.base_url}/t/{TOKEN}/#/tap/{tap_id}")
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('#d-facts dt'))"
        ".some((dt) => dt.textContent === 'Decoding')"
    )
    shown = facts(page, "#d-facts")
    assert shown["Decoding"] == (
        "OPUS at 48000 Hz; concealment opus-plc: 960 frames concealed, 0 corrupt packets"
    )
    assert shown["Format"].endswith("48000 Hz, 1 ch")
    assert page.locator("#d-badges").inner_text().find("OPUS") >= 0
    page.close()
