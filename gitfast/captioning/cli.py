"""`gitfast caption PATH...`: caption image files, folders, globs, tar shards, file lists and tables of
paths into JSONL, CSV or Parquet — one file (`--out`) or one file per shard (`--out-dir`).

Exit status: 0 every input captioned; 1 some inputs failed (their error records are written, all
others captioned) or a device's process died (what it finished is written; --resume does the rest);
2 usage errors (bad flag, no such path, no inputs, model not found or not a usable checkpoint, unusable
output), reported on stderr before any work, with nothing created; 3 the output could not be written
(disk full, I/O error): what was written before is kept, --resume continues; 130 interrupted (what was
written stays; --resume).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", metavar="PATH",
                        help="image files, folders (searched recursively for images and .tar shards), globs "
                             "(quote them: 'photos/**/*.jpg'), webdataset/img2dataset .tar shards, or "
                             ".parquet/.csv tables with a column of paths")
    parser.add_argument("--files-from", default=None, metavar="LIST",
                        help="also caption the paths listed in LIST, one per line ('-' reads stdin)")
    parser.add_argument("--path-column", default="path", metavar="NAME",
                        help="the column of paths in .parquet/.csv inputs (default: path); relative paths "
                             "are relative to the table's folder")
    parser.add_argument("--model", default=None,
                        help="checkpoint folder or hub id in the local Hugging Face cache "
                             "(default: gitfast's embedded model)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", default=None, metavar="FILE",
                       help="output file (default or '-': JSONL on stdout; a character device or FIFO is "
                            "streamed to, without resume)")
    where.add_argument("--out-dir", default=None, metavar="DIR",
                       help="one output per input shard (00000.tar -> DIR/00000.parquet, with the samples' "
                            "json fields), and DIR/captions.parquet for inputs that are not in a shard")
    parser.add_argument("--format", choices=("jsonl", "csv", "parquet"), default=None,
                        help="output format (default: from --out's extension, else jsonl; parquet for --out-dir)")
    parser.add_argument("--batch-size", type=_positive, default=32, help="images per model call (default 32)")
    parser.add_argument("--max-new-tokens", type=_positive, default=20, help="longest caption in tokens (default 20)")
    parser.add_argument("--num-beams", type=_positive, default=1, help="beam search width (default 1: greedy)")
    parser.add_argument("--prompt", default=None, metavar="TEXT",
                        help="a question or caption prefix for every image (VQA checkpoints); "
                             "the output holds only the generated text")
    on = parser.add_mutually_exclusive_group()
    on.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    on.add_argument("--devices", default=None, metavar="LIST",
                    help="several devices, one process each, sharing the inputs: 0,1 or cuda:0,cuda:1, "
                         "all (every visible GPU), or cpu,cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "auto"), default=None,
                        help="weights' dtype (default float32: tokens identical to transformers)")
    parser.add_argument("--quantize", choices=("dynamic",), default=None,
                        help="dynamic: INT8 weights and per-token INT8 activations in the Linear layers (CPU only)")
    parser.add_argument("--workers", type=_non_negative, default=None, metavar="N",
                        help="decode and preprocess images in N worker processes per device (default: "
                             "min(8, CPU cores - 1) on a GPU, 0 on the CPU)")
    parser.add_argument("--jpeg-draft", action="store_true",
                        help="decode JPEGs at reduced size when they are much larger than the model's input "
                             "(faster; pixels differ slightly from a full decode)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="keep what the output already has, retry its failures, caption the rest")
    again.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--force", action="store_true",
                        help="with --resume: continue even though the settings that shape captions (model, "
                             "max-new-tokens, num-beams, prompt, resolved dtype, quantization) differ from the "
                             "output's")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.add_argument("--maps", default=None, metavar="DIR",
                        help="also write DIR/<input>.png per image: the picture with each word's map over it "
                             "(where the word looked; one device only)")


def _positive(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


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


def default_workers(device, ranks: int = 1) -> int:
    """Decode processes when --workers is not given: on a GPU min(8, cores - 1), split between the
    `ranks` sharing this machine; none on the CPU, where decoding would only take cores from the model."""
    import torch

    on_gpu = str(device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    return min(8, max(0, ((os.cpu_count() or 1) - 1) // max(1, ranks))) if on_gpu else 0


def captioner_options(args: argparse.Namespace, device, ranks: int = 1) -> dict:
    """The Captioner's keyword arguments for one device of this run."""
    workers = default_workers(device, ranks) if args.workers is None else args.workers
    return dict(device=device, dtype=args.dtype, max_batch_size=args.batch_size, num_workers=workers,
                jpeg_draft=args.jpeg_draft, quantization_config=args.quantize)


