"""TLS to PostgreSQL (SPEC §4): DB_SSLMODE and DB_SSLROOTCERT on every database connection.

Against a server that accepts only TLS (the `tls_postgres` fixture: Debian's PostgreSQL,
`hostssl` lines only, a certificate from a CA the session makes), as RDS with its defaults:
every entry point works with verify-full, a CA that did not sign the server is one line naming
DB_SSLROOTCERT and exit 1 from each, and a plaintext connection is refused by the server.
"""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import nbformat
import psycopg2
import pytest
from nbclient import NotebookClient

import load
import localstack
import sample_data
import simulator
from conftest import create_topic
from helpers import scalar, table_counts

PROJECT = Path(__file__).resolve().parent.parent
SSL_IN_USE = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


def tls_env(db, s3_settings, kafka_settings, **extra: str) -> dict[str, str]:
    """Every service configured explicitly (no LMNH_STACK): the TLS database with
    verify-full, the local stack's S3 and Kafka named by their addresses."""
    return {**os.environ, "DB_HOST": db.host, "DB_PORT": str(db.port), "DB_NAME": db.name,
            "DB_USER": db.user, "DB_PASS": db.password, "DB_SSLMODE": "verify-full",
            "DB_SSLROOTCERT": db.sslrootcert, "AWS_ENDPOINT_URL_S3": s3_settings.endpoint_url,
            "AWS_ACCESS_KEY": s3_settings.access_key,
            "AWS_SECRET_ACCESS_KEY": s3_settings.secret_key,
            "BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers, **extra}


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=PROJECT, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The lines that report a failure: a log line at ERROR, or a shell script's `error:`."""
    return [line for line in (result.stdout + result.stderr).splitlines()
            if " ERROR " in line or line.startswith(("error:", "psql: error:"))]


ENTRY_POINTS = {
    "pipeline": [sys.executable, "pipeline.py", "--no-progress"],
    "consumer": [sys.executable, "consumer.py", "--stop-at-end", "--topic", "lmnh-tls-unused"],
    "replay": [sys.executable, "replay.py"],
    "connect.sh": ["bash", "connect.sh", "-X", "-c", "SELECT 1"],
    "reset.sh": ["bash", "reset.sh", "-y", "schema.sql"],
}


def test_every_entry_point_works_with_verify_full(tls_db, s3, bucket, s3_settings,
                                                  kafka_settings, monkeypatch):
    env = tls_env(tls_db, s3_settings, kafka_settings, BUCKET=bucket)
    reset = run(["bash", "reset.sh", "-y", "schema.sql"], env)
    assert reset.returncode == 0, reset.stderr
    assert f"reset {tls_db.name} on 127.0.0.1" in reset.stdout

    sample_data.seed_bucket(s3, bucket, objects=1, rows=300, seed=11)
    batch = run([sys.executable, "pipeline.py", "--no-progress"], env)
    assert batch.returncode == 0, batch.stderr
    assert "1 seen, 1 loaded" in batch.stdout

    topic = create_topic(kafka_settings, 1)
    assert simulator.send_messages(kafka_settings, topic,
                                   sample_data.generate_messages(40, seed=3)) == 40
    stream = run([sys.executable, "consumer.py", "--stop-at-end", "--topic", topic,
                  "--group", f"tls-{uuid.uuid4().hex[:8]}", "--session-timeout-ms", "6000"], env)
    assert stream.returncode == 0, stream.stderr
    assert "consumer summary: 40 messages" in stream.stderr

    replay = run([sys.executable, "replay.py"], env)
    assert replay.returncode == 0, replay.stderr
    assert "replay summary" in replay.stdout

    psql = run(["bash", "connect.sh", "-X", "-A", "-t", "-c", SSL_IN_USE], env)
    assert (psql.returncode, psql.stdout.strip()) == (0, "t"), psql.stderr

    # every row the entry points wrote arrived over TLS (the server accepts nothing else);
    # the consumer's alert sender and the batch use the same connections, checked here too
    conn = load.connect(tls_db)
    lazy = load.LazyConnection(tls_db)
    try:
        assert scalar(conn, SSL_IN_USE) is True and scalar(lazy.get(), SSL_IN_USE) is True
        counts = table_counts(conn)
        assert sum(counts.values()) >= 300 + 40
        assert scalar(conn, "SELECT count(*) FROM kafka_offset") == 1
    finally:
        conn.close()
        lazy.drop()

    # the notebook connects as the entry points do (its first code cell opens the connection)
    for key in ("DB_HOST", "DB_PORT", "DB_NAME", "DB_USER", "DB_PASS", "DB_SSLMODE",
                "DB_SSLROOTCERT"):
        monkeypatch.setenv(key, env[key])
    notebook = nbformat.read(PROJECT / "analysis.ipynb", as_version=4)
    notebook.cells = [next(c for c in notebook.cells if c.cell_type == "code")]
    notebook.cells.append(nbformat.v4.new_code_cell(f"print('SSL', query({SSL_IN_USE!r}).ssl[0])"))
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(PROJECT)}}).execute()
    printed = [o.text for c in notebook.cells for o in c.outputs if o.output_type == "stream"]
    assert "SSL True" in "".join(printed)


