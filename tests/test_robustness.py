"""What a user's mistake or a fault becomes: correct behaviour, or one line `error: ...` naming the flag or file and
what was expected, before any training time is spent where the check can be made up front."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--teacher-epochs", "1", "--student-epochs", "1", "--max-iters", "2", "--batch-size", "2", "--crop-size",
        "48", "--swin-dim", "12", "--swin-depths", "1", "1", "1", "1", "--res-width", "4", "--backbone", "resnet18",
        "--workers", "0", "--eval-every", "1", "--device", "cpu", "--amp", "off"]
SYNTHETIC = ["--dataset", "synthetic", *TINY]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA GPU")


def fails_in_one_line(capsys, argv, *expected):
    """train.main(argv) exits 2 with one line `error: ...` on stderr that holds each of `expected` (and no
    traceback; the progress bars that a terminal overwrites are the only other lines)."""
    with pytest.raises(SystemExit) as exited:
        train.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not re.search(r"epoch \d+/\d+:|^\s*$", line)]
    assert exited.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert str(text) in lines[0], lines[0]
    return lines[0]


def strict_json_lines(path):
    """The lines of a JSONL file, parsed as JSON proper: NaN and Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in Path(path).read_text().splitlines()]


def make_folder(root, names=("a", "b", "c", "d", "e", "f", "g", "h"), val=("v0", "v1"), test=(), num_classes=3):
    """A tiny folder dataset: images/{train,val,test}/<name>.png with masks of ids 0..num_classes-1."""
    for split, split_names in (("train", names), ("val", val), ("test", test)):
        for n, name in enumerate(split_names):
            rng = np.random.default_rng(n)
            for kind, pixels in (("images", rng.integers(0, 256, (30, 40, 3))),
                                 ("masks", np.arange(30 * 40).reshape(30, 40) % num_classes)):
                path = root / kind / split / f"{name}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.astype(np.uint8)).save(path)
    return root


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny supervised run on a folder dataset: (its directory, its data root, its splits dir)."""
    base = tmp_path_factory.mktemp("finished")
    root = make_folder(base / "data")
    out = base / "run"
    train.main(["--dataset", "folder", "--data-root", str(root), "--splits-dir", str(base / "splits"), "--out",
                str(out), "--teachers", "none", *TINY])
    return out, root, base / "splits"


# 1 ------------------------------------------------------------------------------------------ --resume and flags
def test_resume_refuses_a_flag_that_would_change_the_saved_run(finished_run, capsys):
    out, root, splits = finished_run
    resume = ["--dataset", "folder", "--data-root", str(root), "--splits-dir", str(splits), "--out", str(out),
              "--resume"]
    fails_in_one_line(capsys, resume + ["--batch-size", "4"], "--batch-size 2, this command 4", "drop --batch-size")
    fails_in_one_line(capsys, resume + ["--lr", "0.5"], "--lr")
    train.main(resume + ["--workers", "0", "--eval-every", "3"])  # how a run goes, not what it trains: accepted
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("student mIoU: ")


# 2 ------------------------------------------------------------------------------------------ diverging losses
def nan_pseudo_label_loss(monkeypatch, calls):
    """L_pl is NaN on the given calls (1 = the first), as a diverging run's would be."""
    original, count = train.pseudo_label_loss, {"n": 0}

    def diverging(*args, **kwargs):
        count["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if count["n"] in calls else loss
    monkeypatch.setattr(train, "pseudo_label_loss", diverging)


def test_a_step_with_a_nan_loss_is_skipped_counted_and_never_saved(tmp_path, monkeypatch):
    nan_pseudo_label_loss(monkeypatch, calls={2})
    out = tmp_path / "run"
    train.main([*SYNTHETIC, "--teachers", "swin", "--freeze-teachers", "--out", str(out), "--splits-dir",
                str(tmp_path / "splits")])
    log = strict_json_lines(out / "log.jsonl")
    assert [r["skipped_steps"] for r in log] == [0, 1]
    assert all(math.isfinite(v) for r in log for k, v in r.items() if k.startswith("loss_"))
    best = torch.load(out / "best.pt", weights_only=True)["student"]
    assert all(torch.isfinite(w).all() for w in best.values())


def test_a_run_whose_losses_stay_nan_stops_in_one_line_keeping_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                                        capsys):
    nan_pseudo_label_loss(monkeypatch, calls=range(1, 100))
    monkeypatch.setattr(train, "NONFINITE_LIMIT", 2)
    out = tmp_path / "run"
    fails_in_one_line(capsys, [*SYNTHETIC, "--teachers", "swin", "--freeze-teachers", "--out", str(out),
                               "--splits-dir", str(tmp_path / "splits")], "loss_pl was nan at student step 2")
    kept = torch.load(out / "latest.pt", weights_only=True)
    assert (kept["epoch"], kept["step"]) == (1, 0) and not (out / "best.pt").exists()  # stage 1's end, intact
    strict_json_lines(out / "log.jsonl")


