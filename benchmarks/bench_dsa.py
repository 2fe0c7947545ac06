"""python benchmarks/bench_dsa.py: a DeepSeek-V3.2 stack (DeepSeek Sparse Attention) trained through
Hugging Face's own attention ("eager") and through torch_mla.patch_model: peak memory and bytes
saved for backward per token of one forward+backward (docs/design.md §19).

The model is DeepseekV32ForCausalLM at tiny width with the real attention and indexer sizes:
hidden 512, --layers decoder layers (dense MLPs), H = 8 heads of DeepSeek-V3.2's head dims
(Dn/Dr/Dv/Dc = 128/64/128/512, q latent 256), its indexer (64 heads of 128, top k = 2048), float32
on the CPU, one sequence of S tokens, labels = the tokens; the indexer frozen (HF runs it under
no_grad; patch_model's default). Methods: hf_eager (HF's own attention), torch_mla
(patch_model(model, save="q"): the sparse op) and torch_mla_latent (save="latent": the DSA block,
docs/design.md §13.7). Columns:

  saved B/token  every storage autograd keeps for backward (torch_mla.SavedTensors), parameters
                 left out, per token
  peak MiB       the peak of live tensor bytes above what was live before the step, during one
                 forward+backward (torch.profiler's allocation events)
  time s         that step's wall time (profiled, so an upper bound)

HF's eager path builds each layer's (H, S, S) scores under the index mask and its indexer's
(S, H_I, S) float32 scores, so its peak grows as S²; a configuration whose peak, predicted by
fitting a·S + b·S² to the smaller S measured, exceeds --max-gib is not run: the table prints the
prediction, marked as such.

    python benchmarks/bench_dsa.py [--seqlens 1024 2048 4096 8192] [--layers 2] [--max-gib 12]
"""
import argparse
import os
import sys
import time

import torch

import torch_mla
from torch_mla import SavedTensors

from bench import fit_linear_quadratic

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from support import peak_live_bytes  # noqa: E402

# method → patch_model's save (None: not patched). DSA materialises q whatever save_q_latent says
# (there is no q-latent sparse op), so "torch_mla" keeps q; "torch_mla_latent" runs the DSA block.
METHODS = {"hf_eager": None, "torch_mla": "q", "torch_mla_latent": "latent"}


def make_model(layers: int, seed: int = 0):
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    config = DeepseekV32Config(
        vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=layers,
        first_k_dense_replace=layers, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=256,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        index_n_heads=64, index_head_dim=128, index_topk=2048, max_position_embeddings=16384,
        attn_implementation="eager")
    torch.manual_seed(seed)
    return DeepseekV32ForCausalLM(config).float()


def measure(method: str, seqlen: int, layers: int) -> dict:
    model = make_model(layers)
    if METHODS[method] is not None:
        torch_mla.patch_model(model, save=METHODS[method])
    tokens = torch.randint(0, model.config.vocab_size, (1, seqlen), generator=torch.Generator().manual_seed(1))
    params = list(model.parameters())

    def step():
        model(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()

    with SavedTensors() as saved:
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    saved_per_token = saved.nbytes_excluding(*params) / seqlen
    del loss, saved
    start = time.perf_counter()
    peak = peak_live_bytes(step)
    return dict(method=method, seqlen=seqlen, saved=saved_per_token, peak=peak,
                seconds=time.perf_counter() - start)


def run(seqlens, methods, layers: int, max_gib: float):
    rows = []
    for method in methods:
        measured = []
        for seqlen in seqlens:
            if len(measured) >= 2:
                a, b = fit_linear_quadratic([r["seqlen"] for r in measured], [r["peak"] for r in measured])
                predicted = a * seqlen + b * seqlen ** 2
                if predicted > max_gib * 2 ** 30:
                    rows.append(dict(method=method, seqlen=seqlen, predicted=predicted))
                    continue
            row = measure(method, seqlen, layers)
            measured.append(row)
            rows.append(row)
    return rows


def report(rows, layers: int, max_gib: float) -> str:
    lines = [f"DeepseekV32ForCausalLM, {layers} layers, hidden 512, H = 8, indexer 64 x 128, k = 2048, "
             f"float32, B = 1, CPU threads {torch.get_num_threads()}, one forward+backward",
             f"{'S':>6} {'method':<16} {'saved B/token':>14} {'peak MiB':>12} {'time s':>8}"]
    for r in sorted(rows, key=lambda r: (r["seqlen"], r["method"])):
        if "predicted" in r:
            lines.append(f"{r['seqlen']:>6} {r['method']:<16} {'-':>14} {r['predicted'] / 2 ** 20:>12,.0f} "
                         f"{'-':>8}  predicted (fit), over --max-gib {max_gib}: not run")
        else:
            lines.append(f"{r['seqlen']:>6} {r['method']:<16} {r['saved']:>14,.0f} {r['peak'] / 2 ** 20:>12,.1f} "
                         f"{r['seconds']:>8.1f}")
    return "\n".join(lines)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-gib", type=float, default=12.0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(sorted(args.seqlens), args.methods, args.layers, args.max_gib)
    print(report(rows, args.layers, args.max_gib))
    return rows


if __name__ == "__main__":
    main()
