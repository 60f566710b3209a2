"""The rollover: sign, check, probe, switch, watch, roll back. One step at a time (a lock), on the
renewal thread or in a cert.install command; the session only ever sees a finished decision through
`switch(tls, reason)` (one clean reconnect with the new pair).

    no pending   --due/forced-->  pending.key --signed+checked-->  pending.pem
    pending.pem  --probe CONNECT accepted-->  active.pem (switch; old active -> previous; watch)
                 --probe refused-->           rejected.pem (nothing switched)
                 --no broker reachable-->     stays pending (retried with backoff)
    watch        --connections keep dropping-->  roll back: active -> rejected, previous -> active
                 --a connection lasted WATCH_STABLE-->  proven; previous removed after keep_previous
"""

from __future__ import annotations

import datetime
import logging
import re
import secrets
import threading
import time
from typing import Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.config import Config, HostPort, TlsConfig
from agent.connection.classify import RECONNECT_REQUESTED, SHUTDOWN
from agent.connection.events import ConnectionEnded, SessionListener
from agent.errors import AgentError
from agent.renewal import policy
from agent.renewal.signer import ExecSigner, SignerError
from agent.renewal.store import (
    ACTIVE,
    PENDING,
    PENDING_KEY,
    PREVIOUS,
    Pair,
    PairStore,
    check_pair,
    key_pem,
    load_key,
    select_pair,
)
from agent.tls.certs import load_certificates
from agent.tls.check import CertCheckError, CheckedChain, check_chain, openssl_accepts
from agent.tls.context import build_context

log = logging.getLogger(__name__)

# After a switch, a connection with the new pair that lasts this long proves it; after this many
# connections that end sooner, a probe CONNECT with the new pair decides: refused -> roll back.
WATCH_STABLE = 10.0
WATCH_FAILURES = 3
_SHOWN = 300


