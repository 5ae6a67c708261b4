"""A local Redis Sentinel group: one master, one replica, three sentinels, on free loopback ports.

For tests and for trying failover by hand; everything binds 127.0.0.1. The
sentinels are the same redis-server binary started with ``--sentinel``, so no
package beyond Redis itself is needed. Their timings are shorter than Redis's
defaults (a master is down after ``down_after`` seconds, not 30), so that a
killed master is replaced within seconds; a graceful ``SENTINEL FAILOVER``
does not wait for them.

>>> group = SentinelGroup(Path("/tmp/sentinel"))
>>> group.start()
>>> group.url                      # HAULAGE_REDIS_URL (and HAULAGE_REDIS_SENTINEL_MASTER=mymaster)
'sentinel://127.0.0.1:26379/0;sentinel://127.0.0.1:26380/0;sentinel://127.0.0.1:26381/0'
>>> group.failover()               # promotes the replica, waits until every sentinel names it
>>> group.stop()
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

from haulage.devtools.redis_server import find_redis_server, free_port, start_redis, wait_for_port
from haulage.errors import ConfigError

# Sentinel runs it with: <master-name> <role> <state> <from-ip> <from-port> <to-ip> <to-port>.
# A dead old master (the SIGKILL case) does not answer: the sentinels demote it when it comes back.
_DEMOTE = """#!{python}
import sys

import redis

_, _, _, old_host, old_port, new_host, new_port = sys.argv[1:8]
try:
    old = redis.Redis(host=old_host, port=int(old_port), socket_timeout=2, socket_connect_timeout=1)
    old.execute_command("REPLICAOF", new_host, new_port)
    old.execute_command("CLIENT", "KILL", "TYPE", "normal")
except redis.RedisError:
    pass
