//! The domain types every module speaks in: connections, their states and modes.
//!
//! Field names and spellings here are the contract of DESIGN §2: the `--json`
//! outputs and the API serialise these types as they are.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

mod alert;
mod connection;
pub mod policy;

pub use alert::{AlertFacts, AlertKind, ERROR_TEXT_MAX, NO_CONNECTION, Status, authorize_step};
pub use connection::{ConnectionPatch, ConnectionRow, Fault, NewConnection};

/// Wall-clock UTC time, the only time type stored or planned with.
pub type Timestamp = DateTime<Utc>;

/// Where a connection stands; DESIGN §2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// No refresh token yet: the customer must authorize.
    PendingAuthorization,
    /// Refresh token valid, next refresh scheduled.
    Active,
    /// Last attempt failed transiently; backing off, bounded by the deadline.
    Retrying,
    /// `invalid_client`, or the secret's Expires On has passed: an operator enters a new secret.
    NeedsSecret,
    /// `invalid_grant`, or the deadline passed and a final attempt failed: the customer re-authorizes.
    NeedsReauthorization,
    /// Turned off by an operator.
    Disabled,
}

impl State {
    pub const ALL: [State; 6] = [
        State::PendingAuthorization,
        State::Active,
        State::Retrying,
        State::NeedsSecret,
        State::NeedsReauthorization,
        State::Disabled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::PendingAuthorization => "pending_authorization",
            State::Active => "active",
            State::Retrying => "retrying",
            State::NeedsSecret => "needs_secret",
            State::NeedsReauthorization => "needs_reauthorization",
            State::Disabled => "disabled",
        }
    }

    /// True when nothing will happen until a person acts (status exit code 1).
    pub fn needs_human(self) -> bool {
        matches!(
            self,
            State::PendingAuthorization | State::NeedsSecret | State::NeedsReauthorization
        )
    }

    /// True when the scheduler refreshes this connection on its own.
    pub fn is_scheduled(self) -> bool {
        matches!(self, State::Active | State::Retrying)
    }

    /// Who must act and how, in one line for `status` and the API's 409.
    pub fn action(self) -> Option<&'static str> {
        match self {
            State::PendingAuthorization => Some(
                "the customer must authorize: send them the link from `acutoken connection authorize NAME`",
            ),
            State::NeedsSecret => Some(
                "an operator must add a new shared secret on the instance's Connected Applications screen (SM303010) and run `acutoken connection set-secret NAME`",
            ),
            State::NeedsReauthorization => Some(
                "the customer must re-authorize: send them the link from `acutoken connection authorize NAME`",
            ),
            State::Disabled => Some("an operator turned it off: `acutoken connection enable NAME`"),
            State::Active | State::Retrying => None,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        State::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown state `{s}`"))
    }
}

/// How the instance expires refresh tokens; DESIGN §1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Deadline fixed at `grant_issued_at + lifetime`.
    #[default]
    Absolute,
    /// Each refresh moves the deadline by `lifetime`, up to `absolute_lifetime`.
    Sliding,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Absolute => "absolute",
            Mode::Sliding => "sliding",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "absolute" => Ok(Mode::Absolute),
            "sliding" => Ok(Mode::Sliding),
            other => Err(format!(
                "unknown mode `{other}`: expected `absolute` or `sliding`"
            )),
        }
    }
}

/// Whether a deadline is an estimate from configured lifetimes or was confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadlineSource {
    /// Computed without knowing when the grant was issued, or not yet proven.
    Assumed,
    /// Computed from a known grant time, or corrected after a refresh outlived it.
    Observed,
}

impl DeadlineSource {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadlineSource::Assumed => "assumed",
            DeadlineSource::Observed => "observed",
        }
    }
}

impl FromStr for DeadlineSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "assumed" => Ok(DeadlineSource::Assumed),
            "observed" => Ok(DeadlineSource::Observed),
            other => Err(format!("unknown deadline source `{other}`")),
        }
    }
}

