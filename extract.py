"""Reading the museum's bucket: which objects matter, and their contents as a stream of lines.

The real bucket holds many unrelated objects (SPEC §1 decoys), so selection is by exact name.
Kiosk objects are streamed in chunks and never written to disk, so an object of any size is read
in bounded memory.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Generator, Iterator
from dataclasses import dataclass

import boto3
import botocore.exceptions
from botocore.config import Config

from settings import DEFAULT_REGION, S3Settings, SettingsError
from transform import MAX_LINE_BYTES, OverlongLine

log = logging.getLogger("extract")

KIOSK_KEY = re.compile(r"lmnh_hist_data_(\d+)\.csv")
EXHIBITION_KEY = re.compile(r"lmnh_exhibition_[^/]+\.json")
CHUNK_BYTES = 2 * 1024 * 1024  # ~80,000 rows: bounded memory, COPY overlaps validation
# The first batch of lines is small so that the database starts storing rows while the rest
# of the first chunk is validated, instead of idling through a whole chunk.
FIRST_LINES = 10_000


class SourceError(RuntimeError):
    """The bucket or an object cannot be read (missing, denied, unreachable); one line."""


@dataclass(frozen=True)
class S3Object:
    bucket: str
    key: str
    etag: str
    size: int

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass
class Listing:
    kiosk: list[S3Object]
    exhibitions: list[S3Object]
    ignored: int


def make_s3_client(s3: S3Settings):
    """A boto3 client that fails fast when the endpoint is down instead of hanging.

    Keys from the settings are passed with their session token (temporary keys need it);
    with none, nothing is passed, so boto3's own chain finds them: an instance role, a
    profile (AWS_PROFILE, AWS_CONFIG_FILE, AWS_SHARED_CREDENTIALS_FILE), SSO. Likewise an
    unset endpoint or region is left to boto3 (AWS_ENDPOINT_URL_S3, the profile's
    endpoint_url and region)."""
    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5,
                    read_timeout=60)
    keys = {}
    if s3.access_key:
        keys = {"aws_access_key_id": s3.access_key, "aws_secret_access_key": s3.secret_key,
                "aws_session_token": s3.session_token}
    try:
        session = boto3.session.Session(profile_name=s3.profile)
        return session.client("s3", endpoint_url=s3.endpoint_url,
                              region_name=s3.region or session.region_name or DEFAULT_REGION,
                              config=config, **keys)
    except botocore.exceptions.ProfileNotFound as exc:
        raise SettingsError(f"AWS_PROFILE: {exc} (looked in AWS_CONFIG_FILE / "
                            "AWS_SHARED_CREDENTIALS_FILE, by default ~/.aws/config and "
                            "~/.aws/credentials)") from None


def describe_s3_error(exc: Exception, what: str, permission: str = "s3:GetObject") -> str:
    """One line for an S3 failure, without the request details boto3 puts in its messages.

    `permission` is the IAM action the failed call needs: with an instance role or a profile
    (no keys in the settings) an AccessDenied means that the role's policy lacks it, and
    "check the keys" would send the reader to keys the machine does not have."""
    if isinstance(exc, botocore.exceptions.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        denied = (f"access denied: the credentials in use (AWS_ACCESS_KEY, or else the instance "
                  f"role or AWS_PROFILE) need {permission} on it")
        texts = {"NoSuchBucket": "does not exist", "404": "does not exist",
                 "NoSuchKey": "does not exist (deleted after listing?)",
                 "AccessDenied": denied, "403": denied,
                 "InvalidAccessKeyId": "the access key is not known: check AWS_ACCESS_KEY",
                 "SignatureDoesNotMatch": "the secret key is wrong: check AWS_SECRET_ACCESS_KEY"}
        return f"{what}: {texts.get(code, code or 'S3 error')}"
    if isinstance(exc, botocore.exceptions.EndpointConnectionError):
        return f"{what}: S3 endpoint unreachable ({exc.kwargs.get('endpoint_url', '')})"
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return (f"{what}: no AWS credentials found: set AWS_ACCESS_KEY and "
                "AWS_SECRET_ACCESS_KEY, or give the machine an instance role or AWS_PROFILE")
    return f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _kiosk_order(obj: S3Object) -> tuple[int, str]:
    match = KIOSK_KEY.fullmatch(obj.key)
    return (int(match.group(1)) if match else 0, obj.key)


def list_museum_objects(client, bucket: str) -> Listing:
    """Every kiosk and exhibition object in the bucket (all pages); everything else ignored."""
    kiosk, exhibitions, ignored = [], [], 0
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                obj = S3Object(bucket, item["Key"], item["ETag"].strip('"'), item["Size"])
                if KIOSK_KEY.fullmatch(obj.key):
                    kiosk.append(obj)
                elif EXHIBITION_KEY.fullmatch(obj.key):
                    exhibitions.append(obj)
                else:
                    ignored += 1
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise SourceError(describe_s3_error(exc, f"cannot list bucket {bucket}",
                                            "s3:ListBucket")) from None
    return Listing(sorted(kiosk, key=_kiosk_order), sorted(exhibitions, key=lambda o: o.key),
                   ignored)


def read_object_bytes(client, obj: S3Object) -> bytes:
    """A small object's whole body (exhibition files are a few hundred bytes)."""
    try:
        return client.get_object(Bucket=obj.bucket, Key=obj.key)["Body"].read()
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise SourceError(describe_s3_error(exc, f"cannot read {obj.uri}")) from None


