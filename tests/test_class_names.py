"""COCO class-name layouts and user-given names."""

import pytest

from engine.class_names import COCO_80, COCO_80_CATEGORY_IDS, COCO_91, default_class_names, load_class_names


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
