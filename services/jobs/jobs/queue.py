"""
The job life cycle on top of RQ: submit (a program or a pipeline of dependent stages), stop, retry,
delete, and what happens when a stage ends. RQ carries only the job id (JSON, never pickle); the
record in Redis is the truth.

    waiting ─(stage before finished)→ queued ─(a worker picks it)→ started ─→ finished
    waiting/queued ─(stop, or the stage before did not finish)→ canceled
    started ─(stop)→ stopped       started ─(program failed, time limit)→ failed / stopped
    started ─(worker lost, retries left)→ queued (resumes from its latest checkpoint)
    started ─(its worker shuts down: the program checkpoints first)→ queued
    failed/stopped/canceled ─(retry)→ queued
"""

import contextlib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis import Redis, WatchError
from redis.client import Pipeline
from rq import Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from jobs import models, records
from jobs.records import ACTIVE, RETRYABLE, JobRecord, JobStatus
from jobs.specs import JOB_SPEC, SPEC_CLASSES, JobSpec, PipelineJob, ProgramJob

# Two queues: jobs that run on GPUs where a machine has them (model training, evaluation), and jobs that
# never use one (tokenizer training, exports, imports, file validations: JobSpec.uses_gpu). A worker takes
# from the queues its WORKER_QUEUES names; compose and `make up` run one for the second alone, so that a
# file uploaded while a model trains is validated meanwhile, not after it.
QUEUE_NAME = "nanochat-jobs"
CPU_QUEUE_NAME = "nanochat-cpu-jobs"
QUEUE_NAMES = {"gpu": QUEUE_NAME, "cpu": CPU_QUEUE_NAME}
TASK = "worker.tasks.run_job"
RESULT_TTL = 3600  # seconds RQ keeps its own data on an attempt that ended; our records stay
SERIALIZER = JSONSerializer


class Conflict(Exception):
    """The request cannot apply to the job in its current state (HTTP 409)."""


def rq_queue(redis: Redis, kind: str) -> Queue:
    """The RQ queue of `kind` (a key of QUEUE_NAMES)."""
    return Queue(QUEUE_NAMES[kind], connection=redis, serializer=SERIALIZER)


def queue_kind(record: JobRecord) -> str:
    """Which queue a job goes on: "cpu" for a kind that uses no GPU, else "gpu". By its kind alone, so that
    a stored record is re-queued whatever its config (a kind since removed goes on the GPU queue)."""
    spec = SPEC_CLASSES.get(record.kind)
    return "cpu" if spec is not None and not spec.uses_gpu else "gpu"


def rq_job_id(job_id: str, attempt: int) -> str:
    """Unique per enqueue: a retry never meets an RQ job of an earlier enqueue under its id."""
    return f"{job_id}-{attempt}-{uuid.uuid4().hex[:8]}"


def put_on_queue(redis: Redis, pipe: Pipeline, record: JobRecord) -> None:
    """Add RQ's commands for this attempt to a transaction. Each attempt is an RQ job of its own
    (`<id>-<n>-<random>`): a lost worker's RQ job stays RQ's business. timeout=-1: training runs for hours;
    the worker enforces the job's own time_limit. It goes on the queue of its kind (queue_kind)."""
    rq_queue(redis, queue_kind(record)).enqueue_call(
        TASK, args=(record.id,), job_id=record.rq_job_id, timeout=-1, result_ttl=RESULT_TTL,
        failure_ttl=RESULT_TTL, pipeline=pipe,
    )  # fmt: skip


def enqueue(
    redis: Redis,
    job_id: str,
    allowed: set[JobStatus],
    check: Callable[[Pipeline, JobRecord], None] | None = None,
    **changes: Any,
) -> JobRecord | None:
    """Mark the job queued (if its status is one of `allowed`, with `changes`) and put it on RQ's
    queue, in one transaction: both happen, or neither. None when its status did not allow it. `check`
    may refuse (raise) on what it reads of the run's active jobs (see records.transition)."""
    return records.transition(
        redis,
        job_id,
        allowed,
        then=lambda pipe, record: put_on_queue(redis, pipe, record),
        check=check,
        status=JobStatus.QUEUED,
        rq_job_id=lambda record: rq_job_id(record.id, len(record.attempts) + 1),
        **changes,
    )


def enqueue_new(redis: Redis, first: JobRecord, *others: JobRecord) -> JobRecord:
    """Store new records and queue the first, in one transaction, unless another active job already
    writes a stage of the run that one of them writes (Conflict): the check reads the run's active jobs
    under WATCH, so two submits racing for a stage cannot both pass it."""
    queued = first.model_copy(update={"status": JobStatus.QUEUED, "rq_job_id": rq_job_id(first.id, 1)})
    writes = set().union(*(spec_of(r).writes for r in (first, *others) if r.kind != "pipeline"))
    records.ensure_indexed(redis)
    with redis.pipeline() as pipe:
        while True:
            try:
                pipe.watch(records.active_index(first.run))
                refuse_second_writer(pipe, first.run, writes)
                pipe.multi()  # one MULTI/EXEC for our commands and RQ's
                for record in (queued, *others):
                    records.add(pipe, record)
                put_on_queue(redis, pipe, queued)
                pipe.execute()
                return queued
            except WatchError:
                continue  # a job of the run started or ended meanwhile: check again


