"""trainer/run/lean_memory.py: a training command re-executes itself on a lean allocator where one is installed, and
TRL's fused LM head scores a CPU batch in small tiles with the same results."""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.config.paths import PROJECT_ROOT
from trainer.run import lean_memory

# What a training command runs first; the re-executed process prints what it runs on.
COMMAND = textwrap.dedent(
    """
    import json, os, sys
    from trainer.run import lean_memory

    print(os.getpid())  # once per execution
    name = lean_memory.use_lean_allocator({allocators!r})
    maps = open("/proc/self/maps").read()
    print(json.dumps({{"name": name, "loaded": "/lib{first}." in maps, "argv": sys.argv[1:],
                      "env": [k for k in ("LD_PRELOAD", lean_memory.MARK) if k in os.environ]}}))
    """
)


def run_command(allocators: tuple[str, ...], **env: str) -> dict:
    code = COMMAND.format(allocators=allocators, first=allocators[0])
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/")}
    out = subprocess.run(
        [sys.executable, "-c", code, "--flag"],
        cwd=PROJECT_ROOT,
        env=base | env,
        capture_output=True,
        text=True,
        check=True,
    )
    *pids, result = out.stdout.splitlines()
    return json.loads(result) | {"pids": pids}


@pytest.mark.skipif(ctypes.util.find_library("tcmalloc_minimal") is None, reason="libtcmalloc-minimal4 not installed")
def test_a_training_command_reexecutes_itself_on_tcmalloc_once():
    result = run_command(lean_memory.ALLOCATORS)
    assert len(result["pids"]) == 2 and len(set(result["pids"])) == 1  # ran twice, as one process
    assert result["name"] == "tcmalloc_minimal" and result["loaded"] and result["argv"] == ["--flag"]
    assert result["env"] == []  # the processes it starts (ranks, jobs) choose for themselves again


def test_without_an_installed_allocator_or_when_the_user_chose_the_command_runs_as_it_is():
    missing = run_command(("no-such-allocator",))
    assert missing["name"] is None and len(missing["pids"]) == 1
    assert run_command(lean_memory.ALLOCATORS, LORA_WORKBENCH_ALLOCATOR="system")["loaded"] is False
    assert run_command(lean_memory.ALLOCATORS, LD_PRELOAD="")["name"] is None


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op produces while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def trl_choice(trl_utils) -> object:
    """TRL's own `_use_triton`, before score_labelled_positions_only wrapped it."""
    return getattr(trl_utils._use_triton, "trl_choice", trl_utils._use_triton)


def fused_head(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """TRL's fused LM head as SFTTrainer runs it on a CPU: log-probs, entropy and top-1, then the backward. The
    vocabulary is one chunk here (SFTTrainer's chunk is 32768 entries, wider than this test's vocabulary)."""
    from trl.kernels import ChunkedLogProbFunction

    hidden = hidden.clone().requires_grad_()
    with LargestTensor() as seen:
        log_probs, entropy, _, _, is_top1 = ChunkedLogProbFunction.apply(
            hidden, weight, None, targets, 1.0, weight.shape[0], None, 1.0, ("log_probs", "entropy", "is_top1")
        )
        (-log_probs.sum()).backward()
    return (log_probs.detach(), entropy.detach(), is_top1, hidden.grad), seen.numel


def test_fused_head_scores_a_cpu_batch_in_small_tiles_with_the_same_results(monkeypatch: pytest.MonkeyPatch):
    import trl.kernels.chunked_logprob as kernel
    from trl.trainer import utils as trl_utils

    monkeypatch.setattr(trl_utils, "_use_triton", trl_choice(trl_utils))  # lean_training changes it; restored after
    # TRL's own default (4096), restored after the test: a training run earlier in this process capped it already
    monkeypatch.setattr(kernel, "TOKEN_CHUNK_SIZE", 4096)
    g = torch.Generator().manual_seed(0)
    tokens, width, vocab = 4 * lean_memory.HEAD_TILE_TOKENS, 32, 2048
    hidden, weight = torch.randn(tokens, width, generator=g), torch.randn(vocab, width, generator=g) / 4
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    default, default_largest = fused_head(hidden, weight, targets)

    assert lean_memory.lean_training(cuda=True)["fused_head_tile_tokens"] is None  # a GPU keeps TRL's tiles
    assert kernel.TOKEN_CHUNK_SIZE > lean_memory.HEAD_TILE_TOKENS
    assert lean_memory.lean_training(cuda=False) == {
        "allocator": lean_memory.loaded_allocator() or "system",
        "fused_head_tile_tokens": lean_memory.HEAD_TILE_TOKENS,
        "fused_head_labelled_only": True,
    }
    lean, lean_largest = fused_head(hidden, weight, targets)

    assert default_largest >= tokens * vocab  # TRL's tile: every position of the batch at once
    assert lean_largest <= lean_memory.HEAD_TILE_TOKENS * vocab
    for a, b in zip(default, lean, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def fused_step(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor):
    """One SFT forward and backward through TRL's fused LM head: per-token results, loss, every gradient, and the
    largest tensor any op made."""
    model.zero_grad()
    with LargestTensor() as seen:
        out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return (out.loss.detach(), out.log_probs.detach(), out.entropy.detach(), out.is_top1), grads, seen.numel


def test_on_a_cpu_the_fused_head_scores_only_labelled_positions_with_the_same_loss_and_gradients(
    monkeypatch: pytest.MonkeyPatch,
):
    import trl.kernels.chunked_logprob as kernel
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer import utils as trl_utils

    monkeypatch.setattr(trl_utils, "_use_triton", trl_choice(trl_utils))  # as TRL decides (a training in this
    # process may have changed it), restored afterwards
    original = trl_utils._use_triton
    monkeypatch.setattr(kernel, "TOKEN_CHUNK_SIZE", 4096)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    input_ids = torch.randint(0, config.vocab_size, (4, 64))
    labels = input_ids.clone()
    labels[:, :48] = -100  # a chat row: the prompt has no labels, its answer (the last 16 tokens) has
    every, every_grads, every_largest = fused_step(model, input_ids, labels)

    assert lean_memory.lean_training(cuda=True)["fused_head_labelled_only"] is None  # a GPU keeps TRL's choice
    assert lean_memory.lean_training(cuda=False)["fused_head_labelled_only"] is True
    wrapped = trl_utils._use_triton
    assert lean_memory.score_labelled_positions_only() and trl_utils._use_triton is wrapped  # not wrapped twice
    assert wrapped.trl_choice is original and not original(torch.device("cpu"))  # TRL's own: every position
    assert lean_memory.lean_training(cuda=False, compiled=True)["fused_head_labelled_only"] is None  # TRL's choice
    labelled, labelled_grads, labelled_largest = fused_step(model, input_ids, labels)

    # The head's tile is (positions scored, vocabulary chunk): every next-token position of the batch (4 x 63),
    # then only the labelled ones (4 x 16)
    positions, trained = 4 * 63, int((labels[:, 1:] != -100).sum())
    assert trained == 4 * 16 and every_largest >= positions * config.vocab_size
    assert labelled_largest * positions <= every_largest * trained
    for a, b in zip(every, labelled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert every_grads.keys() == labelled_grads.keys()
    for name, grad in every_grads.items():
        torch.testing.assert_close(grad, labelled_grads[name], rtol=1e-4, atol=1e-6, msg=name)

    # A batch with no label at all (prompts truncated to max_length) still yields a zero loss that backpropagates
    (loss, *_), grads, _ = fused_step(model, input_ids, torch.full_like(labels, -100))
    assert loss.item() == 0.0 and grads
