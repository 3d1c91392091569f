#!/usr/bin/env bash
# bench/sharded_resume_check.sh [WORKDIR]: sharded GRPO on 2 gloo processes: killed with SIGKILL (the whole launch) after its first checkpoint, resumed,
# against the same run uninterrupted
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 RLHFLAB_THREADS=1
PY=.venv/bin/python
W="${1:-$(mktemp -d)}"; rm -rf "$W"; mkdir -p "$W"
$PY -m rlhflab.cli sft --config configs/tiny.yaml --out $W/sft > $W/sft.log 2>&1
SETS="--set rl.sharding=fsdp2 --set rl.steps=8 --set rl.save_every=2 --set rl.batch_size=16 --set rl.eval_every=0"
launch() { $PY -m torch.distributed.run --nproc_per_node 2 --master_port $1 -m rlhflab.cli grpo --config configs/tiny.yaml --sft $W/sft --reward-fn gold --out $2 $SETS ${3:-}; }
launch 29701 $W/whole > $W/whole.log 2>&1; echo "uninterrupted rc $?"
launch 29702 $W/cut > $W/cut.log 2>&1 &
for i in $(seq 1 3000); do [ -f $W/cut/checkpoint/state.json ] && break; sleep 0.05; done
pkill -9 -f -- "--out $W/cut"; sleep 1
while pgrep -f -- "--out $W/cut" > /dev/null; do pkill -9 -f -- "--out $W/cut"; sleep 0.5; done
echo "killed (no process of it left) at checkpoint step: $(python3 -c "import json;print(json.load(open('$W/cut/checkpoint/state.json'))['step'])")"
$PY -m torch.distributed.run --nproc_per_node 2 --master_port 29703 -m rlhflab.cli grpo --resume $W/cut > $W/resume.log 2>&1; echo "resumed rc $?"; grep "rlhflab grpo" $W/resume.log | tail -2
python3 - <<PY
import json
a=[json.loads(x) for x in open("$W/whole/metrics.jsonl")]; b=[json.loads(x) for x in open("$W/cut/metrics.jsonl")]
keys=lambda r:{k:v for k,v in r.items() if not k.startswith("time/") and "seconds" not in k}
last_a={r["step"]:keys(r) for r in a}; last_b={r["step"]:keys(r) for r in b}
print("steps", sorted(last_a)==sorted(last_b), "identical rows", all(last_a[s]==last_b[s] for s in last_a))
PY
cmp $W/whole/model/model.safetensors $W/cut/model/model.safetensors && echo "model files identical"
