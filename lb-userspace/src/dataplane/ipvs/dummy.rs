//! The dummy interface holding the service addresses, through the `ip` command (iproute2).
//!
//! `ip` rather than rtnetlink messages of our own: the interface and its addresses change
//! rarely (a service's ClusterIP is fixed for its life), iproute2 is on every node already
//! (the test bed and operators use it), it runs through the same [`CommandFactory`] as the
//! iptables programs (so tests run it in their namespace), and `ip -batch` applies one
//! apply's address changes in a single process. Only IPVS itself, for which no tool is
//! assumed installed, is spoken to over netlink directly.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::Stdio;

use super::Error;
use crate::dataplane::iptables::CommandFactory;

/// The interface's name (kube-proxy's is `kube-ipvs0`).
pub const NAME: &str = "lba-ipvs0";

/// Runs `ip args...`, feeding it `stdin`; its stdout, or what it said on failure.
fn ip(command: &CommandFactory, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
    let mut cmd = command("ip");
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = format!("ip {}", args.join(" "));
    let mut child = cmd.spawn().map_err(|source| Error::Spawn {
        command: shown.clone(),
        source,
    })?;
    if let Some(input) = stdin {
        // A write error shows as the program's failure below.
        let _ = child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(|source| Error::Spawn {
        command: shown.clone(),
        source,
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            command: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Whether the interface exists.
pub fn exists(command: &CommandFactory) -> Result<bool, Error> {
    let out = ip(command, &["-o", "link", "show"], None)?;
    Ok(out
        .lines()
        .any(|l| l.split(": ").nth(1).is_some_and(|n| n == NAME)))
}

/// Creates the interface if it is missing, and brings it up. Up because IPv6 addresses on a
/// down interface get no local route; no IPv6 link-local address of its own
/// (`addrgenmode none`), so every address on it is a service's.
pub fn ensure(command: &CommandFactory) -> Result<(), Error> {
    if !exists(command)? {
        ip(command, &["link", "add", NAME, "type", "dummy"], None)?;
    }
    ip(command, &["link", "set", NAME, "addrgenmode", "none"], None)?;
    ip(command, &["link", "set", NAME, "up"], None)?;
    Ok(())
}

/// The addresses on the interface; empty when it does not exist.
pub fn addresses(command: &CommandFactory) -> Result<BTreeSet<IpAddr>, Error> {
    if !exists(command)? {
        return Ok(BTreeSet::new());
    }
    let out = ip(command, &["-o", "addr", "show", "dev", NAME], None)?;
    Ok(parse_addresses(&out))
}

/// The addresses in `ip -o addr show` output (`N: NAME inet 10.96.0.1/32 scope ...`).
pub fn parse_addresses(out: &str) -> BTreeSet<IpAddr> {
    out.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet" || *w == "inet6")?;
            let cidr = words.next()?;
            cidr.split('/').next()?.parse().ok()
        })
        .filter(|a: &IpAddr| !matches!(a, IpAddr::V6(v6) if v6.is_unicast_link_local()))
        .collect()
}

/// The `ip -batch` input adding `add` and deleting `del`: host routes (/32, /128), IPv6 ones
/// usable at once (`nodad`).
pub fn batch(add: &BTreeSet<IpAddr>, del: &BTreeSet<IpAddr>) -> String {
    let mut out = String::new();
    for a in del {
        let len = if a.is_ipv4() { 32 } else { 128 };
        out.push_str(&format!("address del {a}/{len} dev {NAME}\n"));
    }
    for a in add {
        match a {
            IpAddr::V4(_) => out.push_str(&format!("address add {a}/32 dev {NAME}\n")),
            IpAddr::V6(_) => out.push_str(&format!("address add {a}/128 dev {NAME} nodad\n")),
        }
    }
    out
}

/// Adds `add` and deletes `del` in one `ip -batch`.
pub fn change(
    command: &CommandFactory,
    add: &BTreeSet<IpAddr>,
    del: &BTreeSet<IpAddr>,
) -> Result<(), Error> {
    if add.is_empty() && del.is_empty() {
        return Ok(());
    }
    ip(command, &["-batch", "-"], Some(&batch(add, del)))?;
    Ok(())
}

/// Deletes the interface (and so its addresses), if it exists.
pub fn delete(command: &CommandFactory) -> Result<(), Error> {
    if exists(command)? {
        ip(command, &["link", "del", NAME], None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_read_from_ip_output() {
        let out = "5: lba-ipvs0    inet 10.96.0.1/32 scope global lba-ipvs0\\       valid_lft forever preferred_lft forever\n\
                   5: lba-ipvs0    inet6 fd00:10:96::1/128 scope global nodad \\       valid_lft forever preferred_lft forever\n\
                   5: lba-ipvs0    inet6 fe80::1/64 scope link \\       valid_lft forever preferred_lft forever\n";
        let got = parse_addresses(out);
        let want: BTreeSet<IpAddr> = [
            "10.96.0.1".parse().unwrap(),
            "fd00:10:96::1".parse().unwrap(),
        ]
        .into();
        assert_eq!(got, want, "link-local addresses are not services'");
    }

    #[test]
    fn one_batch_deletes_then_adds() {
        let add: BTreeSet<IpAddr> =
            ["10.96.0.2".parse().unwrap(), "fd00::2".parse().unwrap()].into();
        let del: BTreeSet<IpAddr> = ["10.96.0.1".parse().unwrap()].into();
        assert_eq!(
            batch(&add, &del),
            "address del 10.96.0.1/32 dev lba-ipvs0\n\
             address add 10.96.0.2/32 dev lba-ipvs0\n\
             address add fd00::2/128 dev lba-ipvs0 nodad\n"
        );
    }
}
