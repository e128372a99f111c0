"""Replay: re-check stored rejections against the master data of now (SPEC §3.2).

    python3 replay.py [--reason CODE ...] [--source URI] [--dry-run] [-l {console,file}]

When the museum opens an exhibition or adds a button, events rejected earlier as `unknown_site`,
`invalid_val` or `invalid_type` may be valid now. This re-applies the one rule implementation
(transform.validate_events) to their stored payloads, with today's master data and opening
hours but `future_event` judged against each rejection's own `rejected_at`. An event that passes
moves to its interaction table at its original provenance (source_id, position); one that still
fails keeps its row with the reason and detail of the first rule that fails now.

Each source (an S3 object, a Kafka partition) is one transaction under the per-source lock the
batch run takes, read a page at a time, so a crash leaves a source either replayed or untouched.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd
import psycopg2

import load
import localstack
import transform
from logsetup import read_protected_environment, setup_logging
from settings import Settings, SettingsError, first_line, load_settings, positive_int, redact

log = logging.getLogger("replay")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
DEFAULT_REASONS = ("unknown_site", "invalid_val", "invalid_type")
# Reasons a re-check can decide from the stored payload alone: SPEC §2's. Not `bad_header`,
# which condemns lines for their object's header (not in the payload), nor `malformed_row`,
# which no master data can mend and whose payload may be cut at 1 MiB.
REPLAYABLE = transform.REASONS
PAGE_ROWS = 50_000


@dataclass
class SourceResult:
    """What one source's replay did."""

    examined: int = 0
    ratings: int = 0
    requests: int = 0
    moved: Counter = field(default_factory=Counter)      # old reason -> events moved
    changed: Counter = field(default_factory=Counter)    # (old, new) reason -> rows updated
    remaining: Counter = field(default_factory=Counter)  # reason now -> still rejected


@dataclass
class ReplaySummary:
    """What a replay did; printed at the end and returned to callers (tests, benchmarks)."""

    reasons: tuple[str, ...] = DEFAULT_REASONS
    sources_seen: int = 0
    sources_changed: int = 0
    examined: int = 0
    ratings_moved: int = 0
    requests_moved: int = 0
    moved: Counter = field(default_factory=Counter)
    changed: Counter = field(default_factory=Counter)
    remaining: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    dry_run: bool = False

    @property
    def events_moved(self) -> int:
        return self.ratings_moved + self.requests_moved

    def add(self, result: SourceResult) -> None:
        self.sources_seen += 1
        self.sources_changed += bool(result.ratings + result.requests
                                     or sum(result.changed.values()))
        self.examined += result.examined
        self.ratings_moved += result.ratings
        self.requests_moved += result.requests
        self.moved.update(result.moved)
        self.changed.update(result.changed)
        self.remaining.update(result.remaining)

    def lines(self) -> list[str]:
        rate = self.examined / self.seconds if self.seconds > 0 else 0.0
        still = sum(self.remaining.values())
        out = [("DRY RUN (nothing written) — " if self.dry_run else "") + "replay summary",
               f"  reasons         {', '.join(self.reasons)}",
               f"  sources         {self.sources_seen} with such rejections, "
               f"{self.sources_changed} changed",
               f"  rejections      {self.examined} re-checked = {self.events_moved} moved "
               f"({self.ratings_moved} ratings, {self.requests_moved} requests) + "
               f"{still} still rejected ({sum(self.changed.values())} with a new reason)",
               f"  time            {self.seconds:.2f} s, {rate:,.0f} rejections/s"]
        for reason, count in sorted(self.moved.items(), key=lambda kv: (-kv[1], kv[0])):
            out.append(f"    moved, was {reason:20} {count}")
        for (old, new), count in sorted(self.changed.items(), key=lambda kv: (-kv[1], kv[0])):
            out.append(f"    now {new:20} was {old:20} {count}")
        return out


class RunError(RuntimeError):
    """The replay could not be done at all; one line for the operator."""


