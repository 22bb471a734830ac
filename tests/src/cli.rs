//! Checks of a binary's command line: refused flags named in the error, every flag in `--help`.
//!
//! The agent's and the server's own tests include this file by path (they need the binary
//! Cargo builds for their package, and none of this library), so it uses nothing but `std`.

use std::process::Command;

/// Runs `command` (a binary given `case` among its arguments) and asserts that it fails and
/// says `expected` on stderr.
pub fn assert_refused(command: &mut Command, case: &[&str], expected: &str) {
    let output = command.output().expect("the binary starts");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{case:?} must fail");
    assert!(
        stderr.contains(expected),
        "{case:?}: expected {expected:?} in {stderr}"
    );
}

/// Asserts that the `--help` of the binary at `bin` mentions every one of `words` (flags and
/// their environment variables); returns the help.
pub fn assert_help_explains(bin: &str, words: &[&str]) -> String {
    let output = Command::new(bin)
        .arg("--help")
        .output()
        .expect("the binary starts");
    let help = String::from_utf8_lossy(&output.stdout).into_owned();
    for word in words {
        assert!(help.contains(word), "{word} missing from --help:\n{help}");
    }
    help
}
