//! The load signal P2C compares: per worker, its recent packet rate plus its live
//! allocations weighted as an average flow.
//!
//! A worker's cost is the packets it handles, so the rate is what balance means. But a new
//! allocation has no rate yet: it counts as one average flow (`flow_weight` packets/s) until
//! its own rate shows, and so does each flow the program placed since the last update
//! (see [`turn_common::SocketLoad::effective`]). With no traffic at all every flow weighs 1,
//! which makes P2C balance the number of allocations.

use std::time::Instant;

use turn_common::SocketLoad;

/// Time constant of the packet rate average, in seconds.
const RATE_TIME_CONSTANT_SECS: f64 = 1.0;

/// Computes each worker's load score from counters sampled over time.
#[derive(Debug, Clone)]
pub struct LoadEstimator {
    last: Option<(Instant, Vec<u64>)>,
    rate: Vec<f64>,
}

/// One update's result: what each socket publishes, before its group's `placed_seen`.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerLoads {
    /// Per worker: its score (packets/s plus allocations times `flow_weight`).
    pub scores: Vec<u64>,
    /// What one new flow weighs, in the same unit.
    pub flow_weight: u64,
    /// Per worker: the averaged packet rate.
    pub packet_rates: Vec<f64>,
}

impl WorkerLoads {
    /// The `SocketLoad` of worker `i` in a group whose placed counter for it is `placed`.
    pub fn socket_load(&self, i: usize, allocations: u64, placed: u64) -> SocketLoad {
        SocketLoad {
            score: self.scores.get(i).copied().unwrap_or(0),
            allocations,
            placed_seen: placed,
            flow_weight: self.flow_weight,
        }
    }
}

impl LoadEstimator {
    pub fn new(workers: usize) -> Self {
        Self { last: None, rate: vec![0.0; workers] }
    }

    /// Folds in a new sample: `packets[i]` is worker i's packet counter (monotonic),
    /// `allocations[i]` its live allocations, at time `now`.
    pub fn update(&mut self, now: Instant, packets: &[u64], allocations: &[u64]) -> WorkerLoads {
        if let Some((then, previous)) = &self.last {
            let dt = now.saturating_duration_since(*then).as_secs_f64();
            if dt > 0.0 {
                let alpha = 1.0 - (-dt / RATE_TIME_CONSTANT_SECS).exp();
                for (i, rate) in self.rate.iter_mut().enumerate() {
                    let delta = packets
                        .get(i)
                        .copied()
                        .unwrap_or(0)
                        .saturating_sub(previous.get(i).copied().unwrap_or(0));
                    *rate += alpha * (delta as f64 / dt - *rate);
                }
            }
        }
        self.last = Some((now, packets.to_vec()));

        let total_rate: f64 = self.rate.iter().sum();
        let total_allocations: u64 = allocations.iter().sum();
        let flow_weight = if total_allocations > 0 {
            (total_rate / total_allocations as f64).round().max(1.0) as u64
        } else {
            1
        };
        let scores = self
            .rate
            .iter()
            .enumerate()
            .map(|(i, rate)| {
                let allocations = allocations.get(i).copied().unwrap_or(0);
                (rate.round() as u64).saturating_add(allocations.saturating_mul(flow_weight))
            })
            .collect();
        WorkerLoads { scores, flow_weight, packet_rates: self.rate.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn idle_workers_score_their_allocations() {
        let mut est = LoadEstimator::new(3);
        let loads = est.update(Instant::now(), &[0, 0, 0], &[2, 0, 5]);
        assert_eq!(loads.flow_weight, 1);
        assert_eq!(loads.scores, vec![2, 0, 5]);
    }

    #[test]
    fn packet_rate_dominates_once_it_shows() {
        let mut est = LoadEstimator::new(2);
        let t0 = Instant::now();
        est.update(t0, &[0, 0], &[1, 1]);
        // Worker 0 carries 10x the packets of worker 1 for 5 s.
        let mut loads = est.update(t0, &[0, 0], &[1, 1]);
        for s in 1..=50u64 {
            let t = t0 + Duration::from_millis(100 * s);
            loads = est.update(t, &[10_000 * s, 1_000 * s], &[1, 1]);
        }
        let r = &loads.packet_rates;
        assert!((r[0] - 100_000.0).abs() < 1_000.0, "{r:?}");
        assert!((r[1] - 10_000.0).abs() < 200.0, "{r:?}");
        // Average flow: 110k pps over 2 allocations.
        assert!((loads.flow_weight as f64 - 55_000.0).abs() < 600.0, "{loads:?}");
        // Same allocations: the scores differ by the rates.
        let gap = loads.scores[0] as f64 - loads.scores[1] as f64;
        assert!((gap - 90_000.0).abs() < 1_500.0, "{loads:?}");
    }

    #[test]
    fn counter_going_backwards_is_not_negative() {
        let mut est = LoadEstimator::new(1);
        let t0 = Instant::now();
        est.update(t0, &[100], &[0]);
        let loads = est.update(t0 + Duration::from_secs(1), &[50], &[0]);
        assert_eq!(loads.scores, vec![0]);
    }

    #[test]
    fn socket_load_carries_the_group_counter() {
        let loads = WorkerLoads { scores: vec![7, 9], flow_weight: 3, packet_rates: vec![0.0; 2] };
        let l = loads.socket_load(1, 4, 11);
        assert_eq!(l, SocketLoad { score: 9, allocations: 4, placed_seen: 11, flow_weight: 3 });
        assert_eq!(loads.socket_load(5, 0, 0).score, 0);
    }
}
