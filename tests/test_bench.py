"""The bench scripts' own logic: the diagnosis's pixel counts (bench/pseudo_labels.py), worked by hand on four
pixels, the dev set (bench/dev_set.py), the quality benchmark's shared teachers, settings and learning curves
(bench/quality.py), the speed benchmark's random weights and its records (bench/speed.py), and that no script in
bench/ takes a top-level module's name."""
import glob
import json
import os
from pathlib import Path

import pytest
import torch

import bench_scripts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
module_names = lambda folder: {os.path.basename(path)[:-3] for path in glob.glob(os.path.join(folder, "*.py"))}


def test_no_bench_script_shadows_a_top_level_module():
    # `python bench/x.py` puts bench/ first on sys.path: a bench/data.py would be what `import data` finds there.
    assert {"data", "models", "losses", "train", "evaluate"} <= module_names(REPO)
    assert not module_names(os.path.join(REPO, "bench")) & module_names(REPO)


@pytest.fixture(scope="module")
def pseudo_labels():
    module = bench_scripts.load("pseudo_labels")
    return module


def test_count_pixels_by_hand(pseudo_labels):
    # Four pixels in a row, three classes:
    #   0: both say class 0 (mean confidence 0.85), truth 0            -> agreed, right
    #   1: G says 1 at 0.8, L says 0 at 0.6, truth 1                    -> disputed, G surer, the choice is right
    #   2: both say class 2 (mean confidence 0.7), truth 0              -> agreed, wrong
    #   3: ignored (255)
    g = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [1.0, 0.0, 0.0]])
    l = torch.tensor([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.0, 1.0, 0.0]])
    as_map = lambda p: p.T.reshape(1, 3, 1, 4)
    mask = torch.tensor([[[0, 1, 0, 255]]])
    counts, target, label_g, label_l = pseudo_labels.count_pixels(as_map(g), as_map(l), mask, [0.0, 0.8])
    counts = {k: float(v) for k, v in counts.items()}
    assert counts["valid"] == 3
    assert (counts["agree"], counts["agree_right"]) == (2, 1)
    assert (counts["pl@0.0"], counts["pl@0.0_right"]) == (2, 1)
    assert (counts["pl@0.8"], counts["pl@0.8_right"]) == (1, 1)  # pixel 2 (0.7) falls below 0.8
    assert counts["disputed"] == 1
    assert (counts["disputed_swin_right"], counts["disputed_res_right"], counts["disputed_choice_right"]) == (1, 0, 1)
    assert counts["disputed_weight"] == pytest.approx(0.8)
    assert target[0, 0, :3].tolist() == [0, 1, 2]
    assert label_g[0, 0].tolist() == [0, 1, 2, 0] and label_l[0, 0].tolist() == [0, 0, 2, 1]


def test_count_pixels_follows_the_surer_teacher_either_way(pseudo_labels):
    # One disputed pixel where L is the surer one: the choice is L's label.
    g = torch.tensor([0.5, 0.3, 0.2]).reshape(1, 3, 1, 1)
    l = torch.tensor([0.1, 0.9, 0.0]).reshape(1, 3, 1, 1)
    counts, target, _, _ = pseudo_labels.count_pixels(g, l, torch.tensor([[[1]]]), [0.0])
    assert target.item() == 1 and float(counts["disputed_choice_right"]) == 1
    assert float(counts["disputed_res_right"]) == 1 and float(counts["disputed_swin_right"]) == 0
    assert float(counts["disputed_weight"]) == pytest.approx(0.9)


def test_the_dev_set_is_unlabeled_training_images_and_keeps_the_split(tmp_path):
    import data
    from test_data import make_folder  # tests/ is on the path: pytest puts a test file's folder there
    dev_set = bench_scripts.load("dev_set")

    make_folder(tmp_path / "real", train=16, val=4, unlabeled=3)
    chosen = dev_set.make_dev_set(tmp_path / "real", tmp_path / "dev", split="1/4", seed=0, count=5)
    real = data.build_datasets("folder", str(tmp_path / "real"), "1/4", str(tmp_path / "splits_real"), 32, 0)
    dev = data.build_datasets("folder", str(tmp_path / "dev"), "1/4", str(tmp_path / "splits_dev"), 32, 0)
    read = lambda root, name: (Path(data.split_directory(tmp_path / root, "folder", tmp_path / root[7:], "1/4"))
                               / name).read_text()  # splits_real holds the lists of real/, splits_dev of dev/
    assert read("splits_real", "labeled.txt") == read("splits_dev", "labeled.txt")  # the same 4 labeled images
    assert read("splits_real", "unlabeled.txt") == read("splits_dev", "unlabeled.txt")
    labeled = {line.split()[0] for line in read("splits_real", "labeled.txt").splitlines()}
    unlabeled = {line.split()[0] for line in read("splits_real", "unlabeled.txt").splitlines()}
    assert len(chosen) == len(set(chosen)) == 5 and set(chosen) <= unlabeled and not set(chosen) & labeled
    assert all(image.startswith("images/train/") for image in chosen)  # masked images, not images/unlabeled
    assert len(dev[2]) == 5 and len(real[2]) == 4
    for image in chosen:  # each dev val pair is the training image with its own mask
        name = os.path.basename(image)
        mask = os.path.splitext(name)[0] + ".png"
        assert (tmp_path / "dev/images/val" / name).resolve() == (tmp_path / "real/images/train" / name).resolve()
        assert (tmp_path / "dev/masks/val" / mask).resolve() == (tmp_path / "real/masks/train" / mask).resolve()
    with pytest.raises(data.DataError, match="--count"):
        dev_set.make_dev_set(tmp_path / "real", tmp_path / "dev2", split="1/4", seed=0, count=13)


