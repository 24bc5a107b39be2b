"""What each part of IGL-DT costs: seconds, images/s and peak memory of one training step of each kind, at one size.

    python bench/speed.py                                                # the README's CPU figures (folder defaults)
    python bench/speed.py --dataset voc --device cuda --amp bf16 --iters 50   # on a GPU, at the paper's VOC size

The kinds are calls of train.py's Trainer, built as train.py builds it, on random tensors of the shapes its data
loaders yield (B labeled images and masks; B unlabeled weak and strong views, ignore masks and CutMix boxes):
  supervised      student_step with --teachers none: the student on the B labeled images (the baseline)
  teachers        stage 1, teacher_step: Swin-UNet and ResUNet on B labeled + B weak images, CPS, both EMA updates
  igl-dt          stage 2 as train.py runs it: student_step (the EMA teachers read the weak view, the student
                  reads B labeled + B strong images, all five losses), then teacher_step (the teachers co-train)
  igl-dt-frozen   stage 2 with --freeze-teachers: student_step alone
overhead = seconds per step of a kind / seconds per supervised step; that of igl-dt is the method's cost.
images_per_s counts every image a step reads (B for supervised, 2B for the others); labeled_images_per_s counts
the B labeled ones, the rate at which an epoch goes by.

Each kind runs in a fresh process, so its peak memory is its own: on CUDA, torch.cuda.max_memory_allocated over
the timed steps (weights, optimiser state, activations); on the CPU, the growth of the maximum resident set size
from just before the first step (activations, gradients, optimiser state: the weights are resident before).
The supervised kind holds the student alone (train.py builds no teacher for --teachers none); the others
hold all three networks. Weights are random (--pretrained, --pretrained-swin and --pretrained-res none): speed
does not depend on them, and nothing is downloaded. Prints one JSON object.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the repository's data.py and models.py, not the ones in bench/
import data  # noqa: E402
import train  # noqa: E402

KINDS = ["supervised", "teachers", "igl-dt", "igl-dt-frozen"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    default = " (default: the --dataset's, see DATASET_DEFAULTS in train.py)"
    p.add_argument("--dataset", default="folder", choices=list(train.DATASET_DEFAULTS),
                   help="whose defaults give the sizes below (default: folder)")
    p.add_argument("--crop", type=int, help="crop size C" + default)
    p.add_argument("--batch", type=int, help="labeled images per step B, and as many unlabeled" + default)
    p.add_argument("--backbone", choices=["resnet18", "resnet34", "resnet50", "resnet101"], help="student" + default)
    p.add_argument("--swin-dim", type=int, help="Swin-UNet embedding width" + default)
    p.add_argument("--swin-depths", type=int, nargs=4, help="blocks per Swin stage" + default)
    p.add_argument("--res-width", type=int, help="ResUNet first-stage width" + default)
    p.add_argument("--num-classes", type=int, default=11, help="(default: 11, as CamVid)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], help="(default: bf16 on a GPU that has it, else off)")
    p.add_argument("--iters", type=int, default=10, help="timed steps (default: 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=KINDS, help="(default: all four)")
    p.add_argument("--kind", choices=KINDS, help="measure this one kind in this process (what each child does)")
    return p.parse_args(argv)


def trainer_config(args, teachers):
    """The config train.py would build from these flags: its parse_args, then the dataset's facts."""
    argv = ["--dataset", args.dataset, "--device", args.device, "--teachers", teachers, "--pretrained", "none",
            "--pretrained-swin", "none", "--pretrained-res", "none"]  # random weights: nothing to download
    for flag, value in [("--crop-size", args.crop), ("--batch-size", args.batch), ("--backbone", args.backbone),
                        ("--swin-dim", args.swin_dim), ("--res-width", args.res_width), ("--amp", args.amp)]:
        if value is not None:
            argv += [flag, str(value)]
    if args.swin_depths:
        argv += ["--swin-depths", *map(str, args.swin_depths)]
    cfg = vars(train.parse_args(argv))
    for key in ("resume", "device", "gpus"):
        cfg.pop(key)
    k = args.num_classes
    # train.py sets cps_rampup_iters from the epoch length; the cost of a step does not depend on it.
    return cfg | dict(num_classes=k, class_names=[f"class{i}" for i in range(k)],
                      palette=[list(c) for c in data.voc_palette(k)], cps_rampup_iters=0)


def resident_mb():
    """Resident set size of this process now, in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def measure(args, kind):
    """Time `args.iters` steps of one kind after `args.warmup` untimed ones; seconds, images/s, peak memory."""
    cfg = trainer_config(args, "none" if kind == "supervised" else "both")
    device, cuda = args.device, args.device == "cuda"
    trainer = train.Trainer(cfg, rank=0, world=1, device=device)
    b, c, k = cfg["batch_size"], cfg["crop_size"], cfg["num_classes"]
    image, weak, strong = (torch.randn(b, 3, c, c, device=device) for _ in range(3))  # like normalised pixels
    label = torch.randint(0, k, (b, c, c), device=device)
    ignore = torch.zeros(b, c, c, dtype=torch.bool, device=device)
    box = torch.zeros_like(ignore)
    box[:, c // 4:3 * c // 4, c // 4:3 * c // 4] = True  # CutMix pastes the centre quarter

    def step():
        if kind != "teachers":
            trainer.student_step(image, label, weak, strong, ignore, box)
        if kind in ("teachers", "igl-dt"):
            trainer.teacher_step(image, label, weak, ignore)

    rss_before = resident_mb()
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.iters
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before  # ru_maxrss is in KiB on Linux
    images = b if kind == "supervised" else 2 * b
    return {"seconds_per_step": round(seconds, 4), "images_per_s": round(images / seconds, 2),
            "labeled_images_per_s": round(b / seconds, 2), "peak_mem_mb": round(peak, 1)}


def machine(device):
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.processor())
    return {"device": name, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_average": round(os.getloadavg()[0], 2)}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.kind:  # a child: one kind, one JSON line
        print(json.dumps(measure(args, args.kind)))
        return
    cfg = trainer_config(args, "both")
    results = {}
    for kind in args.kinds:
        child = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--kind", kind],
                               capture_output=True, text=True)
        if child.returncode != 0:
            sys.exit(f"error: {kind} failed:\n{child.stderr}")
        results[kind] = json.loads(child.stdout.splitlines()[-1])
        print(f"{kind}: {results[kind]}", file=sys.stderr)
    settings = {key: cfg[key] for key in ("dataset", "crop_size", "batch_size", "num_classes", "backbone",
                                          "output_stride", "swin_dim", "swin_depths", "res_width", "amp")}
    report = {"settings": settings | {"device": args.device, "iters": args.iters, "warmup": args.warmup},
              "machine": machine(args.device), "kinds": results}
    if "supervised" in results:
        base = results["supervised"]["seconds_per_step"]
        report["overhead_vs_supervised"] = {kind: round(r["seconds_per_step"] / base, 2)
                                            for kind, r in results.items() if kind != "supervised"}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
