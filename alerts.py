"""Emergency alerts by webhook, at least once and never in the consumer's way (SPEC §4.1).

consumer.py writes one row per fresh emergency call into `alert_outbox` in the same transaction
as the call itself (`write_alerts`), so an alert exists exactly when its event is stored. An
`AlertSender` thread, with its own database connection, POSTs pending rows to the webhook in
the order they were stored and marks each one sent in the transaction that locked it: a receiver
that is down or slow holds alerts back (retried with backoff) but never holds a batch back, and
a process killed between a POST and its mark sends that alert again on start (its `id` lets the
receiver drop the repeat). The webhook URL is a secret (Slack puts a token in its path): only
its scheme and host are ever logged.

Delivery rules (SPEC §4.1): an alert is sent only when a POST of its body was answered 2xx. A
redirect is never followed as a GET (urllib's default turns a 302 into one, and the GET's 200
would mark an alert nobody received as sent): 307/308 are POSTed again to their Location,
301/302/303 are a failure naming the status. A refusal of one alert (4xx other than 408/429)
puts that row back with its own later retry time (`next_attempt_at`) and the round goes on, so
it never holds back the alerts after it; anything else (5xx, 408, 429, no answer) is the
receiver being away, and the round stops and backs off, a 429 for its `Retry-After`. Sent rows
are kept ALERT_RETENTION_DAYS as the record of what was alerted, then pruned (by a function of
schema.sql that deletes only sent rows); pending rows are never dropped.
"""
from __future__ import annotations

import email.utils
import functools
import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pandas as pd
import psycopg2

import load
from settings import DatabaseSettings, first_line

log = logging.getLogger("alerts")

EMERGENCY = 1  # the request value of an emergency call (`type` 1)

INSERT_ALERTS = """
INSERT INTO alert_outbox (source_id, position, id, event_at, payload)
SELECT * FROM unnest(%s::int[], %s::bigint[], %s::text[], %s::timestamptz[], %s::jsonb[])
ON CONFLICT (source_id, position) DO NOTHING
"""
# One at a time, locked until marked: two consumers of one group never send the same alert.
# Only rows that are due: a refused alert waits for its own next_attempt_at while the ones
# after it go; the rows already tried in this round are left for the next.
NEXT_PENDING = """
SELECT source_id, position, id, payload::text, attempts FROM alert_outbox
WHERE sent_at IS NULL AND (next_attempt_at IS NULL OR next_attempt_at <= now())
  AND (source_id, position) NOT IN (SELECT * FROM unnest(%s::int[], %s::bigint[]))
ORDER BY created_at, event_at, source_id, position
LIMIT 1
FOR UPDATE SKIP LOCKED
"""
MARK_SENT = "UPDATE alert_outbox SET sent_at = now() WHERE source_id = %s AND position = %s"
MARK_FAILED = """
UPDATE alert_outbox SET attempts = attempts + 1, last_error = %s,
       next_attempt_at = now() + make_interval(secs => %s)
WHERE source_id = %s AND position = %s
"""
# How many are pending, and in how many seconds the next one is due (NULL: none, or now).
COUNT_PENDING = """
SELECT count(*), greatest(0, extract(epoch FROM min(next_attempt_at) - now()))::float8
FROM alert_outbox WHERE sent_at IS NULL
"""
PRUNE_SENT = "SELECT prune_sent_alerts(%s)"
PRUNE_EVERY_SECONDS = 3600.0
LONGEST_RETRY_AFTER = 3600.0   # a Retry-After beyond an hour is taken as an hour
LONGEST_REFUSED_RETRY = 3600.0  # a refused alert is tried again at least hourly


@dataclass(frozen=True)
class Webhook:
    """Where alerts go and in which body (ALERT_WEBHOOK_URL, ALERT_WEBHOOK_FORMAT)."""

    url: str = field(repr=False)  # a secret: Slack and Teams put a token in it
    format: str = "json"
    zone: str = "Europe/London"    # the local time a Teams card shows
    ca_file: str | None = None     # the roots its HTTPS certificate must verify against


@dataclass(frozen=True)
class Alerting:
    """What store_batch does with emergency calls: which are fresh, and whether to queue them."""

    max_age: timedelta = timedelta(minutes=15)
    outbox: bool = False  # True when a webhook is configured


