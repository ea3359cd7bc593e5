"""Data intake: input forms, cleaning report, and clear errors for bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from automl import DataError, prepare


def _images(tmp_path, n_per_class=4, classes=("cat", "dog"), mode="RGB"):
    rows = []
    rng = np.random.default_rng(0)
    for c in classes:
        for i in range(n_per_class):
            arr = rng.integers(0, 255, (12 + i, 10, 4 if mode == "RGBA" else 3), dtype=np.uint8)
            p = tmp_path / f"{c}_{i}.png"
            Image.fromarray(arr, mode=mode).save(p)
            rows.append({"file": p.name, "label": c})
    return rows


def test_dataframe_of_arrays_is_image_task_with_stratified_splits(digits_df):
    t = prepare(digits_df, "label")
    assert t.modality == "image" and t.task == "multiclass" and t.classes == [0, 1, 2, 3]
    sizes = {k: len(v) for k, v in t.splits.items()}
    assert sum(sizes.values()) == len(digits_df)
    for idx in t.splits.values():  # every class in every split
        assert set(t.y[idx]) == {0, 1, 2, 3}
    assert not set(t.splits["train"]) & set(t.splits["test"])
    assert t.images[0].shape[2] == 3 and t.images[0].dtype == np.uint8


def test_split_is_fixed_by_seed(digits_df):
    a, b, c = prepare(digits_df, seed=0), prepare(digits_df, seed=0), prepare(digits_df, seed=1)
    assert (a.splits["test"] == b.splits["test"]).all()
    assert not np.array_equal(a.splits["test"], c.splits["test"])


def test_csv_with_relative_rgba_paths(tmp_path):
    df = pd.DataFrame(_images(tmp_path, mode="RGBA"))
    df.to_csv(tmp_path / "data.csv", index=False)
    t = prepare(str(tmp_path / "data.csv"))
    assert t.modality == "image" and t.label_column == "label" and t.input_columns == ["file"]
    assert all(a.shape[2] == 3 for a in t.images)


def test_text_task_and_report_counts_drops():
    df = pd.DataFrame({
        "text": ["good", "bad", "fine", "awful", "nice", "poor", "good", "ok", None, "meh", "great", "worse"],
        "label": ["p", "n", "p", "n", "p", "n", "p", None, "n", "p", "p", "n"],
    })
    t = prepare(df)
    r = t.report
    assert t.modality == "text"
    assert r.dropped_missing_label == 1 and r.dropped_missing_input == 1 and r.dropped_duplicates == 1
    assert r.rows_used == len(df) - 3 == len(t.y)


def test_conflicting_duplicates_are_dropped_and_counted():
    df = pd.DataFrame({"text": ["same", "same", "a", "b", "c", "d", "e", "f"], "label": [1, 2, 1, 2, 1, 2, 1, 2]})
    t = prepare(df)
    assert t.report.dropped_conflicting_duplicates == 2 and len(t.y) == 6


@pytest.mark.parametrize("make, needle", [
    (lambda: pd.DataFrame({"text": [], "label": []}), "empty"),
    (lambda: pd.DataFrame({"text": ["a", "b"], "cls": [1, 2]}), "columns are ['text', 'cls']"),
    (lambda: pd.DataFrame({"text": list("abcdef"), "label": [1] * 6}), "only one class"),
    (lambda: pd.DataFrame({"text": list("abcdef"), "label": [None] * 6}), "labels in column 'label' are missing"),
    (lambda: pd.DataFrame({"x": [1.0, 2.0, 3.0], "label": [1, 2, 1]}), "No usable input column"),
    (lambda: pd.DataFrame({"text": ["", " ", ""], "label": [1, 2, 1]}), "empty"),
    (lambda: pd.DataFrame({"text": list("abcdef"), "label": [1, "x", 1, "x", 1, "x"]}), "mixes value types"),
    (lambda: pd.DataFrame({"text": list("abcd"), "label": [1, 2, 1, 2]}), "fewer than 3 examples"),
    (lambda: pd.DataFrame({"text": list("abcdefgh"), "label": [1, 1, 1, 2, 2, 2, 2, 3]}), "'3': 1"),
    # Five rows of class 1, one text: kept once (copies in two splits would leak), and the message says so.
    (lambda: pd.DataFrame({"text": ["same"] * 5 + list("abc"), "label": [1] * 5 + [2] * 3}),
     "{'1': 1} in column 'label' have fewer than 3 examples, too few to put one in each of train/validation/test "
     "(counted after 4 exact copies of other rows were dropped"),
    (lambda: pd.DataFrame([["a", "b", 1]], columns=["text", "text", "label"]), "duplicated column names ['text']"),
])
def test_bad_input_raises_clear_data_error(make, needle):
    with pytest.raises(DataError) as err:
        prepare(make(), label="label" if "cls" not in make().columns else None)
    assert needle in str(err.value)
    assert "Fix:" in str(err.value)


def test_missing_image_file_is_named(tmp_path):
    rows = _images(tmp_path)
    rows.append({"file": "nope.png", "label": "cat"})
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    t = prepare(str(tmp_path / "d.csv"))  # default: dropped and reported
    assert t.report.dropped_unreadable_images[0]["file"] == "nope.png"
    with pytest.raises(DataError, match="nope.png"):
        prepare(str(tmp_path / "d.csv"), drop_bad_images=False)


def test_corrupt_image_and_bad_extension_and_encoding(tmp_path):
    rows = _images(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    rows.append({"file": "bad.png", "label": "dog"})
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(DataError, match="bad.png"):
        prepare(str(tmp_path / "d.csv"), drop_bad_images=False)
    (tmp_path / "d.xlsx").write_bytes(b"x")
    with pytest.raises(DataError, match="Unsupported file extension '.xlsx'"):
        prepare(str(tmp_path / "d.xlsx"))
    (tmp_path / "latin.csv").write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(DataError, match="not valid UTF-8"):
        prepare(str(tmp_path / "latin.csv"))


def test_image_folder_with_class_subfolders(tmp_path):
    for k, c in enumerate(("a", "b")):
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.fromarray(np.full((8, 8), 40 * i + k, np.uint8), mode="L").save(tmp_path / c / f"{i}.png")
    t = prepare(str(tmp_path))
    assert t.classes == ["a", "b"] and t.modality == "image" and len(t.y) == 8


def test_identical_inputs_with_different_labels_explain_empty_result(tmp_path):
    df = pd.DataFrame({"text": ["x", "x", "y", "y"], "label": [1, 2, 1, 2]})
    with pytest.raises(DataError, match="identical inputs with different labels"):
        prepare(df)


def test_float_label_with_many_values_is_regression():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"text": [f"item {i}" for i in range(60)], "price": rng.normal(10, 3, 60)})
    t = prepare(df, "price")
    assert t.task == "regression" and t.num_classes == 1 and t.y.dtype == np.float32
    assert sum(len(v) for v in t.splits.values()) == 60
    assert prepare(df.assign(price=(df.price > 10).astype(int)), "price").task == "binary"
    with pytest.raises(DataError, match="task='regression' needs a numeric label"):
        prepare(pd.DataFrame({"text": list("abcdef"), "label": list("xyxyxy")}), task="regression")


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet", "jsonl"])
def test_table_files_of_text(tmp_path, text_df, fmt):
    path = tmp_path / f"d.{fmt}"
    {"csv": lambda: text_df.to_csv(path, index=False), "tsv": lambda: text_df.to_csv(path, sep="\t", index=False),
     "parquet": lambda: text_df.to_parquet(path), "jsonl": lambda: text_df.to_json(path, orient="records", lines=True)}[fmt]()
    t = prepare(str(path))
    assert t.modality == "text" and len(t.y) == len(text_df) and t.classes == ["food", "sport", "tech"]


def test_xy_arrays_and_flat_square_images():
    from sklearn.datasets import load_digits

    d = load_digits()
    t = prepare((d.data[:200], d.target[:200]))  # 64 features per row -> 8x8 images
    assert t.modality == "image" and t.images[0].shape == (8, 8, 3)
    t2 = prepare((["good movie", "bad movie", "great", "awful", "nice", "poor"] * 2, [1, 0, 1, 0, 1, 0] * 2))
    assert t2.modality == "text"


def test_split_column_is_respected():
    df = pd.DataFrame({"text": [f"t{i}" for i in range(12)], "label": [0, 1] * 6,
                       "split": ["train"] * 6 + ["validation"] * 3 + ["test"] * 3})
    t = prepare(df)
    assert list(t.splits["test"]) == [9, 10, 11] and list(t.splits["validation"]) == [6, 7, 8]


def test_a_split_column_whose_training_rows_hold_one_class_is_refused_and_a_missing_class_is_noted():
    one = pd.DataFrame({"text": [f"t{i}" for i in range(12)], "label": ["a"] * 6 + ["b"] * 6,
                        "split": ["train"] * 6 + ["validation"] * 3 + ["test"] * 3})
    with pytest.raises(DataError, match="training split holds 1 class"):
        prepare(one)
    some = pd.DataFrame({"text": [f"t{i}" for i in range(15)], "label": ["a", "b"] * 5 + ["c"] * 5,
                         "split": ["train"] * 10 + ["validation"] * 2 + ["test"] * 3})
    t = prepare(some)
    assert any("no training row" in n and n.endswith(": c") for n in t.report.notes)


@pytest.mark.parametrize("labels", [[["a", "b"], ["a"]] * 6, [{"x": 1}, {"x": 2}] * 6])
def test_list_or_dict_labels_get_a_clear_error(labels):
    df = pd.DataFrame({"text": [f"t{i}" for i in range(12)], "label": labels})
    with pytest.raises(DataError, match="expected one label per row"):
        prepare(df)


def test_two_text_columns_are_kept_as_pairs():
    df = pd.DataFrame({"question": [f"q{i}" for i in range(9)], "answer": [f"a{i}" for i in range(9)], "label": [0, 1, 2] * 3})
    t = prepare(df)
    assert t.input_columns == ["question", "answer"] and t.texts[0] == ["q0", "a0"]


def test_a_row_id_column_beside_the_text_is_left_out_so_copies_of_a_text_are_found():
    """A string id column is not paired with the text: with it, every row would be unique, so the 10 repeated
    texts below would not be seen as copies (and could land in train and test). Named in inputs=, it is used."""
    import uuid

    from automl.data.intake import infer_inputs

    texts = [f"a short text number {i}" for i in range(40)] + [f"a short text number {i}" for i in range(10)]
    df = pd.DataFrame({"id": [str(uuid.UUID(int=i)) for i in range(50)], "text": texts,
                       "label": [i % 2 for i in range(40)] + [i % 2 for i in range(10)]})
    t = prepare(df)
    assert t.input_columns == ["text"] and t.report.ignored_columns == ["id"]
    assert t.report.dropped_duplicates == 10
    assert any("['id'] left out of the inputs" in n for n in t.report.notes)
    named = prepare(df, inputs=["id", "text"])
    assert named.input_columns == ["id", "text"] and named.report.dropped_duplicates == 0
    # beside one-word texts that repeat, the ids go too; where every column looks like ids, all are kept
    words = pd.DataFrame({"id": [f"row{i}" for i in range(30)], "word": ["cat", "dog", "owl"] * 10,
                          "label": [0, 1, 2] * 10})
    assert infer_inputs(words, "label", None) == ("text", ["word"], ["id"])
    distinct = words.assign(word=[f"w{i}" for i in range(30)])
    assert infer_inputs(distinct, "label", None) == ("text", ["id", "word"], [])
    lists = words.assign(id=[["a"], "b"] * 15)  # unhashable values among the strings: no id, and no crash
    assert infer_inputs(lists, "label", None) == ("text", ["id", "word"], [])


def test_texts_to_predict_are_stripped_as_training_texts_are():
    from automl.data.intake import read_inputs

    df = pd.DataFrame({"text": ["  good movie \n", "bad"], "label": [1, 0]})
    assert read_inputs(df[["text"]], "text", ["text"]) == [["good movie"], ["bad"]]
    many = pd.DataFrame({"text": [f"  movie {i} \n" for i in range(12)], "label": [1, 0] * 6})
    assert prepare(many).texts[0] == ["movie 0"]


def test_which_columns_are_inputs_is_the_modality_adapters_call():
    """Column detection asks the registered adapters (in registration order), so a third modality is one
    registration: a toy adapter that claims 1-d feature vectors makes such a column an input, and mixing it
    with text by inputs= is refused naming both."""
    from automl.data.intake import infer_inputs
    from automl.modalities import base

    class Vectors(base.Modality):
        name = "vector"
        max_columns = 1

        def claims(self, sample):
            return isinstance(sample.iloc[0], np.ndarray) and sample.iloc[0].ndim == 1

    df = pd.DataFrame({"v": [np.zeros(4), np.ones(4)], "w": [np.ones(4), np.zeros(4)], "t": ["a b", "c d"],
                       "label": [0, 1]})
    before = dict(base._MODALITIES)
    with pytest.raises(DataError, match="No usable input column"):
        infer_inputs(df[["v", "label"]], "label", None)
    try:
        base.register(Vectors())
        # text registered before vectors: it comes first where both are present; alone, the vectors are read
        assert infer_inputs(df, "label", None) == ("text", ["t"], ["v", "w"])
        assert infer_inputs(df[["v", "w", "label"]], "label", None) == ("vector", ["v"], ["w"])
        with pytest.raises(DataError, match=r"mix text columns \['t'\] and vector columns \['v'\]"):
            infer_inputs(df, "label", ["v", "t"])
    finally:
        base._MODALITIES.clear()
        base._MODALITIES.update(before)


def test_a_photos_exif_orientation_is_applied_so_pixels_are_as_a_viewer_shows_them(tmp_path):
    """Phones store most photos sideways with an EXIF tag saying how to turn them; training on the stored pixels
    would learn sideways objects."""
    from automl.data.images import decode_image, inspect_image

    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = 255  # landscape as stored, a white band on its left
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to view": the left band ends up on top
    img.save(tmp_path / "p.jpg", exif=exif, quality=95)
    out = decode_image(str(tmp_path / "p.jpg"))
    assert out.shape == (40, 20, 3)
    assert out[:8].mean() > 200 and out[14:].mean() < 50
    assert inspect_image(str(tmp_path / "p.jpg"))[1:] == (40, 20)  # the size it is decoded at
    img.save(tmp_path / "plain.jpg", quality=95)  # no tag: as stored
    assert decode_image(str(tmp_path / "plain.jpg")).shape == (20, 40, 3)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_undone_as_pillow_does(tmp_path, orientation):
    """decode_image turns the pixels itself (Pillow's exif_transpose re-encodes the EXIF block and raises on tags
    that getexif() reads): the result must equal Pillow's for each of the 8 orientations (PNG: lossless)."""
    from PIL import ImageOps

    from automl.data.images import decode_image

    arr = np.random.default_rng(0).integers(0, 255, (20, 40, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(tmp_path / "o.png", exif=exif)
    want = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "o.png")).convert("RGB"))
    assert np.array_equal(decode_image(str(tmp_path / "o.png")), want)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_16_bit_and_float_greys_keep_their_contrast(tmp_path, mode):
    """Pillow's convert("RGB") clips wider greys at 255: a 16-bit PNG scan came out white, a float TIFF black. They
    are scaled as arrays are: values in [0, 1] times 255, wider ranges by the image's own minimum and maximum."""
    from automl.data.images import decode_image

    ramp = np.tile(np.linspace(0, 1, 32), (8, 1))
    if mode == "F":
        img, name, want = Image.fromarray(ramp.astype(np.float32)), "g.tiff", ramp * 255
    else:
        wide = (1000 + ramp * 60000).astype(np.uint16 if mode == "I;16" else np.int32)
        img, name, want = Image.fromarray(wide), "g.png" if mode == "I;16" else "g.tiff", ramp * 255
    img.save(tmp_path / name)
    assert Image.open(tmp_path / name).mode == mode
    out = decode_image(str(tmp_path / name))
    assert out.shape == (8, 32, 3)
    assert np.abs(out[..., 0].astype(float) - want).max() <= 1.0
    assert (out[..., 0] == out[..., 2]).all()


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_an_array_with_a_nan_or_infinite_pixel_keeps_its_other_pixels_and_one_with_no_finite_value_is_unreadable(
        bad):
    """One infinite value set the range an array is scaled by, and its whole image went black; an all-NaN array
    became a black image that kept its label. The range is now the finite values'; an array without any is
    refused like an unreadable file (dropped and reported, or an error with drop_bad_images=False)."""
    from automl.data.images import ImageDecodeError, decode_image
    from automl.data.intake import prepare

    ramp = np.tile(np.linspace(0, 1, 32), (8, 1))
    for arr in (ramp, 1000 + ramp * 60000):  # values in [0, 1], and a wider range scaled by its minimum and maximum
        spoiled = arr.copy()
        spoiled[0, 0] = bad
        want, got = decode_image(arr), decode_image(spoiled)
        assert np.array_equal(got[1:], want[1:]) and np.array_equal(got[0, 1:], want[0, 1:])
        assert (got[0, 0] == (255 if bad == np.inf else 0)).all()
    with pytest.raises(ImageDecodeError, match=r"array of shape \(8, 32\) holds no finite value"):
        decode_image(np.full((8, 32), bad))
    rng = np.random.default_rng(0)
    images = [rng.random((8, 8)) for _ in range(30)] + [np.full((8, 8), bad)]
    df = pd.DataFrame({"image": images, "label": [i % 2 for i in range(31)]})
    t = prepare(df)
    assert t.report.rows_used == 30 and len(t.report.dropped_unreadable_images) == 1
    assert "no finite value" in str(t.report.dropped_unreadable_images[0])
    with pytest.raises(DataError, match="no finite value"):
        prepare(df, drop_bad_images=False)


