//! `acutoken demo`: the daemon against the built-in Acumatica simulator, with a
//! temporary store and compressed time (lifetimes of minutes, probes every few
//! seconds), ignoring any config. Within a minute a newcomer sees refreshes, a
//! connection fall into `needs_secret` with an alert, and its recovery.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::clock::{self, Clock};
use crate::config::{ChannelKind, Config, WebhookConfig};
use crate::crypto::{Key, Keyring};
use crate::model::NewConnection;
use crate::model::{Connection, Mode, Severity, State};
use crate::renewal::planning;
use crate::secret::Secret;
use crate::service::Connections;
use crate::sim::Simulator;
use crate::store::{Create, Store};

fn say(msg: &str) {
    if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        println!("\x1b[1mdemo:\x1b[0m {msg}");
    } else {
        println!("demo: {msg}");
    }
}

fn demo_config(dir: &std::path::Path, webhook: Option<String>) -> anyhow::Result<Config> {
    let mut c = Config::default();
    c.store.path = Some(dir.join("acutoken.db"));
    c.api.socket = Some(dir.join("acutoken.sock"));
    c.acumatica.allow_insecure_loopback = true;
    c.acumatica.redirect_uri = Some("http://127.0.0.1:8787/settings/acumaticacallback".into());
    let r = &mut c.renewal;
    r.lifetime = Duration::from_secs(10 * 60);
    r.probe_interval = Duration::from_secs(8);
    r.jitter = Duration::from_secs(1);
    r.retry_min = Duration::from_secs(2);
    r.retry_max = Duration::from_secs(8);
    r.warn_before = vec![Duration::from_secs(120), Duration::from_secs(60)];
    r.secret_warn_before = Duration::from_secs(60);
    r.http_timeout = Duration::from_secs(5);
    let a = &mut c.alerts;
    a.group_wait = Duration::from_secs(1);
    a.group_interval = Duration::from_secs(3);
    a.retry_min = Duration::from_secs(1);
    a.retry_max = Duration::from_secs(5);
    if let Some(url) = webhook {
        a.webhooks.push(WebhookConfig {
            name: "demo".into(),
            kind: ChannelKind::Generic,
            url: Some(Secret::new(url)),
            url_file: None,
            min_severity: Severity::Info,
            secret: None,
            secret_file: None,
        });
    }
    c.serve.shutdown_timeout = Duration::from_secs(10);
    c.validate()?;
    Ok(c)
}

/// Runs the demo; returns the exit code.
pub async fn run(webhook: Option<String>) -> anyhow::Result<i32> {
    let dir = std::env::temp_dir().join(format!("acutoken-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(&dir, webhook).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(dir: &std::path::Path, webhook: Option<String>) -> anyhow::Result<i32> {
    let config = demo_config(dir, webhook)?;
    let _ = crate::logging::init(&config.log);
    let clock = clock::system();
    let sim = Simulator::start(clock.clone()).await?;
    say(&format!(
        "started an Acumatica simulator at http://{}",
        sim.addr()
    ));
    let now = clock.now();
    let key = Key::generate();
    crate::crypto::write_key_file(&crate::store::keys::beside(&config.store_path()), &key)?;
    let store = Store::open(&config.store_path(), Keyring::new(key, vec![]), Create::Yes)?;
    let svc = Connections::new(store, Arc::new(config.clone()));
    let policy = config.renewal.policy();
    let customers = [
        ("acme", "Acme Corp"),
        ("globex", "Globex"),
        ("initech", "Initech"),
    ];
    for (site, customer) in customers {
        let client_id = format!(
            "{}@{}",
            uuid::Uuid::new_v4().to_string().to_uppercase(),
            customer
        );
        let secret = format!("secret-{site}");
        sim.add_client(site, &client_id, &secret, None);
        let rt = sim.issue_grant(site, &client_id, now)?;
        let mut conn = Connection {
            id: uuid::Uuid::new_v4(),
            name: format!("{site}-prod"),
            instance: sim.instance(site),
            client_id,
            labels: BTreeMap::from([("customer".to_string(), customer.to_string())]),
            mode: Mode::Absolute,
            lifetime: config.renewal.lifetime,
            absolute_lifetime: None,
            secret_expires_at: None,
            grant_issued_at: Some(now),
            refresh_token_issued_at: Some(now),
            access_expires_at: None,
            deadline: None,
            deadline_source: None,
            next_refresh_at: None,
            last_refresh_at: None,
            last_error: None,
            state: State::Active,
        };
        planning::initial(&mut conn, true, &policy, now);
        // First refresh soon, so the demo shows one within seconds.
        conn.next_refresh_at = Some(now + chrono::Duration::seconds(2));
        let new = NewConnection {
            conn,
            client_secret: Some(Secret::new(secret)),
            refresh_token: Some(Secret::new(rt)),
        };
        let conn = svc.insert(new, now).await?;
        say(&format!(
            "added connection {} for {customer} ({})",
            conn.name, conn.instance
        ));
    }
    drop(svc);

    let stop = CancellationToken::new();
    let serve = tokio::spawn(crate::daemon::serve::run(
        crate::daemon::serve::ServeOptions {
            config: config.clone(),
            explicit_config: None,
            clock: clock.clone(),
            logging_installed: true,
        },
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(12)).await;
    say(&format!(
        "the simulator has answered {} token requests so far; every refresh rotated the refresh token",
        sim.total_token_requests()
    ));

    let globex_client = open_demo_store(&config)?.get("globex-prod")?.conn.client_id;
    sim.replace_secret("globex", &globex_client, "rotated-secret", None)?;
    say(
        "someone replaced globex's client secret on the Connected Applications screen (SM303010); the next refresh will be refused",
    );
    tokio::time::sleep(Duration::from_secs(14)).await;
    say(
        "globex-prod is now needs_secret and a critical needs_secret alert went out (see the log above)",
    );

    say("an operator enters the new secret (acutoken connection set-secret globex-prod)");
    set_secret(&config, "globex-prod", "rotated-secret").await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    say("globex-prod refreshed with the new secret: back to active, and the alert resolved");
    say(&format!(
        "done: {} token requests, {} replayed refresh tokens (must be 0)",
        sim.total_token_requests(),
        sim.total_replays()
    ));
    stop.cancel();
    let code = serve
        .await
        .map_err(|e| anyhow::anyhow!("the demo daemon failed: {e}"))??;
    sim.shutdown().await;
    Ok(code)
}

/// A second handle on the demo store, as a CLI command would open it.
fn open_demo_store(config: &Config) -> anyhow::Result<Store> {
    let path = config.store_path();
    let keys = crate::store::resolve_keyring(config, &path, false)?;
    Ok(Store::open(&path, keys.keyring, Create::No)?)
}

/// `connection set-secret` as the operator runs it, beside the running daemon.
async fn set_secret(config: &Config, name: &str, secret: &str) -> anyhow::Result<()> {
    let svc = Connections::new(open_demo_store(config)?, Arc::new(config.clone()));
    let now = clock::SystemClock.now();
    let running = crate::daemon::running(config);
    svc.set_secret(name, Secret::new(secret), None, running, now)
        .await?;
    Ok(())
}
