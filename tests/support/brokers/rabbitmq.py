"""RabbitMQ with its MQTT plugin: Debian 12's 3.10 from the host, Debian 13's 4.0 in the trixie root.

Nothing system-wide is used: every broker has its own node name, epmd (ERL_EPMD_PORT, started by us in
the foreground so a stop reaches it), AMQP, distribution and MQTT ports on 127.0.0.1, its own config,
mnesia/log dirs and Erlang cookie (HOME). RabbitMQ takes seconds to boot; `start` waits for the MQTT
listener, which opens last.

RabbitMQ 3.10 speaks MQTT 3.1.1 only and maps `.` in topic names to `/` (AMQP routing keys). 4.0
speaks MQTT 5.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.support.brokers import Broker, free_port, trixie, wait_port

HOST_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


def host_unavailable() -> str | None:
    if not Path(HOST_SERVER).exists():
        return "rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server)"
    return None


class RabbitMQ(Broker):
    kind = "rabbitmq-3.10"
    mqtt5 = False
    start_timeout = 90.0

    def __init__(self, workdir: Path, *, ca: Path | None = None, cert: Path | None = None,
                 key: Path | None = None, in_trixie: bool = False, name: str = "rabbit",
                 epmd_port: int | None = None, cookie: str = "mqtt-agent-test-cookie",
                 cluster: list[str] | None = None, extra: list[str] | None = None,
                 port: int | None = None) -> None:
        super().__init__(workdir, tls=cert is not None, port=port)
        self.root = trixie.ensure_root() if in_trixie else None
        if in_trixie:
            self.kind = "rabbitmq-4.0"
            self.mqtt5 = True
        self.node = f"{name}@localhost"
        self.epmd_port = epmd_port or free_port()
        self.own_epmd = epmd_port is None
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.cookie = cookie
        self.cluster = cluster or []
        self.extra = extra or []
        self.epmd: subprocess.Popen[bytes] | None = None
        # Paths as the broker sees them: /t inside the trixie root, the real dir on the host.
        self.inside = Path("/t") if in_trixie else self.dir
        if cert is not None:
            assert ca and key
            for src, dst in ((ca, "ca.pem"), (cert, "broker.pem"), (key, "broker.key")):
                shutil.copy(src, self.dir / dst)

    def prepare(self) -> None:
        t = self.inside
        lines = [
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}",
            "mqtt.allow_anonymous = true",
            "loopback_users.guest = true",
            "log.console = true",
            "log.console.level = info",
            "log.file = false",
        ]
        if self.root is None:
            # 3.10 logs anonymous MQTT clients in as this user; 4.0 dropped the keys for
            # anonymous_login_user/pass, whose defaults are guest/guest.
            lines += ["mqtt.default_user = guest", "mqtt.default_pass = guest"]
        if self.tls:
            lines += [f"mqtt.listeners.ssl.default = 127.0.0.1:{self.port}", "mqtt.listeners.tcp = none",
                      f"ssl_options.cacertfile = {t}/ca.pem", f"ssl_options.certfile = {t}/broker.pem",
                      f"ssl_options.keyfile = {t}/broker.key", "ssl_options.verify = verify_peer",
                      "ssl_options.fail_if_no_peer_cert = true"]
        else:
            lines.append(f"mqtt.listeners.tcp.default = 127.0.0.1:{self.port}")
        if self.cluster:
            lines += ["cluster_formation.peer_discovery_backend = classic_config"]
            lines += [f"cluster_formation.classic_config.nodes.{i} = {n}" for i, n in enumerate(self.cluster, 1)]
        (self.dir / "rabbitmq.conf").write_text("\n".join(lines + self.extra) + "\n")
        (self.dir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        (self.dir / "home").mkdir(exist_ok=True)
        cookie = self.dir / "home/.erlang.cookie"
        cookie.write_text(self.cookie)
        cookie.chmod(0o400)

    def env(self) -> dict[str, str]:
        t = self.inside
        return {
            "HOME": f"{t}/home",
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_CONFIG_FILE": f"{t}/rabbitmq.conf",
            "RABBITMQ_CONF_ENV_FILE": f"{t}/rabbitmq-env.conf",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{t}/enabled_plugins",
            "RABBITMQ_MNESIA_BASE": f"{t}/mnesia",
            "RABBITMQ_LOG_BASE": f"{t}/log",
            "RABBITMQ_PID_FILE": f"{t}/rabbit.pid",
            "ERL_CRASH_DUMP": f"{t}/erl_crash.dump",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def _wrap(self, argv: list[str]) -> list[str]:
        if self.root is None:
            return argv
        return trixie.chroot_command(["/usr/bin/env", *(f"{k}={v}" for k, v in self.env().items()), *argv],
                                     {self.dir: "/t"}, root=self.root)

    def command(self) -> tuple[list[str], dict[str, str]]:
        return self._wrap(["/usr/lib/rabbitmq/bin/rabbitmq-server"]), self.env()

    def start(self) -> Broker:
        if self.own_epmd and (self.epmd is None or self.epmd.poll() is not None):
            self.epmd = start_epmd(self.epmd_port, self.dir / "epmd.log", self._wrap)
        try:
            return super().start()
        except BaseException:
            self.close()  # a node that did not boot leaves no epmd behind
            raise

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """rabbitmqctl against this node (its cookie, its epmd)."""
        argv = self._wrap(["/usr/lib/rabbitmq/bin/rabbitmqctl", "-n", self.node, *args])
        return subprocess.run(argv, env={**os.environ, **self.env()}, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def close(self) -> None:
        self.stop()
        if self.epmd is not None:
            self.epmd.kill()
            self.epmd.wait()
            self.epmd = None

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_epmd(port: int, log_path: Path, wrap=lambda argv: argv) -> subprocess.Popen[bytes]:
    """A foreground epmd on 127.0.0.1:port (one per broker or per cluster)."""
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child process
    proc = subprocess.Popen(wrap(["epmd", "-port", str(port), "-address", "127.0.0.1"]), stdout=log,
                            stderr=log, start_new_session=True)
    log.close()
    end = time.monotonic() + 10
    while not wait_port("127.0.0.1", port, 0.2):
        if proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"epmd did not start on port {port}: {log_path.read_text()[-1000:]}")
    return proc


class RabbitMQCluster:
    """Three RabbitMQ 4.0 nodes on one machine: own node names and ports, one epmd, one cookie.

    They form the cluster at first boot through classic_config peer discovery. MQTT sessions (the
    queue of a client with clean_session = false) are quorum queues (`mqtt.durable_queue_type =
    quorum`), replicated on every node, so a session and its unacknowledged QoS 1 messages survive
    the loss of the node the client was connected to. Measured without that setting (classic session
    queues, which live on one node): when the agent's node dies, its session is unusable until that
    node returns. The agent's reconnects to the surviving nodes fail over and over ("failed
    repeatedly; failing over to ..." around all three), and publishers of commands for it get no
    PUBACK (test_cluster_failover's publisher hung for minutes): nothing is served.
    """

    def __init__(self, workdir: Path, *, ca: Path, cert: Path, key: Path, size: int = 3) -> None:
        names = [f"rabbit{chr(ord('a') + i)}" for i in range(size)]
        self.epmd_port = free_port()
        self.epmd: subprocess.Popen[bytes] | None = None
        self.workdir = workdir
        self.nodes = [
            RabbitMQ(workdir / name, ca=ca, cert=cert, key=key, in_trixie=True, name=name,
                     epmd_port=self.epmd_port, cluster=[f"{n}@localhost" for n in names],
                     extra=["mqtt.durable_queue_type = quorum",
                            # a 3-node cluster keeps quorum with one node down: MQTT keeps working
                            "cluster_partition_handling = pause_minority"])
            for name in names
        ]

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]

    def start(self) -> RabbitMQCluster:
        import threading

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.epmd = start_epmd(self.epmd_port, self.workdir / "epmd.log", self.nodes[0]._wrap)
        errors: list[BaseException] = []

        def boot(node: RabbitMQ) -> None:
            try:
                node.start()
            except BaseException as exc:  # noqa: BLE001 - reported below, for every node
                errors.append(exc)

        threads = [threading.Thread(target=boot, args=(n,)) for n in self.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.close()
            raise errors[0]
        return self

    def node_on(self, address: str) -> RabbitMQ:
        return next(n for n in self.nodes if n.address == address)

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        if self.epmd is not None:
            self.epmd.kill()
            self.epmd.wait()
            self.epmd = None

    def __enter__(self) -> RabbitMQCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
