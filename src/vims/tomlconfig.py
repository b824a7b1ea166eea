"""Configuration files: TOML, validated strictly with pydantic (unknown keys refused)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from vims.errors import VimsError


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


M = TypeVar("M", bound=BaseModel)


def load_toml(path: Path, model: type[M], section: str, error: type[VimsError]) -> M:
    """Parse ``path`` and validate its ``[section]`` (or the whole file) as ``model``;
    any problem is one line naming the file and the first bad key."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise error(f"config {path} does not exist") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise error(f"config {path}: {exc}") from exc
    try:
        return model.model_validate(data.get(section, data))
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise error(f"config {path}: {where + ': ' if where else ''}{msg}") from exc
