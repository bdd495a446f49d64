"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (real PTX and cubin, no GPU needed).

The CPU suite runs the kernels in Triton's interpreter, which never lowers them to PTX, so a kernel
that ptxas rejects, or that runs out of registers on a real GPU, would pass it. Here a subprocess
(no TRITON_INTERPRET: under the interpreter `@triton.jit` yields objects that cannot be compiled)
calls the public wrappers down their CUDA path with small CPU tensors, records each kernel launch
instead of running it, and compiles exactly those launches for each GPU target with triton.compile.
Signatures, constexprs and alignment attributes come from Triton's own launch-time binder, so each
compile is the specialization a CUDA launch of the same shapes would build. Register and spill
counts come from the `ptxas -v` log of each compile (Triton's metadata has none without a GPU).

Run as a script (`python tests/test_kernels_compile.py ARCH OUT.json`) it is that subprocess.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

ARCHS = (90, 80)
SMS = {80: 108, 90: 132}  # A100 / H100 SXM: sizes paged decode's split-K plan like the real device
# opt-in shared memory per block (A100 163 KB, H100 227 KB): a launch needing more fails on the GPU
MAX_SHARED = {80: 166912, 90: 232448}

# (dtype, head_dim, heads): GIT-base/large use head_dim 64; the others are the padded head sizes.
FULL_MATRIX = (("float16", 64, 12), ("bfloat16", 64, 12), ("float32", 64, 12),
               ("float16", 32, 16), ("float16", 80, 16), ("float16", 128, 8),
               ("float32", 80, 16), ("float32", 96, 8), ("float32", 128, 8))
MATRIX = {90: FULL_MATRIX, 80: FULL_MATRIX}  # about 1 min on two free cores, one process per target

# approximate PTX math: hardware 2^x (2 ulp, ex2.approx[.ftz]), and fp32 division / reciprocal
# rounded to 2 ulp (div.full, div.approx, rcp.approx); the fp32 kernels must use none of them
APPROX_PTX = re.compile(r"\b(?:ex2\.approx|div\.approx|div\.full|rcp\.approx)[\w.]*")

IMAGE_TOKENS = 197        # ViT-B/16 at 224 px: 14 * 14 patches + CLS
PROMPT = 20               # text tokens of a typical prompt
BLOCK_SIZE = 16           # the engine's default KV block size


# ------------------------------------------------------------------------------------------------
# The subprocess: capture launches through the public wrappers, compile them for one GPU target.
# ------------------------------------------------------------------------------------------------

class _Recorder:
    """Stands in for a kernel object: `kernel[grid](*args, **kwargs)` only records the launch."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


@contextlib.contextmanager
def _patched(module, **attrs):
    saved = {name: getattr(module, name) for name in attrs}
    for name, value in attrs.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def _split_qkv(tokens, heads, head_dim, dtype):
    """q, k, v as views of one fused projection, with the token strides the model passes."""
    import torch
    fused = torch.randn(tokens, 3 * heads * head_dim).to(dtype)
    return fused.unflatten(-1, (3, heads, head_dim)).unbind(-3)


def _launches(arch, dtype_name, head_dim, heads):
    """[(case, kernel name, JITFunction, args, kwargs)] for one dtype / head size, via the wrappers."""
    import torch
    from gitfast.kernels import api as kernels
    from gitfast.kernels import attention, kv_write, paged_decode, paged_prefill

    dtype = getattr(torch, dtype_name)
    no_check = lambda *tensors: None  # noqa: E731 - the CPU tensors only stand in for CUDA ones
    rec = {name: _Recorder() for name in ("kv", "attn", "dec", "merge", "pre")}
    real_plan = paged_decode._plan
    real = dict(attn=attention._git_attention_tuned, kv=kv_write._write_kv_kernel,
                dec=paged_decode._paged_decode_kernel, merge=paged_decode._paged_decode_merge_kernel,
                pre=paged_prefill._paged_prefill_kernel)
    out = []

    def take(case, name, key):
        launches = rec[key].launches
        assert launches, f"{case}: the wrapper launched no {name}"
        out.extend((case, name, real[key], a, k) for a, k in launches)
        launches.clear()

    with contextlib.ExitStack() as stack:
        for mod in (attention, kv_write, paged_decode, paged_prefill):
            stack.enter_context(_patched(mod, check_device=no_check))
        stack.enter_context(_patched(kv_write, _write_kv_kernel=rec["kv"]))
        stack.enter_context(_patched(attention, _git_attention_tuned=rec["attn"]))
        stack.enter_context(_patched(
            paged_decode, _paged_decode_kernel=rec["dec"], _paged_decode_merge_kernel=rec["merge"],
            _num_sms=lambda index: SMS[arch],
            # plan as on a CUDA device (the CPU branch is the interpreter's tiny test plan)
            _plan=lambda bh, tokens, block_n, device: real_plan(bh, tokens, block_n,
                                                                torch.device("cuda", 0))))
        stack.enter_context(_patched(paged_prefill, _paged_prefill_kernel=rec["pre"]))

        batch = 2
        seqlen = IMAGE_TOKENS + PROMPT
        q, k, v = _split_qkv(batch * seqlen, heads, head_dim, dtype)
        cu = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32)
        kernels.git_attention(q, k, v, cu, IMAGE_TOKENS, max_seqlen=seqlen)
        take("decoder prefill", "git_attention", "attn")
        qi, ki, vi = (t[:batch * IMAGE_TOKENS] for t in (q, k, v))
        cu_img = torch.arange(0, (batch + 1) * IMAGE_TOKENS, IMAGE_TOKENS, dtype=torch.int32)
        kernels.git_attention(qi, ki, vi, cu_img, IMAGE_TOKENS, max_seqlen=IMAGE_TOKENS)
        take("vision", "git_attention", "attn")

        # a paged cache holding each sequence's image prefix and prompt, then decode steps
        blocks_per_seq = -(-(seqlen + 1) // BLOCK_SIZE)
        k_cache = torch.zeros(8 * blocks_per_seq, BLOCK_SIZE, heads, head_dim, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
        slots = torch.arange(batch * seqlen, dtype=torch.int64)
        kernels.write_kv_cache(k, v, k_cache, v_cache, slots)
        take("write", "write_kv_cache", "kv")

        tables = torch.arange(batch * blocks_per_seq, dtype=torch.int32).view(batch, -1)
        context = torch.full((batch,), seqlen, dtype=torch.int32)
        qp, _, _ = _split_qkv(batch * PROMPT, heads, head_dim, dtype)
        cu_q = torch.arange(0, (batch + 1) * PROMPT, PROMPT, dtype=torch.int32)
        kernels.paged_prefill_attention(qp, k_cache, v_cache, tables, cu_q, context, IMAGE_TOKENS,
                                        max_seqlen_q=PROMPT)
        take("prompt prefill", "paged_prefill", "pre")
        # text-only requests (the engine's n_img = 0, its own specialization) with prompts past
        # 32 tokens, which switch the half-precision kernel to 64-row query tiles
        n_text = 40
        qt, _, _ = _split_qkv(batch * n_text, heads, head_dim, dtype)
        cu_t = torch.arange(0, (batch + 1) * n_text, n_text, dtype=torch.int32)
        kernels.paged_prefill_attention(qt, k_cache, v_cache, tables, cu_t,
                                        torch.full((batch,), n_text, dtype=torch.int32), 0,
                                        max_seqlen_q=n_text)
        take("text-only prefill", "paged_prefill", "pre")

        # 8 sequences leave the SMs idle, so keys split + a merge pass; 128 fill them: one pass
        for case, n in (("decode split-K", 8), ("decode single pass", 128)):
            qd, _, _ = _split_qkv(n, heads, head_dim, dtype)
            rows = torch.arange(n * blocks_per_seq, dtype=torch.int32).view(n, -1) % k_cache.shape[0]
            kernels.paged_decode_attention(qd, k_cache, v_cache, rows,
                                           torch.full((n,), seqlen + 1, dtype=torch.int32),
                                           max_context_len=seqlen + 1)
            assert bool(rec["merge"].launches) == (case == "decode split-K"), case
            take(case, "paged_decode", "dec")
            if rec["merge"].launches:
                take(case, "paged_decode_merge", "merge")
    return out


def _describe(kw):
    """The launch's tile sizes and launch options, e.g. `BLOCK_M=64 BLOCK_N=64 warps=4 stages=3`."""
    tiles = [f"{k}={kw[k]}" for k in ("BLOCK_M", "BLOCK_N") if k in kw]
    return " ".join(tiles + [f"warps={kw.get('num_warps', 4)}", f"stages={kw.get('num_stages', 3)}"])


def _ptxas_usage(log: str):
    """(registers, spill-store bytes, spill-load bytes) from the `ptxas -v` log of one kernel.

    From ptxas itself because cuobjdump -res-usage folds spills into the stack frame (STACK) and
    shows LOCAL:0 for a kernel that does spill."""
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert len(regs) == 1 and len(spills) == 1, f"unexpected ptxas log:\n{log}"
    return int(regs[0]), int(spills[0][0]), int(spills[0][1])


def _compile_all(arch):
    import warnings

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import create_function_from_signature

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    results, usage = [], {}
    for dtype_name, head_dim, heads in MATRIX[arch]:
        for case, name, kernel, args, kwargs in _launches(arch, dtype_name, head_dim, heads):
            if isinstance(kernel, Autotuner):
                # the configs the autotuner would benchmark: its own prune on these arguments
                kernel.nargs = dict(zip(kernel.arg_names, args))
                variants = [{**kwargs, **c.all_kwargs()} for c in kernel.prune_configs(kwargs)]
                kernel.nargs = None
                fn = kernel.fn
            else:
                variants = [kwargs]
                fn = kernel
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            for kw in variants:
                # the same steps as JITFunction.run: bind + specialize the arguments, then compile
                kw = dict(kw, debug=fn.debug or knobs.runtime.debug,
                          instrumentation_mode=knobs.compilation.instrumentation_mode)
                if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # Triton >= 3.9
                    kw["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
                row = dict(arch=arch, dtype=dtype_name, head_dim=head_dim, heads=heads, case=case,
                           kernel=name, config=_describe(kw))
                start = time.perf_counter()
                try:
                    bound, spec, opts = binder(*args, **kw)
                    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
                    log = io.StringIO()
                    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints it here
                        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                                  target=target, options=options.__dict__)
                    if compiled.hash not in usage:  # a repeat (vision == prefill) is a cache hit
                        usage[compiled.hash] = _ptxas_usage(log.getvalue())
                    row["regs"], row["spill_st"], row["spill_ld"] = usage[compiled.hash]
                    row["approx"] = sorted(set(APPROX_PTX.findall(compiled.asm["ptx"])))
                    row["shared"] = compiled.metadata.shared
                except Exception as exc:  # noqa: BLE001 - every failure is reported, not just the first
                    row["error"] = f"{type(exc).__name__}: {exc}"
                row["seconds"] = round(time.perf_counter() - start, 2)
                results.append(row)
    return results


def _decode_cache_keys(arch):
    """{kernel: {(dtype, head_dim): [JIT cache key per launch]}} for paged decode at many context
    lengths, batch sizes and both context bounds the engine passes (eager: the current longest
    context; CUDA graph: the block table's width), computed as JITFunction.run keys its cache."""
    import torch
    from gitfast.kernels import api as kernels
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    from gitfast.kernels import paged_decode

    backend = make_backend(GPUTarget("cuda", arch, 32))
    real_plan = paged_decode._plan
    real = {"dec": paged_decode._paged_decode_kernel, "merge": paged_decode._paged_decode_merge_kernel}
    rec = {name: _Recorder() for name in real}
    keys = {name: {} for name in real}
    heads, width = 4, 78                     # 78 blocks x 16 = a 1,248-token bound
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(paged_decode, check_device=lambda *t: None,
                                     _paged_decode_kernel=rec["dec"],
                                     _paged_decode_merge_kernel=rec["merge"],
                                     _num_sms=lambda index: SMS[arch],
                                     _plan=lambda bh, tokens, block_n, device: real_plan(
                                         bh, tokens, block_n, torch.device("cuda", 0))))
        for dtype in (torch.float16, torch.float32):
            for head_dim in (64, 128):
                k_cache = torch.zeros(width, BLOCK_SIZE, heads, head_dim, dtype=dtype)
                for batch in (1, 8, 64):
                    q = torch.zeros(batch, heads, head_dim, dtype=dtype)
                    tables = torch.zeros(batch, width, dtype=torch.int32)
                    for context in (1, 17, 64, 65, 129, 208, 500, 1000, 1248):
                        lens = torch.full((batch,), context, dtype=torch.int32)
                        for bound in (context, None):
                            kernels.paged_decode_attention(q, k_cache, k_cache, tables, lens,
                                                           max_context_len=bound)
                for name, fn in real.items():
                    binder = create_function_from_signature(fn.signature, fn.params, backend)
                    got = keys[name].setdefault(f"{str(dtype)[6:]} hd{head_dim}", [])
                    for args, kw in rec[name].launches:
                        _, spec, opts = binder(*args, **kw)
                        got.append(str(spec) + str(opts))
                    rec[name].launches.clear()
    return keys


