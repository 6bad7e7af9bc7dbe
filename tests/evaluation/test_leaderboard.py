"""The variant leaderboard from fake finished runs: its figures recomputed here with numpy/scipy, the plots, and
missing runs and folds reported rather than fatal."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from scipy import stats

from medseg.errors import MedsegError
from medseg.evaluation.cv_summary import summarize_experiment
from medseg.evaluation.leaderboard import PLOT_COST, PLOT_DICE, build_leaderboard, write_leaderboard

CLASSES = ("Anterior", "Posterior")
CASES_PER_FOLD = 12


def _case_rows(fold: int, rng, shift: float) -> list[dict]:
    rows = []
    for i in range(CASES_PER_FOLD):
        base = 0.80 + 0.01 * i  # the same case is easier or harder for every model
        row = {"case_id": f"case_{fold}_{i:02d}", "fold": fold}
        for c in CLASSES:
            row[f"dice_{c}"] = float(np.clip(base + shift + rng.normal(0, 0.02), 0, 1))
        for c in CLASSES:
            row[f"hd95_{c}"] = float(2.0 - shift * 10 + rng.normal(0, 0.2))
        for c in CLASSES:
            row[f"nsd_{c}"] = float(np.clip(0.9 + shift + rng.normal(0, 0.02), 0, 1))
        rows.append(row)
    return rows


def make_fold(run_dir: Path, fold: int, rows: list[dict], timing: dict | None = None, parameters: int = 1000,
              gflops: float = 1.5, epochs: int = 4, iterations: int = 50, batch: int | None = None) -> Path:
    fold_dir = run_dir / f"fold_{fold}"
    (fold_dir / "validation").mkdir(parents=True)
    with open(fold_dir / "validation" / "per_case.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    metrics = {"fold": fold, "epochs": epochs, "num_cases": len(rows)}
    if timing is not None:
        metrics["timing"] = timing
    (fold_dir / "metrics.json").write_text(json.dumps(metrics))
    (fold_dir / "model_summary.json").write_text(json.dumps(
        {"parameters": parameters, "gflops": gflops, "input_shape": [1, 1, 40, 56, 40], "batch_size": 1}))
    # batch null: the plan's
    (fold_dir / "config.yaml").write_text(f"configuration: 3d_fullres\ntrainer:\n  max_epochs: {epochs}\nsampling:\n"
                                          f"  iterations_per_epoch: {iterations}\n  batch_size: {batch or 'null'}\n")
    (fold_dir / "plan.json").write_text(json.dumps({"configurations": {"3d_fullres": {"batch_size": 8}}}))
    return fold_dir


def _timing(fold: int, gpu: float | None = 3.0) -> dict:
    return {"train_s": 3600.0 + 60 * fold, "epoch_s_median": 10.0 + fold, "iterations_per_epoch": 50,
            "peak_gpu_memory_gb": None if gpu is None else gpu + fold, "peak_rss_gb": 2.0 + fold,
            "inference_s_per_case": 0.5 + 0.1 * fold, "device": "NVIDIA H100"}


@pytest.fixture
def experiment(tmp_path) -> Path:
    """unet (baseline) and resenc_unet with both folds; swin_unetr with fold 1 unfinished; vilu_net with
    nothing finished; a set-aside fold of the baseline that must not count."""
    rng = np.random.default_rng(0)
    exp = tmp_path / "Task04_Hippocampus_benchmark"
    for fold in (0, 1):
        make_fold(exp / "unet__dice_ce", fold, _case_rows(fold, rng, 0.0), _timing(fold), parameters=5_600_000,
                  gflops=38.0)
        make_fold(exp / "resenc_unet__dice_ce", fold, _case_rows(fold, rng, 0.03), _timing(fold, gpu=5.0),
                  parameters=25_900_000, gflops=58.0)
    rows = _case_rows(0, rng, -0.01)
    rows[3]["dice_Posterior"] = float("nan")  # a class absent from both masks of one case
    make_fold(exp / "swin_unetr__dice_ce", 0, rows, None, parameters=62_000_000, gflops=200.0)
    (exp / "swin_unetr__dice_ce" / "fold_1" / "checkpoints").mkdir(parents=True)
    (exp / "vilu_net__dice_ce" / "fold_0").mkdir(parents=True)
    replaced = exp / "unet__dice_ce" / "fold_0.replaced-20260101-000000"
    make_fold(exp / "unet__dice_ce", 9, _case_rows(9, rng, 0.5), _timing(9)).rename(replaced)
    return exp


def _csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _per_case(run_dir: Path, folds=(0, 1)) -> list[dict]:
    return [r for k in folds if (run_dir / f"fold_{k}" / "metrics.json").is_file()
            for r in _csv(run_dir / f"fold_{k}" / "validation" / "per_case.csv")]


def _case_means(rows: list[dict], metric: str = "dice") -> dict[str, float]:
    return {r["case_id"]: float(np.nanmean([float(r[f"{metric}_{c}"]) for c in CLASSES])) for r in rows}


def test_leaderboard_figures_match_numpy_and_scipy(experiment, tmp_path):
    board = build_leaderboard(experiment, n_resamples=2000, seed=5)
    md = write_leaderboard(board, tmp_path / "report")
    rows = {r["run"]: r for r in _csv(tmp_path / "report" / "leaderboard.csv")}
    assert board.baseline == "unet__dice_ce"
    assert set(rows) == {"unet__dice_ce", "resenc_unet__dice_ce", "swin_unetr__dice_ce"}
    assert [r["run"] for r in board.rows][0] == "resenc_unet__dice_ce" and rows["resenc_unet__dice_ce"]["rank"] == "1"

    for name in rows:
        per_case = _per_case(experiment / name)
        row = rows[name]
        assert int(row["cases"]) == len(per_case)  # the set-aside fold is not counted
        means = np.array(list(_case_means(per_case).values()))
        assert float(row["dice_mean"]) == pytest.approx(means.mean())
        assert float(row["dice_mean_std"]) == pytest.approx(means.std())
        for metric in ("dice", "hd95", "nsd"):
            for c in CLASSES:
                values = np.array([float(r[f"{metric}_{c}"]) for r in per_case])
                assert float(row[f"{metric}_{c}"]) == pytest.approx(np.nanmean(values))
                assert float(row[f"{metric}_{c}_std"]) == pytest.approx(np.nanstd(values))
        assert float(row["hd95_mean"]) == pytest.approx(np.mean(list(_case_means(per_case, "hd95").values())))

    base = _case_means(_per_case(experiment / "unet__dice_ce"))
    compared = {}
    for name in ("resenc_unet__dice_ce", "swin_unetr__dice_ce"):
        other = _case_means(_per_case(experiment / name))
        common = sorted(set(base) & set(other))
        a, b = np.array([other[c] for c in common]), np.array([base[c] for c in common])
        row = rows[name]
        assert int(row["paired_cases"]) == len(common)
        assert float(row["dice_diff"]) == pytest.approx(np.mean(a - b))
        assert float(row["p_value"]) == pytest.approx(stats.wilcoxon(a, b).pvalue)
        idx = np.random.default_rng(5).integers(0, len(a), size=(2000, len(a)))
        low, high = np.percentile((a - b)[idx].mean(axis=1), [2.5, 97.5])
        assert float(row["dice_diff_low"]) == pytest.approx(low) and float(row["dice_diff_high"]) == pytest.approx(high)
        compared[name] = float(row["p_value"])
    assert int(rows["swin_unetr__dice_ce"]["paired_cases"]) == CASES_PER_FOLD  # fold 0 only
    # Holm over the two comparisons
    p_small, p_large = sorted(compared.values())
    expected = {p_small: min(1.0, 2 * p_small), p_large: min(1.0, max(2 * p_small, p_large))}
    for name, p in compared.items():
        assert float(rows[name]["p_holm"]) == pytest.approx(expected[p])
        assert rows[name]["significant"] == str(expected[p] <= 0.05)
    assert rows["resenc_unet__dice_ce"]["significant"] == "True"  # +0.03 on every case
    assert rows["unet__dice_ce"]["p_value"] == ""  # the baseline is not compared with itself

    # cost figures
    unet = rows["unet__dice_ce"]
    assert int(unet["parameters"]) == 5_600_000 and float(unet["gflops"]) == 38.0 and unet["patch"] == "40x56x40"
    assert float(unet["epoch_s_median"]) == pytest.approx(np.median([10.0, 11.0]))
    assert float(unet["train_h_total"]) == pytest.approx((3600 + 3660) / 3600)
    assert float(unet["peak_gpu_memory_gb"]) == 4.0 and float(unet["peak_rss_gb"]) == 3.0
    assert float(unet["inference_s_per_case"]) == pytest.approx(0.55)
    assert unet["device"] == "NVIDIA H100" and unet["budget"] == "4 x 50 x 8"
    assert rows["swin_unetr__dice_ce"]["epoch_s_median"] == ""  # no timing recorded: blank, not an error

    # the report names what is missing
    assert "vilu_net__dice_ce: no finished fold with validated cases (unfinished: 0); not ranked" in md
    assert "swin_unetr__dice_ce: fold(s) 1 missing (1 unfinished)" in md
    assert "unequal" not in md
    assert "| 1 | `resenc_unet__dice_ce` |" in md and " * |" in md


def test_plots_are_valid_images(experiment, tmp_path):
    write_leaderboard(build_leaderboard(experiment, n_resamples=200), tmp_path)
    for name in (PLOT_DICE, PLOT_COST):
        path = tmp_path / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0  # something was drawn
    assert f"![leaderboard_dice]({PLOT_DICE})" in (tmp_path / "leaderboard.md").read_text()
    write_leaderboard(build_leaderboard(experiment, n_resamples=200), tmp_path / "no_plots", plots=False)
    assert not list((tmp_path / "no_plots").glob("*.png"))


def test_baseline_choice_and_unequal_budgets(experiment, tmp_path):
    board = build_leaderboard(experiment, baseline="resenc_unet__dice_ce", n_resamples=200)
    rows = {r["run"]: r for r in board.rows}
    assert "p_value" not in rows["resenc_unet__dice_ce"] and rows["unet__dice_ce"]["dice_diff"] < 0
    with pytest.raises(MedsegError, match="vilu_net__dice_ce"):
        build_leaderboard(experiment, baseline="vilu_net__dice_ce")  # has no finished fold
    # without unet__dice_ce the first run is the baseline
    (experiment / "unet__dice_ce").rename(tmp_path / "elsewhere")
    assert build_leaderboard(experiment, n_resamples=200).baseline == "resenc_unet__dice_ce"
    make_fold(experiment / "unetr__dice_ce", 0, _case_rows(0, np.random.default_rng(1), 0.0), epochs=8)
    notes = "\n".join(build_leaderboard(experiment, n_resamples=200).notes)
    assert "unequal training budgets" in notes and "unetr__dice_ce 8 x 50 x 8" in notes
    (experiment / "unetr__dice_ce").rename(tmp_path / "unetr")
    make_fold(experiment / "umamba_bot__dice_ce", 0, _case_rows(0, np.random.default_rng(1), 0.0), batch=2)
    notes = "\n".join(build_leaderboard(experiment, n_resamples=200).notes)
    assert "umamba_bot__dice_ce 4 x 50 x 2" in notes


def test_no_common_cases_and_no_results(tmp_path):
    rng = np.random.default_rng(2)
    make_fold(tmp_path / "exp" / "unet__dice_ce", 0, _case_rows(0, rng, 0.0))
    make_fold(tmp_path / "exp" / "umamba_bot__dice_ce", 1, _case_rows(1, rng, 0.0))
    board = build_leaderboard(tmp_path / "exp", n_resamples=100)
    other = next(r for r in board.rows if r["run"] == "umamba_bot__dice_ce")
    assert other["paired_cases"] == 0 and np.isnan(other["p_value"]) and other["significant"] is False
    assert "no common cases" in write_leaderboard(board, tmp_path / "out", plots=False)
    (tmp_path / "empty" / "unet__dice_ce" / "fold_0").mkdir(parents=True)
    with pytest.raises(MedsegError, match="no finished folds"):
        build_leaderboard(tmp_path / "empty")
    with pytest.raises(MedsegError, match="no such directory"):
        build_leaderboard(tmp_path / "absent")


def test_cv_summary_ignores_folds_set_aside(experiment):
    summarize_experiment(experiment)
    rows = _csv(experiment / "cv_summary.csv")
    unet_all = next(r for r in rows
                    if r["run"] == "unet__dice_ce" and r["fold"] == "all" and r["metric"] == "dice_mean")
    assert int(unet_all["n"]) == 2 * CASES_PER_FOLD
    assert {r["fold"] for r in rows if r["run"] == "unet__dice_ce"} == {"all", "fold_0", "fold_1"}


def test_cv_summary_cli_writes_the_leaderboard_for_several_runs(experiment, tmp_path):
    exe = Path(sys.executable).with_name("medseg-cv-summary")
    out = tmp_path / "report"
    result = subprocess.run([str(exe), f"experiment_dir={experiment}", f"output={out}",
                             "leaderboard.n_resamples=500", "leaderboard.baseline=unet__dice_ce"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("cv_summary.csv", "cv_summary.md", "leaderboard.csv", "leaderboard.md", PLOT_DICE, PLOT_COST):
        assert (out / name).is_file(), name
    assert "# Leaderboard: Task04_Hippocampus_benchmark" in result.stdout
    # one run: the CV table only, unless asked
    single = tmp_path / "single"
    result = subprocess.run([str(exe), f"experiment_dir={experiment / 'unet__dice_ce'}", f"output={single}"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (single / "cv_summary.csv").is_file() and not (single / "leaderboard.csv").exists()


def test_model_loss_and_budget_come_from_the_run_record(experiment):
    """A fold's run.json (what the run actually used) wins over folder names and the raw config."""
    from medseg.record import Component, RunRecord

    run = experiment / "unet__dice_ce"
    for fold in (0, 1):
        record = RunRecord(fold=fold, configuration="3d_fullres", dataset="d", num_train_cases=8, num_val_cases=2,
                           model=Component("resenc_unet", {}), loss=Component("dice_focal", {}),
                           optimizer=Component("torch.optim.SGD", {"lr": 0.01}), scheduler=None, spatial_dims=3,
                           patch_size=[40, 56, 40], batch_size=3, oversample_foreground=0.33, iterations_per_epoch=7,
                           max_epochs=4, seed=1, precision="32-true", accelerator="cpu", devices=1,
                           gradient_clip_val=12.0, augmentation=None, augment_on_device=False, num_workers=0,
                           plan_key="k", validation={})
        record.save(run / f"fold_{fold}" / "run.json")
    board = build_leaderboard(experiment, baseline="unet__dice_ce", n_resamples=200)
    row = {r["run"]: r for r in board.rows}["unet__dice_ce"]
    assert (row["model"], row["loss"]) == ("resenc_unet", "dice_focal")
    assert "unet__dice_ce 4 x 7 x 3" in "\n".join(board.notes)  # the record's budget, not config.yaml's


