"""Publishing: push builds the exact Hub calls (no network) and fails clearly; export round-trips."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dinokit.publish import PushError, push


@pytest.fixture
def no_saved_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No HF_TOKEN in the environment and no saved login file."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224"}))
    (folder / "README.md").write_text("# card\n")
    return folder


class _Recorder:
    """Replaces HfApi's network methods; records (method, args, kwargs, token of the HfApi instance)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from huggingface_hub import HfApi

        self.calls: list[tuple[str, tuple, dict[str, Any], Any]] = []
        rec = self

        def create_repo(api: HfApi, *args: Any, **kwargs: Any) -> str:
            rec.calls.append(("create_repo", args, kwargs, api.token))
            return f"https://huggingface.co/{args[0]}"

        def create_branch(api: HfApi, *args: Any, **kwargs: Any) -> None:
            rec.calls.append(("create_branch", args, kwargs, api.token))

        def upload_folder(api: HfApi, *args: Any, **kwargs: Any) -> Any:
            rec.calls.append(("upload_folder", args, kwargs, api.token))

            class Info:
                commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123"

            return Info()

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def test_push_builds_exact_upload_calls(model_folder: Path, no_saved_token: None,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _Recorder(monkeypatch)
    url = push(model_folder, "me/fmnist-dino", private=True, token="hf_explicit")
    assert url == "https://huggingface.co/me/fmnist-dino/commit/abc123"
    assert rec.calls == [
        ("create_repo", ("me/fmnist-dino",), {"repo_type": "model", "private": True, "exist_ok": True},
         "hf_explicit"),
        ("upload_folder", (), {"repo_id": "me/fmnist-dino", "folder_path": str(model_folder),
                               "repo_type": "model", "revision": None,
                               "commit_message": "Upload exported with dinokit"}, "hf_explicit"),
    ]


def test_push_revision_creates_branch_and_uses_env_token(model_folder: Path, no_saved_token: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    rec = _Recorder(monkeypatch)
    push(model_folder, "org/name", revision="v1", commit_message="first")
    names = [c[0] for c in rec.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert rec.calls[0][2]["private"] is False
    assert rec.calls[1][1:3] == (("org/name",), {"branch": "v1", "repo_type": "model", "exist_ok": True})
    assert rec.calls[2][2]["revision"] == "v1"
    assert rec.calls[2][2]["commit_message"] == "first"
    assert {c[3] for c in rec.calls} == {"hf_from_env"}


def test_push_without_token_fails_clearly(model_folder: Path, no_saved_token: None,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _Recorder(monkeypatch)
    with pytest.raises(PushError, match=r"^org/name: no Hugging Face token.*HF_TOKEN") as err:
        push(model_folder, "org/name")
    assert "\n" not in str(err.value)
    assert rec.calls == []  # nothing was attempted


def test_push_without_network_fails_in_one_line(model_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # conftest sets HF_HUB_OFFLINE=1: the real create_repo raises, push turns it into one line.
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match=r"^org/name: upload failed: ") as err:
        push(model_folder, "org/name", token="hf_x")
    assert "\n" not in str(err.value)


def test_push_bad_inputs(model_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a folder"):
        push(tmp_path / "missing", "org/name", token="x")
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        push(tmp_path, "org/name", token="x")
    with pytest.raises(ValueError, match="not a Hub repo id"):
        push(model_folder, "just-a-name", token="x")


# ---------------------------------------------------------------- export of a real (tiny) training run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, fmnist_root: Path) -> Path:
    """A 2-iteration dinokit.train run of a tiny ViT on 32 Fashion-MNIST images, with a k-NN record."""
    import dinokit
    from dinokit.eval.monitor import KNNMonitor
    from dinokit.training.config import TrainConfig

    cfg = TrainConfig().replace({
        "model.arch": "vit_tiny_patch16_224",
        "model.model_args": {"img_size": 28, "patch_size": 7, "depth": 1, "embed_dim": 48, "num_heads": 3},
        "model.out_dim": 64, "model.head_hidden_dim": 64, "model.head_bottleneck_dim": 32,
        "data.source": f"fashion-mnist:{fmnist_root}@train#32", "data.global_crops_size": 28,
        "data.local_crops_size": 14, "data.local_crops_number": 2,
        "data.mean": [0.286, 0.286, 0.286], "data.std": [0.353, 0.353, 0.353],
        "optim.batch_size_per_gpu": 16, "optim.epochs": 1, "optim.warmup_epochs": 0, "optim.lr": 0.01,
        "optim.freeze_last_layer": 0, "optim.momentum_teacher": 0.9,
        "knn.train_source": f"fashion-mnist:{fmnist_root}@train#100",
        "knn.val_source": f"fashion-mnist:{fmnist_root}@test#40",
        "precision": "fp32", "saveckp_freq": 0,
    })
    run = tmp_path_factory.mktemp("tiny_run")
    dinokit.train(cfg, run, callbacks=[KNNMonitor.from_config(cfg)])
    return run


def test_export_loads_in_timm_and_dinokit_with_same_features(tiny_run: Path, tmp_path: Path) -> None:
    import timm
    import torch

    import dinokit
    from dinokit.hub import read_checkpoint
    from dinokit.publish import export

    folder = export(tiny_run, tmp_path / "fm_tiny", hardware="2 test CPU cores")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    x = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    ours = dinokit.load(str(folder))
    theirs = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert a.shape == (3, 48)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the weights are the checkpoint's teacher backbone, tensor for tensor
    teacher = read_checkpoint(tiny_run / "checkpoint.pth")["teacher"]
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, teacher[f"backbone.{k}"], rtol=0, atol=0)
    # preprocessing follows the recipe: 28 px, Fashion-MNIST mean/std, whole image
    pcfg = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
    assert pcfg["input_size"] == [3, 28, 28] and pcfg["mean"] == [0.286] * 3 and pcfg["crop_pct"] == 1.0
    assert list(theirs.pretrained_cfg["std"]) == [0.353, 0.353, 0.353]


def test_export_student_differs_from_teacher(tiny_run: Path, tmp_path: Path) -> None:
    import torch

    import dinokit
    from dinokit.hub import read_checkpoint
    from dinokit.publish import export

    student = dinokit.load(str(export(tiny_run, tmp_path / "s", which="student")))
    sd = read_checkpoint(tiny_run / "checkpoint.pth")["student"]
    w = student.state_dict()["blocks.0.mlp.fc1.weight"]
    torch.testing.assert_close(w, sd["backbone.blocks.0.mlp.fc1.weight"], rtol=0, atol=0)
    assert not torch.equal(w, read_checkpoint(tiny_run / "checkpoint.pth")["teacher"]["backbone.blocks.0.mlp.fc1.weight"])


def test_model_card_holds_the_numbers(tiny_run: Path, tmp_path: Path) -> None:
    from dinokit.publish import export

    knn = [json.loads(ln) for ln in (tiny_run / "log_knn.jsonl").read_text().splitlines()][-1]
    summary = json.loads((tiny_run / "summary.json").read_text())
    folder = export(tiny_run, tmp_path / "card", hardware="2 test CPU cores")
    card = (folder / "README.md").read_text()
    assert f"top-1 {knn['top1']:.2f}%" in card and f"top-5 {knn['top5']:.2f}%" in card
    assert "(100 train images as memory, 40 test images)" in card
    assert f"({summary['train_time_s']:.0f} s)" in card
    assert "| hardware | 2 test CPU cores (fp32) |" in card
    assert "1 of 1 epochs, 2 iterations, batch 16 x 1" in card
    assert "fashion-mnist:" in card and "local_crops_size: 14" in card  # data and the recipe
    assert "value: " + str(float(knn["top1"])) in card  # Hub model-index metadata
    assert "license: apache-2.0" in card and "| license | apache-2.0 (these weights" in card
    info = json.loads((folder / "config.json").read_text())["dinokit_train"]
    assert info["knn"]["top1"] == knn["top1"] and info["iterations"] == 2
    assert info["config"]["optim"]["batch_size_per_gpu"] == 16


def test_export_knn_override_and_errors(tiny_run: Path, tmp_path: Path) -> None:
    from dinokit.publish import export

    folder = export(tiny_run, tmp_path / "o", knn={"top1": 88.123, "top5": 99.5, "k": 20, "temperature": 0.07,
                                                    "n_train": 60000, "n_val": 10000})
    card = (folder / "README.md").read_text()
    assert "top-1 88.12%" in card and "(60000 train images as memory, 10000 test images)" in card
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        export(tmp_path, tmp_path / "x")
    with pytest.raises(ValueError, match="expected 'teacher' or 'student'"):
        export(tiny_run, tmp_path / "x", which="ema")
