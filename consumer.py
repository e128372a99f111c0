"""Live run: consume the kiosk topic into PostgreSQL, exactly once in effect (SPEC §3–§4).

    python3 consumer.py [--topic T] [--group G] [--max-messages N] [-l {console,file}]

The database, not Kafka, is the record of progress: a batch's events, its rejections and the
next offset of each partition commit in ONE transaction, and on assignment the consumer seeks
to the offsets stored there. Inside that transaction the offset rows are locked and messages
below the stored offset are dropped, so a replay (after kill -9, a rebalance, a zombie consumer)
can never store an event twice. Offsets are committed to Kafka too, after the database, only so
that lag monitoring keeps working.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import gc
import itertools
import json
import logging
import operator
import re
import signal
import socket
import ssl
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import psycopg2
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

import alerts
import load
import localstack
import transform
from logsetup import protect_secrets, read_protected_environment, setup_logging
from metrics import Metrics, newest_event_per_site
from settings import SCHEMA_FILE, Settings, SettingsError, first_line, load_settings, redact

log = logging.getLogger("consumer")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
DEFAULT_GROUP = "lmnh-pipeline"
# When a partition's prefetch queue is full (queued.min.messages, 100,000), librdkafka waits this
# long before fetching it again; at its default of 1,000 ms a consumer that stores a batch while
# the queue is full then waits on an empty queue (1.0-1.5 s per million messages, measured).
# Memory stays bounded by the queue's size, as before.
FETCH_QUEUE_BACKOFF_MS = 10
# Errors that waiting cannot fix, whenever they come: the consumer exits non-zero on these.
FORBIDDEN_KAFKA_CODES = {KafkaError.TOPIC_AUTHORIZATION_FAILED,
                         KafkaError.GROUP_AUTHORIZATION_FAILED}
FATAL_KAFKA_CODES = FORBIDDEN_KAFKA_CODES | {KafkaError._INVALID_ARG}
# A refused TLS handshake or login (SPEC §4): before any broker connection completed it is a
# setting (SSL_CA_LOCATION, SECURITY_PROTOCOL, USERNAME/PASSWORD) and the consumer stops; once
# connected it is a broker rolling, a load balancer or a re-opened connection, waited out.
REFUSED_KAFKA_CODES = {KafkaError._SSL, KafkaError._AUTHENTICATION,
                       KafkaError.SASL_AUTHENTICATION_FAILED}
OUTAGE_KAFKA_CODES = REFUSED_KAFKA_CODES | {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
                                            KafkaError._RESOLVE}
# librdkafka's default since KIP-735: managed brokers move group coordinators and roll, and a
# shorter session evicts the member. Tansu's group join takes about half of it, so the local
# stack uses less.
DEFAULT_SESSION_TIMEOUT_MS = 45000
LOCAL_SESSION_TIMEOUT_MS = 6000
# A first broker connection stuck this long in a TLS or SASL handshake means the broker does
# not speak SECURITY_PROTOCOL (SASL_SSL against a plaintext listener hangs in SSL_HANDSHAKE;
# librdkafka itself only gives up on the connection after 30 s, then says "brokers are down").
PROTOCOL_CHECK_SECONDS = 20.0
# How long leaving the group may take at the end. With the brokers unreachable librdkafka's
# close waits for a request in flight (an offset commit) up to socket.timeout.ms, 60 s; the
# offsets that count are in the database, so the goodbye to the group is only a courtesy.
CLOSE_WAIT_SECONDS = 5.0
HANDSHAKE_STATES = frozenset({"SSL_HANDSHAKE", "AUTH_LEGACY", "AUTH_HANDSHAKE", "AUTH_REQ"})
# librdkafka's log line for a connection dropped before it was up (a plaintext client at a
# TLS listener is dropped in APIVERSION_QUERY); only the log says where, not the error callback.
HANDSHAKE_FAILURE = re.compile(r"in state (SSL_HANDSHAKE|AUTH_\w+|APIVERSION_QUERY)\)")
# With metrics on, an idle consumer asks the database this often whether it is there, so that
# lmnh_database_up goes to 0 within seconds even when no event arrives to be stored.
DATABASE_PROBE_SECONDS = 2.0


class OneLinePerOutage(logging.Filter):
    """librdkafka repeats a FAIL line every retry while a broker is down; the error callback
    already says so once per change of state (SPEC §4), so the repeats are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("FAIL ")


class FatalError(RuntimeError):
    """Something no amount of waiting fixes (bad credentials, forbidden topic)."""


class OffsetGap(Exception):
    """A batch began above the database's next offset: read those partitions again first."""

    def __init__(self, gaps: dict[int, int], rewind_to: dict[int, int]):
        super().__init__(", ".join(f"partition {p} expected offset {o}" for p, o in gaps.items()))
        self.gaps = gaps
        self.rewind_to = rewind_to


class StaleAhead(Exception):
    """The master data or sources changed since the batch was validated ahead: it must be
    validated again, which only the loop's thread does (the validation caches are its own)."""


class BatchAbandoned(Exception):
    """Asked to stop while the database is away: the batch in hand is left for the next run."""


@dataclass
class BatchResult:
    messages: int = 0
    duplicates: int = 0
    ratings: int = 0
    requests: int = 0
    rejected: Counter = field(default_factory=Counter)
    next_offsets: dict[int, int] = field(default_factory=dict)
    new_logs: list[load.NewLog] = field(default_factory=list)
    emergencies: list[dict] = field(default_factory=list)  # fresh ones (alerts.emergencies_of)
    old_emergencies: int = 0          # too old to alert: a backlog being caught up
    alerts_queued: int = 0            # rows this batch added to alert_outbox
    last_event_at: dict[int, float] = field(default_factory=dict)  # site -> newest event (Unix s)
    # what the batch's transaction read: the next batch is prepared against it
    master: transform.MasterData | None = None  # None only in the running totals
    source_of: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0              # storing it, as the batch-duration metric counts it


@dataclass(frozen=True)
class KnownLog:
    """What the consumer knows of the topic's log besides the batch in hand."""

    topic_id: str | None = None  # read at assignment (describe-topics); None: not known
    # (partition, offset) gaps re-read once and confirmed gone from the broker (retention)
    accepted_gaps: frozenset[tuple[int, int]] = frozenset()


