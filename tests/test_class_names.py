"""COCO class-name layouts and user-given names."""

import pytest

from engine.class_names import COCO_80, COCO_80_CATEGORY_IDS, COCO_91, coco_category_ids, default_class_names, load_class_names


def test_coco_layouts():
    assert len(COCO_91) == 91 and COCO_91[0] == "__background__"
    assert COCO_91[1] == "person" and COCO_91[10] == "traffic light" and COCO_91[90] == "toothbrush"
    assert [i for i, n in enumerate(COCO_91) if n == "N/A"] == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
    assert len(COCO_80) == 80 and COCO_80[0] == "person" and COCO_80[-1] == "toothbrush"
    assert len(COCO_80_CATEGORY_IDS) == 80 and COCO_80_CATEGORY_IDS[:12] == tuple(range(1, 12)) + (13,)
    assert all(COCO_91[c] == n for c, n in zip(COCO_80_CATEGORY_IDS, COCO_80))


def test_defaults():
    assert default_class_names(91) == list(COCO_91)
    assert default_class_names(81, background="last") == list(COCO_80)
    assert default_class_names(3) == ["class 0", "class 1", "class 2"]
    assert default_class_names(3, background="last") == ["class 0", "class 1"]


def test_user_names(tmp_path):
    f = tmp_path / "names.txt"
    f.write_text("circle\nsquare\n\ntriangle\n")
    assert load_class_names(str(f), num_classes=4) == ["__background__", "circle", "square", "triangle"]
    assert load_class_names("a, b", num_classes=3, background="last") == ["a", "b"]
    with pytest.raises(ValueError, match="2 class names given, but the checkpoint has 3 foreground classes"):
        load_class_names(["a", "b"], num_classes=4)


@pytest.mark.parametrize("form", [str, lambda p: p], ids=["str", "PathLike"])
def test_user_names_from_a_path(tmp_path, form):
    f = tmp_path / "names.txt"
    f.write_text("circle\nsquare\ntriangle\n")
    assert load_class_names(form(f), num_classes=4, background="last")[:2] == ["circle", "square"]
    with pytest.raises(FileNotFoundError):
        load_class_names(tmp_path / "absent.txt", num_classes=4)


@pytest.mark.parametrize(
    "names,num_classes,match",
    [
        (["__background__", "a", "b"], 3, r"3 class names given.*leave out the background's name"),
        (["a", "b", "c"], 3, r"3 class names given.*leave out the background's name"),
        ("bg,a,b,c", 4, r"4 class names given.*leave out the background's name"),
    ],
)
def test_a_name_for_the_background_gets_a_hint(names, num_classes, match):
    with pytest.raises(ValueError, match=match):
        load_class_names(names, num_classes=num_classes)


@pytest.mark.parametrize(
    "names,background,expected",
    [
        (list(COCO_91), "first", None),
        (list(COCO_80), "last", COCO_80_CATEGORY_IDS),
        (["__background__", *COCO_80], "first", (0, *COCO_80_CATEGORY_IDS)),
        (["BG", *[n.upper() for n in COCO_80]], "first", (0, *COCO_80_CATEGORY_IDS)),  # matterport's 'BG', any case
        ([n.replace(" ", "_") for n in COCO_80], "last", COCO_80_CATEGORY_IDS),
        (list(COCO_80[::-1]), "last", None),  # COCO's names in another order: a model of its own
        (list(COCO_80[:79]), "last", None),
        (list(COCO_80), "first", None),  # 80 entries with background first: 79 classes
        ([], "last", None),
        (["__background__"], "first", None),
    ],
    ids=["coco91", "coco80 last", "coco80 first", "matterport BG", "underscores", "reordered", "79", "shifted", "none",
         "background only"],
)
def test_coco_category_ids(names, background, expected):
    assert coco_category_ids(names, background=background) == expected
