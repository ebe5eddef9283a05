//! The kernel settings IPVS mode depends on, and the network namespace it works in.

use std::io;
use std::path::{Path, PathBuf};

/// The sysctls kube-proxy's IPVS mode sets (`pkg/proxy/ipvs/proxier.go`, `NewProxier`), with
/// why:
/// - `net.ipv4.vs.conntrack=1`: IPVS keeps the netfilter connection of what it forwards and
///   sends it through LOCAL_OUT and POSTROUTING, where the masquerade rules act. Without
///   it NodePort (policy Cluster) and hairpin traffic would go out unmasqueraded. It applies
///   to IPv6 too (there is no `net.ipv6.vs`).
/// - `net.ipv4.vs.expire_nodest_conn=1`: a packet of a connection whose real server was
///   deleted ends that connection at once (the client gets a reset or retries) instead of
///   being dropped until it times out.
/// - `net.ipv4.vs.expire_quiescent_template=1`: affinity (persistence) entries pointing at a
///   real server of weight 0 expire, so a client stuck to a draining endpoint moves on.
/// - `net.ipv4.ip_forward=1`: forwarded service traffic.
///
/// `net.ipv4.vs.conn_reuse_mode` is set to 0 only on kernels before 5.9 (see
/// [`needs_conn_reuse_mode_0`]), as kube-proxy does; `arp_ignore`/`arp_announce` only with
/// kube-proxy's `--ipvs-strict-arp`, which this agent does not have.
pub const SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv4.vs.conntrack", "1"),
    ("net.ipv4.vs.expire_nodest_conn", "1"),
    ("net.ipv4.vs.expire_quiescent_template", "1"),
    ("net.ipv4.ip_forward", "1"),
];

/// kube-proxy sets `conn_reuse_mode=0` on kernels from 4.1 up to, not including, 5.9: with
/// the default 1 those kernels dropped the first packet of a connection reusing a port
/// and stalled it for a second (kubernetes#81775, fixed by the kernel in 5.9).
pub fn needs_conn_reuse_mode_0(release: &str) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    ((4, 1)..(5, 9)).contains(&version)
}

/// `uname -r`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Runs `f` on a thread inside the network namespace at `netns` (a `/run/netns/NAME` file),
/// or on the caller's thread when `None`. Sockets made there stay in that namespace, and
/// /proc/sys/net opened there shows that namespace's settings.
pub fn in_netns<T: Send>(netns: Option<&Path>, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let Some(path) = netns else {
        return Ok(f());
    };
    let file = std::fs::File::open(path)?;
    std::thread::scope(|scope| {
        let handle = scope.spawn(move || -> io::Result<T> {
            use std::os::fd::AsRawFd as _;
            // SAFETY: setns only reads the descriptor, which `file` keeps open; it changes
            // this thread's namespace, and the thread ends with `f`.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        });
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// `/proc/sys/...` for a dotted key.
fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

/// Writes `value` to sysctl `key` (in the calling thread's namespace) unless it holds it.
pub fn ensure_sysctl(key: &str, value: &str) -> io::Result<()> {
    let path = sysctl_path(key);
    if std::fs::read_to_string(&path)?.trim() == value {
        return Ok(());
    }
    std::fs::write(&path, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_reuse_mode_only_on_kernels_from_4_1_to_5_8() {
        assert!(!needs_conn_reuse_mode_0("3.10.0-1160.el7.x86_64"));
        assert!(needs_conn_reuse_mode_0("4.19.0-25-amd64"));
        assert!(needs_conn_reuse_mode_0("5.4.0-150-generic"));
        assert!(!needs_conn_reuse_mode_0("5.9.0"));
        assert!(!needs_conn_reuse_mode_0("6.1.0-56-amd64"));
        assert!(!needs_conn_reuse_mode_0("6.18.44-fc-v782"));
        assert!(!needs_conn_reuse_mode_0(""));
    }

    #[test]
    fn sysctl_keys_are_paths_under_proc_sys() {
        assert_eq!(
            sysctl_path("net.ipv4.vs.conntrack"),
            Path::new("/proc/sys/net/ipv4/vs/conntrack")
        );
    }
}
