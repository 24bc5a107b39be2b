"""The results page cannot drift from its records: bench/results/README.md is exactly what bench/report.py makes
of the committed records, and the script reads the record shapes the benchmarks write (standard library only)."""
import json
import os
from pathlib import Path

import pytest

import bench_scripts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report():
    module = bench_scripts.load("report")
    return module


def test_committed_results_page_is_what_the_records_give(report):
    text, _ = report.render()
    assert (Path(REPO) / "bench" / "results" / "README.md").read_text() == text, \
        "bench/results/README.md is out of date: run python bench/report.py"
    assert report.main(["--check"]) == 0


def test_the_same_records_give_the_same_page(report):
    assert report.render() == report.render()


def test_new_record_shapes_extra_keys_and_missing_variants(report, tmp_path):
    quality = tmp_path / "quality_cpu"
    quality.mkdir()
    runs = [  # no supervised run of seed 1, no igl-dt run at all for budget "long": nothing to compare, no error
        {"variant": "supervised", "seed": 0, "miou_last": 30.0, "budget": "equal epochs", "amp": "bf16",
         "miou_dev": 28.0, "cost": {"gpu_h": 0.1}, "commit": "abc1234", "command": "python train.py --seed 0",
         "machine": {"device": "cpu", "cpus": 2}, "something_new": [1, 2]},
        {"variant": "igl-dt", "seed": 0, "miou_last": 33.5, "budget": "equal epochs", "amp": "bf16",
         "miou_dev": 29.0, "commit": "abc1234", "command": "python train.py --seed 0"},
        {"variant": "igl-dt", "seed": 1, "miou_last": 31.0, "budget": "equal epochs", "amp": "bf16"},
        {"variant": "no-gcl", "seed": 0, "miou_last": 32.0, "budget": "long"},
    ]
    (quality / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs) + "\n")
    pairs = {"settings": {"dataset": "folder"}, "machine": {"device": "H200", "cpus": 16}, "commit": "abc1234",
             "kinds": {"supervised": {"fp32": {"seconds_per_step": 0.4}, "bf16": {"seconds_per_step": 0.2}},
                       "igl-dt": {"fp32": {"seconds_per_step": 1.6}, "bf16": {"seconds_per_step": 0.6}}}}
    (tmp_path / "speed_gpu.json").write_text(json.dumps(pairs))
    (tmp_path / "speed_cpu").mkdir()
    (tmp_path / "speed_cpu" / "records.jsonl").write_text(json.dumps(
        {"kind": "supervised", "amp": "off", "seconds_per_step": 0.5, "peak_mem_mb": 300.0}) + "\n")
    (tmp_path / "mystery.json").write_text("{}")

    text, headlines = report.render(tmp_path)

    assert "| `igl-dt` | 0 | 33.50 | +3.50 | 29.00 |" in text  # the gain, and the dev mIoU column
    assert "`abc1234`" in text and "not recorded" in text  # the commit where a record has one
    assert any("+3.50" in line and "on the dev set +1.00" in line for line in headlines)
    assert any("speed_gpu.json" in line and "4.00 x" in line and "(fp32)" in line for line in headlines)
    assert any("speed_gpu.json" in line and "3.00 x" in line and "(bf16)" in line for line in headlines)
    assert "| supervised student step | fp32 | 0.5000 |" in text
    assert "`mystery.json`" in text  # a name no table reads is listed, not dropped


def test_paired_difference_and_its_t_interval_by_hand():
    stats = bench_scripts.load("stats")
    # differences 2, 3, 1 over seeds 0..2 (seed 3 has no partner): mean 2, sd 1, t_{0.975, 2} = 4.303
    difference = stats.paired({0: 3.0, 1: 5.0, 2: 4.0}, {0: 1.0, 1: 2.0, 2: 3.0, 3: 9.0})
    half = 4.303 / 3 ** 0.5
    assert difference == {"n": 3, "mean": 2.0, "ci95": [round(2 - half, 2), round(2 + half, 2)]}
    assert stats.interval_text(difference) == "+2.00 [-0.48, +4.48]"
    assert stats.paired({0: 1.0}, {0: 3.0}) == {"n": 1, "mean": -2.0, "ci95": None}
    assert stats.paired({0: 1.0}, {1: 3.0}) is None


