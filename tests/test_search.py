import json

import pytest

from conftest import run_script


@pytest.fixture
def search_args(tmp_path, tiny_teacher, tiny_recipe_dict, write_recipe):
    tiny_recipe_dict.pop("train")
    tiny_recipe_dict["search"] = {"checkpoint": str(tiny_teacher), "trials": 5,
                                  "holdout_images": 64, "batch_size": 32,
                                  "sensitivity_batches": 1, "calibration_batches": 1,
                                  "bit_choices": [2, 3, 4, 6, 8]}
    recipe = write_recipe(tiny_recipe_dict)

    def make(budget, out="s", *extra):
        return ["search.py", "--recipe", recipe, "--budget", budget, "--out", tmp_path / out,
                "--device", "cpu", "--quiet", *extra]
    return make


def _plan(tmp_path, out):
    return json.loads((tmp_path / out / "plan.json").read_text())


def test_search_keeps_the_budget_beats_uniform_and_reproduces(search_args, tmp_path):
    first = run_script(*search_args("8x", "a"))
    assert first.returncode == 0, first.stderr
    plan = _plan(tmp_path, "a")
    assert plan["size_bytes"] <= plan["budget_bytes"]
    assert plan["score"] <= plan["solver_score"]  # the solver's plan is trial 0
    summary = json.loads((tmp_path / "a" / "search.json").read_text())
    trials = summary["trials"]
    assert len(summary["uniform"]) == 5 and all(
        u["within_budget"] == (u["size_bytes"] <= plan["budget_bytes"])
        for u in summary["uniform"].values())
    assert len(trials) == 5 and all(t["size_bytes"] <= plan["budget_bytes"] for t in trials)
    sens = json.loads((tmp_path / "a" / "sensitivity.json").read_text())["layers"]
    assert sens["conv1"]["estimator"] == "exact" and sens["conv1"]["trace"] > 0
    assert list((tmp_path / "a" / "tb").glob("events.*"))
    again = run_script(*search_args("8x", "b"))
    assert again.returncode == 0, again.stderr
    assert _plan(tmp_path, "b")["layers"] == plan["layers"]  # seeded: the same plan twice


def test_budget_at_or_above_fp32_gives_8_bits(search_args, tmp_path):
    result = run_script(*search_args("1x", "full"))
    assert result.returncode == 0, result.stderr
    assert "note:" in result.stdout
    assert {v["w_bits"] for v in _plan(tmp_path, "full")["layers"].values()} == {8}


@pytest.mark.parametrize("budget, extra, fragment", [
    ("1KB", [], "below the smallest possible model.mpq"),
    ("lots", [], "is not understood"),
    ("8x", ["--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot open the Optuna"),
])
def test_bad_search_input(search_args, budget, extra, fragment):
    result = run_script(*search_args(budget, "bad", *extra))
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.stderr


def test_too_small_budget_is_refused_before_any_work_and_names_the_floor(search_args, tmp_path):
    import re

    refused = run_script(*search_args("40x", "floor"))
    assert refused.returncode == 2 and not (tmp_path / "floor").exists(), refused.stderr
    floor = re.search(r"--budget (\d+)B\)", refused.stderr)
    assert floor and "bytes of weights plus" in refused.stderr, refused.stderr
    ok = run_script(*search_args(f"{floor.group(1)}B", "floor"))  # the floor it names fits
    assert ok.returncode == 0, ok.stderr
    plan = _plan(tmp_path, "floor")
    assert plan["size_bytes"] == int(floor.group(1))
    assert {v["w_bits"] for v in plan["layers"].values()} == {2}
    below = run_script(*search_args(f"{int(floor.group(1)) - 1}B", "floor2"))
    assert below.returncode == 2 and not (tmp_path / "floor2").exists()


def test_interrupted_study_resumes_and_another_budget_starts_its_own(search_args, tmp_path):
    import optuna

    assert run_script(*search_args("8x", "r", "--trials", "3")).returncode == 0
    assert run_script(*search_args("8x", "r", "--trials", "5")).returncode == 0
    assert run_script(*search_args("6x", "r", "--trials", "2")).returncode == 0
    storage = f"sqlite:///{tmp_path / 'r' / 'study.db'}"
    done = optuna.trial.TrialState.COMPLETE
    completed = sorted(
        sum(t.state == done for t in optuna.load_study(study_name=s.study_name,
                                                       storage=storage).trials)
        for s in optuna.get_all_study_summaries(storage))
    assert completed == [2, 5]  # 3 then 2 more at 8x; its own 2 at 6x
