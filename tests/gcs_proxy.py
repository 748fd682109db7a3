"""A forward proxy that lets TensorFlow's GCS file system (tf.io.gfile, and so
seqio and etils.epath) talk to the plain-HTTP GCS emulator of the tests.

TF's tsl GCS filesystem hard-codes https://www.googleapis.com/storage/v1/,
https://www.googleapis.com/upload/storage/v1/ and https://storage.googleapis.com
(no endpoint override), but its libcurl honours `https_proxy` / `http_proxy`
and `CURL_CA_BUNDLE`. This proxy
  * answers `CONNECT host:443`, terminates TLS with a test certificate for
    *.googleapis.com (signed by a test CA given to TF via CURL_CA_BUNDLE), and
  * also accepts plain absolute-form proxy requests (`POST http://host/...`),
    which curl sends when the emulator returns an http:// resumable-upload
    `Location` header,
and forwards every request to the emulator at EMULATOR_HOST:PORT, dropping the
`Transfer-Encoding: identity` header TF adds to empty-body requests (Go's
net/http, i.e. fake-gcs-server, rejects it with 501).

usage: python gcs_proxy.py LISTEN_PORT EMULATOR_HOST:PORT CERT.pem KEY.pem
(LISTEN_PORT 0 = pick a free port; the chosen port is printed on stdout.)
"""
import socket
import ssl
import sys
import threading
import urllib.parse


class _Reader:
  """Buffered reader over a socket (plain or TLS)."""

  def __init__(self, sock):
    self.sock = sock
    self.buf = b""

  def _fill(self):
    data = self.sock.recv(65536)
    if not data:
      raise EOFError
    self.buf += data

  def read_head(self):
    while b"\r\n\r\n" not in self.buf:
      self._fill()
    head, _, self.buf = self.buf.partition(b"\r\n\r\n")
    return head

  def read_line(self):
    while b"\r\n" not in self.buf:
      self._fill()
    line, _, self.buf = self.buf.partition(b"\r\n")
    return line

  def read_exact(self, n):
    while len(self.buf) < n:
      self._fill()
    out, self.buf = self.buf[:n], self.buf[n:]
    return out


def _pipe(src, dst):
  try:
    while True:
      data = src.recv(65536)
      if not data:
        break
      dst.sendall(data)
  except OSError:
    pass
  finally:
    for s in (src, dst):
      try:
        s.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass


def _forward_requests(reader, upstream):
  """Forwards HTTP/1.1 requests (Content-Length bodies) from reader."""
  while True:
    try:
      head = reader.read_head()
    except (EOFError, OSError):
      return
    lines = head.decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ", 2)
    if target.startswith(("http://", "https://")):
      u = urllib.parse.urlsplit(target)
      target = u.path + ("?" + u.query if u.query else "")
    headers = []
    length = 0
    chunked = expect_continue = False
    for h in lines[1:]:
      name, _, value = h.partition(":")
      lname, lvalue = name.strip().lower(), value.strip().lower()
      if lname == "transfer-encoding":
        # TF adds `identity` to empty bodies (Go rejects it with 501); curl
        # adds `chunked` next to TF's own Content-Length on PUT uploads.
        chunked = chunked or lvalue == "chunked"
        continue
      if lname == "expect" and lvalue == "100-continue":
        expect_continue = True
        continue
      if lname in ("proxy-connection", "content-length"):
        if lname == "content-length":
          length = int(value.strip())
        continue
      headers.append(h)
    if expect_continue:
      reader.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    if chunked:
      body = b""
      while True:
        size = int(reader.read_line().split(b";")[0].strip(), 16)
        if size == 0:
          while reader.read_line():  # trailers, then the empty line
            pass
          break
        body += reader.read_exact(size)
        reader.read_exact(2)
    else:
      body = reader.read_exact(length) if length else b""
    headers.append(f"Content-Length: {len(body)}")
    out = "\r\n".join([f"{method} {target} {version}"] + headers) + "\r\n\r\n"
    upstream.sendall(out.encode("latin-1") + body)


def _handle(client, upstream_addr, ctx):
  try:
    reader = _Reader(client)
    head = reader.read_head()
    method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
    if method == "CONNECT":
      client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
      client = ctx.wrap_socket(client, server_side=True)
      reader = _Reader(client)
    else:  # absolute-form plain-http proxy request: replay it.
      reader.buf = head + b"\r\n\r\n" + reader.buf
    up = socket.create_connection(upstream_addr)
    t = threading.Thread(target=_pipe, args=(up, client), daemon=True)
    t.start()
    _forward_requests(reader, up)
    try:
      up.shutdown(socket.SHUT_WR)
    except OSError:
      pass
    t.join()
  except Exception as e:  # pylint: disable=broad-except
    print("proxy error:", repr(e), file=sys.stderr, flush=True)
  finally:
    try:
      client.close()
    except OSError:
      pass


def serve(port, upstream, cert, key):
  host, uport = upstream.rsplit(":", 1)
  ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  ctx.load_cert_chain(cert, key)
  srv = socket.socket()
  srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  srv.bind(("127.0.0.1", port))
  srv.listen(128)
  print(srv.getsockname()[1], flush=True)
  while True:
    c, _ = srv.accept()
    threading.Thread(target=_handle, args=(c, (host, int(uport)), ctx),
                     daemon=True).start()


if __name__ == "__main__":
  serve(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
