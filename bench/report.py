"""Writes bench/results/README.md from the records under bench/results/, so that no figure in the docs drifts from
its record, and draws each quality benchmark's learning curves beside its records (FOLDER/curves.svg).

    python bench/report.py                # rewrite README.md and the figures; print the comparisons
    python bench/report.py --check        # exit 1 if README.md or a figure is not what the records give
    python bench/report.py --print DIR    # one folder's table and comparisons (what bench/quality.py prints)

Every record has bench/record.py's one shape; a result is `<name>.jsonl` or `<name>/records.jsonl` directly under
bench/results/ (archive/ is listed, not read). The page is a group-by: a section per question, a table per result
with a row per record (the settings every row shares above it, the others as columns), then the comparisons the
question makes (QUESTIONS), paired by seed with a 95 % t-interval (bench/stats.py), and those a folder's
`paired_with.json` ({"paired_with": NAME, "why": ..., "pairs": [[variant here, variant there], ...]}) asks of
another folder. `figures.json` ({NAME: {"folders": [...], "why": ...}}) draws the curves of several folders in one
figure, NAME.svg: a plateau study, the same variant at several budgets. Standard library only; the output depends
on the records alone.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script or loaded from its file
from bench.curves import draw, student_curves  # noqa: E402
from bench.stats import interval_text, paired  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ORDER = ["supervised", "teachers", "igl-dt", "igl-dt-frozen", "ema", "no-gcl", "no-lrl", "no-dl", "swin-only",
         "res-only"]  # rows in this order, then any other variant by name
PLAIN = {"amp": "off", "compile": False, "channels_last": False}  # what a compared setting's speed-up is over


def fmt(value, digits=2, scale=1, unit=""):
    """A figure with `digits` decimals; digits None: three significant digits or more (0.81, 14.0, 246.1)."""
    if value is None:
        return "—"
    return f"{value / scale:.{(2 if value / scale < 10 else 1) if digits is None else digits}f}{unit}"


def metric(key, digits=2, scale=1, unit=""):
    return lambda r, rows: fmt(r["metrics"].get(key), digits, scale, unit)


def ratio(key, reference, speed_up=False):
    """This row's `key` over that of its reference row (`reference(r, rows)`: variant, settings, seed), or, for a
    speed-up, the reference's over this one's where the row is not its own reference."""
    def cell(r, rows):
        ref = next((o for o in rows if (o["variant"], o["settings"], o["seed"]) == reference(r, rows)), None)
        a, b = r["metrics"].get(key), ref and ref["metrics"].get(key)
        return "—" if not a or not b or (speed_up and ref is r) else fmt(b / a if speed_up else a / b)
    return cell


def supervised(r, rows):
    return "supervised", r["settings"], r["seed"]


def plain(r, rows):
    """The same variant at the plain value of each setting the rows compare (amp, compile, channels_last)."""
    compared = {k for k in PLAIN if len({json.dumps(o["settings"].get(k)) for o in rows}) > 1}
    return r["variant"], r["settings"] | {k: PLAIN[k] for k in compared}, r["seed"]


# Each question's section: its columns (header, cell of a row), the pairs of variants it compares by seed, the
# figures compared (the first with each seed's difference), and how the mean wall times read (unit, seconds in
# one, whether to give the speed-up).
QUESTIONS = {
    "quality": dict(
        title="Does IGL-DT beat supervised training, and what does each part add?",
        intro="`bench/quality.py`: the student's mIoU after its last epoch on val and on the dev set. IGL-DT meets "
              "the baselines of every budget; a run that took igl-dt's teachers (`--teachers-from`) or was resumed "
              "has a part wall time, left out of the means.",
        columns=[("val mIoU", metric("miou_val")), ("dev mIoU", metric("miou_dev")),
                 ("wall min", metric("wall_s", 1, 60)), ("part wall min", metric("wall_s_partial", 1, 60))],
        pairs=[("igl-dt", "supervised"), ("ema", "supervised"), ("igl-dt", "ema"), ("no-gcl", "igl-dt"),
               ("no-lrl", "igl-dt"), ("no-dl", "igl-dt"), ("swin-only", "igl-dt"), ("res-only", "igl-dt")],
        compare=[("miou_val", "val mIoU"), ("miou_dev", "on the dev set")], wall=("min", 60, False)),
    "speed": dict(
        title="What does each step cost?",
        intro="`bench/speed.py`: a training step of each kind (its `--help` says which). vs supervised: its time "
              "over the supervised step's; speed-up: the plain setting's (fp32, eager, NCHW) over this one's, from "
              "the table and from the medians of steps taken in turns (`--interleave`).",
        columns=[("s / step", metric("seconds_per_step", 4)), ("images/s", metric("images_per_s", None)),
                 ("peak memory", metric("peak_mem_mb", 0, unit=" MiB")),
                 ("vs supervised", ratio("seconds_per_step", supervised)),
                 ("matrix products s", metric("matrix_products_s", 3)), ("the rest s", metric("other_s", 3)),
                 ("speed-up", ratio("seconds_per_step", plain, speed_up=True)),
                 ("speed-up, interleaved", ratio("interleaved_median_s", plain, speed_up=True))]),
    "model_speed": dict(
        title="The networks", intro="`bench/model_speed.py`: each network alone, at its default widths.",
        columns=[("parameters", metric("params", 1, 1e6, " M")), ("GFLOPs / image", metric("gflops_per_image", 1)),
                 ("forward + backward images/s", metric("images_per_s", None)),
                 ("peak memory", metric("peak_mem_mb", 0, unit=" MiB"))]),
    "data_speed": dict(
        title="The data pipeline", intro="`bench/data_speed.py`: the unlabeled pipeline (decode, weak and strong "
                                         "views, ignore mask, CutMix box).",
        columns=[("samples/s", metric("samples_per_s", 1))]),
    "train": dict(
        title="Whole runs", intro="`python train.py ...` end to end; a part wall time where the machine was shared.",
        columns=[("student mIoU", metric("miou_val")), ("best", metric("miou_best")), ("wall s", metric("wall_s", 1)),
                 ("part wall s", metric("wall_s_partial", 1))],
        pairs=[("bf16", "fp32"), ("channels-last", "NCHW")], compare=[("miou_val", "student mIoU")],
        wall=("s", 1, True)),
}


def read(path):
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        sys.exit(f"error: {path} is not JSON lines: {error}")


def sources(results):
    """({name: records} of every result under `results`, [names that hold no records])."""
    found, unread = {}, []
    for path in sorted(results.iterdir()):
        file = path / "records.jsonl" if path.is_dir() else path
        if file.suffix == ".jsonl" and file.is_file():
            found[path.name] = read(file)
        elif path.name not in ("archive", "README.md", "figures.json") and path.suffix != ".svg":
            unread.append(path.name)
    return found, unread


# ---- a result: its table and its comparisons -------------------------------------------------------------------

def table(name, records):
    """The settings every record shares, the records' notes, and a row per record (no column empty in all rows)."""
    spec = QUESTIONS[records[0]["question"]]
    rows = sorted(records, key=lambda r: (ORDER.index(r["variant"]) if r["variant"] in ORDER else len(ORDER),
                                          r["variant"], json.dumps(r["settings"], sort_keys=True), str(r["seed"])))
    keys = sorted({k for r in rows for k in r["settings"]})
    shared = [k for k in keys if len({json.dumps(r["settings"].get(k, "—")) for r in rows}) == 1]
    varying = [k for k in keys if k not in shared]
    header = ["variant", "seed", *varying, *(h for h, _ in spec["columns"]), "command", "commit", "machine"]
    cells = [[f"`{r['variant']}`", "—" if r["seed"] is None else str(r["seed"])]
             + [text(r["settings"][k]) if k in r["settings"] else "—" for k in varying]
             + [cell(r, rows) for _, cell in spec["columns"]]
             + [command_text(r["command"]), f"`{r['commit']}`" if r["commit"] else "not recorded",
                machine_text(r["machine"])] for r in rows]
    keep = [i for i in range(len(header)) if any(row[i] != "—" for row in cells)]
    lines = [f"### `{name}`", ""] + ["Settings: " + ", ".join(f"{k} {text(rows[0]['settings'][k])}" for k in shared)
                                     + "."] * bool(shared)
    lines += [f"Note: {note.rstrip('.')}." for note in dict.fromkeys(r["note"] for r in rows if r.get("note"))]
    lines += ["", "| " + " | ".join(header[i] for i in keep) + " |", "|" + "---|" * len(keep)]
    return lines + ["| " + " | ".join(row[i] for i in keep) + " |" for row in cells] + [""]


