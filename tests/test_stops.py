"""How a run ends when it is told to stop, and what guards its run directory: a scheduler's stop of the whole
process group keeps the run, a stop during an evaluation keeps the trained epoch, one run per --out, and the
run-management mistakes of a resume are one line."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from test_robustness import make_folder
from test_train import ROOT, TINY, read_log, run_tiny, stop_with_sigterm_at


def log_scores(out):
    """The figures of each epoch of a run's log (losses, mIoU, shares), without its timings."""
    return [{k: v for k, v in r.items() if k.startswith(("loss_", "miou_", "share_"))} for r in read_log(out)]


def test_a_stop_of_the_whole_process_group_saves_the_run_with_loader_workers(tmp_path):
    # A scheduler (Slurm's scancel, systemd, kill -TERM -- -PGID) signals every process of the job, the loader
    # workers too: they must leave the stop to the main process, which saves latest.pt and exits 128 + 15.
    out, args = run_tiny(tmp_path, "grouped", "--workers", "2", "--max-iters", "8")
    child = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in child.stdout:  # the run has started: its datasets are built and its first epoch begins
        if "writing to" in line:
            break
    time.sleep(2)  # mid-epoch, loader workers running
    os.killpg(child.pid, signal.SIGTERM)
    output = child.stdout.read()
    assert child.wait(timeout=120) == 128 + signal.SIGTERM, output
    assert "stopped by signal 15" in output and "Traceback" not in output, output
    assert (out / "latest.pt").is_file()
    resumed = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--resume"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "student mIoU" in resumed.stdout


def test_ctrl_c_under_two_cpu_processes_saves_the_run_without_a_traceback(tmp_path):
    # Ctrl-C in a terminal signals the whole foreground group: the main process, the spawned ranks and their loader
    # workers (which take seconds to start). The stop must reach the ranks, rank 0 saves latest.pt, exit 128 + 2.
    out, args = run_tiny(tmp_path, "two", "--gpus", "2", "--workers", "1", "--max-iters", "30")
    child = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in child.stdout:
        if "writing to" in line:
            break
    time.sleep(3)  # the first epoch: loader workers starting or running in both ranks
    os.killpg(child.pid, signal.SIGINT)
    try:
        output = child.communicate(timeout=180)[0]
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        pytest.fail("the run did not end within 180 s of the Ctrl-C (a rank or loader worker hung)")
    assert child.returncode == 128 + signal.SIGINT, output
    assert "stopped by signal 2" in output and "Traceback" not in output, output
    saved = torch.load(out / "latest.pt", weights_only=True)  # what --resume reads (resume itself: tests above)
    assert saved["config"]["seed"] == 0 and (saved["epoch"], saved["step"]) < (2, 0)


def test_a_stop_during_an_evaluation_keeps_the_trained_epoch_and_resume_evaluates_it(tmp_path, monkeypatch):
    straight, args = run_tiny(tmp_path, "straight")
    train.main(args)
    stopped, args = run_tiny(tmp_path, "stopped")
    evaluate, calls = train.evaluate, []

    def signalled_evaluate(*a, **kw):  # SIGTERM arrives as the first evaluation starts
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*a, **kw)
    with monkeypatch.context() as patch:
        patch.setattr(train, "evaluate", signalled_evaluate)
        with pytest.raises(SystemExit) as stop:
            train.main(args)
    assert stop.value.code == 128 + signal.SIGTERM
    saved = torch.load(stopped / "latest.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (0, 3)  # stage 1's three iterations, trained and kept, not scored
    assert not (stopped / "log.jsonl").exists()
    train.main(args + ["--resume"])
    assert log_scores(stopped) == log_scores(straight)


def test_a_second_run_into_a_busy_out_is_refused_in_one_line(tmp_path, capsys):
    out, args = run_tiny(tmp_path, "busy")
    out.mkdir()
    train.lock_run_dir(out)  # another train.py holds this run directory
    try:
        with pytest.raises(SystemExit) as refused:
            train.main(args)
    finally:
        train.release_run_dirs()
    message = capsys.readouterr().err.strip()
    assert refused.value.code == 2 and message.startswith(f"error: --out {out} is in use by another train.py")
    assert not (out / "config.json").exists() and not (out / "log.jsonl").exists()
    train.main(args)  # once it is free, the run goes ahead
    assert (out / "latest.pt").is_file()


@pytest.mark.parametrize("flags, expected", [
    (["--seed", "-1"], "--seed -1: expected 0 or more"),
    (["--swin-depths", "1", "-1", "1", "1"], "--swin-depths 1 -1 1 1: expected"),
])
def test_flags_out_of_range_are_one_line(tmp_path, capsys, flags, expected):
    _, args = run_tiny(tmp_path, "bad", *flags)
    with pytest.raises(SystemExit) as refused:
        train.main(args)
    assert refused.value.code == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {expected}")


def test_a_splits_dir_that_names_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "lists").write_text("not a folder")
    _, args = run_tiny(tmp_path, "run", "--dataset", "folder", "--data-root", str(make_folder(tmp_path / "data")))
    with pytest.raises(SystemExit) as refused:
        train.main(args + ["--splits-dir", str(tmp_path / "lists")])
    assert refused.value.code == 2
    assert capsys.readouterr().err.strip().startswith(f"error: --splits-dir {tmp_path / 'lists'}")


def stopped_folder_run(tmp_path, monkeypatch, root):
    """A tiny supervised run on the folder dataset at `root`, stopped mid-way: its arguments without --data-root."""
    out = tmp_path / "run"
    args = [*TINY, "--dataset", "folder", "--splits-dir", str(tmp_path / "splits"), "--out", str(out), "--teachers",
            "none"]
    with monkeypatch.context() as patch:
        stop_with_sigterm_at(patch, "student_step", 2)
        with pytest.raises(SystemExit):
            train.main(args + ["--data-root", str(root)])
    return out, args


def test_a_run_resumes_with_its_data_at_another_path(tmp_path, monkeypatch, capsys):
    # A run may continue on another machine, where the data lies elsewhere: --data-root may change on --resume.
    out, args = stopped_folder_run(tmp_path, monkeypatch, make_folder(tmp_path / "here"))
    (tmp_path / "here").rename(tmp_path / "there")
    train.main(args + ["--data-root", str(tmp_path / "there"), "--resume"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("student mIoU: ")


def test_a_resume_whose_classes_changed_names_them_in_one_line(tmp_path, monkeypatch, capsys):
    root = make_folder(tmp_path / "data")
    out, args = stopped_folder_run(tmp_path, monkeypatch, root)
    (root / "classes.txt").write_text("sky\nroad\ncar\nsign\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        train.main(args + ["--data-root", str(root), "--resume"])
    message = capsys.readouterr().err.strip()
    assert refused.value.code == 2 and message.startswith("error: --resume:") and "classes.txt" in message, message
    assert len(message.splitlines()) == 1


def test_a_resume_whose_val_images_changed_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    # best.pt is the best student on the val set the run began with: images added before --resume would make it
    # the best over two different sets.
    root = make_folder(tmp_path / "data")
    out, args = stopped_folder_run(tmp_path, monkeypatch, root)
    for kind in ("images", "masks"):
        shutil.copy(root / kind / "val" / "v0.png", root / kind / "val" / "v2.png")
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        train.main(args + ["--data-root", str(root), "--resume"])
    message = capsys.readouterr().err.strip()
    assert refused.value.code == 2 and message.startswith("error: --resume:") and "val" in message, message
    assert "2 images" in message and "3 now" in message and len(message.splitlines()) == 1, message