@dataclass
class Batch:
    """A batch as read from the topic, as columns, and the judging it gets.

    prepare_batch can parse and validate it and build its COPY data before its transaction,
    against the master data and sources the previous batch's transaction read, so that this
    work overlaps the server storing that batch. store_batch_as uses that only where its own
    transaction reads the same master data and sources and finds every message new;
    otherwise it validates inside the transaction, as it always did.
    """

    messages: list
    rules: transform.Rules
    now: datetime | None = None
    alerting: alerts.Alerting = alerts.NO_ALERTS
    partitions: np.ndarray = field(init=False)
    positions: np.ndarray = field(init=False)
    ahead: Validated | None = None  # prepare_batch's work

    def __post_init__(self) -> None:
        self.partitions, self.positions = _numbered(self.messages)


@dataclass
class Validated:
    """A batch's outcome and what follows from it, and against which master data and sources
    it was validated (ahead by prepare_batch, or inside the transaction)."""

    master: transform.MasterData
    source_of: dict[int, int]
    outcome: transform.Outcome
    copies: list[load.PreparedCopy]      # built ahead; [] when copied in the transaction
    calls: alerts.Emergencies
    last_event_at: dict[int, float]


def prepare_batch(topic: str, batch: Batch, master: transform.MasterData,
                  source_of: dict[int, int]) -> None:
    """Everything of storing a batch that needs no database, done ahead (batch.ahead); not
    done when a partition of the batch has no known source yet."""
    if not set(np.unique(batch.partitions).tolist()) <= source_of.keys():
        return
    outcome = _outcome(batch, np.arange(len(batch.messages)), master)
    batch.ahead = Validated(master, dict(source_of), outcome,
                            load.prepare_outcome(outcome, f"kafka://{topic}", source_of),
                            _emergencies(batch, outcome, master),
                            newest_event_per_site(outcome, master))


def _outcome(batch: Batch, rows: np.ndarray, master: transform.MasterData
             ) -> transform.Outcome:
    """The rules applied to the batch's messages at `rows` (all of them, or the new ones)."""
    messages = batch.messages if len(rows) == len(batch.messages) else [
        batch.messages[i] for i in rows.tolist()]
    parsed = transform.parse_messages([m.value() for m in messages], batch.partitions[rows],
                                      batch.positions[rows])
    return transform.validate_parsed(parsed, master, batch.rules, batch.now)


def _emergencies(batch: Batch, outcome: transform.Outcome,
                 master: transform.MasterData) -> alerts.Emergencies:
    return alerts.emergencies_of(outcome.requests, master.exhibition_names, batch.rules.zone,
                                 batch.now or datetime.now(UTC), batch.alerting.max_age)


def store_batch(conn, topic: str, messages: list, rules: transform.Rules,
                now: datetime | None = None, known: KnownLog = KnownLog(),
                alerting: alerts.Alerting = alerts.NO_ALERTS) -> BatchResult:
    """Validate a batch and commit its rows, rejections and offsets in one transaction
    (store_batch_as)."""
    return store_batch_as(conn, topic, Batch(messages, rules, now, alerting), known)


def store_batch_as(conn, topic: str, batch: Batch, known: KnownLog = KnownLog(),
                   ahead_only: bool = False) -> BatchResult:
    """Commit a batch's rows, rejections and offsets in one transaction.

    The partitions' offset rows are locked first; a message below the stored offset is already
    in the database (a replay) and is dropped, so nothing is ever stored twice. A batch that
    starts above the stored offset would skip messages: it raises OffsetGap instead (nothing
    written), unless that gap was already re-read once and confirmed (`known.accepted_gaps`:
    the broker no longer holds those offsets, e.g. after retention). `known.topic_id` is the ID
    of the topic the messages were read from: a partition stored under another ID is a new log,
    and the batch starts its new source (assignment does this first, unless the database was
    away then).
    Fresh emergency calls are queued in the alert outbox in the same transaction when
    `batch.alerting.outbox` is set (SPEC §4.1). `ahead_only`: raise StaleAhead (nothing
    written) rather than validate here when the work done ahead does not match.
    """
    result = BatchResult(messages=len(batch.messages))
    with load.transaction(conn) as cur:
        offsets, result.new_logs = load.claim_partitions(
            cur, topic, np.unique(batch.partitions).tolist(), known.topic_id)
        master = load.read_master_data(cur)
        source_of = {partition: source for partition, (source, _) in offsets.items()}
        result.master, result.source_of = master, source_of
        fresh = _fresh(batch.partitions, batch.positions, offsets)
        result.duplicates = len(batch.messages) - len(fresh)
        if not len(fresh):
            return result
        spans = _spans(batch.partitions[fresh], batch.positions[fresh])  # p -> (first, last)
        gaps = {p: offsets[p][1] for p, (o, _) in spans.items()
                if o > offsets[p][1] and (p, offsets[p][1]) not in known.accepted_gaps}
        if gaps:
            raise OffsetGap(gaps, {p: min(o, offsets[p][1]) for p, (o, _) in spans.items()})
        ahead = batch.ahead
        if (ahead is not None and not result.duplicates and ahead.master == master
                and all(ahead.source_of[p] == source_of[p] for p in spans)):
            load.run_copies(cur, ahead.copies)
        elif ahead_only:
            raise StaleAhead()
        else:
            ahead = _store_validated(cur, topic, batch, fresh, master, source_of)
        result.last_event_at = ahead.last_event_at
        result.ratings, result.requests = len(ahead.outcome.ratings), len(ahead.outcome.requests)
        result.rejected.update(ahead.outcome.reason_counts())
        # a partition's messages arrive in offset order: its last is its highest
        result.next_offsets = {p: last + 1 for p, (_, last) in spans.items()}
        for partition, next_offset in result.next_offsets.items():
            load.advance_offset(cur, source_of[partition], next_offset)
        result.emergencies, result.old_emergencies = ahead.calls.fresh, ahead.calls.old
        if batch.alerting.outbox:
            result.alerts_queued = alerts.write_alerts(cur, ahead.calls.fresh, source_of)
    return result


def _store_validated(cur, topic: str, batch: Batch, fresh: np.ndarray,
                     master: transform.MasterData, source_of: dict[int, int]) -> Validated:
    """Validate the batch's new messages inside the transaction and COPY them: the server
    stores the ratings while this thread builds the other COPYs' data and reads the batch's
    emergencies and newest events; the cursor is the copier's alone until finish()."""
    outcome = _outcome(batch, fresh, master)
    copier = load.BackgroundCopy()
    try:
        for copy in load.prepared_outcome(outcome, f"kafka://{topic}", source_of):
            copier.submit(functools.partial(copy.run, cur))
        calls = _emergencies(batch, outcome, master)
        last_event_at = newest_event_per_site(outcome, master)
    finally:
        copier.finish()
    return Validated(master, source_of, outcome, [], calls, last_event_at)


