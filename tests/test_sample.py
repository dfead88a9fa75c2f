"""`publish-sample` data: no built-in difference between the arms unless asked for (--sn-effect)."""

import pytest

from producer.emitter import producer_info
from producer.sample import synthetic_study


def _stops(sn_effect: float) -> list:
    study = synthetic_study(30, 4, seed=3, producer=producer_info("w"), model_run_id="s", sn_effect=sn_effect)
    return [trial[-1] for trial in study]


def test_the_default_builds_no_effect_and_sn_effect_changes_only_the_sn_arm():
    plain, boosted = _stops(0.0), _stops(1.0)
    assert {s.payload.spectral_norm for s in plain} == {True, False}
    for a, b in zip(plain, boosted, strict=True):
        assert (a.payload.status, a.payload.spectral_norm) == (b.payload.status, b.payload.spectral_norm)
        ratio = b.payload.measurements["duration_ms"] / a.payload.measurements["duration_ms"]
        if a.payload.spectral_norm:
            assert ratio == pytest.approx(1.08)
            assert b.payload.measurements["final_val_accuracy"] > a.payload.measurements["final_val_accuracy"]
        else:
            assert ratio == 1.0 and a.payload.measurements == b.payload.measurements


def test_the_command_line_refuses_an_effect_out_of_range(capsys):
    from sntrack.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["publish-sample", "--sn-effect", "3"])
    assert exit_.value.code == 2
    assert "--sn-effect: must be between -1 and 2, got 3" in capsys.readouterr().err
