"""The folder tree is the architecture: what may live at the root, who may import whom, where parsing and benchmarks live."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "tradelab"
ROOT_MODULES = {"__init__", "_modidx", "errors", "config", "clock", "records", "timing", "loops", "bot", "runner", "cli", "panel",
                "docs", "events", "dashboard"}
SUBPACKAGES = ("exchange", "sim", "data", "analysis", "trading", "storage", "backtest", "learning", "ops", "bench")


def _modules() -> dict[str, tuple[str, ast.Module]]:
    "Module name -> (the package its relative imports start from, its syntax tree)."
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        if path.name == "_modidx.py":
            continue
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if parts[-1] == "__init__" else name.rpartition(".")[0]
        out[name] = (package, ast.parse(path.read_text(), str(path)))
    return out


MODULES = _modules()


def _imported(package: str, tree: ast.Module) -> set[str]:
    "Absolute names of the tradelab modules (or names) that a module of `package` imports, anywhere in it."
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out |= {target} | {f"{target}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {t for t in out if t == "tradelab" or t.startswith("tradelab.")}


def test_root_holds_only_cross_cutting_modules():
    root = {p.stem for p in PKG.glob("*.py")}
    assert root == ROOT_MODULES, f"unexpected at the root: {sorted(root - ROOT_MODULES)}"
    assert {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(SUBPACKAGES)


def test_nothing_in_production_imports_the_benchmarks():
    for name, (package, tree) in MODULES.items():
        if name.startswith("tradelab.bench") or name == "tradelab.cli":
            continue
        bench = sorted(t for t in _imported(package, tree) if t.startswith("tradelab.bench"))
        assert not bench, f"{name} imports {bench}"


def test_cli_imports_benchmarks_only_inside_the_benchmark_table():
    package, tree = MODULES["tradelab.cli"]
    top = {t for node in tree.body if not isinstance(node, ast.FunctionDef)
           for t in _imported(package, ast.Module([node], []))}
    assert not [t for t in top if t.startswith("tradelab.bench")]


def test_argparse_only_in_the_cli():
    def uses_argparse(tree: ast.Module) -> bool:
        return any(isinstance(x, ast.Import) and any(a.name == "argparse" for a in x.names)
                   or isinstance(x, ast.ImportFrom) and x.module == "argparse" for x in ast.walk(tree))
    users = sorted(n for n, (_, tree) in MODULES.items() if uses_argparse(tree))
    assert users == ["tradelab.cli"]


def test_imports_inside_functions_say_why():
    "An import inside a function needs a reason in a comment: on its line, or above its block of imports."
    for path in PKG.rglob("*.py"):
        if path.name == "_modidx.py":
            continue
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    block = [node.lineno - 1]
                    while lines[block[-1] - 1].strip().startswith(("import ", "from ")):
                        block.append(block[-1] - 1)
                    said = any("#" in lines[i] for i in block) or lines[block[-1] - 1].strip().startswith("#")
                    assert said, f"{path.name}:{node.lineno}: {lines[node.lineno - 1].strip()}"


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_each_package_imports_on_its_own(package):
    "Importing a package first, in a new interpreter, meets no import cycle through the package faces."
    out = subprocess.run([sys.executable, "-c", f"import tradelab.{package}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def _export_cell_sizes() -> list[tuple[int, str]]:
    "Non-blank lines of every export cell in nbs/ (directive lines not counted), with its notebook."
    sizes = []
    for nb in sorted((PKG.parent / "nbs").rglob("*.ipynb")):
        for cell in json.loads(nb.read_text())["cells"]:
            lines = "".join(cell["source"]).split("\n")
            if cell["cell_type"] == "code" and lines[0].startswith("#| export"):
                sizes.append((len([ln for ln in lines if ln.strip() and not ln.startswith("#|")]), nb.name))
    return sizes


def test_export_cells_stay_short():
    "Each export cell reads at a glance: none reaches 60 lines, and half are under 15 (`pytest -s` prints the figures)."
    sizes = _export_cell_sizes()
    counts = sorted(n for n, _ in sizes)
    median = counts[len(counts) // 2]
    print(f"\n{len(sizes)} export cells: median {median} lines, largest {max(sizes)[0]} ({max(sizes)[1]})")
    assert max(sizes)[0] < 60, max(sizes)
    assert median < 15


def test_notebooks_name_their_kernel():
    "JupyterLab opens every notebook on the project's kernel without asking for one."
    nbs = [p for p in (PKG.parent / "nbs").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts]
    missing = [str(p.relative_to(PKG.parent)) for p in nbs if json.loads(p.read_text())["metadata"].get("kernelspec", {}).get("name")
               != "python3"]
    assert nbs and not missing, missing
