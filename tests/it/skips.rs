//! Skips made visible. A test that cannot run here (no VMM binary, no KVM,
//! no promtool…) passes after one `SKIPPED: <test>: <what is missing>` line,
//! and in a long run that line scrolls by among two hundred `ok`s. So every
//! skip is also recorded, and when the test binary exits (after libtest's
//! own summary, also when tests failed) the list is printed again, once, to
//! stderr, which cargo test, `make test` and `.ci/run` pass through to the
//! terminal: a green run that checked less than it could says so at its end.
//! The library's unit tests use the same file (`src/lib.rs` includes it).

use std::io::Write;
use std::sync::{Mutex, Once, PoisonError};

/// The heading of the summary; the check in this module looks for it.
pub const SUMMARY_HEADING: &str = "skipped in this run (these tests passed without checking";

static SKIPS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static AT_EXIT: Once = Once::new();

/// Records that `test` skipped because `what` is missing, and prints the
/// SKIPPED line now, past libtest's capture.
pub fn skip(test: &str, what: &str) {
    let line = format!("SKIPPED: {test}: {what}");
    // Straight to stderr: libtest captures only the print macros.
    let _ = writeln!(std::io::stderr(), "{line}");
    SKIPS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(line);
    AT_EXIT.call_once(register_summary);
}

#[allow(unsafe_code)]
fn register_summary() {
    // SAFETY: `atexit` only stores the pointer to a function with the C ABI
    // and no arguments; `print_summary` never unwinds (it cannot panic: no
    // unwrap, a poisoned lock is taken as is, write errors are ignored) and
    // only touches a static and stderr, both alive until the process ends.
    let rc = unsafe { libc::atexit(print_summary) };
    if rc != 0 {
        let _ = writeln!(
            std::io::stderr(),
            "skips: could not register the exit summary (atexit failed)"
        );
    }
}

extern "C" fn print_summary() {
    let mut skips = SKIPS.lock().unwrap_or_else(PoisonError::into_inner);
    skips.sort();
    if skips.is_empty() {
        return;
    }
    let mut text = format!("\n{} {SUMMARY_HEADING} what they are for):\n", skips.len());
    for line in skips.iter() {
        text.push_str("  ");
        text.push_str(line);
        text.push('\n');
    }
    let _ = std::io::stderr().write_all(text.as_bytes());
}