def test_the_loss_ablations_start_from_igl_dts_teachers_and_end_as_from_scratch(tmp_path, capsys):
    from test_data import make_folder
    quality = bench_scripts.load("quality")
    make_folder(tmp_path / "real", train=16, val=4, unlabeled=3)
    tiny = ["--teacher-epochs", "1", "--student-epochs", "1", "--max-iters", "2", "--batch-size", "2",
            "--crop-size", "32", "--swin-dim", "12", "--swin-depths", "1", "1", "1", "1", "--res-width", "8",
            "--workers", "0", "--eval-every", "1"]
    bench = lambda out, *variants: quality.main(["--data-root", str(tmp_path / "real"), "--split", "1/4",
                                                  "--device", "cpu", "--out", str(tmp_path / out), "--dev-count", "4",
                                                  "--variants", *variants, "--", *tiny])
    read = lambda out: {r["variant"]: r for r in map(json.loads, (tmp_path / out / "records.jsonl").open())}
    bench("shared", "no-gcl", "igl-dt")  # given in this order, igl-dt still runs first
    bench("scratch", "no-gcl")
    shared, scratch = read("shared"), read("scratch")
    assert f"--teachers-from {tmp_path / 'shared' / 'runs' / 'igl-dt_s0'}" in shared["no-gcl"]["command"]
    assert "--teachers-from" not in scratch["no-gcl"]["command"]
    for key in ("miou_val", "miou_swin", "miou_res", "iou_per_class"):
        assert shared["no-gcl"]["metrics"][key] == scratch["no-gcl"]["metrics"][key], key
    assert shared["no-gcl"]["curve"] == scratch["no-gcl"]["curve"]
    assert shared["igl-dt"]["metrics"]["miou_res"] == shared["no-gcl"]["metrics"]["miou_res"]
    # its wall time leaves stage 1 out: a part, kept apart from the whole runs' wall_s
    assert "wall_s_partial" in shared["no-gcl"]["metrics"] and "wall_s" not in shared["no-gcl"]["metrics"]
    assert "wall_s" in scratch["no-gcl"]["metrics"]
    # the curve: each evaluation's val mIoU (the teachers' from stage 1), the student's epochs counted from 1
    curve = shared["igl-dt"]["curve"]
    assert [(p["stage"], p["epoch"]) for p in curve if "miou_res" in p] == [("teachers", 1), ("student", 1)]
    assert [p["epoch"] for p in curve if "miou_val" in p] == [1]
    assert curve[-1]["miou_val"] == shared["igl-dt"]["metrics"]["miou_val"]
    assert "- `no-gcl` " in capsys.readouterr().out  # the summary: the comparison with igl-dt, paired by seed
    bench("shared", "no-gcl", "igl-dt")  # run again: both recorded, so skipped, not refused as another command


def test_a_quality_records_settings_are_the_flags_its_command_gave():
    # the last of a flag given twice, switches as booleans, lists as lists; not where files go, not the seed, not the
    # variant's own flag
    quality = bench_scripts.load("quality")
    command = ("python train.py --dataset folder --data-root /d --split 1/8 --splits-dir s --out o/runs/no-gcl_s1 "
               "--seed 1 --student-epochs 22 --no-freeze-teachers --swin-depths 1 1 2 1 --student-epochs 52 "
               "--lambda-glo 0 --teachers-from o/runs/igl-dt_s1")
    assert quality.run_settings(command, "no-gcl", "bf16", "equal-compute") == {
        "split": "1/8", "student_epochs": 52, "freeze_teachers": False, "swin_depths": [1, 1, 2, 1], "amp": "bf16",
        "budget": "equal-compute"}
    assert quality.run_of({"command": command}) == "no-gcl_s1"


