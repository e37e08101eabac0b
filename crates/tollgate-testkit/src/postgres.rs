//! An ephemeral PostgreSQL server for one test: its own data directory in a temporary
//! directory, its own port on 127.0.0.1, torn down on drop. Never the machine's own server.
//!
//! PostgreSQL refuses to run as root. When this process is root, `initdb` and `postgres` run
//! as the `postgres` OS user (the child process switches user before it executes, through
//! `std::os::unix::process::CommandExt::uid`, so the pid we hold is the postmaster's own and
//! killing it by pid really stops the server), and the temporary directory is handed to it.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use thiserror::Error;

/// Environment variable naming the directory of `initdb` and `postgres`; looked at first.
pub const PG_BIN_DIR_ENV: &str = "TOLLGATE_PG_BIN_DIR";
/// How long a server may take to accept connections after it is started.
pub const PG_START_TIMEOUT_MS: u64 = 30_000;
/// How long a server may take to stop after SIGQUIT before it is killed.
pub const PG_STOP_TIMEOUT_MS: u64 = 10_000;
/// Attempts at starting on a free port (another test may take the port we picked).
pub const PG_START_ATTEMPTS_MAX: u32 = 3;
/// The database every server is created with.
pub const PG_DATABASE: &str = "tollgate";
/// The superuser that `initdb` creates; authentication is `trust` on loopback only.
pub const PG_USER: &str = "postgres";

