"""Strict YAML for configs: UTF-8 text only, and no key given twice in one mapping.

PyYAML keeps the last of two equal keys, so a second ``train:`` section would silently replace
the first one's settings. :func:`parse_yaml` refuses that, naming the key's dotted path and both
lines; :func:`decode_utf8` names the first byte that is not UTF-8. Both raise plain exceptions
that :mod:`clpd_ray.config` turns into a ``ConfigError`` naming the file or ``--set`` item.
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["DuplicateKeyError", "NotUtf8Error", "decode_utf8", "parse_yaml"]

_MERGE_TAG = "tag:yaml.org,2002:merge"  # `<<: *anchor`: keys from it may be overridden


class DuplicateKeyError(Exception):
    """A mapping gives ``key`` (a dotted path from the top) twice, at 1-based lines."""

    def __init__(self, key: str, first_line: int, second_line: int) -> None:
        super().__init__(f"key {key!r} appears twice (lines {first_line} and {second_line})")
        self.key = key
        self.first_line = first_line
        self.second_line = second_line


class NotUtf8Error(Exception):
    """Bytes that are not UTF-8: the first bad byte, its 0-based offset, 1-based line/column."""

    def __init__(self, byte: int, position: int, line: int, column: int) -> None:
        super().__init__(
            f"byte 0x{byte:02x} at byte position {position} (line {line}, column {column})"
        )
        self.byte = byte
        self.position = position
        self.line = line
        self.column = column


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that checks the composed document for duplicated keys before building it."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _check_unique_keys(node, (), set())
        return self.construct_document(node)


def _check_unique_keys(node: yaml.Node, path: tuple[str, ...], seen: set[int]) -> None:
    if id(node) in seen:  # an alias of a node already checked (or a recursive one)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                _check_unique_keys(value_node, path, seen)
                continue
            here = (*path, str(key_node.value))
            key = (key_node.tag, key_node.value)
            line = key_node.start_mark.line + 1
            if key in first:
                raise DuplicateKeyError(".".join(here), first[key], line)
            first[key] = line
            _check_unique_keys(value_node, here, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, (*path, str(i)), seen)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load(text)``, but a key given twice in a mapping raises DuplicateKeyError."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def decode_utf8(data: bytes) -> str:
    """``data`` as UTF-8 text (a leading byte-order mark is dropped), else NotUtf8Error."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        before = data[: err.start]
        line = before.count(b"\n") + 1
        column = err.start - (before.rfind(b"\n") + 1) + 1
        raise NotUtf8Error(data[err.start], err.start, line, column) from None