# ---- ablation controls and training settings ----------------------------------------------------------------------

SGD = {"lr": 0.01, "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5}
ADAMW = {"lr": 1e-3, "weight_decay": 3e-5, "betas": [0.9, 0.999]}


def write_record(fold_dir: Path, model: str, optimizer: tuple[str, dict] = ("torch.optim.AdamW", ADAMW),
                 scheduler: tuple[str, dict] | None = ("medseg.training.schedules.warmup_cosine",
                                                       {"warmup_epochs": None, "min_lr_ratio": 0.0})) -> None:
    """The fold's run.json as training writes it: what the leaderboard reads model, optimiser and schedule from."""
    from medseg.record import Component, RunRecord

    RunRecord(fold=int(fold_dir.name.split("_")[1]), configuration="3d_fullres", dataset="d", num_train_cases=8,
              num_val_cases=2, model=Component(model, {}), loss=Component("dice_ce", {}),
              optimizer=Component(*optimizer), scheduler=Component(*scheduler) if scheduler else None,
              spatial_dims=3, patch_size=[40, 56, 40], batch_size=8, oversample_foreground=0.33,
              iterations_per_epoch=50, max_epochs=4, seed=1, precision="32-true", accelerator="cpu", devices=1,
              gradient_clip_val=12.0, augmentation=None, augment_on_device=False, num_workers=0, plan_key="k",
              validation={}).save(fold_dir / "run.json")


def test_each_family_is_compared_with_its_own_control(experiment, tmp_path):
    md = write_leaderboard(build_leaderboard(experiment, n_resamples=100), tmp_path / "before", plots=False)
    assert "own control" not in md and "control_run" not in _csv(tmp_path / "before" / "leaderboard.csv")[0]
    rng = np.random.default_rng(3)
    for fold in (0, 1):  # the block helps: +0.02 on every case over its control
        make_fold(experiment / "umamba_bot__dice_ce", fold, _case_rows(fold, rng, 0.02), parameters=26_000_000,
                  gflops=60.0)
        make_fold(experiment / "umamba_bot_control__dice_ce", fold, _case_rows(fold, rng, 0.0),
                  parameters=25_900_000, gflops=58.0)
        # the blocks hurt: swin_unetr (-0.01, fold 0 only) against a control 0.03 better
        make_fold(experiment / "swin_unetr_control__dice_ce", fold, _case_rows(fold, rng, 0.02))
    # a control of another loss has no family run to be compared with
    make_fold(experiment / "umamba_bot_control__dice_focal", 0, _case_rows(0, rng, 0.0))

    board = build_leaderboard(experiment, n_resamples=2000, seed=5)
    md = write_leaderboard(board, tmp_path / "report", plots=False)
    rows = {r["run"]: r for r in _csv(tmp_path / "report" / "leaderboard.csv")}
    assert {n for n, r in rows.items() if r["control_run"]} == {"umamba_bot__dice_ce", "swin_unetr__dice_ce"}
    assert rows["umamba_bot__dice_ce"]["control_run"] == "umamba_bot_control__dice_ce"
    p_values = {}
    for name, n in (("umamba_bot__dice_ce", 2 * CASES_PER_FOLD), ("swin_unetr__dice_ce", CASES_PER_FOLD)):
        row = rows[name]
        own = _case_means(_per_case(experiment / name))
        control = _case_means(_per_case(experiment / row["control_run"]))
        common = sorted(set(own) & set(control))
        a, b = np.array([own[c] for c in common]), np.array([control[c] for c in common])
        assert int(row["control_paired_cases"]) == len(common) == n
        assert float(row["control_dice_diff"]) == pytest.approx(np.mean(a - b))
        assert float(row["control_p_value"]) == pytest.approx(stats.wilcoxon(a, b).pvalue)
        idx = np.random.default_rng(5).integers(0, len(a), size=(2000, len(a)))
        low, high = np.percentile((a - b)[idx].mean(axis=1), [2.5, 97.5])
        assert float(row["control_dice_diff_low"]) == pytest.approx(low)
        assert float(row["control_dice_diff_high"]) == pytest.approx(high)
        p_values[name] = float(row["control_p_value"])
    assert float(rows["umamba_bot__dice_ce"]["control_dice_diff"]) > 0.01  # the family beats its control
    assert float(rows["swin_unetr__dice_ce"]["control_dice_diff"]) < -0.02  # the control beats the family
    # Holm across the two control comparisons only (the baseline comparisons are adjusted among themselves)
    p_small, p_large = sorted(p_values.values())
    expected = {p_small: min(1.0, 2 * p_small), p_large: min(1.0, max(2 * p_small, p_large))}
    for name, p in p_values.items():
        assert float(rows[name]["control_p_holm"]) == pytest.approx(expected[p])
    assert rows["umamba_bot__dice_ce"]["control_significant"] == "True"
    assert rows["umamba_bot_control__dice_ce"]["control_run"] == "" and rows["umamba_bot_control__dice_ce"]["p_value"]

    section = md.split("## Family vs its own control")[1].split("## Per class")[0]
    umamba = rows["umamba_bot__dice_ce"]
    assert (f"| `umamba_bot__dice_ce` | `umamba_bot_control__dice_ce` | {float(umamba['control_dice_diff']):+.4f} "
            f"[{float(umamba['control_dice_diff_low']):+.4f}, {float(umamba['control_dice_diff_high']):+.4f}] * | "
            f"{2 * CASES_PER_FOLD} |") in section
    assert "| +0.10 | +2.0 |" in section  # the Mamba layer's parameters (M) and GFLOPs
    assert "across the 2 control comparisons" in section and "| `swin_unetr__dice_ce` |" in section
    assert ("umamba_bot_control__dice_focal: a control without a umamba_bot run of the same loss and "
            "configuration (dice_focal, 3d_fullres); not compared") in md


def test_unequal_optimisers_and_schedulers_are_named_per_run(tmp_path):
    rng = np.random.default_rng(4)
    exp = tmp_path / "exp"
    runs = {"unet__dice_ce": "unet", "umamba_bot__dice_ce": "umamba_bot",
            "umamba_bot_control__dice_ce": "umamba_bot_control"}
    for name, model in runs.items():
        write_record(make_fold(exp / name, 0, _case_rows(0, rng, 0.0)), model)
    notes = "\n".join(build_leaderboard(exp, n_resamples=100).notes)
    assert "unequal" not in notes and "not matched" not in notes  # all AdamW + warm-up cosine, equal budgets

    # nnU-Net's SGD + poly for the U-Net, and a control trained with another learning rate
    write_record(exp / "unet__dice_ce" / "fold_0", "unet", ("torch.optim.SGD", SGD),
                 ("medseg.training.schedules.poly", {"power": 0.9}))
    write_record(exp / "umamba_bot_control__dice_ce" / "fold_0", "umamba_bot_control",
                 ("torch.optim.AdamW", {**ADAMW, "lr": 3e-4}))
    board = build_leaderboard(exp, n_resamples=100)
    notes = "\n".join(board.notes)
    assert ("unequal optimisers: umamba_bot__dice_ce AdamW lr 0.001 betas [0.9, 0.999]; "
            "umamba_bot_control__dice_ce AdamW lr 0.0003 betas [0.9, 0.999]; "
            "unet__dice_ce SGD lr 0.01 momentum 0.99 nesterov True") in notes
    assert ("unequal schedulers: umamba_bot__dice_ce warmup_cosine min_lr_ratio 0 warmup_epochs None; "
            "umamba_bot_control__dice_ce warmup_cosine min_lr_ratio 0 warmup_epochs None; "
            "unet__dice_ce poly power 0.9") in notes
    assert ("umamba_bot__dice_ce vs its control umamba_bot_control__dice_ce: unequal optimiser; the comparison is "
            "not matched") in notes
    assert "unequal optimisers" in write_leaderboard(board, tmp_path / "out", plots=False)
    # a run of an older version (no run.json): its optimiser is unknown, and said to be
    (exp / "unet__dice_ce" / "fold_0" / "run.json").unlink()
    notes = "\n".join(build_leaderboard(exp, n_resamples=100).notes)
    assert "unet__dice_ce unknown (no run.json)" in notes and "unequal schedulers" not in notes
