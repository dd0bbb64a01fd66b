"""Annotation lists in the VideoMAE format: one ``path label`` pair per line.

Paths are data, not code: every path is resolved against a configured root and must stay inside it,
so a list file cannot point the loader at arbitrary files on the machine.
"""

from __future__ import annotations

import os

__all__ = ["read_list", "resolve_under_root", "format_list_line"]


def resolve_under_root(path: str, root: str, *, where: str = "") -> str:
    """Return ``path`` as an absolute, normalised path that lies under ``root``.

    A relative ``path`` is joined to ``root``; an absolute one is accepted only if it is inside ``root``.
    The check is lexical (``..`` components are collapsed, symlinks are not followed) so a dataset
    folder that is itself a symlink to another disk keeps working.

    Raises:
        ValueError: the path escapes ``root``; ``where`` (e.g. ``"list.csv:12"``) is named in the message.
    """
    root_abs = os.path.abspath(root)
    candidate = path if os.path.isabs(path) else os.path.join(root_abs, path)
    candidate = os.path.normpath(candidate)
    prefix = f"{where}: " if where else ""
    try:
        inside = os.path.commonpath([root_abs, candidate]) == root_abs
    except ValueError:  # different drives on Windows
        inside = False
    if not inside:
        raise ValueError(
            f"{prefix}path {path!r} resolves to {candidate!r}, outside the data root {root_abs!r}"
        )
    return candidate


def read_list(list_file: str, root: str) -> list[tuple[str, int]]:
    """Read a ``path label`` list and return ``[(absolute_path, label), ...]`` in file order.

    Rules: fields are separated by whitespace, so a path may not contain spaces; the label is a
    non-negative integer; blank lines and lines starting with ``#`` are ignored; relative paths
    resolve against ``root`` and no path may leave ``root``.

    Raises:
        FileNotFoundError: the list file does not exist.
        ValueError: a malformed line (message names the file and 1-based line number), a path escaping
            ``root``, or a list with no entries.
    """
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"annotation list {list_file!r} does not exist")
    samples: list[tuple[str, int]] = []
    with open(list_file, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{list_file}:{lineno}"
            fields = line.split()
            if len(fields) != 2:
                raise ValueError(
                    f"{where}: expected 'path label' (2 fields separated by a space; paths may not "
                    f"contain spaces), got {len(fields)} field(s): {line!r}"
                )
            path, label_text = fields
            try:
                label = int(label_text)
            except ValueError:
                raise ValueError(f"{where}: label {label_text!r} is not an integer (line {line!r})") from None
            if label < 0:
                raise ValueError(f"{where}: label {label} is negative (line {line!r})")
            samples.append((resolve_under_root(path, root, where=where), label))
    if not samples:
        raise ValueError(f"annotation list {list_file!r} has no entries")
    return samples


def format_list_line(path: str, label: int) -> str:
    """Format one list line, refusing paths that the reader could not parse back."""
    if any(c.isspace() for c in path):
        raise ValueError(f"path {path!r} contains whitespace, which the 'path label' format cannot hold")
    return f"{path} {int(label)}"
