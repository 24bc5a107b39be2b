"""What a user's own data, or weights given by path, becomes: read as meant, or one line naming the file and what was
expected, before any training time is spent where the check can be made up front (issue 31)."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageOps

import data
import models
import train
from data import DataError, build_datasets
from test_data import make_folder, one_line_error, save_image, save_mask
from test_robustness import TINY, fails_in_one_line


def build(root, tmp_path, split="1/4", **check):
    """build_datasets on a folder dataset; check=True reads every file first, as train.py and data.py ask."""
    return build_datasets("folder", str(root), split, str(tmp_path / "splits"), crop_size=32, **check)


def split_lists(tmp_path):
    return sorted((tmp_path / "splits").rglob("*.txt")) if (tmp_path / "splits").exists() else []


def set_masks(root, split, values, num_classes=None):
    """Every mask of images/<split> redrawn from `values` (class ids or 255)."""
    for n, path in enumerate(sorted((root / "masks" / split).glob("*.png"))):
        save_mask(path, values=values, seed=n)
    if num_classes is not None:
        (root / "classes.txt").write_text("".join(f"thing{k}\n" for k in range(num_classes)))


def train_fails_before_any_step(capsys, monkeypatch, root, tmp_path, *expected):
    """train.py, as it stands, stops on `root` in one line before its first training step."""
    def no_training(*args):
        raise AssertionError("a step ran before the data was checked")
    monkeypatch.setattr(train.Trainer, "student_step", no_training)
    return fails_in_one_line(capsys, ["--dataset", "folder", "--data-root", str(root), "--splits-dir",
                                      str(tmp_path / "splits"), "--out", str(tmp_path / "run"), "--teachers", "none",
                                      *TINY], *expected)


# 1 ------------------------------------------------------------------------------------------ binary masks 0 / 255
def test_binary_masks_of_0_and_255_without_classes_txt_are_refused_saying_what_255_means(tmp_path):
    root = make_folder(tmp_path / "data", classes_txt=False)
    set_masks(root, "train", [0, 255])
    set_masks(root, "val", [0, 255])
    one_line_error(lambda: build(root, tmp_path), root / "masks", "only the id 0 and 255",
                   "means ignore here", "remap it to 1", "Your own data")


def test_binary_masks_of_0_and_255_with_two_classes_named_are_refused_before_training(tmp_path, capsys):
    root = make_folder(tmp_path / "data", num_classes=2)
    set_masks(root, "train", [0, 255])
    with pytest.raises(SystemExit) as exited:
        data.main(["--dataset", "folder", "--data-root", str(root), "--split", "1/4", "--splits-dir",
                   str(tmp_path / "splits")])
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and len(err.splitlines()) == 1, err
    assert "labeled masks" in err and "only the id 0 and 255" in err and "remap it to 1" in err
    one_line_error(lambda: build(root, tmp_path, check=True), "only the id 0 and 255")


def test_a_classes_txt_of_one_class_is_refused(tmp_path):
    root = make_folder(tmp_path / "data", num_classes=1)
    one_line_error(lambda: build(root, tmp_path), "classes.txt names 1 class", "at least 2")


# 2 ------------------------------------------------------------------------------------------ 16-bit images
def test_a_16_bit_grayscale_png_is_read_by_its_high_byte_everywhere(tmp_path):
    root = make_folder(tmp_path / "data")
    levels = np.random.default_rng(0).integers(0, 256, (30, 40))
    Image.fromarray((levels * 257).astype(np.uint16)).save(root / "images" / "val" / "frame001.png")
    assert Image.open(root / "images" / "val" / "frame001.png").mode == "I;16"
    image = data.load_image(str(root / "images" / "val" / "frame001.png"))  # training, evaluation and --images
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.repeat(levels[..., None], 3, 2))
    _, _, val, _ = build(root, tmp_path)
    assert torch.equal(val[1][0], data.normalize(Image.fromarray(np.repeat(levels[..., None], 3, 2).astype(np.uint8))))


# 3 ------------------------------------------------------------------------------------------ EXIF orientation
def save_rotated_photo(path, orientation=6, stored=(40, 30)):
    """A JPEG as a phone saves one: the stored pixels and the EXIF orientation the camera was held in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (stored[1], stored[0], 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation  # the EXIF orientation tag
    Image.fromarray(pixels).save(path, exif=exif)


def test_a_photo_with_an_exif_rotation_is_read_as_displayed(tmp_path):
    save_rotated_photo(tmp_path / "phone.jpg")
    image = data.load_image(str(tmp_path / "phone.jpg"))
    assert image.size == (30, 40)
    assert np.array_equal(np.asarray(image), np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "phone.jpg"))))


