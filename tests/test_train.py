"""The training loop end to end on real Fashion-MNIST images: logs, checkpoints, exact resume, init, NaN stop."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import dinokit
from dinokit.data.fashion_mnist import load_fashion_mnist
from dinokit.data.multicrop import MultiCropSpec, TensorMultiCrop
from dinokit.eval.monitor import KNNMonitor
from dinokit.training.checkpoint import load_checkpoint
from dinokit.training.config import TrainConfig
from dinokit.training.loop import TrainingDiverged, build_models
from dinokit.training.loss import DINOLoss

TINY: dict[str, Any] = {
    "model.arch": "vit_tiny_patch16_224",
    "model.model_args": {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "img_size": 32},
    "model.out_dim": 256, "model.head_hidden_dim": 64, "model.head_bottleneck_dim": 32,
    "data.global_crops_size": 32, "data.local_crops_size": 16, "data.local_crops_number": 2,
    "data.blur_sigma": [0.1, 0.5], "optim.warmup_epochs": 1, "optim.batch_size_per_gpu": 16,
    "precision": "fp32", "num_threads": 1, "log_every": 2, "seed": 3,
}


def _cfg(**over: Any) -> TrainConfig:
    return TrainConfig().replace({**TINY, **{k.replace("__", "."): v for k, v in over.items()}})


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_image_folder_run_writes_logs_and_official_checkpoint(tmp_path: Path, fmnist_folders: dict[str, Path]) -> None:
    cfg = _cfg(data__source=str(fmnist_folders["train"]), data__augment="pil", data__num_workers=0,
               optim__epochs=2, optim__lr=0.01, saveckp_freq=1, knn__train_source=str(fmnist_folders["train"]),
               knn__val_source=str(fmnist_folders["val"]), knn__k=5)
    seen: list[tuple[int, int, dict[str, Any]]] = []
    summary = dinokit.train(cfg, tmp_path / "run", progress=lambda d, t, s: seen.append((d, t, s)),
                            callbacks=[KNNMonitor.from_config(cfg)])
    run = tmp_path / "run"
    ipe = 200 // 16
    assert summary["iterations"] == 2 * ipe and summary["epochs_completed"] == 2 and summary["stopped"] is None
    assert [d for d, _, _ in seen] == list(range(1, 2 * ipe + 1)) and seen[-1][1] == 2 * ipe
    assert {"loss", "lr", "teacher_temp", "images_per_s"} <= set(seen[-1][2])
    assert TrainConfig.from_json((run / "config.json").read_text()) == cfg
    it_log = _read_jsonl(run / "log_iter.jsonl")
    assert {"epoch", "iteration", "loss", "lr", "wd", "teacher_temp", "momentum", "images_per_s", "time_s"} <= set(it_log[0])
    assert [r["epoch"] for r in _read_jsonl(run / "log_epoch.jsonl")] == [1, 2]
    knn = _read_jsonl(run / "log_knn.jsonl")
    assert [r["epoch"] for r in knn] == [1, 2] and knn[-1]["n_val"] == 60 and 0 <= knn[-1]["top1"] <= 100
    # lr follows the official schedule: lr * 16 / 256, linear warm-up over epoch 1
    assert it_log[0]["lr"] == pytest.approx(0.01 * 16 / 256 * 1 / (ipe - 1))
    ck = load_checkpoint(run / "checkpoint.pth")
    assert (run / "checkpoint_0001.pth").is_file() and (run / "checkpoint_0002.pth").is_file()
    assert ck["epoch"] == 2 and ck["iteration"] == 2 * ipe and ck["precision"] == "fp32"
    assert ck["dino_loss"]["center"].shape == (1, 256) and ck["dino_loss"]["center"].abs().sum() > 0
    assert "head.last_layer.weight_g" in ck["teacher"] and "backbone.cls_token" in ck["student"]
    assert not any(k.startswith("module.") for k in ck["student"])
    assert json.loads(ck["backbone_config"])["model_args"]["embed_dim"] == 48
    assert TrainConfig.from_json(ck["config"]) == cfg
    # the teacher is a moving average, not the student
    diff = [k for k in ck["student"] if not torch.equal(ck["student"][k], ck["teacher"][k])]
    assert "backbone.blocks.0.attn.qkv.weight" in diff
    # the loss dropped: on a fixed batch of unseen images, against the final teacher's centered and
    # sharpened targets, the trained student scores a lower DINO loss than the untrained one
    torch.manual_seed(cfg.seed)
    untrained, teacher = build_models(cfg)
    trained, _ = build_models(cfg)
    trained.load_state_dict(ck["student"])
    teacher.load_state_dict(ck["teacher"])
    x, _ = load_fashion_mnist("test", limit=64)
    crops = TensorMultiCrop(MultiCropSpec.from_config(cfg.data))(torch.from_numpy(x.copy()).unsqueeze(1),
                                                                 torch.Generator().manual_seed(0))
    losses = []
    with torch.no_grad():
        targets = teacher.eval()(crops[:2])
        for net in (untrained.eval(), trained.eval()):
            fn = DINOLoss(256, 4, 0.04, 0.04, 0, 2)
            fn.center.copy_(ck["dino_loss"]["center"])
            losses.append(fn(net(crops), targets, 1).item())
    assert losses[1] < losses[0] - 0.2, losses
    # dinokit.load reads the teacher backbone of this checkpoint
    model = dinokit.load(run / "checkpoint.pth")
    bb = {k[len("backbone."):]: v for k, v in ck["teacher"].items() if k.startswith("backbone.")}
    assert _states_equal(model.state_dict(), bb)


def test_resume_after_a_kill_and_after_a_limit_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    cfg = _cfg(data__source="fashion-mnist#96", optim__epochs=3, optim__batch_size_per_gpu=16)
    ref = dinokit.train(cfg, tmp_path / "ref")
    # 1) killed mid-epoch 2: the last checkpoint is from epoch 1, resume continues from there
    class Kill(Exception):
        pass

    def killer(done: int, total: int) -> None:
        if done == 9:
            raise Kill

    with pytest.raises(Kill):
        dinokit.train(cfg, tmp_path / "killed", progress=killer)
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pth")["iteration"] == 6
    dinokit.train(cfg, tmp_path / "killed", resume=True)
    # 2) stopped by max_iterations mid-epoch (checkpoint at iteration 8), then resumed without the limit
    s = dinokit.train(cfg.replace({"max_iterations": 8}), tmp_path / "limited")
    assert s["stopped"] == "max_iterations" and s["iterations"] == 8
    dinokit.train(cfg, tmp_path / "limited", resume=True)
    want = load_checkpoint(tmp_path / "ref" / "checkpoint.pth")
    for name in ("killed", "limited"):
        got = load_checkpoint(tmp_path / name / "checkpoint.pth")
        assert got["iteration"] == ref["iterations"] == 18
        assert _states_equal(got["teacher"], want["teacher"]) and _states_equal(got["student"], want["student"])
        assert torch.equal(got["dino_loss"]["center"], want["dino_loss"]["center"])
    # a new run never overwrites an old one
    with pytest.raises(ValueError, match="already holds a run"):
        dinokit.train(cfg, tmp_path / "ref")
    # a resume with a different recipe is refused, naming the key
    with pytest.raises(ValueError, match=r"optim\.lr"):
        dinokit.train(cfg.replace({"optim.lr": 0.1}), tmp_path / "ref", resume=True)


def test_init_from_a_full_checkpoint_and_nan_stop(tmp_path: Path) -> None:
    cfg = _cfg(data__source="fashion-mnist#32", optim__epochs=1)
    dinokit.train(cfg, tmp_path / "a")
    src = load_checkpoint(tmp_path / "a" / "checkpoint.pth")
    # an official-style full checkpoint: "module." on the student, weight_g/weight_v head keys
    official = {"student": {"module." + k: v for k, v in src["student"].items()}, "teacher": src["teacher"],
                "epoch": 1}
    torch.save(official, tmp_path / "official.pth")
    s = dinokit.train(cfg.replace({"optim.lr": 1e-12, "optim.min_lr": 0.0, "optim.momentum_teacher": 1.0}),
                      tmp_path / "b", init=str(tmp_path / "official.pth"))
    got = load_checkpoint(tmp_path / "b" / "checkpoint.pth")
    assert s["iterations"] == 2
    # momentum 1: the teacher is exactly the initialising teacher (heads included)
    assert _states_equal(got["teacher"], src["teacher"])
    # NaN: an absurd lr blows the weights up; the run stops naming the iteration, the last checkpoint is kept
    with pytest.raises(TrainingDiverged, match=r"loss is (nan|inf) at iteration \d+"):
        dinokit.train(cfg.replace({"optim.lr": 1e30, "optim.warmup_epochs": 0, "optim.clip_grad": 0.0,
                                   "optim.epochs": 4, "optim.freeze_last_layer": 0}), tmp_path / "c")


def test_bad_inputs_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.source: required"):
        dinokit.train(TrainConfig(), tmp_path / "x")
    with pytest.raises(ValueError, match="total batch is 16"):
        dinokit.train(_cfg(data__source="fashion-mnist#8"), tmp_path / "y")


def test_cli_train_runs_a_recipe_and_names_bad_keys(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dinokit.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(_cfg(data__source="fashion-mnist#32", optim__epochs=1).to_json())
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(recipe), "--set", "optim.lrr=1", "--out", str(tmp_path / "run")])
    assert res.exit_code == 1 and "optim.lrr: unknown key (did you mean optim.lr?)" in res.output
    res = runner.invoke(app, ["train", str(recipe), "--set", "max_iterations=1", "--out", str(tmp_path / "run"),
                              "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["iterations"] == 1 and summary["stopped"] == "max_iterations"
    res = runner.invoke(app, ["train", "--resume", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("2 iterations (1 epochs)") and str(tmp_path / "run") in res.stdout


def test_init_from_a_saved_backbone_folder_and_precision_choice(tmp_path: Path) -> None:
    from dinokit.training.precision import choose_precision

    cfg = _cfg(data__source="fashion-mnist#32", optim__epochs=1, max_iterations=1)
    torch.manual_seed(123)
    donor, _ = build_models(cfg)
    dinokit.save(donor.backbone.eval(), tmp_path / "bb")
    dinokit.train(cfg, tmp_path / "run", init=str(tmp_path / "bb"))
    # before the first step the teacher equals the donor: after one EMA step with m = 0.996 it is
    # 0.996 * donor + 0.004 * updated student, so it stays within 0.4% of the step size of the donor
    got = load_checkpoint(tmp_path / "run" / "checkpoint.pth")["teacher"]
    ref = donor.backbone.state_dict()
    w = "backbone.blocks.1.mlp.fc1.weight"
    assert torch.allclose(got[w], ref[w[len("backbone."):]], atol=1e-5)
    assert not torch.allclose(got[w], build_models(cfg)[0].state_dict()[w], atol=1e-3)
    # precision: auto measures on CPU and picks fp32 or bf16; fp16 without CUDA is refused
    student, teacher = build_models(cfg)
    crops = [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)] * 2
    assert choose_precision(cfg.replace({"precision": "auto"}), torch.device("cpu"), student, teacher, crops) in (
        "fp32", "bf16")
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        choose_precision(cfg.replace({"precision": "fp16"}), torch.device("cpu"), student, teacher, crops)


def test_attention_switch_keeps_the_numbers(tiny_vit: torch.nn.Module) -> None:
    from dinokit.training.precision import set_fused_attention, use_fused_attention

    cpu = torch.device("cpu")
    assert use_fused_attention(TrainConfig(), cpu, "bf16") is False
    assert use_fused_attention(TrainConfig(), cpu, "fp32") is None
    assert use_fused_attention(TrainConfig().replace({"model.fused_attn": True}), cpu, "bf16") is True
    x = torch.randn(2, 3, 32, 32)
    set_fused_attention(tiny_vit, True)
    ref = tiny_vit(x)
    assert set_fused_attention(tiny_vit, False) == 2  # depth 2: one attention layer per block
    assert torch.allclose(tiny_vit(x), ref, atol=1e-5)


def test_worker_count_does_not_change_the_run_and_bad_files_are_skipped(
        tmp_path: Path, fmnist_small: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    from conftest import write_image_folder

    root = write_image_folder(tmp_path / "img", fmnist_small["train_x"][:32], fmnist_small["train_y"][:32])
    (root / "broken.png").write_bytes(b"not a png")
    teachers = []
    for workers in (0, 2):
        dinokit.train(_cfg(data__source=str(root), data__num_workers=workers, optim__epochs=1), tmp_path / f"r{workers}")
        teachers.append(load_checkpoint(tmp_path / f"r{workers}" / "checkpoint.pth")["teacher"])
    # augmentation is seeded per (seed, epoch, image): identical with and without worker processes
    assert _states_equal(teachers[0], teachers[1])
    assert "broken.png: not an image" in caplog.text


# ---------------------------------------------------------------- the parts of the loop
def test_training_imports_nothing_from_eval() -> None:
    import ast
    import subprocess
    import sys

    root = Path(dinokit.__file__).parent / "training"
    for path in sorted(root.glob("*.py")):  # every import statement, also those inside functions
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("dinokit.eval") for n in names), (path.name, names)
    # nor through other modules: importing every training module loads no dinokit.eval module
    mods = ", ".join(f"dinokit.training.{p.stem}" for p in sorted(root.glob("*.py")) if p.stem != "__init__")
    code = f"import sys, {mods}; print(sorted(m for m in sys.modules if m.startswith('dinokit.eval')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_auto_precision_probes_only_on_native_bf16_cpus_and_stops_early(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from dinokit.training import precision

    cfg = _cfg(data__source="fashion-mnist#32", precision="auto")
    cpu = torch.device("cpu")
    student, teacher = build_models(cfg)
    views = precision.probe_views(cfg, cpu)
    assert [tuple(v.shape) for v in views] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 2
    calls: list[tuple[str, float | None]] = []
    seconds: dict[str, list[float]] = {}

    def fake_time(s: Any, t: Any, crops: list[torch.Tensor], dev: Any, prec: str, fused: Any = None,
                  deadline_s: float | None = None) -> float:
        calls.append((prec, None if deadline_s is None else round(deadline_s, 3)))
        assert len(crops[0]) == precision.PROBE_IMAGES
        return seconds[prec].pop(0)

    monkeypatch.setattr(precision, "step_time", fake_time)
    caplog.set_level("INFO", logger="dinokit.training.precision")
    # an AVX2-only CPU: fp32 at once, nothing timed
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.choose_precision(cfg, cpu, student, teacher, views) == "fp32"
    assert calls == [] and "no native bf16" in caplog.text
    # native bf16: an fp32 step, then a bf16 step cut off once clearly slower (1/0.75 of fp32's);
    # a second round (each side cut at 1/0.75 of the other's best) only when the first is close
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    cases = [({"fp32": [1.0], "bf16": [0.5]}, "bf16", [("fp32", None), ("bf16", 1.333)]),
             ({"fp32": [1.0], "bf16": [float("inf")]}, "fp32", [("fp32", None), ("bf16", 1.333)]),
             ({"fp32": [1.0, 0.9], "bf16": [0.85, 0.86]}, "bf16",  # min 0.85 < 0.95 x min 0.9
              [("fp32", None), ("bf16", 1.333), ("fp32", 1.133), ("bf16", 1.2)]),
             ({"fp32": [1.0, 1.0], "bf16": [0.97, 0.96]}, "fp32",
              [("fp32", None), ("bf16", 1.333), ("fp32", 1.293), ("bf16", 1.333)])]
    for times, want, want_calls in cases:
        calls.clear()
        seconds.update({k: list(v) for k, v in times.items()})
        assert precision.choose_precision(cfg, cpu, student, teacher, views + views) == want
        assert calls == want_calls
    assert "fp32 1.000 s, bf16 stopped (clearly slower) per probe step -> fp32" in caplog.text


def test_probe_step_leaves_the_networks_alone_and_honours_its_deadline() -> None:
    from dinokit.training.precision import probe_views, step_time

    cfg = _cfg(data__source="fashion-mnist#32")
    student, teacher = build_models(cfg)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    views = probe_views(cfg, torch.device("cpu"))
    assert 0 < step_time(student, teacher, views, torch.device("cpu"), "fp32") < float("inf")
    assert step_time(student, teacher, views, torch.device("cpu"), "bf16", deadline_s=0.0) == float("inf")
    assert all(p.grad is None for p in student.parameters())
    assert _states_equal(student.state_dict(), before)


def test_run_folder_and_config_exist_before_data_and_knn_without_callback_warns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from dinokit.training import loop

    cfg = _cfg(data__source="fashion-mnist#32", knn__train_source="fashion-mnist@train#64",
               knn__val_source="fashion-mnist@test#32")

    class Seen(Exception):
        pass

    def no_data(*args: Any, **kwargs: Any) -> Any:
        assert TrainConfig.from_json((tmp_path / "run" / "config.json").read_text()) == cfg
        raise Seen

    monkeypatch.setattr(loop, "build_train_data", no_data)
    with pytest.raises(Seen):
        dinokit.train(cfg, tmp_path / "run")
    assert "callbacks=[dinokit.eval.monitor.KNNMonitor.from_config(cfg)]" in caplog.text
    assert caplog.text.count("knn.train_source is set") == 1


def test_stop_policy_and_callback_schedule() -> None:
    from dinokit.training.callbacks import Callbacks
    from dinokit.training.stop import StopPolicy

    stop = StopPolicy(max_iterations=5, max_minutes=0.5)
    assert [stop.reason(4, 10.0), stop.reason(5, 10.0), stop.reason(4, 29.9), stop.reason(4, 30.0)] == [
        None, "max_iterations", None, "max_minutes"]
    assert StopPolicy().reason(10**6, 1e9) is None

    def every_epoch(bb: torch.nn.Module) -> dict[str, Any]:
        return {"name": "a"}

    class EveryOther:
        every_epochs = 2

        def __call__(self, bb: torch.nn.Module) -> dict[str, Any] | None:
            return {"name": "b"}

    class OnlyAtEnd:
        every_epochs = 0

        def __call__(self, bb: torch.nn.Module) -> None:
            return None  # ran, nothing to record

    hooks = Callbacks([every_epoch, EveryOther(), OnlyAtEnd()])
    bb = torch.nn.Identity()
    ran = [[r["name"] for r in hooks.at_epoch_end(bb, e, 10 * e, 1.5)] for e in (1, 2, 3)]
    assert ran == [["a"], ["a", "b"], ["a"]]
    # the end of training, right after epoch 3's callbacks: only those that did not run at iteration 30
    end = hooks.at_end(bb, 3, 30, 2.0)
    assert [r["name"] for r in end] == ["b"] and end[0]["iteration"] == 30 and end[0]["epoch"] == 3
    assert end[0]["time_s"] == 2.0 and end[0]["eval_time_s"] >= 0
    assert hooks.last_iteration == [30, 30, 30]


def test_native_bf16_respects_a_onednn_isa_cap() -> None:
    # With oneDNN capped at AVX2 it emulates bf16 (~100x slower than fp32 on this project's machines)
    # even on a CPU that has AVX512-BF16/AMX: the automatic choices must see fp32 there.
    import subprocess
    import sys

    code = ("from dinokit.devices import cpu_has_native_bf16, cpu_vector_extensions;"
            "print(cpu_has_native_bf16(), cpu_vector_extensions())")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("False ") and out.stdout.strip().endswith("(capped: AVX2)")
