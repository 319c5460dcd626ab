"""Count ``Any`` in the signatures of dinokit's public API (the names exported by dinokit/__init__.py).

Static (ast, no imports): for an exported function its parameter and return annotations; for an
exported class those of ``__init__``, ``__call__``, ``forward`` and every public method. Prints one
line per signature that has any, then the total. Usage: python scripts/count_public_any.py [--all]
(``--all`` lists every signature, also those with none).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_DUNDERS = ("__init__", "__call__")


def _exports() -> dict[str, str]:
    tree = ast.parse((ROOT / "dinokit" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "_EXPORTS":
            return ast.literal_eval(node.value)
    raise SystemExit("dinokit/__init__.py: no _EXPORTS dict")


def _count(ann: ast.expr | None) -> int:
    if ann is None:
        return 0
    if isinstance(ann, ast.Constant) and isinstance(ann.value, str):  # a quoted annotation
        return _count(ast.parse(ann.value, mode="eval").body)
    return sum(1 for n in ast.walk(ann) if (isinstance(n, ast.Name) and n.id == "Any")
               or (isinstance(n, ast.Attribute) and n.attr == "Any"))


def _signature_any(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *(p for p in (a.vararg, a.kwarg) if p)]
    return sum(_count(p.annotation) for p in params) + _count(fn.returns)


def _signatures(name: str, module: str) -> list[tuple[str, int]]:
    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return [(name, _signature_any(node))]
        if isinstance(node, ast.ClassDef) and node.name == name:
            return [(f"{name}.{m.name}", _signature_any(m)) for m in node.body
                    if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and (not m.name.startswith("_") or m.name in _DUNDERS or m.name == "forward")]
    raise SystemExit(f"{module}: no top-level {name}")


def main() -> None:
    total = 0
    for name, module in sorted(_exports().items()):
        for sig, n in _signatures(name, module):
            total += n
            if n or "--all" in sys.argv:
                print(f"{n:3d}  {sig}  ({module})")
    print(f"total Any in public signatures: {total}")


if __name__ == "__main__":
    main()
