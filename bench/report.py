"""Writes bench/results/README.md from the committed records, so that no figure in the docs drifts from its record.

    python bench/report.py            # rewrite bench/results/README.md, print the headline figures
    python bench/report.py --check    # exit 1 if the committed README.md is not what the records give

One table per question: does IGL-DT beat supervised training (bench/quality.py), what each part adds (its
ablations), what each step costs (bench/speed.py), the networks alone (bench/model_speed.py) and the data
pipeline (bench/data_speed.py). Every row names the command, commit and machine of its record. The records are
read from every file and folder directly under bench/results/ except archive/; the question a record answers
comes from the name's first part (NAMING below), and a record of an unknown shape is listed, not dropped.
The output depends on the records alone (sorted, no dates), so the same records always give the same file.
Standard library only.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script or loaded from its file
from bench.stats import interval_text, paired  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

NAMING = """\
Every result is named `<script>_<device>[_<tag>]`: `script` is the bench/ script that wrote it (`quality`,
`speed`, `model_speed`, `data_speed`), `device` is `cpu` or `gpu`, and the optional `tag` names the setting
(dataset, precision, batch), never a date or a commit: the commit is in the record. A script that writes one
JSON object gives `<name>.json`; one that writes a record per run gives a folder `<name>/` with `records.jsonl`
(and its `summary.md`). Superseded results move, by the same rule, to `archive/`, whose `HISTORY.md` tells what
they showed; this script reads everything else."""

QUESTIONS = ("model_speed", "data_speed", "quality", "speed", "train")  # the longer names first: model_speed is not speed
BASELINES = ("supervised", "igl-dt", "ema")  # the main comparison; every other quality variant is an ablation
PRECISIONS = ("fp32", "bf16", "fp16", "off")
# The settings bench/speed.py --compare times against each other, by the key its record files them under.
COMPARED = {"eager": "eager", "compiled": "compiled", "nchw": "NCHW", "channels_last": "channels-last"}
STEP_NAMES = {"supervised": "supervised student step", "teachers": "stage 1: teacher step (G + L, CPS)",
              "igl-dt": "stage 2: student + teachers co-training", "igl-dt-frozen": "stage 2: student, teachers frozen",
              "ema": "one-teacher baseline: student + its EMA teacher"}
STAGE_2_HEADLINES = {"igl-dt": "stage 2 (teachers co-training)", "igl-dt-frozen": "stage 2 (teachers frozen)"}
VARIANTS = ("supervised", "igl-dt", "ema", "no-gcl", "no-lrl", "no-dl", "swin-only", "res-only")  # table order
DROPPED_FLAGS = ("--out", "--splits-dir", "--teachers-from")  # where files went and came from: shown apart
# Records written before the benchmarks stored their commit: the commit that added them to the repository.
COMMITTED_IN = {"quality_cpu_camvid": "74af54d (supervised, igl-dt), e4fb984 (seed-0 ablations), 4c284c9 (seed 1)",
                "quality_cpu_camvid_repeat": "d89f791", "speed_cpu.json": "d89f791", "speed_gpu_voc_bf16.json":
                "763d4d4", "speed_gpu_voc_fp16.json": "763d4d4", "model_speed_gpu_bf16_b16.json": "763d4d4",
                "model_speed_cpu.json": "022bc74", "data_speed_cpu.json": "022bc74"}
NOT_RECORDED = "not recorded"


# ---- reading -------------------------------------------------------------------------------------------------

def question_of(name):
    stem = name[:-len(".json")] if name.endswith(".json") else name
    return next((q for q in QUESTIONS if stem == q or stem.startswith(q + "_")), None)


def load_records(path, results):
    """[(where, record)] from a .json file (one object or a list) or a folder (records.jsonl and *.json)."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir()
                                                 if p.name == "records.jsonl" or p.suffix == ".json")
    records = []
    for file in files:
        where = file.relative_to(results).as_posix()
        if file.suffix == ".jsonl":
            for number, line in enumerate(file.read_text().splitlines(), 1):
                if line.strip():
                    records.append((f"{where}:{number}", _parse(line, f"{where}:{number}")))
        else:
            value = _parse(file.read_text(), where)
            records += [(where, r) for r in (value if isinstance(value, list) else [value])]
    return [(where, r) for where, r in records if isinstance(r, dict)]


