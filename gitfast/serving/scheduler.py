"""The scheduler: which requests run, what KV cache they hold, when they are finished. No tensors.

The engine is three parts with one job each, and this module is the first:

    requests ──► Scheduler.schedule() ──► Plan ──► PlanExecutor.run(plan) ──► readback ──► Scheduler.emit()
                 (bookkeeping: this file)          (the model: executor.py)                  (Outputs)

- `Request`: what every front end hands the engine (the drop-in's greedy `generate`, `Captioner`,
  `gitfast caption`, Ray Data through the Captioner): prompt ids, the image's pixels and a key under
  which requests share one image prefix, an optional new-token limit. Settings (`generation.Settings`:
  greedy or sampling, EOS, lengths) are one per run: they pick the engine's mode for all its requests.
- `Scheduler`: owns the waiting queue (pulled lazily from the run's iterable, at most `max_rows`
  ahead), the running sequences, slot numbers and the image prefixes the look-ahead window still
  needs. `schedule()` admits waiting requests in order while the batch has room and the cache has
  every block their whole length can take (reserved up front, so a running sequence never runs out;
  a request that fits an empty cache waits; one that does not is refused, `KVCacheTooSmall`), takes
  their blocks and returns a `Plan`. `ran(plan)` advances the bookkeeping once the plan is launched;
  `emit(tokens)` appends read-back tokens and retires finished sequences (`stopping.finish_reason`),
  giving their blocks and slots back.
- `Plan`: new image prefixes to compute (their blocks already taken), sequences to start and prefill,
  and the sequences that take one decode step; plain data the executor runs.
- `kv_blocks` / `kv_budget`: the one formula for how much cache a set of sequences holds, exactly what
  admission reserves; the engine sizes its cache with it, and so does `paged_generate`.

Blocks are taken and given back through `paged_cache.KVBlocks` (bookkeeping only), so the scheduler
runs, and can be tested, without a model.
"""
