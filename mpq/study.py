"""The Optuna study behind the search: resumable, shareable, and the same however it is run.

- **Same trials after any interruption.** One TPE sampler seeded by the recipe drives the
  study; after each trial its random state is stored with the trial (a system attribute), and a
  resumed run restores the state of the last trial that finished (completed, or failed on its
  own: a NaN score is a result, neither retried nor forgotten). The sampler's proposals depend
  only on that state and the completed trials, so N trials in one run, or in several runs with
  kills between them, propose the same plans: the trial a kill cut short is proposed again.
- **No orphans.** A trial left RUNNING by a process that died (same host, pid gone) is marked
  failed on the next start (an enqueued plan, such as the solver's, is enqueued again); on
  shared storage, heartbeats (`HEARTBEAT_S`) let any worker fail a stale trial of another host
  and retry it (`RetryHeartbeatStaleTrialCallback`); another host's worker is judged by its
  heartbeat only, never by a pid looked up here. Workers sharing one storage URL each take new
  trial numbers under their own seeds, and stop once the study holds the trials asked for.
- **Readable from outside** (optuna-dashboard): the study's user attributes hold the model,
  budget, bit choices and the solver's plan and score; each trial holds its bits per layer
  (`bits.<layer>`) and size; the objective is named.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import fcntl
import os
import socket
import time
import warnings
from typing import Callable

from .errors import UsageError

__all__ = ["HEARTBEAT_S", "METRIC", "add_scored", "check_storage", "open_study", "run_trials"]

HEARTBEAT_S = 30
# A worker names itself in a trial (its `worker` attribute) within milliseconds of creating it;
# a RUNNING trial still unnamed after this long lost its process in between (the margin covers
# clocks of other hosts).
UNNAMED_S = 30
METRIC = "kl_to_fp32_on_holdout"


def _storage(url: str):
    # SQLite serialises writers: several workers on one file wait for the lock, not fail
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else None
    for attempt in range(8):
        try:
            return _open_rdb(url, engine)
        except Exception as exc:  # sqlalchemy and optuna raise many kinds for a bad URL
            if attempt < 7 and _creation_race(exc):
                time.sleep(0.2 + 0.3 * attempt)  # another worker is creating the schema
                continue
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise UsageError(f"cannot open the Optuna storage {url!r}: {type(exc).__name__}: "
                             f"{first}; give an RDB URL such as sqlite:///study.db or "
                             f"postgresql://user@host/db") from None


def _creation_race(exc: Exception) -> bool:
    """Workers starting together on a new storage race to create its tables: the losers see
    a duplicate alembic version or a table that already exists, and the next try opens it."""
    text = str(exc)
    return ("alembic_version" in text or "already exists" in text
            or "database is locked" in text)


def _open_rdb(url: str, engine):
    import optuna

    storages = optuna.storages
    with warnings.catch_warnings():  # heartbeats are "experimental" since optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):  # optuna >= 4.9
            retry = {"heartbeat_stale_trial_callback":
                     storages.RetryHeartbeatStaleTrialCallback(max_retry=2)}
        else:
            retry = {"failed_trial_callback": storages.RetryFailedTrialCallback(max_retry=2)}
        return storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                                   grace_period=4 * HEARTBEAT_S, **retry)


def check_storage(url: str) -> None:
    """Refuses, before any work, a storage URL that does not open."""
    _storage(url)


@contextlib.contextmanager
def _locked(url: str):
    """Holds a lock beside a SQLite file while a worker changes what others may change too.
    SQLite ignores SELECT ... FOR UPDATE, so two workers could both take one waiting trial (one
    then fails with "Cannot tell a COMPLETE trial") or both enqueue a new study's seeds; other
    RDBs lock the row themselves."""
    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else None
    if not path or path.startswith(":memory:"):
        yield
        return
    with open(f"{path}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_study(name: str, url: str, attrs: dict, seeds: list[dict] = ()):
    """The study `name` in `url` (created with `attrs` as user attributes and the parameter
    sets `seeds` enqueued if new), with trials of dead processes on this host taken back."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage(url)
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize",
                                load_if_exists=True)
    pop = study._pop_waiting_trial_id

    def pop_locked():
        with _locked(url):
            return pop()

    study._pop_waiting_trial_id = pop_locked
    with _locked(url):
        if not study.get_trials(deepcopy=False):
            for params in seeds:
                study.enqueue_trial(params)
    if not study.user_attrs:
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        with warnings.catch_warnings():  # "experimental" since optuna 3.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([METRIC])
    with _locked(url):
        _reclaim(study)
    return study


_TOKEN = os.urandom(8).hex()  # this process, even where a dead one had the same pid


