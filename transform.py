"""SPEC §2's event rules: one implementation, used by the S3 batch and the Kafka consumer alike.

Both sources are first turned into the same shape — a frame of raw `at`, `site`, `val`, `type`
values and each event's `position` (CSV line number or Kafka offset) — and then validated
together, vectorised, by `validate_events`. What is "known" (sites, rating and request values)
comes from the database's master data at the time of processing, passed in as `MasterData`.
"""
from __future__ import annotations

import csv
import itertools
import json
import operator
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import orjson
import pandas as pd

LONDON = "Europe/London"
FIELDS = ("at", "site", "val", "type")
CSV_HEADER = "at,site,val,type"

# SPEC §2 reason codes, in rule order, and the product's own codes for rows that are not events.
REASONS = ("malformed_json", "not_an_object", "missing_at", "invalid_at", "outside_opening_hours",
           "future_event", "missing_site", "unknown_site", "missing_val", "invalid_val",
           "missing_type", "invalid_type", "unexpected_type")
OWN_REASONS = ("malformed_row", "bad_header")

# The text forms SPEC §2 accepts: "5", "-1", "1.0" (decimal digits only: no "1e0", "INF", "٣").
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?")
# ISO-8601 extended date and time to the second, optional fraction and offset; "T" or a space.
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}(?::?\d{2})?)?")
_EXACT_FLOAT = 2**53  # beyond this a float no longer holds every integer exactly


@dataclass(frozen=True)
class Rules:
    """The configurable part of SPEC §2: opening hours and how far ahead an event may be."""

    opening: time = time(8, 45)
    closing: time = time(18, 15)
    future_tolerance: timedelta = timedelta(minutes=5)
    zone: str = LONDON


@dataclass(frozen=True)
class MasterData:
    """What the database knows at processing time: value -> surrogate key."""

    exhibitions: dict[int, int]            # site number -> exhibition_id
    ratings: dict[int, int]                # rating_value -> rating_id
    requests: dict[int, int]               # request_value -> request_id
    exhibition_names: dict[int, str] = field(default_factory=dict)  # site -> name


@dataclass
class Outcome:
    """Valid ratings, valid requests and rejections of one batch; rows partition the input."""

    ratings: pd.DataFrame      # position, exhibition_id, rating_id, event_at (UTC)
    requests: pd.DataFrame     # position, exhibition_id, request_id, event_at, site, request_value
    rejections: pd.DataFrame   # position, locator, payload, reason, detail
    # Kafka events also carry their partition in every frame.

    @property
    def count(self) -> int:
        return len(self.ratings) + len(self.requests) + len(self.rejections)

    def reason_counts(self) -> dict[str, int]:
        return self.rejections["reason"].value_counts().to_dict() if len(self.rejections) else {}


@dataclass
class Tally:
    """Events read = ratings + requests + rejected, added up per chunk, object, batch and run."""

    read: int = 0
    ratings: int = 0
    requests: int = 0
    rejected: Counter = field(default_factory=Counter)

    @property
    def stored(self) -> int:
        return self.ratings + self.requests

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def add_outcome(self, outcome: Outcome) -> None:
        self.read += outcome.count
        self.ratings += len(outcome.ratings)
        self.requests += len(outcome.requests)
        self.rejected.update(outcome.reason_counts())

    def add(self, other: Tally) -> None:
        self.read += other.read
        self.ratings += other.ratings
        self.requests += other.requests
        self.rejected.update(other.rejected)


@dataclass
class ParsedEvents:
    """Events whose fields could be read, plus the rows that never became events."""

    events: pd.DataFrame       # position, payload, at, site, val, type (+ partition for Kafka)
    rejections: pd.DataFrame   # position, locator, payload, reason, detail (+ partition)


REJECTION_COLUMNS = ["position", "locator", "payload", "reason", "detail"]
MAX_LINE_BYTES = 1024 * 1024  # SPEC §3: a longer CSV line is a malformed_row holding its first 1 MiB


class OverlongLine(str):
    """A CSV line over MAX_LINE_BYTES as extract reads it: its first MAX_LINE_BYTES (whole
    characters) as text, and its full length in `length_bytes`. extract yields one in a batch
    of its own, so parse_csv_lines looks for it only there, at no cost to ordinary batches."""

    length_bytes: int

    def __new__(cls, head: str, length_bytes: int) -> OverlongLine:
        line = super().__new__(cls, head)
        line.length_bytes = length_bytes
        return line


def empty_rejections() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c == "position" else object)
                         for c in REJECTION_COLUMNS})


def payload_text(raw: bytes | None) -> str:
    """Raw bytes as storable text: invalid UTF-8 escaped, NUL (which PostgreSQL refuses) too."""
    if raw is None:
        return ""
    return raw.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")


# --------------------------------------------------------------------------- parsing
def parse_csv_lines(lines: Sequence[str], first_line_no: int) -> ParsedEvents:
    """Split kiosk CSV lines (no terminators) into fields; line numbers become positions.

    Blank lines are not events and are dropped. A line that is not four comma-separated fields
    is an event we cannot read: it is rejected as `malformed_row`, never dropped; so is an
    `OverlongLine`, which extract yields alone in its batch, so only such a batch is looked at.
    """
    if len(lines) == 1 and isinstance(lines[0], OverlongLine):
        return _overlong_row(lines[0], first_line_no)
    return _split_csv_lines(list(lines), first_line_no)


def _split_csv_lines(lines: list[str], first_line_no: int) -> ParsedEvents:
    """`parse_csv_lines` of ordinary lines. Lines in the kiosk form (nearly all) are split
    from the chunk's bytes with no Python string per field (`_kiosk_rows`); the rest of the
    well-formed lines in one pass over their joined text rather than line by line."""
    text = "\n".join(lines)
    if "\r" in text:
        lines = [line.removesuffix("\r") for line in lines]
        text = "\n".join(lines)
    n = len(lines)
    kiosk = _kiosk_rows(lines, text) if n >= _KIOSK_MIN_LINES and text.isascii() else None
    if kiosk is None:
        simple, columns = _simple_rows(lines, text)
    else:
        rest = np.ones(n, dtype=bool)
        rest[kiosk.rows] = False
        simple, others = _simple_rows(lines, text, rest)
        simple[kiosk.rows] = True
        columns = kiosk.merged(simple, others)
    simple_idx = np.flatnonzero(simple)
    positions = [simple_idx + first_line_no]
    payloads = [lines if len(simple_idx) == n else [lines[i] for i in simple_idx.tolist()]]
    bad_positions, bad_raws, bad_details = [], [], []
    quoted_positions, quoted_lines = [], []
    for i in np.flatnonzero(~simple):
        line = lines[i]
        if not line or line.isspace():
            continue
        try:
            parts = next(csv.reader([line])) if '"' in line else line.split(",")
        except csv.Error as exc:  # a bare CR inside quotes, a field beyond csv's size limit
            bad_positions.append(first_line_no + i)
            bad_raws.append(line.replace("\x00", "\\x00"))
            bad_details.append(f"not a readable CSV line: {exc}")
            continue
        if len(parts) == 4:
            quoted_positions.append(first_line_no + i)
            quoted_lines.append(line)
            for column, part in zip(columns, parts):
                column.append(part)
            continue
        bad_positions.append(first_line_no + i)
        bad_raws.append(line.replace("\x00", "\\x00"))
        bad_details.append(f"expected 4 comma-separated fields (at,site,val,type), found {len(parts)}")
    positions.append(np.array(quoted_positions, dtype="int64"))
    payloads.append(quoted_lines)
    events = pd.DataFrame({"position": np.concatenate(positions).astype("int64"),
                           "payload": _raw(payloads[0], payloads[1]),
                           "at": _series(columns[0]), "site": _series(columns[1]),
                           "val": _series(columns[2]), "type": _series(columns[3])})
    rejections = pd.DataFrame({"position": np.array(bad_positions, dtype="int64"),
                               "locator": [str(p) for p in bad_positions], "payload": bad_raws,
                               "reason": "malformed_row", "detail": bad_details})
    return ParsedEvents(events, rejections if len(rejections) else empty_rejections())


