//! The embedded node (`dev`) started in the test's own process on free ports, with a temporary
//! data directory; `stop` ends it and waits for it.

#![allow(dead_code)]

pub mod envoy;
pub mod grpc;
pub mod http_client;
pub mod serve;

use std::net::SocketAddr;

use tollgate_authority_service::dev::{run, DevOptions};
use tollgate_testkit::process::free_port;
use tonic::transport::Channel;

/// The node's key (every scope).
pub const KEY: &str = "dev-test-key";
/// How long a test waits for the node to listen, or for its background loop to reconcile
/// (it runs every 200 ms).
pub const WAIT_MS: u64 = 30_000;

/// A request carrying the node's key.
pub fn request<T>(message: T) -> tonic::Request<T> {
    grpc::keyed(message, KEY)
}

pub struct Node {
    pub channel: Channel,
    pub listen: SocketAddr,
    /// The HTTP listener: /metrics, the webhook, the console.
    pub http: SocketAddr,
    /// The node's data directory (its SQLite ledger and state).
    pub data: std::path::PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Node {
    pub async fn start() -> Node {
        Node::start_with(None).await
    }

    /// With `stripe_webhook_secret` set when given.
    pub async fn start_with(stripe_webhook_secret: Option<&str>) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let address = || -> SocketAddr {
            format!("127.0.0.1:{}", free_port().unwrap())
                .parse()
                .unwrap()
        };
        let (listen, http) = (address(), address());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run(
            DevOptions {
                listen,
                http_listen: http,
                data: dir.path().to_path_buf(),
                api_key: Some(KEY.to_owned()),
                stripe_webhook_secret: stripe_webhook_secret.map(str::to_owned),
            },
            async {
                let _ = stopped.await;
            },
        ));
        let channel = grpc::connect(listen).await;
        Node {
            channel,
            listen,
            http,
            data: dir.path().to_path_buf(),
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        }
    }

    /// Admin on the node, with its key.
    pub fn admin(&self) -> grpc::Admin {
        grpc::admin(self.channel.clone(), KEY)
    }

    /// Enforcement on the node, with its key.
    pub fn edge(&self) -> grpc::Edge {
        grpc::edge(self.channel.clone(), KEY)
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}
