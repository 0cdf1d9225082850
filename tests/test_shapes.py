"""The coloured-shapes set and its exact scorer: the generator draws what its classes say (palette colours on
black, deterministic by seed), the scorer reads every attribute of fresh images right and reads degraded ones
wrong in the attribute that was spoilt, and the written folder trains as a labelled image folder."""

import json

import numpy as np
import pytest
import torch

from ddpmlab.cli import main
from ddpmlab.data.images import ImageFolderDataset, from_uint8
from ddpmlab.data.shapes import (
    COLOURS,
    PALETTE,
    POSITIONS,
    SHAPES,
    SHAPE_WORDS,
    SIZE_WORDS,
    SIZES,
    ShapesSpec,
    balanced_labels,
    captions,
    draw_shapes,
    generate,
    held_out_classes,
    jitters,
    parse_class_name,
    placement,
)
from ddpmlab.data.shapes_folder import METADATA_FILE, read_shapes_spec, write_shapes_folder
from ddpmlab.errors import DataError, DDPMError
from ddpmlab.evaluate.judges import clean_share
from ddpmlab.evaluate.shapes import read_shapes, score_shapes, shape_shares

SPEC = ShapesSpec()
ATTRS = ("size", "colour", "shape", "position")
N_DEGRADED = 150


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fresh():
    """150 images of seed 99 (no other test draws that seed): labels, attribute dicts, uint8 images, x in [-1, 1]."""
    labels = balanced_labels(SPEC, N_DEGRADED, seed=99)
    attrs = [SPEC.attributes(i) for i in labels]
    jitter = jitters(N_DEGRADED, 99)
    return labels, attrs, jitter, from_uint8(draw_shapes(attrs, 32, jitter))


# ------------------------------------------------------------------------------ classes and the generator


def test_class_index_is_the_sorted_order_of_the_names_and_round_trips():
    names = SPEC.class_names()
    assert SPEC.num_classes == len(SIZES) * len(COLOURS) * len(SHAPES) * len(POSITIONS) == 432
    assert names == sorted(names) and len(set(names)) == 432
    for i in (0, 1, 17, 431):
        assert SPEC.class_index(SPEC.attributes(i)) == i == SPEC.class_index(names[i])
        assert parse_class_name(names[i]) == SPEC.attributes(i)
    assert SPEC.attributes(0) == {"size": "large", "colour": "blue", "shape": "circle", "position": "bottom"}
    small = ShapesSpec.of(colours=["red", "blue"], shapes=["square"], positions=["top-left", "centre"])
    assert small.num_classes == 2 * 2 * 1 * 2 and small.class_names() == sorted(small.class_names())
    with pytest.raises(DataError, match="purple - choose among blue"):
        ShapesSpec.of(colours=["red", "purple"])
    with pytest.raises(DataError, match="sorted"):
        ShapesSpec(colours=("red", "blue"))
    with pytest.raises(DataError, match="not a shapes class name"):
        parse_class_name("red-circle")


def test_generator_is_deterministic_by_seed():
    labels = balanced_labels(SPEC, 500, seed=3)
    assert np.array_equal(labels, balanced_labels(SPEC, 500, seed=3))
    assert sorted(set(np.bincount(labels, minlength=432))) == [1, 2]  # every class once or twice
    a, b = generate(SPEC, labels, 32, seed=3), generate(SPEC, labels, 32, seed=3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, generate(SPEC, labels, 32, seed=4))  # the jitter moves with the seed
    assert captions(SPEC, labels, 3) == captions(SPEC, labels, 3) != captions(SPEC, labels, 4)
    # a chunk drawn with its slice of the jitter equals the whole set's images (the folder writer draws so)
    part = draw_shapes([SPEC.attributes(i) for i in labels[100:200]], 32, jitters(500, 3)[100:200])
    assert np.array_equal(part, a[100:200])


def test_images_are_one_palette_colour_on_black_at_the_nominal_place(fresh):
    labels, attrs, jitter, x = fresh
    img = draw_shapes(attrs, 32, jitter)
    for k, a in enumerate(attrs):
        colours = {tuple(c) for c in img[k].reshape(-1, 3)}
        assert colours == {(0, 0, 0), PALETTE[a["colour"]]}, a
        ys, xs = np.nonzero(img[k].max(2))
        cx, cy, r = placement(a, 32, jitter[k])
        # pixel centres inside the shape lie within its box of half-side r around (cx, cy)
        assert np.all(np.abs(xs + 0.5 - cx) <= r) and np.all(np.abs(ys + 0.5 - cy) <= r)
        assert max(np.ptp(xs), np.ptp(ys)) + 1 >= 2 * r - 2  # and span at least 2r - 2 pixels
    assert clean_share(x) == 1.0  # the digit measure's border rule: the shapes stay out of the border


