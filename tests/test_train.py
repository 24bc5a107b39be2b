"""Training-loop claims: one step's losses as the method defines them, exact resume, safe stops, distributed runs
that agree with one process, baselines."""
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train

ROOT = Path(__file__).resolve().parent.parent
# A tiny IGL-DT: both stages, every network, every loss, a few iterations each, on the synthetic data.
TINY = ["--dataset", "synthetic", "--teacher-epochs", "1", "--student-epochs", "1", "--max-iters", "3",
        "--batch-size", "2", "--crop-size", "64", "--swin-dim", "12", "--swin-depths", "1", "1", "1", "1",
        "--res-width", "8", "--backbone", "resnet18", "--workers", "0", "--eval-every", "1", "--device", "cpu"]


def run_tiny(tmp_path, name, *extra):
    out = tmp_path / name
    args = TINY + ["--out", str(out), "--splits-dir", str(tmp_path / "splits"), *extra]
    return out, args


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """Where the shared runs live, with their one --splits-dir: a run that adopts their teachers must share it."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def trained(runs_dir):
    """trained(*extra) -> (run directory, what it printed) of the TINY run with `extra`. Each run trains once, however
    many tests read it; no test writes into it."""
    runs = {}

    def trained_run(*extra):
        if extra not in runs:
            out, args = run_tiny(runs_dir, f"run{len(runs)}", *extra)
            with contextlib.redirect_stdout(io.StringIO()) as printed, contextlib.redirect_stderr(io.StringIO()):
                train.main(args)
            runs[extra] = out, printed.getvalue()
        return runs[extra]
    return trained_run


# Stage 1 alone, the teachers frozen for stage 2: the teachers that --teachers-from adopts. Its student settings
# (--lambda-glo 0, no student epochs) differ from those of the runs that adopt them, as --teachers-from allows.
STAGE_1 = ("--freeze-teachers", "--student-epochs", "0", "--lambda-glo", "0")


def assert_same_state(a, b, where="state"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """One iteration's input, two synthetic images of each kind: (image, label, weak, strong, ignore, box), with a
    CutMix box in every unlabeled image so that the mixing of the teachers' predictions is in play."""
    labeled, unlabeled, _, _ = data.build_datasets("synthetic", splits_dir=str(tmp_path_factory.mktemp("splits")),
                                                   crop_size=64)
    image, label = (torch.stack(t) for t in zip(labeled[0], labeled[1]))
    weak, strong, ignore, box = (torch.stack(t) for t in zip(unlabeled[0], unlabeled[1]))
    box[:, 16:48, 8:40] = True
    return image, label, weak, strong, ignore, box


def tiny_trainer(*extra):
    """The Trainer of the TINY run with `extra`, before its first step."""
    cfg = vars(train.parse_args(TINY + list(extra)))
    cfg.update(num_classes=len(data.SYNTHETIC_CLASSES))
    return train.Trainer(cfg, rank=0, world=1, device="cpu")


@pytest.mark.parametrize("teachers", ["swin", "res", "ema", "both"])
def test_a_lone_teacher_fills_both_roles_so_l_dis_is_0(batch, teachers):
    # Threshold 0: where the two roles agree, every valid pixel is taught by L_pl.
    losses = tiny_trainer("--teachers", teachers, "--threshold", "0").student_step(*batch)
    if teachers == "both":  # and the check has teeth: two teachers on the same images dispute some pixels
        assert losses["dis"] > 0 and losses["share_disputed"] > 0
    else:
        assert losses["dis"] == 0 and losses["share_disputed"] == 0
        assert losses["share_agreed"] == 1 and losses["pl"] > 0


def after_one_step(batch, stage, *extra):
    """The weights that one step of `stage` (student or teachers) trains, in the TINY run with `extra`."""
    image, label, weak, strong, ignore, box = batch
    trainer = tiny_trainer(*extra)
    torch.manual_seed(0)
    if stage == "teachers":
        trainer.teacher_step(image, label, weak, ignore)
        return {"swin": trainer.swin.state_dict(), "res": trainer.res.state_dict()}
    trainer.student_step(image, label, weak, strong, ignore, box)
    return trainer.student.state_dict()


@pytest.mark.parametrize("flag, loss, stage", [
    ("--lambda-dis", "discrepancy_loss", "student"), ("--lambda-glo", "global_context_loss", "student"),
    ("--lambda-loc", "local_regional_loss", "student"), ("--lambda-cps", "cps_loss", "teachers")])
def test_lambda_0_switches_its_term_off(batch, monkeypatch, flag, loss, stage):
    # With the weight at 0, the step updates the weights exactly as it does with the loss taken out of it.
    weighted, off = after_one_step(batch, stage), after_one_step(batch, stage, flag, "0")
    with monkeypatch.context() as patch:
        patch.setattr(train, loss, lambda *args, **kwargs: torch.zeros(()))
        removed = after_one_step(batch, stage)
    assert_same_state(off, removed)
    with pytest.raises(AssertionError):  # and the check has teeth: at its default weight the term moves them
        assert_same_state(weighted, removed)


