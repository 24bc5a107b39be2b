"""IGL-DT training. Stage 1: the two teachers learn together (CPS). Stage 2: the student learns from both.

    python train.py                                                  # synthetic data on the CPU, a few minutes
    python train.py --dataset voc --data-root data/VOC2012 --split 1/16 --gpus 4
    torchrun --nnodes 2 --nproc_per_node 8 train.py --dataset cityscapes --data-root data/cityscapes --split 1/8
    python train.py --out runs/voc_1_16 --resume                     # continue a stopped run exactly

The file reads in order: the settings (one table), the method (`Trainer`: `teacher_step` and `student_step`, in
the paper's order), the loop (`train`), and under one banner at the end, run management (flag checks, resume,
--teachers-from, processes, signals, locks).
"""
import argparse
import copy
import fcntl
import hashlib
import itertools
import json
import math
import os
import resource
import signal
import socket
import sys
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
from data import one_line, require_device, require_writable_dir
from evaluate import build_student, evaluate, memory_format, prediction_rows, read_checkpoint, save_panel
from losses import (IGNORE_INDEX, cps_loss, discrepancy_loss, dual_teacher_targets, global_context_loss,
                    local_regional_loss, pseudo_label_loss, sup_loss)
from models import ResUNet, SwinUNet, torchvision_state_dict

# ------------------------------------------------------------------------------------------------ settings
# Every setting of the method and the value each --dataset gives it: a flag left out takes its dataset's value from
# DATASET_DEFAULTS, and no other line of the code holds a value of the method.
# The losses' weights and settings, the same for every dataset: the student objective's lambdas (MATH: L = L_l +
# lambda_u * (L_pl + lambda_dis * L_dis + lambda_glo * L_glo + lambda_loc * L_loc)), DeepLabV3+'s output stride,
# and OHEM's as in the Cityscapes recipes of CPS and UniMatch (used where `ohem` is on).
METHOD = dict(lambda_u=1.0, lambda_dis=0.5, lambda_glo=1.0, lambda_loc=1.0, output_stride=16, ohem_threshold=0.7,
              ohem_min_kept=100_000)
# VOC and Cityscapes follow the paper and the CPS / UniMatch recipes: ImageNet-pretrained networks, learning rates
# for `batch_size` labeled + `batch_size` unlabeled images in total (scaled linearly when --batch-size changes).
PAPER = METHOD | dict(batch_size=8, backbone="resnet50", pretrained="imagenet", pretrained_swin="imagenet",
                      pretrained_res="imagenet", swin_dim=96, swin_depths=[2, 2, 6, 2], res_width=64, swin_lr=1e-4,
                      res_optimizer="sgd", lambda_cps=1.5, cps_rampup=0, ema_momentum=0.999, freeze_teachers=False,
                      workers=4)
# `synthetic` and `folder` are sized for a small CPU, every network from scratch: a shorter EMA memory (0.999 lags
# runs of a few hundred steps), AdamW for the ResUNet (SGD trains it slowly from scratch), a smaller CPS weight ramped
# up (from scratch, the faster-learning ResUNet is otherwise dragged down to the Swin-UNet). `folder` trains the
# teachers briefly, then freezes them (frozen teachers make stage 2 cheaper) and spends the epochs on the student,
# whose epochs buy more than the teachers'. The runs behind these choices: bench/results/README.md and
# bench/results/archive/HISTORY.md.
CPU = METHOD | dict(batch_size=4, backbone="resnet18", pretrained="none", pretrained_swin="none",
                    pretrained_res="none", swin_dim=48, swin_depths=[2, 2, 2, 2], res_width=32, lr=1e-2,
                    head_lr_mult=1.0, swin_lr=2e-3, res_optimizer="adamw", lambda_cps=0.5, ema_momentum=0.99,
                    threshold=0.9, region=32, eval_mode="full", eval_window=321, ohem=False, eval_every=3,
                    freeze_teachers=False)
