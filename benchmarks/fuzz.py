"""Coverage-guided fuzzing of every dinokit loader with atheris (libFuzzer for Python). Not run in CI.

    pip install atheris
    python benchmarks/fuzz.py --all --seconds 60          # every target, a Markdown table at the end
    python benchmarks/fuzz.py pth CORPUS_DIR -max_total_time=60   # one target, libFuzzer arguments

A target feeds the fuzzer's bytes to one loader and accepts two outcomes: a result, or a one-line
ValueError/OSError (dinokit's error contract) naming the file. Any other exception, a multi-line
message or an error that does not name the file is a finding: libFuzzer stops and writes the input
to ``OUT/crash-*``. dinokit's own modules are instrumented for coverage (torch, PIL and numpy are
not: their C code is not what is tested here). Seeds are valid files of each kind, made at start.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("pth", "full", "safetensors", "config", "recipe", "set", "image", "features", "json")
WORK = Path(os.environ.get("DINOKIT_FUZZ_DIR", "/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()))


# ------------------------------------------------------------------ seeds
def _tiny_sd() -> dict[str, Any]:
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, dynamic_img_size=True, img_size=32,
                              patch_size=8, depth=1, embed_dim=64, num_heads=1)
    return {k: v.clone() for k, v in model.state_dict().items()}, model


def make_seeds(target: str, folder: Path) -> None:
    """Write valid inputs of ``target``'s kind into ``folder`` (the starting corpus)."""
    import numpy as np
    import torch
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    if target in ("pth", "full", "safetensors", "config"):
        sd, model = _tiny_sd()
        buf = io.BytesIO()
        if target == "pth":
            torch.save(sd, buf)
        elif target == "full":
            torch.save({"student": {f"module.backbone.{k}": v for k, v in sd.items()},
                        "teacher": {f"backbone.{k}": v for k, v in sd.items()}, "optimizer": {}, "epoch": 1}, buf)
        elif target == "safetensors":
            from safetensors.torch import save

            buf.write(save(sd))
        else:
            from dinokit.models.backbone import backbone_config

            buf.write(json.dumps(backbone_config(model)).encode())
        (folder / f"seed-{target}").write_bytes(buf.getvalue())
    elif target in ("recipe", "set"):
        for p in sorted((ROOT / "recipes").glob("*.yaml"))[:3]:
            (folder / p.name).write_bytes(p.read_bytes() if target == "recipe" else b"{depth: 2, embed_dim: 64}")
    elif target == "image":
        rgb = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
        for fmt in ("png", "jpeg", "gif", "bmp", "webp", "tiff"):
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format=fmt)
            (folder / f"seed.{fmt}").write_bytes(buf.getvalue())
    elif target == "features":
        buf = io.BytesIO()
        np.savez(buf, features=np.ones((3, 4), np.float32), paths=np.asarray(["a", "b", "c"]), info=np.asarray("{}"))
        (folder / "seed.npz").write_bytes(buf.getvalue())
    elif target == "json":
        (folder / "seed.json").write_bytes(b'{"a": [1, 2, {"b": null}], "c": "d"}')


# ------------------------------------------------------------------ targets
def _contract(fn: Callable[[], Any], name: str) -> None:
    try:
        fn()
    except (ValueError, OSError) as e:
        msg = str(e)
        if "\n" in msg or name not in msg:
            raise AssertionError(f"unclear error: {msg[:300]!r}") from e


