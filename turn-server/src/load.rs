//! The load signal the steering program compares: what each worker spends, in packets per
//! second, with corrections for what the measured rate cannot show yet.
//!
//! A worker's cost is the datagrams it handles, so its measured rate counts every datagram
//! it receives: from clients on its listener sockets, from peers on its relay sockets, and
//! hand-offs from other workers (counted by the worker itself, see `WorkerStats`). The rate
//! is an exponential average with time constant [`RATE_TIME_CONSTANT_SECS`]: a flow that
//! starts shows in it gradually, one that ends fades gradually. Three corrections make the
//! published score say now what the rate will say later, each counted once:
//!
//! * **Placements waiting for their allocation.** Every flow the program places is counted
//!   (it bumps the slot's `placed` counter at once, and the program adds
//!   `placed - placed_seen` flows to the published score itself). The estimator keeps each
//!   placement as one flow of weight `w` until an allocation is created on that worker
//!   (which consumes the oldest waiting placement) or until [`PENDING_SECS`] pass without
//!   one (a Binding request, an attacker, a client that gave up).
//! * **New allocations** weigh `w` at creation, and that weight fades with the same time
//!   constant as the rate average, so that `prior + rate` goes smoothly from `w` to the
//!   allocation's own rate without counting it twice.
//! * **Ended allocations** take their share of the worker's rate with them at once: the
//!   share fades out of the correction as it fades out of the average.
//!
//! `w`, the weight of one new flow, is what an average allocation costs: the corrected load
//! over the live allocations, averaged over [`FLOW_WEIGHT_TIME_CONSTANT_SECS`]. It is only
//! updated while allocations exist, so an idle server keeps the last value instead of
//! collapsing to nothing (and a burst after a quiet spell is still spread by count). Before
//! any traffic it is [`INITIAL_FLOW_WEIGHT`]; its scale does not matter then, as every
//! score is zero.

use std::{collections::VecDeque, time::Instant};

/// Time constant of the packet rate average, in seconds.
pub const RATE_TIME_CONSTANT_SECS: f64 = 0.5;
/// Time constant of the flow weight average, in seconds.
pub const FLOW_WEIGHT_TIME_CONSTANT_SECS: f64 = 2.0;
/// How long a placement counts while no allocation follows it, in seconds.
pub const PENDING_SECS: f64 = 1.0;
/// Weight of a new flow before any allocation carried traffic (packets/s: an audio call,
/// 50 packets/s each way).
pub const INITIAL_FLOW_WEIGHT: f64 = 100.0;

/// One worker's counters at a sampling instant. All are monotonic but `allocations`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerSample {
    /// Datagrams the worker received (listeners, relays, hand-offs).
    pub packets: u64,
    /// Live allocations.
    pub allocations: u64,
    /// Allocations created so far.
    pub created: u64,
    /// Flows the program placed on the worker's sockets so far (all listener groups).
    pub placed: u64,
}

#[derive(Clone, Debug, Default)]
struct WorkerState {
    /// Exponential average of the packet rate.
    rate: f64,
    /// Weight of recent allocations not yet in `rate`.
    prior: f64,
    /// Rate of ended allocations still in `rate`.
    gone: f64,
    /// Placements waiting for an allocation: (when seen, how many).
    pending: VecDeque<(Instant, u64)>,
}

impl WorkerState {
    fn pending_flows(&self) -> u64 {
        self.pending.iter().map(|(_, n)| n).sum()
    }

    /// Removes `count` placements, oldest first.
    fn consume_pending(&mut self, mut count: u64) {
        while count > 0 {
            let Some(front) = self.pending.front_mut() else { return };
            let take = front.1.min(count);
            front.1 -= take;
            count -= take;
            if front.1 == 0 {
                self.pending.pop_front();
            }
        }
    }
}

/// Computes each worker's score from its counters sampled over time.
#[derive(Debug, Clone)]
pub struct LoadEstimator {
    last: Option<(Instant, Vec<WorkerSample>)>,
    workers: Vec<WorkerState>,
    flow_weight: f64,
}

/// One update's result.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerLoads {
    /// Per worker: its score, in packets/s.
    pub scores: Vec<u64>,
    /// What one new flow weighs, in the same unit.
    pub flow_weight: u64,
    /// Per worker: the averaged packet rate, without corrections.
    pub packet_rates: Vec<f64>,
    /// Per worker: placements still waiting for an allocation.
    pub pending: Vec<u64>,
}

impl WorkerLoads {
    /// The score of worker `i` (0 for an unknown worker).
    pub fn score(&self, i: usize) -> u64 {
        self.scores.get(i).copied().unwrap_or(0)
    }
}

impl LoadEstimator {
    pub fn new(workers: usize) -> Self {
        Self {
            last: None,
            workers: vec![WorkerState::default(); workers],
            flow_weight: INITIAL_FLOW_WEIGHT,
        }
    }

