//! Pauses between retries: doubling up to a cap, optionally jittered, started over after a
//! success. The arithmetic is backon's; this module fixes the shape every cplink binary uses
//! and keeps call sites to `next_delay` and `reset`.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Exponential backoff between retries, never ending and never above its cap.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    /// Pauses of `first`, then twice as long each time, up to `max`.
    pub fn doubling(first: Duration, max: Duration) -> Self {
        Self::from_builder(
            ExponentialBuilder::new()
                .with_min_delay(first.min(max))
                .with_max_delay(max),
            max,
        )
    }

    /// Pauses under a ceiling that starts at `first` and doubles up to `max`, each drawn
    /// uniformly from the upper half of its ceiling, so that peers that failed together (agents
    /// after a server restart) do not retry in lockstep.
    pub fn jittered(first: Duration, max: Duration) -> Self {
        // backon's jitter adds up to the whole delay on top of it: from half the ceiling, each
        // pause falls in [ceiling / 2, ceiling).
        Self::from_builder(
            ExponentialBuilder::new()
                .with_min_delay(first.min(max) / 2)
                .with_max_delay(max / 2)
                .with_jitter(),
            max,
        )
    }

    fn from_builder(builder: ExponentialBuilder, max: Duration) -> Self {
        // backon stops after three retries unless told otherwise; cplink retries until
        // shutdown or a budget of its own ends the loop.
        let builder = builder.without_max_times();
        Backoff {
            builder,
            delays: builder.build(),
            max,
        }
    }

    /// The pause before the next attempt, in whole milliseconds.
    pub fn next_delay(&mut self) -> Duration {
        // Without a limit of attempts the delays never run out. backon computes them in `f32`,
        // a few nanoseconds off (40 ms comes out as 39.99999 ms): rounded to the millisecond,
        // which is all tokio's timer counts anyway, they are the round numbers asked for.
        let delay = self.delays.next().unwrap_or(self.max);
        whole_millis(delay).min(self.max)
    }

    /// Starts over from the first pause, after an attempt succeeded.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

/// `delay` rounded to the nearest millisecond.
fn whole_millis(delay: Duration) -> Duration {
    let millis = delay.as_micros().saturating_add(500) / 1000;
    Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn in_upper_half(delay: Duration, ceiling: Duration) -> bool {
        delay >= ceiling / 2 && delay <= ceiling
    }

    #[test]
    fn doubling_pauses_double_up_to_the_cap_and_start_over_after_a_reset() {
        let mut backoff = Backoff::doubling(10 * MS, 100 * MS);
        let pauses: Vec<u128> = (0..6).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(pauses, [10, 20, 40, 80, 100, 100]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), 10 * MS);
    }

    #[test]
    fn jittered_pauses_double_with_jitter_up_to_the_cap() {
        let mut backoff = Backoff::jittered(100 * MS, 2000 * MS);
        let ceilings = [100, 200, 400, 800, 1600, 2000, 2000, 2000];
        for ceiling in ceilings {
            let ceiling = ceiling * MS;
            let delay = backoff.next_delay();
            assert!(
                in_upper_half(delay, ceiling),
                "{delay:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
        }
        backoff.reset();
        assert!(in_upper_half(backoff.next_delay(), 100 * MS));
    }

    #[test]
    fn jittered_pauses_differ_between_peers() {
        let draws: std::collections::BTreeSet<Duration> = (0..16)
            .map(|_| Backoff::jittered(100 * MS, 2000 * MS).next_delay())
            .collect();
        // Sixteen equal draws from fifty milliseconds would mean no jitter at all.
        assert!(draws.len() > 1, "{draws:?}");
    }

    #[test]
    fn backoff_never_overflows_nor_ends() {
        let mut backoff = Backoff::jittered(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..200 {
            assert!(backoff.next_delay() <= Duration::from_secs(30));
        }
        let mut backoff = Backoff::doubling(Duration::from_secs(1), Duration::from_secs(30));
        let last = (0..200).map(|_| backoff.next_delay()).last();
        assert_eq!(last, Some(Duration::from_secs(30)));
    }

    #[test]
    fn a_first_pause_above_the_cap_is_cut_to_the_cap() {
        assert_eq!(Backoff::doubling(5 * MS, 2 * MS).next_delay(), 2 * MS);
        assert!(Backoff::jittered(5 * MS, 2 * MS).next_delay() <= 2 * MS);
    }
}
