"""The object store: S3 and S3-compatible stores through aiobotocore.

Why aiobotocore (and not obstore): botocore reads credentials the way every AWS tool does
(`AWS_ACCESS_KEY_ID`..., `AWS_PROFILE`, `~/.aws/credentials` and `~/.aws/config`, SSO, web
identity, container and instance roles), where obstore reads the environment and instance roles
but not the shared files; its retries (the `standard` mode: backoff with jitter, transient
errors and throttling) and `endpoint_url` for MinIO/Ceph/R2 are the reference S3 behaviour, and
aiohttp is already ours. obstore's advantages (a small Rust wheel, GCS and Azure) do not
outweigh that here; botocore is large on disk (~25 MB installed) but pure Python.

Every request with a body carries Content-MD5, so the store refuses a part whose bytes changed
on the way; after an upload the object's size is read back. A multipart upload that a crash
interrupted is found again (ListMultipartUploads on its key) and resumed: the parts the store
already holds with the same MD5 are not sent again.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
SDK_ATTEMPTS = 3  # botocore's own retries of one request; the archiver retries beyond that


class StoreError(Exception):
    """The store refused or could not be reached; the message is one line for the operator."""


@dataclass(frozen=True, slots=True)
class Uploaded:
    key: str
    size: int
    etag: str
    parts: int  # 0: a single PUT
    resumed_bytes: int  # bytes a previous, interrupted upload had already stored


RECORDING = "recording"  # object metadata: which recording (tap id @ start) it holds


def describe_error(exc: BaseException) -> str:
    """One line: what the store said (its error code) or why it could not be reached."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        code = error.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = error.get("Message") or ""
        return f"{code}: {message}".strip(": ")
    return f"{type(exc).__name__}: {exc}"


def _md5(data: bytes) -> tuple[str, str]:
    digest = hashlib.md5(data, usedforsecurity=False).digest()
    return digest.hex(), base64.b64encode(digest).decode()