def _worker_main(arch: int, out_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "must run without Triton's interpreter"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton runs ptxas -v; this prints its log
    with open(out_path, "w") as f:
        json.dump(_compile_all(arch), f)


# ------------------------------------------------------------------------------------------------
# The test: one subprocess per target, run side by side.
# ------------------------------------------------------------------------------------------------

def _toolchain_missing():
    """Why no CUDA target can be compiled here, or None."""
    try:
        from triton.backends import backends
        from triton.backends.nvidia.compiler import get_ptxas
    except Exception as exc:  # noqa: BLE001
        return f"triton's nvidia backend is unavailable ({exc})"
    if "nvidia" not in backends:
        return "triton's nvidia backend is not installed"
    try:  # the launch-time internals the worker reuses (as in Triton 3.6-3.9; others may differ)
        import triton
        from triton import knobs
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
        assert hasattr(JITFunction, "_pack_args") and hasattr(knobs.compilation, "instrumentation_mode")
    except Exception:  # noqa: BLE001
        return f"triton {triton.__version__} lacks the launch internals this check reuses (3.6 to 3.9 have them)"
    for arch in ARCHS:
        try:
            tool = get_ptxas(arch)
        except Exception as exc:  # noqa: BLE001
            return f"no ptxas for sm_{arch} ({exc})"
        if tool is None:
            return f"no ptxas for sm_{arch}"
    return None


def _table(rows):
    lines = [f"{'sm':>3} {'dtype':9} {'hd':>4} {'case':19} {'kernel':19} {'config':40} "
             f"{'regs':>5} {'spill st/ld':>11} {'smem':>6} {'s':>5}"]
    for r in rows:
        lines.append(f"{r['arch']:>3} {r['dtype']:9} {r['head_dim']:>4} {r['case']:19} {r['kernel']:19} "
                     f"{r['config']:40} {r.get('regs', '-'):>5} "
                     f"{str(r.get('spill_st', '-')) + '/' + str(r.get('spill_ld', '-')):>11} "
                     f"{r.get('shared', '-'):>6} {r['seconds']:>5}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    reason = _toolchain_missing()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")  # a fresh cache: every kernel is really compiled
    procs = {}
    try:
        for arch in ARCHS:
            log = open(tmp / f"sm{arch}.log", "w+")
            cmd = [sys.executable, __file__, str(arch), str(tmp / f"sm{arch}.json")]
            procs[arch] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        rows = []
        for arch, (proc, log) in procs.items():
            rc = proc.wait(timeout=600)
            log.seek(0)
            assert rc == 0, f"sm_{arch} compile worker failed (rc={rc}):\n{log.read()[-6000:]}"
            rows += json.loads((tmp / f"sm{arch}.json").read_text())
    finally:
        for proc, log in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
        shutil.rmtree(tmp / "cache", ignore_errors=True)  # ~30 MB of IR; the rows hold the results
    print("\n" + _table(rows))
    return rows


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles(compiled, arch):
    rows = [r for r in compiled if r["arch"] == arch]
    failed = [r for r in rows if "error" in r]
    assert not failed, "\n\n".join(
        f"sm_{arch} {r['kernel']} ({r['dtype']}, head_dim {r['head_dim']}, {r['case']}, {r['config']}):\n"
        f"{r['error'][:4000]}" for r in failed)
    # every wrapper path was captured and built for every dtype / head size of the matrix
    expected = {"git_attention", "write_kv_cache", "paged_prefill", "paged_decode", "paged_decode_merge"}
    for dtype_name, head_dim, _ in MATRIX[arch]:
        got = {r["kernel"] for r in rows if r["dtype"] == dtype_name and r["head_dim"] == head_dim}
        assert got == expected, (dtype_name, head_dim, got)
        cases = {r["case"] for r in rows if r["dtype"] == dtype_name and r["head_dim"] == head_dim}
        assert cases == {"decoder prefill", "vision", "write", "prompt prefill", "text-only prefill",
                         "decode split-K", "decode single pass"}
    too_big = [f"{r['kernel']} {r['dtype']} hd{r['head_dim']} {r['config']}: {r['shared']} B"
               for r in rows if r["shared"] > MAX_SHARED[arch]]
    assert not too_big, f"more shared memory than sm_{arch} has:\n" + "\n".join(too_big)


def _spilled(rows):
    return [f"sm_{r['arch']} {r['kernel']} {r['dtype']} hd{r['head_dim']} {r['case']} {r['config']}: "
            f"{r['regs']} regs, {r['spill_st']} B spill stores, {r['spill_ld']} B spill loads"
            for r in rows if "error" not in r and (r["spill_st"] or r["spill_ld"])]


def test_register_spills(compiled):
    # Half precision (what GIT runs on a GPU): no kernel and no autotune config that _prune keeps
    # may spill on Hopper, at any head size of the matrix, nor on Ampere at GIT's head_dim 64.
    # fp32 and Ampere at head_dim 80/128: at most a few words (ptxas's choice varies by Triton
    # version: 3.6 leaves 24 B in fp32 attention that 3.9 does not), never a spilled accumulator
    # (4 warps on fp32 attention spilled 1.3 KB before it got 8).
    half = [r for r in compiled if r["dtype"] in ("float16", "bfloat16")
            and (r["arch"] == 90 or r["head_dim"] == 64)]
    assert len(half) > 20
    spilled = _spilled(half)
    assert not spilled, "\n".join(spilled)
    heavy = _spilled([r for r in compiled if "error" not in r and r["spill_st"] + r["spill_ld"] > 128])
    assert not heavy, "\n".join(heavy)
    others = _spilled([r for r in compiled if r not in half])
    if others:
        print("\nsmall spills outside half precision on sm_90 / head_dim 64:\n" + "\n".join(others))


def test_paged_decode_compiles_once_per_config(tmp_path):
    """Eager decode grows the context bound every step and CUDA graphs use the table's width: the
    split count must stay a runtime argument, so each kernel builds once per dtype / head size (it
    used to be a constexpr: two recompiles every 64 tokens)."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"triton's nvidia backend or launch binder is unavailable ({exc})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "keys.json"
    proc = subprocess.run([sys.executable, __file__, "keys", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    keys = json.loads(out.read_text())
    for name in ("dec", "merge"):
        assert len(keys[name]) == 4, keys[name].keys()
        for config, launch_keys in keys[name].items():
            assert len(launch_keys) > 10, (name, config)
            assert len(set(launch_keys)) == 1, f"{name} {config}: {len(set(launch_keys))} compiles"


def test_fp32_kernels_use_no_approximate_math(compiled):
    """fp32 is the exact path (outputs meant to match an fp32 reference), so its kernels take IEEE
    division and the software exp2 (PRECISE); half precision keeps the hardware approximations."""
    ok = [r for r in compiled if "error" not in r]
    approx = [f"sm_{r['arch']} {r['kernel']} hd{r['head_dim']} {r['case']}: {r['approx']}"
              for r in ok if r["dtype"] == "float32" and r["approx"]]
    assert not approx, "\n".join(approx)
    # the check sees what it should: the half-precision attention kernels do use ex2.approx
    assert any(r["approx"] for r in ok if r["dtype"] == "float16" and r["kernel"] == "git_attention")


if __name__ == "__main__":
    if sys.argv[1] == "keys":
        assert os.environ.get("TRITON_INTERPRET", "0") != "1", "must run without Triton's interpreter"
        with open(sys.argv[2], "w") as f:
            json.dump(_decode_cache_keys(90), f)
    else:
        _worker_main(int(sys.argv[1]), sys.argv[2])