def comparisons(mine, theirs, pairs, spec, here="", there=""):
    """A line per pair (a variant of `mine`, one of `theirs`), one per budget of each: bench/quality.py sets a
    baseline's epochs by its budget, so a group of a budget meets those of the same budget or of none."""
    def groups(records, variant, where):
        found = {}
        for r in records:
            if r["variant"] == variant:
                found.setdefault(r["settings"].get("budget"), []).append(r)
        return [(variant + (f", {b}" if b else "") + where, b, runs) for b, runs in sorted(found.items(), key=str)]
    lines = []
    for a, b in pairs:
        for a_label, a_budget, a_runs in groups(mine, a, here):
            for b_label, b_budget, b_runs in groups(theirs, b, there):
                if (None in (a_budget, b_budget) or a_budget == b_budget) and a_runs is not b_runs:
                    lines += compare(a_label, a_runs, b_label, b_runs, spec)
    return lines


def compare(a_label, a_runs, b_label, b_runs, spec):
    """'- `a` mean against `b` mean: a - b [95 % interval] (figure, seeds: each seed's a - b); each further figure's
    a - b; the mean wall times of the whole runs of the paired seeds.'"""
    figure = lambda runs, key: {r["seed"]: r["metrics"][key] for r in runs if r["metrics"].get(key) is not None}
    (key, label), *others = spec["compare"]
    mine, theirs = figure(a_runs, key), figure(b_runs, key)
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        return []
    each = ": " + ", ".join(f"{mine[s] - theirs[s]:+.2f}" for s in seeds) if len(seeds) > 1 else ""
    line = (f"- `{a_label}` {fmt(statistics.mean(mine[s] for s in seeds))} against `{b_label}` "
            f"{fmt(statistics.mean(theirs[s] for s in seeds))}: {interval_text(paired(mine, theirs))} ({label}, "
            f"{seed_text(seeds)}{each})")
    for key, label in others:
        a, b = figure(a_runs, key), figure(b_runs, key)
        if set(a) & set(b):
            line += f"; {label} {interval_text(paired(a, b))} ({seed_text(sorted(set(a) & set(b)))})"
    walls = [[r["metrics"]["wall_s"] for r in runs if r["seed"] in seeds and "wall_s" in r["metrics"]]
             for runs in (a_runs, b_runs)]
    unit, scale, speed_up = spec["wall"]
    if all(walls):
        a, b = (statistics.mean(w) for w in walls)
        line += f"; {fmt(a, 1, scale)} and {fmt(b, 1, scale)} {unit} a run" + f", {b / a:.2f} x faster" * speed_up
    return [line + "."]


