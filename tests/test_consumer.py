"""consumer.py end to end: a real Kafka broker (Tansu) into a real PostgreSQL, no mocks.

Why: the consumer's promise (SPEC §3-§4) is "exactly once in effect": every message gets exactly
one outcome — a rating, a request or a rejected_event — however the process is stopped (Ctrl-C,
SIGTERM, kill -9, --max-messages), however many processes share the group, and whatever happens
to the database meanwhile. Each test therefore checks the database's exact contents, position by
position, against what the independent reference classifier in sample_data.py says each payload
is, and that the stored Kafka offsets agree with what was stored.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime
from datetime import time as dt_time
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from confluent_kafka import KafkaException, Producer
from psycopg2 import sql

import consumer
import load
import localstack
import sample_data
import transform
from conftest import admin_connection, create_topic
from helpers import identity_values, reason_counts, rows, run_consumer_in_process, scalar, table_counts
from settings import Settings

PROJECT = Path(__file__).resolve().parent.parent
LONDON = ZoneInfo("Europe/London")
Position = tuple[int, int]  # (partition, offset)

# A past museum day in British Summer Time (+01:00), well inside opening hours.
DAY = "2024-10-21"
AT = f"{DAY}T10:00:00.250000+01:00"


# Tests that kill a member wait for its session to expire before the group moves on; a shorter
# session than the default 6 s keeps them quick (a join takes about half of it on Tansu).
FAST_SESSION_MS = "3000"


def message(**fields) -> bytes:
    return json.dumps(fields).encode()


# --------------------------------------------------------------------------- edge cases
# Hand-written payloads with the outcome SPEC §2 gives them: every reason code, the payloads a
# consumer chokes on first (bytes that are not UTF-8, NUL, empty, not an object), text that would
# break naive SQL or CSV, boundaries of the opening hours, and every spelling of "an integer".
EDGE_CASES: list[tuple[bytes, str]] = [
    # rule 0: the payload is UTF-8 JSON
    (b"\xff\xfe" + '{"at": "x"}'.encode("utf-16-le"), "malformed_json"),
    (b'{"at": "' + AT.encode() + b'", "site": "caf\xe9", "val": 3}', "malformed_json"),
    (b"", "malformed_json"),
    (b"   \n", "malformed_json"),
    (b'{"at": "' + AT.encode() + b'", "site": "1", "va', "malformed_json"),
    (b'{"at": "' + AT.encode(), "malformed_json"),
    (b'{"at": "' + AT.encode() + b'", "site": "1", "val": NaN}', "malformed_json"),
    (b'{"at": "' + AT.encode() + b'", "site": "1", "val": Infinity}', "malformed_json"),
    (b"{'at': '" + AT.encode() + b"', 'site': '1', 'val': 1}", "malformed_json"),
    (b'{"at": "a\x00b", "site": "1", "val": 1}', "malformed_json"),  # raw NUL: not JSON
    (b"\x00", "malformed_json"),
    (b"x" * 100_000, "malformed_json"),
    # rule 0b: the JSON is an object
    (b"[1, 2]", "not_an_object"),
    (b"[" + message(at=AT, site="1", val=1) + b"]", "not_an_object"),
    (b'"hello"', "not_an_object"),
    (json.dumps(message(at=AT, site="1", val=1).decode()).encode(), "not_an_object"),
    (b"42", "not_an_object"),
    (b"null", "not_an_object"),
    (b"true", "not_an_object"),
    # SQL- and CSV-hostile text is data, never code
    (message(at=AT, site="1'); DROP TABLE rating_interaction; --", val=3), "unknown_site"),
    (message(at="'; DELETE FROM rejected_event; --", site="1", val=3), "invalid_at"),
    (b'{"at": "' + AT.encode() + b'",\n "site": "2,\\"x\\"\\r\\n", "val": 1}', "unknown_site"),
    (message(at=AT, site="1", val="\\N"), "invalid_val"),
    (message(at="\u0000", site="1", val=1), "invalid_at"),  # an escaped NUL is valid JSON
    # rule 1: missing_at
    (message(site="1", val=3), "missing_at"),
    (message(at=None, site="1", val=3), "missing_at"),
    (message(at="", site="1", val=3), "missing_at"),
    (message(at="   ", site="1", val=3), "missing_at"),
    # rule 2: invalid_at
    (message(at="ERR", site="1", val=3), "invalid_at"),
    (message(at="2024-02-30T10:00:00+00:00", site="1", val=3), "invalid_at"),
    (message(at=f"{DAY}T25:61:00.000000+01:00", site="1", val=3), "invalid_at"),
    (message(at="21/10/2024 10:00:00", site="1", val=3), "invalid_at"),
    (message(at=1729501200, site="1", val=3), "invalid_at"),
    (message(at={"when": AT}, site="1", val=3), "invalid_at"),
    (message(at="2024-03-31 01:30:00", site="1", val=3), "invalid_at"),  # skipped by the clocks
    # rule 3: outside_opening_hours (08:45:00-18:15:00 inclusive, London time)
    (message(at=f"{DAY}T08:44:59.999999+01:00", site="1", val=3), "outside_opening_hours"),
    (message(at=f"{DAY}T18:15:00.000001+01:00", site="1", val=3), "outside_opening_hours"),
    (message(at=f"{DAY}T17:15:00.000001Z", site="1", val=3), "outside_opening_hours"),
    (message(at="2024-12-02T08:44:59Z", site="1", val=3), "outside_opening_hours"),
    (message(at=f"{DAY} 18:15:01", site="1", val=3), "outside_opening_hours"),
    (message(at=f"{DAY}T23:00:00+01:00"), "outside_opening_hours"),  # first failing rule wins
    # rule 4: future_event
    (message(at="2099-06-15T12:00:00+01:00", site="1", val=3), "future_event"),
    (message(at="2099-06-15 12:00:00", site="99", val=99), "future_event"),
    # rule 5: missing_site
    (message(at=AT, val=3), "missing_site"),
    (message(at=AT, site=None, val=3), "missing_site"),
    (message(at=AT, site="", val=3), "missing_site"),
    (message(at=AT, site=" ", val=99), "missing_site"),
    # rule 6: unknown_site
    (message(at=AT, site="6", val=3), "unknown_site"),
    (message(at=AT, site=-1, val=3), "unknown_site"),
    (message(at=AT, site="1.5", val=3), "unknown_site"),
    (message(at=AT, site="ERR", val=3), "unknown_site"),
    (message(at=AT, site="INF", val=3), "unknown_site"),
    (message(at=AT, site="None", val=3), "unknown_site"),
    (message(at=AT, site="NaN", val=3), "unknown_site"),
    (message(at=AT, site=True, val=3), "unknown_site"),
    (message(at=AT, site=[1], val=3), "unknown_site"),
    # rule 7: missing_val
    (message(at=AT, site="1"), "missing_val"),
    (message(at=AT, site="1", val=None), "missing_val"),
    (message(at=AT, site="1", val=""), "missing_val"),
    # rule 8: invalid_val
    (message(at=AT, site="1", val=5), "invalid_val"),
    (message(at=AT, site="1", val=-2), "invalid_val"),
    (message(at=AT, site="1", val="ERR"), "invalid_val"),
    (message(at=AT, site="1", val=True), "invalid_val"),
    (message(at=AT, site="1", val=1.5), "invalid_val"),
    (message(at=AT, site="1", val="2.5"), "invalid_val"),
    (b'{"at": "' + AT.encode() + b'", "site": "1", "val": 99999999999999999999999}', "invalid_val"),
    (b'{"at": "' + AT.encode() + b'", "site": "1", "val": 1e400}', "invalid_val"),
    # rule 9: missing_type
    (message(at=AT, site="1", val=-1), "missing_type"),
    (message(at=AT, site="1", val=-1, type=None), "missing_type"),
    (message(at=AT, site="1", val=-1, type=""), "missing_type"),
    # rule 10: invalid_type
    (message(at=AT, site="1", val=-1, type=2), "invalid_type"),
    (message(at=AT, site="1", val=-1, type=-1), "invalid_type"),
    (message(at=AT, site="1", val=-1, type="ERR"), "invalid_type"),
    (message(at=AT, site="1", val=-1, type=0.5), "invalid_type"),
    (message(at=AT, site="1", val=-1, type=True), "invalid_type"),
    # rule 11: unexpected_type
    (message(at=AT, site="1", val=3, type=0), "unexpected_type"),
    (message(at=AT, site="1", val=4, type="1"), "unexpected_type"),
    (message(at=AT, site="1", val=0, type="ERR"), "unexpected_type"),
    # valid, in every accepted spelling
    (message(at=AT, site="1", val=3), "rating"),
    (message(at=AT, site="1", val=3), "rating"),  # the same press again is another event
    (message(at=f"{DAY}T07:45:00Z", site="0", val=0), "rating"),  # 08:45:00 in London
    (message(at=f"{DAY}T18:15:00+01:00", site="5", val=4), "rating"),
    (message(at=f"{DAY} 08:45:00", site="2", val=2), "rating"),  # no offset: London time
    (message(at=f"{DAY} 18:15:00", site="2", val=2), "rating"),
    (message(at="2024-12-02 12:30:00", site="3", val=1), "rating"),  # winter, GMT
    (message(at=f"{DAY}T11:00:00+0100", site="4", val=1), "rating"),
    (message(at=AT, site="1.0", val=2.0), "rating"),
    (message(at=AT, site=2, val="3"), "rating"),
    (message(at=AT, site=3.0, val="1.0"), "rating"),
    (message(at=AT, site=" 4 ", val=0), "rating"),
    (message(at=AT, site="05", val=4, type=None), "rating"),
    (message(at=AT, site="1", val=2, type=""), "rating"),
    (message(at=AT, site="1", val=2, extra="ignored", SITE="9"), "rating"),
    (json.dumps({"at": AT, "site": "2", "val": 1, "note": "é€🦖 " * 5000},
                ensure_ascii=False).encode(), "rating"),
    (json.dumps({"at": AT, "site": "café 🦖", "val": 3}, ensure_ascii=False).encode(),
     "unknown_site"),
    (message(at=AT, site="3", val=-1, type=1), "request"),  # Emergency
    (message(at=AT, site="4", val=-1, type=0), "request"),  # Assistance
    (message(at=AT, site="0", val="-1", type="0.0"), "request"),
    (message(at=AT, site="5", val=-1.0, type="1.0"), "request"),
]


# --------------------------------------------------------------------------- helpers
def produce(kafka, topic: str, payloads: list[bytes], partitions: int = 1,
            rate: float | None = None) -> dict[Position, bytes]:
    """Send payloads round-robin over the partitions, flat out or at `rate` per second (a live
    stream); (partition, offset) -> payload from the broker's delivery reports, so expectations
    are tied to where each message really is."""
    placed: dict[Position, bytes] = {}
    failures = []

    def on_delivery(err, msg):
        if err is not None:
            failures.append(err)
        else:
            placed[(msg.partition(), msg.offset())] = msg.value() or b""

    producer = Producer({**kafka.client_config(), "linger.ms": 5,
                         "queue.buffering.max.messages": 200000})
    started = time.monotonic()
    for i, payload in enumerate(payloads):
        if rate and i % 100 == 0:
            producer.poll(0)
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        while True:
            try:
                producer.produce(topic, payload, partition=i % partitions, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 5000 == 0:
            producer.poll(0)
    assert producer.flush(60) == 0
    assert not failures, failures[:3]
    assert len(placed) == len(payloads)
    return placed


def expected_outcomes(placed: dict[Position, bytes], **classifier_args) -> dict[Position, str]:
    return {pos: sample_data.classify_message(payload, **classifier_args)
            for pos, payload in placed.items()}


OUTCOMES_SQL = """
SELECT o.partition, t.position, t.outcome
FROM (SELECT source_id, position, 'rating' AS outcome FROM rating_interaction
      UNION ALL SELECT source_id, position, 'request' FROM request_interaction
      UNION ALL SELECT source_id, position, reason FROM rejected_event) t
