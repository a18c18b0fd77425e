"""kernels/grpo_inputs.py: the argument checks every GRPO function shares (one ValueError naming the argument),
the dtype policy's refusal of float64 on the Triton path, value checks only on CPU tensors, the Triton path
refused on CPU without the interpreter; and kernels/grpo.py's public names (tests/test_grpo.py is the GRPO
stage's file)."""

import pytest
import torch

import kernels
import kernels.grpo as grpo
from tests.grpo_kernel_cases import INTERPRETED, make_batch, loss_kwargs, float64_batch


def test_public_exports():
    for name in ("group_advantages", "fused_linear_logprobs", "grpo_loss", "fused_linear_grpo_loss", "GRPOStats",
                 "GroupAdvantages"):
        assert getattr(kernels, name) is getattr(grpo, name)


@pytest.mark.skipif(INTERPRETED, reason="kernels were imported under TRITON_INTERPRET=1")
def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    batch = make_batch(4, 5, 3, s=2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        grpo.group_advantages(torch.ones(4), 2, backend="triton")
    with pytest.raises(RuntimeError, match="before triton and kernels.grpo_logprobs are imported"):
        grpo.fused_linear_logprobs(batch["hidden"], batch["weight"], batch["targets"], backend="triton")


def _bad(name, value):
    """A change to one input of the batch (applied to a detached copy)."""
    return name, value


@pytest.mark.parametrize(
    "change,kwargs,match",
    [
        (_bad("seq_ids", lambda b: torch.where(b["seq_ids"] == 0, 6, b["seq_ids"])), {},
         r"seq_ids must lie in \[0, S\) = \[0, 6\); seq_ids\[\d+\] = 6"),
        (_bad("seq_ids", lambda b: b["seq_ids"].float()), {}, "seq_ids must have an integer dtype"),
        (_bad("seq_ids", lambda b: b["seq_ids"][:-1]), {}, "seq_ids must be 1-D with N = 37"),
        (_bad("mask", lambda b: b["mask"].float() * 2), {}, r"mask must be bool or hold only 0 and 1"),
        (_bad("mask", lambda b: b["mask"][:3]), {}, "mask must be 1-D"),
        (_bad("old_logprobs", lambda b: b["old_logprobs"][:-2]), {}, "old_logprobs must have N = 37"),
        (_bad("old_logprobs", lambda b: b["old_logprobs"].long()), {}, "old_logprobs must be floating point"),
        (_bad("ref_logprobs", lambda b: b["ref_logprobs"][None]), {}, "ref_logprobs must be 1-D"),
        (_bad("advantages", lambda b: b["advantages"][:, None]), {}, "advantages must be a 1-D floating"),
        (_bad("targets", lambda b: torch.full_like(b["targets"], 53)), {}, r"targets must lie in \[0, V\)"),
        (_bad("targets", lambda b: b["targets"].float()), {}, "targets must have an integer dtype"),
        (_bad("weight", lambda b: b["weight"][:, :-1]), {}, r"weight.shape\[1\]"),
        (_bad("weight", lambda b: b["weight"].double()), {}, "weight dtype"),
        (_bad("hidden", lambda b: b["hidden"][0]), {}, "hidden must be 2-D"),
        (None, dict(loss_type="ppo"), "loss_type"),
        (None, dict(importance_sampling_level="tokens"), "importance_sampling_level"),
        (None, dict(loss_type="dr_grpo", max_completion_length=None), "needs max_completion_length"),
        (None, dict(max_completion_length=0), "max_completion_length"),
        (None, dict(beta=0.1, ref_logprobs=None), "needs ref_logprobs"),
        (None, dict(beta=-0.1), "beta"),
        (None, dict(epsilon_low=1.5), "epsilon_low"),
        (None, dict(epsilon_high=float("nan")), "epsilon_high"),
        (None, dict(num_items_in_batch=0), "num_items_in_batch"),
        (None, dict(num_sequences=torch.ones(2)), "num_sequences"),
        (None, dict(temperature=0.0), "temperature"),
        (None, dict(chunk_size=0), "chunk_size"),
        (None, dict(chunk_bytes=-1), "chunk_bytes"),
        (None, dict(chunk_size=4, chunk_bytes=2**20), "chunk_size .* or chunk_bytes"),
        (None, dict(backend="cuda"), "backend"),
    ],
)
def test_bad_inputs_raise(change, kwargs, match):
    """One ValueError naming the argument, from the fused loss and (for what it shares) from grpo_loss."""
    batch = {k: t.detach() for k, t in make_batch().items()}
    if change is not None:
        batch[change[0]] = change[1](batch)
    kw = {**loss_kwargs(batch, "dr_grpo"), **kwargs}
    with pytest.raises(ValueError, match=match):
        grpo.fused_linear_grpo_loss(batch["hidden"], batch["weight"], batch["targets"], batch["old_logprobs"],
                                    batch["advantages"], batch["seq_ids"], **kw)
    linear_only = (change is not None and change[0] in ("hidden", "weight", "targets")) or {
        "temperature", "chunk_size", "chunk_bytes"} & set(kwargs)
    if not linear_only:
        logp = torch.zeros(37)
        with pytest.raises(ValueError, match=match):
            grpo.grpo_loss(logp, batch["old_logprobs"], batch["advantages"], batch["seq_ids"], **kw)


@pytest.mark.triton
def test_float64_refused_by_the_triton_path():
    """One ValueError at the API boundary naming the function and the argument, for every GRPO function, the
    primary input or any side input."""
    b = float64_batch(9, 7, 3, s=3)
    f32 = {k: t.detach().float() if t.is_floating_point() else t for k, t in b.items()}
    logp32 = torch.zeros(9)
    cases = [
        ("group_advantages", "rewards", lambda: grpo.group_advantages(torch.ones(4, dtype=torch.float64), 2,
                                                                      backend="triton")),
        ("fused_linear_logprobs", "hidden",
         lambda: grpo.fused_linear_logprobs(b["hidden"], b["weight"], b["targets"], backend="triton")),
        ("grpo_loss", "logprobs", lambda: grpo.grpo_loss(logp32.double(), None, b["advantages"], b["seq_ids"],
                                                         backend="triton")),
        ("grpo_loss", "old_logprobs", lambda: grpo.grpo_loss(logp32, b["old_logprobs"], f32["advantages"],
                                                             b["seq_ids"], backend="triton")),
        ("grpo_loss", "advantages", lambda: grpo.grpo_loss(logp32, None, b["advantages"], b["seq_ids"],
                                                           backend="triton")),
        ("fused_linear_grpo_loss", "hidden", lambda: grpo.fused_linear_grpo_loss(
            b["hidden"], b["weight"], b["targets"], None, f32["advantages"], b["seq_ids"], backend="triton")),
        ("fused_linear_grpo_loss", "importance_weights", lambda: grpo.fused_linear_grpo_loss(
            f32["hidden"], f32["weight"], b["targets"], None, f32["advantages"], b["seq_ids"],
            importance_weights=b["importance_weights"], importance_sampling_level="sequence", backend="triton")),
    ]
    for function, argument, call in cases:
        with pytest.raises(ValueError, match=rf"^{function}: {argument} has dtype float64; the Triton path accepts "
                                             r".*\(float64 runs on backend='reference'\)$"):
            call()


def test_value_checks_read_only_cpu_tensors():
    """Value checks read values on the host, so they run only on CPU tensors (no device to wait for); for a
    tensor elsewhere the check is never evaluated (no host sync per micro-batch)."""
    from kernels.grpo_inputs import check_values

    def never():
        raise AssertionError("a value check was evaluated for a tensor off the CPU")

    check_values([("seq_ids", torch.empty(3, device="meta"), never, "must lie in [0, S)")])
    with pytest.raises(ValueError, match=r"^seq_ids must lie in \[0, S\); seq_ids\[1\] = 5$"):
        check_values([("seq_ids", torch.tensor([0, 5]), lambda: torch.tensor([False, True]), "must lie in [0, S)")])
