//! The connections service: one function per thing an operator or an
//! application does to a connection (add, set, set-secret, enable, disable,
//! remove, authorize, complete, refresh, token), each with a typed result
//! and a typed error whose message is the one the user reads. The CLI parses
//! and prints around these; the daemon's API calls the same refresh and
//! token; `demo` adds and sets secrets through them too. `import` checks its
//! records with [`Spec`] and writes them with `Store::import`.

mod access;
mod edit;
mod spec;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex, OnceLock};

pub use access::{
    AuthorizeError, CompleteError, Completed, Redirect, RefreshError, TokenError, UnsavedError,
};
pub use edit::{EditError, Removal, secret_expiry};
pub use spec::{ChangeArgs, Changes, Spec, SpecError, parse_labels};

use crate::acumatica::{ClientBuildError, TokenClient};
use crate::config::Config;
use crate::renewal::engine::{Engine, EngineParts, NoHooks};
use crate::store::claims::Owner;
use crate::store::edits::Edit;
use crate::store::{Store, StoreError, StoreHandle};

/// Why an engine for this process could not be made.
#[derive(Debug, thiserror::Error)]
pub enum EngineSetupError {
    #[error(transparent)]
    Client(#[from] ClientBuildError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The use cases over the store, the configuration they read, and (for
/// those that reach Acumatica) a renewal engine.
pub struct Connections {
    store: Backing,
    config: Arc<Config>,
    /// The daemon's engine, or one made for this process when first needed.
    engine: OnceLock<Arc<Engine>>,
}

/// Where the use cases write.
enum Backing {
    /// The daemon's handle (group commit, read connections).
    Handle(StoreHandle),
    /// A one-shot command's own connection: it closes with the command, so
    /// a refused edit leaves the store's files as they were. A handle on the
    /// same file is opened only for the use cases that need one (authorize,
    /// complete, refresh, token).
    Own {
        store: Mutex<Store>,
        handle: OnceLock<StoreHandle>,
    },
}

impl Connections {
    /// The service for a one-shot command on its own connection (the CLI
    /// without a daemon, `demo`): an engine of its own is made on first
    /// use, claiming under the same rules as the daemon's.
    pub fn new(store: Store, config: Arc<Config>) -> Connections {
        Connections {
            store: Backing::Own {
                store: Mutex::new(store),
                handle: OnceLock::new(),
            },
            config,
            engine: OnceLock::new(),
        }
    }

    /// The service inside the daemon, on the daemon's engine (its claims,
    /// limits, token cache and operator-refresh rate limit).
    pub fn with_engine(engine: Arc<Engine>, config: Arc<Config>) -> Connections {
        let cell = OnceLock::new();
        let store = Backing::Handle(engine.store().clone());
        let _ = cell.set(engine);
        Connections {
            store,
            config,
            engine: cell,
        }
    }

    /// A store handle: the daemon's, or one opened on the command's file.
    fn handle(&self) -> Result<StoreHandle, StoreError> {
        match &self.store {
            Backing::Handle(h) => Ok(h.clone()),
            Backing::Own { store, handle } => {
                if let Some(h) = handle.get() {
                    return Ok(h.clone());
                }
                let st = store.lock().unwrap_or_else(|e| e.into_inner());
                let h = StoreHandle::open(st.target(), st.shared_keyring())?;
                Ok(handle.get_or_init(|| h).clone())
            }
        }
    }

    /// Writes one edit of a connection: in the daemon's next batch, or on
    /// the command's own connection.
    async fn edit<T: Send + 'static>(&self, edit: Edit<T>) -> Result<T, StoreError> {
        match &self.store {
            Backing::Handle(h) => h.edit(edit).await,
            Backing::Own { store, .. } => {
                store.lock().unwrap_or_else(|e| e.into_inner()).edit(edit)
            }
        }
    }

    /// A read of committed state.
    async fn read<T, F>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> T + Send + 'static,
    {
        match &self.store {
            Backing::Handle(h) => h.read(f).await,
            Backing::Own { store, .. } => f(&store.lock().unwrap_or_else(|e| e.into_inner())),
        }
    }

    /// A token client built from the configuration.
    fn client(&self) -> Result<TokenClient, ClientBuildError> {
        match self.engine.get() {
            Some(e) => Ok(e.client()),
            None => TokenClient::new(crate::renewal::client_settings(&self.config)),
        }
    }

    /// The engine: the one given, or one for this process (role `cli`).
    fn engine(&self) -> Result<&Arc<Engine>, EngineSetupError> {
        if let Some(e) = self.engine.get() {
            return Ok(e);
        }
        let engine = Arc::new(Engine::new(EngineParts {
            store: self.handle()?,
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
