"""pipeline.py end to end: a real S3 endpoint (moto server) into a real PostgreSQL."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from instance_role import InstanceMetadata, SigningRecorder

import extract
import localstack
import pipeline
import sample_data
from helpers import identity_values, reason_counts, rows, scalar, table_counts
from settings import load_settings, read_environment

PROJECT = Path(__file__).resolve().parent.parent


def put(s3, bucket: str, key: str, body: bytes | str) -> None:
    s3.put_object(Bucket=bucket, Key=key, Body=body.encode() if isinstance(body, str) else body)


def expected_outcomes(bodies: list[bytes]) -> Counter:
    total = Counter()
    for body in bodies:
        total.update(sample_data.expected_reasons(body))
    return total


def stored_outcomes(conn) -> Counter:
    counts = table_counts(conn)
    out = Counter(reason_counts(conn))
    out["rating"] = counts["rating_interaction"]
    out["request"] = counts["request_interaction"]
    return +out


def seed(s3, bucket: str, objects: int = 3, rows_per_object: int = 2000) -> list[bytes]:
    sample_data.seed_bucket(s3, bucket, objects=objects, rows=rows_per_object, seed=7)
    return [s3.get_object(Bucket=bucket, Key=sample_data.kiosk_key(i))["Body"].read()
            for i in range(objects)]


def run(*argv: str) -> int:
    return pipeline.main([*argv, "--no-progress"])


def test_generated_bucket_lands_exactly_and_conserves_events(s3, bucket, service_env, conn, capsys):
    bodies = seed(s3, bucket)
    assert run("-b", bucket) == 0
    expected = expected_outcomes(bodies)
    assert stored_outcomes(conn) == +expected
    out = capsys.readouterr().out
    read = sum(expected.values())
    stored = expected["rating"] + expected["request"]
    assert f"{read} read = {stored} stored" in out
    assert "3 seen, 3 loaded, 0 skipped" in out
    # conservation per object, recorded with the load
    for events_read, stored_n, rejected, complete in rows(
            conn, "SELECT events_read, events_stored, events_rejected, complete FROM s3_object_load"):
        assert events_read == stored_n + rejected == 2000 and complete
    # every rejection says where it came from
    source, locator, payload = rows(conn, "SELECT source, locator, payload FROM rejected_event "
                                          "ORDER BY rejected_event_id LIMIT 1")[0]
    assert source.startswith(f"s3://{bucket}/lmnh_hist_data_")
    key = source.rsplit("/", 1)[1]
    body = bodies[int(key.split("_")[-1].split(".")[0])].decode()
    assert body.split("\n")[int(locator) - 1] == payload


def test_rerun_adds_nothing(s3, bucket, service_env, conn, capsys):
    seed(s3, bucket)
    assert run("-b", bucket) == 0
    before = table_counts(conn)
    assert run("-b", bucket) == 0
    assert table_counts(conn) == before
    assert "0 loaded, 3 skipped (unchanged)" in capsys.readouterr().out


def test_rerun_over_an_unchanged_bucket_draws_no_identity_value(s3, bucket, service_env, conn):
    """SPEC §3.1: keys last for years of runs. `INSERT ... ON CONFLICT` draws a value even when
    it inserts nothing, and department/floor/exhibition keys are SMALLINT: a run every minute
    that drew 6 of them would fail for good within four days of 5,450 runs."""
    seed(s3, bucket)
    assert run("-b", bucket) == 0
    drawn = identity_values(conn)
    assert drawn["exhibition.exhibition_id"] is not None  # the seed drew them: the query works
    assert run("-b", bucket) == 0
    assert identity_values(conn) == drawn
    # a forced reload replaces its rows (new interaction ids) but reuses every other key
    assert run("-b", bucket, "--force") == 0
    events = ("rating_interaction.", "request_interaction.", "rejected_event.")
    assert {k: v for k, v in identity_values(conn).items() if not k.startswith(events)} \
        == {k: v for k, v in drawn.items() if not k.startswith(events)}


def test_changed_object_replaces_its_rows(s3, bucket, service_env, conn):
    bodies = seed(s3, bucket)
    assert run("-b", bucket) == 0
    new_body = sample_data.generate_kiosk_csv(500, seed=99)
    put(s3, bucket, sample_data.kiosk_key(1), new_body)
    assert run("-b", bucket) == 0
    assert stored_outcomes(conn) == +expected_outcomes([bodies[0], new_body, bodies[2]])
    assert scalar(conn, "SELECT events_read FROM s3_object_load JOIN event_source USING (source_id) "
                        "WHERE uri LIKE %s", ("%lmnh_hist_data_1.csv",)) == 500


def test_new_exhibition_file_makes_its_site_valid_in_the_same_run(s3, bucket, service_env, conn):
    record = {"EXHIBITION_NAME": "Deep Sea", "EXHIBITION_ID": "EXH_07", "FLOOR": "Vault",
              "DEPARTMENT": "Marine Biology", "START_DATE": "01/01/24", "DESCRIPTION": "Abyss."}
    put(s3, bucket, "lmnh_exhibition_deepsea.json", sample_data.exhibition_json(record))
    put(s3, bucket, "lmnh_hist_data_0.csv",
        "at,site,val,type\n2023-03-06 10:00:00,7,3,\n2023-03-06 10:00:01,8,3,\n")
    assert run("-b", bucket) == 0
    assert rows(conn, "SELECT exhibition_name, department_name, floor_name FROM exhibition_info "
                      "WHERE public_id = 'EXH_07'") == [("Deep Sea", "Marine Biology", "Vault")]
    assert rows(conn, "SELECT public_id FROM rating_info") == [("EXH_07",)]
    assert reason_counts(conn) == {"unknown_site": 1}


def test_malformed_exhibition_is_reported_and_skipped(s3, bucket, service_env, conn, capsys):
    seed(s3, bucket, objects=1, rows_per_object=100)
    put(s3, bucket, "lmnh_exhibition_broken.json", '{"EXHIBITION_NAME": "Half", "EXHIBITION_ID": ')
    put(s3, bucket, "lmnh_exhibition_nodate.json",
        '{"EXHIBITION_NAME": "X", "EXHIBITION_ID": "EXH_08", "FLOOR": "1", "DEPARTMENT": "D", '
        '"START_DATE": "2020-01-01", "DESCRIPTION": "d"}')
    assert run("-b", bucket) == 0
    captured = capsys.readouterr()
    assert "2 malformed and skipped" in captured.out
    assert "skipped exhibition lmnh_exhibition_broken.json: not UTF-8 JSON" in captured.out
    assert "START_DATE '2020-01-01' is not DD/MM/YY" in captured.err
    assert scalar(conn, "SELECT count(*) FROM exhibition") == 6
    assert sum(table_counts(conn).values()) == 100


DEEP_SEA = {"EXHIBITION_NAME": "Deep Sea", "EXHIBITION_ID": "EXH_07", "FLOOR": "Vault",
            "DEPARTMENT": "Marine Biology", "START_DATE": "01/01/24", "DESCRIPTION": "Abyss."}
# Exhibition files that pass as JSON but that the database cannot hold (SPEC §3).
UNSTORABLE_EXHIBITIONS = {
    "lmnh_exhibition_longname.json": {**DEEP_SEA, "EXHIBITION_NAME": "N" * 101},
    "lmnh_exhibition_longfloor.json": {**DEEP_SEA, "EXHIBITION_ID": "EXH_08", "FLOOR": "F" * 150},
    "lmnh_exhibition_bigsite.json": {**DEEP_SEA, "EXHIBITION_ID": "EXH_40000"},
    "lmnh_exhibition_nul.json": {**DEEP_SEA, "EXHIBITION_ID": "EXH_09", "DESCRIPTION": "a\x00b"},
}


def put_unstorable_exhibitions(s3, bucket: str) -> None:
    """The seeded bucket plus a good new exhibition (site 7) and the unstorable files."""
    put(s3, bucket, "lmnh_exhibition_deepsea.json", sample_data.exhibition_json(DEEP_SEA))
    for key, record in UNSTORABLE_EXHIBITIONS.items():
        put(s3, bucket, key, sample_data.exhibition_json(record))


def test_exhibition_the_database_cannot_hold_is_skipped_and_the_run_goes_on(
        s3, bucket, service_env, conn, capsys):
    seed(s3, bucket, objects=1, rows_per_object=100)
    put_unstorable_exhibitions(s3, bucket)
    assert run("-b", bucket) == 0
    out = capsys.readouterr().out
    assert "7 loaded (1 added, 0 updated), 4 malformed and skipped" in out
    assert ("skipped exhibition lmnh_exhibition_longname.json: EXHIBITION_NAME is 101 characters "
            "long; the database holds at most 100") in out
    assert "skipped exhibition lmnh_exhibition_longfloor.json: FLOOR is 150 characters" in out
    assert ("skipped exhibition lmnh_exhibition_bigsite.json: EXHIBITION_ID 'EXH_40000': site "
            "40000 is beyond the largest the database holds (32767)") in out
    assert "skipped exhibition lmnh_exhibition_nul.json: DESCRIPTION contains a NUL" in out
    assert "1 seen, 1 loaded" in out
    assert sum(table_counts(conn).values()) == 100
    assert rows(conn, "SELECT public_id FROM exhibition WHERE site >= 6 ORDER BY site") == [
        ("EXH_07",)]


def test_what_the_parser_misses_the_database_refuses_and_the_run_goes_on(
        s3, bucket, service_env, conn, capsys, monkeypatch):
    """The backstop: with the parser's storability check gone (as if it missed a case), the
    database's DataError and psycopg2's ValueError on a NUL still skip just that file."""
    monkeypatch.setattr(pipeline.transform, "unstorable_text", lambda text, max_chars: None)
    monkeypatch.setattr(pipeline.transform, "SITE_MAX", 10**9)
    seed(s3, bucket, objects=1, rows_per_object=100)
    put_unstorable_exhibitions(s3, bucket)
    assert run("-b", bucket) == 0
    out = capsys.readouterr().out
    assert "7 loaded (1 added, 0 updated), 4 malformed and skipped" in out
    for key in UNSTORABLE_EXHIBITIONS:
        assert f"skipped exhibition {key}: the database cannot hold it: " in out
    assert "value too long for type character varying(100)" in out
    assert "smallint out of range" in out
    assert "NUL" in out
    assert "1 seen, 1 loaded" in out
    assert sum(table_counts(conn).values()) == 100
    assert scalar(conn, "SELECT count(*) FROM exhibition") == 7


def test_exhibition_limits_are_those_of_the_schema(conn):
    columns = dict(rows(conn, "SELECT column_name, character_maximum_length "
                              "FROM information_schema.columns WHERE table_name IN "
                              "('exhibition', 'department', 'floor') "
                              "AND data_type = 'character varying'"))
    assert columns == {"exhibition_name": pipeline.transform.NAME_MAX_CHARS,
                       "department_name": pipeline.transform.NAME_MAX_CHARS,
                       "floor_name": pipeline.transform.NAME_MAX_CHARS,
                       "public_id": pipeline.transform.PUBLIC_ID_MAX_CHARS}
    assert scalar(conn, "SELECT data_type FROM information_schema.columns "
                        "WHERE table_name = 'exhibition' AND column_name = 'site'") == "smallint"
    assert pipeline.transform.SITE_MAX == 2**15 - 1


def test_decoys_are_ignored(s3, bucket, service_env, conn, capsys):
    seed(s3, bucket, objects=1, rows_per_object=50)
    assert run("-b", bucket) == 0
    assert f"{len(sample_data.DECOY_OBJECTS)} other objects ignored" in capsys.readouterr().out
    assert scalar(conn, "SELECT count(*) FROM exhibition") == 6


def test_num_rows_loads_only_the_first_rows_and_a_full_run_completes(s3, bucket, service_env, conn):
    bodies = seed(s3, bucket, objects=2, rows_per_object=1000)
    assert run("-b", bucket, "-n", "1500") == 0
    assert sum(table_counts(conn).values()) == 1500
    assert rows(conn, "SELECT complete, events_read FROM s3_object_load ORDER BY source_id") == [
        (True, 1000), (False, 500)]
    lines = scalar(conn, "SELECT max(position) FROM (SELECT position, source_id FROM rating_interaction "
                         "UNION ALL SELECT position, source_id FROM rejected_event "
                         "UNION ALL SELECT position, source_id FROM request_interaction) e "
                         "JOIN event_source USING (source_id) WHERE uri LIKE '%data_1.csv'")
    assert lines == 501  # header is line 1
    assert run("-b", bucket) == 0
    assert stored_outcomes(conn) == +expected_outcomes(bodies)


def test_dry_run_writes_nothing_but_reports_what_would_land(s3, bucket, service_env, conn, capsys):
    bodies = seed(s3, bucket, objects=2, rows_per_object=800)
    assert run("-b", bucket, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "DRY RUN" in out
    assert sum(table_counts(conn).values()) == 0
    assert scalar(conn, "SELECT count(*) FROM s3_object_load") == 0
    expected = expected_outcomes(bodies)
    assert f"{sum(expected.values())} read = {expected['rating'] + expected['request']} stored" in out


def test_two_concurrent_runs_load_each_object_once(s3, bucket, service_env, conn):
    bodies = seed(s3, bucket, objects=6, rows_per_object=20000)
    env = {**os.environ, **service_env}
    procs = [subprocess.Popen([sys.executable, "pipeline.py", "-b", bucket, "--no-progress"],
                              cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert stored_outcomes(conn) == +expected_outcomes(bodies)
    loaded = sum(int(out.split(" loaded, ")[0].split()[-1]) for out, _ in outputs)
    assert loaded == 6  # between them, each object loaded exactly once
    assert scalar(conn, "SELECT count(*) FROM s3_object_load") == 6


def test_wrong_header_rejects_every_line_and_other_objects_load(s3, bucket, service_env, conn):
    put(s3, bucket, "lmnh_hist_data_0.csv", "when,where,what,kind\n2023-03-06 10:00:00,1,3,\n")
    put(s3, bucket, "lmnh_hist_data_1.csv", "at,site,val,type\n2023-03-06 10:00:00,1,3,\n")
    assert run("-b", bucket) == 0
    assert reason_counts(conn) == {"bad_header": 2}
    assert table_counts(conn)["rating_interaction"] == 1


def stored_by_position(conn, key: str) -> list[tuple]:
    """(position, what became of it) of every event of one object, in line order."""
    return rows(conn, """
        SELECT position, 'rating' FROM rating_interaction JOIN event_source USING (source_id)
         WHERE uri LIKE %(key)s
        UNION ALL
        SELECT position, 'request' FROM request_interaction JOIN event_source USING (source_id)
         WHERE uri LIKE %(key)s
        UNION ALL
        SELECT position, reason FROM rejected_event WHERE source LIKE %(key)s
        ORDER BY 1""", {"key": f"%/{key}"})


def test_cr_only_and_crlf_objects_load_like_lf_at_the_same_line_numbers(
        s3, bucket, service_env, conn):
    """A file saved with lone CR line ends (old spreadsheet tools) is N events, not one; its
    events are stored at the same positions (line numbers, their identity) as the LF file's."""
    body = sample_data.generate_kiosk_csv(3000, seed=11)
    assert b"\r" not in body
    put(s3, bucket, "lmnh_hist_data_0.csv", body)
    put(s3, bucket, "lmnh_hist_data_1.csv", body.replace(b"\n", b"\r"))
    put(s3, bucket, "lmnh_hist_data_2.csv", body.replace(b"\n", b"\r\n"))
    assert run("-b", bucket) == 0
    lf = stored_by_position(conn, "lmnh_hist_data_0.csv")
    assert len(lf) == 3000 and lf[0][0] == 2 and lf[-1][0] == 3001
    assert stored_by_position(conn, "lmnh_hist_data_1.csv") == lf
    assert stored_by_position(conn, "lmnh_hist_data_2.csv") == lf
    assert Counter(kind for _, kind in lf) == expected_outcomes([body])