ROW_CUES = {"top": ("top", "upper"), "bottom": ("bottom", "lower")}
COLUMN_CUES = {"left": ("left",), "right": ("right",)}


def test_captions_name_every_attribute_in_several_wordings():
    texts = captions(SPEC, np.repeat(np.arange(432), 8), seed=5)
    for i in range(432):
        a = SPEC.attributes(i)
        mine = texts[8 * i: 8 * i + 8]
        assert len(set(mine)) >= 3, mine
        row, _, col = a["position"].partition("-")
        cues = [ROW_CUES.get(row), COLUMN_CUES.get(row), COLUMN_CUES.get(col)]
        cues = [c for c in cues if c] or [("centre", "middle")]
        for t in mine:
            assert any(w in t for w in SIZE_WORDS[a["size"]]) and a["colour"] in t, t
            assert any(w in t for w in SHAPE_WORDS[a["shape"]]), t
            assert all(any(w in t for w in c) for c in cues), (a["position"], t)
            if cues == [("centre", "middle")]:
                assert not any(w in t for w in ("top", "upper", "bottom", "lower", "left", "right")), t


def test_held_out_classes_leave_each_shape_one_unseen_colour():
    held = held_out_classes(SPEC)
    pairs = {(SPEC.attributes(i)["shape"], SPEC.attributes(i)["colour"]) for i in held}
    assert len(pairs) == 4 and {s for s, _ in pairs} == set(SHAPES) and len({c for _, c in pairs}) == 4
    assert len(held) == 4 * len(SIZES) * len(POSITIONS)
    kept = [SPEC.attributes(i) for i in range(432) if i not in set(held)]
    for a in ATTRS:  # every value of every attribute is still trained on
        assert {k[a] for k in kept} == set(SPEC.values(a))


# ------------------------------------------------------------------------------ the scorer


def test_scorer_reads_every_attribute_of_2000_fresh_images_of_every_class():
    labels = balanced_labels(SPEC, 2000, seed=2024)
    assert set(labels) == set(range(432))
    x = from_uint8(generate(SPEC, labels, 32, seed=2024))
    scores = score_shapes(x, labels, SPEC)
    assert shape_shares(scores) == {k: 1.0 for k in ("clean",) + ATTRS + ("all",)}


def _background(x, rgb):
    """The black pixels of x set to the colour rgb ([0, 1] scale)."""
    black = (x == -1).all(1, keepdim=True)
    return torch.where(black, torch.tensor(rgb).view(1, 3, 1, 1) * 2 - 1, x)


def _redraw(attrs, jitter, change):
    return from_uint8(draw_shapes([{**a, **change(a)} for a in attrs], 32, jitter))


def _next(values, v):
    return values[(values.index(v) + 1) % len(values)]


DEGRADED = {  # name -> (make (x, attrs, jitter, g) -> images, the scores that must read wrong, those still right)
    "noise": (lambda x, a, j, g: (x + 0.15 * torch.randn(x.shape, generator=g)).clamp(-1, 1), {"clean"}, set(ATTRS)),
    "grey background": (lambda x, a, j, g: _background(x, (0.25, 0.25, 0.25)), {"clean"}, set(ATTRS)),
    "tinted background": (lambda x, a, j, g: _background(x, (0.0, 0.0, 0.2)), {"clean"}, set(ATTRS)),
    "light background": (lambda x, a, j, g: _background(x, (0.6, 0.6, 0.6)), {"clean"} | set(ATTRS), set()),
    "pure noise": (lambda x, a, j, g: torch.rand(x.shape, generator=g) * 2 - 1, {"clean"} | set(ATTRS), set()),
    "other colour": (lambda x, a, j, g: _redraw(a, j, lambda k: {"colour": _next(COLOURS, k["colour"])}),
                     {"colour"}, {"clean", "size", "shape", "position"}),
    "colour half-way": (lambda x, a, j, g: (x + _redraw(a, j, lambda k: {"colour": _next(COLOURS, k["colour"])})) / 2,
                        {"colour"}, {"clean", "size", "shape", "position"}),
    "other shape": (lambda x, a, j, g: _redraw(a, j, lambda k: {"shape": _next(SHAPES, k["shape"])}),
                    {"shape"}, {"clean", "size", "colour", "position"}),
    "other size": (lambda x, a, j, g: _redraw(a, j, lambda k: {"size": _next(SIZES, k["size"])}),
                   {"size"}, {"clean", "shape", "colour", "position"}),
    "other position": (lambda x, a, j, g: _redraw(a, j, lambda k: {"position": _next(POSITIONS, k["position"])}),
                       {"position"}, {"clean", "size", "shape", "colour"}),
    "black": (lambda x, a, j, g: -torch.ones_like(x), set(ATTRS), {"clean"}),
}


