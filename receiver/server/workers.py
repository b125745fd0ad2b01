"""`--workers N`: N server processes sharing the HTTP and RTP ports (SO_REUSEPORT).

The parent binds, per worker, one TCP and one UDP socket on the same ports with SO_REUSEPORT,
then forks the workers; each keeps its own pair and closes the others. Because the kernel's
socket group is complete before the first packet, Linux's 4-tuple hash sends every datagram of one
UDP source to the same worker: an RTP stream never splits. TCP connections (WebSocket taps, API
requests) are spread the same way. The token is loaded or created once, by the parent, before the
fork, so all workers share it; all write into the one recordings directory (file names are
claimed with O_EXCL). Each sidecar says which worker recorded it (`worker`).

The parent only supervises: it forwards SIGTERM/SIGINT to every worker (again each second until
they exit: a worker still starting ignores them until its event loop handles them), waits for
them, and exits 0 only if all of them did. A worker that dies on its own takes the others down
(a supervisor should restart the whole set), and the parent exits 1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from receiver.config import Config
from receiver.logs import WorkerLogFilter
from receiver.rtp.sockets import open_udp_socket
from receiver.server.lifecycle import Server, StartupError
from receiver.server.loop import run

log = logging.getLogger("receiver.workers")
RESEND_INTERVAL = 1.0  # seconds between repeated stop signals to workers still running


def bind_tcp(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_shared(config: Config, count: int) -> tuple[list[socket.socket], list[socket.socket]]:
    """`count` UDP and TCP sockets on the configured ports (a port 0 is chosen once, then
    shared). Raises StartupError naming the port."""
    udp: list[socket.socket] = []
    tcp: list[socket.socket] = []
    try:
        host = config.server.host
        rtp_port, http_port = config.server.rtp_port, config.server.http_port
        for _ in range(count):
            try:
                sock, _ = open_udp_socket(host, rtp_port, config.rtp.recv_buffer, reuse_port=True)
            except OSError as exc:
                raise StartupError.listening(host, rtp_port, "udp", exc) from None
            udp.append(sock)
            rtp_port = int(sock.getsockname()[1])
            try:
                sock = bind_tcp(host, http_port)
            except OSError as exc:
                raise StartupError.listening(host, http_port, "tcp", exc) from None
            tcp.append(sock)
            http_port = int(sock.getsockname()[1])
    except BaseException:
        for sock in udp + tcp:
            sock.close()
        raise
    return udp, tcp


def _worker(
    config: Config,
    token: str | None,
    ssl_context: ssl.SSLContext | None,
    index: int,
    udp: socket.socket,
    tcp: socket.socket,
) -> int:
    # Until the event loop takes them over, stop signals are ignored: the parent repeats them.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for handler in logging.getLogger().handlers:
        handler.addFilter(WorkerLogFilter(index))
    log.info("worker %d started (pid %d)", index, os.getpid())
    server = Server(
        config,
        token,
        ssl_context,
        worker=index,
        inherited=(udp, tcp),
        recover_interrupted=index == 0,
    )
    return run(server.run())


def run_workers(
    config: Config,
    token: str | None,
    ssl_context: ssl.SSLContext | None,
    count: int,
    on_listening: Callable[[Config], None] | None = None,
) -> int:
    """Bind, fork `count` workers, supervise them; the process's exit code. `on_listening` gets
    the configuration with the bound ports, in the parent, once the workers run."""
    udp, tcp = bind_shared(config, count)
    config = config.replace(
        rtp_port=int(udp[0].getsockname()[1]), http_port=int(tcp[0].getsockname()[1])
    )
    children: dict[int, int] = {}  # pid -> worker index
    for index in range(count):
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the parent's code
            code = 1
            try:
                for other in range(count):
                    if other != index:
                        udp[other].close()
                        tcp[other].close()
                code = _worker(config, token, ssl_context, index, udp[index], tcp[index])
            except StartupError as exc:
                log.error("worker %d: %s", index, exc)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = index
    for sock in udp + tcp:
        sock.close()
    log.info(
        "%d workers (pids %s) share http_port %d and rtp_port %d",
        count,
        ", ".join(str(pid) for pid in children),
        config.server.http_port,
        config.server.rtp_port,
    )
    if on_listening is not None:
        on_listening(config)
    return _supervise(children, config.server.shutdown_timeout)


def _supervise(children: dict[int, int], shutdown_timeout: float) -> int:
    state: dict[str, Any] = {"signal": None, "sent": 0.0, "deadline": None}
    failed = False

    def stop(signum: int, _frame: Any = None) -> None:
        if state["signal"] is None:
            state["signal"] = signum
            state["deadline"] = time.monotonic() + shutdown_timeout + 5.0
        _forward(children, signum)
        state["sent"] = time.monotonic()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            now = time.monotonic()
            if state["signal"] is not None:
                if state["deadline"] is not None and now > state["deadline"]:
                    log.error("workers %s did not stop in time: killing them", list(children))
                    _forward(children, signal.SIGKILL)
                    failed = True
                    state["deadline"] = None
                elif now - state["sent"] >= RESEND_INTERVAL:
                    stop(state["signal"])
            time.sleep(0.1)
            continue
        index = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            failed = True
            log.error("worker %d (pid %d) exited with %d", index, pid, code)
            if state["signal"] is None:
                log.error("stopping the other workers")
                stop(signal.SIGTERM)
    return 1 if failed else 0


def _forward(children: dict[int, int], signum: int) -> None:
    for pid in list(children):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