@dataclass
class InFlight:
    future: concurrent.futures.Future | None  # None: stored when settled, by the loop
    batch: Batch


def _numbered(messages: list) -> tuple[np.ndarray, np.ndarray]:
    """Every message's partition and offset as arrays: a batch is handled as columns from
    here on, with no more Python code run per message."""
    return (np.array([m.partition() for m in messages], dtype=np.int64),
            np.array([m.offset() for m in messages], dtype=np.int64))


def _fresh(partitions: np.ndarray, positions: np.ndarray,
           offsets: dict[int, tuple[int, int]]) -> np.ndarray:
    """Indexes of the messages at or above their partition's stored next offset."""
    keys, which = np.unique(partitions, return_inverse=True)
    stored = np.array([offsets[p][1] for p in keys.tolist()], dtype=np.int64)
    return np.flatnonzero(positions >= stored[which])


def _spans(partitions: np.ndarray, positions: np.ndarray) -> dict[int, tuple[int, int]]:
    """partition -> (offset of its first message, of its last) in the batch, partitions in
    the order they first appear."""
    keys, first = np.unique(partitions, return_index=True)
    last = len(partitions) - 1 - np.unique(partitions[::-1], return_index=True)[1]
    order = np.argsort(first, kind="stable")
    return {int(keys[k]): (int(positions[first[k]]), int(positions[last[k]])) for k in order}


def certificate_problem(bootstrap_servers: str, ca_location: str | None,
                        timeout: float = 5.0) -> str | None:
    """Why the first bootstrap broker's TLS certificate does not verify, in OpenSSL's words
    ("Hostname mismatch, …", "unable to get local issuer certificate"), checked as librdkafka
    checks it (its CA, or the system's store; the host name as given); None when it verifies
    or the broker cannot be reached."""
    host, _, port = bootstrap_servers.split(",")[0].strip().rpartition(":")
    host = host.strip("[]")
    try:
        if ca_location and Path(ca_location).is_dir():
            context = ssl.create_default_context(capath=ca_location)
        else:
            context = ssl.create_default_context(cafile=ca_location or None)
        with socket.create_connection((host, int(port)), timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host):
            return None
    except ssl.SSLCertVerificationError as exc:
        return exc.verify_message
    except (OSError, ValueError):
        return None


def _librdkafka_logger() -> logging.Logger:
    logger = logging.getLogger("librdkafka")
    if not any(isinstance(f, OneLinePerOutage) for f in logger.filters):
        logger.addFilter(OneLinePerOutage())
    return logger


class LibrdkafkaLog:
    """librdkafka's log, passed on to the "librdkafka" logger; a connection that failed in a
    handshake is also reported to `on_failure` (the protocol check in KioskConsumer)."""

    def __init__(self, on_failure):
        self.on_failure = on_failure
        self.logger = _librdkafka_logger()

    def log(self, level: int, msg: str, *args) -> None:
        failure = HANDSHAKE_FAILURE.search(msg % args if args else msg)
        if failure:
            self.on_failure(f"dropped in {failure.group(1)}")
        self.logger.log(level, msg, *args)


@dataclass(frozen=True)
class ConsumerOptions:
    """The operator's choices for one consumer process, fixed when it starts."""

    topic: str
    group: str = DEFAULT_GROUP
    max_messages: int | None = None   # stop cleanly after this many messages
    batch_size: int = 20000           # most messages per batch / transaction
    session_timeout_ms: int = DEFAULT_SESSION_TIMEOUT_MS
    stop_at_end: bool = False         # stop once every assigned partition is consumed
    outage_limit_seconds: float = 600.0  # broker unreachable this long: stop (exit 1)


def close_consumer(consumer: Consumer, wait: float = CLOSE_WAIT_SECONDS) -> None:
    """Leave the group, waiting at most `wait` seconds: a stop (SIGTERM, or an outage past
    its bound) is not held up by a broker that cannot answer."""
    closer = threading.Thread(target=consumer.close, name="kafka-close", daemon=True)
    closer.start()
    closer.join(wait)
    if closer.is_alive():
        log.warning("left the Kafka group without waiting for the broker's answer (none in "
                    "%.0f s); the group notices when the session times out", wait)