def test_igl_dt_is_paired_with_the_baselines_of_each_budget(report, tmp_path):
    # bench/quality.py records IGL-DT once (budget "both": no budget changes its epochs) and each baseline per
    # budget; every budget's table compares them, seed by seed.
    quality = tmp_path / "quality_cpu"
    quality.mkdir()
    figures = {("igl-dt", "both"): (40.0, 42.0, 41.0), ("supervised", "same-student-epochs"): (30.0, 33.0, 30.0),
               ("supervised", "equal-compute"): (45.0, 44.0, 46.0), ("ema", "equal-compute"): (39.0, 40.0, 43.0),
               ("no-gcl", "both"): (39.0, 41.0, 40.0)}
    runs = [{"variant": variant, "budget": budget, "seed": seed, "miou_last": value, "miou_dev": value - 5,
             "amp": "bf16", "commit": "abc1234"}
            for (variant, budget), values in figures.items() for seed, value in enumerate(values)]
    (quality / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))

    text, headlines = report.render(tmp_path)

    same = [line for line in headlines if "same-student-epochs" in line]
    equal = [line for line in headlines if "equal-compute" in line]
    # same epochs: differences 10, 9, 11 -> mean 10, sd 1; equal compute: -5, -2, -5 -> mean -4, sd 1.73
    assert any("`igl-dt` 41.00 against `supervised` 31.00: +10.00 [+7.52, +12.48]" in line for line in same)
    assert any("`igl-dt` 41.00 against `supervised` 45.00: -4.00 [-8.30, +0.30]" in line for line in equal)
    assert any("`igl-dt` 41.00 against `ema` 40.67: +0.33" in line for line in equal)
    assert any("on the dev set +10.00 [+7.52, +12.48]" in line for line in same)
    assert "budget both" not in text  # IGL-DT is not left alone in a table of its own
    ablation = [line for line in headlines if "`no-gcl`" in line]  # once, not once per budget
    assert len(ablation) == 1 and "`no-gcl` 40.00 against `igl-dt` 41.00: -1.00 [-1.00, -1.00]" in ablation[0]


def test_a_command_shows_each_flag_once_with_the_value_that_counts(report):
    command = "python train.py --data-root /data/camvid --student-epochs 3 --seed 1 --student-epochs 12 --out x"
    assert report.command_text(command) == "`python train.py --data-root CAMVID --seed 1 --student-epochs 12`"


def test_a_folder_paired_with_another_pairs_its_igl_dt_by_seed(report, tmp_path):
    for name, runs in {"quality_cpu_a": [("igl-dt", "both", (30.0, 32.0)), ("supervised", "equal-compute", (35.0, 34.0)),
                                         ("no-gcl", "both", (1.0, 1.0))],
                       "quality_cpu_b": [("igl-dt", "both", (31.0, 34.0))]}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "records.jsonl").write_text("".join(
            json.dumps({"variant": v, "budget": b, "seed": seed, "miou_last": x}) + "\n"
            for v, b, values in runs for seed, x in enumerate(values)))
    (tmp_path / "quality_cpu_b" / "paired_with.json").write_text(json.dumps({"paired_with": "quality_cpu_a",
                                                                               "why": "other epochs"}))
    text, headlines = report.render(tmp_path)
    assert "### `quality_cpu_b` against `quality_cpu_a`" in text and "other epochs" in text
    crossed = [line for line in headlines if line.startswith("quality_cpu_b:")]
    assert any("against `igl-dt (quality_cpu_a)` 31.00: +1.50 [-4.85, +7.85]" in line for line in crossed)
    assert any("against `supervised, equal-compute (quality_cpu_a)` 34.50: -2.00" in line for line in crossed)
    assert not any("no-gcl" in line for line in crossed)  # the baselines, not the ablations


