//! The tunables of renewal (DESIGN §6, `renewal.*`) as one value: what the
//! config's `[renewal]` section builds and the renewal policy
//! (`renewal::policy`) decides with. A plain domain value, so the config
//! can hold it without reaching up into renewal.

use std::time::Duration;

const DEFAULT_RENEW_AT: f64 = 0.66;

/// The tunables of renewal, as DESIGN §6 names them under `renewal.*`.
///
/// The config's `[renewal]` section builds one (`RenewalConfig::policy`) and
/// takes the defaults of these keys from [`Policy::default`], so each default
/// is written here once.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Sliding mode: refresh when this fraction of the lifetime has passed.
    pub renew_at: f64,
    /// Refresh at least this often; zero turns probing off.
    pub probe_interval: Duration,
    /// At most this much earlier, at random (capped at 10 % of the lifetime).
    pub jitter: Duration,
    /// First backoff after a transient failure.
    pub retry_min: Duration,
    /// Longest backoff (Retry-After may ask for more; see [`backoff`]).
    pub retry_max: Duration,
    /// An access token with less than this left is not handed out.
    pub access_token_margin: Duration,
    /// `expiry_approaching` points before a deadline.
    pub warn_before: Vec<Duration>,
    /// `secret_expiring` point before a secret's Expires On.
    pub secret_warn_before: Duration,
}

pub(crate) const HOUR: u64 = 3600;
pub(crate) const DAY: u64 = 24 * HOUR;

impl Default for Policy {
    fn default() -> Self {
        Policy {
            renew_at: DEFAULT_RENEW_AT,
            probe_interval: Duration::from_secs(DAY),
            jitter: Duration::from_secs(6 * HOUR),
            retry_min: Duration::from_secs(60),
            retry_max: Duration::from_secs(HOUR),
            access_token_margin: Duration::from_secs(5 * 60),
            warn_before: vec![
                Duration::from_secs(7 * DAY),
                Duration::from_secs(3 * DAY),
                Duration::from_secs(DAY),
            ],
            secret_warn_before: Duration::from_secs(14 * DAY),
        }
    }
}

/// Why a [`Policy`] cannot be used. The config loader refuses the config and
/// names the key; the old config (if any) keeps running.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    /// `renewal.renew_at` is outside `(0, 1)`: fix the config.
    #[error("renewal.renew_at must be above 0 and below 1, not {0}")]
    RenewAt(f64),
    /// `renewal.retry_min` is zero, which would retry in a tight loop: fix the config.
    #[error("renewal.retry_min must be more than 0s")]
    ZeroRetryMin,
    /// `renewal.retry_min` exceeds `renewal.retry_max`: fix the config.
    #[error("renewal.retry_min ({min:?}) must not exceed renewal.retry_max ({max:?})")]
    RetryBounds {
        /// The configured `retry_min`.
        min: Duration,
        /// The configured `retry_max`.
        max: Duration,
    },
}

impl Policy {
    /// Checks the values that would make renewal misbehave.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if !(self.renew_at > 0.0 && self.renew_at < 1.0) {
            return Err(PolicyError::RenewAt(self.renew_at));
        }
        if self.retry_min.is_zero() {
            return Err(PolicyError::ZeroRetryMin);
        }
        if self.retry_min > self.retry_max {
            return Err(PolicyError::RetryBounds {
                min: self.retry_min,
                max: self.retry_max,
            });
        }
        Ok(())
    }

    /// The largest jitter for a token of this lifetime: `min(jitter, lifetime / 10)`.
    pub fn jitter_cap(&self, lifetime: Duration) -> Duration {
        self.jitter.min(lifetime / 10)
    }

    /// How long before a hard deadline the last ordinary refresh is planned:
    /// room for a few backoffs at `retry_max`, but never more than a tenth of
    /// the lifetime.
    pub fn deadline_margin(&self, lifetime: Duration) -> Duration {
        self.retry_bounds().1.saturating_mul(4).min(lifetime / 10)
    }

    /// How long after a passed deadline transient failures are still retried
    /// before the connection is declared `needs_reauthorization`.
    ///
    /// One `retry_max`: long enough for a few retries across a short outage at
    /// the deadline, short enough that the customer hears about a dead token
    /// within the hour by default.
    pub fn final_grace(&self) -> Duration {
        self.retry_bounds().1
    }

    /// `renew_at` forced into `[0, 1]`, so that a config that skipped
    /// [`Policy::validate`] cannot make duration arithmetic panic.
    pub(crate) fn renew_fraction(&self) -> f64 {
        if self.renew_at.is_finite() {
            self.renew_at.clamp(0.0, 1.0)
        } else {
            DEFAULT_RENEW_AT
        }
    }

    /// `(retry_min, retry_max)`, with a non-zero minimum and `max >= min`.
    pub(crate) fn retry_bounds(&self) -> (Duration, Duration) {
        let min = self.retry_min.max(Duration::from_millis(1));
        (min, self.retry_max.max(min))
    }
}