# --------------------------------------------------------------------------- one page
def parse_page(kind: str, page: list[tuple]) -> transform.ParsedEvents:
    """Stored payloads back into fields, by the same parser their source used.

    A CSV payload is the raw line; a Kafka payload is the message text (invalid UTF-8 and NUL
    were escaped when stored, which leaves such a message as malformed as it was).
    """
    positions = [int(row[0]) for row in page]
    payloads = [row[2] for row in page]
    if kind == "kafka":
        partitions = [int(row[1].split(":", 1)[0]) for row in page]  # locator partition:offset
        return transform.parse_messages([p.encode("utf-8") for p in payloads], partitions,
                                        positions)
    parsed = transform.parse_csv_lines(payloads, 0)  # position i = the page's row i
    true_position = pd.Series(positions, dtype="int64")
    for frame in (parsed.events, parsed.rejections):
        if len(frame):
            frame["position"] = true_position.to_numpy()[frame["position"].to_numpy()]
    if len(parsed.rejections):
        parsed.rejections["locator"] = parsed.rejections["position"].astype(str)
    return parsed


def validate_page(events: pd.DataFrame, rejected_at: pd.Series, master: transform.MasterData,
                  rules: transform.Rules) -> transform.Outcome:
    """validate_events with `future_event` judged against each event's own `rejected_at`.

    Only rule 4 depends on the moment of processing. Judged against the page's earliest
    `rejected_at` (the strictest), every event that is not `future_event` gets its final
    outcome; the few that are are judged again per distinct `rejected_at`.
    """
    first = transform.validate_events(events, master, rules, rejected_at.min())
    future = first.rejections["reason"] == "future_event"
    if not future.any():
        return first
    again = events[events["position"].isin(first.rejections.loc[future, "position"])]
    parts = [transform.validate_events(group, master, rules, moment)
             for moment, group in again.groupby(rejected_at.reindex(again["position"]).to_numpy())]
    return transform.Outcome(
        pd.concat([first.ratings, *(p.ratings for p in parts)], ignore_index=True),
        pd.concat([first.requests, *(p.requests for p in parts)], ignore_index=True),
        transform.concat_rejections([first.rejections[~future], *(p.rejections for p in parts)]))


def replay_page(cur, source: tuple[int, str, str], page: list[tuple], master, rules,
                result: SourceResult) -> None:
    """Move what passes now, update what still fails, for one page of one source."""
    source_id, kind, _ = source
    old_reason = {int(row[0]): row[3] for row in page}
    rejected_at = pd.Series([row[4] for row in page], index=list(old_reason), dtype=object)
    parsed = parse_page(kind, page)
    outcome = validate_page(parsed.events, rejected_at, master, rules)
    rejections = transform.concat_rejections([parsed.rejections, outcome.rejections])
    moved = [int(p) for p in pd.concat([outcome.ratings["position"],
                                        outcome.requests["position"]])]
    result.examined += len(page)
    result.ratings += load.copy_ratings(cur, outcome.ratings, source_id)
    result.requests += load.copy_requests(cur, outcome.requests, source_id)
    if moved:
        if load.delete_rejections(cur, source_id, moved) != len(moved):
            raise RunError(f"{source[2]}: a moved event's rejection vanished mid-replay")
        load.move_load_counts(cur, source_id, len(moved))
    result.moved.update(old_reason[p] for p in moved)
    load.update_rejections(cur, source_id, rejections)
    result.remaining.update(rejections["reason"])
    result.changed.update((old_reason[int(p)], new)
                          for p, new in zip(rejections["position"], rejections["reason"])
                          if old_reason[int(p)] != new)


# --------------------------------------------------------------------------- one source
@contextmanager
def source_transaction(conn, dry_run: bool) -> Iterator:
    """The source's one transaction: committed, or in a dry run rolled back (nothing written)."""
    if not dry_run:
        with load.transaction(conn) as cur:
            yield cur
        return
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.rollback()


def replay_source(conn, source: tuple[int, str, str], reasons: list[str],
                  rules: transform.Rules, page_rows: int, dry_run: bool) -> SourceResult:
    """Replay one source's rejections, a page at a time, in one transaction.

    The lock is the batch run's per-object lock: a reload of the same S3 object (--force, a
    new ETag) waits for the replay or the replay for it, never both at once. For a Kafka
    partition it serialises replays; the consumer takes no part in it and needs none: it
    only inserts positions at or beyond the partition's stored offset, while a replay only
    touches rows already stored, below it, and never the offset row the consumer locks.
    """
    result = SourceResult()
    source_id, kind, uri = source
    with source_transaction(conn, dry_run) as cur:
        load.lock_source(cur, source_id)
        master = load.read_master_data(cur)
        after = -1
        while page := load.rejection_page(cur, source_id, reasons, after, page_rows):
            replay_page(cur, source, page, master, rules, result)
            after = int(page[-1][0])
            log.debug("%s: %d re-checked up to position %d", uri, result.examined, after)
    return result


