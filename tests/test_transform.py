"""transform.py: SPEC §2's event rules, for CSV lines and Kafka payloads alike, with no services.

Why: every row that lands or is rejected was decided here. Each reason code is pinned for both
sources, with the rule order (the first failing rule names the rejection), the boundaries that a
vectorised implementation gets wrong first (opening hours to the microsecond, DST, "exactly five
minutes ahead", what counts as an integer), and conservation: every event in gets exactly one
outcome. The fast implementation is cross-checked against the naive reference classifier in
sample_data.py on generated data.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from datetime import UTC, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pytest

import sample_data
import transform
from helpers import text_paths_only
from transform import ExhibitionError, MasterData, Rules

LONDON = ZoneInfo("Europe/London")
# Surrogate keys deliberately differ from the values, so a mix-up of the two shows.
MASTER = MasterData(exhibitions={site: 100 + site for site in range(6)},
                    ratings={value: 20 + value for value in range(5)},
                    requests={0: 30, 1: 31})
RULES = Rules()
# Processing time of most tests: noon GMT (= noon in London) on 1 November 2024.
NOW = datetime(2024, 11, 1, 12, 0, 0, tzinfo=UTC)
AT = "2024-07-01 10:00:00"            # a valid CSV time (09:00Z, summer)
AT_ISO = "2024-07-01T10:00:00.123456+01:00"  # a valid Kafka time


# --------------------------------------------------------------------------- helpers
def outcomes(parsed: transform.ParsedEvents, master: MasterData = MASTER, now: datetime = NOW,
             rules: Rules = RULES) -> dict[int, str]:
    """position -> "rating" / "request" / reason code, checking that no position has two."""
    outcome = transform.validate_events(parsed.events, master, rules, now)
    labelled: list[tuple[int, str]] = []
    labelled += [(int(p), "rating") for p in outcome.ratings["position"]]
    labelled += [(int(p), "request") for p in outcome.requests["position"]]
    for frame in (parsed.rejections, outcome.rejections):
        labelled += [(int(p), r) for p, r in zip(frame["position"], frame["reason"])]
    result = dict(labelled)
    assert len(result) == len(labelled), "a position got more than one outcome"
    return result


def csv_outcome(line: str, **kwargs) -> str:
    result = outcomes(transform.parse_csv_lines([line], 2), **kwargs)
    assert list(result) == [2]
    return result[2]


def message(**fields) -> bytes:
    return json.dumps(fields).encode()


def kafka_outcome(payload: bytes | None, **kwargs) -> str:
    result = outcomes(transform.parse_messages([payload], [0], [7]), **kwargs)
    assert list(result) == [7]
    return result[7]


def validate_csv(lines: list[str], first_line_no: int = 2, **kwargs):
    parsed = transform.parse_csv_lines(lines, first_line_no)
    kwargs.setdefault("now", NOW)
    return parsed, transform.validate_events(parsed.events, kwargs.pop("master", MASTER),
                                             kwargs.pop("rules", RULES), **kwargs)


def validate_messages(payloads: list[bytes | None], partition: int = 0, first_offset: int = 0,
                      **kwargs):
    parsed = transform.parse_messages(payloads, [partition] * len(payloads),
                                      list(range(first_offset, first_offset + len(payloads))))
    kwargs.setdefault("now", NOW)
    return parsed, transform.validate_events(parsed.events, kwargs.pop("master", MASTER),
                                             kwargs.pop("rules", RULES), **kwargs)


# --------------------------------------------------------------------------- every reason, CSV
CSV_CASES = [
    # valid
    (f"{AT},1,3,", "rating"),
    (f"{AT},1,0,", "rating"),
    (f"{AT},1,-1,0.0", "request"),
    (f"{AT},1,-1,1.0", "request"),
    (f"{AT},5,4,", "rating"),
    # 1 missing_at
    (",1,3,", "missing_at"),
    ("   ,1,3,", "missing_at"),
    # 2 invalid_at
    ("not a date,1,3,", "invalid_at"),
    ("ERR,1,3,", "invalid_at"),
    ("2024-02-30 10:00:00,1,3,", "invalid_at"),
    ("2024-07-01 25:61:00,1,3,", "invalid_at"),
    ("2024-13-01 10:00:00,1,3,", "invalid_at"),
    ("2024-07-01 12:60:00,1,3,", "invalid_at"),
    # 3 outside_opening_hours
    ("2024-07-01 08:44:59,1,3,", "outside_opening_hours"),
    ("2024-07-01 18:15:01,1,3,", "outside_opening_hours"),
    ("2024-07-01 00:00:00,1,3,", "outside_opening_hours"),
    # 4 future_event (NOW is 12:00 in London)
    ("2024-11-01 12:05:01,1,3,", "future_event"),
    ("2099-06-15 10:00:00,1,3,", "future_event"),
    # 5 missing_site
    (f"{AT},,3,", "missing_site"),
    (f"{AT}, ,3,", "missing_site"),
    # 6 unknown_site
    (f"{AT},6,3,", "unknown_site"),
    (f"{AT},12,3,", "unknown_site"),
    (f"{AT},-1,3,", "unknown_site"),
    (f"{AT},ERR,3,", "unknown_site"),
    (f"{AT},INF,3,", "unknown_site"),
    (f"{AT},None,3,", "unknown_site"),
    (f"{AT},NaN,3,", "unknown_site"),
    (f"{AT},1.5,3,", "unknown_site"),
    # 7 missing_val
    (f"{AT},1,,", "missing_val"),
    (f"{AT},1, ,", "missing_val"),
    # 8 invalid_val
    (f"{AT},1,5,", "invalid_val"),
    (f"{AT},1,-2,", "invalid_val"),
    (f"{AT},1,ERR,", "invalid_val"),
    (f"{AT},1,INF,", "invalid_val"),
    (f"{AT},1,None,", "invalid_val"),
    (f"{AT},1,NaN,", "invalid_val"),
    (f"{AT},1,2.5,", "invalid_val"),
    # 9 missing_type
    (f"{AT},1,-1,", "missing_type"),
    (f"{AT},1,-1, ", "missing_type"),
    # 10 invalid_type
    (f"{AT},1,-1,2.0", "invalid_type"),
    (f"{AT},1,-1,-1.0", "invalid_type"),
    (f"{AT},1,-1,ERR", "invalid_type"),
    (f"{AT},1,-1,INF", "invalid_type"),
    (f"{AT},1,-1,0.5", "invalid_type"),
    # 11 unexpected_type
    (f"{AT},1,3,0.0", "unexpected_type"),
    (f"{AT},1,0,1.0", "unexpected_type"),
    (f"{AT},1,4,ERR", "unexpected_type"),
]


@pytest.mark.parametrize(("line", "expected"), CSV_CASES)
def test_csv_line_gets_the_reason_of_spec_section_2(line, expected):
    assert csv_outcome(line) == expected


RULE_ORDER_CSV = [
    # several rules fail; the first in SPEC §2's order names the rejection
    (",9,9,9", "missing_at"),
    ("garbage,,,", "invalid_at"),
    ("2024-07-01 07:00:00,9,ERR,7", "outside_opening_hours"),
    ("2099-06-15 07:00:00,1,3,", "outside_opening_hours"),  # also in the future
    ("2099-06-15 10:00:00,9,9,9", "future_event"),
    (f"{AT},,ERR,", "missing_site"),
    (f"{AT},7,,", "unknown_site"),
    (f"{AT},7,-1,", "unknown_site"),
    (f"{AT},1,,0.0", "missing_val"),
    (f"{AT},1,9,0.0", "invalid_val"),
    (f"{AT},1,-1,", "missing_type"),
]


@pytest.mark.parametrize(("line", "expected"), RULE_ORDER_CSV)
def test_first_failing_rule_wins_in_csv(line, expected):
    assert csv_outcome(line) == expected


# --------------------------------------------------------------------------- every reason, Kafka
_ABSENT = object()


def msg(at=AT_ISO, site="1", val=3, type=_ABSENT, **extra) -> bytes:  # noqa: A002 - SPEC's key
    fields = {"at": at, "site": site, "val": val}
    if type is not _ABSENT:
        fields["type"] = type
    fields = {k: v for k, v in fields.items() if v is not _ABSENT}
    fields.update(extra)
    return json.dumps(fields).encode()


KAFKA_CASES = [
    # valid
    (msg(), "rating"),
    (msg(val=0), "rating"),
    (msg(val=-1, type=0), "request"),
    (msg(val=-1, type=1), "request"),
    (msg(site="5", val=4), "rating"),
    (msg(at="2024-07-01T09:00:00Z"), "rating"),
    # 1 missing_at
    (msg(at=_ABSENT), "missing_at"),
    (msg(at=None), "missing_at"),
    (msg(at=""), "missing_at"),
    (msg(at=" "), "missing_at"),
    # 2 invalid_at
    (msg(at="ERR"), "invalid_at"),
    (msg(at="None"), "invalid_at"),
    (msg(at="2024-10-21 9am"), "invalid_at"),
    (msg(at="2024-02-30T10:00:00+00:00"), "invalid_at"),
    (msg(at="2024-07-01T25:61:00.000000+01:00"), "invalid_at"),
    (msg(at=1719824400), "invalid_at"),
    (msg(at=True), "invalid_at"),
    (msg(at=["2024-07-01T10:00:00+01:00"]), "invalid_at"),
    (msg(at={"at": "2024-07-01T10:00:00+01:00"}), "invalid_at"),
    # 3 outside_opening_hours
    (msg(at="2024-07-01T08:44:59.999999+01:00"), "outside_opening_hours"),
    (msg(at="2024-07-01T18:15:00.500000+01:00"), "outside_opening_hours"),
    (msg(at="2024-07-01T23:59:59.999999+01:00"), "outside_opening_hours"),
    # 4 future_event
    (msg(at="2099-06-15T10:00:00.000000+01:00"), "future_event"),
    (msg(at="2024-11-01T12:05:01+00:00"), "future_event"),
    # 5 missing_site
    (msg(site=_ABSENT), "missing_site"),
    (msg(site=None), "missing_site"),
    (msg(site=""), "missing_site"),
    # 6 unknown_site
    (msg(site="6"), "unknown_site"),
    (msg(site=6), "unknown_site"),
    (msg(site=-1), "unknown_site"),
    (msg(site="ERR"), "unknown_site"),
    (msg(site="INF"), "unknown_site"),
    (msg(site="None"), "unknown_site"),
    (msg(site="NaN"), "unknown_site"),
    (msg(site=1.5), "unknown_site"),
    (msg(site="1.5"), "unknown_site"),
    (msg(site=True), "unknown_site"),     # True == 1 in Python, but a boolean is no integer
    (msg(site=False), "unknown_site"),    # False == 0 likewise
    (msg(site=[1]), "unknown_site"),
    (msg(site={"site": 1}), "unknown_site"),
    # 7 missing_val
    (msg(val=_ABSENT), "missing_val"),
    (msg(val=None), "missing_val"),
    (msg(val=""), "missing_val"),
    (msg(val="  "), "missing_val"),
    # 8 invalid_val
    (msg(val=5), "invalid_val"),
    (msg(val="5"), "invalid_val"),
    (msg(val=-2), "invalid_val"),
    (msg(val=True), "invalid_val"),
    (msg(val=False), "invalid_val"),
    (msg(val="INF"), "invalid_val"),
    (msg(val="ERR"), "invalid_val"),
    (msg(val="None"), "invalid_val"),
    (msg(val="NaN"), "invalid_val"),
    (msg(val=1.5), "invalid_val"),
    (msg(val="1.5"), "invalid_val"),
    (msg(val=-0.5), "invalid_val"),
    (msg(val=[2]), "invalid_val"),
    (msg(val={"val": 2}), "invalid_val"),
    (b'{"at": "2024-07-01T10:00:00+01:00", "site": "1", "val": 1e400}', "invalid_val"),
    # 9 missing_type
    (msg(val=-1), "missing_type"),
    (msg(val=-1, type=None), "missing_type"),
    (msg(val=-1, type=""), "missing_type"),
    (msg(val="-1", type=" "), "missing_type"),
    # 10 invalid_type
    (msg(val=-1, type=2), "invalid_type"),
    (msg(val=-1, type=-1), "invalid_type"),
    (msg(val=-1, type="ERR"), "invalid_type"),
    (msg(val=-1, type="INF"), "invalid_type"),
    (msg(val=-1, type=True), "invalid_type"),
    (msg(val=-1, type=False), "invalid_type"),
    (msg(val=-1, type=0.5), "invalid_type"),
    (msg(val=-1, type=[0]), "invalid_type"),
    # 11 unexpected_type
    (msg(val=3, type=0), "unexpected_type"),
    (msg(val=3, type="0"), "unexpected_type"),
    (msg(val=3, type=0.0), "unexpected_type"),
    (msg(val=3, type=False), "unexpected_type"),
    (msg(val=3, type="ERR"), "unexpected_type"),
]


@pytest.mark.parametrize(("payload", "expected"), KAFKA_CASES)
def test_kafka_message_gets_the_reason_of_spec_section_2(payload, expected):
    assert kafka_outcome(payload) == expected


RULE_ORDER_KAFKA = [
    (msg(at=None, site="9", val="ERR"), "missing_at"),
    (msg(at="ERR", site=None, val=None), "invalid_at"),
    # outside hours with an unknown site: the hours rule comes first
    (msg(at="2024-07-01T07:30:00+01:00", site="9"), "outside_opening_hours"),
    (msg(at="2099-07-01T07:30:00+01:00", site="9"), "outside_opening_hours"),
    (msg(at="2099-07-01T10:30:00+01:00", site=None), "future_event"),
    (msg(site=None, val=None), "missing_site"),
    (msg(site="9", val=None), "unknown_site"),
    (msg(val=None, type=0), "missing_val"),
    (msg(val=9, type=0), "invalid_val"),
    (msg(val=True, type=0), "invalid_val"),
]


@pytest.mark.parametrize(("payload", "expected"), RULE_ORDER_KAFKA)
def test_first_failing_rule_wins_in_kafka(payload, expected):
    assert kafka_outcome(payload) == expected


def test_every_rejection_has_words_saying_what_was_wrong():
    payloads = [payload for payload, expected in KAFKA_CASES if expected not in
                ("rating", "request")]
    _, outcome = validate_messages(payloads)
    assert len(outcome.rejections) == len(payloads)
    assert all(isinstance(d, str) and len(d) > 10 for d in outcome.rejections["detail"])
    unknown = outcome.rejections[outcome.rejections["reason"] == "unknown_site"]
    assert any("'ERR'" in d for d in unknown["detail"])


# --------------------------------------------------------------------------- "an integer value"
@pytest.mark.parametrize("site", [1, 1.0, "1", "1.0", " 1 ", "+1"])
def test_site_as_any_integer_value_is_accepted(site):
    _, outcome = validate_messages([msg(site=site)])
    assert outcome.ratings["exhibition_id"].tolist() == [101]


@pytest.mark.parametrize(("val", "rating_id"), [(0, 20), (0.0, 20), ("0", 20), ("0.0", 20),
                                                 ("5.0", None), (4, 24), ("4", 24), ("4.0", 24),
                                                 (1.0, 21), ("1.0", 21)])
def test_val_as_any_integer_value_is_accepted(val, rating_id):
    _, outcome = validate_messages([msg(val=val)])
    if rating_id is None:
        assert outcome.rejections["reason"].tolist() == ["invalid_val"]
    else:
        assert outcome.ratings["rating_id"].tolist() == [rating_id]


@pytest.mark.parametrize(("val", "typ", "request_id"),
                         [(-1, 0, 30), (-1, 1, 31), (-1.0, 0.0, 30), ("-1", "1", 31),
                          ("-1.0", "1.0", 31), (-1, "0.0", 30)])
def test_call_with_any_integer_type_is_accepted(val, typ, request_id):
    _, outcome = validate_messages([msg(val=val, type=typ)])
    assert outcome.requests["request_id"].tolist() == [request_id]


def test_csv_call_types_are_the_float_strings_of_the_real_files():
    _, outcome = validate_csv([f"{AT},2,-1,0.0", f"{AT},3,-1,1.0", f"{AT},4,-1,1"])
    assert len(outcome.rejections) == 0
    assert outcome.requests["request_id"].tolist() == [30, 31, 31]
    assert outcome.requests["request_value"].tolist() == [0, 1, 1]
    assert outcome.requests["site"].tolist() == [2, 3, 4]
    assert outcome.requests["exhibition_id"].tolist() == [102, 103, 104]


def test_rating_with_a_float_type_is_unexpected_and_call_without_type_is_missing():
    assert csv_outcome(f"{AT},1,2,0.0") == "unexpected_type"
    assert csv_outcome(f"{AT},1,-1,") == "missing_type"
    assert kafka_outcome(msg(val=2, type="0.0")) == "unexpected_type"
    assert kafka_outcome(msg(val=-1, type="")) == "missing_type"


def test_a_long_fraction_is_not_an_integer_value():
    """SPEC §2: fractions are not integer values, however close to one they are. A string
    value keeps every digit, so "1.0000000000000001" is a fraction (float() rounds it to 1)."""
    assert csv_outcome(f"{AT},1.0000000000000001,2,") == "unknown_site"
    assert kafka_outcome(msg(val="2.0000000000000001")) == "invalid_val"


# --------------------------------------------------------------------------- opening hours
@pytest.mark.parametrize(("clock", "expected"), [
    ("08:45:00", "rating"), ("18:15:00", "rating"), ("12:00:00", "rating"),
    ("08:44:59", "outside_opening_hours"), ("18:15:01", "outside_opening_hours"),
])
def test_opening_hours_are_inclusive_to_the_second_in_csv(clock, expected):
    assert csv_outcome(f"2024-07-01 {clock},1,2,") == expected


@pytest.mark.parametrize(("clock", "expected"), [
    ("08:45:00.000000", "rating"), ("18:15:00.000000", "rating"), ("18:15:00", "rating"),
    ("08:44:59.999999", "outside_opening_hours"), ("18:15:00.000001", "outside_opening_hours"),
    ("18:15:00.500000", "outside_opening_hours"), ("18:15:01", "outside_opening_hours"),
])
def test_opening_hours_are_inclusive_to_the_microsecond_in_kafka(clock, expected):
    assert kafka_outcome(msg(at=f"2024-07-01T{clock}+01:00")) == expected


@pytest.mark.parametrize(("at", "expected", "utc"), [
    # 08:00 UTC is before opening in UTC, but 09:00 BST in London: valid
    ("2024-07-01T08:00:00+00:00", "rating", "2024-07-01T08:00:00+00:00"),
    ("2024-07-01T08:00:00Z", "rating", "2024-07-01T08:00:00+00:00"),
    ("2024-07-01T03:00:00-05:00", "rating", "2024-07-01T08:00:00+00:00"),
    # 17:45 UTC is inside opening hours in UTC, but 18:45 BST in London: outside
    ("2024-07-01T17:45:00+00:00", "outside_opening_hours", None),
    ("2024-07-01T07:44:59+00:00", "outside_opening_hours", None),
    # in winter London is on UTC
    ("2024-01-15T08:50:00+00:00", "rating", "2024-01-15T08:50:00+00:00"),
    ("2024-01-15T18:14:00+00:00", "rating", "2024-01-15T18:14:00+00:00"),
    ("2024-01-15T09:50:00+01:00", "rating", "2024-01-15T08:50:00+00:00"),
    ("2024-01-15T08:40:00+00:00", "outside_opening_hours", None),
])
def test_aware_timestamps_are_judged_by_london_local_time(at, expected, utc):
    _, outcome = validate_messages([msg(at=at)])
    assert kafka_outcome(msg(at=at)) == expected
    if utc:
        assert outcome.ratings["event_at"].tolist() == [pd.Timestamp(utc)]


def test_opening_hours_come_from_the_rules_argument():
    late = Rules(opening=time(10, 0), closing=time(20, 0))
    assert csv_outcome("2024-07-01 09:30:00,1,2,") == "rating"
    assert csv_outcome("2024-07-01 09:30:00,1,2,", rules=late) == "outside_opening_hours"
    assert csv_outcome("2024-07-01 19:30:00,1,2,", rules=late) == "rating"
    assert csv_outcome("2024-07-01 20:00:01,1,2,", rules=late) == "outside_opening_hours"


# --------------------------------------------------------------------------- DST
def test_naive_time_in_the_spring_forward_gap_is_invalid():
    assert csv_outcome("2024-03-31 01:30:00,1,2,") == "invalid_at"
    assert kafka_outcome(msg(at="2024-03-31T01:30:00")) == "invalid_at"


def test_naive_local_times_either_side_of_dst_store_the_right_utc_instant():
    _, outcome = validate_csv(["2024-03-31 09:00:00,1,2,", "2024-10-27 09:00:00,2,3,",
                               "2024-03-30 09:00:00,3,4,", "2024-10-26 09:00:00,4,0,"])
    assert len(outcome.rejections) == 0
    got = dict(zip(outcome.ratings["position"], outcome.ratings["event_at"]))
    assert got == {2: pd.Timestamp("2024-03-31T08:00:00Z"),   # BST after the spring change
                   3: pd.Timestamp("2024-10-27T09:00:00Z"),   # GMT after the autumn change
                   4: pd.Timestamp("2024-03-30T09:00:00Z"),   # GMT the day before
                   5: pd.Timestamp("2024-10-26T08:00:00Z")}   # BST the day before
    assert str(outcome.ratings["event_at"].dt.tz) == "UTC"


def test_naive_kafka_times_are_london_local_too():
    _, outcome = validate_messages([msg(at="2024-07-01T09:00:00.250000"),
                                    msg(at="2024-01-15 09:00:00")])
    assert outcome.ratings["event_at"].tolist() == [pd.Timestamp("2024-07-01T08:00:00.25Z"),
                                                    pd.Timestamp("2024-01-15T09:00:00Z")]


def test_microseconds_survive_to_the_stored_instant():
    _, outcome = validate_messages([msg(at="2024-10-21T09:21:24.254719+01:00")])
    assert outcome.ratings["event_at"].tolist() == [
        pd.Timestamp("2024-10-21T08:21:24.254719Z")]


# --------------------------------------------------------------------------- future events
def test_csv_event_exactly_five_minutes_ahead_is_valid_one_second_more_is_not():
    # NOW is 12:00:00 in London (GMT in November)
    assert csv_outcome("2024-11-01 12:05:00,1,2,") == "rating"
    assert csv_outcome("2024-11-01 12:05:01,1,2,") == "future_event"


@pytest.mark.parametrize("micro", [0, 15838, 47514, 55433, 500000, 999999])
def test_kafka_event_exactly_five_minutes_ahead_is_valid(micro):
    """The consumer's `now` has microseconds; the limit must be exact to the microsecond."""
    now = datetime(2024, 7, 1, 11, 0, 0, micro, tzinfo=UTC)
    limit = now + timedelta(minutes=5)
    assert kafka_outcome(msg(at=limit.isoformat()), now=now) == "rating"
    assert kafka_outcome(msg(at=(limit + timedelta(seconds=1)).isoformat()),
                         now=now) == "future_event"
    assert kafka_outcome(msg(at=(limit + timedelta(microseconds=1)).isoformat()),
                         now=now) == "future_event"


