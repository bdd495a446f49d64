"""What `gitfast caption` does once its arguments are parsed (`cli.py` holds the parser and the exit
statuses): check everything and open the output under its lock (`run`), start the model on one device
or several (`_start`), write each result as it comes (`_write`), and report (`_report`)."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch
from tqdm import tqdm

from .. import bf16_backends, quantization
from ..checkpoint import loading
from ..defaults import EMBEDDED_MODEL
from ..devices import caption_dtype
from ..checkpoint.loading import CheckpointError
from ..serving.engine import KVCacheTooSmall
from . import captioner, locking, preflight, run_settings, sources
from .formats import OutputError, infer_format
from .maps_png import written
from .multi_device import DeviceError, DevicePool, RankDied, parse_devices
from .records import Record, Source
from .resumable import Output
from .sharded import ShardedOutput

Results = Iterator[Tuple[Source, Optional[str], Optional[str]]]  # (source, text, error) in input order


@dataclass
class _Plan:
    """One run, checked: its devices (None: --device), inputs, opened output and caption settings."""
    devices: Optional[List[str]]
    sources: List[Source]
    output: object                 # resumable.Output or sharded.ShardedOutput
    settings: dict                 # run_settings: what shapes the captions
    record_to: Optional[str]       # where to record `settings`; None: nothing to record


@dataclass
class _Counts:
    done: int = 0
    failed: int = 0


def default_workers(device, ranks: int = 1) -> int:
    """Decode processes when --workers is not given: on a GPU min(8, cores - 1), split between the
    `ranks` sharing this machine; none on the CPU, where decoding would only take cores from the model."""
    on_gpu = str(device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    return min(8, max(0, ((os.cpu_count() or 1) - 1) // max(1, ranks))) if on_gpu else 0


def captioner_options(args: argparse.Namespace, device, ranks: int = 1) -> dict:
    """The Captioner's keyword arguments for one device of this run."""
    workers = default_workers(device, ranks) if args.workers is None else args.workers
    return dict(device=device, dtype=args.dtype, max_batch_size=args.batch_size, num_workers=workers,
                jpeg_draft=args.jpeg_draft, quantization_config=quantization.resolved(args.quantize))


def run(args) -> int:
    """Usage errors (2) are found before any work, with nothing created; then captions under the lock."""
    if not args.paths and args.files_from is None:
        return _usage_error("nothing to caption: give PATHs, or --files-from LIST")
    with contextlib.ExitStack() as held:
        try:
            devices = parse_devices(args.devices) if args.devices is not None else None
            fmt = (args.format or "parquet") if args.out_dir is not None else infer_format(args.out, args.format)
            found = _sources(args)
            lock = locking.lock_for(args.out, args.out_dir)
            if lock is not None:
                lock.acquire()  # before the output is read: the run it waits for may still be writing it
                held.callback(lock.release)
            plan = _open(args, devices, found, fmt, locked=lock is not None)
        except (sources.SourceError, OutputError, CheckpointError, ValueError) as exc:
            return _usage_error(str(exc))
        return _caption(args, plan)


def _sources(args) -> List[Source]:
    found = list(sources.expand(args.paths, files_from=args.files_from, path_column=args.path_column))
    if not found:
        raise ValueError(f"no images found in {' '.join(args.paths)} "
                         f"(folders and globs take only files with image extensions and .tar shards)")
    return found


def _open(args, devices, found: List[Source], fmt: str, locked: bool) -> _Plan:
    """Opens the output (reading what it has for --resume) and checks the settings recorded with it."""
    if args.out_dir is not None:
        output = ShardedOutput(args.out_dir, fmt, found, resume=args.resume, overwrite=args.overwrite)
    else:
        output = Output(args.out, fmt, resume=args.resume, overwrite=args.overwrite)
    record_to = run_settings.settings_path(args.out, args.out_dir) if locked else None
    settings = _caption_settings(args, devices)
    if record_to is not None and not run_settings.check(record_to, settings, resume=args.resume, force=args.force):
        record_to = None  # already recorded as they are
    return _Plan(devices, found, output, settings, record_to)


def _caption_settings(args, devices=None) -> dict:
    """What shapes the captions (run_settings): recorded with the output, compared on --resume. The
    dtype is the one each device resolves `--dtype` to ("auto" is bf16 on one CPU, fp32 on another),
    and with --quantize the LM head's precision this machine picks."""
    model = loading.resolve(EMBEDDED_MODEL if args.model is None else args.model)
    config = loading.read_config(model) if args.dtype == "auto" else None
    dtypes = sorted({str(caption_dtype(args.dtype, d, config)).replace("torch.", "")
                     for d in (devices or [args.device])})
    settings = {"model": os.path.realpath(model), "max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams,
                "prompt": args.prompt, "dtype": dtypes[0] if len(dtypes) == 1 else dtypes, "quantize": args.quantize}
    if quantization.method_of(args.quantize) is not None:
        # quantization.quantize's choices that shape captions: the activations' bits (the 8-bit
        # backends give the same integers, each checked against them before it serves; a 7-bit one
        # does not; captioner_options hands every rank this process's backend) and the LM head's rounding
        settings["int8_activation_bits"] = quantization.activation_bits(args.quantize)
        settings["int8_lm_head"] = "bfloat16" if bf16_backends.kernel_serves_logits() else "float32"
    return settings