def run(settings: Settings, reasons: list[str], source_uri: str | None = None,
        dry_run: bool = False, page_rows: int = PAGE_ROWS) -> ReplaySummary:
    """The whole replay; raises RunError / DatabaseError when it cannot be done."""
    started = time.monotonic()
    summary = ReplaySummary(reasons=tuple(reasons), dry_run=dry_run)
    rules = transform.Rules(opening=settings.opening_time, closing=settings.closing_time)
    conn = load.connect(settings.database)
    try:
        load.ensure_schema(conn, None)
        with load.transaction(conn) as cur:
            if source_uri is not None and not load.source_known(cur, source_uri):
                raise RunError(f"no event source is {source_uri!r} "
                               "(the table event_source lists them)")
            sources = load.replay_sources(cur, reasons, source_uri)
        for source in sources:
            source_started = time.monotonic()
            result = replay_source(conn, source, reasons, rules, page_rows, dry_run)
            summary.add(result)
            log.info("%s %s: %d rejections re-checked, %d moved (%d ratings, %d requests), "
                     "%d with a new reason (%.2f s)", "checked" if dry_run else "replayed",
                     source[2], result.examined, result.ratings + result.requests,
                     result.ratings, result.requests, sum(result.changed.values()),
                     time.monotonic() - source_started)
    finally:
        conn.close()
        summary.seconds = time.monotonic() - started
    return summary


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="replay.py",
        description="Re-check stored rejections against the master data and opening hours of "
                    "now; move those that pass to their interaction table at their original "
                    "position, and update the reason of those that still fail.")
    parser.add_argument("--reason", action="append", choices=REPLAYABLE, metavar="CODE",
                        help="a reason to replay; repeat for several (default: "
                             f"{' '.join(DEFAULT_REASONS)})")
    parser.add_argument("--source", default=None, metavar="URI",
                        help="only this source: s3://bucket/key, kafka://topic/partition, or "
                             "kafka://topic for all its partitions")
    parser.add_argument("--dry-run", action="store_true",
                        help="re-check everything and print the summary, but write nothing")
    parser.add_argument("-l", "--log_output", choices=["console", "file"], default="console",
                        help="where log lines go: console (stderr) or file (default: console)")
    parser.add_argument("--log-file", default=None,
                        help="log file path with -l file (default: logs/replay.log)")
    parser.add_argument("--page-rows", type=positive_int, default=PAGE_ROWS,
                        help=f"rejections read per page (default {PAGE_ROWS:,}); bounds memory")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (DEBUG)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_output, "replay", args.log_file, args.verbose)
    reasons = list(dict.fromkeys(args.reason or DEFAULT_REASONS))
    secrets: list[str] = []
    try:
        env, secrets = read_protected_environment()
        settings = localstack.resolve(load_settings(env), ("postgres",))
        summary = run(settings, reasons, args.source, args.dry_run, args.page_rows)
    except SettingsError as exc:
        log.error("configuration error: %s", redact(str(exc), secrets))
        return EXIT_CONFIG
    except (psycopg2.errors.LockNotAvailable, psycopg2.errors.QueryCanceled) as exc:
        log.error("replay failed: PostgreSQL gave up waiting (%s): another session holds a lock "
                  "this replay needs, or the server is overloaded; the source in progress was "
                  "rolled back: rerun once it is released",
                  redact(load.describe_error(exc), secrets))
        return EXIT_FAILED
    except psycopg2.Error as exc:  # after connecting: the server went away or refused a statement
        log.error("replay failed: PostgreSQL failed mid-run (%s); the source in progress was "
                  "rolled back: rerun to finish", redact(first_line(exc), secrets))
        return EXIT_FAILED
    except (RunError, load.DatabaseError, localstack.LocalStackError) as exc:
        log.error("replay failed: %s", redact(first_line(exc), secrets))
        return EXIT_FAILED
    except KeyboardInterrupt:
        log.error("interrupted: the source in progress was rolled back; rerun to finish")
        return 130
    for line in summary.lines():
        print(line)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