def test_far_future_and_far_past_years_are_classified_not_a_crash():
    """A year pandas cannot hold in nanoseconds is still a timestamp under SPEC §2: one odd
    message must not take the whole batch (or the consumer) down with it."""
    parsed, outcome = validate_messages([
        msg(at="2300-01-01T10:00:00+00:00"), msg(at="9999-12-31T10:00:00+00:00"),
        msg(at="1500-06-01T10:00:00+00:00"), msg()])
    assert outcome.count == 4
    reasons = dict(zip(outcome.rejections["position"], outcome.rejections["reason"]))
    assert reasons[0] == "future_event" and reasons[1] == "future_event"
    assert 3 in outcome.ratings["position"].tolist()
    assert csv_outcome("2300-01-01 10:00:00,1,2,") == "future_event"


def test_unusual_timestamp_forms_in_one_batch_do_not_crash_it():
    """ISO-8601 also has reduced-precision and basic forms; whatever they are judged to be, a
    batch mixing them with ordinary local times must still give every event one outcome."""
    parsed, outcome = validate_csv(["2024-07-01 09:00:00,1,2,", "2024-07-01T09+01:00,1,2,",
                                    "20240701T090000+0100,1,2,"])
    assert outcome.count == 3
    assert 2 in outcome.ratings["position"].tolist()


