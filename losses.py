"""The IGL-DT losses, each a pure function of tensors.

Notation used in every docstring:
    B batch, K classes, H x W pixels.
    logits  (B, K, H, W)  raw network outputs (any dtype; everything below is computed in fp32)
    probs   (B, K, H, W)  a teacher's softmax, already detached (teachers are EMA copies, no gradient)
    ignore  (B, H, W)     bool, True for pixels that carry no information (crop padding, label 255)
    p = softmax(logits), the student's class probabilities.
    G, L  the global teacher (the Swin-UNet) and the local teacher (the ResUNet): probs_g, probs_l; train.py
          names its tensors the same way, and its networks (swin, res) by their architecture.

The student objective assembled in train.py is
    L = L_l + lambda_u * (L_pl + lambda_dis * L_dis + lambda_glo * L_glo + lambda_loc * L_loc)
and the teachers' objective (both stages) is
    L_T = sup(G) + sup(L) + lambda_cps * ramp * L_cps   (ramp: 0 to 1 over the first cps_rampup epochs).
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255


def sup_loss(logits, target, ohem_threshold=None, ohem_min_kept=100_000):
    """Supervised cross-entropy, L_l = CE(logits, y), pixels labelled 255 ignored.

    logits (B, K, H, W), target (B, H, W) long. With `ohem_threshold` only the hard pixels are kept: those whose
    true-class probability is below the threshold, and at least `ohem_min_kept` of the hardest ones, as in the OHEM
    loss of the Cityscapes recipes of CPS and UniMatch (train.py passes its table's two values; the default here is
    the recipes', so the function also works copied alone).
    """
    logits = logits.float()
    if ohem_threshold is None:
        return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    pixel_loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none").flatten()
    valid = target.flatten() != IGNORE_INDEX
    pixel_loss = pixel_loss[valid]
    if pixel_loss.numel() == 0:
        return logits.sum() * 0.0
    hard = pixel_loss > -torch.log(torch.tensor(ohem_threshold, device=logits.device))
    if hard.sum() < min(ohem_min_kept, pixel_loss.numel()):
        # Too few pixels pass the threshold: keep the hardest `ohem_min_kept` instead.
        return pixel_loss.topk(min(ohem_min_kept, pixel_loss.numel())).values.mean()
    return pixel_loss[hard].mean()


def class_max(scores):
    """The top class of each pixel and its score: (values, indices), (B, H, W) each, from (B, K, H, W) scores; the
    first class on a tie."""
    return scores.max(dim=1)


def fast_class_max(scores):
    """Equivalent to `class_max` (scores.max(dim=1)), built from amax and a comparison: on a CPU, max with indices
    (and argmax) over a strided class axis is much slower than amax, and the targets take it three times a step.
    tests/test_losses.py holds the two equal, ties included.

    Each class is weighted K - k where it holds the maximum, so the largest weight names the first such class.
    Where a pixel's scores hold a NaN the index is K - 1 (torch.max names the NaN's class): a valid label either
    way, and the NaN reaches the loss."""
    values = scores.amax(dim=1, keepdim=True)
    k = scores.shape[1]
    weights = torch.arange(k, 0, -1, device=scores.device, dtype=torch.uint8 if k < 256 else torch.int64)
    first = ((scores == values) * weights.view(1, k, 1, 1)).amax(dim=1)
    return values.squeeze(1), (k - first.long()).clamp_(max=k - 1)


def _hard_labels(probs_or_logits, ignore):
    """argmax over classes, with ignored pixels set to 255 so CE skips them. (B, K, H, W) -> (B, H, W)."""
    _, labels = fast_class_max(probs_or_logits.detach())
    return labels.masked_fill(ignore, IGNORE_INDEX)


def cps_loss(logits_a, logits_b, ignore):
    """Cross Pseudo Supervision (Chen et al. 2021): each network learns the other's hard pseudo-labels.

        L_cps = CE(logits_a, argmax logits_b) + CE(logits_b, argmax logits_a)

    logits_a, logits_b (B, K, H, W) from two networks on the same image; pseudo-labels are detached, so each
    term sends gradient into one network only. Returns a scalar; symmetric in (a, b).
    """
    labels_from_b = _hard_labels(logits_b, ignore)
    labels_from_a = _hard_labels(logits_a, ignore)
    if (~ignore).sum() == 0:
        return (logits_a.float().sum() + logits_b.float().sum()) * 0.0
    return (F.cross_entropy(logits_a.float(), labels_from_b, ignore_index=IGNORE_INDEX)
            + F.cross_entropy(logits_b.float(), labels_from_a, ignore_index=IGNORE_INDEX))


def _masked_average(probs, valid):
    """Average of probs over the valid pixels of each image. probs (B, K, H, W), valid (B, 1, H, W) -> (B, K)."""
    return (probs * valid).sum(dim=(2, 3)) / valid.sum(dim=(2, 3)).clamp(min=1.0)


def global_context_loss(logits_s, probs_g, ignore):
    """Global Context Learning (GCL): match the student's image-level class distribution to the Swin teacher's.

        K_S = GAP(p_S),  K_G = GAP(p_G)                  (B, K), averaged over the valid pixels only
        L_glo = (1 / N) * sum_i |K_S,i - K_G,i|           N = number of classes, then the mean over the batch

    logits_s (B, K, H, W) student, probs_g (B, K, H, W) Swin-UNet teacher (detached), ignore (B, H, W).
    Zero exactly when, image by image, both predict the same share of every class.
    """
    valid = (~ignore).unsqueeze(1).float()
    k_student = _masked_average(logits_s.float().softmax(dim=1), valid)
    k_swin = _masked_average(probs_g.detach().float(), valid)
    return (k_student - k_swin).abs().mean()


def local_regional_loss(logits_s, probs_l, ignore, region=32):
    """Local Regional Learning (LRL): GCL on every `region` x `region` cell, taught by the ResUNet teacher.

        R_S[r] = mean of p_S over the valid pixels of region r,  R_L[r] likewise for p_L     (B, K, h, w)
        L_loc  = mean over images, regions and classes of |R_S - R_L|

    The image is tiled from the top-left corner; border cells are smaller when H or W is not a multiple of
    `region`. Regions without a single valid pixel (all padding) are left out of the mean.
    logits_s (B, K, H, W), probs_l (B, K, H, W) detached, ignore (B, H, W) -> scalar.
    """
    valid = (~ignore).unsqueeze(1).float()
    # Sum-pool with ceil_mode so border cells count; dividing two sums gives the masked mean per region.
    pool = lambda t: F.avg_pool2d(t, region, stride=region, ceil_mode=True) * region * region
    valid_count = pool(valid)
    r_student = pool(logits_s.float().softmax(dim=1) * valid) / valid_count.clamp(min=1.0)
    r_res = pool(probs_l.detach().float() * valid) / valid_count.clamp(min=1.0)
    regions_used = (valid_count > 0).float()
    num_terms = regions_used.sum() * logits_s.shape[1]
    return ((r_student - r_res).abs() * regions_used).sum() / num_terms.clamp(min=1.0)


class TeacherTargets(NamedTuple):
    """The per-pixel targets of `dual_teacher_targets`, (B, H, W) each."""
    agreed: torch.Tensor    # long, 255 outside the kept agreed pixels: L_pl's target
    disputed: torch.Tensor  # long, 255 outside the disputed pixels: L_dis's target
    weight: torch.Tensor    # fp32, the chosen teacher's confidence at each disputed pixel (0 elsewhere): L_dis's weight


def dual_teacher_targets(probs_g, probs_l, ignore, threshold):
    """Per-pixel targets from two teachers, computed once a step and shared by `pseudo_label_loss` and
    `discrepancy_loss`.

    Where the teachers agree (same argmax): target = argmax((p_G + p_L) / 2), kept where that mean confidence
    is >= threshold. Where they disagree: target = argmax of the teacher that is more confident at that pixel,
    weighted by that teacher's confidence (no threshold: the weight already scales an unsure target down,
    and a high threshold would remove nearly every disputed pixel).

    probs_g, probs_l (B, K, H, W), ignore (B, H, W). Returns TeacherTargets(agreed, disputed, weight).
    """
    probs_g, probs_l = probs_g.detach().float(), probs_l.detach().float()
    conf_g, label_g = fast_class_max(probs_g)
    conf_l, label_l = fast_class_max(probs_l)
    agree = (label_g == label_l) & ~ignore
    disagree = (label_g != label_l) & ~ignore

    conf_mean, label_mean = fast_class_max((probs_g + probs_l) / 2)
    agreed_target = label_mean.masked_fill(~(agree & (conf_mean >= threshold)), IGNORE_INDEX)

    swin_is_surer = conf_g >= conf_l
    disputed_target = torch.where(swin_is_surer, label_g, label_l).masked_fill(~disagree, IGNORE_INDEX)
    disputed_weight = torch.where(swin_is_surer, conf_g, conf_l) * disagree
    return TeacherTargets(agreed_target, disputed_target, disputed_weight)


def _mean_over_valid(pixel_loss, ignore):
    """Sum of a per-pixel loss divided by the number of valid pixels (UniMatch's normalisation: a batch
    where few pixels pass the threshold contributes a proportionally smaller loss)."""
    return pixel_loss.sum() / (~ignore).sum().clamp(min=1)


def pseudo_label_loss(logits_s, probs_g, probs_l, ignore, threshold, targets=None):
    """L_pl: cross-entropy to the teachers' agreed, confident pseudo-label (see `dual_teacher_targets`).

        L_pl = (1 / |valid|) * sum_{agree, conf >= t} CE(p_S, argmax (p_G + p_L) / 2)

    logits_s (B, K, H, W) on the strong view; probs_g, probs_l (B, K, H, W) on the weak view (mixed alike);
    ignore (B, H, W). `targets`: `dual_teacher_targets(probs_g, probs_l, ignore, threshold)` where the caller has
    them already (train.py computes them once a step, for L_pl, L_dis and its logged shares).
    """
    if targets is None:
        targets = dual_teacher_targets(probs_g, probs_l, ignore, threshold)
    pixel_loss = F.cross_entropy(logits_s.float(), targets.agreed, ignore_index=IGNORE_INDEX, reduction="none")
    return _mean_over_valid(pixel_loss, ignore)


def discrepancy_loss(logits_s, probs_g, probs_l, ignore, targets=None):
    """Discrepancy Learning (DL): where the teachers disagree, follow the one that is surer at that pixel.

        L_dis = (1 / |valid|) * sum_{disagree} c * CE(p_S, y),
        y = argmax p_T, c = max p_T, T = argmax over {G, L} of the teacher's confidence at the pixel

    so the student relies on neither teacher by rule. Shapes and `targets` as in `pseudo_label_loss` (the disputed
    targets do not depend on its threshold).
    """
    if targets is None:
        targets = dual_teacher_targets(probs_g, probs_l, ignore, threshold=0.0)
    pixel_loss = F.cross_entropy(logits_s.float(), targets.disputed, ignore_index=IGNORE_INDEX, reduction="none")
    return _mean_over_valid(targets.weight * pixel_loss, ignore)
