"""PromptSampler: data mix, determinism, exact resume, and the solved/unsolved filter."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from curriculum.config import SamplerConfig, StageConfig
from curriculum.sampler import (
    METRIC_DRAWN_TOTAL,
    METRIC_FILTERED_PROMPTS,
    METRIC_IGNORED_OUTCOMES_TOTAL,
    METRIC_INVALID_PROMPTS,
    METRIC_RELEASED_TOTAL,
    METRIC_SKIPPED_TOTAL,
    PromptMeta,
    PromptSampler,
)


def table() -> list[PromptMeta]:
    """400 easy and 100 hard prompts spread over the four tasks."""
    tasks = ["camo", "classify", "detect", "ground"]
    rows = [PromptMeta(id=f"e{i}", task=tasks[i % 4], difficulty="easy") for i in range(400)]
    rows += [PromptMeta(id=f"h{i}", task=tasks[i % 4], difficulty="hard") for i in range(100)]
    return rows


ALL_TASKS = ("camo", "classify", "detect", "ground")


def stage(name: str = "s", *, tasks=ALL_TASKS, easy: float = 0.8) -> StageConfig:
    return StageConfig(
        name=name,
        reward_weights={"format": 1.0},
        tasks=list(tasks),
        difficulty_weights={"easy": easy, "hard": round(1.0 - easy, 10)},
    )


def test_draws_follow_the_stage_mix():
    rows = {row.id: row for row in table()}
    sampler = PromptSampler(
        prompts=list(rows.values()),
        stages=[stage(easy=0.8), stage("camo_detect", tasks=("camo", "detect"), easy=0.3)],
        config=SamplerConfig(seed=1),
    )
    drawn = sampler.draw(stage=0, count=20_000)
    easy_share = sum(rows[i].difficulty == "easy" for i in drawn) / len(drawn)
    assert easy_share == pytest.approx(0.8, abs=0.015)  # binomial sd 0.0028
    drawn = sampler.draw(stage=1, count=20_000)
    assert {rows[i].task for i in drawn} == {"camo", "detect"}
    easy_share = sum(rows[i].difficulty == "easy" for i in drawn) / len(drawn)
    assert easy_share == pytest.approx(0.3, abs=0.015)
    # Within a difficulty the tasks come in proportion to the data (here equal counts).
    task_counts = Counter(rows[i].task for i in drawn)
    assert task_counts["camo"] / len(drawn) == pytest.approx(0.5, abs=0.015)
    assert sampler.metrics()[METRIC_DRAWN_TOTAL] == 40_000


def test_each_epoch_visits_every_prompt_of_a_pool_once():
    sampler = PromptSampler(prompts=table(), stages=[stage(easy=1.0)], config=SamplerConfig())
    first, second = sampler.draw(stage=0, count=400), sampler.draw(stage=0, count=400)
    expected = {f"e{i}" for i in range(400)}
    assert set(first) == expected and len(first) == 400
    assert set(second) == expected
    assert first != second  # each epoch has its own order


def test_same_seed_same_draws_other_seed_other_draws():
    def draws(seed: int) -> list[str]:
        sampler = PromptSampler(prompts=table(), stages=[stage()], config=SamplerConfig(seed=seed))
        return sampler.draw(stage=0, count=300)

    assert draws(5) == draws(5)
    assert draws(5) != draws(6)


def test_resume_from_state_dict_draws_the_same_next_prompts():
    config = SamplerConfig(seed=11, filter_solved=True, history=1, max_skips=2)
    stages = [stage(easy=0.5), stage("later", easy=0.2)]

    def play(sampler: PromptSampler, start: int, stop: int) -> list[str]:
        """Deterministic run: every 3rd prompt drawn gets a group without signal, which the filter uses."""
        ids = []
        for round_index in range(start, stop):
            current = 0 if round_index < 6 else 1
            batch = sampler.draw(stage=current, count=16)
            for k, prompt_id in enumerate(batch):
                rewards = [1.0] * 4 if k % 3 == 0 else [1.0, 0.0, 0.0, 0.0]
                sampler.record_outcome(prompt_id, rewards, stage=current)
            ids += batch
        return ids

    whole = PromptSampler(prompts=table(), stages=stages, config=config)
    expected = play(whole, 0, 12)

    first = PromptSampler(prompts=table(), stages=stages, config=config)
    got = play(first, 0, 4)
    state = json.loads(json.dumps(first.state_dict()))  # as it would come back from a checkpoint
    second = PromptSampler(prompts=table(), stages=stages, config=config)
    second.load_state_dict(state)
    got += play(second, 4, 12)

    assert got == expected
    assert second.state_dict() == whole.state_dict()
    assert whole.metrics()[METRIC_SKIPPED_TOTAL] > 0  # the filter took part in the run


def test_resume_over_another_table_or_config_is_refused():
    sampler = PromptSampler(prompts=table(), stages=[stage()], config=SamplerConfig(seed=1))
    sampler.draw(stage=0, count=3)
    state = sampler.state_dict()
    other_table = PromptSampler(prompts=table()[:-1], stages=[stage()], config=SamplerConfig(seed=1))
    with pytest.raises(ValueError, match="prompt table"):
        other_table.load_state_dict(state)
    other_seed = PromptSampler(prompts=table(), stages=[stage()], config=SamplerConfig(seed=2))
    with pytest.raises(ValueError, match="seed"):
        other_seed.load_state_dict(state)


def four_prompt_sampler(**config) -> PromptSampler:
    rows = [PromptMeta(id=name, task="camo", difficulty="easy") for name in "abcd"]
    return PromptSampler(
        prompts=rows,
        stages=[stage(easy=1.0), stage("next", easy=1.0)],
        config=SamplerConfig(filter_solved=True, **config),
    )


def test_filter_skips_all_solved_and_none_solved_then_releases_them():
    sampler = four_prompt_sampler(history=2, max_skips=3)
    assert sorted(sampler.draw(stage=0, count=4)) == ["a", "b", "c", "d"]  # epoch 0
    for _ in range(2):
        sampler.record_outcome("a", [3.0, 3.0, 3.0, 3.0], stage=0)  # all solved: no signal
        sampler.record_outcome("b", [0.0, 0.0, 0.0, 0.0], stage=0)  # all failed: no signal
        sampler.record_outcome("c", [1.0, 2.0, 1.0, 2.0], stage=0)  # every format right, yet a signal
    sampler.record_outcome("d", [1.0, 1.0, 1.0, 1.0], stage=0)  # no signal once: history not full yet
    assert sampler.metrics()[METRIC_FILTERED_PROMPTS] == 2

    # Epochs 1-3 yield only c and d: a and b are passed over each time their turn comes.
    assert Counter(sampler.draw(stage=0, count=6)) == {"c": 3, "d": 3}
    # (The 6th draw may end epoch 3 before a and b come up; the next draw passes over them then.)
    assert 4 <= sampler.metrics()[METRIC_SKIPPED_TOTAL] <= 6
    assert sampler.metrics()[METRIC_RELEASED_TOTAL] == 0

    # Epoch 4: a and b were passed over max_skips = 3 times in a row, so the starvation cap issues
    # them again and forgets their history.
    assert sorted(sampler.draw(stage=0, count=4)) == ["a", "b", "c", "d"]
    metrics = sampler.metrics()
    assert metrics[METRIC_SKIPPED_TOTAL] == 6
    assert metrics[METRIC_RELEASED_TOTAL] == 2
    assert metrics[METRIC_FILTERED_PROMPTS] == 0


def test_a_mixed_outcome_unskips_a_prompt():
    sampler = four_prompt_sampler(history=2, max_skips=100)
    sampler.draw(stage=0, count=4)
    sampler.record_outcome("a", [1.0, 1.0], stage=0)
    sampler.record_outcome("a", [1.0, 1.0], stage=0)
    assert "a" not in sampler.draw(stage=0, count=3)
    sampler.record_outcome("a", [1.0, 0.0], stage=0)  # the newest of the last 2 groups had signal
    assert Counter(sampler.draw(stage=0, count=4))["a"] == 1


def test_stage_change_clears_the_filter_and_stale_outcomes_are_ignored():
    sampler = four_prompt_sampler(history=1, max_skips=100)
    sampler.draw(stage=0, count=4)
    sampler.record_outcome("a", [1.0, 1.0], stage=0)
    assert "a" not in sampler.draw(stage=0, count=3)
    # Stage 1 rewards differently: what was solved before may not be now.
    assert sorted(sampler.draw(stage=1, count=4)) == ["a", "b", "c", "d"]
    sampler.record_outcome("b", [0.0, 0.0], stage=0)  # a late group from stage 0
    sampler.record_outcome("zzz", [0.0, 0.0], stage=1)  # unknown id
    sampler.record_outcome("c", [], stage=1)  # empty group
    sampler.record_outcome("d", [float("nan"), 1.0], stage=1)  # corrupt reward
    sampler.record_outcome("d", ["x", None], stage=1)  # not numbers
    assert sampler.metrics()[METRIC_IGNORED_OUTCOMES_TOTAL] == 5
    assert sampler.metrics()[METRIC_FILTERED_PROMPTS] == 0


def test_outcomes_do_nothing_when_filtering_is_off():
    rows = [PromptMeta(id=name, task="camo", difficulty="easy") for name in "ab"]
    sampler = PromptSampler(prompts=rows, stages=[stage(easy=1.0)], config=SamplerConfig())
    sampler.draw(stage=0, count=2)
    sampler.record_outcome("a", [1.0, 1.0], stage=0)
    assert sorted(sampler.draw(stage=0, count=2)) == ["a", "b"]


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([stage("needs_hard", easy=0.8)], "'needs_hard'.*'hard'"),
        ([stage(easy=1.0), stage("grounding", tasks=("ground",), easy=1.0)], "'grounding'.*ground"),
    ],
)
def test_a_stage_selecting_no_prompt_fails_at_construction_naming_it(stages, message):
    rows = [PromptMeta(id=f"p{i}", task="camo", difficulty="easy") for i in range(5)]
    with pytest.raises(ValueError, match=message):
        PromptSampler(prompts=rows, stages=stages, config=SamplerConfig())


def test_a_zero_weight_difficulty_needs_no_prompts():
    rows = [PromptMeta(id=f"p{i}", task="camo", difficulty="easy") for i in range(5)]
    sampler = PromptSampler(prompts=rows, stages=[stage(easy=1.0)], config=SamplerConfig())
    assert len(sampler.draw(stage=0, count=7)) == 7


def test_corrupt_metadata_rows_are_counted_and_dropped():
    rows = [
        PromptMeta(id="ok", task="camo", difficulty="easy"),
        PromptMeta(id="bad_task", task="segment", difficulty="easy"),
        PromptMeta(id="bad_difficulty", task="camo", difficulty="medium"),
        PromptMeta(id="ok", task="detect", difficulty="easy"),  # repeated id
    ]
    sampler = PromptSampler(prompts=rows, stages=[stage(easy=1.0)], config=SamplerConfig())
    assert sampler.draw(stage=0, count=3) == ["ok", "ok", "ok"]
    assert sampler.metrics()[METRIC_INVALID_PROMPTS] == 3
