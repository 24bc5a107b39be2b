"""Cost of the three networks at their default widths: parameters, forward GFLOPs per image, training throughput
(forward + backward images/s) and peak memory. Prints one JSON object.

    python bench/model_speed.py                                          # CPU, fp32, crop 321, batch 2
    python bench/model_speed.py --device cuda --amp bf16 --iters 20      # on a GPU

Each network is measured in a fresh process, so its peak memory is its own: on CUDA the peak of
torch.cuda.max_memory_allocated over the timed steps; on the CPU the growth of the process's maximum resident set
size (resource.getrusage ru_maxrss) from just before the first training step to the end (activations, gradients
and allocator caches; the weights are already resident before).
"""
import argparse
import json
import multiprocessing
import os
import platform
import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import build_model  # noqa: E402
from bench.record import command, commit  # noqa: E402


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
    parser.add_argument("--crop", type=int, default=321)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--amp", choices=["off", "bf16"], default="off")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=21)  # Pascal VOC
    parser.add_argument("--models", default="swinunet,resunet,deeplabv3plus")
    args = vars(parser.parse_args())

    results = {}
    context = multiprocessing.get_context("spawn")  # a fresh process per network: its own peak memory
    for name in args["models"].split(","):
        with context.Pool(1) as pool:
            results[name] = pool.apply(measure, (name, args))
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args["device"] == "cuda" else "cpu",
    }
    notes = {
        "gflops_per_image": "forward pass, torch.utils.flop_counter (2 FLOPs per multiply-add), eval mode",
        "images_per_s": "forward + cross-entropy + backward, train mode",
        "peak_mem_mb": ("torch.cuda.max_memory_allocated" if args["device"] == "cuda" else
                        "growth of max RSS (resource.getrusage) over the training steps, fresh process per network"),
        "default widths": "swinunet: Swin-T (96, depths 2-2-6-2); resunet: ResNet-34; deeplabv3plus: ResNet-50, OS16",
    }
    print(json.dumps({"settings": args, "machine": machine, "notes": notes, "results": results,
                      "command": command(), "commit": commit()}, indent=2))


if __name__ == "__main__":
    main()
