from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ad_lightning.data import AnomalyDataModule, DataLayoutError, scan_category
from ad_lightning.data.datamodule import ImageReadError


def make_dm(root: Path, **kw) -> AnomalyDataModule:
    kw = {"image_size": 32, "num_workers": 0, "val_split": 0.1, "seed": 0} | kw
    dm = AnomalyDataModule(root=str(root), category="widget", **kw)
    dm.setup()
    return dm


def test_counts_labels_and_splits(tiny_folder: Path) -> None:
    dm = make_dm(tiny_folder)
    assert (len(dm.train_samples), len(dm.val_samples), len(dm.test_samples)) == (18, 2, 12)
    assert {s.label for s in dm.train_samples + dm.val_samples} == {0}
    assert sum(s.label for s in dm.test_samples) == 7
    assert not {s.path for s in dm.val_samples} & {s.path for s in dm.train_samples}
    assert dm.has_masks
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (12, 3, 32, 32)
    assert batch["mask"].shape == (12, 32, 32)


def test_masks_align_with_their_images(tiny_folder: Path) -> None:
    dm = make_dm(tiny_folder, image_size=64)
    batch = next(iter(dm.test_dataloader()))
    for path, label, mask in zip(batch["path"], batch["label"], batch["mask"], strict=False):
        if label == 0:
            assert mask.sum() == 0
            continue
        i = int(Path(path).stem)
        expected = torch.zeros(64, 64)
        expected[8 * i : 8 * i + 16, 20:40] = 1  # nearest-neighbour 2x of the 32 px mask
        assert torch.equal(mask, expected), path
        assert set(mask.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("ratio", [0.06, 0.2, 0.3])
def test_contamination_moves_exactly_round_ratio_n_train(tiny_folder: Path, ratio: float) -> None:
    clean = make_dm(tiny_folder)
    dm = make_dm(tiny_folder, contamination=ratio)
    n = round(ratio * len(clean.train_samples))
    assert len(dm.contaminated) == n
    assert len(dm.train_samples) == len(clean.train_samples) + n
    moved = {s.path for s in dm.contaminated}
    assert all(s.label == 1 for s in dm.contaminated)
    assert not moved & {s.path for s in dm.test_samples}
    assert len(dm.test_samples) == len(clean.test_samples) - n
    assert moved <= {s.path for s in dm.train_samples}
    # chosen by seed: same seed, same files; another seed, (almost surely) others
    again = make_dm(tiny_folder, contamination=ratio)
    assert [s.path for s in again.contaminated] == [s.path for s in dm.contaminated]


def test_contamination_needs_enough_defects(tiny_folder: Path) -> None:
    with pytest.raises(DataLayoutError, match="contamination"):
        make_dm(tiny_folder, contamination=0.5)


def test_a_contamination_that_moves_no_image_is_refused(tiny_folder: Path) -> None:
    """0.02 of 18 training images rounds to 0: a clean run recorded (and reported) as a
    contaminated one. The error names the smallest ratio that moves one image."""
    with pytest.raises(DataLayoutError, match=r"0\.02 of 18 training images moves none.*0\.0556"):
        make_dm(tiny_folder, contamination=0.02)
    assert len(make_dm(tiny_folder, contamination=0.0556).contaminated) == 1


def test_grayscale_is_expanded_to_three_channels(tiny_folder: Path) -> None:
    gray = tiny_folder / "widget" / "train" / "good" / "000.png"
    Image.fromarray(np.full((32, 32), 77, np.uint8), "L").save(gray)
    dm = make_dm(tiny_folder, val_split=0.0, normalize="none")
    item = dm.train_dataloader().dataset[0]
    assert item["image"].shape == (3, 32, 32)
    assert torch.allclose(item["image"], torch.full((3, 32, 32), 77 / 255))


def break_files(cat: Path) -> dict[str, Path]:
    """One file of each kind of fault, in different splits: a zero-byte image, a PNG cut off in
    its pixel data (its header still opens), a two-channel image and a mask of the wrong size."""
    empty = cat / "test" / "good" / "099.png"
    empty.write_bytes(b"")
    truncated = cat / "train" / "good" / "003.png"
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    two_channel = cat / "train" / "good" / "004.png"
    Image.fromarray(np.full((32, 32, 2), 90, np.uint8), "LA").save(two_channel)
    mask = cat / "ground_truth" / "dent" / "001_mask.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(mask)
    return {"empty": empty, "truncated": truncated, "two_channel": two_channel, "mask": mask}


def test_bad_files_are_all_named_in_one_error_at_setup(tiny_folder: Path) -> None:
    """Every image and mask is decoded when the datamodule is set up, so a corrupt test image
    stops the run before the first epoch, not after training; one error names every file."""
    bad = break_files(tiny_folder / "widget")
    dm = AnomalyDataModule(root=str(tiny_folder), category="widget", image_size=32, num_workers=0)
    with pytest.raises(DataLayoutError) as err:
        dm.setup()
    message = str(err.value)
    for path in bad.values():
        assert str(path) in message
    assert "4 bad files" in message and "data.skip_bad=true" in message
    assert "2 channels" in message and "16x16" in message


def test_skip_bad_drops_and_lists_bad_files(
    tiny_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = break_files(tiny_folder / "widget")
    with caplog.at_level("WARNING"):
        dm = make_dm(tiny_folder, skip_bad=True)
    skipped = dm.summary()["skipped_files"]
    assert sorted(s["path"] for s in skipped) == sorted(str(p) for p in bad.values())
    assert all(s["problem"] for s in skipped)
    assert all(str(p) in caplog.text for p in bad.values())
    used = {s.path for s in dm.train_samples + dm.val_samples + dm.test_samples}
    dent_001 = tiny_folder / "widget" / "test" / "dent" / "001.png"  # its mask is bad
    assert not used & {bad["empty"], bad["truncated"], bad["two_channel"], dent_001}
    assert len(dm.train_samples) + len(dm.val_samples) == 18 and len(dm.test_samples) == 11
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        for _ in loader:
            pass


def test_clean_folder_has_no_skipped_files(tiny_folder: Path) -> None:
    assert make_dm(tiny_folder).summary()["skipped_files"] == []


def test_an_image_that_breaks_after_setup_is_named_when_read(tiny_folder: Path) -> None:
    dm = make_dm(tiny_folder)
    bad = tiny_folder / "widget" / "test" / "good" / "002.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(ImageReadError, match="002.png"):
        for _ in dm.test_dataloader():
            pass


def test_last_batch_of_one_does_not_reach_batchnorm(tiny_folder: Path) -> None:
    """17 training images in batches of 8 (17 = 2 * 8 + 1): the lone last image would crash
    BatchNorm1d in training; the training loader joins it to the batch before (so methods
    that collect statistics still see every image) and one epoch of the AE runs."""
    from ad_lightning.models.autoencoders import Autoencoder
    from tests.conftest import quiet_trainer

    dm = make_dm(tiny_folder, val_split=0.15, batch_size=8, normalize="none")
    assert len(dm.train_samples) == 17
    loader = dm.train_dataloader()
    assert [len(b["image"]) for b in loader] == [8, 9] and len(loader) == 2
    assert sorted(int(i) for b in loader for i in b["index"]) == list(range(17))
    assert sum(len(b["image"]) for b in dm.test_dataloader()) == len(dm.test_samples)
    model = Autoencoder(image_size=32, latent_dim=4, widths=[8, 8, 8, 8, 4])
    trainer = quiet_trainer(1)
    trainer.fit(model, datamodule=dm)
    assert trainer.current_epoch == 1
    small = make_dm(tiny_folder, val_split=0.15, batch_size=32)
    assert [len(b["image"]) for b in small.train_dataloader()] == [17]  # one batch: kept whole


def test_layout_errors_say_what_to_fix(tmp_path: Path, tiny_folder: Path) -> None:
    with pytest.raises(DataLayoutError, match="does not exist"):
        scan_category(tmp_path / "nowhere", "widget")
    with pytest.raises(DataLayoutError, match="available categories: \\['widget'\\]"):
        scan_category(tiny_folder, "gadget")
    for p in (tiny_folder / "widget" / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(DataLayoutError, match="holds no images"):
        scan_category(tiny_folder, "widget")


def test_missing_masks_disable_pixel_metrics(tiny_folder: Path) -> None:
    (tiny_folder / "widget" / "ground_truth" / "dent" / "000_mask.png").unlink()
    files = scan_category(tiny_folder, "widget")
    assert not files.has_masks and "no mask" in files.mask_note


def test_synthetic_dataset_is_deterministic_mvtec_layout(
    synthetic_root: Path, tmp_path: Path
) -> None:
    from ad_lightning.data.synthetic import CATEGORIES, make_synthetic_dataset

    for category in CATEGORIES:
        files = scan_category(synthetic_root, category)
        assert files.has_masks and len(files.train) == 48
    again = make_synthetic_dataset(tmp_path / "again")
    a = np.asarray(Image.open(synthetic_root / "object" / "test" / "spot" / "003.png"))
    b = np.asarray(Image.open(again / "object" / "test" / "spot" / "003.png"))
    assert np.array_equal(a, b)
    mask = np.asarray(Image.open(again / "object" / "ground_truth" / "spot" / "003_mask.png"))
    assert 0 < (mask > 0).sum() < mask.size // 10  # a visible but local defect


def test_misplaced_folders_get_a_fix(tiny_folder: Path) -> None:
    with pytest.raises(DataLayoutError, match="looks like a category folder"):
        scan_category(tiny_folder / "widget", "widget")
    stray = tiny_folder / "widget" / "test" / "stray.png"
    stray.write_bytes((tiny_folder / "widget" / "test" / "good" / "000.png").read_bytes())
    with pytest.raises(DataLayoutError, match="move them into test/good/"):
        scan_category(tiny_folder, "widget")


def test_registration_aligns_images_and_masks_with_one_transform(tmp_path: Path) -> None:
    import cv2

    cat = tmp_path / "data" / "part"
    yy, xx = np.mgrid[0:96, 0:96]
    base = (((yy - 48) ** 2 / 400 + (xx - 40) ** 2 / 150) < 1) * 180 + 40
    base[40:56, 60:70] = 250  # an asymmetric feature so the rotation is observable
    img = np.stack([base] * 3, -1).astype(np.uint8)
    for i in range(3):
        Image.fromarray(img).save(
            (cat / "train" / "good").mkdir(parents=True, exist_ok=True)
            or cat / "train" / "good" / f"{i}.png"
        )
    moved = cv2.warpAffine(
        img,
        cv2.getRotationMatrix2D((48, 48), 8, 1.0) + np.float64([[0, 0, 5], [0, 0, -3]]),
        (96, 96),
        borderMode=cv2.BORDER_REPLICATE,
    )
    mask = np.zeros((96, 96), np.uint8)
    mask[40:56, 60:70] = 255
    moved_mask = cv2.warpAffine(
        mask,
        cv2.getRotationMatrix2D((48, 48), 8, 1.0) + np.float64([[0, 0, 5], [0, 0, -3]]),
        (96, 96),
        flags=cv2.INTER_NEAREST,
    )
    for folder, data in (("test/good", img), ("test/dent", moved)):
        (cat / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(data).save(cat / folder / "0.png")
    (cat / "ground_truth" / "dent").mkdir(parents=True)
    Image.fromarray(moved_mask).save(cat / "ground_truth" / "dent" / "0_mask.png")
    kw = {
        "root": str(tmp_path / "data"),
        "category": "part",
        "image_size": 96,
        "num_workers": 0,
        "val_split": 0.0,
        "normalize": "none",
    }
    plain, registered = AnomalyDataModule(**kw), AnomalyDataModule(register=True, **kw)
    plain.setup()
    registered.setup()
    ref = torch.as_tensor(img).permute(2, 0, 1).float() / 255
    raw = next(b for b in plain.test_dataloader().dataset if b["label"] == 1)
    aligned = next(b for b in registered.test_dataloader().dataset if b["label"] == 1)
    assert (aligned["image"] - ref).abs().mean() < 0.3 * (raw["image"] - ref).abs().mean()
    assert (aligned["mask"] * torch.as_tensor(mask / 255)).sum() > 0.8 * aligned["mask"].sum() > 0
    assert registered.summary()["registered"].startswith("ecc")


def test_an_image_that_cannot_be_registered_is_named_in_the_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image whose alignment fails is only resized (as predict does) and named in the run's
    summary and warnings, not only in a loader worker's log; each image's alignment is
    estimated once, at setup, and the loaders reuse it."""
    import ad_lightning.data.registration as registration

    cat = tmp_path / "data" / "part"
    yy, xx = np.mgrid[0:64, 0:64]
    base = ((((yy - 32) ** 2 / 300 + (xx - 28) ** 2 / 120) < 1) * 180 + 40).astype(np.uint8)
    for folder, names in (("train/good", "012"), ("test/good", "3"), ("test/dent", "4")):
        (cat / folder).mkdir(parents=True)
        for name in names:
            Image.fromarray(np.roll(base, int(name), axis=1)).save(cat / folder / f"{name}.png")
    real, calls = registration.estimate_alignment, []

    def fails_for_the_dent(img: np.ndarray, ref: np.ndarray, *args, **kwargs) -> np.ndarray:
        calls.append(img)
        if np.array_equal(img[..., 0], np.roll(base, 4, axis=1)):
            raise registration.RegistrationError("ECC did not converge")
        return real(img, ref, *args, **kwargs)

    monkeypatch.setattr(registration, "estimate_alignment", fails_for_the_dent)
    dm = AnomalyDataModule(
        root=str(tmp_path / "data"), category="part", image_size=64, num_workers=0,
        val_split=0.0, register=True,
    )  # fmt: skip
    dm.setup()
    dent = str(cat / "test" / "dent" / "4.png")
    summary = dm.summary()
    assert summary["registration_failures"] == [{"path": dent, "why": "ECC did not converge"}]
    assert any("registration" in n and dent in n for n in summary["notes"]), summary["notes"]
    assert len(calls) == 5  # every image once
    for loader in (dm.train_dataloader(), dm.test_dataloader()):
        assert sum(len(batch["image"]) for batch in loader) > 0
    assert len(calls) == 5  # the loaders reused the matrices


def test_unknown_register_method_fails_when_the_datamodule_is_built(tmp_path: Path) -> None:
    """A typo in data.register_method is refused at construction, before any image is read
    (the folder does not even exist), naming the key and the allowed methods."""
    with pytest.raises(ValueError, match=r"data.register_method='sift'.*ecc.*orb"):
        AnomalyDataModule(root=str(tmp_path / "nowhere"), category="x", register_method="sift")


def _png16(path: Path, values: np.ndarray) -> Path:
    Image.fromarray(values.astype(np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    return path


def test_16_bit_images_share_one_fixed_intensity_scale(tmp_path: Path) -> None:
    """A dark and a bright 16-bit image keep their brightness: both are divided by 65535, not
    stretched to their own min..max (which made them look alike)."""
    from ad_lightning.data.datamodule import read_image

    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    dark = read_image(_png16(tmp_path / "dark.png", 1000 + 1000 * ramp), 1)
    bright = read_image(_png16(tmp_path / "bright.png", 50000 + 10000 * ramp), 1)
    assert (dark.min(), dark.max()) == (round(1000 * 255 / 65535), round(2000 * 255 / 65535))
    assert (bright.min(), bright.max()) == (round(50000 * 255 / 65535), round(60000 * 255 / 65535))


def test_bit_depth_sets_the_range_and_rejects_pixels_beyond_it(tmp_path: Path) -> None:
    """data.bit_depth=12: 0..4095 maps to 0..255 in every loader; a pixel above 4095 means the
    setting is wrong, and the file is named at setup."""
    cat = tmp_path / "data" / "widget"
    for folder, value in (("train/good", 2000), ("test/good", 2000), ("test/dent", 4095)):
        (cat / folder).mkdir(parents=True)
        for i in range(2):
            _png16(cat / folder / f"{i}.png", np.full((8, 8), value))
    dm = make_dm(tmp_path / "data", image_size=8, normalize="none", bit_depth=12, val_split=0.0)
    assert dm.summary()["bit_depth"] == 12 and dm.summary()["odd_images"] == []
    item = dm.train_dataloader().dataset[0]
    assert torch.allclose(item["image"], torch.full((3, 8, 8), round(2000 * 255 / 4095) / 255))
    test = {b["label"]: b["image"] for b in dm.test_dataloader().dataset}
    assert torch.allclose(test[1], torch.ones(3, 8, 8))
    over = _png16(cat / "train" / "good" / "1.png", np.full((8, 8), 5000))
    with pytest.raises(DataLayoutError, match=f"(?s){over}.*data.bit_depth=12"):
        make_dm(tmp_path / "data", image_size=8, bit_depth=12)


def test_a_small_image_is_named_in_the_summary_and_stops_a_strict_run(
    tiny_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 10x10 image among 32x32 ones used to be upscaled without a word."""
    small = tiny_folder / "widget" / "train" / "good" / "007.png"
    Image.fromarray(np.full((10, 10, 3), 128, np.uint8)).save(small)
    with caplog.at_level("WARNING"):
        dm = make_dm(tiny_folder)
    assert dm.summary()["odd_images"] == [
        {"path": str(small), "why": "10x10 px, majority 32x32 (31 of 32 images)"}
    ]
    assert str(small) in caplog.text and str(small.name) in dm.summary()["notes"][0]
    assert len(dm.train_samples) + len(dm.val_samples) == 20  # warned, still used
    with pytest.raises(DataLayoutError, match=f"data.strict=true.*\\n.*{small}: 10x10 px"):
        make_dm(tiny_folder, strict=True)


def test_clean_folder_has_no_odd_images_or_notes(tiny_folder: Path) -> None:
    summary = make_dm(tiny_folder).summary()
    assert summary["odd_images"] == [] and summary["notes"] == [] and summary["size_note"] == ""


def test_when_sizes_vary_only_far_off_sizes_are_named(tmp_path: Path) -> None:
    """A set whose sizes all differ (the magnetic tile set) is not a list of odd images; an image
    far smaller than the median still is."""
    from ad_lightning.data.audit import find_odd_images
    from ad_lightning.data.io import ImageInfo

    infos = {Path(f"{i}.png"): ImageInfo(180 + i, 256, "L", 8) for i in range(20)}
    infos[Path("thumb.png")] = ImageInfo(10, 10, "L", 8)
    odd, note = find_odd_images(infos)
    assert [o.path for o in odd] == [Path("thumb.png")] and "median" in odd[0].why
    assert "21 sizes among 21 images" in note


@pytest.mark.parametrize("where", ["test/scratch/lot7", "train/good/cam2"])
def test_images_in_a_sub_folder_are_refused_not_left_out(tiny_folder: Path, where: str) -> None:
    """Images are listed one level deep (masks are matched by file name): a defect type kept in
    a sub-folder would vanish from the results, extra training images would never be trained
    on. Refused, naming the folder, before anything runs; a hidden folder is not looked at."""
    hidden = tiny_folder / "widget" / "train" / "good" / ".thumbnails"
    hidden.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(hidden / "000.png")
    assert len(make_dm(tiny_folder).train_samples) == 18
    nested = tiny_folder / "widget" / where
    nested.mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(nested / "100.png")
    with pytest.raises(DataLayoutError, match=rf"{where}.*holds images.*Move them up"):
        make_dm(tiny_folder)


def _augmented_epoch(dm: AnomalyDataModule, epoch: int, loader=None) -> dict[int, torch.Tensor]:
    """Each training image of `epoch` as the training loader augments it, by index."""
    loader = loader or dm.train_dataloader()
    for sampler in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
    return {int(i): image for b in loader for i, image in zip(b["index"], b["image"], strict=True)}


def test_augmentations_draw_per_image_and_epoch_not_per_worker(tiny_folder: Path) -> None:
    """The 17 training images are one identical picture, so two augmented images are equal
    only if their random draws are. Albumentations' generator used to be copied into each
    DataLoader worker (and DDP rank) and restart on resume: both workers drew the same noise
    for their batches, and a resumed fit replayed epoch 0's draws. The draws now follow
    (seed, epoch, index): distinct within an epoch and between epochs, and the same in two
    workers, in one process and after a resume."""
    import albumentations as A

    noise = [A.GaussNoise(std_range=(0.2, 0.4), p=1.0)]

    def dm(workers: int) -> AnomalyDataModule:
        return make_dm(
            tiny_folder,
            val_split=0.15,
            batch_size=4,
            train_augmentations=noise,
            num_workers=workers,
        )

    two_workers = dm(2)
    loader = two_workers.train_dataloader()
    first, second = (
        _augmented_epoch(two_workers, 0, loader),
        _augmented_epoch(two_workers, 1, loader),
    )
    assert sorted(first) == list(range(17))
    images = torch.stack([first[i] for i in range(17)] + [second[i] for i in range(17)])
    distances = torch.cdist(images.flatten(1), images.flatten(1))
    assert distances[~torch.eye(34, dtype=torch.bool)].min() > 0  # no draw repeated
    in_process = dm(0)
    assert all(torch.equal(first[i], image) for i, image in _augmented_epoch(in_process, 0).items())
    resumed = _augmented_epoch(in_process, 1, in_process.train_dataloader())  # a fresh loader
    assert all(torch.equal(second[i], image) for i, image in resumed.items())


def test_two_random_flips_of_one_pipeline_are_drawn_independently() -> None:
    """Albumentations seeds every transform of a pipeline with the same seed, so a horizontal
    and a vertical flip (p = 0.5 each) always agreed: an image was kept or turned 180 degrees,
    never mirrored. One stream for the pipeline draws all four outcomes."""
    import albumentations as A

    from ad_lightning.data.transforms import build_transform, reseed

    flips = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    transform = build_transform(4, 3, "none", flips, seed=0)
    image = np.repeat(np.arange(16, dtype=np.uint8).reshape(4, 4, 1), 3, axis=2)
    corners = set()
    for seed in range(40):
        reseed(transform, seed)
        out = transform(image=image, mask=np.zeros((4, 4), np.float32))["image"]
        corners.add(round(float(out[0, 0, 0]) * 255))
    assert corners == {0, 3, 12, 15}  # unflipped, mirrored, upside down, both


def test_augmentation_draws_follow_the_epoch_in_a_batch_sampler_rebuilt_for_ddp(
    tiny_folder: Path,
) -> None:
    """17 training images in batches of 8 take the batch sampler that never leaves one image
    alone. Under DDP Lightning rebuilds it around a DistributedSampler of its own (our shuffle,
    which keyed the draws, is gone): the draws must still follow the epoch, not repeat."""
    import albumentations as A
    from lightning_fabric.utilities.data import _set_sampler_epoch
    from pytorch_lightning.utilities.data import _update_dataloader
    from torch.utils.data import DistributedSampler

    noise = [A.GaussNoise(std_range=(0.2, 0.4), p=1.0)]
    dm = make_dm(tiny_folder, val_split=0.15, batch_size=8, train_augmentations=noise)
    loader = dm.train_dataloader()
    rank0 = DistributedSampler(loader.dataset, num_replicas=2, rank=0, shuffle=True, seed=0)
    loader = _update_dataloader(loader, rank0)

    def epoch(n: int) -> dict[int, torch.Tensor]:
        _set_sampler_epoch(loader, n)
        return {int(i): x for b in loader for i, x in zip(b["index"], b["image"], strict=True)}

    first, second = epoch(0), epoch(1)
    shared = first.keys() & second.keys()
    assert shared and not any(torch.equal(first[i], second[i]) for i in shared)


def test_a_16_bit_colour_image_is_read_at_its_bit_depth(tmp_path: Path) -> None:
    """Pillow decodes 16-bit RGB to 8 bits by keeping each sample's high byte: a 12-bit
    camera's 0..4095 came out 0..15, nearly black, with data.bit_depth=12 set and no word.
    It is now scaled as grayscale is, by the fixed range, channels in RGB order."""
    import cv2

    from ad_lightning.data.io import ImageReadError, read_image

    bgr = np.zeros((4, 5, 3), np.uint16)
    bgr[..., 2] = 4095  # red
    bgr[..., 0] = 2048  # blue
    path = tmp_path / "rgb12.png"
    assert cv2.imwrite(str(path), bgr)
    rgb = read_image(path, 3, 12)
    assert rgb.dtype == np.uint8 and (rgb[..., 0] == 255).all() and (rgb[..., 2] == 128).all()
    assert (read_image(path, 3, None)[..., 0] == 16).all()  # the type's range: 4095 / 257
    assert read_image(path, 1, 12).shape == (4, 5, 1)
    tiff = tmp_path / "rgb12.tif"  # OpenCV writes it LZW-compressed: Pillow reads it via libtiff
    assert cv2.imwrite(str(tiff), bgr)
    assert (read_image(tiff, 3, 12)[..., 0] == 255).all()
    bgr[0, 0, 1] = 4096
    assert cv2.imwrite(str(path), bgr)
    with pytest.raises(ImageReadError, match=r"rgb12\.png.*outside the fixed range 0\.\.4095"):
        read_image(path, 3, 12)


def test_an_image_over_pillows_size_limit_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow's decompression-bomb guard is not an OSError: a line-scan image over its limit
    stopped the run (or a predict) with a traceback that named no file."""
    from PIL import Image

    from ad_lightning.data.io import ImageReadError, read_image, read_mask

    path = tmp_path / "linescan.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageReadError, match=r"linescan\.png.*MAX_IMAGE_PIXELS"):
        read_image(path, 3)
    with pytest.raises(ImageReadError, match=r"linescan\.png"):
        read_mask(path, path, (64, 64))


def _category(root: Path) -> Path:
    """A minimal MVTec category: 2 training images, test/good and test/crack with masks."""
    from PIL import Image

    base = root / "cat"
    for sub in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
        (base / sub).mkdir(parents=True)
    for path in ("train/good/0.png", "train/good/1.png", "test/good/0.png", "test/crack/0.png"):
        Image.new("RGB", (8, 8)).save(base / path)
    Image.new("L", (8, 8), 255).save(base / "ground_truth/crack/0_mask.png")
    return base


def test_two_images_that_would_share_one_mask_are_refused(tmp_path: Path) -> None:
    """Masks are matched by name without extension: 0.png and 0.jpg in test/crack/ both took
    0_mask.png, drawn for one of them."""
    from PIL import Image

    from ad_lightning.data.folder import scan_category

    base = _category(tmp_path)
    assert len(scan_category(tmp_path, "cat").test) == 2
    Image.new("RGB", (8, 8)).save(base / "test/crack/0.jpg")
    with pytest.raises(DataLayoutError, match=r"0\.jpg.*0\.png|0\.png.*0\.jpg"):
        scan_category(tmp_path, "cat")


def test_hidden_test_folders_are_not_defect_types_and_good_is_lower_case(tmp_path: Path) -> None:
    """A tool's hidden folder (.ipynb_checkpoints) under test/ was scored as a defect type,
    and test/Good/ as defective images (label 1)."""
    from PIL import Image

    from ad_lightning.data.folder import scan_category

    base = _category(tmp_path)
    (base / "test/.ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(base / "test/.ipynb_checkpoints/0.png")
    files = scan_category(tmp_path, "cat")
    assert sorted(s.defect_type for s in files.test) == ["crack", "good"]
    (base / "test/good").rename(base / "test/Good")
    with pytest.raises(DataLayoutError, match=r"test/Good.*test/good/"):
        scan_category(tmp_path, "cat")
    # data.threshold_split is read the same way
    from ad_lightning.data.folder import scan_labelled_split

    (base / "test/Good").rename(base / "test/good")
    for sub in ("good", "crack", ".cache"):
        (base / "threshold" / sub).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(base / "threshold" / sub / "0.png")
    labels = sorted(
        (s.defect_type, s.label) for s in scan_labelled_split(tmp_path, "cat", "threshold")
    )
    assert labels == [("crack", 1), ("good", 0)]
    (base / "threshold/good").rename(base / "threshold/GOOD")
    with pytest.raises(DataLayoutError, match=r"threshold/GOOD.*threshold/good/"):
        scan_labelled_split(tmp_path, "cat", "threshold")
