"""Tests of the sample-data generator and of the reference classifier the other tests trust.

Why: every pipeline and consumer test is only as good as the data it is fed and the oracle it
is checked against, so both are pinned here: format identical to the real objects, every SPEC §2
rejection present, nothing invalid when anomalies are off, and the oracle's verdicts on
hand-picked edge cases.
"""
from __future__ import annotations

import importlib
import json
import logging
import re
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import pytest

# The module lives at the project root; make it importable however pytest is invoked.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sd = importlib.import_module("sample_data")

CSV_REASONS = {
    "missing_at", "invalid_at", "outside_opening_hours", "missing_site", "unknown_site",
    "missing_val", "invalid_val", "missing_type", "invalid_type", "unexpected_type",
}
VALID = {"rating", "request"}
AT_CSV = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
AT_KAFKA = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}[+-]\d{2}:\d{2}")


@pytest.fixture(scope="module")
def csv_20k() -> bytes:
    return sd.generate_kiosk_csv(20_000, seed=7)


@pytest.fixture(scope="module")
def messages_50k() -> list[bytes]:
    return sd.generate_messages(50_000, seed=3)


def _body_lines(csv_bytes: bytes) -> list[bytes]:
    return csv_bytes.split(b"\n")[1:-1]


# --- kiosk CSV --------------------------------------------------------------------------------

def test_csv_is_deterministic_for_a_seed() -> None:
    assert sd.generate_kiosk_csv(3_000, seed=5) == sd.generate_kiosk_csv(3_000, seed=5)
    assert sd.generate_kiosk_csv(3_000, seed=5) != sd.generate_kiosk_csv(3_000, seed=6)
    assert (sd.generate_kiosk_csv(500, seed=1, anomalies=False)
            == sd.generate_kiosk_csv(500, seed=1, anomalies=False))


def test_csv_header_and_line_format(csv_20k: bytes) -> None:
    assert csv_20k.startswith(b"at,site,val,type\n")
    assert csv_20k.endswith(b"\n") and b"\r" not in csv_20k
    lines = _body_lines(csv_20k)
    assert len(lines) == 20_000
    assert all(line.count(b",") == 3 for line in lines)
    ats = [line.split(b",")[0].decode() for line in lines]
    on_day = [at for at in ats if AT_CSV.fullmatch(at) and at.startswith("2023-03-06 ")]
    assert len(on_day) > 19_000
    # The rest are the planted missing_at / invalid_at rows.
    reasons = sd.expected_reasons(csv_20k)
    assert len(ats) - len(on_day) <= reasons["missing_at"] + reasons["invalid_at"]


def test_csv_without_anomalies_is_all_valid_and_shaped_like_the_real_ones() -> None:
    data = sd.generate_kiosk_csv(20_000, seed=11, anomalies=False, day="2024-10-21")
    reasons = sd.expected_reasons(data)
    assert set(reasons) <= VALID
    assert sum(reasons.values()) == 20_000
    assert 0.02 < reasons["request"] / 20_000 < 0.05
    rows = [line.decode().split(",") for line in _body_lines(data)]
    assert {row[1] for row in rows} == {"0", "1", "2", "3", "4"}
    assert {row[2] for row in rows} == {"-1", "0", "1", "2", "3", "4"}
    assert {row[3] for row in rows} == {"", "0.0", "1.0"}
    assert all(row[0].startswith("2024-10-21 ") for row in rows)
    hours = Counter(int(row[0][11:13]) for row in rows)
    # A day with a late-morning and an afternoon bump, no dead hour.
    assert all(hours[h] > 200 for h in range(9, 18))
    assert hours[11] > hours[9] and hours[15] > hours[17]


def test_csv_every_anomaly_kind_is_present(csv_20k: bytes) -> None:
    reasons = sd.expected_reasons(csv_20k)
    assert CSV_REASONS <= set(reasons)
    assert sum(reasons.values()) == 20_000
    invalid = sum(n for reason, n in reasons.items() if reason not in VALID)
    assert 0.03 <= invalid / 20_000 <= 0.05
    assert 0.015 <= reasons["outside_opening_hours"] / 20_000 <= 0.035


