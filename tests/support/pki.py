"""Throwaway PKI for tests and the demo: a CA, broker and device certificates, generated at run time.

Uses `cryptography` for everything except SHA1 signatures, which cryptography refuses to create;
those go through the `openssl` command line, as an operator with a legacy CA would have done.

    python -m tests.support.pki DIR    # writes ca.pem, broker.pem/.key, device.pem/.key into DIR
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.config import is_ip_address

UTC = datetime.timezone.utc


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path
    name: str


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    path.chmod(0o600)


def _key_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, password: str | None = None) -> bytes:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


class TestCA:
    """A certificate authority in `directory`. Keys are written with mode 0600."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "mqtt-agent test CA") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        slug = name.lower().replace(" ", "-")
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
        )
        self.cert = builder.sign(self.key, hashes.SHA256())
        self.cert_path = self.dir / f"{slug}.pem"
        self.key_path = self.dir / f"{slug}.key"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        _write_private(self.key_path, _key_pem(self.key))

    def issue(
        self,
        name: str,
        *,
        sans: list[str] | None = None,
        server: bool = False,
        sha1: bool = False,
        key_type: str = "ec",
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        key_password: str | None = None,
        filename: str | None = None,
    ) -> Issued:
        """Issue a certificate for `name` (CN, and SAN unless `sans` is given)."""
        base = filename or name.replace("/", "_")
        cert_path = self.dir / f"{base}.pem"
        key_path = self.dir / f"{base}.key"
        key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
        if sha1 or key_type == "rsa":
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            key = ec.generate_private_key(ec.SECP256R1())
        _write_private(key_path, _key_pem(key, key_password))
        now = datetime.datetime.now(UTC)
        nb = not_before or now - datetime.timedelta(hours=1)
        na = not_after or now + datetime.timedelta(days=30)
        if sha1:
            self._issue_sha1(name, key, cert_path, sans if sans is not None else [name], server, nb, na)
            return Issued(cert_path, key_path, name)
        eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(nb)
            .not_valid_after(na)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(_san(sans if sans is not None else [name]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return Issued(cert_path, key_path, name)

    def _issue_sha1(self, name: str, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, cert_path: Path,
                    sans: list[str], server: bool, nb: datetime.datetime, na: datetime.datetime) -> None:
        # cryptography refuses SHA1 signatures; the openssl CLI still makes them (as legacy CAs did).
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .sign(key, hashes.SHA256())
        )
        csr_path = cert_path.with_suffix(".csr")
        csr_path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
        ext_path = cert_path.with_suffix(".ext")
        san_text = ",".join(
            (f"IP:{n}" if is_ip_address(n) else f"DNS:{n}") for n in sans
        )
        eku = "serverAuth" if server else "clientAuth"
        ext_path.write_text(f"basicConstraints=critical,CA:FALSE\nextendedKeyUsage={eku}\n"
                            + (f"subjectAltName={san_text}\n" if san_text else ""))
        days = max(1, (na - nb).days)
        subprocess.run(
            ["openssl", "x509", "-req", "-sha1", "-in", str(csr_path), "-CA", str(self.cert_path),
             "-CAkey", str(self.key_path), "-set_serial", str(x509.random_serial_number()),
             "-days", str(days), "-extfile", str(ext_path), "-out", str(cert_path)],
            check=True, capture_output=True,
        )
        csr_path.unlink()
        ext_path.unlink()


def sign_csr(ca: TestCA, csr_pem: bytes, days: int = 2) -> bytes:
    """Sign a CSR as a renewal backend would: its subject plus O=renewed, its requested extensions copied."""
    csr = x509.load_pem_x509_csr(csr_pem)
    now = datetime.datetime.now(UTC)
    subject = x509.Name([*csr.subject, x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "renewed")])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.cert.subject)
               .public_key(csr.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=1))
               .not_valid_after(now + datetime.timedelta(days=days)))
    for ext in csr.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def sign_csr_file(ca: TestCA, csr_path: Path, out: Path, *, days: int = 30,
                  eku: list[x509.ObjectIdentifier] | None = None, not_before: datetime.datetime | None = None,
                  not_after: datetime.datetime | None = None, issuer_cert: x509.Certificate | None = None,
                  issuer_key: rsa.RSAPrivateKey | None = None) -> Path:
    """Sign a CSR file as the fleet CA would (CN and SAN from the CSR, client auth unless `eku` says)."""
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    now = datetime.datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name((issuer_cert or ca.cert).subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(hours=1))
        .not_valid_after(not_after or now + datetime.timedelta(days=days))
        .add_extension(x509.ExtendedKeyUsage(eku or [ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    cert = builder.sign(issuer_key or ca.key, hashes.SHA256())
    out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out


def intermediate_ca(ca: TestCA, name: str = "fleet intermediate") -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """An intermediate CA certificate (path length 0) signed by `ca`, and its key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca.key, hashes.SHA256())
    )
    return cert, key


@dataclass(frozen=True)
class DemoPKI:
    ca: Path
    broker: Issued
    device: Issued


def make_demo_pki(directory: Path, device_id: str = "demo-gateway") -> DemoPKI:
    """CA + broker certificate for localhost/127.0.0.1/::1 + device certificate for `device_id`."""
    ca = TestCA(directory)
    broker = ca.issue("localhost", sans=["localhost", "127.0.0.1", "::1"], server=True, filename="broker")
    device = ca.issue(device_id, filename="device")
    return DemoPKI(ca.cert_path, broker, device)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "pki")
    made = make_demo_pki(out, sys.argv[2] if len(sys.argv) > 2 else "demo-gateway")
    print(f"CA {made.ca}\nbroker {made.broker.cert}\ndevice {made.device.cert}")
