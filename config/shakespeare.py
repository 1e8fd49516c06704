# shakespeare: the first thing a nanoGPT user runs, ours. Tiny Shakespeare (downloaded, 1 MB), the
# last 10% of the file held out; 150 seconds of training (max_minutes: a faster machine takes more
# steps in them), then val bits per byte on that last 10%.
#   ./run.sh shakespeare
# python eval.py config/shakespeare.py --text_file=<the last 10% of input.txt> (the same figure)
# Every setting below was chosen by measurement for that budget (BENCHMARKS.md, "Muon + WSD against
# AdamW + cosine" and "CPU efficiency, time budgets").
out_dir = 'out/shakespeare'
# separator=None: train and val are each one stream, as nanoGPT reads the file. Split into speeches
# (separator='\n\n') each speech is a document that starts with <s>; pretraining windows still span
# several (no row has a document mask outside SFT), but the val windows then hold more <s> targets
# and the val text is cut differently, so that run's 2.38 bits per byte (BENCHMARKS.md) is not a
# like-for-like comparison. Add 'path': '.../input.txt' for a local copy.
sources = {'tinyshakespeare': {'kind': 'tinyshakespeare', 'separator': None}}
mixture = {'tinyshakespeare': 1.0}
# ~4-5 passes over the text in 150 s: read in epochs (each window once a pass, shuffled), every token
# is learnt as often as any other; random windows read some 10 times and others once or never, and
# overfit where they read most (2.06-2.08 bits per byte against 2.12-2.13 in 150 s, BENCHMARKS.md)
data_order = 'epochs'
# The tokenizer learns from the first ~89% of the file only (sources are read in file order, train
# part first): val text must not shape the vocabulary the val figure is measured with.
tokenizer_sources = {'tinyshakespeare': 990_000}
# 1 MB of text is learned past one pass in 150 s: 1,024 pieces beat 2,048 and 4,096 (sparser rows of
# the embedding, learned from fewer examples each) and 512 (more tokens per byte) (BENCHMARKS.md)
vocab_size = 1024

n_layer = 4
n_head = 3
n_embd = 192     # narrower and more steps beat 256 wide in the same 150 s (BENCHMARKS.md)
block_size = 128
batch_size = 24
# ~5 passes over the text in 150 s: it overfits, but dropout costs more steps than it saves (0.1:
# +0.01-0.03 bits per byte); weight decay on Muon's matrices regularises for free (below)
dropout = 0.0
# with fast bf16: ~25 s to compile, then ~1.5x the steps of eager in the rest. In float32 (a CPU
# without fast bf16) compiling wins ~7% a step, less than it costs: --compile=False there
compile = True

optimizer = 'muon'
muon_lr = 0.02
muon_weight_decay = 0.2
learning_rate = 3e-3   # AdamW's, for the embedding/head and the norms
min_lr = 3e-5          # (the floor of both: Muon's ends at 0.02 * 3e-5 / 3e-3)
lr_schedule = 'wsd'
decay_frac = 0.4
warmup_iters = 10
max_minutes = 2.5  # the steps are what fits (~600 on 2 Xeon cores); the schedule follows the clock
eval_interval = 1000   # evaluations are part of the budget: the final one only
eval_iters = 10
log_interval = 50

# eval.py and sample.py use the final weights (follows --out_dir)
ckpt = '{out_dir}/pretrain/ckpt.pt'
