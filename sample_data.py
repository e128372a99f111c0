"""Generated sample data for the local stack and the tests, and a reference classifier for it.

Why this module exists: the real captures in ``../shared/real-data`` must not ship with the
project (SPEC §1 and §5), yet the local S3 bucket, the kiosk simulator and the tests all need
data that looks and misbehaves like the museum's. Everything here is generated from a seed, so a
failing test can be replayed, and mirrors the real files' format: the ``at,site,val,type`` header
with LF endings and ``0.0``/``1.0`` request types, 4-space exhibition JSON with no trailing
newline, ``json.dumps``-style Kafka payloads with the Europe/London offset.

It also holds a deliberately naive, row-by-row reference classifier (``expected_reasons`` and
``classify_message``) written straight from SPEC §2's table. It is not the product's
implementation and shares no code with it: tests use it to cross-check the fast, vectorised one,
so it favours being obviously right over being fast.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import random
import re
import sys
from collections import Counter
from collections.abc import Container, Iterable
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

__all__ = [
    "CLOSING_TIME",
    "CSV_HEADER",
    "DECOY_OBJECTS",
    "EXHIBITIONS",
    "EXHIBITION_FILE_NAMES",
    "LONDON",
    "OPENING_TIME",
    "REASON_CODES",
    "classify_message",
    "exhibition_json",
    "expected_reasons",
    "generate_kiosk_csv",
    "generate_messages",
    "kiosk_key",
    "main",
    "seed_bucket",
]

LONDON = ZoneInfo("Europe/London")
OPENING_TIME = time(8, 45)
CLOSING_TIME = time(18, 15)
# Generated streams start each museum day here rather than at the opening bell, so a default
# stream never depends on the boundary second being handled right.
STREAM_DAY_START = time(9, 0)
FUTURE_TOLERANCE = timedelta(minutes=5)
CSV_HEADER = b"at,site,val,type\n"
# The seed's master data: sites 0-5, ratings 0-4, requests 0-1; defaults of the classifiers.
_SEED_SITES = range(6)
_SEED_RATINGS = range(5)
_SEED_REQUESTS = range(2)
_OPENING_HOURS = (OPENING_TIME, CLOSING_TIME)

# SPEC §2, in rule order; the first failing rule names the rejection.
REASON_CODES = (
    "malformed_json",
    "not_an_object",
    "missing_at",
    "invalid_at",
    "outside_opening_hours",
    "future_event",
    "missing_site",
    "unknown_site",
    "missing_val",
    "invalid_val",
    "missing_type",
    "invalid_type",
    "unexpected_type",
)

# The six exhibition objects of the real bucket, same keys, key order and values, so that the
# local stack's master data matches production's (site N is EXH_0N).
EXHIBITIONS: tuple[dict[str, str], ...] = (
    {
        "EXHIBITION_NAME": "Measureless to Man",
        "EXHIBITION_ID": "EXH_00",
        "FLOOR": "1",
        "DEPARTMENT": "Geology",
        "START_DATE": "23/08/21",
        "DESCRIPTION": "An immersive 3D experience: delve deep into a previously-inaccessible"
                       " cave system.",
    },
    {
        "EXHIBITION_NAME": "Adaptation",
        "EXHIBITION_ID": "EXH_01",
        "FLOOR": "Vault",
        "DEPARTMENT": "Entomology",
        "START_DATE": "01/07/19",
        "DESCRIPTION": "How insect evolution has kept pace with an industrialised world",
    },
    {
        "EXHIBITION_NAME": "The Crenshaw Collection",
        "EXHIBITION_ID": "EXH_02",
        "FLOOR": "2",
        "DEPARTMENT": "Zoology",
        "START_DATE": "03/03/21",
        "DESCRIPTION": "An exhibition of 18th Century watercolours, mostly focused on South"
                       " American wildlife.",
    },
    {
        "EXHIBITION_NAME": "Cetacean Sensations",
        "EXHIBITION_ID": "EXH_03",
        "FLOOR": "1",
        "DEPARTMENT": "Zoology",
        "START_DATE": "01/07/19",
        "DESCRIPTION": "Whales: from ancient myth to critically endangered.",
    },
    {
        "EXHIBITION_NAME": "Our Polluted World",
        "EXHIBITION_ID": "EXH_04",
        "FLOOR": "3",
        "DEPARTMENT": "Ecology",
        "START_DATE": "12/05/21",
        "DESCRIPTION": "A hard-hitting exploration of humanity's impact on the environment.",
    },
    {
        "EXHIBITION_NAME": "Thunder Lizards",
        "EXHIBITION_ID": "EXH_05",
        "FLOOR": "1",
        "DEPARTMENT": "Paleontology",
        "START_DATE": "01/02/23",
        "DESCRIPTION": "How new research is making scientists rethink what dinosaurs really"
                       " looked like.",
    },
)

# As in the real bucket, the object key says nothing about the id (SPEC §1).
EXHIBITION_FILE_NAMES: dict[str, str] = {
    "EXH_00": "lmnh_exhibition_cave.json",
    "EXH_01": "lmnh_exhibition_bugs.json",
    "EXH_02": "lmnh_exhibition_explorer.json",
    "EXH_03": "lmnh_exhibition_whales.json",
    "EXH_04": "lmnh_exhibition_pollution.json",
    "EXH_05": "lmnh_exhibition_dino.json",
}


def exhibition_json(record: dict[str, str]) -> bytes:
    """Serialise an exhibition record exactly as the real objects are: indent 4, no final newline."""
    return json.dumps(record, indent=4).encode("utf-8")


def kiosk_key(index: int) -> str:
    """The object key of the index-th kiosk CSV, named as in the real bucket."""
    return f"lmnh_hist_data_{index}.csv"


def _decoy_objects() -> dict[str, bytes]:
    """Objects a loader must ignore. Several look like exhibitions (ids EXH_06..EXH_09) so that
    a loader that wrongly accepts one is caught: an extra exhibition would appear and its site
    would stop being rejected."""
    exhibition_like = {
        "EXHIBITION_NAME": "Draft: Deep Time",
        "EXHIBITION_ID": "EXH_09",
        "FLOOR": "2",
        "DEPARTMENT": "Geology",
        "START_DATE": "01/01/26",
        "DESCRIPTION": "Placeholder uploaded without an extension; not a live exhibition.",
    }
    planets = {
        "EXHIBITION_NAME": "Planets",
        "EXHIBITION_ID": "EXH_06",
        "FLOOR": "3",
        "DEPARTMENT": "Astronomy",
        "START_DATE": "14/02/22",
        "DESCRIPTION": "Belongs to the Liverpool Museum of Science, not to LMNH.",
    }
    log = {
        "level": "INFO",
        "at": "2023-03-06T18:20:02",
        "message": "kiosk export finished",
        "objects": ["lmnh_hist_data_0.csv", "lmnh_hist_data_1.csv"],
    }
    uber = (
        "Date/Time,Lat,Lon,Base\n"
        "6/1/2014 0:00:00,40.7293,-73.9920,B02512\n"
        "6/1/2014 0:01:00,40.7131,-74.0097,B02512\n"
        "6/1/2014 0:04:00,40.3461,-74.6610,B02512\n"
        "6/1/2014 0:04:00,40.7555,-73.9833,B02512\n"
    )
    jpeg = (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
            b"\xff\xdb\x00\x43\x00" + bytes(range(64)) + b"\xff\xd9")
    dino_txt = ("Thunder Lizards - notes for the label printer\n"
                "EXHIBITION_ID: EXH_07\nFLOOR: 1\nDEPARTMENT: Paleontology\n")
    return {
        "lmnh_exhibition": exhibition_json(exhibition_like),
        "lmnh_exhibition_dino.txt": dino_txt.encode("utf-8"),
        "lms_exhibition_planets.json": exhibition_json(planets),
        "log_2.json": json.dumps(log, indent=4).encode("utf-8"),
        "uber-raw-data-jun14.csv": uber.encode("utf-8"),
        "joana_baby_beaver.jpg": jpeg,
    }


DECOY_OBJECTS: dict[str, bytes] = _decoy_objects()

# ---------------------------------------------------------------------------------------------
# Kiosk CSV generation
# ---------------------------------------------------------------------------------------------

# Shapes measured on the real objects (2,137 rows): site and rating frequencies, ~3.4% calls of
# which ~3% emergencies, ~2.5% rows before opening, ~0.3% exact duplicates.
_CSV_SITE_WEIGHTS = np.array([310, 435, 399, 501, 492], dtype=float)
_RATING_WEIGHTS = np.array([353, 499, 555, 370, 287], dtype=float)
_CALL_SHARE = 0.034
_EMERGENCY_SHARE_OF_CALLS = 0.03
_BEFORE_OPENING_SHARE = 0.020
_AFTER_CLOSING_SHARE = 0.005
_DUPLICATE_SHARE = 0.003
_REASON_ROW_SHARE = 0.0015  # per CSV reason code below

_CSV_REASONS = (
    "missing_at", "invalid_at", "missing_site", "unknown_site", "missing_val",
    "invalid_val", "missing_type", "invalid_type", "unexpected_type",
)
_OPEN_S = OPENING_TIME.hour * 3600 + OPENING_TIME.minute * 60
_CLOSE_S = CLOSING_TIME.hour * 3600 + CLOSING_TIME.minute * 60
_CHUNK_ROWS = 250_000
# Per-row "kind": 0..4 a rating of that value, 5 an assistance call, 6 an emergency call.
_KINDS = 7
_TAIL_WIDTH = 10  # len(",4,-1,1.0\n")


def _tail_table() -> np.ndarray:
    """Every possible ``,site,val,type\\n`` ending of a valid row, as a zero-padded byte matrix
    indexed by ``site * 7 + kind``, so rows are assembled by gathering rather than formatting."""
    tails = []
    for site in range(len(_CSV_SITE_WEIGHTS)):
        for kind in range(_KINDS):
            if kind < 5:
                tails.append(f",{site},{kind},\n")
            else:
                tails.append(f",{site},-1,{kind - 5}.0\n")
    return np.array([t.encode() for t in tails], dtype=f"S{_TAIL_WIDTH}").view(np.uint8).reshape(
        len(tails), _TAIL_WIDTH)


_TAILS = _tail_table()


def _visit_times(rng: np.random.Generator, n: int) -> np.ndarray:
    """Seconds of the day inside opening hours with a late-morning and a mid-afternoon bump
    over a flat base, like a day of school groups and families."""
    part = rng.random(n)
    seconds = np.where(
        part < 0.45, rng.uniform(_OPEN_S, _CLOSE_S + 1, n),
        np.where(part < 0.73, rng.normal(11.0 * 3600, 1.1 * 3600, n),
                 rng.normal(14.75 * 3600, 1.3 * 3600, n)))
    outside = (seconds < _OPEN_S) | (seconds >= _CLOSE_S + 1)
    seconds[outside] = rng.uniform(_OPEN_S, _CLOSE_S + 1, int(outside.sum()))
    return np.floor(seconds).astype(np.int32)


def _hms(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _reason_row(reason: str, rng: random.Random, day: str, seconds: int, site: int,
                kind: int) -> bytes:
    """One CSV line that SPEC §2 rejects with exactly ``reason``; the other fields stay valid."""
    at = f"{day} {_hms(seconds)}"
    site_s = str(site)
    val_s, type_s = (str(kind), "") if kind < 5 else ("-1", f"{kind - 5}.0")
    if reason == "missing_at":
        at = ""
    elif reason == "invalid_at":
        year, _, dd = day.split("-")
        at = rng.choice([f"{day} 25:61:00", "not a date", f"{year}-02-30 {_hms(seconds)}",
                         f"{year}-13-{dd} {_hms(seconds)}", f"{day} 12:60:00", "ERR"])
    elif reason == "missing_site":
        site_s = ""
    elif reason == "unknown_site":
        site_s = rng.choice([str(s) for s in range(6, 13)] + ["ERR", "INF", "None", "1.5"])
    elif reason == "missing_val":
        val_s, type_s = "", ""
    elif reason == "invalid_val":
        val_s = rng.choice(["5", "6", "7", "8", "9", "-3", "-2", "ERR", "INF", "None"])
        type_s = ""
    elif reason == "missing_type":
        val_s, type_s = "-1", ""
    elif reason == "invalid_type":
        val_s, type_s = "-1", rng.choice(["2.0", "-1.0", "4", "ERR", "3.0", "INF"])
    elif reason == "unexpected_type":
        val_s, type_s = str(rng.randrange(5)), rng.choice(["0.0", "0.0", "1.0"])
    else:  # pragma: no cover - guarded by _CSV_REASONS
        raise ValueError(reason)
    return f"{at},{site_s},{val_s},{type_s}\n".encode()


def _split_counts(rows: int, anomalies: bool) -> dict[str, int]:
    """How many rows of each special kind to plant, in planting priority order."""
    if not anomalies:
        return {}
    counts = {
        "before": round(rows * _BEFORE_OPENING_SHARE),
        "after": round(rows * _AFTER_CLOSING_SHARE),
        "boundary": 4 if rows >= 1000 else 0,
    }
    counts.update({reason: round(rows * _REASON_ROW_SHARE) for reason in _CSV_REASONS})
    counts["duplicate"] = round(rows * _DUPLICATE_SHARE)
    return counts


def generate_kiosk_csv(rows: int, seed: int = 0, day: str = "2023-03-06",
                       anomalies: bool = True) -> bytes:
    """A kiosk object like ``lmnh_hist_data_<N>.csv``: header, ``rows`` LF-terminated rows, in
    no particular time order, all on ``day`` (museum local time).

    Valid rows are vectorised: time digits and pre-built row endings are written into a byte
    matrix and the padding is squeezed out, because the pipeline's benchmarks need objects of
    millions of rows and per-row formatting would dominate them. With ``anomalies`` about 4% of
    rows are rejected by SPEC §2 (2.5% outside opening hours plus ~0.15% per other CSV reason);
    0.3% of rows repeat another row exactly, which are distinct valid events (SPEC §3); and,
    from 1,000 rows, four rows sit on the opening-hours boundaries (08:44:59 and 18:15:01 out,
    08:45:00 and 18:15:00 in). Without ``anomalies`` every row is valid.
    """
    if rows < 0:
        raise ValueError("rows must be >= 0")
    day_date = date.fromisoformat(day)
    day = day_date.isoformat()
    if day_date >= datetime.now(LONDON).date():
        raise ValueError(f"day {day} must be before today, or its rows could be future events")
    rng = np.random.default_rng(seed)
    seconds = _visit_times(rng, rows)
    sites = rng.choice(len(_CSV_SITE_WEIGHTS), size=rows,
                       p=_CSV_SITE_WEIGHTS / _CSV_SITE_WEIGHTS.sum()).astype(np.int8)
    kinds = rng.choice(5, size=rows, p=_RATING_WEIGHTS / _RATING_WEIGHTS.sum()).astype(np.int8)
    calls = rng.random(rows) < _CALL_SHARE
    emergencies = rng.random(rows) < _EMERGENCY_SHARE_OF_CALLS
    kinds[calls] = np.where(emergencies[calls], 6, 5)

    special_rows: list[int] = []
    special_lines: list[bytes] = []
    counts = _split_counts(rows, anomalies)
    if counts:
        special_rows, special_lines = _plant_anomalies(rng, random.Random(seed), counts, day,
                                                       (seconds, sites, kinds))
    return CSV_HEADER + _render_rows(day, seconds, sites, kinds, special_rows, special_lines)


def _plant_anomalies(rng: np.random.Generator, py_rng: random.Random, counts: dict[str, int],
                     day: str, columns: tuple[np.ndarray, np.ndarray, np.ndarray]
                     ) -> tuple[list[int], list[bytes]]:
    """Turn rows into the planted anomalies (`counts` per kind), in place in the (seconds,
    sites, kinds) columns; rows a CSV reason spoils come back as their finished lines."""
    seconds, sites, kinds = columns
    rows = len(seconds)
    special_rows: list[int] = []
    special_lines: list[bytes] = []
    order = rng.permutation(rows)
    taken = 0

    def block(name: str) -> np.ndarray:
        nonlocal taken
        size = min(counts[name], rows - taken)
        picked = order[taken:taken + size]
        taken += size
        return picked

    before = block("before")
    # Real early rows cluster in the quarter hour before opening; a few are much earlier.
    seconds[before] = np.where(rng.random(before.size) < 0.85,
                               rng.integers(_OPEN_S - 900, _OPEN_S, before.size),
                               rng.integers(7 * 3600, _OPEN_S, before.size))
    after = block("after")
    seconds[after] = rng.integers(_CLOSE_S + 1, _CLOSE_S + 1800, after.size)
    boundary = block("boundary")
    seconds[boundary] = np.array([_OPEN_S, _CLOSE_S, _OPEN_S - 1, _CLOSE_S + 1])[
        :boundary.size]
    for reason in _CSV_REASONS:
        for row in block(reason).tolist():
            special_rows.append(row)
            special_lines.append(_reason_row(reason, py_rng, day, int(seconds[row]),
                                             int(sites[row]), int(kinds[row])))
    duplicates = block("duplicate")
    # Copy from ordinary rows only, so planted anomaly counts stay exact.
    sources = order[taken:][rng.integers(0, max(rows - taken, 1), duplicates.size)] \
        if rows > taken else duplicates
    seconds[duplicates] = seconds[sources]
    sites[duplicates] = sites[sources]
    kinds[duplicates] = kinds[sources]
    return special_rows, special_lines


def _render_rows(day: str, seconds: np.ndarray, sites: np.ndarray, kinds: np.ndarray,
                 special_rows: list[int], special_lines: list[bytes]) -> bytes:
    """Assemble the CSV body chunk by chunk in a zero-padded byte matrix, dropping the zeros."""
    rows = seconds.size
    width = max([19 + _TAIL_WIDTH] + [len(line) for line in special_lines])
    special_index = np.array(special_rows, dtype=np.int64)
    special_matrix = np.array(special_lines, dtype=f"S{width}").view(np.uint8).reshape(
        len(special_lines), width)
    sort = np.argsort(special_index, kind="stable")
    special_index, special_matrix = special_index[sort], special_matrix[sort]
    prefix = np.frombuffer(f"{day} ".encode(), dtype=np.uint8)
    codes = sites.astype(np.int16) * _KINDS + kinds
    chunks = []
    for start in range(0, rows, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, rows)
        sec = seconds[start:stop]
        buf = np.zeros((stop - start, width), dtype=np.uint8)
        buf[:, :11] = prefix
        hours, minutes, secs = sec // 3600, sec // 60 % 60, sec % 60
        for column, value in ((11, hours // 10), (12, hours % 10), (14, minutes // 10),
                              (15, minutes % 10), (17, secs // 10), (18, secs % 10)):
            buf[:, column] = value + 48
        buf[:, 13] = buf[:, 16] = ord(":")
        buf[:, 19:19 + _TAIL_WIDTH] = _TAILS[codes[start:stop]]
        lo, hi = np.searchsorted(special_index, [start, stop])
        if hi > lo:
            buf[special_index[lo:hi] - start] = special_matrix[lo:hi]
        flat = buf.reshape(-1)
        chunks.append(flat[flat != 0].tobytes())
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------
# Kafka message generation
# ---------------------------------------------------------------------------------------------

# The stream includes site 5 (Thunder Lizards), unlike the CSVs; frequencies from the capture.
_STREAM_SITE_WEIGHTS = np.array([131, 199, 159, 211, 228, 235], dtype=float)
_STREAM_CALL_SHARE = 0.035
# Invalid message variants: (reason the reference classifier gives, weight). Weights follow the
# real stream's mix of faults; the rare hand-made ones make sure every branch gets exercised.
_INVALID_VARIANTS: dict[str, tuple[str, float]] = {
    "at_absent": ("missing_at", 5.0),
    "at_null": ("missing_at", 0.6),
    "at_empty": ("missing_at", 0.4),
    "at_garbage": ("invalid_at", 0.8),
    "at_before_opening": ("outside_opening_hours", 1.0),
    "at_after_closing": ("outside_opening_hours", 0.6),
    "at_far_future": ("future_event", 0.4),
    "site_absent": ("missing_site", 4.0),
    "site_null": ("missing_site", 0.6),
    "site_empty": ("missing_site", 0.4),
    "site_unknown_number": ("unknown_site", 15.0),
    "site_word": ("unknown_site", 4.5),
    "site_fraction": ("unknown_site", 0.5),
    "val_absent": ("missing_val", 9.0),
    "val_null": ("missing_val", 1.0),
    "val_out_of_range": ("invalid_val", 10.0),
    "val_word": ("invalid_val", 3.0),
    "val_bool": ("invalid_val", 0.5),
    "val_fraction": ("invalid_val", 0.5),
    "type_absent": ("missing_type", 0.8),
    "type_null": ("missing_type", 2.0),
    "type_out_of_range": ("invalid_type", 8.0),
    "type_word": ("invalid_type", 8.0),
    "type_on_rating": ("unexpected_type", 1.0),
    "truncated_json": ("malformed_json", 0.8),
    "not_utf8": ("malformed_json", 0.5),
    "empty_payload": ("malformed_json", 0.5),
    "nan_literal": ("malformed_json", 0.4),
    "json_array": ("not_an_object", 0.5),
    "json_scalar": ("not_an_object", 0.5),
}
_VARIANT_NAMES = tuple(_INVALID_VARIANTS)
_VARIANT_WEIGHTS = np.array([w for _, w in _INVALID_VARIANTS.values()])


def _offset_text(moment: datetime) -> str:
    """``+01:00`` style UTC offset of an aware datetime, as ``isoformat`` writes it."""
    return moment.isoformat()[-6:]


def _local(start: datetime) -> datetime:
    return start.replace(tzinfo=LONDON) if start.tzinfo is None else start.astimezone(LONDON)


def _default_start(total_us: int, now: datetime) -> datetime:
    """A 09:00 start far enough back that the whole stream, wrapped day by day, ends by ``now``."""
    window_us = _stream_window_us()
    today = now.date()
    available_us = _micros(min(now, datetime.combine(today, CLOSING_TIME, LONDON))
                           - datetime.combine(today, STREAM_DAY_START, LONDON))
    days_back = 0 if total_us <= available_us else max(
        1, -(-(total_us - max(available_us, 0)) // window_us))

    def last_moment(back: int) -> datetime:
        day = today - timedelta(days=back) + timedelta(days=total_us // window_us)
        return datetime.combine(day, STREAM_DAY_START, LONDON) + timedelta(
            microseconds=total_us % window_us)

    while last_moment(days_back) > now:  # only at exact window boundaries
        days_back += 1
    return datetime.combine(today - timedelta(days=days_back), STREAM_DAY_START, LONDON)


def _micros(delta: timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _stream_window_us() -> int:
    return _micros(datetime.combine(date.min, CLOSING_TIME)
                   - datetime.combine(date.min, STREAM_DAY_START))


def _stream_times(count: int, rng: np.random.Generator, start: datetime | None,
                  interval_seconds: float, now: datetime) -> list[str]:
    """``at`` strings (local time and offset) of a stream with exponential gaps that skips from
    closing time to 09:00 the next day."""
    gaps = np.maximum(rng.exponential(interval_seconds * 1e6, count), 1.0).astype(np.int64)
    offsets = np.zeros(count, dtype=np.int64)
    np.cumsum(gaps[:-1], out=offsets[1:])
    total_us = int(offsets[-1]) if count else 0
    window_us = _stream_window_us()
    if start is None:
        local_start = _default_start(total_us, now)
    else:
        local_start = _local(start)
        if not OPENING_TIME <= local_start.time() <= CLOSING_TIME:
            raise ValueError("start must be inside opening hours, museum local time")
    first_day = local_start.date()
    day_anchor = datetime.combine(first_day, STREAM_DAY_START)
    position = offsets + _micros(local_start.replace(tzinfo=None) - day_anchor)
    day_index = np.where(position < 0, 0, position // window_us)
    within = position - day_index * window_us
    wall = (np.datetime64(first_day.isoformat(), "us")
            + (day_index * 86_400_000_000 + _micros(timedelta(hours=STREAM_DAY_START.hour,
                                                              minutes=STREAM_DAY_START.minute))
               + within).astype("timedelta64[us]"))
    texts = np.datetime_as_string(wall, unit="us")
    offsets_by_day = [
        _offset_text(datetime.combine(first_day + timedelta(days=d), time(12), LONDON))
        for d in range(int(day_index[-1]) + 1 if count else 0)]
    suffix = np.array(offsets_by_day or ["+00:00"])[day_index]
    return np.char.add(texts, suffix).tolist()


def _invalid_payload(variant: str, rng: random.Random, at: str, site: str, val: int,
                     request_type: int | None) -> bytes:
    """One payload with a single fault of the given variant, the rest as a valid message."""
    message: dict[str, Any] = {"at": at, "site": site, "val": val}
    if request_type is not None:
        message["type"] = request_type
    if variant.startswith("type_") and variant != "type_on_rating":
        message["val"] = -1
        message["type"] = 0
    if variant in _WHOLE_PAYLOAD_VARIANTS:
        return _invalid_encoding(variant, rng, message)
    if variant.startswith("at_"):
        _spoil_at(variant, rng, message, at)
    else:
        _spoil_field(variant, rng, message)
    return json.dumps(message).encode()


_WHOLE_PAYLOAD_VARIANTS = ("truncated_json", "not_utf8", "empty_payload", "nan_literal",
                           "json_array", "json_scalar")


def _spoil_at(variant: str, rng: random.Random, message: dict[str, Any], at: str) -> None:
    """The `at` variants: absent, null, empty, garbage, outside opening hours, far future."""
    offset = at[-6:]
    if variant == "at_absent":
        del message["at"]
    elif variant == "at_null":
        message["at"] = None
    elif variant == "at_empty":
        message["at"] = rng.choice(["", " "])
    elif variant == "at_garbage":
        message["at"] = rng.choice(["ERR", "not a date", at[:11] + "25:61:00.000000" + offset,
                                    at[:5] + "02-30" + at[10:], "None", "2024-10-21 9am"])
    elif variant == "at_before_opening":
        clock = rng.choice(["08:44:59.999999", "08:30:12.000417", "07:58:03.512000",
                            "00:00:00.000000"])
        message["at"] = at[:11] + clock + offset
    elif variant == "at_after_closing":
        # The day before, so the timestamp is never in the future.
        previous = date.fromisoformat(at[:10]) - timedelta(days=1)
        clock = rng.choice(["18:15:00.500000", "18:15:01.000000", "18:42:10.004301",
                            "23:59:59.999999"])
        moment = datetime.combine(previous, time.fromisoformat(clock), LONDON)
        message["at"] = moment.isoformat()
    elif variant == "at_far_future":
        message["at"] = "2099-06-15" + at[10:26] + "+01:00"
    else:  # pragma: no cover - guarded by _INVALID_VARIANTS
        raise ValueError(variant)


def _spoil_field(variant: str, rng: random.Random, message: dict[str, Any]) -> None:
    """The `site`, `val` and `type` variants, one fault each."""
    if variant == "site_absent":
        del message["site"]
    elif variant == "site_null":
        message["site"] = None
    elif variant == "site_empty":
        message["site"] = ""
    elif variant == "site_unknown_number":
        message["site"] = str(rng.randint(6, 12))
    elif variant == "site_word":
        message["site"] = rng.choice(["ERR", "INF", "None"])
    elif variant == "site_fraction":
        message["site"] = rng.choice(["1.5", "-1", "5.25"])
    elif variant == "val_absent":
        del message["val"]
    elif variant == "val_null":
        message["val"] = None
    elif variant == "val_out_of_range":
        message["val"] = rng.choice([-3, -2, 5, 6, 7, 8, 9])
    elif variant == "val_word":
        message["val"] = rng.choice(["ERR", "INF", "None"])
    elif variant == "val_bool":
        message["val"] = rng.choice([True, False])
    elif variant == "val_fraction":
        message["val"] = rng.choice([1.5, 2.5, -0.5])
    elif variant == "type_absent":
        del message["type"]
    elif variant == "type_null":
        message["type"] = None
    elif variant == "type_out_of_range":
        message["type"] = rng.choice([-1, 2, 3, 4])
    elif variant == "type_word":
        message["type"] = rng.choice(["ERR", "INF"])
    elif variant == "type_on_rating":
        message["val"] = rng.randrange(5)
        message["type"] = rng.choice([0, 1])
    else:  # pragma: no cover - guarded by _INVALID_VARIANTS
        raise ValueError(variant)


def _invalid_encoding(variant: str, rng: random.Random, message: dict[str, Any]) -> bytes:
    """The variants that spoil the payload as a whole rather than one field."""
    if variant == "truncated_json":
        text = json.dumps(message)
        return text[:rng.randint(1, len(text) - 1)].encode()
    elif variant == "not_utf8":
        return b"\xff\xfe" + json.dumps(message).encode("utf-16-le")
    elif variant == "empty_payload":
        return b""
    elif variant == "nan_literal":
        message["val"] = float(rng.choice(["nan", "inf"]))
        return json.dumps(message).encode()
    elif variant == "json_array":
        return rng.choice([b"[1, 2]", json.dumps([message]).encode()])
    elif variant == "json_scalar":
        return rng.choice([b'"hello"', b"42", b"null", json.dumps(json.dumps(message)).encode()])
    raise ValueError(variant)  # pragma: no cover - guarded by _INVALID_VARIANTS


def generate_messages(count: int, seed: int = 0, invalid_fraction: float = 0.16,
                      start: datetime | None = None,
                      interval_seconds: float = 2.0) -> list[bytes]:
    """Kafka payloads as the kiosks send them, in arrival order, about ``invalid_fraction`` of
    them faulty in the ways the real topic shows (plus rarer hand-made faults: malformed JSON,
    non-UTF-8, empty, non-object, booleans, fractions, out-of-hours and future times).

    Valid payloads are ``{"at": ..., "site": "N", "val": V}`` (+ ``"type": T`` for calls) with
    ``at`` in ISO-8601 with microseconds and the Europe/London offset of that moment. Messages
    arrive ``interval_seconds`` apart on average and only during opening hours: past 18:15 the
    stream moves on to 09:00 the next day. Without ``start`` the stream begins at 09:00 on the
    latest day that lets it end by now, so no valid message is a future event. Deterministic
    for a seed once ``start`` is given.
    """
    if count < 0:
        raise ValueError("count must be >= 0")
    if not 0.0 <= invalid_fraction <= 1.0:
        raise ValueError("invalid_fraction must be between 0 and 1")
    if interval_seconds <= 0:
        raise ValueError("interval_seconds must be positive")
    if count == 0:
        return []
    rng = np.random.default_rng(seed)
    ats = _stream_times(count, rng, start, interval_seconds, datetime.now(LONDON))
    sites = rng.choice(len(_STREAM_SITE_WEIGHTS), size=count,
                       p=_STREAM_SITE_WEIGHTS / _STREAM_SITE_WEIGHTS.sum()).tolist()
    vals = rng.choice(5, size=count, p=_RATING_WEIGHTS / _RATING_WEIGHTS.sum())
    calls = rng.random(count) < _STREAM_CALL_SHARE
    emergencies = rng.random(count) < _EMERGENCY_SHARE_OF_CALLS
    vals[calls] = -1
    types = np.where(emergencies, 1, 0)
    invalid = np.flatnonzero(rng.random(count) < invalid_fraction)
    variants = rng.choice(len(_VARIANT_NAMES), size=invalid.size,
                          p=_VARIANT_WEIGHTS / _VARIANT_WEIGHTS.sum()).tolist()
    vals_list = vals.tolist()
    types_list = types.tolist()
    payloads = [
        f'{{"at": "{at}", "site": "{site}", "val": {val}, "type": {kind}}}'.encode()
        if val == -1 else f'{{"at": "{at}", "site": "{site}", "val": {val}}}'.encode()
        for at, site, val, kind in zip(ats, sites, vals_list, types_list)]
    py_rng = random.Random(seed)
    for index, variant in zip(invalid.tolist(), variants):
        val = vals_list[index]
        payloads[index] = _invalid_payload(
            _VARIANT_NAMES[variant], py_rng, ats[index], str(sites[index]), val,
            types_list[index] if val == -1 else None)
    return payloads


# ---------------------------------------------------------------------------------------------
# Reference classifier (SPEC §2), deliberately simple and independent of the product
# ---------------------------------------------------------------------------------------------

_TIMESTAMP = re.compile(
    r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}(:?\d{2})?)?")
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+(\.[0-9]+)?")


def _is_missing(value: Any) -> bool:
    """SPEC §2 "present and not null/empty": absent (None here), null, or a blank string."""
    return value is None or (isinstance(value, str) and value.strip() == "")


def _integer_value(value: Any) -> int | None:
    """The integer a field holds per SPEC §2, or None when it is not "an integer value"."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    if isinstance(value, str):
        text = value.strip()
        if not _INTEGER_TEXT.fullmatch(text):
            return None
        try:
            number = Decimal(text)
        except InvalidOperation:  # pragma: no cover - the regex admits only decimals
            return None
        return int(number) if number == number.to_integral_value() else None
    return None


