//! The command line: one file per command group, all calling into the library.

mod args;
mod authorize;
pub mod connection;
mod demo;
pub mod import;
mod io;
mod keys;
mod ops;
mod status_text;
mod store_copy;

pub use io::print_table;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Parser;

pub use args::Cli;
use args::{AlertCommand, Command, ConfigCommand, KeyCommand, StoreCommand};

use crate::config::Config;
use crate::store::{self, Create, Store};

/// Exit code for a command that failed.
pub const EXIT_ERROR: i32 = 2;

/// An early exit with a chosen code and nothing more to print.
#[derive(Debug)]
pub struct Exit(pub i32);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}", self.0)
    }
}

impl std::error::Error for Exit {}

/// Runs the binary: returns the process exit code.
pub fn main() -> i32 {
    // Before anything else, and before any thread: may execute acutoken again.
    crate::crypto::take_key_from_env();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_ERROR } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return EXIT_ERROR;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            if let Some(Exit(code)) = e.downcast_ref::<Exit>() {
                return *code;
            }
            let text = format!("{e:#}").replace('\n', " ");
            eprintln!(
                "{}error: {text}",
                crate::logging::stderr_prefix(tracing::Level::ERROR)
            );
            EXIT_ERROR
        }
    }
}

/// Loaded configuration for one command.
pub struct Ctx {
    pub config: Config,
    pub source: Option<PathBuf>,
    /// [`crate::config::LoadedConfig::exposure_warning`], for `config check` and `serve`.
    pub exposure: Option<String>,
}

impl Ctx {
    pub fn load(explicit: Option<&Path>) -> anyhow::Result<Ctx> {
        let loaded = Config::load(explicit)?;
        Ok(Ctx {
            exposure: loaded.exposure_warning(),
            config: loaded.config,
            source: loaded.source,
        })
    }

    /// The connections service on the store (opened as [`Ctx::open_store`] does).
    pub fn connections(&self, create: Create) -> anyhow::Result<crate::service::Connections> {
        Ok(crate::service::Connections::new(
            self.open_store(create)?,
            std::sync::Arc::new(self.config.clone()),
        ))
    }

    /// Opens the store; with `create`, makes it (and a key beside it when none exists).
    pub fn open_store(&self, create: Create) -> anyhow::Result<Store> {
        let target = self.config.store_target()?;
        let path = match &target {
            crate::config::StoreTarget::File(path) => path.clone(),
            crate::config::StoreTarget::Postgres(_) => {
                let res = store::resolve_keyring_for(&self.config, &target, false)?;
                let keyring = store::SharedKeyring::new(res.keyring);
                return Ok(Store::open_target(&target, &keyring, create)?);
            }
        };
        if create == Create::No && !path.exists() {
            return Err(store::StoreError::Missing { path }.into());
        }
        let res = store::resolve_keyring(&self.config, &path, create == Create::Yes)?;
        let st = Store::open(&path, res.keyring, create)?;
        if let Some(key) = res.created {
            eprintln!(
                "created a new store key at {} (mode 0600): back it up, the store cannot be read without it; under systemd, load it with LoadCredential=acutoken.key:{} instead",
                key.display(),
                key.display()
            );
        }
        Ok(st)
    }
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let explicit = cli.config.as_deref();
    match cli.command {
        Command::Connection(cmd) => connection::run(explicit, *cmd).await,
        Command::Config(ConfigCommand::Check) => {
            let ctx = Ctx::load(explicit)?;
            if let Some(w) = &ctx.exposure {
                eprintln!("warning: {w}");
            }
            match &ctx.source {
                Some(p) => println!("# config: {} (valid)", p.display()),
                None => println!("# config: built-in defaults and environment (valid)"),
            }
            print!("{}", ctx.config.masked_toml());
            Ok(0)
        }
        Command::Key(KeyCommand::Generate { out }) => keys::generate(out.as_deref()),
        Command::Key(KeyCommand::Rotate { new_key_file }) => {
            let ctx = Ctx::load(explicit)?;
            keys::rotate(&ctx, &new_key_file).await
        }
        Command::Backup { file } => {
            let ctx = Ctx::load(explicit)?;
            let st = ctx.open_store(Create::No)?;
            st.backup(&file)
                .with_context(|| format!("backup to {}", file.display()))?;
            println!(
                "wrote a consistent copy of {} to {}",
                st.path().display(),
                file.display()
            );
            Ok(0)
        }
        Command::Store(StoreCommand::Copy {
            to,
            to_password_file,
        }) => store_copy::run(&Ctx::load(explicit)?, &to, to_password_file.as_deref()),
        Command::Serve => ops::serve(explicit).await,
        Command::Demo { webhook } => demo::run(webhook).await,
        Command::Token { name, json } => ops::token(&Ctx::load(explicit)?, &name, json).await,
        Command::Status { json } => ops::status(&Ctx::load(explicit)?, json).await,
        Command::Alert(AlertCommand::Test) => ops::alert_test(&Ctx::load(explicit)?).await,
    }
}