def _simple_rows(lines: list[str], text: str, among: np.ndarray | None = None
                 ) -> tuple[np.ndarray, list[list[str]]]:
    """Which of the lines (all, or those `among`) are four fields with no quote, and those
    fields, split in one pass over their joined text."""
    n = len(lines)
    simple = np.zeros(n, dtype=bool)
    if among is None:
        simple[:] = np.fromiter(map(_COUNT_COMMAS, lines), dtype=np.int64, count=n) == 3
        if '"' in text:
            simple &= np.fromiter(('"' not in line for line in lines), dtype=bool, count=n)
        everything = simple.all()
        kept = lines if everything else [lines[i] for i in np.flatnonzero(simple).tolist()]
        flat = (text.replace("\n", ",") if everything else ",".join(kept)).split(",") if kept else []
    else:
        kept = []
        for i in np.flatnonzero(among).tolist():
            line = lines[i]
            if line.count(",") == 3 and '"' not in line:
                simple[i] = True
                kept.append(line)
        flat = ",".join(kept).split(",") if kept else []
    return simple, [flat[0::4], flat[1::4], flat[2::4], flat[3::4]]


_COUNT_COMMAS = operator.methodcaller("count", ",")


# The kiosk form: `YYYY-MM-DD HH:MM:SS,` then at most 8 bytes of `site,val,type`, which covers
# every valid row (`5,-1,1.0` is the longest). A row in it is read from the chunk's bytes as
# 64-bit words: the timestamp's digits packed into an integer key, the tail as one word; each
# is factorized, so a distinct text is made once (timestamps: once per process, see
# `_KioskTimes`), not once per row. Every other line takes the text path above.
_KIOSK_MIN_LINES = 256        # fewer lines: the text path is as quick
_KIOSK_AT_BYTES = 19
_KIOSK_TAIL_BYTES = 8
_KIOSK_ROW_BYTES = 32         # read per line: 4 words, the last 4 bytes unused
_KIOSK_TEMPLATE = "dddd-dd-dd dd:dd:dd,"


def _word_masks(template: str, word: int) -> tuple[int, int, int]:
    """(digit bytes, fixed bytes, their values) of the template's 8 bytes from 8 * word."""
    digits = fixed = value = 0
    for i, c in enumerate(template[8 * word:8 * word + 8]):
        if c == "d":
            digits |= 0xFF << 8 * i
        else:
            fixed |= 0xFF << 8 * i
            value |= ord(c) << 8 * i
    return digits, fixed, value


_KIOSK_WORDS = [tuple(np.uint64(m) for m in _word_masks(_KIOSK_TEMPLATE, w)) for w in range(3)]
_NIBBLES = np.uint64(0x0F0F0F0F0F0F0F0F)
_HIGH_NIBBLES = np.uint64(0xF0F0F0F0F0F0F0F0)
_ZEROS = np.uint64(0x3030303030303030)
_SIXES = np.uint64(0x0606060606060606)
_ONES = np.uint64(0x0101010101010101)
_EIGHTIES = np.uint64(0x8080808080808080)
_TAIL_MASK = np.array([(1 << 8 * k) - 1 for k in range(_KIOSK_TAIL_BYTES)] + [2**64 - 1],
                      dtype=np.uint64)  # the first k bytes of a word


def _digits_and_marks(words: np.ndarray, w: int) -> np.ndarray:
    """Whether each word has ASCII digits and the template's marks where the template says."""
    digits, fixed, value = _KIOSK_WORDS[w]
    d = words & digits
    return (((words & fixed) == value) & ((d & _HIGH_NIBBLES) == (_ZEROS & digits))
            & (((d + (_SIXES & digits)) & _HIGH_NIBBLES) == (_ZEROS & digits)))


@dataclass
class _Coded:
    """A column as codes into its distinct texts (a pandas Categorical in the making)."""

    codes: np.ndarray
    texts: list[str]
    extra: list[str] = field(default_factory=list)  # values appended after the coded rows

    def append(self, value: str) -> None:
        self.extra.append(value)

    def series(self) -> pd.Series:
        codes, texts = self.codes, self.texts
        if self.extra:
            more, texts = _coded_with(texts, self.extra)
            codes = np.concatenate([codes, np.array(more, dtype=codes.dtype)])
        return pd.Series(pd.Categorical.from_codes(
            codes, dtype=pd.CategoricalDtype(pd.Index(texts, dtype=object))), copy=False)


def _coded_with(texts: Sequence[str], values: list[str]) -> tuple[list[int], list[str]]:
    """The codes of `values` among `texts`, and the texts with the new values appended."""
    known = {text: code for code, text in enumerate(texts)}
    return [known.setdefault(value, len(known)) for value in values], list(known)


def _series(column: list | _Coded) -> pd.Series:
    return column.series() if isinstance(column, _Coded) else _raw(column)


@dataclass
class _KioskRows:
    """The lines of a chunk in the kiosk form: their indices and their four fields as codes."""

    rows: np.ndarray
    columns: list[tuple[np.ndarray, list[str]]]

    def merged(self, simple: np.ndarray, others: list[list[str]]) -> list[_Coded]:
        """The coded columns of every simple row in line order: these rows and `others`, the
        fields of the remaining simple rows."""
        simple_idx = np.flatnonzero(simple)
        mine = np.searchsorted(simple_idx, self.rows)
        theirs = np.ones(len(simple_idx), dtype=bool)
        theirs[mine] = False
        theirs = np.flatnonzero(theirs)
        merged = []
        for (codes, texts), values in zip(self.columns, others):
            if not values:
                merged.append(_Coded(codes, texts))
                continue
            out = np.empty(len(simple_idx), dtype=np.int32)
            out[mine] = codes
            out[theirs], texts = _coded_with(texts, values)
            merged.append(_Coded(out, texts))
        return merged


