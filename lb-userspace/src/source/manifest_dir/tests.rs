use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::*;
use crate::model::{self, Endpoint, Protocol, ServicePortName};

/// A scratch directory under the system temp dir, removed when dropped.
struct TestDir {
    root: PathBuf,
}

impl TestDir {
    fn new(test: &str) -> TestDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let unique = NEXT.fetch_add(1, Ordering::Relaxed);
        let root = std::env::temp_dir().join(format!(
            "lb-manifest-dir-{test}-{}-{unique}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        TestDir { root }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    fn write(&self, relative: &str, text: &str) {
        let path = self.path(relative);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    fn remove(&self, relative: &str) {
        fs::remove_file(self.path(relative)).unwrap();
    }

    fn source(&self) -> ManifestDir {
        ManifestDir::new(&self.root).unwrap()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn service_yaml(namespace: &str, name: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\n\
         spec:\n  clusterIP: 10.96.0.10\n  ports:\n  - port: {port}\n"
    )
}

/// `namespace/name` of every Service and EndpointSlice in a scan.
fn names(scan: &Scan) -> (Vec<String>, Vec<String>) {
    let name = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        format!(
            "{}/{}",
            meta.namespace.as_deref().unwrap_or("<none>"),
            meta.name.as_deref().unwrap_or("<none>")
        )
    };
    (
        scan.services.iter().map(|s| name(&s.metadata)).collect(),
        scan.endpoint_slices
            .iter()
            .map(|s| name(&s.metadata))
            .collect(),
    )
}

fn service_names(scan: &Scan) -> Vec<String> {
    names(scan).0
}

/// The first port of the named service.
fn service_port(scan: &Scan, name: &str) -> i32 {
    let service = scan
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no service {name} in {:?}", service_names(scan)));
    service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port
}

#[test]
fn multi_document_yaml() {
    let dir = TestDir::new("multi-doc");
    dir.write(
        "app.yaml",
        "# a comment before the first document\n---\n\
         apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  clusterIP: 10.96.0.10\n  \
         ports:\n  - port: 80\n\
         ---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  \
         labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\nports:\n- port: 8080\n\
         endpoints:\n- addresses: [10.0.0.1]\n\
         ---\n\
         apiVersion: v1\nkind: Service\nmetadata:\n  name: db\n  namespace: data\nspec:\n  \
         clusterIP: 10.96.0.20\n  ports:\n  - port: 5432\n\
         ---\n",
    );
    let scan = dir.source().scan();
    assert_eq!(scan.errors, []);
    assert!(scan.changed);
    assert_eq!(scan.files_read, 1);
    assert_eq!(
        names(&scan),
        (
            vec!["data/db".to_owned(), "default/web".to_owned()],
            vec!["default/web-1".to_owned()]
        ),
        "an absent namespace is filled in as default"
    );
}

/// The output of `kubectl get svc,endpointslices -A -o yaml`, as it is, loads and programs.
#[test]
fn kubectl_list_output() {
    let dir = TestDir::new("kubectl-list");
    dir.write(
        "cluster.yaml",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/manifests/kubectl-get-svc-endpointslices.yaml"
        )),
    );
    let scan = dir.source().scan();
    assert_eq!(scan.errors, []);
    assert_eq!(
        names(&scan),
        (
            vec!["default/kubernetes".to_owned(), "shop/web".to_owned()],
            vec!["default/kubernetes".to_owned(), "shop/web-x7k2p".to_owned()]
        )
    );

    let (state, warnings) = model::build(
        &scan.services,
        &scan.endpoint_slices,
        &model::Node::default(),
    );
    assert_eq!(warnings, []);
    let web = &state.services[&ServicePortName {
        namespace: "shop".into(),
        name: "web".into(),
        port: "http".into(),
        protocol: Protocol::Tcp,
    }];
    // The terminating, not-ready endpoint is left out.
    let want = [Endpoint {
        addr: [10, 244, 1, 7].into(),
        port: 8080,
    }];
    assert_eq!(web.endpoints.iter().copied().collect::<Vec<_>>(), want);
    assert_eq!(state.services.len(), 2);
}

