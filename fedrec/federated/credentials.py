"""Demo credentials for the networked runtime: a CA, the coordinator's TLS certificate, node keys.

Made with the `cryptography` package (which Flower itself uses). Only for demos and tests on
loopback: in production the operator's own PKI issues the coordinator's certificate, and each
merchant makes its own node key pair and sends only the public key to the operator to register
(`flwr supernode register`). Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedrec.errors import ConfigError
from fedrec.folder_names import RULE, folder_name_problem

VALID_DAYS = 30


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def _name(common: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrec demo"), x509.NameAttribute(NameOID.COMMON_NAME, common)]
    )


def make_tls(out: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")) -> dict[str, Path]:
    """ca.crt, server.pem, server.key under `out`; the certificate names every host in `hosts`."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("fedrec demo CA"))
        .issuer_name(_name("fedrec demo CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": out / "ca.crt", "cert": out / "server.pem", "key": out / "server.key"}
    _write(paths["ca"], ca.public_bytes(serialization.Encoding.PEM))
    _write(paths["cert"], cert.public_bytes(serialization.Encoding.PEM))
    _write(paths["key"], _pem_key(key), private=True)
    return paths


def check_node_name(name: str) -> str:
    """`name`, when it can be a key's file name: it may not climb out of the keys folder ("../x").
    The same rule as a merchant's name, as the demo names each node's key after its merchant."""
    if (why := folder_name_problem(name)) is not None:
        raise ConfigError(f"node name {name!r} {why} ({RULE})")
    return name


def make_node_key(out: Path, name: str) -> tuple[Path, Path]:
    """An EC key pair for SuperNode authentication (OpenSSH format, as Flower reads it)."""
    check_node_name(name)
    key = ec.generate_private_key(ec.SECP384R1())
    private = out / name
    public = out / f"{name}.pub"
    _write(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
        private=True,
    )
    _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return private, public
