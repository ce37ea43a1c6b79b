"""Files: upload (streamed, then validated by a job of its own), list, read, download, delete."""

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response, status
from fastapi.responses import FileResponse
from jobs import files
from jobs.files import FileRecord
from jobs.specs import FILE_ID_PATTERN

from api import uploads
from api.deps import RedisDep, SettingsDep, require_read_token, require_token
from api.routes.jobs import ERRORS

router = APIRouter(prefix="/files", tags=["files"])
FileId = Annotated[str, Path(pattern=FILE_ID_PATTERN, description="file- and 24 hex digits")]
NOT_FOUND = {404: {"description": "no such file"}}
UPLOAD_ERRORS = {
    400: {"description": "the upload was cut off mid-stream"},
    413: {"description": "larger than API_MAX_UPLOAD_BYTES"},
    415: {"description": "not multipart, or a file of a kind its purpose does not take"},
}
MEDIA_TYPES = {  # the rest is text
    ".parquet": "application/vnd.apache.parquet",
    ".yaml": "application/yaml",
    ".yml": "application/yaml",
}


def found(record: FileRecord | None, file_id: str) -> FileRecord:
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no file {file_id}")
    return record


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    dependencies=[Depends(require_token)],
    responses={**ERRORS, **UPLOAD_ERRORS},
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["purpose", "file"],
                        "properties": {
                            **uploads.UploadForm.model_json_schema()["properties"],
                            "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        },
                    }
                }
            }
        }
    },
)
async def upload_file(request: Request, settings: SettingsDep, redis: RedisDep) -> FileRecord:
    """
    Upload a file (multipart: `purpose`, `file`, and optionally `tokenizer`, `val_fraction`, `max_tokens`),
    streamed into the data volume; 201 with its record, status `validating`, while its validation job runs.
    purpose: conversations (.jsonl), pretrain (.parquet, .jsonl, .txt, .md; several `file` parts make one
    corpus), mixture (.yaml), questions (.jsonl, GSM8K's format).
    """
    upload = await uploads.accept(request, settings, redis)
    return found(files.load(redis, settings.base_dir, upload.id), upload.id)


@router.get("", dependencies=[Depends(require_read_token)], responses=ERRORS)
def list_files(settings: SettingsDep, redis: RedisDep) -> list[FileRecord]:
    """Every uploaded file, newest first."""
    return files.list_all(redis, settings.base_dir)


@router.get("/{file_id}", dependencies=[Depends(require_read_token)], responses={**ERRORS, **NOT_FOUND})
def get_file(file_id: FileId, settings: SettingsDep, redis: RedisDep) -> FileRecord:
    """The record: status, statistics, every problem with its line (the first 100), sample rows."""
    return found(files.load(redis, settings.base_dir, file_id), file_id)


@router.get(
    "/{file_id}/content",
    response_class=FileResponse,
    dependencies=[Depends(require_read_token)],
    responses={**ERRORS, **NOT_FOUND},
)
def download_file(
    file_id: FileId,
    settings: SettingsDep,
    redis: RedisDep,
    part: Annotated[int, Query(ge=0, description="which file of a several-file upload")] = 0,
) -> FileResponse:
    """The bytes as uploaded, under the uploader's name."""
    record = found(files.load(redis, settings.base_dir, file_id), file_id)
    if part >= len(record.parts):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"{file_id} has {len(record.parts)} part(s)")
    stored = record.parts[part]
    path = files.files_dir(settings.base_dir) / file_id / stored.stored
    media_type = MEDIA_TYPES.get(path.suffix, "text/plain; charset=utf-8")
    return FileResponse(path, media_type=media_type, filename=stored.name)


@router.delete(
    "/{file_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[Depends(require_token)],
    responses={**ERRORS, **NOT_FOUND, 409: {"description": "an active job uses the file"}},
)
def delete_file(file_id: FileId, settings: SettingsDep, redis: RedisDep) -> Response:
    """Delete the file, its report and prepared data; refused while an active job names it."""
    try:
        deleted = files.delete(redis, settings.base_dir, file_id)
    except files.Unusable as error:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(error)) from error
    if not deleted:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no file {file_id}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
