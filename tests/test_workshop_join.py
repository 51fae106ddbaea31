"""``hfl-lab join``'s refusals before it contacts anyone (the whole join, leave and late join
of a classroom: tests/test_cross_silo_classroom.py; a tampered link:
tests/test_trust_enrollment.py)."""

from __future__ import annotations

from hfl_lab.cli import main


def test_join_refuses_a_malformed_link_with_exit_code_2(capsys) -> None:
    code = main(["join", "hfl-join:eyJ2IjoxLCJ0cnVzdCI6"])

    assert code == 2
    assert "fresh link" in capsys.readouterr().err


def test_join_refuses_a_step_count_below_one(capsys) -> None:
    code = main(["join", "hfl-join:x", "--leave-after", "0"])

    assert code == 2
    assert "--leave-after must be at least 1" in capsys.readouterr().err
