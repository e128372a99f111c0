"""Helpers shared by bench/batch.py and bench/stream.py (stdlib only at import time, so a
worker subprocess that imports this module pays nothing for it).

- `measure()` runs one command as a child process and reports its wall time (spawn to exit),
  its CPU time and its peak RSS, taken from the kernel's own accounting of that one child
  (`os.wait4`), with a hard timeout.
- `Databases` creates fresh databases on the local PostgreSQL server (cloned from a template
  that has schema.sql applied) and drops every one it made.
- `child_env()` is the environment of a product process pointed at exactly those services.
"""
from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

PYTHON = sys.executable
# Settings a child must not inherit from the shell: it gets exactly the services we name.
_SERVICE_KEYS = ("DB_HOST", "DB_PORT", "DB_NAME", "DB_USER", "DB_PASS", "AWS_ACCESS_KEY",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECRET_KEY",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "BOOTSTRAP_SERVERS",
                 "SECURITY_PROTOCOL", "SASL_MECHANISM", "USERNAME", "PASSWORD", "TOPIC",
                 "BUCKET", "LMNH_STACK", "LMNH_ENV_FILE", "AWS_PROFILE")


class BenchError(RuntimeError):
    """A benchmark could not be run or a correctness check failed: exit non-zero."""


# --------------------------------------------------------------------------- measuring
@dataclass
class Measured:
    """One child process: wall seconds from spawn to exit, CPU seconds, peak RSS (MiB)."""

    argv: list[str]
    seconds: float
    cpu_seconds: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False
    started_at: float = 0.0  # wall clock (time.time()) at spawn and at exit
    ended_at: float = 0.0
    notes: dict = field(default_factory=dict)  # what a benchmark learnt from the output
    server_cpu_seconds: float | None = None  # the local PostgreSQL's CPU over the same span

    def tail(self, lines: int = 15) -> str:
        text = (self.stderr.strip() + "\n" + self.stdout.strip()).strip()
        return "\n".join("    | " + x for x in text.splitlines()[-lines:])

    def check(self, what: str) -> Measured:
        if self.timed_out:
            raise BenchError(f"{what} did not finish within its timeout and was killed:\n"
                             f"{self.tail()}")
        if self.returncode != 0:
            raise BenchError(f"{what} exited with {self.returncode}:\n{self.tail()}")
        return self


# The measuring parent: a fresh, small Python process that spawns the command, waits for it
# with wait4() and writes the command's own rusage and wall time to a file. See measure().
_RUNNER = r"""
import json, os, signal, sys, time
result_path, timeout, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
killed = []
started_at = time.time()
started = time.perf_counter()
pid = os.posix_spawn(argv[0], argv, os.environ)
pidfd = os.pidfd_open(pid)  # names this very process, even once its pid could be reused

def on_alarm(signum, frame):
    killed.append(True)
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass

def forward(signum, frame):
    try:
        signal.pidfd_send_signal(pidfd, signum)
    except ProcessLookupError:
        pass

signal.signal(signal.SIGALRM, on_alarm)
signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
signal.setitimer(signal.ITIMER_REAL, timeout)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - started
ended_at = time.time()
signal.setitimer(signal.ITIMER_REAL, 0)
with open(result_path, "w") as out:
    json.dump({"seconds": seconds, "started_at": started_at, "ended_at": ended_at,
               "maxrss_kib": usage.ru_maxrss,
               "cpu_seconds": usage.ru_utime + usage.ru_stime,
               "returncode": os.waitstatus_to_exitcode(status), "timed_out": bool(killed)}, out)
"""


