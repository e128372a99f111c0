"""load.py against a real PostgreSQL: what COPY writes is exactly what the frames held.

Why: events go in as hand-built binary COPY (no SQL per row, no timestamp formatted as text),
so one wrong byte offset or epoch shifts every instant or key silently; rejections carry
arbitrary text that must land verbatim and never be executed; provenance (sources, load
records, Kafka offsets) is what makes re-runs idempotent, so each of those round trips is
pinned here.
"""
from __future__ import annotations

import csv
import io
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime

import pandas as pd
import psycopg2
import psycopg2.errors
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import load
import transform
from helpers import identity_values, rows, scalar, table_counts
from transform import Exhibition

INSTANTS = [
    "2024-10-21T08:21:24.254719Z",
    "2000-01-01T00:00:00Z",              # the PostgreSQL epoch itself
    "1999-12-31T23:59:59.999999Z",       # just before it: a negative binary value
    "1970-01-01T00:00:00.000001Z",
    "1969-07-20T20:17:40.123456Z",       # before the Unix epoch
    "2024-03-31T00:59:59.999999Z",       # last GMT microsecond before the clocks go forward
    "2024-03-31T01:00:00Z",              # first BST instant
    "2024-10-27T00:59:59.999999Z",       # last BST microsecond
    "2024-10-27T01:00:00.000001Z",       # the repeated hour, second time round
    "2099-06-15T09:00:00.5Z",
]


def master(conn) -> transform.MasterData:
    with conn.cursor() as cur:
        data = load.read_master_data(cur)
    conn.rollback()
    return data


def new_source(conn, uri: str, kind: str = "s3") -> int:
    with load.transaction(conn) as cur:
        return load.source_id(cur, kind, uri)


def interaction_frame(ids: list[int], kinds: list[int], instants: list[str],
                      positions: list[int], kind_column: str) -> pd.DataFrame:
    return pd.DataFrame({"position": pd.Series(positions, dtype="int64"),
                         "exhibition_id": pd.Series(ids, dtype="int64"),
                         kind_column: pd.Series(kinds, dtype="int64"),
                         "event_at": pd.to_datetime(instants, utc=True, format="ISO8601")})


def utc_text(conn, table: str) -> list[tuple]:
    return rows(conn, "SELECT position, to_char(event_at AT TIME ZONE 'UTC', "
                      "'YYYY-MM-DD\"T\"HH24:MI:SS.US') FROM " + table + " ORDER BY position")


# --------------------------------------------------------------------------- binary COPY
def test_ratings_round_trip_through_binary_copy(conn):
    known = master(conn)
    exhibitions = sorted(known.exhibitions.values())
    ratings = sorted(known.ratings.values())
    n = len(INSTANTS)
    ids = [exhibitions[i % len(exhibitions)] for i in range(n)]
    kinds = [ratings[(i * 3) % len(ratings)] for i in range(n)]
    positions = [0, 1, 2, 7, 99, 2**31 + 5, 2**40, 12, 13, 14]
    frame = interaction_frame(ids, kinds, INSTANTS, positions, "rating_id")
    source = new_source(conn, "s3://b/lmnh_hist_data_0.csv")
    with load.transaction(conn) as cur:
        assert load.copy_ratings(cur, frame, source) == n
    got = rows(conn, "SELECT position, exhibition_id, rating_id, event_at, source_id "
                     "FROM rating_interaction ORDER BY position")
    expected = sorted(zip(positions, ids, kinds,
                          [ts.to_pydatetime() for ts in frame["event_at"]], [source] * n))
    assert got == expected
    # and to the microsecond, as text in UTC
    assert utc_text(conn, "rating_interaction") == sorted(
        (p, pd.Timestamp(t).strftime("%Y-%m-%dT%H:%M:%S.%f")) for p, t in zip(positions, INSTANTS))


@pytest.mark.parametrize("unit", ["ns", "us", "s"])
def test_requests_round_trip_whatever_the_timestamp_unit(conn, unit):
    known = master(conn)
    frame = interaction_frame([known.exhibitions[5], known.exhibitions[0]],
                              [known.requests[1], known.requests[0]],
                              ["2024-10-21T08:00:00Z", "1999-12-31T23:59:59Z"], [3, 4],
                              "request_id")
    frame["event_at"] = frame["event_at"].dt.as_unit(unit)
    source = new_source(conn, "kafka://lmnh/0", "kafka")
    with load.transaction(conn) as cur:
        assert load.copy_requests(cur, frame, source) == 2
    assert rows(conn, "SELECT position, exhibition_id, request_id, event_at, source_id "
                      "FROM request_interaction ORDER BY position") == [
        (3, known.exhibitions[5], known.requests[1], datetime(2024, 10, 21, 8, tzinfo=UTC), source),
        (4, known.exhibitions[0], known.requests[0],
         datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC), source)]


