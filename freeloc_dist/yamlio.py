"""The one YAML reader of every user file (render configs, profiles, probing settings).

PyYAML's safe loader constructs no objects, but it still expands aliases: a 1.7 KB file of nested
`*a` references expands into billions of nodes and ran 28.6 s before a MemoryError. Configs never need
aliases, so any alias is refused while the file is composed (before anything is expanded), which bounds the
work by the file's size. A key given twice in one mapping is refused too (PyYAML keeps the last silently).
Errors are yaml.MarkedYAMLError, so callers report them with their line like any syntax error.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError


class StrictLoader(yaml.SafeLoader):
    """SafeLoader without aliases and without duplicate keys."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ComposerError(None, None, "aliases (*name) are not allowed", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    key = (key_node.tag, key_node.value)
                    if key in seen:
                        raise ConstructorError(None, None, f"duplicate key {key_node.value!r}",
                                               key_node.start_mark)
                    seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """Parse YAML text like yaml.safe_load, refusing aliases and duplicate keys."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506  (a SafeLoader subclass)


def read_yaml_file(path, what: str, error: type[Exception]) -> Any:
    """The parsed YAML of a user file; every problem is `error("<what> <path>: ...")`, one line: not found,
    unreadable (a directory, permissions, not UTF-8), invalid YAML."""
    import os

    path = os.fspath(path)
    if not os.path.isfile(path) and not os.path.isdir(path):
        raise error(f"{what} {path}: file not found")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{what} {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    try:
        return load_yaml(text)
    except yaml.YAMLError as e:
        raise error(f"{what} {path}: not valid YAML{yaml_problem(e)}") from None


def yaml_problem(e: yaml.YAMLError) -> str:
    """' at line N: problem' (or ': syntax error') for a one-line message."""
    mark = getattr(e, "problem_mark", None)
    at = f" at line {mark.line + 1}" if mark is not None else ""
    return f"{at}: {getattr(e, 'problem', None) or 'syntax error'}"