    /// Folds in the counters of every worker at time `now`.
    pub fn update(&mut self, now: Instant, samples: &[WorkerSample]) -> WorkerLoads {
        let w = self.flow_weight;
        let mut flow_weight_alpha = 0.0;
        if let Some((then, previous)) = &self.last {
            let dt = now.saturating_duration_since(*then).as_secs_f64();
            if dt > 0.0 {
                let keep = (-dt / RATE_TIME_CONSTANT_SECS).exp();
                flow_weight_alpha = 1.0 - (-dt / FLOW_WEIGHT_TIME_CONSTANT_SECS).exp();
                for (i, state) in self.workers.iter_mut().enumerate() {
                    let s = samples.get(i).copied().unwrap_or_default();
                    let p = previous.get(i).copied().unwrap_or_default();
                    // What the rate showed before this interval, per live allocation: the
                    // share an ended allocation takes with it.
                    let measured = (state.rate - state.gone).max(0.0);
                    let per_allocation = measured / p.allocations.max(1) as f64;
                    let packets = s.packets.saturating_sub(p.packets) as f64;
                    state.rate = state.rate * keep + (1.0 - keep) * packets / dt;
                    let created = s.created.saturating_sub(p.created);
                    // Live now = live before + created - ended.
                    let ended =
                        (p.allocations + created).saturating_sub(s.allocations).min(p.allocations);
                    state.prior = state.prior * keep + created as f64 * w;
                    state.gone =
                        (state.gone * keep + ended as f64 * per_allocation).min(state.rate);
                    let placed = s.placed.saturating_sub(p.placed);
                    if placed > 0 {
                        state.pending.push_back((now, placed));
                    }
                    state.consume_pending(created);
                    while state.pending.front().is_some_and(|(at, _)| {
                        now.saturating_duration_since(*at).as_secs_f64() >= PENDING_SECS
                    }) {
                        state.pending.pop_front();
                    }
                }
            }
        }
        self.last = Some((now, samples.to_vec()));

        // The average allocation's cost, from the corrected load; kept while idle.
        let allocations: u64 = samples.iter().map(|s| s.allocations).sum();
        let corrected: f64 =
            self.workers.iter().map(|s| (s.rate - s.gone).max(0.0) + s.prior).sum();
        if allocations > 0 && flow_weight_alpha > 0.0 {
            let current = corrected / allocations as f64;
            self.flow_weight += flow_weight_alpha * (current - self.flow_weight);
            self.flow_weight = self.flow_weight.max(1.0);
        }
        let w = self.flow_weight;
        let scores = self
            .workers
            .iter()
            .map(|s| {
                let load = (s.rate - s.gone).max(0.0) + s.prior + s.pending_flows() as f64 * w;
                load.round() as u64
            })
            .collect();
        WorkerLoads {
            scores,
            flow_weight: w.round().max(1.0) as u64,
            packet_rates: self.workers.iter().map(|s| s.rate).collect(),
            pending: self.workers.iter().map(WorkerState::pending_flows).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const TICK: Duration = Duration::from_millis(50);

    /// Drives an estimator over scripted counters: `step(t, samples)` changes the counters
    /// before each 50 ms tick.
    struct Script {
        est: LoadEstimator,
        t0: Instant,
        ticks: u32,
        samples: Vec<WorkerSample>,
    }

    impl Script {
        fn new(workers: usize) -> Script {
            let mut s = Script {
                est: LoadEstimator::new(workers),
                t0: Instant::now(),
                ticks: 0,
                samples: vec![WorkerSample::default(); workers],
            };
            s.tick();
            s
        }

        fn now(&self) -> Instant {
            self.t0 + TICK * self.ticks
        }

        fn tick(&mut self) -> WorkerLoads {
            let loads = self.est.update(self.now(), &self.samples);
            self.ticks += 1;
            loads
        }

        /// Runs `secs` of ticks with each worker receiving `pps[i]` packets/s.
        fn run(&mut self, secs: f64, pps: &[u64]) -> WorkerLoads {
            let ticks = ((secs / TICK.as_secs_f64()).round() as u32).max(1);
            let mut loads = None;
            for _ in 0..ticks {
                for (s, &r) in self.samples.iter_mut().zip(pps) {
                    s.packets += r / 20;
                }
                loads = Some(self.tick());
            }
            loads.unwrap_or_else(|| self.tick())
        }

        /// A flow placed on worker `i` that becomes an allocation at once.
        fn allocate(&mut self, i: usize) {
            self.samples[i].placed += 1;
            self.samples[i].created += 1;
            self.samples[i].allocations += 1;
        }

        fn end(&mut self, i: usize, count: u64) {
            self.samples[i].allocations -= count;
        }
    }

    #[test]
    fn steady_traffic_is_counted_once() {
        // Worker 0: 4 allocations at 500 pps each; worker 1: 1 at 500.
        let mut s = Script::new(2);
        for _ in 0..4 {
            s.allocate(0);
        }
        s.allocate(1);
        let loads = s.run(20.0, &[2000, 500]);
        // The score is the rate, not the rate plus the allocations on top.
        assert!((loads.score(0) as f64 - 2000.0).abs() < 40.0, "{loads:?}");
        assert!((loads.score(1) as f64 - 500.0).abs() < 15.0, "{loads:?}");
        // One flow weighs what the average allocation costs.
        assert!((loads.flow_weight as f64 - 500.0).abs() < 25.0, "{loads:?}");
    }

    #[test]
    fn a_new_allocation_weighs_a_flow_until_its_rate_shows() {
        let mut s = Script::new(2);
        s.allocate(0);
        s.allocate(1);
        let loads = s.run(20.0, &[500, 500]);
        assert!((loads.flow_weight as f64 - 500.0).abs() < 25.0, "{loads:?}");
        // A second allocation on worker 1: counted at once, before it sends anything...
        s.allocate(1);
        let at_once = s.run(0.05, &[500, 500]);
        assert!(at_once.score(1) as f64 > 950.0, "{at_once:?}");
        // ...and never twice while its rate ramps up.
        for secs in [0.2, 0.5, 1.0, 3.0] {
            let loads = s.run(secs, &[500, 1000]);
            let score = loads.score(1) as f64;
            assert!((900.0..1100.0).contains(&score), "after +{secs} s: {loads:?}");
        }
    }

    #[test]
    fn idle_after_load_forgets_the_last_session_but_not_the_flow_weight() {
        // The herd of the issue: worker 0 carried 4 flows, worker 1 none; all end.
        let mut s = Script::new(2);
        for _ in 0..4 {
            s.allocate(0);
        }
        s.run(20.0, &[2000, 0]);
        s.end(0, 4);
        // 200 ms later (far less than the rate average needs to fade)...
        let loads = s.run(0.2, &[0, 0]);
        assert!(loads.packet_rates[0] > 500.0, "the average still remembers: {loads:?}");
        // ...the score already says idle, and a new flow still weighs an allocation's cost.
        assert!(loads.score(0) < 50, "{loads:?}");
        assert!((loads.flow_weight as f64 - 500.0).abs() < 50.0, "{loads:?}");
        let later = s.run(10.0, &[0, 0]);
        assert_eq!(later.scores, vec![0, 0]);
        assert!((later.flow_weight as f64 - 500.0).abs() < 50.0, "{later:?}");
    }

    #[test]
    fn a_burst_of_placements_counts_until_allocations_follow() {
        let mut s = Script::new(3);
        s.allocate(2);
        s.run(20.0, &[0, 0, 300]);
        let w = s.tick().flow_weight;
        assert!((w as f64 - 300.0).abs() < 20.0, "{w}");
        // Eight flows placed within one tick: 3 on worker 0, 5 on worker 1; their
        // Allocate requests come two round trips later.
        s.samples[0].placed += 3;
        s.samples[1].placed += 5;
        let loads = s.run(0.2, &[0, 0, 300]);
        assert_eq!(loads.pending, vec![3, 5, 0]);
        assert!((loads.score(1) as f64 - 5.0 * w as f64).abs() < 30.0, "{loads:?}");
        // Worker 1's allocations arrive: each one replaces a waiting placement.
        for _ in 0..5 {
            s.samples[1].created += 1;
            s.samples[1].allocations += 1;
        }
        let loads = s.tick();
        assert_eq!(loads.pending, vec![3, 0, 0]);
        assert!((loads.score(1) as f64 - 5.0 * w as f64).abs() < 40.0, "{loads:?}");
        // Worker 0's three never allocate (Binding requests, say): they stop counting.
        let loads = s.run(PENDING_SECS, &[0, 0, 300]);
        assert_eq!(loads.pending, vec![0, 0, 0]);
        assert_eq!(loads.score(0), 0, "{loads:?}");
    }

    #[test]
    fn receive_heavy_workers_are_busy() {
        // Same allocation counts; worker 1's flows receive 10x what they send. The worker
        // counts relay datagrams too, so its packets (and score) show it.
        let mut s = Script::new(2);
        s.allocate(0);
        s.allocate(1);
        let loads = s.run(5.0, &[200, 1100]);
        assert!(loads.score(1) > 5 * loads.score(0), "{loads:?}");
    }

    #[test]
    fn counters_going_backwards_are_not_negative() {
        let mut s = Script::new(1);
        s.samples[0].packets = 100;
        s.samples[0].created = 3;
        s.samples[0].allocations = 3;
        s.tick();
        s.samples[0] = WorkerSample::default();
        let loads = s.run(8.0, &[0]);
        assert_eq!(loads.scores, vec![0]);
        assert!(loads.flow_weight >= 1);
    }
}
