"""TLS and SASL to Kafka, as a managed Kafka speaks them (SPEC §4, issue 17).

Each test has a Tansu of its own behind tests/kafka_front.py: TLS with a private CA the test made
with openssl, and SASL (PLAIN, SCRAM-SHA-256/512) answered by the front, since Tansu's own
`--authentication` finds no user with the memory storage engine (SPEC §5). Refusals before any
connection completed are one line and exit 1; after the consumer had been storing, failed
handshakes and refused connections are an outage, waited out, and nothing is lost or doubled.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import kafka_front
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from test_consumer import (
    PROJECT,
    assert_exact,
    group_name,
    log_text,
    progress,
    spawn,  # noqa: F401 - a fixture
    wait_for,
)

import consumer
import sample_data
from settings import KafkaSettings

USER, PASSWORD = "kiosk-reader", "Corr3ct-h0rse-battery"
PRODUCER_ID = "lmnh-test-producer"  # the front keeps this client's connections through a fault


def front_settings(front, certs, protocol: str = "SSL", mechanism: str | None = None,
                   password: str = PASSWORD, ca: str = "ca") -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=f"127.0.0.1:{front.port}", security_protocol=protocol,
                         sasl_mechanism=mechanism, username=USER if mechanism else None,
                         password=password if mechanism else None, ca_location=certs[ca])


def consumer_env(db, kafka: KafkaSettings, **extra: str) -> dict[str, str]:
    """The environment of a consumer.py run against `db` and the front."""
    env = {**os.environ, "DB_HOST": db.host, "DB_PORT": str(db.port), "DB_NAME": db.name,
           "DB_USER": db.user, "DB_PASS": db.password,
           "BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
           "SECURITY_PROTOCOL": kafka.security_protocol, **extra}
    if kafka.ca_location:
        env["SSL_CA_LOCATION"] = kafka.ca_location
    if kafka.sasl_mechanism:
        env.update(SASL_MECHANISM=kafka.sasl_mechanism, USERNAME=kafka.username,
                   PASSWORD=kafka.password)
    return env


def new_topic(kafka: KafkaSettings) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    admin = AdminClient(kafka.client_config())
    admin.create_topics([NewTopic(name, 1, 1)])[name].result(timeout=15)
    return name


class KioskProducer:
    """A producer through the front that keeps its connections (client.id PRODUCER_ID), so it
    can write while the consumer's connections fail."""

    def __init__(self, kafka: KafkaSettings, topic: str):
        self.topic = topic
        self.producer = Producer({**kafka.client_config(), "client.id": PRODUCER_ID,
                                  "linger.ms": 5})
        self.sent = 0
        self.seed = 0

    def send(self, count: int) -> None:
        self.seed += 1
        failures = []
        for payload in sample_data.generate_messages(count, seed=40 + self.seed):
            self.producer.produce(self.topic, payload, on_delivery=lambda err, _msg:
                                  err is not None and failures.append(err))
        assert self.producer.flush(30) == 0 and not failures, failures[:3]
        self.sent += count


@pytest.fixture
def producers():
    """KioskProducer(kafka, topic), each closed at the end of the test (before its front)."""
    made: list[KioskProducer] = []

    def make(kafka: KafkaSettings, topic: str) -> KioskProducer:
        made.append(KioskProducer(kafka, topic))
        return made[-1]

    yield make
    for producer in made:
        producer.producer.close()


def placed_by_offset(kafka: KafkaSettings, topic: str, count: int) -> dict:
    """(partition, offset) -> payload of the first `count` messages, read back over the front
    (the expectation for assert_exact)."""
    from confluent_kafka import Consumer, TopicPartition
    reader = Consumer({**kafka.client_config(), "group.id": group_name(),
                       "enable.auto.commit": False})
    reader.assign([TopicPartition(topic, 0, 0)])
    placed = {}
    deadline = time.monotonic() + 30
    while len(placed) < count and time.monotonic() < deadline:
        message = reader.poll(0.5)
        if message is not None and message.error() is None:
            placed[(message.partition(), message.offset())] = message.value() or b""
    reader.close()
    return placed


