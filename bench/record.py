"""The one shape of every benchmark record, and where it came from: the command, the commit and the machine.

Every script in bench/ that measures prints or writes its records one JSON object per line, each of this shape:

    question  the script that measured it: quality, speed, model_speed, data_speed, pseudo_labels; train for
              whole train.py runs
    variant   what was measured: a quality variant (igl-dt, supervised, ...), a step kind, a network, a pipeline,
              the setting a whole-run comparison varies (bf16, fp32)
    seed      the seed, or null where none was drawn
    settings  {name: value}: the settings that set this record apart (flags given, precision, budget, sizes)
    metrics   {name: value}: what was measured, a number each, or {name: number} for a breakdown (per class, per op)
    curve     [{"stage", "epoch", name: value, ...}]: a run's figures at each evaluation, its epoch counted
              within its stage (the student's epochs from 1); [] where the script measures no curve
    command   the command that produced it, as typed from the repository root
    commit    `git rev-parse --short HEAD`, `+dirty` when tracked files differed; null where unknown
    machine   {"device", "cpus", "torch_threads", "torch", "load_average"}, the load at the moment of measuring
    note      (optional) one sentence a reader needs beside the figures

`bench/report.py` groups the records by question and settings into `bench/results/README.md`, each row with its
command, commit and machine, so that a figure can be traced to the code and the machine that measured it.
"""
import os
import platform
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def record(question, variant, seed, settings, metrics, command, device="cpu", curve=(), note=None):
    """One record of the shape above, with this checkout's commit and this machine."""
    found = {"question": question, "variant": variant, "seed": seed, "settings": settings, "metrics": metrics,
             "curve": list(curve), "command": command} | machine_and_commit(device)
    return found | ({"note": note} if note else {})


def commit():
    """Short hash of the checked-out commit (`git rev-parse --short HEAD`), `+dirty` appended when tracked files
    differ from it; None where git or the repository is not there (a copied tree, an exported tarball)."""
    def git(*args):
        return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def command():
    """The command line that started this process, as one would type it from the repository root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO)
    return shlex.join(["python", script, *sys.argv[1:]])


def machine(device="cpu"):
    """The accelerator (or CPU model), core count, torch version and threads, and the load average at the
    moment of measuring (a busy machine is slower, so a timing record keeps it)."""
    import torch  # here, so that bench/report.py can import this module without torch
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
        except OSError:
            pass
    return {"device": name, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_average": round(os.getloadavg()[0], 2)}


def machine_and_commit(device="cpu"):
    """{"commit": commit(), "machine": machine(device)}: the two keys every record carries."""
    return {"commit": commit(), "machine": machine(device)}
