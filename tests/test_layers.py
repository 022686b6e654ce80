"""The layers of the package, read from the import statements of every module (no module is imported).

Dependencies point one way: ui -> services -> engines / data / evaluation / moderation / templates. Every
package has a layer (``LAYERS``) and imports only those below it; no modules and no packages import
themselves back through others. The UI renders and calls services only (so it can be replaced without
losing behaviour), nothing below the UI imports gradio (the services run on the GPU machine, which has no
gradio), and the engines know nothing of the services, the store or the page. Wrong imports are planted in
each way Python allows (relative, importlib, package-level) to show that the rules see them. Text reaches an
engine by one path: ``Dispatcher.send`` (engines/dispatch.py) is the only caller of an engine's ``prepare`` /
``stream`` (chat, the judge and evaluations all use it), so no route can have rules of its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vicuna_demo"


def imports_of(path: Path, source: str | None = None) -> set[str]:
    """Absolute names of everything ``path`` imports (no module is imported): ``import a.b``, ``from a import b``
    (both ``a`` and ``a.b``: b may be a module), relative imports resolved against its package, and
    ``importlib.import_module("a.b")`` / ``__import__("a.b")`` calls with a literal name. ``source``: the text to
    read instead of the file's."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and _dynamic_import(node.func) and node.args and \
                isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            name = node.args[0].value
            names.add(f"{package}{name}" if name.startswith(".") else name)
    return names


def _dynamic_import(func) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or \
        (isinstance(func, ast.Name) and func.id in ("import_module", "__import__"))


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def all_modules() -> dict[str, Path]:
    paths = [*PACKAGE.rglob("*.py"), *(ROOT / "moderation").rglob("*.py"),
             *(ROOT / "conversation_templates").rglob("*.py")]
    return {module_name(p): p for p in sorted(paths)}


def import_graph(sources: dict[str, str] | None = None) -> dict[str, set[str]]:
    """module -> the modules of ours it imports (a name resolves to the longest module it names)."""
    mods = all_modules()
    sources = sources or {}

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None
    graph = {}
    for name, path in mods.items():
        targets = {resolve(n) for n in imports_of(path, sources.get(name)) if ours(n)}
        graph[name] = {t for t in targets if t and t != name and not name.startswith(t + ".")}
    return graph


