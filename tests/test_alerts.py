"""Emergency alerts and metrics (SPEC §4.1): a real broker, a real database, a real HTTP receiver.

Why: the Head of Security must hear a fresh emergency call once, within a second, and never
lose one, while a months-old backlog must not page her 14,000 times; a webhook that is down must
hold alerts back without holding the stream back. The data team reads lag and silent kiosks
from the metrics. Each test checks what the receiver really got, byte for byte where it matters,
against where each message really landed in the topic.

Every message here is stamped "now", with the opening hours set to the whole day, so no test
depends on the wall clock falling in the museum's opening hours.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from zoneinfo import ZoneInfo

import psycopg2.errors
import pytest
import test_consumer
from test_consumer import group_name, log_text, produce, wait_for
from test_security import ROLE_SECRET, apply_roles_with_passwords, connect_as, refused

import alerts
import consumer
import transform
from helpers import rows, run_consumer_in_process, scalar
from settings import SettingsError, environment_secrets, load_settings

spawn = test_consumer.spawn  # the fixture: consumer.py subprocesses, killed after the test

LONDON = ZoneInfo("Europe/London")
WHOLE_DAY = {"OPENING_TIME": "00:00:00", "CLOSING_TIME": "23:59:59.999999"}
TOKEN = "XyZsecretTOKEN123"  # stands for the token Slack puts in a webhook's path
NAMES = {0: "Measureless to Man", 1: "Adaptation", 2: "The Crenshaw Collection",
         3: "Cetacean Sensations", 4: "Our Polluted World", 5: "Thunder Lizards"}


class Receiver:
    """A webhook receiver on a free local port: records every POST, answers `status`."""

    def __init__(self):
        self.received: list[dict] = []     # bodies answered 2xx, in order
        self.attempts: list[int] = []      # the status of every POST
        self.status = 200
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    status = receiver.status
                    receiver.attempts.append(status)
                    if 200 <= status < 300:
                        receiver.received.append({"path": self.path, "body": body,
                                                  "type": self.headers.get("Content-Type")})
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/services/T01/B02/{TOKEN}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def alerts(self) -> list[dict]:
        with self.lock:
            return [json.loads(r["body"]) for r in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def alert_env(service_env, receiver, monkeypatch) -> dict[str, str]:
    """The consumer's environment: this test's services, the receiver, quick retries."""
    values = {**WHOLE_DAY, "ALERT_WEBHOOK_URL": receiver.url, "ALERT_RETRY_MAX_SECONDS": "0.5",
              "ALERT_TIMEOUT_SECONDS": "2"}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return dict(os.environ)


def event(at: datetime, site: int, val: int, typ: int | None = None) -> bytes:
    fields = {"at": at.astimezone(LONDON).isoformat(), "site": str(site), "val": val}
    if typ is not None:
        fields["type"] = typ
    return json.dumps(fields).encode()


def live_stream(emergency_sites: list[int], now: datetime) -> list[bytes]:
    """Ratings and assistance calls around fresh emergencies, an old emergency among them."""
    out = []
    for i, site in enumerate(emergency_sites):
        out += [event(now, (site + 1) % 6, 3), event(now, site, -1, 0),
                event(now, site, -1, 1), event(now - timedelta(hours=2), site, -1, 1),
                event(now, site, i % 5)]
    return out


def emergency_offsets(placed: dict, fresh_only: bool = True) -> list[int]:
    """Offsets of the fresh (or all) emergency calls, as placed in partition 0."""
    now = datetime.now(UTC)
    found = []
    for (_, offset), payload in sorted(placed.items()):
        fields = json.loads(payload)
        if fields["val"] == -1 and fields.get("type") == 1:
            old = now - datetime.fromisoformat(fields["at"]) > timedelta(minutes=15)
            if not (fresh_only and old):
                found.append(offset)
    return found


def outbox(conn) -> list[tuple]:
    return rows(conn, "SELECT id, sent_at IS NOT NULL FROM alert_outbox ORDER BY position")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """The metrics page as {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


# --------------------------------------------------------------------------- settings
def test_the_webhook_is_a_secret_and_its_settings_are_checked():
    env = {"ALERT_WEBHOOK_URL": f"https://hooks.slack.com/services/T/B/{TOKEN}"}
    assert load_settings(env).alert_webhook_url == env["ALERT_WEBHOOK_URL"]
    assert load_settings({}).alert_max_age_minutes == 15
    assert TOKEN not in repr(load_settings(env))
    assert env["ALERT_WEBHOOK_URL"] in environment_secrets(env)
    with pytest.raises(SettingsError, match="ALERT_WEBHOOK_URL must start with") as bad:
        load_settings({"ALERT_WEBHOOK_URL": f"hooks.slack.com/services/T/B/{TOKEN}"})
    assert TOKEN not in str(bad.value)
    for name, raw in (("ALERT_MAX_AGE_MINUTES", "0"), ("ALERT_MAX_AGE_MINUTES", "ten"),
                      ("ALERT_RETRY_MAX_SECONDS", "-1"), ("ALERT_TIMEOUT_SECONDS", "nan")):
        with pytest.raises(SettingsError, match=name):
            load_settings({name: raw})


# --------------------------------------------------------------------------- backlog
def test_a_backlog_of_old_emergencies_is_stored_and_counted_but_not_alerted(
        kafka_settings, topic, alert_env, conn, receiver, caplog):
    months_ago = datetime(2024, 10, 21, 10, 0, tzinfo=LONDON)
    payloads = [event(months_ago + timedelta(seconds=i), i % 6, -1, 1) for i in range(40)]
    payloads += [event(months_ago, 2, 4)] * 10
    produce(kafka_settings, topic, payloads)
    assert run_consumer_in_process("--topic", topic, "--group", group_name(), "--stop-at-end") == 0
    assert scalar(conn, "SELECT count(*) FROM request_interaction") == 40
    assert receiver.attempts == [] and outbox(conn) == []
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "EMERGENCY" in m]
    counted = [m for m in messages if "older than 15 minutes stored without an alert" in m]
    assert sum(int(m.split()[0]) for m in counted) == 40
    assert all(r.levelname == "INFO" for r in caplog.records if "older than" in r.getMessage())


