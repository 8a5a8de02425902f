import numpy as np
import pytest

from fedxr import labels as L


def test_canonical_order_and_count():
    assert L.NUM_LABELS == 14
    assert L.LABELS[0] == "Atelectasis"
    assert L.LABELS[-1] == "Hernia"
    assert L.NO_FINDING not in L.LABELS


def test_encode_decode_round_trip():
    vec = L.encode_findings("Effusion|Cardiomegaly")
    assert vec.dtype == np.uint8
    assert vec.sum() == 2
    assert vec[L.LABEL_INDEX["Effusion"]] == 1
    assert vec[L.LABEL_INDEX["Cardiomegaly"]] == 1
    assert L.decode_findings(vec) == "Cardiomegaly|Effusion"
    assert L.encode_findings("No Finding").sum() == 0
    assert L.decode_findings(np.zeros(14)) == "No Finding"


def test_alias_and_unknown():
    assert L.canonical_label("Infiltrate") == "Infiltration"
    with pytest.raises(L.UnknownLabelError, match="'Pneumonitis'"):
        L.encode_findings("Effusion|Pneumonitis")
    with pytest.raises(L.UnknownLabelError):
        L.encode_findings("No Finding|Effusion")
    with pytest.raises(L.UnknownLabelError):
        L.encode_findings("")


def test_metric_names_are_shared():
    assert L.KEY_METRIC == L.VAL_AUROC == "val_auroc"
    assert L.per_class_metric(L.VAL_AUROC, "Infiltrate") == "val_auroc/Infiltration"
