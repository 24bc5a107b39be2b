"""How good is what the teachers teach? Measures, on the images a run used as *unlabeled*, the targets the
student receives from its EMA teachers, against those images' ground truth (a `folder` dataset has masks for
every training image; the run never saw them). This is a diagnosis, not part of training.

    python bench/pseudo_labels.py --run bench/results/quality_cpu_camvid/runs/igl-dt_s0  # the run's latest.pt
    python bench/pseudo_labels.py --run RUN --limit 60 --thresholds 0 0.5 0.7 0.9

For the two teachers G (Swin-UNet) and L (ResUNet) on the weak view (here: the whole image, no augmentation):
  miou_swin, miou_res, miou_student   each network's mIoU on these images
  agree                               share of valid pixels where argmax G == argmax L, and its accuracy
  pl@t                                the pseudo-label loss's pixels (agreed and mean confidence >= t): their
                                      share of valid pixels and their accuracy, for each --thresholds t
  disputed                            share of pixels where G and L disagree; accuracy there of G, of L, and of
                                      the discrepancy loss's choice (the surer teacher), and its mean weight
  miou_targets                        mIoU of the combined target (agreed -> mean argmax, disputed -> surer)
  pixel_accuracy_*                    the same four, as the share of valid pixels labeled right
Prints one record (bench/record.py's shape): the run as its variant, these figures as its metrics, each share and
accuracy flat (agree_share, pl@0.9_accuracy, disputed_accuracy_swin, ...).
"""
import argparse
import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import data  # noqa: E402
import train  # noqa: E402
from data import one_line  # noqa: E402
from evaluate import confusion_matrix, iou_per_class  # noqa: E402
from losses import dual_teacher_targets  # noqa: E402
from bench.record import command, record  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a train.py run directory holding latest.pt (both teachers)")
    p.add_argument("--data-root", help="the dataset root (default: the run's)")
    p.add_argument("--limit", type=int, default=0, help="use the first N unlabeled images (0 = all)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.9, 0.95])
    return p.parse_args(argv)


def count_pixels(probs_g, probs_l, mask, thresholds):
    """Pixel counts for one batch: teacher probabilities (B, K, H, W), ground truth (B, H, W) with 255 = ignore.
    The targets are `losses.dual_teacher_targets`' own, so this measures exactly what the student is taught.
    Returns the counts, the combined target (agreed -> argmax of the mean, disputed -> the surer teacher's)
    and each teacher's argmax."""
    ignore = mask == data.IGNORE_INDEX
    label_g, label_l = probs_g.argmax(dim=1), probs_l.argmax(dim=1)
    agreed, disputed, weight = dual_teacher_targets(probs_g, probs_l, ignore, threshold=0.0)
    is_agreed, is_disputed = agreed != data.IGNORE_INDEX, disputed != data.IGNORE_INDEX
    counts = {"valid": (~ignore).sum(), "agree": is_agreed.sum(), "agree_right": (is_agreed & (agreed == mask)).sum(),
              "disputed": is_disputed.sum(), "disputed_swin_right": (is_disputed & (label_g == mask)).sum(),
              "disputed_res_right": (is_disputed & (label_l == mask)).sum(),
              "disputed_choice_right": (is_disputed & (disputed == mask)).sum(), "disputed_weight": weight.sum()}
    for t in thresholds:
        kept, _, _ = dual_teacher_targets(probs_g, probs_l, ignore, threshold=t)
        is_kept = kept != data.IGNORE_INDEX
        counts[f"pl@{t}"] = is_kept.sum()
        counts[f"pl@{t}_right"] = (is_kept & (kept == mask)).sum()
    return counts, torch.where(is_agreed, agreed, disputed), label_g, label_l


@torch.no_grad()
def diagnose(trainer, files, num_classes, thresholds):
    """Summed pixel counts and confusion matrices over `files` (image path, mask path), one image at a time."""
    cms = {name: torch.zeros(num_classes, num_classes, dtype=torch.long)
           for name in ("swin", "res", "student", "targets")}
    stats = {}
    for image_path, mask_path in files:
        image, mask = data.load_pair(image_path, mask_path, num_classes)
        image, mask = data.normalize(image)[None], data.mask_to_tensor(mask)[None]
        probs_g = trainer.swin_ema(image).float().softmax(dim=1)
        probs_l = trainer.res_ema(image).float().softmax(dim=1)
        counts, target, label_g, label_l = count_pixels(probs_g, probs_l, mask, thresholds)
        stats = {key: stats.get(key, 0) + value for key, value in counts.items()}
        student = trainer.student(image).argmax(dim=1)
        for name, pred in (("swin", label_g), ("res", label_l), ("student", student), ("targets", target)):
            cms[name] += confusion_matrix(pred, mask, num_classes)
    return stats, cms


def main(argv=None):
    args = parse_args(argv)
    latest = os.path.join(args.run, "latest.pt")
    if not os.path.isfile(latest):
        raise data.DataError(f"--run {args.run}: no latest.pt there (expected a train.py run directory)")
    checkpoint = torch.load(latest, map_location="cpu", weights_only=True)
    cfg = checkpoint["config"]
    if cfg["teachers"] != "both":
        raise data.DataError(f"--run {args.run} trained with --teachers {cfg['teachers']}; expected both")
    root = args.data_root or cfg["data_root"]
    listing = os.path.join(data.split_directory(cfg["splits_dir"], cfg["dataset"], cfg["data_root"], cfg["split"]),
                           "unlabeled.txt")
    pairs = [(image, mask) for image, mask in data.read_split_file(listing, False) if mask]
    if not pairs:
        raise data.DataError(f"{listing} names no masks for its unlabeled images; nothing to measure against")
    files = [(os.path.join(root, image), os.path.join(root, mask)) for image, mask in pairs]
    files = files[:args.limit] if args.limit else files
    # The checkpoint holds every weight: build the networks without fetching pretrained ones.
    trainer = train.Trainer(cfg | {"pretrained": "none", "pretrained_swin": "none", "pretrained_res": "none"},
                            0, 1, "cpu")
    trainer.load_state_dict(checkpoint["trainer"])
    for model in (trainer.student, trainer.swin_ema, trainer.res_ema):
        model.eval()
    stats, cms = diagnose(trainer, files, cfg["num_classes"], args.thresholds)
    valid = float(stats["valid"])
    share = lambda n: round(100 * float(n) / max(valid, 1), 2)
    accuracy = lambda right, n: round(100 * float(right) / max(float(n), 1), 2)
    result = {f"miou_{name}": round(iou_per_class(cm)[1], 2) for name, cm in cms.items()}
    result |= {f"pixel_accuracy_{name}": accuracy(cm.trace(), cm.sum()) for name, cm in cms.items()}
    result |= {"agree_share": share(stats["agree"]), "agree_accuracy": accuracy(stats["agree_right"], stats["agree"])}
    for t in args.thresholds:
        result |= {f"pl@{t}_share": share(stats[f"pl@{t}"]),
                   f"pl@{t}_accuracy": accuracy(stats[f"pl@{t}_right"], stats[f"pl@{t}"])}
    n = stats["disputed"]
    result |= {"disputed_share": share(n), "disputed_accuracy_swin": accuracy(stats["disputed_swin_right"], n),
               "disputed_accuracy_res": accuracy(stats["disputed_res_right"], n),
               "disputed_accuracy_choice": accuracy(stats["disputed_choice_right"], n),
               "disputed_mean_weight": round(float(stats["disputed_weight"]) / max(float(n), 1), 3)}
    settings = {"run": args.run, "epoch": checkpoint["epoch"], "images": len(files), "thresholds": args.thresholds}
    print(json.dumps(record("pseudo_labels", os.path.basename(os.path.normpath(args.run)), cfg["seed"], settings,
                            result, command())))


if __name__ == "__main__":
    try:
        main()
    except data.DataError as error:
        sys.exit(f"error: {one_line(error)}")
