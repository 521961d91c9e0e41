"""A search resumes to the same trials and plan whatever stopped it: SIGKILL at each stage of
the study, failed trials on the way, and workers of other hosts judged by heartbeat only."""

import datetime
import json
import socket

import pytest
import yaml

from conftest import TINY_RECIPE, run_script

# Runs search.py after arranging for the process to SIGKILL itself at one point (argv[1], the
# argv[2]-th time it is reached); a trial whose plan falls under NAN_RULE scores NaN, so every
# run also has trials that fail on their own. The rule reads the plan, not the trial number,
# which a kill shifts.
HARNESS = """
import os, runpy, signal, sys
import mpq.search as search
from mpq.quant.plan import Plan

point, nth = sys.argv[1], int(sys.argv[2])
sys.argv = ["search.py", *sys.argv[3:]]
reached = [0]

def at(here):
    if here == point:
        reached[0] += 1
        if reached[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)

def nan_rule(bits, solver_bits):
    return bits != solver_bits and sum(b * (i + 1) for i, (_, b) in
                                       enumerate(sorted(bits.items()))) % 3 == 0

real_run, real_add, real_save = search.run_trials, search.add_scored, Plan.save

def run_trials(study, objective, *, on_trial=None, **kw):
    at("before_first_trial")
    def scored(trial):
        at("mid_trial")
        before = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
        if before and before[-1].state.name == "FAIL":
            at("after_failure")  # the trial after a NaN: the sampler must resume from the NaN's
        value = objective(trial)
        nan = nan_rule(trial.user_attrs["bits"], study.user_attrs["solver_bits"])
        return float("nan") if nan else value
    def finished(trial):
        if on_trial is not None:
            on_trial(trial)
        at("between_trials")
    return real_run(study, scored, on_trial=finished, **kw)

def add_scored(*args, **kw):
    trial = real_add(*args, **kw)
    at("local_search")
    return trial

def save(self, path):
    at("after_last_trial")
    return real_save(self, path)

search.run_trials, search.add_scored, Plan.save = run_trials, add_scored, save
runpy.run_path("search.py", run_name="__main__")
"""

KILL_POINTS = [("before_first_trial", 1), ("mid_trial", 4), ("after_failure", 1),
               ("between_trials", 6), ("local_search", 2), ("after_last_trial", 1)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_teacher):
    """One uninterrupted search under the harness: its trials and plan."""
    root = tmp_path_factory.mktemp("resume")
    recipe = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    recipe.pop("train")
    recipe["search"] = {"checkpoint": str(tiny_teacher), "trials": 10, "polish_evaluations": 12,
                        "holdout_images": 64, "batch_size": 32, "sensitivity_batches": 1,
                        "calibration_batches": 1, "bit_choices": [2, 3, 4, 6, 8]}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    def search(out, point="none", nth=0):
        return run_script("-c", HARNESS, point, nth, "--recipe", root / "recipe.yaml",
                          "--budget", "8x", "--out", root / out, "--device", "cpu", "--quiet",
                          env={"MPQ_CACHE": str(root / "cache")}, timeout=600)

    done = search("straight")
    assert done.returncode == 0, done.stderr[-3000:]
    return root, search, _trials(root / "straight")


def _trials(out):
    """(state, bits, score) of every trial that finished: completed ones and those that
    failed on their own (NaN), in order; a trial a kill cut short is not one of them."""
    import optuna

    from mpq.study import _STATE

    storage = f"sqlite:///{out / 'study.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    state = optuna.trial.TrialState
    assert not [t for t in study.trials if t.state == state.RUNNING]
    return {"trials": [(t.state.name, t.user_attrs["bits"], t.value) for t in study.trials
                       if t.state == state.COMPLETE or
                       (t.state == state.FAIL and _STATE in t.system_attrs)],
            "plan": json.loads((out / "plan.json").read_text())}


def test_the_reference_search_has_failed_and_local_search_trials(reference):
    _, _, straight = reference
    states = [s for s, _, _ in straight["trials"]]
    assert "FAIL" in states and states[0] == "COMPLETE"  # the solver's plan scores
    assert len(states) - states.count("FAIL") > 10  # 10 sampled, then the local search's


