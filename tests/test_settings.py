"""Settings: every field is documented in the README, and the embedded default needs none."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from server.settings import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_setting_is_documented_in_readme(name: str) -> None:
    variable = f"CORRAL_{name.upper()}"
    assert f"`{variable}`" in README.read_text(), f"{variable} is missing from the README"


def test_every_setting_has_a_description() -> None:
    missing = [name for name, info in Settings.model_fields.items() if not info.description]
    assert missing == []


def test_embedded_default_is_sqlite_in_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.is_embedded
    assert settings.resolved_database_url == f"sqlite+aiosqlite:///{tmp_path / 'corral.db'}"
    assert settings.host == "127.0.0.1"
    assert settings.should_auto_migrate


def test_external_database_does_not_auto_migrate() -> None:
    settings = Settings(database_url="postgresql+asyncpg://u@h/db")
    assert not settings.should_auto_migrate


def test_settings_come_from_corral_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_PORT", "9123")
    monkeypatch.setenv("CORRAL_LOG_LEVEL", "WARNING")
    settings = Settings()
    assert settings.port == 9123
    assert settings.log_level == "warning"


def test_bad_setting_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_PORT", "70000")
    with pytest.raises(ValidationError):
        Settings()
