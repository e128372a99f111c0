"""Shared fixtures: the real services, started once per session (SPEC §5's local stack).

Every test that needs a database gets a fresh one cloned from a template that has the schema,
every S3 test its own bucket and every Kafka test its own topic, so tests never see each
other's rows. The services stay up for the whole session and are stopped at the end only if
this session started them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import kafka_front
import psycopg2
import pytest
from confluent_kafka.admin import AdminClient, NewTopic
from psycopg2 import sql

import load
import localstack
import settings as settings_module
from settings import DatabaseSettings, KafkaSettings, S3Settings, Settings

PROJECT = Path(__file__).resolve().parent.parent
TEMPLATE_DB = f"lmnh_test_template_{os.getpid()}"  # per session: parallel runs share a server


@pytest.fixture(scope="session", autouse=True)
def isolated_environment():
    """Tests see no .env and no service settings from the shell: only what they set."""
    saved = dict(os.environ)
    for key in (*settings_module.SERVICE_KEYS, "LMNH_STACK", "TOPIC", "BUCKET"):
        os.environ.pop(key, None)
    os.environ["LMNH_ENV_FILE"] = os.devnull
    # the local broker: a group join takes about half the session timeout (45 s by default)
    os.environ["KAFKA_SESSION_TIMEOUT_MS"] = "6000"
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def stack():
    """The local stack's services (PostgreSQL, moto S3, Tansu Kafka), up for the session."""
    was_running = {name for name, info in localstack.status().items() if info["running"]}
    state = localstack.up()
    yield state
    if not was_running:
        localstack.down()


def admin_connection(where: dict | int):
    """The local superuser on a local stack's server (its state, or the project stack's port),
    with the password from the stack's owner-only file: no local login goes without one."""
    info = where if isinstance(where, dict) else {
        "port": where, "password_file": str(localstack.password_file(localstack.STATE_DIR))}
    conn = psycopg2.connect(**localstack.database_settings(info, "postgres").connect_kwargs())
    conn.autocommit = True
    return conn


@pytest.fixture(scope="session")
def template_db(stack):
    """A database with schema.sql applied, cloned for each test that needs a database."""
    conn = admin_connection(stack["postgres"])
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                    .format(sql.Identifier(TEMPLATE_DB)))
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE_DB)))
    conn.close()
    db = localstack.database_settings(stack["postgres"], TEMPLATE_DB)
    target = load.connect(db)
    load.apply_schema(target, (PROJECT / "schema.sql").read_text())
    target.close()
    yield db
    conn = admin_connection(stack["postgres"])
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                    .format(sql.Identifier(TEMPLATE_DB)))
    conn.close()


