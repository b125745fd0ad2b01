"""Archiving to object storage, retention and encryption at rest (README, "Archiving").

The store is moto's standalone S3 server, started as its own process on a free port; between
the receiver and it, where a test needs the network to fail, a TCP proxy of the test's own (a
real socket relay that can refuse connections or stop forwarding mid-upload). Objects are read
back with boto3 and compared byte for byte; encrypted ones are decrypted with the `age` CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import soundfile

from receiver.archive.retention import LocalRecording, enforce
from receiver.config import ConfigError, from_argv
from tests import reference
from tests.helpers import (
    DEADLINE,
    TOKEN,
    ServerProcess,
    free_port,
    new_id,
    noise,
    require_module,
    require_tool,
    send_tap,
    tap_url,
    wait_for_sidecar,
    wait_for_wav_frames,
    wait_until,
)

BUCKET = "recordings"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


# -- the store and the network --------------------------------------------------------------------


class Moto:
    def __init__(self, endpoint: str, key_id: str = "testing", secret: str = "testing") -> None:
        self.endpoint = endpoint
        boto3 = require_module("boto3")
        self.client = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id=key_id, aws_secret_access_key=secret,
        )  # fmt: skip

    def get(self, key: str) -> bytes:
        data: bytes = self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        return data

    def keys(self) -> list[str]:
        answer = self.client.list_objects_v2(Bucket=BUCKET)
        return sorted(item["Key"] for item in answer.get("Contents", []))


@pytest.fixture
def moto(tmp_path: Path) -> Iterator[Moto]:
    """moto's S3 server in its own process, on a free loopback port, with one bucket."""
    with moto_server(tmp_path) as endpoint:
        store = Moto(endpoint)
        store.client.create_bucket(Bucket=BUCKET)
        yield store


