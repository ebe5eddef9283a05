//! The deployment manifests (tier 1, no privileges):
//! - every YAML document under `manifests/rendered/` and `manifests/examples/` is an object of
//!   a kind k8s-openapi knows, and keeps every field through a trip through its type (the
//!   types ignore unknown fields, so a misspelled or misplaced field would otherwise pass);
//! - the rendered DaemonSet and RBAC grant what the agent needs and nothing more;
//! - the chart passes `helm lint` and renders to exactly the committed plain manifests.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::Resource;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Directories whose every `.yaml`, `.yml` and `.json` file is checked.
const MANIFEST_DIRS: [&str; 2] = ["manifests/rendered", "manifests/examples"];

/// The chart, and how `cargo xtask render-manifests` (xtask/src/manifests.rs) renders it into
/// the committed plain manifests.
const CHART: &str = "manifests/charts/lb-agent";
const RENDERED: &str = "manifests/rendered/lb-agent.yaml";
const RELEASE: &str = "lb-agent";
const NAMESPACE: &str = "kube-system";

/// The capabilities the agent's container adds to an empty set (the chart says why each).
const CAPABILITIES: [&str; 5] = ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE", "NET_RAW"];

/// What the ClusterRole grants, as (API group, resource, verb): reading Services,
/// EndpointSlices and Nodes, and writing Events in either Events API.
const GRANTS: [(&str, &str, &str); 13] = [
    ("", "services", "get"),
    ("", "services", "list"),
    ("", "services", "watch"),
    ("discovery.k8s.io", "endpointslices", "get"),
    ("discovery.k8s.io", "endpointslices", "list"),
    ("discovery.k8s.io", "endpointslices", "watch"),
    ("", "nodes", "get"),
    ("", "nodes", "list"),
    ("", "nodes", "watch"),
    ("", "events", "create"),
    ("", "events", "patch"),
    ("events.k8s.io", "events", "create"),
    ("events.k8s.io", "events", "patch"),
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("lb-userspace lives in the workspace")
        .to_owned()
}

/// One YAML document of a manifest file.
struct Document {
    /// `<file relative to the workspace> document <n>` (n from 1), for messages.
    name: String,
    value: Value,
}

