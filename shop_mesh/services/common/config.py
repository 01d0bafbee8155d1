"""Settings shared by every service, loaded once from the environment in each __main__."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Environment-driven settings; see docs/runtime-contract.md. Subclasses add their own fields."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", frozen=True, populate_by_name=True)

    # Overridden by each service: its short name and default port.
    service_name: str = "service"
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    data_dir: Path = Path(".data")
    database_url: str = ""
    database_url_file: Path | None = None
    grace_period_seconds: float = Field(default=10.0, ge=0)
    # Keep serving for this long after health turns NOT_SERVING, so load balancers stop sending first.
    shutdown_delay_seconds: float = Field(default=0.0, ge=0)
    log_level: str = "INFO"
    otel_exporter_otlp_endpoint: str | None = None
    reflect_all_services: bool = False
    max_message_bytes: int = Field(default=1024 * 1024, ge=1024)
    database_check_interval_seconds: float = Field(default=2.0, gt=0)
    # Test-only fault switch: the mesh's retry tests make an app fail this share of calls.
    chaos_unavailable_percent: float = Field(default=0.0, ge=0, le=100)
    event_poll_interval_seconds: float = Field(default=0.2, gt=0)
    # Signs page tokens (shop_mesh/services/common/pagination.py); every replica of a service needs the same
    # one.
    page_token_secret: SecretStr = SecretStr("")
    # Open server streams per process (health/reflection not counted); beyond: RESOURCE_EXHAUSTED.
    max_open_streams: int = Field(default=2000, ge=1)
    # Unary calls in progress per process (health/reflection not counted); beyond: RESOURCE_EXHAUSTED
    # at once instead of a queue that makes every call late (default measured: docs/performance.md).
    max_inflight_unary: int = Field(default=128, ge=1)
    # A unary call arriving with less deadline left than this is refused (RESOURCE_EXHAUSTED); 0 = off.
    unary_min_deadline_ms: float = Field(default=0.0, ge=0)
    # Prometheus metrics endpoint (its own port, never the gRPC one); 0 = off: nothing is recorded.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"

    @model_validator(mode="after")
    def _resolve_database_url(self) -> ServiceSettings:
        if not self.database_url and self.database_url_file is not None:
            object.__setattr__(self, "database_url", self.database_url_file.read_text().strip())
        if not self.database_url:
            path = (self.data_dir / f"{self.service_name}.db").resolve()
            object.__setattr__(self, "database_url", f"sqlite:///{path}")
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