#[derive(Debug, Error)]
pub enum PostgresError {
    #[error(
        "PostgreSQL binaries not found: set {PG_BIN_DIR_ENV} to the directory holding initdb \
         and postgres, put them on PATH, or install PostgreSQL (Debian: apt-get install postgresql)"
    )]
    BinariesNotFound,
    #[error("running as root, but the OS user {PG_USER:?} does not exist to run PostgreSQL")]
    NoPostgresUser,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {output}")]
    CommandFailed {
        command: String,
        status: String,
        output: String,
    },
    #[error("postgres did not accept connections within {PG_START_TIMEOUT_MS} ms; log:\n{log}")]
    StartTimeout { log: String },
    #[error("postgres exited while starting; log:\n{log}")]
    Exited { log: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PostgresError {
    let what = what.into();
    move |source| PostgresError::Io { what, source }
}

/// A running PostgreSQL server owned by this test.
#[derive(Debug)]
pub struct PostgresServer {
    bin_dir: PathBuf,
    dir: PathBuf,
    port: u16,
    user: Option<(u32, u32)>,
    child: Option<Child>,
}

impl PostgresServer {
    /// Starts a fresh server with an empty `tollgate` database. Fails loudly, never skips.
    pub fn start() -> Result<Self, PostgresError> {
        let bin_dir = find_bin_dir()?;
        let user = if running_as_root() {
            Some(postgres_user()?)
        } else {
            None
        };
        let dir = make_temp_dir(user)?;
        let mut server = PostgresServer {
            bin_dir,
            dir,
            port: 0,
            user,
            child: None,
        };
        server.initdb()?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            server.port = free_port()?;
            match server.launch() {
                Ok(()) => break,
                Err(error) if attempt < PG_START_ATTEMPTS_MAX => {
                    eprintln!("testkit: postgres start attempt {attempt} failed: {error}");
                }
                Err(error) => return Err(error),
            }
        }
        server.create_database(PG_DATABASE)?;
        Ok(server)
    }

    /// `postgres://postgres@127.0.0.1:PORT/tollgate`.
    pub fn url(&self) -> String {
        self.database_url(PG_DATABASE)
    }

    /// A URL for another database on this server (see [`PostgresServer::create_database`]).
    pub fn database_url(&self, database: &str) -> String {
        format!("postgres://{PG_USER}@127.0.0.1:{}/{database}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Creates another empty database on this server.
    pub fn create_database(&self, name: &str) -> Result<(), PostgresError> {
        let mut command = Command::new(self.bin_dir.join("createdb"));
        command
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                PG_USER,
            ])
            .arg(name);
        run(command, "createdb")
    }

    /// Kills the server with SIGKILL, as a crash would: the postmaster and every backend it
    /// forked (they share its process group). Returns once the port no longer accepts
    /// connections, so a test can rely on the server being gone.
    pub fn kill(&mut self) -> Result<(), PostgresError> {
        if let Some(mut child) = self.child.take() {
            crate::process::signal_group(child.id(), "KILL");
            child.kill().map_err(io("kill postgres"))?;
            child.wait().map_err(io("wait for postgres"))?;
            if !crate::process::wait_port_closed(
                self.port,
                Duration::from_millis(PG_STOP_TIMEOUT_MS),
            ) {
                return Err(io("kill postgres")(std::io::Error::other(format!(
                    "port {} still accepts connections after the kill",
                    self.port
                ))));
            }
        }
        Ok(())
    }

    /// Stops the server (immediate shutdown) and starts it again on the same port and data.
    pub fn restart(&mut self) -> Result<(), PostgresError> {
        self.stop()?;
        let deadline = Instant::now() + Duration::from_millis(PG_START_TIMEOUT_MS);
        loop {
            // After a kill, orphaned backends may hold the old shared memory for a moment.
            match self.launch() {
                Ok(()) => return Ok(()),
                Err(error) if Instant::now() >= deadline => return Err(error),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Stops the server with SIGQUIT (immediate shutdown), then SIGKILL if it lingers.
    pub fn stop(&mut self) -> Result<(), PostgresError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // std only sends SIGKILL; `kill -QUIT` lets the postmaster take its backends down too.
        let _ = Command::new("kill")
            .args(["-QUIT", &child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_millis(PG_STOP_TIMEOUT_MS);
        loop {
            match child.try_wait().map_err(io("wait for postgres"))? {
                Some(_) => return Ok(()),
                None if Instant::now() >= deadline => {
                    crate::process::signal_group(child.id(), "KILL");
                    child.kill().map_err(io("kill postgres"))?;
                    child.wait().map_err(io("wait for postgres"))?;
                    return Ok(());
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    fn as_postgres(&self, command: &mut Command) {
        if let Some((uid, gid)) = self.user {
            command.uid(uid).gid(gid);
        }
    }

    fn initdb(&self) -> Result<(), PostgresError> {
        let mut command = Command::new(self.bin_dir.join("initdb"));
        command
            .arg("-D")
            .arg(self.data_dir())
            .args(["-U", PG_USER, "-A", "trust", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync")
            .current_dir(&self.dir);
        self.as_postgres(&mut command);
        run(command, "initdb")
    }

    fn launch(&mut self) -> Result<(), PostgresError> {
        let log = fs::File::create(self.log_path()).map_err(io("create postgres.log"))?;
        let log_err = log.try_clone().map_err(io("clone postgres.log"))?;
        let mut command = Command::new(self.bin_dir.join("postgres"));
        command
            .arg("-D")
            .arg(self.data_dir())
            .arg("-k")
            .arg(&self.dir)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            // Speed over durability: a test's data dies with its directory anyway.
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=100"])
            .current_dir(&self.dir)
            // Its own process group, so a kill can take the backends down with the postmaster.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        self.as_postgres(&mut command);
        let child = command.spawn().map_err(io("spawn postgres"))?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), PostgresError> {
        let deadline = Instant::now() + Duration::from_millis(PG_START_TIMEOUT_MS);
        loop {
            if let Some(child) = self.child.as_mut() {
                if child.try_wait().map_err(io("poll postgres"))?.is_some() {
                    self.child = None;
                    return Err(PostgresError::Exited {
                        log: self.read_log(),
                    });
                }
            }
            let mut probe = Command::new(self.bin_dir.join("pg_isready"));
            probe
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", PG_USER, "-d", "postgres"]);
            let ready = probe.status().map_err(io("run pg_isready"))?.success();
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let log = self.read_log();
                self.kill()?;
                return Err(PostgresError::StartTimeout { log });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn read_log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = fs::File::open(self.log_path()) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            eprintln!("testkit: stopping postgres failed: {error}");
        }
        if let Err(error) = fs::remove_dir_all(&self.dir) {
            eprintln!("testkit: removing {} failed: {error}", self.dir.display());
        }
    }
}

fn run(mut command: Command, name: &str) -> Result<(), PostgresError> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("run {name}")))?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Err(PostgresError::CommandFailed {
        command: name.to_owned(),
        status: output.status.to_string(),
        output: text,
    })
}

fn has_server_binaries(dir: &Path) -> bool {
    ["initdb", "postgres", "pg_isready", "createdb"]
        .iter()
        .all(|name| dir.join(name).is_file())
}

/// `dir` if it holds every binary; else, when `dir/initdb` is a link (Debian links `initdb`
/// and `postgres` into PATH but keeps `pg_isready` and `createdb` in the versioned directory),
/// the directory it points into.
fn complete_bin_dir(dir: &Path) -> Option<PathBuf> {
    if has_server_binaries(dir) {
        return Some(dir.to_path_buf());
    }
    let target = fs::canonicalize(dir.join("initdb")).ok()?;
    let parent = target.parent()?;
    has_server_binaries(parent).then(|| parent.to_path_buf())
}

/// `TOLLGATE_PG_BIN_DIR`, then the directory of `initdb` on PATH, then the newest
/// `/usr/lib/postgresql/*/bin`.
fn find_bin_dir() -> Result<PathBuf, PostgresError> {
    if let Some(dir) = std::env::var_os(PG_BIN_DIR_ENV) {
        return complete_bin_dir(Path::new(&dir)).ok_or(PostgresError::BinariesNotFound);
    }
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(dir) = std::env::split_paths(&path).find_map(|dir| complete_bin_dir(&dir)) {
            return Ok(dir);
        }
    }
    let mut versioned: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_server_binaries(dir))
        .collect();
    versioned.sort();
    versioned
        .pop()
        .map(|(_, dir)| dir)
        .ok_or(PostgresError::BinariesNotFound)
}

/// `/proc/self` belongs to the process's effective user.
fn running_as_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0)
}

/// The uid and gid of the `postgres` OS user, from `/etc/passwd`.
fn postgres_user() -> Result<(u32, u32), PostgresError> {
    let passwd = fs::read_to_string("/etc/passwd").map_err(io("read /etc/passwd"))?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.first() != Some(&PG_USER) || fields.len() < 4 {
                return None;
            }
            Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
        })
        .ok_or(PostgresError::NoPostgresUser)
}

fn make_temp_dir(owner: Option<(u32, u32)>) -> Result<PathBuf, PostgresError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = format!(
        "tollgate-pg-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let dir = std::env::temp_dir().join(name);
    fs::create_dir(&dir).map_err(io(format!("create {}", dir.display())))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
            .map_err(io(format!("chown {}", dir.display())))?;
    }
    // A marker that says what this directory is, for whoever finds one left by a crash.
    let mut readme = fs::File::create(dir.join("README")).map_err(io("create README"))?;
    let _ = writeln!(
        readme,
        "ephemeral PostgreSQL of a tollgate test; safe to delete"
    );
    if let Some((uid, gid)) = owner {
        let _ = std::os::unix::fs::chown(dir.join("README"), Some(uid), Some(gid));
    }
    Ok(dir)
}

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> Result<u16, PostgresError> {
    crate::process::free_port().map_err(|error| match error {
        crate::TestkitError::Io(source) => io("bind 127.0.0.1:0")(source),
        other => io("bind 127.0.0.1:0")(std::io::Error::other(other.to_string())),
    })
}

/// Whether something accepts TCP connections on 127.0.0.1:`port` (for fault tests).
pub fn accepts_connections(port: u16) -> bool {
    crate::process::port_open(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_accepts_restarts_and_cleans_up() {
        let mut server = PostgresServer::start().expect("start postgres");
        assert_ne!(server.port(), 5432, "never the machine's own server");
        assert!(server.url().starts_with("postgres://postgres@127.0.0.1:"));
        assert!(accepts_connections(server.port()));
        server.kill().expect("kill");
        assert!(!accepts_connections(server.port()));
        server.restart().expect("restart");
        assert!(accepts_connections(server.port()));
        server.create_database("second").expect("create database");
        let dir = server.dir.clone();
        drop(server);
        assert!(!dir.exists(), "the temporary directory is removed");
    }

    #[test]
    fn a_wrong_binary_directory_fails_loudly() {
        assert!(!has_server_binaries(Path::new("/nonexistent")));
        assert_eq!(complete_bin_dir(Path::new("/nonexistent")), None);
        let message = PostgresError::BinariesNotFound.to_string();
        assert!(message.contains(PG_BIN_DIR_ENV), "{message}");
    }
}
