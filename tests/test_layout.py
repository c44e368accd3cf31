"""The package's shape: no import cycles, and `protocol/` stays pure (no I/O, no web stack)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "orp_proxy"

# What the pure layer may import besides the standard library's pure modules.
# `orp_proxy.ids` draws random bytes (as `uuid` does), which is no I/O of the request's.
PURE_ALLOWED = {"ujson", "cryptography", "orp_proxy.config", "orp_proxy.errors",
                "orp_proxy.ids"}
IO_MODULES = {"aiohttp", "aiosqlite", "asyncio", "socket", "sqlite3", "subprocess", "os",
              "prometheus_client", "asyncpg"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file (function-level imports count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import; the package uses absolute ones"
            found.add(node.module)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            # `from orp_proxy.ops import metrics` names a module inside a package.
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        graph[name] = {t for t in targets if t != "orp_proxy"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles() -> None:
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_protocol_layer_is_pure() -> None:
    for path in (PACKAGE / "protocol").glob("*.py"):
        for imported in _imports(path):
            top = imported.split(".")[0]
            assert top not in IO_MODULES, f"{path.name} imports {imported}"
            if top == "orp_proxy":
                assert (imported.startswith("orp_proxy.protocol")
                        or imported in PURE_ALLOWED), f"{path.name} imports {imported}"


def test_layers_import_downwards_only() -> None:
    """http → pipeline/exchange → protocol, upstream, store; nothing below imports http."""
    graph = _graph()
    for name, targets in graph.items():
        if not name.startswith("orp_proxy.http"):
            offenders = {t for t in targets if t.startswith("orp_proxy.http")}
            if name != "orp_proxy.app":  # the factory mounts the routes
                assert not offenders, f"{name} imports {offenders}"
        if name.startswith(("orp_proxy.store", "orp_proxy.upstream")):
            assert not {t for t in targets if t.startswith(("orp_proxy.ops",
                                                            "orp_proxy.exchange"))}, name


def test_license_is_the_full_apache_2_text() -> None:
    """setup.cfg declares Apache-2.0: the checkout carries that license, unmodified."""
    import hashlib

    text = (PACKAGE.parent / "LICENSE").read_bytes()
    # SHA-256 of https://www.apache.org/licenses/LICENSE-2.0.txt
    assert hashlib.sha256(text).hexdigest() == (
        "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30")
    assert "license = Apache-2.0" in (PACKAGE.parent / "setup.cfg").read_text()
