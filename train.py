"""IGL-DT training. Stage 1: the two teachers learn together (CPS). Stage 2: the student learns from both.

    python train.py                                                  # synthetic data on the CPU, a few minutes
    python train.py --dataset voc --data-root data/VOC2012 --split 1/16 --gpus 4
    torchrun --nnodes 2 --nproc_per_node 8 train.py --dataset cityscapes --data-root data/cityscapes --split 1/8
    python train.py --out runs/voc_1_16 --resume                     # continue a stopped run exactly

Everything the method does in one iteration is in `teacher_step` and `student_step`, in the paper's order.
"""
import argparse
import copy
import itertools
import json
import os
import resource
import signal
import socket
import sys
import time
import urllib.error
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
from evaluate import build_student, denormalize, evaluate, one_line, predict, save_panel
from losses import (cps_loss, discrepancy_loss, global_context_loss, local_regional_loss, pseudo_label_loss,
                    sup_loss)
from models import ResUNet, SwinUNet, torchvision_state_dict

# The one place that maps --dataset to its defaults. VOC and Cityscapes follow the paper and the CPS / UniMatch
# recipes: ImageNet-pretrained networks, learning rates for `batch_size` labeled + `batch_size` unlabeled images
# in total (scaled linearly when --batch-size changes).
PAPER = dict(batch_size=8, backbone="resnet50", pretrained="imagenet", pretrained_swin="imagenet",
             pretrained_res="imagenet", swin_dim=96, swin_depths=[2, 2, 6, 2], res_width=64, swin_lr=1e-4,
             res_optimizer="sgd", lambda_cps=1.5, cps_rampup=0, ema_momentum=0.999, freeze_teachers=False, workers=4)
# `synthetic` and `folder` are sized for a 2-core CPU, every network from scratch. Measured on the synthetic data
# (see README): an EMA of 0.999 lags runs of a few hundred steps, so 0.99; AdamW trains the ResUNet from scratch
# far faster than SGD; and CPS at 1.5 drags the faster-learning ResUNet down to the Swin-UNet, so 0.5, ramped up.
# On CamVid (`folder`, see README Results) the student is only as good as its teachers: 20 epochs of stage 1
# instead of 3 raise the ResUNet teacher at the end of stage 1 from about 20 to about 40 val mIoU, and the
# student's gain over supervised from +2.6 to +3.9 on val (2 seeds; +1.9 on the dev set; +5.7 and +3.0 in a rerun
# after a change of float rounding: one run's val figure moves by about 5 points); the teachers are then
# frozen in stage 2, which makes it 1.7x faster and keeps a full two-seed comparison near an hour. With 26
# student epochs for both students the gain is +3.3 on val (+0.8 on dev); 10 teacher epochs gain nothing.
CPU = dict(batch_size=4, backbone="resnet18", pretrained="none", pretrained_swin="none", pretrained_res="none",
           swin_dim=48, swin_depths=[2, 2, 2, 2], res_width=32, lr=1e-2, head_lr_mult=1.0, swin_lr=2e-3,
           res_optimizer="adamw", lambda_cps=0.5, ema_momentum=0.99, threshold=0.9, region=32, eval_mode="full",
           eval_window=321, ohem=False, eval_every=3, freeze_teachers=False)
