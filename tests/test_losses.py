"""The claims each IGL-DT loss makes, checked against the equations worked out by hand."""
import pytest
import torch
import torch.nn.functional as F

from losses import (IGNORE_INDEX, class_max, cps_loss, discrepancy_loss, dual_teacher_targets, fast_class_max,
                    global_context_loss, local_regional_loss, pseudo_label_loss, sup_loss)


def random_logits(b=2, k=4, h=8, w=8, seed=0):
    return torch.randn(b, k, h, w, generator=torch.Generator().manual_seed(seed)) * 3


def no_ignore(b=2, h=8, w=8):
    return torch.zeros(b, h, w, dtype=torch.bool)


def test_gcl_equals_the_paper_formula():
    logits_s, logits_g = random_logits(seed=1), random_logits(seed=2)
    probs_g = logits_g.softmax(1)
    k_s = logits_s.softmax(1).mean(dim=(2, 3))          # GAP over pixels, (B, N)
    k_g = probs_g.mean(dim=(2, 3))
    by_hand = torch.stack([(k_s[i] - k_g[i]).abs().sum() / k_s.shape[1] for i in range(2)]).mean()
    assert torch.allclose(global_context_loss(logits_s, probs_g, no_ignore()), by_hand, atol=1e-6)


def test_gcl_is_zero_when_class_distributions_match_even_if_pixels_differ():
    logits = random_logits(seed=3)
    shuffled = logits.flatten(2)[:, :, torch.randperm(64)].reshape_as(logits)  # same pixels, other places
    loss = global_context_loss(logits, shuffled.softmax(1), no_ignore())
    assert loss.abs() < 1e-6
    assert local_regional_loss(logits, shuffled.softmax(1), no_ignore(), region=2) > 1e-3


def test_gcl_averages_over_valid_pixels_only():
    logits_s, probs_g = random_logits(seed=4), random_logits(seed=5).softmax(1)
    ignore = no_ignore()
    ignore[:, :, 4:] = True
    changed = probs_g.clone()
    changed[:, :, :, 4:] = torch.roll(changed[:, :, :, 4:], 1, dims=1)  # only ignored pixels change
    assert torch.allclose(global_context_loss(logits_s, probs_g, ignore),
                          global_context_loss(logits_s, changed, ignore))
    by_hand = (logits_s.softmax(1)[..., :4].mean((2, 3)) - probs_g[..., :4].mean((2, 3))).abs().mean()
    assert torch.allclose(global_context_loss(logits_s, probs_g, ignore), by_hand, atol=1e-6)


def test_lrl_equals_the_per_region_formula():
    logits_s, probs_l = random_logits(h=8, w=12, seed=6), random_logits(h=8, w=12, seed=7).softmax(1)
    p_s = logits_s.softmax(1)
    terms = []
    for top in (0, 4):
        for left in (0, 4, 8):
            r_s = p_s[..., top:top + 4, left:left + 4].mean((2, 3))
            r_l = probs_l[..., top:top + 4, left:left + 4].mean((2, 3))
            terms.append((r_s - r_l).abs())                 # (B, K) per region
    by_hand = torch.stack(terms).mean()
    assert torch.allclose(local_regional_loss(logits_s, probs_l, no_ignore(h=8, w=12), region=4), by_hand, atol=1e-6)


