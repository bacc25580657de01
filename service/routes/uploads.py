"""Reading an uploaded file, with its size limit checked before and while it is read."""

from fastapi import UploadFile

from service.errors import BadRequest, TooLarge


def named(file: UploadFile, what: str = "file") -> str:
    """How an error message names an upload: `file (cat.jpg)`, or just `file` without a filename."""
    return f"{what} ({file.filename})" if file.filename else what


async def read_upload(file: UploadFile, what: str, limit: int) -> bytes:
    """The bytes of an upload of at most `limit` bytes; 413 above it, 400 when empty."""
    if file.size is not None and file.size > limit:
        raise TooLarge(f"{what}: {file.size} bytes, over the limit of {limit}", code="file_too_large")
    data = await file.read(limit + 1)  # one byte more: enough to know it is over the limit
    if len(data) > limit:
        raise TooLarge(f"{what}: over the limit of {limit} bytes", code="file_too_large")
    if not data:
        raise BadRequest(f"{what}: empty file", code="empty_file")
    return data
