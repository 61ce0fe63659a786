#!/usr/bin/env python3
"""What placement policies can reach with exact, instant load knowledge (no daemon, no
kernel): the yardstick for `turn-bench balance --daemon`. Standard library only.

    python3 turn-bench/theory/balance.py

Static cases: m equal flows placed one by one on n sockets, busiest / mean, averaged over
trials. Churn: Poisson arrivals and exponential lifetimes (mean 8 s, 32 live on average) on
4 sockets, time-averaged busiest / mean of the live counts.
"""
import heapq
import random


def choose(policy, bins, rnd):
    n = len(bins)
    if policy == "hash":
        return rnd.randrange(n)
    if policy == "p2c":
        a, b = rnd.sample(range(n), 2)
        if bins[a] == bins[b]:
            return a if rnd.random() < 0.5 else b
        return a if bins[a] < bins[b] else b
    low = min(bins)  # least loaded of all, ties at random
    return rnd.choice([i for i in range(n) if bins[i] == low])


def static(policy, m, n=4, trials=20000, seed=2):
    rnd = random.Random(seed)
    total = 0.0
    for _ in range(trials):
        bins = [0] * n
        for _ in range(m):
            bins[choose(policy, bins, rnd)] += 1
        total += max(bins) / (m / n)
    return total / trials


def churn(policy, n=4, live=32, mean_life=8.0, horizon=5000.0, warmup=100.0, seed=1):
    rnd = random.Random(seed)
    rate = live / mean_life
    bins = [0] * n
    departures = []
    t, weighted, span = 0.0, 0.0, 0.0
    next_arrival = rnd.expovariate(rate)
    while t < horizon:
        nxt = min(departures[0][0] if departures else float("inf"), next_arrival)
        if t > warmup and sum(bins) > 0:
            weighted += max(bins) / (sum(bins) / n) * (nxt - t)
            span += nxt - t
        t = nxt
        if departures and departures[0][0] <= next_arrival:
            _, b = heapq.heappop(departures)
            bins[b] -= 1
        else:
            b = choose(policy, bins, rnd)
            bins[b] += 1
            heapq.heappush(departures, (t + rnd.expovariate(1 / mean_life), b))
            next_arrival = t + rnd.expovariate(rate)
    return weighted / span


if __name__ == "__main__":
    print("| case | hash | p2c | least |")
    print("| --- | ---: | ---: | ---: |")
    for m in (8, 64):
        cells = " | ".join(f"{static(p, m):.3f}" for p in ("hash", "p2c", "least"))
        print(f"| {m} equal flows on 4 sockets | {cells} |")
    cells = " | ".join(f"{churn(p):.3f}" for p in ("hash", "p2c", "least"))
    print(f"| churn, 32 live on 4 sockets (mean life 8 s) | {cells} |")