def _kiosk_rows(lines: list[str], text: str) -> _KioskRows | None:
    """The lines of `text` (ASCII, `lines` joined by LF) that are in the kiosk form."""
    data = text.encode("ascii")
    n = len(lines)
    breaks = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    if len(breaks) != n - 1:
        return None  # a line holds a LF: not lines as extract hands them over
    starts = np.concatenate([[0], breaks + 1])
    lengths = np.concatenate([breaks, [len(data)]]) - starts
    rows = np.flatnonzero((lengths > _KIOSK_AT_BYTES)
                          & (lengths <= _KIOSK_AT_BYTES + 1 + _KIOSK_TAIL_BYTES))
    if not len(rows):
        return None
    words = _row_heads(data, starts[rows], _KIOSK_ROW_BYTES).view("<u8")  # 4 words a line
    w0, w1, w2, w3 = words[:, 0], words[:, 1], words[:, 2], words[:, 3]
    in_tail = _TAIL_MASK[lengths[rows] - (_KIOSK_AT_BYTES + 1)]
    tail = ((w2 >> np.uint64(32)) | (w3 << np.uint64(32))) & in_tail  # bytes 20-27
    padded = tail | ~in_tail  # a NUL in the tail would read as the padding
    form = (_digits_and_marks(w0, 0) & _digits_and_marks(w1, 1)
            & _digits_and_marks(w2 & np.uint64(0xFFFFFFFF), 2)
            & ~_has_byte_below(padded, 1))
    rows, tail = rows[form], tail[form]
    tail_codes, tail_keys = pd.factorize(tail)
    tails = [b.decode("ascii") for b in tail_keys.view("S8").tolist()]
    parts = [t.split(",") for t in tails]
    good = [len(p) == 3 and '"' not in t for p, t in zip(parts, tails)]
    if not all(good):
        keep = np.array(good, dtype=bool)[tail_codes]
        rows, tail_codes, form = rows[keep], tail_codes[keep], np.flatnonzero(form)[keep]
    if not len(rows):
        return None
    # the digits' low nibbles: year and month, under day, hour and minute, seconds in the
    # nibbles the marks leave free: one integer per timestamp text
    w0, w1 = w0[form] & _KIOSK_WORDS[0][0] & _NIBBLES, w1[form] & _KIOSK_WORDS[1][0] & _NIBBLES
    w2 = w2[form]
    key = (w0 | (w1 << np.uint64(4)) | ((w2 >> np.uint64(8)) & np.uint64(0xF)) << np.uint64(32)
           | ((w2 >> np.uint64(16)) & np.uint64(0xF)) << np.uint64(56))
    at_codes, at_keys = pd.factorize(key)
    ats = _KIOSK_TIMES.texts(at_keys, lambda new: [
        text[s:s + _KIOSK_AT_BYTES]
        for s in starts[rows[_representatives(at_codes, len(at_keys))[new]]].tolist()])
    columns = [(at_codes.astype(np.int32), ats)]
    for k in range(3):  # site, val, type: each distinct tail's field, coded
        known: dict[str, int] = {}
        of_tail = np.array([known.setdefault(p[k], len(known)) if ok else -1
                            for p, ok in zip(parts, good)], dtype=np.int32)
        columns.append((of_tail[tail_codes], list(known)))
    return _KioskRows(rows, columns)


class _KioskTimes:
    """Timestamp texts by their integer key, kept across chunks and objects: an object's
    chunks repeat most of a day's seconds, so most texts are made once per process. Used by
    the CSV path only, which runs on one thread (pipeline.py's, replay.py's)."""

    def __init__(self, size: int):
        self.size = size
        self.clear()

    def clear(self) -> None:
        self.keys = pd.Index([], dtype=np.uint64)
        self.values = np.empty(0, dtype=object)

    def texts(self, keys: np.ndarray, make: Callable[[np.ndarray], list[str]]) -> np.ndarray:
        """The texts of `keys`; `make(indices)` makes those of keys[indices] never seen."""
        if len(self.keys) > self.size:
            self.clear()
        found = self.keys.get_indexer(keys) if len(self.keys) else np.full(len(keys), -1)
        new = np.flatnonzero(found < 0)
        if len(new):
            found[new] = np.arange(len(self.keys), len(self.keys) + len(new))
            made = np.empty(len(new), dtype=object)
            made[:] = make(new)
            self.keys = self.keys.append(pd.Index(keys[new], dtype=np.uint64))
            self.values = np.concatenate([self.values, made])
        return self.values[found]


_KIOSK_TIMES = _KioskTimes(200_000)


def _row_heads(data: bytes, starts: np.ndarray, width: int) -> np.ndarray:
    """The `width` bytes from each of `starts` in `data` (zeros past its end) as the rows of
    a matrix: a strided view of the buffer, the rows taken in one index, no loop per row."""
    buf = np.frombuffer(data + bytes(width), dtype=np.uint8)
    return np.lib.stride_tricks.as_strided(buf, (len(data), width), (1, 1),
                                           writeable=False)[starts]


def _representatives(codes: np.ndarray, count: int) -> np.ndarray:
    """For each code, the index of one row that has it (any: they are all the same text)."""
    rep = np.empty(count, dtype=np.int64)
    rep[codes] = np.arange(len(codes))
    return rep


def _overlong_row(line: OverlongLine, line_no: int) -> ParsedEvents:
    """A line too long to be an event: a malformed_row keeping its head and saying its length."""
    rejection = pd.DataFrame({
        "position": np.array([line_no], dtype="int64"), "locator": [str(line_no)],
        "payload": [str(line).replace("\x00", "\\x00")], "reason": "malformed_row",
        "detail": [f"line is {line.length_bytes} bytes long, over the limit of {MAX_LINE_BYTES} "
                   "bytes (1 MiB); the payload holds its first 1 MiB"]})
    return ParsedEvents(parse_csv_lines([], line_no).events, rejection)


def _objects(*parts: list) -> np.ndarray:
    """Lists of raw values as one object array (pandas must not guess a dtype for them)."""
    out = np.empty(sum(len(p) for p in parts), dtype=object)
    at = 0
    for part in parts:
        out[at:at + len(part)] = part
        at += len(part)
    return out


def _raw(*parts: list) -> pd.Series:
    """Raw values as an object column: pandas 3 would otherwise check every value to make
    all-text columns its `str` dtype, which nothing here needs and which costs real time."""
    return pd.Series(_objects(*parts), dtype=object, copy=False)


