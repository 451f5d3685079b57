"""The layout rules a newcomer relies on: the library never imports the recipes, and no library
module outgrows one readable file."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("dynenc", "kernels", "bench")
MAX_LINES = 450


def _modules(*folders):
    return sorted(path for folder in folders for path in (ROOT / folder).rglob("*.py"))


def _imported(path):
    """Top-level names of every module ``path`` imports (absolute imports only)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_the_library_imports_nothing_from_the_recipes():
    importers = [str(p.relative_to(ROOT)) for p in _modules(*LIBRARY) if "recipes" in set(_imported(p))]
    assert not importers


def test_no_library_module_exceeds_the_line_budget():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in _modules("dynenc")}
    assert not {p: n for p, n in sizes.items() if n > MAX_LINES}, f"modules over {MAX_LINES} lines"
