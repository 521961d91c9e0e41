"""benchmarks/paired.py: McNemar's exact test and the paired figures of two rows' models."""

import sys

import torch

from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "benchmarks"))
from paired import compare, mcnemar_p  # noqa: E402


def test_mcnemar_exact_p_values():
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(7, 7) == 1.0
    assert mcnemar_p(0, 5) == mcnemar_p(5, 0) == 2 / 32  # the two all-one-way splits of 5
    assert abs(mcnemar_p(1, 9) - 2 * 11 / 1024) < 1e-12  # C(10,0) + C(10,1)
    # 184 against 210 of 394 discordant images (the 13x plan's 10- and 60-epoch runs): no
    # evidence; 180 against 226 is some.
    assert 0.2 < mcnemar_p(184, 210) < 0.25 and mcnemar_p(180, 226) < 0.03


def test_compare_counts_the_images_only_one_model_gets_right():
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    a = torch.tensor([0, 1, 2, 3, 9, 9, 9, 7])  # right on 0-3 and 7
    b = torch.tensor([0, 1, 9, 9, 4, 5, 6, 8])  # right on 0, 1, 4-6
    r = compare(a, b, labels)
    assert (r["only_a"], r["only_b"]) == (3, 3)
    assert (r["top1_a"], r["top1_b"]) == (62.5, 62.5)
    assert r["disagree"] == 75.0 and r["p"] == 1.0
    assert abs(r["sd_points"] - 100 * 6 ** 0.5 / 8) < 1e-9


def test_a_row_without_committed_artifacts_is_refused_before_any_work(tmp_path):
    result = run_script("benchmarks/paired.py", "mpq_13x", "no_such_row",
                        "--data-root", tmp_path / "nowhere")
    assert result.returncode == 2
    assert "no_such_row/model.mpq does not exist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
