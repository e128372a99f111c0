"""Pages that reach people (issue 18, SPEC §4.1): real receivers, a real database, a real broker.

Why: an alert that a redirect turned into a GET, that one refused payload held back, or that a
Teams channel never rendered is an emergency nobody heard. Each test puts a local HTTP receiver
in front of the real sender (or consumer.py) and checks what the receiver got and what the
outbox says, waiting for outcomes rather than timing anything.
"""
from __future__ import annotations

import json
import os
import signal
import ssl
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import kafka_front
import pytest
import test_consumer
from test_alerts import LONDON, NAMES, TOKEN, WHOLE_DAY, event, free_port, scrape
from test_consumer import group_name, log_text, produce, wait_for

import alerts
import consumer
import load
import localstack
import transform
from helpers import rows, run_consumer_in_process, scalar
from metrics import Metrics
from settings import SettingsError, load_settings

spawn = test_consumer.spawn  # the fixture: consumer.py subprocesses, killed after the test
QUICK = alerts.SenderTiming(request_timeout=2, first_backoff=0.2, max_backoff=0.5,
                            poll_seconds=0.5)
HOOK = f"/services/T01/B02/{TOKEN}"


class Receiver:
    """A webhook on a free local port. `answer(method, path, body)` -> (status, headers);
    every request (GETs too) is recorded with its answer and the moment it came."""

    def __init__(self, answer=None, tls: ssl.SSLContext | None = None):
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.answer = answer or (lambda method, path, body: (200, {}))
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                status, headers = receiver.answer(self.command, self.path, body)
                with receiver.lock:
                    receiver.requests.append({"method": self.command, "path": self.path,
                                              "body": body, "status": status,
                                              "type": self.headers.get("Content-Type"),
                                              "at": time.monotonic()})
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_POST = do_GET = _any  # noqa: N815 - http.server's naming

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:  # HTTPS, as Slack and Teams serve their webhooks
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.base = f"{scheme}://127.0.0.1:{self.server.server_port}"
        self.url = self.base + HOOK
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def seen(self, method: str | None = None, status: int | None = None) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if (method is None or r["method"] == method)
                    and (status is None or r["status"] == status)]

    def accepted(self) -> list[dict]:
        return [json.loads(r["body"]) for r in self.seen("POST") if 200 <= r["status"] < 300]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def make_receiver():
    made: list[Receiver] = []

    def make(answer=None, tls: ssl.SSLContext | None = None) -> Receiver:
        made.append(Receiver(answer, tls))
        return made[-1]

    yield make
    for r in made:
        r.close()


def scrape_now(port: int) -> dict[str, float]:
    """The metrics page, or nothing while the server is not up yet."""
    try:
        return scrape(port)
    except OSError:
        return {}


def queue_emergencies(conn, kafka_settings, topic: str, sites: list[int]) -> list[str]:
    """Fresh emergency calls stored by the consumer's own store_batch, which queues their
    alerts in the outbox; their alert ids in order."""
    now = datetime.now(UTC)
    produce(kafka_settings, topic, [event(now, site, -1, 1) for site in sites])
    batch = test_consumer.read_messages(kafka_settings, topic, 0, len(sites))
    rules = transform.Rules(opening=datetime.min.time(), closing=datetime.max.time())
    result = consumer.store_batch(conn, topic, batch, rules, now=now,
                                  alerting=alerts.Alerting(outbox=True))
    assert result.alerts_queued == len(sites)
    return [f"kafka://{topic}/0:{i}" for i in range(len(sites))]


def outbox(conn) -> dict[str, tuple]:
    """id -> (sent, attempts, last_error)."""
    return {i: (sent, attempts, error) for i, sent, attempts, error in rows(
        conn, "SELECT id, sent_at IS NOT NULL, attempts, last_error FROM alert_outbox "
              "ORDER BY position")}


@pytest.fixture
def run_sender(db):
    """Start the real AlertSender on this test's database; stopped after the test."""
    started: list[alerts.AlertSender] = []

    def start(url: str, fmt: str = "json", metrics=None, timing=QUICK) -> alerts.AlertSender:
        sender = alerts.AlertSender(db, alerts.Webhook(url, fmt), timing, metrics)
        sender.start()
        started.append(sender)
        return sender

    yield start
    for sender in started:
        sender.stop(grace=5)


