"""Configuration, read once at an entry point into a frozen object and passed down.

Names follow the seed's `.env` (SPEC §4). Nothing here runs at import time: `load_settings`
is called by `pipeline.py` / `consumer.py` / `simulator.py` with `os.environ` (after `.env`),
so tests can hand in any mapping. When a service is not configured, the caller fills it in
from the local stack (`localstack.py`).
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import time
from pathlib import Path

from dotenv import dotenv_values

PROJECT_DIR = Path(__file__).resolve().parent
SCHEMA_FILE = PROJECT_DIR / "schema.sql"
DEFAULT_BUCKET = "sigma-resources-museum"
DEFAULT_TOPIC = "lmnh"
DEFAULT_DB_NAME = "museum"
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")  # libpq's
DEFAULT_SSL_MODE = "prefer"   # libpq's default: TLS when the server offers it, unverified
DEFAULT_REGION = "eu-west-2"  # the museum's bucket; when neither settings nor profile name one


class SettingsError(ValueError):
    """A missing or malformed setting; its message is one line naming the setting."""


@dataclass(frozen=True)
class DatabaseSettings:
    host: str
    port: int
    name: str
    user: str
    password: str = field(default="", repr=False)
    sslmode: str = DEFAULT_SSL_MODE
    sslrootcert: str | None = None  # a CA bundle (absolute path)
    system_roots: bool = False  # DB_SSLROOTCERT=system: sslrootcert is the machine's bundle

    def connect_kwargs(self) -> dict:
        """libpq parameters. A server that vanished without closing the connection (a host
        down, a failover, a dropped NAT entry) is noticed by TCP keepalives within about a
        minute instead of the kernel's two hours; a connection attempt gives up after 10 s.
        sslmode is always passed, so DB_SSLMODE (not a stray PGSSLMODE) decides."""
        kwargs = {"host": self.host, "port": self.port, "dbname": self.name, "user": self.user,
                  "connect_timeout": 10, "application_name": "lmnh-pipeline",
                  "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                  "keepalives_count": 3, "sslmode": self.sslmode}
        if self.sslrootcert:
            kwargs["sslrootcert"] = self.sslrootcert
        if self.password:
            kwargs["password"] = self.password
        return kwargs

    def verifies_server(self) -> bool:
        """Whether libpq checks the server's certificate: verify-*, or require with a CA file
        (libpq then behaves as verify-ca)."""
        return self.sslmode.startswith("verify") or (self.sslmode == "require"
                                                     and self.sslrootcert is not None)

    def roots(self) -> str:
        """DB_SSLROOTCERT as the messages name it."""
        if self.sslrootcert is None:
            return "(unset)"
        return f"system ({self.sslrootcert})" if self.system_roots else self.sslrootcert

    def describe(self) -> str:
        """Where the database is, for logs: never includes the password."""
        return f"{self.user}@{self.host}:{self.port}/{self.name}"


@dataclass(frozen=True)
class S3Settings:
    """Keys left None: boto3's own credential chain (instance role, AWS_PROFILE, SSO...);
    endpoint None: boto3's own (AWS_ENDPOINT_URL_S3, a profile's endpoint_url, or AWS);
    region None: the profile's, else DEFAULT_REGION."""

    endpoint_url: str | None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    region: str | None = DEFAULT_REGION
    session_token: str | None = field(default=None, repr=False)  # temporary keys
    profile: str | None = None


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_location: str | None = None  # SSL_CA_LOCATION; None: the system's CA store

    def client_config(self) -> dict:
        """librdkafka settings shared by every client (consumer, producer, admin)."""
        config = {"bootstrap.servers": self.bootstrap_servers,
                  "security.protocol": self.security_protocol}
        if self.ca_location and self.security_protocol in ("SSL", "SASL_SSL"):
            config["ssl.ca.location"] = self.ca_location
        if self.security_protocol.startswith("SASL"):
            config.update({"sasl.mechanisms": self.sasl_mechanism or "PLAIN",
                           "sasl.username": self.username or "",
                           "sasl.password": self.password or ""})
        return config


