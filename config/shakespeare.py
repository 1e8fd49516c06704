# shakespeare: the first thing a nanoGPT user runs, ours. Tiny Shakespeare (downloaded, 1 MB), the
# last 10% of the file held out; 150 seconds of training on 2 CPU cores, then val bits per byte on
# that last 10%.
#   ./run.sh shakespeare
# python eval.py config/shakespeare.py --text_file=<the last 10% of input.txt> (the same figure)
# Every setting below was chosen by measurement for that budget (BENCHMARKS.md, "Muon and WSD").
out_dir = 'out/shakespeare'
# separator=None: train and val are each one stream, as nanoGPT reads the file. Split into speeches
# (separator='\n\n') each speech is a document that starts with <s>; pretraining windows still span
# several (no row has a document mask outside SFT), but the val windows then hold more <s> targets
# and the val text is cut differently, so that run's 2.38 bits per byte (BENCHMARKS.md) is not a
# like-for-like comparison. Add 'path': '.../input.txt' for a local copy.
sources = {'tinyshakespeare': {'kind': 'tinyshakespeare', 'separator': None}}
mixture = {'tinyshakespeare': 1.0}
# The tokenizer learns from the first ~89% of the file only (sources are read in file order, train
# part first): val text must not shape the vocabulary the val figure is measured with.
tokenizer_sources = {'tinyshakespeare': 990_000}
vocab_size = 4096

n_layer = 4
n_head = 3
n_embd = 192     # narrower and more steps beat 256 wide in the same 150 s (BENCHMARKS.md)
block_size = 128
batch_size = 24
dropout = 0.0     # under two passes over the text in 150 s: nothing to regularise yet
compile = False   # on this CPU compiling costs ~30 s of the budget and wins ~6% a step afterwards

optimizer = 'muon'
muon_lr = 0.03
learning_rate = 3e-3   # AdamW's, for the embedding/head and the norms
min_lr = 3e-4
lr_schedule = 'wsd'
decay_frac = 0.4
warmup_iters = 10
max_iters = 190
eval_interval = 25
eval_iters = 10
log_interval = 25

# eval.py and sample.py use the final weights (follows --out_dir)
ckpt = '{out_dir}/pretrain/ckpt.pt'
