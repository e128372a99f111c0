"""Small assertions helpers shared by the tests (fixtures live in conftest.py)."""
from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

from confluent_kafka import Producer
from psycopg2 import sql
from psycopg2.extensions import encrypt_password

import load
import transform


def scalar(conn, query: str, params=None):
    """One value from a query; the read transaction is ended so later writes are seen."""
    with conn.cursor() as cur:
        cur.execute(query, params)
        value = cur.fetchone()[0]
    conn.rollback()
    return value


def rows(conn, query: str, params=None) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(query, params)
        out = cur.fetchall()
    conn.rollback()
    return out


def table_counts(conn) -> dict[str, int]:
    """Rows in each event table: what a run stored and rejected."""
    return {t: scalar(conn, f"SELECT count(*) FROM {t}")  # noqa: S608 - fixed table names
            for t in ("rating_interaction", "request_interaction", "rejected_event")}


def reason_counts(conn) -> dict[str, int]:
    return dict(rows(conn, "SELECT reason, count(*) FROM rejected_event GROUP BY reason"))


def run_consumer_in_process(*argv: str) -> int:
    """consumer.main(argv) in this process, leaving pytest's signal handlers as they were."""
    import consumer
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return consumer.main(list(argv))
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


IDENTITY_VALUES_SQL = """
SELECT table_name || '.' || column_name,
       pg_sequence_last_value(pg_get_serial_sequence(quote_ident(table_name), column_name))
FROM information_schema.columns
WHERE table_schema = current_schema() AND is_identity = 'YES'"""


def identity_values(conn) -> dict[str, int | None]:
    """Last value drawn from every identity column's sequence (None: never drawn): a run that
    finds nothing new must leave every one where it was (SPEC §3.1)."""
    return dict(rows(conn, IDENTITY_VALUES_SQL))


def produce_to_partition_0(kafka, topic: str, payloads: list[bytes]) -> None:
    """Send payloads to partition 0 and wait until the broker has acknowledged every one."""
    failures: list = []
    producer = Producer(kafka.client_config())
    for payload in payloads:
        producer.produce(topic, payload, partition=0,
                         on_delivery=lambda err, msg: err and failures.append(err))
    assert producer.flush(30) == 0 and not failures, failures


def set_password(db, role: str, password: str) -> None:
    """What psql's \\password does: hash on the client, send only the SCRAM verifier, so the
    password itself is in no statement, log or process list."""
    conn = load.connect(db)
    conn.autocommit = True
    try:
        verifier = encrypt_password(password, role, conn, "scram-sha-256")
        with conn.cursor() as cur:
            cur.execute(sql.SQL("ALTER ROLE {} PASSWORD %s").format(sql.Identifier(role)),
                        (verifier,))
    finally:
        conn.close()


@contextmanager
def text_paths_only() -> Iterator[None]:
    """transform's byte-level readers switched off (their size thresholds out of reach), so
    every CSV line and Kafka payload takes the text path they are checked against. A context
    manager rather than a fixture: hypothesis tests cannot use function-scoped fixtures."""
    saved = transform._KIOSK_MIN_LINES, transform._FEED_MIN_MESSAGES
    transform._KIOSK_MIN_LINES = transform._FEED_MIN_MESSAGES = 10**9
    try:
        yield
    finally:
        transform._KIOSK_MIN_LINES, transform._FEED_MIN_MESSAGES = saved