def make_target(target: str) -> Callable[[bytes], None]:
    """The function libFuzzer calls with each input."""
    import dinokit
    from dinokit._validate import parse_json, parse_yaml
    from dinokit.data.images import load_rgb
    from dinokit.embedding import load_embeddings
    from dinokit.training.config import load_config

    tmp = Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-", dir=WORK))
    model_dir = tmp / "model"
    if target == "config":
        from safetensors.torch import save_file

        model_dir.mkdir()
        save_file(_tiny_sd()[0], str(model_dir / "model.safetensors"))
    suffix = {"pth": ".pth", "full": ".pth", "safetensors": ".safetensors", "recipe": ".yaml",
              "image": ".png", "features": ".npz"}.get(target, "")
    path = model_dir / "config.json" if target == "config" else tmp / f"input{suffix}"

    def run(data: bytes) -> None:
        if target == "set":  # argv holds any bytes: Python decodes them with surrogate escapes
            text = data.decode("utf-8", "surrogateescape")
            _contract(lambda: load_config(None, [f"model.model_args={text}"]), "--set")
            return
        if target == "json":
            text = data.decode("utf-8", "replace")
            _contract(lambda: parse_json(text, "input.json"), "input.json")
            _contract(lambda: parse_yaml(text, "input.yaml"), "input.yaml")
            return
        path.write_bytes(data)
        fn: dict[str, Callable[[], Any]] = {
            "pth": lambda: dinokit.load(path), "full": lambda: dinokit.load(path),
            "safetensors": lambda: dinokit.load(path), "config": lambda: dinokit.load(model_dir),
            "recipe": lambda: load_config(path), "image": lambda: load_rgb(path, max_pixels=1 << 22),
            "features": lambda: load_embeddings(path)}
        _contract(fn[target], "model" if target == "config" else path.name)

    return run


def fuzz_one(target: str, libfuzzer_args: list[str]) -> None:
    """Run one target under atheris (never returns: libFuzzer exits the process)."""
    import atheris
    import torch

    # dinokit's modules are instrumented for coverage; torch (imported above) and PIL are not
    with atheris.instrument_imports(include=["dinokit"]):
        import dinokit._validate
        import dinokit.data.images
        import dinokit.embedding
        import dinokit.hub
        import dinokit.models.convert
        import dinokit.training.config  # noqa: F401 - imported here to be instrumented
    torch.set_num_threads(1)
    run = make_target(target)
    atheris.Setup([sys.argv[0], *libfuzzer_args], run)
    atheris.Fuzz()


# ------------------------------------------------------------------ driver
def run_all(seconds: int, targets: list[str], out: Path) -> list[dict[str, Any]]:
    """Fuzz each target in its own process for ``seconds``; collect executions and findings."""
    rows = []
    for target in targets:
        corpus = out / f"corpus-{target}"
        make_seeds(target, corpus)
        art = out / f"artifacts-{target}"
        art.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, __file__, target, str(corpus), f"-max_total_time={seconds}", "-print_final_stats=1",
             f"-artifact_prefix={art}/", "-rss_limit_mb=4096", "-timeout=20", "-max_len=65536"],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        wall = time.monotonic() - t0
        log = proc.stdout + proc.stderr
        execs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
        crashes = sorted(p.name for p in art.iterdir())
        first = re.search(r"=== Uncaught Python exception: ===\n(.+)", log)
        rows.append({"target": target, "seconds": round(wall, 1), "execs": int(execs[-1]) if execs else None,
                     "corpus": len(list(corpus.iterdir())), "findings": crashes,
                     "first": first.group(1).strip() if first else ""})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in TARGETS:  # a single target, libFuzzer style
        fuzz_one(sys.argv[1], sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="fuzz every target")
    ap.add_argument("--targets", nargs="*", default=list(TARGETS), choices=TARGETS)
    ap.add_argument("--seconds", type=int, default=60, help="per target")
    ap.add_argument("--out", type=Path, default=WORK / "dinokit-fuzz")
    args = ap.parse_args()
    rows = run_all(args.seconds, args.targets, args.out)
    print("\n| loader (target) | seconds | inputs tried | corpus kept | findings |\n|---|---|---|---|---|")
    for r in rows:
        found = f"{len(r['findings'])}: {r['first'][:80]}" if r["findings"] else "0"
        print(f"| {r['target']} | {r['seconds']} | {r['execs']} | {r['corpus']} | {found} |")


if __name__ == "__main__":
    main()
