//! Start-up: bad models and bad configuration end the process with a clear
//! error naming the problem, never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;

use common::{kiln, test_home, CHAT_MODEL};

fn serve_output(args: &[&str]) -> (bool, String) {
    let out = kiln()
        .args(["serve", "--port", "0"])
        .args(args)
        .output()
        .expect("run kiln");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "kiln panicked: {stderr}");
    (out.status.success(), stderr)
}

#[test]
fn corrupt_gguf_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corrupt.gguf");
    std::fs::write(&path, b"this is not a gguf file at all, just text").unwrap();
    let (ok, stderr) = serve_output(&["--model", path.to_str().unwrap()]);
    assert!(!ok, "kiln started on a corrupt file");
    assert!(
        stderr.contains("corrupt.gguf"),
        "error does not name the file: {stderr}"
    );
}

#[test]
fn truncated_gguf_is_refused_naming_the_file() {
    let real = test_home()
        .join("models")
        .join(CHAT_MODEL)
        .join("model.gguf");
    let bytes = std::fs::read(&real).expect("the test model is installed");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("truncated.gguf");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&bytes[..bytes.len() / 3]).unwrap();
    drop(f);
    let (ok, stderr) = serve_output(&["--model", path.to_str().unwrap()]);
    assert!(!ok, "kiln started on a truncated file");
    assert!(
        stderr.contains("truncated.gguf"),
        "error does not name the file: {stderr}"
    );
}

#[test]
fn missing_model_is_refused() {
    let (ok, stderr) = serve_output(&["--model", "no-such-model"]);
    assert!(!ok);
    assert!(stderr.contains("no-such-model"), "{stderr}");
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let out = kiln()
        .args(["serve", "--validate-config"])
        .env("KILN_PORT", "eighty")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("KILN_PORT"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kiln.toml");
    std::fs::write(&file, "queue_capacity = 0\n").unwrap();
    let out = kiln()
        .args([
            "serve",
            "--validate-config",
            "--config",
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("queue_capacity"));

    std::fs::write(&file, "prot = 1\n").unwrap();
    let out = kiln()
        .args([
            "serve",
            "--validate-config",
            "--config",
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn validate_config_accepts_a_good_configuration() {
    let out = kiln()
        .args([
            "serve",
            "--validate-config",
            "--model",
            CHAT_MODEL,
            "--port",
            "0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("configuration is valid"), "{stderr}");
}

#[test]
fn models_command_lists_installed_models() {
    let out = kiln().args(["models"]).output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("NAME") && stdout.contains(CHAT_MODEL),
        "{stdout}"
    );
    assert!(
        stdout.contains("llama") && stdout.contains("Q4_1"),
        "{stdout}"
    );
}

#[test]
fn chat_command_answers_and_quits() {
    use std::process::Stdio;
    let mut child = kiln()
        .args([
            "chat",
            "--model",
            CHAT_MODEL,
            "--max-tokens",
            "5",
            "--temperature",
            "0",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Say hello.\n/exit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "no reply; {stderr}"
    );
}