def test_a_runs_curve_counts_the_students_epochs_from_one():
    quality = bench_scripts.load("quality")
    log = [{"stage": "teachers", "epoch": 1}, {"stage": "teachers", "epoch": 2, "miou_swin": 10.123, "miou_res": 12.0},
           {"stage": "student", "epoch": 3, "share_agreed": 0.12345, "share_disputed": 0.2},
           {"stage": "student", "epoch": 4, "miou_student": 30.0, "miou_swin": 11.0, "miou_res": None}]
    assert quality.curve_of(log) == [
        {"stage": "teachers", "epoch": 2, "miou_swin": 10.12, "miou_res": 12.0},
        {"stage": "student", "epoch": 1, "share_agreed": 0.1235, "share_disputed": 0.2},
        {"stage": "student", "epoch": 2, "miou_val": 30.0, "miou_swin": 11.0}]


@pytest.mark.parametrize("dataset", ["voc", "cityscapes", "folder", "synthetic"])
def test_the_speed_benchmark_builds_every_network_from_random_weights(dataset):
    # The paper's datasets default to ImageNet weights; a GPU machine without internet must still measure them.
    speed = bench_scripts.load("speed")
    cfg = speed.trainer_config(speed.parse_args(["--dataset", dataset, "--device", "cpu"]), "both")
    assert (cfg["pretrained"], cfg["pretrained_swin"], cfg["pretrained_res"]) == ("none", "none", "none")
    assert cfg["dataset"] == dataset and cfg["batch_size"] > 0


def test_interleaved_timing_alternates_both_settings_in_one_process():
    # --interleave: each setting's steps are timed in this process, as many of each, and a bad flag is one line
    speed = bench_scripts.load("speed")
    argv = ["--device", "cpu", "--crop", "64", "--batch", "2", "--warmup", "0", "--compare", "amp", "--interleave", "3"]
    calls = []
    step_function = speed.step_function
    speed.step_function = lambda trainer, cfg, kind, device: (
        lambda: calls.append(cfg["amp"]) or step_function(trainer, cfg, kind, device)())
    try:
        seconds = speed.interleaved(argv, "supervised", "--amp", ["off", "bf16"], 3)
    finally:
        speed.step_function = step_function
    assert calls == ["off", "bf16", "bf16", "off", "off", "bf16"]  # A B, B A, A B
    assert [len(s) for s in seconds] == [3, 3] and all(t > 0 for s in seconds for t in s)
    for bad in (["--interleave", "2"], ["--compare", "amp", "--interleave", "-1"]):
        with pytest.raises(SystemExit):
            speed.parse_args(bad)


def test_the_speed_breakdown_splits_a_step_into_matrix_products_and_the_rest():
    # The split is what says how much of a step bf16 can speed up: a convolutional student spends part of its step
    # in convolutions, and the two parts add up to the profiled ops' own time.
    speed = bench_scripts.load("speed")
    args = speed.parse_args(["--device", "cpu", "--amp", "off", "--crop", "64", "--batch", "2", "--iters", "1",
                             "--warmup", "0", "--breakdown"])
    result = speed.measure(args, "supervised")
    split = result["breakdown"]
    assert split["matrix_products_s"] > 0 and split["other_s"] > 0
    share = split["matrix_products_s"] / (split["matrix_products_s"] + split["other_s"])
    assert abs(split["matrix_share"] - share) <= 0.01  # the parts are rounded to 0.1 ms, the share to 0.001
    top = split["top_ops_ms"]
    assert len(top) == 10 and list(top.values()) == sorted(top.values(), reverse=True)
    assert {"aten::convolution_backward", "aten::mkldnn_convolution"} & set(top)
    plain = speed.parse_args(["--device", "cpu", "--amp", "off", "--crop", "64", "--batch", "2", "--iters", "1",
                              "--warmup", "0"])
    assert "breakdown" not in speed.measure(plain, "supervised")


def test_the_speed_benchmark_prints_a_record_per_kind_and_setting(capsys, tmp_path):
    # bench/record.py's one shape, a line each; bench/quality.py reads its step costs back from them
    speed, quality = bench_scripts.load("speed"), bench_scripts.load("quality")
    speed.main(["--device", "cpu", "--crop", "32", "--batch", "2", "--iters", "1", "--warmup", "0",
                "--kinds", "supervised", "--compare", "amp"])
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["question"], r["variant"], r["settings"]["amp"]) for r in records] == [
        ("speed", "supervised", "off"), ("speed", "supervised", "bf16")]
    assert all(set(r) == {"question", "variant", "seed", "settings", "metrics", "curve", "command", "commit",
                          "machine"} and r["metrics"]["seconds_per_step"] > 0 for r in records)
    (tmp_path / "speed.jsonl").write_text("\n".join(lines) + "\n")
    assert quality.step_costs(tmp_path / "speed.jsonl", "bf16") == {"supervised": 1.0}
