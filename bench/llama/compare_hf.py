"""By-hand check of the engine against Hugging Face transformers (an implementation nobody here wrote).

transformers loads the same GGUF with its own GGUF reader and dequantizer (`gguf_file=`), runs its Llama on CPU
in float32, and we compare the logits at the last prompt position with the engine's `--logits-out`, plus
greedy continuations. Needs torch, transformers and gguf importable (e.g. PYTHONPATH=<pip --target dir>).

    python3 bench/llama/compare_hf.py --model .deps/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --engine target/release/examples/tp_llama --tp 2
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--engine", required=True)
ap.add_argument("--tp", default="2")
ap.add_argument("--pp", default="1")
ap.add_argument("--prompt", default="The capital of France is")
ap.add_argument("--new", type=int, default=16)
a = ap.parse_args()

d, f = os.path.split(os.path.abspath(a.model))
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
model.eval()
ids = tok(a.prompt, return_tensors="pt").input_ids
with torch.no_grad():
    hf_logits = model(ids).logits[0, -1].double()
    hf_gen = model.generate(ids, max_new_tokens=a.new, do_sample=False)[0, ids.shape[1]:].tolist()

with tempfile.TemporaryDirectory() as t:
    lp = os.path.join(t, "logits.json")
    cmd = [a.engine, "--model", a.model, "--prompt-ids", ",".join(map(str, ids[0].tolist())), "--max-new-tokens",
           str(a.new), "--ignore-eos", "--json", "--logits-out", lp, "--tp", a.tp, "--pp", a.pp]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    res = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
    ours = torch.tensor(json.load(open(lp)), dtype=torch.float64)

rel = (ours - hf_logits).abs().max().item() / hf_logits.abs().max().item()
print(json.dumps({
    "prompt_ids": ids[0].tolist(),
    "max_abs_logit": hf_logits.abs().max().item(),
    "max_rel_err_vs_transformers": rel,
    "argmax_same": int(ours.argmax()) == int(hf_logits.argmax()),
    "greedy_same": res["generated_ids"] == hf_gen,
    "engine_tokens": res["generated_ids"],
    "transformers_tokens": hf_gen,
    "engine_text": res["text"],
    "transformers_text": tok.decode(hf_gen),
}, indent=1))
sys.exit(0 if rel < 1e-3 and res["generated_ids"] == hf_gen else 1)
