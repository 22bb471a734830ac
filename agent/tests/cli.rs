//! The `cplink-agent` binary: configuration errors name the flag; help explains every flag.

#![allow(clippy::unwrap_used)] // test code: a failed setup step should panic with its location

use std::process::Command;

#[path = "../../tests/src/cli.rs"]
mod cli;

const BIN: &str = env!("CARGO_BIN_EXE_cplink-agent");

#[test]
fn configuration_errors_name_the_flag() {
    let base = [
        "--server-address",
        "127.0.0.1:1",
        "--tls-cert",
        "/nonexistent.crt",
        "--tls-key",
        "/k",
        "--server-ca",
        "/ca",
    ];
    let cases: [(&[&str], &str); 8] = [
        (&["--allow", "10.0.0.0/33"], "--allow"),
        (&["--protocol", "grpc"], "--protocol"),
        (&["--pod-cidr", "10.0.0.0"], "--pod-cidr"),
        (&["--dial-timeout", "soon"], "--dial-timeout"),
        (
            &["--worker-threads", "0"],
            "'--worker-threads <N>': must be at least 1",
        ),
        (
            &["--server-service", "link-agent-endpoint"],
            "--server-service: cannot be combined with --server-address",
        ),
        (
            &["--pod-cidr-from-node"],
            "--pod-cidr-from-node: needs --node-name",
        ),
        (
            &[],
            "--tls-cert: cannot read certificate from /nonexistent.crt",
        ),
    ];
    for (args, expected) in cases {
        cli::assert_refused(Command::new(BIN).args(base).args(args), args, expected);
    }
}

#[test]
fn every_flag_is_explained_with_its_environment_variable() {
    cli::assert_help_explains(
        BIN,
        &[
            "--server-address",
            "--allow",
            "--dial-timeout",
            "--reconnect-max-backoff",
            "CPLINK_ALLOW",
            "--protocol",
            "CPLINK_PROTOCOL",
            "--service-account-token-path",
            "CPLINK_SERVICE_ACCOUNT_TOKEN_PATH",
            "--server-service",
            "CPLINK_SERVER_SERVICE",
            "--server-namespace",
            "CPLINK_SERVER_NAMESPACE",
            "--pod-cidr-from-node",
            "CPLINK_POD_CIDR_FROM_NODE",
            "--kubeconfig",
            "CPLINK_KUBECONFIG",
            "--worker-threads",
            "CPLINK_WORKER_THREADS",
        ],
    );
}
