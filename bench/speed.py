"""What each part of IGL-DT costs: seconds, images/s, peak memory and achieved TFLOP/s of one training step of each
kind, at one size.

    python bench/speed.py --compare amp                                   # CPU: fp32 against bf16, folder defaults
    python bench/speed.py --dataset voc --device cuda --compare compile   # GPU: eager against compiled, VOC size

The kinds are calls of train.py's Trainer, built as train.py builds it, on random tensors of the shapes its data
loaders yield (B labeled images and masks; B unlabeled weak and strong views, ignore masks and CutMix boxes):
  supervised      student_step with --teachers none: the student on the B labeled images (the baseline)
  teachers        stage 1, teacher_step: Swin-UNet and ResUNet on B labeled + B weak images, CPS, both EMA updates
  igl-dt          stage 2 as train.py runs it: student_step (the EMA teachers read the weak view, the student
                  reads B labeled + B strong images, all five losses), then teacher_step (the teachers co-train)
  igl-dt-frozen   stage 2 with --freeze-teachers: student_step alone
  ema             student_step with --teachers ema: the student's EMA copy reads the weak view (the one-teacher
                  baseline, Mean Teacher with a FixMatch threshold), then the EMA update
overhead = seconds per step of a kind / seconds per supervised step; that of igl-dt is the method's cost.
images_per_s counts every image a step reads (B for supervised, 2B for the others); labeled_images_per_s counts
the B labeled ones, the rate at which an epoch goes by.

FLOPs are those of one step (forward, backward and the teachers' no-grad passes) counted by
torch.utils.flop_counter on the eager path; tflops_per_s = FLOPs / seconds per step, and mfu = tflops_per_s / the
device's dense peak for the step's precision (PEAK_TFLOPS below, or --peak-tflops; none for a CPU unless given).
--compare amp (fp32 against bf16), compile (eager against torch.compile) or channels-last (NCHW against NHWC) times
every kind under both settings in one invocation, one after the other, so that bench/report.py's speed-up of each
kind never mixes two runs taken at different times. On a shared or small machine, minutes apart still swing by
10 % or more: --interleave N also builds both settings of each kind in one process and alternates their steps
(A B, B A, ...), N of each, so that a slow spell falls on both alike, and records each setting's median step
(interleaved_median_s), the speed-up report.py puts first.

--breakdown adds, for each kind, where its time goes (torch.profiler): seconds per step in matrix products
(convolutions, matmuls, attention) and in everything else, and the ten ops that take the most; it tells how much
of a step a faster precision or kernel can speed up.

Each kind runs in a fresh process, so its peak memory is its own: on CUDA, torch.cuda.max_memory_allocated over
the timed steps (weights, optimiser state, activations); on the CPU, the growth of the maximum resident set size
from just before the first step (activations, gradients, optimiser state: the weights are resident before).
The supervised kind holds the student alone (train.py builds no teacher for --teachers none); the others
hold all three networks. Weights are random (--pretrained, --pretrained-swin and --pretrained-res none): speed
does not depend on them, and nothing is downloaded. Prints one record a line (bench/record.py's shape), one per kind
and setting: settings (sizes, precision, compile, layout, iterations), metrics (seconds_per_step, images_per_s,
labeled_images_per_s, peak_mem_mb, gflops_per_step, tflops_per_s, mfu, warmup_s; with --breakdown
matrix_products_s, other_s, matrix_share, top_ops_ms); `> bench/results/speed_<device>[_<tag>].jsonl` keeps them.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # python bench/x.py starts sys.path at bench/: import the repository's modules
import data  # noqa: E402
import train  # noqa: E402
from bench.record import command, record  # noqa: E402

KINDS = ["supervised", "teachers", "igl-dt", "igl-dt-frozen", "ema"]
TEACHERS = {"supervised": "none", "ema": "ema"}  # the others hold both teachers
# Dense (no sparsity) peak TFLOP/s of the tensor cores, by a substring of torch.cuda.get_device_name(), per
# precision; fp32 here means TF32 tensor cores (PyTorch's default for convolutions, not for matmuls).
PEAK_TFLOPS = {"H200": {"bf16": 989, "fp16": 989, "off": 495}, "H100": {"bf16": 989, "fp16": 989, "off": 495},
               "A100": {"bf16": 312, "fp16": 312, "off": 156}, "L40S": {"bf16": 362, "fp16": 362, "off": 183},
               "L4": {"bf16": 121, "fp16": 121, "off": 60}, "A10": {"bf16": 125, "fp16": 125, "off": 62.5}}
# The aten ops that are matrix products (a convolution or matmul, forward or backward); attention is matched by name.
GEMM_OPS = {"convolution_backward", "mkldnn_convolution", "cudnn_convolution", "_convolution", "mm", "addmm", "bmm",
            "baddbmm", "linear", "matmul", "_mkldnn_convolution", "cudnn_convolution_transpose"}
COMPARE = {"amp": ("--amp", ["off", "bf16"]), "compile": ("--compile", [False, True]),
           "channels-last": ("--channels-last", [False, True])}


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
    p.add_argument("--amp", choices=["bf16", "fp16", "off"],
                   help="(default: train.py's, bf16 on a GPU or CPU that computes it natively, else off)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="train.py --compile: the compiled path (default: eager)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="train.py --channels-last (default: train.py's)")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"])
    p.add_argument("--compare", choices=list(COMPARE), help="time every kind under both settings: amp = off "
                   "against bf16, compile = eager against compiled, channels-last = NCHW against NHWC")
    p.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for the step's precision, for MFU "
                   "(default: from PEAK_TFLOPS by the GPU's name; none for a CPU)")
    p.add_argument("--iters", type=int, default=10, help="timed steps (default: 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    p.add_argument("--interleave", type=int, default=0, help="with --compare: also time N steps of each setting "
                   "in one process, alternating, and take the speed-ups from their medians (default: 0, off)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=KINDS, help="(default: all)")
    p.add_argument("--breakdown", action="store_true", help="also profile --iters more steps of each kind and "
                   "record where the time goes: matrix products (convolutions, matmuls, attention) against the rest, "
                   "and the ops that take the most")
    p.add_argument("--kind", choices=KINDS, help="measure this one kind in this process (what each child does)")
    args = p.parse_args(argv)
    if args.interleave and not args.compare:
        p.error("--interleave needs --compare: it alternates the two settings that --compare names")
    if args.interleave < 0:
        p.error(f"--interleave must be 0 or more steps, got {args.interleave}")
    return args


def trainer_config(args, teachers):
    """The config train.py would build from these flags: its parse_args, then the dataset's facts."""
    argv = ["--dataset", args.dataset, "--device", args.device, "--teachers", teachers, "--pretrained", "none",
            "--pretrained-swin", "none", "--pretrained-res", "none"]  # random weights: nothing to download
    for flag, value in [("--crop-size", args.crop), ("--batch-size", args.batch), ("--backbone", args.backbone),
                        ("--swin-dim", args.swin_dim), ("--res-width", args.res_width), ("--amp", args.amp),
                        ("--compile-mode", args.compile_mode)]:
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--compile" if args.compile else "--no-compile"]
    if args.channels_last is not None:
        argv += ["--channels-last" if args.channels_last else "--no-channels-last"]
    if args.swin_depths:
        argv += ["--swin-depths", *map(str, args.swin_depths)]
    cfg = vars(train.parse_args(argv))
    for key in ("resume", "device", "gpus"):
        cfg.pop(key)
    k = args.num_classes
    return cfg | dict(num_classes=k, class_names=[f"class{i}" for i in range(k)],
                      palette=[list(c) for c in data.voc_palette(k)])


