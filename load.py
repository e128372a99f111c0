"""Writing to PostgreSQL: bulk COPY of events and rejections, load records, Kafka offsets.

Every unit of work (an S3 object, a consumer batch) writes its events, its rejections and its
progress record in ONE transaction, so a crash at any instant leaves either all of it or none.
Events go in with binary COPY: no per-row SQL, and no timestamp ever formatted as text.
"""
from __future__ import annotations

import functools
import io
import logging
import operator
import queue
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from settings import DatabaseSettings, first_line
from transform import Exhibition, MasterData, Outcome, Tally

log = logging.getLogger("load")

PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01T00:00:00Z in Unix microseconds
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
COPY_TRAILER = struct.pack(">h", -1)


class DatabaseError(RuntimeError):
    """The database cannot be used (unreachable, refused, schema missing); message is one line.

    `transient` says whether waiting may fix it (a server restarting) or not (a bad password).
    """

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


# --------------------------------------------------------------------------- connections
# Nothing waits forever (SPEC §3.1). Another session's lock delays a loader by at most
# LOCK_TIMEOUT per statement (then a retried outage, or one line from the batch run), so a
# blocked process still hears SIGTERM within seconds. STATEMENT_TIMEOUT is generous: a batch's
# largest statement (one COPY chunk, the reference check) takes well under a second. A loader
# that froze inside its transaction (SIGSTOP, a hung host) gives its locks back after
# IDLE_IN_TRANSACTION_TIMEOUT.
LOCK_TIMEOUT = "5s"
STATEMENT_TIMEOUT = "5min"
IDLE_IN_TRANSACTION_TIMEOUT = "2min"
SESSION_OPTIONS = ("-c timezone=Europe/London -c work_mem=64MB "
                   f"-c lock_timeout={LOCK_TIMEOUT} -c statement_timeout={STATEMENT_TIMEOUT} "
                   f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT}")
# What libpq says, with no SQLSTATE, when a connection is refused for good.
PERMANENT_CONNECT_ERRORS = ("password authentication failed", "does not exist",
                            "no pg_hba.conf entry", "permission denied",
                            "not permitted to log in", "does not support SSL",
                            "certificate verify failed", "does not match host name",
                            "root certificate file", "rejects connection")


def connect(db: DatabaseSettings) -> psycopg2.extensions.connection:
    """A connection whose session speaks museum time, so views and psql show local times,
    and whose waits are all bounded (connect timeout and TCP keepalives: connect_kwargs).

    work_mem 64MB keeps the reference check's transition table of a whole chunk in memory
    (at the 4MB default it spills to a temporary file on every COPY).
    """
    try:
        conn = psycopg2.connect(**db.connect_kwargs(), options=SESSION_OPTIONS)
    except psycopg2.OperationalError as exc:
        raise connect_error(db, exc) from None
    return conn


def connect_error(db: DatabaseSettings, exc: BaseException) -> DatabaseError:
    """A failed connection as one line; TLS failures name the setting that decides them
    (a certificate that does not verify is not fixed by waiting, so it is not transient)."""
    first = first_line(exc)
    transient = not any(text in first for text in PERMANENT_CONNECT_ERRORS)
    return DatabaseError(f"cannot connect to PostgreSQL at {db.describe()}: "
                         f"{tls_hint(db, first)}{first}", transient)


def tls_hint(db: DatabaseSettings, libpq_message: str) -> str:
    """What a TLS failure of libpq means in the project's settings ("" for other failures)."""
    if "certificate verify failed" in libpq_message:
        return (f"server certificate does not verify against "
                f"DB_SSLROOTCERT={db.roots()}: ")
    if "does not match host name" in libpq_message:
        return f"server certificate is not for DB_HOST={db.host} (DB_SSLMODE={db.sslmode}): "
    if "root certificate file" in libpq_message:
        return f"DB_SSLMODE={db.sslmode} needs DB_SSLROOTCERT (the server's CA bundle): "
    if "no encryption" in libpq_message:
        return f"the server accepts only TLS connections (DB_SSLMODE={db.sslmode}): "
    if "does not support SSL" in libpq_message:
        return f"the server offers no TLS but DB_SSLMODE={db.sslmode} requires it: "
    return ""


