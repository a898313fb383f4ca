"""The driver: the only module that wires every package into a training run.

One loop on the Ray driver process moves prompt groups through the actors::

    sampler ─► rollout workers ─► reward workers ─► buffer ─► learner ─► weight sync ─► rollout workers

* **sync** mode: each step issues the groups it needs, waits for them, trains, then syncs weights,
  so every trained group was sampled by the current policy (staleness 0).
* **async** mode: rollout workers are kept busy all the time; the learner steps and the weight sync
  run in a background thread while the main thread keeps generating, scoring and buffering. New
  weights reach each worker between two of its generate calls (Ray runs an actor's calls in order).
  The buffer drops groups whose policy version lags the learner by more than ``train.max_staleness``.

Results stream: every rollout call carries one chunk of groups and is handled the moment it returns
(``ray.wait``), so groups are scored and buffered while other workers still generate. Dynamic
sampling sets aside groups whose samples all got the same reward (they carry no gradient) and
issues more prompts, up to ``train.max_generation_factor`` × the step's groups; the groups it sets aside
still count in the step's rewards (curriculum, sampler, metrics, events): they are what the policy did.

The rollout workers themselves (starting, scaling, weights, restarts) are ``deploy.rollout_fleet``'s, the
reward workers (requests per curriculum stage, restarts) ``deploy.reward_pool``'s.
A dead rollout or reward worker is restarted by Ray (``cluster.max_restarts``); its in-flight groups
are re-issued under the same ids, and a restarted rollout worker gets the current weights before its
next call. A restart is noticed by a failed call, or by a rollout worker returning groups sampled with
older weights than it was sent (it died between two calls). ``deploy.ledger`` checks that every group
is counted exactly once.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from actors.buffer import BufferConfig, TrajectoryBuffer
from actors.env import ImageLimits, answer_frame
from actors.metrics import BufferCounters, RunMetrics
from actors.types import PromptGroup, TrajectoryGroup
from curriculum.manager import CurriculumManager
from curriculum.sampler import PromptSampler
from deploy.config import RunConfig
from deploy.control import CONTROL_NAMESPACE, JobControl, control_actor_name
from deploy.ledger import DROP_BAD_PROMPT, DROP_NO_SIGNAL, DROP_SHUTDOWN, GroupLedger
from deploy.reward_pool import RewardPool
from deploy.rollout_fleet import FleetWorker, RolloutFleet
from deploy.run_record import BUFFER_DIR, RUN_CONFIG_FILE, check_rl_resume, refuse_buffered_run, trim_events
from deploy.training_data import TrainingData, prepare_training_data
from deploy.worker_env import actor_env
from learner.advantages import signal_mask
from learner.checkpoint import CHECKPOINTS_DIR, is_complete, latest_complete, refuse_earlier_run, step_dir_name
from models.config import resolve_model_path

log = logging.getLogger(__name__)

OUTPUT_DIR_SETTING = "train.output_dir"  # what an error about the run directory names
EVENTS_FILE = "events.jsonl"  # one JSON object per learner step: rewards, stage, learner stats, timings
SUMMARY_FILE = "summary.json"


def next_issue_counter(checkpointed: int, buffer_ids: Iterable[str]) -> int:
    """The issue counter a resumed run continues from: past the checkpoint's and past every group id the
    restored buffer has seen ("<row id>#<issue>"). Groups put, and even handed to the learner, after the
    checkpoint carry higher issues; the restored sampler draws their rows again, and the buffer refuses an
    id it has seen (a crash during a step's learning would otherwise stop the resumed run at its first put)."""
    return max([checkpointed, *(int(group_id.rsplit("#", 1)[1]) for group_id in buffer_ids)])


def stage_reward_means(groups: Iterable[TrajectoryGroup]) -> dict[int, dict[str, float]]:
    """{stage: {"total" and each reward component: mean over the samples of that stage's groups}}: a step's
    groups may come from more than one stage (those generated before a transition)."""
    per_stage: dict[int, dict[str, list[float]]] = {}
    for g in groups:
        columns = per_stage.setdefault(g.stage, {})
        for t in g.trajectories:
            columns.setdefault("total", []).append(t.reward)
            for name, value in t.rewards.items():
                columns.setdefault(name, []).append(value)
    return {s: {name: sum(v) / len(v) for name, v in cols.items()} for s, cols in per_stage.items()}


def reported_stage(means: dict[int, dict[str, float]], *, current: int) -> int:
    """The stage whose rewards a step's event reports: the current one, or, when the step holds no group of it
    (right after a transition, async groups generated before it still arrive), the latest stage it holds,
    so that the event names the stage its rewards come from."""
    return current if current in means else max(means)


@dataclass
class RunSummary:
    steps: int
    version: int
    stage: int
    ledger: dict
    events_path: str
    checkpoint: str | None
    metrics_port: int | None
    wall_s: float


class Driver:
    """Runs one training job described by a RunConfig (see the module docstring)."""

    def __init__(self, config: RunConfig, *, resume: bool = False):
        self.config = config
        self.resume = resume
        self.out = Path(config.train.output_dir)
        if resume:  # before Ray or any actor starts
            check_rl_resume(self.out, config.model_dump(mode="json"), setting=OUTPUT_DIR_SETTING)
        else:
            refuse_earlier_run(self.out, setting=OUTPUT_DIR_SETTING)
            refuse_buffered_run(self.out, setting=OUTPUT_DIR_SETTING)
        self.ledger = GroupLedger()
        self.metrics = RunMetrics()
        self._buffer_counters = BufferCounters(self.metrics)
        self.metrics_port: int | None = None
        self.step = 0
        self.version = 0
        self._issue_counter = 0
        self._reissue: deque[PromptGroup] = deque()
        self._pool: list[TrajectoryGroup] = []  # zero-signal groups set aside in case refills run out
        # buffer.put ref → group id: on its way into the buffer. The buffer is a threaded actor, so a later
        # __len__ call can run before the put lands; until the put is done the group counts as outstanding.
        self._putting: dict = {}
        self._started = False
        # Training seconds of the run before this process (a resumed run's checkpoint records them), so wall
        # times in events and the summary count the whole run, as the SFT control that matches RL's time needs.
        self._wall_offset = 0.0
        self._last_poll = 0.0

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        import ray

        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        # The whole resolved config, for the record and for a resume's check (a resume records its own).
        (self.out / RUN_CONFIG_FILE).write_text(cfg.model_dump_json(indent=2))
        self.model_path = resolve_model_path(cfg.model)
        log.info("policy model: %s", self.model_path)
        self.limits = self._image_limits()
        self.data = self._load_data()
        for reason, count in self.data.bad_rows.items():
            self.metrics.bad_rows.labels(reason=reason).inc(count)

        if not ray.is_initialized():
            if cfg.cluster.address:
                ray.init(address=cfg.cluster.address)
            else:
                ray.init(num_cpus=cfg.cluster.num_cpus, include_dashboard=False,
                         runtime_env={"env_vars": actor_env()})
        self._started = True
        if cfg.metrics.enabled:
            self.metrics_port = self.metrics.serve(host=cfg.metrics.host, port=cfg.metrics.port)

        self.curriculum = CurriculumManager(cfg.curriculum)
        self.sampler = PromptSampler(prompts=self.data.prompt_table, stages=cfg.curriculum.stages,
                                     config=cfg.curriculum.sampler)
        self.stage_weights = {i: dict(s.reward_weights) for i, s in enumerate(cfg.curriculum.stages)}

        from deploy.learner_group import LearnerGroup

        # Rollout and reward actors first: creating them returns at once, so their engines start while the
        # learner group forms (which waits for its ranks). Started the other way round, a run waited for
        # the learner, then for the vLLM engines.
        self.reward_pool = RewardPool(cfg, metrics=self.metrics)
        self.reward_pool.start(cfg.cluster.reward_workers)
        self.fleet = RolloutFleet(cfg, model_path=self.model_path, metrics=self.metrics)
        self.fleet.start(cfg.cluster.rollout_workers)
        self.learner = LearnerGroup(cfg.learner.model_copy(update={"model_path": str(self.model_path)}),
                                    env_vars=actor_env())
        # Process ids tell a restarted worker from the one the driver knows (waits for them to start).
        self.fleet.await_started()
        self.reward_pool.await_started()
        buffer_cfg = BufferConfig(
            capacity=cfg.train.buffer_capacity,
            max_staleness=cfg.train.max_staleness if cfg.train.mode == "async" else 0,
            group_size=cfg.rollout.sampling.n,
            spill_dir=str(self.out / BUFFER_DIR),
        )
        self.buffer = (ray.remote(TrajectoryBuffer).options(max_concurrency=cfg.cluster.rollout_workers + 4)
                       .remote(buffer_cfg, resume=self.resume))
        if self.resume:
            self._restore()
        c = cfg.cluster
        self.control = ray.remote(JobControl).options(
            name=control_actor_name(cfg.train.run_name), namespace=CONTROL_NAMESPACE, num_cpus=0,
        ).remote(rollout_workers=c.rollout_workers, min_workers=c.min_rollout_workers,
                 max_workers=c.max_rollout_workers, capacity=cfg.local_rollout_capacity())
        self.metrics.curriculum_stage.set(self.curriculum.current_stage + 1)

    def _image_limits(self) -> ImageLimits:
        """The model's image resize rule; the rewards' input frame must use the same one."""
        from models.processor import load_processor

        limits = ImageLimits.of(load_processor(self.model_path).image_processor)
        frame = self.config.rewards.frame
        if frame.kind == "input" and (frame.min_pixels, frame.max_pixels) != (limits.min_pixels, limits.max_pixels):
            raise ValueError(
                f"rewards.frame.min_pixels/max_pixels ({frame.min_pixels}, {frame.max_pixels}) differ from the "
                f"model's processor ({limits.min_pixels}, {limits.max_pixels}): boxes would be read in the wrong frame"
            )
        return limits

    def _load_data(self) -> TrainingData:
        return prepare_training_data(self.config.data)

    # ------------------------------------------------------------------ generation
    def _new_prompts(self, count: int) -> list[PromptGroup]:
        stage = self.curriculum.current_stage
        prompts = []
        for row_id in self.sampler.draw(stage=stage, count=count):
            self._issue_counter += 1
            group = self.data.prompt_group(row_id, issue=self._issue_counter, stage=stage)
            self.ledger.issue(group.group_id)
            prompts.append(group)
        return prompts

    def _outstanding(self) -> int:
        """Groups issued and not yet in the buffer (generating, waiting for re-issue, scoring, being put).
        Count it before ``_buffered()``: a put that lands in between is then counted twice, never not at all."""
        generating = self.fleet.generating()
        scoring = self.reward_pool.scoring()
        return generating + scoring + len(self._reissue) + self._settle_puts()

    def _settle_puts(self) -> int:
        """Forget the buffer puts that are done (raising if the buffer refused one); how many are not."""
        import ray

        if self._putting:
            done, _ = ray.wait(list(self._putting), num_returns=len(self._putting), timeout=0)
            ray.get(done)
            for ref in done:
                del self._putting[ref]
        return len(self._putting)

    def _buffered(self) -> int:
        """Groups in the buffer (also what the buffer-depth gauge shows)."""
        import ray

        depth = ray.get(self.buffer.__len__.remote())
        self.metrics.buffer_depth.set(depth)
        return depth

    def _observe_buffer(self) -> None:
        """The buffer's own counts (backpressure, refused puts, spill failures) into the run's counters. Not on
        the loop's every pass, as ``_buffered``: with the control poll (at most twice a second) and at the end."""
        import ray

        self._buffer_counters.update(ray.get(self.buffer.stats.remote()))

    def _dispatch(self, prompts: list[PromptGroup], workers: list[FleetWorker]) -> None:
        """One chunk of ``prompts`` to each of ``workers`` (in order)."""
        self.fleet.dispatch(prompts, workers)

    def _issue(self, count: int) -> None:
        """Re-issues first, then ``count`` new groups, spread over the least busy workers."""
        prompts = list(self._reissue) + (self._new_prompts(count) if count > 0 else [])
        self._reissue.clear()
        if prompts:
            self._dispatch(prompts, sorted(self.fleet.active(), key=lambda w: len(w.busy)))

    def _keep_workers_busy(self) -> None:
        """Async mode: each idle worker gets a chunk while generation is less than max_staleness + 1 steps
        ahead of the learner (further ahead, groups would only go stale) and the buffer has room."""
        train = self.config.train
        active = self.fleet.active()
        chunk = max(1, train.prompts_per_step // len(active))
        lead = min(train.buffer_capacity, train.prompts_per_step * (train.max_staleness + 1))
        room = lead - self._outstanding() - self._buffered()
        for worker in active:
            if worker.busy or room < chunk:
                continue
            prompts = [self._reissue.popleft() for _ in range(min(chunk, len(self._reissue)))]
            prompts += self._new_prompts(chunk - len(prompts))
            self._dispatch(prompts, [worker])
            room -= chunk

    # ------------------------------------------------------------------ control (refocus scale)
    def _poll_control(self) -> None:
        """Report status to the control actor and apply what clients asked for (at most twice a second)."""
        import ray

        if time.monotonic() - self._last_poll < 0.5:
            return
        self._last_poll = time.monotonic()
        self._buffered()  # the buffer-depth gauge, whatever the loop asks the buffer
        self._observe_buffer()
        given_up = self.fleet.admit_started()
        if given_up:
            running = len(self.fleet.active()) + len(self.fleet.starting())
            ray.get(self.control.scale_failed.remote(running, "; ".join(given_up)))
        status = {"step": self.step, "version": self.version, "stage": self.curriculum.current_stage + 1,
                  "rollout_workers": len(self.fleet.active()),
                  "starting_rollout_workers": len(self.fleet.starting()),
                  "ledger": self.ledger.summary()}
        wanted = ray.get(self.control.poll.remote(status))
        for reason in wanted["advance_stage"]:
            if self.curriculum.is_last_stage:  # a client's request must never crash the run
                log.warning("stage advance requested (%s) but the curriculum is in its last stage", reason)
                continue
            transition = self.curriculum.force_advance(reason)
            log.info("curriculum: stage forced to %s (%s)", transition.to_name, reason)
            self.metrics.curriculum_transitions.inc()
            self.metrics.curriculum_stage.set(self.curriculum.current_stage + 1)
        self.fleet.rescale(wanted["rollout_workers"])

    def _pump(self, timeout: float) -> int:
        """Handle every rollout and reward result ready within ``timeout``; returns how many."""
        import ray

        generating = self.fleet.in_flight()
        refs = list(generating) + self.reward_pool.pending()
        if not refs:
            return 0
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:  # take everything else that is done too
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            if ref in generating:
                self._on_generated(ref, *generating[ref])
            else:
                for group in self.reward_pool.take(ref):
                    self._putting[self.buffer.put.remote(group)] = group.group_id
        return len(ready)

    def _on_generated(self, ref, worker: FleetWorker, part: list[PromptGroup]) -> None:
        import ray

        sent_version = self.fleet.returned(ref, worker)
        try:
            groups: list[TrajectoryGroup] = ray.get(ref)
        except ray.exceptions.RayActorError as error:
            self._on_rollout_worker_died(worker, part, type(error).__name__)
            return
        if any(g.policy_version < sent_version for g in groups):
            # Ray restarted the worker since its last call (no call failed): it sampled with its initial weights.
            self._on_rollout_worker_died(worker, part, f"sampled with weights version "
                                         f"{min(g.policy_version for g in groups)}, was sent {sent_version}")
            return
        returned = {g.group_id for g in groups}
        for prompt in part:
            if prompt.group_id not in returned:  # the worker could not use it (e.g. corrupt image)
                self.ledger.drop(prompt.group_id, DROP_BAD_PROMPT)
                self.metrics.groups_dropped.labels(reason=DROP_BAD_PROMPT).inc()
        for group in groups:
            self.ledger.generate(group.group_id)
            self.metrics.generated_tokens.labels(worker=worker.name).inc(
                sum(sum(t.loss_mask) for t in group.trajectories))
            self.metrics.generated_trajectories.labels(worker=worker.name).inc(len(group.trajectories))
            self.metrics.generated_groups.inc()
            for t in group.trajectories:
                self.metrics.zoom_turns.observe(1 + len(t.zoom_images))
                self.metrics.trajectories_finished.labels(reason=t.finish_reason).inc()
        if groups:
            self._score(groups)

    def _on_rollout_worker_died(self, worker: FleetWorker, part: list[PromptGroup], why: str) -> None:
        log.warning("rollout worker %s died (%s); re-issuing its %d groups", worker.name, why, len(part))
        for prompt in part:
            self.ledger.reissue(prompt.group_id)
            self._reissue.append(prompt)
        # Ray restarts the actor from its constructor (the initial weights): send the current ones.
        if self.fleet.recover(worker):
            self.fleet.send_current([worker])

    def _frames(self, groups: list[TrajectoryGroup]) -> list:
        """Per trajectory, the frame of its final boxes: the last zoom crop's, else the image's (None)."""
        kind, zoom_pixels = self.config.rewards.frame.kind, self.config.rollout.env.zoom_pixels
        frames = []
        for g in groups:
            for t in g.trajectories:
                frames.append(None if not t.zoom_boxes else answer_frame(
                    kind=kind, width=g.prompt.target.width, height=g.prompt.target.height,
                    zoom_boxes=t.zoom_boxes, limits=self.limits, zoom_pixels=zoom_pixels))
        return frames

    def _score(self, groups: list[TrajectoryGroup]) -> None:
        """Send the groups to the reward workers (texts, targets and frames; not images)."""
        self.reward_pool.submit(groups, stage_weights=self.stage_weights, frames=self._frames(groups))

    # ------------------------------------------------------------------ learning
    def _collect_batch(self) -> list[TrajectoryGroup]:
        """``prompts_per_step`` groups with signal (zero-signal ones only once refills run out: sync mode has
        generated ``max_generation_factor`` × the step's groups, async mode has taken that many from the buffer)."""
        import ray

        cfg = self.config.train
        need = cfg.prompts_per_step
        budget = need * cfg.max_generation_factor
        batch: list[TrajectoryGroup] = []
        issued = 0
        received = 0  # groups this step took from the buffer, with signal or without
        while len(batch) < need:
            missing = need - len(batch)
            if cfg.mode == "async":
                self._keep_workers_busy()
            else:
                supply = self._outstanding() + self._buffered()
                count = min(max(missing - supply, 0), budget - issued)
                if count or self._reissue:
                    self._issue(count)
                    issued += count
            self._pump(timeout=0.2)
            self._poll_control()
            for group in ray.get(self.buffer.get.remote(missing, learner_version=self.version, timeout_s=0.0)):
                received += 1
                rewards = [[t.reward for t in group.trajectories]]
                if cfg.dynamic_sampling and not bool(signal_mask(rewards)[0]):
                    self._pool.append(group)
                else:
                    batch.append(group)
            self._settle_buffer_drops()
            if cfg.mode == "sync":
                exhausted = issued >= budget and self._outstanding() + self._buffered() == 0
            else:  # async generation never stops, so the budget counts what the step received; without
                # it a policy that answers every prompt alike (a memorised few-shot set) stalls the step
                exhausted = received >= budget
            if exhausted and len(batch) < need:
                take = min(need - len(batch), len(self._pool))
                if take < need - len(batch):
                    raise RuntimeError(f"step {self.step + 1}: only {len(batch) + take} of {need} groups could be "
                                       f"generated from {issued} issued (bad prompts: see the log)")
                log.info("step %d: dynamic sampling ran out of refills; training on %d zero-signal groups",
                         self.step + 1, take)
                batch.extend(self._pool[:take])
                del self._pool[:take]
        # Issue order, not arrival order: with seeded sampling a run (and a resumed run) then repeats its
        # reward means and learner updates exactly.
        batch.sort(key=lambda g: int(g.group_id.rsplit("#", 1)[1]))
        return batch

    def _settle_buffer_drops(self) -> None:
        """Mirror the buffer's stale drops into the ledger and metrics."""
        import ray

        for group_id, reason in ray.get(self.buffer.take_dropped.remote()):
            self.ledger.drop(group_id, reason)
            self.metrics.groups_dropped.labels(reason=reason).inc()

    def _learn(self, batch: list[TrajectoryGroup]) -> dict:
        """Learner step, then weights to every rollout worker (runs on the background thread in async mode)."""
        start = time.perf_counter()
        stats = self.learner.step(batch)
        step_seconds = time.perf_counter() - start
        sync_seconds = self._sync_weights(version=self.version + 1)
        return {**stats, "step_seconds": step_seconds, "sync_seconds": sync_seconds}

    def _finish_step(self, batch: list[TrajectoryGroup], stats: dict, events) -> None:
        self.step += 1
        self.version += 1
        for group in batch:
            self.ledger.train(group.group_id)
            self.metrics.group_staleness.observe(self.version - 1 - group.policy_version)
        set_aside, self._pool = self._pool, []  # zero-signal groups the step did not need
        for group in set_aside:
            self.ledger.drop(group.group_id, DROP_NO_SIGNAL)
            self.metrics.groups_dropped.labels(reason=DROP_NO_SIGNAL).inc()
        tokens = sum(sum(t.loss_mask) for g in batch for t in g.trajectories)
        # Groups trained with no signal (all rewards equal: zero advantage, they only dilute the token mean): with
        # dynamic sampling, those that filled the step when refills ran out.
        no_signal = int((~signal_mask([[t.reward for t in g.trajectories] for g in batch])).sum())
        self.metrics.trained_tokens.inc(tokens)
        self.metrics.trained_groups.inc(len(batch))
        self.metrics.learner_steps.inc()
        self.metrics.learner_step_seconds.observe(stats["step_seconds"])
        self.metrics.weight_sync_seconds.observe(stats["sync_seconds"])
        self.metrics.weight_version.set(self.version)
        self.metrics.weight_version_lag.set(self.version - self.fleet.lowest_version())
        rewards = self._observe_rewards(batch + set_aside)
        event = {"step": self.step, "version": self.version, **rewards, "learner": stats,
                 "trained_tokens": tokens, "zero_signal_trained": no_signal, "zero_signal_set_aside": len(set_aside),
                 "group_ids": [g.group_id for g in batch],
                 "policy_versions": [g.policy_version for g in batch], "wall_s": self._elapsed()}
        events.write(json.dumps(event) + "\n")
        events.flush()
        log.info("step %d/%d stage %d reward %.3f loss %.4f (%.1fs learn, %.2fs sync)", self.step,
                 self.config.train.steps, rewards["stage"] + 1, rewards["reward_total"],
                 stats.get("loss/total", float("nan")), stats["step_seconds"], stats["sync_seconds"])
        every = self.config.train.checkpoint_every
        if every and self.step % every == 0:
            self.last_checkpoint = self._checkpoint()

    def _observe_rewards(self, groups: list[TrajectoryGroup]) -> dict:
        """Reward metrics per component and stage; the stage's mean reward feeds the curriculum, and every group's
        outcome the sampler's filter. ``groups``: all the step drew, those dynamic sampling set aside for want of
        signal too: they are the prompts the policy has mastered (or cannot yet do), so without them the stage
        reward of a policy that masters its stage stays at that of the groups it still gets partly wrong, and the
        sampler's ``filter_solved`` never saw a solved group."""
        stage = self.curriculum.current_stage
        for g in groups:
            self.sampler.record_outcome(g.prompt.prompt_id, [t.reward for t in g.trajectories], stage=g.stage)
        means = stage_reward_means(groups)
        for s, values in means.items():
            for name, value in values.items():
                self.metrics.reward_mean.labels(component=name, stage=str(s + 1)).set(value)
        transition = None
        if stage in means:
            transition = self.curriculum.observe(step=self.step, stage_reward=means[stage]["total"], stage=stage)
        if transition is not None:
            log.info("curriculum: stage %s → %s at step %d (%s; %s)", transition.from_name, transition.to_name,
                     self.step, transition.reason, transition.evidence)
            self.metrics.curriculum_transitions.inc()
            self.metrics.curriculum_stage.set(self.curriculum.current_stage + 1)
        shown = reported_stage(means, current=stage)
        return {"stage": shown, "reward_total": means[shown]["total"], "rewards": means[shown],
                "transition": None if transition is None else transition.to_name}

    # ------------------------------------------------------------------ weights
    def _sync_weights(self, *, version: int) -> float:
        """Export the learner's weights as ``version`` and deliver them to every rollout worker."""
        start = time.perf_counter()
        self.fleet.sync(self.learner.export_weights(version=version, bucket_bytes=self.fleet.weight_sync.bucket_bytes))
        if self.config.train.verify_weight_sync:
            self.fleet.verify(version)
        return time.perf_counter() - start

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self) -> str:
        extra = {
            "step": self.step,
            "version": self.version,
            "issue_counter": self._issue_counter,
            "curriculum": self.curriculum.state_dict(),
            "sampler": self.sampler.state_dict(),
            "wall_s": self._elapsed(),
        }
        path = self.learner.save_checkpoint(self.out / CHECKPOINTS_DIR, extra_state=extra)
        log.info("checkpoint %s", path)
        return path

    def _restore(self) -> None:
        import ray

        path = latest_complete(self.out / CHECKPOINTS_DIR)
        if path is None:
            # A run that crashed before its first checkpoint: the initial weights, its groups still buffered.
            log.info("resume: no complete checkpoint under %s; starting from the initial weights",
                     self.out / CHECKPOINTS_DIR)
            trim_events(self.out / EVENTS_FILE, last_step=0)  # what a crashed run logged is trained anew
        else:
            extra = self.learner.load_checkpoint(path)
            self.step, self.version = extra["step"], extra["version"]
            self._issue_counter = extra["issue_counter"]
            self.curriculum.load_state_dict(extra["curriculum"])
            self.sampler.load_state_dict(extra["sampler"])
            self._wall_offset = float(extra.get("wall_s", 0.0))  # checkpoints before it was recorded: 0
            trim_events(self.out / EVENTS_FILE, last_step=self.step)
        # Groups the previous run had buffered (spilled to Parquet) are trained on like fresh ones, with or without
        # a checkpoint: the buffer restored them either way, and refuses their ids (and those it handed out) again.
        held = ray.get(self.buffer.held_ids.remote())
        for group_id in held:
            self.ledger.issue(group_id)
            self.ledger.generate(group_id)
        self._issue_counter = next_issue_counter(self._issue_counter, ray.get(self.buffer.seen_ids.remote()))
        if path is not None:
            self._sync_weights(version=self.version)
            log.info("resumed from %s at step %d (stage %d)", path, self.step, self.curriculum.current_stage + 1)

    # ------------------------------------------------------------------ the loop
    def _elapsed(self) -> float:
        """Seconds this run has trained: this process's since ``run`` began, plus those before a resume."""
        return self._wall_offset + time.perf_counter() - self._t0

    def run(self) -> RunSummary:
        if not self._started:
            self.setup()
        # The run's clock counts training, not start-up (Ray, engines, learner) or the drain after the last
        # checkpoint, as the SFT control's does: the benchmark gives the control RL's seconds.
        self._t0 = time.perf_counter()
        self.last_checkpoint = None
        # A fresh run starts its own log: one in this directory is a crashed run's that left no checkpoint
        # (refuse_earlier_run stops anything else), and its steps are trained anew. A resumed run appends.
        with (self.out / EVENTS_FILE).open("a" if self.resume else "w") as events:
            if self.config.train.mode == "sync":
                while self.step < self.config.train.steps:
                    batch = self._collect_batch()
                    self._finish_step(batch, self._learn(batch), events)
            else:
                self._run_async(events)
        finished = self.out / CHECKPOINTS_DIR / step_dir_name(self.step)
        if self.resume and self.last_checkpoint is None and is_complete(finished):
            self.last_checkpoint = str(finished.resolve())  # resumed a run that had already finished
        if self.last_checkpoint is None or not self.last_checkpoint.endswith(f"step_{self.step}"):
            self.last_checkpoint = self._checkpoint()
        wall_s = self._elapsed()
        self._drain()
        self._observe_buffer()
        summary = RunSummary(steps=self.step, version=self.version, stage=self.curriculum.current_stage,
                             ledger=self.ledger.summary(), events_path=str(self.out / EVENTS_FILE),
                             checkpoint=self.last_checkpoint, metrics_port=self.metrics_port, wall_s=wall_s)
        (self.out / SUMMARY_FILE).write_text(json.dumps(summary.__dict__, indent=2))
        return summary

    def _run_async(self, events) -> None:
        """Learner (and weight sync) on a background thread; generation never waits for it."""
        pending: tuple[Future, list[TrajectoryGroup]] | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="learner") as learner_thread:
            while self.step < self.config.train.steps or pending is not None:
                if pending is not None and pending[0].done():
                    future, batch = pending
                    pending = None
                    self._finish_step(batch, future.result(), events)
                    continue
                if pending is None and self.step < self.config.train.steps:
                    batch = self._collect_batch()
                    pending = (learner_thread.submit(self._learn, batch), batch)
                else:
                    self._keep_workers_busy()
                    self._pump(timeout=0.1)
                    self._poll_control()
                    self._settle_buffer_drops()

    def _flush_buffer(self) -> None:
        """Write the groups the buffer holds but has not spilled: a spill write that failed (a full disk) keeps its
        groups in memory until the next one, and a resume restores only what is on disk. A failure is logged, not
        raised: the run is over, and what it trained is in its checkpoint."""
        import ray

        try:
            ray.get(self.buffer.flush.remote())
        except (OSError, ray.exceptions.RayError) as error:
            log.error("buffer: groups held in memory could not be written (%s); a --resume of this run will not "
                      "have them", error)

    def _drain(self) -> None:
        """Wait for in-flight work to come back into the ledger, then settle what remains as shutdown."""
        deadline = time.monotonic() + 60
        while self._outstanding() - len(self._reissue) > 0 and time.monotonic() < deadline:
            self._pump(timeout=0.5)
        self._settle_buffer_drops()
        for group_id in sorted(self.ledger.open):
            self.ledger.drop(group_id, DROP_SHUTDOWN)
            self.metrics.groups_dropped.labels(reason=DROP_SHUTDOWN).inc()

    def shutdown(self) -> None:
        import ray

        if getattr(self, "buffer", None) is not None:
            self._flush_buffer()
        self.metrics.close()
        if getattr(self, "control", None) is not None:
            ray.kill(self.control)
        if getattr(self, "fleet", None) is not None:
            self.fleet.kill()
        if getattr(self, "reward_pool", None) is not None:
            self.reward_pool.kill()
        if hasattr(self, "learner"):
            self.learner.shutdown()
