"""Tests of tools/nms_table.py: the choice rule by hand, then the table on a tiny trained run
against what eval.py reports at the run's own NMS IoU."""

import pytest

from tests.runs import tiny_run_config
from tools import nms_table


def _row(iou, validation_map50, test_map50=0.0):
    return dict(
        iou=iou,
        validation_map50=validation_map50,
        validation_map=validation_map50 / 2,
        test_map50=test_map50,
        test_map=test_map50 / 2,
    )


def test_choose_takes_the_best_validation_map_and_breaks_ties_upwards():
    rows = [_row(0.3, 0.61, 0.9), _row(0.4, 0.63, 0.1), _row(0.5, 0.62), _row(0.6, 0.55)]
    assert nms_table.choose(rows)["iou"] == 0.4  # validation decides, not test
    rows.append(_row(0.7, 0.63))
    assert nms_table.choose(rows)["iou"] == 0.7  # tie at 0.63: the higher threshold
    text = nms_table.markdown(1200, rows)
    assert "chosen on validation: **0.7**" in text
    assert "| 0.7 (chosen) | 0.630 | 0.315 | 0.000 | 0.000 |" in text
    assert "| 0.3 | 0.610 | 0.305 | 0.900 | 0.450 |" in text
    assert text.count("(chosen)") == 1
    undefined = [_row(0.5, float("nan")), _row(0.6, float("nan"))]
    assert nms_table.choose(undefined) is None
    assert "validation holds no ground-truth box: no choice." in nms_table.markdown(5, undefined)
    assert nms_table.choose([*undefined, _row(0.3, 0.2)])["iou"] == 0.3


@pytest.mark.slow  # trains a run
def test_nms_table_matches_evaluation_at_the_runs_own_threshold(tiny_eval_root, tmp_path):
    from m2u_jax import evaluate, trainer

    config = tiny_run_config(tiny_eval_root)
    config.eval.num_mc_samples = 1
    workdir = str(tmp_path / "nms")
    trainer.train(config, workdir)
    evaluated = evaluate.evaluate(config, workdir, with_speed=False)["detection"]
    own = float(config.model.det_iou_threshold)
    step, rows = nms_table.nms_rows(config, workdir, None, (0.05, own))
    assert step == 2 and [row["iou"] for row in rows] == [0.05, own]
    assert rows[1]["test_map50"] == pytest.approx(evaluated["map50"], abs=1e-9)
    assert rows[1]["test_map"] == pytest.approx(evaluated["map"], abs=1e-9)
    for row in rows:
        for key in ("validation_map50", "validation_map", "test_map50", "test_map"):
            assert 0.0 <= row[key] <= 1.0
    # An IoU of 0.05 suppresses nearly every overlapping box of the untrained detector, so
    # the boxes (and the mAP) differ from the run's own threshold's.
    assert rows[0]["test_map50"] != pytest.approx(rows[1]["test_map50"], abs=1e-9)


def test_parse_ious_accepts_only_numbers_in_the_unit_interval():
    assert nms_table.parse_ious(["0.3", "0.5", "1"]) == [0.3, 0.5, 1.0]
    for bad in (["0.5", "x"], ["0"], ["1.5"], []):
        assert nms_table.parse_ious(bad) is None