def measure(argv: list[str], env: dict[str, str] | None = None, timeout: float = 600.0,
            cwd: Path = PROJECT_DIR, server: ServerCpu | None = None) -> Measured:
    """Run argv to completion and measure it as a whole process.

    Peak RSS is the kernel's own high-water mark of the command's resident set (`ru_maxrss`
    from `wait4()` on that one process, KiB on Linux): exact however brief the peak, which
    polling (psutil) is not. It must not be taken from a child of THIS process: exec() folds
    the spawning process's high-water mark into the new program's ru_maxrss, so a child of a
    benchmark holding a 200 MB object would report at least 200 MB (RUSAGE_CHILDREN deltas
    have the same flaw, and are a running maximum besides). So a small fresh Python process
    (`_RUNNER`) spawns the command and reports its rusage, as /usr/bin/time does, with a floor
    of that small process's ~10 MB, below anything measured here. The wall clock runs from
    just before the spawn to wait4's return: interpreter start-up, imports, connecting and
    shutting down count, for every side alike. Output goes to temporary files, so a chatty
    command can never block on a full pipe. After `timeout` seconds the command is killed.
    With `server`, the PostgreSQL server's CPU from just before the spawn to just after the
    exit is measured too (`ServerCpu`).
    """
    server_before = server.seconds() if server else None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r", suffix=".json") as result:
        runner = subprocess.Popen([PYTHON, "-I", "-S", "-c", _RUNNER, result.name, str(timeout),
                                   *argv], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=err, start_new_session=True)
        try:
            runner.wait(timeout + 30)
        except BaseException:  # overran even the runner's own timeout, or Ctrl-C: stop both
            os.killpg(runner.pid, signal.SIGKILL)  # the runner's own session: it and the command
            runner.wait()
            if not isinstance(sys.exc_info()[1], subprocess.TimeoutExpired):
                raise
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
        text = Path(result.name).read_text()
        if runner.returncode != 0 or not text:
            raise BenchError(f"could not measure {' '.join(argv[:3])}: the measuring process "
                             f"exited with {runner.returncode}\n{stderr[-2000:]}")
        figures = json.loads(text)
    server_after = server.seconds() if server else None
    return Measured(server_cpu_seconds=None if server_before is None or server_after is None
                    else round(server_after - server_before, 3),
                    argv=argv, seconds=figures["seconds"], cpu_seconds=figures["cpu_seconds"],
                    peak_rss_mb=figures["maxrss_kib"] / 1024, returncode=figures["returncode"],
                    stdout=stdout, stderr=stderr, timed_out=figures["timed_out"],
                    started_at=figures["started_at"], ended_at=figures["ended_at"])


class ServerCpu:
    """CPU seconds a PostgreSQL server has used so far, read from /proc: the postmaster, every
    live child (backends, background writer, checkpointer, WAL writer, autovacuum) and the
    children it has already reaped (`cutime`/`cstime`), so a backend that exits with its
    client still counts. Differences of two readings are what the server spent in between.

    Why: a COPY runs in one backend, so the pipeline and the server each need a core, and on
    a 2-CPU machine their CPU seconds together bound the wall time from below (bench/README,
    "Issue 19, fourth session").
    """

    def __init__(self, postmaster_pid: int) -> None:
        self.pid = postmaster_pid
        self.tick = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _fields(pid: str) -> list[str] | None:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:  # exited between the listing and the read
            return None
        return text[text.rindex(")") + 2:].split()  # fields 3.. (state is [0], ppid [1])

    def seconds(self) -> float | None:
        own = self._fields(str(self.pid))
        if own is None:
            return None
        ticks = sum(int(x) for x in own[11:15])  # utime, stime, cutime, cstime
        for entry in os.listdir("/proc"):
            if entry.isdigit() and entry != str(self.pid):
                fields = self._fields(entry)
                if fields is not None and fields[1] == str(self.pid):
                    ticks += int(fields[11]) + int(fields[12])
        return ticks / self.tick


def worker_result(measured: Measured) -> dict:
    """The JSON object a worker subprocess prints as its last stdout line."""
    for line in reversed(measured.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise BenchError(f"worker printed no result:\n{measured.tail()}")


# --------------------------------------------------------------------------- environment
def child_env(**settings: str | int) -> dict[str, str]:
    """os.environ without any service setting, plus exactly `settings`; no .env is read."""
    env = {k: v for k, v in os.environ.items() if k not in _SERVICE_KEYS}
    env["LMNH_ENV_FILE"] = os.devnull
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in settings.items()})
    return env