# --------------------------------------------------------------------------- live stream
def test_a_live_stream_gives_one_alert_per_fresh_emergency_naming_its_exhibition(
        kafka_settings, topic, alert_env, conn, receiver, spawn):
    proc = spawn("--topic", topic, "--group", group_name(), "--batch-size", "7", env=alert_env)
    now = datetime.now(UTC)
    placed = produce(kafka_settings, topic, live_stream([0, 3, 5, 3], now), rate=200)
    fresh = emergency_offsets(placed)
    assert len(fresh) == 4 and len(emergency_offsets(placed, fresh_only=False)) == 8
    wait_for(lambda: len(receiver.alerts()) >= 4, 30, "four alerts", proc)
    time.sleep(1.0)  # nothing more comes: one alert per fresh emergency
    got = receiver.alerts()
    assert [a["id"] for a in got] == [f"kafka://{topic}/0:{o}" for o in fresh]
    for alert, site in zip(got, [0, 3, 5, 3]):
        at = datetime.fromisoformat(alert["at"])
        assert at.utcoffset() is not None and abs(at - now) < timedelta(seconds=1)
        assert alert == {"id": alert["id"], "site": site, "exhibition": NAMES[site],
                         "at": alert["at"],
                         "text": f"Emergency at {NAMES[site]}, {at.astimezone(LONDON):%H:%M:%S}"}
    assert {r["path"] for r in receiver.received} == {f"/services/T01/B02/{TOKEN}"}
    assert {r["type"] for r in receiver.received} == {"application/json"}
    assert [sent for _, sent in outbox(conn)] == [True] * 4
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    log = log_text(proc)
    assert log.count("EMERGENCY call at") == 4  # the old ones are counted, not shouted
    assert TOKEN not in log and f"http://127.0.0.1:{receiver.server.server_port}" in log
    print("received:", receiver.received[0]["body"].decode())


