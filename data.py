"""Data for IGL-DT: datasets, split protocols and the weak / strong views of METHOD sections 4 and 5.

    labeled, unlabeled, val, info = build_datasets("voc", "path/to/VOC2012", split="1/16")
    labeled.set_epoch(epoch); unlabeled.set_epoch(epoch)    # before each epoch's DataLoader

labeled[i]   -> image (3, C, C) float, mask (C, C) long, 255 where ignored or padded
unlabeled[i] -> weak (3, C, C), strong (3, C, C), ignore_mask (C, C) bool, cutmix_box (C, C) bool
val[i]       -> image (3, H, W) float, mask (H, W) long, the whole image
C is the crop size; images are normalised with the ImageNet MEAN and STD, and padding is 0 after that.

Layouts expected under --data-root
  voc         JPEGImages/<id>.jpg
              SegmentationClass/<id>.png      fine masks: the 1,464 train and 1,449 val images
              SegmentationClassAug/<id>.png   SBD-augmented masks of the 10,582 training images
              ImageSets/Segmentation/{train,val}.txt, optional train_aug.txt
              The training pool is train_aug.txt, or else every SegmentationClassAug mask not in val.txt.
  cityscapes  leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
              gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png   (labelIds become the 19 trainIds here)
  folder      images/{train,val}/<name>.<jpg|png|...>, masks/{train,val}/<name>.png (class ids, 255 = ignore)
              optional images/unlabeled/*  extra unlabeled images, without masks
              optional classes.txt         one class name per line; without it every mask is read once, the
                                           number of classes is the largest id + 1, named class0, class1, ...
  synthetic   nothing: the scenes are drawn in memory, deterministically (no --data-root)

Splits. --split is a fraction 1/16, 1/8, 1/4 or 1/2 of the training pool, rounded up, which gives the
published counts (VOC 662 / 1,323 / 2,646 / 5,291 of 10,582; Cityscapes 186 / 372 / 744 / 1,488 of 2,975);
or a count: VOC's classic 92 / 183 / 366 / 732 / 1464 (drawn from the 1,464 fine images, the rest of the
10,582 unlabeled), or any count for folder and synthetic. The lists live in
<splits_dir>/<dataset>/<name>/{labeled,unlabeled}.txt with <name> the split with "/" made "_" ("1/8" -> "1_8",
"92" -> "92"), one "image mask" line per sample, paths relative to the data root: the format UniMatch and CPS
publish (UniMatch's splits/pascal/1_16/ goes to <splits_dir>/voc/1_16/). A folder dataset's lists are kept per
data root, <splits_dir>/folder/<root name>-<hash>/<name>/; a name holding a space is written with %20. A list
already there is read as given, if it names images of this data's training pool; delete its folder to draw a new
one with another --seed. evaluate.py scores any split of a layout (val, test, ...) without reading any list.

Checks. build_datasets checks the layout and that every listed file exists; with check=True (train.py) it also
reads every image's header and every labeled and val mask before it writes a drawn split; `python data.py` then
decodes every file; each sample is checked again as it loads. Every user mistake is a one-line DataError.
Images are read as displayed (their EXIF orientation applied), so a mask is of the image as displayed.
"""
import argparse
import contextlib
import hashlib
import os
import signal
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