# --------------------------------------------------------------------------- formats
def test_slack_and_teams_receive_their_own_bodies(conn, kafka_settings, topic, make_receiver,
                                                  run_sender):
    ids = queue_emergencies(conn, kafka_settings, topic, [3])
    stored = json.loads(scalar(conn, "SELECT payload::text FROM alert_outbox"))
    local = datetime.fromisoformat(stored["at"]).astimezone(LONDON)
    for fmt in ("slack", "teams"):
        receiver = make_receiver()
        with conn.cursor() as cur:
            cur.execute("UPDATE alert_outbox SET sent_at = NULL")
        conn.commit()
        sender = run_sender(receiver.url, fmt)
        wait_for(lambda r=receiver: r.accepted(), 10, f"the {fmt} alert")
        sender.stop()
        raw = receiver.seen("POST")[0]
        body = json.loads(raw["body"])
        print(f"{fmt} body as received:", raw["body"].decode())
        assert raw["type"] == "application/json" and raw["path"] == HOOK
        text = f"Emergency at {NAMES[3]}, {local:%H:%M:%S}"
        if fmt == "slack":
            assert body == {"text": text}
            continue
        assert body["type"] == "message"
        [attachment] = body["attachments"]
        assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
        card = attachment["content"]
        assert card["type"] == "AdaptiveCard" and card["version"] == "1.4"
        assert card["body"][0] == {"type": "TextBlock", "text": text, "weight": "Bolder",
                                   "size": "Large", "color": "Attention", "wrap": True}
        facts = {f["title"]: f["value"] for f in card["body"][1]["facts"]}
        assert facts["Exhibition"] == NAMES[3] and facts["Site"] == "3"
        assert facts["Local time"].startswith(f"{local:%H:%M:%S}")
        assert card["body"][2]["text"] == ids[0]
    assert outbox(conn)[ids[0]][0] is True


def test_the_test_alert_says_whether_the_channel_accepted_it(make_receiver, monkeypatch, caplog):
    good = make_receiver()
    monkeypatch.setenv("ALERT_WEBHOOK_URL", good.url)
    monkeypatch.setenv("ALERT_WEBHOOK_FORMAT", "teams")
    assert run_consumer_in_process("--test-alert") == 0  # no database, no broker needed
    [raw] = good.seen("POST")
    card = json.loads(raw["body"])["attachments"][0]["content"]
    print("teams test alert as received:", raw["body"].decode())
    assert card["body"][0]["text"].startswith("TEST ALERT, no emergency")
    facts = {f["title"]: f["value"] for f in card["body"][1]["facts"]}
    assert (facts["Exhibition"], facts["Site"]) == ("TEST (no exhibition)", "-")
    assert any(r.levelname == "INFO" and "test alert accepted by http://127.0.0.1" in
               r.getMessage() for r in caplog.records)
    caplog.clear()
    refusing = make_receiver(lambda method, path, body: (404, {}))
    monkeypatch.setenv("ALERT_WEBHOOK_URL", refusing.url)
    assert run_consumer_in_process("--test-alert") == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"test alert NOT accepted by {refusing.base} (teams format): HTTP 404"]
    assert TOKEN not in caplog.text
    monkeypatch.delenv("ALERT_WEBHOOK_URL")
    assert run_consumer_in_process("--test-alert") == 2
    monkeypatch.setenv("ALERT_WEBHOOK_FORMAT", "msteams")
    assert run_consumer_in_process("--test-alert") == 2
    assert "ALERT_WEBHOOK_FORMAT must be one of json, slack, teams, got 'msteams'" in caplog.text


def test_the_test_alert_reaches_an_https_webhook_and_names_a_certificate_that_fails(
        make_receiver, kafka_certs, monkeypatch, caplog, tmp_path):
    """Slack and Teams webhooks are HTTPS. The alert completes a TLS handshake with a receiver
    whose certificate comes from a private CA (a TLS-inspecting proxy's, say) once that CA is
    SSL_CERT_FILE, set in .env as the systemd units read it (OpenSSL alone would only see the
    process environment); with other roots the one line says the certificate does not verify
    and where the CA goes."""
    receiver = make_receiver(tls=kafka_front.server_context(kafka_certs["server"]))
    env_file = tmp_path / ".env"
    monkeypatch.setenv("LMNH_ENV_FILE", str(env_file))
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    env_file.write_text(f"ALERT_WEBHOOK_URL={receiver.url}\nSSL_CERT_FILE={kafka_certs['ca']}\n")
    assert run_consumer_in_process("--test-alert") == 0
    [raw] = receiver.seen("POST")
    assert json.loads(raw["body"])["text"].startswith("TEST ALERT")
    caplog.clear()
    env_file.write_text(f"ALERT_WEBHOOK_URL={receiver.url}\n"
                        f"SSL_CERT_FILE={kafka_certs['other_ca']}\n")
    assert run_consumer_in_process("--test-alert") == 1
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert line.startswith(f"test alert NOT accepted by {receiver.base} (json format): the "
                           "webhook's TLS certificate does not verify"), line
    assert "SSL_CERT_FILE" in line and TOKEN not in line
    assert len(receiver.seen("POST")) == 1  # the refused handshake carried no alert


