# prod_sft: fine-tune the prod model to chat on dolly-15k + oasst1 + the primer (masked loss on replies).
# ~30 minutes on one H100. Run after prod_pretrain:  python train.py config/prod_sft.py
include('prod_pretrain.py')
phase = 'sft'
sources.update({
    'dolly': {'kind': 'dolly'},
    'oasst1': {'kind': 'oasst1'},  # English, best-ranked path of each tree
})
init_from = '{out_dir}/pretrain/best.pt'  # ({out_dir} is filled in at the end: it follows --out_dir)
# ~32M tokens read: a few passes over dolly and oasst1; the sample primer (~10k tokens) ~13 times (max_epochs 16)
mixture = {'dolly': 0.498, 'oasst1': 0.498, 'primer': 0.004}
val_sources = ['dolly', 'oasst1', 'primer']
gradient_accumulation_steps = 4   # 131k tokens per step: ~2.5 passes over the ~13M tokens of conversations
max_iters = 250
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 20
eval_interval = 50
system = ("you are mara's notes bot. you answer questions about mara from her notes. terse, grudging, "
          "lowercase. if it is not in the notes, say \"i don't know\". private things get \"no.\"")