DATASET_DEFAULTS = {
    "voc": PAPER | dict(crop_size=321, teacher_epochs=20, student_epochs=60, lr=1e-3, head_lr_mult=10.0,
                        threshold=0.95, region=32, eval_mode="full", eval_window=321, ohem=False, eval_every=5),
    "cityscapes": PAPER | dict(crop_size=801, teacher_epochs=60, student_epochs=180, lr=5e-3, head_lr_mult=1.0,
                               threshold=0.0, region=64, eval_mode="sliding", eval_window=801, ohem=True,
                               eval_every=10),
    "folder": CPU | dict(crop_size=128, teacher_epochs=20, student_epochs=6, cps_rampup=3, freeze_teachers=True,
                         eval_every=5, workers=2),
    "synthetic": CPU | dict(crop_size=96, teacher_epochs=4, student_epochs=6, cps_rampup=4, workers=0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    per_dataset = " (default: per dataset, see DATASET_DEFAULTS in train.py)"
    p.add_argument("--dataset", default="synthetic", choices=list(DATASET_DEFAULTS), help="default: synthetic")
    p.add_argument("--data-root", help="dataset directory (not needed for synthetic)")
    p.add_argument("--split", default="1/8", help="labeled share 1/16|1/8|1/4|1/2, or a VOC classic count "
                   "92|183|366|732|1464 (default: 1/8)")
    p.add_argument("--splits-dir", default="splits", help="where split lists are read from or written to")
    p.add_argument("--out", help="run directory (default: runs/<dataset>_<split>_<teachers>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest.pt")
    p.add_argument("--teachers-from", metavar="RUN", help="skip stage 1: start stage 2 with the teachers of RUN, a "
                   "run directory past stage 1 with the same settings but the student's losses and epochs; gives "
                   "exactly the run a start from scratch would (to try student losses on one pair of teachers)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("method")
    g.add_argument("--teachers", default="both", choices=["both", "swin", "res", "none"],
                   help="which teachers teach; none = supervised-only baseline; a single teacher is trained "
                   "without CPS and fills both teacher roles (default: both)")
    g.add_argument("--freeze-teachers", action=argparse.BooleanOptionalAction,
                   help="stop training the teachers in stage 2 (--no-freeze-teachers: keep training them, the "
                   "paper's iterative scheme)" + per_dataset)
    g.add_argument("--lambda-u", type=float, default=1.0, help="weight of all unlabeled terms (default: 1)")
    g.add_argument("--lambda-dis", type=float, default=0.5, help="discrepancy learning, 0 = off (default: 0.5)")
    g.add_argument("--lambda-glo", type=float, default=1.0, help="global context learning, 0 = off (default: 1)")
    g.add_argument("--lambda-loc", type=float, default=1.0, help="local regional learning, 0 = off (default: 1)")
    g.add_argument("--lambda-cps", type=float, help="CPS between the teachers (CPS's VOC value 1.5; from scratch, "
                   "a teacher that learns slower drags the other down, so less on a CPU)" + per_dataset)
    g.add_argument("--cps-rampup", type=float, help="epochs over which CPS ramps up from 0" + per_dataset)
    g.add_argument("--threshold", type=float, help="confidence threshold of agreed pseudo-labels" + per_dataset)
    g.add_argument("--region", type=int, help="LRL region size in pixels" + per_dataset)
    g.add_argument("--ema-momentum", type=float, help="teachers' EMA momentum; short CPU runs need a shorter "
                   "memory" + per_dataset)
    g = p.add_argument_group("schedule and networks")
    for flag, kind in [("--teacher-epochs", int), ("--student-epochs", int), ("--batch-size", int),
                       ("--crop-size", int), ("--lr", float), ("--head-lr-mult", float), ("--swin-lr", float),
                       ("--swin-dim", int), ("--res-width", int), ("--eval-every", int), ("--workers", int)]:
        g.add_argument(flag, type=kind, help=per_dataset)
    g.add_argument("--swin-depths", type=int, nargs=4, help="blocks per Swin stage" + per_dataset)
    g.add_argument("--res-optimizer", choices=["sgd", "adamw"], help="ResUNet optimiser; adamw uses --swin-lr"
                   + per_dataset)
    g.add_argument("--backbone", choices=["resnet18", "resnet34", "resnet50", "resnet101"], help=per_dataset)
    g.add_argument("--output-stride", type=int, default=16, choices=[8, 16])
    g.add_argument("--pretrained", help="student backbone: imagenet | none | PATH to a torchvision state dict"
                   + per_dataset)
    g.add_argument("--pretrained-swin", help="imagenet | none | PATH (torchvision swin_t)" + per_dataset)
    g.add_argument("--pretrained-res", help="imagenet | none | PATH (torchvision resnet34)" + per_dataset)
    g.add_argument("--ohem", action=argparse.BooleanOptionalAction, help="OHEM supervised loss" + per_dataset)
    g.add_argument("--eval-mode", choices=["full", "sliding"], help=per_dataset)
    g.add_argument("--eval-window", type=int, help="sliding window size" + per_dataset)
    g.add_argument("--max-iters", type=int, default=0, help="cap iterations per epoch (smoke tests; 0 = none)")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--gpus", type=int, default=1, help="processes to start when not under torchrun; 0 = CPU "
                   "(with --device cpu, N > 1 starts N CPU processes over gloo, to try the distributed path)")
    g.add_argument("--amp", choices=["bf16", "fp16", "off"],
                   help="mixed precision (default: bf16 on a GPU that has it, else off)")
    args = p.parse_args(argv)
    for key, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.gpus == 0:
        args.device = "cpu"
    if args.amp is None:
        args.amp = "bf16" if args.device == "cuda" and torch.cuda.is_bf16_supported() else "off"
    args.out = args.out or f"runs/{args.dataset}_{args.split.replace('/', '_')}_{args.teachers}"
    return args


# ------------------------------------------------------------------------------------------------ helpers
def torchvision_weights(spec, arch, flag):
    """The state dict that `flag` names: 'imagenet' (downloaded through torchvision's weights API) or a file saved
    with torch.save. A missing file or a failed download (no internet, say) is a one-line error."""
    if spec != "imagenet" and not os.path.isfile(spec):
        raise data.DataError(f"{flag} {spec}: no such file (expected imagenet, none or a path)")
    try:
        return torchvision_state_dict(True if spec == "imagenet" else spec, arch)
    except urllib.error.URLError as error:
        raise data.DataError(f"{flag} imagenet: could not download torchvision's {arch} weights ({error.reason}); "
                             f"fetch them once where there is internet (torch keeps them in "
                             f"{torch.hub.get_dir()}/checkpoints), or give {flag} a PATH to a state dict, or none")


def build_networks(cfg):
    """Student S (DeepLabV3+), Swin-UNet teacher G and ResUNet teacher L as the config describes (None if unused)."""
    def weights(key, arch):  # cfg[key] is imagenet, none or a path
        return None if cfg[key] == "none" else torchvision_weights(cfg[key], arch, "--" + key.replace("_", "-"))
    student, swin, res = build_student(cfg, weights("pretrained", cfg["backbone"]) or False), None, None
    if cfg["teachers"] in ("swin", "both"):
        heads = tuple(max(1, cfg["swin_dim"] * 2 ** i // 32) for i in range(4))  # 32 channels a head, as Swin-T
        swin = SwinUNet(cfg["num_classes"], embed_dim=cfg["swin_dim"], depths=tuple(cfg["swin_depths"]),
                        num_heads=heads)
        if cfg["pretrained_swin"] != "none":
            swin.load_torchvision_swin(weights("pretrained_swin", "swin_t"))
    if cfg["teachers"] in ("res", "both"):
        w = cfg["res_width"]
        res = ResUNet(cfg["num_classes"], widths=(w, 2 * w, 4 * w, 8 * w))
        if cfg["pretrained_res"] != "none":
            res.load_torchvision_resnet(weights("pretrained_res", "resnet34"))
    return student, swin, res


def sgd(model, lr, head_lr_mult, backbone_prefixes):
    """SGD with the pretrained trunk at lr and the rest (the new head) at lr * head_lr_mult."""
    trunk = [p for n, p in model.named_parameters() if n.startswith(backbone_prefixes)]
    head = [p for n, p in model.named_parameters() if not n.startswith(backbone_prefixes)]
    groups = [dict(params=trunk, lr=lr, initial_lr=lr), dict(params=head, lr=lr * head_lr_mult,
                                                              initial_lr=lr * head_lr_mult)]
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=1e-4)


def adamw(model, lr):
    return torch.optim.AdamW([dict(params=list(model.parameters()), lr=lr, initial_lr=lr)], lr=lr, weight_decay=0.05)


def poly_lr(optimizer, iteration, total):
    """Poly schedule, per iteration: lr = initial_lr * (1 - iteration / total) ** 0.9."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * (1 - min(iteration, total - 1) / total) ** 0.9


@torch.no_grad()
def update_ema(ema, model, step, momentum):
    """ema = m * ema + (1 - m) * model, with m = min(1 - 1 / (step + 1), momentum) so early steps follow closely."""
    m = min(1 - 1 / (step + 1), momentum)
    # One call for all tensors (the per-tensor lerp_ / copy_ on each of them, in a few kernel launches on a GPU)
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - m)
    buffers = list(ema.buffers())
    if buffers:
        torch._foreach_copy_(buffers, list(model.buffers()))


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash mid-write never leaves a broken `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def epoch_indices(num_items, length, seed, epoch, rank, world):
    """This rank's sample order for one epoch: `length` items from permutations of range(num_items), repeated as
    needed (the labeled set is cycled to the unlabeled set's length), a pure function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.cat([torch.randperm(num_items, generator=generator) for _ in range(-(-length // num_items))])
    return order[:length][rank::world].tolist()


def loader(dataset, indices, batch_size, workers, device):
    return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                       num_workers=workers, drop_last=True, pin_memory=device == "cuda")


def peak_memory_mb(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # max resident set size, KiB on Linux


# ------------------------------------------------------------------------------------------------ the method
class Trainer:
    """Holds the three networks, the teachers' EMA copies, their optimisers, and one iteration of each stage."""

    def __init__(self, cfg, rank, world, device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
        student, swin, res = build_networks(cfg)
        if world > 1 and device != "cpu":  # SyncBatchNorm needs CUDA; CPU processes keep per-rank statistics
            student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
            res = res and torch.nn.SyncBatchNorm.convert_sync_batchnorm(res)
        self.student, self.swin, self.res = (m and m.to(device) for m in (student, swin, res))
        self.swin_ema, self.res_ema = (m and copy.deepcopy(m).eval().requires_grad_(False) for m in (swin, res))
        scale = cfg["batch_size"] / DATASET_DEFAULTS[cfg["dataset"]]["batch_size"]  # linear lr scaling
        lr, mult = cfg["lr"] * scale, cfg["head_lr_mult"]
        self.opt_student = sgd(self.student, lr, mult, ("backbone.",))
        self.opt_swin = swin and adamw(self.swin, cfg["swin_lr"] * scale)
        # The recipe trains the ResUNet like the student (SGD); from scratch on a CPU, AdamW trains it much faster.
        self.opt_res = res and (sgd(self.res, lr, mult, ("encoder.",)) if cfg["res_optimizer"] == "sgd"
                                else adamw(self.res, cfg["swin_lr"] * scale))
        # GradScaler only for fp16: bf16 and fp32 need no loss scaling, so their path has no special case.
        device_type = torch.device(device).type
        self.scaler_student = torch.amp.GradScaler(device_type, enabled=cfg["amp"] == "fp16")
        self.scaler_teachers = torch.amp.GradScaler(device_type, enabled=cfg["amp"] == "fp16")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[cfg["amp"]]
        self.steps = {"student": 0, "teachers": 0}
        wrap = lambda m: DistributedDataParallel(m, device_ids=None if device == "cpu" else [device]) \
            if world > 1 and m is not None else m
        self.student_ddp, self.swin_ddp, self.res_ddp = wrap(self.student), wrap(self.swin), wrap(self.res)

    def autocast(self):
        return torch.autocast(torch.device(self.device).type, dtype=self.amp_dtype or torch.bfloat16,
                              enabled=self.amp_dtype is not None)

    def uses(self, teacher):
        return self.cfg["teachers"] in (teacher, "both")

    def teacher_step(self, image, label, weak, ignore):
        """L_T = sup(G) + sup(L) + lambda_cps * CPS(G, L) on the weak unlabeled view; then both EMA copies follow."""
        cfg, n = self.cfg, image.shape[0]
        both = torch.cat([image, weak])
        losses = {}
        with self.autocast():
            logits_swin = self.swin_ddp(both) if self.uses("swin") else None
            logits_res = self.res_ddp(both) if self.uses("res") else None
        if logits_swin is not None:
            losses["sup_swin"] = sup_loss(logits_swin[:n], label)
        if logits_res is not None:
            losses["sup_res"] = sup_loss(logits_res[:n], label)
        loss = sum(losses.values())
        if logits_swin is not None and logits_res is not None:
            losses["cps"] = cps_loss(logits_swin[n:], logits_res[n:], ignore)
            # From scratch, two untrained teachers can agree on nonsense (both predicting the majority class);
            # ramping CPS up linearly over `cps_rampup` iterations lets supervision shape them first.
            rampup = min(1.0, (self.steps["teachers"] + 1) / max(1, cfg["cps_rampup_iters"]))
            loss = loss + cfg["lambda_cps"] * rampup * losses["cps"]
        optimizers = [opt for opt, t in ((self.opt_swin, "swin"), (self.opt_res, "res")) if self.uses(t)]
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self.scaler_teachers.scale(loss).backward()
        for opt in optimizers:
            self.scaler_teachers.step(opt)
        self.scaler_teachers.update()
        step, momentum = self.steps["teachers"], cfg["ema_momentum"]
        if self.uses("swin"):
            update_ema(self.swin_ema, self.swin, step, momentum)
        if self.uses("res"):
            update_ema(self.res_ema, self.res, step, momentum)
        self.steps["teachers"] += 1
        return losses

    def student_step(self, image, label, weak, strong, ignore, box):
        """L = L_l + lambda_u * (L_pl + lambda_dis * L_dis + lambda_glo * L_glo + lambda_loc * L_loc)."""
        cfg, n = self.cfg, image.shape[0]
        if cfg["teachers"] == "none":  # supervised-only baseline: the same loop, labeled images alone
            with self.autocast():
                losses = {"sup": sup_loss(self.student_ddp(image), label, 0.7 if cfg["ohem"] else None)}
            return self._step_student(losses["sup"], losses)
        # 1. The EMA teachers read the weak view. A lone teacher fills both roles (then L_dis is 0).
        with torch.no_grad(), self.autocast():
            probs_swin = self.swin_ema(weak).float().softmax(dim=1) if self.uses("swin") else None
            probs_res = self.res_ema(weak).float().softmax(dim=1) if self.uses("res") else None
        probs_swin = probs_res if probs_swin is None else probs_swin
        probs_res = probs_swin if probs_res is None else probs_res
        # 2. CutMix: the box pastes another image of the batch into the strong view; its teachers' predictions
        #    and its ignore mask are pasted alike, so targets stay aligned with pixels.
        mix = lambda t: data.cutmix(t, t.roll(1, dims=0), box)
        strong, probs_swin, probs_res, ignore = mix(strong), mix(probs_swin), mix(probs_res), mix(ignore)
        # 3. The student reads labeled images and the strong view in one batch.
        with self.autocast():
            logits = self.student_ddp(torch.cat([image, strong]))
        logits_labeled, logits_strong = logits[:n], logits[n:]
        losses = {
            "sup": sup_loss(logits_labeled, label, 0.7 if cfg["ohem"] else None),
            "pl": pseudo_label_loss(logits_strong, probs_swin, probs_res, ignore, cfg["threshold"]),
            "dis": discrepancy_loss(logits_strong, probs_swin, probs_res, ignore),
            "glo": global_context_loss(logits_strong, probs_swin, ignore),
            "loc": local_regional_loss(logits_strong, probs_res, ignore, cfg["region"]),
        }
        unlabeled = losses["pl"] + cfg["lambda_dis"] * losses["dis"] + cfg["lambda_glo"] * losses["glo"] \
            + cfg["lambda_loc"] * losses["loc"]
        return self._step_student(losses["sup"] + cfg["lambda_u"] * unlabeled, losses)

    def _step_student(self, loss, losses):
        self.opt_student.zero_grad(set_to_none=True)
        self.scaler_student.scale(loss).backward()
        self.scaler_student.step(self.opt_student)
        self.scaler_student.update()
        self.steps["student"] += 1
        return losses

    def state_dict(self):
        names = ["student", "swin", "res", "swin_ema", "res_ema", "opt_student", "opt_swin", "opt_res",
                 "scaler_student", "scaler_teachers"]
        return {name: getattr(self, name).state_dict() for name in names if getattr(self, name) is not None} \
            | {"steps": dict(self.steps)}

    def load_state_dict(self, state):
        for name, value in state.items():
            if name == "steps":
                self.steps = dict(value)
            else:
                getattr(self, name).load_state_dict(value)


# ------------------------------------------------------------------------------------------------ the loop
def build_data(cfg, rank, world):
    """The datasets. Rank 0 checks the data and writes the split lists first; the others then read them."""
    build = lambda: data.build_datasets(cfg["dataset"], cfg["data_root"], split=cfg["split"],
                                        splits_dir=cfg["splits_dir"], crop_size=cfg["crop_size"], seed=cfg["seed"])
    datasets, problem = None, [None]
    if rank == 0:
        try:
            datasets = build()
        except data.DataError as error:
            problem = [str(error)]
    if world > 1:  # every rank learns whether rank 0 succeeded, so none waits forever
        dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise data.DataError(problem[0])
    return datasets or build()


def train(args, rank=0, world=1):
    device = args.device if args.device == "cpu" else f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    out = Path(args.out)
    latest = out / "latest.pt"
    if args.resume:
        if not latest.is_file():
            raise data.DataError(f"--resume: {latest} does not exist (start without --resume, or name the --out)")
        checkpoint = torch.load(latest, map_location="cpu", weights_only=True)
        cfg = checkpoint["config"]
    else:
        if latest.is_file():
            raise data.DataError(f"--out {out} already holds a run: add --resume to continue it, or pick a new --out")
        checkpoint, cfg = None, vars(args).copy()
        for key in ("resume", "device", "gpus"):
            cfg.pop(key)
    stop = {"signal": 0}
    def request_stop(signum, frame):  # finish the current iteration, save latest.pt, then exit
        stop["signal"] = signum
    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _train(args, cfg, checkpoint, out, latest, rank, world, device, stop)
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)


def _train(args, cfg, checkpoint, out, latest, rank, world, device, stop):
    is_main = rank == 0

    labeled_set, unlabeled_set, val_set, info = build_data(cfg, rank, world)
    cfg.update(num_classes=info.num_classes, class_names=info.class_names, palette=[list(c) for c in info.palette])
    if cfg["batch_size"] % world:
        raise data.DataError(f"--batch-size {cfg['batch_size']} must be divisible by the {world} processes")
    per_rank = cfg["batch_size"] // world
    iters = len(unlabeled_set) // cfg["batch_size"]
    if cfg["max_iters"]:
        iters = min(iters, cfg["max_iters"])
    if cfg["student_epochs"] == 0 and (cfg["teachers"] == "none" or cfg["teacher_epochs"] == 0):
        raise data.DataError("--student-epochs 0 leaves nothing to train (it needs teachers and --teacher-epochs > 0)")
    if iters == 0:
        raise data.DataError(f"--batch-size {cfg['batch_size']} exceeds the {len(unlabeled_set)} unlabeled images")

    cfg["cps_rampup_iters"] = round(cfg["cps_rampup"] * iters)
    trainer = Trainer(cfg, rank, world, device)
    teacher_epochs = 0 if cfg["teachers"] == "none" else cfg["teacher_epochs"]
    total_epochs = teacher_epochs + cfg["student_epochs"]
    teacher_iters = iters * (teacher_epochs + (0 if cfg["freeze_teachers"] else cfg["student_epochs"]))
    student_iters = iters * cfg["student_epochs"]
    start_epoch, start_step, best_miou, meters = 0, 0, -1.0, {}
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint["trainer"])
        start_epoch, start_step = checkpoint["epoch"], checkpoint["step"]
        best_miou, meters = checkpoint["best_miou"], checkpoint["meters"]
    elif cfg["teachers_from"]:
        stage1_log = adopt_teachers(trainer, cfg, cfg["teachers_from"])
        start_epoch = teacher_epochs
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
        if checkpoint is None and cfg["teachers_from"]:  # the log reads as a straight run's: stage 1, then ours
            (out / "log.jsonl").write_text("".join(json.dumps(record) + "\n" for record in stage1_log))
        print(f"{cfg['dataset']} {cfg['split']}: {len(labeled_set)} labeled, {len(unlabeled_set)} unlabeled, "
              f"{len(val_set)} val; {iters} iterations per epoch; teachers: {cfg['teachers']}; "
              f"{world} process(es) on {args.device}, amp {cfg['amp']}; writing to {out}")

    def checkpoint_state(epoch, step):
        return {"trainer": trainer.state_dict(), "config": cfg, "epoch": epoch, "step": step, "best_miou": best_miou,
                "meters": {k: float(v) for k, v in meters.items()}, "stage": "teachers" if epoch < teacher_epochs else "student"}

    for epoch in range(start_epoch, total_epochs):
        stage = "teachers" if epoch < teacher_epochs else "student"
        step0 = start_step if epoch == start_epoch else 0
        if step0 == 0:
            meters = {}
        labeled_set.set_epoch(epoch)
        unlabeled_set.set_epoch(epoch)
        length = iters * cfg["batch_size"]
        labeled_idx = epoch_indices(len(labeled_set), length, cfg["seed"], 2 * epoch, rank, world)
        unlabeled_idx = epoch_indices(len(unlabeled_set), length, cfg["seed"], 2 * epoch + 1, rank, world)
        labeled_batches = loader(labeled_set, labeled_idx[step0 * per_rank:], per_rank, cfg["workers"], args.device)
        unlabeled_batches = itertools.repeat(None) if cfg["teachers"] == "none" else \
            loader(unlabeled_set, unlabeled_idx[step0 * per_rank:], per_rank, cfg["workers"], args.device)
        batches = zip(labeled_batches, unlabeled_batches)  # the baseline never loads unlabeled images
        bar = tqdm(batches, total=iters - step0, disable=not is_main, leave=False, dynamic_ncols=True,
                   desc=f"{stage} epoch {epoch + 1}/{total_epochs}",
                   mininterval=0.5 if sys.stderr.isatty() else 60)  # a job's log file gets a line a minute
        started = time.time()
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for step, ((image, label), unlabeled) in enumerate(bar, start=step0):
            # Randomness inside the networks (drop path) is a function of (seed, rank, epoch, step): a resumed run
            # repeats the straight run exactly, with no RNG state to carry.
            torch.manual_seed(hash((cfg["seed"], rank, epoch, step)) % 2 ** 62)
            image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True)
            weak, strong, ignore, box = (None,) * 4 if unlabeled is None else \
                (t.to(device, non_blocking=True) for t in unlabeled)
            losses = {}
            if stage == "student":
                poly_lr(trainer.opt_student, trainer.steps["student"], student_iters)
                losses |= trainer.student_step(image, label, weak, strong, ignore, box)
            if stage == "teachers" or (cfg["teachers"] != "none" and not cfg["freeze_teachers"]):
                for optimizer in (trainer.opt_swin, trainer.opt_res):
                    if optimizer is not None:
                        poly_lr(optimizer, trainer.steps["teachers"], teacher_iters)
                losses |= trainer.teacher_step(image, label, weak, ignore)
            for name, value in losses.items():  # running sums stay on the device: no sync per iteration
                meters[name] = meters.get(name, 0.0) + value.detach().float()
            meters["count"] = meters.get("count", 0) + 1
            if step % 10 == 0:  # reading the sums waits for the GPU, so not every iteration
                bar.set_postfix({k: f"{float(v) / meters['count']:.3f}" for k, v in meters.items()
                                 if k not in ("count", "seconds")}, refresh=False)
            signalled = stop["signal"]
            if world > 1:  # every rank must stop at the same iteration (one process needs no device sync)
                flag = torch.tensor(signalled, device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                signalled = int(flag.item())
            if signalled:
                meters["seconds"] = meters.get("seconds", 0.0) + time.time() - started
                if is_main:
                    save_atomic(checkpoint_state(epoch, step + 1), latest)
                    print(f"\nstopped by signal {int(signalled)}; saved {latest}; continue with --resume --out {out}")
                return {"signal": int(signalled)}
        seconds = meters.pop("seconds", 0.0) + time.time() - started  # including the part before a resume
        record = {"stage": stage, "epoch": epoch + 1, "iterations": iters}
        record |= {f"loss_{k}": float(v) / meters["count"] for k, v in meters.items() if k != "count"}
        for name in ("student", "swin", "res"):  # the head's learning rate (the last parameter group)
            optimizer = getattr(trainer, f"opt_{name}")
            if optimizer is not None:
                record[f"lr_{name}"] = optimizer.param_groups[-1]["lr"]
        images_per_step = cfg["batch_size"] * (1 if cfg["teachers"] == "none" else 2)
        record |= {"images_per_s": iters * images_per_step / seconds, "seconds": seconds,
                   "peak_mem_mb": peak_memory_mb(args.device)}
        last_of_stage = epoch + 1 in (teacher_epochs, total_epochs)
        if (epoch + 1) % cfg["eval_every"] == 0 or last_of_stage:
            record |= evaluate_all(trainer, val_set, info, cfg, stage, device, out / "vis" / f"epoch_{epoch + 1:03d}.png",
                                   is_main)
            if stage == "student" and record["miou_student"] > best_miou:
                best_miou = record["miou_student"]
                if is_main:
                    save_atomic({"student": trainer.student.state_dict(), "config": cfg, "miou": best_miou,
                                 "epoch": epoch + 1}, out / "best.pt")
        if is_main:
            save_atomic(checkpoint_state(epoch + 1, 0), latest)
            with open(out / "log.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    if is_main:
        final = next((json.loads(l) for l in reversed((out / "log.jsonl").read_text().splitlines())), {})
        if "miou_student" in final:
            print(f"student mIoU: {final['miou_student']:.2f} (best {best_miou:.2f}; checkpoints in {out})")
        else:  # --student-epochs 0: the teachers alone were trained
            print(", ".join(f"{name} mIoU: {final[f'miou_{name}']:.2f}" for name in ("swin", "res")
                            if f"miou_{name}" in final) + f" (teachers only; checkpoints in {out})")
    return {"best_miou": best_miou}


# What stage 1 does not depend on: the student's losses and schedule (its epochs too, when the teachers are frozen
# in stage 2; otherwise their learning-rate schedule spans both stages), evaluation, workers, where to write.
# The student's architecture is compared all the same: it is built first from the seed, so it shapes the
# teachers' initial weights.
NOT_STAGE_1 = {"out", "teachers_from", "lambda_u", "lambda_dis", "lambda_glo", "lambda_loc", "threshold", "region",
               "ohem", "pretrained", "eval_every", "eval_mode", "eval_window", "workers"}


def adopt_teachers(trainer, cfg, run_dir):
    """--teachers-from: load into `trainer` the teachers (weights, EMA copies, optimisers) that `run_dir` had at the
    end of stage 1, after checking that its stage 1 is the one this run would train. Returns its stage-1 log."""
    source = Path(run_dir) / "latest.pt"
    if not source.is_file():
        raise data.DataError(f"--teachers-from {run_dir}: no latest.pt there (expected a run directory)")
    state = torch.load(source, map_location="cpu", weights_only=True)
    theirs = state["config"]
    if cfg["teachers"] == "none" or cfg["teacher_epochs"] == 0:
        raise data.DataError("--teachers-from needs teachers (--teachers both|swin|res and --teacher-epochs > 0)")
    ignored = NOT_STAGE_1 | ({"student_epochs"} if cfg["freeze_teachers"] else set())
    for key in sorted(set(cfg) | set(theirs)):
        if key not in ignored and cfg.get(key) != theirs.get(key):
            flag = "--" + key.replace("_", "-")
            raise data.DataError(f"--teachers-from {run_dir}: its stage 1 had {flag} {theirs.get(key)}, this run "
                                 f"{cfg.get(key)}; expected the same (only the student's losses and epochs may differ)")
    finished = state["epoch"] > cfg["teacher_epochs"] or (state["epoch"] == cfg["teacher_epochs"] and state["step"] == 0)
    if not finished:
        raise data.DataError(f"--teachers-from {run_dir}: its stage 1 is not over (epoch {state['epoch']} of "
                             f"{cfg['teacher_epochs']}); finish it with --resume first")
    if not cfg["freeze_teachers"] and state["epoch"] != cfg["teacher_epochs"]:
        raise data.DataError(f"--teachers-from {run_dir}: its teachers trained on in stage 2, so they are no longer "
                             "those of the end of stage 1 (it would work with --freeze-teachers)")
    for name in ("swin", "res", "swin_ema", "res_ema", "opt_swin", "opt_res", "scaler_teachers"):
        if name in state["trainer"]:
            getattr(trainer, name).load_state_dict(state["trainer"][name])
    trainer.steps["teachers"] = state["trainer"]["steps"]["teachers"]
    log = Path(run_dir) / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    return [record for record in records if record["stage"] == "teachers"]


@torch.no_grad()
def evaluate_all(trainer, val_set, info, cfg, stage, device, panel_path, is_main):
    """mIoU of the EMA teachers (and the student in stage 2), and a picture: image | truth | G | L | S."""
    models = {"swin": trainer.swin_ema if trainer.uses("swin") else None,
              "res": trainer.res_ema if trainer.uses("res") else None,
              "student": trainer.student if stage == "student" else None}
    inference = dict(mode=cfg["eval_mode"], window=cfg["eval_window"], stride=max(1, cfg["eval_window"] * 2 // 3))
    record = {}
    for name, model in models.items():
        if model is not None and dist.is_initialized():
            # BatchNorm statistics are per rank unless synced (SyncBatchNorm is CUDA-only): evaluate, and save,
            # the weights of rank 0 on every rank, so the reported mIoU belongs to the saved checkpoint.
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        if model is not None:
            result = evaluate(model, val_set, info.num_classes, device, amp_dtype=trainer.amp_dtype, **inference)
            record[f"miou_{name}"] = result["miou"]
    if is_main:
        rows = []
        for i in range(min(3, len(val_set))):
            image, mask = val_set[i]
            row = [denormalize(image), data.colorize(mask, info.palette)]
            for model in models.values():
                if model is not None:
                    was_training = model.training
                    prediction = predict(model.eval(), image[None].to(device), info.num_classes, **inference)
                    model.train(was_training)
                    row.append(data.colorize(prediction.argmax(dim=1)[0].cpu(), info.palette))
            rows.append(row)
        save_panel(panel_path, rows)
    return record


def worker(rank, args, world, port):
    """One process of a run started with --gpus N (not under torchrun)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        run(args)
    except data.DataError as error:
        if rank == 0:
            print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)


def run(args):
    """Train in this process: alone, or as one rank of torchrun / --gpus N (read from the environment)."""
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if distributed:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    try:
        return train(args, *((dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)))
    finally:
        if distributed:
            dist.destroy_process_group()


def spawn(args):
    """--gpus N without torchrun: start N processes here; a SIGTERM / SIGINT to this one reaches them all."""
    with socket.socket() as s:  # a free port for the processes to meet on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(worker, args=(args, args.gpus, port), nprocs=args.gpus, join=False)
    received = {"signal": 0}
    def forward(signum, frame):
        received["signal"] = signum
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signum)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as failure:
        sys.exit(failure.exit_code if failure.exit_code and failure.exit_code > 0 else 1)
    return {"signal": received["signal"]}


def main(argv=None):
    args = parse_args(argv)
    try:
        result = spawn(args) if args.gpus > 1 and "RANK" not in os.environ else run(args)
    except data.DataError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
    if result.get("signal"):  # stopped by a signal with the state saved: exit as that signal asks
        sys.exit(128 + result["signal"])


if __name__ == "__main__":
    main()
