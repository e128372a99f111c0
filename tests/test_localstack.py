"""The local stack: starts on demand, is shared between processes, reports status, stops."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg2

import localstack

PROJECT = Path(__file__).resolve().parent.parent


def test_session_stack_answers_on_every_service(stack):
    status = localstack.status()
    assert all(status[name]["running"] for name in localstack.SERVICES)
    conn = psycopg2.connect(host="127.0.0.1", port=stack["postgres"]["port"], user="postgres",
                            dbname="museum")
    with conn.cursor() as cur:
        cur.execute("SHOW server_version_num")
        assert int(cur.fetchone()[0]) >= 160000
    conn.close()


def test_a_second_process_shares_the_running_stack(stack):
    code = ("import json, localstack; "
            "print(json.dumps({k: v['port'] for k, v in localstack.up().items()}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True,
                            text=True, check=True)
    ports = json.loads(result.stdout.strip().splitlines()[-1])
    assert ports == {name: info["port"] for name, info in stack.items()}


def test_cli_status_reports_running_services(stack):
    result = subprocess.run([sys.executable, "localstack.py", "status"], cwd=PROJECT,
                            capture_output=True, text=True)
    assert result.returncode == 0
    for name in localstack.SERVICES:
        assert f"{name}" in result.stdout and "running" in result.stdout


def test_private_stack_starts_outlives_its_starter_and_stops(tmp_path):
    """A stack in another folder: started by one process, seen by another, then stopped."""
    state = tmp_path / "stack"
    starter = ("import sys, json, localstack; from pathlib import Path; "
               "print(json.dumps(localstack.up(state_dir=Path(sys.argv[1]))))")
    result = subprocess.run([sys.executable, "-c", starter, str(state)], cwd=PROJECT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    try:
        # the process that started them has exited; the services still answer
        status = localstack.status(state)
        assert all(status[name]["running"] for name in localstack.SERVICES)
        assert all(localstack.port_open(info[name]["port"]) for name in localstack.SERVICES)
        again = localstack.up(state_dir=state)
        assert {k: v["pid"] for k, v in again.items()} == {k: v["pid"] for k, v in info.items()}
    finally:
        stopped = localstack.down(state)
    assert sorted(stopped) == sorted(localstack.SERVICES)
    status = localstack.status(state)
    assert not any(status[name]["running"] for name in localstack.SERVICES)
    assert not any(localstack.port_open(info[name]["port"]) for name in localstack.SERVICES)
    # the database survives a restart
    restarted = localstack.up(("postgres",), state_dir=state)
    try:
        conn = psycopg2.connect(host="127.0.0.1", port=restarted["postgres"]["port"],
                                user="postgres", dbname="museum")
        conn.close()
    finally:
        localstack.down(state)
