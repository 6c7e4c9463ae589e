//! The thread pool all of the crate's parallel work runs on.
//!
//! One pool per process, sized by `TEXTSPAN_NUM_THREADS` (default: rayon's own choice) or by
//! `set_num_threads`. A process forked from one that already used the pool (a PyTorch
//! DataLoader worker, say) inherits the pool's bookkeeping but none of its threads, so the
//! pool is keyed by process id and rebuilt in the child instead of deadlocking on threads
//! that no longer exist.
//!
//! Every parallel loop in the crate splits its work into pieces of a fixed size and reduces
//! the pieces in a fixed order, so results do not depend on the number of threads.

use std::sync::{Arc, Mutex};

use rayon::{ThreadPool, ThreadPoolBuilder};

struct PoolSlot {
    pid: u32,
    threads: usize,
    pool: Arc<ThreadPool>,
}

static POOL: Mutex<Option<PoolSlot>> = Mutex::new(None);
static REQUESTED: Mutex<Option<usize>> = Mutex::new(None);

/// The number of threads asked for: `set_num_threads`, else `TEXTSPAN_NUM_THREADS`,
/// else 0 (rayon's default, one per core).
fn requested_threads() -> usize {
    if let Some(n) = *REQUESTED.lock().unwrap_or_else(|e| e.into_inner()) {
        return n;
    }
    std::env::var("TEXTSPAN_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0)
}

/// Sets the number of threads for later calls; 0 restores the default.
pub fn set_num_threads(n: usize) {
    *REQUESTED.lock().unwrap_or_else(|e| e.into_inner()) = Some(n);
}

/// The current pool, built on first use, after a fork, or after the thread count changed.
fn pool() -> Arc<ThreadPool> {
    // faer's own operators (products, decompositions) run on one thread each: the crate
    // parallelises over heads, texts and row blocks itself, in thread-independent pieces.
    faer::set_global_parallelism(faer::Par::Seq);
    let pid = std::process::id();
    let threads = requested_threads();
    let mut slot = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = slot.as_ref() {
        if s.pid == pid && s.threads == threads {
            return Arc::clone(&s.pool);
        }
    }
    let pool = Arc::new(
        ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("textspan-{i}"))
            .build()
            .expect("building the rayon thread pool"),
    );
    *slot = Some(PoolSlot {
        pid,
        threads,
        pool: Arc::clone(&pool),
    });
    pool
}

/// The number of threads the pool runs.
pub fn num_threads() -> usize {
    pool().current_num_threads()
}

/// Runs `f` inside the crate's pool, so that rayon calls in it use that pool.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    pool().install(f)
}
