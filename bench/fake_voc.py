"""A stand-in for Pascal VOC 2012: the synthetic scenes written in VOC's layout, at VOC's image size.

    python bench/fake_voc.py --out /tmp/fake_voc [--pool 400] [--val 60]
    python train.py --dataset voc --data-root /tmp/fake_voc --pretrained none --pretrained-swin none \
        --pretrained-res none --teacher-epochs 1 --student-epochs 1 --max-iters 40

To run the VOC recipe end to end where VOC is not (a GPU machine with no internet, say): its loaders, crop,
batch, networks and evaluation, with the throughput and peak memory that train.py logs. The scenes have 5
classes, not VOC's 21, so the mIoU it prints means nothing. Writes JPEGImages/, SegmentationClass/ (the val
masks), SegmentationClassAug/ (the training pool's masks) and ImageSets/Segmentation/{train,val}.txt.
"""
import argparse
import os
import sys
from multiprocessing import Pool

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402

WIDTH, HEIGHT = 500, 375  # the size of most VOC images


def write(job):
    root, split, index, masks = job
    image, mask = data.synthetic_scene(split, index, size=WIDTH)
    name = f"{split}_{index:05d}"
    image.crop((0, 0, WIDTH, HEIGHT)).save(os.path.join(root, "JPEGImages", f"{name}.jpg"), quality=90)
    mask.crop((0, 0, WIDTH, HEIGHT)).save(os.path.join(root, masks, f"{name}.png"))
    return name


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where to write the VOC tree")
    parser.add_argument("--pool", type=int, default=400, help="training images (default: 400)")
    parser.add_argument("--val", type=int, default=60, help="val images (default: 60)")
    args = parser.parse_args()
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", os.path.join("ImageSets", "Segmentation")):
        os.makedirs(os.path.join(args.out, folder), exist_ok=True)
    jobs = [(args.out, "train", i, "SegmentationClassAug") for i in range(args.pool)]
    jobs += [(args.out, "val", i, "SegmentationClass") for i in range(args.val)]
    with Pool() as pool:
        names = pool.map(write, jobs, chunksize=8)
    lists = {"train": names[:args.pool], "val": names[args.pool:]}
    for split, ids in lists.items():
        with open(os.path.join(args.out, "ImageSets", "Segmentation", f"{split}.txt"), "w") as out:
            out.write("".join(f"{i}\n" for i in ids))
    print(f"wrote {args.pool} training and {args.val} val images of {WIDTH}x{HEIGHT} in the VOC layout to {args.out}")


if __name__ == "__main__":
    main()