def stop_with_sigterm_at(monkeypatch, method, call_number):
    """Send this process SIGTERM during the given call of Trainer.<method>, as a scheduler would."""
    original, calls = getattr(train.Trainer, method), {"n": 0}

    def wrapped(self, *args):
        calls["n"] += 1
        if calls["n"] == call_number:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args)
    monkeypatch.setattr(train.Trainer, method, wrapped)


@pytest.mark.parametrize("stop_at", [("teacher_step", 3), ("student_step", 2)],
                         ids=["between-epochs", "mid-epoch"])
def test_resumed_run_repeats_the_straight_run_exactly(trained, tmp_path, monkeypatch, stop_at):
    straight, _ = trained()
    resumed, args = run_tiny(tmp_path, "resumed")
    with monkeypatch.context() as patch:
        stop_with_sigterm_at(patch, *stop_at)
        with pytest.raises(SystemExit) as stopped:
            train.main(args)
    assert stopped.value.code == 128 + signal.SIGTERM
    train.main(args + ["--resume"])

    a = torch.load(straight / "latest.pt", weights_only=True)
    b = torch.load(resumed / "latest.pt", weights_only=True)
    assert_same_state(a["trainer"], b["trainer"], "trainer")
    keys = lambda record: {k: v for k, v in record.items() if k.startswith(("loss_", "miou_", "lr_"))}
    assert [keys(r) for r in read_log(straight)] == [keys(r) for r in read_log(resumed)]
    assert len(read_log(resumed)) == 2


