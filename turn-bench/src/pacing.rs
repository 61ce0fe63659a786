//! Pacing: a token bucket shared by the flows of one sender thread, and the even
//! split of a round's tokens over those flows.

/// A token bucket on the benchmark clock (nanoseconds). Tokens accrue at `rate` per
/// second up to `burst`; a sender that falls behind by more than `burst` loses the
/// excess (the offered rate then drops below the target, and the report says so).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_ns: f64,
    burst: f64,
    tokens: f64,
    last_ns: u64,
}

impl TokenBucket {
    pub fn new(rate_per_sec: f64, burst: f64, now_ns: u64) -> TokenBucket {
        TokenBucket {
            per_ns: rate_per_sec / 1e9,
            burst: burst.max(1.0),
            tokens: 0.0,
            last_ns: now_ns,
        }
    }

    fn refill(&mut self, now_ns: u64) {
        if now_ns > self.last_ns {
            let dt = (now_ns - self.last_ns) as f64;
            self.tokens = (self.tokens + dt * self.per_ns).min(self.burst);
            self.last_ns = now_ns;
        }
    }

    /// Take every whole token available at `now_ns`.
    pub fn take(&mut self, now_ns: u64) -> u64 {
        self.refill(now_ns);
        let n = self.tokens.floor();
        self.tokens -= n;
        n as u64
    }

    /// Nanoseconds until the next whole token.
    pub fn wait_ns(&self) -> u64 {
        if self.tokens >= 1.0 || self.per_ns <= 0.0 {
            return 0;
        }
        ((1.0 - self.tokens) / self.per_ns).ceil() as u64
    }
}

/// The burst a bucket for `flows` flows at `total_rate` allows: 5 ms of traffic, and at
/// least one packet per flow so that a round can serve every flow.
pub fn burst_for(total_rate: f64, flows: usize) -> f64 {
    (total_rate * 0.005).max(flows as f64).max(1.0)
}

/// Split `tokens` over `flows` flows served round-robin from `cursor`: every flow gets
/// `tokens / flows`, and the `tokens % flows` flows from the cursor one more. Returns
/// (per flow, extra count); the caller advances the cursor by the extra count.
pub fn split(tokens: u64, flows: usize) -> (u64, usize) {
    if flows == 0 {
        return (0, 0);
    }
    let n = flows as u64;
    (tokens / n, (tokens % n) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn accrues_at_the_rate() {
        let mut b = TokenBucket::new(1000.0, 10_000.0, 0);
        assert_eq!(b.take(0), 0);
        assert_eq!(b.take(S), 1000);
        assert_eq!(b.take(S), 0, "nothing new at the same instant");
        // Fractions carry over: 3 pps over two half seconds = 1 then 2.
        let mut b = TokenBucket::new(3.0, 100.0, 0);
        assert_eq!(b.take(S / 2), 1);
        assert_eq!(b.take(S), 2);
        // Many small steps add up to the same total.
        let mut b = TokenBucket::new(12_345.0, 1e9, 0);
        let mut total = 0;
        for i in 1..=1000 {
            total += b.take(i * S / 1000);
        }
        assert!((12_344..=12_345).contains(&total), "{total}");
    }

    #[test]
    fn burst_caps_the_debt() {
        let mut b = TokenBucket::new(1000.0, 50.0, 0);
        assert_eq!(b.take(10 * S), 50);
        assert_eq!(b.take(10 * S + S / 100), 10);
    }

    #[test]
    fn wait_until_next_token() {
        let mut b = TokenBucket::new(1000.0, 10.0, 0);
        assert!(b.wait_ns().abs_diff(1_000_000) <= 1);
        b.take(S / 2000); // half a token
        assert!(b.wait_ns().abs_diff(500_000) <= 1);
        b.take(S / 1000);
        assert_eq!(b.take(S / 1000), 0);
        assert!(b.wait_ns() <= 1_000_000);
    }

    #[test]
    fn even_split() {
        assert_eq!(split(10, 4), (2, 2));
        assert_eq!(split(3, 4), (0, 3));
        assert_eq!(split(8, 4), (2, 0));
        assert_eq!(split(5, 0), (0, 0));
        assert_eq!(burst_for(1_000_000.0, 10), 5000.0);
        assert_eq!(burst_for(100.0, 64), 64.0);
    }
}
