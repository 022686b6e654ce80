"""Every engine has the whole ``Engine`` interface of engines/protocol.py, so callers use it as declared, without
``getattr(engine, ..., default)`` fallbacks: the app's engines (LocalEngine, ZeroGPUEngine, RemoteEngine, the
start-up placeholder StartingEngine) and every fake engine of the tests.

Checked from the classes alone, without a GPU or a model: a member is a class attribute, a property, a method,
or an attribute that a method of the class (or a base) assigns to ``self``; a class-level value has the declared
type; a method accepts every call the Protocol allows (inspect.signature): the same parameters in the same
positions, optional where the Protocol's are, anything more optional.
"""

from __future__ import annotations

import ast
import copy
import importlib
import inspect
import textwrap
import typing
from pathlib import Path

import pytest

from tests.engines import RecordingEngine
from vicuna_demo.engines.local import LocalEngine
from vicuna_demo.engines.protocol import Engine
from vicuna_demo.engines.remote import RemoteEngine
from vicuna_demo.engines.startup import StartingEngine
from vicuna_demo.engines.zerogpu import ZeroGPUEngine

TESTS = Path(__file__).resolve().parent
APP_ENGINES = [LocalEngine, ZeroGPUEngine, RemoteEngine, StartingEngine]
DATA = typing.get_type_hints(Engine)                                   # name -> declared type
METHODS = {n: v for n, v in vars(Engine).items() if not n.startswith("_") and inspect.isfunction(v)}
PROPERTIES = {n for n, v in vars(Engine).items() if isinstance(v, property)}
DECLARED = set(DATA) | set(METHODS) | PROPERTIES
MISSING = object()


def fake_engine_classes() -> list[type]:
    """Every fake engine defined at the top level of a test module: RecordingEngine and whatever derives from it."""
    for path in sorted(TESTS.glob("test_*.py")):
        if "RecordingEngine" in path.read_text():
            importlib.import_module(f"tests.{path.stem}")
    found, todo = [], [RecordingEngine]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(set(found), key=lambda c: (c.__module__, c.__qualname__))


def nested_fake_engines() -> list[tuple[str, ast.ClassDef]]:
    """Fake engines defined inside a test function (not importable): (where, class) by their source."""
    out = []
    for path in sorted(TESTS.glob("*.py")):
        if path.name == Path(__file__).name:      # the wrong fakes below, planted on purpose
            continue
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and id(node) not in top and any(
                    isinstance(b, ast.Name) and b.id.endswith("Engine") for b in node.bases):
                out.append((f"{path.name}::{node.name}", node))
    return out


def members(cls: type) -> set[str]:
    """What instances of ``cls`` have: its attributes, and those a method of it or a base assigns to ``self``."""
    names = set(dir(cls))
    for klass in cls.__mro__[:-1]:
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
            for target in targets:
                for item in target.elts if isinstance(target, ast.Tuple) else [target]:
                    if isinstance(item, ast.Attribute) and isinstance(item.value, ast.Name) and item.value.id == "self":
                        names.add(item.attr)
    return names


