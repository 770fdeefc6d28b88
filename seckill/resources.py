"""Where the files shipped beside the package live: lua/, config/, docs/openapi.yaml.

A source checkout (and an editable install) reads them from the repository; a wheel carries
copies under seckill/_lua and seckill/_config.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE.parent


def _first(*candidates: Path) -> Path:
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return candidates[0]


def lua_dir() -> Path:
    """Directory holding the Lua scripts."""
    return _first(_CHECKOUT / "lua", _PACKAGE / "_lua")


def config_path() -> Path:
    """The default config/seckill.toml."""
    return _first(_CHECKOUT / "config" / "seckill.toml", _PACKAGE / "_config" / "seckill.toml")


def openapi_path() -> Path:
    """The OpenAPI description served at /openapi.json."""
    return _first(_CHECKOUT / "docs" / "openapi.yaml", _PACKAGE / "_config" / "openapi.yaml")


def risk_path() -> Path:
    """The default risk rules, config/risk.toml."""
    return _first(_CHECKOUT / "config" / "risk.toml", _PACKAGE / "_config" / "risk.toml")


def limits_path() -> Path:
    """The default rate-limit rules, config/limits.toml."""
    return _first(_CHECKOUT / "config" / "limits.toml", _PACKAGE / "_config" / "limits.toml")