def _parse(text, where):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        sys.exit(f"error: {where} is not JSON: {error}")


def sources(results):
    """{question: [(source name, [(where, record)])]} for every current result; None holds the unknown names."""
    found = {}
    for path in sorted(results.iterdir()):
        if path.name in ("archive", "README.md") or path.name.startswith("."):
            continue
        if path.is_file() and path.suffix != ".json":
            continue
        found.setdefault(question_of(path.name), []).append((path.name, load_records(path, results)))
    return found


def measurements(record, marker, context=None, path=()):
    """Every dict inside `record` that has the key `marker`, with the keys of the dicts around it (the innermost
    winning) and `path`, the keys that lead to it: one walker for every layout of record (a report with "kinds",
    one nested by precision, one row per line)."""
    context = (context or {}) | {k: v for k, v in record.items()
                                 if not isinstance(v, dict) or k in ("machine", "settings")}
    if marker in record:
        return [context | record | {"path": path}]
    found = []
    for key in sorted(record):
        if isinstance(record[key], dict) and key not in ("machine", "settings", "notes"):
            found += measurements(record[key], marker, context, path + (key,))
    return found


# ---- formatting ----------------------------------------------------------------------------------------------

def number(value, digits=2, sign=False):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "—" if value is None else str(value)
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def rate(value):
    """A throughput with three significant digits or more: 0.81, 14.0, 246.1."""
    return number(value, 2 if isinstance(value, (int, float)) and value < 10 else 1)


def mebibytes(value):
    return number(value, 0) + " MiB" if isinstance(value, (int, float)) else "—"


