"""A real redis-server that speaks TLS only, with a private CA (the shape of a managed Redis with
transit encryption, e.g. ElastiCache behind `rediss://`), for tests of the clients that use it."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from ember.platform.redis_server import find_redis_server, free_port

PASSWORD = "pw-tls"


def certificates(d: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 signed by it (PEM files in `d`)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ember test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False).sign(ca_key, hashes.SHA256()))
    paths = d / "ca.pem", d / "server.pem", d / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@contextmanager
def tls_redis(d: Path) -> Iterator[tuple[int, Path]]:
    """A TLS-only redis-server on loopback (AUTH `PASSWORD`, no plain port): yields (port, CA file).
    Skips the test when this redis-server was built without TLS."""
    ca, cert, key = certificates(d)
    port = free_port()
    server = subprocess.Popen([find_redis_server(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                               "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                               "--tls-auth-clients", "no", "--requirepass", PASSWORD, "--save", "",
                               "--appendonly", "no", "--dir", str(d)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        probe = redis.Redis.from_url(f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={ca}")
        deadline = time.monotonic() + 10
        while True:
            if server.poll() is not None:
                out = server.stdout.read().decode(errors="replace") if server.stdout else ""
                low = out.lower()  # redis-server: "not supported"/"bad directive"; valkey: "failed finding tls support"
                if "tls" in low and ("not supported" in low or "bad directive" in low or "failed finding tls" in low):
                    pytest.skip("this Redis server was built without TLS")
                raise AssertionError(out)
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        probe.close()
        yield port, ca
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
