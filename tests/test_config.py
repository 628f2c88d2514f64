"""Unit tests of migration/config.py: targets from TOML, database URL, Fernet keys, fingerprint."""

from __future__ import annotations

from pathlib import Path

import pytest

from migration.config import (
    COINFLIP_TARGETS,
    Settings,
    Target,
    fernet_keys_from_env,
    load_targets,
    resolve_db_url,
    targets_fingerprint,
)
from migration.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "targets.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# -- load_targets -----------------------------------------------------------------------------

def test_no_config_file_means_the_builtin_coinflip_targets() -> None:
    targets = load_targets(None)
    assert targets == COINFLIP_TARGETS
    cols = {(t.table, c) for t in targets for c in t.columns}
    assert cols == {
        ("users", "encrypted_secret"), ("users", "referral_payout_escrow_secret"),
        ("wagers", "creator_escrow_secret"), ("wagers", "acceptor_escrow_secret"),
    }


def test_valid_toml_gives_targets_in_file_order(tmp_path: Path) -> None:
    p = write(tmp_path, """
[[targets]]
table = "accounts"
primary_key = "id"
columns = ["api_secret", "webhook_secret"]

[[targets]]
table = "vaults"
primary_key = "vault_id"
columns = ["seed"]
""")
    assert load_targets(p) == (
        Target("accounts", "id", ("api_secret", "webhook_secret")),
        Target("vaults", "vault_id", ("seed",)),
    )
    assert load_targets(str(p)) == load_targets(p)  # str paths work as well


def test_missing_config_file_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as excinfo:
        load_targets(missing)
    msg = str(excinfo.value)
    assert str(missing) in msg and "not found" in msg and "--config" in msg


