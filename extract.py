"""Reading the museum's bucket: which objects matter, and their contents as a stream of lines.

The real bucket holds many unrelated objects (SPEC §1 decoys), so selection is by exact name.
Kiosk objects are streamed in chunks and never written to disk, so an object of any size is read
in bounded memory.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

import boto3
import botocore.exceptions
from botocore.config import Config

from settings import S3Settings

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
    """A boto3 client that fails fast when the endpoint is down instead of hanging."""
    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5,
                    read_timeout=60)
    return boto3.client("s3", endpoint_url=s3.endpoint_url, aws_access_key_id=s3.access_key,
                        aws_secret_access_key=s3.secret_key, region_name=s3.region,
                        config=config)


def describe_s3_error(exc: Exception, what: str) -> str:
    """One line for an S3 failure, without the request details boto3 puts in its messages."""
    if isinstance(exc, botocore.exceptions.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        texts = {"NoSuchBucket": "does not exist", "404": "does not exist",
                 "NoSuchKey": "does not exist (deleted after listing?)",
                 "AccessDenied": "access denied: check AWS_ACCESS_KEY / AWS_SECRET_ACCESS_KEY",
                 "InvalidAccessKeyId": "the access key is not known: check AWS_ACCESS_KEY",
                 "SignatureDoesNotMatch": "the secret key is wrong: check AWS_SECRET_ACCESS_KEY",
                 "403": "access denied: check AWS_ACCESS_KEY / AWS_SECRET_ACCESS_KEY"}
        return f"{what}: {texts.get(code, code or 'S3 error')}"
    if isinstance(exc, botocore.exceptions.EndpointConnectionError):
        return f"{what}: S3 endpoint unreachable ({exc.kwargs.get('endpoint_url', '')})"
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return f"{what}: no AWS credentials: set AWS_ACCESS_KEY and AWS_SECRET_ACCESS_KEY"
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
        raise SourceError(describe_s3_error(exc, f"cannot list bucket {bucket}")) from None
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

    Lines come without terminators (a CR before LF stays for the parser to strip), bytes that
    are not UTF-8 are escaped as text so the raw line can still be kept in a rejection.
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
    line_no = 1
    rest = b""
    first = True
    try:
        for chunk in body.iter_chunks(chunk_bytes):
            data = rest + chunk
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
                continue
            rest = data[cut + 1:]
            text = data[:cut].decode("utf-8", "backslashreplace")
            if first:
                text = text.removeprefix("\ufeff")
                first = False
            lines = text.split("\n")
            yield line_no, lines
            line_no += len(lines)
        if rest:
            text = rest.decode("utf-8", "backslashreplace")
            yield line_no, [text.removeprefix("\ufeff") if first else text]
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise SourceError(describe_s3_error(exc, f"lost {obj.uri} while reading it")) from None
    finally:
        body.close()
