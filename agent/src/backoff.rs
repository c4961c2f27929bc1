//! Jittered exponential backoff for reconnects.
//!
//! "Full jitter" (a uniformly random delay between zero and the exponential cap) spreads a
//! fleet's reconnects over the whole window, so a controller restart under thousands of
//! agents is met by a trickle rather than a wave.

use std::time::Duration;

use rand::RngExt;

/// Reconnect delays: `random(0, min(max, base * 2^attempt))`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting around `base` and never waiting longer than `max`.
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.cap();
        self.attempt = self.attempt.saturating_add(1);
        let jittered = rand::rng().random_range(0.0..=1.0) * cap.as_secs_f64();
        // Never zero: an immediate retry of a refused connection is pointless.
        Duration::from_secs_f64(jittered).max(self.base / 4)
    }

    /// The upper bound the next delay is drawn from.
    pub fn cap(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(20));
        self.base.saturating_mul(factor).min(self.max)
    }

    /// Back to the first delay, after a session that worked.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_its_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let mut caps = Vec::new();
        for _ in 0..12 {
            caps.push(backoff.cap());
            let delay = backoff.next_delay();
            assert!(delay <= *caps.last().expect("pushed"));
            assert!(delay >= Duration::from_millis(25));
        }
        assert_eq!(caps[0], Duration::from_millis(100));
        assert_eq!(caps[3], Duration::from_millis(800));
        assert_eq!(caps[11], Duration::from_secs(30));
        backoff.reset();
        assert_eq!(backoff.cap(), Duration::from_millis(100));
    }

    #[test]
    fn delays_are_spread_not_synchronised() {
        // 1000 agents at the same attempt must not pick the same moment: check the spread
        // over ten buckets of the window.
        let mut buckets = [0u32; 10];
        for _ in 0..1000 {
            let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
            for _ in 0..5 {
                backoff.next_delay();
            }
            let cap = backoff.cap().as_secs_f64();
            let delay = backoff.next_delay().as_secs_f64();
            let bucket = ((delay / cap) * 10.0).min(9.0) as usize;
            buckets[bucket] += 1;
        }
        for (i, count) in buckets.iter().enumerate() {
            // Uniform would be 100 each; 50..150 is far outside chance for a broken jitter.
            assert!((50..150).contains(count), "bucket {i}: {buckets:?}");
        }
    }
}