#[test]
fn json_files_and_typed_lists() {
    let dir = TestDir::new("json");
    dir.write(
        "web.json",
        r#"{"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}}"#,
    );
    // As the API returns a list: the items name neither kind nor apiVersion.
    dir.write(
        "raw.json",
        r#"{"apiVersion": "v1", "kind": "ServiceList", "metadata": {},
            "items": [{"metadata": {"name": "db"}, "spec": {"clusterIP": "10.96.0.20",
                       "ports": [{"port": 5432}]}}]}"#,
    );
    let scan = dir.source().scan();
    assert_eq!(scan.errors, []);
    assert_eq!(service_names(&scan), ["default/db", "shop/web"]);
}

#[test]
fn other_kinds_and_files_are_ignored() {
    let dir = TestDir::new("ignored");
    dir.write(
        "mixed.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 3\n\
         ---\n\
         apiVersion: v1\nkind: List\nitems:\n\
         - apiVersion: v1\n  kind: ConfigMap\n  metadata:\n    name: config\n  data:\n    a: b\n\
         - apiVersion: v1\n  kind: Endpoints\n  metadata:\n    name: web\n  subsets: []\n\
         - apiVersion: v1\n  kind: Pod\n  metadata:\n    name: web-1\n",
    );
    // Files that are not manifests, or are hidden or editor leftovers, are not even read:
    // each would be an error if it were.
    let broken = "kind: Service\nmetadata: [not, a, mapping\n";
    for name in [
        "README.md",
        ".hidden.yaml",
        "web.yaml~",
        ".web.yaml.swp",
        "notes.txt",
    ] {
        dir.write(name, broken);
    }
    dir.write(".git/config.yaml", broken);
    dir.write("nested/deeper/web.yml", &service_yaml("shop", "web", 80));

    let scan = dir.source().scan();
    assert_eq!(scan.errors, []);
    assert_eq!(scan.files_read, 2);
    assert_eq!(service_names(&scan), ["shop/web"]);
    assert!(scan.endpoint_slices.is_empty());
}

#[test]
fn invalid_yaml_file_is_reported_and_the_rest_loads() {
    let dir = TestDir::new("invalid-yaml");
    dir.write("good.yaml", &service_yaml("shop", "web", 80));
    dir.write(
        "broken.yaml",
        &format!(
            "{}---\nkind: Service\nmetadata: {{name: [unclosed\n",
            service_yaml("shop", "db", 5432)
        ),
    );
    dir.write("broken.json", "{\"kind\": \"Service\",");

    let scan = dir.source().scan();
    // The document before the error still loads.
    assert_eq!(service_names(&scan), ["shop/db", "shop/web"]);
    assert_eq!(scan.errors.len(), 2, "{:#?}", scan.errors);
    let ManifestError::Syntax {
        path,
        document,
        format,
        kept,
        ..
    } = &scan.errors[0]
    else {
        panic!("not a syntax error: {:?}", scan.errors[0]);
    };
    assert_eq!(
        (path, *document, *format, *kept),
        (&dir.path("broken.json"), 1, "JSON", 0)
    );
    let ManifestError::Syntax { path, document, .. } = &scan.errors[1] else {
        panic!("not a syntax error: {:?}", scan.errors[1]);
    };
    assert_eq!((path, *document), (&dir.path("broken.yaml"), 2));
    let message = scan.errors[1].to_string();
    assert!(
        message.contains(&format!(
            "{} document 2 is not valid YAML",
            dir.path("broken.yaml").display()
        )),
        "{message}"
    );
}

#[test]
fn invalid_object_names_file_and_object_and_the_rest_loads() {
    let dir = TestDir::new("invalid-object");
    dir.write(
        "app.yaml",
        &format!(
            "{}---\n{}",
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\nspec:\n  \
             clusterIP: 10.96.0.10\n  ports:\n  - port: abc\n",
            service_yaml("shop", "db", 5432)
        ),
    );
    dir.write("other.yaml", &service_yaml("shop", "cache", 6379));

    let scan = dir.source().scan();
    assert_eq!(service_names(&scan), ["shop/cache", "shop/db"]);
    assert_eq!(scan.errors.len(), 1, "{:#?}", scan.errors);
    let ManifestError::Object {
        location,
        object,
        reason,
        kept_last_good,
    } = &scan.errors[0]
    else {
        panic!("not an object error: {:?}", scan.errors[0]);
    };
    assert_eq!(
        location,
        &Location {
            path: dir.path("app.yaml"),
            document: 1,
            item: None
        }
    );
    assert_eq!(object.to_string(), "Service shop/web");
    assert!(!kept_last_good);
    assert!(reason.contains("spec.ports[0].port"), "{reason}");
    assert!(reason.contains("\"abc\""), "{reason}");
    assert!(
        !reason.contains("line"),
        "positions in re-printed text mislead: {reason}"
    );
    let message = scan.errors[0].to_string();
    assert!(
        message.contains("app.yaml document 1: Service shop/web: "),
        "{message}"
    );
    assert!(message.ends_with("not loaded"), "{message}");
}

