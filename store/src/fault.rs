//! Bugs a test can switch on, to show that the chaos suite catches them.
//!
//! `FLOTILLA_TEST_FAULT=NAME[,NAME...]` turns them on in debug builds, the builds the tests
//! run; release builds compile none of this in, so the variable does nothing there.
//!
//! - `stale-reads`: a follower answers linearizable reads from its local state without
//!   obtaining the read index from the leader.
//! - `slow-append`: this member, leading, sends AppendEntries that carry entries 1 s late
//!   (heartbeats go at once): its entries commit late while it still confirms its
//!   leadership, so a read index that ignores entries it holds shows.
//! - `panic-on-apply`, `fail-on-apply`: applying a put of the key `flotilla-test/fatal`
//!   panics, or fails as a storage error does (to show that the member then stops).

/// Whether the fault `name` is switched on.
#[cfg(debug_assertions)]
pub fn enabled(name: &str) -> bool {
    static FAULTS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    FAULTS
        .get_or_init(|| {
            let faults: Vec<String> = std::env::var("FLOTILLA_TEST_FAULT")
                .unwrap_or_default()
                .split(',')
                .map(|f| f.trim().to_string())
                .filter(|f| !f.is_empty())
                .collect();
            if !faults.is_empty() {
                tracing::warn!(
                    ?faults,
                    "test faults switched on: this member is deliberately broken"
                );
            }
            faults
        })
        .iter()
        .any(|f| f == name)
}

/// Whether the fault `name` is switched on: never, in a release build.
#[cfg(not(debug_assertions))]
pub fn enabled(_name: &str) -> bool {
    false
}
