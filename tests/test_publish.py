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