IGNORE_INDEX = 255
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DATASETS = ("voc", "cityscapes", "folder", "synthetic")
FRACTIONS = ("1/16", "1/8", "1/4", "1/2")
VOC_CLASSIC = ("92", "183", "366", "732", "1464")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]
CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle"]
CITYSCAPES_COLORS = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
                     (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
                     (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
                     (0, 80, 100), (0, 0, 230), (119, 11, 32)]
# Cityscapes labelId -> trainId of the 19 evaluated classes; every other labelId is void.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                        25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
LABEL_ID_TO_TRAIN_ID = [CITYSCAPES_TRAIN_IDS.get(i, IGNORE_INDEX) for i in range(256)]

SYNTHETIC_SIZE, SYNTHETIC_TRAIN, SYNTHETIC_VAL, SYNTHETIC_SEED = 96, 240, 48, 0
SYNTHETIC_CLASSES = ["background", "stripes", "checks", "spots", "grain"]
# Stripes and spots are both reddish, checks and grain both bluish, and each object's colour is jittered
# around its class's: colour alone confuses pairs of classes, so the texture has to be learned.
SYNTHETIC_COLORS = np.array([[128, 128, 118], [185, 85, 70], [75, 100, 175], [175, 95, 80], [85, 110, 165]],
                            dtype=np.float32)


class DataError(Exception):
    """A user's mistake in the data or the flags; str() is one line naming the path or value and what was
    expected. The command lines print it as `error: ...` and exit 2."""


# A user's mistake is one line, in both command lines (train.py, evaluate.py). These helpers live beside DataError
# because they raise it or print it, and both command lines (and bench/) import data.py already; none of them is
# about evaluation.
def one_line(error):
    """A DataError's message; one raised in a DataLoader worker arrives wrapped in the worker's traceback text."""
    return " ".join(str(error).strip().splitlines()[-1:]).removeprefix("data.DataError: ")


def require_device(device):
    """Both command lines check --device before any data is read."""
    if device == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA GPU is visible to torch here; expected --device cpu")


def require_writable_dir(path, flag):
    """Create `path` and write a file there now, so that an unwritable folder is found before the work, not after."""
    if Path(path).is_file():
        raise DataError(f"{flag} {path}: cannot write there, it is a file; expected a folder")
    probe = Path(path) / ".write_test"
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise DataError(f"{flag} {path}: cannot write there ({error.strerror or error}); expected a writable "
                        f"folder") from None


@dataclass
class DatasetInfo:
    name: str
    num_classes: int
    class_names: list[str]
    palette: list[tuple[int, int, int]]  # one (R, G, B) per class


def voc_palette(num_classes):
    """VOC's colour map: the bits of the class id spread over the high bits of R, G and B (distinct for any n)."""
    palette = []
    for i in range(num_classes):
        rgb = [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((i >> (3 * bit + channel)) & 1) << (7 - bit)
        palette.append(tuple(rgb))
    return palette


# ------------------------------------------------------------------------------------------ files and pixels
ORIENTATION = 0x0112  # the EXIF tag of how the camera was held: 1 as stored, 2-8 flipped or turned (5-8 a quarter)


@contextlib.contextmanager
def reading(path, kind, expected):
    """Inside it, a missing or broken file is a DataError naming it, not a PIL traceback."""
    try:
        yield
    except FileNotFoundError:
        raise DataError(f"{kind} {path} does not exist") from None
    except (OSError, ValueError, SyntaxError) as error:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"cannot read {kind} {path} ({type(error).__name__}); expected {expected}") from None


def open_decoded(path, kind, expected):
    """Image.open + decode now, so a missing or broken file is a DataError naming it."""
    with reading(path, kind, expected):
        image = Image.open(path)
        image.load()
        return image


def exif_orientation(image):
    """An open image's EXIF orientation, 1 to 8 (1 without one). A PNG's EXIF counts once PIL has seen it: in the
    header, or anywhere after decoding (asked for it earlier, PIL would decode the pixels to look)."""
    if image.format == "PNG" and not {"exif", "Raw profile type exif"} & set(image.info):
        return 1
    orientation = image.getexif().get(ORIENTATION, 1)
    return orientation if orientation in range(1, 9) else 1


def read_header(path):
    """(size as displayed, EXIF orientation) of the image at `path`, from its header: no pixel is decoded."""
    with reading(path, "image", "a JPEG or PNG file"), Image.open(path) as image:
        orientation = exif_orientation(image)
        # the size as stored: a TIFF's own tags, as newer PIL reports a turned TIFF's size already turned
        width, height = (image.tag_v2[256], image.tag_v2[257]) if image.format == "TIFF" else image.size
        return ((height, width) if orientation >= 5 else (width, height)), orientation


def is_16_bit(image):
    """Grayscale of 16 bits a pixel: PIL's mode I;16 (and I for a PNG, as older PIL reads one)."""
    return image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG")


def load_image(path):
    """An RGB PIL image as displayed: its EXIF orientation applied (phone photos store the sensor's pixels and how
    the camera was held), 16-bit grayscale brought to 8 bits by each pixel's high byte, as PIL reads a 16-bit
    colour PNG (convert("RGB") would clip every value above 255 to white). DataError naming the path if it is
    missing, unreadable, or of 32-bit pixels."""
    image = open_decoded(path, "image", "a JPEG or PNG file")
    sixteen_bit = is_16_bit(image)
    if exif_orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    if sixteen_bit:
        image = Image.fromarray((np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8))
    elif image.mode in ("I", "F"):
        raise DataError(f"image {path} has mode {image.mode} (32-bit pixels); expected 8- or 16-bit images")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_mask(path, num_classes):
    """A single-channel PIL mask of class ids 0..num_classes-1 or 255. Cityscapes `*_gtFine_labelIds.png` files
    are converted to trainIds here, so no preprocessed trainId files are needed."""
    mask = require_ids(open_decoded(path, "mask", "a PNG of class ids"), path)
    if path.endswith("_gtFine_labelIds.png"):
        mask = mask.point(LABEL_ID_TO_TRAIN_ID)
    counts = mask.histogram()  # 256 bins, one per id: a cheap check of every pixel
    bad = [value for value in range(num_classes, IGNORE_INDEX) if counts[value]]
    if bad:
        raise DataError(f"mask {path} holds the value {bad[0]}; expected class ids 0..{num_classes - 1} "
                        f"or {IGNORE_INDEX} (ignore)")
    return mask


def require_ids(mask, path):
    if mask.mode not in ("L", "P"):  # "P": VOC's palette PNGs, whose indices are the class ids
        raise DataError(f"mask {path} has mode {mask.mode}; expected an 8-bit single-channel PNG of class ids "
                        f"(colour masks must be converted to ids first)")
    return mask


def require_same_size(image_size, mask_size, image_path, mask_path):
    """An image as displayed and its mask are the same (width, height); the error names the image's EXIF
    orientation when it has one, as its mask may have been drawn on the pixels as stored."""
    if image_size == mask_size:
        return
    (width, height), (mask_width, mask_height) = image_size, mask_size
    _, orientation = read_header(image_path)
    turned = ""
    if orientation != 1:
        stored = f"{height}x{width}" if orientation >= 5 else f"{width}x{height}"
        turned = (f" as displayed (its EXIF orientation {orientation} turns or flips the {stored} stored pixels; masks "
                  f"are read as drawn on the image as displayed: if yours were drawn on the stored pixels, save the "
                  f"images without the orientation tag)")
    raise DataError(f"image {image_path} is {width}x{height}{turned} but its mask {mask_path} is "
                    f"{mask_width}x{mask_height}; expected the same size")


def load_pair(image_path, mask_path, num_classes):
    image, mask = load_image(image_path), load_mask(mask_path, num_classes)
    require_same_size(image.size, mask.size, image_path, mask_path)
    return image, mask


# uint8 value -> (value / 255 - mean) / std, per channel. A table lookup does no arithmetic per pixel and stays on
# the calling thread, where torch would hand each image to its thread pool: at this size that costs more than it
# saves, most of all on a busy CPU (bench/data_speed.py --workers 0 measures it).
NORMALIZE_LUT = ((np.arange(256) / 255 - np.array(MEAN)[:, None]) / np.array(STD)[:, None]).astype(np.float32)


def normalize(image, size=None):
    """PIL RGB image -> FloatTensor (3, H, W) normalised with the ImageNet MEAN and STD. With `size`, padded on
    the bottom and right to (3, size, size) with 0, which is what the mean colour normalises to."""
    pixels = np.asarray(image)
    out = np.zeros((3, size or image.height, size or image.width), dtype=np.float32)
    for c in range(3):
        np.take(NORMALIZE_LUT[c], pixels[..., c], out=out[c, :image.height, :image.width], mode="clip")
    return torch.from_numpy(out)


def mask_to_tensor(mask, size=None):
    """PIL mask -> LongTensor (H, W); with `size`, padded on the bottom and right to (size, size) with 255."""
    out = np.full((size or mask.height, size or mask.width), IGNORE_INDEX, dtype=np.int64)
    out[:mask.height, :mask.width] = np.asarray(mask)
    return torch.from_numpy(out)


def colorize(mask, palette):
    """LongTensor (H, W) of class ids -> PIL RGB image in the dataset's palette; 255 (ignore) is black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:len(palette)] = palette
    lut[IGNORE_INDEX] = 0
    return Image.fromarray(lut[mask.cpu().numpy().astype(np.uint8)])


# -------------------------------------------------------------------------------------------- augmentation
def weak_view(rng, image, mask, crop_size):
    """Random rescale 0.5-2.0, random crop, horizontal flip p=0.5 of an (image, mask) pair; mask may be None.

    Returns the part of the crop that lies inside the image (at most crop_size a side); `normalize` and
    `mask_to_tensor` pad the rest, so padding is exactly 0 in the image and IGNORE_INDEX in the mask."""
    scale = rng.uniform(0.5, 2.0)
    width, height = round(image.width * scale), round(image.height * scale)
    x = rng.integers(0, max(width - crop_size, 0) + 1)
    y = rng.integers(0, max(height - crop_size, 0) + 1)
    w, h = min(crop_size, width), min(crop_size, height)
    # Resize only the crop window (`box`, in source pixels): the pixels of resize-then-crop without scaling the
    # whole image, of which a crop keeps a small part.
    sx, sy = image.width / width, image.height / height
    box = (x * sx, y * sy, (x + w) * sx, (y + h) * sy)
    image = image.resize((w, h), Image.BILINEAR, box=box)
    mask = None if mask is None else mask.resize((w, h), Image.NEAREST, box=box)
    if rng.random() < 0.5:
        image = F.horizontal_flip(image)
        mask = None if mask is None else F.horizontal_flip(mask)
    return image, mask


def strong_colors(rng, image):
    """The strong view's colour changes, on the weak view's pixels: colour jitter (0.5, 0.5, 0.5, 0.25) p=0.8
    in a random order, grayscale p=0.2, Gaussian blur with sigma in 0.1-2 p=0.5."""
    if rng.random() < 0.8:
        jitters = [(F.adjust_brightness, rng.uniform(0.5, 1.5)), (F.adjust_contrast, rng.uniform(0.5, 1.5)),
                   (F.adjust_saturation, rng.uniform(0.5, 1.5)), (F.adjust_hue, rng.uniform(-0.25, 0.25))]
        for k in rng.permutation(4):
            adjust, factor = jitters[k]
            image = adjust(image, factor)
    if rng.random() < 0.2:
        image = F.rgb_to_grayscale(image, num_output_channels=3)
    if rng.random() < 0.5:
        # PIL's blur takes sigma as its radius and blurs the PIL image in place of v2's gaussian_blur, which
        # converts it to a tensor and back.
        image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    return image


def cutmix_box(rng, size, p=0.5, area=(0.02, 0.4), aspect=(0.3, 1 / 0.3)):
    """UniMatch's CutMix box: with probability p, a rectangle of random area (a fraction of size x size) and
    aspect ratio at a random place. BoolTensor (size, size), True inside the box."""
    box = np.zeros((size, size), dtype=bool)
    if rng.random() >= p:
        return torch.from_numpy(box)
    box_area = rng.uniform(*area) * size * size
    while True:  # redraw the aspect ratio until the box fits
        ratio = rng.uniform(*aspect)
        w, h = int((box_area / ratio) ** 0.5), int((box_area * ratio) ** 0.5)
        if w <= size and h <= size:
            break
    x, y = rng.integers(0, size - w + 1), rng.integers(0, size - h + 1)
    box[y:y + h, x:x + w] = True
    return torch.from_numpy(box)


def cutmix(target, source, box):
    """Paste `source` into `target` inside `box`: where(box, source, target).

    box (B, H, W) bool; target and source (B, H, W) or (B, C, H, W), the box broadcast over channels. The
    training step mixes the strong images, the teachers' probabilities and the ignore masks with the same box
    and source = target.roll(1, dims=0), another image of the batch."""
    return torch.where(box if target.dim() == 3 else box[:, None], source, target)


# --------------------------------------------------------------------------------------------------- datasets
class SemiDataset(Dataset):
    """One role of a dataset: "labeled", "unlabeled" or "val" (see the module docstring for what each gives).

    files: (image_path, mask_path or None) per sample; scenes: for synthetic data, the (image, mask) per sample.
    A training sample is a pure function of (seed, epoch, index): all its randomness comes from a generator
    seeded by them, never from a global RNG, so a resumed run repeats a straight run and DataLoader workers
    need no seeding. Call set_epoch before each epoch's DataLoader (not with persistent_workers)."""

    def __init__(self, mode, files, info, crop_size=321, seed=0, scenes=None):
        self.mode, self.files, self.info, self.crop_size, self.seed = mode, files, info, crop_size, seed
        self.scenes, self.epoch = scenes, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.files)

    def load(self, index):
        if self.scenes is not None:
            return self.scenes[index]
        image_path, mask_path = self.files[index]
        if self.mode == "unlabeled":
            return load_image(image_path), None
        return load_pair(image_path, mask_path, self.info.num_classes)

    def __getitem__(self, index):
        image, mask = self.load(index)
        if self.mode == "val":
            return normalize(image), mask_to_tensor(mask)
        size = self.crop_size
        stream = ("labeled", "unlabeled").index(self.mode)  # labeled and unlabeled sample i draw differently
        rng = np.random.default_rng([self.seed, stream, self.epoch, int(index)])
        image, mask = weak_view(rng, image, mask if self.mode == "labeled" else None, size)
        if self.mode == "labeled":
            return normalize(image, size), mask_to_tensor(mask, size)
        strong = strong_colors(rng, image)
        ignore_mask = np.ones((size, size), dtype=bool)  # True on the padding
        ignore_mask[:image.height, :image.width] = False
        return normalize(image, size), normalize(strong, size), torch.from_numpy(ignore_mask), cutmix_box(rng, size)