class RenewalError(AgentError):
    """A renewal step failed; `result` is the metric label."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)


def _short(text: str) -> str:
    """Untrusted text (signer stderr, broker reasons) for a log line: cut short and escaped."""
    cut = text[:_SHOWN] + ("..." if len(text) > _SHOWN else "")
    return cut.encode("unicode_escape").decode("ascii")


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def parse_chain(data: bytes) -> list[x509.Certificate]:
    # One block at a time, not x509.load_pem_x509_certificates: that is cryptography >= 39, and Debian 12
    # (Raspberry Pi OS bookworm) has 38, which the Debian package uses.
    try:
        return [x509.load_pem_x509_certificate(block) for block in _PEM_CERT.findall(data)]
    except ValueError:
        return []


class Renewer(SessionListener):
    """Owns the renewed pairs. `switch(tls, reason)` is called with the pair to use from now on."""

    def __init__(self, cfg: Config, store: PairStore, *, switch: Callable[[TlsConfig, str], None] | None = None,
                 metrics: Any = None, wall: Callable[[], float] = time.time,
                 probe: Callable[[TlsConfig], tuple[str, str]] | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self._switch = switch or (lambda tls, reason: None)
        self.metrics = metrics
        self._wall = wall
        self._probe = probe or self.probe_brokers
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.state: dict[str, Any] = store.read_state()
        self._watch_connected: float | None = None
        self._watch_bad = 0
        self._recheck = ""
        self.pair: Pair | None = select_pair(store, cfg.tls, cfg.agent.device_id, self._now())
        self._publish_next()

    # --- facts -------------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.cfg.renewal.enabled

    def _now(self) -> datetime.datetime:
        return _utc(self._wall())

    def tls_in_use(self) -> TlsConfig:
        return self.pair.tls(self.cfg.tls) if self.pair else self.cfg.tls

    def policy_due(self) -> float | None:
        """When the pair in use is due for renewal by [renewal] at/before (ignoring any retry backoff)."""
        if self.pair is None or not self.enabled:
            return None
        r = self.cfg.renewal
        return policy.due_at(self.pair.not_before.timestamp(), self.pair.not_after.timestamp(),
                             self.cfg.agent.device_id, at=r.at, before=r.before)

    def next_due(self) -> float | None:
        """When the next attempt happens: the due time, or the end of the backoff after a failure."""
        due = self.policy_due()
        return None if due is None else max(due, float(self.state.get("next_attempt") or 0.0))

    def describe(self) -> dict[str, Any]:
        """For info, doctor and check-config: the pair in use, when it renews, the last failure."""
        out: dict[str, Any] = {"pair": self.pair.describe() if self.pair else None, "enabled": self.enabled,
                               "signer": self.cfg.renewal.signer or None}
        due = self.next_due()
        out["next_renewal"] = _utc(due).isoformat() if due is not None else None
        out["pending"] = self.store.exists(PENDING) or self.store.exists(PENDING_KEY)
        out["watching"] = bool(self.state.get("watch"))
        for key in ("failures", "last_failure", "last_success"):
            if key in self.state:
                out[key] = self.state[key]
        return out

    def attach_metrics(self, metrics: Any) -> None:
        self.metrics = metrics
        self._publish_next()

    def _publish_next(self) -> None:
        if self.metrics is not None:
            self.metrics.next_at(self.next_due())

    def _save(self) -> None:
        self.store.write_state(self.state)
        self._publish_next()

    def tls_for(self, cfg: Config) -> TlsConfig:
        """The TLS settings a reloaded `cfg` would use (its pair choice), without changing anything."""
        pair = select_pair(self.store, cfg.tls, cfg.agent.device_id, self._now())
        return pair.tls(cfg.tls) if pair else cfg.tls

    def reconfigure(self, cfg: Config) -> None:
        with self._lock:
            self.cfg = cfg
            self.pair = select_pair(self.store, cfg.tls, cfg.agent.device_id, self._now())
            self._publish_next()

    # --- the thread ----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="renewal", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the renewal thread must outlive any surprise; the next tick tries again
                log.exception("internal error in certificate renewal")
            self._wake.wait(self.cfg.renewal.check_interval)
            self._wake.clear()

    def tick(self) -> None:
        """One look: rollback or proof after a switch, the previous pair's expiry, requests, due renewal."""
        with self._lock:
            now = self._wall()
            if self._recheck:
                self._recheck_watched()
            self._check_watch(now)
            self._expire_previous(now)
            request = self.store.take_request()
            if not self.enabled:
                if request:
                    self._answer_request("disabled", "renewal is off: set [renewal] signer (and command)")
                return
            due = self.policy_due()
            pending = self.store.exists(PENDING)
            retry_ok = now >= float(self.state.get("next_attempt") or 0.0)
            if self.cfg.renewal.signer != "exec" and not pending:
                if request:
                    self._answer_request("waiting", "renewal.signer = \"command\": the backend drives renewal "
                                         "with cert.csr and cert.install")
                return
            is_due = due is not None and now >= due
            # A request skips the retry backoff; "force" also skips the due date.
            if request == "force" or (request and is_due) or (retry_ok and (is_due or pending)):
                self.renew_now(requested=bool(request))
            elif request:
                when = _utc(due).isoformat() if due is not None else "never (no certificate in use)"
                self._answer_request("not_due", f"not due until {when}; `mqtt-agent renew --force` renews now")

    def _answer_request(self, result: str, message: str) -> None:
        self.state["last_request"] = {"at": self._wall(), "result": result, "message": message}
        self._save()

    # --- the steps -------------------------------------------------------------------------------------

    def renew_now(self, requested: bool = False) -> str:
        """Sign (unless a signed pair is pending), check, probe, switch. Returns the result label."""
        with self._lock:
            try:
                if not self.store.exists(PENDING):
                    signer = ExecSigner(self.cfg.renewal.command, self.cfg.renewal.timeout, self.cfg.agent.device_id)
                    csr = self._pending_csr(new_key=False)
                    log.info("certificate renewal: asking renewal.command to sign a new CSR")
                    try:
                        chain = signer.sign(csr)
                    except SignerError as exc:
                        raise RenewalError("signer_failed", str(exc)) from exc
                    self.accept_chain(chain, "the chain from renewal.command")
                message = self.probe_and_switch()
            except RenewalError as exc:
                self._failed(exc.result, str(exc))
                if requested:
                    self._answer_request(exc.result, str(exc))
                return exc.result
            if requested:
                self._answer_request("success", message)
            return "success"

    def _pending_csr(self, new_key: bool) -> bytes:
        """The CSR for the pending key, made (and stored 0600) if there is none or `new_key`."""
        from agent.tls.keys import build_csr, generate_key

        tls = self.cfg.tls
        path = self.store.path(PENDING_KEY)
        key = None
        if path.exists() and not new_key:
            try:
                key = load_key(path, tls)
            except (ValueError, TypeError, OSError) as exc:
                log.warning("the pending key %s is unusable (%s); making a new one", path, exc)
        if key is None:
            # Keep the key type of the pair in use: a broker or CA set up for RSA may not take EC.
            kind = "rsa" if self._in_use_is_rsa() else "ec"
            key = generate_key(kind)
            self.store.write_pending_key(key_pem(key, tls))
            self.store.remove(PENDING)
        csr = build_csr(key, self.cfg.agent.device_id)
        return csr.public_bytes(serialization.Encoding.PEM)

    def _in_use_is_rsa(self) -> bool:
        from cryptography.hazmat.primitives.asymmetric import rsa

        if self.pair is None:
            return False
        try:
            return isinstance(load_key(self.pair.key_file, self.cfg.tls), rsa.RSAPrivateKey)
        except (ValueError, TypeError, OSError):
            return False

    def make_csr(self) -> bytes:
        """cert.csr: a new pending key (any earlier pending key or pair is discarded) and its CSR."""
        with self._lock:
            return self._pending_csr(new_key=True)

    def accept_chain(self, data: bytes, source: str) -> CheckedChain:
        """Check a signed chain against the pending key with the one checker; store it as the pending pair.
        Raises RenewalError("rejected", why) and changes nothing when it does not pass."""
        with self._lock:
            key_path = self.store.path(PENDING_KEY)
            tls = self.cfg.tls
            try:
                key = load_key(key_path, tls)
            except FileNotFoundError:
                raise RenewalError("rejected", "there is no pending key: send cert.csr first, have its CSR "
                                   "signed, then cert.install the chain") from None
            except (ValueError, TypeError, OSError) as exc:
                raise RenewalError("rejected", f"the pending key {key_path} is unusable: {exc}") from exc
            anchors = load_certificates(tls.ca_file) if tls.ca_file else []
            try:
                checked = check_chain(parse_chain(data), key, anchors, now=self._now(), source=source,
                                      anchor_file=tls.ca_file or "(tls.ca_file not set)",
                                      device_id=self.cfg.agent.device_id, csr_hint="sign the CSR of the pending key")
                openssl_accepts(checked.pem, key_path, ca_file=tls.ca_file, security_level=tls.security_level,
                                key_password_file=tls.key_password_file, source=source, workdir=self.store.dir)
            except CertCheckError as exc:
                raise RenewalError("rejected", f"{exc} [{exc.reason}]") from exc
            for warning in checked.warnings:
                log.warning("certificate renewal: %s", warning)
            self.store.write_pending_pair(checked.pem, key_path.read_bytes())
            return checked

    def install(self, data: bytes) -> CheckedChain:
        """cert.install: check, store as pending, probe, switch. Raises RenewalError (recorded as a failure)."""
        with self._lock:
            try:
                checked = self.accept_chain(data, "the chain sent with cert.install")
                self.probe_and_switch()
            except RenewalError as exc:
                self._failed(exc.result, str(exc))
                raise
            return checked

    def probe_and_switch(self) -> str:
        """Probe the pending pair against the brokers; switch to it if accepted. Raises RenewalError."""
        with self._lock:
            path = self.store.path(PENDING)
            try:
                pair, _ = check_pair("renewed", path, path, self.cfg.tls, self.cfg.agent.device_id, self._now())
            except (CertCheckError, ValueError, TypeError, OSError) as exc:
                self.store.reject_pending()
                raise RenewalError("rejected", f"the pending pair {path} is not usable: {exc}") from exc
            verdict, detail = self._probe(pair.tls(self.cfg.tls))
            if verdict == "refused":
                self.store.reject_pending()
                raise RenewalError("probe_failed", f"the broker refused the new certificate (serial "
                                   f"{pair.serial:x}); nothing switched, the current pair stays in use: {detail}")
            if verdict != "ok":
                raise RenewalError("probe_failed", f"no broker could be reached to prove the new certificate; it "
                                   f"stays pending and is probed again: {detail}")
            self.store.promote()
            active = self.store.path(ACTIVE)
            self.pair = Pair("renewed", active, active, pair.not_before, pair.not_after, pair.subject, pair.serial)
            now = self._wall()
            self.state.update(failures=0, next_attempt=0.0, switched_at=now,
                              watch={"since": now, "serial": f"{pair.serial:x}"},
                              last_success={"at": now, "serial": f"{pair.serial:x}",
                                            "not_after": pair.not_after.isoformat()})
            self._watch_connected, self._watch_bad = None, 0
            self._save()
            if self.metrics is not None:
                self.metrics.result("success")
            message = (f"renewed certificate in use: serial {pair.serial:x}, valid until "
                       f"{pair.not_after:%Y-%m-%d %H:%M} UTC ({detail}); switching with one reconnect")
            log.info("certificate renewal: %s", message)
            self._switch(self.tls_in_use(), "renewed client certificate")
            return message

    def roll_back(self, reason: str) -> None:
        with self._lock:
            self.store.demote()
            self.pair = select_pair(self.store, self.cfg.tls, self.cfg.agent.device_id, self._now())
            self.state["watch"] = None
            self._failed("rolled_back", f"rolled back to the {self.pair.source if self.pair else 'configured'} "
                                        f"certificate: {reason}")
            self._switch(self.tls_in_use(), "rolled back the renewed client certificate")

    def _failed(self, result: str, message: str) -> None:
        failures = int(self.state.get("failures") or 0) + 1
        r = self.cfg.renewal
        delay = policy.retry_delay(failures, r.retry_min, r.retry_max)
        now = self._wall()
        self.state.update(failures=failures, next_attempt=now + delay,
                          last_failure={"at": now, "result": result, "reason": _short(message)})
        self._save()
        if self.metrics is not None:
            self.metrics.result(result)
        log.error("certificate renewal failed (%s): %s; next attempt in %.0f s", result, _short(message), delay)

    def _recheck_watched(self) -> None:
        evidence = self._recheck
        verdict, detail = self._probe(self.tls_in_use()) if self.pair else ("ok", "")
        self._recheck, self._watch_bad = "", 0
        if verdict == "refused":
            self.roll_back(f"{evidence}; a probe CONNECT with it is refused: {detail}")
        else:
            log.warning("certificate renewal: %s, but a probe CONNECT with the renewed certificate is %s; keeping it",
                        evidence, "accepted" if verdict == "ok" else "not possible (no broker reachable)")

    def _check_watch(self, now: float) -> None:
        if not self.state.get("watch"):
            return
        since = self._watch_connected
        if since is not None and time.monotonic() - since >= WATCH_STABLE:
            log.info("certificate renewal: the broker keeps the connection with the renewed certificate; "
                     "it is proven")
            self.state["watch"] = None
            self._save()

    def _expire_previous(self, now: float) -> None:
        if self.state.get("watch") or not self.store.exists(PREVIOUS):
            return
        if now - float(self.state.get("switched_at") or 0.0) >= self.cfg.renewal.keep_previous:
            self.store.remove(PREVIOUS)
            log.info("certificate renewal: removed the previous pair (kept for renewal.keep_previous)")

    # --- watching the session after a switch (SessionListener: never blocks) -------------------------

    def connected(self, host: HostPort, keepalive: int, session_present: bool) -> None:
        self._watch_connected = time.monotonic()

    def connection_ended(self, ended: ConnectionEnded) -> None:
        self._watch_connected = None
        if not self.state.get("watch") or ended.kind in (SHUTDOWN, RECONNECT_REQUESTED):
            return
        if ended.uptime is not None and ended.uptime >= WATCH_STABLE:
            return
        self._watch_bad += 1
        if self._watch_bad >= WATCH_FAILURES and not self._recheck:
            # Whether the new pair is to blame (and not a broker that is down) is for a probe to say.
            self._recheck = (f"{self._watch_bad} connections with it ended within {WATCH_STABLE:g} s "
                             f"(last: {ended.kind}: {_short(ended.reason)})")
            self._wake.set()

    # --- the probe -------------------------------------------------------------------------------------

    def probe_brokers(self, tls: TlsConfig) -> tuple[str, str]:
        """("ok" | "refused" | "unreachable", detail): a real mutual-TLS CONNECT to each configured broker
        under a probe client id (the running session is not taken over)."""
        from agent.connection import probe

        try:
            ctx = build_context(tls)
        except AgentError as exc:
            return "refused", str(exc)
        client_id = f"{self.cfg.mqtt.client_id}-renew-{secrets.token_hex(3)}"
        accepted: list[str] = []
        refused: list[str] = []
        unreachable: list[str] = []
        for host in self.cfg.mqtt.hosts:
            attempt = probe.connect_attempt(self.cfg.mqtt, ctx, host, client_id, self.cfg.renewal.probe_timeout)
            if attempt.accepted:
                accepted.append(str(host))
            elif attempt.stage in (probe.TCP_FAILED, probe.TIMEOUT):
                unreachable.append(f"{host}: {attempt.stage} ({_short(str(attempt.error or ''))})")
            else:
                why = attempt.connack_text if attempt.stage == probe.CONNACK else str(attempt.error or attempt.stage)
                refused.append(f"{host}: {_short(why)}")
        if refused:
            return "refused", "; ".join(refused)
        if accepted:
            return "ok", f"probe CONNECT as {client_id} accepted by {', '.join(accepted)}"
        return "unreachable", "; ".join(unreachable)
