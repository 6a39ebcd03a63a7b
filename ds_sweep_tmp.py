# temporary sweep (drift-stream tiny model recipe); deleted after use
import os, sys, time, json, subprocess
from decimal import Decimal
if len(sys.argv) == 1:
    configs = [
        ("A", 128, 384, 4, 2e-3, 1600), ("B", 128, 384, 4, 1e-3, 1600), ("C", 192, 512, 4, 1e-3, 1600),
        ("D", 128, 384, 4, 2e-3, 800), ("E", 128, 384, 4, 3e-3, 1600), ("F", 96, 256, 3, 3e-3, 1600),
        ("G", 192, 512, 4, 2e-3, 800),
    ]
    out = os.environ["OUT"]
    procs = [subprocess.Popen([sys.executable, __file__] + [str(x) for x in c], stdout=open(f"{out}/{c[0]}.log", "w"), stderr=subprocess.STDOUT) for c in configs]
    for p in procs: p.wait()
    for c in configs: print(open(f"{out}/{c[0]}.log").read())
    sys.exit(0)
import torch
torch.set_num_threads(2)
import pyarrow.parquet as pq
from drift_stream.testing import make_char_tokenizer, make_tiny_model
from drift_stream.integrations.trainers import train_sft, encode_rows, greedy_accuracy
name, hidden, inter, layers, lr, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
def ext(t):
    return t.rsplit("####", 1)[1].strip() if t and "####" in t else None
def score(resp, q):
    a = ext(resp)
    try: return float(a is not None and Decimal(a) == Decimal(q["answer"]))
    except Exception: return 0.0
tok = make_char_tokenizer()
d = "drift_stream/assets/demo/"
pool = pq.read_table(d + "pool.parquet").to_pylist(); queries = pq.read_table(d + "queries.parquet").to_pylist(); test = pq.read_table(d + "test.parquet").to_pylist()
ex = encode_rows(tok, pool)
m = make_tiny_model("llama", vocab_size=len(tok), hidden_size=hidden, num_layers=layers, num_heads=4, intermediate_size=inter, max_positions=256, seed=0)
print(name, sys.argv[2:], "params", sum(p.numel() for p in m.parameters()), flush=True)
t0 = time.time()
def on_step(step, loss):
    if (step + 1) % 200 == 0:
        a = greedy_accuracy(m, tok, queries, score_fn=score); b = greedy_accuracy(m, tok, test, score_fn=score)
        print(name, step + 1, round(time.time() - t0), f"loss {loss:.3f}", "val", round(a.accuracy, 3), {k: round(v, 2) for k, v in a.per_task.items()}, "test", {k: round(v, 2) for k, v in b.per_task.items()}, flush=True)
train_sft(m, tok, ex, steps=steps, batch_size=32, lr=lr, seed=0, warmup_steps=100, on_step=on_step)
