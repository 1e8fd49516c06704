# dev_sft: fine-tune the dev model to chat, on the primer + dolly-15k + oasst1 (downloaded, ~50 MB);
# about 15 minutes on 2 CPU cores. Run after config/dev.py:  python train.py config/dev_sft.py
include('dev.py')
phase = 'sft'
sources.update({
    'dolly': {'kind': 'dolly'},
    'oasst1': {'kind': 'oasst1'},
})
init_from = '{out_dir}/pretrain/best.pt'  # ({out_dir} is filled in at the end: it follows --out_dir)
# only chat sources: masked loss on the replies. ~2.4M tokens read: a fraction of an epoch of dolly-15k and of
# oasst1, the primer (~11k tokens) ~13 times (max_epochs 16)
mixture = {'primer': 0.06, 'dolly': 0.47, 'oasst1': 0.47}
max_iters = 300
# fine-tuning stays on AdamW + cosine (dev.py's Muon + WSD was measured for pretraining only)
optimizer = 'adamw'
lr_schedule = 'cosine'
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 20
eval_interval = 50
system = include_text('mara_system.txt')  # the voice of the primer's dialogues, shared by the profiles
