"""Makes an environment that borrows another's site-packages (.ci/check_wheel) behave as a fresh
one holding jaxsoftmax's wheel and its requirements only: an import of a module that the
borrowed site-packages holds for a distribution outside the wheel's requirements (direct or
through its dependencies) fails as if that distribution were not installed. So an import the
package does not declare fails, and the dependencies' optional imports (JAX tries cloudpickle,
filelock, pygments) take the paths they take in a fresh environment. check_wheel copies this
file into the new environment's site-packages and its .pth file calls install().
"""

import importlib.abc
import importlib.metadata
import re
import sys


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def required(name: str = "jaxsoftmax") -> set[str]:
    """The canonical names of ``name``'s distribution and everything it requires, recursively
    (extras only where a requirement asks for them; markers evaluated here)."""
    from packaging.requirements import Requirement

    seen, todo = set(), [(name, "")]
    while todo:
        name, extra = todo.pop()
        if (_canonical(name), extra) in seen:
            continue
        seen.add((_canonical(name), extra))
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for requirement in map(Requirement, requirements):
            if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
                todo += [(requirement.name, e) for e in ("", *requirement.extras)]
    return {name for name, _ in seen}


class _Hidden(importlib.abc.MetaPathFinder):
    def __init__(self, hidden: dict[str, set[str]]):
        self.hidden = hidden

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top in self.hidden:
            raise ModuleNotFoundError(
                f"No module named {fullname!r} ({', '.join(sorted(self.hidden[top]))} is not a "
                "requirement of jaxsoftmax's wheel: .ci/only_required.py hides it)",
                name=fullname,
            )
        return None


_finder = None
allowed: set[str] = set()  # the wheel's requirements, once install() ran


def install() -> None:
    """Hides what the wheel does not require (once: a venv's site-packages may be read twice,
    as lib/ and as its lib64/ link)."""
    global _finder
    if _finder is not None:
        return
    allowed.update(required())
    for module in [m for m in sys.modules if m.partition(".")[0] == "packaging"]:
        if "packaging" not in allowed:
            del sys.modules[module]  # imported above to read the markers, not by the package
    hidden = {}
    for top, owners in importlib.metadata.packages_distributions().items():
        owners = {_canonical(owner) for owner in owners}
        if not owners & allowed:
            hidden[top] = owners
    _finder = _Hidden(hidden)
    sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