def test_csv_has_boundary_rows_and_exact_duplicates(csv_20k: bytes) -> None:
    lines = _body_lines(csv_20k)
    clocks = {line[11:19] for line in lines}
    assert {b"08:45:00", b"18:15:00", b"08:44:59", b"18:15:01"} <= clocks
    repeats = sum(n - 1 for n in Counter(lines).values() if n > 1)
    assert repeats >= 0.003 * 20_000


def test_csv_rows_are_not_sorted_by_time(csv_20k: bytes) -> None:
    ats = [line[:19] for line in _body_lines(csv_20k)[:200]]
    assert ats != sorted(ats)


def test_small_csv_still_shows_each_anomaly_once() -> None:
    # Like a real 535-row object: a handful of early rows and one of each other rejection.
    reasons = sd.expected_reasons(sd.generate_kiosk_csv(535, seed=0))
    assert CSV_REASONS <= set(reasons)
    assert 8 <= reasons["outside_opening_hours"] <= 20


def test_csv_edge_sizes_and_bad_arguments() -> None:
    assert sd.generate_kiosk_csv(0) == b"at,site,val,type\n"
    assert len(_body_lines(sd.generate_kiosk_csv(3, seed=2))) == 3
    with pytest.raises(ValueError):
        sd.generate_kiosk_csv(10, day=(datetime.now(sd.LONDON).date()
                                       + timedelta(days=3)).isoformat())
    with pytest.raises(ValueError):
        sd.generate_kiosk_csv(-1)


# --- exhibitions and decoys --------------------------------------------------------------------

def test_exhibition_records_and_file_names() -> None:
    assert [r["EXHIBITION_ID"] for r in sd.EXHIBITIONS] == [f"EXH_0{i}" for i in range(6)]
    keys = ["EXHIBITION_NAME", "EXHIBITION_ID", "FLOOR", "DEPARTMENT", "START_DATE",
            "DESCRIPTION"]
    for record in sd.EXHIBITIONS:
        assert list(record) == keys
        assert all(isinstance(value, str) and value for value in record.values())
        assert record["FLOOR"] in {"Vault", "1", "2", "3"}
        assert re.fullmatch(r"\d{2}/\d{2}/\d{2}", record["START_DATE"])
    assert sd.EXHIBITION_FILE_NAMES["EXH_00"] == "lmnh_exhibition_cave.json"
    assert sd.EXHIBITION_FILE_NAMES["EXH_05"] == "lmnh_exhibition_dino.json"
    assert set(sd.EXHIBITION_FILE_NAMES) == {r["EXHIBITION_ID"] for r in sd.EXHIBITIONS}
    assert all(re.fullmatch(r"lmnh_exhibition_[a-z]+\.json", name)
               for name in sd.EXHIBITION_FILE_NAMES.values())


def test_exhibition_json_matches_the_real_files_style() -> None:
    for record in sd.EXHIBITIONS:
        body = sd.exhibition_json(record)
        assert body.startswith(b'{\n    "EXHIBITION_NAME": "')
        assert body.endswith(b'"\n}')
        assert not body.endswith(b"\n")
        assert json.loads(body) == record
    cave = sd.exhibition_json(sd.EXHIBITIONS[0]).decode()
    assert '\n    "EXHIBITION_ID": "EXH_00",\n    "FLOOR": "1",\n' in cave


def test_decoys_are_plausible_and_never_look_like_kiosk_or_exhibition_objects() -> None:
    assert set(sd.DECOY_OBJECTS) == {
        "lmnh_exhibition", "lmnh_exhibition_dino.txt", "lms_exhibition_planets.json",
        "log_2.json", "uber-raw-data-jun14.csv", "joana_baby_beaver.jpg"}
    assert sd.DECOY_OBJECTS["joana_baby_beaver.jpg"].startswith(b"\xff\xd8\xff")
    uber = sd.DECOY_OBJECTS["uber-raw-data-jun14.csv"]
    assert uber.split(b"\n")[0] != b"at,site,val,type" and uber.count(b"\n") > 1
    for key in ("lms_exhibition_planets.json", "log_2.json", "lmnh_exhibition"):
        assert isinstance(json.loads(sd.DECOY_OBJECTS[key]), dict)
    for key in sd.DECOY_OBJECTS:
        assert not re.fullmatch(r"lmnh_exhibition_[^/]+\.json", key)
        assert not re.fullmatch(r"lmnh_hist_data_\d+\.csv", key)


