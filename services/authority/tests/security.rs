//! Security of the gRPC nodes: every method of every service walked with every kind of key,
//! TLS and mutual TLS on the embedded node, and the edge's cold path to the authority over
//! mutual TLS. Certificates are made at test time in temporary directories.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::net::TcpListener;
use tollgate_authority::{Authority, AuthoritySettings, StateStore, SystemClock};
use tollgate_authority_service::auth::{key_digest, KeyEntry, KeyRing, Scope, ADMIN_READ_METHODS};
use tollgate_authority_service::dev::{run_with_tls, DevOptions};
use tollgate_core::{AccountId, FeatureKey, IdempotencyKey, Quantity, RegionId};
use tollgate_edge::coordination::AuthorityClient;
use tollgate_edge::{DebitRequest, Decision, EdgeSettings, Engine, Spend};
use tollgate_ledger::{LedgerStore, SqliteLedger};
use tollgate_proto::pb;
use tollgate_region::{MemoryRegionStore, RETAIN_MS_DEFAULT};
use tollgate_serve::tls::{ClientTlsFiles, ServerTlsFiles};
use tollgate_testkit::process::free_port;
use tollgate_testkit::tls::TestPki;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const ADMIN_KEY: &str = "walk-admin";
const READ_KEY: &str = "walk-read";
const ENFORCE_KEY: &str = "walk-enforce";
/// Longest one call of the walk may take before the test names it and fails.
const CALL_WITHIN_MS: u64 = 10_000;
/// Attempts to reach a node that is starting, 50 ms apart.
const CONNECT_ATTEMPTS_MAX: u32 = 600;

/// The one method of the Envoy rate limit service the edge serves (its proto is Envoy's, not
/// in Tollgate's descriptor set).
const ENVOY_METHODS: &[&str] = &["/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"];

fn keys() -> Arc<KeyRing> {
    let entry = |name: &str, key: &str, scope| KeyEntry {
        name: name.into(),
        digest: key_digest(key),
        scope,
    };
    Arc::new(KeyRing::new(vec![
        entry("ops", ADMIN_KEY, Scope::Admin),
        entry("support", READ_KEY, Scope::Read),
        entry("gateway", ENFORCE_KEY, Scope::Enforce),
    ]))
}

