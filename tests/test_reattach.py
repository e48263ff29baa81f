"""evscrypt.reattach in-process, on the local soft-HSM with a settable clock:
one verdict per cause, with its reason, its status summary and its message
(the daemon tests check the same words on every path)."""

from __future__ import annotations

import pwd

import pytest

from evscrypt import reattach
from evscrypt.image.header import Header
from evscrypt.kms.base import KeyInfo, KeyState, KMSBackend


def header(key_id: str | None, backend: str = "local") -> Header:
    return Header(uuid="u", name="v", size=4096, encrypted=key_id is not None, data_offset=1 << 20,
                  kms_backend=backend if key_id else None, key_id=key_id)


def test_unencrypted_and_enabled_volumes_attach_again(kms):
    assert reattach.check("v", header(None), 0, None) == reattach.Verdict("v", True)
    k = kms.create_key("k")
    v = reattach.check("v", header(k.key_id), 0, kms)
    assert (v.ok, v.key, v.state, v.message, v.short) == (True, "k", "Enabled", "", "yes")


def test_each_key_state(kms, clock):
    k = kms.create_key("k").key_id
    kms.disable(k)
    v = reattach.check("v", header(k), 0, kms)
    assert (v.reason, v.short) == (reattach.Reason.KEY_DISABLED, "no (key Disabled)")
    assert v.message == ("key k is Disabled: once detached, volume v cannot be attached again until the key is "
                         "enabled (evscrypt key enable k)")

    date = kms.schedule_deletion(k, 7).deletion_date
    assert date == "2030-01-08T12:00:00Z"
    v = reattach.check("v", header(k), 0, kms)
    assert v.short == f"no (key PendingDeletion, deletion on {date})"
    assert v.message == (f"key k is PendingDeletion (deletion on {date}): once detached, volume v cannot be "
                         f"attached again unless its deletion is cancelled and the key then enabled, before that "
                         f"date (evscrypt key cancel-deletion k, then evscrypt key enable k); after it, the data "
                         f"is lost for good")

    clock.advance(days=8)
    v = reattach.check("v", header(k), 0, kms)
    assert (v.reason, v.short) == (reattach.Reason.KEY_DELETED, "no (key Deleted)")
    assert v.message == ("key k is Deleted: once detached, volume v can never be attached again; its data is "
                         "lost for good")

    v = reattach.check("v", header("no-such-key"), 0, kms)
    assert (v.reason, v.state, v.short) == (reattach.Reason.KEY_NOT_FOUND, "NotFound", "no (key not found)")
    assert v.message.startswith("key no-such-key no longer exists: once detached, volume v can never")


def _uid_without_name() -> int:
    """A uid no passwd entry names: the messages then show the number (the
    suite's own second user, made by test_access, has a name)."""
    named = {p.pw_uid for p in pwd.getpwall()}
    return next(u for u in range(61000, 65000) if u not in named)


def test_access_of_the_owner(kms):
    other = _uid_without_name()
    k = kms.create_key("k", owner=1000).key_id
    assert reattach.check("v", header(k), 1000, kms).ok  # the key's owner
    assert reattach.check("v", header(k), 0, kms).ok  # root
    v = reattach.check("v", header(k), other, kms)
    assert (v.reason, v.user, v.short) == (reattach.Reason.OWNER_NOT_ALLOWED, str(other), "no (owner not allowed)")
    kms.grant(k, other)
    assert reattach.check("v", header(k), other, kms).ok
    kms.revoke(k, other)
    v = reattach.check("v", header(k), other, kms)
    assert (v.reason, v.short) == (reattach.Reason.GRANT_REVOKED, "no (grant revoked)")
    assert v.message == (f"the grant of key k to {other}, the owner of volume v, was revoked: once detached, v "
                         f"cannot be attached again until the key's owner grants it again (evscrypt key grant k "
                         f"--to {other})")
    kms.grant(k, other)  # granted again: the revocation is forgotten
    assert reattach.check("v", header(k), other, kms).ok


def test_a_sealed_keystore_is_an_unknown_state(kms, tmp_path, monkeypatch):
    k = kms.create_key("k").key_id
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    kms.seal_root(pw)
    v = reattach.check("v", header(k), 0, kms)  # no passphrase in the environment
    assert (v.ok, v.reason, v.state, v.short) == (False, reattach.Reason.UNKNOWN, "Unknown", "no (key state unknown)")
    # the KMS could not name the key: its id from the header
    assert v.message.startswith(f"cannot check key state of {k} (the local keystore is sealed")
    assert v.message.endswith("once detached, volume v may not attach again")
    monkeypatch.setenv("EVSCRYPT_PASSPHRASE_FILE", str(pw))
    assert reattach.check("v", header(k), 0, kms).ok


class _Unavailable(KMSBackend):
    """An AWS-only state that allows no use (what describe_key may say)."""

    name = "aws"

    def describe(self, key):
        return KeyInfo(key_id=key, arn=key, alias="alias/x", state=KeyState.UNAVAILABLE, backend="aws")

    generate_data_key = wrap_data_key = decrypt = list_keys = None


def test_other_unusable_states_name_themselves():
    v = reattach.check("v", header("kid", "aws"), 0, _Unavailable())
    assert (v.reason, v.short) == (reattach.Reason.KEY_UNUSABLE, "no (key Unavailable)")
    assert v.message == ("key alias/x is Unavailable: once detached, volume v cannot be attached again until the "
                         "key is Enabled")


@pytest.mark.parametrize("reason", list(reattach.Reason))
def test_every_reason_has_words(reason):
    v = reattach.Verdict("v", False, reason=reason, backend="local", key="k", state="S", deletion_date="D",
                         user="u", detail="why")
    assert v.message and v.short.startswith("no (") and v.to_dict()["reason"] == reason.value