def test_a_line_over_1_mib_is_a_malformed_row_and_the_lines_after_it_load(
        s3, bucket, service_env, conn, capsys):
    long_line = b"2023-03-06 10:00:00,1,2," + b"9" * (3 * 1024 * 1024)
    put(s3, bucket, "lmnh_hist_data_0.csv",
        b"at,site,val,type\r\n2023-03-06 10:00:00,1,2,\r\n" + long_line
        + b"\r2023-03-06 10:00:01,2,3,\r\n")
    assert run("-b", bucket) == 0
    assert stored_by_position(conn, "lmnh_hist_data_0.csv") == [
        (2, "rating"), (3, "malformed_row"), (4, "rating")]
    (locator, size, head, detail), = rows(
        conn, "SELECT locator, octet_length(payload), left(payload, 30), detail FROM rejected_event")
    assert (locator, size, head) == ("3", 1024 * 1024, long_line[:30].decode())
    assert f"{len(long_line)} bytes" in detail
    assert "3 read = 2 stored" in capsys.readouterr().out


# pipeline.py as a program, reporting its own peak RSS at exit. VmHWM, not wait4's ru_maxrss:
# Linux counts in a child's ru_maxrss the RSS of the parent (pytest) it was forked from.
PEAK_RSS_OF_PIPELINE = """
import runpy, sys
sys.argv = ["pipeline.py", *sys.argv[1:]]
try:
    runpy.run_path("pipeline.py", run_name="__main__")
finally:
    with open("/proc/self/status") as status:
        print(next(line for line in status if line.startswith("VmHWM:")), file=sys.stderr)
"""


