//! Where the store tests keep their store: a SQLite file in the test's
//! directory, or, with `ACUTOKEN_TEST_STORE=postgres`, a new database of its
//! own on the PostgreSQL server `.ci/pg` started (`ACUTOKEN_TEST_PG_ADMIN`,
//! `ACUTOKEN_TEST_PG`, `ACUTOKEN_TEST_PG_PASSWORD_FILE`). `.ci/run` runs the
//! store-level tests both ways.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::{PgTarget, PgTls, StoreTarget};
use crate::secret::Secret;

const MISSING: &str = "this test needs a PostgreSQL server: run `.ci/pg start` and source /tmp/acutoken-pg/env (see README, Testing)";

/// True when this run keeps its stores on PostgreSQL.
pub(crate) fn on_postgres() -> bool {
    std::env::var("ACUTOKEN_TEST_STORE").as_deref() == Ok("postgres")
}

/// A store location for one test: `dir/acutoken.db`, or a new database.
pub(crate) fn target(dir: &Path) -> StoreTarget {
    if !on_postgres() {
        return StoreTarget::File(dir.join("acutoken.db"));
    }
    postgres_target()
}

/// A new, empty database on the test server, whatever this run's engine:
/// for the tests of what goes between the two (`store copy`). Fails, saying
/// what to do, when no server was started.
pub(crate) fn postgres_target() -> StoreTarget {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let env = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| panic!("{MISSING} ({name} is not set)"))
    };
    let (admin, user_url, password_file) = (
        env("ACUTOKEN_TEST_PG_ADMIN"),
        env("ACUTOKEN_TEST_PG"),
        env("ACUTOKEN_TEST_PG_PASSWORD_FILE"),
    );
    let name = format!(
        "acutoken_u_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let _ = admin;
    admin_db()
        .execute_batch(&format!("CREATE DATABASE {name} OWNER acutoken"))
        .unwrap_or_else(|e| panic!("cannot create the test database {name}: {e}"));
    let base = user_url
        .rsplit_once('/')
        .map(|(server, _)| server.to_string())
        .unwrap_or_else(|| panic!("{MISSING} (ACUTOKEN_TEST_PG has no database part)"));
    let password = std::fs::read_to_string(&password_file)
        .unwrap_or_else(|e| panic!("{MISSING} ({password_file}: {e})"));
    StoreTarget::Postgres(PgTarget {
        url: format!("{base}/{name}?sslmode=disable"),
        display: format!("{}/{name}", base.trim_start_matches("postgres://")),
        tls: PgTls::Disable,
        password: Some(Secret::new(password.trim_end_matches('\n'))),
    })
}

/// A connection to the test server as its superuser, through the store's
/// own client (the tests run on async threads, where a client with a
/// runtime of its own may not wait).
pub(crate) fn admin() -> super::sql::Db {
    admin_db()
}

fn admin_db() -> super::sql::Db {
    let admin = std::env::var("ACUTOKEN_TEST_PG_ADMIN")
        .unwrap_or_else(|_| panic!("{MISSING} (ACUTOKEN_TEST_PG_ADMIN is not set)"));
    let server = PgTarget {
        url: format!("{admin}?sslmode=disable"),
        display: "the test server".into(),
        tls: PgTls::Disable,
        password: None,
    };
    super::postgres::connect(&server).unwrap_or_else(|e| panic!("{MISSING}: {e}"))
}

/// [`Store::open_target`] on a keyring of its own.
pub(crate) fn open(
    target: &StoreTarget,
    keyring: crate::crypto::Keyring,
    create: super::Create,
) -> Result<super::Store, super::StoreError> {
    super::Store::open_target(target, &super::SharedKeyring::new(keyring), create)
}
