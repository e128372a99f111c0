"""Batch benchmark: pipeline.py against the raw limit and against the usual approach.

    python bench/batch.py [--rows N] [--repeat K] [--skip-baseline | --baseline-rounds K]
                          [--seed S] [--timeout SEC]

One generated kiosk object of N rows goes to a fresh bucket on the local S3 server; then, in
the same run and interleaved round by round (a, b, c, a, b, c, ...), each of these is run as a
whole process and timed from spawn to exit:

  a. the limit: fetch the object from S3 and COPY its bytes untouched into a bare table of four
     text columns (no parsing, no rules, no keys);
  b. `python pipeline.py -b BUCKET --no-progress` into a fresh database with schema.sql, with
     its peak RSS; checked: exit 0, rows stored + rejected == N, load record complete;
  c. the baseline most pipelines of this kind use: csv module into Python lists, row-by-row
     validation in plain Python, psycopg2 `execute_values` (page_size 1000) into the same
     schema in a fresh database; checked the same way.

Each side keeps its best time of K rounds. It prints rows/s of each, pipeline/limit,
pipeline/baseline and the pipeline's peak RSS; the last line is one JSON object with them.
Exit 1 when any check fails or a process overruns its timeout. Everything it creates (bucket,
object, databases) is removed at the end.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402 - after the path tweak, so `common` is importable
    PROJECT_DIR,
    PYTHON,
    BenchError,
    CpuBusy,
    Databases,
    Measured,
    ServerCpu,
    child_env,
    db_env,
    fmt_rate,
    fmt_server_cpu,
    idle_share,
    load_average,
    machine,
    measure,
    new_name,
    ratio,
    worker_result,
)

KEY = "lmnh_hist_data_0.csv"
SCRIPT = str(Path(__file__).resolve())


# =========================================================================== workers
# Each runs in its own process (`batch.py --worker NAME ...`) and imports only what it needs,
# so its whole-process time is comparable with pipeline.py's.

def _s3_client(endpoint: str):
    import boto3
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="local",
                        aws_secret_access_key="local", region_name="eu-west-2")


def worker_limit(args) -> dict:
    """Fetch the object and COPY its bytes, untouched, into a bare four-text-column table."""
    import psycopg2
    body = _s3_client(args.endpoint).get_object(Bucket=args.bucket, Key=args.key)["Body"]
    conn = psycopg2.connect(host="127.0.0.1", port=args.port, user="postgres", dbname=args.db)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE kiosk_raw (at TEXT, site TEXT, val TEXT, type TEXT)")
        # The response body streams straight into COPY, 1 MiB at a time (as fast as reading it
        # whole first, or faster, and without holding the object in memory).
        cur.copy_expert("COPY kiosk_raw FROM STDIN WITH (FORMAT csv, HEADER true)", body,
                        size=1 << 20)
        rows = cur.rowcount
    conn.commit()
    conn.close()
    return {"rows": rows}


def _integer(text: str) -> int | None:
    """SPEC §2's "integer value", the way a hand-written pipeline checks it."""
    try:
        number = float(text)
    except ValueError:
        return None
    if number != number or number in (float("inf"), float("-inf")) or not number.is_integer():
        return None
    return int(number)


