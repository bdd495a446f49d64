"""`gitfast caption PATH...`: caption image files, folders, globs, tar shards, file lists and tables of
paths into JSONL, CSV or Parquet — one file (`--out`) or one file per shard (`--out-dir`).

Exit status: 0 every input captioned; 1 some inputs failed (their error records are written, all
others captioned) or a device's process died (what it finished is written; --resume does the rest);
2 usage errors (bad flag, no such path, no inputs, model not found or not a usable checkpoint, unusable
output), reported on stderr before any work, with nothing created; 3 the output could not be written
(disk full, I/O error): what was written before is kept, --resume continues; 130 interrupted (what was
written stays; --resume).

This module is the parser; `cli_run` does the run.
"""
from __future__ import annotations

import argparse


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


def run(args: argparse.Namespace) -> int:
    # the run's modules bring torch and the model code (seconds): imported here, not at the top, so
    # that parsing and `--help` stay quick (every other import of the run is at cli_run's top)
    from . import cli_run

    return cli_run.run(args)
