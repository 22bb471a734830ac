//! Exponential backoff with jitter, between link attempts and between tries of the Kubernetes
//! API.

use std::time::Duration;

use rand::Rng;

use crate::config::BackoffConfig;

/// Exponential backoff with jitter between link attempts.
#[derive(Debug)]
pub(crate) struct Backoff {
    config: BackoffConfig,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(config: BackoffConfig) -> Self {
        Backoff { config, attempt: 0 }
    }

    /// The pause before the next attempt: doubling from the initial pause up to the cap, each
    /// drawn uniformly from its upper half so that agents do not redial in lockstep.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .config
            .initial
            .saturating_mul(2u32.saturating_pow(self.attempt))
            .min(self.config.max);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    /// Starts over after a link came up.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let config = BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let mut backoff = Backoff::new(config);
        let ceilings = [100, 200, 400, 800, 1600, 2000, 2000, 2000];
        for ceiling in ceilings {
            let ceiling = Duration::from_millis(ceiling);
            let delay = backoff.next_delay();
            assert!(
                delay <= ceiling && delay >= ceiling / 2,
                "{delay:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn backoff_never_overflows() {
        let mut backoff = Backoff::new(BackoffConfig {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
        });
        for _ in 0..200 {
            assert!(backoff.next_delay() <= Duration::from_secs(30));
        }
    }
}
