"""Does IGL-DT beat supervised training and the one-teacher baseline on real data, and what does each part add?
Trains each variant below on a `folder` dataset under one budget rule and reports the student's mIoU on val and
on the dev set (bench/dev_set.py), per seed, with the paired difference to IGL-DT and its 95 % t-interval.

    python bench/quality.py --data-root DIR --seeds 0 1 2 --variants supervised igl-dt no-gcl no-lrl no-dl
    python bench/quality.py --data-root DIR --seeds 0 1 2 --budget equal-compute --variants supervised ema igl-dt
    python bench/quality.py --data-root DIR --variants supervised igl-dt -- --student-epochs 4 --workers 0

Variants, as train.py flags. Everything else is train.py's `folder` defaults (DATASET_DEFAULTS["folder"]: a
ResNet-18 student and both teachers from scratch, at small widths and crops sized for a 2-core CPU; summary.md
lists the values used), changed for every variant alike by the train.py flags given after `--`:
  supervised   --teachers none     the student on the labeled images alone
  ema          --teachers ema      the one-teacher baseline: the student's EMA copy teaches (Mean Teacher + FixMatch
                                   threshold, weak view in, strong view and CutMix out), no stage 1
  igl-dt                           the full method
  no-gcl       --lambda-glo 0      without global context learning
  no-lrl       --lambda-loc 0      without local regional learning
  no-dl        --lambda-dis 0      without discrepancy learning
  swin-only    --teachers swin     the Swin-UNet teacher alone, in both roles (no CPS)
  res-only     --teachers res      the ResUNet teacher alone, in both roles (no CPS)

Budgets (--budget):
  same-student-epochs  every variant trains the student for train.py's --student-epochs (the literature's rule)
  equal-compute        every variant costs what an IGL-DT run costs. Cost is counted in supervised-step units:
                       a run of E epochs of I iterations whose steps each take c supervised steps costs E * I * c,
                       with c from a bench/speed.py record (--speed-record, at the runs' precision): IGL-DT costs
                       I * (teacher_epochs * c_teachers + student_epochs * c_stage2), where c_stage2 is
                       c_igl-dt-frozen or c_igl-dt as --freeze-teachers says. supervised (c = 1) and ema
                       (c = c_ema) get round(cost_IGL-DT / (I * c)) student epochs; the variants that train
                       teachers keep their epochs (the loss ablations cost what IGL-DT costs; swin-only and
                       res-only, whose steps are not measured, are not rebalanced and record no cost).
A run whose epochs the budget changes is named <variant>_equal_s<seed>; others are shared by both budgets, so
one --out holds both tables' runs. Each record holds its budget, its student epochs and its cost.

Every run shares one labeled split, drawn once with seed 0 into OUT/splits; a seed changes the initial weights
and the sample order. A run is `python train.py ...` in a child process, writing OUT/runs/<variant>_s<seed>/.
no-gcl, no-lrl and no-dl train the same teachers as igl-dt (they change only the student's losses), so once
igl-dt's run of their seed is recorded they start from its teachers (train.py --teachers-from), which gives
exactly the run a start from scratch would, without its stage 1; their wall time then leaves stage 1 out
(`teachers_from` in the record), while train_s still counts it, from the stage-1 log they take over.
The headline is the last epoch's student mIoU (miou_last); the best over the epochs (miou_best, train.py's
best.pt) is chosen on the val set itself, so it is recorded beside it, not instead. Per-class IoU is that of
the last student (latest.pt).

The dev set is drawn once into OUT/dev (--dev-count, 80, of the split's unlabeled training images with their masks, as val):
a semi-supervised student saw those images unlabeled, a supervised one did not, so the dev set favours the
semi-supervised variants; it is for choosing settings of one method, val for the method against a baseline.

Writes OUT/records.jsonl (one JSON record per run: variant, budget, seed, miou_last, miou_dev, miou_best,
iou_per_class, the per-epoch pseudo-label shares, cost, wall_s, train_s, images_per_s, config, command, commit,
machine) and OUT/summary.md (per variant: each seed, the mean, and IGL-DT minus the variant, paired by seed,
with its 95 % t-interval), and prints the summary as JSON. A run whose record exists is skipped (--force runs it again); a
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
sys.path.insert(0, REPO)  # python bench/x.py starts sys.path at bench/: import the repository's modules
import data  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402
from bench.dev_set import make_dev_set  # noqa: E402
from bench.record import machine_and_commit  # noqa: E402
from bench.stats import interval_text, paired  # noqa: E402

BUDGETS = ["same-student-epochs", "equal-compute"]

VARIANTS = {"supervised": ["--teachers", "none"], "ema": ["--teachers", "ema"], "igl-dt": [], "no-gcl": ["--lambda-glo", "0"],
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
    p.add_argument("--budget", choices=BUDGETS, default="same-student-epochs", help="(default: same-student-epochs)")
    p.add_argument("--speed-record", default="bench/results/speed_cpu_amp.json",
                   help="bench/speed.py's JSON, whose step costs set the equal-compute epochs "
                   "(default: bench/results/speed_cpu_amp.json)")
    p.add_argument("--dev-count", type=int, default=80, help="images in the dev set (default: 80)")
    p.add_argument("--out", default="bench/results/quality_cpu", help="(default: bench/results/quality_cpu)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="(default: train.py's, cuda when there is one)")
    p.add_argument("--force", action="store_true", help="run again the runs that already have a record")
    args = p.parse_args(own)
    args.variants = sorted(set(args.variants), key=list(VARIANTS).index)  # igl-dt before the runs sharing its teachers
    clash = SET_HERE & {flag.split("=")[0] for flag in train_flags}
    if clash:
        p.error(f"{', '.join(sorted(clash))} after --: set by this script (use its own flags)")
    args.train_flags = train_flags
    return args


def base_config(args, variant):
    """The config train.py builds for a variant (before the budget): its parse_args on the shared flags."""
    return vars(train.parse_args(["--dataset", "folder", "--data-root", args.data_root, *args.train_flags,
                                  *VARIANTS[variant]]))


def step_costs(path, amp):
    """Seconds per step of each kind / seconds per supervised step, from a bench/speed.py record at `amp`."""
    record = json.loads(Path(path).read_text())
    label = {"off": "fp32", "bf16": "bf16"}.get(amp, amp)
    kinds = record["kinds"].get(label) if label in record["kinds"] else record["kinds"]
    if "supervised" not in kinds or record.get("settings", {}).get("amp", amp) != amp:
        sys.exit(f"error: --speed-record {path} holds no step costs at --amp {amp}")
    base = kinds["supervised"]["seconds_per_step"]
    return {kind: r["seconds_per_step"] / base for kind, r in kinds.items()}


def run_cost(cfg, costs):
    """A run's cost in supervised-step epochs (multiply by the iterations per epoch for steps); None if unmeasured."""
    if cfg["teachers"] == "none":
        return cfg["student_epochs"] * 1.0
    if cfg["teachers"] == "ema":
        return cfg["student_epochs"] * costs["ema"]
    if cfg["teachers"] != "both":
        return None
    stage2 = costs["igl-dt-frozen" if cfg["freeze_teachers"] else "igl-dt"]
    return cfg["teacher_epochs"] * costs["teachers"] + cfg["student_epochs"] * stage2


