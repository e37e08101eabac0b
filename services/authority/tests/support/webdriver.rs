//! A small W3C WebDriver client over HTTP (enough for the console's tests), and the
//! `chromedriver` process it talks to: started on a free port, killed by its pid when dropped.

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

/// How many times a wait looks for what it waits for, and how long it sleeps in between.
const WAIT_ATTEMPTS: u32 = 200;
const WAIT_STEP_MS: u64 = 100;
/// The W3C name of an element reference in replies.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A `chromedriver` this test started, in a process group of its own with the browsers it
/// launches; dropping it kills that group (led by the pid it started), so a failed test leaves
/// no Chromium behind.
pub struct Driver {
    child: Child,
    pub port: u16,
}

impl Driver {
    pub fn start(port: u16, log: &Path) -> Driver {
        let log = std::fs::File::create(log).expect("chromedriver log file");
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::from(log.try_clone().expect("log handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start chromedriver ({e}): install Debian's chromium and \
                     chromium-driver packages (tests/run does)"
                )
            });
        Driver { child, port }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        tollgate_testkit::process::signal_group(self.child.id(), "KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Browser {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    session: String,
}

#[derive(Clone, Debug)]
pub struct Element(String);

impl Browser {
    /// A headless Chromium session, retried while the driver is starting.
    pub async fn open(driver: &Driver, profile: &Path) -> Browser {
        let client = Client::builder(TokioExecutor::new()).build_http();
        let mut browser = Browser {
            client,
            base: format!("http://127.0.0.1:{}", driver.port),
            session: String::new(),
        };
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium_binary(),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1800",
                         format!("--user-data-dir={}", profile.display())],
            }
        }}});
        let mut last = String::new();
        for _ in 0..WAIT_ATTEMPTS {
            match browser
                .request("POST", "/session", Some(&capabilities))
                .await
            {
                Ok(value) => {
                    browser.session = value["sessionId"]
                        .as_str()
                        .expect("a session id")
                        .to_owned();
                    return browser;
                }
                Err(error) => last = error,
            }
            tokio::time::sleep(Duration::from_millis(WAIT_STEP_MS)).await;
        }
        panic!("no WebDriver session: {last}");
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, String> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = http::Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("{method} {path}: {status}: {}", value["value"]));
        }
        Ok(value["value"].clone())
    }

    async fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        self.request(method, &path, body.as_ref())
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn goto(&self, url: &str) {
        self.session_call("POST", "/url", Some(json!({ "url": url })))
            .await;
    }

    pub async fn url(&self) -> String {
        self.session_call("GET", "/url", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub async fn source(&self) -> String {
        self.session_call("GET", "/source", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    async fn try_find(&self, css: &str) -> Option<Element> {
        let path = format!("/session/{}/element", self.session);
        let found = self
            .request(
                "POST",
                &path,
                Some(&json!({"using": "css selector", "value": css})),
            )
            .await
            .ok()?;
        found[ELEMENT_KEY].as_str().map(|id| Element(id.to_owned()))
    }

    /// The element `css` selects, waiting (bounded) for a page to show it.
    pub async fn find(&self, css: &str) -> Element {
        for _ in 0..WAIT_ATTEMPTS {
            if let Some(element) = self.try_find(css).await {
                return element;
            }
            tokio::time::sleep(Duration::from_millis(WAIT_STEP_MS)).await;
        }
        panic!(
            "no element {css:?} on {}:\n{}",
            self.url().await,
            self.text_of_body().await
        );
    }

    pub async fn exists(&self, css: &str) -> bool {
        self.try_find(css).await.is_some()
    }

    pub async fn count(&self, css: &str) -> usize {
        let path = format!("/session/{}/elements", self.session);
        self.request(
            "POST",
            &path,
            Some(&json!({"using": "css selector", "value": css})),
        )
        .await
        .map(|v| v.as_array().map(Vec::len).unwrap_or(0))
        .unwrap_or(0)
    }

    pub async fn text(&self, css: &str) -> String {
        let element = self.find(css).await;
        self.session_call("GET", &format!("/element/{}/text", element.0), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    async fn text_of_body(&self) -> String {
        match self.try_find("body").await {
            Some(body) => self
                .request(
                    "GET",
                    &format!("/session/{}/element/{}/text", self.session, body.0),
                    None,
                )
                .await
                .map(|v| v.as_str().unwrap_or_default().to_owned())
                .unwrap_or_default(),
            None => String::new(),
        }
    }

    /// Waits (bounded) until the text of `css` contains `wanted`, and returns it.
    pub async fn wait_text(&self, css: &str, wanted: &str) -> String {
        let mut last = String::new();
        for _ in 0..WAIT_ATTEMPTS {
            if self.try_find(css).await.is_some() {
                last = self.text(css).await;
                if last.contains(wanted) {
                    return last;
                }
            }
            tokio::time::sleep(Duration::from_millis(WAIT_STEP_MS)).await;
        }
        panic!("{css:?} never contained {wanted:?}; last text {last:?}");
    }

    pub async fn click(&self, css: &str) {
        let element = self.find(css).await;
        self.session_call(
            "POST",
            &format!("/element/{}/click", element.0),
            Some(json!({})),
        )
        .await;
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css).await;
        self.session_call(
            "POST",
            &format!("/element/{}/clear", element.0),
            Some(json!({})),
        )
        .await;
        self.session_call(
            "POST",
            &format!("/element/{}/value", element.0),
            Some(json!({ "text": text })),
        )
        .await;
    }

    pub async fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        self.session_call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// Saves a PNG of the page at `path`.
    pub async fn screenshot(&self, path: &Path) {
        let data = self.session_call("GET", "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data.as_str().unwrap_or_default())
            .expect("a base64 screenshot");
        std::fs::write(path, png).expect("writing a screenshot");
    }

    pub async fn close(self) {
        let _ = self
            .request("DELETE", &format!("/session/{}", self.session), None)
            .await;
    }
}

fn chromium_binary() -> String {
    for candidate in [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ] {
        if Path::new(candidate).exists() {
            return candidate.to_owned();
        }
    }
    panic!("no chromium binary: install Debian's chromium package (tests/run does)");
}
