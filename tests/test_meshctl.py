"""meshctl's bus commands, run as a user would."""

from __future__ import annotations

import stat

from click.testing import CliRunner

from bus.keys import Keyring
from meshctl.cli import cli


def test_keygen_writes_usable_keys_with_private_parts_0600(tmp_path) -> None:
    result = CliRunner().invoke(cli, ["bus", "keygen", "--dir", str(tmp_path), "pilot", "node-1"])
    assert result.exit_code == 0, result.output
    for name in ("pilot", "node-1"):
        for suffix in (".key_secret", ".sign"):
            path = tmp_path / f"{name}{suffix}"
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        ring = Keyring(tmp_path, name)
        assert len(ring.curve().public) == 40 and ring.signing_key()
    assert set(Keyring(tmp_path, "pilot").allowed_clients().values()) == {"pilot", "node-1"}
    assert set(Keyring(tmp_path, "pilot").trusted_signers()) == {"pilot", "node-1"}


def test_keygen_refuses_to_overwrite_and_names_the_file(tmp_path) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["bus", "keygen", "--dir", str(tmp_path), "pilot"]).exit_code == 0
    result = runner.invoke(cli, ["bus", "keygen", "--dir", str(tmp_path), "pilot"])
    assert result.exit_code == 1 and "pilot.key exists" in result.output
    result = runner.invoke(cli, ["bus", "keygen", "--dir", str(tmp_path), "../evil"])
    assert result.exit_code == 1 and "invalid key name" in result.output


def test_watch_with_a_missing_key_is_a_clear_error(tmp_path) -> None:
    result = CliRunner().invoke(cli, ["bus", "watch", "--keys", str(tmp_path), "--as", "ghost"])
    assert result.exit_code == 1 and "ghost.key_secret" in result.output