@contextlib.contextmanager
def moto_server(tmp_path: Path, **env: str) -> Iterator[str]:
    """moto's server (all its services) on a free loopback port; its endpoint."""
    require_module("moto.server")
    port = free_port()
    log = (tmp_path / "moto.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "S3_UPLOAD_PART_MIN_SIZE": str(256 << 10), **env},  # small parts
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, (tmp_path / "moto.log").read_text()
        try:
            with urllib.request.urlopen(endpoint + "/moto-api/", timeout=2):
                return True
        except OSError:
            return False

    try:
        wait_until(up, "moto's S3 server to answer")
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


class Proxy:
    """A TCP relay to `target` on a free port, in a thread: `refuse` closes new connections at
    once (a store that cannot be reached); `stall_after` stops forwarding the client's bytes
    once that many have passed (an upload stuck mid-way); `release` forwards everything."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.refuse = False
        self.stall_after: int | None = None
        self.forwarded = 0
        self.stalled = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def release(self) -> None:
        self.refuse = False
        self.stall_after = None
        self._go.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self.refuse:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the store is gone (the end of a test)
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, upload: bool) -> None:
        try:
            while data := source.recv(65536):
                if upload:
                    if self.stall_after is not None and self.forwarded >= self.stall_after:
                        self._go.clear()
                        self.stalled.set()
                    self._go.wait()
                    self.forwarded += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._server.close()
        self._go.set()


@pytest.fixture
def proxy(moto: Moto) -> Iterator[Proxy]:
    relay = Proxy(int(moto.endpoint.rsplit(":", 1)[1]))
    yield relay
    relay.close()


def archiving(endpoint: str, *extra: str) -> list[str]:
    return ["--token", TOKEN, "--archive-url", f"s3://{BUCKET}/calls", "--archive-endpoint",
            endpoint, *extra]  # fmt: skip


def record(server: ServerProcess, seconds: float, seed: int) -> tuple[str, bytes]:
    """A µ-law WebSocket tap of `seconds`; its id and the bytes sent."""
    tap_id = new_id("arch")
    sent = noise(int(8000 * seconds), seed)
    frames: list[bytes | str] = [sent[i : i + 8000] for i in range(0, len(sent), 8000)]
    asyncio.run(send_tap(tap_url(server, tap_id), frames))
    wait_for_sidecar(server.recordings, tap_id)
    return tap_id, sent


def record_l16(server: ServerProcess, seconds: float, seed: int) -> tuple[str, np.ndarray]:
    """A 48 kHz L16 WebSocket tap of `seconds` (96 000 bytes of WAV a second); the samples."""
    tap_id = new_id("big")
    pcm = np.random.default_rng(seed).integers(-32768, 32767, int(48000 * seconds), np.int16)
    raw = pcm.astype("<i2").tobytes()
    frames: list[bytes | str] = ["content-type:audio/l16;rate=48000"]
    frames += [raw[i : i + 9600] for i in range(0, len(raw), 9600)]
    asyncio.run(send_tap(tap_url(server, tap_id), frames))
    wait_for_sidecar(server.recordings, tap_id)
    return tap_id, pcm


def wait_archived(server: ServerProcess, name: str, timeout: float = DEADLINE) -> dict[str, Any]:
    path = server.recordings / f"{name}.json"

    def check() -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data if (data.get("archive") or {}).get("uploaded_at") else None

    return wait_until(check, f"{name} archived", timeout)


def metrics(server: ServerProcess) -> str:
    request = urllib.request.Request(
        server.base_url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=DEADLINE) as response:
        text: str = response.read().decode()
    return text


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def decoded_samples(wav: bytes, tmp_path: Path) -> np.ndarray:
    path = tmp_path / "from-store.wav"
    path.write_bytes(wav)
    data, rate = soundfile.read(path, dtype="int16")
    assert rate == 8000
    return np.asarray(data)


# -- archiving ------------------------------------------------------------------------------------


def test_finished_recording_is_uploaded_with_its_sidecar(make_server: Any, moto: Moto) -> None:
    server = make_server(*archiving(moto.endpoint), env=AWS_ENV)
    name, _ = record(server, 2.0, seed=1)
    sidecar = wait_archived(server, name)
    archive = sidecar["archive"]
    assert archive["url"] == f"s3://{BUCKET}/calls/{name}.wav"
    assert archive["sidecar_url"] == f"s3://{BUCKET}/calls/{name}.json"
    assert archive["encrypted"] is False
    assert archive["uploaded_at"].endswith("Z")
    wav = (server.recordings / f"{name}.wav").read_bytes()
    assert archive["bytes"] == len(wav)
    assert moto.get(f"calls/{name}.wav") == wav
    stored = json.loads(moto.get(f"calls/{name}.json"))
    assert stored["tap_id"] == name and stored["state"] == "finished"
    assert stored["archive"]["url"] == archive["url"]
    assert moto.keys() == [f"calls/{name}.json", f"calls/{name}.wav"]
    health = wait_until(
        lambda: (h := server.health()) and h["archive"]["uploaded"] == 1 and h,
        "/healthz to count the upload",
    )
    assert health["archive"]["state"] == "ok" and health["archive"]["pending"] == 0
    text = metrics(server)
    assert metric(text, "tap_receiver_archive_uploads_total") == 1
    assert metric(text, "tap_receiver_archive_up") == 1
    assert server.stop() == 0  # SIGTERM stops the archiver's process too
    assert "archiver process exited" not in server.log()


def test_kill9_during_a_multipart_upload_then_restart(
    make_server: Any, moto: Moto, proxy: Proxy, tmp_path: Path
) -> None:
    """The receiver dies mid-upload; the next start finds the recording unarchived, resumes the
    multipart upload (the parts the store has are not sent again) and the object is the WAV."""
    args = archiving(proxy.endpoint, "--archive-part-size", "256K")
    proxy.stall_after = 400 << 10  # the first part passes, the second stops half-way
    recordings = tmp_path / "rec"
    server = make_server(*args, recordings=recordings, env=AWS_ENV)
    name, pcm = record_l16(server, 6.0, seed=2)  # 576 000 bytes of audio: three parts
    assert proxy.stalled.wait(DEADLINE), "the upload never reached the second part"
    server.kill9()
    assert "uploaded_at" not in (json.loads((recordings / f"{name}.json").read_text())
                                 .get("archive") or {})  # fmt: skip
    proxy.release()
    again = make_server(*args, recordings=recordings, env=AWS_ENV)
    archive = wait_archived(again, name)["archive"]
    wav = (recordings / f"{name}.wav").read_bytes()
    assert moto.get(f"calls/{name}.wav") == wav
    assert archive["parts"] == 3
    assert archive["resumed_bytes"] >= 256 << 10  # part 1 was not sent twice
    data, rate = soundfile.read(io.BytesIO(moto.get(f"calls/{name}.wav")), dtype="int16")
    assert rate == 48000 and np.array_equal(data, pcm)
    assert moto.keys() == [f"calls/{name}.json", f"calls/{name}.wav"]
    assert moto.client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []


def test_encrypted_for_age_recipients_and_decrypted_by_the_age_cli(
    make_server: Any, moto: Moto, tmp_path: Path
) -> None:
    age, keygen = require_tool("age"), require_tool("age-keygen")
    identity = tmp_path / "identity.txt"
    subprocess.run([keygen, "-o", str(identity)], check=True, capture_output=True)
    public = subprocess.run([keygen, "-y", str(identity)], check=True, capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    server = make_server(*archiving(moto.endpoint, "--archive-recipients", public), env=AWS_ENV)
    name, sent = record(server, 2.0, seed=3)
    archive = wait_archived(server, name)["archive"]
    assert archive["encrypted"] is True
    assert archive["url"] == f"s3://{BUCKET}/calls/{name}.wav.age"
    assert moto.keys() == [f"calls/{name}.json.age", f"calls/{name}.wav.age"]

    def decrypt(data: bytes) -> bytes:
        assert data.startswith(b"age-encryption.org/v1\n")
        return subprocess.run([age, "-d", "-i", str(identity)], input=data, check=True,
                              capture_output=True).stdout  # fmt: skip

    wav = (server.recordings / f"{name}.wav").read_bytes()
    cipher = moto.get(f"calls/{name}.wav.age")
    assert wav[44:1044] not in cipher
    plain = decrypt(cipher)
    assert plain == wav
    assert np.array_equal(decoded_samples(plain, tmp_path), reference.decode("PCMU", sent))
    stored = json.loads(decrypt(moto.get(f"calls/{name}.json.age")))
    assert stored["tap_id"] == name and stored["archive"]["encrypted"] is True
    assert list((server.recordings / ".archive").iterdir()) == []  # no encrypted copy left


def test_encrypted_archive_only_is_not_served_in_clear(
    make_server: Any, moto: Moto, tmp_path: Path
) -> None:
    keygen = require_tool("age-keygen")
    identity = tmp_path / "identity.txt"
    subprocess.run([keygen, "-o", str(identity)], check=True, capture_output=True)
    public = subprocess.run([keygen, "-y", str(identity)], check=True, capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    args = archiving(moto.endpoint, "--archive-recipients", public, "--archive-delete-local")
    server = make_server(*args, env=AWS_ENV)
    name, _ = record(server, 1.0, seed=40)
    sidecar_path = server.recordings / f"{name}.json"
    wait_until(
        lambda: json.loads(sidecar_path.read_text()).get("archive", {}).get("local_deleted_at"),
        "the local audio to be deleted",
    )
    status, _, body = get_audio(server, name)
    assert status == 409 and b"age-encrypted" in body
    listing = server.api_get("/api/taps")[1]
    assert listing["taps"][0]["archive_url"] == f"s3://{BUCKET}/calls/{name}.wav.age"
    # Its encrypted sidecar cannot be read here: counted, not listed a second time.
    assert [t["where"] for t in listing["taps"]] == ["local"]
    assert listing["archive"]["encrypted"] == 1


def test_delete_local_after_a_confirmed_upload(
    make_server: Any, moto: Moto, tmp_path: Path
) -> None:
    server = make_server(*archiving(moto.endpoint, "--archive-delete-local"), env=AWS_ENV)
    name, sent = record(server, 2.0, seed=7)
    sidecar_path = server.recordings / f"{name}.json"

    def deleted() -> dict[str, Any] | None:
        data: dict[str, Any] = json.loads(sidecar_path.read_text())
        return data if data.get("archive", {}).get("local_deleted_at") else None

    sidecar = wait_until(deleted, "the local audio to be deleted")
    assert sidecar["archive"]["local_deleted_because"] == "archive_delete_local"
    assert not (server.recordings / f"{name}.wav").exists()
    stored = moto.get(f"calls/{name}.wav")
    samples = decoded_samples(stored, tmp_path)
    assert np.array_equal(samples, reference.decode("PCMU", sent))
    # The inspection API streams it from the store now, Range included.
    status, headers, body = get_audio(server, name)
    assert status == 200 and body == stored and headers["Content-Type"] == "audio/wav"
    status, headers, body = get_audio(server, name, "bytes=40-1039")
    assert status == 206 and body == stored[40:1040]
    assert headers["Content-Range"] == f"bytes 40-1039/{len(stored)}"
    status, headers, body = get_audio(server, name, "bytes=-100")
    assert status == 206 and body == stored[-100:]
    assert get_audio(server, "no-such-tap")[0] == 404
    status, listing = server.api_get("/api/taps")
    assert status == 200
    assert listing["taps"][0]["archive_url"] == f"s3://{BUCKET}/calls/{name}.wav"
    assert listing["taps"][0]["duration_seconds"] == 2.0


def test_a_calls_legs_stay_until_the_call_is_built_then_all_three_are_archived(
    make_server: Any, moto: Moto, tmp_path: Path
) -> None:
    """With archive_delete_local, the speak leg ends (and could be uploaded and deleted) long
    before the listen leg begins: the call still gets both legs' audio, and the call's own
    stereo file is archived as well."""
    server = make_server(
        *archiving(moto.endpoint, "--archive-delete-local", "--archive-concurrency", "1"),
        env=AWS_ENV,
    )
    call_id = new_id("call")
    speak, listen = noise(16000, 21), noise(8000, 22)
    base = f"{server.ws_url}/t/{TOKEN}/call/{call_id}"
    asyncio.run(send_tap(f"{base}/speak", [speak[i : i + 800] for i in range(0, 16000, 800)]))
    wait_for_sidecar(server.recordings, f"{call_id}.speak")
    # A tap that ends later is uploaded and deleted (one upload at a time, in order), while
    # the speak leg's WAV stays for its call.
    other, _ = record(server, 1.0, seed=23)
    wait_until(
        lambda: wait_archived(server, other)["archive"].get("local_deleted_at"),
        "a later tap archived and deleted here",
    )
    assert (server.recordings / f"{call_id}.speak.wav").exists()
    asyncio.run(send_tap(f"{base}/listen", [listen[i : i + 800] for i in range(0, 8000, 800)]))
    for name in (call_id, f"{call_id}.speak", f"{call_id}.listen"):
        sidecar = wait_until(
            lambda name=name: (
                (data := wait_archived(server, name))["archive"].get("local_deleted_at") and data
            ),
            f"{name} archived and deleted here",
        )
        assert sidecar["archive"]["url"] == f"s3://{BUCKET}/calls/{name}.wav"
    call = json.loads(moto.get(f"calls/{call_id}.json"))
    offset = call["call"]["legs"]["listen"]["offset_frames"]
    stereo = soundfile.read(io.BytesIO(moto.get(f"calls/{call_id}.wav")), dtype="int16")[0]
    speak_wav = decoded_samples(moto.get(f"calls/{call_id}.speak.wav"), tmp_path)
    listen_wav = decoded_samples(moto.get(f"calls/{call_id}.listen.wav"), tmp_path)
    assert np.array_equal(speak_wav, reference.decode("PCMU", speak))
    assert np.array_equal(listen_wav, reference.decode("PCMU", listen))
    assert len(stereo) == max(len(speak_wav), offset + len(listen_wav))
    assert np.array_equal(stereo[: len(speak_wav), 0], speak_wav)
    assert np.array_equal(stereo[offset : offset + len(listen_wav), 1], listen_wav)
    assert server.health()["calls"]["built"] == 1


def get_audio(server: ServerProcess, name: str, byte_range: str = "") -> tuple[int, Any, bytes]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if byte_range:
        headers["Range"] = byte_range
    request = urllib.request.Request(f"{server.base_url}/api/taps/{name}/audio", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=DEADLINE) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def test_missing_bucket_is_one_outage_and_nothing_unarchived_is_deleted(
    make_server: Any, moto: Moto
) -> None:
    """No bucket: recording goes on, /healthz, /metrics and one log line say so, retention keeps
    what is not archived; once the bucket exists the uploads resume, then retention deletes."""
    moto.client.delete_bucket(Bucket=BUCKET)
    server = make_server(*archiving(moto.endpoint, "--retention-max-bytes", "1"), env=AWS_ENV)
    names = [record(server, 1.0, seed=seed)[0] for seed in (4, 5)]
    health = wait_until(
        lambda: (h := server.health()) and h["archive"].get("failures", 0) >= 2 and h,
        "two failed uploads",
    )
    assert health["archive"]["state"] == "failing"
    assert "NoSuchBucket" in health["archive"]["problem"]
    assert metric(metrics(server), "tap_receiver_archive_up") == 0
    assert all((server.recordings / f"{n}.wav").exists() for n in names)
    assert server.log().count("cannot be used") == 1
    moto.client.create_bucket(Bucket=BUCKET)
    for name in names:
        wait_archived(server, name, timeout=2 * DEADLINE)

    def deleted(name: str) -> bool:
        archive = json.loads((server.recordings / f"{name}.json").read_text())["archive"]
        return archive.get("local_deleted_because") == "retention_max_bytes"

    wait_until(lambda: all(deleted(n) for n in names), "retention to delete the archived audio")
    assert not any((server.recordings / f"{n}.wav").exists() for n in names)
    assert moto.keys() == sorted(f"calls/{n}.{ext}" for n in names for ext in ("json", "wav"))
    wait_until(lambda: (h := server.health()) and h["archive"]["state"] == "ok", "state ok")
    assert server.log().count("cannot be used") == 1
    assert server.log().count("works again") == 1


def test_unreachable_store_then_back(make_server: Any, moto: Moto, proxy: Proxy) -> None:
    proxy.refuse = True
    server = make_server(*archiving(proxy.endpoint), env=AWS_ENV)
    name, _ = record(server, 1.0, seed=6)
    wait_until(lambda: server.health()["archive"].get("failures", 0) >= 1, "a failed upload")
    assert server.health()["archive"]["state"] == "failing"
    assert (server.recordings / f"{name}.wav").exists()
    # The listing cannot read the archive: it lists what is here, and says why.
    listing = wait_until(
        lambda: (b := server.api_get("/api/taps")[1])["archive"]["state"] == "unreachable" and b,
        "the listing to report the unreachable archive",
    )
    assert [(t["name"], t["where"]) for t in listing["taps"]] == [(name, "local")]
    assert listing["archive"]["problem"]
    assert server.log().count("cannot list") == 1
    proxy.release()
    wait_archived(server, name, timeout=2 * DEADLINE)
    assert moto.get(f"calls/{name}.wav") == (server.recordings / f"{name}.wav").read_bytes()
    assert moto.keys() == [f"calls/{name}.json", f"calls/{name}.wav"]


def test_wrong_credentials_are_one_outage_then_uploads_resume_with_the_right_ones(
    make_server: Any, tmp_path: Path
) -> None:
    """moto with its IAM enforced (INITIAL_NO_AUTH_ACTION_COUNT: the first 4 requests are not
    checked, every later one must be signed with a key its IAM knows). Keys with the wrong
    secret: recording goes on, exact; one outage in /healthz, /metrics and the log. Restarted
    with the right keys, the receiver uploads what waited, byte for byte."""
    boto3 = require_module("boto3")
    client_error = require_module("botocore.exceptions").ClientError
    with moto_server(tmp_path, INITIAL_NO_AUTH_ACTION_COUNT="4") as endpoint:
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="x", aws_secret_access_key="x")  # fmt: skip
        iam.create_user(UserName="archiver")  # 1
        key = iam.create_access_key(UserName="archiver")["AccessKey"]  # 2
        allow = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
        policy = json.dumps({"Version": "2012-10-17", "Statement": [allow]})
        iam.put_user_policy(UserName="archiver", PolicyName="s3", PolicyDocument=policy)  # 3
        store = Moto(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
        store.client.create_bucket(Bucket=BUCKET)  # 4: from here on, every request is checked
        with pytest.raises(client_error, match="SignatureDoesNotMatch"):
            Moto(endpoint, key["AccessKeyId"], "not-the-secret").keys()

        keys = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"]}
        wrong = {**AWS_ENV, **keys, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
        recordings = tmp_path / "rec"
        server = make_server(*archiving(endpoint), recordings=recordings, env=wrong)
        taps = [record(server, 1.0, seed=seed) for seed in (60, 61)]
        health = wait_until(
            lambda: (h := server.health()) and h["archive"].get("failures", 0) >= 2 and h,
            "two failed uploads",
        )
        assert health["archive"]["state"] == "failing"
        assert health["archive"]["outages"] == 1
        assert "SignatureDoesNotMatch" in health["archive"]["problem"]
        assert metric(metrics(server), "tap_receiver_archive_up") == 0
        for name, sent in taps:
            wav = (recordings / f"{name}.wav").read_bytes()
            assert np.array_equal(decoded_samples(wav, tmp_path), reference.decode("PCMU", sent))
        assert server.log().count("cannot be used") == 1
        assert store.keys() == []
        assert server.stop() == 0

        right = {**AWS_ENV, **keys, "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        again = make_server(*archiving(endpoint), recordings=recordings, env=right)
        for name, _ in taps:
            wait_archived(again, name)
            assert store.get(f"calls/{name}.wav") == (recordings / f"{name}.wav").read_bytes()
        assert store.keys() == sorted(f"calls/{n}.{x}" for n, _ in taps for x in ("json", "wav"))
        wait_until(lambda: (h := again.health()) and h["archive"]["state"] == "ok", "state ok")
        assert metric(metrics(again), "tap_receiver_archive_up") == 1
        assert "cannot be used" not in again.log()


def test_credentials_from_a_shared_file_and_none_at_all(
    make_server: Any, moto: Moto, tmp_path: Path
) -> None:
    """The standard AWS credentials file and profile are read; with no credentials anywhere the
    store cannot be used, which /healthz says, while recording goes on."""
    nowhere = {
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_SESSION_TOKEN": "",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "missing-credentials"),
        "AWS_CONFIG_FILE": str(tmp_path / "missing-config"),
    }
    without = make_server(*archiving(moto.endpoint), env=nowhere)
    name, sent = record(without, 0.5, seed=30)
    health = wait_until(
        lambda: (h := without.health()) and h["archive"].get("state") == "failing" and h,
        "the archive to report the missing credentials",
    )
    assert "credentials" in health["archive"]["problem"].lower()
    assert soundfile.info(str(without.recordings / f"{name}.wav")).frames == len(sent)
    assert moto.keys() == []

    credentials = tmp_path / "credentials"
    credentials.write_text("[archive]\naws_access_key_id = testing\naws_secret_access_key = x\n")
    from_file = {**nowhere, "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
                 "AWS_PROFILE": "archive"}  # fmt: skip
    server = make_server(*archiving(moto.endpoint), env=from_file)
    name, _ = record(server, 0.5, seed=31)
    wait_archived(server, name)
    assert moto.get(f"calls/{name}.wav") == (server.recordings / f"{name}.wav").read_bytes()


# -- the archive in the inspection API ----------------------------------------------------------


def test_a_recording_being_uploaded_is_not_deleted_under_the_archiver(
    make_server: Any, moto: Moto, proxy: Proxy
) -> None:
    """While its upload is under way, DELETE answers 409 (a name freed mid-upload could be taken
    by a new tap, whose files the archiver would then finish and delete by name); once it is
    archived, DELETE works."""
    args = archiving(proxy.endpoint, "--archive-part-size", "256K", "--archive-delete-local")
    server = make_server(*args, env=AWS_ENV)
    proxy.stall_after = 100 << 10  # the upload stops in its first part
    name, _ = record_l16(server, 3.0, seed=91)
    assert proxy.stalled.wait(DEADLINE), "the upload never started"
    status, body = server.api("DELETE", f"/api/taps/{name}")
    assert status == 409 and "being uploaded" in body["error"], body
    assert (server.recordings / f"{name}.json").exists()
    proxy.release()
    wait_until(
        lambda: wait_archived(server, name)["archive"].get("local_deleted_at"),
        "the upload and the local delete",
    )
    status, body = server.api("DELETE", f"/api/taps/{name}")
    assert status == 200 and body["deleted"] == name


def test_the_same_name_on_two_receivers_is_archived_twice_never_overwritten(
    make_server: Any, moto: Moto
) -> None:
    """A and B share a prefix and each record a tap of the same id: the second upload finds
    the first recording under the name's keys and takes the recording's start into its own;
    both stored WAVs equal their receiver's, and each is listed once where it was recorded."""
    a = make_server(*archiving(moto.endpoint), env=AWS_ENV)
    b = make_server(*archiving(moto.endpoint), env=AWS_ENV)
    tap_id = new_id("same")
    sent = {server: noise(8000, seed) for server, seed in ((a, 81), (b, 82))}
    for server in (a, b):
        asyncio.run(send_tap(tap_url(server, tap_id), [sent[server]]))
        wait_archived(server, tap_id)
    first = json.loads((a.recordings / f"{tap_id}.json").read_text())["archive"]
    second = json.loads((b.recordings / f"{tap_id}.json").read_text())
    start = "".join(c for c in second["started_at"] if c.isalnum())
    assert first["url"] == f"s3://{BUCKET}/calls/{tap_id}.wav"
    assert second["archive"]["url"] == f"s3://{BUCKET}/calls/{tap_id}.{start}.wav"
    assert second["archive"]["sidecar_url"] == f"s3://{BUCKET}/calls/{tap_id}.{start}.json"
    for server, key in ((a, tap_id), (b, f"{tap_id}.{start}")):
        assert moto.get(f"calls/{key}.wav") == (server.recordings / f"{tap_id}.wav").read_bytes()
        stored = json.loads(moto.get(f"calls/{key}.json"))
        assert (
            stored["started_at"]
            == json.loads((server.recordings / f"{tap_id}.json").read_text())["started_at"]
        )
    assert "another recording of that name" in b.log()

    def names(server: ServerProcess) -> list[tuple[str, str]]:
        taps = server.api_get(f"/api/taps?q={tap_id}")[1]["taps"]
        return sorted((t["name"], t["where"]) for t in taps)

    wait_until(
        lambda: (
            names(b) == [(tap_id, "local")]
            and names(a) == sorted([(tap_id, "local"), (f"{tap_id}.{start}", "archive")])
        ),
        "each receiver to list its own recording once and the other's from the archive",
    )


def test_receivers_sharing_an_archive_list_and_serve_each_others_recordings(
    make_server: Any, moto: Moto
) -> None:
    """Two receivers, two recordings directories, one bucket and prefix: what A recorded and
    archived, B lists (`where: archive`), describes and streams (Range too) from the store; A
    lists its own once, as local."""
    a = make_server(*archiving(moto.endpoint), env=AWS_ENV)
    b = make_server(*archiving(moto.endpoint), env=AWS_ENV)
    name, _ = record(a, 1.0, seed=70)
    sidecar = wait_archived(a, name)
    wav = (a.recordings / f"{name}.wav").read_bytes()
    assert moto.get(f"calls/{name}.wav") == wav

    def listed(server: ServerProcess, query: str = "") -> list[dict[str, Any]]:
        status, body = server.api_get(f"/api/taps?q={name}{query}")
        assert status == 200, body
        taps: list[dict[str, Any]] = body["taps"]
        return taps

    entry = wait_until(lambda: (found := listed(b)) and found[0], f"{name} listed by B")
    mine = listed(a)
    assert len(mine) == 1 and mine[0]["where"] == "local"
    assert set(entry) == set(mine[0])
    assert entry["where"] == "archive"
    assert entry["archive_url"] == f"s3://{BUCKET}/calls/{name}.wav"
    assert entry["size_bytes"] == len(wav)
    assert (entry["state"], entry["codec"], entry["transport"]) == ("finished", "PCMU", "websocket")
    assert entry["started_at"] == sidecar["started_at"]
    assert entry["duration_seconds"] == mine[0]["duration_seconds"] == 1.0
    assert not (b.recordings / f"{name}.json").exists()
    # The listing's filters apply to the archived entries too.
    assert [t["name"] for t in listed(b, "&where=archive&state=finished")] == [name]
    assert listed(b, "&where=local") == listed(b, "&state=failed") == []
    assert listed(b, "&transport=rtp") == []
    assert b.api_get("/api/taps?where=elsewhere")[0] == 400
    body = b.api_get("/api/taps")[1]
    assert body["archive"]["state"] == "ok" and body["archive"]["listed"] == 1

    status, detail = b.api_get(f"/api/taps/{name}")
    assert status == 200 and detail["where"] == "archive"
    assert detail["sidecar"]["tap_id"] == name and detail["sidecar"]["archive"]["uploaded_at"]
    assert detail["wav"] is None and detail["live"] is None
    status, headers, body_bytes = get_audio(b, name)
    assert status == 200 and body_bytes == wav and headers["Content-Type"] == "audio/wav"
    status, headers, body_bytes = get_audio(b, name, "bytes=40-1039")
    assert status == 206 and body_bytes == wav[40:1040]
    assert headers["Content-Range"] == f"bytes 40-1039/{len(wav)}"
    assert b.api_get("/api/taps/no-such-tap")[0] == 404
    assert get_audio(b, "no-such-tap")[0] == 404


# -- retention without archiving ------------------------------------------------------------------


def test_retention_max_age_deletes_finished_recordings(make_server: Any) -> None:
    server = make_server("--token", TOKEN, "--retention-max-age", "1")
    name, _ = record(server, 1.0, seed=8)
    wait_until(
        lambda: (
            not (server.recordings / f"{name}.wav").exists()
            and not (server.recordings / f"{name}.json").exists()
        ),
        "retention to delete the recording",
    )
    wait_until(lambda: server.health()["archive"].get("retention_deleted") == 1, "counted")
    assert metric(metrics(server), "tap_receiver_retention_deleted_total") == 1
    assert "retention: deleted 1 recordings" in server.log()


def test_a_recording_interrupted_by_kill9_is_recovered_then_archived(
    make_server: Any, moto: Moto, tmp_path: Path
) -> None:
    recordings = tmp_path / "rec"
    args = archiving(moto.endpoint, "--flush-interval", "0.1")
    server = make_server(*args, recordings=recordings, env=AWS_ENV)
    sent = noise(8000 * 2, 9)
    name = new_id("crash")

    async def run() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(tap_url(server, name)) as ws,
        ):
            for i in range(0, len(sent) // 2, 800):
                await ws.send_bytes(sent[i : i + 800])
            await asyncio.to_thread(wait_for_wav_frames, recordings / f"{name}.wav", len(sent) // 2)
            server.kill9()

    asyncio.run(run())
    assert json.loads((recordings / f"{name}.json").read_text())["state"] == "recording"
    again = make_server(*args, recordings=recordings, env=AWS_ENV)
    sidecar = wait_archived(again, name)
    assert sidecar["recovered"] is True and sidecar["state"] == "finished"
    wav = (recordings / f"{name}.wav").read_bytes()
    assert moto.get(f"calls/{name}.wav") == wav
    assert np.array_equal(
        decoded_samples(wav, tmp_path), reference.decode("PCMU", sent[: len(sent) // 2])
    )
    assert json.loads(moto.get(f"calls/{name}.json"))["recovered"] is True


def test_workers_each_upload_their_own_recordings_once(make_server: Any, moto: Moto) -> None:
    server = make_server(*archiving(moto.endpoint, "--workers", "2"), env=AWS_ENV)
    names = [record(server, 0.5, seed=20 + i)[0] for i in range(4)]
    for name in names:
        assert wait_archived(server, name)["archive"]["url"] == f"s3://{BUCKET}/calls/{name}.wav"
    assert moto.keys() == sorted(f"calls/{n}.{ext}" for n in names for ext in ("json", "wav"))
    for name in names:
        assert moto.get(f"calls/{name}.wav") == (server.recordings / f"{name}.wav").read_bytes()


# -- pure retention planning ----------------------------------------------------------------------


def test_retention_deletes_oldest_first_and_skips_what_may_not_go() -> None:
    recs = [LocalRecording(f"r{i}", mtime=100.0 + i, size=10) for i in range(6)]
    kept = {"r1"}  # e.g. not archived yet

    def delete(rec: LocalRecording, reason: str) -> int | None:
        return None if rec.name in kept else rec.size

    # 60 bytes, limit 35: r0 goes, r1 may not, r2 and r3 go -> 30 bytes.
    done = enforce(recs, now=200.0, max_age=0, max_bytes=35, delete=delete)
    assert [r.name for r, _ in done] == ["r0", "r2", "r3"]
    # Older than 97.5 s at 200: r0, r1 (kept), r2; nothing for the size.
    done = enforce(recs, now=200.0, max_age=97.5, max_bytes=0, delete=delete)
    assert [r.name for r, _ in done] == ["r0", "r2"]
    assert enforce(recs, now=200.0, max_age=0, max_bytes=0, delete=delete) == []


def test_archive_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"archive_recipients.*not an age public key"):
        from_argv(["--archive-url", "s3://b/p", "--archive-recipients", "age1notakey"])
    with pytest.raises(ConfigError, match=r"archive_url.*s3://BUCKET"):
        from_argv(["--archive-url", "https://b/p"])
    with pytest.raises(ConfigError, match="need archive_url"):
        from_argv(["--archive-delete-local"])
    config = from_argv(["--archive-url", "s3://bucket/a/b/", "--archive-endpoint", "http://m:9/"])
    assert (config.archive.bucket, config.archive.prefix) == ("bucket", "a/b")
    assert config.archive.endpoint == "http://m:9"
