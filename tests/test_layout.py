"""The package's layout: ``dab_detr.layers`` and ``dab_detr.modeling`` (but ``meta_arch``) are
plain PyTorch that import without Detectron2, and no module of the package imports itself
back through a cycle."""

import ast
import os
import subprocess
import sys
from typing import Dict, List, Set

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "dab_detr")


def _module_name(path: str) -> str:
    """``dab_detr/modeling/matcher.py`` -> ``dab_detr.modeling.matcher`` (``__init__.py`` ->
    its package)."""
    rel = os.path.relpath(path, REPO)[: -len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _package_modules() -> Dict[str, str]:
    """``{module name: file}`` of every module of ``dab_detr``."""
    modules = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                modules[_module_name(path)] = path
    return modules


def _imports(name: str, path: str, known: Set[str]) -> Set[str]:
    """The package modules that module ``name`` imports, at module level or inside functions.

    ``from . import x`` and ``from .pkg import x`` count as importing ``pkg.x`` when that is a
    module, else ``pkg``. A module also depends on its parent packages (Python runs their
    ``__init__`` first), which the cycle search adds itself."""
    is_package = path.endswith("__init__.py")
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[: len(base) - node.level + 1]
                module = ".".join(parent + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target in known:
                found.add(target)
    return found - {name}


def _graph() -> Dict[str, Set[str]]:
    modules = _package_modules()
    known = set(modules)
    graph = {name: _imports(name, path, known) for name, path in modules.items()}
    for name in graph:  # importing a.b.c runs a and a.b first
        parts = name.split(".")
        graph[name] |= {".".join(parts[:i]) for i in range(1, len(parts))} & known
    return graph


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle among the modules, as a list of names, or [] if there is none.

    A package's ``__init__`` importing its own submodules is no cycle (the submodule's
    dependency on its parent package is satisfied by the partly initialised package), so
    edges from a module to its own ancestors are left out here."""

    def is_ancestor(a: str, b: str) -> bool:
        return b.startswith(a + ".")

    edges = {n: {m for m in deps if not is_ancestor(m, n)} for n, deps in graph.items()}
    state: Dict[str, int] = {}  # 1: on the stack, 2: done
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_import_graph_sees_the_packages_own_imports():
    """The walker finds the imports that the checks below rely on (else they pass vacuously)."""
    graph = _graph()
    assert "dab_detr.modeling.matcher" in graph["dab_detr.modeling.criterion"]
    assert "dab_detr.layers" in graph["dab_detr.modeling.transformer.decoder"]
    assert "dab_detr.checkpoint.conversion" in graph["dab_detr.checkpoint.checkpointer"]
    assert "dab_detr.modeling.meta_arch" in graph["dab_detr"]
    assert len(graph) >= 40


def test_cycle_search_finds_a_cycle():
    graph = {"p": set(), "p.a": {"p", "p.b"}, "p.b": {"p", "p.c"}, "p.c": {"p", "p.a"}}
    assert _cycle(graph) == ["p.a", "p.b", "p.c", "p.a"]
    graph["p.c"] = {"p"}
    assert _cycle(graph) == []


def test_no_import_cycle_in_the_package():
    assert _cycle(_graph()) == []


def _plain_pytorch_modules() -> List[str]:
    names = _package_modules()
    return sorted(
        n for n in names
        if n.startswith(("dab_detr.layers", "dab_detr.modeling"))
        and not n.startswith("dab_detr.modeling.meta_arch")
    )


def test_plain_pytorch_modules_need_no_detectron2():
    """Every module of ``dab_detr.layers`` and ``dab_detr.modeling`` (but ``meta_arch``) imports
    in an interpreter where ``import detectron2`` fails, and builds a model there."""
    modules = _plain_pytorch_modules()
    assert "dab_detr.modeling.transformer.decoder" in modules
    assert "dab_detr.layers.ms_deform_attn" in modules
    code = "\n".join([
        "import importlib, sys",
        "sys.modules['detectron2'] = None  # any import of detectron2 now raises ImportError",
        "try:",
        "    import detectron2",
        "except ImportError:",
        "    pass",
        "else:",
        "    raise SystemExit('detectron2 could still be imported')",
        f"for name in {modules!r}:",
        "    importlib.import_module(name)",
        "assert not any(m.startswith('detectron2.') for m in sys.modules), 'detectron2 loaded'",
        "from dab_detr.modeling import DABTransformer",
        "import torch",
        "t = DABTransformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1,",
        "                   dim_feedforward=64)",
        "hs, refs = t(torch.randn(1, 32, 4, 5), torch.zeros(1, 4, 5, dtype=torch.bool),",
        "             torch.randn(7, 4), torch.randn(1, 32, 4, 5))",
        "assert hs.shape == (1, 1, 7, 32), hs.shape",
        "import dab_detr",
        "try:",
        "    dab_detr.add_dab_detr_config",
        "except ImportError as e:",
        "    assert 'needs Detectron2' in str(e), e",
        "else:",
        "    raise SystemExit('add_dab_detr_config without Detectron2')",
        "print('imported', len(" + repr(modules) + "))",
    ])
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"imported {len(modules)}" in result.stdout


@pytest.mark.parametrize("path", ["dab_detr/modeling/meta_arch", "dab_detr/config.py"])
def test_detectron2_modules_do_need_it(path):
    """The check above can fail: a module that imports Detectron2 does not import there."""
    name = _module_name(os.path.join(REPO, path, "__init__.py") if not path.endswith(".py")
                        else os.path.join(REPO, path))
    code = (
        "import importlib, sys\n"
        "sys.modules['detectron2'] = None\n"
        f"importlib.import_module({name!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert "detectron2" in result.stderr