def run_pipeline_process(bucket: str, service_env: dict) -> tuple[int, int, str]:
    """pipeline.py as its own process: (exit code, peak RSS in bytes, stderr)."""
    result = subprocess.run([sys.executable, "-c", PEAK_RSS_OF_PIPELINE, "-b", bucket,
                             "--no-progress"], cwd=PROJECT, env={**os.environ, **service_env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            timeout=600)
    peak_kib = int(result.stderr.strip().splitlines()[-1].split()[1])
    return result.returncode, peak_kib * 1024, result.stderr


def test_an_object_with_no_line_end_keeps_the_runs_memory_bounded(s3, bucket, service_env, conn):
    """~200 MB and no line end: the run finishes, the line is one malformed_row, and the
    process's peak RSS grows by a small fraction of the object over a run of a tiny object
    (before, the pending line grew to the whole object and was copied with every chunk)."""
    put(s3, bucket, "lmnh_hist_data_0.csv", b"at,site,val,type\n2023-03-06 10:00:00,1,2,\n")
    code, small_rss, stderr = run_pipeline_process(bucket, service_env)
    assert code == 0, stderr
    size = 200 * 1024 * 1024
    put(s3, bucket, "lmnh_hist_data_1.csv", b"at,site,val,type\n" + b"x" * size)
    code, big_rss, stderr = run_pipeline_process(bucket, service_env)
    assert code == 0, stderr
    assert big_rss - small_rss < size / 10, (
        f"peak RSS {big_rss / 2**20:.0f} MiB against {small_rss / 2**20:.0f} MiB for a tiny object")
    assert rows(conn, "SELECT locator, reason, octet_length(payload) FROM rejected_event") == [
        ("2", "malformed_row", 1024 * 1024)]
    assert f"{size} bytes" in scalar(conn, "SELECT detail FROM rejected_event")


def test_crlf_bom_blank_lines_and_no_final_newline(s3, bucket, service_env, conn):
    body = ("\ufeffat,site,val,type\r\n2023-03-06 08:45:00,1,3,\r\n\r\n"
            "2023-03-06 18:15:00,2,-1,1.0\r\n2023-03-06 18:15:01,2,4,\r\n\r\n\r\n"
            "2023-03-06 12:00:00,3,0,")
    put(s3, bucket, "lmnh_hist_data_0.csv", body.encode("utf-8"))
    assert run("-b", bucket) == 0
    assert rows(conn, "SELECT position, rating_value FROM rating_info JOIN rating_interaction "
                      "USING (rating_interaction_id) ORDER BY position") == [(2, 3), (8, 0)]
    assert rows(conn, "SELECT request_description, to_char(event_at, 'HH24:MI:SS') "
                      "FROM request_info") == [("Emergency", "18:15:00")]
    assert rows(conn, "SELECT locator, reason, payload FROM rejected_event") == [
        ("5", "outside_opening_hours", "2023-03-06 18:15:01,2,4,")]


def test_event_times_are_stored_as_london_instants(s3, bucket, service_env, conn):
    put(s3, bucket, "lmnh_hist_data_0.csv",
        "at,site,val,type\n2023-03-06 09:00:00,1,3,\n2023-07-06 09:00:00,1,3,\n")
    assert run("-b", bucket) == 0
    assert rows(conn, "SELECT to_char(event_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') "
                      "FROM rating_interaction ORDER BY position") == [
        ("2023-03-06 09:00",), ("2023-07-06 08:00",)]


def test_identical_rows_are_two_events(s3, bucket, service_env, conn):
    put(s3, bucket, "lmnh_hist_data_0.csv",
        "at,site,val,type\n2023-03-06 10:00:00,1,3,\n2023-03-06 10:00:00,1,3,\n")
    assert run("-b", bucket) == 0
    assert table_counts(conn)["rating_interaction"] == 2


def test_missing_bucket_is_one_line_and_exit_1(service_env, capsys):
    assert run("-b", "no-such-bucket-lmnh") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 or all("localstack" in line for line in err[:-1])
    assert "cannot list bucket no-such-bucket-lmnh: does not exist" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_unreachable_database_is_one_line_and_exit_1(service_env, bucket, monkeypatch, capsys):
    from localstack import free_port
    monkeypatch.setenv("DB_PORT", str(free_port()))
    monkeypatch.setenv("DB_PASS", "s3cr3t-db-pass")
    assert run("-b", bucket) == 1
    err = capsys.readouterr().err
    assert "run failed: cannot connect to PostgreSQL at postgres@127.0.0.1:" in err
    assert "Traceback" not in err and "s3cr3t-db-pass" not in err


def test_bad_setting_is_one_line_naming_it(service_env, monkeypatch, capsys):
    monkeypatch.setenv("DB_PORT", "five")
    assert run() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DB_PORT" in err[0] and "Traceback" not in err[0]


def test_log_output_file(s3, bucket, service_env, tmp_path, capsys):
    seed(s3, bucket, objects=1, rows_per_object=10)
    log_file = tmp_path / "run.log"
    assert run("-b", bucket, "-l", "file", "--log-file", str(log_file)) == 0
    assert "loaded s3://" in log_file.read_text()
    assert "loaded s3://" not in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["-b", "--bucket", "-n", "--num_rows", "-l", "--log_output",
                                  "--dry-run", "{console,file}"])