def _glyph(rgb: int) -> Image.Image:
    """A one-colour glyph whose shape is only in its alpha channel (as symbolic icons are drawn)."""
    arr = np.full((16, 16, 4), rgb, dtype=np.uint8)
    arr[..., 3] = 0
    arr[4:12, 4:12, 3] = 255
    return Image.fromarray(arr, mode="RGBA")


def test_a_light_glyph_on_transparency_keeps_its_shape_and_a_dark_one_stays_over_white(tmp_path):
    """Transparent pixels were filled with white: a white glyph became a blank white image. A nearly white drawing
    now goes over black, any other over white as before; an export made before this (its manifest says "white", as
    every manifest without the field does) still reads images as its model was trained on them."""
    from automl.data.images import decode_image
    from automl.data.intake import read_inputs
    from automl.export.manifest import Preprocessing

    _glyph(255).save(tmp_path / "white.png")
    _glyph(20).save(tmp_path / "dark.png")
    white, dark = decode_image(str(tmp_path / "white.png")), decode_image(str(tmp_path / "dark.png"))
    assert (white[4:12, 4:12] == 255).all() and (white[:4] == 0).all()  # the glyph over black
    assert (dark[4:12, 4:12] == 20).all() and (dark[:4] == 255).all()    # over white, as before
    _glyph(200).save(tmp_path / "light.png")  # light but visible over white: half the Oxygen icons are like this, and
    assert (decode_image(str(tmp_path / "light.png"))[:4] == 255).all()  # over black they cost a fine-tune 10 points
    df = pd.DataFrame({"image": [str(tmp_path / "white.png")]})
    old = read_inputs(df, "image", ["image"], preprocessing=Preprocessing("image"))[0]
    assert Preprocessing("image").alpha_background == "white" and (old == 255).all()
    new = read_inputs(df, "image", ["image"], preprocessing=Preprocessing("image", alpha_background="contrast"))[0]
    assert np.array_equal(new, white)
    with pytest.raises(DataError, match="fills transparent pixels with 'grey'"):  # a rule this version lacks
        read_inputs(df, "image", ["image"], preprocessing=Preprocessing("image", alpha_background="grey"))


