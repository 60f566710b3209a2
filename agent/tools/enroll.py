"""Device enrollment: the private key and CSR are made on the device; the signed certificate is checked and installed.

`mqtt-agent enroll` runs before the device has a certificate, so it cannot use `load_config`, which
insists that every file named in [tls] exists. It reads the raw TOML instead and takes only what it
needs (agent.device_id and the [tls] paths), with the same key-path error messages. The private key
never leaves the device and is never logged: it is written 0600 through a temporary file in the same
directory and renamed into place, so a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import datetime
import os
import pwd
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from agent.config import TlsConfig, check_device_id, read_identity, read_secret
from agent.errors import AgentError, ConfigError
from agent.state.files import fsync_dir, write_atomic
from agent.tls.certs import cert_info, load_certificates
from agent.tls.check import NO_CA, UNTRUSTED, WRONG_KEY, CertCheckError, check_chain, public_der
from agent.tls.keys import KEY_TYPES, PrivateKey, build_csr, describe_key, generate_key

DEFAULT_OWNER = "mqtt-agent"


class EnrollError(AgentError):
    """Enrollment could not be done; the message names the file and what to do."""


@dataclass(frozen=True)
class EnrollPaths:
    """What enroll takes from the config: the device id and the [tls] files, resolved like load_config does."""

    config: Path
    device_id: str | None
    cert_file: Path
    key_file: Path
    ca_file: Path | None
    key_password_file: Path | None
    security_level: int = 2

    @property
    def csr_file(self) -> Path:
        """The CSR sits next to the certificate it asks for: device.pem -> device.csr."""
        return self.cert_file.with_suffix(".csr")


@dataclass(frozen=True)
class Owner:
    """The account the key file is given to (the service user)."""

    name: str
    uid: int
    gid: int


@dataclass
class EnrollResult:
    """What `enroll` did, for the CLI to report."""

    paths: EnrollPaths
    device_id: str
    key_desc: str
    key_created: bool
    csr_written: bool
    owner: Owner | None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    enrolled_until: datetime.datetime | None = None  # set when the installed certificate already matches the key


@dataclass
class InstallResult:
    """What `enroll --install-cert` did."""

    paths: EnrollPaths
    changed: bool
    subject: str
    issuer: str
    not_after: datetime.datetime
    key_desc: str
    warnings: list[str] = field(default_factory=list)


def read_enroll_paths(config: Path) -> EnrollPaths:
    """agent.device_id and the [tls] paths, read by config.read_identity (the config's one set of rules).
    Raises ConfigError listing every problem. Unlike load_config this does not require the certificate and
    key to exist: making them is the point.
    """
    ident = read_identity(config)
    return EnrollPaths(config=config, device_id=ident.device_id, cert_file=ident.cert_file,
                       key_file=ident.key_file, ca_file=ident.ca_file, key_password_file=ident.key_password_file,
                       security_level=ident.security_level)


def resolve_owner(name: str | None, *, euid: int | None = None) -> Owner | None:
    """The account that will own the key. None: leave it to the user running enroll.

    As root the default is the service user, which must exist (deploy/install.sh creates it); an
    unprivileged user cannot give files away, so without root only their own name is accepted.
    """
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        me = pwd.getpwuid(euid).pw_name
        if name and name != me:
            raise EnrollError(f"--owner {name}: only root can give the key to another user (running as {me}); "
                              "run enroll with sudo")
        return None
    wanted = name or DEFAULT_OWNER
    try:
        entry = pwd.getpwnam(wanted)
    except KeyError:
        hint = ("install the agent with deploy/install.sh (it creates the service user) or "
                "name the account the agent runs as with --owner USER") if not name else "check the name"
        raise EnrollError(f"user {wanted!r} does not exist: {hint}") from None
    return Owner(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _password(paths: EnrollPaths) -> bytes | None:
    if not paths.key_password_file:
        return None
    try:
        return read_secret(paths.key_password_file).encode()
    except OSError as exc:
        raise EnrollError(f"tls.key_password_file {paths.key_password_file} cannot be read: "
                          f"{exc.strerror or exc}") from exc


def load_private_key(paths: EnrollPaths) -> PrivateKey:
    """The existing device key. Raises EnrollError (never showing key material)."""
    try:
        data = paths.key_file.read_bytes()
    except FileNotFoundError:
        raise EnrollError(f"tls.key_file {paths.key_file} does not exist: run `mqtt-agent enroll` first to create "
                          "the key and its CSR") from None
    except OSError as exc:
        raise EnrollError(f"tls.key_file {paths.key_file} cannot be read: {exc.strerror or exc}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=_password(paths))
    except (ValueError, TypeError) as exc:
        why = "is encrypted: set tls.key_password_file" if "encrypted" in str(exc) and not paths.key_password_file \
            else "is not a readable PEM private key (or the passphrase is wrong)"
        raise EnrollError(f"tls.key_file {paths.key_file} {why}; --force replaces it with a new key "
                          "(the device then needs a new certificate)") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise EnrollError(f"tls.key_file {paths.key_file} holds a {type(key).__name__}; "
                          "use --force to replace it with an EC or RSA key")
    return key


def _key_pem(key: PrivateKey, password: bytes | None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _existing_csr_fits(path: Path, key: PrivateKey, device_id: str) -> bool:
    try:
        csr = x509.load_pem_x509_csr(path.read_bytes())
    except (OSError, ValueError):
        return False
    cns = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return csr.is_signature_valid and cns == [device_id] and public_der(csr) == public_der(key)


def enroll(paths: EnrollPaths, *, device_id: str | None = None, key_type: str | None = None, force: bool = False,
           owner: Owner | None = None) -> EnrollResult:
    """Make (or keep) the device key and write a CSR for it. Idempotent: a second run changes nothing.

    `key_type` None means EC for a new key and no opinion about an existing one.
    """
    if key_type is not None and key_type not in KEY_TYPES:
        raise EnrollError(f"--key-type must be one of {', '.join(KEY_TYPES)}, got {key_type!r}")
    warnings: list[str] = []
    notes: list[str] = []
    chosen = device_id or paths.device_id
    if not chosen:
        raise ConfigError(["agent.device_id: is required (or pass --device-id ID)"], str(paths.config))
    problem = check_device_id(chosen)
    if problem:
        raise EnrollError(f"device id {chosen!r}: {problem}")
    if device_id and paths.device_id and device_id != paths.device_id:
        warnings.append(f"agent.device_id in {paths.config} is {paths.device_id!r}, but the certificate will be "
                        f"for {device_id!r}: set agent.device_id = \"{device_id}\" so topics and client id match")
    password = _password(paths)
    key_created = force or not paths.key_file.exists()
    if key_created:
        key = generate_key(key_type or "ec")
        write_atomic(paths.key_file, _key_pem(key, password), 0o600, (owner.uid, owner.gid) if owner else None)
        if force and paths.cert_file.exists():
            warnings.append(f"the certificate {paths.cert_file} belongs to the previous key: the agent cannot "
                            "connect until the new CSR is signed and installed with --install-cert")
    else:
        key = load_private_key(paths)
        st = paths.key_file.stat()
        if st.st_mode & 0o077:
            paths.key_file.chmod(0o600)
            notes.append(f"tightened the mode of {paths.key_file} from {st.st_mode & 0o777:04o} to 0600")
        if owner is not None and (st.st_uid, st.st_gid) != (owner.uid, owner.gid):
            os.chown(paths.key_file, owner.uid, owner.gid)
            notes.append(f"gave {paths.key_file} to {owner.name}")
        have = "ec" if isinstance(key, ec.EllipticCurvePrivateKey) else "rsa"
        if key_type is not None and key_type != have:
            warnings.append(f"kept the existing {describe_key(key)} key; --force replaces it with a new "
                            f"{'EC P-256' if key_type == 'ec' else 'RSA 2048'} key")
    csr_written = key_created or not _existing_csr_fits(paths.csr_file, key, chosen)
    if csr_written:
        csr = build_csr(key, chosen)
        write_atomic(paths.csr_file, csr.public_bytes(serialization.Encoding.PEM), 0o644)
    result = EnrollResult(paths=paths, device_id=chosen, key_desc=describe_key(key), key_created=key_created,
                          csr_written=csr_written, owner=owner, notes=notes, warnings=warnings)
    if not key_created:
        certs = load_certificates(paths.cert_file)
        if certs and public_der(certs[0]) == public_der(key):
            result.enrolled_until = cert_info(certs[0]).not_after
    return result


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def install_certificate(paths: EnrollPaths, source: Path, *, ca_file: Path | None = None,
                        device_id: str | None = None, now: datetime.datetime | None = None) -> InstallResult:
    """Check that `source` is this device's certificate, signed by the CA, then install it at tls.cert_file.

    Checks: the certificate's public key is the device key's; it chains (through any intermediates in
    the same file) to a certificate in `ca_file` (default tls.ca_file); it is not expired; it may be
    used for TLS client authentication; and OpenSSL loads it with the key at the configured
    tls.security_level, exactly as the agent will. Only then is it renamed into place.
    """
    now = now or _now()
    certs = load_certificates(source)
    key = load_private_key(paths) if certs else None
    anchor_file = ca_file or paths.ca_file
    if certs and anchor_file is None:
        raise EnrollError("there is no CA to check the certificate against: tls.ca_file is not set; "
                          "pass --ca FILE (the CA certificate that signs device certificates)")
    anchors = load_certificates(anchor_file) if anchor_file else []
    try:
        checked = check_chain(certs, key, anchors, now=now, source=str(source),  # type: ignore[arg-type]
                              anchor_file=anchor_file or "", device_id=device_id or paths.device_id,
                              csr_hint=f"sign the CSR {paths.csr_file} from this device")
    except CertCheckError as exc:
        message = str(exc)
        if exc.reason == NO_CA:
            message = f"{'--ca' if ca_file else 'tls.ca_file'} {message}"
        elif exc.reason == UNTRUSTED and not ca_file:
            message += "; if device certificates come from another CA than the broker's, pass --ca FILE"
        elif exc.reason == WRONG_KEY:
            message = message.replace("device's key", f"device's key {paths.key_file}")
        raise EnrollError(message) from exc
    assert key is not None
    warnings = checked.warnings
    # Leaf first, then intermediates up to (not including) the anchor: what a broker needs to build the path.
    pem = checked.pem
    changed = True
    try:
        changed = paths.cert_file.read_bytes() != pem
    except OSError:
        pass
    if changed:
        _install_checked(paths, pem, source)
    return InstallResult(paths=paths, changed=changed, subject=checked.subject, issuer=checked.issuer,
                         not_after=checked.not_after, key_desc=describe_key(key), warnings=warnings)


def _install_checked(paths: EnrollPaths, pem: bytes, source: Path) -> None:
    """Write the certificate beside its final path, let OpenSSL load it as the agent will, then rename it."""
    from agent.tls.context import build_context

    paths.cert_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=paths.cert_file.parent, prefix=f".{paths.cert_file.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o644)
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        tls = TlsConfig(ca_file=paths.ca_file if paths.ca_file and paths.ca_file.exists() else None,
                        cert_file=tmp, key_file=paths.key_file, key_password_file=paths.key_password_file,
                        security_level=paths.security_level)
        try:
            build_context(tls)
        except AgentError as exc:
            # The message names the temporary file; the operator knows the file they passed.
            text = str(exc).replace(str(tmp), str(source)).replace(tmp.name, source.name)
            raise EnrollError(f"OpenSSL does not accept the certificate with the key: {text}") from exc
        tmp.replace(paths.cert_file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(paths.cert_file.parent)


def enroll_report(result: EnrollResult) -> str:
    """The text `mqtt-agent enroll` prints: what it did, where the CSR is, and the next steps."""
    p = result.paths
    owner = f", owner {result.owner.name}" if result.owner else ""
    lines = [
        f"private key: {p.key_file} ({result.key_desc}, {'new' if result.key_created else 'kept'}, "
        f"mode 0600{owner}; it never leaves this device)",
        f"CSR:         {p.csr_file} (CN={result.device_id}{', new' if result.csr_written else ', unchanged'})",
    ]
    lines += [f"note: {n}" for n in result.notes]
    lines += [f"warning: {w}" for w in result.warnings]
    if result.enrolled_until is not None and not result.csr_written:
        lines += [
            f"already enrolled: {p.cert_file} matches the key and is valid until {result.enrolled_until:%Y-%m-%d}.",
            f"To renew, have {p.csr_file.name} signed again and install the new certificate with --install-cert.",
        ]
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "next steps:",
        "  1. Copy the CSR (only the CSR) to the machine holding the fleet CA and sign it as a TLS client "
        "certificate, e.g. with OpenSSL 3:",
        f"       openssl x509 -req -in {p.csr_file.name} -CA fleet-ca.pem -CAkey fleet-ca.key -days 825 -sha256 "
        f"-copy_extensions copy -out {p.cert_file.name}",
        f"     (Eclipse Hono: register the device's credentials as type x509-cert, auth-id CN={result.device_id})",
        "  2. Bring the certificate back and install it (it is checked against the key and the CA first):",
        f"       mqtt-agent enroll --config {p.config} --install-cert {p.cert_file.name}",
        "  3. Start the agent: systemctl restart mqtt-agent",
    ]
    return "\n".join(lines) + "\n"


def install_report(result: InstallResult) -> str:
    """The text `mqtt-agent enroll --install-cert` prints."""
    p = result.paths
    verb = "installed" if result.changed else "already installed (unchanged)"
    lines = [
        f"certificate {verb}: {p.cert_file}",
        f"  subject {result.subject}, issuer {result.issuer}, {result.key_desc}, valid until "
        f"{result.not_after:%Y-%m-%d}",
    ]
    lines += [f"warning: {w}" for w in result.warnings]
    lines += [
        "next steps:",
        f"  mqtt-agent check-config --config {p.config}",
        "  systemctl restart mqtt-agent" if result.changed else "  (nothing changed; no restart needed)",
    ]
    return "\n".join(lines) + "\n"