"""

MASTER_NAME = "mymaster"  #: the group's name, as in Redis's own examples
QUORUM = 2  #: sentinels that must agree the master is down (of three)
PAUSE = 5.0  #: seconds a planned failover may hold the master's writes while the replica catches up


class SentinelGroup:
    """One master, one replica and three sentinels, each with its own folder and log under ``folder``."""

    def __init__(self, folder: Path, *, master_name: str = MASTER_NAME, down_after: float = 2.0,
                 failover_timeout: float = 10.0) -> None:  # fmt: skip
        self.folder = folder
        self.master_name = master_name
        self.down_after = down_after  #: seconds without an answer before a sentinel calls the master down
        self.failover_timeout = failover_timeout  #: seconds a failover may take before another is tried
        self.ports = [free_port(), free_port()]  #: the two data nodes; the first starts as master
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.nodes: dict[int, subprocess.Popen[bytes]] = {}
        self.sentinels: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """The ``sentinel://`` URL of the group (database 0), for HAULAGE_REDIS_URL."""
        return ";".join(f"sentinel://127.0.0.1:{port}/0" for port in self.sentinel_ports)

    def start(self, timeout: float = 30) -> None:
        """Start the nodes and the sentinels; return once every sentinel knows the replica and the others."""
        master, replica = self.ports
        self.start_node(master)
        self.start_node(replica, replica_of=master)
        for port in self.sentinel_ports:
            self.start_sentinel(port, master)
        self.wait_ready(timeout)

    def start_node(self, port: int, *, replica_of: int | None = None) -> None:
        # The demoted master resynchronises from the new one at once: Redis's default waits 5 s
        # for more replicas before a diskless sync, and the new master takes no writes meanwhile.
        extra = ["--min-replicas-to-write", "1", "--min-replicas-max-lag", "10", "--repl-diskless-sync-delay", "0"]
        extra += ["--replicaof", "127.0.0.1", str(replica_of)] if replica_of else []
        folder = self.folder / f"redis-{port}"
        self.nodes[port] = start_redis(folder, port, appendonly=True, log_file=self.folder / f"redis-{port}.log",
                                       extra_args=extra)  # fmt: skip

    def start_sentinel(self, port: int, master: int) -> None:
        folder = self.folder / f"sentinel-{port}"
        folder.mkdir(parents=True, exist_ok=True)
        conf = folder / "sentinel.conf"  # a sentinel rewrites its own configuration: one file each
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\nprotected-mode yes\ndir {folder.resolve()}\n"
            f"sentinel monitor {self.master_name} 127.0.0.1 {master} {QUORUM}\n"
            f"sentinel down-after-milliseconds {self.master_name} {int(self.down_after * 1000)}\n"
            f"sentinel failover-timeout {self.master_name} {int(self.failover_timeout * 1000)}\n"
            f"sentinel parallel-syncs {self.master_name} 1\n"
            f"sentinel client-reconfig-script {self.master_name} {self.reconfig_script()}\n"
        )
        with open(self.folder / f"sentinel-{port}.log", "ab") as log:
            proc = subprocess.Popen([find_redis_server(), str(conf), "--sentinel"], stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.sentinels[port] = proc
        wait_for_port(port, timeout=10, proc=proc)

    def reconfig_script(self) -> Path:
        """The script each sentinel runs when it switches masters: demote the old one now, not at its next look."""
        script = self.folder / "demote-old-master.py"
        if not script.exists():
            script.write_text(_DEMOTE.format(python=sys.executable))
            script.chmod(0o755)
        return script.resolve()

    def sentinel(self, port: int | None = None) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port or self.sentinel_ports[0], socket_timeout=2)

    def master_port(self, sentinel_port: int | None = None) -> int:
        """The master's port as one sentinel sees it."""
        client = self.sentinel(sentinel_port)
        try:
            address: Any = client.sentinel_get_master_addr_by_name(self.master_name)
            if not address:
                raise ConfigError(f"sentinel {sentinel_port} does not know the master {self.master_name!r}")
            return int(address[1])
        finally:
            client.close()

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)

    def wait_ready(self, timeout: float = 30) -> None:
        """Every sentinel names one master and knows its replica and the other sentinels; the replica is in sync."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                last = self._not_ready()
            except (redis.RedisError, ConfigError) as exc:
                last = str(exc)
            if not last:
                return
            time.sleep(0.1)
        raise ConfigError(f"the sentinel group in {self.folder} is not ready after {timeout}s: {last}")

    def _not_ready(self) -> str:
        masters = {self.master_port(port) for port in self.sentinel_ports}
        if len(masters) != 1:
            return f"the sentinels disagree on the master: {sorted(masters)}"
        master = masters.pop()
        for port in self.sentinel_ports:
            client = self.sentinel(port)
            try:
                state: Any = client.sentinel_master(self.master_name)
                replicas: Any = client.sentinel_slaves(self.master_name)
            finally:
                client.close()
            if int(state.get("num-other-sentinels", 0)) < len(self.sentinel_ports) - 1:
                return f"sentinel {port} knows {state.get('num-other-sentinels')} other sentinels"
            # What SENTINEL FAILOVER needs of a replica (else NOGOODSLAVE): up, and in its last INFO linked to the
            # master; a sentinel refreshes that INFO every 10 s, so a just-demoted master takes that long to qualify.
            if not any(r.get("is_slave") and not r.get("is_sdown") and not r.get("is_disconnected")
                       and r.get("master-link-status") == "ok" and int(r.get("master-port", 0)) == master
                       for r in replicas):  # fmt: skip
                return f"sentinel {port} knows no healthy replica of {master}"
        info = self.node(master).info("replication")
        if info.get("role") != "master" or int(info.get("connected_slaves", 0)) < 1:
            return f"node {master} is {info.get('role')} with {info.get('connected_slaves')} replicas"
        replica = self.node(next(p for p in self.ports if p != master)).info("replication")
        if replica.get("master_link_status") != "up":
            return "the replica's link to the master is not up"
        return ""

    def failover(self, timeout: float = 30, *, pause: bool = False) -> tuple[int, int]:
        """``SENTINEL FAILOVER``: promote the replica; return (old, new) master ports once every sentinel names the new.

        Sentinel promotes at once, without waiting for the replica to have every write the
        master acknowledged. ``pause=True`` is the planned switch that closes that gap: hold
        the master's writes (``CLIENT PAUSE ... WRITE``), wait until the replica has caught
        up, then fail over; the held writes then meet NOREPLICAS and go to the new master.
        The sentinels take a few more seconds (their INFO period, 10 s) to see the old master
        as a healthy replica: :meth:`wait_ready` waits for that, before a second failover.
        """
        old = self.master_port()
        if pause:
            self.pause_until_replicated(old, timeout)
        client = self.sentinel()
        try:
            client.execute_command("SENTINEL", "FAILOVER", self.master_name)
        finally:
            client.close()
        new = self.wait_new_master(old, timeout)
        if pause:
            # The held writes now meet NOREPLICAS or READONLY, and follow to the new master.
            with contextlib.suppress(redis.RedisError):
                self.node(old).execute_command("CLIENT", "UNPAUSE")
        return old, new

    def pause_until_replicated(self, master: int, timeout: float) -> None:
        """Hold the master's writes for up to ``PAUSE`` seconds and wait until its replica has all it acknowledged."""
        node = self.node(master)
        node.execute_command("CLIENT", "PAUSE", int(PAUSE * 1000), "WRITE")
        deadline = time.monotonic() + min(timeout, PAUSE)
        while time.monotonic() < deadline:
            info: Any = node.info("replication")
            offset = int(info.get("master_repl_offset", 0))
            if any(int(v.get("offset", -1)) >= offset for k, v in info.items() if k.startswith("slave")):
                return
            time.sleep(0.005)
        raise ConfigError(f"the replica of 127.0.0.1:{master} did not catch up within {PAUSE}s")

    def kill_master(self) -> int:
        """SIGKILL the master (a lost machine, nothing flushed); return its port. The sentinels promote the replica."""
        port = self.master_port()
        proc = self.nodes[port]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        return port

    def wait_new_master(self, old: int, timeout: float = 30) -> int:
        """Wait until every sentinel names a master other than ``old`` that answers as master; return its port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                seen = {self.master_port(port) for port in self.sentinel_ports}
                if len(seen) == 1 and old not in seen:
                    new = seen.pop()
                    if self.node(new).info("replication").get("role") == "master":
                        return new
            except (redis.RedisError, ConfigError):
                pass  # a sentinel or node in the middle of the switch: look again
            time.sleep(0.05)
        raise ConfigError(f"no new master replaced 127.0.0.1:{old} within {timeout}s")

    def restart_node(self, port: int) -> None:
        """Start a killed node again from its append-only file; the sentinels make it a replica of the new master."""
        self.start_node(port)

    def stop(self) -> None:
        for proc in [*self.sentinels.values(), *self.nodes.values()]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in [*self.sentinels.values(), *self.nodes.values()]:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
