"""Samples/s of the unlabeled pipeline (decode, weak view, strong view, ignore mask, CutMix box) on the CPU.

    python bench/data_speed.py --data-root DIR [--crop 321] [--batch 8] [--samples 256] [--workers 0 2] [--threads N]

DIR holds a dataset in the folder layout (images/train, masks/train, images/val, masks/val). The clock starts
after the first batch, so worker start-up is left out. With 0 workers the main process also collates the
batches, with torch's thread pool (--threads; DataLoader workers use 1 thread each); on a CPU that other
processes keep busy that pool waits for cores, so each record keeps the load average. Prints one record a line
(bench/record.py's shape), one per --workers value: `> bench/results/data_speed_cpu.jsonl` keeps them.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from bench.record import command, record  # noqa: E402


def samples_per_second(dataset, batch, samples, workers):
    indices = [i % len(dataset) for i in range(samples + batch)]  # one warm-up batch, then `samples`
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch,
                                         num_workers=workers)
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    count = sum(len(weak) for weak, _, _, _ in batches)
    return count / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="a dataset in the folder layout")
    parser.add_argument("--crop", type=int, default=321, help="(default: 321)")
    parser.add_argument("--batch", type=int, default=8, help="(default: 8)")
    parser.add_argument("--samples", type=int, default=256, help="samples timed (default: 256)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers, each timed "
                        "(default: 0 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the main process (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory() as splits_dir:  # leave no split lists behind
            _, unlabeled, _, _ = data.build_datasets("folder", args.data_root, "1/8", splits_dir, crop_size=args.crop)
    except data.DataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    width, height = data.load_image(unlabeled.files[0][0]).size
    settings = {"crop": args.crop, "batch": args.batch, "samples": args.samples, "image_size": f"{width}x{height}"}
    for workers in args.workers:
        rate = round(samples_per_second(unlabeled, args.batch, args.samples, workers), 1)
        print(json.dumps(record("data_speed", "unlabeled (weak + strong)", None, settings | {"workers": workers},
                                {"samples_per_s": rate}, command())), flush=True)


if __name__ == "__main__":
    main()
