"""experiment=benchmark / benchmark_cpu: the grid comes from hydra.sweeper.params, every cell composes with the
same budget into one experiment folder, and command-line values replace a row of the grid."""

import pytest
from hydra import compose as hydra_compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from medseg.models import list_models
from tests.conftest import CONFIG_DIR

FAMILIES = {"unet", "resenc_unet", "swin_unetr", "umamba_bot", "vilu_net"}
# SwinUNETR takes hours per cell on a CPU (src/medseg/configs/experiment/benchmark_cpu.yaml); the transformer
# family there is UNETR with a small encoder
CPU_FAMILIES = FAMILIES - {"swin_unetr"} | {"unetr_small"}
DATA = ["data=msd", "data.root=/data/Task04_Hippocampus"]


def _compose(overrides: list[str], hydra_node: bool = True):
    import medseg.cli.common  # noqa: F401 - registers the resolvers

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=overrides, return_hydra_config=hydra_node)


def _jobs(experiment: str, cli: list[str]) -> list[list[str]]:
    """The jobs Hydra's basic sweeper launches for `medseg-train -m experiment=<experiment> <cli>`: the config's
    sweeper params first, the command line after them (same key: the command line's value)."""
    params = _compose([f"experiment={experiment}", *DATA]).hydra.sweeper.params
    arguments = [f"{k}={v}" for k, v in params.items()] + [f"experiment={experiment}", *DATA, *cli]
    overrides = OverridesParser.create().parse_overrides(arguments)
    (batch,) = BasicSweeper.split_arguments(overrides, None)
    return batch


@pytest.mark.parametrize("experiment, families, folds",
                         [("benchmark", FAMILIES, 5), ("benchmark_cpu", CPU_FAMILIES, 2)])
def test_benchmark_grid_composes_with_equal_budgets(experiment, families, folds):
    params = _compose([f"experiment={experiment}", *DATA]).hydra.sweeper.params
    models = params.model.split(",")
    names = {m: OmegaConf.load(CONFIG_DIR / "model" / f"{m}.yaml").name for m in models}
    assert set(models) == families and set(names.values()) <= set(list_models())
    assert all((CONFIG_DIR / "loss" / f"{x}.yaml").is_file() for x in str(params.loss).split(","))
    jobs = _jobs(experiment, [])
    assert len(jobs) == len(families) * folds
    cells = set()
    budgets = set()
    experiment_dirs = set()
    for job in jobs:
        cfg = OmegaConf.to_container(_compose(job, hydra_node=False), resolve=True)
        cells.add((cfg["model"]["name"], cfg["fold"]))
        budgets.add((cfg["trainer"]["max_epochs"], cfg["sampling"]["iterations_per_epoch"]))
        run_dir = cfg["run_dir"]
        assert run_dir.endswith(f"/{cfg['model']['name']}__dice_ce")
        experiment_dirs.add(run_dir.rsplit("/", 1)[0])
        assert cfg["scheduler"]["total_epochs"] == cfg["trainer"]["max_epochs"]
    assert cells == {(names[m], k) for m in families for k in range(folds)}
    assert len(budgets) == 1 and len(experiment_dirs) == 1
    (exp_dir,) = experiment_dirs
    assert exp_dir == f"outputs/Task04_Hippocampus_{experiment}"


def test_command_line_values_replace_a_row_of_the_grid():
    jobs = _jobs("benchmark", ["fold=0", "loss=dice_ce,dice_focal"])
    assert len(jobs) == len(FAMILIES) * 2
    assert all("fold=0" in job for job in jobs)
    assert {o for job in jobs for o in job if o.startswith("loss=")} == {"loss=dice_ce", "loss=dice_focal"}
    assert len(_jobs("benchmark_cpu", ["model=unet,vilu_net"])) == 4


def test_cpu_benchmark_is_short_and_without_test_time_mirroring():
    cfg = _compose(["experiment=benchmark_cpu", "data.root=/data/Task04_Hippocampus", "model=swin_unetr"])
    assert cfg.trainer.accelerator == "cpu" and cfg.data.adapter == "msd"
    assert cfg.trainer.max_epochs * cfg.sampling.iterations_per_epoch <= 300
    assert cfg.validation.mirror_axes is None
    assert cfg.planner.base_features == 8
    # a plain single run (no -m) is an ordinary one-cell run: the sweep only applies to multiruns
    assert cfg.fold == 0
