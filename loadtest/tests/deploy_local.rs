//! deploy/local end to end: `up` in a fresh data directory (PostgreSQL, two regions of one
//! redis-server and two edges each, the authority), a short multi-region scenario of the load
//! tool against both regions with the audit of the ledger, then `down --purge`, after which no
//! process it started is left. The binaries are this build's (target/debug).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Longest each step may take before the test gives up on it.
const STEP_TIMEOUT_S: u64 = 90;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("loadtest/ has a parent")
        .to_path_buf()
}

/// target/debug (or wherever this test's profile put the binaries): the test executable lives
/// in its `deps/` directory.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable is in target/<profile>/deps")
        .to_path_buf();
    for binary in ["tollgate-authority", "tollgate-edge"] {
        assert!(
            dir.join(binary).is_file(),
            "{} is missing: build the workspace's binaries first (cargo build --workspace, or cargo test --workspace)",
            dir.join(binary).display()
        );
    }
    dir
}

/// Runs `command` to its end, killing it (by its own pid) after `STEP_TIMEOUT_S`.
fn run_bounded(mut command: Command, what: &str) -> Output {
    let mut child: Child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    // Read both pipes on threads so a chatty child never blocks on a full pipe.
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let read = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let out = read(Box::new(stdout));
    let err = read(Box::new(stderr));
    let deadline = Instant::now() + Duration::from_secs(STEP_TIMEOUT_S);
    let status = loop {
        if let Some(status) = child.try_wait().expect("polling the child") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {STEP_TIMEOUT_S} s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

fn show(output: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Stops the topology if the test fails half way (down stops only what up recorded).
struct Down(PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        if self.0.join("state.json").exists() {
            let mut command = Command::new(repo().join("deploy/local/down"));
            command.arg("--dir").arg(&self.0).arg("--purge");
            let _ = run_bounded(command, "deploy/local/down (cleanup)");
        }
    }
}

fn cmdline(pid: u64) -> Option<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .map(|bytes| String::from_utf8_lossy(&bytes).replace('\0', " "))
        .filter(|line| !line.is_empty())
}

#[test]
fn up_load_both_regions_audit_and_down_leaves_nothing_behind() {
    let temp = tempfile::tempdir().expect("a temporary directory");
    let dir = temp.path().join("local");
    let guard = Down(dir.clone());

    let mut up = Command::new(repo().join("deploy/local/up"));
    up.arg("--dir").arg(&dir).arg("--bin-dir").arg(bin_dir());
    let output = run_bounded(up, "deploy/local/up");
    assert!(output.status.success(), "up failed: {}", show(&output));
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(printed.contains("API key"), "up prints the key: {printed}");

    let state_path = dir.join("state.json");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).expect("the state file"))
            .expect("the state file is JSON");
    let processes: Vec<(String, u64, String)> = state["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["pid"].as_u64().unwrap_or_default(),
                p["match"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        processes.len(),
        8,
        "postgres, two redis-servers, the authority, four edges: {processes:?}"
    );
    for (name, pid, matched) in &processes {
        let line = cmdline(*pid).unwrap_or_default();
        assert!(
            line.contains(matched.as_str()),
            "{name} (pid {pid}) runs: {line:?}"
        );
    }
    assert_eq!(state["regions"].as_array().map(Vec::len), Some(2));

    let report = temp.path().join("report.json");
    let chart = temp.path().join("chart.svg");
    let mut load = Command::new(env!("CARGO_BIN_EXE_tollgate-loadtest"));
    load.args(["run", "--scenario", "multi-region", "--state"])
        .arg(&state_path)
        // Small grants, so both regions run accounts dry and the audit checks the bound: the
        // first region to ask gets an allocation of 10 credits (the allocator's minimum), the
        // other the 5 left, and each sees about 37 requests per account at 0.5 credits.
        .args(["--rate", "100", "--duration", "3s", "--accounts", "4"])
        .args(["--grant", "15", "--price", "0.5", "--replay-percent", "5"])
        .args(["--audit-wait", "40s", "--report"])
        .arg(&report)
        .arg("--chart")
        .arg(&chart);
    let output = run_bounded(load, "tollgate-loadtest run");
    assert!(
        output.status.success(),
        "the run or its audit failed: {}",
        show(&output)
    );
    let verdict: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("the report"))
            .expect("the report is JSON");
    assert_eq!(verdict["audit"]["passed"], true, "{}", show(&output));
    let regions = verdict["figures"]["regions"].as_array().expect("regions");
    assert_eq!(regions.len(), 2);
    for region in regions {
        assert!(
            region["ok"].as_u64().unwrap_or(0) > 0,
            "region {} allowed some debits: {}",
            region["region"],
            show(&output)
        );
    }
    let svg = std::fs::read_to_string(&chart).expect("the chart");
    assert!(svg.starts_with("<svg") && svg.contains("<polyline"));

    let mut down = Command::new(repo().join("deploy/local/down"));
    down.arg("--dir").arg(&dir).arg("--purge");
    let output = run_bounded(down, "deploy/local/down");
    assert!(output.status.success(), "down failed: {}", show(&output));
    for (name, pid, matched) in &processes {
        let left = cmdline(*pid).filter(|line| line.contains(matched.as_str()));
        assert!(
            left.is_none(),
            "{name} (pid {pid}) is still running: {left:?}"
        );
    }
    assert!(!dir.exists(), "--purge deleted the data directory");
    drop(guard);
}
