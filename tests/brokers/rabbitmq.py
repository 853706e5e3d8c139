"""Debian's RabbitMQ 3.10 with the AMQP 1.0 plugin as a test fixture, without systemd.

Everything the node writes lives in the fixture's work directory (mnesia, logs, plugins file,
config, Erlang cookie via HOME), the node name is unique, and the ports are free ones on
loopback: AMQP (0-9-1 and 1.0 share the listener), Erlang distribution, and epmd. The suite
runs its own epmd on its own port in the foreground, so that no host-wide epmd daemon is started
or left behind and a host's real RabbitMQ is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from tests.brokers.common import (
    LOOPBACK,
    Broker,
    BrokerError,
    ProcessGroup,
    free_port,
    port_open,
    run_tool,
    wait_for,
)

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
# epmd answers within milliseconds; a long wait means it could not bind.
EPMD_TIMEOUT = 10.0
# rabbitmqctl boots an Erlang VM for each call (about 1 s here).
CTL_TIMEOUT = 60.0
# Columns of `rabbitmqctl list_channels`: 3.10 registers each AMQP 1.0 session as a channel
# named "CLIENT_ADDR:PORT -> BROKER_ADDR:PORT (N)", while its connection is in no listing.
CHANNEL_COLUMNS = ("pid", "connection", "name", "number", "user", "vhost")
CONFIG = """\
listeners.tcp.1 = {host}:{port}
amqp1_0.default_user = guest
loopback_users = none
log.console = true
log.console.level = info
log.file = false
"""


class RabbitMQ(Broker):
    """A RabbitMQ node named `qvc-test-PID-PORT@localhost` with `rabbitmq_amqp1_0` enabled."""

    name = "rabbitmq"

    def __init__(self, workdir: Path, user: str = "guest", password: str = "guest") -> None:
        super().__init__(workdir, user, password)
        self.node = f"qvc-test-{os.getpid()}-{self.port}@localhost"
        self.epmd_port = free_port()
        self.dist_port = free_port()
        self._epmd: ProcessGroup | None = None
        (workdir / "rabbitmq.conf").write_text(CONFIG.format(host=LOOPBACK, port=self.port))
        (workdir / "enabled_plugins").write_text("[rabbitmq_amqp1_0].\n")
        (workdir / "rabbitmq-env.conf").write_text("")
        cookie = workdir / ".erlang.cookie"
        cookie.write_text(f"qvc-test-cookie-{os.getpid()}-{self.port}")
        cookie.chmod(0o400)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HOME=str(self.workdir),  # the Erlang cookie of both the node and rabbitmqctl
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_CONF_ENV_FILE=str(self.workdir / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(self.workdir / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.workdir / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(self.workdir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.workdir / "log"),
            RABBITMQ_PID_FILE=str(self.workdir / "rabbitmq.pid"),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            # Makes rabbitmq-server exec the Erlang VM instead of babysitting it as a child, so
            # the VM itself gets the parent-death signal (common.ProcessGroup) and our SIGTERM.
            RUNNING_UNDER_SYSTEMD="true",
            ERL_EPMD_ADDRESS=LOOPBACK,
            ERL_EPMD_PORT=str(self.epmd_port),
        )
        return env

    def _argv(self) -> list[str]:
        return [str(RABBITMQ_BIN / "rabbitmq-server")]

    def _before_start(self) -> None:
        """Our own epmd, started once and kept across broker restarts like a host's would be."""
        if self._epmd is not None and self._epmd.running():
            return
        epmd = shutil.which("epmd")
        if epmd is None:
            raise BrokerError("epmd not found; run tests/install-deps.sh")
        self._epmd = ProcessGroup(
            [epmd, "-port", str(self.epmd_port), "-address", LOOPBACK],
            self._env(),
            self.workdir / "epmd.log",
        )
        wait_for(lambda: port_open(LOOPBACK, self.epmd_port), EPMD_TIMEOUT, "epmd")

    def ctl(self, *args: str, timeout: float = CTL_TIMEOUT) -> str:
        """Run `rabbitmqctl -n NODE ARGS...` against this node and return its stdout."""
        argv = [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args]
        return run_tool(argv, self._env(), timeout, f"rabbitmqctl {' '.join(args)}").stdout

    def _shutdown(self) -> None:
        """`rabbitmqctl stop`, the node's own clean shutdown."""
        # A hung or half-started node fails this; the group stop that follows still ends it.
        with contextlib.suppress(BrokerError):
            self.ctl("stop")

    def close(self) -> None:
        """Stop the node and the suite's epmd."""
        super().close()
        if self._epmd is not None:
            self._epmd.kill()
            self._epmd = None

    def list_connections(self) -> list[dict[str, Any]]:
        """The AMQP 1.0 connections that have a session open, rebuilt from `list_channels`.

        RabbitMQ 3.10 lists no 1.0 connection (`list_connections` shows 0-9-1 only and the
        plugin's `list_amqp10_connections` is empty), and it keeps no open-frame properties or
        container-id anywhere we can read: `container_id` and `properties` are always None.
        What it does show is each session as a channel whose name holds the client's socket
        address, so `remote_address` ties a row to the client's local TCP port (docs/brokers.md).
        """
        out = self.ctl("list_channels", "--formatter", "json", *CHANNEL_COLUMNS)
        connections: dict[str, dict[str, Any]] = {}
        for channel in json.loads(out):
            row = connections.setdefault(
                channel["connection"],
                {
                    "container_id": None,
                    "properties": None,
                    "remote_address": channel["name"].split(" -> ")[0],
                    "user": channel["user"],
                    "protocol": "AMQP 1.0 or 0-9-1",
                    "connection_id": channel["connection"],
                    "sessions": 0,
                    "raw": [],
                },
            )
            row["sessions"] += 1
            row["raw"].append(channel)
        return list(connections.values())
