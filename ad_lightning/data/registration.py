"""Image registration: align an image to a reference image of the same rigid object.

Saeedi & Giusti register every image to a reference before anything else, so that
pixel-space models (CPCAE's position condition, the variation model, the nearest image)
compare like with like. Two OpenCV ways:

- `ecc`: enhanced correlation coefficient maximisation (cv2.findTransformECC), coarse to
  fine over an image pyramid so shifts of a few percent of the image converge; motion
  euclidean (rotation + shift, default), affine or translation.
- `orb`: ORB keypoints, Hamming matching with a ratio test, and a RANSAC similarity
  (cv2.estimateAffinePartial2D); copes with larger motions but needs texture.

The transform is estimated on copies at most `max_side` pixels wide (speed; MVTec images
are 1024 px) and applied at full resolution. `estimate_alignment` returns the 2x3 matrix
mapping image coordinates to reference coordinates, so the same matrix can warp the mask.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

from ad_lightning.checks import choice

log = logging.getLogger(__name__)

METHODS = ("ecc", "orb")
ECC_MOTIONS = {
    "translation": cv2.MOTION_TRANSLATION,
    "euclidean": cv2.MOTION_EUCLIDEAN,
    "affine": cv2.MOTION_AFFINE,
}


class RegistrationError(RuntimeError):
    """The alignment could not be estimated (no convergence, too few matches)."""


def _gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return image.reshape(image.shape[:2])


def _scaled(gray: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return gray
    h, w = gray.shape
    return cv2.resize(
        gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
    )


def _ecc(
    image: np.ndarray, reference: np.ndarray, motion: str, levels: int, iterations: int
) -> np.ndarray:
    """Coarse-to-fine ECC; returns the warp W with image(W(x)) ~ reference(x)."""
    choice("ECC motion", motion, ECC_MOTIONS)
    pyramid = [(image.astype(np.float32) / 255.0, reference.astype(np.float32) / 255.0)]
    for _ in range(levels - 1):
        img, ref = pyramid[-1]
        if min(img.shape) < 32:
            break
        pyramid.append((cv2.pyrDown(img), cv2.pyrDown(ref)))
    warp = np.eye(2, 3, dtype=np.float32)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, iterations, 1e-6)
    for level, (img, ref) in enumerate(reversed(pyramid)):
        if level > 0:
            warp[:, 2] *= 2.0  # translation in pixels doubles at the next finer level
        try:
            _, warp = cv2.findTransformECC(ref, img, warp, ECC_MOTIONS[motion], criteria, None, 5)
        except cv2.error as err:
            raise RegistrationError(
                f"ECC did not converge at pyramid level {len(pyramid) - 1 - level}: {err}"
            ) from err
    return warp


def _orb(
    image: np.ndarray, reference: np.ndarray, n_features: int = 2000, ratio: float = 0.75
) -> np.ndarray:
    """ORB + RANSAC similarity; returns the matrix mapping image points to reference points."""
    orb = cv2.ORB_create(nfeatures=n_features)
    kp_img, des_img = orb.detectAndCompute(image, None)
    kp_ref, des_ref = orb.detectAndCompute(reference, None)
    if des_img is None or des_ref is None or len(kp_img) < 3 or len(kp_ref) < 3:
        raise RegistrationError("ORB found too few keypoints (a flat image?); use method='ecc'")
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(des_img, des_ref, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < ratio * p[1].distance]
    if len(good) < 3:
        raise RegistrationError(f"ORB: only {len(good)} unambiguous matches; use method='ecc'")
    src = np.float32([kp_img[m.queryIdx].pt for m in good])
    dst = np.float32([kp_ref[m.trainIdx].pt for m in good])
    matrix, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=3.0)
    if matrix is None:
        raise RegistrationError("ORB: RANSAC found no consistent similarity transform")
    return matrix.astype(np.float32)


def estimate_alignment(
    image: np.ndarray,
    reference: np.ndarray,
    method: str = "ecc",
    motion: str = "euclidean",
    max_side: int = 256,
    levels: int = 3,
    iterations: int = 100,
) -> np.ndarray:
    """2x3 matrix M (float32) such that cv2.warpAffine(image, M, ref_size) lies on the reference."""
    choice("data.register_method", method, METHODS)
    img, ref = _gray(image), _gray(reference)
    scale = min(1.0, max_side / max(ref.shape))
    img, ref = _scaled(img, scale), _scaled(ref, scale)
    if method == "ecc":
        matrix = cv2.invertAffineTransform(_ecc(img, ref, motion, levels, iterations))
    else:
        matrix = _orb(img, ref)
    matrix = matrix.astype(np.float32)
    matrix[:, 2] /= scale  # back to full-resolution pixels (the linear part is scale-free)
    return matrix


def apply_alignment(
    array: np.ndarray, matrix: np.ndarray, size: tuple[int, int], is_mask: bool = False
) -> np.ndarray:
    """Warp an image (bilinear, edges replicated) or a mask (nearest, zeros outside) to `size` = (W, H)."""
    interpolation = cv2.INTER_NEAREST if is_mask else cv2.INTER_LINEAR
    border = cv2.BORDER_CONSTANT if is_mask else cv2.BORDER_REPLICATE
    warped = cv2.warpAffine(array, matrix, size, flags=interpolation, borderMode=border)
    return warped.reshape(*warped.shape[:2], *array.shape[2:])


def alignment_or_resize(
    image: np.ndarray, reference: np.ndarray, method: str = "ecc", **kwargs: object
) -> tuple[np.ndarray, str]:
    """The matrix that aligns `image` to the reference and ""; or, where alignment fails, the
    one that only resizes it to the reference's size and why it failed (the caller names the
    image: training's log, predict's note column)."""
    h, w = reference.shape[:2]
    try:
        return estimate_alignment(image, reference, method, **kwargs), ""  # type: ignore[arg-type]
    except RegistrationError as err:
        return np.float32([[w / image.shape[1], 0, 0], [0, h / image.shape[0], 0]]), str(err)


def register_to_reference(
    image: np.ndarray, reference: np.ndarray, method: str = "ecc", **kwargs: object
) -> tuple[np.ndarray, str]:
    """An HxWxC uint8 image aligned to the reference, and "" (or, where alignment fails, only
    resized, and why)."""
    matrix, failure = alignment_or_resize(image, reference, method, **kwargs)
    h, w = reference.shape[:2]
    return apply_alignment(image, matrix, (w, h)), failure
