"""Does IGL-DT beat supervised training on real data, and what does each part add? Trains each variant below on
a `folder` dataset with the same budget and reports the student's val mIoU.

    python bench/quality.py --data-root DIR --seeds 0 1 2                       # the README's figures
    python bench/quality.py --data-root DIR --variants supervised igl-dt -- --student-epochs 4 --workers 0

Variants, as train.py flags. Everything else is train.py's `folder` defaults (DATASET_DEFAULTS["folder"]: a
ResNet-18 student and both teachers from scratch, at small widths and crops sized for a 2-core CPU; summary.md
lists the values used), changed for every variant alike by the train.py flags given after `--`:
  supervised   --teachers none     the student on the labeled images alone, the same student epochs
  igl-dt                           the full method
  no-gcl       --lambda-glo 0      without global context learning
  no-lrl       --lambda-loc 0      without local regional learning
  no-dl        --lambda-dis 0      without discrepancy learning
  swin-only    --teachers swin     the Swin-UNet teacher alone, in both roles (no CPS)
  res-only     --teachers res      the ResUNet teacher alone, in both roles (no CPS)

Every run shares one labeled split, drawn once with seed 0 into OUT/splits; a seed changes the initial weights
and the sample order. A run is `python train.py ...` in a child process, writing OUT/runs/<variant>_s<seed>/.
no-gcl, no-lrl and no-dl train the same teachers as igl-dt (they change only the student's losses), so once
igl-dt's run of their seed is recorded they start from its teachers (train.py --teachers-from), which gives
exactly the run a start from scratch would, without its stage 1; their wall time then leaves stage 1 out
(`teachers_from` in the record), while train_s still counts it, from the stage-1 log they take over.
The headline is the last epoch's student mIoU (miou_last); the best over the epochs (miou_best, train.py's
best.pt) is chosen on the val set itself, so it is recorded beside it, not instead. Per-class IoU is that of
the last student (latest.pt).

Writes OUT/records.jsonl (one JSON record per run: variant, seed, miou_last, miou_best, iou_per_class, wall_s,
train_s, images_per_s, config, command) and OUT/summary.md (mean over seeds per variant, and the change from
supervised), and prints the summary as JSON. A run whose record exists is skipped (--force runs it again); a
run stopped part-way is resumed from its latest.pt: the same command continues an interrupted benchmark.
"""
import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the repository's data.py and evaluate.py, not the ones in bench/
import data  # noqa: E402
import evaluate  # noqa: E402

VARIANTS = {"supervised": ["--teachers", "none"], "igl-dt": [], "no-gcl": ["--lambda-glo", "0"],
            "no-lrl": ["--lambda-loc", "0"], "no-dl": ["--lambda-dis", "0"], "swin-only": ["--teachers", "swin"],
            "res-only": ["--teachers", "res"]}
SET_HERE = {"--dataset", "--data-root", "--split", "--splits-dir", "--out", "--seed", "--teachers", "--resume",
            "--teachers-from"}
SAME_TEACHERS_AS_IGL_DT = {"no-gcl", "no-lrl", "no-dl"}


