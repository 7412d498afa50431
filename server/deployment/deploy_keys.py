"""Key material for a deployed federation: the SuperLink's TLS certificates, node key pairs.

Written with the ``cryptography`` package (already installed as a Flower dependency) rather
than the ``openssl`` tool: the result is the same on every operating system and OpenSSL
version (subject alternative names need a config file on older ``openssl``), and each private
key goes straight from memory to a 0600 file, atomically, with no moment where it is readable
by others or half-written.

Formats are what Flower 1.41 expects:

- TLS (``flower-superlink --ssl-*``, ``flower-supernode --root-certificates``): PEM. The
  server certificate is signed by a private CA and names every host or IP address the
  SuperNodes and the ``flwr`` CLI dial, so their TLS check succeeds without the system store.
- SuperNode authentication (``flower-supernode --auth-supernode-private-key``,
  ``flwr supernode register``): an elliptic-curve key on a NIST curve (P-384 here), the
  private half in OpenSSH format (``load_ssh_private_key``), the public half as an OpenSSH
  line (``ecdsa-sha2-nistp384 AAAA... comment``).
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.atomic import atomic_write_bytes
from common.errors import FedFuseError

CURVE = ec.SECP384R1()
PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


@dataclass(frozen=True)
class TlsFiles:
    """Where ``write_certificates`` put the CA and the SuperLink's certificate and key."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeys:
    """A platform's authentication key pair: the private key never leaves the platform."""

    private_key: Path
    public_key: Path


def _refuse_to_overwrite(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise FedFuseError(f"{existing[0]}: exists (pass --force to replace the key material)")


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _subject_alternative_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def write_certificates(
    out: Path, hosts: list[str], days: int = 365, force: bool = False
) -> TlsFiles:
    """A private CA and a SuperLink server certificate for ``hosts`` (DNS names or IPs)."""
    if not hosts:
        raise FedFuseError("deploy certs: name at least one --host the SuperNodes will dial")
    if days < 1:
        raise FedFuseError(f"deploy certs: --days must be at least 1 (got {days})")
    files = TlsFiles(out / "ca.crt", out / "ca.key", out / "server.crt", out / "server.key")
    _refuse_to_overwrite([files.ca_key, files.server_key], force)
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    end = start + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(CURVE)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FedFuse federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(CURVE)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(_subject_alternative_names(hosts)), False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )

    # Keys first: a certificate on disk always has its key beside it.
    atomic_write_bytes(files.ca_key, _private_pem(ca_key), PRIVATE_MODE)
    atomic_write_bytes(files.server_key, _private_pem(server_key), PRIVATE_MODE)
    atomic_write_bytes(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    atomic_write_bytes(
        files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE
    )
    return files


def check_name(name: str, what: str = "platform name") -> str:
    """Platform and run names become file names and node-config values: keep them plain."""
    if not PLAIN_NAME.match(name):
        raise FedFuseError(
            f"{what} {name!r}: use letters, digits, '_', '.', '-' (not starting with '.' or '-')"
        )
    return name


def write_node_keys(out: Path, platform: str, force: bool = False) -> NodeKeys:
    """``OUT/PLATFORM.key`` (0600, OpenSSH) and ``OUT/PLATFORM.pub`` for SuperNode auth."""
    check_name(platform)
    keys = NodeKeys(out / f"{platform}.key", out / f"{platform}.pub")
    _refuse_to_overwrite([keys.private_key], force)
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    atomic_write_bytes(keys.private_key, private, PRIVATE_MODE)
    atomic_write_bytes(keys.public_key, public + f" fedfuse-{platform}\n".encode(), PUBLIC_MODE)
    return keys