@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_a_ca_that_did_not_sign_the_server_is_one_line_and_exit_1(
        entry_point, tls_postgres, tls_db, s3_settings, kafka_settings):
    wrong_ca = str(tls_postgres["wrong_ca"])
    env = tls_env(tls_db, s3_settings, kafka_settings, DB_SSLROOTCERT=wrong_ca)
    result = run(ENTRY_POINTS[entry_point], env)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    [line] = error_lines(result)
    assert f"server certificate does not verify against DB_SSLROOTCERT={wrong_ca}" in line
    assert "certificate verify failed" in line
    assert tls_db.password not in output


@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_a_certificate_for_another_host_is_one_line_and_exit_1(entry_point, tls_db, s3_settings,
                                                                kafka_settings):
    """verify-full checks the host name too: DB_HOST names a host the certificate (from the
    trusted CA, for 127.0.0.1 and localhost) is not for. libpq's PGHOSTADDR reaches the same
    server, as a DNS alias or a private endpoint would."""
    env = tls_env(tls_db, s3_settings, kafka_settings, DB_HOST="pg.museum.example",
                  PGHOSTADDR="127.0.0.1")
    result = run(ENTRY_POINTS[entry_point], env)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    [line] = error_lines(result)
    assert "server certificate is not for DB_HOST=pg.museum.example" in line, line
    assert tls_db.password not in output


def test_the_server_refuses_plaintext(tls_db, s3_settings, kafka_settings):
    """The fixture is TLS-only, as RDS with rds.force_ssl=1: without encryption no login."""
    plain = {**tls_db.connect_kwargs(), "sslmode": "disable"}
    with pytest.raises(psycopg2.OperationalError, match="no encryption"):
        psycopg2.connect(**plain).close()
    env = tls_env(tls_db, s3_settings, kafka_settings, DB_SSLMODE="disable")
    batch = run([sys.executable, "pipeline.py", "--no-progress"], env)
    assert batch.returncode == 1 and "Traceback" not in batch.stderr
    [line] = error_lines(batch)
    assert "the server accepts only TLS connections (DB_SSLMODE=disable)" in line
    psql = run(["bash", "connect.sh", "-X", "-c", "SELECT 1"], env)
    assert psql.returncode == 2 and "no encryption" in psql.stderr