/// A connection as every output shows it (secrets are never part of it).
///
/// Serialises with exactly the field names of DESIGN §2; durations as
/// humantime strings, times as RFC 3339 UTC, absent values as `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Connection {
    pub id: Uuid,
    pub name: String,
    pub instance: String,
    pub client_id: String,
    pub labels: BTreeMap<String, String>,
    pub mode: Mode,
    #[serde(with = "dur")]
    pub lifetime: Duration,
    /// Sliding only; `None` = no cap.
    #[serde(with = "opt_dur")]
    pub absolute_lifetime: Option<Duration>,
    pub secret_expires_at: Option<Timestamp>,
    pub grant_issued_at: Option<Timestamp>,
    pub refresh_token_issued_at: Option<Timestamp>,
    pub access_expires_at: Option<Timestamp>,
    pub deadline: Option<Timestamp>,
    pub deadline_source: Option<DeadlineSource>,
    pub next_refresh_at: Option<Timestamp>,
    pub last_refresh_at: Option<Timestamp>,
    pub last_error: Option<String>,
    pub state: State,
}

/// Checks a connection name against `[A-Za-z0-9._-]{1,64}`.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!(
            "connection name `{name}` must be 1 to 64 characters of A-Z a-z 0-9 . _ -"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "connection name `{name}` has `{bad}`: use only A-Z a-z 0-9 . _ -"
        ));
    }
    Ok(())
}

/// Checks an Acumatica client ID: non-empty, one line, no surrounding blanks.
/// The `@Tenant Name` part is kept whole, spaces included.
pub fn validate_client_id(id: &str) -> Result<(), String> {
    if id.trim().is_empty() {
        return Err("client ID is empty: copy it from the Connected Applications screen (SM303010), e.g. `88358B02-A48D-A50E-F710-39C1636C30F6@Tenant`".into());
    }
    if id.trim() != id || id.chars().any(char::is_control) || id.len() > 512 {
        return Err(
            "client ID has leading/trailing blanks or control characters: paste it exactly as SM303010 shows it"
                .into(),
        );
    }
    Ok(())
}

/// Parses one `KEY=VALUE` label.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("label `{s}` must look like KEY=VALUE")),
    }
}

/// Parses DESIGN §5's DATE: `YYYY-MM-DD` (00:00:00 UTC) or RFC 3339.
pub fn parse_date(s: &str) -> Result<Timestamp, String> {
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    parse_time(s).map_err(|_| format!("`{s}` is not a date: use YYYY-MM-DD or RFC 3339"))
}

/// Parses DESIGN §5's TIME: RFC 3339, normalised to UTC.
pub fn parse_time(s: &str) -> Result<Timestamp, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| format!("`{s}` is not an RFC 3339 time such as 2026-11-29T08:00:00Z"))
}

/// Parses a humantime duration (`30d`, `6h`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration such as 30d or 6h: {e}"))
}

/// Formats a duration the way people write them: `30d`, `6h`, `1d 12h`, `90s`.
/// Parses back with humantime (unlike humantime's own output, which turns
/// `90d` into months and fractions of days).
pub fn fmt_duration(d: Duration) -> String {
    let mut secs = d.as_secs();
    let millis = d.subsec_millis();
    if secs == 0 && millis == 0 {
        return "0s".into();
    }
    let mut parts = Vec::new();
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if secs >= size {
            parts.push(format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    if millis > 0 {
        parts.push(format!("{millis}ms"));
    }
    parts.join(" ")
}

/// Serde for a `Duration` as a humantime string, written with [`fmt_duration`].
pub mod dur {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::fmt_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim()).map_err(|e| {
            serde::de::Error::custom(format!("`{s}` is not a duration such as 30d or 6h: {e}"))
        })
    }
}

/// Serde for an `Option<Duration>`: a humantime string or `null`.
pub mod opt_dur {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&super::fmt_duration(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        s.map(|s| {
            humantime::parse_duration(s.trim())
                .map_err(|e| serde::de::Error::custom(format!("`{s}` is not a duration: {e}")))
        })
        .transpose()
    }
}

/// Formats a time as DESIGN wants it: RFC 3339 UTC with a `Z`.
pub fn fmt_time(t: Timestamp) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The longest access-token lifetime acutoken believes: a longer `expires_in`
/// from a token endpoint is taken as this (and logged).
///
/// 24 hours. Acumatica issues access tokens for an hour, so no honest
/// instance comes near it, while an absurd value (`10000000000000`) cannot push
/// `access_expires_at` out of representable time. Believing less than the
/// server said is always safe: the token is handed out until a day has passed
/// and a fresh one is fetched after that, one extra token request a day at
/// most. Believing more is not: a token that died earlier would be handed out.
pub const MAX_ACCESS_LIFETIME: Duration = Duration::from_secs(24 * 3600);

