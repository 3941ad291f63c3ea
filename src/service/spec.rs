//! The domain checks of what an operator says about a connection: the fields
//! of `add` and `import` ([`Spec`]) and the changes of `set` ([`Changes`]).
//! Every message names the field and what is wrong with it; the CLI prints
//! them as they are.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::acumatica::instance::{self, InstanceError};
use crate::config::Config;
use crate::model::{
    self, Connection, Mode, State, Timestamp, parse_date, parse_duration, parse_time,
};
use crate::renewal::planning;

/// Why a connection's fields were refused.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A field that does not parse, in its parser's words (they name the field).
    #[error("{0}")]
    Invalid(String),
    /// The instance URL is not one acutoken can use.
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error("lifetime must be longer than zero")]
    ZeroLifetime,
    /// `grant_issued_at` or `refresh_token_issued_at` more than five minutes ahead.
    #[error("{0} lies in the future")]
    InFuture(&'static str),
    #[error("grant and refresh-token times need a refresh token (--refresh-token-file)")]
    TimesWithoutToken,
}

impl From<String> for SpecError {
    fn from(why: String) -> Self {
        SpecError::Invalid(why)
    }
}

/// What `add` and `import` are told about one connection.
pub struct Spec {
    pub name: String,
    pub instance: String,
    pub client_id: String,
    pub labels: BTreeMap<String, String>,
    pub mode: Option<String>,
    pub lifetime: Option<String>,
    pub absolute_lifetime: Option<String>,
    pub secret_expires_at: Option<String>,
    pub grant_issued_at: Option<String>,
    pub refresh_token_issued_at: Option<String>,
}

/// `--label k=v` arguments as a map (the last of a repeated key wins).
pub fn parse_labels(labels: &[String]) -> Result<BTreeMap<String, String>, SpecError> {
    Ok(labels
        .iter()
        .map(|l| model::parse_label(l))
        .collect::<Result<_, _>>()?)
}

/// An absolute lifetime: a duration, or `none` for no cap.
fn parse_absolute(s: &str) -> Result<Option<Duration>, String> {
    if s.trim().eq_ignore_ascii_case("none") {
        Ok(None)
    } else {
        parse_duration(s).map(Some)
    }
}

impl Spec {
    /// Checks every field and builds the connection with its first plan.
    /// The connection this spec describes, with id `id`.
    pub fn build(
        &self,
        id: uuid::Uuid,
        config: &Config,
        now: Timestamp,
        has_refresh_token: bool,
    ) -> Result<Connection, SpecError> {
        model::validate_name(&self.name)?;
        let instance = instance::normalize(&self.instance)?;
        model::validate_client_id(&self.client_id)?;
        let mode = match &self.mode {
            Some(m) => m.parse::<Mode>()?,
            None => config.renewal.mode,
        };
        let lifetime = match &self.lifetime {
            Some(l) => parse_duration(l)?,
            None => config.renewal.lifetime,
        };
        if lifetime.is_zero() {
            return Err(SpecError::ZeroLifetime);
        }
        let absolute_lifetime = match &self.absolute_lifetime {
            Some(a) => parse_absolute(a)?,
            None => config.renewal.absolute_lifetime,
        };
        let opt = |v: &Option<String>, f: fn(&str) -> Result<Timestamp, String>| {
            v.as_deref().map(f).transpose().map_err(SpecError::Invalid)
        };
        let secret_expires_at = opt(&self.secret_expires_at, parse_date)?;
        let grant_issued_at = opt(&self.grant_issued_at, parse_time)?;
        let refresh_token_issued_at = opt(&self.refresh_token_issued_at, parse_time)?;
        for (what, t) in [
            ("grant_issued_at", grant_issued_at),
            ("refresh_token_issued_at", refresh_token_issued_at),
        ] {
            if t.is_some_and(|t| t > now + chrono::Duration::minutes(5)) {
                return Err(SpecError::InFuture(what));
            }
        }
        if !has_refresh_token && (grant_issued_at.is_some() || refresh_token_issued_at.is_some()) {
            return Err(SpecError::TimesWithoutToken);
        }
        let mut conn = Connection {
            id,
            name: self.name.clone(),
            instance,
            client_id: self.client_id.clone(),
            labels: self.labels.clone(),
            mode,
            lifetime,
            absolute_lifetime,
            secret_expires_at,
            grant_issued_at,
            refresh_token_issued_at,
            access_expires_at: None,
            deadline: None,
            deadline_source: None,
            next_refresh_at: None,
            last_refresh_at: None,
            last_error: None,
            state: State::PendingAuthorization,
        };
        planning::initial(&mut conn, has_refresh_token, &config.renewal.policy(), now);
        Ok(conn)
    }
}

/// What `set` is told, as given on the command line.
#[derive(Default)]
pub struct ChangeArgs {
    pub labels: Vec<String>,
    pub mode: Option<String>,
    pub lifetime: Option<String>,
    pub absolute_lifetime: Option<String>,
    pub secret_expires: Option<String>,
    pub instance: Option<String>,
    pub client_id: Option<String>,
}

/// The checked changes of `set`; `None` leaves a field as it is.
pub struct Changes {
    /// Labels to set; an empty value removes the label.
    pub labels: Vec<(String, String)>,
    pub mode: Option<Mode>,
    pub lifetime: Option<Duration>,
    /// `Some(None)` removes the cap.
    pub absolute_lifetime: Option<Option<Duration>>,
    pub secret_expires_at: Option<Timestamp>,
    pub instance: Option<String>,
    pub client_id: Option<String>,
}

impl ChangeArgs {
    /// Checks every field, in the order the command line names them.
    pub fn check(self) -> Result<Changes, SpecError> {
        let labels = self
            .labels
            .iter()
            .map(|l| model::parse_label(l))
            .collect::<Result<Vec<_>, _>>()?;
        let mode = self.mode.as_deref().map(str::parse::<Mode>).transpose()?;
        let lifetime = self.lifetime.as_deref().map(parse_duration).transpose()?;
        if lifetime.is_some_and(|l| l.is_zero()) {
            return Err(SpecError::ZeroLifetime);
        }
        let absolute_lifetime = self
            .absolute_lifetime
            .as_deref()
            .map(parse_absolute)
            .transpose()?;
        let secret_expires_at = self.secret_expires.as_deref().map(parse_date).transpose()?;
        let instance = self
            .instance
            .as_deref()
            .map(instance::normalize)
            .transpose()?;
        if let Some(id) = &self.client_id {
            model::validate_client_id(id)?;
        }
        Ok(Changes {
            labels,
            mode,
            lifetime,
            absolute_lifetime,
            secret_expires_at,
            instance,
            client_id: self.client_id,
        })
    }
}