def _alive(worker: dict) -> bool:
    """Whether a worker of this host still runs (by pid). Another host's pids mean nothing
    here: its workers are alive while their heartbeats are (see `_others_running`)."""
    if worker.get("token") == _TOKEN:
        return True
    pid = worker.get("pid", -1)
    if pid == os.getpid() or pid <= 0:  # our pid, but not our token: a process before us
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _reclaim(study) -> None:
    """Fails trials left RUNNING by dead processes of this host (others' by heartbeat); an
    enqueued plan among them is enqueued once more (a sampled one is proposed again anyway)."""
    import optuna

    state = optuna.trial.TrialState
    with warnings.catch_warnings():  # "experimental" since optuna 2.9, and what we need
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    host = socket.gethostname()
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of", t.system_attrs.get("failed_trial")) for t in trials}
    now = datetime.datetime.now()
    for t in trials:
        worker = t.user_attrs.get("worker")
        if worker is None:  # killed between creating the trial and naming itself in it
            if t.datetime_start is None or (now - t.datetime_start).total_seconds() < UNNAMED_S:
                continue
            worker = {"host": host, "pid": -1}
        if worker.get("host") != host or _alive(worker) or t.number in retried:
            continue
        if t.state == state.RUNNING:
            study.tell(t.number, state=state.FAIL)
        elif t.state != state.FAIL or _STATE in t.system_attrs:
            continue  # (a trial that failed on its own, a NaN score, is a result: not retried)
        if "fixed_params" in t.system_attrs:  # (not t.params: a kill may come before any)
            study.enqueue_trial(t.system_attrs["fixed_params"],
                                user_attrs={"retry_of": t.number})


_ADDED = "mpq:added"  # a trial scored outside the sampler (the local search's)


def add_scored(study, value: float, user_attrs: dict):
    """Adds a plan scored outside the sampler as a completed trial without parameters: it is
    read back like any trial, but the sampler does not learn from it and `run_trials` does not
    count it among the trials asked for."""
    import optuna

    study.add_trial(optuna.trial.create_trial(value=value, user_attrs=user_attrs,
                                              system_attrs={_ADDED: True}))
    # the newest such trial, which on shared storage need not be the study's last
    return next(t for t in reversed(study.get_trials(deepcopy=False))
                if _ADDED in t.system_attrs and t.user_attrs == user_attrs)


def _live(study) -> int:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING,
              optuna.trial.TrialState.PRUNED)
    return sum(_ADDED not in t.system_attrs
               for t in study.get_trials(deepcopy=False, states=states))


_STATE = "mpq:sampler_state"


def _rngs(sampler):
    return sampler._rng.rng, sampler._random_sampler._rng.rng  # TPE's own and its startup's


def _save_state(sampler) -> list:
    return [[name, base64.b64encode(keys.astype("<u4").tobytes()).decode(), pos, gauss, cached]
            for name, keys, pos, gauss, cached in (r.get_state() for r in _rngs(sampler))]


def _load_state(sampler, saved: list) -> None:
    import numpy as np

    for rng, (name, keys, pos, gauss, cached) in zip(_rngs(sampler), saved):
        rng.set_state((name, np.frombuffer(base64.b64decode(keys), dtype="<u4").copy(), pos,
                       gauss, cached))


def _others_running(study) -> bool:
    """Whether another worker runs a trial now: one of this host by its pid, one of another
    host by its heartbeat (stale trials are failed first, so a RUNNING one is fresh)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker") or {}
        if worker.get("token") == _TOKEN:
            continue
        if (worker.get("host") not in (None, host)) or _alive(worker):
            return True
    return False


def _own_sampler(seed: int):
    """A worker's sampler beside other live workers: a seed of its own, or all would propose
    the same plans."""
    import optuna

    return optuna.samplers.TPESampler(seed=seed * 1_000_003 + int(_TOKEN, 16) % 1_000_003,
                                      n_startup_trials=5)


def _sampler(study, seed: int):
    """The study's TPE sampler, seeded by `seed` and moved on to where the last completed trial
    left it."""
    import optuna

    if _others_running(study):
        return _own_sampler(seed)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)
    # a trial that failed on its own (a NaN score) moved the sampler on as a completed one did
    saved = [t for t in study.get_trials(deepcopy=False, states=(
                 optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL))
             if _STATE in t.system_attrs]
    if saved:
        _load_state(sampler, max(saved, key=lambda t: t.number).system_attrs[_STATE])
    return sampler


def run_trials(study, objective: Callable, *, trials: int, seed: int,
               timeout: float | None = None, on_trial: Callable | None = None,
               progress: bool = True) -> None:
    """Runs trials until the study holds `trials` that did not fail (or `timeout` seconds
    pass), proposing as one uninterrupted run under `seed` would."""
    import optuna
    from tqdm import tqdm

    start = time.time()
    study.sampler = _sampler(study, seed)
    bar = tqdm(total=trials, initial=min(trials, _live(study)), desc="search", unit="trial",
               disable=not progress)

    def worker_objective(trial):
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid(),
                                       "token": _TOKEN})
        value = objective(trial)
        # stored before the trial completes, so a completed trial always has it
        study._storage.set_trial_system_attr(trial._trial_id, _STATE,
                                             _save_state(study.sampler))
        return value

    def finished(study, trial):
        if on_trial is not None and trial.state == optuna.trial.TrialState.COMPLETE:
            on_trial(trial)

    shared = False
    try:
        while _live(study) < trials:
            if timeout is not None and time.time() - start >= timeout:
                break
            if not shared and _others_running(study):
                study.sampler, shared = _own_sampler(seed), True
            study.optimize(worker_objective, n_trials=1, catch=(), callbacks=[finished])
            bar.n = min(trials, _live(study))
            bar.refresh()
    finally:
        bar.close()