def test_help_shows_the_spec_flags(flag):
    result = subprocess.run([sys.executable, "pipeline.py", "--help"], cwd=PROJECT,
                            capture_output=True, text=True)
    assert result.returncode == 0 and flag in result.stdout


# --------------------------------------------------------------------------- metrics textfile
def textfile(path: Path) -> dict[str, float]:
    """A node_exporter textfile as {'name{labels}': value}; every line is a comment or a sample."""
    values = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_the_metrics_textfile_after_a_good_then_a_failed_run(s3, bucket, service_env, conn,
                                                             tmp_path, monkeypatch):
    """A failed run moves the last run, never the last success (issue 18): the rule that pages
    on a stale batch looks at the last success."""
    bodies = seed(s3, bucket, objects=2, rows_per_object=300)
    prom = tmp_path / "lmnh_batch.prom"
    assert run("-b", bucket, "--metrics-textfile", str(prom)) == 0
    good = textfile(prom)
    expected = expected_outcomes(bodies)
    assert good["lmnh_batch_last_success_timestamp_seconds"] == \
        good["lmnh_batch_last_run_timestamp_seconds"] > 0
    assert good["lmnh_batch_last_run_success"] == 1 and good["lmnh_batch_last_run_exit_code"] == 0
    assert good['lmnh_batch_last_run_objects{outcome="loaded"}'] == 2
    assert good['lmnh_batch_last_run_objects{outcome="failed"}'] == 0
    assert good['lmnh_batch_last_run_events{outcome="rating"}'] == expected["rating"]
    assert good['lmnh_batch_last_run_events{outcome="request"}'] == expected["request"]
    assert good['lmnh_batch_last_run_events{outcome="rejected"}'] == \
        sum(expected.values()) - expected["rating"] - expected["request"]

    monkeypatch.setenv("DB_PORT", "1")  # nothing listens there: the run cannot be done
    assert run("-b", bucket, "--metrics-textfile", str(prom)) == 1
    failed = textfile(prom)
    assert failed["lmnh_batch_last_success_timestamp_seconds"] == \
        good["lmnh_batch_last_success_timestamp_seconds"]
    assert failed["lmnh_batch_last_run_timestamp_seconds"] >= \
        good["lmnh_batch_last_run_timestamp_seconds"]
    assert failed["lmnh_batch_last_run_success"] == 0 and failed["lmnh_batch_last_run_exit_code"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["lmnh_batch.prom"]  # no temporary left

    fresh = tmp_path / "first.prom"  # a first run that fails: no success yet, the rule pages
    assert run("-b", bucket, "--metrics-textfile", str(fresh)) == 1
    assert textfile(fresh)["lmnh_batch_last_success_timestamp_seconds"] == 0


def test_an_unwritable_metrics_textfile_is_one_line_and_exit_1(s3, bucket, service_env,
                                                               tmp_path, caplog):
    seed(s3, bucket, objects=1, rows_per_object=50)
    assert run("-b", bucket, "--metrics-textfile", str(tmp_path / "no" / "such.prom")) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"cannot write the metrics textfile {tmp_path}/no/such.prom: "
                      "No such file or directory"]