# --------------------------------------------------------------------------- receiver down
def test_a_failing_receiver_holds_alerts_not_events_then_gets_them_all(
        kafka_settings, topic, alert_env, conn, receiver, spawn):
    receiver.status = 503
    port = free_port()
    proc = spawn("--topic", topic, "--group", group_name(), "--batch-size", "5",
                 "--metrics-port", str(port), env=alert_env)
    placed = produce(kafka_settings, topic, live_stream([1, 2, 4], datetime.now(UTC)), rate=100)
    fresh = emergency_offsets(placed)
    wait_for(lambda: scalar(conn, "SELECT coalesce(sum(next_offset), 0) FROM kafka_offset "
                                  "WHERE topic = %s", (topic,)) == len(placed),
             30, "every event stored while the receiver fails", proc)
    assert scalar(conn, "SELECT count(*) FROM request_interaction") == 9
    wait_for(lambda: len(receiver.attempts) >= 3, 10, "retries", proc)
    assert receiver.received == []
    assert [sent for _, sent in outbox(conn)] == [False] * 3
    wait_for(lambda: scrape(port).get("lmnh_alerts_pending") == 3, 10, "3 pending", proc)
    receiver.status = 200
    wait_for(lambda: len(receiver.alerts()) >= 3, 10, "the held alerts", proc)
    time.sleep(0.5)
    assert [a["id"] for a in receiver.alerts()] == [f"kafka://{topic}/0:{o}" for o in fresh]
    wait_for(lambda: scrape(port).get("lmnh_alerts_pending") == 0, 10, "none pending", proc)
    assert scrape(port)["lmnh_alerts_sent_total"] == 3
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    log = log_text(proc)
    assert "alerts held: the receiver at http://127.0.0.1" in log and "(HTTP 503)" in log
    assert log.count("alerts held:") == 1  # one line per outage, not one per retry
    assert TOKEN not in log


# --------------------------------------------------------------------------- crash
def test_alerts_pending_at_a_kill_9_are_delivered_after_restart(
        kafka_settings, topic, alert_env, conn, receiver, spawn):
    receiver.status = 503
    args = ("--topic", topic, "--group", group_name(), "--session-timeout-ms", "3000")
    proc = spawn(*args, env=alert_env)
    placed = produce(kafka_settings, topic, live_stream([0, 1, 2, 3], datetime.now(UTC)))
    fresh = emergency_offsets(placed)
    wait_for(lambda: len(outbox(conn)) == 4, 30, "four alerts in the outbox", proc)
    wait_for(lambda: len(receiver.attempts) >= 2, 10, "a failed delivery", proc)
    proc.kill()
    proc.wait(10)
    assert [sent for _, sent in outbox(conn)] == [False] * 4
    receiver.status = 200
    again = spawn(*args, env=alert_env)
    wait_for(lambda: len(receiver.alerts()) >= 4, 30, "the pending alerts after restart", again)
    time.sleep(0.5)
    assert [a["id"] for a in receiver.alerts()] == [f"kafka://{topic}/0:{o}" for o in fresh]
    # marked sent after the receiver's answer reaches the sender: wait for it, don't race it
    wait_for(lambda: [sent for _, sent in outbox(conn)] == [True] * 4, 10,
             "the delivered alerts marked sent", again)
    again.send_signal(signal.SIGTERM)
    assert again.wait(20) == 0