def student_epochs(args, variant, costs):
    """The student's epochs for `variant` under the budget: train.py's default, or equal IGL-DT's cost."""
    cfg = base_config(args, variant)
    if args.budget == "same-student-epochs" or variant not in ("supervised", "ema"):
        return cfg["student_epochs"]
    per_epoch = 1.0 if variant == "supervised" else costs["ema"]
    return max(1, round(run_cost(base_config(args, "igl-dt"), costs) / per_epoch))


def run_name(args, variant, seed, epochs):
    equal = epochs != base_config(args, variant)["student_epochs"]
    return f"{variant}{'_equal' if equal else ''}_s{seed}"


def train_args(args, variant, seed, epochs, teachers_from=None):
    """train.py's arguments for one run: the shared settings, the flags after --, then the variant's own."""
    device = ["--device", args.device] if args.device else []
    adopt = ["--teachers-from", teachers_from] if teachers_from else []
    return ["--dataset", "folder", "--data-root", args.data_root, "--split", args.split,
            "--splits-dir", f"{args.out}/splits", "--out", f"{args.out}/runs/{run_name(args, variant, seed, epochs)}",
            "--seed", str(seed), *device, *args.train_flags, "--student-epochs", str(epochs), *VARIANTS[variant],
            *adopt]


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


