//! What the worker binary's tests (cli.rs, joining.rs) check of its stderr. A module of each, not a test target of
//! its own.

/// The one `error:` line a failing worker prints; fails the test if there are more, none, or a panic.
pub fn one_error_line(stderr: &str) -> &str {
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    errors[0]
}
