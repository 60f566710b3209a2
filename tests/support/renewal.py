"""Helpers for the certificate renewal tests: signer scripts (the docs' `openssl ca` example), short-lived
certificates, CRLs, and what the broker saw (mosquitto with `use_subject_as_username` logs the subject)."""

from __future__ import annotations

import datetime
import re
import textwrap
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.support.pki import Issued, TestCA

UTC = datetime.timezone.utc
DEVICE_ID = "dev-1"


def script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\nset -e\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def openssl_signer(tmp_path: Path, ca: TestCA, *, serial: int = 0x1000, name: str = "sign.sh") -> str:
    """The worked example of docs/renewal.md: plain `openssl ca` as the exec signer (CSR on stdin, the
    certificate on stdout), plus `-subj` adding O=renewed so the broker's log shows which pair it got."""
    ca_dir = tmp_path / f"{name}.ca"
    (ca_dir / "newcerts").mkdir(parents=True)
    (ca_dir / "index.txt").write_text("")
    (ca_dir / "serial").write_text(f"{serial:X}\n")
    (ca_dir / "openssl-ca.cnf").write_text(textwrap.dedent(f"""\
        [ ca ]
        default_ca = fleet

        [ fleet ]
        dir              = {ca_dir}
        database         = $dir/index.txt
        new_certs_dir    = $dir/newcerts
        serial           = $dir/serial
        certificate      = {ca.cert_path}
        private_key      = {ca.key_path}
        default_md       = sha256
        default_days     = 2
        policy           = device_policy
        copy_extensions  = none
        x509_extensions  = device_cert
        unique_subject   = no
        email_in_dn      = no

        [ device_policy ]
        commonName       = supplied
        organizationName = optional

        [ device_cert ]
        basicConstraints       = critical, CA:FALSE
        keyUsage               = critical, digitalSignature
        extendedKeyUsage       = clientAuth
        subjectKeyIdentifier   = hash
        authorityKeyIdentifier = keyid
        """))
    return script(tmp_path / name, f"""
        work=$(mktemp -d)
        trap 'rm -rf "$work"' EXIT
        cat > "$work/req.csr"
        echo "$MQTT_AGENT_DEVICE_ID" > "{tmp_path}/signer-saw-device"
        openssl ca -batch -config "{ca_dir}/openssl-ca.cnf" -in "$work/req.csr" -out "$work/cert.pem" -notext \\
            -subj "/CN=$MQTT_AGENT_DEVICE_ID/O=renewed" 2>"$work/log" || {{ cat "$work/log" >&2; exit 1; }}
        cat "$work/cert.pem"
        """)


def short_lived(ca: TestCA, seconds: float, name: str) -> Issued:
    now = datetime.datetime.now(UTC)
    return ca.issue(DEVICE_ID, not_before=now - datetime.timedelta(seconds=60),
                    not_after=now + datetime.timedelta(seconds=seconds), filename=name)


def revocation_list(ca: TestCA, path: Path, serials: list[int]) -> Path:
    now = datetime.datetime.now(UTC)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
               .last_update(now - datetime.timedelta(minutes=5)).next_update(now + datetime.timedelta(days=1)))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
    path.write_bytes(builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return path


def broker_subjects(broker: Any) -> list[str]:
    """The subjects (user names) the broker logged for connections with the agent's own client id."""
    return re.findall(rf"as {re.escape(DEVICE_ID)} \([^)]*u'([^']*)'\)", broker.log_text())