# --------------------------------------------------------------------------- where services come from
def aws_profile_files(folder: Path, endpoint: str, token: str) -> dict[str, str]:
    """A named profile in AWS config and credentials files (temporary keys with a session
    token, the endpoint in the profile), and the environment that selects it."""
    config, credentials = folder / "config", folder / "credentials"
    config.write_text(f"[profile museum]\nregion = eu-west-2\nendpoint_url = {endpoint}\n")
    credentials.write_text("[museum]\naws_access_key_id = ASIAMUSEUMTEST\n"
                           f"aws_secret_access_key = museum-secret-key\naws_session_token = {token}\n")
    return {"AWS_PROFILE": "museum", "AWS_CONFIG_FILE": str(config),
            "AWS_SHARED_CREDENTIALS_FILE": str(credentials), "AWS_EC2_METADATA_DISABLED": "true"}


def configure(monkeypatch, values: dict[str, str]) -> None:
    for key, value in values.items():
        monkeypatch.setenv(key, value)


def test_no_keys_goes_through_the_aws_profile_and_never_starts_a_local_s3(
        s3, bucket, s3_settings, db, kafka_settings, conn, monkeypatch, tmp_path, capsys):
    """DB and Kafka configured, no AWS keys: boto3's chain finds the profile's temporary keys
    (session token included) and endpoint; the local stack is never asked for S3, nor is its
    folder written (the systemd unit's ProtectSystem=strict would refuse it)."""
    seed(s3, bucket, objects=1, rows_per_object=200)
    token = "museum-session-token-123"
    configure(monkeypatch, {"DB_HOST": db.host, "DB_PORT": str(db.port), "DB_NAME": db.name,
                            "DB_USER": db.user, "DB_PASS": db.password,
                            "BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
                            **aws_profile_files(tmp_path, s3_settings.endpoint_url, token)})
    state = tmp_path / "local-stack"
    monkeypatch.setattr(localstack, "STATE_DIR", state)
    assert run("-b", bucket) == 0
    assert "1 seen, 1 loaded" in capsys.readouterr().out
    assert sum(table_counts(conn).values()) == 200
    assert not state.exists()
    s3_from_settings = load_settings(read_environment()).s3
    assert (s3_from_settings.access_key, s3_from_settings.endpoint_url) == (None, None)
    client = extract.make_s3_client(s3_from_settings)
    assert client._request_signer._credentials.get_frozen_credentials().token == token


