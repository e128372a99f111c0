"""replay.py: stored rejections re-checked against the master data of now (SPEC §3.2).

Real services throughout: S3 objects loaded by pipeline.main, Kafka messages stored by the
consumer, master data changed the way docs/museum-changes.md says (an exhibition file in the
bucket, a VALUES row added to schema.sql and the file applied again), then replay.main.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import psycopg2
import pytest
from confluent_kafka import Producer
from test_security import ROLE_SECRET, apply_roles_with_passwords, psql

import load
import pipeline
import replay
import sample_data
import transform
from conftest import PROJECT, create_topic
from helpers import rows, run_consumer_in_process, scalar, table_counts

SCHEMA = (PROJECT / "schema.sql").read_text()
SIX_BUTTONS = SCHEMA.replace("(4, 'Amazing')", "(4, 'Amazing'), (5, 'Outstanding')")
EXH_06 = {"EXHIBITION_NAME": "Rock Pools", "EXHIBITION_ID": "EXH_06", "FLOOR": "2",
          "DEPARTMENT": "Marine Biology", "START_DATE": "01/10/24",
          "DESCRIPTION": "What the tide leaves behind."}
DAY = "2023-03-06"

# One kiosk object: line number -> (line, outcome before, with EXH_06, with EXH_06 and rating 5)
LINES = {
    2: (f"{DAY} 10:00:00,1,3,", "rating", "rating", "rating"),
    3: (f"{DAY} 10:00:01,6,3,", "unknown_site", "rating", "rating"),
    4: (f"{DAY} 10:00:02,6,5,", "unknown_site", "invalid_val", "rating"),
    5: (f"{DAY} 10:00:03,1,5,", "invalid_val", "invalid_val", "rating"),
    6: (f"{DAY} 10:00:04,6,-1,1.0", "unknown_site", "request", "request"),
    7: (f"{DAY} 10:00:05,1,-1,2.0", "invalid_type", "invalid_type", "invalid_type"),
    8: (f"{DAY} 10:00:06,7,3,", "unknown_site", "unknown_site", "unknown_site"),
    9: (f"{DAY} 07:00:00,6,3,", "outside_opening_hours", "outside_opening_hours",
        "outside_opening_hours"),
    10: ("not,a,row", "malformed_row", "malformed_row", "malformed_row"),
    11: (f"{DAY} 10:00:07,6,9,", "unknown_site", "invalid_val", "invalid_val"),
}
KIOSK_CSV = "at,site,val,type\n" + "\n".join(line for line, *_ in LINES.values()) + "\n"

EVENTS_SQL = """
SELECT s.uri, t.position, t.outcome FROM (
    SELECT source_id, position, 'rating' AS outcome FROM rating_interaction
    UNION ALL SELECT source_id, position, 'request' FROM request_interaction
    UNION ALL SELECT source_id, position, reason FROM rejected_event) t
JOIN event_source s USING (source_id)"""


def outcomes(conn) -> dict[tuple[str, int], str]:
    found = rows(conn, EVENTS_SQL)
    assert len(found) == len({(uri, p) for uri, p, _ in found}), "an event stored twice"
    return {(uri, position): outcome for uri, position, outcome in found}


def snapshot(conn) -> dict[str, list]:
    """Every row a replay may touch, identity columns included: equal means nothing written."""
    return {table: rows(conn, f"SELECT * FROM {table} ORDER BY source_id, position")  # noqa: S608
            for table in ("rating_interaction", "request_interaction", "rejected_event")} | {
        "s3_object_load": rows(conn, "SELECT * FROM s3_object_load ORDER BY source_id")}


def content(conn) -> dict[str, set]:
    """The tables as a reload would rebuild them: provenance and values, no surrogate keys."""
    return {
        "ratings": set(rows(conn, "SELECT source_id, position, exhibition_id, rating_id, event_at "
                                  "FROM rating_interaction")),
        "requests": set(rows(conn, "SELECT source_id, position, exhibition_id, request_id, "
                                   "event_at FROM request_interaction")),
        "rejected": set(rows(conn, "SELECT source, locator, payload, reason, detail, source_id, "
                                   "position FROM rejected_event")),
        "loads": set(rows(conn, "SELECT source_id, etag, complete, events_read, events_stored, "
                                "events_rejected FROM s3_object_load"))}


def assert_conserved(conn) -> None:
    """Each object's load record counts exactly the rows its source holds."""
    assert rows(conn, """
        SELECT l.source_id, l.events_read, l.events_stored, l.events_rejected,
               (SELECT count(*) FROM rating_interaction r WHERE r.source_id = l.source_id)
             + (SELECT count(*) FROM request_interaction q WHERE q.source_id = l.source_id),
               (SELECT count(*) FROM rejected_event x WHERE x.source_id = l.source_id)
        FROM s3_object_load l
        WHERE l.events_stored <> (SELECT count(*) FROM rating_interaction r
                                  WHERE r.source_id = l.source_id)
                                + (SELECT count(*) FROM request_interaction q
                                   WHERE q.source_id = l.source_id)
           OR l.events_rejected <> (SELECT count(*) FROM rejected_event x
                                    WHERE x.source_id = l.source_id)""") == []