#[test]
fn objects_that_cannot_be_identified_are_reported() {
    let dir = TestDir::new("unidentified");
    dir.write(
        "odd.yaml",
        "just a string\n\
         ---\n\
         metadata: {name: web}\n\
         ---\n\
         apiVersion: v1\nkind: Service\nmetadata: {namespace: shop}\n\
         ---\n\
         apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: web-1}\n\
         addressType: IPv4\nendpoints: []\n\
         ---\n\
         apiVersion: v1\nkind: List\nitems: {not: a sequence}\n",
    );
    let scan = dir.source().scan();
    assert!(scan.services.is_empty() && scan.endpoint_slices.is_empty());
    let messages: Vec<String> = scan.errors.iter().map(ToString::to_string).collect();
    let path = dir.path("odd.yaml").display().to_string();
    let want = [
        format!("{path} document 1: not an object"),
        format!("{path} document 2: the object has no kind"),
        format!("{path} document 3: the Service has no metadata.name"),
        format!(
            "{path} document 4: EndpointSlice default/web-1: \
             apiVersion \"discovery.k8s.io/v1beta1\" is not supported; use discovery.k8s.io/v1"
        ),
        format!("{path} document 5: the List's items are not a sequence"),
    ];
    assert_eq!(messages.len(), want.len(), "{messages:#?}");
    for (message, want) in messages.iter().zip(&want) {
        assert!(
            message.starts_with(want),
            "{message:?} should start with {want:?}"
        );
    }
}

#[test]
fn broken_object_keeps_its_last_good_version() {
    let dir = TestDir::new("last-good-object");
    dir.write(
        "app.yaml",
        &format!(
            "{}---\n{}",
            service_yaml("shop", "web", 80),
            service_yaml("shop", "db", 5432)
        ),
    );
    let mut source = dir.source();
    assert_eq!(service_names(&source.scan()), ["shop/db", "shop/web"]);

    // Mid-edit: web's port is being retyped, and db changed in the same save.
    dir.write(
        "app.yaml",
        &format!(
            "{}---\n{}",
            service_yaml("shop", "web", 80).replace("port: 80", "port: 8o"),
            service_yaml("shop", "db", 5433)
        ),
    );
    let scan = source.scan();
    assert!(scan.changed, "db changed");
    assert_eq!(service_names(&scan), ["shop/db", "shop/web"]);
    assert_eq!(
        service_port(&scan, "web"),
        80,
        "the last good version is served"
    );
    assert_eq!(service_port(&scan, "db"), 5433);
    assert!(
        matches!(&scan.errors[..], [ManifestError::Object { object, kept_last_good: true, .. }]
                 if object.name == "web"),
        "{:#?}",
        scan.errors
    );
    assert!(scan.errors[0]
        .to_string()
        .ends_with("serving its last good version until it is fixed"));

    // Unchanged and still broken: still served, still reported.
    let scan = source.scan();
    assert!(!scan.changed);
    assert_eq!(scan.files_read, 0);
    assert_eq!(service_port(&scan, "web"), 80);
    assert_eq!(scan.errors.len(), 1);

    // Fixed.
    dir.write("app.yaml", &service_yaml("shop", "web", 8080));
    let scan = source.scan();
    assert!(scan.changed);
    assert_eq!(scan.errors, []);
    assert_eq!(
        service_names(&scan),
        ["shop/web"],
        "db was deleted from a file that parses"
    );
    assert_eq!(service_port(&scan, "web"), 8080);
}