DATASET_DEFAULTS = {
    "voc": PAPER | dict(crop_size=321, teacher_epochs=20, student_epochs=60, lr=1e-3, head_lr_mult=10.0,
                        threshold=0.95, region=32, eval_mode="full", eval_window=321, ohem=False, eval_every=5),
    "cityscapes": PAPER | dict(crop_size=801, teacher_epochs=60, student_epochs=180, lr=5e-3, head_lr_mult=1.0,
                               threshold=0.0, region=64, eval_mode="sliding", eval_window=801, ohem=True,
                               eval_every=10),
    "folder": CPU | dict(crop_size=128, teacher_epochs=3, student_epochs=22, cps_rampup=3, freeze_teachers=True,
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
    add_method_flags(p.add_argument_group("method"), per_dataset)
    add_schedule_flags(p.add_argument_group("schedule and networks"), per_dataset)
    add_hardware_flags(p.add_argument_group("hardware"))
    args = p.parse_args(argv)
    args.given = given_flags(p, argv, args)  # --resume refuses a given flag that differs from the saved run
    for key, value in DATASET_DEFAULTS[args.dataset].items():  # the table's settings that have no flag too
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.gpus == 0:
        args.device = "cpu"
    if args.amp is None:
        args.amp = "bf16" if native_bf16(args.device) else "off"
    args.out = args.out or f"runs/{args.dataset}_{args.split.replace('/', '_')}_{args.teachers}"
    return args


def add_method_flags(g, per_dataset):
    """The method's switches and weights: which teachers, each loss's lambda, thresholds, EMA."""
    g.add_argument("--teachers", default="both", choices=["both", "swin", "res", "none", "ema"],
                   help="which teachers teach; none = supervised-only baseline; ema = the one-teacher baseline "
                   "(no stage 1: the student's own EMA copy teaches, Mean Teacher with a FixMatch threshold); a "
                   "single teacher is trained without CPS and fills both teacher roles (default: both)")
    g.add_argument("--freeze-teachers", action=argparse.BooleanOptionalAction,
                   help="stop training the teachers in stage 2 (--no-freeze-teachers: keep training them, the "
                   "paper's iterative scheme)" + per_dataset)
    g.add_argument("--lambda-u", type=float, help="weight of all unlabeled terms" + per_dataset)
    g.add_argument("--lambda-dis", type=float, help="discrepancy learning, 0 = off" + per_dataset)
    g.add_argument("--lambda-glo", type=float, help="global context learning, 0 = off" + per_dataset)
    g.add_argument("--lambda-loc", type=float, help="local regional learning, 0 = off" + per_dataset)
    g.add_argument("--lambda-cps", type=float, help="CPS between the teachers (from scratch, a teacher that learns "
                   "slower drags the other down, so less on a CPU)" + per_dataset)
    g.add_argument("--cps-rampup", type=float, help="epochs over which CPS ramps up from 0 (counted in iterations: "
                   "this many epochs' worth)" + per_dataset)
    g.add_argument("--threshold", type=float, help="confidence threshold of agreed pseudo-labels" + per_dataset)
    g.add_argument("--region", type=int, help="LRL region size in pixels" + per_dataset)
    g.add_argument("--ema-momentum", type=float, help="teachers' EMA momentum; short CPU runs need a shorter "
                   "memory" + per_dataset)


def add_schedule_flags(g, per_dataset):
    """Epochs, batch, crop, learning rates, the networks' sizes and weights, evaluation."""
    for flag, kind in [("--teacher-epochs", int), ("--student-epochs", int), ("--batch-size", int),
                       ("--crop-size", int), ("--lr", float), ("--head-lr-mult", float), ("--swin-lr", float),
                       ("--swin-dim", int), ("--res-width", int), ("--eval-every", int), ("--workers", int)]:
        g.add_argument(flag, type=kind, help=per_dataset)
    g.add_argument("--swin-depths", type=int, nargs=4, help="blocks per Swin stage" + per_dataset)
    g.add_argument("--res-optimizer", choices=["sgd", "adamw"], help="ResUNet optimiser; adamw uses --swin-lr"
                   + per_dataset)
    g.add_argument("--backbone", choices=["resnet18", "resnet34", "resnet50", "resnet101"], help=per_dataset)
    g.add_argument("--output-stride", type=int, choices=[8, 16], help=per_dataset)
    g.add_argument("--pretrained", help="student backbone: imagenet | none | PATH to a torchvision state dict"
                   + per_dataset)
    g.add_argument("--pretrained-swin", help="imagenet | none | PATH (torchvision swin_t)" + per_dataset)
    g.add_argument("--pretrained-res", help="imagenet | none | PATH (torchvision resnet34)" + per_dataset)
    g.add_argument("--ohem", action=argparse.BooleanOptionalAction, help="OHEM supervised loss" + per_dataset)
    g.add_argument("--eval-mode", choices=["full", "sliding"], help=per_dataset)
    g.add_argument("--eval-window", type=int, help="sliding window size" + per_dataset)
    g.add_argument("--max-iters", type=int, default=0, help="cap iterations per epoch (smoke tests; 0 = none)")


def add_hardware_flags(g):
    """Devices, processes, precision and compilation."""
    g.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--gpus", type=int, default=1, help="processes to start when not under torchrun; 0 = CPU "
                   "(with --device cpu, N > 1 starts N CPU processes over gloo, to try the distributed path)")
    g.add_argument("--amp", choices=["bf16", "fp16", "off"],
                   help="mixed precision (default: bf16 on a GPU or CPU that computes it natively, else off)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the networks' training calls; the eager path is the reference (default: "
                   "off; see bench/speed.py --compare compile)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="store the convolutional networks (student, ResUNet) channels-last (NHWC), the layout "
                   "oneDNN and cuDNN convolve fastest (default: off, the reference layout; see "
                   "bench/results/README.md)")
    g.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile mode; reduce-overhead captures CUDA graphs (default: default)")


# ------------------------------------------------------------------------------------------------ the method
class Trainer:
    """Holds the three networks, the teachers' EMA copies, their optimisers, and one iteration of each stage.

    The teachers' tensors are named by their role, as in losses.py: G, the global teacher (the Swin-UNet), L, the
    local teacher (the ResUNet); the networks, their checkpoint keys and their log keys by their architecture.
    Each network has one name for the module (`student`, `swin`, `res`, `swin_ema`, `res_ema`, `student_ema`: what
    is saved, updated by EMA and evaluated) and one for what the steps call (`student_call`, ..., the same module
    under DDP and/or torch.compile, or the module itself when neither is on)."""

    def __init__(self, cfg, rank, world, device, iters_per_epoch=0):
        """`iters_per_epoch` sets the length of CPS's ramp-up (cfg["cps_rampup"] epochs of it); 0, for a Trainer
        outside a run, gives CPS its full weight from the first step."""
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.iters_per_epoch = iters_per_epoch
        torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
        student, swin, res = build_networks(cfg)
        if world > 1 and device != "cpu":  # SyncBatchNorm needs CUDA; CPU processes keep per-rank statistics
            student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
            res = res and torch.nn.SyncBatchNorm.convert_sync_batchnorm(res)
        # channels_last lets oneDNN and cuDNN pick their fastest (NHWC) convolution kernels; the Swin-UNet is
        # mostly matmuls, so it keeps its layout.
        self.student, self.res = (m and m.to(device, memory_format=memory_format(cfg)) for m in (student, res))
        self.swin = swin and swin.to(device)
        self.swin_ema, self.res_ema = (m and copy.deepcopy(m).eval().requires_grad_(False)
                                       for m in (self.swin, self.res))
        # --teachers ema: the one-teacher baseline's teacher is the student's own EMA copy.
        self.student_ema = copy.deepcopy(self.student).eval().requires_grad_(False) \
            if cfg["teachers"] == "ema" else None
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
        self.nonfinite, self.nonfinite_in_a_row = None, 0  # see `finite`
        # What the steps call: under DDP wrapped, with --compile compiled (DDP first, then torch.compile, as
        # PyTorch's DDP notes advise). The modules stay plain, so state dicts, EMA updates and evaluation never see
        # a wrapper; evaluation runs eager, since its full images come in many shapes.
        ddp = lambda m: DistributedDataParallel(m, device_ids=None if device == "cpu" else [device]) \
            if world > 1 and m is not None else m
        compiled = lambda m: torch.compile(m, mode=cfg.get("compile_mode", "default")) \
            if cfg.get("compile", False) and m else m
        self.student_call, self.swin_call, self.res_call = (compiled(ddp(m)) for m in (self.student, self.swin,
                                                                                        self.res))
        self.swin_ema_call, self.res_ema_call, self.student_ema_call = (
            compiled(m) for m in (self.swin_ema, self.res_ema, self.student_ema))

    def autocast(self):
        return torch.autocast(torch.device(self.device).type, dtype=self.amp_dtype or torch.bfloat16,
                              enabled=self.amp_dtype is not None)

    def uses(self, teacher):
        return self.cfg["teachers"] in (teacher, "both")

    @property
    def trains_teachers(self):
        """Whether this run has teacher networks of its own to train (a stage 1): not none, not ema."""
        return self.cfg["teachers"] in ("swin", "res", "both")

    def teacher_step(self, image, label, weak, ignore):
        """L_T = sup(G) + sup(L) + lambda_cps * ramp * L_cps on the weak unlabeled view; then both EMA copies follow.

        A lone teacher (--teachers swin or res) trains on its own sup term alone. ramp rises linearly from 0 to 1
        over the first cps_rampup epochs (counted in iterations), so that supervision shapes two untrained teachers
        before CPS lets them agree on nonsense (both predicting the majority class, say).
        image (B, 3, H, W) labeled crops, label (B, H, W) class ids (255 ignored), weak (B, 3, H, W) unlabeled
        crops, ignore (B, H, W) bool, True on their padding. Returns {name: scalar loss}."""
        cfg, n = self.cfg, image.shape[0]
        both = torch.cat([image, weak])
        with self.autocast():
            logits_g = self.swin_call(both) if self.uses("swin") else None
            logits_l = self.res_call(both) if self.uses("res") else None
        losses = {}
        if logits_g is not None:
            losses["sup_swin"] = sup_loss(logits_g[:n], label)
        if logits_l is not None:
            losses["sup_res"] = sup_loss(logits_l[:n], label)
        if logits_g is not None and logits_l is not None:
            losses["cps"] = cps_loss(logits_g[n:], logits_l[n:], ignore)
            ramp = min(1.0, (self.steps["teachers"] + 1) / max(1, round(cfg["cps_rampup"] * self.iters_per_epoch)))
            loss = losses["sup_swin"] + losses["sup_res"] + cfg["lambda_cps"] * ramp * losses["cps"]
        else:
            loss = losses["sup_swin"] if logits_g is not None else losses["sup_res"]
        optimizers = [opt for opt, t in ((self.opt_swin, "swin"), (self.opt_res, "res")) if self.uses(t)]
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        if self.finite(loss, losses, "teachers"):
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
        """L = L_l + lambda_u * (L_pl + lambda_dis * L_dis + lambda_glo * L_glo + lambda_loc * L_loc).

        image (B, 3, H, W) and label (B, H, W) as in teacher_step; weak and strong (B, 3, H, W), the two views of
        the same unlabeled crops; ignore (B, H, W) bool, True on their padding; box (B, H, W) bool, the CutMix box.
        With --teachers none, weak, strong, ignore and box are None. Returns {name: scalar}: losses and shares."""
        cfg, n = self.cfg, image.shape[0]
        ohem = dict(ohem_threshold=cfg["ohem_threshold"], ohem_min_kept=cfg["ohem_min_kept"]) if cfg["ohem"] else {}
        if cfg["teachers"] == "none":  # supervised-only baseline: the same loop, labeled images alone
            with self.autocast():
                losses = {"sup": sup_loss(self.student_call(image), label, **ohem)}
            return self._step_student(losses["sup"], losses)
        # 1. The EMA teachers read the weak view.
        probs_g, probs_l = self.teacher_probs(weak)
        # 2. CutMix: the box pastes another image of the batch into the strong view; its teachers' predictions
        #    and its ignore mask are pasted alike, so targets stay aligned with pixels.
        mix = lambda t: data.cutmix(t, t.roll(1, dims=0), box)
        strong, probs_g, probs_l, ignore = mix(strong), mix(probs_g), mix(probs_l), mix(ignore)
        # 3. The teachers' targets, once: L_pl, L_dis and the logged shares all see these.
        targets = dual_teacher_targets(probs_g, probs_l, ignore, cfg["threshold"])
        # 4. The student reads labeled images and the strong view in one batch.
        with self.autocast():
            logits = self.student_call(torch.cat([image, strong]))
        logits_labeled, logits_strong = logits[:n], logits[n:]
        losses = {
            "sup": sup_loss(logits_labeled, label, **ohem),
            "pl": pseudo_label_loss(logits_strong, probs_g, probs_l, ignore, cfg["threshold"], targets=targets),
            "dis": discrepancy_loss(logits_strong, probs_g, probs_l, ignore, targets=targets),
            "glo": global_context_loss(logits_strong, probs_g, ignore),
            "loc": local_regional_loss(logits_strong, probs_l, ignore, cfg["region"]),
        }
        loss = losses["sup"] + cfg["lambda_u"] * (losses["pl"] + cfg["lambda_dis"] * losses["dis"]
                                                  + cfg["lambda_glo"] * losses["glo"]
                                                  + cfg["lambda_loc"] * losses["loc"])
        losses |= pseudo_label_shares(targets, ignore)
        return self._step_student(loss, losses)

    @torch.no_grad()
    def teacher_probs(self, weak):
        """(p_G, p_L): the EMA teachers' class probabilities on the weak view, (B, K, H, W) fp32 each.

        The baselines stay in here: a lone teacher (--teachers swin or res) fills both roles, and so does the
        student's own EMA copy with --teachers ema; the roles then agree everywhere and L_dis is 0."""
        with self.autocast():
            if self.student_ema is not None:
                probs = self.student_ema_call(weak).float().softmax(dim=1)
                return probs, probs
            probs_g = self.swin_ema_call(weak).float().softmax(dim=1) if self.uses("swin") else None
            probs_l = self.res_ema_call(weak).float().softmax(dim=1) if self.uses("res") else None
        return (probs_l if probs_g is None else probs_g), (probs_g if probs_l is None else probs_l)

    def _step_student(self, loss, losses):
        self.opt_student.zero_grad(set_to_none=True)
        if self.finite(loss, losses, "student"):
            self.scaler_student.scale(loss).backward()
            self.scaler_student.step(self.opt_student)
            self.scaler_student.update()
        if self.student_ema is not None:
            update_ema(self.student_ema, self.student, self.steps["student"], self.cfg["ema_momentum"])
        self.steps["student"] += 1
        return losses

    def finite(self, loss, losses, stage):
        """Whether to take this step: a NaN or inf loss (a diverging run) skips it, as GradScaler skips an fp16
        overflow, and names itself in self.nonfinite for the loop to count; NONFINITE_LIMIT such steps in a row stop
        the run. One sync a step; every rank agrees, so none waits in DDP's all-reduce for one that skipped."""
        finite = torch.isfinite(loss.detach()).int()
        if self.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item():
            self.nonfinite_in_a_row = 0
            return True
        name = next((name for name, value in losses.items() if not torch.isfinite(value)), "the total loss")
        self.nonfinite, self.nonfinite_in_a_row = f"loss_{name}", self.nonfinite_in_a_row + 1
        if self.nonfinite_in_a_row >= NONFINITE_LIMIT:
            raise RunError(f"{self.nonfinite} was {float(losses.get(name, loss).detach()):.4g} at {stage} step "
                           f"{self.steps[stage] + 1} and in the {NONFINITE_LIMIT - 1} steps before: the run "
                           f"diverged and stopped (latest.pt keeps the last finished epoch); expected finite "
                           f"losses: lower --lr or --swin-lr, or --amp off")
        return False

    # The networks, their optimisers and loss scalers, and the step counts: the "trainer" entry of latest.pt.
    STATE = ("student", "swin", "res", "swin_ema", "res_ema", "student_ema", "opt_student", "opt_swin", "opt_res",
             "scaler_student", "scaler_teachers")

    def state_dict(self):
        return {name: getattr(self, name).state_dict() for name in self.STATE if getattr(self, name) is not None} \
            | {"steps": dict(self.steps)}

    def load_state_dict(self, state):
        for name, value in state.items():
            if name == "steps":
                self.steps = dict(value)
            else:
                getattr(self, name).load_state_dict(value)


NONFINITE_LIMIT = 20  # steps in a row with a NaN or inf loss (each skipped) after which a run stops


@torch.no_grad()
def pseudo_label_shares(targets, ignore):
    """What the student is taught on the unlabeled view: the share of valid pixels with an agreed, confident target
    (L_pl's) and of those with a disputed one (L_dis's), as UniMatch logs its mask ratio. `targets` as
    `losses.dual_teacher_targets` returns them, ignore (B, H, W)."""
    valid = (~ignore).sum().clamp(min=1)
    return {"share_agreed": (targets.agreed != IGNORE_INDEX).sum() / valid,
            "share_disputed": (targets.disputed != IGNORE_INDEX).sum() / valid}


def torchvision_weights(spec, arch, flag):
    """The state dict that `flag` names: 'imagenet' (downloaded through torchvision's weights API) or a file saved
    with torch.save. A missing file or a failed download (no internet, say) is a one-line error."""
    if spec != "imagenet" and not os.path.isfile(spec):
        raise RunError(f"{flag} {spec}: no such file (expected imagenet, none or a path)")
    try:
        return torchvision_state_dict(True if spec == "imagenet" else spec, arch)
    except ValueError as error:  # not a state dict that torch.load reads safely
        raise RunError(f"{flag} {error}") from None
    except urllib.error.URLError as error:
        raise RunError(f"{flag} imagenet: could not download torchvision's {arch} weights ({error.reason}); "
                             f"fetch them once where there is internet (torch keeps them in "
                             f"{torch.hub.get_dir()}/checkpoints), or give {flag} a PATH to a state dict, or none")


def build_networks(cfg):
    """Student S (DeepLabV3+), Swin-UNet teacher G and ResUNet teacher L as the config describes (None if unused)."""
    def weights(key, arch):  # cfg[key] is imagenet, none or a path
        return None if cfg[key] == "none" else torchvision_weights(cfg[key], arch, "--" + key.replace("_", "-"))

    def loaded(key, load):  # weights of another network or width: one line naming the flag
        try:
            return load()
        except ValueError as error:
            raise RunError(f"--{key.replace('_', '-')} {cfg[key]}: {error}") from None
    student = loaded("pretrained", lambda: build_student(cfg, weights("pretrained", cfg["backbone"]) or False))
    swin = res = None
    if cfg["teachers"] in ("swin", "both"):
        heads = tuple(max(1, cfg["swin_dim"] * 2 ** i // 32) for i in range(4))  # 32 channels a head, as Swin-T
        swin = SwinUNet(cfg["num_classes"], embed_dim=cfg["swin_dim"], depths=tuple(cfg["swin_depths"]),
                        num_heads=heads)
        if cfg["pretrained_swin"] != "none":
            loaded("pretrained_swin", lambda: swin.load_torchvision_swin(weights("pretrained_swin", "swin_t")))
    if cfg["teachers"] in ("res", "both"):
        w = cfg["res_width"]
        res = ResUNet(cfg["num_classes"], widths=(w, 2 * w, 4 * w, 8 * w))
        if cfg["pretrained_res"] != "none":
            loaded("pretrained_res", lambda: res.load_torchvision_resnet(weights("pretrained_res", "resnet34")))
    return student, swin, res


# The optimisers default to PyTorch's fused kernels (all of a tensor's update in one kernel, on the CPU and CUDA, the
# devices train.py runs on): the same update rule as the per-tensor loop, fewer passes over memory.
def sgd(model, lr, head_lr_mult, backbone_prefixes, fused=True):
    """SGD with the pretrained trunk at lr and the rest (the new head) at lr * head_lr_mult."""
    trunk = [p for n, p in model.named_parameters() if n.startswith(backbone_prefixes)]
    head = [p for n, p in model.named_parameters() if not n.startswith(backbone_prefixes)]
    groups = [dict(params=trunk, lr=lr, initial_lr=lr), dict(params=head, lr=lr * head_lr_mult,
                                                              initial_lr=lr * head_lr_mult)]
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=1e-4, fused=fused)


def adamw(model, lr, fused=True):
    return torch.optim.AdamW([dict(params=list(model.parameters()), lr=lr, initial_lr=lr)], lr=lr, weight_decay=0.05,
                             fused=fused)


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



# ------------------------------------------------------------------------------------------------ the loop
def train(args, rank, world, stop):
    """One process's share of a run: stage 1 trains the teachers, stage 2 the student. A signal (stop["signal"])
    ends it after the current iteration with latest.pt saved; --resume then continues it exactly."""
    cfg, checkpoint = run_config(args, world)
    out, is_main = Path(args.out), rank == 0
    device = args.device if args.device == "cpu" else f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    if is_main:
        require_writable_dir(out, "--out")
        lock_run_dir(out)
        if cfg["dataset"] in ("folder", "voc", "cityscapes"):  # where split lists are drawn and written
            require_writable_dir(Path(cfg["splits_dir"]), "--splits-dir")
    labeled_set, unlabeled_set, val_set, info = build_data(cfg, rank, world)
    if checkpoint is not None:
        require_same_data(cfg, info, val_set, out)
    cfg.update(num_classes=info.num_classes, class_names=info.class_names, palette=[list(c) for c in info.palette],
               val_images=val_images(val_set))
    iters = iterations_per_epoch(cfg, len(unlabeled_set))
    trainer = Trainer(cfg, rank, world, device, iters)
    stage1_epochs = cfg["teacher_epochs"] if trainer.trains_teachers else 0  # none and ema have no stage 1
    total_epochs = stage1_epochs + cfg["student_epochs"]
    start_epoch, start_step, best_miou, tally = start_point(trainer, checkpoint, stage1_epochs, out, is_main)
    if is_main:
        print(f"{cfg['dataset']} {cfg['split']}: {len(labeled_set)} labeled, {len(unlabeled_set)} unlabeled, "
              f"{len(val_set)} val; {iters} iterations per epoch; teachers: {cfg['teachers']}; "
              f"{world} process(es) on {args.device}, amp {cfg['amp']}; writing to {out}")

    for epoch in range(start_epoch, total_epochs):
        stage = "teachers" if epoch < stage1_epochs else "student"
        first_step = start_step if epoch == start_epoch else 0
        tally = tally if first_step else Tally()
        # the epoch's batches, from the iteration where a stopped run left off
        batches = epoch_batches(trainer, labeled_set, unlabeled_set, epoch, first_step, iters)
        # its iterations, until the batches run out or a signal asks the run to stop
        step, signalled = train_epoch(trainer, batches, tally, stage, epoch, first_step, iters, total_epochs, stop)
        if signalled:
            if is_main:
                save_atomic(run_state(trainer, epoch, step, best_miou, tally, stage1_epochs), out / "latest.pt")
                print(f"\nstopped by signal {signalled}; saved {out / 'latest.pt'}; continue with --resume --out {out}")
            return {"signal": signalled}
        # the epoch's record: mean losses, skipped steps, learning rates, speed (of finite weights only)
        require_finite_weights(trainer, epoch, out)
        record = epoch_record(trainer, stage, epoch, iters, tally)
        # evaluation every eval_every epochs and at the end of each stage; best.pt holds the best student
        if (epoch + 1) % cfg["eval_every"] == 0 or epoch + 1 in (stage1_epochs, total_epochs):
            scores = evaluate_all(trainer, val_set, info, stage, out / "vis" / f"epoch_{epoch + 1:03d}.png", stop)
            if scores is None:  # a signal during the evaluation: keep the trained epoch; --resume evaluates it
                if is_main:
                    save_atomic(run_state(trainer, epoch, iters, best_miou, tally, stage1_epochs), out / "latest.pt")
                    print(f"\nstopped by signal {stop['signal']} during the evaluation of epoch {epoch + 1}; saved "
                          f"{out / 'latest.pt'}; continue with --resume --out {out}")
                return {"signal": stop["signal"]}
            record |= scores
            if stage == "student" and record["miou_student"] > best_miou:
                best_miou = record["miou_student"]
                if is_main:
                    save_atomic(best_state(trainer, best_miou, epoch + 1), out / "best.pt")
        # latest.pt and the log, every epoch
        if is_main:
            save_atomic(run_state(trainer, epoch + 1, 0, best_miou, tally, stage1_epochs), out / "latest.pt")
            append_record(out / "log.jsonl", record)
    if is_main:
        print_summary(out, best_miou)
    return {"best_miou": best_miou}


def iterations_per_epoch(cfg, num_unlabeled):
    """An epoch is one pass over the unlabeled set (the labeled set is cycled to its length), or max_iters."""
    iters = num_unlabeled // cfg["batch_size"]
    if iters == 0:
        raise RunError(f"--batch-size {cfg['batch_size']} exceeds the {num_unlabeled} unlabeled images")
    return min(iters, cfg["max_iters"]) if cfg["max_iters"] else iters


def epoch_batches(trainer, labeled_set, unlabeled_set, epoch, first_step, iters):
    """This rank's (labeled, unlabeled) batches of one epoch from `first_step` on, a pure function of (seed, epoch):
    a resumed run reads the batches the straight run read. The baseline never loads unlabeled images."""
    cfg, rank, world = trainer.cfg, trainer.rank, trainer.world
    per_rank, length = cfg["batch_size"] // world, iters * cfg["batch_size"]
    device_type = torch.device(trainer.device).type
    labeled_set.set_epoch(epoch)
    unlabeled_set.set_epoch(epoch)
    labeled_order = data.epoch_indices(len(labeled_set), length, cfg["seed"], 2 * epoch, rank, world)
    unlabeled_order = data.epoch_indices(len(unlabeled_set), length, cfg["seed"], 2 * epoch + 1, rank, world)
    labeled = data.loader(labeled_set, labeled_order[first_step * per_rank:], per_rank, cfg["workers"], device_type)
    unlabeled = itertools.repeat(None) if cfg["teachers"] == "none" else \
        data.loader(unlabeled_set, unlabeled_order[first_step * per_rank:], per_rank, cfg["workers"], device_type)
    return zip(labeled, unlabeled)


def train_epoch(trainer, batches, tally, stage, epoch, first_step, iters, total_epochs, stop):
    """The epoch's iterations from `first_step`, each one's losses added to `tally` (a skipped one counted).
    Returns (the step after the last one run, the signal that asks the run to stop or 0)."""
    cfg, device, step, signalled = trainer.cfg, trainer.device, first_step - 1, 0
    bar = tqdm(batches, total=iters - first_step, disable=trainer.rank != 0, leave=False, dynamic_ncols=True,
               desc=f"{stage} epoch {epoch + 1}/{total_epochs}",
               mininterval=0.5 if sys.stderr.isatty() else 60)  # a job's log file gets a line a minute
    started = time.time()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for step, ((image, label), unlabeled) in enumerate(bar, start=first_step):
        # Randomness inside the networks (drop path) is a function of (seed, rank, epoch, step): a resumed run
        # repeats the straight run exactly, with no RNG state to carry.
        torch.manual_seed(hash((cfg["seed"], trainer.rank, epoch, step)) % 2 ** 62)
        image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True)
        weak, strong, ignore, box = (None,) * 4 if unlabeled is None else \
            (t.to(device, non_blocking=True) for t in unlabeled)
        trainer.nonfinite = None
        losses = {}
        if stage == "student":
            poly_lr(trainer.opt_student, trainer.steps["student"], iters * cfg["student_epochs"])
            losses |= trainer.student_step(image, label, weak, strong, ignore, box)
        if stage == "teachers" or (trainer.trains_teachers and not cfg["freeze_teachers"]):
            # the teachers' learning-rate horizon: stage 1, and stage 2 too where they keep training in it
            teacher_lr_epochs = cfg["teacher_epochs"] + (0 if cfg["freeze_teachers"] else cfg["student_epochs"])
            for optimizer in (trainer.opt_swin, trainer.opt_res):
                if optimizer is not None:
                    poly_lr(optimizer, trainer.steps["teachers"], iters * teacher_lr_epochs)
            losses |= trainer.teacher_step(image, label, weak, ignore)
        if trainer.nonfinite is None:
            tally.add(losses)
        else:
            tally.skipped += 1
        if step % 10 == 0 and tally.steps:  # reading the sums waits for the GPU, so not every iteration
            bar.set_postfix({name: f"{mean:.3f}" for name, mean in tally.means().items()}, refresh=False)
        signalled = stop_signal(stop, trainer)
        if signalled:
            break
    tally.seconds += time.time() - started  # including the part before a resume
    return step + 1, signalled


def build_data(cfg, rank, world):
    """The datasets. Rank 0 checks the data (every image's header, every labeled and val mask's ids, so a broken
    file costs no training time) and then writes the split lists; the others read them."""
    build = lambda check: data.build_datasets(cfg["dataset"], cfg["data_root"], split=cfg["split"],
                                              splits_dir=cfg["splits_dir"], crop_size=cfg["crop_size"],
                                              seed=cfg["seed"], check=check)
    datasets, problem = None, [None]
    if rank == 0:
        try:
            datasets = build(True)  # every header and every labeled and val mask, before a split list is written
        except data.DataError as error:
            problem = [str(error)]
    if world > 1:  # every rank learns whether rank 0 succeeded, so none waits forever
        dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise data.DataError(problem[0])
    return datasets or build(False)


@dataclass
class Tally:
    """What an epoch has added up so far; latest.pt carries it when a run stops mid-epoch."""
    loss_sums: dict = field(default_factory=dict)  # name -> running sum, on the device: no sync per iteration
    steps: int = 0  # iterations with finite losses: the count the sums are over
    skipped: int = 0  # iterations with a NaN or inf loss, whose updates were skipped
    seconds: float = 0.0

    def add(self, losses):
        for name, value in losses.items():
            self.loss_sums[name] = self.loss_sums.get(name, 0.0) + value.detach().float()
        self.steps += 1

    def means(self):
        return {name: float(total) / self.steps for name, total in self.loss_sums.items()}

    def state_dict(self):
        return {"loss_sums": {k: float(v) for k, v in self.loss_sums.items()}, "steps": self.steps,
                "skipped": self.skipped, "seconds": self.seconds}


def epoch_record(trainer, stage, epoch, iters, tally):
    """One line of log.jsonl: the mean losses over the epoch's finite steps, how many steps were skipped, the head's
    learning rate (the last parameter group) of each optimiser, images a second, memory."""
    cfg = trainer.cfg
    record = {"stage": stage, "epoch": epoch + 1, "iterations": iters, "skipped_steps": tally.skipped}
    record |= {(k if k.startswith("share_") else f"loss_{k}"): mean for k, mean in tally.means().items()}
    for name in ("student", "swin", "res"):
        optimizer = getattr(trainer, f"opt_{name}")
        if optimizer is not None:
            record[f"lr_{name}"] = optimizer.param_groups[-1]["lr"]
    images_per_step = cfg["batch_size"] * (1 if cfg["teachers"] == "none" else 2)
    return record | {"images_per_s": iters * images_per_step / tally.seconds, "seconds": tally.seconds,
                     "peak_mem_mb": peak_memory_mb(trainer.device)}


@torch.no_grad()
def evaluate_all(trainer, val_set, info, stage, panel_path, stop):
    """mIoU of the EMA teachers (and the student in stage 2), and a picture: image | truth | G | L | S. None if a
    signal asked the run to stop meanwhile (one process: a scheduler's grace period is shorter than an evaluation;
    under DDP the ranks finish it together)."""
    cfg, device = trainer.cfg, trainer.device
    models = {"swin": trainer.swin_ema if trainer.uses("swin") else None,
              "res": trainer.res_ema if trainer.uses("res") else None,
              "ema": trainer.student_ema, "student": trainer.student if stage == "student" else None}
    models = {name: model for name, model in models.items() if model is not None}
    inference = dict(mode=cfg["eval_mode"], window=cfg["eval_window"], stride=max(1, cfg["eval_window"] * 2 // 3))
    record = {}
    for name, model in models.items():
        if dist.is_initialized():
            # BatchNorm statistics are per rank unless synced (SyncBatchNorm is CUDA-only): evaluate, and save,
            # the weights of rank 0 on every rank, so the reported mIoU belongs to the saved checkpoint.
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        result = evaluate(model, val_set, info.num_classes, device, amp_dtype=trainer.amp_dtype,
                          stop=(lambda: stop["signal"]) if trainer.world == 1 else None, **inference)
        if result is None:
            return None
        record[f"miou_{name}"] = result["miou"]
    if trainer.rank == 0:
        rows = prediction_rows(list(models.values()), val_set, info, device, count=3, **inference)
        try:
            save_panel(panel_path, rows)
        except OSError as error:
            raise write_error(panel_path, error) from None
    return record


def append_record(path, record):
    """Append one JSON line to log.jsonl (a NaN, say an mIoU of no pixels, is written null: the file stays JSON)."""
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    try:
        with open(path, "a") as log:
            log.write(json.dumps(record) + "\n")
    except OSError as error:
        raise write_error(path, error) from None
    tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


def print_summary(out, best_miou):
    final = next((json.loads(l) for l in reversed((out / "log.jsonl").read_text().splitlines())), {})
    if "miou_student" in final:
        print(f"student mIoU: {final['miou_student']:.2f} (best {best_miou:.2f}; checkpoints in {out})")
    else:  # --student-epochs 0: the teachers alone were trained
        print(", ".join(f"{name} mIoU: {final[f'miou_{name}']:.2f}" for name in ("swin", "res")
                        if f"miou_{name}" in final) + f" (teachers only; checkpoints in {out})")


def peak_memory_mb(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # max resident set size, KiB on Linux


# ================================================================================================ run management
# Everything below keeps a run safe and resumable rather than being the method: flag checks, resume and
# --teachers-from, the checkpoint files, locks, processes and signals.


class RunError(Exception):
    """A mistake in a run's flags, in its run directory or for this machine, or a run that cannot go on (it
    diverged, the disk is full); str() is one line naming the flag or file and what was expected. data.DataError is
    the data's. The command line prints either as `error: ...` and exits 2."""


def given_flags(parser, argv, args):
    """The settings the command line names (rather than leaves to their defaults), for --resume: argparse fills in
    a default only where the namespace holds no value yet, so what still holds the marker was not given."""
    unset = object()
    parsed = parser.parse_args(argv, argparse.Namespace(**{key: unset for key in vars(args)}))
    return {key for key, value in vars(parsed).items() if value is not unset}


def _number(low, high=math.inf, low_open=False):
    """A check that a number lies in [low, high] (or (low, high] with low_open), with the words for the error."""
    ok = lambda v: math.isfinite(v) and (v > low if low_open else v >= low) and v <= high
    words = f"a number above {low}" if low_open else f"{low} or more" if high == math.inf else f"{low} to {high}"
    return ok, words


# What each numeric setting must be: checked before any data is read, so a mistake costs no training time.
SETTING_LIMITS = {
    "batch_size": _number(1), "crop_size": _number(32), "teacher_epochs": _number(0), "student_epochs": _number(0),
    "lr": _number(0, low_open=True), "swin_lr": _number(0, low_open=True), "head_lr_mult": _number(0, low_open=True),
    "lambda_u": _number(0), "lambda_dis": _number(0), "lambda_glo": _number(0), "lambda_loc": _number(0),
    "lambda_cps": _number(0), "cps_rampup": _number(0), "threshold": _number(0, 1), "ema_momentum": _number(0, 1),
    "region": _number(1), "swin_dim": _number(1), "res_width": _number(1), "eval_every": _number(1),
    "eval_window": _number(1), "workers": _number(0), "max_iters": _number(0), "seed": _number(0),
}


def check_settings(cfg, world, device):
    """A run's settings as SETTING_LIMITS asks, and as `world` processes on `device` need them; each mistake is one
    line naming the flag and what was expected."""
    for key, (ok, expected) in SETTING_LIMITS.items():
        if not ok(cfg[key]):
            raise RunError(f"--{key.replace('_', '-')} {cfg[key]}: expected {expected}")
    if not all(depth >= 1 for depth in cfg["swin_depths"]):
        raise RunError(f"--swin-depths {' '.join(map(str, cfg['swin_depths']))}: expected four block counts of 1 "
                       f"or more")
    widths = [cfg["swin_dim"] * 2 ** i for i in range(4)]
    if any(width % max(1, width // 32) for width in widths):  # a head of 32 channels, as in build_networks
        raise RunError(f"--swin-dim {cfg['swin_dim']}: expected a width that heads of 32 channels divide at "
                             f"every stage (such as 12, 24, 48 or 96)")
    if cfg["student_epochs"] == 0 and (cfg["teachers"] in ("none", "ema") or cfg["teacher_epochs"] == 0):
        raise RunError("--student-epochs 0 leaves nothing to train (it needs teachers and --teacher-epochs > 0)")
    if cfg["batch_size"] % world:
        raise RunError(f"--batch-size {cfg['batch_size']}: expected a multiple of the {world} processes")
    if cfg["amp"] == "fp16" and device == "cpu":
        raise RunError("--amp fp16 on the CPU: expected bf16 or off (a CPU emulates fp16, far slower)")


def check_hardware(args):
    """--device, --gpus and --amp against this machine, before any data is read."""
    require_device(args.device)
    if args.gpus < 0:
        raise RunError(f"--gpus {args.gpus}: expected 0 (the CPU) or more")
    spawning = args.gpus > 1 and "RANK" not in os.environ
    if spawning and args.device == "cuda" and torch.cuda.device_count() < args.gpus:
        raise RunError(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                             f"expected at most that many")
    if spawning and args.device == "cpu" and "device" not in args.given:  # not N CPU processes by accident
        raise RunError(f"--gpus {args.gpus}: this machine has no CUDA GPU; expected --gpus 1, or --device cpu "
                             f"--gpus {args.gpus} to try the distributed path in CPU processes")
    if spawning and not args.resume:  # before the processes start (a resumed run's are checked by each of them)
        check_settings({key: getattr(args, key) for key in vars(args)}, args.gpus, args.device)



def native_bf16(device):
    """Whether `device` computes bf16 in hardware: a CUDA GPU that supports it, or a CPU with AVX-512 BF16 or AMX
    (where oneDNN runs bf16 convolutions and matmuls faster than fp32; elsewhere bf16 is emulated)."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()




# --resume continues a run with its saved settings. A flag that differs from them is refused, except these: they
# change how a run goes (how many loader processes, how often it is scored) or where its data lies on this machine,
# never what it trains (the split lists and the classes are checked against the run). --device and --gpus are not
# settings of a run: a run may continue on another machine.
RESUME_MAY_CHANGE = ("workers", "eval_every", "data_root", "splits_dir")
RESUME_KEYS = ("trainer", "config", "epoch", "step", "best_miou")


def run_config(args, world):
    """The run's settings, and with --resume its latest.pt: the saved settings, with the flags that name one of
    RESUME_MAY_CHANGE applied; any other flag that differs from the saved run is a one-line error."""
    out, latest = Path(args.out), Path(args.out) / "latest.pt"
    cfg = {key: value for key, value in vars(args).items() if key not in ("resume", "device", "gpus", "given")}
    if not args.resume:
        if latest.is_file():
            raise RunError(f"--out {out} already holds a run: add --resume to continue it, or pick a new --out")
        check_settings(cfg, world, args.device)
        if cfg["amp"] == "bf16" and not native_bf16(args.device):
            raise RunError(f"--amp bf16: this {args.device} has no native bf16 (a CPU needs AVX-512 BF16 or "
                                 f"AMX) and would emulate it, many times slower than fp32; expected --amp off, the "
                                 f"default here")
        return cfg, None
    if not latest.is_file():
        raise RunError(f"--resume: {latest} does not exist (start without --resume, or name the --out)")
    checkpoint = read_checkpoint(latest, "--resume", RESUME_KEYS, "the latest.pt of a train.py run (best.pt holds "
                                 "the student alone)")
    saved = saved_config(checkpoint["config"])
    if saved["amp"] == "bf16" and not native_bf16(args.device):  # continue in fp32 rather than emulated bf16
        if not ("amp" in args.given and cfg["amp"] == "off"):
            raise RunError(f"--resume: the run in {out} trained in bf16, which this {args.device} only "
                                 f"emulates, many times slower; add --amp off to continue it in fp32 (then it is no "
                                 f"longer bit for bit the straight run), or resume where bf16 is native")
        print(f"note: --amp off: the run in {out} trained in bf16 so far and continues in fp32 from here, so it is "
              f"no longer bit for bit the straight run")
        saved = saved | {"amp": "off"}
    for key in sorted(args.given & set(cfg) - set(RESUME_MAY_CHANGE) - {"out"}):
        if cfg[key] != saved.get(key):
            flag = "--" + key.replace("_", "-")
            raise RunError(f"--resume: the run in {out} has {flag} {saved.get(key)}, this command {cfg[key]}; "
                                 f"drop {flag} to continue it as it was, or start a new --out (a resumed run may "
                                 f"change only {', '.join('--' + k.replace('_', '-') for k in RESUME_MAY_CHANGE)})")
    cfg = saved | {key: cfg[key] for key in args.given & set(RESUME_MAY_CHANGE)}
    check_settings(cfg, world, args.device)
    return cfg, checkpoint


def start_point(trainer, checkpoint, stage1_epochs, out, is_main):
    """(epoch, step, best student mIoU, tally) to start from: a new run's, --resume's saved point, or the start of
    stage 2 with the teachers of --teachers-from. Rank 0 writes config.json."""
    cfg, start = trainer.cfg, (0, 0, -1.0, Tally())
    stage1_log = []
    if checkpoint is not None:
        try:
            trainer.load_state_dict(checkpoint["trainer"])
        except (RuntimeError, KeyError, ValueError, AttributeError) as error:
            raise RunError(f"--resume: {out / 'latest.pt'} does not fit its own config ({one_line(error)[:150]}"
                                 f"); expected the file as train.py wrote it") from None
        saved = checkpoint.get("tally") or {}
        start = (checkpoint["epoch"], checkpoint["step"], checkpoint["best_miou"], Tally(**saved))
    elif cfg["teachers_from"]:
        stage1_log = adopt_teachers(trainer, cfg, cfg["teachers_from"])
        start = (stage1_epochs, 0, -1.0, Tally())
    if is_main:
        write_file(out / "config.json", json.dumps(cfg, indent=1))
        if stage1_log:  # the log reads as a straight run's: stage 1, then ours
            write_file(out / "log.jsonl", "".join(json.dumps(record) + "\n" for record in stage1_log))
    return start


# The two checkpoint files, written here and read by start_point, adopt_teachers and evaluate.load_student:
#   latest.pt  {"trainer": Trainer.state_dict() (the networks by Trainer.STATE name, and "steps"), "config": the run's
#               settings (the table's keys and flags, and the data's num_classes, class_names, palette and
#               val_images),
#               "epoch" and "step" where it stands, "best_miou", "tally" (the epoch's sums so far), "stage"}
#   best.pt    {"student": its state dict, "config", "miou", "epoch"}: the best student alone, for evaluate.py
# A checkpoint of an earlier train.py lacks the settings the table gained since: saved_config fills them in.
def run_state(trainer, epoch, step, best_miou, tally, stage1_epochs):
    """latest.pt: everything to resume exactly."""
    return {"trainer": trainer.state_dict(), "config": trainer.cfg, "epoch": epoch, "step": step,
            "best_miou": best_miou, "tally": tally.state_dict(),
            "stage": "teachers" if epoch < stage1_epochs else "student"}


def best_state(trainer, miou, epoch):
    """best.pt: the best student so far."""
    return {"student": trainer.student.state_dict(), "config": trainer.cfg, "miou": miou, "epoch": epoch}


def saved_config(config):
    """A checkpoint's settings as this train.py reads them: settings the table gained since it was written take the
    table's values (those the code then held), and cps_rampup_iters, which earlier runs stored, is left out (the
    teachers' step computes the ramp from cps_rampup and the epoch's length)."""
    config = {key: value for key, value in config.items() if key != "cps_rampup_iters"}
    return DATASET_DEFAULTS.get(config["dataset"], {}) | config


def val_images(val_set):
    """The val set by its images' names (a count and a digest): best.pt is the best student on one set."""
    names = sorted(os.path.basename(str(image)) for image, _ in val_set.files)
    return {"count": len(names), "sha1": hashlib.sha1("\n".join(names).encode()).hexdigest()[:16]}


def require_same_data(cfg, info, val_set, out):
    """--resume: the data's classes must be those the run trained on, and its val images those best.pt was chosen
    on (a run saved before val_images was recorded is not checked)."""
    then, now = cfg.get("val_images"), val_images(val_set)
    if then is not None and then != now:
        raise RunError(f"--resume: the val images changed since the run in {out} began ({then['count']} images then, "
                       f"{now['count']} now{', other names' if then['count'] == now['count'] else ''}), and best.pt "
                       f"is the best student on the old set; expected the same val images: restore them, or start a "
                       f"new --out")
    if cfg["class_names"] != info.class_names:
        names = lambda classes: ", ".join(classes[:4]) + (", ..." if len(classes) > 4 else "")
        raise RunError(f"--resume: the run in {out} trained on {len(cfg['class_names'])} classes "
                       f"({names(cfg['class_names'])}), the data now has {info.num_classes} ({names(info.class_names)}: "
                       f"classes.txt changed?); expected the classes it trained on: restore classes.txt, or start a "
                       f"new --out")


# What stage 1 does not depend on: the student's losses and schedule (its epochs too, when the teachers are frozen
# in stage 2; otherwise their learning-rate schedule spans both stages), evaluation, workers, where to write.
# The student's architecture is compared all the same: it is built first from the seed, so it shapes the
# teachers' initial weights.
NOT_STAGE_1 = {"out", "teachers_from", "lambda_u", "lambda_dis", "lambda_glo", "lambda_loc", "threshold", "region",
               "ohem", "ohem_threshold", "ohem_min_kept", "pretrained", "eval_every", "eval_mode", "eval_window", "workers",
               "val_images"}


def adopt_teachers(trainer, cfg, run_dir):
    """--teachers-from: load into `trainer` the teachers (weights, EMA copies, optimisers) that `run_dir` had at the
    end of stage 1, after checking that its stage 1 is the one this run would train. Returns its stage-1 log."""
    source = Path(run_dir) / "latest.pt"
    if not source.is_file():
        raise RunError(f"--teachers-from {run_dir}: no latest.pt there (expected a run directory)")
    state = read_checkpoint(source, "--teachers-from", RESUME_KEYS, "the latest.pt of a train.py run")
    theirs = saved_config(state["config"])
    if cfg["teachers"] in ("none", "ema") or cfg["teacher_epochs"] == 0:
        raise RunError("--teachers-from needs teachers (--teachers both|swin|res and --teacher-epochs > 0)")
    ignored = NOT_STAGE_1 | ({"student_epochs"} if cfg["freeze_teachers"] else set())
    for key in sorted(set(cfg) | set(theirs)):
        if key not in ignored and cfg.get(key) != theirs.get(key):
            flag = "--" + key.replace("_", "-")
            raise RunError(f"--teachers-from {run_dir}: its stage 1 had {flag} {theirs.get(key)}, this run "
                                 f"{cfg.get(key)}; expected the same (only the student's losses and epochs may differ)")
    finished = state["epoch"] > cfg["teacher_epochs"] or (state["epoch"] == cfg["teacher_epochs"] and state["step"] == 0)
    if not finished:
        raise RunError(f"--teachers-from {run_dir}: its stage 1 is not over (epoch {state['epoch']} of "
                             f"{cfg['teacher_epochs']}); finish it with --resume first")
    if not cfg["freeze_teachers"] and state["epoch"] != cfg["teacher_epochs"]:
        raise RunError(f"--teachers-from {run_dir}: its teachers trained on in stage 2, so they are no longer "
                             "those of the end of stage 1 (it would work with --freeze-teachers)")
    try:
        for name in ("swin", "res", "swin_ema", "res_ema", "opt_swin", "opt_res", "scaler_teachers"):
            if name in state["trainer"]:
                getattr(trainer, name).load_state_dict(state["trainer"][name])
        trainer.steps["teachers"] = state["trainer"]["steps"]["teachers"]
    except (RuntimeError, KeyError, ValueError, AttributeError) as error:
        raise RunError(f"--teachers-from {source}: does not fit its own config ({one_line(error)[:150]}); "
                             f"expected the file as train.py wrote it") from None
    log = Path(run_dir) / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    return [record for record in records if record["stage"] == "teachers"]


def require_finite_weights(trainer, epoch, out):
    """A run whose weights (or BatchNorm statistics) hold NaN or inf stops before they reach latest.pt or best.pt;
    its last latest.pt stays."""
    for name in ("student", "swin", "res", "student_ema", "swin_ema", "res_ema"):
        model = getattr(trainer, name)
        tensors = [] if model is None else [t for t in model.state_dict().values() if t.is_floating_point()]
        if tensors and not torch.stack([torch.isfinite(t).all() for t in tensors]).all():
            raise RunError(f"the {name} weights hold NaN or inf after epoch {epoch + 1} (the run diverged); "
                                 f"they are not saved ({out / 'latest.pt'}, if any, keeps the epoch before); expected "
                                 f"finite weights: lower --lr or --swin-lr")


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash mid-write never leaves a broken `path`, and a write
    that fails (a full disk, no permission) is one line naming `path`, whose previous version is kept."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:  # through a Python file, a full disk is an OSError that says so
            torch.save(obj, f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch's zip writer turns a failed write into a RuntimeError
        cause = error
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        raise write_error(path, cause or error) from None
    finally:
        tmp.unlink(missing_ok=True)


def lock_run_dir(out):
    """Hold an exclusive lock on OUT/train.lock while this process lives (the system drops it when the process
    ends, however it ends), so that a second train.py into the same --out is refused instead of interleaving."""
    handle = open(out / "train.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        raise RunError(f"--out {out} is in use by another train.py (pid {handle.read().strip() or '?'}); expected a "
                       f"run directory of its own: pick another --out (a seed of its own, say)") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    _HELD_LOCKS.append(handle)


_HELD_LOCKS = []  # open lock files: kept referenced so that their locks last as long as the run


def release_run_dirs():
    """Let go of every run directory this process holds (at the end of a run: tests run several in one process)."""
    while _HELD_LOCKS:
        _HELD_LOCKS.pop().close()


def write_file(path, text):
    try:
        Path(path).write_text(text)
    except OSError as error:
        raise write_error(path, error) from None


def write_error(path, error):
    """The one-line error for a failed write: the file and the cause (such as "no space left on device")."""
    cause = (error.strerror or str(error)).lower() if isinstance(error, OSError) else str(error)
    return RunError(f"cannot write {path}: {cause}; expected a writable folder with free space (any previous "
                          f"{Path(path).name} is kept: free some space, then continue with --resume)")


def stop_signal(stop, trainer):
    """The signal that asks the run to stop (0: none), the same on every rank so that all stop at one iteration."""
    if trainer.world == 1:  # one process needs no device sync
        return stop["signal"]
    flag = torch.tensor(stop["signal"], device=trainer.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def main(argv=None):
    """Check the flags and this machine, then train: here, or in --gpus N processes; a mistake is one line."""
    try:
        args = parse_args(argv)
        check_hardware(args)
        result = spawn(args) if args.gpus > 1 and "RANK" not in os.environ else run(args)
    except (data.DataError, RunError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
    if result.get("signal"):  # stopped by a signal with the state saved: exit as that signal asks
        sys.exit(128 + result["signal"])


def run(args):
    """Train in this process: alone, or as one rank of torchrun / --gpus N (read from the environment). SIGTERM and
    SIGINT (a scheduler's stop, Ctrl-C) ask the loop to stop after the current iteration, with latest.pt saved."""
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    stop = {"signal": 0}
    def request_stop(signum, frame):
        stop["signal"] = signum
    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if distributed:
            dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
            if args.device == "cuda":
                torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return train(args, *((dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)), stop)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
        release_run_dirs()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)


def worker(rank, args, world, port):
    """One process of a run started with --gpus N (not under torchrun)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        run(args)
    except (data.DataError, RunError) as error:
        if rank == 0:
            print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)


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


if __name__ == "__main__":
    main()
