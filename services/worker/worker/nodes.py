"""
Jobs on several machines (`nnodes` > 1). The worker that takes such a job becomes its first node: it
hosts torchrun's c10d rendezvous at an address other workers can reach, starts its own torchrun, and
puts one "join" task per further node at the front of the queue. Each worker that takes a join task
runs the same torchrun command against that rendezvous; torchrun assigns the ranks, so the program
cannot tell a 2-node job from one machine's 2 processes.

The first node owns the job: its lease, its record, its outcome, which it writes only once the further
nodes' programs have ended too. A further node follows the attempt it joined (it stops its program
when that attempt ends or a stop is requested) and copies its output into the job's log under a
"[node k]" prefix. It keeps a heartbeat in Redis while its program runs and says what became of it:
when its worker shuts down (the program on every node checkpoints together), the first node
re-queues the job; when its worker is lost (a joined node whose heartbeat ran out), the first node
stops its own program and re-queues the job as the reaper does for a lost worker.
"""

import socket
import time
from collections.abc import Callable
from urllib.parse import urlparse

from jobs.queue import RESULT_TTL, rq_queue
from jobs.records import JobRecord, JobStatus
from jobs.specs import Rendezvous
from redis import Redis

from worker.settings import WorkerSettings

JOIN_TASK = "worker.tasks.join_job"
MARK_TTL_SECONDS = 7 * 24 * 3600


def local_address(settings: WorkerSettings) -> str:
    """How other workers reach this one: WORKER_ADDRESS, else the address this machine reaches Redis
    from (every worker reaches Redis, so that route is the likeliest to work the other way too)."""
    if settings.address:
        return settings.address
    url = urlparse(settings.redis_url)
    if not url.hostname:  # a unix socket: the machine's name is all there is
        return socket.gethostname()
    family, kind, _, _, target = socket.getaddrinfo(url.hostname, url.port or 6379, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, kind) as probe:
        probe.connect(target)  # UDP: picks the route, sends nothing
        return probe.getsockname()[0]


def free_port(address: str) -> int:
    """A port free on every interface (the advertised address may not be local: NAT)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def run_id(job_id: str, attempt: int) -> str:
    return f"{job_id}-{attempt}"


def endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def host(settings: WorkerSettings, record: JobRecord) -> Rendezvous:
    """The rendezvous the first node hosts for this attempt."""
    address = local_address(settings)
    port = settings.rendezvous_port or free_port(address)
    return Rendezvous(endpoint(address, port), run_id(record.id, len(record.attempts)), True, address)


def join(settings: WorkerSettings, job_id: str, attempt: int, at: str) -> Rendezvous:
    """The same rendezvous as seen by a further node."""
    return Rendezvous(at, run_id(job_id, attempt), False, local_address(settings))


def recruit(redis: Redis, record: JobRecord, nnodes: int, rendezvous: Rendezvous, resume: bool) -> None:
    """Put a join task per further node at the front of the queue: free workers take them first."""
    attempt = len(record.attempts)
    with redis.pipeline() as pipe:
        for node in range(1, nnodes):
            rq_queue(redis, "gpu").enqueue_call(
                JOIN_TASK,
                args=(record.id, attempt, node, rendezvous.endpoint, resume),
                job_id=f"{run_id(record.id, attempt)}-node{node}",
                timeout=-1,
                result_ttl=RESULT_TTL,
                at_front=True,
                pipeline=pipe,
            )
        pipe.execute()


def attempt_running(record: JobRecord | None, attempt: int) -> bool:
    """Whether the job is started with `attempt` as its latest attempt (not ended, not taken over)."""
    return record is not None and record.status == JobStatus.STARTED and len(record.attempts) == attempt


# What a further node says of itself in Redis, per attempt: it joined, its program ended, or its worker
# shut down (it stopped the program to checkpoint). Joined with no heartbeat left: its worker was lost.
JOINED, ENDED, SHUT_DOWN = "joined", "ended", "shut down"


def states_key(job_id: str, attempt: int) -> str:
    return f"nanochat:job:{job_id}:{attempt}:nodes"


def node_key(job_id: str, attempt: int, node: int) -> str:
    return f"nanochat:job:{job_id}:{attempt}:node:{node}"


def mark(redis: Redis, job_id: str, attempt: int, node: int, state: str) -> None:
    with redis.pipeline() as pipe:
        pipe.hset(states_key(job_id, attempt), str(node), state)
        pipe.expire(states_key(job_id, attempt), MARK_TTL_SECONDS)
        pipe.execute()


def heartbeat(redis: Redis, job_id: str, attempt: int, node: int, seconds: float) -> None:
    """A further node's program runs (the key expires `seconds` after its worker stops renewing it)."""
    redis.set(node_key(job_id, attempt, node), 1, px=int(seconds * 1000))


def shut_down_or_lost(redis: Redis, job_id: str, attempt: int) -> tuple[bool, list[int]]:
    """Whether a further node's worker shut down, and which joined nodes lost their worker."""
    states = {int(node): state.decode() for node, state in redis.hgetall(states_key(job_id, attempt)).items()}
    joined = sorted(node for node, state in states.items() if state == JOINED)
    with redis.pipeline(transaction=False) as pipe:
        for node in joined:
            pipe.exists(node_key(job_id, attempt, node))
        beating = pipe.execute()
    return SHUT_DOWN in states.values(), [
        node for node, alive in zip(joined, beating, strict=True) if not alive
    ]


def wait_for_further_nodes(
    redis: Redis, job_id: str, attempt: int, nnodes: int, timeout: float, keep_alive: Callable[[], None]
) -> None:
    """Until no further node's program runs (or `timeout`), renewing the first node's lease: a job that
    ends must leave nothing running."""
    keys = [node_key(job_id, attempt, node) for node in range(1, nnodes)]
    deadline = time.monotonic() + timeout
    while redis.exists(*keys) and time.monotonic() < deadline:
        keep_alive()
        time.sleep(0.5)