def seed_text(seeds):
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def text(value):
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def command_text(command):
    """A command without where it wrote and found its files (--out, --splits-dir, --teachers-from), its data
    directory as its name in capitals (the path was the machine's), and a flag given twice once, with the value
    that counts (bench/quality.py passes the budget's --student-epochs after those given to it)."""
    words, shown, skip = command.split(), [], False
    for i, word in enumerate(words):
        has_value = word.startswith("--") and i + 1 < len(words) and not words[i + 1].startswith("--")
        if skip:
            skip = False
        elif word in ("--out", "--splits-dir", "--teachers-from") or (has_value and word in words[i + 2:]):
            skip = True
        else:
            shown.append(Path(word).name.upper() if i and words[i - 1] == "--data-root" else word)
    return "`" + " ".join(shown).replace("|", "\\|") + "`"


def machine_text(m):
    return ", ".join(["CPU" if m.get("device", "cpu") in ("", "cpu") else m["device"]]
                     + [f"{m['cpus']} cores"] * bool(m.get("cpus")) + [f"torch {m.get('torch')}"] * bool(m.get("torch"))
                     + [f"load {m.get('load_average')}"] * (m.get("load_average") is not None))


def section(name, records):
    """A result's table and comparisons: its part of the page, and what bench/quality.py prints."""
    spec = QUESTIONS[records[0]["question"]]
    return table(name, records) + comparisons(records, records, spec.get("pairs", []), spec) + [""]