def test_a_folder_paired_variant_by_variant_pairs_each_with_its_own_kind(report, tmp_path):
    # "pair": "same-variant" (one setting changed for every variant, the precision): supervised with supervised,
    # igl-dt with igl-dt, never igl-dt with the other folder's supervised.
    for name, runs in {"quality_cpu_fp32": [("igl-dt", (30.0, 32.0)), ("supervised", (28.0, 29.0))],
                       "quality_cpu_bf16": [("igl-dt", (31.0, 34.0)), ("supervised", (27.0, 27.0))]}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "records.jsonl").write_text("".join(
            json.dumps({"variant": v, "budget": "both", "seed": seed, "miou_last": x}) + "\n"
            for v, values in runs for seed, x in enumerate(values)))
    (tmp_path / "quality_cpu_bf16" / "paired_with.json").write_text(json.dumps(
        {"paired_with": "quality_cpu_fp32", "why": "precision", "pair": "same-variant"}))
    _, headlines = report.render(tmp_path)
    crossed = [line for line in headlines if line.startswith("quality_cpu_bf16:")]
    assert len(crossed) == 2
    assert any("`igl-dt (quality_cpu_bf16)` 32.50 against `igl-dt (quality_cpu_fp32)` 31.00: +1.50" in line
               for line in crossed)
    assert any("`supervised (quality_cpu_bf16)` 27.00 against `supervised (quality_cpu_fp32)` 28.50: -1.50" in line
               for line in crossed)


def test_a_compare_record_names_each_setting_and_its_speed_up(report, tmp_path):
    # bench/speed.py --compare compile files each kind under "eager" and "compiled" at one precision: without a
    # setting column the two rows of a kind would read alike, and "vs supervised" must divide within a setting.
    step = lambda seconds: {"seconds_per_step": seconds, "images_per_s": 8 / seconds, "peak_mem_mb": 100.0,
                            "amp": "bf16", "compile": False}
    record = {"settings": {"amp": "bf16", "device": "cpu"}, "command": "python bench/speed.py --compare compile",
              "commit": "abc1234", "machine": {"device": "cpu", "cpus": 2},
              "kinds": {"eager": {"supervised": step(0.4), "igl-dt": step(1.2)},
                        "compiled": {"supervised": step(0.2), "igl-dt": step(0.8)}},
              "speedup_compiled_vs_eager": {"supervised": 2.0, "igl-dt": 1.5}}
    (tmp_path / "speed_cpu_compile.json").write_text(json.dumps(record))
    text, _ = report.render(tmp_path)
    rows = [line for line in text.splitlines() if line.startswith("| stage 2: student + teachers co-training")]
    assert [row.split(" | ")[1:5] for row in rows] == [["bf16", "compiled", "0.8000", "10.0"],
                                                       ["bf16", "eager", "1.2000", "6.67"]]
    assert [row.split(" | ")[6] for row in rows] == ["4.00", "3.00"]  # 0.8 / 0.2 and 1.2 / 0.4, never across
    assert ("Speed-up of compiled over eager (seconds per step eager / compiled, both from one invocation): "
            "supervised student step 2.00; stage 2: student + teachers co-training 1.50.") in text


def test_an_interleaved_compare_record_gives_both_its_speed_ups(report, tmp_path):
    # --interleave: the speed-ups come from the alternating steps' medians; the table's own ratios are given too,
    # so that a reader who divides the table's figures is not left wondering why they differ.
    step = lambda seconds: {"seconds_per_step": seconds, "images_per_s": 8 / seconds, "peak_mem_mb": 100.0}
    record = {"settings": {"device": "cpu"}, "command": "python bench/speed.py --compare amp --interleave 4",
              "commit": "abc1234", "machine": {"device": "cpu", "cpus": 2},
              "kinds": {"fp32": {"supervised": step(0.4)}, "bf16": {"supervised": step(0.25)}},
              "interleaved_median_s": {"supervised": {"fp32": 0.45, "bf16": 0.3}},
              "speedup_bf16_vs_fp32": {"supervised": 1.5}, "speedup_from": "interleaved steps, 4 of each setting, medians"}
    (tmp_path / "speed_cpu_amp.json").write_text(json.dumps(record))
    text, _ = report.render(tmp_path)
    assert ("Speed-up of bf16 over fp32 (seconds per step fp32 / bf16, interleaved steps, 4 of each setting, "
            "medians): supervised student step 1.50.") in text
    assert "From the table (each setting alone in its own process): supervised student step 1.60." in text


