//! Configuration loading: the shipped example, the environment layer, unknown
//! keys, every validation rule, secret files and masking, lookup order.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use acutoken::config::{
    ChannelKind, Config, ConfigError, ConfigSource, LoadedConfig, LogFormat, PgTls, StoreTarget,
    check_private_file, locate,
};
use acutoken::model::Mode;
use acutoken::renewal::policy::Policy;

const EXAMPLE: &str = include_str!("../config/acutoken.toml");

fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    path
}

fn load_text(text: &str, vars: Vec<(String, String)>) -> Result<LoadedConfig, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "acutoken.toml", text, 0o600);
    Config::load_with_env(Some(&path), vars)
}

fn load_err(text: &str, vars: Vec<(String, String)>) -> String {
    match load_text(text, vars) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn shipped_example_parses_to_the_defaults() {
    assert_eq!(Config::from_toml_str(EXAMPLE).unwrap(), Config::default());
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "acutoken.toml", EXAMPLE, 0o644);
    let loaded = Config::load_with_env(Some(&path), no_env()).unwrap();
    assert_eq!(loaded.config, Config::default());
    assert_eq!(loaded.source.as_deref(), Some(path.as_path()));
}

/// The shipped example with every commented-out `key = value` line (and the
/// commented `[[alerts.webhooks]]` headers) uncommented, except the keys in
/// `skip` (dotted, e.g. `store.path`): some keys exclude each other.
fn uncommented_example(skip: &[&str]) -> String {
    let mut section = String::new();
    EXAMPLE
        .lines()
        .filter_map(|line| {
            let body = line.strip_prefix("# ").unwrap_or("");
            if body == "[[alerts.webhooks]]" {
                section = "alerts.webhooks".into();
                return Some(body);
            }
            if let Some(name) = line.strip_prefix('[') {
                section = name.trim_matches(|c| c == '[' || c == ']').to_owned();
                return Some(line);
            }
            let key = body
                .split_once(" = ")
                .map(|(k, _)| k)
                .filter(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
            match key {
                Some(k) if skip.contains(&format!("{section}.{k}").as_str()) => None,
                Some(_) => Some(body),
                None => Some(line),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every commented-out example value in the shipped file is a real key with
/// a valid value: uncommenting all of them still loads. `store.path` and
/// `store.url` exclude each other, so the SQLite and the PostgreSQL keys are
/// uncommented in turn.
#[test]
fn shipped_example_commented_values_are_valid_keys() {
    let uncommented = uncommented_example(&["store.url", "store.password_file"]);
    let config = Config::from_toml_str(&uncommented).unwrap();
    assert_ne!(config, Config::default());
    assert_eq!(config.alerts.webhooks.len(), 5);
    let kinds: Vec<_> = config.alerts.webhooks.iter().map(|w| w.kind).collect();
    assert_eq!(
        kinds,
        [
            ChannelKind::Slack,
            ChannelKind::Teams,
            ChannelKind::Discord,
            ChannelKind::GoogleChat,
            ChannelKind::Generic
        ]
    );
    assert_eq!(config.alerts.digest.as_deref(), Some("0 8 * * 1-5"));
    assert_eq!(config.api.listen, Some("127.0.0.1:8788".parse().unwrap()));
    assert!(config.store.key_file.is_some() && config.acumatica.redirect_uri.is_some());
    assert!(config.store.path.is_some() && config.store.url.is_none());

    let postgres = Config::from_toml_str(&uncommented_example(&["store.path"])).unwrap();
    assert!(postgres.store.path.is_none());
    assert!(postgres.store.password_file.is_some());
    let mut no_password = postgres.clone();
    no_password.store.password_file = None;
    let StoreTarget::Postgres(target) = no_password.store_target().unwrap() else {
        panic!("the example's store.url selects PostgreSQL")
    };
    assert_eq!(
        target.display,
        "acutoken@db1.example.com:5432,db2.example.com:5432/acutoken"
    );
    assert_eq!(target.tls, PgTls::Verify { root_cert: None });
}

#[test]
fn environment_overrides_defaults_and_file() {
    let vars = env(&[
        ("ACUTOKEN__STORE__PATH", "/srv/acutoken/store.db"),
        ("ACUTOKEN__RENEWAL__WARN_BEFORE", "7d, 3d"),
        (
            "ACUTOKEN__ACUMATICA__SCOPES",
            "api,offline_access,api:concurrent_access",
        ),
        ("ACUTOKEN__RENEWAL__MAX_CONCURRENT", "8"),
        ("ACUTOKEN__RENEWAL__RENEW_AT", "0.5"),
        ("ACUTOKEN__RENEWAL__MODE", "sliding"),
        ("ACUTOKEN__RENEWAL__LIFETIME", "14d"),
        ("ACUTOKEN__ALERTS__SEND_RESOLVED", "false"),
        ("ACUTOKEN__ALERTS__DIGEST", "0 9 * * 1-5"),
        ("ACUTOKEN__LOG__FORMAT", "json"),
        ("ACUTOKEN__API__SOCKET_GROUP", "1234"),
        // Not config keys: a single underscore after the prefix.
        ("ACUTOKEN_KEY", "c2VjcmV0"),
        ("UNRELATED", "x"),
    ]);
    let file = "[renewal]\nmax_concurrent = 4\nper_instance_concurrent = 3\n";
    let c = load_text(file, vars).unwrap().config;
    assert_eq!(c.store.path, Some(PathBuf::from("/srv/acutoken/store.db")));
    assert_eq!(
        c.renewal.warn_before,
        [
            Duration::from_secs(7 * 86400),
            Duration::from_secs(3 * 86400)
        ]
    );
    assert_eq!(
        c.acumatica.scopes,
        ["api", "offline_access", "api:concurrent_access"]
    );
    assert_eq!(
        c.renewal.max_concurrent, 8,
        "the environment wins over the file"
    );
    assert_eq!(
        c.renewal.per_instance_concurrent, 3,
        "the file wins over the defaults"
    );
    assert_eq!(c.renewal.renew_at, 0.5);
    assert_eq!(c.renewal.mode, Mode::Sliding);
    assert_eq!(c.renewal.lifetime, Duration::from_secs(14 * 86400));
    assert!(!c.alerts.send_resolved);
    assert_eq!(c.alerts.digest.as_deref(), Some("0 9 * * 1-5"));
    assert_eq!(c.log.format, LogFormat::Json);
    assert_eq!(c.api.socket_group.as_deref(), Some("1234"));
}

#[test]
fn single_item_list_from_environment() {
    let vars = env(&[("ACUTOKEN__RENEWAL__WARN_BEFORE", "2d")]);
    let c = load_text("", vars).unwrap().config;
    assert_eq!(c.renewal.warn_before, [Duration::from_secs(2 * 86400)]);
}

#[test]
fn acutoken_config_variable_is_not_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "a.toml", "[log]\nlevel = \"debug\"\n", 0o600);
    let vars = env(&[
        ("ACUTOKEN_CONFIG", path.to_str().unwrap()),
        ("ACUTOKEN_KEY", "x"),
    ]);
    let loaded = Config::load_with_env(None, vars).unwrap();
    assert_eq!(loaded.config.log.level, "debug");
    assert_eq!(loaded.source, Some(path));
}

#[test]
fn unknown_keys_in_file_are_named_with_their_section() {
    let msg = load_err("[renewal]\nfoo = 1\n", no_env());
    assert!(msg.starts_with("unknown key `renewal.foo` in "), "{msg}");
    assert!(msg.contains("acutoken.toml"), "{msg}");

    let msg = load_err("[nonsense]\nx = 1\n", no_env());
    assert!(msg.starts_with("unknown key `nonsense`"), "{msg}");

    let msg = load_err(
        "[[alerts.webhooks]]\nname = \"a\"\nkind = \"slack\"\nurl = \"https://h.example/x\"\ncolour = \"red\"\n",
        no_env(),
    );
    assert!(
        msg.starts_with("unknown key `alerts.webhooks[0].colour`"),
        "{msg}"
    );

    let err = Config::from_toml_str("[log]\nlevl = \"info\"\n").unwrap_err();
    assert!(
        matches!(&err, ConfigError::UnknownKey { key, .. } if key == "log.levl"),
        "{err}"
    );
}

#[test]
fn unknown_keys_in_environment_are_named_with_the_variable() {
    let msg = load_err("", env(&[("ACUTOKEN__RENEWAL__FOO", "1")]));
    assert_eq!(
        msg,
        "unknown key `renewal.foo` from environment variable ACUTOKEN__RENEWAL__FOO"
    );
    let msg = load_err("", env(&[("ACUTOKEN__STORAGE__PATH", "/x")]));
    assert_eq!(
        msg,
        "unknown key `storage` from environment variable ACUTOKEN__STORAGE__PATH"
    );
}

#[test]
fn type_errors_name_the_key_and_the_problem() {
    let msg = load_err("[renewal]\nmax_concurrent = \"many\"\n", no_env());
    assert!(msg.starts_with("`renewal.max_concurrent`: "), "{msg}");
    assert!(
        msg.contains("many"),
        "a non-secret value may be shown: {msg}"
    );

    let msg = load_err("[renewal]\nlifetime = \"30x\"\n", no_env());
    assert!(msg.starts_with("`renewal.lifetime`: "), "{msg}");

    let msg = load_err("", env(&[("ACUTOKEN__ALERTS__GROUP_MAX", "lots")]));
    assert!(msg.starts_with("`alerts.group_max`: "), "{msg}");
    assert!(msg.contains("ACUTOKEN__ALERTS__GROUP_MAX"), "{msg}");

    let msg = load_err("[renewal]\nmode = \"weekly\"\n", no_env());
    assert!(
        msg.starts_with("`renewal.mode`: `weekly` is not one of absolute, sliding"),
        "{msg}"
    );
    let msg = load_err("", env(&[("ACUTOKEN__LOG__FORMAT", "xml")]));
    assert!(
        msg.starts_with("`log.format`: `xml` is not one of text, json, journald"),
        "{msg}"
    );
    let msg = load_err("", env(&[("ACUTOKEN__", "1")]));
    assert!(msg.contains("ACUTOKEN__ names no config key"), "{msg}");

    let msg = load_err(
        "[[alerts.webhooks]]\nkind = \"slack\"\nurl = \"https://h.example/x\"\n",
        no_env(),
    );
    assert!(
        msg.starts_with("`alerts.webhooks[0].name`: is required"),
        "{msg}"
    );
}

#[test]
fn errors_never_echo_a_secret_value() {
    let secret = "T0SECRET9hooks";
    let bad_type = format!(
        "[[alerts.webhooks]]\nname = \"a\"\nkind = \"generic\"\nurl = [\"https://h.example/{secret}\"]\n"
    );
    let msg = load_err(&bad_type, no_env());
    assert!(msg.starts_with("`alerts.webhooks[0].url`: "), "{msg}");
    assert!(!msg.contains(secret), "{msg}");

    let bad_secret = format!(
        "[[alerts.webhooks]]\nname = \"a\"\nkind = \"generic\"\nurl = \"https://h.example/x\"\nsecret = {{ v = \"{secret}\" }}\n"
    );
    let msg = load_err(&bad_secret, no_env());
    assert!(msg.starts_with("`alerts.webhooks[0].secret`: "), "{msg}");
    assert!(!msg.contains(secret), "{msg}");

    // A syntax error on the line holding the secret: the line is not quoted.
    let unterminated = format!(
        "[[alerts.webhooks]]\nname = \"a\"\nkind = \"slack\"\nurl = \"https://h.example/{secret}\n"
    );
    let err = load_text(&unterminated, no_env()).unwrap_err();
    assert!(matches!(err, ConfigError::Syntax { line: 4, .. }), "{err}");
    assert!(!err.to_string().contains(secret), "{err}");

    let plain_http = format!(
        "[[alerts.webhooks]]\nname = \"a\"\nkind = \"slack\"\nurl = \"http://h.example/{secret}\"\n"
    );
    let msg = load_err(&plain_http, no_env());
    assert!(
        msg.starts_with("`alerts.webhooks[0].url`: must use https"),
        "{msg}"
    );
    assert!(!msg.contains(secret), "{msg}");
}

/// One broken rule per case: the message names the key.
#[test]
fn each_validation_rule_names_its_key() {
    let hook =
        |extra: &str| format!("[[alerts.webhooks]]\nname = \"ops\"\nkind = \"slack\"\n{extra}\n");
    let cases: Vec<(String, &str)> = vec![
        ("[renewal]\nrenew_at = 1.0".into(), "renewal.renew_at"),
        ("[renewal]\nrenew_at = 0".into(), "renewal.renew_at"),
        (
            "[renewal]\nretry_min = \"2h\"\nretry_max = \"1h\"".into(),
            "renewal.retry_max",
        ),
        ("[renewal]\nretry_min = \"0s\"".into(), "renewal.retry_min"),
        ("[alerts]\nretry_min = \"11m\"".into(), "alerts.retry_max"),
        ("[alerts]\nretry_min = \"0s\"".into(), "alerts.retry_min"),
        (
            "[renewal]\nmax_concurrent = 0".into(),
            "renewal.max_concurrent",
        ),
        (
            "[renewal]\nper_instance_concurrent = 0".into(),
            "renewal.per_instance_concurrent",
        ),
        (
            "[renewal]\nhttp_timeout = \"0s\"".into(),
            "renewal.http_timeout",
        ),
        (
            "[serve]\nshutdown_timeout = \"30s\"".into(),
            "serve.shutdown_timeout",
        ),
        ("[renewal]\nlifetime = \"0s\"".into(), "renewal.lifetime"),
        (
            "[renewal]\nabsolute_lifetime = \"29d\"".into(),
            "renewal.absolute_lifetime",
        ),
        ("[renewal]\nwarn_before = []".into(), "renewal.warn_before"),
        (
            "[renewal]\nwarn_before = [\"1d\", \"0s\"]".into(),
            "renewal.warn_before",
        ),
        ("[alerts]\ngroup_max = 0".into(), "alerts.group_max"),
        (
            "[alerts]\nrepeat_interval = \"0s\"".into(),
            "alerts.repeat_interval",
        ),
        ("[alerts]\ndigest = \"0 8 * *\"".into(), "alerts.digest"),
        ("[alerts]\ndigest = \"0 25 * * *\"".into(), "alerts.digest"),
        ("[alerts]\ndigest = \"@daily\"".into(), "alerts.digest"),
        (
            "[alerts]\ndigest_timezone = \"Mars/Olympus\"".into(),
            "alerts.digest_timezone",
        ),
        (
            hook("name = \"\"").replace("name = \"ops\"\n", ""),
            "alerts.webhooks[0].name",
        ),
        (
            format!(
                "{}{}",
                hook("url = \"https://a.example/1\""),
                hook("url = \"https://a.example/2\"")
            ),
            "alerts.webhooks[1].name",
        ),
        (hook(""), "alerts.webhooks[0].url"),
        (
            hook("url = \"https://a.example/1\"\nurl_file = \"/x\""),
            "alerts.webhooks[0].url",
        ),
        (
            hook("url = \"ftp://a.example/1\""),
            "alerts.webhooks[0].url",
        ),
        (hook("url = \"not a url\""), "alerts.webhooks[0].url"),
        (
            hook("url = \"https://a.example/1\"\nsecret = \"s\""),
            "alerts.webhooks[0].secret",
        ),
        (
            hook("url = \"https://a.example/1\"\nsecret = \"s\"\nsecret_file = \"/x\"")
                .replace("slack", "generic"),
            "alerts.webhooks[0].secret",
        ),
        (
            "[acumatica]\nredirect_uri = \"/settings/cb\"".into(),
            "acumatica.redirect_uri",
        ),
        (
            "[acumatica]\nredirect_uri = \"http://acutoken.example.com/cb\"".into(),
            "acumatica.redirect_uri",
        ),
        ("[callback]\npath = \"settings/cb\"".into(), "callback.path"),
        (
            "[callback]\nstate_ttl = \"0s\"".into(),
            "callback.state_ttl",
        ),
        (
            "[api]\nlisten = \"127.0.0.1:8788\"".into(),
            "api.token_file",
        ),
        (
            "[api]\nlisten = \"0.0.0.0:8788\"\ntoken_file = \"/t\"".into(),
            "api.tls_cert_file",
        ),
        ("[api]\ntls_cert_file = \"/c\"".into(), "api.tls_key_file"),
        ("[log]\nlevel = \"verbose\"".into(), "log.level"),
        (
            "[store]\nurl = \"mysql://a@db.example.com/d\"".into(),
            "store.url",
        ),
        (
            "[store]\nurl = \"postgres://a:pw@db.example.com/d\"".into(),
            "store.url",
        ),
        (
            "[store]\nurl = \"postgres://a@db.example.com/d?sslmode=prefer\"".into(),
            "store.url",
        ),
        (
            "[store]\nurl = \"postgres://a@db.example.com/d?sslmode=disable\"".into(),
            "store.url",
        ),
        (
            "[store]\nurl = \"postgres://a@localhost/d\"\npath = \"/srv/a.db\"".into(),
            "store.path",
        ),
        (
            "[store]\npassword_file = \"/etc/acutoken/pgpass\"".into(),
            "store.password_file",
        ),
        ("[store]\nlease = \"2s\"".into(), "store.lease"),
        ("[store]\nlease = \"11m\"".into(), "store.lease"),
        ("[serve]\nreplica_name = \"\"".into(), "serve.replica_name"),
        (
            "[serve]\nreplica_name = \"a b\"".into(),
            "serve.replica_name",
        ),
        (
            format!("[serve]\nreplica_name = \"{}\"", "r".repeat(64)),
            "serve.replica_name",
        ),
    ];
    for (text, key) in cases {
        let err = Config::from_toml_str(&text).expect_err(&text);
        let msg = err.to_string();
        assert!(
            matches!(err, ConfigError::Invalid { .. }),
            "{text}\n=> {msg}"
        );
        assert!(msg.starts_with(&format!("`{key}`: ")), "{text}\n=> {msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }
}

#[test]
fn valid_edges_are_accepted() {
    let ok = [
        "[alerts]\ndigest = \"30 0 8 * * 1-5\"\ndigest_timezone = \"Europe/Berlin\"",
        "[alerts]\ndigest = \"0 8 * * MON-FRI\"",
        "[renewal]\nwarn_before = [\"1d\"]\nabsolute_lifetime = \"30d\"",
        "[renewal]\nprobe_interval = \"0s\"\nretry_min = \"5m\"\nretry_max = \"5m\"",
        "[acumatica]\nredirect_uri = \"http://localhost:8787/cb\"",
        "[acumatica]\nredirect_uri = \"http://127.0.0.1:8787/cb\"",
        "[api]\nlisten = \"127.0.0.1:8788\"\ntoken_file = \"/t\"",
        "[api]\nlisten = \"[::1]:8788\"\ntoken_file = \"/t\"",
        "[api]\nlisten = \"0.0.0.0:8788\"\ntoken_file = \"/t\"\ntls_cert_file = \"/c\"\ntls_key_file = \"/k\"",
        "[[alerts.webhooks]]\nname = \"sink\"\nkind = \"generic\"\nurl = \"http://127.0.0.1:9/x\"\nsecret = \"s\"",
        "[[alerts.webhooks]]\nname = \"sink\"\nkind = \"slack\"\nurl = \"http://localhost:9/x\"\nmin_severity = \"critical\"",
        "[store]\nurl = \"postgres://acutoken@a.example:5432,b.example:5432/acutoken?target_session_attrs=read-write\"",
        "[store]\nurl = \"postgresql://acutoken@localhost/acutoken\"\npassword_file = \"/p\"",
        "[store]\nurl = \"postgres://acutoken@/acutoken?host=/run/postgresql&sslmode=disable\"",
        "[store]\nlease = \"3s\"\n[serve]\nreplica_name = \"acutoken-1.eu_west\"",
        "[store]\nlease = \"10m\"",
    ];
    for text in ok {
        Config::from_toml_str(text).unwrap_or_else(|e| panic!("{text}\n=> {e}"));
    }
    let c = Config::from_toml_str(ok[0]).unwrap();
    assert_eq!(
        c.digest_schedule().as_ref().map(|s| s.as_str()),
        Some("30 0 8 * * 1-5")
    );
    let c = Config::from_toml_str(ok[1]).unwrap();
    assert_eq!(
        c.digest_schedule().as_ref().map(|s| s.as_str()),
        Some("0 0 8 * * 1-5")
    );
}

#[test]
fn private_file_check() {
    let dir = tempfile::tempdir().unwrap();
    let private = write(dir.path(), "key", "k\n", 0o600);
    check_private_file(&private, "store.key_file").unwrap();
    let owner_only = write(dir.path(), "key2", "k\n", 0o400);
    check_private_file(&owner_only, "store.key_file").unwrap();

    for mode in [0o640, 0o604, 0o620, 0o644] {
        let open = write(dir.path(), &format!("open{mode:o}"), "k\n", mode);
        let err = check_private_file(&open, "api.token_file").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Permissions { .. }), "{msg}");
        assert!(msg.contains("`api.token_file`"), "{msg}");
        assert!(
            msg.contains(&format!("chmod 600 {}", open.display())),
            "{msg}"
        );
    }

    let err = check_private_file(&dir.path().join("absent"), "store.key_file").unwrap_err();
    assert!(matches!(err, ConfigError::File { .. }), "{err}");
}

#[test]
fn load_checks_every_secret_file() {
    let dir = tempfile::tempdir().unwrap();
    let open = write(dir.path(), "open", "x\n", 0o644);
    let open = open.display();
    for (section, key) in [
        ("[store]", "key_file = \"{p}\""),
        ("[store]", "previous_key_files = [\"{p}\"]"),
        ("[api]", "token_file = \"{p}\""),
        ("[api]", "tls_cert_file = \"/c\"\ntls_key_file = \"{p}\""),
    ] {
        let text = format!("{section}\n{}\n", key.replace("{p}", &open.to_string()));
        let msg = load_err(&text, no_env());
        assert!(msg.contains("chmod 600"), "{text}\n=> {msg}");
    }
}

#[test]
fn webhook_secret_files_are_resolved() {
    let dir = tempfile::tempdir().unwrap();
    let url = write(
        dir.path(),
        "slack.url",
        "https://hooks.example.com/services/T0/B0/xyz\n",
        0o600,
    );
    let secret = write(dir.path(), "sign.secret", "s3cret\r\n", 0o600);
    let text = format!(
        "[[alerts.webhooks]]\nname = \"ops\"\nkind = \"slack\"\nurl_file = \"{}\"\n\
         [[alerts.webhooks]]\nname = \"pager\"\nkind = \"generic\"\nurl = \"https://p.example/x\"\nsecret_file = \"{}\"\n",
        url.display(),
        secret.display()
    );
    let c = load_text(&text, no_env()).unwrap().config;
    let [ops, pager] = &c.alerts.webhooks[..] else {
        panic!("two webhooks")
    };
    assert_eq!(
        ops.url.as_ref().map(|u| u.expose()),
        Some("https://hooks.example.com/services/T0/B0/xyz")
    );
    assert_eq!(ops.url_file, None);
    assert_eq!(pager.secret.as_ref().map(|s| s.expose()), Some("s3cret"));
    assert_eq!(pager.secret_file, None);
    c.validate().unwrap();

    // The URL in a file obeys the same rules, and the error does not show it.
    let bad = write(
        dir.path(),
        "bad.url",
        "http://hooks.example.com/T0SECRET\n",
        0o600,
    );
    let text = format!(
        "[[alerts.webhooks]]\nname = \"ops\"\nkind = \"slack\"\nurl_file = \"{}\"\n",
        bad.display()
    );
    let msg = load_err(&text, no_env());
    assert!(
        msg.starts_with("`alerts.webhooks[0].url_file`: must use https"),
        "{msg}"
    );
    assert!(!msg.contains("T0SECRET"), "{msg}");

    let open = write(
        dir.path(),
        "open.url",
        "https://hooks.example.com/x\n",
        0o644,
    );
    let text = format!(
        "[[alerts.webhooks]]\nname = \"ops\"\nkind = \"slack\"\nurl_file = \"{}\"\n",
        open.display()
    );
    assert!(load_err(&text, no_env()).contains("chmod 600"));

    let empty = write(dir.path(), "empty.url", "\n", 0o600);
    let text = format!(
        "[[alerts.webhooks]]\nname = \"ops\"\nkind = \"slack\"\nurl_file = \"{}\"\n",
        empty.display()
    );
    assert!(load_err(&text, no_env()).contains("empty"));
}

#[test]
fn masked_output_contains_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let url = write(
        dir.path(),
        "u",
        "https://hooks.example.com/FILESECRET\n",
        0o600,
    );
    let text = format!(
        "[store]\npath = \"/srv/a.db\"\n\
         [acumatica]\nredirect_uri = \"https://acutoken.example.com/cb/acumatica\"\n\
         [[alerts.webhooks]]\nname = \"ops\"\nkind = \"slack\"\nurl_file = \"{}\"\n\
         [[alerts.webhooks]]\nname = \"pager\"\nkind = \"generic\"\nurl = \"https://p.example/INLINESECRET\"\nsecret = \"SIGNSECRET\"\n",
        url.display()
    );
    let c = load_text(&text, no_env()).unwrap().config;
    let shown = c.masked_toml();
    for secret in [
        "FILESECRET",
        "INLINESECRET",
        "SIGNSECRET",
        "hooks.example.com",
        "p.example",
    ] {
        assert!(!shown.contains(secret), "{secret} shown in:\n{shown}");
    }
    assert_eq!(shown.matches("\"***\"").count(), 3, "{shown}");
    // The effective values are shown, path defaults filled in.
    let back: toml::Table = toml::from_str(&shown).unwrap();
    assert_eq!(back["store"]["path"].as_str(), Some("/srv/a.db"));
    assert_eq!(
        back["api"]["socket"].as_str(),
        Some(c.socket_path().to_str().unwrap())
    );
    assert_eq!(back["callback"]["path"].as_str(), Some("/cb/acumatica"));
    assert_eq!(back["renewal"]["lifetime"].as_str(), Some("30d"));
    assert_eq!(
        back["alerts"]["webhooks"][1]["name"].as_str(),
        Some("pager")
    );
}

#[test]
fn derived_paths() {
    let c = Config::from_toml_str(
        "[store]\npath = \"/srv/acutoken/a.db\"\n[api]\nsocket = \"/run/x.sock\"\n",
    )
    .unwrap();
    assert_eq!(c.store_path(), PathBuf::from("/srv/acutoken/a.db"));
    assert_eq!(c.socket_path(), PathBuf::from("/run/x.sock"));

    let c = Config::from_toml_str("[acumatica]\nredirect_uri = \"https://a.example/oauth/cb\"\n")
        .unwrap();
    assert_eq!(c.callback_path(), "/oauth/cb");
    let c = Config::from_toml_str(
        "[acumatica]\nredirect_uri = \"https://a.example/oauth/cb\"\n[callback]\npath = \"/mine\"\n",
    )
    .unwrap();
    assert_eq!(c.callback_path(), "/mine");
    assert_eq!(
        Config::default().callback_path(),
        "/settings/acumaticacallback"
    );
}

#[test]
fn lookup_order() {
    let dir = tempfile::tempdir().unwrap();
    let flag = write(dir.path(), "flag.toml", "[log]\nlevel = \"error\"\n", 0o600);
    let named = write(dir.path(), "named.toml", "[log]\nlevel = \"warn\"\n", 0o600);
    let confdir = dir.path().join("conf");
    fs::create_dir(&confdir).unwrap();
    let in_dir = write(
        &confdir,
        "acutoken.toml",
        "[log]\nlevel = \"debug\"\n",
        0o600,
    );
    let confdirs = format!("{}:/nonexistent", confdir.display());

    let all = env(&[
        ("ACUTOKEN_CONFIG", named.to_str().unwrap()),
        ("CONFIGURATION_DIRECTORY", &confdirs),
    ]);
    let loaded = Config::load_with_env(Some(&flag), all.clone()).unwrap();
    assert_eq!(
        (loaded.source, loaded.config.log.level.as_str()),
        (Some(flag.clone()), "error")
    );

    let loaded = Config::load_with_env(None, all).unwrap();
    assert_eq!(
        (loaded.source, loaded.config.log.level.as_str()),
        (Some(named.clone()), "warn")
    );

    let loaded =
        Config::load_with_env(None, env(&[("CONFIGURATION_DIRECTORY", &confdirs)])).unwrap();
    assert_eq!(
        (loaded.source, loaded.config.log.level.as_str()),
        (Some(in_dir), "debug")
    );

    // An empty configuration directory is skipped, never an error.
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let loaded = Config::load_with_env(
        None,
        env(&[("CONFIGURATION_DIRECTORY", empty.to_str().unwrap())]),
    )
    .unwrap();
    assert_ne!(loaded.source, Some(empty.join("acutoken.toml")));

    // A file the operator named must exist.
    let absent = dir.path().join("absent.toml");
    let err = Config::load_with_env(Some(&absent), no_env()).unwrap_err();
    assert!(
        matches!(err, ConfigError::Missing { by: "--config", .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains(&absent.display().to_string()),
        "{err}"
    );
    let err = Config::load_with_env(None, env(&[("ACUTOKEN_CONFIG", absent.to_str().unwrap())]))
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::Missing {
                by: "ACUTOKEN_CONFIG",
                ..
            }
        ),
        "{err}"
    );

    assert_eq!(
        locate(Some(&absent)),
        ConfigSource::Named {
            path: absent.clone(),
            by: "--config"
        }
    );
}

/// The renewal policy is the `[renewal]` section's: every policy key set in
/// the file reaches it, and unset keys take the policy's own defaults (each
/// written once, in `renewal::policy`), which are also the config's.
#[test]
fn renewal_section_builds_the_policy() {
    let text = "[renewal]\nrenew_at = 0.5\nprobe_interval = \"12h\"\njitter = \"1h\"\n\
                retry_min = \"30s\"\nretry_max = \"20m\"\naccess_token_margin = \"2m\"\n\
                warn_before = [\"5d\", \"1d\"]\nsecret_warn_before = \"10d\"\n";
    let policy = Config::from_toml_str(text).unwrap().renewal.policy();
    assert_eq!(
        policy,
        Policy {
            renew_at: 0.5,
            probe_interval: Duration::from_secs(12 * 3600),
            jitter: Duration::from_secs(3600),
            retry_min: Duration::from_secs(30),
            retry_max: Duration::from_secs(20 * 60),
            access_token_margin: Duration::from_secs(120),
            warn_before: vec![Duration::from_secs(5 * 86400), Duration::from_secs(86400)],
            secret_warn_before: Duration::from_secs(10 * 86400),
        }
    );

    let defaults = Config::from_toml_str("").unwrap().renewal;
    assert_eq!(defaults.policy(), Policy::default());
    assert_eq!(defaults.retry_max, Policy::default().retry_max);
    let only_jitter = Config::from_toml_str("[renewal]\njitter = \"2h\"\n").unwrap();
    assert_eq!(
        only_jitter.renewal.policy(),
        Policy {
            jitter: Duration::from_secs(7200),
            ..Policy::default()
        }
    );
}

/// `store.url` and `store.password_file` come from the environment like every
/// other key; a multi-host URL keeps its commas (only list keys are split),
/// and a `store.path` set there counts as set.
#[test]
fn store_keys_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let pgpass = write(dir.path(), "pgpass", "s3cret-pg\n", 0o600);
    let url = "postgres://acutoken@a.example:5432,b.example:5433/acutoken?target_session_attrs=read-write&sslmode=verify-full";
    let vars = env(&[
        ("ACUTOKEN__STORE__URL", url),
        ("ACUTOKEN__STORE__PASSWORD_FILE", pgpass.to_str().unwrap()),
    ]);
    let c = load_text("", vars).unwrap().config;
    assert_eq!(c.store.url.as_deref(), Some(url));
    assert_eq!(c.store.password_file.as_deref(), Some(pgpass.as_path()));
    let StoreTarget::Postgres(t) = c.store_target().unwrap() else {
        panic!("postgres")
    };
    assert_eq!(
        t.url,
        "postgres://acutoken@a.example:5432,b.example:5433/acutoken?target_session_attrs=read-write&sslmode=require"
    );
    assert_eq!(t.display, "acutoken@a.example:5432,b.example:5433/acutoken");
    assert_eq!(t.password.as_ref().map(|p| p.expose()), Some("s3cret-pg"));
    assert!(!format!("{t:?}").contains("s3cret-pg"));

    // The default path does not count as set; one from the environment does.
    let file = format!("[store]\nurl = \"{url}\"\n");
    assert!(load_text(&file, no_env()).is_ok());
    let msg = load_err(&file, env(&[("ACUTOKEN__STORE__PATH", "/srv/a.db")]));
    assert!(
        msg.starts_with("`store.path`: is set together with store.url"),
        "{msg}"
    );
    assert_eq!(
        Config::from_toml_str("").unwrap().store_target().unwrap(),
        StoreTarget::File(Config::default().store_path())
    );
}

/// A password written into `store.url` is refused, and neither the error nor
/// anything else shows it, from the file or from the environment.
#[test]
fn store_url_password_is_refused_and_never_shown() {
    let secret = "Pg0SECRETpw";
    for url in [
        format!("postgres://acutoken:{secret}@db.example.com/acutoken"),
        format!("postgres://acutoken@db.example.com/acutoken?password={secret}"),
        format!("postgres://acutoken:{secret}@db.example.com/acutoken?sslmode=prefer"),
    ] {
        let want = "`store.url`: holds a password: put it in store.password_file or the systemd credential acutoken.pgpass";
        let msg = load_err(&format!("[store]\nurl = \"{url}\"\n"), no_env());
        assert_eq!(msg, want);
        let msg = load_err("", env(&[("ACUTOKEN__STORE__URL", &url)]));
        assert_eq!(msg, want);
    }
    // A value of the wrong type is not quoted either.
    let msg = load_err(
        &format!("[store]\nurl = [\"postgres://a:{secret}@h/d\"]\n"),
        no_env(),
    );
    assert!(msg.starts_with("`store.url`: "), "{msg}");
    assert!(!msg.contains(secret), "{msg}");
}

#[test]
fn store_files_are_checked_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let url = "postgres://acutoken@localhost/acutoken";
    let with = |extra: String| format!("[store]\nurl = \"{url}{extra}\n");

    let open = write(dir.path(), "open", "pw\n", 0o644);
    let msg = load_err(
        &with(format!("\"\npassword_file = \"{}\"", open.display())),
        no_env(),
    );
    assert!(
        msg.starts_with("`store.password_file`: ") && msg.contains("chmod 600"),
        "{msg}"
    );
    let empty = write(dir.path(), "empty", "\n", 0o600);
    let msg = load_err(
        &with(format!("\"\npassword_file = \"{}\"", empty.display())),
        no_env(),
    );
    assert!(
        msg.starts_with("`store.password_file`: ") && msg.contains("empty"),
        "{msg}"
    );
    let absent = dir.path().join("absent");
    let msg = load_err(
        &with(format!("\"\npassword_file = \"{}\"", absent.display())),
        no_env(),
    );
    assert!(
        msg.starts_with("`store.password_file`: cannot read"),
        "{msg}"
    );

    let ca = write(dir.path(), "ca.pem", "-----BEGIN CERTIFICATE-----\n", 0o644);
    let c = load_text(&with(format!("?sslrootcert={}\"", ca.display())), no_env())
        .unwrap()
        .config;
    let StoreTarget::Postgres(t) = c.store_target().unwrap() else {
        panic!("postgres")
    };
    assert_eq!(
        t.tls,
        PgTls::Verify {
            root_cert: Some(ca)
        }
    );
    for bad in [absent.clone(), dir.path().to_path_buf()] {
        let msg = load_err(&with(format!("?sslrootcert={}\"", bad.display())), no_env());
        assert!(
            msg.starts_with(&format!(
                "`store.url`: sslrootcert {} cannot be read",
                bad.display()
            )),
            "{msg}"
        );
    }
}

