"""Settings: one table, four sources, strict validation, one clear line per mistake."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from receiver import config
from receiver.codecs.formats import FormatError, parse_content_type, parse_format_header
from receiver.taps.tap_id import file_safe_id, is_valid_tap_id
from tests.helpers import ROOT


def test_shipped_config_file_lists_every_key_with_its_default() -> None:
    shipped = tomllib.loads((ROOT / "config" / "receiver.toml").read_text())
    assert shipped == {s.key: s.default for s in config.SETTINGS}
    # and it loads as a configuration file, giving exactly the defaults
    path = ROOT / "config" / "receiver.toml"
    cfg, warnings = config.load(_args(["--config", str(path)]), {})
    assert warnings == []
    defaults = config.from_argv([], {})
    assert dataclasses.replace(cfg, config_file=None) == defaults
    assert cfg.config_file == path


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return parser.parse_args(argv)


def test_names_follow_one_rule() -> None:
    for s in config.SETTINGS:
        assert s.env == "RECEIVER_" + s.key.upper()
        assert s.flag == "--" + s.key.replace("_", "-")
    cfg = config.from_argv([], {})
    assert {s.key for s in config.SETTINGS} == set(cfg.settings)


def test_defaults_parsed_into_typed_groups() -> None:
    cfg = config.from_argv([], {})
    server = cfg.server
    assert (server.host, server.http_port, server.rtp_port) == ("0.0.0.0", 8080, 5004)
    assert server.workers == 1
    assert cfg.storage.recordings == Path("./recordings")
    assert cfg.auth.token == "" and cfg.auth.no_auth is False
    assert cfg.ws.max_message_size == 65536
    assert cfg.rtp.recv_buffer == 32 * 1024 * 1024
    assert cfg.rtp.jitter_window == 0.2  # rtp_jitter_ms, in seconds
    assert cfg.rtp.port_range is None
    assert cfg.limits.http_allow == ()


def test_settings_that_need_parsing_are_parsed_once() -> None:
    cfg = config.from_argv(
        [
            "--rtp-port-range=20000-20009",
            "--rtp-allow=10.0.0.0/8, 2001:db8::/32",
            "--workers=3",
            "--stream-l16-byte-order=big",
        ],
        {},
    )
    assert cfg.rtp.port_range == range(20000, 20010)
    assert [str(n) for n in cfg.limits.rtp_allow] == ["10.0.0.0/8", "2001:db8::/32"]
    assert cfg.server.workers == 3
    assert cfg.ws.stream_l16_big_endian is True
    changed = cfg.replace(rtp_port=6000)
    assert changed.server.rtp_port == 6000 and changed.rtp.port_range == range(20000, 20010)
    with pytest.raises(TypeError):
        cfg.replace(rtp_prot=6000)


def test_one_setting_without_the_command_line(tmp_path: Path) -> None:
    file = tmp_path / "r.toml"
    file.write_text('recordings = "/srv/taps"\n')
    assert config.one_setting("recordings", {}) == Path("./recordings")
    assert config.one_setting("recordings", {"RECEIVER_CONFIG": str(file)}) == Path("/srv/taps")
    env = {"RECEIVER_CONFIG": str(file), "RECEIVER_RECORDINGS": "/data"}
    assert config.one_setting("recordings", env) == Path("/data")


def test_precedence_cli_over_env_over_file_over_default(tmp_path: Path) -> None:
    file = tmp_path / "r.toml"
    file.write_text('http_port = 1111\nrtp_port = 2222\nlog_level = "debug"\n')
    env = {"RECEIVER_CONFIG": str(file), "RECEIVER_HTTP_PORT": "3333", "RECEIVER_RTP_PORT": "4444"}
    cfg = config.from_argv(["--http-port", "5555"], env)
    assert cfg.server.http_port == 5555  # flag
    assert cfg.server.rtp_port == 4444  # environment
    assert cfg.log.level == "debug"  # file
    assert cfg.storage.flush_interval == 1.0  # default
    assert cfg.config_file == file


@pytest.mark.parametrize(
    ("env", "expected"),
    [("1", True), ("true", True), ("YES", True), ("0", False), ("false", False), ("", False)],
)
def test_bool_from_environment(env: str, expected: bool) -> None:
    assert config.from_argv([], {"RECEIVER_NO_AUTH": env}).auth.no_auth is expected


@pytest.mark.parametrize(
    ("text", "size"),
    [("65536", 65536), ("64K", 65536), ("4M", 4 << 20), ("4MiB", 4 << 20), ("1g", 1 << 30)],
)
def test_sizes(text: str, size: int) -> None:
    assert config.parse_size(text) == size
    assert config.from_argv(["--ws-max-message-size", text], {}).ws.max_message_size == size


@pytest.mark.parametrize(
    ("argv", "env", "fragment"),
    [
        (["--http-port", "70000"], {}, "http_port (from --http-port): 70000 must be a port"),
        (
            ["--http-port", "eighty"],
            {},
            "http_port (from --http-port): 'eighty' is not a valid int",
        ),
        ([], {"RECEIVER_RTP_PORT": "-1"}, "rtp_port (from RECEIVER_RTP_PORT)"),
        (["--log-level", "loud"], {}, "log_level (from --log-level): 'loud' must be one of"),
        (["--flush-interval", "0"], {}, "flush_interval"),
        (["--ws-max-message-size", "lots"], {}, "ws_max_message_size (from --ws-max-message-size)"),
        (["--token", "a/b"], {}, "token (from --token)"),
        (
            [],
            {"RECEIVER_NO_AUTH": "maybe"},
            "no_auth (from RECEIVER_NO_AUTH): must be true or false",
        ),
        (["--tls-cert", "x.pem"], {}, "tls_cert, tls_key: give both"),
        (["--live-nats"], {}, "live_nats: needs nats_url"),
        (["--rtp-payload-types", "111=amr"], {}, "rtp_payload_types (from --rtp-payload-types)"),
        (["--rtp-payload-types", "8=opus"], {}, "PT must be 96-127"),
        ([], {"RECEIVER_RTP_PAYLOAD_TYPES": "opus"}, "'opus' is not PT=CODEC"),
    ],
)
def test_bad_values_name_the_key(argv: list[str], env: dict[str, str], fragment: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.from_argv(argv, env)
    assert fragment in str(info.value)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    file = tmp_path / "r.toml"
    file.write_text("http_prot = 1\n")
    with pytest.raises(config.ConfigError, match=r"http_prot \(from .*r.toml\): unknown setting"):
        config.from_argv(["--config", str(file)], {})


def test_unknown_environment_variable_is_a_warning() -> None:
    _, warnings = config.load(_args([]), {"RECEIVER_HTTP_PROT": "1"})
    assert warnings == ["ignoring unknown environment variable RECEIVER_HTTP_PROT"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "receiver", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--config", "{tmp}/bad.toml"], "http_prot (from {tmp}/bad.toml): unknown setting"),
        (["--config", "{tmp}/missing.toml"], "does not exist"),
        (["--config", "{tmp}/broken.toml"], "is not valid TOML"),
        (["--http-port", "99999"], "http_port (from --http-port): 99999 must be a port"),
        (["--recordings", "{tmp}/afile/sub"], "recordings: cannot create directory"),
    ],
)
def test_bad_configuration_exits_with_one_clear_line(
    tmp_path: Path, args: list[str], fragment: str
) -> None:
    (tmp_path / "bad.toml").write_text("http_prot = 8080\n")
    (tmp_path / "broken.toml").write_text("http_port = = 1\n")
    (tmp_path / "afile").write_text("not a directory")
    args = [a.format(tmp=tmp_path) for a in args]
    if "--recordings" not in args:
        args += ["--recordings", str(tmp_path / "rec")]
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tap-receiver: configuration error: ")
    assert fragment.format(tmp=tmp_path) in lines[0]
    assert "Traceback" not in result.stderr


def test_console_script_and_help() -> None:
    exe = Path(sys.executable).parent / "tap-receiver"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for s in config.SETTINGS:
        assert s.flag in result.stdout
        assert s.env in result.stdout


# -- pure parsers used by the endpoint ------------------------------------------------------


@pytest.mark.parametrize(
    ("tap_id", "ok"),
    [
        ("a", True),
        ("call-123_ABC.x", True),
        ("9" * 128, True),
        ("9" * 129, False),
        ("", False),
        (".", False),
        ("..", False),
        ("-a", False),
        ("_a", False),
        ("a/b", False),
        ("a\\b", False),
        ("a\n", False),
        ("a b", False),
        ("é", False),
    ],
)
def test_tap_id_rule(tap_id: str, ok: bool) -> None:
    assert is_valid_tap_id(tap_id) is ok


@pytest.mark.parametrize(
    ("text", "expected"),
    [("rtp-127.0.0.1-5004", "rtp-127.0.0.1-5004"), ("rtp-::1-5004", "rtp-__1-5004"), ("..", "tap")],
)
def test_file_safe_id(text: str, expected: str) -> None:
    assert file_safe_id(text) == expected
    assert is_valid_tap_id(file_safe_id(text))


@pytest.mark.parametrize(
    ("text", "encoding", "rate"),
    [
        ('{"content-type": "audio/mulaw;rate=8000"}', "PCMU", 8000),
        ('{"Content-Type":"audio/x-alaw; rate=8000"}', "PCMA", 8000),
        ('{"format": "audio/pcmu"}', "PCMU", 8000),
        ("content-type:audio/alaw;rate=8000", "PCMA", 8000),
        ("Content-Type: audio/mulaw", "PCMU", 8000),
        ("audio/l16;rate=16000", "L16", 16000),
        ("content-type:audio/l16;rate=24000", "L16", 24000),
    ],
)
def test_format_header(text: str, encoding: str, rate: int) -> None:
    fmt = parse_format_header(text)
    assert fmt is not None
    assert (fmt.encoding, fmt.sample_rate, fmt.channels) == (encoding, rate, 1)


@pytest.mark.parametrize("text", ["hello", '{"event": "connected"}', "{not json", "[1,2]", ""])
def test_text_that_is_not_a_format_header(text: str) -> None:
    assert parse_format_header(text) is None


@pytest.mark.parametrize(
    "value",
    [
        "audio/AMR-WB",
        "audio/mulaw;rate=16000",
        "audio/l16;rate=11025",
        "audio/l16;channels=3",
        "audio/opus;rate=44100",
        "audio/G722;rate=48000",
        "audio/G722;channels=2",
    ],
)
def test_unsupported_formats(value: str) -> None:
    with pytest.raises(FormatError):
        parse_content_type(value)


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    for s in config.SETTINGS:
        assert f"| `{s.key}` | `{s.env}` | `{s.flag}` |" in readme, s.key


def test_rtp_payload_types() -> None:
    cfg = config.from_argv(["--rtp-payload-types", " 111=Opus, 112=g722 ,"], {})
    assert cfg.rtp.payload_types == {111: "opus", 112: "g722"}
    assert config.from_argv([], {}).rtp.payload_types == {111: "opus"}
    assert config.from_argv(["--rtp-payload-types", ""], {}).rtp.payload_types == {}


def test_live_nats_with_nats_url() -> None:
    cfg = config.from_argv(["--nats-url", "nats://127.0.0.1:4222"], {"RECEIVER_LIVE_NATS": "1"})
    assert cfg.live.nats is True
    assert config.from_argv([], {}).live.nats is False