# --------------------------------------------------------------------------- master data
def test_unknown_keys_are_ignored():
    payload = msg(extra="x", SITE="9", Val=7, nested={"type": 1}, type2=5)
    assert kafka_outcome(payload) == "rating"
    assert kafka_outcome(msg(val=-1, type=1, TYPE="ERR")) == "request"


def test_known_values_come_from_the_master_data_argument():
    bigger = MasterData(exhibitions={**MASTER.exhibitions, 6: 106},
                        ratings={**MASTER.ratings, 5: 25},
                        requests={**MASTER.requests, 2: 32})
    lines = [f"{AT},6,3,", f"{AT},1,5,", f"{AT},1,-1,2.0"]
    assert [csv_outcome(line) for line in lines] == ["unknown_site", "invalid_val",
                                                     "invalid_type"]
    _, outcome = validate_csv(lines, master=bigger)
    assert len(outcome.rejections) == 0
    assert outcome.ratings[["position", "exhibition_id", "rating_id"]].values.tolist() == [
        [2, 106, 23], [3, 101, 25]]
    assert outcome.requests[["position", "exhibition_id", "request_id"]].values.tolist() == [
        [4, 101, 32]]


def test_a_site_missing_from_master_data_is_unknown():
    smaller = MasterData(exhibitions={s: k for s, k in MASTER.exhibitions.items() if s != 3},
                         ratings=MASTER.ratings, requests=MASTER.requests)
    assert csv_outcome(f"{AT},3,2,") == "rating"
    assert csv_outcome(f"{AT},3,2,", master=smaller) == "unknown_site"
    empty = MasterData(exhibitions={}, ratings={}, requests={})
    assert csv_outcome(f"{AT},3,2,", master=empty) == "unknown_site"


