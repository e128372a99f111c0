"""Nothing waits forever; transient database errors are waited out (SPEC §3.1, §4).

Another session's lock, a failover to a read-only server, a broker that does not speak the
configured protocol: each is made for real here (a second session holding LOCK TABLE,
ALTER DATABASE ... SET default_transaction_read_only, SASL_SSL against the plaintext local
broker), and the consumer and the batch run are run as the operator runs them.
"""
from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql
from test_consumer import (
    assert_exact,
    group_name,
    log_text,
    next_offsets,
    produce,
    progress,
    spawn,  # noqa: F401 - the fixture
    stop,
    wait_for,
)

import load
import localstack
import sample_data
from helpers import rows, run_consumer_in_process, scalar, table_counts

PROJECT = Path(__file__).resolve().parent.parent
KIOSK_OBJECT = b"at,site,val,type\n2023-03-06 10:00:00,1,3,\n2023-03-06 10:00:01,2,-1,0\n"
WAITING = "holding the batch"  # the consumer's one line when the database goes away


def session(db, autocommit: bool = False):
    """A plain session of someone else's (an analyst's psql, a migration): no timeouts."""
    conn = psycopg2.connect(**{**db.connect_kwargs(), "application_name": "lmnh-test-other"})
    conn.autocommit = autocommit
    return conn


def error_of(conn, *statements: str) -> BaseException:
    """The error the last statement raises (the others prepare it), the transaction rolled back."""
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    except psycopg2.Error as exc:
        return exc
    finally:
        if not conn.closed:
            conn.rollback()
    raise AssertionError(f"no error from {statements[-1]}")


# --------------------------------------------------------------------------- sessions
def test_loader_sessions_bound_every_wait(conn):
    """SPEC §3.1: connect timeout, TCP keepalives, lock / statement / idle timeouts."""
    assert scalar(conn, "SHOW lock_timeout") == "5s"
    assert scalar(conn, "SHOW statement_timeout") == "5min"
    assert scalar(conn, "SHOW idle_in_transaction_session_timeout") == "2min"
    dsn = conn.get_dsn_parameters()
    assert (dsn["connect_timeout"], dsn["keepalives"], dsn["keepalives_idle"],
            dsn["keepalives_interval"], dsn["keepalives_count"]) == ("10", "1", "30", "10", "3")


def test_transient_database_errors_are_told_from_permanent_ones(db, conn):
    """load.is_transient on errors the server really raises: what waiting (and a new session)
    can fix is retried, the rest stops a run."""
    with load.transaction(conn) as cur:
        cur.execute("INSERT INTO floor (floor_name) VALUES ('Roof')")
    other = session(db)
    try:
        transient = {
            "read-only (failover to a replica)": error_of(
                conn, "SET TRANSACTION READ ONLY", "INSERT INTO floor (floor_name) VALUES ('x')"),
            "statement timeout": error_of(conn, "SET LOCAL statement_timeout = '50ms'",
                                          "SELECT pg_sleep(2)"),
            "serialization failure": _serialization_failure(conn, other),
            "lock timeout": _lock_timeout(conn, other),
        }
        permanent = {
            "undefined table": error_of(conn, "SELECT * FROM no_such_table"),
            "bad data": error_of(conn, "SELECT 'x'::int"),
            "permission denied": _permission_denied(conn),
        }
        with other.cursor() as cur:  # a server shutting the session down (admin_shutdown)
            cur.execute("SELECT pg_terminate_backend(%s)", (conn.get_backend_pid(),))
        transient["session terminated"] = error_of(conn, "SELECT 1")
    finally:
        other.close()
    conn.close()
    transient["connection closed"] = error_of(conn, "SELECT 1")
    with pytest.raises(load.DatabaseError) as refused:
        load.connect(replace(db, port=localstack.free_port()))
    transient["server not listening"] = refused.value
    with pytest.raises(load.DatabaseError) as missing:
        load.connect(replace(db, name=f"{db.name}_missing"))
    permanent["no such database"] = missing.value

    assert {name: load.is_transient(exc) for name, exc in transient.items()} == \
        dict.fromkeys(transient, True)
    assert {name: load.is_transient(exc) for name, exc in permanent.items()} == \
        dict.fromkeys(permanent, False)
    assert not load.is_transient(ValueError("not a database error"))
    assert transient["lock timeout"].pgcode == "55P03"
    assert "kafka_offset" in load.describe_error(transient["lock timeout"])


def _serialization_failure(conn, other) -> BaseException:
    """Two repeatable-read transactions update one row: the later one cannot serialise."""
    with conn.cursor() as cur:
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        cur.execute("SELECT floor_id FROM floor WHERE floor_name = 'Roof'")
    with other.cursor() as cur:
        cur.execute("UPDATE floor SET floor_name = 'Roof' WHERE floor_name = 'Roof'")
    other.commit()
    return error_of(conn, "UPDATE floor SET floor_name = 'Roof' WHERE floor_name = 'Roof'")


