"""The GPU smoke check of benchmarks/gpu_check.sh: every core against the float64 reference.

For each core (on CUDA: cuda [ours], cudnn, efficient, composed), both tuned head shapes
((Dn+Dr, Dv) = (192, 128) DeepSeek and (96, 64) MiniCPM3; cores/cuda/generate_kernels.py SHAPES),
padded (B = 2, S = 130) and packed (lengths 0, 1, 64, 130, 517), causal and not, bf16; for our
kernels also fp16 and deterministic, and each grid order when the op that sets it exists. One line
per case: core, shape, layout, causal, dtype, det, grid, then the worst of out and the four grads
as error / tolerance by docs/design.md §8 (FlashAttention's rule: 2× / 3× the naive low-precision
error; tests/support.py's helpers) and PASS or FAIL, or "declined: reason" where torch_mla.explain
says the core does not serve the case (that is the selection's answer, not a failure).

Then one large-index case (CUDA only): packed q of more than 2^31 elements through our kernels,
forward and backward, with the first and the last sequence checked against the float64 reference
computed for those sequences alone (sequences are independent, so their rows of out, dq,
dkv_latent and dk_rope depend on nothing else).

--sanitize runs a small forward + backward through our kernels only, no reference, for
compute-sanitizer. --device cpu runs the same cases on the CPU cores (cpu, composed, simt): the
script's own check where no GPU is. Exit status 0 when no case failed.

Usage: python benchmarks/gpu_smoke.py [--device cuda|cpu] [--out FILE] [--sanitize] [--no-large]
"""
import argparse
import contextlib
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import torch_mla  # noqa: E402
from support import (EXACT_ZERO_TOL, NAMED_DIMS, TENSOR_ARGS, HeadDims, make_inputs,  # noqa: E402
                     max_abs_err, out_and_grads, reference_results, run_with_grads)
from torch_mla.reference import mla_attention_reference  # noqa: E402

CORES = {"cuda": ("cuda", "cudnn", "efficient", "composed"), "cpu": ("cpu", "composed", "simt")}
OURS = {"cuda": "cuda", "cpu": "simt"}  # the core running our CUDA kernels' code on each device
SHAPES = ("dsv3", "minicpm3")  # (192, 128) and (96, 64)
PACKED_LENGTHS = (0, 1, 64, 130, 517)
PADDED = (2, 130)  # B, S
HEADS = 2


def grid_order(order):
    """`order` for our kernels; "-" marks a core whose grid is not ours."""
    return contextlib.nullcontext() if order == "-" else torch_mla.cores.grid_order(order)


@contextlib.contextmanager
def deterministic(on):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def cases(device):
    """(core, shape, packed, causal, dtype, det, grid) for every case of the smoke table."""
    for core in CORES[device]:
        ours = core == OURS[device]
        dtypes = (torch.bfloat16, torch.float16) if ours else (torch.bfloat16,)
        dets = (False, True) if ours else (False,)
        grids = torch_mla.cores.GRID_ORDERS if core == OURS[device] else ("-",)
        for shape in SHAPES:
            for packed in (False, True):
                for causal in (True, False):
                    for dtype in dtypes:
                        for det in dets:
                            for grid in grids:
                                yield core, shape, packed, causal, dtype, det, grid


def worst_ratio(results, inputs, **kwargs):
    """max over out and the four grads of error / tolerance (docs/design.md §8), and its name."""
    out, grads = results
    ref_out, ref_grads = reference_results(inputs, torch.float64, **kwargs)
    naive_out, naive_grads = reference_results(inputs, inputs["q"].dtype, **kwargs)
    worst = (0.0, "out", 0.0, 0.0)
    for name, x, ref, naive in [("out", out, ref_out, naive_out),
                                *[(k, grads[k], ref_grads[k], naive_grads[k]) for k in TENSOR_ARGS]]:
        if not torch.isfinite(x).all():
            return math.inf, name, math.inf, 0.0
        err = max_abs_err(x, ref)
        if ref.numel() and ref.abs().max() == 0:  # exact zero: float32 rounding of dP - delta only
            tol = EXACT_ZERO_TOL
        else:
            tol = (2 if name == "out" else 3) * max_abs_err(naive, ref)
        ratio = err / tol if tol > 0 else (0.0 if err == 0 else math.inf)
        if ratio > worst[0]:
            worst = (ratio, name, err, tol)
    return worst