def test_empty_frames_copy_nothing(conn):
    source = new_source(conn, "s3://b/empty.csv")
    empty = interaction_frame([], [], [], [], "rating_id")
    with load.transaction(conn) as cur:
        assert load.copy_ratings(cur, empty, source) == 0
        assert load.copy_requests(cur, empty.rename(columns={"rating_id": "request_id"}),
                                  source) == 0
        assert load.copy_rejections(cur, transform.empty_rejections(), "s3://b/empty.csv",
                                    source) == 0
    assert table_counts(conn) == {"rating_interaction": 0, "request_interaction": 0,
                                  "rejected_event": 0}


def test_transform_output_lands_as_validated(conn):
    """The frames validate_events makes are the frames the COPY functions take."""
    known = master(conn)
    lines = ["2024-03-31 09:00:00,3,4,", "2024-10-27 18:15:00,0,-1,1.0", "2024-07-01 10:00:00,9,1,"]
    parsed = transform.parse_csv_lines(lines, 2)
    outcome = transform.validate_events(parsed.events, known, transform.Rules(),
                                        datetime(2025, 1, 1, tzinfo=UTC))
    source = new_source(conn, "s3://b/lmnh_hist_data_1.csv")
    with load.transaction(conn) as cur:
        load.copy_ratings(cur, outcome.ratings, source)
        load.copy_requests(cur, outcome.requests, source)
        load.copy_rejections(cur, outcome.rejections, "s3://b/lmnh_hist_data_1.csv", source)
    assert rows(conn, "SELECT public_id, rating_value, event_at FROM rating_info") == [
        ("EXH_03", 4, datetime(2024, 3, 31, 8, tzinfo=UTC))]
    assert rows(conn, "SELECT public_id, request_value, event_at FROM request_info") == [
        ("EXH_00", 1, datetime(2024, 10, 27, 18, 15, tzinfo=UTC))]
    assert rows(conn, "SELECT source, locator, payload, reason FROM rejected_event") == [
        ("s3://b/lmnh_hist_data_1.csv", "4", "2024-07-01 10:00:00,9,1,", "unknown_site")]


def test_an_unknown_exhibition_or_rating_key_is_refused(conn):
    """The COPY bypasses no integrity: a key that is not in master data fails the statement."""
    known = master(conn)
    source = new_source(conn, "s3://b/k.csv")
    for exhibition_id, rating_id in ((999, known.ratings[0]), (known.exhibitions[0], 999)):
        frame = interaction_frame([exhibition_id], [rating_id], ["2024-10-21T08:00:00Z"], [2],
                                  "rating_id")
        with pytest.raises(psycopg2.errors.ForeignKeyViolation), \
                load.transaction(conn) as cur:
            load.copy_ratings(cur, frame, source)
    frame = interaction_frame([known.exhibitions[0]], [known.ratings[0]],
                              ["2024-10-21T08:00:00Z"], [2], "rating_id")
    with pytest.raises(psycopg2.errors.ForeignKeyViolation), load.transaction(conn) as cur:
        load.copy_ratings(cur, frame, source + 1000)
    assert table_counts(conn)["rating_interaction"] == 0


def test_keys_around_a_gap_in_master_data_are_checked_one_by_one(conn):
    """The reference check's quick path (every key in the new rows' range exists) must not let
    a key through when the range has a hole: then each distinct key is looked up."""
    known = master(conn)
    ids = sorted(known.exhibitions.values())
    hole = ids[2]
    with load.transaction(conn) as cur:
        cur.execute("DELETE FROM exhibition WHERE exhibition_id = %s", (hole,))
    source = new_source(conn, "s3://b/k.csv")
    rating = known.ratings[0]
    around = interaction_frame([ids[1], ids[3]] * 500, [rating] * 1000,
                               ["2024-10-21T08:00:00Z"] * 1000, list(range(2, 1002)), "rating_id")
    with load.transaction(conn) as cur:
        assert load.copy_ratings(cur, around, source) == 1000
    inside = interaction_frame([ids[1], hole, ids[3]], [rating] * 3,
                               ["2024-10-21T08:00:00Z"] * 3, [2000, 2001, 2002], "rating_id")
    with pytest.raises(psycopg2.errors.ForeignKeyViolation, match=f"exhibition_id {hole} "), \
            load.transaction(conn) as cur:
        load.copy_ratings(cur, inside, source)
    assert table_counts(conn)["rating_interaction"] == 1000