def worker_baseline(args) -> dict:
    """The common approach: csv into lists, validate row by row, execute_values page 1000."""
    import csv
    import io
    from datetime import UTC, datetime, time, timedelta
    from zoneinfo import ZoneInfo

    import psycopg2
    from psycopg2.extras import execute_values

    london = ZoneInfo("Europe/London")
    opening, closing = time(8, 45), time(18, 15)
    uri = f"s3://{args.bucket}/{args.key}"
    response = _s3_client(args.endpoint).get_object(Bucket=args.bucket, Key=args.key)
    etag = response["ETag"].strip('"')
    text = response["Body"].read().decode("utf-8")
    rows = list(csv.reader(io.StringIO(text)))
    header, rows = rows[0], rows[1:]
    if header != ["at", "site", "val", "type"]:
        raise SystemExit(f"unexpected header {header}")

    conn = psycopg2.connect(host="127.0.0.1", port=args.port, user="postgres", dbname=args.db)
    cur = conn.cursor()
    cur.execute("SELECT site, exhibition_id FROM exhibition")
    sites = dict(cur.fetchall())
    cur.execute("SELECT rating_value, rating_id FROM rating")
    ratings_known = dict(cur.fetchall())
    cur.execute("SELECT request_value, request_id FROM request")
    requests_known = dict(cur.fetchall())
    cur.execute("INSERT INTO event_source (kind, uri) VALUES ('s3', %s) RETURNING source_id",
                (uri,))
    source = cur.fetchone()[0]
    latest = datetime.now(UTC) + timedelta(minutes=5)

    def classify(row: list[str]) -> tuple[str, object, object]:
        """("rating" | "request", exhibition_id, rating/request id) or ("reject", reason, detail)."""
        if len(row) != 4:
            return "reject", "malformed_row", f"expected 4 fields, found {len(row)}"
        at, site, val, kind = (x.strip() for x in row)
        if not at:
            return "reject", "missing_at", "no timestamp"
        try:
            local = datetime.strptime(at, "%Y-%m-%d %H:%M:%S")
        except ValueError:
            return "reject", "invalid_at", f"not a timestamp: {at!r}"
        if not opening <= local.time() <= closing:
            return "reject", "outside_opening_hours", f"{local.time()} is outside opening hours"
        moment = local.replace(tzinfo=london)
        if moment > latest:
            return "reject", "future_event", f"{moment} is in the future"
        if not site:
            return "reject", "missing_site", "no site"
        site_no = _integer(site)
        if site_no not in sites:
            return "reject", "unknown_site", f"unknown site {site!r}"
        if not val:
            return "reject", "missing_val", "no val"
        value = _integer(val)
        if value is None or (value != -1 and value not in ratings_known):
            return "reject", "invalid_val", f"invalid val {val!r}"
        if value == -1:
            if not kind:
                return "reject", "missing_type", "a call without a type"
            request = _integer(kind)
            if request not in requests_known:
                return "reject", "invalid_type", f"invalid type {kind!r}"
            return "request", moment, (sites[site_no], requests_known[request])
        if kind:
            return "reject", "unexpected_type", f"a rating with type {kind!r}"
        return "rating", moment, (sites[site_no], ratings_known[value])

    ratings, requests, rejected = [], [], []
    for line_no, row in enumerate(rows, start=2):
        if not row:
            continue
        outcome, first, second = classify(row)
        if outcome == "rating":
            ratings.append((*second, first, source, line_no))
        elif outcome == "request":
            requests.append((*second, first, source, line_no))
        else:
            rejected.append((uri, str(line_no), ",".join(row), first, second, source, line_no))

    execute_values(cur, "INSERT INTO rating_interaction (exhibition_id, rating_id, event_at, "
                        "source_id, position) VALUES %s", ratings, page_size=1000)
    execute_values(cur, "INSERT INTO request_interaction (exhibition_id, request_id, event_at, "
                        "source_id, position) VALUES %s", requests, page_size=1000)
    execute_values(cur, "INSERT INTO rejected_event (source, locator, payload, reason, detail, "
                        "source_id, position) VALUES %s", rejected, page_size=1000)
    read = len(ratings) + len(requests) + len(rejected)
    cur.execute("INSERT INTO s3_object_load (source_id, etag, complete, events_read, "
                "events_stored, events_rejected) VALUES (%s, %s, true, %s, %s, %s)",
                (source, etag, read, len(ratings) + len(requests), len(rejected)))
    conn.commit()
    conn.close()
    return {"rows": read, "stored": len(ratings) + len(requests), "rejected": len(rejected)}


WORKERS = {"limit": worker_limit, "baseline": worker_baseline}


def run_worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=WORKERS, required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True)
    args = parser.parse_args(argv)
    print(json.dumps(WORKERS[args.worker](args)))
    return 0