def run_case(device, core, shape, packed, causal, dtype, det, grid):
    """One line of the table and whether the case failed."""
    dims = NAMED_DIMS[shape]
    head_dims = HeadDims(heads=HEADS, nope=dims.nope, rope=dims.rope, v=dims.v, latent=dims.latent)
    label = (f"{core:<9} ({dims.nope + dims.rope},{dims.v}) {'packed' if packed else 'padded'} "
             f"causal={int(causal)} {str(dtype).replace('torch.', ''):<8} det={int(det)} grid={grid}")
    if packed:
        inputs, cu = make_inputs(head_dims, seqlens=PACKED_LENGTHS, dtype=dtype, device=device)
    else:
        inputs, cu = make_inputs(head_dims, batch=PADDED[0], seqlen=PADDED[1], dtype=dtype, device=device)
    with deterministic(det), grid_order(grid):
        reason = torch_mla.explain(*[inputs[k] for k in TENSOR_ARGS], cu_seqlens=cu).reasons[core]
        if reason is not None:
            return f"{label}  declined: {reason}", False
        try:
            with torch_mla.use_core(core):
                results = run_with_grads(torch_mla.mla_attention, inputs, causal=causal, cu_seqlens=cu)
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # a crash is this case's verdict; the table goes on
            return f"{label}  FAIL: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", True
    ratio, name, err, tol = worst_ratio(results, inputs, causal=causal, cu_seqlens=cu)
    verdict = "PASS" if ratio <= 1 else "FAIL"
    return f"{label}  worst {name:<9} err {err:.3g} / tol {tol:.3g} = {ratio:.2f}  {verdict}", ratio > 1


def large_index_case():
    """Our kernels on packed q of more than 2^31 elements; first and last sequence checked."""
    heads, seqlen = 16, 2048
    dims = NAMED_DIMS["dsv3"]
    per_token = heads * (dims.nope + dims.rope)
    count = (2 ** 31) // (seqlen * per_token) + 1
    total = count * seqlen
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=1.0):
        # Filled a sequence's rows at a time, so that only our kernels index past 2^31, not torch's RNG.
        t = torch.empty(*shape, device="cuda", dtype=torch.bfloat16)
        for rows in t.split(seqlen):
            rows.normal_(0.0, scale, generator=gen)
        return t

    q = rand(total, heads, dims.nope + dims.rope)
    kv_latent, k_rope = rand(total, dims.latent), rand(total, dims.rope)
    wkv_b = rand(heads * (dims.nope + dims.v), dims.latent, scale=dims.latent ** -0.5)
    grad_out = rand(total, heads, dims.v)
    cu = torch.arange(0, total + 1, seqlen, dtype=torch.int32, device="cuda")
    label = f"large-index cuda q {tuple(q.shape)} = {q.numel():,} elements (2^31 = {2 ** 31:,}), {count} sequences"
    reason = torch_mla.explain(q, kv_latent, k_rope, wkv_b, cu_seqlens=cu).reasons["cuda"]
    if reason is not None:
        return f"{label}  declined: {reason}", False
    leaves = [t.requires_grad_(True) for t in (q, kv_latent, k_rope, wkv_b)]
    with torch_mla.use_core("cuda"):
        out = torch_mla.mla_attention(*leaves, cu_seqlens=cu, max_seqlen=seqlen)
    dq, dkv, dkr, _ = torch.autograd.grad(out, leaves, grad_out)
    torch.cuda.synchronize()
    lines, failed = [label], False
    for index in (0, count - 1):
        rows = slice(index * seqlen, (index + 1) * seqlen)
        ours = {"out": out[rows].detach(), "q": dq[rows], "kv_latent": dkv[rows], "k_rope": dkr[rows]}
        sample = {"q": q[rows].detach(), "kv_latent": kv_latent[rows].detach(),
                  "k_rope": k_rope[rows].detach(), "wkv_b": wkv_b.detach()}
        try:
            check_sample(ours, sample, grad_out[rows])
            lines.append(f"  sequence {index} (rows {rows.start:,}..{rows.stop - 1:,})  PASS")
        except AssertionError as e:
            failed = True
            lines.append(f"  sequence {index} (rows {rows.start:,}..{rows.stop - 1:,})  FAIL: {e}")
    return "\n".join(lines), failed


