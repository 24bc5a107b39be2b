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
