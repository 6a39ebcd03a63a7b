"""The names of every column drift-stream adds to rows: one module, imported by scoring, the run directory, refine,
report, export and the `datasets` integration (schemas/scored_columns.schema.json describes the scored ones; the
test of that schema checks it against SCORE_COLUMNS).

Column names starting with `drift_` are reserved: an input column with such a name is left out of a row's content hash.
"""

from __future__ import annotations

RESERVED_PREFIX = "drift_"

ID = "id"  # stable row id, always text: the input's own id as text, else a content hash (data/formats.py)
SOURCE_ID = "drift_source_id"  # an input id column that was not text, kept with its type (data/formats.py)

# scored rows (scoring/): per row
SCORE = "drift_score"  # S(z), float32
GRAD_NORM = "drift_grad_norm"  # ||u(z)||, float32
NUM_TOKENS = "drift_num_tokens"  # loss tokens of the row, int32
LOSS = "drift_loss"  # mean NLL of the loss tokens, float32
QUERY_SCORES = "drift_query_scores"  # list<float32>, one per bank query (--keep-query-scores)
REJECT_REASON = "drift_reject_reason"  # why a row was set aside (rejects/ shards; null on scored rows)
# per assistant turn, in conversation order (--granularity turn only; a text or prompt+completion row is one turn)
TURN_SCORES = "drift_turn_scores"  # list<float32>: each turn's own score (loss masked to it); null: weight-0 turn
TURN_INPUT_WEIGHTS = "drift_turn_input_weights"  # list<float32>: each turn's input `weight` / `loss_weight` (else 1)
SCORE_COLUMNS = (SCORE, GRAD_NORM, NUM_TOKENS, LOSS, QUERY_SCORES, TURN_SCORES, TURN_INPUT_WEIGHTS, REJECT_REASON)

# rejected rows (run directory rejects/ shards): besides the input columns, ID and REJECT_REASON
ROW_INDEX = "drift_row_index"  # position of the row (jsonl: line number) in its input file
RAW_LINE = "drift_raw_line"  # the undecodable line as text; null for rows the scorer rejected

# refined rows (refine/)
WEIGHT = "weight"  # float32, mean 1 over kept rows (policy weights) or copies' weight
KEEP = "keep"  # bool (filter policies with --keep-all)
# refined rows, granularity turn (refine/turns.py): one entry per assistant turn, as TURN_SCORES
TURN_KEEP = "turn_keep"  # list<bool>: the filter policy kept the turn (KEEP: any turn kept)
TURN_WEIGHTS = "turn_weights"  # list<float32>: the turn's policy weight, mean 1 over scored turns (0: unscored turn)
