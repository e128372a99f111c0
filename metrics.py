"""Prometheus metrics of the consumer (SPEC §4.1): what the data team watches instead of logs.

Served on `--metrics-host:--metrics-port` when a port is given; without one every call is a
no-op, so the consumer loop never asks whether metrics are on. ops/prometheus/ has the alerting
rules built on them.
"""
from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

import numpy as np

import transform

if TYPE_CHECKING:
    from consumer import BatchResult


def newest_event_per_site(outcome: transform.Outcome, master: transform.MasterData
                          ) -> dict[int, float]:
    """Site -> Unix time of its newest stored event in a batch, for the silent-kiosk gauge.
    In numpy, one mask per exhibition (of which there are few), as it runs on every batch."""
    frames = (outcome.ratings, outcome.requests)
    ids = np.concatenate([f["exhibition_id"].to_numpy() for f in frames])
    if not len(ids):
        return {}
    micros = np.concatenate([f["event_at"].array.as_unit("us").asi8 for f in frames])
    site_of = {exhibition: site for site, exhibition in master.exhibitions.items()}
    return {site_of[int(e)]: int(micros[ids == e].max()) / 1e6 for e in np.unique(ids)
            if int(e) in site_of}


class Metrics:
    """Prometheus metrics when --metrics-port is given; no-ops otherwise (SPEC §4.1).

    Each instance has its own registry, so that tests can run several consumers in one process.
    """

    def __init__(self, port: int | None, host: str = "127.0.0.1",
                 rules: transform.Rules | None = None):
        self.enabled = port is not None
        if not self.enabled:
            return
        from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server
        from prometheus_client import Counter as PCounter
        self.registry = registry = CollectorRegistry()
        self.stored = PCounter("lmnh_events_stored_total", "Events stored", ["kind"],
                               registry=registry)
        self.rejected = PCounter("lmnh_events_rejected_total", "Events rejected", ["reason"],
                                 registry=registry)
        self.latency = Histogram("lmnh_batch_seconds", "Seconds to store one batch",
                                 registry=registry)
        self.offset = Gauge("lmnh_last_offset", "Next offset stored per partition", ["partition"],
                            registry=registry)
        self.lag = Gauge("lmnh_partition_lag", "Log end offset (as of the last fetch) minus the "
                         "stored next offset, per assigned partition", ["partition"],
                         registry=registry)
        self.last_event = Gauge("lmnh_site_last_event_timestamp_seconds",
                                "Unix time of the newest stored event per site", ["site"],
                                registry=registry)
        self.alerts_sent = PCounter("lmnh_alerts_sent", "Emergency alerts delivered (2xx)",
                                    registry=registry)
        self.pending = Gauge("lmnh_alerts_pending", "Emergency alerts stored but not yet "
                             "delivered", registry=registry)
        self.refused = PCounter("lmnh_alerts_refused", "Deliveries the receiver refused (a 4xx "
                                "other than 408/429); the alert is retried later",
                                registry=registry)
        self.database = Gauge("lmnh_database_up", "1 while the consumer reaches PostgreSQL, 0 "
                              "while it waits for it", registry=registry)
        self.database.set(1)
        if rules is not None:
            Gauge("lmnh_museum_open", "1 during the configured opening hours (museum time)",
                  registry=registry).set_function(lambda: float(museum_open(rules)))
        self.lag_partitions: set[int] = set()
        self.newest: dict[int, float] = {}
        self.newest_lock = threading.Lock()  # the loop and the start-up seed both move it
        start_http_server(port, addr=host, registry=registry)

    def observe(self, result: BatchResult, seconds: float) -> None:
        if not self.enabled:
            return
        self.stored.labels("rating").inc(result.ratings)
        self.stored.labels("request").inc(result.requests)
        for reason, count in result.rejected.items():
            self.rejected.labels(reason).inc(count)
        self.latency.observe(seconds)
        for partition, offset in result.next_offsets.items():
            self.offset.labels(str(partition)).set(offset)
        self._newer_events(result.last_event_at)

    def observe_lag(self, lag: dict[int, int]) -> None:
        """Set the lag of the assigned partitions; partitions no longer assigned disappear."""
        if not self.enabled:
            return
        for partition in self.lag_partitions - set(lag):
            self.lag.remove(str(partition))
        for partition, value in lag.items():
            self.lag.labels(str(partition)).set(value)
        self.lag_partitions = set(lag)

    def seed_last_events(self, newest: dict[int, float]) -> None:
        """The newest stored event per site, read from the database at start: a kiosk that
        went silent before a restart is still seen (it never sends again to be counted)."""
        if self.enabled:
            self._newer_events(newest)

    def _newer_events(self, newest: dict[int, float]) -> None:
        with self.newest_lock:
            for site, at in newest.items():
                if at > self.newest.get(site, 0.0):  # a late event does not move it back
                    self.newest[site] = at
                    self.last_event.labels(str(site)).set(at)

    def database_up(self, up: bool) -> None:
        if self.enabled:
            self.database.set(1 if up else 0)

    def alert_refused(self) -> None:
        if self.enabled:
            self.refused.inc()

    def alert_sent(self) -> None:
        if self.enabled:
            self.alerts_sent.inc()

    def alerts_pending(self, count: int) -> None:
        if self.enabled:
            self.pending.set(count)


def museum_open(rules: transform.Rules, now: datetime | None = None) -> bool:
    """Whether it is opening hours in museum time: silent kiosks only matter then."""
    local = (now or datetime.now(UTC)).astimezone(ZoneInfo(rules.zone)).time()
    return rules.opening <= local <= rules.closing
