"""Captioning pipeline: JPEG files on disk → gitfast.Captioner → Parquet, images/s and where time goes.

Inputs are photo-like 640×480 JPEGs (quality 90: a gradient, a few filled shapes, pixel noise) made
once into a cache folder. Stages, each timed alone over the same files (one thread of this process):
`read` (bytes from the page cache), `decode` (`gitfast.captioning.images.decode`, full size), `decode_draft`
(JPEG draft decoding to the processor's target), `preprocess` (the checkpoint's processor), `encoder`
(vision encoder + projection, batched), `generate` (the engine on prepared pixels, encoder included;
its remainder is prefill + decode loop), `write` (a Parquet table of the captions). End to end:
`Captioner(num_workers=W).caption_iter(files)` into a Parquet writer, wall clock, after a warm-up
(worker start-up is not counted), and the CPU time of the main process alone: with workers that is
what feeding the model costs the thread that drives it.

    python -m gitfast.bench.bench_pipeline                        # tiny random model, 256 images
    python -m gitfast.bench.bench_pipeline --model git-base --images 64 --workers 0 1 2
    python -m gitfast.bench.bench_pipeline --model embedded --draft-agreement 500
    python -m gitfast.bench.bench_pipeline --memory 100000        # RSS over a long stream of small images
    python -m gitfast.bench.bench_pipeline --transport            # worker → parent: numpy pickle vs torch shm

Measured on the shared 2-core CPU (no GPU), 2026-11-24, torch 2.13, transformers 5.23 (processor
on its PIL backend: no torchvision), torch threads 1 — numbers in the issue #7 reply, not claims:
- JPEG draft agreement, embedded model (80 px) on its own shapes pictures saved as JPEG q90 and
  upscaled to 640×640 (draft 1/8 → 80×80): see `--draft-agreement`; the reply records the share.
- worker transport of a [1, 3, 224, 224] float32 array: numpy through the pipe ~0.9 ms/item against
  ~11–16 ms/item for a torch tensor through torch's shared-memory reduction (a file descriptor per
  tensor), hence numpy.

`cases()` gives the same to `gitfast bench`: benchmark `pipeline_stages` (one provider per stage) and
`pipeline` (end to end, `gitfast_workers0/1`); one call = the whole set of images, `images` in each
row's extra. Rows run in the row's dtype; on CUDA with a git-base-shaped random checkpoint (made once
in the temp folder), on the CPU with the tiny one. `--quick` uses 8 images and the tiny
model, and skips the worker-pool case (its start-up, seconds, is not worth it in the CI smoke run).
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import os
import sys
import tempfile
import time
from typing import Iterable, List, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from .common import Case

SUITE = "pipeline"
PHOTO = (640, 480)
# name -> (vision hidden, layers, heads, MLP, patch, image size, text hidden, text layers, vocab)
MODELS = {
    "tiny": (128, 2, 2, 256, 16, 64, 128, 2, 1000),
    "git-base": (768, 12, 12, 3072, 16, 224, 768, 6, 30522),
    "git-large": (1024, 24, 16, 4096, 14, 224, 768, 6, 30522),
}


# --- inputs --------------------------------------------------------------------------------------
def photo(seed: int, size=PHOTO) -> Image.Image:
    """A photo-like picture: a two-colour gradient, a few filled shapes, Gaussian pixel noise."""
    g = np.random.default_rng(seed)
    w, h = size
    t = (np.linspace(0, 1, w)[None, :] * g.uniform(0.3, 1) + np.linspace(0, 1, h)[:, None] * g.uniform(0, 0.7))[..., None]
    a, b = g.uniform(0, 255, (2, 3))
    img = Image.fromarray(np.clip(a + (b - a) * t, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(g.integers(3, 8)):
        x, y = g.uniform(0, w), g.uniform(0, h)
        r = g.uniform(0.05, 0.25) * h
        box = [x - r, y - r * g.uniform(0.5, 1.5), x + r, y + r]
        fill = tuple(int(c) for c in g.integers(0, 256, 3))
        (draw.ellipse if g.random() < 0.5 else draw.rectangle)(box, fill=fill)
    noisy = np.asarray(img, dtype=np.float32) + g.normal(0, 8, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def photo_folder(n: int, size=PHOTO, quality: int = 90, root: Optional[str] = None) -> List[str]:
    """n JPEG files, made once and kept in a cache folder keyed by what they are."""
    root = root or os.path.join(tempfile.gettempdir(), "gitfast-bench-photos")
    folder = os.path.join(root, f"{size[0]}x{size[1]}-q{quality}")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"{i:06d}.jpg")
        if not os.path.exists(path):
            photo(i, size).save(path + ".tmp", format="JPEG", quality=quality)
            os.replace(path + ".tmp", path)
        paths.append(path)
    return paths


def checkpoint(name: str, root: Optional[str] = None) -> str:
    """A checkpoint folder: "embedded", a path, or a random-weight model of a named size (made once)."""
    if name == "embedded":
        from gitfast.defaults import EMBEDDED_MODEL

        return str(EMBEDDED_MODEL)
    if name not in MODELS:
        return name
    folder = os.path.join(root or os.path.join(tempfile.gettempdir(), "gitfast-bench-models"), name)
    if not os.path.exists(os.path.join(folder, "config.json")):
        _make_random_checkpoint(name, folder)
    return folder


def _make_random_checkpoint(name: str, folder: str) -> None:
    import transformers
    from transformers import BertTokenizerFast, CLIPImageProcessor, GitConfig, GitProcessor

    vh, vl, vheads, vmlp, patch, image, th, tl, vocab_size = MODELS[name]
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(vocab_size - 5)]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, model_input_names=["input_ids", "attention_mask"])
    processor = CLIPImageProcessor(size={"shortest_edge": image}, crop_size={"height": image, "width": image})
    config = GitConfig(vision_config=dict(hidden_size=vh, num_hidden_layers=vl, num_attention_heads=vheads,
                                          intermediate_size=vmlp, patch_size=patch, image_size=image),
                       hidden_size=th, num_hidden_layers=tl, num_attention_heads=th // 64, intermediate_size=4 * th,
                       vocab_size=vocab_size, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    tmp = folder + f".tmp{os.getpid()}"
    GitProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(tmp)
    transformers.GitForCausalLM(config).eval().save_pretrained(tmp)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    os.replace(tmp, folder)


# --- stages --------------------------------------------------------------------------------------
class Stages:
    """Every stage of the pipeline as a callable over the same files (one call = all of them)."""

    def __init__(self, model: str, paths: List[str], new_tokens: int, batch: int, device: str = "cpu",
                 dtype: Optional[torch.dtype] = None):
        from gitfast import Captioner

        self.paths, self.new_tokens = paths, new_tokens
        self.captioner = Captioner(checkpoint(model), device=device, dtype=dtype, max_batch_size=batch)
        self.processor = self.captioner.processor
        from gitfast.captioning.workers import draft_size

        self.draft = draft_size(self.processor.image_processor)
        self.data = self.read()
        self.rgb = self.decode()
        self.pixels = self.preprocess()
        self.captions = [r.text or "" for r in self.captioner.caption(paths[:1], max_new_tokens=1)] * len(paths)

    def read(self):
        out = []
        for p in self.paths:
            with open(p, "rb") as f:
                out.append(f.read())
        return out

    def decode(self, draft=None):
        from gitfast.captioning import images

        return [images.decode(d, draft) for d in self.data]

    def decode_draft(self):
        return self.decode(self.draft)

    def preprocess(self):
        return torch.cat([self.processor.pixel_values(im) for im in self.rgb])

    def encoder(self):
        model = self.captioner.model  # the Captioner holds the GitModel itself
        dtype = next(model.parameters()).dtype
        with torch.inference_mode():
            for chunk in self.pixels.split(self.captioner.max_batch_size):
                out = model.encode_images(chunk.to(self.captioner.device, dtype))
        if self.captioner.device.type == "cuda":
            torch.cuda.synchronize()
        return out

    def generate(self):
        from gitfast.serving.engine import Request
        from gitfast.serving.generation import resolve_settings

        c = self.captioner
        s = resolve_settings(c.generation_config, 1, max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens)
        return c._engine().generate([Request(px, [c._bos]) for px in self.pixels], s)

    def write(self, path: Optional[str] = None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"source": self.paths, "caption": self.captions, "error": pa.nulls(len(self.paths), pa.string())})
        pq.write_table(table, path or io.BytesIO())


def end_to_end(captioner, paths: List[str], new_tokens: int, out=None) -> int:
    """Files → captions → a Parquet file (or buffer), a record batch per `max_batch_size` results."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gitfast.captioning.sources import file_source

    schema = pa.schema([("source", pa.string()), ("caption", pa.string()), ("error", pa.string())])
    n, rows = 0, []
    with pq.ParquetWriter(out or io.BytesIO(), schema) as writer:
        for r in captioner.caption_iter((file_source(p) for p in paths), max_new_tokens=new_tokens,
                                        min_new_tokens=new_tokens):
            rows.append((r.source, r.text, r.error))
            n += 1
            if len(rows) == captioner.max_batch_size:
                writer.write_batch(pa.record_batch(list(map(list, zip(*rows))), schema=schema))
                rows = []
        if rows:
            writer.write_batch(pa.record_batch(list(map(list, zip(*rows))), schema=schema))
    return n