@pytest.mark.parametrize("sslmode", ["prefer", "verify-full"])
def test_with_only_the_embedded_psql_a_tls_server_names_the_package_to_install(
        sslmode, tls_db, s3_settings, kafka_settings, tmp_path):
    """No system psql on PATH (a VM without postgresql-client): the embedded psql has no TLS,
    so connect.sh says what to install instead of psql's "no encryption"."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname"):
        (bin_dir / tool).symlink_to(subprocess.check_output(["which", tool], text=True).strip())
    env = tls_env(tls_db, s3_settings, kafka_settings, DB_SSLMODE=sslmode, PATH=str(bin_dir))
    result = run([str(bin_dir / "bash"), "connect.sh", "-X", "-c", "SELECT 1"], env)
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = error_lines(result)
    assert "install the postgresql-client package" in line and f"DB_SSLMODE={sslmode}" in line


def test_psql_env_hands_psql_the_tls_settings_and_the_system_psql(tls_db, s3_settings,
                                                                  kafka_settings):
    result = run([sys.executable, "localstack.py", "psql-env"],
                 tls_env(tls_db, s3_settings, kafka_settings))
    assert result.returncode == 0, result.stderr
    exports = dict(line.removeprefix("export ").split("=", 1)
                   for line in result.stdout.splitlines())
    assert exports["PGSSLMODE"] == "verify-full"
    assert exports["PGSSLROOTCERT"] == tls_db.sslrootcert
    assert exports["LMNH_PSQL"] != str(localstack._pg_bin() / "psql")


@pytest.mark.parametrize("script", ["connect.sh", "reset.sh"])
def test_sslrootcert_system_reaches_psql_as_the_machines_roots(script, tls_postgres, tls_db,
                                                               s3_settings, kafka_settings):
    """DB_SSLROOTCERT=system is libpq 16's name for the machine's trusted roots; Debian 12's
    psql (libpq 15) takes it for a file name. The roots here are the session's CA, made the
    machine's through OpenSSL's SSL_CERT_FILE (which `system` obeys), so the server verifies
    only if psql really gets them."""
    env = tls_env(tls_db, s3_settings, kafka_settings, DB_SSLROOTCERT="system",
                  SSL_CERT_FILE=tls_db.sslrootcert)
    argv = {"connect.sh": ["bash", "connect.sh", "-X", "-A", "-t", "-c", SSL_IN_USE],
            "reset.sh": ["bash", "reset.sh", "-y", "schema.sql"]}[script]
    result = run(argv, env)
    assert result.returncode == 0, result.stderr
    if script == "connect.sh":
        assert result.stdout.strip() == "t"
    else:
        assert f"reset {tls_db.name} on 127.0.0.1" in result.stdout
    # the probe before psql sends no password and reads no password file, silently
    assert "password file" not in result.stderr, result.stderr

    exports = run([sys.executable, "localstack.py", "psql-env"], env)
    assert f"export PGSSLROOTCERT={tls_db.sslrootcert}" in exports.stdout

    # with roots that do not include the session's CA the same server does not verify
    refused = run(argv, tls_env(tls_db, s3_settings, kafka_settings, DB_SSLROOTCERT="system",
                                SSL_CERT_FILE=str(tls_postgres["wrong_ca"])))
    assert refused.returncode == 1
    assert "does not verify against DB_SSLROOTCERT=system (" in refused.stdout + refused.stderr


def test_sslrootcert_system_is_the_machines_bundle_for_the_python_entry_points(
        tls_db, s3, bucket, s3_settings, kafka_settings, monkeypatch, capsys):
    """psycopg2-binary's own OpenSSL looks for the machine's roots in the folder it was built
    in (/host/tmp/libpq.build), so libpq's `system` alone trusts nothing there; the settings
    hand libpq the machine's bundle file instead. The machine's bundle is the session's CA
    here (SSL_CERT_FILE unset)."""
    import pipeline
    import settings
    monkeypatch.setattr(settings, "SYSTEM_CA_BUNDLES", ("/nonexistent/ca.crt", tls_db.sslrootcert))
    for key, value in tls_env(tls_db, s3_settings, kafka_settings, DB_SSLROOTCERT="system",
                              BUCKET=bucket).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    conn = load.connect(tls_db)
    try:
        load.apply_schema(conn, settings.SCHEMA_FILE.read_text())
    finally:
        conn.close()
    sample_data.seed_bucket(s3, bucket, objects=1, rows=50, seed=5)
    assert pipeline.main(["--no-progress"]) == 0
    assert "1 seen, 1 loaded" in capsys.readouterr().out
