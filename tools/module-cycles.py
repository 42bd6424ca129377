#!/usr/bin/env python3
"""Fail if the Rust modules under rust/ import each other in a circle, or
if a module of rust/protocol/ imports anything outside it.

A module is a file (`rust/session/auth.rs` is `session::auth`; a folder's
`mod.rs` is the folder). Its imports are the `crate::a::b` and `super::x`
paths it names, outside comments and its `#[cfg(test)]` module. A path counts for the
longest module it names, so `crate::session::io::read` is `session::io`. A
parent naming its own children (`mod x;`, `x::f`) is structure, not an
import, and is not counted; everything else is.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "rust"
# The wire formats: they import nothing from the rest of the crate.
PURE = ("protocol",)
PATH = re.compile(r"\b(crate|super)((?:::[a-z_][a-z0-9_]*)+)")


Module = tuple[str, ...]


def module_of(path: Path) -> Module:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return tuple(parts)


def production_text(path: Path) -> str:
    text = path.read_text()
    cut = text.find("#[cfg(test)]\nmod tests")
    code = text if cut < 0 else text[:cut]
    return re.sub(r"//.*", "", code)


def imports(path: Path, modules: set[Module]) -> set[Module]:
    module = module_of(path)
    found = set()
    for anchor, rest in PATH.findall(production_text(path)):
        names = tuple(rest.strip(":").split("::"))
        base: Module = ()
        if anchor == "super":
            base = module[:-1]
            while names and names[0] == "super":
                names, base = names[1:], base[:-1]
        full = base + names
        named = [full[:n] for n in range(len(full), 0, -1) if full[:n] in modules]
        if named and named[0][: len(module)] != module:
            found.add(named[0])
    return found


def find_cycle(graph: dict[Module, set[Module]]) -> list[Module] | None:
    state: dict[Module, int] = {}
    stack: list[Module] = []

    def visit(node: Module) -> list[Module] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def main() -> int:
    files = {module_of(path): path for path in sorted(ROOT.rglob("*.rs"))}
    modules = set(files)
    graph = {module: imports(path, modules) for module, path in files.items()}
    for module, targets in graph.items():
        outside = sorted(t for t in targets if t[:1] != PURE[:1]) if module[:1] == PURE else []
        if outside:
            print(f"{'::'.join(module)} is pure wire format, yet imports {outside}")
            return 1
    cycle = find_cycle(graph)
    if cycle:
        print("import circle in rust/: " + " -> ".join("::".join(m) or "crate" for m in cycle))
        return 1
    print(f"no import circle among {len(modules)} modules of rust/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