NO_ALERTS = Alerting()  # no webhook: fresh calls are logged, none is queued


@dataclass
class Emergencies:
    """The emergency calls of one batch: fresh ones (alerted) and how many were too old."""

    fresh: list[dict]
    old: int = 0


def emergencies_of(requests: pd.DataFrame, names: dict[int, str], zone: str,
                   processed_at: datetime, max_age: timedelta) -> Emergencies:
    """Split a batch's valid requests into fresh emergencies (as alert fields) and a count of
    old ones: a backlog being caught up is counted, not alerted."""
    calls = requests[requests["request_value"] == EMERGENCY]
    if not len(calls):
        return Emergencies([])
    is_fresh = (calls["event_at"] >= pd.Timestamp(processed_at - max_age)).to_numpy()
    fresh = []
    for row in calls[is_fresh].itertuples(index=False):
        local = row.event_at.tz_convert(zone)
        name = names.get(int(row.site), "?")
        fresh.append({"partition": int(row.partition), "offset": int(row.position),
                      "exhibition": name, "site": int(row.site), "at": local.isoformat(),
                      "text": f"Emergency at {name}, {local:%H:%M:%S}"})
    return Emergencies(fresh, int((~is_fresh).sum()))


SOURCE_URIS = "SELECT source_id, uri FROM event_source WHERE source_id = ANY(%s)"


def alert_id(source_uri: str, offset: int) -> str:
    """`kafka://topic/partition:offset` (SPEC §4.1), from the partition's source: after the
    topic was recreated the source is a new epoch (`kafka://topic/0@1`), so an alert of the new
    log never repeats the id of one of the old, which a receiver dropping repeats would lose."""
    return f"{source_uri}:{offset}"


def payload_of(source_uri: str, emergency: dict) -> dict:
    """The JSON the receiver gets; `text` alone makes it a Slack / Teams webhook message."""
    return {"id": alert_id(source_uri, emergency["offset"]),
            "text": emergency["text"], "exhibition": emergency["exhibition"],
            "site": emergency["site"], "at": emergency["at"]}


def body_of(payload: dict, webhook_format: str, zone: str = "Europe/London") -> bytes:
    """The bytes POSTed for one alert in the receiver's format. The outbox keeps the `json`
    payload; the format is applied when sending, so a format changed while alerts are pending
    applies to them too."""
    if webhook_format == "slack":
        return json.dumps({"text": payload["text"]}).encode()
    if webhook_format == "teams":
        return json.dumps(teams_message(payload, zone)).encode()
    return json.dumps(payload).encode()


def teams_message(payload: dict, zone: str) -> dict:
    """A Microsoft Teams Workflows message: an Adaptive Card (the only thing a Workflows
    webhook takes) saying the exhibition and the local time, the id in small print."""
    local = datetime.fromisoformat(payload["at"]).astimezone(ZoneInfo(zone))
    card = {"$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
            "type": "AdaptiveCard", "version": "1.4",
            "body": [{"type": "TextBlock", "text": payload["text"], "weight": "Bolder",
                      "size": "Large", "color": "Attention", "wrap": True},
                     {"type": "FactSet", "facts": [
                         {"title": "Exhibition", "value": str(payload["exhibition"])},
                         {"title": "Site", "value": "-" if payload["site"] is None
                          else str(payload["site"])},
                         {"title": "Local time", "value": f"{local:%H:%M:%S, %a %d %b %Y}"}]},
                     {"type": "TextBlock", "text": payload["id"], "size": "Small",
                      "isSubtle": True, "wrap": True}]}
    return {"type": "message", "summary": payload["text"],
            "attachments": [{"contentType": "application/vnd.microsoft.card.adaptive",
                             "contentUrl": None, "content": card}]}


def trial_payload(zone: str, now: datetime | None = None) -> dict:
    """The alert `consumer.py --test-alert` sends: marked as a test in every field a person
    reads, so nobody on call runs to an exhibition."""
    local = (now or datetime.now(UTC)).astimezone(ZoneInfo(zone))
    return {"id": f"test://{local:%Y%m%dT%H%M%S}", "exhibition": "TEST (no exhibition)",
            "site": None, "at": local.isoformat(),  # site 0 is a real exhibition
            "text": f"TEST ALERT, no emergency: the kiosk alert channel works ({local:%H:%M:%S})"}