def test_lrl_ignores_masked_pixels_and_empty_regions():
    logits_s, probs_l = random_logits(seed=8), random_logits(seed=9).softmax(1)
    ignore = no_ignore()
    ignore[:, 4:, :] = True                                  # the whole bottom row of 4x4 regions is padding
    ignore[:, 0, 0] = True                                   # and one pixel of the top-left region
    loss = local_regional_loss(logits_s, probs_l, ignore, region=4)
    other = probs_l.clone()
    other[:, :, 4:, :] = 1.0 / probs_l.shape[1]
    other[:, :, 0, 0] = torch.tensor([1.0, 0, 0, 0]).view(1, 4)
    assert torch.allclose(loss, local_regional_loss(logits_s, other, ignore, region=4))
    valid = (~ignore).unsqueeze(1).float()
    p_s = logits_s.softmax(1)
    terms = []
    for left in (0, 4):                                      # only the two top regions hold valid pixels
        v = valid[..., 0:4, left:left + 4]
        r_s = (p_s[..., 0:4, left:left + 4] * v).sum((2, 3)) / v.sum((2, 3))
        r_l = (probs_l[..., 0:4, left:left + 4] * v).sum((2, 3)) / v.sum((2, 3))
        terms.append((r_s - r_l).abs())
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-6)


def test_lrl_with_one_region_covering_the_image_is_gcl():
    logits_s, probs_l = random_logits(seed=10), random_logits(seed=11).softmax(1)
    assert torch.allclose(local_regional_loss(logits_s, probs_l, no_ignore(), region=8),
                          global_context_loss(logits_s, probs_l, no_ignore()), atol=1e-6)


def one_pixel_probs(*rows):
    """(1, K, 1, P) probabilities from a list of per-pixel distributions."""
    return torch.tensor(rows, dtype=torch.float32).T.reshape(1, len(rows[0]), 1, len(rows))


def test_dl_follows_the_more_confident_teacher_pixel_by_pixel():
    # pixel 0: agree on class 0; pixel 1: Swin says 1 (0.8), Res says 2 (0.6); pixel 2: Swin 1 (0.5), Res 2 (0.9)
    probs_g = one_pixel_probs([0.99, 0.005, 0.005], [0.1, 0.8, 0.1], [0.3, 0.5, 0.2])
    probs_l = one_pixel_probs([0.97, 0.02, 0.01], [0.2, 0.2, 0.6], [0.05, 0.05, 0.9])
    ignore = torch.zeros(1, 1, 3, dtype=torch.bool)
    agreed, disputed, weight = dual_teacher_targets(probs_g, probs_l, ignore, threshold=0.95)
    assert agreed.tolist() == [[[0, IGNORE_INDEX, IGNORE_INDEX]]]
    assert disputed.tolist() == [[[IGNORE_INDEX, 1, 2]]]           # Swin where it is surer, Res where it is
    assert torch.allclose(weight, torch.tensor([[[0.0, 0.8, 0.9]]]))

    logits_s = torch.randn(1, 3, 1, 3)
    log_p = logits_s.log_softmax(1)[0, :, 0]                       # (K, P)
    by_hand = (0.8 * -log_p[1, 1] + 0.9 * -log_p[2, 2]) / 3        # normalised by the 3 valid pixels
    assert torch.allclose(discrepancy_loss(logits_s, probs_g, probs_l, ignore), by_hand, atol=1e-6)
    assert torch.allclose(pseudo_label_loss(logits_s, probs_g, probs_l, ignore, 0.95), -log_p[0, 0] / 3, atol=1e-6)


def test_dl_respects_the_threshold_and_the_ignore_mask():
    probs_g = one_pixel_probs([0.9, 0.1], [0.99, 0.01], [0.2, 0.8])
    probs_l = one_pixel_probs([0.9, 0.1], [0.99, 0.01], [0.6, 0.4])
    ignore = torch.tensor([[[False, True, True]]])
    agreed, disputed, weight = dual_teacher_targets(probs_g, probs_l, ignore, threshold=0.95)
    assert agreed.tolist() == [[[IGNORE_INDEX] * 3]]               # 0.9 < 0.95; the confident pixel is ignored
    assert disputed.tolist() == [[[IGNORE_INDEX] * 3]] and weight.sum() == 0
    agreed, _, _ = dual_teacher_targets(probs_g, probs_l, torch.zeros_like(ignore), threshold=0.85)
    assert agreed.tolist() == [[[0, 0, IGNORE_INDEX]]]
    logits_s = torch.randn(1, 2, 1, 3)
    assert discrepancy_loss(logits_s, probs_g, probs_l, ignore) == 0
    assert pseudo_label_loss(logits_s, probs_g, probs_l, ignore, 0.95) == 0