# =========================================================================== the benchmark
class BatchBench:
    def __init__(self, rows: int, seed: int, timeout: float):
        import localstack
        self.rows = rows
        self.seed = seed
        self.timeout = timeout
        state = localstack.up(("postgres", "s3"))
        self.pg_port = state["postgres"]["port"]
        self.pg_password = localstack.database_settings(state["postgres"]).password
        self.s3 = localstack.s3_settings(state["s3"])
        self.dbs = Databases(self.pg_port, self.pg_password)
        self.pg_cpu = ServerCpu(state["postgres"]["pid"])
        self.bucket = new_name("bench").replace("_", "-")
        self.client = None

    # ---- setup and cleanup
    def upload(self) -> None:
        import boto3

        import sample_data
        self.client = boto3.client("s3", endpoint_url=self.s3.endpoint_url,
                                   aws_access_key_id=self.s3.access_key,
                                   aws_secret_access_key=self.s3.secret_key,
                                   region_name=self.s3.region)
        started = time.perf_counter()
        body = sample_data.generate_kiosk_csv(self.rows, seed=self.seed)
        self.client.create_bucket(Bucket=self.bucket, CreateBucketConfiguration={
            "LocationConstraint": self.s3.region})
        self.client.put_object(Bucket=self.bucket, Key=KEY, Body=body, ContentType="text/csv")
        print(f"object s3://{self.bucket}/{KEY}: {self.rows:,} rows, {len(body) / 1e6:.1f} MB "
              f"(generated and uploaded in {time.perf_counter() - started:.1f} s)", flush=True)

    def cleanup(self) -> None:
        self.dbs.drop_all()
        if self.client is not None:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=KEY)
                self.client.delete_bucket(Bucket=self.bucket)
            except Exception as exc:  # noqa: BLE001 - say what was left behind, carry on
                print(f"warning: could not remove s3://{self.bucket}: {exc}", file=sys.stderr)

    # ---- the three sides
    def _worker(self, name: str, db: str) -> Measured:
        return measure([PYTHON, SCRIPT, "--worker", name, "--endpoint", self.s3.endpoint_url,
                        "--bucket", self.bucket, "--key", KEY, "--port", str(self.pg_port),
                        "--db", db], env=child_env(PGPASSWORD=self.pg_password),  # libpq reads it
                       timeout=self.timeout, server=self.pg_cpu)

    def limit(self) -> Measured:
        db = self.dbs.create("bench_limit", schema=False)
        try:
            run = self._worker("limit", db).check("the limit (S3 fetch + COPY)")
            copied = worker_result(run)["rows"]
            if copied != self.rows:
                raise BenchError(f"the limit copied {copied} rows, expected {self.rows}")
            return run
        finally:
            self.dbs.drop(db)

    def _check_conservation(self, what: str, db: str) -> tuple[int, int]:
        stored, rejected = self.dbs.event_counts(db)
        if stored + rejected != self.rows:
            raise BenchError(f"{what}: {stored} stored + {rejected} rejected = "
                             f"{stored + rejected}, expected {self.rows}")
        conn = self.dbs.connect(db)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT coalesce(sum(events_read), 0), bool_and(complete) "
                            "FROM s3_object_load")
                read, complete = cur.fetchone()
        finally:
            conn.close()
        if read != self.rows or not complete:
            raise BenchError(f"{what}: load record says {read} events read "
                             f"(complete={complete}), expected {self.rows}")
        return stored, rejected

    def pipeline(self) -> Measured:
        db = self.dbs.create("bench_pipeline")
        env = child_env(**db_env(self.pg_port, db, self.pg_password),
                        AWS_ENDPOINT_URL_S3=self.s3.endpoint_url, AWS_ACCESS_KEY=self.s3.access_key,
                        AWS_SECRET_ACCESS_KEY=self.s3.secret_key, AWS_REGION=self.s3.region)
        try:
            run = measure([PYTHON, str(PROJECT_DIR / "pipeline.py"), "-b", self.bucket,
                           "--no-progress"], env=env, timeout=self.timeout, server=self.pg_cpu)
            run.check("pipeline.py")
            self.stored, self.rejected = self._check_conservation("pipeline.py", db)
            return run
        finally:
            self.dbs.drop(db)

    def baseline(self) -> Measured:
        db = self.dbs.create("bench_baseline")
        try:
            run = self._worker("baseline", db).check("the execute_values baseline")
            self.base_stored, self.base_rejected = self._check_conservation("the baseline", db)
            return run
        finally:
            self.dbs.drop(db)


def rate(rows: int, run: Measured | None) -> float | None:
    return rows / run.seconds if run is not None else None


def best(runs: list[Measured]) -> Measured | None:
    return min(runs, key=lambda r: r.seconds) if runs else None


def line(name: str, run: Measured, rows: int) -> str:
    return (f"  {name:9} {run.seconds:7.2f} s  {rows / run.seconds:>11,.0f} rows/s  "
            f"cpu {run.cpu_seconds:6.2f} s + PostgreSQL {fmt_server_cpu(run)}  "
            f"peak RSS {run.peak_rss_mb:7.1f} MB")