# SQLSTATEs that waiting can fix (PostgreSQL manual, Appendix A): a failover to a read-only
# replica, serialization failures and deadlocks, a server shutting down or starting up, a
# lock or statement timeout, too many connections. Everything else (bad password 28P01,
# permission denied 42501, undefined table 42P01, bad data) stops a run.
TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53")
TRANSIENT_SQLSTATES = frozenset({"25006", "25P03", "55P03", "57014", "57P01", "57P02", "57P03",
                                 "57P05", "58030"})


def is_transient(exc: BaseException) -> bool:
    """True for a database error that waiting (and a new session) may fix: retry it."""
    if isinstance(exc, DatabaseError):
        return exc.transient
    if not isinstance(exc, psycopg2.Error):
        return False
    code = exc.pgcode
    if code is None:  # libpq's own: the connection broke or could not be made
        return isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError)
    return code in TRANSIENT_SQLSTATES or code[:2] in TRANSIENT_SQLSTATE_CLASSES


def describe_error(exc: BaseException) -> str:
    """One line for a database error; a timeout also names the statement that waited."""
    text = first_line(exc)
    if getattr(exc, "pgcode", None) in ("55P03", "57014") and getattr(exc, "cursor", None):
        query = exc.cursor.query
        if query:
            statement = " ".join(query.decode("utf-8", "replace").split())
            text += f" while running `{statement[:60]}{'…' if len(statement) > 60 else ''}`"
    return text


