"""Redis Sentinel: the ``sentinel://`` URL form, and Haulage's clients following a real failover.

One Sentinel group per module (haulage.devtools.sentinel: master, replica, three
sentinels, ``min-replicas-to-write 1``); each failover test promotes the replica
with ``SENTINEL FAILOVER`` while threads write through Haulage's client, and
checks that every write acknowledged is there exactly once afterwards, on the new
master. The whole run through workers is tests/chaos/test_failover.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from haulage.devtools.redis_server import find_redis_server
from haulage.devtools.sentinel import SentinelGroup
from haulage.errors import ConfigError
from haulage.redis_client import connect
from haulage.settings import load_settings, parse_sentinel_url
from haulage.tasks import config
from haulage.tasks.redis_policy import problems
from haulage.tasks.sentinel_transport import TRANSPORT
from tests.conftest import ROOT, wait_until

URL = "sentinel://127.0.0.1:26379/2;sentinel://127.0.0.1:26380/2;sentinel://127.0.0.1:26381/2"


def test_the_url_names_the_sentinels_the_database_and_the_masters_password() -> None:
    address = parse_sentinel_url("sentinel://:s%40cret@10.0.0.1:26379/3;sentinel://10.0.0.2")
    assert address.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379))
    assert (address.db, address.username, address.password) == (3, None, "s@cret")
    assert parse_sentinel_url(URL).db == 2


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sentinel://127.0.0.1:26379/0;redis://127.0.0.1:6379/0", "must be sentinel://host:port"),
        ("sentinel://127.0.0.1:26379/0;sentinel://127.0.0.1:26380/1", "different databases"),
        ("sentinel://127.0.0.1:26379/zero", "database number"),
        ("sentinel://127.0.0.1:huge/0", "bad port"),
    ],
)
def test_a_malformed_group_fails_at_start_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, url: str, message: str
) -> None:
    monkeypatch.setenv("HAULAGE_BROKER_URL", url)
    with pytest.raises(ConfigError, match=message) as caught:
        load_settings()
    assert "HAULAGE_BROKER_URL" in str(caught.value)


def test_broker_results_and_beat_all_follow_the_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAULAGE_REDIS_URL", URL)
    monkeypatch.setenv("HAULAGE_REDIS_SENTINEL_MASTER", "haulage-main")
    conf = config.from_settings(load_settings())
    assert conf["broker_url"] == conf["result_backend"] == URL
    assert conf["broker_transport"] == TRANSPORT
    assert conf["broker_transport_options"]["master_name"] == "haulage-main"
    assert conf["result_backend_transport_options"]["master_name"] == "haulage-main"
    assert conf["redbeat_redis_url"] == "redis-sentinel://"
    assert conf["redbeat_redis_options"]["service_name"] == "haulage-main"
    assert conf["redbeat_redis_options"]["sentinels"] == [["127.0.0.1", 26379], ["127.0.0.1", 26380],
                                                          ["127.0.0.1", 26381]]  # fmt: skip
    assert conf["redbeat_redis_options"]["db"] == 2
    # A plain Redis keeps kombu's own transport (picked from the URL).
    monkeypatch.setenv("HAULAGE_REDIS_URL", "redis://127.0.0.1:6379/0")
    plain = config.from_settings(load_settings())
    assert plain["broker_transport"] is None and "master_name" not in plain["broker_transport_options"]


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    try:
        find_redis_server()
    except ConfigError as exc:
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(f"CI must run the Sentinel tests: {exc}")
        pytest.skip(str(exc))
    g = SentinelGroup(tmp_path_factory.mktemp("sentinel"))
    try:
        g.start()
        yield g
    finally:
        g.stop()


@pytest.fixture
def client(group: SentinelGroup) -> Iterator[redis.Redis]:
    group.wait_ready()  # the previous test's failover has settled: the demoted master is a healthy replica
    c = connect(group.url, socket_timeout=5, socket_connect_timeout=2)
    yield c
    c.close()


def _write_through_a_failover(
    group: SentinelGroup, client: redis.Redis, key: str, *, pause: bool
) -> tuple[int, list[str], int]:
    """Threads INCR ``key`` by Lua script while the group fails over; return (acknowledged, errors, new master)."""
    script = client.register_script("return redis.call('INCR', KEYS[1])")
    acked, errors = [0], []
    stop = threading.Event()

    def write() -> None:
        while not stop.is_set():
            try:
                script(keys=[key])
                acked[0] += 1
            except redis.RedisError as exc:
                errors.append(repr(exc))
            stop.wait(0.005)

    threads = [threading.Thread(target=write) for _ in range(WRITERS)]
    for t in threads:
        t.start()
    wait_until(lambda: acked[0] >= 50, timeout=10, what="writes before the failover")
    old, new = group.failover(pause=pause)
    before = acked[0]
    wait_until(lambda: acked[0] >= before + 50, timeout=15, what="writes after the failover")
    stop.set()
    for t in threads:
        t.join(10)
    assert old != new
    return acked[0], errors, new


#: threads writing through the failover; at most one write each is in flight when the replica is promoted
WRITERS = 4


@pytest.mark.parametrize("pause", [False, True], ids=["sentinel-failover", "paused-then-failover"])
def test_writes_follow_the_new_master_and_none_is_repeated(
    group: SentinelGroup, client: redis.Redis, pause: bool
) -> None:
    key = f"t:sentinel:counter:{pause}"
    acked, errors, new = _write_through_a_failover(group, client, key, pause=pause)
    assert errors == []
    assert client.connection_pool.get_master_address()[1] == new
    stored = int(group.node(new).get(key) or 0)  # read on the promoted node itself
    # Never more than acknowledged (no write applied twice). A bare SENTINEL FAILOVER promotes without
    # waiting for the replica: a write the old master acknowledged in that instant is lost (README,
    # "Redis Sentinel"). Holding the writes until the replica has caught up loses none.
    lost = acked - stored
    print(f"\nfailover pause={pause}: acknowledged={acked} stored={stored} lost={lost}")
    assert 0 <= lost <= (0 if pause else WRITERS), (acked, stored)


def test_the_demoted_master_refuses_writes_the_moment_its_replica_is_promoted(group: SentinelGroup) -> None:
    # min-replicas-to-write 1: what keeps clients still connected to it from writing into the void.
    group.wait_ready()
    master = group.master_port()
    assert int(group.node(master).config_get("min-replicas-to-write")["min-replicas-to-write"]) == 1
    replica = next(p for p in group.ports if p != master)
    group.node(replica).execute_command("REPLICAOF", "NO", "ONE")  # what the sentinels do first
    try:
        with pytest.raises(redis.ResponseError, match="NOREPLICAS"):
            wait_until(lambda: group.node(master).set("t:sentinel:split", "1") and False, timeout=5, interval=0.01,
                       what="the old master to refuse writes")  # fmt: skip
    finally:
        group.node(replica).execute_command("REPLICAOF", "127.0.0.1", str(master))
        group.wait_ready()


def test_a_subscriber_hears_what_is_published_after_the_failover(group: SentinelGroup, client: redis.Redis) -> None:
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("t:sentinel:changes")
    wait_until(lambda: pubsub.get_message(timeout=0.1) is None and pubsub.subscribed, timeout=5, what="subscribed")
    group.failover()
    heard: list[bytes] = []

    def hear() -> bool:
        client.publish("t:sentinel:changes", b"after")
        message = pubsub.get_message(timeout=0.2)
        if message is not None:
            heard.append(message["data"])
        return bool(heard)

    wait_until(hear, timeout=15, what="a message published after the failover")
    assert heard[0] == b"after"
    pubsub.close()


def test_the_workers_redis_check_reads_the_groups_master(group: SentinelGroup) -> None:
    fatal, weak = problems(group.url)
    assert fatal == [] and weak == []
    group.wait_ready()
    master = group.node(group.master_port())
    master.config_set("min-replicas-to-write", 0)
    try:
        fatal, weak = problems(group.url)
        assert fatal == [] and any("min-replicas-to-write" in w for w in weak), weak
    finally:
        master.config_set("min-replicas-to-write", 1)


def test_the_group_listens_on_loopback_only(group: SentinelGroup) -> None:
    for port in group.ports:
        assert group.node(port).config_get("bind")["bind"].split() == ["127.0.0.1"], port
    for port in group.sentinel_ports:
        conf = (group.folder / f"sentinel-{port}" / "sentinel.conf").read_text()
        assert "bind 127.0.0.1" in conf.splitlines(), port


def test_beat_keeps_its_lock_on_the_new_master(group: SentinelGroup, tmp_path: Path) -> None:
    """RedBeat on the group: it holds its lock through a failover by extending it on the promoted master."""
    group.wait_ready()
    base = {k: v for k, v in os.environ.items() if not k.startswith("HAULAGE_")}
    env = {**base, "PYTHONPATH": str(ROOT), "HAULAGE_REDIS_URL": group.url, "HAULAGE_KEY_PREFIX": "t-sentinel"}
    log = tmp_path / "beat.log"
    with open(log, "ab") as out:
        beat = subprocess.Popen([sys.executable, "-m", "haulage.cli", "beat"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    lock = "t-sentinel:redbeat:lock"
    try:
        wait_until(lambda: group.node(group.master_port()).exists(lock), timeout=60, what="beat to take its lock")
        _, new = group.failover()
        promoted, since = group.node(new), time.monotonic()
        left = wait_until(lambda: promoted.pttl(lock) > 0 and promoted.pttl(lock), timeout=10, what="the lock")

        def extended() -> bool:  # more time left than the replicated TTL would have now: beat extended it there
            return bool(promoted.pttl(lock) > left - (time.monotonic() - since) * 1000 + 1000)

        wait_until(extended, timeout=30, what="beat to extend its lock on the new master")
        assert beat.poll() is None
        assert " ERROR " not in log.read_text(errors="replace")
    finally:
        os.killpg(beat.pid, signal.SIGTERM)
        beat.wait(20)


def test_the_orphan_sweep_puts_back_a_dead_workers_delivery_on_the_new_master(group: SentinelGroup) -> None:
    """The sweep reads kombu's unacked index through the broker's own channel, which follows the failover."""
    from kombu import Connection, Exchange, Queue

    from haulage.coordination import RedisCoordination
    from haulage.tasks.app import app
    from haulage.tasks.orphans import sweep

    group.wait_ready()
    options = {**app.conf.broker_transport_options, "master_name": group.master_name}
    queue = Queue("t-sweep", Exchange("t-sweep", type="direct"), routing_key="t-sweep")
    with Connection(group.url, transport=TRANSPORT, transport_options=options) as conn:
        channel = conn.default_channel
        producer = conn.Producer(serializer="json")
        producer.publish({"x": 1}, exchange=queue.exchange, routing_key="t-sweep", declare=[queue],
                         headers={"task": "haulage.fan_out", "id": "t-orphan"})  # fmt: skip
        # A worker takes it and dies holding it: kombu's unacked entry, delivered long ago.
        message = wait_until(lambda: channel.basic_get("t-sweep", no_ack=False), timeout=10, what="the delivery")
        tag = message.delivery_tag
        prefix = options["global_keyprefix"]
        master = group.node(group.master_port())
        master.zadd(f"{prefix}{options['unacked_index_key']}", {tag: time.time() - 100})
        group.failover()
        coordination = RedisCoordination(connect(group.url, socket_timeout=5))
        restored = wait_until(lambda: sweep(app, channel, coordination, liveness=15), timeout=15, what="the sweep")
        assert restored == ["t-orphan"]
        new = group.node(group.master_port())
        assert new.llen(f"{prefix}t-sweep") == 1
        assert not new.hexists(f"{prefix}{options['unacked_key']}", tag)
