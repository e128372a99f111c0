"""Upgrading a database an earlier release left, the way docs/operations.md says (SPEC §3).

For each release kept under tests/releases/<n>/ (its schema.sql and roles.sql as released, and
state.py writing rows the way its code did): a database built by that release, holding what it
loaded from a bucket and a topic, an exhibition renamed by its file; then the upgrade step
(`psql -f schema.sql`, `psql -f roles.sql`, as the master user) and the current pipeline.py and
consumer.py, logged in as lmnh_loader. Nothing it stored is reloaded or read again, nothing is
lost (the result equals a fresh load by the current release), and the rename stays. A future
release adds its own directory here when the next one is made.
"""
from __future__ import annotations

import importlib.util
import os
import secrets
import subprocess
import uuid
from pathlib import Path

import pytest

import load
import localstack
import pipeline
import sample_data
from helpers import produce_to_partition_0, rows, run_consumer_in_process, scalar, set_password

PROJECT = Path(__file__).resolve().parent.parent
RELEASES = Path(__file__).resolve().parent / "releases"
LOADER_SECRET = f"upgrade-{secrets.token_urlsafe(12)}"

RENAMED = {"EXHIBITION_NAME": "Adaptation: Insects Now", "EXHIBITION_ID": "EXH_01",
           "FLOOR": "Vault", "DEPARTMENT": "Entomology", "START_DATE": "01/07/19",
           "DESCRIPTION": "How insects keep pace with us, rewritten by the museum."}
RENAMED_ROW = {"name": RENAMED["EXHIBITION_NAME"], "description": RENAMED["DESCRIPTION"],
               "department": "Entomology", "floor": "Vault", "start_date": "2019-07-01",
               "public_id": "EXH_01", "site": 1}

# a kiosk object the earlier release loaded: line 1 is the header, positions are line numbers
LOADED_KEY = "lmnh_hist_data_0.csv"
LOADED_LINES = ["2024-03-01 10:00:00,1,3,", "2024-03-01 10:05:00,0,4,",
                "2024-03-01 11:00:00,2,-1,0.0", "2024-03-01 11:30:00,99,2,",
                "2024-03-01 20:00:00,3,1,"]
LOADED_OUTCOMES = [
    (2, "rating", 1, 3, "2024-03-01 10:00:00+00", None),
    (3, "rating", 0, 4, "2024-03-01 10:05:00+00", None),
    (4, "request", 2, 0, "2024-03-01 11:00:00+00", None),
    (5, "unknown_site", None, None, None, ("5", LOADED_LINES[3])),
    (6, "outside_opening_hours", None, None, None, ("6", LOADED_LINES[4])),
]
# one the earlier release never saw, put in the bucket after the upgrade
NEW_KEY = "lmnh_hist_data_1.csv"
NEW_LINES = ["2024-04-02 09:00:00,4,2,", "2024-04-02 17:59:00,5,-1,1.0", "2024-04-02 12:00:00,1,9,"]


def _message(second: int, site, val, type_=None) -> bytes:
    body = f'"at": "2024-06-03T10:00:{second:02d}.5+01:00", "site": "{site}", "val": {val}'
    return ("{" + body + (f', "type": {type_}' if type_ is not None else "") + "}").encode()


# ten messages on one partition; the earlier release stored the first six (next offset 6)
MESSAGES = [_message(0, 1, 4), _message(1, 5, 2), b"not json", _message(3, 3, -1, 0),
            _message(4, 99, 2), _message(5, 0, 0), _message(6, 1, 1), _message(7, 2, 7),
            _message(8, 4, -1, 0), _message(9, 2, 3)]
CONSUMED = [
    (0, "rating", 1, 4, "2024-06-03 09:00:00.5+00", None),
    (1, "rating", 5, 2, "2024-06-03 09:00:01.5+00", None),
    (2, "malformed_json", None, None, None, ("0:2", "not json")),
    (3, "request", 3, 0, "2024-06-03 09:00:03.5+00", None),
    (4, "unknown_site", None, None, None, ("0:4", MESSAGES[4].decode())),
    (5, "rating", 0, 0, "2024-06-03 09:00:05.5+00", None),
]

