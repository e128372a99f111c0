"""extract.py against a real S3 endpoint (the local moto server): what is selected, how lines come.

Why: the museum's bucket is full of look-alikes, so selection is by exact name and must hold
across listing pages; kiosk objects are streamed in chunks, so a line split over a chunk
boundary, a BOM, CRLF or lone CR line ends, a missing final newline or bytes that are not UTF-8
must each come out as the same lines, numbered as in the file; a line of any length costs
bounded memory; and an S3 failure must be one readable line.
"""
from __future__ import annotations

import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import pytest

import extract
from extract import S3Object, SourceError
from settings import SettingsError, load_settings

DECOYS = ["lmnh_exhibition", "lmnh_exhibition_dino.txt", "lms_exhibition_planets.json",
          "log_2.json", "uber-raw-data-jun14.csv", "joana_baby_beaver.jpg",
          "lmnh_hist_data_1.csv.bak", "folder/lmnh_hist_data_1.csv",
          "folder/lmnh_exhibition_cave.json", "lmnh_hist_data_.csv", "lmnh_hist_data_x.csv",
          "lmnh_exhibition_.json", "lmnh_exhibition_cave.json.bak"]
KIOSK = ["lmnh_hist_data_10.csv", "lmnh_hist_data_2.csv", "lmnh_hist_data_0.csv",
         "lmnh_hist_data_1.csv"]
EXHIBITIONS = ["lmnh_exhibition_whales.json", "lmnh_exhibition_cave.json",
               "lmnh_exhibition_dino.json"]


def put(s3, bucket: str, key: str, body: bytes = b"x") -> str:
    """Put an object; its ETag without quotes."""
    return s3.put_object(Bucket=bucket, Key=key, Body=body)["ETag"].strip('"')


def read_all(s3, bucket: str, key: str, chunk_bytes: int = extract.CHUNK_BYTES,
             first_lines: int = extract.FIRST_LINES, batches: list | None = None):
    """(ETag, [(line number, line)]) of a kiosk object, checking the numbering is contiguous."""
    head = s3.head_object(Bucket=bucket, Key=key)
    obj = S3Object(bucket, key, head["ETag"].strip('"'), head["ContentLength"])
    opened = extract.open_kiosk_object(s3, obj, chunk_bytes=chunk_bytes, first_lines=first_lines)
    numbered = []
    for first, lines in opened.chunks:
        if batches is not None:
            batches.append(len(lines))
        assert first == len(numbered) + 1, "chunks must continue the line numbering"
        numbered += [(first + i, line) for i, line in enumerate(lines)]
    return opened.etag, numbered


# --------------------------------------------------------------------------- listing
def test_listing_selects_kiosk_and_exhibition_objects_by_exact_name(s3, bucket):
    etags = {key: put(s3, bucket, key, key.encode() * 3)
             for key in KIOSK + EXHIBITIONS + DECOYS}
    listing = extract.list_museum_objects(s3, bucket)
    # numeric order: 2 before 10
    assert [o.key for o in listing.kiosk] == ["lmnh_hist_data_0.csv", "lmnh_hist_data_1.csv",
                                              "lmnh_hist_data_2.csv", "lmnh_hist_data_10.csv"]
    assert [o.key for o in listing.exhibitions] == sorted(EXHIBITIONS)
    assert listing.ignored == len(DECOYS)
    for obj in listing.kiosk + listing.exhibitions:
        assert obj.bucket == bucket
        assert obj.etag == etags[obj.key] and '"' not in obj.etag
        assert obj.size == len(obj.key) * 3
        assert obj.uri == f"s3://{bucket}/{obj.key}"


def test_listing_an_empty_bucket_finds_nothing(s3, bucket):
    listing = extract.list_museum_objects(s3, bucket)
    assert (listing.kiosk, listing.exhibitions, listing.ignored) == ([], [], 0)


def test_listing_follows_every_page(s3, bucket):
    """list_objects_v2 returns 1,000 keys a page: objects past the first page must be found."""
    decoys = [f"archive/{i:05d}.json" for i in range(1050)] + [f"zz_{i}.csv" for i in range(20)]
    kiosk = [f"lmnh_hist_data_{i}.csv" for i in (3, 30, 300)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda key: put(s3, bucket, key), decoys + kiosk
                      + ["lmnh_exhibition_deep.json"]))
    listing = extract.list_museum_objects(s3, bucket)
    assert [o.key for o in listing.kiosk] == kiosk
    assert [o.key for o in listing.exhibitions] == ["lmnh_exhibition_deep.json"]
    assert listing.ignored == len(decoys)


