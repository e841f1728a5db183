import pytest
import torch

from semiseg.evaluation import (
    confusion_matrix,
    format_scores,
    scores_from_confusion,
    sliding_window_logits,
    window_starts,
)


def test_confusion_matrix_and_miou_match_hand_computation():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    cm = confusion_matrix(pred, target, num_classes=3)
    # rows: ground truth, columns: prediction; the 255 pixel is skipped.
    expected = torch.tensor([[1, 1, 0], [0, 2, 1], [1, 0, 1]])
    assert torch.equal(cm, expected)
    scores = scores_from_confusion(cm, tail_classes=[2])
    # IoU_c = TP / (row + col - TP): class 0: 1/(2+2-1), class 1: 2/(3+3-2), class 2: 1/(2+2-1)
    iou = [1 / 3, 2 / 4, 1 / 3]
    assert scores.iou == pytest.approx(iou)
    assert scores.miou == pytest.approx(sum(iou) / 3)
    assert scores.tail_miou == pytest.approx(1 / 3)
    assert scores.pixel_accuracy == pytest.approx(4 / 7)


def test_accumulation_over_images_is_not_a_mean_of_per_image_ious():
    a_t, a_p = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 0, 0])
    b_t, b_p = torch.tensor([1, 1, 1, 1]), torch.tensor([1, 1, 1, 1])
    cm = confusion_matrix(a_p, a_t, 2) + confusion_matrix(b_p, b_t, 2)
    scores = scores_from_confusion(cm)
    assert scores.iou == pytest.approx([3 / 4, 4 / 5])


def test_absent_class_is_left_out_of_the_mean():
    cm = confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1]), 3)
    scores = scores_from_confusion(cm)
    assert scores.iou[2] is None
    assert scores.miou == pytest.approx(1.0)
    assert "n/a" in format_scores(scores, ["a", "b", "c"])


def test_labels_out_of_range_are_rejected():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0]), torch.tensor([5]), 3)


def test_window_starts_cover_the_length():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(3, 4, 3) == [0]


def test_sliding_window_equals_full_prediction_for_a_pointwise_model():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 1)
    image = torch.randn(2, 3, 37, 50)
    with torch.no_grad():
        full = conv(image)
        slid = sliding_window_logits(conv, image, 4, window=16, stride=10)
    assert slid.shape == full.shape
    assert torch.allclose(slid, full, atol=1e-5)


def test_sliding_window_pads_small_images():
    conv = torch.nn.Conv2d(3, 2, 1)
    image = torch.randn(1, 3, 5, 7)
    with torch.no_grad():
        out = sliding_window_logits(conv, image, 2, window=16)
        assert torch.allclose(out, conv(image), atol=1e-5)
