"""The claims data.py makes: the published split counts, reproducible lists and views, and clear errors."""
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import (CITYSCAPES_TRAIN_IDS, IGNORE_INDEX, DataError, build_datasets, colorize, cutmix, cutmix_box,
                  load_image, main, normalize, synthetic_scene)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------- fake dataset trees
def save_image(path, size=(40, 30), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def save_mask(path, size=(40, 30), num_classes=4, seed=0, values=None, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.arange(num_classes) if values is None else np.asarray(values)
    ids = np.random.default_rng(seed).choice(values, (size[1], size[0])).astype(np.uint8)
    mask = Image.fromarray(ids)
    if mode == "P":  # VOC's fine masks are palette PNGs whose indices are the class ids
        mask = mask.convert("P")
        mask.putpalette([c for rgb in data.voc_palette(256) for c in rgb])
        mask.putdata(ids.ravel().tolist())
    mask.save(path)


def voc_id(i):
    return f"{2007 + i % 5}_{i:06d}"


def make_voc(root, pool=32, fine=8, val=6, files=True):
    """VOC 2012 + SBD naming: ids like 2007_000032; the first `fine` pool ids have fine masks too."""
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    pool_ids, val_ids = [voc_id(i) for i in range(pool)], [voc_id(pool + i) for i in range(val)]
    (sets / "train_aug.txt").write_text("".join(f"{i}\n" for i in pool_ids))
    (sets / "train.txt").write_text("".join(f"{i}\n" for i in pool_ids[:fine]))
    (sets / "val.txt").write_text("".join(f"{i}\n" for i in val_ids))
    if files:
        for n, i in enumerate(pool_ids + val_ids):
            save_image(root / "JPEGImages" / f"{i}.jpg", seed=n)
            if i in pool_ids:
                save_mask(root / "SegmentationClassAug" / f"{i}.png", num_classes=21, seed=n)
            if i in val_ids or i in pool_ids[:fine]:
                save_mask(root / "SegmentationClass" / f"{i}.png", num_classes=21, seed=n, mode="P")
    return pool_ids, val_ids


def copy_bytes(source, paths):
    content = source.read_bytes()
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


@pytest.fixture(scope="module")
def voc_classic(tmp_path_factory):
    """Enough fine images for the classic 92 split: 120 ids, 100 of them with fine masks, one tiny file copied."""
    root = tmp_path_factory.mktemp("voc_classic")
    pool_ids, val_ids = make_voc(root, pool=120, fine=100, val=2, files=False)
    save_image(root / "one.jpg", size=(4, 3))
    save_mask(root / "one.png", size=(4, 3), num_classes=21)
    copy_bytes(root / "one.jpg", [root / "JPEGImages" / f"{i}.jpg" for i in pool_ids + val_ids])
    copy_bytes(root / "one.png", [root / "SegmentationClassAug" / f"{i}.png" for i in pool_ids])
    copy_bytes(root / "one.png", [root / "SegmentationClass" / f"{i}.png" for i in pool_ids[:100] + val_ids])
    return root


def make_cityscapes(root, train=6, val=2, label_ids=(7, 26, 0, 33)):
    cities = ["aachen", "bochum", "zurich"]
    for split, count in (("train", train), ("val", val)):
        for n in range(count):
            city = cities[n % 3]
            stem = f"{city}_{n:06d}_000019"
            save_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", seed=n)
            save_mask(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", values=label_ids, seed=n)


def make_folder(root, train=12, val=4, unlabeled=3, num_classes=4, classes_txt=True):
    for split, count in (("train", train), ("val", val)):
        for n in range(count):
            save_image(root / "images" / split / f"frame{n:03d}.png", seed=n)
            save_mask(root / "masks" / split / f"frame{n:03d}.png", num_classes=num_classes, seed=n)
    for n in range(unlabeled):
        save_image(root / "images" / "unlabeled" / f"extra{n}.jpg", seed=100 + n)
    if classes_txt:
        (root / "classes.txt").write_text("".join(f"thing{k}\n" for k in range(num_classes)))
    return root


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "folder")


def build_folder(root, tmp_path, crop_size=32, seed=0, split="1/4"):
    return build_datasets("folder", str(root), split, str(tmp_path / "splits"), crop_size=crop_size, seed=seed)


def one_line_error(call, *words):
    with pytest.raises(DataError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert str(word) in message
    return message


# ----------------------------------------------------------------------------------------------- split counts
# The published counts come from labeled_count and draw_split given the pool; the builder's tests below show it
# hands them the right pool (a 10,582-file tree would cost this test suite a minute of disk I/O).
def id_pairs(n, masks="SegmentationClassAug"):
    return [(f"JPEGImages/{voc_id(i)}.jpg", f"{masks}/{voc_id(i)}.png") for i in range(n)]


@pytest.mark.parametrize("split, count", [("1/16", 662), ("1/8", 1_323), ("1/4", 2_646), ("1/2", 5_291)])
def test_voc_blended_split_has_the_published_count(split, count):
    pool = id_pairs(10_582)
    labeled, unlabeled = data.draw_split(pool, pool, data.labeled_count("voc", split, len(pool)), seed=0)
    assert (len(labeled), len(unlabeled)) == (count, 10_582 - count)


@pytest.mark.parametrize("split", ["92", "183", "366", "732", "1464"])
def test_voc_classic_split_draws_the_given_count_from_the_fine_images(split):
    pool, fine = id_pairs(10_582), id_pairs(1_464, "SegmentationClass")
    labeled, unlabeled = data.draw_split(fine, pool, data.labeled_count("voc", split, len(fine)), seed=0)
    assert (len(labeled), len(unlabeled)) == (int(split), 10_582 - int(split))
    assert set(labeled) <= set(fine) and not {image for image, _ in labeled} & {image for image, _ in unlabeled}


@pytest.mark.parametrize("split, count", [("1/16", 186), ("1/8", 372), ("1/4", 744), ("1/2", 1_488)])
def test_cityscapes_split_has_the_published_count(split, count):
    assert data.labeled_count("cityscapes", split, 2_975) == count


def test_voc_builder_draws_the_classic_split_from_train_txt(voc_classic, tmp_path):
    labeled, unlabeled, val, _ = build_datasets("voc", str(voc_classic), "92", str(tmp_path))
    fine = set((voc_classic / "ImageSets/Segmentation/train.txt").read_text().split())
    assert (len(labeled), len(unlabeled), len(val)) == (92, 120 - 92, 2)
    assert all(Path(image).stem in fine and "/SegmentationClass/" in mask for image, mask in labeled.files)
    lines = (tmp_path / "voc" / "92" / "labeled.txt").read_text().splitlines()
    assert len(lines) == 92 and lines[0] == f"JPEGImages/{Path(labeled.files[0][0]).stem}.jpg " \
                                           f"SegmentationClass/{Path(labeled.files[0][0]).stem}.png"


def test_voc_and_cityscapes_builders_take_the_fraction_of_their_pool(voc_classic, tmp_path):
    labeled, unlabeled, _, _ = build_datasets("voc", str(voc_classic), "1/16", str(tmp_path))
    assert (len(labeled), len(unlabeled)) == (8, 112)  # 120 / 16 = 7.5
    assert all("/SegmentationClassAug/" in mask for _, mask in labeled.files)
    make_cityscapes(tmp_path / "cs", train=6)
    labeled, unlabeled, val, info = build_datasets("cityscapes", str(tmp_path / "cs"), "1/4", str(tmp_path))
    assert (len(labeled), len(unlabeled), len(val), info.num_classes) == (2, 4, 2, 19)  # 6 / 4 = 1.5


def test_folder_and_synthetic_splits_are_that_fraction_rounded_up_or_a_count(folder, tmp_path):
    assert len(build_folder(folder, tmp_path, split="1/8")[0]) == 2  # 12 / 8 = 1.5
    assert len(build_folder(folder, tmp_path, split="5")[0]) == 5
    assert len(build_datasets("synthetic", split="1/16", splits_dir=str(tmp_path))[0]) == 15
    labeled, unlabeled, _, _ = build_datasets("synthetic", split="46", splits_dir=str(tmp_path))
    assert (len(labeled), len(unlabeled)) == (46, data.SYNTHETIC_TRAIN - 46)
    assert (tmp_path / "synthetic" / "46" / "labeled.txt").is_file()


def test_labeled_and_unlabeled_split_the_pool(tmp_path):
    pool_ids, _ = make_voc(tmp_path / "voc")
    labeled, unlabeled, val, _ = build_datasets("voc", str(tmp_path / "voc"), "1/4", str(tmp_path / "splits"))
    images = lambda dataset: [Path(image).stem for image, _ in dataset.files]
    assert len(images(labeled)) == 8 and len(val) == 6
    assert set(images(labeled)).isdisjoint(images(unlabeled))
    assert sorted(images(labeled) + images(unlabeled)) == sorted(pool_ids)


def test_same_seed_gives_same_split(folder, tmp_path):
    lists = []
    for run, seed in enumerate([0, 0, 1]):
        build_datasets("folder", str(folder), "1/4", str(tmp_path / f"run{run}"), seed=seed)
        directory = data.split_directory(tmp_path / f"run{run}", "folder", folder, "1/4")
        lists.append(Path(directory, "labeled.txt").read_text())
    assert lists[0] == lists[1]
    assert lists[0] != lists[2]


def test_split_file_in_community_format_is_read_as_given(tmp_path):
    pool_ids, _ = make_voc(tmp_path / "voc")
    # UniMatch's lists name SegmentationClass/ even for SBD-only images, kept here in SegmentationClassAug/.
    chosen = [pool_ids[20], pool_ids[3], pool_ids[11]]
    given = "".join(f"JPEGImages/{i}.jpg SegmentationClass/{i}.png\n" for i in chosen)
    directory = tmp_path / "splits" / "voc" / "1_16"
    directory.mkdir(parents=True)
    (directory / "labeled.txt").write_text(given)
    (directory / "unlabeled.txt").write_text(f"JPEGImages/{pool_ids[0]}.jpg SegmentationClass/{pool_ids[0]}.png\n")
    labeled, unlabeled, _, _ = build_datasets("voc", str(tmp_path / "voc"), "1/16", str(tmp_path / "splits"))
    assert [Path(image).stem for image, _ in labeled.files] == chosen
    assert labeled.files[0][1].endswith(f"SegmentationClassAug/{chosen[0]}.png")
    assert labeled.files[1][1].endswith(f"SegmentationClass/{chosen[1]}.png")  # a fine image: kept as named
    assert len(unlabeled) == 1 and (directory / "labeled.txt").read_text() == given
    mask = labeled[0][1]  # loads through the fallback
    assert ((mask < 21) | (mask == IGNORE_INDEX)).all()


def test_cityscapes_lists_naming_train_id_files_are_read_from_the_label_ids(tmp_path):
    make_cityscapes(tmp_path / "cs")
    stem = "leftImg8bit/train/aachen/aachen_000000_000019"
    directory = tmp_path / "splits" / "cityscapes" / "1_8"
    directory.mkdir(parents=True)
    (directory / "labeled.txt").write_text(
        f"{stem}_leftImg8bit.png gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png\n")
    (directory / "unlabeled.txt").write_text(f"{stem.replace('000000', '000003')}_leftImg8bit.png\n")
    labeled, _, _, _ = build_datasets("cityscapes", str(tmp_path / "cs"), "1/8", str(tmp_path / "splits"))
    assert labeled.files[0][1].endswith("_gtFine_labelIds.png")
    assert set(labeled[0][1].unique().tolist()) <= {0, 13, 18, IGNORE_INDEX}


def test_label_ids_map_to_the_19_train_ids(tmp_path):
    # cityscapesScripts' labels.py: (name, labelId) of the 19 evaluated classes, in trainId order.
    standard = [("road", 7), ("sidewalk", 8), ("building", 11), ("wall", 12), ("fence", 13), ("pole", 17),
                ("traffic light", 19), ("traffic sign", 20), ("vegetation", 21), ("terrain", 22), ("sky", 23),
                ("person", 24), ("rider", 25), ("car", 26), ("truck", 27), ("bus", 28), ("train", 31),
                ("motorcycle", 32), ("bicycle", 33)]
    assert CITYSCAPES_TRAIN_IDS == {label_id: train_id for train_id, (_, label_id) in enumerate(standard)}
    assert data.CITYSCAPES_CLASSES == [name for name, _ in standard] and len(data.CITYSCAPES_COLORS) == 19
    void = [i for i in range(256) if i not in dict(standard).values()]
    assert all(data.LABEL_ID_TO_TRAIN_ID[i] == IGNORE_INDEX for i in void)

    make_cityscapes(tmp_path / "cs", label_ids=(0, 7, 9, 23, 26, 33))
    _, _, val, _ = build_datasets("cityscapes", str(tmp_path / "cs"), "1/2", str(tmp_path / "splits"))
    label_ids = torch.from_numpy(np.array(Image.open(val.files[0][1]), dtype=np.int64))
    expected = torch.full_like(label_ids, IGNORE_INDEX)
    for label_id, train_id in [(7, 0), (23, 10), (26, 13), (33, 18)]:
        expected[label_ids == label_id] = train_id
    assert torch.equal(val[0][1], expected)


def test_folder_classes_come_from_classes_txt_or_the_masks(tmp_path):
    _, _, _, info = build_folder(make_folder(tmp_path / "a"), tmp_path / "a")
    assert info.class_names == ["thing0", "thing1", "thing2", "thing3"] and len(info.palette) == 4
    _, _, _, info = build_folder(make_folder(tmp_path / "b", num_classes=6, classes_txt=False), tmp_path / "b")
    assert info.num_classes == 6 and info.class_names[-1] == "class5"


def test_folder_unlabeled_images_join_the_unlabeled_pool(folder, tmp_path):
    labeled, unlabeled, val, _ = build_folder(folder, tmp_path)
    assert (len(labeled), len(unlabeled), len(val)) == (3, 9 + 3, 4)
    directory = data.split_directory(tmp_path / "splits", "folder", folder, "1/4")
    lines = Path(directory, "unlabeled.txt").read_text().splitlines()
    assert "images/unlabeled/extra0.jpg" in lines  # one field: no mask
    assert unlabeled[len(unlabeled) - 1][0].shape == (3, 32, 32)


def test_synthetic_scenes_are_fixed_and_hold_every_class():
    image, mask = synthetic_scene("train", 12)
    again, mask_again = synthetic_scene("train", 12)
    assert image.size == (data.SYNTHETIC_SIZE, data.SYNTHETIC_SIZE)
    assert np.array_equal(np.array(image), np.array(again)) and np.array_equal(np.array(mask), np.array(mask_again))
    assert not np.array_equal(np.array(image), np.array(synthetic_scene("val", 12)[0]))
    seen = set()
    for i in range(20):
        seen |= set(np.unique(np.array(synthetic_scene("train", i)[1])).tolist())
    assert seen == set(range(len(data.SYNTHETIC_CLASSES)))


def test_synthetic_classes_are_not_separable_by_colour_alone():
    """Labels matter: the best per-pixel colour rule (nearest class mean) misses many object pixels."""
    scenes = [synthetic_scene("train", i) for i in range(40)]
    pixels = np.concatenate([np.array(image).reshape(-1, 3) for image, _ in scenes]).astype(np.float32)
    labels = np.concatenate([np.array(mask).ravel() for _, mask in scenes])
    objects = labels > 0
    means = np.stack([pixels[labels == k].mean(0) for k in range(1, 5)])
    nearest = 1 + ((pixels[objects, None] - means) ** 2).sum(-1).argmin(1)
    assert (nearest == labels[objects]).mean() < 0.75


def test_synthetic_split_files_use_virtual_paths(tmp_path):
    labeled, _, val, _ = build_datasets("synthetic", split="1/8", splits_dir=str(tmp_path), crop_size=64)
    first = (tmp_path / "synthetic" / "1_8" / "labeled.txt").read_text().splitlines()[0]
    index = int(first.split()[0][len("train/"):-len(".png")])
    assert first == f"train/{index:04d}.png train/{index:04d}_mask.png"
    assert np.array_equal(np.array(labeled.scenes[0][0]), np.array(synthetic_scene("train", index)[0]))
    assert val[0][0].shape == (3, data.SYNTHETIC_SIZE, data.SYNTHETIC_SIZE)

    directory = tmp_path / "given" / "synthetic" / "1_8"
    directory.mkdir(parents=True)
    (directory / "labeled.txt").write_text("train/0003.png train/0003_mask.png\n")
    (directory / "unlabeled.txt").write_text("train/0007.png\ntrain/0999.png\n")
    one_line_error(lambda: build_datasets("synthetic", split="1/8", splits_dir=str(tmp_path / "given")),
                   "train/0999.png", "unlabeled.txt")


# -------------------------------------------------------------------------------------------------------- views
def test_labeled_sample_shapes_and_dtypes(folder, tmp_path):
    labeled, _, _, _ = build_folder(folder, tmp_path, crop_size=32)
    image, mask = labeled[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert mask.shape == (32, 32) and mask.dtype == torch.int64


def test_unlabeled_sample_shapes_and_dtypes(folder, tmp_path):
    _, unlabeled, _, _ = build_folder(folder, tmp_path, crop_size=32)
    weak, strong, ignore_mask, box = unlabeled[0]
    assert weak.shape == strong.shape == (3, 32, 32) and weak.dtype == strong.dtype == torch.float32
    assert ignore_mask.shape == box.shape == (32, 32)
    assert ignore_mask.dtype == box.dtype == torch.bool


def test_val_sample_is_the_whole_image(folder, tmp_path):
    _, _, val, _ = build_folder(folder, tmp_path)
    image, mask = val[1]
    assert image.shape == (3, 30, 40) and mask.shape == (30, 40) and mask.dtype == torch.int64
    assert torch.equal(image, normalize(load_image(val.files[1][0])))
    assert torch.equal(mask, torch.from_numpy(np.array(Image.open(val.files[1][1]), dtype=np.int64)))


def test_mask_values_are_classes_or_ignore(folder, tmp_path):
    labeled, _, _, info = build_folder(folder, tmp_path, crop_size=48)
    values = set()
    for epoch in range(4):
        labeled.set_epoch(epoch)
        values |= {v for i in range(len(labeled)) for v in labeled[i][1].unique().tolist()}
    assert values <= set(range(info.num_classes)) | {IGNORE_INDEX}
    assert IGNORE_INDEX in values and 0 in values  # crops of 48 from 20x15..80x60 images are sometimes padded


def test_padded_pixels_are_ignored(folder, tmp_path):
    labeled, unlabeled, _, _ = build_folder(folder, tmp_path, crop_size=96)  # larger than any rescaled image
    for i in range(3):
        image, mask = labeled[i]
        padded = (image == 0).all(dim=0)  # no real pixel normalises to exactly 0 in all three channels
        assert 0 < padded.sum() < padded.numel()
        assert torch.equal(mask == IGNORE_INDEX, padded)  # the fake masks hold no 255 of their own
        weak, strong, ignore_mask, _ = unlabeled[i]
        assert 0 < ignore_mask.sum() < ignore_mask.numel()
        assert torch.equal((weak == 0).all(dim=0), ignore_mask) and torch.equal((strong == 0).all(dim=0), ignore_mask)


def test_strong_view_is_the_weak_view_recoloured(folder, tmp_path, monkeypatch):
    _, unlabeled, _, _ = build_folder(folder, tmp_path, crop_size=32)
    changed = sum(not torch.allclose(unlabeled[i][0], unlabeled[i][1]) for i in range(len(unlabeled)))
    assert changed >= len(unlabeled) // 2
    monkeypatch.setattr(data, "strong_colors", lambda rng, image: image)  # same geometry, nothing else
    for i in range(len(unlabeled)):
        weak, strong, _, _ = unlabeled[i]
        assert torch.equal(weak, strong)


def test_strong_colours_follow_their_probabilities():
    """Jitter p=0.8 (seen as moved channel means unless grayscale hid it: 0.8 x 0.8), grayscale p=0.2, blur p=0.5
    (seen as smoother noise, except for the smallest sigmas)."""
    y, x = np.mgrid[0:32, 0:32]
    colourful = Image.fromarray(np.stack([x * 8, y * 8, 255 - x * 8], -1).astype(np.uint8))
    noise = np.random.default_rng(0).integers(80, 171, (32, 32, 1)).repeat(3, -1).astype(np.uint8)
    roughness = lambda a: np.abs(np.diff(a[..., 0].astype(float), axis=1)).mean() / a[..., 0].std()
    gray = jitter = blur = 0
    for seed in range(300):
        out = np.asarray(data.strong_colors(np.random.default_rng(seed), colourful)).astype(float)
        is_gray = (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
        gray += is_gray
        jitter += not is_gray and np.abs(out.mean((0, 1)) - np.asarray(colourful).mean((0, 1))).max() > 1
        blurred = np.asarray(data.strong_colors(np.random.default_rng(seed), Image.fromarray(noise)))
        blur += roughness(blurred) < 0.85 * roughness(noise)
    assert 0.13 < gray / 300 < 0.27 and 0.5 < jitter / 300 < 0.7 and 0.3 < blur / 300 < 0.6


def test_cutmix_applies_to_images_and_ignore_masks_alike(folder, tmp_path):
    _, unlabeled, _, _ = build_folder(folder, tmp_path, crop_size=64)
    batch = [unlabeled[i] for i in range(len(unlabeled))]
    strong = torch.stack([sample[1] for sample in batch])
    ignore_mask = torch.stack([sample[2] for sample in batch])
    box = torch.stack([sample[3] for sample in batch])
    assert box.any() and not box.all()
    mixed_images = cutmix(strong, strong.roll(1, dims=0), box)
    mixed_ignore = cutmix(ignore_mask, ignore_mask.roll(1, dims=0), box)
    inside = box[:, None].expand_as(strong)
    assert torch.equal(mixed_images[inside], strong.roll(1, dims=0)[inside])
    assert torch.equal(mixed_images[~inside], strong[~inside])
    assert torch.equal(mixed_ignore[box], ignore_mask.roll(1, dims=0)[box])
    assert torch.equal(mixed_ignore[~box], ignore_mask[~box])


def test_cutmix_box_is_drawn_half_the_time_within_unimatch_bounds():
    rng = np.random.default_rng(0)
    boxes = [cutmix_box(rng, 100) for _ in range(400)]
    areas = [box.sum().item() / box.numel() for box in boxes if box.any()]
    assert 0.4 < len(areas) / len(boxes) < 0.6
    assert min(areas) > 0.015 and max(areas) <= 0.4
    for box in boxes:  # a single rectangle
        rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
        if len(rows):
            assert box.sum() == len(rows) * len(cols)


def test_fixed_seed_reproduces_the_sample(folder, tmp_path):
    first = build_folder(folder, tmp_path / "a", seed=3)
    again = build_folder(folder, tmp_path / "b", seed=3)
    for dataset, same in zip(first[:2], again[:2]):
        dataset.set_epoch(5)
        same.set_epoch(5)
        for a, b in zip(dataset[2], same[2]):
            assert torch.equal(a, b)


def test_different_epoch_gives_a_different_sample(folder, tmp_path):
    labeled, unlabeled, _, _ = build_folder(folder, tmp_path)
    for dataset in (labeled, unlabeled):
        dataset.set_epoch(0)
        before = dataset[1]
        dataset.set_epoch(1)
        assert not torch.equal(before[0], dataset[1][0])
        dataset.set_epoch(0)
        assert all(torch.equal(a, b) for a, b in zip(before, dataset[1]))  # a resumed epoch repeats itself


def test_getitem_leaves_the_global_rng_untouched(folder, tmp_path):
    labeled, unlabeled, _, _ = build_folder(folder, tmp_path)
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    for i in range(3):
        labeled[i], unlabeled[i]
    assert torch.equal(torch_state, torch.get_rng_state())
    assert np.array_equal(numpy_state[1], np.random.get_state()[1]) and python_state == random.getstate()


def test_workers_give_the_same_batches_as_the_main_process(folder, tmp_path):
    _, unlabeled, _, _ = build_folder(folder, tmp_path)
    unlabeled.set_epoch(2)
    batches = [list(torch.utils.data.DataLoader(unlabeled, batch_size=4, num_workers=workers))
               for workers in (0, 2)]
    for a, b in zip(*batches):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_colorize_paints_the_palette_and_ignore_black():
    palette = data.voc_palette(21)
    assert palette[:3] == [(0, 0, 0), (128, 0, 0), (0, 128, 0)] and palette[15] == (192, 128, 128)  # person
    image = colorize(torch.tensor([[1, 15], [IGNORE_INDEX, 2]]), palette)
    assert np.array(image).tolist() == [[[128, 0, 0], [192, 128, 128]], [[0, 0, 0], [0, 128, 0]]]


# ------------------------------------------------------------------------------------------------- bad input
def test_missing_data_root_is_named(tmp_path):
    for dataset in ("voc", "cityscapes", "folder"):
        one_line_error(lambda: build_datasets(dataset, str(tmp_path / "nowhere")), tmp_path / "nowhere", "--data-root")
    one_line_error(lambda: build_datasets("voc", None), "--data-root")
    one_line_error(lambda: build_datasets("folder", str(tmp_path)), tmp_path / "images" / "train")


def test_split_file_naming_a_missing_image_is_reported(tmp_path):
    make_voc(tmp_path / "voc")
    directory = tmp_path / "splits" / "voc" / "1_8"
    directory.mkdir(parents=True)
    (directory / "labeled.txt").write_text("JPEGImages/2099_000001.jpg SegmentationClass/2099_000001.png\n")
    (directory / "unlabeled.txt").write_text(f"JPEGImages/{voc_id(1)}.jpg\n")
    one_line_error(lambda: build_datasets("voc", str(tmp_path / "voc"), "1/8", str(tmp_path / "splits")),
                   directory / "labeled.txt", "JPEGImages/2099_000001.jpg")


def test_unreadable_image_is_reported(folder, tmp_path):
    broken = folder / "images" / "train" / "frame000.png"
    broken.write_bytes(b"this is not a png")
    one_line_error(lambda: load_image(str(broken)), broken, "cannot read")
    labeled, unlabeled, _, _ = build_folder(folder, tmp_path, split="12")
    one_line_error(lambda: labeled[0], broken)
    one_line_error(lambda: load_image(str(folder / "gone.jpg")), folder / "gone.jpg", "does not exist")


def test_image_and_mask_of_different_sizes_are_reported(folder, tmp_path):
    save_mask(folder / "masks" / "val" / "frame002.png", size=(20, 15))
    _, _, val, _ = build_folder(folder, tmp_path)
    one_line_error(lambda: val[2], "frame002.png", "40x30", "20x15", "same size")


def test_mask_values_outside_the_classes_are_reported(folder, tmp_path):
    save_mask(folder / "masks" / "val" / "frame001.png", values=[0, 2, 50])
    Image.new("RGB", (40, 30)).save(folder / "masks" / "val" / "frame000.png")
    _, _, val, _ = build_folder(folder, tmp_path)
    one_line_error(lambda: val[1], "frame001.png", "50", "0..3 or 255")
    one_line_error(lambda: val[0], "frame000.png", "RGB", "single-channel")


@pytest.mark.parametrize("dataset, split", [("voc", "1/3"), ("voc", "100"), ("cityscapes", "92"),
                                            ("folder", "1/3"), ("folder", "0"), ("folder", "13")])
def test_unsupported_split_is_reported(tmp_path, dataset, split):
    make = {"voc": make_voc, "cityscapes": make_cityscapes, "folder": make_folder}[dataset]
    make(tmp_path / dataset)
    one_line_error(lambda: build_datasets(dataset, str(tmp_path / dataset), split, str(tmp_path / "splits")),
                   "--split", split, "expected")


def test_cli_prints_counts_and_writes_split_files(folder, tmp_path, capsys):
    main(["--dataset", "folder", "--data-root", str(folder), "--split", "1/4", "--splits-dir", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert {"labeled: 3", "unlabeled: 12", "val: 4"} <= set(lines)
    directory = data.split_directory(tmp_path, "folder", folder, "1/4")
    assert len(Path(directory, "labeled.txt").read_text().splitlines()) == 3


def test_cli_error_is_one_line_without_traceback(folder, tmp_path):
    save_mask(folder / "masks" / "val" / "frame001.png", values=[7])
    result = subprocess.run([sys.executable, str(REPO / "data.py"), "--dataset", "folder", "--data-root", str(folder),
                             "--split", "1/2", "--splits-dir", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: mask ") and "frame001.png" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