def test_surrogate_keys_are_looked_up_not_equal_to_values():
    _, outcome = validate_csv([f"{AT},{site},{val}," for site in range(6) for val in range(5)])
    frame = outcome.ratings
    assert len(frame) == 30
    assert (frame["exhibition_id"] - 100).tolist() == [s for s in range(6) for _ in range(5)]
    assert (frame["rating_id"] - 20).tolist() == list(range(5)) * 6


# --------------------------------------------------------------------------- Kafka rules 0/0b
@pytest.mark.parametrize(("payload", "expected", "stored"), [
    (b"\xff\xfe{\x00\"\x00a\x00", "malformed_json", "\\xff\\xfe{\\x00\"\\x00a\\x00"),
    (b'{"at": "caf\xe9"}', "malformed_json", '{"at": "caf\\xe9"}'),
    (b"", "malformed_json", ""),
    (None, "malformed_json", ""),
    (b'{"at": "2024-07-01T10:00:00+01:00", "si', "malformed_json",
     '{"at": "2024-07-01T10:00:00+01:00", "si'),
    (b'{"at": "2024-07-01T10:00:00+01:00", "site": "1", "val": NaN}', "malformed_json",
     '{"at": "2024-07-01T10:00:00+01:00", "site": "1", "val": NaN}'),
    (b'{"val": Infinity}', "malformed_json", '{"val": Infinity}'),
    (b'{"at": "x\x00"}', "malformed_json", '{"at": "x\\x00"}'),
    (b"[1,2]", "not_an_object", "[1,2]"),
    (b'"str"', "not_an_object", '"str"'),
    (b"42", "not_an_object", "42"),
    (b"null", "not_an_object", "null"),
    (b'[{"at": "2024-07-01T10:00:00+01:00", "site": "1", "val": 2}]', "not_an_object",
     '[{"at": "2024-07-01T10:00:00+01:00", "site": "1", "val": 2}]'),
])
def test_payload_that_is_not_a_json_object_is_rejected_with_its_raw_text(payload, expected,
                                                                         stored):
    parsed, outcome = validate_messages([payload], partition=3, first_offset=41)
    rejections = pd.concat([parsed.rejections, outcome.rejections])
    assert rejections[["position", "locator", "payload", "reason"]].values.tolist() == [
        [41, "3:41", stored, expected]]
    assert "\x00" not in rejections["payload"].iloc[0]
    assert len(outcome.ratings) + len(outcome.requests) == 0


def test_payload_text_escapes_invalid_utf8_and_nul():
    assert transform.payload_text(b"ok \xc3\xa9") == "ok \u00e9"
    assert transform.payload_text(b"a\xffb\x00c") == "a\\xffb\\x00c"
    assert transform.payload_text(None) == ""


def test_rejected_kafka_event_keeps_its_payload_text_and_partition_offset_locator():
    payloads = [msg(site="9"), msg(), "{\"at\": \"2024-07-01T10:00:00+01:00\", \"site\": \"1\", "
                "\"val\": 9, \"note\": \"caf\u00e9 \u2603\"}".encode()]
    parsed, outcome = validate_messages(payloads, partition=2, first_offset=1000)
    assert len(parsed.rejections) == 0
    got = outcome.rejections[["position", "locator", "payload", "reason"]].values.tolist()
    assert got == [[1000, "2:1000", payloads[0].decode(), "unknown_site"],
                   [1002, "2:1002", payloads[2].decode(), "invalid_val"]]
    assert outcome.ratings["position"].tolist() == [1001]


def test_parse_messages_keeps_rule_0_rejections_apart_from_events():
    payloads = [msg(), b"{", b"[]", msg(val=-1, type=0)]
    parsed = transform.parse_messages(payloads, [0, 0, 1, 1], [5, 6, 5, 6])
    assert list(zip(parsed.events["partition"], parsed.events["position"])) == [(0, 5), (1, 6)]
    assert parsed.rejections["locator"].tolist() == ["0:6", "1:5"]
    assert parsed.rejections["partition"].tolist() == [0, 1]
    assert parsed.rejections["reason"].tolist() == ["malformed_json", "not_an_object"]
    assert str(parsed.rejections["position"].dtype) == "int64"


