import pytest

from swiftstep.core import imagenet


def test_names_are_the_1000_imagenet_classes_in_id_order():
    names = imagenet.IMAGENET_CLASSES
    assert len(names) == 1000 and len(set(names)) == 1000
    assert (names[0], names[1], names[207], names[281], names[999]) == (
        "tench", "goldfish", "golden retriever", "tabby", "toilet tissue")


@pytest.mark.parametrize("label, expected", [(207, 207), ("207", 207), ("golden retriever", 207),
                                             ("Golden_Retriever", 207), ("great-white shark", 2),
                                             ("crane bird", 134), ("crane", 517)])
def test_ids_and_names(label, expected):
    assert imagenet.class_id(label) == expected


def test_picker_round_trip():
    options = imagenet.picker_options()
    assert options[207] == "207 golden retriever"
    assert [imagenet.from_picker(o) for o in options] == list(range(1000))


def test_errors_name_what_was_expected():
    with pytest.raises(ValueError, match="class id -1 is out of range: expected 0 … 999"):
        imagenet.class_id(-1)
    with pytest.raises(ValueError, match="'tabby kat' is not an ImageNet class name. Did you mean 'tabby'"):
        imagenet.class_id("tabby kat")