def add_exhibition_file(s3, bucket: str, record: dict = EXH_06) -> None:
    """A new exhibition as the museum adds one: its file in the bucket, loaded by a batch run."""
    s3.put_object(Bucket=bucket, Key=f"lmnh_exhibition_{record['EXHIBITION_ID'].lower()}.json",
                  Body=sample_data.exhibition_json(record))
    assert pipeline.main(["-b", bucket, "--no-progress"]) == 0


def apply_schema_file(db, text: str, tmp_path) -> None:
    """schema.sql edited and applied with psql -f, as docs/museum-changes.md says (no reset)."""
    path = tmp_path / f"schema-{uuid.uuid4().hex[:6]}.sql"
    path.write_text(text)
    done = subprocess.run([psql(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", db.host, "-p",
                           str(db.port), "-U", db.user, "-d", db.name, "-f", str(path)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PGPASSWORD": db.password})
    assert done.returncode == 0, done.stderr


def expected(stage: int, uri: str) -> dict[tuple[str, int], str]:
    return {(uri, line): outcome[stage] for line, (_, *outcome) in LINES.items()}


def load_kiosk_object(s3, bucket: str, conn) -> str:
    s3.put_object(Bucket=bucket, Key="lmnh_hist_data_0.csv", Body=KIOSK_CSV.encode())
    assert pipeline.main(["-b", bucket, "--no-progress"]) == 0
    uri = f"s3://{bucket}/lmnh_hist_data_0.csv"
    assert outcomes(conn) == expected(0, uri)
    return uri


# --------------------------------------------------------------------------- S3 sources
def test_s3_replay_moves_events_to_their_position_and_reasons_change(
        s3, bucket, service_env, db, conn, tmp_path, capsys):
    uri = load_kiosk_object(s3, bucket, conn)
    source = scalar(conn, "SELECT source_id FROM event_source WHERE uri = %s", (uri,))
    add_exhibition_file(s3, bucket)
    capsys.readouterr()

    assert replay.main([]) == 0
    assert outcomes(conn) == expected(1, uri)
    out = capsys.readouterr().out
    assert "7 re-checked = 2 moved (1 ratings, 1 requests) + 5 still rejected (2 with a new " \
           "reason)" in out
    assert "now invalid_val" in out and "was unknown_site" in out
    assert rows(conn, "SELECT source_id, position, exhibition_id FROM rating_interaction "
                      "WHERE position = 3") == [
        (source, 3, scalar(conn, "SELECT exhibition_id FROM exhibition WHERE site = 6"))]
    assert rows(conn, "SELECT reason, detail, locator, payload FROM rejected_event "
                      "WHERE position = 4") == [
        ("invalid_val", "val '5' is neither -1 nor a known rating value", "4", LINES[4][0])]
    assert rows(conn, "SELECT events_read, events_stored, events_rejected FROM s3_object_load"
                ) == [(10, 3, 7)]
    assert_conserved(conn)

    before = outcomes(conn)
    apply_schema_file(db, SIX_BUTTONS, tmp_path)  # a sixth button: rating 5 "Outstanding"
    assert outcomes(conn) == before, "applying schema.sql again loses nothing"
    assert rows(conn, "SELECT rating_value, rating_description FROM rating ORDER BY 1")[-2:] == [
        (4, "Amazing"), (5, "Outstanding")]
    assert replay.main([]) == 0
    assert outcomes(conn) == expected(2, uri)
    assert rows(conn, "SELECT position, rating_description FROM rating_info ri "
                      "JOIN rating_interaction USING (rating_interaction_id) "
                      "WHERE rating_value = 5 ORDER BY 1") == [(4, "Outstanding"),
                                                              (5, "Outstanding")]
    assert rows(conn, "SELECT events_stored, events_rejected FROM s3_object_load") == [(5, 5)]
    assert_conserved(conn)


def test_replay_twice_changes_nothing_and_a_forced_reload_gives_the_same_tables(
        s3, bucket, service_env, db, conn, tmp_path, capsys):
    load_kiosk_object(s3, bucket, conn)
    add_exhibition_file(s3, bucket)
    apply_schema_file(db, SIX_BUTTONS, tmp_path)
    assert replay.main([]) == 0
    replayed = snapshot(conn)
    capsys.readouterr()

    assert replay.main([]) == 0
    assert snapshot(conn) == replayed
    assert "0 moved" in capsys.readouterr().out

    after_replay = content(conn)
    assert pipeline.main(["-b", bucket, "--no-progress", "--force"]) == 0
    assert content(conn) == after_replay


def test_dry_run_writes_nothing_and_reports_what_would_move(
        s3, bucket, service_env, conn, capsys):
    uri = load_kiosk_object(s3, bucket, conn)
    add_exhibition_file(s3, bucket)
    before = snapshot(conn)
    capsys.readouterr()

    assert replay.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("DRY RUN (nothing written)")
    assert "2 moved (1 ratings, 1 requests)" in out
    assert snapshot(conn) == before
    assert replay.main([]) == 0
    assert outcomes(conn) == expected(1, uri)


def test_reason_and_source_options_choose_what_is_replayed(
        s3, bucket, service_env, conn, monkeypatch, capsys):
    uri = load_kiosk_object(s3, bucket, conn)
    add_exhibition_file(s3, bucket)
    s3.put_object(Bucket=bucket, Key="lmnh_hist_data_1.csv", Body=KIOSK_CSV.encode())
    assert pipeline.main(["-b", bucket, "--no-progress"]) == 0
    other = f"s3://{bucket}/lmnh_hist_data_1.csv"
    assert outcomes(conn)[(other, 3)] == "rating"  # loaded after EXH_06: valid at once

    assert replay.main(["--reason", "invalid_type", "--source", uri]) == 0
    assert outcomes(conn)[(uri, 3)] == "unknown_site"  # not a chosen reason
    # opening hours changed: outside_opening_hours is replayed only when asked for
    monkeypatch.setenv("OPENING_TIME", "07:00")
    assert replay.main(["--source", uri]) == 0
    assert outcomes(conn)[(uri, 9)] == "outside_opening_hours"
    assert replay.main(["--reason", "outside_opening_hours", "--source", uri]) == 0
    assert outcomes(conn)[(uri, 9)] == "rating"
    assert outcomes(conn)[(other, 9)] == "outside_opening_hours"  # another source
    assert_conserved(conn)


def test_future_event_is_judged_against_the_original_rejection_time(
        s3, bucket, service_env, conn):
    s3.put_object(Bucket=bucket, Key="lmnh_hist_data_0.csv",
                  Body=b"at,site,val,type\n2023-03-06 10:00:00,6,3,\n2023-03-06 10:00:00,6,3,\n")
    assert pipeline.main(["-b", bucket, "--no-progress"]) == 0
    with load.transaction(conn) as cur:  # as if rejected before it happened
        cur.execute("UPDATE rejected_event SET rejected_at = '2023-03-06 09:00:00+00' "
                    "WHERE position = 2")
    add_exhibition_file(s3, bucket)
    assert replay.main([]) == 0
    assert rows(conn, "SELECT position, reason FROM rejected_event") == [(2, "future_event")]
    assert rows(conn, "SELECT position FROM rating_interaction") == [(3,)]


# --------------------------------------------------------------------------- Kafka sources
def message(site, val, typ=None, second: int = 0) -> bytes:
    fields = {"at": f"2024-10-21T10:00:{second:02d}.000000+01:00", "site": site, "val": val}
    if typ is not None:
        fields["type"] = typ
    return json.dumps(fields).encode()


def produce(kafka, topic: str, payloads: list[bytes], partitions: int = 1,
            rate: float | None = None) -> dict[tuple[int, int], bytes]:
    """(partition, offset) -> payload, from the broker's delivery reports."""
    placed: dict[tuple[int, int], bytes] = {}
    producer = Producer({**kafka.client_config(), "linger.ms": 5})

    def delivered(err, msg):
        assert err is None, err
        placed[(msg.partition(), msg.offset())] = msg.value()

    for i, payload in enumerate(payloads):
        if rate:
            time.sleep(1 / rate)
            producer.poll(0)
        producer.produce(topic, payload, partition=i % partitions, on_delivery=delivered)
    assert producer.flush(30) == 0
    return placed


def kafka_outcomes(conn, topic: str) -> dict[tuple[int, int], str]:
    found = rows(conn, """
        SELECT o.partition, t.position, t.outcome FROM (
            SELECT source_id, position, 'rating' AS outcome FROM rating_interaction
            UNION ALL SELECT source_id, position, 'request' FROM request_interaction
            UNION ALL SELECT source_id, position, reason FROM rejected_event) t
        JOIN kafka_offset o USING (source_id) WHERE o.topic = %s""", (topic,))
    assert len(found) == len({(p, o) for p, o, _ in found}), "an event stored twice"
    return {(p, o): outcome for p, o, outcome in found}


def classified(placed, sites=range(7), ratings=range(6)) -> dict[tuple[int, int], str]:
    return {pos: sample_data.classify_message(payload, known_sites=sites, ratings=ratings)
            for pos, payload in placed.items()}


def add_exhibition(conn, record: dict = EXH_06) -> None:
    with load.transaction(conn) as cur:
        load.upsert_exhibition(cur, transform.parse_exhibition(sample_data.exhibition_json(record)))


def add_sixth_button(conn) -> None:
    load.apply_schema(conn, SIX_BUTTONS)


STREAM = [message("6", 3), message("6", 5), message("1", 5), message("6", -1, 0),
          message("7", 3), message("1", -1, 2), message("6", 9), b"not json", message("2", 4),
          message("6", "INF")]


def test_kafka_replay_moves_messages_to_their_partition_and_offset(
        kafka_settings, service_env, conn, capsys):
    topic2 = create_topic(kafka_settings, 2)
    placed = produce(kafka_settings, topic2, STREAM * 3, partitions=2)
    assert run_consumer_in_process("--topic", topic2, "--group", f"g-{uuid.uuid4().hex[:8]}",
                                   "--stop-at-end") == 0
    assert kafka_outcomes(conn, topic2) == classified(placed, range(6), range(5))
    positions = {(p, o) for p, o, *_ in rows(conn, """
        SELECT o.partition, x.position FROM rejected_event x JOIN kafka_offset o USING (source_id)
        WHERE x.reason = 'unknown_site'""")}

    add_exhibition(conn)
    add_sixth_button(conn)
    assert replay.main(["--source", f"kafka://{topic2}"]) == 0
    assert kafka_outcomes(conn, topic2) == classified(placed)
    moved = rows(conn, """
        SELECT o.partition, r.position FROM rating_interaction r JOIN kafka_offset o
        USING (source_id) JOIN exhibition e USING (exhibition_id) WHERE e.site = 6""")
    assert {tuple(m) for m in moved} <= positions
    # locators still say partition:offset of the message they came from
    assert all(loc == f"{p}:{o}" for loc, p, o in rows(conn, """
        SELECT x.locator, k.partition, x.position FROM rejected_event x
        JOIN kafka_offset k USING (source_id)"""))
    assert "sources         2 with such rejections, 2 changed" in capsys.readouterr().out


def test_replay_beside_a_running_consumer_loses_and_duplicates_nothing(
        kafka_settings, topic, service_env, conn, tmp_path):
    first = produce(kafka_settings, topic, STREAM * 20)
    log_path = tmp_path / "consumer.log"
    total = len(STREAM) * 60  # 20 before the master data changes, 40 during the replays
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, str(PROJECT / "consumer.py"), "--topic", topic,
                                 "--group", f"g-{uuid.uuid4().hex[:8]}", "--max-messages",
                                 str(total)], cwd=PROJECT, stdout=log_file,
                                stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 60
        while scalar(conn, "SELECT coalesce(sum(next_offset), 0) FROM kafka_offset") < len(first):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        add_exhibition(conn)
        add_sixth_button(conn)
        placed = dict(first)
        live = threading.Thread(target=lambda: placed.update(
            produce(kafka_settings, topic, STREAM * 40, rate=200)))
        live.start()  # a live stream for ~2 s, which the consumer stores while replays run
        replays = 0
        while live.is_alive() or replays < 3:
            started = time.monotonic()
            assert replay.main(["--source", f"kafka://{topic}"]) == 0
            assert time.monotonic() - started < 10, "the replay waited for the consumer"
            replays += 1
        live.join()
        assert proc.wait(timeout=60) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert replay.main([]) == 0
    assert kafka_outcomes(conn, topic) == classified(placed)


# --------------------------------------------------------------------------- interruption
def test_replay_killed_mid_source_leaves_it_untouched_and_a_rerun_finishes(
        s3, bucket, service_env, db, conn, tmp_path):
    body = "at,site,val,type\n" + "".join(f"{DAY} 10:{i // 60 % 60:02d}:{i % 60:02d},6,3,\n"
                                          for i in range(3000))
    s3.put_object(Bucket=bucket, Key="lmnh_hist_data_0.csv", Body=body.encode())
    assert pipeline.main(["-b", bucket, "--no-progress"]) == 0
    add_exhibition_file(s3, bucket)
    before = snapshot(conn)
    assert table_counts(conn)["rejected_event"] == 3000

    holder = load.connect(db)  # holds one late row, so the replay stops mid-way on it
    with holder.cursor() as cur:
        cur.execute("SELECT 1 FROM rejected_event WHERE position = 2800 FOR UPDATE")
    log_path = tmp_path / "replay.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, str(PROJECT / "replay.py"), "--page-rows", "250",
                                 "-v"], cwd=PROJECT, stdout=log_file, stderr=subprocess.STDOUT,
                                env=os.environ.copy())
    try:
        deadline = time.monotonic() + 60
        while "re-checked up to position 2751" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        while not scalar(conn, "SELECT count(*) FROM pg_stat_activity "
                               "WHERE datname = current_database() AND wait_event_type = 'Lock'"):
            assert time.monotonic() < deadline, "the replay never reached the held row"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)  # 11 pages moved, uncommitted
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        holder.rollback()
        holder.close()
    assert snapshot(conn) == before
    assert_conserved(conn)

    assert replay.main([]) == 0
    assert table_counts(conn) == {"rating_interaction": 3000, "request_interaction": 0,
                                  "rejected_event": 0}
    assert rows(conn, "SELECT events_read, events_stored, events_rejected FROM s3_object_load"
                ) == [(3000, 3000, 0)]