@dataclass(frozen=True)
class Settings:
    """Everything an entry point needs; a service left as None runs on the local stack when
    `local_stack` allows it (LMNH_STACK=local, or no service configured at all: SPEC §4)."""

    database: DatabaseSettings | None
    s3: S3Settings | None
    kafka: KafkaSettings | None
    topic: str = DEFAULT_TOPIC
    bucket: str = DEFAULT_BUCKET
    opening_time: time = time(8, 45)
    closing_time: time = time(18, 15)
    alert_webhook_url: str | None = field(default=None, repr=False)  # a secret (Slack: token in path)
    alert_max_age_minutes: int = 15
    alert_timeout_seconds: float = 5.0      # per POST to the webhook
    alert_retry_max_seconds: float = 30.0   # longest backoff between attempts
    alert_webhook_format: str = "json"      # json | slack | teams (WEBHOOK_FORMATS)
    alert_retention_days: int = 90          # sent alerts kept this long in alert_outbox
    alert_ca_file: str | None = None        # SSL_CERT_FILE: the roots the webhook's HTTPS trusts
    local_stack: bool = True  # may the local stack stand in for a service left as None?
    # None: librdkafka's 45 s for a configured broker, less for the local stack (consumer.py)
    kafka_session_timeout_ms: int | None = None
    kafka_outage_limit_seconds: float = 600.0  # broker unreachable this long: the consumer stops

    def with_services(self, **services) -> Settings:
        return replace(self, **services)


SERVICE_KEYS = ("DB_HOST", "DB_PORT", "DB_NAME", "DB_USER", "DB_PASS", "AWS_ACCESS_KEY",
                "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECRET_KEY",
                "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "BOOTSTRAP_SERVERS",
                "SECURITY_PROTOCOL", "SASL_MECHANISM", "USERNAME", "PASSWORD",
                "AWS_SESSION_TOKEN", "AWS_PROFILE", "DB_SSLMODE", "DB_SSLROOTCERT",
                "SSL_CA_LOCATION")
# Any of these set says "this environment has services of its own": then the local stack no
# longer stands in for the others (SPEC §4). Only names that point somewhere count: the
# defaults .env.example fills in (DB_PORT, SECURITY_PROTOCOL...) and an AWS_PROFILE exported
# in a developer's shell do not.
SERVICE_SELECTORS = ("DB_HOST", "AWS_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL",
                     "AWS_ENDPOINT_URL_S3", "BOOTSTRAP_SERVERS")


def read_environment(env_file: Path | None = None, environ: Mapping[str, str] | None = None
                     ) -> dict[str, str]:
    """The process environment over `.env`: what is exported wins, as with docker and make.

    `LMNH_STACK=local` (set by `make demo` and `make test`) ignores every service setting, so
    the local stack is used even where `.env` points at production; `LMNH_ENV_FILE` names
    another file than `.env`.
    """
    environ = os.environ if environ is None else environ
    if env_file is None:
        env_file = Path(environ.get("LMNH_ENV_FILE") or PROJECT_DIR / ".env")
    values = {k: v for k, v in dotenv_values(env_file).items() if v is not None} \
        if env_file.is_file() else {}
    values.update(environ)
    if values.get("LMNH_STACK") == "local":
        for key in SERVICE_KEYS:
            values.pop(key, None)
    return values


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise SettingsError(f"{name} must be a port number between 1 and 65535, got {raw!r}")
    return int(raw)


