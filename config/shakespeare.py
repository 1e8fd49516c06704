# shakespeare: the first thing a nanoGPT user runs, ours. Tiny Shakespeare (downloaded, 1 MB), the last 10% of
# the file held out; 150 seconds of training on 2 CPU cores, then val bits per byte on that last 10%.
#   ./run.sh shakespeare
#   python eval.py config/shakespeare.py --text_file=<the last 10% of input.txt>      (the same figure)
# Every setting below was chosen by measurement for that budget (BENCHMARKS.md, "Muon and WSD").
out_dir = 'out/shakespeare'
sources = {'tinyshakespeare': {'kind': 'tinyshakespeare'}}   # add 'path': '.../input.txt' to use a local copy
mixture = {'tinyshakespeare': 1.0}
vocab_size = 2048

n_layer = 4
n_head = 4
n_embd = 256
block_size = 128
batch_size = 32
dropout = 0.0     # a bit over one pass over the text in 150 s: nothing to regularise yet
compile = False   # on this CPU compiling costs ~30 s of the budget and wins ~6% a step afterwards

optimizer = 'muon'
muon_lr = 0.02
learning_rate = 2e-3   # AdamW's, for the embedding/head and the norms
min_lr = 2e-4
lr_schedule = 'wsd'
warmup_iters = 20
max_iters = 125
eval_interval = 25
eval_iters = 10
log_interval = 25

ckpt = 'out/shakespeare/pretrain/ckpt.pt'   # eval.py and sample.py use the final weights