/// A full authority (Admin, Coordination) on a SQLite ledger and one in-memory region.
struct Node {
    address: SocketAddr,
    ledger: Arc<dyn LedgerStore>,
    authority: Arc<Authority<dyn LedgerStore, MemoryRegionStore>>,
    store: Arc<MemoryRegionStore>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn authority_node(tls: Option<tonic::transport::ServerTlsConfig>) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let ledger: Arc<dyn LedgerStore> = Arc::new(
        SqliteLedger::open(&dir.path().join("ledger.db"))
            .await
            .unwrap(),
    );
    let state = StateStore::connect(&format!(
        "sqlite://{}",
        dir.path().join("authority.db").display()
    ))
    .await
    .unwrap();
    let store = Arc::new(MemoryRegionStore::new(RETAIN_MS_DEFAULT));
    let authority = Arc::new(Authority::new(
        Arc::clone(&ledger),
        state,
        BTreeMap::from([(RegionId::new("eu").unwrap(), Arc::clone(&store))]),
        Arc::new(SystemClock),
        AuthoritySettings::default(),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let channel = tokio::sync::mpsc::channel(16);
    tokio::spawn(
        tollgate_authority_service::server::serve_authority_with_changes(
            listener,
            Arc::clone(&ledger),
            keys(),
            Arc::clone(&authority),
            Arc::new(SystemClock),
            channel,
            tls,
            async {
                let _ = stopped.await;
            },
        ),
    );
    Node {
        address,
        ledger,
        authority,
        store,
        stop: Some(stop),
        _dir: dir,
    }
}

/// An edge's listener (Enforcement, Envoy) on an in-memory region.
async fn edge_node() -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let engine = Arc::new(Engine::new(
        Arc::new(MemoryRegionStore::new(RETAIN_MS_DEFAULT)),
        EdgeSettings::new(RegionId::new("eu").unwrap()),
        Arc::new(tollgate_edge::SystemClock),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tollgate_edge::server::serve_grpc(
        listener,
        engine,
        Arc::new(tollgate_edge::metrics::Metrics::new().unwrap()),
        keys(),
        Default::default(),
        async {
            let _ = stopped.await;
        },
    ));
    (address, stop)
}

/// Connects (bounded retries while the node starts) and checks health, which needs no key.
async fn connect(url: &str, tls: Option<ClientTlsConfig>) -> Result<Channel, String> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect_timeout(Duration::from_millis(CALL_WITHIN_MS))
        .timeout(Duration::from_millis(CALL_WITHIN_MS));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    let mut last = String::new();
    for _ in 0..CONNECT_ATTEMPTS_MAX {
        match endpoint.connect().await {
            Ok(channel) => {
                return HealthClient::new(channel.clone())
                    .check(HealthCheckRequest::default())
                    .await
                    .map(|_| channel)
                    .map_err(|status| format!("health: {status:?}"));
            }
            Err(error) => {
                last = format!("{error:?}");
                // Refused: the node is not listening yet. Anything else is the answer.
                if !last.contains("ConnectionRefused") {
                    return Err(last);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    Err(format!(
        "not reachable after {CONNECT_ATTEMPTS_MAX} attempts: {last}"
    ))
}

/// Calls `path` with an empty message (every field at its default) and `key`; the code the
/// call ends with, or OK once a streaming reply has started.
async fn call(channel: &Channel, path: &str, key: Option<&str>, streaming_reply: bool) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    let mut request = tonic::Request::new(tokio_stream::once(()));
    if let Some(key) = key {
        let value = format!("Bearer {key}").parse().unwrap();
        request.metadata_mut().insert("authorization", value);
    }
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let name = path.to_owned();
    let path = http::uri::PathAndQuery::from_str(path).unwrap();
    let called = async move {
        grpc.ready().await.unwrap();
        match grpc.streaming(request, path, codec).await {
            Err(status) => status.code(),
            Ok(_) if streaming_reply => Code::Ok,
            Ok(response) => match response.into_inner().message().await {
                Ok(_) => Code::Ok,
                Err(status) => status.code(),
            },
        }
    };
    tokio::time::timeout(Duration::from_millis(CALL_WITHIN_MS), called)
        .await
        .unwrap_or_else(|_| panic!("{name} did not answer"))
}

/// Every method of every service in Tollgate's descriptor set: (path, streams its reply).
fn described_methods() -> BTreeMap<String, Vec<(String, bool)>> {
    let set = prost_types::FileDescriptorSet::decode(tollgate_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut services = BTreeMap::new();
    for file in &set.file {
        for service in &file.service {
            let name = format!("{}.{}", file.package(), service.name());
            let methods = service
                .method
                .iter()
                .map(|m| {
                    (
                        format!("/{name}/{}", m.name()),
                        m.server_streaming.unwrap_or(false),
                    )
                })
                .collect();
            services.insert(name, methods);
        }
    }
    services
}

fn allowed(code: Code) -> bool {
    !matches!(code, Code::PermissionDenied | Code::Unauthenticated)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_of_every_service_enforces_its_scope() {
    let authority = authority_node(None).await;
    let (edge_address, _stop_edge) = edge_node().await;
    let authority_channel = connect(&format!("http://{}", authority.address), None)
        .await
        .unwrap();
    let edge_channel = connect(&format!("http://{edge_address}"), None)
        .await
        .unwrap();
    let mut services = described_methods();
    let served: BTreeSet<&str> = [
        "tollgate.v1.Admin",
        "tollgate.v1.Coordination",
        "tollgate.v1.Enforcement",
    ]
    .into();
    assert_eq!(
        services.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        served,
        "a service was added to the contract: walk it here"
    );
    services.insert(
        "envoy.service.ratelimit.v3.RateLimitService".into(),
        ENVOY_METHODS
            .iter()
            .map(|m| (m.to_string(), false))
            .collect(),
    );
    let mut walked = 0;
    for (service, methods) in &services {
        let on_edge = matches!(
            service.as_str(),
            "tollgate.v1.Enforcement" | "envoy.service.ratelimit.v3.RateLimitService"
        );
        let channel = if on_edge {
            &edge_channel
        } else {
            &authority_channel
        };
        for (path, streaming) in methods {
            let code = |key| call(channel, path, key, *streaming);
            // No key, or a key nobody configured: refused before anything else.
            assert_eq!(
                code(None).await,
                Code::Unauthenticated,
                "{path} without a key"
            );
            assert_eq!(
                code(Some("wrong")).await,
                Code::Unauthenticated,
                "{path} wrong key"
            );
            let method = path.rsplit('/').next().unwrap();
            let read_only = service == "tollgate.v1.Admin" && ADMIN_READ_METHODS.contains(&method);
            let enforce = code(Some(ENFORCE_KEY)).await;
            let read = code(Some(READ_KEY)).await;
            let admin = code(Some(ADMIN_KEY)).await;
            if on_edge {
                assert!(
                    allowed(enforce),
                    "{path}: an enforce key is refused: {enforce:?}"
                );
                assert_eq!(read, Code::PermissionDenied, "{path}: read key");
                assert_eq!(admin, Code::PermissionDenied, "{path}: admin key");
            } else {
                assert_eq!(enforce, Code::PermissionDenied, "{path}: enforce key");
                assert!(allowed(admin), "{path}: an admin key is refused: {admin:?}");
                if read_only {
                    assert!(allowed(read), "{path}: a read key is refused: {read:?}");
                } else {
                    assert_eq!(read, Code::PermissionDenied, "{path}: read key");
                }
            }
            walked += 1;
        }
    }
    assert!(walked > 40, "only {walked} methods walked");
    // None of it changed anything: empty messages are refused for what they say.
    assert!(authority
        .authority
        .state()
        .audit_after(0, "", 1_000)
        .await
        .unwrap()
        .iter()
        .all(|row| row.entry.outcome == "refused"));
}

fn client_tls(
    pki: &TestPki,
    identity: Option<&tollgate_testkit::tls::CertFiles>,
) -> ClientTlsConfig {
    ClientTlsFiles {
        ca: Some(pki.ca.clone()),
        cert: identity.map(|files| files.cert.clone()),
        key: identity.map(|files| files.key.clone()),
    }
    .load("test")
    .unwrap()
}

fn server_tls(pki: &TestPki, client_ca: Option<&TestPki>) -> tonic::transport::ServerTlsConfig {
    ServerTlsFiles {
        cert: pki.server.cert.clone(),
        key: pki.server.key.clone(),
        client_ca: client_ca.map(|ca| ca.ca.clone()),
    }
    .load("test")
    .unwrap()
}

async fn dev_node(
    tls: tonic::transport::ServerTlsConfig,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let http_listen: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(run_with_tls(
        DevOptions {
            listen,
            http_listen,
            data: dir.path().to_path_buf(),
            api_key: Some(ADMIN_KEY.to_owned()),
            stripe_webhook_secret: None,
        },
        Some(tls),
        async {
            let _ = stopped.await;
        },
    ));
    (listen, stop, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_dev_node_answers_tls_clients_and_refuses_plain_text() {
    let pki = TestPki::new("dev").unwrap();
    let (listen, _stop, _dir) = dev_node(server_tls(&pki, None)).await;
    let channel = connect(
        &format!("https://localhost:{}", listen.port()),
        Some(client_tls(&pki, None)),
    )
    .await
    .expect("a TLS client that trusts the CA connects");
    let mut admin = pb::admin_client::AdminClient::new(channel);
    let mut request = tonic::Request::new(pb::ListFeaturesRequest::default());
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_KEY}").parse().unwrap(),
    );
    admin
        .list_features(request)
        .await
        .expect("an authenticated call over TLS");

    let plain = connect(&format!("http://{listen}"), None).await;
    assert!(plain.is_err(), "a plain-text client was answered");
    let stranger = TestPki::new("stranger").unwrap();
    let untrusted = connect(
        &format!("https://localhost:{}", listen.port()),
        Some(client_tls(&stranger, None)),
    )
    .await;
    assert!(
        untrusted.is_err(),
        "a client that does not trust the node's CA connected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_client_ca_only_clients_with_its_certificates_connect() {
    let pki = TestPki::new("mtls").unwrap();
    let (listen, _stop, _dir) = dev_node(server_tls(&pki, Some(&pki))).await;
    let url = format!("https://localhost:{}", listen.port());
    let gateway = pki.client("gateway").unwrap();
    connect(&url, Some(client_tls(&pki, Some(&gateway))))
        .await
        .expect("a client with a certificate from the client CA connects");
    let anonymous = connect(&url, Some(client_tls(&pki, None))).await;
    assert!(
        anonymous.is_err(),
        "a client without a certificate was answered"
    );
    let other = TestPki::new("other").unwrap();
    let forged = other.client("gateway").unwrap();
    let foreign = connect(&url, Some(client_tls(&pki, Some(&forged)))).await;
    assert!(
        foreign.is_err(),
        "a certificate from another CA was accepted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cold_path_runs_over_mutual_tls() {
    let pki = TestPki::new("fleet").unwrap();
    let node = authority_node(Some(server_tls(&pki, Some(&pki)))).await;
    let url = format!("https://localhost:{}", node.address.port());
    let edge_cert = pki.client("edge-eu-1").unwrap();
    // Wait until the authority answers (over mutual TLS, as the edge will).
    connect(&url, Some(client_tls(&pki, Some(&edge_cert))))
        .await
        .unwrap();

    let key = |text: &str| IdempotencyKey::new(text).unwrap();
    let acme = AccountId::new("acme").unwrap();
    let now = tollgate_authority::Clock::now(&SystemClock);
    node.authority
        .define_feature(&tollgate_authority::Feature {
            feature: FeatureKey::new("chat").unwrap(),
            unit: "message".to_owned(),
            description: String::new(),
        })
        .await
        .unwrap();
    node.authority
        .publish_price_version(&tollgate_core::PriceBookVersion {
            version: 1,
            effective_from: tollgate_core::Timestamp::EPOCH,
            default: [(
                FeatureKey::new("chat").unwrap(),
                tollgate_core::Rate::parse("0.5").unwrap(),
            )]
            .into(),
            ..Default::default()
        })
        .await
        .unwrap();
    node.ledger
        .create_account(
            tollgate_core::command::CreateAccount {
                key: key("create"),
                account: acme.clone(),
                overdraft_limit: tollgate_core::Credits::ZERO,
                metadata: Default::default(),
            },
            now,
        )
        .await
        .unwrap();
    node.ledger
        .issue_grant(
            tollgate_core::command::IssueGrant {
                key: key("grant"),
                account: acme.clone(),
                terms: tollgate_core::command::GrantTerms::new(
                    tollgate_core::GrantId::new("bought").unwrap(),
                    tollgate_core::Credits::from_whole(40).unwrap(),
                    tollgate_core::GrantSource::Purchase,
                ),
                metadata: Default::default(),
                memo: Default::default(),
            },
            now,
        )
        .await
        .unwrap()
        .unwrap();

    let edge = |tls: ClientTlsConfig| {
        let client = AuthorityClient::with_tls(
            &url,
            Some(tls),
            RegionId::new("eu").unwrap(),
            Some(ADMIN_KEY),
            "edge-eu-1".into(),
        )
        .unwrap();
        Engine::new(
            Arc::clone(&node.store),
            EdgeSettings::new(RegionId::new("eu").unwrap()),
            Arc::new(tollgate_edge::SystemClock),
        )
        .with_allocator(Arc::new(client))
    };
    let debit = |k: &str| DebitRequest {
        account: acme.clone(),
        key: key(k),
        feature: FeatureKey::new("chat").unwrap(),
        spend: Spend::Quantity(Quantity::parse("4").unwrap()),
        actor: None,
        mode: None,
        event_time: None,
    };
    // Without its certificate the edge cannot reach the authority: the cold path fails.
    let anonymous = edge(client_tls(&pki, None));
    let refused = anonymous.debit(debit("d0")).await;
    assert!(
        !matches!(refused, Ok(Decision::Done(_))),
        "decided without reaching the authority: {refused:?}"
    );
    let decided = edge(client_tls(&pki, Some(&edge_cert)))
        .debit(debit("d1"))
        .await
        .unwrap();
    assert!(
        matches!(&decided, Decision::Done(d) if d.priced.cost == tollgate_core::Credits::from_whole(2).unwrap()),
        "{decided:?}"
    );
}