def _lock_timeout(conn, other) -> BaseException:
    with other.cursor() as cur:
        cur.execute("LOCK TABLE kafka_offset IN ACCESS EXCLUSIVE MODE")
    try:
        return error_of(conn, "SET LOCAL lock_timeout = '50ms'",
                        "SELECT next_offset FROM kafka_offset")
    finally:
        other.rollback()


def _permission_denied(conn) -> BaseException:
    role = f"lmnh_nobody_{os.urandom(4).hex()}"
    try:
        return error_of(conn, f"CREATE ROLE {role}", f"SET LOCAL ROLE {role}",
                        "SELECT * FROM kafka_offset")
    finally:
        conn.rollback()  # the role was created in the rolled-back transaction: nothing to drop


# --------------------------------------------------------------------------- consumer
@pytest.mark.slow
def test_a_lock_held_by_another_session_delays_the_consumer_but_sigterm_stops_it(
        kafka_settings, topic, service_env, db, conn, spawn):  # noqa: F811 - the fixture
    """SPEC §3.1: a session of someone else's holding a lock the consumer needs delays it,
    with one log line, but never makes it deaf to SIGTERM (it stops within 10 s, losing
    nothing); once the lock is gone a rerun stores everything exactly once."""
    placed = produce(kafka_settings, topic, sample_data.generate_messages(500, seed=41))
    group = group_name()
    holder = session(db)
    try:
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE kafka_offset IN ACCESS EXCLUSIVE MODE")
        proc = spawn("--topic", topic, "--group", group)
        wait_for(lambda: WAITING in log_text(proc), 60, "the lock wait to be noticed", proc)
        time.sleep(2)  # into the retries: back in a lock wait or in the backoff
        try:
            code, seconds = stop(proc, timeout=10)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running 10 s after SIGTERM:\n{log_text(proc)}") from None
    finally:
        holder.rollback()
        holder.close()
    text = log_text(proc)
    assert code == 0, text
    assert "Traceback" not in text
    waiting = [line for line in text.splitlines() if WAITING in line]
    assert len(waiting) == 1, text  # one line, not one per retry
    assert "lock timeout" in waiting[0] and "kafka_offset" in waiting[0], waiting[0]
    assert sum(table_counts(conn).values()) == 0  # nothing of the batch committed
    assert next_offsets(conn, topic) == {}        # and no offset moved
    drain = spawn("--topic", topic, "--group", group, "--stop-at-end", name="drain")
    assert drain.wait(60) == 0, log_text(drain)
    assert_exact(conn, topic, placed)


@pytest.mark.slow
def test_failover_to_a_read_only_server_is_waited_out_like_an_outage(
        kafka_settings, topic, service_env, db, conn, spawn):  # noqa: F811 - the fixture
    """New sessions that can only read (a replica promoted late, a failover in progress) are
    a transient outage: the batch is held, one line says so, and it is stored once the
    server takes writes again."""
    payloads = sample_data.generate_messages(1000, seed=42)
    placed = produce(kafka_settings, topic, payloads[:500])
    proc = spawn("--topic", topic, "--group", group_name(), "--batch-size", "100")
    wait_for(lambda: progress(conn, topic) == 500, 60, "the first 500 messages", proc)
    admin = session(db, autocommit=True)
    try:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on")
                        .format(sql.Identifier(db.name)))
            # the failover: the consumer's session ends and its next one can only read
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                        "datname = %s AND application_name = 'lmnh-pipeline' AND pid <> %s",
                        (db.name, conn.get_backend_pid()))
        placed.update(produce(kafka_settings, topic, payloads[500:]))
        wait_for(lambda: WAITING in log_text(proc), 30, "the failover to be noticed", proc)
        time.sleep(3)  # several retries, each in a new session that can only read
        assert proc.poll() is None, log_text(proc)
        assert progress(conn, topic) == 500
    finally:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only")
                        .format(sql.Identifier(db.name)))
        admin.close()
    wait_for(lambda: progress(conn, topic) == 1000, 60, "the rest after the failover", proc,
             interval=0.2)
    code, _ = stop(proc)
    text = log_text(proc)
    assert code == 0, text
    assert_exact(conn, topic, placed)
    assert text.count(WAITING) == 1, text
    assert text.count("database is back") == 1, text
    assert "Traceback" not in text


def test_what_waiting_cannot_fix_mid_run_still_exits_1_with_one_line(
        kafka_settings, topic, service_env, conn, caplog):
    """A column gone (42703: a schema the code does not match) is not an outage: no
    retries, exit 1, one ERROR line."""
    produce(kafka_settings, topic, sample_data.generate_messages(10, seed=43))
    with load.transaction(conn) as cur:
        cur.execute("ALTER TABLE kafka_offset RENAME COLUMN next_offset TO next_offset_gone")
    caplog.set_level("INFO")
    assert run_consumer_in_process("--topic", topic, "--group", group_name(),
                                   "--stop-at-end") == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    assert "next_offset" in errors[0] and "does not exist" in errors[0], errors[0]
    assert not any(WAITING in r.getMessage() for r in caplog.records)


