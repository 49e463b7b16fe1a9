"""llama.cpp side of ``benchmarks/generation.py``: a worker in the llama.cpp venv (no torch in
this process; llama.cpp and torch never share one) that loads GGUF files and times greedy
generation on request, so the generation benchmark can interleave llama.cpp runs with its own.

Protocol: one JSON object a line on stdin, one JSON reply a line on stdout.

- ``{"op": "load", "name": N, "path": P, "threads": T, "n_ctx": C}`` -> ``{"ok": true}``
- ``{"op": "generate", "name": N, "ids": [...], "new_tokens": K}`` -> ``{"prefill_s", "decode_s",
  "tokens"}``: the prompt token ids are evaluated in one batch (prefill), then ``K`` greedy
  tokens one at a time (argmax of llama.cpp's logits; EOS does not stop it, as in the torch runs).
- ``{"op": "quit"}``
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

import llama_cpp


def main() -> None:
    models: dict[str, llama_cpp.Llama] = {}
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        if op == "quit":
            break
        if op == "load":
            models[req["name"]] = llama_cpp.Llama(model_path=req["path"], n_ctx=req.get("n_ctx", 2048), n_batch=512,
                                                  n_threads=req.get("threads", 2), logits_all=False, verbose=False)
            reply = {"ok": True, "version": llama_cpp.__version__}
        elif op == "generate":
            llm = models[req["name"]]
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(req["ids"])
            t1 = time.perf_counter()
            tokens = []
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            tokens.append(tok)
            for _ in range(req["new_tokens"] - 1):
                llm.eval([tok])
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                tokens.append(tok)
            t2 = time.perf_counter()
            reply = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens": tokens}
        else:
            reply = {"error": f"unknown op {op!r}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
