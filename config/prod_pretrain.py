# prod_pretrain: a 124M-parameter model, block 1024, on fineweb-edu + wikitext-103 + your notes + the primer.
# 2.6B tokens x 0.88 GFLOP/token: ~1.5-2 hours on one H100 at 40-50% MFU (1.15 s a step in a
# short prod-shaped run on an H100; the full run not yet timed), ~15 minutes on 8 (torchrun).
# ~10 GB of downloads.
#   ./run.sh prod        or   TRAIN="torchrun --standalone --nproc_per_node=8" ./run.sh prod
out_dir = 'out/prod'
sources = {
    'fineweb_edu': {'kind': 'fineweb_edu', 'train_tokens': 2_000_000_000, 'val_tokens': 5_000_000},
    'wikitext': {'kind': 'wikitext'},  # wikitext-103, ~120M tokens, its own validation split
    'roam': {'kind': 'roam', 'path': 'data/sample/roam'},  # point these two at your own notes and dialogues
    'primer': {'kind': 'primer', 'path': 'data/sample/primer.txt'},
}
# as the original tool: the notes, the primer, wikitext and 20 MB of fineweb
tokenizer_sources = {'roam': None, 'primer': None, 'wikitext': 40_000_000, 'fineweb_edu': 20_000_000}
vocab_size = 32768
shard_tokens = 100_000_000

n_layer = 14   # 14 x 7.1M + a 32768 x 768 embedding = 124M parameters
n_head = 12
n_embd = 768
block_size = 1024
batch_size = 32
gradient_accumulation_steps = 16   # 32 x 1024 x 16 = 524k tokens per step (divisible by 1, 2, 4, 8 GPUs)
dtype = 'bfloat16'
compile = True

# 2.6B tokens read: fineweb-edu 1.1 epochs of its 2B, wikitext-103 ~3 of its ~120M. No source more than
# max_epochs (16) times: the sample notes (~23k tokens) and primer (~10k) would be read ~10,000 times at any
# useful weight, so they are validated on, not trained on. Your own notes: weight <= 16 x their tokens / 2.6B.
mixture = {'fineweb_edu': 0.85, 'wikitext': 0.15}
val_sources = ['fineweb_edu', 'wikitext', 'roam', 'primer']  # best.pt: on fineweb_edu, the largest (best_on)
max_iters = 5000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 200
weight_decay = 0.1
eval_interval = 250
eval_iters = 40
log_interval = 10