def test_a_row_held_by_another_session_is_one_line_exit_1_and_nothing_moved(
        s3, bucket, service_env, db, conn, capsys):
    uri = load_kiosk_object(s3, bucket, conn)
    add_exhibition_file(s3, bucket)
    before = snapshot(conn)
    holder = load.connect(db)
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT 1 FROM rejected_event WHERE position = 3 FOR UPDATE")
        capsys.readouterr()
        assert replay.main([]) == 1  # after the session's lock timeout, not forever
    finally:
        holder.rollback()
        holder.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gave up waiting" in err[0] and "rolled back" in err[0]
    assert snapshot(conn) == before
    assert replay.main([]) == 0
    assert outcomes(conn) == expected(1, uri)


# --------------------------------------------------------------------------- roles and CLI
def test_the_loader_role_may_replay(s3, bucket, service_env, db, conn, monkeypatch):
    """roles.sql grants UPDATE (reason, detail) on rejected_event: without it a rejection whose
    reason changes cannot be re-worded."""
    uri = load_kiosk_object(s3, bucket, conn)
    add_exhibition_file(s3, bucket)
    apply_roles_with_passwords(db)
    monkeypatch.setenv("DB_USER", "lmnh_loader")
    monkeypatch.setenv("DB_PASS", ROLE_SECRET)
    assert replay.main([]) == 0
    assert outcomes(conn) == expected(1, uri)
    loader = psycopg2.connect(host=db.host, port=db.port, dbname=db.name, user="lmnh_loader",
                              password=ROLE_SECRET)
    try:
        with pytest.raises(psycopg2.errors.InsufficientPrivilege), loader.cursor() as cur:
            cur.execute("UPDATE rejected_event SET payload = 'x'")
    finally:
        loader.close()


def test_unknown_source_is_one_line_and_exit_1(service_env, conn, capsys):
    assert replay.main(["--source", "s3://nowhere/x.csv"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no event source is 's3://nowhere/x.csv'" in err[0]


def test_bad_setting_is_one_line_and_exit_2(service_env, monkeypatch, capsys):
    monkeypatch.setenv("DB_PORT", "not-a-port")
    assert replay.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DB_PORT" in err[0]


def test_help_names_the_options_and_refuses_a_reason_it_cannot_decide(capsys):
    with pytest.raises(SystemExit) as exit_:
        replay.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--reason", "--source", "--dry-run", "-l {console,file}"):
        assert flag in out
    for reason in ("bad_header", "malformed_row"):
        with pytest.raises(SystemExit) as exit_:
            replay.main(["--reason", reason])
        assert exit_.value.code == 2