def test_a_mask_of_the_displayed_photo_fits_and_one_of_the_stored_pixels_names_the_exif_orientation(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "images" / "val" / "frame001.png").unlink()
    save_rotated_photo(root / "images" / "val" / "frame001.jpg")
    save_mask(root / "masks" / "val" / "frame001.png", size=(30, 40))  # drawn on the photo as displayed
    _, _, val, _ = build(root, tmp_path)
    assert val[1][0].shape == (3, 40, 30) and val[1][1].shape == (40, 30)
    data.check_dataset(val)  # the header check turns the size too

    save_mask(root / "masks" / "val" / "frame001.png", size=(40, 30))  # drawn on the pixels as stored
    for call in (lambda: val[1], lambda: data.check_dataset(val)):
        one_line_error(call, "frame001.jpg", "30x40 as displayed", "EXIF orientation 6", "40x30",
                       "without the orientation tag")


# 4 ------------------------------------------------------------------------------------------ two images, one mask
def test_two_images_of_one_stem_are_refused_naming_both(tmp_path):
    root = make_folder(tmp_path / "data")
    save_image(root / "images" / "train" / "frame003.jpg")
    one_line_error(lambda: build(root, tmp_path), "frame003.jpg", "frame003.png",
                   "masks/train/frame003.png", "one image per mask")


# 6 ------------------------------------------------------------------------------------------ mask ids up front
def test_a_val_mask_id_outside_classes_txt_is_found_when_the_datasets_are_built(tmp_path):
    root = make_folder(tmp_path / "data")
    save_mask(root / "masks" / "val" / "frame002.png", values=[0, 9])
    one_line_error(lambda: build(root, tmp_path, check=True), "frame002.png", "value 9", "0..3")


def test_train_finds_a_val_mask_id_outside_the_classes_before_the_first_step(tmp_path, monkeypatch, capsys):
    root = make_folder(tmp_path / "data", num_classes=3)
    save_mask(root / "masks" / "val" / "frame001.png", values=[0, 7])
    train_fails_before_any_step(capsys, monkeypatch, root, tmp_path, "frame001.png", "value 7")