def _clock(env: Mapping[str, str], name: str, default: time) -> time:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        return time.fromisoformat(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a time of day such as 08:45:00, got {raw!r}") from None


def _sslmode(env: Mapping[str, str]) -> str:
    raw = _get(env, "DB_SSLMODE")
    if raw is None:
        return DEFAULT_SSL_MODE
    if raw.lower() not in SSL_MODES:
        raise SettingsError(f"DB_SSLMODE must be one of {', '.join(SSL_MODES)}, got {raw!r}")
    return raw.lower()


def _sslrootcert(env: Mapping[str, str], sslmode: str) -> tuple[str | None, bool]:
    """DB_SSLROOTCERT: a CA bundle file (relative to the project folder, where .env is), or
    `system` for the machine's trusted roots; (the file, whether it was `system`)."""
    raw = _get(env, "DB_SSLROOTCERT")
    if raw is None:
        return None, False
    if raw == "system":
        return _system_roots(env, sslmode), True
    path = PROJECT_DIR / Path(raw).expanduser()
    if not path.is_file():
        raise SettingsError(f"DB_SSLROOTCERT names {raw}, which is not a file (a CA bundle "
                            "such as the RDS global-bundle.pem)")
    return str(path), False


# The machine's trusted roots as one file, where each family of systems keeps them.
SYSTEM_CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu
                     "/etc/pki/tls/certs/ca-bundle.crt",    # Amazon Linux, RHEL, Fedora
                     "/etc/ssl/cert.pem")                    # Alpine, macOS


def _system_roots(env: Mapping[str, str], sslmode: str) -> str:
    """DB_SSLROOTCERT=system as a file. libpq 16+ knows the word but looks where its own
    OpenSSL was built to look: psycopg2-binary's bundled OpenSSL looks in its build folder
    (/host/tmp/libpq.build), where nothing is, and Debian 12's psql (libpq 15) takes the word
    for a file name. So the file is found here, where OpenSSL on this machine finds it:
    SSL_CERT_FILE, else the system's bundle. As libpq requires for `system`, DB_SSLMODE must
    be verify-full: with every public CA trusted, only the host name says whose certificate
    it is."""
    if sslmode != "verify-full":
        raise SettingsError(f"DB_SSLROOTCERT=system needs DB_SSLMODE=verify-full, got {sslmode} "
                            "(with every public CA trusted, only the host name check says the "
                            "certificate is the server's)")
    named = _ssl_cert_file(env, "the roots DB_SSLROOTCERT=system means")
    if named is not None:
        return named
    found = next((bundle for bundle in SYSTEM_CA_BUNDLES if Path(bundle).is_file()), None)
    if found is None:
        raise SettingsError("DB_SSLROOTCERT=system: no CA bundle of this machine's at "
                            f"{', '.join(SYSTEM_CA_BUNDLES)}; install the ca-certificates "
                            "package, or name the bundle in DB_SSLROOTCERT or SSL_CERT_FILE")
    return found


def _database(env: Mapping[str, str]) -> DatabaseSettings | None:
    sslmode = _sslmode(env)
    sslrootcert, system_roots = _sslrootcert(env, sslmode)
    host = _get(env, "DB_HOST")
    if host is None:
        others = [n for n in ("DB_USER", "DB_PASS") if _get(env, n)]
        if others:
            raise SettingsError(f"DB_HOST is not set but {', '.join(others)} is: set DB_HOST "
                                "or remove the DB_* settings to use the local database")
        return None
    user = _get(env, "DB_USER")
    if user is None:
        raise SettingsError("DB_USER is not set (needed because DB_HOST is set)")
    return DatabaseSettings(host=host, port=_port(env, "DB_PORT", 5432),
                            name=_get(env, "DB_NAME") or DEFAULT_DB_NAME, user=user,
                            password=env.get("DB_PASS") or "", sslmode=sslmode,
                            sslrootcert=sslrootcert, system_roots=system_roots)


def _s3(env: Mapping[str, str], credential_chain: bool) -> S3Settings | None:
    """S3 from the settings; with no keys and no endpoint, None (the local stack) unless
    `credential_chain`, when boto3 finds credentials itself (instance role, profile, SSO)."""
    endpoint = _get(env, "AWS_ENDPOINT_URL_S3") or _get(env, "AWS_ENDPOINT_URL")
    access = _get(env, "AWS_ACCESS_KEY") or _get(env, "AWS_ACCESS_KEY_ID")
    secret = env.get("AWS_SECRET_ACCESS_KEY") or env.get("AWS_SECRET_KEY") or None
    region = _get(env, "AWS_REGION") or _get(env, "AWS_DEFAULT_REGION")
    if endpoint is None and access is None and not credential_chain:
        return None
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise SettingsError(f"AWS_ENDPOINT_URL_S3 must start with http:// or https://, got {endpoint!r}")
    if access is not None and not secret:
        raise SettingsError("AWS_SECRET_ACCESS_KEY is not set (needed because AWS_ACCESS_KEY is set)")
    return S3Settings(endpoint_url=endpoint, access_key=access, secret_key=secret, region=region,
                      session_token=_get(env, "AWS_SESSION_TOKEN") if access else None,
                      profile=_get(env, "AWS_PROFILE"))