class LazyConnection:
    """A long-lived worker's connection: opened on first use, and after a failure closed
    quietly and dropped, so the next use opens a new one (the consumer, the alert sender)."""

    def __init__(self, db: DatabaseSettings):
        self.db = db
        self.conn: psycopg2.extensions.connection | None = None

    def get(self) -> psycopg2.extensions.connection:
        if self.conn is None or self.conn.closed:
            self.conn = connect(self.db)
        return self.conn

    def drop(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg2.Error:
                pass
        self.conn = None


@contextmanager
def transaction(conn) -> Iterator[psycopg2.extensions.cursor]:
    """Commit on success, roll back on any exception (like sqlite-utils' Database.atomic)."""
    try:
        with conn.cursor() as cur:
            yield cur
        conn.commit()
    except BaseException:
        if not conn.closed:
            conn.rollback()
        raise


REQUIRED_TABLES = ("exhibition", "rating", "request", "rating_interaction",
                   "request_interaction", "rejected_event", "event_source", "s3_object_load",
                   "kafka_offset")


def missing_tables(conn) -> list[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT table_name FROM information_schema.tables "
                    "WHERE table_schema = current_schema() AND table_name = ANY(%s)",
                    (list(REQUIRED_TABLES),))
        present = {r[0] for r in cur.fetchall()}
    conn.rollback()
    return [t for t in REQUIRED_TABLES if t not in present]


def apply_schema(conn, schema_sql: str) -> None:
    with transaction(conn) as cur:
        cur.execute(schema_sql)


def ensure_schema(conn, schema_file: Path | None) -> bool:
    """Check the schema is there; create it from `schema_file` when one is given (the local
    stack's database) rather than fail. Returns whether it was created."""
    missing = missing_tables(conn)
    if not missing:
        return False
    if schema_file is None:
        raise DatabaseError(f"the database has no {', '.join(missing)} table(s): "
                            "run `bash reset.sh schema.sql` first")
    log.info("creating the schema in the local database from %s", schema_file.name)
    apply_schema(conn, schema_file.read_text())
    return True


# --------------------------------------------------------------------------- master data
MASTER_SQL = """
SELECT 'exhibition', site, exhibition_id, exhibition_name FROM exhibition
UNION ALL SELECT 'rating', rating_value, rating_id, rating_description FROM rating
UNION ALL SELECT 'request', request_value, request_id, request_description FROM request
"""


def read_master_data(cur) -> MasterData:
    """The sites, ratings and requests known now: the rules take "known" from here."""
    cur.execute(MASTER_SQL)
    exhibitions, ratings, requests, names = {}, {}, {}, {}
    for kind, value, key, name in cur.fetchall():
        if kind == "exhibition":
            exhibitions[value] = key
            names[value] = name
        elif kind == "rating":
            ratings[value] = key
        else:
            requests[value] = key
    return MasterData(exhibitions, ratings, requests, names)


# An `INSERT ... ON CONFLICT` draws an identity value even when it inserts nothing, and these keys
# are SMALLINT: a run over an unchanged bucket must draw none (SPEC §3.1). So every master row
# is looked up first and inserted only when missing (WHERE NOT EXISTS); the ON CONFLICT left is
# for a concurrent inserter, the only case that still draws a value. Then the insert returns
# nothing (the row was not there when the statement began), and running it again finds it.
ENSURE_DEPARTMENT = """
WITH found AS (SELECT department_id FROM department WHERE department_name = %(name)s),
inserted AS (
    INSERT INTO department (department_name) SELECT %(name)s WHERE NOT EXISTS (SELECT FROM found)
    ON CONFLICT (department_name) DO NOTHING RETURNING department_id)
SELECT department_id FROM found UNION ALL SELECT department_id FROM inserted"""
ENSURE_FLOOR = """
WITH found AS (SELECT floor_id FROM floor WHERE floor_name = %(name)s),
inserted AS (
    INSERT INTO floor (floor_name) SELECT %(name)s WHERE NOT EXISTS (SELECT FROM found)
    ON CONFLICT (floor_name) DO NOTHING RETURNING floor_id)
SELECT floor_id FROM found UNION ALL SELECT floor_id FROM inserted"""
INSERT_EXHIBITION = """
INSERT INTO exhibition (exhibition_name, exhibition_description, department_id, floor_id,
                        exhibition_start_date, public_id, site)
SELECT %(name)s, %(description)s, %(department_id)s, %(floor_id)s, %(start_date)s,
       %(public_id)s, %(site)s
WHERE NOT EXISTS (SELECT 1 FROM exhibition WHERE public_id = %(public_id)s)
ON CONFLICT (public_id) DO NOTHING"""
UPDATE_EXHIBITION = """
UPDATE exhibition SET
    exhibition_name = %(name)s, exhibition_description = %(description)s,
    department_id = %(department_id)s, floor_id = %(floor_id)s,
    exhibition_start_date = %(start_date)s
WHERE public_id = %(public_id)s
  AND (exhibition_name, exhibition_description, department_id, floor_id, exhibition_start_date)
      IS DISTINCT FROM (%(name)s::VARCHAR, %(description)s::TEXT, %(department_id)s::SMALLINT,
                        %(floor_id)s::SMALLINT, %(start_date)s::DATE)"""


def ensured_key(cur, run_ensure: Callable[[], None], what: str) -> int:
    """The key an ENSURE_* statement finds or inserts. Run twice at most: after a concurrent
    insert it returns nothing, and the second time finds that inserter's committed row."""
    for _ in range(2):
        run_ensure()
        row = cur.fetchone()
        if row is not None:
            return row[0]
    raise DatabaseError(f"{what} vanished while being added")


def department_id(cur, name: str) -> int:
    return ensured_key(cur, lambda: cur.execute(ENSURE_DEPARTMENT, {"name": name}),
                       f"department {name!r}")


def floor_id(cur, name: str) -> int:
    return ensured_key(cur, lambda: cur.execute(ENSURE_FLOOR, {"name": name}),
                       f"floor {name!r}")


def upsert_exhibition(cur, exhibition: Exhibition) -> str:
    """Insert or update one exhibition with its department and floor.

    Returns "added", "updated" or "unchanged", so the run log says what really changed.
    """
    params = {"name": exhibition.name, "description": exhibition.description,
              "department_id": department_id(cur, exhibition.department),
              "floor_id": floor_id(cur, exhibition.floor),
              "start_date": exhibition.start_date, "public_id": exhibition.public_id,
              "site": exhibition.site}
    cur.execute(INSERT_EXHIBITION, params)
    if cur.rowcount:
        return "added"
    cur.execute(UPDATE_EXHIBITION, params)  # also after a concurrent insert: ours wins
    return "updated" if cur.rowcount else "unchanged"


# --------------------------------------------------------------------------- provenance
ENSURE_SOURCE = """
WITH found AS (SELECT source_id FROM event_source WHERE uri = %(uri)s),
inserted AS (
    INSERT INTO event_source (kind, uri) SELECT %(kind)s, %(uri)s
    WHERE NOT EXISTS (SELECT FROM found)
    ON CONFLICT (uri) DO NOTHING RETURNING source_id)
SELECT source_id FROM found UNION ALL SELECT source_id FROM inserted"""


def source_id(cur, kind: str, uri: str) -> int:
    """The source of an S3 object or Kafka partition log; a known one draws no identity value
    (an object reloaded every minute, a consumer batch ten times a second: SPEC §3.1)."""
    return ensured_key(cur, lambda: cur.execute(ENSURE_SOURCE, {"kind": kind, "uri": uri}),
                       f"source {uri}")


def lock_source(cur, source: int) -> None:
    """Serialise work on one source across processes until this transaction ends.

    Another run holds this lock while it loads the same object, which may take longer than
    LOCK_TIMEOUT: this one wait is bounded by the statement timeout instead.
    """
    cur.execute("SET LOCAL lock_timeout = 0")
    cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (0x4C4D, source))
    cur.execute("SET LOCAL lock_timeout = DEFAULT")


