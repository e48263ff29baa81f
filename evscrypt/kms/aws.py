"""AWS KMS through boto3 (or any KMS-compatible endpoint).

Credentials, region and endpoint come from boto3's standard chain, including
``AWS_ENDPOINT_URL_KMS`` / ``AWS_ENDPOINT_URL``.  The backend needs only
kms:GenerateDataKey, kms:Decrypt, kms:Encrypt (re-wrapping a DK for a volume
made from a snapshot, image or backup) and kms:DescribeKey (plus kms:ListKeys
and kms:ListAliases for ``key list``).  Key lifecycle stays in AWS's own tools.

Every call has bounded timeouts and a bounded number of attempts, so an
unreachable endpoint fails in about 20 s by default.  botocore retries
throttling and transient errors itself ("standard" retry mode).  Every
botocore exception is converted here into the evscrypt KMS error family.
"""

from __future__ import annotations

import os

from .. import awsdeps
from ..errors import (
    InvalidArgument, InvalidCiphertext, KeyNotFound, KeyStateError, KMSAccessDenied, KMSError, KMSUnavailable,
)
from ..secret import Secret, set_nondumpable, wipe_bytes
from .base import KeyInfo, KeyState, KMSBackend

CONNECT_TIMEOUT = float(os.environ.get("EVSCRYPT_AWS_CONNECT_TIMEOUT", "3"))
READ_TIMEOUT = float(os.environ.get("EVSCRYPT_AWS_READ_TIMEOUT", "5"))
MAX_ATTEMPTS = int(os.environ.get("EVSCRYPT_AWS_MAX_ATTEMPTS", "3"))

_STATES = {s.value: s for s in KeyState}
_STATE_ERRORS = ("DisabledException", "KMSInvalidStateException", "KeyUnavailableException")
_DENIED = ("AccessDeniedException", "UnrecognizedClientException", "InvalidSignatureException",
           "ExpiredTokenException", "IncompleteSignature", "InvalidClientTokenId")


def _convert(e: Exception, key: str | None) -> Exception:
    """One botocore exception -> one evscrypt error with a one-line message."""
    what = f"key {key}" if key else "AWS KMS"
    refused = awsdeps.refusal(e)
    if refused:
        code, msg = refused
        if code == "NotFoundException":
            return KeyNotFound(f"{what} not found in AWS KMS")
        if code in _STATE_ERRORS:
            return KeyStateError(f"{what} cannot be used: {msg}")
        if code in _DENIED:
            return KMSAccessDenied(f"access to {what} denied by AWS KMS: {msg}")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if code in ("InvalidCiphertextException", "IncorrectKeyException"):
            return InvalidCiphertext(f"the wrapped data key does not decrypt under {what} with this encryption context")
        if status >= 500 or code in ("ThrottlingException", "KMSInternalException", "DependencyTimeoutException",
                                     "ServiceUnavailableException", "InternalFailure"):
            return KMSUnavailable(f"AWS KMS is unavailable ({code}) after {MAX_ATTEMPTS} attempts")
        return KMSError(f"AWS KMS refused ({code}): {msg}")
    kind = awsdeps.failure(e)
    if kind == awsdeps.CREDENTIALS:
        return KMSAccessDenied(awsdeps.NO_CREDENTIALS)
    if kind == awsdeps.REGION:
        return KMSError("no AWS region configured: set AWS_REGION or AWS_DEFAULT_REGION")
    if kind == awsdeps.UNREACHABLE:
        return KMSUnavailable(f"AWS KMS endpoint unreachable: {type(e).__name__}")
    if kind == awsdeps.BOTOCORE:
        return KMSError(f"AWS KMS call failed: {type(e).__name__}")
    return e