def test_the_checks_read_each_labeled_and_val_mask_once(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data")
    reads, load_mask = [], data.load_mask
    monkeypatch.setattr(data, "load_mask", lambda path, k: reads.append(path) or load_mask(path, k))
    labeled, _, val, _ = build(root, tmp_path, check=True)
    assert sorted(reads) == sorted(mask for _, mask in labeled.files + val.files)


# 7 ------------------------------------------------------------------------------------------ nothing labelled
def test_val_masks_that_label_no_pixel_are_refused_before_training(tmp_path, monkeypatch, capsys):
    root = make_folder(tmp_path / "data")
    set_masks(root, "val", [255])
    train_fails_before_any_step(capsys, monkeypatch, root, tmp_path, "val masks", "label no pixel")
    one_line_error(lambda: build(root, tmp_path, check=True), "the 4 val masks", "label no pixel", "255 (ignore)")


def test_labeled_masks_that_label_no_pixel_are_refused_up_front(tmp_path, monkeypatch, capsys):
    root = make_folder(tmp_path / "data")
    set_masks(root, "train", [255])
    train_fails_before_any_step(capsys, monkeypatch, root, tmp_path, "labeled masks", "label no pixel")
    one_line_error(lambda: build(root, tmp_path, check=True), "labeled masks", "label no pixel", "255 (ignore)")


# 8 ------------------------------------------------------------------------------------------ split lists
def test_a_failed_check_writes_no_split_list(tmp_path, capsys):
    root = make_folder(tmp_path / "data")
    Image.new("RGB", (40, 30)).save(root / "masks" / "val" / "frame000.png")  # a colour mask
    with pytest.raises(SystemExit):
        data.main(["--dataset", "folder", "--data-root", str(root), "--splits-dir", str(tmp_path / "splits")])
    assert "frame000.png" in capsys.readouterr().err and split_lists(tmp_path) == []
    one_line_error(lambda: build(root, tmp_path, check=True), "frame000.png", "single-channel")
    assert split_lists(tmp_path) == []


def test_split_lists_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data")
    written, quote_name = [], data.quote_name

    def disk_full_after_two_names(name):
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        written.append(name)
        return quote_name(name)
    monkeypatch.setattr(data, "quote_name", disk_full_after_two_names)
    with pytest.raises((DataError, OSError), match="[Nn]o space left"):
        build(root, tmp_path)
    assert [path.name for path in (tmp_path / "splits").rglob("*") if path.is_file()] == []


def test_a_list_naming_a_removed_image_says_to_delete_it(tmp_path):
    root = make_folder(tmp_path / "data")
    labeled, _, _, _ = build(root, tmp_path)
    removed = Path(labeled.files[0][0])
    removed.unlink()
    directory = data.split_directory(tmp_path / "splits", "folder", root, "1/4")
    one_line_error(lambda: build(root, tmp_path), Path(directory) / "labeled.txt",
                   f"images/train/{removed.name}", f"delete {directory}", "new split")


def test_images_added_after_the_lists_were_drawn_are_named_in_one_warning(tmp_path, capsys):
    root = make_folder(tmp_path / "data")
    argv = ["--dataset", "folder", "--data-root", str(root), "--splits-dir", str(tmp_path / "splits")]
    data.main(argv)
    assert "warning" not in capsys.readouterr().err
    save_image(root / "images" / "train" / "later.png")
    save_mask(root / "masks" / "train" / "later.png")
    data.main(argv)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "1 image(s)" in warnings[0] and "images/train/later.png" in warnings[0]
    assert "delete that folder" in warnings[0]


# 10 ----------------------------------------------------------------------------------------- weights given by path
def one_line_value_error(call, *words):
    with pytest.raises(ValueError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400, message
    for word in words:
        assert str(word) in message, message
    return message


def test_resnet34_weights_in_a_resunet_of_another_width_name_the_width_they_need():
    weights = torchvision.models.resnet34().state_dict()
    resunet = models.ResUNet(3, widths=(32, 64, 128, 256))
    one_line_value_error(lambda: resunet.load_torchvision_resnet(weights), "(64, 128, 256, 512)", "--res-width 64")
    one_line_value_error(lambda: models.ResUNet(3).load_torchvision_resnet(torchvision.models.resnet18().state_dict()),
                         "resnet18", "expected resnet34")


def test_a_text_file_given_as_weights_is_one_line_without_unsafe_advice(tmp_path):
    (tmp_path / "weights.pth").write_text("these are not weights\n")
    for read in (lambda: models.torchvision_state_dict(str(tmp_path / "weights.pth"), "resnet18"),
                 lambda: models.read_weights(tmp_path / "weights.pth")):
        message = one_line_value_error(read, tmp_path / "weights.pth", "torch.save")
        assert "weights_only" not in message
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": 3}, tmp_path / "checkpoint.pth")
    one_line_value_error(lambda: models.read_weights(tmp_path / "checkpoint.pth"), "keys like model, epoch",
                         "expected a state dict")


def test_resnet18_weights_for_a_resnet50_backbone_name_both(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    one_line_value_error(lambda: models.DeepLabV3Plus(5, "resnet50", pretrained=str(tmp_path / "resnet18.pth"),
                                                      head_width=32), "resnet18", "resnet50", "--backbone resnet18")


def test_resnet_weights_given_to_the_swin_teacher_are_named():
    swin = models.SwinUNet(3, embed_dim=12, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
    one_line_value_error(lambda: swin.load_torchvision_swin(torchvision.models.resnet18().state_dict()),
                         "resnet18", "swin_t")
    one_line_value_error(lambda: swin.load_torchvision_swin(torchvision.models.swin_t().state_dict()),
                         "--swin-dim 96 --swin-depths 2 2 6 2")


def test_load_weights_names_missing_unexpected_and_reshaped_keys_in_one_sentence():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    weights = dict(net.state_dict(), extra=torch.zeros(1))
    weights["0.weight"] = torch.zeros(4, 3, 3, 3)
    del weights["1.bias"]
    one_line_value_error(lambda: models.load_weights(net, weights), "1 key(s) missing (such as 1.bias)",
                         "1 key(s) unexpected (such as extra)", "0.weight: (4, 3, 3, 3) in the weights, (8, 3, 3, 3)")
    before = net[0].weight.clone()
    with pytest.raises(ValueError):
        models.load_weights(net, weights)
    assert torch.equal(net[0].weight, before)  # refused whole: nothing loaded
    models.load_weights(net, {k: v + 1 for k, v in net.state_dict().items()})
    assert torch.equal(net[0].weight, before + 1)