def parse_args(argv):
    """This script's flags, and the train.py flags after `--`."""
    own, train_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s --data-root DIR [options] [-- TRAIN.PY FLAGS]", allow_abbrev=False)
    p.add_argument("--data-root", required=True, help="a dataset in the folder layout (see data.py)")
    p.add_argument("--split", default="1/8", help="labeled share or count (default: 1/8)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="(default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="(default: 0)")
    p.add_argument("--out", default="bench/results/quality", help="(default: bench/results/quality)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="(default: train.py's, cuda when there is one)")
    p.add_argument("--force", action="store_true", help="run again the runs that already have a record")
    args = p.parse_args(own)
    args.variants = sorted(set(args.variants), key=list(VARIANTS).index)  # igl-dt before the runs sharing its teachers
    clash = SET_HERE & {flag.split("=")[0] for flag in train_flags}
    if clash:
        p.error(f"{', '.join(sorted(clash))} after --: set by this script (use its own flags)")
    args.train_flags = train_flags
    return args


def train_args(args, variant, seed, teachers_from=None):
    """train.py's arguments for one run: the shared settings, the flags after --, then the variant's own."""
    device = ["--device", args.device] if args.device else []
    adopt = ["--teachers-from", teachers_from] if teachers_from else []
    return ["--dataset", "folder", "--data-root", args.data_root, "--split", args.split,
            "--splits-dir", f"{args.out}/splits", "--out", f"{args.out}/runs/{variant}_s{seed}", "--seed", str(seed),
            *device, *args.train_flags, *VARIANTS[variant], *adopt]


def run_training(arguments, run_dir):
    """python train.py in a child process, resuming a run stopped part-way. Returns (wall seconds, resumed)."""
    resume = (run_dir / "latest.pt").is_file()
    start = time.time()
    child = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *arguments,
                              *(["--resume"] if resume else [])])
    try:
        code = child.wait()
    except KeyboardInterrupt:  # the child got the same Ctrl-C: let it save its latest.pt before stopping
        code = child.wait()
    if code != 0:
        sys.exit(f"error: train.py exited with {code} in {run_dir}; the same command resumes it")
    return time.time() - start, resume


def read_run(run_dir, device):
    """The run's figures: mIoU from its log.jsonl, per-class IoU of its last student (latest.pt) evaluated here."""
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    student = [r for r in log if "miou_student" in r]
    checkpoint = torch.load(run_dir / "latest.pt", map_location="cpu", weights_only=True)
    cfg = checkpoint["config"]
    model = evaluate.build_student(cfg)
    model.load_state_dict(checkpoint["trainer"]["student"])
    _, _, val_set, info = data.build_datasets(cfg["dataset"], cfg["data_root"], cfg["split"], cfg["splits_dir"],
                                              cfg["crop_size"], cfg["seed"])
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[cfg["amp"]]
    result = evaluate.evaluate(model.to(device), val_set, info.num_classes, device, mode=cfg["eval_mode"],
                               window=cfg["eval_window"], stride=max(1, cfg["eval_window"] * 2 // 3),
                               amp_dtype=amp_dtype)
    if abs(result["miou"] - student[-1]["miou_student"]) > 0.01:
        print(f"warning: {run_dir}: latest.pt gives mIoU {result['miou']:.2f}, its log "
              f"{student[-1]['miou_student']:.2f}", file=sys.stderr)
    seconds = {stage: sum(r["seconds"] for r in log if r["stage"] == stage) for stage in ("teachers", "student")}
    images = {stage: sum(r["seconds"] * r["images_per_s"] for r in log if r["stage"] == stage)
              for stage in ("teachers", "student")}
    rate = lambda n, s: round(n / s, 2) if s else None
    return {"miou_last": round(student[-1]["miou_student"], 2),
            "miou_best": round(max(r["miou_student"] for r in student), 2),
            "miou_teachers_last": {name: round(log[-1][f"miou_{name}"], 2) for name in ("swin", "res")
                                   if f"miou_{name}" in log[-1]},
            "iou_per_class": {name: None if math.isnan(iou) else round(iou, 2)  # NaN: class absent from val
                              for name, iou in zip(info.class_names, result["iou"])},
            "train_s": round(sum(seconds.values()), 1),  # the epochs alone, without evaluation and start-up
            "images_per_s": {stage: rate(images[stage], seconds[stage]) for stage in seconds}
            | {"all": rate(sum(images.values()), sum(seconds.values()))},
            "config": cfg}


def summarize(records):
    """Per variant, in VARIANTS order: last mIoU per seed, their mean and spread, the change from supervised."""
    rows = []
    for variant in VARIANTS:
        runs = sorted((r for r in records if r["variant"] == variant), key=lambda r: r["seed"])
        if not runs:
            continue
        last = [r["miou_last"] for r in runs]
        rows.append({"variant": variant, "seeds": [r["seed"] for r in runs], "miou_last": last,
                     "miou_last_mean": round(statistics.mean(last), 2),
                     "miou_last_std": round(statistics.stdev(last), 2) if len(last) > 1 else None,
                     "miou_best_mean": round(statistics.mean(r["miou_best"] for r in runs), 2),
                     "wall_min_mean": round(statistics.mean(r["wall_s"] for r in runs) / 60, 1),
                     "images_per_s_mean": round(statistics.mean(r["images_per_s"]["all"] for r in runs), 2),
                     "teachers_shared": any(r.get("teachers_from") for r in runs)})
    base = next((row["miou_last_mean"] for row in rows if row["variant"] == "supervised"), None)
    for row in rows:
        row["delta_vs_supervised"] = None if base is None else round(row["miou_last_mean"] - base, 2)
    return rows


def own_keys(variant):
    """The config keys a variant sets itself (and those that differ for every run)."""
    return {flag[2:].replace("-", "_") for flag in VARIANTS[variant][::2]} | {"out", "seed", "teachers_from"}


def markdown(rows, records):
    reference = next((r for r in records if r["variant"] == "igl-dt"), records[0])
    cfg = reference["config"]
    keys = ["split", "backbone", "pretrained", "crop_size", "batch_size", "teacher_epochs", "student_epochs",
            "freeze_teachers", "lr", "swin_lr", "swin_dim", "swin_depths", "res_width", "threshold", "region",
            "ema_momentum", "lambda_dis", "lambda_glo", "lambda_loc", "lambda_cps", "amp", "max_iters"]
    lines = [f"# IGL-DT against supervised training on {cfg['data_root']}", "",
             "Configuration (the same for every variant but its own flag; each run's full config is in "
             "records.jsonl): " + ", ".join(f"{key} {cfg.get(key)}" for key in keys) + ".", "",
             "mIoU (%) of the student after its last epoch on the val set; best: the best epoch, chosen on val.", ""]
    differ = sorted({key for r in records for key, value in r["config"].items()
                     if key not in own_keys(r["variant"]) | own_keys(reference["variant"]) and value != cfg.get(key)})
    if differ:  # runs made by different commands into one --out
        lines += [f"**Not one budget**: the runs differ in {', '.join(differ)}.", ""]
    lines += ["| variant | seeds | mIoU per seed | mIoU mean ± sd | vs supervised | best mIoU | wall min | images/s |",
              "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        spread = "" if row["miou_last_std"] is None else f" ± {row['miou_last_std']:.2f}"
        delta = "" if row["delta_vs_supervised"] is None else f"{row['delta_vs_supervised']:+.2f}"
        lines.append(f"| {row['variant']} | {len(row['seeds'])} | {', '.join(f'{m:.2f}' for m in row['miou_last'])} "
                     f"| {row['miou_last_mean']:.2f}{spread} | {delta} | {row['miou_best_mean']:.2f} "
                     f"| {row['wall_min_mean']:.1f}{'*' if row['teachers_shared'] else ''} "
                     f"| {row['images_per_s_mean']:.1f} |")
    if any(row["teachers_shared"] for row in rows):
        lines += ["", "*: started from the teachers of igl-dt's run of the same seed (train.py --teachers-from, the "
                  "same result as a start from scratch): the wall time leaves out stage 1."]
    return "\n".join(lines) + "\n"


def save_records(path, records):
    path.with_suffix(".tmp").write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(path.with_suffix(".tmp"), path)  # a stop mid-write leaves the old file whole


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    out = Path(args.out)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:  # check the data, and draw the split every run shares, before the first run
        data.build_datasets("folder", args.data_root, args.split, str(out / "splits"), seed=0)
    except data.DataError as error:
        sys.exit(f"error: {error}")
    records_path = out / "records.jsonl"
    records = {(r["variant"], r["seed"]): r for r in map(json.loads, records_path.read_text().splitlines())} \
        if records_path.is_file() else {}
    for seed in args.seeds:
        for variant in args.variants:
            teachers = out / "runs" / f"igl-dt_s{seed}"
            shared = variant in SAME_TEACHERS_AS_IGL_DT and ("igl-dt", seed) in records and teachers.is_dir()
            arguments = train_args(args, variant, seed, str(teachers) if shared else None)
            command = shlex.join(["python", "train.py", *arguments])
            from_scratch = shlex.join(["python", "train.py", *train_args(args, variant, seed)])  # the same run
            run_dir = out / "runs" / f"{variant}_s{seed}"
            done = records.get((variant, seed))
            if done and not args.force:
                if done["command"] not in (command, from_scratch):
                    sys.exit(f"error: {records_path} holds {variant} seed {seed} made by another command:\n  "
                             f"{done['command']}\nuse another --out, or --force to run it again")
                print(f"{variant} seed {seed}: recorded, skipped")
                continue
            if args.force and run_dir.exists():
                shutil.rmtree(run_dir)
            print(f"{variant} seed {seed}: {command}", flush=True)
            wall_s, resumed = run_training(arguments, run_dir)
            records[variant, seed] = {"variant": variant, "seed": seed} | read_run(run_dir, device) | {
                "wall_s": round(wall_s, 1), "resumed": resumed,  # resumed: wall_s covers this invocation alone
                "teachers_from": str(teachers) if shared else None,  # then wall_s leaves stage 1 out
                "command": command,
                "machine": {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                            "cpus": os.cpu_count(), "torch": torch.__version__}}
            save_records(records_path, records.values())
    rows = summarize(list(records.values()))
    table = markdown(rows, list(records.values()))
    (out / "summary.md").write_text(table)
    print("\n" + table)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
