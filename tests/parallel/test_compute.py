"""One rank without FSDP (`leagues.parallel.compute`) against FSDP2 on the same group of one, on the CPU.

A process group of one gloo rank; two copies of a seeded model with bf16 compute over float32 masters: one through
`parallelize` (compute copies, no FSDP), one through `apply_fsdp` (what one rank ran before). Two micro-batches,
then AdamW, twice: the float32 gradients, the updated masters and the next forward must be equal bit for bit, and
the copies handed to weight sync must be the masters as the compute cast rounds them.
"""

import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from leagues.model import ForwardBatch
from leagues.parallel import ParallelConfig, apply_fsdp, build_mesh, compute_weights, parallelize, refresh
from leagues.parallel.fsdp import set_last_microbatch, whole_parameters
from tests import processes
from tests.parallel.test_parallel import free_port, make_model

LENGTHS = [[5, 7], [3, 9, 4]]  # two micro-batches of packed sequences


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _equal(xs, ys, exact: bool = True, atol: float = 1e-6) -> bool:
    """Bit for bit; or (`exact` False: on a GPU, where FSDP's gathered views may pick other GEMM kernels than
    whole tensors do) within bf16 rounding of the largest value."""
    pairs = [(_local(x), _local(y)) for x, y in zip(xs, ys, strict=True)]
    if exact:
        return all(torch.equal(x, y) for x, y in pairs)
    return all(x.dtype == y.dtype and bool(((x - y).abs() <= 2e-2 * y.abs().max() + atol).all()) for x, y in pairs)


def _passes(model, cfg: ParallelConfig, scale_D: torch.Tensor) -> list[torch.Tensor]:
    """Forward and backward over both micro-batches; the hidden states of each."""
    hidden = []
    with compute_weights(model):
        for i, lengths in enumerate(LENGTHS):
            set_last_microbatch(model, cfg, last=i == len(LENGTHS) - 1)
            ids_T = (torch.arange(sum(lengths)) * (7 + i) % 64).to(scale_D.device)
            out = model.run(ForwardBatch.packed(ids_T, lengths, compute_logits=False))
            (out.hidden_TD.float() * scale_D).sum().backward()
            hidden.append(out.hidden_TD.detach().float())
    return hidden


def _compare(port: int, results, device: str) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    exact = device == "cpu"
    try:
        cfg = ParallelConfig(param_dtype="bfloat16")
        ours, fsdp = make_model().to(device), make_model().to(device)
        parallelize(ours, cfg, 1, device)
        apply_fsdp(fsdp, build_mesh(cfg, 1, device), cfg, device)
        models = {"ours": ours, "fsdp": fsdp}
        optims = {k: torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=True) for k, m in models.items()}
        scale_D = torch.randn(ours.config.dim, generator=torch.Generator().manual_seed(1)).to(device)
        report = {"fsdp_free": not any(isinstance(m, FSDPModule) for m in ours.modules())}
        for step in range(2):
            hidden = {k: _passes(m, cfg, scale_D) for k, m in models.items()}
            report[f"hidden{step}"] = _equal(hidden["ours"], hidden["fsdp"], exact)
            grads = [(p.grad, _local(q.grad)) for p, q in zip(ours.parameters(), fsdp.parameters(), strict=True)]
            same = lambda g, h: g is h is None or (g.dtype == torch.float32 and _equal([g], [h], exact))  # noqa: E731
            report[f"grads{step}"] = all(same(g, h) for g, h in grads) and any(g is not None for g, _ in grads)
            for optim in optims.values():
                optim.step()
                optim.zero_grad(set_to_none=True)
            refresh(ours)
        pairs = zip(ours.parameters(), fsdp.parameters(), strict=True)
        # (a GPU: AdamW turns a near-zero gradient's sign into a whole step, at most 2 x lr over two steps)
        report["masters"] = all(p.dtype == torch.float32 and _equal([p], [q], exact, atol=0.04) for p, q in pairs)
        synced = whole_parameters(ours)
        masters = dict(ours.named_parameters())
        report["sync"] = all(t.dtype == torch.bfloat16 and torch.equal(t, masters[n].bfloat16()) for n, t in synced)
        start = make_model().to(device).parameters()
        report["moved"] = sum(not _equal([p], [q]) for p, q in zip(ours.parameters(), start, strict=True))
        with torch.no_grad():  # an edit of a master outside any step reaches the next forward
            ours.norm.weight.mul_(2.0)
            fsdp.norm.weight.mul_(2.0)
        hidden = {k: _passes(m, cfg, scale_D) for k, m in models.items()}
        report["edited"] = _equal(hidden["ours"], hidden["fsdp"], exact)
        results.put(report)
    except Exception as error:  # the test fails at once with it, not after the queue's timeout
        results.put({"error": repr(error)})
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_one_rank_compute_copies_train_bit_for_bit_as_fsdp_on_a_group_of_one(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    ctx = processes.context()
    results = ctx.Queue()
    proc = ctx.Process(target=_compare, args=(free_port(), results, device))
    proc.start()
    report = results.get(timeout=120)
    proc.join(timeout=60)
    assert "error" not in report, report["error"]
    assert proc.exitcode == 0
    moved = report.pop("moved")
    assert moved > 10  # both steps changed the weights, so equality means something
    assert report == {k: True for k in report}, report


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compute_weights_swaps_copies_in_and_masters_back(dtype):
    from leagues.parallel import apply_compute_copies

    model = make_model()
    masters = [p for p in model.parameters()]
    apply_compute_copies(model, dtype)
    with compute_weights(model):
        inside = list(model.parameters())
        with compute_weights(model):  # nested: still the copies
            assert all(a is b for a, b in zip(inside, model.parameters(), strict=True))
        out = model.run(ForwardBatch.packed(torch.arange(6), [6], compute_logits=False))
        out.hidden_TD.float().sum().backward()
    assert all(a is b for a, b in zip(masters, model.parameters(), strict=True))  # masters back at rest
    assert all(p.dtype == dtype for p in inside)
    if dtype != torch.float32:  # (float32: no copies, the masters ran themselves)
        assert all(p.grad is None for p in inside)  # folded into the masters and freed
    unused = {id(model.lm_head.weight)} if model.lm_head is not None else set()  # `run` stops before the LM head
    assert all(m.grad is not None and m.grad.dtype == torch.float32 for m in masters if id(m) not in unused)
    assert all((a is b) == (dtype == torch.float32) for a, b in zip(masters, inside, strict=True))
