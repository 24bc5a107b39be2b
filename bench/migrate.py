"""Rewrites results written before bench/record.py's one shape into that shape, and adds to each quality run its
learning curve from its run's log.jsonl where that file is there. A one-off: delete it once no folder written by
the former scripts is left to bring in.

    python bench/migrate.py                     # every result directly under bench/results/ (not archive/)
    python bench/migrate.py bench/results/quality_cpu_camvid_fp32_sup_e52    # one folder bench/quality.py wrote
                                                # before it recorded curves, copied in with its runs/

A `NAME.json` (bench/speed.py, model_speed.py, data_speed.py: one object each) becomes `NAME.jsonl`, a record per
kind and setting, network or worker count; a folder's records.jsonl is rewritten in place, its summary.md (now
`python bench/report.py --print FOLDER`) removed, and its paired_with.json given the pairs it meant. A record
already of the one shape is kept, its curve rebuilt where the run's log is there, so running this twice changes
nothing. What the former records held and the shape has no field for: a commit not recorded, or a command rebuilt
from the settings, becomes the record's note; the speed-ups a --compare record stated are checked against those
bench/report.py derives from the new records (the run stops if one differs); a quality record's full config,
step costs and `resumed` (its wall time becomes wall_s_partial) are left out: the command and the commit give them.
"""
import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.quality import BUDGETS, curve_of, run_of, run_settings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# Records written before the benchmarks stored their commit: the commit that added them to the repository.
COMMITTED_IN = {"quality_cpu_camvid": "74af54d (supervised, igl-dt), e4fb984 (seed-0 ablations), 4c284c9 (seed 1)",
                "quality_cpu_camvid_repeat": "d89f791", "speed_cpu.json": "d89f791", "speed_gpu_voc_bf16.json":
                "763d4d4", "speed_gpu_voc_fp16.json": "763d4d4", "model_speed_gpu_bf16_b16.json": "763d4d4",
                "model_speed_cpu.json": "022bc74", "data_speed_cpu.json": "022bc74"}
# --compare's labels in a bench/speed.py record: the setting each stands for.
COMPARED = {"fp32": ("amp", "off"), "bf16": ("amp", "bf16"), "eager": ("compile", False),
            "compiled": ("compile", True), "nchw": ("channels_last", False), "channels_last": ("channels_last", True)}
# For records that hold no command: the flags their settings give.
REBUILT = {"speed": ["dataset", "device", "amp", "iters", "warmup"], "model_speed": ["device", "amp", "crop", "batch",
           "iters", "warmup"], "data_speed": ["data-root DIR", "crop", "batch", "samples"]}


def flat(question, variant, seed, settings, metrics, old, name, curve=(), machine=None):
    """A record of the one shape, with the former record's command, commit, machine and note."""
    notes = [old["note"]] if old.get("note") else []
    command = old.get("command")
    if not command:
        words = [w if " " in w else f"{w} {settings[w]}" for w in REBUILT[question] if " " in w or w in settings]
        command = " ".join([f"python bench/{question}.py"] + [f"--{w}" for w in words])
        notes.append("command not recorded: rebuilt from the record's settings")
    if not old.get("commit"):
        notes.append(f"commit not recorded (the record predates the field); committed in {COMMITTED_IN[name]}")
    machine = machine or old.get("machine", {})
    machine = {("cpus" if k == "cpu_count" else k): v for k, v in machine.items()}
    return {"question": question, "variant": variant, "seed": seed, "settings": settings,
            "metrics": {k: v for k, v in metrics.items() if v is not None}, "curve": list(curve), "command": command,
            "commit": old.get("commit"), "machine": machine} | ({"note": "; ".join(notes)} if notes else {})


def quality(old, name, folder):
    """bench/quality.py's former record: miou_last, miou_teachers_last, pseudo_label_shares, wall_s and
    teachers_from / resumed, config."""
    cfg, run = old["config"], old.get("run") or Path(old["config"]["out"]).name
    log = folder / "runs" / run / "log.jsonl"
    if log.is_file():
        curve = curve_of([json.loads(line) for line in log.read_text().splitlines()])
    else:  # the per-epoch pseudo-label shares, on the log's epochs: counted within stage 2 here
        offset = cfg["teacher_epochs"] if cfg["teachers"] in ("swin", "res", "both") else 0
        curve = [{"stage": "student", "epoch": s["epoch"] - offset, "share_agreed": s["agreed"],
                  "share_disputed": s["disputed"]} for s in old.get("pseudo_label_shares", [])]
    whole = not old.get("teachers_from") and not old.get("resumed")
    metrics = {"miou_val": old["miou_last"], "miou_dev": old.get("miou_dev"), "miou_best": old["miou_best"]}
    metrics |= {f"miou_{k}": v for k, v in old["miou_teachers_last"].items()}
    metrics |= {"iou_per_class": old["iou_per_class"], "train_s": old["train_s"],
                ("wall_s" if whole else "wall_s_partial"): old["wall_s"], "images_per_s": old["images_per_s"]["all"]}
    metrics |= {f"images_per_s_{k}": v for k, v in old["images_per_s"].items() if k != "all"}
    metrics |= {"iterations_per_epoch": old.get("iterations_per_epoch"), "cost_units": old.get("cost_units")}
    budget = old.get("budget") if old.get("budget") in BUDGETS else None
    settings = run_settings(old["command"], old["variant"], cfg["amp"], budget)
    return flat("quality", old["variant"], old["seed"], settings, metrics, old, name, curve)


