"""The results page cannot drift from its records: bench/results/README.md and its figures are exactly what
bench/report.py makes of the committed records, every record has bench/record.py's one shape, the comparisons are
paired by seed, and a learning curve is drawn where its record says (standard library only, but the migration)."""
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import bench_scripts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = Path(REPO) / "bench" / "results"
SVG = "{http://www.w3.org/2000/svg}"
FIELDS = {"question", "variant", "seed", "settings", "metrics", "curve", "command", "commit", "machine"}


@pytest.fixture(scope="module")
def report():
    return bench_scripts.load("report")


def run(variant, seed, settings=None, question="quality", curve=(), **metrics):
    return {"question": question, "variant": variant, "seed": seed, "settings": settings or {}, "metrics": metrics,
            "curve": list(curve), "command": f"python train.py --seed {seed}", "commit": "abc1234",
            "machine": {"device": "cpu", "cpus": 2}}


def write(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_committed_results_page_and_figures_are_what_the_records_give(report):
    text, figures, _ = report.render()
    assert (RESULTS / "README.md").read_text() == text, "bench/results/README.md is out of date: run bench/report.py"
    for path, svg in figures.items():
        assert path.read_text() == svg, f"{path} is out of date: run python bench/report.py"
    assert report.main(["--check"]) == 0


def test_the_same_records_give_the_same_page(report):
    assert report.render() == report.render()


def test_every_committed_record_has_the_one_shape(report):
    found, unread = report.sources(RESULTS)
    assert found and not unread
    for name, records in found.items():
        for r in records:
            assert FIELDS <= set(r) <= FIELDS | {"note"}, name
            assert r["question"] in report.QUESTIONS and isinstance(r["settings"], dict), name
            for key, value in r["metrics"].items():  # a number, or a breakdown of numbers (per class, per op)
                values = value.values() if isinstance(value, dict) else [value]
                assert all(v is None or isinstance(v, (int, float)) for v in values), (name, key)
            assert all({"stage", "epoch"} <= set(point) for point in r["curve"]), name


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
    # bench/quality.py gives a baseline's records their budget and IGL-DT's none (no budget changes its epochs):
    # IGL-DT meets the baselines of every budget, ema those of its own budget only, ablations IGL-DT.
    figures = {("igl-dt", None): (40.0, 42.0, 41.0), ("supervised", "same-student-epochs"): (30.0, 33.0, 30.0),
               ("supervised", "equal-compute"): (45.0, 44.0, 46.0), ("ema", "equal-compute"): (39.0, 40.0, 43.0),
               ("no-gcl", None): (39.0, 41.0, 40.0)}
    write(tmp_path / "quality_cpu", [
        run(variant, seed, {"budget": budget} if budget else {}, miou_val=value, miou_dev=value - 5, wall_s=600.0)
        for (variant, budget), values in figures.items() for seed, value in enumerate(values)])
    _, _, lines = report.render(tmp_path)
    # same epochs: differences 10, 9, 11 -> mean 10, sd 1; equal compute: -5, -2, -5 -> mean -4, sd 1.73
    assert ("- `igl-dt` 41.00 against `supervised, same-student-epochs` 31.00: +10.00 [+7.52, +12.48] (val mIoU, "
            "seeds 0, 1, 2: +10.00, +9.00, +11.00); on the dev set +10.00 [+7.52, +12.48] (seeds 0, 1, 2); 10.0 and "
            "10.0 min a run.") in lines
    assert any(line.startswith("- `igl-dt` 41.00 against `supervised, equal-compute` 45.00: -4.00 [-8.30, +0.30]")
               for line in lines)
    assert any("`ema, equal-compute` 40.67 against `supervised, equal-compute` 45.00" in line for line in lines)
    assert not any("`ema, equal-compute`" in line and "same-student-epochs" in line for line in lines)
    assert [line for line in lines if "`no-gcl`" in line] == [
        "- `no-gcl` 40.00 against `igl-dt` 41.00: -1.00 [-1.00, -1.00] (val mIoU, seeds 0, 1, 2: -1.00, -1.00, "
        "-1.00); on the dev set -1.00 [-1.00, -1.00] (seeds 0, 1, 2); 10.0 and 10.0 min a run."]


def test_a_part_wall_time_stays_out_of_the_means_and_a_lone_seed_out_of_the_pairs(report, tmp_path):
    # seed 2 has no fp32 run; seed 1's fp32 run shared the machine (wall_s_partial): the means are over whole runs
    write(tmp_path / "train_cpu_synthetic_amp", [
        run("bf16", 0, question="train", miou_val=60.0, wall_s=240.0),
        run("fp32", 0, question="train", miou_val=55.0, wall_s=300.0),
        run("bf16", 1, question="train", miou_val=58.0, wall_s=260.0),
        run("fp32", 1, question="train", miou_val=56.0, wall_s_partial=3000.0),
        run("bf16", 2, question="train", miou_val=10.0, wall_s=100.0)])
    text, _, lines = report.render(tmp_path)
    # differences 5 and 2: mean 3.5, sd 2.1213, half-width 12.706 * 2.1213 / sqrt(2) = 19.06
    assert lines == ["- `bf16` 59.00 against `fp32` 55.50: +3.50 [-15.56, +22.56] (student mIoU, seeds 0, 1: +5.00, "
                     "+2.00); 250.0 and 300.0 s a run, 1.20 x faster."]
    assert "| `fp32` | 1 | 56.00 | — | 3000.0 |" in text  # its part wall time in its own column


def test_a_command_shows_each_flag_once_with_the_value_that_counts(report):
    command = "python train.py --data-root /data/camvid --student-epochs 3 --seed 1 --student-epochs 12 --out x"
    assert report.command_text(command) == "`python train.py --data-root CAMVID --seed 1 --student-epochs 12`"


def test_shared_settings_head_the_table_and_the_others_are_columns(report, tmp_path):
    write(tmp_path / "quality_cpu", [run("igl-dt", 0, {"amp": "bf16", "student_epochs": 22}, miou_val=40.0),
                                     run("supervised", 0, {"amp": "bf16", "student_epochs": 52,
                                                           "budget": "equal-compute"}, miou_val=50.0)])
    lines = report.render(tmp_path)[0].splitlines()
    settings = lines.index("Settings: amp bf16.")
    assert lines[settings + 2] == "| variant | seed | budget | student_epochs | val mIoU | command | commit | machine |"
    assert lines[settings + 4].startswith("| `supervised` | 0 | equal-compute | 52 | 50.00 |")
    assert lines[settings + 5].startswith("| `igl-dt` | 0 | — | 22 | 40.00 |")


def test_a_folder_paired_with_another_compares_the_pairs_it_names(report, tmp_path):
    write(tmp_path / "quality_cpu_a", [run(v, seed, {"budget": b} if b else {}, miou_val=x)
                                       for v, b, values in [("igl-dt", None, (30.0, 32.0)),
                                                            ("supervised", "equal-compute", (35.0, 34.0)),
                                                            ("no-gcl", None, (1.0, 1.0))]
                                       for seed, x in enumerate(values)])
    write(tmp_path / "quality_cpu_b", [run("igl-dt", seed, miou_val=x) for seed, x in enumerate((31.0, 34.0))])
    (tmp_path / "quality_cpu_b" / "paired_with.json").write_text(json.dumps(
        {"paired_with": "quality_cpu_a", "why": "other epochs", "pairs": [["igl-dt", "igl-dt"],
                                                                          ["igl-dt", "supervised"]]}))
    text, _, lines = report.render(tmp_path)
    assert "### `quality_cpu_b` against `quality_cpu_a`\n\nother epochs" in text
    crossed = [line for line in lines if "(quality_cpu_b)" in line]
    assert crossed == [
        "- `igl-dt (quality_cpu_b)` 32.50 against `igl-dt (quality_cpu_a)` 31.00: +1.50 [-4.85, +7.85] (val mIoU, "
        "seeds 0, 1: +1.00, +2.00).",
        "- `igl-dt (quality_cpu_b)` 32.50 against `supervised, equal-compute (quality_cpu_a)` 34.50: -2.00 "
        "[-27.41, +23.41] (val mIoU, seeds 0, 1: -4.00, +0.00)."]  # the pairs named, not the ablations


def test_speed_ups_and_overheads_compare_rows_of_the_same_settings_only(report, tmp_path):
    # bench/speed.py --compare amp --interleave: each kind in fp32 and bf16; "vs supervised" divides within one
    # precision, the speed-ups divide the plain setting's (fp32's) time by this one's, of the same kind.
    step = lambda kind, amp, seconds, median: run(kind, None, {"amp": amp, "interleave": 4}, question="speed",
                                                  seconds_per_step=seconds, images_per_s=8 / seconds,
                                                  peak_mem_mb=100.0, interleaved_median_s=median)
    (tmp_path / "speed_cpu_amp.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        step("supervised", "off", 0.4, 0.45), step("supervised", "bf16", 0.25, 0.3),
        step("igl-dt", "off", 1.6, 1.8), step("igl-dt", "bf16", 0.8, 1.2)]))
    text, _, _ = report.render(tmp_path)
    rows = {tuple(line.split(" | ")[:2]): line.split(" | ") for line in text.splitlines() if line.startswith("| `")}
    header = next(line for line in text.splitlines() if line.startswith("| variant")).split(" | ")
    cell = lambda kind, amp, column: rows[f"| `{kind}`", amp][header.index(column)]
    assert (cell("igl-dt", "off", "vs supervised"), cell("igl-dt", "bf16", "vs supervised")) == ("4.00", "3.20")
    assert (cell("igl-dt", "bf16", "speed-up"), cell("igl-dt", "bf16", "speed-up, interleaved")) == ("2.00", "1.50")
    assert (cell("supervised", "bf16", "speed-up"), cell("supervised", "bf16", "speed-up, interleaved")) == \
        ("1.60", "1.50")
    assert cell("igl-dt", "off", "speed-up") == "—"  # fp32 is what the others are sped up over
    assert "Settings: interleave 4." in text


