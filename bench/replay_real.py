"""replay.py on the real captures: what moves when the museum adds EXH_06 and rating 5.

    .venv/bin/python bench/replay_real.py [--data ../shared/real-data]

Loads the real kiosk CSVs and exhibition files into a fresh moto bucket and the real stream
(one message a line, in arrival order) into a fresh one-partition topic, runs pipeline.py and
consumer.py, then changes the master data as docs/museum-changes.md says (an exhibition file
EXH_06 in the bucket and a batch run; schema.sql with a VALUES row for rating 5 applied again),
and runs replay.py, measured as a whole process. The real data is read where it lies, never copied into
the project.

Checks, exit 1 if any fails: before, every event has the outcome the reference classifier
(sample_data) gives it under the old master data; after, under the new; what moved is exactly
the events that were rejected then and are valid now, each at its original position; a second
replay changes nothing; `pipeline.py --force` afterwards gives the same tables. Prints the
figures and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections import Counter
from pathlib import Path

from common import (
    PROJECT_DIR,
    PYTHON,
    BenchError,
    Databases,
    child_env,
    db_env,
    measure,
)

import localstack  # noqa: E402  (common puts the project on sys.path)
import sample_data  # noqa: E402

EXH_06 = {"EXHIBITION_NAME": "Rock Pools", "EXHIBITION_ID": "EXH_06", "FLOOR": "2",
          "DEPARTMENT": "Marine Biology", "START_DATE": "01/10/24",
          "DESCRIPTION": "What the tide leaves behind."}
OUTCOMES = """
SELECT CASE s.kind WHEN 'kafka' THEN 'kafka' ELSE s.uri END, t.position, t.outcome FROM (
    SELECT source_id, position, 'rating' AS outcome FROM rating_interaction
    UNION ALL SELECT source_id, position, 'request' FROM request_interaction
    UNION ALL SELECT source_id, position, reason FROM rejected_event) t
JOIN event_source s USING (source_id)"""
CONTENT = {
    "ratings": "SELECT source_id, position, exhibition_id, rating_id, event_at "
               "FROM rating_interaction",
    "requests": "SELECT source_id, position, exhibition_id, request_id, event_at "
                "FROM request_interaction",
    "rejected": "SELECT source_id, position, locator, payload, reason, detail FROM rejected_event",
    "loads": "SELECT source_id, events_read, events_stored, events_rejected FROM s3_object_load"}
VALID = ("rating", "request")


def query(dbs: Databases, db: str, sql: str) -> list[tuple]:
    conn = dbs.connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    finally:
        conn.close()


def outcomes(dbs: Databases, db: str) -> dict[tuple[str, int], str]:
    return {(uri, position): outcome for uri, position, outcome in query(dbs, db, OUTCOMES)}


def content(dbs: Databases, db: str) -> dict[str, set]:
    return {name: set(query(dbs, db, sql)) for name, sql in CONTENT.items()}


def reference(data: Path, bucket: str, sites, ratings) -> dict[tuple[str, int], str]:
    """(uri, position) -> outcome by sample_data's independent classifier."""
    out = {}
    for path in sorted((data / "kiosk-csv").glob("*.csv")):
        lines = path.read_bytes().decode("utf-8").split("\n")
        for number, line in enumerate(lines[1:], start=2):
            if line.strip():
                counts = sample_data.expected_reasons(f"h\n{line}".encode(), sites, ratings)
                out[(f"s3://{bucket}/{path.name}", number)] = next(iter(counts))
    for offset, payload in enumerate(stream(data)):
        out[("kafka", offset)] = sample_data.classify_message(payload, sites,
                                                                           ratings)
    return out


def s3_rows(tables: dict[str, set]) -> dict[str, set]:
    """The rows of S3 sources (those with a load record): what a forced reload rebuilds."""
    objects = {row[0] for row in tables["loads"]}
    return {name: {row for row in rows if row[0] in objects} for name, rows in tables.items()}


def stream(data: Path) -> list[bytes]:
    return [line for line in (data / "kafka-stream-2024-10.jsonl").read_bytes().split(b"\n")
            if line]


def run(argv: list[str], env: dict, what: str):
    return measure([PYTHON, *argv], env=env, timeout=300).check(what)


def seed(s3, data: Path, bucket: str) -> None:
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-2"})
    for path in [*sorted((data / "kiosk-csv").glob("*.csv")),
                 *sorted((data / "exhibitions").glob("*.json"))]:
        s3.put_object(Bucket=bucket, Key=path.name, Body=path.read_bytes())


def produce(kafka, topic: str, payloads: list[bytes]) -> None:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient(kafka.client_config())  # kept alive until the topic exists
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(15)
    producer = Producer({**kafka.client_config(), "linger.ms": 5})
    for payload in payloads:
        producer.produce(topic, payload)
    if producer.flush(30):
        raise BenchError("the stream was not fully delivered")


