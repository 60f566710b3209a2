"""The SSL context from the config: security level before the chain, the host-name override,
the insecure switch. The agent, doctor and send build their context with this one function.
"""

from __future__ import annotations

import socket
import ssl
from typing import TYPE_CHECKING, Any

from agent.config import TlsConfig, read_secret

# `cryptography` is imported only where certificates are inspected (a TLS failure to explain, the doctor,
# enroll): it adds about 8 MiB to the agent's resident memory, which a healthy agent does not need.
if TYPE_CHECKING:
    pass
from agent.tls.explain import _is_encrypted_key, _setup_error, explain_chain_error


class _NamedTLSContext(ssl.SSLContext):
    """An SSLContext that verifies (and sends SNI for) a fixed name instead of the host dialled.

    paho passes the host it connects to as server_hostname; with tls.server_name set, the broker is
    reached by IP (or another alias) while its certificate is checked against its real name.
    """

    verify_name: str = ""

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        if self.verify_name and not kwargs.get("server_side"):
            kwargs["server_hostname"] = self.verify_name
        return super().wrap_socket(sock, *args, **kwargs)


def build_context(tls: TlsConfig) -> ssl.SSLContext:
    """The client SSLContext the agent uses. Raises TLSSetupError (exit code 78) with cause and remedy."""
    ctx = _NamedTLSContext(ssl.PROTOCOL_TLS_CLIENT)
    # The security level must be set before load_cert_chain: OpenSSL checks the client certificate's
    # signature against the level while loading it, so a SHA1-signed certificate fails with
    # "ca md too weak" if the chain is loaded first.
    ctx.set_ciphers(f"DEFAULT:@SECLEVEL={tls.security_level}")
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = not tls.insecure
    ctx.verify_name = tls.server_name
    try:
        if tls.ca_file:
            ctx.load_verify_locations(cafile=str(tls.ca_file))
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (ssl.SSLError, OSError) as exc:
        raise _setup_error(
            f"tls.ca_file {tls.ca_file} could not be loaded as CA certificates ({exc})",
            "point tls.ca_file at the PEM file of the CA that issued the broker certificate",
        ) from exc
    if tls.cert_file and tls.key_file:
        if not tls.key_password_file and _is_encrypted_key(tls.key_file):
            raise _setup_error(f"tls.key_file {tls.key_file} is encrypted and no passphrase is configured",
                               "set tls.key_password_file to a file holding the key's passphrase")
        secret = read_secret(tls.key_password_file) if tls.key_password_file else ""
        try:
            # A callable, never None: with None, OpenSSL would prompt on the terminal and block the daemon.
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file), password=lambda: secret)
        except (ssl.SSLError, OSError) as exc:
            raise explain_chain_error(exc, tls) from exc
    return ctx