# --------------------------------------------------------------------------- metrics
def test_the_scrape_shows_lag_and_the_newest_event_per_site(
        kafka_settings, topic, service_env, conn, monkeypatch):
    for key, value in WHOLE_DAY.items():
        monkeypatch.setenv(key, value)
    start = datetime.now(UTC) - timedelta(hours=1)
    payloads = [event(start + timedelta(seconds=i), i % 6, i % 5) for i in range(1000)]
    produce(kafka_settings, topic, payloads)  # a burst, then a consumer that takes 300 of it
    port = free_port()
    assert run_consumer_in_process("--topic", topic, "--group", group_name(), "--batch-size",
                                   "100", "--max-messages", "300", "--metrics-port",
                                   str(port)) == 0
    metrics = scrape(port)
    assert metrics['lmnh_partition_lag{partition="0"}'] == 700
    assert metrics['lmnh_last_offset{partition="0"}'] == 300
    for site in range(6):
        newest = max(i for i in range(300) if i % 6 == site)
        assert metrics[f'lmnh_site_last_event_timestamp_seconds{{site="{site}"}}'] == \
            pytest.approx((start + timedelta(seconds=newest)).timestamp(), abs=1e-3)
    assert metrics['lmnh_events_stored_total{kind="rating"}'] == 300
    assert metrics["lmnh_alerts_sent_total"] == 0 and metrics["lmnh_alerts_pending"] == 0
    assert metrics["lmnh_museum_open"] == 1  # the opening hours are the whole day here


# --------------------------------------------------------------------------- roles
def test_the_loader_role_queues_and_marks_alerts_but_cannot_delete_them(
        db, kafka_settings, topic, alert_env, receiver, monkeypatch):
    apply_roles_with_passwords(db)
    monkeypatch.setenv("DB_USER", "lmnh_loader")
    monkeypatch.setenv("DB_PASS", ROLE_SECRET)
    placed = produce(kafka_settings, topic, live_stream([2], datetime.now(UTC)))
    # stopping at the end gives the sender its last round: the alert goes before the exit
    assert run_consumer_in_process("--topic", topic, "--group", group_name(), "--stop-at-end") == 0
    assert [a["id"] for a in receiver.alerts()] == [f"kafka://{topic}/0:{o}"
                                                    for o in emergency_offsets(placed)]
    loader = connect_as(db, "lmnh_loader")
    try:
        assert refused(loader, "SELECT count(*) FROM alert_outbox WHERE sent_at IS NULL") is None
        assert refused(loader, "DELETE FROM alert_outbox") is psycopg2.errors.InsufficientPrivilege
        assert refused(loader, "TRUNCATE alert_outbox") is psycopg2.errors.InsufficientPrivilege
    finally:
        loader.close()


def test_a_database_without_the_outbox_is_one_line_not_a_traceback(
        topic, alert_env, conn, caplog):
    with conn.cursor() as cur:
        cur.execute("DROP TABLE alert_outbox")
    conn.commit()
    assert run_consumer_in_process("--topic", topic, "--group", group_name(), "--stop-at-end") == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["consumer stopped: alerts need the alert_outbox table: apply schema.sql "
                      "again (it only adds what is missing) and then roles.sql"]


def test_alerts_of_a_recreated_topic_do_not_repeat_the_old_logs_ids(kafka_settings, topic, conn):
    """After the topic is recreated its offsets start again at 0: an alert of the new log
    carries the new epoch's source in its id, so a receiver dropping repeated ids keeps it."""
    now = datetime.now(UTC).replace(hour=12)
    produce(kafka_settings, topic, [event(now, 2, -1, 1)])
    batch = test_consumer.read_messages(kafka_settings, topic, 0, 1)
    rules = transform.Rules(opening=datetime.min.time(), closing=datetime.max.time())
    alerting = alerts.Alerting(outbox=True)
    for log_id in ("id-A", "id-B"):  # the same offset 0, read from two incarnations of the topic
        consumer.store_batch(conn, topic, batch, rules, now=now,
                             known=consumer.KnownLog(log_id), alerting=alerting)
    assert rows(conn, "SELECT id, payload->>'id' FROM alert_outbox ORDER BY source_id") == [
        (f"kafka://{topic}/0:0",) * 2, (f"kafka://{topic}/0@1:0",) * 2]
