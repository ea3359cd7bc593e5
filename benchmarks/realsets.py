"""Small real labelled datasets for benchmarking, built from Debian packages and sklearn.

Nothing is downloaded or stored in the repository: the data is read from files that
Debian packages install under /usr/share.

- ``stamps()``    images, from ``tuxpaint-stamps-default``
- ``icons()``     the same stamps shrunk to 48 px RGBA icons (a cache of PNGs, rebuilt when missing)
- ``fortunes()``  short texts, from ``fortunes`` (``fortunes-min`` alone is not enough)
- ``packages()``  short texts: Debian package synopses by archive section (apt's package lists)
- ``oxygen()``    small RGBA icons by context (actions, apps, places ...), from ``oxygen-icon-theme``
- ``digits()``    8x8 images, from sklearn

Run ``python benchmarks/realsets.py`` to print the size and class counts of each set.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

# Where the Debian packages put them; the variables point elsewhere (a copy on a machine without the packages).
STAMPS_DIR = Path(os.environ.get("AUTOML_BENCH_STAMPS_DIR", "/usr/share/tuxpaint/stamps"))
FORTUNES_DIR = Path(os.environ.get("AUTOML_BENCH_FORTUNES_DIR", "/usr/share/games/fortunes"))
OXYGEN_DIR = Path(os.environ.get("AUTOML_BENCH_OXYGEN_DIR", "/usr/share/icons/oxygen/base"))

# Extra copies of stamps, not new images (see the stamps() docstring).
_STAMP_VARIANT_SUFFIXES = ("_mirror", "_outline")
_FORTUNE_SEPARATOR = re.compile(r"^%[ \t]*$", flags=re.MULTILINE)


def _missing(what: Path, package: str) -> RuntimeError:
    return RuntimeError(
        f"{what} was not found or holds too little data; "
        f"install it with: sudo apt-get install -y {package}"
    )


def _cap(df: pd.DataFrame, max_per_class: int | None, seed: int) -> pd.DataFrame:
    """Keep at most `max_per_class` rows per label (seeded sample); rows sorted by label."""
    if max_per_class is not None:
        df = df.sample(frac=1, random_state=seed).groupby("label").head(max_per_class)
    return df.sort_values(["label", df.columns[0]]).reset_index(drop=True)


def stamps(
    min_per_class: int = 10, max_per_class: int | None = None, seed: int = 0
) -> pd.DataFrame:
    """Tux Paint stamp images, labelled with their top-level category.

    Returns columns ``image`` (absolute path to a PNG file) and ``label`` (the folder
    directly under /usr/share/tuxpaint/stamps, e.g. ``animals``; images sit in nested
    subfolders such as ``animals/mammals/cats/lion-1.png``).

    Which files are kept:

    - Only ``.png``. The package also ships ``.svg`` stamps (vector, not raster; ~83 of
      them have a PNG twin, the rest exist only as SVG), plus ``.txt`` descriptions,
      ``.dat`` options and ``.ogg``/``.wav`` sounds, all skipped. The PNGs are mostly
      RGBA/LA/palette images of varied size (median ~130x130 px).
    - ``*_mirror.png`` files are skipped: they are hand-made mirrored copies of another
      stamp (``bradley.png`` / ``bradley_mirror.png``), used when a user flips it.
    - ``*_outline.png`` files are skipped: they are alphabet letters that also exist as
      ``*_filled.png`` (same glyph, outlined instead of filled).
      There are no thumbnail or shadow files in the package.
    - Files with the same bytes under two categories are dropped (``fireman240a.png``
      is in both ``military`` and ``people``).

    Categories with fewer than `min_per_class` images are dropped, not merged: the
    small ones (cartoon 6, medical 5, military 9, naturalforces 3, people 6 with
    tuxpaint-stamps-default 2022.06.04) have nothing in common with each other or with
    another category, so merging them would make a meaningless class.

    With the defaults (2022.06.04 package) this gives 702 images in 12 classes, kept
    imbalanced: symbols 186, animals 146, town 78, food 67, seasonal 59, plants 39,
    vehicles 34, household 33, clothes 19, space 16, hobbies 13, sports 12.
    `max_per_class` caps each class with a seeded random sample (None: no cap).
    """
    if not STAMPS_DIR.is_dir():
        raise _missing(STAMPS_DIR, "tuxpaint-stamps-default")
    rows = []
    for path in sorted(STAMPS_DIR.rglob("*.png")):
        if path.stem.endswith(_STAMP_VARIANT_SUFFIXES) or not path.is_file():
            continue
        digest = hashlib.sha1(path.read_bytes()).hexdigest()
        label = path.relative_to(STAMPS_DIR).parts[0]
        rows.append((str(path.resolve()), label, digest))
    df = pd.DataFrame(rows, columns=["image", "label", "digest"])
    if df.empty:
        raise _missing(STAMPS_DIR, "tuxpaint-stamps-default")
    # Same file in one category: keep one copy. Same file in two categories: drop it.
    df = df.drop_duplicates(["digest", "label"])
    df = df[~df.duplicated("digest", keep=False)].drop(columns="digest")
    counts = df["label"].value_counts()
    df = df[df["label"].isin(counts[counts >= min_per_class].index)]
    return _cap(df, max_per_class, seed)


def icons(side: int = 48, cache: Path | None = None, **kwargs) -> pd.DataFrame:
    """The stamps() images as small RGBA icons: each shrunk (aspect kept, Lanczos) to fit `side` x `side` px and
    written once as PNG under `cache` (default ~/.cache/automl-bench/icons<side>). Small imbalanced RGBA icons are
    the kind of image set where a net trained from scratch at the data's own size competes with a pretrained one
    upscaled; the stamps at their ~130 px are not. Same labels and rows as stamps(**kwargs)."""
    from PIL import Image

    cache = Path(cache or Path.home() / ".cache" / "automl-bench" / f"icons{side}")
    df = stamps(**kwargs)
    out = []
    for path in df["image"]:
        src = Path(path)
        dst = cache / src.relative_to(STAMPS_DIR)
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(src) as im:
                im = im.convert("RGBA")
                im.thumbnail((side, side), Image.LANCZOS)
                tmp = dst.with_suffix(".tmp.png")
                im.save(tmp)
                tmp.replace(dst)
        out.append(str(dst))
    return df.assign(image=out)


def _read_fortune_file(path: Path) -> list[str]:
    """Entries of one fortune file (separated by lines holding only ``%``), stripped."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # older fortune files can be latin-1
        text = raw.decode("latin-1")
    entries = (entry.strip() for entry in _FORTUNE_SEPARATOR.split(text.replace("\r\n", "\n")))
    return [entry for entry in entries if entry]


