# demo: the built-in sample (data/sample: a Roam export and a primer of dialogues), both phases; ~4
# minutes on 2 CPU cores for ./run.sh demo (README.md: the machine).
#   ./run.sh demo   (or by hand:)
#   python tokenizer.py config/demo.py && python prepare.py config/demo.py
# python train.py config/demo.py pretrain on notes + dialogues -> out/demo/pretrain/
#   python train.py config/demo.py --phase=sft      fine-tune on the dialogues      -> out/demo/sft/
#   python sample.py config/demo.py --phase=sft --interactive
out_dir = 'out/demo'
sources = {
    'roam': {'kind': 'roam', 'path': 'data/sample/roam'},
    'primer': {'kind': 'primer', 'path': 'data/sample/primer.txt'},
}
vocab_size = 2048

# a 3.5M-parameter model: small enough to learn the sample by heart in a minute on a laptop CPU
n_layer = 4
n_head = 4
n_embd = 256
block_size = 128
batch_size = 16
# the demo learns a ~30k-token sample by heart on purpose (so it can chat about mara): ~30 passes is
# the point
max_epochs = 40

# the system line the primer's dialogues use, so chat sounds like them
# the voice of the primer's dialogues, shared by the profiles
system = include_text('mara_system.txt')
# the demo samples a few hundred tokens per command: compiling the decode step (~14 s a process on 2
# cores) would cost more than it saves at this model's ~200 tokens/s eager
compile_decode = False

if phase == 'pretrain':
    mixture = {'roam': 0.6, 'primer': 0.4}
    max_iters = 400
    # Muon + WSD: held-out notes at 2.05 bits per byte (step 100) against AdamW + cosine's 2.09
    # (step 150), and lower at equal seconds too, though a Muon step costs ~40% more here
    # (BENCHMARKS.md, "Muon + WSD against AdamW + cosine")
    optimizer = 'muon'
    lr_schedule = 'wsd'
    decay_frac = 0.4
    muon_lr = 0.03
    learning_rate = 2e-3   # AdamW's, for the embedding/head and the norms
    min_lr = 2e-4
    warmup_iters = 20
    eval_interval = 100
    eval_iters = 10
    log_interval = 25
# sft (or lora): only chat sources in the mixture, so the loss is on the assistant replies only
else:
    # {out_dir} is filled in once every file and --out_dir are read: these paths follow --out_dir
    # the end of pretraining (best.pt may be an earlier, less fluent step)
    init_from = '{out_dir}/pretrain/ckpt.pt'
    mixture = {'primer': 1.0}
    max_iters = 150
    learning_rate = 5e-4
    min_lr = 5e-5
    warmup_iters = 10
    eval_interval = 50
    eval_iters = 10
    log_interval = 25
    # 123 dialogues are too few to generalise from: validation loss rises as soon as the model
    # starts to learn them by heart, so best.pt would be the untuned model.
# sample.py and eval.py load the final weights of each phase (ckpt.pt), the ones SFT starts from and
# the demo chats with: the demo learns its sample by heart on purpose, so best.pt (the lowest val
# loss) is an early step of each phase (train.py's last lines say so)
ckpt = '{out_dir}/{phase}/ckpt.pt'
