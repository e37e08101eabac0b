//! The production files under `deploy/` checked against what the binaries accept (no Docker
//! engine or cluster runs here): every YAML file parses; the TOML configs embedded in ConfigMaps,
//! Compose and next to the systemd units load with the real config loaders of the edge and the
//! authority; probe, Service and container ports agree with the listen addresses in those
//! configs; every command line and ExecStart is accepted by the real binary; and redis.conf is
//! loaded by a real redis-server.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::Deserialize;
use serde_yaml::Value;
use tollgate_testkit::process::{find_binary, free_port, log_tail, port_open, wait_until};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| {
            Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
        })
        .filter(|value| !value.is_null())
        .collect()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("expected a scalar, found {other:?}"),
    }
}

fn port(value: &Value) -> u16 {
    text(value)
        .parse()
        .unwrap_or_else(|_| panic!("not a port: {value:?}"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|items| items.iter().map(text).collect())
        .unwrap_or_default()
}

/// An edge config file's text through the edge's own loader and validation.
fn edge_config(text: &str) -> tollgate_edge_node::config::Config {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, text).unwrap();
    tollgate_edge_node::config::RawConfig::load(Some(&path), |_| None)
        .and_then(|raw| raw.validate())
        .unwrap_or_else(|e| panic!("the edge rejects its config: {e}\n{text}"))
}

/// An authority config file's text through the authority's own loader and validation.
fn authority_config(text: &str) -> tollgate_authority_service::config::Config {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("authority.toml");
    std::fs::write(&path, text).unwrap();
    tollgate_authority_service::config::RawConfig::load(Some(&path))
        .and_then(|raw| raw.validate_with(None, None, &[], &|_| Some("webhook-secret".to_owned())))
        .unwrap_or_else(|e| panic!("the authority rejects its config: {e}\n{text}"))
}