@dataclass
class OpenedObject:
    """A kiosk object being read: the ETag of the version actually fetched, and its lines."""

    etag: str
    chunks: Iterator[tuple[int, list[str]]]


def open_kiosk_object(client, obj: S3Object, chunk_bytes: int = CHUNK_BYTES,
                      first_lines: int = FIRST_LINES) -> OpenedObject:
    """Start streaming an object; `chunks` yields (number of the first line, lines).

    Lines come without terminators (LF, CRLF or a lone CR), bytes that are not UTF-8 are
    escaped as text so the raw line can still be kept in a rejection; a line over
    MAX_LINE_BYTES comes alone in its batch as an `OverlongLine` (its head and its length).
    """
    try:
        response = client.get_object(Bucket=obj.bucket, Key=obj.key)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise SourceError(describe_s3_error(exc, f"cannot read {obj.uri}")) from None
    etag = response["ETag"].strip('"')
    return OpenedObject(etag, _split_first(_iter_lines(response["Body"], obj, chunk_bytes),
                                           first_lines))


def _split_first(chunks: Iterator[tuple[int, list[str]]],
                 first_lines: int) -> Iterator[tuple[int, list[str]]]:
    """The first chunk's lines as two batches: `first_lines` of them, then the rest."""
    for line_no, lines in chunks:
        if line_no == 1 and len(lines) > first_lines:
            yield 1, lines[:first_lines]
            yield 1 + first_lines, lines[first_lines:]
        else:
            yield line_no, lines


def _iter_lines(body, obj: S3Object, chunk_bytes: int) -> Iterator[tuple[int, list[str]]]:
    splitter = _LineSplitter()
    try:
        for chunk in body.iter_chunks(chunk_bytes):
            yield from splitter.feed(chunk)
        yield from splitter.finish()
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise SourceError(describe_s3_error(exc, f"lost {obj.uri} while reading it")) from None
    finally:
        body.close()