# --------------------------------------------------------------------------- CSV shape
def test_csv_positions_are_line_numbers_and_blank_lines_are_not_events():
    lines = [f"{AT},1,2,\r", "", f"{AT},2,3,", "\r", "   ", f"{AT},3,-1,0.0\r", f"{AT},9,2,"]
    parsed, outcome = validate_csv(lines, first_line_no=10)
    assert outcome.ratings["position"].tolist() == [10, 12]
    assert outcome.requests["position"].tolist() == [15]
    assert outcome.rejections["position"].tolist() == [16]
    assert outcome.rejections["locator"].tolist() == ["16"]
    assert outcome.count + len(parsed.rejections) == 4


def test_crlf_is_stripped_before_the_type_is_read():
    _, outcome = validate_csv([f"{AT},1,2,\r", f"{AT},1,-1,1.0\r", f"{AT},1,-1,\r"])
    assert outcome.ratings["position"].tolist() == [2]
    assert outcome.requests["request_id"].tolist() == [31]
    assert outcome.rejections[["position", "reason", "payload"]].values.tolist() == [
        [4, "missing_type", f"{AT},1,-1,"]]


@pytest.mark.parametrize("line", [f"{AT},1,2", f"{AT},1,2,,", f"{AT}", f"{AT},1,-1,0.0,x",
                                  f'{AT},"1,2,', "a,b,c,d,e,f"])
def test_a_line_without_four_fields_is_a_malformed_row_not_dropped(line):
    parsed, outcome = validate_csv([f"{AT},1,2,", line + "\r"])
    assert outcome.ratings["position"].tolist() == [2]
    assert parsed.rejections[["position", "locator", "payload", "reason"]].values.tolist() == [
        [3, "3", line, "malformed_row"]]
    assert "4" in parsed.rejections["detail"].iloc[0]


def test_an_overlong_line_is_a_malformed_row_with_its_head_and_its_full_length():
    """Even with four fields (it would otherwise pass as an event): over 1 MiB is not a line a
    kiosk writes, and the payload is the head extract kept, NUL escaped for PostgreSQL."""
    head = f"{AT},1,2,\x00" + "x" * 100
    parsed, outcome = validate_csv([transform.OverlongLine(head, 5_000_000_123)], first_line_no=7)
    assert outcome.count == 0 and len(parsed.events) == 0
    assert parsed.rejections[["position", "locator", "payload", "reason"]].values.tolist() == [
        [7, "7", head.replace("\x00", "\\x00"), "malformed_row"]]
    detail = parsed.rejections["detail"].iloc[0]
    assert "5000000123 bytes" in detail and "1 MiB" in detail
    assert type(parsed.rejections["payload"].iloc[0]) is str
    assert str(parsed.rejections["position"].dtype) == "int64"


def test_quoted_fields_are_read_as_csv():
    parsed, outcome = validate_csv([f'"{AT}","1","2",""', f'{AT},"1,5",2,',
                                    f'"{AT}",2,"-1","1.0"'])
    assert len(parsed.rejections) == 0
    assert outcome.ratings["position"].tolist() == [2]
    assert outcome.requests["position"].tolist() == [4]
    assert outcome.rejections[["position", "reason", "payload"]].values.tolist() == [
        [3, "unknown_site", f'{AT},"1,5",2,']]


def test_csv_rejection_keeps_the_raw_line():
    line = f"{AT},1,ERR,"
    _, outcome = validate_csv([line])
    assert outcome.rejections[["locator", "payload", "reason"]].values.tolist() == [
        ["2", line, "invalid_val"]]


def test_csv_rejection_payload_never_contains_nul():
    """PostgreSQL text cannot hold NUL: a rejected line with one must be stored escaped, like a
    malformed row's is, or the COPY of the object's rejections fails."""
    parsed, outcome = validate_csv([f"{AT},1,\x00,", f"{AT},1,\x00"])
    payloads = outcome.rejections["payload"].tolist() + parsed.rejections["payload"].tolist()
    assert len(payloads) == 2
    assert all("\x00" not in p for p in payloads)
    assert outcome.rejections["payload"].tolist() == [f"{AT},1,\\x00,"]



# Lines the byte-level reader must tell apart from the kiosk form, or read exactly as the text
# path does: every mark and digit position spoiled once, tails around the 8-byte limit, NUL
# (which would read as the word's padding), quotes, CR, spaces, too few and too many fields.
_NEAR_KIOSK_LINES = [
    f"{AT},1,4,", f"{AT},5,-1,1.0", f"{AT},10,-1,1.0", f"{AT},5,-1,1.00", f"{AT},1,4,\x00",
    f"{AT},\x00,4,", f"{AT},1,4", f"{AT},1,4,,", f"{AT},", f"{AT},,,", f"{AT},1,\"4\",",
    f"{AT},1,4,\r", f"{AT} ,1,4,", f" {AT},1,4,", f"{AT},1,4, ", "2024-07-01T10:00:00,1,4,",
    "2024-13-01 10:00:00,1,4,", "2024-02-30 10:00:00,1,4,", "2024-07-01 24:00:00,1,4,",
    "2024-07-01 10:00:60,1,4,", "2024-07-01 10:00:0,1,4,", "2024-07-01 10:00:000,1,4,",
    "", " ", "at,site,val,type", "1,2,3,4",
] + [AT[:i] + c + AT[i + 1:] + ",1,4," for i in range(19) for c in "0/:9-, T"]


def _same_parse(fast: transform.ParsedEvents, text: transform.ParsedEvents) -> None:
    pd.testing.assert_frame_equal(fast.events.astype(object), text.events.astype(object))
    pd.testing.assert_frame_equal(fast.rejections, text.rejections)
    outcome_fast = transform.validate_parsed(fast, MASTER, RULES, NOW)
    outcome_text = transform.validate_parsed(text, MASTER, RULES, NOW)
    for name in ("ratings", "requests", "rejections"):
        pd.testing.assert_frame_equal(getattr(outcome_fast, name), getattr(outcome_text, name))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kiosk_lines_are_read_from_bytes_exactly_as_the_text_path_reads_them(seed):
    """A chunk's lines in the kiosk form are read from its bytes, with no string per field;
    every event, field, rejection and outcome must be the text path's, in the same order."""
    rng = random.Random(seed)
    lines = sample_data.generate_kiosk_csv(5000, seed).decode().split("\n")[1:]
    for line in _NEAR_KIOSK_LINES:
        lines.insert(rng.randrange(len(lines)), line)
    fast = transform.parse_csv_lines(lines, 2)
    with text_paths_only():
        text = transform.parse_csv_lines(lines, 2)
    assert isinstance(fast.events["at"].dtype, pd.CategoricalDtype)  # the byte path was taken
    assert not isinstance(text.events["at"].dtype, pd.CategoricalDtype)
    _same_parse(fast, text)


def test_every_timestamp_text_keeps_its_own_key():
    """The byte path keys a timestamp by its 14 digits packed into one integer; two texts
    that share a key would share a category, and one event would get the other's time."""
    rng = random.Random(3)
    digits = "0123456789"
    ats = ["".join(rng.choice(digits) if c == "d" else c for c in "dddd-dd-dd dd:dd:dd")
           for _ in range(20_000)]
    ats += [at[:i] + d + at[i + 1:] for at in ats[:200] for i in range(19) if at[i] in digits
            for d in digits]  # neighbours differing in one digit
    parsed = transform.parse_csv_lines([f"{at},1,4," for at in ats], 2)
    assert isinstance(parsed.events["at"].dtype, pd.CategoricalDtype)
    assert parsed.events["at"].astype(object).tolist() == ats
    assert len(parsed.events["at"].cat.categories) == len(set(ats))


