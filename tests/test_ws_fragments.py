"""WebSocket messages split into continuation frames, written by hand on a raw socket: a message
over `ws_max_message_size` closes with 1009 however it is fragmented (and what came before is
kept); a legal message in many fragments, with pings between them, is reassembled exactly."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import struct
import uuid
from typing import Any

import numpy as np
import pytest

from bench.rtp_load import payload_for
from tests import reference
from tests.helpers import ServerProcess, assert_header_matches_data, read_wav, wait_for_sidecar

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA
MAX_MESSAGE = 65536  # the default ws_max_message_size


def frame_header(opcode: int, length: int, fin: bool, mask: bytes) -> bytes:
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        head = struct.pack("!BB", first, 0x80 | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, length)
    return head + mask


def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client frame (RFC 6455 §5.2)."""
    mask = os.urandom(4)
    key = np.frombuffer((mask * (len(payload) // 4 + 1))[: len(payload)], np.uint8)
    masked = (np.frombuffer(payload, np.uint8) ^ key).tobytes()
    return frame_header(opcode, len(payload), fin, mask) + masked


def fragments(opcode: int, message: bytes, size: int) -> list[bytes]:
    pieces = [message[i : i + size] for i in range(0, len(message), size)] or [b""]
    return [
        frame(opcode if n == 0 else CONTINUATION, piece, fin=n == len(pieces) - 1)
        for n, piece in enumerate(pieces)
    ]


class RawWebSocket:
    def __init__(self, server: ServerProcess, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by the server")
        return data

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def read_frame(self) -> tuple[int, bytes]:
        """The next server frame (unmasked, never fragmented by aiohttp)."""
        while len(self.buffer) < 2:
            self.buffer += self._recv()
        opcode, length = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F
        offset = 2
        if length >= 126:
            size = 2 if length == 126 else 8
            while len(self.buffer) < 2 + size:
                self.buffer += self._recv()
            length = int.from_bytes(self.buffer[2 : 2 + size], "big")
            offset += size
        while len(self.buffer) < offset + length:
            self.buffer += self._recv()
        payload = self.buffer[offset : offset + length]
        self.buffer = self.buffer[offset + length :]
        return opcode, payload

    def read_until(self, wanted: int) -> bytes:
        while True:
            opcode, payload = self.read_frame()
            if opcode == wanted:
                return payload

    def close(self, code: int = 1000) -> int:
        """Send our close frame; return the code of the server's close frame."""
        self.send(frame(CLOSE, struct.pack("!H", code)))
        reply = self.read_until(CLOSE)
        self.sock.close()
        return int(struct.unpack("!H", reply[:2])[0])


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = ServerProcess(tmp_path_factory.mktemp("frags") / "rec", "--no-auth").start()
    yield server
    assert server.stop() == 0
    assert "Traceback" not in server.log()


def recorded(srv: ServerProcess, tap_id: str) -> tuple[np.ndarray, dict[str, Any]]:
    sidecar = wait_for_sidecar(srv.recordings, tap_id)
    wav = srv.recordings / f"{tap_id}.wav"
    assert assert_header_matches_data(wav) == sidecar["frames_written"]
    return read_wav(wav)[0], sidecar


@pytest.mark.parametrize("fragment_size", [1000, 65536 // 3, 7])
def test_a_fragmented_message_over_the_limit_closes_1009_and_keeps_the_audio_before(
    srv: ServerProcess, fragment_size: int
) -> None:
    tap_id = f"frag-big-{uuid.uuid4().hex[:8]}"
    ws = RawWebSocket(srv, f"/tap/{tap_id}")
    before = payload_for(1, 160 * 25)
    ws.send(*(frame(BINARY, before[i : i + 160]) for i in range(0, len(before), 160)))
    too_big = fragments(BINARY, payload_for(2, MAX_MESSAGE + 1), fragment_size)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        ws.send(*too_big)  # the server may close before the last fragment
    reply = ws.read_until(CLOSE)
    assert struct.unpack("!H", reply[:2])[0] == 1009
    ws.sock.close()

    samples, sidecar = recorded(srv, tap_id)
    assert np.array_equal(samples, reference.decode("PCMU", before))
    assert sidecar["close_code"] == 1009 and sidecar["end_reason"] == "message too big"
    assert sidecar["counters"]["frames_received"] == 25


def test_a_frame_announcing_an_absurd_length_closes_1009_at_once(srv: ServerProcess) -> None:
    tap_id = f"frag-len-{uuid.uuid4().hex[:8]}"
    ws = RawWebSocket(srv, f"/tap/{tap_id}")
    before = payload_for(3, 800)
    ws.send(frame(BINARY, before), frame_header(BINARY, 1 << 62, True, b"\0\0\0\0"))
    reply = ws.read_until(CLOSE)  # without the server waiting for (or allocating) 4 EiB
    assert struct.unpack("!H", reply[:2])[0] == 1009
    ws.sock.close()
    samples, sidecar = recorded(srv, tap_id)
    assert np.array_equal(samples, reference.decode("PCMU", before))
    assert sidecar["close_code"] == 1009


def test_a_legal_message_in_many_fragments_with_pings_between_is_recorded_exactly(
    srv: ServerProcess,
) -> None:
    tap_id = f"frag-ok-{uuid.uuid4().hex[:8]}"
    ws = RawWebSocket(srv, f"/tap/{tap_id}")
    sizes = (MAX_MESSAGE - 1, 160, 12345)  # MAX_MESSAGE itself: its own test below
    messages = [payload_for(10 + n, size) for n, size in enumerate(sizes)]
    pongs = 0
    for message in messages:
        pieces = fragments(BINARY, message, 97)
        for n, piece in enumerate(pieces):
            ws.send(piece)
            if n % 100 == 50:  # control frames may come between the fragments of a message
                ws.send(frame(PING, b"p%d" % n))
                assert ws.read_until(PONG) == b"p%d" % n
                pongs += 1
    assert pongs > 5
    assert ws.close() == 1000
    samples, sidecar = recorded(srv, tap_id)
    assert np.array_equal(samples, reference.decode("PCMU", b"".join(messages)))
    assert sidecar["counters"]["frames_received"] == len(messages)
    assert sidecar["close_code"] == 1000 and sidecar["end_reason"] == "closed"


def test_fragmented_media_streams_text_messages_are_reassembled(srv: ServerProcess) -> None:
    tap_id = f"frag-ms-{uuid.uuid4().hex[:8]}"
    ws = RawWebSocket(srv, f"/stream/{tap_id}")
    audio = payload_for(20, 160 * 50)
    messages = [{"event": "start", "start": {"streamSid": "MZ", "tracks": ["inbound"]}}]
    for n in range(50):
        chunk = base64.b64encode(audio[n * 160 : (n + 1) * 160]).decode()
        media = {
            "track": "inbound",
            "chunk": str(n + 1),
            "timestamp": str(n * 20),
            "payload": chunk,
        }
        messages.append({"event": "media", "media": media})
    for message in messages:
        ws.send(*fragments(TEXT, json.dumps(message).encode(), 7))
    assert ws.close() == 1000
    samples, sidecar = recorded(srv, tap_id)
    assert sidecar["dialect"] == "media-streams"
    assert np.array_equal(samples, reference.decode("PCMU", audio))


def test_a_message_of_exactly_the_limit_is_accepted(srv: ServerProcess) -> None:
    tap_id = f"frag-edge-{uuid.uuid4().hex[:8]}"
    ws = RawWebSocket(srv, f"/tap/{tap_id}")
    message = payload_for(30, MAX_MESSAGE)
    ws.send(*fragments(BINARY, message, 4096))
    assert ws.close() == 1000
    samples, _ = recorded(srv, tap_id)
    assert np.array_equal(samples, reference.decode("PCMU", message))
