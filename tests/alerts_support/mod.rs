//! Shared parts of the alert tests: a recording webhook sink on 127.0.0.1,
//! stores with connections, configs, and a log capture.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use acutoken::config::{ChannelKind, Config, WebhookConfig};
use acutoken::crypto::{Key, Keyring};
use acutoken::model::NewConnection;
use acutoken::model::{Connection, Mode, Severity, State, Timestamp};
use acutoken::secret::Secret;
use acutoken::store::{self, Create, Store};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as AxPath, State as AxState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::Notify;
use uuid::Uuid;

/// What the sink answers.
#[derive(Debug, Clone)]
pub enum Reply {
    Ok,
    Status(u16),
    RetryAfter(u64),
    Hang,
}

/// One request the sink received.
#[derive(Debug, Clone)]
pub struct Received {
    pub hook: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("sink got JSON")
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

#[derive(Default)]
struct SinkState {
    received: Mutex<Vec<Received>>,
    /// Scripted replies per hook; `Ok` once a script runs out, unless a default is set.
    script: Mutex<HashMap<String, VecDeque<Reply>>>,
    default: Mutex<HashMap<String, Reply>>,
    changed: Notify,
}

/// A webhook receiver on a random loopback port that records everything.
#[derive(Clone)]
pub struct Sink {
    pub port: u16,
    state: Arc<SinkState>,
}

async fn hook(
    AxState(state): AxState<Arc<SinkState>>,
    AxPath(name): AxPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let reply = {
        let mut script = state.script.lock().unwrap();
        script
            .get_mut(&name)
            .and_then(VecDeque::pop_front)
            .or_else(|| state.default.lock().unwrap().get(&name).cloned())
            .unwrap_or(Reply::Ok)
    };
    state.received.lock().unwrap().push(Received {
        hook: name,
        headers,
        body: body.to_vec(),
    });
    state.changed.notify_waiters();
    match reply {
        Reply::Ok => StatusCode::OK.into_response(),
        Reply::Status(s) => StatusCode::from_u16(s).unwrap().into_response(),
        Reply::RetryAfter(s) => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", s.to_string())],
        )
            .into_response(),
        Reply::Hang => {
            std::future::pending::<()>().await;
            StatusCode::OK.into_response()
        }
    }
}

impl Sink {
    pub async fn start() -> Sink {
        let state = Arc::new(SinkState::default());
        let app = Router::new()
            .route("/hook/{name}", axum::routing::post(hook))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Sink { port, state }
    }

    /// The URL of hook `name`, with a query token that must never be logged.
    pub fn url(&self, name: &str) -> String {
        format!(
            "http://127.0.0.1:{}/hook/{name}?token=URLSECRET-{name}",
            self.port
        )
    }

    pub fn script(&self, name: &str, replies: impl IntoIterator<Item = Reply>) {
        self.state
            .script
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_default()
            .extend(replies);
    }

    pub fn set_default(&self, name: &str, reply: Reply) {
        self.state
            .default
            .lock()
            .unwrap()
            .insert(name.to_string(), reply);
    }

    pub fn received(&self, name: &str) -> Vec<Received> {
        self.state
            .received
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.hook == name)
            .cloned()
            .collect()
    }

    pub fn all(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// Waits (at most 20 s) until hook `name` has received `n` requests.
    pub async fn wait_for(&self, name: &str, n: usize) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let notified = self.state.changed.notified();
            let got = self.received(name);
            if got.len() >= n {
                return got;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("hook {name}: expected {n} requests, got {}", got.len());
            }
        }
    }
}

pub fn webhook(sink: &Sink, name: &str, kind: ChannelKind, min: Severity) -> WebhookConfig {
    WebhookConfig {
        name: name.to_string(),
        kind,
        url: Some(Secret::new(sink.url(name))),
        url_file: None,
        min_severity: min,
        secret: None,
        secret_file: None,
    }
}

