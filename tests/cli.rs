//! Process tests of the `acutoken` CLI: the real binary, in a temp dir per test,
//! checked against DESIGN §2, §4 and §5.

mod support_cli;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use acutoken::crypto::{Key, KeySource};
use acutoken::model::State;
use acutoken::store::{SecretColumn, connections};
use base64::Engine as _;
use chrono::Utc;
use serde_json::{Value, json};
use support_cli::{
    Input, World, assert_connection_shape, assert_rfc3339_utc, duration_of, key_from, mode_of,
};

const CLIENT_ID: &str = "88358B02-A48D-A50E-F710-39C1636C30F6@My Tenant Name";

fn rfc3339(t: chrono::DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A world with one connection `acme` (pending authorization) already added.
fn world_with_acme() -> World {
    let w = World::new();
    w.add("acme", "acme.acumatica.com", CLIENT_ID, &[], "CS-acme\n")
        .ok();
    w
}

#[test]
fn add_from_stdin_then_list_and_show_print_design_fields() {
    let w = World::new();
    let out = w.add(
        "acme-prod",
        "https://acme.acumatica.com/Main?ScreenId=00000000",
        CLIENT_ID,
        &[
            "--label",
            "customer=Acme Corp",
            "--label",
            "contact=ops@acme.example",
            "--secret-expires",
            "2030-06-01",
        ],
        "CS-SENTINEL-stdin-1\n",
    );
    out.ok();
    assert!(
        out.stdout.contains(
            "added connection acme-prod (instance acme.acumatica.com, state pending_authorization)"
        ),
        "{out:#?}"
    );
    assert!(!out.all().contains("CS-SENTINEL"), "{out:#?}");

    let table = w.run(&["connection", "list"], Input::Null);
    table.ok();
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{table:#?}");
    for col in ["NAME", "STATE", "INSTANCE", "DEADLINE"] {
        assert!(lines[0].contains(col), "{table:#?}");
    }
    assert!(lines[1].starts_with("acme-prod "), "{table:#?}");
    assert!(lines[1].contains("pending_authorization"), "{table:#?}");
    assert!(lines[1].contains("acme.acumatica.com"), "{table:#?}");

    let list = w.list();
    assert_eq!(list.len(), 1);
    let c = &list[0];
    assert_connection_shape(c);
    assert_eq!(c["name"], "acme-prod");
    assert_eq!(c["instance"], "acme.acumatica.com");
    assert_eq!(c["client_id"], CLIENT_ID);
    assert_eq!(
        c["labels"],
        json!({"customer": "Acme Corp", "contact": "ops@acme.example"})
    );
    assert_eq!(c["mode"], "absolute");
    assert_eq!(duration_of(&c["lifetime"]), Duration::from_secs(30 * 86400));
    assert_eq!(c["absolute_lifetime"], Value::Null);
    assert_eq!(c["secret_expires_at"], "2030-06-01T00:00:00Z");
    assert_eq!(c["state"], "pending_authorization");
    for f in [
        "grant_issued_at",
        "refresh_token_issued_at",
        "access_expires_at",
        "deadline",
        "deadline_source",
        "next_refresh_at",
        "last_refresh_at",
        "last_error",
    ] {
        assert_eq!(c[f], Value::Null, "{f} should be null: {c}");
    }

    let shown = w.show("acme-prod");
    assert_eq!(&shown, c, "show --json and list --json disagree");

    let human = w.run(&["connection", "show", "acme-prod"], Input::Null);
    human.ok();
    assert!(human.stdout.contains(CLIENT_ID), "{human:#?}");
    assert!(human.stdout.contains("customer=Acme Corp"), "{human:#?}");
    for out in [&table, &human] {
        assert!(!out.all().contains("CS-SENTINEL"), "{out:#?}");
    }
}

#[test]
fn add_with_secret_files_refresh_token_sliding_mode_and_grant_times() {
    let w = World::new();
    let cs = w.write_file("cs.txt", "CS-SENTINEL-file-2\n", 0o600);
    let rt = w.write_file("rt.txt", "RT-SENTINEL-file-2\n", 0o600);
    let now = Utc::now();
    let grant = now - chrono::Duration::days(10);
    let issued = now - chrono::Duration::days(1);
    let out = w.run(
        &[
            "connection",
            "add",
            "slide",
            "--instance",
            "erp.example.com/AcumaticaERP",
            "--client-id",
            "ABC@Tenant",
            "--client-secret-file",
            cs.to_str().unwrap(),
            "--refresh-token-file",
            rt.to_str().unwrap(),
            "--mode",
            "sliding",
            "--lifetime",
            "7d",
            "--absolute-lifetime",
            "90d",
            "--grant-issued-at",
            &rfc3339(grant),
            "--refresh-token-issued-at",
            &rfc3339(issued),
        ],
        // A secret file is named: stdin must not be needed.
        Input::Null,
    );
    out.ok();
    assert!(out.stdout.contains("state active"), "{out:#?}");
    assert!(!out.all().contains("SENTINEL"), "{out:#?}");

    let c = w.show("slide");
    assert_connection_shape(&c);
    assert_eq!(c["state"], "active");
    assert_eq!(c["mode"], "sliding");
    assert_eq!(duration_of(&c["lifetime"]), Duration::from_secs(7 * 86400));
    assert_eq!(
        duration_of(&c["absolute_lifetime"]),
        Duration::from_secs(90 * 86400)
    );
    assert_eq!(c["grant_issued_at"], rfc3339(grant));
    assert_eq!(c["refresh_token_issued_at"], rfc3339(issued));
    // Sliding: min(token issued + lifetime, grant + absolute cap).
    assert_eq!(c["deadline"], rfc3339(issued + chrono::Duration::days(7)));
    assert_eq!(c["deadline_source"], "observed");
    let next = assert_rfc3339_utc(&c["next_refresh_at"]);
    assert!(next <= issued + chrono::Duration::days(7), "{c}");
    assert_eq!(c["last_refresh_at"], Value::Null);

    // The files' trailing newlines are trimmed; the values are sealed exactly.
    let st = w.open(w.key(), vec![]);
    let row = st.get("slide").unwrap();
    let secret = st.secret(row.conn.id, SecretColumn::ClientSecret).unwrap();
    assert_eq!(secret.unwrap().expose(), "CS-SENTINEL-file-2");
    let token = st.secret(row.conn.id, SecretColumn::RefreshToken).unwrap();
    assert_eq!(token.unwrap().expose(), "RT-SENTINEL-file-2");
}

#[test]
fn add_with_refresh_token_of_unknown_age_gets_an_assumed_deadline_and_refreshes_at_once() {
    let w = World::new();
    let rt = w.write_file("rt.txt", "RT-SENTINEL-3", 0o600);
    let before = Utc::now() - chrono::Duration::seconds(1);
    w.add(
        "legacy",
        "legacy.example.com",
        "X@Y",
        &["--refresh-token-file", rt.to_str().unwrap()],
        "CS-SENTINEL-3\n",
    )
    .ok();
    let after = Utc::now() + chrono::Duration::seconds(1);
    let c = w.show("legacy");
    assert_eq!(c["state"], "active");
    assert_eq!(c["deadline_source"], "assumed");
    assert_eq!(c["grant_issued_at"], Value::Null);
    let next = assert_rfc3339_utc(&c["next_refresh_at"]);
    assert!(next >= before && next <= after, "refresh at once: {c}");
    let deadline = assert_rfc3339_utc(&c["deadline"]);
    assert!(deadline >= before + chrono::Duration::days(30), "{c}");
    assert!(deadline <= after + chrono::Duration::days(30), "{c}");
}

#[test]
fn add_rejects_grant_times_without_a_refresh_token_and_times_in_the_future() {
    let w = world_with_acme();
    let before = w.snapshot();
    let no_token = w.add(
        "g",
        "g.example.com",
        "X@Y",
        &["--grant-issued-at", "2025-01-01T00:00:00Z"],
        "CS\n",
    );
    assert!(
        no_token.one_error().contains("refresh token"),
        "{no_token:#?}"
    );
    let rt = w.write_file("rt.txt", "RT\n", 0o600);
    let future = rfc3339(Utc::now() + chrono::Duration::days(2));
    let in_future = w.add(
        "g",
        "g.example.com",
        "X@Y",
        &[
            "--refresh-token-file",
            rt.to_str().unwrap(),
            "--grant-issued-at",
            &future,
        ],
        "CS\n",
    );
    assert!(in_future.one_error().contains("future"), "{in_future:#?}");
    assert_eq!(w.snapshot(), before);
}

#[test]
fn instance_urls_are_normalised_and_the_stored_form_printed() {
    let w = World::new();
    let cases = [
        (
            "https://acme.acumatica.com/Main?ScreenId=00000000",
            "acme.acumatica.com",
        ),
        (
            "https://erp.example.com/AcumaticaERP/",
            "erp.example.com/AcumaticaERP",
        ),
        (
            "https://erp.example.com/AcumaticaERP/Main.aspx",
            "erp.example.com/AcumaticaERP",
        ),
        (
            "https://acme.acumatica.com/(W(3))/Main?ScreenId=SO301000#x",
            "acme.acumatica.com",
        ),
        (
            "https://erp.example.com/AcumaticaERP/Frames/Login.aspx?ReturnUrl=/Main",
            "erp.example.com/AcumaticaERP",
        ),
        (
            "http://erp.example.com:8080/ERP/Main",
            "erp.example.com:8080/ERP",
        ),
        ("https://ACME.acumatica.com:443/", "acme.acumatica.com"),
        ("erp.example.com:8443", "erp.example.com:8443"),
    ];
    for (i, (input, stored)) in cases.iter().enumerate() {
        let name = format!("c{i}");
        let out = w.add(&name, input, "X@Y", &[], "CS\n");
        out.ok();
        assert!(
            out.stdout.contains(&format!("(instance {stored}, ")),
            "{input}: {out:#?}"
        );
        assert_eq!(w.show(&name)["instance"], *stored, "{input}");
    }
}

#[test]
fn a_non_host_instance_is_refused_and_no_store_is_created() {
    let w = World::new();
    for bad in [
        "not a host",
        "ftp://files.example.com",
        "https:///Main",
        "https://user:pw@acme.acumatica.com",
        "https://acme..com",
        "",
    ] {
        let out = w.add("x", bad, "X@Y", &[], "CS\n");
        out.one_error();
        assert!(!w.path().join("state").exists(), "{bad}: {out:#?}");
        assert!(!out.all().contains("pw@"), "credentials echoed: {out:#?}");
    }
}

#[test]
fn a_non_host_instance_leaves_an_existing_store_untouched() {
    let w = world_with_acme();
    let before = w.snapshot();
    for bad in ["not a host", "https://acme.acumatica.com:99999/"] {
        w.add("x", bad, "X@Y", &[], "CS\n").one_error();
        let set = w.run(
            &["connection", "set", "acme", "--instance", bad],
            Input::Null,
        );
        set.one_error();
        assert_eq!(w.snapshot(), before, "{bad}");
    }
    assert_eq!(w.show("acme")["instance"], "acme.acumatica.com");
}

#[test]
fn client_ids_with_tenant_names_with_spaces_are_kept_whole() {
    let w = World::new();
    for (name, id) in [
        ("one", "88358B02-A48D-A50E-F710-39C1636C30F6@My Company"),
        (
            "two",
            "88358B02-A48D-A50E-F710-39C1636C30F6@Acme Corp  (Test)",
        ),
        ("three", "88358B02-A48D-A50E-F710-39C1636C30F6"),
    ] {
        w.add(name, "acme.acumatica.com", id, &[], "CS\n").ok();
        assert_eq!(w.show(name)["client_id"], id);
    }
    let human = w.run(&["connection", "show", "two"], Input::Null);
    assert!(
        human.ok().stdout.contains("@Acme Corp  (Test)"),
        "{human:#?}"
    );
}

#[test]
fn a_wrong_key_is_refused_and_the_store_untouched() {
    let w = world_with_acme();
    let other = Key::generate().to_base64();
    let before = w.snapshot();
    let env = [("ACUTOKEN_KEY", other.expose())];
    for args in [
        &["connection", "list"][..],
        &["connection", "show", "acme", "--json"],
        &["connection", "disable", "acme"],
        &["connection", "remove", "acme", "--yes"],
    ] {
        let out = w.run_with(args, Input::Null, &env);
        let line = out.one_error();
        assert!(
            line.contains("ACUTOKEN_KEY"),
            "names the key source: {out:#?}"
        );
        assert!(!out.all().contains(other.expose()), "key echoed: {out:#?}");
    }
    let add = w.run_with(
        &[
            "connection",
            "add",
            "b",
            "--instance",
            "b.com",
            "--client-id",
            "X@Y",
        ],
        Input::Text("CS\n"),
        &env,
    );
    assert!(add.one_error().contains("ACUTOKEN_KEY"), "{add:#?}");
    assert_eq!(w.snapshot(), before);
    assert_eq!(w.list().len(), 1);
}

#[test]
fn a_missing_key_for_an_existing_store_is_an_error_and_no_key_is_made() {
    let w = world_with_acme();
    fs::remove_file(w.key_path()).unwrap();
    let before = w.snapshot();
    let list = w.run(&["connection", "list"], Input::Null);
    let line = list.one_error();
    assert!(
        line.contains(&w.key_path().display().to_string()),
        "{list:#?}"
    );
    assert!(line.contains(&w.store.display().to_string()), "{list:#?}");
    let add = w.add("b", "b.com", "X@Y", &[], "CS\n");
    add.one_error();
    assert!(
        !w.key_path().exists(),
        "a new key was made for an existing store"
    );
    assert_eq!(w.snapshot(), before);
}

#[test]
fn a_key_file_readable_by_others_is_refused() {
    let w = World::new();
    let key = w.path().join("store.key");
    w.run(
        &["key", "generate", "--out", key.to_str().unwrap()],
        Input::Null,
    )
    .ok();
    let config = w.write_file(
        "acutoken.toml",
        &format!("[store]\nkey_file = \"{}\"\n", key.display()),
        0o600,
    );
    let cfg = config.to_str().unwrap();
    w.run(
        &[
            "-c",
            cfg,
            "connection",
            "add",
            "a",
            "--instance",
            "a.com",
            "--client-id",
            "X@Y",
        ],
        Input::Text("CS\n"),
    )
    .ok();
    assert!(!w.key_path().exists(), "the configured key must be used");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let before = w.snapshot();
    let list = w.run(&["-c", cfg, "connection", "list"], Input::Null);
    let line = list.one_error();
    assert!(line.contains("chmod 600"), "{list:#?}");
    assert!(line.contains(&key.display().to_string()), "{list:#?}");
    let add = w.run(
        &[
            "-c",
            cfg,
            "connection",
            "add",
            "b",
            "--instance",
            "b.com",
            "--client-id",
            "X@Y",
        ],
        Input::Text("CS\n"),
    );
    add.one_error();
    assert_eq!(w.snapshot(), before);
}

#[test]
fn a_duplicate_name_is_refused_and_the_store_untouched() {
    let w = world_with_acme();
    let before = w.snapshot();
    let out = w.add("acme", "other.example.com", "X@Y", &[], "CS-2\n");
    assert!(
        out.one_error().contains("`acme` already exists"),
        "{out:#?}"
    );
    assert_eq!(w.snapshot(), before);
    assert_eq!(w.show("acme")["instance"], "acme.acumatica.com");
}

#[test]
fn unknown_names_are_refused_by_every_command_that_takes_one() {
    let w = world_with_acme();
    let before = w.snapshot();
    for args in [
        &["connection", "show", "nope"][..],
        &["connection", "show", "nope", "--json"],
        &["connection", "set", "nope", "--label", "a=b"],
        &["connection", "remove", "nope", "--yes"],
        &["connection", "history", "nope"],
        &["connection", "history", "nope", "--json"],
        &["connection", "disable", "nope"],
        &["connection", "enable", "nope"],
    ] {
        let out = w.run(args, Input::Null);
        assert!(out.one_error().contains("`nope`"), "{args:?}: {out:#?}");
        assert_eq!(out.stdout, "", "{args:?}");
    }
    let set_secret = w.run(&["connection", "set-secret", "nope"], Input::Text("CS\n"));
    assert!(set_secret.one_error().contains("`nope`"), "{set_secret:#?}");
    assert_eq!(w.snapshot(), before);
}

#[test]
fn unknown_config_keys_are_errors_naming_the_key() {
    let w = world_with_acme();
    let before = w.snapshot();
    let config = w.write_file("bad.toml", "[renewal]\nfoo = 1\n", 0o600);
    let out = w.run(
        &["-c", config.to_str().unwrap(), "connection", "list"],
        Input::Null,
    );
    assert!(out.one_error().contains("renewal.foo"), "{out:#?}");
    let out = w.run_with(
        &["connection", "list"],
        Input::Null,
        &[("ACUTOKEN__RENEWAL__FOO", "1")],
    );
    let line = out.one_error();
    assert!(line.contains("renewal.foo"), "{out:#?}");
    assert!(line.contains("ACUTOKEN__RENEWAL__FOO"), "{out:#?}");
    let add = w.run_with(
        &[
            "connection",
            "add",
            "b",
            "--instance",
            "b.com",
            "--client-id",
            "X@Y",
        ],
        Input::Text("CS\n"),
        &[("ACUTOKEN__RENEWAL__FOO", "1")],
    );
    add.one_error();
    assert_eq!(w.snapshot(), before);
}

#[test]
fn remove_without_yes_off_a_terminal_is_refused() {
    let w = world_with_acme();
    let before = w.snapshot();
    let out = w.run(&["connection", "remove", "acme"], Input::Null);
    assert!(out.one_error().contains("--yes"), "{out:#?}");
    // Typing "y" on a pipe is not a terminal's answer either.
    let piped = w.run(&["connection", "remove", "acme"], Input::Text("y\n"));
    piped.one_error();
    assert_eq!(w.snapshot(), before);
    assert_eq!(w.list().len(), 1);
}

#[test]
fn an_empty_secret_on_stdin_is_refused_and_nothing_is_created() {
    let w = World::new();
    for input in [
        Input::Null,
        Input::Text(""),
        Input::Text("\n"),
        Input::Text("  \r\n"),
    ] {
        let out = w.run(
            &[
                "connection",
                "add",
                "a",
                "--instance",
                "a.com",
                "--client-id",
                "X@Y",
            ],
            input,
        );
        assert!(
            out.one_error().contains("client secret is empty"),
            "{out:#?}"
        );
        assert_eq!(w.snapshot(), None, "{out:#?}");
    }
    let w = world_with_acme();
    let before = w.snapshot();
    let out = w.add("b", "b.com", "X@Y", &[], "");
    out.one_error();
    let out = w.run(&["connection", "set-secret", "acme"], Input::Text("\n"));
    out.one_error();
    let empty = w.write_file("empty.txt", "", 0o600);
    let out = w.run(
        &[
            "connection",
            "set-secret",
            "acme",
            "--client-secret-file",
            empty.to_str().unwrap(),
        ],
        Input::Null,
    );
    out.one_error();
    assert_eq!(w.snapshot(), before);
}

#[test]
fn an_oversized_secret_is_refused_not_cut_short() {
    let w = world_with_acme();
    let before = w.snapshot();
    let huge = "S".repeat(70_000);
    let file = w.write_file("huge.txt", &huge, 0o600);
    let out = w.run(
        &[
            "connection",
            "set-secret",
            "acme",
            "--client-secret-file",
            file.to_str().unwrap(),
        ],
        Input::Null,
    );
    assert!(out.one_error().contains("longer than"), "{out:#?}");
    let out = w.add("big", "b.example.com", "X@Y", &[], &huge);
    assert!(out.one_error().contains("longer than"), "{out:#?}");
    assert_eq!(w.snapshot(), before);
}

#[test]
fn commands_on_a_missing_store_say_where_they_looked_and_create_nothing() {
    let w = World::new();
    let key = w.path().join("new.key");
    w.run(
        &["key", "generate", "--out", key.to_str().unwrap()],
        Input::Null,
    )
    .ok();
    let backup = w.path().join("backup.db");
    let where_ = w.store.display().to_string();
    for args in [
        &["connection", "list"][..],
        &["connection", "list", "--json"],
        &["connection", "show", "a"],
        &["connection", "set", "a", "--label", "k=v"],
        &["connection", "remove", "a", "--yes"],
        &["connection", "history", "a"],
        &["connection", "disable", "a"],
        &["connection", "enable", "a"],
        &["connection", "refresh", "a"],
        &["connection", "authorize", "a"],
        &["token", "a"],
        &["status"],
        &["backup", backup.to_str().unwrap()],
        &["key", "rotate", "--new-key-file", key.to_str().unwrap()],
    ] {
        let out = w.run(args, Input::Null);
        let line = out.one_error();
        assert!(
            line.contains(&where_),
            "{args:?} should name {where_}: {out:#?}"
        );
        assert_eq!(w.snapshot(), None, "{args:?} created the store directory");
        assert!(!backup.exists(), "{args:?}");
    }
    let set_secret = w.run(&["connection", "set-secret", "a"], Input::Text("CS\n"));
    assert!(set_secret.one_error().contains(&where_), "{set_secret:#?}");
    assert_eq!(w.snapshot(), None);
}

#[test]
fn first_add_creates_a_private_store_directory_key_and_says_so() {
    let w = World::new();
    let out = w.add("a", "a.com", "X@Y", &[], "CS\n");
    out.ok();
    let key = w.key_path();
    assert!(
        out.stderr
            .contains(&format!("created a new store key at {}", key.display())),
        "{out:#?}"
    );
    assert!(out.stderr.contains("LoadCredential"), "{out:#?}");
    assert_eq!(mode_of(&key), 0o600, "key file mode");
    assert_eq!(mode_of(&w.store), 0o600, "store mode");
    // A second add finds the key and says nothing about keys.
    let again = w.add("b", "b.com", "X@Y", &[], "CS\n");
    assert!(!again.ok().stderr.contains("created"), "{again:#?}");
    let text = fs::read_to_string(&key).unwrap();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(text.trim_end_matches('\n'))
        .unwrap();
    assert_eq!(raw.len(), 32);
    assert_eq!(
        mode_of(w.store.parent().unwrap()),
        0o700,
        "created directory mode"
    );
}

#[test]
fn first_add_leaves_the_mode_of_an_existing_directory_alone() {
    let w = World::new();
    let dir = w.store.parent().unwrap();
    fs::create_dir(dir).unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o751)).unwrap();
    w.add("a", "a.com", "X@Y", &[], "CS\n").ok();
    assert_eq!(mode_of(dir), 0o751);
    assert_eq!(mode_of(&w.store), 0o600);
    assert_eq!(mode_of(&w.key_path()), 0o600);
}

