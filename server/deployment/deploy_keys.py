"""Key material for a deployed federation: the SuperLink's TLS certificates, node key pairs.

Written with the ``cryptography`` package (already installed as a Flower dependency) rather
than the ``openssl`` tool: the result is the same on every operating system and OpenSSL
version (subject alternative names need a config file on older ``openssl``), and each private
key goes straight from memory to a 0600 file, atomically, with no moment where it is readable
by others or half-written.

The CA is kept apart from what the SuperLink host holds: its key goes to its own 0700 folder
(meant to be kept offline, optionally passphrase-encrypted), it lives longer than the server
certificate, and a renewal replaces only the server's key and certificate, so the platforms'
``ca.crt`` stays valid.

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
CA_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FedFuse federation CA")])
# The Control and Runtime APIs are reached on loopback: the certificate always names it.
LOOPBACK_NAMES = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class TlsFiles:
    """The SuperLink's folder (CA certificate, its certificate and key) and the CA's own."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def at(cls, certs: Path, ca_dir: Path) -> TlsFiles:
        return cls(certs / "ca.crt", ca_dir / "ca.key", certs / "server.crt", certs / "server.key")


@dataclass(frozen=True)
class NodeKeys:
    """A platform's authentication key pair: the private key never leaves the platform."""

    private_key: Path
    public_key: Path


def _refuse_to_overwrite(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise FedFuseError(f"{existing[0]}: exists (pass --force to replace the key material)")


def _private_pem(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _private_folder(folder: Path) -> None:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)


def _subject_alternative_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, *LOOPBACK_NAMES]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _ca_certificate(key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    return (
        x509.CertificateBuilder()
        .subject_name(CA_NAME)
        .issuer_name(CA_NAME)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA384())
    )


def _server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    server_key: ec.EllipticCurvePrivateKey,
    hosts: list[str],
    days: int,
) -> x509.Certificate:
    """The SuperLink's leaf: it must end before the CA does (renew it alone, keep the CA)."""
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    end = start + datetime.timedelta(days=days)
    if end >= ca_cert.not_valid_after_utc:
        raise FedFuseError(
            f"--days {days}: the server certificate would outlive the CA (valid until "
            f"{ca_cert.not_valid_after_utc:%Y-%m-%d}); ask for fewer days or make a new CA"
        )
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
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


def _write_server(files: TlsFiles, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    atomic_write_bytes(files.server_key, _private_pem(key), PRIVATE_MODE)  # the key first
    atomic_write_bytes(
        files.server_cert, cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE
    )


def write_certificates(
    certs: Path,
    ca_dir: Path,
    hosts: list[str],
    days: int = 365,
    ca_days: int = 3650,
    passphrase: bytes | None = None,
    force: bool = False,
) -> TlsFiles:
    """A private CA in ``ca_dir`` (its key optionally encrypted; keep the folder offline) and
    the SuperLink's certificate for ``hosts`` (DNS names or IPs) in ``certs``."""
    if not hosts:
        raise FedFuseError("deploy certs: name at least one --host the SuperNodes will dial")
    if days < 1:
        raise FedFuseError(f"deploy certs: --days must be at least 1 (got {days})")
    if certs.resolve() == ca_dir.resolve():
        raise FedFuseError(f"{ca_dir}: the CA folder must not be the SuperLink's certificates")
    files = TlsFiles.at(certs, ca_dir)
    _refuse_to_overwrite([files.ca_key, files.server_key], force)
    ca_key = ec.generate_private_key(CURVE)
    ca_cert = _ca_certificate(ca_key, ca_days)
    server_key = ec.generate_private_key(CURVE)
    server_cert = _server_certificate(ca_key, ca_cert, server_key, hosts, days)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _private_folder(ca_dir)
    _private_folder(certs)
    # Keys first: a certificate on disk always has its key beside it.
    atomic_write_bytes(files.ca_key, _private_pem(ca_key, passphrase), PRIVATE_MODE)
    atomic_write_bytes(ca_dir / "ca.crt", ca_pem, PUBLIC_MODE)
    atomic_write_bytes(files.ca_cert, ca_pem, PUBLIC_MODE)
    _write_server(files, server_key, server_cert)
    return files


def renew_server_certificate(
    certs: Path,
    ca_dir: Path,
    hosts: list[str] | None = None,
    days: int = 365,
    passphrase: bytes | None = None,
) -> TlsFiles:
    """A new SuperLink key and certificate from the same CA: platforms keep their ``ca.crt``.
    Without ``hosts`` the names of the current certificate are kept."""
    files = TlsFiles.at(certs, ca_dir)
    try:
        ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), passphrase)
        ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
        current = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    except FileNotFoundError as err:
        raise FedFuseError(f"{err.filename}: not found (run `deploy certs` first)") from None
    except (TypeError, ValueError) as err:
        raise FedFuseError(f"{files.ca_key}: cannot read the CA key ({err})") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise FedFuseError(f"{files.ca_key}: not an EC key written by `deploy certs`")
    if files.ca_cert.read_bytes() != ca_cert.public_bytes(serialization.Encoding.PEM):
        raise FedFuseError(f"{files.ca_cert}: not the CA in {ca_dir}")
    if not hosts:
        names = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        hosts = [current.subject.rfc4514_string().removeprefix("CN=")]
        hosts += [str(n.value) for n in names if str(n.value) not in LOOPBACK_NAMES]
    if days < 1:
        raise FedFuseError(f"deploy renew: --days must be at least 1 (got {days})")
    server_key = ec.generate_private_key(CURVE)
    _write_server(files, server_key, _server_certificate(ca_key, ca_cert, server_key, hosts, days))
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
    _private_folder(out)
    atomic_write_bytes(keys.private_key, private, PRIVATE_MODE)
    atomic_write_bytes(keys.public_key, public + f" fedfuse-{platform}\n".encode(), PUBLIC_MODE)
    return keys
