//! Retries: which failures may be tried again, how often, and how long to wait between tries.
//!
//! One policy for every downstream call. Tool annotations decide the default: a call to a tool
//! that is read-only or idempotent may be repeated after any transient failure; any other call
//! only when it certainly never reached the server, because repeating a write whose first try
//! may have landed could do it twice.

use std::time::Duration;

use rmcp::model::ToolAnnotations;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// How a call failed, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The call was never sent: the server is down or unknown.
    NotDelivered,
    RateLimited,
    /// Sent, and no answer in time: it may or may not have happened.
    Timeout,
    /// Sent, and the connection ended before the answer: it may or may not have happened.
    ConnectionLost,
    /// The tool answered with `isError: true`.
    ToolError,
    /// The server answered with a JSON-RPC error.
    ProtocolError,
    /// The arguments, or the tool's name, were refused before any call.
    InvalidArgs,
    /// An expression read something that does not exist.
    ReferenceError,
    /// An expression produced the wrong kind of value.
    TypeError,
    /// The server's circuit is open after repeated failures: not sent, and not worth retrying
    /// until the circuit lets a trial through.
    CircuitOpen,
    Cancelled,
}

impl FailureKind {
    /// Failures that a later try may not meet.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            FailureKind::NotDelivered
                | FailureKind::RateLimited
                | FailureKind::Timeout
                | FailureKind::ConnectionLost
        )
    }
}

/// A kind of failure a retry policy may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    Transient,
    NotDelivered,
    RateLimited,
    Timeout,
    ConnectionLost,
    ToolError,
    ProtocolError,
}

impl RetryOn {
    fn covers(self, kind: FailureKind) -> bool {
        match self {
            RetryOn::Transient => kind.is_transient(),
            RetryOn::NotDelivered => kind == FailureKind::NotDelivered,
            RetryOn::RateLimited => kind == FailureKind::RateLimited,
            RetryOn::Timeout => kind == FailureKind::Timeout,
            RetryOn::ConnectionLost => kind == FailureKind::ConnectionLost,
            RetryOn::ToolError => kind == FailureKind::ToolError,
            RetryOn::ProtocolError => kind == FailureKind::ProtocolError,
        }
    }

    /// Whether retrying on this may repeat a call that already took effect.
    pub fn may_repeat_effects(self) -> bool {
        matches!(
            self,
            RetryOn::Transient | RetryOn::Timeout | RetryOn::ConnectionLost | RetryOn::ToolError
        )
    }
}

/// How a failed call is retried; waits grow by `backoff` from `initial_delay_ms` up to
/// `max_delay_ms`, with random jitter.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10))]
    pub max_attempts: Option<u32>,
    /// Default 500.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 60_000))]
    pub initial_delay_ms: Option<u64>,
    /// Default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0, max = 10.0))]
    pub backoff: Option<f64>,
    /// Default 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 300_000))]
    pub max_delay_ms: Option<u64>,
    /// Which failures to retry (default depends on the tool's annotations). `transient` means
    /// `not_delivered`, `rate_limited`, `timeout` and `connection_lost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<Vec<RetryOn>>,
}

/// A resolved retry policy for one tool.
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    pub max_attempts: u32,
    pub initial_delay: Duration,
    pub backoff: f64,
    pub max_delay: Duration,
    pub on: Vec<RetryOn>,
}

/// Whether a tool's annotations say that calling it twice does no harm.
pub fn is_repeatable(annotations: Option<&ToolAnnotations>) -> bool {
    annotations.is_some_and(|a| a.read_only_hint == Some(true) || a.idempotent_hint == Some(true))
}

impl Retry {
    /// The policy for a tool: the step's own choices over the defaults its annotations give.
    pub fn for_tool(annotations: Option<&ToolAnnotations>, policy: Option<&RetryPolicy>) -> Retry {
        let default_on = if is_repeatable(annotations) {
            vec![RetryOn::Transient]
        } else {
            vec![RetryOn::NotDelivered, RetryOn::RateLimited]
        };
        let policy = policy.cloned().unwrap_or_default();
        Retry {
            max_attempts: policy.max_attempts.unwrap_or(3).max(1),
            initial_delay: Duration::from_millis(policy.initial_delay_ms.unwrap_or(500)),
            backoff: policy.backoff.unwrap_or(2.0).max(1.0),
            max_delay: Duration::from_millis(policy.max_delay_ms.unwrap_or(10_000)),
            on: policy.on.unwrap_or(default_on),
        }
    }

    /// Whether a failure of this kind, on attempt `attempt` (1-based), gets another try.
    pub fn retries(&self, kind: FailureKind, attempt: u32) -> bool {
        attempt < self.max_attempts && self.on.iter().any(|on| on.covers(kind))
    }

