"""Regenerates model_reference_smollm2.json: logits of Hugging Face transformers (an implementation nobody in this
project wrote) on the real SmolLM2 GGUF, for llm/tests/model_real.rs to check the f64 reference forward against.

Run by hand (not in CI):
  pip install --target /work/pyref torch transformers gguf numpy
  PYTHONPATH=/work/pyref python3 llm/tests/data/make_model_reference.py .deps/models/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

path = sys.argv[1]
d, f = os.path.split(os.path.abspath(path))
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
model.eval()

texts = ["Hello, world!", "The capital of France is", "1234 apples + 56 pears", " leading space\tand\nnewline",
         "<|im_start|>user\nHi<|im_end|>\n", "naïve café — ünïcode ✓"]
encodings = {t: tok.encode(t, add_special_tokens=False) for t in texts}

prompt = "The capital of France is"
ids = encodings[prompt]
with torch.no_grad():
    out = model(torch.tensor([ids]), use_cache=False).logits[0].double()
positions = []
for p in range(len(ids)):
    top = torch.topk(out[p], 5)
    positions.append({"position": p, "top_ids": top.indices.tolist(),
                      "top_logits": [round(x, 5) for x in top.values.tolist()]})
probe = [0, 1, 2, 100, 1000, 10000, 49151]
doc = {
    "source": "transformers %s, torch %s, float32, GGUF loaded with gguf_file=" % (
        __import__("transformers").__version__, torch.__version__),
    "model": f,
    "encodings": [{"text": t, "ids": i} for t, i in encodings.items()],
    "prompt_ids": ids,
    "positions": positions,
    "last_position_probe": {"ids": probe, "logits": [round(out[-1, i].item(), 5) for i in probe]},
}
json.dump(doc, sys.stdout, indent=1, ensure_ascii=False)
print()
