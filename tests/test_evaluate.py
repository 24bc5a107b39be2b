"""Evaluation claims: the mIoU arithmetic, sliding-window inference, distributed counting, and the command line's
checks of its flags and folders (each mistake one line, before the checkpoint or any image is read where it can be)."""
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import evaluate as evaluate_cli
from data import DataError
from evaluate import confusion_matrix, evaluate, iou_per_class, predict, sliding_window

ROOT = Path(__file__).resolve().parents[1]


def test_miou_matches_a_confusion_matrix_worked_out_by_hand():
    # 4 classes; class 3 appears in neither prediction nor ground truth.
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 255, 255])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0, 3, 1])        # the two 255 pixels are ignored
    cm = confusion_matrix(pred, target, num_classes=4)
    assert cm.tolist() == [[2, 1, 0, 0],
                           [0, 1, 1, 0],
                           [1, 0, 2, 0],
                           [0, 0, 0, 0]]
    iou, miou = iou_per_class(cm)
    # class 0: TP 2, FP 1 (a 2 predicted as 0), FN 1 -> 2/4; class 1: 1/(1+1+1) = 1/3; class 2: 2/(2+1+1) = 1/2
    assert iou[:3].tolist() == pytest.approx([50.0, 100 / 3, 50.0])
    assert math.isnan(iou[3])                                  # absent everywhere: undefined, not 0 or 100
    assert miou == pytest.approx((50 + 100 / 3 + 50) / 3)      # ...and left out of the mean


def test_a_class_predicted_but_never_present_counts_as_zero():
    cm = confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 0]), num_classes=2)
    iou, miou = iou_per_class(cm)
    assert iou.tolist() == [50.0, 0.0] and miou == 25.0