def test_cps_is_symmetric_and_uses_the_other_networks_argmax():
    a, b = random_logits(seed=12), random_logits(seed=13)
    ignore = no_ignore()
    assert torch.allclose(cps_loss(a, b, ignore), cps_loss(b, a, ignore))
    by_hand = F.cross_entropy(a, b.argmax(1)) + F.cross_entropy(b, a.argmax(1))
    assert torch.allclose(cps_loss(a, b, ignore), by_hand)


def test_cps_ignored_pixels_contribute_nothing():
    a, b = random_logits(seed=12).requires_grad_(), random_logits(seed=13).requires_grad_()
    ignore = no_ignore()
    ignore[:, :, 5:] = True                                        # the right three columns are padding
    loss = cps_loss(a, b, ignore)
    valid = lambda t: t[..., :5]                                   # CE averages over the valid pixels only
    by_hand = F.cross_entropy(valid(a), valid(b).argmax(1)) + F.cross_entropy(valid(b), valid(a).argmax(1))
    assert torch.allclose(loss, by_hand, atol=1e-6)
    other_a, other_b = a.detach().clone(), b.detach().clone()      # anything at all where the pixels are ignored
    other_a[..., 5:], other_b[..., 5:] = 100.0, -100.0
    assert torch.equal(cps_loss(other_a, other_b, ignore), loss.detach())
    loss.backward()
    assert (a.grad[..., 5:] == 0).all() and (b.grad[..., 5:] == 0).all()
    assert a.grad[..., :5].abs().sum() > 0 and b.grad[..., :5].abs().sum() > 0
    nothing_valid = cps_loss(a, b, torch.ones_like(ignore))        # zero, yet still a graph to call backward on
    assert nothing_valid == 0 and nothing_valid.requires_grad


def test_sup_loss_is_cross_entropy_without_the_255_pixels():
    logits = random_logits(seed=14)
    target = logits.argmax(1)
    target[0, 0, 0] = IGNORE_INDEX
    assert torch.allclose(sup_loss(logits, target), F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX))
    by_hand = F.cross_entropy(logits.permute(0, 2, 3, 1)[target != IGNORE_INDEX], target[target != IGNORE_INDEX])
    assert torch.allclose(sup_loss(logits, target), by_hand, atol=1e-6)


def true_class_probs(*probs):
    """Two-class logits (1, 2, 1, P) whose pixel p gives class 0, the target, probability probs[p]."""
    p = torch.tensor(probs)
    return torch.stack([p.log(), (1 - p).log()]).reshape(1, 2, 1, len(probs))


def test_ohem_keeps_the_pixels_below_the_threshold_or_else_the_hardest_min_kept():
    # Six pixels, target class 0 at each; the last one is labelled 255 and must never count, however hard.
    logits = true_class_probs(0.9, 0.8, 0.6, 0.5, 0.3, 0.01)
    target = torch.tensor([[[0, 0, 0, 0, 0, IGNORE_INDEX]]])
    ce = lambda *probs: -torch.tensor(probs).log()                 # the per-pixel loss, -log p_true
    # Three valid pixels are below 0.7; with min_kept 2 those three are kept, whatever min_kept says.
    assert torch.allclose(sup_loss(logits, target, ohem_threshold=0.7, ohem_min_kept=2), ce(0.6, 0.5, 0.3).mean())
    assert torch.allclose(sup_loss(logits, target, ohem_threshold=0.7, ohem_min_kept=3), ce(0.6, 0.5, 0.3).mean())
    # Too few pass the threshold: the min_kept hardest valid pixels are kept, 0.8 included, 0.9 not.
    assert torch.allclose(sup_loss(logits, target, ohem_threshold=0.7, ohem_min_kept=4),
                          ce(0.8, 0.6, 0.5, 0.3).mean())
    assert torch.allclose(sup_loss(logits, target, ohem_threshold=0.4, ohem_min_kept=2), ce(0.5, 0.3).mean())
    # min_kept above the number of valid pixels keeps them all: plain cross-entropy.
    assert torch.allclose(sup_loss(logits, target, ohem_threshold=0.7, ohem_min_kept=100),
                          ce(0.9, 0.8, 0.6, 0.5, 0.3).mean())
    assert torch.allclose(sup_loss(logits, target, ohem_threshold=0.7, ohem_min_kept=100), sup_loss(logits, target))