class AwsKMS(KMSBackend):
    name = "aws"

    def __init__(self, client=None):
        self._client = client

    def __repr__(self) -> str:
        return "<AwsKMS>"

    @property
    def client(self):
        if self._client is None:
            self._client = awsdeps.client("kms", "AWS KMS (--kms aws)", lambda e: _convert(e, None),
                                          connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT,
                                          max_attempts=MAX_ATTEMPTS)
        return self._client

    def _call(self, key: str | None, op: str, **kw):
        client = self.client  # outside the try: its own errors are already converted
        try:
            return getattr(client, op)(**kw)
        except Exception as e:
            converted = _convert(e, key)
            if converted is e:
                raise
            raise converted from None

    def default_key(self) -> str:
        raise InvalidArgument("--kms aws needs --key KEY (a key id, ARN or alias/NAME)")

    # -- metadata --------------------------------------------------------------
    def _aliases(self, key_id: str) -> list[str]:
        try:
            r = self._call(key_id, "list_aliases", KeyId=key_id)
        except KMSAccessDenied:
            return []  # aliases are cosmetic; least privilege may deny them
        return [a["AliasName"] for a in r.get("Aliases", [])]

    def _info(self, meta: dict, alias: str | None = None) -> KeyInfo:
        state = meta.get("KeyState", "")
        if state not in _STATES:
            raise KMSError(f"key {meta['KeyId']} is in a state evscrypt does not know: {state!r}")
        state_enum = _STATES[state]
        if alias is None:
            names = self._aliases(meta["KeyId"])
            alias = names[0] if names else None
        dd = meta.get("DeletionDate")
        return KeyInfo(key_id=meta["KeyId"], arn=meta.get("Arn", meta["KeyId"]), alias=alias, state=state_enum,
                       description=meta.get("Description", ""),
                       created=meta["CreationDate"].isoformat() if meta.get("CreationDate") else None,
                       deletion_date=dd.isoformat() if dd else None, backend="aws")

    def describe(self, key: str) -> KeyInfo:
        meta = self._call(key, "describe_key", KeyId=key)["KeyMetadata"]
        return self._info(meta, key if key.startswith("alias/") else None)

    def list_keys(self) -> list[KeyInfo]:
        aliases: dict[str, str] = {}
        for page in self._paginate("list_aliases"):
            for a in page.get("Aliases", []):
                if a.get("TargetKeyId"):
                    aliases.setdefault(a["TargetKeyId"], a["AliasName"])
        out = []
        for page in self._paginate("list_keys"):
            for k in page.get("Keys", []):
                meta = self._call(k["KeyId"], "describe_key", KeyId=k["KeyId"])["KeyMetadata"]
                out.append(self._info(meta, aliases.get(k["KeyId"], "")))
        for i in out:
            i.alias = i.alias or None
        return out

    def _paginate(self, op: str):
        client = self.client
        try:
            yield from client.get_paginator(op).paginate()
        except Exception as e:
            converted = _convert(e, None)
            if converted is e:
                raise
            raise converted from None

    def _require_enabled(self, key: str) -> KeyInfo:
        """moto lets Decrypt succeed on disabled keys while AWS refuses; check
        the state ourselves so both behave the same and the error names it."""
        info = self.describe(key)
        info.require_usable()
        return info

    # -- data keys ---------------------------------------------------------------
    def generate_data_key(self, key, context, nbytes=64):
        self._require_enabled(key)
        set_nondumpable()  # before botocore holds the plaintext (a Secret would do it only after)
        r = self._call(key, "generate_data_key", KeyId=key, NumberOfBytes=nbytes, EncryptionContext=context)
        plain = r.pop("Plaintext")
        try:
            dk = Secret.from_buffer(plain)
        finally:
            wipe_bytes(plain)
        return dk, r["CiphertextBlob"], r["KeyId"]

    def wrap_data_key(self, key, dk, context):
        self._require_enabled(key)
        plain = bytes(dk.buffer)  # botocore needs bytes; wiped below (best effort)
        try:
            r = self._call(key, "encrypt", KeyId=key, Plaintext=plain, EncryptionContext=context)
        finally:
            wipe_bytes(plain)
        return r["CiphertextBlob"], r["KeyId"]

    def decrypt(self, wrapped, context, key=None):
        if key is None:
            raise InvalidArgument("the aws backend needs the key id to decrypt")
        self._require_enabled(key)
        set_nondumpable()  # before botocore holds the plaintext (a Secret would do it only after)
        r = self._call(key, "decrypt", CiphertextBlob=bytes(wrapped), EncryptionContext=context, KeyId=key)
        plain = r.pop("Plaintext")
        try:
            return Secret.from_buffer(plain)
        finally:
            wipe_bytes(plain)
