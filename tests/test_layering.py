"""
The import rules of ARCHITECTURE.md "Layout", checked on the source (AST, nothing imported):

- a protocol package (hl7/, astm/, dicom/, tcp/) imports neither L{medagent.agent} nor
  L{medagent.relay}: what they share with the agent is L{medagent.delivery};
- the agent never imports L{medagent.relay} (they meet only on the wire, L{medagent.wire});
- a pure codec imports no Twisted, not even through another medagent module it imports at
  module level.

Imports under C{if TYPE_CHECKING:} are types only and do not count; imports inside functions
do (they run).
"""

from __future__ import annotations

import ast
import os

from twisted.trial.unittest import SynchronousTestCase

import medagent

ROOT = os.path.dirname(os.path.abspath(medagent.__file__))

PROTOCOL_PACKAGES = ("medagent.hl7", "medagent.astm", "medagent.dicom", "medagent.tcp")
CODECS = (
    "medagent.hl7.mllp",
    "medagent.astm.codec",
    "medagent.dicom.pdu",
    "medagent.dicom.dimse",
    "medagent.tcp.framing",
    "medagent.wire",
    "medagent.destination",
    "medagent.delivery",
    "medagent.contenttypes",
)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool
             ) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every run-time import in C{tree}."""
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    visit_one(sub, top)
                continue
            visit_one(child, top)

    def visit_one(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((a.name, node.lineno, top) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                base = parts if is_package else parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((name, node.lineno, top))
            for a in node.names:  # "from medagent import agent" imports a package
                found.append((f"{name}.{a.name}", node.lineno, top))
        inner = top and not isinstance(
            node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        visit(node, inner)

    visit(tree, True)
    return found


def import_graph(root: str = ROOT) -> dict[str, tuple[str, list[tuple[str, int, bool]]]]:
    """module name → (its file, its imports) for every module under C{root}."""
    graph = {}
    base = os.path.dirname(root)
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, base)[: -len(".py")].split(os.sep)
            is_package = rel[-1] == "__init__"
            module = ".".join(rel[:-1] if is_package else rel)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            graph[module] = (path, _imports(tree, module, is_package))
    return graph


def violations(root: str = ROOT) -> list[str]:
    graph = import_graph(root)
    found: list[str] = []

    def report(text: str) -> None:  # one line per import statement and rule
        if not found or found[-1].split(" imports ")[0] != text.split(" imports ")[0]:
            found.append(text)

    for module, (path, imports) in sorted(graph.items()):
        where = os.path.relpath(path, os.path.dirname(root))
        for name, line, _ in imports:
            if any(_within(module, p) for p in PROTOCOL_PACKAGES):
                for banned in ("medagent.agent", "medagent.relay"):
                    if _within(name, banned):
                        report(f"{where}:{line}: protocol package imports {name}")
            if _within(module, "medagent.agent") and _within(name, "medagent.relay"):
                report(f"{where}:{line}: the agent imports {name}")
    for codec in CODECS:
        if codec not in graph:
            continue
        seen, todo = set(), [(codec, [codec])]
        while todo:
            module, chain = todo.pop()
            if module in seen or module not in graph:
                continue
            seen.add(module)
            path, imports = graph[module]
            for name, line, top in imports:
                if _within(name, "twisted"):
                    via = " via " + " → ".join(chain[1:]) if len(chain) > 1 else ""
                    report(f"{os.path.relpath(path, os.path.dirname(root))}:{line}: "
                           f"codec {codec} imports {name}{via}")
                elif top and name in graph:
                    todo.append((name, chain + [name]))
    return found


class LayeringTests(SynchronousTestCase):
    def test_import_rules(self) -> None:
        found = violations()
        self.assertEqual(found, [], "\n".join(["import rule violations:", *found]))

    def test_the_checker_sees_a_violation(self) -> None:
        """The rules are live: a protocol module importing the agent is reported."""
        root = self.mktemp()
        os.makedirs(os.path.join(root, "medagent", "hl7"))
        os.makedirs(os.path.join(root, "medagent", "agent"))
        for name, text in {
            "__init__.py": "",
            "wire.py": "from medagent import net\n",
            "net.py": "from twisted.internet import defer\n",
            "hl7/__init__.py": "",
            "hl7/mllp.py": "import typing\nif typing.TYPE_CHECKING:\n    import twisted\n",
            "hl7/protocol.py": "from ..agent.dispatch import Reply\n",
            "agent/__init__.py": "",
            "agent/app.py": "def f():\n    from medagent.relay import hub\n",
        }.items():
            with open(os.path.join(root, "medagent", name), "w") as f:
                f.write(text)
        found = violations(os.path.join(root, "medagent"))
        self.assertEqual(
            [v.split(": ", 1)[1] for v in found],
            ["the agent imports medagent.relay",
             "protocol package imports medagent.agent.dispatch",
             "codec medagent.wire imports twisted.internet via medagent.net"])
