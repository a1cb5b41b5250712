//! The circuit breaker: one per downstream server. After a run of transient failures it opens,
//! and calls fail at once with a clear error instead of waiting on a server that is not
//! answering; after a cool-down one trial call is let through, and its outcome closes or reopens
//! the circuit.

use std::time::Duration;

use tokio::time::Instant;

/// Consecutive transient failures that open the circuit, unless configured.
pub const DEFAULT_FAILURES: u32 = 5;
/// How long an open circuit refuses calls before it tries one, unless configured.
pub const DEFAULT_COOL_DOWN: Duration = Duration::from_secs(30);

/// Where a circuit stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; counting consecutive transient failures.
    Closed { failures: u32 },
    /// Calls fail at once until `until`.
    Open { until: Instant },
    /// One trial call is out; others fail at once until it settles.
    HalfOpen,
}

/// One server's circuit.
#[derive(Debug, Clone)]
pub struct Breaker {
    state: BreakerState,
    threshold: u32,
    cool_down: Duration,
}

impl Breaker {
    pub fn new(threshold: u32, cool_down: Duration) -> Self {
        Breaker {
            state: BreakerState::Closed { failures: 0 },
            threshold: threshold.max(1),
            cool_down,
        }
    }

    /// Whether it was built with these settings (a changed config replaces it).
    pub fn has_settings(&self, threshold: u32, cool_down: Duration) -> bool {
        self.threshold == threshold.max(1) && self.cool_down == cool_down
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// May a call go out now? When an open circuit's cool-down is over, this call is the trial.
    /// `Err` carries how long until the next trial.
    pub fn admit(&mut self, now: Instant) -> Result<(), Duration> {
        match self.state {
            BreakerState::Closed { .. } => Ok(()),
            BreakerState::Open { until } if now >= until => {
                self.state = BreakerState::HalfOpen;
                Ok(())
            }
            BreakerState::Open { until } => Err(until - now),
            BreakerState::HalfOpen => Err(Duration::ZERO),
        }
    }

    /// An admitted call ended without showing whether the server answers: its caller
    /// cancelled it, or dropped it. A trial leaves the circuit open but due for another trial
    /// at once (not closed, and not half-open with no trial out); a closed circuit is as it was.
    pub fn abandon(&mut self, now: Instant) {
        if self.state == BreakerState::HalfOpen {
            self.state = BreakerState::Open { until: now };
        }
    }

    /// Record how an admitted call ended: `transient` failures count towards opening; anything
    /// else (a result, even `isError`, or a protocol error) shows the server is answering.
    pub fn record(&mut self, transient_failure: bool, now: Instant) {
        self.state = match (self.state, transient_failure) {
            (_, false) => BreakerState::Closed { failures: 0 },
            (BreakerState::HalfOpen, true) => BreakerState::Open {
                until: now + self.cool_down,
            },
            (BreakerState::Closed { failures }, true) if failures + 1 >= self.threshold => {
                BreakerState::Open {
                    until: now + self.cool_down,
                }
            }
            (BreakerState::Closed { failures }, true) => BreakerState::Closed {
                failures: failures + 1,
            },
            (open @ BreakerState::Open { .. }, true) => open,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abandoned_trial_neither_closes_nor_blocks_the_circuit() {
        let mut breaker = Breaker::new(1, Duration::from_secs(10));
        let now = Instant::now();
        breaker.record(true, now);
        assert!(breaker.admit(now).is_err(), "open");
        let later = now + Duration::from_secs(11);
        assert_eq!(breaker.admit(later), Ok(()), "the trial");
        breaker.abandon(later);
        assert!(
            matches!(breaker.state(), BreakerState::Open { .. }),
            "a cancelled trial proves nothing: {:?}",
            breaker.state()
        );
        assert_eq!(
            breaker.admit(later),
            Ok(()),
            "the next call is the next trial"
        );
        breaker.record(false, later);
        assert_eq!(breaker.state(), BreakerState::Closed { failures: 0 });
        breaker.abandon(later);
        assert_eq!(
            breaker.state(),
            BreakerState::Closed { failures: 0 },
            "closed stays"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_half_opens_after_the_cool_down() {
        let mut breaker = Breaker::new(3, Duration::from_secs(30));
        for _ in 0..2 {
            assert!(breaker.admit(Instant::now()).is_ok());
            breaker.record(true, Instant::now());
        }
        assert_eq!(breaker.state(), BreakerState::Closed { failures: 2 });
        breaker.record(true, Instant::now());
        assert!(matches!(breaker.state(), BreakerState::Open { .. }));
        assert_eq!(breaker.admit(Instant::now()), Err(Duration::from_secs(30)));

        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(breaker.admit(Instant::now()), Err(Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(breaker.admit(Instant::now()), Ok(()), "the trial call");
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert_eq!(
            breaker.admit(Instant::now()),
            Err(Duration::ZERO),
            "only one trial at a time"
        );

        // A failed trial reopens for a whole cool-down; a good one closes.
        breaker.record(true, Instant::now());
        assert_eq!(breaker.admit(Instant::now()), Err(Duration::from_secs(30)));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(breaker.admit(Instant::now()).is_ok());
        breaker.record(false, Instant::now());
        assert_eq!(breaker.state(), BreakerState::Closed { failures: 0 });
    }

    #[test]
    fn an_answer_resets_the_count() {
        let now = Instant::now();
        let mut breaker = Breaker::new(2, Duration::from_secs(1));
        breaker.record(true, now);
        breaker.record(false, now);
        breaker.record(true, now);
        assert_eq!(breaker.state(), BreakerState::Closed { failures: 1 });
    }
}