    /// Make attempts until one succeeds, fails in a way this policy does not retry, or `cancel`
    /// fires, waiting between attempts as the policy says. Returns the last outcome and how many
    /// attempts were made. The one retry loop: proxied calls and workflow steps both use it.
    pub async fn run<T, E, F, Fut>(
        &self,
        cancel: &CancellationToken,
        kind: impl Fn(&E) -> FailureKind,
        mut attempt: F,
    ) -> (Result<T, E>, u32)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let outcome = attempt().await;
            let failure = match &outcome {
                Ok(_) => return (outcome, attempts),
                Err(error) => kind(error),
            };
            if cancel.is_cancelled() || !self.retries(failure, attempts) {
                return (outcome, attempts);
            }
            tokio::select! {
                () = tokio::time::sleep(self.delay(attempts)) => {}
                () = cancel.cancelled() => return (outcome, attempts),
            }
        }
    }

    /// How long to wait before attempt `attempt + 1`: exponential, capped, with full jitter
    /// (a random wait up to the computed one), so many retrying callers do not stampede.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(32) as i32;
        let computed = self.initial_delay.as_secs_f64() * self.backoff.powi(exponent);
        let capped = computed.min(self.max_delay.as_secs_f64());
        Duration::from_secs_f64(capped * fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(read_only: Option<bool>, idempotent: Option<bool>) -> ToolAnnotations {
        ToolAnnotations::from_raw(None, read_only, None, idempotent, None)
    }

    #[test]
    fn read_only_and_idempotent_tools_retry_transient_failures() {
        let read = Retry::for_tool(Some(&annotations(Some(true), None)), None);
        assert!(read.retries(FailureKind::Timeout, 1));
        assert!(read.retries(FailureKind::ConnectionLost, 2));
        assert!(
            !read.retries(FailureKind::Timeout, 3),
            "three attempts in all"
        );
        assert!(!read.retries(FailureKind::ToolError, 1));
        let idempotent = Retry::for_tool(Some(&annotations(None, Some(true))), None);
        assert!(idempotent.retries(FailureKind::Timeout, 1));
    }

    #[test]
    fn other_tools_retry_only_what_never_arrived() {
        for tool in [None, Some(annotations(Some(false), Some(false)))] {
            let write = Retry::for_tool(tool.as_ref(), None);
            assert!(write.retries(FailureKind::NotDelivered, 1));
            assert!(write.retries(FailureKind::RateLimited, 1));
            assert!(!write.retries(FailureKind::Timeout, 1));
            assert!(!write.retries(FailureKind::ConnectionLost, 1));
        }
    }

    #[test]
    fn a_step_may_ask_for_more() {
        let policy = RetryPolicy {
            max_attempts: Some(5),
            on: Some(vec![RetryOn::Timeout]),
            ..RetryPolicy::default()
        };
        let retry = Retry::for_tool(None, Some(&policy));
        assert!(retry.retries(FailureKind::Timeout, 4));
        assert!(
            !retry.retries(FailureKind::NotDelivered, 1),
            "the step's list replaces the default"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn run_stops_at_success_or_at_what_it_does_not_retry() {
        let retry = Retry::for_tool(Some(&annotations(Some(true), None)), None);
        let cancel = CancellationToken::new();
        let mut calls = 0;
        let (outcome, attempts) = retry
            .run(
                &cancel,
                |kind: &FailureKind| *kind,
                || {
                    calls += 1;
                    let result = if calls < 3 {
                        Err(FailureKind::Timeout)
                    } else {
                        Ok(calls)
                    };
                    async move { result }
                },
            )
            .await;
        assert_eq!((outcome, attempts), (Ok(3), 3));

        let (outcome, attempts) = retry
            .run(
                &cancel,
                |kind: &FailureKind| *kind,
                || async { Err::<(), _>(FailureKind::ToolError) },
            )
            .await;
        assert_eq!(
            (outcome, attempts),
            (Err(FailureKind::ToolError), 1),
            "tool errors are not retried"
        );
    }

    #[test]
    fn delays_grow_and_stay_capped() {
        let retry = Retry::for_tool(
            None,
            Some(&RetryPolicy {
                initial_delay_ms: Some(100),
                max_delay_ms: Some(250),
                ..RetryPolicy::default()
            }),
        );
        for _ in 0..100 {
            assert!(retry.delay(1) <= Duration::from_millis(100));
            assert!(retry.delay(2) <= Duration::from_millis(200));
            assert!(retry.delay(10) <= Duration::from_millis(250));
        }
    }
}
