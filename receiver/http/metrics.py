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
    def __init__(self, snapshot: Snapshot, labels: dict[str, str]) -> None:
        self.snapshot = snapshot
        self.names = list(labels)  # on every sample (`worker` under --workers)
        self.values = list(labels.values())

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot()
        names, values = self.names, self.values
        active = GaugeMetricFamily(
            "tap_receiver_active_taps", "Taps being recorded now.", labels=[*names, "transport"]
        )
        for transport, n in sorted(s["active_taps"].items()):
            active.add_metric([*values, transport], n)
        yield active
        for name, label, key, text in (
            ("taps_started", "transport", "taps_started", "Taps started."),
            ("taps_finished", "transport", "taps_finished", "Taps finalized (any outcome)."),
            ("taps_failed", "transport", "taps_failed", "Taps finalized as failed."),
            ("rtp_packets", "outcome", "rtp_packets", "RTP datagrams by outcome."),
            ("websocket_rejected", "reason", "ws_rejected", "WebSocket taps refused."),
            ("webhooks", "result", "webhooks", "Completion webhook deliveries."),
        ):
            family = CounterMetricFamily(f"tap_receiver_{name}", text, labels=[*names, label])
            for value, n in sorted(s[key].items()):
                family.add_metric([*values, value], n)
            yield family
        counters = [
            ("rtp_streams_refused", "New RTP sources refused.", s["rtp_streams_refused"]),
            ("websocket_messages", "WebSocket messages received.", s["ws_messages"]),
            ("bytes_written", "PCM bytes written to WAV files.", s["bytes_written"]),
            ("write_errors", "Disk errors (each fails one tap).", s["write_errors"]),
        ]
        gauges = []
        if "fleet_connected" in s:  # with nats_url (receiver.fleet)
            counters += [
                ("fleet_outages", "Times the fleet's NATS became unreachable.",
                 s["fleet_outages"]),
                ("fleet_answers_missed", "Answers of live peers that did not come in time.",
                 s["fleet_answers_missed"]),
            ]  # fmt: skip
            gauges += [
                ("fleet_connected", "1 while the fleet's NATS is reachable, else 0.",
                 s["fleet_connected"]),
                ("fleet_peers", "Other instances of the fleet heard from.", s["fleet_peers"]),
            ]  # fmt: skip
        live = s["live"]
        gauges.append(("live_subscribers", "Live listeners connected now.", live["subscribers"]))
        counters += [
            ("live_subscriptions", "Live listeners accepted.", live["subscriptions"]),
            ("live_dropped_frames", "Frames of live audio dropped for listeners that fell "
             "behind.", live["dropped_frames"]),
            ("live_gaps", "Gap markers sent to live listeners.", live["gaps"]),
        ]  # fmt: skip
        nats = live.get("nats")
        if nats is not None:  # live_nats
            counters += [
                ("live_nats_messages", "Live audio messages published on NATS (end messages "
                 "too).", nats["messages"]),
                ("live_nats_dropped_frames", "Frames of live audio not published on NATS (it was "
                 "unreachable or behind).", nats["dropped_frames"]),
            ]  # fmt: skip
            gauges.append(("live_nats_taps", "Taps whose audio is published on NATS now.",
                           nats["taps"]))  # fmt: skip
        archive = s.get("archive")
        if archive:
            counters += _archive_counters(archive)
            if archive.get("enabled"):
                gauges += [
                    ("archive_up", "1 while the object store takes uploads, 0 during an outage.",
                     0 if archive.get("state") == "failing" else 1),
                    ("archive_pending", "Finished recordings waiting to be uploaded (in memory; "
                     "more may wait on disk).", archive.get("pending", 0)),
                ]  # fmt: skip
        for name, text, value in counters:
            family = CounterMetricFamily(f"tap_receiver_{name}", text, labels=names)
            family.add_metric(values, value)
            yield family
        for name, text, value in gauges:
            gauge = GaugeMetricFamily(f"tap_receiver_{name}", text, labels=names)
            gauge.add_metric(values, value)
            yield gauge
        for name, label, counts, text in (
            ("live_refused", "reason", live["refused"], "Live listeners refused."),
            ("calls", "outcome", {k: n for k, n in s["calls"].items()
                                  if k not in ("waiting", "building")},
             "Calls (speak + listen legs): built, failed, legs recorded apart by reason "
             "(apart_*)."),
        ):  # fmt: skip
            family = CounterMetricFamily(f"tap_receiver_{name}", text, labels=[*names, label])
            for value, n in sorted(counts.items()):
                family.add_metric([*values, value], n)
            yield family


def _archive_counters(a: dict[str, Any]) -> list[tuple[str, str, int]]:
    """The archiver's last reported counts (receiver.archive), when archiving or retention is on."""
    return [
        (name, text, a.get(key, 0))
        for name, key, text in (
            ("archive_uploads", "uploaded", "Recordings uploaded to the object store."),
            ("archive_uploaded_bytes", "uploaded_bytes", "Bytes sent to the object store."),
            ("archive_resumed_bytes", "resumed_bytes", "Bytes an interrupted upload had stored."),
            ("archive_failures", "failures", "Upload attempts the store failed (retried)."),
            ("archive_outages", "outages", "Times the object store became unusable."),
            (
                "archive_local_errors",
                "local_errors",
                "Recordings that could not be read to upload.",
            ),
            ("archive_local_deleted", "local_deleted", "Local audio deleted after its upload."),
            ("retention_deleted", "retention_deleted", "Recordings deleted by retention."),
            ("retention_deleted_bytes", "retention_bytes", "Bytes freed by retention."),
        )
    ]


class Metrics:
    """The registry of metrics and the `GET /metrics` route (token-protected like the rest)."""

    def __init__(
        self, snapshot: Snapshot, auth: Auth, labels: dict[str, str] | None = None
    ) -> None:
        self.auth = auth
        labels = labels or {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_SnapshotCollector(snapshot, labels))
        self.write_batch_seconds = _labelled(
            Histogram(
                "tap_receiver_write_batch_seconds",
                "Time to render and write one batch of audio (a slice of the taps, every ~0.1 s).",
                labels,
                buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
                registry=self.registry,
            ),
            labels,
        )
        self.loop_lag_seconds = _labelled(
            Histogram(
                "tap_receiver_event_loop_lag_seconds",
                "How late the event loop ran a timer (sampled every 0.25 s).",
                labels,
                buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
                registry=self.registry,
            ),
            labels,
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


def _labelled(histogram: Histogram, labels: dict[str, str]) -> Histogram:
    """The histogram's child with these label values (itself when there are none)."""
    return histogram.labels(**labels) if labels else histogram