# --- the reference classifier itself -----------------------------------------------------------

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
AT = "2024-10-21T09:21:24.254719+01:00"


def _message(**fields: object) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize(("payload", "expected"), [
    (_message(at=AT, site="5", val=4), "rating"),
    (_message(at=AT, site="3", val=-1, type=0), "request"),
    (_message(at=AT, site=1, val=-1, type=1), "request"),
    (_message(at=AT, site="1.0", val=2.0), "rating"),
    (_message(at=AT, site=" 2 ", val="3"), "rating"),
    (_message(at=AT, site="2", val=-1, type="1.0"), "request"),
    (_message(at="2024-10-21 09:00:00", site="2", val=1), "rating"),
    (_message(at="2024-10-21T07:50:00+00:00", site="2", val=1), "rating"),  # 08:50 BST
    (_message(at="2024-10-21T08:45:00+01:00", site="2", val=1), "rating"),
    (_message(at="2024-10-21T18:15:00+01:00", site="2", val=1), "rating"),
    (_message(at="2024-10-21T07:30:00+00:00", site="2", val=1), "outside_opening_hours"),
    (_message(at="2024-10-21T18:15:00.5+01:00", site="2", val=1), "outside_opening_hours"),
    (_message(at="2024-10-21T08:44:59.999999+01:00", site="2", val=1),
     "outside_opening_hours"),
    (_message(at="2024-03-31 01:30:00", site="2", val=1), "invalid_at"),  # clocks went forward
    (_message(at="2024-02-30T10:00:00+00:00", site="2", val=1), "invalid_at"),
    (_message(at="ERR", site="2", val=1), "invalid_at"),
    (_message(at=12345, site="2", val=1), "invalid_at"),
    (_message(at="2099-06-15T10:00:00+01:00", site="2", val=1), "future_event"),
    (_message(at="2025-01-01T12:04:59+00:00", site="2", val=1), "rating"),
    (_message(at="2025-01-01T12:05:01+00:00", site="2", val=1), "future_event"),
    (_message(site="2", val=1), "missing_at"),
    (_message(at=None, site="2", val=1), "missing_at"),
    (_message(at=" ", site="2", val=1), "missing_at"),
    (_message(at="bad", val=1), "invalid_at"),
    (_message(at=AT, val=1), "missing_site"),
    (_message(at=AT, site="", val=1), "missing_site"),
    (_message(at=AT, site="6", val=1), "unknown_site"),
    (_message(at=AT, site="None", val=1), "unknown_site"),
    (_message(at=AT, site="INF", val=1), "unknown_site"),
    (_message(at=AT, site="1.5", val=1), "unknown_site"),
    (_message(at=AT, site=True, val=1), "unknown_site"),
    (_message(at=AT, site="2"), "missing_val"),
    (_message(at=AT, site="2", val=None, type=0), "missing_val"),
    (_message(at=AT, site="2", val=5), "invalid_val"),
    (_message(at=AT, site="2", val=-2), "invalid_val"),
    (_message(at=AT, site="2", val="ERR"), "invalid_val"),
    (_message(at=AT, site="2", val=True), "invalid_val"),
    (_message(at=AT, site="2", val=1.5), "invalid_val"),
    (_message(at=AT, site="2", val=-1), "missing_type"),
    (_message(at=AT, site="2", val=-1, type=None), "missing_type"),
    (_message(at=AT, site="2", val=-1, type=2), "invalid_type"),
    (_message(at=AT, site="2", val=-1, type=-1), "invalid_type"),
    (_message(at=AT, site="2", val=-1, type="INF"), "invalid_type"),
    (_message(at=AT, site="2", val=3, type=0), "unexpected_type"),
    (_message(at=AT, site="2", val=3, type=None), "rating"),
    (_message(at=AT, site="2", val=3, extra="ignored"), "rating"),
    (b'{"at": "2024-', "malformed_json"),
    (b'{"at": "' + AT.encode() + b'", "site": "2", "val": NaN}', "malformed_json"),
    (b'{"at": "' + AT.encode() + b'", "site": "2", "val": Infinity}', "malformed_json"),
    (b"\xff\xfe{}", "malformed_json"),
    (b"", "malformed_json"),
    (b"[1, 2]", "not_an_object"),
    (b'"hello"', "not_an_object"),
    (b"null", "not_an_object"),
])
def test_reference_classifier_follows_spec_table(payload: bytes, expected: str) -> None:
    assert sd.classify_message(payload, now=NOW) == expected


