"""The package's import graph, read from the source (``ast``, lazy imports inside functions
included): imports only point down the layers of ``LAYERS``, no two modules import each other
through any chain, and no private name crosses a package boundary. The layering is documented in
docs/design.md ("Layers")."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "qnopt"

# Lowest first. A module may import from its own package or from a package in a lower layer.
LAYERS = (
    ("base", "losses", "data", "sharding"),
    ("linalg",),
    ("damping",),
    ("curvature",),
    ("preconditioners", "trust_region", "capture", "contract"),
    ("methods",),
    ("alias", "training"),
    ("testing",),
    ("qnopt",),        # the package's __init__: the public API
    ("bench",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _module_name(path: pathlib.Path) -> str:
    parts = ("qnopt",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = pathlib.Path(*name.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists()


def _imports():
    """``{module: [(target module, imported name or None, line)]}`` over every qnopt module."""
    graph = {}
    for path in sorted(ROOT.rglob("*.py")):
        module = _module_name(path)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        edges = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "qnopt"]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "qnopt":
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    # ``from pkg import submodule`` depends on the submodule, not on pkg's __init__
                    edges.append((sub, None, node.lineno) if _is_module(sub) else (target, alias.name, node.lineno))
        graph[module] = edges
    return graph


GRAPH = _imports()


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "qnopt"


def test_every_package_has_a_layer():
    missing = sorted({_layer(m) for m in GRAPH} - set(RANK))
    assert not missing, f"add {missing} to LAYERS (and to docs/design.md, 'Layers')"


def test_imports_only_point_down():
    upward = [f"{m}:{line} imports {t} ({_layer(t)} is not below {_layer(m)})"
              for m, edges in GRAPH.items() for t, _, line in edges
              if _layer(t) != _layer(m) and RANK[_layer(t)] >= RANK[_layer(m)]]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    deps = {m: sorted({t for t, _, _ in edges if t in GRAPH and t != m}) for m, edges in GRAPH.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in deps[m]:
            if state.get(t) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(deps):
        if m not in state:
            visit(m)


def test_no_private_name_crosses_a_package():
    leaks = [f"{m}:{line} imports {name!r} from {t}"
             for m, edges in GRAPH.items() for t, name, line in edges
             if _layer(t) != _layer(m) and (
                 (name is not None and name.startswith("_") and not name.startswith("__"))
                 or any(p.startswith("_") and not p.startswith("__") for p in t.split(".")))]
    assert not leaks, "\n".join(leaks)


def test_the_checks_can_fail():
    """The graph the checks read is the real one: known edges are in it."""
    targets = {t for t, _, _ in GRAPH["qnopt.methods.kbfgs"]}
    assert "qnopt.methods._kron" in targets and "qnopt.damping" in targets
    assert ("qnopt.losses", "get_loss") in {(t, n) for t, n, _ in GRAPH["qnopt.curvature.products"]}
