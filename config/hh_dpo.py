# hh_dpo: DPO on Anthropic's HH-RLHF harmless-base pairs (its train split, downloaded: ~14 MB), on
# SmolLM2-135M-Instruct with LoRA adapters: the reference is the same model with its adapters off (no copy).
#   python tokenizer.py config/hh_dpo.py && python prepare.py config/hh_dpo.py && python train.py config/hh_dpo.py
#   python eval.py config/hh_dpo.py          held-out pairs: is the chosen reply the more likely?
# Offline, with a local copy: --sources="{'hh': {'kind': 'hh_rlhf', 'path': 'path/to/harmless-base-test.jsonl.gz'}}"
# and --base_model=<a SmolLM2 .gguf> (README.md, section 7). BENCHMARKS.md, "Preference tuning", has its figures.
out_dir = 'out/hh'
base_model = 'hf:HuggingFaceTB/SmolLM2-135M-Instruct'
sources = {'hh': {'kind': 'hh_rlhf', 'val_frac': 0.1}}
phase = 'dpo'
init_from = 'base_model'
mixture = {'hh': 1.0}
lora_rank = 16
lora_alpha = 32.0
lora_dropout = 0.0
dpo_beta = 0.1
block_size = 512  # a harmless-base pair is ~300 tokens: one or two a row
batch_size = 8
max_iters = 40
learning_rate = 5e-5
min_lr = 5e-6
warmup_iters = 5
eval_interval = 40
eval_iters = 15  # ~150 of the ~230 held-out pairs (a 2,312-pair file's 10%)
log_interval = 5
