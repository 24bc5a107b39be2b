"""Does IGL-DT beat supervised training and the one-teacher baseline on real data, and what does each part add?
Trains each variant below on a `folder` dataset under one budget rule and records the student's mIoU on val and
on the dev set (bench/dev_set.py) per seed, with its learning curve; prints the comparisons paired by seed.

    python bench/quality.py --data-root DIR --seeds 0 1 2 --variants supervised igl-dt no-gcl no-lrl no-dl
    python bench/quality.py --data-root DIR --seeds 0 1 2 --budget equal-compute --variants supervised ema igl-dt
    python bench/quality.py --data-root DIR --variants supervised igl-dt -- --student-epochs 4 --workers 0

Variants, as train.py flags. Everything else is train.py's `folder` defaults (DATASET_DEFAULTS["folder"]: a
ResNet-18 student and both teachers from scratch, at small widths and crops sized for a 2-core CPU; each run's
command and commit give the values used), changed for every variant alike by the train.py flags given after `--`:
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
(wall_s_partial, and --teachers-from in the record's command), while train_s still counts it, from the stage-1 log
they take over.
The headline is the last epoch's student mIoU (miou_val); the best over the epochs (miou_best, train.py's
best.pt) is chosen on the val set itself, so it is recorded beside it, not instead. Per-class IoU is that of
the last student (latest.pt).

The dev set is drawn once into OUT/dev (--dev-count, 80, of the split's unlabeled training images with their masks, as val):
a semi-supervised student saw those images unlabeled, a supervised one did not, so the dev set favours the
semi-supervised variants; it is for choosing settings of one method, val for the method against a baseline.

Writes OUT/records.jsonl, one record per run in bench/record.py's shape: settings (the train.py flags given, the
precision, and the budget of a baseline), metrics (miou_val, miou_dev, miou_best, the teachers' last val mIoU
miou_swin / miou_res / miou_ema, iou_per_class, train_s, wall_s for a whole run from scratch or wall_s_partial
for one that took igl-dt's teachers or was resumed, images_per_s_<stage>, iterations_per_epoch, cost_units), and
curve: at every evaluation (train.py --eval-every) the student's val mIoU (miou_val) and the teachers'
(miou_swin, miou_res, miou_ema), and each student epoch's pseudo-label shares, read from the run's log.jsonl.
Prints the table and the comparisons that bench/report.py puts on the results page (`python bench/report.py
--print OUT` prints them again). A run whose record exists is skipped (--force runs it again); a run stopped
part-way is resumed from its latest.pt: the same command continues an interrupted benchmark.
"""
import argparse
import json
import math
import os
import shlex
import shutil
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
from bench.record import record  # noqa: E402
from bench.report import section  # noqa: E402

BUDGETS = ["same-student-epochs", "equal-compute"]

VARIANTS = {"supervised": ["--teachers", "none"], "ema": ["--teachers", "ema"], "igl-dt": [], "no-gcl": ["--lambda-glo", "0"],
            "no-lrl": ["--lambda-loc", "0"], "no-dl": ["--lambda-dis", "0"], "swin-only": ["--teachers", "swin"],
            "res-only": ["--teachers", "res"]}
SET_HERE = {"--dataset", "--data-root", "--split", "--splits-dir", "--out", "--seed", "--teachers", "--resume",
            "--teachers-from"}
