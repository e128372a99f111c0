"""Property-based tests (hypothesis) of SPEC §2's event rules, for Kafka payloads and CSV lines.

Why: test_transform.py pins every reason code with hand-picked examples; these tests let
hypothesis look for the inputs nobody thought of. Whatever arrives — any bytes or any JSON value
as a Kafka payload, any string in any CSV field — each event gets exactly one outcome (a valid
rating/request or one known reason code) and nothing raises; every event that SPEC §2 calls
valid, written in any of its accepted forms, is accepted and lands on the right instant and
keys; and stored + rejected = read. Kafka outcomes are also cross-checked against the
independent reference classifier in sample_data.py, and the same fields give the same outcome
whether they come as a CSV line or as a JSON message.
"""
from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pandas as pd
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import extract
import sample_data
import transform
from helpers import text_paths_only
from transform import MasterData, Rules

LONDON = ZoneInfo("Europe/London")
# Surrogate keys differ from the values, so a mix-up of the two shows.
MASTER = MasterData(exhibitions={site: 100 + site for site in range(6)},
                    ratings={value: 20 + value for value in range(5)},
                    requests={0: 30, 1: 31})
RULES = Rules()
NOW = datetime(2024, 11, 1, 12, 0, 0, tzinfo=UTC)   # processing time: noon in London
VALID_KINDS = {"rating", "request"}
KAFKA_REASONS = set(transform.REASONS)
CSV_REASONS = (set(transform.REASONS) - {"malformed_json", "not_an_object"}) | set(transform.OWN_REASONS)
OPEN_US = ((8 * 60 + 45) * 60) * 1_000_000
CLOSE_US = ((18 * 60 + 15) * 60) * 1_000_000

PROPERTY = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------- helpers
def outcomes(parsed: transform.ParsedEvents, now: datetime = NOW) -> dict[int, str]:
    """position -> "rating" / "request" / reason, failing if any position got two outcomes."""
    outcome = transform.validate_events(parsed.events, MASTER, RULES, now)
    labelled = [(int(p), "rating") for p in outcome.ratings["position"]]
    labelled += [(int(p), "request") for p in outcome.requests["position"]]
    for frame in (parsed.rejections, outcome.rejections):
        labelled += [(int(p), r) for p, r in zip(frame["position"], frame["reason"])]
        # every rejection is storable: text payload without NUL, words saying why
        assert all(isinstance(x, str) and "\x00" not in x for x in frame["payload"])
        assert all(isinstance(x, str) and x for x in frame["detail"])
    result = dict(labelled)
    assert len(result) == len(labelled), "a position got more than one outcome"
    return result


def kafka_batch(payloads: list[bytes | None]) -> tuple[transform.ParsedEvents, transform.Outcome]:
    parsed = transform.parse_messages(payloads, [0] * len(payloads), list(range(len(payloads))))
    return parsed, transform.validate_events(parsed.events, MASTER, RULES, NOW)


def csv_event_positions(lines: list[str], first: int) -> set[int]:
    """Line numbers that are events: every line that is not blank (SPEC: blank lines are not)."""
    return {first + i for i, line in enumerate(lines)
            if line.removesuffix("\r") and not line.removesuffix("\r").isspace()}


def reference_kafka(payload: bytes | None) -> str:
    return sample_data.classify_message(payload or b"", now=NOW)


# --------------------------------------------------------------------------- strategies
def json_trees(scalars: st.SearchStrategy) -> st.SearchStrategy:
    return st.recursive(scalars, lambda children: st.lists(children, max_size=3)
                        | st.dictionaries(st.text(max_size=6), children, max_size=3), max_leaves=8)


# Any JSON value; json_values also holds NaN and infinities, which json.dumps writes as bare
# NaN/Infinity: not JSON, so a payload holding one is malformed_json.
strict_json_values = json_trees(st.none() | st.booleans() | st.integers() | st.text(max_size=30)
                                | st.floats(allow_nan=False, allow_infinity=False))
json_values = json_trees(st.none() | st.booleans() | st.integers() | st.floats()
                         | st.text(max_size=30))


