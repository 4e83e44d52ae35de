"""training/schedules.py: DeepSeek-V3's MTP-weight and balancing-speed schedules."""

import pytest

from moe_mtp.training import StepSchedule


def test_step_schedule():
    schedule = StepSchedule.parse("0.3,0.1@0.7")
    assert [schedule(step, 10) for step in (0, 6, 7, 9)] == [0.3, 0.3, 0.1, 0.1]
    assert StepSchedule.parse(1e-3)(5, 10) == 1e-3
    assert StepSchedule.parse("1e-3,0@0.97")(97, 100) == 0.0
    with pytest.raises(ValueError, match="mtp_loss_weight: cannot read 'x'"):
        StepSchedule.parse("x", "mtp_loss_weight")
    with pytest.raises(ValueError, match="from the start"):
        StepSchedule.parse("0.1@0.5")
