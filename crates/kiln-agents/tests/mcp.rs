//! The MCP client against the official Python SDK's server
//! (`tests/fixtures/mcp_server.py`), over stdio and over streamable HTTP on
//! a local port. Needs `python3 -m pip install mcp`; with `KILN_SKIP_MCP=1`
//! the tests print a note and pass without it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_agents::{
    McpClient, McpError, McpServerConfig, McpTransportConfig, Tool, ToolBox, ToolError,
};
use serde_json::json;

const SECRET: &str = "Bearer sk-mcp-91b2c3";

fn fixture() -> String {
    format!(
        "{}/tests/fixtures/mcp_server.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// True when the SDK is importable. Without it the test fails with what
/// to install, unless `KILN_SKIP_MCP=1` asks to skip.
fn mcp_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import mcp.server.mcpserver"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    if std::env::var("KILN_SKIP_MCP").as_deref() == Ok("1") {
        eprintln!("skipped: the Python MCP SDK is not installed (KILN_SKIP_MCP=1)");
        return false;
    }
    panic!(
        "the Python MCP SDK (2.x) is not installed: run `python3 -m pip install --user mcp` \
         (or set KILN_SKIP_MCP=1 to skip these tests)"
    );
}

fn stdio_config(name: &str) -> McpServerConfig {
    McpServerConfig {
        name: name.to_owned(),
        transport: McpTransportConfig::Stdio {
            command: "python3".to_owned(),
            args: vec![fixture(), "stdio".to_owned()],
            env: BTreeMap::new(),
        },
        timeout_seconds: Some(20),
    }
}

async fn stdio_client() -> McpClient {
    McpClient::connect(&stdio_config("fixture")).await.unwrap()
}

