"""Evaluation claims: the mIoU arithmetic, sliding-window inference, and distributed counting."""
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from evaluate import confusion_matrix, evaluate, iou_per_class, predict, sliding_window


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
