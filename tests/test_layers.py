"""The package's layering, held: module and function sizes, private names, import cycles.

The figures of the layers issue (docs/architecture.md): no module over 400 lines; at most
five function bodies over 40 lines (docstring excluded) and none over 60; no module using
another module's ``_private`` names; no import cycle; no experiment importing a private
part of the package; the rule a learner reads (``core/rule.py``) at most 200 lines with its
custom rule in its first 100. Each measure is also run on a small made-up package that
breaks it, so that a measure that could never fail is caught too.
"""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxsoftmax"
EXPERIMENTS = ROOT / "experiments"


def modules(package: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module of ``package`` (a folder)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def body_length(node) -> int:
    """A function's lines from its first statement after the docstring to its end."""
    body = node.body
    first = body[0]
    if len(body) > 1 and isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        first = body[1]
    return node.end_lineno - first.lineno + 1


def function_lengths(files) -> list[tuple[int, str]]:
    lengths = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths.append((body_length(node), f"{path.name}:{node.lineno} {node.name}"))
    return sorted(lengths, reverse=True)


def imported(name: str, path: pathlib.Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` in module ``name`` (file ``path``) names."""
    if not node.level:
        return node.module or ""
    base = name.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(found: dict[str, pathlib.Path]):
    """``(edges, private uses)``: which modules each module imports, and every use of
    another module's ``_private`` name (imported by name, or as ``module._name``)."""
    edges, private = {name: set() for name in found}, []
    for name, path in found.items():
        tree, aliases = ast.parse(path.read_text(encoding="utf-8")), {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = imported(name, path, node)
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    if full in found:
                        edges[name].add(full)
                        aliases[alias.asname or alias.name] = full
                    elif source in found:
                        edges[name].add(source)
                        if alias.name.startswith("_") and source != name:
                            private.append(f"{path.name}: {source}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in found:
                        edges[name].add(alias.name)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and aliases.get(node.value.id, name) != name
                    and re.fullmatch(r"_[^_].*", node.attr)):  # fmt: skip
                private.append(f"{path.name}: {node.value.id}.{node.attr}")
    return edges, private


def cycles(found: dict[str, pathlib.Path], edges) -> list[list[str]]:
    """Import cycles among modules (a package's ``__init__`` re-exports are left out)."""
    inits = {name for name, path in found.items() if path.name == "__init__.py"}
    graph = {n: {m for m in e if m not in inits and m != n} for n, e in edges.items()}
    found_cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found_cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state and node not in inits:
            visit(node, [node])
    return found_cycles


def private_imports_of(script_files, package_name: str) -> list[str]:
    """Imports of ``package_name``'s private modules or names by scripts."""
    found = []
    for path in script_files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == package_name and any(p.startswith("_") for p in parts[1:]):
                    found.append(f"{path.name}:{node.lineno} {name}")
    return found


def test_no_module_over_400_lines():
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= 400, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_functions_are_short():
    lengths = function_lengths(PACKAGE.rglob("*.py"))
    over = [entry for entry in lengths if entry[0] > 40]
    assert len(over) <= 5, over
    assert lengths[0][0] <= 60, lengths[0]


def test_no_module_uses_another_modules_private_names():
    _, private = import_graph(modules(PACKAGE))
    assert private == []


def test_no_import_cycles():
    found = modules(PACKAGE)
    assert cycles(found, import_graph(found)[0]) == []


def test_experiments_import_no_private_part_of_the_package():
    assert private_imports_of(EXPERIMENTS.rglob("*.py"), "jaxsoftmax") == []


def test_the_rule_module_is_short_with_its_custom_rule_first():
    lines = (PACKAGE / "core" / "rule.py").read_text(encoding="utf-8").splitlines()
    first = next(
        i + 1 for i, line in enumerate(lines)
        if re.search(r"custom_(vjp|jvp)", line) and not line.lstrip().startswith(("#", "from", "import"))
    )  # fmt: skip
    assert len(lines) <= 200 and first <= 100, (len(lines), first)


@pytest.fixture
def broken_package(tmp_path):
    """A made-up package that breaks every measure once."""
    package = tmp_path / "toy"
    (package / "inner").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "inner" / "__init__.py").write_text("")
    (package / "a.py").write_text("from toy import b\nfrom toy.b import _hidden\nx = b._other\n")
    (package / "b.py").write_text("from toy.inner import c\n_hidden = 1\n_other = 2\n")
    long_body = "\n".join(f"    x{i} = {i}" for i in range(61))
    (package / "inner" / "c.py").write_text(
        f"from toy import b\n\ndef f():\n    '''doc'''\n{long_body}\n"
    )
    script = tmp_path / "script.py"
    script.write_text("from toy._secret import thing\nimport toy._other\n")
    return package, script


def test_each_measure_catches_a_package_that_breaks_it(broken_package):
    package, script = broken_package
    found = modules(package)
    edges, private = import_graph(found)
    assert sorted(private) == ["a.py: b._other", "a.py: toy.b._hidden"]
    assert cycles(found, edges) == [["toy.b", "toy.inner.c", "toy.b"]]
    assert function_lengths(package.rglob("*.py"))[0][0] == 61
    assert private_imports_of([script], "toy") == [
        "script.py:1 toy._secret",
        "script.py:1 toy._secret.thing",
        "script.py:2 toy._other",
    ]