# JSON values validate_events takes as they are; any other (a boolean, a list, an object) is
# passed on as its JSON text, which no rule accepts (booleans are not integers, objects are not
# timestamps).
_PLAIN = frozenset({str, int, float, type(None)})


def _loads(payload: bytes | None) -> Any:
    """orjson, and where it refuses, the standard parser: orjson refuses integers beyond 64
    bits that JSON allows; NaN/Infinity, which JSON does not allow, stay refused."""
    try:
        return orjson.loads(payload)
    except (orjson.JSONDecodeError, TypeError):
        return json.loads((payload or b"").decode("utf-8"), parse_constant=_refuse_constant)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_messages(payloads: Sequence[bytes | None], partitions: Sequence[int],
                   offsets: Sequence[int]) -> ParsedEvents:
    """Kafka payloads to fields: rules 0 (UTF-8 JSON) and 0b (an object) are decided here.

    The events keep their `partition`; an event's position is its offset. Payloads in the
    live feed's own layout (nearly all) are read from their bytes (`_feed_layout`); the rest
    one at a time.
    """
    n = len(payloads)
    feed = _feed_layout(payloads) if n >= _FEED_MIN_MESSAGES else None
    if feed is None:
        rest: Iterable[int] = range(n)
    else:
        rest = np.ones(n, dtype=bool)
        rest[feed.rows] = False
        rest = np.flatnonzero(rest).tolist()
    keep, columns, bad = _parse_each(payloads, rest)
    index = np.array(keep, dtype="int64")
    if feed is not None:  # both kinds of rows, in message order
        index = np.concatenate([feed.rows, index])
        order = np.argsort(index, kind="stable")
        index = index[order]
        columns = [np.concatenate([mine, theirs])[order]
                   for mine, theirs in zip(feed.columns, columns)]
    offsets = np.asarray(offsets, dtype="int64")
    partitions = np.asarray(partitions, dtype="int64")
    payloads_array = _objects(payloads)
    events = pd.DataFrame({"position": offsets[index], "partition": partitions[index],
                           "payload": pd.Series(payloads_array[index], dtype=object),
                           "at": _column(columns[0]), "site": _column(columns[1]),
                           "val": _column(columns[2]), "type": _column(columns[3])})
    rejections = pd.DataFrame({
        "position": np.array([offsets[i] for i, _, _ in bad], dtype="int64"),
        "partition": np.array([partitions[i] for i, _, _ in bad], dtype="int64"),
        "locator": [f"{partitions[i]}:{offsets[i]}" for i, _, _ in bad],
        "payload": [payload_text(payloads[i]) for i, _, _ in bad],
        "reason": [reason for _, reason, _ in bad],
        "detail": [detail for _, _, detail in bad]})
    return ParsedEvents(events, rejections)


def _parse_each(payloads: Sequence[bytes | None], rows: Iterable[int]
                ) -> tuple[list[int], list[np.ndarray], list[tuple[int, str, str]]]:
    """The payloads at `rows` parsed one at a time: the rows that are JSON objects with their
    at, site, val and type; the others as (row, reason, detail)."""
    keep, ats, sites, vals, types, bad = [], [], [], [], [], []
    loads, plain, dumps = orjson.loads, _PLAIN, json.dumps
    for i in rows:
        payload = payloads[i]
        try:
            message = loads(payload)
        except (orjson.JSONDecodeError, TypeError):
            try:
                message = _loads(payload)
            except (ValueError, UnicodeDecodeError) as exc:
                bad.append((i, "malformed_json", f"payload is not UTF-8 JSON: {str(exc)[:200]}"))
                continue
        if message.__class__ is not dict:
            bad.append((i, "not_an_object", f"payload is JSON {type(message).__name__}, "
                                            "not an object"))
            continue
        keep.append(i)
        get = message.get
        value = get("at")
        ats.append(value if value.__class__ in plain else dumps(value))
        value = get("site")
        sites.append(value if value.__class__ in plain else dumps(value))
        value = get("val")
        vals.append(value if value.__class__ in plain else dumps(value))
        value = get("type")
        types.append(value if value.__class__ in plain else dumps(value))
    return keep, [_objects(ats), _objects(sites), _objects(vals), _objects(types)], bad


def _column(values: np.ndarray) -> pd.Series:
    return pd.Series(values, dtype=object, copy=False)


# The live feed's own layout, `json.dumps` of the kiosk's record: `{"at": "`, the timestamp as
# 32 plain ASCII characters (no quote, no backslash: a literal JSON string), then a tail of at
# most 40 bytes (`", "site": "5", "val": -1, "type": 1}` is 37). A payload in it is read from
# the batch's bytes: the tails are factorized as 64-bit words and each distinct tail is parsed
# once by `_parse_each` (the one-at-a-time parse), behind a probe timestamp that must come back
# as `at` (a tail that set `at` again to 32 characters would need at least 44 bytes). Every
# other payload is parsed alone.
_FEED_MIN_MESSAGES = 256      # fewer messages: one at a time is as quick
_FEED_PREFIX = b'{"at": "'
_FEED_AT_BYTES = 32
_FEED_HEAD_BYTES = len(_FEED_PREFIX) + _FEED_AT_BYTES
_FEED_TAIL_WORDS = 5
_FEED_ROW_BYTES = _FEED_HEAD_BYTES + 8 * _FEED_TAIL_WORDS
_FEED_PREFIX_WORD = np.frombuffer(_FEED_PREFIX, dtype="<u8")[0]
_FEED_PROBE = b"0" * _FEED_AT_BYTES


_QUOTES = np.uint64(0x2222222222222222)
_BACKSLASHES = np.uint64(0x5C5C5C5C5C5C5C5C)


def _has_byte_below(words: np.ndarray, limit: int) -> np.ndarray:
    """Whether any byte of each word is below `limit`: exact for any bytes when `limit` is 1
    (the standard test for a zero byte), else when every byte is below 0x80."""
    return ((words - _ONES * np.uint64(limit)) & ~words & _EIGHTIES) != 0


@dataclass
class _FeedRows:
    """The payloads of a batch in the feed's layout: their indices and their four fields."""

    rows: np.ndarray
    columns: list[np.ndarray]  # at, site, val, type as object arrays