def test_sasl_ssl_against_a_plaintext_broker_says_so_in_one_line(kafka_settings, service_env):
    """SPEC §4: a broker that does not speak SECURITY_PROTOCOL is a setting no waiting fixes;
    today's librdkafka just hangs in the TLS handshake. The bound is shortened for the test."""
    env = {**os.environ, "SECURITY_PROTOCOL": "SASL_SSL", "USERNAME": "kiosk",
           "PASSWORD": "s3cret-Pa55word"}
    program = ("import sys, consumer; consumer.PROTOCOL_CHECK_SECONDS = 3.0; "
               "sys.exit(consumer.main(['--topic', 'lmnh-unused', '--group', 'g-protocol']))")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", program], cwd=PROJECT, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 20
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    assert "SECURITY_PROTOCOL=SASL_SSL" in errors[0] and "does not speak" in errors[0]
    assert kafka_settings.bootstrap_servers in errors[0]
    assert "Traceback" not in result.stderr
    assert "s3cret-Pa55word" not in result.stderr + result.stdout


# --------------------------------------------------------------------------- batch run
def test_pipeline_blocked_by_a_lock_exits_1_with_one_line_and_a_rerun_loads(
        s3, bucket, service_env, db, conn):
    """SPEC §4: the batch run cannot wait for another session's lock forever either."""
    s3.put_object(Bucket=bucket, Key="lmnh_hist_data_0.csv", Body=KIOSK_OBJECT)
    command = [sys.executable, "pipeline.py", "-b", bucket, "--no-progress"]
    holder = session(db)
    try:
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE rating_interaction IN ACCESS EXCLUSIVE MODE")
        result = subprocess.run(command, cwd=PROJECT, env=dict(os.environ),
                                capture_output=True, text=True, timeout=40)
    finally:
        holder.rollback()
        holder.close()
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    assert "lock" in errors[0] and "rating_interaction" in errors[0], errors[0]
    assert "Traceback" not in result.stderr
    assert sum(table_counts(conn).values()) == 0
    rerun = subprocess.run(command, cwd=PROJECT, env=dict(os.environ), capture_output=True,
                           text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    assert table_counts(conn) == {"rating_interaction": 1, "request_interaction": 1,
                                  "rejected_event": 0}


def test_pipeline_waits_longer_than_the_lock_timeout_for_a_run_loading_the_same_object(
        s3, bucket, service_env, db, conn):
    """Concurrent runs wait for each other's object lock for as long as an object takes to
    load (bounded by the statement timeout), not just load.LOCK_TIMEOUT."""
    s3.put_object(Bucket=bucket, Key="lmnh_hist_data_0.csv", Body=KIOSK_OBJECT)
    with load.transaction(conn) as cur:
        source = load.source_id(cur, "s3", f"s3://{bucket}/lmnh_hist_data_0.csv")
    other = session(db)
    with other.cursor() as cur:  # as another run holds it while it loads a big object
        cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (0x4C4D, source))
    release = threading.Timer(7, other.rollback)
    release.start()
    started = time.monotonic()
    try:
        result = subprocess.run([sys.executable, "pipeline.py", "-b", bucket, "--no-progress"],
                                cwd=PROJECT, env=dict(os.environ), capture_output=True,
                                text=True, timeout=60)
    finally:
        release.join()
        other.close()
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started >= 7
    assert rows(conn, "SELECT uri FROM s3_object_load JOIN event_source USING (source_id)") \
        == [(f"s3://{bucket}/lmnh_hist_data_0.csv",)]


@pytest.fixture
def tls_listener(tmp_path):
    """A TLS server that is not a plaintext Kafka listener (as a SASL_SSL broker's port looks
    to a PLAINTEXT client): it drops every connection that does not start a TLS handshake."""
    cert, key = _self_signed_certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stopping = threading.Event()

    def serve() -> None:
        while not stopping.is_set():
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            client.settimeout(1)
            try:
                context.wrap_socket(client, server_side=True).close()
            except (ssl.SSLError, OSError):
                client.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stopping.set()
    thread.join(5)
    server.close()


def _self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_plaintext_against_a_tls_listener_says_so_in_one_line(service_env, tls_listener):
    """The reverse: a PLAINTEXT client at a TLS port is dropped in every handshake, which
    librdkafka only calls "brokers are down"; the consumer names SECURITY_PROTOCOL."""
    env = {**os.environ, "BOOTSTRAP_SERVERS": f"127.0.0.1:{tls_listener}"}
    program = ("import sys, consumer; consumer.PROTOCOL_CHECK_SECONDS = 3.0; "
               "sys.exit(consumer.main(['--topic', 'lmnh-unused', '--group', 'g-protocol']))")
    result = subprocess.run([sys.executable, "-c", program], cwd=PROJECT, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    assert "SECURITY_PROTOCOL=PLAINTEXT" in errors[0] and "does not speak" in errors[0]
    assert "Traceback" not in result.stderr
