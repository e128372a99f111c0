"""Batch run: load the museum's S3 bucket into PostgreSQL (SPEC §3–§4).

    python3 pipeline.py [-b BUCKET] [-n NUM_ROWS] [-l {console,file}] [--dry-run] [--force]

Exhibitions load first, so a new exhibition file makes its site valid in the same run. Then
each kiosk object is one unit of work (`load_kiosk_object`): its events, rejections and load
record (with its ETag) commit together, under a per-object lock, so reruns and concurrent runs
load it exactly once. Reading one object from `run` to its commit:

    run → objects_to_load → load_and_report → load_kiosk_object:
        lock the object's source, skip it if this version is loaded, delete an older version's rows
        extract.open_kiosk_object          the object's lines, streamed in chunks
        transform.split_header             the header checked and taken off
        transform.validate_csv_chunk       each chunk → ratings, requests, rejections (an Outcome)
        load.copy_outcomes                 COPY each Outcome while the next chunk is validated
        load.record_object_load            the load record, then commit
"""
from __future__ import annotations

import gc

if __name__ == "__main__":
    # As a program, everything the imports below create lives until exit: collecting while it
    # is made is a noticeable part of start-up, so the collector waits until it is frozen
    # (end of file).
    gc.disable()

import argparse
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psycopg2

import extract
import load
import localstack
import transform
from logsetup import read_protected_environment, setup_logging
from settings import (
    DEFAULT_BUCKET,
    SCHEMA_FILE,
    Settings,
    SettingsError,
    first_line,
    load_settings,
    positive_int,
    redact,
)

log = logging.getLogger("pipeline")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


@dataclass(frozen=True)
class RunOptions:
    """The operator's choices for one run, fixed when it starts."""

    bucket: str
    num_rows: int | None = None      # load only the first N kiosk rows of the run
    dry_run: bool = False            # validate everything, write nothing
    force: bool = False              # reload objects whose ETag is unchanged
    create_schema: bool = False      # the local stack's database: create the schema if missing
    show_progress: bool = False      # a progress bar per object


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
    events: transform.Tally = field(default_factory=transform.Tally)
    seconds: float = 0.0
    dry_run: bool = False

    def lines(self) -> list[str]:
        events = self.events
        rate = events.read / self.seconds if self.seconds > 0 else 0.0
        out = [("DRY RUN (nothing written) — " if self.dry_run else "") + "run summary",
               f"  kiosk objects   {self.objects_seen} seen, {self.objects_loaded} loaded, "
               f"{self.objects_skipped} skipped (unchanged), {len(self.objects_failed)} failed; "
               f"{self.objects_ignored} other objects ignored",
               f"  exhibitions     {self.exhibitions_loaded} loaded ("
               f"{self.exhibitions_changed['added']} added, "
               f"{self.exhibitions_changed['updated']} updated), "
               f"{len(self.exhibitions_failed)} malformed and skipped",
               f"  events          {events.read} read = {events.stored} stored "
               f"({events.ratings} ratings, {events.requests} requests) + "
               f"{events.rejected_total} rejected",
               f"  time            {self.seconds:.2f} s, {rate:,.0f} events/s"]
        for reason, count in sorted(events.rejected.items(), key=lambda kv: (-kv[1], kv[0])):
            out.append(f"    rejected {reason:24} {count}")
        for key, why in self.exhibitions_failed:
            out.append(f"  skipped exhibition {key}: {why}")
        for key, why in self.objects_failed:
            out.append(f"  FAILED {key}: {why}")
        return out


@dataclass
class BatchRun:
    """What every unit of work of a run shares: the connection, the bucket, the rules."""

    conn: psycopg2.extensions.connection
    client: object  # boto3 S3 client
    rules: transform.Rules
    options: RunOptions
    summary: RunSummary


