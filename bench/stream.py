"""Stream benchmark: consumer.py against a bare consumer, and its end-to-end latency.

    python bench/stream.py [--messages M] [--repeat K] [--latency-seconds S] [--latency-rate R]

M realistic kiosk messages (about 16% invalid) go to a new 3-partition topic on the local
broker; then, interleaved round by round (a, b, a, b, ...), each run as a whole process and
timed from spawn to exit, group join included:

  a. the limit: a bare confluent-kafka consumer with consumer.py's settings (fresh group,
     session.timeout.ms 6000, auto.offset.reset earliest, enable.partition.eof) that calls
     consume(5000, 0.5) and does nothing with the messages until every partition reports EOF
     (the local broker's high watermark is unreliable, so EOFs and a message count decide);
  b. `python consumer.py --topic T --group G --stop-at-end` into a fresh database, with its peak
     RSS; checked: exit 0, rows stored + rejected == M, stored next offsets sum to M.

Then c, latency: consumer.py runs on another new topic while messages are produced at a steady
rate (default 1,000/s for 20 s). The produce time of each message is kept by (partition,
offset) from its delivery report; a second thread polls the database every 20 ms for each
partition's next_offset in kafka_offset (committed in the same transaction as the rows) and
records when each offset first became visible. Latency = visible - produced; p50 and p99.
Alongside, alert latency: every 25th message is replaced by an emergency call stamped with the
time it is produced, the consumer POSTs each one (ALERT_WEBHOOK_URL) to a local HTTP receiver in
this process, and alert latency = received - produced; p50, p95 (target <= 1 s) and p99. The
latency run's consumer has opening hours covering the whole day, so the fresh calls are valid
whatever the time of the run.

The last line is one JSON object with the figures. Exit 1 when a check fails or a process
overruns its timeout. Databases are dropped at the end; topics stay (the broker is memory-only).
"""
from __future__ import annotations

import argparse
import bisect
import json
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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

SCRIPT = str(Path(__file__).resolve())
PARTITIONS = 3
SESSION_TIMEOUT_MS = 6000
FETCH_QUEUE_BACKOFF_MS = 10  # as consumer.py: refetch a full partition queue after 10 ms, not 1 s
ALERT_EVERY = 25  # one message in this many is a fresh emergency call in the latency run
WHOLE_DAY = {"OPENING_TIME": "00:00:00", "CLOSING_TIME": "23:59:59.999999"}