def test_the_same_position_cannot_land_twice(conn):
    known = master(conn)
    frame = interaction_frame([known.exhibitions[1]], [known.ratings[2]],
                              ["2024-10-21T08:00:00Z"], [5], "rating_id")
    source = new_source(conn, "s3://b/k.csv")
    with load.transaction(conn) as cur:
        load.copy_ratings(cur, frame, source)
    with pytest.raises(psycopg2.errors.UniqueViolation), load.transaction(conn) as cur:
        load.copy_ratings(cur, frame, source)
    assert table_counts(conn)["rating_interaction"] == 1


# --------------------------------------------------------------------------- rejections
PAYLOADS = [
    "2023-03-06 09:00:00,1,ERR,",
    'a "quoted" value, with "" doubled quotes',
    "line one\nline two\r\nline three",
    "tab\there\tand\\back\\slashes\\N and \\.",
    "a\n\\.\nb",                         # COPY's end-of-data marker on a line of its own
    "\\.",
    "\\N",
    "NULL",
    "",
    "   ",
    "caf\u00e9 \u2603 \U0001f995 \u202e",
    "'); DROP TABLE rating_interaction; --",
    "\"; DELETE FROM rejected_event; --",
    '{"at": "2024-10-21T09:21:24.254719+01:00", "site": "ERR", "val": 4}',
    "\\xff\\xfe escaped bytes \\x00",
    "x" * 100_000,
]


def test_rejections_are_stored_verbatim(conn):
    frame = pd.DataFrame({
        "position": pd.Series(range(len(PAYLOADS)), dtype="int64"),
        "locator": [f"3:{i}" for i in range(len(PAYLOADS))],
        "payload": PAYLOADS,
        "reason": ["invalid_val"] * len(PAYLOADS),
        "detail": [f"val {p[:30]!r}, 'detail' with \"quotes\",\n and a newline" for p in PAYLOADS],
    })
    source = new_source(conn, "kafka://lmnh/3", "kafka")
    with load.transaction(conn) as cur:
        assert load.copy_rejections(cur, frame, "kafka://lmnh", source) == len(PAYLOADS)
    got = rows(conn, "SELECT position, source, locator, payload, reason, detail, source_id, "
                     "rejected_at IS NOT NULL FROM rejected_event ORDER BY position")
    assert got == [(i, "kafka://lmnh", f"3:{i}", p, "invalid_val", d, source, True)
                   for i, (p, d) in enumerate(zip(PAYLOADS, frame["detail"]))]
    assert scalar(conn, "SELECT count(*) FROM rejected_event WHERE payload IS NULL") == 0
    tables = {r[0] for r in rows(conn, "SELECT table_name FROM information_schema.tables "
                                       "WHERE table_schema = 'public'")}
    assert set(load.REQUIRED_TABLES) <= tables
    assert load.missing_tables(conn) == []



@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='",\r\nxé'), st.lists(st.tuples(
    st.text(), st.text(alphabet='",\r\n\\ xé\x00'), st.integers().map(str)), max_size=20))
