"""The package's shape: each folder is one layer, imports flow downwards only, no import cycles."""

import ast
import subprocess
import sys
from pathlib import Path

import ddpmlab

PKG = Path(ddpmlab.__file__).parent
# bottom to top; a module may import its own layer and the layers below it, never one above
LAYERS = [
    {"errors", "progress", "atomic"},
    {"diffusion"},
    {"config"},
    {"data"},
    {"models"},
    {"samplers"},
    {"io"},
    {"runs"},
    {"evaluate"},
    {"viz"},
    {"training"},
    {"demo"},  # the web page: a front end over runs, samplers and viz; cli imports it
    {"cli", "__main__"},
    {"checkpoint", "schedules"},  # re-exports of moved modules for users' scripts; nothing imports them
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        yield ".".join(parts), is_pkg, ast.parse(path.read_text(), str(path))


def _imported(name: str, is_pkg: bool, node) -> list:
    """The ddpmlab modules an import statement names (relative ones resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("ddpmlab")]
    if node.level:
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    return [mod] if mod.startswith("ddpmlab") else []


# optional or heavy packages that only the functions needing them import
HEAVY = ("gradio", "tensorboard", "matplotlib", "transformers", "diffusers", "sklearn", "mlxtend", "torchmetrics",
         "accelerate")
# the package and the library layers a script imports (the front ends, training and benchmarks may load more)
LIGHT = ("ddpmlab", "ddpmlab.diffusion", "ddpmlab.data", "ddpmlab.models", "ddpmlab.samplers", "ddpmlab.io.images",
         "ddpmlab.io.diffusers_bridge", "ddpmlab.viz", "ddpmlab.evaluate.nll")


def _heavy_modules_after(modules) -> dict:
    """{module: the HEAVY packages in sys.modules once it is imported}, importing ``modules`` in
    this order in one fresh interpreter."""
    code = ("import importlib, sys\n"
            f"for name in {list(modules)!r}:\n"
            "    importlib.import_module(name)\n"
            f"    print(name, *sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {line.split()[0]: line.split()[1:] for line in out.splitlines()}


def _private_imports() -> list:
    """``module:line name`` for each ``from ddpmlab.x import _name``: a module taking another's private name."""
    hits = []
    for name, is_pkg, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _imported(name, is_pkg, node):
                hits += [f"{name}:{node.lineno} {a.name}" for a in node.names
                         if a.name.startswith("_") and not a.name.startswith("__")]
    return hits


def _graph():
    modules = {name: (is_pkg, tree) for name, is_pkg, tree in _modules()}
    edges, local = {}, []
    for name, (is_pkg, tree) in modules.items():
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for mod in _imported(name, is_pkg, node):
                    # "from ddpmlab.x import y" where y is a module imports ddpmlab.x.y
                    subs = [f"{mod}.{a.name}" for a in getattr(node, "names", []) if f"{mod}.{a.name}" in modules]
                    targets.update(subs or [mod])
        edges[name] = {t for t in targets if t in modules and t != name}
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                local += [f"{name}:{n.lineno}" for n in ast.walk(fn)
                          if isinstance(n, (ast.Import, ast.ImportFrom)) and _imported(name, is_pkg, n)]
    return edges, local


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _cycles(edges) -> list:
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    return cycles


def _upward(edges) -> list:
    return [f"{m} -> {t}" for m, ts in edges.items() for t in ts
            if _layer(m) in RANK and _layer(t) in RANK and RANK[_layer(t)] > RANK[_layer(m)]]


def test_package_modules_import_no_cycle():
    assert _cycles(_graph()[0]) == []


def test_no_function_local_imports_of_the_package():
    _, local = _graph()
    assert local == []


def test_every_module_belongs_to_a_layer_and_imports_only_downwards():
    edges, _ = _graph()
    unknown = sorted({_layer(m) for m in edges} - set(RANK) - {"__init__"})
    assert unknown == [], "add new top-level modules or folders to LAYERS"
    assert _upward(edges) == []


def test_no_module_imports_another_modules_private_names():
    assert _private_imports() == [], "make the name public (no underscore) or move it where both modules use it"


def test_importing_the_package_and_its_library_layers_loads_no_heavy_optional_dependency():
    loaded = _heavy_modules_after([*LIGHT, "matplotlib.figure"])
    assert loaded == {**{m: [] for m in LIGHT}, "matplotlib.figure": ["matplotlib"]}  # the probe sees a loaded one


def test_the_old_module_paths_of_the_readme_still_work_and_nothing_inside_uses_them():
    from ddpmlab.checkpoint import load_model
    from ddpmlab.diffusion import schedules
    from ddpmlab.io import checkpoint
    from ddpmlab.samplers import SAMPLERS, ModelPredictor  # noqa: F401
    from ddpmlab.schedules import NoiseSchedule

    assert load_model is checkpoint.load_model and NoiseSchedule is schedules.NoiseSchedule
    edges, _ = _graph()
    assert [m for m, ts in edges.items() if {"ddpmlab.checkpoint", "ddpmlab.schedules"} & ts] == []


def test_the_check_finds_a_planted_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a package with a cycle and an upward import is caught."""
    pkg = tmp_path / "ddpmlab"
    (pkg / "diffusion").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "diffusion" / "__init__.py").write_text("")
    (pkg / "diffusion" / "a.py").write_text("from ddpmlab.diffusion import b\nfrom ddpmlab import cli\n")
    (pkg / "diffusion" / "b.py").write_text("from ddpmlab.diffusion.a import x\n\ndef f():\n    from ddpmlab import cli\n")
    (pkg / "cli.py").write_text("")
    (pkg / "viz.py").write_text("from ddpmlab.diffusion.a import _helper, __version__\nfrom .diffusion import _b\n")
    monkeypatch.setattr(f"{__name__}.PKG", pkg)
    edges, local = _graph()
    assert edges["ddpmlab.diffusion.a"] == {"ddpmlab.diffusion.b", "ddpmlab.cli"}
    assert local == ["ddpmlab.diffusion.b:4"]
    assert _cycles(edges) == ["ddpmlab.diffusion.a -> ddpmlab.diffusion.b -> ddpmlab.diffusion.a"]
    assert sorted(_upward(edges)) == ["ddpmlab.diffusion.a -> ddpmlab.cli", "ddpmlab.diffusion.b -> ddpmlab.cli"]
    assert _private_imports() == ["ddpmlab.viz:1 _helper", "ddpmlab.viz:2 _b"]