/// Runs the real binary with `argv` (its own name first) and `--help` appended: clap parses the
/// arguments before it, so an unknown flag or subcommand fails instead of printing help.
fn assert_binary_accepts(argv: &[String]) {
    let name = Path::new(&argv[0])
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let binary = match name.as_str() {
        "tollgate-authority" => common::authority_binary(),
        "tollgate-edge" => common::sibling_binary("tollgate-edge"),
        other => panic!("unexpected binary {other}"),
    };
    let output = Command::new(binary)
        .args(&argv[1..])
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{name} rejects {argv:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The value after `--config` in a command line.
fn config_path(argv: &[String]) -> String {
    let index = argv
        .iter()
        .position(|a| a == "--config")
        .unwrap_or_else(|| panic!("no --config in {argv:?}"));
    argv.get(index + 1)
        .unwrap_or_else(|| panic!("--config without a value in {argv:?}"))
        .clone()
}

enum Role {
    Edge(Box<tollgate_edge_node::config::Config>),
    Authority(Box<tollgate_authority_service::config::Config>),
}

fn load_role(argv: &[String], toml_text: &str) -> Role {
    if argv[0].ends_with("tollgate-edge") {
        Role::Edge(Box::new(edge_config(toml_text)))
    } else if argv[0].ends_with("tollgate-authority") {
        assert_eq!(argv.get(1).map(String::as_str), Some("serve"), "{argv:?}");
        Role::Authority(Box::new(authority_config(toml_text)))
    } else {
        panic!("unexpected command {argv:?}")
    }
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    let Some(selector) = selector.as_mapping() else {
        return false;
    };
    !selector.is_empty()
        && selector
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
}

#[test]
fn kubernetes_manifests_agree_with_the_binaries_and_their_configs() {
    let dir = deploy_dir().join("kubernetes");
    let kustomization = yaml_documents(&dir.join("kustomization.yaml"));
    let listed: BTreeSet<PathBuf> = strings(&kustomization[0]["resources"])
        .iter()
        .map(|r| dir.join(r))
        .collect();
    let mut documents = Vec::new();
    for file in yaml_files(&dir) {
        if file.ends_with("kustomization.yaml") {
            continue;
        }
        assert!(
            listed.contains(&file),
            "{} is not in kustomization.yaml",
            file.display()
        );
        documents.extend(yaml_documents(&file));
    }
    for file in &listed {
        assert!(
            file.is_file(),
            "kustomization.yaml lists missing {}",
            file.display()
        );
    }
    let of_kind = |kind: &str| -> Vec<&Value> {
        documents
            .iter()
            .filter(|d| d["kind"].as_str() == Some(kind))
            .collect()
    };
    let config_maps: BTreeMap<String, &Value> = of_kind("ConfigMap")
        .into_iter()
        .map(|c| (text(&c["metadata"]["name"]), c))
        .collect();

    let mut edge_regions = BTreeMap::new();
    let mut authority_regions = Vec::new();
    let mut edges = Vec::new();
    let deployments = of_kind("Deployment");
    assert!(!deployments.is_empty());
    for deployment in &deployments {
        let name = text(&deployment["metadata"]["name"]);
        let pod = &deployment["spec"]["template"];
        assert!(
            labels_match(
                &deployment["spec"]["selector"]["matchLabels"],
                &pod["metadata"]["labels"]
            ),
            "{name}: selector does not match its pods"
        );
        let volumes: BTreeMap<String, String> = pod["spec"]["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter(|v| !v["configMap"].is_null())
            .map(|v| (text(&v["name"]), text(&v["configMap"]["name"])))
            .collect();
        for container in pod["spec"]["containers"].as_sequence().unwrap() {
            let mut argv = strings(&container["command"]);
            argv.extend(strings(&container["args"]));
            assert_binary_accepts(&argv);
            let config = config_path(&argv);
            let (directory, file) = config.rsplit_once('/').unwrap();
            let mount = container["volumeMounts"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|m| text(&m["mountPath"]) == directory)
                .unwrap_or_else(|| panic!("{name}: nothing mounted at {directory}"));
            let map = &volumes[&text(&mount["name"])];
            let toml_text = config_maps[map]["data"][file]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: ConfigMap {map} has no {file}"));
            let ports: BTreeMap<String, u16> = container["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|p| (text(&p["name"]), port(&p["containerPort"])))
                .collect();
            let grpc = match load_role(&argv, toml_text) {
                Role::Edge(config) => {
                    assert_eq!(ports["metrics"], config.http_listen.port(), "{name}");
                    let region = config.settings.region.to_string();
                    assert_eq!(
                        text(&pod["metadata"]["labels"]["tollgate.dev/region"]),
                        region,
                        "{name}: region label and config disagree"
                    );
                    edge_regions.insert(
                        region,
                        (config.redis_url.clone(), config.key_prefix.clone()),
                    );
                    edges.push((*deployment).clone());
                    config.listen.port()
                }
                Role::Authority(config) => {
                    authority_regions = config.regions.clone();
                    config.listen.port()
                }
            };
            assert_eq!(ports["grpc"], grpc, "{name}: containerPort grpc");
            for probe in ["readinessProbe", "livenessProbe"] {
                assert_eq!(
                    port(&container[probe]["grpc"]["port"]),
                    grpc,
                    "{name}: {probe} must be a gRPC probe on the listen port"
                );
            }
        }
    }

    // Every Service reaches a Deployment's named or numbered container port.
    for service in of_kind("Service") {
        let name = text(&service["metadata"]["name"]);
        let target = deployments
            .iter()
            .find(|d| {
                labels_match(
                    &service["spec"]["selector"],
                    &d["spec"]["template"]["metadata"]["labels"],
                )
            })
            .unwrap_or_else(|| panic!("Service {name} selects no Deployment"));
        let container_ports: Vec<(String, u16)> = target["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .unwrap()
            .iter()
            .flat_map(|c| c["ports"].as_sequence().unwrap().clone())
            .map(|p| (text(&p["name"]), port(&p["containerPort"])))
            .collect();
        for service_port in service["spec"]["ports"].as_sequence().unwrap() {
            let wanted = text(&service_port["targetPort"]);
            let found = container_ports
                .iter()
                .find(|(n, p)| *n == wanted || p.to_string() == wanted)
                .unwrap_or_else(|| panic!("Service {name}: no container port {wanted}"));
            assert_eq!(
                port(&service_port["port"]),
                found.1,
                "Service {name}: {wanted}"
            );
        }
    }

    // Each region's edge has an autoscaler and a disruption budget.
    assert!(edges.len() >= 2, "one edge Deployment per region");
    for edge in &edges {
        let name = text(&edge["metadata"]["name"]);
        let labels = &edge["spec"]["template"]["metadata"]["labels"];
        assert!(
            of_kind("HorizontalPodAutoscaler").iter().any(|h| {
                text(&h["spec"]["scaleTargetRef"]["name"]) == name
                    && h["spec"]["scaleTargetRef"]["kind"].as_str() == Some("Deployment")
            }),
            "{name} has no HorizontalPodAutoscaler"
        );
        assert!(
            of_kind("PodDisruptionBudget")
                .iter()
                .any(|p| labels_match(&p["spec"]["selector"]["matchLabels"], labels)),
            "{name} has no PodDisruptionBudget"
        );
    }

    // The authority reconciles every region its edges serve, from the same Redis.
    assert_eq!(authority_regions.len(), edge_regions.len());
    for region in &authority_regions {
        let (redis_url, key_prefix) = &edge_regions[region.name.as_str()];
        assert_eq!(redis_url.as_deref(), Some(region.redis_url.as_str()));
        assert_eq!(key_prefix, &region.key_prefix);
    }
}

#[test]
fn compose_services_agree_with_the_binaries_and_their_configs() {
    let dir = deploy_dir().join("compose");
    let compose = &yaml_documents(&dir.join("compose.yaml"))[0];
    let services = compose["services"].as_mapping().unwrap();
    let configs = &compose["configs"];
    let mut listen_ports = BTreeMap::new();
    let mut edge_authority_url = None;
    for (name, service) in services {
        let name = text(name);
        let argv = strings(&service["command"]);
        if name == "redis" {
            let mounted = strings(&service["volumes"])
                .into_iter()
                .find(|v| v.contains("redis.conf"))
                .expect("redis mounts deploy/redis/redis.conf");
            let (source, rest) = mounted.split_once(':').unwrap();
            assert!(dir.join(source).is_file(), "{source}");
            let target = rest.split(':').next().unwrap();
            assert_eq!(argv[1], target, "redis-server loads the mounted file");
            continue;
        }
        if !argv.first().is_some_and(|a| a.starts_with("tollgate")) {
            continue;
        }
        assert_binary_accepts(&argv);
        let config = config_path(&argv);
        let source = service["configs"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|c| text(&c["target"]) == config)
            .unwrap_or_else(|| panic!("{name}: no config at {config}"));
        let toml_text = text(&configs[text(&source["source"]).as_str()]["content"]);
        let grpc = match load_role(&argv, &toml_text) {
            Role::Edge(config) => {
                let redis = config.redis_url.clone().unwrap();
                assert!(redis.starts_with("redis://redis:6379"), "{redis}");
                edge_authority_url = config.authority_url.clone();
                listen_ports.insert("metrics".to_string(), config.http_listen.port());
                config.listen.port()
            }
            Role::Authority(config) => {
                for region in &config.regions {
                    assert!(region.redis_url.starts_with("redis://redis:6379"));
                }
                config.listen.port()
            }
        };
        listen_ports.insert(name.clone(), grpc);
        let published: Vec<u16> = strings(&service["ports"])
            .iter()
            .map(|p| p.rsplit(':').next().unwrap().parse().unwrap())
            .collect();
        assert!(
            published.contains(&grpc),
            "{name} publishes its gRPC port {grpc}"
        );
    }
    let url = edge_authority_url.expect("the edge has an authority_url");
    assert_eq!(
        url,
        format!("http://authority:{}", listen_ports["authority"])
    );
}

/// A systemd unit as sections of key/value lines (a key may repeat).
fn unit_file(path: &Path) -> BTreeMap<String, Vec<(String, String)>> {
    let mut sections: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut current = None;
    for (number, line) in read(path).lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = Some(name.to_string());
            sections.entry(name.to_string()).or_default();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{}:{}: not key=value", path.display(), number + 1));
        let section = current
            .clone()
            .unwrap_or_else(|| panic!("{}:{}: outside a section", path.display(), number + 1));
        sections
            .get_mut(&section)
            .unwrap()
            .push((key.trim().to_string(), value.trim().to_string()));
    }
    sections
}

/// The unit options these files may use, by section (systemd.unit, systemd.service, systemd.exec).
const UNIT_KEYS: &[&str] = &["Description", "Documentation", "Wants", "After", "Requires"];
const SERVICE_KEYS: &[&str] = &[
    "Type",
    "User",
    "Group",
    "ExecStart",
    "EnvironmentFile",
    "Environment",
    "StateDirectory",
    "StateDirectoryMode",
    "WorkingDirectory",
    "Restart",
    "RestartSec",
    "KillSignal",
    "TimeoutStopSec",
    "LimitNOFILE",
    "NoNewPrivileges",
    "CapabilityBoundingSet",
    "AmbientCapabilities",
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "ProtectHostname",
    "ProtectClock",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectProc",
    "ProcSubset",
    "RestrictAddressFamilies",
    "RestrictNamespaces",
    "RestrictRealtime",
    "RestrictSUIDSGID",
    "LockPersonality",
    "MemoryDenyWriteExecute",
    "RemoveIPC",
    "UMask",
    "SystemCallArchitectures",
    "SystemCallFilter",
];
const INSTALL_KEYS: &[&str] = &["WantedBy"];
/// Hardening every unit must carry.
const HARDENING: &[(&str, &str)] = &[
    ("NoNewPrivileges", "yes"),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"),
    ("PrivateDevices", "yes"),
    ("CapabilityBoundingSet", ""),
    ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ("MemoryDenyWriteExecute", "yes"),
    ("SystemCallFilter", "@system-service"),
];

#[test]
fn systemd_units_run_the_binaries_with_configs_they_accept() {
    let dir = deploy_dir().join("systemd");
    for (unit, instance) in [
        ("tollgate-authority.service", None),
        ("tollgate-edge@.service", Some("eu-west-1")),
    ] {
        let sections = unit_file(&dir.join(unit));
        for (section, allowed) in [
            ("Unit", UNIT_KEYS),
            ("Service", SERVICE_KEYS),
            ("Install", INSTALL_KEYS),
        ] {
            let keys = sections
                .get(section)
                .unwrap_or_else(|| panic!("{unit}: no [{section}]"));
            for (key, _) in keys {
                assert!(
                    allowed.contains(&key.as_str()),
                    "{unit}: unexpected {section} key {key}"
                );
            }
        }
        assert_eq!(sections.len(), 3, "{unit}: only Unit, Service and Install");
        let service = &sections["Service"];
        for (key, value) in HARDENING {
            assert!(
                service.iter().any(|(k, v)| k == key && v == value),
                "{unit}: missing {key}={value}"
            );
        }
        let exec = service
            .iter()
            .find(|(k, _)| k == "ExecStart")
            .unwrap()
            .1
            .clone();
        let exec = match instance {
            Some(instance) => exec.replace("%i", instance),
            None => exec,
        };
        let argv: Vec<String> = exec.split_whitespace().map(str::to_string).collect();
        assert_binary_accepts(&argv);
        let config = config_path(&argv);
        let file = config.strip_prefix("/etc/tollgate/").unwrap();
        // The file shipped beside the unit is the one it installs as /etc/tollgate/<file>.
        load_role(&argv, &read(&dir.join(file)));
    }
}

/// redis.conf directives this file may use (all known to Redis 7).
const REDIS_DIRECTIVES: &[&str] = &[
    "bind",
    "port",
    "protected-mode",
    "tcp-backlog",
    "timeout",
    "tcp-keepalive",
    "maxclients",
    "daemonize",
    "supervised",
    "loglevel",
    "logfile",
    "databases",
    "dir",
    "appendonly",
    "appendfilename",
    "appenddirname",
    "appendfsync",
    "no-appendfsync-on-rewrite",
    "auto-aof-rewrite-percentage",
    "auto-aof-rewrite-min-size",
    "aof-load-truncated",
    "aof-use-rdb-preamble",
    "save",
    "stop-writes-on-bgsave-error",
    "rdbcompression",
    "rdbchecksum",
    "dbfilename",
    "maxmemory",
    "maxmemory-policy",
    "lazyfree-lazy-expire",
    "lazyfree-lazy-server-del",
    "replica-lazy-flush",
    "busy-reply-threshold",
    "repl-diskless-sync",
    "replica-read-only",
    "slowlog-log-slower-than",
    "slowlog-max-len",
    "latency-monitor-threshold",
    "min-replicas-to-write",
    "min-replicas-max-lag",
];

/// A redis-server this test started; killed by its own pid when dropped.
struct RedisProcess(Child);

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `CONFIG GET name` over RESP; the value.
fn config_get(port: u16, name: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let command = format!(
        "*3\r\n$6\r\nCONFIG\r\n$3\r\nGET\r\n${}\r\n{name}\r\n",
        name.len()
    );
    stream.write_all(command.as_bytes()).unwrap();
    let mut reply = Vec::new();
    let mut buffer = [0u8; 512];
    // *2 $len name $len value: read until the reply holds its four lines after the header.
    while reply.iter().filter(|b| **b == b'\n').count() < 5 {
        let read = stream.read(&mut buffer).unwrap();
        assert!(read > 0, "redis closed the connection");
        reply.extend_from_slice(&buffer[..read]);
    }
    let reply = String::from_utf8(reply).unwrap();
    reply.lines().nth(4).unwrap().to_string()
}

#[test]
fn redis_conf_is_for_production_and_redis_7_loads_it() {
    let path = deploy_dir().join("redis/redis.conf");
    let mut directives = BTreeMap::new();
    for (number, line) in read(&path).lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once(' ').unwrap_or((line, ""));
        assert!(
            REDIS_DIRECTIVES.contains(&key),
            "redis.conf:{}: unexpected directive {key}",
            number + 1
        );
        directives.insert(key.to_string(), value.trim().to_string());
    }
    assert_eq!(directives["appendonly"], "yes");
    assert!(["always", "everysec"].contains(&directives["appendfsync"].as_str()));
    assert_eq!(directives["maxmemory-policy"], "noeviction");
    assert_eq!(directives["daemonize"], "no");

    // The strongest check: a real redis-server loads the file (it exits on any directive it
    // does not know), with only the port, directory and address overridden for the test.
    let binary = find_binary(
        "redis-server",
        Some("TOLLGATE_REDIS_BIN_DIR"),
        &[],
        "install Debian's redis-server package, or run tests/run which installs it",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let log = dir.path().join("redis.log");
    let mut redis = RedisProcess(
        Command::new(binary)
            .arg(&path)
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let child = &mut redis.0;
    wait_until(
        "redis-server with deploy/redis/redis.conf",
        || port_open(port),
        || matches!(child.try_wait(), Ok(Some(_))),
        || log_tail(&log, 4000),
    )
    .unwrap();
    assert_eq!(config_get(port, "appendonly"), "yes");
    assert_eq!(config_get(port, "maxmemory-policy"), "noeviction");
    assert_eq!(config_get(port, "appendfsync"), directives["appendfsync"]);
    drop(redis);
}