def check(condition: bool, what: str) -> None:
    if not condition:
        raise BenchError(what)


def measure_replay(data: Path) -> dict:
    import boto3
    state = localstack.up(("postgres", "s3", "kafka"))
    s3_info, kafka = localstack.s3_settings(state["s3"]), localstack.kafka_settings(state["kafka"])
    s3 = boto3.client("s3", endpoint_url=s3_info.endpoint_url, region_name=s3_info.region,
                      aws_access_key_id=s3_info.access_key,
                      aws_secret_access_key=s3_info.secret_key)
    dbs = Databases(state["postgres"]["port"],
                    localstack.database_settings(state["postgres"]).password)
    bucket, topic = f"real-{uuid.uuid4().hex[:8]}", f"real-{uuid.uuid4().hex[:8]}"
    try:
        db = dbs.create("replay_real")
        env = child_env(**db_env(dbs.port, db, dbs.password), AWS_ENDPOINT_URL_S3=s3_info.endpoint_url,
                        AWS_ACCESS_KEY=s3_info.access_key or "x",
                        AWS_SECRET_ACCESS_KEY=s3_info.secret_key or "x",
                        BOOTSTRAP_SERVERS=kafka.bootstrap_servers)
        seed(s3, data, bucket)
        produce(kafka, topic, stream(data))
        run(["pipeline.py", "-b", bucket, "--no-progress"], env, "pipeline.py")
        run(["consumer.py", "--topic", topic, "--group", f"g-{topic}", "--stop-at-end"], env,
            "consumer.py")
        before = outcomes(dbs, db)
        check(before == reference(data, bucket, range(6), range(5)),
              "before the change, the database disagrees with the reference classifier")

        s3.put_object(Bucket=bucket, Key="lmnh_exhibition_rockpools.json",
                      Body=sample_data.exhibition_json(EXH_06))
        run(["pipeline.py", "-b", bucket, "--no-progress"], env, "pipeline.py (EXH_06)")
        schema = (PROJECT_DIR / "schema.sql").read_text()
        six = schema.replace("(4, 'Amazing')", "(4, 'Amazing'), (5, 'Outstanding')")
        check(six != schema, "schema.sql has no (4, 'Amazing') row to extend")
        conn = dbs.connect(db)
        with conn.cursor() as cur:
            cur.execute(six)
        conn.close()

        replayed = run(["replay.py"], env, "replay.py")
        after = outcomes(dbs, db)
        expected_after = reference(data, bucket, range(7), range(6))
        check(after == expected_after, "after replay, the database disagrees with the reference")
        moved = {pos: before[pos] for pos, outcome in after.items()
                 if outcome in VALID and before[pos] not in VALID}
        expected_moved = {pos for pos, outcome in expected_after.items()
                          if outcome in VALID and before[pos] not in VALID}
        check(set(moved) == expected_moved, "what moved is not what the rules now accept")
        changed = Counter((before[pos], outcome) for pos, outcome in after.items()
                          if outcome not in VALID and before[pos] != outcome)

        tables = content(dbs, db)
        again = run(["replay.py"], env, "replay.py (again)")
        check(content(dbs, db) == tables and " 0 moved" in again.stdout,
              "a second replay changed something")
        run(["pipeline.py", "-b", bucket, "--no-progress", "--force"], env, "pipeline.py --force")
        check(s3_rows(content(dbs, db)) == s3_rows(tables),
              "pipeline.py --force gave different tables for the S3 objects")
        return {"events": len(before), "moved": len(moved),
                "moved_by_kind": dict(Counter(after[p] for p in moved)),
                "moved_by_reason": dict(Counter(moved.values())),
                "moved_by_source": dict(Counter(uri.split("/")[0] for uri, _ in moved)),
                "reason_changed": {f"{a} -> {b}": n for (a, b), n in changed.items()},
                "replay_seconds": round(replayed.seconds, 2),
                "replay_peak_rss_mb": round(replayed.peak_rss_mb, 1),
                "replay_summary": replayed.stdout.strip().splitlines()}
    finally:
        dbs.drop_all()
        try:
            for obj in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
                s3.delete_object(Bucket=bucket, Key=obj["Key"])
            s3.delete_bucket(Bucket=bucket)
        except Exception:  # noqa: BLE001 - cleanup of a bucket that may not exist
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=PROJECT_DIR.parent / "shared" / "real-data",
                        help="the real captures (default: ../shared/real-data)")
    args = parser.parse_args(argv)
    if not (args.data / "kafka-stream-2024-10.jsonl").is_file():
        print(f"no real captures in {args.data} (--data DIR)", file=sys.stderr)
        return 2
    try:
        figures = measure_replay(args.data)
    except BenchError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    for line in figures["replay_summary"]:
        print(line)
    print(json.dumps({k: v for k, v in figures.items() if k != "replay_summary"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