def test_rejection_rows_are_the_csv_module_s(first, rows_in):
    """csv_rows builds the rejections' COPY data a column at a time; every byte must be what
    csv.writer(QUOTE_ALL) writes, the format the COPY statement reads."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_ALL).writerows(
        (first, *row) for row in rows_in)
    columns = [list(column) for column in zip(*rows_in)] or [[]]
    assert load.csv_rows(first, columns) == buffer.getvalue()

def test_rejection_source_text_is_stored_as_given(conn):
    uri = "s3://sigma-resources-museum/lmnh_hist_data_0.csv"
    frame = pd.DataFrame({"position": pd.Series([9], dtype="int64"), "locator": ["9"],
                          "payload": ["x,y"], "reason": ["malformed_row"],
                          "detail": ["expected 4 comma-separated fields"]})
    source = new_source(conn, uri)
    with load.transaction(conn) as cur:
        load.copy_rejections(cur, frame, uri, source)
    assert rows(conn, "SELECT source, locator, payload FROM rejected_event") == [
        (uri, "9", "x,y")]


# --------------------------------------------------------------------------- provenance
def _fill(conn, source: int, uri: str, first: int) -> None:
    known = master(conn)
    ratings = interaction_frame([known.exhibitions[0]] * 3, [known.ratings[1]] * 3,
                                ["2024-10-21T08:00:00Z"] * 3, [first, first + 1, first + 2],
                                "rating_id")
    requests = interaction_frame([known.exhibitions[2]], [known.requests[0]],
                                 ["2024-10-21T09:00:00Z"], [first + 3], "request_id")
    rejections = pd.DataFrame({"position": pd.Series([first + 4, first + 5], dtype="int64"),
                               "locator": [str(first + 4), str(first + 5)], "payload": ["a", "b"],
                               "reason": ["missing_at", "invalid_at"], "detail": ["x", "y"]})
    with load.transaction(conn) as cur:
        load.copy_ratings(cur, ratings, source)
        load.copy_requests(cur, requests, source)
        load.copy_rejections(cur, rejections, uri, source)


def test_delete_source_rows_removes_only_that_source(conn):
    a = new_source(conn, "s3://b/lmnh_hist_data_0.csv")
    b = new_source(conn, "s3://b/lmnh_hist_data_1.csv")
    _fill(conn, a, "s3://b/lmnh_hist_data_0.csv", 2)
    _fill(conn, b, "s3://b/lmnh_hist_data_1.csv", 2)
    with load.transaction(conn) as cur:
        assert load.delete_source_rows(cur, a) == 6
    for table in ("rating_interaction", "request_interaction", "rejected_event"):
        assert rows(conn, f"SELECT DISTINCT source_id FROM {table}") == [(b,)]
    assert table_counts(conn) == {"rating_interaction": 3, "request_interaction": 1,
                                  "rejected_event": 2}
    with load.transaction(conn) as cur:
        assert load.delete_source_rows(cur, a) == 0


def test_source_id_is_stable_per_uri(conn):
    first = new_source(conn, "s3://b/k.csv")
    assert new_source(conn, "s3://b/k.csv") == first
    assert new_source(conn, "s3://b/other.csv") != first
    assert scalar(conn, "SELECT count(*) FROM event_source") == 2


def tally(read: int, stored: int, rejected: int) -> transform.Tally:
    return transform.Tally(read=read, ratings=stored, rejected=Counter(invalid_val=rejected))


def test_object_load_record_round_trip(conn):
    source = new_source(conn, "s3://b/lmnh_hist_data_0.csv")
    other = new_source(conn, "s3://b/lmnh_hist_data_1.csv")
    with load.transaction(conn) as cur:
        assert load.loaded_etag(cur, source) is None
        load.record_object_load(cur, source, load.LoadRecord("etag-1", False), tally(10, 7, 3))
    with load.transaction(conn) as cur:
        assert load.loaded_etag(cur, source) == ("etag-1", False)
        load.record_object_load(cur, source, load.LoadRecord("etag-2", True), tally(535, 520, 15))
    with load.transaction(conn) as cur:
        assert load.loaded_etag(cur, source) == ("etag-2", True)
        assert load.loaded_etag(cur, other) is None
        assert load.loaded_objects(cur, ["s3://b/lmnh_hist_data_0.csv",
                                         "s3://b/lmnh_hist_data_1.csv", "s3://b/none"]) == {
            "s3://b/lmnh_hist_data_0.csv": ("etag-2", True)}
    assert rows(conn, "SELECT events_read, events_stored, events_rejected FROM s3_object_load") \
        == [(535, 520, 15)]


def test_a_load_record_that_does_not_add_up_is_refused(conn):
    source = new_source(conn, "s3://b/k.csv")
    with pytest.raises(psycopg2.errors.CheckViolation), load.transaction(conn) as cur:
        load.record_object_load(cur, source, load.LoadRecord("e", True), tally(10, 7, 2))
    with load.transaction(conn) as cur:
        assert load.loaded_etag(cur, source) is None


def test_transaction_rolls_back_everything_on_error(conn):
    source = new_source(conn, "s3://b/k.csv")
    known = master(conn)
    frame = interaction_frame([known.exhibitions[0]], [known.ratings[0]],
                              ["2024-10-21T08:00:00Z"], [2], "rating_id")
    with pytest.raises(RuntimeError), load.transaction(conn) as cur:
        load.copy_ratings(cur, frame, source)
        load.record_object_load(cur, source, load.LoadRecord("e", True), tally(1, 1, 0))
        raise RuntimeError("crash after the rows, before the commit")
    assert table_counts(conn)["rating_interaction"] == 0
    with load.transaction(conn) as cur:
        assert load.loaded_etag(cur, source) is None


# --------------------------------------------------------------------------- master data
def test_read_master_data_reflects_the_seed(conn):
    known = master(conn)
    assert sorted(known.exhibitions) == [0, 1, 2, 3, 4, 5]
    assert sorted(known.ratings) == [0, 1, 2, 3, 4]
    assert sorted(known.requests) == [0, 1]
    assert known.exhibition_names[3] == "Cetacean Sensations"
    assert known.exhibitions[3] == scalar(conn, "SELECT exhibition_id FROM exhibition "
                                                "WHERE public_id = 'EXH_03'")
    assert known.ratings[4] == scalar(conn, "SELECT rating_id FROM rating WHERE rating_value = 4")
    assert known.requests[1] == scalar(conn, "SELECT request_id FROM request "
                                             "WHERE request_value = 1")


PLANETS = Exhibition(public_id="EXH_06", site=6, name="Planets", floor="4",
                     department="Astronomy", start_date=date(2022, 2, 14),
                     description="A new gallery on the fourth floor.")


def test_upsert_exhibition_inserts_a_new_site_known_at_once(conn):
    departments = scalar(conn, "SELECT count(*) FROM department")
    floors = scalar(conn, "SELECT count(*) FROM floor")
    with load.transaction(conn) as cur:
        assert load.upsert_exhibition(cur, PLANETS) == "added"
        known = load.read_master_data(cur)   # same transaction: known at once
    assert 6 in known.exhibitions and known.exhibition_names[6] == "Planets"
    assert rows(conn, "SELECT public_id, site, exhibition_name, exhibition_description, "
                      "department_name, floor_name, exhibition_start_date FROM exhibition_info "
                      "WHERE site = 6") == [
        ("EXH_06", 6, "Planets", "A new gallery on the fourth floor.", "Astronomy", "4",
         date(2022, 2, 14))]
    assert scalar(conn, "SELECT count(*) FROM department") == departments + 1
    assert scalar(conn, "SELECT count(*) FROM floor") == floors + 1
    # and an event at site 6 is now valid
    parsed = transform.parse_csv_lines(["2024-07-01 10:00:00,6,2,"], 2)
    outcome = transform.validate_events(parsed.events, known, transform.Rules(),
                                        datetime(2025, 1, 1, tzinfo=UTC))
    assert outcome.ratings["exhibition_id"].tolist() == [known.exhibitions[6]]


def test_upsert_exhibition_updates_an_existing_one(conn):
    exhibitions = scalar(conn, "SELECT count(*) FROM exhibition")
    before_id = master(conn).exhibitions[3]
    changed = Exhibition(public_id="EXH_03", site=3, name="Cetacean Sensations II",
                         floor="Vault", department="Marine Biology", start_date=date(2020, 1, 2),
                         description="Refitted.")
    with load.transaction(conn) as cur:
        assert load.upsert_exhibition(cur, changed) == "updated"
    with load.transaction(conn) as cur:
        assert load.upsert_exhibition(cur, changed) == "unchanged"   # same values again
    assert scalar(conn, "SELECT count(*) FROM exhibition") == exhibitions
    assert master(conn).exhibitions[3] == before_id              # keys do not move
    assert rows(conn, "SELECT exhibition_name, department_name, floor_name, "
                      "exhibition_start_date, exhibition_description FROM exhibition_info "
                      "WHERE public_id = 'EXH_03'") == [
        ("Cetacean Sensations II", "Marine Biology", "Vault", date(2020, 1, 2), "Refitted.")]
    assert scalar(conn, "SELECT count(*) FROM department "
                        "WHERE department_name = 'Marine Biology'") == 1


def test_upsert_of_known_master_data_draws_no_identity_value(conn):
    with load.transaction(conn) as cur:
        assert load.upsert_exhibition(cur, PLANETS) == "added"
    drawn = identity_values(conn)
    for _ in range(3):
        with load.transaction(conn) as cur:
            assert load.upsert_exhibition(cur, PLANETS) == "unchanged"
            load.source_id(cur, "s3", "s3://b/k.csv")
    assert new_source(conn, "s3://b/k.csv") == new_source(conn, "s3://b/k.csv")
    assert {k: v for k, v in identity_values(conn).items() if k != "event_source.source_id"} \
        == {k: v for k, v in drawn.items() if k != "event_source.source_id"}
    assert identity_values(conn)["event_source.source_id"] == 1  # one source, one value


def test_a_concurrent_insert_of_the_same_exhibition_is_waited_for_not_an_error(db, conn):
    """Two runs finding the same new exhibition file: the second waits for the first's insert,
    then finds its rows (same keys) instead of failing on the unique constraint."""
    other = load.connect(db)
    try:
        with other.cursor() as theirs:
            assert load.upsert_exhibition(theirs, PLANETS) == "added"   # not committed yet
            with ThreadPoolExecutor(1) as pool:
                mine = pool.submit(lambda: _upsert_in_transaction(conn, PLANETS))
                time.sleep(0.5)
                assert not mine.done()                                  # waits on their insert
                other.commit()
                assert mine.result(timeout=10) == "unchanged"
    finally:
        other.close()
    assert rows(conn, "SELECT count(*), min(exhibition_id) FROM exhibition WHERE site = 6") \
        == [(1, master(conn).exhibitions[6])]
    assert scalar(conn, "SELECT count(*) FROM department WHERE department_name = 'Astronomy'") == 1


def _upsert_in_transaction(conn, exhibition: Exhibition) -> str:
    with load.transaction(conn) as cur:
        return load.upsert_exhibition(cur, exhibition)


def test_upsert_of_a_parsed_exhibition_file(conn):
    raw = (b'{\n    "EXHIBITION_NAME": "Thunder Lizards",\n    "EXHIBITION_ID": "EXH_05",\n'
           b'    "FLOOR": "1",\n    "DEPARTMENT": "Paleontology",\n    "START_DATE": "01/02/23",\n'
           b'    "DESCRIPTION": "How new research is making scientists rethink what dinosaurs '
           b'really looked like."\n}')
    before = rows(conn, "SELECT * FROM exhibition_info ORDER BY public_id")
    with load.transaction(conn) as cur:
        assert load.upsert_exhibition(cur, transform.parse_exhibition(raw)) == "unchanged"
    assert rows(conn, "SELECT * FROM exhibition_info ORDER BY public_id") == before


# --------------------------------------------------------------------------- Kafka offsets
def lock_offsets(cur, topic: str, partitions: list[int]) -> dict[int, tuple[int, int]]:
    """What a consumer batch locks, for a broker whose topic ID is not known:
    partition -> (source_id, next offset)."""
    return load.claim_partitions(cur, topic, partitions, None)[0]


def stored_offsets(cur, topic: str, partitions: list[int]) -> dict[int, int]:
    """What assignment reads: the next offset of each partition the database knows."""
    return load.assigned_offsets(cur, topic, partitions, None)[0]


def test_offsets_round_trip_for_three_partitions(conn):
    topic = "lmnh"
    with load.transaction(conn) as cur:
        locked = lock_offsets(cur, topic, [2, 0, 1])
    assert sorted(locked) == [0, 1, 2]
    assert [next_offset for _, next_offset in locked.values()] == [0, 0, 0]
    sources = {p: s for p, (s, _) in locked.items()}
    assert len(set(sources.values())) == 3
    assert rows(conn, "SELECT uri FROM event_source WHERE kind = 'kafka' ORDER BY uri") == [
        (load.kafka_source_uri(topic, p),) for p in (0, 1, 2)]

    with load.transaction(conn) as cur:
        assert stored_offsets(cur, topic, [0, 1, 2]) == {0: 0, 1: 0, 2: 0}
        lock_offsets(cur, topic, [0, 1])
        load.advance_offset(cur, sources[0], 1500)
        load.advance_offset(cur, sources[1], 42)
    with load.transaction(conn) as cur:
        assert stored_offsets(cur, topic, [0, 1, 2]) == {0: 1500, 1: 42, 2: 0}
        assert stored_offsets(cur, topic, [1]) == {1: 42}
        assert stored_offsets(cur, "other-topic", [0, 1, 2]) == {}
        again = lock_offsets(cur, topic, [0, 1, 2])
    assert again == {0: (sources[0], 1500), 1: (sources[1], 42), 2: (sources[2], 0)}

    # an aborted batch does not move the offset
    with pytest.raises(RuntimeError), load.transaction(conn) as cur:
        lock_offsets(cur, topic, [2])
        load.advance_offset(cur, sources[2], 999)
        raise RuntimeError("killed mid-batch")
    with load.transaction(conn) as cur:
        assert stored_offsets(cur, topic, [2]) == {2: 0}


def test_offsets_of_another_topic_are_separate(conn):
    with load.transaction(conn) as cur:
        a = lock_offsets(cur, "lmnh", [0])
        b = lock_offsets(cur, "lmnh-replay", [0])
        load.advance_offset(cur, b[0][0], 7)
    assert a[0][0] != b[0][0]
    with load.transaction(conn) as cur:
        assert stored_offsets(cur, "lmnh", [0]) == {0: 0}
        assert stored_offsets(cur, "lmnh-replay", [0]) == {0: 7}


def test_locked_offsets_are_held_until_the_transaction_ends(db, conn):
    """Two consumers of one partition must not both process a batch from the same offset."""
    with load.transaction(conn) as cur:
        lock_offsets(cur, "lmnh", [0, 1])
    other = load.connect(db)
    try:
        with conn.cursor() as cur:
            lock_offsets(cur, "lmnh", [0])           # held by conn, not committed
            with pytest.raises(psycopg2.errors.LockNotAvailable), other.cursor() as theirs:
                theirs.execute("SELECT next_offset FROM kafka_offset k JOIN event_source s "
                               "USING (source_id) WHERE s.uri = %s FOR UPDATE NOWAIT",
                               (load.kafka_source_uri("lmnh", 0),))
            other.rollback()
            with other.cursor() as theirs:                # partition 1 is not locked
                theirs.execute("SELECT next_offset FROM kafka_offset k JOIN event_source s "
                               "USING (source_id) WHERE s.uri = %s FOR UPDATE NOWAIT",
                               (load.kafka_source_uri("lmnh", 1),))
                assert theirs.fetchone() == (0,)
            other.rollback()
        conn.rollback()
        with other.cursor() as theirs:                    # released by the rollback
            theirs.execute("SELECT next_offset FROM kafka_offset k JOIN event_source s "
                           "USING (source_id) WHERE s.uri = %s FOR UPDATE NOWAIT",
                           (load.kafka_source_uri("lmnh", 0),))
            assert theirs.fetchone() == (0,)
        other.rollback()
    finally:
        other.close()


def claim(conn, partitions: list[int], topic_id: str | None, log_ends=None):
    """claim_partitions' (next offsets, new logs), sources left out (offset_rows shows them)."""
    with load.transaction(conn) as cur:
        offsets, new_logs = load.claim_partitions(cur, "lmnh", partitions, topic_id, log_ends)
    return {p: next_offset for p, (_, next_offset) in offsets.items()}, new_logs


