//! The service's refusals on a temporary store: each error is the message
//! the user reads, word for word.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::crypto::{Key, Keyring};
use crate::model::State;
use crate::secret::Secret;
use crate::store::Create;

fn service() -> (tempfile::TempDir, Connections) {
    let dir = tempfile::tempdir().unwrap();
    let st = crate::store::testing::open(
        &crate::store::testing::target(dir.path()),
        Keyring::new(Key::generate(), vec![]),
        Create::Yes,
    )
    .unwrap();
    let mut config = Config::default();
    config.acumatica.redirect_uri = Some("https://operator.example/callback".into());
    let svc = Connections::new(st, Arc::new(config));
    (dir, svc)
}

fn spec(name: &str) -> Spec {
    Spec {
        name: name.into(),
        instance: "https://acme.acumatica.com".into(),
        client_id: "88358B02-A48D-A50E-F710-39C1636C30F6@Company".into(),
        labels: BTreeMap::new(),
        mode: None,
        lifetime: None,
        absolute_lifetime: None,
        secret_expires_at: None,
        grant_issued_at: None,
        refresh_token_issued_at: None,
    }
}

#[test]
fn a_spec_names_what_is_wrong() {
    let config = Config::default();
    let now = SystemClock.now();
    let build = |s: Spec, rt: bool| {
        s.build(uuid::Uuid::nil(), &config, now, rt)
            .unwrap_err()
            .to_string()
    };
    let zero = Spec {
        lifetime: Some("0s".into()),
        ..spec("acme")
    };
    assert_eq!(build(zero, false), "lifetime must be longer than zero");
    let future = Spec {
        grant_issued_at: Some("2999-01-01T00:00:00Z".into()),
        ..spec("acme")
    };
    assert_eq!(build(future, true), "grant_issued_at lies in the future");
    let times = Spec {
        refresh_token_issued_at: Some("2020-01-01T00:00:00Z".into()),
        ..spec("acme")
    };
    assert_eq!(
        build(times, false),
        "grant and refresh-token times need a refresh token (--refresh-token-file)"
    );
    let no_host = Spec {
        instance: String::new(),
        ..spec("acme")
    };
    assert_eq!(
        build(no_host, false),
        crate::acumatica::instance::normalize("")
            .unwrap_err()
            .to_string()
    );
}

#[test]
fn a_passed_secret_expiry_is_refused() {
    let now = SystemClock.now();
    assert_eq!(
        secret_expiry(Some("2001-02-03"), now)
            .unwrap_err()
            .to_string(),
        "--secret-expires 2001-02-03T00:00:00Z has already passed: enter the Expires On date of the new secret"
    );
    assert!(secret_expiry(None, now).unwrap().is_none());
}

#[tokio::test]
async fn edits_of_an_unknown_name_say_so() {
    let (_dir, svc) = service();
    let now = SystemClock.now();
    let unknown = "no connection named `ghost` (see `acutoken connection list`)";
    let changes = ChangeArgs::default().check().unwrap();
    let e = svc.set("ghost", changes, now).await.unwrap_err();
    assert_eq!(e.to_string(), unknown);
    let e = svc.enable("ghost", now).await.unwrap_err();
    assert_eq!(e.to_string(), unknown);
    let e = svc.disable("ghost", now).await.unwrap_err();
    assert_eq!(e.to_string(), unknown);
    let e = svc
        .set_secret("ghost", Secret::new("s"), None, false, now)
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), unknown);
    let e = svc.remove("ghost", |_| {}).await.unwrap_err();
    assert_eq!(e.to_string(), unknown);
    let e = svc.remove_unreadable("ghost", now).await.unwrap_err();
    assert_eq!(e.to_string(), unknown);
}

#[tokio::test]
async fn add_disable_enable_remove() {
    let (_dir, svc) = service();
    let now = SystemClock.now();
    let c = svc
        .add(&spec("acme"), Secret::new("s"), None, now)
        .await
        .unwrap();
    assert_eq!(c.state, State::PendingAuthorization);
    let e = svc
        .add(&spec("acme"), Secret::new("s"), None, now)
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "a connection named `acme` already exists");
    let (row, closed) = svc.disable("acme", now).await.unwrap();
    assert_eq!((row.conn.state, closed), (State::Disabled, 0));
    // A disabled connection gets no link until it is enabled.
    let e = svc.authorize("acme", now).await.err().unwrap();
    assert_eq!(
        e.to_string(),
        "`acme` is disabled: run `acutoken connection enable acme` first"
    );
    let row = svc.enable("acme", now).await.unwrap();
    assert_eq!(row.conn.state, State::PendingAuthorization);
    let mut told = false;
    svc.remove("acme", |_| told = true).await.unwrap();
    assert!(!told, "no claim was held, nothing to wait for");
    assert!(matches!(
        svc.find_for_removal("acme").await,
        Err(EditError::Store(
            crate::store::StoreError::UnknownConnection(_)
        ))
    ));
}

#[test]
fn a_redirect_without_code_or_with_an_error_is_named() {
    let err = |u: &str| Redirect::parse(u).err().unwrap().to_string();
    assert_eq!(
        err("not a url"),
        "--redirect-url is not a URL: paste the whole address the browser landed on"
    );
    assert_eq!(
        err("https://x.example/cb?error=access_denied<script>"),
        "the authorization was not granted (access_deniedscript): send the customer a new link"
    );
    assert_eq!(
        err("https://x.example/cb?state=s"),
        "--redirect-url has no code and state: paste the address the browser landed on after the customer approved"
    );
    assert!(Redirect::parse("https://x.example/cb?code=c&state=s").is_ok());
}