# --------------------------------------------------------------------------- the run
def run(settings: Settings, options: RunOptions) -> RunSummary:
    """The whole batch run; raises DatabaseError / SourceError when it cannot be done.

    Exhibitions first, so a new exhibition file makes its site valid in the same run; then
    each kiosk object that is new or changed, in its own unit of work.
    """
    started = time.monotonic()
    summary = RunSummary(dry_run=options.dry_run)
    conn = load.connect(settings.database)
    try:
        load.ensure_schema(conn, SCHEMA_FILE if options.create_schema else None)
        client = extract.make_s3_client(settings.s3)
        listing = extract.list_museum_objects(client, options.bucket)
        summary.objects_ignored, summary.objects_seen = listing.ignored, len(listing.kiosk)
        log.info("bucket %s: %d kiosk objects, %d exhibition objects, %d others ignored",
                 options.bucket, len(listing.kiosk), len(listing.exhibitions), listing.ignored)
        batch = BatchRun(conn, client, transform.Rules(opening=settings.opening_time,
                                                       closing=settings.closing_time),
                         options, summary)
        load_exhibitions(batch, listing.exhibitions)
        for obj in objects_to_load(batch, listing.kiosk):
            load_and_report(batch, obj)
        if options.dry_run:
            conn.rollback()
    finally:
        conn.close()
        summary.seconds = time.monotonic() - started
    return summary


def load_exhibitions(batch: BatchRun, objects: list[extract.S3Object]) -> None:
    """Upsert every well-formed exhibition object; report and skip the others."""
    summary = batch.summary
    for obj in objects:
        try:
            exhibition = transform.parse_exhibition(extract.read_object_bytes(batch.client, obj))
            with unit_of_work(batch.conn, batch.options.dry_run) as cur:
                change = load.upsert_exhibition(cur, exhibition)
        except transform.ExhibitionError as exc:
            log.warning("skipped malformed exhibition object %s: %s", obj.uri, exc)
            summary.exhibitions_failed.append((obj.key, str(exc)))
            continue
        except psycopg2.IntegrityError as exc:
            why = f"conflicts with the master data: {first_line(exc)}"
            log.warning("skipped exhibition object %s: %s", obj.uri, why)
            summary.exhibitions_failed.append((obj.key, why))
            continue
        except (psycopg2.DataError, ValueError) as exc:
            # A backstop: parse_exhibition refuses what it knows the columns cannot hold; what
            # it misses (psycopg2 refuses a NUL with ValueError) is skipped the same way.
            why = f"the database cannot hold it: {first_line(exc)}"
            log.warning("skipped exhibition object %s: %s", obj.uri, why)
            summary.exhibitions_failed.append((obj.key, why))
            continue
        summary.exhibitions_loaded += 1
        summary.exhibitions_changed[change] += 1
        log.log(logging.DEBUG if change == "unchanged" else logging.INFO,
                "%s exhibition %s (site %d, %s) from %s", change, exhibition.public_id,
                exhibition.site, exhibition.name, obj.key)


def objects_to_load(batch: BatchRun, kiosk: list[extract.S3Object]) -> Iterator[extract.S3Object]:
    """The kiosk objects that are new or changed since their last load, while the row budget
    (--num_rows) lasts; unchanged ones are counted as skipped without taking any lock."""
    options, summary = batch.options, batch.summary
    with batch.conn.cursor() as cur:
        done = load.loaded_objects(cur, [o.uri for o in kiosk])
    if not options.dry_run:
        batch.conn.commit()
    for obj in kiosk:
        if options.num_rows is not None and summary.events.read >= options.num_rows:
            return
        record = done.get(obj.uri)
        if record and record.covers(obj.etag) and not options.force:
            summary.objects_skipped += 1
            log.info("skipped %s: unchanged since it was loaded (ETag %s)", obj.uri, obj.etag)
            continue
        yield obj


def load_and_report(batch: BatchRun, obj: extract.S3Object) -> None:
    """Load one kiosk object and add it to the summary; an object that cannot be read is
    reported and the run goes on."""
    summary = batch.summary
    started = time.monotonic()
    try:
        with progress_bar(batch.options.show_progress, obj) as progress:
            loaded = load_kiosk_object(batch, obj, progress)
    except extract.SourceError as exc:
        summary.objects_failed.append((obj.key, str(exc)))
        log.error("%s; nothing from it was loaded, the run goes on", exc)
        return
    if loaded is None:
        summary.objects_skipped += 1
        log.info("skipped %s: loaded by another run meanwhile", obj.uri)
        return
    record, tally = loaded
    summary.objects_loaded += 1
    summary.events.add(tally)
    seconds = time.monotonic() - started
    log.info("%s %s: %d events = %d ratings + %d requests + %d rejected (%.2f s, %s/s)%s",
             "checked" if batch.options.dry_run else "loaded", obj.uri, tally.read,
             tally.ratings, tally.requests, tally.rejected_total, seconds,
             f"{tally.read / seconds:,.0f}" if seconds else "-",
             "" if record.complete else " — stopped early by --num_rows")