def write_alerts(cur, fresh: list[dict], source_of: dict[int, int]) -> int:
    """Queue fresh emergencies in the outbox, inside the caller's (the batch's) transaction."""
    if not fresh:
        return 0
    cur.execute(SOURCE_URIS, (sorted({source_of[e["partition"]] for e in fresh}),))
    uri_of = dict(cur.fetchall())
    sources = [source_of[e["partition"]] for e in fresh]
    payloads = [payload_of(uri_of[source], e) for source, e in zip(sources, fresh)]
    cur.execute(INSERT_ALERTS, (sources, [e["offset"] for e in fresh], [p["id"] for p in payloads],
                                [e["at"] for e in fresh], [json.dumps(p) for p in payloads]))
    return cur.rowcount


def shown_url(url: str) -> str:
    """scheme://host[:port] of a webhook: what logs may say about it (the path is a secret)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


class DeliveryFailed(Exception):
    """The receiver did not accept the alert; the message never contains the URL.

    `refused`: the receiver turned this alert down (4xx other than 408/429): the others may
    still go. `retry_after`: seconds the receiver asked us to wait (429).
    """

    def __init__(self, why: str, refused: bool = False, retry_after: float | None = None):
        super().__init__(why)
        self.refused = refused
        self.retry_after = retry_after


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects come back as HTTPError: post_json decides, never urllib (which would GET)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


REPOST = (307, 308)   # the method and body are kept: POST again to Location
MAX_REDIRECTS = 3


@functools.lru_cache(maxsize=4)
def _opener(ca_file: str | None) -> urllib.request.OpenerDirector:
    """The opener for one set of roots (the default ones, or SSL_CERT_FILE from .env or the
    environment), made once: loading a CA bundle into a TLS context is not per alert work."""
    if ca_file is None:
        return urllib.request.build_opener(_NoRedirect)
    context = ssl.create_default_context(cafile=ca_file)
    return urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=context))


def post_json(url: str, body: bytes, timeout: float, ca_file: str | None = None) -> int:
    """POST one alert; its 2xx status, or DeliveryFailed. 307/308 are followed as POSTs (at
    most MAX_REDIRECTS); any other answer, 301/302/303 included, is a failure naming it."""
    for _ in range(MAX_REDIRECTS + 1):
        try:
            return _post_once(url, body, timeout, ca_file)
        except urllib.error.HTTPError as exc:
            location = exc.headers.get("Location") if exc.headers else None
            if exc.code in REPOST and location:
                url = urllib.parse.urljoin(url, location)
                if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                    raise DeliveryFailed(f"HTTP {exc.code} to a location that is not http(s)") \
                        from None
                continue
            raise failure_of(exc) from None
    raise DeliveryFailed(f"more than {MAX_REDIRECTS} redirects")


def _post_once(url: str, body: bytes, timeout: float, ca_file: str | None = None) -> int:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with _opener(ca_file).open(request, timeout=timeout) as response:
            response.read(65536)
            status = response.status
    except urllib.error.HTTPError:
        raise
    except TimeoutError:
        raise DeliveryFailed(f"no answer within {timeout:g} s") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise DeliveryFailed(f"no answer within {timeout:g} s") from None
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise DeliveryFailed(
                f"the webhook's TLS certificate does not verify ({reason.verify_message}): a "
                "TLS-inspecting proxy's CA must be among the machine's roots (SSL_CERT_FILE)") \
                from None
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else type(reason).__name__
        raise DeliveryFailed(str(text)) from None
    except (OSError, ValueError) as exc:  # connection reset, bad status line...
        raise DeliveryFailed(type(exc).__name__) from None
    if not 200 <= status < 300:  # a 1xx/3xx urllib did not raise for
        raise DeliveryFailed(f"HTTP {status}")
    return status


def failure_of(exc: urllib.error.HTTPError) -> DeliveryFailed:
    """What an error status means for the sender: this alert refused, or the receiver away."""
    code = exc.code
    if 300 <= code < 400:
        where = exc.headers.get("Location") if exc.headers else None
        to = f" to {shown_url(urllib.parse.urljoin(exc.url or '', where))}" if where else ""
        return DeliveryFailed(f"HTTP {code} redirect{to}, not followed (only 307/308 keep the "
                              "POST): set ALERT_WEBHOOK_URL to the final address")
    if code == 429:
        return DeliveryFailed("HTTP 429 too many requests",
                              retry_after=retry_after_seconds(exc.headers.get("Retry-After")))
    if 400 <= code < 500 and code != 408:
        return DeliveryFailed(f"HTTP {code}", refused=True)
    return DeliveryFailed(f"HTTP {code}")


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header (delay-seconds or an HTTP-date) as seconds from now, at most
    LONGEST_RETRY_AFTER; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), LONGEST_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delay = when.timestamp() - (time.time() if now is None else now)
    return min(max(delay, 0.0), LONGEST_RETRY_AFTER)


@dataclass(frozen=True)
class SenderTiming:
    """How patient the sender is; tests shrink these so an outage takes seconds."""

    request_timeout: float = 5.0     # per POST
    first_backoff: float = 0.5       # after a failure; doubles up to max_backoff
    max_backoff: float = 30.0
    poll_seconds: float = 5.0        # look at the outbox at least this often (other writers)
    retention_days: int = 90         # sent rows kept this long, then pruned

    def refused_retry(self, attempts: int) -> float:
        """Seconds until a refused alert is tried again: max_backoff, doubling per refusal, at
        most hourly. Someone may fix the receiver (or its schema) at any time."""
        return min(self.max_backoff * 2 ** min(attempts, 20), LONGEST_REFUSED_RETRY)


class AlertSender:
    """A thread that delivers the outbox to the webhook, in order, and marks what it sent.

    `wake()` (called by the consumer after a batch that queued alerts has committed) starts a
    delivery at once, so an alert follows its event by milliseconds; otherwise it looks every
    `poll_seconds`, or sooner when a refused alert is due again. `metrics` has `alert_sent()`,
    `alert_refused()` and `alerts_pending(n)` (metrics.Metrics).
    """

    def __init__(self, database: DatabaseSettings, webhook: Webhook,
                 timing: SenderTiming = SenderTiming(), metrics=None):
        self.webhook = webhook
        self.timing = timing
        self.metrics = metrics
        self.db = load.LazyConnection(database)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alert-sender", daemon=True)
        self._trouble: str | None = None  # what is wrong now, logged once per outage
        self._next_due: float | None = None  # seconds until a held-back refused alert is due
        self._pruned_at: float | None = None

    def start(self) -> None:
        log.info("alerts: fresh emergencies are POSTed to %s as %s; sent alerts are kept %d "
                 "days", shown_url(self.webhook.url), self.webhook.format,
                 self.timing.retention_days)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, grace: float = 5.0) -> None:
        """Finish the delivery in hand (at most `grace` s); what is left is sent on next start."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(grace)
        if self._thread.is_alive():
            log.warning("alerts: the sender did not finish within %.0f s; pending alerts are "
                        "sent on the next start", grace)
        else:
            self.db.drop()

    # ---- the thread
    def _run(self) -> None:
        delay = self.timing.first_backoff
        while True:
            final = self._stop.is_set()  # asked to stop: one last round, then out
            self._wake.clear()  # before looking, so a wake during a delivery is not lost
            failure = self._attempt()
            if final:
                break
            if failure is None:
                delay = self.timing.first_backoff
                self._wake.wait(self._idle_wait())
                continue
            wait = delay if failure.retry_after is None else max(failure.retry_after, delay)
            if self._stop.wait(wait):  # a wake does not cut a backoff short; a stop does
                break
            delay = min(delay * 2, self.timing.max_backoff)

    def _idle_wait(self) -> float:
        if self._next_due is None:
            return self.timing.poll_seconds
        return min(self.timing.poll_seconds, max(self._next_due, 0.05))

    def _attempt(self) -> DeliveryFailed | None:
        """One delivery round; the failure (logged once per outage) when it must be retried."""
        try:
            self._prune()  # first: a receiver that is away must not stop it
            self._deliver_pending()
        except DeliveryFailed as exc:
            self._report(f"the receiver at {shown_url(self.webhook.url)} failed ({exc})")
            return exc
        except (psycopg2.Error, load.DatabaseError) as exc:
            self.db.drop()
            self._report(f"the database is unavailable to the sender ({first_line(exc)})")
            return DeliveryFailed("database")
        self._recovered()
        return None

    def _deliver_pending(self) -> None:
        """Send the due alerts one by one until none is left (or another sender holds them);
        a refused one is put back with its own retry time and the round goes on."""
        conn = self.db.get()
        tried: tuple[list[int], list[int]] = ([], [])
        while True:
            with load.transaction(conn) as cur:
                cur.execute(NEXT_PENDING, tried)
                row = cur.fetchone()
                if row is None:
                    cur.execute(COUNT_PENDING)
                    self._set_pending(*cur.fetchone())
                    return
                tried[0].append(row[0])  # source_id
                tried[1].append(row[1])  # position
                away = self._send_one(cur, row)
            if away is not None:  # raised after the commit, which keeps the attempt's record
                raise away

    def _send_one(self, cur, row: tuple) -> DeliveryFailed | None:
        """POST one locked row and record the outcome in its transaction; the failure when
        the receiver is away, which ends the round."""
        source_id, position, alert, payload, attempts = row
        body = body_of(json.loads(payload), self.webhook.format, self.webhook.zone)
        try:
            post_json(self.webhook.url, body, self.timing.request_timeout, self.webhook.ca_file)
        except DeliveryFailed as exc:
            retry = self.timing.refused_retry(attempts) if exc.refused else 0.0
            cur.execute(MARK_FAILED, (str(exc), retry, source_id, position))
            if not exc.refused:
                return exc
            self._refused(alert, exc, attempts, retry)
            return None
        cur.execute(MARK_SENT, (source_id, position))
        log.info("alert delivered: %s", alert)
        if self.metrics is not None:
            self.metrics.alert_sent()
        return None

    def _refused(self, alert: str, exc: DeliveryFailed, attempts: int, retry: float) -> None:
        """One ERROR line per refused alert (its later refusals are DEBUG), and the count."""
        level = logging.ERROR if attempts == 0 else logging.DEBUG
        log.log(level, "alert %s refused by the receiver at %s (%s): the alerts after it go "
                "on; this one is tried again in %.0f s and then less often (see alert_outbox."
                "last_error)", alert, shown_url(self.webhook.url), exc, retry)
        if self.metrics is not None:
            self.metrics.alert_refused()

    def _prune(self) -> None:
        """Delete sent alerts older than the retention, at start and hourly (never a pending
        one: schema.sql's prune_sent_alerts only deletes sent rows)."""
        now = time.monotonic()
        if self._pruned_at is not None and now - self._pruned_at < PRUNE_EVERY_SECONDS:
            return
        with load.transaction(self.db.get()) as cur:
            cur.execute(PRUNE_SENT, (self.timing.retention_days,))
            pruned = cur.fetchone()[0]
        self._pruned_at = now
        if pruned:
            log.info("alerts: pruned %d sent alert(s) older than %d days", pruned,
                     self.timing.retention_days)

    def _set_pending(self, count: int, next_due: float | None = None) -> None:
        self._next_due = next_due
        if self.metrics is not None:
            self.metrics.alerts_pending(count)

    def _report(self, trouble: str) -> None:
        if trouble != self._trouble:
            log.warning("alerts held: %s; retrying with backoff", trouble)
        self._trouble = trouble
        try:
            with load.transaction(self.db.get()) as cur:
                cur.execute(COUNT_PENDING)
                self._set_pending(*cur.fetchone())
        except (psycopg2.Error, load.DatabaseError):
            self.db.drop()

    def _recovered(self) -> None:
        if self._trouble is not None:
            log.info("alerts: the receiver is accepting alerts again; the held ones have been sent")
            self._trouble = None


def send_test_alert(webhook: Webhook, timeout: float) -> tuple[bool, str]:
    """`consumer.py --test-alert`: one test alert through the configured webhook and format,
    no database or broker involved; (accepted, what happened) for the person on call."""
    body = body_of(trial_payload(webhook.zone), webhook.format, webhook.zone)
    where = f"{shown_url(webhook.url)} ({webhook.format} format)"
    try:
        status = post_json(webhook.url, body, timeout, webhook.ca_file)
    except DeliveryFailed as exc:
        return False, f"test alert NOT accepted by {where}: {exc}"
    return True, f"test alert accepted by {where}: HTTP {status}; check that it shows in the channel"
