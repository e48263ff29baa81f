"""The CLI on a real daemon: options that contradict each other are usage
errors (exit 2), not a silent choice; dump-key of an unencrypted volume is
an encryption-rule error (25); and the --json outputs carry the key facts
(backup list: kms and key_id; snapshot and image info: the key's alias and
state; detach: its warnings and the reattach answer)."""

from __future__ import annotations

import json

import pytest

from copy_helpers import cli_json, expect_fail, state_leftovers
from daemon_fixture import daemon, make_daemon  # noqa: F401  (fixtures by name)
from evscrypt import errors

pytestmark = pytest.mark.fuse

USAGE, RULE = 2, errors.EncryptionRuleError.exit_code


def usage_error(d, *args: str) -> str:
    p = d.cli(*args, check=False)
    assert p.returncode == USAGE and p.stdout == "", (args, p.returncode, p.stdout, p.stderr)
    [line] = p.stderr.splitlines()
    assert line.startswith("evscrypt: usage error: ") and "Traceback" not in p.stderr
    return line


def test_contradicting_options_are_usage_errors(daemon, tmp_path):
    d = daemon
    d.cli("key", "create", "k")
    d.cli("volume", "create", "plain", "--size", "8M", "--no-encrypt")
    d.cli("image", "create", "pub", "--from-volume", "plain")
    both = "--encrypt and --no-encrypt contradict each other"
    for order in (("--encrypt", "--no-encrypt"), ("--no-encrypt", "--encrypt")):  # neither may win silently
        for cmd in (("volume", "create", "x", "--size", "8M"), ("volume", "create", "x", "--from-image", "pub"),
                    ("image", "copy", "pub", "x")):
            assert both in usage_error(d, *cmd, *order)
    for opts, named in ((("--kms", "local"), "--kms"), (("--key", "k"), "--key"),
                        (("--kms", "local", "--key", "k"), "--kms and --key")):
        want = f"--no-encrypt contradicts {named}, which choose how to encrypt"
        for cmd in (("volume", "create", "x", "--size", "8M"), ("volume", "create", "x", "--from-image", "pub"),
                    ("image", "copy", "pub", "x")):
            assert want in usage_error(d, *cmd, "--no-encrypt", *opts)
    assert not d.image("x").exists() and not (d.home / "images" / "x").exists()

    # the default key is everyone's: granting it is a contradiction too
    default_id = cli_json(d, "key", "describe", "evs/default")["key_id"]
    for ref in ("evs/default", "alias/evs/default", default_id):
        assert "evs/default is everyone's key: there is nothing to grant" in usage_error(
            d, "key", "grant", ref, "--to", "root")
    assert cli_json(d, "key", "list-grants", "evs/default") == []

    # dump-key of an unencrypted volume: the rules, not the KMS, refuse it
    line = expect_fail(d, RULE, "volume", "dump-key", "plain", "--key-file", str(tmp_path / "k"))
    assert line == "evscrypt: error: volume 'plain' is not encrypted: it has no data key to dump"
    assert not (tmp_path / "k").exists()
    assert state_leftovers(d.home) == []


def test_json_outputs_carry_the_key_facts(daemon, tmp_path):
    d = daemon
    d.cli("key", "create", "k")
    d.cli("volume", "create", "e", "--size", "8M", "--key", "k")
    d.cli("volume", "create", "p", "--size", "8M", "--no-encrypt")
    key_id = cli_json(d, "key", "describe", "k")["key_id"]
    dest = tmp_path / "bk"
    for v in ("e", "p"):
        d.cli("backup", "create", v, str(dest))
        d.cli("snapshot", "create", v, f"s-{v}")
        d.cli("image", "create", f"i-{v}", "--from-volume", v)

    listed = {b["volume"]: b for b in cli_json(d, "backup", "list", str(dest))}
    assert (listed["e"]["kms"], listed["e"]["key_id"], listed["e"]["encrypted"]) == ("local", key_id, True)
    assert (listed["p"]["kms"], listed["p"]["key_id"], listed["p"]["encrypted"]) == (None, None, False)

    for kind, prefix in (("snapshot", "s-"), ("image", "i-")):
        info = cli_json(d, kind, "info", f"{prefix}e")
        assert (info["key_id"], info["key_alias"], info["key_state"]) == (key_id, "k", "Enabled")
        info = cli_json(d, kind, "info", f"{prefix}p")
        assert (info["key_id"], info["key_alias"], info["key_state"]) == (None, None, None)
        text = d.cli(kind, "info", f"{prefix}e").stdout
        assert "key_alias:   k\n" in text and "key_state:   Enabled\n" in text
    d.cli("key", "disable", "k")
    for kind, prefix in (("snapshot", "s-"), ("image", "i-")):
        assert cli_json(d, kind, "info", f"{prefix}e")["key_state"] == "Disabled"

    d.cli("key", "enable", "k")
    d.attach("e")
    r = json.loads(d.cli("detach", "e", "--json").stdout)
    assert (r["name"], r["detached"], r["warnings"]) == ("e", True, [])
    assert (r["reattach"]["ok"], r["reattach"]["summary"], r["reattach"]["key"]) == (True, "yes", "k")
