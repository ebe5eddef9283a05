//! Desired states built by hand, for the tests that drive a dataplane directly (without the
//! agent and its model): the pieces every such test spells the same way, and how it counts
//! the answers it gets.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::IpAddr;

use super::netns::NetNs;
use super::servers::backend_name;
use super::topology::{backend_ip, backend_ip6};
use crate::dataplane::iptables::Backend;
use crate::model::{Endpoint, Frontend, Protocol, ServicePortName};

/// Service `default/<name>`'s unnamed port of `protocol`.
pub fn spn(name: &str, protocol: Protocol) -> ServicePortName {
    ServicePortName {
        namespace: "default".into(),
        name: name.into(),
        port: String::new(),
        protocol,
    }
}

pub fn fe(addr: impl Into<IpAddr>, port: u16, protocol: Protocol) -> Frontend {
    Frontend {
        addr: addr.into(),
        port,
        protocol,
    }
}

pub fn ep(addr: impl Into<IpAddr>, port: u16) -> Endpoint {
    Endpoint {
        addr: addr.into(),
        port,
    }
}

/// Both families' endpoints of `backends` (1-based, as in the topology) on `port`.
pub fn dual_stack_endpoints(backends: &[usize], port: u16) -> BTreeSet<Endpoint> {
    backends
        .iter()
        .flat_map(|&i| [ep(backend_ip(i), port), ep(backend_ip6(i), port)])
        .collect()
}

/// How often each answer came; a failure counts as `error: <what>`, so an assertion on the
/// counts shows it.
pub fn count_answers(answers: Vec<io::Result<String>>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for a in answers {
        *counts
            .entry(a.unwrap_or_else(|e| format!("error: {e}")))
            .or_default() += 1;
    }
    counts
}

/// The names `backends` answer with.
pub fn backend_names(backends: &[usize]) -> Vec<String> {
    backends.iter().map(|&i| backend_name(i)).collect()
}

/// `iptables-save` of both families of `backend` in `ns`.
pub fn iptables_saved(ns: &NetNs, backend: &Backend) -> String {
    [&backend.iptables_save, &backend.ip6tables_save]
        .iter()
        .map(|save| ns.exec(save, &[]).expect("iptables-save"))
        .collect()
}