/// A config with fast delivery: no grouping wait, no group interval, short backoff.
pub fn config(webhooks: Vec<WebhookConfig>) -> Config {
    let mut c = Config::default();
    c.alerts.group_wait = Duration::ZERO;
    c.alerts.group_interval = Duration::ZERO;
    c.alerts.retry_min = Duration::from_millis(20);
    c.alerts.retry_max = Duration::from_millis(100);
    c.alerts.webhooks = webhooks;
    c
}

pub fn open_store(path: &Path, key: &Key) -> Store {
    Store::open(path, Keyring::new(key.clone(), vec![]), Create::Yes).unwrap()
}

pub const CLIENT_SECRET: &str = "CLIENTSECRET-0f9e";
pub const REFRESH_TOKEN: &str = "REFRESHTOKEN-77ab";

pub fn connection(name: &str, now: Timestamp) -> Connection {
    Connection {
        id: Uuid::new_v4(),
        name: name.to_string(),
        instance: format!("{name}.acumatica.com"),
        client_id: "88358B02-A48D-A50E-F710-39C1636C30F6@Tenant".into(),
        labels: BTreeMap::from([
            ("customer".to_string(), format!("Customer {name}")),
            ("contact".to_string(), "ops@example.com".to_string()),
        ]),
        mode: Mode::Absolute,
        lifetime: Duration::from_secs(30 * 86_400),
        absolute_lifetime: None,
        secret_expires_at: None,
        grant_issued_at: Some(now),
        refresh_token_issued_at: Some(now),
        access_expires_at: None,
        deadline: Some(now + chrono::Duration::days(30)),
        deadline_source: None,
        next_refresh_at: None,
        last_refresh_at: None,
        last_error: None,
        state: State::Active,
    }
}

/// Inserts connections and returns their ids.
pub fn insert(store: &mut Store, conns: Vec<Connection>, now: Timestamp) -> Vec<Uuid> {
    store
        .write(|tx, kr| {
            let mut ids = Vec::new();
            for c in conns {
                ids.push(c.id);
                store::connections::insert(
                    tx,
                    kr,
                    &NewConnection {
                        conn: c,
                        client_secret: Some(Secret::new(CLIENT_SECRET)),
                        refresh_token: Some(Secret::new(REFRESH_TOKEN)),
                    },
                    now,
                )?;
            }
            Ok(ids)
        })
        .unwrap()
}

/// Moves connections to `state` and syncs their alerts, as the engine does.
pub fn set_state(
    store: &mut Store,
    ids: &[Uuid],
    state: State,
    error: Option<&str>,
    now: Timestamp,
) {
    let policy = Config::default().renewal.policy();
    store
        .write(|tx, _| {
            for id in ids {
                let mut row = store::connections::get_by_id_tx(tx, *id)?.unwrap();
                row.conn.state = state;
                row.conn.last_error = error.map(str::to_string);
                store::connections::put(tx, &row)?;
                let row = store::connections::get_by_id_tx(tx, *id)?.unwrap();
                let desired = acutoken::renewal::alert_conditions::desired(&row, &policy, now);
                store::alerts::sync_connection(tx, &row, &desired, now)?;
            }
            Ok(())
        })
        .unwrap();
}

/// Everything logged by any test in this binary.
pub fn logs() -> String {
    String::from_utf8_lossy(&LOG.get_or_init(init_logs).lock().unwrap()).into_owned()
}

static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logs() -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let writer = LogWriter(buf.clone());
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init();
    buf
}

/// Starts capturing logs (call first in every test).
pub fn capture_logs() {
    LOG.get_or_init(init_logs);
}

/// Asserts no secret of these tests appears in `text`.
pub fn assert_clean(what: &str, text: &str, extra: &[&str]) {
    for needle in ["URLSECRET", CLIENT_SECRET, REFRESH_TOKEN, "SIGNSECRET"]
        .iter()
        .chain(extra)
    {
        assert!(
            !text.contains(needle),
            "{what} contains the secret `{needle}`"
        );
    }
}
