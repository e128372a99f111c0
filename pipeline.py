"""Batch run: load the museum's S3 bucket into PostgreSQL (SPEC §3–§4).

    python3 pipeline.py [-b BUCKET] [-n NUM_ROWS] [-l {console,file}] [--dry-run] [--force]

Exhibitions load first, so a new exhibition file makes its site valid in the same run. Then
each kiosk object is one unit of work: its events, rejections and load record (with its ETag)
commit together, under a per-object lock, so reruns and concurrent runs load it exactly once.
"""
from __future__ import annotations

import gc

if __name__ == "__main__":
    # As a program, everything the imports below create lives until exit: collecting while it
    # is made is ~10% of start-up, so the collector waits until it is frozen (end of file).
    gc.disable()

import argparse
import functools
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg2

import extract
import load
import localstack
import transform
from logsetup import read_protected_environment, setup_logging
from settings import (
    DEFAULT_BUCKET,
    PROJECT_DIR,
    Settings,
    SettingsError,
    load_settings,
    redact,
)

log = logging.getLogger("pipeline")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
SCHEMA_FILE = PROJECT_DIR / "schema.sql"


@dataclass
class RunSummary:
    """What a run did; printed at the end and returned to callers (tests, benchmarks)."""

    objects_seen: int = 0
    objects_loaded: int = 0
    objects_skipped: int = 0
    objects_failed: list[tuple[str, str]] = field(default_factory=list)
    objects_ignored: int = 0
    exhibitions_loaded: int = 0
    exhibitions_changed: Counter = field(default_factory=Counter)
    exhibitions_failed: list[tuple[str, str]] = field(default_factory=list)
    events_read: int = 0
    ratings_stored: int = 0
    requests_stored: int = 0
    rejected: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    dry_run: bool = False

    @property
    def events_rejected(self) -> int:
        return sum(self.rejected.values())

    @property
    def events_stored(self) -> int:
        return self.ratings_stored + self.requests_stored

    def lines(self) -> list[str]:
        rate = self.events_read / self.seconds if self.seconds > 0 else 0.0
        out = [("DRY RUN (nothing written) — " if self.dry_run else "") + "run summary",
               f"  kiosk objects   {self.objects_seen} seen, {self.objects_loaded} loaded, "
               f"{self.objects_skipped} skipped (unchanged), {len(self.objects_failed)} failed; "
               f"{self.objects_ignored} other objects ignored",
               f"  exhibitions     {self.exhibitions_loaded} loaded ("
               f"{self.exhibitions_changed['added']} added, "
               f"{self.exhibitions_changed['updated']} updated), "
               f"{len(self.exhibitions_failed)} malformed and skipped",
               f"  events          {self.events_read} read = {self.events_stored} stored "
               f"({self.ratings_stored} ratings, {self.requests_stored} requests) + "
               f"{self.events_rejected} rejected",
               f"  time            {self.seconds:.2f} s, {rate:,.0f} events/s"]
        for reason, count in sorted(self.rejected.items(), key=lambda kv: (-kv[1], kv[0])):
            out.append(f"    rejected {reason:24} {count}")
        for key, why in self.exhibitions_failed:
            out.append(f"  skipped exhibition {key}: {why}")
        for key, why in self.objects_failed:
            out.append(f"  FAILED {key}: {why}")
        return out


class RunError(RuntimeError):
    """The run could not be done at all; one line for the operator."""


# --------------------------------------------------------------------------- units of work
@contextmanager
def unit_of_work(conn, dry_run: bool) -> Iterator:
    """A transaction per unit; in a dry run a savepoint inside one transaction never committed."""
    if not dry_run:
        with load.transaction(conn) as cur:
            yield cur
        return
    with conn.cursor() as cur:
        cur.execute("SAVEPOINT unit")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK TO SAVEPOINT unit")
            raise
        cur.execute("RELEASE SAVEPOINT unit")


def prepare_database(conn, local: bool) -> None:
    """Check the schema is there; on the local stack create it rather than fail."""
    missing = load.missing_tables(conn)
    if not missing:
        return
    if not local:
        raise RunError(f"the database has no {', '.join(missing)} table(s): "
                       "run `bash reset.sh schema.sql` first")
    log.info("creating the schema in the local database from %s", SCHEMA_FILE.name)
    load.apply_schema(conn, SCHEMA_FILE.read_text())


def load_exhibitions(conn, client, objects: list[extract.S3Object], summary: RunSummary,
                     dry_run: bool) -> None:
    """Upsert every well-formed exhibition object; report and skip the others."""
    for obj in objects:
        try:
            exhibition = transform.parse_exhibition(extract.read_object_bytes(client, obj))
            with unit_of_work(conn, dry_run) as cur:
                change = load.upsert_exhibition(cur, exhibition)
        except transform.ExhibitionError as exc:
            log.warning("skipped malformed exhibition object %s: %s", obj.uri, exc)
            summary.exhibitions_failed.append((obj.key, str(exc)))
            continue
        except psycopg2.IntegrityError as exc:
            why = f"conflicts with the master data: {str(exc).splitlines()[0]}"
            log.warning("skipped exhibition object %s: %s", obj.uri, why)
            summary.exhibitions_failed.append((obj.key, why))
            continue
        summary.exhibitions_loaded += 1
        summary.exhibitions_changed[change] += 1
        log.log(logging.DEBUG if change == "unchanged" else logging.INFO,
                "%s exhibition %s (site %d, %s) from %s", change, exhibition.public_id,
                exhibition.site, exhibition.name, obj.key)


