"""The README's file tree: one line per tracked file, kept in step with ``git ls-files``.

    python scripts/file_tree.py            # list tracked files missing from the tree, and entries that are gone
    python scripts/file_tree.py --write    # rewrite the tree in README.md: every tracked file, keeping the
                                           # descriptions already written, else the module docstring's first line

tests/test_readme.py fails when a tracked .py file is missing from the tree or an entry no longer exists.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START = "<!-- tree:start (one line per file; python scripts/file_tree.py --write adds new files) -->"
END = "<!-- tree:end -->"
INDENT = "  "
COLUMN = 34  # where descriptions start


def tracked_files(root: Path = ROOT) -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout
    return sorted(line for line in out.splitlines() if line and (root / line).exists())


def parse_tree(readme_text: str) -> dict[str, str]:
    """README text -> {relative path: description} for the files listed in the tree block."""
    block = readme_text.split(START, 1)[1].split(END, 1)[0]
    lines = [line for line in block.splitlines() if line.strip() and not line.startswith("```")]
    entries: dict[str, str] = {}
    folders: list[str] = []
    for line in lines:
        depth = (len(line) - len(line.lstrip(" "))) // len(INDENT)
        name, _, description = line.strip().partition(" ")
        folders = folders[:depth]
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
        else:
            entries["/".join(folders + [name])] = description.strip()
    return entries


def _docstring_line(path: Path) -> str:
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    except (SyntaxError, UnicodeDecodeError):
        return ""
    if not doc:
        return ""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    sentence = paragraph.split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= 100 else sentence[:99].rsplit(" ", 1)[0] + " …"


def _order(path: str) -> tuple:
    """Files of a folder first, then its sub-folders; root files before every folder."""
    *folders, name = path.split("/")
    return tuple((1, f) for f in folders) + ((0, name),)


def render(files: list[str], descriptions: dict[str, str]) -> str:
    lines: list[str] = []
    opened: list[str] = []
    for path in sorted(files, key=_order):
        *folders, name = path.split("/")
        common = 0
        while common < min(len(opened), len(folders)) and opened[common] == folders[common]:
            common += 1
        opened = opened[:common]
        for folder in folders[common:]:
            lines.append(f"{INDENT * len(opened)}{folder}/")
            opened.append(folder)
        label = f"{INDENT * len(folders)}{name}"
        description = descriptions.get(path) or (_docstring_line(ROOT / path) if path.endswith(".py") else "")
        lines.append(f"{label.ljust(COLUMN - 1)} {description}".rstrip())
    return "```text\n" + "\n".join(lines) + "\n```\n"


def check(readme: Path = ROOT / "README.md") -> tuple[list[str], list[str]]:
    """-> (tracked files not in the tree, tree entries that do not exist)."""
    listed = parse_tree(readme.read_text(encoding="utf-8"))
    missing = [f for f in tracked_files() if f not in listed]
    gone = [f for f in listed if not (ROOT / f).exists()]
    return missing, gone


def write(readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text(encoding="utf-8")
    listed = parse_tree(text)
    files = sorted(set(tracked_files()) | {f for f in listed if (ROOT / f).exists()})
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    readme.write_text(f"{before}{START}\n{render(files, listed)}{END}{after}", encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    elif sys.argv[1:]:
        raise SystemExit(__doc__)
    else:
        missing, gone = check()
        for path in missing:
            print(f"not in the README tree: {path}")
        for path in gone:
            print(f"in the README tree but gone: {path}")
        sys.exit(1 if missing or gone else 0)
