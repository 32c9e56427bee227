"""MkDocs hooks (mkdocs.yml loads them):

- every name ``jaxsoftmax.__all__`` lists has a ``::: jaxsoftmax.NAME`` entry on a page of
  docs/reference/, or the build warns (and a strict build, the default in mkdocs.yml, fails)
  naming what is missing;
- a guide, docs/*.md, that the navigation does not list yet joins the end of its Guides;
- a guide's link to a file of the repository outside docs/ becomes that file's name on the site.
"""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.reference")


def on_config(config, **kwargs):
    """docs/*.md missing from the navigation's "Guides" section, appended to it in name order."""
    guides = next((entry["Guides"] for entry in config["nav"] or [] if "Guides" in entry), None)
    if guides is None:
        return config
    listed = set(re.findall(r"[\w./-]+\.md", repr(config["nav"])))
    for page in sorted(Path(config["docs_dir"]).glob("*.md")):
        if page.name not in listed:
            guides.append(page.name)
            log.info("docs/%s is not in mkdocs.yml's nav: listed at the end of Guides", page.name)
    return config


def on_files(files, config, **kwargs):
    root = Path(config["config_file_path"]).parent
    tree = ast.parse((root / "jaxsoftmax" / "__init__.py").read_text(encoding="utf-8"))
    exported = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(getattr(t, "id", None) == "__all__" for t in node.targets)
    )
    documented = set()
    for page in (Path(config["docs_dir"]) / "reference").glob("*.md"):
        documented |= set(re.findall(r"^::: jaxsoftmax\.(\w+)\s*$", page.read_text(), re.MULTILINE))
    missing = sorted(set(exported) - documented)
    if missing:
        log.warning(
            "public names of jaxsoftmax/__init__.py with no reference entry: %s; add "
            "'::: jaxsoftmax.NAME' to the page of their group in docs/reference/",
            ", ".join(missing),
        )
    return files


_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s#]+)(#[^)\s]*)?\)")


def on_page_markdown(markdown, page, config, files, **kwargs):
    """A guide's link to a file of the repository outside docs/ (a benchmark's results) works
    where the guides are read on a forge but is not on the site: there it becomes the link's
    text naming the file, and a link to a file that does not exist warns (strict: fails)."""
    docs = Path(config["docs_dir"]).resolve()
    root = Path(config["config_file_path"]).resolve().parent
    page_dir = (docs / page.file.src_path).parent

    def outside_docs(match):
        text, target = match.group(1), match.group(2)
        if "://" in target or target.startswith(("/", "mailto:")):
            return match.group(0)
        path = (page_dir / target).resolve()
        if path.is_relative_to(docs) or not path.is_relative_to(root):
            return match.group(0)  # mkdocs checks links inside docs/
        relative = path.relative_to(root).as_posix()
        if not path.exists():
            log.warning("%s links to %s, which does not exist", page.file.src_path, relative)
        return text if relative in text or text.strip("`") in relative else f"{text} (`{relative}`)"

    return _LINK.sub(outside_docs, markdown)