def _kafka(env: Mapping[str, str]) -> KafkaSettings | None:
    servers = _get(env, "BOOTSTRAP_SERVERS")
    if servers is None:
        return None
    protocol = (_get(env, "SECURITY_PROTOCOL") or "PLAINTEXT").upper()
    if protocol not in SECURITY_PROTOCOLS:
        raise SettingsError(f"SECURITY_PROTOCOL must be one of {', '.join(SECURITY_PROTOCOLS)}, "
                            f"got {protocol!r}")
    mechanism = _get(env, "SASL_MECHANISM")
    if protocol.startswith("SASL"):
        mechanism = (mechanism or "PLAIN").upper()
        if mechanism not in SASL_MECHANISMS:
            raise SettingsError(f"SASL_MECHANISM must be one of {', '.join(SASL_MECHANISMS)}, "
                                f"got {mechanism!r}")
        for name in ("USERNAME", "PASSWORD"):
            if _get(env, name) is None:
                raise SettingsError(f"{name} is not set (needed because SECURITY_PROTOCOL is {protocol})")
    for server in servers.split(","):
        host, _, port = server.strip().rpartition(":")
        if not host or not port.isdigit():
            raise SettingsError(f"BOOTSTRAP_SERVERS must be host:port[,host:port...], got {servers!r}")
    return KafkaSettings(bootstrap_servers=servers, security_protocol=protocol,
                         sasl_mechanism=mechanism, username=_get(env, "USERNAME"),
                         password=env.get("PASSWORD"), ca_location=_ca_location(env))


def _ca_location(env: Mapping[str, str]) -> str | None:
    """SSL_CA_LOCATION: a PEM file (or directory) of the brokers' CA, checked here so that a
    mistyped path is one line naming the setting, not a TLS error from librdkafka."""
    path = _get(env, "SSL_CA_LOCATION")
    if path is not None and not Path(path).exists():
        raise SettingsError(f"SSL_CA_LOCATION names no file or directory: {path!r}")
    return path


def _session_timeout_ms(env: Mapping[str, str]) -> int | None:
    raw = _get(env, "KAFKA_SESSION_TIMEOUT_MS")
    if raw is None:
        return None
    if not raw.isdigit() or not 1000 <= int(raw) <= 3600000:
        raise SettingsError("KAFKA_SESSION_TIMEOUT_MS must be a number of milliseconds between "
                            f"1000 and 3600000, got {raw!r}")
    return int(raw)


def _webhook(env: Mapping[str, str]) -> str | None:
    """ALERT_WEBHOOK_URL; never echoed in an error, as its path may hold a token."""
    url = _get(env, "ALERT_WEBHOOK_URL")
    if url is not None and not url.lower().startswith(("http://", "https://")):
        raise SettingsError("ALERT_WEBHOOK_URL must start with http:// or https:// "
                            "(value not shown: it may hold a token)")
    return url


def _ssl_cert_file(env: Mapping[str, str], used_as: str) -> str | None:
    """SSL_CERT_FILE, OpenSSL's name for the file of the machine's trusted roots, read here so
    that a value in .env counts as one in the environment does (OpenSSL itself only sees the
    process environment, and the systemd units pass .env to nothing but this code). Where it
    is used (`used_as` says for what), a path that is no file is a setting error."""
    named = _get(env, "SSL_CERT_FILE")
    if named is not None and not Path(named).is_file():
        raise SettingsError(f"SSL_CERT_FILE names {named}, which is not a file ({used_as})")
    return named