def cases(quick: bool, device: str, dtype: torch.dtype) -> Iterable[Case]:
    from gitfast import Captioner

    if dtype != torch.float32 and device == "cpu":
        return
    # on a GPU the rows measure the GPU: a git-base-shaped (random) model in the row's dtype; the
    # tiny model there would time the host's decoding and Python, not the device
    full_model = "git-base" if device == "cuda" else "tiny"
    n, model, new_tokens, batch = (8, "tiny", 4, 8) if quick else (64, full_model, 20, 32)
    dt = str(dtype).replace("torch.", "")
    paths = photo_folder(n)
    stages = Stages(model, paths, new_tokens, batch, device, dtype)
    shape = {"model": model, "images": n, "photo": f"{PHOTO[0]}x{PHOTO[1]}", "new_tokens": new_tokens, "batch": batch}
    label = f"{model} {n}x{PHOTO[0]}x{PHOTO[1]}"

    def case(provider, fn, reason=None, benchmark=SUITE):
        return Case(benchmark, shape, provider, dt, None if reason else fn, skip_reason=reason, label=label,
                    extra={"images": n})

    for stage in ("read", "decode", "decode_draft", "preprocess", "encoder", "generate", "write"):
        yield case(stage, getattr(stages, stage), benchmark=SUITE + "_stages")  # parts, not competitors
    yield case("gitfast_workers0", functools.partial(end_to_end, stages.captioner, paths, new_tokens))
    if quick:
        yield case("gitfast_workers1", None, reason="--quick: no worker pool start-up in the CPU smoke run")
        return
    pooled = Captioner(checkpoint(model), device=device, dtype=dtype, max_batch_size=batch, num_workers=1)
    end_to_end(pooled, paths[:2], 1)  # start the pool
    yield case("gitfast_workers1", functools.partial(end_to_end, pooled, paths, new_tokens))