def test_reference_classifier_uses_the_known_sets_it_is_given() -> None:
    payload = _message(at=AT, site="6", val=5, type=None)
    assert sd.classify_message(payload, now=NOW) == "unknown_site"
    assert sd.classify_message(payload, known_sites=range(7), now=NOW) == "invalid_val"
    assert sd.classify_message(payload, known_sites=range(7), ratings=range(6),
                               now=NOW) == "rating"
    late = _message(at="2024-10-21T19:00:00+01:00", site="1", val=1)
    assert sd.classify_message(late, now=NOW, opening_hours=(time(8), time(20))) == "rating"


def test_expected_reasons_on_a_hand_written_csv() -> None:
    data = (b"at,site,val,type\n"
            b"2023-03-06 08:45:00,1,2,\n"
            b"2023-03-06 18:15:00,1,-1,0.0\n"
            b"2023-03-06 08:44:59,1,2,\n"
            b"\n"
            b"2023-03-06 18:15:01,1,2,\n"
            b",1,2,\n"
            b"2023-03-06 25:61:00,1,2,\n"
            b"2023-03-06 10:00:00,,2,\n"
            b"2023-03-06 10:00:00,None,2,\n"
            b"2023-03-06 10:00:00,1,,\n"
            b"2023-03-06 10:00:00,1,INF,\n"
            b"2023-03-06 10:00:00,1,-1,\n"
            b"2023-03-06 10:00:00,1,-1,2.0\n"
            b"2023-03-06 10:00:00,1,3,0.0\n"
            b"2023-03-06 10:00:00,1,-1,1.0\n")
    assert sd.expected_reasons(data) == Counter({
        "rating": 1, "request": 2, "outside_opening_hours": 2, "missing_at": 1,
        "invalid_at": 1, "missing_site": 1, "unknown_site": 1, "missing_val": 1,
        "invalid_val": 1, "missing_type": 1, "invalid_type": 1, "unexpected_type": 1})


# --- Kafka messages ----------------------------------------------------------------------------

def test_messages_are_deterministic_given_start() -> None:
    start = datetime(2024, 10, 21, 9, 21, 24, 254719, tzinfo=sd.LONDON)
    first = sd.generate_messages(2_000, seed=4, start=start)
    assert first == sd.generate_messages(2_000, seed=4, start=start)
    assert first != sd.generate_messages(2_000, seed=5, start=start)
    clean = sd.generate_messages(5, seed=4, invalid_fraction=0.0, start=start)
    assert clean[0].startswith(b'{"at": "2024-10-21T09:21:24.254719+01:00", "site": "')


def test_messages_invalid_share_and_every_kind(messages_50k: list[bytes]) -> None:
    reasons = Counter(sd.classify_message(m) for m in messages_50k)
    invalid = sum(n for reason, n in reasons.items() if reason not in VALID)
    assert 0.10 <= invalid / len(messages_50k) <= 0.22
    assert set(sd.REASON_CODES) <= set(reasons)
    assert reasons["request"] > 0


def test_valid_messages_look_like_the_real_stream(messages_50k: list[bytes]) -> None:
    now = datetime.now(UTC)
    valid = [m for m in messages_50k if sd.classify_message(m, now=now) in VALID]
    assert len(valid) > 0.75 * len(messages_50k)
    for payload in valid:
        message = json.loads(payload)
        assert list(message) in (["at", "site", "val"], ["at", "site", "val", "type"])
        assert payload == json.dumps(message).encode()
        assert isinstance(message["site"], str) and isinstance(message["val"], int)
        assert AT_KAFKA.fullmatch(message["at"])
        moment = datetime.fromisoformat(message["at"])
        assert moment.utcoffset() == moment.astimezone(sd.LONDON).utcoffset()
        assert sd.OPENING_TIME <= moment.astimezone(sd.LONDON).time() <= sd.CLOSING_TIME
        assert moment <= now
        if message["val"] == -1:
            assert message["type"] in (0, 1)
    ats = [datetime.fromisoformat(json.loads(m)["at"]) for m in valid]
    assert ats == sorted(ats)


