//! The rules of DESIGN §6 (and §10 for `store.url`) that single values and
//! pairs of values must satisfy. Nothing here reads a file.

use std::collections::HashSet;
use std::time::Duration;

use super::error::{ConfigError, invalid};
use super::postgres::parse_store_url;
use super::{ChannelKind, Config};
use crate::secret::Secret;

const LOG_LEVELS: [&str; 5] = ["trace", "debug", "info", "warn", "error"];

impl Config {
    /// Checks every rule of DESIGN §6 that a single value or a pair of values
    /// must satisfy; the first broken rule is returned, naming the key. Reads
    /// no files.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_store()?;
        self.validate_renewal()?;
        self.validate_alerts()?;
        self.validate_listeners()?;
        if !LOG_LEVELS.contains(&self.log.level.as_str()) {
            return Err(invalid(
                "log.level",
                format!(
                    "must be one of trace, debug, info, warn, error (is `{}`)",
                    self.log.level
                ),
            ));
        }
        Ok(())
    }

    /// `store.url` (DESIGN §10) and the keys that go with it or against it.
    fn validate_store(&self) -> Result<(), ConfigError> {
        let s = &self.store;
        if let Some(name) = &self.serve.replica_name {
            let fine = !name.is_empty()
                && name.len() <= 63
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !fine {
                return Err(invalid(
                    "serve.replica_name",
                    format!(
                        "must be 1 to 63 letters, digits, `.`, `_` or `-` (is `{}`)",
                        name.escape_debug()
                    ),
                ));
            }
        }
        if s.lease < Duration::from_secs(3) || s.lease > Duration::from_secs(600) {
            return Err(invalid(
                "store.lease",
                format!(
                    "must be between 3s and 10m: a replica heartbeats every third of it (is {})",
                    crate::model::fmt_duration(s.lease)
                ),
            ));
        }
        let Some(url) = &s.url else {
            if s.password_file.is_some() {
                return Err(invalid(
                    "store.password_file",
                    "is set but store.url is not: the password is for a PostgreSQL store; set store.url or remove store.password_file",
                ));
            }
            return Ok(());
        };
        // The URL first: a password in it is the error that matters most.
        parse_store_url(url)?;
        // `path` is `None` unless the file or the environment set it; its
        // default does not count.
        if s.path.is_some() {
            return Err(invalid(
                "store.path",
                "is set together with store.url: store.url selects a PostgreSQL store, store.path the SQLite file; remove store.path (the packaged config sets it) or store.url",
            ));
        }
        Ok(())
    }

    fn validate_renewal(&self) -> Result<(), ConfigError> {
        let r = &self.renewal;
        if !(r.renew_at > 0.0 && r.renew_at < 1.0) {
            return Err(invalid(
                "renewal.renew_at",
                format!("must be greater than 0 and less than 1 (is {})", r.renew_at),
            ));
        }
        if r.lifetime.is_zero() {
            return Err(invalid("renewal.lifetime", "must be greater than 0"));
        }
        if let Some(cap) = r.absolute_lifetime
            && cap < r.lifetime
        {
            return Err(invalid(
                "renewal.absolute_lifetime",
                format!(
                    "must be at least renewal.lifetime ({}), or \"none\" (is {})",
                    crate::model::fmt_duration(r.lifetime),
                    crate::model::fmt_duration(cap)
                ),
            ));
        }
        check_backoff("renewal", r.retry_min, r.retry_max)?;
        if r.max_concurrent < 1 {
            return Err(invalid("renewal.max_concurrent", "must be at least 1"));
        }
        if r.per_instance_concurrent < 1 {
            return Err(invalid(
                "renewal.per_instance_concurrent",
                "must be at least 1",
            ));
        }
        if r.http_timeout.is_zero() {
            return Err(invalid("renewal.http_timeout", "must be greater than 0"));
        }
        if self.serve.shutdown_timeout <= r.http_timeout {
            return Err(invalid(
                "serve.shutdown_timeout",
                format!(
                    "must exceed renewal.http_timeout ({}) so refreshes in flight can be saved (is {})",
                    crate::model::fmt_duration(r.http_timeout),
                    crate::model::fmt_duration(self.serve.shutdown_timeout)
                ),
            ));
        }
        if r.warn_before.is_empty() {
            return Err(invalid(
                "renewal.warn_before",
                "must list at least one duration",
            ));
        }
        if r.warn_before.iter().any(Duration::is_zero) {
            return Err(invalid(
                "renewal.warn_before",
                "entries must be greater than 0",
            ));
        }
        Ok(())
    }

    fn validate_alerts(&self) -> Result<(), ConfigError> {
        let a = &self.alerts;
        if a.repeat_interval.is_zero() {
            return Err(invalid("alerts.repeat_interval", "must be greater than 0"));
        }
        if a.group_max < 1 {
            return Err(invalid("alerts.group_max", "must be at least 1"));
        }
        check_backoff("alerts", a.retry_min, a.retry_max)?;
        if let Some(expr) = &a.digest {
            parse_cron(expr).map_err(|reason| invalid("alerts.digest", reason))?;
        }
        if a.digest_timezone.parse::<chrono_tz::Tz>().is_err() {
            return Err(invalid(
                "alerts.digest_timezone",
                format!(
                    "`{}` is not an IANA time zone name such as `Europe/Berlin`",
                    a.digest_timezone
                ),
            ));
        }
        let mut names = HashSet::new();
        for (i, w) in a.webhooks.iter().enumerate() {
            let key = |field: &str| format!("alerts.webhooks[{i}].{field}");
            if w.name.trim().is_empty() {
                return Err(invalid(key("name"), "must not be empty"));
            }
            if !names.insert(w.name.as_str()) {
                return Err(invalid(
                    key("name"),
                    format!("`{}` is already used by an earlier webhook", w.name),
                ));
            }
            match (&w.url, &w.url_file) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        key("url"),
                        "both `url` and `url_file` are set; set only one",
                    ));
                }
                (None, None) => {
                    return Err(invalid(
                        key("url"),
                        "one of `url` or `url_file` is required",
                    ));
                }
                (Some(url), None) => check_webhook_url(&key("url"), url.expose())?,
                (None, Some(_)) => {}
            }
            let has_secret = w.secret.is_some() || w.secret_file.is_some();
            if has_secret && w.kind != ChannelKind::Generic {
                return Err(invalid(
                    key("secret"),
                    format!(
                        "a signing secret is only for kind `generic`, not `{}`",
                        w.kind.as_str()
                    ),
                ));
            }
            if w.secret.is_some() && w.secret_file.is_some() {
                return Err(invalid(
                    key("secret"),
                    "both `secret` and `secret_file` are set; set only one",
                ));
            }
            if w.secret.as_ref().is_some_and(Secret::is_empty) {
                return Err(invalid(key("secret"), "must not be empty"));
            }
        }
        Ok(())
    }

    fn validate_listeners(&self) -> Result<(), ConfigError> {
        if let Some(uri) = &self.acumatica.redirect_uri {
            let url = url::Url::parse(uri).map_err(|e| {
                invalid(
                    "acumatica.redirect_uri",
                    format!("is not an absolute URL: {e}"),
                )
            })?;
            if !(url.scheme() == "https" || (url.scheme() == "http" && is_loopback(&url))) {
                return Err(invalid(
                    "acumatica.redirect_uri",
                    "must be an https URL (http only for localhost or a loopback address)",
                ));
            }
        }
        if let Some(path) = &self.callback.path
            && !path.starts_with('/')
        {
            return Err(invalid(
                "callback.path",
                format!("must start with `/` (is `{path}`)"),
            ));
        }
        if self.callback.state_ttl.is_zero() {
            return Err(invalid("callback.state_ttl", "must be greater than 0"));
        }
        let api = &self.api;
        match (&api.tls_cert_file, &api.tls_key_file) {
            (Some(_), None) => {
                return Err(invalid(
                    "api.tls_key_file",
                    "is required with `api.tls_cert_file`",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "api.tls_cert_file",
                    "is required with `api.tls_key_file`",
                ));
            }
            _ => {}
        }
        if let Some(listen) = api.listen {
            if api.token_file.is_none() {
                return Err(invalid(
                    "api.token_file",
                    "is required when `api.listen` is set: every request on it needs a bearer token",
                ));
            }
            if !listen.ip().is_loopback() && api.tls_cert_file.is_none() {
                return Err(invalid(
                    "api.tls_cert_file",
                    format!(
                        "and `api.tls_key_file` are required because `api.listen` ({listen}) is not a loopback address"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The digest schedule, parsed, or `None` when no digest is configured
    /// or the expression is invalid (which [`Config::validate`] refuses).
    pub fn digest_schedule(&self) -> Option<croner::Cron> {
        self.alerts
            .digest
            .as_deref()
            .and_then(|e| parse_cron(e).ok())
    }
}

fn check_backoff(section: &str, min: Duration, max: Duration) -> Result<(), ConfigError> {
    if min.is_zero() {
        return Err(invalid(
            format!("{section}.retry_min"),
            "must be greater than 0",
        ));
    }
    if max < min {
        return Err(invalid(
            format!("{section}.retry_max"),
            format!(
                "must be at least {section}.retry_min ({}) (is {})",
                crate::model::fmt_duration(min),
                crate::model::fmt_duration(max)
            ),
        ));
    }
    Ok(())
}

fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// A webhook URL is a secret: the reasons given never include any of it.
pub(super) fn check_webhook_url(key: &str, raw: &str) -> Result<(), ConfigError> {
    let url = url::Url::parse(raw.trim()).map_err(|_| invalid(key, "is not an absolute URL"))?;
    // A metadata or link-local address (an IP literal no resolver would see):
    // refused here, so the mistake shows at `config check` and at start.
    crate::acumatica::address::check_webhook_destination(&url)
        .map_err(|e| invalid(key, format!("must not go to {e}")))?;
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback(&url) => Ok(()),
        "http" => Err(invalid(
            key,
            "must use https (plain http only for localhost or a loopback address)",
        )),
        _ => Err(invalid(key, "must be an https URL")),
    }
}

/// Parses a 5- or 6-field cron expression (an optional seconds field
/// first) the one way both validation and the digest use: a 5-field
/// expression fires at second 0.
fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let six = match fields.len() {
        5 => format!("0 {}", fields.join(" ")),
        6 => fields.join(" "),
        n => {
            return Err(format!(
                "`{expr}` has {n} fields; expected 5 (minute hour day-of-month month day-of-week), \
                 optionally preceded by seconds"
            ));
        }
    };
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .build()
        .parse(&six)
        .map_err(|_| format!("`{expr}` is not a valid cron expression"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cron_takes_five_or_six_fields() {
        let at = |expr: &str, from: &str| {
            let from = chrono::DateTime::parse_from_rfc3339(from).unwrap();
            parse_cron(expr)
                .unwrap()
                .find_next_occurrence(&from, false)
                .unwrap()
                .to_rfc3339()
        };
        // Five fields fire at second 0; six start with the seconds.
        assert_eq!(
            at("*/15 * * * *", "2026-01-01T10:07:30+00:00"),
            "2026-01-01T10:15:00+00:00"
        );
        assert_eq!(
            at(" 5  0 8 * * * ", "2026-01-01T07:00:00+00:00"),
            "2026-01-01T08:00:05+00:00"
        );
        assert!(parse_cron("0 8 * * * * *").is_err());
        assert!(parse_cron("0 8 32 * *").is_err());
        assert!(parse_cron("x 8 * * *").is_err());
    }
}
