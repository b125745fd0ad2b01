"""`GET /metrics`: Prometheus text format, through the maintained `prometheus_client` library.

Counters live where the work happens (registry, transports, writer, webhooks) as plain ints;
a collector reads them at scrape time, so the packet path pays nothing for metrics. The two
latencies (disk write batches and event-loop lag) are histograms observed as they happen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from receiver.http.auth import Auth

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Snapshot = Callable[[], dict[str, Any]]


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot()
        active = GaugeMetricFamily(
            "tap_receiver_active_taps", "Taps being recorded now.", labels=["transport"]
        )
        for transport, n in sorted(s["active_taps"].items()):
            active.add_metric([transport], n)
        yield active
        for name, label, key, text in (
            ("taps_started", "transport", "taps_started", "Taps started."),
            ("taps_finished", "transport", "taps_finished", "Taps finalized (any outcome)."),
            ("taps_failed", "transport", "taps_failed", "Taps finalized as failed."),
            ("rtp_packets", "outcome", "rtp_packets", "RTP datagrams by outcome."),
            ("websocket_rejected", "reason", "ws_rejected", "WebSocket taps refused."),
            ("webhooks", "result", "webhooks", "Completion webhook deliveries."),
        ):
            family = CounterMetricFamily(f"tap_receiver_{name}", text, labels=[label])
            for value, n in sorted(s[key].items()):
                family.add_metric([value], n)
            yield family
        for name, key, text in (
            ("rtp_streams_refused", "rtp_streams_refused", "New RTP sources refused."),
            ("websocket_messages", "ws_messages", "WebSocket messages received."),
            ("bytes_written", "bytes_written", "PCM bytes written to WAV files."),
            ("write_errors", "write_errors", "Disk errors (each fails one tap)."),
        ):
            yield CounterMetricFamily(f"tap_receiver_{name}", text, value=s[key])
        live = s["live"]
        yield GaugeMetricFamily(
            "tap_receiver_live_subscribers", "Live listeners connected now.",
            value=live["subscribers"],
        )  # fmt: skip
        for name, key, text in (
            ("live_subscriptions", "subscriptions", "Live listeners accepted."),
            ("live_dropped_frames", "dropped_frames",
             "Frames of live audio dropped for listeners that fell behind."),
            ("live_gaps", "gaps", "Gap markers sent to live listeners."),
        ):  # fmt: skip
            yield CounterMetricFamily(f"tap_receiver_{name}", text, value=live[key])
        refused = CounterMetricFamily(
            "tap_receiver_live_refused", "Live listeners refused.", labels=["reason"]
        )
        for reason, n in sorted(live["refused"].items()):
            refused.add_metric([reason], n)
        yield refused
        calls = CounterMetricFamily(
            "tap_receiver_calls", "Calls (speak + listen legs): built, failed, legs recorded "
            "apart by reason (apart_*).", labels=["outcome"],
        )  # fmt: skip
        for outcome, n in sorted(s["calls"].items()):
            if outcome not in ("waiting", "building"):
                calls.add_metric([outcome], n)
        yield calls
        archive = s.get("archive")
        if archive:
            yield from _archive_metrics(archive)


def _archive_metrics(a: dict[str, Any]) -> Iterator[Metric]:
    """The archiver's last reported status (receiver.archive), when archiving or retention is on."""
    if a.get("enabled"):
        yield GaugeMetricFamily(
            "tap_receiver_archive_up",
            "1 while the object store takes uploads, 0 during an outage.",
            value=0 if a.get("state") == "failing" else 1,
        )
        yield GaugeMetricFamily(
            "tap_receiver_archive_pending",
            "Finished recordings waiting to be uploaded (in memory; more may wait on disk).",
            value=a.get("pending", 0),
        )
    for name, key, text in (
        ("archive_uploads", "uploaded", "Recordings uploaded to the object store."),
        ("archive_uploaded_bytes", "uploaded_bytes", "Bytes sent to the object store."),
        ("archive_resumed_bytes", "resumed_bytes", "Bytes an interrupted upload had stored."),
        ("archive_failures", "failures", "Upload attempts the store failed (retried)."),
        ("archive_outages", "outages", "Times the object store became unusable."),
        ("archive_local_errors", "local_errors", "Recordings that could not be read to upload."),
        ("archive_local_deleted", "local_deleted", "Local audio deleted after its upload."),
        ("retention_deleted", "retention_deleted", "Recordings deleted by retention."),
        ("retention_deleted_bytes", "retention_bytes", "Bytes freed by retention."),
    ):
        yield CounterMetricFamily(f"tap_receiver_{name}", text, value=a.get(key, 0))


class Metrics:
    """The registry of metrics and the `GET /metrics` route (token-protected like the rest)."""

    def __init__(self, snapshot: Snapshot, auth: Auth) -> None:
        self.auth = auth
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_SnapshotCollector(snapshot))
        self.write_batch_seconds = Histogram(
            "tap_receiver_write_batch_seconds",
            "Time to render and write one batch of all taps' audio.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.loop_lag_seconds = Histogram(
            "tap_receiver_event_loop_lag_seconds",
            "How late the event loop ran a timer (sampled every 0.25 s).",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/metrics", self.auth.required(self.handle))
        app.router.add_get("/t/{token}/metrics", self.auth.required(self.handle))

    async def handle(self, request: web.Request) -> web.Response:
        return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE})

    async def watch_loop_lag(self, interval: float = 0.25) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(interval)
            self.loop_lag_seconds.observe(max(0.0, time.perf_counter() - before - interval))
