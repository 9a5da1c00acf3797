//! The mock answers like an OpenAI server: usage counts, streams with a
//! usage chunk on request, and a clear 400 for a body that is not JSON.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

fn post(port: u16, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    (status, out)
}

#[test]
fn answers_like_an_openai_server() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-mock-upstream"))
        .args(["--port", "0", "--tokens", "5"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line.trim().rsplit(':').next().unwrap().parse().unwrap();

    let (status, body) = post(
        port,
        "/v1/chat/completions",
        r#"{"model":"m","messages":[{"role":"user","content":"one two three"}],"max_tokens":3}"#,
    );
    assert_eq!(status, 200);
    assert!(body.contains(r#""completion_tokens":3"#), "{body}");
    assert!(body.contains(r#""prompt_tokens":4"#), "{body}");

    let (_, stream) = post(
        port,
        "/v1/completions",
        r#"{"model":"m","prompt":"a b","stream":true,"stream_options":{"include_usage":true}}"#,
    );
    assert_eq!(stream.matches("data: ").count(), 5 + 1 + 1 + 1, "{stream}");
    assert!(stream.contains(r#""completion_tokens":5"#) && stream.contains("data: [DONE]"));

    let (status, _) = post(port, "/v1/chat/completions", "not json");
    assert_eq!(status, 400);
    child.kill().unwrap();
    child.wait().unwrap();
}