def offset_rows(conn) -> list[tuple]:
    return rows(conn, "SELECT partition, uri, next_offset, topic_id, epoch FROM kafka_offset "
                      "JOIN event_source USING (source_id) ORDER BY partition")


def test_claimed_partitions_keep_their_offsets_while_the_topic_id_holds(conn):
    assert claim(conn, [0, 1], "id-A") == ({0: 0, 1: 0}, [])
    with load.transaction(conn) as cur:
        load.advance_offset(cur, lock_offsets(cur, "lmnh", [0])[0][0], 100)
    drawn = identity_values(conn)
    assert claim(conn, [0, 1], "id-A") == ({0: 100, 1: 0}, [])
    assert claim(conn, [0], None) == ({0: 100}, [])                 # ID unknown: kept
    assert claim(conn, [0], None, {0: 200}) == ({0: 100}, [])       # within the log
    assert identity_values(conn) == drawn                           # nothing new, nothing drawn
    assert offset_rows(conn) == [(0, "kafka://lmnh/0", 100, "id-A", 0),
                                 (1, "kafka://lmnh/1", 0, "id-A", 0)]


def test_a_database_from_before_topic_ids_adopts_the_brokers(conn):
    with load.transaction(conn) as cur:
        load.advance_offset(cur, lock_offsets(cur, "lmnh", [0])[0][0], 100)
    assert claim(conn, [0], "id-A") == ({0: 100}, [])
    assert offset_rows(conn) == [(0, "kafka://lmnh/0", 100, "id-A", 0)]


