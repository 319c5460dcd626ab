"""Publishing: export a training run's backbone as a timm-compatible folder, push a folder to the Hub.

``export(run_dir, folder)`` loads the teacher (or student) backbone from the run's checkpoint and
writes it with :func:`dinokit.save` plus a model card holding the recipe, the data, the training
time, the hardware and the measured k-NN. ``push(folder, repo_id)`` uploads such a folder with
huggingface_hub and returns the commit URL.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PushError(RuntimeError):
    """An upload that cannot happen (no token, no network, Hub refusal); the message is one line."""


def _resolve_token(token: str | None) -> str | None:
    """The explicit token, else HF_TOKEN or the saved ``hf auth login`` token (huggingface_hub's order)."""
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload ``folder`` (an exported model) to the Hub model repo ``repo_id``; return the commit URL.

    The repo is created if missing (``exist_ok``); with ``revision`` the branch is created from main
    first. Raises FileNotFoundError for a missing folder, ValueError for a malformed repo id and
    PushError (one line) without a token, without network or when the Hub refuses.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json; export a model with `dinokit export` first")
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"{repo_id}: not a Hub repo id; expected org/name")
    token = _resolve_token(token)
    if not token:
        raise PushError(f"{repo_id}: no Hugging Face token; pass --token, set HF_TOKEN or run `hf auth login`")

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    message = commit_message or f"Upload {folder.name} with dinokit"
    try:
        repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            commit_message=message,
        )
    except PushError:
        raise
    except Exception as exc:  # network, offline mode, auth and Hub errors all become one line
        raise PushError(f"{repo_id}: upload failed: {_one_line(exc)}") from exc
    url = getattr(info, "commit_url", None) or str(info)
    logger.info("pushed %s to %s (%s)", folder, repo_url, url)
    return url


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