def test_a_chunk_that_is_not_ascii_is_read_as_text():
    """Byte offsets are character offsets only in ASCII: a chunk with any other character
    takes the text path, and its events are the same."""
    lines = [f"{AT},1,4,"] * 300 + [f"{AT},1,é,"]
    parsed, outcome = validate_csv(lines)
    assert not isinstance(parsed.events["at"].dtype, pd.CategoricalDtype)
    assert len(outcome.ratings) == 300
    assert outcome.rejections["payload"].tolist() == [f"{AT},1,é,"]


# Payloads the feed-layout reader must tell apart from the feed's layout, or read exactly as
# orjson does one at a time: a quote, backslash, control or non-ASCII character in the
# timestamp, timestamps of 31 and 33 characters, tails that set `at` again, NUL, trailing bytes,
# a tail over 40 bytes, invalid UTF-8, other spacing, and values of every JSON type.
_AT_LIVE = "2024-07-01T10:00:00.123456+01:00"
_NEAR_FEED_PAYLOADS = [
    f'{{"at": "{_AT_LIVE}", "site": "1", "val": 4}}', f'{{"at": "{_AT_LIVE[:-1]}", "site": "1"}}',
    f'{{"at": "{_AT_LIVE}0", "site": "1", "val": 4}}', f'{{"at": "{_AT_LIVE}", "at": "x"}}',
    f'{{"at": "{_AT_LIVE}", "site": "1", "at": "{_AT_LIVE}"}}', f'{{"at": "{_AT_LIVE}"}}',
    f'{{"at": "{_AT_LIVE}", "site": "1", "val": 4}}\x00', f'{{"at": "{_AT_LIVE}", "site": "1"}} ',
    f'{{"at": "{_AT_LIVE}", "site": "1", "val": 4}}x', f'{{"at": "{_AT_LIVE}", "site": 1.0}}',
    f'{{"at": "{_AT_LIVE}", "site": "1", "val": -1, "type": 0, "extra": [1, 2]}}',
    f'{{"at": "{_AT_LIVE}", "site": "é", "val": null}}', f'{{"at": "{_AT_LIVE}", "val": true}}',
    f'{{"at": "{_AT_LIVE}", "site": {{"a": 1}}, "val": 99999999999999999999}}',
    f'{{"at":"{_AT_LIVE}", "site": "1", "val": 4}}', f'{{"at": "{_AT_LIVE}", "site": "1", "val": 4',
    f'{{"at": "{_AT_LIVE}", "site": "1", "val": NaN}}', '{"at": "' + "x" * 32 + '", "at": "0"}',
    f'{{"at": "{_AT_LIVE}", "at": "{transform._FEED_PROBE.decode()}"}}',  # 44-byte tail
] + [f'{{"at": "{_AT_LIVE[:i] + c + _AT_LIVE[i + 1:]}", "site": "1", "val": 4}}'
     for i in (0, 13, 31) for c in ('"', "\\", "\x01", "\x7f", "é")]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_feed_payloads_are_read_from_bytes_exactly_as_one_at_a_time(seed):
    """Live payloads in the feed's own layout are read from the batch's bytes, each distinct
    tail parsed once; every event, field, rejection and outcome must be what parsing each
    payload on its own gives, in the same order."""
    rng = random.Random(seed)
    payloads = sample_data.generate_messages(5000, seed, start=datetime(2024, 7, 1, 9, tzinfo=UTC))
    for text in _NEAR_FEED_PAYLOADS:
        payloads.insert(rng.randrange(len(payloads)), text.encode())
    payloads.insert(rng.randrange(len(payloads)), b'{"at": "' + b"\xff" * 32 + b'"}')
    payloads.insert(rng.randrange(len(payloads)), b'{"at": "' + _AT_LIVE.encode() + b'", "s": "\xff"}')
    feed = transform._feed_layout(payloads)
    assert feed is not None and len(feed.rows) > 0.8 * len(payloads)  # the byte path is taken
    fast = transform.parse_messages(payloads, [3] * len(payloads), range(len(payloads)))
    with text_paths_only():
        slow = transform.parse_messages(payloads, [3] * len(payloads), range(len(payloads)))
    _same_parse(fast, slow)


def test_a_batch_with_a_null_payload_is_read_one_at_a_time():
    """A tombstone (no payload) cannot be joined with the others' bytes: the batch is parsed
    one payload at a time, and the null payload is a malformed_json rejection."""
    payloads = [message(at=_AT_LIVE, site="1", val=4)] * 300 + [None]
    assert transform._feed_layout(payloads) is None
    parsed, outcome = validate_messages(payloads)
    assert len(outcome.ratings) == 300
    assert parsed.rejections["reason"].tolist() == ["malformed_json"]

def test_empty_inputs_give_empty_outcomes():
    parsed, outcome = validate_csv([])
    assert outcome.count == 0 and len(parsed.rejections) == 0
    parsed, outcome = validate_messages([])
    assert outcome.count == 0 and len(parsed.rejections) == 0
    assert outcome.reason_counts() == {}
    assert list(outcome.rejections.columns) == transform.REJECTION_COLUMNS


# --------------------------------------------------------------------------- conservation
_AT_POOL = [AT, "2024-07-01 08:45:00", "2024-07-01 18:15:00", "2024-07-01 07:00:00", "",
            "ERR", "2024-03-31 01:30:00", "2099-01-01 10:00:00", "2024-10-27 01:30:00",
            "2024-07-01T10:00:00+01:00", " "]
_SITE_POOL = ["0", "1", "5", "6", "", "ERR", "1.0", "1.5", "-1", "INF"]
_VAL_POOL = ["0", "4", "-1", "5", "", "ERR", "2.0", "None", "-1.0"]
_TYPE_POOL = ["", "0.0", "1.0", "2.0", "ERR", " ", "0"]