def test_a_new_topic_id_starts_a_new_epoch_from_offset_0(conn):
    claim(conn, [0, 1], "id-A")
    with load.transaction(conn) as cur:
        locked = lock_offsets(cur, "lmnh", [0, 1])
        load.advance_offset(cur, locked[0][0], 100)
        load.advance_offset(cur, locked[1][0], 7)
    offsets, new_logs = claim(conn, [0, 1], "id-B")
    assert offsets == {0: 0, 1: 0}
    assert new_logs == [
        load.NewLog(0, 100, "kafka://lmnh/0@1", "the topic ID is now id-B, was id-A"),
        load.NewLog(1, 7, "kafka://lmnh/1@1", "the topic ID is now id-B, was id-A")]
    assert offset_rows(conn) == [(0, "kafka://lmnh/0@1", 0, "id-B", 1),
                                 (1, "kafka://lmnh/1@1", 0, "id-B", 1)]
    assert claim(conn, [0, 1], "id-B") == ({0: 0, 1: 0}, [])        # once only
    assert claim(conn, [0], "id-C")[1][0].uri == "kafka://lmnh/0@2"
    assert {uri for (uri,) in rows(conn, "SELECT uri FROM event_source")} == {
        "kafka://lmnh/0", "kafka://lmnh/1", "kafka://lmnh/0@1", "kafka://lmnh/1@1",
        "kafka://lmnh/0@2"}


