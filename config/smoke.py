# smoke: the whole pipeline on the built-in sample in seconds on a CPU, to check an install or a change.
#   ./run.sh smoke
out_dir = 'out/smoke'
sources = {
    'roam': {'kind': 'roam', 'path': 'data/sample/roam'},
    'primer': {'kind': 'primer', 'path': 'data/sample/primer.txt'},
}
vocab_size = 512
n_layer = 2
n_head = 2
n_embd = 64
block_size = 64
batch_size = 8
eval_iters = 2
log_interval = 10
warmup_iters = 5
max_new_tokens = 30
if phase == 'pretrain':
    mixture = {'roam': 0.5, 'primer': 0.5}
    max_iters = 30
    eval_interval = 15
else:
    init_from = '{out_dir}/pretrain/ckpt.pt'  # ({out_dir} is filled in at the end: it follows --out_dir)
    mixture = {'primer': 1.0}
    max_iters = 20
    eval_interval = 10