def _read_part(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read(size)


class ObjectStore:
    """One bucket (and key prefix) of an S3-compatible store; use as `async with`."""

    def __init__(self, bucket: str, prefix: str, endpoint: str, part_size: int) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint = endpoint
        self.part_size = part_size
        self._stack = AsyncExitStack()
        self._client: Any = None

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    async def __aenter__(self) -> ObjectStore:
        config = AioConfig(
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            retries={"mode": "standard", "max_attempts": SDK_ATTEMPTS},
            # Content-MD5 is what every S3-compatible store checks; no second checksum scheme.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"} if self.endpoint else None,
        )
        session = get_session()
        self._client = await self._stack.enter_async_context(
            session.create_client("s3", endpoint_url=self.endpoint or None, config=config)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def check(self) -> None:
        """Is the bucket there and ours? Raises StoreError."""
        try:
            await self._client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise StoreError(describe_error(exc)) from exc

    async def owner(self, key: str) -> str | None:
        """Whose recording an object holds: None when there is no object under `key`, else its
        `recording` metadata ("" when it has none). Raises StoreError."""
        # A one-byte GET, not a HEAD: an error answer to a GET says why (a HEAD's is bare).
        try:
            answer = await self._client.get_object(Bucket=self.bucket, Key=key, Range="bytes=0-0")
        except Exception as exc:
            status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                return None
            raise StoreError(describe_error(exc)) from exc
        answer["Body"].close()
        return str((answer.get("Metadata") or {}).get(RECORDING, ""))

    async def put_bytes(
        self, key: str, data: bytes, content_type: str, recording: str = ""
    ) -> Uploaded:
        _, md5 = _md5(data)
        try:
            answer = await self._client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentMD5=md5, ContentType=content_type,
                Metadata={RECORDING: recording} if recording else {},
            )  # fmt: skip
        except Exception as exc:
            raise StoreError(describe_error(exc)) from exc
        return Uploaded(key, len(data), answer.get("ETag", "").strip('"'), 0, 0)

    async def upload_file(
        self, key: str, path: Path, content_type: str, recording: str = ""
    ) -> Uploaded:
        """Upload a file (in parts when larger than part_size) and check its stored size and,
        given `recording` (which goes into the object's metadata), that it is still that one.
        Raises StoreError (the store) or OSError (the local file)."""
        size = path.stat().st_size
        if size <= self.part_size:
            data = await asyncio.to_thread(path.read_bytes)
            done = await self.put_bytes(key, data, content_type, recording)
        else:
            done = await self._multipart(key, path, size, content_type, recording)
        try:
            head = await self._client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            raise StoreError(describe_error(exc)) from exc
        if recording and (head.get("Metadata") or {}).get(RECORDING) != recording:
            # Another receiver's upload of the same name won (receiver.archive.archiver._stem).
            raise StoreError(f"{key} was taken by another recording during the upload")
        if head.get("ContentLength") != size:
            raise StoreError(f"{key}: the store holds {head.get('ContentLength')} bytes of {size}")
        return done

    async def _multipart(
        self, key: str, path: Path, size: int, content_type: str, recording: str
    ) -> Uploaded:
        c = self._client
        try:
            upload_id, stored = await self._interrupted_upload(key)
            if upload_id is None:
                answer = await c.create_multipart_upload(
                    Bucket=self.bucket, Key=key, ContentType=content_type,
                    Metadata={RECORDING: recording} if recording else {},
                )  # fmt: skip
                upload_id = answer["UploadId"]
            parts = []
            resumed = 0
            for number, offset in enumerate(range(0, size, self.part_size), start=1):
                chunk = await asyncio.to_thread(_read_part, path, offset, self.part_size)
                md5_hex, md5 = _md5(chunk)
                etag = stored.get(number)
                if etag == md5_hex:
                    resumed += len(chunk)
                else:
                    answer = await c.upload_part(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=chunk,
                        ContentMD5=md5,
                    )
                    etag = answer["ETag"].strip('"')
                parts.append({"PartNumber": number, "ETag": f'"{etag}"'})
            answer = await c.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except OSError:
            raise
        except Exception as exc:
            raise StoreError(describe_error(exc)) from exc
        return Uploaded(key, size, answer.get("ETag", "").strip('"'), len(parts), resumed)

    async def _interrupted_upload(self, key: str) -> tuple[str | None, dict[int, str]]:
        """The newest unfinished multipart upload of `key` and its stored parts (number ->
        MD5 hex); older ones are aborted. (None, {}) when there is none."""
        answer = await self._client.list_multipart_uploads(Bucket=self.bucket, Prefix=key)
        uploads = sorted(
            (u for u in answer.get("Uploads", []) if u.get("Key") == key),
            key=lambda u: u.get("Initiated") or 0,
        )
        if not uploads:
            return None, {}
        for old in uploads[:-1]:
            await self._client.abort_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=old["UploadId"]
            )
        upload_id = uploads[-1]["UploadId"]
        stored: dict[int, str] = {}
        paginator = self._client.get_paginator("list_parts")
        async for page in paginator.paginate(Bucket=self.bucket, Key=key, UploadId=upload_id):
            for part in page.get("Parts", []):
                stored[int(part["PartNumber"])] = str(part["ETag"]).strip('"')
        return upload_id, stored

    async def open_body(
        self, key: str, byte_range: str | None = None
    ) -> tuple[dict[str, Any], Any]:
        """An object (or a `bytes=a-b` range of it) to stream: its head fields and its body
        (`async with body`, then `await body.read(n)`)."""
        args = {"Bucket": self.bucket, "Key": key}
        if byte_range:
            args["Range"] = byte_range
        try:
            answer = await self._client.get_object(**args)
        except Exception as exc:
            raise StoreError(describe_error(exc)) from exc
        return answer, answer["Body"]

    async def list_keys(self, suffix: str, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """The objects right under the prefix whose key ends with `suffix` (Key, ETag, Size,
        LastModified), at most `limit` of them; and whether more were left out."""
        found: list[dict[str, Any]] = []
        args = {"Bucket": self.bucket, "Prefix": self.key(""), "Delimiter": "/"}
        try:
            paginator = self._client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(**args):
                for item in page.get("Contents", []):
                    if str(item.get("Key", "")).endswith(suffix):
                        if len(found) >= limit:
                            return found, True
                        found.append(item)
        except Exception as exc:
            raise StoreError(describe_error(exc)) from exc
        return found, False

    async def get_bytes(self, key: str, limit: int) -> tuple[bytes, str]:
        """A small object's bytes (at most `limit`: StoreError beyond) and its ETag."""
        head, body = await self.open_body(key)
        if int(head.get("ContentLength") or 0) > limit:
            body.close()
            raise StoreError(f"{key}: {head.get('ContentLength')} bytes, more than {limit}")
        try:
            async with body:
                data: bytes = await body.read()
        except Exception as exc:
            raise StoreError(describe_error(exc)) from exc
        return data, str(head.get("ETag", "")).strip('"')
