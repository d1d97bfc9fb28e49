"""Layers point one way: spec_compiler (schema, validation, plan, tree) imports neither torch nor runtime, and
the runtime's modules import each other without a cycle."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_spec_compiler_imports_neither_torch_nor_runtime():
    code = ("import spec_compiler.plan, spec_compiler.validate, spec_compiler.schema, spec_compiler.tree, "
            "spec_compiler.checkpoint, spec_compiler.tokenizer, spec_compiler.prompts; import sys; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'runtime', 'triton')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of `package` it imports, inside functions too (a deferred import hides a cycle,
    it does not remove it)."""
    graph = {}
    for file in sorted((ROOT / package).rglob("*.py")):
        rel = file.relative_to(ROOT).with_suffix("")
        mod = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        deps = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from runtime import vocab_trim` imports the submodule
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[mod] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    for package in ("runtime", "spec_compiler", "training", "codegen"):
        graph = import_graph(package)
        assert graph, package
        assert find_cycle(graph) is None, f"import cycle in {package}: {' -> '.join(find_cycle(graph))}"