# ------------------------------------------------------------------------------------------- sample order
def epoch_indices(num_items, length, seed, epoch, rank, world):
    """This rank's sample order for one epoch: `length` items from permutations of range(num_items), repeated as
    needed (the labeled set is cycled to the unlabeled set's length), a pure function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.cat([torch.randperm(num_items, generator=generator) for _ in range(-(-length // num_items))])
    return order[:length][rank::world].tolist()


def loader(dataset, indices, batch_size, workers, device_type):
    """Batches of `dataset` in the order `indices` gives (pinned memory for a GPU): an iterator whose loader workers
    have started, each leaving SIGINT and SIGTERM to the main process (see `STOP_SIGNALS`)."""
    batches = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                          num_workers=workers, drop_last=True, pin_memory=device_type == "cuda",
                                          worker_init_fn=leave_stop_signals_to_the_main_process)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # held while the workers start
    try:
        return iter(batches)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a stop that arrived meanwhile reaches us now


# A scheduler (or Ctrl-C) signals the whole process group. A loader worker that died of it would end the run before
# the main process saves its state, so workers ignore these and the main process stops the run, then its workers.
# A worker starts with them held (it inherits the mask, through a spawn's exec too: under --gpus N the workers are
# spawned and take seconds to import), so one that arrives during its start-up is dropped, not fatal.
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def leave_stop_signals_to_the_main_process(worker_id):
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


# ------------------------------------------------------------------------------------------- synthetic scenes
def synthetic_texture(kind, rng, x, y):
    """A texture in [-1, 1] over pixel coordinates x, y: stripes, checks, spots or grain, random scale and angle."""
    period, angle = rng.uniform(5, 9), rng.uniform(0, np.pi)
    u = (x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period
    v = (y * np.cos(angle) - x * np.sin(angle)) * 2 * np.pi / period
    if kind == 1:
        return np.sin(u)
    if kind == 2:
        return np.sign(np.sin(u) * np.sin(v))
    if kind == 3:
        return 2.0 * (np.cos(u) * np.cos(v) > 0.4) - 1
    return rng.normal(0, 0.8, x.shape)


def random_shape(rng, size):
    """A bool (size, size) region: an ellipse, a rotated rectangle or a random star-shaped polygon."""
    canvas = Image.new("L", (size, size))
    cx, cy = rng.uniform(0, size, 2)
    radius = rng.uniform(0.1, 0.3) * size
    kind = rng.integers(3)
    if kind == 0:
        rx, ry = radius, radius * rng.uniform(0.5, 1.0)
        ImageDraw.Draw(canvas).ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
    else:
        if kind == 1:
            a = rng.uniform(0.3, 1.2)
            angles, radii = rng.uniform(0, np.pi) + np.array([a, np.pi - a, np.pi + a, -a]), np.full(4, radius)
        else:
            n = rng.integers(3, 8)
            angles, radii = np.sort(rng.uniform(0, 2 * np.pi, n)), radius * rng.uniform(0.4, 1.0, n)
        points = list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles)))
        ImageDraw.Draw(canvas).polygon(points, fill=1)
    return np.asarray(canvas) > 0


def synthetic_scene(split, index, size=SYNTHETIC_SIZE):
    """Scene `index` of "train" or "val": a shaded background, then 2-6 textured objects painted back to front,
    so later ones occlude earlier ones, then sensor noise. The same (split, index) always gives the same scene.
    Returns (PIL RGB image, PIL "L" mask of class ids)."""
    rng = np.random.default_rng([SYNTHETIC_SEED, ("train", "val").index(split), index])
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    shade = (x * np.cos(angle) + y * np.sin(angle)) / size
    image = SYNTHETIC_COLORS[0] + rng.normal(0, 30, 3) + 50 * shade[..., None]
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(rng.integers(2, 7)):
        kind, region = rng.integers(1, 5), random_shape(rng, size)
        color = SYNTHETIC_COLORS[kind] + rng.normal(0, 25, 3)
        image[region] = color + 45 * synthetic_texture(kind, rng, x, y)[region][:, None]
        mask[region] = kind
    image += rng.normal(0, 10, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)), Image.fromarray(mask)


# ----------------------------------------------------------------------------------------------------- splits
def labeled_count(dataset, split, pool_size):
    """How many labeled images `--split` means for `dataset`, from a training pool of pool_size images."""
    if split in FRACTIONS:
        denominator = int(split.split("/")[1])
        return -(-pool_size // denominator)  # rounded up: the counts CPS and UniMatch publish
    counts_allowed = dataset in ("folder", "synthetic") or (dataset == "voc" and split in VOC_CLASSIC)
    if split.isdigit() and counts_allowed:
        if not 1 <= int(split) <= pool_size:
            raise DataError(f"--split {split} asks for {split} labeled images; expected 1..{pool_size}, "
                            f"the size of the {dataset} training pool")
        return int(split)
    expected = FRACTIONS + (VOC_CLASSIC if dataset == "voc" else ("a count",) if counts_allowed else ())
    raise DataError(f"--split {split!r} is not supported for {dataset}; expected one of {', '.join(expected)}")


def draw_split(candidates, unlabeled_pool, count, seed):
    """`count` labeled samples drawn from candidates by a seeded permutation; unlabeled: the rest of the pool.
    Samples are (image, mask) pairs of relative paths; both lists come back in pool order."""
    chosen = np.random.default_rng(seed).permutation(len(candidates))[:count]
    labeled = [candidates[i] for i in sorted(chosen)]
    taken = {image for image, _ in labeled}
    return labeled, [pair for pair in unlabeled_pool if pair[0] not in taken]


def quote_name(path):
    """A relative path as one field of a split list: as it is, unless it holds whitespace or "%"; those characters
    are then written %XX (a space is %20), as in URLs. The lists stay the community format for every name it can
    express, and a name with a space survives the round trip."""
    return "".join(f"%{ord(c):02X}" if c.isspace() or c == "%" else c for c in path)


def read_split_file(path, need_masks):
    """A community-format list: one "image mask" (or, for unlabeled samples, "image") line per sample; each field
    as `quote_name` writes it."""
    if not os.path.isfile(path):
        raise DataError(f"split file {path} does not exist; expected labeled.txt and unlabeled.txt side by side "
                        f"(delete the folder to draw a new split)")
    pairs = []
    with open(path) as lines:
        for number, line in enumerate(lines, 1):
            fields = [urllib.parse.unquote(field).lstrip("/") for field in line.split()]
            if len(fields) > 2 or (need_masks and len(fields) == 1):
                raise DataError(f"{path} line {number} reads {line.strip()!r}; expected 'image_path mask_path'")
            if fields:
                pairs.append((fields[0], fields[1] if len(fields) == 2 else None))
    if not pairs:
        raise DataError(f"split file {path} is empty; expected one 'image_path mask_path' line per sample")
    return pairs


def write_split_file(path, pairs):
    """Write a list whole or not at all: into a temporary file renamed over `path`, so a stop or a full disk mid-write
    leaves no half list for the next run to read as given."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(temporary, "w") as f:
            f.writelines(" ".join(quote_name(name) for name in pair if name) + "\n" for pair in pairs)
        os.replace(temporary, path)
    except OSError as error:
        raise DataError(f"cannot write the split list {path} ({error.strerror or error}); expected a writable "
                        f"--splits-dir") from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def find_mask(root, mask):
    """Where this layout keeps a mask that a published list names elsewhere: UniMatch's VOC lists name
    SegmentationClass/ for augmented masks kept in SegmentationClassAug/, its Cityscapes lists name
    *_labelTrainIds.png files, which we replace by converting *_labelIds.png in code."""
    if os.path.isfile(os.path.join(root, mask)):
        return mask
    for old, new in (("SegmentationClass/", "SegmentationClassAug/"), ("_labelTrainIds.png", "_labelIds.png")):
        if old in mask and os.path.isfile(os.path.join(root, mask.replace(old, new))):
            return mask.replace(old, new)
    return mask