#[test]
fn unparseable_file_keeps_the_objects_it_defined() {
    let dir = TestDir::new("last-good-file");
    let good = format!(
        "{}---\n{}",
        service_yaml("shop", "web", 80),
        service_yaml("shop", "db", 5432)
    );
    dir.write("app.yaml", &good);
    let mut source = dir.source();
    source.scan();

    dir.write(
        "app.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: [\n",
    );
    let scan = source.scan();
    assert!(!scan.changed);
    assert_eq!(service_names(&scan), ["shop/db", "shop/web"]);
    assert!(
        matches!(
            &scan.errors[..],
            [ManifestError::Syntax {
                kept: 2,
                document: 1,
                ..
            }]
        ),
        "{:#?}",
        scan.errors
    );

    // Broken in its second document: the first is read afresh, the rest kept.
    dir.write(
        "app.yaml",
        &format!("{}---\nkind: [\n", service_yaml("shop", "web", 8080)),
    );
    let scan = source.scan();
    assert!(scan.changed);
    assert_eq!(service_names(&scan), ["shop/db", "shop/web"]);
    assert_eq!(service_port(&scan, "web"), 8080);
    assert!(
        matches!(
            &scan.errors[..],
            [ManifestError::Syntax {
                kept: 1,
                document: 2,
                ..
            }]
        ),
        "{:#?}",
        scan.errors
    );
}

#[test]
fn deleted_files_and_objects_are_gone() {
    let dir = TestDir::new("deletion");
    dir.write("a.yaml", &service_yaml("shop", "a", 80));
    dir.write(
        "b.yaml",
        &format!(
            "{}---\n{}",
            service_yaml("shop", "b1", 80),
            service_yaml("shop", "b2", 80)
        ),
    );
    let mut source = dir.source();
    assert_eq!(
        service_names(&source.scan()),
        ["shop/a", "shop/b1", "shop/b2"]
    );

    dir.remove("a.yaml");
    let scan = source.scan();
    assert!(scan.changed);
    assert_eq!(scan.files_read, 0);
    assert_eq!(service_names(&scan), ["shop/b1", "shop/b2"]);

    dir.write("b.yaml", &service_yaml("shop", "b2", 80));
    let scan = source.scan();
    assert!(scan.changed);
    assert_eq!(service_names(&scan), ["shop/b2"]);

    dir.write("b.yaml", "");
    let scan = source.scan();
    assert!(scan.changed);
    assert!(scan.services.is_empty());
    assert_eq!(scan.errors, []);
}

#[test]
fn rescans_read_only_changed_files() {
    let dir = TestDir::new("incremental");
    for name in ["a", "b", "c"] {
        dir.write(&format!("{name}.yaml"), &service_yaml("shop", name, 80));
    }
    let mut source = dir.source();
    let scan = source.scan();
    assert_eq!((scan.files_read, scan.changed), (3, true));

    let scan = source.scan();
    assert_eq!((scan.files_read, scan.changed), (0, false));
    assert_eq!(
        service_names(&scan),
        ["shop/a", "shop/b", "shop/c"],
        "unchanged files still count"
    );

    // A different size, so the change shows even within one clock tick.
    dir.write("b.yaml", &service_yaml("shop", "b", 8080));
    let scan = source.scan();
    assert_eq!((scan.files_read, scan.changed), (1, true));
    assert_eq!(service_port(&scan, "b"), 8080);

    // Rewritten with the same content: read again, but nothing changed.
    dir.write("c.yaml", &format!("{}\n", service_yaml("shop", "c", 80)));
    let scan = source.scan();
    assert_eq!((scan.files_read, scan.changed), (1, false));

    dir.write("d.yaml", &service_yaml("shop", "d", 80));
    let scan = source.scan();
    assert_eq!((scan.files_read, scan.changed), (1, true));

    dir.remove("a.yaml");
    let scan = source.scan();
    assert_eq!((scan.files_read, scan.changed), (0, true));
    assert_eq!(service_names(&scan), ["shop/b", "shop/c", "shop/d"]);
}

#[test]
fn duplicates_are_reported_and_the_first_path_wins() {
    let dir = TestDir::new("duplicates");
    dir.write("a.yaml", &service_yaml("shop", "web", 80));
    dir.write("b/web.yaml", &service_yaml("shop", "web", 8080));
    let mut source = dir.source();
    for _ in 0..2 {
        let scan = source.scan();
        assert_eq!(service_port(&scan, "web"), 80);
        assert_eq!(
            scan.errors,
            [ManifestError::Duplicate {
                object: ObjectRef {
                    kind: ObjectKind::Service,
                    namespace: "shop".into(),
                    name: "web".into()
                },
                first: Location {
                    path: dir.path("a.yaml"),
                    document: 1,
                    item: None
                },
                second: Location {
                    path: dir.path("b/web.yaml"),
                    document: 1,
                    item: None
                },
            }]
        );
    }
    let message = source.scan().errors[0].to_string();
    assert!(message.contains("a.yaml document 1"), "{message}");
    assert!(message.contains("b/web.yaml document 1"), "{message}");

    dir.remove("a.yaml");
    let scan = source.scan();
    assert_eq!(scan.errors, []);
    assert_eq!(service_port(&scan, "web"), 8080);
}