@dataclass
class ObjectResult:
    read: int = 0
    ratings: int = 0
    requests: int = 0
    rejected: Counter = field(default_factory=Counter)
    complete: bool = True
    skipped: bool = False


def load_kiosk_object(conn, client, obj: extract.S3Object, rules: transform.Rules,
                      row_budget: int | None, dry_run: bool, force: bool,
                      progress=None) -> ObjectResult:
    """Load one kiosk object in one unit of work: rows, rejections and load record together."""
    result = ObjectResult()
    with unit_of_work(conn, dry_run) as cur:
        source = load.source_id(cur, "s3", obj.uri)
        load.lock_source(cur, source)
        previous = load.loaded_etag(cur, source)
        if previous and previous[1] and not force and previous[0] == obj.etag:
            result.skipped = True  # another run loaded it while we waited for the lock
            return result
        if previous:
            load.delete_source_rows(cur, source)
        master = load.read_master_data(cur)
        now = datetime.now(UTC)
        opened = extract.open_kiosk_object(client, obj)
        copier = load.BackgroundCopy()
        try:
            _load_chunks(cur, copier, opened, obj, source, master, rules, now, row_budget,
                         result, progress)
        finally:
            copier.finish()
        load.record_object_load(cur, source, opened.etag, result.complete, result.read,
                                result.ratings + result.requests,
                                sum(result.rejected.values()))
    return result


def _load_chunks(cur, copier, opened, obj, source, master, rules, now, row_budget, result,
                 progress) -> None:
    """Validate each chunk of lines and hand its COPYs to the background copier."""
    header_error = None
    for first_line, lines in opened.chunks:
        if progress is not None:
            progress.update(sum(len(x) + 1 for x in lines))
        if first_line == 1:
            header = lines[0].rstrip("\r").strip()
            if header.lower() != transform.CSV_HEADER:
                header_error = (f"the object's first line is {header[:80]!r}, expected the "
                                f"header {transform.CSV_HEADER!r}")
            else:
                lines, first_line = lines[1:], 2
        if row_budget is not None and result.read + len(lines) > row_budget:
            lines = lines[:max(row_budget - result.read, 0)]
            result.complete = False
        parsed = transform.parse_csv_lines(lines, first_line)
        if header_error:
            outcome = transform.Outcome(parsed.events.iloc[:0], parsed.events.iloc[:0],
                                        _reject_all(parsed, header_error))
        else:
            outcome = transform.validate_events(parsed.events, master, rules, now)
            outcome.rejections = transform.concat_rejections([parsed.rejections,
                                                               outcome.rejections])
        result.read += outcome.count
        result.ratings += len(outcome.ratings)
        result.requests += len(outcome.requests)
        result.rejected.update(outcome.reason_counts())
        copies = [load.prepare_ratings(outcome.ratings, source),
                  load.prepare_requests(outcome.requests, source),
                  load.prepare_rejections(outcome.rejections, obj.uri, source)]
        copier.submit(functools.partial(load.run_copies, cur, copies))
        if not result.complete:
            break


def _reject_all(parsed: transform.ParsedEvents, why: str):
    """With a wrong header no line can be trusted: every one is kept as a `bad_header` rejection."""
    events = parsed.events[["position", "payload"]].copy()
    events["payload"] = [p.replace("\x00", "\\x00") for p in events["payload"]]
    events.insert(1, "locator", events["position"].astype(str))
    events["reason"] = "bad_header"
    events["detail"] = why
    return transform.concat_rejections([events, parsed.rejections.assign(reason="bad_header",
                                                                          detail=why)])


def run(settings: Settings, bucket: str, num_rows: int | None = None, dry_run: bool = False,
        force: bool = False, local_db: bool = False, show_progress: bool = False) -> RunSummary:
    """The whole batch run; raises RunError / DatabaseError / SourceError when it cannot be done."""
    started = time.monotonic()
    summary = RunSummary(dry_run=dry_run)
    rules = transform.Rules(opening=settings.opening_time, closing=settings.closing_time)
    conn = load.connect(settings.database)
    try:
        prepare_database(conn, local_db)
        client = extract.make_s3_client(settings.s3)
        listing = extract.list_museum_objects(client, bucket)
        summary.objects_ignored = listing.ignored
        summary.objects_seen = len(listing.kiosk)
        log.info("bucket %s: %d kiosk objects, %d exhibition objects, %d others ignored",
                 bucket, len(listing.kiosk), len(listing.exhibitions), listing.ignored)
        load_exhibitions(conn, client, listing.exhibitions, summary, dry_run)
        with conn.cursor() as cur:
            done = load.loaded_objects(cur, [o.uri for o in listing.kiosk])
        if not dry_run:
            conn.commit()
        budget = num_rows
        for obj in listing.kiosk:
            if budget is not None and budget <= 0:
                break
            previous = done.get(obj.uri)
            if previous and previous[1] and previous[0] == obj.etag and not force:
                summary.objects_skipped += 1
                log.info("skipped %s: unchanged since it was loaded (ETag %s)", obj.uri, obj.etag)
                continue
            _load_one(conn, client, obj, rules, budget, dry_run, force, summary, show_progress)
            if budget is not None:
                budget = num_rows - summary.events_read
        if dry_run:
            conn.rollback()
    finally:
        conn.close()
        summary.seconds = time.monotonic() - started
    return summary