def run(args: argparse.Namespace) -> int:
    from ..loading import CheckpointError
    from . import locking, run_settings, sources
    from .formats import OutputError, infer_format
    from .multi_device import parse_devices
    from .resumable import Output
    from .sharded import ShardedOutput

    if not args.paths and args.files_from is None:
        return _usage_error("nothing to caption: give PATHs, or --files-from LIST")
    try:
        devices = parse_devices(args.devices) if args.devices is not None else None
        fmt = (args.format or "parquet") if args.out_dir is not None else infer_format(args.out, args.format)
        all_sources = list(sources.expand(args.paths, files_from=args.files_from, path_column=args.path_column))
        if not all_sources:
            return _usage_error(f"no images found in {' '.join(args.paths)} "
                                f"(folders and globs take only files with image extensions and .tar shards)")
        lock = locking.lock_for(args.out, args.out_dir)
        if lock is not None:
            lock.acquire()  # before the output is read: the run it waits for may still be writing it
        try:
            if args.out_dir is not None:
                output = ShardedOutput(args.out_dir, fmt, all_sources, resume=args.resume, overwrite=args.overwrite)
            else:
                output = Output(args.out, fmt, resume=args.resume, overwrite=args.overwrite)
            recorded = run_settings.settings_path(args.out, args.out_dir) if lock is not None else None
            settings = _caption_settings(args, devices)
            if recorded is not None and not run_settings.check(recorded, settings, resume=args.resume,
                                                               force=args.force):
                recorded = None  # already recorded as they are
        except BaseException:
            if lock is not None:
                lock.release()
            raise
    except (sources.SourceError, OutputError, CheckpointError, ValueError) as exc:
        return _usage_error(str(exc))
    try:
        return _caption(args, devices, all_sources, output, lock_settings=(recorded, settings))
    finally:
        if lock is not None:
            lock.release()


def _caption_settings(args: argparse.Namespace, devices=None) -> dict:
    """What shapes the captions (run_settings): recorded with the output, compared on --resume. The
    dtype is the one each device resolves `--dtype` to ("auto" is bf16 on one CPU, fp32 on another),
    and with --quantize the LM head's precision this machine picks."""
    from .. import bf16_backends, loading, quantization
    from ..defaults import EMBEDDED_MODEL
    from ..devices import caption_dtype

    model = loading.resolve(EMBEDDED_MODEL if args.model is None else args.model)
    config = loading.read_config(model) if args.dtype == "auto" else None
    dtypes = sorted({str(caption_dtype(args.dtype, d, config)).replace("torch.", "")
                     for d in (devices or [args.device])})
    settings = {"model": os.path.realpath(model), "max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams,
                "prompt": args.prompt, "dtype": dtypes[0] if len(dtypes) == 1 else dtypes, "quantize": args.quantize}
    if quantization.method_of(args.quantize) is not None:
        # quantization.quantize's choices: the GEMM's integers are the same on every backend (each is
        # checked against them before it serves), so which one ran does not shape captions; the LM
        # head's rounding does
        settings["int8_lm_head"] = "bfloat16" if bf16_backends.kernel_serves_logits() else "float32"
    return settings