def _random_csv_lines(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.03:
            lines.append(rng.choice(["", "\r", "  "]))
        elif roll < 0.06:
            lines.append(",".join(rng.choice(_SITE_POOL) for _ in range(rng.choice([1, 3, 5]))))
        else:
            line = ",".join((rng.choice(_AT_POOL), rng.choice(_SITE_POOL), rng.choice(_VAL_POOL),
                             rng.choice(_TYPE_POOL)))
            lines.append(line + ("\r" if rng.random() < 0.1 else ""))
    return lines


_JSON_POOL = [None, "", "1", 1, 1.0, -1, 0, 4, 5, "ERR", True, 1.5, [1], {"a": 1}, "0.0"]


def _random_payloads(seed: int, count: int) -> list[bytes | None]:
    rng = random.Random(seed)
    payloads: list[bytes | None] = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.05:
            payloads.append(rng.choice([None, b"", b"{", b"\xff", b"[]", b"7", b"null"]))
            continue
        fields = {}
        for key, pool in (("at", [AT_ISO, AT, "2024-07-01T07:00:00+01:00", "x"] + _JSON_POOL),
                          ("site", _JSON_POOL), ("val", _JSON_POOL), ("type", _JSON_POOL)):
            if rng.random() < 0.85:
                fields[key] = rng.choice(pool)
        payloads.append(json.dumps(fields).encode())
    return payloads


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_csv_event_gets_exactly_one_outcome(seed):
    lines = _random_csv_lines(seed, 3000)
    parsed, outcome = validate_csv(lines, first_line_no=2)
    event_lines = {i + 2 for i, line in enumerate(lines) if line.strip()}
    positions = (outcome.ratings["position"].tolist() + outcome.requests["position"].tolist()
                 + outcome.rejections["position"].tolist() + parsed.rejections["position"].tolist())
    assert outcome.count + len(parsed.rejections) == len(event_lines)
    assert len(positions) == len(set(positions))
    assert set(positions) == event_lines
    assert set(outcome.rejections["reason"]) <= set(transform.REASONS)
    assert outcome.rejections["reason"].notna().all()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_kafka_message_gets_exactly_one_outcome(seed):
    payloads = _random_payloads(seed, 3000)
    parsed, outcome = validate_messages(payloads, first_offset=500)
    positions = (outcome.ratings["position"].tolist() + outcome.requests["position"].tolist()
                 + outcome.rejections["position"].tolist() + parsed.rejections["position"].tolist())
    assert outcome.count + len(parsed.rejections) == len(payloads)
    assert sorted(positions) == list(range(500, 500 + len(payloads)))
    assert all("\x00" not in p for p in outcome.rejections["payload"])


# --------------------------------------------------------------------------- reference check
def _counter(parsed: transform.ParsedEvents, outcome: transform.Outcome) -> Counter:
    counts = Counter(parsed.rejections["reason"].tolist() + outcome.rejections["reason"].tolist())
    counts["rating"] += len(outcome.ratings)
    counts["request"] += len(outcome.requests)
    return +counts


def _master(sites, ratings, requests) -> MasterData:
    return MasterData({s: 100 + s for s in sites}, {r: 20 + r for r in ratings},
                      {q: 30 + q for q in requests})


MASTER_VARIANTS = {"seed": (range(6), range(5), range(2)),
                   "smaller": (range(5), range(4), range(1))}
REFERENCE_NOW = datetime(2025, 1, 1, 12, tzinfo=UTC)


@pytest.mark.parametrize("variant", sorted(MASTER_VARIANTS))
@pytest.mark.parametrize("seed", [0, 1])
def test_csv_outcomes_match_the_reference_classifier(seed, variant):
    sites, ratings, requests = MASTER_VARIANTS[variant]
    data = sample_data.generate_kiosk_csv(20000, seed)
    parsed, outcome = validate_csv(data.decode("utf-8").split("\n")[1:], first_line_no=2,
                                   master=_master(sites, ratings, requests),
                                   now=REFERENCE_NOW)
    expected = sample_data.expected_reasons(data, sites, ratings, requests, now=REFERENCE_NOW)
    got = _counter(parsed, outcome)
    assert got == expected
    assert sum(got.values()) == 20000
    assert got["outside_opening_hours"] > 0 and got["request"] > 0


@pytest.mark.parametrize("variant", sorted(MASTER_VARIANTS))
@pytest.mark.parametrize("seed", [0, 1])
def test_kafka_outcomes_match_the_reference_classifier(seed, variant):
    sites, ratings, requests = MASTER_VARIANTS[variant]
    # Starts two days before the clocks go back, so the stream crosses the change.
    payloads = sample_data.generate_messages(20000, seed,
                                             start=datetime(2024, 10, 25, 9, 0, tzinfo=LONDON))
    parsed, outcome = validate_messages(payloads, master=_master(sites, ratings, requests),
                                        now=REFERENCE_NOW)
    expected = Counter(sample_data.classify_message(p, sites, ratings, requests,
                                                    now=REFERENCE_NOW) for p in payloads)
    got = _counter(parsed, outcome)
    assert got == expected
    assert sum(got.values()) == 20000
    assert set(got) >= {"malformed_json", "not_an_object", "future_event", "rating", "request"}


# --------------------------------------------------------------------------- exhibitions
REAL_STYLE = {
    "EXHIBITION_NAME": "Cetacean Sensations",
    "EXHIBITION_ID": "EXH_03",
    "FLOOR": "1",
    "DEPARTMENT": "Zoology",
    "START_DATE": "01/07/19",
    "DESCRIPTION": "Whales: from ancient myth to critically endangered.",
}


def test_parse_exhibition_reads_a_real_style_object():
    raw = json.dumps(REAL_STYLE, indent=4).encode()
    assert b"\n    \"EXHIBITION_ID\"" in raw and not raw.endswith(b"\n")
    exhibition = transform.parse_exhibition(raw)
    assert exhibition == transform.Exhibition(
        public_id="EXH_03", site=3, name="Cetacean Sensations", floor="1",
        department="Zoology", start_date=datetime(2019, 7, 1).date(),
        description="Whales: from ancient myth to critically endangered.")


def test_parse_exhibition_takes_the_site_from_the_id_not_the_name():
    raw = json.dumps({**REAL_STYLE, "EXHIBITION_ID": "EXH_12", "FLOOR": "Vault",
                      "START_DATE": "23/08/21"}).encode("utf-8-sig")  # with a BOM, too
    exhibition = transform.parse_exhibition(raw)
    assert (exhibition.site, exhibition.public_id, exhibition.floor) == (12, "EXH_12", "Vault")
    assert exhibition.start_date.isoformat() == "2021-08-23"


def _without(key: str) -> dict:
    return {k: v for k, v in REAL_STYLE.items() if k != key}


@pytest.mark.parametrize("raw", [
    b"not json",
    b"",
    b"\xff\xfe{}",
    b"[1, 2]",
    json.dumps([REAL_STYLE]).encode(),
    b'"EXH_03"',
    json.dumps(_without("EXHIBITION_ID")).encode(),
    json.dumps(_without("START_DATE")).encode(),
    json.dumps(_without("FLOOR")).encode(),
    json.dumps({**REAL_STYLE, "FLOOR": 1}).encode(),
    json.dumps({**REAL_STYLE, "EXHIBITION_NAME": None}).encode(),
    json.dumps({**REAL_STYLE, "DEPARTMENT": "  "}).encode(),
    json.dumps({**REAL_STYLE, "EXHIBITION_ID": "EXH-03"}).encode(),
    json.dumps({**REAL_STYLE, "EXHIBITION_ID": "EXH_"}).encode(),
    json.dumps({**REAL_STYLE, "EXHIBITION_ID": "3"}).encode(),
    json.dumps({**REAL_STYLE, "EXHIBITION_ID": "EXH_03a"}).encode(),
    json.dumps({**REAL_STYLE, "START_DATE": "2019-07-01"}).encode(),
    json.dumps({**REAL_STYLE, "START_DATE": "31/02/19"}).encode(),
    json.dumps({**REAL_STYLE, "START_DATE": "01/13/19"}).encode(),
])
def test_parse_exhibition_rejects_malformed_objects(raw):
    with pytest.raises(ExhibitionError) as caught:
        transform.parse_exhibition(raw)
    assert str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("changes, words", [
    ({"EXHIBITION_NAME": "N" * 101}, "EXHIBITION_NAME is 101 characters long; the database "
                                     "holds at most 100"),
    ({"DEPARTMENT": "D" * 200}, "DEPARTMENT is 200 characters long"),
    ({"FLOOR": "F" * 101}, "FLOOR is 101 characters long"),
    ({"EXHIBITION_ID": "EXH_" + "0" * 16 + "3"}, "EXHIBITION_ID is 21 characters long; the "
                                                 "database holds at most 20"),
    ({"EXHIBITION_ID": "EXH_40000"}, "EXHIBITION_ID 'EXH_40000': site 40000 is beyond the "
                                     "largest the database holds (32767)"),
    ({"EXHIBITION_ID": "EXH_32768"}, "site 32768 is beyond"),
    ({"EXHIBITION_ID": "EXH_\u0663"}, "EXHIBITION_ID 'EXH_\u0663' is not like EXH_03"),
    ({"EXHIBITION_NAME": "Cave\x00"}, "EXHIBITION_NAME contains a NUL character"),
    ({"EXHIBITION_ID": "EXH_0\x003"}, "EXHIBITION_ID contains a NUL character"),
    ({"FLOOR": "\x00"}, "FLOOR contains a NUL character"),
    ({"DEPARTMENT": "Zoo\x00logy"}, "DEPARTMENT contains a NUL character"),
    ({"START_DATE": "01/07/19\x00"}, "START_DATE contains a NUL character"),
    ({"DESCRIPTION": "x" * 5000 + "\x00"}, "DESCRIPTION contains a NUL character"),
    ({"DESCRIPTION": "half a pair \ud83d"}, "DESCRIPTION contains a lone surrogate"),
])
def test_parse_exhibition_refuses_what_the_database_cannot_hold(changes, words):
    raw = json.dumps({**REAL_STYLE, **changes}).encode()
    with pytest.raises(ExhibitionError) as caught:
        transform.parse_exhibition(raw)
    message = str(caught.value)
    assert words in message
    assert "\n" not in message and len(message) < 200  # never the whole long value


def test_parse_exhibition_takes_what_the_database_can_hold_to_the_limit():
    raw = json.dumps({**REAL_STYLE, "EXHIBITION_NAME": "N" * 100, "DEPARTMENT": "\u00e9" * 100,
                      "FLOOR": "\U0001f40b" * 100, "EXHIBITION_ID": "EXH_32767",
                      "DESCRIPTION": "long " * 10_000}).encode()
    exhibition = transform.parse_exhibition(raw)
    assert (exhibition.site, len(exhibition.name), len(exhibition.department),
            len(exhibition.floor)) == (32767, 100, 100, 100)
    raw = json.dumps({**REAL_STYLE, "EXHIBITION_ID": "EXH_" + "0" * 15 + "3"}).encode()
    assert transform.parse_exhibition(raw).site == 3


def test_vectorised_live_form_agrees_with_the_per_value_parser():
    """The live feed's timestamps are parsed in one vectorised call; every value must get the
    same (state, UTC instant, local time of day) as the per-value parser, across both DST
    changes and both offsets."""
    from zoneinfo import ZoneInfo
    td = timedelta
    london = ZoneInfo("Europe/London")
    start = datetime(2024, 3, 30, 8, 0, tzinfo=UTC)
    texts = []
    for i in range(3000):
        moment = start + td(minutes=7 * i, microseconds=i * 37)
        offset = london if i % 3 else (UTC if i % 2 else timezone(td(hours=-5)))
        texts.append(moment.astimezone(offset).isoformat(timespec="microseconds"))
    texts += ["2024-10-27T01:30:00.000000+01:00", "2024-13-27T01:30:00.000000+01:00"]
    state, utc, tod = transform._timestamps(pd.Series(texts, dtype=object), "Europe/London")
    expected = [transform._parse_at(t, london) for t in texts]
    assert [tuple(x) for x in zip(state, utc, tod)] == expected
    assert expected[-1][0] == 2  # month 13: invalid either way
    table = np.zeros((len(texts) + 1, 3), dtype=np.int64)
    done = transform._parse_kafka_form(np.array(texts, dtype=object), "Europe/London", table)
    assert done.sum() == len(texts) - 1  # the vectorised path really took them



def test_live_form_check_is_the_regex_with_ascii_digits():
    """The live form is recognised for a whole column on code points, not by a regex per
    value; it must take exactly what `_KAFKA_AT` takes with ASCII digits, whatever one or two
    characters of a good value are changed to (a Unicode digit, a comma between "+" and "-",
    NUL, a space...), and refuse anything that is not a text of that length."""
    import re
    ascii_form = re.compile(transform._KAFKA_AT.pattern.replace(r"\d", "[0-9]"))
    good = "2024-03-30T08:00:00.123456+01:00"
    rng = random.Random(19)
    alphabet = "0123456789-T:.+,/ Z\u0663\x00é"
    values = [good, good.replace("+", "-"), good + "0", good[:-1], None, 5, 5.0, "", b"x",
              good.replace("2", "\u0663"), "\x00" * 32, good[:31] + "\x00"]
    for _ in range(20_000):
        chars = list(good)
        for _ in range(rng.randint(1, 2)):
            chars[rng.randrange(len(chars))] = rng.choice(alphabet)
        values.append("".join(chars))
    column = np.empty(len(values), dtype=object)
    column[:] = values
    expected = [isinstance(v, str) and ascii_form.fullmatch(v) is not None for v in values]
    assert transform._in_kafka_form(column).tolist() == expected
    assert 1000 < sum(expected) < len(values) - 1000  # both outcomes well represented



def test_mixed_timestamp_column_live_form_first_then_the_cache():
    """A column mixing the live form, the kiosk form, other ISO forms, invalid and missing
    values, twice (the second time from the cache): every value gets what the per-value
    parser gives, and the live-form values (all distinct) are not kept in the cache."""
    from zoneinfo import ZoneInfo
    london = ZoneInfo("Europe/London")
    rng = random.Random(7)
    start = datetime(2024, 3, 30, tzinfo=UTC)
    values = []
    for i in range(3000):
        moment = start + timedelta(seconds=rng.randrange(60 * 86_400), microseconds=i)
        kind = i % 6
        values.append(moment.astimezone(london).isoformat(timespec="microseconds") if kind < 3
                      else moment.astimezone(london).strftime("%Y-%m-%d %H:%M:%S") if kind == 3
                      else moment.isoformat().replace("+00:00", "Z") if kind == 4
                      else rng.choice([None, "", 5, 1.5, "x", "2024-03-31 01:30:00",
                                       "2024-13-01T00:00:00.000000+00:00"]))
    transform._AT_CACHE.pop("Europe/London", None)
    expected = [transform._parse_at(v, london) for v in values]
    for _ in range(2):
        state, utc, tod = transform._timestamps(pd.Series(values, dtype=object), "Europe/London")
        assert [tuple(x) for x in zip(state, utc, tod)] == expected
    kept = set(transform._AT_CACHE["Europe/London"].keys)
    # only the live-form text pandas refuses (month 13) is parsed one at a time, and kept
    assert {v for v in kept if transform._KAFKA_AT.fullmatch(v)} == {
        "2024-13-01T00:00:00.000000+00:00"}


def test_vectorised_kiosk_form_agrees_with_the_per_value_parser():
    """The kiosk CSV's local `YYYY-MM-DD HH:MM:SS` values are parsed in one vectorised call;
    every value must get what the per-value parser gives: the hour skipped in spring is
    invalid, an autumn hour is its first occurrence, out-of-range fields are invalid."""
    from zoneinfo import ZoneInfo
    london = ZoneInfo("Europe/London")
    texts = [f"{year}-{month:02d}-{day:02d} {hour:02d}:{minute:02d}:{second:02d}"
             for year in (1916, 1968, 1971, 1996, 2024, 2025)
             for month, day in ((3, 31), (3, 30), (3, 26), (10, 27), (10, 26), (10, 29), (2, 29),
                                (2, 30), (4, 31), (6, 15))
             for hour in (0, 1, 2, 3, 12, 23)
             for minute, second in ((0, 0), (30, 15), (59, 59))]
    texts += ["2024-06-15 24:00:00", "2024-06-15 12:60:00", "2024-06-15 12:00:60",
              "2024-13-01 12:00:00", "2024-00-10 12:00:00", "1850-06-15 12:00:00",
              "2024-06-15T12:00:00", " 2024-06-15 12:00:00", None, ""]
    got = transform._parse_ats(texts, london)
    expected = [transform._parse_at(t, london) for t in texts]
    assert [tuple(row) for row in got] == expected
    states = {text: row[0] for text, row in zip(texts, expected)}
    assert states["2024-03-31 01:30:15"] == 2  # skipped when clocks went forward
    assert states["2024-10-27 01:30:15"] == 0  # the first of two 01:30s
    assert states["2024-02-30 12:00:00"] == 2 and states["2024-06-15 12:00:60"] == 2
    first = dict(zip(texts, got))["2024-10-27 01:30:15"]
    assert first[1] == int(datetime(2024, 10, 27, 0, 30, 15, tzinfo=UTC).timestamp()) * 10**6