def test_whole_runs_in_both_precisions_give_their_paired_difference(report, tmp_path):
    # seed 2 has no fp32 run: it stays out of the pairing; seed 1's fp32 run shared the machine, so its wall time
    # stays out of the means (bf16 240 and 260 would be 250, fp32 300 and 3000 would be 1650).
    folder = tmp_path / "train_cpu_synthetic_amp"
    folder.mkdir()
    run = lambda amp, seed, miou, wall, alone=True: {"command": f"python train.py --amp {amp} --seed {seed}",
                                                     "amp": amp, "seed": seed, "miou_last": miou, "wall_s": wall,
                                                     "machine_alone": alone, "commit": "abc1234"}
    runs = [run("bf16", 0, 60.0, 240.0), run("off", 0, 55.0, 300.0), run("bf16", 1, 58.0, 260.0),
            run("off", 1, 56.0, 3000.0, alone=False), run("bf16", 2, 10.0, 100.0)]
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    text, _ = report.render(tmp_path)
    # differences 5 and 2: mean 3.5, sd 2.1213, half-width 12.706 * 2.1213 / sqrt(2) = 19.06
    assert ("- bf16 minus fp32, paired by seed (0, 1): student mIoU +3.50 [-15.56, +22.56]; wall time 240.0 "
            "against 300.0 s (1.25 x faster in bf16, mean over the runs with the machine alone).") in text
    (folder / "records.jsonl").write_text(json.dumps(runs[0]) + "\n")  # one precision: nothing to pair
    assert "bf16 minus fp32" not in report.render(tmp_path)[0]


def test_whole_runs_in_both_layouts_give_their_paired_difference(report, tmp_path):
    # Runs that differ in their memory layout alone (all bf16): paired by seed, channels-last minus NCHW; the
    # precision line has nothing to pair.
    folder = tmp_path / "train_cpu_synthetic_layout"
    folder.mkdir()
    run = lambda layout, seed, miou, wall: {"command": f"python train.py --{'' if layout else 'no-'}channels-last "
                                            f"--seed {seed}", "amp": "bf16", "channels_last": layout, "seed": seed,
                                            "miou_last": miou, "wall_s": wall, "machine_alone": True,
                                            "commit": "abc1234"}
    runs = [run(True, 0, 54.0, 200.0), run(False, 0, 59.0, 220.0), run(True, 1, 56.0, 240.0),
            run(False, 1, 60.0, 240.0)]
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    text, _ = report.render(tmp_path)
    # differences -5 and -4: mean -4.5, sd 0.7071, half-width 12.706 * 0.7071 / sqrt(2) = 6.35
    assert ("- channels-last minus NCHW, paired by seed (0, 1): student mIoU -4.50 [-10.85, +1.85]; wall time "
            "220.0 against 230.0 s (1.05 x faster channels-last, mean over the runs with the machine alone).") in text
    assert "bf16 minus fp32" not in text


def test_a_speed_records_note_is_printed_under_its_settings(report, tmp_path):
    step = {"seconds_per_step": 0.5, "images_per_s": 16.0, "peak_mem_mb": 100.0, "amp": "bf16"}
    record = {"settings": {"amp": "bf16", "device": "cpu"}, "command": "python bench/speed.py", "commit": "abc1234",
              "machine": {"device": "cpu", "cpus": 2}, "kinds": {"supervised": step},
              "note": "taken where channels-last was the default"}
    (tmp_path / "speed_cpu_note.json").write_text(json.dumps(record))
    lines = report.render(tmp_path)[0].splitlines()
    settings = next(i for i, line in enumerate(lines) if line.startswith("Settings: "))
    assert lines[settings + 2] == "Note: taken where channels-last was the default."
