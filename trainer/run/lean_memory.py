"""Lean memory for a training process: an allocator that does not fragment, and TRL's fused LM head on the CPU in
small tiles over the trained tokens only.

    use_lean_allocator()  # first thing in a `lora-workbench train` process (trainer/cli.py): re-executes it
                          # under tcmalloc (or jemalloc) where one is installed, else returns
    lean_training(cuda)   # in the training process, before the trainer is built (trainer/run/train.py): the head

Where a CPU run's memory went (benchmarks/memory_phases.py; RESULTS.md, "Memory on a real model"), SmolLM2-135M
fp32, LoRA, 4 x 256 tokens: about 2.5 GB is live at the step's peak (weights, every layer's activations, the LM
head's tiles); glibc held 4.3-4.4 GB.

- glibc's malloc fragments. Its mmap threshold rises to the size of each freed mapping (up to 32 MiB), so from
  the first step every activation (a few MB each) comes from the heap, and the temporaries freed between the
  kept activations leave holes that later sizes do not fit: about 1 GB more than live by the end of a forward.
  Retention, not tensors. glibc's own knobs do not mend it at no cost: MALLOC_ARENA_MAX=2 changed nothing; a
  fixed 1 MiB mmap threshold reached the live peak but mapped and zeroed ~10 GB a step (2.6 M page faults), ~40%
  more CPU time; 4 and 8 MiB kept most of the fragmentation; malloc_trim between steps cannot lower a peak that
  forms inside one forward. tcmalloc (size classes, memory kept for reuse) reached the live peak with fewer page
  faults and less CPU time than glibc. An allocator is chosen when a process starts (LD_PRELOAD), so the training
  command re-executes itself once, same pid and arguments.
- TRL 1.16's fused LM head, on a device without Triton, scores every position in tiles of up to 4096 tokens by
  32768 vocabulary entries and folds each tile with whole-tile torch ops: at 4 x 256 tokens a 134 MB fp32 tile
  and, in its backward, about six temporaries of that size, all on top of every activation (the head's backward
  runs first). Tiles of 256 tokens make that a quarter, the same math for each token. On a GPU TRL folds each
  tile in place with Triton, so the tile is the whole cost there; it is left as TRL sets it.
- Off Triton devices TRL also scores every position, prompt and padding included, so that a compiler (Neuron) sees
  one tile shape per batch; the loss then drops the positions without a label. Eager CPU code compiles nothing, so
  there (unless `training.torch_compile`) the head scores only the labelled positions, as TRL does on a GPU: the
  same loss and gradients, and a persona row of the default example (about 60 tokens, 16 of them its answer) costs
  the head a quarter. README, "Memory on a CPU": the default example's 8 steps on one core 56.9 -> 45.0 s.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ALLOCATORS = ("tcmalloc_minimal", "jemalloc")  # first installed wins (Debian: libtcmalloc-minimal4, libjemalloc2)
MARK = "LORA_WORKBENCH_ALLOCATOR"  # set by the re-execution (the library); 'system' keeps glibc's malloc
HEAD_TILE_TOKENS = 256  # x 32768 vocabulary entries x 4 bytes: 32 MiB per fp32 tile


def loaded_allocator(allocators: tuple[str, ...] = ALLOCATORS) -> str | None:
    """Which of the allocators this process runs on, from its memory map."""
    maps = Path("/proc/self/maps").read_text()
    return next((name for name in allocators if f"/lib{name}." in maps), None)


def allocator_env(allocators: tuple[str, ...] = ALLOCATORS) -> dict[str, str]:
    """The environment that starts a process on the first installed allocator; empty where none is, or off Linux,
    or where the user chose already (LD_PRELOAD set, or LORA_WORKBENCH_ALLOCATOR)."""
    if platform.system() != "Linux" or "LD_PRELOAD" in os.environ or MARK in os.environ:
        return {}
    library = next(filter(None, map(ctypes.util.find_library, allocators)), None)
    if library is None:
        return {}
    # tcmalloc prints a line for every allocation over 1 GiB (a large model's weights): not news in training
    return {"LD_PRELOAD": library, MARK: library, "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 60)}


def use_lean_allocator(allocators: tuple[str, ...] = ALLOCATORS) -> str | None:
    """Re-execute this process (same pid, interpreter and arguments) on a lean allocator, once; in the
    re-executed process, return its name and take it out of the environment, so that subprocesses start as usual.
    None where none is installed or the user chose. Call it only from a command's own process (it replaces it)."""
    if MARK in os.environ and os.environ[MARK] == os.environ.get("LD_PRELOAD"):  # the re-executed process
        del os.environ["LD_PRELOAD"], os.environ[MARK]  # a rank or job this one starts re-executes on its own
        return loaded_allocator(allocators)
    env = allocator_env(allocators)
    if not env:
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], os.environ | env)


def small_head_tiles(tokens: int = HEAD_TILE_TOKENS) -> int | None:
    """Cap the token side of TRL's fused-LM-head tiles (read at every call); None where this TRL has no such knob."""
    try:
        from trl.kernels import chunked_logprob
    except ImportError:
        return None
    if not isinstance(getattr(chunked_logprob, "TOKEN_CHUNK_SIZE", None), int):
        return None
    chunked_logprob.TOKEN_CHUNK_SIZE = min(chunked_logprob.TOKEN_CHUNK_SIZE, tokens)
    return chunked_logprob.TOKEN_CHUNK_SIZE


def score_labelled_positions_only() -> bool:
    """Make TRL's fused LM head score only the positions with a label on a CPU too, as it does on a Triton device;
    False where this TRL decides that some other way (then it scores every position, as before)."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:
        return False
    # The SFT head asks this (the kernel module's own copy picks Triton or torch folding and stays as it is)
    decide = getattr(trl_utils, "_use_triton", None)
    if not callable(decide):
        return False
    if hasattr(decide, "trl_choice"):  # done already in this process
        return True

    def compact_on_cpu(device: torch.device) -> bool:
        return device.type == "cpu" or decide(device)

    compact_on_cpu.trl_choice = decide  # type: ignore[attr-defined]
    trl_utils._use_triton = compact_on_cpu
    return True


def lean_training(cuda: bool, compiled: bool = False) -> dict[str, str | int | bool | None]:
    """For the training process, once, before the trainer is built: the head's tiles and positions on a CPU (the
    positions as TRL chose where torch.compile runs: a labelled count that changes every batch would recompile);
    what the run trains with, for its `lean_memory` event."""
    return {
        "allocator": loaded_allocator() or "system",
        "fused_head_tile_tokens": None if cuda else small_head_tiles(),
        "fused_head_labelled_only": None if cuda or compiled else score_labelled_positions_only(),
    }
