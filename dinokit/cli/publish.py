"""The ``dinokit`` commands: export, push and plot."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dinokit.cli._common import JsonOpt, _print_json, app, console, out


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., help="A `dinokit train` run folder (checkpoint.pth, config.json, logs)."),
    out_folder: Path = typer.Option(..., "--out", "-o", help="Folder to write (config.json, model.safetensors, README.md)."),
    which: str = typer.Option("teacher", "--which", help="Backbone to export: teacher or student."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Another checkpoint file of the run."),
    name: str | None = typer.Option(None, "--name", help="Model name on the card [default: folder name]."),
    hardware: str | None = typer.Option(None, "--hardware", help="What the run trained on, for the card."),
    as_json: JsonOpt = False,
) -> None:
    """Export a run's backbone as a timm-compatible folder with a model card (recipe, data, time, k-NN).

    The folder (config.json + model.safetensors + README.md) loads with dinokit.load(FOLDER) and timm.create_model("local-dir:FOLDER", pretrained=True), and `dinokit push` uploads it.

    Example: dinokit export runs/fmnist --out fmnist-dino/ --which teacher
    """
    from dinokit.publish import export

    folder = export(run_dir, out_folder, which=which, checkpoint=checkpoint, name=name, hardware=hardware)
    info = json.loads((folder / "config.json").read_text()).get("dinokit_train", {})
    if as_json:
        _print_json({"folder": str(folder), "which": which, "run_dir": str(run_dir), "train": info})
        return
    knn = info.get("knn") or {}
    top1 = f", k-NN top-1 {knn['top1']:.2f}%" if knn.get("top1") is not None else ""
    console.print(f"exported the {which} of {run_dir} ({info.get('iterations')} iterations{top1})", highlight=False)
    out.print(str(folder), highlight=False, soft_wrap=True)


@app.command("push")
def push_cmd(
    folder: Path = typer.Argument(..., help="An exported model folder (config.json + model.safetensors)."),
    repo_id: str = typer.Option(..., "--repo-id", help="Hub model repo, org/name (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repo as private."),
    revision: str | None = typer.Option(None, "--revision", help="Branch to push to (created from main)."),
    token: str | None = typer.Option(None, "--token", help="Hub token; default HF_TOKEN or the saved login."),
    message: str | None = typer.Option(None, "--message", "-m", help="Commit message."),
    as_json: JsonOpt = False,
) -> None:
    """Upload an exported model folder to the Hugging Face Hub and print the commit URL.

    The repo is created when missing (private with --private). Without a token or a network this is a one-line error.

    Example: dinokit push fmnist-dino/ --repo-id me/fmnist-dino --private
    """
    from dinokit.publish import push

    url = push(folder, repo_id, private=private, revision=revision, token=token, commit_message=message)
    if as_json:
        _print_json({"url": url, "repo_id": repo_id, "folder": str(folder)})
        return
    out.print(url, highlight=False, soft_wrap=True)


@app.command("plot")
def plot_cmd(
    run_dir: Path = typer.Argument(..., help="A training run folder (log_iter.jsonl, log_knn.jsonl)."),
    out_png: Path | None = typer.Option(None, "--out", "-o", help="PNG to write [default: RUN_DIR/curves.png]."),
    x: str = typer.Option("iteration", "--x", help="x axis: iteration or minutes."),
    as_json: JsonOpt = False,
) -> None:
    """Draw loss, learning rate, teacher temperature and k-NN curves of a run to PNG.

    Reads RUN_DIR/log_iter.jsonl and log_knn.jsonl (after a resume the last record of each iteration wins).

    Example: dinokit plot runs/fmnist --out curves.png --x minutes
    """
    from dinokit.training.plot import plot_run

    path = plot_run(run_dir, out_png, x=x)
    if as_json:
        _print_json({"png": str(path), "run_dir": str(run_dir)})
        return
    out.print(str(path), highlight=False, soft_wrap=True)