@pytest.fixture
def on_an_instance(s3_settings, db, kafka_settings, monkeypatch, tmp_path):
    """pipeline.py as on EC2 with an instance role and no keys: an IMDSv2-only metadata service
    hands out the role's credentials, and S3 is reached through a recorder of what each request
    was signed with. Yields (metadata service, recorder)."""
    metadata, recorder = InstanceMetadata(), SigningRecorder(s3_settings.endpoint_url)
    configure(monkeypatch, {"DB_HOST": db.host, "DB_PORT": str(db.port), "DB_NAME": db.name,
                            "DB_USER": db.user, "DB_PASS": db.password,
                            "BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
                            "AWS_ENDPOINT_URL_S3": recorder.url,
                            "AWS_EC2_METADATA_SERVICE_ENDPOINT": metadata.url + "/",
                            "AWS_CONFIG_FILE": str(tmp_path / "none"),
                            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")})
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED", raising=False)
    monkeypatch.setattr(localstack, "STATE_DIR", tmp_path / "local-stack")
    yield metadata, recorder
    metadata.stop()
    recorder.stop()
    assert not (tmp_path / "local-stack").exists()


def test_no_keys_on_an_instance_signs_every_s3_request_with_the_instance_role(
        on_an_instance, s3, bucket, conn, capsys):
    """On EC2 (where the systemd units run) the keys come from the instance role: boto3 asks
    the metadata service, IMDSv2 (a session token first; the instance accepts nothing else),
    and every S3 request, the listing and the object's GET, is signed with the role's
    temporary key and carries its session token."""
    metadata, recorder = on_an_instance
    seed(s3, bucket, objects=1, rows_per_object=200)
    assert run("-b", bucket) == 0
    assert "1 seen, 1 loaded" in capsys.readouterr().out
    assert sum(table_counts(conn).values()) == 200
    assert metadata.log.tokens_issued >= 1 and metadata.log.credentials_served >= 1
    assert metadata.log.without_token == 0  # never fell back to IMDSv1
    role = metadata.credentials
    signed = {(r.access_key, r.token) for r in recorder.log.requests}
    assert signed == {(role.access_key, role.token)}, recorder.log.requests
    assert any(r.method == "GET" and r.path.endswith(sample_data.kiosk_key(0))
               for r in recorder.log.requests)


@pytest.mark.parametrize("refused", ["the listing", "an object"])
def test_an_s3_permission_the_role_lacks_is_one_line_naming_it(refused, on_an_instance, s3,
                                                               bucket, conn, caplog):
    """S3 answers AccessDenied when the role's policy lacks s3:ListBucket on the bucket or
    s3:GetObject on its objects. The line names the permission, not only keys the machine
    does not have; a refused object is loaded by the next run once the policy is fixed."""
    _, recorder = on_an_instance
    seed(s3, bucket, objects=2, rows_per_object=50)
    denied, permission = ((f"/{bucket}", "s3:ListBucket") if refused == "the listing"
                          else (f"/{bucket}/{sample_data.kiosk_key(0)}", "s3:GetObject"))
    recorder.denied.add(denied)
    assert run("-b", bucket) == 1
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "access denied" in line and permission in line, line
    assert "instance role" in line
    stored_first = sum(table_counts(conn).values())
    assert stored_first == (0 if refused == "the listing" else 50)
    recorder.denied.clear()
    assert run("-b", bucket) == 0
    assert sum(table_counts(conn).values()) == 100


def test_keys_in_the_settings_travel_with_their_session_token(s3_settings, s3, bucket):
    """Temporary keys in .env (AWS_ACCESS_KEY, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN)."""
    settings = load_settings({"AWS_ACCESS_KEY": "ASIAENVKEY", "AWS_SECRET_ACCESS_KEY": "env-secret",
                              "AWS_SESSION_TOKEN": "env-session-token",
                              "AWS_ENDPOINT_URL_S3": s3_settings.endpoint_url})
    client = extract.make_s3_client(settings.s3)
    frozen = client._request_signer._credentials.get_frozen_credentials()
    assert (frozen.access_key, frozen.token) == ("ASIAENVKEY", "env-session-token")
    assert extract.list_museum_objects(client, bucket).kiosk == []


def test_no_credentials_anywhere_is_one_line(s3_settings, db, kafka_settings, monkeypatch,
                                             tmp_path, caplog):
    configure(monkeypatch, {"DB_HOST": db.host, "DB_PORT": str(db.port), "DB_NAME": db.name,
                            "DB_USER": db.user, "DB_PASS": db.password,
                            "AWS_ENDPOINT_URL_S3": s3_settings.endpoint_url,
                            "AWS_CONFIG_FILE": str(tmp_path / "none"),
                            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                            "AWS_EC2_METADATA_DISABLED": "true"})
    monkeypatch.setattr(localstack, "STATE_DIR", tmp_path / "local-stack")
    assert run("-b", "sigma-resources-museum") == 1
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "no AWS credentials found" in line and "instance role or AWS_PROFILE" in line
    assert not (tmp_path / "local-stack").exists()


@pytest.mark.parametrize("configured, missing", [
    ({"BOOTSTRAP_SERVERS": "127.0.0.1:9"}, "DB_HOST"),
    ({"AWS_ACCESS_KEY": "k", "AWS_SECRET_ACCESS_KEY": "s"}, "DB_HOST"),
])
def test_a_missing_database_setting_is_one_line_when_other_services_are_configured(
        configured, missing, monkeypatch, tmp_path, caplog):
    configure(monkeypatch, configured)
    monkeypatch.setattr(localstack, "STATE_DIR", tmp_path / "local-stack")
    assert run() == 2
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert line.startswith(f"configuration error: {missing} is not set")
    assert not (tmp_path / "local-stack").exists()
