"""Emergency alerts by webhook, at least once and never in the consumer's way (SPEC §4.1).

consumer.py writes one row per fresh emergency call into `alert_outbox` in the same transaction
as the call itself (`write_alerts`), so an alert exists exactly when its event is stored. An
`AlertSender` thread, with its own database connection, POSTs pending rows to the webhook in
the order they were stored and marks each one sent in the transaction that locked it: a receiver
that is down or slow holds alerts back (retried with backoff) but never holds a batch back, and
a process killed between a POST and its mark sends that alert again on start (its `id` lets the
receiver drop the repeat). The webhook URL is a secret (Slack puts a token in its path): only
its scheme and host are ever logged.
"""
from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta

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
NEXT_PENDING = """
SELECT source_id, position, id, payload::text FROM alert_outbox
WHERE sent_at IS NULL
ORDER BY created_at, event_at, source_id, position
LIMIT 1
FOR UPDATE SKIP LOCKED
"""
MARK_SENT = "UPDATE alert_outbox SET sent_at = now() WHERE source_id = %s AND position = %s"
COUNT_PENDING = "SELECT count(*) FROM alert_outbox WHERE sent_at IS NULL"


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
    """The receiver did not answer 2xx in time; the message never contains the URL."""


def post_json(url: str, body: bytes, timeout: float) -> None:
    """POST one alert; DeliveryFailed unless the receiver answers 2xx within `timeout` s."""
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) checked in settings
            response.read(65536)
            status = response.status
    except urllib.error.HTTPError as exc:
        raise DeliveryFailed(f"HTTP {exc.code}") from None
    except TimeoutError:
        raise DeliveryFailed(f"no answer within {timeout:g} s") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise DeliveryFailed(f"no answer within {timeout:g} s") from None
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else type(reason).__name__
        raise DeliveryFailed(str(text)) from None
    except (OSError, ValueError) as exc:  # connection reset, bad status line...
        raise DeliveryFailed(type(exc).__name__) from None
    if not 200 <= status < 300:
        raise DeliveryFailed(f"HTTP {status}")


@dataclass(frozen=True)
class SenderTiming:
    """How patient the sender is; tests shrink these so an outage takes seconds."""

    request_timeout: float = 5.0     # per POST
    first_backoff: float = 0.5       # after a failure; doubles up to max_backoff
    max_backoff: float = 30.0
    poll_seconds: float = 5.0        # look at the outbox at least this often (other writers)


class AlertSender:
    """A thread that delivers the outbox to the webhook, in order, and marks what it sent.

    `wake()` (called by the consumer after a batch that queued alerts has committed) starts a
    delivery at once, so an alert follows its event by milliseconds; otherwise it looks every
    `poll_seconds`. `metrics` has `alert_sent()` and `alerts_pending(n)` (metrics.Metrics).
    """

    def __init__(self, database: DatabaseSettings, url: str, timing: SenderTiming = SenderTiming(),
                 metrics=None):
        self.url = url
        self.timing = timing
        self.metrics = metrics
        self.db = load.LazyConnection(database)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alert-sender", daemon=True)
        self._trouble: str | None = None  # what is wrong now, logged once per outage

    def start(self) -> None:
        log.info("alerts: fresh emergencies are POSTed to %s", shown_url(self.url))
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
            delivered = self._attempt()
            if final:
                break
            if delivered:
                delay = self.timing.first_backoff
                self._wake.wait(self.timing.poll_seconds)
                continue
            if self._stop.wait(delay):  # a wake does not cut a backoff short; a stop does
                break
            delay = min(delay * 2, self.timing.max_backoff)

    def _attempt(self) -> bool:
        """One delivery round; False (logged once per outage) when it has to be retried."""
        try:
            self._deliver_pending()
        except DeliveryFailed as exc:
            self._report(f"the receiver at {shown_url(self.url)} failed ({exc})")
            return False
        except (psycopg2.Error, load.DatabaseError) as exc:
            self.db.drop()
            self._report(f"the database is unavailable to the sender ({first_line(exc)})")
            return False
        self._recovered()
        return True

    def _deliver_pending(self) -> None:
        """Send pending alerts one by one until none is left (or another sender holds it)."""
        conn = self.db.get()
        while True:
            with load.transaction(conn) as cur:
                cur.execute(NEXT_PENDING)
                row = cur.fetchone()
                if row is None:
                    cur.execute(COUNT_PENDING)
                    self._set_pending(cur.fetchone()[0])
                    return
                source_id, position, alert, payload = row
                post_json(self.url, payload.encode(), self.timing.request_timeout)
                cur.execute(MARK_SENT, (source_id, position))
            log.info("alert delivered: %s", alert)
            if self.metrics is not None:
                self.metrics.alert_sent()

    def _set_pending(self, count: int) -> None:
        if self.metrics is not None:
            self.metrics.alerts_pending(count)

    def _report(self, trouble: str) -> None:
        if trouble != self._trouble:
            log.warning("alerts held: %s; retrying with backoff", trouble)
        self._trouble = trouble
        try:
            with load.transaction(self.db.get()) as cur:
                cur.execute(COUNT_PENDING)
                self._set_pending(cur.fetchone()[0])
        except (psycopg2.Error, load.DatabaseError):
            self.db.drop()

    def _recovered(self) -> None:
        if self._trouble is not None:
            log.info("alerts: delivering again; every held alert has been sent")
            self._trouble = None