def test_a_records_note_is_printed_under_its_settings(report, tmp_path):
    record = run("supervised", None, {"amp": "bf16"}, question="speed", seconds_per_step=0.5) | {
        "note": "taken where channels-last was the default"}
    (tmp_path / "speed_cpu_note.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "mystery.json").write_text("{}")
    lines = report.render(tmp_path)[0].splitlines()
    settings = lines.index("Settings: amp bf16.")
    assert lines[settings + 1] == "Note: taken where channels-last was the default."
    assert any("`mystery.json`" in line for line in lines)  # a file of no records is listed, not dropped


# ---- learning curves -------------------------------------------------------------------------------------------

def drawn(svg):
    """{(class, label, seed): [(epoch, miou)]} of an SVG's polylines, read back through its tick labels."""
    root = ET.fromstring(svg)

    def axis(name, coordinate):  # value = a + b * position, from the first and last tick
        ticks = [(float(g.find(f"{SVG}line").get(coordinate)), float(g.find(f"{SVG}text").text))
                 for g in root.iter(f"{SVG}g") if g.get("class") == name]
        (p0, v0), (p1, v1) = ticks[0], ticks[-1]
        return lambda p: v0 + (p - p0) * (v1 - v0) / (p1 - p0)
    x, y = axis("x-tick", "x1"), axis("y-tick", "y1")
    return {(line.get("class"), line.get("data-label"), line.get("data-seed")):
            [(x(float(a)), y(float(b))) for a, b in (pair.split(",") for pair in line.get("points").split())]
            for line in root.iter(f"{SVG}polyline")}


def close(points, expected):
    return len(points) == len(expected) and all(abs(a - c) < 0.02 and abs(b - d) < 0.02
                                                for (a, b), (c, d) in zip(points, expected))


def curve(values, epochs=(5, 10, 15, 20)):
    return [{"stage": "teachers", "epoch": 3, "miou_swin": 20.0, "miou_res": 25.0}] + [
        {"stage": "student", "epoch": e, "miou_val": v, "miou_res": 30.0} for e, v in zip(epochs, values)] + [
        {"stage": "student", "epoch": 21, "share_agreed": 0.1}]  # no mIoU at this epoch: not drawn


def test_the_figure_draws_each_variant_at_its_recorded_values(report, tmp_path):
    values = {("igl-dt", 0): (20.0, 30.0, 35.0, 41.0), ("igl-dt", 1): (22.0, 28.0, 36.0, 40.0),
              ("igl-dt", 2): (18.0, 31.0, 37.0, 42.5), ("supervised", 0): (25.0, 33.0, 38.0, 39.0),
              ("supervised", 1): (24.0, 35.0, 36.0, 38.0)}
    write(tmp_path / "quality_cpu_c", [run(v, seed, curve=curve(vals), miou_val=vals[-1])
                                       for (v, seed), vals in values.items()])
    text, figures, _ = report.render(tmp_path)
    assert "![quality_cpu_c: val mIoU at each evaluation, by student epoch](quality_cpu_c/curves.svg)" in text
    lines = drawn(figures[tmp_path / "quality_cpu_c" / "curves.svg"])
    assert sorted(key for key in lines if key[0] == "mean") == [("mean", "igl-dt", None), ("mean", "supervised", None)]
    assert sorted(key[1:] for key in lines if key[0] == "seed") == [(v, str(s)) for v, s in sorted(values)]
    for (variant, seed), vals in values.items():
        assert close(lines["seed", variant, str(seed)], list(zip((5, 10, 15, 20), vals))), (variant, seed)
    for variant in ("igl-dt", "supervised"):
        seeds = [vals for (v, _), vals in values.items() if v == variant]
        assert close(lines["mean", variant, None], [(e, sum(v[i] for v in seeds) / len(seeds))
                                                    for i, e in enumerate((5, 10, 15, 20))]), variant


def test_a_figure_of_several_folders_draws_one_budget_beside_the_other(report, tmp_path):
    # a plateau study: supervised training at 4 and at 8 student epochs, in two folders, drawn in one figure
    write(tmp_path / "quality_cpu_sup_e4", [run("supervised", s, curve=curve((30.0 + s, 35.0 + s), (2, 4)),
                                                miou_val=35.0 + s) for s in (0, 1)])
    write(tmp_path / "quality_cpu_sup_e8", [run("supervised", s, curve=curve((29.0, 36.0, 39.0, 40.0 + s),
                                                                             (2, 4, 6, 8)), miou_val=40.0 + s)
                                            for s in (0, 1)])
    (tmp_path / "figures.json").write_text(json.dumps({"quality_cpu_sup_plateau": {
        "folders": ["quality_cpu_sup_e4", "quality_cpu_sup_e8", "quality_cpu_not_here"], "why": "more epochs?"}}))
    text, figures, _ = report.render(tmp_path)
    assert "![quality_cpu_sup_plateau](quality_cpu_sup_plateau.svg)" in text and "more epochs?" in text
    lines = drawn(figures[tmp_path / "quality_cpu_sup_plateau.svg"])
    assert close(lines["mean", "supervised (quality_cpu_sup_e4)", None], [(2, 30.5), (4, 35.5)])
    assert close(lines["mean", "supervised (quality_cpu_sup_e8)", None], [(2, 29.0), (4, 36.0), (6, 39.0), (8, 40.5)])
    assert len([key for key in lines if key[0] == "seed"]) == 4


def test_check_fails_on_a_stale_figure(report, tmp_path, monkeypatch):
    write(tmp_path / "quality_cpu_c", [run("igl-dt", 0, curve=curve((20.0, 30.0)), miou_val=30.0)])
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    assert report.main(["--check"]) == 1  # nothing written yet
    assert report.main([]) == 0 and report.main(["--check"]) == 0
    figure = tmp_path / "quality_cpu_c" / "curves.svg"
    figure.write_text(figure.read_text().replace("20", "21"))
    assert report.main(["--check"]) == 1