class LoadRecord(NamedTuple):
    """Which version of an object was loaded, and whether all of it (--num_rows stops early)."""

    etag: str
    complete: bool

    def covers(self, etag: str) -> bool:
        """True when this version of the object is already fully loaded: nothing to do."""
        return self.complete and self.etag == etag


def loaded_etag(cur, source: int) -> LoadRecord | None:
    cur.execute("SELECT etag, complete FROM s3_object_load WHERE source_id = %s", (source,))
    row = cur.fetchone()
    return LoadRecord(*row) if row else None


def loaded_objects(cur, uris: list[str]) -> dict[str, LoadRecord]:
    """The load record of every object already loaded, for skipping before any lock."""
    cur.execute("SELECT s.uri, l.etag, l.complete FROM s3_object_load l "
                "JOIN event_source s USING (source_id) WHERE s.uri = ANY(%s)", (uris,))
    return {uri: LoadRecord(etag, complete) for uri, etag, complete in cur.fetchall()}


def delete_source_rows(cur, source: int) -> int:
    """Remove what a source produced before, so a changed object replaces its rows."""
    removed = 0
    for table in ("rating_interaction", "request_interaction", "rejected_event"):
        cur.execute(sql.SQL("DELETE FROM {} WHERE source_id = %s").format(sql.Identifier(table)),
                    (source,))
        removed += cur.rowcount
    return removed


RECORD_LOAD = """
INSERT INTO s3_object_load (source_id, etag, complete, events_read, events_stored,
                            events_rejected, loaded_at)
VALUES (%s, %s, %s, %s, %s, %s, now())
ON CONFLICT (source_id) DO UPDATE SET
    etag = EXCLUDED.etag, complete = EXCLUDED.complete, events_read = EXCLUDED.events_read,
    events_stored = EXCLUDED.events_stored, events_rejected = EXCLUDED.events_rejected,
    loaded_at = EXCLUDED.loaded_at"""


def record_object_load(cur, source: int, record: LoadRecord, tally: Tally) -> None:
    cur.execute(RECORD_LOAD, (source, record.etag, record.complete, tally.read, tally.stored,
                              tally.rejected_total))


# --------------------------------------------------------------------------- COPY
_INTERACTION_ROW = np.dtype([("fields", ">i2"),
                             ("l_exh", ">i4"), ("exhibition_id", ">i2"),
                             ("l_kind", ">i4"), ("kind_id", ">i2"),
                             ("l_at", ">i4"), ("event_at", ">i8"),
                             ("l_src", ">i4"), ("source_id", ">i4"),
                             ("l_pos", ">i4"), ("position", ">i8")])


Sources = "int | np.ndarray | pd.Series"  # one source for all rows, or one per row