def active_jobs(redis: Redis, run: str) -> list[JobRecord]:
    """Jobs that are waiting, queued or started and write or read the run (a chat stage that starts
    from it reads it)."""
    records.ensure_indexed(redis)
    return records.active_records(redis, run)


def jobs_using_export(redis: Redis, base_dir: Path, model_id: str) -> list[JobRecord]:
    """Active jobs that may write a checkpoint's export (an export of its run: one at a time, and one
    of the stage's latest step may be this one) or read it (an import from its folder)."""
    records.ensure_indexed(redis)
    folder = models.export_folder(base_dir / "runs", model_id).resolve()
    run = models.MODEL_ID.fullmatch(model_id)[1]
    active = [r for status in ACTIVE for r in records.iter_records(redis, records.status_index(status))]
    exports = [r for r in active if r.kind == "export" and r.run == run]
    imports = [r for r in active if r.kind == "import" and same_folder(base_dir / r.config["source"], folder)]
    return exports + imports


def same_folder(path: Path, resolved: Path) -> bool:
    try:
        return path.resolve() == resolved
    except (OSError, RuntimeError):  # a symlink loop: not that folder
        return False


def refuse_second_writer(redis: Redis | Pipeline, run: str, stages: set[str]) -> None:
    """Conflict when an active job writes one of these stages of the run (call ensure_indexed first)."""
    for busy in records.active_records(redis, run):
        if busy.run == run and busy.kind != "pipeline" and spec_of(busy).writes & stages:
            raise Conflict(
                f"job {busy.id} ({busy.kind}, {busy.status}) is writing run {run!r}: wait for it to end, "
                "stop it, or use another run name"
            )


def spec_of(record: JobRecord) -> ProgramJob:
    return JOB_SPEC.validate_python({"kind": record.kind, "run": record.run, "config": record.config})


def submit(redis: Redis, spec: JobSpec) -> JobRecord:
    """Store and queue a job; a pipeline queues its first stage and waits with the others.
    Refused (Conflict) while another job writes one of the same run's stages."""
    config = spec.config.model_dump(mode="json")
    if not isinstance(spec, PipelineJob):
        return enqueue_new(redis, JobRecord.new(spec.kind, spec.run, config))
    pipeline = JobRecord.new(spec.kind, spec.run, config)
    stages = [
        JobRecord.new(s.kind, s.run, s.config.model_dump(mode="json"), JobStatus.WAITING).model_copy(
            update={"pipeline_id": pipeline.id}
        )
        for s in spec.stages()
    ]
    pipeline.stages = [s.id for s in stages]
    enqueue_new(redis, stages[0], pipeline, *stages[1:])
    return settle_pipeline(redis, pipeline.id)


def stop(redis: Redis, job_id: str) -> JobRecord | None:
    """Stop a job: one not started yet is canceled at once; a started one is asked to stop, and its
    worker sends the program SIGTERM (a trainer checkpoints first), then SIGKILL after a grace period.
    A pipeline stops its current stage (the later ones are canceled). None for an unknown id."""
    record = records.load(redis, job_id)
    if record is None:
        return None
    if record.kind == "pipeline":
        if not record.is_active:
            raise Conflict(f"pipeline {job_id} has already ended ({record.status})")
        for stage in records.load_many(redis, record.stages):
            if stage.status in (JobStatus.QUEUED, JobStatus.STARTED):
                stop(redis, stage.id)
            elif stage.status == JobStatus.WAITING:
                records.transition(
                    redis, stage.id, {JobStatus.WAITING}, status=JobStatus.CANCELED, ended_at=records.now(),
                    error="the pipeline was stopped",
                )  # fmt: skip
        return settle_pipeline(redis, job_id)
    reason = "stopped before it started"
    if canceled := records.transition(
        redis,
        job_id,
        {JobStatus.QUEUED, JobStatus.WAITING},
        status=JobStatus.CANCELED,
        ended_at=records.now(),
        error=reason,
    ):
        if canceled.rq_job_id is not None:
            with contextlib.suppress(NoSuchJobError, InvalidJobOperation):  # already picked up, or gone
                Job.fetch(canceled.rq_job_id, connection=redis, serializer=SERIALIZER).cancel()
        stage_ended(redis, canceled)
        return records.load(redis, job_id)
    if requested := records.transition(redis, job_id, {JobStatus.STARTED}, stop_requested=True):
        return requested
    raise Conflict(f"job {job_id} has already ended ({records.load(redis, job_id).status})")