/// The documents of `file`, without empty ones (a `---` followed only by comments).
fn documents(file: &Path) -> Vec<Document> {
    let text =
        std::fs::read_to_string(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    let shown = file.strip_prefix(workspace()).unwrap_or(file).display();
    serde_yaml::Deserializer::from_str(&text)
        .enumerate()
        .map(|(i, doc)| {
            let name = format!("{shown} document {}", i + 1);
            let value = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{name} is not YAML that maps to JSON: {e}"));
            Document { name, value }
        })
        .filter(|d| !d.value.is_null())
        .collect()
}

/// Every manifest file under `MANIFEST_DIRS`, recursively.
fn manifest_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let entries =
            std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
        for path in entries.map(|e| e.expect("a directory entry").path()) {
            if path.is_dir() {
                walk(&path, out);
            } else if path
                .extension()
                .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
            {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    for dir in MANIFEST_DIRS {
        let before = files.len();
        walk(&workspace().join(dir), &mut files);
        assert!(files.len() > before, "no manifest in {dir}");
    }
    files.sort();
    files
}

/// The document after a trip through its k8s-openapi type `K`, as JSON.
fn through<K: Resource + DeserializeOwned + Serialize>(doc: &Value) -> Result<Value, String> {
    let typed: K = serde_json::from_value(doc.clone())
        .map_err(|e| format!("not a valid {} {}: {e}", K::API_VERSION, K::KIND))?;
    serde_json::to_value(&typed).map_err(|e| format!("serializing it back: {e}"))
}

/// The kinds a manifest may hold, each with its k8s-openapi type.
macro_rules! known_kinds {
    ($($kind:ty),* $(,)?) => {
        /// `through` the type that `apiVersion` and `kind` name; an error for any other.
        fn round_trip(doc: &Value) -> Result<Value, String> {
            let api_version = doc["apiVersion"].as_str().unwrap_or("<no apiVersion>");
            let kind = doc["kind"].as_str().unwrap_or("<no kind>");
            $(
                if api_version == <$kind>::API_VERSION && kind == <$kind>::KIND {
                    return through::<$kind>(doc);
                }
            )*
            Err(format!(
                "{api_version} {kind} is not a kind this test knows: add its k8s-openapi type to known_kinds!"
            ))
        }
    };
}

known_kinds!(
    ClusterRole,
    ClusterRoleBinding,
    ConfigMap,
    DaemonSet,
    EndpointSlice,
    Namespace,
    Role,
    RoleBinding,
    Service,
    ServiceAccount,
);

/// Where `typed` (a document after its trip through its type) differs from `original`, one
/// line per difference, each with its JSON path. Empty when the type kept every field.
fn differences(original: &Value, typed: &Value) -> Vec<String> {
    fn walk(path: &str, original: &Value, typed: &Value, out: &mut Vec<String>) {
        match (original, typed) {
            (Value::Object(o), Value::Object(t)) => {
                for (key, value) in o {
                    let at = format!("{path}.{key}");
                    match t.get(key) {
                        Some(back) => walk(&at, value, back, out),
                        None if value.is_null() => {
                            out.push(format!("{at}: null (remove it or give it a value)"))
                        }
                        None => out.push(format!(
                            "{at}: no such field in the type here (misspelled or misplaced?)"
                        )),
                    }
                }
                for key in t.keys().filter(|k| !o.contains_key(*k)) {
                    out.push(format!(
                        "{path}.{key}: missing, and the type requires it (it filled in a default)"
                    ));
                }
            }
            (Value::Array(o), Value::Array(t)) if o.len() == t.len() => {
                for (i, (value, back)) in o.iter().zip(t).enumerate() {
                    walk(&format!("{path}[{i}]"), value, back, out);
                }
            }
            // A Quantity written as a number (`cpu: 1`) is kept as its string.
            (Value::Number(n), Value::String(s)) if n.to_string() == *s => {}
            _ if original == typed => {}
            _ => out.push(format!("{path}: {original} came back as {typed}")),
        }
    }
    let mut out = Vec::new();
    walk("", original, typed, &mut out);
    out
}

#[test]
fn every_manifest_is_a_known_kind_and_keeps_every_field_through_its_type() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in manifest_files() {
        for doc in documents(&file) {
            checked += 1;
            match round_trip(&doc.value) {
                Ok(typed) => problems.extend(
                    differences(&doc.value, &typed)
                        .into_iter()
                        .map(|d| format!("{}: {d}", doc.name)),
                ),
                Err(e) => problems.push(format!("{}: {e}", doc.name)),
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s) in the manifests:\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
    println!("{checked} documents checked");
}

#[test]
fn the_round_trip_catches_misspelled_misplaced_and_missing_fields() {
    let service = |spec: Value| {
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "s"},
            "spec": spec,
        })
    };
    let problems = |doc: &Value| differences(doc, &round_trip(doc).expect("a Service"));

    let fine = service(serde_json::json!({"ports": [{"port": 80, "targetPort": "http"}]}));
    assert_eq!(problems(&fine), Vec::<String>::new());
    let misspelled = service(serde_json::json!({"ports": [{"port": 80, "targetPrt": 8080}]}));
    assert_eq!(
        problems(&misspelled),
        [".spec.ports[0].targetPrt: no such field in the type here (misspelled or misplaced?)"]
    );
    let misplaced = service(serde_json::json!({"ports": [{"port": 80}], "nodeName": "n"}));
    assert_eq!(
        problems(&misplaced),
        [".spec.nodeName: no such field in the type here (misspelled or misplaced?)"]
    );
    let missing = service(serde_json::json!({"ports": [{"name": "http"}]}));
    assert_eq!(
        problems(&missing),
        [".spec.ports[0].port: missing, and the type requires it (it filled in a default)"]
    );
    let wrong_type = service(serde_json::json!({"ports": [{"port": "80"}]}));
    assert!(round_trip(&wrong_type).is_err());
    let unknown = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {}});
    assert!(round_trip(&unknown)
        .unwrap_err()
        .contains("v1 Pod is not a kind this test knows"));

    // Quantities written as numbers come back as strings, and that is no difference.
    let original = serde_json::json!({"cpu": 1, "memory": "64Mi"});
    let typed = serde_json::json!({"cpu": "1", "memory": "64Mi"});
    assert_eq!(differences(&original, &typed), Vec::<String>::new());
}