def test_without_topic_ids_an_offset_beyond_the_logs_end_starts_a_new_epoch(conn):
    with load.transaction(conn) as cur:
        load.advance_offset(cur, lock_offsets(cur, "lmnh", [0])[0][0], 100)
    assert claim(conn, [0], None, {0: 100}) == ({0: 100}, [])        # at the end: caught up
    offsets, new_logs = claim(conn, [0], None, {0: 50})
    assert offsets == {0: 0}
    assert new_logs == [load.NewLog(0, 100, "kafka://lmnh/0@1",
                                    "the stored offset 100 is beyond the log's end 50")]
    assert offset_rows(conn) == [(0, "kafka://lmnh/0@1", 0, None, 1)]


def test_two_consumers_claiming_a_recreated_partition_start_one_epoch(db, conn):
    """A rebalance can hand the partition over while the first owner is still claiming it:
    the row lock makes the second see the first's new epoch, not start another."""
    claim(conn, [0], "id-A")
    other = load.connect(db)
    try:
        with other.cursor() as theirs:
            assert load.claim_partitions(theirs, "lmnh", [0], "id-B", None)[1]  # not committed
            with ThreadPoolExecutor(1) as pool:
                mine = pool.submit(claim, conn, [0], "id-B")
                time.sleep(0.5)
                assert not mine.done()
                other.commit()
                assert mine.result(timeout=10) == ({0: 0}, [])
    finally:
        other.close()
    assert offset_rows(conn) == [(0, "kafka://lmnh/0@1", 0, "id-B", 1)]