JOIN kafka_offset o USING (source_id)
WHERE o.topic = %s"""


def stored_outcomes(conn, topic: str) -> dict[Position, str]:
    """(partition, offset) -> outcome in the database; fails if any offset has two outcomes."""
    found = rows(conn, OUTCOMES_SQL, (topic,))
    positions = Counter((p, o) for p, o, _ in found)
    twice = [pos for pos, n in positions.items() if n > 1]
    assert not twice, f"offsets stored more than once: {sorted(twice)[:10]}"
    for table in ("rating_interaction", "request_interaction", "rejected_event"):
        assert scalar(conn, f"SELECT count(*) - count(DISTINCT (source_id, position)) "  # noqa: S608
                            f"FROM {table}") == 0
    return {(p, o): outcome for p, o, outcome in found}


def next_offsets(conn, topic: str) -> dict[int, int]:
    return dict(rows(conn, "SELECT partition, next_offset FROM kafka_offset WHERE topic = %s",
                     (topic,)))


def progress(conn, topic: str) -> int:
    return sum(next_offsets(conn, topic).values())


def assert_consistent_prefix(conn, topic: str) -> dict[Position, str]:
    """What a stop at any moment must leave: per partition, exactly offsets 0..next_offset-1."""
    stored = stored_outcomes(conn, topic)
    offsets = next_offsets(conn, topic)
    by_partition: dict[int, set[int]] = {}
    for p, o in stored:
        by_partition.setdefault(p, set()).add(o)
    for p in set(offsets) | set(by_partition):
        have, want = by_partition.get(p, set()), set(range(offsets.get(p, 0)))
        assert have == want, (
            f"partition {p}: stored offsets are not exactly 0..{offsets.get(p, 0) - 1}: "
            f"missing {ranges(want - have)}, beyond next_offset {ranges(have - want)}")
    return stored


def ranges(offsets: set[int]) -> str:
    """1,2,3,7 -> '1-3, 7': a readable list of offsets."""
    out: list[list[int]] = []
    for o in sorted(offsets):
        if out and o == out[-1][1] + 1:
            out[-1][1] = o
        else:
            out.append([o, o])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in out) or "none"


def wait_settled(conn, topic: str, target: int, timeout: float, proc=None) -> int:
    """Wait until the stored progress reaches target, or stops moving for 5 s; return it."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now_at = progress(conn, topic)
        if now_at == target:
            return now_at
        if now_at != last:
            last, since = now_at, time.monotonic()
        elif time.monotonic() - since > 5:
            return now_at
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"consumer exited ({proc.returncode}):\n{log_text(proc)}")
        time.sleep(0.2)
    return progress(conn, topic)