def test_no_loss_sends_gradient_into_a_teacher():
    logits_s = random_logits(seed=15).requires_grad_()
    probs_g = random_logits(seed=16).softmax(1).requires_grad_()
    probs_l = random_logits(seed=17).softmax(1).requires_grad_()
    ignore = no_ignore()
    total = (pseudo_label_loss(logits_s, probs_g, probs_l, ignore, 0.0) + discrepancy_loss(logits_s, probs_g, probs_l, ignore)
             + global_context_loss(logits_s, probs_g, ignore) + local_regional_loss(logits_s, probs_l, ignore, 4))
    total.backward()
    assert probs_g.grad is None and probs_l.grad is None
    assert logits_s.grad is not None and logits_s.grad.abs().sum() > 0


@pytest.mark.parametrize("k, dtype", [(4, torch.float32), (11, torch.bfloat16), (300, torch.float32)])
def test_fast_class_max_is_torch_max_over_the_classes_first_class_on_ties(k, dtype):
    """The targets' confidences and labels: `fast_class_max` stands in for `class_max`, torch.max(dim=1), on the hot
    path. Ties are made on purpose (bf16 logits tie often); 300 classes take the wide-index path."""
    scores = random_logits(k=k, seed=7).softmax(1).to(dtype)
    scores[0, k - 1] = scores[0].amax(0)  # class k - 1 ties the maximum at every pixel of image 0
    scores[1, 1:] = scores[1, 0]  # every class ties at every pixel of image 1: the first, 0, is the answer
    values, indices = fast_class_max(scores)
    expected_values, expected_indices = class_max(scores)  # scores.max(dim=1)
    assert torch.equal(values, expected_values) and torch.equal(indices, expected_indices)
    assert (indices[1] == 0).all() and (indices[0] < k - 1).any()


def test_fast_class_max_gives_a_valid_label_where_the_scores_hold_a_nan():
    scores = random_logits(seed=8).softmax(1)
    scores[0, 2, 3, 4] = float("nan")
    values, indices = fast_class_max(scores)
    assert values[0, 3, 4].isnan() and 0 <= indices[0, 3, 4] < scores.shape[1]
    keep = torch.ones_like(indices, dtype=torch.bool)
    keep[0, 3, 4] = False
    assert torch.equal(indices[keep], scores.max(dim=1).indices[keep])


def test_pl_and_dl_from_the_steps_targets_equal_their_own():
    """train.py passes the step's `dual_teacher_targets` to both losses; computed inside, they give the same values."""
    logits_s = random_logits(seed=20)
    probs_g, probs_l = random_logits(seed=21).softmax(1), random_logits(seed=22).softmax(1)
    ignore = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(23)) < 0.2
    targets = dual_teacher_targets(probs_g, probs_l, ignore, threshold=0.4)
    assert pseudo_label_loss(logits_s, probs_g, probs_l, ignore, 0.4, targets=targets) == \
        pseudo_label_loss(logits_s, probs_g, probs_l, ignore, 0.4) > 0
    assert discrepancy_loss(logits_s, probs_g, probs_l, ignore, targets=targets) == \
        discrepancy_loss(logits_s, probs_g, probs_l, ignore) > 0