def resident_mb():
    """Resident set size of this process now, in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def step_function(trainer, cfg, kind, device):
    """One training step of `kind` on fixed random tensors of the shapes the data loaders yield."""
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
    return step


def step_flops(args, kind):
    """FLOPs of one eager step of `kind` (the compiled path computes the same)."""
    cfg = trainer_config(args, TEACHERS.get(kind, "both")) | {"compile": False}
    step = step_function(train.Trainer(cfg, rank=0, world=1, device=args.device), cfg, kind, args.device)
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def measure(args, kind):
    """Time `args.iters` steps of one kind after `args.warmup` untimed ones; seconds, images/s, peak memory, FLOPs."""
    cfg = trainer_config(args, TEACHERS.get(kind, "both"))
    device, cuda = args.device, args.device == "cuda"
    trainer = train.Trainer(cfg, rank=0, world=1, device=device)
    b = cfg["batch_size"]
    step = step_function(trainer, cfg, kind, device)
    warmup_start = time.perf_counter()
    rss_before = resident_mb()
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup_s = time.perf_counter() - warmup_start  # with --compile, mostly compilation
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.iters
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before  # ru_maxrss is in KiB on Linux
    images = b if kind == "supervised" else 2 * b
    breakdown = time_breakdown(step, args.iters, cuda) if args.breakdown else {}
    del trainer, step  # the FLOP count's eager trainer comes after the memory reading, so it adds nothing to it
    flops = step_flops(args, kind)
    tflops = flops / seconds / 1e12
    peak_tflops = args.peak_tflops or (peak_table(args.device).get(cfg["amp"]) if cuda else None)
    return {"seconds_per_step": round(seconds, 4), "images_per_s": round(images / seconds, 2),
            "labeled_images_per_s": round(b / seconds, 2), "peak_mem_mb": round(peak, 1),
            "gflops_per_step": round(flops / 1e9, 1), "tflops_per_s": round(tflops, 3),
            "mfu": round(tflops / peak_tflops, 4) if peak_tflops else None, "warmup_s": round(warmup_s, 1),
            "amp": cfg["amp"], "compile": cfg["compile"]} | breakdown


def setting_flags(flag, value):
    """The command-line flags that select one --compare setting."""
    return [flag, value] if isinstance(value, str) else [flag if value else "--no-" + flag[2:]]


def interleaved(argv, kind, flag, values, steps):
    """Both settings of one kind built in this process and timed in alternation (A B, B A, ...), `steps` steps
    each after each setting's warm-up: a slow spell of the machine falls on both alike. Returns each setting's
    seconds per step, every step kept."""
    runs = []
    for value in values:
        args = parse_args([*argv, *setting_flags(flag, value)])
        cfg = trainer_config(args, TEACHERS.get(kind, "both"))
        step = step_function(train.Trainer(cfg, rank=0, world=1, device=args.device), cfg, kind, args.device)
        for _ in range(args.warmup):
            step()
        runs.append(step)
    cuda = args.device == "cuda"
    seconds = [[] for _ in values]
    for i in range(steps):
        for j in (range(len(values)) if i % 2 == 0 else reversed(range(len(values)))):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            runs[j]()
            if cuda:
                torch.cuda.synchronize()
            seconds[j].append(time.perf_counter() - start)
    return seconds


def time_breakdown(step, iters, cuda):
    """Where a step's time goes, from torch.profiler over `iters` steps: seconds per step in matrix products
    (GEMM_OPS: what bf16 speeds up about twice on a CPU with native bf16) and in everything else (normalisation,
    activations, copies and casts, pooling, resampling, losses, optimiser and EMA updates: bound by memory and
    launches), and the ten ops of most time. On CUDA the times are the kernels' own (device time)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            step()
        if cuda:
            torch.cuda.synchronize()
    own = lambda e: (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e6 / iters  # s per step
    ops = sorted(((e.key, own(e)) for e in prof.key_averages() if e.key.startswith("aten::")), key=lambda o: -o[1])
    gemm = sum(t for name, t in ops if name.split("::")[1] in GEMM_OPS or "scaled_dot_product" in name)
    other = sum(t for _, t in ops) - gemm
    return {"breakdown": {"matrix_products_s": round(gemm, 4), "other_s": round(other, 4),
                          "matrix_share": round(gemm / (gemm + other), 3) if gemm + other else None,
                          "top_ops_ms": {name: round(1e3 * t, 1) for name, t in ops[:10]}}}


def peak_table(device):
    name = torch.cuda.get_device_name() if device == "cuda" else ""
    return next((peaks for key, peaks in PEAK_TFLOPS.items() if key in name), {})


def run_kind(argv, kind, extra=()):
    """One kind in a fresh process (so its peak memory is its own); its result."""
    child = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, *extra, "--kind", kind],
                           capture_output=True, text=True)
    if child.returncode != 0:
        sys.exit(f"error: {kind} failed:\n{child.stderr}")
    return json.loads(child.stdout.splitlines()[-1])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.kind:  # a child: one kind, one JSON line
        print(json.dumps(measure(args, args.kind)))
        return
    cfg = trainer_config(args, "both")
    settings = {key: cfg[key] for key in ("dataset", "crop_size", "batch_size", "num_classes", "backbone",
                                          "output_stride", "swin_dim", "swin_depths", "res_width", "channels_last")}
    settings |= {"device": args.device, "iters": args.iters, "warmup": args.warmup}
    flag, values = COMPARE[args.compare] if args.compare else (None, [None])
    key = flag and flag[2:].replace("-", "_")
    results = {}  # (kind, setting value): measurement; both settings of a kind one after the other
    for kind in args.kinds:
        for value in values:
            results[kind, value] = run_kind(argv, kind, setting_flags(flag, value) if flag else [])
            print(f"{kind} {value if flag else ''}: {results[kind, value]}", file=sys.stderr)
        if args.interleave:  # the same kind, both settings alternating in this process: each one's median step
            argv_one = [a for a in argv if a != "--breakdown"]
            seconds = interleaved(argv_one, kind, flag, values, args.interleave)
            for value, steps in zip(values, seconds):
                results[kind, value]["interleaved_median_s"] = round(statistics.median(steps), 4)
    for (kind, value), m in results.items():
        these = settings | {"amp": m.pop("amp"), "compile": m.pop("compile")} | ({key: value} if flag else {})
        these |= {"interleave": args.interleave} if args.interleave else {}
        breakdown = m.pop("breakdown", {})  # --breakdown's split, flat beside the timings
        print(json.dumps(record("speed", kind, None, these, m | breakdown, command(), args.device)))


if __name__ == "__main__":
    main()