# --- standalone ----------------------------------------------------------------------------------
def _timed(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _wall_and_cpu(fn, *args):
    """Wall seconds, and CPU seconds of this process only (what feeding the model costs it)."""
    t, c = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - t, time.process_time() - c


def breakdown(model: str, n: int, new_tokens: int, batch: int, workers: List[int], device: str, repeat: int,
              jpeg_draft: bool) -> dict:
    from gitfast import Captioner

    paths = photo_folder(n)
    stages = Stages(model, paths, new_tokens, batch, device)
    rows = {name: _timed(getattr(stages, name), repeat)
            for name in ("read", "decode", "decode_draft", "preprocess", "encoder", "generate", "write")}
    rows["prefill+decode loop"] = max(rows["generate"] - rows["encoder"], 0.0)
    e2e, main_cpu = {}, {}
    for w in workers:
        for draft in ([False, True] if jpeg_draft else [False]):
            name = f"workers={w}" + (" jpeg_draft" if draft else "")
            with Captioner(checkpoint(model), device=device, max_batch_size=batch, num_workers=w, jpeg_draft=draft) as c:
                end_to_end(c, paths[: 2 * batch], new_tokens)  # warm-up: worker start, first engine run
                e2e[name], main_cpu[name] = min(_wall_and_cpu(end_to_end, c, paths, new_tokens) for _ in range(repeat))
    return {"model": model, "images": n, "new_tokens": new_tokens, "batch": batch, "device": device,
            "torch_threads": torch.get_num_threads(), "stages_s": rows, "end_to_end_s": e2e,
            "end_to_end_main_cpu_s": main_cpu, "loadavg": os.getloadavg()[0],
            "draft_size": stages.draft, "date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count()}


def draft_agreement(n: int, model: str = "embedded", upscale: int = 4, new_tokens: int = 20) -> dict:
    """Captions of JPEGs decoded in full against draft-decoded: the share that is identical (and, on the
    embedded model's own shapes pictures, how often each equals the true caption)."""
    from gitfast import Captioner

    pictures = []
    if model == "embedded":
        import random

        from gitfast.training.shapes import draw_sample

        rng = random.Random(1234)
        for _ in range(n):
            image, truth = draw_sample(rng)
            pictures.append((image.resize((image.width * upscale, image.height * upscale), Image.BICUBIC), truth))
    else:
        pictures = [(photo(i), None) for i in range(n)]
    data = []
    for image, _ in pictures:
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        data.append(buf.getvalue())
    from gitfast.captioning.sources import Source

    srcs = [Source(str(i), functools.partial(bytes, d)) for i, d in enumerate(data)]
    full = Captioner(checkpoint(model), device="cpu").caption(srcs, max_new_tokens=new_tokens)
    draft_c = Captioner(checkpoint(model), device="cpu", jpeg_draft=True)
    draft = draft_c.caption(srcs, max_new_tokens=new_tokens)
    out = {"model": model, "images": n, "picture": f"{pictures[0][0].width}x{pictures[0][0].height} JPEG q90",
           "draft_size": draft_c.preparer.draft, "identical": sum(a.text == b.text for a, b in zip(full, draft)) / n}
    if pictures[0][1] is not None:
        out["correct_full"] = sum(r.text == t for r, (_, t) in zip(full, pictures)) / n
        out["correct_draft"] = sum(r.text == t for r, (_, t) in zip(draft, pictures)) / n
    return out


def memory(n: int, workers: int = 0, every: int = 0) -> dict:
    """RSS of this process over a stream of n small images (tiny random model, 4 new tokens)."""
    from gitfast import Captioner
    from gitfast.captioning.sources import Source

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    encoded = []
    for i in range(64):
        buf = io.BytesIO()
        photo(i, (48, 40)).save(buf, format="PNG" if i % 2 else "JPEG")
        encoded.append(buf.getvalue())
    stream = (Source(f"img{i}", functools.partial(bytes, encoded[i % 64])) for i in range(n))
    every = every or max(n // 20, 1)
    marks, t0 = [], time.perf_counter()
    with Captioner(checkpoint("tiny"), device="cpu", max_batch_size=32, num_workers=workers) as c:
        for i, r in enumerate(c.caption_iter(stream, max_new_tokens=4), 1):
            if not r.ok:
                raise RuntimeError(r.error)
            if i % every == 0 or i == n:
                marks.append((i, round(rss_mb(), 1)))
    at20 = next(m for i, m in marks if i >= n // 5)
    return {"images": n, "workers": workers, "seconds": round(time.perf_counter() - t0, 1), "rss_mb": marks,
            "growth_after_20pct_mb": round(marks[-1][1] - at20, 1), "peak_mb": max(m for _, m in marks)}


def transport(n: int = 1000) -> dict:
    """Worker → parent cost of one [1, 3, 224, 224] float32 array: numpy (pickled) vs a torch tensor
    (torch's shared-memory reduction), through a one-process spawn pool, 16 in flight."""
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    out = {}
    for name, fn in (("numpy_pickle", _np_item), ("torch_shared_memory", _torch_item)):
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
            ex.submit(fn, 0).result()
            t, q = time.perf_counter(), deque()
            for i in range(n):
                q.append(ex.submit(fn, i))
                if len(q) > 16:
                    torch.as_tensor(q.popleft().result())
            while q:
                q.popleft().result()
            out[name + "_ms_per_item"] = round((time.perf_counter() - t) / n * 1e3, 3)
    return out


def _np_item(i):
    return np.full((1, 3, 224, 224), i, np.float32)


def _torch_item(i):
    return torch.full((1, 3, 224, 224), float(i))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gitfast.bench.bench_pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="tiny (default; embedded for --draft-agreement), git-base, git-large (random "
                                   "weights), embedded, or a checkpoint folder")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    p.add_argument("--jpeg-draft", action="store_true", help="also run end to end with jpeg_draft=True")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (the best is kept)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in this process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--memory", type=int, metavar="N", help="instead: RSS over a stream of N small images")
    p.add_argument("--draft-agreement", type=int, metavar="N", help="instead: full vs draft JPEG decode captions")
    p.add_argument("--transport", action="store_true", help="instead: worker → parent transport costs")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        result = memory(args.memory, args.workers[0])
    elif args.draft_agreement:
        result = draft_agreement(args.draft_agreement, args.model or "embedded")
    elif args.transport:
        result = transport()
    else:
        result = breakdown(args.model or "tiny", args.images, args.new_tokens, args.batch, args.workers, args.device,
                           args.repeat, args.jpeg_draft)
        _print_breakdown(result)
    result["torch_threads"] = torch.get_num_threads()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if "stages_s" not in result:
        print(json.dumps(result, indent=1))
    return 0


def _print_breakdown(r: dict) -> None:
    n = r["images"]
    print(f"{r['model']}: {n} JPEGs {PHOTO[0]}x{PHOTO[1]} q90, {r['new_tokens']} new tokens, batch {r['batch']}, "
          f"{r['device']}, torch threads {r['torch_threads']}, {r['cpu_count']} CPUs, load {r['loadavg']:.1f}, "
          f"{r['date']}")
    print(f"{'stage (alone, serial)':24s} {'ms/image':>9s} {'images/s':>9s}")
    for name, s in r["stages_s"].items():
        print(f"{name:24s} {1e3 * s / n:9.2f} {n / s if s else float('inf'):9.1f}")
    print(f"{'end to end (to Parquet)':24s} {'ms/image':>9s} {'images/s':>9s} {'main-process CPU ms/image':>26s}")
    for name, s in r["end_to_end_s"].items():
        print(f"{name:24s} {1e3 * s / n:9.2f} {n / s:9.1f} {1e3 * r['end_to_end_main_cpu_s'][name] / n:26.2f}")


if __name__ == "__main__":
    sys.exit(main())
