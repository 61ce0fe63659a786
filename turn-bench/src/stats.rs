//! Pure statistics: a bounded log-linear latency histogram with percentiles, exact
//! nearest-rank percentiles over a sorted slice, and Jain's fairness index.

use serde::Serialize;

/// Sub-buckets per power of two (relative bucket width at most 1/64, about 1.6%).
const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
/// Enough buckets for any u64.
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB as usize;

/// Bucket index of a value: exact below 64, then 64 sub-buckets per power of two.
fn bucket_of(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS
    let shift = exp - SUB_BITS;
    let mantissa = (v >> shift) & (SUB - 1);
    ((exp - SUB_BITS + 1) as usize) * SUB as usize + mantissa as usize
}

/// Smallest value of a bucket and its width.
fn bucket_range(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < SUB {
        return (i, 1);
    }
    let group = i / SUB; // >= 1
    let mantissa = i % SUB;
    let shift = group - 1;
    ((SUB + mantissa) << shift, 1u64 << shift)
}

/// A fixed-size histogram of u64 samples (nanoseconds here): memory is bounded whatever
/// the number of samples, and percentiles are within one bucket (about 1.6%) of the exact
/// value; min and max are exact.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    n: u64,
    min: u64,
    max: u64,
    sum: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub fn new() -> Self {
        Histogram { counts: vec![0; BUCKETS], n: 0, min: u64::MAX, max: 0, sum: 0 }
    }

    pub fn record(&mut self, v: u64) {
        self.counts[bucket_of(v)] += 1;
        self.n += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum += u128::from(v);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.n += other.n;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sum += other.sum;
    }

    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.n
    }

    /// Nearest-rank percentile (`q` in 0..=1): the value of the sample of rank
    /// `ceil(q * n)`, reported as the middle of its bucket (clamped to min/max).
    pub fn percentile(&self, q: f64) -> Option<u64> {
        if self.n == 0 {
            return None;
        }
        let rank = nearest_rank(self.n, q);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, width) = bucket_range(i);
                let mid = lo + (width - 1) / 2;
                return Some(mid.clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }

    pub fn summary(&self) -> Option<Percentiles> {
        Some(Percentiles {
            samples: self.n,
            min: self.min,
            p50: self.percentile(0.50)?,
            p90: self.percentile(0.90)?,
            p99: self.percentile(0.99)?,
            p999: self.percentile(0.999)?,
            max: self.max,
            mean: (self.sum / u128::from(self.n)) as u64,
        })
    }
}

/// Percentiles of a distribution, in the unit of the samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    pub samples: u64,
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: u64,
}

/// 1-based rank of the nearest-rank percentile `q` among `n` samples.
fn nearest_rank(n: u64, q: f64) -> u64 {
    let q = q.clamp(0.0, 1.0);
    ((q * n as f64).ceil() as u64).clamp(1, n)
}

/// Exact nearest-rank percentile of an ascending slice (the reference for the histogram).
#[cfg(test)]
pub fn percentile_sorted(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = nearest_rank(sorted.len() as u64, q);
    sorted.get(rank as usize - 1).copied()
}

/// Jain's fairness index `(sum x)^2 / (n * sum x^2)`: 1 when every flow got the same,
/// `1/n` when one flow got everything. `None` for no flows or nothing delivered.
pub fn jain_index(xs: &[u64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let sum: f64 = xs.iter().map(|&x| x as f64).sum();
    let sum_sq: f64 = xs.iter().map(|&x| (x as f64) * (x as f64)).sum();
    if sum_sq == 0.0 {
        return None;
    }
    Some(sum * sum / (xs.len() as f64 * sum_sq))
}

/// Per-flow fairness of delivered counts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Fairness {
    /// Jain's index over per-flow delivered packets (1 = perfectly even).
    pub jain: Option<f64>,
    pub min: u64,
    pub max: u64,
    pub mean: f64,
    /// Flows that delivered nothing in the measured interval.
    pub starved_flows: usize,
}