# --------------------------------------------------------------------------- redirects
def test_a_302_is_a_failure_naming_it_and_never_a_get_marked_sent(
        conn, kafka_settings, topic, make_receiver, run_sender, caplog):
    def answer(method, path, body):
        return (302, {"Location": "/moved"}) if path == HOOK else (200, {})

    receiver = make_receiver(answer)
    [alert] = queue_emergencies(conn, kafka_settings, topic, [1])
    run_sender(receiver.url)
    wait_for(lambda: outbox(conn)[alert][1] >= 2, 10, "two attempts")
    assert receiver.seen("GET") == [] and receiver.seen(status=200) == []
    sent, _, error = outbox(conn)[alert]
    assert not sent and error.startswith(f"HTTP 302 redirect to {receiver.base}, not followed")
    assert "HTTP 302 redirect" in caplog.text and TOKEN not in caplog.text


def test_a_307_and_a_308_are_posted_again_to_their_location(
        conn, kafka_settings, topic, make_receiver, run_sender):
    def answer(method, path, body):
        return {HOOK: (307, {"Location": "/step"}),
                "/step": (308, {"Location": "/final"})}.get(path, (200, {}))

    receiver = make_receiver(answer)
    [alert] = queue_emergencies(conn, kafka_settings, topic, [4])
    run_sender(receiver.url)
    wait_for(lambda: outbox(conn)[alert][0], 10, "the alert marked sent")
    posts = receiver.seen("POST")
    assert [(r["path"], r["status"]) for r in posts] == [(HOOK, 307), ("/step", 308),
                                                         ("/final", 200)]
    assert len({r["body"] for r in posts}) == 1 and json.loads(posts[-1]["body"])["id"] == alert
    assert receiver.seen("GET") == []


# --------------------------------------------------------------------------- refusals
def test_one_refused_alert_does_not_hold_back_the_others(
        conn, kafka_settings, topic, make_receiver, run_sender, caplog):
    refuse = {"on": True}

    def answer(method, path, body):
        site = json.loads(body)["site"]
        return (400, {}) if refuse["on"] and site == 2 else (200, {})

    receiver = make_receiver(answer)
    ids = queue_emergencies(conn, kafka_settings, topic, [2, 0, 5, 1])
    port = free_port()
    run_sender(receiver.url, metrics=Metrics(port))
    wait_for(lambda: len(receiver.accepted()) == 3, 10, "the three others")
    assert [a["id"] for a in receiver.accepted()] == ids[1:]
    wait_for(lambda: outbox(conn)[ids[0]][1] >= 2, 10, "the refused one tried again")
    sent, attempts, error = outbox(conn)[ids[0]]
    assert not sent and error == "HTTP 400"
    assert scrape(port)["lmnh_alerts_refused_total"] >= 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(f"alert {ids[0]} refused by the receiver")
    refuse["on"] = False  # the receiver is fixed: the refused alert goes on its next try
    wait_for(lambda: outbox(conn)[ids[0]][0], 10, "the refused alert delivered at last")
    assert [a["id"] for a in receiver.accepted()] == ids[1:] + ids[:1]
    wait_for(lambda: scrape(port).get("lmnh_alerts_pending") == 0, 10, "none pending")


def test_a_429_is_retried_after_its_retry_after(conn, kafka_settings, topic, make_receiver,
                                                 run_sender):
    def answer(method, path, body):
        first = not receiver.seen("POST")
        return (429, {"Retry-After": "2"}) if first else (200, {})

    receiver = make_receiver(answer)
    [alert] = queue_emergencies(conn, kafka_settings, topic, [0])
    run_sender(receiver.url)  # without Retry-After it would try again after 0.2 s
    wait_for(lambda: outbox(conn)[alert][0], 15, "the alert after the 429")
    first, second = receiver.seen("POST")
    assert (first["status"], second["status"]) == (429, 200)
    assert second["at"] - first["at"] >= 1.9  # not sooner than asked (a lower bound only)


