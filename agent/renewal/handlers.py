"""Built-in commands for renewal through the agent's own command channel (`[renewal] signer = "command"`).

    cert.csr      makes a new pending key (0600, in agent.state_dir) and answers 200 with its CSR (PEM)
    cert.install  payload: the signed chain (PEM). Checked against the pending key and tls.ca_file,
                  proven with a probe CONNECT, then switched to; 200 with the certificate's facts, or
                  400 (does not pass the check) / 502 (the broker refused it) / 503 (no broker reachable)
                  with why. The names are a public interface.
"""

from __future__ import annotations

from agent.protocol import BAD_REQUEST, UNAVAILABLE, CommandError, Request, Response
from agent.renewal.rollover import RenewalError, Renewer

BAD_GATEWAY = 502


class CertCsrHandler:
    timeout = 30.0

    def __init__(self, renewer: Renewer) -> None:
        self._renewer = renewer

    def handle(self, request: Request) -> Response:
        if request.payload.strip():
            raise CommandError("cert.csr takes no payload", status=BAD_REQUEST)
        return Response(200, self._renewer.make_csr(), content_type="application/pkcs10")


class CertInstallHandler:
    def __init__(self, renewer: Renewer) -> None:
        self._renewer = renewer
        hosts = len(renewer.cfg.mqtt.hosts)
        self.timeout = 30.0 + hosts * renewer.cfg.renewal.probe_timeout

    def handle(self, request: Request) -> Response:
        if b"-----BEGIN CERTIFICATE-----" not in request.payload:
            raise CommandError("cert.install needs the signed certificate chain (PEM) as its payload",
                               status=BAD_REQUEST)
        try:
            checked = self._renewer.install(request.payload)
        except RenewalError as exc:
            status = {"rejected": BAD_REQUEST, "probe_failed": BAD_GATEWAY}.get(exc.result, UNAVAILABLE)
            if exc.result == "probe_failed" and "stays pending" in str(exc):
                status = UNAVAILABLE
            raise CommandError(str(exc), status=status, result=exc.result) from exc
        return Response.ok({"installed": True, "subject": checked.subject, "issuer": checked.issuer,
                            "serial": f"{checked.leaf.serial_number:x}", "not_after": checked.not_after.isoformat(),
                            "warnings": checked.warnings})