@pytest.fixture
def db(template_db, stack) -> DatabaseSettings:
    """A fresh database with the schema and master data, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    conn = admin_connection(stack["postgres"])
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(TEMPLATE_DB)))
    yield localstack.database_settings(stack["postgres"], name)
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    conn.close()


@pytest.fixture
def conn(db):
    connection = load.connect(db)
    yield connection
    connection.close()


def server_home(prefix: str) -> Path:
    """A folder for a PostgreSQL server that runs as the system user (as root): outside
    pytest's temporary folders, because any other pytest session starting on the machine sets
    /tmp/pytest-of-<user> back to mode 700 and so locks the server's user out of its own data
    (`pg_ctl stop`: Permission denied). The caller removes it."""
    return Path(tempfile.mkdtemp(prefix=prefix))


@pytest.fixture
def private_pg():
    """A PostgreSQL server of this test's own, with the schema, which the test may stop and
    start (localstack.pg_control) without disturbing any other test; yields (info, settings)."""
    home = server_home("lmnh-test-pg-")
    state_dir = home / "stack"
    try:
        info = localstack.up(("postgres",), state_dir=state_dir)["postgres"]
        db = localstack.database_settings(info)
        conn = load.connect(db)
        load.apply_schema(conn, (PROJECT / "schema.sql").read_text())
        conn.close()
        yield info, db
    finally:
        localstack.down(state_dir)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_settings(stack) -> S3Settings:
    return localstack.s3_settings(stack["s3"])


@pytest.fixture(scope="session")
def s3(s3_settings):
    return boto3.client("s3", endpoint_url=s3_settings.endpoint_url,
                        aws_access_key_id=s3_settings.access_key,
                        aws_secret_access_key=s3_settings.secret_key,
                        region_name=s3_settings.region)


@pytest.fixture
def bucket(s3) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": "eu-west-2"})
    return name


@pytest.fixture(scope="session")
def kafka_settings(stack) -> KafkaSettings:
    return localstack.kafka_settings(stack["kafka"])


def create_topic(kafka: KafkaSettings, partitions: int = 1) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    admin = AdminClient(kafka.client_config())
    admin.create_topics([NewTopic(name, partitions, 1)])[name].result(timeout=15)
    return name


@pytest.fixture
def topic(kafka_settings) -> str:
    return create_topic(kafka_settings, 1)


@pytest.fixture
def settings(db, s3_settings, kafka_settings) -> Settings:
    return Settings(database=db, s3=s3_settings, kafka=kafka_settings)


@pytest.fixture
def service_env(monkeypatch, db, s3_settings, kafka_settings):
    """Point the entry points (main(argv)) at this test's database, S3 and Kafka."""
    values = {"DB_HOST": db.host, "DB_PORT": str(db.port), "DB_NAME": db.name,
              "DB_USER": db.user, "DB_PASS": db.password,
              "AWS_ENDPOINT_URL_S3": s3_settings.endpoint_url,
              "AWS_ACCESS_KEY": s3_settings.access_key,
              "AWS_SECRET_ACCESS_KEY": s3_settings.secret_key,
              "BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


# --------------------------------------------------------------------------- TLS-only PostgreSQL
# The embedded server has no TLS (SPEC §5), so production's encrypted, verified connections are
# tested against Debian's `postgresql` package (.ci/run installs it, as it does prometheus).
DEBIAN_PG = Path("/usr/lib/postgresql")
TLS_HBA = ("# TLS only, as RDS with rds.force_ssl=1: no plain `host` line, so a connection\n"
           "# without encryption finds no entry and is refused.\n"
           "hostssl all all 127.0.0.1/32 scram-sha-256\n")


def debian_pg_bin() -> Path | None:
    """The newest installed server of Debian's packages (/usr/lib/postgresql/<ver>/bin)."""
    found = [p.parent for p in DEBIAN_PG.glob("*/bin/postgres")]
    return max(found, key=lambda b: int(b.parent.name) if b.parent.name.isdigit() else 0,
               default=None)


def openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> Path:
    """A CA of the test's own: key and self-signed certificate; returns the certificate."""
    folder.mkdir(parents=True, exist_ok=True)
    openssl(folder, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "3",
            "-subj", f"/CN=LMNH test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return folder / f"{name}.crt"


def make_server_cert(folder: Path, ca: Path) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 and localhost signed by `ca`; (cert, key)."""
    (folder / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                       "basicConstraints=CA:FALSE\n"
                                       "extendedKeyUsage=serverAuth\n")
    openssl(folder, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    openssl(folder, "x509", "-req", "-in", "server.csr", "-CA", str(ca),
            "-CAkey", str(ca.with_suffix(".key")), "-CAcreateserial", "-out", "server.crt",
            "-days", "3", "-extfile", "server.ext")
    (folder / "server.key").chmod(0o600)
    return folder / "server.crt", folder / "server.key"


def _debian_pg_ctl(bin_dir: Path, data: Path, user: str | None, *args: str
                   ) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), *args],
                          **localstack._as_user(user), capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="session")
def tls_postgres():
    """A PostgreSQL that accepts only TLS (`hostssl` lines only, scram-sha-256), with a server
    certificate signed by a CA this session makes; run as a system user, never as a Debian
    cluster (no pg_ctlcluster, nothing started at boot). Yields a dict: `admin`
    (DatabaseSettings of the superuser on database postgres, verify-full), `ca` and `wrong_ca`
    (certificate paths), `log`."""
    bin_dir = debian_pg_bin()
    if bin_dir is None:
        why = ("Debian's PostgreSQL server is not installed (no /usr/lib/postgresql/*/bin/postgres):"
               " apt-get install postgresql (.ci/run does)")
        if os.environ.get("CI"):  # .ci/run installs it: missing there is a failure
            pytest.fail(why)
        pytest.skip(why)
    home = server_home("lmnh-tls-pg-")
    certs = home / "certs"
    ca = make_ca(certs, "ca")
    wrong_ca = make_ca(home / "other", "wrong-ca")   # a CA that never signed the server
    cert, key = make_server_cert(certs, ca)
    user = localstack._pg_user()
    password = uuid.uuid4().hex
    (home / "pw").write_text(password + "\n")
    data = home / "data"
    if user:
        localstack._let_user_reach(home, user)
    result = subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres",
                             "--auth=scram-sha-256", f"--pwfile={home / 'pw'}",
                             "--encoding=UTF8", "--locale=C.UTF-8"],
                            **localstack._as_user(user), capture_output=True, text=True,
                            cwd=home, timeout=120)
    (home / "pw").unlink()
    assert result.returncode == 0, result.stderr
    port = localstack.free_port()
    (data / "postgresql.auto.conf").write_text(
        f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\n"
        f"ssl = on\nssl_cert_file = '{cert}'\nssl_key_file = '{key}'\nfsync = off\n"
        "full_page_writes = off\n")
    (data / "pg_hba.conf").write_text(TLS_HBA)
    if user:
        localstack._let_user_reach(home, user)
    log = home / "postgres.log"
    started = _debian_pg_ctl(bin_dir, data, user, "-l", str(log), "-w", "-t", "60", "start")
    assert started.returncode == 0, started.stderr + (log.read_text() if log.exists() else "")
    admin = DatabaseSettings(host="127.0.0.1", port=port, name="postgres", user="postgres",
                             password=password, sslmode="verify-full", sslrootcert=str(ca))
    try:
        yield {"admin": admin, "ca": ca, "wrong_ca": wrong_ca, "log": log}
    finally:
        _debian_pg_ctl(bin_dir, data, user, "-m", "fast", "-w", "stop")
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def tls_db(tls_postgres) -> DatabaseSettings:
    """An empty database of this test's own on the TLS-only server (verify-full)."""
    admin = tls_postgres["admin"]
    name = f"t_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(**admin.connect_kwargs())
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield DatabaseSettings(host=admin.host, port=admin.port, name=name, user=admin.user,
                           password=admin.password, sslmode="verify-full",
                           sslrootcert=admin.sslrootcert)
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    conn.close()


@pytest.fixture(scope="session")
def kafka_certs(tmp_path_factory) -> dict[str, str]:
    """Made with openssl: a private CA and a server certificate it signed for 127.0.0.1, one it
    signed for another host only (a certificate the clients must not take for the broker's),
    and another CA with a server certificate of its own (what the clients must not trust)."""
    where = tmp_path_factory.mktemp("kafka-certs")
    ca = kafka_front.make_ca(where, "kafka-ca")
    other = kafka_front.make_ca(where, "other-ca")
    return {"ca": ca[1], "server": kafka_front.make_server_cert(where, ca, "broker"),
            "other_host": kafka_front.make_server_cert(where, ca, "elsewhere",
                                                       "DNS:kafka.example.org"),
            "other_ca": other[1],
            "wrong_server": kafka_front.make_server_cert(where, other, "impostor")}


@pytest.fixture
def kafka_front_factory(kafka_certs, tmp_path):
    """Start a Tansu of the test's own behind a kafka_front.KafkaFront (TLS with `kafka_certs`
    when tls, SASL when users are given); the broker advertises the front's address, so every
    client connection goes through the front. Stopped at the end of the test."""
    started = []

    def start(tls: bool = True, users: dict[str, str] | None = None) -> kafka_front.KafkaFront:
        upstream, port = localstack.free_port(), localstack.free_port()
        log = open(tmp_path / f"tansu-{port}.log", "wb")  # noqa: SIM115 - closed at teardown
        broker = subprocess.Popen(
            [str(localstack.tansu_binary()), "broker",
             "--listener-url", f"tcp://127.0.0.1:{upstream}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{port}",
             "--storage-engine", "memory://tansu/"], stdout=log, stderr=subprocess.STDOUT)
        started.append((broker, log, None))
        deadline = time.monotonic() + 15
        while not localstack.port_open(upstream) and time.monotonic() < deadline:
            time.sleep(0.05)
        context = kafka_front.server_context(kafka_certs["server"]) if tls else None
        front = kafka_front.KafkaFront(upstream, port, context, users).start()
        started[-1] = (broker, log, front)
        return front

    yield start
    for broker, log, front in started:
        if front is not None:
            front.stop()
        broker.terminate()
        broker.wait(10)
        log.close()
