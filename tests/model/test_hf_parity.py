"""Our logits against `transformers`' implementation of each family, on the same weights, in float32."""

import pytest
import torch

from leagues.model import ForwardBatch, load_pretrained

from .hf_cases import CASES, write_hf_checkpoint


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    hf_model = write_hf_checkpoint(case, tmp_path)
    ours = load_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, 96, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= 1e-5


@pytest.mark.parametrize("case", ["qwen3_moe", "qwen2_moe", "olmoe"])
def test_packed_varlen_matches_per_sequence(case, tmp_path):
    hf_model = write_hf_checkpoint(case, tmp_path)
    ours = load_pretrained(tmp_path)
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 96, (n,), generator=gen) for n in (5, 17, 1, 11)]
    with torch.no_grad():
        out = ours.run(ForwardBatch.packed(torch.cat(seqs), [len(s) for s in seqs]))
        refs = [hf_model(s[None]).logits[0] for s in seqs]
    assert rel_err(out.logits_TV, torch.cat(refs)) <= 1e-5