def retry(redis: Redis, job_id: str) -> JobRecord | None:
    """Queue a failed, stopped or canceled job again; it resumes from its latest checkpoint. A
    pipeline retries its first stage that did not finish, and the later stages wait again."""
    record = records.load(redis, job_id)
    if record is None:
        return None
    if record.status not in RETRYABLE:
        raise Conflict(
            f"job {job_id} is {record.status}: only failed, stopped or canceled jobs can be retried"
        )
    if record.kind == "pipeline":
        stages = records.load_many(redis, record.stages)
        unfinished = [s for s in stages if s.status != JobStatus.FINISHED]
        retry(redis, unfinished[0].id)
        return settle_pipeline(redis, job_id)
    if record.pipeline_id is not None:
        stages = records.load_many(redis, records.load(redis, record.pipeline_id).stages)
        if busy := [s for s in stages if s.is_active]:
            raise Conflict(f"stage {busy[0].id} of its pipeline is still {busy[0].status}")
        earlier = stages[: [s.id for s in stages].index(job_id)]
        if unfinished := [s for s in earlier if s.status != JobStatus.FINISHED]:
            raise Conflict(f"stage {unfinished[0].kind} before it has not finished: retry the pipeline")
    records.ensure_indexed(redis)
    again = enqueue(
        redis,
        job_id,
        set(RETRYABLE),
        check=lambda pipe, current: refuse_second_writer(pipe, current.run, spec_of(current).writes),
        stop_requested=False,
        error=None,
        ended_at=None,
        result=None,
    )
    if again is None:
        raise Conflict(f"job {job_id} changed state meanwhile; look again")
    if record.pipeline_id is not None:
        pipeline = records.load(redis, record.pipeline_id)
        later = pipeline.stages[pipeline.stages.index(job_id) + 1 :]
        for stage_id in later:
            records.transition(
                redis, stage_id, set(RETRYABLE), status=JobStatus.WAITING, error=None, ended_at=None
            )
        settle_pipeline(redis, record.pipeline_id)
    return records.load(redis, job_id)


def stage_ended(redis: Redis, record: JobRecord) -> None:
    """After a pipeline stage ends: queue the next one, or cancel the rest when it did not finish."""
    if record.pipeline_id is None:
        return
    pipeline = records.load(redis, record.pipeline_id)
    if pipeline is None:
        return
    later = pipeline.stages[pipeline.stages.index(record.id) + 1 :]
    if record.status == JobStatus.FINISHED and later:
        enqueue(redis, later[0], {JobStatus.WAITING})
    elif record.status != JobStatus.FINISHED:
        reason = f"stage {record.kind} {record.status}"
        for stage_id in later:
            records.transition(
                redis,
                stage_id,
                {JobStatus.WAITING},
                status=JobStatus.CANCELED,
                ended_at=records.now(),
                error=reason,
            )
    settle_pipeline(redis, pipeline.id)


def settle_pipeline(redis: Redis, pipeline_id: str) -> JobRecord:
    """A pipeline's status, times and progress follow its stages' (a compare-and-set over all of them:
    the API and a worker settling at once cannot leave a stale view)."""
    with redis.pipeline() as pipe:
        while True:
            try:
                pipe.watch(records.record_key(pipeline_id))
                pipeline = records.load(pipe, pipeline_id)
                pipe.watch(*(records.record_key(i) for i in pipeline.stages))
                updated = pipeline.model_copy(update=pipeline_view(records.load_many(pipe, pipeline.stages)))
                pipe.multi()
                records.save(pipe, pipeline, updated)
                pipe.execute()
                return updated
            except WatchError:
                continue


def pipeline_view(stages: list[JobRecord]) -> dict[str, Any]:
    statuses = [s.status for s in stages]
    current = next((s for s in stages if s.is_active), None)
    if JobStatus.STARTED in statuses:
        status = JobStatus.STARTED
    elif current is not None:  # between stages, or not begun
        status = JobStatus.STARTED if any(s.attempts for s in stages) else JobStatus.QUEUED
    else:
        status = next(
            (s for s in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED) if s in statuses),
            JobStatus.FINISHED,
        )
    ended = [s.ended_at for s in stages if s.ended_at]
    done = sum(s == JobStatus.FINISHED for s in statuses)
    failed = next((s for s in stages if s.status in RETRYABLE and s.error), None)
    return {
        "status": status,
        "started_at": min((s.started_at for s in stages if s.started_at), default=None),
        "ended_at": max(ended) if status not in records.ACTIVE and ended else None,
        "error": f"{failed.kind}: {failed.error}" if failed and status not in records.ACTIVE else None,
        "progress": {
            "stages_finished": done,
            "stages": len(stages),
            "current_stage": current.kind if current else None,
            "current_job": current.id if current else None,
            "percent": round(100 * done / len(stages), 1),
        },
    }


def delete(redis: Redis, job_id: str) -> bool:
    """Remove an ended job's record, log and metrics (a pipeline's stages too). False: unknown id."""
    record = records.load(redis, job_id)
    if record is None:
        return False
    if record.is_active:
        raise Conflict(f"job {job_id} is {record.status}: stop it first")
    if record.pipeline_id is not None:
        raise Conflict(f"job {job_id} is a stage of pipeline {record.pipeline_id}: delete the pipeline")
    for stage_id in record.stages:
        records.delete(redis, stage_id)
    records.delete(redis, job_id)
    return True