// Time arithmetic on values that came from a server, a file or the store.
//
// chrono's `+`/`-` on a `DateTime` and `TimeDelta::seconds` panic when the
// result leaves the representable range (about ±262 000 years), and
// `TimeDelta::from_std` fails for more than about 292 million years. A token
// endpoint, a config file or a hand-edited row can supply any of those, and a
// panic in the daemon (built with `panic = "abort"`) stops every customer's
// renewal. So every such sum goes through these helpers, which saturate at the
// ends of representable time instead: a plan "at the end of time" is harmless
// (it is simply never due), a panic is not.

/// `d` as a signed chrono delta, saturating at [`chrono::TimeDelta::MAX`].
pub fn delta_saturating(d: Duration) -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(d).unwrap_or(chrono::TimeDelta::MAX)
}

/// `t + d`, saturating at the end of representable time.
pub fn add_saturating(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add_signed(delta_saturating(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// `t - d`, saturating at the start of representable time.
pub fn sub_saturating(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_sub_signed(delta_saturating(d))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// `to - from` as a duration, or zero when `to` is not later. Cannot overflow:
/// the span between any two representable times fits a `TimeDelta`.
pub fn span(from: Timestamp, to: Timestamp) -> Duration {
    to.signed_duration_since(from)
        .to_std()
        .unwrap_or(Duration::ZERO)
}

/// `s` cut to at most `max` characters, with an ellipsis when cut.
pub fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_round_trip() {
        for s in State::ALL {
            assert_eq!(s.as_str().parse::<State>().unwrap(), s);
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("acme-prod_1.x").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name(&"a".repeat(65)).is_err());
    }

    #[test]
    fn dates_mean_midnight_utc() {
        assert_eq!(
            fmt_time(parse_date("2026-12-01").unwrap()),
            "2026-12-01T00:00:00Z"
        );
        assert_eq!(
            fmt_time(parse_date("2026-12-01T10:00:00+02:00").unwrap()),
            "2026-12-01T08:00:00Z"
        );
        assert!(parse_date("12/01/2026").is_err());
    }

    #[test]
    fn durations_print_as_people_write_them_and_parse_back() {
        for (secs, text) in [
            (30 * 86400, "30d"),
            (90 * 86400, "90d"),
            (6 * 3600, "6h"),
            (129_600, "1d 12h"),
            (90, "1m 30s"),
            (0, "0s"),
        ] {
            let d = Duration::from_secs(secs);
            assert_eq!(fmt_duration(d), text);
            assert_eq!(humantime::parse_duration(text).unwrap(), d);
        }
    }

    #[test]
    fn time_arithmetic_saturates_instead_of_panicking() {
        let now = parse_time("2026-05-01T00:00:00Z").unwrap();
        let max = DateTime::<Utc>::MAX_UTC;
        let min = DateTime::<Utc>::MIN_UTC;
        let huge = Duration::from_secs(10_000_000_000_000);
        assert_eq!(add_saturating(now, huge), max);
        assert_eq!(add_saturating(now, Duration::MAX), max);
        assert_eq!(add_saturating(max, Duration::from_secs(1)), max);
        assert_eq!(sub_saturating(now, Duration::MAX), min);
        assert_eq!(sub_saturating(min, Duration::from_nanos(1)), min);
        assert_eq!(
            add_saturating(now, Duration::from_secs(60)),
            parse_time("2026-05-01T00:01:00Z").unwrap()
        );
        assert!(span(now, max) > Duration::from_secs(1 << 40));
        assert_eq!(span(max, min), Duration::ZERO);
        assert!(span(min, max) > Duration::ZERO);
        // The ends of time still print.
        assert!(fmt_time(max).starts_with("+2621"), "{}", fmt_time(max));
        assert!(!fmt_time(min).is_empty());
    }

    #[test]
    fn client_id_keeps_tenant_with_spaces() {
        assert!(validate_client_id("88358B02-A48D-A50E-F710-39C1636C30F6@My Company").is_ok());
        assert!(validate_client_id(" x").is_err());
    }
}

/// How a failed token request is to be treated; the Acumatica client
/// classifies every failure into one of these and the policy decides what follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// 429, 5xx, timeouts, network errors, redirects, a 200 that is not a token: try again later.
    Transient,
    /// `invalid_client`: the client secret is wrong or expired; a human enters a new one.
    InvalidClient,
    /// `invalid_grant`: the refresh token is dead; the customer re-authorizes.
    InvalidGrant,
}

/// How urgent an alert is; channels filter on it with `min_severity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
