//! Socket-level load balancing: attaching the datapath's cgroup `sock_addr` programs
//! (`lb_connect4`, `lb_sendmsg4`, `lb_recvmsg4`, `lb_getpeername4` and their IPv6 twins) to a
//! cgroup v2 directory, so processes on the node reach services without any packet
//! translation.
//!
//! A program on a cgroup runs for the sockets of every process in it and below, whatever
//! their network namespace; the programs act only on sockets of the namespace whose cookie
//! the agent wrote into them at load time ([`netns_cookie`]), which is the agent's own.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        cgroup_sock_addr::CgroupSockAddrLinkId, CgroupAttachMode, CgroupSockAddr, ProgramError,
    },
    Ebpf,
};

/// The socket programs, in the order they are loaded and attached.
pub const PROGRAMS: [&str; 8] = [
    "lb_connect4",
    "lb_sendmsg4",
    "lb_recvmsg4",
    "lb_getpeername4",
    "lb_connect6",
    "lb_sendmsg6",
    "lb_recvmsg6",
    "lb_getpeername6",
];

/// Kernel the programs need: `bpf_set_retval` (5.18) to fail a connect() with
/// ECONNREFUSED; `bpf_get_netns_cookie` in these hooks and cgroup bpf_links (5.7) and the
/// getpeername hook (5.8) come before it; `SO_NETNS_COOKIE` (5.14) too.
pub const MIN_KERNEL: &str = "5.18";

/// Why socket-level load balancing could not be set up. Each says what is missing.
#[derive(Debug, thiserror::Error)]
pub enum SocketLbError {
    #[error("no cgroup2 filesystem is mounted (none in /proc/self/mountinfo); mount one (`mount -t cgroup2 none /sys/fs/cgroup/unified`) or pass --cgroup PATH")]
    NoCgroup2,
    #[error(
        "cannot read /proc/self/mountinfo to find the cgroup2 mount: {source}; pass --cgroup PATH"
    )]
    MountInfo { source: io::Error },
    #[error("cannot open cgroup directory {path}: {source}; pass a cgroup v2 directory with --cgroup PATH")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("cannot learn this network namespace's cookie (getsockopt SO_NETNS_COOKIE): {source}; it needs Linux 5.14 or newer")]
    NetnsCookie { source: io::Error },
    #[error("program {program} is missing from the datapath object")]
    Missing { program: &'static str },
    #[error("the kernel refused socket program {program}: {source}; socket-level load balancing needs Linux {MIN_KERNEL} or newer with cgroup BPF")]
    Load {
        program: &'static str,
        source: ProgramError,
    },
    #[error("cannot attach {program} to cgroup {path}: {source}; is it a cgroup v2 directory (not a v1 hierarchy)?")]
    Attach {
        program: &'static str,
        path: PathBuf,
        source: ProgramError,
    },
}

/// What was attached: the programs with their verified instruction counts.
#[derive(Debug)]
pub struct Attached {
    pub cgroup: PathBuf,
    pub netns_cookie: u64,
    /// (program, instructions the verifier processed, if the kernel reports it).
    pub programs: Vec<(&'static str, Option<u32>)>,
}

/// The calling thread's network namespace cookie, from `SO_NETNS_COOKIE` on a fresh socket.
pub fn netns_cookie() -> io::Result<u64> {
    // SAFETY: plain syscall; the descriptor is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a valid descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The mount point of the first cgroup2 filesystem this process sees (the cgroup v2 root;
/// `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_root() -> Result<PathBuf, SocketLbError> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|source| SocketLbError::MountInfo { source })?;
    cgroup2_mount_in(&mountinfo).ok_or(SocketLbError::NoCgroup2)
}

/// The first cgroup2 mount point in a `/proc/self/mountinfo` text.
pub fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // `<id> <parent> <maj:min> <root> <mount point> <options> [optional...] - <fstype> ...`
        let (before, after) = line.split_once(" - ")?;
        if after.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        before.split_whitespace().nth(4).map(unescape_octal)
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Loads the socket programs of `ebpf` and attaches them to the cgroup v2 directory
/// `cgroup`, all or none. `netns_cookie` is the one the object was loaded with (0: unknown).
/// The attachments are bpf_links owned by `ebpf`: they go when it is dropped.
pub fn attach(
    ebpf: &mut Ebpf,
    cgroup: &Path,
    netns_cookie: u64,
) -> Result<Attached, SocketLbError> {
    if netns_cookie == 0 {
        // Ask again for the error to report.
        let source = netns_cookie_error();
        return Err(SocketLbError::NetnsCookie { source });
    }
    let dir = File::open(cgroup).map_err(|source| SocketLbError::Cgroup {
        path: cgroup.to_owned(),
        source,
    })?;
    let mut programs = Vec::new();
    for name in PROGRAMS {
        let program = program_mut(ebpf, name)?;
        program.load().map_err(|source| SocketLbError::Load {
            program: name,
            source,
        })?;
        let verified = program
            .info()
            .ok()
            .and_then(|i| i.verified_instruction_count());
        programs.push((name, verified));
    }
    let mut links: Vec<(&'static str, CgroupSockAddrLinkId)> = Vec::new();
    for name in PROGRAMS {
        // With bpf_links (5.7+, which the programs need anyway) a cgroup always runs every
        // program attached to it, ours beside anyone else's; aya passes the mode as the
        // link's flags, which the kernel wants 0, i.e. `Single`.
        let attached = program_mut(ebpf, name)?.attach(&dir, CgroupAttachMode::Single);
        match attached {
            Ok(link) => links.push((name, link)),
            Err(source) => {
                // All or none: a connect4 without its recvmsg4 would show replies from
                // addresses the socket never sent to.
                for (name, link) in links {
                    if let Ok(p) = program_mut(ebpf, name) {
                        let _ = p.detach(link);
                    }
                }
                return Err(SocketLbError::Attach {
                    program: name,
                    path: cgroup.to_owned(),
                    source,
                });
            }
        }
    }
    Ok(Attached {
        cgroup: cgroup.to_owned(),
        netns_cookie,
        programs,
    })
}

fn netns_cookie_error() -> io::Error {
    match netns_cookie() {
        Err(e) => e,
        Ok(_) => io::Error::other("the datapath was loaded without it"),
    }
}

fn program_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, SocketLbError> {
    let program = ebpf
        .program_mut(name)
        .ok_or(SocketLbError::Missing { program: name })?;
    program.try_into().map_err(|source| SocketLbError::Load {
        program: name,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_on_hybrid_and_unified_hosts() {
        let hybrid = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:27 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 31 0:39 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified =
            "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup2_mount_in(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        // v1 only: none. A "cgroup2" in a mount's path is not its type.
        let v1 = "42 31 0:39 / /mnt/cgroup2 rw - cgroup cgroup rw,memory\n";
        assert_eq!(cgroup2_mount_in(v1), None);
        assert_eq!(cgroup2_mount_in(""), None);
    }

    #[test]
    fn unescapes_mount_points() {
        let line = "50 31 0:40 / /mnt/my\\040cgroup\\134x rw - cgroup2 none rw\n";
        assert_eq!(
            cgroup2_mount_in(line),
            Some(PathBuf::from("/mnt/my cgroup\\x"))
        );
        assert_eq!(unescape_octal("a\\09b\\"), PathBuf::from("a\\09b\\"));
    }
}