fn record(name: &str, instance: &str) -> Value {
    json!({
        "name": name,
        "instance": instance,
        "client_id": format!("{name}-id@Tenant {name}"),
        "client_secret": format!("CS-SENTINEL-imp-{name}"),
    })
}

#[test]
fn import_of_three_good_records() {
    let w = World::new();
    let grant = rfc3339(Utc::now() - chrono::Duration::days(3));
    let records = json!([
        record("one", "https://one.acumatica.com/Main"),
        {
            "name": "two",
            "instance": "https://erp.example.com/AcumaticaERP/",
            "client_id": "ABC@Two Tenant",
            "client_secret": "CS-SENTINEL-imp-two",
            "refresh_token": "RT-SENTINEL-imp-two",
            "labels": {"customer": "Two Ltd"},
            "secret_expires_at": "2031-01-01",
            "grant_issued_at": grant,
            "mode": "sliding",
            "lifetime": "14d",
            "absolute_lifetime": "none"
        },
        record("three", "three.example.com:8443"),
    ]);
    let file = w.write_file("import.json", &records.to_string(), 0o600);
    let out = w.run(
        &["connection", "import", file.to_str().unwrap()],
        Input::Null,
    );
    out.ok();
    assert!(out.stdout.contains("imported 3 connections"), "{out:#?}");
    assert!(!out.stderr.contains("warning"), "{out:#?}");
    assert!(out.stderr.contains("created a new store key"), "{out:#?}");
    assert!(!out.all().contains("SENTINEL"), "{out:#?}");
    let list = w.list();
    let names: Vec<&str> = list.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["one", "three", "two"]);
    for c in &list {
        assert_connection_shape(c);
    }
    let two = w.show("two");
    assert_eq!(two["instance"], "erp.example.com/AcumaticaERP");
    assert_eq!(two["client_id"], "ABC@Two Tenant");
    assert_eq!(two["labels"], json!({"customer": "Two Ltd"}));
    assert_eq!(two["state"], "active");
    assert_eq!(two["mode"], "sliding");
    assert_eq!(two["absolute_lifetime"], Value::Null);
    assert_eq!(two["grant_issued_at"], grant);
    assert_eq!(two["deadline_source"], "observed");
    assert_eq!(two["secret_expires_at"], "2031-01-01T00:00:00Z");
    assert_eq!(w.show("one")["state"], "pending_authorization");
    assert_eq!(w.show("three")["instance"], "three.example.com:8443");

    let st = w.open(w.key(), vec![]);
    let row = st.get("two").unwrap();
    assert_eq!(
        st.secret(row.conn.id, SecretColumn::RefreshToken)
            .unwrap()
            .unwrap()
            .expose(),
        "RT-SENTINEL-imp-two"
    );
    let history = w.run(&["connection", "history", "two", "--json"], Input::Null);
    assert_eq!(history.ok().json()[0]["event"], "added");
}

