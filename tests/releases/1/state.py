"""Rows as release 1 (commit f2ff4d2) wrote them, for tests/test_upgrade.py.

Release 1's statements, copied from its load.py: exhibitions upserted over the seed, a source
per S3 object and per Kafka partition (`kafka://topic/partition`, no epoch), a load record per
object, and a Kafka offset per partition with no topic ID (the column did not exist). Events and
rejections are the rows its COPYs wrote. Each later release keeps a module like this one beside
its schema.sql and roles.sql, written from that release's code.
"""
from __future__ import annotations

UPSERT_EXHIBITION = """
INSERT INTO exhibition (exhibition_name, exhibition_description, department_id, floor_id,
                        exhibition_start_date, public_id, site)
SELECT %(name)s, %(description)s, d.department_id, f.floor_id, %(start_date)s, %(public_id)s,
       %(site)s
FROM department d, floor f WHERE d.department_name = %(department)s AND f.floor_name = %(floor)s
ON CONFLICT (public_id) DO UPDATE SET
    exhibition_name = EXCLUDED.exhibition_name,
    exhibition_description = EXCLUDED.exhibition_description,
    department_id = EXCLUDED.department_id,
    floor_id = EXCLUDED.floor_id,
    exhibition_start_date = EXCLUDED.exhibition_start_date"""

UPSERT_SOURCE = """
INSERT INTO event_source (kind, uri) VALUES (%s, %s)
ON CONFLICT (uri) DO UPDATE SET kind = EXCLUDED.kind
RETURNING source_id"""

RECORD_LOAD = """
INSERT INTO s3_object_load (source_id, etag, complete, events_read, events_stored,
                            events_rejected)
VALUES (%s, %s, true, %s, %s, %s)"""

INSERT_RATING = """
INSERT INTO rating_interaction (exhibition_id, rating_id, event_at, source_id, position)
SELECT e.exhibition_id, r.rating_id, %(at)s, %(source)s, %(position)s
FROM exhibition e, rating r WHERE e.site = %(site)s AND r.rating_value = %(value)s"""

INSERT_REQUEST = """
INSERT INTO request_interaction (exhibition_id, request_id, event_at, source_id, position)
SELECT e.exhibition_id, r.request_id, %(at)s, %(source)s, %(position)s
FROM exhibition e, request r WHERE e.site = %(site)s AND r.request_value = %(value)s"""

INSERT_REJECTION = """
INSERT INTO rejected_event (source, locator, payload, reason, detail, source_id, position)
VALUES (%s, %s, %s, %s, %s, %s, %s)"""


def upsert_exhibition(cur, exhibition: dict) -> None:
    """What release 1's batch run did with an exhibition file."""
    cur.execute(UPSERT_EXHIBITION, exhibition)


def _store(cur, source: int, outcomes: list[tuple], rejected_source: str) -> None:
    for position, kind, site, value, at, locator_or_payload in outcomes:
        params = {"at": at, "source": source, "position": position, "site": site, "value": value}
        if kind == "rating":
            cur.execute(INSERT_RATING, params)
        elif kind == "request":
            cur.execute(INSERT_REQUEST, params)
        else:
            locator, payload = locator_or_payload
            cur.execute(INSERT_REJECTION, (rejected_source, locator, payload, kind,
                                           f"rejected by release 1: {kind}", source, position))
        assert cur.rowcount == 1, (kind, position)


def load_s3_object(cur, bucket: str, key: str, etag: str, outcomes: list[tuple]) -> None:
    """One kiosk object loaded by release 1: its rows and its load record, one transaction.
    `outcomes`: (position, kind, site, value, at, (locator, payload)), kind `rating`,
    `request` or a rejection reason."""
    uri = f"s3://{bucket}/{key}"
    cur.execute(UPSERT_SOURCE, ("s3", uri))
    source = cur.fetchone()[0]
    _store(cur, source, outcomes, uri)
    rejected = sum(kind not in ("rating", "request") for _, kind, *_ in outcomes)
    cur.execute(RECORD_LOAD, (source, etag, len(outcomes), len(outcomes) - rejected, rejected))


def consume(cur, topic: str, partition: int, outcomes: list[tuple]) -> None:
    """Messages of one partition stored by release 1's consumer, with its offset row (no topic
    ID: release 1 had none); positions are offsets from 0."""
    cur.execute(UPSERT_SOURCE, ("kafka", f"kafka://{topic}/{partition}"))
    source = cur.fetchone()[0]
    _store(cur, source, outcomes, f"kafka://{topic}")
    cur.execute("INSERT INTO kafka_offset (source_id, topic, partition, next_offset) "
                "VALUES (%s, %s, %s, %s)", (source, topic, partition, len(outcomes)))