def interaction_copy_bytes(frame: pd.DataFrame, kind_column: str, source: Sources) -> bytes:
    """Binary COPY data for rating/request rows: one numpy record per row, no formatting."""
    rows = np.zeros(len(frame), dtype=_INTERACTION_ROW)
    rows["fields"] = 5
    rows["l_exh"], rows["l_kind"], rows["l_at"], rows["l_src"], rows["l_pos"] = 2, 2, 8, 4, 8
    rows["exhibition_id"] = frame["exhibition_id"].to_numpy()
    rows["kind_id"] = frame[kind_column].to_numpy()
    micros = frame["event_at"].dt.as_unit("us").astype("int64").to_numpy()
    rows["event_at"] = micros - PG_EPOCH_US
    rows["source_id"] = np.asarray(source)
    rows["position"] = frame["position"].to_numpy()
    return COPY_HEADER + rows.tobytes() + COPY_TRAILER


COPY_RATINGS = ("COPY rating_interaction (exhibition_id, rating_id, event_at, source_id, position)"
                " FROM STDIN WITH (FORMAT binary)")
COPY_REQUESTS = ("COPY request_interaction (exhibition_id, request_id, event_at, source_id, "
                 "position) FROM STDIN WITH (FORMAT binary)")
COPY_REJECTIONS = ("COPY rejected_event (source, locator, payload, reason, detail, source_id, "
                   "position) FROM STDIN WITH (FORMAT csv, "
                   "FORCE_NOT_NULL (source, locator, payload, reason, detail))")


COPY_STATEMENTS = frozenset({COPY_RATINGS, COPY_REQUESTS, COPY_REJECTIONS})


@dataclass(frozen=True)
class PreparedCopy:
    """One COPY statement and its data, built before the copy runs.

    Building the data is Python work that needs the GIL; running it is libpq work that does not.
    Keeping the two apart lets the background copier stream one chunk to the server without
    waiting for the GIL while the main thread validates the next.
    """

    statement: str
    data: bytes
    rows: int

    def __post_init__(self) -> None:
        if self.statement not in COPY_STATEMENTS:  # only ever one of the constants above
            raise ValueError("PreparedCopy runs only the module's COPY statements")

    def run(self, cur) -> int:
        if self.rows:
            # One read of the whole buffer: psycopg2 reads `size` bytes at a time and takes the
            # GIL for each read (8 KiB by default, hundreds of waits per chunk).
            cur.copy_expert(self.statement, io.BytesIO(self.data), size=max(len(self.data), 8192))
        return self.rows


def prepare_ratings(frame: pd.DataFrame, source: Sources) -> PreparedCopy:
    data = interaction_copy_bytes(frame, "rating_id", source) if len(frame) else b""
    return PreparedCopy(COPY_RATINGS, data, len(frame))


def prepare_requests(frame: pd.DataFrame, source: Sources) -> PreparedCopy:
    data = interaction_copy_bytes(frame, "request_id", source) if len(frame) else b""
    return PreparedCopy(COPY_REQUESTS, data, len(frame))


def prepare_rejections(frame: pd.DataFrame, source_text: str, source: Sources) -> PreparedCopy:
    """Rejections are few and carry free text, so CSV (which quotes anything) is the format.

    FORCE_NOT_NULL keeps an empty payload (an empty Kafka message) an empty string, not NULL.
    """
    if not len(frame):
        return PreparedCopy(COPY_REJECTIONS, b"", 0)
    sources = np.broadcast_to(np.asarray(source), len(frame)).astype(str).tolist()
    columns = [frame[name].tolist() for name in ("locator", "payload", "reason", "detail")]
    positions = frame["position"].to_numpy().astype(str).tolist()
    return PreparedCopy(COPY_REJECTIONS, csv_rows(source_text, [*columns, sources, positions])
                        .encode("utf-8"), len(frame))


_DOUBLE_QUOTES = operator.methodcaller("replace", '"', '""')


def csv_rows(first: str, columns: list[list[str]]) -> str:
    """CSV lines of `first` and then a value of each column, every field quoted (a bare CR or
    LF stays inside its quotes), as `csv.writer(quoting=QUOTE_ALL, lineterminator="\\n")`
    writes them; built by C-level maps and joins instead of row by row (twice as quick)."""
    if not columns or not columns[0]:
        return ""
    head = '"' + first.replace('"', '""') + '","'
    quoted = [map(_DOUBLE_QUOTES, column) for column in columns]
    return head + ('"\n' + head).join(map('","'.join, zip(*quoted))) + '"\n'


