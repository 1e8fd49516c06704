# dev: a laptop-sized 12M model on Tiny Shakespeare (downloaded, 1 MB) + the sample notes and dialogues;
# about 30 minutes on 2 CPU cores with fast bf16 (AVX512-BF16) + compile (2.6 s a step with AdamW; Muon adds ~17%;
# ~3x that on a CPU without fast bf16, which trains in float32; faster on more cores). Then config/dev_sft.py.
#   ./run.sh dev
out_dir = 'out/dev'
sources = {
    'tinyshakespeare': {'kind': 'tinyshakespeare'},
    'roam': {'kind': 'roam', 'path': 'data/sample/roam'},  # point this at your own Roam export
    'primer': {'kind': 'primer', 'path': 'data/sample/primer.txt'},
}
# named explicitly so that dev_sft.py, which adds sources, keeps the same tokenizer
tokenizer_sources = {'tinyshakespeare': None, 'roam': None, 'primer': None}
vocab_size = 4096

n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.1   # ~14 passes over Tiny Shakespeare: worth it, though it costs ~40% of the speed on a CPU
batch_size = 16
gradient_accumulation_steps = 2
compile = True

# 4.9M tokens read: Tiny Shakespeare (~310k train tokens) ~14 times; the sample notes (~21k) and primer (~11k),
# ~14 times each at these small weights: no source more than max_epochs (16) times. best.pt: on tinyshakespeare.
mixture = {'tinyshakespeare': 0.91, 'roam': 0.06, 'primer': 0.03}
max_iters = 600
# Muon + WSD: in a 150-step run of this profile it reached AdamW + cosine's final 2.26 bits per byte in 0.48x
# the seconds and ended at 2.07 (BENCHMARKS.md, "Muon + WSD"). --optimizer=adamw --lr_schedule=cosine
# --learning_rate=1e-3 --min_lr=1e-4 is the AdamW run it was measured against.
optimizer = 'muon'
lr_schedule = 'wsd'
decay_frac = 0.4
muon_lr = 0.04
learning_rate = 2e-3   # AdamW's, for the embedding/head and the norms
min_lr = 2e-4
warmup_iters = 50
eval_interval = 100
eval_iters = 20
log_interval = 10
