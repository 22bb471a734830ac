//! The `cplink-server` binary: configuration errors, readiness, and a clean exit on SIGTERM.

#![allow(clippy::unwrap_used)] // test code: a failed setup step should panic with its location

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../../tests/src/cli.rs"]
mod cli;

const BIN: &str = env!("CARGO_BIN_EXE_cplink-server");

fn write_certs(dir: &std::path::Path) -> (String, String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (c, k, ca) = (dir.join("tls.crt"), dir.join("tls.key"), dir.join("ca.crt"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    std::fs::write(&ca, cert.pem()).unwrap();
    let s = |p: std::path::PathBuf| p.display().to_string();
    (s(c), s(k), s(ca))
}

#[test]
fn configuration_errors_name_the_flag_and_nothing_listens() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = write_certs(dir.path());
    let tls = ["--tls-cert", &cert, "--tls-key", &key, "--agent-ca", &ca];
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec![
                "--tls-cert",
                "/nonexistent.crt",
                "--tls-key",
                &key,
                "--agent-ca",
                &ca,
            ],
            "--tls-cert: cannot read certificate from /nonexistent.crt",
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", &cert, "--agent-ca", &ca],
            "--tls-key",
        ),
        (
            [&tls[..], &["--frontend-address", "127.0.0.1:0"]].concat(),
            "--frontend-ca: required with --frontend-address",
        ),
        (
            [&tls[..], &["--strategies", "node,nearest"]].concat(),
            "--strategies: unknown strategy \"nearest\"",
        ),
    ];
    for (args, expected) in cases {
        let mut command = Command::new(BIN);
        command.args(&args).args([
            "--agent-address",
            "127.0.0.1:0",
            "--admin-address",
            "127.0.0.1:0",
        ]);
        cli::assert_refused(&mut command, &args, expected);
    }
}

#[test]
fn every_flag_is_explained_with_its_environment_variable() {
    cli::assert_help_explains(
        BIN,
        &[
            "--agent-address",
            "--frontend-uds",
            "--drain-timeout",
            "--strategies",
            "--log-format",
            "CPLINK_AGENT_ADDRESS",
            "--worker-threads",
            "CPLINK_WORKER_THREADS",
        ],
    );
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = write_certs(dir.path());
    // Reserve an admin port, then hand it over.
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let uds = dir.path().join("frontend.sock");
    let mut child = Command::new(BIN)
        .args(["--tls-cert", &cert, "--tls-key", &key, "--agent-ca", &ca])
        .args([
            "--agent-address",
            "127.0.0.1:0",
            "--admin-address",
            &admin.to_string(),
        ])
        .args([
            "--frontend-uds",
            &uds.display().to_string(),
            "--log-format",
            "json",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let healthy = loop {
        if let Ok(mut s) = TcpStream::connect(admin) {
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut r = String::new();
            let _ = s.read_to_string(&mut r);
            break r;
        }
        assert!(Instant::now() < deadline, "admin endpoint never came up");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(healthy.starts_with("HTTP/1.1 200"), "{healthy}");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&uds).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o660);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "server did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "exit status {exit:?}");
    assert!(!uds.exists(), "the socket file is removed on shutdown");
    let logs: Vec<String> = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .collect();
    assert!(
        logs.iter().all(|l| l.starts_with('{')),
        "json logs: {logs:?}"
    );
    assert!(
        logs.iter().any(|l| l.contains("cplink-server stopped")),
        "{logs:?}"
    );
}