def test_the_format_and_the_retention_are_checked_settings():
    assert load_settings({}).alert_webhook_format == "json"
    assert load_settings({"ALERT_WEBHOOK_FORMAT": "Teams"}).alert_webhook_format == "teams"
    assert load_settings({}).alert_retention_days == 90
    assert load_settings({"ALERT_RETENTION_DAYS": "400"}).alert_retention_days == 400
    for name, raw in (("ALERT_WEBHOOK_FORMAT", "adaptive"), ("ALERT_RETENTION_DAYS", "0"),
                      ("ALERT_RETENTION_DAYS", "1.5")):
        with pytest.raises(SettingsError, match=f"^{name} must be"):
            load_settings({name: raw})


def test_retry_after_reads_seconds_and_http_dates():
    now = datetime(2026, 12, 4, 12, 0, tzinfo=UTC).timestamp()
    assert alerts.retry_after_seconds("7", now) == 7
    assert alerts.retry_after_seconds("Fri, 04 Dec 2026 12:01:30 GMT", now) == 90
    assert alerts.retry_after_seconds("Fri, 04 Dec 2026 11:00:00 GMT", now) == 0
    assert alerts.retry_after_seconds("999999", now) == alerts.LONGEST_RETRY_AFTER
    assert alerts.retry_after_seconds("soon", now) is None
    assert alerts.retry_after_seconds(None, now) is None


# --------------------------------------------------------------------------- retention
def test_sent_alerts_are_pruned_after_the_retention_and_pending_ones_never(
        conn, kafka_settings, topic, make_receiver, run_sender):
    ids = queue_emergencies(conn, kafka_settings, topic, [1, 2, 3])
    with conn.cursor() as cur:  # one sent long ago, one sent lately, one pending for ages
        cur.execute("UPDATE alert_outbox SET sent_at = now() - interval '91 days', "
                    "created_at = now() - interval '92 days' WHERE id = %s", (ids[0],))
        cur.execute("UPDATE alert_outbox SET sent_at = now() - interval '89 days' "
                    "WHERE id = %s", (ids[1],))
        cur.execute("UPDATE alert_outbox SET created_at = now() - interval '400 days' "
                    "WHERE id = %s", (ids[2],))
    conn.commit()
    receiver = make_receiver(lambda method, path, body: (503, {}))
    run_sender(receiver.url, timing=QUICK)  # retention: the default 90 days
    wait_for(lambda: ids[0] not in outbox(conn), 10, "the old sent alert pruned")
    wait_for(lambda: outbox(conn)[ids[2]][1] >= 1, 10, "the pending one tried")
    assert set(outbox(conn)) == {ids[1], ids[2]} and not outbox(conn)[ids[2]][0]
    with pytest.raises(Exception, match="keep_days must be at least 1"):
        scalar(conn, "SELECT prune_sent_alerts(0)")