def test_an_update_of_an_export_made_before_the_fill_reads_its_new_images_as_the_base_was_trained(tmp_path):
    """A base exported before transparent pixels could go over black (its manifest says "white") is updated on
    images read over white, in the task, in the decoded store its trials train on and in the run's identity; a
    fresh run reads the same files over black under a white drawing."""
    import shutil

    from automl.data.inputs import ImageStore
    from automl.options import DataOptions, OutputOptions, SearchOptions, UpdateOptions
    from automl.stages import prepare as prepare_stage

    rows = []
    for i in range(30):
        arr = np.zeros((16, 16, 4), dtype=np.uint8)
        arr[..., :3] = 250 - i  # nearly white drawings: over black now
        arr[i % 8:i % 8 + 6, i // 8:i // 8 + 8, 3] = 255
        Image.fromarray(arr, mode="RGBA").save(tmp_path / f"{i}.png")
        rows.append({"image": str(tmp_path / f"{i}.png"), "label": i % 3})
    df = pd.DataFrame(rows)
    base = tmp_path / "base"
    shutil.copytree(Path(__file__).parent / "fixtures" / "v1_image_export", base)  # classes 0-2, no fill recorded
    updated = prepare_stage(df, data=DataOptions(), search=SearchOptions(), update=UpdateOptions(base_model=str(base)),
                            output=OutputOptions(output_dir=str(tmp_path / "run"))).task
    fresh = prepare(df)
    assert updated.images.alpha_background == "white" and fresh.images.alpha_background == "contrast"
    assert (updated.images[0][:, 15] == 255).all() and (fresh.images[0][:, 15] == 0).all()  # a column no glyph covers
    store, failed = ImageStore.build(updated, 16, tmp_path / "store", parallel=False)
    assert not failed and (store.array()[:, :, :, 15] == 255).all()
    assert updated.fingerprint() != fresh.fingerprint()  # no store or cache of the other fill is reused


def test_labels_that_differ_only_in_case_or_spacing_are_kept_apart_and_noted():
    """A stray space from a CSV makes "cat " a class of its own: trained as given (it may be meant), and the data
    report, which the card shows, says which labels and how to join them."""
    texts = [f"a short text about thing {i}" for i in range(40)]
    df = pd.DataFrame({"text": texts, "label": ["cat", "cat ", "dog", "Dog"] * 10})
    t = prepare(df)
    assert sorted(t.classes) == ["Dog", "cat", "cat ", "dog"]
    notes = [n for n in t.report.notes if "differ only in case or spacing" in n]
    assert notes == ["labels 'cat', 'cat ' differ only in case or spacing and are trained as 2 classes, as given; if "
                     "they are one, fix the labels (e.g. df['label'] = df['label'].str.strip()).",
                     "labels 'Dog', 'dog' differ only in case or spacing and are trained as 2 classes, as given; if "
                     "they are one, fix the labels (e.g. df['label'] = df['label'].str.strip().str.lower())."], \
        t.report.notes
    assert not any("differ only" in n for n in prepare(df.assign(label=["cat", "dog"] * 20)).report.notes)
