"""Lists the images of an ImageNet-layout (`DIR/<class>/<image>`) or flat folder, labels from 1."""

import collections
import dataclasses
import hashlib
import os
import random

from PIL import Image

from detcon.data import schema

# Formats TensorFlow decodes plus all Pillow registers (ImageNet alone has .JPEG, .jpg, .png).
_EXTRA_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp")


@dataclasses.dataclass(frozen=True)
class ImageFile:
    """One input image and its class (`label` 0 = unlabelled, classes count from 1)."""

    path: str
    relative_path: str
    label: int
    synset: str
    text: str | None


@dataclasses.dataclass(frozen=True)
class Listing:
    """The images found, plus what was passed over and why (for the user's log)."""

    files: list[ImageFile]
    ignored_non_images: list[str]
    warnings: list[str]
    classes: list[str] = dataclasses.field(default_factory=list)  # label i + 1 is classes[i]


def image_extensions() -> frozenset[str]:
    """Returns the lower-case file extensions treated as images."""
    Image.init()
    return frozenset(e.lower() for e in Image.registered_extensions()) | frozenset(
        _EXTRA_EXTENSIONS
    )


def read_labels_file(path: str) -> list[str]:
    """Returns the class folder names of a labels file, one per non-empty line, in order."""
    with open(path, encoding="utf-8") as handle:
        names = [line.strip() for line in handle if line.strip()]
    if not names:
        raise ValueError(
            f"--labels_file {path!r} is empty; it needs one class folder name per line"
        )
    duplicates = sorted(n for n, c in collections.Counter(names).items() if c > 1)
    if duplicates:
        raise ValueError(f"--labels_file {path!r} lists classes more than once: {duplicates[:5]}")
    return names


def read_metadata_file(path: str) -> dict[str, str]:
    """Returns class folder name -> human-readable text from `<name>\\t<text>` lines."""
    mapping = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            name, separator, text = line.rstrip("\n").partition("\t")
            if not separator:
                raise ValueError(
                    f"{path}:{number}: expected '<class folder>\\t<text>' (tab-separated), "
                    f"got {line!r}"
                )
            mapping[name.strip()] = text.strip()
    return mapping


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _walk_files(root: str) -> list[str]:
    """Returns every visible file under `root`, sorted so the listing is machine-independent."""
    found = []
    for directory, subdirectories, names in os.walk(root, followlinks=True):
        subdirectories[:] = sorted(d for d in subdirectories if _visible(d))
        found.extend(os.path.join(directory, n) for n in sorted(names) if _visible(n))
    return found


def list_images(
    directory: str,
    labels_file: str | None = None,
    metadata_file: str | None = None,
    classes: list[str] | None = None,
) -> Listing:
    """Returns the images under `directory`: class folders if it has any, else a flat folder.

    `classes` fixes the label map (e.g. the training split's, so validation labels match it);
    otherwise it is `labels_file`'s order, else the sorted class folders.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"image directory {directory!r} does not exist or is not a directory"
        )
    extensions = image_extensions()
    entries = sorted(e for e in os.listdir(directory) if _visible(e))
    class_folders = [e for e in entries if os.path.isdir(os.path.join(directory, e))]
    top_files = [e for e in entries if not os.path.isdir(os.path.join(directory, e))]
    metadata = read_metadata_file(metadata_file) if metadata_file else None
    warnings: list[str] = []
    ignored: list[str] = []
    files: list[ImageFile] = []

    def add(path: str, label: int, synset: str) -> None:
        if os.path.splitext(path)[1].lower() not in extensions:
            ignored.append(path)
            return
        text = None
        if metadata is not None and synset:
            text = metadata.get(synset)
        files.append(ImageFile(path, os.path.relpath(path, directory), label, synset, text))

    classes = classes or None  # an empty map (an unlabelled training split) fixes nothing
    if classes is None and labels_file is None and not class_folders:
        for name in top_files:
            add(os.path.join(directory, name), schema.NO_LABEL, "")
        classes = []
    else:
        if classes is None:
            classes = read_labels_file(labels_file) if labels_file else class_folders
        classes = list(classes)
        missing = [c for c in classes if not os.path.isdir(os.path.join(directory, c))]
        if missing:
            warnings.append(
                f"{len(missing)} classes of the label map have no folder in {directory!r} "
                f"(e.g. {missing[:3]}); their labels stay reserved"
            )
        unlisted = sorted(set(class_folders) - set(classes))
        if unlisted:
            warnings.append(
                f"{len(unlisted)} folders in {directory!r} are not in the label map (--labels_file "
                f"or the training classes) and are left out (e.g. {unlisted[:3]})"
            )
        if top_files:
            warnings.append(
                f"{len(top_files)} files directly in {directory!r} belong to no class folder "
                f"and are left out (e.g. {top_files[:3]})"
            )
        if metadata is not None:
            unnamed = [c for c in classes if c not in metadata]
            if unnamed:
                warnings.append(
                    f"{len(unnamed)} classes have no line in the metadata file "
                    f"(e.g. {unnamed[:3]}); their records carry no image/class/text"
                )
        for label, synset in enumerate(classes, start=1):
            class_directory = os.path.join(directory, synset)
            if os.path.isdir(class_directory):
                for path in _walk_files(class_directory):
                    add(path, label, synset)
    if not files:
        raise ValueError(
            f"no images found in {directory!r} (looked for {', '.join(sorted(_EXTRA_EXTENSIONS))} "
            "and other Pillow formats, in DIR/<class>/<image> or directly in DIR)"
        )
    return Listing(files=files, ignored_non_images=ignored, warnings=warnings, classes=classes)


def shuffled(files: list[ImageFile], seed: int) -> list[ImageFile]:
    """Returns `files` in a seeded random order that is the same on every machine and Python run."""
    order = list(files)
    random.Random(seed).shuffle(order)
    return order


def listing_digest(files: list[ImageFile]) -> str:
    """Returns a hash of the ordered (path, label) list, to detect changed inputs on resume."""
    digest = hashlib.sha256()
    for image in files:
        digest.update(f"{image.relative_path}\0{image.label}\0{image.synset}\n".encode())
    return digest.hexdigest()
