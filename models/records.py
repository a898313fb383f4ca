"""The files that record how a model directory was made.

Each describes its own directory only. A model written from that directory (a learner checkpoint, an SFT
snapshot, a weight average) does not copy them: an RL checkpoint copied from an averaged SFT would claim to be
that average, and one copied from the built default would pass for a build that ``refocus model build`` may
replace.
"""

BUILD_INFO_FILE = "refocus_build.json"  # how a builtin directory was built: a changed recipe rebuilds it
WARM_START_FILE = "warm_start.json"  # the warm start's last losses and held-out diagnostics
AVERAGED_FROM_FILE = "averaged_from.json"  # the directories a weight average was made of (written last)
PROVENANCE_FILES = (BUILD_INFO_FILE, WARM_START_FILE, AVERAGED_FROM_FILE)