SAME_TEACHERS_AS_IGL_DT = {"no-gcl", "no-lrl", "no-dl"}
WHERE_AND_WHO = {"--dataset", "--data-root", "--splits-dir", "--out", "--seed", "--teachers-from", "--device",
                 "--resume"}  # flags that change no figure of a run, or are the record's own fields


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
    p.add_argument("--speed-record", default="bench/results/speed_cpu_amp.jsonl",
                   help="bench/speed.py's records, whose step costs set the equal-compute epochs "
                   "(default: bench/results/speed_cpu_amp.jsonl)")
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
    """Seconds per step of each kind / seconds per supervised step, from bench/speed.py's records at `amp`."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    seconds = {r["variant"]: r["metrics"]["seconds_per_step"] for r in records if r["settings"].get("amp") == amp}
    if "supervised" not in seconds:
        sys.exit(f"error: --speed-record {path} holds no step costs at --amp {amp}")
    return {kind: s / seconds["supervised"] for kind, s in seconds.items()}


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
    """The run's metrics and curve: mIoU from its log.jsonl, per-class IoU of its last student (latest.pt) evaluated
    here, the same student's dev-set mIoU, the speed of each stage; and its config."""
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
    metrics = {"miou_val": round(student[-1]["miou_student"], 2), "miou_dev": round(dev["miou"], 2),
               "miou_best": round(max(r["miou_student"] for r in student), 2)}
    metrics |= {f"miou_{name}": round(log[-1][f"miou_{name}"], 2) for name in ("swin", "res", "ema")
                if log[-1].get(f"miou_{name}") is not None}  # the teachers' last val mIoU
    metrics |= {"iou_per_class": {name: None if math.isnan(iou) else round(iou, 2)  # NaN: class absent from val
                                  for name, iou in zip(info.class_names, result["iou"])},
                "train_s": round(sum(seconds.values()), 1),  # the epochs alone, without evaluation and start-up
                "images_per_s": rate(sum(images.values()), sum(seconds.values()))}
    metrics |= {f"images_per_s_{stage}": rate(images[stage], seconds[stage]) for stage in seconds if seconds[stage]}
    return metrics | {"iterations_per_epoch": log[0]["iterations"]}, curve_of(log), cfg


def curve_of(log):
    """The run's curve from its log.jsonl: at each epoch that has them, the val mIoU of the student (miou_val) and
    of the teachers, and the pseudo-label shares, the epoch counted within its stage."""
    teacher_epochs = max((r["epoch"] for r in log if r["stage"] == "teachers"), default=0)
    names = {"miou_student": "miou_val", "miou_swin": "miou_swin", "miou_res": "miou_res", "miou_ema": "miou_ema",
             "share_agreed": "share_agreed", "share_disputed": "share_disputed"}
    curve = []
    for r in log:
        figures = {new: round(r[old], 4 if old.startswith("share") else 2) for old, new in names.items()
                   if r.get(old) is not None}
        if figures:
            epoch = r["epoch"] - (teacher_epochs if r["stage"] == "student" else 0)
            curve.append({"stage": r["stage"], "epoch": epoch} | figures)
    return curve


def run_settings(command, variant, amp, budget=None):
    """A record's settings: the train.py flags its command gave (the last of a flag given twice) but those that
    change no figure or are the record's own fields (WHERE_AND_WHO, the variant's flags), its precision, and the
    budget that set a baseline's student epochs."""
    words, settings = shlex.split(command)[2:], {}  # after `python train.py`
    flags = [i for i, word in enumerate(words) if word.startswith("--")] + [len(words)]
    for start, end in zip(flags, flags[1:]):
        flag, values = words[start], [json_or_text(word) for word in words[start + 1:end]]
        name = flag[2:].replace("-", "_")
        if flag in WHERE_AND_WHO or flag in VARIANTS[variant][::2]:
            continue
        if values:
            settings[name] = values[0] if len(values) == 1 else values
        else:  # a switch: --freeze-teachers, --no-freeze-teachers
            settings[name.removeprefix("no_")] = not flag.startswith("--no-")
    return settings | {"amp": amp} | ({"budget": budget} if budget else {})


def json_or_text(word):
    try:
        return json.loads(word)
    except json.JSONDecodeError:
        return word


def run_of(record):
    """The run directory's name (OUT/runs/<name>), from the record's command."""
    words = shlex.split(record["command"])
    return Path(words[words.index("--out") + 1]).name


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
    records = {run_of(r): r for r in map(json.loads, records_path.read_text().splitlines())} \
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
            metrics, curve, cfg = read_run(run_dir, device, dev_root, dev_splits)
            cost = run_cost(cfg, costs)
            budget = args.budget if variant in ("supervised", "ema") else None  # IGL-DT's epochs no budget sets
            # a wall time that leaves stage 1 out (teachers taken over) or a stopped part (resumed) is a part only
            wall = "wall_s_partial" if shared or resumed else "wall_s"
            metrics |= {wall: round(wall_s, 1)} | ({"cost_units": round(cost, 2)} if cost is not None else {})
            records[name] = record("quality", variant, seed, run_settings(command, variant, cfg["amp"], budget),
                                   metrics, command, device, curve)
            save_records(records_path, records.values())
    print("\n" + "\n".join(section(out.name, list(records.values()))))

if __name__ == "__main__":
    main()