# ---- the page ----------------------------------------------------------------------------------------------------

def render(results=RESULTS):
    """(the README's text, {path: SVG text} of its figures, the comparison lines) of the records under `results`."""
    found, unread = sources(results)
    figures, page = {}, ["# Benchmark results", "", "Written by `python bench/report.py` from the records here "
                         "(`--check` fails where they disagree); what each benchmark measures and how to run it: "
                         "`bench/README.md`. Differences are paired by seed: mean [95 % t-interval], each seed's "
                         "after the colon. Commands are shown without where they wrote, the data as its name.", ""]
    for question, spec in QUESTIONS.items():
        names = [name for name, records in found.items() if records and records[0]["question"] == question]
        page += [f"## {spec['title']}", "", spec["intro"], ""] + ["No current record.", ""] * (not names)
        for name in names:
            page += section(name, found[name])
            if student_curves(found[name]):
                figures[results / name / "curves.svg"] = draw(student_curves(found[name]), name)
                page += [f"![{name}: val mIoU at each evaluation, by student epoch]({name}/curves.svg)", ""]
        for name in names:  # a folder run under other settings, paired by seed with another folder's runs
            with_file = results / name / "paired_with.json"
            other = json.loads(with_file.read_text()) if with_file.is_file() else {}
            if other.get("paired_with") in names:
                page += [f"### `{name}` against `{other['paired_with']}`", "", other["why"], ""]
                page += comparisons(found[name], found[other["paired_with"]], other["pairs"], spec, f" ({name})",
                                    f" ({other['paired_with']})") + [""]
    listed = json.loads((results / "figures.json").read_text()) if (results / "figures.json").is_file() else {}
    for figure, spec in sorted(listed.items()):  # the curves of several folders in one figure
        curves = {label: seeds for name in spec["folders"] if name in found
                  for label, seeds in student_curves(found[name], f" ({name})").items()}
        if curves:
            figures[results / f"{figure}.svg"] = draw(curves, figure)
            page += [f"## Learning curves: `{figure}`", "", spec["why"], "", f"![{figure}]({figure}.svg)", ""]
    if unread:
        page += ["## Not read", "", "No records here: " + ", ".join(f"`{n}`" for n in unread) + ".", ""]
    archived = sorted(p.name for p in (results / "archive").iterdir()) if (results / "archive").is_dir() else []
    if archived:
        page += ["## Archive", "", "Superseded results, with the story of what they showed (`archive/HISTORY.md`): "
                 + ", ".join(f"`archive/{n}`" for n in archived) + ".", ""]
    text = "\n".join(page).rstrip() + "\n"
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text, figures, [line for line in page if line.startswith("- ")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if README.md or a figure is not what the records give")
    p.add_argument("--print", metavar="DIR", dest="folder", help="print one folder's table and comparisons")
    args = p.parse_args(argv)
    if args.folder:
        print("\n".join(section(Path(args.folder).name, read(Path(args.folder) / "records.jsonl"))))
        return 0
    text, figures, lines = render(RESULTS)
    outputs = {RESULTS / "README.md": text} | figures
    stale = [str(path.relative_to(RESULTS)) for path, content in outputs.items()
             if not path.is_file() or path.read_text() != content]
    if args.check:
        print(f"out of date: {', '.join(stale)}; run python bench/report.py" if stale else
              "bench/results/README.md and its figures are up to date", file=sys.stderr if stale else sys.stdout)
        return 1 if stale else 0
    for path, content in outputs.items():
        path.write_text(content)
    print("\n".join(lines) + f"\nwrote bench/results/README.md and {len(figures)} figure(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
