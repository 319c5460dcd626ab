"""The public API names of DESIGN.md resolve to the right objects, whatever was imported first."""

import importlib
import inspect
import subprocess
import sys

import dinokit


def test_every_public_name_resolves():
    for name in dinokit.__all__:
        assert getattr(dinokit, name) is not None, name


def test_functions_are_not_shadowed_by_their_submodules():
    # the modules that define embed() and train() have other names (embedding.py, training/), so
    # importing them first cannot replace the public functions
    importlib.import_module("dinokit.embedding")
    importlib.import_module("dinokit.training.loop")
    assert inspect.isfunction(dinokit.embed) and dinokit.embed.__name__ == "embed"
    assert inspect.isfunction(dinokit.train) and dinokit.train.__name__ == "train"
    from dinokit.embedding import Embeddings  # the submodule itself is still importable
    from dinokit.training import loop

    assert Embeddings is dinokit.Embeddings and loop.train is dinokit.train


def test_import_is_lazy_and_contract_names_exist():
    code = ("import sys, dinokit; assert 'torch' not in sys.modules; "
            "print(dinokit.load.__name__, dinokit.embed.__name__, dinokit.knn_classify.__name__, "
            "dinokit.last_selfattention.__name__, dinokit.DINOLoss.__name__, dinokit.DINOHead.__name__, "
            "dinokit.cosine_schedule.__name__, dinokit.Index.__name__, dinokit.save.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["load", "embed", "knn_classify", "last_selfattention", "DINOLoss", "DINOHead",
                   "cosine_schedule", "Index", "save"]


def test_benchmarks_and_recipes_import_names_that_exist() -> None:
    # the scripts are not imported by the suite: a renamed function would break them silently
    # (benchmarks/fashion_mnist.py imported a removed dinokit.publish._training_preprocessing)
    import ast
    import importlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    missing = []
    for f in sorted([*root.glob("benchmarks/*.py"), *root.glob("recipes/*.py"), *root.glob("scripts/*.py"),
                     root / "hubconf.py"]):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dinokit":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            missing.append(f"{f.name}: {node.module}.{alias.name}")
    assert not missing, missing
