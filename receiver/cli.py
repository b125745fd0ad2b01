"""`tap-receiver` / `python -m receiver`: configuration, logging, then the server."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from receiver import __version__, config
from receiver.http.auth import TOKEN_FILE, load_or_create_token
from receiver.inspect import commands
from receiver.logs import setup_logging
from receiver.memory import keep_freed_memory
from receiver.sender import command as send
from receiver.server.banner import log_banner
from receiver.server.lifecycle import Server, StartupError, tls_context
from receiver.server.loop import run
from receiver.server.workers import run_workers

log = logging.getLogger("receiver")


def prepare_recordings(directory: Path) -> None:
    """Create the recordings directory and prove it is writable, or raise ConfigError."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise config.ConfigError(
            f"recordings: cannot create directory {str(directory)!r}: {exc.strerror or exc}"
            + _how_to_fix(directory, exc)
        ) from None
    if not directory.is_dir():
        raise config.ConfigError(f"recordings: {str(directory)!r} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise config.ConfigError(
            f"recordings: directory {str(directory)!r} is not writable: {exc.strerror or exc}"
            + _how_to_fix(directory, exc)
        ) from None


def _how_to_fix(directory: Path, exc: OSError) -> str:
    """The usual cause in a container is a bind-mounted host folder owned by another uid than
    the server's (10001 in the image): name the uid and the command that fixes it."""
    if exc.errno == errno.EROFS:
        return " (mount it read-write)"
    if exc.errno not in (errno.EACCES, errno.EPERM):
        return ""
    target = directory
    while not os.path.lexists(target) and target.parent != target:  # what mkdir writes into
        target = target.parent
    uid, gid = os.getuid(), os.getgid()
    return (
        f" (the server runs as uid {uid}); fix: chown {uid}:{gid} {target} (in a container: "
        "the host folder mounted there), or build the image with --build-arg UID=$(id -u)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tap-receiver",
        description="Receive live call-audio taps (WebSocket and RTP) into per-tap WAV files.",
        epilog="Inspect recordings: tap-receiver ls | inspect FILE.wav|TAP_ID | repair DIR; "
        "check a deployment: tap-receiver send URI (each with --help).",
    )
    parser.add_argument("--version", action="version", version=f"tap-receiver {__version__}")
    config.add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in commands.COMMANDS:
        return commands.main(argv)  # ls, inspect, repair: no server
    if argv and argv[0] == "send":
        return send.main(argv[1:])  # a test sender: a client of a server
    args = build_parser().parse_args(argv)
    try:
        cfg, warnings = config.load(args, os.environ)
        prepare_recordings(cfg.storage.recordings)
    except config.ConfigError as exc:
        print(f"tap-receiver: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        ssl_context = tls_context(cfg)  # before anything is created: a bad pair changes nothing
    except StartupError as exc:
        print(f"tap-receiver: {exc}", file=sys.stderr)
        return 1
    setup_logging(cfg.log.level, cfg.log.format)
    keep_freed_memory()  # before the server allocates (workers inherit it)
    for warning in warnings:
        log.warning("%s", warning)
    token: str | None
    recordings = cfg.storage.recordings
    if cfg.auth.no_auth:
        token = None
        log.warning("authentication is OFF (--no-auth): anyone who reaches this port can tap")
    elif cfg.auth.token:
        token = cfg.auth.token
    else:
        try:
            token, created = load_or_create_token(recordings)
        except OSError as exc:
            print(f"tap-receiver: cannot read or create the token file: {exc}", file=sys.stderr)
            return 2
        where = recordings / TOKEN_FILE
        log.info("%s token in %s", "generated a new" if created else "using the", where)
    workers = cfg.server.workers
    try:
        server = Server(cfg, token, ssl_context) if workers == 1 else None
        if server is None:
            return run_workers(
                cfg,
                token,
                ssl_context,
                workers,
                lambda bound: log_banner(bound, token),
            )
        server.on_ready = lambda: log_banner(cfg, token, server.http_port, server.rtp_port)
        code = run(server.run())
        if server.writer_stuck:  # its thread would block the interpreter's exit
            logging.shutdown()
            os._exit(code)
        return code
    except StartupError as exc:
        print(f"tap-receiver: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