def test_malformed_toml_is_a_config_error_with_the_position(tmp_path: Path) -> None:
    p = write(tmp_path, '[[targets]]\ntable = "users"\nprimary_key "user_id"\n')
    with pytest.raises(ConfigError) as excinfo:
        load_targets(p)
    msg = str(excinfo.value)
    assert "is not valid TOML" in msg and str(p) in msg
    assert "line 3" in msg
    assert "\n" not in msg  # one printable line
    assert excinfo.value.__cause__ is None


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    p = tmp_path / "latin1.toml"
    p.write_bytes(b'[[targets]]\ntable = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="cannot be read"):
        load_targets(p)


@pytest.mark.parametrize("text", ["", "title = 'x'\n", "targets = []\n", "targets = 'users'\n"])
def test_file_without_targets_is_a_config_error_showing_the_shape(tmp_path: Path,
                                                                  text: str) -> None:
    with pytest.raises(ConfigError, match=r"has no \[\[targets\]\].*primary_key"):
        load_targets(write(tmp_path, text))


def test_target_that_is_not_a_table_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"target #1 is not a table"):
        load_targets(write(tmp_path, 'targets = ["users"]\n'))


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('primary_key = "id"\ncolumns = ["s"]', r'target #1 needs table = "name"'),
        ('table = "t"\ncolumns = ["s"]', r'target #1 \(t\) needs primary_key = "column"'),
        ('table = "t"\nprimary_key = "id"', r"target #1 \(t\) needs columns"),
        ('table = "t"\nprimary_key = "id"\ncolumns = []', r"needs columns .* at least one"),
        ('table = "t"\nprimary_key = "id"\ncolumns = "s"', r"needs columns"),
        ('table = "t"\nprimary_key = "id"\ncolumns = ["s", ""]', r"needs columns"),
        ('table = ""\nprimary_key = "id"\ncolumns = ["s"]', r"needs table"),
        ('table = 3\nprimary_key = "id"\ncolumns = ["s"]', r"needs table"),
    ],
)
def test_target_missing_a_key_is_a_config_error_saying_what_to_add(
    tmp_path: Path, body: str, expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_targets(write(tmp_path, f"[[targets]]\n{body}\n"))


def test_unknown_key_is_a_config_error_listing_it_and_the_allowed_ones(tmp_path: Path) -> None:
    p = write(tmp_path, '[[targets]]\ntable = "t"\nprimary_key = "id"\ncolumn = ["s"]\n'
                        'colums = ["s"]\n')
    with pytest.raises(ConfigError) as excinfo:
        load_targets(p)
    msg = str(excinfo.value)
    assert "['column', 'colums']" in msg
    assert "allowed are table, primary_key, columns" in msg


def test_unknown_key_in_a_later_target_names_that_target(tmp_path: Path) -> None:
    p = write(tmp_path, '[[targets]]\ntable = "a"\nprimary_key = "id"\ncolumns = ["s"]\n'
                        '[[targets]]\ntable = "b"\nprimary_key = "id"\ncolumns = ["s"]\nx = 1\n')
    with pytest.raises(ConfigError, match=r"target #2 has unknown keys \['x'\]"):
        load_targets(p)


def test_duplicate_column_within_a_target_is_a_config_error(tmp_path: Path) -> None:
    p = write(tmp_path, '[[targets]]\ntable = "users"\nprimary_key = "user_id"\n'
                        'columns = ["encrypted_secret", "encrypted_secret"]\n')
    with pytest.raises(ConfigError, match=r"column users\.encrypted_secret is listed twice"):
        load_targets(p)


def test_duplicate_column_across_targets_is_a_config_error(tmp_path: Path) -> None:
    p = write(tmp_path, '[[targets]]\ntable = "users"\nprimary_key = "user_id"\n'
                        'columns = ["encrypted_secret"]\n'
                        '[[targets]]\ntable = "users"\nprimary_key = "user_id"\n'
                        'columns = ["encrypted_secret"]\n')
    with pytest.raises(ConfigError, match=r"target #2: column users\.encrypted_secret is listed"):
        load_targets(p)


def test_same_column_name_in_two_tables_is_allowed(tmp_path: Path) -> None:
    p = write(tmp_path, '[[targets]]\ntable = "a"\nprimary_key = "id"\ncolumns = ["secret"]\n'
                        '[[targets]]\ntable = "b"\nprimary_key = "id"\ncolumns = ["secret"]\n')
    assert [t.table for t in load_targets(p)] == ["a", "b"]


def test_primary_key_as_a_target_column_is_a_config_error(tmp_path: Path) -> None:
    p = write(tmp_path, '[[targets]]\ntable = "t"\nprimary_key = "id"\ncolumns = ["id", "s"]\n')
    with pytest.raises(ConfigError, match=r"primary key t\.id cannot be a target column"):
        load_targets(p)


# -- resolve_db_url ---------------------------------------------------------------------------

def test_db_flag_wins_over_database_url() -> None:
    env = {"DATABASE_URL": "sqlite:///from-env.db"}
    assert resolve_db_url("sqlite:///from-flag.db", env) == "sqlite:///from-flag.db"


def test_database_url_is_used_without_the_flag() -> None:
    assert resolve_db_url(None, {"DATABASE_URL": "sqlite:///from-env.db"}) == (
        "sqlite:///from-env.db")


@pytest.mark.parametrize("env", [{}, {"DATABASE_URL": ""}])
def test_neither_db_flag_nor_database_url_is_a_config_error(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as excinfo:
        resolve_db_url(None, env)
    assert "--db" in str(excinfo.value) and "DATABASE_URL" in str(excinfo.value)


def test_resolve_db_url_reads_the_process_environment_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "sqlite:///process-env.db")
    assert resolve_db_url(None) == "sqlite:///process-env.db"
    monkeypatch.delenv("DATABASE_URL")
    with pytest.raises(ConfigError):
        resolve_db_url(None)


# -- fernet_keys_from_env ---------------------------------------------------------------------

def test_fernet_keys_come_current_first_then_legacy_in_order() -> None:
    env = {"ENCRYPTION_KEY": "cur", "ENCRYPTION_KEY_LEGACY": "old1,old2,old3"}
    assert fernet_keys_from_env(env) == ("cur", "old1", "old2", "old3")


def test_fernet_legacy_keys_split_on_commas_ignoring_blanks_and_spaces() -> None:
    env = {"ENCRYPTION_KEY": "  cur \n", "ENCRYPTION_KEY_LEGACY": " old1 , ,old2,, "}
    assert fernet_keys_from_env(env) == ("cur", "old1", "old2")


def test_no_fernet_keys_in_the_environment_gives_none() -> None:
    assert fernet_keys_from_env({}) == ()
    assert fernet_keys_from_env({"ENCRYPTION_KEY": " ", "ENCRYPTION_KEY_LEGACY": ","}) == ()


def test_fernet_keys_are_never_in_the_settings_repr() -> None:
    s = Settings(db_url="sqlite:///x.db", fernet_keys=("k-current-secret", "k-legacy-secret"))
    assert "k-current-secret" not in repr(s) and "k-legacy-secret" not in repr(s)


@pytest.mark.parametrize(("field", "value"), [("batch_size", 0), ("concurrency", 0),
                                               ("batch_size", -5)])
def test_settings_refuse_non_positive_sizes(field: str, value: int) -> None:
    with pytest.raises(ConfigError, match=f"--{field.replace('_', '-')} must be at least 1"):
        Settings(db_url="sqlite:///x.db", **{field: value})  # type: ignore[arg-type]


# -- targets_fingerprint ----------------------------------------------------------------------

def test_fingerprint_is_stable_for_equal_targets() -> None:
    a = (Target("users", "user_id", ("a", "b")),)
    b = (Target("users", "user_id", ("a", "b")),)
    assert targets_fingerprint(a) == targets_fingerprint(b)
    assert targets_fingerprint(COINFLIP_TARGETS) == targets_fingerprint(load_targets(None))
    assert len(targets_fingerprint(a)) == 16
    int(targets_fingerprint(a), 16)  # hex


@pytest.mark.parametrize(
    "changed",
    [
        (Target("users", "user_id", ("a",)),),  # a column dropped
        (Target("users", "user_id", ("a", "b", "c")),),  # a column added
        (Target("users", "id", ("a", "b")),),  # another primary key
        (Target("members", "user_id", ("a", "b")),),  # another table
        (Target("users", "user_id", ("a", "b")), Target("t", "id", ("s",))),  # a target added
    ],
)
def test_fingerprint_changes_when_the_targets_change(changed: tuple[Target, ...]) -> None:
    base = (Target("users", "user_id", ("a", "b")),)
    assert targets_fingerprint(changed) != targets_fingerprint(base)


def test_load_targets_names_the_first_bad_entry(tmp_path: Path) -> None:
    """Entries are checked in order, each one's columns against the entries before it: the
    first bad entry is the one named (the restructure had checked every entry's own
    fields first, naming #3 here)."""
    import pytest

    from migration.config import load_targets
    from migration.errors import ConfigError

    p = tmp_path / "t.toml"
    p.write_text(
        '[[targets]]\ntable = "users"\nprimary_key = "id"\ncolumns = ["a"]\n'
        '[[targets]]\ntable = "users"\nprimary_key = "id"\ncolumns = ["a"]\n'
        '[[targets]]\nprimary_key = "id"\ncolumns = ["b"]\n'
    )
    with pytest.raises(ConfigError) as err:
        load_targets(p)
    assert "target #2: column users.a is listed twice" in str(err.value), str(err.value)