/// A mounted ConfigMap: files are links into `..data`, itself a link to a timestamped
/// directory that an update swaps.
#[test]
fn configmap_volume_layout() {
    let dir = TestDir::new("configmap");
    dir.write(
        "..2025_05_02_10_00_00.1/web.yaml",
        &service_yaml("shop", "web", 80),
    );
    std::os::unix::fs::symlink("..2025_05_02_10_00_00.1", dir.path("..data")).unwrap();
    std::os::unix::fs::symlink("..data/web.yaml", dir.path("web.yaml")).unwrap();
    let mut source = dir.source();
    let scan = source.scan();
    assert_eq!(scan.errors, []);
    assert_eq!(service_names(&scan), ["shop/web"]);

    // The kubelet's update: a new directory, and `..data` swapped to it.
    dir.write(
        "..2025_05_02_11_00_00.2/web.yaml",
        &service_yaml("shop", "web", 8080),
    );
    std::os::unix::fs::symlink("..2025_05_02_11_00_00.2", dir.path("..data_tmp")).unwrap();
    fs::rename(dir.path("..data_tmp"), dir.path("..data")).unwrap();
    let scan = source.scan();
    assert!(scan.changed);
    assert_eq!(service_port(&scan, "web"), 8080);
}

#[test]
fn a_missing_directory_says_so() {
    let dir = TestDir::new("missing");
    let missing = dir.path("nope");
    let err = ManifestDir::new(&missing).unwrap_err();
    assert!(matches!(err, DirError::Missing { .. }), "{err:?}");
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert!(matches!(watch(&missing), Err(DirError::Missing { .. })));

    dir.write("file.yaml", "");
    let err = ManifestDir::new(dir.path("file.yaml")).unwrap_err();
    assert!(matches!(err, DirError::NotADirectory { .. }), "{err:?}");
}

#[test]
fn a_directory_that_disappears_keeps_everything() {
    let dir = TestDir::new("vanishing");
    dir.write("sub/web.yaml", &service_yaml("shop", "web", 80));
    let mut source = ManifestDir::new(dir.path("sub")).unwrap();
    source.scan();
    fs::remove_dir_all(dir.path("sub")).unwrap();
    let scan = source.scan();
    assert_eq!(service_names(&scan), ["shop/web"]);
    assert!(
        matches!(&scan.errors[..], [ManifestError::ListDir { .. }]),
        "{:#?}",
        scan.errors
    );
}

#[tokio::test]
async fn watcher_signals_changes() {
    let dir = TestDir::new("watch");
    let (_watcher, mut changes) = watch(&dir.root).unwrap();
    dir.write("web.yaml", &service_yaml("shop", "web", 80));
    tokio::time::timeout(Duration::from_secs(5), changes.recv())
        .await
        .expect("no signal within 5s of writing a file")
        .expect("the watcher stopped");

    // Reading, as a scan does, signals nothing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    while changes.try_recv().is_ok() {}
    assert_eq!(dir.source().scan().files_read, 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        changes.try_recv().is_err(),
        "a scan's own reads were reported as a change"
    );
}

#[test]
fn node_objects_are_read_without_a_namespace() {
    let dir = TestDir::new("node");
    dir.write(
        "nodes.yaml",
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  labels:\n    topology.kubernetes.io/zone: zone-1\n\
         ---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node-b\n  namespace: ignored\n\
         ---\napiVersion: v2\nkind: Node\nmetadata:\n  name: node-c\n",
    );
    let scan = dir.source().scan();
    let nodes: Vec<_> = (scan.nodes.iter())
        .map(|n| {
            (
                n.metadata.name.clone().unwrap(),
                n.metadata.namespace.clone(),
            )
        })
        .collect();
    assert_eq!(
        nodes,
        [
            ("node-a".to_owned(), None),
            ("node-b".to_owned(), Some("ignored".to_owned()))
        ],
        "nodes are cluster-scoped: no namespace is filled in, and a stray one does not key them"
    );
    let zone = scan.nodes[0].metadata.labels.as_ref().unwrap();
    assert_eq!(zone["topology.kubernetes.io/zone"], "zone-1");
    let errors: Vec<String> = scan.errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("Node node-c") && errors[0].contains("apiVersion \"v2\""),
        "{errors:?}"
    );
}