/// The one object of type `K` in `docs`.
fn the_one<K: Resource + DeserializeOwned>(docs: &[Document]) -> K {
    let mut found = docs
        .iter()
        .filter(|d| d.value["apiVersion"] == K::API_VERSION && d.value["kind"] == K::KIND);
    let doc = found
        .next()
        .unwrap_or_else(|| panic!("{RENDERED} has no {}", K::KIND));
    assert!(
        found.next().is_none(),
        "{RENDERED} has more than one {}",
        K::KIND
    );
    serde_json::from_value(doc.value.clone())
        .unwrap_or_else(|e| panic!("{}: not a {}: {e}", doc.name, K::KIND))
}

fn rendered() -> Vec<Document> {
    documents(&workspace().join(RENDERED))
}

/// The agent's container of the rendered DaemonSet, and the DaemonSet.
fn agent() -> (DaemonSet, Container) {
    let daemonset: DaemonSet = the_one(&rendered());
    let pod = daemonset
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("the DaemonSet has a pod spec");
    assert_eq!(pod.containers.len(), 1, "one container, the agent");
    assert!(pod.init_containers.is_none(), "no init containers");
    let container = pod.containers[0].clone();
    (daemonset, container)
}

#[test]
fn the_daemonset_runs_the_agent_on_the_host_network_with_only_the_capabilities_it_needs() {
    let (daemonset, container) = agent();
    assert_eq!(daemonset.metadata.namespace.as_deref(), Some(NAMESPACE));
    let pod = daemonset.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true), "hostNetwork");
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_ne!(pod.host_pid, Some(true), "hostPID");
    assert_ne!(pod.host_ipc, Some(true), "hostIPC");
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );

    let security = container
        .security_context
        .as_ref()
        .expect("the container has a securityContext");
    assert_ne!(security.privileged, Some(true), "privileged");
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.run_as_user, Some(0));
    let capabilities = security
        .capabilities
        .as_ref()
        .expect("the container sets capabilities");
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: BTreeSet<&str> = capabilities
        .add
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    assert_eq!(added, BTreeSet::from(CAPABILITIES), "capabilities added");

    // The host paths: bpffs for the pins, the cgroup2 root read-only, the xtables lock the
    // fallback modes' iptables shares with the host's; nothing else.
    let host_paths: BTreeSet<(&str, &str)> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.as_str(), v.host_path.as_ref()?.path.as_str())))
        .collect();
    assert_eq!(
        host_paths,
        BTreeSet::from([
            ("bpffs", "/sys/fs/bpf"),
            ("cgroup2", "/sys/fs/cgroup"),
            ("xtables-lock", "/run/xtables.lock")
        ])
    );
    let mounts = container.volume_mounts.as_deref().unwrap_or_default();
    let mount = |name: &str| {
        mounts
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("volume {name} is not mounted"))
    };
    assert_eq!(mount("bpffs").mount_path, "/sys/fs/bpf");
    assert_eq!(
        mount("bpffs").mount_propagation.as_deref(),
        Some("HostToContainer")
    );
    assert_eq!(mount("cgroup2").read_only, Some(true));

    let args = container.args.as_deref().unwrap_or_default();
    for arg in [
        "run",
        "--source=kube",
        "--bpffs=/sys/fs/bpf/lb",
        "--node-name=$(NODE_NAME)",
        "--healthz-bind-address=0.0.0.0:10256",
        "--metrics-bind-address=127.0.0.1:10249",
        &format!("--cgroup={}", mount("cgroup2").mount_path),
    ] {
        assert!(args.iter().any(|a| a == arg), "{arg} is not in {args:?}");
    }
    let node_name = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(node_name, Some("spec.nodeName"));
}

