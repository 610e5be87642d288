"""The package's shape: imports walk one way (no cycle, also through imports inside functions), the library is free of
absl flags outside the entry layer and of experiments/, the kernels depend on jax alone, no re-export shims."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("prosparse_jax", "pallas_kernels", "configs")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports, at module level or inside functions (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.append(base)
            out += [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
    return out


def _dynamic_imports(path: Path) -> list[str]:
    """Calls of importlib.import_module / __import__ (imports a static graph cannot see)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("import_module", "__import__"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


GRAPH = {m: sorted({i for i in _imports(p) if i in MODULES and i != m}) for m, p in MODULES.items()}


def test_no_import_cycle():
    sys.setrecursionlimit(10_000)
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def strongconnect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            # a package's __init__ importing its own modules is not a cycle of files
            if len([c for c in comp if MODULES[c].name != "__init__.py"]) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            strongconnect(v)
    assert cycles == []


def test_no_dynamic_imports_in_the_library():
    found = [hit for m, p in MODULES.items() if not m.startswith("configs") for hit in _dynamic_imports(p)]
    assert found == []


@pytest.mark.parametrize("forbidden", ["experiments", "tests", "conftest"])
def test_library_never_imports_scripts_or_tests(forbidden):
    bad = [m for m in MODULES for i in _imports(MODULES[m]) if i == forbidden or i.startswith(forbidden + ".")]
    assert bad == []


def test_absl_flags_only_in_the_entry_layer():
    flag_modules = ("absl.flags", "ml_collections.config_flags")
    bad = [m for m, p in MODULES.items() if not m.startswith("prosparse_jax.main")
           and any(i in flag_modules or (i == "absl" and "flags" in p.read_text()) for i in _imports(p))]
    assert bad == []


def test_kernels_import_jax_and_the_standard_library_only():
    allowed = {"jax", "jaxlib", "numpy", "pallas_kernels", *sys.stdlib_module_names}
    bad = {m: i for m in MODULES if m.startswith("pallas_kernels")
           for i in _imports(MODULES[m]) if i and i.split(".")[0] not in allowed}
    assert bad == {}


def test_no_reexport_shims():
    bad = [f"{p.relative_to(ROOT)}:{n}" for m, p in MODULES.items() if m.startswith("prosparse_jax")
           for n, line in enumerate(p.read_text().splitlines(), 1) if "__all__" in line or "noqa: F401" in line]
    assert bad == []
