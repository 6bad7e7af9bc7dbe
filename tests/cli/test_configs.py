"""The shipped configs compose, and the Dockerfile installs medseg the way README.md does."""

import re

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, compose


@pytest.mark.parametrize("experiment", ["quickstart", "cpu_hippocampus"])
def test_experiments_compose_and_resolve(experiment):
    cfg = compose("train", [f"experiment={experiment}", "data.root=/some/Task09_Spleen"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["run_dir"].endswith(f"{resolved['data']['name']}/unet__dice_ce")
    assert resolved["scheduler"]["total_epochs"] == resolved["trainer"]["max_epochs"]


def test_msd_dataset_name_comes_from_its_folder():
    cfg = compose("train", ["data=msd", "data.root=/data/Task04_Hippocampus/"])
    assert cfg.data.name == "Task04_Hippocampus"
    assert cfg.run_dir == "outputs/Task04_Hippocampus/unet__dice_ce"


def test_other_entry_point_configs_compose():
    assert compose("plan", ["data=nnunet_raw", "data.root=/x/Dataset001_A"]).data.name == "Dataset001_A"
    predict = compose("predict", ["ckpt_dir=a", "input=b", "output=c"])
    assert predict.checkpoint == "last" and predict.mirror_axes == "all" and predict.postprocessing
    assert compose("cv_summary", ["experiment_dir=x"]).experiment_dir == "x"
    assert compose("evaluate", ["pred=p", "ref=r"]).tolerance_mm == 1.0
    assert compose("postprocess", ["run_dir=r"]).run_dir == "r"


def test_dockerfile_installs_like_the_readme():
    readme = (REPO / "README.md").read_text()
    docker = (REPO / "Dockerfile").read_text()
    steps = re.findall(r"^RUN (pip install .*)$", docker, flags=re.M)
    assert steps, "Dockerfile has no pip install step"
    for step in steps:
        assert step in readme, f"Dockerfile step {step!r} is not README's"
    assert re.search(r"^USER (?!root)\w+", docker, flags=re.M)
    assert "VOLUME" in docker and "ENTRYPOINT" in docker