# =========================================================================== worker
def worker_limit(argv: list[str]) -> int:
    """The bare consumer, in its own process: consume everything, do nothing, stop at EOF."""
    from confluent_kafka import Consumer, KafkaError

    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--partitions", type=int, required=True)
    args = parser.parse_args(argv)
    consumer = Consumer({"bootstrap.servers": args.bootstrap, "group.id": args.group,
                         "enable.auto.commit": False, "enable.auto.offset.store": False,
                         "auto.offset.reset": "earliest", "enable.partition.eof": True,
                         "session.timeout.ms": SESSION_TIMEOUT_MS,
                         "heartbeat.interval.ms": SESSION_TIMEOUT_MS // 3,
                         "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS})
    assigned_at = []

    def on_assign(consumer, partitions) -> None:
        assigned_at.append(time.time())

    consumer.subscribe([args.topic], on_assign=on_assign)
    everything = set(range(args.partitions))
    at_end: set[int] = set()
    count = 0
    errors = []
    while at_end < everything:
        for message in consumer.consume(5000, 0.5):
            error = message.error()
            if error is None:
                count += 1
                at_end.discard(message.partition())
            elif error.code() == KafkaError._PARTITION_EOF:
                at_end.add(message.partition())
            else:
                errors.append(error.str())
    consumer.close()
    print(json.dumps({"messages": count, "errors": errors[:5],
                      "assigned_at": assigned_at[0] if assigned_at else None}))
    return 0


# =========================================================================== the benchmark
class StreamBench:
    def __init__(self, timeout: float):
        import localstack
        state = localstack.up(("postgres", "kafka"))
        self.pg_port = state["postgres"]["port"]
        self.pg_password = localstack.database_settings(state["postgres"]).password
        self.kafka = localstack.kafka_settings(state["kafka"])
        self.dbs = Databases(self.pg_port, self.pg_password)
        self.pg_cpu = ServerCpu(state["postgres"]["pid"])
        self.timeout = timeout

    def new_topic(self) -> str:
        import simulator
        topic = new_name("bench").replace("_", "-")
        simulator.ensure_topic(self.kafka, topic, PARTITIONS)
        return topic

    def produce(self, topic: str, count: int, seed: int) -> None:
        import sample_data
        import simulator
        started = time.perf_counter()
        payloads = sample_data.generate_messages(count, seed=seed)
        generated = time.perf_counter() - started
        sent = simulator.send_messages(self.kafka, topic, payloads)
        if sent != count:
            raise BenchError(f"only {sent} of {count} messages were acknowledged by the broker")
        print(f"topic {topic}: {count:,} messages in {PARTITIONS} partitions (generated in "
              f"{generated:.1f} s, produced in {time.perf_counter() - started - generated:.1f} s)",
              flush=True)

    def consumer_env(self, db: str) -> dict[str, str]:
        # the same session timeout as the limit: with the broker named, consumer.py would take
        # production's 45 s, and Tansu's group join takes about half of it (SPEC §5)
        return child_env(**db_env(self.pg_port, db, self.pg_password),
                         BOOTSTRAP_SERVERS=self.kafka.bootstrap_servers,
                         KAFKA_SESSION_TIMEOUT_MS=str(SESSION_TIMEOUT_MS))

    def _check(self, what: str, db: str, topic: str, expected: int) -> tuple[int, int]:
        stored, rejected = self.dbs.event_counts(db)
        if stored + rejected != expected:
            raise BenchError(f"{what}: {stored} stored + {rejected} rejected = "
                             f"{stored + rejected}, expected {expected}")
        offsets = self.dbs.scalar(db, "SELECT coalesce(sum(next_offset), 0) FROM kafka_offset "
                                      "WHERE topic = %s", (topic,))
        if offsets != expected:
            raise BenchError(f"{what}: stored next offsets sum to {offsets}, expected {expected}")
        return stored, rejected

    # ---- a and b
    def limit(self, topic: str, expected: int) -> Measured:
        run = measure([PYTHON, SCRIPT, "--worker", "limit", "--bootstrap",
                       self.kafka.bootstrap_servers, "--topic", topic, "--group",
                       new_name("bench-limit"), "--partitions", str(PARTITIONS)],
                      env=child_env(), timeout=self.timeout,
                      server=self.pg_cpu).check("the bare consumer")
        result = worker_result(run)
        if result["messages"] != expected:
            raise BenchError(f"the bare consumer read {result['messages']} messages, expected "
                             f"{expected}; errors: {result['errors']}")
        run.notes["assigned_at"] = result["assigned_at"]
        return run

    def consumer(self, topic: str, expected: int) -> Measured:
        db = self.dbs.create("bench_consumer")
        try:
            run = measure([PYTHON, str(PROJECT_DIR / "consumer.py"), "--topic", topic, "--group",
                           new_name("bench-consumer"), "--stop-at-end"],
                          env=self.consumer_env(db), timeout=self.timeout,
                          server=self.pg_cpu).check("consumer.py")
            run.notes["assigned_at"] = logged_assignment(run.stderr)
            self.stored, self.rejected = self._check("consumer.py", db, topic, expected)
            return run
        finally:
            self.dbs.drop(db)

    # ---- c
    def latency(self, rate: float, seconds: float, seed: int) -> dict:
        from confluent_kafka import Producer

        import sample_data

        topic = self.new_topic()
        db = self.dbs.create("bench_latency")
        count = int(rate * seconds)
        payloads = sample_data.generate_messages(count + PARTITIONS, seed=seed)
        warmup, payloads = payloads[:PARTITIONS], payloads[PARTITIONS:]
        producer = Producer({**self.kafka.client_config(), "linger.ms": 5})
        poller = OffsetPoller(self.dbs.connect(db), topic)
        receiver = AlertReceiver()
        log = tempfile.TemporaryFile()
        proc = subprocess.Popen([PYTHON, str(PROJECT_DIR / "consumer.py"), "--topic", topic,
                                 "--group", new_name("bench-latency")], cwd=PROJECT_DIR,
                                env={**self.consumer_env(db), **WHOLE_DAY,
                                     "ALERT_WEBHOOK_URL": receiver.url},
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            # Warm-up: one message per partition, so the group has joined and every partition
            # is being fetched before the clock starts.
            for partition, payload in enumerate(warmup):
                producer.produce(topic, payload, partition=partition)
            producer.flush(30)
            poller.start()
            if not poller.wait_for({p: 1 for p in range(PARTITIONS)}, 90, proc):
                raise BenchError("consumer.py did not store the warm-up messages within 90 s:\n"
                                 + _tail(log))
            sent: list[tuple[int, int, float]] = []
            failures: list[str] = []

            def delivered(produced_at: float, err, msg) -> None:
                if err is None:
                    sent.append((msg.partition(), msg.offset(), produced_at))
                else:
                    failures.append(str(err))

            started = time.perf_counter()
            for i, payload in enumerate(payloads):
                due = started + i / rate
                while (wait := due - time.perf_counter()) > 0:
                    producer.poll(min(wait, 0.005))
                if i % ALERT_EVERY == 0:
                    payload = fresh_emergency(i)
                producer.produce(topic, payload, on_delivery=partial(delivered,
                                                                    time.perf_counter()))
                producer.poll(0)
            produce_seconds = time.perf_counter() - started
            producer.flush(30)
            if failures or len(sent) != count:
                raise BenchError(f"{len(sent)} of {count} latency messages acknowledged: "
                                 f"{failures[:3]}")
            last = {}
            for partition, offset, _ in sent:
                last[partition] = max(last.get(partition, 0), offset + 1)
            if not poller.wait_for(last, 60, proc):
                raise BenchError("consumer.py did not store every latency message within 60 s "
                                 "of the last one:\n" + _tail(log))
            alerts = (count + ALERT_EVERY - 1) // ALERT_EVERY
            if not receiver.wait_for(alerts, 30):
                raise BenchError(f"the receiver got {len(receiver.arrived)} of {alerts} alerts "
                                 "within 30 s of the last message stored:\n" + _tail(log))
            poller.stop()
            proc.terminate()
            try:
                code = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise BenchError("consumer.py did not stop within 30 s of SIGTERM") from None
            if code != 0:
                raise BenchError(f"consumer.py exited with {code} on SIGTERM:\n" + _tail(log))
            self._check("consumer.py (latency)", db, topic, count + PARTITIONS)
            latencies = sorted(poller.visible_at(p, o) - t for p, o, t in sent)
            produced = {f"kafka://{topic}/{p}:{o}": t for p, o, t in sent}
            alerted = sorted(at - produced[alert] for alert, at in receiver.arrived.items())
            return {"latency_rate_per_s": round(count / produce_seconds),
                    "latency_messages": count,
                    "latency_p50_s": round(percentile(latencies, 0.50), 3),
                    "latency_p99_s": round(percentile(latencies, 0.99), 3),
                    "latency_max_s": round(latencies[-1], 3),
                    "alerts": len(alerted),
                    "alert_latency_p50_s": round(percentile(alerted, 0.50), 3),
                    "alert_latency_p95_s": round(percentile(alerted, 0.95), 3),
                    "alert_latency_p99_s": round(percentile(alerted, 0.99), 3),
                    "alert_latency_max_s": round(alerted[-1], 3)}
        finally:
            receiver.close()
            poller.stop()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
            self.dbs.drop(db)


def fresh_emergency(i: int) -> bytes:
    """An emergency call stamped now (museum time), so the consumer alerts it."""
    from zoneinfo import ZoneInfo
    return json.dumps({"at": datetime.now(ZoneInfo("Europe/London")).isoformat(),
                       "site": str(i % 6), "val": -1, "type": 1}).encode()


class AlertReceiver:
    """A webhook receiver on a free local port: alert id -> when it arrived (perf_counter)."""

    def __init__(self):
        self.arrived: dict[str, float] = {}
        arrived = self.arrived

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                arrived.setdefault(json.loads(body)["id"], time.perf_counter())
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/bench"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, count: int, seconds: float) -> bool:
        deadline = time.perf_counter() + seconds
        while len(self.arrived) < count and time.perf_counter() < deadline:
            time.sleep(0.05)
        return len(self.arrived) >= count

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def logged_assignment(log_text: str) -> float | None:
    """Wall-clock time of consumer.py's first "assigned ... partitions" log line (ms)."""
    for text in log_text.splitlines():
        if " consumer: assigned " in text:
            try:
                return datetime.strptime(text[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                return None
    return None


def after_join(run: Measured, messages: int) -> tuple[float | None, float | None]:
    """(seconds from spawn to partition assignment, msg/s from assignment to exit)."""
    assigned = run.notes.get("assigned_at")
    if not assigned or not run.started_at <= assigned < run.ended_at:
        return None, None
    return assigned - run.started_at, messages / (run.ended_at - assigned)


def floor_after_join(limit: Measured, consumer: Measured, idle: Measured,
                     cpus: int) -> float | None:
    """The shortest wall time the consumer's work on the messages allows: nothing is consumed
    before the group join (the limit's, the shorter), and the CPU that depends on the messages
    (the consumer's and PostgreSQL's, less what the same consumer spends on an empty topic)
    cannot take less than its sum over the CPUs."""
    join, _ = after_join(limit, 1)
    if join is None or consumer.server_cpu_seconds is None or idle.server_cpu_seconds is None:
        return None
    work = (consumer.cpu_seconds - idle.cpu_seconds
            + consumer.server_cpu_seconds - idle.server_cpu_seconds)
    return round(join + max(work, 0.0) / cpus, 3)


def _tail(log, lines: int = 15) -> str:
    log.seek(0)
    text = log.read().decode("utf-8", "replace").strip().splitlines()[-lines:]
    return "\n".join("    | " + x for x in text)


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of a sorted list."""
    index = min(len(ordered) - 1, max(0, int(-(-q * len(ordered) // 1)) - 1))
    return ordered[index]


class OffsetPoller:
    """Polls kafka_offset every `interval` s; remembers when each next_offset first showed."""

    def __init__(self, conn, topic: str, interval: float = 0.02):
        self.conn = conn
        self.topic = topic
        self.interval = interval
        self.seen: dict[int, tuple[list[int], list[float]]] = {}  # partition -> offsets, times
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: Exception | None = None

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(5)
        if not self.conn.closed:
            self.conn.close()

    def _run(self) -> None:
        try:
            with self.conn.cursor() as cur:
                while not self.stopping.is_set():
                    started = time.perf_counter()
                    cur.execute("SELECT partition, next_offset FROM kafka_offset "
                                "WHERE topic = %s", (self.topic,))
                    rows = cur.fetchall()
                    now = time.perf_counter()
                    with self.lock:
                        for partition, next_offset in rows:
                            offsets, times = self.seen.setdefault(partition, ([], []))
                            if not offsets or next_offset > offsets[-1]:
                                offsets.append(next_offset)
                                times.append(now)
                    self.stopping.wait(max(0.0, self.interval - (now - started)))
        except Exception as exc:  # noqa: BLE001 - reported by wait_for
            self.error = exc

    def current(self) -> dict[int, int]:
        with self.lock:
            return {p: offsets[-1] for p, (offsets, _) in self.seen.items()}

    def wait_for(self, wanted: dict[int, int], seconds: float, proc) -> bool:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            if self.error is not None:
                raise BenchError(f"polling the database failed: {self.error}")
            if proc.poll() is not None:
                raise BenchError(f"consumer.py exited early with {proc.returncode}")
            now = self.current()
            if all(now.get(p, 0) >= o for p, o in wanted.items()):
                return True
            time.sleep(0.05)
        return False

    def visible_at(self, partition: int, offset: int) -> float:
        """When the database first showed `offset` of `partition` as stored."""
        offsets, times = self.seen[partition]
        return times[bisect.bisect_right(offsets, offset)]


def best(runs: list[Measured]) -> Measured:
    return min(runs, key=lambda r: r.seconds)


def line(name: str, run: Measured, messages: int) -> str:
    join, steady = after_join(run, messages)
    extra = "" if join is None else f"  (assigned after {join:.1f} s, then {steady:,.0f} msg/s)"
    return (f"  {name:9} {run.seconds:7.2f} s  {messages / run.seconds:>11,.0f} msg/s  "
            f"cpu {run.cpu_seconds:6.2f} s + PostgreSQL {fmt_server_cpu(run)}  "
            f"peak RSS {run.peak_rss_mb:7.1f} MB{extra}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:
        return worker_limit(argv)
    parser = argparse.ArgumentParser(prog="bench/stream.py", description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000,
                        help="messages produced for the throughput runs (default 1,000,000)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds a, b, a, b, ...; each side keeps its best (default 1)")
    parser.add_argument("--latency-seconds", type=float, default=20.0,
                        help="length of the steady-rate latency run; 0 skips it (default 20)")
    parser.add_argument("--latency-rate", type=float, default=1000.0,
                        help="messages per second in the latency run (default 1000)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated messages")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds before any one measured process is killed "
                             "(default 120 + 0.3 ms per message)")
    args = parser.parse_args(argv)
    if args.messages <= 0 or args.repeat <= 0 or args.latency_rate <= 0:
        parser.error("--messages, --repeat and --latency-rate must be positive")
    timeout = args.timeout or 120 + args.messages * 0.0003

    info = machine()
    busy_before = idle_share(1.0)
    print(f"stream benchmark: {args.messages:,} messages, best of {args.repeat}, on "
          f"{info['cpus']} CPUs ({info['cpu']}), {info['mem_gib']} GiB; load average "
          f"{info['load']}, CPU busy before start {busy_before}", flush=True)
    bench = StreamBench(timeout)
    limits: list[Measured] = []
    consumers: list[Measured] = []
    latency: dict = {}
    cpu = CpuBusy()
    try:
        topic = bench.new_topic()
        bench.produce(topic, args.messages, args.seed)
        for round_no in range(1, args.repeat + 1):
            print(f"round {round_no}/{args.repeat}", flush=True)
            limits.append(bench.limit(topic, args.messages))
            print(line("limit", limits[-1], args.messages), flush=True)
            consumers.append(bench.consumer(topic, args.messages))
            print(line("consumer", consumers[-1], args.messages)
                  + f"  ({bench.stored:,} stored + {bench.rejected:,} rejected)", flush=True)
        idle = bench.consumer(bench.new_topic(), 0)
        print(f"  empty     {idle.seconds:7.2f} s  consumer.py on an empty topic: cpu "
              f"{idle.cpu_seconds:6.2f} s + PostgreSQL {fmt_server_cpu(idle)} (start-up, group "
              "join, shutdown)", flush=True)
        if args.latency_seconds > 0:
            print(f"latency: {args.latency_rate:,.0f} msg/s for {args.latency_seconds:g} s",
                  flush=True)
            latency = bench.latency(args.latency_rate, args.latency_seconds, args.seed + 1)
            print(f"  p50 {latency['latency_p50_s']:.3f} s, p99 {latency['latency_p99_s']:.3f} s, "
                  f"max {latency['latency_max_s']:.3f} s over {latency['latency_messages']:,} "
                  f"messages at {latency['latency_rate_per_s']:,} msg/s", flush=True)
            print(f"  alerts: p50 {latency['alert_latency_p50_s']:.3f} s, p95 "
                  f"{latency['alert_latency_p95_s']:.3f} s, p99 {latency['alert_latency_p99_s']:.3f}"
                  f" s, max {latency['alert_latency_max_s']:.3f} s over {latency['alerts']:,} "
                  "alerts", flush=True)
    except BenchError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; removing what the benchmark created", file=sys.stderr)
        return 130
    finally:
        bench.dbs.drop_all()

    limit, cons = best(limits), best(consumers)
    floor = floor_after_join(limit, cons, idle, info["cpus"])
    limit_rate, consumer_rate = args.messages / limit.seconds, args.messages / cons.seconds
    limit_join, limit_steady = after_join(limit, args.messages)
    consumer_join, consumer_steady = after_join(cons, args.messages)
    figures = {
        "messages": args.messages,
        "limit_msgs_per_s": round(limit_rate),
        "consumer_msgs_per_s": round(consumer_rate),
        "consumer_vs_limit": ratio(consumer_rate, limit_rate),
        "consumer_peak_rss_mb": round(max(r.peak_rss_mb for r in consumers), 1),
        "latency_p50_s": latency.get("latency_p50_s"),
        "latency_p99_s": latency.get("latency_p99_s"),
        "latency_max_s": latency.get("latency_max_s"),
        "latency_rate_per_s": latency.get("latency_rate_per_s"),
        "latency_messages": latency.get("latency_messages"),
        "alert_latency_p50_s": latency.get("alert_latency_p50_s"),
        "alert_latency_p95_s": latency.get("alert_latency_p95_s"),
        "alert_latency_p99_s": latency.get("alert_latency_p99_s"),
        "alert_latency_max_s": latency.get("alert_latency_max_s"),
        "alerts": latency.get("alerts"),
        "limit_assigned_after_s": round(limit_join, 2) if limit_join is not None else None,
        "consumer_assigned_after_s": round(consumer_join, 2) if consumer_join is not None else None,
        "limit_after_join_msgs_per_s": round(limit_steady) if limit_steady else None,
        "consumer_after_join_msgs_per_s": round(consumer_steady) if consumer_steady else None,
        "consumer_vs_limit_after_join": ratio(consumer_steady, limit_steady),
        "limit_seconds": round(limit.seconds, 3),
        "consumer_seconds": round(cons.seconds, 3),
        "consumer_cpu_seconds": round(cons.cpu_seconds, 3),
        "consumer_server_cpu_seconds": cons.server_cpu_seconds,
        "limit_cpu_seconds": round(limit.cpu_seconds, 3),
        "consumer_fixed_cpu_seconds": round(idle.cpu_seconds, 3),
        "consumer_fixed_server_cpu_seconds": idle.server_cpu_seconds,
        "consumer_cpu_floor_seconds": floor,
        "repeat": args.repeat,
        "cpus": info["cpus"],
        "cpu_busy_before": busy_before,
        "cpu_busy_during": cpu.share(),
        "load_average_end": load_average(),
    }
    print(f"best of {args.repeat}:")
    print(f"  limit     {fmt_rate(figures['limit_msgs_per_s']):>11} msg/s  (bare consume, group "
          "join included)")
    print(f"  consumer  {fmt_rate(figures['consumer_msgs_per_s']):>11} msg/s  "
          f"= {figures['consumer_vs_limit']} of the limit (target >= 0.85)")
    if consumer_steady and limit_steady:
        print(f"  after the group join: limit {limit_steady:,.0f} msg/s, consumer "
              f"{consumer_steady:,.0f} msg/s = {figures['consumer_vs_limit_after_join']} "
              "(for information; the targets are whole-process)")
    if floor:
        print(f"  CPU of the best consumer run: {cons.cpu_seconds:.2f} s its own + "
              f"{cons.server_cpu_seconds:.2f} s PostgreSQL's, of which {idle.cpu_seconds:.2f} s "
              f"+ {idle.server_cpu_seconds:.2f} s do not depend on the messages (an empty "
              f"topic): at least {floor:.2f} s after the limit's group join on {info['cpus']} "
              f"CPUs, so at most {limit.seconds / floor:.2f} of this limit without less work "
              "per message")
    print(f"  consumer peak RSS {figures['consumer_peak_rss_mb']} MB (target <= 250 MB)")
    if latency:
        print(f"  latency at {figures['latency_rate_per_s']:,} msg/s: p50 "
              f"{figures['latency_p50_s']} s, p99 {figures['latency_p99_s']} s (target p99 <= 2 s); "
              f"alerts p50 {figures['alert_latency_p50_s']} s, p95 {figures['alert_latency_p95_s']} s "
              "(target p95 <= 1 s)")
    print(f"  machine: CPU busy {figures['cpu_busy_before']} before, "
          f"{figures['cpu_busy_during']} during (all processes, share of {info['cpus']} CPUs)")
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