def test_listing_through_the_products_own_client(s3_settings, s3, bucket):
    put(s3, bucket, "lmnh_hist_data_7.csv", b"at,site,val,type\n")
    client = extract.make_s3_client(s3_settings)
    listing = extract.list_museum_objects(client, bucket)
    assert [o.key for o in listing.kiosk] == ["lmnh_hist_data_7.csv"]


def test_missing_bucket_is_one_clear_line(s3):
    name = "lmnh-no-such-bucket-4e1b"
    with pytest.raises(SourceError) as caught:
        extract.list_museum_objects(s3, name)
    message = str(caught.value)
    assert name in message
    assert "does not exist" in message
    assert "\n" not in message
    assert "Traceback" not in message and "botocore" not in message
    assert "An error occurred" not in message  # boto3's own wording with request details
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


# --------------------------------------------------------------------------- streaming lines
BODY = ("\ufeffat,site,val,type\r\n"
        "2023-03-06 09:00:00,1,2,\r\n"
        "\r\n"
        "2023-03-06 09:00:01,2,-1,0.0\n"
        "caf\u00e9 \u2603 is not a row,,,\n"
        "\n"
        "2023-03-06 09:00:02,3,4,").encode("utf-8")
EXPECTED = [(1, "at,site,val,type"), (2, "2023-03-06 09:00:00,1,2,"), (3, ""),
            (4, "2023-03-06 09:00:01,2,-1,0.0"), (5, "caf\u00e9 \u2603 is not a row,,,"),
            (6, ""), (7, "2023-03-06 09:00:02,3,4,")]


@pytest.mark.parametrize("chunk_bytes", [1, 2, 7, 64, extract.CHUNK_BYTES])
def test_lines_come_out_whole_across_chunk_boundaries(s3, bucket, chunk_bytes):
    etag = put(s3, bucket, "lmnh_hist_data_0.csv", BODY)
    got_etag, numbered = read_all(s3, bucket, "lmnh_hist_data_0.csv", chunk_bytes)
    assert numbered == EXPECTED
    assert got_etag == etag


@pytest.mark.parametrize("first_lines", [1, 2, 3, 6, 7, 100])
def test_first_batch_is_small_and_numbering_goes_on_after_it(s3, bucket, first_lines):
    """The first chunk is split so the database can start early; no line is lost or renumbered."""
    put(s3, bucket, "lmnh_hist_data_0.csv", BODY)
    batches: list[int] = []
    _, numbered = read_all(s3, bucket, "lmnh_hist_data_0.csv", first_lines=first_lines,
                           batches=batches)
    assert numbered == EXPECTED
    # the first chunk holds lines 1-6 (line 7 has no newline and comes on its own)
    assert batches[0] == min(first_lines, 6)
    assert sum(batches) == len(EXPECTED)


@pytest.mark.parametrize("chunk_bytes", [3, 7, 1000])
def test_final_newline_adds_no_line(s3, bucket, chunk_bytes):
    put(s3, bucket, "k.csv", b"at,site,val,type\n2023-03-06 09:00:00,1,2,\n")
    _, numbered = read_all(s3, bucket, "k.csv", chunk_bytes)
    assert numbered == [(1, "at,site,val,type"), (2, "2023-03-06 09:00:00,1,2,")]


@pytest.mark.parametrize("chunk_bytes", [1, 7, 1000])
def test_bom_is_dropped_even_when_the_first_chunk_holds_no_newline(s3, bucket, chunk_bytes):
    put(s3, bucket, "k.csv", b"\xef\xbb\xbfat,site,val,type")
    _, numbered = read_all(s3, bucket, "k.csv", chunk_bytes)
    assert numbered == [(1, "at,site,val,type")]


@pytest.mark.parametrize("chunk_bytes", [1, 7, 1000])
def test_invalid_utf8_is_escaped_not_fatal(s3, bucket, chunk_bytes):
    put(s3, bucket, "k.csv", b"at,site,val,type\n2023-03-06 09:00:00,\xff\xfe,2,\n"
                             b"2023-03-06 09:00:01,1,\xc3\n2023-03-06 09:00:02,1,2,\n")
    _, numbered = read_all(s3, bucket, "k.csv", chunk_bytes)
    assert numbered == [(1, "at,site,val,type"), (2, "2023-03-06 09:00:00,\\xff\\xfe,2,"),
                        (3, "2023-03-06 09:00:01,1,\\xc3"), (4, "2023-03-06 09:00:02,1,2,")]