def _caption(args, plan: _Plan) -> int:
    todo = [s for s in plan.sources if s.id not in plan.output.done]
    pool, results = None, iter(())
    if todo:
        try:
            pool, results = _start(args, plan.devices, todo)
        except (CheckpointError, DeviceError, ValueError, KVCacheTooSmall) as exc:
            return _usage_error(str(exc))
        except KeyboardInterrupt:
            sys.stderr.write("gitfast caption: interrupted while loading the model; nothing was written\n")
            return 130
    counts, start, status = _Counts(), time.perf_counter(), None
    try:
        _write(args, plan, todo, results, counts)
    except BrokenPipeError:  # stdout's reader went away (`gitfast caption ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail again
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"gitfast caption: interrupted after {counts.done + counts.failed} images; "
                         f"what was written is kept: rerun with --resume to continue\n")
        return 130
    except _WriteFailed as exc:
        sys.stderr.write(f"gitfast caption: error: cannot write the output: {exc.error}; the "
                         f"{counts.done + counts.failed} records written before it are kept: fix it, then rerun "
                         f"with --resume to continue\n")
        return 3
    except RankDied as exc:
        sys.stderr.write(f"gitfast caption: error: {exc}; what the devices finished is written: "
                         f"rerun with --resume to caption the rest\n")
        status = 1
    finally:
        if pool is not None:
            pool.close()
    _report(counts, len(plan.sources) - len(todo), args.out_dir or args.out, time.perf_counter() - start)
    return status if status is not None else (1 if counts.failed else 0)


def _start(args, devices, todo: List[Source]) -> Tuple[Optional[DevicePool], Results]:
    """Loads the model: here on one device, or one process per device (the pool, to be closed)."""
    generate = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    if devices is not None and len(devices) > 1:
        if args.maps is not None:
            raise ValueError("--maps runs on one device; drop --devices or --maps")
        pool = _start_ranks(args, devices, todo, generate)
        return pool, pool.results()
    model = captioner.Captioner(args.model, **captioner_options(args, devices[0] if devices else args.device))
    # one result per input, in input order
    stream = model.caption_iter(todo, args.prompt, return_maps=args.maps is not None, **generate)
    if args.maps is not None:
        stream = written(args.maps, zip(todo, stream), model.tokenizer)
    return None, ((s, r.text, r.error) for s, r in zip(todo, stream))


def _start_ranks(args, devices: List[str], todo: List[Source], generate: dict) -> DevicePool:
    model = preflight.model_for_ranks(args.model, args.prompt, args.max_new_tokens)
    pool = DevicePool(devices, todo, model=model, prompt=args.prompt, caption_kwargs=generate,
                      captioner_kwargs=[captioner_options(args, d, len(devices)) for d in devices])
    try:
        pool.wait_ready()
    except BaseException:
        pool.close()
        raise
    return pool


def _write(args, plan: _Plan, todo: List[Source], results: Results, counts: _Counts) -> None:
    """Records the settings, then each result as it comes, counting them; OSErrors become _WriteFailed."""
    if plan.record_to is not None:
        _guarded(run_settings.record, plan.record_to, plan.settings)
    writer = _guarded(plan.output.open, todo)
    with tqdm(total=len(todo), unit="img", file=sys.stderr, dynamic_ncols=True,
              disable=True if args.quiet else None) as bar:
        try:
            for source, text, error in results:
                _guarded(writer.write, Record(source, text, error))
                counts.failed += error is not None
                counts.done += error is None
                bar.update(1)
        except BaseException:
            _close_after_failure(writer)
            raise
        _guarded(writer.close, True)


def _report(counts: _Counts, skipped: int, target: Optional[str], seconds: float) -> None:
    rate = (counts.done + counts.failed) / seconds if seconds > 0 else 0.0
    where = f" (already in {target})" if skipped else ""
    sys.stderr.write(f"gitfast caption: {counts.done} captioned, {counts.failed} failed, {skipped} skipped{where} "
                     f"in {seconds:.1f} s, {rate:.1f} images/s\n")


def _usage_error(message: str) -> int:
    sys.stderr.write(f"gitfast caption: error: {message}\n")
    return 2


class _WriteFailed(Exception):
    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


def _guarded(call, *args):
    """Runs an output operation; an OSError from it (disk full, I/O error) becomes _WriteFailed, so it
    is not mistaken for a failure elsewhere. A closed stdout pipe is handled on its own."""
    try:
        return call(*args)
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise _WriteFailed(exc) from exc


def _close_after_failure(writer) -> None:
    """Closes an output as incomplete (journals stay for --resume); a second error from a full disk
    must not hide the first."""
    try:
        writer.close(complete=False)
    except OSError:
        pass
