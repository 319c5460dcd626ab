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
