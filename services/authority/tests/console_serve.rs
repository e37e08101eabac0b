//! `tollgate-authority serve` with `http_listen` serves the console and the widget too: here
//! over a SQLite ledger without regions (Admin over the ledger alone), as plain HTTP.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tollgate_proto::pb;
use tollgate_testkit::process::free_port;
use tonic::transport::Channel;

mod common;

const ADMIN_KEY: &str = "serve-console-admin-key";
const READ_KEY: &str = "serve-console-read-key";
/// Bounded waits: attempts × step.
const WAIT_ATTEMPTS: u32 = 300;
const WAIT_STEP_MS: u64 = 100;

/// The authority process this test started; dropping it kills exactly that pid.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A JSON call, with `key` as the bearer token when given.
async fn call(
    method: &str,
    url: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, http::HeaderMap, String) {
    let bearer = key.map(|key| format!("Bearer {key}"));
    let mut headers = Vec::new();
    if let Some(bearer) = &bearer {
        headers.push(("authorization", bearer.as_str()));
    }
    headers.push(("content-type", "application/json"));
    common::http_client::call(method, url, &headers, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_the_console_and_the_widget_on_its_http_listener() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("authority.toml");
    let http = format!("127.0.0.1:{}", free_port().unwrap());
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    std::fs::write(
        &config,
        format!(
            "database_url = \"sqlite://{}\"\nhttp_listen = \"{http}\"\n",
            dir.path().join("ledger.db").display()
        ),
    )
    .unwrap();
    let _node = Node(
        Command::new(env!("CARGO_BIN_EXE_tollgate-authority"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("TOLLGATE_LISTEN", &listen)
            .env("TOLLGATE_ADMIN_API_KEY", ADMIN_KEY)
            .env("TOLLGATE_READ_API_KEY", READ_KEY)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut channel = None;
    for _ in 0..WAIT_ATTEMPTS {
        if let Ok(connected) = Channel::from_shared(format!("http://{listen}"))
            .unwrap()
            .connect()
            .await
        {
            channel = Some(connected);
            break;
        }
        tokio::time::sleep(Duration::from_millis(WAIT_STEP_MS)).await;
    }
    let mut admin = pb::admin_client::AdminClient::new(channel.expect("serve never listened"));
    let mut create = tonic::Request::new(pb::CreateAccountRequest {
        idempotency_key: "a1".into(),
        account_id: "acme".into(),
        ..Default::default()
    });
    create.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_KEY}").parse().unwrap(),
    );
    admin.create_account(create).await.unwrap();

    // The sign-in page, in a session cookie no script can read and no other site sends.
    let (status, headers, page) =
        call("GET", &format!("http://{http}/console/login"), None, "").await;
    assert_eq!(status, 200);
    assert!(page.contains("name=\"csrf\""));
    let cookie = headers["set-cookie"].to_str().unwrap();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert_eq!(headers["x-frame-options"], "DENY");
    let (status, _, _) = call("GET", &format!("http://{http}/console"), None, "").await;
    assert_eq!(status, 303, "not signed in: sent to the sign-in page");

    // Widget tokens need an admin key; the page shows the one account the token names.
    let mint = format!("http://{http}/widget/tokens");
    let body = r#"{"account_id": "acme", "ttl_seconds": 60}"#;
    assert_eq!(call("POST", &mint, None, body).await.0, 401);
    assert_eq!(call("POST", &mint, Some(READ_KEY), body).await.0, 403);
    let (status, _, reply) = call(
        "POST",
        &mint,
        Some(ADMIN_KEY),
        r#"{"account_id": "acme", "ttl_seconds": 999999}"#,
    )
    .await;
    assert_eq!(status, 400);
    assert!(reply.contains("ttl_seconds"), "{reply}");
    let (status, _, reply) = call("POST", &mint, Some(ADMIN_KEY), body).await;
    assert_eq!(status, 200, "{reply}");
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    let path = reply["path"].as_str().unwrap();
    let (status, headers, page) = call("GET", &format!("http://{http}{path}"), None, "").await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("id=\"widget-balance\">0<"), "{page}");
    assert!(
        headers.get("x-frame-options").is_none(),
        "the widget may be embedded"
    );
    let (status, _, page) = call(
        "GET",
        &format!("http://{http}/widget?token=1.ab.acme"),
        None,
        "",
    )
    .await;
    assert_eq!(status, 401);
    assert!(page.contains("token: bad signature"), "{page}");
}
