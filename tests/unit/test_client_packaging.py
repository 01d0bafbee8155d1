"""The client packages' metadata: one version across languages, ranges instead of pins, no server code."""

from __future__ import annotations

import json
import re
import tomllib
from typing import Any

from tests.support import REPO


def _toml(path: str) -> dict[str, Any]:
    return tomllib.loads((REPO / path).read_text())


def _json(path: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((REPO / path).read_text())
    return data


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()


def test_python_and_typescript_packages_carry_one_version_and_the_server_requires_it() -> None:
    version = _toml("generated/pyproject.toml")["project"]["version"]
    assert _json("generated/ts/package.json")["version"] == version
    assert _json("examples/node/package.json")["dependencies"]["@shop-mesh/api"] == version
    assert _json("package-lock.json")["packages"]["generated/ts"]["version"] == version
    server = _toml("pyproject.toml")["project"]["dependencies"]
    assert f"shop-mesh-api=={version}" in server


def test_client_distribution_depends_on_ranges_of_the_grpc_runtime_only() -> None:
    project = _toml("generated/pyproject.toml")["project"]
    requirements = project["dependencies"]
    assert {_name(r) for r in requirements} == {"grpcio", "protobuf", "googleapis-common-protos"}
    assert not [r for r in requirements if "==" in r], "a pin breaks `pip check` for callers"
    typing = project["optional-dependencies"]["typing"]
    assert {_name(r) for r in typing} == {"types-protobuf", "types-grpcio"}


def test_server_distribution_ships_no_stubs_and_cannot_be_uploaded() -> None:
    pyproject = _toml("pyproject.toml")
    assert "Private :: Do Not Upload" in pyproject["project"]["classifiers"]
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    # One package of our own (shop_mesh): never the stubs' `shop`, never a generic top-level name.
    assert include == ["shop_mesh*"]
    runtime = [r for r in pyproject["project"]["dependencies"] if _name(r).startswith("grpcio")]
    assert runtime and not [r for r in runtime if "==" in r]