def fortunes(
    categories: int = 8,
    max_per_class: int = 300,
    max_chars: int = 400,
    seed: int = 0,
    min_per_class: int = 60,
    imbalance: float = 6.0,
) -> pd.DataFrame:
    """Short quotations from the fortune(6) database, labelled with their file name.

    Returns columns ``text`` and ``label``. In /usr/share/games/fortunes each category
    is a plain text file without extension; ``<name>.dat`` is its binary index (from
    strfile) and ``<name>.u8`` a symlink to it, so both are skipped. Only top-level
    files are read: the offensive ones (package ``fortunes-off``, in ``off/``, partly
    ROT13-encoded) are never used.

    Each entry is stripped of surrounding whitespace (inner newlines and tabs, e.g. the
    indented ``-- Author`` line, are kept). Empty entries, entries longer than
    `max_chars` characters and repeats within a category are dropped; a text found in
    more than one category is dropped everywhere (its label would be ambiguous). The
    `categories` categories with the most remaining entries (at least `min_per_class`)
    are kept, ties broken by name, and each is capped at `max_per_class` entries with a
    seeded random sample.

    With the defaults (fortunes 1:1.99.1-7.3) the 8 categories are people,
    definitions, cookie, computers, politics, miscellaneous, work and zippy; each has
    more than 500 usable entries. Their natural imbalance is mild (about 1200 people
    down to 540 zippy), so the caps fall geometrically from `max_per_class` for the
    largest category to `max_per_class / imbalance` for the smallest (300 down to 50:
    about 1150 rows, imbalanced like real support tickets). imbalance=1 gives a
    flat cap.
    """
    rows = [
        (entry, path.name)
        for path in sorted(FORTUNES_DIR.glob("*"))
        if path.is_file() and not path.is_symlink() and not path.suffix
        for entry in _read_fortune_file(path)
        if len(entry) <= max_chars
    ]
    df = pd.DataFrame(rows, columns=["text", "label"]).drop_duplicates()
    df = df[~df.duplicated("text", keep=False)]
    counts = df["label"].value_counts()
    counts = counts[counts >= min_per_class]
    if len(counts) < categories:
        raise _missing(FORTUNES_DIR, "fortunes")
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    chosen = [label for label, _ in ranked[:categories]]
    return _geometric_caps(df, chosen, max_per_class, imbalance, seed)


def _geometric_caps(df: pd.DataFrame, chosen: list, max_per_class: int, imbalance: float, seed: int) -> pd.DataFrame:
    """The rows of the `chosen` labels (largest first), capped from `max_per_class` for the first down to
    `max_per_class / imbalance` for the last, geometrically, with a seeded sample."""
    caps = {label: round(max_per_class * imbalance ** (-i / max(1, len(chosen) - 1))) for i, label in enumerate(chosen)}
    df = df[df["label"].isin(chosen)].sample(frac=1, random_state=seed)
    df = df[df.groupby("label").cumcount() < df["label"].map(caps)]
    return _cap(df, None, seed)