def prepare_outcome(outcome: Outcome, source_text: str,
                    sources: int | Mapping[int, int]) -> list[PreparedCopy]:
    """The three COPYs that store an Outcome: its ratings, requests and rejections.

    `sources` is the source_id of every row (an S3 object) or a partition -> source_id map
    (a consumer batch, whose frames carry each row's partition).
    """
    return list(prepared_outcome(outcome, source_text, sources))


def prepared_outcome(outcome: Outcome, source_text: str,
                     sources: int | Mapping[int, int]) -> Iterator[PreparedCopy]:
    """`prepare_outcome` one COPY at a time, each built when asked for: the ratings' COPY can
    run while the rejections' data is being built."""
    def per_row(frame: pd.DataFrame) -> Sources:
        if not isinstance(sources, Mapping):
            return sources
        return frame["partition"].map(sources) if len(frame) else 0
    yield prepare_ratings(outcome.ratings, per_row(outcome.ratings))
    yield prepare_requests(outcome.requests, per_row(outcome.requests))
    yield prepare_rejections(outcome.rejections, source_text, per_row(outcome.rejections))


def run_copies(cur, copies: list[PreparedCopy]) -> int:
    return sum(copy.run(cur) for copy in copies)


def copy_outcomes(cur, outcomes: Iterable[Outcome], source_text: str, source: int) -> Tally:
    """Store a stream of Outcomes (an object's chunks) through a background copier, so the
    server ingests one chunk while the next is validated; returns what was stored."""
    tally = Tally()
    copier = BackgroundCopy()
    try:
        for outcome in outcomes:
            tally.add_outcome(outcome)
            copier.submit(functools.partial(
                run_copies, cur, prepare_outcome(outcome, source_text, source)))
    finally:
        copier.finish()
    return tally


def copy_ratings(cur, frame: pd.DataFrame, source: Sources) -> int:
    return prepare_ratings(frame, source).run(cur)


def copy_requests(cur, frame: pd.DataFrame, source: Sources) -> int:
    return prepare_requests(frame, source).run(cur)


def copy_rejections(cur, frame: pd.DataFrame, source_text: str, source: Sources) -> int:
    return prepare_rejections(frame, source_text, source).run(cur)


class BackgroundCopy:
    """Run one cursor's COPY statements in a worker thread, in submission order.

    psycopg2 releases the GIL while PostgreSQL ingests COPY data, so the caller can validate
    the next chunk of an object while the server stores this one. At most `depth` units wait
    in the queue, which bounds memory. A failure in the worker is raised by the next
    `submit` or by `finish`; nothing is committed here: the caller's transaction decides.
    """

    def __init__(self, depth: int = 1):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="copy", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is None:
                try:
                    job()
                except BaseException as exc:  # handed to the caller's thread
                    self._error = exc

    def submit(self, job) -> None:
        self._raise()
        self._queue.put(job)

    def finish(self) -> None:
        """Wait for every submitted COPY; raise the first failure."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


# --------------------------------------------------------------------------- Kafka offsets
def kafka_source_uri(topic: str, partition: int, epoch: int = 0) -> str:
    """The source of one partition's log. A recreated topic's log is a new epoch (`@1`, `@2`):
    its offsets start from 0 again, and its rows must not collide with the old log's."""
    return f"kafka://{topic}/{partition}" + (f"@{epoch}" if epoch else "")


# `*`, read by column name: a lock wait's log line shows the statement's first 60 characters,
# which then name the table (load.describe_error).
LOCK_OFFSET = "SELECT * FROM kafka_offset WHERE topic = %s AND partition = %s FOR UPDATE"
INSERT_OFFSET = """
INSERT INTO kafka_offset (source_id, topic, partition, next_offset, topic_id)
VALUES (%s, %s, %s, 0, %s) ON CONFLICT DO NOTHING"""