def run_consumer(env: dict, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "consumer.py", *argv], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if " ERROR " in line]


# ------------------------------------------------------------------------ TLS
def test_the_consumer_stores_over_tls_with_a_private_ca(kafka_front_factory, kafka_certs, db,
                                                        conn, producers):
    front = kafka_front_factory(tls=True)
    kafka = front_settings(front, kafka_certs)
    topic = new_topic(kafka)
    producer = producers(kafka, topic)
    producer.send(300)
    result = run_consumer(consumer_env(db, kafka), "--topic", topic, "--group", group_name(),
                          "--stop-at-end")
    assert result.returncode == 0, result.stderr
    assert_exact(conn, topic, placed_by_offset(kafka, topic, 300))


def test_a_wrong_ca_at_start_is_one_line_and_exit_1(kafka_front_factory, kafka_certs, db):
    """SPEC §4: a certificate the CA does not sign, before any connection: stop, in one line
    naming SSL_CA_LOCATION, well within 60 s."""
    front = kafka_front_factory(tls=True)
    kafka = front_settings(front, kafka_certs, ca="other_ca")
    started = time.monotonic()
    result = run_consumer(consumer_env(db, kafka), "--topic", "lmnh-unused")
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 60
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert "SSL_CA_LOCATION" in errors[0] and "certificate verify failed" in errors[0]
    assert "Traceback" not in result.stderr


def test_a_certificate_for_another_host_is_refused_in_one_line(kafka_front_factory, kafka_certs,
                                                               db):
    """Signed by the trusted CA, but for kafka.example.org, not the address in
    BOOTSTRAP_SERVERS: the host name is verified (librdkafka's
    ssl.endpoint.identification.algorithm=https, never switched off here)."""
    front = kafka_front_factory(tls=True)
    front.serve_certificate(kafka_front.server_context(kafka_certs["other_host"]))
    kafka = front_settings(front, kafka_certs)
    result = run_consumer(consumer_env(db, kafka), "--topic", "lmnh-unused")
    assert result.returncode == 1, result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    # named for what it is: librdkafka's own words point at ssl.ca.location, which is right
    assert "is not for the host named in BOOTSTRAP_SERVERS" in errors[0], errors[0]
    assert "mismatch" in errors[0] and "SSL_CA_LOCATION" not in errors[0]
    assert front.stats.tls_failures >= 1
    assert "Traceback" not in result.stderr