def load_kiosk_object(batch: BatchRun, obj: extract.S3Object, progress=None
                      ) -> tuple[load.LoadRecord, transform.Tally] | None:
    """One kiosk object in one unit of work: its events, rejections and load record commit
    together, under a per-object lock, so reruns and concurrent runs load it exactly once.

    Returns None when another run loaded this version while we waited for the lock.
    """
    options = batch.options
    with unit_of_work(batch.conn, options.dry_run) as cur:
        source = load.source_id(cur, "s3", obj.uri)
        load.lock_source(cur, source)
        previous = load.loaded_etag(cur, source)
        if previous and previous.covers(obj.etag) and not options.force:
            return None
        if previous:
            load.delete_source_rows(cur, source)
        master = load.read_master_data(cur)
        now = datetime.now(UTC)
        opened = extract.open_kiosk_object(batch.client, obj)
        header_error, chunks = transform.split_header(report_progress(opened.chunks, progress))
        limit = RowLimit(None if options.num_rows is None
                         else options.num_rows - batch.summary.events.read)
        outcomes = (transform.validate_csv_chunk(first, lines, master, batch.rules, now,
                                                 header_error)
                    for first, lines in limit.apply(chunks))
        tally = load.copy_outcomes(cur, outcomes, obj.uri, source)
        record = load.LoadRecord(opened.etag, complete=not limit.cut)
        load.record_object_load(cur, source, record, tally)
    return record, tally


class RowLimit:
    """The first `budget` lines of an object (--num_rows); remembers whether any were cut,
    so the object's load record says it is incomplete and a later full run completes it."""

    def __init__(self, budget: int | None):
        self.left = budget
        self.cut = False

    def apply(self, chunks: transform.Chunks) -> transform.Chunks:
        for first_line_no, lines in chunks:
            if self.left is not None:
                if len(lines) > self.left:
                    lines, self.cut = lines[:self.left], True
                self.left -= len(lines)
            yield first_line_no, lines
            if self.cut:
                return


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


