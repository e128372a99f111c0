"""House style that a reviewer should not have to count by hand (issue #11): no function in
the product's modules takes more than 7 parameters or runs past 60 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
# The product: every top-level module (bench/ and tests/ measure and check it).
PRODUCT = sorted(PROJECT.glob("*.py"))
MAX_PARAMETERS = 7
MAX_LINES = 60


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def parameter_count(node: ast.FunctionDef) -> int:
    args = node.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return len([n for n in names if n not in ("self", "cls")])


@pytest.mark.parametrize("path", PRODUCT, ids=lambda p: p.name)
def test_functions_are_small(path):
    too_big = [f"{path.name}:{f.lineno} {f.name}: {parameter_count(f)} parameters, "
               f"{f.end_lineno - f.lineno + 1} lines" for f in functions(path)
               if parameter_count(f) > MAX_PARAMETERS or f.end_lineno - f.lineno + 1 > MAX_LINES]
    assert not too_big


def test_the_product_modules_are_found():
    assert {"pipeline.py", "consumer.py", "extract.py", "transform.py", "load.py"} <= {
        p.name for p in PRODUCT}
