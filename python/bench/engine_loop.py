"""The gate inside an engine-like loop: route, then an expert-sized torch matmul, alternating.

Measures what the CPU backend's idle spin costs the caller's own work: its worker threads spin
for the next call while torch's threads compute the matmul, on the same cores. For each token
count it times, per iteration (median of repetitions):

- the matmul alone (torch only), and the gate alone;
- the loop, and the matmul inside it, for each idle spin asked for.

The configurations take turns within every repetition, and the fastest repetition is kept: on a
machine shared with other work, interference only ever adds time.

    python python/bench/engine_loop.py --tokens 1,64,512 --spins-us 2000,0
"""

from __future__ import annotations

import argparse
import time

import torch

import sluice
from v3_gate import HIDDEN, v3_gate

EXPERT_WIDTH = 2048


def per_call(step, iterations: int) -> float:
    """The mean time of one call, in microseconds."""
    started = time.perf_counter()
    for _ in range(iterations):
        step()
    return (time.perf_counter() - started) / iterations * 1e6


def engine_loop(gate, hidden, expert, iterations: int) -> tuple[float, float]:
    """Per-iteration time of the loop, and of the matmul inside it, in microseconds."""
    in_matmul = 0.0
    started = time.perf_counter()
    for _ in range(iterations):
        gate.route(hidden)
        before = time.perf_counter()
        torch.matmul(hidden, expert)
        in_matmul += time.perf_counter() - before
    return (time.perf_counter() - started) / iterations * 1e6, in_matmul / iterations * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,64,512")
    parser.add_argument("--spins-us", default=f"2000,{sluice.DEFAULT_IDLE_SPIN_US},0")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--repetitions", type=int, default=7)
    args = parser.parse_args()
    spins = list(dict.fromkeys(int(s) for s in args.spins_us.split(",")))
    gates = {spin: v3_gate(sluice.CpuBackend(idle_spin_us=spin)) for spin in spins}
    # f32, where torch's CPU matmul is at its best (its bf16 path is far slower at small T).
    expert = torch.randn(HIDDEN, EXPERT_WIDTH) * 0.02
    threads = sluice.CpuBackend(idle_spin_us=0).threads
    print(f"torch {torch.__version__}: {torch.get_num_threads()} threads; sluice: {threads}")
    print("| T | matmul alone | gate alone | idle spin | loop | matmul in loop | loop - alone sum |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for tokens in (int(t) for t in args.tokens.split(",")):
        hidden = torch.randn(tokens, HIDDEN)
        iterations = max(5, args.iterations * 64 // max(tokens, 64))
        for _ in range(3):
            torch.matmul(hidden, expert)
        matmul_alone = float("inf")
        best = {spin: [float("inf")] * 3 for spin in gates}  # gate alone, loop, matmul in loop
        for _ in range(args.repetitions):
            step = per_call(lambda: torch.matmul(hidden, expert), iterations)
            matmul_alone = min(matmul_alone, step)
            for spin, gate in gates.items():
                gate_alone = per_call(lambda: gate.route(hidden), iterations)
                measured = (gate_alone, *engine_loop(gate, hidden, expert, iterations))
                best[spin] = [min(old, new) for old, new in zip(best[spin], measured)]
        for spin, (gate_alone, loop, in_loop) in best.items():
            print(f"| {tokens} | {matmul_alone:.0f} µs | {gate_alone:.0f} µs | {spin} µs | "
                  f"{loop:.0f} µs | {in_loop:.0f} µs | {loop - matmul_alone - gate_alone:+.0f} µs |")


if __name__ == "__main__":
    main()
