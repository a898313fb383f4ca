"""Verifiable rewards for visual perception: pure functions, no other package of ours imported.

parse (completion text → typed answer or failure reason), frames (the one place boxes change
coordinate frames), iou / category / presence / format / overlong (one reward each), compose
(the batch pipeline and weighted totals), config (RewardConfig), score_file (JSONL scoring).
"""
