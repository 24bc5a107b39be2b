"""Evaluation: confusion matrix, per-class IoU and mIoU; full-image and sliding-window inference; a CLI.

    python evaluate.py --checkpoint runs/voc_1_16/best.pt --data-root data/VOC2012
    python evaluate.py --checkpoint best.pt --data-root data/other_copy --split test
    python evaluate.py --checkpoint best.pt --images my_photos/ --save-vis predictions/

A checkpoint carries its training config, so no model flags are needed. Under torch.distributed, each rank
evaluates the images rank, rank + world, ... (each exactly once, no padded duplicates) and the confusion
matrices are summed, so the mIoU equals the one-process mIoU.
"""
import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import data
from data import one_line, require_device, require_writable_dir
from models import build_model, load_weights

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


# ----------------------------------------------------------------------------------------------- metrics
def confusion_matrix(pred, target, num_classes, ignore_index=data.IGNORE_INDEX):
    """cm[t, p] = number of pixels of true class t predicted as p. pred, target: same shape, long; -> (K, K)."""
    keep = target != ignore_index
    index = target[keep] * num_classes + pred[keep]
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(cm):
    """IoU_c = TP / (TP + FP + FN) from a (K, K) confusion matrix, in percent.

    A class absent from both the ground truth and the prediction has 0 / 0: its IoU is undefined, returned as
    NaN, and left out of the mean (it is neither a perfect 100 nor a failing 0). A class that is predicted but
    never present has IoU 0 and does count. Returns (iou (K,) float64 with NaN, miou float).
    """
    cm = cm.double()
    true_positive = cm.diag()
    union = cm.sum(0) + cm.sum(1) - true_positive
    iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, float("nan"))) * 100
    return iou, float(iou.nanmean()) if (union > 0).any() else float("nan")


# ----------------------------------------------------------------------------------------------- inference
def _window_starts(size, window, stride):
    """Top-left offsets so that windows of `window` pixels, `stride` apart, cover [0, size); the last is flush."""
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts


def sliding_window(model, image, num_classes, window, stride):
    """Average the class probabilities of overlapping `window` x `window` crops. image (1, 3, H, W) -> (1, K, H, W).

    A window larger than the image shrinks to the image, so a window that covers the image is exactly
    full-image inference.
    """
    _, _, height, width = image.shape
    win_h, win_w = min(window, height), min(window, width)
    probs = image.new_zeros(1, num_classes, height, width, dtype=torch.float32)
    count = image.new_zeros(1, 1, height, width, dtype=torch.float32)
    for top in _window_starts(height, win_h, stride):
        for left in _window_starts(width, win_w, stride):
            crop = image[..., top:top + win_h, left:left + win_w]
            probs[..., top:top + win_h, left:left + win_w] += model(crop).float().softmax(dim=1)
            count[..., top:top + win_h, left:left + win_w] += 1
    return probs / count


@torch.no_grad()
def predict(model, image, num_classes, mode="full", window=801, stride=534, flip=False, scales=(1.0,)):
    """Class probabilities (1, K, H, W) for image (1, 3, H, W), averaged over scales and horizontal flips."""
    height, width = image.shape[-2:]
    total, views = 0.0, 0
    for scale in scales:
        scaled = image if scale == 1 else F.interpolate(image, scale_factor=scale, mode="bilinear",
                                                        align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            view = scaled.flip(-1) if flipped else scaled
            if mode == "sliding":
                probs = sliding_window(model, view, num_classes, window, stride)
            else:
                probs = model(view).float().softmax(dim=1)
            probs = probs.flip(-1) if flipped else probs
            if probs.shape[-2:] != (height, width):
                probs = F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)
            total, views = total + probs, views + 1
    return total / views


