"""Job control on a real Redis and RQ: submits are atomic, listing and the conflict check read only
what they return (the indexes), and records written by an older version stay listed and still block."""

import threading
from collections.abc import Callable

import pytest
from jobs import queue, records, workers
from jobs.records import JobRecord, JobStatus
from jobs.specs import JOB_SPEC
from redis import Redis
from rq import Worker


def tokenizer_job(run: str) -> object:
    return JOB_SPEC.validate_python({"kind": "tokenizer", "run": run, "config": {"vocab_size": 1024}})


def keys_read(redis: Redis, action: Callable[[], object]) -> int:
    """How many keys Redis looked up (found or not) while `action` ran."""

    def lookups() -> int:
        stats = redis.info("stats")
        return stats["keyspace_hits"] + stats["keyspace_misses"]

    before = lookups()
    action()
    return lookups() - before


def ended_jobs(redis: Redis, count: int, runs: int) -> None:
    """`count` finished tokenizer jobs spread over `runs` runs, stored the way submits store them."""
    with redis.pipeline() as pipe:
        for i in range(count):
            records.add(pipe, JobRecord.new("tokenizer", f"old{i % runs}", {}, JobStatus.FINISHED))
        pipe.execute()


def race(redis: Redis, run: str, clients: int) -> tuple[list[JobRecord], list[queue.Conflict]]:
    """`clients` threads submit the run's tokenizer at the same moment: the jobs queued, the refusals."""
    start, accepted, refused = threading.Barrier(clients), [], []

    def submit() -> None:
        start.wait()
        try:
            accepted.append(queue.submit(redis, tokenizer_job(run)))
        except queue.Conflict as error:
            refused.append(error)

    threads = [threading.Thread(target=submit) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return accepted, refused


def test_concurrent_submits_of_one_stage_queue_exactly_one(redis: Redis) -> None:
    """Sixteen clients submit the same run's tokenizer at once, five times over: one wins each time."""
    for round_ in range(5):
        accepted, refused = race(redis, f"race{round_}", clients=16)
        assert (len(accepted), len(refused)) == (1, 15)
        assert f"job {accepted[0].id} " in str(refused[0])
    assert len(queue.rq_queue(redis, "cpu")) == 5  # tokenizer jobs use no GPU
    assert records.list_records(redis, status=JobStatus.QUEUED)[1] == 5


def test_listing_and_the_conflict_check_read_only_the_page(redis: Redis) -> None:
    ended_jobs(redis, 3000, runs=100)
    newest = [queue.submit(redis, tokenizer_job(f"new{i}")) for i in range(3)]
    queue.stop(redis, newest[0].id)

    page, total = records.list_records(redis, limit=2)
    assert [r.id for r in page] == [newest[2].id, newest[1].id] and total == 3003
    queued, total = records.list_records(redis, status=JobStatus.QUEUED)
    assert [r.id for r in queued] == [newest[2].id, newest[1].id] and total == 2
    canceled, total = records.list_records(redis, status=JobStatus.CANCELED)
    assert [r.id for r in canceled] == [newest[0].id] and total == 1
    of_run, total = records.list_records(redis, run="old7", offset=10, limit=5)
    assert len(of_run) == 5 and total == 30 and all(r.run == "old7" for r in of_run)
    filters = {"status": JobStatus.FINISHED, "run": "old7", "kind": "tokenizer"}
    both, total = records.list_records(redis, limit=3, **filters)
    assert len(both) == 3 and total == 30

    # 3,003 records; each call looks up about as many keys as it returns records
    assert keys_read(redis, lambda: records.list_records(redis, limit=20)) < 30
    assert keys_read(redis, lambda: records.list_records(redis, status=JobStatus.QUEUED)) < 10
    assert keys_read(redis, lambda: records.list_records(redis, run="old7", limit=5)) < 10
    with pytest.raises(queue.Conflict):
        queue.submit(redis, tokenizer_job("new1"))
    assert keys_read(redis, lambda: queue.submit(redis, tokenizer_job("new9"))) < 10
    assert keys_read(redis, lambda: queue.active_jobs(redis, "old7")) < 5


def test_records_of_an_older_version_are_listed_and_still_block_a_second_writer(redis: Redis) -> None:
    """Records an older version stored (the record and the creation-time index only): the first reader
    indexes them, so listing finds them and the conflict check sees the active one."""
    ended = JobRecord.new("base_train", "legacy", {}, JobStatus.FAILED)
    active = JobRecord.new("tokenizer", "legacy", {})
    for record in (ended, active):
        redis.set(records.record_key(record.id), record.model_dump_json())
        redis.zadd(records.JOBS_INDEX, {record.id: record.created_at.timestamp()})

    with pytest.raises(queue.Conflict, match=active.id):
        queue.submit(redis, tokenizer_job("legacy"))
    assert [r.id for r in records.list_records(redis, run="legacy")[0]] == [active.id, ended.id]
    assert [r.id for r in records.list_records(redis, status=JobStatus.FAILED)[0]] == [ended.id]
    assert queue.stop(redis, active.id).status == JobStatus.CANCELED
    assert records.list_records(redis, status=JobStatus.QUEUED)[1] == 0
    assert queue.submit(redis, tokenizer_job("legacy")).status == JobStatus.QUEUED


def test_jobs_that_use_no_gpu_go_on_a_queue_of_their_own_first_and_on_retry(redis: Redis) -> None:
    """A tokenizer, an export, an import or a file validation never waits in line behind a model's training:
    a worker of CPU jobs alone (WORKER_QUEUES=cpu) takes them from their own queue."""
    specs = [
        {"kind": "base_train", "run": "a", "config": {}},
        {"kind": "export", "run": "a", "config": {}},
        {"kind": "import", "run": "b", "config": {"source": "runs/a/exports/a-sft-000001"}},
        {"kind": "validate_file", "run": "c", "config": {"file": "file-" + "0" * 24}},
        {"kind": "tokenizer", "run": "d", "config": {"vocab_size": 300}},
        {"kind": "base_eval", "run": "e", "config": {}},
    ]
    train, export, load, validate, tokenizer, evaluate = (
        queue.submit(redis, JOB_SPEC.validate_python(s)) for s in specs
    )
    cpu, gpu = queue.rq_queue(redis, "cpu"), queue.rq_queue(redis, "gpu")
    assert cpu.job_ids == [export.rq_job_id, load.rq_job_id, validate.rq_job_id, tokenizer.rq_job_id]
    assert gpu.job_ids == [train.rq_job_id, evaluate.rq_job_id]
    queue.stop(redis, validate.id)
    again = queue.retry(redis, validate.id)
    assert again.rq_job_id in cpu.job_ids and again.rq_job_id not in gpu.job_ids


def test_a_stored_job_is_requeued_on_its_kinds_queue_whatever_its_config(redis: Redis) -> None:
    """The reaper and a worker shutting down re-queue records written by an older version too: the queue
    follows the kind, and a config that no longer validates does not stop the re-queue."""
    with redis.pipeline() as pipe:
        for kind in ("export", "base_train"):
            records.add(pipe, JobRecord.new(kind, "old", {"a_field_since_removed": 1}, JobStatus.STARTED))
        pipe.execute()
    old_export, old_training = sorted(records.list_records(redis)[0], key=lambda r: r.kind != "export")
    for record, kind in ((old_export, "cpu"), (old_training, "gpu")):
        requeued = queue.enqueue(redis, record.id, {JobStatus.STARTED})
        assert requeued is not None and requeued.rq_job_id in queue.rq_queue(redis, kind).job_ids


def test_reading_the_workers_leaves_the_readers_redis_timeout_alone(redis_url: str) -> None:
    """GET /workers reads RQ's workers on the API's client: RQ would raise its socket timeout to minutes,
    and a Redis that hangs would then stall the API's routes for that long instead of a 503."""
    Redis.from_url(redis_url).flushall()
    registered = Worker(
        [queue.rq_queue(Redis.from_url(redis_url), "cpu")], connection=Redis.from_url(redis_url)
    )
    registered.register_birth()
    api_client = Redis.from_url(redis_url, socket_timeout=5)
    (listed,) = workers.overview(api_client).workers
    assert (listed.name, listed.queues, listed.busy) == (registered.name, ["cpu"], False)
    assert api_client.connection_pool.connection_kwargs["socket_timeout"] == 5