def _feed_layout(payloads: Sequence[bytes | None]) -> _FeedRows | None:
    """The payloads in the live feed's own layout, and their fields as orjson reads them."""
    try:
        data = b"".join(payloads)
    except TypeError:
        return None  # a payload that is not bytes (None: a tombstone)
    n = len(payloads)
    lengths = np.fromiter(map(len, payloads), dtype=np.int64, count=n)
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    rows = np.flatnonzero((lengths > _FEED_HEAD_BYTES) & (lengths <= _FEED_ROW_BYTES))
    if not len(rows):
        return None
    raw = _row_heads(data, starts[rows], _FEED_ROW_BYTES)
    at = raw[:, len(_FEED_PREFIX):_FEED_HEAD_BYTES]
    form = raw[:, :8].view("<u8")[:, 0] == _FEED_PREFIX_WORD
    for word in at.view("<u8").T:  # no control character, quote or backslash; ASCII only
        form &= ((word & _EIGHTIES) == 0) & ~_has_byte_below(word, 0x20)
        form &= ~_has_byte_below(word ^ _QUOTES, 1) & ~_has_byte_below(word ^ _BACKSLASHES, 1)
    # the tail's words, the bytes past its end zeroed; a NUL in it would read as that padding
    tail_bytes = lengths[rows] - _FEED_HEAD_BYTES
    words = raw[:, _FEED_HEAD_BYTES:].view("<u8")
    codes = np.zeros(len(rows), dtype=np.int64)
    for w in range(_FEED_TAIL_WORDS):
        kept = np.clip(tail_bytes - 8 * w, 0, 8)
        word = words[:, w] & _TAIL_MASK[kept]
        padded = word | ~_TAIL_MASK[kept]
        form &= ~_has_byte_below(padded, 1) | (kept == 0)
        word_codes, distinct = pd.factorize(word)
        codes, _ = pd.factorize(codes * len(distinct) + word_codes)
    rows, codes, at = rows[form], codes[form], at[form]
    if not len(rows):
        return None
    codes, distinct = pd.factorize(codes)
    good, values = _feed_tail_fields([
        payloads[i][_FEED_HEAD_BYTES:]
        for i in rows[_representatives(codes, len(distinct))].tolist()])
    if not good.all():
        keep = good[codes]
        rows, codes, at = rows[keep], codes[keep], at[keep]
        if not len(rows):
            return None
    text = np.ascontiguousarray(at).tobytes().decode("ascii")
    ats = np.empty(len(rows), dtype=object)
    ats[:] = [text[k:k + _FEED_AT_BYTES] for k in range(0, len(text), _FEED_AT_BYTES)]
    return _FeedRows(rows, [ats, *(column[codes] for column in values)])


