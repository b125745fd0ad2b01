"""The recordings page in real headless Chromium (Debian's `chromium`, driven by Playwright
without a browser download): the list shows a just-recorded tap, the detail view draws its
waveform and marks its DTMF, and the <audio> element loads and seeks with Range requests."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from receiver.rtp.packet import RtpPacket, TelephoneEvent
from tests.helpers import (
    TOKEN,
    ServerProcess,
    new_id,
    read_wav,
    require_module,
    require_tool,
    send_tap,
    tap_url,
    wait_for_live,
    wait_for_sidecar,
)

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
AMPLITUDE = 0.5  # of full scale: the waveform spans half the canvas height each way


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = require_tool("chromium")
    sync_api = require_module("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def record_sine(server: ServerProcess, tap_id: str, seconds: float = 3.0) -> np.ndarray:
    """A 440 Hz sine at -6 dBFS over an L16 WebSocket tap; returns the samples."""
    t = np.arange(int(8000 * seconds)) / 8000
    samples = (AMPLITUDE * 32767 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    raw = samples.astype("<i2").tobytes()
    frames: list[bytes | str] = ["content-type:audio/l16;rate=8000"]
    frames += [raw[i : i + 3200] for i in range(0, len(raw), 3200)]
    # Playwright's sync API keeps an event loop running in this thread: send from another one
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, send_tap(tap_url(server, tap_id), frames)).result()
    wait_for_sidecar(server.recordings, tap_id)
    return samples


def record_rtp_with_dtmf(server: ServerProcess) -> str:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    name = f"rtp-127.0.0.1-{sock.getsockname()[1]}"
    dest = ("127.0.0.1", server.rtp_port)
    payload = bytes(np.random.default_rng(3).integers(0, 256, 160, dtype=np.uint8))
    for n in range(50):  # 1 s of PCMU, a DTMF "4" at 0.5 s
        sock.sendto(RtpPacket(0, False, 10 + n, 160 * n, 0x99, payload).serialize(), dest)
        time.sleep(0.02)  # pacing: a real-time sender (faster audio would run ahead of time)
    for i, end in enumerate((False, True, True, True)):
        event = TelephoneEvent(4, end, 10, 800).serialize()
        sock.sendto(RtpPacket(101, i == 0, 60 + i, 4000, 0x99, event).serialize(), dest)
    sock.close()
    wait_for_sidecar(server.recordings, name)
    return name


CANVAS_STATS = """(canvas) => {
    const ctx = canvas.getContext("2d");
    const {width, height} = canvas;
    const data = ctx.getImageData(0, 0, width, height).data;
    let columns = 0, top = height, bottom = -1;
    for (let x = 0; x < width; x++) {
        let lit = false;
        for (let y = 0; y < height; y++) {
            const i = (y * width + x) * 4;
            if (data[i + 1] > 150) {  // the waveform's green; background and grid are dark
                lit = true;
                top = Math.min(top, y);
                bottom = Math.max(bottom, y);
            }
        }
        if (lit) columns++;
    }
    return {width, height, columns, top, bottom};
}"""


def test_page_lists_draws_and_seeks(browser: Any, server: ServerProcess, tmp_path: Path) -> None:
    tap_id = new_id("page")
    record_sine(server, tap_id)
    rtp_name = record_rtp_with_dtmf(server)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    audio_statuses: list[tuple[int, str | None]] = []
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    def on_response(response: Any) -> None:
        if "/audio" in response.url:
            audio_statuses.append((response.status, response.request.headers.get("range")))

    page.on("response", on_response)
    page.goto(f"{server.base_url}/?token={TOKEN}")
    row = page.locator(f'tr[data-name="{tap_id}"]')
    row.wait_for(timeout=10_000)
    assert row.locator(".c-state").inner_text() == "finished"
    assert row.locator(".c-duration").inner_text() == "3.00 s"
    assert row.locator(".c-transport").inner_text() == "WebSocket"

    row.click()
    page.wait_for_function(
        "name => document.body.dataset.waveReady === name", arg=f"{tap_id}:24000", timeout=10_000
    )
    assert page.locator("#d-title").inner_text() == tap_id
    canvas = page.locator("canvas.wave").first
    stats = canvas.evaluate(CANVAS_STATS)
    # every pixel column drawn, and the sine's peaks at half the height above and below the
    # middle (the drawing keeps a 2-pixel margin)
    assert stats["columns"] == stats["width"]
    half = stats["height"] / 2 - 2
    assert abs(stats["top"] - (stats["height"] / 2 - AMPLITUDE * half)) <= 2, stats
    assert abs(stats["bottom"] - (stats["height"] / 2 + AMPLITUDE * half)) <= 2, stats
    page.wait_for_function("document.getElementById('d-spectrogram').naturalWidth > 0")
    page.wait_for_function("document.querySelector('#d-levels .meter') !== null")
    assert "peak −6.0 dBFS" in page.locator("#d-levels").inner_text()

    page.wait_for_function("document.getElementById('d-audio').readyState >= 1", timeout=10_000)
    assert page.evaluate("document.getElementById('d-audio').duration") == pytest.approx(
        3.0, abs=0.01
    )
    seeked = page.evaluate(
        """() => new Promise((resolve) => {
            const audio = document.getElementById("d-audio");
            audio.addEventListener("seeked", () => resolve(audio.currentTime), {once: true});
            audio.currentTime = 2.25;
        })"""
    )
    assert seeked == pytest.approx(2.25, abs=0.01)
    assert any(status == 206 for status, _ in audio_statuses), audio_statuses
    assert all(status in (200, 206) for status, _ in audio_statuses), audio_statuses
    # the playhead follows the audio
    page.wait_for_function(
        "Math.abs(parseFloat(document.getElementById('d-playhead').style.left) - 75) < 0.5"
    )
    screenshot = tmp_path / "recording-page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"\nscreenshot of the detail view: {screenshot}")

    page.goto(f"{server.base_url}/?token={TOKEN}#/tap/{rtp_name}")
    page.wait_for_function(
        "name => document.body.dataset.waveReady === name", arg=f"{rtp_name}:8000"
    )
    marker = page.locator(".marker.dtmf")
    assert marker.count() == 1
    assert marker.inner_text() == "4"
    assert float(marker.evaluate("m => parseFloat(m.style.left)")) == pytest.approx(50.0, abs=0.1)
    assert float(marker.evaluate("m => parseFloat(m.style.width)")) == pytest.approx(10.0, abs=0.1)
    assert page.locator("#d-network-title").inner_text() == "RTP"
    assert errors == []
    page.close()


def test_page_with_token_in_path_and_token_prompt(browser: Any, server: ServerProcess) -> None:
    tap_id = new_id("prefix")
    record_sine(server, tap_id, seconds=0.5)
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(f"{server.base_url}/t/{TOKEN}/#/tap/{tap_id}")
    page.wait_for_function("name => document.body.dataset.waveReady === name", arg=f"{tap_id}:4000")
    assert page.locator("canvas.wave").count() == 1
    api_calls = [u for u in requests if "/api/" in u]
    assert api_calls and all(u.startswith(f"{server.base_url}/t/{TOKEN}/api/") for u in api_calls)
    assert page.evaluate("document.getElementById('d-audio').src") == (
        f"{server.base_url}/t/{TOKEN}/api/taps/{tap_id}/audio"
    )

    # without a token the page asks for one, and then works
    page.goto(f"{server.base_url}/")
    page.locator("#token-view").wait_for(state="visible")
    page.fill("#token-input", TOKEN)
    page.click("#token-form button")
    page.locator(f'tr[data-name="{tap_id}"]').wait_for(timeout=10_000)
    assert page.url.startswith(f"{server.base_url}/?token={TOKEN}")
    page.close()


def test_page_plays_a_recording_tap_live(browser: Any, server: ServerProcess) -> None:
    """While a tap records, its page offers live listening: the page's WebSocket receives the
    tap's audio (exactly the WAV's, from the position it was told, to the end marker), plays
    it with Web Audio and scrolls its waveform."""
    tap_id = new_id("listen")
    t = np.arange(8000 * 5) / 8000
    samples = (AMPLITUDE * 32767 * np.sin(2 * np.pi * 330 * t)).astype(np.int16)
    raw = samples.astype("<i2").tobytes()
    frames: list[bytes | str] = ["content-type:audio/l16;rate=8000"]
    frames += [raw[i : i + 320] for i in range(0, len(raw), 320)]  # 20 ms each
    with ThreadPoolExecutor(1) as pool:
        sending = pool.submit(asyncio.run, send_tap(tap_url(server, tap_id), frames, pause=0.02))
        wait_for_live(server, tap_id, lambda live: live["frames"] > 0, "its first audio")
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{server.base_url}/?token={TOKEN}#/tap/{tap_id}")
        page.locator("#d-listen").wait_for(state="visible", timeout=10_000)
        page.click("#d-listen")
        page.wait_for_function("window.tapLive && window.tapLive.frames >= 4000", timeout=10_000)
        assert page.evaluate("window.tapLive.ended") is False  # heard while it records
        sending.result()
    wait_for_sidecar(server.recordings, tap_id)
    page.wait_for_function("window.tapLive.ended === true", timeout=10_000)
    live = page.evaluate("window.tapLive")
    wav, _ = read_wav(server.recordings / f"{tap_id}.wav")
    assert np.array_equal(wav, samples)
    heard = np.array(live["samples"], dtype=np.int16)
    assert live["position"] < len(wav) - 4000 and live["gaps"] == 0
    assert live["frames"] == len(wav) - live["position"]
    assert np.array_equal(heard, wav[live["position"] :])
    stats = page.locator("#d-live-wave").evaluate(CANVAS_STATS)
    assert stats["columns"] > 50  # the waveform scrolled in
    assert page.evaluate("document.getElementById('d-listen-state').textContent") == (
        "the tap ended"
    )
    assert errors == []
    page.close()