@st.composite
def in_hours_local(draw, with_micros: bool = True) -> datetime:
    """A museum-local moment inside opening hours on a past day (naive, Europe/London)."""
    day = draw(st.dates(min_value=date(2015, 1, 1), max_value=date(2024, 10, 31)))
    if with_micros:
        tod = draw(st.integers(OPEN_US, CLOSE_US))
    else:
        tod = draw(st.integers(OPEN_US // 1_000_000, CLOSE_US // 1_000_000)) * 1_000_000
    return datetime.combine(day, time()) + timedelta(microseconds=tod)


def london_instant(local: datetime) -> datetime:
    return local.replace(tzinfo=LONDON).astimezone(UTC)


@st.composite
def kafka_at_text(draw) -> tuple[str, datetime]:
    """An in-hours `at` in any form SPEC §2 accepts, with the UTC instant it means."""
    local = draw(in_hours_local())
    instant = london_instant(local)
    form = draw(st.sampled_from(["naive_t", "naive_space", "london_offset", "utc_z",
                                 "other_offset", "compact_offset"]))
    if form.startswith("naive"):
        text = local.isoformat(sep="T" if form == "naive_t" else " ")
    elif form == "london_offset":
        text = instant.astimezone(LONDON).isoformat()
    elif form == "utc_z":
        text = instant.replace(tzinfo=None).isoformat() + "Z"
    else:
        minutes = draw(st.integers(-12 * 60, 14 * 60))
        text = instant.astimezone(timezone(timedelta(minutes=minutes))).isoformat()
        if form == "compact_offset":  # +HHMM
            text = text[:-3] + text[-2:]
    return text, instant


def integer_forms(n: int, text_only: bool = False) -> st.SearchStrategy:
    """Every spelling of "an integer value" SPEC §2 accepts for n."""
    texts = [str(n), f"{n}.0", f" {n} ", f"{n}.000", f"+{n}" if n >= 0 else str(n),
             f"0{n}" if n >= 0 else f"-0{-n}"]
    if text_only:
        return st.sampled_from(texts)
    return st.sampled_from([n, float(n), *texts])


@st.composite
def valid_kafka_event(draw) -> tuple[bytes, str, int, int, datetime]:
    """(payload, kind, exhibition_id, rating_id/request_id, instant) of a valid message."""
    at, instant = draw(kafka_at_text())
    site = draw(st.integers(0, 5))
    message = {"at": at, "site": draw(integer_forms(site))}
    if draw(st.booleans()):
        value = draw(st.integers(0, 4))
        message["val"] = draw(integer_forms(value))
        blank = draw(st.sampled_from(["absent", None, "", "  "]))
        if blank != "absent":
            message["type"] = blank
        kind, key = "rating", MASTER.ratings[value]
    else:
        request = draw(st.integers(0, 1))
        message["val"] = draw(integer_forms(-1))
        message["type"] = draw(integer_forms(request))
        kind, key = "request", MASTER.requests[request]
    if draw(st.booleans()):
        message["extra"] = draw(strict_json_values)  # keys other than the four are ignored
    items = list(message.items())
    order = draw(st.permutations(items))
    return json.dumps(dict(order)).encode(), kind, MASTER.exhibitions[site], key, instant


@st.composite
def valid_csv_line(draw) -> tuple[str, str, int, int, datetime]:
    """(line, kind, exhibition_id, rating_id/request_id, instant) of a valid kiosk CSV row."""
    local = draw(in_hours_local(with_micros=False))
    site = draw(st.integers(0, 5))
    if draw(st.booleans()):
        value = draw(st.integers(0, 4))
        fields = [draw(integer_forms(value, text_only=True)), draw(st.sampled_from(["", " "]))]
        kind, key = "rating", MASTER.ratings[value]
    else:
        request = draw(st.integers(0, 1))
        fields = [draw(integer_forms(-1, text_only=True)), draw(integer_forms(request, text_only=True))]
        kind, key = "request", MASTER.requests[request]
    at = local.isoformat(sep=draw(st.sampled_from([" ", "T"])))
    line = ",".join([at, draw(integer_forms(site, text_only=True)), *fields])
    if draw(st.booleans()):
        line += "\r"  # CRLF files
    return line, kind, MASTER.exhibitions[site], key, london_instant(local)


# Field values for messages shaped like events: mostly near-valid, so the later rules are reached.
at_values = st.one_of(kafka_at_text().map(lambda t: t[0]), json_values,
                      st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2100, 1, 1))
                      .map(lambda d: d.isoformat(sep=" ")),
                      st.sampled_from(["", " ", "ERR", "2024-03-31 01:30:00", "2099-06-15T12:00:00Z"]))
