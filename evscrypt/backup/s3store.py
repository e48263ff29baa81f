"""A backup store in an S3 bucket (AWS or any S3-compatible service), through boto3.

Credentials, region and endpoint come from boto3's standard chain, so
``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``) points it at MinIO, Ceph,
a Huawei OBS endpoint and the like.  Chunks go up with ``upload_fileobj`` and
a multipart threshold below the chunk size, so every full chunk is a
multipart upload: parts are retried on their own and the object appears only
when the upload completes.  Every botocore error is converted here.
"""

from __future__ import annotations

import io
import os

from .. import awsdeps
from ..errors import EvscryptError, NotFound, PermissionDenied, StorageError
from .store import BACKUPS, CHUNKS, BackupStore

#: S3's smallest part size; an 8 MiB chunk goes up as 5 + 3 MiB.
PART_SIZE = 5 << 20
CONNECT_TIMEOUT = float(os.environ.get("EVSCRYPT_S3_CONNECT_TIMEOUT", "10"))
READ_TIMEOUT = float(os.environ.get("EVSCRYPT_S3_READ_TIMEOUT", "60"))
MAX_ATTEMPTS = int(os.environ.get("EVSCRYPT_S3_MAX_ATTEMPTS", "5"))

_DENIED = ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
           "InvalidToken", "AllAccessDisabled")
#: S3's refusals that mean "not there", and what each says of it.
_MISSING = {"NoSuchBucket": "the bucket does not exist", "NoSuchKey": "not found", "404": "not found",
            "NotFound": "not found"}


def _convert(e: Exception, what: str) -> Exception:
    """One botocore/boto3 exception -> one evscrypt error with a one-line message."""
    from boto3.exceptions import S3UploadFailedError

    refused = awsdeps.refusal(e)
    if refused:
        code, msg = refused
        if code in _MISSING:
            return NotFound(f"{what}: {_MISSING[code]}")
        if code in _DENIED:
            return PermissionDenied(f"{what}: access denied by S3 ({code})")
        return StorageError(f"{what}: S3 refused ({code}): {msg}")
    if isinstance(e, S3UploadFailedError):
        return StorageError(f"{what}: upload failed: {str(e).splitlines()[0]}")
    kind = awsdeps.failure(e)
    if kind == awsdeps.CREDENTIALS:
        return PermissionDenied(awsdeps.NO_CREDENTIALS)
    if kind == awsdeps.UNREACHABLE:
        return StorageError(f"{what}: S3 endpoint unreachable ({type(e).__name__})")
    if kind is not None:  # no region is no special case for S3: boto3 has a default endpoint
        return StorageError(f"{what}: S3 call failed ({type(e).__name__}: {e})")
    return e


class S3Store(BackupStore):
    def __init__(self, bucket: str, prefix: str, client=None):
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}" + (f"/{prefix}" if prefix else "")
        self._client = client

    def __repr__(self) -> str:
        return f"<S3Store {self.url}>"

    @property
    def client(self):
        if self._client is None:
            self._client = awsdeps.client("s3", "S3 backups (s3://)", lambda e: self._converted(e, self.url),
                                          connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT,
                                          max_attempts=MAX_ATTEMPTS)
        return self._client

    @staticmethod
    def _converted(e: Exception, what: str) -> Exception:
        c = _convert(e, what)
        return c if isinstance(c, EvscryptError) else StorageError(f"{what}: {type(e).__name__}: {e}")

    def _key(self, *parts: str) -> str:
        return "/".join(([self.prefix] if self.prefix else []) + list(parts))

    def _call(self, what: str, op: str, **kw):
        try:
            return getattr(self.client, op)(**kw)
        except EvscryptError:
            raise
        except Exception as e:
            raise self._converted(e, what) from None

    def _list(self, folder: str) -> list[str]:
        """Names directly under ``prefix/folder/``."""
        base = self._key(folder) + "/"
        out = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                out.extend(o["Key"][len(base):] for o in page.get("Contents", []))
        except EvscryptError:
            raise
        except Exception as e:
            raise self._converted(e, self.url) from None
        return out

    def known_chunks(self) -> set[str]:
        return {n for n in self._list(CHUNKS) if n and "/" not in n}

    def put_chunk(self, digest: str, data) -> None:
        client = self.client  # first: it reports a missing boto3
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE, max_concurrency=4)
        try:
            client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(CHUNKS, digest), Config=config)
        except EvscryptError:
            raise
        except Exception as e:
            raise self._converted(e, f"{self.url}: chunk {digest}") from None

    def get_chunk(self, digest: str) -> bytes:
        what = f"chunk {digest} in {self.url}"
        r = self._call(what, "get_object", Bucket=self.bucket, Key=self._key(CHUNKS, digest))
        try:
            return r["Body"].read()
        except Exception as e:
            raise self._converted(e, what) from None

    def put_manifest(self, backup_id: str, data: bytes) -> None:
        self._call(f"{self.url}: manifest of backup {backup_id}", "put_object", Bucket=self.bucket,
                   Key=self._key(BACKUPS, f"{backup_id}.json"), Body=data, ContentType="application/json")

    def get_manifest(self, backup_id: str) -> bytes:
        what = f"backup {backup_id} in {self.url}"
        r = self._call(what, "get_object", Bucket=self.bucket, Key=self._key(BACKUPS, f"{backup_id}.json"))
        try:
            return r["Body"].read()
        except Exception as e:
            raise self._converted(e, what) from None

    def manifest_ids(self) -> list[str]:
        return sorted(n[:-5] for n in self._list(BACKUPS) if n.endswith(".json") and "/" not in n)
