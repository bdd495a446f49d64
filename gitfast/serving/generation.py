"""Token selection for `generate`: settings, logits processing, greedy/sampling loop and beam search.

The loops drive a *stepper* (anything with `step(tokens) -> logits` and `reorder(index)`, such as
`paged_runner.PagedStepper`) and reproduce transformers' generation semantics: the same processors in
the same order, EOS/max-length stopping, pad after finish, and its vectorised beam search (top 2K
continuations, length-normalised finished hypotheses, the same early-stopping heuristic), so that
with the same logits the same tokens come out.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import logits, stopping

# GenerationConfig fields gitfast implements; any other field set away from its default is refused
# rather than silently ignored.
SUPPORTED = {
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "do_sample", "num_beams", "temperature",
    "top_k", "top_p", "repetition_penalty", "length_penalty", "early_stopping", "eos_token_id", "pad_token_id",
    "bos_token_id", "num_return_sequences", "use_cache", "return_dict_in_generate", "output_scores",
    "decoder_start_token_id", "output_attentions", "output_hidden_states", "output_logits",
}
# GenerationConfig fields served by transformers' own logits processors (its `LogitsProcessorList`,
# built by the drop-in from the generation config) applied to gitfast's logits in the same loops;
# setting any of them takes the whole list instead of gitfast's fast steps (`logits.py`).
PROCESSOR_FIELDS = {
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "encoder_repetition_penalty", "bad_words_ids",
    "sequence_bias", "remove_invalid_values", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
    "forced_eos_token_id", "exponential_decay_length_penalty", "renormalize_logits", "epsilon_cutoff",
    "eta_cutoff", "typical_p", "min_p", "top_h",
}


@dataclass
class Settings:
    max_length: int
    min_length: int
    min_new_tokens: int
    do_sample: bool
    num_beams: int
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    length_penalty: float
    early_stopping: object  # True, False or "never", as transformers
    eos: List[int]
    pad: int
    num_return_sequences: int
    return_dict: bool
    output_scores: bool
    output_logits: bool = False
    hf_processors: bool = False  # a PROCESSOR_FIELDS field is set: transformers' processor list applies
    pad_given: bool = True       # pad_token_id or eos_token_id set (else `pad` is a stand-in 0 that marks no padding)


def resolve_settings(base_config, prompt_len: int, generation_config=None, **kwargs) -> Settings:
    """Merges the model's generation config, an explicit `generation_config` and keyword overrides. A
    config is transformers' `GenerationConfig` or the Captioner's `plain_generation.PlainGenerationConfig`
    (same surface, no transformers import); "changed" is against a default instance of its own class."""
    gc = copy.deepcopy(generation_config if generation_config is not None else base_config)
    unused = gc.update(**kwargs)
    if unused:
        raise TypeError(f"generate() got unsupported arguments: {', '.join(sorted(unused))}")
    default = type(gc)()
    changed = [k for k, v in gc.to_diff_dict().items()
               if not k.startswith("_") and k != "transformers_version" and getattr(default, k, None) != v]
    unsupported = [k for k in changed if k not in SUPPORTED and k not in PROCESSOR_FIELDS]
    if unsupported:
        raise NotImplementedError(f"gitfast's generate does not implement: {', '.join(sorted(unsupported))}")
    if gc.max_new_tokens is not None:
        max_length = prompt_len + gc.max_new_tokens
    else:
        max_length = gc.max_length if gc.max_length is not None else 20
    min_length = gc.min_length or 0
    eos = stopping.eos_ids(gc.eos_token_id)
    pad = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if eos else 0)
    if gc.num_beams is not None and gc.num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {gc.num_beams}")
    num_beams = gc.num_beams or 1
    nrs = gc.num_return_sequences or 1
    if nrs > num_beams and num_beams > 1:
        raise ValueError(f"num_return_sequences ({nrs}) must be <= num_beams ({num_beams})")
    if nrs > 1 and num_beams == 1 and not gc.do_sample:
        raise ValueError("greedy search returns one sequence per input; use num_return_sequences=1, "
                         "do_sample=True or num_beams>1")
    if gc.temperature is not None and gc.do_sample and gc.temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {gc.temperature}")
    return Settings(
        max_length=max_length, min_length=min_length, min_new_tokens=gc.min_new_tokens or 0,
        do_sample=bool(gc.do_sample), num_beams=num_beams,
        temperature=1.0 if gc.temperature is None else float(gc.temperature),
        top_k=0 if gc.top_k is None else int(gc.top_k), top_p=1.0 if gc.top_p is None else float(gc.top_p),
        repetition_penalty=1.0 if gc.repetition_penalty is None else float(gc.repetition_penalty),
        length_penalty=1.0 if gc.length_penalty is None else float(gc.length_penalty),
        early_stopping=gc.early_stopping if gc.early_stopping is not None else False,
        eos=eos, pad=pad, pad_given=gc.pad_token_id is not None or bool(eos), num_return_sequences=nrs,
        return_dict=bool(gc.return_dict_in_generate), output_scores=bool(gc.output_scores),
        output_logits=bool(gc.output_logits), hf_processors=any(k in PROCESSOR_FIELDS for k in changed),
    )


# --- logits processing for the loops (the steps are `logits.py`'s) ------------------------------------

class Processor:
    """Turns raw next-token scores into the scores tokens are chosen from, given the ids so far."""

    def __init__(self, s: Settings, prompt_len: int, pad_lengths: Optional[torch.Tensor], vocab: int, device):
        self.s, self.prompt_len, self.pad_lengths = s, prompt_len, pad_lengths
        self.eos_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        if s.eos:
            self.eos_mask[torch.tensor(s.eos, device=device)] = True
        keep = (len(s.eos) + 1) if s.num_beams > 1 else 1  # beams must keep a non-EOS continuation
        self.min_keep = keep

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        s = self.s
        cur = ids.shape[1]
        too_short = (s.min_length > 0 and cur < s.min_length) or (s.min_new_tokens > 0
                                                                  and cur - self.prompt_len < s.min_new_tokens)
        seen = self._seen(ids, scores) if s.repetition_penalty != 1.0 else None
        return logits.process(scores, s, seen=seen, too_short=too_short, eos_mask=self.eos_mask,
                              min_keep=self.min_keep)

    def _seen(self, ids, scores):
        """Tokens in `ids` so far, left padding excluded: [B, vocab] bool."""
        seen = torch.zeros(scores.shape[0], scores.shape[1] + 1, dtype=torch.bool, device=scores.device)
        if self.pad_lengths is not None:
            cols = torch.arange(ids.shape[1], device=ids.device)[None, :]
            ids = torch.where(cols < self.pad_lengths[:, None], scores.shape[1], ids)
        return seen.scatter_(1, ids, True)[:, :-1]


# --- greedy and sampling ------------------------------------------------------------------------

def sample_or_greedy(stepper, logits, ids, s: Settings, proc: Processor):
    """One token per row per step until every row hit EOS or max_length. Returns (ids, scores)."""
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    eos = torch.tensor(s.eos, device=ids.device) if s.eos else None
    all_scores = []
    while True:
        scores = proc(ids, logits.float())
        if s.output_scores:
            all_scores.append(scores)
        if s.do_sample:
            nxt = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            nxt = torch.argmax(scores, dim=-1)
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, s.pad))
        ids = torch.cat([ids, nxt[:, None]], dim=-1)
        if eos is not None:
            unfinished &= ~torch.isin(nxt, eos)
        if ids.shape[1] >= s.max_length or not bool(unfinished.any()):
            return ids, all_scores
        logits = stepper.step(nxt)


# --- beam search ----------------------------------------------------------------------------------

def _take(t, index):
    """Selects along dim 1 (beams) of a [batch, beams, ...] tensor."""
    while index.ndim < t.ndim:
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


class _Finished(NamedTuple):
    """The k best finished hypotheses of each batch row."""
    seqs: torch.Tensor     # [b, k, max_length]
    scores: torch.Tensor   # [b, k] length-normalised; -1e9 where none yet
    flags: torch.Tensor    # [b, k] bool: a hypothesis is there
    lengths: torch.Tensor  # [b, k] tokens generated


def _candidates(logp, running, running_scores, cur: int, keep: int, s: Settings, eos):
    """The `keep` best (or, sampling, drawn) continuations over each row's beams, best first:
    (scores, source beam, token, sequence with the token at `cur`, whether it stops there)."""
    b, k, _ = running.shape
    vocab = logp.shape[-1]
    total = (logp.view(b, k, vocab) + running_scores[:, :, None]).view(b, k * vocab)
    if s.do_sample:
        cand = torch.multinomial(F.softmax(total, dim=-1), num_samples=keep)
        cand_scores, order = torch.gather(total, 1, cand).sort(dim=-1, descending=True)
        cand = cand.gather(1, order)  # best first, as transformers (the first k may finish a beam)
    else:
        cand_scores, cand = torch.topk(total, keep)
    cand_beam, cand_tok = cand // vocab, cand % vocab
    cand_seq = _take(running, cand_beam)
    cand_seq[:, :, cur] = cand_tok
    stops = torch.full_like(cand_tok, cur + 1 >= s.max_length, dtype=torch.bool)
    if eos is not None:
        stops |= torch.isin(cand_tok, eos)
    return cand_scores, cand_beam, cand_tok, cand_seq, stops


def _add_finished(done: _Finished, cand, first_k, gen_len: int, improvable, s: Settings) -> _Finished:
    """Candidates among the top k that stopped become finished hypotheses if they beat the worst one."""
    cand_scores, _, cand_tok, cand_seq, stops = cand
    finished = stops & first_k[None, :]
    norm = cand_scores / (gen_len ** s.length_penalty)
    full = done.flags.all(dim=-1, keepdim=True) & (s.early_stopping is True)
    norm = norm + full.float() * -1e9 + (~improvable).float() * -1e9 + (~finished).float() * -1e9
    merged = torch.topk(torch.cat([done.scores, norm], dim=1), done.scores.shape[1]).indices
    return _Finished(_take(torch.cat([done.seqs, cand_seq], dim=1), merged),
                     _take(torch.cat([done.scores, norm], dim=1), merged),
                     _take(torch.cat([done.flags, finished], dim=1), merged),
                     _take(torch.cat([done.lengths, torch.full_like(cand_tok, gen_len)], dim=1), merged))


def beam_search(stepper, logits, ids, s: Settings, proc: Processor):
    """Beam search over `ids` [batch * beams, prompt_len] (rows already expanded per beam).

    Returns (sequences [batch * num_return_sequences, len], their length-normalised scores).
    """
    k = s.num_beams
    n, prompt_len = ids.shape
    b = n // k
    dev = ids.device
    keep = max(2, 1 + len(s.eos)) * k  # candidates kept per step: enough to continue k beams past EOS
    first_k = torch.zeros(keep, dtype=torch.bool, device=dev)
    first_k[:k] = True
    eos = torch.tensor(s.eos, device=dev) if s.eos else None

    # transformers fills beam outputs with `pad or eos` (a pad id of 0 counts as unset) and -1 without EOS
    fill = (s.pad or s.eos[0]) if s.eos else -1
    running = torch.full((b, k, s.max_length), fill, dtype=torch.long, device=dev)
    running[:, :, :prompt_len] = ids.view(b, k, prompt_len)
    running_scores = torch.zeros(b, k, device=dev)
    running_scores[:, 1:] = -1e9  # all beams start identical: expand only the first
    done = _Finished(running.clone(), torch.full((b, k), -1e9, device=dev),
                     torch.zeros(b, k, dtype=torch.bool, device=dev), torch.zeros(b, k, dtype=torch.long, device=dev))
    improvable = torch.ones(b, 1, dtype=torch.bool, device=dev)
    cur = prompt_len
    offsets = torch.arange(b, device=dev)[:, None] * k
    while True:
        logp = proc(running[:, :, :cur].reshape(n, cur), F.log_softmax(logits.float(), dim=-1))
        cand = _candidates(logp, running, running_scores, cur, keep, s, eos)
        cand_scores, cand_beam, _, cand_seq, stops = cand
        # the best k candidates that did not stop keep running
        live = cand_scores + stops.float() * -1e9
        pick = torch.topk(live, k).indices
        running, running_scores = _take(cand_seq, pick), _take(live, pick)
        source_rows = (_take(cand_beam, pick) + offsets).view(-1)
        done = _add_finished(done, cand, first_k, cur + 1 - prompt_len, improvable, s)
        cur += 1
        # early-stopping heuristic: can a running beam still beat the worst finished one?
        if s.early_stopping == "never" and s.length_penalty > 0.0:
            best_len = s.max_length - prompt_len
        else:
            best_len = cur - prompt_len
        best_running = running_scores[:, :1] / (best_len ** s.length_penalty)
        worst_done = torch.where(done.flags, done.scores.min(dim=1, keepdim=True).values, -1.0e9)
        improvable = improvable & (best_running > worst_done).any(dim=-1, keepdim=True)
        open_beam = not (bool(done.flags.all()) and s.early_stopping is True)
        if not (bool(improvable.any()) and open_beam and not bool(stops.all())):
            break
        stepper.reorder(source_rows)
        logits = stepper.step(running[:, :, cur - 1].reshape(-1))

    r = s.num_return_sequences
    seqs = done.seqs[:, :r].reshape(b * r, -1)
    length = prompt_len + int(done.lengths[:, :r].max())
    return seqs[:, :length], done.scores[:, :r].reshape(-1)
