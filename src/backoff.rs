//! Exponential backoff with full jitter, validated once and reused by every retry loop
//! (outbox publishing now, client policies later).

use std::time::Duration;

use rand::Rng;

/// Delays grow as `min * 2^attempt`, capped at `max`; each actual delay is drawn uniformly
/// from `[0, that]` ("full jitter"), which spreads retries of many clients apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
}

/// Why a backoff configuration was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("backoff needs 0 < min <= max (got min {min:?}, max {max:?})")]
pub struct InvalidBackoff {
    min: Duration,
    max: Duration,
}

impl Backoff {
    /// 100 ms doubling to 5 s: for internal loops with nothing configured.
    pub const DEFAULT: Self = Self { min: Duration::from_millis(100), max: Duration::from_secs(5) };

    /// Validates `0 < min <= max`.
    pub fn new(min: Duration, max: Duration) -> Result<Self, InvalidBackoff> {
        if min.is_zero() || min > max {
            return Err(InvalidBackoff { min, max });
        }
        Ok(Self { min, max })
    }

    /// The ceiling for the given attempt (0-based), before jitter.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(31));
        self.min.saturating_mul(factor).min(self.max)
    }

    /// A jittered delay for the given attempt.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        rand::rng().random_range(Duration::ZERO..=ceiling)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_to_the_cap() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2)).expect("valid");
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(3), Duration::from_millis(800));
        assert_eq!(b.ceiling(5), Duration::from_secs(2));
        assert_eq!(b.ceiling(500), Duration::from_secs(2));
        for attempt in 0..10 {
            assert!(b.delay(attempt) <= b.ceiling(attempt));
        }
    }

    #[test]
    fn rejects_nonsense() {
        assert!(Backoff::new(Duration::ZERO, Duration::from_secs(1)).is_err());
        assert!(Backoff::new(Duration::from_secs(2), Duration::from_secs(1)).is_err());
    }
}