def assert_exact(conn, topic: str, placed: dict[Position, bytes], **classifier_args) -> Counter:
    """The end state: every produced message exactly once, with the reference outcome."""
    stored = stored_outcomes(conn, topic)
    expected = expected_outcomes(placed, **classifier_args)
    assert set(stored) == set(expected), (
        f"missing {sorted(set(expected) - set(stored))[:10]}, "
        f"extra {sorted(set(stored) - set(expected))[:10]}")
    wrong = {pos: (stored[pos], expected[pos]) for pos in expected if stored[pos] != expected[pos]}
    assert not wrong, {pos: (placed[pos], got, want) for pos, (got, want) in list(wrong.items())[:10]}
    counts = table_counts(conn)
    assert sum(counts.values()) == len(placed)  # conservation, and nothing from elsewhere
    per_partition = Counter(p for p, _ in placed)
    assert next_offsets(conn, topic) == dict(per_partition)
    return Counter(expected.values())


def wait_for(condition: Callable[[], object], timeout: float, what: str, proc=None,
             interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"consumer exited ({proc.returncode}) while waiting for {what}:"
                                 f"\n{log_text(proc)[-3000:]}")
        time.sleep(interval)
    tail = f"; its log ends:\n{log_text(proc)[-3000:]}" if proc is not None else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{tail}")


@pytest.fixture
def spawn(tmp_path):
    """Start `python consumer.py ...` subprocesses (output to a log file each); any still
    running at the end of the test is killed by its pid."""
    started: list[subprocess.Popen] = []

    def start(*argv: str, env: dict | None = None, name: str | None = None):
        log_path = tmp_path / f"{name or 'consumer'}-{len(started)}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen([sys.executable, "consumer.py", *argv], cwd=PROJECT,
                                    env=env if env is not None else dict(os.environ),
                                    stdout=out, stderr=subprocess.STDOUT)
        proc.log_path = log_path
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def log_text(proc) -> str:
    return proc.log_path.read_text(errors="replace")


def stop(proc, sig: int = signal.SIGTERM, timeout: float = 10.0) -> tuple[int, float]:
    """Send a signal and wait for the process; (exit code, seconds it took to exit)."""
    started = time.monotonic()
    proc.send_signal(sig)
    code = proc.wait(timeout)
    return code, time.monotonic() - started


def expected_payload_text(raw: bytes) -> str:
    """The stored text of a raw payload: itself when it is UTF-8 without NUL, else escaped."""
    return raw.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")


def _integer(value) -> int:
    return int(Decimal(value.strip())) if isinstance(value, str) else int(value)


def _moment(at: str) -> datetime:
    parsed = datetime.fromisoformat(at.strip())
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=LONDON)


def group_name() -> str:
    return f"g-{os.urandom(5).hex()}"


# --------------------------------------------------------------------------- 1. mixed stream
def test_mixed_stream_lands_exactly_as_the_reference_classifier_says(
        kafka_settings, topic, service_env, conn, caplog):
    now = datetime.now(LONDON)
    for payload, outcome in EDGE_CASES:  # the hand-written expectations agree with the reference
        assert sample_data.classify_message(payload, now=now) == outcome, payload
    assert {o for _, o in EDGE_CASES} >= set(sample_data.REASON_CODES) | {"rating", "request"}
    generated = sample_data.generate_messages(3000, seed=11)
    payloads = list(generated)
    rng = random.Random(11)
    for payload, _ in EDGE_CASES:  # scattered through the stream, several per batch
        payloads.insert(rng.randrange(len(payloads) + 1), payload)
    payloads.insert(1500, None)  # a tombstone (null value): an empty payload, malformed_json
    placed = produce(kafka_settings, topic, payloads)
    assert sorted(placed) == [(0, i) for i in range(len(payloads))]
    assert placed[(0, 1500)] == b""

    caplog.set_level("INFO")
    assert run_consumer_in_process("--topic", topic, "--group", group_name(), "--stop-at-end",
                          "--batch-size", "1000") == 0

    outcome_counts = assert_exact(conn, topic, placed)
    assert set(outcome_counts) == set(sample_data.REASON_CODES) | {"rating", "request"}
    counts = table_counts(conn)
    assert counts["rating_interaction"] == outcome_counts["rating"]
    assert counts["request_interaction"] == outcome_counts["request"]
    assert reason_counts(conn) == {reason: n for reason, n in outcome_counts.items()
                                   if reason not in ("rating", "request")}
    assert next_offsets(conn, topic) == {0: len(payloads)}

    # every rejection: where from (kafka://topic, partition:offset), the raw text, a reason, words
    for source, locator, position, payload, reason, detail, rejected_at in rows(
            conn, "SELECT source, locator, position, payload, reason, detail, rejected_at "
                  "FROM rejected_event"):
        assert source == f"kafka://{topic}"
        assert locator == f"0:{position}"
        assert payload == expected_payload_text(placed[(0, position)])
        assert reason in sample_data.REASON_CODES
        assert detail.strip() and rejected_at is not None
    # and the hostile ones came through byte for byte (the tables are all still there, too)
    hostile = message(at=AT, site="1'); DROP TABLE rating_interaction; --", val=3).decode()
    assert rows(conn, "SELECT reason FROM rejected_event WHERE payload = %s", (hostile,)) == [
        ("unknown_site",)]
    assert scalar(conn, "SELECT count(*) FROM rejected_event WHERE payload = ''") == sum(
        1 for raw in placed.values() if raw == b"")

    # every stored event: the right exhibition, button and instant, by offset
    expected_rows = {}
    for (_, offset), raw in placed.items():
        if expected_outcomes({(0, offset): raw})[(0, offset)] in ("rating", "request"):
            fields = json.loads(raw)
            kind = "rating" if _integer(fields["val"]) != -1 else "request"
            value = _integer(fields["val"]) if kind == "rating" else _integer(fields["type"])
            expected_rows[offset] = (kind, _integer(fields["site"]), value, _moment(fields["at"]))
    stored_rows = {}
    for position, site, value, event_at in rows(
            conn, "SELECT i.position, e.site, r.rating_value, i.event_at FROM rating_interaction i "
                  "JOIN exhibition e USING (exhibition_id) JOIN rating r USING (rating_id)"):
        stored_rows[position] = ("rating", site, value, event_at)
    for position, site, value, event_at in rows(
            conn, "SELECT i.position, e.site, q.request_value, i.event_at "
                  "FROM request_interaction i JOIN exhibition e USING (exhibition_id) "
                  "JOIN request q USING (request_id)"):
        stored_rows[position] = ("request", site, value, event_at)
    assert stored_rows == expected_rows

    ratings, requests = outcome_counts["rating"], outcome_counts["request"]
    rejected = len(payloads) - ratings - requests
    summary = [r.getMessage() for r in caplog.records if "consumer summary" in r.getMessage()]
    assert summary == [f"consumer summary: {len(payloads)} messages = {ratings} ratings + "
                       f"{requests} requests + {rejected} rejected"]


# --------------------------------------------------------------------------- 2. --max-messages
def test_max_messages_stops_after_exactly_n_and_the_group_resumes_there(
        kafka_settings, topic, service_env, conn, caplog):
    placed = produce(kafka_settings, topic, sample_data.generate_messages(1000, seed=12))
    group = group_name()
    caplog.set_level("INFO")
    assert run_consumer_in_process("--topic", topic, "--group", group, "--max-messages", "337",
                          "--batch-size", "100") == 0
    first = assert_consistent_prefix(conn, topic)
    assert set(first) == {(0, i) for i in range(337)}
    assert sum(table_counts(conn).values()) == 337
    assert next_offsets(conn, topic) == {0: 337}
    assert first == {pos: o for pos, o in expected_outcomes(placed).items() if pos in first}

    caplog.clear()
    assert run_consumer_in_process("--topic", topic, "--group", group, "--stop-at-end") == 0
    assert_exact(conn, topic, placed)
    summary = [r.getMessage() for r in caplog.records if "consumer summary" in r.getMessage()]
    # it resumed at 337: it read only the rest, and nothing it read was already stored
    assert len(summary) == 1 and summary[0].startswith("consumer summary: 663 messages")
    assert "already stored" not in summary[0]


