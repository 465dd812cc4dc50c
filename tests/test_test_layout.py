"""No test module imports another test module: what several test modules use lives in
`tests/helpers/` (fixtures in a conftest.py). Importing a `test_*` module runs its module-level
code and drags its fixtures and tests along, and moving a test then breaks unrelated files."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIPPED_PARTS = {"node_modules", "__pycache__"}


def python_files(tests_dir: Path) -> Iterator[Path]:
    """Every `*.py` under `tests_dir`, outside node_modules, caches and hidden directories."""
    for path in sorted(tests_dir.rglob("*.py")):
        parts = path.relative_to(tests_dir).parts
        if not any(part in SKIPPED_PARTS or part.startswith(".") for part in parts):
            yield path


def module_name(path: Path, root: Path) -> str:
    """The dotted name a file under `root` is imported as (a package's `__init__.py` is the
    package)."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(
    tree: ast.Module, importer: str, is_package: bool
) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every module an import statement anywhere in `tree` may name:
    `from M import n` names `M` and, if `n` is a submodule, `M.n`. Relative imports are resolved
    against `importer`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = importer.split(".") if is_package else importer.split(".")[:-1]
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def find_test_module_imports(tests_dir: Path) -> list[str]:
    """One line per import of a `test_*` module by any file under `tests_dir`."""
    root = tests_dir.parent
    files = list(python_files(tests_dir))
    test_modules = {module_name(path, root) for path in files if path.name.startswith("test_")}
    found = []
    for path in files:
        importer = module_name(path, root)
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, module in imported_modules(tree, importer, path.name == "__init__.py"):
            if module in test_modules and module != importer:
                found.append(f"{path.relative_to(root)}:{line} imports the test module {module}")
    return sorted(set(found))


def test_no_file_under_tests_imports_a_test_module() -> None:
    found = find_test_module_imports(ROOT / "tests")
    assert not found, (
        "move what these use to tests/helpers/ (or its fixtures to a conftest.py):\n"
        + "\n".join(found)
    )


def test_the_check_finds_absolute_relative_and_submodule_imports(tmp_path: Path) -> None:
    tests = tmp_path / "tests"
    (tests / "shop").mkdir(parents=True)
    (tests / "helpers").mkdir()
    for package in (tests, tests / "shop", tests / "helpers"):
        (package / "__init__.py").write_text("")
    (tests / "shop" / "test_cart.py").write_text("def helper() -> None: ...\n")
    (tests / "helpers" / "http.py").write_text("def call() -> None: ...\n")
    (tests / "shop" / "test_fine.py").write_text(
        "from tests.helpers.http import call\nfrom ..helpers import http\n"
    )
    (tests / "shop" / "test_bad.py").write_text(
        "from tests.shop.test_cart import helper\n"
        "from tests.shop import test_cart\n"
        "import tests.shop.test_cart\n"
        "from .test_cart import helper as again\n"
        "def later() -> None:\n"
        "    from . import test_cart\n"
    )
    (tests / "conftest.py").write_text("from tests.shop.test_cart import helper\n")

    assert find_test_module_imports(tests) == [
        "tests/conftest.py:1 imports the test module tests.shop.test_cart",
        *(
            f"tests/shop/test_bad.py:{n} imports the test module tests.shop.test_cart"
            for n in (1, 2, 3, 4, 6)
        ),
    ]