@torch.no_grad()
def evaluate(model, dataset, num_classes, device="cpu", mode="full", window=801, stride=534, flip=False,
             scales=(1.0,), amp_dtype=None, num_workers=0, stop=None):
    """mIoU of `model` on `dataset` (items: image (3, H, W), mask (H, W)), one image at a time at full size.

    Distributed: each rank takes images rank, rank + world, ...; the confusion matrices are all-reduced.
    Returns {"miou": float, "iou": [K floats, NaN for absent classes], "confusion": (K, K) tensor}, or None when
    `stop()` (asked before each image, one process only) turns true.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    indices = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=1,
                                         num_workers=num_workers)
    was_training = model.training
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    device_type = torch.device(device).type
    for image, mask in loader:
        if stop is not None and stop():
            model.train(was_training)
            return None
        image, mask = image.to(device), mask.to(device)
        with torch.autocast(device_type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            probs = predict(model, image, num_classes, mode, window, stride, flip, scales)
        cm += confusion_matrix(probs.argmax(dim=1), mask, num_classes)
    if world > 1:
        dist.all_reduce(cm)
    model.train(was_training)
    iou, miou = iou_per_class(cm.cpu())
    return {"miou": miou, "iou": iou.tolist(), "confusion": cm.cpu()}


# ----------------------------------------------------------------------------------------------- pictures
def denormalize(image):
    """Normalised (3, H, W) tensor -> PIL image, for showing inputs beside predictions."""
    mean = torch.tensor(data.MEAN).view(3, 1, 1)
    std = torch.tensor(data.STD).view(3, 1, 1)
    pixels = ((image.cpu().float() * std + mean).clamp(0, 1) * 255).round().byte()
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def save_panel(path, rows, gap=4):
    """Tile rows of equally sized PIL images (e.g. image | ground truth | G | L | S) into one PNG."""
    width, height = rows[0][0].size
    columns = max(len(row) for row in rows)
    panel = Image.new("RGB", (columns * (width + gap) - gap, len(rows) * (height + gap) - gap), "white")
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            panel.paste(picture, (c * (width + gap), r * (height + gap)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    panel.save(path)


def prediction_rows(models, dataset, info, device, count=3, **inference):
    """For the first `count` images of `dataset`: image | ground truth | one prediction per model, for save_panel."""
    rows = []
    for i in range(min(count, len(dataset))):
        image, mask = dataset[i]
        row = [denormalize(image), data.colorize(mask, info.palette)]
        for model in models:
            was_training = model.training
            prediction = predict(model.eval(), image[None].to(device), info.num_classes, **inference)
            model.train(was_training)
            row.append(data.colorize(prediction.argmax(dim=1)[0].cpu(), info.palette))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------- checkpoints
def build_student(config, pretrained=False):
    """The DeepLabV3+ student described by a training config (a plain dict, as stored in checkpoints)."""
    return build_model("deeplabv3plus", config["num_classes"], backbone=config["backbone"],
                       output_stride=config["output_stride"], pretrained=pretrained)


def read_checkpoint(path, flag, keys=("config",), expected="a best.pt or latest.pt written by train.py"):
    """The dict that train.py saved in `path`, holding `keys`; a missing, truncated, empty or foreign file is a
    one-line error naming `flag` and the file (weights_only: a file can hold tensors, never code to run)."""
    if os.path.isdir(path):
        raise data.DataError(f"{flag} {path}: is a folder; expected {expected}, such as {Path(path) / 'best.pt'}")
    if not os.path.isfile(path):
        raise data.DataError(f"{flag} {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say so in one line
        raise data.DataError(f"{flag} {path}: not a checkpoint written by train.py ({error.__class__.__name__})")
    missing = [key for key in keys if not isinstance(checkpoint, dict) or key not in checkpoint]
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    if missing or not isinstance(config, dict) or not CONFIG_KEYS <= set(config):
        what = f"no {missing[0]!r}" if missing else "a config without " + ", ".join(sorted(CONFIG_KEYS - set(config)))
        raise data.DataError(f"{flag} {path}: holds {what}; expected {expected}")
    return checkpoint


CONFIG_KEYS = {"dataset", "num_classes", "backbone", "output_stride"}  # what building the student needs


def load_student(path, device="cpu"):
    """(student in eval mode, config) from a `best.pt` / `latest.pt` written by train.py."""
    checkpoint = read_checkpoint(path, "--checkpoint")
    weights = checkpoint.get("student") or checkpoint.get("trainer", {}).get("student")  # best.pt or latest.pt
    if not isinstance(weights, dict):
        raise data.DataError(f"--checkpoint {path}: holds no student (expected best.pt or latest.pt of train.py)")
    config = checkpoint["config"]
    student = build_student(config)
    try:
        load_weights(student, weights, "its student weights")
    except ValueError as error:  # missing or misshapen weights
        raise data.DataError(f"--checkpoint {path}: its student does not match its config ({error}); expected the "
                             f"file as train.py wrote it")
    # In the memory layout the run used: another layout's kernels round differently, and the mIoU printed here
    # is to be the one the run logged.
    return student.to(device, memory_format=memory_format(config)).eval(), config


def memory_format(config):
    """The layout a run keeps its convolutional networks in: channels-last with --channels-last, else NCHW."""
    return torch.channels_last if config.get("channels_last") else torch.contiguous_format


# ----------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a trained IGL-DT student, or segment a folder of images.")
    parser.add_argument("--checkpoint", required=True, help="best.pt or latest.pt written by train.py")
    parser.add_argument("--dataset", default=None, help="the layout of --data-root (default: the checkpoint's)")
    parser.add_argument("--data-root", default=None, help="dataset directory, any copy or another dataset in the "
                        "checkpoint's layout (default: the checkpoint's)")
    parser.add_argument("--split", default="val", help="the split to score: val, test or any other the layout "
                        "holds (ImageSets/Segmentation/NAME.txt, leftImg8bit/NAME, images/NAME; default: val)")
    parser.add_argument("--mode", choices=["full", "sliding"], default=None,
                        help="whole-image or sliding-window inference (default: the checkpoint's)")
    parser.add_argument("--window", type=int, default=None, help="sliding window size (default: the checkpoint's)")
    parser.add_argument("--stride", type=int, default=None, help="sliding stride (default: 2/3 of the window)")
    parser.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], help="multi-scale inference (default: 1.0)")
    parser.add_argument("--save-vis", default=None, help="write image | ground truth | prediction PNGs here; with --images, the predictions "
                        "(default: predictions/)")
    parser.add_argument("--images", default=None, help="segment every image in this folder (no masks needed)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda when there is one")
    parser.add_argument("--workers", type=int, default=2, help="data loading processes (default: 2)")
    return parser.parse_args(argv)


# What each numeric flag must be; checked before the checkpoint or any image is read. The scales are bounded so that
# a slip (0, 100) is an error rather than an image of no pixels or one past the memory; the multi-scale sets in use
# lie well inside.
FLAG_LIMITS = {
    "window": (lambda v: v >= 1, "1 or more"), "stride": (lambda v: v >= 1, "1 or more"),
    "scales": (lambda v: 0.25 <= v <= 4, "scales from 0.25 to 4"), "workers": (lambda v: v >= 0, "0 or more"),
}


def check_flags(args):
    """The numeric flags as FLAG_LIMITS asks (None: the checkpoint's value), and the --images folder; each mistake
    is one line naming the flag and what was expected."""
    for key, (ok, expected) in FLAG_LIMITS.items():
        value = getattr(args, key)
        for each in value if isinstance(value, list) else [value]:
            if each is not None and not (math.isfinite(each) and ok(each)):
                raise data.DataError(f"--{key} {each}: expected {expected}")
    if args.images:
        image_files(args.images, args.save_vis or "predictions")


def check_window(inference):
    """A sliding stride longer than the window would leave pixels that no window covers."""
    if inference["mode"] == "sliding" and inference["stride"] > inference["window"]:
        raise data.DataError(f"--stride {inference['stride']}: expected at most the window, {inference['window']} "
                             f"(a longer stride leaves pixels no window covers)")


def image_files(folder, out_dir):
    """The images in `folder`, sorted; each one's prediction is written to out_dir/<stem>.png. A DataError if the
    folder holds none, if two share a stem (their predictions would overwrite each other), or if out_dir is the
    folder itself (the predictions would overwrite its PNG images)."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
        if Path(folder).is_dir() else []
    if not paths:
        raise data.DataError(f"--images {folder}: expected a folder holding images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    twins = data.same_stem([p.name for p in paths])
    if twins:
        raise data.DataError(f"--images {folder} holds {twins[0]} and {twins[1]}, whose predictions would both be "
                             f"{Path(out_dir) / (Path(twins[0]).stem + '.png')}; expected one image per name "
                             f"(rename one)")
    if Path(out_dir).resolve() == Path(folder).resolve():
        raise data.DataError(f"--save-vis {out_dir} is the --images folder, whose PNG images the predictions would "
                             f"overwrite; expected another folder")
    return paths


def segment_folder(student, config, folder, out_dir, device, **inference):
    """Save a coloured prediction for every image in `folder` (the way to apply a student to new pictures)."""
    paths = image_files(folder, out_dir)
    palette = [tuple(colour) for colour in config["palette"]]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for path in paths:
        image = data.normalize(data.load_image(path))[None].to(device)
        prediction = predict(student, image, config["num_classes"], **inference).argmax(dim=1)[0]
        data.colorize(prediction.cpu(), palette).save(Path(out_dir) / f"{path.stem}.png")
    print(f"wrote {len(paths)} predictions to {out_dir}")


def main(argv=None):
    args = parse_args(argv)
    require_device(args.device)
    check_flags(args)
    if args.save_vis or args.images:
        require_writable_dir(args.save_vis or "predictions", "--save-vis")
    student, config = load_student(args.checkpoint, args.device)
    mode = args.mode or config.get("eval_mode", "full")
    window = config.get("eval_window", 801) if args.window is None else args.window
    inference = dict(mode=mode, window=window, stride=max(1, window * 2 // 3) if args.stride is None else args.stride,
                     flip=args.flip, scales=tuple(args.scales))
    check_window(inference)
    if args.images:
        segment_folder(student, config, args.images, args.save_vis or "predictions", args.device, **inference)
        return
    dataset, classes = args.dataset or config["dataset"], config["num_classes"]
    info = data.DatasetInfo(dataset, classes, config.get("class_names") or [f"class{i}" for i in range(classes)],
                            [tuple(c) for c in config.get("palette") or data.voc_palette(classes)])
    fixed = {"voc": 21, "cityscapes": 19}.get(dataset, classes)
    if fixed != classes:
        raise data.DataError(f"--dataset {dataset} has {fixed} classes, the checkpoint {classes}")
    val_set = data.eval_set(dataset, args.data_root or config.get("data_root"), args.split, info)
    data.check_dataset(val_set)  # every mask once, so a bad one is found before the evaluation, not in it
    # In the precision the run evaluated in (fp16 only on a GPU), so the mIoU printed here is the one it logged.
    amp = config.get("amp") if config.get("amp") == "bf16" or args.device == "cuda" else "off"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    result = evaluate(student, val_set, info.num_classes, args.device, amp_dtype=amp_dtype, num_workers=args.workers,
                      **inference)
    if args.save_vis:
        for i in range(len(val_set)):
            image, mask = val_set[i]
            prediction = predict(student, image[None].to(args.device), info.num_classes, **inference).argmax(1)[0]
            save_panel(Path(args.save_vis) / f"{i:05d}.png",
                       [[denormalize(image), data.colorize(mask, info.palette),
                         data.colorize(prediction.cpu(), info.palette)]])
    width = max(len(name) for name in info.class_names)
    print(f"{'class':<{width}}    IoU")
    for name, iou in zip(info.class_names, result["iou"]):
        print(f"{name:<{width}}  " + ("  n/a" if iou != iou else f"{iou:5.2f}"))
    print(f"mIoU: {result['miou']:.2f}")


if __name__ == "__main__":
    try:
        main()
    except data.DataError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
