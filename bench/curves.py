"""Learning curves of bench/quality.py's runs, drawn as SVG by hand: the student's epoch against its val mIoU at
each evaluation, one colour per variant, the mean over its seeds a solid line and each seed a faint one.

    curves = student_curves(records)          # {label: {seed: [(epoch, miou), ...]}} from the records' "curve"
    Path("curves.svg").write_text(draw(curves, "quality_cpu_camvid"))

The mean is taken at the epochs every seed of the variant was evaluated at. Standard library only (no plotting
library): the axes map linearly, x = LEFT + (epoch - x0) / (x1 - x0) * plot width, and y the same upwards, so a
reader (or a test) gets each value back from a point's coordinates and the tick labels.
"""
import math
from statistics import mean

WIDTH, PLOT_HEIGHT = 640, 300
LEFT, RIGHT, TOP, BOTTOM = 56, 20, 34, 46  # the plot's margins; the legend goes under the x axis
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]


def student_curves(records, suffix=""):
    """{label: {seed: [(student epoch, val mIoU)]}}: each variant's (and budget's) curves, from the points of stage
    "student" that hold "miou_val"; `suffix` is added to every label (the folder, in a figure of several)."""
    curves = {}
    for r in records:
        points = [(p["epoch"], p["miou_val"]) for p in r.get("curve", [])
                  if p.get("stage") == "student" and p.get("miou_val") is not None]
        if points:
            budget = r["settings"].get("budget")
            label = r["variant"] + (f", {budget}" if budget else "") + suffix
            curves.setdefault(label, {})[r["seed"]] = sorted(points)
    return curves


def mean_curve(seeds):
    """The mean over seeds at the epochs every seed has."""
    epochs = sorted(set.intersection(*(set(e for e, _ in points) for points in seeds.values())))
    values = [dict(points) for points in seeds.values()]
    return [(e, mean(v[e] for v in values)) for e in epochs]


def ticks(low, high, count=6):
    """Round tick values (1, 2 or 5 times a power of ten apart) that cover [low, high], at least two."""
    rough = max(high - low, 1e-9) / count
    power = 10 ** math.floor(math.log10(rough))
    step = next(s * power for s in (1, 2, 5, 10) if s * power >= rough)
    first = math.floor(low / step)
    return [round(i * step, 10) for i in range(first, max(math.ceil(high / step), first + 1) + 1)]


def draw(curves, title):
    """The SVG text of `curves` ({label: {seed: [(epoch, value)]}}): axes with ticks and labels, a legend."""
    points = [p for seeds in curves.values() for s in seeds.values() for p in s]
    xs, ys = ticks(0, max(e for e, _ in points)), ticks(min(v for _, v in points), max(v for _, v in points))
    width, height = WIDTH - LEFT - RIGHT, PLOT_HEIGHT
    total = TOP + height + BOTTOM + 18 * len(curves) + 8
    x = lambda e: LEFT + (e - xs[0]) / (xs[-1] - xs[0]) * width
    y = lambda v: TOP + height - (v - ys[0]) / (ys[-1] - ys[0]) * height
    line = lambda pts: " ".join(f"{x(e):.2f},{y(v):.2f}" for e, v in pts)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{total}" '
           f'viewBox="0 0 {WIDTH} {total}" font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{total}" fill="white"/>',
           f'<text x="{LEFT}" y="20" font-size="14">{escape(title)}</text>',
           f'<rect x="{LEFT}" y="{TOP}" width="{width}" height="{height}" fill="none" stroke="black"/>']
    for e in xs:  # x ticks under the plot, y ticks left of it, each with its value
        out.append(f'<g class="x-tick"><line x1="{x(e):.2f}" y1="{TOP + height}" x2="{x(e):.2f}" '
                   f'y2="{TOP + height + 5}" stroke="black"/><text x="{x(e):.2f}" y="{TOP + height + 18}" '
                   f'text-anchor="middle">{e:g}</text></g>')
    for v in ys:
        out.append(f'<g class="y-tick"><line x1="{LEFT - 5}" y1="{y(v):.2f}" x2="{LEFT + width}" y2="{y(v):.2f}" '
                   f'stroke="#ddd"/><text x="{LEFT - 8}" y="{y(v) + 4:.2f}" text-anchor="end">{v:g}</text></g>')
    out += [f'<text x="{LEFT + width / 2}" y="{TOP + height + 36}" text-anchor="middle">student epoch</text>',
            f'<text transform="translate(16 {TOP + height / 2}) rotate(-90)" text-anchor="middle">val mIoU (%)</text>']
    for i, (label, seeds) in enumerate(curves.items()):
        colour, name = COLOURS[i % len(COLOURS)], escape(label)
        for seed, pts in sorted(seeds.items(), key=lambda kv: str(kv[0])):
            out.append(f'<polyline class="seed" data-label="{name}" data-seed="{seed}" points="{line(pts)}" '
                       f'fill="none" stroke="{colour}" stroke-opacity="0.3" stroke-width="1"/>')
        out.append(f'<polyline class="mean" data-label="{name}" points="{line(mean_curve(seeds))}" fill="none" '
                   f'stroke="{colour}" stroke-width="2.5"/>')
        top = TOP + height + BOTTOM + 18 * i + 6  # the legend: a line of the colour, the label, its seeds
        out += [f'<line x1="{LEFT}" y1="{top}" x2="{LEFT + 24}" y2="{top}" stroke="{colour}" stroke-width="2.5"/>',
                f'<text x="{LEFT + 30}" y="{top + 4}">{name}, mean of {len(seeds)} seed{"s" if len(seeds) > 1 else ""}'
                f' (faint: each seed)</text>']
    return "\n".join(out + ["</svg>"]) + "\n"


def escape(text):
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