def check_sample(ours, sample, grad_out):
    """check_lowp_against_reference on one sequence, wkv_b's gradient (a sum over every
    sequence) left out."""
    ref_out, ref_grads = out_and_grads(mla_attention_reference, {k: v.double() for k, v in sample.items()},
                                       grad_out)
    naive_out, naive_grads = out_and_grads(mla_attention_reference, sample, grad_out)
    refs, naive = {"out": ref_out, **ref_grads}, {"out": naive_out, **naive_grads}
    for name, x in ours.items():
        assert torch.isfinite(x).all(), f"{name}: non-finite values"
        factor = 2 if name == "out" else 3
        err, naive_err = max_abs_err(x, refs[name]), max_abs_err(naive[name], refs[name])
        assert err <= factor * naive_err, f"{name}: max error {err:.3g} > {factor} × naive {naive_err:.3g}"


def sanitize_workload(device):
    """A small forward + backward through our kernels for compute-sanitizer: both shapes, padded
    and packed, atomic and deterministic backward, each grid order. Caching is off in the caller
    (PYTORCH_NO_CUDA_MEMORY_CACHING=1) so that an access past a tensor's end is reported."""
    core = OURS[device]
    for shape in SHAPES:
        dims = NAMED_DIMS[shape]
        head_dims = HeadDims(heads=HEADS, nope=dims.nope, rope=dims.rope, v=dims.v, latent=dims.latent)
        for seqlens in ((70, 1, 130), None):
            for det in (False, True):
                for grid in torch_mla.cores.GRID_ORDERS:
                    inputs, cu = make_inputs(head_dims, batch=2, seqlen=67, seqlens=seqlens,
                                             dtype=torch.bfloat16, device=device)
                    with deterministic(det), grid_order(grid), torch_mla.use_core(core):
                        out, grads = run_with_grads(torch_mla.mla_attention, inputs, cu_seqlens=cu)
                    assert all(torch.isfinite(g).all() for g in grads.values()), (shape, seqlens, det, grid)
    print("summary: sanitizer workload done (our kernels: 2 shapes x padded/packed x det 0/1 x grid "
          f"{'/'.join(torch_mla.cores.GRID_ORDERS)})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument("--sanitize", action="store_true", help="the compute-sanitizer workload only")
    parser.add_argument("--no-large", action="store_true", help="skip the large-index case")
    parser.add_argument("--cores", nargs="+", default=None, help="a subset of the device's cores")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    # Deterministic cuBLAS (the expansion GEMMs under use_deterministic_algorithms) needs this.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if args.sanitize:
        sanitize_workload(args.device)
        return 0
    out = open(args.out, "w") if args.out else None
    counts = {"PASS": 0, "FAIL": 0, "declined": 0}
    t0 = time.time()

    def emit(line):
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    emit(f"# torch {torch.__version__}, device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}"
         f", grid orders {'/'.join(torch_mla.cores.GRID_ORDERS)}")
    for case in cases(args.device):
        if args.cores and case[0] not in args.cores:
            continue
        line, failed = run_case(args.device, *case)
        counts["FAIL" if failed else "declined" if "declined:" in line else "PASS"] += 1
        emit(line)
    large = "not run"
    if args.device == "cuda" and not args.no_large:
        t1 = time.time()
        try:
            text, failed = large_index_case()
        except Exception as e:  # e.g. out of memory: the case's verdict, not the script's end
            text, failed = f"large-index FAIL: {type(e).__name__}: {str(e).splitlines()[0][:200]}", True
        emit(text + f"  ({time.time() - t1:.0f}s)")
        large = "FAIL" if failed else "declined" if "declined:" in text else "PASS"
        counts["FAIL"] += failed
    emit(f"summary: smoke {counts['PASS']} pass, {counts['FAIL']} fail, {counts['declined']} declined; "
         f"large-index {large}; {time.time() - t0:.0f}s")
    if out:
        out.close()
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
