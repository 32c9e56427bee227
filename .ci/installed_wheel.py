"""The checks of the built package, run by .ci/check_wheel with the Python of a new virtual
environment that holds the installed wheel alone (its dependencies come from the environment
that built it, on the path after its own site-packages, with what the wheel does not require
hidden: .ci/only_required.py), from outside the source tree.

Usage: python installed_wheel.py ROOT WHEEL SDIST
"""

import importlib.metadata
import pathlib
import re
import sys
import sysconfig

import jaxsoftmax  # first, so that what it imports is told apart from what this script does

imported = set(sys.modules)

import os  # noqa: E402
import tarfile  # noqa: E402
import tomllib  # noqa: E402
import zipfile  # noqa: E402

root, wheel, sdist = (pathlib.Path(arg) for arg in sys.argv[1:4])
project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
site_packages = pathlib.Path(sysconfig.get_paths()["purelib"]).resolve()


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# The wheel: the package's files and its metadata, nothing else (no tests, no experiments).
names = zipfile.ZipFile(wheel).namelist()
dist_info = f"jaxsoftmax-{project['version']}.dist-info/"
assert all(n.startswith(("jaxsoftmax/", dist_info)) for n in names), names
source = sorted(
    path.relative_to(root).as_posix()
    for path in (root / "jaxsoftmax").rglob("*")
    if path.is_file() and "__pycache__" not in path.parts
)
packaged = sorted(n for n in names if n.startswith("jaxsoftmax/"))
assert packaged == source, f"in the wheel only: {set(packaged) - set(source)}; " + (
    f"in jaxsoftmax/ only: {set(source) - set(packaged)}"
)
assert "jaxsoftmax/py.typed" in names
assert not [n for n in packaged if re.search(r"(^|/)(test_\w*|conftest)\.py$", n)]

# The sdist: what builds the wheel (MANIFEST.in), under one folder.
top = f"jaxsoftmax-{project['version']}"
with tarfile.open(sdist) as archive:
    entries = {m.name.removeprefix(top + "/").split("/")[0] for m in archive.getmembers()}
allowed = {top, "PKG-INFO", "README.md", "pyproject.toml", "setup.cfg", "MANIFEST.in",
           "jaxsoftmax", "jaxsoftmax.egg-info", "LICENSE"}  # fmt: skip
assert entries <= allowed, f"unexpected in the sdist: {sorted(entries - allowed)}"

# The installed package: this environment's, its version the metadata's, typed.
location = pathlib.Path(jaxsoftmax.__file__).resolve()
assert location.is_relative_to(site_packages), f"imported {location}, not the installed wheel"
distribution = importlib.metadata.distribution("jaxsoftmax")
assert pathlib.Path(distribution.locate_file("")).resolve() == site_packages
assert jaxsoftmax.__version__ == distribution.version == project["version"], (
    jaxsoftmax.__version__,
    distribution.version,
    project["version"],
)
assert (location.parent / "py.typed").is_file()

# What `import jaxsoftmax` imported comes from the standard library or from a distribution the
# wheel requires (.ci/only_required.py hid the others from this environment: here it checks
# that it did).
import _only_required  # noqa: E402

allowed_distributions = _only_required.allowed
assert "jax" in allowed_distributions, "the .pth file did not run .ci/only_required.py"
standard = {pathlib.Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib")}
distributions = importlib.metadata.packages_distributions()
undeclared, used = {}, set()
for module in sorted(imported - {"__main__", "_only_required"}):
    file = getattr(sys.modules[module], "__file__", None)
    if file is None or any(pathlib.Path(file).resolve().is_relative_to(s) for s in standard):
        continue
    top_level = module.split(".")[0]
    owners = {canonical(d) for d in distributions.get(top_level, [])}
    used |= owners & allowed_distributions
    if not owners & allowed_distributions:
        undeclared.setdefault(top_level, owners or {"no distribution"})
assert not undeclared, f"import jaxsoftmax imported undeclared distributions: {undeclared}"
_only_required.uninstall()  # for this process's next import, pytest's (test_readme.py)

# The README's library examples, each run alone by tests/test_readme.py's runner, in a child
# Python of this environment without the source tree on its path.
sys.path.insert(0, str(root / "tests"))
import test_readme  # noqa: E402


def environment(devices=None, **extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    env.pop("PYTHONPATH", None)
    return env


test_readme.child_process.environment = environment
where = (
    "import pathlib, sysconfig, jaxsoftmax\n"
    "site = pathlib.Path(sysconfig.get_paths()['purelib']).resolve()\n"
    "assert pathlib.Path(jaxsoftmax.__file__).resolve().is_relative_to(site), jaxsoftmax.__file__\n"
)
blocks = test_readme.python_blocks()
runs = test_readme.run_alone((where, *blocks))
for index, (printed, error, _) in enumerate(runs):
    assert error is None, f"README block {index - 1} against the wheel:\n{error[-3000:]}"
    assert index == 0 or re.match(r"loss -?\d+\.\d{4}", printed), (index - 1, printed)

print(
    f"{wheel.name}: {wheel.stat().st_size / 1024:.0f} KiB, {len(names)} files "
    f"({len(packaged)} in jaxsoftmax/); {sdist.name}: {sdist.stat().st_size / 1024:.0f} KiB. "
    f"Installed: version {jaxsoftmax.__version__}, py.typed, imports only its requirements "
    f"({', '.join(sorted(used))}); the README's {len(blocks)} examples ran against it."
)
