//! What every ephemeral server needs: finding its binary, a free port, waiting for readiness.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a server may take to accept connections after it is spawned.
pub const READY_TIMEOUT_MS: u64 = 15_000;
/// How often readiness is polled.
pub const READY_POLL_MS: u64 = 20;

#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    #[error("{binary} not found ({hint})")]
    BinaryMissing { binary: String, hint: String },
    #[error("could not start {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} did not become ready within {timeout_ms} ms; its log:\n{log}")]
    NotReady {
        what: String,
        timeout_ms: u64,
        log: String,
    },
    #[error("{what} failed: {detail}")]
    Failed { what: String, detail: String },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Finds `name` in the directory named by the environment variable `env_dir` (when set), then
/// on `PATH`, then in `fallback_dirs`.
pub fn find_binary(
    name: &str,
    env_dir: Option<&str>,
    fallback_dirs: &[PathBuf],
    hint: &str,
) -> Result<PathBuf, TestkitError> {
    let from_env = env_dir
        .and_then(std::env::var_os)
        .map(PathBuf::from)
        .map(|dir| dir.join(name));
    let on_path = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let fallbacks = fallback_dirs.iter().map(|dir| dir.join(name));
    from_env
        .into_iter()
        .chain(on_path)
        .chain(fallbacks)
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| TestkitError::BinaryMissing {
            binary: name.to_string(),
            hint: hint.to_string(),
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A port that was free a moment ago. Servers that fail to bind it are retried on another.
pub fn free_port() -> Result<u16, TestkitError> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Polls `ready` until it answers true, the process exits, or the timeout passes.
pub fn wait_until(
    what: &str,
    mut ready: impl FnMut() -> bool,
    mut exited: impl FnMut() -> bool,
    log: impl Fn() -> String,
) -> Result<(), TestkitError> {
    let deadline = Instant::now() + Duration::from_millis(READY_TIMEOUT_MS);
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        if exited() {
            break;
        }
        std::thread::sleep(Duration::from_millis(READY_POLL_MS));
    }
    Err(TestkitError::NotReady {
        what: what.to_string(),
        timeout_ms: READY_TIMEOUT_MS,
        log: log(),
    })
}

/// Sends `signal` (a name such as `KILL`) to the process group led by `leader`, a process this
/// test spawned with `process_group(0)`: the server and every child it forked.
pub fn signal_group(leader: u32, signal: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(format!("-{leader}"))
        .stderr(std::process::Stdio::null())
        .status();
}

/// Polls until nothing accepts connections on `port` or `timeout` passes; whether it closed.
pub fn wait_port_closed(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !port_open(port) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(READY_POLL_MS));
    }
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

/// The last `bytes` of a log file, for error messages.
pub fn log_tail(path: &Path, bytes: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(bytes);
    text.get(start..).unwrap_or(&text).to_string()
}
