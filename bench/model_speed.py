"""Cost of the three networks at their default widths (swinunet: Swin-T, 96 wide, depths 2-2-6-2; resunet:
ResNet-34; deeplabv3plus: ResNet-50, output stride 16): parameters, forward GFLOPs per image, training throughput
and peak memory. Prints one record a line (bench/record.py's shape), one per network.

    python bench/model_speed.py > bench/results/model_speed_cpu.jsonl              # CPU, fp32, crop 321, batch 2
    python bench/model_speed.py --device cuda --amp bf16 --iters 20                 # on a GPU

gflops_per_image counts one forward pass in eval mode (torch.utils.flop_counter, 2 FLOPs per multiply-add);
images_per_s is forward + cross-entropy + backward in train mode. Each network is measured in a fresh process, so
its peak memory is its own: on CUDA the peak of torch.cuda.max_memory_allocated over the timed steps; on the CPU
the growth of the process's maximum resident set size (resource.getrusage ru_maxrss) from just before the first
training step to the end (activations, gradients and allocator caches; the weights are already resident before).
"""
import argparse
import json
import multiprocessing
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import build_model  # noqa: E402
from bench.record import command, record  # noqa: E402


def resident_mb() -> float:
    """Current resident set size of this process in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(name: str, args: dict) -> dict:
    """Build one network and time ``iters`` training steps on random images after ``warmup`` untimed ones."""
    torch.manual_seed(0)
    device = torch.device(args["device"])
    model = build_model(name, args["num_classes"]).to(device).train()
    images = torch.randn(args["batch"], 3, args["crop"], args["crop"], device=device)
    labels = torch.randint(0, args["num_classes"], (args["batch"], args["crop"], args["crop"]), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args["amp"] == "bf16")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def train_step():
        with amp:
            logits = model(images)
        F.cross_entropy(logits.float(), labels).backward()
        model.zero_grad(set_to_none=True)

    rss_before = resident_mb()
    for _ in range(args["warmup"]):
        train_step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for _ in range(args["iters"]):
        train_step()
    sync()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before  # ru_maxrss is in KiB

    with torch.no_grad(), amp, FlopCounterMode(display=False) as counter:  # one forward of the batch
        model.eval()(images)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "gflops_per_image": round(counter.get_total_flops() / args["batch"] / 1e9, 2),
        "images_per_s": round(args["iters"] * args["batch"] / seconds, 3),
        "peak_mem_mb": round(peak_mb, 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crop", type=int, default=321, help="square input size (default: 321, VOC's crop)")
    parser.add_argument("--batch", type=int, default=2, help="images per step (default: 2)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="(default: cpu)")
    parser.add_argument("--amp", choices=["off", "bf16"], default="off", help="(default: off, fp32)")
    parser.add_argument("--iters", type=int, default=3, help="timed training steps (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    parser.add_argument("--num-classes", type=int, default=21, help="(default: 21, Pascal VOC)")
    parser.add_argument("--models", default="swinunet,resunet,deeplabv3plus",
                        help="comma-separated (default: swinunet,resunet,deeplabv3plus)")
    args = vars(parser.parse_args())

    context = multiprocessing.get_context("spawn")  # a fresh process per network: its own peak memory
    for name in args["models"].split(","):
        with context.Pool(1) as pool:
            metrics = pool.apply(measure, (name, args))
        print(json.dumps(record("model_speed", name, None, args, metrics, command(), args["device"])), flush=True)


if __name__ == "__main__":
    main()
