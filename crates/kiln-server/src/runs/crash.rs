//! Fault injection for the crash tests: with `KILN_CRASH_AT=POINT:N` in
//! its environment, the process kills itself with SIGKILL the `N`th time
//! (from 1) a run passes `POINT`. The points are the journal's writes:
//! `begun` (a step's input is journaled, its work not started), `worked`
//! (its work is done, its output not journaled), `finished` (its output is
//! journaled) and `ending` (every step is journaled, the run's end is not).
//! Unset, it costs one look at a `OnceLock`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

pub const VARIABLE: &str = "KILN_CRASH_AT";

static PLAN: OnceLock<Option<(String, u64)>> = OnceLock::new();
static PASSED: AtomicU64 = AtomicU64::new(0);

fn plan() -> &'static Option<(String, u64)> {
    PLAN.get_or_init(|| {
        let text = std::env::var(VARIABLE).ok()?;
        let (point, n) = text.split_once(':').unwrap_or((text.as_str(), "1"));
        let n = n.trim().parse().ok().filter(|&n| n > 0)?;
        tracing::warn!(
            point,
            n,
            "{VARIABLE} is set: this process will kill itself there"
        );
        Some((point.trim().to_string(), n))
    })
}

pub fn point(name: &str) {
    let Some((point, n)) = plan() else {
        return;
    };
    if point != name || PASSED.fetch_add(1, Ordering::SeqCst) + 1 != *n {
        return;
    }
    eprintln!("{VARIABLE}: killing this process at `{name}` #{n}");
    let pid = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    // Never go on past the point.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}