def two_cpu_floor(run: Measured, cpus: int) -> float | None:
    """The shortest wall time the run's CPU seconds (its own and the server's) allow on this
    many CPUs, were both perfectly busy from start to end."""
    if run.server_cpu_seconds is None:
        return None
    return round((run.cpu_seconds + run.server_cpu_seconds) / cpus, 3)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:
        return run_worker(argv)
    parser = argparse.ArgumentParser(prog="bench/batch.py", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000,
                        help="rows in the generated kiosk object (default 1,000,000)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds a, b, c, a, b, c, ...; each side keeps its best (default 1)")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="leave out c, the execute_values baseline (slow on millions of rows)")
    parser.add_argument("--baseline-rounds", type=int, default=None,
                        help="run c in the first K rounds only (default: every round); it is "
                             "~15x slower than b, so one round is plenty for its ratio")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated object")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds before any one measured process is killed "
                             "(default 120 + 0.3 ms per row)")
    args = parser.parse_args(argv)
    if args.rows <= 0 or args.repeat <= 0:
        parser.error("--rows and --repeat must be positive")
    timeout = args.timeout or 120 + args.rows * 0.0003

    info = machine()
    busy_before = idle_share(1.0)
    print(f"batch benchmark: {args.rows:,} rows, best of {args.repeat}, on {info['cpus']} CPUs "
          f"({info['cpu']}), {info['mem_gib']} GiB; load average {info['load']}, "
          f"CPU busy before start {busy_before}", flush=True)
    bench = BatchBench(args.rows, args.seed, timeout)
    limits: list[Measured] = []
    pipelines: list[Measured] = []
    baselines: list[Measured] = []
    cpu = CpuBusy()
    try:
        bench.upload()
        for round_no in range(1, args.repeat + 1):
            print(f"round {round_no}/{args.repeat}", flush=True)
            limits.append(bench.limit())
            print(line("limit", limits[-1], args.rows), flush=True)
            pipelines.append(bench.pipeline())
            print(line("pipeline", pipelines[-1], args.rows)
                  + f"  ({bench.stored:,} stored + {bench.rejected:,} rejected)", flush=True)
            if not args.skip_baseline and (args.baseline_rounds is None
                                           or round_no <= args.baseline_rounds):
                baselines.append(bench.baseline())
                print(line("baseline", baselines[-1], args.rows)
                      + f"  ({bench.base_stored:,} stored + {bench.base_rejected:,} rejected)",
                      flush=True)
    except BenchError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; removing what the benchmark created", file=sys.stderr)
        return 130
    finally:
        bench.cleanup()

    limit, pipe, base = best(limits), best(pipelines), best(baselines)
    figures = {
        "rows": args.rows,
        "limit_rows_per_s": round(rate(args.rows, limit)),
        "pipeline_rows_per_s": round(rate(args.rows, pipe)),
        "baseline_rows_per_s": round(rate(args.rows, base)) if base else None,
        "pipeline_vs_limit": ratio(rate(args.rows, pipe), rate(args.rows, limit)),
        "pipeline_vs_baseline": ratio(rate(args.rows, pipe), rate(args.rows, base)),
        "pipeline_peak_rss_mb": round(max(r.peak_rss_mb for r in pipelines), 1),
        "limit_seconds": round(limit.seconds, 3),
        "pipeline_seconds": round(pipe.seconds, 3),
        "baseline_seconds": round(base.seconds, 3) if base else None,
        "pipeline_cpu_seconds": round(pipe.cpu_seconds, 3),
        "pipeline_server_cpu_seconds": pipe.server_cpu_seconds,
        "limit_cpu_seconds": round(limit.cpu_seconds, 3),
        "limit_server_cpu_seconds": limit.server_cpu_seconds,
        "pipeline_cpu_floor_seconds": two_cpu_floor(pipe, info["cpus"]),
        "baseline_peak_rss_mb": round(max(r.peak_rss_mb for r in baselines), 1)
        if baselines else None,
        "repeat": args.repeat,
        "cpus": info["cpus"],
        "cpu_busy_before": busy_before,
        "cpu_busy_during": cpu.share(),
        "load_average_end": load_average(),
    }
    print(f"best of {args.repeat}:")
    print(f"  limit     {fmt_rate(figures['limit_rows_per_s']):>11} rows/s  (S3 fetch + COPY "
          "into a bare table)")
    print(f"  pipeline  {fmt_rate(figures['pipeline_rows_per_s']):>11} rows/s  "
          f"= {figures['pipeline_vs_limit']} of the limit (target >= 0.5)")
    if base:
        print(f"  baseline  {fmt_rate(figures['baseline_rows_per_s']):>11} rows/s  "
              f"pipeline = {figures['pipeline_vs_baseline']}x the baseline (target >= 3)")
    floor = figures["pipeline_cpu_floor_seconds"]
    if floor:
        print(f"  CPU of the best pipeline run: {pipe.cpu_seconds:.2f} s its own + "
              f"{pipe.server_cpu_seconds:.2f} s PostgreSQL's = at least {floor:.2f} s on "
              f"{info['cpus']} CPUs, so at most {limit.seconds / floor:.2f} of this limit "
              "without less work per row")
    print(f"  pipeline peak RSS {figures['pipeline_peak_rss_mb']} MB (target <= 250 MB at "
          "every size)")
    print(f"  machine: CPU busy {figures['cpu_busy_before']} before, "
          f"{figures['cpu_busy_during']} during (all processes, share of {info['cpus']} CPUs)")
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
