"""A front for the local Kafka broker in tests: TLS and SASL the way a managed Kafka speaks them.

Tansu (the local broker) can serve TLS, but its `--authentication` (SCRAM only) finds no user
with the memory or s3 storage engine (`tansu user create` stores nothing there, SPEC §5), so no
login to it can succeed. This front terminates TLS with a certificate the test made, answers
SaslHandshake (API key 17) and SaslAuthenticate (36) itself for PLAIN and SCRAM-SHA-256/512
(RFC 5802 / RFC 7677, as Kafka's own broker does), and passes every other request, bytes
unchanged, to a plaintext Tansu whose advertised listener is the front's address, so clients
come back through the front after reading the metadata.

Faults: `refuse()` closes the listening port (connection refused), `serve_certificate(ctx)`
serves another certificate (handshakes fail), `stall()` passes nothing on (a broker that stopped
answering), `serve()` restores; each also cuts the open
connections, except those of clients whose client.id is in `keep_client_ids` (the test's own
producer, which goes on writing "meanwhile").
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import ssl
import struct
import threading
from dataclasses import dataclass, field

API_VERSIONS, SASL_HANDSHAKE, SASL_AUTHENTICATE = 18, 17, 36
METADATA, FIND_COORDINATOR = 3, 10
TOPIC_AUTHORIZATION_FAILED, GROUP_AUTHORIZATION_FAILED = 29, 30
UNSUPPORTED_SASL_MECHANISM, ILLEGAL_SASL_STATE, SASL_AUTHENTICATION_FAILED = 33, 34, 58
SCRAM_HASHES = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}
SCRAM_ITERATIONS = 4096


# ------------------------------------------------------------------ Kafka framing (just enough)
async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """One size-prefixed Kafka frame, without its size."""
    size = struct.unpack(">i", await reader.readexactly(4))[0]
    return await reader.readexactly(size)


def frame(payload: bytes) -> bytes:
    return struct.pack(">i", len(payload)) + payload


def request_header(data: bytes) -> tuple[int, int, int, str | None, int]:
    """(api key, version, correlation id, client id, where the rest begins) of a request;
    the client id is a plain nullable string in every request header version."""
    api_key, version, correlation = struct.unpack_from(">hhi", data)
    length = struct.unpack_from(">h", data, 8)[0]
    client_id = None if length < 0 else data[10:10 + length].decode()
    return api_key, version, correlation, client_id, 10 + max(length, 0)


def kstring(text: str | None) -> bytes:
    if text is None:
        return struct.pack(">h", -1)
    raw = text.encode()
    return struct.pack(">h", len(raw)) + raw


def api_versions_with_sasl(response: bytes, version: int) -> bytes:
    """Tansu's ApiVersions response, with SaslHandshake and SaslAuthenticate (v0-v1) added when
    it does not list them: librdkafka only starts SASL with a broker that lists both."""
    if version >= 3:  # flexible: compact array, tagged fields
        correlation, error = struct.unpack_from(">ih", response)
        count, pos = _uvarint(response, 6)
        entries, keys = [], set()
        for _ in range(count - 1):
            key, low, high = struct.unpack_from(">hhh", response, pos)
            entries.append(response[pos:pos + 7])  # key, min, max, no tagged fields
            keys.add(key)
            pos += 7
        rest = response[pos:]
        entries += [struct.pack(">hhhB", k, 0, 1, 0) for k in (17, 36) if k not in keys]
        return struct.pack(">ih", correlation, error) + _put_uvarint(len(entries) + 1) \
            + b"".join(entries) + rest
    correlation, error, count = struct.unpack_from(">ihi", response)
    pos = 10
    keys = {struct.unpack_from(">h", response, pos + 6 * i)[0] for i in range(count)}
    extra = b"".join(struct.pack(">hhh", k, 0, 1) for k in (17, 36) if k not in keys)
    added = len(extra) // 6
    return struct.pack(">ihi", correlation, error, count + added) \
        + response[pos:pos + 6 * count] + extra + response[pos + 6 * count:]


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _put_uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# ------------------------------------------------------------------ ACLs (just enough)
class Fields:
    """Reads a Kafka message body: `flexible` versions use compact strings and arrays (an
    unsigned varint of length + 1) and tagged fields (KIP-482)."""

    def __init__(self, data: bytes, pos: int, flexible: bool):
        self.data, self.pos, self.flexible = data, pos, flexible

    def fixed(self, fmt: str):
        value = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return value[0]

    def varint(self) -> int:
        value, self.pos = _uvarint(self.data, self.pos)
        return value

    def length(self) -> int:
        """Of a string or an array; -1 for null."""
        return self.varint() - 1 if self.flexible else self.fixed(">h")

    def count(self) -> int:
        return self.varint() - 1 if self.flexible else self.fixed(">i")

    def string(self) -> str | None:
        size = self.length()
        if size < 0:
            return None
        self.pos += size
        return self.data[self.pos - size:self.pos].decode()

    def tags(self) -> None:
        if self.flexible:
            for _ in range(self.varint()):
                self.varint()
                self.pos += self.varint()


def coordinator_key(request: bytes, version: int) -> str | None:
    """The group a FindCoordinator request asks about (v0-v2, what librdkafka sends: a later
    librdkafka that sends v3+ fails the ACL tests here loudly rather than passing them)."""
    if version > 2:
        raise NotImplementedError(f"FindCoordinator v{version} is not read by the front")
    return Fields(request, 0, flexible=False).string()


def coordinator_refused(response: bytes, version: int) -> bytes:
    """A FindCoordinator answer of GROUP_AUTHORIZATION_FAILED, as Kafka gives a principal with
    no DESCRIBE on the group."""
    correlation = response[:4]
    if version == 0:
        return correlation + struct.pack(">hi", GROUP_AUTHORIZATION_FAILED, -1) \
            + kstring("") + struct.pack(">i", -1)
    return correlation + struct.pack(">ih", 0, GROUP_AUTHORIZATION_FAILED) \
        + kstring("Group authorization failed.") + struct.pack(">i", -1) + kstring("") \
        + struct.pack(">i", -1)


def metadata_without(response: bytes, version: int, denied: set[str]) -> tuple[bytes, list[str]]:
    """A Metadata response (v1-v12) in which each denied topic has TOPIC_AUTHORIZATION_FAILED
    and no partitions, as Kafka answers a principal with no DESCRIBE on it; and which topics
    were refused."""
    flexible = version >= 9
    fields = Fields(response, 4, flexible)
    fields.tags()  # response header
    if version >= 3:
        fields.fixed(">i")  # throttle_time_ms
    for _ in range(fields.count()):  # brokers
        fields.fixed(">i")
        fields.string()
        fields.fixed(">i")
        fields.string()  # rack
        fields.tags()
    if version >= 2:
        fields.string()  # cluster_id
    fields.fixed(">i")  # controller_id
    head = response[:fields.pos]
    topics, refused = [], []
    for _ in range(fields.count()):
        start = fields.pos
        fields.fixed(">h")
        name_at = fields.pos
        name = fields.string()
        if version >= 10:
            fields.pos += 16  # topic_id
        fields.fixed(">?")  # is_internal
        after_internal = fields.pos
        for _ in range(fields.count()):  # partitions
            fields.pos += 10 if version < 7 else 14  # error, index, leader[, leader epoch]
            for _ in range(3 if version >= 5 else 2):  # replicas, isr[, offline]
                nodes = fields.count()
                fields.pos += 4 * max(nodes, 0)
            fields.tags()
        tail_at = fields.pos  # topic_authorized_operations and tagged fields: kept
        if version >= 8:
            fields.fixed(">i")
        fields.tags()
        if name in denied:
            refused.append(name)
            empty = _put_uvarint(1) if flexible else struct.pack(">i", 0)
            topics.append(struct.pack(">h", TOPIC_AUTHORIZATION_FAILED)
                          + response[name_at:after_internal] + empty
                          + response[tail_at:fields.pos])
        else:
            topics.append(response[start:fields.pos])
    count = _put_uvarint(len(topics) + 1) if flexible else struct.pack(">i", len(topics))
    return head + count + b"".join(topics) + response[fields.pos:], refused


# ------------------------------------------------------------------ SASL, the server's side
class AuthenticationFailed(Exception):
    pass


class Plain:
    """RFC 4616: one message, authzid NUL user NUL password."""

    def __init__(self, users: dict[str, str]):
        self.users = users
        self.name = "PLAIN"
        self.done = False

    def step(self, message: bytes) -> bytes:
        try:
            _, user, password = message.decode().split("\0")
        except ValueError:
            raise AuthenticationFailed("malformed PLAIN message") from None
        if user not in self.users or not hmac.compare_digest(self.users[user], password):
            raise AuthenticationFailed("Invalid username or password")
        self.done = True
        return b""


class Scram:
    """RFC 5802 / 7677 server: client-first -> server-first, client-final -> server-final."""

    def __init__(self, mechanism: str, users: dict[str, str]):
        self.hash = SCRAM_HASHES[mechanism]
        self.name = mechanism
        self.users = users
        self.done = False
        self.state: dict | None = None

    def _hmac(self, key: bytes, text: bytes) -> bytes:
        return hmac.new(key, text, self.hash).digest()

    def step(self, message: bytes) -> bytes:
        return self._first(message.decode()) if self.state is None \
            else self._final(message.decode())

    def _first(self, message: str) -> bytes:
        bare = message.split(",", 2)[2]  # after the gs2 header "n,,"
        attrs = dict(part.split("=", 1) for part in bare.split(","))
        user = attrs.get("n", "").replace("=2C", ",").replace("=3D", "=")
        if user not in self.users:
            raise AuthenticationFailed("Authentication failed: unknown user")
        salt = os.urandom(16)
        nonce = attrs["r"] + base64.b64encode(os.urandom(18)).decode()
        server_first = f"r={nonce},s={base64.b64encode(salt).decode()},i={SCRAM_ITERATIONS}"
        salted = hashlib.pbkdf2_hmac(self.hash, self.users[user].encode(), salt, SCRAM_ITERATIONS)
        self.state = {"bare": bare, "server_first": server_first, "nonce": nonce,
                      "salted": salted}
        return server_first.encode()

    def _final(self, message: str) -> bytes:
        state = self.state
        without_proof, _, proof = message.rpartition(",p=")
        attrs = dict(part.split("=", 1) for part in without_proof.split(","))
        if attrs.get("r") != state["nonce"]:
            raise AuthenticationFailed("Authentication failed: nonce mismatch")
        auth_message = f"{state['bare']},{state['server_first']},{without_proof}".encode()
        client_key = self._hmac(state["salted"], b"Client Key")
        stored_key = hashlib.new(self.hash, client_key).digest()
        signature = self._hmac(stored_key, auth_message)
        given = base64.b64decode(proof)
        recovered = bytes(a ^ b for a, b in zip(given, signature, strict=False))
        if len(given) != len(signature) or \
                not hmac.compare_digest(hashlib.new(self.hash, recovered).digest(), stored_key):
            raise AuthenticationFailed("Authentication failed: invalid credentials")
        server_key = self._hmac(state["salted"], b"Server Key")
        self.done = True
        return b"v=" + base64.b64encode(self._hmac(server_key, auth_message))


def mechanism_for(name: str, users: dict[str, str]) -> Plain | Scram:
    return Plain(users) if name == "PLAIN" else Scram(name, users)


def sasl_authenticate_response(correlation: int, version: int, error: int, message: str | None,
                               data: bytes) -> bytes:
    body = struct.pack(">ih", correlation, error) + kstring(message) \
        + struct.pack(">i", len(data)) + data
    if version >= 1:
        body += struct.pack(">q", 0)  # session lifetime: none
    return frame(body)


# ------------------------------------------------------------------ the front
@dataclass(eq=False)
class Connection:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    client_id: str | None = None
    asked: dict[int, tuple[int, int, bytes]] = field(default_factory=dict)  # see _requests


@dataclass
class FrontStats:
    """What the front saw, for tests to assert that the path under test was taken."""

    tls_failures: int = 0                                    # handshakes that did not complete
    logins: dict[str, int] = field(default_factory=dict)     # mechanism -> completed
    refused_logins: int = 0
    requests: dict[tuple[int, int], int] = field(default_factory=dict)  # (api key, version) -> n
    denied: dict[str, int] = field(default_factory=dict)     # topic or group -> answers denied


class KafkaFront:
    """The front, its asyncio loop on a thread of its own; see the module docstring."""

    def __init__(self, upstream_port: int, port: int, tls: ssl.SSLContext | None = None,
                 users: dict[str, str] | None = None,
                 mechanisms: tuple[str, ...] = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")):
        self.upstream_port = upstream_port
        self.port = port
        self.tls = tls
        self.users = users  # None: no SASL
        self.mechanisms = mechanisms
        self.keep_client_ids: set[str] = set()
        # Authorization, as a broker's ACLs refuse a principal: a denied topic's metadata comes
        # back TOPIC_AUTHORIZATION_FAILED with no partitions, a denied group's coordinator
        # lookup GROUP_AUTHORIZATION_FAILED.
        self.denied_topics: set[str] = set()
        self.denied_groups: set[str] = set()
        self.stats = FrontStats()
        self.connections: set[Connection] = set()
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.Server | None = None
        self.serving_tls: ssl.SSLContext | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.flowing = asyncio.Event()  # cleared by stall(): nothing is passed on
        self.loop.call_soon_threadsafe(self.flowing.set)

    # -------------------------------------------------- control, from the test's thread
    def start(self) -> KafkaFront:
        self.thread.start()
        self._call(self._listen(self.tls))
        return self

    def stop(self) -> None:
        self._call(self._shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def refuse(self) -> None:
        """Connections refused: the port is closed, open connections are cut."""
        self._call(self._close())

    def serve_certificate(self, tls: ssl.SSLContext) -> None:
        """Serve another certificate (e.g. from a CA the clients do not trust); the port stays
        open throughout, so every reconnection meets it."""
        self._call(self._listen(tls))

    def stall(self) -> None:
        """Connections stay open and new ones are accepted, but no request is passed on: a
        broker that stopped answering (a hung node, a black-holed network)."""
        self.loop.call_soon_threadsafe(self.flowing.clear)

    def serve(self) -> None:
        """Back to normal: the right certificate, connections accepted."""
        self._call(self._listen(self.tls))

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    # -------------------------------------------------- on the loop
    async def _listen(self, tls: ssl.SSLContext | None) -> None:
        """Listen (if not yet) with `tls` for the connections to come, cutting those open.
        TLS is started on each connection, not by the server, so that a failed handshake can
        be counted."""
        self.serving_tls = tls
        await self._close(keep_listening=True)
        if self.server is None:
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                     reuse_address=True)

    async def _close(self, cut_all: bool = False, keep_listening: bool = False) -> None:
        if self.server is not None and not keep_listening:
            self.server.close()
            self.server = None
        for conn in list(self.connections):
            if cut_all or conn.client_id not in self.keep_client_ids:
                self._drop(conn)

    async def _shutdown(self) -> None:
        await self._close(cut_all=True)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if tasks:  # cut connections end their tasks; cancelling them makes asyncio complain
            await asyncio.wait(tasks, timeout=5)

    def _drop(self, conn: Connection) -> None:
        for writer in (conn.client, conn.upstream):
            if writer is not None:
                writer.transport.abort()
        self.connections.discard(conn)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(writer)
        self.connections.add(conn)
        try:
            if self.serving_tls is not None:
                try:
                    await writer.start_tls(self.serving_tls)
                except (OSError, ssl.SSLError):
                    self.stats.tls_failures += 1
                    raise
            up_reader, conn.upstream = await asyncio.open_connection("127.0.0.1",
                                                                     self.upstream_port)
            if await self._before_requests(conn, reader, up_reader):
                await asyncio.gather(self._requests(reader, conn),
                                     self._responses(up_reader, conn))
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError, AuthenticationFailed):
            pass
        finally:
            self._drop(conn)

    async def _requests(self, reader: asyncio.StreamReader, conn: Connection) -> None:
        """Client to broker, a frame at a time. The requests whose answers may be refused
        (metadata, coordinator lookups) are remembered by correlation id."""
        while True:
            data = await read_frame(reader)
            if conn.client_id not in self.keep_client_ids:
                await self.flowing.wait()
            api_key, version, correlation, _, body_at = request_header(data)
            self.stats.requests[(api_key, version)] = \
                self.stats.requests.get((api_key, version), 0) + 1
            if api_key in (METADATA, FIND_COORDINATOR):
                conn.asked[correlation] = (api_key, version, data[body_at:])
            conn.upstream.write(frame(data))
            await conn.upstream.drain()

    async def _responses(self, reader: asyncio.StreamReader, conn: Connection) -> None:
        """Broker to client, a frame at a time, with what the ACLs deny refused."""
        while True:
            data = await read_frame(reader)
            if conn.client_id not in self.keep_client_ids:
                await self.flowing.wait()
            asked = conn.asked.pop(struct.unpack_from(">i", data)[0], None)
            if asked is not None and (self.denied_topics or self.denied_groups):
                data = self._authorized(*asked, data)
            conn.client.write(frame(data))
            await conn.client.drain()

    def _authorized(self, api_key: int, version: int, request: bytes, response: bytes) -> bytes:
        if api_key == FIND_COORDINATOR:
            group = coordinator_key(request, version)
            if group in self.denied_groups:
                self.stats.denied[group] = self.stats.denied.get(group, 0) + 1
                return coordinator_refused(response, version)
            return response
        response, refused = metadata_without(response, version, self.denied_topics)
        for topic in refused:
            self.stats.denied[topic] = self.stats.denied.get(topic, 0) + 1
        return response

    async def _before_requests(self, conn: Connection, reader, up_reader) -> bool:
        """The first request (to learn the client id) and, with SASL, the login; True when
        the connection may go on to the broker."""
        mechanism = None
        while True:
            data = await read_frame(reader)
            api_key, version, correlation, conn.client_id, body_at = request_header(data)
            if api_key == API_VERSIONS:
                conn.upstream.write(frame(data))
                response = await read_frame(up_reader)
                if self.users is not None:
                    response = api_versions_with_sasl(response, version)
                conn.client.write(frame(response))
                if self.users is None:
                    return True
            elif self.users is None:
                conn.upstream.write(frame(data))
                return True
            elif api_key == SASL_HANDSHAKE:
                mechanism = self._handshake(conn, data[body_at:], correlation)
                if mechanism is None:
                    return False
            elif api_key == SASL_AUTHENTICATE and mechanism is not None:
                if not self._authenticate(conn, mechanism, data[body_at:], correlation, version):
                    return False
                if mechanism.done:
                    return True
            else:
                return False  # anything else before a login: as Kafka, hang up
            await conn.client.drain()

    def _handshake(self, conn: Connection, body: bytes, correlation: int):
        length = struct.unpack_from(">h", body)[0]
        name = body[2:2 + length].decode()
        ok = name in self.mechanisms
        listed = b"".join(kstring(m) for m in self.mechanisms)
        conn.client.write(frame(struct.pack(">ih", correlation, 0 if ok else
                                            UNSUPPORTED_SASL_MECHANISM)
                                + struct.pack(">i", len(self.mechanisms)) + listed))
        return mechanism_for(name, self.users) if ok else None

    def _authenticate(self, conn: Connection, mechanism, body: bytes, correlation: int,
                      version: int) -> bool:
        length = struct.unpack_from(">i", body)[0]
        try:
            answer = mechanism.step(body[4:4 + length])
        except AuthenticationFailed as exc:
            self.stats.refused_logins += 1
            conn.client.write(sasl_authenticate_response(
                correlation, version, SASL_AUTHENTICATION_FAILED, str(exc), b""))
            return False
        conn.client.write(sasl_authenticate_response(correlation, version, 0, None, answer))
        if mechanism.done:
            self.stats.logins[mechanism.name] = self.stats.logins.get(mechanism.name, 0) + 1
        return True


# ------------------------------------------------------------------ certificates, with openssl
def make_ca(directory, name: str) -> tuple[str, str]:
    """A CA (key, certificate) made with the openssl command line."""
    import subprocess
    key, cert = f"{directory}/{name}.key", f"{directory}/{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", f"/CN={name}"], check=True, capture_output=True)
    return key, cert


def make_server_cert(directory, ca: tuple[str, str], name: str,
                     names: str = "IP:127.0.0.1,DNS:localhost") -> tuple[str, str]:
    """A server certificate for `names` (its subjectAltName: by default 127.0.0.1 and
    localhost), signed by `ca`."""
    import subprocess
    key, csr, cert = (f"{directory}/{name}.key", f"{directory}/{name}.csr",
                      f"{directory}/{name}.pem")
    ext = f"{directory}/{name}.ext"
    with open(ext, "w") as out:
        out.write(f"subjectAltName={names}\n"
                  "extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
    subprocess.run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0],
                    "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", ext],
                   check=True, capture_output=True)
    return key, cert


def server_context(key_cert: tuple[str, str]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(key_cert[1], key_cert[0])
    return context
