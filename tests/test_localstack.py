"""The local stack: starts on demand, is shared between processes, reports status, stops."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest

import localstack
from settings import Settings, SettingsError, load_settings

PROJECT = Path(__file__).resolve().parent.parent


def test_session_stack_answers_on_every_service(stack):
    status = localstack.status()
    assert all(status[name]["running"] for name in localstack.SERVICES)
    conn = psycopg2.connect(**localstack.database_settings(stack["postgres"]).connect_kwargs())
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
        conn = psycopg2.connect(**localstack.database_settings(restarted["postgres"])
                                .connect_kwargs())
        conn.close()
    finally:
        localstack.down(state)


# --------------------------------------------------------------------------- passwords (SPEC §5)
def _refused(port: int, tmp_path: Path, password: str | None) -> str | None:
    """The error a login as the superuser gets without (or with a wrong) password; None if it
    got in. No ~/.pgpass and no PGPASSWORD may help it."""
    kwargs = {"host": "127.0.0.1", "port": port, "user": "postgres", "dbname": "postgres",
              "passfile": str(tmp_path / "no-pgpass"), "connect_timeout": 10}
    if password is not None:
        kwargs["password"] = password
    try:
        psycopg2.connect(**kwargs).close()
    except psycopg2.OperationalError as exc:
        return str(exc)
    return None


def _assert_secured(info: dict, tmp_path: Path) -> None:
    secret = Path(info["password_file"])
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert secret.stat().st_uid == os.geteuid()
    assert "no password supplied" in (_refused(info["port"], tmp_path, None) or "got in")
    assert "password authentication failed" in (
        _refused(info["port"], tmp_path, "not-the-password") or "got in")
    assert _refused(info["port"], tmp_path, secret.read_text().strip()) is None


def test_the_local_database_wants_the_password_kept_in_an_owner_only_file(stack, tmp_path,
                                                                          monkeypatch):
    monkeypatch.delenv("PGPASSWORD", raising=False)
    _assert_secured(stack["postgres"], tmp_path)
    # every project command finds it through resolve() ...
    settings = localstack.resolve(Settings(None, None, None), ("postgres",))
    conn = psycopg2.connect(**settings.database.connect_kwargs())
    conn.close()
    # ... and connect.sh through psql-env (psql reads it from its environment)
    result = subprocess.run(["bash", "connect.sh", "-X", "-A", "-t", "-c", "SELECT current_user"],
                            cwd=PROJECT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "postgres"


def _downgrade_to_an_older_local_folder(state: Path, info: dict) -> None:
    """What an older version left: trust on TCP, no superuser password, no password file."""
    conn = psycopg2.connect(**localstack.database_settings(info, "postgres").connect_kwargs())
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("ALTER ROLE postgres PASSWORD NULL")
        (Path(info["data"]) / "pg_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")
        localstack._reload_and_wait(cur)
    conn.close()
    localstack.password_file(state).unlink()
    stack_json = state / "stack.json"
    recorded = json.loads(stack_json.read_text())
    recorded["postgres"].pop("password_file")
    stack_json.write_text(json.dumps(recorded))


def test_an_older_trusting_local_folder_gets_a_password_running_or_stopped(tmp_path,
                                                                          monkeypatch):
    monkeypatch.delenv("PGPASSWORD", raising=False)
    state = tmp_path / "stack"
    info = localstack.up(("postgres",), state_dir=state)["postgres"]
    try:
        _downgrade_to_an_older_local_folder(state, info)
        assert _refused(info["port"], tmp_path, None) is None   # anyone gets in, as before
        again = localstack.up(("postgres",), state_dir=state)["postgres"]   # still running
        assert again["pid"] == info["pid"]
        _assert_secured(again, tmp_path)

        _downgrade_to_an_older_local_folder(state, again)
        localstack.down(state)
        restarted = localstack.up(("postgres",), state_dir=state)["postgres"]
        _assert_secured(restarted, tmp_path)
        conn = psycopg2.connect(**localstack.database_settings(restarted).connect_kwargs())
        conn.close()
    finally:
        localstack.down(state)


def test_psql_env_redacts_a_secret_pasted_into_the_wrong_setting(tmp_path):
    secret = "dbpass-Lk5S3cr3tPE"
    env = {**os.environ, "DB_HOST": "127.0.0.1", "DB_USER": "u", "DB_PASS": secret,
           "DB_PORT": secret}
    result = subprocess.run([sys.executable, "localstack.py", "psql-env"], cwd=PROJECT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("error: DB_PORT must be a port number"), result.stderr
    assert secret not in result.stdout + result.stderr


def test_a_lost_password_file_is_one_clear_error(tmp_path):
    state = tmp_path / "stack"
    info = localstack.up(("postgres",), state_dir=state)["postgres"]
    secret = localstack.password_file(state)
    kept = secret.read_text()
    try:
        secret.unlink()
        with pytest.raises(localstack.LocalStackError, match="wants a password but .* is missing"):
            localstack.up(("postgres",), state_dir=state)
        assert not secret.exists()   # no new password that the server does not know
        secret.write_text(kept)   # restored, but readable by all
        assert localstack.up(("postgres",), state_dir=state)["postgres"]["pid"] == info["pid"]
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    finally:
        localstack.down(state)


@pytest.mark.parametrize("env, needs, named", [
    ({"BOOTSTRAP_SERVERS": "kafka.example:9092"}, ("postgres", "s3"), "DB_HOST"),
    ({"DB_HOST": "db.example", "DB_USER": "u"}, ("postgres", "kafka"), "BOOTSTRAP_SERVERS"),
    ({"AWS_ENDPOINT_URL_S3": "https://s3.example"}, ("postgres",), "DB_HOST"),
])
def test_configured_services_stop_the_local_stack_standing_in(env, needs, named, tmp_path):
    """One service configured: a missing other is one line naming its setting, and nothing
    of the local stack is started or written (SPEC §4)."""
    with pytest.raises(SettingsError, match=f"^{named} is not set") as info:
        localstack.resolve(load_settings(env), needs, state_dir=tmp_path / "state")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "state").exists()


def test_with_a_database_configured_s3_without_keys_uses_the_credential_chain():
    settings = load_settings({"DB_HOST": "db.example", "DB_USER": "u"})
    assert settings.local_stack is False
    assert (settings.s3.access_key, settings.s3.secret_key, settings.s3.endpoint_url) == \
        (None, None, None)
    assert localstack.resolve(settings, ("postgres", "s3")) is settings


def test_psql_env_names_a_missing_database_setting(tmp_path):
    env = {**os.environ, "BOOTSTRAP_SERVERS": "kafka.example:9092"}
    result = subprocess.run([sys.executable, "localstack.py", "psql-env"], cwd=PROJECT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("error: DB_HOST is not set"), result.stderr
    assert result.stdout == ""
