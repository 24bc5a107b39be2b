"""What every benchmark record says about where it came from: the command, the commit and the machine.

    record = {...measurements...} | machine_and_commit(device)
    record["command"] = command()

`bench/report.py` puts these three in every row of `bench/results/README.md`, so a figure can be traced to the
code and the machine that measured it. The commit is that of the checkout the benchmark ran in; a tree with
uncommitted changes is marked `+dirty`, because its figures belong to no commit.
"""
import os
import platform
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    """{"machine": machine(device), "commit": commit()}: the two keys every record carries."""
    return {"machine": machine(device), "commit": commit()}