def test_empty_object_has_no_lines(s3, bucket):
    etag = put(s3, bucket, "k.csv", b"")
    got_etag, numbered = read_all(s3, bucket, "k.csv", 7)
    assert numbered == [] and got_etag == etag


def test_many_lines_are_numbered_like_the_file(s3, bucket):
    rows = [f"2023-03-06 10:{i // 60 % 60:02d}:{i % 60:02d},{i % 5},{i % 5}," for i in range(5000)]
    body = ("at,site,val,type\n" + "\n".join(rows) + "\n").encode()
    put(s3, bucket, "k.csv", body)
    _, numbered = read_all(s3, bucket, "k.csv", 997)
    assert len(numbered) == 5001
    assert numbered[1:] == [(i + 2, row) for i, row in enumerate(rows)]


def test_etag_is_that_of_the_version_read_not_of_the_listing(s3, bucket):
    put(s3, bucket, "lmnh_hist_data_0.csv", b"at,site,val,type\nold,1,2,\n")
    listed = extract.list_museum_objects(s3, bucket).kiosk[0]
    new_etag = put(s3, bucket, "lmnh_hist_data_0.csv", b"at,site,val,type\nnew,1,2,\n")
    assert new_etag != listed.etag
    opened = extract.open_kiosk_object(s3, listed, chunk_bytes=7)
    lines = [line for _, chunk in opened.chunks for line in chunk]
    assert opened.etag == new_etag
    assert lines == ["at,site,val,type", "new,1,2,"]


# --------------------------------------------------------------------------- line ends
CR_ROWS = [f"2023-03-06 10:00:{i:02d},{i % 5},{i % 5}," for i in range(40)]


@pytest.mark.parametrize("chunk_bytes", [1, 5, 64, extract.CHUNK_BYTES])
def test_lone_cr_ends_a_line(s3, bucket, chunk_bytes):
    """Old spreadsheet tools save with CR alone: each CR ends a line, numbered as in the file."""
    body = ("at,site,val,type\r" + "\r".join(CR_ROWS) + "\r").encode()
    put(s3, bucket, "k.csv", body)
    _, numbered = read_all(s3, bucket, "k.csv", chunk_bytes)
    assert numbered == [(1, "at,site,val,type")] + [(i + 2, r) for i, r in enumerate(CR_ROWS)]


def test_lf_crlf_and_cr_mixed_each_end_one_line(s3, bucket):
    put(s3, bucket, "k.csv", b"a\nb\r\nc\rd\r\re\n\rf\r\n\r\ng")
    for chunk_bytes in range(1, 12):
        _, numbered = read_all(s3, bucket, "k.csv", chunk_bytes)
        assert [line for _, line in numbered] == ["a", "b", "c", "d", "", "e", "", "f", "", "g"]


@pytest.mark.parametrize("chunk_bytes", [2, 3, 4, 17, 43])
def test_crlf_split_across_chunks_is_one_line_end(s3, bucket, chunk_bytes):
    """With 17- or 43-byte chunks a CR ends a chunk and its LF starts the next: still one
    line end, not an extra (blank) line that would shift every later line number."""
    rows = ["2023-03-06 10:00:00,1,2,", "2023-03-06 10:00:01,2,3,", "x,y", "2023-03-06 10:00:02,3,4,"]
    body = ("at,site,val,type\r\n" + "\r\n".join(rows) + "\r\n").encode()
    assert body[16:18] == body[42:44] == b"\r\n"  # chunk_bytes 17 or 43: the pair is split
    put(s3, bucket, "k.csv", body)
    _, numbered = read_all(s3, bucket, "k.csv", chunk_bytes)
    assert numbered == [(1, "at,site,val,type")] + [(i + 2, r) for i, r in enumerate(rows)]


# --------------------------------------------------------------------------- overlong lines
MIB = extract.MAX_LINE_BYTES


@pytest.mark.parametrize("chunk_bytes", [300_000, MIB, extract.CHUNK_BYTES, 8 * MIB])
@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r", b""])
def test_a_line_over_1_mib_comes_alone_as_its_head_and_its_length(s3, bucket, chunk_bytes, end):
    """Within one chunk or across many, whatever ends it: the line is its first MiB, cut on a
    character boundary, with its full length in bytes; the lines around it keep their numbers."""
    long_line = b"2023-03-06 10:00:00,1,2," + "\u20ac".encode() * 400_000  # 1,200,024 bytes
    body = (b"at,site,val,type\n2023-03-06 09:00:00,1,2,\n" + long_line + end
            + (b"2023-03-06 09:00:01,1,2,\n" if end else b""))
    put(s3, bucket, "k.csv", body)
    batches: list[int] = []
    _, numbered = read_all(s3, bucket, "k.csv", chunk_bytes, batches=batches)
    assert [n for n, _ in numbered] == list(range(1, 5 if end else 4))
    line = numbered[2][1]
    assert isinstance(line, extract.OverlongLine)
    assert line.length_bytes == len(long_line)
    head = line.encode()
    assert len(head) <= MIB and len(head) > MIB - 3  # whole characters: at most 2 bytes short
    assert long_line.startswith(head) and "\\x" not in line
    assert 1 in batches  # alone in its batch
    if end:
        assert numbered[3] == (4, "2023-03-06 09:00:01,1,2,")
        assert not isinstance(numbered[3][1], extract.OverlongLine)