def db_env(port: int, name: str, password: str) -> dict[str, str]:
    return {"DB_HOST": "127.0.0.1", "DB_PORT": str(port), "DB_NAME": name, "DB_USER": "postgres",
            "DB_PASS": password}


def new_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------- databases
@dataclass
class Databases:
    """Fresh databases on the local server: each a clone of a template with schema.sql."""

    port: int
    password: str = field(default="", repr=False)   # the local superuser's (SPEC §5)
    made: list[str] = field(default_factory=list)
    template: str | None = None

    def _admin(self):
        import psycopg2
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres",
                                password=self.password, dbname="postgres", connect_timeout=10)
        conn.autocommit = True
        return conn

    def _execute(self, statement) -> None:
        conn = self._admin()
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()

    def create(self, prefix: str = "bench", schema: bool = True) -> str:
        """A new database; with `schema`, cloned from a template holding schema.sql."""
        from psycopg2 import sql
        if schema and self.template is None:
            self.template = self.create("bench_template", schema=False)
            import load
            from settings import DatabaseSettings
            conn = load.connect(DatabaseSettings("127.0.0.1", self.port, self.template,
                                                 "postgres", self.password))
            try:
                load.apply_schema(conn, (PROJECT_DIR / "schema.sql").read_text())
            finally:
                conn.close()
        name = new_name(prefix)
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if schema:
            statement = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(self.template))
        self.made.append(name)
        self._execute(statement)
        return name

    def connect(self, name: str):
        import psycopg2
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=name,
                                password=self.password, connect_timeout=10)
        conn.autocommit = True
        return conn

    def scalar(self, name: str, query: str, params=None):
        conn = self.connect(name)
        try:
            with conn.cursor() as cur:
                cur.execute(query, params)
                return cur.fetchone()[0]
        finally:
            conn.close()

    def event_counts(self, name: str) -> tuple[int, int]:
        """(events stored, events rejected) in a database with the project's schema."""
        conn = self.connect(name)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT (SELECT count(*) FROM rating_interaction)"
                            " + (SELECT count(*) FROM request_interaction),"
                            " (SELECT count(*) FROM rejected_event)")
                stored, rejected = cur.fetchone()
            return int(stored), int(rejected)
        finally:
            conn.close()

    def drop(self, name: str) -> None:
        from psycopg2 import sql
        self._execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                      .format(sql.Identifier(name)))
        if name in self.made:
            self.made.remove(name)

    def drop_all(self) -> None:
        for name in list(reversed(self.made)):
            try:
                self.drop(name)
            except Exception as exc:  # noqa: BLE001 - cleanup goes on; say what was left
                print(f"warning: could not drop database {name}: {exc}", file=sys.stderr)
        self.template = None


# --------------------------------------------------------------------------- reporting
def machine() -> dict:
    """What the figures were measured on, and how busy it was when the benchmark started."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "mem_gib": mem_gib,
            "python": platform.python_version(), "load": load_average()}


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


class CpuBusy:
    """Share of all CPUs busy (any process) between start() and stop(), from /proc/stat."""

    def __init__(self) -> None:
        self.start_ticks = self._ticks()

    @staticmethod
    def _ticks() -> tuple[int, int] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), idle

    def share(self) -> float | None:
        end = self._ticks()
        if end is None or self.start_ticks is None or end[0] == self.start_ticks[0]:
            return None
        total = end[0] - self.start_ticks[0]
        idle = end[1] - self.start_ticks[1]
        return round(1 - idle / total, 3)


def idle_share(seconds: float = 1.0) -> float | None:
    """How busy the machine is right now (all processes): CPU share over `seconds`."""
    probe = CpuBusy()
    time.sleep(seconds)
    return probe.share()


def fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def fmt_server_cpu(run: Measured) -> str:
    return "-" if run.server_cpu_seconds is None else f"{run.server_cpu_seconds:5.2f} s"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)
