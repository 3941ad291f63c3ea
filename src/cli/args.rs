//! The command line, as clap definitions (also the source of completions and the man page).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Keeps Acumatica OAuth connections alive: refreshes every refresh token ahead of
/// its deadline, hands out access tokens, and alerts when a human must act.
#[derive(Debug, Parser)]
#[command(name = "acutoken", version, about, max_term_width = 100)]
pub struct Cli {
    /// Config file (else $ACUTOKEN_CONFIG, $CONFIGURATION_DIRECTORY/acutoken.toml,
    /// /etc/acutoken/acutoken.toml, built-in defaults)
    #[arg(short, long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (systemd Type=notify)
    Serve,
    /// Watch the daemon work against the built-in Acumatica simulator, within a minute
    Demo {
        /// Also send the demo's alerts to this webhook (generic JSON)
        #[arg(long, value_name = "URL")]
        webhook: Option<String>,
    },
    /// Add, inspect and change connections
    #[command(subcommand)]
    Connection(Box<ConnectionCommand>),
    /// Print a valid access token for a connection
    Token {
        name: String,
        /// Print the token response as JSON instead of the bare token
        #[arg(long)]
        json: bool,
    },
    /// Is the daemon up, what needs a human, what is due (exit 0 fine, 1 a human must act, 3 daemon down)
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Alert channels
    #[command(subcommand)]
    Alert(AlertCommand),
    /// Configuration
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Store keys
    #[command(subcommand)]
    Key(KeyCommand),
    /// Write a consistent online copy of the store (mode 0600)
    Backup { file: PathBuf },
    /// Move the store between SQLite and PostgreSQL
    #[command(subcommand)]
    Store(StoreCommand),
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy the whole store into a new one (all or nothing, sealed values stay sealed, the same key opens it); refused while a daemon serves the store
    Copy {
        /// A SQLite file that does not exist yet, or a PostgreSQL URL
        /// (postgres://USER@HOST/DB, no password) whose database is empty
        #[arg(long, value_name = "PATH_OR_URL")]
        to: String,
        /// The PostgreSQL password for --to (else the systemd credential acutoken.pgpass)
        #[arg(long, value_name = "FILE")]
        to_password_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AlertCommand {
    /// Send a `test` alert to every channel and report each result
    Test,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the config and print it with secrets masked
    Check,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Make a new key: base64 of 32 random bytes
    Generate {
        /// Write it to FILE (mode 0600); without it, to stdout when that is not a terminal
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Re-seal every secret under a new key
    Rotate {
        #[arg(long, value_name = "FILE")]
        new_key_file: PathBuf,
    },
}

/// Options shared by `add` and `set`.
#[derive(Debug, Args, Default)]
pub struct PlanArgs {
    /// KEY=VALUE shown in alerts (customer name, contact); repeatable
    #[arg(long = "label", value_name = "K=V")]
    pub labels: Vec<String>,
    /// The secret's "Expires On (UTC)": YYYY-MM-DD or RFC 3339
    #[arg(long, value_name = "DATE")]
    pub secret_expires: Option<String>,
    /// absolute or sliding (default: renewal.mode)
    #[arg(long)]
    pub mode: Option<String>,
    /// Refresh-token lifetime, e.g. 30d (default: renewal.lifetime)
    #[arg(long, value_name = "DUR")]
    pub lifetime: Option<String>,
    /// Sliding mode's absolute cap, or `none` (default: renewal.absolute_lifetime)
    #[arg(long, value_name = "DUR|none")]
    pub absolute_lifetime: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ConnectionCommand {
    /// Add one connection, offline; the client secret comes from stdin unless a file is named
    Add {
        name: String,
        /// The instance as the browser shows it, e.g. https://acme.acumatica.com/Main
        #[arg(long, value_name = "URL")]
        instance: String,
        /// The Connected Application's client ID, e.g. 88358B02-...@Tenant
        #[arg(long, value_name = "ID")]
        client_id: String,
        #[command(flatten)]
        plan: PlanArgs,
        #[arg(long, value_name = "FILE")]
        client_secret_file: Option<PathBuf>,
        /// An existing refresh token (else the connection waits for authorization)
        #[arg(long, value_name = "FILE")]
        refresh_token_file: Option<PathBuf>,
        /// When the customer authorized (RFC 3339); unknown = the deadline is assumed
        #[arg(long, value_name = "TIME")]
        grant_issued_at: Option<String>,
        /// When the refresh token was issued (RFC 3339)
        #[arg(long, value_name = "TIME")]
        refresh_token_issued_at: Option<String>,
    },
    /// Add many from a JSON array; all or nothing
    Import { file: PathBuf },
    /// List connections
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one connection
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Edit a connection in place (a new instance or client ID clears the grant)
    Set {
        name: String,
        #[command(flatten)]
        plan: PlanArgs,
        #[arg(long, value_name = "URL")]
        instance: Option<String>,
        #[arg(long, value_name = "ID")]
        client_id: Option<String>,
    },
    /// Enter a new client secret (from stdin unless a file is named)
    SetSecret {
        name: String,
        #[arg(long, value_name = "FILE")]
        client_secret_file: Option<PathBuf>,
        #[arg(long, value_name = "DATE")]
        secret_expires: Option<String>,
    },
    /// Print the authorization URL to send to the customer
    Authorize { name: String },
    /// Finish authorization by hand from the URL the browser landed on
    Complete {
        name: String,
        #[arg(long, value_name = "URL")]
        redirect_url: String,
    },
    /// Refresh now and print the outcome
    Refresh { name: String },
    /// What happened to a connection (kept 90 days)
    History {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Turn a connection off: no refreshes, no tokens, no alerts
    Disable { name: String },
    /// Turn a connection back on
    Enable { name: String },
    /// Remove a connection and its history
    Remove {
        name: String,
        /// Do not ask (required when stdin is not a terminal)
        #[arg(long)]
        yes: bool,
    },
}