#[test]
fn import_with_bad_records_writes_nothing_and_names_every_one() {
    let w = world_with_acme();
    let before = w.snapshot();
    let mut unknown = record("colour", "c.example.com");
    unknown["colour"] = json!("red");
    let mut no_secret = record("nosecret", "n.example.com");
    no_secret.as_object_mut().unwrap().remove("client_secret");
    let records = json!([
        record("good1", "g1.example.com"),
        record("badhost", "not a host"),
        no_secret,
        unknown,
        record("good2", "g2.example.com"),
        record("good1", "g1b.example.com"),
        record("acme", "acme2.example.com"),
        record("good3", "g3.example.com"),
    ]);
    let file = w.write_file("import.json", &records.to_string(), 0o600);
    let out = w.run(
        &["connection", "import", file.to_str().unwrap()],
        Input::Null,
    );
    let line = out.error_with_lines(5);
    assert!(line.contains("nothing imported"), "{out:#?}");
    assert!(line.contains('5'), "counts the bad records: {out:#?}");
    let problems: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.starts_with("error:"))
        .collect();
    let expect = [
        ("record 2 (`badhost`)", "instance"),
        ("record 3 (`nosecret`)", "client_secret"),
        ("record 4 (`colour`)", "colour"),
        ("record 6 (`good1`)", "twice"),
        ("record 7 (`acme`)", "already exists"),
    ];
    assert_eq!(problems.len(), expect.len(), "{out:#?}");
    for (line, (who, why)) in problems.iter().zip(expect) {
        assert!(
            line.contains(who) && line.contains(why),
            "{line:?} should name {who} ({why})"
        );
    }
    assert!(!out.all().contains("SENTINEL"), "{out:#?}");
    assert_eq!(w.snapshot(), before);

    // Into a store that does not exist yet: nothing is created either.
    let fresh = World::new();
    let file = fresh.write_file("import.json", &records.to_string(), 0o600);
    let out = fresh.run(
        &["connection", "import", file.to_str().unwrap()],
        Input::Null,
    );
    out.error_with_lines(4);
    assert_eq!(fresh.snapshot(), None);
}