#[test]
fn the_probes_ask_the_agent_on_kube_proxys_health_port() {
    let (_, container) = agent();
    let port = |name: &str| {
        container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no container port {name}"))
            .container_port
    };
    assert_eq!(port("healthz"), 10256);
    assert_eq!(port("metrics"), 10249);
    // A liveness kill detaches the datapath until the agent is back (see the template).
    assert!(container.liveness_probe.is_none(), "no liveness probe");
    let (what, probe, path) = ("readinessProbe", &container.readiness_probe, "/livez");
    let get = probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .unwrap_or_else(|| panic!("no {what} httpGet"));
    assert_eq!(get.path.as_deref(), Some(path), "{what} path");
    let probed = match &get.port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => port(name),
    };
    assert_eq!(probed, 10256, "{what} port");
}

#[test]
fn the_cluster_role_grants_exactly_the_reads_and_events_the_agent_needs() {
    let docs = rendered();
    let role: ClusterRole = the_one(&docs);
    assert!(role.aggregation_rule.is_none(), "no aggregated rules");
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "rules name resources by type only: {rule:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((group.as_str(), resource.as_str(), verb.as_str()));
                }
            }
        }
    }
    assert_eq!(granted, BTreeSet::from(GRANTS));

    // Bound to the agent's ServiceAccount, the one the DaemonSet runs as, and nothing else.
    let binding: ClusterRoleBinding = the_one(&docs);
    let account: ServiceAccount = the_one(&docs);
    let daemonset: DaemonSet = the_one(&docs);
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "one subject: {subjects:?}");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), account.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(account.metadata.namespace.as_deref(), Some(NAMESPACE));
    let runs_as = daemonset
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|p| p.service_account_name);
    assert_eq!(runs_as, account.metadata.name);
}

/// helm: `$LB_HELM` (`cargo xtask test` sets it), else where `cargo xtask setup` installs it
/// (`<cache>/lb-agent/helm-3.17.3/bin/helm`, see xtask/src/setup.rs), else `helm` on PATH.
/// Missing, the test fails: it never passes without having run helm.
fn helm() -> PathBuf {
    const NOT_FOUND: &str = "helm not found: run `cargo xtask setup`";
    if let Some(helm) = std::env::var_os("LB_HELM").filter(|v| !v.is_empty()) {
        let helm = PathBuf::from(helm);
        assert!(
            helm.is_file(),
            "{NOT_FOUND} (LB_HELM is {}, which does not exist)",
            helm.display()
        );
        return helm;
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    let installed = cache.map(|c| c.join("lb-agent/helm-3.17.3/bin/helm"));
    let on_path = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("helm"))
        .collect::<Vec<_>>();
    installed
        .into_iter()
        .chain(on_path)
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{NOT_FOUND} (not in LB_HELM, the cache nor PATH)"))
}

