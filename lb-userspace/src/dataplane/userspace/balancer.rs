//! Endpoint selection for one portal: round robin, with ClientIP session affinity, as
//! kube-proxy's `pkg/proxy/userspace/roundrobin.go` (`LoadBalancerRR`).
//!
//! Time is passed in (`now`), so affinity expiry is tested without waiting. The state is
//! shared between the dataplane, which updates it in place when endpoints change, and the
//! portal's tasks, which pick from it: [`Shared`], a plain mutex held only for a pick.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// A balancer shared by the dataplane and a portal's tasks.
pub type Shared = Arc<Mutex<Balancer>>;

/// Where a client sticks, and since when it last used it.
#[derive(Clone, Copy, Debug)]
struct Sticky {
    endpoint: SocketAddr,
    last_used: Instant,
}

#[derive(Debug, Default)]
pub struct Balancer {
    endpoints: Vec<SocketAddr>,
    /// The next endpoint round robin gives.
    next: usize,
    /// ClientIP affinity: how long a client keeps its endpoint after its last connection.
    affinity: Option<Duration>,
    sticky: HashMap<IpAddr, Sticky>,
}

impl Balancer {
    pub fn new(endpoints: Vec<SocketAddr>, affinity: Option<Duration>) -> Balancer {
        let mut b = Balancer::default();
        b.update(endpoints, affinity);
        b
    }

    /// Takes a new endpoint list (and affinity setting). Clients stuck to an endpoint that
    /// is gone are forgotten (kube-proxy's `removeStaleAffinity`); the rest keep theirs.
    pub fn update(&mut self, endpoints: Vec<SocketAddr>, affinity: Option<Duration>) {
        if affinity.is_none() {
            self.sticky.clear();
        }
        self.affinity = affinity;
        if endpoints != self.endpoints {
            self.sticky.retain(|_, s| endpoints.contains(&s.endpoint));
            self.endpoints = endpoints;
            self.next = 0;
        }
    }

    /// The endpoint for a new connection or association from `client`: the one it sticks
    /// to, unless `reset_affinity` (a retry after that one failed) or its affinity expired;
    /// else the next in turn, which it then sticks to. `None` without endpoints.
    pub fn pick(
        &mut self,
        client: IpAddr,
        reset_affinity: bool,
        now: Instant,
    ) -> Option<SocketAddr> {
        if self.endpoints.is_empty() {
            return None;
        }
        if let (Some(ttl), false) = (self.affinity, reset_affinity) {
            if let Some(s) = self.sticky.get_mut(&client) {
                if now.saturating_duration_since(s.last_used) < ttl {
                    s.last_used = now;
                    return Some(s.endpoint);
                }
            }
        }
        let endpoint = self.endpoints[self.next % self.endpoints.len()];
        self.next = (self.next + 1) % self.endpoints.len();
        if self.affinity.is_some() {
            self.sticky.insert(
                client,
                Sticky {
                    endpoint,
                    last_used: now,
                },
            );
        }
        Some(endpoint)
    }

    /// Forgets the clients whose affinity expired (kube-proxy's `CleanupStaleStickySessions`,
    /// which it ran at every sync), so the table does not grow without end.
    pub fn prune(&mut self, now: Instant) {
        if let Some(ttl) = self.affinity {
            self.sticky
                .retain(|_, s| now.saturating_duration_since(s.last_used) < ttl);
        }
    }

    /// Clients currently stuck to an endpoint.
    #[cfg(test)]
    pub fn sticky_clients(&self) -> usize {
        self.sticky.len()
    }
}

/// Picks from a shared balancer.
pub fn pick(b: &Shared, client: IpAddr, reset_affinity: bool) -> Option<SocketAddr> {
    lock(b).pick(client, reset_affinity, Instant::now())
}

/// Locks a shared balancer. A task that panicked while holding it left nothing half-done
/// (every change is a whole assignment), so a poisoned lock is used as it is.
pub fn lock(b: &Shared) -> std::sync::MutexGuard<'_, Balancer> {
    b.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn round_robin_cycles_through_every_endpoint() {
        let now = Instant::now();
        let mut b = Balancer::new(vec![ep(1), ep(2), ep(3)], None);
        let picks: Vec<_> = (0..6).map(|_| b.pick(A, false, now).unwrap()).collect();
        assert_eq!(picks, [ep(1), ep(2), ep(3), ep(1), ep(2), ep(3)]);
        assert_eq!(b.sticky_clients(), 0, "no affinity, nothing remembered");
        assert_eq!(Balancer::new(vec![], None).pick(A, false, now), None);
    }

    #[test]
    fn affinity_sticks_until_idle_for_the_timeout() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut b = Balancer::new(vec![ep(1), ep(2)], Some(ttl));
        assert_eq!(b.pick(A, false, t0), Some(ep(1)));
        assert_eq!(b.pick(B, false, t0), Some(ep(2)));
        // Each use renews it: 9 s apart, three times, is still within the timeout.
        for i in 1..=3 {
            assert_eq!(
                b.pick(A, false, t0 + Duration::from_secs(9 * i)),
                Some(ep(1))
            );
        }
        // 10 s idle: expired, so round robin again (next is ep(1) after ep(2)).
        let later = t0 + Duration::from_secs(27 + 10);
        assert_eq!(b.pick(B, false, later), Some(ep(1)), "B expired at 10 s");
        // A retry after a failed dial skips the sticky endpoint and re-sticks.
        assert_eq!(b.pick(B, true, later), Some(ep(2)));
        assert_eq!(b.pick(B, false, later), Some(ep(2)));
        // Pruning forgets only the expired.
        b.prune(t0 + Duration::from_secs(36));
        assert_eq!(b.sticky_clients(), 2);
        b.prune(later + ttl);
        assert_eq!(b.sticky_clients(), 0);
    }

    #[test]
    fn updates_keep_affinity_to_endpoints_that_stay() {
        let now = Instant::now();
        let ttl = Some(Duration::from_secs(60));
        let mut b = Balancer::new(vec![ep(1), ep(2)], ttl);
        assert_eq!(b.pick(A, false, now), Some(ep(1)));
        assert_eq!(b.pick(B, false, now), Some(ep(2)));
        b.update(vec![ep(2), ep(3)], ttl);
        assert_eq!(b.sticky_clients(), 1, "A's endpoint went away");
        assert_eq!(b.pick(B, false, now), Some(ep(2)));
        assert_eq!(b.pick(A, false, now), Some(ep(2)), "round robin restarts");
        // The same list again changes nothing; turning affinity off forgets everyone.
        b.update(vec![ep(2), ep(3)], ttl);
        assert_eq!(b.sticky_clients(), 2);
        b.update(vec![ep(2), ep(3)], None);
        assert_eq!(b.sticky_clients(), 0);
        b.update(vec![], None);
        assert_eq!(b.pick(A, false, now), None);
    }
}