def _feed_tail_fields(tails: list[bytes]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Which tails end a JSON object whose `at` is the timestamp before them, and the site,
    val and type each gives: `_parse_each`, the one-at-a-time parse, of each tail behind the
    probe timestamp."""
    objects, columns, _ = _parse_each([_FEED_PREFIX + _FEED_PROBE + t for t in tails],
                                      range(len(tails)))
    good = np.zeros(len(tails), dtype=bool)
    good[objects] = columns[0] == _FEED_PROBE.decode()
    values = [np.empty(len(tails), dtype=object) for _ in columns[1:]]
    for value, column in zip(values, columns[1:]):
        value[objects] = column
    return good, values


# --------------------------------------------------------------------------- rules
def _integer(value: Any) -> tuple[bool, float]:
    """(missing, integer value or NaN) for one raw value, per SPEC §2's "an integer value"."""
    if value is None:
        return True, np.nan
    if value.__class__ is str:
        text = value.strip()
        if not text:
            return True, np.nan
        if not _INTEGER_TEXT.fullmatch(text):
            return False, np.nan
        whole, _, fraction = text.partition(".")
        if fraction.strip("0"):
            return False, np.nan  # a fraction, however small ("1.0000000000000001")
        number = int(whole)
    elif value.__class__ is int:
        number = value
    elif value.__class__ is float:
        if not np.isfinite(value) or not value.is_integer():
            return False, np.nan
        number = int(value)
    else:
        return False, np.nan
    if abs(number) > _EXACT_FLOAT:
        return False, np.nan  # an integer, but far beyond any site, rating or request value
    return False, float(number)


def _factorized(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(codes, distinct values as objects) of a raw column; code -1 is None/NaN. A column the
    CSV parser already coded (a Categorical) is not hashed again."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        return (column.cat.codes.to_numpy(),
                np.asarray(column.cat.categories.to_numpy(), dtype=object))
    codes, uniques = pd.factorize(column, use_na_sentinel=True)
    return codes, np.asarray(uniques, dtype=object)


def _integers(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised `_integer`: parse each distinct raw value once (kiosk columns have a handful)."""
    codes, uniques = _factorized(column)
    parsed = [_integer(v) for v in uniques]
    missing_u = np.array([m for m, _ in parsed] + [True], dtype=bool)
    value_u = np.array([v for _, v in parsed] + [np.nan], dtype="float64")
    # code -1 (None/NaN) indexes the appended "missing" entry
    return missing_u[codes], value_u[codes]


def _parse_at(value: Any, zone: ZoneInfo) -> tuple[int, int, int]:
    """(state, UTC microseconds, local time-of-day microseconds) for one raw `at` value.

    state is 0 valid, 1 missing, 2 invalid. A timestamp with no offset is museum local time;
    one that does not exist there (the hour skipped when clocks go forward) is invalid, an
    ambiguous one (clocks going back) is taken as its first occurrence.
    """
    if value is None or (value.__class__ is float and value != value):
        return 1, 0, 0
    if value.__class__ is not str:
        return 2, 0, 0
    text = value.strip()
    if not text:
        return 1, 0, 0
    if not _TIMESTAMP.fullmatch(text):
        return 2, 0, 0
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return 2, 0, 0
    if moment.tzinfo is None:
        local = moment.replace(tzinfo=zone)
        if local.astimezone(UTC).astimezone(zone).replace(tzinfo=None) != moment:
            return 2, 0, 0  # does not exist in museum local time
    else:
        try:
            local = moment.astimezone(zone)
        except (OverflowError, ValueError):
            return 2, 0, 0
    utc_us = (local - _EPOCH) // _MICROSECOND
    tod_us = ((local.hour * 60 + local.minute) * 60 + local.second) * 1_000_000 + local.microsecond
    return 0, utc_us, tod_us


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class _ParsedAt:
    """`_parse_at` results kept across chunks and batches: a day of kiosk data has ~33,000
    distinct seconds however many rows it has, so every chunk of an object repeats most of
    them. Known texts are found for a whole column in one vectorised probe of a pandas Index
    (its positions are rows of `rows`); only the rest are grouped and parsed."""

    def __init__(self, zone: ZoneInfo):
        self.zone = zone
        self.keys = pd.Index([], dtype=object)
        self.rows = np.zeros((0, 3), dtype=np.int64)

    def parse(self, values: np.ndarray) -> np.ndarray:
        """(state, UTC us, local time-of-day us) for every value of a column. Values in the
        live feed's form are all distinct: they are parsed first, in one call, and neither
        grouped nor looked up nor kept; the rest go through the cache."""
        out = np.zeros((len(values), 3), dtype=np.int64)
        done = _parse_kafka_form(values, self.zone.key, out)
        if done.all():
            return out
        rest = np.flatnonzero(~done)
        out[rest] = self._parse_cached(values if len(rest) == len(values) else values[rest])
        return out

    def _parse_cached(self, values: np.ndarray) -> np.ndarray:
        out = np.empty((len(values), 3), dtype=np.int64)
        found = self.keys.get_indexer(values) if len(self.keys) else np.full(len(values), -1)
        known = found >= 0
        out[known] = self.rows[found[known]]
        unknown = np.flatnonzero(~known)
        if len(unknown):
            codes, uniques = pd.factorize(values[unknown], use_na_sentinel=False)
            uniques = np.asarray(uniques, dtype=object)
            table = _parse_ats(list(uniques), self.zone)
            texts = np.flatnonzero(np.fromiter((u.__class__ is str for u in uniques),
                                               dtype=bool, count=len(uniques)))
            self.keys = self.keys.append(pd.Index(uniques[texts], dtype=object))
            self.rows = np.concatenate([self.rows, table[texts]])
            out[unknown] = table[codes]
        return out


# Two fast paths sit in front of `_parse_at`, which is exact for every form SPEC §2 allows but
# handles one value at a time. Each parses one known form for a whole column in one vectorised
# pandas call and leaves whatever it refuses to `_parse_at`; both are checked against it by
# tests. Below its threshold a path is not worth the fixed cost of a pandas call.
#
# 1. Kiosk CSV form, `YYYY-MM-DD HH:MM:SS` museum local time, in the years pandas and zoneinfo
#    agree on without question. Used for the distinct seconds of a batch object's chunk.
_LOCAL_AT = re.compile(r"(?:19|20)[0-9]{2}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01]) "
                       r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]")
_LOCAL_AT_LENGTH = 19
_LOCAL_AT_MIN_VALUES = 64     # fewer distinct values: one at a time is as quick


def _parse_ats(values: list, zone: ZoneInfo) -> np.ndarray:
    """`_parse_at` over many values: rows of (state, UTC us, local time-of-day us).

    Values in the kiosk form are parsed in one vectorised call (an object's first chunk holds
    tens of thousands of distinct seconds); pandas' `nonexistent="NaT"` finds the hour skipped in
    spring, and `ambiguous` True (summer time) takes an autumn hour's first occurrence, as
    `_parse_at` does. Whatever that call refuses is left to `_parse_at`.
    """
    n = len(values)
    out = np.zeros((n, 3), dtype=np.int64)
    done = np.zeros(n, dtype=bool)
    match = _LOCAL_AT.fullmatch
    form = np.fromiter((v.__class__ is str and len(v) == _LOCAL_AT_LENGTH and match(v) is not None
                        for v in values), dtype=bool, count=n)
    if form.sum() >= _LOCAL_AT_MIN_VALUES:
        where = np.flatnonzero(form)
        naive = pd.to_datetime(pd.Series(np.asarray(values, dtype=object)[where], dtype=object),
                               format="%Y-%m-%d %H:%M:%S", errors="coerce")
        ok = naive.notna().to_numpy()
        naive = naive[ok].dt.as_unit("us")
        local = naive.dt.tz_localize(zone.key, ambiguous=np.ones(len(naive), dtype=bool),
                                     nonexistent="NaT")
        exists = local.notna().to_numpy()
        rows = where[ok][exists]
        out[rows, 1] = local[exists].astype("int64").to_numpy()
        out[rows, 2] = naive[exists].astype("int64").to_numpy() % 86_400_000_000
        done[rows] = True
    for i in np.flatnonzero(~done):
        out[i] = _parse_at(values[i], zone)
    return out


_AT_CACHE: dict[str, _ParsedAt] = {}
_AT_CACHE_SIZE = 200_000  # parsed texts kept per zone: several days of kiosk seconds


def _timestamps(column: pd.Series, zone: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised `_parse_at`: each distinct value is parsed once (kiosk rows share seconds)."""
    cache = _AT_CACHE.get(zone)
    if cache is None or len(cache.rows) > _AT_CACHE_SIZE:
        cache = _AT_CACHE[zone] = _ParsedAt(ZoneInfo(zone))
    if isinstance(column.dtype, pd.CategoricalDtype):  # each distinct text parsed once
        codes, texts = _factorized(column)
        rows = cache.parse(texts)[codes]
    else:
        rows = cache.parse(column.to_numpy(dtype=object))
    return rows[:, 0], rows[:, 1], rows[:, 2]


# 2. The form every live kiosk message uses: microseconds and a numeric offset. Used for a
#    consumer batch, whose timestamps are all distinct (so the per-value cache cannot help).
#    Whether a column is in this form at all is decided from its first values.
_KAFKA_AT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}[+-]\d{2}:\d{2}")
_KAFKA_AT_LENGTH = 32
_KAFKA_AT_MIN_VALUES = 256    # fewer distinct values: one at a time is as quick
_KAFKA_AT_SNIFF = 64          # values looked at to decide whether the column is in this form


# `_KAFKA_AT` as a character template: "d" an ASCII digit, "s" the offset's sign, else itself.
_KAFKA_TEMPLATE = "dddd-dd-ddTdd:dd:dd.ddddddsdd:dd"
_KAFKA_LOW = np.array([{"d": ord("0"), "s": ord("+")}.get(c, ord(c)) for c in _KAFKA_TEMPLATE],
                      dtype=np.uint32)
_KAFKA_HIGH = np.array([{"d": ord("9"), "s": ord("-")}.get(c, ord(c)) for c in _KAFKA_TEMPLATE],
                       dtype=np.uint32)
_KAFKA_SIGN = _KAFKA_TEMPLATE.index("s")


def _in_kafka_form(values: np.ndarray) -> np.ndarray:
    """Which values are texts in `_KAFKA_AT`'s form with ASCII digits, checked for the whole
    column at once on their code points instead of by a regex per value (which cost 0.3-0.4 s
    of CPU per million live messages). Stricter than `_KAFKA_AT` (whose \\d takes any Unicode
    digit): what it leaves out goes to `_parse_at`, which is exact."""
    n = len(values)
    texts = np.flatnonzero(np.fromiter(map(isinstance, values, itertools.repeat(str)),
                                       dtype=bool, count=n))  # C-level loops, no Python frames
    lengths = np.fromiter(map(len, values[texts]), dtype=np.int64, count=len(texts))
    where = texts[lengths == _KAFKA_AT_LENGTH]
    form = np.zeros(n, dtype=bool)
    codes = np.array(values[where], dtype=f"U{_KAFKA_AT_LENGTH}").view(np.uint32)
    codes = codes.reshape(len(where), _KAFKA_AT_LENGTH)
    bad = (codes < _KAFKA_LOW) | (codes > _KAFKA_HIGH)
    bad[:, _KAFKA_SIGN] |= codes[:, _KAFKA_SIGN] == ord(",")  # between "+" and "-"
    form[where] = ~bad.view(np.uint64).any(axis=1)  # a row's 32 flags as 4 words
    return form


def _parse_kafka_form(values: np.ndarray, zone: str, table: np.ndarray) -> np.ndarray:
    """Parse the values in the live feed's exact form in one vectorised call (they are all
    distinct, so the per-value cache cannot help); fill `table` rows, return which were done.
    Anything else, or anything this parse refuses, is left to `_parse_at`."""
    done = np.zeros(len(values), dtype=bool)
    match = _KAFKA_AT.fullmatch
    if len(values) < _KAFKA_AT_MIN_VALUES or not any(
            v.__class__ is str and match(v) for v in values[:_KAFKA_AT_SNIFF]):
        return done  # few values, or not the live form (kiosk CSV): the per-value path
    form = _in_kafka_form(values)
    if not form.any():
        return done
    where = np.flatnonzero(form)
    moments = pd.to_datetime(pd.Series(values[where], dtype=object),
                             format="%Y-%m-%dT%H:%M:%S.%f%z", utc=True, errors="coerce")
    ok = moments.notna().to_numpy()
    moments = moments[ok].dt.as_unit("us")
    local = moments.dt.tz_convert(zone).dt.tz_localize(None).astype("int64").to_numpy()
    rows = where[ok]
    table[rows, 1] = moments.astype("int64").to_numpy()
    table[rows, 2] = local % 86_400_000_000
    done[rows] = True
    return done


def _time_us(t: time) -> int:
    return ((t.hour * 60 + t.minute) * 60 + t.second) * 1_000_000 + t.microsecond


def validate_events(events: pd.DataFrame, master: MasterData, rules: Rules,
                    now: datetime | None = None) -> Outcome:
    """Apply SPEC §2 to every event; each gets exactly one outcome (first failing rule wins)."""
    now = now or datetime.now(UTC)
    n = len(events)
    at_state, utc_us, tod_us = _timestamps(events["at"], rules.zone)
    at_missing = at_state == 1
    at_invalid = at_state == 2
    outside = ~at_missing & ~at_invalid & ((tod_us < _time_us(rules.opening))
                                          | (tod_us > _time_us(rules.closing)))
    limit_us = (now + rules.future_tolerance - _EPOCH) // _MICROSECOND
    future = ~at_missing & ~at_invalid & (utc_us > limit_us)

    site_missing, site = _integers(events["site"])
    val_missing, val = _integers(events["val"])
    type_missing, typ = _integers(events["type"])
    known_site = np.isin(site, list(master.exhibitions)) if master.exhibitions else np.zeros(n, bool)
    is_rating = np.isin(val, list(master.ratings)) if master.ratings else np.zeros(n, bool)
    is_call = val == -1
    known_type = np.isin(typ, list(master.requests)) if master.requests else np.zeros(n, bool)

    conditions = [at_missing, at_invalid, outside, future, site_missing, ~known_site,
                  val_missing, ~(is_rating | is_call),
                  is_call & type_missing, is_call & ~known_type,
                  is_rating & ~type_missing]
    reasons = np.array(REASONS[2:] + ("",), dtype=object)
    code = np.select(conditions, np.arange(len(conditions)), default=len(conditions))
    valid = code == len(conditions)

    event_at = pd.to_datetime(utc_us, unit="us", utc=True) if n else pd.DatetimeIndex([], tz="UTC")
    positions = events["position"].to_numpy()
    kafka = "partition" in events
    partitions = events["partition"].to_numpy() if kafka else None
    site_ids = _lookup(site, master.exhibitions)

    rating_rows = valid & is_rating
    ratings = pd.DataFrame({"position": positions[rating_rows],
                            "exhibition_id": site_ids[rating_rows],
                            "rating_id": _lookup(val[rating_rows], master.ratings),
                            "event_at": event_at[rating_rows]})
    if kafka:
        ratings["partition"] = partitions[rating_rows]
    request_rows = valid & is_call
    requests = pd.DataFrame({"position": positions[request_rows],
                             "exhibition_id": site_ids[request_rows],
                             "request_id": _lookup(typ[request_rows], master.requests),
                             "event_at": event_at[request_rows],
                             "site": site[request_rows].astype("int64"),
                             "request_value": typ[request_rows].astype("int64")})
    if kafka:
        requests["partition"] = partitions[request_rows]
    rejected = _rejected(events, ~valid, reasons[code[~valid]], rules)
    return Outcome(ratings, requests, rejected)


def _rejected(events: pd.DataFrame, bad: np.ndarray, reasons: np.ndarray,
              rules: Rules) -> pd.DataFrame:
    """The rejections frame of the rows `bad`, each with its reason and human detail (built
    from plain lists: a numpy scalar formats several times slower than an int)."""
    if not bad.any():
        return empty_rejections()
    rows = np.flatnonzero(bad)
    positions = events["position"].to_numpy()[rows]
    columns: dict[str, Any] = {"position": positions}
    if "partition" in events:
        partitions = events["partition"].to_numpy()[rows]
        columns["partition"] = partitions
        columns["locator"] = [f"{p}:{o}" for p, o in zip(partitions.tolist(), positions.tolist())]
    else:
        columns["locator"] = list(map(str, positions.tolist()))
    columns["payload"] = [payload_text(p) if p.__class__ is bytes else p.replace("\x00", "\\x00")
                          for p in events["payload"].to_numpy()[rows].tolist()]
    columns["reason"] = reasons
    # taken first: of a Categorical column only the rejected rows' values become objects
    raw = [events[name].take(rows).to_numpy(dtype=object) for name in FIELDS]
    columns["detail"] = _details(reasons, zip(*raw), rules)
    return pd.DataFrame(columns)


def _lookup(values: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """Map integer values (as floats) to surrogate keys; -1 where unknown (never stored)."""
    out = np.full(len(values), -1, dtype="int64")
    for key, surrogate in mapping.items():
        out[values == key] = surrogate
    return out


def _details(reasons: np.ndarray, raw: Iterable[tuple], rules: Rules) -> list[str]:
    """Human words for each rejection: what was wrong with which value."""
    hours = f"{rules.opening.isoformat()}–{rules.closing.isoformat()} {rules.zone}"
    words = {
        "missing_at": lambda r: "at is missing or empty",
        "invalid_at": lambda r: f"at {r[0]!r} is not an ISO-8601 timestamp (or does not exist "
                                f"in {rules.zone})",
        "outside_opening_hours": lambda r: f"at {r[0]!r} is outside opening hours {hours}",
        "future_event": lambda r: f"at {r[0]!r} is more than "
                                  f"{int(rules.future_tolerance.total_seconds())} s in the future",
        "missing_site": lambda r: "site is missing or empty",
        "unknown_site": lambda r: f"site {r[1]!r} is not a known exhibition",
        "missing_val": lambda r: "val is missing or empty",
        "invalid_val": lambda r: f"val {r[2]!r} is neither -1 nor a known rating value",
        "missing_type": lambda r: "val is -1 (a call) but type is missing or empty",
        "invalid_type": lambda r: f"type {r[3]!r} is not a known request value",
        "unexpected_type": lambda r: f"val {r[2]!r} is a rating but type {r[3]!r} is set",
    }
    return [words[reason](row) for reason, row in zip(reasons, raw)]


# --------------------------------------------------------------------------- exhibitions
EXHIBITION_KEYS = ("EXHIBITION_NAME", "EXHIBITION_ID", "FLOOR", "DEPARTMENT", "START_DATE",
                   "DESCRIPTION")


# What schema.sql's columns can hold: a longer name, a bigger site or a NUL would fail the upsert
# in the database, so the parser refuses it first, naming the field (SPEC §3).
NAME_MAX_CHARS = 100       # exhibition_name, department_name, floor_name VARCHAR(100)
PUBLIC_ID_MAX_CHARS = 20   # public_id VARCHAR(20)
SITE_MAX = 32767           # site SMALLINT
EXHIBITION_TEXT_LIMITS = {"EXHIBITION_NAME": NAME_MAX_CHARS, "FLOOR": NAME_MAX_CHARS,
                          "DEPARTMENT": NAME_MAX_CHARS, "EXHIBITION_ID": PUBLIC_ID_MAX_CHARS}
_EXHIBITION_ID = re.compile(r"EXH_([0-9]+)")  # ASCII digits only, as schema.sql's CHECK


class ExhibitionError(ValueError):
    """An exhibition object that cannot become master data; reported and skipped."""


@dataclass(frozen=True)
class Exhibition:
    public_id: str
    site: int
    name: str
    floor: str
    department: str
    start_date: date
    description: str


def parse_exhibition(raw: bytes) -> Exhibition:
    """An exhibition object (SPEC §1) as a master-data record, or ExhibitionError saying why."""
    try:
        record = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ExhibitionError(f"not UTF-8 JSON: {exc}") from None
    if not isinstance(record, dict):
        raise ExhibitionError(f"JSON {type(record).__name__}, not an object")
    missing = [k for k in EXHIBITION_KEYS if not isinstance(record.get(k), str)
               or not record[k].strip()]
    if missing:
        raise ExhibitionError(f"missing or non-text {', '.join(missing)}")
    for key in EXHIBITION_KEYS:
        problem = unstorable_text(record[key].strip(), EXHIBITION_TEXT_LIMITS.get(key))
        if problem:
            raise ExhibitionError(f"{key} {problem}")
    public_id = record["EXHIBITION_ID"].strip()
    match = _EXHIBITION_ID.fullmatch(public_id)
    if not match:
        raise ExhibitionError(f"EXHIBITION_ID {public_id!r} is not like EXH_03")
    site = int(match.group(1))
    if site > SITE_MAX:
        raise ExhibitionError(f"EXHIBITION_ID {public_id!r}: site {site} is beyond the largest "
                              f"the database holds ({SITE_MAX})")
    try:
        start = datetime.strptime(record["START_DATE"].strip(), "%d/%m/%y").date()
    except ValueError:
        raise ExhibitionError(f"START_DATE {record['START_DATE']!r} is not DD/MM/YY") from None
    return Exhibition(public_id=public_id, site=site,
                      name=record["EXHIBITION_NAME"].strip(), floor=record["FLOOR"].strip(),
                      department=record["DEPARTMENT"].strip(), start_date=start,
                      description=record["DESCRIPTION"].strip())


def unstorable_text(text: str, max_chars: int | None) -> str | None:
    """Why PostgreSQL cannot store `text` in a column of `max_chars` (None: unlimited), or
    None. Said without quoting the text: it may be a megabyte long."""
    if "\x00" in text:
        return "contains a NUL character, which PostgreSQL text cannot hold"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate (a \\uD800-\\uDFFF escape), which is not a character"
    if max_chars is not None and len(text) > max_chars:
        return f"is {len(text)} characters long; the database holds at most {max_chars}"
    return None


def concat_rejections(parts: Iterable[pd.DataFrame]) -> pd.DataFrame:
    frames = [p for p in parts if len(p)]
    return pd.concat(frames, ignore_index=True) if frames else empty_rejections()


# --------------------------------------------------------------------------- kiosk objects
Chunks = Iterator[tuple[int, list[str]]]  # (number of the first line, lines), as extract reads


def header_problem(line: str) -> str | None:
    """Why an object's first line is not the kiosk header, or None when it is."""
    header = line.rstrip("\r").strip()
    if header.lower() == CSV_HEADER:
        return None
    return f"the object's first line is {header[:80]!r}, expected the header {CSV_HEADER!r}"


def split_header(chunks: Chunks) -> tuple[str | None, Chunks]:
    """Check an object's header and take it off its lines.

    Returns why the header is wrong (None when it is right) and the lines that are events.
    With a wrong header the first line stays: it may be the first event of a file that lost
    its header, and every line is kept as a rejection (see `validate_csv_chunk`).
    """
    first = next(chunks, None)
    if first is None:
        return None, chunks
    first_line, lines = first
    problem = header_problem(lines[0] if lines else "") if first_line == 1 else None
    if first_line == 1 and problem is None:
        first = (2, lines[1:])
    return problem, itertools.chain([first], chunks)


def validate_csv_chunk(first_line: int, lines: list[str], master: MasterData, rules: Rules,
                       now: datetime, header_error: str | None = None) -> Outcome:
    """A chunk of kiosk CSV lines as an Outcome: every non-blank line gets exactly one.

    Lines that are not four fields are `malformed_row`; under a wrong header no line can be
    trusted, so every one is a `bad_header` rejection.
    """
    parsed = parse_csv_lines(lines, first_line)
    if header_error:
        nothing = parsed.events.iloc[:0]
        return Outcome(nothing, nothing, reject_all(parsed, "bad_header", header_error))
    return validate_parsed(parsed, master, rules, now)


def validate_parsed(parsed: ParsedEvents, master: MasterData, rules: Rules,
                    now: datetime | None = None) -> Outcome:
    """The rules applied to parsed events; the rows that never became events (malformed CSV
    lines, payloads that are not JSON objects) join the rejections, first."""
    outcome = validate_events(parsed.events, master, rules, now)
    outcome.rejections = concat_rejections([parsed.rejections, outcome.rejections])
    return outcome


def reject_all(parsed: ParsedEvents, reason: str, detail: str) -> pd.DataFrame:
    """Every row of a chunk, readable or not, as a rejection with one reason."""
    events = parsed.events[["position", "payload"]].copy()
    events["payload"] = [p.replace("\x00", "\\x00") for p in events["payload"]]
    events.insert(1, "locator", events["position"].astype(str))
    events["reason"] = reason
    events["detail"] = detail
    return concat_rejections([events, parsed.rejections.assign(reason=reason, detail=detail)])