def split_directory(splits_dir, dataset, data_root, split):
    """Where the lists of `split` live: <splits_dir>/<dataset>/<split with "/" made "_"> for voc, cityscapes and
    synthetic, whose file names are the same in every copy of the dataset; for a folder dataset
    <splits_dir>/folder/<root's name>-<8 hex digits of its absolute path>/<split>, so that two folder datasets
    never read each other's lists (a moved root draws the same lists again: a draw is a function of pool and seed)."""
    if dataset != "folder":
        return os.path.join(splits_dir, dataset, split.replace("/", "_"))
    root = os.path.realpath(data_root)
    key = f"{os.path.basename(root)}-{hashlib.sha1(root.encode()).hexdigest()[:8]}"
    return os.path.join(splits_dir, dataset, key, split.replace("/", "_"))


def require_in_pool(pairs, pool, source, root):
    """A list read from disk must name images of this data's training pool: a list of another dataset (or one
    naming val images) is an error, never a silent mix."""
    images = {image for image, _ in pool}
    for image, _ in pairs:
        if image not in images:
            raise DataError(f"{source} names {image}, which is not in the training pool of --data-root {root}; "
                            f"expected a list of this data (delete the folder to draw one, or another --splits-dir)")


def require_files(root, pairs, source, masks=True, redraw=None):
    """Every path of `pairs` is a file under root. redraw: the folder of the split list `source`, when it was read
    from disk: the error then says to delete it, as a file removed since the list was drawn leaves it stale."""
    hint = f" (if it was removed since, delete {redraw} to draw a new split without it)" if redraw else ""
    for pair in pairs:
        for path in pair if masks else pair[:1]:
            if not os.path.isfile(os.path.join(root, path)):
                raise DataError(f"{source} names {path}, but {os.path.join(root, path)} is not a file; expected "
                                f"every listed path to exist under --data-root{hint}")