def _load_one(conn, client, obj, rules, budget, dry_run, force, summary, show_progress) -> None:
    progress = None
    if show_progress:
        from tqdm import tqdm
        progress = tqdm(total=obj.size, unit="B", unit_scale=True, desc=obj.key, leave=False)
    started = time.monotonic()
    try:
        result = load_kiosk_object(conn, client, obj, rules, budget, dry_run, force, progress)
    except extract.SourceError as exc:
        summary.objects_failed.append((obj.key, str(exc)))
        log.error("%s; nothing from it was loaded, the run goes on", exc)
        return
    finally:
        if progress is not None:
            progress.close()
    if result.skipped:
        summary.objects_skipped += 1
        log.info("skipped %s: loaded by another run meanwhile", obj.uri)
        return
    summary.objects_loaded += 1
    summary.events_read += result.read
    summary.ratings_stored += result.ratings
    summary.requests_stored += result.requests
    summary.rejected.update(result.rejected)
    seconds = time.monotonic() - started
    log.info("%s %s: %d events = %d ratings + %d requests + %d rejected (%.2f s, %s/s)%s",
             "checked" if dry_run else "loaded", obj.uri, result.read, result.ratings,
             result.requests, sum(result.rejected.values()), seconds,
             f"{result.read / seconds:,.0f}" if seconds else "-",
             "" if result.complete else " — stopped early by --num_rows")


# --------------------------------------------------------------------------- CLI
def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline.py",
        description="Load the museum's kiosk and exhibition objects from S3 into PostgreSQL. "
                    "Rejected events are stored in rejected_event with their reason; rerunning "
                    "over an unchanged bucket adds nothing.")
    parser.add_argument("-b", "--bucket", default=None,
                        help=f"S3 bucket to read (default: $BUCKET or {DEFAULT_BUCKET})")
    parser.add_argument("-n", "--num_rows", type=positive_int, default=None,
                        help="load only the first N kiosk rows of the run (objects stay marked "
                             "incomplete, so a later full run completes them)")
    parser.add_argument("-l", "--log_output", choices=["console", "file"], default="console",
                        help="where log lines go: console (stderr) or file (default: console)")
    parser.add_argument("--log-file", default=None,
                        help="log file path with -l file (default: logs/pipeline.log)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate everything and print the summary, but write nothing")
    parser.add_argument("--force", action="store_true",
                        help="reload every kiosk object even if its ETag is unchanged")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar even on a terminal")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (DEBUG)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_output, "pipeline", args.log_file, args.verbose)
    secrets: list[str] = []
    try:
        env, secrets = read_protected_environment()
        settings = load_settings(env)
        local_db = settings.database is None
        settings = localstack.resolve(settings, ("postgres", "s3"))
        bucket = args.bucket or env.get("BUCKET") or DEFAULT_BUCKET
        summary = run(settings, bucket, num_rows=args.num_rows, dry_run=args.dry_run,
                      force=args.force, local_db=local_db,
                      show_progress=sys.stderr.isatty() and not args.no_progress
                      and args.log_output == "console")
    except SettingsError as exc:
        log.error("configuration error: %s", redact(str(exc), secrets))
        return EXIT_CONFIG
    except psycopg2.Error as exc:  # after connecting: the server went away or refused a statement
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.error("run failed: PostgreSQL failed mid-run (%s); the object in progress was rolled "
                  "back: rerun to finish", redact(text, secrets))
        return EXIT_FAILED
    except (RunError, load.DatabaseError, extract.SourceError, localstack.LocalStackError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.error("run failed: %s", redact(text, secrets))
        return EXIT_FAILED
    except KeyboardInterrupt:
        log.error("interrupted: the object in progress was rolled back; rerun to finish")
        return 130
    for line in summary.lines():
        print(line)
    return EXIT_FAILED if summary.objects_failed else EXIT_OK


if __name__ == "__main__":
    # Everything imported so far lives until exit: frozen, the collector never walks it again,
    # neither during the run nor at interpreter shutdown (~0.1 s of a million-row run).
    gc.freeze()
    gc.enable()
    # The copier thread needs the GIL back after each COPY it hands to libpq; at the default
    # 5 ms switch interval it waits behind the validating thread while the server idles.
    sys.setswitchinterval(0.001)
    sys.exit(main())