/// `n` good records named `bulk-00000`, `bulk-00001`, ...
fn bulk(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            record(
                &format!("bulk-{i:05}"),
                &format!("site{}.example.com", i % 50),
            )
        })
        .collect()
}

/// The import writes records as they are checked: bad ones found after
/// thousands were written (more than three chunks) still leave an existing
/// store byte for byte as it was, and no store at all where there was none.
#[test]
fn bad_records_found_after_thousands_were_written_leave_nothing() {
    let mut records = bulk(3500);
    records.push(record("late", "ftp://not-https.example.com"));
    records.push(record("acme", "acme2.example.com"));
    let text = Value::Array(records).to_string();

    let w = world_with_acme();
    let before = w.snapshot();
    let file = w.write_file("import.json", &text, 0o600);
    let out = w.run(
        &["connection", "import", file.to_str().unwrap()],
        Input::Null,
    );
    let line = out.error_with_lines(2);
    assert!(line.contains("2 of the records"), "{out:#?}");
    assert!(out.stderr.contains("record 3501 (`late`)"), "{out:#?}");
    assert!(
        out.stderr
            .contains("record 3502 (`acme`): a connection by that name already exists"),
        "{out:#?}"
    );
    assert_eq!(w.snapshot(), before);
    assert_eq!(w.list().len(), 1);

    let fresh = World::new();
    let file = fresh.write_file("import.json", &text, 0o600);
    let out = fresh.run(
        &["connection", "import", file.to_str().unwrap()],
        Input::Null,
    );
    // Into a new store, `acme` is only a problem of the old store.
    out.error_with_lines(1);
    assert!(out.stderr.contains("record 3501 (`late`)"), "{out:#?}");
    assert_eq!(fresh.snapshot(), None);
    assert!(!fresh.key_path().exists());
}

