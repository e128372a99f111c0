"""Security: secrets stay secret, expected failures are one clear line, SQL is never built from
data, the loader and analyst roles of roles.sql hold only what they need, and reset.sh asks
before it wipes a database that is not the local one.

Why: the pipeline runs with production credentials (RDS, S3, Confluent Cloud) and reads data
that anyone at a kiosk — or anyone who can write to the topic — controls. A password in a log
file, a traceback in a cron mail, a payload executed as SQL, a loader that can DROP a table, or
a reset that wipes RDS because `.env` pointed there are each an incident. Every entry point is
run for real, as a subprocess, with distinctive secret values in DB_PASS, AWS_SECRET_ACCESS_KEY
and PASSWORD (DB_PASS is the local server's real password: it refuses logins without one); a
private PostgreSQL where lmnh_loader has a password stands in for RDS where a wrong password
must be refused.
"""
from __future__ import annotations

import ast
import json
import os
import pty
import re
import secrets
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
import psycopg2.errors
import pytest
from psycopg2 import sql

import load
import localstack
import pipeline
import sample_data
import transform
from conftest import TEMPLATE_DB, admin_connection, create_topic
from helpers import (
    produce_to_partition_0,
    reason_counts,
    rows,
    run_consumer_in_process,
    scalar,
    set_password,
    table_counts,
)

PROJECT = Path(__file__).resolve().parent.parent
DB_SECRET = "dbpass-Qx7S3cr3tDB"
AWS_SECRET = "awskey-Zk9S3cr3tAWS"
KAFKA_SECRET = "kafkapw-Hn4S3cr3tKF"
LOADER_SECRET = "loaderpw-Tm2S3cr3tLD"     # lmnh_loader's real password on the scram server
WRONG_SECRET = "wrongpw-Pv8S3cr3tXX"       # a wrong one, which must not leak either
# lmnh_loader's and lmnh_analyst's on the shared local server: random, so known to this run only
ROLE_SECRET = f"rolepw-{secrets.token_urlsafe(18)}"
SECRETS = (DB_SECRET, AWS_SECRET, KAFKA_SECRET, LOADER_SECRET, WRONG_SECRET)
LOG_LINE = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} (DEBUG|INFO|WARNING|ERROR) ")


def psql() -> str:
    return str(localstack._pg_bin() / "psql")


def apply_roles(db) -> subprocess.CompletedProcess:
    """Run roles.sql as an administrator would: psql, stop on the first error, one transaction;
    the password in psql's environment, never on its command line."""
    argv = [psql(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-1", "-h", db.host, "-p", str(db.port),
            "-U", db.user, "-d", db.name, "-f", str(PROJECT / "roles.sql")]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PGPASSWORD": db.password})


# --------------------------------------------------------------------------- services
@pytest.fixture(scope="module")
def module_db(template_db, stack):
    """A database of this module's own (module-scoped, so scenarios can share it)."""
    name = f"t_sec_{uuid.uuid4().hex[:8]}"
    conn = admin_connection(stack["postgres"])
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name),
                                                                     sql.Identifier(TEMPLATE_DB)))
    yield localstack.database_settings(stack["postgres"], name)
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    conn.close()


@pytest.fixture(scope="module")
def scram_postgres(tmp_path_factory):
    """A private PostgreSQL (scram-sha-256 for every login, like the local stack's), with the
    schema and roles.sql applied and lmnh_loader's password set as a SCRAM verifier: what RDS
    looks like to the loaders."""
    state_dir = tmp_path_factory.mktemp("scram") / "stack"
    info = localstack.up(("postgres",), state_dir=state_dir)["postgres"]
    db = localstack.database_settings(info)
    conn = load.connect(db)
    load.apply_schema(conn, (PROJECT / "schema.sql").read_text())
    conn.close()
    applied = apply_roles(db)
    assert applied.returncode == 0, applied.stderr
    set_password(db, "lmnh_loader", LOADER_SECRET)
    yield info, db
    localstack.down(state_dir)


def test_the_scram_server_really_refuses_a_wrong_password(scram_postgres):
    info, db = scram_postgres
    good = psycopg2.connect(host="127.0.0.1", port=info["port"], dbname=db.name,
                            user="lmnh_loader", password=LOADER_SECRET)
    good.close()
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host="127.0.0.1", port=info["port"], dbname=db.name,
                         user="lmnh_loader", password=WRONG_SECRET)


# --------------------------------------------------------------------------- every entry point
@dataclass
class Scenario:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    code: int = 0
    says: str = ""                      # expected in the output (the error line for failures)
    log_file: bool = False              # -l file: output goes to a file of its own
    stop_after: float | None = None     # long-lived: SIGTERM this many seconds after it is up
    one_error_line: bool = False        # a failure that must be exactly one ERROR line


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    log: str

    @property
    def text(self) -> str:
        return self.stdout + self.stderr + self.log