class KioskConsumer:
    """The consumer loop: batch, store, commit; ride out outages; stop cleanly on a signal."""

    def __init__(self, settings: Settings, options: ConsumerOptions, metrics: Metrics,
                 rules: transform.Rules):
        self.settings = settings
        self.topic = options.topic
        self.group = options.group
        self.max_messages = options.max_messages
        self.batch_size = options.batch_size
        self.stop_at_end = options.stop_at_end
        self.metrics = metrics
        self.rules = rules
        self.stopping = False
        self.db = load.LazyConnection(settings.database)
        self.db_down_since: float | None = None
        self.broker_down_since: float | None = None  # when the current broker outage began
        self.broker_trouble = ""  # what the current outage's first error said
        self.outage_limit = options.outage_limit_seconds
        self.broker_connected = False  # a broker connection ever completed its handshake
        self.stuck_in: str | None = None  # where a first connection was seen stuck
        self.started = time.monotonic()
        self.fatal: str | None = None
        self.assigned: set[int] = set()
        self.accepted_gaps: set[tuple[int, int]] = set()
        self.at_end: set[int] = set()
        self.totals = BatchResult()
        self.alerting, self.sender = alerting_of(settings, metrics)
        self.stored_next: dict[int, int] = {}  # partition -> next offset stored, for the lag
        self.lag_updated = 0.0
        self.probed = time.monotonic()
        session_timeout_ms = options.session_timeout_ms
        config = {**settings.kafka.client_config(), "group.id": options.group,
                  "enable.auto.commit": False, "enable.auto.offset.store": False,
                  "auto.offset.reset": "earliest", "enable.partition.eof": True,
                  "session.timeout.ms": session_timeout_ms,
                  "heartbeat.interval.ms": max(session_timeout_ms // 3, 500),
                  "error_cb": self._on_error, "logger": LibrdkafkaLog(self._on_handshake_failure),
                  "statistics.interval.ms": 1000, "stats_cb": self._on_stats,
                  "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS}
        self.consumer = Consumer(config)
        self.admin: AdminClient | None = None  # topic IDs, read at assignment
        self.topic_id: str | None = None
        # One batch at a time is stored by this thread while the loop reads and validates the
        # next; the database connection is the batch in flight's alone until it is settled.
        self.storer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store")
        self.in_flight: InFlight | None = None
        self.last_read: BatchResult | None = None  # master data and sources the next uses

    # ---- signals and callbacks
    def request_stop(self, signum=None, frame=None) -> None:
        if not self.stopping:
            log.info("stop requested: finishing the batch in flight")
        self.stopping = True

    def _on_error(self, error: KafkaError) -> None:
        code = error.code()
        if code in FORBIDDEN_KAFKA_CODES:
            self._stop_for(self._forbidden(error))
        elif code in FATAL_KAFKA_CODES or error.fatal():
            self._stop_for(f"Kafka refused us: {error.str()}")
        elif code in REFUSED_KAFKA_CODES and not self.broker_connected:
            if self.fatal is None:  # the first says why (its TLS check makes a connection)
                self._stop_for(self._refusal(error))
        elif code in OUTAGE_KAFKA_CODES:
            self._broker_lost(error.str())
        else:
            log.warning("Kafka: %s", error.str())

    def _stop_for(self, why: str) -> None:
        if self.fatal is None:
            self.fatal = why
        self.stopping = True

    def _refusal(self, error: KafkaError) -> str:
        """A handshake refused before any connection completed, as one line naming the
        settings that decide it (the password is never part of librdkafka's message)."""
        kafka = self.settings.kafka
        if error.code() == KafkaError._SSL:
            return self._tls_refusal(error)
        return (f"the Kafka broker at {kafka.bootstrap_servers} rejected the credentials: "
                f"{error.str()}; check USERNAME={kafka.username}, PASSWORD and "
                f"SASL_MECHANISM={kafka.sasl_mechanism}")

    def _tls_refusal(self, error: KafkaError) -> str:
        """librdkafka says "verify that ssl.ca.location is correctly configured" whatever
        failed; one handshake of Python's own says whether it was the CA or the host name."""
        kafka = self.settings.kafka
        head = (f"TLS with the Kafka broker at {kafka.bootstrap_servers} failed before any "
                "connection completed: ")
        why = certificate_problem(kafka.bootstrap_servers, kafka.ca_location)
        if why is not None and "mismatch" in why:
            return (head + f"its certificate, from a trusted CA, is not for the host named in "
                    f"BOOTSTRAP_SERVERS ({why}); name the broker there as its certificate does")
        return (head + f"{error.str()}; check SSL_CA_LOCATION "
                f"({kafka.ca_location or 'unset: the system CA store'}) and "
                f"SECURITY_PROTOCOL={kafka.security_protocol}")

    def _forbidden(self, error: KafkaError) -> str:
        """An ACL refusal as one line naming the principal and what it needs: on a managed
        Kafka the login succeeds and the topic or group is then refused (an API key or SCRAM
        user without the grants)."""
        user = self.settings.kafka.username
        who = f"USERNAME={user}" if user else "this client (no SASL user)"
        if error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
            what, grant = f"topic {self.topic}", "READ on the topic"
        else:
            what, grant = f"consumer group {self.group}", "READ on the group"
        return (f"the Kafka broker does not allow {who} to use {what}: {error.str()}; "
                f"grant it {grant}")

    def _broker_lost(self, why: str) -> None:
        """One WARNING per outage; the loop stops the consumer if it outlasts the bound."""
        if self.broker_down_since is None:
            log.warning("Kafka broker unreachable (%s); waiting for it to come back "
                        "(for at most %.0f s)", why, self.outage_limit)
            self.broker_down_since = time.monotonic()
            self.broker_trouble = why

    def _broker_back(self) -> None:
        if self.broker_down_since is not None:
            log.info("Kafka broker reachable again after %.0f s",
                     time.monotonic() - self.broker_down_since)
            self.broker_down_since = None

    def _check_outage(self) -> None:
        """Stop, in one line, when the broker has been unreachable past the bound."""
        if self.broker_down_since is not None and \
                time.monotonic() - self.broker_down_since > self.outage_limit:
            self._stop_for(f"the Kafka broker at {self.settings.kafka.bootstrap_servers} has "
                           f"been unreachable for more than {self.outage_limit:.0f} s "
                           f"(KAFKA_OUTAGE_LIMIT_SECONDS); first error: {self.broker_trouble}")

    def _on_handshake_failure(self, where: str) -> None:
        if not self.broker_connected:
            self.stuck_in = where

    def _on_stats(self, stats: str) -> None:
        """Until a broker connection completes, note where the connections are stuck; after,
        whether any is up: the outage begins and ends with that, whatever error was said."""
        brokers = json.loads(stats).get("brokers", {}).values()
        states = {b.get("state") for b in brokers}
        if not self.broker_connected and any(
                b.get("state") == "UP" and b.get("rx", 0) > b.get("connects", 0)
                for b in brokers):
            # more answers than connections, i.e. more than ApiVersions: a client with SSL
            # where the listener wants SASL_SSL is UP for a moment, then dropped at its first
            # real request, again and again
            self.broker_connected = True
        if self.broker_connected and "UP" in states:
            self._broker_back()
        elif self.broker_connected:
            self._broker_lost("no broker connection is up: " + "/".join(sorted(states)))
        elif states & HANDSHAKE_STATES:
            self.stuck_in = "stuck in " + "/".join(sorted(states & HANDSHAKE_STATES))

    def _check_protocol(self) -> None:
        """Stop, in one line, when no broker connection got through its handshake in time.

        The broker does not speak the configured protocol, and no waiting fixes that; a broker
        that refuses or does not answer connections is an outage instead, waited out.
        """
        if self.broker_connected or self.stuck_in is None \
                or time.monotonic() - self.started < PROTOCOL_CHECK_SECONDS:
            return
        kafka = self.settings.kafka
        self.fatal = (f"the Kafka broker at {kafka.bootstrap_servers} does not speak "
                      f"SECURITY_PROTOCOL={kafka.security_protocol}: no connection completed its "
                      f"handshake in {PROTOCOL_CHECK_SECONDS:.0f} s ({self.stuck_in}); check "
                      "SECURITY_PROTOCOL and the port")
        self.stopping = True

    def _on_assign(self, consumer, partitions: list[TopicPartition]) -> None:
        self._quiesce()  # the connection is the batch in flight's until then
        wanted = [p.partition for p in partitions]
        try:
            stored = self._claim(consumer, wanted)
        except (psycopg2.Error, load.DatabaseError) as exc:
            # Kafka's committed offsets trail the database's, and store_batch drops anything
            # already stored, so starting from them is safe, only slower.
            log.warning("database unavailable at assignment (%s); starting from Kafka's "
                        "committed offsets", first_line(exc))
            self.db.drop()
            stored = None
        for p in partitions:
            if stored is not None:
                p.offset = stored.get(p.partition) or OFFSET_BEGINNING
        consumer.assign(partitions)
        self.broker_connected = True  # joined a group: later refusals are an outage
        self.assigned |= set(wanted)
        self.at_end -= set(wanted)
        log.info("assigned %s partitions %s, starting at %s", self.topic, sorted(wanted),
                 {p.partition: ("earliest" if p.offset == OFFSET_BEGINNING else p.offset)
                  for p in partitions} if stored is not None else "committed offsets")

    def _claim(self, consumer, partitions: list[int]) -> dict[int, int]:
        """The database's next offset per partition, for the log the broker holds now: a
        partition of a recreated topic starts a new source from its beginning (SPEC §3.1)."""
        self.topic_id, no_ids = self._topic_id()
        ends = self._log_ends(consumer, partitions) if no_ids else None
        with load.transaction(self.db.get()) as cur:
            offsets, new_logs = load.assigned_offsets(cur, self.topic, partitions,
                                                      self.topic_id, ends)
        self._warn_new_logs(new_logs)
        return offsets

    def _warn_new_logs(self, new_logs: list[load.NewLog]) -> None:
        for new in new_logs:
            log.warning("%s partition %d was recreated (%s): stored offset %d belongs to the old "
                        "log, whose rows stay as they are; reading the new log from its "
                        "beginning as source %s", self.topic, new.partition, new.why,
                        new.old_offset, new.uri)

    def _topic_id(self) -> tuple[str | None, bool]:
        """(the topic's ID, True when the broker has no IDs). (None, False) when describe-topics
        failed: no log is judged new on a guess."""
        if self.admin is None:
            self.admin = AdminClient({**self.settings.kafka.client_config(),
                                      "logger": _librdkafka_logger()})
        try:
            found = self.admin.describe_topics(TopicCollection([self.topic]))[self.topic]
            uuid = found.result(timeout=10).topic_id
        except (KafkaException, TimeoutError) as exc:
            log.info("could not read the topic ID of %s (%s); keeping the stored offsets",
                     self.topic, first_line(exc))
            return None, False
        if uuid is None or not (uuid.get_most_significant_bits() or
                                uuid.get_least_significant_bits()):  # the zero UUID: no IDs
            return None, True
        return str(uuid), False

    def _log_ends(self, consumer, partitions: list[int]) -> dict[int, int]:
        """Each partition's high watermark; trusted only where the broker has no topic IDs
        (Tansu, which has them, reports it too low: SPEC §5)."""
        ends = {}
        for partition in partitions:
            try:
                ends[partition] = consumer.get_watermark_offsets(
                    TopicPartition(self.topic, partition), timeout=5)[1]
            except KafkaException as exc:
                log.info("no log end for %s partition %d (%s)", self.topic, partition, exc)
        return ends

    def _on_revoke(self, consumer, partitions: list[TopicPartition]) -> None:
        # The batch in flight finishes its transaction first: then the database holds
        # everything this consumer took from these partitions (the loop handles its result).
        self._quiesce()
        gone = {p.partition for p in partitions}
        self.assigned -= gone
        self.at_end -= gone
        log.info("revoked %s partitions %s", self.topic, sorted(gone))

    def _on_lost(self, consumer, partitions: list[TopicPartition]) -> None:
        self._quiesce()
        gone = {p.partition for p in partitions}
        self.assigned -= gone
        self.at_end -= gone
        log.warning("lost %s partitions %s (session expired); the new owner resumes from the "
                    "database's offsets", self.topic, sorted(gone))

    # ---- database
    def _store_once(self, batch: Batch, known: KnownLog, ahead_only: bool = False
                    ) -> BatchResult:
        """One attempt at storing a batch (with `ahead_only`, the store thread's job); its
        failure is judged on the loop's thread by _store_with_retry."""
        started = time.monotonic()
        result = store_batch_as(self.db.get(), self.topic, batch, known, ahead_only)
        result.seconds = time.monotonic() - started
        if result.alerts_queued and self.sender is not None:
            self.sender.wake()  # committed: the sender can see them now
        return result

    def _store_with_retry(self, flight: InFlight) -> BatchResult:
        """The batch in flight's result, retrying it here with backoff while the database is
        away (offsets hold).

        Away includes busy or changing: another session's lock (bounded by load.LOCK_TIMEOUT,
        so a stop request is heard within seconds), a failover to a read-only replica,
        a serialization failure; load.is_transient tells these from what waiting cannot fix.
        """
        delay = 0.5
        attempt: concurrent.futures.Future | None = flight.future
        while True:
            try:
                if attempt is not None:
                    first, attempt = attempt, None  # a retry is made here, not there
                    result = first.result()
                else:
                    result = self._store_once(flight.batch, KnownLog(
                        self.topic_id, frozenset(self.accepted_gaps)))
            except StaleAhead:
                flight.batch.ahead = None  # validated again here, in its transaction
                continue
            except (psycopg2.Error, load.DatabaseError) as exc:
                text = load.describe_error(exc)
                if not load.is_transient(exc):
                    raise FatalError(f"database refused us: {text}") from None
                self.db.drop()
                self._database_down(text)
                if self.fatal:
                    raise FatalError(self.fatal) from None
                if self.stopping:
                    # Nothing of this batch is stored and no offset moved: the next run
                    # consumes it again, so stopping now loses nothing.
                    raise BatchAbandoned(len(flight.batch.messages)) from None
                self._wait(delay)
                delay = min(delay * 2, 10.0)
                continue
            self._database_back()
            return result

    def _database_down(self, why: str) -> None:
        """One WARNING per outage, and lmnh_database_up 0 (the rules page on it)."""
        self.metrics.database_up(False)
        if self.db_down_since is None:
            self.db_down_since = time.monotonic()
            log.warning("database unavailable (%s); holding the batch and retrying with "
                        "backoff", why)

    def _database_back(self) -> None:
        self.metrics.database_up(True)
        if self.db_down_since is not None:
            log.info("database is back after %.1f s; carrying on",
                     time.monotonic() - self.db_down_since)
            self.db_down_since = None

    def _probe_database(self) -> None:
        """While idle with metrics on, a `SELECT 1` every DATABASE_PROBE_SECONDS: an outage
        shows in lmnh_database_up before any event needs storing."""
        if not self.metrics.enabled or time.monotonic() - self.probed < DATABASE_PROBE_SECONDS:
            return
        try:
            with load.transaction(self.db.get()) as cur:
                cur.execute("SELECT 1")
        except (psycopg2.Error, load.DatabaseError) as exc:
            self.db.drop()
            self._database_down(load.describe_error(exc))
        else:
            self._database_back()
        self.probed = time.monotonic()

    def _wait(self, seconds: float) -> None:
        """Sleep while keeping group membership alive (paused partitions deliver nothing)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.stopping:
            assignment = self.consumer.assignment()
            if assignment:
                # every time: a rebalance inside poll() assigns partitions unpaused
                self.consumer.pause(assignment)
            message = self.consumer.poll(0.1)
            if message is not None and message.error() is None:
                # fetched before the pause took hold: rewind, or it is skipped for good
                self.consumer.seek(TopicPartition(message.topic(), message.partition(),
                                                  message.offset()))
            # paused, no fetch brings a new log end: ask the broker (SPEC §4.1: the lag stays
            # current while the database is away)
            self._update_lag(after_batch=False, ask_broker=True)
        assignment = self.consumer.assignment()
        if assignment:
            self.consumer.resume(assignment)

    # ---- the loop
    def run(self) -> int:
        if self.sender is not None:
            self.sender.start()  # first sends whatever a crash left pending
        self.consumer.subscribe([self.topic], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_lost)
        last_report = time.monotonic()
        reported = 0
        try:
            while not self.stopping:
                want = self.batch_size
                if self.max_messages is not None:
                    want = min(want, self.max_messages - self.totals.messages
                               - (len(self.in_flight.batch.messages) if self.in_flight else 0))
                    if want <= 0:
                        break
                batch = self.consumer.consume(num_messages=want, timeout=0.5)
                messages = self._usable(batch)
                self._check_protocol()
                self._check_outage()
                if messages:
                    self.broker_connected = True
                    self._broker_back()
                if not self._advance(messages):
                    break
                if self.stop_at_end and self.assigned and self.at_end >= self.assigned:
                    # settled first: a batch refused for a gap reopens its partition's end
                    if not self._advance([]):
                        break
                    if self.at_end >= self.assigned:
                        log.info("all assigned partitions are at their end; stopping")
                        break
                self._update_lag(after_batch=bool(messages))
                if not messages:
                    self._probe_database()
                if time.monotonic() - last_report >= 30:
                    done = self.totals.messages - reported
                    log.info("throughput: %d messages in %.0f s (%.0f msg/s)", done,
                             time.monotonic() - last_report,
                             done / (time.monotonic() - last_report))
                    last_report, reported = time.monotonic(), self.totals.messages
            self._advance([])  # the last batch's result (after a stop, a limit or the end)
            self._update_lag(after_batch=True)
        finally:
            self._quiesce()  # never close the connection under a running transaction
            self.storer.shutdown()
            close_consumer(self.consumer)
            self.db.drop()
            if self.sender is not None:
                self.sender.stop(grace=self.settings.alert_timeout_seconds + 1)
        if self.fatal:
            raise FatalError(self.fatal)
        return EXIT_OK

    def _rewind(self, gap: OffsetGap, unstored: Batch | None) -> None:
        """Re-read from the database's offsets; a gap seen twice is gone from the broker.
        `unstored`, the batch read after the refused one, is dropped and read again too."""
        log.warning("batch skipped ahead of the stored offsets (%s): reading those partitions "
                    "again from there", gap)
        self.accepted_gaps.update(gap.gaps.items())
        rewind_to = dict(gap.rewind_to)
        if unstored is not None:
            for partition, (first, _) in _spans(unstored.partitions, unstored.positions).items():
                rewind_to[partition] = min(first, rewind_to.get(partition, first))
        for partition, offset in rewind_to.items():
            # An end seen with the refused batch is behind us again: --stop-at-end waits for
            # the next one, after the rewound range has been read.
            self.at_end.discard(partition)
            try:
                self.consumer.seek(TopicPartition(self.topic, partition, offset))
            except KafkaException as exc:  # revoked meanwhile: its new owner reads the database
                log.info("partition %d not rewound: %s", partition, exc)

    def _usable(self, batch: list) -> list:
        if all(map(operator.is_, [m.error() for m in batch], itertools.repeat(None))):
            # the usual batch, no error or end in it: one pass, not a branch per message
            self.at_end.difference_update({m.partition() for m in batch})
            return batch
        messages = []
        for message in batch:
            error = message.error()
            if error is None:
                messages.append(message)
                self.at_end.discard(message.partition())
            elif error.code() == KafkaError._PARTITION_EOF:
                self.at_end.add(message.partition())
            else:  # judged as the error callback's errors are
                self._on_error(error)
        return messages

    # ---- the batch in flight
    def _advance(self, messages: list) -> bool:
        """Settle the batch in flight, then put `messages` (if any) in flight; False: stop.

        `messages` are parsed and validated before the batch in flight is waited for, so the
        server stores one batch while this thread works on the next."""
        batch = Batch(messages, self.rules, alerting=self.alerting) if messages else None
        try:
            if self.in_flight is not None and self.in_flight.future is None:
                self._settle()  # stored on this thread: nothing to overlap, and it tells
                # this batch the master data and sources to be validated against
            if batch is not None and self.last_read is not None:
                prepare_batch(self.topic, batch, self.last_read.master,
                              self.last_read.source_of)
            self._settle()
        except OffsetGap as exc:
            self._rewind(exc, unstored=batch)
            return True
        except BatchAbandoned as exc:
            log.warning("stopping with %d consumed messages not stored (the database is "
                        "unavailable); they will be read again on restart",
                        exc.args[0] + len(messages))
            return False
        if batch is not None:
            # Only a batch validated ahead is stored by the store thread; any other is
            # validated and stored when it is settled, on this thread.
            known = KnownLog(self.topic_id, frozenset(self.accepted_gaps))
            self.in_flight = InFlight(None if batch.ahead is None else self.storer.submit(
                self._store_once, batch, known, True), batch)
        return True

    def _quiesce(self) -> None:
        """Wait until the batch in flight has finished its transaction (not for its result,
        which the loop handles): before the connection is used elsewhere, or partitions go."""
        if self.in_flight is not None and self.in_flight.future is not None:
            concurrent.futures.wait([self.in_flight.future])

    def _settle(self) -> None:
        """The batch in flight's outcome: retried here while the database is away; once
        stored, its offsets are committed to Kafka too and it is counted and logged."""
        if self.in_flight is None:
            return
        flight, self.in_flight = self.in_flight, None
        result = self._store_with_retry(flight)
        self.last_read = result
        if result.next_offsets:
            self.consumer.commit(offsets=[TopicPartition(self.topic, p, o)
                                          for p, o in result.next_offsets.items()],
                                 asynchronous=True)
        self._add(result)
        self.stored_next.update(result.next_offsets)
        self.metrics.observe(result, result.seconds)
        self._warn_new_logs(result.new_logs)
        for call in result.emergencies:
            log.warning("EMERGENCY call at %s (site %d) at %s", call["exhibition"], call["site"],
                        call["at"])
        if result.old_emergencies:
            log.info("%d emergency call(s) older than %d minutes stored without an alert "
                     "(a backlog being caught up)", result.old_emergencies,
                     self.settings.alert_max_age_minutes)
        log.info("batch: %d messages = %d ratings + %d requests + %d rejected%s (%.3f s)%s",
                 result.messages, result.ratings, result.requests,
                 sum(result.rejected.values()),
                 f" + {result.duplicates} already stored" if result.duplicates else "",
                 result.seconds, "" if not result.rejected else " " + ", ".join(
                     f"{k}={v}" for k, v in sorted(result.rejected.items())))

    def _update_lag(self, after_batch: bool, ask_broker: bool = False) -> None:
        """lmnh_partition_lag after each batch, and once a second when idle: the high watermark
        librdkafka cached from the last fetch response (no request to the broker; Tansu's
        answer to a watermark request is too low, SPEC §5) minus the stored next offset.
        `ask_broker` (while the partitions are paused for a database outage, so no fetch
        brings news): the larger of the cached and the broker's answer, exact on Kafka and
        still growing with the log on Tansu."""
        if not self.metrics.enabled or (
                not after_batch and time.monotonic() - self.lag_updated < 1.0):
            return
        self.lag_updated = time.monotonic()
        lag = {}
        for partition in sorted(self.assigned):
            tp = TopicPartition(self.topic, partition)
            try:
                _, high = self.consumer.get_watermark_offsets(tp, cached=True)
                if ask_broker and self.broker_down_since is None:  # else each ask waits 1 s
                    high = max(high, self.consumer.get_watermark_offsets(tp, timeout=1)[1])
                stored = self.stored_next.get(partition)
                if stored is None:
                    stored = self.consumer.position([tp])[0].offset
            except KafkaException:
                continue
            if high >= 0 and stored >= 0:
                lag[partition] = max(0, high - stored)
        self.metrics.observe_lag(lag)

    def _add(self, result: BatchResult) -> None:
        t = self.totals
        t.messages += result.messages
        t.duplicates += result.duplicates
        t.ratings += result.ratings
        t.requests += result.requests
        t.rejected.update(result.rejected)

    def summary_lines(self) -> list[str]:
        t = self.totals
        lines = [f"consumer summary: {t.messages} messages = {t.ratings} ratings + "
                 f"{t.requests} requests + {sum(t.rejected.values())} rejected"
                 + (f" + {t.duplicates} already stored" if t.duplicates else "")]
        for reason, count in sorted(t.rejected.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    rejected {reason:24} {count}")
        return lines


def alerting_of(settings: Settings, metrics: Metrics
                ) -> tuple[alerts.Alerting, alerts.AlertSender | None]:
    """What store_batch does with fresh emergencies, and the sender when a webhook is set."""
    url = settings.alert_webhook_url
    alerting = alerts.Alerting(timedelta(minutes=settings.alert_max_age_minutes),
                               outbox=url is not None)
    if url is None:
        return alerting, None
    timing = alerts.SenderTiming(request_timeout=settings.alert_timeout_seconds,
                                 max_backoff=settings.alert_retry_max_seconds,
                                 first_backoff=min(0.5, settings.alert_retry_max_seconds),
                                 retention_days=settings.alert_retention_days)
    return alerting, alerts.AlertSender(settings.database, webhook_of(settings), timing, metrics)


def webhook_of(settings: Settings) -> alerts.Webhook:
    return alerts.Webhook(settings.alert_webhook_url, settings.alert_webhook_format,
                          transform.Rules().zone, settings.alert_ca_file)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="consumer.py",
        description="Consume live kiosk events from Kafka into PostgreSQL. Every message gets "
                    "an outcome (a row or a rejected_event); stopping at any moment and "
                    "starting again neither loses nor duplicates anything.")
    parser.add_argument("-l", "--log_output", choices=["console", "file"], default="console",
                        help="where log lines go: console (stderr) or file (default: console)")
    parser.add_argument("--log-file", default=None,
                        help="log file path with -l file (default: logs/consumer.log)")
    parser.add_argument("--topic", default=None, help="topic to consume (default: $TOPIC or lmnh)")
    parser.add_argument("--group", default=DEFAULT_GROUP,
                        help=f"consumer group id (default: {DEFAULT_GROUP})")
    parser.add_argument("--max-messages", type=int, default=None, metavar="N",
                        help="stop cleanly after N messages")
    parser.add_argument("--stop-at-end", action="store_true",
                        help="stop cleanly once every assigned partition is fully consumed")
    parser.add_argument("--batch-size", type=int, default=20000,
                        help="most messages per batch / transaction (default: 20000)")
    parser.add_argument("--session-timeout-ms", type=int, default=None,
                        help="Kafka group session timeout (default: $KAFKA_SESSION_TIMEOUT_MS, "
                             f"else {DEFAULT_SESSION_TIMEOUT_MS}, or {LOCAL_SESSION_TIMEOUT_MS} "
                             "on the local stack, where a group join takes about half of it)")
    parser.add_argument("--kafka-outage-limit", type=float, default=None, metavar="SECONDS",
                        help="stop (exit 1) when the broker stays unreachable this long "
                             "(default: $KAFKA_OUTAGE_LIMIT_SECONDS or 600)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics on HOST:PORT (see --metrics-host)")
    parser.add_argument("--metrics-host", default="127.0.0.1",
                        help="address the metrics server listens on (default: 127.0.0.1; "
                             "0.0.0.0 for a Prometheus on another machine)")
    parser.add_argument("--alert-webhook", default=None, metavar="URL",
                        help="POST fresh emergency calls to this webhook (default: "
                             "$ALERT_WEBHOOK_URL; prefer the setting: a URL on the command line "
                             "is visible to every user of the machine)")
    parser.add_argument("--test-alert", action="store_true",
                        help="send one test alert (marked TEST, no emergency) through the "
                             "configured webhook and format, say whether it was accepted, and "
                             "exit (0 accepted, 1 not); needs no database or broker")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (DEBUG)")
    return parser


def session_timeout_of(args: argparse.Namespace, settings: Settings) -> int:
    """--session-timeout-ms, else KAFKA_SESSION_TIMEOUT_MS, else 45 s for a configured broker
    and less for the local stack's (called before the local stack fills in the broker)."""
    for name, value in (("--session-timeout-ms", args.session_timeout_ms),
                        ("--kafka-outage-limit", args.kafka_outage_limit)):
        if value is not None and value <= 0:
            raise SettingsError(f"{name} must be positive, got {value}")
    if args.session_timeout_ms is not None:
        return args.session_timeout_ms
    if settings.kafka_session_timeout_ms is not None:
        return settings.kafka_session_timeout_ms
    return LOCAL_SESSION_TIMEOUT_MS if settings.kafka is None else DEFAULT_SESSION_TIMEOUT_MS


# The outbox as this version uses it: the table, its delivery columns and the prune function.
OUTBOX_EXISTS = """
SELECT to_regclass('alert_outbox') IS NOT NULL
   AND to_regprocedure('prune_sent_alerts(integer)') IS NOT NULL
   AND EXISTS (SELECT FROM information_schema.columns WHERE table_schema = current_schema()
               AND table_name = 'alert_outbox' AND column_name = 'next_attempt_at')
"""


def ensure_outbox(conn, local_db: bool) -> None:
    """Alerts need the alert_outbox table: created in the local database, asked for elsewhere."""
    with load.transaction(conn) as cur:
        cur.execute(OUTBOX_EXISTS)
        present = cur.fetchone()[0]
    if present:
        return
    if not local_db:
        raise FatalError("alerts need the alert_outbox table: apply schema.sql "
                         "again (it only adds what is missing) and then roles.sql")
    log.info("adding the alert outbox to the local database from %s", SCHEMA_FILE.name)
    load.apply_schema(conn, SCHEMA_FILE.read_text())


def run_test_alert(settings: Settings) -> int:
    """--test-alert: what the person on call runs to see the channel work (or why not)."""
    if settings.alert_webhook_url is None:
        raise SettingsError("ALERT_WEBHOOK_URL is not set (--test-alert sends through it)")
    accepted, what = alerts.send_test_alert(webhook_of(settings), settings.alert_timeout_seconds)
    (log.info if accepted else log.error)("%s", what)
    return EXIT_OK if accepted else EXIT_FAILED


LAST_EVENTS = """
SELECT e.site, extract(epoch FROM max(n.at))::float8
FROM (SELECT exhibition_id, max(event_at) AS at FROM rating_interaction GROUP BY 1
      UNION ALL
      SELECT exhibition_id, max(event_at) FROM request_interaction GROUP BY 1) n
JOIN exhibition e USING (exhibition_id)
GROUP BY e.site
"""


def seed_last_events(settings: Settings, metrics: Metrics) -> None:
    """Fill lmnh_site_last_event_timestamp_seconds from the database, in a thread of its own
    (a scan of the event tables must not hold consumption back), so that a kiosk that died
    before this start is flagged as silent too (SPEC §4.1)."""
    if not metrics.enabled:
        return

    def seed() -> None:
        try:
            conn = load.connect(settings.database)
            try:
                with load.transaction(conn) as cur:
                    cur.execute(LAST_EVENTS)
                    newest = {int(site): at for site, at in cur.fetchall()}
            finally:
                conn.close()
        except (psycopg2.Error, load.DatabaseError) as exc:
            log.warning("newest event per site not read at start (%s); the gauge fills as "
                        "events arrive", first_line(exc))
            return
        metrics.seed_last_events(newest)

    threading.Thread(target=seed, name="seed-last-events", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_output, "consumer", args.log_file, args.verbose)
    secrets: list[str] = []
    try:
        if args.max_messages is not None and args.max_messages <= 0:
            raise SettingsError(f"--max-messages must be positive, got {args.max_messages}")
        if args.batch_size <= 0:
            raise SettingsError(f"--batch-size must be positive, got {args.batch_size}")
        env, secrets = read_protected_environment()
        if args.alert_webhook:
            env["ALERT_WEBHOOK_URL"] = args.alert_webhook
            secrets.append(args.alert_webhook)
            protect_secrets([args.alert_webhook])
        settings = load_settings(env)
        if args.test_alert:
            return run_test_alert(settings)
        local_db = settings.database is None
        session_timeout_ms = session_timeout_of(args, settings)
        settings = localstack.resolve(settings, ("postgres", "kafka"))
        conn = load.connect(settings.database)
        try:
            load.ensure_schema(conn, SCHEMA_FILE if local_db else None)
            if settings.alert_webhook_url:
                ensure_outbox(conn, local_db)
        finally:
            conn.close()
        rules = transform.Rules(opening=settings.opening_time, closing=settings.closing_time)
        options = ConsumerOptions(topic=args.topic or settings.topic, group=args.group,
                                  max_messages=args.max_messages, batch_size=args.batch_size,
                                  session_timeout_ms=session_timeout_ms,
                                  stop_at_end=args.stop_at_end,
                                  outage_limit_seconds=args.kafka_outage_limit
                                  or settings.kafka_outage_limit_seconds)
        metrics = Metrics(args.metrics_port, args.metrics_host, rules)
        worker = KioskConsumer(settings, options, metrics, rules)
        seed_last_events(settings, metrics)
        signal.signal(signal.SIGINT, worker.request_stop)
        signal.signal(signal.SIGTERM, worker.request_stop)
        log.info("consuming %s as group %s from %s", worker.topic, args.group,
                 settings.kafka.bootstrap_servers)
        code = worker.run()
        for line in worker.summary_lines():
            log.info(line)
        return code
    except SettingsError as exc:
        log.error("configuration error: %s", redact(str(exc), secrets))
        return EXIT_CONFIG
    except (FatalError, load.DatabaseError, localstack.LocalStackError, KafkaException,
            psycopg2.Error) as exc:
        log.error("consumer stopped: %s", redact(first_line(exc), secrets))
        return EXIT_FAILED


if __name__ == "__main__":
    # Everything imported so far lives until exit: frozen, the collector never walks it again
    # in the full collections of a long run, nor at interpreter shutdown.
    gc.freeze()
    # The store thread gets the GIL back within 1 ms of each libpq call it makes, not 5 ms,
    # while this thread validates the next batch.
    sys.setswitchinterval(0.001)
    sys.exit(main())
