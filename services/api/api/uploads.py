"""
POST /files: the multipart body parsed as it streams in (python-multipart), each file part written
straight into a new folder of the data volume under a name of ours, the few small fields kept in memory.
Only a whole, well-formed upload of a kind its purpose takes becomes a file (a folder renamed into place)
and gets its validation job; an upload that fails in any way — too large, cut off mid-stream, of the
wrong kind — leaves nothing behind.
"""

import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO

from fastapi import HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from jobs import files, queue
from jobs.files import Part, Purpose, Upload
from jobs.specs import RunName
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from python_multipart.multipart import MultipartParser, parse_options_header
from redis import Redis

from api.config import Settings

MAX_FIELD_BYTES = 1024  # a form field is a word or a number
MAX_PARTS = 10_000  # files in one upload (a folder of text files)
MAX_NAME_CHARS = 200  # of an uploader's file name, as shown
ANY_SUFFIX = sorted({suffix for suffixes in files.SUFFIXES.values() for suffix in suffixes})


class UploadForm(BaseModel):
    """The upload's fields besides its files."""

    model_config = ConfigDict(extra="forbid")

    purpose: Purpose
    tokenizer: RunName | None = Field(default=None, description="run whose tokenizer counts the tokens")
    val_fraction: float = Field(default=0.05, ge=0, le=0.5, description="share set aside as the val split")
    max_tokens: int = Field(default=2048, ge=16, le=65536, description="longest conversation in tokens")


def refuse(code: int, detail: str) -> HTTPException:
    return HTTPException(code, detail=detail)


def shown_name(filename: str) -> str:
    """The uploader's name, as shown: its last component, printable, bounded. Never a path of ours."""
    name = PurePosixPath(filename.replace("\\", "/")).name
    return "".join(c for c in name if c.isprintable())[:MAX_NAME_CHARS] or "upload"


@dataclass
class Body:
    """What the stream has brought so far: the fields, the parts written into `folder`."""

    folder: Path
    fields: dict[str, bytearray] = field(default_factory=dict)
    parts: list[Part] = field(default_factory=list)
    headers: dict[bytes, bytes] = field(default_factory=dict)
    header: tuple[bytearray, bytearray] = field(default_factory=lambda: (bytearray(), bytearray()))
    current: IO[bytes] | bytearray | None = None
    ended: bool = False

    def purpose(self) -> str | None:
        return self.fields.get("purpose", b"").decode(errors="replace") or None

    def begin_part(self) -> None:
        self.headers, self.header = {}, (bytearray(), bytearray())

    def header_end(self) -> None:
        self.headers[bytes(self.header[0]).lower()] = bytes(self.header[1])
        self.header = (bytearray(), bytearray())

    def headers_finished(self) -> None:
        """A file part gets its own file; a field is kept in memory."""
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode(errors="replace")
        filename = options.get(b"filename")
        if filename is None:
            if name not in UploadForm.model_fields:
                raise refuse(
                    422, f"unknown field {name!r}: expected file, {', '.join(UploadForm.model_fields)}"
                )
            self.current = self.fields.setdefault(name, bytearray())
            return
        if name != "file":
            raise refuse(422, f"a file goes in the field `file`, not {name!r}")
        if len(self.parts) == MAX_PARTS:
            raise refuse(422, f"at most {MAX_PARTS:,} files in one upload")
        shown = shown_name(filename.decode(errors="replace"))
        suffix = PurePosixPath(shown).suffix.lower()
        allowed = files.SUFFIXES.get(self.purpose() or "", ANY_SUFFIX)
        if suffix not in allowed:
            raise wrong_kind(shown, self.purpose(), allowed)
        stored = f"part-{len(self.parts):03d}{suffix}"
        self.parts.append(Part(name=shown, stored=stored, bytes=0))
        self.current = open(self.folder / stored, "wb")  # noqa: SIM115 (closed at the part's end)

    def data(self, chunk: bytes, start: int, end: int) -> None:
        if isinstance(self.current, bytearray):
            self.current += chunk[start:end]
            if len(self.current) > MAX_FIELD_BYTES:
                raise refuse(422, f"a form field holds at most {MAX_FIELD_BYTES} bytes")
        else:
            self.current.write(chunk[start:end])
            self.parts[-1].bytes += end - start

    def end_part(self) -> None:
        if not isinstance(self.current, bytearray):
            self.current.close()
        self.current = None

    def close(self) -> None:
        if self.current is not None and not isinstance(self.current, bytearray):
            self.current.close()


