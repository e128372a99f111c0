"""ops/alertmanager/alertmanager.yml in a real Alertmanager (Debian's prometheus-alertmanager):
who hears what (SPEC §4.1, issue 18).

`amtool check-config` (make lint) only says the file parses. Here the shipped routes, receivers
and inhibition run in Alertmanager itself, its webhook URLs read from files (as at install)
that point at local receivers: a page reaches the on-call channel and the data team, a ticket
only the data team, the Watchdog only the dead man's switch, and a page that the database
outage explains is inhibited. The test's copy shortens only the group waits.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from test_consumer import wait_for
from test_paging import Receiver

import localstack

PROJECT = Path(__file__).resolve().parent.parent
CONFIG = PROJECT / "ops" / "alertmanager" / "alertmanager.yml"
SECRETS = "/etc/alertmanager/secrets/"
RECEIVERS = {"oncall-slack-url": "on-call", "datateam-slack-url": "data-team",
             "watchdog-url": "watchdog"}
SHORTER = {"group_wait: 30s": "group_wait: 1s", "group_wait: 10s": "group_wait: 1s"}


def alertmanager_binary() -> str:
    found = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("Alertmanager is not installed: .ci/run installs prometheus-alertmanager")
        pytest.skip("Alertmanager not installed (apt-get install prometheus-alertmanager)")
    return found


@pytest.fixture
def alertmanager(tmp_path):
    """The shipped configuration in a real Alertmanager; (its API URL, receivers by name)."""
    binary = alertmanager_binary()
    receivers = {name: Receiver() for name in RECEIVERS.values()}
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for file, name in RECEIVERS.items():
        (secrets / file).write_text(receivers[name].url)
    text = CONFIG.read_text()
    assert text.count(f"api_url_file: {SECRETS}") == len(RECEIVERS)
    text = text.replace(SECRETS, f"{secrets}/")
    for shipped, shorter in SHORTER.items():
        assert shipped in text, f"{CONFIG} no longer has {shipped!r}: update SHORTER"
        text = text.replace(shipped, shorter)
    config = tmp_path / "alertmanager.yml"
    config.write_text(text)
    port = localstack.free_port()
    with open(tmp_path / "alertmanager.log", "wb") as log:
        proc = subprocess.Popen([binary, f"--config.file={config}",
                                 f"--storage.path={tmp_path / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}",
                                 "--cluster.listen-address="],
                                stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: ready(api) or proc.poll() is not None, 30, "Alertmanager ready")
        assert proc.poll() is None, (tmp_path / "alertmanager.log").read_text()
        yield api, receivers
    finally:
        proc.terminate()
        proc.wait(10)
        for receiver in receivers.values():
            receiver.close()


def ready(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/-/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def post_alerts(api: str, alerts: list[dict]) -> None:
    request = urllib.request.Request(f"{api}/api/v2/alerts", data=json.dumps(alerts).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


def alert(name: str, severity: str, summary: str) -> dict:
    return {"labels": {"alertname": name, "severity": severity, "instance": "lmnh-vm:9108"},
            "annotations": {"summary": summary, "description": f"{summary} (description)"}}


def slack_titles(receiver: Receiver) -> list[str]:
    return [a.get("title", "") for body in receiver.accepted() for a in body.get("attachments", [])]


def test_pages_tickets_and_the_watchdog_reach_who_the_shipped_routes_say(alertmanager):
    api, receivers = alertmanager
    post_alerts(api, [alert("LmnhDatabaseDown", "page", "PostgreSQL unreachable"),
                      alert("LmnhAlertsPending", "page", "Emergency alerts undelivered"),
                      alert("LmnhBatchFailed", "ticket", "The last batch run failed"),
                      alert("Watchdog", "none", "Alerting pipeline alive")])

    # delivered, through the URLs read from the secret files, as Slack messages
    wait_for(lambda: "PAGE: PostgreSQL unreachable" in slack_titles(receivers["on-call"]), 60,
             "the page in the on-call channel")
    wait_for(lambda: {"LmnhDatabaseDown: PostgreSQL unreachable",
                      "LmnhBatchFailed: The last batch run failed"}
             <= set(slack_titles(receivers["data-team"])), 60,
             "the page and the ticket in the data team's channel")
    wait_for(lambda: receivers["watchdog"].accepted(), 60, "the Watchdog at the switch")
    assert "Watchdog" in receivers["watchdog"].accepted()[0]["attachments"][0]["text"]

    # who gets which group, and what is inhibited, from Alertmanager's own view
    routed: dict[str, set[str]] = {}
    for group in get_json(f"{api}/api/v2/alerts/groups"):
        for item in group["alerts"]:
            routed.setdefault(item["labels"]["alertname"], set()).add(group["receiver"]["name"])
    assert routed["LmnhDatabaseDown"] == {"on-call", "data-team"}
    assert routed["LmnhBatchFailed"] == {"data-team"}
    assert routed["Watchdog"] == {"watchdog"}
    states = {a["labels"]["alertname"]: a["status"] for a in get_json(f"{api}/api/v2/alerts")}
    assert states["LmnhAlertsPending"]["state"] == "suppressed"
    assert states["LmnhAlertsPending"]["inhibitedBy"]  # the database outage explains it
    assert states["LmnhDatabaseDown"]["state"] == "active"
    assert not any("Emergency alerts undelivered" in title
                   for r in receivers.values() for title in slack_titles(r))
