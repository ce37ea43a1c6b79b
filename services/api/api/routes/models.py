"""The model registry: every checkpoint with its numbers, the run's report card, deletion; models in and
out (an export job and its tarball's download, an import job)."""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Response, status
from fastapi.responses import FileResponse
from jobs import models, queue
from jobs.models import Checkpoint, UnknownModel
from jobs.records import JobRecord
from jobs.specs import ExportConfig, ExportJob, ImportConfig, ImportJob, RunName
from pydantic import BaseModel

from api.deps import RedisDep, SettingsDep, require_read_token, require_token
from api.routes.jobs import ERRORS, JSON_BODY, submit

router = APIRouter(prefix="/models", tags=["models"])
ModelId = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}-(base|mid|sft|rl)-[0-9]{6}$")]
ChartName = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}\.png$")]
NOT_FOUND = {404: {"description": "no such model"}}
TARBALL = {
    200: {"content": {"application/x-tar": {}}, "description": "the whole tarball"},
    206: {"content": {"application/x-tar": {}}, "description": "the byte range asked for with Range"},
    404: {"description": "no such model, or not exported yet"},
    416: {"description": "the Range lies outside the tarball"},
}


class Model(BaseModel):
    id: str  # <run>-<stage>-<step>: the inference service serves the same id
    run: str
    stage: str
    step: int
    params: int
    created: int  # unix seconds
    metrics: dict[str, Any]  # the stage's numbers from the run's report (val bpb, CORE, accuracies…)
    exported: bool  # its Hugging Face export's tarball exists: GET /models/{id}/download


class Export(BaseModel):
    id: str  # the checkpoint's id: GET /models/{id}/download, DELETE /models/{id}/export
    run: str
    stage: str
    step: int
    bytes: int  # the tarball's size
    created: int  # unix seconds, when the tarball was written
    checkpoint: bool  # the checkpoint is still there (an export outlives its deletion)


class ImportRequest(ImportConfig):
    """An import job's config and the run it goes to (a new one, or one with the same tokenizer)."""

    run: RunName


class Report(BaseModel):
    markdown: str
    charts: list[str]  # GET /models/{id}/report/charts/{name}


def describe(settings: SettingsDep, checkpoint: Checkpoint) -> Model:
    return Model(
        id=checkpoint.id,
        run=checkpoint.run,
        stage=checkpoint.stage,
        step=checkpoint.step,
        params=models.parameter_count(checkpoint),
        created=checkpoint.created,
        metrics=models.report_numbers(settings.runs_dir, checkpoint),
        exported=models.export_tarball(settings.runs_dir, checkpoint.id).is_file(),
    )


def in_use(job: JobRecord, how: str) -> HTTPException:
    return HTTPException(
        status.HTTP_409_CONFLICT,
        detail=f"job {job.id} ({job.kind} of run {job.run!r}) is {job.status} and {how}",
    )


def found(settings: SettingsDep, model_id: str) -> Checkpoint:
    try:
        return models.find(settings.runs_dir, model_id)
    except UnknownModel as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(error)) from error


@router.get("", dependencies=[Depends(require_read_token)], responses=ERRORS)
def list_models(settings: SettingsDep) -> list[Model]:
    """Every complete checkpoint, newest first."""
    described = []
    for checkpoint in models.scan(settings.runs_dir):
        try:
            described.append(describe(settings, checkpoint))
        except FileNotFoundError:  # pruned by its training run (keep_checkpoints) meanwhile
            continue
    return sorted(described, key=lambda m: (m.created, m.step), reverse=True)


@router.get("/exports", dependencies=[Depends(require_read_token)], responses=ERRORS)
def list_exports(settings: SettingsDep) -> list[Export]:
    """Every export whose tarball is in place, newest first, those of deleted checkpoints too: they stay
    downloadable until DELETE /models/{id}/export."""
    checkpoints = {checkpoint.id for checkpoint in models.scan(settings.runs_dir)}
    listed = []
    for tarball in models.list_exports(settings.runs_dir):
        try:
            stat = tarball.stat()
        except FileNotFoundError:  # deleted meanwhile
            continue
        run, stage, step = models.MODEL_ID.fullmatch(tarball.stem).groups()
        listed.append(Export(
            id=tarball.stem, run=run, stage=stage, step=int(step), bytes=stat.st_size,
            created=int(stat.st_mtime), checkpoint=tarball.stem in checkpoints,
        ))  # fmt: skip
    return sorted(listed, key=lambda e: (e.created, e.id), reverse=True)


@router.get("/{model_id}", dependencies=[Depends(require_read_token)], responses={**ERRORS, **NOT_FOUND})
def get_model(model_id: ModelId, settings: SettingsDep) -> Model:
    return describe(settings, found(settings, model_id))