def _parse_at(value: Any) -> datetime | None:
    """An aware Europe/London datetime, or None when rule 2 fails (including local times that
    do not exist because the clocks went forward)."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not _TIMESTAMP.fullmatch(text):
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is not None:
        return parsed.astimezone(LONDON)
    local = parsed.replace(tzinfo=LONDON)
    if local.astimezone(UTC).astimezone(LONDON).replace(tzinfo=None) != parsed:
        return None
    return local


def _classify_fields(fields: tuple[Any, Any, Any, Any],
                     known: tuple[Container[int], Container[int], Container[int]],
                     now: datetime, opening_hours: tuple[time, time]) -> str:
    """Rules 1-11 of SPEC §2 in order on (at, site, val, type), against the known (sites,
    ratings, requests); absent fields are passed as None."""
    at, site, val, request_type = fields
    known_sites, ratings, requests = known
    if _is_missing(at):
        return "missing_at"
    moment = _parse_at(at)
    if moment is None:
        return "invalid_at"
    opening, closing = opening_hours
    if not opening <= moment.time() <= closing:
        return "outside_opening_hours"
    if moment > now + FUTURE_TOLERANCE:
        return "future_event"
    if _is_missing(site):
        return "missing_site"
    site_number = _integer_value(site)
    if site_number is None or site_number not in known_sites:
        return "unknown_site"
    if _is_missing(val):
        return "missing_val"
    value = _integer_value(val)
    if value is None or (value != -1 and value not in ratings):
        return "invalid_val"
    if value == -1:
        if _is_missing(request_type):
            return "missing_type"
        type_number = _integer_value(request_type)
        if type_number is None or type_number not in requests:
            return "invalid_type"
        return "request"
    if not _is_missing(request_type):
        return "unexpected_type"
    return "rating"


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=LONDON)


def expected_reasons(csv_bytes: bytes, known_sites: Container[int] = _SEED_SITES,
                     ratings: Container[int] = _SEED_RATINGS,
                     requests: Container[int] = _SEED_REQUESTS, *,
                     now: datetime | None = None,
                     opening_hours: tuple[time, time] = _OPENING_HOURS,
                     ) -> Counter:
    """Count what SPEC §2 makes of each row of a kiosk CSV: a reason code, or ``rating`` /
    ``request`` for valid rows. Skips the header and blank lines; ``now`` is the processing
    time for the future rule (default: the current time)."""
    moment_now = _now(now)
    counts: Counter = Counter()
    lines = csv_bytes.decode("utf-8").split("\n")
    for line in lines[1:]:
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = next(csv.reader([line]))
        at, site, val, request_type = (fields + ["", "", "", ""])[:4]
        counts[_classify_fields((at, site, val, request_type), (known_sites, ratings, requests),
                                moment_now, opening_hours)] += 1
    return counts


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def classify_message(payload: bytes, known_sites: Container[int] = _SEED_SITES,
                     ratings: Container[int] = _SEED_RATINGS,
                     requests: Container[int] = _SEED_REQUESTS,
                     now: datetime | None = None, *,
                     opening_hours: tuple[time, time] = _OPENING_HOURS) -> str:
    """What SPEC §2 makes of one Kafka payload: a reason code, or ``rating`` / ``request``."""
    try:
        message = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError):
        return "malformed_json"
    if not isinstance(message, dict):
        return "not_an_object"
    return _classify_fields((message.get("at"), message.get("site"), message.get("val"),
                             message.get("type")), (known_sites, ratings, requests), _now(now),
                            opening_hours)


# ---------------------------------------------------------------------------------------------
# Seeding a bucket
# ---------------------------------------------------------------------------------------------

def _objects(objects: int, rows: int, seed: int, anomalies: bool) -> Iterable[tuple[str, bytes,
                                                                                 str]]:
    for index in range(objects):
        yield kiosk_key(index), generate_kiosk_csv(rows, seed=seed + index,
                                                   anomalies=anomalies), "text/csv"
    for record in EXHIBITIONS:
        yield (EXHIBITION_FILE_NAMES[record["EXHIBITION_ID"]], exhibition_json(record),
               "application/json")
    content_types = {".jpg": "image/jpeg", ".json": "application/json", ".csv": "text/csv",
                     ".txt": "text/plain"}
    for key, body in DECOY_OBJECTS.items():
        suffix = key[key.rfind("."):] if "." in key else ""
        yield key, body, content_types.get(suffix, "application/octet-stream")


def seed_bucket(s3_client: Any, bucket: str, objects: int = 4, rows: int = 535, seed: int = 0,
                anomalies: bool = True) -> list[str]:
    """Fill a bucket like the museum's: kiosk CSVs (object i from seed + i), the six exhibition
    files and the decoys. Creates the bucket when missing; returns the keys written."""
    # Imported here: only callers that hold an S3 client need botocore.
    from botocore.exceptions import ClientError

    try:
        s3_client.head_bucket(Bucket=bucket)
    except ClientError:
        region = s3_client.meta.region_name
        kwargs: dict[str, Any] = {"Bucket": bucket}
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            s3_client.create_bucket(**kwargs)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise
    written = []
    for key, body, content_type in _objects(objects, rows, seed, anomalies):
        s3_client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type)
        written.append(key)
    return written


# ---------------------------------------------------------------------------------------------
# Command line: seed the configured (or local) bucket, as `make demo` does
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """Options of ``python3 sample_data.py``; separate so tests can check them without S3."""
    parser = argparse.ArgumentParser(
        prog="sample_data.py",
        description="Seed an S3 bucket (the local one unless .env names S3) with generated "
                    "kiosk CSVs, the six exhibition files and the decoy objects.")
    parser.add_argument("-b", "--bucket", default=None,
                        help="bucket to fill (default: $BUCKET or sigma-resources-museum)")
    parser.add_argument("--objects", type=int, default=4,
                        help="kiosk objects lmnh_hist_data_0..N-1.csv (default 4)")
    parser.add_argument("--rows", type=int, default=535, help="rows per kiosk object (default 535)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--no-anomalies", action="store_true",
                        help="only valid rows (default: ~4%% rejected rows, as in reality)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Seed the bucket; exit 0 on success, 2 for a bad setting, 1 when S3 cannot be used."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.objects < 0 or args.rows < 0:
        parser.error("--objects and --rows must be >= 0")
    # The entry-point modules are imported here so the generator itself needs only numpy.
    import botocore.exceptions

    import localstack
    from extract import describe_s3_error, make_s3_client
    from logsetup import read_protected_environment, setup_logging
    from settings import (
        DEFAULT_BUCKET,
        SettingsError,
        first_line,
        load_settings,
        redact,
    )

    setup_logging("console", "sample_data")
    log = logging.getLogger("sample_data")
    secrets: list[str] = []
    bucket = args.bucket or DEFAULT_BUCKET
    try:
        env, secrets = read_protected_environment()
        settings = load_settings(env)
        settings = localstack.resolve(settings, ("s3",))
        bucket = args.bucket or settings.bucket
        client = make_s3_client(settings.s3)
        keys = seed_bucket(client, bucket, objects=args.objects, rows=args.rows, seed=args.seed,
                           anomalies=not args.no_anomalies)
    except SettingsError as exc:
        log.error("configuration error: %s", redact(str(exc), secrets))
        return 2
    except localstack.LocalStackError as exc:
        log.error("local stack: %s", redact(first_line(exc), secrets))
        return 1
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        log.error("%s", redact(describe_s3_error(exc, f"seeding s3://{bucket}",
                                                 "s3:PutObject"), secrets))
        return 1
    log.info("seeded s3://%s: %d kiosk objects of %d rows, %d exhibition files, %d decoys",
             bucket, args.objects, args.rows, len(EXHIBITIONS), len(DECOY_OBJECTS))
    log.debug("keys: %s", ", ".join(keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