@pytest.mark.parametrize("chunk_bytes", [1000, MIB // 2 + 1, extract.CHUNK_BYTES])
def test_lines_up_to_1_mib_are_whole(s3, bucket, chunk_bytes):
    exactly = b"x" * MIB
    body = b"a\n" + exactly + b"\n" + b"y" * (MIB - 1) + b"\r" + b"z" * (MIB // 2 + 7)
    put(s3, bucket, "k.csv", body)
    _, numbered = read_all(s3, bucket, "k.csv", chunk_bytes)
    assert [len(line) for _, line in numbered] == [1, MIB, MIB - 1, MIB // 2 + 7]
    assert not any(isinstance(line, extract.OverlongLine) for _, line in numbered)


def test_overlong_first_line_drops_the_bom_and_counts_every_byte(s3, bucket):
    body = b"\xef\xbb\xbf" + b"q" * (3 * MIB)
    put(s3, bucket, "k.csv", body)
    _, numbered = read_all(s3, bucket, "k.csv", 100_000)
    assert len(numbered) == 1
    assert numbered[0][1].length_bytes == len(body)
    assert numbered[0][1] == "q" * (MIB - 3)


def test_an_object_with_no_line_end_is_read_in_bounded_memory(s3, bucket):
    """~200 MB without a line end, through the real S3 endpoint: the extract side holds at most
    a chunk and a MiB of it at any time (before, the pending line grew to the whole object and
    was copied again with every chunk)."""
    size = 200 * 1024 * 1024
    put(s3, bucket, "k.csv", b"at,site,val,type\n" + b"7" * size)
    head = s3.head_object(Bucket=bucket, Key="k.csv")
    obj = S3Object(bucket, "k.csv", head["ETag"].strip('"'), head["ContentLength"])
    tracemalloc.start()
    try:
        opened = extract.open_kiosk_object(s3, obj)
        numbered = [(first, lines) for first, lines in opened.chunks]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < size / 20, f"peak {peak / 2**20:.0f} MiB reading a {size / 2**20:.0f} MiB line"
    assert [(first, len(lines)) for first, lines in numbered] == [(1, 1), (2, 1)]
    assert numbered[1][1][0].length_bytes == size


# --------------------------------------------------------------------------- failures
def test_reading_a_deleted_object_is_a_source_error(s3, bucket):
    put(s3, bucket, "lmnh_hist_data_0.csv", b"at,site,val,type\n")
    put(s3, bucket, "lmnh_exhibition_cave.json", b"{}")
    listing = extract.list_museum_objects(s3, bucket)
    for obj in listing.kiosk + listing.exhibitions:
        s3.delete_object(Bucket=bucket, Key=obj.key)
    with pytest.raises(SourceError) as caught:
        extract.open_kiosk_object(s3, listing.kiosk[0])
    message = str(caught.value)
    assert f"s3://{bucket}/lmnh_hist_data_0.csv" in message
    assert "does not exist" in message and "\n" not in message
    with pytest.raises(SourceError) as caught:
        extract.read_object_bytes(s3, listing.exhibitions[0])
    assert f"s3://{bucket}/lmnh_exhibition_cave.json" in str(caught.value)


def test_read_object_bytes_returns_the_body(s3, bucket):
    body = b'{\n    "EXHIBITION_ID": "EXH_00"\n}'
    put(s3, bucket, "lmnh_exhibition_cave.json", body)
    obj = extract.list_museum_objects(s3, bucket).exhibitions[0]
    assert extract.read_object_bytes(s3, obj) == body


def test_a_profile_that_does_not_exist_is_one_line_naming_aws_profile(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    settings = load_settings({"DB_HOST": "db.example", "DB_USER": "u", "AWS_PROFILE": "nosuch"})
    with pytest.raises(SettingsError, match=r"^AWS_PROFILE: .*\(nosuch\) could not be found"):
        extract.make_s3_client(settings.s3)
