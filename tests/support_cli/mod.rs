//! Running the real `acutoken` binary in a private temp dir, and reading what it left.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use acutoken::crypto::{Key, KeySource, Keyring};
use acutoken::store::{Create, Store};
use serde_json::Value;

/// Variables that would make a test read something outside its temp dir.
const FOREIGN_ENV: &[&str] = &[
    "ACUTOKEN_KEY",
    "ACUTOKEN_CONFIG",
    "CREDENTIALS_DIRECTORY",
    "STATE_DIRECTORY",
    "RUNTIME_DIRECTORY",
    "CONFIGURATION_DIRECTORY",
    "NOTIFY_SOCKET",
];

/// What the binary is given on stdin: always explicit, never the test runner's.
#[derive(Clone, Copy)]
pub enum Input<'a> {
    /// `/dev/null`: not a terminal, and empty.
    Null,
    /// These bytes, then end of file.
    Text(&'a str),
}

/// One finished run of the binary.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// Asserts exit 0 and returns self for chaining.
    #[track_caller]
    pub fn ok(&self) -> &Out {
        assert_eq!(self.code, 0, "expected success, got {self:#?}");
        self
    }

    /// Asserts a non-zero exit and that stderr is exactly one line, starting
    /// `error:`. Returns that line.
    #[track_caller]
    pub fn one_error(&self) -> &str {
        self.error_with_lines(0)
    }

    /// Like [`Out::one_error`], allowing `extra` further stderr lines.
    #[track_caller]
    pub fn error_with_lines(&self, extra: usize) -> &str {
        assert_ne!(self.code, 0, "expected failure, got {self:#?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        let errors: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.starts_with("error:"))
            .collect();
        assert_eq!(errors.len(), 1, "expected one `error:` line, got {self:#?}");
        assert_eq!(
            lines.len(),
            1 + extra,
            "expected {} stderr line(s), got {self:#?}",
            1 + extra
        );
        errors[0]
    }

    /// Parses stdout as JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }

    /// Everything the run printed, to search for secrets.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// A private world for one test: a temp dir and a store path inside it.
pub struct World {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
}

impl World {
    /// A world whose store lives in `<tmp>/state/acutoken.db` (directory not yet made).
    pub fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("state").join("acutoken.db");
        World { dir, store }
    }

    /// The temp dir.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The key file a first `add` creates beside the store.
    pub fn key_path(&self) -> PathBuf {
        self.store.with_file_name("acutoken.key")
    }

    /// Runs `acutoken ARGS` with `stdin`, the store path set and foreign variables removed.
    pub fn run(&self, args: &[&str], stdin: Input<'_>) -> Out {
        self.run_with(args, stdin, &[])
    }

    /// `acutoken ARGS` ready to run or spawn: in the temp dir, output piped,
    /// the store path set and foreign variables removed.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_acutoken"));
        cmd.args(args)
            .current_dir(self.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, _) in std::env::vars_os() {
            let upper = name.to_string_lossy().to_ascii_uppercase();
            if upper.starts_with("ACUTOKEN") {
                cmd.env_remove(&name);
            }
        }
        for name in FOREIGN_ENV {
            cmd.env_remove(name);
        }
        cmd.env("ACUTOKEN__STORE__PATH", &self.store);
        cmd
    }

    /// Like [`World::run`], with extra variables for this run only.
    pub fn run_with(&self, args: &[&str], stdin: Input<'_>, extra: &[(&str, &str)]) -> Out {
        let mut cmd = self.command(args);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let output = match stdin {
            Input::Null => cmd.stdin(Stdio::null()).output().unwrap(),
            Input::Text(text) => {
                cmd.stdin(Stdio::piped());
                let mut child = cmd.spawn().unwrap();
                let mut pipe = child.stdin.take().unwrap();
                // A command that fails before reading stdin closes the pipe; that is fine.
                let _ = pipe.write_all(text.as_bytes());
                drop(pipe);
                child.wait_with_output().unwrap()
            }
        };
        Out {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// `connection add NAME --instance INSTANCE --client-id ID EXTRA...` with `secret` on stdin.
    pub fn add(
        &self,
        name: &str,
        instance: &str,
        client_id: &str,
        extra: &[&str],
        secret: &str,
    ) -> Out {
        let mut args = vec![
            "connection",
            "add",
            name,
            "--instance",
            instance,
            "--client-id",
            client_id,
        ];
        args.extend_from_slice(extra);
        self.run(&args, Input::Text(secret))
    }

    /// `connection show NAME --json`, which must succeed.
    #[track_caller]
    pub fn show(&self, name: &str) -> Value {
        self.run(&["connection", "show", name, "--json"], Input::Null)
            .ok()
            .json()
    }

    /// `connection list --json`, which must succeed.
    #[track_caller]
    pub fn list(&self) -> Vec<Value> {
        match self
            .run(&["connection", "list", "--json"], Input::Null)
            .ok()
            .json()
        {
            Value::Array(v) => v,
            other => panic!("list --json is not an array: {other}"),
        }
    }

    /// Writes `text` to `<tmp>/name` with `mode`; returns the path.
    pub fn write_file(&self, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = self.path().join(name);
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    /// Every file in the store's directory with its bytes (`None` when the
    /// directory does not exist), to prove a failed command wrote nothing.
    pub fn snapshot(&self) -> Option<BTreeMap<String, Vec<u8>>> {
        let dir = self.store.parent().unwrap();
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => panic!("cannot read {}: {e}", dir.display()),
        };
        Some(
            entries
                .map(|e| {
                    let e = e.unwrap();
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        fs::read(e.path()).unwrap(),
                    )
                })
                .collect(),
        )
    }

    /// The key beside the store, as the library reads it.
    pub fn key(&self) -> Key {
        key_from(&self.key_path())
    }

    /// Opens the store through the library with `primary` (and `previous`) keys.
    pub fn open(&self, primary: Key, previous: Vec<Key>) -> Store {
        Store::open(&self.store, Keyring::new(primary, previous), Create::No).unwrap()
    }
}

