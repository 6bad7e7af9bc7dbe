"""Scale-out configs: SLURM and local submitit launchers (one job per swept run, requeue on time-out), DDP."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
from hydra import compose as hydra_compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from submitit.core.job_environment import SignalHandler
from submitit.core.utils import DelayedSubmission, JobPaths, UncompletedJobError, pickle_load
from submitit.slurm.slurm import SlurmExecutor

from medseg.datasets.synthetic import generate_synthetic_dataset
from tests.conftest import CONFIG_DIR

SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
LOCAL_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"


def compose_full(overrides: list[str]):
    """The train config with its hydra node, as the launcher sees it."""
    import medseg.cli.common  # noqa: F401 - registers the resolvers

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_config_requeues_on_timeout():
    cfg = compose_full(["launcher=slurm"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == SLURM_LAUNCHER
    # hydra-submitit's default max_num_timeout is 0, which gives a timed-out job up instead of requeuing it
    assert launcher.max_num_timeout > 0
    assert 0 < launcher.signal_delay_s < 10 * 60  # submitit counts a signal in the last 10 minutes as a time-out
    assert launcher.timeout_min * 60 > 2 * launcher.signal_delay_s
    assert launcher.additional_parameters.requeue is True
    assert launcher.gpus_per_node == launcher.tasks_per_node == cfg.trainer.devices == 1
    assert launcher.nodes == 1
    assert launcher.submitit_folder.startswith(f"{cfg.hydra.sweep.dir}/")  # logs and pickles beside the sweep


def test_submitit_local_is_the_local_twin():
    cfg = compose_full(["launcher=submitit_local"])
    assert cfg.hydra.launcher._target_ == LOCAL_LAUNCHER
    assert cfg.hydra.launcher.tasks_per_node == 1
    assert cfg.hydra.launcher.timeout_min == compose_full(["launcher=slurm"]).hydra.launcher.timeout_min


def test_ddp_trainer_composes_and_sizes_the_slurm_job():
    cfg = compose_full(["trainer=ddp"])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.num_nodes == 1
    assert isinstance(cfg.trainer.devices, int)
    assert cfg.trainer.gradient_clip_val == 12  # the rest comes from trainer/default
    cfg = compose_full(["launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"])
    assert (cfg.hydra.launcher.gpus_per_node, cfg.hydra.launcher.tasks_per_node, cfg.hydra.launcher.nodes) == (4, 4, 2)


def test_ddp_trainer_arguments_are_accepted_by_lightning():
    import lightning as L

    cfg = compose_full(["trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true"])
    trainer = L.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), logger=False,
                        enable_checkpointing=False)
    assert type(trainer.strategy).__name__ == "DDPStrategy"
    assert trainer.num_devices == cfg.trainer.devices


def test_slurm_sbatch_script_asks_for_the_signal_and_requeue(tmp_path, monkeypatch):
    """The launcher's real submission path, stopped before sbatch: the job script SLURM would get."""
    cfg = compose_full(["launcher=slurm", "trainer=ddp", "trainer.devices=4", f"hydra.sweep.dir={tmp_path}",
                        "hydra.launcher.partition=gpu"])
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # no srun here
    captured = {}

    class _Job:
        def results(self):
            return [None]

    def fake_map_array(executor, fn, *iterables):
        captured.update(executor=executor, fn=fn, args=list(zip(*iterables)))
        return [_Job() for _ in captured["args"]]

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", fake_map_array)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda c: None, config=cfg)
    launcher.launch([["fold=0"], ["fold=1"]], initial_job_idx=0)

    assert captured["fn"] is launcher
    assert [a[0] for a in captured["args"]] == [["fold=0"], ["fold=1"]]  # one job per swept run
    slurm = captured["executor"]._executor
    assert slurm.max_num_timeout == cfg.hydra.launcher.max_num_timeout
    script = slurm._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for line in ["#SBATCH --signal=USR2@120", "#SBATCH --requeue", "#SBATCH --time=1440",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4", "#SBATCH --partition=gpu",
                 "#SBATCH --open-mode=append"]:
        assert line in script.splitlines(), (line, script)
    assert str(tmp_path / ".submitit") in script


class _RankZero:
    """The parts of submitit's JobEnvironment the signal handler uses."""

    global_rank = 0

    def __init__(self):
        self.requeued = []

    def _requeue(self, countdown):
        self.requeued.append(countdown)