def _alert_ca_file(env: Mapping[str, str]) -> str | None:
    """The roots the webhook's HTTPS trusts; None: the machine's default roots."""
    if _get(env, "ALERT_WEBHOOK_URL") is None:
        return _get(env, "SSL_CERT_FILE")  # unused without a webhook: not checked
    return _ssl_cert_file(env, "the roots the alert webhook's certificate must verify against")


WEBHOOK_FORMATS = ("json", "slack", "teams")


def _webhook_format(env: Mapping[str, str]) -> str:
    """ALERT_WEBHOOK_FORMAT: the body the receiver takes (Teams Workflows: an Adaptive Card)."""
    value = (_get(env, "ALERT_WEBHOOK_FORMAT") or "json").lower()
    if value not in WEBHOOK_FORMATS:
        raise SettingsError(f"ALERT_WEBHOOK_FORMAT must be one of {', '.join(WEBHOOK_FORMATS)}, "
                            f"got {value!r}")
    return value


def _whole(env: Mapping[str, str], name: str, default: int, unit: str) -> int:
    """A whole number of `unit` above 0 (ALERT_MAX_AGE_MINUTES, ALERT_RETENTION_DAYS)."""
    raw = _get(env, name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) <= 0:
        raise SettingsError(f"{name} must be a whole number of {unit} above 0, got {raw!r}")
    return int(raw)


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 3600:
        raise SettingsError(f"{name} must be a number of seconds above 0 and at most 3600, "
                            f"got {raw!r}")
    return value


def load_settings(env: Mapping[str, str]) -> Settings:
    """Build Settings from a mapping of names to values, raising SettingsError on the first bad one."""
    topic = _get(env, "TOPIC") or DEFAULT_TOPIC
    bucket = _get(env, "BUCKET") or DEFAULT_BUCKET
    opening = _clock(env, "OPENING_TIME", time(8, 45))
    closing = _clock(env, "CLOSING_TIME", time(18, 15))
    if closing <= opening:
        raise SettingsError(f"CLOSING_TIME ({closing}) must be after OPENING_TIME ({opening})")
    configured = any(_get(env, name) for name in SERVICE_SELECTORS)
    return Settings(database=_database(env), s3=_s3(env, configured), kafka=_kafka(env),
                    local_stack=not configured, topic=topic,
                    bucket=bucket, opening_time=opening, closing_time=closing,
                    alert_webhook_url=_webhook(env),
                    alert_max_age_minutes=_whole(env, "ALERT_MAX_AGE_MINUTES", 15, "minutes"),
                    alert_timeout_seconds=_seconds(env, "ALERT_TIMEOUT_SECONDS", 5.0),
                    alert_retry_max_seconds=_seconds(env, "ALERT_RETRY_MAX_SECONDS", 30.0),
                    alert_webhook_format=_webhook_format(env),
                    alert_retention_days=_whole(env, "ALERT_RETENTION_DAYS", 90, "days"),
                    alert_ca_file=_alert_ca_file(env),
                    kafka_session_timeout_ms=_session_timeout_ms(env),
                    kafka_outage_limit_seconds=_seconds(env, "KAFKA_OUTAGE_LIMIT_SECONDS", 600.0))


SECRET_KEYS = ("DB_PASS", "AWS_SECRET_ACCESS_KEY", "AWS_SECRET_KEY", "AWS_SESSION_TOKEN",
               "PASSWORD", "ALERT_WEBHOOK_URL")


def environment_secrets(env: Mapping[str, str]) -> list[str]:
    """The secret values of a raw environment, known before any setting is checked, so that
    even an error about a mistyped setting cannot echo a secret pasted into it."""
    return [value for key in SECRET_KEYS if (value := (env.get(key) or "").strip())
            and len(value) >= 3]


def positive_int(text: str) -> int:
    """An argparse type for counts given on a command line (--num_rows, --page-rows)."""
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return int(text)


def first_line(exc: BaseException) -> str:
    """An exception as one log line: drivers put hints and request details on later lines."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def redact(text: str, secrets: list[str]) -> str:
    """Remove secret values from a message before it is shown or logged."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