/// The fixture serving streamable HTTP on a free local port; killed on drop.
struct HttpServer {
    child: Child,
    url: String,
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_server() -> HttpServer {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    http_server_on(port)
}

fn http_server_on(port: u16) -> HttpServer {
    let child = Command::new("python3")
        .args([fixture(), "http".to_owned(), port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = HttpServer {
        child,
        url: format!("http://127.0.0.1:{port}/mcp"),
    };
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the fixture HTTP server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

fn http_config(url: &str) -> McpServerConfig {
    McpServerConfig {
        name: "web".to_owned(),
        transport: McpTransportConfig::Http {
            url: url.to_owned(),
            headers: BTreeMap::from([("Authorization".to_owned(), SECRET.to_owned())]),
        },
        timeout_seconds: Some(20),
    }
}

fn tool<'a>(tools: &'a [kiln_agents::McpTool], name: &str) -> &'a kiln_agents::McpTool {
    tools.iter().find(|t| t.name() == name).unwrap()
}

/// The checks shared by both transports.
async fn exercise(client: &McpClient, prefix: &str) {
    let tools = client.tools();
    let mut names: Vec<&str> = tools.iter().map(|t| t.name()).collect();
    names.sort_unstable();
    let want: Vec<String> = [
        "add",
        "big",
        "echo",
        "exit_now",
        "fail",
        "getenv",
        "slow_echo",
    ]
    .iter()
    .map(|t| format!("{prefix}__{t}"))
    .collect();
    assert_eq!(names, want);

    let add = tool(&tools, &format!("{prefix}__add"));
    assert_eq!(add.description(), "Adds two integers.");
    assert_eq!(add.remote_name(), "add");
    let params = add.parameters();
    assert_eq!(params["type"], "object");
    assert_eq!(params["properties"]["a"]["type"], "integer");
    let out = add.call(&json!({"a": 2, "b": 3})).await.unwrap();
    assert_eq!(out.text, "5");
    assert!(!out.truncated);

    let echo = tool(&tools, &format!("{prefix}__echo"));
    let out = echo.call(&json!({"text": "héllo\nworld"})).await.unwrap();
    assert_eq!(out.text, "héllo\nworld");

    let fail = tool(&tools, &format!("{prefix}__fail"));
    let err = fail.call(&json!({})).await.unwrap_err();
    assert!(matches!(err, ToolError::RequestFailed(_)), "{err:?}");
    assert!(err.to_string().contains("reported an error"), "{err}");

    let err = client
        .call_tool("no_such_tool", &json!({}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no_such_tool"), "{err}");

    // Bad arguments come back as an error for the model, not a panic.
    let err = add.call(&json!({"a": "two"})).await.unwrap_err();
    assert!(!err.to_string().is_empty());

    let big = tool(&tools, &format!("{prefix}__big"));
    let out = big.call(&json!({"n": 40_000})).await.unwrap();
    assert!(out.truncated);
    assert!(
        out.text.ends_with("characters]"),
        "{}",
        &out.text[out.text.len() - 60..]
    );

    // Through a ToolBox, as an agent calls it.
    let mut toolbox = ToolBox::new();
    for t in client.tools() {
        toolbox.register(t);
    }
    let out = toolbox
        .call(&format!("{prefix}__add"), &json!({"a": 40, "b": 2}))
        .await
        .unwrap();
    assert_eq!(out.text, "42");
}

async fn concurrent_calls(client: &McpClient, prefix: &str) {
    let slow = Arc::new(tool(&client.tools(), &format!("{prefix}__slow_echo")).clone());
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..24 {
        let slow = slow.clone();
        tasks.spawn(async move {
            let text = format!("call-{i}");
            let out = slow
                .call(&json!({"text": text, "delay_ms": 100 - i * 4}))
                .await
                .unwrap();
            assert_eq!(out.text, text);
        });
    }
    let mut done = 0;
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
        done += 1;
    }
    assert_eq!(done, 24);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_lists_and_calls_tools() {
    if !mcp_available() {
        return;
    }
    let client = stdio_client().await;
    assert_eq!(client.name(), "fixture");
    assert_eq!(client.protocol_version(), "2025-06-18");
    exercise(&client, "fixture").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stdio_concurrent_calls_all_succeed() {
    if !mcp_available() {
        return;
    }
    let client = stdio_client().await;
    concurrent_calls(&client, "fixture").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_lists_and_calls_tools() {
    if !mcp_available() {
        return;
    }
    let server = http_server();
    let client = McpClient::connect(&http_config(&server.url)).await.unwrap();
    assert_eq!(client.protocol_version(), "2025-06-18");
    exercise(&client, "web").await;
    // The secret header value never shows in Debug output.
    let debug = format!("{:?} {:?}", http_config(&server.url), client);
    assert!(!debug.contains(SECRET), "{debug}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_concurrent_calls_all_succeed() {
    if !mcp_available() {
        return;
    }
    let server = http_server();
    let client = McpClient::connect(&http_config(&server.url)).await.unwrap();
    concurrent_calls(&client, "web").await;
}

#[tokio::test]
async fn http_server_that_is_down_gives_a_clear_error() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/mcp?token=hidden");
    let err = McpClient::connect(&http_config(&url)).await.unwrap_err();
    assert_eq!(err.code(), "transport", "{err}");
    let text = err.to_string();
    assert!(text.contains("could not connect"), "{text}");
    assert!(!text.contains("hidden") && !text.contains(SECRET), "{text}");
}

#[tokio::test]
async fn missing_command_gives_a_clear_error() {
    let mut config = McpServerConfig::stdio("ghost", "kiln-no-such-mcp-server-binary");
    config.timeout_seconds = Some(5);
    let err = McpClient::connect(&config).await.unwrap_err();
    assert!(matches!(err, McpError::Spawn { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "could not start MCP server `ghost`: command `kiln-no-such-mcp-server-binary` was not found"
    );
}

#[tokio::test]
async fn server_that_is_not_mcp_gives_an_error() {
    // `cat` echoes our initialize request back. The client answers that
    // "request" with "method not supported", which `cat` echoes too, and
    // that is taken as the server's error answer to initialize.
    let mut config = McpServerConfig::stdio("cat", "cat");
    config.timeout_seconds = Some(5);
    let err = McpClient::connect(&config).await.unwrap_err();
    assert_eq!(err.code(), "rpc_error", "{err}");
    // `true` exits at once: the handshake fails as closed, not as a hang.
    let mut config = McpServerConfig::stdio("gone", "true");
    config.timeout_seconds = Some(5);
    let err = McpClient::connect(&config).await.unwrap_err();
    assert_eq!(err.code(), "closed", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_exiting_during_a_call_gives_an_error_and_the_next_call_reconnects() {
    if !mcp_available() {
        return;
    }
    let client = stdio_client().await;
    let tools = client.tools();
    let err = tool(&tools, "fixture__exit_now")
        .call(&json!({}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no longer running"), "{err}");
    // The next call starts the server again and is answered; the call that
    // was under way is not sent again.
    let out = tool(&tools, "fixture__add")
        .call(&json!({"a": 1, "b": 1}))
        .await
        .unwrap();
    assert_eq!(out.text, "2");
    // And again, after the new child exits too.
    tool(&tools, "fixture__exit_now")
        .call(&json!({}))
        .await
        .unwrap_err();
    let out = tool(&tools, "fixture__echo")
        .call(&json!({"text": "back"}))
        .await
        .unwrap();
    assert_eq!(out.text, "back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_cannot_be_reached_again_is_retried_with_backoff() {
    if !mcp_available() {
        return;
    }
    let dir = tempfile_dir();
    // A wrapper that runs the fixture only while a flag file exists.
    let flag = dir.join("up");
    std::fs::write(&flag, "").unwrap();
    let wrapper = format!(
        "import os, sys\nif not os.path.exists({flag:?}): sys.exit(7)\nos.execv(sys.executable, [sys.executable, {fixture:?}, 'stdio'])\n",
        flag = flag.display().to_string(),
        fixture = fixture()
    );
    let config = McpServerConfig {
        name: "flaky".into(),
        transport: McpTransportConfig::Stdio {
            command: "python3".into(),
            args: vec!["-c".into(), wrapper],
            env: BTreeMap::new(),
        },
        timeout_seconds: Some(20),
    };
    let client = McpClient::connect(&config).await.unwrap();
    let tools = client.tools();
    tool(&tools, "flaky__exit_now")
        .call(&json!({}))
        .await
        .unwrap_err();
    std::fs::remove_file(&flag).unwrap();
    let err = tool(&tools, "flaky__add")
        .call(&json!({"a": 1, "b": 2}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("reconnecting failed"), "{err}");
    // Within the backoff, calls fail at once without trying.
    let err = tool(&tools, "flaky__add")
        .call(&json!({"a": 1, "b": 2}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("trying again shortly"), "{err}");
    std::fs::write(&flag, "").unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let out = tool(&tools, "flaky__add")
        .call(&json!({"a": 1, "b": 2}))
        .await
        .unwrap();
    assert_eq!(out.text, "3");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_server_that_restarts_gets_a_new_session() {
    if !mcp_available() {
        return;
    }
    let server = http_server();
    let port: u16 = server
        .url
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let client = McpClient::connect(&http_config(&server.url)).await.unwrap();
    let tools = client.tools();
    let add = tool(&tools, "web__add");
    assert_eq!(add.call(&json!({"a": 2, "b": 2})).await.unwrap().text, "4");
    drop(server);
    let err = add.call(&json!({"a": 2, "b": 2})).await.unwrap_err();
    assert!(err.to_string().contains("MCP server `web`"), "{err}");
    // Back on the same address, knowing nothing of the old session.
    let _server = http_server_on(port);
    let start = Instant::now();
    let out = loop {
        match add.call(&json!({"a": 2, "b": 3})).await {
            Ok(out) => break out,
            Err(e) => {
                assert!(start.elapsed() < Duration::from_secs(20), "{e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    assert_eq!(out.text, "5");
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-mcp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_call_times_out() {
    if !mcp_available() {
        return;
    }
    let client = stdio_client()
        .await
        .with_timeout(Duration::from_millis(500));
    assert_eq!(client.timeout(), Duration::from_millis(500));
    let tools = client.tools();
    let err = tool(&tools, "fixture__slow_echo")
        .call(&json!({"text": "x", "delay_ms": 5_000}))
        .await
        .unwrap_err();
    assert_eq!(err, ToolError::Timeout(Duration::from_millis(500)));
    // The connection still works afterwards.
    let out = tool(&tools, "fixture__add")
        .call(&json!({"a": 2, "b": 3}))
        .await
        .unwrap();
    assert_eq!(out.text, "5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_env_is_passed_withheld_and_redacted() {
    if !mcp_available() {
        return;
    }
    let mut config = stdio_config("fixture");
    if let McpTransportConfig::Stdio { env, .. } = &mut config.transport {
        env.insert("KILN_MCP_TOKEN".to_owned(), "sk-env-4d5e6f".to_owned());
    }
    let client = McpClient::connect(&config).await.unwrap();
    let tools = client.tools();
    let getenv = tool(&tools, "fixture__getenv");
    // The child has the value, but the model sees it scrubbed.
    let out = getenv
        .call(&json!({"name": "KILN_MCP_TOKEN"}))
        .await
        .unwrap();
    assert_eq!(out.text, "[REDACTED]");
    // Kiln's own environment (beyond PATH, HOME, ...) is not inherited.
    if std::env::var_os("CARGO_PKG_NAME").is_some() {
        let out = getenv
            .call(&json!({"name": "CARGO_PKG_NAME"}))
            .await
            .unwrap();
        assert_eq!(out.text, "<unset>");
    }
    assert!(!format!("{config:?}").contains("sk-env-4d5e6f"));
}
