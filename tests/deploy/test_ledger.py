"""The group ledger: every issued group settles exactly once."""

import pytest

from deploy.ledger import DROP_BAD_PROMPT, DROP_NO_SIGNAL, DROP_SHUTDOWN, GroupLedger, LedgerError


def test_lifecycle_reconciles():
    ledger = GroupLedger()
    for gid in ("a#1", "b#2", "c#3", "d#4"):
        ledger.issue(gid)
    ledger.generate("a#1")
    ledger.generate("b#2")
    ledger.train("a#1")
    ledger.drop("b#2", DROP_NO_SIGNAL)
    ledger.drop("c#3", DROP_BAD_PROMPT)  # never generated: its image did not decode
    assert ledger.open == {"d#4"}
    assert ledger.reconciles()
    ledger.drop("d#4", DROP_SHUTDOWN)
    assert ledger.summary() == {
        "issued": 4, "generated": 2, "trained": 1,
        "dropped": {"no_signal": 1, "bad_prompt": 1, "shutdown": 1}, "open": 0, "reissued": 0,
    }


@pytest.mark.parametrize(
    "moves, message",
    [
        ([("issue", "a"), ("issue", "a")], "issued twice"),
        ([("generate", "a")], "never issued"),
        ([("issue", "a"), ("train", "a")], "never generated"),
        ([("issue", "a"), ("generate", "a"), ("generate", "a")], "generated twice"),
        ([("issue", "a"), ("generate", "a"), ("train", "a"), ("train", "a")], "settled twice"),
        ([("issue", "a"), ("generate", "a"), ("train", "a"), ("drop", "a")], "settled twice"),
        ([("issue", "a"), ("generate", "a"), ("reissue", "a")], "after it was generated"),
        # a group dropped before it was generated ends there: it neither comes back nor is generated
        ([("issue", "a"), ("drop_bad_prompt", "a"), ("reissue", "a")], r"moved after it was settled \(bad_prompt\)"),
        ([("issue", "a"), ("drop_shutdown", "a"), ("generate", "a")], r"moved after it was settled \(shutdown\)"),
    ],
)
def test_double_counting_is_an_error(moves, message):
    ledger = GroupLedger()
    with pytest.raises(LedgerError, match=message):
        for move, gid in moves:
            if move == "drop":
                ledger.drop(gid, DROP_NO_SIGNAL)
            elif move.startswith("drop_"):
                ledger.drop(gid, {"drop_bad_prompt": DROP_BAD_PROMPT, "drop_shutdown": DROP_SHUTDOWN}[move])
            else:
                getattr(ledger, move)(gid)


def test_reissue_after_worker_death_is_counted_not_duplicated():
    ledger = GroupLedger()
    ledger.issue("a#1")
    ledger.reissue("a#1")
    ledger.generate("a#1")
    ledger.train("a#1")
    assert ledger.summary()["reissued"] == 1 and ledger.summary()["trained"] == 1
    assert ledger.reconciles()
