"""docs/LAYOUT.md names every module of the product and its tooling, so a reader can find
what each file does (issue 13)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("orders_project", "common", "orders", "saga", "audit", "devstack", "bench", "compose_tests")
# The participants share one shape, described once in LAYOUT.md.
SHARED_SHAPE = {"services.py", "tasks.py", "models.py", "selectors.py", "admin.py", "apps.py", "exceptions.py"}


def _modules() -> list[Path]:
    found = []
    for package in (*PACKAGES, "inventory", "payments", "notifications"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).parts
            if "tests" in parts or "migrations" in parts or path.name == "__init__.py" or path.name.startswith("test_"):
                continue
            found.append(path.relative_to(ROOT))
    return sorted(found)


def _section(layout: str, package: str) -> str:
    """The part of LAYOUT.md about `package` (its heading names `package/`), else Tooling."""
    for section in layout.split("\n## ")[1:]:
        if f"`{package}/`" in section.splitlines()[0]:
            return section
    return next(s for s in layout.split("\n## ") if s.startswith("Tooling"))


def test_every_module_is_in_the_layout() -> None:
    layout = (ROOT / "docs" / "LAYOUT.md").read_text()
    missing = []
    for path in _modules():
        package, inner = path.parts[0], Path(*path.parts[1:]).as_posix()
        layout_part = _section(layout, package)
        if package in ("inventory", "payments", "notifications") and inner in SHARED_SHAPE | {"api/views.py"}:
            continue
        listed = f"`{inner}`" in layout_part or f"`{path.as_posix()}`" in layout
        if not listed and inner.startswith("management/commands/"):
            listed = "`management/commands/`" in layout_part
        if not listed:
            missing.append(path.as_posix())
    assert not missing, f"docs/LAYOUT.md does not say what these do: {missing}"
