"""TensorFlow's own gs:// client, served on localhost: an HTTPS proxy that terminates TLS.

TF's GCS client has its endpoints compiled in (https://www.googleapis.com/storage/v1/,
https://storage.googleapis.com/), but its libcurl honours `https_proxy` and `CURL_CA_BUNDLE`.
This proxy answers CONNECT, speaks TLS with a certificate for those hosts signed by a CA made
for the test, and hands each request to a GCS emulator on localhost (gcp-storage-emulator), so
`tf.io.gfile` on `gs://bucket/...` runs for real against it: a missing bucket is the
emulator's own 404. Buckets named in `refusals` get the status Google's service gives a caller
it refuses (401 without valid credentials, 403 without permission: the emulator has no IAM),
in GCS's JSON error format.

  proxy = GcsTlsProxy(emulator_url, folder, refusals={"locked": (403, "... access ...")})
  env = proxy.environment()   # https_proxy, CURL_CA_BUNDLE, a token: for a subprocess

or, with the emulator started on a free port too:

  with served_emulator(folder, "bucket") as (env, proxy): ...
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import json
import os
import re
import socket
import ssl
import threading
import urllib.parse

GCS_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
_BUCKET_IN_PATH = (re.compile(r"^/(?:upload/|download/)?storage/v1/b/([^/?]+)"),  # JSON API
                   re.compile(r"^/([^/?]+)"))  # storage.googleapis.com/BUCKET/OBJECT


def make_certificates(folder: str) -> tuple[str, str]:
  """A CA (ca.pem, for CURL_CA_BUNDLE) and a key and certificate for GCS_HOSTS signed by it
  (server.pem); returns their paths."""
  from cryptography import x509  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives import hashes, serialization  # pylint: disable=g-import-not-at-top,g-multiple-import
  from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
  from cryptography.x509.oid import NameOID  # pylint: disable=g-import-not-at-top

  now = datetime.datetime.now(datetime.timezone.utc)

  def certificate(subject, public_key, signing_key, issuer, extension):
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(extension, critical=False).sign(signing_key, hashes.SHA256()))

  ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
      ec.SECP256R1())
  ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "script_jax test CA")])
  ca = certificate(ca_name, ca_key.public_key(), ca_key, ca_name,
                   x509.BasicConstraints(ca=True, path_length=None))
  server = certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, GCS_HOSTS[0])]),
                       server_key.public_key(), ca_key, ca_name,
                       x509.SubjectAlternativeName([x509.DNSName(h) for h in GCS_HOSTS]))
  ca_path, server_path = os.path.join(folder, "ca.pem"), os.path.join(folder, "server.pem")
  with open(ca_path, "wb") as f:
    f.write(ca.public_bytes(serialization.Encoding.PEM))
  with open(server_path, "wb") as f:
    f.write(server.public_bytes(serialization.Encoding.PEM) + server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
  return ca_path, server_path


def accept_empty_uploads(monkeypatch) -> None:
  """Zero-byte media uploads (TF makes a folder as an empty `name/` object) are stored.

  gcp-storage-emulator reads an empty body as None and fails on its length (a TypeError, so
  the client sees a dropped connection); GCS stores the empty object.
  """
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  media_upload = objects._media_upload  # pylint: disable=protected-access

  def media_upload_of_empty_bodies(request, response, storage):
    if request.data is None:
      request._data = b""  # pylint: disable=protected-access
    return media_upload(request, response, storage)

  monkeypatch.setattr(objects, "_media_upload", media_upload_of_empty_bodies)


def bucket_of(path: str) -> str | None:
  """The bucket a GCS request path names (JSON API or XML-style download)."""
  for pattern in _BUCKET_IN_PATH:
    match = pattern.match(path)
    if match:
      return urllib.parse.unquote(match.group(1))
  return None


def _read_head(stream) -> tuple[bytes, list[tuple[str, str]]]:
  """The request line and headers of one HTTP/1.1 request ('' at the end of the stream)."""
  line = stream.readline()
  headers = []
  while True:
    header = stream.readline()
    if header in (b"\r\n", b"\n", b""):
      return line, headers
    name, _, value = header.decode("latin-1").partition(":")
    headers.append((name.strip(), value.strip()))


def _read_chunks(stream) -> bytes:
  """A chunked request body, read off the stream."""
  body = b""
  while True:
    size = int(stream.readline().split(b";")[0], 16)
    if size == 0:
      while stream.readline() not in (b"\r\n", b"\n", b""):  # trailers
        pass
      return body
    body += stream.read(size)
    stream.readline()


def _unchunk(data: bytes) -> bytes:
  """The body of a chunked transfer (the emulator sends chunks in HTTP/1.0 replies)."""
  body, rest = b"", data
  while rest:
    size_line, _, rest = rest.partition(b"\r\n")
    size = int(size_line.split(b";")[0], 16)
    if size == 0:
      break
    body, rest = body + rest[:size], rest[size + 2:]
  return body


def _response(status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
  head = [f"HTTP/1.1 {status} {http.client.responses.get(status, 'Status')}"]
  head += [f"{k}: {v}" for k, v in headers if k.lower() not in (
      "content-length", "transfer-encoding", "connection")]
  head += [f"Content-Length: {len(body)}", "Connection: keep-alive"]
  return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class GcsTlsProxy:
  """The proxy, serving on a thread from construction until close()."""

  def __init__(self, emulator_url: str, folder: str,
               refusals: dict[str, tuple[int, str]] | None = None):
    self._emulator = urllib.parse.urlparse(emulator_url)
    self._refusals = dict(refusals or {})
    self.ca_path, server_path = make_certificates(folder)
    self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self._tls.load_cert_chain(server_path)
    self._socket = socket.socket()
    self._socket.bind(("127.0.0.1", 0))
    self._socket.listen(64)
    self.port = self._socket.getsockname()[1]
    self.requests: list[tuple[str, str]] = []  # (method, path) of every request served
    self.bytes_served = 0  # response bodies sent to clients (what a reader downloads)
    threading.Thread(target=self._accept, daemon=True).start()

  def environment(self) -> dict[str, str]:
    """What a process needs for its gs:// to land here."""
    return {"https_proxy": f"http://127.0.0.1:{self.port}",
            "HTTPS_PROXY": f"http://127.0.0.1:{self.port}",
            "CURL_CA_BUNDLE": self.ca_path,
            # TF's GCS client asks for no token when it is handed one.
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token"}

  def close(self) -> None:
    self._socket.close()

  def _accept(self) -> None:
    while True:
      try:
        client, _ = self._socket.accept()
      except OSError:  # closed
        return
      threading.Thread(target=self._serve, args=(client,), daemon=True).start()

  def _serve(self, client: socket.socket) -> None:
    try:
      line, _ = _read_head(client.makefile("rb"))
      method, target, _ = line.decode("latin-1").split(" ", 2)
      if method != "CONNECT" or target.split(":")[0] not in GCS_HOSTS:
        client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
        return
      client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
      with self._tls.wrap_socket(client, server_side=True) as tls:
        stream = tls.makefile("rb")
        while self._serve_request(stream, tls):
          pass
    except (OSError, ValueError, ssl.SSLError):
      pass  # a client that went away
    finally:
      client.close()

  def _serve_request(self, stream, tls) -> bool:
    line, headers = _read_head(stream)
    if not line.strip():
      return False
    method, path, _ = line.decode("latin-1").split(" ", 2)
    if any(k.lower() == "expect" and "100-continue" in v.lower() for k, v in headers):
      tls.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    if any(k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in headers):
      body = _read_chunks(stream)  # TF's uploads
    else:
      length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
      body = stream.read(length) if length else b""
    self.requests.append((method, path))
    refusal = self._refusals.get(bucket_of(path) or "")
    if refusal:
      status, message = refusal
      reply = json.dumps({"error": {"code": status, "message": message,
                                    "errors": [{"message": message, "domain": "global"}]}})
      tls.sendall(_response(status, [("Content-Type", "application/json")], reply.encode()))
      return True
    emulator = http.client.HTTPConnection(self._emulator.hostname, self._emulator.port,
                                          timeout=60)
    try:
      emulator.request(method, path, body=body, headers={
          k: v for k, v in headers
          if k.lower() not in ("host", "connection", "expect", "transfer-encoding")})
      answer = emulator.getresponse()
      data = answer.read()
      chunked = any(k.lower() == "transfer-encoding" and "chunked" in v.lower()
                    for k, v in answer.getheaders())
      if chunked and answer.version == 10:  # chunks under HTTP/1.0: http.client keeps them
        data = _unchunk(data)
      # A resumable upload's session URL names the emulator: send the upload back through here.
      emulator_url = f"http://{self._emulator.netloc}"
      headers = [(k, v.replace(emulator_url, f"https://{GCS_HOSTS[0]}"))
                 for k, v in answer.getheaders()]
      self.bytes_served += len(data)
      tls.sendall(_response(answer.status, headers, data))
    finally:
      emulator.close()
    return True


def free_port() -> int:
  """A localhost port nothing listens on (at the time of asking)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def served_emulator(folder: str, default_bucket: str,
                    refusals: dict[str, tuple[int, str]] | None = None):
  """gcp-storage-emulator (in memory, with `default_bucket`) behind a GcsTlsProxy whose
  certificates go in `folder`: yields (the environment that sends a subprocess's gs:// there,
  the proxy)."""
  import pytest  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator import server as emulator_server  # pylint: disable=g-import-not-at-top
  monkeypatch = pytest.MonkeyPatch()
  accept_empty_uploads(monkeypatch)
  port = free_port()
  server = emulator_server.create_server("127.0.0.1", port, in_memory=True,
                                         default_bucket=default_bucket)
  server.start()
  proxy = GcsTlsProxy(f"http://127.0.0.1:{port}", folder, refusals)
  env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "all_proxy")}
  env.update(proxy.environment(), TF_CPP_MIN_LOG_LEVEL="2")
  try:
    yield env, proxy
  finally:
    proxy.close()
    server.stop()
    monkeypatch.undo()
