import json

import pytest

from conftest import run_script


@pytest.fixture
def search_args(tmp_path, tiny_teacher, tiny_recipe_dict, write_recipe):
    tiny_recipe_dict.pop("train")
    tiny_recipe_dict["search"] = {"checkpoint": str(tiny_teacher), "trials": 5,
                                  "polish_evaluations": 12,
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
    assert "Warning" not in first.stderr, first.stderr  # nothing but progress on stderr
    plan = _plan(tmp_path, "a")
    assert plan["size_bytes"] <= plan["budget_bytes"]
    assert plan["score"] <= plan["solver_score"]  # the solver's plan is trial 0
    summary = json.loads((tmp_path / "a" / "search.json").read_text())
    trials = summary["trials"]
    assert len(summary["uniform"]) == 5 and all(
        u["within_budget"] == (u["size_bytes"] <= plan["budget_bytes"])
        for u in summary["uniform"].values())
    assert all(t["size_bytes"] <= plan["budget_bytes"] for t in trials)
    stages = [t["stage"] for t in trials]
    assert stages[:5] == ["sampled"] * 5 and 0 < len(stages[5:]) <= 12 and \
        set(stages[5:]) == {"polish"}
    assert plan["score"] == min(t["score"] for t in trials)
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
    plan = _plan(tmp_path, "full")
    assert {v["w_bits"] for v in plan["layers"].values()} == {8}
    assert plan["budgets"] == {"bytes": {"budget": plan["budget_bytes"],
                                         "value": plan["size_bytes"], "met": True}}


@pytest.mark.parametrize("budget, extra, fragment", [
    ("1KB", [], "below the smallest possible model.mpq"),
    ("lots", [], "is not understood"),
    ("8x", ["--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot open the Optuna"),
    ("8x", ["--set", "search.repair=greedy"], "search.repair must be one of perturbation, undo"),
    ("8x", ["--set", "search.polish_evaluations=-1"], "search.polish_evaluations must be >= 0"),
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
        sum(t.state == done and "stage" not in t.user_attrs  # the local search's come too
            for t in optuna.load_study(study_name=s.study_name, storage=storage).trials)
        for s in optuna.get_all_study_summaries(storage))
    assert completed == [2, 5]  # 3 then 2 more at 8x; its own 2 at 6x


def _study(storage):
    import optuna

    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def _completed(study):
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return [(t.user_attrs["bits"], t.value) for t in done]


def _progress_read_only(db) -> tuple[int, int]:
    """(completed trials, running trials a worker has named itself in) in `db`, read without
    creating or migrating its tables."""
    import sqlite3

    if not db.is_file():
        return 0, 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            done = conn.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'"
                                ).fetchone()[0]
            named = conn.execute(
                "SELECT COUNT(*) FROM trials JOIN trial_user_attributes USING (trial_id) "
                "WHERE state = 'RUNNING' AND key = 'worker'").fetchone()[0]
            return done, named
    except sqlite3.Error:  # the tables not created yet, or the database busy
        return 0, 0


def test_workers_starting_together_on_a_new_storage_all_open_it(tmp_path):
    """Several workers given one new storage URL race to create its tables; none may fail."""
    import subprocess
    import sys
    import time

    from conftest import ROOT

    code = ("import sys, time, optuna; from mpq.study import check_storage\n"
            "start = float(sys.argv[2])\n"
            "while time.time() < start: time.sleep(0.001)\n"
            "check_storage(sys.argv[1])")
    for round_ in range(2):
        url = f"sqlite:///{tmp_path / f'new{round_}.db'}"
        start = time.time() + 6  # after every worker has imported optuna
        procs = [subprocess.Popen([sys.executable, "-c", code, url, str(start)], cwd=ROOT,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err


def test_a_search_killed_mid_study_resumes_to_the_same_trials_and_plan(search_args, tmp_path,
                                                                      tiny_recipe_dict):
    import os
    import signal
    import subprocess
    import sys
    import time

    import optuna

    from conftest import ROOT

    args = [*search_args("8x", "straight"), "--trials", "10", "--set",
            "search.holdout_images=192"]
    straight = run_script(*args)
    assert straight.returncode == 0, straight.stderr
    summary = json.loads((tmp_path / "straight" / "search.json").read_text())
    assert summary["study"]["name"].startswith("mpq-resnet20-") and \
        summary["study"]["name"] in straight.stdout
    storage = f"sqlite:///{tmp_path / 'straight' / 'study.db'}"
    reference = _study(storage)
    attrs = reference.user_attrs
    assert attrs["model"] == "resnet20" and attrs["budget_bytes"] == _plan(
        tmp_path, "straight")["budget_bytes"] and "solver_score" in attrs
    assert reference.metric_names == ["kl_to_fp32_on_holdout"]
    first = reference.trials[0]
    assert first.user_attrs["bits.conv1"] == first.user_attrs["bits"]["conv1"]

    killed = [str(a) for a in search_args("8x", "killed")] + ["--trials", "10", "--set",
                                                                "search.holdout_images=192"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, *killed], cwd=ROOT, env=env, stdout=log,
                            stderr=log)
    db = tmp_path / "killed" / "study.db"
    kill_storage = f"sqlite:///{db}"
    deadline = time.time() + 240
    done = 0
    while time.time() < deadline and proc.poll() is None:
        done, named = _progress_read_only(db)
        if done >= 4 and named:  # mid-trial (a kill before a trial is named: next test)
            break
        time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    assert 4 <= done < 10, (tmp_path / "killed.log").read_text()[-3000:]
    resumed = run_script(*killed)
    assert resumed.returncode == 0, resumed.stderr
    study = _study(kill_storage)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert _completed(study) == _completed(reference)
    assert _plan(tmp_path, "killed") == _plan(tmp_path, "straight")


def test_workers_on_one_sqlite_file_never_take_the_same_waiting_trial(tmp_path):
    """SQLite ignores FOR UPDATE: without a lock, four workers popping 40 enqueued trials took
    49-56 between them (duplicates every round, run by two workers, the second failing with
    "Cannot tell a COMPLETE trial")."""
    import json
    import subprocess
    import sys
    import time

    from conftest import ROOT
    from mpq.study import open_study

    code = ("import json, sys, time; from mpq.study import open_study\n"
            "study = open_study('s', sys.argv[1], {'model': 'm'})\n"
            "while time.time() < float(sys.argv[2]): time.sleep(0.001)\n"
            "got = []\n"
            "while (t := study._pop_waiting_trial_id()) is not None: got.append(t)\n"
            "print(json.dumps(got))")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    open_study("s", url, {"model": "m"}, seeds=[{}] * 40)
    assert len(open_study("s", url, {"model": "m"}, seeds=[{}] * 40).trials) == 40  # once
    start = time.time() + 6  # after every worker has imported optuna
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(start)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    taken = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        taken += json.loads(out)
    assert sorted(taken) == sorted(set(taken)) and len(taken) == 40


def test_a_trial_whose_process_died_before_naming_itself_is_taken_back(tmp_path):
    import datetime

    import optuna

    from mpq.study import UNNAMED_S, open_study

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = open_study("s", url, {"model": "m"})
    started = datetime.datetime.now() - datetime.timedelta(seconds=UNNAMED_S + 5)
    for start in (started, datetime.datetime.now()):  # an orphan, and one just created
        study._storage.create_new_trial(study._study_id, template_trial=optuna.trial.FrozenTrial(
            number=-1, state=optuna.trial.TrialState.RUNNING, value=None, datetime_start=start,
            datetime_complete=None, params={}, distributions={}, user_attrs={},
            system_attrs={}, intermediate_values={}, trial_id=-1))
    states = [t.state for t in open_study("s", url, {"model": "m"}).trials]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING]


def test_two_workers_on_one_storage_share_the_trials(search_args, tmp_path):
    import subprocess
    import sys
    import os

    import optuna

    from conftest import ROOT

    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, *map(str, search_args("8x", f"w{i}")),
                               "--trials", "8", "--storage", storage], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    study = _study(storage)
    numbers = [t.number for t in study.trials]
    assert len(set(numbers)) == len(numbers)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
                and t.user_attrs.get("stage") != "polish"]
    assert 8 <= len(complete) <= 9  # two workers may each start the 8th
    workers = {t.user_attrs["worker"]["pid"] for t in complete}
    assert len(workers) == 2  # both did some of the work
