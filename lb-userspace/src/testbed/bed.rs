//! One end-to-end test's world: a topology, name servers in its backends, a watched manifest
//! directory and the agent running on the node. Dropping it stops the agent first, then the
//! servers, then removes the namespaces, then the manifest directory (field order).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::agent::{Agent, SyncInfo};
use super::manifest::{TCP_TARGET, UDP_TARGET};
use super::servers::BackendServers;
use super::topology::Topology;
use super::{require_root, unique_bpffs_dir, Result, TempDir};

/// The manifest file the service lives in.
pub const MANIFEST: &str = "demo.yaml";
/// How long the agent may take to load, attach and apply its first sync. Generous: in tier
/// 4's emulated VM the first start alone reads the agent's debug binary over 9p for ~30 s.
pub const FIRST_SYNC: Duration = Duration::from_secs(90);
/// How long one manifest edit may take to be applied.
pub const RESYNC: Duration = Duration::from_secs(10);

pub struct Bed {
    pub agent: Agent,
    _servers: BackendServers,
    pub topo: Topology,
    /// The directory the agent watches.
    pub manifests: PathBuf,
    _dir: TempDir,
}

impl Bed {
    /// Builds the topology with `n_backends` (servers on `TCP_TARGET` and `UDP_TARGET`),
    /// writes `initial` as `MANIFEST` and starts `agent_binary` with `agent_args` on the
    /// node's interfaces, waiting for its first sync. `tag` names the temporary directory.
    pub fn start(
        tag: &str,
        n_backends: usize,
        initial: &str,
        agent_binary: &Path,
        agent_args: &[&str],
    ) -> Result<Bed> {
        require_root()?;
        let dir = TempDir::new(tag)?;
        let manifests = dir.path().join("manifests");
        std::fs::create_dir(&manifests)
            .map_err(super::io_err("creating the manifest directory"))?;
        TempDir::write_atomic(&manifests, MANIFEST, initial)?;
        let topo = Topology::build(n_backends)?;
        let servers = BackendServers::start(&topo, TCP_TARGET, UDP_TARGET)?;
        let bpffs = unique_bpffs_dir()?;
        let mut agent = Agent::start_with(
            &topo.node,
            &manifests,
            &topo.node_ifaces(),
            &bpffs,
            agent_binary,
            agent_args,
        )?;
        let first = agent.wait_synced(0, FIRST_SYNC)?;
        println!("agent synced: {first:?}");
        Ok(Bed {
            agent,
            _servers: servers,
            topo,
            manifests,
            _dir: dir,
        })
    }

    /// Applies `change` to the manifest directory and waits for the agent's next sync.
    pub fn resync(&mut self, change: impl FnOnce(&Path)) -> Result<SyncInfo> {
        let before = self.generation();
        change(&self.manifests);
        self.next_sync(before)
    }

    /// Replaces `MANIFEST` with `contents` and waits for the agent's next sync.
    pub fn rewrite(&mut self, contents: &str) -> Result<SyncInfo> {
        let before = self.generation();
        TempDir::write_atomic(&self.manifests, MANIFEST, contents)?;
        self.next_sync(before)
    }

    fn generation(&self) -> u64 {
        self.agent.last_sync().map_or(0, |s| s.generation)
    }

    fn next_sync(&mut self, before: u64) -> Result<SyncInfo> {
        let after = self.agent.wait_synced(before + 1, RESYNC)?;
        println!("agent synced: {after:?}");
        Ok(after)
    }

    /// Runs `f` in the client namespace (its sockets are the client's).
    pub fn in_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        self.topo.client.ns.run(f)
    }

    /// Runs `f` in the node namespace (its sockets are the node's).
    pub fn in_node<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        self.topo.node.run(f)
    }
}