/// `acutoken config check`, the real binary in a temp dir with no
/// `ACUTOKEN*` or systemd variables from the test runner.
fn config_check(dir: &Path, text: &str, extra: &[(&str, &str)]) -> (i32, String, String) {
    let config = write(dir, "check.toml", text, 0o600);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_acutoken"));
    cmd.args(["-c", config.to_str().unwrap(), "config", "check"])
        .current_dir(dir)
        .stdin(std::process::Stdio::null());
    for (name, _) in std::env::vars_os() {
        let upper = name.to_string_lossy().to_ascii_uppercase();
        if upper.starts_with("ACUTOKEN")
            || upper == "CREDENTIALS_DIRECTORY"
            || upper == "STATE_DIRECTORY"
            || upper == "RUNTIME_DIRECTORY"
            || upper == "CONFIGURATION_DIRECTORY"
        {
            cmd.env_remove(&name);
        }
    }
    cmd.envs(extra.iter().copied());
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Each `[store]` mistake: `config check` exits non-zero with one `error:`
/// line naming the key, prints no config, and never the password.
#[test]
fn config_check_reports_each_store_error_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "Pg0SECRETpw";
    let open = write(dir.path(), "open.pgpass", "pw\n", 0o644);
    let cases = [
        (
            "[store]\nurl = \"mysql://acutoken@db.example.com/acutoken\"\n".to_owned(),
            "store.url",
            "postgres://",
        ),
        (
            format!("[store]\nurl = \"postgres://acutoken:{secret}@db.example.com/acutoken\"\n"),
            "store.url",
            "holds a password",
        ),
        (
            "[store]\nurl = \"postgres://acutoken@db.example.com/acutoken?sslmode=disable\"\n"
                .to_owned(),
            "store.url",
            "in clear to db.example.com; use sslmode=verify-full",
        ),
        (
            "[store]\nurl = \"postgres://acutoken@db.example.com/acutoken?sslmode=prefer\"\n"
                .to_owned(),
            "store.url",
            "verify-full",
        ),
        (
            "[store]\nurl = \"postgres://acutoken@db.example.com/acutoken?sslrootcert=/nonexistent/ca.pem\"\n"
                .to_owned(),
            "store.url",
            "sslrootcert /nonexistent/ca.pem cannot be read",
        ),
        (
            "[store]\npath = \"/srv/a.db\"\nurl = \"postgres://acutoken@localhost/acutoken\"\n"
                .to_owned(),
            "store.path",
            "remove store.path",
        ),
        (
            "[store]\npassword_file = \"/etc/acutoken/pgpass\"\n".to_owned(),
            "store.password_file",
            "set store.url",
        ),
        (
            format!(
                "[store]\nurl = \"postgres://acutoken@localhost/acutoken\"\npassword_file = \"{}\"\n",
                open.display()
            ),
            "store.password_file",
            "chmod 600",
        ),
    ];
    for (text, key, why) in cases {
        let (code, stdout, stderr) = config_check(dir.path(), &text, &[]);
        assert_ne!(code, 0, "{text}");
        assert_eq!(stdout, "", "{text}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{text}\n=> {stderr}");
        assert!(
            lines[0].starts_with(&format!("error: `{key}`: ")),
            "{text}\n=> {stderr}"
        );
        assert!(lines[0].contains(why), "{text}\n=> {stderr}");
        assert!(!stderr.contains(secret), "{stderr}");
    }
    // From the environment too.
    let (code, stdout, stderr) = config_check(
        dir.path(),
        "",
        &[(
            "ACUTOKEN__STORE__URL",
            &format!("postgres://acutoken@db.example.com/acutoken?password={secret}"),
        )],
    );
    assert_ne!(code, 0);
    assert!(
        stderr.starts_with("error: `store.url`: holds a password") && stderr.lines().count() == 1,
        "{stderr}"
    );
    assert!(!format!("{stdout}{stderr}").contains(secret));
}

/// A valid PostgreSQL config: `config check` shows `store.url` (it cannot hold
/// a password) and the password file's path, never its content, and no
/// `store.path` (which would conflict).
#[test]
fn config_check_shows_store_url_but_never_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "Pg0SECRETpw";
    let pgpass = write(dir.path(), "pgpass", &format!("{secret}\n"), 0o600);
    let url = "postgres://acutoken@a.example:5432,b.example:5432/acutoken?target_session_attrs=read-write";
    let text = format!(
        "[store]\nurl = \"{url}\"\npassword_file = \"{}\"\n",
        pgpass.display()
    );
    let (code, stdout, stderr) = config_check(dir.path(), &text, &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(!format!("{stdout}{stderr}").contains(secret));
    let shown: toml::Table = stdout.parse().unwrap();
    assert_eq!(shown["store"]["url"].as_str(), Some(url));
    assert_eq!(
        shown["store"]["password_file"].as_str(),
        Some(pgpass.to_str().unwrap())
    );
    assert!(shown["store"].get("path").is_none(), "{stdout}");
}