class TinyNet(torch.nn.Module):
    """A small fully convolutional net with a receptive field of 5 pixels."""

    def __init__(self, num_classes=3, kernel=3):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, kernel, padding=kernel // 2), torch.nn.ReLU(),
                                        torch.nn.Conv2d(8, num_classes, kernel, padding=kernel // 2))

    def forward(self, x):
        return self.body(x)


def test_sliding_window_equals_full_image_inference_when_the_window_covers_the_image():
    net, image = TinyNet().eval(), torch.randn(1, 3, 37, 53)
    full = predict(net, image, 3, mode="full")
    for window in (53, 64, 801):
        assert torch.allclose(predict(net, image, 3, mode="sliding", window=window, stride=window * 2 // 3), full)


def test_sliding_windows_average_overlaps_and_cover_every_pixel():
    net, image = TinyNet(kernel=1).eval(), torch.randn(1, 3, 37, 53)  # 1x1 convs: every window agrees exactly
    full = net(image).softmax(1)
    assert torch.allclose(sliding_window(net, image, 3, window=16, stride=10), full, atol=1e-6)


def test_flip_and_multiscale_averaging_keep_shapes():
    net, image = TinyNet().eval(), torch.randn(1, 3, 33, 47)
    probs = predict(net, image, 3, mode="full", flip=True, scales=(0.75, 1.0, 1.5))
    assert probs.shape == (1, 3, 33, 47)
    assert torch.allclose(probs.sum(1), torch.ones(1, 33, 47), atol=1e-5)


class RandomMasks(torch.utils.data.Dataset):
    """Images of different sizes with random masks, so each one changes the confusion matrix."""

    def __len__(self):
        return 7

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        h, w = 20 + i, 24 + 2 * i
        mask = torch.randint(0, 3, (h, w), generator=g)
        mask[:2] = 255
        return torch.randn(3, h, w, generator=g), mask


def _evaluate_in_process(rank, world, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = evaluate(TinyNet(), RandomMasks(), 3)
    if rank == 0:
        queue.put((result["miou"], result["confusion"].tolist()))
    dist.destroy_process_group()


def test_miou_over_2_processes_equals_miou_in_1():
    single = evaluate(TinyNet(), RandomMasks(), 3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_evaluate_in_process, args=(2, port, queue), nprocs=2)
    miou, confusion = queue.get()
    assert confusion == single["confusion"].tolist()           # every image counted exactly once
    assert miou == single["miou"]


# ------------------------------------------------------------------------------------------ the command line's checks
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A best.pt as train.py writes one: an untrained 3-class student and the config that builds it."""
    path = tmp_path_factory.mktemp("run") / "best.pt"
    config = {"dataset": "folder", "num_classes": 3, "backbone": "resnet18", "output_stride": 16,
              "palette": [[0, 0, 0], [128, 0, 0], [0, 128, 0]], "class_names": ["a", "b", "c"]}
    torch.manual_seed(0)
    torch.save({"config": config, "student": evaluate_cli.build_student(config).state_dict()}, path)
    return path


def save_photos(folder, names, size=(24, 20)):
    folder.mkdir(parents=True, exist_ok=True)
    for n, name in enumerate(names):
        pixels = np.random.default_rng(n).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    return folder


def refused(argv, *words):
    """evaluate.main(argv) raises the one-line DataError the command line prints, holding each of `words`."""
    with pytest.raises(DataError) as caught:
        evaluate_cli.main(argv)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert str(word) in message, message
    return message


def test_images_of_one_name_are_refused_naming_both_before_any_prediction(checkpoint, tmp_path):
    photos = save_photos(tmp_path / "photos", ["photo.png", "photo.jpg", "other.png"])
    out = tmp_path / "predictions"
    refused(["--checkpoint", str(checkpoint), "--device", "cpu", "--images", str(photos), "--save-vis", str(out)],
            "photo.jpg", "photo.png", out / "photo.png", "one image per name")
    assert not out.exists()
    (photos / "photo.jpg").unlink()
    evaluate_cli.main(["--checkpoint", str(checkpoint), "--device", "cpu", "--images", str(photos), "--save-vis",
                       str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["other.png", "photo.png"]


def test_predictions_never_overwrite_the_images(checkpoint, tmp_path):
    photos = save_photos(tmp_path / "photos", ["photo.png"])
    before = (photos / "photo.png").read_bytes()
    refused(["--checkpoint", str(checkpoint), "--device", "cpu", "--images", str(photos), "--save-vis", str(photos)],
            "--save-vis", "is the --images folder", "another folder")
    assert (photos / "photo.png").read_bytes() == before


@pytest.mark.parametrize("flags, bad", [(["--window", "0"], "--window 0"), (["--stride", "0"], "--stride 0"),
                                        (["--stride", "-3"], "--stride -3"), (["--scales", "0"], "--scales 0.0"),
                                        (["--scales", "1", "nan"], "--scales nan"), (["--scales", "100"],
                                                                                     "--scales 100.0"),
                                        (["--workers", "-1"], "--workers -1")])
def test_a_bad_number_is_one_line_before_the_checkpoint_is_read(tmp_path, flags, bad):
    refused(["--checkpoint", str(tmp_path / "missing.pt"), "--device", "cpu", *flags], f"{bad}: expected")


def test_a_stride_longer_than_the_window_is_refused(checkpoint, tmp_path):
    photos = save_photos(tmp_path / "photos", ["photo.png"], size=(64, 48))
    refused(["--checkpoint", str(checkpoint), "--device", "cpu", "--images", str(photos), "--save-vis",
             str(tmp_path / "out"), "--mode", "sliding", "--window", "16", "--stride", "32"],
            "--stride 32: expected at most the window, 16")


def test_a_folder_flag_naming_a_file_or_a_checkpoint_naming_a_folder_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    missing = str(tmp_path / "missing.pt")
    refused(["--checkpoint", str(tmp_path), "--device", "cpu"], "--checkpoint", "is a folder", "best.pt")
    refused(["--checkpoint", missing, "--device", "cpu", "--save-vis", str(tmp_path / "a_file")], "--save-vis",
            "it is a file")
    refused(["--checkpoint", missing, "--device", "cpu", "--images", str(tmp_path / "a_file")], "--images",
            "expected a folder holding images")


def test_the_command_line_prints_a_bad_flag_in_one_line():
    result = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", "x.pt", "--window", "0"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == ["error: --window 0: expected 1 or more"]


def test_val_masks_that_label_no_pixel_are_refused_before_the_evaluation(checkpoint, tmp_path):
    for n in range(2):
        save_photos(tmp_path / "data" / "images" / "val", [f"v{n}.png"])
        (tmp_path / "data" / "masks" / "val").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 24), 255, dtype=np.uint8)).save(tmp_path / "data" / "masks" / "val" / f"v{n}.png")
    refused(["--checkpoint", str(checkpoint), "--device", "cpu", "--workers", "0", "--data-root",
             str(tmp_path / "data")], "the 2 val masks", "label no pixel")
