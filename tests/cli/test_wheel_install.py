"""medseg as a real package: a wheel built from this tree holds every Hydra config, installs into a fresh venv,
and its console scripts plan, train and predict from a directory outside the source tree, writing only where
they were told to.

No registry is used: the fresh venv sees this venv's dependencies through a .pth line naming its site-packages.
Python does not process .pth files inside a directory added that way, so the editable install's own .pth
(which would put <repo>/src first) stays inactive and the wheel's copy of medseg is the one imported.
About a minute on 2 cores, mostly the three tools' start-up (torch, Lightning, MONAI imports)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from tests.conftest import REPO

SOURCE_CONFIGS = REPO / "src" / "medseg" / "configs"
SCRIPTS = {"medseg-plan", "medseg-train", "medseg-predict", "medseg-evaluate", "medseg-cv-summary",
           "medseg-postprocess", "medseg-export", "medseg-select"}
# the smallest run the training tests use (tests/reliability/test_training_faults.py), one image to predict
DATA = ["data.synthetic.num_train=6", "data.synthetic.num_test=1", "data.synthetic.shape=[20,24,16]"]
PLANNER = ["planner.patch_size=[16,16,16]", "planner.base_features=4", "planner.batch_size=2"]
TINY = ["debug=fast", "sampling.iterations_per_epoch=2", "trainer.max_epochs=1", "validation.iterations=1",
        "validation.max_cases_per_epoch=1", "callbacks.progress=plain", "callbacks.image_overlays.every_n_epochs=0"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def _run(args: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=_env(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _build_wheel(tmp_path: Path) -> Path:
    """From a copy of what the wheel needs: building in place would write build/ and egg-info into the tree."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, tree / name)
    shutil.copytree(REPO / "src" / "medseg", tree / "src" / "medseg",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", tmp_path / "dist", tree], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("medseg-*.whl")
    return wheel


def test_the_wheel_installs_and_its_tools_run_outside_the_source_tree(tmp_path):
    wheel = _build_wheel(tmp_path)

    # every config, nested groups included, is in the wheel; and every console script
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    shipped = {n.removeprefix("medseg/configs/") for n in names if n.startswith("medseg/configs/")}
    source = {p.relative_to(SOURCE_CONFIGS).as_posix() for p in SOURCE_CONFIGS.rglob("*.yaml")}
    assert len(source) > 40 and {"train.yaml", "experiment/benchmark.yaml", "launcher/slurm.yaml"} <= source
    assert {n for n in shipped if n.endswith(".yaml")} == source
    assert all(f"{script} = medseg.cli." in entry_points for script in SCRIPTS)

    # a fresh venv: the wheel installed into it (before it can see this venv, so pip finds no medseg to
    # replace), then this venv's site-packages appended for the dependencies
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
         cwd=tmp_path)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).stdout.strip())
    dev_site = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "_medseg_dev_dependencies.pth").write_text("".join(f"{p}\n" for p in dev_site))
    assert all((venv / "bin" / script).is_file() for script in SCRIPTS)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = _run([python, "-c", "import json, sys, medseg, medseg.cli.common as c; print(json.dumps("
                  "{'file': medseg.__file__, 'configs': c.CONFIG_DIR, 'path': sys.path}))"], cwd=elsewhere)
    found = json.loads(probe.stdout)
    assert Path(found["file"]).is_relative_to(site), found["file"]
    assert Path(found["configs"]) == site / "medseg" / "configs"
    assert str(REPO / "src") not in found["path"]

    # plan, train and predict with the installed console scripts, every path configured under tmp_path
    data, pre, out, preds = tmp_path / "data", tmp_path / "pre", tmp_path / "out", tmp_path / "preds"
    paths = [f"paths.data={data}", f"paths.preprocessed={pre}", f"paths.output={out}"]
    bin_ = venv / "bin"
    _run([bin_ / "medseg-plan", *paths, *DATA, *PLANNER, "num_processes=1"], cwd=elsewhere)
    assert (pre / "synthetic" / "plans.json").is_file()
    assert list(pre.glob("hydra/*/.hydra/config.yaml")), "medseg-plan keeps its Hydra files with the plan"

    _run([bin_ / "medseg-train", *paths, *DATA, *PLANNER, *TINY, "num_processes=1", "fold=0"], cwd=elsewhere)
    run_dir = out / "synthetic" / "unet__dice_ce"
    fold = run_dir / "fold_0"
    assert (fold / "checkpoints" / "last.ckpt").is_file() and (fold / "metrics.json").is_file()
    assert list(fold.glob("hydra/*/.hydra/config.yaml")), "medseg-train keeps its Hydra files in the run"

    (image,) = (data / "synthetic" / "imagesTs").iterdir()
    _run([bin_ / "medseg-predict", f"ckpt_dir={run_dir}", f"input={image.parent}", f"output={preds}",
          "mirror_axes=null", "device=cpu", *paths], cwd=elsewhere)
    assert sorted(p.name for p in preds.iterdir()) == sorted([image.name, "prediction_summary.json"])

    # nothing in the working directory, and nothing from Hydra outside the configured folders
    assert list(elsewhere.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "dist", "elsewhere", "out", "pre", "preds",
                                                          "tree", "venv"]
    assert not (out / "hydra").exists() and not (out / "multirun").exists()