class _LineSplitter:
    r"""An object's bytes in, numbered batches of lines out, with the state kept between chunks.

    `\n`, `\r\n` and a lone `\r` each end a line (SPEC §3), and a CR ending one chunk with a LF
    starting the next is one terminator, so line numbers (an event's identity) stay those of
    the file. The pending, unterminated line is kept whole only up to MAX_LINE_BYTES; beyond
    that only its head and its length are, so an object with no line end at all is read in
    bounded memory and linear time. A line over the limit comes as an `OverlongLine` in a batch
    of its own. The common case (LF only, short lines) costs one byte scan per chunk more.
    """

    def __init__(self) -> None:
        self.line_no = 1
        self.pending = b""    # the start of the line not yet ended (no CR or LF in it)
        self.long_bytes = 0   # > 0: the pending line is overlong, `pending` is its head
        self.skip_lf = False  # the last chunk ended with a CR: a LF starting this one is its pair
        self.first = True     # nothing yielded yet: a BOM is still to be dropped

    def feed(self, chunk: bytes) -> Iterator[tuple[int, list[str]]]:
        """The lines this chunk ends; the unended rest waits for the next chunk."""
        if not chunk:
            return
        if self.skip_lf:
            self.skip_lf = False
            chunk = chunk[1:] if chunk[:1] == b"\n" else chunk
        if self.long_bytes:
            chunk = yield from self._end_overlong(chunk)
            if chunk is None:
                return
        data = self.pending + chunk if self.pending else chunk
        if b"\r" in data:
            self.skip_lf = data.endswith(b"\r")
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        cut = data.rfind(b"\n")
        self._keep_pending(data[cut + 1:] if cut >= 0 else data)
        if cut >= 0:
            yield from self._batches(data, cut)

    def finish(self) -> Iterator[tuple[int, list[str]]]:
        """The last line, when the object does not end with a line end."""
        if self.long_bytes:
            yield self._emit([self._overlong(self.pending, self.long_bytes)])
        elif self.pending:
            yield self._emit([self._decode(self.pending)])

    def _keep_pending(self, tail: bytes) -> None:
        if len(tail) > MAX_LINE_BYTES:
            self.pending, self.long_bytes = tail[:MAX_LINE_BYTES], len(tail)
        else:
            self.pending = tail

    def _end_overlong(self, chunk: bytes) -> Generator[tuple[int, list[str]], None, bytes | None]:
        """Count an overlong line's bytes up to its end; yield it there and return the rest of
        the chunk, or None while it goes on."""
        ends = [at for at in (chunk.find(b"\n"), chunk.find(b"\r")) if at >= 0]
        if not ends:
            self.long_bytes += len(chunk)
            return None
        end = min(ends)
        self.long_bytes += end
        yield self._emit([self._overlong(self.pending, self.long_bytes)])
        self.pending, self.long_bytes = b"", 0
        if chunk[end:end + 2] == b"\r\n":
            end += 1
        elif end == len(chunk) - 1 and chunk[end:] == b"\r":
            self.skip_lf = True
        return chunk[end + 1:]

    def _batches(self, data: bytes, cut: int) -> Iterator[tuple[int, list[str]]]:
        """The lines of data[:cut]; any over MAX_LINE_BYTES in a batch of its own."""
        if not _may_hold_overlong_line(data, cut):
            yield self._emit(self._decode(data[:cut]).split("\n"))
            return
        parts = data[:cut].split(b"\n")
        start = 0
        for i, part in enumerate(parts):
            if len(part) > MAX_LINE_BYTES:
                if i > start:
                    yield self._emit(self._decode(b"\n".join(parts[start:i])).split("\n"))
                yield self._emit([self._overlong(part[:MAX_LINE_BYTES], len(part))])
                start = i + 1
        if start < len(parts):
            yield self._emit(self._decode(b"\n".join(parts[start:])).split("\n"))

    def _emit(self, lines: list[str]) -> tuple[int, list[str]]:
        first, self.line_no = self.line_no, self.line_no + len(lines)
        return first, lines

    def _decode(self, raw: bytes) -> str:
        """Text of raw bytes; bytes that are not UTF-8 escaped so the raw line can be kept."""
        text = raw.decode("utf-8", "backslashreplace")
        if self.first:
            self.first = False
            text = text.removeprefix("\ufeff")
        return text

    def _overlong(self, head: bytes, length: int) -> OverlongLine:
        return OverlongLine(self._decode(_whole_characters(head)), length)


def _may_hold_overlong_line(data: bytes, cut: int) -> bool:
    """Whether data[:cut] may hold a line over MAX_LINE_BYTES, found without splitting it: such
    a line covers a whole aligned block of half that size, so a block with a LF in each clears
    the chunk (each find stops at the block's first LF, a few bytes in)."""
    block = MAX_LINE_BYTES // 2
    return any(data.find(b"\n", at, at + block) < 0 for at in range(0, cut - block + 1, block))


def _whole_characters(head: bytes) -> bytes:
    """`head` without a UTF-8 character cut in two at its end."""
    lead = len(head) - 1
    while lead > 0 and len(head) - lead < 4 and head[lead] & 0xC0 == 0x80:
        lead -= 1
    if lead < 0:
        return head
    byte = head[lead]
    size = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else (
        4 if byte >> 3 == 0b11110 else 1)
    return head[:lead] if lead + size > len(head) else head
