"""Scaling a running job: 1 → 2 → 1 rollout workers through the real ``refocus scale`` CLI
(and one forced curriculum stage through ``refocus stage advance``).

The driver runs in this process on a local Ray (sync mode); after step 2 and after step 4 a
``refocus scale`` subprocess connects to that Ray by its GCS address and talks to the run's control
actor, exactly as an operator would. The driver picks the request up at its next poll: it starts
``rollout-1`` in the background and goes on training with ``rollout-0`` while the new vLLM engine loads; the
new worker joins, with the weights current then, once it answers. After step 4 it is retired again and its
in-flight calls finish first.

Asserted: the added worker's groups reach the learner with the learner's weights, and the ledger
shows every issued group trained or dropped by reason, none twice, nothing re-issued or lost.
"""

import json
import subprocess
import sys

import pytest

from actors.metrics import ROLLOUT_WORKERS_STARTING
from deploy.config import load_run_config, shipped_configs
from deploy.driver import Driver
from deploy.ledger import DROP_BAD_PROMPT, DROP_NO_SIGNAL, DROP_SHUTDOWN, DROP_STALE

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

STEPS = 6
SCALE_PLAN = {2: 2, 4: 1}  # after step k: ask for n rollout workers
RUN_NAME = "scaling-test"
TINY_CPU = next(p for p in shipped_configs() if p.name == "tiny-cpu.yaml")


def refocus(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process (its own Ray client, as an operator's shell would have)."""
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


class ScalingDriver(Driver):
    """The real driver, recording which worker each group went to and came from, and running
    ``refocus scale`` after the steps in SCALE_PLAN (the driver's thread waits for the CLI; the control
    actor answers it on its own, so this is an ordinary client talking to a running job)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dispatched: dict[str, str] = {}  # group id → worker it was sent to
        self.trained_by_step: list[list[tuple[str, str]]] = []  # per step: (group id, worker id)
        self.scale_results: dict[int, dict] = {}
        self.starting_at_first_poll: bool | None = None  # was rollout-1 still loading when the run went on?

    def _dispatch(self, prompts, workers):
        before = {w.name: len(w.busy) for w in workers}
        super()._dispatch(prompts, workers)
        for worker in workers:
            for _, part in worker.busy[before[worker.name]:]:
                self.dispatched.update({p.group_id: worker.name for p in part})

    def _learn(self, batch):
        self.trained_by_step.append([(g.group_id, g.worker_id) for g in batch])
        return super()._learn(batch)

    def _finish_step(self, batch, stats, events):
        import ray

        super()._finish_step(batch, stats, events)
        if self.step not in SCALE_PLAN:
            return
        address = ray.get_runtime_context().gcs_address
        if self.step == min(SCALE_PLAN):  # a request the control actor refuses: the run carries on unchanged
            refused = refocus("scale", RUN_NAME, "--rollout-workers", "0", "--address", address)
            assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
            assert "--rollout-workers must be an integer in [1, 64], got 0" in refused.stderr
        done = refocus("scale", RUN_NAME, "--rollout-workers", str(SCALE_PLAN[self.step]), "--address", address)
        assert done.returncode == 0, done.stderr
        self.scale_results[self.step] = json.loads(done.stdout)
        if self.step == min(SCALE_PLAN):
            self._await_rollout_1()
        if self.step == max(SCALE_PLAN):  # the other control: force the next curriculum stage
            advanced = refocus("stage", "advance", RUN_NAME, "--reason", "operator test", "--address", address)
            assert advanced.returncode == 0, advanced.stderr

    def _await_rollout_1(self) -> None:
        """Poll as the loop does until rollout-1 has joined: the first poll must return while its engine still
        loads, and the test then waits, so that the steps before the scale-down have two workers."""
        import time

        deadline = time.monotonic() + 300
        while not any(w.name == "rollout-1" and w.admitted for w in self.fleet.workers):
            assert time.monotonic() < deadline, "rollout-1 never joined"
            self._last_poll = 0.0
            self._poll_control()
            if self.starting_at_first_poll is None:
                self.starting_at_first_poll = not self.fleet.workers[-1].admitted
            time.sleep(0.5)


def test_scale_one_two_one_during_a_run_loses_nothing(tiny_model_dir, data_dir, tmp_path):
    import ray

    config = load_run_config(TINY_CPU, [
        f"model.path={tiny_model_dir}", f"data.path={data_dir}", f"train.output_dir={tmp_path / 'run'}",
        f"train.steps={STEPS}", "train.mode=sync", "train.checkpoint_every=0", "train.verify_weight_sync=true",
        f"train.run_name={RUN_NAME}", "cluster.rollout_workers=1", "metrics.enabled=false",
        "rewards.custom_reward=rewards.examples:brevity",  # a signal for the random model (see test_training)
        *[f"curriculum.stages.{i}.reward_weights.custom=1.0" for i in range(3)],
    ])
    driver = ScalingDriver(config)
    try:
        summary = driver.run()
    finally:
        driver.shutdown()
        ray.shutdown()
    assert summary.steps == STEPS

    # The CLI saw the job as the driver reported it: 1 worker when asked for 2, 2 when asked for 1.
    up, down = driver.scale_results[2], driver.scale_results[4]
    assert (up["desired_rollout_workers"], up["status"]["rollout_workers"]) == (2, 1)
    assert (down["desired_rollout_workers"], down["status"]["rollout_workers"]) == (1, 2)
    # Status is what the driver reported at its last poll, made while it collected step k's groups.
    assert up["status"]["step"] == 1 and down["status"]["step"] == 3
    forced = [t for t in driver.curriculum.transitions if t.reason == "manual: operator test"]
    assert len(forced) == 1 and forced[0].step == max(SCALE_PLAN)

    # The scale-up did not wait for the new engine: the poll that started it returned while it loaded.
    assert driver.starting_at_first_poll is True
    assert driver.metrics.registry.get_sample_value(ROLLOUT_WORKERS_STARTING) == 0
    # The added worker's groups reached the learner; before it existed only rollout-0 generated.
    assert {w for step in driver.trained_by_step[:2] for _, w in step} == {"rollout-0"}
    assert {w for step in driver.trained_by_step for _, w in step} == {"rollout-0", "rollout-1"}
    # It held the learner's weights after every sync it took part in, and it is gone at the end.
    with_new = [c for c in driver.fleet.checksums if "rollout-1" in c["workers"]]
    assert with_new and all(set(c["workers"].values()) == {c["learner"]} for c in with_new)
    assert [w.name for w in driver.fleet.workers] == ["rollout-0"]

    # Accounting: every issued group trained or dropped by reason, none twice, none re-issued.
    ledger = driver.ledger
    assert ledger.reconciles() and not ledger.open and not ledger.reissued
    trained = [g for step in driver.trained_by_step for g, _ in step]
    assert len(trained) == len(set(trained)) == STEPS * config.train.prompts_per_step
    assert set(trained) == ledger.trained
    assert len(ledger.trained) + len(ledger.dropped) == len(ledger.issued)
    assert set(ledger.dropped.values()) <= {DROP_NO_SIGNAL, DROP_STALE, DROP_BAD_PROMPT, DROP_SHUTDOWN}
    # Everything sent to the worker that was retired came back from it (its calls finished first).
    sent_to_new = {g for g, w in driver.dispatched.items() if w == "rollout-1"}
    assert sent_to_new and sent_to_new <= ledger.generated
    assert not {g for g in sent_to_new if ledger.dropped.get(g) == DROP_SHUTDOWN}
