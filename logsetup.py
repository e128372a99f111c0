"""Logging for the entry points: console or file (`-l`), secrets scrubbed from every record."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from settings import PROJECT_DIR, environment_secrets, read_environment, redact

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RedactingFilter(logging.Filter):
    """Last line of defence: a secret that reaches a log record is replaced by ***."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            record.msg = redact(record.getMessage(), self.secrets)
            record.args = None
        return True


def setup_logging(output: str, name: str, log_file: str | None = None, verbose: bool = False,
                  ) -> Path | None:
    """Send the root logger to the console (stderr) or to logs/<name>.log; return the file."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "lmnh", False):  # ours from an earlier call; leave others alone
            root.removeHandler(handler)
            handler.close()
    path = None
    if output == "file":
        path = Path(log_file) if log_file else PROJECT_DIR / "logs" / f"{name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(path, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.lmnh = True
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return path


def protect_secrets(secrets: list[str]) -> None:
    """Attach the redacting filter to every handler once the secrets are known."""
    for handler in logging.getLogger().handlers:
        if getattr(handler, "lmnh", False):
            handler.addFilter(RedactingFilter(secrets))


def read_protected_environment() -> tuple[dict[str, str], list[str]]:
    """The environment (over `.env`) and its secret values, with every log handler already
    redacting them: done before any setting is checked, so that even an error about a
    mistyped setting cannot echo a secret pasted into it."""
    env = read_environment()
    secrets = environment_secrets(env)
    protect_secrets(secrets)
    return env, secrets