def student_miou(model, cfg, data_root, splits_dir, device):
    """mIoU and per-class IoU of `model` on the val split of `data_root` (train.py's evaluation settings)."""
    _, _, val_set, info = data.build_datasets(cfg["dataset"], data_root, cfg["split"], splits_dir, cfg["crop_size"],
                                              cfg["seed"])
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[cfg["amp"]]
    result = evaluate.evaluate(model.to(device), val_set, info.num_classes, device, mode=cfg["eval_mode"],
                               window=cfg["eval_window"], stride=max(1, cfg["eval_window"] * 2 // 3),
                               amp_dtype=amp_dtype)
    return result, info


def read_run(run_dir, device, dev_root, dev_splits):
    """The run's figures: mIoU from its log.jsonl, per-class IoU of its last student (latest.pt) evaluated here,
    the same student's dev-set mIoU, and the per-epoch pseudo-label shares."""
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    student = [r for r in log if "miou_student" in r]
    model, cfg = evaluate.load_student(run_dir / "latest.pt")  # in the run's memory layout, as it evaluated
    result, info = student_miou(model, cfg, cfg["data_root"], cfg["splits_dir"], device)
    if abs(result["miou"] - student[-1]["miou_student"]) > 0.01:
        print(f"warning: {run_dir}: latest.pt gives mIoU {result['miou']:.2f}, its log "
              f"{student[-1]['miou_student']:.2f}", file=sys.stderr)
    dev, _ = student_miou(model, cfg, dev_root, dev_splits, device)
    seconds = {stage: sum(r["seconds"] for r in log if r["stage"] == stage) for stage in ("teachers", "student")}
    images = {stage: sum(r["seconds"] * r["images_per_s"] for r in log if r["stage"] == stage)
              for stage in ("teachers", "student")}
    rate = lambda n, s: round(n / s, 2) if s else None
    return {"miou_last": round(student[-1]["miou_student"], 2), "miou_dev": round(dev["miou"], 2),
            "miou_best": round(max(r["miou_student"] for r in student), 2),
            "miou_teachers_last": {name: round(log[-1][f"miou_{name}"], 2) for name in ("swin", "res", "ema")
                                   if f"miou_{name}" in log[-1]},
            "iou_per_class": {name: None if math.isnan(iou) else round(iou, 2)  # NaN: class absent from val
                              for name, iou in zip(info.class_names, result["iou"])},
            "pseudo_label_shares": [{"epoch": r["epoch"], "agreed": round(r["share_agreed"], 4),
                                     "disputed": round(r["share_disputed"], 4)}
                                    for r in log if r["stage"] == "student" and "share_agreed" in r],
            "train_s": round(sum(seconds.values()), 1),  # the epochs alone, without evaluation and start-up
            "images_per_s": {stage: rate(images[stage], seconds[stage]) for stage in seconds}
            | {"all": rate(sum(images.values()), sum(seconds.values()))},
            "iterations_per_epoch": log[0]["iterations"],
            "config": cfg}


def summarize(records):
    """One row per (variant, budget): per-seed val and dev mIoU, means, and IGL-DT minus the variant, by seed."""
    igl = {key: {r["seed"]: r[key] for r in records if r["variant"] == "igl-dt"} for key in ("miou_last", "miou_dev")}
    rows = []
    for variant in VARIANTS:
        for budget in ("same-student-epochs", "equal-compute", "both"):
            runs = sorted((r for r in records if r["variant"] == variant and r.get("budget", "both") == budget),
                          key=lambda r: r["seed"])
            if not runs:
                continue
            row = {"variant": variant, "budget": budget, "seeds": [r["seed"] for r in runs],
                   "student_epochs": sorted({r["config"]["student_epochs"] for r in runs}),
                   "cost_units": runs[0].get("cost_units"),
                   "wall_min_mean": round(statistics.mean(r["wall_s"] for r in runs) / 60, 1),
                   "teachers_shared": any(r.get("teachers_from") for r in runs)}
            for key, name in (("miou_last", "val"), ("miou_dev", "dev")):
                values = {r["seed"]: r[key] for r in runs if r.get(key) is not None}
                row[name] = [values[seed] for seed in sorted(values)]
                row[f"{name}_mean"] = round(statistics.mean(values.values()), 2) if values else None
                row[f"{name}_igl_dt_minus"] = None if variant == "igl-dt" else paired(igl[key], values)
            rows.append(row)
    return rows


def own_keys(variant):
    """The config keys a variant sets itself (and those that differ for every run)."""
    return {flag[2:].replace("-", "_") for flag in VARIANTS[variant][::2]} | {"out", "seed", "teachers_from",
                                                                              "student_epochs"}


def markdown(rows, records):
    reference = next((r for r in records if r["variant"] == "igl-dt"), records[0])
    cfg = reference["config"]
    keys = ["split", "backbone", "pretrained", "crop_size", "batch_size", "teacher_epochs", "student_epochs",
            "freeze_teachers", "lr", "swin_lr", "swin_dim", "swin_depths", "res_width", "threshold", "region",
            "ema_momentum", "lambda_dis", "lambda_glo", "lambda_loc", "lambda_cps", "amp", "max_iters"]
    commits = sorted({str(r.get("commit")) for r in records})
    lines = [f"# IGL-DT against supervised training and the one-teacher baseline on {cfg['data_root']}", "",
             "Configuration (IGL-DT's; every variant the same but its own flag and its budget's student epochs; each "
             "run's full config is in records.jsonl): " + ", ".join(f"{key} {cfg.get(key)}" for key in keys) + ".",
             f"Commits: {', '.join(commits)}.", "",
             "mIoU (%) of the student after its last epoch, on val and on the dev set (the split's unlabeled "
             "images that the semi-supervised variants saw unlabeled). Δ = IGL-DT minus the variant, paired by seed: "
             "mean [95 % t-interval]. Cost in supervised-step epochs (see --budget).", ""]
    differ = sorted({key for r in records for key, value in r["config"].items()
                     if key not in own_keys(r["variant"]) | own_keys(reference["variant"]) and value != cfg.get(key)})
    if differ:  # runs made by different commands into one --out
        lines += [f"**Not one configuration**: the runs differ in {', '.join(differ)}.", ""]
    lines += ["| variant | budget | student epochs | cost | seeds | val per seed | val mean | Δ val | dev per seed "
              "| dev mean | Δ dev | wall min |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda values: ", ".join(f"{v:.2f}" for v in values)
    delta = lambda d: "" if d is None else interval_text(d)
    for row in rows:
        cost = "" if row["cost_units"] is None else f"{row['cost_units']:.1f}"
        mean = lambda v: "" if v is None else f"{v:.2f}"
        lines.append(f"| {row['variant']} | {row['budget']} | {', '.join(map(str, row['student_epochs']))} | {cost} "
                     f"| {len(row['seeds'])} | {fmt(row['val'])} | {mean(row['val_mean'])} "
                     f"| {delta(row['val_igl_dt_minus'])} | {fmt(row['dev'])} | {mean(row['dev_mean'])} "
                     f"| {delta(row['dev_igl_dt_minus'])} | {row['wall_min_mean']:.1f}"
                     f"{'*' if row['teachers_shared'] else ''} |")
    if any(row["teachers_shared"] for row in rows):
        lines += ["", "*: started from the teachers of igl-dt's run of the same seed (train.py --teachers-from, the "
                  "same result as a start from scratch): the wall time leaves out stage 1."]
    shares = [r for r in records if r.get("pseudo_label_shares")]
    if shares:
        lines += ["", "What the student is taught: the share of valid unlabeled pixels that get an agreed pseudo-label "
                  "above the threshold (L_pl's targets) and that the teachers dispute (L_dis's), per student epoch, "
                  "for the first seed of each semi-supervised run:", "",
                  "| run | budget | epoch | agreed and kept | disputed |", "|---|---|---|---|---|"]
        for r in sorted(shares, key=lambda r: (list(VARIANTS).index(r["variant"]), r["budget"], r["seed"])):
            if r["seed"] == min(x["seed"] for x in shares if (x["variant"], x["budget"]) == (r["variant"], r["budget"])):
                lines += [f"| {r['run']} | {r['budget']} | {s['epoch']} | {s['agreed']:.3f} | {s['disputed']:.3f} |"
                          for s in r["pseudo_label_shares"]]
    return "\n".join(lines) + "\n"


def save_records(path, records):
    path.with_suffix(".tmp").write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(path.with_suffix(".tmp"), path)  # a stop mid-write leaves the old file whole


def prepare(args, out):
    """Check the data, draw the split every run shares, and the dev set, before the first run."""
    dev_root = out / "dev"
    try:
        data.build_datasets("folder", args.data_root, args.split, str(out / "splits"), seed=0)
        if not dev_root.is_dir():
            make_dev_set(args.data_root, str(dev_root), args.split, seed=0, count=args.dev_count)
    except data.DataError as error:
        sys.exit(f"error: {error}")
    return str(dev_root), str(out / "dev_splits")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    out = Path(args.out)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev_root, dev_splits = prepare(args, out)
    amp = base_config(args, "igl-dt")["amp"]
    costs = step_costs(args.speed_record, amp)
    records_path = out / "records.jsonl"
    records = {r["run"]: r for r in map(json.loads, records_path.read_text().splitlines())} \
        if records_path.is_file() else {}
    for seed in args.seeds:
        for variant in args.variants:
            epochs = student_epochs(args, variant, costs)
            name = run_name(args, variant, seed, epochs)
            teachers = out / "runs" / f"igl-dt_s{seed}"
            shared = variant in SAME_TEACHERS_AS_IGL_DT and f"igl-dt_s{seed}" in records and teachers.is_dir()
            arguments = train_args(args, variant, seed, epochs, str(teachers) if shared else None)
            command = shlex.join(["python", "train.py", *arguments])
            from_scratch = shlex.join(["python", "train.py", *train_args(args, variant, seed, epochs)])  # the same run
            run_dir = out / "runs" / name
            done = records.get(name)
            if done and not args.force:
                if done["command"] not in (command, from_scratch):
                    sys.exit(f"error: {records_path} holds {name} made by another command:\n  "
                             f"{done['command']}\nuse another --out, or --force to run it again")
                print(f"{name}: recorded, skipped")
                continue
            if args.force and run_dir.exists():
                shutil.rmtree(run_dir)
            print(f"{name}: {command}", flush=True)
            wall_s, resumed = run_training(arguments, run_dir)
            result = read_run(run_dir, device, dev_root, dev_splits)
            cost = run_cost(result["config"], costs)
            budget = args.budget if variant in ("supervised", "ema") else "both"
            records[name] = {"run": name, "variant": variant, "budget": budget, "seed": seed} | result | {
                "cost_units": None if cost is None else round(cost, 2), "step_costs": costs,
                "speed_record": args.speed_record,
                "wall_s": round(wall_s, 1), "resumed": resumed,  # resumed: wall_s covers this invocation alone
                "teachers_from": str(teachers) if shared else None,  # then wall_s leaves stage 1 out
                "command": command} | machine_and_commit(device)
            save_records(records_path, records.values())
    rows = summarize(list(records.values()))
    table = markdown(rows, list(records.values()))
    (out / "summary.md").write_text(table)
    print("\n" + table)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
