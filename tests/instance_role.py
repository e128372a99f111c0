"""An EC2 instance role in tests: the instance metadata service (IMDSv2) and the S3 requests
signed with what it hands out.

`InstanceMetadata` answers as a hardened instance's IMDS does (HttpTokens=required): a session
token from `PUT /latest/api/token`, then, only with that token, the role's name and its
temporary credentials (access key, secret, session token, expiry). boto3 finds it through
`AWS_EC2_METADATA_SERVICE_ENDPOINT`, as it finds 169.254.169.254 on EC2.

`SigningRecorder` sits in front of the local S3 server and passes every request on unchanged,
noting the access key each was signed with (SigV4's `Credential=`) and the session token it
carried, so a test can show that the role's credentials, not some other, reached S3. (moto does
not check signatures, so passing the request on with another Host is harmless.) A path in
`denied` is answered 403 AccessDenied instead, as S3 answers a role whose policy lacks
s3:ListBucket (the bucket's path) or s3:GetObject (an object's).
"""
from __future__ import annotations

import http.client
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ROLE = "lmnh-batch-role"
CREDENTIALS_PATH = "/latest/meta-data/iam/security-credentials/"


@dataclass
class RoleCredentials:
    access_key: str = "ASIAINSTANCEROLETEST"
    secret_key: str = "instance-role-secret-key"
    token: str = "instance-role-session-token-0123456789"
    lifetime: timedelta = timedelta(hours=6)


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 in a daemon thread; stop() closes it."""

    def __init__(self, handler) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class MetadataLog:
    tokens_issued: int = 0
    without_token: int = 0  # GETs refused for want of a session token (IMDSv1)
    credentials_served: int = 0


class InstanceMetadata(_Server):
    def __init__(self, credentials: RoleCredentials | None = None) -> None:
        self.credentials = credentials or RoleCredentials()
        self.log = MetadataLog()
        self.session_token = "imds-session-token"
        metadata = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _answer(self, status: int, body: str = "") -> None:
                raw = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_PUT(self) -> None:
                if self.path == "/latest/api/token" and \
                        self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    metadata.log.tokens_issued += 1
                    self._answer(200, metadata.session_token)
                else:
                    self._answer(400)

            def do_GET(self) -> None:
                if self.headers.get("X-aws-ec2-metadata-token") != metadata.session_token:
                    metadata.log.without_token += 1
                    self._answer(401)
                elif self.path == CREDENTIALS_PATH:
                    self._answer(200, ROLE)
                elif self.path == CREDENTIALS_PATH + ROLE:
                    metadata.log.credentials_served += 1
                    self._answer(200, json.dumps(metadata.document()))
                else:
                    self._answer(404)

        super().__init__(Handler)

    def document(self) -> dict:
        now = datetime.now(UTC)
        stamp = "%Y-%m-%dT%H:%M:%SZ"
        return {"Code": "Success", "LastUpdated": now.strftime(stamp), "Type": "AWS-HMAC",
                "AccessKeyId": self.credentials.access_key,
                "SecretAccessKey": self.credentials.secret_key, "Token": self.credentials.token,
                "Expiration": (now + self.credentials.lifetime).strftime(stamp)}


@dataclass
class SignedRequest:
    method: str
    path: str
    access_key: str | None
    token: str | None


@dataclass
class SigningLog:
    requests: list[SignedRequest] = field(default_factory=list)


CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")
ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                 b"<Message>Access Denied</Message><RequestId>LMNHTEST</RequestId></Error>")


class SigningRecorder(_Server):
    def __init__(self, upstream_url: str) -> None:
        upstream = urlsplit(upstream_url)
        self.log = SigningLog()
        self.denied: set[str] = set()  # paths (without the query) answered AccessDenied
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                signed = CREDENTIAL.search(self.headers.get("Authorization", ""))
                recorder.log.requests.append(SignedRequest(
                    self.command, self.path, signed.group(1) if signed else None,
                    self.headers.get("X-Amz-Security-Token")))
                if urlsplit(self.path).path.rstrip("/") in recorder.denied:
                    self._refuse()
                    return
                conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=30)
                try:
                    conn.request(self.command, self.path, body=body,
                                 headers={k: v for k, v in self.headers.items()
                                          if k.lower() != "connection"})
                    answer = conn.getresponse()
                    data = answer.read()
                finally:
                    conn.close()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _refuse(self) -> None:
                self.send_response(403)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(ACCESS_DENIED)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(ACCESS_DENIED)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        super().__init__(Handler)