/// SIGINT while an import builds a new store: the hidden build, the key that
/// was still to be written and the directory the import made are all gone.
#[test]
fn an_interrupted_import_into_a_new_store_leaves_nothing() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let w = World::new();
    // Large enough that a debug build takes seconds to write it.
    let file = w.write_file("bulk.json", &Value::Array(bulk(100_000)).to_string(), 0o600);
    let mut child = w
        .command(&["connection", "import", file.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let dir = w.store.parent().unwrap().to_path_buf();
    let building = || {
        fs::read_dir(&dir).is_ok_and(|d| {
            d.flatten().any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".acutoken.db.import-")
            })
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !building() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the import ended before its build was seen"
        );
        assert!(Instant::now() < deadline, "no build file within 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("error: interrupted: nothing imported"),
        "{stderr}"
    );
    assert_eq!(w.snapshot(), None, "{stderr}");
}

#[test]
fn import_of_a_file_readable_by_others_warns() {
    let w = World::new();
    let records = json!([record("one", "one.example.com")]);
    let file = w.write_file("import.json", &records.to_string(), 0o644);
    let out = w.run(
        &["connection", "import", file.to_str().unwrap()],
        Input::Null,
    );
    out.ok();
    let warnings: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .collect();
    assert_eq!(warnings.len(), 1, "{out:#?}");
    assert!(warnings[0].contains("import.json"), "{out:#?}");
    assert!(warnings[0].contains("chmod 600"), "{out:#?}");
    assert_eq!(w.list().len(), 1);
}

#[test]
fn import_of_20000_records() {
    let w = World::new();
    let n = 20_000;
    let records: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "name": format!("conn-{i:05}"),
                "instance": format!("https://site{}.acumatica.com/Main", i % 500),
                "client_id": format!("{i:08X}-A48D-A50E-F710-39C1636C30F6@Tenant {i}"),
                "client_secret": format!("CS-SENTINEL-bulk-{i}"),
                "refresh_token": format!("RT-SENTINEL-bulk-{i}"),
                "labels": {"customer": format!("Customer {i}")},
            })
        })
        .collect();
    let file = w.write_file("bulk.json", &Value::Array(records).to_string(), 0o600);
    let started = Instant::now();
    let out = w.run(
        &["connection", "import", file.to_str().unwrap()],
        Input::Null,
    );
    let took = started.elapsed();
    eprintln!("import of {n} records took {took:?}");
    out.ok();
    assert!(
        out.stdout.contains(&format!("imported {n} connections")),
        "{out:#?}"
    );
    let list = w.list();
    assert_eq!(list.len(), n);
    assert_eq!(list[0]["name"], "conn-00000");
    assert_eq!(list[n - 1]["name"], format!("conn-{:05}", n - 1));
    assert!(list.iter().all(|c| c["state"] == "active"));
}

#[test]
fn set_edits_labels_mode_and_lifetimes_in_place() {
    let w = World::new();
    let rt = w.write_file("rt.txt", "RT-set\n", 0o600);
    let grant = Utc::now() - chrono::Duration::days(2);
    w.add(
        "s",
        "s.example.com",
        "X@Y",
        &[
            "--label",
            "customer=Old",
            "--label",
            "gone=soon",
            "--refresh-token-file",
            rt.to_str().unwrap(),
            "--grant-issued-at",
            &rfc3339(grant),
        ],
        "CS\n",
    )
    .ok();
    let before = w.show("s");
    assert_eq!(
        before["deadline"],
        rfc3339(grant + chrono::Duration::days(30))
    );
    let out = w.run(
        &[
            "connection",
            "set",
            "s",
            "--label",
            "customer=New Name",
            "--label",
            "gone=",
            "--label",
            "contact=a@b.example",
            "--mode",
            "sliding",
            "--lifetime",
            "7d",
            "--absolute-lifetime",
            "20d",
            "--secret-expires",
            "2032-02-02T10:00:00+02:00",
        ],
        Input::Null,
    );
    out.ok();
    assert!(out.stdout.contains("state active"), "{out:#?}");
    let c = w.show("s");
    assert_connection_shape(&c);
    assert_eq!(c["id"], before["id"], "the id is immutable");
    assert_eq!(
        c["labels"],
        json!({"customer": "New Name", "contact": "a@b.example"})
    );
    assert_eq!(c["mode"], "sliding");
    assert_eq!(duration_of(&c["lifetime"]), Duration::from_secs(7 * 86400));
    assert_eq!(
        duration_of(&c["absolute_lifetime"]),
        Duration::from_secs(20 * 86400)
    );
    assert_eq!(c["secret_expires_at"], "2032-02-02T08:00:00Z");
    // Re-planned: sliding from the token (issued at the grant), 7 days.
    assert_eq!(c["deadline"], rfc3339(grant + chrono::Duration::days(7)));
    assert_eq!(c["state"], "active");
    assert_eq!(c["grant_issued_at"], rfc3339(grant));

    let nothing = w.run(
        &["connection", "set", "s", "--mode", "sliding"],
        Input::Null,
    );
    assert!(
        nothing.ok().stdout.contains("nothing to change"),
        "{nothing:#?}"
    );
    let bad = w.run(&["connection", "set", "s", "--mode", "weekly"], Input::Null);
    bad.one_error();
}

