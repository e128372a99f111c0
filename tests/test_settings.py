"""settings.py: names from SPEC §4, one clear line per bad setting, secrets kept out of sight."""
from __future__ import annotations

from datetime import time

import pytest

from settings import SettingsError, environment_secrets, load_settings, read_environment, redact


def test_nothing_configured_means_local_stack_everywhere():
    s = load_settings({})
    assert (s.database, s.s3, s.kafka) == (None, None, None)
    assert s.topic == "lmnh"
    assert (s.opening_time, s.closing_time) == (time(8, 45), time(18, 15))


def test_seed_names_are_read():
    env = {"DB_HOST": "db.example", "DB_PORT": "6543", "DB_NAME": "museum",
           "DB_USER": "loader", "DB_PASS": "pw-123", "AWS_ACCESS_KEY": "AKIA1",
           "AWS_SECRET_ACCESS_KEY": "sk-456", "BOOTSTRAP_SERVERS": "b1:9092,b2:9092",
           "SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "PLAIN",
           "USERNAME": "kuser", "PASSWORD": "kp-789", "TOPIC": "lmnh2"}
    s = load_settings(env)
    assert (s.database.host, s.database.port, s.database.user) == ("db.example", 6543, "loader")
    assert s.s3.access_key == "AKIA1" and s.s3.endpoint_url is None
    assert s.kafka.client_config()["sasl.username"] == "kuser"
    assert s.kafka.client_config()["security.protocol"] == "SASL_SSL"
    assert s.topic == "lmnh2"
    assert sorted(environment_secrets(env)) == ["kp-789", "pw-123", "sk-456"]


def test_standard_aws_names_and_endpoint():
    s = load_settings({"AWS_ACCESS_KEY_ID": "AKIA2", "AWS_SECRET_ACCESS_KEY": "x" * 8,
                       "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000"})
    assert s.s3.access_key == "AKIA2" and s.s3.endpoint_url == "http://127.0.0.1:9000"


def test_secrets_are_not_in_repr():
    s = load_settings({"DB_HOST": "h", "DB_USER": "u", "DB_PASS": "hunter2-secret",
                       "AWS_ACCESS_KEY": "a", "AWS_SECRET_ACCESS_KEY": "aws-secret-value",
                       "BOOTSTRAP_SERVERS": "h:1", "SECURITY_PROTOCOL": "SASL_SSL",
                       "USERNAME": "u", "PASSWORD": "kafka-secret-value"})
    text = repr(s)
    for secret in ("hunter2-secret", "aws-secret-value", "kafka-secret-value"):
        assert secret not in text
    assert "hunter2-secret" not in s.database.describe()


@pytest.mark.parametrize("env, name", [
    ({"DB_HOST": "h", "DB_USER": "u", "DB_PORT": "54x"}, "DB_PORT"),
    ({"DB_HOST": "h", "DB_USER": "u", "DB_PORT": "70000"}, "DB_PORT"),
    ({"DB_HOST": "h"}, "DB_USER"),
    ({"DB_USER": "u", "DB_PASS": "p"}, "DB_HOST"),
    ({"AWS_ACCESS_KEY": "a"}, "AWS_SECRET_ACCESS_KEY"),
    ({"AWS_ENDPOINT_URL_S3": "localhost:9000"}, "AWS_ENDPOINT_URL_S3"),
    ({"BOOTSTRAP_SERVERS": "nohostport"}, "BOOTSTRAP_SERVERS"),
    ({"BOOTSTRAP_SERVERS": "h:1", "SECURITY_PROTOCOL": "TLS"}, "SECURITY_PROTOCOL"),
    ({"BOOTSTRAP_SERVERS": "h:1", "SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "GSSAPI",
      "USERNAME": "u", "PASSWORD": "p"}, "SASL_MECHANISM"),
    ({"BOOTSTRAP_SERVERS": "h:1", "SECURITY_PROTOCOL": "SASL_SSL", "PASSWORD": "p"}, "USERNAME"),
    ({"BOOTSTRAP_SERVERS": "h:1", "SECURITY_PROTOCOL": "SSL",
      "SSL_CA_LOCATION": "/no/such/ca.pem"}, "SSL_CA_LOCATION"),
    ({"KAFKA_SESSION_TIMEOUT_MS": "45s"}, "KAFKA_SESSION_TIMEOUT_MS"),
    ({"KAFKA_SESSION_TIMEOUT_MS": "10"}, "KAFKA_SESSION_TIMEOUT_MS"),
    ({"KAFKA_OUTAGE_LIMIT_SECONDS": "ten minutes"}, "KAFKA_OUTAGE_LIMIT_SECONDS"),
    ({"OPENING_TIME": "quarter to nine"}, "OPENING_TIME"),
    ({"DB_HOST": "h", "DB_USER": "u", "DB_SSLMODE": "verify"}, "DB_SSLMODE"),
    ({"DB_HOST": "h", "DB_USER": "u", "DB_SSLROOTCERT": "/no/such/bundle.pem"}, "DB_SSLROOTCERT"),
    ({"OPENING_TIME": "19:00", "CLOSING_TIME": "18:00"}, "CLOSING_TIME"),
])
def test_bad_setting_is_one_line_naming_it(env, name):
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    message = str(info.value)
    assert name in message and "\n" not in message