# --------------------------------------------------------------------------- 3. kill -9
@pytest.mark.slow
def test_kill_9_and_restarts_mid_stream_neither_lose_nor_duplicate(
        kafka_settings, topic, service_env, conn, spawn):
    total = 20_000
    placed = produce(kafka_settings, topic, sample_data.generate_messages(total, seed=13))
    group = group_name()
    rng = random.Random(13)
    args = ("--topic", topic, "--group", group, "--batch-size", "200",
            "--session-timeout-ms", FAST_SESSION_MS)
    for sig in (signal.SIGKILL, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
        before = progress(conn, topic)
        proc = spawn(*args)
        wait_for(lambda b=before: progress(conn, topic) > b, 60, "the consumer to store a batch",
                 proc, interval=0.02)
        time.sleep(rng.uniform(0.0, 0.25))
        if sig == signal.SIGKILL:
            proc.kill()
            proc.wait(10)
        else:
            code, _ = stop(proc, sig)
            assert code == 0, log_text(proc)
        # whatever instant it died at, the database holds a whole number of batches
        done = assert_consistent_prefix(conn, topic)
        assert before < len(done) < total, "the stop did not land mid-stream"
        assert done == {pos: o for pos, o in expected_outcomes(placed).items() if pos in done}
    final = spawn(*args, "--stop-at-end")
    assert final.wait(120) == 0, log_text(final)
    assert_exact(conn, topic, placed)


# --------------------------------------------------------------------------- 4. two consumers
@pytest.mark.slow
def test_two_consumers_in_one_group_share_a_live_stream_exactly_once(
        kafka_settings, service_env, conn, spawn):
    topic = create_topic(kafka_settings, 3)
    payloads = sample_data.generate_messages(18_000, seed=14)
    group = group_name()
    args = ("--topic", topic, "--group", group, "--batch-size", "200",
            "--session-timeout-ms", FAST_SESSION_MS)
    with ThreadPoolExecutor(1) as pool:
        # a live stream of 9 s; the second consumer joins while it flows (a rebalance)
        stream = pool.submit(produce, kafka_settings, topic, payloads, 3, 2000)
        first = spawn(*args, name="a")
        wait_for(lambda: progress(conn, topic) > 0, 60, "the first consumer to store", first)
        second = spawn(*args, name="b")
        wait_for(lambda: "batch:" in log_text(second), 60, "the second consumer to store", second)
        placed = stream.result(60)
    wait_for(lambda: progress(conn, topic) == len(payloads), 60, "all messages stored", first,
             interval=0.2)
    for proc in (first, second):
        code, _ = stop(proc)
        assert code == 0, log_text(proc)
    assert_exact(conn, topic, placed)
    assert next_offsets(conn, topic) == {0: 6000, 1: 6000, 2: 6000}
    # the first one held every partition, gave some up to the second, and both kept storing
    a_text = log_text(first)
    assert a_text.count("assigned") >= 2 and "partitions [0, 1, 2]" in a_text, a_text
    for proc in (first, second):
        assert "Traceback" not in log_text(proc)


@pytest.mark.slow
def test_a_frozen_consumer_that_wakes_after_losing_its_partitions_stores_nothing_twice(
        kafka_settings, service_env, conn, spawn):
    """A zombie: a member frozen (SIGSTOP) mid-stream, possibly inside its transaction, is
    dropped from the group; the other takes its partitions over; then the zombie wakes with a
    batch in hand. The database's offset rows, locked in each batch's transaction, must make
    that batch a no-op rather than a second copy."""
    topic = create_topic(kafka_settings, 3)
    payloads = sample_data.generate_messages(18_000, seed=17)
    group = group_name()
    args = ("--topic", topic, "--group", group, "--batch-size", "300",
            "--session-timeout-ms", FAST_SESSION_MS)
    with ThreadPoolExecutor(1) as pool:
        stream = pool.submit(produce, kafka_settings, topic, payloads, 3, 3000)
        first, second = spawn(*args, name="a"), spawn(*args, name="b")
        wait_for(lambda: "batch:" in log_text(second) and "batch:" in log_text(first), 60,
                 "both consumers to store", second)
        second.send_signal(signal.SIGSTOP)
        frozen_at = progress(conn, topic)
        everything = "partitions [0, 1, 2]"
        held_all = log_text(first).count(everything)
        # the frozen one's session expires and the first consumer is given its partitions
        wait_for(lambda: log_text(first).count(everything) > held_all, 40,
                 "the first consumer to take every partition", first, interval=0.2)
        placed = stream.result(60)
    second.send_signal(signal.SIGCONT)
    wait_for(lambda: progress(conn, topic) == len(payloads), 90, "all messages stored", first,
             interval=0.2)
    assert progress(conn, topic) > frozen_at
    for proc in (first, second):
        code, _ = stop(proc)
        assert code == 0, log_text(proc)
    assert_exact(conn, topic, placed)
    # A last run over all three partitions takes what arrived since and stops at their ends.
    # It uses a new group: where to start comes from the database, not from the group's Kafka
    # offsets (and Tansu may hold the old group in a rebalance until the zombie's poll
    # interval ends).
    placed.update(produce(kafka_settings, topic, sample_data.generate_messages(3000, seed=19),
                          partitions=3))
    final = spawn("--topic", topic, "--group", group_name(), "--stop-at-end",
                  "--session-timeout-ms", FAST_SESSION_MS, name="drain")
    assert final.wait(60) == 0, log_text(final)
    assert "consumer summary: 3000 messages" in log_text(final)
    assert_exact(conn, topic, placed)
    assert next_offsets(conn, topic) == {0: 7000, 1: 7000, 2: 7000}


# --------------------------------------------------------------------------- 5. PostgreSQL restart
def private_env(db, kafka) -> dict[str, str]:
    return {**os.environ, "DB_HOST": db.host, "DB_PORT": str(db.port), "DB_NAME": db.name,
            "DB_USER": db.user, "DB_PASS": db.password,
            "BOOTSTRAP_SERVERS": kafka.bootstrap_servers}


@pytest.mark.slow
def test_database_restart_mid_stream_is_ridden_out(kafka_settings, topic, private_pg, spawn):
    info, db = private_pg
    payloads = sample_data.generate_messages(8000, seed=15)
    placed = produce(kafka_settings, topic, payloads[:4000])
    proc = spawn("--topic", topic, "--group", group_name(), "--batch-size", "200",
                 env=private_env(db, kafka_settings))
    conn = load.connect(db)
    wait_for(lambda: progress(conn, topic) == 4000, 60, "the first 4,000 messages", proc)
    conn.close()

    localstack.pg_control(info, "stop")
    placed.update(produce(kafka_settings, topic, payloads[4000:]))  # arrives while it is down
    wait_for(lambda: "database unavailable" in log_text(proc), 30, "the outage to be noticed", proc)
    time.sleep(4)  # several retries (0.5 s, 1 s, 2 s backoff) while the server is away
    assert proc.poll() is None, log_text(proc)
    localstack.pg_control(info, "start")

    conn = load.connect(db)
    try:
        wait_for(lambda: progress(conn, topic) == 8000, 90, "the rest after the restart", proc,
                 interval=0.2)
        code, _ = stop(proc)
        text = log_text(proc)
        assert code == 0, text
        assert_exact(conn, topic, placed)
    finally:
        conn.close()
    # one line per state change, not one per retry
    assert text.count("database unavailable") == 1, text
    assert text.count("database is back") == 1, text
    assert "Traceback" not in text


# --------------------------------------------------------------------------- 6. signals
@pytest.mark.slow
def test_sigterm_and_sigint_exit_0_promptly_having_committed_what_they_stored(
        kafka_settings, topic, service_env, conn, spawn):
    total = 20_000
    placed = produce(kafka_settings, topic, sample_data.generate_messages(total, seed=16))
    args = ("--topic", topic, "--group", group_name(), "--batch-size", "200")
    for sig in (signal.SIGTERM, signal.SIGINT):
        before = progress(conn, topic)
        proc = spawn(*args)
        wait_for(lambda b=before: progress(conn, topic) > b, 60, "a stored batch", proc,
                 interval=0.02)
        code, seconds = stop(proc, sig)
        text = log_text(proc)
        assert code == 0, text
        assert seconds < 5, f"took {seconds:.1f} s to stop"
        assert "Traceback" not in text
        done = assert_consistent_prefix(conn, topic)
        counts = table_counts(conn)
        assert next_offsets(conn, topic)[0] == sum(counts.values()) == len(done)
        assert before < len(done) < total
        assert done == {pos: o for pos, o in expected_outcomes(placed).items() if pos in done}
        assert "consumer summary" in text


# --------------------------------------------------------------------------- 7. master data
@pytest.mark.slow
def test_new_exhibition_is_known_without_a_restart(kafka_settings, topic, service_env, conn,
                                                   spawn, tmp_path):
    def batch(at_minute: int) -> list[bytes]:
        at = f"{DAY}T11:{at_minute:02d}:00+01:00"
        return [message(at=at, site="6", val=4), message(at=at, site=6, val=-1, type=0),
                message(at=at, site="1", val=2), message(at=at, site="7", val=1)]

    log_file = tmp_path / "logs" / "live.log"
    proc = spawn("--topic", topic, "--group", group_name(), "--batch-size", "100",
                 "-l", "file", "--log-file", str(log_file))
    before = produce(kafka_settings, topic, batch(1) * 3)
    wait_for(lambda: progress(conn, topic) == 12, 60, "the messages before EXH_06", proc)
    with load.transaction(conn) as cur:
        assert load.upsert_exhibition(cur, transform.Exhibition(
            public_id="EXH_06", site=6, name="Starlight Gallery", floor="2",
            department="Astronomy", start_date=date(2024, 10, 1),
            description="Meteorites from the museum's vaults.")) == "added"
    after = produce(kafka_settings, topic, batch(2) * 2)
    wait_for(lambda: progress(conn, topic) == 20, 60, "the messages after EXH_06", proc)
    code, _ = stop(proc)
    assert code == 0, log_text(proc) + log_file.read_text()
    # -l file: the log went to the file, nothing to the console
    assert log_text(proc) == ""
    assert "consumer summary: 20 messages" in log_file.read_text()

    now = datetime.now(LONDON)
    expected = {**expected_outcomes(before, now=now),
                **expected_outcomes(after, known_sites=range(7), now=now)}
    assert stored_outcomes(conn, topic) == expected
    assert Counter(o for pos, o in expected.items() if pos[1] < 12) == {
        "unknown_site": 9, "rating": 3}
    assert Counter(o for pos, o in expected.items() if pos[1] >= 12) == {
        "rating": 4, "request": 2, "unknown_site": 2}
    assert rows(conn, "SELECT count(*) FROM rating_interaction JOIN exhibition "
                      "USING (exhibition_id) WHERE public_id = 'EXH_06'") == [(2,)]
    assert rows(conn, "SELECT count(*) FROM request_interaction JOIN exhibition "
                      "USING (exhibition_id) WHERE public_id = 'EXH_06'") == [(2,)]


# --------------------------------------------------------------------------- 8. emergency
def test_emergency_call_is_logged_as_a_warning_naming_the_exhibition(
        kafka_settings, topic, service_env, conn, caplog, monkeypatch):
    # a live call (stamped now; the opening hours cover the whole day so the clock never
    # matters) is shouted; one months old (a backlog) is only counted (SPEC §4.1)
    monkeypatch.setenv("OPENING_TIME", "00:00:00")
    monkeypatch.setenv("CLOSING_TIME", "23:59:59.999999")
    now = datetime.now(LONDON)
    placed = produce(kafka_settings, topic, [
        message(at=now.isoformat(), site="3", val=-1, type=1),           # Emergency
        message(at=now.isoformat(), site="2", val=-1, type=0),           # Assistance
        message(at=now.isoformat(), site="3", val=4),
        message(at=now.isoformat(), site="3", val=-1, type=9),           # not a call at all
        message(at=f"{DAY}T14:05:09+01:00", site="4", val=-1, type=1),   # an old Emergency
    ])
    caplog.set_level("INFO")
    assert run_consumer_in_process("--topic", topic, "--group", group_name(), "--stop-at-end") == 0
    assert_exact(conn, topic, placed, now=datetime.now(LONDON),
                 opening_hours=(dt_time(0), dt_time(23, 59, 59, 999999)))
    warnings = [r.getMessage() for r in caplog.records
                if r.levelname == "WARNING" and "emergency" in r.getMessage().lower()]
    assert len(warnings) == 1, warnings
    assert "Cetacean Sensations" in warnings[0]
    assert f"{now:%H:%M:%S}" in warnings[0]
    assert not any(name in r.getMessage() for r in caplog.records if r.levelname == "WARNING"
                   for name in ("The Crenshaw Collection", "Our Polluted World"))
    assert any(r.getMessage().startswith("1 emergency call(s) older than 15 minutes")
               for r in caplog.records if r.levelname == "INFO")


# --------------------------------------------------------------------------- configuration
def test_opening_hours_come_from_configuration(kafka_settings, topic, service_env, conn,
                                               monkeypatch):
    """SPEC §2: opening hours are configuration. A later closing time lets evening presses in."""
    monkeypatch.setenv("OPENING_TIME", "10:00:00")
    monkeypatch.setenv("CLOSING_TIME", "20:00:00")
    placed = produce(kafka_settings, topic, [
        message(at=f"{DAY}T09:59:59.999999+01:00", site="1", val=1),
        message(at=f"{DAY}T10:00:00+01:00", site="1", val=1),
        message(at=f"{DAY}T19:00:00+01:00", site="1", val=2),
        message(at=f"{DAY} 20:00:00", site="1", val=3),
        message(at=f"{DAY}T19:00:00.000001Z", site="1", val=4),
    ])
    assert run_consumer_in_process("--topic", topic, "--group", group_name(), "--stop-at-end") == 0
    outcomes = assert_exact(conn, topic, placed, opening_hours=(
        datetime.strptime("10:00", "%H:%M").time(), datetime.strptime("20:00", "%H:%M").time()))
    assert outcomes == {"rating": 3, "outside_opening_hours": 2}


# --------------------------------------------------------------------------- 9. --help
def test_help_shows_the_documented_options():
    result = subprocess.run([sys.executable, "consumer.py", "--help"], cwd=PROJECT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for option in ("-l", "--log_output", "--topic", "--group", "--max-messages"):
        assert option in result.stdout
    assert "{console,file}" in result.stdout


# --------------------------------------------------------------------------- 10. bad settings
@pytest.mark.parametrize(("settings", "argv", "named"), [
    ({"SECURITY_PROTOCOL": "BOGUS"}, [], "SECURITY_PROTOCOL"),
    ({"SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "BOGUS", "USERNAME": "kiosk",
      "PASSWORD": "s3cret-Pa55word"}, [], "SASL_MECHANISM"),
    ({"SECURITY_PROTOCOL": "SASL_SSL", "USERNAME": "kiosk"}, [], "PASSWORD"),
    ({"DB_HOST": "127.0.0.1", "DB_USER": "postgres", "DB_PORT": "fifty"}, [], "DB_PORT"),
    ({}, ["--max-messages", "0"], "--max-messages"),
], ids=["security-protocol", "sasl-mechanism", "missing-password", "db-port", "max-messages"])
def test_bad_setting_exits_2_with_one_line_naming_it(settings, argv, named):
    env = {**os.environ, "BOOTSTRAP_SERVERS": "127.0.0.1:9092", **settings}
    result = subprocess.run([sys.executable, "consumer.py", *argv], cwd=PROJECT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert named in lines[0]
    assert "Traceback" not in result.stderr
    assert "s3cret-Pa55word" not in result.stderr + result.stdout


def test_a_missing_kafka_setting_is_one_line_when_the_database_is_configured(tmp_path):
    """The local stack stands in only when nothing is configured (SPEC §4): with DB_* set and
    no BOOTSTRAP_SERVERS, the consumer names the setting instead of starting a local broker."""
    env = {**os.environ, "DB_HOST": "127.0.0.1", "DB_USER": "postgres", "DB_PORT": "9"}
    result = subprocess.run([sys.executable, "consumer.py", "--max-messages", "1"], cwd=PROJECT,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert "configuration error: BOOTSTRAP_SERVERS is not set" in line


@pytest.fixture
def empty_database(stack):
    """A database with no schema at all (not the local default one)."""
    name = f"t_empty_{os.urandom(5).hex()}"
    admin = admin_connection(stack["postgres"])
    with admin.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield name
    with admin.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    admin.close()


@pytest.mark.parametrize("case", ["no-such-database", "no-schema"])
def test_what_waiting_cannot_fix_exits_1_with_one_line(case, stack, kafka_settings,
                                                       empty_database):
    name = f"{empty_database}_missing" if case == "no-such-database" else empty_database
    env = {**os.environ, "DB_HOST": "127.0.0.1", "DB_PORT": str(stack["postgres"]["port"]),
           "DB_USER": "postgres", "DB_PASS": localstack.database_settings(stack["postgres"]).password,
           "DB_NAME": name,
           "BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers}
    result = subprocess.run([sys.executable, "consumer.py", "--topic", "lmnh-unused"],
                            cwd=PROJECT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert (name in errors[0]) if case == "no-such-database" else ("reset.sh" in errors[0])
    if case == "no-schema":  # a database it was not told to own is left untouched
        conn = load.connect(localstack.database_settings(stack["postgres"], name))
        assert scalar(conn, "SELECT count(*) FROM information_schema.tables "
                            "WHERE table_schema = 'public'") == 0
        conn.close()


# ------------------------------------------------------------- 11. outages meet stops and rebalances
@pytest.mark.slow
def test_sigterm_while_the_database_is_down_exits_0_and_loses_nothing(
        kafka_settings, topic, private_pg, spawn):
    """SPEC §4: exit 0 on SIGTERM. The held batch was never stored nor committed anywhere, so
    stopping during an outage is safe: the next run reads it again."""
    info, db = private_pg
    env = private_env(db, kafka_settings)
    payloads = sample_data.generate_messages(3000, seed=18)
    placed = produce(kafka_settings, topic, payloads[:2000])
    group = group_name()
    proc = spawn("--topic", topic, "--group", group, "--batch-size", "500", env=env)
    conn = load.connect(db)
    wait_for(lambda: progress(conn, topic) == 2000, 60, "the first 2,000 messages", proc)
    conn.close()
    localstack.pg_control(info, "stop")
    try:
        placed.update(produce(kafka_settings, topic, payloads[2000:]))
        wait_for(lambda: "database unavailable" in log_text(proc), 30, "the outage", proc)
        time.sleep(4)  # into the backoff: retries after 0.5, 1 and 2 s, then a 4 s wait
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(2.5)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"exit {code} within 2.5 s of SIGTERM:\n{log_text(proc)}"
    finally:
        localstack.pg_control(info, "start")
    conn = load.connect(db)
    try:
        assert_consistent_prefix(conn, topic)
        assert next_offsets(conn, topic) == {0: 2000}
        drain = spawn("--topic", topic, "--group", group, "--stop-at-end", env=env)
        assert drain.wait(60) == 0, log_text(drain)
        assert_exact(conn, topic, placed)
    finally:
        conn.close()


@pytest.mark.slow
def test_rebalance_during_a_database_outage_loses_nothing(kafka_settings, private_pg, spawn):
    """Two members wait out an outage, each holding a batch; one is stopped (SIGTERM, as an
    operator or an orchestrator would). The survivor is given every partition while it waits:
    what it is handed then must not vanish, and the end state must be exact. Messages that
    arrive afterwards must not be stored past a hole either (that loss would be permanent)."""
    info, db = private_pg
    env = private_env(db, kafka_settings)
    topic = create_topic(kafka_settings, 3)
    payloads = sample_data.generate_messages(6000, seed=20)
    placed = produce(kafka_settings, topic, payloads[:3000], partitions=3)
    args = ("--topic", topic, "--group", group_name(), "--batch-size", "200")
    first, second = spawn(*args, env=env, name="a"), spawn(*args, env=env, name="b")
    conn = load.connect(db)
    wait_for(lambda: progress(conn, topic) == 3000, 60, "the first 3,000 messages", first)
    conn.close()
    for proc in (first, second):
        assert "batch:" in log_text(proc), f"{proc.log_path.name} got no partition"

    localstack.pg_control(info, "stop")
    try:
        placed.update(produce(kafka_settings, topic, payloads[3000:], partitions=3))
        for proc in (first, second):
            wait_for(lambda p=proc: "database unavailable" in log_text(p), 30, "the outage", proc)
        assignments = log_text(first).count(": assigned ")
        code, _ = stop(second)
        assert code == 0, log_text(second)
        # the survivor takes the partitions over while the database is still away
        wait_for(lambda: log_text(first).count(": assigned ") > assignments, 30,
                 "the reassignment during the outage", first)
        time.sleep(2)
    finally:
        localstack.pg_control(info, "start")
    conn = load.connect(db)
    try:
        wait_settled(conn, topic, 6000, 60, first)
        placed.update(produce(kafka_settings, topic, sample_data.generate_messages(300, seed=21),
                              partitions=3))
        wait_settled(conn, topic, 6300, 60, first)
        assert_consistent_prefix(conn, topic)
        code, _ = stop(first)
        assert code == 0, log_text(first)
        assert_exact(conn, topic, placed)
    finally:
        conn.close()


def test_a_batch_that_skips_ahead_of_the_stored_offset_is_refused_then_reread(
        kafka_settings, topic, conn):
    """store_batch never moves an offset past messages it has not stored: a batch starting
    above the database's next offset raises OffsetGap (nothing written) until that gap has
    been re-read once and confirmed."""
    from confluent_kafka import Consumer, TopicPartition
    produce(kafka_settings, topic, [message() for _ in range(20)])
    reader = Consumer({**kafka_settings.client_config(), "group.id": group_name(),
                       "enable.auto.commit": False})
    reader.assign([TopicPartition(topic, 0, 10)])  # as if offsets 0-9 had been skipped
    batch: list = []
    deadline = time.monotonic() + 30
    while len(batch) < 10 and time.monotonic() < deadline:
        batch += [m for m in reader.consume(10, 1.0) if m.error() is None]
    reader.close()
    assert [m.offset() for m in batch] == list(range(10, 20))
    with pytest.raises(consumer.OffsetGap) as gap:
        consumer.store_batch(conn, topic, batch, transform.Rules())
    assert gap.value.gaps == {0: 0} and gap.value.rewind_to == {0: 0}
    assert sum(table_counts(conn).values()) == 0
    assert next_offsets(conn, topic) in ({}, {0: 0})
    result = consumer.store_batch(conn, topic, batch, transform.Rules(),
                                  known=consumer.KnownLog(accepted_gaps=frozenset({(0, 0)})))
    assert result.next_offsets == {0: 20}
    assert sum(table_counts(conn).values()) == 10


def worker_without_database_at_assignment(kafka_settings, topic: str, db, conn,
                                          batch_size: int) -> consumer.KioskConsumer:
    """A --stop-at-end consumer whose database session is cut off before its assignment, so
    it starts from the group's Kafka offsets (partition 0: 10) while the database says 0;
    after assignment it pauses (a slow log disk, a long GC), so the client fetches up to the
    partitions' ends and the first batches come with them."""
    from confluent_kafka import Consumer, TopicPartition
    group = group_name()
    committer = Consumer({**kafka_settings.client_config(), "group.id": group,
                          "enable.auto.commit": False})
    committer.commit(offsets=[TopicPartition(topic, 0, 10)], asynchronous=False)
    committer.close()
    worker = consumer.KioskConsumer(
        Settings(database=db, s3=None, kafka=kafka_settings),
        consumer.ConsumerOptions(topic, group, batch_size=batch_size, stop_at_end=True,
                                 session_timeout_ms=6000),
        consumer.Metrics(None), transform.Rules())
    worker.db.conn = load.connect(db)
    with conn.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", (worker.db.conn.get_backend_pid(),))
    conn.commit()
    assign = worker._on_assign

    def assign_then_pause(*args) -> None:
        assign(*args)
        time.sleep(1.5)

    worker._on_assign = assign_then_pause
    return worker


def run_to_the_end(worker: consumer.KioskConsumer) -> int:
    """worker.run(), stopped by a watchdog after 60 s (the test then fails on `stopping`)."""
    watchdog = threading.Timer(60, worker.request_stop)
    watchdog.start()
    try:
        return worker.run()
    finally:
        watchdog.cancel()


def test_a_refused_batch_sends_the_batch_read_after_it_back_too(kafka_settings, db, conn):
    """The consumer reads a batch while the one before is stored. When that one is refused for
    skipping ahead (partition 0 starts at the group's Kafka offset 10, the database says 0),
    the batch already read is dropped and its partitions are read again from where it began:
    partition 1 is not skipped, so the gap is met once, on partition 0 only."""
    topic = create_topic(kafka_settings, 2)
    placed = produce(kafka_settings, topic, sample_data.generate_messages(40, seed=37),
                     partitions=2)
    worker = worker_without_database_at_assignment(kafka_settings, topic, db, conn,
                                                   batch_size=10)
    assert run_to_the_end(worker) == 0
    assert not worker.stopping, "stopped by the watchdog, not at the end"
    assert worker.accepted_gaps == {(0, 0)}
    assert next_offsets(conn, topic) == {0: 20, 1: 20}
    assert_exact(conn, topic, placed)


def test_stop_at_end_reads_a_rewound_range_before_stopping(kafka_settings, topic, db, conn):
    """A batch that skipped ahead (here: the database was unreachable at assignment, so the
    group's Kafka offset, 10, was used while the database says 0) is refused and the partition
    rewound. The end of the partition seen with that batch no longer holds: --stop-at-end
    must read offsets 0-19 and only then stop (it stopped with nothing stored)."""
    placed = produce(kafka_settings, topic, sample_data.generate_messages(20, seed=31))
    worker = worker_without_database_at_assignment(kafka_settings, topic, db, conn,
                                                   batch_size=500)
    assert run_to_the_end(worker) == 0
    assert worker.accepted_gaps == {(0, 0)}           # the gap was really met and rewound
    assert not worker.stopping, "stopped by the watchdog, not at the end"
    assert next_offsets(conn, topic) == {0: 20}
    assert_exact(conn, topic, placed)


def read_messages(kafka_settings, topic: str, start: int, count: int) -> list:
    """`count` messages of partition 0 from offset `start`, as a consumer batch holds them."""
    from confluent_kafka import Consumer, TopicPartition
    reader = Consumer({**kafka_settings.client_config(), "group.id": group_name(),
                       "enable.auto.commit": False})
    reader.assign([TopicPartition(topic, 0, start)])
    batch: list = []
    deadline = time.monotonic() + 30
    while len(batch) < count and time.monotonic() < deadline:
        batch += [m for m in reader.consume(count - len(batch), 1.0) if m.error() is None]
    reader.close()
    assert [m.offset() for m in batch] == list(range(start, start + count))
    return batch


def test_batches_over_known_partitions_draw_no_identity_value(kafka_settings, topic, conn):
    """SPEC §3.1: ten batches a second for ten years must not exhaust event_source's INT key;
    only the partition's first batch creates (draws) its source."""
    produce(kafka_settings, topic, [message(at=AT, site="1", val=3) for _ in range(30)])
    consumer.store_batch(conn, topic, read_messages(kafka_settings, topic, 0, 10),
                         transform.Rules())
    drawn = {k: v for k, v in identity_values(conn).items()
             if not k.startswith(("rating_interaction.", "request_interaction."))}
    for start in (10, 20):
        result = consumer.store_batch(conn, topic, read_messages(kafka_settings, topic, start, 10),
                                      transform.Rules())
        assert result.ratings == 10
    assert {k: v for k, v in identity_values(conn).items() if k in drawn} == drawn
    assert scalar(conn, "SELECT count(*) FROM event_source") == 1



class Reads:
    """A real consumer message that counts how often its payload is read."""

    def __init__(self, message):
        self.message, self.reads = message, 0

    def value(self):
        self.reads += 1
        return self.message.value()

    def partition(self):
        return self.message.partition()

    def offset(self):
        return self.message.offset()


def test_a_batch_validated_ahead_is_stored_as_its_transaction_would_store_it(kafka_settings,
                                                                             topic, conn):
    """The consumer validates a batch while the one before is stored (prepare_batch). Against
    the master data and sources that transaction read, the work done ahead is what is stored:
    the payloads are not read again, and every outcome is the reference classifier's."""
    payloads = sample_data.generate_messages(400, seed=19) + [p for p, _ in EDGE_CASES]
    placed = produce(kafka_settings, topic, payloads)
    first = consumer.store_batch(conn, topic, read_messages(kafka_settings, topic, 0, 200),
                                 transform.Rules())
    batch = consumer.Batch([Reads(m) for m in read_messages(kafka_settings, topic, 200,
                                                             len(payloads) - 200)],
                           transform.Rules())
    consumer.prepare_batch(topic, batch, first.master, first.source_of)
    assert batch.ahead is not None
    result = consumer.store_batch_as(conn, topic, batch)
    assert {m.reads for m in batch.messages} == {1}  # read once, ahead; not again inside
    assert result.next_offsets == {0: len(payloads)}
    assert_exact(conn, topic, placed)


def test_a_batch_validated_ahead_is_validated_again_when_the_master_data_changed(
        kafka_settings, topic, conn):
    """Validated ahead against master data without site 6, stored after EXH_06 was added:
    the transaction sees other master data than the work done ahead and validates again, so
    site 6's events are stored, not rejected as an unknown site."""
    at = f"{DAY}T11:00:00+01:00"
    produce(kafka_settings, topic, [message(at=at, site="1", val=2)] * 5
            + [message(at=at, site="6", val=4)] * 5)
    first = consumer.store_batch(conn, topic, read_messages(kafka_settings, topic, 0, 5),
                                 transform.Rules())
    batch = consumer.Batch(read_messages(kafka_settings, topic, 5, 5), transform.Rules())
    consumer.prepare_batch(topic, batch, first.master, first.source_of)
    assert batch.ahead.outcome.reason_counts() == {"unknown_site": 5}
    with load.transaction(conn) as cur:
        load.upsert_exhibition(cur, transform.Exhibition(
            public_id="EXH_06", site=6, name="Starlight Gallery", floor="2",
            department="Astronomy", start_date=date(2024, 10, 1), description="Meteorites."))
    # the store thread's way (ahead_only): refused, nothing written, left to the loop's thread
    with pytest.raises(consumer.StaleAhead):
        consumer.store_batch_as(conn, topic, batch, ahead_only=True)
    assert next_offsets(conn, topic) == {0: 5} and sum(table_counts(conn).values()) == 5
    result = consumer.store_batch_as(conn, topic, batch)
    assert (result.ratings, sum(result.rejected.values())) == (5, 0)
    assert table_counts(conn) == {"rating_interaction": 10, "request_interaction": 0,
                                  "rejected_event": 0}


EVENTS_BY_SOURCE_SQL = """
SELECT s.uri, t.position, t.outcome
FROM (SELECT source_id, position, 'rating' AS outcome FROM rating_interaction
      UNION ALL SELECT source_id, position, 'request' FROM request_interaction
      UNION ALL SELECT source_id, position, reason FROM rejected_event) t
JOIN event_source s USING (source_id)
ORDER BY 1, 2"""


def recreate_topic(kafka, topic: str) -> None:
    """Delete the topic and create it again: what a restart of the memory-only local broker
    does (SPEC §5), and what an operator's delete and create does on any broker."""
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient(kafka.client_config())
    admin.delete_topics([topic])[topic].result(timeout=15)
    deadline = time.monotonic() + 30
    while True:
        try:
            admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(timeout=15)
            return
        except KafkaException:  # deletion still under way
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def topic_id(kafka, topic: str) -> str:
    from confluent_kafka import TopicCollection
    from confluent_kafka.admin import AdminClient
    admin = AdminClient(kafka.client_config())
    return str(admin.describe_topics(TopicCollection([topic]))[topic].result(timeout=10).topic_id)


def test_a_recreated_topic_is_read_from_its_beginning_as_a_new_source(
        kafka_settings, topic, service_env, conn, spawn):
    """SPEC §3.1: after the topic is deleted and created again its offsets start from 0. The
    stored offset 100 means nothing there: before, the consumer sought to it and waited for
    ever (Tansu), or dropped the new messages as "already stored" (Kafka)."""
    group = group_name()
    first = produce(kafka_settings, topic, sample_data.generate_messages(100, seed=3))
    assert run_consumer_in_process("--topic", topic, "--group", group, "--stop-at-end") == 0
    old_rows = rows(conn, EVENTS_BY_SOURCE_SQL)
    assert len(old_rows) == 100
    old_id = topic_id(kafka_settings, topic)
    assert rows(conn, "SELECT next_offset, topic_id, epoch FROM kafka_offset") == [
        (100, old_id, 0)]

    recreate_topic(kafka_settings, topic)
    assert topic_id(kafka_settings, topic) != old_id
    second = produce(kafka_settings, topic, sample_data.generate_messages(50, seed=4))
    proc = spawn("--topic", topic, "--group", group, "--stop-at-end")
    try:
        assert proc.wait(60) == 0, log_text(proc)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"--stop-at-end never stopped:\n{log_text(proc)[-3000:]}") from None

    text = log_text(proc)
    warnings = [line for line in text.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, text
    assert "was recreated" in warnings[0] and f"kafka://{topic}/0@1" in warnings[0], warnings
    assert "already stored" not in text
    stored = rows(conn, EVENTS_BY_SOURCE_SQL)
    assert [r for r in stored if r[0] == f"kafka://{topic}/0"] == old_rows   # untouched
    assert {(0, o): outcome for uri, o, outcome in stored if uri == f"kafka://{topic}/0"} \
        == expected_outcomes(first)
    new_log = {(0, o): outcome for uri, o, outcome in stored if uri == f"kafka://{topic}/0@1"}
    assert new_log == expected_outcomes(second)
    assert len(stored) == 150
    assert rows(conn, "SELECT next_offset, topic_id, epoch FROM kafka_offset") == [
        (50, topic_id(kafka_settings, topic), 1)]
    assert set(rows(conn, "SELECT DISTINCT source FROM rejected_event")) <= {(f"kafka://{topic}",)}


def test_a_batch_read_under_a_new_topic_id_starts_the_new_source_itself(
        kafka_settings, topic, conn):
    """Where assignment could not check the log (the database was away then), the batch does:
    its messages are stored under a new epoch, not dropped as "already stored"; a batch that
    does not begin at the new log's start is refused (OffsetGap) with nothing switched."""
    produce(kafka_settings, topic, [message(at=AT, site="1", val=3) for _ in range(20)])
    batch = read_messages(kafka_settings, topic, 0, 10)
    log_a, log_b = consumer.KnownLog("id-A"), consumer.KnownLog("id-B")
    first = consumer.store_batch(conn, topic, batch, transform.Rules(), known=log_a)
    assert (first.ratings, first.new_logs) == (10, [])
    again = consumer.store_batch(conn, topic, batch, transform.Rules(), known=log_a)
    assert (again.ratings, again.duplicates) == (0, 10)           # the same log: a replay
    with pytest.raises(consumer.OffsetGap):
        consumer.store_batch(conn, topic, read_messages(kafka_settings, topic, 10, 10),
                             transform.Rules(), known=log_b)
    assert rows(conn, "SELECT next_offset, topic_id, epoch FROM kafka_offset") == [(10, "id-A", 0)]
    renewed = consumer.store_batch(conn, topic, batch, transform.Rules(), known=log_b)
    assert (renewed.ratings, renewed.duplicates) == (10, 0)
    assert renewed.new_logs == [load.NewLog(0, 10, f"kafka://{topic}/0@1",
                                            "the topic ID is now id-B, was id-A")]
    assert rows(conn, "SELECT uri, count(*) FROM rating_interaction JOIN event_source "
                      "USING (source_id) GROUP BY uri ORDER BY uri") == [
        (f"kafka://{topic}/0", 10), (f"kafka://{topic}/0@1", 10)]
    assert rows(conn, "SELECT next_offset, topic_id, epoch FROM kafka_offset") == [(10, "id-B", 1)]
