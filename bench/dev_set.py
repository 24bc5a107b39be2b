"""A development set for tuning without touching the validation images: some of the split's unlabeled training
images, with the masks that training never reads, become the val split of a second `folder` dataset.

    python bench/dev_set.py --data-root DIR --out /tmp/dev                     # 80 of the 1/8 split's unlabeled
    python bench/quality.py --data-root /tmp/dev --out /tmp/dev_quality --variants supervised igl-dt

The new dataset is made of symbolic links: images/train, masks/train (and images/unlabeled, if there is one)
are the whole training set (so the
labeled split drawn from it, with the same --split and seed, is the one drawn from DIR), images/val and
masks/val are `--count` images of that split's unlabeled part, drawn with `--seed`. A semi-supervised student
sees these images unlabeled while it trains, a supervised one never sees them: the comparison is transductive
and favours semi-supervised training, so use the dev set to compare settings of one method, and the real val
set for the method against the baseline.
"""
import argparse
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import data  # noqa: E402


def make_dev_set(data_root, out, split="1/8", seed=0, count=80):
    """Writes the dev dataset under `out` and returns the relative image paths that became its val split."""
    root = os.path.abspath(data_root)
    train_pairs, extra, _, _ = data.scan_folder(root)
    labeled, unlabeled = data.draw_split(train_pairs, train_pairs + extra,
                                         data.labeled_count("folder", split, len(train_pairs)), seed)
    with_masks = [pair for pair in unlabeled if pair[1] is not None]
    if not 1 <= count <= len(with_masks):
        raise data.DataError(f"--count {count}: expected 1..{len(with_masks)}, the unlabeled images with masks")
    chosen = [with_masks[i] for i in sorted(np.random.default_rng(seed).permutation(len(with_masks))[:count])]
    if os.path.exists(out):
        raise data.DataError(f"--out {out} already exists; expected a new directory")
    for kind in ("images", "masks"):
        for name in ("train", "val"):
            os.makedirs(os.path.join(out, kind, name))
    if extra:  # images/unlabeled: more unlabeled images, no masks
        os.makedirs(os.path.join(out, "images", "unlabeled"))
    links = [(image, image) for image, _ in train_pairs + extra] + [(mask, mask) for _, mask in train_pairs]
    links += [(image, image.replace("/train/", "/val/", 1)) for image, _ in chosen]
    links += [(mask, mask.replace("/train/", "/val/", 1)) for _, mask in chosen]
    for source, target in links:
        os.symlink(os.path.join(root, source), os.path.join(out, target))
    if os.path.isfile(os.path.join(root, "classes.txt")):
        os.symlink(os.path.join(root, "classes.txt"), os.path.join(out, "classes.txt"))
    return [image for image, _ in chosen]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="a dataset in the folder layout")
    p.add_argument("--out", required=True, help="where to write the dev dataset (a new directory)")
    p.add_argument("--split", default="1/8", help="the labeled share whose unlabeled part is used (default: 1/8)")
    p.add_argument("--seed", type=int, default=0, help="the split's seed, and the draw of the dev images")
    p.add_argument("--count", type=int, default=80, help="dev images (default: 80)")
    args = p.parse_args(argv)
    try:
        chosen = make_dev_set(args.data_root, args.out, args.split, args.seed, args.count)
    except data.DataError as error:
        sys.exit(f"error: {error}")
    print(f"{args.out}: {len(chosen)} of the split's unlabeled training images as val")


if __name__ == "__main__":
    main()