def layer_of(module: str) -> str:
    """A module's package for the package rule: vicuna_demo's subpackage or top-level module, else the top."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "vicuna_demo" and len(parts) > 1 else parts[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(layer_of(module), set()).update(
            layer_of(t) for t in targets if layer_of(t) != layer_of(module))
    return packages


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
    wrong = sorted(n for n in imports_of(path) if not n.startswith("moderation.redaction") and
                   n.startswith(("vicuna_demo.services", "vicuna_demo.data", "vicuna_demo.ui",
                                 "vicuna_demo.evaluation", "moderation")))
    assert not wrong, f"{path.name} imports {wrong}"


@pytest.mark.parametrize("path", list(all_modules().values()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_another_modules_private_names(path):
    """A name with a leading underscore is its module's own: a module that needs it gets a public name."""
    module = module_name(path)
    wrong = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level or ours(node.module or "")):
            wrong += [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not wrong, f"{module} imports private names {wrong}"


def test_no_module_imports_itself_back_through_others():
    assert cycles(import_graph()) == []


# Every package of the project, bottom to top: a package imports only packages of the layers below its own.
# A new package (or top-level module of vicuna_demo) must be placed here; the test says so.
LAYERS = (
    ("conversation_templates", "moderation", "vicuna_demo", "vicuna_demo.specs", "vicuna_demo.data"),  # leaves
    ("vicuna_demo.loading",),                                  # model files -> model, tokenizer, template
    ("vicuna_demo.engines",),                                  # conversation -> stream of text
    ("vicuna_demo.config", "vicuna_demo.evaluation"),          # typed settings; question sets, judge prompts
    ("vicuna_demo.publish",),                                  # the store pushed to a Hub dataset
    ("vicuna_demo.services",),                                 # what a visitor can do, without gradio
    ("vicuna_demo.ui", "vicuna_demo.serving", "vicuna_demo.evaluate", "vicuna_demo.selftest"),   # the edges
)


def test_every_package_has_a_layer_and_imports_only_those_below():
    graph = package_graph(import_graph())
    level = {package: i for i, layer in enumerate(LAYERS) for package in layer}
    assert sorted(set(graph) - set(level)) == [], "place the new package in LAYERS"
    upward = sorted(f"{p} -> {t}" for p, targets in graph.items() for t in targets if level[t] >= level[p])
    assert upward == [], "a package imports one of its own layer or above"


def test_no_package_imports_itself_back_through_others():
    """Packages (vicuna_demo's subpackages and top-level modules, moderation, conversation_templates) form no
    cycle either: a package a lower one needs is below it, whole."""
    assert cycles(package_graph(import_graph())) == []


@pytest.mark.parametrize("planted", [
    "from ...services import chat",                                 # relative
    "from ...services.chat import ChatService",                     # relative, a name of the module
    "import importlib\nimportlib.import_module('vicuna_demo.services.chat')",   # importlib call
    "from importlib import import_module\nimport_module('vicuna_demo.evaluation.runner')",   # imported function
    "__import__('vicuna_demo.ui')",                                 # builtin
    "import vicuna_demo.services",                                  # package-level
    "from vicuna_demo import services",                             # package-level, from
    "from vicuna_demo import evaluation as ev",                     # package-level, aliased
    "from ... import services",                                     # package-level, relative
])
def test_every_kind_of_wrong_import_is_caught(planted):
    """A module of the fast path that imported the services (or the store, the UI, the evaluation), written each
    way Python allows: the engines rule sees it, the layer rule sees an import upwards, and the package-cycle rule
    sees the cycle it makes."""
    path = PACKAGE / "engines" / "fastpath" / "sampling.py"
    source = path.read_text() + "\n" + planted + "\n"
    wrong = [n for n in imports_of(path, source) if n.startswith(
        ("vicuna_demo.services", "vicuna_demo.data", "vicuna_demo.ui", "vicuna_demo.evaluation"))]
    assert wrong, planted
    graph = import_graph({"vicuna_demo.engines.fastpath.sampling": source})
    assert cycles(package_graph(graph)), planted
    level = {package: i for i, layer in enumerate(LAYERS) for package in layer}
    assert any(level[t] >= level["vicuna_demo.engines"] for t in package_graph(graph)["vicuna_demo.engines"]), planted


@pytest.mark.parametrize("planted", [
    "from .. import local",                                         # relative, package-level
    "from ..local import LocalEngine",                              # relative, a name of the module
    "import importlib\nimportlib.import_module('vicuna_demo.engines.local')",   # importlib call
    "import vicuna_demo.engines.local",                             # absolute
])
def test_a_module_cycle_inside_one_package_is_caught(planted):
    """The fast path importing the engine that drives it: no package rule can see it (both are engines), the
    module-cycle rule does."""
    source = (PACKAGE / "engines" / "fastpath" / "sampling.py").read_text() + "\n" + planted + "\n"
    graph = import_graph({"vicuna_demo.engines.fastpath.sampling": source})
    assert any("vicuna_demo.engines.fastpath.sampling" in c for c in cycles(graph)), planted
    assert not cycles(package_graph(graph)), planted


def test_the_rules_see_real_imports():
    """The parser resolves relative imports (else every rule above would pass on nothing)."""
    assert "vicuna_demo.services.chat" in imports_of(PACKAGE / "ui" / "chat_tab.py")
    assert "gradio" in imports_of(PACKAGE / "ui" / "app.py")
    graph = import_graph()
    assert "vicuna_demo.engines.fastpath.forward" in graph["vicuna_demo.engines.fastpath.model"]
    # a package's __init__.py resolves its relative imports against the package itself (they were lost once)
    assert "vicuna_demo.engines.fastpath.model" in graph["vicuna_demo.engines.fastpath"]
    assert {"vicuna_demo", "vicuna_demo.ui", "moderation", "conversation_templates"} <= set(graph)


ONE_PATH = "vicuna_demo.engines.dispatch"     # the one module that hands an engine its work


def engine_calls(path: Path, source: str | None = None) -> list[str]:
    """Where ``path`` calls an engine's ``prepare(messages, params)`` or ``stream(prompt, params)`` (a call of that
    name with two arguments), as "line: text". Inside the engines, a call on ``self`` (or on what ``self`` wraps,
    such as the start-up placeholder's engine) is an engine's own business and not counted."""
    text = path.read_text() if source is None else source
    inside_engines = module_name(path).startswith("vicuna_demo.engines")
    found = []
    for node in ast.walk(ast.parse(text, str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("prepare", "stream") and len(node.args) + len(node.keywords) == 2):
            continue
        receiver = node.func.value
        while isinstance(receiver, (ast.Attribute, ast.Call)):
            receiver = receiver.func if isinstance(receiver, ast.Call) else receiver.value
        if inside_engines and isinstance(receiver, ast.Name) and receiver.id == "self":
            continue
        found.append(f"{node.lineno}: {ast.get_source_segment(text, node)}")
    return found


@pytest.mark.parametrize("path", [*all_modules().values(), ROOT / "app.py"], ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_one_path_hands_an_engine_its_work(path):
    if module_name(path) == ONE_PATH:
        assert engine_calls(path), "the rule no longer sees the one path's own calls"
        return
    calls = engine_calls(path)
    assert not calls, f"{path.name} sends work to an engine itself; use Dispatcher.send (engines/dispatch.py): {calls}"


@pytest.mark.parametrize("module, planted", [
    ("services/chat.py", "def f(engine, p):\n    return engine.stream(engine.prepare([], p), p)"),
    ("services/judge.py", "def f(self, p):\n    return self.engines['x'].stream(p, p)"),
    ("evaluation/runner.py", "def f(engines, p):\n    return list(engines.get('x').stream(prompt=p, params=p))"),
    ("engines/remote.py", "def f(other, m, p):\n    return other.prepare(m, p)"),
])
def test_a_fourth_path_to_an_engine_is_caught(module, planted):
    path = PACKAGE / module
    assert engine_calls(path, path.read_text() + "\n\n" + planted + "\n")