pub fn fairness(xs: &[u64]) -> Fairness {
    let n = xs.len().max(1) as f64;
    Fairness {
        jain: jain_index(xs),
        min: xs.iter().copied().min().unwrap_or(0),
        max: xs.iter().copied().max().unwrap_or(0),
        mean: xs.iter().sum::<u64>() as f64 / n,
        starved_flows: xs.iter().filter(|&&x| x == 0).count(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn buckets_cover_and_order() {
        let mut prev = 0;
        for v in (0..5000u64).chain([u64::MAX / 3, u64::MAX - 1, u64::MAX]) {
            let b = bucket_of(v);
            assert!(b < BUCKETS);
            assert!(b >= prev, "monotonic");
            prev = b;
            let (lo, w) = bucket_range(b);
            assert!(lo <= v && v - lo < w, "{v} in bucket {b} = [{lo}, +{w})");
        }
        // Relative width at most 1/64.
        for v in [100u64, 1_000, 123_456, 9_999_999_999] {
            let (lo, w) = bucket_range(bucket_of(v));
            assert!((w as f64) / (lo as f64) <= 1.0 / 64.0 + 1e-12);
        }
    }

    #[test]
    fn exact_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile_sorted(&v, 0.5), Some(50));
        assert_eq!(percentile_sorted(&v, 0.9), Some(90));
        assert_eq!(percentile_sorted(&v, 0.99), Some(99));
        assert_eq!(percentile_sorted(&v, 1.0), Some(100));
        assert_eq!(percentile_sorted(&v, 0.0), Some(1));
        assert_eq!(percentile_sorted(&[42], 0.99), Some(42));
        assert_eq!(percentile_sorted(&[], 0.5), None);
        // 10 samples: p50 is the 5th, p90 the 9th, p99 the 10th.
        let v: Vec<u64> = (1..=10).map(|x| x * 10).collect();
        assert_eq!(percentile_sorted(&v, 0.5), Some(50));
        assert_eq!(percentile_sorted(&v, 0.9), Some(90));
        assert_eq!(percentile_sorted(&v, 0.99), Some(100));
    }

    #[test]
    fn histogram_matches_exact_within_a_bucket() {
        // A skewed distribution over several decades (deterministic LCG).
        let mut x: u64 = 12345;
        let mut samples = Vec::new();
        let mut h = Histogram::new();
        for _ in 0..20_000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let v = 1_000
                + (x >> 33) % 50_000
                + if (x >> 20).is_multiple_of(100) { 2_000_000 } else { 0 };
            samples.push(v);
            h.record(v);
        }
        samples.sort_unstable();
        for q in [0.5, 0.9, 0.99, 0.999] {
            let exact = percentile_sorted(&samples, q).unwrap() as f64;
            let approx = h.percentile(q).unwrap() as f64;
            assert!((approx - exact).abs() / exact <= 1.0 / 64.0, "q={q}: {approx} vs {exact}");
        }
        let s = h.summary().unwrap();
        assert_eq!(s.samples, 20_000);
        assert_eq!(s.min, samples[0]);
        assert_eq!(s.max, *samples.last().unwrap());
    }

    #[test]
    fn histogram_small_values_are_exact_and_merge() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        for v in 1..=50 {
            a.record(v);
        }
        for v in 51..=63 {
            b.record(v);
        }
        a.merge(&b);
        assert_eq!(a.count(), 63);
        assert_eq!(a.percentile(0.5), Some(32));
        assert_eq!(a.percentile(1.0), Some(63));
        assert_eq!(Histogram::new().percentile(0.5), None);
        assert!(Histogram::new().summary().is_none());
    }

    #[test]
    fn jain() {
        assert_eq!(jain_index(&[5, 5, 5, 5]), Some(1.0));
        let one = jain_index(&[10, 0, 0, 0]).unwrap();
        assert!((one - 0.25).abs() < 1e-12);
        // (1+2+3)^2 / (3 * (1+4+9)) = 36/42
        let j = jain_index(&[1, 2, 3]).unwrap();
        assert!((j - 36.0 / 42.0).abs() < 1e-12);
        assert_eq!(jain_index(&[]), None);
        assert_eq!(jain_index(&[0, 0]), None);
        let f = fairness(&[4, 0, 8]);
        assert_eq!((f.min, f.max, f.starved_flows), (0, 8, 1));
        assert!((f.mean - 4.0).abs() < 1e-12);
    }
}
