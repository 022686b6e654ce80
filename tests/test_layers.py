"""The layers of the package, read from the import statements of every module (no module is imported).

Dependencies point one way: ui -> services -> engines / data / evaluation / moderation / templates. The UI
renders and calls services only (so it can be replaced without losing behaviour), nothing below the UI
imports gradio (the services run on the GPU machine, which has no gradio), and the engines know nothing of
the services, the store or the page.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vicuna_demo"


def imports_of(path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved against its package)."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            names.add(base)
    return names


def modules(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py")) if folder else sorted(PACKAGE.glob("*.py"))


def ours(name: str) -> bool:
    return name.split(".")[0] in ("vicuna_demo", "moderation", "conversation_templates")


@pytest.mark.parametrize("path", modules("ui"), ids=lambda p: p.name)
def test_the_ui_imports_only_services_gradio_and_itself(path):
    allowed = ("vicuna_demo.services", "vicuna_demo.ui")
    wrong = sorted(n for n in imports_of(path) if ours(n) and not n.startswith(allowed))
    assert not wrong, f"{path.name} reaches below the services: {wrong}"


@pytest.mark.parametrize("path", [p for p in sorted(PACKAGE.rglob("*.py")) if "ui" not in p.relative_to(PACKAGE).parts],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_nothing_below_the_ui_imports_gradio_or_the_ui(path):
    names = imports_of(path)
    assert not any(n == "gradio" or n.startswith("gradio.") for n in names), f"{path} imports gradio"
    assert not any(n.startswith("vicuna_demo.ui") for n in names), f"{path} imports the UI"


@pytest.mark.parametrize("path", modules("engines"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_engines_know_nothing_of_services_store_or_page(path):
    # The one shared leaf they may use: the secret-redaction helper for error messages (moderation/redaction.py).
    wrong = sorted(n for n in imports_of(path) if n != "moderation.redaction" and
                   n.startswith(("vicuna_demo.services", "vicuna_demo.data", "vicuna_demo.ui",
                                 "vicuna_demo.evaluation", "moderation")))
    assert not wrong, f"{path.name} imports {wrong}"


def test_the_rules_see_real_imports():
    """The parser resolves relative imports (else every rule above would pass on nothing)."""
    assert "vicuna_demo.services.chat" in imports_of(PACKAGE / "ui" / "chat_tab.py")
    assert "gradio" in imports_of(PACKAGE / "ui" / "app.py")
