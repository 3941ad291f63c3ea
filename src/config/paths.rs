//! Where things live when the config does not say: the store, spilled
//! tokens, the API socket (after the systemd directories), and the callback path.

use std::path::{Path, PathBuf};

use super::Config;
use super::env::{EnvLookup, first_dir};

impl Config {
    /// `store.path`, else `$STATE_DIRECTORY/acutoken.db` (the first directory
    /// when several are listed), else `./acutoken.db`.
    pub fn store_path(&self) -> PathBuf {
        self.store_path_in(&|name| std::env::var_os(name))
    }

    pub(super) fn store_path_in(&self, env: EnvLookup<'_>) -> PathBuf {
        if let Some(path) = &self.store.path {
            return path.clone();
        }
        match first_dir(env("STATE_DIRECTORY")) {
            Some(dir) => dir.join("acutoken.db"),
            None => PathBuf::from("./acutoken.db"),
        }
    }

    /// `serve.replica_name`, else this machine's host name (DESIGN §10).
    pub fn replica_name(&self) -> String {
        match &self.serve.replica_name {
            Some(name) => name.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "localhost".into()),
        }
    }

    /// `store.spill_dir`, else `$RUNTIME_DIRECTORY/pending` (a tmpfs under
    /// systemd), else `pending` beside the store. The packaged config names
    /// it, so that a CLI run without `$RUNTIME_DIRECTORY` spills where the
    /// daemon looks.
    pub fn spill_dir(&self) -> PathBuf {
        if let Some(dir) = &self.store.spill_dir {
            return dir.clone();
        }
        if let Some(r) = self.runtime_dir() {
            return r.join("pending");
        }
        let store = self.store_path();
        store
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join("pending")
    }

    /// Every place a spilled token may wait, the configured one first: the
    /// daemon imports from all of them at start, so a token spilled by an
    /// older version, or by a CLI run with another environment, is not left
    /// behind.
    pub fn spill_dirs(&self) -> Vec<PathBuf> {
        let store = self.store_path();
        let beside = store
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join("pending");
        let mut dirs = vec![self.spill_dir()];
        dirs.extend(self.runtime_dir().map(|r| r.join("pending")));
        dirs.extend(
            first_dir(std::env::var_os("XDG_RUNTIME_DIR"))
                .map(|x| x.join("acutoken").join("pending")),
        );
        dirs.push(beside);
        let mut seen = Vec::new();
        dirs.retain(|d| {
            let new = !seen.contains(d);
            seen.push(d.clone());
            new
        });
        dirs
    }

    /// `api.socket`, else `$RUNTIME_DIRECTORY/acutoken.sock`, else
    /// `acutoken.sock` beside the store.
    pub fn socket_path(&self) -> PathBuf {
        self.socket_path_in(&|name| std::env::var_os(name))
    }

    fn socket_path_in(&self, env: EnvLookup<'_>) -> PathBuf {
        if let Some(path) = &self.api.socket {
            return path.clone();
        }
        match first_dir(env("RUNTIME_DIRECTORY")) {
            Some(dir) => dir.join("acutoken.sock"),
            None => self.store_path_in(env).with_file_name("acutoken.sock"),
        }
    }

    /// `$RUNTIME_DIRECTORY` (its first directory), where tokens that could not
    /// be saved are spilled; `None` outside systemd.
    pub fn runtime_dir(&self) -> Option<PathBuf> {
        first_dir(std::env::var_os("RUNTIME_DIRECTORY"))
    }

    /// `callback.path`, else the path of `acumatica.redirect_uri`, else
    /// `/settings/acumaticacallback`.
    pub fn callback_path(&self) -> String {
        if let Some(path) = &self.callback.path {
            return path.clone();
        }
        self.acumatica
            .redirect_uri
            .as_deref()
            .and_then(|u| url::Url::parse(u).ok())
            .map(|u| u.path().to_owned())
            .unwrap_or_else(|| "/settings/acumaticacallback".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::env::fake_env;

    #[test]
    fn path_defaults_follow_systemd_directories() {
        let c = Config::default();
        let none = fake_env(&[]);
        assert_eq!(c.store_path_in(&none), PathBuf::from("./acutoken.db"));
        assert_eq!(c.socket_path_in(&none), PathBuf::from("./acutoken.sock"));

        let env = fake_env(&[
            ("STATE_DIRECTORY", "/var/lib/acutoken:/var/lib/other"),
            ("RUNTIME_DIRECTORY", "/run/acutoken"),
        ]);
        assert_eq!(
            c.store_path_in(&env),
            PathBuf::from("/var/lib/acutoken/acutoken.db")
        );
        assert_eq!(
            c.socket_path_in(&env),
            PathBuf::from("/run/acutoken/acutoken.sock")
        );

        let env = fake_env(&[("STATE_DIRECTORY", "/var/lib/acutoken")]);
        assert_eq!(
            c.socket_path_in(&env),
            PathBuf::from("/var/lib/acutoken/acutoken.sock")
        );

        let mut c = Config::default();
        c.store.path = Some("/srv/db/store.db".into());
        assert_eq!(
            c.socket_path_in(&none),
            PathBuf::from("/srv/db/acutoken.sock")
        );
    }
}
