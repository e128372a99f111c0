"""schema.sql: applies twice cleanly, seeds the master data, makes impossible rows impossible."""
from __future__ import annotations

from datetime import date
from pathlib import Path

import psycopg2
import pytest

import load
from helpers import identity_values, rows, scalar
from transform import Exhibition

SCHEMA = (Path(__file__).resolve().parent.parent / "schema.sql").read_text()
MASTER = ("SELECT public_id, site, exhibition_name, department_name, floor_name, "
          "exhibition_start_date::text FROM exhibition_info ORDER BY public_id")


def test_schema_applies_again_without_changing_master_data(conn):
    before = rows(conn, MASTER), rows(conn, "SELECT * FROM rating ORDER BY rating_id"), \
        rows(conn, "SELECT * FROM request ORDER BY request_id")
    load.apply_schema(conn, SCHEMA)
    load.apply_schema(conn, SCHEMA)
    after = rows(conn, MASTER), rows(conn, "SELECT * FROM rating ORDER BY rating_id"), \
        rows(conn, "SELECT * FROM request ORDER BY request_id")
    assert after == before


def test_applying_schema_again_draws_no_identity_value(conn):
    """`psql -f schema.sql` re-runs the seed inserts: they must not consume SMALLINT keys."""
    drawn = identity_values(conn)
    assert drawn["department.department_id"] == 5 and drawn["exhibition.exhibition_id"] == 6
    load.apply_schema(conn, SCHEMA)
    load.apply_schema(conn, SCHEMA)
    assert identity_values(conn) == drawn


def test_seed_holds_the_six_real_exhibitions(conn):
    master = rows(conn, MASTER)
    assert [r[0] for r in master] == [f"EXH_0{i}" for i in range(6)]
    assert master[3] == ("EXH_03", 3, "Cetacean Sensations", "Zoology", "1", "2019-07-01")
    assert master[0][2] == "Measureless to Man"
    assert rows(conn, "SELECT rating_value, rating_description FROM rating ORDER BY 1") == [
        (0, "Terrible"), (1, "Bad"), (2, "Neutral"), (3, "Good"), (4, "Amazing")]
    assert rows(conn, "SELECT request_value, request_description FROM request ORDER BY 1") == [
        (0, "Assistance"), (1, "Emergency")]


def test_applying_schema_restores_edited_master_data(conn):
    with load.transaction(conn) as cur:
        cur.execute("UPDATE rating SET rating_description = 'Meh' WHERE rating_value = 2")
    load.apply_schema(conn, SCHEMA)
    assert scalar(conn, "SELECT rating_description FROM rating WHERE rating_value = 2") == "Neutral"


def test_applying_schema_keeps_an_exhibition_its_file_changed(conn):
    """The upgrade step (`psql -f schema.sql`) must not turn a file's rename back into the
    seed's name (SPEC §3: exhibitions belong to their files once one exists)."""
    renamed = Exhibition(public_id="EXH_01", site=1, name="Adaptation: Insects Now",
                         floor="2", department="Ecology", start_date=date(2024, 5, 1),
                         description="Rewritten by the exhibition's file")
    with load.transaction(conn) as cur:
        assert load.upsert_exhibition(cur, renamed) == "updated"
    before = rows(conn, MASTER)
    load.apply_schema(conn, SCHEMA)
    assert rows(conn, MASTER) == before
    assert rows(conn, "SELECT exhibition_name, exhibition_description FROM exhibition "
                      "WHERE public_id = 'EXH_01'") == [(renamed.name, renamed.description)]


def test_applying_schema_inserts_a_missing_seed_exhibition(conn):
    with load.transaction(conn) as cur:
        cur.execute("DELETE FROM exhibition WHERE public_id = 'EXH_04'")
    load.apply_schema(conn, SCHEMA)
    assert rows(conn, MASTER)[4] == ("EXH_04", 4, "Our Polluted World", "Ecology", "3",
                                     "2021-05-12")


def test_seed_views_exist(conn):
    views = {r[0] for r in rows(conn, "SELECT table_name FROM information_schema.views "
                                      "WHERE table_schema = 'public'")}
    assert {"exhibition_info", "request_info", "rating_info"} <= views


