"""MkDocs hook: a public object the API reference shows without a docstring is
a warning, so `mkdocs build --strict` fails on it.

mkdocstrings leaves an undocumented member out of the page without a word;
this hook names it instead. It reads every `::: identifier` of the pages,
loads the object with griffe (statically: no backend is imported), and checks
the object and its public members: functions, properties and classes need a
docstring; a data attribute needs one or an entry in its class's
`Attributes:` section.
"""

import logging
import pathlib
import re

import griffe

log = logging.getLogger("mkdocs.hooks.public_docstrings")
_IDENTIFIER = re.compile(r"^:::\s+([\w.]+)", re.MULTILINE)


def _undocumented(obj):
    """The paths of `obj` and of its public members that lack a docstring."""
    obj = obj.final_target if obj.is_alias else obj
    missing = [] if obj.docstring else [obj.path]
    if not obj.is_class:
        return missing
    described = set()  # the names in the class docstring's Attributes: section
    if obj.docstring:
        for section in obj.docstring.parse("google", warn_missing_types=False, returns_multiple_items=False):
            if section.kind.value == "attributes":
                described.update(attribute.name for attribute in section.value)
    for name, member in obj.members.items():
        if name.startswith("_") or member.is_alias:
            continue
        if member.docstring:
            continue
        data = member.is_attribute and "property" not in member.labels
        if data and name in described:
            continue
        missing.append(member.path)
    return missing


def on_files(files, config):
    """Checks every object named by a `:::` line of the pages."""
    root = pathlib.Path(config["config_file_path"]).parent  # mkdocstrings' `paths: ["."]`
    loader = griffe.GriffeLoader(search_paths=[str(root)])
    packages = {}
    for page in sorted(pathlib.Path(config["docs_dir"]).rglob("*.md")):
        for identifier in _IDENTIFIER.findall(page.read_text()):
            package, _, rest = identifier.partition(".")
            if package not in packages:
                packages[package] = loader.load(package)
            obj = packages[package][rest] if rest else packages[package]
            for path in _undocumented(obj):
                log.warning(f"{page.name}: {path} has no docstring: the API reference would leave it out")
    return files
