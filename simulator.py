"""Kiosk simulator: sends a realistic live stream to the topic, for demos, tests and benchmarks.

    python3 simulator.py --count 3000 [--rate 50] [--topic lmnh] [--partitions 3]

About 16% of the messages are invalid in every way seen on the real topic (see sample_data).
With --rate 0 (the default) it sends flat out; otherwise at that many messages a second.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

import localstack
from logsetup import read_protected_environment, setup_logging
from sample_data import generate_messages
from settings import (
    KafkaSettings,
    SettingsError,
    first_line,
    load_settings,
    redact,
)

log = logging.getLogger("simulator")


def ensure_topic(kafka: KafkaSettings, topic: str, partitions: int) -> None:
    """Create the topic when it does not exist (the local broker starts empty)."""
    admin = AdminClient({**kafka.client_config(), "logger": logging.getLogger("librdkafka")})
    existing = admin.list_topics(timeout=10).topics
    if topic in existing:
        return
    futures = admin.create_topics([NewTopic(topic, num_partitions=partitions,
                                            replication_factor=1)])
    try:
        futures[topic].result(timeout=10)
        log.info("created topic %s with %d partitions", topic, partitions)
    except KafkaException as exc:
        if "TOPIC_ALREADY_EXISTS" not in str(exc):
            raise


def send_messages(kafka: KafkaSettings, topic: str, payloads: list[bytes], rate: float = 0.0
                  ) -> int:
    """Produce payloads in order, flat out or at `rate` per second; returns how many were acked."""
    delivered = 0
    failures = []

    def on_delivery(err, msg):
        nonlocal delivered
        if err is None:
            delivered += 1
        else:
            failures.append(err)

    producer = Producer({**kafka.client_config(), "logger": logging.getLogger("librdkafka"),
                         "linger.ms": 20, "batch.num.messages": 10000,
                         "queue.buffering.max.messages": 500000})
    started = time.monotonic()
    for i, payload in enumerate(payloads):
        if rate > 0:
            due = started + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                producer.poll(0)
                time.sleep(delay)
        while True:
            try:
                producer.produce(topic, payload, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10000 == 0:
            producer.poll(0)
    producer.flush(60)
    if failures:
        log.error("%d messages were not delivered: %s", len(failures), failures[0])
    return delivered


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simulator.py", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000, help="messages to send (default 3000)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="messages per second; 0 = as fast as possible (default)")
    parser.add_argument("--topic", default=None, help="topic (default: $TOPIC or lmnh)")
    parser.add_argument("--partitions", type=int, default=3,
                        help="partitions when the topic has to be created (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--invalid-fraction", type=float, default=0.16,
                        help="share of invalid messages (default 0.16, as on the real topic)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("console", "simulator")
    secrets: list[str] = []
    try:
        env, secrets = read_protected_environment()
        settings = load_settings(env)
        settings = localstack.resolve(settings, ("kafka",))
        topic = args.topic or settings.topic
        ensure_topic(settings.kafka, topic, args.partitions)
        payloads = generate_messages(args.count, seed=args.seed,
                                     invalid_fraction=args.invalid_fraction)
        started = time.monotonic()
        sent = send_messages(settings.kafka, topic, payloads, args.rate)
    except SettingsError as exc:
        log.error("configuration error: %s", redact(str(exc), secrets))
        return 2
    except (KafkaException, localstack.LocalStackError) as exc:
        log.error("simulator failed: %s", redact(first_line(exc), secrets))
        return 1
    log.info("sent %d of %d messages to %s in %.1f s", sent, args.count, topic,
             time.monotonic() - started)
    return 0 if sent == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
