//! lb-agent: a node agent that replaces kube-proxy with an eBPF datapath.
//!
//! The pipeline is visible in the module tree:
//! `source` (where Services and EndpointSlices come from) -> `model` (pure translation to the
//! desired state; kube-proxy's semantics live here) -> `dataplane` (programs the kernel from a
//! desired state, applying only differences). `serve` answers for the agent over HTTP: its
//! health, the health-check node ports of services, and Prometheus metrics.
//! `testbed` holds the network-namespace topology and the packet builder shared by the tests,
//! the demo and the benchmarks.

pub mod dataplane;
pub mod host;
pub mod mode;
pub mod model;
pub mod serve;
pub mod source;
pub mod sync;
pub mod testbed;