def test_sigterm_during_training_leaves_a_loadable_checkpoint(tmp_path):
    out, args = run_tiny(tmp_path, "killed")
    args[args.index("--max-iters") + 1] = "200"
    process = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    hung = threading.Timer(300, process.kill)  # a guard against a run that hangs, not a wait for one
    hung.start()
    output = ""
    for line in process.stdout:  # printed once the signal handlers are in place and the loop is about to start
        output += line
        if "writing to" in line:
            break
    process.send_signal(signal.SIGTERM)  # it stops after the iteration under way, whichever that is
    output += process.communicate()[0]
    hung.cancel()
    assert process.returncode == 128 + signal.SIGTERM, output
    checkpoint = torch.load(out / "latest.pt", weights_only=True)
    assert checkpoint["epoch"] == 0 and 0 < checkpoint["step"] < 200
    assert "--resume" in output


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    train.save_atomic({"epoch": 1, "weights": torch.ones(3)}, path)

    def crash_halfway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train.torch, "save", crash_halfway)
    with pytest.raises(train.RunError, match="latest.pt: no space left on device"):
        train.save_atomic({"epoch": 2, "weights": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert list(tmp_path.iterdir()) == [path]                 # no temporary file left behind


def evaluate_cli(checkpoint):
    result = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(checkpoint), "--device", "cpu",
                             "--workers", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"mIoU: \d+\.\d\d", last), last
    return float(last.split()[1])


def test_two_cpu_processes_train_and_report_the_one_process_miou(tmp_path):
    out, args = run_tiny(tmp_path, "two", "--gpus", "2")
    result = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    best = torch.load(out / "best.pt", weights_only=True)
    logged = [r for r in read_log(out) if r["stage"] == "student"][-1]["miou_student"]
    assert best["miou"] == logged
    # The same weights evaluated by the CLI in one process give the mIoU the two processes logged.
    assert evaluate_cli(out / "best.pt") == round(logged, 2)


@pytest.mark.parametrize("variant", [["--teachers", "none"], ["--teachers", "swin", "--freeze-teachers"],
                                     ["--teachers", "res", "--amp", "bf16"]], ids=lambda v: " ".join(v))
def test_every_variant_trains_and_logs(trained, variant, monkeypatch):
    monkeypatch.setattr(train, "native_bf16", lambda device: True)  # where bf16 is emulated: the same sums, slower
    out, _ = trained(*variant)
    log = read_log(out)
    assert log[-1]["stage"] == "student" and 0 <= log[-1]["miou_student"] <= 100
    assert all(v == v for r in log for k, v in r.items() if k.startswith("loss_"))  # no NaN
    assert (out / "best.pt").is_file() and list((out / "vis").glob("*.png"))
    if variant[1] == "none":
        assert len(log) == 1 and "loss_cps" not in log[0]     # no teacher stage for the baseline


def test_the_checkpoint_evaluated_by_the_cli_gives_the_logged_miou(trained, tmp_path):
    out, _ = trained("--teachers", "none")
    assert evaluate_cli(out / "best.pt") == round(read_log(out)[-1]["miou_student"], 2)

    # --images: a trained student applied to a folder of plain pictures, any size, no masks.
    photos, predictions = tmp_path / "photos", tmp_path / "predictions"
    photos.mkdir()
    for name, size in [("a.png", (70, 50)), ("b.jpg", (33, 41))]:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(photos / name)
    result = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(out / "best.pt"), "--device", "cpu",
                             "--images", str(photos), "--save-vis", str(predictions)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert {p.name: Image.open(p).size for p in predictions.iterdir()} == {"a.png": (70, 50), "b.png": (33, 41)}


def test_student_epochs_0_trains_the_teachers_alone(trained):
    out, printed = trained(*STAGE_1)
    log = read_log(out)
    assert [r["stage"] for r in log] == ["teachers"] and "miou_student" not in log[0]
    assert not (out / "best.pt").exists()  # no student was trained, so there is no best student
    last = printed.strip().splitlines()[-1]
    assert last.startswith(f"swin mIoU: {log[0]['miou_swin']:.2f}, res mIoU: {log[0]['miou_res']:.2f}"), last


def test_frozen_teachers_end_stage_2_as_they_ended_stage_1(trained):
    teachers = lambda run: {k: v for k, v in torch.load(run[0] / "latest.pt", weights_only=True)["trainer"].items()
                            if k in ("swin", "res", "swin_ema", "res_ema")}
    stage1 = teachers(trained(*STAGE_1))
    assert_same_state(stage1, teachers(trained("--freeze-teachers")))
    with pytest.raises(AssertionError):  # the synthetic default, the paper's iterative scheme, trains them on
        assert_same_state(stage1, teachers(trained()))


def test_teachers_from_gives_the_run_a_start_from_scratch_gives(trained, runs_dir):
    teachers, _ = trained(*STAGE_1)
    scratch, _ = trained("--freeze-teachers")
    adopted, args = run_tiny(runs_dir, "adopted", "--freeze-teachers", "--teachers-from", str(teachers))
    train.main(args)
    a = torch.load(scratch / "latest.pt", weights_only=True)
    b = torch.load(adopted / "latest.pt", weights_only=True)
    assert_same_state(a["trainer"], b["trainer"], "trainer")
    keys = lambda record: {k: v for k, v in record.items() if k.startswith(("stage", "loss_", "miou_", "lr_"))}
    assert [keys(r) for r in read_log(scratch)] == [keys(r) for r in read_log(adopted)]  # stage 1's record too
    assert read_log(adopted)[0] == read_log(teachers)[0]  # to its seconds: stage 1 was adopted, not trained again
    # And the check has teeth: the student follows its teachers; under teachers that train on, it ends elsewhere.
    with pytest.raises(AssertionError):
        assert_same_state(a["trainer"]["student"],
                          torch.load(trained()[0] / "latest.pt", weights_only=True)["trainer"]["student"])


@pytest.mark.parametrize("extra, expected", [
    (["--freeze-teachers", "--lambda-cps", "0.1"], "--lambda-cps 0.5, this run 0.1"),
    (["--freeze-teachers", "--res-width", "4"], "--res-width"),
    (["--no-freeze-teachers"], "--freeze-teachers"),  # co-training: the teachers' schedule spans both stages
    (["--freeze-teachers", "--teachers", "none"], "needs teachers"),
])
def test_teachers_from_refuses_teachers_this_run_would_not_train(trained, runs_dir, capsys, extra, expected):
    teachers, _ = trained(*STAGE_1)
    _, args = run_tiny(runs_dir, "student", "--teachers-from", str(teachers), *extra)
    with pytest.raises(SystemExit) as exited:
        train.main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1 and expected in lines[0], lines
    _, args = run_tiny(runs_dir, "student2", "--teachers-from", str(runs_dir / "no-such-run"))
    with pytest.raises(SystemExit):
        train.main(args)
    assert "no latest.pt there" in capsys.readouterr().err


def test_freezing_the_teachers_is_a_per_dataset_default_that_a_flag_overrides():
    root = ["--data-root", "DIR"]
    assert train.parse_args(["--dataset", "folder", *root]).freeze_teachers is True
    assert train.parse_args(["--dataset", "folder", *root, "--no-freeze-teachers"]).freeze_teachers is False
    assert train.parse_args(["--dataset", "voc", *root]).freeze_teachers is False   # the paper's iterative scheme
    assert train.parse_args(["--dataset", "voc", *root, "--freeze-teachers"]).freeze_teachers is True


@pytest.mark.parametrize("argv, expected", [
    (["--dataset", "folder", "--data-root", "/no/such/dir"], "/no/such/dir"),
    (["--teachers", "none", "--student-epochs", "0"], "--student-epochs 0"),
    (["--resume", "--out", "/tmp/igl-dt-no-such-run"], "--resume"),
])
def test_a_users_mistake_is_one_line_without_traceback(argv, expected):
    result = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr


@pytest.mark.parametrize("flag", ["--pretrained", "--pretrained-swin", "--pretrained-res"])
def test_imagenet_weights_that_cannot_be_downloaded_are_a_one_line_error(tmp_path, monkeypatch, capsys, flag):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network here")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache: torch must download
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    _, args = run_tiny(tmp_path, "run", flag, "imagenet")
    with pytest.raises(SystemExit) as exited:
        train.main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {flag} imagenet: could not download") and "no network here" in lines[0]
