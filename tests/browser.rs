//! The callback pages as a person's browser sees them: headless Chromium loads
//! the real callback listener after a real authorization at the simulator.
//! `.ci/run` installs Chromium; elsewhere the test says it was skipped.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use acutoken::acumatica::TokenClient;
use acutoken::clock::{self, Clock};
use acutoken::config::Config;
use acutoken::crypto::{Key, Keyring};
use acutoken::model::NewConnection;
use acutoken::model::{Connection, Mode, State};
use acutoken::renewal::authorize::create_link;
use acutoken::renewal::client_settings;
use acutoken::renewal::engine::{Engine, EngineParts, NoHooks};
use acutoken::secret::Secret;
use acutoken::sim::Simulator;
use acutoken::store::StoreHandle;
use acutoken::store::claims::Owner;
use acutoken::store::connections::{self, SecretColumn};
use acutoken::store::{Create, Store};

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// The DOM after Chromium loaded `url`.
fn dump_dom(browser: &PathBuf, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--timeout=15000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(url)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callback_pages_render_in_a_browser_and_echo_nothing() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install chromium (.ci/run does)"
        );
        eprintln!("skipped: no chromium on this machine (apt-get install chromium)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("acutoken.db");
    let keyring = Keyring::new(Key::generate(), vec![]);
    let sim = Simulator::start(clock::system()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let redirect = format!("http://127.0.0.1:{port}/settings/acumaticacallback");
    let client_id = "88358B02-A48D-A50E-F710-39C1636C30F6@Acme Corp".to_string();
    sim.add_client("erp", &client_id, "s3cret", None);
    sim.add_redirect_uri("erp", &client_id, &redirect).unwrap();
    let now = clock::SystemClock.now();
    let conn = Connection {
        id: uuid::Uuid::new_v4(),
        name: "acme".into(),
        instance: sim.instance("erp"),
        client_id: client_id.clone(),
        labels: BTreeMap::new(),
        mode: Mode::Absolute,
        lifetime: Duration::from_secs(30 * 86400),
        absolute_lifetime: None,
        secret_expires_at: None,
        grant_issued_at: None,
        refresh_token_issued_at: None,
        access_expires_at: None,
        deadline: None,
        deadline_source: None,
        next_refresh_at: None,
        last_refresh_at: None,
        last_error: None,
        state: State::PendingAuthorization,
    };
    let id = conn.id;
    let mut st = Store::open(&path, keyring.clone(), Create::Yes).unwrap();
    st.write(|tx, kr| {
        connections::insert(
            tx,
            kr,
            &NewConnection {
                conn,
                client_secret: Some(Secret::new("s3cret")),
                refresh_token: None,
            },
            now,
        )
    })
    .unwrap();
    let mut config = Config::default();
    config.acumatica.allow_insecure_loopback = true;
    let store = StoreHandle::from_store(st).unwrap();
    let engine = Arc::new(Engine::new(EngineParts {
        store: store.clone(),
        client: TokenClient::new(client_settings(&config)).unwrap(),
        policy: config.renewal.policy(),
        clock: clock::system(),
        owner: Owner::current("serve"),
        http_timeout: Duration::from_secs(10),
        spill_dir: None,
        limits: acutoken::renewal::limits::Limits::new(16, 2),
        hooks: Arc::new(NoHooks),
    }));
    let router = acutoken::daemon::callback::router(
        engine.clone(),
        acutoken::alerts::Wake::new(),
        "/settings/acumaticacallback",
    );
    tokio::spawn(async move { axum::serve(listener, router).await });

    // The customer follows the link and approves at the (simulated) instance.
    let link = create_link(
        &store,
        &engine.client(),
        Some(&redirect),
        Duration::from_secs(3600),
        "acme",
        now,
    )
    .await
    .unwrap();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = http.get(link.url.expose()).send().await.unwrap();
    assert_eq!(resp.status(), 302);
    let landing = resp.headers()["location"].to_str().unwrap().to_string();
    let landing_url = url::Url::parse(&landing).unwrap();
    let code: String = landing_url
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .into_owned();
    let state: String = landing_url
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();

    let b = browser.clone();
    let dom = tokio::task::spawn_blocking(move || dump_dom(&b, &landing))
        .await
        .unwrap();
    assert!(dom.contains("<h1>Connected</h1>"), "{dom}");
    assert!(
        !dom.contains(&code) && !dom.contains(&state),
        "the page never echoes the code or state"
    );
    assert!(!dom.contains("<script"), "{dom}");
    let row = Store::open(&path, keyring.clone(), Create::No)
        .unwrap()
        .get_by_id(id)
        .unwrap()
        .unwrap();
    assert_eq!(row.conn.state, State::Active, "the grant was stored");
    assert!(
        Store::open(&path, keyring.clone(), Create::No)
            .unwrap()
            .secret(id, SecretColumn::RefreshToken)
            .unwrap()
            .is_some()
    );

    // A tampered state carrying markup: a 4xx page, escaped, nothing stored.
    let evil = format!(
        "http://127.0.0.1:{port}/settings/acumaticacallback?code=%3Cscript%3Ealert(1)%3C/script%3E&state=%3Cimg%20src%3Dx%20onerror%3Dalert(2)%3E"
    );
    let b = browser.clone();
    let dom = tokio::task::spawn_blocking(move || dump_dom(&b, &evil))
        .await
        .unwrap();
    assert!(dom.contains("Not connected"), "{dom}");
    assert!(
        !dom.contains("<script") && !dom.contains("<img"),
        "nothing echoed as markup: {dom}"
    );
    let status = http
        .get(format!(
            "http://127.0.0.1:{port}/settings/acumaticacallback?code=x&state=tampered"
        ))
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_client_error(), "{status}");
}