def scalar(value):
    if isinstance(value, dict):
        return ", ".join(f"{k} {scalar(v)}" for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return " ".join(scalar(v) for v in value)
    return number(value) if isinstance(value, float) else str(value)


def precision(amp):
    return "fp32" if amp in ("off", "", None) else str(amp)


def machine_text(machine):
    """One short phrase for a machine record, whichever keys it has."""
    if isinstance(machine, str):
        return machine
    if not isinstance(machine, dict):
        return NOT_RECORDED
    device = machine.get("device", "")
    parts = ["CPU" if device in ("", "cpu") else device]
    cpus = machine.get("cpus", machine.get("cpu_count"))
    if cpus:
        parts.append(f"{cpus} cores")
    if machine.get("torch"):
        parts.append(f"torch {machine['torch']}")
    if machine.get("load_average") is not None:
        parts.append(f"load {machine['load_average']}")
    return ", ".join(parts)


def commit_text(record):
    return f"`{record['commit']}`" if record.get("commit") else NOT_RECORDED


def command_text(command):
    """A recorded command without its bookkeeping flags, its data directory written as its name in capitals
    (the path was the machine's, the name is the dataset's), and a flag given twice shown once, with the value
    that counts (bench/quality.py gives the budget's --student-epochs after those passed on to train.py)."""
    words, shown, skip = command.split(), [], False
    for i, word in enumerate(words):
        has_value = word.startswith("--") and i + 1 < len(words) and not words[i + 1].startswith("--")
        if skip:
            skip = False
        elif word in DROPPED_FLAGS or (has_value and word in words[i + 2:]):  # a flag given again: the last counts
            skip = True
        elif i and words[i - 1] == "--data-root":
            shown.append(Path(word).name.upper() or word)
        else:
            shown.append(word)
    return "`" + " ".join(shown).replace("|", "\\|") + "`"


def rebuilt_command(script, settings, flags, fixed=()):
    """For records that hold no command: the command their settings say, marked with a dagger."""
    if not settings:
        return NOT_RECORDED
    words = [f"python bench/{script}.py", *fixed] + [f"--{flag} {scalar(settings[key])}" for flag, key in flags
                                             if settings.get(key) is not None]
    return "`" + " ".join(words) + "` †"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def footnote_commit(name):
    if name in COMMITTED_IN:
        return [f"Commit {NOT_RECORDED}: these records predate the field; they were committed in {COMMITTED_IN[name]}."]
    return []


# ---- quality: does IGL-DT beat supervised training, and what does each part add --------------------------------

def quality_runs(records):
    runs = [r for _, r in records if "variant" in r and ("miou_last" in r or "miou" in r)]
    for run in runs:
        run.setdefault("miou_last", run.get("miou"))
    return runs


def groups(runs):
    """Runs that may be compared with one another: the same budget and precision where the records give them. A
    run of budget "both" (IGL-DT and its ablations, whose epochs no budget changes) joins every budget of its
    precision."""
    keyed = {}
    for run in runs:
        key = (scalar(run.get("budget", "")), scalar(run.get("amp", "")))
        keyed.setdefault(key, []).append(run)
    for (budget, amp), shared in list(keyed.items()):
        others = [key for key in keyed if key[1] == amp and key[0] != budget]
        if budget == "both" and others:
            del keyed[budget, amp]
            for key in others:
                keyed[key] = shared + keyed[key]
    return sorted(keyed.items())


def paired_gain(runs, variant, baseline, key="miou_last"):
    """variant - baseline paired by seed (bench/stats.py's mean and 95 % t-interval), and the seeds both have."""
    mine, theirs = ({r.get("seed"): r[key] for r in runs if r["variant"] == name and isinstance(r.get(key), (int, float))}
                    for name in (variant, baseline))
    return paired(mine, theirs), sorted(set(mine) & set(theirs))


def mean_of(runs, variant, key="miou_last"):
    values = [r[key] for r in runs if r["variant"] == variant and isinstance(r.get(key), (int, float))]
    return (statistics.mean(values), len(values)) if values else (None, 0)


def quality_table(runs, reference, extra):
    header = ["variant", "seed", "val mIoU", f"vs {reference}, same seed"] + [label for label, _ in extra] + \
             ["wall min", "command", "commit", "machine"]
    by_seed = {(r["variant"], r.get("seed")): r for r in runs}
    rows = []
    for run in sorted(runs, key=lambda r: (_variant_order(r["variant"]), str(r.get("seed")))):
        base = by_seed.get((reference, run.get("seed")))
        gain = run["miou_last"] - base["miou_last"] if base and run is not base and \
            isinstance(run["miou_last"], (int, float)) and isinstance(base.get("miou_last"), (int, float)) else None
        wall = run.get("wall_s")
        wall = "—" if not isinstance(wall, (int, float)) else number(wall / 60, 1) + ("*" if run.get("teachers_from")
                                                                                     else "")
        rows.append([f"`{run['variant']}`", str(run.get("seed", "—")), number(run["miou_last"]),
                     number(gain, sign=True)] + [scalar(run.get(key)) if run.get(key) is not None else "—"
                                                 for _, key in extra] +
                    [wall, command_text(run["command"]) if run.get("command") else NOT_RECORDED,
                     commit_text(run), machine_text(run.get("machine"))])
    return table(header, rows)


def _variant_order(variant):
    return (VARIANTS.index(variant) if variant in VARIANTS else len(VARIANTS), variant)


def extra_columns(runs):
    columns = [("dev mIoU", "miou_dev"), ("budget", "budget"), ("cost", "cost"), ("amp", "amp")]
    return [(label, key) for label, key in columns if any(r.get(key) is not None for r in runs)]


def quality_sections(found, headlines):
    beat, parts = [], []
    for name, records in found:
        runs = quality_runs(records)
        shown = set()  # ablations of budget "both" join every budget's group: their table is shown once
        for (budget, amp), group in groups(runs):
            label = f"`{name}`" + (f", budget {budget}" if budget else "") + (f", amp {amp}" if amp else "")
            extra = [(lab, key) for lab, key in extra_columns(group) if key not in ("budget", "amp")]
            main = [r for r in group if r["variant"] in BASELINES]
            ablations = [r for r in group if r["variant"] not in BASELINES or r["variant"] == "igl-dt"]
            if main:
                beat += [f"### {label}", ""] + quality_table(main, "supervised", extra) + [""]
                beat += _means(group, (("igl-dt", "supervised"), ("ema", "supervised"), ("igl-dt", "ema")), name,
                               label, headlines) + [""]
                beat += footnote_commit(name) + [""]
            if all(r.get("budget") == "both" for r in ablations):
                label = f"`{name}`" + (f", amp {amp}" if amp else "")
                if label in shown:
                    continue
                shown.add(label)
            if [r for r in ablations if r["variant"] != "igl-dt"]:
                parts += [f"### {label}", ""] + quality_table(ablations, "igl-dt", extra) + [""]
                variants = sorted({r["variant"] for r in ablations} - {"igl-dt"}, key=_variant_order)
                parts += _means(group, [(v, "igl-dt") for v in variants], name, label, headlines) + [""]
                if any(r.get("teachers_from") for r in ablations):
                    parts += ["*: started from the teachers of igl-dt's run of the same seed (`train.py "
                              "--teachers-from`, the same result as a start from scratch), so the wall time leaves "
                              "stage 1 out.", ""]
                parts += footnote_commit(name) + [""]
    return beat, parts


def _means(runs, pairs, name, label, headlines):
    """One line for each (variant, baseline) of `pairs` that share a seed: both means, and variant - baseline
    paired by seed with its 95 % t-interval, on val and on the dev set."""
    lines = []
    for variant, baseline in pairs:
        gain, seeds = paired_gain(runs, variant, baseline)
        if gain is None:
            continue
        mine, n = mean_of([r for r in runs if r.get("seed") in seeds], variant)
        theirs, _ = mean_of([r for r in runs if r.get("seed") in seeds], baseline)
        seed_text = ", ".join(str(s) for s in seeds)
        line = (f"`{variant}` {number(mine)} against `{baseline}` {number(theirs)}: {interval_text(gain)} "
                f"(val mIoU, mean over seed{'s' if n > 1 else ''} {seed_text})")
        minutes = [mean_of([r for r in runs if r.get("seed") in seeds and not r.get("teachers_from")], v, "wall_s")[0]
                   for v in (variant, baseline)]
        if None not in minutes:
            line += f", {number(minutes[0] / 60, 1)} and {number(minutes[1] / 60, 1)} min a run"
        dev_gain, dev_seeds = paired_gain(runs, variant, baseline, "miou_dev")
        if dev_gain is not None:
            line += f"; on the dev set {interval_text(dev_gain)} (seeds {', '.join(map(str, dev_seeds))})"
        lines.append("- " + line + ".")
        headlines.append(f"{label.replace('`', '')}: {line}")
    return lines


def cross_folder_sections(found, headlines):
    """A results folder whose `paired_with.json` names another ({"paired_with": NAME, "why": ...}) ran IGL-DT under
    other settings with the same split, seeds and dev set: its IGL-DT is paired by seed with every variant there.
    With "pair": "same-variant" (one setting changed for every variant alike, the precision say), each of its
    variants is paired with the same variant there instead."""
    by_name = dict(found)
    lines = []
    for name, records in found:
        note = next((r for _, r in records if "paired_with" in r), None)
        if note is None or note["paired_with"] not in by_name:
            continue
        other = note["paired_with"]
        label = lambda r, folder: (r["variant"] + (f", {r['budget']}" if r.get("budget") not in (None, "both") else "")
                                   + f" ({folder})")
        order = lambda v: (_variant_order(v.split(" ")[0].rstrip(",")), v)
        if note.get("pair") == "same-variant":
            mine = [r | {"variant": label(r, name)} for r in quality_runs(records)]
            theirs = [r | {"variant": label(r, other)} for r in quality_runs(by_name[other])]
            pairs = [(v, v.replace(f"({name})", f"({other})")) for v in sorted({r["variant"] for r in mine}, key=order)]
        else:
            mine = [r | {"variant": f"igl-dt ({name})"} for r in quality_runs(records) if r["variant"] == "igl-dt"]
            theirs = [r | {"variant": label(r, other)} for r in quality_runs(by_name[other])
                      if r["variant"] in BASELINES]
            pairs = [(mine[0]["variant"], v) for v in sorted({r["variant"] for r in theirs}, key=order)]
        lines += [f"### `{name}` against `{other}`", "", note.get("why", ""), ""]
        lines += _means(mine + theirs, pairs, name, f"`{name}`", headlines) + [""]
    return lines


# ---- speed, networks, data ---------------------------------------------------------------------------------------

def measured(found, marker):
    """(source name, its measurements holding `marker`) for each source that has any."""
    for name, records in found:
        found_here = [m for _, r in records for m in measurements(r, marker)]
        if found_here:
            yield name, found_here


def settings_header(name, settings):
    return [f"### `{name}`", "", "Settings: " + (scalar(settings) if settings else NOT_RECORDED) + ".", ""]


def speed_section(found, headlines):
    lines = []
    for name, steps in measured(found, "seconds_per_step"):
        for m in steps:  # the kind, precision and setting: the record's own keys, else the keys that lead to it
            names = [k for k in m["path"] if k not in PRECISIONS and k not in COMPARED and k != "kinds"]
            m["kind"] = m.get("kind") or (names[-1] if names else "step")
            m["amp"] = precision(m.get("amp") or next((k for k in m["path"] if k in PRECISIONS), None)
                                 or m.get("settings", {}).get("amp"))
            m["setting"] = next((COMPARED[k] for k in m["path"] if k in COMPARED), None)
        compared = any(m["setting"] for m in steps)  # a --compare compile or channels-last record: say which is which
        split = any("breakdown" in m for m in steps)  # --breakdown: matrix products against the rest
        base = {(m["amp"], m["setting"]): m["seconds_per_step"] for m in steps if m["kind"] == "supervised"}
        lines += settings_header(name, steps[0].get("settings", {}))
        notes = sorted({m["note"] for m in steps if isinstance(m.get("note"), str)})  # the record's own words
        lines += [f"Note: {note.rstrip('.')}." for note in notes] + ([""] if notes else [])
        rows = []
        for m in sorted(steps, key=lambda m: (list(STEP_NAMES).index(m["kind"]) if m["kind"] in STEP_NAMES else 9,
                                              m["kind"], str(m["amp"]), str(m["setting"]))):
            supervised = base.get((m["amp"], m["setting"]))
            over = m["seconds_per_step"] / supervised if supervised else None
            command = command_text(m["command"]) if m.get("command") else rebuilt_command(
                "speed", m.get("settings", {}), [("dataset", "dataset"), ("device", "device"), ("amp", "amp"),
                                                 ("iters", "iters"), ("warmup", "warmup")])
            rows.append([STEP_NAMES.get(m["kind"], m["kind"]), m["amp"]] + ([m["setting"] or "—"] if compared else [])
                        + [number(m["seconds_per_step"], 4), rate(m.get("images_per_s")),
                           mebibytes(m.get("peak_mem_mb")), number(over) if over else "—"]
                        + ([time_split(m.get("breakdown"))] if split else [])
                        + [command, commit_text(m), machine_text(m.get("machine"))])
            if m["kind"] in STAGE_2_HEADLINES and over:
                headlines.append(f"{name}: {STAGE_2_HEADLINES[m['kind']]} {number(m['seconds_per_step'], 4)} s a "
                                 f"step, {number(over)} x the supervised step ({m['amp']}), peak "
                                 f"{mebibytes(m.get('peak_mem_mb'))}")
            if m["kind"] == "teachers":
                headlines.append(f"{name}: stage 1 (teachers) {number(m['seconds_per_step'], 4)} s a step, peak "
                                 f"{mebibytes(m.get('peak_mem_mb'))} ({m['amp']})")
        lines += table(["step", "amp"] + (["setting"] if compared else []) + ["s / step", "images/s", "peak memory",
                                                                              "vs supervised"]
                       + (["matrix products + rest, s"] if split else []) + ["command", "commit", "machine"], rows)
        lines += [""]
        lines += speedup_lines(dict(found)[name]) + footnote_commit(name) + [""]
    return lines


def time_split(breakdown):
    """bench/speed.py --breakdown's seconds per step in matrix products and in the rest, as 'a + b'."""
    if not breakdown:
        return "—"
    return f"{number(breakdown['matrix_products_s'], 3)} + {number(breakdown['other_s'], 3)}"


def speedup_lines(records):
    """The ratios a --compare record states (seconds per step of the first setting / of the second), one line each."""
    lines = []
    for _, record in records:
        for key, ratios in sorted(record.items()):
            if key.startswith("speedup_") and isinstance(ratios, dict):
                second, first = key[len("speedup_"):].split("_vs_")
                steps = "; ".join(f"{STEP_NAMES.get(kind, kind)} {number(ratio)}" for kind, ratio in ratios.items())
                a, b = COMPARED.get(first, first), COMPARED.get(second, second)
                source = record.get("speedup_from", "both from one invocation")
                lines.append(f"Speed-up of {b} over {a} (seconds per step {a} / {b}, {source}): {steps}.")
                kinds = record.get("kinds", {})
                if "speedup_from" in record and first in kinds and second in kinds:  # and the table's own ratios
                    seconds = lambda label, kind: kinds[label][kind]["seconds_per_step"]
                    alone = "; ".join(f"{STEP_NAMES.get(kind, kind)} {number(seconds(first, kind) / seconds(second, kind))}"
                                      for kind in ratios if kind in kinds[first] and kind in kinds[second])
                    lines.append(f"From the table (each setting alone in its own process): {alone}.")
    return lines + ([""] if lines else [])


def models_section(found, headlines):
    lines = []
    for name, nets in measured(found, "params"):
        lines += settings_header(name, nets[0].get("settings", {}))
        rows = []
        for m in sorted(nets, key=lambda m: m.get("network", m["path"][-1] if m["path"] else "")):
            net = m.get("network", m["path"][-1] if m["path"] else "network")
            command = command_text(m["command"]) if m.get("command") else rebuilt_command(
                "model_speed", m.get("settings", {}), [("device", "device"), ("amp", "amp"), ("crop", "crop"),
                                                       ("batch", "batch"), ("iters", "iters"), ("warmup", "warmup")])
            rows.append([f"`{net}`", number(m["params"] / 1e6, 1) + " M", number(m.get("gflops_per_image"), 1),
                         rate(m.get("images_per_s")), mebibytes(m.get("peak_mem_mb")), command,
                         commit_text(m), machine_text(m.get("machine"))])
            headlines.append(f"{name}: {net} {rate(m.get('images_per_s'))} images/s forward + backward, "
                             f"peak {mebibytes(m.get('peak_mem_mb'))}")
        lines += table(["network", "parameters", "GFLOPs / image", "forward + backward images/s", "peak memory",
                        "command", "commit", "machine"], rows) + [""] + footnote_commit(name) + [""]
    return lines


def data_section(found, headlines):
    lines = []
    for name, records in found:
        pipes = [m for _, r in records for m in measurements(r, "samples_per_s_by_workers")]
        rows = []
        for m in pipes:
            machine = m.get("machine") or {"cpus": m.get("cpus"), "load_average": m.get("load_average")}
            command = command_text(m["command"]) if m.get("command") else rebuilt_command(
                "data_speed", m, [("crop", "crop"), ("batch", "batch"), ("samples", "samples")],
                fixed=["--data-root DIR"])
            for workers, rate in sorted(m["samples_per_s_by_workers"].items(), key=lambda kv: int(kv[0])):
                rows.append([str(m.get("pipeline", "—")), workers, number(rate, 1),
                             scalar(m.get("image_size", "—")), scalar(m.get("crop", "—")),
                             scalar(m.get("batch", "—")), command, commit_text(m), machine_text(machine)])
                headlines.append(f"{name}: {number(rate, 1)} samples/s with {workers} loader workers")
        if rows:
            lines += [f"### `{name}`", ""] + table(["pipeline", "workers", "samples/s", "images", "crop", "batch",
                                                    "command", "commit", "machine"], rows)
            lines += [""] + footnote_commit(name) + [""]
    return lines


def train_section(found, headlines):
    """Whole train.py runs (the quick start, say): the student's mIoU and the wall time of each."""
    lines = []
    for name, records in found:
        rows = []
        for _, r in sorted(records, key=lambda wr: (wr[1].get("seed", 0), wr[1].get("amp", ""))):
            rows.append([command_text(r["command"]), precision(r.get("amp")), scalar(r.get("seed", "—")),
                         number(r["miou_last"]), number(r.get("miou_best")) if r.get("miou_best") is not None
                         else "—", number(r.get("wall_s"), 1) if r.get("wall_s") is not None else "—",
                         "yes" if r.get("machine_alone") else "no", commit_text(r), machine_text(r.get("machine"))])
            headlines.append(f"{name}: seed {r.get('seed')} {precision(r.get('amp'))}: student mIoU "
                             f"{number(r['miou_last'])} in {number(r.get('wall_s'), 1)} s")
        if rows:
            lines += [f"### `{name}`", ""] + table(["command", "amp", "seed", "student mIoU", "best", "wall s",
                                                    "machine alone", "commit", "machine"], rows) + [""]
            lines += whole_run_pairs([r for _, r in records])
    return lines


def whole_run_pairs(runs):
    """For whole runs in bf16 and in fp32 of the same seeds, one line: the mIoU difference paired by seed with its
    interval, and the mean wall times of the runs that had the machine alone; the same for runs channels-last and
    NCHW (records with a "channels_last" key). Nothing for other shapes."""
    layout = lambda r: None if "channels_last" not in r else "channels-last" if r["channels_last"] else "NCHW"
    return (paired_runs(runs, lambda r: precision(r.get("amp")), "bf16", "fp32", "in bf16")
            + paired_runs(runs, layout, "channels-last", "NCHW", "channels-last"))


def paired_runs(runs, setting_of, first, second, faster_words):
    by = {}
    for r in runs:
        by.setdefault(setting_of(r), {})[r.get("seed", 0)] = r
    if set(by) != {first, second}:
        return []
    seeds = sorted(set(by[first]) & set(by[second]))
    if not seeds:
        return []
    figure = lambda setting, key: {seed: by[setting][seed][key] for seed in seeds}
    difference = paired(figure(first, "miou_last"), figure(second, "miou_last"))
    line = (f"- {first} minus {second}, paired by seed ({', '.join(map(str, seeds))}): student mIoU "
            f"{interval_text(difference)}")
    alone = [seed for seed in seeds if all(by[setting][seed].get("machine_alone") and by[setting][seed].get("wall_s")
                                           for setting in (first, second))]
    if alone:
        wall = {setting: statistics.mean(by[setting][seed]["wall_s"] for seed in alone) for setting in (first, second)}
        line += (f"; wall time {number(wall[first], 1)} against {number(wall[second], 1)} s "
                 f"({number(wall[second] / wall[first])} x faster {faster_words}, mean over the runs with the machine "
                 f"alone)")
    return [line + ".", ""]


# ---- the page ----------------------------------------------------------------------------------------------------

def render(results=RESULTS):
    """(the README's text, the headline lines to print) for the records under `results`."""
    found = sources(results)
    headlines = []
    beat, parts = quality_sections(found.get("quality", []), headlines)
    none = ["No current record.", ""]
    page = ["# Benchmark results", "",
            "Generated by `python bench/report.py` from the records in this folder: edit the records, not this file "
            "(`python bench/report.py --check` fails when the two disagree). How each benchmark is run, and what it "
            "measures: `bench/README.md`.", "", "## Naming", "", NAMING, "",
            "Commands are shown without `--out`, `--splits-dir` and `--teachers-from` (where the run wrote its "
            "files and found its teachers; the full command is in the record), with the data directory written "
            "as its name in capitals. † marks a command rebuilt "
            "from the record's settings, for records that hold none.", "",
            "## Does IGL-DT beat supervised training?", "",
            "`bench/quality.py`: the student's val mIoU after its last epoch (no checkpoint chosen on val), each "
            "variant under the budget its heading names (the same student epochs, or the compute of an IGL-DT run), "
            "and IGL-DT minus each baseline, paired by seed, with its 95 % t-interval.", ""]
    page += (beat + cross_folder_sections(found.get("quality", []), headlines)) or none
    page += ["## What does each part add?", "", "The ablations of `bench/quality.py`, against IGL-DT of the same seed "
             "and the same records.", ""] + (parts or none)
    page += ["## What does each step cost?", "", "`bench/speed.py`: one training step of each kind on random "
             "tensors at one size; vs supervised is its time over the supervised step's at the same precision.",
             ""] + (speed_section(found.get("speed", []), headlines) or none)
    page += ["## The networks", "", "`bench/model_speed.py`: each network alone, at its default widths.", ""] + \
        (models_section(found.get("model_speed", []), headlines) or none)
    page += ["## The data pipeline", "", "`bench/data_speed.py`: the unlabeled pipeline (decode, weak and strong "
             "views, ignore mask, CutMix box).", ""] + (data_section(found.get("data_speed", []), headlines) or none)
    page += ["## Whole runs", "", "`python train.py ...` end to end: the student's last mIoU and the wall time "
             "(a wall time counts only where the machine ran nothing else).", ""] + \
        (train_section(found.get("train", []), headlines) or none)
    unknown = [name for name, _ in found.get(None, [])]
    if unknown:
        page += ["## Not read", "", "These names follow no known script's name, so no table reads them: " +
                 ", ".join(f"`{n}`" for n in unknown) + ".", ""]
    archived = sorted(p.name for p in (results / "archive").iterdir()) if (results / "archive").is_dir() else []
    if archived:
        page += ["## Archive", "", "Superseded results, kept with the story of what they showed "
                 "(`archive/HISTORY.md`): " + ", ".join(f"`archive/{n}`" for n in archived) + ".", ""]
    text = "\n".join(page).rstrip() + "\n"
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text, headlines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if bench/results/README.md is out of date")
    args = p.parse_args(argv)
    text, headlines = render()
    target = RESULTS / "README.md"
    if args.check:
        if not target.exists() or target.read_text() != text:
            print("bench/results/README.md is out of date: run python bench/report.py", file=sys.stderr)
            return 1
        print("bench/results/README.md is up to date")
        return 0
    target.write_text(text)
    print("\n".join(headlines))
    print("wrote bench/results/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