# 3 ------------------------------------------------------------------------------------------ names with spaces
def test_split_lists_round_trip_a_file_name_with_a_space(tmp_path):
    root = make_folder(tmp_path / "data", names=("my photo 2", "b", "c", "d", "e", "f", "g", "h"))
    first = data.build_datasets("folder", str(root), "4", str(tmp_path / "splits"), crop_size=32)
    again = data.build_datasets("folder", str(root), "4", str(tmp_path / "splits"), crop_size=32)  # reads the lists
    assert [d.files for d in first[:2]] == [d.files for d in again[:2]]
    named = {image for d in first[:2] for image, _ in d.files}
    assert str(root / "images" / "train" / "my photo 2.png") in named
    lists = " ".join(p.read_text() for p in (tmp_path / "splits").rglob("*.txt"))
    assert "images/train/my%20photo%202.png" in lists and "images/train/b.png" in lists  # community format


# 4 ------------------------------------------------------------------------------------------ numeric flags
@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--batch-size", "-2"), ("--crop-size", "0"),
                                         ("--lr", "-0.01"), ("--swin-lr", "-0.01"), ("--workers", "-1"),
                                         ("--max-iters", "-1"), ("--eval-every", "0"), ("--region", "0"),
                                         ("--threshold", "1.5"), ("--lr", "nan")])
def test_a_bad_number_is_one_line_before_any_data_is_read(tmp_path, monkeypatch, capsys, flag, value):
    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before the flags were checked")
    monkeypatch.setattr(data, "build_datasets", no_data)
    fails_in_one_line(capsys, [*SYNTHETIC, "--out", str(tmp_path / "run"), flag, value], f"{flag} {value}: expected")


# 5 ------------------------------------------------------------------------------------------ failed writes
def test_a_full_disk_is_one_line_naming_the_file_and_the_previous_checkpoint_stays(tmp_path, monkeypatch, capsys):
    saves, original = {"n": 0}, torch.save

    def disk_full_on_the_second_save(obj, f, *args, **kwargs):
        saves["n"] += f.name.endswith("latest.pt.tmp")
        if saves["n"] == 2:
            f.write(b"half a checkpoint")
            raise OSError(28, "No space left on device")
        return original(obj, f, *args, **kwargs)
    monkeypatch.setattr(train.torch, "save", disk_full_on_the_second_save)  # of latest.pt
    out = tmp_path / "run"
    fails_in_one_line(capsys, [*SYNTHETIC, "--teachers", "none", "--student-epochs", "2", "--out", str(out),
                               "--splits-dir", str(tmp_path / "splits")], "latest.pt: no space left on device")
    monkeypatch.undo()
    assert torch.load(out / "latest.pt", weights_only=True)["epoch"] == 1
    assert not list(out.glob("*.tmp"))