@contextmanager
def progress_bar(show: bool, obj: extract.S3Object) -> Iterator:
    """A tqdm bar over the object's bytes on a terminal, None otherwise."""
    if not show:
        yield None
        return
    from tqdm import tqdm
    bar = tqdm(total=obj.size, unit="B", unit_scale=True, desc=obj.key, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def report_progress(chunks: transform.Chunks, progress) -> transform.Chunks:
    for first_line_no, lines in chunks:
        if progress is not None:
            progress.update(sum(len(x) + 1 for x in lines))
        yield first_line_no, lines


# --------------------------------------------------------------------------- CLI
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
    parser.add_argument("--metrics-textfile", default=None, metavar="PATH",
                        help="after the run, write its outcome for node_exporter's textfile "
                             "collector to PATH (e.g. /var/lib/node_exporter/textfile/"
                             "lmnh_batch.prom): last run, last success, counts")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (DEBUG)")
    return parser


# --------------------------------------------------------------------------- metrics textfile
LAST_SUCCESS = "lmnh_batch_last_success_timestamp_seconds"


def previous_success(path: Path) -> float:
    """The last success recorded in an earlier textfile (0: none yet): a failed run carries
    it over, so `time() - last success` keeps growing until a run succeeds again."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return 0.0
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == LAST_SUCCESS:
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 0.0


def textfile_lines(code: int, summary: RunSummary | None, now: float, last_success: float
                   ) -> list[str]:
    """The run's outcome in Prometheus' text format (node_exporter's textfile collector)."""
    def metric(name: str, kind: str, text: str, values: dict[str, float]) -> list[str]:
        return [f"# HELP {name} {text}", f"# TYPE {name} {kind}",
                *(f"{name}{labels} {value:.17g}" for labels, value in values.items())]

    ok = code == EXIT_OK
    out = metric("lmnh_batch_last_run_timestamp_seconds", "gauge",
                 "Unix time the last pipeline.py run ended, whatever its outcome", {"": now})
    out += metric(LAST_SUCCESS, "gauge", "Unix time the last successful pipeline.py run "
                  "ended (0: none recorded)", {"": now if ok else last_success})
    out += metric("lmnh_batch_last_run_success", "gauge", "1 if the last run succeeded",
                  {"": 1 if ok else 0})
    out += metric("lmnh_batch_last_run_exit_code", "gauge", "Exit code of the last run",
                  {"": code})
    if summary is not None:
        events = summary.events
        out += metric("lmnh_batch_last_run_seconds", "gauge", "Duration of the last run",
                      {"": summary.seconds})
        out += metric("lmnh_batch_last_run_objects", "gauge", "Kiosk objects of the last run "
                      "by outcome", {f'{{outcome="{k}"}}': v for k, v in (
                          ("loaded", summary.objects_loaded), ("skipped", summary.objects_skipped),
                          ("failed", len(summary.objects_failed)))})
        out += metric("lmnh_batch_last_run_events", "gauge", "Events of the last run by "
                      "outcome", {f'{{outcome="{k}"}}': v for k, v in (
                          ("rating", events.ratings), ("request", events.requests),
                          ("rejected", events.rejected_total))})
    return out


def write_textfile(path: Path, code: int, summary: RunSummary | None) -> None:
    """Written to a temporary file beside PATH and renamed over it: node_exporter never reads
    half a file."""
    lines = textfile_lines(code, summary, time.time(), previous_success(path))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_output, "pipeline", args.log_file, args.verbose)
    done: list[RunSummary] = []
    code = run_cli(args, done)
    if args.metrics_textfile:
        try:
            write_textfile(Path(args.metrics_textfile), code, done[0] if done else None)
        except OSError as exc:
            log.error("cannot write the metrics textfile %s: %s", args.metrics_textfile,
                      exc.strerror or type(exc).__name__)
            return code or EXIT_FAILED
    return code


def run_cli(args: argparse.Namespace, done: list[RunSummary]) -> int:
    """The run as the command line asked for it; its summary is appended to `done`."""
    secrets: list[str] = []
    try:
        env, secrets = read_protected_environment()
        settings = load_settings(env)
        options = RunOptions(bucket=args.bucket or settings.bucket, num_rows=args.num_rows,
                             dry_run=args.dry_run, force=args.force,
                             create_schema=settings.database is None,
                             show_progress=sys.stderr.isatty() and not args.no_progress
                             and args.log_output == "console")
        settings = localstack.resolve(settings, ("postgres", "s3"))
        summary = run(settings, options)
        done.append(summary)
    except SettingsError as exc:
        log.error("configuration error: %s", redact(str(exc), secrets))
        return EXIT_CONFIG
    except (psycopg2.errors.LockNotAvailable, psycopg2.errors.QueryCanceled) as exc:
        log.error("run failed: PostgreSQL gave up waiting (%s): another session holds a lock "
                  "this run needs, or the server is overloaded; the object in progress was "
                  "rolled back: rerun once it is released", redact(load.describe_error(exc), secrets))
        return EXIT_FAILED
    except psycopg2.Error as exc:  # after connecting: the server went away or refused a statement
        log.error("run failed: PostgreSQL failed mid-run (%s); the object in progress was rolled "
                  "back: rerun to finish", redact(first_line(exc), secrets))
        return EXIT_FAILED
    except (load.DatabaseError, extract.SourceError, localstack.LocalStackError) as exc:
        log.error("run failed: %s", redact(first_line(exc), secrets))
        return EXIT_FAILED
    except KeyboardInterrupt:
        log.error("interrupted: the object in progress was rolled back; rerun to finish")
        return 130
    for line in summary.lines():
        print(line)
    return EXIT_FAILED if summary.objects_failed else EXIT_OK


if __name__ == "__main__":
    # Everything imported so far lives until exit: frozen, the collector never walks it again,
    # neither during the run nor at interpreter shutdown.
    gc.freeze()
    gc.enable()
    # The copier thread needs the GIL back after each COPY it hands to libpq; at the default
    # 5 ms switch interval it waits behind the validating thread while the server idles.
    sys.setswitchinterval(0.001)
    sys.exit(main())
