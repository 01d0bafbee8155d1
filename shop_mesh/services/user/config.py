"""UserService settings (docs/runtime-contract.md), loaded once in __main__."""

from __future__ import annotations

from pydantic import AliasChoices, Field

from shop_mesh.services.common.config import ServiceSettings


class UserSettings(ServiceSettings):
    service_name: str = "user"
    port: int = Field(default=50051, ge=0, le=65535)
    database_url: str = Field(default="", validation_alias=AliasChoices("USER_DATABASE_URL", "DATABASE_URL"))