#[test]
fn set_instance_or_client_id_clears_the_grant() {
    let w = World::new();
    let rt = w.write_file("rt.txt", "RT-SENTINEL-clear\n", 0o600);
    w.add(
        "m",
        "old.example.com",
        "X@Y",
        &["--refresh-token-file", rt.to_str().unwrap()],
        "CS-keep\n",
    )
    .ok();
    assert_eq!(w.show("m")["state"], "active");
    let out = w.run(
        &[
            "connection",
            "set",
            "m",
            "--instance",
            "https://new.example.com/ERP/Main",
        ],
        Input::Null,
    );
    out.ok();
    assert!(
        out.stdout.contains("instance new.example.com/ERP"),
        "{out:#?}"
    );
    assert!(
        out.stdout.contains("state pending_authorization"),
        "{out:#?}"
    );
    let c = w.show("m");
    assert_eq!(c["state"], "pending_authorization");
    assert_eq!(c["instance"], "new.example.com/ERP");
    for f in [
        "deadline",
        "deadline_source",
        "next_refresh_at",
        "refresh_token_issued_at",
    ] {
        assert_eq!(c[f], Value::Null, "{f}: {c}");
    }
    let st = w.open(w.key(), vec![]);
    let row = st.get("m").unwrap();
    assert!(
        !row.has_refresh_token,
        "the old grant's refresh token is dropped"
    );
    assert_eq!(
        st.secret(row.conn.id, SecretColumn::ClientSecret)
            .unwrap()
            .unwrap()
            .expose(),
        "CS-keep",
        "the client secret is kept"
    );
    drop(st);

    // Same for a new client ID, on a connection that had a token again.
    w.add(
        "n",
        "n.example.com",
        "X@Y",
        &["--refresh-token-file", rt.to_str().unwrap()],
        "CS\n",
    )
    .ok();
    w.run(
        &["connection", "set", "n", "--client-id", "Z@Other Tenant"],
        Input::Null,
    )
    .ok();
    let c = w.show("n");
    assert_eq!(c["state"], "pending_authorization");
    assert_eq!(c["client_id"], "Z@Other Tenant");
}

#[test]
fn set_secret_clears_needs_secret() {
    let w = World::new();
    let rt = w.write_file("rt.txt", "RT-ns\n", 0o600);
    w.add(
        "ns",
        "ns.example.com",
        "X@Y",
        &["--refresh-token-file", rt.to_str().unwrap()],
        "CS-old\n",
    )
    .ok();
    {
        let mut st = w.open(w.key(), vec![]);
        st.write(|tx, _| {
            let mut row = connections::get_tx(tx, "ns")?;
            row.conn.state = State::NeedsSecret;
            row.conn.next_refresh_at = None;
            row.conn.last_error = Some("invalid_client".into());
            connections::put(tx, &row)
        })
        .unwrap();
    }
    assert_eq!(w.show("ns")["state"], "needs_secret");
    let before = Utc::now() - chrono::Duration::seconds(1);
    let out = w.run(
        &[
            "connection",
            "set-secret",
            "ns",
            "--secret-expires",
            "2033-03-03",
        ],
        Input::Text("CS-SENTINEL-new\n"),
    );
    out.ok();
    assert!(out.stdout.contains("state active"), "{out:#?}");
    assert!(!out.all().contains("CS-SENTINEL"), "{out:#?}");
    let c = w.show("ns");
    assert_eq!(c["state"], "active");
    assert_eq!(c["last_error"], Value::Null);
    assert_eq!(c["secret_expires_at"], "2033-03-03T00:00:00Z");
    let next = assert_rfc3339_utc(&c["next_refresh_at"]);
    assert!(
        next >= before && next <= Utc::now() + chrono::Duration::seconds(1),
        "refresh soon: {c}"
    );
    let st = w.open(w.key(), vec![]);
    let row = st.get("ns").unwrap();
    assert_eq!(
        st.secret(row.conn.id, SecretColumn::ClientSecret)
            .unwrap()
            .unwrap()
            .expose(),
        "CS-SENTINEL-new"
    );
    let history = w.run(&["connection", "history", "ns", "--json"], Input::Null);
    let events: Vec<Value> = history.ok().json().as_array().unwrap().clone();
    assert_eq!(events.last().unwrap()["event"], "secret_set");

    let past = w.run(
        &[
            "connection",
            "set-secret",
            "ns",
            "--secret-expires",
            "2001-01-01",
        ],
        Input::Text("CS-x\n"),
    );
    past.one_error();
}

#[test]
fn set_secret_drops_an_expires_on_date_that_has_passed() {
    let w = World::new();
    let rt = w.write_file("rt.txt", "RT-exp\n", 0o600);
    let out = w.add(
        "exp",
        "e.example.com",
        "X@Y",
        &[
            "--refresh-token-file",
            rt.to_str().unwrap(),
            "--secret-expires",
            "2020-01-01",
        ],
        "CS-old\n",
    );
    assert!(out.ok().stdout.contains("state needs_secret"), "{out:#?}");
    w.run(
        &["connection", "set-secret", "exp"],
        Input::Text("CS-new\n"),
    )
    .ok();
    let c = w.show("exp");
    assert_eq!(c["state"], "active");
    // Kept, the old date would send the daemon straight back to needs_secret.
    assert_eq!(c["secret_expires_at"], Value::Null, "{c}");

    // A date that has not passed may be the new secret's too: it stays.
    w.run(
        &["connection", "set", "exp", "--secret-expires", "2040-01-01"],
        Input::Null,
    )
    .ok();
    w.run(
        &["connection", "set-secret", "exp"],
        Input::Text("CS-newer\n"),
    )
    .ok();
    assert_eq!(w.show("exp")["secret_expires_at"], "2040-01-01T00:00:00Z");
}

#[test]
fn disable_enable_and_remove() {
    let w = World::new();
    let rt = w.write_file("rt.txt", "RT-de\n", 0o600);
    w.add(
        "d",
        "d.example.com",
        "X@Y",
        &["--refresh-token-file", rt.to_str().unwrap()],
        "CS\n",
    )
    .ok();
    w.add("keep", "k.example.com", "X@Y", &[], "CS\n").ok();
    let out = w.run(&["connection", "disable", "d"], Input::Null);
    assert!(out.ok().stdout.contains("d is disabled"), "{out:#?}");
    let c = w.show("d");
    assert_eq!(c["state"], "disabled");
    assert_eq!(c["next_refresh_at"], Value::Null);
    let out = w.run(&["connection", "enable", "d"], Input::Null);
    assert!(out.ok().stdout.contains("state active"), "{out:#?}");
    let c = w.show("d");
    assert_eq!(c["state"], "active");
    assert!(!c["next_refresh_at"].is_null(), "{c}");

    let out = w.run(&["connection", "remove", "d", "--yes"], Input::Null);
    assert!(out.ok().stdout.contains("removed connection d"), "{out:#?}");
    let names: Vec<Value> = w.list().iter().map(|c| c["name"].clone()).collect();
    assert_eq!(names, [json!("keep")]);
    w.run(&["connection", "show", "d"], Input::Null).one_error();
    w.run(&["connection", "history", "d"], Input::Null)
        .one_error();
    // The name is free again.
    w.add("d", "d2.example.com", "X@Y", &[], "CS\n").ok();
}

