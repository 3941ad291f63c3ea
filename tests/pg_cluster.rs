//! The PostgreSQL test support itself: the server `.ci/pg start` runs checks
//! role `acutoken`'s password for real, and `support_pg::fresh` hands each test
//! a database of its own that is gone afterwards. These need the server and
//! fail (never skip) without it.

mod support_pg;

use postgres::NoTls;
use postgres::error::SqlState;

/// Whether the server has a database of this name, asked as the superuser.
fn exists(name: &str) -> bool {
    let row = support_pg::admin()
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&name],
        )
        .expect("pg_database is readable");
    row.get::<_, i64>(0) == 1
}

#[test]
fn a_fresh_database_is_reachable_as_acutoken_with_the_password_from_the_file() {
    let db = support_pg::fresh("reachable");
    assert!(
        !db.url.contains(&support_pg::password()),
        "the URL carries no password"
    );
    let mut client = db.connect();
    let row = client
        .query_one("SELECT current_user::text, current_database()::text", &[])
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "acutoken");
    assert_eq!(row.get::<_, String>(1), db.name);

    // Owner of its database: it can create what a store needs.
    client
        .batch_execute("CREATE TABLE t (id bigint PRIMARY KEY); INSERT INTO t VALUES (1)")
        .unwrap();

    // The product's role is no superuser (tests must not depend on powers an
    // operator's role lacks) but may create databases (`store copy --to`).
    let row = support_pg::admin()
        .query_one(
            "SELECT rolsuper, rolcreatedb FROM pg_roles WHERE rolname = 'acutoken'",
            &[],
        )
        .unwrap();
    assert!(!row.get::<_, bool>(0), "acutoken is not a superuser");
    assert!(row.get::<_, bool>(1), "acutoken has CREATEDB");
}

#[test]
fn two_fresh_databases_are_distinct() {
    let a = support_pg::fresh("distinct");
    let b = support_pg::fresh("distinct");
    assert_ne!(a.name, b.name);
    assert_ne!(a.url, b.url);

    a.connect()
        .batch_execute("CREATE TABLE only_in_a (id int)")
        .unwrap();
    let row = b
        .connect()
        .query_one("SELECT to_regclass('only_in_a') IS NULL", &[])
        .unwrap();
    assert!(
        row.get::<_, bool>(0),
        "a table made in one is absent in the other"
    );
}

#[test]
fn a_dropped_pgdb_takes_its_database_and_open_sessions_with_it() {
    let db = support_pg::fresh("dropped");
    let name = db.name.clone();
    // A session left open, as a pool or a killed daemon leaves them, does not
    // keep the database alive.
    let mut open = db.connect();
    open.batch_execute("SELECT 1").unwrap();
    assert!(exists(&name));

    drop(db);

    assert!(!exists(&name), "database {name} is gone after drop");
    assert!(
        open.batch_execute("SELECT 1").is_err(),
        "the session that was open in it is ended"
    );
}

#[test]
fn acutoken_without_its_password_is_refused() {
    let db = support_pg::fresh("refused");

    // No password: the server asks for one (a trusting server would let the
    // connection through here), and the client has none to give.
    let mut bare: postgres::Config = db.url.parse().unwrap();
    bare.connect_timeout(std::time::Duration::from_secs(10));
    let err = bare
        .connect(NoTls)
        .err()
        .expect("connecting as acutoken without a password fails");
    let why = support_pg::describe(&err);
    assert!(
        why.contains("password missing"),
        "refused for want of a password, not for another reason: {why}"
    );

    // A wrong or empty password: the server itself says no.
    for wrong in ["", "not-the-password"] {
        let mut config = db.config();
        config.password(wrong);
        let err = config
            .connect(NoTls)
            .err()
            .unwrap_or_else(|| panic!("password {wrong:?} is refused"));
        assert_eq!(
            err.code(),
            Some(&SqlState::INVALID_PASSWORD),
            "the server rejects password {wrong:?}: {}",
            support_pg::describe(&err)
        );
    }

    // And the right one, on the same URL, is accepted.
    db.connect().batch_execute("SELECT 1").unwrap();
}

#[test]
#[should_panic(
    expected = "PostgreSQL tests need a server: run `.ci/pg start` and source /tmp/acutoken-pg/env (see README, Testing)"
)]
fn without_the_environment_a_pg_test_fails_saying_what_to_do() {
    support_pg::Settings::from_lookup(|_| None);
}

#[test]
fn database_names_fit_postgres_and_keep_their_unique_tail() {
    let long =
        support_pg::database_name(&"Very-Long Hint ".repeat(10), 4_294_967_295, 4_294_967_295);
    assert!(long.len() <= 63, "{long} fits 63 bytes");
    assert!(long.ends_with("_4294967295_4294967295"), "{long}");
    assert!(long.starts_with("acutoken_t_very_long_hint_"), "{long}");
    assert!(
        long.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    );

    let odd = support_pg::database_name("Ünï\"; DROP", 7, 1);
    assert_eq!(odd, "acutoken_t__n____drop_7_1");
}

#[test]
fn database_urls_keep_the_server_and_its_parameters() {
    assert_eq!(
        support_pg::database_url("postgres://acutoken@127.0.0.1:5433/postgres", "x"),
        "postgres://acutoken@127.0.0.1:5433/x"
    );
    assert_eq!(
        support_pg::database_url(
            "postgres://acutoken@a:1,b:2/postgres?target_session_attrs=read-write",
            "x"
        ),
        "postgres://acutoken@a:1,b:2/x?target_session_attrs=read-write"
    );
    assert_eq!(
        support_pg::database_url("postgres://acutoken@127.0.0.1:5433", "x"),
        "postgres://acutoken@127.0.0.1:5433/x"
    );
}
