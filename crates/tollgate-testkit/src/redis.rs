//! An ephemeral redis-server with append-only persistence, in a temporary directory.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::process::{
    find_binary, free_port, log_tail, wait_until, TestkitError, READY_TIMEOUT_MS,
};

/// Attempts at finding a port that stays free until redis-server binds it.
const START_ATTEMPTS_MAX: u32 = 5;

/// When the append-only file is synced to disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// Before a write is acknowledged: nothing acknowledged is lost to a crash.
    Always,
    /// Once a second: up to a second of writes may be lost; the disk is off the hot path.
    EverySecond,
}

/// A redis-server owned by a test. Killed (by its own process id) when dropped.
pub struct RedisServer {
    binary: PathBuf,
    appendfsync: &'static str,
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts redis-server 7 with AOF on (`appendfsync always`, so an acknowledged write
    /// survives a kill -9, as production's config asks).
    pub fn start() -> Result<RedisServer, TestkitError> {
        RedisServer::start_with_fsync(Fsync::Always)
    }

    /// Starts redis-server with the given AOF fsync policy (benchmarks compare both).
    pub fn start_with_fsync(fsync: Fsync) -> Result<RedisServer, TestkitError> {
        let binary = find_binary(
            "redis-server",
            Some("TOLLGATE_REDIS_BIN_DIR"),
            &[],
            "install Debian's redis-server package, or run tests/run which installs it",
        )?;
        let dir = tempfile::Builder::new()
            .prefix("tollgate-redis-")
            .tempdir()?;
        let appendfsync = match fsync {
            Fsync::Always => "always",
            Fsync::EverySecond => "everysec",
        };
        let mut server = RedisServer {
            binary,
            appendfsync,
            dir,
            port: free_port()?,
            child: None,
        };
        let mut attempt = 1;
        loop {
            match server.spawn() {
                Ok(()) => return Ok(server),
                // Another process may have taken the port between the probe and the bind.
                Err(_) if attempt < START_ATTEMPTS_MAX => {
                    server.stop();
                    server.port = free_port()?;
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn spawn(&mut self) -> Result<(), TestkitError> {
        let port = self.port.to_string();
        let dir = self.dir.path().to_string_lossy().to_string();
        let log = self.log_path().to_string_lossy().to_string();
        let child = Command::new(&self.binary)
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--dir",
                &dir,
                "--logfile",
                &log,
            ])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                self.appendfsync,
                "--save",
                "",
            ])
            .args(["--daemonize", "no", "--protected-mode", "yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so a kill also ends a forked AOF rewrite or save.
            .process_group(0)
            .spawn()
            .map_err(|source| TestkitError::Spawn {
                what: "redis-server".into(),
                source,
            })?;
        self.child = Some(child);
        let port = self.port;
        let log_path = self.log_path();
        let mut child = self.child.take();
        let result = wait_until(
            "redis-server",
            || ping(port),
            || {
                child
                    .as_mut()
                    .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
            },
            || log_tail(&log_path, 4_000),
        );
        self.child = child;
        result
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The process id, for tests that signal it themselves.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server with SIGKILL, as a crash would, and waits for it to go.
    pub fn kill(&mut self) {
        self.stop();
    }

    /// Starts the server again on the same port and directory; the AOF brings the data back.
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        self.stop();
        self.spawn()
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::process::signal_group(child.id(), "KILL");
            let _ = child.kill();
            let _ = child.wait();
            let _ = crate::process::wait_port_closed(
                self.port,
                Duration::from_millis(READY_TIMEOUT_MS),
            );
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut stream) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0_u8; 16];
    matches!(stream.read(&mut reply), Ok(n) if reply[..n].starts_with(b"+PONG"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_and_survives_a_restart() {
        let mut server = RedisServer::start().expect("redis-server starts");
        assert!(ping(server.port()));
        let port = server.port();
        server.kill();
        assert!(!ping(port), "killed");
        server.restart().expect("restarts");
        assert!(ping(port));
    }
}