#[test]
fn history_json_is_an_array_of_at_event_detail_oldest_first() {
    let w = world_with_acme();
    for args in [
        &["connection", "set", "acme", "--label", "a=b"][..],
        &["connection", "disable", "acme"],
        &["connection", "enable", "acme"],
    ] {
        w.run(args, Input::Null).ok();
    }
    w.run(&["connection", "set-secret", "acme"], Input::Text("CS-h\n"))
        .ok();
    let out = w.run(&["connection", "history", "acme", "--json"], Input::Null);
    let events = out.ok().json();
    let events = events.as_array().unwrap();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["added", "changed", "disabled", "enabled", "secret_set"]
    );
    let mut last = None;
    for e in events {
        let obj = e.as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["at", "detail", "event"]);
        assert!(obj["detail"].is_string());
        let at = assert_rfc3339_utc(&obj["at"]);
        assert!(last.is_none_or(|l| l <= at), "oldest first: {events:?}");
        last = Some(at);
    }
    assert!(events[1]["detail"].as_str().unwrap().contains("labels"));
    let table = w.run(&["connection", "history", "acme"], Input::Null);
    let lines: Vec<&str> = table.ok().stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{table:#?}");
    assert!(
        lines[1].contains("added") && lines[5].contains("secret_set"),
        "{table:#?}"
    );
}

#[test]
fn key_generate_writes_a_private_file_or_one_line_to_a_pipe() {
    let w = World::new();
    let file = w.path().join("k.key");
    let out = w.run(
        &["key", "generate", "--out", file.to_str().unwrap()],
        Input::Null,
    );
    out.ok();
    assert_eq!(out.stdout, "", "the key goes to the file only: {out:#?}");
    assert_eq!(mode_of(&file), 0o600);
    let text = fs::read_to_string(&file).unwrap();
    assert!(
        text.ends_with('\n') && text.lines().count() == 1,
        "{text:?}"
    );
    let raw = base64::engine::general_purpose::STANDARD
        .decode(text.trim_end())
        .unwrap();
    assert_eq!(raw.len(), 32);
    assert!(
        !out.stderr.contains(text.trim_end()),
        "key echoed: {out:#?}"
    );
    key_from(&file);

    // Never overwrites an existing key.
    let again = w.run(
        &["key", "generate", "--out", file.to_str().unwrap()],
        Input::Null,
    );
    again.one_error();
    assert_eq!(fs::read_to_string(&file).unwrap(), text);

    let piped = w.run(&["key", "generate"], Input::Null);
    piped.ok();
    let lines: Vec<&str> = piped.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{piped:#?}");
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(lines[0])
            .unwrap()
            .len(),
        32
    );
    assert_ne!(lines[0], text.trim_end(), "keys are random");
    Key::from_base64(lines[0], KeySource::Env).unwrap();
}

/// Adds connections whose secrets are distinctive; returns (name, client secret, refresh token).
fn add_sentinels(w: &World, tag: &str, n: usize) -> Vec<(String, String, Option<String>)> {
    (0..n)
        .map(|i| {
            let name = format!("{tag}-{i}");
            let cs = format!("CS-SENTINEL-{tag}-{i}-Zq8w");
            let rt = (i % 2 == 0).then(|| format!("RT-SENTINEL-{tag}-{i}-Xk3p"));
            let rt_file = rt
                .as_ref()
                .map(|rt| w.write_file(&format!("{name}.rt"), rt, 0o600));
            let mut extra = vec![];
            if let Some(f) = &rt_file {
                extra = vec!["--refresh-token-file", f.to_str().unwrap()];
            }
            w.add(&name, "s.example.com", "X@Y", &extra, &format!("{cs}\n"))
                .ok();
            (name, cs, rt)
        })
        .collect()
}

#[test]
fn key_rotate_reseals_everything_under_the_new_key() {
    let w = World::new();
    let added = add_sentinels(&w, "rot", 5);
    let old = w.key();
    let new_file = w.path().join("new.key");
    w.run(
        &["key", "generate", "--out", new_file.to_str().unwrap()],
        Input::Null,
    )
    .ok();
    let new = key_from(&new_file);
    let out = w.run(
        &[
            "key",
            "rotate",
            "--new-key-file",
            new_file.to_str().unwrap(),
        ],
        Input::Null,
    );
    out.ok();
    // 5 client secrets and 3 refresh tokens.
    assert!(out.stdout.contains("re-sealed 8 values"), "{out:#?}");
    assert!(
        out.stdout
            .contains("nothing sealed under an old key remains"),
        "{out:#?}"
    );
    assert!(!out.all().contains("SENTINEL"), "{out:#?}");

    // Every secret opens with the new key alone.
    let st = w.open(new.clone(), vec![]);
    let usage = st.sealed_key_usage().unwrap();
    assert_eq!(usage, vec![(new.id().to_string(), 8)]);
    for (name, cs, rt) in &added {
        let row = st.get(name).unwrap();
        let got = st.secret(row.conn.id, SecretColumn::ClientSecret).unwrap();
        assert_eq!(got.unwrap().expose(), cs);
        let got = st.secret(row.conn.id, SecretColumn::RefreshToken).unwrap();
        assert_eq!(got.as_ref().map(|s| s.expose().to_string()), *rt);
    }
    drop(st);

    // The CLI opens it with the new key as primary, the old one listed as previous.
    let config = w.write_file(
        "rotated.toml",
        &format!(
            "[store]\nkey_file = \"{}\"\nprevious_key_files = [\"{}\"]\n",
            new_file.display(),
            w.key_path().display()
        ),
        0o600,
    );
    let list = w.run(
        &[
            "-c",
            config.to_str().unwrap(),
            "connection",
            "list",
            "--json",
        ],
        Input::Null,
    );
    assert_eq!(list.ok().json().as_array().unwrap().len(), 5);

    // Rotating again to the same key is refused.
    let same = w.run(
        &[
            "-c",
            config.to_str().unwrap(),
            "key",
            "rotate",
            "--new-key-file",
            new_file.to_str().unwrap(),
        ],
        Input::Null,
    );
    same.one_error();
    drop(old);
}

#[test]
fn after_rotation_the_old_key_cannot_seal_values_the_new_key_cannot_open() {
    let w = World::new();
    add_sentinels(&w, "late", 2);
    let new_file = w.path().join("new.key");
    w.run(
        &["key", "generate", "--out", new_file.to_str().unwrap()],
        Input::Null,
    )
    .ok();
    w.run(
        &[
            "key",
            "rotate",
            "--new-key-file",
            new_file.to_str().unwrap(),
        ],
        Input::Null,
    )
    .ok();
    // Until the operator re-points store.key_file, the old key beside the store
    // is still what the CLI finds. It must either be refused, or what it writes
    // must still open under the new key alone.
    let out = w.add("after", "a.example.com", "X@Y", &[], "CS-after-rotation\n");
    if out.code == 0 {
        let st = w.open(key_from(&new_file), vec![]);
        let row = st.get("after").unwrap();
        let opened = st.secret(row.conn.id, SecretColumn::ClientSecret);
        assert!(
            opened.is_ok(),
            "a secret written after rotation does not open under the new key: {opened:?}"
        );
    } else {
        out.one_error();
    }
}

