"""The correctness contract in low precision: where gitfast's greedy tokens and transformers' differ,
the two choices must be a near-tie (each in the other's top-k at that step).

`compare_greedy` runs both models on the same images, finds the first divergence in each row, and at
that step reruns both models' forward on the shared prefix to check the near-tie. It reports the share
of identical sequences, which README's Correctness section publishes beside the fp16/bf16 results.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch


@dataclass
class Divergence:
    row: int
    step: int          # index of the first differing token within the generated part
    ours: int
    theirs: int
    near_tie: bool


@dataclass
class FidelityReport:
    rows: int
    identical: int
    divergences: List[Divergence] = field(default_factory=list)

    @property
    def identical_share(self) -> float:
        return self.identical / self.rows if self.rows else 1.0

    @property
    def all_near_ties(self) -> bool:
        return all(d.near_tie for d in self.divergences)


@torch.inference_mode()
def compare_greedy(ours, theirs, pixel_values, max_new_tokens: int = 20, top_k: int = 5) -> FidelityReport:
    """`ours`: gitfast.GitForCausalLM; `theirs`: transformers.GitForCausalLM (same weights and dtype)."""
    a = ours.generate(pixel_values=pixel_values, max_new_tokens=max_new_tokens).cpu()
    b = theirs.generate(pixel_values=pixel_values, max_new_tokens=max_new_tokens).cpu()
    width = max(a.shape[1], b.shape[1])
    pad = ours.generation_config.pad_token_id or 0
    a = torch.nn.functional.pad(a, (0, width - a.shape[1]), value=pad)
    b = torch.nn.functional.pad(b, (0, width - b.shape[1]), value=pad)
    report = FidelityReport(rows=a.shape[0], identical=0)
    for i in range(a.shape[0]):
        diff = (a[i] != b[i]).nonzero()
        if len(diff) == 0:
            report.identical += 1
            continue
        t = int(diff[0])
        prefix = a[i:i + 1, :t].to(pixel_values.device)
        px = pixel_values[i:i + 1]
        mine = ours(input_ids=prefix, pixel_values=px).logits[0, -1].float()
        other = theirs(input_ids=prefix, pixel_values=px).logits[0, -1].float()
        x, y = int(a[i, t]), int(b[i, t])
        near = x in other.topk(top_k).indices.tolist() and y in mine.topk(top_k).indices.tolist()
        report.divergences.append(Divergence(i, t - 1, x, y, near))
    return report