def test_an_unwritable_out_is_one_line_before_any_data_is_read(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    fails_in_one_line(capsys, [*SYNTHETIC, "--out", str(tmp_path / "a_file" / "run")], "--out", "cannot write")


# 6 ------------------------------------------------------------------------------------------ broken checkpoints
@pytest.mark.parametrize("content", ["truncated", "empty", "garbage", "best.pt"])
def test_resume_and_teachers_from_refuse_a_broken_or_foreign_checkpoint(finished_run, tmp_path, capsys, content):
    out = tmp_path / "run"
    out.mkdir()
    whole = (finished_run[0] / "latest.pt").read_bytes()
    (out / "latest.pt").write_bytes({"truncated": whole[:len(whole) // 2], "empty": b"", "garbage": b"\x80garbage",
                                     "best.pt": (finished_run[0] / "best.pt").read_bytes()}[content])
    fails_in_one_line(capsys, [*SYNTHETIC, "--out", str(out), "--resume"], "--resume", "latest.pt")
    fails_in_one_line(capsys, [*SYNTHETIC, "--out", str(tmp_path / "new"), "--teachers-from", str(out)],
                      "--teachers-from", "latest.pt")


@pytest.mark.parametrize("break_it, expected", [
    (lambda c: [1, 2, 3], "holds no 'config'"),
    (lambda c: c | {"config": {k: v for k, v in c["config"].items() if k != "num_classes"}}, "num_classes"),
    (lambda c: c | {"student": dict(list(c["student"].items())[1:])}, "does not match its config"),
])
def test_evaluate_refuses_a_broken_checkpoint_in_one_line(finished_run, tmp_path, break_it, expected):
    checkpoint = torch.load(finished_run[0] / "best.pt", weights_only=True)
    torch.save(break_it(checkpoint), tmp_path / "broken.pt")
    with pytest.raises(data.DataError, match=expected):
        evaluate.load_student(str(tmp_path / "broken.pt"))


# 7 ------------------------------------------------------------------------------------------ devices
@NO_GPU
def test_cuda_without_a_gpu_is_one_line_in_both_scripts_before_any_data_is_read(tmp_path, capsys):
    fails_in_one_line(capsys, ["--device", "cuda", "--out", str(tmp_path / "run")], "--device cuda", "--device cpu")
    result = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", "x.pt", "--device", "cuda"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --device cuda: no CUDA GPU is visible to torch here; expected --device cpu"]


@NO_GPU
def test_gpus_on_a_machine_without_one_is_one_line_unless_cpu_processes_are_asked_for(tmp_path, capsys):
    fails_in_one_line(capsys, ["--gpus", "8", "--out", str(tmp_path / "run")], "--gpus 8", "--device cpu --gpus 8")


def test_fp16_on_the_cpu_and_an_unknown_device_are_refused(tmp_path, capsys):
    fails_in_one_line(capsys, [*SYNTHETIC, "--amp", "fp16", "--out", str(tmp_path / "run")], "--amp fp16", "bf16")
    with pytest.raises(SystemExit) as exited:
        evaluate.parse_args(["--checkpoint", "x.pt", "--device", "foo"])
    assert exited.value.code == 2 and "invalid choice: 'foo'" in capsys.readouterr().err


# 8 ------------------------------------------------------------------------------------------ evaluate.py
def test_evaluate_scores_any_split_of_another_root_without_touching_split_lists(finished_run, tmp_path, capsys):
    out, _, splits = finished_run
    other = make_folder(tmp_path / "other", names=("x",), val=("p", "q"), test=("r", "s", "t"))
    lists = lambda: sorted((p, p.read_bytes()) for p in splits.rglob("*.txt"))
    before = lists()
    for split in ("val", "test"):
        evaluate.main(["--checkpoint", str(out / "best.pt"), "--data-root", str(other), "--split", split,
                       "--device", "cpu", "--workers", "0"])
        assert capsys.readouterr().out.strip().splitlines()[-1].startswith("mIoU: ")
    assert lists() == before and before
    assert not (other / "splits").exists()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(data.DataError, match="--save-vis .*cannot write"):  # before the evaluation, not after it
        evaluate.main(["--checkpoint", str(out / "best.pt"), "--data-root", str(other), "--device", "cpu",
                       "--save-vis", str(tmp_path / "a_file" / "vis")])


# 9 ------------------------------------------------------------------------------------------ two folder datasets
def test_two_folder_datasets_keep_their_own_split_lists(tmp_path):
    one = make_folder(tmp_path / "one", names=[f"one{i}" for i in range(8)])
    two = make_folder(tmp_path / "two", names=[f"two{i}" for i in range(8)])
    splits = str(tmp_path / "splits")
    for root in (one, two, one):
        labeled, unlabeled, _, _ = data.build_datasets("folder", str(root), "1/4", splits, crop_size=32)
        assert all(Path(image).parent == root / "images" / "train" for d in (labeled, unlabeled)
                   for image, _ in d.files)


def test_a_list_naming_images_outside_the_training_pool_is_an_error(tmp_path):
    root = make_folder(tmp_path / "data")
    labeled, _, _, _ = data.build_datasets("folder", str(root), "1/4", str(tmp_path / "splits"), crop_size=32)
    listing = next((tmp_path / "splits").rglob("labeled.txt"))
    listing.write_text(listing.read_text() + "images/val/v0.png masks/val/v0.png\n")  # a val image in training
    with pytest.raises(data.DataError, match="images/val/v0.png, which is not in the training pool"):
        data.build_datasets("folder", str(root), "1/4", str(tmp_path / "splits"), crop_size=32)


# 10 ----------------------------------------------------------------------------------------- checked up front
def test_a_corrupt_val_image_is_found_before_the_first_epoch(tmp_path, monkeypatch, capsys):
    root = make_folder(tmp_path / "data")
    (root / "images" / "val" / "v1.png").write_bytes(b"not a png")
    def no_training(*args):
        raise AssertionError("a step ran before the data was checked")
    monkeypatch.setattr(train.Trainer, "student_step", no_training)
    fails_in_one_line(capsys, ["--dataset", "folder", "--data-root", str(root), "--splits-dir",
                               str(tmp_path / "splits"), "--out", str(tmp_path / "run"), "--teachers", "none", *TINY],
                      "cannot read image", "v1.png")


def test_masks_with_a_gap_in_their_ids_and_no_classes_txt_are_an_error(tmp_path):
    root = make_folder(tmp_path / "data")
    Image.fromarray(np.full((30, 40), 200, dtype=np.uint8)).save(root / "masks" / "train" / "a.png")
    with pytest.raises(data.DataError, match="ids 0, 1, 2, 200 but never 3, 4, 5, 6, 7, ...; expected .*classes.txt"):
        data.build_datasets("folder", str(root), "1/4", str(tmp_path / "splits"), crop_size=32)