/// Reads a key file as the library does.
pub fn key_from(path: &Path) -> Key {
    Key::from_file(path, KeySource::File(path.to_path_buf())).unwrap()
}

/// The permission bits of a path.
pub fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Asserts `value` is an RFC 3339 time in UTC (`Z`), as DESIGN §2 requires.
#[track_caller]
pub fn assert_rfc3339_utc(value: &Value) -> chrono::DateTime<chrono::Utc> {
    let s = value
        .as_str()
        .unwrap_or_else(|| panic!("{value} is not a string"));
    assert!(s.ends_with('Z'), "{s} is not in UTC with a Z");
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("{s} is not RFC 3339: {e}"))
        .with_timezone(&chrono::Utc)
}

/// The exact connection fields of DESIGN §2 (secrets excluded).
pub const CONNECTION_FIELDS: &[&str] = &[
    "id",
    "name",
    "instance",
    "client_id",
    "labels",
    "mode",
    "lifetime",
    "absolute_lifetime",
    "secret_expires_at",
    "grant_issued_at",
    "refresh_token_issued_at",
    "access_expires_at",
    "deadline",
    "deadline_source",
    "next_refresh_at",
    "last_refresh_at",
    "last_error",
    "state",
];

/// Fields of DESIGN §2 that hold times.
pub const TIME_FIELDS: &[&str] = &[
    "secret_expires_at",
    "grant_issued_at",
    "refresh_token_issued_at",
    "access_expires_at",
    "deadline",
    "next_refresh_at",
    "last_refresh_at",
];

/// Asserts a connection object has exactly the DESIGN §2 fields, times in
/// RFC 3339 UTC or `null`, and `labels` an object of strings.
#[track_caller]
pub fn assert_connection_shape(v: &Value) {
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"));
    let mut got: Vec<&str> = obj.keys().map(String::as_str).collect();
    got.sort_unstable();
    let mut want = CONNECTION_FIELDS.to_vec();
    want.sort_unstable();
    assert_eq!(got, want, "field names differ from DESIGN §2");
    for f in TIME_FIELDS {
        if !obj[*f].is_null() {
            assert_rfc3339_utc(&obj[*f]);
        }
    }
    let labels = obj["labels"]
        .as_object()
        .unwrap_or_else(|| panic!("labels is not an object: {v}"));
    assert!(labels.values().all(Value::is_string), "labels: {v}");
    uuid::Uuid::parse_str(obj["id"].as_str().unwrap()).unwrap();
}

/// Parses a humantime duration printed in JSON.
#[track_caller]
pub fn duration_of(v: &Value) -> std::time::Duration {
    humantime::parse_duration(v.as_str().unwrap_or_else(|| panic!("{v} is not a string")))
        .unwrap_or_else(|e| panic!("{v} is not a humantime duration: {e}"))
}