def wrong_kind(name: str, purpose: str | None, allowed: tuple[str, ...] | list[str]) -> HTTPException:
    takes = f"a {purpose} file is" if purpose else "uploads are"
    return refuse(
        status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, f"{name}: {takes} {', '.join(allowed)}; nothing was kept"
    )


async def receive(request: Request, folder: Path) -> Body:
    """Parse the body as it arrives, the files into `folder` (made here; the caller removes it when
    anything fails)."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise refuse(415, "send multipart/form-data: the fields purpose (and options) and file")
    folder.mkdir(parents=True)
    body = Body(folder)
    parser = MultipartParser(
        options[b"boundary"],
        {
            "on_part_begin": body.begin_part,
            "on_header_field": lambda data, start, end: body.header[0].extend(data[start:end]),
            "on_header_value": lambda data, start, end: body.header[1].extend(data[start:end]),
            "on_header_end": body.header_end,
            "on_headers_finished": body.headers_finished,
            "on_part_data": body.data,
            "on_part_end": body.end_part,
            "on_end": lambda: setattr(body, "ended", True),
        },
    )
    try:
        async for chunk in request.stream():
            parser.write(chunk)
    finally:
        body.close()
    if not body.ended:
        raise refuse(400, "the upload ended before its closing boundary (cut off mid-stream): nothing kept")
    return body


def admit(body: Body, file_id: str) -> Upload:
    """The upload's record, once its fields and files make a file the purpose takes."""
    try:
        fields = {name: value.decode(errors="replace") for name, value in body.fields.items()}
        form = UploadForm.model_validate(fields)
    except ValidationError as error:
        raise RequestValidationError(error.errors(include_url=False)) from error
    if not body.parts:
        raise refuse(422, "no file: send it in the field `file`")
    allowed = files.SUFFIXES[form.purpose]
    for part in body.parts:
        if PurePosixPath(part.stored).suffix not in allowed:  # it came before the purpose did
            raise wrong_kind(part.name, form.purpose, allowed)
        if part.bytes == 0:
            raise refuse(422, f"{part.name} is empty")
    if len(body.parts) > 1 and form.purpose not in files.SEVERAL_PARTS:
        raise refuse(422, f"a {form.purpose} upload is one file; only a pretraining corpus may be several")
    return Upload(
        id=file_id,
        purpose=form.purpose,
        parts=body.parts,
        bytes=sum(part.bytes for part in body.parts),
        created_at=datetime.now(UTC),
        tokenizer=form.tokenizer,
        val_fraction=form.val_fraction,
        max_tokens=form.max_tokens,
    )


def publish(redis: Redis, incoming: Path, upload: Upload) -> Upload:
    """Put the file in place and queue its validation job; an error undoes both."""
    folder = incoming.parent / upload.id
    files.write_upload(incoming, upload)
    incoming.rename(folder)
    try:
        job = queue.submit(redis, files.validation_job(upload))
        upload = upload.model_copy(update={"job_id": job.id})
        files.write_upload(folder, upload)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return upload


async def accept(request: Request, settings: Settings, redis: Redis) -> Upload:
    """The whole upload: received, admitted, published; on any failure its folder goes."""
    file_id = files.new_id()
    incoming = files.files_dir(settings.base_dir) / f".incoming-{file_id}"
    try:
        body = await receive(request, incoming)
        upload = admit(body, file_id)
        return await run_in_threadpool(publish, redis, incoming, upload)
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise
