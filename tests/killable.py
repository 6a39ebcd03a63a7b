"""A scoring subprocess slow enough to be killed part-way (SIGKILL resume tests, local and S3).

argv: DATA_URL OUT_URL MODEL_DIR. With no storage_options, an S3 endpoint and credentials come from AWS_* only.
"""

KILLABLE_RUN = """
import sys, time
from drift_stream.engines.local import RunConfig, run_score
from drift_stream.scoring.build import build_scorer

inner = build_scorer("random", model=sys.argv[3], adapter="messages")

class SlowScorer:  # same rows and config as `inner`, slow enough to be killed part-way
    def __call__(self, table):
        time.sleep(0.15)
        return inner(table)

    def config_dict(self):
        return inner.config_dict()

run_score(RunConfig(data=(sys.argv[1],), out=sys.argv[2], batch_rows=10), SlowScorer(), progress=False)
"""
