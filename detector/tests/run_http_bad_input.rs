//! Bad HTTP and Kubernetes settings of `detector run` get a one-line error naming the problem
//! and the fix, before anything is loaded (no root needed).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

use std::process::{Command, Output};

const DETECTOR: &str = env!("CARGO_BIN_EXE_detector");

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(DETECTOR);
    c.arg("run")
        .args(args)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("NODE_NAME");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run detector")
}

fn one_line_error(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "expected failure: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "one error line expected: {stderr}");
    errors[0].to_string()
}

fn temp(name: &str, contents: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("detector-http-bad-{}-{name}", std::process::id()));
    std::fs::write(&p, contents).unwrap();
    p
}

#[test]
fn listen_must_be_an_address_or_off() {
    let err = one_line_error(&run(&["--listen", "localhost-ish"], &[]));
    assert!(err.contains("--listen localhost-ish"), "{err}");
    assert!(err.contains("IP:PORT") && err.contains("off"), "{err}");
}

#[test]
fn a_given_listen_address_that_cannot_bind_is_an_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let err = one_line_error(&run(&["--listen", &addr], &[]));
    assert!(
        err.contains(&format!("--listen {addr}: cannot bind")),
        "{err}"
    );
}

#[test]
fn the_token_file_must_exist_and_hold_a_token() {
    let err = one_line_error(&run(&["--token-file", "/nonexistent/token"], &[]));
    assert!(err.contains("--token-file /nonexistent/token"), "{err}");
    let empty = temp("empty-token", " \n");
    let err = one_line_error(&run(&["--token-file", empty.to_str().unwrap()], &[]));
    assert!(err.contains("is empty"), "{err}");
    let _ = std::fs::remove_file(empty);
}

#[test]
fn kube_on_needs_the_node_name() {
    let err = one_line_error(&run(&["--listen", "off", "--kube", "on"], &[]));
    assert!(
        err.contains("--node-name") && err.contains("NODE_NAME"),
        "{err}"
    );
}

#[test]
fn kube_on_without_a_configuration_says_so() {
    let out = run(
        &["--listen", "off", "--kube", "on", "--node-name", "node-a"],
        &[
            ("KUBECONFIG", "/nonexistent/kubeconfig"),
            ("HOME", "/nonexistent"),
        ],
    );
    let err = one_line_error(&out);
    assert!(err.contains("no Kubernetes API configuration"), "{err}");
    assert!(err.contains("--kube off"), "{err}");
}

#[test]
fn kube_on_with_an_unreachable_api_server_says_so() {
    // A kubeconfig naming a loopback port where nothing listens.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = temp(
        "kubeconfig",
        &format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: \
             http://127.0.0.1:{port}\ncontexts:\n- name: x\n  context:\n    cluster: c\n    \
             user: u\ncurrent-context: x\nusers:\n- name: u\n  user:\n    token: t\n"
        ),
    );
    let out = run(
        &["--listen", "off", "--kube", "on", "--node-name", "node-a"],
        &[("KUBECONFIG", cfg.to_str().unwrap())],
    );
    let err = one_line_error(&out);
    assert!(err.contains("not reachable"), "{err}");
    assert!(err.contains("--kube off"), "{err}");
    let _ = std::fs::remove_file(cfg);
}