def test_assignment_does_not_wait_for_a_batch_holding_the_offset_rows(db, conn):
    """A frozen zombie consumer may hold the rows in its batch transaction for as long as it
    is stopped: a rebalance reads the offsets past its locks (the batch re-checks, locked)."""
    claim(conn, [0], "id-A")
    with load.transaction(conn) as cur:
        load.advance_offset(cur, lock_offsets(cur, "lmnh", [0])[0][0], 5)
    zombie = load.connect(db)
    try:
        with zombie.cursor() as theirs:
            lock_offsets(theirs, "lmnh", [0])                      # held, not committed
            with ThreadPoolExecutor(1) as pool:
                assigned = pool.submit(_assigned_in_transaction, conn, [0, 1], "id-A")
                assert assigned.result(timeout=5) == ({0: 5}, [])      # 1: never read yet
        zombie.rollback()
    finally:
        zombie.close()
    drawn = identity_values(conn)
    offsets, new_logs = _assigned_in_transaction(conn, [0, 1], "id-B")  # a new log: claimed
    assert offsets == {0: 0} and [n.uri for n in new_logs] == ["kafka://lmnh/0@1"]
    assert identity_values(conn)["event_source.source_id"] == drawn["event_source.source_id"] + 1


def _assigned_in_transaction(conn, partitions: list[int], topic_id: str):
    with load.transaction(conn) as cur:
        return load.assigned_offsets(cur, "lmnh", partitions, topic_id)


def test_connect_speaks_museum_time(conn):
    assert scalar(conn, "SHOW timezone") == "Europe/London"
