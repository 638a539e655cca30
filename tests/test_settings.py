"""Settings from the environment and ``.env``, with the original service's names."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsError

from magi_gateway.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No Settings variable leaks in from the outer environment, nor a stray ``.env``."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def load(**kwargs: object) -> Settings:
    return Settings(_env_file=None, **kwargs)  # type: ignore[arg-type]


def test_defaults() -> None:
    s = load()
    assert s.debug is False
    assert s.host == "0.0.0.0"
    assert s.port == 8000
    assert (s.redis_host, s.redis_port, s.redis_db) == ("localhost", 6379, 0)
    assert s.redis_password is None
    assert s.redis_url is None
    assert s.redis_key_prefix == "magi"
    assert s.fixed_secret is None
    assert s.app_secrets == {}
    assert s.token_skew_minutes == 1
    assert s.cors_origins == "*"
    assert s.cors_origin_list == ["*"]
    assert s.redis_dsn == "redis://localhost:6379/0"
    assert s.secrets_configured is False
    assert s.max_agents_per_request == 16


def test_original_env_names(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "DEBUG": "true",
        "HOST": "127.0.0.1",
        "PORT": "9001",
        "REDIS_HOST": "redis.internal",
        "REDIS_PORT": "6380",
        "REDIS_DB": "3",
        "REDIS_PASSWORD": "hunter2",
        "FIXED_SECRET": "shh",
        "CORS_ORIGINS": "https://a.example, https://b.example",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = load()
    assert s.debug is True
    assert s.host == "127.0.0.1"
    assert s.port == 9001
    assert s.redis_host == "redis.internal"
    assert s.redis_port == 6380
    assert s.redis_db == 3
    assert s.redis_password == "hunter2"
    assert s.fixed_secret == "shh"
    assert s.secrets_configured is True
    assert s.cors_origin_list == ["https://a.example", "https://b.example"]
    assert s.redis_dsn == "redis://:hunter2@redis.internal:6380/3"


@pytest.mark.parametrize(("raw", "value"), [("1", True), ("True", True), ("0", False), ("false", False)])
def test_debug_parsing(monkeypatch: pytest.MonkeyPatch, raw: str, value: bool) -> None:
    monkeypatch.setenv("DEBUG", raw)
    assert load().debug is value


def test_env_names_are_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("redis_host", "lower.example")
    assert load().redis_host == "lower.example"


def test_limits_use_upper_cased_field_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUDGEMENT_TIMEOUT_S", "2.5")
    monkeypatch.setenv("MAX_FRAME_BYTES", "2048")
    monkeypatch.setenv("TOKEN_SKEW_MINUTES", "0")
    monkeypatch.setenv("REDIS_KEY_PREFIX", "tenant-a")
    s = load()
    assert s.judgement_timeout_s == 2.5
    assert s.max_frame_bytes == 2048
    assert s.token_skew_minutes == 0
    assert s.redis_key_prefix == "tenant-a"


@pytest.mark.parametrize(
    ("name", "value"),
    [("PORT", "70000"), ("REDIS_PORT", "0"), ("REDIS_DB", "-1"), ("MAX_AGENTS_PER_REQUEST", "17")],
)
def test_out_of_range_values_are_rejected(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        load()


def test_redis_dsn_quotes_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_PASSWORD", "p@ss:w/rd #1%")
    s = load()
    assert s.redis_password == "p@ss:w/rd #1%"
    assert s.redis_dsn == "redis://:p%40ss%3Aw%2Frd%20%231%25@localhost:6379/0"


def test_redis_url_wins_over_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_HOST", "ignored")
    monkeypatch.setenv("REDIS_PASSWORD", "ignored")
    monkeypatch.setenv("REDIS_URL", "rediss://user:pw@cache.example:6390/2")
    assert load().redis_dsn == "rediss://user:pw@cache.example:6390/2"


def test_unix_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "unix:///run/redis.sock?db=1")
    assert load().redis_dsn == "unix:///run/redis.sock?db=1"


@pytest.mark.parametrize("name", ["REDIS_PASSWORD", "REDIS_URL", "FIXED_SECRET"])
def test_empty_values_mean_unset(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "")
    s = load()
    assert getattr(s, name.lower()) is None
    assert s.redis_dsn == "redis://localhost:6379/0"
    assert s.secrets_configured is False


@pytest.mark.parametrize(
    ("raw", "origins"),
    [
        ("*", ["*"]),
        ("https://a.example", ["https://a.example"]),
        ("https://a.example,https://b.example", ["https://a.example", "https://b.example"]),
        (" https://a.example , ,https://b.example, ", ["https://a.example", "https://b.example"]),
        ("", []),
    ],
)
def test_cors_origins(monkeypatch: pytest.MonkeyPatch, raw: str, origins: list[str]) -> None:
    monkeypatch.setenv("CORS_ORIGINS", raw)
    assert load().cors_origin_list == origins


def test_app_secrets_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_SECRETS", '{"alpha": "sa", "beta": "sb"}')
    s = load()
    assert s.app_secrets == {"alpha": "sa", "beta": "sb"}
    assert s.fixed_secret is None
    assert s.secrets_configured is True


def test_app_secrets_invalid_json_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_SECRETS", "alpha=sa")
    with pytest.raises(SettingsError, match="app_secrets"):
        load()


ORIGINAL_TEMPLATE = """\
# Application settings
DEBUG=True
HOST=0.0.0.0
PORT=8000

# Redis settings
REDIS_HOST=localhost
REDIS_PORT=6379
REDIS_DB=0
REDIS_PASSWORD=

# Security
FIXED_SECRET=your-secret-key-here

# CORS settings
CORS_ORIGINS=*  # Use comma-separated values in production
"""


def test_original_env_template(tmp_path: Path) -> None:
    path = tmp_path / "template.env"
    path.write_text(ORIGINAL_TEMPLATE, encoding="utf-8")
    s = Settings(_env_file=path)  # type: ignore[call-arg]
    assert s.debug is True
    assert s.host == "0.0.0.0"
    assert s.port == 8000
    assert s.redis_password is None
    assert s.fixed_secret == "your-secret-key-here"
    assert s.cors_origin_list == ["*"]
    assert s.redis_dsn == "redis://localhost:6379/0"


def test_env_file_in_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text('REDIS_HOST=from-dotenv\nAPP_SECRETS={"a": "x"}\n', encoding="utf-8")
    s = Settings()
    assert s.redis_host == "from-dotenv"
    assert s.app_secrets == {"a": "x"}


def test_environment_wins_over_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.env"
    path.write_text("REDIS_HOST=from-file\nPORT=1234\n", encoding="utf-8")
    monkeypatch.setenv("REDIS_HOST", "from-env")
    s = Settings(_env_file=path)  # type: ignore[call-arg]
    assert s.redis_host == "from-env"
    assert s.port == 1234


def test_unknown_variables_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "x.env"
    path.write_text("SOMETHING_ELSE=1\nPORT=8100\n", encoding="utf-8")
    assert Settings(_env_file=path).port == 8100  # type: ignore[call-arg]


def test_settings_are_frozen() -> None:
    s = load()
    with pytest.raises(ValidationError):
        s.port = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        s.fixed_secret = "x"  # type: ignore[misc]
    assert s.port == 8000


def test_keyword_arguments_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9000")
    assert load(port=9100).port == 9100