def _timed_out_handler(tmp_path, launcher, args, countdown):
    delayed = DelayedSubmission(launcher, *args)
    delayed.set_timeout(60, countdown)
    paths = JobPaths(tmp_path, job_id="4242")
    env = _RankZero()
    handler = SignalHandler(env, paths, delayed)
    handler._start_time = time.time() - 59 * 60  # as if SLURM's signal came near the end of the time limit
    return handler, env, paths


def test_timeout_requeues_the_same_job(tmp_path):
    launcher = instantiate(compose_full(["launcher=slurm"]).hydra.launcher)
    args = (["fold=3", "model=unet"], "hydra.sweep.dir", 3, "job_id_for_3", {})

    resubmission = launcher.checkpoint(*args)
    assert isinstance(resubmission, DelayedSubmission)
    assert resubmission.function is launcher and resubmission.args == args and resubmission.kwargs == {}

    # what submitit does on SIGUSR2 at a time-out: call checkpoint(), pickle the result as the job, requeue
    handler, env, paths = _timed_out_handler(tmp_path, launcher, args, countdown=2)
    with pytest.raises(SystemExit):
        handler.checkpoint_and_try_requeue(signal.SIGUSR2)
    assert env.requeued == [1]
    requeued = pickle_load(paths.submitted_pickle)
    assert type(requeued.function).__name__ == "SlurmLauncher"
    assert requeued.function.params == launcher.params
    assert requeued.args == args
    assert requeued._timeout_countdown == 1


def test_timeout_is_not_requeued_once_the_retries_are_spent(tmp_path):
    launcher = instantiate(compose_full(["launcher=slurm"]).hydra.launcher)
    handler, env, _ = _timed_out_handler(tmp_path, launcher, (["fold=0"],), countdown=0)
    with pytest.raises(UncompletedJobError, match="timed-out too many times"):
        handler.checkpoint_and_try_requeue(signal.SIGUSR2)
    assert env.requeued == []


def _tool(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


@pytest.mark.slow
def test_local_twin_runs_each_fold_as_its_own_job(tmp_path):
    paths = [f"paths.output={tmp_path / 'out'}", f"paths.data={tmp_path / 'data'}",
             f"paths.preprocessed={tmp_path / 'pre'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The dataset is generated up front: jobs generating it at the same time collide
    # (test_concurrent_synthetic_generation_is_safe). Fingerprinting, planning and preprocessing still run
    # in both jobs at once.
    data = OmegaConf.to_container(compose_full(paths).data, resolve=True)
    generate_synthetic_dataset(data["root"], **data["synthetic"])
    result = subprocess.run([_tool("medseg-train"), "-m", "launcher=submitit_local", "fold=0,1", "debug=fast",
                             "callbacks.progress=plain", *paths],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    run_dir = tmp_path / "out" / "synthetic" / "unet__dice_ce"
    for fold in (0, 1):
        assert (run_dir / f"fold_{fold}" / "metrics.json").is_file()
        assert (run_dir / f"fold_{fold}" / "checkpoints" / "last.ckpt").is_file()

    (sweep,) = (tmp_path / "out" / "multirun").iterdir()
    results = sorted((sweep / ".submitit").glob("*/*_0_result.pkl"))
    job_ids = {p.name.split("_")[0] for p in results}
    assert len(job_ids) == 2, results  # two submitit jobs (local job ids are process ids)
    assert all((p.parent / f"{p.name.split('_')[0]}_0_log.out").is_file() for p in results)
    folds = set()
    for p in results:
        status, job_return = pickle_load(p)
        assert status == "success", job_return
        folds |= {o for o in job_return.overrides if o.startswith("fold=")}
        assert 0.0 <= job_return.return_value <= 1.0  # mean Dice of the fold
    assert folds == {"fold=0", "fold=1"}


def test_concurrent_synthetic_generation_is_safe(tmp_path, monkeypatch):
    """Job B finds no dataset, starts generating; job A finishes first. B must then use A's dataset."""
    import medseg.datasets.synthetic as synthetic

    root = tmp_path / "synthetic"
    small = dict(num_train=2, num_test=0, shape=(8, 8, 8))
    real_mkdtemp = synthetic.tempfile.mkdtemp

    def mkdtemp_while_the_other_job_finishes(*args, **kwargs):
        monkeypatch.setattr(synthetic.tempfile, "mkdtemp", real_mkdtemp)
        synthetic.generate_synthetic_dataset(root, **small)  # job A, complete
        return real_mkdtemp(*args, **kwargs)

    monkeypatch.setattr(synthetic.tempfile, "mkdtemp", mkdtemp_while_the_other_job_finishes)
    assert synthetic.generate_synthetic_dataset(root, **small) == root
    assert (root / "dataset.json").is_file()