# --------------------------------------------------------------------------- database outage
@pytest.mark.slow
def test_a_database_outage_shows_in_the_metrics_and_its_alerts_follow(
        kafka_settings, topic, private_pg, spawn, make_receiver):
    info, db = private_pg
    receiver = make_receiver()
    port = free_port()
    env = {**test_consumer.private_env(db, kafka_settings), **WHOLE_DAY,
           "ALERT_WEBHOOK_URL": receiver.url, "ALERT_RETRY_MAX_SECONDS": "0.5",
           "ALERT_TIMEOUT_SECONDS": "2"}
    proc = spawn("--topic", topic, "--group", group_name(), "--metrics-port", str(port),
                 "--batch-size", "50", env=env)
    placed = produce(kafka_settings, topic, [event(datetime.now(UTC), i % 6, 3)
                                             for i in range(100)])
    conn = load.connect(db)
    wait_for(lambda: test_consumer.progress(conn, topic) == 100, 60, "the first 100", proc)
    conn.close()
    wait_for(lambda: scrape_now(port).get("lmnh_database_up") == 1, 10, "database up", proc)

    localstack.pg_control(info, "stop")
    try:
        wait_for(lambda: scrape(port).get("lmnh_database_up") == 0, 15,
                 "lmnh_database_up 0 with no event arriving", proc)
        lag = 'lmnh_partition_lag{partition="0"}'
        seen = []
        for round_ in range(3):  # events keep coming, emergencies among them
            now = datetime.now(UTC)
            placed.update(produce(kafka_settings, topic, [event(now, 2, -1, 1)] +
                                  [event(now, i % 6, 4) for i in range(49)], rate=500))
            seen.append(wait_for(lambda s=seen: (v := scrape(port).get(lag, 0)) > (
                s[-1] if s else 0) and v, 20, f"the lag growing (round {round_})", proc))
        assert scrape(port)["lmnh_database_up"] == 0
        assert receiver.accepted() == []
    finally:
        localstack.pg_control(info, "start")
    wait_for(lambda: scrape(port).get("lmnh_database_up") == 1, 30, "database up again", proc)
    wait_for(lambda: scrape(port).get('lmnh_partition_lag{partition="0"}') == 0, 30,
             "the lag back to 0", proc)
    wait_for(lambda: len(receiver.accepted()) == 3, 30, "the outage's alerts", proc)
    conn = load.connect(db)
    try:
        assert test_consumer.progress(conn, topic) == len(placed) == 250
        assert scalar(conn, "SELECT count(*) FROM rating_interaction") == 247
        assert [a["id"] for a in receiver.accepted()] == [
            f"kafka://{topic}/0:{o}" for o in (100, 150, 200)]
    finally:
        conn.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    text = log_text(proc)
    assert text.count("database unavailable") == 1 and text.count("database is back") == 1
    assert "Traceback" not in text


# --------------------------------------------------------------------------- restart
def test_the_last_event_gauge_is_filled_from_the_database_right_after_a_restart(
        kafka_settings, topic, service_env, conn, monkeypatch, spawn):
    for key, value in WHOLE_DAY.items():
        monkeypatch.setenv(key, value)
    start = datetime.now(UTC) - timedelta(hours=2)
    produce(kafka_settings, topic, [event(start + timedelta(seconds=i), i % 4, 2)
                                    for i in range(40)])
    assert run_consumer_in_process("--topic", topic, "--group", group_name(),
                                   "--stop-at-end") == 0
    port = free_port()  # a new consumer with nothing to read: the gauge comes from the database
    proc = spawn("--topic", topic, "--group", group_name(), "--metrics-port", str(port),
                 env=dict(os.environ))
    name = 'lmnh_site_last_event_timestamp_seconds{{site="{}"}}'
    wait_for(lambda: all(name.format(s) in scrape_now(port) for s in range(4)), 20,
             "the gauge of sites 0-3", proc)
    metrics = scrape(port)
    for site in range(4):
        newest = max(i for i in range(40) if i % 4 == site)
        assert metrics[name.format(site)] == pytest.approx(
            (start + timedelta(seconds=newest)).timestamp(), abs=1e-3)
    assert name.format(5) not in metrics  # never heard from: no series
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0


# --------------------------------------------------------------------------- upgrade
def test_applying_schema_sql_again_upgrades_an_older_outbox_in_place(
        conn, kafka_settings, topic, service_env, make_receiver, monkeypatch, caplog):
    """The delivery columns and the prune function are added to an outbox of the previous
    version, its pending alerts kept; until then the consumer says what to do in one line."""
    monkeypatch.setenv("ALERT_WEBHOOK_URL", make_receiver().url)
    [alert] = queue_emergencies(conn, kafka_settings, topic, [5])
    with conn.cursor() as cur:  # the outbox as the previous version created it
        cur.execute("ALTER TABLE alert_outbox DROP COLUMN attempts, DROP COLUMN last_error, "
                    "DROP COLUMN next_attempt_at")
        cur.execute("DROP FUNCTION prune_sent_alerts(integer)")
    conn.commit()
    assert run_consumer_in_process("--topic", topic, "--group", group_name(), "--stop-at-end") == 1
    assert "consumer stopped: alerts need the alert_outbox table: apply schema.sql again" \
        in caplog.text
    load.apply_schema(conn, (test_consumer.PROJECT / "schema.sql").read_text())
    assert outbox(conn) == {alert: (False, 0, None)}
    with conn.cursor() as cur:
        consumer.ensure_outbox(conn, local_db=False)  # no complaint now
        cur.execute("SELECT prune_sent_alerts(90)")
    conn.rollback()