# what each table holds, in terms that do not depend on the database's key values
EVENTS = """
SELECT 'rating', s.uri, i.position, e.public_id, r.rating_value, (i.event_at AT TIME ZONE 'UTC')::text
FROM rating_interaction i JOIN event_source s USING (source_id)
JOIN exhibition e USING (exhibition_id) JOIN rating r USING (rating_id)
UNION ALL
SELECT 'request', s.uri, i.position, e.public_id, r.request_value, (i.event_at AT TIME ZONE 'UTC')::text
FROM request_interaction i JOIN event_source s USING (source_id)
JOIN exhibition e USING (exhibition_id) JOIN request r USING (request_id)
UNION ALL
SELECT j.reason, s.uri, j.position, j.source || ' ' || j.locator, NULL, j.payload
FROM rejected_event j JOIN event_source s USING (source_id)
ORDER BY 2, 3"""
KEPT = {  # rows an upgrade and the runs after it must leave exactly as they were
    "rating_interaction": "SELECT * FROM rating_interaction ORDER BY source_id, position",
    "request_interaction": "SELECT * FROM request_interaction ORDER BY source_id, position",
    "rejected_event": "SELECT * FROM rejected_event ORDER BY source_id, position",
    "event_source": "SELECT * FROM event_source ORDER BY source_id",
    "s3_object_load": "SELECT * FROM s3_object_load ORDER BY source_id",
}


def releases() -> list[str]:
    return sorted((p.name for p in RELEASES.iterdir() if (p / "schema.sql").is_file()), key=int)


