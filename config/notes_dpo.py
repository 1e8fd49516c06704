# notes_dpo: DPO after config/notes.py's SFT: push the notes model toward its primer's replies and away
# from what it says now (preference pairs, train.py's DPO phase; README.md, "Preference tuning").
#   python pairs.py config/notes.py         the primer's replies against the SFT model's own -> out/notes/pairs.jsonl
#   python prepare.py config/notes_dpo.py   the pairs, the notes in front of each message as in chat
#   python train.py config/notes_dpo.py     DPO from out/notes/sft/best.pt -> out/notes/dpo/
#   python eval.py config/notes_dpo.py --questions=data/sample/questions.jsonl
#   python sample.py config/notes_dpo.py --interactive
include('notes.py')
sources['pairs'] = {'kind': 'pairs', 'path': '{out_dir}/pairs.jsonl'}  # (pairs.py wrote it there)
phase = 'dpo'
init_from = '{out_dir}/sft/best.pt'
mixture = {'pairs': 1.0}
dpo_beta = 0.1
# DPO alone learnt from these pairs that longer replies win (the primer's are longer than the model's in 97 of
# 155) and stopped ending them: 4x the words, the primer's val loss per token 2.74 -> 2.92. SFT's loss on the
# chosen replies beside it (RPO) keeps them (9.6 words against 6.9, 2.75) and reaches 85% held-out reward
# accuracy against DPO's 70% (BENCHMARKS.md, "Preference tuning")
dpo_sft_weight = 1.0
# one pass over the ~136 train pairs (a pair with the notes is ~860 tokens: one a row of 1,024), ~20 s a step
# on 2 CPU cores (the reference's forward pass on top of SFT's step)
max_iters = 34
learning_rate = 2e-5
min_lr = 2e-6
warmup_iters = 3
eval_interval = 17