field_values = st.one_of(st.integers(-3, 8), st.integers(-3, 8).flatmap(integer_forms), json_values,
                         st.sampled_from(["", " ", "INF", "NaN", "None", "ERR", "1.5", "1e0",
                                          "\u0663", "9" * 40, "-0", "0x1"]))
event_like_messages = st.fixed_dictionaries(
    {}, optional={"at": at_values, "site": field_values, "val": field_values,
                  "type": field_values, "other": json_values})


# --------------------------------------------------------------------------- Kafka: anything in
@PROPERTY
@given(st.lists(st.one_of(st.binary(max_size=120), st.none()), max_size=25))
def test_any_bytes_as_kafka_payloads_get_exactly_one_outcome_each(payloads):
    parsed, outcome = kafka_batch(payloads)
    result = outcomes(parsed)
    assert set(result) == set(range(len(payloads)))  # stored + rejected = read
    assert set(result.values()) <= VALID_KINDS | KAFKA_REASONS
    assert outcome.count + len(parsed.rejections) == len(payloads)


@PROPERTY
@given(st.lists(st.one_of(json_values, event_like_messages), min_size=1, max_size=25),
       st.booleans())
def test_any_json_value_as_kafka_payload_gets_the_reference_outcome(values, ascii_only):
    # NaN/Infinity come out as bare NaN/Infinity: not JSON, so malformed_json
    payloads = [json.dumps(v, ensure_ascii=ascii_only).encode() for v in values]
    parsed, _ = kafka_batch(payloads)
    result = outcomes(parsed)
    assert set(result) == set(range(len(payloads)))
    # Batch-independent and equal to the naive row-by-row reference classifier.
    assert [result[i] for i in range(len(payloads))] == [reference_kafka(p) for p in payloads]


@PROPERTY
@given(st.lists(st.one_of(json_values, event_like_messages), max_size=10),
       st.sampled_from(["utf-16", "latin-1", "truncate", "nul", "bom", "prefix"]))