@pytest.mark.parametrize("statement", [
    # unknown exhibition
    "INSERT INTO rating_interaction (exhibition_id, rating_id, event_at, source_id, position) "
    "VALUES (999, 1, now(), {src}, 1)",
    # no timestamp
    "INSERT INTO rating_interaction (exhibition_id, rating_id, event_at, source_id, position) "
    "VALUES (1, 1, NULL, {src}, 1)",
    # the same event twice
    "INSERT INTO request_interaction (exhibition_id, request_id, event_at, source_id, position) "
    "VALUES (1, 1, now(), {src}, 7), (1, 1, now(), {src}, 7)",
    # an exhibition whose site disagrees with its id
    "INSERT INTO exhibition (exhibition_name, exhibition_description, department_id, floor_id, "
    "exhibition_start_date, public_id, site) VALUES ('x', 'y', 1, 1, '2020-01-01', 'EXH_09', 8)",
    # a rejection with no reason code
    "INSERT INTO rejected_event (source, locator, payload, reason, detail, source_id, position) "
    "VALUES ('s3://b/k', '2', 'x', '', 'd', {src}, 2)",
    # a load record that does not add up
    "INSERT INTO s3_object_load (source_id, etag, complete, events_read, events_stored, "
    "events_rejected) VALUES ({src}, 'e', true, 10, 5, 4)",
])
def test_impossible_rows_are_refused(conn, statement):
    with load.transaction(conn) as cur:
        src = load.source_id(cur, "s3", "s3://bucket/key.csv")
    with pytest.raises(psycopg2.IntegrityError):
        with load.transaction(conn) as cur:
            cur.execute(statement.format(src=src))


def test_interaction_keys_are_bigint(conn):
    types = dict(rows(conn, "SELECT table_name, data_type FROM information_schema.columns "
                            "WHERE column_name IN ('rating_interaction_id', "
                            "'request_interaction_id') AND table_name LIKE '%interaction'"))
    assert types == {"rating_interaction": "bigint", "request_interaction": "bigint"}


def stored_rating(conn) -> tuple[int, int]:
    """One rating stored through the loader's COPY path; returns (source_id, exhibition_id)."""
    master = load.read_master_data(conn.cursor())
    exhibition_id, rating_id = master.exhibitions[3], master.ratings[4]
    with load.transaction(conn) as cur:
        source = load.source_id(cur, "s3", "s3://b/lmnh_hist_data_0.csv")
        cur.execute("INSERT INTO rating_interaction (exhibition_id, rating_id, event_at, "
                    "source_id, position) VALUES (%s, %s, now(), %s, 2)",
                    (exhibition_id, rating_id, source))
    return source, exhibition_id


@pytest.mark.parametrize("table, key, value", [
    ("exhibition", "exhibition_id", "exhibition"), ("rating", "rating_id", "rating"),
    ("event_source", "source_id", "source")])
def test_a_master_or_source_row_that_events_use_cannot_be_deleted(conn, table, key, value):
    source, exhibition_id = stored_rating(conn)
    used = {"exhibition": exhibition_id, "source": source,
            "rating": scalar(conn, "SELECT rating_id FROM rating WHERE rating_value = 4")}[value]
    with pytest.raises(psycopg2.errors.ForeignKeyViolation, match="events still refer"), \
            load.transaction(conn) as cur:
        cur.execute(f"DELETE FROM {table} WHERE {key} = %s", (used,))  # noqa: S608 - fixed names
    assert scalar(conn, f"SELECT count(*) FROM {table} WHERE {key} = %s", (used,)) == 1  # noqa: S608


def test_a_master_row_no_event_uses_can_be_deleted(conn):
    stored_rating(conn)
    unused = scalar(conn, "SELECT exhibition_id FROM exhibition WHERE site = 5")
    with load.transaction(conn) as cur:
        cur.execute("DELETE FROM exhibition WHERE exhibition_id = %s", (unused,))
    assert scalar(conn, "SELECT count(*) FROM exhibition WHERE site = 5") == 0


@pytest.mark.parametrize("table", ["exhibition", "rating", "request", "event_source"])
def test_truncating_a_referenced_table_is_refused(conn, table):
    before = scalar(conn, f"SELECT count(*) FROM {table}")  # noqa: S608 - fixed table names
    stored_rating(conn)
    with pytest.raises(psycopg2.errors.ForeignKeyViolation, match="would orphan events"), \
            load.transaction(conn) as cur:
        cur.execute(f"TRUNCATE {table} CASCADE")  # noqa: S608 - fixed table names
    assert scalar(conn, f"SELECT count(*) FROM {table}") >= before  # noqa: S608
