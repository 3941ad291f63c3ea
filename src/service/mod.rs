//! The connections service: one function per thing an operator or an
//! application does to a connection (add, set, set-secret, enable, disable,
//! remove, authorize, complete, refresh, token), each with a typed result
//! and a typed error whose message is the one the user reads. The CLI parses
//! and prints around these; the daemon's API calls the same refresh and
//! token; `demo` adds and sets secrets through them too. `import` checks its
//! records with [`Spec`] and keeps its bulk writer in `cli/import.rs`.

mod access;
mod edit;
mod spec;
#[cfg(test)]
mod tests;

use std::sync::{Arc, OnceLock};

pub use access::{
    AuthorizeError, CompleteError, Completed, Redirect, RefreshError, TokenError, UnsavedError,
};
pub use edit::{EditError, Removal, secret_expiry};
pub use spec::{ChangeArgs, Changes, Spec, SpecError, parse_labels};

use crate::acumatica::{ClientBuildError, TokenClient};
use crate::config::Config;
use crate::renewal::engine::{Engine, EngineParts, NoHooks};
use crate::store::StoreHandle;
use crate::store::claims::Owner;

/// The use cases over one store handle, the configuration they read, and
/// (for those that reach Acumatica) a renewal engine.
pub struct Connections {
    store: StoreHandle,
    config: Arc<Config>,
    /// The daemon's engine, or one made for this process when first needed.
    engine: OnceLock<Arc<Engine>>,
}

impl Connections {
    /// The service for a process that works on the store itself (the CLI
    /// without a daemon, `demo`): an engine of its own is made on first use,
    /// claiming under the same rules as the daemon's.
    pub fn new(store: StoreHandle, config: Arc<Config>) -> Connections {
        Connections {
            store,
            config,
            engine: OnceLock::new(),
        }
    }

    /// The service inside the daemon, on the daemon's engine (its claims,
    /// limits, token cache and operator-refresh rate limit).
    pub fn with_engine(engine: Arc<Engine>, config: Arc<Config>) -> Connections {
        let cell = OnceLock::new();
        let store = engine.store().clone();
        let _ = cell.set(engine);
        Connections {
            store,
            config,
            engine: cell,
        }
    }

    /// The store handle the use cases write through.
    pub fn store(&self) -> &StoreHandle {
        &self.store
    }

    /// A token client built from the configuration.
    fn client(&self) -> Result<TokenClient, ClientBuildError> {
        match self.engine.get() {
            Some(e) => Ok(e.client()),
            None => TokenClient::new(crate::renewal::client_settings(&self.config)),
        }
    }

    /// The engine: the one given, or one for this process (role `cli`).
    fn engine(&self) -> Result<&Arc<Engine>, ClientBuildError> {
        if let Some(e) = self.engine.get() {
            return Ok(e);
        }
        let engine = Arc::new(Engine::new(EngineParts {
            store: self.store.clone(),
            client: self.client()?,
            policy: self.config.renewal.policy(),
            clock: crate::clock::system(),
            owner: Owner::current("cli"),
            http_timeout: self.config.renewal.http_timeout,
            spill_dir: Some(self.config.spill_dir()),
            limits: crate::renewal::limits_from(&self.config),
            hooks: Arc::new(NoHooks),
        }));
        Ok(self.engine.get_or_init(|| engine))
    }
}