def release_state(release: str):
    """tests/releases/<n>/state.py: how that release wrote its rows."""
    spec = importlib.util.spec_from_file_location(f"release_{release}_state",
                                                  RELEASES / release / "state.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def psql_file(db, path: Path) -> None:
    """What the upgrade step runs: psql as the master user, one transaction, stop on error."""
    argv = [str(localstack._pg_bin() / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-1",
            "-h", db.host, "-p", str(db.port), "-U", db.user, "-d", db.name, "-f", str(path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PGPASSWORD": db.password})
    assert done.returncode == 0, f"{path}: {done.stderr}"


def csv_object(lines: list[str]) -> bytes:
    return ("at,site,val,type\n" + "\n".join(lines) + "\n").encode()


@pytest.fixture
def old_database(tmp_path):
    """A PostgreSQL server of this test's own (roles are cluster-wide: another test's
    lmnh_loader password must not change under it), with an empty database."""
    state_dir = tmp_path / "stack"
    try:
        info = localstack.up(("postgres",), state_dir=state_dir)["postgres"]
        yield localstack.database_settings(info)
    finally:
        localstack.down(state_dir)


def build_release(release: str, db, s3, bucket: str, topic: str) -> None:
    """The database as release `release` left it after loading LOADED_KEY and six messages."""
    psql_file(db, RELEASES / release / "schema.sql")
    psql_file(db, RELEASES / release / "roles.sql")
    state = release_state(release)
    etag = s3.head_object(Bucket=bucket, Key=LOADED_KEY)["ETag"].strip('"')
    conn = load.connect(db)
    try:
        with load.transaction(conn) as cur:
            state.upsert_exhibition(cur, RENAMED_ROW)
        with load.transaction(conn) as cur:
            state.load_s3_object(cur, bucket, LOADED_KEY, etag, LOADED_OUTCOMES)
        with load.transaction(conn) as cur:
            state.consume(cur, topic, 0, CONSUMED)
    finally:
        conn.close()


def point_at(monkeypatch, db, user: str, password: str, s3_settings, kafka_settings) -> None:
    values = {"DB_HOST": db.host, "DB_PORT": str(db.port), "DB_NAME": db.name, "DB_USER": user,
              "DB_PASS": password, "AWS_ENDPOINT_URL_S3": s3_settings.endpoint_url,
              "AWS_ACCESS_KEY": s3_settings.access_key,
              "AWS_SECRET_ACCESS_KEY": s3_settings.secret_key,
              "BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers}
    for key, value in values.items():
        monkeypatch.setenv(key, value)


def run_both(bucket: str, topic: str, capsys) -> str:
    """The current batch run, then the current consumer to the end of the topic."""
    assert pipeline.main(["-b", bucket, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert run_consumer_in_process("--topic", topic, "--group", f"up-{uuid.uuid4().hex[:8]}",
                                   "--stop-at-end") == 0
    return out


def snapshot(db, queries: dict[str, str]) -> dict[str, list[tuple]]:
    conn = load.connect(db)
    try:
        return {name: rows(conn, query) for name, query in queries.items()}
    finally:
        conn.close()


@pytest.mark.parametrize("release", releases())
def test_upgrade_keeps_every_row_reads_nothing_twice_and_keeps_the_museums_rename(
        release, old_database, db, s3, s3_settings, bucket, kafka_settings, topic,
        monkeypatch, capsys):
    s3.put_object(Bucket=bucket, Key="lmnh_exhibition_adaptation.json",
                  Body=sample_data.exhibition_json(RENAMED))
    s3.put_object(Bucket=bucket, Key=LOADED_KEY, Body=csv_object(LOADED_LINES))
    produce_to_partition_0(kafka_settings, topic, MESSAGES)
    build_release(release, old_database, s3, bucket, topic)
    before = snapshot(old_database, KEPT)

    # the upgrade step (docs/operations.md, "Upgrades"), as the master user
    psql_file(old_database, PROJECT / "schema.sql")
    psql_file(old_database, PROJECT / "roles.sql")
    set_password(old_database, "lmnh_loader", LOADER_SECRET)
    admin = load.connect(old_database)
    try:
        assert scalar(admin, "SELECT exhibition_name FROM exhibition WHERE public_id = 'EXH_01'"
                      ) == RENAMED["EXHIBITION_NAME"]
    finally:
        admin.close()

    # the current release, logged in as the loader, on the bucket with one new object
    s3.put_object(Bucket=bucket, Key=NEW_KEY, Body=csv_object(NEW_LINES))
    point_at(monkeypatch, old_database, "lmnh_loader", LOADER_SECRET, s3_settings, kafka_settings)
    summary = run_both(bucket, topic, capsys)
    assert "kiosk objects   2 seen, 1 loaded, 1 skipped (unchanged), 0 failed" in summary

    after = snapshot(old_database, KEPT)
    for table, kept in before.items():  # nothing reloaded, re-keyed or re-worded
        assert set(kept) <= set(after[table]), table
    conn = load.connect(old_database)
    try:
        assert rows(conn, "SELECT partition, next_offset, topic_id IS NOT NULL, epoch "
                          "FROM kafka_offset") == [(0, len(MESSAGES), True, 0)]
        assert scalar(conn, "SELECT count(*) FROM event_source WHERE kind = 'kafka'") == 1
        assert scalar(conn, "SELECT exhibition_name FROM exhibition WHERE public_id = 'EXH_01'"
                      ) == RENAMED["EXHIBITION_NAME"]
        upgraded = rows(conn, EVENTS)
    finally:
        conn.close()

    # nothing lost and nothing read twice: exactly what a fresh load by this release stores
    point_at(monkeypatch, db, db.user, db.password, s3_settings, kafka_settings)
    run_both(bucket, topic, capsys)
    reference = snapshot(db, {"events": EVENTS})["events"]
    assert len(reference) == len(LOADED_LINES) + len(NEW_LINES) + len(MESSAGES)
    assert upgraded == reference


def test_every_release_directory_is_complete():
    """A release kept here has what the upgrade test needs to rebuild its database."""
    assert releases(), "no earlier release is kept under tests/releases"
    for release in releases():
        for name in ("schema.sql", "roles.sql", "state.py"):
            assert (RELEASES / release / name).is_file(), f"tests/releases/{release}/{name}"


def test_the_upgrade_step_the_test_runs_is_the_documented_one():
    """docs/operations.md's upgrade applies schema.sql then roles.sql with psql, as above."""
    text = (PROJECT / "docs" / "operations.md").read_text()
    upgrades = text.split("## Upgrades", 1)[1]
    schema = upgrades.index("psql -X -v ON_ERROR_STOP=1 -1 -f schema.sql")
    assert schema < upgrades.index("psql -X -v ON_ERROR_STOP=1 -1 -f roles.sql")
