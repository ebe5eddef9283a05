//! Garbage collection of the connection-tracking map: deletes the entries of flows that are
//! over, in both families' maps (`CONNTRACK`, `CONNTRACK6`). The datapath only ever ignores or overwrites expired entries; deleting them is what
//! frees the source ports of source-NATed flows and keeps the LRU from evicting live flows in
//! favour of dead ones.
//!
//! A pass reads every entry (two syscalls each: about 9 µs per entry here, 1.7 s for 200k),
//! so the agent runs it on a thread of its own, with its own handle on the pinned map, where
//! it never holds up a sync or a signal.

use std::borrow::BorrowMut;
use std::collections::{HashMap as StdHashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use aya::maps::{HashMap, Map, MapData, MapError};
use aya::Pod;
use lb_common::{conntrack, names, snat, Addr, CtEntry, CtKey, CT_F_SNAT, V4, V6};
use log::{debug, warn};

use super::monotonic_ns;

/// What one pass over a conntrack map found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Entries deleted: flows that were over.
    pub deleted: usize,
    /// Entries left (two per tracked flow, one per direction), as of the pass.
    pub remaining: usize,
}

/// Deletes the entries of flows that are over (`conntrack::flow_over`, plus the SNAT port
/// hold), both entries of a flow together, and says how many went and how many are left.
pub fn collect<T: BorrowMut<MapData>, A: Addr>(
    ct: &mut HashMap<T, CtKey<A>, CtEntry<A>>,
) -> Result<Sweep, MapError>
where
    CtKey<A>: Pod,
    CtEntry<A>: Pod,
{
    let entries: StdHashMap<CtKey<A>, CtEntry<A>> = ct.iter().filter_map(Result::ok).collect();
    // Read after the pass, so no entry in it was stamped later than `now`.
    let now = monotonic_ns();
    let over: Vec<CtKey<A>> = entries
        .iter()
        .filter(|(key, e)| {
            finished(
                key,
                e,
                partner(key, e, |k| entries.get(k).copied()).as_ref(),
                now,
            )
        })
        .map(|(key, _)| *key)
        .collect();
    let mut deleted = 0;
    let mut gone = HashSet::new();
    for key in &over {
        if gone.contains(key) {
            continue;
        }
        // Looked at again just before deleting: a new flow may have taken the tuple since
        // the pass read it (the datapath overwrites stale entries). A flow goes with both its
        // entries at once: alone, the other might not look over by its own state. (A packet
        // can still refresh an entry between this look and the delete; the window is a
        // syscall long, and the flow's next packet then starts it afresh.)
        let Ok(e) = ct.get(key, 0) else { continue };
        let other_key = e.other_key(key.proto);
        let other = partner(key, &e, |k| ct.get(k, 0).ok());
        if !finished(key, &e, other.as_ref(), monotonic_ns()) {
            continue;
        }
        for k in std::iter::once(*key).chain(other.map(|_| other_key)) {
            if ct.remove(&k).is_ok() {
                deleted += 1;
                gone.insert(k);
            }
        }
    }
    Ok(Sweep {
        deleted,
        remaining: entries.len().saturating_sub(deleted),
    })
}

/// The entry of `e`'s other direction, if it is really `e`'s: a tuple reused by a new flow
/// overwrites the forward entry and leaves the old reverse one behind, naming an entry that
/// now belongs to someone else. Judged together, the orphan would take the new flow down.
fn partner<A: Addr>(
    key: &CtKey<A>,
    e: &CtEntry<A>,
    get: impl Fn(&CtKey<A>) -> Option<CtEntry<A>>,
) -> Option<CtEntry<A>> {
    get(&e.other_key(key.proto)).filter(|o| o.other_key(key.proto) == *key)
}

/// Over, and (for a source-NATed flow) its port held long enough: a backend that closed
/// first keeps the tuple in TIME_WAIT for 60 s, and a new flow on the same port would meet it.
fn finished<A: Addr>(key: &CtKey<A>, e: &CtEntry<A>, other: Option<&CtEntry<A>>, now: u64) -> bool {
    let other_seen = other.map(|o| (o.tcp_state, o.last_seen_ns));
    if !conntrack::flow_over(key.proto, e.tcp_state, e.last_seen_ns, other_seen, now) {
        return false;
    }
    let held = |seen: u64| now.wrapping_sub(seen) <= snat::HOLD_NS;
    e.flags & CT_F_SNAT == 0
        || !(held(e.last_seen_ns) || other.is_some_and(|o| held(o.last_seen_ns)))
}

/// The collector thread; stopped (and joined) on drop.
pub struct Collector {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Collector {
    /// Collects the CONNTRACK and CONNTRACK6 maps pinned under `pin_dir` now and every `every`, and
    /// tells `on_sweep` what each pass of each map (named) found.
    pub fn spawn(
        pin_dir: &Path,
        every: Duration,
        on_sweep: impl Fn(&'static str, Sweep) + Send + 'static,
    ) -> Result<Collector, MapError> {
        let mut ct4: HashMap<MapData, CtKey<V4>, CtEntry<V4>> = open(pin_dir, names::CONNTRACK)?;
        let mut ct6: HashMap<MapData, CtKey<V6>, CtEntry<V6>> = open(pin_dir, names::CONNTRACK6)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("conntrack-gc".into())
            .spawn(move || {
                // A pass at once, then one every `every`: a restarted agent clears what
                // ended while it was away, and the entry count is known from the start.
                loop {
                    let started = std::time::Instant::now();
                    // Each family on its own: a failure in one does not spare the other.
                    for (name, result) in [
                        (names::CONNTRACK, collect(&mut ct4)),
                        (names::CONNTRACK6, collect(&mut ct6)),
                    ] {
                        match result {
                            Ok(sweep) => {
                                if sweep.deleted > 0 {
                                    debug!(
                                        "{name}: deleted {} entries of finished flows in {:?}",
                                        sweep.deleted,
                                        started.elapsed()
                                    );
                                }
                                on_sweep(name, sweep);
                            }
                            Err(e) => warn!("{name}: garbage collection failed: {e}"),
                        }
                    }
                    if sleep_unless_stopped(&flag, every) {
                        break;
                    }
                }
            })
            .map_err(MapError::IoError)?;
        Ok(Collector {
            stop,
            thread: Some(thread),
        })
    }
}

fn open<K: Pod, V: Pod>(pin_dir: &Path, name: &str) -> Result<HashMap<MapData, K, V>, MapError> {
    let data = MapData::from_pin(pin_dir.join(name))?;
    Map::HashMap(data).try_into()
}

/// Sleeps `total` in short steps; true as soon as `stop` is set.
fn sleep_unless_stopped(stop: &AtomicBool, total: Duration) -> bool {
    let step = Duration::from_millis(100);
    let mut slept = Duration::ZERO;
    while slept < total {
        if stop.load(Ordering::Relaxed) {
            return true;
        }
        std::thread::sleep(step);
        slept += step;
    }
    stop.load(Ordering::Relaxed)
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
