"""The package's import graph: no cycles (function-level imports included), every module imports on
its own in a fresh interpreter, and the runtime path never loads the test fixtures (issue 20)."""

import ast
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "adsc_ext"


def _modules():
    """``{dotted name: (path, is_package)}`` of every module of adsc_ext."""
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


MODULES = _modules()


def _targets(module, is_pkg, node):
    """The adsc_ext modules an import statement of ``module`` loads (a submodule where a name is one)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "adsc_ext"]
    if node.level:
        base = module.split(".")[: len(module.split(".")) - (0 if is_pkg else 1)]
        base = base[: len(base) - (node.level - 1)]
        src = ".".join(base + ([node.module] if node.module else []))
    else:
        src = node.module or ""
    if src.split(".")[0] != "adsc_ext":
        return []
    return [f"{src}.{a.name}" if f"{src}.{a.name}" in MODULES else src for a in node.names]


def import_graph():
    """``{module: set of modules it imports}``, from every import statement (function-level too);
    a module's own parent packages are left out (Python runs them first whatever the order)."""
    graph = {}
    for name, (path, is_pkg) in MODULES.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for t in _targets(name, is_pkg, node):
                    while t not in MODULES:
                        t = t.rsplit(".", 1)[0]
                    if t != name and not name.startswith(t + "."):
                        deps.add(t)
        graph[name] = deps
    return graph


def cycles(graph):
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert "adsc_ext.bench.suite" in graph and graph["adsc_ext.bench.cli"] >= {"adsc_ext.bench.suite"}
    assert cycles(graph) == []


# Modules whose third-party dependency is optional: imported alone only where it is installed.
_OPTIONAL = {"adsc_ext.integrations.vllm": "vllm", "adsc_ext.integrations.lmms_eval.model": "lmms_eval"}
_RUNTIME = ["adsc_ext.hf", "adsc_ext.hf.llava", "adsc_ext.runtime", "adsc_ext.export.runner",
            "adsc_ext.export.trt_runner", "adsc_ext.export.onnx_graphs", "adsc_ext.baselines", "adsc_ext.models",
            "adsc_ext.layout", "adsc_ext.generation", "adsc_ext.train"]


def _importable(name):
    for prefix, dep in _OPTIONAL.items():
        if (name == prefix or name.startswith(prefix + ".")) and importlib.util.find_spec(dep) is None:
            return False
    return not name.endswith("__main__")


def test_every_module_imports_alone_and_the_runtime_never_loads_the_fixtures():
    """One fresh interpreter per module: a parent process imports the third-party libraries once
    and forks a child per adsc_ext module, which imports only that module (so an order-dependent
    import of the package fails here). A second set of children imports the runtime's modules
    and checks that ``adsc_ext.testing`` was not loaded."""
    names = [n for n in MODULES if _importable(n)]
    script = textwrap.dedent(f"""
        import os, sys, traceback
        import torch, transformers  # third party, shared by the children
        try:
            import onnx, onnxscript, onnxruntime  # noqa: F401
        except ImportError:
            pass
        failures = []

        def child(fn):
            pid = os.fork()
            if pid == 0:
                try:
                    fn()
                except BaseException:
                    traceback.print_exc()
                    os._exit(1)
                os._exit(0)
            return os.waitpid(pid, 0)[1] == 0

        def alone(name):
            import importlib
            importlib.import_module(name)

        def no_fixtures(name):
            import importlib
            importlib.import_module(name)
            loaded = sorted(m for m in sys.modules if m.startswith("adsc_ext.testing"))
            assert not loaded, f"importing {{name}} loaded {{loaded}}"

        for name in {names!r}:
            if not child(lambda: alone(name)):
                failures.append("alone: " + name)
        for name in {_RUNTIME!r}:
            if not child(lambda: no_fixtures(name)):
                failures.append("fixtures: " + name)
        print("FAILURES", failures)
        sys.exit(1 if failures else 0)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert "FAILURES []" in res.stdout


@pytest.mark.parametrize("module", ["adsc_ext.bench", "adsc_ext.bench.cli", "adsc_ext.bench.suite"])
def test_bench_modules_import_no_cli(module):
    """The bench package does not import the ``adsc`` command line (its old cycle)."""
    graph = import_graph()
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph[m]
    assert "adsc_ext.cli" not in seen


def test_apply_and_remove_are_both_top_level():
    """remove_adsc is documented beside apply_adsc: both import from adsc_ext (lazily)."""
    pytest.importorskip("transformers")
    import adsc_ext
    from adsc_ext import hf

    assert adsc_ext.apply_adsc is hf.apply_adsc and adsc_ext.remove_adsc is hf.remove_adsc
    assert {"apply_adsc", "remove_adsc"} <= set(adsc_ext.__all__)
