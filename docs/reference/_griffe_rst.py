"""A Griffe extension (mkdocs.yml loads it) that reads the package's docstrings as the site shows
them: Google-style sections in reStructuredText-flavoured prose, made Markdown here.

- ``:func:`~jaxsoftmax.cross_entropy``` and the other roles: a link when the target is on the
  site (a public name of ``jaxsoftmax``, or of ``jaxsoftmax.mlp``, ``.data``, ``.training``),
  code otherwise; a relative target (``:func:`train```) is looked up from the docstring's module.
- ``.. math::`` blocks: display math for pymdownx.arithmatex (MathJax draws it).
- Doctests: ``pycon`` code blocks (Markdown would read ``>>>`` as quotes and ``[a][b]`` as
  links; Google style parses doctests only in an ``Examples:`` section, these are ``Example:``).
- reST's ``text::`` before a literal block: ``text:``.
- Several parameters in one ``Args:`` item whose names wrap onto a second line: one line.
- ``from a import x as x`` marks ``x`` public, as it does for type checkers (PEP 484), so
  ``jaxsoftmax.training``'s page lists what that package re-exports.

The source is untouched: ``pytest --doctest-modules`` reads the docstrings as written.
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import griffe

_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc|py:\w+):`(~?)([\w.]+)`")
_MATH = re.compile(r"^(\s*)\.\. math::\s*$")
_PUBLIC_MODULES = ("mlp", "data", "training")


class RestToMarkdown(griffe.Extension):
    """The conversions of the module docstring, on every object of the loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        if pkg.name != "jaxsoftmax":
            return
        for module in _modules(pkg):
            _mark_redundant_aliases_public(module)
        on_site = _documented(pkg)
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = _markdown(obj.docstring.value, obj, pkg, on_site)


def _modules(module: griffe.Module):
    yield module
    for member in module.modules.values():
        if not member.is_alias:
            yield from _modules(member)


def _objects(obj):
    yield obj
    for member in obj.members.values():
        if not member.is_alias and (member.is_module or member.is_class or member.is_function):
            yield from _objects(member)
        elif not member.is_alias:
            yield member


def _mark_redundant_aliases_public(module: griffe.Module) -> None:
    if module.exports or module.filepath is None or isinstance(module.filepath, list):
        return
    tree = ast.parse(Path(module.filepath).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            for name in node.names:
                if name.asname == name.name and name.name in module.members:
                    module.members[name.name].public = True


def _documented(pkg: griffe.Module) -> dict[str, str]:
    """Each object on the site: its canonical path -> the identifier of its heading there."""
    on_site = {}
    for owner, names in [(pkg, pkg.exports or [])] + [
        (pkg[name], None) for name in _PUBLIC_MODULES if name in pkg.members
    ]:
        members = owner.members if names is None else {n: owner.members[n] for n in names}
        for name, member in members.items():
            if names is None and (not member.is_public or member.is_module):
                continue
            if not member.is_module and not member.has_docstrings:
                continue  # not rendered (show_if_no_docstring is off)
            try:
                canonical = member.final_target.path if member.is_alias else member.path
            except griffe.AliasResolutionError:
                continue
            on_site.setdefault(canonical, f"{owner.path}.{name}")
    for name in _PUBLIC_MODULES:
        on_site.setdefault(f"jaxsoftmax.{name}", f"jaxsoftmax.{name}")
    return on_site


def _target(path: str, obj, pkg: griffe.Module) -> str | None:
    """The canonical path of ``path`` as a role in ``obj``'s docstring names it, or None."""
    scopes, scope = [], obj  # the object, its module, the packages above (which re-export)
    while scope is not None and not path.startswith("jaxsoftmax."):
        scopes.append(scope.path)
        scope = scope.parent
    candidates = [f"{scope}.{path}" for scope in scopes] + [path]
    for candidate in candidates:
        if not candidate.startswith("jaxsoftmax."):
            continue
        try:
            found = pkg[candidate.removeprefix("jaxsoftmax.")]
            return found.final_target.path if found.is_alias else found.path
        except (KeyError, ValueError, griffe.AliasResolutionError):
            continue
    return None


def _markdown(text: str, obj, pkg: griffe.Module, on_site: dict[str, str]) -> str:
    def role(match: re.Match) -> str:
        short, path = match.group(1), match.group(2)
        shown = f"`{path.rsplit('.', 1)[-1] if short else path}`"
        identifier = on_site.get(_target(path, obj, pkg) or "")
        return f"[{shown}][{identifier}]" if identifier else shown

    lines = _math_blocks(text.splitlines())
    lines = _doctests_fenced(_grouped_names_joined(_literal_markers(lines)))
    return _ROLE.sub(role, "\n".join(lines))


def _math_blocks(lines: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(lines):
        match = _MATH.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent, body = match.group(1), []
        i += 1
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
        ):
            body.append(lines[i])
            i += 1
        tex = textwrap.dedent("\n".join(body)).strip("\n")
        out += [indent + "$$", *(indent + line for line in tex.splitlines()), indent + "$$", ""]
    return out


def _literal_markers(lines: list[str]) -> list[str]:
    """reST's ``text::`` before an indented literal block: ``text:`` (Markdown reads the
    indented block as code already); a ``::`` line alone goes."""
    out = []
    for line in lines:
        if line.rstrip().endswith("::") and not line.lstrip().startswith(".."):
            line = line.rstrip()[:-1]
            if not line.strip(":").strip():
                continue
        out.append(line)
    return out


def _doctests_fenced(lines: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(lines):
        if not lines[i].lstrip().startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        indent, block = lines[i][: len(lines[i]) - len(lines[i].lstrip())], []
        while i < len(lines) and lines[i].strip():
            block.append(lines[i])
            i += 1
        out += ["", indent + "```pycon", *block, indent + "```", ""]
    return out


def _grouped_names_joined(lines: list[str]) -> list[str]:
    """``a, b,`` / ``  c: text`` in an ``Args:`` section as one item line, ``a, b, c: text``
    (Google style has no item for several parameters; griffe reads them as one)."""
    out, section = [], None
    for line in lines:
        if line and not line[0].isspace():
            section = line.strip()
        previous = out[-1] if out else ""
        if (
            section in ("Args:", "Arguments:", "Parameters:")
            and previous.rstrip().endswith(",")
            and ":" not in previous
            and line.strip()
        ):
            out[-1] = previous.rstrip() + " " + line.strip()
        else:
            out.append(line)
    return out