def _caption(args, devices, all_sources, output, lock_settings) -> int:
    from tqdm import tqdm

    from . import run_settings
    from .records import Record

    todo = [s for s in all_sources if s.id not in output.done]
    skipped = len(all_sources) - len(todo)
    target = args.out_dir or args.out

    pool = None
    results = iter(())
    if todo:
        from ..loading import CheckpointError
        from .captioner import Captioner
        from ..serving.engine import KVCacheTooSmall
        from .multi_device import DeviceError, DevicePool

        generate = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
        try:
            if devices is not None and len(devices) > 1 and args.maps is not None:
                raise ValueError("--maps runs on one device; drop --devices or --maps")
            if devices is not None and len(devices) > 1:
                from .. import loading

                # a wrong --model is found here in a second, not after every rank has started
                model = None if args.model is None else loading.resolve(args.model)
                from ..defaults import EMBEDDED_MODEL

                folder = model if model is not None else loading.resolve(EMBEDDED_MODEL)
                config = loading.read_config(folder)
                if args.prompt:  # refused once here, not by every rank
                    from .captioner import check_prompt_length

                    tokenizer = loading.load_processor(folder).tokenizer
                    check_prompt_length(1 + len(tokenizer(args.prompt, add_special_tokens=False).input_ids),
                                        args.max_new_tokens, config)
                model = None if model is None else str(model)
                pool = DevicePool(devices, todo, model=model, prompt=args.prompt, caption_kwargs=generate,
                                  captioner_kwargs=[captioner_options(args, d, len(devices)) for d in devices])
                pool.wait_ready()
                results = pool.results()
            else:
                captioner = Captioner(args.model, **captioner_options(args, devices[0] if devices else args.device))
                # one result per input, in input order
                stream = captioner.caption_iter(todo, args.prompt, return_maps=args.maps is not None, **generate)
                if args.maps is not None:
                    from .maps_png import written

                    stream = written(args.maps, zip(todo, stream), captioner.tokenizer)
                results = ((s, r.text, r.error) for s, r in zip(todo, stream))
        except (CheckpointError, DeviceError, ValueError, KVCacheTooSmall) as exc:
            if pool is not None:
                pool.close()
            return _usage_error(str(exc))
        except KeyboardInterrupt:
            if pool is not None:
                pool.close()
            sys.stderr.write("gitfast caption: interrupted while loading the model; nothing was written\n")
            return 130

    done = failed = 0
    start = time.perf_counter()
    status = None
    try:
        recorded, settings = lock_settings
        if recorded is not None:
            _guarded(run_settings.record, recorded, settings)
        writer = _guarded(output.open, todo)
        with tqdm(total=len(todo), unit="img", file=sys.stderr, dynamic_ncols=True,
                  disable=True if args.quiet else None) as bar:
            try:
                for source, text, error in results:
                    _guarded(writer.write, Record(source, text, error))
                    failed += error is not None
                    done += error is None
                    bar.update(1)
            except BaseException:
                _close_after_failure(writer)
                raise
            _guarded(writer.close, True)
    except BrokenPipeError:  # stdout's reader went away (`gitfast caption ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail again
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"gitfast caption: interrupted after {done + failed} images; "
                         f"what was written is kept: rerun with --resume to continue\n")
        return 130
    except _WriteFailed as exc:
        sys.stderr.write(f"gitfast caption: error: cannot write the output: {exc.error}; the {done + failed} "
                         f"records written before it are kept: fix it, then rerun with --resume to continue\n")
        return 3
    except Exception as exc:
        from .multi_device import RankDied

        if not isinstance(exc, RankDied):
            raise
        sys.stderr.write(f"gitfast caption: error: {exc}; what the devices finished is written: "
                         f"rerun with --resume to caption the rest\n")
        status = 1
    finally:
        if pool is not None:
            pool.close()
    seconds = time.perf_counter() - start
    rate = (done + failed) / seconds if seconds > 0 else 0.0
    where = f" (already in {target})" if skipped else ""
    sys.stderr.write(f"gitfast caption: {done} captioned, {failed} failed, {skipped} skipped{where} "
                     f"in {seconds:.1f} s, {rate:.1f} images/s\n")
    if status is not None:
        return status
    return 1 if failed else 0


def _close_after_failure(writer) -> None:
    """Closes an output as incomplete (journals stay for --resume); a second error from a full disk
    must not hide the first."""
    try:
        writer.close(complete=False)
    except OSError:
        pass
