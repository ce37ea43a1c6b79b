"""What the first node of a multi-node job reads from Redis about the others, and the address it
gives them (tests/api/test_multi_node.py runs such jobs on real workers)."""

import time

import pytest
from jobs.records import Attempt, JobRecord
from redis import Redis

from worker import nodes
from worker.settings import WorkerSettings


def test_a_joined_node_is_lost_once_its_heartbeat_runs_out_unless_it_ended(redis: Redis) -> None:
    for node in (1, 2, 3):
        nodes.heartbeat(redis, "job", 1, node, 60)
        nodes.mark(redis, "job", 1, node, nodes.JOINED)
    assert nodes.shut_down_or_lost(redis, "job", 1) == (False, [])
    nodes.mark(redis, "job", 1, 2, nodes.ENDED)  # its program ended; its heartbeat goes with it
    for node in (1, 2):
        redis.delete(nodes.node_key("job", 1, node))  # node 1's worker died: its heartbeat ran out
    assert nodes.shut_down_or_lost(redis, "job", 1) == (False, [1])
    nodes.mark(redis, "job", 1, 1, nodes.SHUT_DOWN)
    assert nodes.shut_down_or_lost(redis, "job", 1) == (True, [])
    assert nodes.shut_down_or_lost(redis, "job", 2) == (False, [])  # another attempt: nothing known


def test_a_heartbeat_expires_unless_renewed(redis: Redis) -> None:
    nodes.heartbeat(redis, "job", 1, 1, 0.2)
    nodes.mark(redis, "job", 1, 1, nodes.JOINED)
    time.sleep(0.4)
    assert nodes.shut_down_or_lost(redis, "job", 1) == (False, [1])


def test_the_rendezvous_address_is_the_one_redis_is_reached_from_unless_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6390/0")
    assert nodes.local_address(WorkerSettings()) == "127.0.0.1"
    monkeypatch.setenv("WORKER_ADDRESS", "10.1.2.3")
    monkeypatch.setenv("WORKER_RENDEZVOUS_PORT", "29400")
    record = JobRecord.new("base_train", "r", {"nnodes": 2})
    record.attempts = [Attempt(worker="w", started_at=record.created_at)] * 2
    rendezvous = nodes.host(WorkerSettings(), record)
    assert rendezvous.endpoint == "10.1.2.3:29400" and rendezvous.is_host
    assert rendezvous.run_id == f"{record.id}-2"  # a new rendezvous for each attempt
