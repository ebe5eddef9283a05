//! Dataplanes: what programs the kernel from a desired state. Each applies the difference
//! between what it last programmed and the new desired state; the agent holds exactly one,
//! chosen by `--mode` (see `crate::mode`).

pub mod ebpf;
#[cfg(test)]
mod fixtures;
pub mod iptables;
pub mod ipvs;
pub mod userspace;

use crate::model::DesiredState;

/// What one apply did, for logs and the `synced` line tests wait on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Service ports programmed after the apply.
    pub service_ports: usize,
    /// Distinct backends programmed after the apply.
    pub backends: usize,
    /// Map writes and deletions the apply made.
    pub writes: usize,
    pub deletes: usize,
}

impl ApplyReport {
    /// The service ports and distinct endpoints of `desired`, for dataplanes that program all
    /// of it.
    pub fn count(&mut self, desired: &DesiredState) {
        self.service_ports = desired.services.len();
        let backends: std::collections::BTreeSet<_> = desired
            .services
            .values()
            .flat_map(|sp| sp.endpoints.iter().chain(&sp.local_endpoints))
            .collect();
        self.backends = backends.len();
    }
}

/// One way of programming the kernel.
pub trait Dataplane {
    /// Programs `desired`, changing only what differs from the last apply.
    fn apply(&mut self, desired: &DesiredState) -> anyhow::Result<ApplyReport>;

    /// True after an apply failed part way: the kernel may not hold the desired state, so the
    /// next sync must apply again even if the sources did not change.
    fn needs_retry(&self) -> bool;

    /// The periodic resync (`--resync-seconds`) is due: a dataplane whose kernel state others
    /// can change behind its back (rules, virtual services) makes its next apply rewrite
    /// everything it owns, and returns true so that apply happens even when the desired state
    /// did not change. The default, for a dataplane that owns its state outright, does nothing.
    fn full_resync(&mut self) -> bool {
        false
    }

    /// Removes everything this dataplane put in the kernel (`--cleanup` at exit): pinned
    /// maps, chains and rules, virtual services. What is attached to the agent's own file
    /// descriptors (program links, sockets) goes when the dataplane is dropped.
    fn cleanup(&mut self) -> anyhow::Result<()>;
}

/// The agent holds its dataplane boxed: the mode is chosen at run time.
impl<D: Dataplane + ?Sized> Dataplane for Box<D> {
    fn apply(&mut self, desired: &DesiredState) -> anyhow::Result<ApplyReport> {
        (**self).apply(desired)
    }

    fn needs_retry(&self) -> bool {
        (**self).needs_retry()
    }

    fn full_resync(&mut self) -> bool {
        (**self).full_resync()
    }

    fn cleanup(&mut self) -> anyhow::Result<()> {
        (**self).cleanup()
    }
}