def warn_unused(pool, listed, directory):
    """One line when the lists read from `directory` leave out images of the training pool (added after the lists
    were drawn, say). A warning, not an error: a published split may cover part of a pool on purpose."""
    unused = sorted({image for image, _ in pool} - {image for image, _ in listed})
    if unused:
        print(f"warning: {len(unused)} image(s) of the training pool, such as {unused[0]}, are in neither split list "
              f"of {directory}, so this run does not use them; delete that folder to draw a split that does",
              file=sys.stderr)


# --------------------------------------------------------------------------------------------------- layouts
def require_dir(root, *parts):
    path = os.path.join(root, *parts)
    if not os.path.isdir(path):
        raise DataError(f"{path} is not a directory; expected the layout described at the top of data.py")
    return path


def read_ids(path):
    """Image ids from a VOC list: the first field of each line, without folder or extension."""
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist; expected the VOC 2012 layout (ImageSets/Segmentation/*.txt)")
    with open(path) as lines:
        return [os.path.splitext(os.path.basename(line.split()[0]))[0] for line in lines if line.strip()]


def voc_pairs(root, split, masks="SegmentationClass"):
    """The (image, mask) pairs that ImageSets/Segmentation/<split>.txt lists (train, val, test, ...)."""
    ids = read_ids(os.path.join(require_dir(root, "ImageSets", "Segmentation"), f"{split}.txt"))
    return [(f"JPEGImages/{i}.jpg", f"{masks}/{i}.png") for i in ids]


def scan_voc(root, split):
    """(candidates for labeling, unlabeled pool, val, where the pool came from) as (image, mask) pairs."""
    sets = require_dir(root, "ImageSets", "Segmentation")
    val_ids = read_ids(os.path.join(sets, "val.txt"))
    if os.path.isfile(os.path.join(sets, "train_aug.txt")):
        source, pool_ids = os.path.join(sets, "train_aug.txt"), read_ids(os.path.join(sets, "train_aug.txt"))
    else:
        source, val_set = require_dir(root, "SegmentationClassAug"), set(val_ids)
        pool_ids = sorted(name[:-4] for name in os.listdir(source) if name.endswith(".png")
                          and name[:-4] not in val_set)
    pool = [(f"JPEGImages/{i}.jpg", f"SegmentationClassAug/{i}.png") for i in pool_ids]
    candidates = voc_pairs(root, "train") if split in VOC_CLASSIC else pool
    return candidates, pool, voc_pairs(root, "val"), source


def cityscapes_pairs(root, split):
    """The (image, labelIds mask) pairs of leftImg8bit/<split>/<city>/ (train, val, test)."""
    images, _ = require_dir(root, "leftImg8bit", split), require_dir(root, "gtFine", split)
    return [(f"leftImg8bit/{split}/{city}/{name}",
             f"gtFine/{split}/{city}/{name[:-len('_leftImg8bit.png')]}_gtFine_labelIds.png")
            for city in sorted(os.listdir(images)) if os.path.isdir(os.path.join(images, city))
            for name in sorted(os.listdir(os.path.join(images, city))) if name.endswith("_leftImg8bit.png")]


def scan_cityscapes(root):
    return cityscapes_pairs(root, "train"), cityscapes_pairs(root, "val"), os.path.join(root, "leftImg8bit", "train")


def folder_images(root, split):
    folder = require_dir(root, "images", split)
    names = [name for name in sorted(os.listdir(folder)) if name.lower().endswith(IMAGE_SUFFIXES)]
    if not names:
        raise DataError(f"{folder} holds no images; expected files ending in {', '.join(IMAGE_SUFFIXES)}")
    return names


def same_stem(names):
    """The first two file names that differ only in their extension ("a.jpg", "a.png"), or None."""
    seen = {}
    for name in names:
        stem = os.path.splitext(name)[0]
        if stem in seen:
            return seen[stem], name
        seen[stem] = name
    return None


def folder_pairs(root, split):
    """The (image, mask) pairs of images/<split>/ and masks/<split>/ (train, val, test, or any other name)."""
    names = folder_images(root, split)
    require_dir(root, "masks", split)
    twins = same_stem(names)
    if twins:
        stem = os.path.splitext(twins[0])[0]
        raise DataError(f"{os.path.join(root, 'images', split)} holds {twins[0]} and {twins[1]}, which would share the "
                        f"one mask masks/{split}/{stem}.png; expected one image per mask (remove or rename one)")
    return [(f"images/{split}/{name}", f"masks/{split}/{os.path.splitext(name)[0]}.png") for name in names]


def scan_folder(root):
    extra = []
    if os.path.isdir(os.path.join(root, "images", "unlabeled")):
        extra = [(f"images/unlabeled/{name}", None) for name in folder_images(root, "unlabeled")]
    return folder_pairs(root, "train"), extra, folder_pairs(root, "val"), os.path.join(root, "images", "train")


def folder_info(root, pairs):
    """classes.txt if present, else the number of classes is the largest id found in the masks + 1."""
    path = os.path.join(root, "classes.txt")
    if os.path.isfile(path):
        with open(path) as lines:
            names = [line.strip() for line in lines if line.strip()]
        if len(names) < 2:  # one class leaves nothing to tell apart: every pixel is it
            raise DataError(f"{path} names {len(names)} class(es); expected one name per line for each of at least "
                            f"2 classes, the background included")
    else:
        counts = np.zeros(256, dtype=np.int64)
        for _, mask in tqdm(pairs, desc="no classes.txt: reading the masks", leave=False, disable=None):
            counts += load_mask(os.path.join(root, mask), IGNORE_INDEX).histogram()
        found = [value for value in range(IGNORE_INDEX) if counts[value]]
        require_two_classes(f"the masks under {os.path.join(root, 'masks')}", found, counts[IGNORE_INDEX] > 0)
        missing = sorted(set(range(max(found) + 1)) - set(found))
        if missing:  # an id such as 200 would otherwise make a 201-class problem of mostly empty classes
            raise DataError(f"the masks under {root} hold the ids {', '.join(map(str, found))} but never "
                            f"{', '.join(map(str, missing[:5]))}{', ...' if len(missing) > 5 else ''}; expected ids "
                            f"0..K-1 with {IGNORE_INDEX} for ignore, or a classes.txt naming the K classes")
        names = [f"class{i}" for i in range(max(found) + 1)]
    return DatasetInfo("folder", len(names), names, voc_palette(len(names)))


def require_two_classes(masks, found, ignored):
    """Masks that label no pixel, or only one class, leave nothing to learn. One class beside 255 is most likely a
    binary mask saved as 0 / 255, and 255 always means ignore here: the error says so and how to say otherwise."""
    if not found:
        raise DataError(f"{masks} label no pixel: every pixel is {IGNORE_INDEX} (ignore), which leaves nothing to "
                        f"learn or score; expected class ids 0, 1, ... on the labelled pixels")
    if len(found) == 1 and ignored:
        raise DataError(f"{masks} hold only the id {found[0]} and {IGNORE_INDEX}, which means ignore here, so there "
                        f"is one class and nothing to learn; if {IGNORE_INDEX} marks a class (a binary mask saved as "
                        f"0 / 255), remap it to {1 if found[0] == 0 else 0} in the masks (README, 'Your own data')")
    if len(found) == 1:
        raise DataError(f"{masks} hold only the class id {found[0]}; expected at least 2 classes")


def synthetic_pair(split, index):
    return f"{split}/{index:04d}.png", f"{split}/{index:04d}_mask.png"


def synthetic_index(path, source):
    """The scene index named by a virtual synthetic path such as "train/0012.png"."""
    stem = path[len("train/"):-len(".png")] if path.startswith("train/") and path.endswith(".png") else ""
    if not stem.isdigit() or int(stem) >= SYNTHETIC_TRAIN:
        raise DataError(f"{source} names {path}; expected train/NNNN.png with NNNN below {SYNTHETIC_TRAIN}")
    return int(stem)


def scan(dataset, root, split):
    """What the layout holds, as (image, mask) pairs of relative paths: the candidates for labeling, the
    unlabeled pool, the validation set; with the DatasetInfo and where the pool was found (for error messages)."""
    if dataset == "voc":
        candidates, unlabeled_pool, val, source = scan_voc(root, split)
        return candidates, unlabeled_pool, val, DatasetInfo("voc", 21, VOC_CLASSES, voc_palette(21)), source
    if dataset == "cityscapes":
        train, val, source = scan_cityscapes(root)
        return train, train, val, DatasetInfo("cityscapes", 19, CITYSCAPES_CLASSES, CITYSCAPES_COLORS), source
    if dataset == "folder":
        train, extra, val, source = scan_folder(root)
        return train, train + extra, val, folder_info(root, train + val), source
    train = [synthetic_pair("train", i) for i in range(SYNTHETIC_TRAIN)]
    val = [synthetic_pair("val", i) for i in range(SYNTHETIC_VAL)]
    num_classes = len(SYNTHETIC_CLASSES)
    info = DatasetInfo("synthetic", num_classes, SYNTHETIC_CLASSES, voc_palette(num_classes))
    return train, train, val, info, "the synthetic training pool"


# ------------------------------------------------------------------------------------------------ the builder
def require_root(dataset, data_root):
    if dataset not in DATASETS:
        raise DataError(f"--dataset {dataset!r} is unknown; expected one of {', '.join(DATASETS)}")
    if dataset != "synthetic" and not data_root:
        raise DataError(f"--data-root is required for --dataset {dataset}")
    if dataset != "synthetic" and not os.path.isdir(data_root):
        raise DataError(f"--data-root {data_root} is not a directory; expected the {dataset} dataset's root")
    return data_root or ""


def build_datasets(dataset, data_root=None, split="1/8", splits_dir="splits", crop_size=321, seed=0, check=False):
    """(labeled, unlabeled, val, info) for `dataset`, with the split lists read from or written to
    split_directory(...)/{labeled,unlabeled}.txt, named by the split with "/" made "_" ("1/16" -> "1_16"; counts
    keep their name: "92", "1464", or "46" for folder / synthetic). data_root is unused for synthetic. Raises
    DataError on any mistake in the flags, the layout or the lists. check=True: every file is checked first
    (check_dataset), and a drawn split is written only once the checks pass, so a failed check leaves no list."""
    root = require_root(dataset, data_root)
    candidates, unlabeled_pool, val, info, source = scan(dataset, root, split)
    count = labeled_count(dataset, split, len(candidates))

    directory = split_directory(splits_dir, dataset, root, split)
    labeled_txt, unlabeled_txt = os.path.join(directory, "labeled.txt"), os.path.join(directory, "unlabeled.txt")
    drawn = not (os.path.exists(labeled_txt) or os.path.exists(unlabeled_txt))
    if drawn:
        labeled, unlabeled = draw_split(candidates, unlabeled_pool, count, seed)
        labeled_source = unlabeled_source = source
    else:  # a list published by UniMatch or CPS, or drawn by an earlier run: read as given
        labeled, unlabeled = read_split_file(labeled_txt, True), read_split_file(unlabeled_txt, False)
        labeled_source, unlabeled_source = labeled_txt, unlabeled_txt

    if dataset == "synthetic":
        train = [synthetic_scene("train", i) for i in range(SYNTHETIC_TRAIN)]
        labeled_scenes = [train[synthetic_index(image, labeled_source)] for image, _ in labeled]
        unlabeled_scenes = [train[synthetic_index(image, unlabeled_source)] for image, _ in unlabeled]
        val_scenes = [synthetic_scene("val", i) for i in range(SYNTHETIC_VAL)]
    else:
        labeled = [(image, find_mask(root, mask)) for image, mask in labeled]
        val = [(image, find_mask(root, mask)) for image, mask in val]
        redraw = None if drawn else directory
        require_files(root, labeled, labeled_source, redraw=redraw)
        require_files(root, unlabeled, unlabeled_source, masks=False, redraw=redraw)
        require_files(root, val, f"the {dataset} validation set")
        if not drawn:
            require_in_pool(labeled, candidates + unlabeled_pool, labeled_source, root)
            require_in_pool(unlabeled, unlabeled_pool, unlabeled_source, root)
        labeled_scenes = unlabeled_scenes = val_scenes = None
    if not labeled or not unlabeled:
        raise DataError(f"split {split} of {dataset} leaves {len(labeled)} labeled and {len(unlabeled)} unlabeled "
                        f"images; expected both to be non-empty")

    files = lambda pairs: [(os.path.join(root, image), os.path.join(root, mask) if mask else None)
                           for image, mask in pairs]
    datasets = (SemiDataset("labeled", files(labeled), info, crop_size, seed, labeled_scenes),
                SemiDataset("unlabeled", [(image, None) for image, _ in files(unlabeled)], info, crop_size, seed,
                            unlabeled_scenes),
                SemiDataset("val", files(val), info, crop_size, seed, val_scenes))
    if check:
        for each in datasets:
            check_dataset(each)
        if not drawn:
            warn_unused(candidates + unlabeled_pool, labeled + unlabeled, directory)
    if drawn:
        write_split_file(unlabeled_txt, unlabeled)
        write_split_file(labeled_txt, labeled)
    return (*datasets, info)


def check_dataset(dataset):
    """Read every image's header and every mask once, before any training: images readable, masks single-channel,
    of their image's size as displayed (EXIF orientation applied) and holding only 0..K-1 or 255; then, over the
    whole set, labeled and val masks that label some pixel, and labeled masks of at least two classes. Reads no
    image pixels; DataError on the first problem, naming the file."""
    if dataset.scenes is not None:
        return
    pixels_per_id = np.zeros(256, dtype=np.int64)
    for image_path, mask_path in tqdm(dataset.files, desc=f"checking {dataset.mode}", leave=False, disable=None):
        image_size, _ = read_header(image_path)
        if mask_path is not None:
            mask = load_mask(mask_path, dataset.info.num_classes)
            require_same_size(image_size, mask.size, image_path, mask_path)
            pixels_per_id += mask.histogram()
    if dataset.mode == "unlabeled":
        return
    masks = f"the {len(dataset)} {dataset.mode} masks ({dataset.files[0][1]}, ...)"
    found = [value for value in range(dataset.info.num_classes) if pixels_per_id[value]]
    if dataset.mode == "labeled" or not found:  # labeled: two classes to learn; val: a labelled pixel to score
        require_two_classes(masks, found, pixels_per_id[IGNORE_INDEX] > 0)


def eval_set(dataset, data_root, split, info):
    """The whole images and masks of one split of a layout (val, test, or any other the layout holds), to score a
    trained network: no split list is read or written. info: the classes the network was trained on."""
    root = require_root(dataset, data_root)
    if dataset == "synthetic":
        if split != "val":
            raise DataError(f"--split {split}: the synthetic data has a val split only")
        return SemiDataset("val", [synthetic_pair("val", i) for i in range(SYNTHETIC_VAL)], info,
                           scenes=[synthetic_scene("val", i) for i in range(SYNTHETIC_VAL)])
    pairs = {"voc": voc_pairs, "cityscapes": cityscapes_pairs, "folder": folder_pairs}[dataset](root, split)
    pairs = [(image, find_mask(root, mask)) for image, mask in pairs]
    require_files(root, pairs, f"the {split} split of {dataset}")
    return SemiDataset("val", [(os.path.join(root, image), os.path.join(root, mask)) for image, mask in pairs], info)


def check_files(dataset):
    """Open every file of a dataset once: images readable, masks readable, of their image's size, and holding
    only 0..K-1 or 255. `python data.py` runs it; training checks each sample as it loads it instead."""
    if dataset.scenes is not None:
        return
    for image_path, mask_path in tqdm(dataset.files, desc=f"checking {dataset.mode}", leave=False, disable=None):
        if mask_path is None:
            load_image(image_path)
        else:
            load_pair(image_path, mask_path, dataset.info.num_classes)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check a dataset, then draw (or read) its split lists.")
    parser.add_argument("--dataset", default="synthetic", help=" | ".join(DATASETS))
    parser.add_argument("--data-root", help="the dataset's folder (not needed for synthetic)")
    parser.add_argument("--split", default="1/8", help="1/16 | 1/8 | 1/4 | 1/2, or a count (see data.py)")
    parser.add_argument("--splits-dir", default="splits", help="where the split lists are read or written")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split draw")
    args = parser.parse_args(argv)
    try:
        directory = split_directory(args.splits_dir, args.dataset, require_root(args.dataset, args.data_root),
                                    args.split)
        existed = os.path.exists(os.path.join(directory, "labeled.txt"))
        labeled, unlabeled, val, info = build_datasets(args.dataset, args.data_root, args.split, args.splits_dir,
                                                       seed=args.seed, check=True)
        for dataset in (labeled, unlabeled, val):
            check_files(dataset)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"dataset: {info.name}, {info.num_classes} classes: {', '.join(info.class_names)}")
    print(f"split {args.split}: {'read' if existed else f'drawn with seed {args.seed}, written to'} "
          f"{os.path.join(directory, 'labeled.txt')} and unlabeled.txt")
    print(f"labeled: {len(labeled)}")
    print(f"unlabeled: {len(unlabeled)}")
    print(f"val: {len(val)}")


if __name__ == "__main__":
    main()