def test_mangled_json_payloads_get_exactly_one_outcome_each(values, mangle):
    def spoil(raw: bytes, text: str) -> bytes:
        return {"utf-16": text.encode("utf-16"), "latin-1": text.encode("latin-1", "replace"),
                "truncate": raw[:len(raw) // 2], "nul": raw.replace(b'"', b'"\x00', 1),
                "bom": b"\xef\xbb\xbf" + raw, "prefix": b"x" + raw}[mangle]
    texts = [json.dumps(v, ensure_ascii=False) for v in values]
    payloads = [spoil(text.encode(), text) for text in texts]
    parsed, _ = kafka_batch(payloads)
    result = outcomes(parsed)
    assert set(result) == set(range(len(payloads)))
    assert [result[i] for i in range(len(payloads))] == [reference_kafka(p) for p in payloads]


def stored_events(outcome: transform.Outcome) -> dict[int, tuple]:
    """position -> (kind, exhibition_id, rating/request id, event_at) of the valid events."""
    stored = {int(r.position): ("rating", r.exhibition_id, r.rating_id, r.event_at)
              for r in outcome.ratings.itertuples()}
    stored |= {int(r.position): ("request", r.exhibition_id, r.request_id, r.event_at)
               for r in outcome.requests.itertuples()}
    return stored


# --------------------------------------------------------------------------- Kafka: valid in
@PROPERTY
@given(st.lists(valid_kafka_event(), min_size=1, max_size=20))
def test_every_valid_kafka_event_in_any_accepted_form_is_stored_exactly(events):
    parsed, outcome = kafka_batch([e[0] for e in events])
    assert len(parsed.rejections) == 0 and len(outcome.rejections) == 0, (
        outcome.rejections[["payload", "reason", "detail"]].to_dict("records"))
    stored = stored_events(outcome)
    for position, (_, kind, exhibition_id, key, instant) in enumerate(events):
        assert stored[position] == (kind, exhibition_id, key, pd.Timestamp(instant))


# --------------------------------------------------------------------------- CSV: anything in
any_field = st.text(max_size=25)
any_line = st.one_of(st.lists(any_field, min_size=4, max_size=4).map(",".join),
                     st.lists(any_field, max_size=7).map(",".join),
                     st.text(max_size=60))


@PROPERTY
@example(lines=['a\rb,"x",c,d'])   # a bare CR mid-line in a line with quotes (old Mac files)
@example(lines=["", "  ", "\r", ",,,", '"', '"a,b",c,d,e', "\x00,\x00,\x00,\x00"])
@given(st.lists(any_line, max_size=20))
def test_any_string_in_any_csv_field_gives_exactly_one_outcome_per_line(lines):
    # An object's lines as extract.py hands them over: a newline inside a field starts a line.
    body_lines = "\n".join(lines).split("\n") if lines else []
    parsed = transform.parse_csv_lines(body_lines, 2)
    result = outcomes(parsed)
    assert set(result) == csv_event_positions(body_lines, 2)   # stored + rejected = read
    assert set(result.values()) <= VALID_KINDS | CSV_REASONS


# Payloads near the live feed's layout: its prefix, a timestamp with at most one byte changed,
# then a tail of fragments from a small pool (so that payloads in one example share and nearly
# share tails): values of every JSON type, `at` again, NUL, invalid UTF-8, broken JSON.
near_feed_at = st.tuples(st.integers(0, 32), st.sampled_from(
    [b"0", b"9", b'"', b"\\", b"\x00", b"\x1f", b"\x7f", b"\xc3\xa9", b"\xff", b" "])).map(
    lambda t: (b"2024-07-01T10:00:00.123456+01:00"[:t[0]] + t[1]
               + b"2024-07-01T10:00:00.123456+01:00"[t[0] + 1:])[:33])
near_feed_fragment = st.sampled_from([
    b', "site": "1"', b', "site": 1', b', "val": 4', b', "val": -1', b', "type": 0', b', "type": 1.0',
    b', "val": null', b', "val": true', b', "at": "x"', b', "s": "\xff"', b', "v": [1, {}]', b"\x00",
    b" ", b"}", b"]", b",", rb', "site": "\u0031"', b', "val": 1e400', b', "val": "ERR"'])
near_feed_payload = st.tuples(near_feed_at, st.lists(near_feed_fragment, max_size=4),
                              st.booleans()).map(
    lambda t: b'{"at": "' + t[0] + b'"' + b"".join(t[1]) + (b"}" if t[2] else b""))


@PROPERTY
@example(payloads=[b'{"at": "2024-07-01T10:00:00.123456+01:00", "site": "1", "val": 4}\x00'],
         seed=0)  # a NUL where the padding would be
@given(st.lists(near_feed_payload, min_size=1, max_size=40), st.integers(0, 2**32))
def test_payloads_near_the_feed_layout_are_read_from_bytes_as_one_at_a_time(payloads, seed):
    """The feed-layout path (batches of at least _FEED_MIN_MESSAGES) against parsing each
    payload on its own."""
    pad = [b'{"at": "2024-07-01T10:00:00.123456+01:00", "site": "1", "val": 4}'] * (
        transform._FEED_MIN_MESSAGES)
    payloads = pad[:seed % len(pad)] + payloads + pad
    offsets = list(range(len(payloads)))
    fast = transform.parse_messages(payloads, [0] * len(payloads), offsets)
    with text_paths_only():
        slow = transform.parse_messages(payloads, [0] * len(payloads), offsets)
    pd.testing.assert_frame_equal(fast.events, slow.events)
    pd.testing.assert_frame_equal(fast.rejections, slow.rejections)
    assert outcomes(fast) == outcomes(slow)

# Lines near the kiosk form: a valid timestamp with at most one character changed, then fields
# from a small pool (so that lines in one example share and nearly share tails), one to four;
# ASCII only, as a chunk with any other character is read as text (test_transform.py).
near_kiosk_at = st.tuples(st.integers(0, 19), st.sampled_from("0123456789-: ,T\x00\"")).map(
    lambda t: ("2024-07-01 10:00:00"[:t[0]] + t[1] + "2024-07-01 10:00:00"[t[0] + 1:])[:19])
near_kiosk_field = st.sampled_from(["", "1", "4", "-1", "10", "1.0", "0.0", "\x00", '"4"', '"',
                                    " ", "\r", "ERR"])
near_kiosk_line = st.tuples(near_kiosk_at, st.lists(near_kiosk_field, min_size=1, max_size=4)
                            ).map(lambda t: t[0] + "," + ",".join(t[1]))


@PROPERTY
@example(lines=["2024-07-01 10:00:00,1,4,\x00"], seed=0)  # a NUL where the padding would be
@given(st.lists(near_kiosk_line, min_size=1, max_size=40), st.integers(0, 2**32))
def test_lines_near_the_kiosk_form_are_read_from_bytes_as_the_text_path_reads_them(lines, seed):
    """The byte path (chunks of at least _KIOSK_MIN_LINES lines) against the text path."""
    pad = ["2024-07-01 10:00:00,1,4,"] * transform._KIOSK_MIN_LINES
    lines = pad[:seed % len(pad)] + lines + pad
    fast = transform.parse_csv_lines(lines, 2)
    with text_paths_only():
        text = transform.parse_csv_lines(lines, 2)
    pd.testing.assert_frame_equal(fast.events.astype(object), text.events.astype(object))
    pd.testing.assert_frame_equal(fast.rejections, text.rejections)
    assert outcomes(fast) == outcomes(text)

@PROPERTY
@given(st.lists(st.lists(st.text(max_size=20).filter(lambda s: not set(s) & set(',"\r\n')),
                         min_size=4, max_size=4), min_size=1, max_size=15))
def test_csv_lines_of_four_fields_get_the_reference_outcome(rows):
    lines = [",".join(fields) for fields in rows]
    result = outcomes(transform.parse_csv_lines(lines, 2))
    assert set(result) == set(range(2, len(lines) + 2))
    for position, line in enumerate(lines, start=2):
        expected = sample_data.expected_reasons(("at,site,val,type\n" + line).encode(), now=NOW)
        assert result[position] == next(iter(expected))


@PROPERTY
@given(st.lists(st.lists(st.text(max_size=20).filter(lambda s: not set(s) & set(',"\r\n')),
                         min_size=4, max_size=4), min_size=1, max_size=15))
def test_the_same_fields_get_the_same_outcome_from_csv_and_from_kafka(rows):
    """One implementation of the rules for both sources: only the transport differs."""
    csv_result = outcomes(transform.parse_csv_lines([",".join(r) for r in rows], 0))
    payloads = [json.dumps(dict(zip(transform.FIELDS, r))).encode() for r in rows]
    kafka_result = outcomes(kafka_batch(payloads)[0])
    assert csv_result == kafka_result


# --------------------------------------------------------------------------- CSV: valid in
@PROPERTY
@given(st.lists(valid_csv_line(), min_size=1, max_size=20))
def test_every_valid_csv_row_in_any_accepted_form_is_stored_exactly(rows):
    parsed = transform.parse_csv_lines([r[0] for r in rows], 2)
    outcome = transform.validate_events(parsed.events, MASTER, RULES, NOW)
    assert len(parsed.rejections) == 0 and len(outcome.rejections) == 0, (
        outcome.rejections[["payload", "reason", "detail"]].to_dict("records"))
    stored = stored_events(outcome)
    for position, (_, kind, exhibition_id, key, instant) in enumerate(rows, start=2):
        assert stored[position] == (kind, exhibition_id, key, pd.Timestamp(instant))


# --------------------------------------------------------------------------- object → lines
class _Body:
    """An S3 body stand-in (bytes in chunks), for the pure line-splitting of extract.py."""

    def __init__(self, data: bytes):
        self.data = data
        self.closed = False

    def iter_chunks(self, size: int):
        for i in range(0, len(self.data), size):
            yield self.data[i:i + size]

    def close(self) -> None:
        self.closed = True


@PROPERTY
@given(st.binary(max_size=400) | st.text(max_size=200).map(str.encode)
       | st.lists(st.sampled_from([b"ab", b",", b"\r", b"\n", b"\r\n", b"\xe2\x82\xac"]),
                  max_size=60).map(b"".join),
       st.booleans(), st.integers(1, 64))
def test_any_object_splits_into_numbered_lines_whatever_the_chunk_size(data, bom, chunk):
    """Line numbers are exact across chunk boundaries (LF, CRLF and a lone CR each end one line,
    a CRLF split between chunks too), a BOM never reaches the header, and every byte is kept
    (invalid UTF-8 escaped), so CSV locators point at the right line."""
    if bom:
        data = b"\xef\xbb\xbf" + data
    obj = extract.S3Object("b", "lmnh_hist_data_0.csv", "etag", len(data))
    body = _Body(data)
    got: list[str] = []
    for first, lines in extract._iter_lines(body, obj, chunk):
        assert first == len(got) + 1
        got.extend(lines)
    assert body.closed
    raw_lines = re.split(rb"\r\n|\r|\n", data)
    if raw_lines[-1] == b"":
        raw_lines.pop()   # a final newline ends the last line, it does not start one
    expected = [line.decode("utf-8", "backslashreplace") for line in raw_lines]
    if expected:
        expected[0] = expected[0].removeprefix("\ufeff")
    assert got == expected