def scenarios(closed_port: int) -> dict[str, Scenario]:
    py = sys.executable
    closed_db = {"DB_PORT": str(closed_port)}
    sasl = {"SECURITY_PROTOCOL": "SASL_PLAINTEXT", "SASL_MECHANISM": "PLAIN"}
    return {
        # pipeline.py
        "pipeline_ok": Scenario([py, "pipeline.py", "-v", "--no-progress"], says="run summary"),
        "pipeline_ok_log_file": Scenario([py, "pipeline.py", "-v", "--no-progress"],
                                         log_file=True, says="run summary"),
        "pipeline_db_unreachable": Scenario([py, "pipeline.py"], closed_db, 1,
                                            "cannot connect to PostgreSQL", one_error_line=True),
        "pipeline_db_unreachable_log_file": Scenario([py, "pipeline.py"], closed_db, 1,
                                                     "cannot connect to PostgreSQL", log_file=True),
        "pipeline_wrong_host": Scenario([py, "pipeline.py"], {"DB_HOST": "no-such-host.invalid"},
                                        1, "could not translate host name", one_error_line=True),
        # (scram does not tell a stranger whether the role exists)
        "pipeline_wrong_user": Scenario([py, "pipeline.py"], {"DB_USER": "lmnh_no_such_role"}, 1,
                                        'password authentication failed for user '
                                        '"lmnh_no_such_role"', one_error_line=True),
        "pipeline_wrong_database": Scenario([py, "pipeline.py"], {"DB_NAME": "lmnh_no_such_db"},
                                            1, 'database "lmnh_no_such_db" does not exist',
                                            one_error_line=True),
        "pipeline_wrong_password": Scenario([py, "pipeline.py"], {"SCRAM": WRONG_SECRET}, 1,
                                            'password authentication failed for user "lmnh_loader"',
                                            one_error_line=True),
        "pipeline_right_password": Scenario([py, "pipeline.py", "--no-progress"],
                                            {"SCRAM": LOADER_SECRET}, 0, "run summary"),
        "pipeline_missing_bucket": Scenario([py, "pipeline.py", "-b", "lmnh-no-such-bucket"],
                                            {}, 1, "lmnh-no-such-bucket: does not exist",
                                            one_error_line=True),
        "pipeline_s3_unreachable": Scenario(
            [py, "pipeline.py"], {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{closed_port}"}, 1,
            "S3 endpoint unreachable", one_error_line=True),
        "pipeline_bad_setting": Scenario([py, "pipeline.py"], {"DB_PORT": "five"}, 2,
                                         "DB_PORT must be a port number", one_error_line=True),
        # a secret pasted into the wrong setting is echoed by its error message
        "pipeline_secret_in_wrong_setting": Scenario([py, "pipeline.py"],
                                                     {"DB_PORT": DB_SECRET, "DB_PASS": DB_SECRET}, 2,
                                                     "DB_PORT must be a port number",
                                                     one_error_line=True),
        # consumer.py
        "consumer_ok_log_file": Scenario([py, "consumer.py", "-v", "--stop-at-end", "--group",
                                          f"sec-{uuid.uuid4().hex[:8]}"], {}, 0,
                                         "consumer summary: 6 messages", log_file=True),
        "consumer_sasl_refused": Scenario([py, "consumer.py", "--max-messages", "5"], sasl, 1,
                                          "rejected the credentials"),
        "consumer_sasl_refused_log_file": Scenario([py, "consumer.py", "--max-messages", "5"],
                                                   sasl, 1, "rejected the credentials",
                                                   log_file=True),
        "consumer_wrong_password": Scenario([py, "consumer.py", "--max-messages", "5"],
                                            {"SCRAM": WRONG_SECRET}, 1,
                                            'password authentication failed for user "lmnh_loader"',
                                            one_error_line=True),
        "consumer_db_unreachable": Scenario([py, "consumer.py", "--max-messages", "5"], closed_db,
                                            1, "cannot connect to PostgreSQL", one_error_line=True),
        "consumer_broker_unreachable": Scenario(
            [py, "consumer.py", "--max-messages", "5"],
            {"BOOTSTRAP_SERVERS": f"127.0.0.1:{closed_port}"}, 0, "Kafka broker unreachable",
            stop_after=3),
        "consumer_unknown_topic": Scenario([py, "consumer.py", "--topic", "lmnh-no-such-topic",
                                            "--max-messages", "5"], {}, 0,
                                           "Unknown topic or partition", stop_after=3),
        "consumer_bad_setting": Scenario([py, "consumer.py"], {"SECURITY_PROTOCOL": "SASL_SSL",
                                                               "SASL_MECHANISM": "BOGUS"}, 2,
                                         "SASL_MECHANISM must be one of", one_error_line=True),
        "consumer_secret_in_wrong_setting": Scenario([py, "consumer.py"],
                                                     {"BOOTSTRAP_SERVERS": KAFKA_SECRET}, 2,
                                                     "BOOTSTRAP_SERVERS must be",
                                                     one_error_line=True),
        # simulator.py
        "simulator_ok": Scenario([py, "simulator.py", "--count", "20", "--topic",
                                  f"sec-sim-{uuid.uuid4().hex[:8]}"], {}, 0, "sent 20 of 20"),
        "simulator_sasl_refused": Scenario([py, "simulator.py", "--count", "5"], sasl, 1,
                                           "simulator failed"),
        "simulator_bad_setting": Scenario([py, "simulator.py"], {"BOOTSTRAP_SERVERS": "nonsense"},
                                          2, "BOOTSTRAP_SERVERS must be", one_error_line=True),
        # sample_data.py
        "sample_data_ok": Scenario([py, "sample_data.py", "-b", f"sec-{uuid.uuid4().hex[:8]}",
                                    "--objects", "1", "--rows", "20"], {}, 0, "seeded s3://"),
        "sample_data_s3_unreachable": Scenario(
            [py, "sample_data.py", "-b", "lmnh-x"],
            {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{closed_port}"}, 1,
            "S3 endpoint unreachable", one_error_line=True),
        # connect.sh (psql's own exit codes: 2 when it cannot connect)
        "connect_ok": Scenario(["bash", "connect.sh", "-X", "-A", "-t", "-c",
                                "SELECT 'connected as ' || current_user"], {}, 0,
                               "connected as postgres"),
        "connect_wrong_password": Scenario(["bash", "connect.sh", "-X", "-c", "SELECT 1"],
                                           {"SCRAM": WRONG_SECRET}, 2,
                                           "password authentication failed"),
        "connect_db_unreachable": Scenario(["bash", "connect.sh", "-X", "-c", "SELECT 1"],
                                           closed_db, 2, "Connection refused"),
    }


def _run_scenario(name: str, scenario: Scenario, env: dict[str, str], tmp: Path) -> Result:
    argv = list(scenario.argv)
    log_path = tmp / f"{name}.log"
    if scenario.log_file or scenario.stop_after is not None:
        argv += ["-l", "file", "--log-file", str(log_path)]
    proc = subprocess.Popen(argv, cwd=PROJECT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if scenario.stop_after is not None:
            # SIGTERM once it is consuming (before that the default action would kill it)
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline and "consuming " not in (
                    log_path.read_text() if log_path.exists() else ""):
                time.sleep(0.1)
            try:
                proc.wait(scenario.stop_after)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return Result(proc.returncode, out, err, log_path.read_text() if log_path.exists() else "")


@pytest.fixture(scope="module")
def results(module_db, scram_postgres, s3, s3_settings, kafka_settings, tmp_path_factory):
    """Run every scenario once, eight at a time, against real services; name -> Result."""
    bucket = f"sec-{uuid.uuid4().hex[:10]}"
    sample_data.seed_bucket(s3, bucket, objects=2, rows=300, seed=3)
    topic = create_topic(kafka_settings, 1)
    produce_to_partition_0(kafka_settings, topic, sample_data.generate_messages(6, seed=5))
    scram_info, scram_db = scram_postgres
    base = {**os.environ, "DB_HOST": module_db.host, "DB_PORT": str(module_db.port),
            "DB_NAME": module_db.name, "DB_USER": module_db.user, "DB_PASS": module_db.password,
            "AWS_ENDPOINT_URL_S3": s3_settings.endpoint_url, "AWS_ACCESS_KEY": "local",
            "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "BUCKET": bucket, "TOPIC": topic,
            "BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers, "USERNAME": "kiosk",
            "PASSWORD": KAFKA_SECRET}
    tmp = tmp_path_factory.mktemp("scenarios")
    jobs = {}
    with ThreadPoolExecutor(8) as pool:
        for name, scenario in scenarios(localstack.free_port()).items():
            env = {**base, **scenario.env}
            password = env.pop("SCRAM", None)
            if password is not None:  # the password-enforcing server, as lmnh_loader
                env.update(DB_PORT=str(scram_info["port"]), DB_NAME=scram_db.name,
                           DB_USER="lmnh_loader", DB_PASS=password)
            jobs[name] = pool.submit(_run_scenario, name, scenario, env, tmp)
        return {name: job.result() for name, job in jobs.items()}


SCENARIOS = list(scenarios(1))


@pytest.mark.parametrize("name", SCENARIOS)
def test_no_secret_reaches_stdout_stderr_or_a_log_file(results, module_db, name):
    result = results[name]
    leaked = [s for s in (*SECRETS, module_db.password) if s in result.text]
    assert not leaked, f"{name} leaked {leaked}:\n{result.text[-3000:]}"


@pytest.mark.parametrize("name", SCENARIOS)
def test_each_entry_point_ends_as_expected_without_a_traceback(results, name):
    scenario, result = scenarios(1)[name], results[name]
    assert result.code == scenario.code, result.text[-3000:]
    assert "Traceback" not in result.text, result.text[-3000:]
    assert scenario.says in result.text, result.text[-3000:]
    if scenario.log_file:
        # with -l file the console stays quiet but for the run summary
        assert LOG_LINE.search(result.log) and not LOG_LINE.search(result.stderr), result.stderr
    if scenario.one_error_line:
        lines = (result.log or result.stderr).strip().splitlines()
        errors = [line for line in lines if " ERROR " in line]
        assert len(errors) == 1 and scenario.says in errors[0], lines
        assert lines[-1] == errors[0], lines   # the last word, and no traceback after it


def test_with_log_file_the_run_goes_to_the_file_and_the_summary_to_stdout(results):
    result = results["pipeline_ok_log_file"]
    # (it runs beside pipeline_ok, so each object is loaded by one of the two, skipped by the other)
    assert len(re.findall(r"INFO pipeline: (loaded|skipped) s3://", result.log)) == 2, result.log
    assert "run summary" in result.stdout and result.stderr == ""


# --------------------------------------------------------------------------- SQL safety
INJECTION_CSV_LINES = [
    "2023-03-06 10:00:00,1'); DROP TABLE rating_interaction; --,3,",
    "'; DELETE FROM rejected_event; --,1,3,",
    "2023-03-06 10:00:00,1,3,x'); TRUNCATE exhibition CASCADE; --",
    '2023-03-06 10:00:00,"1; DROP TABLE exhibition",3,',
    "2023-03-06 10:00:00,1,$$; DROP SCHEMA public CASCADE; $$,",
    "2023-03-06 10:00:00,1 UNION SELECT passwd FROM pg_shadow,3,",
    "2023-03-06 10:00:00,1,-1,0 OR 1=1",
    "%s%s%(x)s{0}{},1,3,",
    "2023-03-06 10:00:00,1,3,\\N",
    "2023-03-06 10:00:00,1,3,\\.",
    "\\.",
    '2023-03-06 10:00:00,1,3,"a""b,c"',
    "Robert'); DROP TABLE students;--",
]


def test_sql_injection_in_csv_lines_is_stored_verbatim_as_rejections(s3, bucket, service_env,
                                                                      conn):
    body = "at,site,val,type\n" + "\n".join(INJECTION_CSV_LINES) + "\n2023-03-06 10:00:00,1,3,\n"
    s3.put_object(Bucket=bucket, Key="lmnh_hist_data_0.csv", Body=body.encode())
    assert pipeline.main(["-b", bucket, "--no-progress"]) == 0
    stored = dict(rows(conn, "SELECT locator::int, payload FROM rejected_event"))
    assert stored == {i: line for i, line in enumerate(INJECTION_CSV_LINES, start=2)}
    _assert_tables_intact(conn)
    assert table_counts(conn)["rating_interaction"] == 1


def test_sql_injection_in_kafka_messages_is_stored_verbatim_as_rejections(
        kafka_settings, topic, service_env, conn):
    at = "2024-10-21T10:00:00+01:00"
    payloads = [b"'; DROP TABLE rejected_event; --",
                b"\\.\n'); TRUNCATE rating_interaction; --",
                b"%s %(at)s {0}",
                json.dumps({"at": at, "site": "1'); DROP TABLE exhibition; --", "val": 3}).encode(),
                json.dumps({"at": "'; DELETE FROM kafka_offset; --", "site": 1, "val": 3}).encode(),
                json.dumps({"at": at, "site": 1, "val": "3; DROP TABLE rating", "type": None}).encode(),
                json.dumps({"at": at, "site": 1, "val": -1, "type": "0 OR 1=1"}).encode(),
                json.dumps({"at": at, "site": 1, "val": 3, "type": "\\N"}).encode(),
                json.dumps({"at": at, "site": 1, "val": 3, "type": "$$;DROP TABLE x;$$"}).encode(),
                json.dumps({"at": at, "site": 1, "val": 3}).encode()]
    produce_to_partition_0(kafka_settings, topic, payloads)
    assert run_consumer_in_process("--topic", topic, "--group", f"sec-{uuid.uuid4().hex[:8]}",
                                   "--stop-at-end") == 0
    stored = dict(rows(conn, "SELECT locator, payload FROM rejected_event"))
    assert stored == {f"0:{i}": p.decode() for i, p in enumerate(payloads[:-1])}
    _assert_tables_intact(conn)
    assert table_counts(conn)["rating_interaction"] == 1


def _assert_tables_intact(conn) -> None:
    assert load.missing_tables(conn) == []
    assert scalar(conn, "SELECT count(*) FROM exhibition") == 6
    assert scalar(conn, "SELECT count(*) FROM exhibition_info") == 6
    assert scalar(conn, "SELECT count(*) FROM rating") == 5
    assert set(reason_counts(conn)) <= set(transform.REASONS) | set(transform.OWN_REASONS)


SQL_CALLS = {"execute", "executemany", "copy_expert", "copy_from", "copy_to", "mogrify"}
SQL_WORDS = re.compile(r"\b(SELECT|INSERT INTO|UPDATE|DELETE FROM|COPY|DROP|CREATE|ALTER|TRUNCATE|"
                       r"GRANT|WHERE|VALUES)\b")
# Functions whose SQL is a whole trusted file, not a statement built here.
RUNS_A_FILE = {("load.py", "apply_schema")}
# Runs a statement checked against the module's constants when the object is built.
RUNS_A_CHECKED_CONSTANT = {("load.py", "run", "self.statement")}


def _sql_problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    constants = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                 for t in node.targets if isinstance(t, ast.Name)}
    problems: list[str] = []

    def where(node) -> str:
        return f"{path.name}:{node.lineno}"

    def text_of(node) -> str | None:
        if isinstance(node, ast.Name) and node.id in constants:
            node = constants[node.id]
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        return None

    def is_composed(node) -> bool:   # psycopg2.sql.SQL("...").format(sql.Identifier(...))
        while isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("SQL", "Composed", "Identifier", "Literal"):
                return True
            node = node.func.value
        return False

    class Visitor(ast.NodeVisitor):
        function = ""

        def visit_FunctionDef(self, node):
            outer, self.function = self.function, node.name
            self.generic_visit(node)
            self.function = outer

        def visit_Call(self, node):
            if isinstance(node.func, ast.Attribute) and node.func.attr in SQL_CALLS and node.args:
                query = node.args[0]
                text = text_of(query)
                has_params = len(node.args) > 1 or any(k.arg == "vars" for k in node.keywords)
                if text is not None:
                    if ("%s" in text or "%(" in text) and not has_params:
                        problems.append(f"{where(node)} placeholders but no parameters")
                elif is_composed(query):
                    pass
                elif (path.name, self.function) in RUNS_A_FILE and isinstance(query, ast.Name):
                    pass
                elif (path.name, self.function, ast.unparse(query)) in RUNS_A_CHECKED_CONSTANT:
                    pass
                else:
                    problems.append(f"{where(node)} {node.func.attr}() of a query built at run "
                                    f"time: {ast.unparse(query)[:80]}")
            # str.format / % / f-strings on SQL text anywhere
            if (isinstance(node.func, ast.Attribute) and node.func.attr == "format"
                    and (t := text_of(node.func.value)) and SQL_WORDS.search(t)):
                problems.append(f"{where(node)} SQL built with str.format")
            self.generic_visit(node)

        def visit_BinOp(self, node):
            if isinstance(node.op, (ast.Mod, ast.Add)):
                for side in (node.left, node.right):
                    t = text_of(side)
                    if t and SQL_WORDS.search(t) and not (text_of(node.left) and text_of(node.right)):
                        problems.append(f"{where(node)} SQL built with % or +")
                        break
            self.generic_visit(node)

        def visit_JoinedStr(self, node):
            literal = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
            if any(isinstance(v, ast.FormattedValue) for v in node.values) \
                    and SQL_WORDS.search(literal):
                problems.append(f"{where(node)} SQL built with an f-string: {literal[:60]!r}")
            self.generic_visit(node)

    Visitor().visit(tree)
    return problems


def test_a_prepared_copy_runs_only_the_module_copy_statements():
    """The one COPY whose statement is a field (load.PreparedCopy) refuses any other text."""
    import load
    assert load.PreparedCopy(load.COPY_RATINGS, b"", 0).rows == 0
    with pytest.raises(ValueError):
        load.PreparedCopy("COPY rating_interaction FROM PROGRAM 'rm -rf /'", b"", 0)


def test_no_product_module_builds_sql_from_values():
    modules = sorted(p for p in PROJECT.glob("*.py"))
    assert {"load.py", "pipeline.py", "consumer.py"} <= {p.name for p in modules}
    problems = [problem for path in modules for problem in _sql_problems(path)]
    assert not problems, "\n".join(problems)


def test_the_sql_check_catches_what_it_is_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f(cur, site, table):\n"
        "    cur.execute(f\"SELECT * FROM exhibition WHERE site = {site}\")\n"
        "    cur.execute(\"SELECT * FROM exhibition WHERE site = %s\" % site)\n"
        "    cur.execute(\"DELETE FROM {} WHERE x = 1\".format(table))\n"
        "    cur.execute(\"SELECT * FROM exhibition WHERE site = %s\")\n"
        "    query = 'SELECT 1'\n"
        "    cur.execute(query + ' WHERE ' + site)\n")
    found = _sql_problems(bad)
    assert len([p for p in found if "bad.py:2" in p]) >= 1
    assert any("bad.py:3" in p for p in found) and any("bad.py:4" in p for p in found)
    assert any("bad.py:5" in p for p in found) and any("bad.py:7" in p for p in found)


# --------------------------------------------------------------------------- least privilege
def connect_as(db, user: str):
    conn = psycopg2.connect(host=db.host, port=db.port, dbname=db.name, user=user,
                            password=ROLE_SECRET)
    return conn


def apply_roles_with_passwords(db) -> None:
    """roles.sql, then each role's password set the way roles.sql's header says."""
    applied = apply_roles(db)
    assert applied.returncode == 0, applied.stderr
    for role in ("lmnh_loader", "lmnh_analyst"):
        set_password(db, role, ROLE_SECRET)


def refused(conn, statement: str) -> type[Exception] | None:
    """The exception class a statement fails with (rolled back), or None if it succeeded."""
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
    except psycopg2.Error as exc:
        conn.rollback()
        return type(exc)
    conn.rollback()
    return None


def test_roles_sql_applies_again_and_again_to_a_fresh_database(db):
    for _ in range(2):
        applied = apply_roles(db)
        assert applied.returncode == 0, applied.stderr
        assert applied.stderr == ""
    admin = load.connect(db)
    try:
        assert rows(admin, "SELECT rolname, rolcanlogin, rolsuper, rolcreatedb, rolcreaterole "
                           "FROM pg_roles WHERE rolname LIKE 'lmnh\\_%' ORDER BY 1") == [
            ("lmnh_analyst", True, False, False, False), ("lmnh_loader", True, False, False, False)]
        # the loader owns nothing: it cannot DROP, ALTER or TRUNCATE by ownership
        assert scalar(admin, "SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
                             "WHERE r.rolname LIKE 'lmnh\\_%'") == 0
    finally:
        admin.close()


def test_the_loader_role_runs_the_whole_pipeline_and_the_consumer(
        db, s3, bucket, kafka_settings, topic, service_env, monkeypatch, capsys):
    apply_roles_with_passwords(db)
    monkeypatch.setenv("DB_USER", "lmnh_loader")
    monkeypatch.setenv("DB_PASS", ROLE_SECRET)
    sample_data.seed_bucket(s3, bucket, objects=2, rows=500, seed=21)   # exhibitions, decoys too
    s3.put_object(Bucket=bucket, Key="lmnh_exhibition_deepsea.json", Body=sample_data.exhibition_json(
        {"EXHIBITION_NAME": "Deep Sea", "EXHIBITION_ID": "EXH_07", "FLOOR": "4",
         "DEPARTMENT": "Marine Biology", "START_DATE": "01/01/24", "DESCRIPTION": "Abyss."}))
    assert pipeline.main(["-b", bucket, "--no-progress"]) == 0
    # a changed object replaces its rows: the loader may DELETE them
    changed = sample_data.generate_kiosk_csv(200, seed=22)
    s3.put_object(Bucket=bucket, Key=sample_data.kiosk_key(1), Body=changed)
    assert pipeline.main(["-b", bucket, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "1 loaded, 1 skipped (unchanged)" in out
    payloads = sample_data.generate_messages(40, seed=23)
    produce_to_partition_0(kafka_settings, topic, payloads)
    assert run_consumer_in_process("--topic", topic, "--group", f"sec-{uuid.uuid4().hex[:8]}",
                                   "--stop-at-end") == 0
    admin = load.connect(db)
    try:
        assert scalar(admin, "SELECT exhibition_name FROM exhibition_info WHERE public_id = 'EXH_07'"
                      ) == "Deep Sea"
        assert scalar(admin, "SELECT sum(events_read) FROM s3_object_load") == 700
        assert scalar(admin, "SELECT next_offset FROM kafka_offset WHERE topic = %s", (topic,)) == 40
        assert sum(table_counts(admin).values()) == 740
    finally:
        admin.close()


LOADER_REFUSED = [
    "DROP TABLE rating_interaction",
    "DROP VIEW rating_info",
    "TRUNCATE rating_interaction",
    "TRUNCATE rejected_event",
    "CREATE TABLE lmnh_intruder (a int)",
    "CREATE VIEW lmnh_intruder AS SELECT 1",
    "ALTER TABLE exhibition ADD COLUMN intruder int",
    "CREATE INDEX lmnh_intruder ON rating_interaction (event_at)",
    "DELETE FROM exhibition",
    "DELETE FROM event_source",
    "DELETE FROM kafka_offset",
    "UPDATE rating_interaction SET rating_id = rating_id",
    "INSERT INTO rating (rating_value, rating_description) VALUES (9, 'Sublime')",
    "UPDATE request SET request_description = 'x'",
    "ALTER TABLE rating_interaction OWNER TO lmnh_loader",
    "ALTER TABLE rating_interaction DISABLE TRIGGER ALL",
    "DROP FUNCTION check_event_references()",
    # no temporary tables (one named like a master table would shadow it) ...
    "CREATE TEMP TABLE exhibition (exhibition_id SMALLINT)",
    # ... and of an exhibition only what the upsert sets: events are matched on site/public_id
    "UPDATE exhibition SET site = site",
    "UPDATE exhibition SET public_id = public_id",
    "UPDATE department SET department_name = department_name",
    "UPDATE floor SET floor_name = floor_name",
]


def test_the_loader_role_cannot_drop_truncate_create_or_rewrite(db):
    apply_roles_with_passwords(db)
    loader = connect_as(db, "lmnh_loader")
    try:
        allowed = {s: refused(loader, s) for s in LOADER_REFUSED}
        assert {s: e for s, e in allowed.items()
                if e is not psycopg2.errors.InsufficientPrivilege} == {}
        # ...while what the loaders do is allowed
        for statement in ("SELECT count(*) FROM exhibition", "SELECT pg_advisory_xact_lock(1, 2)",
                          "UPDATE exhibition SET exhibition_name = exhibition_name",
                          "DELETE FROM rating_interaction WHERE source_id = -1",
                          "SELECT next_offset FROM kafka_offset FOR UPDATE"):
            assert refused(loader, statement) is None, statement
    finally:
        loader.close()


SCHEMA_FUNCTIONS = "SELECT p.oid::regprocedure::text, p.proconfig FROM pg_proc p " \
                   "WHERE p.pronamespace = current_schema()::regnamespace ORDER BY 1"


def _rating_row(cur, exhibition_id: int) -> None:
    """One rating event for an exhibition key, from a real source: what a COPY would insert."""
    source = load.source_id(cur, "s3", "s3://museum/lmnh_hist_data_0.csv")
    cur.execute("INSERT INTO rating_interaction (exhibition_id, rating_id, event_at, source_id, "
                "position) SELECT %s, r.rating_id, now(), %s, 2 FROM rating r "
                "WHERE r.rating_value = 3", (exhibition_id, source))


def test_a_temp_table_cannot_stand_in_for_a_master_table_in_the_reference_check(db):
    """The functions' search_path is pinned to the schema, pg_temp last: even a session that
    may create temporary tables cannot make an event point at an exhibition that is not there."""
    conn = load.connect(db)
    try:
        with pytest.raises(psycopg2.errors.ForeignKeyViolation, match="exhibition_id 999"):
            with load.transaction(conn) as cur:
                cur.execute("CREATE TEMP TABLE exhibition (exhibition_id SMALLINT)")
                cur.execute("INSERT INTO exhibition VALUES (999)")
                _rating_row(cur, 999)
        assert table_counts(conn)["rating_interaction"] == 0
        assert dict(rows(conn, SCHEMA_FUNCTIONS)) == {
            name: ["search_path=public, pg_temp"] for name in (
                "check_event_references()", "forbid_referenced_delete()", "forbid_truncate()",
                "key_range_covered(regclass,text,integer,integer)", "prune_sent_alerts(integer)")}
    finally:
        conn.close()


def test_the_loader_may_execute_every_function_its_triggers_call(db):
    """Where EXECUTE was taken from PUBLIC (as roles.sql now does itself), the loader still has
    it on every function its triggers call: key_range_covered too, called by the reference
    check."""
    admin = load.connect(db)
    admin.autocommit = True
    try:
        for name, _ in rows(admin, SCHEMA_FUNCTIONS):
            with admin.cursor() as cur:
                cur.execute(sql.SQL("REVOKE EXECUTE ON FUNCTION {} FROM PUBLIC").format(
                    sql.SQL(name)))
        apply_roles_with_passwords(db)
        loader = connect_as(db, "lmnh_loader")
        try:
            with load.transaction(loader) as cur:
                cur.execute("SELECT exhibition_id FROM exhibition WHERE site = 1")
                _rating_row(cur, cur.fetchone()[0])
            assert table_counts(loader)["rating_interaction"] == 1
        finally:
            loader.close()
        for name, _ in rows(admin, SCHEMA_FUNCTIONS):
            assert scalar(admin, "SELECT has_function_privilege('lmnh_loader', %s, 'EXECUTE')",
                          (name,)), name
            assert not scalar(admin, "SELECT has_function_privilege('public', %s, 'EXECUTE')",
                              (name,)), name
    finally:
        admin.close()


ANALYST_VIEWS = ["exhibition_info", "rating_info", "request_info", "load_overview",
                 "exhibition_summary", "hour_summary", "department_summary"]


def test_the_analyst_role_reads_tables_and_views_and_writes_nothing(db):
    apply_roles_with_passwords(db)
    analyst = connect_as(db, "lmnh_analyst")
    try:
        for relation in [*ANALYST_VIEWS, "rating_interaction", "rejected_event", "kafka_offset"]:
            assert refused(analyst, f"SELECT * FROM {relation} LIMIT 1") is None, relation
        assert refused(analyst, "SELECT count(*) FROM exhibition_info") is None
        # read-only by default ...
        assert refused(analyst, "INSERT INTO rating (rating_value, rating_description) "
                                "VALUES (9, 'x')") is psycopg2.errors.ReadOnlySqlTransaction
        # ... and without the privilege even when it asks for a read-write transaction
        with analyst.cursor() as cur:
            cur.execute("SET default_transaction_read_only = off")
        analyst.commit()
        for statement in ("INSERT INTO rating (rating_value, rating_description) VALUES (9, 'x')",
                          "UPDATE exhibition SET exhibition_name = 'x'",
                          "DELETE FROM rejected_event", "TRUNCATE rating_interaction",
                          "CREATE TABLE lmnh_intruder (a int)", "DROP VIEW rating_info"):
            assert refused(analyst, statement) is psycopg2.errors.InsufficientPrivilege, statement
    finally:
        analyst.close()


def test_roles_sql_takes_back_privileges_granted_by_hand(db):
    apply_roles_with_passwords(db)
    admin = load.connect(db)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("GRANT TRUNCATE, UPDATE ON rating_interaction TO lmnh_loader")
        cur.execute("GRANT INSERT ON rating TO lmnh_analyst")
    admin.close()
    apply_roles_with_passwords(db)
    loader = connect_as(db, "lmnh_loader")
    try:
        assert refused(loader, "TRUNCATE rating_interaction") is psycopg2.errors.InsufficientPrivilege
    finally:
        loader.close()


# --------------------------------------------------------------------------- reset.sh
def _plant_rows(db) -> None:
    """A loaded event and an edited exhibition: what a wipe would destroy / reseed."""
    conn = load.connect(db)
    with load.transaction(conn) as cur:
        source = load.source_id(cur, "s3", "s3://museum/lmnh_hist_data_0.csv")
        cur.execute("INSERT INTO rating_interaction (exhibition_id, rating_id, event_at, "
                    "source_id, position) SELECT e.exhibition_id, r.rating_id, now(), %s, 2 "
                    "FROM exhibition e, rating r WHERE e.site = 1 AND r.rating_value = 3",
                    (source,))
        cur.execute("UPDATE exhibition SET exhibition_name = 'Edited' WHERE public_id = 'EXH_01'")
    conn.close()


def _state(db) -> tuple[int, str]:
    conn = load.connect(db)
    try:
        return (scalar(conn, "SELECT count(*) FROM rating_interaction"),
                scalar(conn, "SELECT exhibition_name FROM exhibition WHERE public_id = 'EXH_01'"))
    finally:
        conn.close()


def _reset(env: dict[str, str], *args: str, answer: bytes | None = None
           ) -> subprocess.CompletedProcess:
    """bash reset.sh, with stdin not a terminal, or a terminal that types `answer`."""
    argv = ["bash", "reset.sh", *args]
    if answer is None:
        return subprocess.run(argv, cwd=PROJECT, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=120)
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(argv, cwd=PROJECT, env=env, stdin=terminal,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.write(controller, answer)
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(terminal)
        os.close(controller)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_reset_asks_before_wiping_a_database_that_is_not_the_local_one(db, tmp_path):
    env_file = tmp_path / "prod.env"
    env_file.write_text(f"DB_HOST={db.host}\nDB_PORT={db.port}\nDB_NAME={db.name}\n"
                        f"DB_USER={db.user}\nDB_PASS={db.password}\n")
    env = {**os.environ, "LMNH_ENV_FILE": str(env_file)}
    _plant_rows(db)
    outputs: list[str] = []

    refused_run = _reset(env, "schema.sql")   # stdin is not a terminal: no way to ask
    outputs.append(refused_run.stdout + refused_run.stderr)
    assert refused_run.returncode == 1
    assert (f"refusing to wipe {db.name} on {db.host} without confirmation: rerun with -y"
            in refused_run.stderr)
    assert _state(db) == (1, "Edited")

    wrong = _reset(env, "schema.sql", answer=b"museum\n")   # a terminal, the wrong name
    outputs.append(wrong.stdout + wrong.stderr)
    assert wrong.returncode == 1 and "not confirmed; nothing changed" in wrong.stderr
    assert "Type the database name" in wrong.stderr
    assert _state(db) == (1, "Edited")

    typed = _reset(env, "schema.sql", answer=db.name.encode() + b"\n")
    outputs.append(typed.stdout + typed.stderr)
    assert typed.returncode == 0, typed.stderr
    assert _state(db) == (0, "Adaptation")

    _plant_rows(db)
    forced = _reset(env, "-y", "schema.sql")
    outputs.append(forced.stdout + forced.stderr)
    assert forced.returncode == 0, forced.stderr
    assert f"reset {db.name} on {db.host}:{db.port} from schema.sql" in forced.stdout
    assert _state(db) == (0, "Adaptation")
    conn = load.connect(db)
    try:
        assert load.missing_tables(conn) == []
        assert scalar(conn, "SELECT count(*) FROM exhibition_info") == 6
    finally:
        conn.close()
    assert not [o for o in outputs if db.password in o or "Traceback" in o]


