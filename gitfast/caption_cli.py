"""`gitfast caption PATH...`: caption image files, folders and globs into JSONL, CSV or Parquet.

Exit status: 0 every input captioned; 1 some inputs failed (their error records are written, all
others captioned); 2 usage errors (bad flag, no such path, no inputs, model not found, unusable
--out), reported on stderr before any work; 130 interrupted (what was written stays; --resume).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="image files, folders (searched recursively for image extensions) or globs "
                             "(quote them: 'photos/**/*.jpg')")
    parser.add_argument("--model", default=None,
                        help="checkpoint folder or hub id in the local Hugging Face cache "
                             "(default: gitfast's embedded model)")
    parser.add_argument("--out", default=None, metavar="FILE", help="output file (default: JSONL on stdout)")
    parser.add_argument("--format", choices=("jsonl", "csv", "parquet"), default=None,
                        help="output format (default: from --out's extension, else jsonl)")
    parser.add_argument("--batch-size", type=_positive, default=32, help="images per model call (default 32)")
    parser.add_argument("--max-new-tokens", type=_positive, default=20, help="longest caption in tokens (default 20)")
    parser.add_argument("--num-beams", type=_positive, default=1, help="beam search width (default 1: greedy)")
    parser.add_argument("--prompt", default=None, metavar="TEXT",
                        help="a question or caption prefix for every image (VQA checkpoints); "
                             "the output holds only the generated text")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "auto"), default=None,
                        help="weights' dtype (default float32: tokens identical to transformers)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="keep what --out already captioned, retry its failures, caption the rest")
    again.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _usage_error(message: str) -> int:
    sys.stderr.write(f"gitfast caption: error: {message}\n")
    return 2


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import sources, writers

    try:
        fmt = writers.infer_format(args.out, args.format)
        all_sources = list(sources.expand(args.paths))
        if not all_sources:
            return _usage_error(f"no images found in {' '.join(args.paths)} "
                                f"(folders and globs take only files with image extensions)")
        output = writers.Output(args.out, fmt, resume=args.resume, overwrite=args.overwrite)
    except (sources.SourceError, writers.OutputError) as exc:
        return _usage_error(str(exc))
    todo = [s for s in all_sources if s.id not in output.done]
    skipped = len(all_sources) - len(todo)

    results = iter(())
    if todo:
        from .captioner import Captioner
        from .loading import CheckpointError

        try:
            captioner = Captioner(args.model, device=args.device, dtype=args.dtype, max_batch_size=args.batch_size)
            results = captioner.caption_iter(todo, args.prompt, max_new_tokens=args.max_new_tokens,
                                             num_beams=args.num_beams)
        except (CheckpointError, ValueError) as exc:
            return _usage_error(str(exc))

    done = failed = 0
    start = time.perf_counter()
    try:
        with output.open() as writer, tqdm(total=len(todo), unit="img", file=sys.stderr, dynamic_ncols=True,
                                           disable=True if args.quiet else None) as bar:
            for r in results:
                writer.write(writers.record(r.source, r.text, r.error))
                failed += r.error is not None
                done += r.error is None
                bar.update(1)
    except BrokenPipeError:  # stdout's reader went away (`gitfast caption ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail again
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"gitfast caption: interrupted after {done + failed} images; "
                         f"what was written is kept: rerun with --resume to continue\n")
        return 130
    seconds = time.perf_counter() - start
    rate = (done + failed) / seconds if seconds > 0 else 0.0
    where = f" (already in {args.out})" if skipped else ""
    sys.stderr.write(f"gitfast caption: {done} captioned, {failed} failed, {skipped} skipped{where} "
                     f"in {seconds:.1f} s, {rate:.1f} images/s\n")
    return 1 if failed else 0