# Sections that say what a package is for (its topic), not how it is packaged (libs, libdevel, doc) or in which
# language it is written (python, perl, rust ...): a synopsis names its topic in other words than its section.
PACKAGE_SECTIONS = ("utils", "net", "science", "admin", "games", "x11", "text", "sound", "graphics", "web")


def packages(sections: tuple = PACKAGE_SECTIONS, max_per_class: int = 300, imbalance: float = 10.0,
             seed: int = 0) -> pd.DataFrame:
    """Debian package synopses (the first line of `Description:`, e.g. "remote incremental backup"), labelled with
    the package's archive section (its component prefix, e.g. ``contrib/``, dropped), from ``apt-cache
    dumpavail`` (the package lists of this machine's apt sources; none is downloaded). Returns ``text`` and
    ``label``. A synopsis found in more than one section is dropped everywhere, repeats within one are dropped.
    Sections are ranked by size and capped geometrically from `max_per_class` down to `max_per_class / imbalance`
    (300 down to 30 with the defaults: ~1,300 rows, 10 classes at 10:1). Short, terse and imbalanced: like the
    one-line tickets or product titles a user brings."""
    import subprocess

    out = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, check=False).stdout
    rows = []
    for record in out.decode("utf-8", "replace").split("\n\n"):
        section = re.search(r"^Section: (.+)$", record, re.M)
        synopsis = re.search(r"^Description: (.+)$", record, re.M)
        if section and synopsis:
            rows.append((synopsis.group(1).strip(), section.group(1).strip().split("/")[-1]))
    df = pd.DataFrame(rows, columns=["text", "label"]).drop_duplicates()
    df = df[~df.duplicated("text", keep=False)]
    counts = df["label"].value_counts()
    chosen = sorted((s for s in sections if counts.get(s, 0) >= max_per_class / imbalance),
                    key=lambda s: (-counts[s], s))
    if len(chosen) < len(sections):
        raise RuntimeError(f"apt's package lists hold too few packages in sections {set(sections) - set(chosen)}; "
                           "run `sudo apt-get update` (apt-cache dumpavail reads them)")
    return _geometric_caps(df, chosen, max_per_class, imbalance, seed)


def oxygen(side: int = 32, max_per_class: int = 300, min_per_class: int = 20, seed: int = 0) -> pd.DataFrame:
    """The Oxygen icon theme's PNG icons at `side` px (RGBA, drawn for that size), labelled with their context:
    the folder they sit in (actions, apps, categories, devices, emblems, mimetypes, places, status ...). Returns
    ``image`` (absolute paths) and ``label``. An icon that is a symlink to another is dropped (the same picture
    under two names), and so are contexts with fewer than `min_per_class` icons; each context is capped at
    `max_per_class` with a seeded sample. Naturally imbalanced (with oxygen-icon-theme 5.103 at 32 px: actions
    and mimetypes at the cap, emblems and categories a few dozen)."""
    folder = OXYGEN_DIR / f"{side}x{side}"
    rows = [(str(p), p.parent.name) for p in sorted(folder.glob("*/*.png")) if not p.is_symlink()]
    df = pd.DataFrame(rows, columns=["image", "label"])
    counts = df["label"].value_counts()
    df = df[df["label"].isin(counts[counts >= min_per_class].index)]
    if df["label"].nunique() < 4:
        raise _missing(folder, "oxygen-icon-theme")
    return _cap(df, max_per_class, seed)


def with_flipped_labels(clean: pd.DataFrame, seed: int, share: float = 0.05) -> tuple[pd.DataFrame, np.ndarray]:
    """A copy of `clean` with `share` of its rows' labels changed to another of its classes (seeded: the same rows
    and labels for a seed in every benchmark of suspected label errors); (that copy, the rows flipped)."""
    rng = np.random.default_rng(seed)
    flipped = rng.choice(len(clean), int(share * len(clean)), replace=False)
    classes = sorted(clean["label"].unique(), key=str)
    noisy = clean.copy()
    noisy.loc[flipped, "label"] = [rng.choice([c for c in classes if c != v]) for v in noisy.loc[flipped, "label"]]
    return noisy, flipped


def digits() -> pd.DataFrame:
    """sklearn's handwritten digits: ``image`` (8x8 float arrays, values 0-16), ``label`` (0-9)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return pd.DataFrame({"image": list(data.images), "label": data.target})


def main() -> None:
    """Print rows, number of classes and class counts of each dataset."""
    for name, build in [("stamps", stamps), ("fortunes", fortunes), ("packages", packages), ("oxygen", oxygen),
                        ("digits", digits)]:
        try:
            df = build()
        except RuntimeError as error:
            print(f"{name}: unavailable ({error})\n")
            continue
        counts = df["label"].value_counts()
        print(f"{name}: {len(df)} rows, {len(counts)} classes")
        print(", ".join(f"{label} {n}" for label, n in counts.items()), end="\n\n")


if __name__ == "__main__":
    main()
