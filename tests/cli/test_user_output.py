"""What a person sees on the command line: each error once, Lightning's lines once and without its adverts, epoch
numbers and rates that read right, missing folds named, and where the results went."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn as nn
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from medseg.atomic import write_json
from medseg.cli.common import friendly_errors, quiet_lightning
from medseg.cli.train import where_results_are
from medseg.errors import ConfigError
from medseg.evaluation.cv_summary import missing_folds_note, summarize_experiment
from medseg.inference.batch import BatchSummary
from medseg.training.callbacks import EpochProgressBar, format_rate
from tests.evaluation.test_leaderboard import _case_rows, make_fold
from tests.inference.conftest import save_untrained_checkpoint


def _cli(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name(tool)
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


# ---- errors --------------------------------------------------------------------------------------------------

def test_an_error_is_printed_once(tmp_path):
    result = _cli("medseg-train", "data=msd", f"data.root={tmp_path / 'nowhere'}", f"paths.output={tmp_path / 'out'}",
                  cwd=tmp_path)
    assert result.returncode != 0
    seen = result.stdout + result.stderr
    message = f"{tmp_path / 'nowhere' / 'dataset.json'}: file not found"
    assert seen.count(message) == 1, seen
    assert "medseg: error: " in result.stderr and "Traceback" not in seen
    for log in tmp_path.rglob("*.log"):  # where Hydra's job logging writes a log file, it still records the error
        assert message in log.read_text() and "[ERROR]" in log.read_text()


def test_the_error_goes_to_the_log_file_not_to_the_console_log(tmp_path, capsys, restore_logging):
    console, log_file = io.StringIO(), tmp_path / "job.log"
    file_handler = logging.FileHandler(log_file)
    logging.getLogger().handlers[:] = [logging.StreamHandler(console), file_handler]  # Hydra's job logging

    @friendly_errors
    def job():
        raise ConfigError("model.name=unet3: unknown model")

    with pytest.raises(SystemExit) as exit_info:
        job()
    file_handler.close()
    assert exit_info.value.code == ConfigError.exit_code != 0
    assert capsys.readouterr().err == "medseg: error: model.name=unet3: unknown model\n"
    assert console.getvalue() == "" and "model.name=unet3: unknown model" in log_file.read_text()


# ---- Lightning's console output ------------------------------------------------------------------------------

class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture
def restore_logging():
    """The root's and Lightning's loggers as they were before the test."""
    names = ["", "lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric",
             "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"]
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate,
                 list(logging.getLogger(n).filters)) for n in names}
    yield
    for n, (handlers, propagate, filters) in saved.items():
        logger = logging.getLogger(n)
        logger.handlers[:], logger.propagate, logger.filters[:] = handlers, propagate, filters


def test_lightning_lines_appear_once_without_adverts_and_the_bar_counts_epochs_from_one(tmp_path, capfd,
                                                                                         restore_logging):
    # as in medseg-train: Hydra's root handler prints to stdout, and importing lightning gave its logger a
    # stderr handler of its own; capfd sees both streams
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().handlers[:] = [handler]  # Hydra's dictConfig replaces the root's handlers likewise
    logging.getLogger("lightning").addHandler(logging.StreamHandler(sys.stderr))
    quiet_lightning()
    data = DataLoader(TensorDataset(torch.randn(4, 2), torch.randn(4, 1)), batch_size=2)
    # Lightning's default checkpointing and a non-Lit logger: both of its cloud tips would be printed
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=TensorBoardLogger(tmp_path), default_root_dir=tmp_path,
                        callbacks=[EpochProgressBar()], enable_model_summary=False)
    trainer.fit(_Tiny(), data)
    out, err = capfd.readouterr()
    seen = out + err
    assert seen.count("GPU available") == 1, seen
    assert "`Trainer.fit` stopped" in out and seen.count("`Trainer.fit` stopped") == 1
    assert "💡" not in seen and "litmodels" not in seen and "litlogger" not in seen
    # Lightning's bar said "Epoch 0" and "Epoch 1" (its own description flashes at 0% before ours replaces it)
    assert "Epoch 1/2: 100%" in seen and "Epoch 2/2: 100%" in seen
    assert not re.search(r"Epoch \d+: +[1-9]", seen), seen


# ---- the epoch summary's rate --------------------------------------------------------------------------------

def test_rates_below_one_iteration_a_second_are_seconds_per_iteration():
    assert format_rate(250, 50.0) == "5.0 it/s"
    assert format_rate(10, 10.0) == "1.0 it/s"
    assert format_rate(10, 11.0) == "1.1 s/it"  # 0.9 it/s
    assert format_rate(250, 60.0 * 60) == "14.4 s/it"  # an hour-long epoch: "0.1 it/s" before
    assert format_rate(4, 120.0) == "30.0 s/it"  # "0.0 it/s" before
    assert format_rate(0, 5.0) == "n/a it/s"


# ---- cross-validation summary --------------------------------------------------------------------------------

def _run_with_folds(run_dir: Path, finished: list[int], num_folds: int | None = 5) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    for k in finished:
        fold = make_fold(run_dir, k, _case_rows(k, rng, 0.0))
        if num_folds is not None:
            with open(fold / "config.yaml", "a") as f:
                f.write(f"data:\n  adapter: msd\n  num_folds: {num_folds}\n")
    return run_dir


def test_cv_summary_names_the_folds_that_are_missing(tmp_path):
    run = _run_with_folds(tmp_path / "exp" / "unet__dice_ce", [0])
    (run / "fold_2" / "checkpoints").mkdir(parents=True)  # started, not finished
    expected = ('unet__dice_ce: folds 0 of 5 finished; missing 1, 2, 3, 4 (fold 2 started, not finished); '
                '"all" covers 0 only')
    assert missing_folds_note(run) == expected
    table = summarize_experiment(tmp_path / "exp")
    assert "| unet__dice_ce | all | dice_Anterior |" in table and table.endswith(f"- {expected}")
    assert (tmp_path / "exp" / "cv_summary.md").read_text().strip().endswith(expected)
    # what medseg-cv-summary prints
    result = _cli("medseg-cv-summary", f"experiment_dir={tmp_path / 'exp'}", f"paths.output={tmp_path / 'out'}",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "folds 0 of 5 finished; missing 1, 2, 3, 4" in result.stdout


def test_cv_summary_is_quiet_about_a_complete_run_and_reads_the_fold_count_where_it_can(tmp_path):
    assert missing_folds_note(_run_with_folds(tmp_path / "a" / "complete", [0, 1], num_folds=2)) is None
    # no fold count in the configs: only folds started and not finished are named
    run = _run_with_folds(tmp_path / "b" / "unknown", [0, 1], num_folds=None)
    assert missing_folds_note(run) is None
    (run / "fold_3").mkdir()
    assert missing_folds_note(run) == ('unknown: folds 0, 1 finished; missing 3 (fold 3 started, not finished); '
                                       '"all" covers 0, 1 only')
    # a manifest file's own fold count wins over the config's default
    manifest = tmp_path / "manifest.json"
    write_json(manifest, {"name": "m", "num_folds": 3, "cases": []})
    run = _run_with_folds(tmp_path / "c" / "manifest_run", [0, 1, 2], num_folds=None)
    for k in range(3):
        with open(run / f"fold_{k}" / "config.yaml", "a") as f:
            f.write(f"data:\n  adapter: manifest\n  path: {manifest}\n  num_folds: 5\n")
    assert missing_folds_note(run) is None


# ---- where the results went ----------------------------------------------------------------------------------

def test_train_says_where_the_run_and_its_metrics_are(tmp_path):
    run = tmp_path / "outputs" / "exp" / "unet__dice_ce"
    cfg = OmegaConf.create({"run_dir": str(run), "fold": 0})
    assert where_results_are(cfg, {}) == (f"run folder: {run}\nno metrics.json (final validation off); "
                                          f"checkpoints: {run / 'fold_0' / 'checkpoints'}")
    write_json(run / "fold_0" / "metrics.json", {"dice_mean": 0.81234})
    assert where_results_are(cfg, {"dice_mean": 0.81234}).splitlines() == [
        f"run folder: {run}", f"metrics: {run / 'fold_0' / 'metrics.json'} (mean Dice 0.8123)"]
    # a finished fold's metrics read back from disk, where a mean over no cases is null
    assert where_results_are(cfg, {"dice_mean": None}).endswith("metrics.json")


def test_predict_says_where_its_results_went(synthetic_root, tmp_path):
    from medseg.datasets.adapters import build_manifest
    from medseg.planning.fingerprint import compute_fingerprint
    from medseg.planning.planner import PlannerSettings, plan_dataset

    manifest = build_manifest("msd", root=str(synthetic_root))
    plan = plan_dataset(compute_fingerprint(manifest, num_processes=1, progress=False), manifest.channel_names,
                        manifest.label_scheme, PlannerSettings(patch_size=[16, 16, 16], base_features=4))
    run = tmp_path / "run"
    save_untrained_checkpoint(plan, "3d_fullres", run / "fold_0" / "checkpoints" / "last.ckpt")
    listing = tmp_path / "lists" / "cases.txt"
    listing.parent.mkdir()
    listing.write_text(f"{synthetic_root / 'imagesTr' / 'synthetic_000.nii.gz'}\n"
                       f"{synthetic_root / 'imagesTr' / 'synthetic_001.nii.gz'}\n../scans/not_there.nii.gz\n")
    out = tmp_path / "preds"
    args = [f"ckpt_dir={run}", f"input={listing}", f"output={out}", "device=cpu", "sw_batch_size=2",
            f"paths.output={tmp_path / 'outputs'}"]
    result = _cli("medseg-predict", *args, cwd=tmp_path)
    assert result.returncode == 1  # a case failed
    assert f"wrote 2 case(s) to {out} (record: {out / 'prediction_summary.json'})" in result.stdout
    # the failed case: once as it happens, once in the closing report
    assert (result.stdout + result.stderr).count("file not found") == 2, result.stdout
    again = BatchSummary(skipped=["synthetic_000", "synthetic_001"], output_dir=out)  # a second run: nothing to do
    assert again.report().splitlines()[-1] == (f"wrote 0 case(s) to {out}; 2 already there "
                                               f"(record: {out / 'prediction_summary.json'})")
