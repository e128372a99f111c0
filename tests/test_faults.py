"""Fault injection against real services: what a batch run does when the world misbehaves.

Why: SPEC §3-§4 promise that a run loses nothing, duplicates nothing and leaves nothing
half-loaded, and that an operator gets one clear line rather than a traceback. These tests break
things for real — PostgreSQL stopped in the middle of a large object, an S3 endpoint that is not
there, an object deleted or replaced between the listing and the read, objects full of garbage —
and then check the database's exact contents and that a rerun finishes the job exactly.
Faults are injected into real services, or by wrapping a product function (never by replacing
a service with a mock). The consumer's own faults (kill -9, PostgreSQL restart, SIGTERM) are in
test_consumer.py; only an unreachable broker is here.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import psycopg2
import pytest

import extract
import load
import localstack
import pipeline
import sample_data
import transform
from helpers import reason_counts, rows, scalar, table_counts

PROJECT = Path(__file__).resolve().parent.parent
HEADER = b"at,site,val,type\n"


def put(s3, bucket: str, key: str, body: bytes) -> None:
    s3.put_object(Bucket=bucket, Key=key, Body=body)


def run(*argv: str) -> int:
    return pipeline.main([*argv, "--no-progress"])


def subprocess_env(db, s3_settings, **extra: str) -> dict[str, str]:
    return {**os.environ, "DB_HOST": db.host, "DB_PORT": str(db.port), "DB_NAME": db.name,
            "DB_USER": db.user, "DB_PASS": db.password,
            "AWS_ENDPOINT_URL_S3": s3_settings.endpoint_url,
            "AWS_ACCESS_KEY": s3_settings.access_key,
            "AWS_SECRET_ACCESS_KEY": s3_settings.secret_key, **extra}


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if " ERROR " in line]


def stored_outcomes(conn, uri: str) -> Counter:
    """What landed from one source: rating / request counts and rejections by reason."""
    out = Counter(dict(rows(conn, "SELECT reason, count(*) FROM rejected_event "
                                  "JOIN event_source USING (source_id) WHERE uri = %s "
                                  "GROUP BY reason", (uri,))))
    for kind, table in (("rating", "rating_interaction"), ("request", "request_interaction")):
        out[kind] = scalar(conn, f"SELECT count(*) FROM {table} "  # noqa: S608 - fixed names
                                 "JOIN event_source USING (source_id) WHERE uri = %s", (uri,))
    return +out


def event_lines(body: bytes, header_ok: bool) -> int:
    """Lines of an object that are events: not blank; the header line too when it is wrong."""
    lines = re.split(rb"\r\n|\r|\n", body)  # SPEC §3: each of these ends a line
    if lines and lines[-1] == b"":
        lines.pop()
    texts = [line.decode("utf-8", "backslashreplace") for line in lines]
    if texts:
        texts[0] = texts[0].removeprefix("\ufeff")
    if header_ok:
        texts = texts[1:]
    return sum(1 for t in texts if t and not t.isspace())


# --------------------------------------------------------------------------- PostgreSQL restart


def _copy_in_progress(db, committed_uri: str) -> bool:
    """True once the pipeline's transaction for the big object has sent rows to PostgreSQL:
    a COPY in a transaction after the small object (loaded first) has committed, so the COPY
    seen is not the small object's own."""
    try:
        conn = psycopg2.connect(**{**db.connect_kwargs(), "application_name": "lmnh-test-watch"})
    except psycopg2.OperationalError:
        return False
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM s3_object_load JOIN event_source "
                        "USING (source_id) WHERE uri = %s", (committed_uri,))
            if cur.fetchone()[0] == 0:
                return False
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                        "'lmnh-pipeline' AND query LIKE 'COPY rating_interaction%' "
                        "AND xact_start IS NOT NULL")
            return cur.fetchone()[0] > 0
    finally:
        conn.close()