@router.get(
    "/{model_id}/report", dependencies=[Depends(require_read_token)], responses={**ERRORS, **NOT_FOUND}
)
def get_report(model_id: ModelId, settings: SettingsDep) -> Report:
    """The run's report card (markdown) and the names of its charts."""
    folder = settings.runs_dir / found(settings, model_id).run / "report"
    markdown = folder / "report.md"
    if not markdown.exists():
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="this model's run has no report yet")
    return Report(
        markdown=markdown.read_text(encoding="utf-8"), charts=sorted(p.name for p in folder.glob("*.png"))
    )


@router.get(
    "/{model_id}/report/charts/{name}",
    response_class=FileResponse,
    dependencies=[Depends(require_read_token)],
    responses={**ERRORS, **NOT_FOUND, 200: {"content": {"image/png": {}}}},
)
def get_chart(model_id: ModelId, name: ChartName, settings: SettingsDep) -> FileResponse:
    path = settings.runs_dir / found(settings, model_id).run / "report" / name
    if not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no chart {name}")
    return FileResponse(path, media_type="image/png")


@router.delete(
    "/{model_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[Depends(require_token)],
    responses={**ERRORS, **NOT_FOUND, 409: {"description": "a job is using this model's run"}},
)
def delete_model(model_id: ModelId, settings: SettingsDep, redis: RedisDep) -> Response:
    """Delete one checkpoint; refused while an active job works on its run or starts from it."""
    checkpoint = found(settings, model_id)
    if busy := queue.active_jobs(redis, checkpoint.run):
        raise in_use(busy[0], f"uses run {checkpoint.run!r}")
    models.delete(checkpoint)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.delete(
    "/{model_id}/export",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[Depends(require_token)],
    responses={
        **ERRORS,
        404: {"description": "not exported"},
        409: {"description": "an export of its run, or an import from this export, is active"},
    },
)
def delete_export(model_id: ModelId, settings: SettingsDep, redis: RedisDep) -> Response:
    """Delete a checkpoint's export (its Hugging Face folder and tarball, and what a stopped export left
    beside them) to free the disk; the checkpoint stays. By id alone, as the download: an export
    outlives its deleted checkpoint until this."""
    if busy := queue.jobs_using_export(redis, settings.base_dir.expanduser(), model_id):
        raise in_use(busy[0], "may write or read this export")
    if not models.delete_export(settings.runs_dir, model_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"{model_id} has no export")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/import",
    status_code=status.HTTP_201_CREATED,
    dependencies=[Depends(require_token)],
    responses={
        **ERRORS,
        **JSON_BODY,
        409: {"description": "a job is writing that stage or the run's tokenizer"},
    },
)
def import_model(body: ImportRequest, redis: RedisDep, settings: SettingsDep) -> JobRecord:
    """Queue an import job (as POST /jobs with kind import): a folder in the data volume or a hub repo
    becomes the run's `stage` checkpoint; it is then listed here. 409 while a job writes that stage."""
    config = body.model_dump(exclude={"run"}, exclude_unset=True)
    return submit(
        redis, settings, ImportJob.model_validate({"kind": "import", "run": body.run, "config": config})
    )


@router.post(
    "/{model_id}/export",
    status_code=status.HTTP_201_CREATED,
    dependencies=[Depends(require_token)],
    responses={**ERRORS, **NOT_FOUND, 409: {"description": "another export of this run is running"}},
)
def export_model(model_id: ModelId, settings: SettingsDep, redis: RedisDep) -> JobRecord:
    """Queue an export job of this checkpoint (as POST /jobs with kind export); once it has finished,
    GET /models/{id}/download has the tarball."""
    checkpoint = found(settings, model_id)
    config = ExportConfig(stage=checkpoint.stage, step=checkpoint.step)
    return submit(redis, settings, ExportJob(kind="export", run=checkpoint.run, config=config))


@router.get(
    "/{model_id}/download",
    response_class=FileResponse,
    dependencies=[Depends(require_read_token)],
    responses={**ERRORS, **TARBALL},
)
def download(model_id: ModelId, settings: SettingsDep) -> FileResponse:
    """The export's tarball (`<id>.tar`: a Hugging Face folder `<id>/`). Resumable: `Range: bytes=N-`
    (`curl -C -`) gets the rest; with `If-Range` (the ETag) only while the tarball is the same one."""
    tarball = models.export_tarball(settings.runs_dir, model_id)
    if not tarball.is_file():
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"{model_id} is not exported yet: POST /jobs with kind export, or "
            f"POST /models/{model_id}/export",
        )
    return FileResponse(tarball, media_type="application/x-tar", filename=tarball.name)
