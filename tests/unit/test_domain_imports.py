"""The domain of every service imports neither SQLAlchemy, gRPC nor protobuf, nor an SQL adapter of
the unit-of-work port, not even transitively: persistence reaches it only through
`common.unit_of_work` and its own ports (issue #13). The domain modules: user's model.py and
domain.py, payment's domain.py, and every module of order that is not an adapter or the composition
root."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import shop_mesh

SERVICES = Path(shop_mesh.__file__).parent / "services"
# Adapters and wiring of the order service; every other module under order/ is domain.
ORDER_ADAPTERS = {"repository", "app", "servicer", "mapping", "clients", "metrics", "__init__", "__main__"}
# Never imported by a domain module, directly or not: the libraries, the stubs, common's SQL adapters.
FORBIDDEN = (
    "sqlalchemy",
    "grpc",
    "grpc_health",
    "google.protobuf",
    "shop",
    "shop_mesh.services.common.db",
    "shop_mesh.services.common.idempotency_sql",
    "shop_mesh.services.common.outbox",
)


def domain_modules() -> list[Path]:
    order = [p for p in sorted((SERVICES / "order").glob("*.py")) if p.stem not in ORDER_ADAPTERS]
    user = [SERVICES / "user" / "model.py", SERVICES / "user" / "domain.py"]
    return [*user, SERVICES / "payment" / "domain.py", *order]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(SERVICES.parents[1]).with_suffix("").parts)


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def forbidden_imports(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if _forbidden(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if _forbidden(node.module):
                found.append(node.module)
            else:  # `from google import protobuf`
                found += [n for alias in node.names if _forbidden(n := f"{node.module}.{alias.name}")]
    return found


def loaded_forbidden(module: str) -> list[str]:
    """The forbidden modules that importing `module` loads, in a fresh interpreter (so nothing an
    earlier test imported hides or adds anything): what the domain drags in through common/ too."""
    code = (
        "import importlib, sys\n"
        f"importlib.import_module({module!r})\n"
        f"forbidden = {FORBIDDEN!r}\n"
        "print('\\n'.join(sorted(m for m in sys.modules"
        " if any(m == f or m.startswith(f + '.') for f in forbidden))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.split()


def test_the_domain_modules_are_the_split_ones() -> None:
    assert {module_name(p) for p in domain_modules()} >= {
        "shop_mesh.services.user.model",
        "shop_mesh.services.user.domain",
        "shop_mesh.services.payment.domain",
        *(f"shop_mesh.services.order.{m}" for m in ("model", "ports", "store", "queries", "saga")),
        *(f"shop_mesh.services.order.{m}" for m in ("cancel", "settlement", "reconciler")),
    }


def test_the_check_catches_each_kind_of_import() -> None:
    assert forbidden_imports("import sqlalchemy.orm") == ["sqlalchemy.orm"]
    assert forbidden_imports("from grpc import aio") == ["grpc"]
    assert forbidden_imports("from google import protobuf") == ["google.protobuf"]
    assert forbidden_imports("from shop.user.v1 import user_pb2") == ["shop.user.v1"]
    assert forbidden_imports("from shop_mesh.services.common.db import Database") != []
    assert forbidden_imports("from shop_mesh.services.common.idempotency_sql import IdempotencyStore") != []
    assert forbidden_imports("from shop_mesh.services.common.unit_of_work import UnitOfWork") == []
    assert forbidden_imports("from shop_mesh.services.common.idempotency import fingerprint") == []
    assert forbidden_imports("import shop_mesh.services.common.dbx") == []


def test_the_fresh_interpreter_check_sees_what_an_adapter_loads() -> None:
    loaded = loaded_forbidden("shop_mesh.services.order.repository")
    assert "sqlalchemy" in loaded and "shop_mesh.services.common.db" in loaded


@pytest.mark.parametrize("path", domain_modules(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_domain_module_imports_no_adapter_library(path: Path) -> None:
    assert forbidden_imports(path.read_text()) == []


@pytest.mark.parametrize("path", domain_modules(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_domain_module_loads_none_of_them_even_indirectly(path: Path) -> None:
    assert loaded_forbidden(module_name(path)) == []