@pytest.mark.slow
def test_postgres_restart_mid_object_loses_nothing_and_a_rerun_completes_exactly(
        private_pg, s3, s3_settings, bucket):
    info, db = private_pg
    small = sample_data.generate_kiosk_csv(2000, seed=31)
    rows_big = 1_000_000
    big = sample_data.generate_kiosk_csv(rows_big, seed=32, anomalies=False)
    put(s3, bucket, sample_data.kiosk_key(0), small)
    put(s3, bucket, sample_data.kiosk_key(1), big)
    small_uri = f"s3://{bucket}/{sample_data.kiosk_key(0)}"
    big_uri = f"s3://{bucket}/{sample_data.kiosk_key(1)}"
    env = subprocess_env(db, s3_settings)
    proc = subprocess.Popen([sys.executable, "pipeline.py", "-b", bucket, "--no-progress"],
                            cwd=PROJECT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _copy_in_progress(db, small_uri):
            assert proc.poll() is None, "the run ended before the big object was being loaded"
            assert time.monotonic() < deadline, "the big object never started loading"
            time.sleep(0.02)
        # No look at the process here: it may notice the stop and exit before any look could.
        # That the stop came mid-object is known from the COPY seen in progress above, and is
        # checked by the outcome below: a run that had finished would exit 0 with a summary.
        localstack.pg_control(info, "stop")
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    localstack.pg_control(info, "start")

    # The run failed cleanly: non-zero, no traceback, no summary, one error line at the end.
    assert proc.returncode == 1, (out, err)
    assert "Traceback" not in err and out == ""
    errors = error_lines(err)
    assert len(errors) == 1 and "run failed:" in errors[0], err
    assert err.strip().splitlines()[-1] == errors[0]

    conn = load.connect(db)
    try:
        _check_nothing_half_loaded_and_rerun(conn, bucket, env, small, small_uri, big, big_uri,
                                             rows_big)
    finally:
        conn.close()
    # ...and the line says what failed and what to do: "run failed: invalid socket" (what
    # psycopg2 reports when the server goes away mid-COPY) names neither.
    assert "PostgreSQL" in errors[0] and "rerun" in errors[0], errors[0]


def _check_nothing_half_loaded_and_rerun(conn, bucket, env, small, small_uri, big, big_uri,
                                         rows_big) -> None:
    """The small object committed before the stop; the big one left nothing at all, not even
    its load record; a rerun loads exactly what is missing."""
    expected_small = +sample_data.expected_reasons(small)
    assert stored_outcomes(conn, small_uri) == expected_small
    assert stored_outcomes(conn, big_uri) == Counter()
    assert rows(conn, "SELECT uri FROM s3_object_load JOIN event_source USING (source_id)") \
        == [(small_uri,)]

    rerun = subprocess.run([sys.executable, "pipeline.py", "-b", bucket, "--no-progress"],
                           cwd=PROJECT, env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "1 loaded, 1 skipped (unchanged)" in rerun.stdout
    # Exactly once: every line of the big object, each at its own position, nothing twice.
    ratings = big.count(b",\n")   # with no anomalies a rating is the only row ending ","
    assert stored_outcomes(conn, big_uri) == Counter(rating=ratings,
                                                     request=rows_big - ratings)
    assert stored_outcomes(conn, small_uri) == expected_small
    assert rows(conn, "SELECT min(position), max(position), count(DISTINCT position) FROM "
                      "(SELECT position FROM rating_interaction JOIN event_source "
                      "USING (source_id) WHERE uri = %(u)s UNION ALL SELECT position FROM "
                      "request_interaction JOIN event_source USING (source_id) "
                      "WHERE uri = %(u)s) p", {"u": big_uri}) == [(2, rows_big + 1, rows_big)]
    assert rows(conn, "SELECT events_read, complete FROM s3_object_load JOIN event_source "
                      "USING (source_id) WHERE uri = %s", (big_uri,)) == [(rows_big, True)]


# --------------------------------------------------------------------------- S3 faults
def test_unreachable_s3_endpoint_is_one_line_and_exit_1(db, s3_settings):
    closed = f"http://127.0.0.1:{localstack.free_port()}"
    env = subprocess_env(db, s3_settings, AWS_ENDPOINT_URL_S3=closed)
    result = subprocess.run([sys.executable, "pipeline.py", "-b", "lmnh-any", "--no-progress"],
                            cwd=PROJECT, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "run failed: cannot list bucket lmnh-any: S3 endpoint unreachable" in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def _seed_three(s3, bucket: str) -> list[bytes]:
    bodies = [sample_data.generate_kiosk_csv(300, seed=40 + i) for i in range(3)]
    for i, body in enumerate(bodies):
        put(s3, bucket, sample_data.kiosk_key(i), body)
    return bodies


def test_object_deleted_between_listing_and_reading_is_named_and_the_others_load(
        s3, bucket, service_env, conn, monkeypatch, capsys):
    bodies = _seed_three(s3, bucket)
    victim = sample_data.kiosk_key(1)
    real_open = extract.open_kiosk_object

    def delete_then_open(client, obj, *args, **kwargs):
        if obj.key == victim:
            s3.delete_object(Bucket=bucket, Key=victim)
        return real_open(client, obj, *args, **kwargs)

    monkeypatch.setattr(extract, "open_kiosk_object", delete_then_open)
    assert run("-b", bucket) == 1
    captured = capsys.readouterr()
    assert (f"FAILED {victim}: cannot read s3://{bucket}/{victim}: does not exist "
            "(deleted after listing?)") in captured.out
    assert "2 loaded, 0 skipped (unchanged), 1 failed" in captured.out
    assert f"cannot read s3://{bucket}/{victim}" in captured.err and "Traceback" not in captured.err
    for i in (0, 2):
        uri = f"s3://{bucket}/{sample_data.kiosk_key(i)}"
        assert stored_outcomes(conn, uri) == +sample_data.expected_reasons(bodies[i])
    # nothing of the deleted object, not even its provenance row
    assert scalar(conn, "SELECT count(*) FROM event_source WHERE uri LIKE %s", (f"%{victim}",)) == 0
    # with the object gone for good, a rerun is clean and adds nothing
    monkeypatch.setattr(extract, "open_kiosk_object", real_open)
    before = table_counts(conn)
    assert run("-b", bucket) == 0
    assert table_counts(conn) == before


def test_object_replaced_between_listing_and_reading_loads_the_version_read(
        s3, bucket, service_env, conn, monkeypatch, capsys):
    _seed_three(s3, bucket)
    victim = sample_data.kiosk_key(2)
    replacement = sample_data.generate_kiosk_csv(120, seed=77)
    real_open = extract.open_kiosk_object

    def replace_then_open(client, obj, *args, **kwargs):
        if obj.key == victim:
            put(s3, bucket, victim, replacement)
        return real_open(client, obj, *args, **kwargs)

    monkeypatch.setattr(extract, "open_kiosk_object", replace_then_open)
    assert run("-b", bucket) == 0
    monkeypatch.setattr(extract, "open_kiosk_object", real_open)
    uri = f"s3://{bucket}/{victim}"
    assert stored_outcomes(conn, uri) == +sample_data.expected_reasons(replacement)
    etag = s3.head_object(Bucket=bucket, Key=victim)["ETag"].strip('"')
    # the load record names the version that was read, so the next run knows it is done
    assert rows(conn, "SELECT etag, events_read FROM s3_object_load JOIN event_source "
                      "USING (source_id) WHERE uri = %s", (uri,)) == [(etag, 120)]
    capsys.readouterr()
    assert run("-b", bucket) == 0
    assert "0 loaded, 3 skipped (unchanged)" in capsys.readouterr().out


# --------------------------------------------------------------------------- corrupted objects
def _garbage(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


REJECT_REASONS = set(transform.REASONS) | set(transform.OWN_REASONS)
GOOD_ROW = b"2023-03-06 10:00:00,1,3,\n"
HUGE = 9 * 1024 * 1024  # beyond extract.CHUNK_BYTES: the line spans chunks
MIB = 1024 * 1024  # SPEC §3: a longer line is a malformed_row holding its first MiB

# name -> (body, header is right, outcomes of its corrupted lines (None: garbage, any reason),
#          its normal rows, which the reference classifier judges)
CORRUPTED: dict[str, tuple[bytes, bool, Counter, bytes]] = {
    "binary_garbage": (_garbage(64 * 1024, 1), False, None, b""),
    "binary_garbage_after_header": (HEADER + GOOD_ROW + _garbage(16 * 1024, 2) + b"\n" + GOOD_ROW,
                                    True, None, GOOD_ROW * 2),
    "wrong_header": (b"when,where,what,kind\n" + GOOD_ROW * 3, False,
                     Counter(bad_header=4), b""),
    "truncated_last_line": (HEADER + GOOD_ROW * 5 + b"2023-03-06 10:0", True,
                            Counter(malformed_row=1), GOOD_ROW * 5),
    "truncated_mid_fields": (HEADER + GOOD_ROW * 5 + b"2023-03-06 10:00:00,1,", True,
                             Counter(malformed_row=1), GOOD_ROW * 5),
    "utf8_bom_and_crlf": (b"\xef\xbb\xbfat,site,val,type\r\n" + GOOD_ROW.replace(b"\n", b"\r\n") * 4,
                          True, Counter(), GOOD_ROW * 4),
    "huge_lines": (HEADER + GOOD_ROW + b"x" * HUGE + b"\n" + b"2023-03-06 10:00:00,1,3,"
                   + b"y" * MIB + b"\n" + GOOD_ROW, True, Counter(malformed_row=2), GOOD_ROW * 2),
    "nul_bytes": (HEADER + b"2023-03-06 10:00:00,1\x00,3,\n\x00\x00\x00\n"
                  b"2023-03-06 10:00:00,1,3,\x00\n\x00at,site,val,type\n" + GOOD_ROW, True,
                  Counter(unknown_site=1, malformed_row=1, unexpected_type=1, invalid_at=1),
                  GOOD_ROW),
    "nul_bytes_under_a_wrong_header": (b"when,where,what,kind\n2023-03-06 10:00:00,1\x00,3,\n",
                                       False, Counter(bad_header=2), b""),
    "invalid_utf8": (HEADER + b"2023-03-06 10:00:00,1,3,\xff\xfe\n\xc3(,1,3,\n" + GOOD_ROW, True,
                     Counter(unexpected_type=1, invalid_at=1), GOOD_ROW),
    "cr_only_line_endings": (b'at,site,val,type\r2023-03-06 10:00:00,1,3,\r"2023-03-06 10:00:01",'
                             b"1,3,\r", True, Counter(),
                             b'2023-03-06 10:00:00,1,3,\n"2023-03-06 10:00:01",1,3,\n'),
    "bare_cr_mid_line": (HEADER + b"foo\rbar\n2023-03-06 10:00:00,1,3,x\ry\n" + GOOD_ROW, True,
                         Counter(malformed_row=3, unexpected_type=1), GOOD_ROW),
    "huge_quoted_field": (HEADER + b'2023-03-06 10:00:00,1,3,"' + b"z" * 200_000 + b'"\n' + GOOD_ROW,
                          True, None, GOOD_ROW),
    "empty_object": (b"", True, Counter(), b""),
    "header_only": (HEADER, True, Counter(), b""),
    "blank_lines_only": (b"\n\r\n  \n\n", False, Counter(), b""),
}


@pytest.mark.parametrize("case", list(CORRUPTED))
def test_corrupted_object_is_rejected_row_by_row_and_the_others_still_load(
        case, s3, bucket, service_env, conn, capsys):
    body, header_ok, extra, normal = CORRUPTED[case]
    good = [sample_data.generate_kiosk_csv(200, seed=50), sample_data.generate_kiosk_csv(200, seed=51)]
    put(s3, bucket, sample_data.kiosk_key(0), good[0])
    put(s3, bucket, sample_data.kiosk_key(1), body)
    put(s3, bucket, sample_data.kiosk_key(2), good[1])
    code = run("-b", bucket)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    uri = f"s3://{bucket}/{sample_data.kiosk_key(1)}"
    # the objects either side load exactly, whatever happened to the corrupted one
    for i, good_body in ((0, good[0]), (2, good[1])):
        assert stored_outcomes(conn, f"s3://{bucket}/{sample_data.kiosk_key(i)}") == \
            +sample_data.expected_reasons(good_body)
    landed = stored_outcomes(conn, uri)
    if code == 1:
        # an object-level error: named in the summary, nothing of the object stored
        assert f"FAILED {sample_data.kiosk_key(1)}:" in captured.out
        assert landed == Counter()
        return
    assert code == 0, captured.err
    # conservation: every line that is an event got exactly one outcome
    read = event_lines(body, header_ok)
    assert sum(landed.values()) == read
    assert rows(conn, "SELECT events_read, events_stored + events_rejected FROM s3_object_load "
                      "JOIN event_source USING (source_id) WHERE uri = %s", (uri,)) == [(read, read)]
    expected = sample_data.expected_reasons(HEADER + normal) if normal else Counter()
    if extra is None:   # garbage: each line rejected for a reason of SPEC's or the product's own
        assert +Counter(rating=landed["rating"], request=landed["request"]) == +Counter(
            rating=expected["rating"], request=expected["request"])
        assert set(landed) - {"rating", "request"} <= REJECT_REASONS
    else:
        assert landed == +(expected + extra)


def test_corrupted_rows_are_stored_as_they_were_read(s3, bucket, service_env, conn):
    """Rejected payloads keep the line: NUL and bytes that are not UTF-8 escaped; a line over
    1 MiB as its first MiB, its full length in the detail (SPEC §3)."""
    put(s3, bucket, sample_data.kiosk_key(0), CORRUPTED["nul_bytes"][0])
    put(s3, bucket, sample_data.kiosk_key(1), CORRUPTED["invalid_utf8"][0])
    put(s3, bucket, sample_data.kiosk_key(2), CORRUPTED["huge_lines"][0])
    assert run("-b", bucket) == 0
    payloads = dict(rows(conn, "SELECT uri || '#' || locator, payload FROM rejected_event "
                               "JOIN event_source USING (source_id)"))
    key = f"s3://{bucket}/lmnh_hist_data_"
    assert payloads[f"{key}0.csv#2"] == "2023-03-06 10:00:00,1\\x00,3,"
    assert payloads[f"{key}0.csv#3"] == "\\x00\\x00\\x00"
    assert payloads[f"{key}1.csv#2"] == "2023-03-06 10:00:00,1,3,\\xff\\xfe"
    assert payloads[f"{key}1.csv#3"] == "\\xc3(,1,3,"
    assert payloads[f"{key}2.csv#3"] == "x" * MIB
    assert payloads[f"{key}2.csv#4"] == "2023-03-06 10:00:00,1,3," + "y" * (MIB - 24)
    details = dict(rows(conn, "SELECT locator, detail FROM rejected_event WHERE source LIKE %s",
                        ("%2.csv",)))
    assert f"{HUGE} bytes" in details["3"] and f"{MIB + 24} bytes" in details["4"]
    assert reason_counts(conn)["malformed_row"] == 3


def test_kafka_payload_with_a_bare_carriage_return_is_a_rejection_not_a_poison_pill(
        kafka_settings, topic, service_env, conn):
    """A message is data whatever bytes it holds: if storing its rejection failed, the consumer
    would stop on it, and again after every restart, and the partition would never move on."""
    from confluent_kafka import Producer

    import consumer
    payloads = [b"kiosk\rreboot",                                                  # not JSON
                b'{"at": "2024-10-21T10:00:00+01:00",\r"site": "1", "val": 3}',   # JSON whitespace
                b'{"at": "2024-10-21T10:00:00+01:00", "site": "1\r", "val": 3}',  # raw CR in a string
                b'{"at": "2024-10-21T10:00:00+01:00", "site": "1", "val": 3}']
    producer = Producer(kafka_settings.client_config())
    for payload in payloads:
        producer.produce(topic, payload, partition=0)
    assert producer.flush(30) == 0
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = consumer.main(["--topic", topic, "--group", f"g-{uuid.uuid4().hex[:8]}",
                              "--stop-at-end"])
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert code == 0
    assert dict(rows(conn, "SELECT locator, payload FROM rejected_event")) == {
        "0:0": payloads[0].decode(), "0:2": payloads[2].decode()}
    assert reason_counts(conn) == {"malformed_json": 2}
    assert table_counts(conn)["rating_interaction"] == 2


# --------------------------------------------------------------------------- Kafka broker away
def test_consumer_waits_for_an_unreachable_broker_saying_so_once_and_stops_on_sigterm(
        service_env, tmp_path):
    """SPEC §4: an outage is ridden out "saying so in one log line per state change"."""
    env = {**os.environ, **service_env,
           "BOOTSTRAP_SERVERS": f"127.0.0.1:{localstack.free_port()}"}
    log_file = tmp_path / "consumer.log"
    proc = subprocess.Popen([sys.executable, "consumer.py", "--topic", "lmnh-away",
                             "--group", f"g-{uuid.uuid4().hex[:8]}", "--max-messages", "5",
                             "-l", "file", "--log-file", str(log_file)],
                            cwd=PROJECT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while "unreachable" not in (log_file.read_text() if log_file.exists() else ""):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the consumer never said the broker is away"
            time.sleep(0.1)
        time.sleep(3)
        assert proc.poll() is None, "the consumer gave up instead of waiting"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    text = log_file.read_text()
    assert "Traceback" not in text + out + err
    assert text.count("Kafka broker unreachable") == 1
    # about 3 s of outage: a handful of lines, not one per reconnect attempt
    noise = [line for line in text.splitlines() if "127.0.0.1" in line and "consuming" not in line]
    assert len(noise) <= 3, f"{len(noise)} log lines about the outage, e.g.:\n" + "\n".join(noise[:5])