@pytest.mark.slow
@pytest.mark.parametrize("point, nth", KILL_POINTS)
def test_a_search_killed_anywhere_resumes_to_the_same_trials_and_plan(reference, point, nth):
    root, search, straight = reference
    out = f"killed_{point}"
    killed = search(out, point, nth)
    assert killed.returncode == -9, (f"the run was not killed at {point}:\n"
                                     f"{killed.stderr[-3000:]}")
    assert not (root / out / "plan.json").exists()
    resumed = search(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _trials(root / out) == straight


def _tiny_study(url):
    from mpq.study import open_study

    return open_study("s", url, {"model": "m"})


def _objective(trial):
    x = [trial.suggest_categorical(f"p{i}", [-1, 0, 1]) for i in range(4)]
    trial.set_user_attr("bits", x)
    score = float(sum((v - 0.3 * i) ** 2 for i, v in enumerate(x)))
    return float("nan") if sum(x) % 3 == 0 else score


def _finished(study):
    import optuna

    from mpq.study import _STATE

    return [(t.state.name, t.params) for t in study.trials
            if t.state == optuna.trial.TrialState.COMPLETE or
            (t.state == optuna.trial.TrialState.FAIL and _STATE in t.system_attrs)]


class _Stop(Exception):
    pass


def test_a_failed_trial_leaves_the_sampler_where_one_run_would(tmp_path):
    """A NaN trial moves the sampler on in the live process; a run resumed right after it
    must start from there too, not from the last completed trial."""
    from mpq.study import run_trials

    straight = _tiny_study(f"sqlite:///{tmp_path / 'a.db'}")
    run_trials(straight, _objective, trials=9, seed=3, progress=False)
    reference = _finished(straight)
    assert "FAIL" in [s for s, _ in reference[:-1]]
    url = f"sqlite:///{tmp_path / 'b.db'}"
    first = _tiny_study(url)

    def stop_after_a_failure(trial):
        before = [t for t in first.trials if t.number < trial.number]
        if before and before[-1].state.name == "FAIL":
            raise _Stop  # as a kill would, before this trial samples anything
        return _objective(trial)

    with pytest.raises(_Stop):
        run_trials(first, stop_after_a_failure, trials=9, seed=3, progress=False)
    resumed = _tiny_study(url)
    run_trials(resumed, _objective, trials=9, seed=3, progress=False)
    assert _finished(resumed) == reference


def _running_trial(study, worker):
    import optuna

    trial_id = study._storage.create_new_trial(study._study_id, template_trial=None)
    study._storage.set_trial_user_attr(trial_id, "worker", worker)
    return trial_id, optuna


def test_a_worker_of_another_host_is_judged_by_its_heartbeat_not_a_local_pid(tmp_path):
    import sqlite3

    from mpq.study import HEARTBEAT_S, _others_running

    db = tmp_path / "study.db"
    study = _tiny_study(f"sqlite:///{db}")
    # a pid that exists nowhere here, on another host: alive while its heartbeat is fresh
    trial_id, optuna = _running_trial(study, {"host": socket.gethostname() + "-other",
                                              "pid": 2 ** 22 + 7, "token": "x"})
    study._storage.record_heartbeat(trial_id)
    assert _others_running(study)
    # the same worker, its heartbeat stale: failed, not running
    stale = datetime.datetime.now() - datetime.timedelta(seconds=10 * HEARTBEAT_S)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE trial_heartbeats SET heartbeat = ? WHERE trial_id = ?",
                     (stale.isoformat(sep=" "), trial_id))
    assert not _others_running(study)
    assert study._storage.get_trial(trial_id).state == optuna.trial.TrialState.FAIL
    # another host's worker whose pid happens to be alive here (ours) is not alive for that
    other = _running_trial(study, {"host": socket.gethostname() + "-other", "pid": 1,
                                   "token": "y"})[0]
    study._storage.record_heartbeat(other)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE trial_heartbeats SET heartbeat = ? WHERE trial_id = ?",
                     (stale.isoformat(sep=" "), other))
    assert not _others_running(study)


def test_an_enqueued_trial_killed_before_it_suggested_anything_is_retried_with_its_plan(
        tmp_path):
    """The retry takes the enqueued parameters, not the trial's own (none yet), which would
    leave the solver's seed to the sampler."""
    from mpq.study import open_study

    url = f"sqlite:///{tmp_path / 'study.db'}"
    seed = {"p0": 1, "p1": -1}
    study = open_study("s", url, {"model": "m"}, seeds=[seed])
    popped = study._pop_waiting_trial_id()  # as a worker takes it, then dies before suggesting
    study._storage.set_trial_user_attr(popped, "worker", {"host": socket.gethostname(),
                                                          "pid": -1})
    resumed = open_study("s", url, {"model": "m"}, seeds=[seed])
    waiting = [t for t in resumed.trials if t.state.name == "WAITING"]
    assert [t.system_attrs["fixed_params"] for t in waiting] == [seed]
