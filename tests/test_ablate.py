"""`mambaout ablate`: tiny two-mixer ablations on a synthetic tree through the real engine; results, table and plot;
finished runs skipped, an interrupted run resumed, other settings in the same folder refused; `--grid` parsing,
grid rows reaching the runs' configs, growing a grid, and the paired-by-seed intervals against scipy;
`--task segment` on a tiny Pathfinder-segmentation tree with per-class IoU, and `--metric` re-reporting the same
runs."""

import json
import os
import shlex
import signal

import pytest
import yaml
from scipy import stats
from train_fixtures import FAST, make_tree

from mambaout.ablate import (
    AblationSettings,
    paired_difference,
    parse_grid,
    plot_ablation,
    results_markdown,
    run_ablation,
    summarize,
)
from mambaout.ablate import runner as ablate_runner
from mambaout.cli import main
from mambaout.data.named import SEGMENT_CLASSES
from mambaout.dense.config import SEGMENT_RECIPES
from mambaout.errors import UserError
from mambaout.rundir import RunDir
from mambaout.train import TrainingInterrupted, load_classifier
from mambaout.train.checkpoint import read_checkpoint

MIXERS = ("conv", "conv_ssm")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A 40k-parameter recipe (1-2 s per run) and a 2-class tree."""
    root = tmp_path_factory.mktemp("ablate")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump({"model": "mambaout_femto", **FAST}))
    return path, make_tree(root / "data", classes=("a", "b"), train=8, val=4)


def settings(recipe, output, **kw) -> AblationSettings:
    path, tree = recipe
    return AblationSettings(**{"mixers": MIXERS, "config": str(path), "data": str(tree), "epochs": 2, "seeds": 1,
                               "output": str(output), **kw})  # fmt: skip


def test_interrupted_ablation_resumes_and_a_finished_one_is_skipped(recipe, tmp_path, monkeypatch, capsys):
    out = tmp_path / "abl"
    original = RunDir.append_metrics

    def stop_after_the_ssm_runs_first_epoch(self, record):
        original(self, record)
        if self.path.name == "conv_ssm-seed0" and record["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the trainer saves last.pth and stops after this epoch

    monkeypatch.setattr(RunDir, "append_metrics", stop_after_the_ssm_runs_first_epoch)
    with pytest.raises(TrainingInterrupted):
        run_ablation(settings(recipe, out))
    monkeypatch.undo()
    assert [r["mixer"] for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())] == ["conv"]
    conv_last = out / "runs" / "conv-seed0" / "last.pth"
    conv_mtime = conv_last.stat().st_mtime_ns

    results = run_ablation(settings(recipe, out))  # conv skipped, conv_ssm resumed at epoch 2
    assert conv_last.stat().st_mtime_ns == conv_mtime
    ssm = RunDir(out / "runs" / "conv_ssm-seed0")
    assert [r["epoch"] for r in ssm.read_metrics()] == [1, 2]
    assert [(r["mixer"], r["seed"], r["epochs"]) for r in results] == [("conv", 0, 2), ("conv_ssm", 0, 2)]
    for r in results:
        assert 0 <= r["top5"] <= 100 and r["top1"] <= r["top5"]
        assert r["params"] > 0 and r["macs"] > 0 and r["infer_img_per_s"] > 0 and r["train_img_per_s"] > 0
        assert r["wall_s"] > 0 and r["model_kwargs"]["token_mixer"] == r["mixer"]
    by_mixer = {r["mixer"]: r for r in results}
    assert by_mixer["conv_ssm"]["macs"] > by_mixer["conv"]["macs"]  # the scan's MACs are counted
    # each run is an ordinary checkpoint: it reloads with its mixer
    model = load_classifier(str(out / "runs" / "conv_ssm-seed0" / "best.pth")).model
    assert type(model.stages[0].blocks[0].mixer).__name__ == "SSMMixer"

    table = (out / "results.md").read_text()
    assert "| conv | 1 |" in table and "| conv_ssm | 1 |" in table and "Δ top-1 vs conv" in table
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    capsys.readouterr()  # the CLI on the finished ablation trains nothing and prints the table
    argv = ["ablate", "--mixers", ",".join(MIXERS), "--config", str(recipe[0]), "--data", str(recipe[1])]
    assert main([*argv, "--epochs", "2", "--seeds", "1", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 run(s) already recorded" in printed and "| conv_ssm | 1 |" in printed
    assert conv_last.stat().st_mtime_ns == conv_mtime

    with pytest.raises(UserError, match="holds an ablation with other settings"):
        run_ablation(settings(recipe, out, epochs=3))


def _run(mixer, seed, top1, settings=None, **extra):
    """A results.jsonl record as `_record` writes it (`settings` None: a line from before the grid)."""
    speeds = {"train_img_per_s": 50.0, "infer_img_per_s": 200.0 + seed, "wall_s": 9.0, "load": "1.0/1.0/1.0"}
    record = {"mixer": mixer, "seed": seed, "top1": top1, "top5": 100.0, "params": 10, "macs": 2_000_000, **speeds}
    return {**record, **({"settings": settings} if settings is not None else {}), **extra}


def test_legacy_records_without_settings_summarise_by_mixer_against_the_first():
    results = [_run("conv", 0, 90.0), _run("conv", 1, 92.0), _run("causal_conv", 0, 85.0), _run("causal_conv", 1, 86.0)]
    conv, causal = summarize(results)
    assert conv.settings == {"token_mixer": "conv"} and causal.settings == {"token_mixer": "causal_conv"}
    assert (conv.runs, conv.mean, conv.std) == (2, 91.0, pytest.approx(2**0.5))
    assert causal.mean == 85.5 and causal.infer_img_per_s == 200.5 and causal.others == {"top5": 100.0}
    assert causal.delta.n == 2 and causal.delta.mean == pytest.approx(-5.5)  # d = -5, -6
    assert conv.chance is None
    table = results_markdown(results, "title", "mambaout ablate")
    assert "| conv | 2 | 91.00 ± 1.41 | reference | 2 |" in table
    assert "| causal_conv | 2 | 85.50 ± 0.71 | -5.50 [-11.85, +0.85] | 2 |" in table  # 0.5 · t(0.975, 1) = 6.35
    assert "Δ top-1 vs conv [95% CI]" in table and "- chance: n/a" in table


def test_legacy_ablation_on_disk_is_found_again_without_training(recipe, tmp_path, monkeypatch):
    out = tmp_path / "old"
    out.mkdir()
    legacy = settings(recipe, out)
    identity = {k: v for k, v in legacy.identity().items() if k != "grid"}  # ablation.json before the grid
    (out / "ablation.json").write_text(json.dumps(identity))
    lines = [_run("conv", 0, 75.0, epochs=2), _run("conv_ssm", 0, 80.0, epochs=2)]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))

    def no_training(*args, **kwargs):
        raise AssertionError("a recorded run was trained again")

    monkeypatch.setattr(ablate_runner, "run_training", no_training)
    assert [r["mixer"] for r in run_ablation(settings(recipe, out), log=lambda _: None)] == ["conv", "conv_ssm"]
    assert "| conv_ssm | 1 | 80.00 ± 0.00 | +5.00 (n=1, no interval) | 1 |" in (out / "results.md").read_text()
    with pytest.raises(UserError, match=r"grid \[\] here, \['kernel_size'\] now"):
        run_ablation(settings(recipe, out, grid={"kernel_size": (3,)}))


def test_paired_interval_pairs_by_seed_and_matches_scipy():
    a = {0: 90.0, 1: 92.0, 2: 91.0}
    b = {2: 91.5, 0: 91.5, 1: 94.0}  # d = 1.5, 2.0, 0.5 (listed out of seed order: pairing is by seed)
    diff = paired_difference(b, a)
    t = 4.302652729911275  # t(0.975, 2)
    mean, sd = 4 / 3, (((1.5 - 4 / 3) ** 2 + (2 - 4 / 3) ** 2 + (0.5 - 4 / 3) ** 2) / 2) ** 0.5
    assert diff.n == 3 and diff.mean == pytest.approx(mean)
    assert (diff.low, diff.high) == (pytest.approx(mean - t * sd / 3**0.5), pytest.approx(mean + t * sd / 3**0.5))
    scipy_ci = stats.ttest_rel([b[s] for s in (0, 1, 2)], [a[s] for s in (0, 1, 2)]).confidence_interval(0.95)
    assert (diff.low, diff.high) == (pytest.approx(scipy_ci.low), pytest.approx(scipy_ci.high))
    assert not diff.excludes_zero and diff.text() == "+1.33 [-0.56, +3.23]"

    missing = paired_difference({3: 99.0, 2: 93.0, 0: 90.5}, a)  # seeds 0 and 2 shared: d = 0.5, 2.0
    scipy_ci = stats.ttest_rel([90.5, 93.0], [90.0, 91.0]).confidence_interval(0.95)
    assert missing.n == 2 and missing.mean == pytest.approx(1.25)
    assert (missing.low, missing.high) == (pytest.approx(scipy_ci.low), pytest.approx(scipy_ci.high))

    sure = paired_difference({0: 92.0, 1: 94.1, 2: 92.9}, a)  # d = 2.0, 2.1, 1.9
    assert sure.excludes_zero and sure.text().endswith(" *") and sure.low > 0
    assert paired_difference({1: 95.0}, a).text() == "+3.00 (n=1, no interval)"
    assert paired_difference({7: 95.0}, a).text() == "no shared seed"


def test_grid_table_has_a_row_per_setting_in_grid_order_with_paired_intervals_and_chance(tmp_path):
    def row(kernel, seed, top1):
        return _run("conv", seed, top1, {"token_mixer": "conv", "kernel_size": kernel}, num_classes=4)

    # kernel 7 ran first, but the grid lists 3 first: the table follows the grid, and 3 is the reference
    results = [row(7, 0, 92.0), row(7, 1, 94.1), row(7, 2, 92.9), row(3, 0, 90.0), row(3, 1, 92.0), row(3, 2, 91.0)]
    results += [row(11, 3, 99.0), row(11, 2, 93.0), row(11, 0, 90.5)]
    order = [{"token_mixer": "conv", "kernel_size": k} for k in (3, 7, 11)]
    three, seven, eleven = summarize(results, order)
    assert [r.settings["kernel_size"] for r in (three, seven, eleven)] == [3, 7, 11]
    half = stats.t.interval(0.95, 2, scale=stats.sem([90.0, 92.0, 91.0]))[1]
    assert three.interval == pytest.approx(half) and three.chance == 25.0
    table = results_markdown(results, "title", "mambaout ablate", order)
    assert "| mixer | kernel_size | runs | top-1 (mean ± std) | Δ top-1 vs conv, kernel_size=3 [95% CI] | n |" in table
    assert "| conv | 3 | 3 | 91.00 ± 1.00 | reference | 3 |" in table
    assert "| conv | 7 | 3 | 93.00 ± 1.05 | +2.00 [+1.75, +2.25] * | 3 |" in table
    assert "| conv | 11 | 3 | 94.17 ± 4.37 | +1.25 [-8.28, +10.78] | 2 |" in table
    assert "`*`: the interval excludes zero" in table and "contains 0 is no evidence of a difference" in table
    assert "- chance: 25.00% top-1 (1 of 4 classes)" in table
    png = plot_ablation(results, tmp_path / "a.png", "title", order)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mixers", "conv,mamba"], "--mixers mamba: choose from conv, conv_ssm"),
        (["--seeds", "0"], "--seeds: must be >= 1, got 0"),
        (["--model-kwargs", "[1, 2]"], "--model-kwargs: expects a YAML mapping"),
        (["--model-kwargs", "{token_mixer: conv}"], "leave token_mixer out"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, capsys, argv, message):
    assert main(["ablate", *argv, "--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_grid_values_are_yaml_split_outside_brackets_and_the_command_gives_them_back():
    grid = parse_grid(
        [
            "kernel_size=3,7,11",
            "conv_ratio=0.5,1.0",
            "dims=[16,32,64,96],[24, 48, 96, 144]",
            "data=pathfinder:32-6,'a,b'",
            "base_lr=1e-3,2.5e-3",
            "mixer_kwargs={d_state: 8, expand: 2},{d_state: 16}",
        ]
    )
    assert grid == {
        "kernel_size": (3, 7, 11),
        "conv_ratio": (0.5, 1.0),
        "dims": ([16, 32, 64, 96], [24, 48, 96, 144]),
        "data": ("pathfinder:32-6", "a,b"),
        "base_lr": (1e-3, 2.5e-3),
        "mixer_kwargs": ({"d_state": 8, "expand": 2}, {"d_state": 16}),
    }
    assert [type(v) for v in (*grid["kernel_size"], *grid["conv_ratio"], *grid["base_lr"])] == [int] * 3 + [float] * 4
    ablation = AblationSettings(mixers=("conv", "conv_ssm"), grid=grid)
    argv = shlex.split(ablation.command())
    items = argv[argv.index("--grid") + 1 : argv.index("--seeds")]
    assert parse_grid(items) == grid and argv[argv.index("--mixers") + 1] == "conv,conv_ssm"
    rows = ablation.rows()
    assert len(rows) == 2 * 3 * 2 * 2 * 2 * 2 * 2
    assert rows[0] == {"token_mixer": "conv", **{k: v[0] for k, v in grid.items()}}
    assert rows[1]["mixer_kwargs"] == {"d_state": 16} and rows[-1]["token_mixer"] == "conv_ssm"  # mixers first
    assert ablation.run_name(rows[0]) == (
        "conv-kernel_size=3-conv_ratio=0.5-dims=16x32x64x96-data=pathfinder_32-6-base_lr=0.001-"
        "mixer_kwargs=d_state.8xexpand.2"
    )
    same = AblationSettings(grid={"token_mixer": ("conv", "conv_ssm"), **grid})
    assert (same.mixers, same.grid, same.command()) == (ablation.mixers, ablation.grid, ablation.command())
    assert AblationSettings(mixers=("conv",)).run_name({"token_mixer": "conv"}) == "conv"  # legacy names


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--grid", "kernel_size"], "--grid 'kernel_size': expects KEY=V1,V2"),
        (["--grid", "kernel_size="], "--grid kernel_size: give at least one value"),
        (["--grid", "kernel_size=3,,5"], "--grid kernel_size: an empty value"),
        (["--grid", "kernel_size=3", "kernel_size=5"], "--grid kernel_size: given twice"),
        (["--grid", "dims=[8,16],[8"], "--grid dims: unbalanced brackets"),
        (["--grid", "seed=0,1"], "--grid seed: not a grid key (--seeds"),
        (["--grid", "output=a,b"], "--grid output: not a grid key"),
        (["--grid", "model=mambaout_femto"], "--grid model: not a grid key (--model"),
        (["--grid", "kernel_sise=3,5"], "--grid kernel_sise: neither a run setting"),
        (["--grid", "token_mixer=conv", "--mixers", "conv"], "--mixers and --grid token_mixer=... both"),
        (["--grid", "kernel_size=3", "--model-kwargs", "{kernel_size: 5}"], "--grid kernel_size and --model-kwargs"),
        (["--grid", "epochs=1,2", "--epochs", "3"], "--grid epochs and --epochs both"),
        (["--grid", "data=a:b,a_b"], "would share the run folder runs/conv-data=a_b-seed<k>"),
    ],
)
def test_bad_grids_are_one_line(tmp_path, capsys, argv, message):
    mixers = [] if "--mixers" in argv else ["--mixers", "conv"]
    assert main(["ablate", *mixers, *argv, "--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "a").exists()


def test_grid_rows_reach_the_runs_and_a_grown_grid_trains_only_the_new_rows(recipe, tmp_path, capsys):
    out = tmp_path / "grid"
    grid = {"kernel_size": (3, 5), "drop_path": (0.1,)}
    results = run_ablation(settings(recipe, out, mixers=("conv",), grid=grid, epochs=1, seeds=2))
    names = sorted(p.name for p in (out / "runs").iterdir())
    assert names == [f"conv-kernel_size={k}-drop_path=0.1-seed{s}" for k in (3, 5) for s in (0, 1)]
    for r in results:
        saved = read_checkpoint(
            out / "runs" / f"conv-kernel_size={r['settings']['kernel_size']}-drop_path=0.1-seed{r['seed']}" / "last.pth"
        )
        assert saved["config"]["model_kwargs"]["kernel_size"] == r["settings"]["kernel_size"]
        assert saved["config"]["model_kwargs"]["token_mixer"] == "conv" and saved["config"]["model_kwargs"]["dims"]
        assert saved["config"]["drop_path"] == 0.1 and saved["config"]["seed"] == r["seed"]
        assert r["num_classes"] == 2 and list(r["settings"]) == ["token_mixer", "kernel_size", "drop_path"]
    assert [(r["settings"]["kernel_size"], r["seed"]) for r in results] == [(3, 0), (5, 0), (3, 1), (5, 1)]
    assert json.loads((out / "ablation.json").read_text())["grid"] == ["kernel_size", "drop_path"]
    mtimes = {p.name: (p / "last.pth").stat().st_mtime_ns for p in (out / "runs").iterdir()}

    capsys.readouterr()  # the CLI with one more kernel size trains its two runs only
    path, tree = recipe
    argv = ["ablate", "--mixers", "conv", "--grid", "kernel_size=3,5,7", "drop_path=0.1", "--config", str(path)]
    assert main([*argv, "--data", str(tree), "--epochs", "1", "--seeds", "2", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 run(s) already recorded in results.jsonl, 2 to go" in printed
    assert {p.name: (p / "last.pth").stat().st_mtime_ns for p in (out / "runs").iterdir() if p.name in mtimes} == mtimes
    assert len(list((out / "runs").iterdir())) == 6
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| conv |")]
    assert [line.split(" | ")[1] for line in rows] == ["3", "5", "7"] and "| 0.1 | 2 |" in rows[2]
    assert "reference" in rows[0] and "- chance: 50.00% top-1 (1 of 2 classes)" in table
    assert "--grid kernel_size=3,5,7 drop_path=0.1" in table

    for other in ({"kernel_size": (3, 5)}, {"kernel_size": (3,), "drop_path": (0.1,), "conv_ratio": (1.0,)}):
        with pytest.raises(UserError, match="holds an ablation with other settings"):
            run_ablation(settings(recipe, out, mixers=("conv",), grid=other, epochs=1, seeds=2))


def test_a_bad_grid_value_stops_before_anything_is_written_and_the_corrected_grid_runs(recipe, tmp_path):
    out = tmp_path / "bad"
    bad = {"dims": ([8, 16, 24, 32], [8, 16])}  # the second does not match the recipe's four depths
    with pytest.raises(UserError, match=r"conv, dims=\[8, 16\]: .*cannot build .*nothing was trained"):
        run_ablation(settings(recipe, out, mixers=("conv",), grid=bad, epochs=1))
    assert not out.exists()
    (result,) = run_ablation(settings(recipe, out, mixers=("conv",), grid={"dims": ([8, 16, 24, 32],)}, epochs=1))
    assert result["model_kwargs"]["dims"] == [8, 16, 24, 32] and (out / "runs" / "conv-dims=8x16x24x32-seed0").is_dir()


def test_top5_metric_names_the_table_and_keeps_top1_beside_it():
    results = [_run("conv", s, 90.0 + s, num_classes=10, top5=98.0 - s) for s in (0, 1)]
    results += [_run("conv_ssm", s, 80.0, num_classes=10, top5=99.0) for s in (0, 1)]
    table = results_markdown(results, "title", "mambaout ablate --metric top5", metric="top5")
    assert "| mixer | runs | top-5 (mean ± std) | Δ top-5 vs conv [95% CI] | n | top-1 | params (M) |" in table
    assert "| conv | 2 | 97.50 ± 0.71 | reference | 2 | 90.50 |" in table
    assert "| conv_ssm | 2 | 99.00 ± 0.00 | +1.50 [-4.85, +7.85] | 2 | 80.00 |" in table
    assert "- chance: 50.00% top-5 (5 of 10 classes)" in table and "- Δ top-5: each row minus" in table


def _segmentation_run(mixer, seed, joined):
    """A results.jsonl record as `_segmentation_record` writes it."""
    class_iou = {"background": 90.0, "target_apart": 10.0, "target_joined": joined}
    figures = {"miou": 50.0, "macc": 60.0, "aacc": 95.0, "class_iou": class_iou, "num_classes": 3, "iters": 2}
    record = _run(mixer, seed, 0.0, {"token_mixer": mixer}, backbone_params=4, **figures)
    return {k: v for k, v in record.items() if k not in ("top1", "top5")}


def test_a_class_iou_metric_leaves_out_runs_where_the_class_is_undefined_and_shows_no_chance(tmp_path):
    results = [_segmentation_run("conv", 0, 20.0), _segmentation_run("conv", 1, 30.0)]
    results += [
        _segmentation_run("conv_ssm", 0, 40.0),
        _segmentation_run("conv_ssm", 1, None),
    ]  # neither labelled nor predicted
    conv, ssm = summarize(results, metric="iou:target_joined")
    assert (conv.mean, ssm.mean, ssm.runs, ssm.by_seed) == (25.0, 40.0, 2, {0: 40.0})
    assert ssm.delta.n == 1 and ssm.delta.mean == 20.0 and ssm.chance is None and ssm.others["miou"] == 50.0
    table = results_markdown(results, "title", "mambaout ablate --task segment", metric="iou:target_joined")
    header = "| mixer | runs | IoU target_joined (mean ± std) | Δ IoU target_joined vs conv [95% CI] | n |"
    assert header + " mIoU | mAcc | aAcc | params (M) | backbone params (M) | MMACs/img |" in table
    assert "| conv_ssm | 2 | 40.00 ± 0.00 | +20.00 (n=1, no interval) | 1 | 50.00 | 60.00 | 95.00 | 0.000 |" in table
    assert "chance" not in table and "class_iou" in table
    plot = plot_ablation(results, tmp_path / "seg.png", "title", metric="iou:target_joined")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def segment_recipe(tmp_path, monkeypatch):
    """pathfinder_seg_cpu cut to two steps of two images with narrow heads; the data tree written under tmp_path."""
    monkeypatch.setenv("MAMBAOUT_CACHE", str(tmp_path / "cache"))
    recipe = yaml.safe_load((SEGMENT_RECIPES / "pathfinder_seg_cpu.yaml").read_text())
    recipe.update(iters=2, warmup_iters=0, batch_size=2, eval_interval=1, threads=1, workers=0, amp="none")
    recipe.update(head_channels=16, aux_channels=8)
    path = tmp_path / "seg_tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _segment_argv(recipe, out, *extra):
    tiny = "{depths: [1, 1, 1, 1], dims: [8, 16, 24, 32], stem_stride: 1}"
    argv = ["ablate", "--task", "segment", "--mixers", "conv,conv_ssm", "--data", "pathfinder-seg:32-6:4/2"]
    return [*argv, "--model-kwargs", tiny, "--config", str(recipe), "--seeds", "1", "--output", str(out), *extra]


def test_segmentation_ablation_records_class_iou_and_another_metric_only_rewrites_the_report(
    segment_recipe, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "seg"
    assert main(_segment_argv(segment_recipe, out, "--metric", "iou:target_joined")) == 0
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["mixer"], r["seed"], r["iters"], r["epochs"]) for r in results] == [
        ("conv", 0, 2, 1),
        ("conv_ssm", 0, 2, 1),
    ]
    for r in results:
        assert list(r["class_iou"]) == list(SEGMENT_CLASSES) and r["num_classes"] == 3
        assert all(0 <= r[k] <= 100 for k in ("miou", "macc", "aacc"))
        assert r["params"] > r["backbone_params"] > 0 and r["macs"] > 0 and r["infer_img_per_s"] > 0
        assert r["model_kwargs"] == {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "stem_stride": 1,
                                     "token_mixer": r["mixer"]}  # fmt: skip
        # the final evaluation of last.pth is the engine's own: the same mIoU as the last epoch's record
        assert RunDir(r["run_dir"]).read_metrics()[-1]["val_miou"] == pytest.approx(r["miou"])
        assert read_checkpoint(out / "runs" / f"{r['mixer']}-seed0" / "last.pth")["task"] == "segmentation"
    by_mixer = {r["mixer"]: r for r in results}
    assert by_mixer["conv_ssm"]["macs"] > by_mixer["conv"]["macs"]  # the scan's MACs are counted
    assert json.loads((out / "ablation.json").read_text())["task"] == "segment"
    table = (out / "results.md").read_text()
    assert "| mixer | runs | IoU target_joined (mean ± std) | Δ IoU target_joined vs conv [95% CI] |" in table
    assert "--task segment --mixers conv,conv_ssm --seeds 1 --metric iou:target_joined" in table
    assert "UperNet on mambaout_femto" in table and "2 steps" in table and "chance" not in table
    capsys.readouterr()

    def no_training(*args, **kwargs):
        raise AssertionError("a recorded run was trained again")

    monkeypatch.setattr(ablate_runner, "run_training", no_training)
    png = (out / "ablation.png").read_bytes()
    assert main(_segment_argv(segment_recipe, out, "--metric", "macc")) == 0
    assert "2 run(s) already recorded in results.jsonl, 0 to go" in capsys.readouterr().out
    table = (out / "results.md").read_text()
    assert "| mixer | runs | mAcc (mean ± std) | Δ mAcc vs conv [95% CI] | n | mIoU | aAcc |" in table
    assert "--metric macc" in table and "IoU target_joined" not in table
    assert (out / "ablation.png").read_bytes() != png
    assert [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()] == results

    assert main(_segment_argv(segment_recipe, out, "--metric", "iou:target_lost")) == 2  # checked on the records
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no class 'target_lost'; choose from miou, macc, aacc or iou:background" in err[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--metric", "miou"], "--metric miou: choose from top1, top5 (for --task classify)"),
        (["--task", "segment", "--metric", "top1"], "--metric top1: choose from miou, macc, aacc or iou:CLASS"),
        (["--task", "segment", "--metric", "iou:"], "--metric iou:: choose from miou, macc, aacc or iou:CLASS"),
        (["--task", "detect"], "argument --task: invalid choice: 'detect'"),
        (["--task", "segment", "--grid", "input_size=32"], "neither a run setting (`mambaout segment train --help`)"),
        (["--task", "segment", "--epochs", "3", "--grid", "iters=5"], "--epochs 3 and --iters 5 both set the run's"),
    ],
)
def test_bad_task_and_metric_flags_are_one_line(tmp_path, capsys, argv, message):
    assert main(["ablate", "--mixers", "conv", *argv, "--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "a").exists()


def test_an_unknown_class_is_refused_from_the_data_before_training(segment_recipe, tmp_path, capsys):
    out = tmp_path / "seg"
    assert main(_segment_argv(segment_recipe, out, "--metric", "iou:joined")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the data pathfinder-seg:32-6:4/2 has no class 'joined'" in err[0]
    assert "iou:background, iou:target_apart, iou:target_joined" in err[0] and not out.exists()


def test_the_command_gives_back_the_task_and_the_metric():
    seg = AblationSettings(task="segment", mixers=("conv", "conv_ssm"), data="pathfinder-seg:32-6",
                           metric="iou:target_joined", seeds=3)  # fmt: skip
    assert seg.config == "ablate_pathfinder_seg" and "metric" not in seg.identity()
    assert seg.identity()["task"] == "segment"
    assert seg.command() == (
        "mambaout ablate --task segment --mixers conv,conv_ssm --seeds 3 --metric iou:target_joined "
        "--data pathfinder-seg:32-6 --output runs/ablate"
    )
    assert AblationSettings(mixers=("conv",), metric="top1").command() == (
        "mambaout ablate --mixers conv --seeds 3 --output runs/ablate"
    )
