"""compose.yaml and the Dockerfile cannot run here (no Docker engine in CI); keep them consistent
with the CLI: every command parses, every variable is one walcast reads, the config validates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import Settings, load_realtime_config
from walcast.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent

#: The environment of spec §9 (plus the optional settings Settings.from_env reads).
WALCAST_ENV = {
    "DATABASE_URL",
    "ACCESS_TOKEN",
    "WALCAST_CONFIG",
    "WALCAST_HOST",
    "WALCAST_PORT",
    "REDIS_URL",
    "WALCAST_SLOT",
    "WALCAST_PUBLICATION",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    document: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return document


def _walcast_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("command", [""])[0] == "walcast"
    }


def test_postgres_16_with_logical_wal(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    assert postgres["image"] == "postgres:16"
    assert "wal_level=logical" in postgres["command"]
    assert "healthcheck" in postgres


def test_every_walcast_command_parses_and_its_environment_is_read(
    compose: dict[str, Any],
) -> None:
    services = _walcast_services(compose)
    assert {"migrate", "walcast", "walcast-reader", "walcast-gateway-1"} <= set(services)
    for name, service in services.items():
        args = build_parser().parse_args(service["command"][1:])
        environment = service.get("environment", {})
        assert set(environment) <= WALCAST_ENV, name
        if args.command == "serve":
            assert {"DATABASE_URL", "ACCESS_TOKEN", "WALCAST_CONFIG"} <= set(environment), name
            assert environment["WALCAST_HOST"] == "0.0.0.0", name  # reachable from outside
            settings = Settings.from_env({k: v for k, v in environment.items() if "${" not in v})
            assert settings.port == 4000
        if args.command == "serve" and (args.no_cdc or args.no_gateway):
            assert environment["REDIS_URL"].startswith("redis://redis:"), name
            assert "cluster" in service["profiles"], name


def test_mounted_config_validates(compose: dict[str, Any]) -> None:
    mount = compose["services"]["walcast"]["volumes"][0]
    source, target, _ = mount.split(":")
    assert compose["services"]["walcast"]["environment"]["WALCAST_CONFIG"] == target
    config = load_realtime_config(ROOT / source)
    assert config.tables


def test_dockerfile_installs_the_package_and_serves() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("# ") and "FROM python:3.11-slim" in text
    assert "&& pip install ." in text
    assert "COPY pyproject.toml setup.py" in text  # setup.py builds the C tuple loop
    assert 'CMD ["walcast", "serve"]' in text
    for folder in ("cdc", "gateway", "migrations", "walcast"):
        assert f"COPY {folder} ./{folder}" in text