def _locked_offset(cur, topic: str, partition: int, topic_id: str | None = None) -> tuple:
    """Lock a partition's offset row, creating it (offset 0) when missing; no identity value is
    drawn for a known partition. (source_id, next_offset, topic_id, epoch)."""
    cur.execute(LOCK_OFFSET, (topic, partition))
    row = cur.fetchone()
    if row is None:
        source = source_id(cur, "kafka", kafka_source_uri(topic, partition))
        cur.execute(INSERT_OFFSET, (source, topic, partition, topic_id))
        cur.execute(LOCK_OFFSET, (topic, partition))  # ours, or a concurrent consumer's
        row = cur.fetchone()
    found = dict(zip((column.name for column in cur.description), row))
    return found["source_id"], found["next_offset"], found["topic_id"], found["epoch"]


@dataclass(frozen=True)
class NewLog:
    """A partition whose stored offsets belong to a log that is gone (the topic was recreated)."""

    partition: int
    old_offset: int
    uri: str       # the new epoch's source
    why: str


START_EPOCH = """
UPDATE kafka_offset SET source_id = %s, next_offset = 0, topic_id = %s, epoch = %s,
                        updated_at = now()
WHERE source_id = %s"""


def claim_partitions(cur, topic: str, partitions: list[int], topic_id: str | None,
                     log_ends: dict[int, int] | None = None
                     ) -> tuple[dict[int, tuple[int, int]], list[NewLog]]:
    """Lock each partition's offset row for the log the broker holds now (SPEC §3.1);
    partition -> (source_id, next offset), and the partitions found to be new logs.

    A stored offset means something only for the log it was read from. When the topic's ID
    differs from the stored one (or, on a broker without IDs, the stored offset lies beyond the
    log's end, `log_ends`), the partition starts a new epoch: a new source, offset 0. The old
    log's rows and source stay as they are. Rows are locked, so two consumers racing through a
    rebalance start one epoch, not two. A stored NULL ID (a database from before IDs) adopts
    the broker's.
    """
    offsets, new_logs = {}, []
    for partition in sorted(partitions):
        source, next_offset, stored_id, epoch = _locked_offset(cur, topic, partition, topic_id)
        why = _log_replaced(stored_id, topic_id, next_offset, (log_ends or {}).get(partition))
        if why:
            uri = kafka_source_uri(topic, partition, epoch + 1)
            old_source, source = source, source_id(cur, "kafka", uri)
            cur.execute(START_EPOCH, (source, topic_id, epoch + 1, old_source))
            new_logs.append(NewLog(partition, next_offset, uri, why))
            next_offset = 0
        elif topic_id is not None and stored_id is None:
            cur.execute("UPDATE kafka_offset SET topic_id = %s WHERE source_id = %s",
                        (topic_id, source))
        offsets[partition] = (source, next_offset)
    return offsets, new_logs


STORED_LOGS = """
SELECT partition, next_offset, topic_id FROM kafka_offset WHERE topic = %s AND partition = ANY(%s)"""


def assigned_offsets(cur, topic: str, partitions: list[int], topic_id: str | None,
                     log_ends: dict[int, int] | None = None) -> tuple[dict[int, int], list[NewLog]]:
    """Next offset per partition at assignment (missing: never read), new logs started.

    Read without locks: a frozen zombie consumer may hold a partition's row in its batch
    transaction, and a rebalance must not wait for it. Only a partition that is a new log is
    claimed (locked and switched); adopting an ID into a row without one is left to the
    partition's next batch, which locks the row anyway.
    """
    cur.execute(STORED_LOGS, (topic, partitions))
    stored = {partition: (next_offset, stored_id)
              for partition, next_offset, stored_id in cur.fetchall()}
    offsets = {partition: next_offset for partition, (next_offset, _) in stored.items()}
    renew = [partition for partition, (next_offset, stored_id) in stored.items()
             if _log_replaced(stored_id, topic_id, next_offset, (log_ends or {}).get(partition))]
    if not renew:
        return offsets, []
    claimed, new_logs = claim_partitions(cur, topic, renew, topic_id, log_ends)
    offsets.update({partition: next_offset for partition, (_, next_offset) in claimed.items()})
    return offsets, new_logs


