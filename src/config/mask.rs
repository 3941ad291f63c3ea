//! The effective configuration as `config check` prints it, secrets masked.

use super::Config;
use crate::secret::Secret;

impl Config {
    /// The effective configuration as TOML for `config check`: path defaults
    /// filled in (`store.path` for SQLite, `api.socket`, `callback.path`),
    /// every webhook URL and signing secret shown as `***`. `store.url` is
    /// shown as written: a URL holding a password never passes
    /// [`Config::validate`]; `store.password_file` is a path, its content is
    /// never in the config.
    pub fn masked_toml(&self) -> String {
        let mut effective = self.clone();
        // A PostgreSQL store has no file; filling the path in would show a
        // config that names both, which is refused.
        if self.store.url.is_none() {
            effective.store.path = Some(self.store_path());
        }
        effective.api.socket = Some(self.socket_path());
        effective.callback.path = Some(self.callback_path());
        for w in &mut effective.alerts.webhooks {
            // Secret already serialises as `***`; replacing the value as well
            // keeps that true whatever serializer is used.
            w.url = w.url.as_ref().map(|_| Secret::new("***"));
            w.secret = w.secret.as_ref().map(|_| Secret::new("***"));
        }
        match toml::to_string(&effective) {
            Ok(text) => text,
            // Every field is a plain value, a table or an array of tables,
            // which TOML can always express; say so rather than panic.
            Err(e) => format!("# the configuration could not be shown as TOML: {e}\n"),
        }
    }
}