def whole_run(old, name):
    """A whole train.py run's record: compared by precision (amp) or by layout (channels_last)."""
    layout = "channels_last" in old
    variant = ("channels-last" if old["channels_last"] else "NCHW") if layout else \
        ("fp32" if old["amp"] == "off" else old["amp"])
    metrics = {"miou_val": old["miou_last"], "miou_best": old["miou_best"],
               ("wall_s" if old["machine_alone"] else "wall_s_partial"): old["wall_s"]}
    machine = old["machine"] | {"alone": old["machine_alone"]}
    return flat("train", variant, old["seed"], {"amp": old["amp"]} if layout else {}, metrics, old, name,
                machine=machine)


def speed(old, name):
    """bench/speed.py's former object: a step per kind, under "kinds", or under each --compare label."""
    tables = old["kinds"].items() if set(old["kinds"]) <= set(COMPARED) else [(None, old["kinds"])]
    interleave = re.search(r"--interleave (\d+)", old.get("command") or "")
    records = []
    for label, steps in tables:
        for kind, step in steps.items():
            settings = old["settings"] | {k: step[k] for k in ("amp", "compile") if k in step}
            settings |= dict([COMPARED[label]]) if label else {}
            settings |= {"interleave": int(interleave.group(1))} if interleave else {}
            metrics = {k: v for k, v in step.items() if k not in ("amp", "compile", "breakdown")}
            metrics |= step.get("breakdown", {})
            if label and "interleaved_median_s" in old:
                metrics["interleaved_median_s"] = old["interleaved_median_s"][kind][label]
            records.append(flat("speed", kind, None, settings, metrics, old, name))
    check_speed_ups(old, records, name)
    return records


def check_speed_ups(old, records, name):
    """Each speed-up the former record states equals the one derived from the new records (bench/report.py's)."""
    for key, stated in old.items():
        if key.startswith("speedup_") and "_vs_" in key:
            second, first = (COMPARED[label] for label in key[len("speedup_"):].split("_vs_"))
            which = "interleaved_median_s" if "interleaved_median_s" in old else "seconds_per_step"
            for kind, value in stated.items():
                at = lambda setting: next(r["metrics"][which] for r in records
                                          if r["variant"] == kind and r["settings"][setting[0]] == setting[1])
                if f"{at(first) / at(second):.2f}" != f"{value:.2f}":
                    sys.exit(f"error: {name}: {key} {kind} {value} is not {at(first) / at(second):.2f}")


def model_speed(old, name):
    return [flat("model_speed", net, None, old["settings"], metrics, old, name)
            for net, metrics in old["results"].items()]


def data_speed(old, name):
    settings = {k: old[k] for k in ("crop", "batch", "samples", "image_size")}
    machine = {"device": "cpu", "cpus": old["cpus"], "torch_threads": old["torch_threads"],
               "load_average": old["load_average"]}
    return [flat("data_speed", old["pipeline"], None, settings | {"workers": int(workers)}, {"samples_per_s": rate},
                 old, name, machine=machine) for workers, rate in old["samples_per_s_by_workers"].items()]


def migrate_folder(folder):
    """records.jsonl in place (curves from runs/*/log.jsonl), paired_with.json with its pairs, summary.md removed."""
    path, records = folder / "records.jsonl", []
    for line in path.read_text().splitlines():
        if line.strip():
            old = json.loads(line)
            if "question" in old and old["question"] == "quality":
                log = folder / "runs" / run_of(old) / "log.jsonl"
                records.append(old | ({"curve": curve_of(read_lines(log))} if log.is_file() else {}))
            elif "question" in old:
                records.append(old)
            else:
                records.append(quality(old, folder.name, folder) if "variant" in old else whole_run(old, folder.name))
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    pairing = folder / "paired_with.json"
    if pairing.is_file() and "pairs" not in json.loads(pairing.read_text()):
        note = json.loads(pairing.read_text())
        other = [r["variant"] for r in read_lines(folder.parent / note["paired_with"] / "records.jsonl")]
        if note.pop("pair", None) == "same-variant":  # each variant with the same one there
            pairs = [[v, v] for v in dict.fromkeys(r["variant"] for r in records) if v in other]
        else:  # IGL-DT here against each baseline there
            pairs = [["igl-dt", v] for v in ("supervised", "igl-dt", "ema") if v in other]
        note["pairs"] = pairs
        pairing.write_text("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in note.items()) + "\n}\n")
    if (folder / "summary.md").is_file():
        (folder / "summary.md").unlink()
    curves = sum(1 for r in records if any("miou_val" in p for p in r["curve"]))
    return f"{folder.name}: {len(records)} records, {curves} with a learning curve"


def migrate_file(path):
    old = json.loads(path.read_text())
    question = next(q for q in ("model_speed", "data_speed", "speed") if path.name.startswith(q))
    records = {"speed": speed, "model_speed": model_speed, "data_speed": data_speed}[question](old, path.name)
    path.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    path.unlink()
    return f"{path.name} -> {path.with_suffix('.jsonl').name}: {len(records)} records"


def read_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", help="result files or folders (default: every one under bench/results/)")
    args = p.parse_args(argv)
    paths = [Path(p) for p in args.paths] or [p for p in sorted(RESULTS.iterdir())
                                              if (p / "records.jsonl").is_file() or p.suffix == ".json"]
    for path in paths:
        if not ((path / "records.jsonl").is_file() or path.suffix == ".json" and path.is_file()):
            sys.exit(f"error: {path}: expected a folder with records.jsonl or a .json result")
        print(migrate_folder(path) if path.is_dir() else migrate_file(path))


if __name__ == "__main__":
    main()