def test_bad_setting_message_never_contains_the_password():
    with pytest.raises(SettingsError) as info:
        load_settings({"DB_HOST": "h", "DB_PASS": "topsecret-pass"})
    assert "topsecret-pass" not in str(info.value)


def test_environment_wins_over_env_file(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("DB_HOST=from-file\nDB_USER=file-user\nTOPIC=file-topic\n")
    values = read_environment(env_file, {"DB_HOST": "from-env"})
    assert values["DB_HOST"] == "from-env" and values["DB_USER"] == "file-user"


def test_local_stack_switch_ignores_service_settings(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("DB_HOST=prod.rds\nDB_USER=u\nBOOTSTRAP_SERVERS=prod:9092\nTOPIC=t\n")
    values = read_environment(env_file, {"LMNH_STACK": "local"})
    s = load_settings(values)
    assert (s.database, s.kafka) == (None, None) and s.topic == "t"


def test_redact_replaces_every_secret():
    assert redact("user x password pw1 and pw1 again key k2", ["pw1", "k2"]) == \
        "user x password *** and *** again key ***"


def test_tls_settings_reach_every_connection_with_libpqs_default(tmp_path):
    bundle = tmp_path / "global-bundle.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    plain = load_settings({"DB_HOST": "h", "DB_USER": "u"}).database
    assert plain.connect_kwargs()["sslmode"] == "prefer" and "sslrootcert" not in plain.connect_kwargs()
    strict = load_settings({"DB_HOST": "h", "DB_USER": "u", "DB_SSLMODE": "VERIFY-FULL",
                            "DB_SSLROOTCERT": str(bundle)}).database
    assert strict.connect_kwargs()["sslmode"] == "verify-full"
    assert strict.connect_kwargs()["sslrootcert"] == str(bundle)
    assert strict.verifies_server() and not plain.verifies_server()
    system = load_settings({"DB_HOST": "h", "DB_USER": "u", "DB_SSLMODE": "verify-full",
                            "DB_SSLROOTCERT": "system", "SSL_CERT_FILE": str(bundle)}).database
    assert system.connect_kwargs()["sslrootcert"] == str(bundle)
    assert system.roots() == f"system ({bundle})"


def test_sslrootcert_system_is_the_machines_bundle_file(tmp_path, monkeypatch):
    """libpq's own `system` looks where its OpenSSL was built to look: psycopg2-binary's looks
    in a build folder where nothing is, so the settings name the machine's bundle file."""
    import settings
    bundle = tmp_path / "ca-certificates.crt"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setattr(settings, "SYSTEM_CA_BUNDLES", (str(tmp_path / "absent.crt"), str(bundle)))
    env = {"DB_HOST": "h", "DB_USER": "u", "DB_SSLMODE": "verify-full", "DB_SSLROOTCERT": "system"}
    db = load_settings(env).database
    assert (db.sslrootcert, db.system_roots) == (str(bundle), True)
    monkeypatch.setattr(settings, "SYSTEM_CA_BUNDLES", (str(tmp_path / "absent.crt"),))
    with pytest.raises(SettingsError, match="DB_SSLROOTCERT=system: no CA bundle of this machine"):
        load_settings(env)
    with pytest.raises(SettingsError, match="SSL_CERT_FILE names /nowhere.crt, which is not a file"):
        load_settings({**env, "SSL_CERT_FILE": "/nowhere.crt"})
    with pytest.raises(SettingsError, match="DB_SSLROOTCERT=system needs DB_SSLMODE=verify-full, "
                                            "got require"):
        load_settings({**env, "DB_SSLMODE": "require", "SSL_CERT_FILE": str(bundle)})


def test_the_local_stack_stands_in_only_when_nothing_is_configured():
    assert load_settings({}).local_stack is True
    assert load_settings({"DB_PORT": "5432", "SECURITY_PROTOCOL": "SASL_SSL",
                          "AWS_PROFILE": "dev"}).local_stack is True  # .env.example's defaults
    for env in ({"DB_HOST": "h", "DB_USER": "u"}, {"BOOTSTRAP_SERVERS": "h:1"},
                {"AWS_ACCESS_KEY": "a", "AWS_SECRET_ACCESS_KEY": "s"}):
        settings = load_settings(env)
        assert settings.local_stack is False and settings.s3 is not None


def test_a_session_token_goes_with_keys_and_is_a_secret():
    env = {"AWS_ACCESS_KEY": "ASIA1", "AWS_SECRET_ACCESS_KEY": "sk-1",
           "AWS_SESSION_TOKEN": "token-value-1", "AWS_PROFILE": "museum"}
    s3 = load_settings(env).s3
    assert (s3.session_token, s3.profile) == ("token-value-1", "museum")
    assert "token-value-1" not in repr(s3)
    assert "token-value-1" in environment_secrets(env)
    # without keys of its own, the token is boto3's business (its chain reads it with its keys)
    assert load_settings({"DB_HOST": "h", "DB_USER": "u",
                          "AWS_SESSION_TOKEN": "t-2"}).s3.session_token is None


def test_kafka_tls_and_sasl_settings_reach_every_client(tmp_path):
    """SSL_CA_LOCATION and SCRAM go into the librdkafka config that every client is built from
    (consumer, its admin client, simulator, bench)."""
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here: librdkafka reads it")
    s = load_settings({"BOOTSTRAP_SERVERS": "b-1.msk:9096", "SECURITY_PROTOCOL": "SASL_SSL",
                       "SASL_MECHANISM": "scram-sha-512", "USERNAME": "u", "PASSWORD": "p",
                       "SSL_CA_LOCATION": str(ca)})
    config = s.kafka.client_config()
    assert config["ssl.ca.location"] == str(ca)
    assert config["sasl.mechanisms"] == "SCRAM-SHA-512"
    assert s.kafka_outage_limit_seconds == 600 and s.kafka_session_timeout_ms is None


@pytest.mark.parametrize(("env", "argv", "expected"), [
    ({"BOOTSTRAP_SERVERS": "b:9092"}, [], 45000),          # a configured broker: KIP-735's
    ({}, [], 6000),                                        # the local stack's Tansu
    ({"BOOTSTRAP_SERVERS": "b:9092", "KAFKA_SESSION_TIMEOUT_MS": "30000"}, [], 30000),
    ({"KAFKA_SESSION_TIMEOUT_MS": "30000"}, ["--session-timeout-ms", "9000"], 9000),
])
def test_the_session_timeout_is_45_s_unless_local_or_chosen(env, argv, expected):
    import consumer
    args = consumer.build_parser().parse_args(argv)
    assert consumer.session_timeout_of(args, load_settings(env)) == expected


def test_ssl_cert_file_for_the_webhook_is_read_from_the_settings_and_must_be_a_file(tmp_path):
    """SSL_CERT_FILE in .env reaches the alert webhook's HTTPS (OpenSSL reads only the process
    environment); with a webhook configured, a path that is no file is one line."""
    bundle = tmp_path / "proxy-ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    hook = {"ALERT_WEBHOOK_URL": "https://hooks.example/T/B/x"}
    assert load_settings({**hook, "SSL_CERT_FILE": str(bundle)}).alert_ca_file == str(bundle)
    assert load_settings(hook).alert_ca_file is None
    with pytest.raises(SettingsError, match="SSL_CERT_FILE names /nowhere.pem, which is not a file"):
        load_settings({**hook, "SSL_CERT_FILE": "/nowhere.pem"})
    assert load_settings({"SSL_CERT_FILE": "/nowhere.pem"}).alert_ca_file == "/nowhere.pem"