def _log_replaced(stored_id: str | None, topic_id: str | None, next_offset: int,
                  log_end: int | None) -> str | None:
    """Why the stored offset belongs to another log, or None. The log's end is trusted only
    where the broker has no topic IDs: Tansu reports it too low (SPEC §5)."""
    if topic_id is not None:
        if stored_id is not None and stored_id != topic_id:
            return f"the topic ID is now {topic_id}, was {stored_id}"
        return None
    if log_end is not None and next_offset > log_end:
        return f"the stored offset {next_offset} is beyond the log's end {log_end}"
    return None


def advance_offset(cur, source: int, next_offset: int) -> None:
    cur.execute("UPDATE kafka_offset SET next_offset = %s, updated_at = now() "
                "WHERE source_id = %s", (next_offset, source))


# --------------------------------------------------------------------------- replay (replay.py)
# Sources holding rejections with one of the reasons, optionally one source: its exact uri, or
# a prefix ending at "/" (kafka://topic names every partition and epoch of the topic).
REPLAY_SOURCES = """
SELECT s.source_id, s.kind, s.uri FROM event_source s
WHERE EXISTS (SELECT 1 FROM rejected_event r
              WHERE r.source_id = s.source_id AND r.reason = ANY(%(reasons)s))
  AND (%(uri)s::TEXT IS NULL OR s.uri = %(uri)s
       OR left(s.uri, length(%(uri)s) + 1) = %(uri)s || '/')
ORDER BY s.source_id"""
SOURCE_KNOWN = """
SELECT EXISTS (SELECT 1 FROM event_source
               WHERE uri = %(uri)s OR left(uri, length(%(uri)s) + 1) = %(uri)s || '/')"""
# One page of a source's rejections, in position order after the last page (keyset
# pagination on the primary key: each page is an index range scan, memory stays one page).
REJECTION_PAGE = """
SELECT position, locator, payload, reason, rejected_at FROM rejected_event
WHERE source_id = %s AND reason = ANY(%s) AND position > %s
ORDER BY position LIMIT %s"""
DELETE_REJECTIONS = "DELETE FROM rejected_event WHERE source_id = %s AND position = ANY(%s)"
# Only rows whose reason or detail really changes are written: a second replay writes nothing.
UPDATE_REJECTIONS = """
UPDATE rejected_event r SET reason = v.reason, detail = v.detail
FROM unnest(%s::BIGINT[], %s::TEXT[], %s::TEXT[]) AS v (position, reason, detail)
WHERE r.source_id = %s AND r.position = v.position
  AND (r.reason, r.detail) IS DISTINCT FROM (v.reason, v.detail)"""
# Moved events stay counted: stored + rejected = read (the table's CHECK holds it).
MOVE_LOAD_COUNTS = """
UPDATE s3_object_load
SET events_stored = events_stored + %s, events_rejected = events_rejected - %s
WHERE source_id = %s"""


def replay_sources(cur, reasons: list[str], uri: str | None) -> list[tuple[int, str, str]]:
    """(source_id, kind, uri) of every source with rejections to replay."""
    cur.execute(REPLAY_SOURCES, {"reasons": reasons, "uri": uri})
    return cur.fetchall()


def source_known(cur, uri: str) -> bool:
    cur.execute(SOURCE_KNOWN, {"uri": uri})
    return cur.fetchone()[0]


def rejection_page(cur, source: int, reasons: list[str], after: int, limit: int) -> list[tuple]:
    """(position, locator, payload, reason, rejected_at) rows after position `after`."""
    cur.execute(REJECTION_PAGE, (source, reasons, after, limit))
    return cur.fetchall()


def delete_rejections(cur, source: int, positions: list[int]) -> int:
    cur.execute(DELETE_REJECTIONS, (source, positions))
    return cur.rowcount


def update_rejections(cur, source: int, rejections: pd.DataFrame) -> int:
    """Set reason and detail of still-rejected events; returns how many really changed."""
    if not len(rejections):
        return 0
    cur.execute(UPDATE_REJECTIONS, ([int(p) for p in rejections["position"]],
                                    rejections["reason"].tolist(), rejections["detail"].tolist(),
                                    source))
    return cur.rowcount


def move_load_counts(cur, source: int, moved: int) -> None:
    """An S3 object's load record after `moved` of its rejections became events."""
    if moved:
        cur.execute(MOVE_LOAD_COUNTS, (moved, moved, source))
