//! Fuzzes the uevent parser: any bytes must give Ok or Err, never a panic, and a parsed wedge
//! must satisfy the invariants the agent relies on.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(ev)) = unwedge_agent::uevent::parse(data) {
        assert!(!ev.methods.is_empty());
        assert!(ev.methods.iter().all(|m| is_method_token(m)));
        assert!(ev.card.starts_with("card"));
        assert_eq!(ev.action, "change");
    }
});

/// `[a-z0-9][a-z0-9-]*`, as docs/design.md §1 defines a method token.
fn is_method_token(m: &str) -> bool {
    let b = m.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}