def signature_problems(name: str, declared: inspect.Signature, actual: inspect.Signature) -> list[str]:
    """How ``actual`` (a method, self included) refuses a call that the Protocol's ``declared`` allows."""
    want, have = list(declared.parameters.values())[1:], list(actual.parameters.values())[1:]
    kinds = {p.kind for p in have}
    problems = []
    for i, p in enumerate(want):
        q = actual.parameters.get(p.name)
        if q is None:
            if inspect.Parameter.VAR_KEYWORD not in kinds:
                problems.append(f"{name}() has no parameter {p.name!r}")
            continue
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and (
                q.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD or have.index(q) != i):
            problems.append(f"{name}(): {p.name!r} is not its parameter number {i + 1}")
        if p.default is not inspect.Parameter.empty and q.default is inspect.Parameter.empty:
            problems.append(f"{name}(): {p.name!r} is required, the interface makes it optional")
    extra = [q.name for q in have if q.name not in declared.parameters and q.default is inspect.Parameter.empty
             and q.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    if extra:
        problems.append(f"{name}() requires {extra}, which the interface does not pass")
    return problems


def interface_problems(cls: type) -> list[str]:
    problems = [f"no {name}" for name in sorted(DECLARED - members(cls))]
    for name, hint in DATA.items():
        value = inspect.getattr_static(cls, name, MISSING)     # MISSING: assigned to self by a method, or absent
        plain = not (value is MISSING or callable(value) or isinstance(value, (property, staticmethod, classmethod)))
        if plain and not isinstance(value, typing.get_origin(hint) or hint):
            problems.append(f"{name} = {value!r} is not a {hint}")
    for name, method in METHODS.items():
        mine = inspect.getattr_static(cls, name, None)
        if inspect.isfunction(mine):
            problems += signature_problems(name, inspect.signature(method), inspect.signature(mine))
        elif mine is not None:
            problems.append(f"{name} is not a method")
    return problems


def test_the_interface_is_read_right():
    assert {"name", "status", "capacity", "defaults", "unsupported_params", "continues_replies", "ready",
            "warmup", "prepare", "stream", "close"} <= DECLARED
    assert len(fake_engine_classes()) >= 5          # tests/engines.py's and the test modules' own


def test_every_fake_engine_of_the_tests_is_one_of_those_checked():
    """A class of the tests that streams replies derives from RecordingEngine, so the checks below see it."""
    checked = {c.__name__ for c in fake_engine_classes()}
    strays = [f"{path.name}::{node.name}" for path in sorted(TESTS.glob("*.py")) if path.name != Path(__file__).name
              for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ClassDef)
              and any(isinstance(f, ast.FunctionDef) and f.name == "stream" for f in node.body)
              and node.name not in checked and not any(isinstance(b, ast.Name) and b.id in checked for b in node.bases)]
    assert strays == []


@pytest.mark.parametrize("cls", APP_ENGINES, ids=lambda c: c.__name__)
def test_every_engine_of_the_app_has_the_whole_interface(cls):
    assert interface_problems(cls) == []


@pytest.mark.parametrize("cls", fake_engine_classes(), ids=lambda c: f"{c.__module__}.{c.__qualname__}")
def test_every_fake_engine_of_the_tests_has_the_whole_interface(cls):
    assert interface_problems(cls) == []


@pytest.mark.parametrize("where,node", nested_fake_engines(), ids=[w for w, _ in nested_fake_engines()])
def test_a_fake_engine_inside_a_test_keeps_the_interfaces_signatures(where, node):
    """A fake defined inside a test function derives from one checked above; the methods it overrides keep the
    interface's signatures (read from its source: the class exists only while its test runs)."""
    problems = []
    for item in node.body:
        if isinstance(item, ast.FunctionDef) and item.name in METHODS:
            stub = copy.deepcopy(item)          # the same parameters; no body, decorators, annotations or defaults
            stub.body, stub.decorator_list, stub.returns = [ast.Pass()], [], None
            arguments = stub.args
            for arg in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs, arguments.vararg,
                        arguments.kwarg]:
                if arg is not None:
                    arg.annotation = None
            arguments.defaults = [ast.Constant(None) for _ in arguments.defaults]
            arguments.kw_defaults = [None if d is None else ast.Constant(None) for d in arguments.kw_defaults]
            namespace: dict = {}
            exec(compile(ast.fix_missing_locations(ast.Module([stub], [])), where, "exec"), namespace)
            problems += signature_problems(item.name, inspect.signature(METHODS[item.name]),
                                           inspect.signature(namespace[item.name]))
    assert problems == [], where


def test_the_check_catches_a_fake_that_lacks_a_member_or_changes_a_signature():
    class Partial(RecordingEngine):
        defaults = None

        def prepare(self, messages):
            return super().prepare(messages, None)

        def warmup(self, progress, background: bool = False, timeout_s: float = 0.0) -> float:
            return 0.0

    no_capacity = type("NoCapacity", (), {k: v for k, v in vars(RecordingEngine).items() if k != "capacity"})
    assert "no capacity" in interface_problems(no_capacity)
    problems = interface_problems(Partial)
    assert any(p.startswith("defaults = None") for p in problems)
    assert "prepare() has no parameter 'params'" in problems
    assert "warmup(): 'progress' is required, the interface makes it optional" in problems
