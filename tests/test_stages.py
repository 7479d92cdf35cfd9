"""The package's import graph follows its stage order (``hf_vae_compress.stages``).

Imports are read from the source (every ``import`` statement, at module level or inside a
function), so an import placed inside a function to dodge a cycle is seen too. A separate check
imports every module in a fresh interpreter.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from hf_vae_compress.stages import LAZY_IMPORTS, STAGES, stage_of

PACKAGE = Path(__file__).resolve().parent.parent / "hf_vae_compress"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The package modules an import statement loads, relative to the package ("" is the package)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".") if module else []
            if path.name != "__init__.py":
                base = base[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(["hf_vae_compress", *base])
            names = [f"{prefix}.{node.module}" if node.module else prefix]
        else:
            names = [node.module]
        names += [f"{names[0]}.{a.name}" for a in node.names]  # `from pkg import submodule`
    out = []
    for name in names:
        if name == "hf_vae_compress" or name.startswith("hf_vae_compress."):
            relative = name.removeprefix("hf_vae_compress").lstrip(".")
            if relative in MODULES:
                out.append(relative)
    return out


def _imports(module: str) -> list[tuple[str, bool]]:
    """(imported package module, whether the import sits inside a function) for every import."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((target, in_function) for target in _resolve(module, path, child))
            visit(child, nested)

    visit(tree, False)
    return [(target, lazy) for target, lazy in found if target != module]


def test_every_module_is_placed_in_a_stage():
    unplaced = []
    for module in MODULES:
        try:
            stage_of(module)
        except KeyError:
            unplaced.append(module)
    assert not unplaced, f"modules missing from hf_vae_compress.stages.STAGES: {unplaced}"
    placed = {m for _, modules in STAGES for m in modules}
    assert placed <= set(MODULES), f"STAGES names modules that do not exist: {sorted(placed - set(MODULES))}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_its_own_or_earlier_stages(module):
    own = stage_of(module)
    later = [(target, STAGES[stage_of(target)][0]) for target, _ in _imports(module) if stage_of(target) > own]
    assert not later, f"{module or 'hf_vae_compress'} ({STAGES[own][0]}) imports later stages: {later}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_package_import_inside_a_function(module):
    lazy = [target for target, inside in _imports(module) if inside and (module, target) not in LAZY_IMPORTS]
    assert not lazy, f"{module} imports {lazy} inside a function: move the import to the top, or the code to its stage"


def test_every_module_imports_in_a_fresh_interpreter():
    """One interpreter per module would take minutes (each loads torch); each module is imported
    on its own, in sorted order, in one fresh interpreter, and any failure is reported by name."""
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {sorted(MODULES)!r}:\n"
        "    try:\n"
        "        importlib.import_module('hf_vae_compress' + ('.' + name if name else ''))\n"
        "    except Exception as err:\n"
        "        failed.append(f'{name}: {err!r}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