def test_stream_skips_the_night_and_follows_the_clock_change() -> None:
    start = datetime(2024, 10, 26, 18, 0, tzinfo=sd.LONDON)
    messages = sd.generate_messages(300, seed=1, invalid_fraction=0.0, start=start,
                                    interval_seconds=60.0)
    ats = [json.loads(m)["at"] for m in messages]
    assert ats[0] == "2024-10-26T18:00:00.000000+01:00"
    days = Counter(at[:10] for at in ats)
    assert set(days) == {"2024-10-26", "2024-10-27"}
    assert min(at for at in ats if at.startswith("2024-10-27")).startswith("2024-10-27T09:0")
    assert all(at.endswith("+00:00") for at in ats if at.startswith("2024-10-27"))
    assert {sd.classify_message(m, now=NOW) for m in messages} <= VALID


def test_messages_bad_arguments() -> None:
    assert sd.generate_messages(0) == []
    with pytest.raises(ValueError):
        sd.generate_messages(10, start=datetime(2024, 10, 21, 7, 0, tzinfo=sd.LONDON))
    with pytest.raises(ValueError):
        sd.generate_messages(10, invalid_fraction=1.5)


# --- seeding a bucket --------------------------------------------------------------------------

def test_seed_bucket_writes_the_expected_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    boto3 = pytest.importorskip("boto3")
    moto = pytest.importorskip("moto")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    with moto.mock_aws():
        client = boto3.client("s3", region_name="eu-west-2")
        keys = sd.seed_bucket(client, "sigma-resources-museum", objects=3, rows=200, seed=9)
        expected = ({f"lmnh_hist_data_{i}.csv" for i in range(3)}
                    | set(sd.EXHIBITION_FILE_NAMES.values()) | set(sd.DECOY_OBJECTS))
        assert set(keys) == expected and len(keys) == len(expected)
        listed = client.list_objects_v2(Bucket="sigma-resources-museum")["Contents"]
        assert {item["Key"] for item in listed} == expected
        body = client.get_object(Bucket="sigma-resources-museum",
                                 Key="lmnh_hist_data_1.csv")["Body"].read()
        assert body == sd.generate_kiosk_csv(200, seed=10)
        cave = client.get_object(Bucket="sigma-resources-museum",
                                 Key="lmnh_exhibition_cave.json")["Body"].read()
        assert cave == sd.exhibition_json(sd.EXHIBITIONS[0])
        # Seeding again (bucket already there) is fine and rewrites the same keys.
        assert sd.seed_bucket(client, "sigma-resources-museum", objects=3, rows=200,
                              seed=9) == keys


def test_command_line_options() -> None:
    args = sd.build_parser().parse_args(["--objects", "4", "--rows", "5000"])
    assert (args.objects, args.rows, args.seed, args.no_anomalies, args.bucket) == (
        4, 5000, 0, False, None)
    with pytest.raises(SystemExit):
        sd.main(["--rows", "-1"])


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    """main() configures the root logger like every entry point; undo it for later tests."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_root_logger")
def test_command_line_seeds_the_configured_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    boto3 = pytest.importorskip("boto3")
    moto = pytest.importorskip("moto")
    settings = pytest.importorskip("settings")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "eu-west-2", "BUCKET": "demo-bucket"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "LMNH_STACK"):
        monkeypatch.delenv(name, raising=False)
    # An explicit S3 setting, so the local stack is never started; .env is not read.
    monkeypatch.setattr(settings, "read_environment", lambda *a, **k: dict(env))
    with moto.mock_aws():
        assert sd.main(["--objects", "2", "--rows", "100", "--seed", "3"]) == 0
        client = boto3.client("s3", region_name="eu-west-2")
        keys = {o["Key"] for o in client.list_objects_v2(Bucket="demo-bucket")["Contents"]}
        assert {"lmnh_hist_data_0.csv", "lmnh_hist_data_1.csv",
                "lmnh_exhibition_cave.json", "joana_baby_beaver.jpg"} <= keys
        assert "lmnh_hist_data_2.csv" not in keys
