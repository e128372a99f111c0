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


@dataclass
class FrontStats:
    """What the front saw, for tests to assert that the path under test was taken."""

    tls_failures: int = 0                                    # handshakes that did not complete
    logins: dict[str, int] = field(default_factory=dict)     # mechanism -> completed
    refused_logins: int = 0


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
                await asyncio.gather(self._pump(reader, conn.upstream, conn),
                                     self._pump(up_reader, writer, conn))
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError, AuthenticationFailed):
            pass
        finally:
            self._drop(conn)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    conn: Connection) -> None:
        while data := await reader.read(65536):
            if conn.client_id not in self.keep_client_ids:
                await self.flowing.wait()
            writer.write(data)
            await writer.drain()
        writer.transport.abort()

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


def make_server_cert(directory, ca: tuple[str, str], name: str) -> tuple[str, str]:
    """A server certificate for 127.0.0.1 and localhost (subjectAltName), signed by `ca`."""
    import subprocess
    key, csr, cert = (f"{directory}/{name}.key", f"{directory}/{name}.csr",
                      f"{directory}/{name}.pem")
    ext = f"{directory}/{name}.ext"
    with open(ext, "w") as out:
        out.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
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