@pytest.mark.parametrize("kind", list(DEGRADED))
def test_degraded_images_read_wrong_in_the_spoilt_attribute(fresh, kind):
    labels, attrs, jitter, x = fresh
    make, wrong, right = DEGRADED[kind]
    scores = score_shapes(make(x, attrs, jitter, torch.Generator().manual_seed(7)), labels, SPEC)
    for k in wrong | {"all"}:
        assert not scores[k].any(), f"{kind}: {k} read right on {int(scores[k].sum())} of {len(x)}"
    for k in right:
        assert scores[k].all(), f"{kind}: {k} read wrong on {int((~scores[k]).sum())} of {len(x)}"


def test_a_soft_blob_or_two_shapes_are_not_all_right(fresh):
    labels, attrs, jitter, x = fresh
    pos = torch.arange(32) + 0.5
    blobs = []
    for a, j in zip(attrs, jitter):
        cx, cy, r = placement(a, 32, j)
        bump = torch.exp(-((pos - cx) ** 2 + (pos[:, None] - cy) ** 2) / (2 * (r / 1.5) ** 2))
        blobs.append(bump * torch.tensor(PALETTE[a["colour"]]).view(3, 1, 1) / 255)
    blob = score_shapes(torch.stack(blobs) * 2 - 1, labels, SPEC)
    assert not blob["clean"].any() and not blob["all"].any()
    assert not blob["shape"][[a["shape"] != "circle" for a in attrs]].any()
    second = _redraw(attrs, jitter, lambda k: {"position": _next(POSITIONS, k["position"]), "size": "small"})
    assert not score_shapes(torch.maximum(x, second), labels, SPEC)["all"].any()


def test_readings_by_name_and_bad_input(fresh):
    labels, attrs, jitter, x = fresh
    readings = read_shapes(x[:3])
    assert [readings.attributes(i) for i in range(3)] == attrs[:3]
    assert score_shapes(x[:3], attrs[:3])["all"].all()  # attribute dicts as targets
    with pytest.raises(DDPMError, match="square RGB"):
        read_shapes(x[:, :1])
    with pytest.raises(DDPMError, match="at least 28"):
        read_shapes(x[:, :, :20, :20])
    with pytest.raises(DDPMError, match="3 images but 2 targets"):
        score_shapes(x[:3], labels[:2])


# ------------------------------------------------------------------------------ the folder


def test_folder_reads_back_as_a_labelled_set_with_captions(tmp_path, capsys):
    out = tmp_path / "shapes"
    code = main(["data", "shapes", str(out), "--n", "40", "--seed", "1", "--colours", "red,blue", "--shapes",
                 "square,triangle", "--positions", "centre,top-left", "--no-progress"])
    assert code == 0 and "model.num_classes=16" in capsys.readouterr().out
    spec, about = read_shapes_spec(out)
    assert spec == ShapesSpec.of(colours=["red", "blue"], shapes=["square", "triangle"],
                                 positions=["centre", "top-left"]) and about["n"] == 40
    ds = ImageFolderDataset(out, (32, 32), 3)
    assert ds.num_classes == 16 and ds.class_names == spec.class_names() and len(ds) == 40
    x, y = torch.stack([ds[i][0] for i in range(len(ds))]), [int(ds[i][1]) for i in range(len(ds))]
    assert shape_shares(score_shapes(x, y, spec))["all"] == 1.0  # every label is the class its image shows
    lines = [json.loads(t) for t in (out / METADATA_FILE).read_text().splitlines()]
    assert len(lines) == 40 and all((out / e["file_name"]).is_file() and e["text"] for e in lines)
    assert main(["data", "check", str(out)]) == 0
    assert "usable: 40 of 40 image files in 16 classes" in capsys.readouterr().out
    assert main(["data", "shapes", str(out), "--n", "40"]) == 2  # an existing folder is never overwritten
    assert "already exists" in capsys.readouterr().err


def test_folder_with_held_out_classes_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    spec = ShapesSpec.of(sizes=["small"], positions=["centre"], colours=["red", "green", "blue"],
                         shapes=["circle", "square"])
    out = write_shapes_folder(tmp_path / "held", n=8, seed=2, spec=spec, hold_out=True, progress=False)
    held = {spec.class_names()[i] for i in held_out_classes(spec)}
    assert held and not held & {p.name for p in out.iterdir()}
    assert ImageFolderDataset(out, (32, 32), 3).num_classes == spec.num_classes - len(held)
    assert json.loads((out / "shapes.json").read_text())["held_out"] == sorted(held)

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("ddpmlab.data.shapes_folder.captions", fail)
    with pytest.raises(OSError, match="disk full"):
        write_shapes_folder(tmp_path / "broken", n=8, spec=spec, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["held"]  # no half-written folder, no temporary one
    with pytest.raises(DataError, match="at least 28"):
        write_shapes_folder(tmp_path / "tiny", n=8, size=16, spec=spec, progress=False)