#[test]
fn backup_writes_a_private_copy_that_opens_with_the_same_key() {
    let w = World::new();
    add_sentinels(&w, "bk", 3);
    let backup = w.path().join("copies").join("backup.db");
    fs::create_dir(backup.parent().unwrap()).unwrap();
    let out = w.run(&["backup", backup.to_str().unwrap()], Input::Null);
    out.ok();
    assert!(
        out.stdout.contains(&backup.display().to_string()),
        "{out:#?}"
    );
    assert_eq!(mode_of(&backup), 0o600);
    let original = w.list();

    let key_text = fs::read_to_string(w.key_path()).unwrap();
    let listed = w.run_with(
        &["connection", "list", "--json"],
        Input::Null,
        &[
            ("ACUTOKEN__STORE__PATH", backup.to_str().unwrap()),
            ("ACUTOKEN_KEY", key_text.trim()),
        ],
    );
    assert_eq!(listed.ok().json(), Value::Array(original));

    let st = acutoken::store::Store::open(
        &backup,
        acutoken::crypto::Keyring::new(w.key(), vec![]),
        acutoken::store::Create::No,
    )
    .unwrap();
    st.integrity_check().unwrap();
    let row = st.get("bk-0").unwrap();
    assert_eq!(
        st.secret(row.conn.id, SecretColumn::RefreshToken)
            .unwrap()
            .unwrap()
            .expose(),
        "RT-SENTINEL-bk-0-Xk3p"
    );
    drop(st);

    // Never overwrites.
    let bytes = fs::read(&backup).unwrap();
    w.run(&["backup", backup.to_str().unwrap()], Input::Null)
        .one_error();
    assert_eq!(fs::read(&backup).unwrap(), bytes);
}

#[test]
fn config_check_prints_the_effective_config_with_secrets_masked() {
    let w = World::new();
    let config = w.write_file(
        "acutoken.toml",
        r#"
[renewal]
lifetime = "20d"

[[alerts.webhooks]]
name = "ops"
kind = "generic"
url = "https://hooks.example.com/services/T0/B0/WEBHOOK-PATH-SECRET"
secret = "SIGNING-SECRET-4711"
"#,
        0o600,
    );
    let out = w.run(
        &["-c", config.to_str().unwrap(), "config", "check"],
        Input::Null,
    );
    out.ok();
    assert!(!out.all().contains("WEBHOOK-PATH-SECRET"), "{out:#?}");
    assert!(!out.all().contains("SIGNING-SECRET"), "{out:#?}");
    let printed: toml::Table = out
        .stdout
        .parse()
        .unwrap_or_else(|e| panic!("not TOML: {e}: {out:#?}"));
    let hook = &printed["alerts"]["webhooks"][0];
    assert_eq!(hook["name"].as_str(), Some("ops"));
    assert_eq!(hook["url"].as_str(), Some("***"));
    assert_eq!(hook["secret"].as_str(), Some("***"));
    assert_eq!(
        printed["store"]["path"].as_str(),
        Some(w.store.to_str().unwrap()),
        "the environment's store.path is part of the effective config"
    );
    assert_eq!(
        humantime::parse_duration(printed["renewal"]["lifetime"].as_str().unwrap()).unwrap(),
        Duration::from_secs(20 * 86400)
    );
    assert!(
        out.stdout.contains(&config.display().to_string()),
        "names the file: {out:#?}"
    );
}

#[test]
fn config_check_of_an_invalid_config_names_the_key() {
    let w = World::new();
    for (text, key) in [
        ("[renewal]\nrenew_at = 7\n", "renewal.renew_at"),
        ("[renewal]\nlifetime = \"banana\"\n", "renewal.lifetime"),
        (
            "[alerts]\nsend_resolved = true\nshout = 1\n",
            "alerts.shout",
        ),
    ] {
        let config = w.write_file("bad.toml", text, 0o600);
        let out = w.run(
            &["-c", config.to_str().unwrap(), "config", "check"],
            Input::Null,
        );
        assert!(out.one_error().contains(key), "{text}: {out:#?}");
        assert_eq!(out.stdout, "", "{out:#?}");
    }
    let out = w.run_with(
        &["config", "check"],
        Input::Null,
        &[("ACUTOKEN__RENEWAL__RENEW_AT", "2")],
    );
    assert!(out.one_error().contains("renewal.renew_at"), "{out:#?}");
    let missing = w.path().join("absent.toml");
    let out = w.run(
        &["-c", missing.to_str().unwrap(), "config", "check"],
        Input::Null,
    );
    assert!(out.one_error().contains("absent.toml"), "{out:#?}");
}

#[test]
fn secrets_are_never_stored_or_backed_up_in_the_clear() {
    let w = World::new();
    let added = add_sentinels(&w, "rest", 6);
    let records = json!([
        {
            "name": "imp",
            "instance": "i.example.com",
            "client_id": "X@Y",
            "client_secret": "CS-SENTINEL-import-Zq8w",
            "refresh_token": "RT-SENTINEL-import-Xk3p",
        }
    ]);
    let file = w.write_file("import.json", &records.to_string(), 0o600);
    w.run(
        &["connection", "import", file.to_str().unwrap()],
        Input::Null,
    )
    .ok();
    w.run(
        &["connection", "set-secret", "rest-1"],
        Input::Text("CS-SENTINEL-reset-Zq8w\n"),
    )
    .ok();
    let backup = w.path().join("backup.db");
    w.run(&["backup", backup.to_str().unwrap()], Input::Null)
        .ok();

    let mut sentinels: Vec<String> = vec![
        "CS-SENTINEL-import-Zq8w".into(),
        "RT-SENTINEL-import-Xk3p".into(),
        "CS-SENTINEL-reset-Zq8w".into(),
    ];
    for (_, cs, rt) in added {
        sentinels.push(cs);
        sentinels.extend(rt);
    }
    let mut files = vec![w.store.clone(), backup];
    for suffix in ["-wal", "-shm", "-journal"] {
        let p = w.store.with_file_name(format!("acutoken.db{suffix}"));
        if p.exists() {
            files.push(p);
        }
    }
    for f in &files {
        let bytes = fs::read(f).unwrap();
        assert!(bytes.len() > 1000, "{} looks empty", f.display());
        for s in &sentinels {
            // Also the distinctive tail alone, in case a prefix were stripped.
            for needle in [s.as_str(), &s[s.len() - 8..]] {
                assert!(
                    !bytes
                        .windows(needle.len())
                        .any(|win| win == needle.as_bytes()),
                    "{needle} found in the clear in {}",
                    f.display()
                );
            }
        }
    }
    // Nor in anything the CLI prints about them.
    let mut printed = String::new();
    for args in [
        &["connection", "list"][..],
        &["connection", "list", "--json"],
        &["connection", "show", "imp"],
        &["connection", "show", "imp", "--json"],
        &["connection", "show", "rest-1", "--json"],
        &["connection", "history", "rest-1", "--json"],
        &["status", "--json"],
    ] {
        printed.push_str(&w.run(args, Input::Null).all());
    }
    assert!(printed.contains("rest-1"), "{printed}");
    for s in &sentinels {
        assert!(!printed.contains(s.as_str()), "{s} printed: {printed}");
    }
    // The library still opens every one of them.
    let st = w.open(w.key(), vec![]);
    let row = st.get("imp").unwrap();
    assert_eq!(
        st.secret(row.conn.id, SecretColumn::ClientSecret)
            .unwrap()
            .unwrap()
            .expose(),
        "CS-SENTINEL-import-Zq8w"
    );
}
