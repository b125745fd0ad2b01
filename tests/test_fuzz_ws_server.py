"""Property-based fuzzing of the WebSocket dialects against the real server over real
WebSockets: hostile frame sequences never hurt it, each tap that starts ends finished with a
header true to its data, and the in-process regressions hold there too."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzzing import REGRESSIONS, SLOW, check_sidecar, frame_sequences
from tests.helpers import ServerProcess, assert_header_matches_data, wait_for_sidecar


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = ServerProcess(
        tmp_path_factory.mktemp("fuzz") / "rec", "--no-auth", "--stream-jitter-ms", "200"
    ).start()
    yield server
    assert server.stop() == 0, server.log()
    assert "Traceback" not in server.log()


async def send_frames(url: str, frames: list[str | bytes], protocols: tuple[str, ...]) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, protocols=protocols) as ws,
    ):
        for frame in frames:
            if ws.closed:
                break
            try:
                await (ws.send_bytes(frame) if isinstance(frame, bytes) else ws.send_str(frame))
            except ConnectionError:
                break
        await ws.close()


def started_taps(server: ServerProcess) -> int:
    health = server.health()
    assert health is not None, "the server stopped answering /healthz"
    return int(health["taps_started"])


@SLOW
@given(
    frames=frame_sequences(),
    protocols=st.sampled_from([(), (), ("audio.drachtio.org",), ("audio.jambonz.org",)]),
)
def test_real_server_survives_hostile_frames(
    fuzz_server: ServerProcess, frames: list[str | bytes], protocols: tuple[str, ...]
) -> None:
    tap_id = f"fz-{uuid.uuid4().hex[:12]}"
    before = started_taps(fuzz_server)
    asyncio.run(send_frames(f"{fuzz_server.ws_url}/tap/{tap_id}", frames, protocols))
    # The close handshake is over: the server has handled every frame before it, so it has
    # decided whether this connection is a tap (the examples run one at a time).
    if started_taps(fuzz_server) == before:
        # Refused before any recording started (an unsupported format first): no files at all.
        assert not list(fuzz_server.recordings.glob(f"{tap_id}*"))
        return
    assert started_taps(fuzz_server) == before + 1
    sidecar = wait_for_sidecar(fuzz_server.recordings, tap_id)
    check_sidecar(sidecar)
    assert sidecar["end_reason"] == "closed" or sidecar["end_reason"].startswith(
        "unsupported format"
    ), sidecar["end_reason"]
    assert (
        assert_header_matches_data(fuzz_server.recordings / f"{tap_id}.wav")
        == sidecar["frames_written"]
    )
    assert fuzz_server.health() is not None


def test_real_server_regressions(fuzz_server: ServerProcess) -> None:
    for frames in REGRESSIONS.values():
        tap_id = f"rg-{uuid.uuid4().hex[:12]}"
        asyncio.run(send_frames(f"{fuzz_server.ws_url}/tap/{tap_id}", frames, ()))
        sidecar = wait_for_sidecar(fuzz_server.recordings, tap_id)
        check_sidecar(sidecar)
        assert sidecar["end_reason"] == "closed", sidecar["end_reason"]
    assert "Traceback" not in fuzz_server.log()
