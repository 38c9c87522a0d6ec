"""Nothing lost on the Ray executor: every Ray failure ends a run in one line with
the tasks still in flight cancelled and every stored batch kept; tasks go to the actors that are
free; and nothing Ray says reaches an ``rsx ... --json`` stdout.

The Ray tests share one local Ray (``ray_address``, from ``test_ray_executor``) and fail a run
by real means: an actor killed for good, or a lost object reported by a ``ray.get`` patched in
this process. Starting Ray and its actors takes seconds on two cores, hence the slow marks.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from hostile_files import rsx_process
from test_ray_executor import (  # noqa: F401 - ray_address: the module's Ray, a fixture
    CAPTIONS,
    _assert_whole,
    _generators,
    _resynthesis_rows,
    ray,
    ray_address,
)

from resynth_index.distributed import executor, session
from resynth_index.distributed.executor import RayResynthesizer
from resynth_index.distributed.session import RayOptions
from resynth_index.errors import RsxError
from resynth_index.lab import Lab
from resynth_index.pipeline import plans
from resynth_index.pipeline.plans import ProgressEvent

EIGHT_CAPTIONS = CAPTIONS + [f"{caption}, again" for caption in CAPTIONS]


class _Waits:
    """``ray.wait`` and ``ray.cancel`` as the executor calls them, recorded: every ref it waited
    on, every ref that landed, every ref cancelled. With ``slow``, the second ref of the first
    wait (the second actor's first task) lands only once nothing else is in flight, as if that
    actor were slow: a wait that polls (a timeout) never returns it."""

    def __init__(self, monkeypatch, slow: bool = False) -> None:
        self.seen: set = set()
        self.landed: set = set()
        self.cancelled: list = []
        self.held: list = []
        wait, cancel = ray.wait, ray.cancel

        def waiting(refs, *, num_returns=1, timeout=None, **kwargs):
            refs = list(refs)
            self.seen.update(refs)
            if slow and not self.held:
                self.held.append(refs[1])
            others = [ref for ref in refs if ref not in self.held]
            asked = others if others or timeout is not None else refs
            if not asked:
                return [], refs
            count = min(num_returns, len(asked))
            ready, _ = wait(asked, num_returns=count, timeout=timeout, **kwargs)
            self.landed.update(ready)
            return ready, [ref for ref in refs if ref not in ready]

        def cancelling(ref, *args, **kwargs):
            self.cancelled.append(ref)
            return cancel(ref, *args, **kwargs)

        monkeypatch.setattr(ray, "wait", waiting)
        monkeypatch.setattr(ray, "cancel", cancelling)

    def in_flight(self) -> set:
        """What was handed out and has not landed."""
        return self.seen - self.landed


def _kept(message: str) -> int:
    found = re.search(r"\((\d+) resynthes[ie]s stored before the failure (?:is|are) kept", message)
    assert found, message
    return int(found.group(1))


def test_every_kind_of_ray_failure_reads_as_one_line():
    """Beyond a task's own error and a dead actor: lost objects, a dead owner, a crashed worker,
    a timeout, each named by its kind."""
    pytest.importorskip("ray")
    errors = ray.exceptions
    hex_id = "ab" * 14
    for error in (
        errors.ObjectLostError(hex_id, None, ""),
        errors.OwnerDiedError(hex_id, None, ""),
        errors.ObjectReconstructionFailedError(hex_id),
        errors.WorkerCrashedError(),
        errors.GetTimeoutError("Get timed out: some object(s) not ready."),
    ):
        line = executor._failure(ray, error, "toy-a")
        assert "\n" not in line
        assert line.startswith(f"generating with 'toy-a' on Ray: {type(error).__name__}: ")


@pytest.mark.slow
@pytest.mark.usefixtures("ray_address")
def test_a_lost_object_ends_the_run_in_one_line_and_a_rerun_makes_only_the_rest(
    toy_lab, monkeypatch
):
    """An ``ObjectLostError`` (any Ray error that is neither the task's nor its actor's) used to
    escape as a traceback. Now: one line, the task in flight cancelled, the batch stored before
    it kept, the pool let go, and the same runner's rerun makes exactly what is missing."""
    texts = plans.captions_by_hash(EIGHT_CAPTIONS)
    waits = _Waits(monkeypatch, slow=True)  # the second actor's first task is surely in flight
    lost: list = []
    armed: list[bool] = []
    get = ray.get

    def get_once_lost(ref, *args, **kwargs):
        if armed and not lost:  # the first result fetched after a batch was committed
            lost.append(ref)
            raise ray.exceptions.ObjectLostError(ref.hex(), None, "")
        return get(ref, *args, **kwargs)

    def arm(event: ProgressEvent) -> None:
        if event.done:
            armed.append(True)

    with Lab.open(toy_lab) as lab, RayResynthesizer(lab, RayOptions(actors=2)) as runner:
        rows = _generators(lab, "toy-a")
        expected = plans.plan_resyntheses(lab, list(texts), rows).missing_count()
        monkeypatch.setattr(ray, "get", get_once_lost)
        with pytest.raises(RsxError) as failed:
            runner.resynthesize(texts, rows, batch_size=1, events=arm)
        message = str(failed.value)
        assert "\n" not in message and "'toy-a'" in message and "ObjectLostError" in message
        assert _kept(message) == 1 == len(_resynthesis_rows(toy_lab))
        # the slow actor's task was in flight: cancelled before the error went on
        assert waits.held and set(waits.cancelled) == waits.in_flight() == set(waits.held)
        assert runner.pool == []  # let go: the next run starts a fresh pool

        monkeypatch.setattr(ray, "get", get)
        again = runner.resynthesize(texts, rows, batch_size=1)
    assert (again.generated, again.reused) == (expected - 1, 1)
    _assert_whole(toy_lab, expected)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_address")
def test_an_actor_dead_for_good_ends_the_run_in_one_line_and_keeps_what_was_stored(
    toy_lab, monkeypatch
):
    """An actor killed with no restart: one line naming it, what was in flight cancelled, every
    committed batch kept, and a rerun on the same runner (a fresh pool) makes only the rest."""
    texts = plans.captions_by_hash(EIGHT_CAPTIONS)
    waits = _Waits(monkeypatch)
    with Lab.open(toy_lab) as lab, RayResynthesizer(lab, RayOptions(actors=2)) as runner:
        killed: list = []

        def kill_an_actor(event: ProgressEvent) -> None:
            if event.done and not killed:  # a batch is committed; the pool has more to do
                killed.append(runner.pool[1])
                ray.kill(runner.pool[1], no_restart=True)

        rows = _generators(lab, "toy-a")
        expected = plans.plan_resyntheses(lab, list(texts), rows).missing_count()
        with pytest.raises(RsxError, match="could not start or died beyond its 4 restarts") as e:
            runner.resynthesize(texts, rows, batch_size=1, events=kill_an_actor)
        message = str(e.value)
        assert "\n" not in message and killed
        kept = _kept(message)
        assert 1 <= kept < expected and len(_resynthesis_rows(toy_lab)) == kept
        assert set(waits.cancelled) == waits.in_flight()
        assert runner.pool == []

        again = runner.resynthesize(texts, rows, batch_size=1)
    assert (again.generated, again.reused) == (expected - kept, kept)
    _assert_whole(toy_lab, expected)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_address")
def test_a_slow_actor_is_handed_no_task_while_another_is_free(toy_lab, monkeypatch):
    """One actor's first batch is made to land last (``_Waits``, slow): every other task goes
    to the actor that is free, none queues behind the slow one. Batches land out of order; the
    plan still lists each caption's resyntheses in seed order, as the local path (and the store,
    read afresh) does."""
    texts = plans.captions_by_hash(EIGHT_CAPTIONS[:3])
    with Lab.open(toy_lab) as lab, RayResynthesizer(lab, RayOptions(actors=2)) as runner:
        rows = _generators(lab, "toy-a", "toy-b")
        plans.plan_captions(lab, texts, rows)  # the captions recorded, as a run does
        plan = plans.plan_resyntheses(lab, list(texts), rows, resyntheses=3)
        expected = plan.missing_count()
        with monkeypatch.context() as patched:
            _Waits(patched, slow=True)
            made = runner.generate_missing(plan, rows, texts, batch_size=1)
        batches = sorted(ray.get([actor.batches_made.remote() for actor in runner.pool]))
        fresh = plans.plan_resyntheses(lab, list(texts), rows, resyntheses=3)
    assert len(made) == expected == 18
    assert batches == [1, expected - 1]  # the slow actor made its first batch only
    assert dict(plan.stored) == dict(fresh.stored)  # each key's images in seed order


@pytest.mark.slow
def test_ray_says_nothing_on_the_stdout_of_json_commands(toy_lab, tmp_path, make_toy_image):
    """``rsx resynthesize --json`` and ``rsx query --json`` on a Ray they start themselves hold
    only JSON lines on stdout, even under ``RAY_LOG_TO_STDERR=1``, which Ray's C++ parts (the
    GCS server, the raylet, the coordinator's own core worker) obey by logging to stdout: they
    used to put hundreds of lines there. Ray's own messages go to stderr."""
    pytest.importorskip("ray")
    image = make_toy_image("toy-b", CAPTIONS[1])
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS[:2]), encoding="utf-8")
    on_ray = ["--json", "--executor", "ray", "--ray-actors", "1"]
    env = {"RAY_LOG_TO_STDERR": "1"}
    runs = [
        ["resynthesize", "--captions", str(captions), "--generator", "toy-a", *on_ray],
        ["query", str(image), "--caption", CAPTIONS[1], "--candidates", "toy-b", *on_ray],
    ]
    for args in runs:
        done = rsx_process(toy_lab, *args, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        lines = done.stdout.splitlines()
        assert len(lines) == 1, done.stdout[:3000]
        answer = json.loads(lines[0])
        assert answer["generated"] > 0  # Ray was started and used, not skipped
    assert "Started a local Ray instance" in done.stderr  # Ray's log is on stderr
    assert "RAY_LOG_TO_STDERR is ignored" in done.stderr


def test_stdout_is_stderr_while_ray_starts(capfd):
    """What is printed to stdout, by Python or at the descriptor (as a child process inherits
    it), goes to stderr inside ``stdout_to_stderr``; stdout is itself again after it."""
    print("before")
    with session.stdout_to_stderr():
        print("by python")
        subprocess.run([sys.executable, "-c", "print('by a child')"], check=True)
    print("after")
    out, err = capfd.readouterr()
    assert out.splitlines() == ["before", "after"]
    assert sorted(err.splitlines()) == ["by a child", "by python"]
