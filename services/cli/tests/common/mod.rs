//! A real `tollgate-authority dev` node per test (free ports, a temporary data directory, killed
//! by its own pid when the guard drops) and a runner for the built `tollgate` binary.

#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tollgate_testkit::process::{find_binary, free_port, log_tail, port_open, wait_until};

pub const KEY: &str = "cli-test-key";
/// Attempts at finding ports that stay free until the node binds them.
const START_ATTEMPTS_MAX: u32 = 5;
/// How many times a test polls for the background loop to reconcile (100 ms apart).
pub const RECONCILE_POLLS_MAX: u32 = 300;

/// A binary of the workspace built beside the `tollgate` binary under test.
pub fn sibling_binary(name: &str) -> PathBuf {
    let tollgate = PathBuf::from(env!("CARGO_BIN_EXE_tollgate"));
    let beside = tollgate.with_file_name(name);
    assert!(
        beside.is_file(),
        "{} not found: build the workspace first (cargo test --workspace builds it)",
        beside.display()
    );
    beside
}

/// `tollgate-authority`, built by the workspace: beside the `tollgate` binary under test, or in
/// `TOLLGATE_AUTHORITY_BIN_DIR`.
pub fn authority_binary() -> PathBuf {
    let tollgate = PathBuf::from(env!("CARGO_BIN_EXE_tollgate"));
    let beside = tollgate.with_file_name("tollgate-authority");
    if beside.is_file() {
        return beside;
    }
    find_binary(
        "tollgate-authority",
        Some("TOLLGATE_AUTHORITY_BIN_DIR"),
        &[],
        "build it first: cargo build -p tollgate-authority-service (cargo test --workspace does)",
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The embedded single node, owned by one test.
pub struct DevNode {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl DevNode {
    pub fn start() -> DevNode {
        let binary = authority_binary();
        let dir = tempfile::tempdir().unwrap();
        let mut attempt = 1;
        loop {
            let port = free_port().unwrap();
            let http_port = free_port().unwrap();
            let log = std::fs::File::create(dir.path().join("node.log")).unwrap();
            let child = Command::new(&binary)
                .arg("dev")
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--http-listen")
                .arg(format!("127.0.0.1:{http_port}"))
                .arg("--data")
                .arg(dir.path().join("data"))
                .env("TOLLGATE_DEV_API_KEY", KEY)
                .stdout(Stdio::from(log.try_clone().unwrap()))
                .stderr(Stdio::from(log))
                .process_group(0)
                .spawn()
                .unwrap();
            let log_path = dir.path().join("node.log");
            let mut child = child;
            let ready = wait_until(
                "tollgate-authority dev",
                || port_open(port),
                || matches!(child.try_wait(), Ok(Some(_))),
                || log_tail(&log_path, 4000),
            );
            match ready {
                Ok(()) => return DevNode { child, port, dir },
                // Another process may have taken a port between the probe and the bind.
                Err(_) if attempt < START_ATTEMPTS_MAX => {
                    let _ = child.kill();
                    let _ = child.wait();
                    attempt += 1;
                }
                Err(error) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{error}")
                }
            }
        }
    }

    /// The node's data directory (its SQLite ledger and state).
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Runs `tollgate` against this node with the right key.
    pub fn tollgate(&self, args: &[&str]) -> Run {
        tollgate(&self.endpoint(), KEY, args)
    }
}

impl Drop for DevNode {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What one run of the CLI did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(self) -> Run {
        assert_eq!(self.code, 0, "tollgate failed: {self:?}");
        self
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
}

/// The CLI without any TOLLGATE_* variables from the environment running the tests.
pub fn command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    for name in [
        "TOLLGATE_ENDPOINT",
        "TOLLGATE_EDGE_ENDPOINT",
        "TOLLGATE_API_KEY",
    ] {
        command.env_remove(name);
    }
    command
}

pub fn tollgate(endpoint: &str, key: &str, args: &[&str]) -> Run {
    let output = command()
        .arg("--endpoint")
        .arg(endpoint)
        .arg("--api-key")
        .arg(key)
        .arg("--timeout")
        .arg("20s")
        .args(args)
        .output()
        .unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Polls the ledger's balance (`ledger_balance`, its sum of open grants less debt) until it is
/// `want` (the background loop reconciled); bounded, and returns the last balance read whatever
/// it is.
pub fn wait_for_balance(node: &DevNode, account: &str, want: &str) -> String {
    let mut balance = String::new();
    for _ in 0..RECONCILE_POLLS_MAX {
        let run = node.tollgate(&["--json", "balance", account]).ok();
        balance = run.json()["ledger_balance"].as_str().unwrap().to_string();
        if balance == want {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    balance
}

/// Sets up an account `acme` with feature `chat` at 0.5 credits per message and a 10-credit
/// promo grant `welcome`.
pub fn seed(node: &DevNode) {
    node.tollgate(&["accounts", "create", "acme"]).ok();
    node.tollgate(&["features", "define", "chat", "--unit", "message"])
        .ok();
    let prices = node.dir.path().join("prices.toml");
    std::fs::write(
        &prices,
        "version = 1\neffective_from = \"2020-01-01T00:00:00Z\"\n[default_rates]\nchat = \"0.5\"\n",
    )
    .unwrap();
    node.tollgate(&["prices", "publish", prices.to_str().unwrap()])
        .ok();
    node.tollgate(&[
        "grants",
        "issue",
        "acme",
        "--amount",
        "10",
        "--source",
        "promo",
        "--grant-id",
        "welcome",
    ])
    .ok();
}