/// Runs helm in the workspace with `args`.
fn run_helm(args: &[&str]) -> Output {
    let helm = helm();
    Command::new(&helm)
        .args(args)
        .current_dir(workspace())
        .output()
        .unwrap_or_else(|e| panic!("running {} {args:?}: {e}", helm.display()))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_chart_lints_and_renders_to_the_committed_manifests() {
    let lint = run_helm(&["lint", "--strict", CHART]);
    assert!(
        lint.status.success(),
        "helm lint --strict {CHART} failed:\n{}{}",
        text(&lint.stdout),
        text(&lint.stderr)
    );
    let template = run_helm(&["template", RELEASE, CHART, "--namespace", NAMESPACE]);
    assert!(
        template.status.success(),
        "helm template failed:\n{}",
        text(&template.stderr)
    );
    let rendered = text(&template.stdout);
    let committed = std::fs::read_to_string(workspace().join(RENDERED))
        .unwrap_or_else(|e| panic!("reading {RENDERED}: {e}"));
    if rendered != committed {
        let (line, (now, was)) = rendered
            .lines()
            .chain(std::iter::repeat("<end of file>"))
            .zip(committed.lines().chain(std::iter::repeat("<end of file>")))
            .enumerate()
            .find(|(_, (a, b))| a != b)
            .expect("texts that differ differ in a line");
        panic!(
            "{RENDERED} is not what the chart renders: run `cargo xtask render-manifests` and commit it.\n\
             first difference, line {}:\n  chart:     {now}\n  committed: {was}",
            line + 1
        );
    }
}

/// The agent's arguments and volume names when the chart is rendered with `sets`
/// (`--set` values), or helm's error.
fn rendered_with(sets: &[&str]) -> Result<(Vec<String>, Vec<String>), String> {
    let mut args = vec!["template", RELEASE, CHART, "--namespace", NAMESPACE];
    for set in sets {
        args.extend(["--set", set]);
    }
    let out = run_helm(&args);
    if !out.status.success() {
        return Err(text(&out.stderr));
    }
    let daemonset: DaemonSet = serde_yaml::Deserializer::from_str(&text(&out.stdout))
        .map(|doc| Value::deserialize(doc).expect("helm renders YAML"))
        .find(|v| v["kind"] == "DaemonSet")
        .map(|v| serde_json::from_value(v).expect("a DaemonSet"))
        .expect("the chart renders a DaemonSet");
    let pod = daemonset.spec.unwrap().template.spec.unwrap();
    let volumes = pod
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.clone())
        .collect();
    let args = pod.containers[0].args.clone().unwrap_or_default();
    Ok((args, volumes))
}

#[test]
fn the_chart_turns_its_values_into_the_agents_arguments() {
    let (args, volumes) = rendered_with(&[
        "interfaces={eth0,eth1}",
        "xdpInterfaces={eth1}",
        "lbAlgorithm=maglev",
        "serviceProxyName=lb",
        "socketLB=false",
        "extraArgs={--node-ip=10.0.0.5}",
        "mode=ipvs",
        "iptablesBackend=legacy",
        "ipvsScheduler=mh",
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    for arg in [
        "--iface=eth0",
        "--iface=eth1",
        "--xdp-iface=eth1",
        "--lb-algorithm=maglev",
        "--service-proxy-name=lb",
        "--no-socket-lb",
        "--node-ip=10.0.0.5",
        "--mode=ipvs",
        "--iptables-backend=legacy",
        "--ipvs-scheduler=mh",
    ] {
        assert!(args.iter().any(|a| a == arg), "{arg} is not in {args:?}");
    }
    assert!(!args.iter().any(|a| a.starts_with("--cgroup")), "{args:?}");
    assert_eq!(
        volumes,
        ["bpffs", "xtables-lock"],
        "no cgroup mount without socket LB"
    );

    let bad = rendered_with(&["lbAlgorithm=roundrobin"]).unwrap_err();
    assert!(bad.contains("neither random nor maglev"), "{bad}");
    let none = rendered_with(&["interfaces=null"]).unwrap_err();
    assert!(none.contains("list at least one interface"), "{none}");
    rendered_with(&["interfaces=null", "mode=iptables"])
        .unwrap_or_else(|e| panic!("a fallback mode needs no interfaces: {e}"));
    let bad = rendered_with(&["mode=bpf"]).unwrap_err();
    assert!(bad.contains("none of auto, ebpf"), "{bad}");
    let bad = rendered_with(&["iptablesBackend=nf_tables"]).unwrap_err();
    assert!(bad.contains("none of system, nft, legacy"), "{bad}");
    let bad = rendered_with(&["ipvsScheduler=dh"]).unwrap_err();
    assert!(bad.contains("none of rr, wrr"), "{bad}");
    let unprobed = rendered_with(&["healthzBindAddress=off"]).unwrap_err();
    assert!(unprobed.contains("readiness probe"), "{unprobed}");
    let (args, _) = rendered_with(&["metricsBindAddress=off"]).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        args.iter().any(|a| a == "--metrics-bind-address=off"),
        "{args:?}"
    );
}