def test_failed_handshakes_and_refused_connections_after_storing_are_waited_out(
        kafka_front_factory, kafka_certs, db, conn, spawn, producers):  # noqa: F811
    """A broker that served the right certificate, then another CA's (a rolled broker behind a
    misconfigured load balancer), then refused connections, then came back: one WARNING, one
    recovery line, and what was produced meanwhile is stored once."""
    front = kafka_front_factory(tls=True)
    front.keep_client_ids.add(PRODUCER_ID)
    kafka = front_settings(front, kafka_certs)
    topic = new_topic(kafka)
    producer = producers(kafka, topic)
    producer.send(200)
    proc = spawn("--topic", topic, "--group", group_name(), env=consumer_env(db, kafka))
    wait_for(lambda: progress(conn, topic) == 200, 60, "the first 200 stored", proc)

    front.serve_certificate(kafka_front.server_context(kafka_certs["wrong_server"]))
    wait_for(lambda: "Kafka broker unreachable" in log_text(proc), 30, "the outage noticed", proc)
    failures = front.stats.tls_failures
    wait_for(lambda: front.stats.tls_failures >= failures + 3, 30,
             "three more handshakes refused by the consumer", proc)
    producer.send(150)  # through the producer's connection, kept by the front
    front.refuse()
    time.sleep(3)  # connections refused for a while
    producer.send(150)
    assert progress(conn, topic) == 200  # the consumer could not have read them
    front.serve()
    wait_for(lambda: progress(conn, topic) == 500, 90, "everything stored after the outage", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0, log_text(proc)

    assert_exact(conn, topic, placed_by_offset(kafka, topic, 500))
    text = log_text(proc)
    assert text.count("Kafka broker unreachable") == 1, text
    assert text.count("Kafka broker reachable again") == 1, text
    assert " ERROR " not in text, text


def test_an_outage_past_the_bound_ends_the_consumer_in_one_line(kafka_front_factory, kafka_certs,
                                                                  db, conn, spawn,  # noqa: F811
                                                                  producers):
    front = kafka_front_factory(tls=True)
    kafka = front_settings(front, kafka_certs)
    topic = new_topic(kafka)
    producers(kafka, topic).send(50)
    proc = spawn("--topic", topic, "--group", group_name(),
                 env=consumer_env(db, kafka, KAFKA_OUTAGE_LIMIT_SECONDS="3"))
    wait_for(lambda: progress(conn, topic) == 50, 60, "the first 50 stored", proc)
    front.serve_certificate(kafka_front.server_context(kafka_certs["wrong_server"]))
    assert proc.wait(60) == 1
    errors = error_lines(log_text(proc))
    assert len(errors) == 1, log_text(proc)
    assert "unreachable for more than 3 s" in errors[0], errors
    assert progress(conn, topic) == 50


def test_leaving_the_group_is_not_held_up_by_a_broker_that_does_not_answer(
        kafka_front_factory, kafka_certs, producers, caplog):
    """librdkafka's close waits for a commit in flight until the broker answers (three
    minutes here); consumer.close_consumer waits a bounded time, so that a stop (SIGTERM, an
    outage past its bound) is not held up: the offsets that count are in the database."""
    front = kafka_front_factory(tls=True)
    kafka = front_settings(front, kafka_certs)
    topic = new_topic(kafka)
    producers(kafka, topic).send(20)
    client = Consumer({**kafka.client_config(), "group.id": group_name(),
                       "enable.auto.commit": False, "auto.offset.reset": "earliest",
                       "session.timeout.ms": 6000, "log_level": 0})
    client.subscribe([topic])
    got, deadline = 0, time.monotonic() + 30
    while got < 20 and time.monotonic() < deadline:
        got += len(client.consume(100, 0.5))
    assert got == 20
    front.stall()
    client.commit(offsets=[TopicPartition(topic, 0, 20)], asynchronous=True)
    closing = threading.Thread(target=consumer.close_consumer, args=(client, 1.0))
    closing.start()
    closing.join(30)
    assert not closing.is_alive(), "close_consumer waited for the broker"
    assert "left the Kafka group without waiting for the broker's answer" in caplog.text
    front.serve()  # answered at last: librdkafka's own close ends in the background


# ------------------------------------------------------------------------ SASL
@pytest.mark.parametrize(("protocol", "mechanism"), [("SASL_SSL", "PLAIN"),        # Confluent
                                                     ("SASL_SSL", "SCRAM-SHA-512"),  # MSK
                                                     ("SASL_SSL", "SCRAM-SHA-256"),
                                                     ("SASL_PLAINTEXT", "SCRAM-SHA-512")])
def test_a_sasl_login_completes_and_the_consumer_stores(protocol, mechanism, kafka_front_factory,
                                                         kafka_certs, db, conn, producers):
    front = kafka_front_factory(tls=protocol == "SASL_SSL", users={USER: PASSWORD})
    kafka = front_settings(front, kafka_certs, protocol, mechanism)
    topic = new_topic(kafka)
    producers(kafka, topic).send(300)  # >= 256 in a batch: the feed's byte path (transform)
    logins_before = front.stats.logins.get(mechanism, 0)
    result = run_consumer(consumer_env(db, kafka), "--topic", topic, "--group", group_name(),
                          "--stop-at-end")
    assert result.returncode == 0, result.stderr
    assert front.stats.logins.get(mechanism, 0) > logins_before  # the consumer's own logins
    assert_exact(conn, topic, placed_by_offset(kafka, topic, 300))
    assert PASSWORD not in result.stderr + result.stdout


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-512"])
def test_a_wrong_password_is_one_line_and_exit_1(mechanism, kafka_front_factory, kafka_certs,
                                                 db):
    front = kafka_front_factory(tls=True, users={USER: PASSWORD})
    wrong = "Wr0ng-passw0rd-given"
    kafka = front_settings(front, kafka_certs, "SASL_SSL", mechanism, password=wrong)
    result = run_consumer(consumer_env(db, kafka), "--topic", "lmnh-unused")
    assert result.returncode == 1, result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert "rejected the credentials" in errors[0] and f"USERNAME={USER}" in errors[0]
    assert front.stats.refused_logins >= 1
    assert wrong not in result.stderr + result.stdout and "Traceback" not in result.stderr


# ------------------------------------------------------------------------ ACLs
@pytest.mark.parametrize(("denied", "mechanism", "grant"),
                         [("topic", "PLAIN", "READ on the topic"),
                          ("consumer group", "SCRAM-SHA-256", "READ on the group")])
def test_a_topic_or_group_the_credentials_may_not_use_is_one_line_and_exit_1(
        denied, mechanism, grant, kafka_front_factory, kafka_certs, db):
    """The login succeeds and the broker's ACLs then refuse the topic's metadata or the
    group's coordinator lookup (an API key or SCRAM user without the grants)."""
    front = kafka_front_factory(tls=True, users={USER: PASSWORD})
    kafka = front_settings(front, kafka_certs, "SASL_SSL", mechanism)
    topic, group = new_topic(kafka), group_name()
    name = topic if denied == "topic" else group
    (front.denied_topics if denied == "topic" else front.denied_groups).add(name)
    result = run_consumer(consumer_env(db, kafka), "--topic", topic, "--group", group)
    assert result.returncode == 1, result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert f"does not allow USERNAME={USER} to use {denied} {name}" in errors[0]
    assert f"grant it {grant}" in errors[0]
    assert front.stats.denied.get(name, 0) >= 1  # refused by the ACL, not by anything else
    assert PASSWORD not in result.stderr + result.stdout and "Traceback" not in result.stderr


def test_a_group_access_revoked_while_running_ends_the_consumer_with_nothing_lost(
        kafka_front_factory, kafka_certs, db, conn, spawn, producers):  # noqa: F811
    """The group's grant is revoked while the consumer runs. Its next coordinator lookup (the
    connections cut, as when a broker rolls) is refused: one ERROR line naming the group,
    exit 1, and what it had stored stays exactly once."""
    front = kafka_front_factory(tls=True, users={USER: PASSWORD})
    front.keep_client_ids.add(PRODUCER_ID)
    kafka = front_settings(front, kafka_certs, "SASL_SSL", "SCRAM-SHA-512")
    topic, group = new_topic(kafka), group_name()
    producers(kafka, topic).send(200)
    proc = spawn("--topic", topic, "--group", group, env=consumer_env(db, kafka))
    wait_for(lambda: progress(conn, topic) == 200, 60, "the first 200 stored", proc)

    front.denied_groups.add(group)
    front.refuse()
    front.serve()
    assert proc.wait(60) == 1, log_text(proc)
    errors = [line for line in log_text(proc).splitlines() if " ERROR " in line]
    assert len(errors) == 1, errors
    assert f"does not allow USERNAME={USER} to use consumer group {group}" in errors[0]
    assert front.stats.denied.get(group, 0) >= 1
    assert_exact(conn, topic, placed_by_offset(kafka, topic, 200))
